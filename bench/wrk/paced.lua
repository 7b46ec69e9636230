-- beacons.lua at a fixed rate (its RATE argument): wrk calls delay() before each request.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "beacons.lua")

function delay()
  return paced_delay()
end
