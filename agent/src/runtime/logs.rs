//! Log frames from the runtime, cut into wire [`LogChunk`]s.
//!
//! Frames that are ready together and come from the same stream are merged (one
//! line per frame would otherwise be one wire frame each); no chunk carries more than
//! [`MAX_CHUNK`] bytes. The stream always ends with a chunk whose `end` is set:
//! `Ok(())` when the runtime closed the output, `Err(message)` when it failed.

use std::collections::VecDeque;

use futures_util::stream::{self, BoxStream, Stream, StreamExt};
use novacron_common::wire::LogChunk;

use super::{LogFrame, RuntimeError};

/// The most bytes in one chunk (64 KiB).
pub const MAX_CHUNK: usize = 64 * 1024;
/// The most frames merged in one go.
const READY_FRAMES: usize = 64;

/// Cuts `frames` into chunks.
pub fn chunks(
    frames: BoxStream<'static, Result<LogFrame, RuntimeError>>,
) -> impl Stream<Item = LogChunk> + Send + 'static {
    struct State {
        frames: Option<BoxStream<'static, Vec<Result<LogFrame, RuntimeError>>>>,
        queue: VecDeque<LogChunk>,
    }
    let state = State {
        frames: Some(frames.ready_chunks(READY_FRAMES).boxed()),
        queue: VecDeque::new(),
    };
    stream::unfold(state, |mut st| async move {
        loop {
            if let Some(chunk) = st.queue.pop_front() {
                return Some((chunk, st));
            }
            let frames = st.frames.as_mut()?;
            match frames.next().await {
                Some(batch) => {
                    for item in batch {
                        match item {
                            Ok(frame) => push(&mut st.queue, frame),
                            Err(e) => {
                                st.queue.push_back(end(Err(e.to_string())));
                                st.frames = None;
                                break;
                            }
                        }
                    }
                }
                None => {
                    st.queue.push_back(end(Ok(())));
                    st.frames = None;
                }
            }
        }
    })
}

/// A stream of one final chunk carrying `error`.
pub fn failed(error: String) -> impl Stream<Item = LogChunk> + Send + 'static {
    stream::iter([end(Err(error))])
}

fn end(result: Result<(), String>) -> LogChunk {
    LogChunk {
        stderr: false,
        data: Vec::new(),
        end: Some(result),
    }
}

/// Appends `frame` to the queue, merging it into the last chunk when that one is
/// from the same stream and has room.
fn push(queue: &mut VecDeque<LogChunk>, frame: LogFrame) {
    let mut data = &frame.data[..];
    if let Some(last) = queue.back_mut()
        && last.stderr == frame.stderr
        && last.end.is_none()
    {
        let room = MAX_CHUNK.saturating_sub(last.data.len());
        let take = room.min(data.len());
        last.data.extend_from_slice(&data[..take]);
        data = &data[take..];
    }
    for piece in data.chunks(MAX_CHUNK) {
        queue.push_back(LogChunk {
            stderr: frame.stderr,
            data: piece.to_vec(),
            end: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(stderr: bool, data: &[u8]) -> Result<LogFrame, RuntimeError> {
        Ok(LogFrame {
            stderr,
            data: data.to_vec(),
        })
    }

    #[tokio::test]
    async fn ready_frames_merge_per_stream_and_the_end_is_marked() {
        let frames = stream::iter(vec![
            frame(false, b"a\n"),
            frame(false, b"b\n"),
            frame(true, b"oops\n"),
            frame(false, b"c\n"),
        ])
        .boxed();
        let out: Vec<LogChunk> = chunks(frames).collect().await;
        let shape: Vec<(bool, &[u8], bool)> = out
            .iter()
            .map(|c| (c.stderr, &c.data[..], c.end.is_some()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (false, &b"a\nb\n"[..], false),
                (true, &b"oops\n"[..], false),
                (false, &b"c\n"[..], false),
                (false, &b""[..], true),
            ]
        );
        assert_eq!(out.last().and_then(|c| c.end.clone()), Some(Ok(())));
    }

    #[tokio::test]
    async fn big_frames_are_cut_at_64_kib() {
        let big = vec![7u8; MAX_CHUNK * 2 + 10];
        let frames = stream::iter(vec![frame(false, &big[..100]), frame(false, &big)]).boxed();
        let out: Vec<LogChunk> = chunks(frames).collect().await;
        let sizes: Vec<usize> = out.iter().map(|c| c.data.len()).collect();
        assert_eq!(sizes, vec![MAX_CHUNK, MAX_CHUNK, 110, 0]);
        assert!(out.iter().all(|c| c.data.len() <= MAX_CHUNK));
    }

    #[tokio::test]
    async fn an_error_ends_the_stream_with_its_message() {
        let frames = stream::iter(vec![
            frame(false, b"x"),
            Err(RuntimeError::Daemon {
                op: "logs",
                message: "daemon went away".into(),
            }),
            frame(false, b"never"),
        ])
        .boxed();
        let out: Vec<LogChunk> = chunks(frames).collect().await;
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].data, b"x");
        assert_eq!(out[1].end, Some(Err("logs: daemon went away".to_string())));
    }
}
