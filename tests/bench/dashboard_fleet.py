#!/usr/bin/env python3
"""Dashboard fleet page in headless Chromium: load timings of `/ui/` pages.

Drives chromedriver over the plain W3C WebDriver HTTP API (urllib only, no pip
install). Starts chromedriver in its own process group (Chromium joins it) and
kills that group on every exit path. Logs in at `/ui/login` with an API token,
then loads each page `--loads` times and reads, per load, the Navigation Timing
entry (responseStart, domContentLoadedEventEnd, loadEventEnd), first-contentful-
paint, largest-contentful-paint, and checks that `tr[data-node]` counts 100 rows
and that the last of them is laid out (non-zero box).

    python3 tests/bench/dashboard_fleet.py --api https://127.0.0.1:PORT \
        --token nca_... --loads 10 --page 1 --page 50 --json out.json

Prints a Markdown table; writes the raw numbers and the session cookie (for curl)
to --json.
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

W3C_ELEMENT = "element-6066-11e4-a52e-4f735466cecf"

MEASURE_JS = r"""
const done = arguments[arguments.length - 1];
const t0 = performance.now();
function lcpNow() {
  try {
    const po = new PerformanceObserver(() => {});
    po.observe({type: 'largest-contentful-paint', buffered: true});
    const e = po.takeRecords();
    po.disconnect();
    return e.length ? e[e.length - 1].startTime : null;
  } catch (err) { return null; }
}
// Two animation frames after the load event: the rows have been painted by then.
// Paint entries are reported once the frame is presented: wait for them (5 s at most).
requestAnimationFrame(() => requestAnimationFrame(() => {
  const raf2 = performance.now();
  (function finish() {
    const fcp = performance.getEntriesByName('first-contentful-paint')[0];
    const lcp = lcpNow();
    if ((!fcp || lcp === null) && performance.now() - t0 < 5000) { setTimeout(finish, 20); return; }
    const nav = performance.getEntriesByType('navigation')[0];
    const rows = document.querySelectorAll('tr[data-node]');
    const last = rows.length ? rows[rows.length - 1].getBoundingClientRect() : null;
    done({
      url: location.pathname + location.search,
      rows: rows.length,
      last_row_laid_out: !!(last && last.height > 0 && last.width > 0),
      first_row: rows.length ? rows[0].getAttribute('data-node') : null,
      pager: (document.querySelector('nav.pager span') || {}).textContent || null,
      nodes_stat: Array.from(document.querySelectorAll('ul.stats li')).map(li => li.textContent).join(', '),
      transfer_size: nav ? nav.transferSize : null,
      decoded_body_size: nav ? nav.decodedBodySize : null,
      request_start: nav ? nav.requestStart : null,
      response_start: nav ? nav.responseStart : null,
      response_end: nav ? nav.responseEnd : null,
      dom_interactive: nav ? nav.domInteractive : null,
      dcl_end: nav ? nav.domContentLoadedEventEnd : null,
      load_end: nav ? nav.loadEventEnd : null,
      fcp: fcp ? fcp.startTime : null,
      lcp: lcp,
      raf2: raf2,
    });
  })();
}));
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Driver:
    def __init__(self, chromedriver, chromium, width, height):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [chromedriver, f"--port={self.port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group; Chromium joins it
        )
        self.base = f"http://127.0.0.1:{self.port}"
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "acceptInsecureCerts": True,
                    "pageLoadStrategy": "normal",
                    "timeouts": {"pageLoad": 60000, "script": 30000},
                    "goog:chromeOptions": {
                        "binary": chromium,
                        "args": [
                            "--headless=new", "--no-sandbox", "--disable-gpu",
                            "--disable-dev-shm-usage", "--ignore-certificate-errors",
                            "--no-first-run", "--disable-extensions",
                            f"--window-size={width},{height}",
                        ],
                    },
                }
            }
        }
        last = None
        for _ in range(100):
            try:
                r = self.call("POST", "/session", caps, base_only=True)
                self.session = r["sessionId"]
                break
            except (urllib.error.URLError, ConnectionError, OSError) as e:
                last = e
                time.sleep(0.2)
        else:
            raise RuntimeError(f"no WebDriver session: {last}")

    def call(self, method, path, body=None, base_only=False):
        url = self.base + (path if base_only else f"/session/{self.session}{path}")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return json.load(resp)["value"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{method} {path}: {e.code} {e.read()[:500]!r}") from None

    def goto(self, url):
        self.call("POST", "/url", {"url": url})

    def current_url(self):
        return self.call("GET", "/url")

    def find(self, css):
        return self.call("POST", "/element", {"using": "css selector", "value": css})[W3C_ELEMENT]

    def script_async(self, js):
        return self.call("POST", "/execute/async", {"script": js, "args": []})

    def quit(self):
        try:
            self.call("DELETE", "")
        except Exception:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)


def login(d, api, token):
    d.goto(f"{api}/ui/")
    if not d.current_url().split("?")[0].endswith("/ui/login"):
        raise RuntimeError(f"expected the login page, got {d.current_url()}")
    field = d.find("#token")
    d.call("POST", f"/element/{field}/value", {"text": token})
    button = d.find("#login button[type=submit]")
    d.call("POST", f"/element/{button}/click", {})
    for _ in range(200):
        if d.current_url().split("?")[0].endswith("/ui/") and d.call(
                "POST", "/elements", {"using": "css selector", "value": "#who"}):
            break
        time.sleep(0.05)
    else:
        raise RuntimeError(f"login did not reach /ui/: {d.current_url()}")
    cookies = d.call("GET", "/cookie")
    return next((c["value"] for c in cookies if c["name"] == "__Host-novacron_session"), None)


FIELDS = [
    ("response_start", "responseStart (TTFB)"),
    ("dcl_end", "domContentLoadedEventEnd"),
    ("load_end", "loadEventEnd"),
    ("fcp", "first-contentful-paint"),
    ("lcp", "largest-contentful-paint"),
    ("raf2", "2 frames after load (rows painted)"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--api", required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--loads", type=int, default=10)
    ap.add_argument("--page", type=int, action="append")
    ap.add_argument("--json")
    ap.add_argument("--chromedriver", default="chromedriver")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=900)
    args = ap.parse_args()
    pages = args.page or [1]

    d = Driver(args.chromedriver, args.chromium, args.width, args.height)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = {"pages": {}, "cookie": None}
    try:
        out["cookie"] = login(d, args.api, args.token)
        for page in pages:
            url = f"{args.api}/ui/" + ("" if page == 1 else f"?page={page}")
            loads = []
            for i in range(args.loads):
                t0 = time.monotonic()
                d.goto(url)  # returns once the load event has fired
                m = d.script_async(MEASURE_JS)
                m["webdriver_wall_ms"] = (time.monotonic() - t0) * 1000
                loads.append(m)
                print(f"page {page} load {i + 1}: rows {m['rows']} laid out {m['last_row_laid_out']} "
                      f"ttfb {m['response_start']:.0f} dcl {m['dcl_end']:.0f} load {m['load_end']:.0f} "
                      f"fcp {m['fcp'] or -1:.0f} lcp {m['lcp'] or -1:.0f} ms; first {m['first_row']} "
                      f"({m['pager']}; {m['nodes_stat']}; {m['decoded_body_size']} B)",
                      file=sys.stderr)
            out["pages"][page] = loads
    finally:
        d.quit()

    print("| page | loads | rows == 100 every load | metric | median ms | max ms |")
    print("|---|---|---|---|---|---|")
    for page, loads in out["pages"].items():
        ok = all(m["rows"] == 100 and m["last_row_laid_out"] for m in loads)
        for key, name in FIELDS:
            vals = [m[key] for m in loads if m[key] is not None]
            if not vals:
                continue
            print(f"| {page} | {len(loads)} | {'yes' if ok else 'NO'} | {name} | "
                  f"{statistics.median(vals):.0f} | {max(vals):.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
