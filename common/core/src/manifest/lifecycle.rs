//! `spec.lifecycle`: when a job may run (a cron window, UTC) and for how long
//! (`maxRuntime`), with the pure decision the reconciler asks at `now`.
//!
//! Semantics:
//! - `schedule: {start, stop}`: the job runs inside the window, that is while the
//!   latest `start` occurrence (at or before now) is later than the latest `stop`
//!   occurrence; outside it the job wants no replicas. A start and a stop at the same
//!   instant count as a stop.
//! - `maxRuntime` on a **batch** job: a replica placed longer ago than this is
//!   stopped and counts as failed (replaced with back-off, like any failure).
//! - `maxRuntime` on a **service** or **system** job: the job wants no replicas once
//!   it has run this long since its version was applied or its window last opened,
//!   whichever is later; applying a new version or the next window starts it again.

use std::time::Duration;

use crate::units::duration as format_duration;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::cron::parse_cron;

/// Shortest `maxRuntime`.
pub const MIN_MAX_RUNTIME: Duration = Duration::from_secs(1);

/// When and for how long a job runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Lifecycle {
    /// Run only inside this window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<LifecycleSchedule>,
    /// Stop a batch replica, or a service, after it ran this long.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_duration"
    )]
    pub max_runtime: Option<Duration>,
}

/// A window between two cron expressions (5 fields, UTC).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleSchedule {
    /// The window opens at each occurrence (`0 8 * * 1-5`).
    pub start: String,
    /// The window closes at each occurrence (`0 20 * * 1-5`).
    pub stop: String,
}

impl LifecycleSchedule {
    /// When the window last opened, if it is open at `now_ms` (Unix ms). `None`
    /// outside the window. An expression that does not parse (never, for a
    /// validated job) leaves the window open from the epoch.
    pub fn opened_at_ms(&self, now_ms: u64) -> Option<u64> {
        let (Ok(start), Ok(stop)) = (parse_cron(&self.start), parse_cron(&self.stop)) else {
            return Some(0);
        };
        let now = DateTime::<Utc>::from_timestamp_millis(i64::try_from(now_ms).ok()?)?;
        let started = start.find_previous_occurrence(&now, true).ok()?;
        if let Ok(stopped) = stop.find_previous_occurrence(&now, true)
            && stopped >= started
        {
            return None;
        }
        u64::try_from(started.timestamp_millis()).ok()
    }
}

/// Why a job wants no replicas at `now_ms`, if it does not: outside its window, or
/// (service and system jobs, `batch` false) past its `maxRuntime` counted from
/// `since_ms` (when its version was applied) or the window's opening, whichever is
/// later.
pub fn off_reason(l: &Lifecycle, batch: bool, since_ms: u64, now_ms: u64) -> Option<String> {
    let mut since = since_ms;
    if let Some(s) = &l.schedule {
        match s.opened_at_ms(now_ms) {
            None => return Some(format!("outside its lifecycle window (starts {})", s.start)),
            Some(opened) => since = since.max(opened),
        }
    }
    match l.max_runtime {
        Some(max) if !batch && over(since, now_ms, max) => Some(exceeded(max)),
        _ => None,
    }
}

/// Whether something that began at `since_ms` has run longer than `max` at `now_ms`.
pub fn over(since_ms: u64, now_ms: u64, max: Duration) -> bool {
    u128::from(now_ms.saturating_sub(since_ms)) > max.as_millis()
}

/// The reason given when `maxRuntime` ran out.
pub fn exceeded(max: Duration) -> String {
    format!("exceeded maxRuntime {}", format_duration(max))
}

/// `Option<Duration>` written the humantime way.
mod optional_duration {
    use std::time::Duration;

    use super::super::duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        duration::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix ms of a UTC date and time.
    fn at(s: &str) -> u64 {
        let t = DateTime::parse_from_rfc3339(s).expect("rfc3339");
        u64::try_from(t.timestamp_millis()).expect("after 1970")
    }

    fn office() -> Lifecycle {
        Lifecycle {
            schedule: Some(LifecycleSchedule {
                start: "0 8 * * 1-5".into(),
                stop: "0 20 * * 1-5".into(),
            }),
            max_runtime: None,
        }
    }

    #[test]
    fn window_is_open_between_start_and_stop() {
        let l = office();
        // 2026-11-23 is a Monday.
        let monday_8 = at("2026-11-23T08:00:00Z");
        assert_eq!(
            l.schedule.as_ref().and_then(|s| s.opened_at_ms(monday_8)),
            Some(monday_8)
        );
        assert_eq!(off_reason(&l, false, 0, at("2026-11-23T12:00:00Z")), None);
        assert_eq!(off_reason(&l, true, 0, at("2026-11-23T19:59:59Z")), None);
        for off in [
            "2026-11-23T07:59:59Z",
            "2026-11-23T20:00:00Z",
            "2026-11-23T23:00:00Z",
            "2026-11-28T12:00:00Z", // Saturday
        ] {
            assert_eq!(
                off_reason(&l, false, 0, at(off)).as_deref(),
                Some("outside its lifecycle window (starts 0 8 * * 1-5)"),
                "{off}"
            );
        }
    }

    #[test]
    fn a_window_across_midnight() {
        let l = Lifecycle {
            schedule: Some(LifecycleSchedule {
                start: "0 22 * * *".into(),
                stop: "0 6 * * *".into(),
            }),
            max_runtime: None,
        };
        assert_eq!(off_reason(&l, false, 0, at("2026-11-24T02:00:00Z")), None);
        assert!(off_reason(&l, false, 0, at("2026-11-24T12:00:00Z")).is_some());
    }

    #[test]
    fn services_stop_after_max_runtime_from_apply_or_window_opening() {
        let mut l = office();
        l.max_runtime = Some(Duration::from_secs(2 * 3600));
        // Applied long before the window: counted from 08:00.
        let applied = at("2026-11-20T00:00:00Z");
        assert_eq!(
            off_reason(&l, false, applied, at("2026-11-23T09:59:00Z")),
            None
        );
        assert_eq!(
            off_reason(&l, false, applied, at("2026-11-23T10:00:01Z")).as_deref(),
            Some("exceeded maxRuntime 2h")
        );
        // Applied inside the window: counted from the apply.
        let applied = at("2026-11-23T11:00:00Z");
        assert_eq!(
            off_reason(&l, false, applied, at("2026-11-23T12:30:00Z")),
            None
        );
        assert!(off_reason(&l, false, applied, at("2026-11-23T13:00:01Z")).is_some());
        // Batch jobs are judged per replica, not here.
        assert_eq!(
            off_reason(&l, true, applied, at("2026-11-23T19:00:00Z")),
            None
        );
        // No schedule: from the apply only.
        l.schedule = None;
        assert!(off_reason(&l, false, 0, at("2026-11-23T12:00:00Z")).is_some());
        assert_eq!(
            off_reason(
                &l,
                false,
                at("2026-11-23T11:00:00Z"),
                at("2026-11-23T12:00:00Z")
            ),
            None
        );
    }

    #[test]
    fn over_is_strict() {
        let max = Duration::from_secs(1);
        assert!(!over(1_000, 2_000, max));
        assert!(over(1_000, 2_001, max));
        assert!(!over(5_000, 1_000, max), "clock skew is not over");
        assert_eq!(
            exceeded(Duration::from_secs(8 * 3600)),
            "exceeded maxRuntime 8h"
        );
    }
}
