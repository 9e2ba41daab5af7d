//! `novacron controller list`: the controllers of the fleet, which one leads,
//! its lease, and the health of etcd's members.

use std::io::Write;
use std::time::SystemTime;

use novacron_api::ControllersView;

use super::CliError;
use super::client::ApiClient;
use super::output::{self, OutputFormat};

/// `novacron controller ...`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum ControllerCommand {
    /// The controllers (the leader marked), the leader's epoch and lease, and
    /// each etcd member's health.
    List,
}

/// Runs a `controller` subcommand.
pub async fn run(
    cmd: &ControllerCommand,
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
    _now: SystemTime,
) -> Result<(), CliError> {
    match cmd {
        ControllerCommand::List => {
            let view: ControllersView = client.get(&["v1", "controllers"]).await?;
            output::write_one(out, format, &view, || detail(&view))?;
        }
    }
    Ok(())
}

fn detail(v: &ControllersView) -> String {
    let mut s = format!(
        "store: {}\nleader: {} (epoch {}, for {} s, lease {} s)\n\n",
        v.store,
        v.leader.as_deref().unwrap_or("none"),
        v.epoch,
        v.leader_for_secs,
        v.lease_secs
    );
    let rows: Vec<Vec<String>> = v
        .members
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                if m.leader { "leader" } else { "follower" }.to_string(),
                m.api_url.clone(),
                m.quic.clone(),
                format!("{}s", m.up_secs),
            ]
        })
        .collect();
    s.push_str(&columns(
        &["CONTROLLER", "ROLE", "API", "LINK", "UP"],
        &rows,
    ));
    if !v.etcd.is_empty() {
        s.push('\n');
        let rows: Vec<Vec<String>> = v
            .etcd
            .iter()
            .map(|e| {
                vec![
                    e.endpoint.clone(),
                    if e.healthy { "healthy" } else { "unhealthy" }.to_string(),
                    if e.raft_leader { "yes" } else { "" }.to_string(),
                    e.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        s.push_str(&columns(&["ETCD", "HEALTH", "RAFT LEADER", "ERROR"], &rows));
    }
    s
}

fn columns(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        l.trim_end().to_string() + "\n"
    };
    let mut s = line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        s.push_str(&line(row.clone()));
    }
    s
}
