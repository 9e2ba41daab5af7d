//! Pagination of the plain lists in [`PAGED`]: `?limit=N` answers at most `N`
//! items, ordered by their key (`name`, `id` or `digest`), and, when more follow,
//! an opaque continuation token as [`NEXT_HEADER`]; `?next=TOKEN` continues after
//! it. Without `limit` or `next` the answer is unchanged (every item, in the
//! handler's order), so list bodies stay JSON arrays. The events have their own
//! cursor (`after`, `limit`) and are not among these.

use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa::openapi::ObjectBuilder;
use utoipa::openapi::Type;

use crate::http::api::Problem;

/// The response header with the token of the next page.
pub const NEXT_HEADER: &str = "x-novacron-next";

/// The lists that take `limit` and `next`.
pub const PAGED: &[&str] = &[
    "/v1/jobs",
    "/v1/allocations",
    "/v1/nodes",
    "/v1/policies",
    "/v1/alerts/rules",
    "/v1/alerts/channels",
    "/v1/alerts/silences",
    "/v1/checkpoints",
    "/v1/migrations",
    "/v1/pools",
    "/v1/api-tokens",
    "/v1/certs/revoked",
    "/v1/recommendations",
    "/v1/services",
];

/// The largest page.
pub const MAX_LIMIT: usize = 10_000;

/// The largest list body read to cut it into pages.
const MAX_LIST_BYTES: usize = 256 * 1024 * 1024;

/// Serves `limit` and `next` on the lists of [`PAGED`].
pub(crate) async fn paginate(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.method() != Method::GET || !PAGED.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let Some(query) = parts.uri.query().map(str::to_owned) else {
        return next
            .run(axum::extract::Request::from_parts(parts, body))
            .await;
    };
    let page = match Page::split(&query) {
        Ok(Some(page)) => page,
        Ok(None) => {
            return next
                .run(axum::extract::Request::from_parts(parts, body))
                .await;
        }
        Err(p) => return p.into_response(),
    };
    let path = parts.uri.path();
    let keys = keys_of(path);
    let text = if page.rest.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", page.rest)
    };
    if let Ok(uri) = text.parse() {
        parts.uri = uri;
    }
    let response = next
        .run(axum::extract::Request::from_parts(parts, body))
        .await;
    if response.status() != StatusCode::OK {
        return response;
    }
    let (mut head, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_LIST_BYTES).await else {
        return Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the list is too large to page",
        )
        .into_response();
    };
    let Ok(serde_json::Value::Array(items)) = serde_json::from_slice(&bytes) else {
        return Response::from_parts(head, axum::body::Body::from(bytes));
    };
    let (items, next_token) = cut(items, keys, page.after.as_deref(), page.limit);
    let body = serde_json::to_vec(&items).unwrap_or_default();
    head.headers.remove(header::CONTENT_LENGTH);
    if let Some(token) = next_token
        && let Ok(value) = HeaderValue::from_str(&token)
    {
        head.headers.insert(NEXT_HEADER, value);
    }
    Response::from_parts(head, axum::body::Body::from(body))
}

/// A page request: the key to continue after, the size, and the rest of the
/// query for the handler.
#[derive(Debug, PartialEq)]
struct Page {
    after: Option<String>,
    limit: usize,
    rest: String,
}

impl Page {
    /// `None` when the query names neither `limit` nor `next`.
    fn split(query: &str) -> Result<Option<Page>, Problem> {
        let mut after = None;
        let mut limit = None;
        let mut rest = Vec::new();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "limit" => {
                    let n: usize = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            Problem::bad_request(format!(
                                "limit {value:?} is not a whole number from 1 to {MAX_LIMIT}"
                            ))
                        })?;
                    limit = Some(n);
                }
                "next" => after = Some(decode(value)?),
                _ => rest.push(pair),
            }
        }
        if after.is_none() && limit.is_none() {
            return Ok(None);
        }
        Ok(Some(Page {
            after,
            limit: limit.unwrap_or(MAX_LIMIT),
            rest: rest.join("&"),
        }))
    }
}

/// The fields, in order of preference, that key the items of the list at `path`
/// (unique in that list).
fn keys_of(path: &str) -> &'static [&'static str] {
    match path {
        // Token names need not be unique; their ids are.
        "/v1/api-tokens" => &["id"],
        "/v1/certs/revoked" => &["serial"],
        "/v1/recommendations" => &["job"],
        _ => &["name", "id", "digest"],
    }
}

/// The key an item is ordered and continued by.
fn key<'a>(item: &'a serde_json::Value, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| item.get(*k).and_then(|v| v.as_str()))
}

/// The page of `items` after the key `after`, at most `limit` long, and the
/// token of the next page when more follow.
fn cut(
    mut items: Vec<serde_json::Value>,
    keys: &[&str],
    after: Option<&str>,
    limit: usize,
) -> (Vec<serde_json::Value>, Option<String>) {
    items.sort_by(|a, b| key(a, keys).cmp(&key(b, keys)));
    let start = match after {
        Some(after) => items.partition_point(|i| key(i, keys).is_some_and(|k| k <= after)),
        None => 0,
    };
    let mut page: Vec<serde_json::Value> = items.into_iter().skip(start).collect();
    let more = page.len() > limit;
    page.truncate(limit);
    let token = more
        .then(|| page.last().and_then(|i| key(i, keys)).map(encode))
        .flatten();
    (page, token)
}

/// The opaque token of a key: its bytes in hex.
fn encode(key: &str) -> String {
    key.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode(token: &str) -> Result<String, Problem> {
    let bad = || {
        Problem::bad_request(format!(
            "next {token:?} is not a continuation token; use the X-Novacron-Next of the previous page"
        ))
    };
    if token.is_empty() || !token.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)?;
    String::from_utf8(bytes).map_err(|_| bad())
}

/// Documents `limit`, `next` and [`NEXT_HEADER`] on the lists of [`PAGED`].
pub fn document(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::header::HeaderBuilder;
    for template in PAGED {
        let Some(get) = doc
            .paths
            .paths
            .get_mut(*template)
            .and_then(|item| item.get.as_mut())
        else {
            continue;
        };
        let params = get.parameters.get_or_insert_with(Vec::new);
        params.push(utoipa::openapi::RefOr::T(crate::http::index::param(
            "limit",
            "At most this many items, ordered by their key (name, id, digest, serial or job); `X-Novacron-Next` names the next page when more follow. Without `limit` and `next`, every item.",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(1))
                .maximum(Some(MAX_LIMIT as f64))
                .build(),
        )));
        params.push(utoipa::openapi::RefOr::T(crate::http::index::param(
            "next",
            "Continue after the previous page: its `X-Novacron-Next`.",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^([0-9a-f]{2})+$"))
                .build(),
        )));
        crate::http::index::document_bad_request(get, "a bad `limit` or `next`");
        if let Some(utoipa::openapi::RefOr::T(ok)) = get.responses.responses.get_mut("200") {
            ok.headers.insert(
                NEXT_HEADER.to_owned(),
                utoipa::openapi::RefOr::T(
                    HeaderBuilder::new()
                        .schema(Some(ObjectBuilder::new().schema_type(Type::String).build()))
                        .description(Some(
                            "With `limit`: the token of the next page, when more items follow",
                        ))
                        .build(),
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(names: &[&str]) -> Vec<serde_json::Value> {
        names
            .iter()
            .map(|n| serde_json::json!({ "name": n }))
            .collect()
    }

    #[test]
    fn pages_follow_the_keys_and_end_without_a_token() {
        let all = named(&["c", "a", "d", "b", "e"]);
        let (page, next) = cut(all.clone(), &["name", "id", "digest"], None, 2);
        assert_eq!(page, named(&["a", "b"]));
        let next = next.expect("more");
        let after = decode(&next).expect("decodes");
        assert_eq!(after, "b");
        let (page, next) = cut(all.clone(), &["name", "id", "digest"], Some(&after), 2);
        assert_eq!(page, named(&["c", "d"]));
        let (page, last) = cut(
            all,
            &["name", "id", "digest"],
            Some(&decode(&next.expect("more")).expect("d")),
            2,
        );
        assert_eq!(page, named(&["e"]));
        assert_eq!(last, None);
    }

    #[test]
    fn limit_and_next_are_taken_out_of_the_query() {
        assert_eq!(Page::split("job=web").expect("parses"), None);
        let page = Page::split("job=web&limit=3")
            .expect("parses")
            .expect("a page");
        assert_eq!((page.limit, page.rest.as_str()), (3, "job=web"));
        let page = Page::split(&format!("next={}", encode("web")))
            .expect("parses")
            .expect("a page");
        assert_eq!(page.after.as_deref(), Some("web"));
        for bad in ["limit=0", "limit=x", "next=zz", "next=abc", "next="] {
            assert!(Page::split(bad).is_err(), "{bad}");
        }
    }
}
