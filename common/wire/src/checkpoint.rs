//! Checkpoints: the vocabulary shared by the agent (which makes and restores them),
//! the controller (which stores, retains and moves them) and the CLI.
//!
//! A **bundle** is one checkpoint of one allocation: a zstd-compressed tar holding
//! `bundle.json` ([`BundleMeta`]), the CRIU image (`criu/`, live mode only), the
//! container's writable-layer diff (`rootfs.tar`, plus deleted paths in the meta) and
//! one tar per volume (`volumes/<n>.tar`). It is named by the SHA-256 of its
//! compressed bytes ([`BundleInfo::digest`]), so every copy can be checked and a
//! transfer can resume at any byte offset.
//!
//! Everything here is pure: retention ([`retain`]) and mode choice ([`resolve_mode`])
//! take their inputs and return decisions.

use std::time::Duration;

use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

/// The largest bundle accepted anywhere (compressed bytes).
pub const MAX_BUNDLE_BYTES: u64 = 16 * 1024 * 1024 * 1024;
/// The most checkpoints a job may keep.
pub const MAX_KEEP: u32 = 100;
/// The shortest periodic checkpoint interval.
pub const MIN_INTERVAL: Duration = Duration::from_secs(10);

/// How to checkpoint.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Encode, Decode, Serialize, Deserialize,
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum CheckpointMode {
    /// Process memory through CRIU, plus the filesystem state: the workload goes on
    /// from the instruction where it stopped.
    Live,
    /// The container's writable layer and its volumes only: the workload starts
    /// again on that data. Works on every node.
    Fs,
    /// Live where the node can, otherwise fs.
    #[default]
    Auto,
}

impl CheckpointMode {
    /// `live`, `fs` or `auto`.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointMode::Live => "live",
            CheckpointMode::Fs => "fs",
            CheckpointMode::Auto => "auto",
        }
    }
}

impl std::fmt::Display for CheckpointMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CheckpointMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "live" => Ok(CheckpointMode::Live),
            "fs" => Ok(CheckpointMode::Fs),
            "auto" => Ok(CheckpointMode::Auto),
            other => Err(format!(
                "checkpoint mode {other:?} is not known; accepted: live, fs, auto"
            )),
        }
    }
}

/// The mode a checkpoint is taken in: `requested` as asked, on a node that can (or
/// cannot) do live checkpoints. `Auto` falls back to `Fs`; `Live` on a node that
/// cannot is an error naming the node's reason.
pub fn resolve_mode(
    requested: CheckpointMode,
    live_capable: bool,
    why_not: &str,
) -> Result<CheckpointMode, String> {
    match (requested, live_capable) {
        (CheckpointMode::Live, true) | (CheckpointMode::Auto, true) => Ok(CheckpointMode::Live),
        (CheckpointMode::Fs, _) | (CheckpointMode::Auto, false) => Ok(CheckpointMode::Fs),
        (CheckpointMode::Live, false) => Err(format!(
            "live checkpoint is not available on this node ({why_not}); use mode fs or auto"
        )),
    }
}

/// A bundle as stored and listed.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BundleInfo {
    /// Lowercase hex SHA-256 of the compressed bundle.
    pub digest: String,
    /// Compressed size, bytes.
    pub size: u64,
    /// `live` or `fs` (never `auto`).
    pub mode: CheckpointMode,
    /// The allocation checkpointed.
    pub alloc: String,
    /// Its job.
    pub job: String,
    /// The node it was taken on.
    pub node: String,
    /// When it was taken (Unix ms).
    pub created_unix_ms: u64,
    /// How long the workload was frozen or stopped for the dump, ms.
    pub dump_ms: u64,
}

/// What `bundle.json` inside a bundle says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleMeta {
    /// Format version ([`BUNDLE_FORMAT`]).
    pub format: u32,
    /// `live` or `fs`.
    pub mode: CheckpointMode,
    /// The allocation.
    pub alloc: String,
    /// Its job.
    pub job: String,
    /// The image the container ran (restore needs the same image).
    pub image: String,
    /// The CRIU checkpoint name (live mode).
    pub criu_name: Option<String>,
    /// Paths the container deleted from its image (rootfs diff kind "D").
    pub deleted: Vec<String>,
    /// Volume mount targets, in the order of the `volumes/<n>.tar` members.
    pub volumes: Vec<String>,
    /// When it was taken (Unix ms).
    pub created_unix_ms: u64,
    /// The container's configuration as the runtime reported it (Docker's
    /// `Config` and `HostConfig`), for inspection and tooling; restores use the
    /// allocation's spec.
    #[serde(default)]
    pub container: Option<serde_json::Value>,
    /// A virtual machine's snapshot: `vm/state` holds QEMU's migration stream
    /// (memory and devices), restored by starting QEMU with `-incoming`; no
    /// CRIU image and no rootfs diff.
    #[serde(default)]
    pub vm: bool,
    /// Made by runc from an agent-owned container: `criu/` is runc's CRIU image
    /// (restored with `runc restore` into an agent-owned container only) and
    /// `rootfs.tar` is the container's overlay upper directory as it is,
    /// whiteouts included.
    #[serde(default)]
    pub runc: bool,
    /// A bridged guest's address on its node's VM bridge when the snapshot
    /// was taken: the restored guest keeps it (it is in the guest's memory),
    /// so a node that would give it another cannot restore it. `None`: not a
    /// VM, a guest on the user network, or a bundle from before this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_address: Option<std::net::Ipv4Addr>,
}

/// The bundle format this build writes and reads.
pub const BUNDLE_FORMAT: u32 = 1;

/// Whether `digest` is a lowercase hex SHA-256, the only bundle name accepted (it
/// becomes a file name, so nothing else may pass).
pub fn check_digest(digest: &str) -> Result<(), String> {
    if digest.len() == 64
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(format!(
            "bundle digest {digest:?} is not valid; expected 64 lowercase hex digits (SHA-256)"
        ))
    }
}

/// Retention: given one job's bundles, which to delete so that the newest `keep` per
/// allocation remain, and those of allocations no longer live beyond the newest
/// `keep` of the job. Pure; returns digests, oldest first.
pub fn retain(bundles: &[BundleInfo], keep: u32) -> Vec<String> {
    let keep = keep.max(1) as usize;
    let mut sorted: Vec<&BundleInfo> = bundles.iter().collect();
    sorted.sort_by(|a, b| {
        b.created_unix_ms
            .cmp(&a.created_unix_ms)
            .then_with(|| b.digest.cmp(&a.digest))
    });
    let mut per_alloc: std::collections::BTreeMap<&str, usize> = Default::default();
    let mut doomed = Vec::new();
    for b in sorted {
        let n = per_alloc.entry(b.alloc.as_str()).or_default();
        *n += 1;
        if *n > keep {
            doomed.push(b.digest.clone());
        }
    }
    doomed.reverse();
    doomed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(alloc: &str, digest: char, at: u64) -> BundleInfo {
        BundleInfo {
            digest: digest.to_string().repeat(64),
            size: 1,
            mode: CheckpointMode::Fs,
            alloc: alloc.into(),
            job: "j".into(),
            node: "n".into(),
            created_unix_ms: at,
            dump_ms: 0,
        }
    }

    #[test]
    fn retention_keeps_the_newest_per_allocation() {
        let all = [
            b("a", '1', 1),
            b("a", '2', 2),
            b("a", '3', 3),
            b("b", '4', 1),
        ];
        assert_eq!(retain(&all, 2), vec!["1".repeat(64)]);
        assert_eq!(retain(&all, 1), vec!["1".repeat(64), "2".repeat(64)]);
        assert!(retain(&all, 5).is_empty());
        // keep 0 is treated as 1: the latest checkpoint is never thrown away.
        assert_eq!(retain(&all, 0).len(), 2);
    }

    #[test]
    fn modes_resolve_by_capability() {
        assert_eq!(
            resolve_mode(CheckpointMode::Auto, true, ""),
            Ok(CheckpointMode::Live)
        );
        assert_eq!(
            resolve_mode(CheckpointMode::Auto, false, "x"),
            Ok(CheckpointMode::Fs)
        );
        let e = resolve_mode(CheckpointMode::Live, false, "criu missing").expect_err("an error");
        assert!(
            e.contains("criu missing") && e.contains("fs or auto"),
            "{e}"
        );
        assert_eq!("fs".parse(), Ok(CheckpointMode::Fs));
        assert!(
            "hot"
                .parse::<CheckpointMode>()
                .expect_err("unknown mode")
                .contains("live, fs, auto")
        );
    }

    #[test]
    fn digests_are_checked() {
        assert!(check_digest(&"a".repeat(64)).is_ok());
        assert!(check_digest("../etc/passwd").is_err());
        assert!(check_digest(&"A".repeat(64)).is_err());
    }
}
