//! The agent's bounded window of samples: numbered, kept while disconnected, and
//! replayed in order after a reconnect. Pure: no clock, no I/O.

use std::collections::VecDeque;

use novacron_common::wire::{MAX_SAMPLES_PER_BATCH, MetricsBatch, NodeSample};

/// Default capacity: 15 minutes at a 1 s interval.
pub const DEFAULT_CAPACITY: usize = 900;

/// A ring of the most recent samples with a send cursor.
///
/// Samples get consecutive sequence numbers from 0. The buffer keeps the newest
/// `capacity` of them whether or not they were sent, so that a controller that
/// restarted (and lost what it had received) can ask again from its last durable
/// mark. When full, the oldest sample is dropped and counted.
#[derive(Debug)]
pub struct SampleBuffer {
    samples: VecDeque<NodeSample>,
    capacity: usize,
    next_seq: u64,
    cursor: u64,
    dropped_unsent: u64,
}

impl SampleBuffer {
    /// An empty buffer holding at most `capacity` samples (at least 1).
    pub fn new(capacity: usize) -> SampleBuffer {
        let capacity = capacity.max(1);
        SampleBuffer {
            samples: VecDeque::with_capacity(capacity.min(4096)),
            capacity,
            next_seq: 0,
            cursor: 0,
            dropped_unsent: 0,
        }
    }

    /// Numbers `sample` and appends it, dropping the oldest sample when full.
    /// Returns the sequence number given.
    pub fn push(&mut self, mut sample: NodeSample) -> u64 {
        let seq = self.next_seq;
        sample.seq = seq;
        self.next_seq += 1;
        if self.samples.len() == self.capacity
            && let Some(old) = self.samples.pop_front()
            && old.seq >= self.cursor
        {
            self.dropped_unsent += 1;
            self.cursor = old.seq + 1;
        }
        self.samples.push_back(sample);
        seq
    }

    /// Moves the send cursor to `next_seq` (what the controller says it needs next).
    /// A value older than the oldest kept sample starts from the oldest kept one; a
    /// value newer than anything numbered yet is clamped to the next number.
    pub fn resume_from(&mut self, next_seq: u64) {
        let oldest = self.samples.front().map_or(self.next_seq, |s| s.seq);
        self.cursor = next_seq.clamp(oldest, self.next_seq);
    }

    /// The next batch to send (at most `max` samples, capped at the protocol
    /// maximum), or `None` when everything was handed out. Advances the cursor.
    pub fn next_batch(&mut self, max: usize) -> Option<MetricsBatch> {
        let max = max.clamp(1, MAX_SAMPLES_PER_BATCH);
        let oldest = self.samples.front()?.seq;
        let start = usize::try_from(self.cursor.checked_sub(oldest)?).ok()?;
        if start >= self.samples.len() {
            return None;
        }
        let samples: Vec<NodeSample> = self.samples.range(start..).take(max).cloned().collect();
        self.cursor += samples.len() as u64;
        Some(MetricsBatch {
            samples,
            dropped_total: self.dropped_unsent,
        })
    }

    /// Samples numbered but not yet handed out.
    pub fn pending(&self) -> u64 {
        self.next_seq - self.cursor
    }

    /// Samples dropped before they were ever sent.
    pub fn dropped(&self) -> u64 {
        self.dropped_unsent
    }

    /// The next sequence number to be given.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn drain(buf: &mut SampleBuffer) -> Vec<u64> {
        let mut out = vec![];
        while let Some(b) = buf.next_batch(7) {
            assert!(b.samples.len() <= 7);
            out.extend(b.samples.iter().map(|s| s.seq));
        }
        out
    }

    #[test]
    fn replays_from_the_controllers_mark_in_order() {
        let mut buf = SampleBuffer::new(100);
        for _ in 0..10 {
            buf.push(NodeSample::default());
        }
        assert_eq!(drain(&mut buf), (0..10).collect::<Vec<_>>());
        // The controller restarted and only knew up to 6.
        buf.resume_from(6);
        for _ in 0..3 {
            buf.push(NodeSample::default());
        }
        assert_eq!(drain(&mut buf), (6..13).collect::<Vec<_>>());
        assert_eq!(buf.pending(), 0);
    }

    #[test]
    fn overflow_drops_the_oldest_and_counts_only_unsent_ones() {
        let mut buf = SampleBuffer::new(5);
        for _ in 0..3 {
            buf.push(NodeSample::default());
        }
        assert_eq!(drain(&mut buf), vec![0, 1, 2]);
        // Disconnected: 8 more samples, 5 fit. 3..=12 minus the 5 newest.
        for _ in 0..8 {
            buf.push(NodeSample::default());
        }
        assert_eq!(buf.dropped(), 3, "3, 4 and 5 were never sent");
        buf.resume_from(3);
        let b = buf.next_batch(100).expect("batch");
        assert_eq!(b.dropped_total, 3);
        assert_eq!(
            b.samples.iter().map(|s| s.seq).collect::<Vec<_>>(),
            vec![6, 7, 8, 9, 10]
        );
    }

    #[test]
    fn a_mark_from_the_future_is_clamped() {
        let mut buf = SampleBuffer::new(5);
        buf.push(NodeSample::default());
        buf.resume_from(1_000);
        assert_eq!(buf.next_batch(10), None);
        buf.push(NodeSample::default());
        assert_eq!(drain(&mut buf), vec![1]);
    }

    proptest! {
        /// Against a model: whatever the interleaving of pushes, controller marks and
        /// sends, each send hands out exactly the samples from the cursor (clamped to
        /// what is still held) to the newest one, contiguous and each once.
        #[test]
        fn sends_exactly_the_held_samples_from_the_mark(cap in 1usize..50, ops in prop::collection::vec((0u8..3, 0u64..80), 1..200)) {
            let mut buf = SampleBuffer::new(cap);
            let mut cursor = 0u64; // the model's send cursor
            for (op, arg) in ops {
                match op {
                    0 => { buf.push(NodeSample::default()); }
                    1 => {
                        buf.resume_from(arg);
                        cursor = arg.min(buf.next_seq());
                    }
                    _ => {
                        let oldest = buf.next_seq().saturating_sub(cap as u64);
                        let expected: Vec<u64> = (cursor.max(oldest)..buf.next_seq()).collect();
                        prop_assert_eq!(drain(&mut buf), expected);
                        cursor = buf.next_seq();
                        prop_assert_eq!(buf.pending(), 0);
                    }
                }
            }
        }
    }
}
