-- Varied beacons for visitorstats ingest (and for the baseline, which answers 202 to all).
--
-- wrk -t T -c C -d D -s beacons.lua URL -- BEACON_SECONDS RATE SITES SEED VISITORS THREADS
--
--   BEACON_SECONDS  beacons are sent for this long; afterwards every request is a
--                   `GET /healthz`, so that when wrk stops, the requests still in flight are
--                   health checks: every beacon sent has had its answer (exact ground truth).
--   RATE            beacons per second over all threads (0: as fast as the server answers);
--                   only paced.lua honours it: paced per thread on a fixed schedule, so a
--                   late answer does not move the schedule and later sends catch up (as wrk2).
--   SITES           comma-separated site ids.
--   SEED            random seed (each thread adds its own number).
--   VISITORS        distinct client addresses per thread.
--   THREADS         wrk's -t (the per-thread share of RATE).
--   RUN             a number unique to this run: part of every event_id, so that two runs
--                   never send the same id (the aggregate would count it once).
--
-- Each beacon: a visitor (X-Forwarded-For, loopback is a trusted proxy) out of VISITORS, a
-- browser User-Agent out of a pool (2 % of beacons come from crawlers), a site, a pageview
-- (60 %), heartbeat (35 %) or leave (5 %), 10 % members, sent as POST /collect (text/plain
-- JSON, half of them with an event_id) or GET /collect.gif (query string), half and half.
-- done() prints one JSON line "BENCH {...}" with the counts the harness checks.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local tsbuf = ffi.new("bench_timespec")
local function now()
  ffi.C.clock_gettime(1, tsbuf) -- CLOCK_MONOTONIC
  return tonumber(tsbuf.tv_sec) + tonumber(tsbuf.tv_nsec) * 1e-9
end

local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("tid", thread_count)
  table.insert(threads, thread)
end

local UAS = {
  "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
  "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/125.0.0.0 Safari/537.36 Edg/125.0.0.0",
  "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:127.0) Gecko/20100101 Firefox/127.0",
  "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
  "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
  "Mozilla/5.0 (Linux; Android 14; SM-A546E) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.6478.71 Mobile Safari/537.36",
  "Mozilla/5.0 (Linux; Android 13; Redmi Note 12) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Mobile Safari/537.36",
  "Mozilla/5.0 (Linux; Android 12; CPH2269) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/123.0.0.0 Mobile Safari/537.36",
  "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Mobile Safari/537.36",
  "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
  "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) coc_coc_browser/123.0.198 Chrome/117.0.5938.198 Safari/537.36",
  "Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
}
local BOT_UAS = {
  "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
  "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
  "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
}

local beacon_seconds, rate, sites, visitors
local t_end, interval, next_slot
local ips, pool, pool_n, pool_i, seq, tid
-- The counts are globals: done() reads them through thread:get, which sees globals only.

local function urlencode(s)
  return (s:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", string.byte(c)) end))
end

function init(args)
  tid = wrk.thread:get("tid")
  beacon_seconds = tonumber(args[1] or "10")
  rate = tonumber(args[2] or "0")
  sites = {}
  for s in string.gmatch(args[3] or "demo", "[^,]+") do table.insert(sites, s) end
  math.randomseed(tonumber(args[4] or "1") * 1000 + tid)
  visitors = tonumber(args[5] or "20000")
  local nthreads = tonumber(args[6] or "1")
  run_id = tonumber(args[7] or "0") % 4294967296
  ips = {}
  for v = 0, visitors - 1 do
    ips[v + 1] = string.format("10.%d.%d.%d", tid % 256, math.floor(v / 256) % 256, v % 256)
  end
  -- A pool of beacon variants; each request picks one and a visitor.
  pool, pool_n, pool_i, seq = {}, 2048, 0, 0
  for i = 1, pool_n do
    local r = math.random()
    local kind = r < 0.60 and "pageview" or (r < 0.95 and "heartbeat" or "leave")
    local bot = math.random() < 0.02
    local ua = bot and BOT_UAS[math.random(#BOT_UAS)] or UAS[math.random(#UAS)]
    local site = sites[math.random(#sites)]
    local url = string.format("https://%s.example.vn/tin-tuc/%d/bai-viet-so-%d.html", site, math.random(50), math.random(5000))
    local member = math.random() < 0.10
    local post = (i % 2) == 0
    pool[i] = { kind = kind, bot = bot, ua = ua, site = site, url = url, member = member, post = post,
                with_id = post and (i % 4 == 0),
                title = string.format("Tin tức %d — Cổng thông tin điện tử", math.random(5000)),
                ref = (math.random() < 0.3) and "https://www.google.com/" or "" }
  end
  interval = (rate > 0) and (nthreads / rate) or 0
  sent, sent_pv, sent_hb, sent_leave, sent_bot, sent_bot_pv, sent_post, sent_gif = 0, 0, 0, 0, 0, 0, 0, 0
  ok202, ok200, other = 0, 0, 0
  first_t, last_t = nil, nil
  verifying = (tid == 1)
end

local function beacon_request(b, ip)
  if b.post then
    local body
    if b.with_id then
      seq = seq + 1
      body = string.format(
        '{"site":"%s","type":"%s","url":"%s","referrer":"%s","title":"%s","member":%s,"event_id":"%08x-%04x-4000-8000-%012x"}',
        b.site, b.kind, b.url, b.ref, b.title, b.member and "true" or "false", run_id, tid, seq)
    else
      body = string.format('{"site":"%s","type":"%s","url":"%s","referrer":"%s","title":"%s","member":%s}',
        b.site, b.kind, b.url, b.ref, b.title, b.member and "true" or "false")
    end
    return "POST /collect HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain;charset=UTF-8\r\nUser-Agent: "
      .. b.ua .. "\r\nX-Forwarded-For: " .. ip .. "\r\nContent-Length: " .. #body .. "\r\n\r\n" .. body
  end
  if not b.path then
    b.path = "/collect.gif?site=" .. b.site .. "&type=" .. b.kind .. "&url=" .. urlencode(b.url)
      .. (b.member and "&member=1" or "")
  end
  return "GET " .. b.path .. " HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: " .. b.ua
    .. "\r\nX-Forwarded-For: " .. ip .. "\r\n\r\n"
end

local HEALTH = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

function request()
  if not pool then return HEALTH end
  if verifying then
    -- wrk calls request() once on the first thread's state to check the script, before the
    -- thread runs; that request is never sent, so it must not be counted.
    verifying = false
    return HEALTH
  end
  local t = now()
  if not t_end then
    t_end = t + beacon_seconds
    next_slot = t
  end
  if t >= t_end then
    return HEALTH
  end
  if not first_t then first_t = t end
  pool_i = pool_i + 1
  if pool_i > pool_n then pool_i = 1 end
  local b = pool[pool_i]
  sent = sent + 1
  if b.kind == "pageview" then
    sent_pv = sent_pv + 1
    if b.bot then sent_bot_pv = sent_bot_pv + 1 end
  elseif b.kind == "heartbeat" then
    sent_hb = sent_hb + 1
  else
    sent_leave = sent_leave + 1
  end
  if b.bot then sent_bot = sent_bot + 1 end
  if b.post then sent_post = sent_post + 1 else sent_gif = sent_gif + 1 end
  return beacon_request(b, ips[math.random(visitors)])
end

-- Used by paced.lua (which defines wrk's delay() hook; without it wrk never waits).
function paced_delay()
  if interval == 0 or not next_slot then return 0 end
  local slot = next_slot
  next_slot = next_slot + interval
  local wait = (slot - now()) * 1000
  if wait <= 0 then return 0 end
  return math.floor(wait)
end

function response(status, headers, body)
  if status == 202 then
    ok202 = ok202 + 1
    last_t = now()
  elseif status == 200 then
    ok200 = ok200 + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local tot = { sent = 0, pageviews = 0, heartbeats = 0, leaves = 0, bots = 0, bot_pageviews = 0,
                post = 0, gif = 0, accepted = 0, health = 0, other = 0 }
  local first, last = nil, nil
  for _, t in ipairs(threads) do
    tot.sent = tot.sent + t:get("sent")
    tot.pageviews = tot.pageviews + t:get("sent_pv")
    tot.heartbeats = tot.heartbeats + t:get("sent_hb")
    tot.leaves = tot.leaves + t:get("sent_leave")
    tot.bots = tot.bots + t:get("sent_bot")
    tot.bot_pageviews = tot.bot_pageviews + t:get("sent_bot_pv")
    tot.post = tot.post + t:get("sent_post")
    tot.gif = tot.gif + t:get("sent_gif")
    tot.accepted = tot.accepted + t:get("ok202")
    tot.health = tot.health + t:get("ok200")
    tot.other = tot.other + t:get("other")
    local f, l = t:get("first_t"), t:get("last_t")
    if f and (not first or f < first) then first = f end
    if l and (not last or l > last) then last = l end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH {"sent":%d,"pageviews":%d,"heartbeats":%d,"leaves":%d,"bots":%d,"bot_pageviews":%d,' ..
    '"post":%d,"gif":%d,"accepted":%d,"health":%d,"other":%d,"beacon_seconds":%.6f,' ..
    '"requests":%d,"duration_us":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%.1f,"p90":%.1f,"p99":%.1f,"p999":%.1f,"max":%.1f,"mean":%.1f}}\n',
    tot.sent, tot.pageviews, tot.heartbeats, tot.leaves, tot.bots, tot.bot_pageviews,
    tot.post, tot.gif, tot.accepted, tot.health, tot.other, (first and last) and (last - first) or 0,
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
