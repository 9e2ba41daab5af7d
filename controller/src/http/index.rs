//! The index of reads and blocking queries, for every route in [`INDEXED`]:
//! a `GET` answer carries the store's revision as [`INDEX_HEADER`], and a `GET`
//! with `?index=N` waits until the revision passes `N` (or `wait`, default and
//! at most 5 minutes, ends) before it is answered as usual. See
//! [`crate::services::index`] for what raises the index and how the wait sleeps.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use novacron_common::pki::Role;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::{Object, Required, Type};

use crate::http::api::{ApiState, Caller, Problem, store_problem};
use crate::services::index::{DEFAULT_WAIT, IndexError, MAX_WAIT};

/// The response header that carries the store's revision read before the answer.
pub const INDEX_HEADER: &str = "x-novacron-index";

/// The reads that carry [`INDEX_HEADER`] and take `?index=&wait=` (OpenAPI path
/// templates; `{...}` matches one segment). Streams, logs and node metrics are
/// not among them: they do not come from the store.
pub const INDEXED: &[&str] = &[
    "/v1/jobs",
    "/v1/jobs/{name}",
    "/v1/jobs/{name}/versions",
    "/v1/allocations",
    "/v1/allocations/{id}",
    "/v1/nodes",
    "/v1/nodes/{name}",
    "/v1/events",
    "/v1/policies",
    "/v1/checkpoints",
    "/v1/migrations",
    "/v1/migrations/{id}",
    "/v1/pools",
    "/v1/api-tokens",
    "/v1/certs/revoked",
    "/v1/services",
    "/v1/services/{name}",
];

/// Documents a 400 problem on `get`, when it has none yet, as `description`.
pub(crate) fn document_bad_request(get: &mut utoipa::openapi::path::Operation, description: &str) {
    get.responses
        .responses
        .entry("400".to_owned())
        .or_insert_with(|| {
            utoipa::openapi::RefOr::T(
                utoipa::openapi::ResponseBuilder::new()
                    .description(description)
                    .content(
                        novacron_api::PROBLEM_JSON,
                        utoipa::openapi::ContentBuilder::new()
                            .schema(Some(utoipa::openapi::Ref::from_schema_name("ApiError")))
                            .build(),
                    )
                    .build(),
            )
        });
}

/// Whether `path` is one of [`INDEXED`].
pub fn indexed(path: &str) -> bool {
    INDEXED.iter().any(|template| {
        let mut want = template.split('/');
        let mut got = path.split('/');
        loop {
            match (want.next(), got.next()) {
                (None, None) => return true,
                (Some(w), Some(g)) if w == g || (w.starts_with('{') && !g.is_empty()) => {}
                _ => return false,
            }
        }
    })
}

/// Answers the reads of [`INDEXED`] with [`INDEX_HEADER`] and serves their
/// blocking form: authenticates the caller first (a wait is not given to
/// strangers), waits, then hands the request on without `index` and `wait`.
pub(crate) async fn blocking(
    State(st): State<Arc<ApiState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.method() != Method::GET || !indexed(req.uri().path()) {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let query = match BlockingQuery::split(parts.uri.query()) {
        Ok(q) => q,
        Err(p) => return p.into_response(),
    };
    if let Some(index) = query.index {
        let caller = match Caller::from_request_parts(&mut parts, &st).await {
            Ok(c) => c,
            Err(p) => return p.into_response(),
        };
        if let Err(p) = caller.require(Role::Viewer) {
            return p.into_response();
        }
        match st.index.wait_past(index, query.wait).await {
            Ok(_) => {}
            Err(e @ IndexError::Busy { .. }) => {
                return Problem::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
                    .into_response();
            }
            Err(IndexError::Store(e)) => return store_problem(e).into_response(),
        }
    }
    if let Some(uri) = query.rest_uri(&parts.uri) {
        parts.uri = uri;
    }
    let revision = st.index.current().ok();
    let mut response = next
        .run(axum::extract::Request::from_parts(parts, body))
        .await;
    if let Some(revision) = revision
        && response.status().is_success()
    {
        response
            .headers_mut()
            .insert(INDEX_HEADER, HeaderValue::from(revision));
    }
    response
}

/// Whether a request is a blocking query: `index` and `wait` taken out of its
/// query string, and what is left for the handler.
#[derive(Debug, PartialEq)]
struct BlockingQuery {
    index: Option<u64>,
    wait: Duration,
    rest: Option<String>,
}

impl BlockingQuery {
    fn split(query: Option<&str>) -> Result<BlockingQuery, Problem> {
        let mut out = BlockingQuery {
            index: None,
            wait: DEFAULT_WAIT,
            rest: None,
        };
        let Some(query) = query else {
            return Ok(out);
        };
        let mut rest = Vec::new();
        let mut wait = None;
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "index" => {
                    out.index = Some(value.parse::<i64>().ok().and_then(|i| u64::try_from(i).ok()).ok_or_else(|| {
                        Problem::bad_request(format!(
                            "index {value:?} is not a whole number from 0 to 2^63-1; use the X-Novacron-Index of an earlier answer"
                        ))
                    })?);
                }
                "wait" => wait = Some(parse_wait(value)?),
                _ => rest.push(pair),
            }
        }
        // A `wait` without `index` is ignored, as Consul does.
        if let Some(wait) = wait {
            out.wait = wait.min(MAX_WAIT);
        }
        if rest.len() != query.split('&').count() {
            out.rest = Some(rest.join("&"));
        }
        Ok(out)
    }

    /// The request's URI without `index` and `wait`, when it had either.
    fn rest_uri(&self, uri: &Uri) -> Option<Uri> {
        let rest = self.rest.as_ref()?;
        let path = uri.path();
        let text = if rest.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{rest}")
        };
        text.parse().ok()
    }
}

/// `30s`, `500ms`, `5m`, `1h`: a whole number and a unit.
fn parse_wait(value: &str) -> Result<Duration, Problem> {
    let digits = value.chars().take_while(char::is_ascii_digit).count();
    let (number, unit) = value.split_at(digits);
    let n: u64 = number.parse().map_err(|_| bad_wait(value))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(bad_wait(value)),
    };
    Ok(ms.map_or(MAX_WAIT, Duration::from_millis))
}

fn bad_wait(value: &str) -> Problem {
    Problem::bad_request(format!(
        "wait {value:?} is not a duration; write a whole number and ms, s, m or h (30s), at most 5m"
    ))
}

/// Documents [`INDEX_HEADER`] and the `index` and `wait` parameters on every
/// read of [`INDEXED`] in `doc`.
pub fn document(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::ObjectBuilder;
    use utoipa::openapi::header::HeaderBuilder;
    for template in INDEXED {
        let Some(item) = doc.paths.paths.get_mut(*template) else {
            continue;
        };
        let Some(get) = item.get.as_mut() else {
            continue;
        };
        let params = get.parameters.get_or_insert_with(Vec::new);
        params.push(utoipa::openapi::RefOr::T(param(
            "index",
            "Answer only once the store's revision has passed this index (the `X-Novacron-Index` of an earlier answer), or `wait` ended: a blocking query. An index the store never reached answers at once.",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                    utoipa::openapi::KnownFormat::Int64,
                )))
                .minimum(Some(0))
                .build(),
        )));
        params.push(utoipa::openapi::RefOr::T(param(
            "wait",
            "How long a blocking query waits at most: a whole number and ms, s, m or h; default and at most 5m. Only with `index`.",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^[0-9]+(ms|s|m|h)$"))
                .build(),
        )));
        document_bad_request(get, "a bad `index` or `wait`");
        for (status, response) in get.responses.responses.iter_mut() {
            if !status.starts_with('2') {
                continue;
            }
            if let utoipa::openapi::RefOr::T(response) = response {
                response.headers.insert(
                    INDEX_HEADER.to_owned(),
                    utoipa::openapi::RefOr::T(HeaderBuilder::new()
                        .schema(Some(
                            ObjectBuilder::new()
                                .schema_type(Type::Integer)
                                .minimum(Some(0))
                                .build(),
                        ))
                        .description(Some(
                            "The store's revision when the answer was read: pass it as `index` to wait for the next change",
                        ))
                        .build()),
                );
            }
        }
    }
}

/// A documented optional query parameter.
pub(crate) fn param(name: &str, description: &str, schema: Object) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Query)
        .required(Required::False)
        .description(Some(description))
        .schema(Some(schema))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_indexed_reads_are_matched_by_their_templates() {
        assert!(indexed("/v1/jobs"));
        assert!(indexed("/v1/jobs/web"));
        assert!(indexed("/v1/events"));
        assert!(!indexed("/v1/jobs/web/stop"));
        assert!(!indexed("/v1/events/stream"));
        assert!(!indexed("/v1/allocations/a/logs"));
        assert!(!indexed("/v1/nodes/n/metrics"));
        assert!(!indexed("/v1/jobs/"));
    }

    #[test]
    fn index_and_wait_are_taken_out_of_the_query() {
        let q = BlockingQuery::split(Some("job=web&index=7&wait=30s")).expect("parses");
        assert_eq!(q.index, Some(7));
        assert_eq!(q.wait, Duration::from_secs(30));
        assert_eq!(q.rest.as_deref(), Some("job=web"));
        let q = BlockingQuery::split(Some("index=7&wait=2h")).expect("parses");
        assert_eq!(q.wait, MAX_WAIT);
        assert_eq!(q.rest.as_deref(), Some(""));
        let q = BlockingQuery::split(Some("job=web")).expect("parses");
        assert_eq!(q.index, None);
        assert_eq!(q.rest, None);
        assert_eq!(
            BlockingQuery::split(Some("index=7")).expect("parses").wait,
            DEFAULT_WAIT
        );
        for bad in [
            "index=x",
            "index=7&wait=5",
            "index=7&wait=s",
            "wait=5",
            "index=-1",
            "index=9223372036854775808",
        ] {
            assert!(BlockingQuery::split(Some(bad)).is_err(), "{bad}");
        }
    }
}
