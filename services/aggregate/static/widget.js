/*! visitorstats widget.js - the "Thống kê truy cập" block, live. No dependencies.
 *
 *   <div data-visitorstats-widget data-site="dongha" data-lang="vi"></div>
 *   <script defer src="https://stats.example/widget.js"></script>
 *
 * Options, on the div or on the script tag: data-lang="vi"|"en" (default vi; "en-US", "EN"
 * are English), data-poll="10" (seconds between polls when the stream is unavailable),
 * data-stream="off" (poll only), data-visits="today,yesterday,week,month,total" (the visits
 * rows shown, in that order whatever the order named; default "today,total").
 *
 * Connections: a browser opens at most 6 to one host over HTTP/1.1, and a stream holds one for
 * as long as the page is open. So the tabs of one portal share one stream per site: one tab
 * leads, streams and relays each snapshot to the others over a BroadcastChannel; when it
 * closes, another tab takes over (see Source). A page streams at most
 * MAX_STREAMS sites and polls any others. The reader's beacons always find a connection.
 * Theme: set --vs-bg, --vs-fg, --vs-accent, --vs-border, --vs-font (also --vs-muted, --vs-warn,
 * --vs-radius) on the div or any ancestor.
 *
 * DOM contract (stable, for tests and portal CSS), on each widget element:
 *   data-vs-state    connecting | live | polling | stale | error (no such site)
 *   data-vs-relay    "leader" (this tab streams for the others) | "follower" | absent
 *   data-vs-updates  how many counter snapshots have been rendered into it
 *   data-vs-as-of    the snapshot's as_of
 *   [data-vs=guests|members|total|visits-today|visits-total]  the numbers (and
 *   visits-yesterday|visits-week|visits-month, the rows data-visits adds)
 *   [data-vs=stale]  the stale mark, hidden unless stale or unreachable
 */
(function (w, d) {
  "use strict";
  var script = d.currentScript || d.querySelector("script[src*='widget.js']");
  if (!script || !w.fetch) return;
  var base = script.src.split(/[?#]/)[0].replace(/\/[^\/]*$/, "");
  // A portal whose CSP allows scripts by nonce gave this one its nonce: the block's style
  // carries it too (the attribute reads empty once set: the property keeps it).
  var nonce = script.nonce || script.getAttribute("nonce") || "";

  var LABELS = {
    vi: {
      title: "Thống kê truy cập",
      online: "Người trực tuyến",
      guests: "Khách",
      members: "Thành viên",
      total: "Tổng",
      visits: "Lượt truy cập",
      visits_today: "Truy cập hôm nay",
      visits_yesterday: "Truy cập hôm qua",
      visits_week: "Truy cập tuần này",
      visits_month: "Truy cập tháng này",
      visits_total: "Tổng lượt truy cập",
      stale: "số liệu chưa cập nhật",
      unknown: "Không có trang"
    },
    en: {
      title: "Visitor statistics",
      online: "Online now",
      guests: "Guests",
      members: "Members",
      total: "Total",
      visits: "Visits",
      visits_today: "Visits today",
      visits_yesterday: "Visits yesterday",
      visits_week: "Visits this week",
      visits_month: "Visits this month",
      visits_total: "Total visits",
      stale: "numbers not up to date",
      unknown: "No such site"
    }
  };
  var LOCALES = { vi: "vi-VN", en: "en-US" };
  // data-vs name -> where the number is in the counter JSON
  var FIELDS = {
    guests: ["online", "guests"],
    members: ["online", "members"],
    total: ["online", "total"],
    "visits-today": ["visits", "today"],
    "visits-yesterday": ["visits", "yesterday"],
    "visits-week": ["visits", "this_week"],
    "visits-month": ["visits", "this_month"],
    "visits-total": ["visits", "total"]
  };
  // the visits rows a block may show (data-visits), in the order shown; by default two
  var VISITS = ["today", "yesterday", "week", "month", "total"];
  var DEFAULT_VISITS = ["today", "total"];
  var SITE_ID = /^[a-z0-9][a-z0-9-]{0,63}$/;
  var STREAM_RETRY_MS = 60000; // after a fall-back, try the stream again (if it ever worked)
  var MAX_STREAMS = 2; // sites one page streams; it polls the others (see Connections above)
  var RELAY_BEAT_MS = 10000; // a leading tab says it is there this often...
  var RELAY_LOST_MS = 30000; // ...and a follower that heard nothing for this long polls itself
  var LOAD_TIMEOUT_MS = 10000; // a counter that has not answered in this long is away
  var CSS =
    ".vs-widget{box-sizing:border-box;max-width:22em;padding:.75em 1em;" +
    "background:var(--vs-bg,#fff);color:var(--vs-fg,#1f2937);" +
    "border:1px solid var(--vs-border,#d1d5db);border-radius:var(--vs-radius,6px);" +
    "font:14px/1.5 var(--vs-font,system-ui,-apple-system,'Segoe UI',Roboto,Arial,sans-serif)}" +
    ".vs-widget *{box-sizing:inherit}" +
    ".vs-widget .vs-h{margin:0 0 .4em;padding:0 0 .3em;font:inherit;font-size:1.1em;font-weight:700;" +
    "color:var(--vs-accent,#b91c1c);border-bottom:2px solid var(--vs-accent,#b91c1c);" +
    "display:flex;justify-content:space-between;align-items:baseline;gap:.5em}" +
    ".vs-widget .vs-sub{margin:0;font-weight:600}" +
    ".vs-widget ul{list-style:none;margin:0;padding:0}" +
    ".vs-widget .vs-online{padding-left:1em;margin-bottom:.4em}" +
    ".vs-widget li{display:flex;justify-content:space-between;gap:1em;margin:0;padding:0}" +
    ".vs-widget li.vs-sum{font-weight:600}" +
    ".vs-widget .vs-visits{border-top:1px solid var(--vs-border,#d1d5db);padding-top:.4em}" +
    ".vs-widget .vs-n{font-variant-numeric:tabular-nums;font-weight:600;white-space:nowrap}" +
    ".vs-widget .vs-stale{font-weight:400;font-size:.9em;color:var(--vs-warn,#b45309);cursor:help}" +
    ".vs-widget .vs-err{margin:0;color:var(--vs-warn,#b45309)}" +
    ".vs-widget [hidden]{display:none!important}";

  var sources = {};
  var streams = 0; // sites this page streams (or waits to stream for the other tabs)

  function attr(el, name) {
    var v = el.getAttribute("data-" + name);
    return v == null || v === "" ? script.getAttribute("data-" + name) : v;
  }

  function h(tag, attrs, kids) {
    var e = d.createElement(tag), k, i;
    for (k in attrs) e.setAttribute(k, attrs[k]);
    for (i = 0; kids && i < kids.length; i++) {
      e.appendChild(typeof kids[i] == "string" ? d.createTextNode(kids[i]) : kids[i]);
    }
    return e;
  }

  function formatter(lang) {
    var f = null;
    try {
      f = new Intl.NumberFormat(LOCALES[lang], { maximumFractionDigits: 0 });
    } catch (e) {}
    return function (n) {
      if (typeof n != "number" || !isFinite(n)) return "–";
      if (f) return f.format(n);
      return String(Math.round(n)).replace(/\B(?=(\d{3})+(?!\d))/g, lang == "vi" ? "." : ",");
    };
  }

  /* Two counters with the same numbers (``as_of`` aside: it moves with every refresh). */
  function same(a, b) {
    if (!a || !b) return false;
    var x = {}, y = {}, k;
    for (k in a) if (k != "as_of") x[k] = a[k];
    for (k in b) if (k != "as_of") y[k] = b[k];
    return JSON.stringify(x) == JSON.stringify(y);
  }

  function pick(data, path) {
    var v = data;
    for (var i = 0; v != null && i < path.length; i++) v = v[path[i]];
    return v;
  }

  function injectStyle() {
    if (d.getElementById("visitorstats-widget-style")) return;
    var head = d.head || d.documentElement;
    // First in <head>, so the portal's own rules win over these defaults.
    var style = h("style", { id: "visitorstats-widget-style" }, [CSS]);
    if (nonce) style.nonce = nonce;
    head.insertBefore(style, head.firstChild);
  }

  /* "yesterday,week" (commas or blanks, any case) -> the rows named, in the block's order;
   * none known -> the default. */
  function visits(spec) {
    var named = String(spec || "").toLowerCase().split(/[\s,]+/), out = [], i;
    for (i = 0; i < VISITS.length; i++) if (named.indexOf(VISITS[i]) >= 0) out.push(VISITS[i]);
    return out.length ? out : DEFAULT_VISITS;
  }

  /* "en", "EN", "en-US" -> "en"; anything not known -> "vi". */
  function language(tag) {
    var lang = String(tag || "").toLowerCase().split(/[-_]/)[0];
    return LABELS[lang] ? lang : "vi";
  }

  /* One widget element: builds its markup once, then only touches changed text. */
  function View(el, src, site) {
    var lang = language(attr(el, "lang"));
    var L = LABELS[lang];
    var fmt = formatter(lang);
    var nodes = {};
    var updates = 0;

    function row(key, label, cls) {
      nodes[key] = h("span", { "class": "vs-n", "data-vs": key }, ["–"]);
      return h("li", cls ? { "class": cls } : {}, [h("span", { "class": "vs-k" }, [label]), " ", nodes[key]]);
    }

    var mark = h("span", {
      "class": "vs-stale", "data-vs": "stale", role: "img", title: L.stale, "aria-label": L.stale, hidden: ""
    }, ["⚠"]);
    el.textContent = "";
    el.className = (el.className ? el.className + " " : "") + "vs-widget";
    el.setAttribute("lang", lang);
    // a polite live region: it changes once
    var err = h("p", { "class": "vs-err", "data-vs": "error", "aria-live": "polite", hidden: "" }, [L.unknown + ": " + site]);
    el.appendChild(h("h2", { "class": "vs-h" }, [h("span", {}, [L.title]), mark]));
    el.appendChild(err);
    // No live region: the numbers change up to once a second, a screen reader would keep
    // reading them out. A labelled group, read when the reader comes to it.
    var body = h("div", { "class": "vs-body", role: "group", "aria-label": L.title }, [
      h("p", { "class": "vs-sub" }, [L.online]),
      h("ul", { "class": "vs-online", "aria-label": L.online }, [
        row("guests", L.guests),
        row("members", L.members),
        row("total", L.total, "vs-sum")
      ]),
      h("ul", { "class": "vs-visits", "aria-label": L.visits }, visits(attr(el, "visits")).map(function (name) {
        return row("visits-" + name, L["visits_" + name], name == "total" ? "vs-sum" : "");
      }))
    ]);
    el.appendChild(body);
    el.setAttribute("data-vs-updates", "0");

    this.paint = function (fresh) {
      var data = src.data, key, text, state = src.state();
      if (fresh && data) {
        for (key in FIELDS) {
          if (!nodes[key]) continue; // a row this block does not show
          text = fmt(pick(data, FIELDS[key]));
          if (nodes[key].textContent !== text) nodes[key].textContent = text;
        }
        if (data.as_of) el.setAttribute("data-vs-as-of", String(data.as_of));
        el.setAttribute("data-vs-updates", String(++updates));
      }
      if (el.getAttribute("data-vs-state") !== state) el.setAttribute("data-vs-state", state);
      mark.hidden = state != "stale";
      err.hidden = state != "error";
      body.hidden = state == "error";
      if (src.relay) el.setAttribute("data-vs-relay", src.relay);
    };
  }

  /* One counter per site, shared by every widget of that site on the page: one stream (or
   * one poller) however many widgets show it. And shared by the portal's tabs: one of them
   * leads (streams) and relays every snapshot to the others over a BroadcastChannel; a tab
   * that hears no leader takes the lead, and of two leaders the one with the smaller id stays
   * (no lock needed: Web Locks exist only on https pages, and portals still serve http). */
  function Source(site, poll, streamAllowed) {
    var self = this;
    var url = base + "/v1/sites/" + encodeURIComponent(site) + "/counter";
    var views = [];
    var mode = "stream"; // "stream" | "poll" | "follow" (another tab streams and relays)
    var es = null, open = false, got = false, everStreamed = false, errors = 0, watchdog = 0;
    var etag = "", seq = 0, inflight = false, down = false, gone = false, pollTimer = 0, fellBack = 0;
    var retryMs = STREAM_RETRY_MS;
    var me = Math.random(), chan = null, relayed = "", heard = 0, beat = 0, claim = 0, watch = 0;
    var streamHeard = 0, silence = 0, streamer = false; // (one of the page's MAX_STREAMS)

    this.data = null;
    this.poll = poll;
    this.relay = ""; // "leader" | "follower" while the portal's tabs share the stream
    this.add = function (view) {
      views.push(view);
      view.paint(!!self.data); // a widget added later shows the numbers at once
    };
    this.state = function () {
      if (gone) return "error";
      if (down || (self.data && self.data.stale === true)) return "stale";
      if (mode == "follow") return relayed && self.data ? relayed : "connecting";
      if (mode == "poll") return self.data ? "polling" : "connecting";
      return open && self.data ? "live" : "connecting";
    };

    function paint(fresh) {
      for (var i = 0; i < views.length; i++) views[i].paint(fresh);
      if (self.relay == "leader") relay(fresh);
    }

    function say(message) {
      try {
        chan.postMessage(message);
      } catch (e) {}
    }

    function relay(fresh) {
      say({ from: me, data: fresh ? self.data : null, state: self.state() });
    }

    function show(data) {
      if (!data || typeof data != "object") return;
      self.data = data;
      down = false;
      paint(true);
    }

    // The numbers now; ``missed`` is called when they are newer than the stream's (which
    // then delivers no more: a connection a NAT or a proxy dropped without a word).
    function load(missed) {
      if (inflight) return;
      inflight = true;
      var mine = seq, headers = {}, ctl = w.AbortController ? new AbortController() : null;
      var late = setTimeout(function () {
        if (ctl) ctl.abort(); // a counter that does not answer (a hung server) is away
      }, LOAD_TIMEOUT_MS);
      if (etag) headers["If-None-Match"] = etag;
      fetch(url, { headers: headers, cache: "no-store", credentials: "omit", signal: ctl ? ctl.signal : null })
        .then(function (r) {
          if (r.status == 304) return null;
          if (r.status == 404) return stop(); // no such site: nothing to ask again
          if (!r.ok) throw new Error("HTTP " + r.status);
          var tag = r.headers.get("ETag") || "";
          return r.json().then(function (data) {
            return { data: data, etag: tag };
          });
        })
        .then(function (res) {
          inflight = false;
          clearTimeout(late);
          var back = down; // the service answers again after an outage
          // A stream message that arrived meanwhile is newer than this answer.
          if (res && mine == seq) {
            // the numbers the stream gave last, asked again with the first answer's ETag (a
            // stream message carries none): the same numbers are no sign of a lost stream
            var newer = !same(res.data, self.data);
            etag = res.etag;
            show(res.data);
            if (missed && newer) missed();
          } else if (down) {
            down = false;
            paint(false);
          }
          // Polling since the stream failed: try it again now and then (if it ever worked),
          // and at once when the service is back from an outage (a restart took the stream).
          if (mode == "poll" && ((back && streamer) || (everStreamed && Date.now() - fellBack > retryMs))) {
            if (!back) retryMs = Math.min(retryMs * 2, 600000);
            openStream();
          }
        }, function () {
          inflight = false;
          clearTimeout(late);
          down = true; // keep the last numbers, show the stale mark
          paint(false);
        });
    }

    function quiet() {
      if (es) es.close();
      es = null;
      open = false;
      clearTimeout(watchdog);
      clearInterval(silence);
      clearInterval(pollTimer);
    }

    function stop() {
      gone = true;
      quiet();
      clearInterval(beat);
      clearInterval(watch);
      clearTimeout(claim);
      paint(false);
    }

    function tick() {
      // a leading tab polls for the others even while it is hidden
      if (!gone && (d.visibilityState != "hidden" || self.relay == "leader")) load();
    }

    function startPolling() {
      if (gone) return;
      quiet();
      mode = "poll";
      fellBack = Date.now();
      pollTimer = setInterval(tick, self.poll * 1000);
      load();
      paint(false);
    }

    function openStream() {
      if (gone) return;
      if (!w.EventSource) return startPolling();
      clearInterval(pollTimer);
      mode = "stream";
      got = false;
      errors = 0;
      try {
        if (es) es.close();
      es = new EventSource(url + "/stream");
      } catch (e) {
        return startPolling();
      }
      es.onopen = function () {
        open = true;
        streamHeard = Date.now();
        paint(false);
      };
      es.onmessage = function (e) {
        var data;
        try {
          data = JSON.parse(e.data);
        } catch (x) {
          return;
        }
        got = everStreamed = open = true;
        streamHeard = Date.now();
        errors = 0;
        retryMs = STREAM_RETRY_MS;
        seq++;
        show(data);
      };
      es.onerror = function () {
        open = false;
        // Blocked (error before any message) or failing twice in a row: poll instead.
        if (!got || ++errors >= 2 || this.readyState == 2) startPolling();
        else paint(false);
      };
      // A stream that opens but never delivers (a buffering proxy): poll instead.
      var limit = Math.max(15, 2 * self.poll) * 1000;
      clearTimeout(watchdog);
      watchdog = setTimeout(function () {
        if (!got && mode == "stream") startPolling();
      }, limit);
      // A stream silent that long may be gone unsaid (its keep-alives are comments, which
      // EventSource keeps from the page): ask the counter. Newer numbers than the stream's
      // mean the stream is lost: open it again; no answer means the service is away.
      clearInterval(silence);
      silence = setInterval(function () {
        if (mode == "stream" && got && Date.now() - streamHeard >= limit) {
          streamHeard = Date.now();
          load(function () {
            if (mode == "stream") openStream();
          });
        }
      }, limit / 3);
    }

    /* -- the tabs' relay -- */
    function lead() {
      if (gone || self.relay == "leader") return;
      self.relay = "leader";
      openStream();
      paint(false);
      clearInterval(beat);
      beat = setInterval(function () {
        relay(false);
      }, RELAY_BEAT_MS);
    }

    function follow() {
      quiet();
      clearInterval(beat);
      self.relay = "follower";
      mode = "follow";
    }

    function later() {
      // take the lead unless a leader speaks first
      clearTimeout(claim);
      claim = setTimeout(lead, 200 + Math.random() * 600);
    }

    function hear(m) {
      if (!m || typeof m != "object" || gone) return;
      if (m.hello) {
        if (self.relay == "leader") relay(true);
        return;
      }
      if (m.bye) {
        if (self.relay != "leader") later(); // the leading tab closed
        return;
      }
      if (typeof m.from != "number" || m.from == me) return;
      if (self.relay == "leader") {
        if (m.from > me) return relay(false); // two leaders: the other gives way on hearing this
        follow();
      }
      heard = Date.now();
      clearTimeout(claim);
      if (m.state == "error") return stop();
      if (mode == "poll") {
        clearInterval(pollTimer); // relayed numbers again
        mode = "follow";
      }
      relayed = m.state;
      var fresh = !!m.data && typeof m.data == "object";
      if (fresh) {
        seq++;
        self.data = m.data;
        down = false;
      }
      paint(fresh);
    }

    function join() {
      try {
        chan = new BroadcastChannel("visitorstats " + url);
      } catch (e) {
        chan = null;
        return openStream();
      }
      chan.onmessage = function (e) {
        hear(e.data);
      };
      follow();
      heard = Date.now();
      say({ hello: 1 });
      later();
    }

    function share() {
      join();
      watch = setInterval(function () {
        // a leader that went quiet (a frozen tab): someone takes over
        if (chan && self.relay != "leader" && !gone && Date.now() - heard > RELAY_LOST_MS) {
          heard = Date.now();
          later();
        }
      }, RELAY_BEAT_MS);
      w.addEventListener("pagehide", function () {
        // Gone, or into the back/forward cache: no stream and no channel held there (a
        // message to a cached page would evict it, and Back would load the page again).
        if (self.relay == "leader") say({ bye: 1 });
        quiet();
        clearInterval(beat);
        clearTimeout(claim);
        self.relay = "";
        if (chan) chan.close();
        chan = null;
      });
      w.addEventListener("pageshow", function (e) {
        if (e.persisted && !gone) {
          load(); // back from the cache: current numbers at once, then the relay again
          join();
        }
      });
    }

    this.start = function () {
      paint(false);
      if (!streamAllowed || !w.EventSource || streams >= MAX_STREAMS) {
        startPolling();
      } else {
        streams++;
        streamer = true;
        load(); // numbers at once; the stream (this tab's or a relayed one) keeps them current
        if (w.BroadcastChannel) share();
        else openStream();
      }
      d.addEventListener("visibilitychange", function () {
        if (mode == "poll") tick();
      });
    };
  }

  function setup(el, fresh) {
    if (el.getAttribute("data-vs-state")) return; // already running (script included twice)
    var site = el.getAttribute("data-site") || "";
    if (!SITE_ID.test(site)) {
      // no site of any registry: said as for an unknown one, nothing asked
      new View(el, { data: null, relay: "", state: function () { return "error"; } }, site).paint(false);
      return;
    }
    var poll = Math.max(parseFloat(attr(el, "poll")) || 10, 1);
    var src = sources[site];
    if (!src) {
      src = sources[site] = new Source(site, poll, !/^(off|0|false|no)$/i.test(attr(el, "stream") || ""));
      fresh.push(src);
    }
    src.poll = Math.min(src.poll, poll);
    src.add(new View(el, src, site));
  }

  var SELECTOR = "[data-visitorstats-widget]";

  function init() {
    var els = d.querySelectorAll(SELECTOR), fresh = [], i;
    if (!els.length) return;
    injectStyle();
    for (i = 0; i < els.length; i++) setup(els[i], fresh);
    for (i = 0; i < fresh.length; i++) fresh[i].start();
  }

  // Widgets a portal's script adds later (a sidebar filled in after the page loaded).
  function watchPage() {
    if (!w.MutationObserver) return;
    new MutationObserver(function (records) {
      for (var i = 0; i < records.length; i++) {
        for (var j = 0, added = records[i].addedNodes; j < added.length; j++) {
          var n = added[j];
          if (n.nodeType == 1 && (n.matches(SELECTOR) || n.querySelector(SELECTOR))) return init();
        }
      }
    }).observe(d.documentElement, { childList: true, subtree: true });
  }

  function begin() {
    init();
    watchPage();
  }

  if (d.readyState == "loading") d.addEventListener("DOMContentLoaded", begin);
  else begin();
})(window, document);
