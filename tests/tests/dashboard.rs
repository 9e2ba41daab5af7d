//! The web dashboard in a real browser: headless Chromium (Debian's `chromium`
//! and `chromium-driver`) driven over WebDriver against a real controller and
//! agent. An operator logs in with an API token, sees the node and its chart
//! update, sees an event arrive live, scales a job from its page and sees the
//! new allocation; a viewer sees no action buttons, and forged action requests
//! (a viewer's, or without or with a wrong CSRF token, or from another origin)
//! are refused with 403. The browser's console must stay free of errors and of
//! Content-Security-Policy violations throughout. Screenshots of every page at
//! 1,400 and 390 px go to `target/test-artifacts/dashboard/`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use novacron_tests::{
    Controller, JobCleanup, bin_dir, ensure_test_image, free_port, job_running, one_node_fleet,
    service_job, wait_for,
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// The session cookie's name (`controller/src/http/ui/session.rs`).
const COOKIE: &str = "__Host-novacron_session";
/// The two widths the dashboard must be usable at.
const WIDE: (u32, u32) = (1400, 900);
const NARROW: (u32, u32) = (390, 844);

/// A program the test runs, found on `PATH` (or in `/usr/bin`), or a failure
/// that names the setup step that installs it.
fn require(program: &str) -> PathBuf {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(program))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "{program} is not installed: run `bash .ci/setup system` (it installs Debian's \
             chromium and chromium-driver, which the dashboard's browser tests drive)"
        )
    })
}

/// `POST /session/{id}/se/log` with `{"type": "browser"}`: chromedriver's
/// console log since the last read (it keeps what `goog:loggingPrefs` asks for).
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _url: &url::Url) -> (axum::http::Method, Option<String>) {
        (
            axum::http::Method::POST,
            Some(json!({"type": "browser"}).to_string()),
        )
    }
}

/// chromedriver with one headless Chromium session, and the console messages
/// read from it so far.
struct Browser {
    client: Client,
    driver: Child,
    shots: PathBuf,
    console: Vec<Value>,
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(group) = self.driver.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{group}")])
                .status();
        }
    }
}

impl Browser {
    async fn start() -> Browser {
        let chromium = require("chromium");
        let chromedriver = require("chromedriver");
        let port = free_port();
        // Its own process group, which Chromium joins: dropping the browser ends
        // them all, also when the test fails before closing the session.
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", chromedriver.display()));
        let url = format!("http://127.0.0.1:{port}");
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("acceptInsecureCerts".into(), json!(true));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--ignore-certificate-errors", "--no-first-run", "--disable-extensions",
                    format!("--window-size={},{}", WIDE.0, WIDE.1),
                ],
            }),
        );
        caps.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
        let mut last = None;
        let mut client = None;
        // chromedriver takes a moment to listen; bounded retries.
        for _ in 0..50 {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => {
                    client = Some(c);
                    break;
                }
                Err(e) => last = Some(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let client = client.unwrap_or_else(|| panic!("no WebDriver session: {last:?}"));
        let shots = bin_dir()
            .parent()
            .expect("target dir")
            .join("test-artifacts/dashboard");
        std::fs::create_dir_all(&shots).expect("artifact dir");
        let b = Browser {
            client,
            driver,
            shots,
            console: Vec::new(),
        };
        b.size(WIDE).await;
        b
    }

    async fn size(&self, (w, h): (u32, u32)) {
        self.client
            .set_window_size(w, h)
            .await
            .expect("window size");
    }

    /// Opens `url`. A load that Chromium aborted because the host's network
    /// changed (Docker adding a container's interface) is loaded again, a few
    /// times at most.
    async fn goto(&mut self, url: &str) {
        for _ in 0..5 {
            self.client.goto(url).await.expect("navigate");
            let page = self
                .client
                .execute(
                    "return document.body ? document.body.innerText : '';",
                    vec![],
                )
                .await
                .expect("script");
            if !page
                .as_str()
                .unwrap_or_default()
                .contains("ERR_NETWORK_CHANGED")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.drain_console().await;
    }

    async fn css(&self, selector: &str) -> fantoccini::elements::Element {
        // A load that Chromium aborted because the host's network changed
        // (another test's bridge or container) is loaded again, a few times.
        let mut reloads = 0;
        loop {
            let e = match self
                .client
                .wait()
                .at_most(Duration::from_secs(20))
                .for_element(Locator::Css(selector))
                .await
            {
                Ok(e) => return e,
                Err(e) => e,
            };
            let url = self.client.current_url().await.map(|u| u.to_string());
            let text = self
                .client
                .find(Locator::Css("body"))
                .await
                .ok()
                .map(|b| async move { b.text().await.unwrap_or_default() });
            let text = match text {
                Some(t) => t.await,
                None => String::new(),
            };
            if text.contains("ERR_NETWORK_CHANGED") && reloads < 3 {
                reloads += 1;
                eprintln!("{url:?}: ERR_NETWORK_CHANGED; loading it again");
                self.client.refresh().await.expect("reload");
                continue;
            }
            panic!("{selector} did not appear ({e}) on {url:?}, which reads:\n{text}")
        }
    }

    /// Clicks what `selector` finds and waits until the page it leads to has
    /// replaced the current one (a form post answers with a redirect; until the
    /// new page is there, the old one's elements would still be found).
    async fn click_through(&mut self, selector: &str) {
        let old = self.css("html").await;
        self.css(selector).await.click().await.expect("click");
        for _ in 0..200 {
            if old.tag_name().await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.css("main").await;
        self.drain_console().await;
    }

    async fn count(&self, selector: &str) -> usize {
        self.client
            .find_all(Locator::Css(selector))
            .await
            .map(|v| v.len())
            .unwrap_or(0)
    }

    async fn text(&self, selector: &str) -> String {
        self.css(selector).await.text().await.expect("text")
    }

    async fn shot(&self, name: &str, width: u32) {
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::write(self.shots.join(format!("{name}-{width}.png")), png)
            .expect("save screenshot");
    }

    /// Reads the console messages since the last read into `console`.
    async fn drain_console(&mut self) {
        let entries = self
            .client
            .issue_cmd(BrowserLog)
            .await
            .expect("browser log");
        if let Value::Array(entries) = entries {
            self.console.extend(entries);
        }
    }

    /// The console's errors (level SEVERE: script errors, failed loads, CSP
    /// violations) so far. Loads that Chromium itself aborted because the host's
    /// network interfaces changed (`net::ERR_NETWORK_CHANGED`: Docker adds an
    /// interface for each container the agent starts) are the host's doing, not
    /// the page's, and are left out.
    fn severe(&self) -> Vec<String> {
        self.console
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
            .filter(|m| !m.contains("net::ERR_NETWORK_CHANGED"))
            .collect()
    }

    /// Whether the page fits the window's width (wide tables scroll inside
    /// their own box instead of widening the page).
    async fn fits_width(&self) -> (i64, i64) {
        let v = self
            .client
            .execute(
                "return [document.documentElement.scrollWidth, window.innerWidth];",
                vec![],
            )
            .await
            .expect("script");
        (v[0].as_i64().unwrap_or(-1), v[1].as_i64().unwrap_or(-1))
    }

    async fn login(&mut self, api: &str, token: &str) {
        self.goto(&format!("{api}/ui/")).await;
        let url = self.client.current_url().await.expect("url");
        assert_eq!(
            url.path(),
            "/ui/login",
            "without a session the fleet page sends to the login page"
        );
        self.css("#token")
            .await
            .send_keys(token)
            .await
            .expect("type the token");
        self.click_through("#login button[type=submit]").await;
        self.css("#who").await;
        let url = self.client.current_url().await.expect("url");
        assert_eq!(url.path(), "/ui/");
        assert!(!url.as_str().contains(token), "the token is in no URL");
        self.drain_console().await;
    }
}

/// `novacron-controller admin token`, returning the printed token.
fn api_token(c: &Controller, name: &str, role: &str) -> String {
    let out = c.ctl(&["admin", "token", "--name", name, "--role", role]);
    assert!(
        out.status.success(),
        "admin token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A client that trusts the fleet CA, keeps no cookies and follows no redirect.
fn plain_client(c: &Controller) -> reqwest::Client {
    novacron_common::tls::install_crypto_provider();
    let ca = std::fs::read_to_string(c.data_dir.join("pki/ca.pem")).expect("ca");
    let config = novacron_common::tls::client_config(&ca, None, &[b"http/1.1"]).expect("tls");
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

const FORM: &str = "application/x-www-form-urlencoded";

/// `pairs` as a form body.
fn form(pairs: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// Logs in over HTTP (no browser) and returns the session cookie's value.
async fn session_cookie(client: &reqwest::Client, api: &str, token: &str) -> String {
    let resp = client
        .post(format!("{api}/ui/login"))
        .header("content-type", FORM)
        .body(form(&[("token", token)]))
        .send()
        .await
        .expect("login");
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let set = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("a session cookie")
        .to_owned();
    assert!(!set.contains(token), "the cookie is not the token: {set}");
    set.split(';')
        .next()
        .and_then(|kv| kv.split_once('='))
        .map(|(_, v)| v.to_owned())
        .expect("cookie value")
}

/// The CSRF token of the forms on `path` for the session `cookie`.
async fn csrf_of(client: &reqwest::Client, api: &str, cookie: &str, path: &str) -> String {
    let html = client
        .get(format!("{api}{path}"))
        .header("cookie", format!("{COOKIE}={cookie}"))
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("html");
    html.split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no CSRF field on {path}"))
}

/// A scale form POST with the given cookie, CSRF token and extra headers.
async fn post_scale(
    client: &reqwest::Client,
    api: &str,
    job: &str,
    cookie: Option<&str>,
    csrf: Option<&str>,
    headers: &[(&str, &str)],
) -> StatusCode {
    let mut req = client.post(format!("{api}/ui/jobs/{job}/scale"));
    if let Some(c) = cookie {
        req = req.header("cookie", format!("{COOKIE}={c}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut form = vec![("replicas", "5")];
    if let Some(t) = csrf {
        form.push(("csrf", t));
    }
    req.header("content-type", FORM)
        .body(self::form(&form))
        .send()
        .await
        .expect("post")
        .status()
}

/// The wanted allocations of `job` that run.
async fn running(c: &Controller, job: &str) -> usize {
    c.job(job).await.map_or(0, |d| {
        d.allocations
            .iter()
            .filter(|a| a.desired_run && a.state == novacron_common::wire::AllocState::Running)
            .count()
    })
}

async fn replicas(c: &Controller, job: &str) -> u32 {
    c.job(job).await.expect("job").summary.replicas
}

#[tokio::test]
async fn an_operator_and_a_viewer_use_the_dashboard_in_a_real_browser() {
    // Fail first, and name the setup step, when the browser is missing.
    require("chromium");
    require("chromedriver");
    ensure_test_image().expect("test image");
    let node = format!("dash{}", std::process::id());
    let job = format!("dashjob{}", std::process::id());
    // Declared before the fleet, so dropped after its agent is killed: no
    // container the agent would still start is left behind.
    let _cleanup = JobCleanup(job.clone());
    let (_dir, c, _agent) = one_node_fleet("novacron-dash-", &node, &["--interval", "500ms"])
        .await
        .expect("fleet");
    let api = c.api();
    let operator = api_token(&c, "dash-op", "operator");
    let viewer = api_token(&c, "dash-viewer", "viewer");
    let mut b = Browser::start().await;

    // Log in as the operator; the cookie is the session's, never the token.
    b.goto(&format!("{api}/ui/login")).await;
    b.shot("login", WIDE.0).await;
    b.size(NARROW).await;
    b.shot("login", NARROW.0).await;
    b.size(WIDE).await;
    b.login(&api, &operator).await;
    assert_eq!(b.text("#who").await, "operator:dash-op");
    let cookie = b
        .client
        .get_named_cookie(COOKIE)
        .await
        .expect("the session cookie");
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(cookie.secure(), Some(true));
    assert_eq!(format!("{:?}", cookie.same_site()), "Some(Strict)");
    assert!(!cookie.value().contains(&operator));

    // The fleet overview shows the node, ready, with its capacity.
    let row = format!("tr[data-node=\"{node}\"]");
    b.css(&row).await;
    assert!(b.text(&format!("{row} td.st")).await.contains("ready"));
    b.shot("fleet", WIDE.0).await;

    // The node page: its CPU chart gains points as samples arrive, without a
    // reload (the script fetches the chart again).
    b.click_through(&format!("{row} a")).await;
    let chart = "svg#chart-cpu_percent";
    b.css(chart).await;
    let last_of = |b: &Browser| {
        let client = b.client.clone();
        async move {
            client
                .find(Locator::Css(chart))
                .await
                .ok()?
                .attr("data-last")
                .await
                .ok()
                .flatten()
                .and_then(|v| v.parse::<u64>().ok())
        }
    };
    let first = last_of(&b).await.unwrap_or(0);
    wait_for(
        Duration::from_secs(60),
        "the CPU chart to update in place",
        || async { last_of(&b).await.is_some_and(|t| t > first && t > 0) },
    )
    .await
    .expect("a live chart");
    let d = b
        .css(&format!("{chart} path.line"))
        .await
        .attr("d")
        .await
        .expect("attr")
        .expect("a path");
    assert!(d.starts_with('M'), "{d}");
    assert_eq!(
        b.count("form[action$=\"/drain\"]").await,
        1,
        "operators may drain"
    );
    b.shot("node", WIDE.0).await;
    // Drain cordons the node; uncordon lifts it.
    b.click_through("form[action$=\"/drain\"] button").await;
    assert!(b.text(".flash").await.contains("is cordoned"));
    assert!(c.node(&node).await.expect("node").expect("known").cordoned);
    b.click_through("form[action$=\"/uncordon\"] button").await;
    assert!(b.text(".flash").await.contains("takes new work again"));
    assert!(!c.node(&node).await.expect("node").expect("known").cordoned);
    // The range picker.
    b.click_through("nav.ranges a[href$=\"range=1h\"]").await;
    b.css(&format!("figure[data-refresh$=\"range=1h\"] {chart}"))
        .await;
    b.drain_console().await;

    // The events page: a cordon made through the API appears without a reload.
    b.goto(&format!("{api}/ui/events")).await;
    wait_for(
        Duration::from_secs(20),
        "the event feed to connect",
        || async { b.text("#feed-state").await == "live" },
    )
    .await
    .expect("live feed");
    let admin = c.admin_client().expect("admin");
    let resp = admin
        .post(format!("{api}/v1/nodes/{node}/cordon"))
        .send()
        .await
        .expect("cordon");
    assert_eq!(resp.status(), StatusCode::OK);
    let cordoned = format!("node {node} cordoned");
    wait_for(
        Duration::from_secs(20),
        "the cordon event on the page",
        || async {
            let rows = b
                .client
                .find_all(Locator::Css("#events tr.new td.msg"))
                .await
                .unwrap_or_default();
            for r in rows {
                if r.text().await.is_ok_and(|t| t == cordoned) {
                    return true;
                }
            }
            false
        },
    )
    .await
    .expect("a live event");
    b.shot("events", WIDE.0).await;
    let resp = admin
        .post(format!("{api}/v1/nodes/{node}/uncordon"))
        .send()
        .await
        .expect("uncordon");
    assert_eq!(resp.status(), StatusCode::OK);

    // A job applied from a file with a hostile name: the name shows as text.
    let hostile = "<img src=x id=pwned>.yaml";
    let resp = admin
        .post(format!("{api}/v1/jobs"))
        .json(&json!({"file": hostile, "manifest": service_job(&job, 1, "sleep 3600", "", "")}))
        .send()
        .await
        .expect("apply");
    assert!(
        resp.status().is_success(),
        "{}",
        resp.text().await.unwrap_or_default()
    );
    wait_for(Duration::from_secs(60), "the job to run", || {
        job_running(&c, &job)
    })
    .await
    .expect("running");

    // Scale it from its page and see the new allocation.
    b.goto(&format!("{api}/ui/jobs/{job}")).await;
    assert_eq!(b.count("tr[data-alloc]").await, 1);
    assert_eq!(b.count("#pwned").await, 0, "no element from the file name");
    let input = b.css("#replicas-input").await;
    input.clear().await.expect("clear");
    input.send_keys("2").await.expect("type");
    b.click_through("#scale button[type=submit]").await;
    assert!(
        b.text(".flash")
            .await
            .contains(&format!("job {job} scaled to 2"))
    );
    // Once both run (their containers, and the host interfaces Docker adds
    // for them, are up), the page lists both.
    let mut both = false;
    for _ in 0..60 {
        if running(&c, &job).await == 2 {
            b.goto(&format!("{api}/ui/jobs/{job}")).await;
            if b.count("tr[data-alloc]").await == 2 {
                both = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(both, "the job page lists the second allocation");
    assert_eq!(replicas(&c, &job).await, 2);
    assert_eq!(b.text("#replicas").await, "2");
    assert!(b.count("form[action$=\"/restart\"] button").await >= 2);
    b.shot("job", WIDE.0).await;
    // Restart one allocation: it is no longer wanted and a replacement comes.
    let restarted = b
        .css("tr[data-alloc]")
        .await
        .attr("data-alloc")
        .await
        .expect("attr")
        .expect("an allocation id");
    b.click_through(&format!(
        "tr[data-alloc=\"{restarted}\"] form[action$=\"/restart\"] button"
    ))
    .await;
    assert!(
        b.text(".flash")
            .await
            .contains(&format!("allocation {restarted} is restarting"))
    );
    let detail = c.job(&job).await.expect("job");
    let old = detail
        .allocations
        .iter()
        .find(|a| a.id == restarted)
        .expect("still listed");
    assert!(
        !old.desired_run,
        "the restarted allocation is no longer wanted"
    );
    wait_for(
        Duration::from_secs(60),
        "the replacement to run",
        || async { running(&c, &job).await == 2 },
    )
    .await
    .expect("a replacement");
    b.drain_console().await;

    // An alert rule that holds at once fires on the alerts page; the
    // operator acknowledges it, then silences it, from the page.
    let resp = admin
        .post(format!("{api}/v1/alerts/rules"))
        .json(&json!({"file": "up.yaml", "manifest": "apiVersion: novacron.io/v1\nkind: AlertRule\nmetadata:\n  name: dash-up\nspec:\n  condition: node.up == 1\n  severity: info\n  annotations:\n    summary: 'node {{ subject }} is up'\n"}))
        .send()
        .await
        .expect("apply a rule");
    assert!(
        resp.status().is_success(),
        "{}",
        resp.text().await.unwrap_or_default()
    );
    wait_for(Duration::from_secs(30), "the rule to fire", || async {
        let alerts: serde_json::Value = admin
            .get(format!("{api}/v1/alerts"))
            .send()
            .await
            .expect("alerts")
            .json()
            .await
            .expect("JSON");
        alerts.as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x["rule"] == "dash-up" && x["state"] == "firing")
        })
    })
    .await
    .expect("firing");
    b.goto(&format!("{api}/ui/alerts")).await;
    let row = format!("tr[data-rule=\"dash-up\"][data-subject=\"{node}\"]");
    assert!(b.text(&row).await.contains(&format!("node {node} is up")));
    b.click_through(&format!("{row} form[action=\"/ui/alerts/ack\"] button"))
        .await;
    assert!(b.text(".flash").await.contains("acknowledged"));
    assert!(
        b.text(&row).await.contains("operator:dash-op"),
        "acked by the operator"
    );
    b.click_through(&format!("{row} form[action=\"/ui/alerts/silence\"] button"))
        .await;
    assert!(b.text(".flash").await.contains("silenced for 1h"));
    assert_eq!(b.count("#silences tbody tr").await, 1);
    b.shot("alerts-acted", WIDE.0).await;

    // The other pages render.
    for (path, name, heading) in [
        ("/ui/jobs", "jobs", "Jobs"),
        ("/ui/costs", "costs", "Costs"),
        ("/ui/migrations", "migrations", "Migrations"),
        ("/ui/alerts", "alerts", "Alerts"),
    ] {
        b.goto(&format!("{api}{path}")).await;
        assert_eq!(b.text("main h1").await, heading);
        b.shot(name, WIDE.0).await;
    }
    b.goto(&format!("{api}/ui/events")).await;
    assert!(
        b.text("#events").await.contains(hostile),
        "the file name shows as text"
    );
    assert_eq!(b.count("#pwned").await, 0);

    // At 390 px every page fits the screen's width (tables scroll in place).
    b.size(NARROW).await;
    for (path, name) in [
        ("/ui/".to_string(), "fleet"),
        (format!("/ui/nodes/{node}"), "node"),
        (format!("/ui/jobs/{job}"), "job"),
        ("/ui/events".into(), "events"),
        ("/ui/costs".into(), "costs"),
        ("/ui/migrations".into(), "migrations"),
        ("/ui/alerts".into(), "alerts"),
    ] {
        b.goto(&format!("{api}{path}")).await;
        b.css("main h1").await;
        let (content, window) = b.fits_width().await;
        assert!(
            content <= window,
            "{path} is {content} px wide in a {window} px window"
        );
        b.shot(name, NARROW.0).await;
    }
    b.size(WIDE).await;

    // Log out; then log in as the viewer: no action buttons anywhere.
    b.goto(&format!("{api}/ui/")).await;
    b.click_through("header form[action=\"/ui/logout\"] button")
        .await;
    b.css("#token").await;
    b.goto(&format!("{api}/ui/")).await;
    assert_eq!(
        b.client.current_url().await.expect("url").path(),
        "/ui/login",
        "logged out"
    );
    b.login(&api, &viewer).await;
    assert_eq!(b.text("#who").await, "viewer:dash-viewer");
    for path in [format!("/ui/jobs/{job}"), format!("/ui/nodes/{node}")] {
        b.goto(&format!("{api}{path}")).await;
        b.css("main h1").await;
        assert_eq!(
            b.count("main form[method=post]").await,
            0,
            "a viewer sees no action on {path}"
        );
    }
    b.shot("job-viewer", WIDE.0).await;

    // Forged actions, sent outside the browser, are refused with 403.
    let http = plain_client(&c);
    let viewer_cookie = session_cookie(&http, &api, &viewer).await;
    let viewer_csrf = csrf_of(&http, &api, &viewer_cookie, "/ui/").await;
    assert_eq!(
        post_scale(
            &http,
            &api,
            &job,
            Some(&viewer_cookie),
            Some(&viewer_csrf),
            &[]
        )
        .await,
        StatusCode::FORBIDDEN,
        "a viewer's scale, with its own valid CSRF token"
    );
    assert_eq!(
        post_scale(&http, &api, &job, None, None, &[]).await,
        StatusCode::FORBIDDEN,
        "no session"
    );
    let op_cookie = session_cookie(&http, &api, &operator).await;
    let op_csrf = csrf_of(&http, &api, &op_cookie, &format!("/ui/jobs/{job}")).await;
    assert_eq!(
        post_scale(&http, &api, &job, Some(&op_cookie), None, &[]).await,
        StatusCode::FORBIDDEN,
        "no CSRF token"
    );
    assert_eq!(
        post_scale(
            &http,
            &api,
            &job,
            Some(&op_cookie),
            Some(&"0".repeat(64)),
            &[]
        )
        .await,
        StatusCode::FORBIDDEN,
        "a wrong CSRF token"
    );
    assert_eq!(
        post_scale(&http, &api, &job, Some(&op_cookie), Some(&viewer_csrf), &[]).await,
        StatusCode::FORBIDDEN,
        "another session's CSRF token"
    );
    assert_eq!(
        post_scale(
            &http,
            &api,
            &job,
            Some(&op_cookie),
            Some(&op_csrf),
            &[
                ("origin", "https://evil.example"),
                ("sec-fetch-site", "cross-site")
            ]
        )
        .await,
        StatusCode::FORBIDDEN,
        "from another origin"
    );
    assert_eq!(
        replicas(&c, &job).await,
        2,
        "nothing forged was carried out"
    );
    // The same request, genuine, is carried out: the refusals were the checks'.
    assert_eq!(
        post_scale(&http, &api, &job, Some(&op_cookie), Some(&op_csrf), &[]).await,
        StatusCode::SEE_OTHER
    );
    assert_eq!(replicas(&c, &job).await, 5);
    let denied: Value = admin
        .get(format!("{api}/v1/events?type=access.denied"))
        .send()
        .await
        .expect("events")
        .json()
        .await
        .expect("json");
    let refusals = denied["events"].as_array().map_or(0, Vec::len);
    assert!(
        refusals >= 6,
        "every refusal is an access.denied event: {denied}"
    );

    // No console error and no CSP violation on any page.
    b.drain_console().await;
    let severe = b.severe();
    assert!(severe.is_empty(), "console errors: {severe:#?}");
    // The console check can fail: an inline style is refused and reported.
    b.client
        .execute(
            "document.querySelector('main').insertAdjacentHTML('beforeend', '<p style=\"color:red\">x</p>');",
            vec![],
        )
        .await
        .expect("script");
    let mut seen = false;
    for _ in 0..20 {
        b.drain_console().await;
        if b.console.iter().any(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("Content Security Policy"))
        }) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "a CSP violation is reported: {:#?}", b.console);

    b.client.clone().close().await.expect("close the browser");
}

/// Without the browser the test fails, naming the step that installs it.
#[test]
fn a_missing_browser_fails_naming_the_setup_step() {
    let failure = std::panic::catch_unwind(|| require("novacron-no-such-browser"))
        .expect_err("a missing program is a failure");
    let message = failure
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        message.contains("novacron-no-such-browser is not installed")
            && message.contains("bash .ci/setup system"),
        "{message}"
    );
}
