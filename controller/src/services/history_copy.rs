//! A standby's copy of the leader's metrics history (a controller group on
//! etcd): while a controller waits as a follower, it copies the leader's
//! history files through the leader's API every [`EVERY`]
//! ([`novacron_tsdb::mirror`] decides what to fetch and checks what arrives),
//! into its own `<data_dir>/history`. When it takes over, it opens that
//! directory as its history: queries answer for the time before the failover,
//! less what the old leader had not yet written (its open chunks, up to
//! `history.chunk_points` points per source) and at most one interval.
//!
//! The follower calls the API with a viewer certificate it issues itself from
//! the group's CA (every member holds the CA key: `pki/` is copied).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use novacron_api::HistoryFile;
use novacron_common::pki::{self, Identity, Role, Validity};
use novacron_common::tls;
use novacron_tsdb::mirror::{FetchError, FileKey, Mirror, Synced};
use novacron_tsdb::{FileInfo, Tier};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::services::history::history_dir;
use crate::state::election::{self, Keys};

/// How often the copy follows the leader.
pub const EVERY: Duration = Duration::from_secs(2);
/// How long one request to the leader may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// The largest answer read: a piece of [`crate::http::history::FILE_PIECE`],
/// or one record of at most [`novacron_tsdb::segment::MAX_RECORD`].
const MAX_ANSWER: usize = novacron_tsdb::segment::MAX_RECORD as usize + 64;
/// The largest file listing read.
const MAX_LISTING: usize = 16 << 20;
/// How long the certificate a follower issues itself lasts. A new one is
/// issued for each leader it follows, and after half of this.
const CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// An HTTPS client of the group's API with a viewer certificate issued now.
fn client(data_dir: &Path, member: &str) -> anyhow::Result<reqwest::Client> {
    let pki = crate::pki_files::load(data_dir)?;
    let cert = pki::issue_client_cert(
        &pki.ca,
        &Identity {
            name: format!("controller-{member}"),
            role: Role::Viewer,
        },
        Validity::starting(SystemTime::now(), CERT_TTL),
    )?;
    let config = tls::client_config(
        &pki.ca.cert_pem,
        Some((&cert.cert_pem, &cert.key_pem)),
        &[b"h2", b"http/1.1"],
    )?;
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .timeout(REQUEST_TIMEOUT)
        .build()?)
}

/// Reads an answer's body, refusing more than `max` bytes.
async fn bounded(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(format!("an answer of more than {max} bytes"));
    }
    let mut out = Vec::new();
    while let Some(piece) = resp.chunk().await.map_err(|e| e.to_string())? {
        if out.len() + piece.len() > max {
            return Err(format!("an answer of more than {max} bytes"));
        }
        out.extend_from_slice(&piece);
    }
    Ok(out)
}

/// The leader's files.
async fn listing(http: &reqwest::Client, api: &str) -> Result<Vec<FileInfo>, String> {
    let resp = http
        .get(format!("{api}/v1/metrics/files"))
        .send()
        .await
        .map_err(|e| format!("listing the leader's history: {e}"))?;
    let status = resp.status();
    let body = bounded(resp, MAX_LISTING).await?;
    if !status.is_success() {
        return Err(format!(
            "listing the leader's history: {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        ));
    }
    let files: Vec<HistoryFile> =
        serde_json::from_slice(&body).map_err(|e| format!("the leader's listing: {e}"))?;
    Ok(files
        .into_iter()
        .filter_map(|f| {
            Some(FileInfo {
                tier: Tier::from_name(&f.tier)?,
                start: f.start_ms,
                len: f.bytes,
                first: f.first,
            })
        })
        .collect())
}

/// Records of one leader file after `offset`.
async fn fetch(
    http: &reqwest::Client,
    api: &str,
    (tier, start): FileKey,
    offset: u64,
    last: Option<(u64, u32)>,
) -> Result<Vec<u8>, FetchError> {
    let mut url = format!(
        "{api}/v1/metrics/files/{}/{start}?offset={offset}",
        tier.name()
    );
    if let Some((at, crc)) = last {
        url.push_str(&format!("&last_at={at}&last_crc={crc}"));
    }
    let resp = http
        .get(url)
        .send()
        .await
        .map_err(|e| FetchError::Failed(format!("fetching {} {start}: {e}", tier.name())))?;
    match resp.status() {
        s if s.is_success() => bounded(resp, MAX_ANSWER).await.map_err(FetchError::Failed),
        reqwest::StatusCode::NOT_FOUND => Err(FetchError::Missing),
        reqwest::StatusCode::CONFLICT => Err(FetchError::Diverged),
        s => Err(FetchError::Failed(format!(
            "fetching {} {start}: {s}",
            tier.name()
        ))),
    }
}

/// Copies the leader's history into `data_dir`'s until `cancel`. Returns only
/// once nothing is being written: the caller may then open the history.
pub async fn follow(
    data_dir: PathBuf,
    etcd: etcd_client::Client,
    keys: Keys,
    member: String,
    cancel: CancellationToken,
) {
    let dir = history_dir(&data_dir);
    let opened = tokio::task::spawn_blocking(move || Mirror::open(&dir)).await;
    let mut mirror = match opened {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            warn!(error = %e, "cannot open the history directory to copy the leader's history");
            return;
        }
        Err(e) => {
            warn!(error = %e, "history copy: the opening thread failed");
            return;
        }
    };
    // The leader followed, its client and when that client's certificate
    // was issued.
    let mut following: Option<(String, String, Arc<reqwest::Client>, std::time::Instant)> = None;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
        let leader = match election::group(&etcd, &keys).await {
            Ok(g) => g.leader.map(|(l, _)| l),
            Err(e) => {
                debug!(error = %e, "history copy: cannot read the group");
                continue;
            }
        };
        let Some(leader) = leader.filter(|l| l.name != member) else {
            continue;
        };
        if following.as_ref().is_none_or(|(name, url, _, issued)| {
            *name != leader.name || *url != leader.api_url || issued.elapsed() > CERT_TTL / 2
        }) {
            match client(&data_dir, &member) {
                Ok(c) => {
                    info!(leader = %leader.name, api = %leader.api_url, "copying the leader's metrics history");
                    following = Some((
                        leader.name.clone(),
                        leader.api_url.clone(),
                        Arc::new(c),
                        std::time::Instant::now(),
                    ));
                }
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "history copy: cannot make a client certificate");
                    continue;
                }
            }
        }
        let Some((_, api, http, _)) = following.clone() else {
            continue;
        };
        let files = tokio::select! {
            _ = cancel.cancelled() => return,
            files = listing(&http, &api) => files,
        };
        let files = match files {
            Ok(f) => f,
            Err(e) => {
                if !failing {
                    warn!(error = %e, "history copy: the leader's history cannot be listed");
                }
                failing = true;
                continue;
            }
        };
        let rt = tokio::runtime::Handle::current();
        let stop = cancel.clone();
        let round = tokio::task::spawn_blocking(move || {
            let mut get = |key: FileKey, offset: u64, last: Option<(u64, u32)>| {
                rt.block_on(async {
                    tokio::select! {
                        r = fetch(&http, &api, key, offset, last) => r,
                        _ = stop.cancelled() => Err(FetchError::Failed("stopped".into())),
                    }
                })
            };
            let done = mirror.sync(&files, &mut get, &|| stop.is_cancelled());
            (mirror, done)
        })
        .await;
        let done: Result<Synced, FetchError>;
        (mirror, done) = match round {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "history copy: the copying thread failed; stopping");
                return;
            }
        };
        match done {
            Ok(s) => {
                if failing || s.whole > 0 || s.removed > 0 {
                    debug!(
                        bytes = s.bytes,
                        whole = s.whole,
                        removed = s.removed,
                        "history copy: a round"
                    );
                }
                failing = false;
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "history copy: a round failed; trying again");
                }
                failing = true;
            }
        }
    }
}
