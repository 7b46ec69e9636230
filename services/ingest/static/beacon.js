/*! visitorstats beacon.js: data-site, data-member, data-member-token, data-heartbeat (s), data-visitor */
(function (w, d, n) {
  "use strict";
  var s = d.currentScript || d.querySelector("script[data-site][src*='beacon.js']");
  var site = s && s.getAttribute("data-site");
  var mine = "visitorstats " + site;
  // one beacon a site on a page (the tag in a header and a footer counted each view twice)
  if (!site || d[mine]) return;
  d[mine] = 1;
  var base = s.src.split(/[?#]/)[0].replace(/\/[^\/]*$/, "");
  var endpoint = base + "/collect";
  var visitor = s.getAttribute("data-visitor");
  var token = s.getAttribute("data-member-token");
  var every = Math.max(parseFloat(s.getAttribute("data-heartbeat")) || 60, 1);
  var timer = 0, left = 0, late = 0, next = 0, refused = 0, chan, page = here();

  function uuid() {
    var c = w.crypto, b = new Uint8Array(16), h = "", i;
    if (c.randomUUID) return c.randomUUID(); // not on http pages
    c.getRandomValues(b);
    b[6] = (b[6] & 15) | 64;
    b[8] = (b[8] & 63) | 128;
    for (i = 0; i < 16; i++) h += (i > 3 && i < 11 && !(i % 2) ? "-" : "") + (b[i] + 256).toString(16).slice(1);
    return h;
  }

  function cut(t, m) {
    return t.slice(0, m).replace(/[\ud800-\udbff]$/, ""); // never half a character
  }

  function send(type, referrer) {
    var ev = {
      site: site, type: type, url: cut(here(), 2048), event_id: uuid(),
      member: /^(1|true)$/i.test(s.getAttribute("data-member"))
    };
    var q = [], k, body;
    if (/^https?:/i.test(referrer)) ev.referrer = cut(referrer, 2048);
    if (d.title) ev.title = cut(d.title, 512);
    if (visitor) ev.visitor = cut(visitor, 128);
    if (token) ev.member_token = cut(token, 256);
    body = JSON.stringify(ev);
    function img() {
      // fetch refused (a CSP, or the service out of reach): this one by the pixel; and a leave
      // not by sendBeacon (refused too, yet says true) until a fetch goes through again
      refused = 1;
      for (k in ev) q.push(k + "=" + encodeURIComponent(ev[k]));
      k = base + "/collect.gif?" + q.join("&");
      // within the server's request line: without the referrer and title if need be
      new Image().src = k.length > 8e3 ? k.replace(/&(referrer|title)=[^&]*/g, "") : k;
    }
    left = type == "leave";
    try {
      // a leave as the page goes: sendBeacon outlives it
      if (left && !refused && n.sendBeacon(endpoint, new Blob([body], { type: "text/plain" })))
        return;
      // text/plain: no preflight
      fetch(endpoint, {
        method: "POST", body: body, keepalive: true, credentials: "omit", mode: "no-cors",
        headers: { "Content-Type": "text/plain" }
      }).then(function () {
        refused = 0;
      }, img);
    } catch (e) {
      img();
    }
  }

  // 1 s late: after the leave of the page hidden or left (ingest stamps the time); a page
  // view waiting wins. Hidden again within it, none (leave): passed through (Back, Forward),
  // not read; else frozen in the bfcache, it went at the next restore.
  function soon(type) {
    if (next != "pageview") next = type;
    clearTimeout(late);
    late = setTimeout(function () {
      send(next, next == "pageview" ? d.referrer : "");
      next = 0;
    }, 1e3);
  }

  function beat() {
    send("heartbeat");
  }

  function start() {
    if (!timer && d.visibilityState != "hidden") timer = setInterval(beat, every * 1000);
  }

  function leave() {
    clearInterval(timer);
    clearTimeout(late);
    timer = next = 0;
    if (!left) {
      send("leave");
      // to the site's other pages here: a visible one says the reader stays
      if (chan) chan.postMessage(1);
    }
  }

  function tune() {
    try {
      chan = new BroadcastChannel(mine);
      chan.onmessage = function () {
        if (d.visibilityState == "visible") soon("heartbeat"); // hidden ones: not a word
      };
    } catch (e) {}
  }

  function here() {
    return location.href.split("#")[0];
  }

  function navigated() {
    var prev = page;
    page = here();
    if (page != prev) send("pageview", prev); // not for #anchors
  }

  function load() {
    var h = history, push = h.pushState;
    send("pageview", d.referrer);
    start();
    tune();
    h.pushState = function () {
      var r = push.apply(this, arguments);
      navigated();
      return r;
    };
    w.addEventListener("popstate", navigated);
    w.addEventListener("pagehide", function () {
      leave();
      if (chan) chan.close(); // none held in the bfcache (a message evicts)
      chan = 0;
    });
    w.addEventListener("pageshow", function (e) {
      if (e.persisted) tune(), soon("pageview"); // bfcache
    });
    d.addEventListener("visibilitychange", function () {
      if (d.visibilityState == "hidden") leave();
      else if (!timer) soon("heartbeat"), start();
    });
  }

  // prerendered: counted once opened
  if (d.prerendering) d.addEventListener("prerenderingchange", load, { once: true });
  else load();
})(window, document, navigator);
