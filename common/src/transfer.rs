//! Moving checkpoint bundles over QUIC streams: the serving end of a
//! [`FetchRequest`](crate::wire::FetchRequest) and the receiving end that appends to a
//! partial file, so that a broken transfer resumes from the bytes already there.
//! Both the agent and the controller serve and fetch bundles with these.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite, AsyncWriteExt};

use crate::backoff::Backoff;
use crate::checkpoint::{MAX_BUNDLE_BYTES, check_digest};
use crate::wire::{self, FetchReply, FetchRequest, SUPPORTED};

/// Bytes per read and write while copying.
/// Attempts at moving one bundle (a fetch that breaks resumes from its offset)
/// before the move fails; the controller and the agent both count these.
pub const FETCH_ATTEMPTS: u32 = 4;
/// The waits between bundle fetch attempts, for a [`crate::retry::Retry`] (each
/// wait is half to all of the doubling base: 100–200 ms, then up to 0.8–1.6 s).
pub const FETCH_BACKOFF: Backoff = Backoff {
    initial: Duration::from_millis(200),
    max: Duration::from_millis(1600),
};

const CHUNK: usize = 256 * 1024;

/// Serves a fetch: answers with the bundle's size (or why not) and sends the bytes
/// from the asked offset. `path_of` maps a checked digest to its complete file.
pub async fn serve_fetch<W>(
    request: &FetchRequest,
    path_of: impl FnOnce(&str) -> Option<std::path::PathBuf>,
    send: &mut W,
) -> std::io::Result<u64>
where
    W: AsyncWrite + Unpin + Send,
{
    let refuse = |why: String| FetchReply { result: Err(why) };
    let opened = async {
        if !SUPPORTED.contains(request.protocol_version) {
            return Err(format!(
                "fetch protocol version {} is not supported; this end speaks {SUPPORTED}",
                request.protocol_version
            ));
        }
        check_digest(&request.digest)?;
        let path = path_of(&request.digest)
            .ok_or_else(|| format!("bundle {} is not stored here", request.digest))?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| format!("cannot open bundle {}: {e}", path.display()))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| format!("cannot read the size of {}: {e}", path.display()))?
            .len();
        if request.offset > size {
            return Err(format!(
                "offset {} is past the end of bundle {} ({size} bytes); ask for 0..={size}",
                request.offset, request.digest
            ));
        }
        Ok((file, size))
    }
    .await;
    let (mut file, size) = match opened {
        Ok(v) => v,
        Err(why) => {
            wire::write_frame(send, &refuse(why))
                .await
                .map_err(std::io::Error::other)?;
            return Ok(0);
        }
    };
    wire::write_frame(send, &FetchReply { result: Ok(size) })
        .await
        .map_err(std::io::Error::other)?;
    file.seek(std::io::SeekFrom::Start(request.offset)).await?;
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        send.write_all(&buf[..n]).await?;
        sent += n as u64;
    }
    Ok(sent)
}

/// Why a fetch did not complete.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The other end refused (unknown bundle, bad offset).
    #[error("{0}")]
    Refused(String),
    /// The stream, the disk or the size went wrong; the bytes received so far stay
    /// in the partial file, so a retry resumes.
    #[error("{0}")]
    Broken(String),
}

/// Receives the answer to a fetch into `partial` (opened for append, holding
/// `offset` bytes already), calling `progress(total_received)` as bytes come.
/// Returns the bundle's size once the partial holds all of it.
pub async fn receive_fetch<R>(
    recv: &mut R,
    partial: &Path,
    offset: u64,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64, FetchError>
where
    R: AsyncRead + Unpin + Send,
{
    let mut scratch = Vec::new();
    let reply = wire::read_frame::<FetchReply, _>(recv, &mut scratch)
        .await
        .map_err(|e| FetchError::Broken(format!("reading the fetch answer: {e}")))?
        .ok_or_else(|| FetchError::Broken("the stream ended before the fetch answer".into()))?;
    let size = reply.result.map_err(FetchError::Refused)?;
    if size > MAX_BUNDLE_BYTES {
        return Err(FetchError::Refused(format!(
            "bundle of {size} bytes is larger than the {MAX_BUNDLE_BYTES} accepted"
        )));
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(partial)
        .await
        .map_err(|e| FetchError::Broken(format!("cannot open {}: {e}", partial.display())))?;
    let mut have = offset;
    let mut buf = vec![0u8; CHUNK];
    while have < size {
        let want = ((size - have) as usize).min(CHUNK);
        let n = recv
            .read(&mut buf[..want])
            .await
            .map_err(|e| FetchError::Broken(format!("after {have} of {size} bytes: {e}")))?;
        if n == 0 {
            break;
        }
        if let Err(e) = file.write_all(&buf[..n]).await {
            // Keep the partial at its last whole length so the retry resumes there.
            let _ = file.set_len(have).await;
            return Err(FetchError::Broken(format!(
                "writing {} at byte {have}: {e}",
                partial.display()
            )));
        }
        have += n as u64;
        progress(have, size);
    }
    file.flush()
        .await
        .map_err(|e| FetchError::Broken(format!("flushing {}: {e}", partial.display())))?;
    if have < size {
        return Err(FetchError::Broken(format!(
            "the stream ended after {have} of {size} bytes"
        )));
    }
    // Nothing may follow the bundle.
    let mut extra = [0u8; 1];
    if recv.read(&mut extra).await.unwrap_or(0) > 0 {
        return Err(FetchError::Broken(format!(
            "the sender sent more than the {size} bytes it announced"
        )));
    }
    Ok(size)
}

/// The request for `digest` from `offset`, in the connection's protocol `version`.
pub fn fetch_request(version: u16, digest: &str, offset: u64) -> FetchRequest {
    FetchRequest {
        protocol_version: version,
        digest: digest.to_string(),
        offset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_transfer_resumes_from_the_partial() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &data).expect("write");
        let partial = dir.path().join("partial");
        std::fs::write(&partial, &data[..300_000]).expect("write partial");
        let digest = "a".repeat(64);
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let request = fetch_request(wire::PROTOCOL_VERSION, &digest, 300_000);
        let server = tokio::spawn(async move {
            let sent = serve_fetch(&request, |_| Some(src), &mut a).await;
            drop(a);
            sent
        });
        let mut seen = 0;
        let size = receive_fetch(&mut b, &partial, 300_000, |have, _| seen = have)
            .await
            .expect("received");
        assert_eq!(size, 1_000_000);
        assert_eq!(seen, 1_000_000);
        assert_eq!(server.await.expect("join").expect("served"), 700_000);
        assert_eq!(std::fs::read(&partial).expect("read"), data);
    }

    #[tokio::test]
    async fn unknown_bundles_and_bad_offsets_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let request = fetch_request(wire::PROTOCOL_VERSION, &"b".repeat(64), 0);
        serve_fetch(&request, |_| None, &mut a)
            .await
            .expect("answered");
        let dir = tempfile::tempdir().expect("tempdir");
        let e = receive_fetch(&mut b, &dir.path().join("p"), 0, |_, _| {})
            .await
            .expect_err("an error");
        assert!(e.to_string().contains("not stored here"), "{e}");

        let (mut a, mut b) = tokio::io::duplex(1024);
        let request = fetch_request(wire::PROTOCOL_VERSION, "../../etc/passwd", 0);
        serve_fetch(&request, |_| None, &mut a)
            .await
            .expect("answered");
        let e = receive_fetch(&mut b, &dir.path().join("p"), 0, |_, _| {})
            .await
            .expect_err("an error");
        assert!(e.to_string().contains("64 lowercase hex"), "{e}");
    }
}
