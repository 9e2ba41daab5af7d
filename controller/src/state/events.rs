//! Which events to read from the store: [`EventQuery`], a position to read after,
//! a page size and filters.

use novacron_api::Event;
use serde::Deserialize;
use utoipa::IntoParams;

/// Default page size of `GET /v1/events`.
pub const DEFAULT_LIMIT: usize = 100;

/// Which events to read: a position to read after, a page size and filters (all
/// given filters must match).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Read events after this position (0: from the oldest kept).
    #[serde(default)]
    #[param(minimum = 0, maximum = 9223372036854775807_u64)]
    pub after: u64,
    /// At most this many events (1 to [`EventQuery::MAX_LIMIT`]).
    #[serde(default = "default_limit")]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: usize,
    /// Only this node.
    pub node: Option<String>,
    /// Only this job.
    pub job: Option<String>,
    /// Only this allocation.
    pub alloc: Option<String>,
    /// Only this kind: exact (`job.applied`) or its resource (`job`).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The newest `limit` matching events instead of the oldest (still answered
    /// oldest first; the next read continues after the newest stored event).
    #[serde(default)]
    pub newest: bool,
}

impl Default for EventQuery {
    fn default() -> Self {
        EventQuery {
            after: 0,
            limit: DEFAULT_LIMIT,
            node: None,
            job: None,
            alloc: None,
            kind: None,
            newest: false,
        }
    }
}

fn default_limit() -> usize {
    DEFAULT_LIMIT
}

impl EventQuery {
    /// The largest page.
    pub const MAX_LIMIT: usize = 1000;
    /// The most records one read scans, matching or not (bounds the work of a
    /// narrow filter over a long log).
    pub const MAX_SCAN: usize = 10_000;

    /// Checks the limit; the message says what is accepted.
    pub fn validate(&self) -> Result<(), String> {
        if self.after > i64::MAX as u64 {
            return Err(format!(
                "after: {} is out of range; use an event position from 0 to {}",
                self.after,
                i64::MAX
            ));
        }
        if self.limit == 0 || self.limit > Self::MAX_LIMIT {
            return Err(format!(
                "limit: {} is out of range; use 1 to {}",
                self.limit,
                Self::MAX_LIMIT
            ));
        }
        Ok(())
    }

    /// Whether `event` passes every given filter.
    pub fn matches(&self, event: &Event) -> bool {
        let same = |want: &Option<String>, have: &Option<String>| match want {
            None => true,
            Some(w) => have.as_deref() == Some(w.as_str()),
        };
        let kind_ok = match &self.kind {
            None => true,
            Some(k) => {
                event.kind == *k
                    || (event.kind.starts_with(k.as_str())
                        && event.kind.as_bytes().get(k.len()) == Some(&b'.'))
            }
        };
        kind_ok
            && same(&self.node, &event.node)
            && same(&self.job, &event.job)
            && same(&self.alloc, &event.alloc)
    }
}
