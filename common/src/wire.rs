//! The async half of the wire protocol: reading and writing whole frames on a tokio
//! stream. Everything else of the protocol (the messages and their bincode encoding)
//! lives in the `novacron-wire` crate and is re-exported here at its old path.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use novacron_wire::*;

/// Reads one frame from `reader`. `Ok(None)` means the stream ended cleanly between
/// frames. `scratch` is reused across calls; it never grows past [`MAX_FRAME_LEN`].
pub async fn read_frame<T, R>(
    reader: &mut R,
    scratch: &mut Vec<u8>,
) -> Result<Option<T>, FrameError>
where
    T: Decode<()>,
    R: AsyncRead + Unpin,
{
    if !read_body(reader, scratch).await? {
        return Ok(None);
    }
    decode_body(scratch).map(Some)
}

/// [`read_frame`] for a message encoded in protocol `version` (see [`Versioned`]).
pub async fn read_frame_as<T, R>(
    version: u16,
    reader: &mut R,
    scratch: &mut Vec<u8>,
) -> Result<Option<T>, FrameError>
where
    T: Versioned,
    R: AsyncRead + Unpin,
{
    if !read_body(reader, scratch).await? {
        return Ok(None);
    }
    decode_body_as(version, scratch).map(Some)
}

/// Reads one frame's body into `scratch`; `false` when the stream ended cleanly
/// between frames.
pub async fn read_body<R>(reader: &mut R, scratch: &mut Vec<u8>) -> Result<bool, FrameError>
where
    R: AsyncRead + Unpin,
{
    let mut prefix = [0u8; 4];
    let mut filled = 0;
    while filled < 4 {
        let n = reader.read(&mut prefix[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(false)
            } else {
                Err(FrameError::Truncated)
            };
        }
        filled += n;
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    scratch.clear();
    scratch.resize(len, 0);
    reader.read_exact(scratch).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })?;
    Ok(true)
}

/// [`write_frame`] in protocol `version` (see [`Versioned`]).
pub async fn write_frame_as<T, W>(version: u16, writer: &mut W, msg: &T) -> Result<(), FrameError>
where
    T: Versioned,
    W: AsyncWrite + Unpin,
{
    let frame = encode_frame_as(version, msg)?;
    writer.write_all(&frame).await?;
    Ok(())
}

/// Writes `msg` as one frame.
pub async fn write_frame<T, W>(writer: &mut W, msg: &T) -> Result<(), FrameError>
where
    T: Encode,
    W: AsyncWrite + Unpin,
{
    let frame = encode_frame(msg)?;
    writer.write_all(&frame).await?;
    Ok(())
}

/// Offers only this build's newest version on a fresh control stream and reads
/// the controller's answer: what a client that speaks one version (a test's fake
/// agent) does before its `Hello`. The agent itself offers a range.
pub async fn offer_newest<W, R>(send: &mut W, recv: &mut R) -> Result<Negotiated, FrameError>
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let offer = Opening::Offer {
        max: PROTOCOL_VERSION,
        min: PROTOCOL_VERSION,
    };
    write_frame(send, &offer).await?;
    let mut scratch = Vec::new();
    read_frame::<Negotiated, _>(recv, &mut scratch)
        .await?
        .ok_or(FrameError::Truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn async_reader_handles_clean_end_and_truncation() {
        let frame = encode_frame(&AgentMessage::RenewCertificate {
            request_id: 7,
            csr_pem: "x".into(),
        })
        .expect("encodes");
        let mut scratch = Vec::new();
        let mut whole: &[u8] = &frame;
        let msg: Option<AgentMessage> = read_frame(&mut whole, &mut scratch).await.expect("reads");
        assert!(matches!(
            msg,
            Some(AgentMessage::RenewCertificate { request_id: 7, .. })
        ));
        let end: Option<AgentMessage> = read_frame(&mut whole, &mut scratch)
            .await
            .expect("clean end");
        assert!(end.is_none());
        let mut cut: &[u8] = &frame[..frame.len() - 1];
        let err = read_frame::<AgentMessage, _>(&mut cut, &mut scratch)
            .await
            .expect_err("truncated");
        assert!(matches!(err, FrameError::Truncated));
    }
}
