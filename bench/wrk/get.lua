-- GET one path as fast as the server answers; done() prints "BENCH {...}" with the answers
-- by status (2xx: the counter answers 200 with its JSON, the baseline 202).
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  ok, other, bytes = 0, 0, 0
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local tok, tother = 0, 0
  for _, t in ipairs(threads) do
    tok = tok + t:get("ok")
    tother = tother + t:get("other")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH {"ok":%d,"other":%d,"requests":%d,"duration_us":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%.1f,"p99":%.1f,"max":%.1f}}\n',
    tok, tother, summary.requests, summary.duration,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
