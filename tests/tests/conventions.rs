//! The API's conventions (issue 15, point 2) against the real controller:
//! - every error is an RFC 9457 problem document (`application/problem+json`)
//!   that keeps the `error` member older clients read,
//! - deletions take `DELETE`, and their older `POST` forms still work.

use novacron_tests::{Controller, sleeper_manifest};
use reqwest::StatusCode;

async fn controller(prefix: &str) -> (tempfile::TempDir, Controller) {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir");
    let c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    (dir, c)
}

/// Checks that `resp` is a problem document of `status` whose `type` is
/// `urn:novacron:error:<slug>`, and returns it.
async fn problem(resp: reqwest::Response, status: StatusCode, slug: &str) -> serde_json::Value {
    assert_eq!(resp.status(), status, "{:?}", resp.url().path());
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["type"], format!("urn:novacron:error:{slug}"), "{body}");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert!(
        body["title"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    let detail = body["detail"].as_str().expect("detail");
    assert!(!detail.is_empty(), "{body}");
    assert_eq!(body["error"], detail, "the old member stays: {body}");
    let old: novacron_api::ApiError = serde_json::from_value(body.clone()).expect("an ApiError");
    assert_eq!(old.error, detail);
    body
}

#[tokio::test]
async fn errors_are_problem_documents_that_keep_the_error_member() {
    let (_dir, c) = controller("novacron-conv-errors-").await;
    let client = c.admin_client().expect("admin");
    let api = c.api();

    let resp = client
        .get(format!("{api}/v1/jobs/ghost"))
        .send()
        .await
        .expect("send");
    let body = problem(resp, StatusCode::NOT_FOUND, "not-found").await;
    assert!(
        body["detail"].as_str().unwrap_or("").contains("ghost"),
        "{body}"
    );

    // axum's own plain-text rejection (an unknown query parameter) is converted.
    let resp = client
        .get(format!("{api}/v1/allocations?bogus=1"))
        .send()
        .await
        .expect("send");
    problem(resp, StatusCode::BAD_REQUEST, "bad-request").await;

    // So is the empty 404 of an unknown route.
    let resp = client
        .get(format!("{api}/v1/no-such-thing"))
        .send()
        .await
        .expect("send");
    problem(resp, StatusCode::NOT_FOUND, "not-found").await;

    // The document describes the error body with its RFC 9457 members.
    let doc: serde_json::Value = client
        .get(format!("{api}/v1/openapi.json"))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let schema = &doc["components"]["schemas"]["ApiError"]["properties"];
    for member in ["type", "title", "status", "detail", "error"] {
        assert!(schema.get(member).is_some(), "ApiError lacks {member}");
    }
    let not_found = &doc["paths"]["/v1/jobs/{name}"]["get"]["responses"]["404"]["content"];
    assert!(
        not_found.get("application/problem+json").is_some(),
        "{not_found}"
    );
}

#[tokio::test]
async fn deletions_take_delete_and_keep_their_post_forms() {
    let (_dir, c) = controller("novacron-conv-delete-").await;
    let client = c.admin_client().expect("admin");
    let api = c.api();

    // Jobs: DELETE /v1/jobs/{name} and POST /v1/jobs/{name}/stop.
    c.apply("a.yaml", &sleeper_manifest("alpha"))
        .await
        .expect("apply");
    c.apply("b.yaml", &sleeper_manifest("beta"))
        .await
        .expect("apply");
    let resp = client
        .delete(format!("{api}/v1/jobs/alpha"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = client
        .post(format!("{api}/v1/jobs/beta/stop"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let events: serde_json::Value = client
        .get(format!("{api}/v1/events?type=job.stopped"))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    for job in ["alpha", "beta"] {
        assert!(
            events["events"]
                .as_array()
                .expect("events")
                .iter()
                .any(|e| e["job"] == job),
            "{job} stopped: {events}"
        );
    }
    let resp = client
        .delete(format!("{api}/v1/jobs/ghost"))
        .send()
        .await
        .expect("send");
    problem(resp, StatusCode::NOT_FOUND, "not-found").await;

    // API tokens: DELETE /v1/api-tokens/{id} and POST /v1/api-tokens/{id}/revoke.
    for name in ["one", "two"] {
        let out = c.ctl(&["admin", "token", "--name", name, "--role", "viewer"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tokens = |list: &serde_json::Value, name: &str| -> (String, bool) {
        let t = list
            .as_array()
            .expect("array")
            .iter()
            .find(|t| t["name"] == name)
            .expect("listed");
        (
            t["id"].as_str().expect("id").to_owned(),
            t["revoked"].as_bool().expect("revoked"),
        )
    };
    let url = format!("{api}/v1/api-tokens");
    let list = || {
        let req = client.get(&url);
        async move {
            req.send()
                .await
                .expect("send")
                .json::<serde_json::Value>()
                .await
                .expect("json")
        }
    };
    let before = list().await;
    let (one, _) = tokens(&before, "one");
    let (two, _) = tokens(&before, "two");
    let resp = client
        .delete(format!("{api}/v1/api-tokens/{one}"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = client
        .post(format!("{api}/v1/api-tokens/{two}/revoke"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let after = list().await;
    assert!(
        tokens(&after, "one").1 && tokens(&after, "two").1,
        "{after}"
    );

    // Nodes and policies: both forms answer an unknown name with a 404.
    for (method, path) in [
        (reqwest::Method::DELETE, "/v1/nodes/ghost?reason=gone"),
        (reqwest::Method::POST, "/v1/nodes/ghost/revoke"),
        (reqwest::Method::DELETE, "/v1/policies/ghost"),
        (reqwest::Method::POST, "/v1/policies/ghost/delete"),
    ] {
        let mut req = client.request(method, format!("{api}{path}"));
        if path.ends_with("/revoke") {
            req = req.json(&serde_json::json!({ "reason": "gone" }));
        }
        problem(
            req.send().await.expect("send"),
            StatusCode::NOT_FOUND,
            "not-found",
        )
        .await;
    }

    // Both forms are documented, each with its own operation id.
    let doc: serde_json::Value = client
        .get(format!("{api}/v1/openapi.json"))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let mut ids = Vec::new();
    for (path, method) in [
        ("/v1/jobs/{name}", "delete"),
        ("/v1/jobs/{name}/stop", "post"),
        ("/v1/api-tokens/{id}", "delete"),
        ("/v1/api-tokens/{id}/revoke", "post"),
        ("/v1/nodes/{name}", "delete"),
        ("/v1/nodes/{name}/revoke", "post"),
        ("/v1/policies/{name}", "delete"),
        ("/v1/policies/{name}/delete", "post"),
    ] {
        let id = doc["paths"][path][method]["operationId"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path} is not documented"));
        ids.push(id.to_owned());
    }
    let count = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), count, "operation ids are unique: {ids:?}");
}

/// The `X-Novacron-Index` of an answer.
fn index_of(resp: &reqwest::Response) -> u64 {
    resp.headers()
        .get("x-novacron-index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{} has no index", resp.url().path()))
}

/// The index once the controller has stopped writing (the reconcile pass after
/// an apply writes too): blocking queries of 1 s until one ends unchanged.
async fn quiet_index(client: &reqwest::Client, api: &str) -> u64 {
    let resp = client
        .get(format!("{api}/v1/jobs"))
        .send()
        .await
        .expect("send");
    let mut index = index_of(&resp);
    for _ in 0..30 {
        let resp = client
            .get(format!("{api}/v1/jobs?index={index}&wait=1s"))
            .send()
            .await
            .expect("send");
        let now = index_of(&resp);
        if now == index {
            return index;
        }
        index = now;
    }
    panic!("the controller kept writing for 30 s");
}

#[tokio::test]
async fn reads_carry_an_index_and_a_blocking_query_waits_for_the_next_write() {
    let (_dir, c) = controller("novacron-conv-index-").await;
    let client = c.admin_client().expect("admin");
    let api = c.api();

    for path in ["/v1/jobs", "/v1/allocations", "/v1/nodes", "/v1/events"] {
        let resp = client
            .get(format!("{api}{path}"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        index_of(&resp);
    }
    c.apply("a.yaml", &sleeper_manifest("alpha"))
        .await
        .expect("apply");
    let before = quiet_index(&client, &api).await;

    // A write from another task wakes a blocking query promptly.
    let blocked = tokio::spawn({
        let client = client.clone();
        let url = format!("{api}/v1/jobs?index={before}&wait=60s");
        async move {
            let started = std::time::Instant::now();
            let resp = client.get(url).send().await.expect("send");
            (started.elapsed(), resp)
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !blocked.is_finished(),
        "the query waits while nothing changes"
    );
    c.apply("b.yaml", &sleeper_manifest("beta"))
        .await
        .expect("apply");
    let (took, resp) = tokio::time::timeout(std::time::Duration::from_secs(10), blocked)
        .await
        .expect("answered promptly after the write")
        .expect("join");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
    let after = index_of(&resp);
    assert!(after > before, "{after} > {before}");
    let jobs: serde_json::Value = resp.json().await.expect("json");
    assert!(jobs.to_string().contains("beta"), "{jobs}");

    // With nothing written, it answers after `wait` with the same index.
    let now = quiet_index(&client, &api).await;
    let started = std::time::Instant::now();
    let resp = client
        .get(format!("{api}/v1/events?index={now}&wait=1s&limit=5"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    assert_eq!(index_of(&resp), now);

    // A bad wait is a 400 problem.
    let resp = client
        .get(format!("{api}/v1/jobs?index={now}&wait=soon"))
        .send()
        .await
        .expect("send");
    problem(resp, StatusCode::BAD_REQUEST, "bad-request").await;
}

/// Reads the list at `path` page by page, `limit` a page, following
/// `X-Novacron-Next`: how many pages, and each item's `key` in order.
async fn all_pages(
    client: &reqwest::Client,
    api: &str,
    path: &str,
    limit: usize,
    key: &str,
) -> (usize, Vec<String>) {
    let mut keys = Vec::new();
    let mut url = format!("{api}{path}?limit={limit}");
    let mut pages = 0;
    loop {
        let resp = client.get(&url).send().await.expect("send");
        assert_eq!(resp.status(), StatusCode::OK);
        index_of(&resp);
        let next = resp
            .headers()
            .get("x-novacron-next")
            .map(|v| v.to_str().expect("ascii").to_owned());
        let page: serde_json::Value = resp.json().await.expect("json");
        let page = page.as_array().expect("an array");
        assert!(page.len() <= limit, "{page:?}");
        keys.extend(
            page.iter()
                .map(|i| i[key].as_str().expect("key").to_owned()),
        );
        pages += 1;
        match next {
            Some(token) => url = format!("{api}{path}?limit={limit}&next={token}"),
            None => return (pages, keys),
        }
    }
}

#[tokio::test]
async fn lists_page_with_limit_and_a_next_token_and_stay_whole_without() {
    let (_dir, c) = controller("novacron-conv-page-").await;
    let client = c.admin_client().expect("admin");
    let api = c.api();
    for name in ["echo", "alpha", "delta", "bravo", "charlie"] {
        c.apply(&format!("{name}.yaml"), &sleeper_manifest(name))
            .await
            .expect("apply");
    }
    let names = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .expect("an array")
            .iter()
            .map(|j| j["name"].as_str().expect("name").to_owned())
            .collect()
    };

    // Without `limit`: every job, no token.
    let resp = client
        .get(format!("{api}/v1/jobs"))
        .send()
        .await
        .expect("send");
    assert!(resp.headers().get("x-novacron-next").is_none());
    let all: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(names(&all).len(), 5);

    // With `limit=2`: three pages in name order, the last without a token.
    let (pages, seen) = all_pages(&client, &api, "/v1/jobs", 2, "name").await;
    assert_eq!(pages, 3);
    assert_eq!(seen, ["alpha", "bravo", "charlie", "delta", "echo"]);

    // API tokens page by id: three tokens of one name, one a page, none lost.
    for _ in 0..3 {
        let out = c.ctl(&["admin", "token", "--name", "dup", "--role", "viewer"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (_, ids) = all_pages(&client, &api, "/v1/api-tokens", 1, "id").await;
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!((ids.len(), distinct.len()), (3, 3), "{ids:?}");
    // Pools and revoked certificates carry the index too.
    for path in ["/v1/pools", "/v1/certs/revoked"] {
        let resp = client
            .get(format!("{api}{path}"))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        index_of(&resp);
    }

    // A bad limit or token is a 400 problem.
    for query in ["limit=0", "next=zz"] {
        let resp = client
            .get(format!("{api}/v1/jobs?{query}"))
            .send()
            .await
            .expect("send");
        problem(resp, StatusCode::BAD_REQUEST, "bad-request").await;
    }
}
