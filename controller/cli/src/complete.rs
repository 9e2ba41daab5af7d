//! Dynamic shell completion of node, job and allocation names: clap_complete's
//! `CompleteEnv` (`source <(COMPLETE=bash novacron)`) asks these completers,
//! which read the names from the controller of the current context (the
//! context file as `NOVACRON_CONFIG` or the default path names it, and
//! `NOVACRON_TOKEN`). A controller that cannot be reached within
//! [`COMPLETE_TIMEOUT`] completes nothing rather than hang the shell. Metric
//! names are known to the CLI and complete without the controller.

use std::ffi::OsStr;
use std::time::{Duration, SystemTime};

use clap_complete::engine::{ArgValueCompleter, CompletionCandidate};
use novacron_api::metrics::{ALLOC_METRICS, NODE_METRICS};
use serde::Deserialize;

use super::client::ApiClient;
use super::config::{self, ContextFile, Env, ProcessEnv};

/// How long one completion may wait for the controller.
pub const COMPLETE_TIMEOUT: Duration = Duration::from_secs(3);

/// The most names offered.
const MAX_CANDIDATES: usize = 1000;

/// A completer of node names.
pub fn nodes() -> ArgValueCompleter {
    ArgValueCompleter::new(|current: &OsStr| names(&["v1", "nodes"], "name", current))
}

/// A completer of job names.
pub fn jobs() -> ArgValueCompleter {
    ArgValueCompleter::new(|current: &OsStr| names(&["v1", "jobs"], "name", current))
}

/// A completer of allocation ids (with their job and node as help).
pub fn allocs() -> ArgValueCompleter {
    ArgValueCompleter::new(|current: &OsStr| names(&["v1", "allocations"], "id", current))
}

/// A completer of metric names (`novacron metrics METRIC`), with their help.
pub fn metrics() -> ArgValueCompleter {
    ArgValueCompleter::new(|current: &OsStr| {
        current.to_str().map(metric_candidates).unwrap_or_default()
    })
}

/// The metric names that start with `prefix`, each with what it is as help.
pub fn metric_candidates(prefix: &str) -> Vec<CompletionCandidate> {
    NODE_METRICS
        .iter()
        .chain(ALLOC_METRICS)
        .filter(|m| m.name.starts_with(prefix))
        .map(|m| CompletionCandidate::new(m.name).help(Some(m.help.into())))
        .collect()
}

/// The `key` of each item the API lists at `path` that starts with `current`.
fn names(path: &[&str], key: &str, current: &OsStr) -> Vec<CompletionCandidate> {
    let Some(prefix) = current.to_str() else {
        return Vec::new();
    };
    let items = fetch(&ProcessEnv, path).unwrap_or_default();
    candidates(&items, key, prefix)
}

/// The candidates among `items` (the API's JSON objects) whose `key` starts with
/// `prefix`; an allocation's job and node are its help.
pub fn candidates(
    items: &[serde_json::Value],
    key: &str,
    prefix: &str,
) -> Vec<CompletionCandidate> {
    items
        .iter()
        .filter_map(|item| {
            let value = item[key].as_str()?;
            if !value.starts_with(prefix) {
                return None;
            }
            let mut c = CompletionCandidate::new(value);
            if let (Some(job), Some(node)) = (item["job"].as_str(), item["node"].as_str()) {
                c = c.help(Some(format!("{job} on {node}").into()));
            }
            Some(c)
        })
        .take(MAX_CANDIDATES)
        .collect()
}

/// The list at `path` from the current context's controller, if it answers.
fn fetch(env: &dyn Env, path: &[&str]) -> Option<Vec<serde_json::Value>> {
    let file_path = env
        .var(config::CONFIG_ENV)
        .map(std::path::PathBuf::from)
        .or_else(|| config::default_config_path(env))?;
    let file = ContextFile::load(&file_path).ok()?;
    let (name, ctx) = file.select(None, &file_path).ok()?;
    let token = env.var(config::TOKEN_ENV).filter(|t| !t.trim().is_empty());
    let client =
        ApiClient::with_token(&name, &ctx.resolved(&file_path), token, SystemTime::now()).ok()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        tokio::time::timeout(COMPLETE_TIMEOUT, client.get::<Vec<Item>>(path))
            .await
            .ok()?
            .ok()
    })
    .map(|items| items.into_iter().map(|i| i.0).collect())
}

#[derive(Deserialize)]
struct Item(serde_json::Value);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_start_with_the_prefix_and_allocations_name_job_and_node() {
        let items = vec![
            serde_json::json!({"id": "web-1a", "job": "web", "node": "n1"}),
            serde_json::json!({"id": "api-2b", "job": "api", "node": "n2"}),
            serde_json::json!({"name": 7}),
        ];
        let got = candidates(&items, "id", "web");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].get_value(), "web-1a");
        assert_eq!(
            got[0].get_help().map(ToString::to_string).as_deref(),
            Some("web on n1")
        );
        assert_eq!(candidates(&items, "id", "").len(), 2);
        assert!(candidates(&items, "name", "").is_empty());
    }

    #[test]
    fn metric_names_complete_without_a_controller() {
        let got = metric_candidates("alloc_mem");
        let names: Vec<String> = got
            .iter()
            .map(|c| c.get_value().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["alloc_memory_bytes", "alloc_memory_limit_bytes"]);
        assert_eq!(
            got[0].get_help().map(ToString::to_string).as_deref(),
            Some("memory in use")
        );
        assert_eq!(
            metric_candidates("").len(),
            NODE_METRICS.len() + ALLOC_METRICS.len()
        );
    }
}
