//! `spec.checkpoint`: how a job's allocations are checkpointed, and how many
//! checkpoints are kept.
//!
//! ```yaml
//! spec:
//!   checkpoint:
//!     interval: 10m   # periodic checkpoints; leave out for on-demand only
//!     mode: auto      # live | fs | auto (default auto)
//!     keep: 3         # newest bundles kept per allocation, 1..=100 (default 3)
//! ```
//!
//! Semantics:
//! - `interval`: take a checkpoint of every running allocation this often. Without
//!   it the job is checkpointed only on demand (a drain, a spot notice, a migration
//!   or the CLI). At least [`MIN_INTERVAL`].
//! - `mode`: see [`CheckpointMode`]; `auto` takes a live checkpoint where the node
//!   can and a filesystem one elsewhere.
//! - `keep`: the retention the controller applies with
//!   [`retain`](novacron_wire::checkpoint::retain), from 1 to [`MAX_KEEP`].
//!
//! A job without the block is never checkpointed periodically, and its version hash
//! is unchanged (the block is left out of the hash when absent).

use std::time::Duration;

use crate::units::duration as format_duration;
use serde::{Deserialize, Serialize};

use super::Job;
use super::locate::FieldPath;
use novacron_wire::checkpoint::{CheckpointMode, MAX_KEEP, MIN_INTERVAL};

/// Bundles kept per allocation when `keep` is left out.
pub const DEFAULT_KEEP: u32 = 3;

/// What `keep` accepts, for range and type errors (kept equal to [`MAX_KEEP`] by a
/// test).
pub(super) const KEEP_ACCEPTED: &str = "a whole number from 1 to 100";

/// How a job is checkpointed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CheckpointPolicy {
    /// Periodic checkpoints this often; `None` for on demand only.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_duration"
    )]
    pub interval: Option<Duration>,
    /// Live, filesystem, or live where possible.
    #[serde(default)]
    pub mode: CheckpointMode,
    /// Newest bundles kept per allocation.
    #[serde(default = "default_keep")]
    pub keep: u32,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            interval: None,
            mode: CheckpointMode::Auto,
            keep: DEFAULT_KEEP,
        }
    }
}

impl Job {
    /// `spec.checkpoint`, when the job has one.
    pub fn checkpoint(&self) -> Option<&CheckpointPolicy> {
        self.spec.checkpoint.as_ref()
    }
}

/// The rules the types cannot express, as (field, message) pairs; `p` is the path
/// of the block (`spec.checkpoint`).
pub(super) fn problems(c: &CheckpointPolicy, p: &FieldPath) -> Vec<(FieldPath, String)> {
    let mut out = Vec::new();
    if let Some(interval) = c.interval
        && interval < MIN_INTERVAL
    {
        out.push((
            p.key("interval"),
            format!(
                "{} is too short; expected a duration of at least {}, like 10m, or no \
                 interval for on-demand checkpoints only",
                format_duration(interval),
                format_duration(MIN_INTERVAL)
            ),
        ));
    }
    if !(1..=MAX_KEEP).contains(&c.keep) {
        out.push((
            p.key("keep"),
            format!("{} is out of range; expected {KEEP_ACCEPTED}", c.keep),
        ));
    }
    out
}

fn default_keep() -> u32 {
    DEFAULT_KEEP
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
    use crate::manifest::parse_job;

    /// A service job with `lines` appended under `spec:` (indented by two spaces).
    fn with(lines: &str) -> String {
        format!(
            "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {{name: trainer}}\nspec:\n  task: {{image: busybox}}\n  resources: {{cpu: 1, memory: 64Mi}}\n{lines}"
        )
    }

    #[test]
    fn a_good_block_parses_and_changes_the_version_hash() {
        let text = with("  checkpoint:\n    interval: 10m\n    mode: live\n    keep: 5\n");
        let job = parse_job("trainer.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            job.checkpoint(),
            Some(&CheckpointPolicy {
                interval: Some(Duration::from_secs(600)),
                mode: CheckpointMode::Live,
                keep: 5,
            })
        );

        let plain = parse_job("plain.yaml", &with("")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(plain.checkpoint(), None);
        assert_ne!(job.version_hash(), plain.version_hash());

        // Round trip through the manifest form.
        let again =
            Job::from_manifest("again", job.to_manifest()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.checkpoint(), job.checkpoint());
        assert_eq!(again.version_hash(), job.version_hash());
    }

    #[test]
    fn an_empty_block_takes_the_defaults() {
        let job =
            parse_job("t.yaml", &with("  checkpoint: {}\n")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(job.checkpoint(), Some(&CheckpointPolicy::default()));
        let d = CheckpointPolicy::default();
        assert_eq!(
            (d.interval, d.mode, d.keep),
            (None, CheckpointMode::Auto, 3)
        );
        let job = parse_job("t.yaml", &with("  checkpoint: {mode: fs, interval: 10s}\n"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            job.checkpoint().map(|c| (c.interval, c.mode, c.keep)),
            Some((Some(MIN_INTERVAL), CheckpointMode::Fs, DEFAULT_KEEP))
        );
    }

    #[test]
    fn each_bad_field_names_the_line_path_value_and_what_is_accepted() {
        let cases = [
            (
                "  checkpoint:\n    interval: 5s\n",
                "trainer.yaml:8:",
                "spec.checkpoint.interval: 5s is too short; expected a duration of at least 10s",
            ),
            (
                "  checkpoint:\n    interval: 0s\n",
                "trainer.yaml:8:",
                "spec.checkpoint.interval: 0s is too short",
            ),
            (
                "  checkpoint:\n    interval: ten minutes\n",
                "trainer.yaml:8:",
                "spec.checkpoint.interval: \"ten minutes\" is not a duration",
            ),
            (
                "  checkpoint:\n    mode: hot\n",
                "trainer.yaml:8:",
                "spec.checkpoint.mode: unknown value `hot`, expected one of `live`, `fs`, `auto`",
            ),
            (
                "  checkpoint:\n    keep: 0\n",
                "trainer.yaml:8:",
                "spec.checkpoint.keep: 0 is out of range; expected a whole number from 1 to 100",
            ),
            (
                "  checkpoint:\n    keep: 101\n",
                "trainer.yaml:8:",
                "spec.checkpoint.keep: 101 is out of range; expected a whole number from 1 to 100",
            ),
            (
                "  checkpoint:\n    keep: three\n",
                "trainer.yaml:8:",
                "spec.checkpoint.keep: ",
            ),
            (
                "  checkpoint:\n    keep: -1\n",
                "trainer.yaml:8:",
                "expected a whole number from 1 to 100",
            ),
            (
                "  checkpoint:\n    intervall: 10m\n",
                "trainer.yaml:8:",
                "spec.checkpoint.intervall: unknown field `intervall`; expected one of \
                 `interval`, `mode`, `keep`",
            ),
        ];
        for (lines, at, fragment) in cases {
            let e = parse_job("trainer.yaml", &with(lines))
                .expect_err(lines)
                .to_string();
            assert!(e.starts_with(at), "{lines}: {e}");
            assert!(e.contains(fragment), "{lines}: {e}");
        }
        // Both bad fields are reported at once.
        let e = parse_job(
            "trainer.yaml",
            &with("  checkpoint: {interval: 1s, keep: 0}\n"),
        )
        .expect_err("two problems");
        assert_eq!(e.len(), 2, "{e}");
    }

    #[test]
    fn keep_accepted_matches_the_limit() {
        assert_eq!(
            KEEP_ACCEPTED,
            format!("a whole number from 1 to {MAX_KEEP}")
        );
    }
}
