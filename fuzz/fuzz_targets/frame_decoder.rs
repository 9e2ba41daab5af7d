//! Feeds arbitrary bytes to the wire decoder, as a hostile peer would.
//!
//! Properties checked, for every input:
//! - `decode_frame` and `decode_body` never panic, never allocate past the frame
//!   limit (libFuzzer's `-rss_limit_mb` catches that) and never loop;
//! - a whole frame that decodes reports a length within the input;
//! - whatever decodes re-encodes, and the re-encoding decodes to a message that
//!   encodes to the same bytes (the codec is stable on what it accepts);
//! - a buffer of back-to-back frames is consumed frame by frame until it runs out,
//!   without ever taking zero bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use novacron_wire::{
    self as wire, AgentMessage, ControllerMessage, Decode, Encode, MetricsBatch, StreamOpen,
    decode_body, decode_frame,
};

fuzz_target!(|data: &[u8]| {
    check::<AgentMessage>(data);
    check::<MetricsBatch>(data);
    check::<ControllerMessage>(data);
    check::<StreamOpen>(data);
});

/// Runs every property for one message type.
fn check<T>(data: &[u8])
where
    T: Decode<()> + Encode,
{
    if let Ok(msg) = decode_body::<T>(data) {
        stable(&msg);
    }
    if let Ok(Some((msg, used))) = decode_frame::<T>(data) {
        assert!(
            used >= 4 && used <= data.len(),
            "frame length {used} outside the input"
        );
        stable(&msg);
    }
    // A stream of frames: each step must consume at least a length prefix.
    let mut rest = data;
    while let Ok(Some((_, used))) = decode_frame::<T>(rest) {
        assert!(used >= 4, "a frame consumed {used} bytes");
        rest = &rest[used..];
    }
}

/// Encode → decode → encode gives the same bytes (NaN-safe, unlike `==`).
fn stable<T>(msg: &T)
where
    T: Decode<()> + Encode,
{
    let Ok(first) = wire::encode_frame(msg) else {
        return; // larger than a frame may be: refused, which is fine
    };
    let (again, used) = decode_frame::<T>(&first)
        .expect("an encoded frame decodes")
        .expect("an encoded frame is whole");
    assert_eq!(used, first.len());
    let second = wire::encode_frame(&again).expect("re-encodes");
    assert_eq!(first, second, "encoding is not stable");
}
