// NovaCron dashboard: live updates only. Pages work without this script; it
// keeps them current. It talks only to this origin's /ui/ endpoints, with the
// session cookie, and never builds HTML from data (text goes in textContent).
"use strict";

(function () {
  var REFRESH_MS = 5000;

  // The session ended (a fetch was sent to the login page): show the login page.
  function checkSession(response) {
    if (response.redirected && response.url.indexOf("/ui/login") !== -1) {
      window.location.assign("/ui/login");
      throw new Error("logged out");
    }
    if (!response.ok) {
      throw new Error(response.status + " " + response.statusText);
    }
    return response;
  }

  function every(ms, fn) {
    var busy = false;
    window.setInterval(function () {
      if (busy || document.hidden) {
        return;
      }
      busy = true;
      fn().catch(function () {}).then(function () {
        busy = false;
      });
    }, ms);
  }

  function percent(v) {
    return typeof v === "number" && isFinite(v) ? v.toFixed(1) + "%" : "\u2013";
  }

  // Fleet overview: utilisation and health of the page's nodes.
  function fleet(table) {
    var url = table.getAttribute("data-live");
    every(REFRESH_MS, function () {
      return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(checkSession)
        .then(function (r) { return r.json(); })
        .then(function (nodes) {
          nodes.forEach(function (n) {
            var row = table.querySelector('tr[data-node="' + CSS.escape(n.name) + '"]');
            if (!row) {
              return;
            }
            [["cpu", n.cpu], ["mem", n.memory]].forEach(function (pair) {
              var meter = row.querySelector("meter." + pair[0]);
              var text = row.querySelector("span." + pair[0]);
              if (meter) {
                meter.value = typeof pair[1] === "number" ? Math.max(0, Math.min(100, pair[1])) : 0;
              }
              if (text) {
                text.textContent = percent(pair[1]);
              }
            });
            var badge = row.querySelector("td.st .badge");
            if (badge && badge.textContent !== n.status) {
              badge.textContent = n.status;
              badge.className = "badge " + (n.status === "ready" ? "ok" : n.status === "down" ? "bad" : "warn");
            }
          });
        });
    });
  }

  // Charts: fetch the chart's SVG again and put it in place of the old one.
  function chart(box) {
    var url = box.getAttribute("data-refresh");
    every(REFRESH_MS, function () {
      return fetch(url, { credentials: "same-origin", headers: { Accept: "image/svg+xml" } })
        .then(checkSession)
        .then(function (r) { return r.text(); })
        .then(function (text) {
          var doc = new DOMParser().parseFromString(text, "image/svg+xml");
          var svg = doc.documentElement;
          if (!svg || svg.nodeName !== "svg" || doc.getElementsByTagName("parsererror").length) {
            return;
          }
          var old = box.querySelector("svg.chart");
          var fresh = document.importNode(svg, true);
          if (old) {
            old.replaceWith(fresh);
          } else {
            box.appendChild(fresh);
          }
        });
    });
  }

  function cell(text, className) {
    var td = document.createElement("td");
    if (className) {
      td.className = className;
    }
    td.textContent = text;
    return td;
  }

  function linkCell(prefix, name) {
    var td = document.createElement("td");
    if (name) {
      var a = document.createElement("a");
      a.href = prefix + encodeURIComponent(name);
      a.textContent = name;
      td.appendChild(a);
    }
    return td;
  }

  function utc(ms) {
    return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }

  // Events: new ones at the top, over server-sent events.
  function events(table) {
    var body = table.tBodies[0];
    var state = document.getElementById("feed-state");
    var source = new EventSource(table.getAttribute("data-stream"));
    function show(text, tone) {
      if (state) {
        state.textContent = text;
        state.className = "badge " + tone;
      }
    }
    source.onopen = function () { show("live", "ok"); };
    source.onerror = function () { show("reconnecting", "warn"); };
    source.addEventListener("event", function (message) {
      var e;
      try {
        e = JSON.parse(message.data);
      } catch (err) {
        return;
      }
      if (body.querySelector('tr[data-seq="' + e.seq + '"]')) {
        return;
      }
      var row = document.createElement("tr");
      row.setAttribute("data-seq", String(e.seq));
      row.className = "new";
      row.appendChild(cell(String(e.seq), "num"));
      row.appendChild(cell(utc(e.time_unix_ms)));
      row.appendChild(cell(e.kind, "mono"));
      row.appendChild(cell(e.actor));
      row.appendChild(linkCell("/ui/nodes/", e.node));
      row.appendChild(linkCell("/ui/jobs/", e.job));
      row.appendChild(cell(e.message, "msg"));
      body.insertBefore(row, body.firstChild);
      while (body.rows.length > 500) {
        body.deleteRow(body.rows.length - 1);
      }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var nodes = document.querySelector("table[data-live]");
    if (nodes) {
      fleet(nodes);
    }
    document.querySelectorAll("figure[data-refresh]").forEach(chart);
    var feed = document.querySelector("table[data-stream]");
    if (feed) {
      events(feed);
    }
  });
})();
