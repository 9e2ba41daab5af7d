//! The column encodings of a chunk.
//!
//! - **Time** (Unix milliseconds): delta-of-delta in buckets, as Gorilla does:
//!   `0` (the same interval as before), `10`+7 bits, `110`+12, `1110`+20,
//!   `1111`+64. A steady 1 Hz source costs one bit per point; an interval that
//!   jitters by a few milliseconds costs nine. Intervals may be negative: a
//!   point that arrives late (within the head's bound) is stored where it
//!   arrived and readers sort.
//! - **Integer** values (counters, and gauges quantized to their source's
//!   resolution: a value is stored as `round(v / scale)`): the change from the
//!   previous value, `0` when it equals the previous change (a flat gauge, a
//!   counter at a steady rate), else zig-zagged in buckets `10`+7, `110`+14,
//!   `1110`+24, `11110`+64; `11111` marks a missing value (NaN; an infinite or
//!   out-of-range value also reads back as NaN).
//! - **Float** values: Gorilla's XOR with the previous value's bits, exact for
//!   every `f64` (NaN payloads, infinities and `-0.0` included).

use crate::bits::{BitReader, BitWriter};

/// How a column's values are stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Encoding {
    /// Quantized to multiples of `scale` and stored as integers.
    Int {
        /// The resolution: 1 for byte counts, 0.01 for a percentage given to
        /// two decimals, 1024 for memory that the kernel counts in KiB.
        scale: f64,
    },
    /// Stored exactly, XOR-compressed.
    Float,
}

impl Encoding {
    /// What `value` reads back as.
    pub fn quantize(self, value: f64) -> f64 {
        match self {
            Encoding::Float => value,
            Encoding::Int { scale } => match to_int(value, scale) {
                Some(q) => from_int(q, scale),
                None => f64::NAN,
            },
        }
    }
}

const INT_LIMIT: f64 = 4.0e18;

fn to_int(value: f64, scale: f64) -> Option<i64> {
    let q = (value / scale).round();
    (q.is_finite() && q.abs() < INT_LIMIT).then_some(q as i64)
}

/// `q × scale`, computed as `q / (1 / scale)` for a decimal fraction such as
/// 0.01, so 481 reads back as 4.81 and not 4.8100000000000005.
fn from_int(q: i64, scale: f64) -> f64 {
    IntScale::new(scale).apply(q)
}

/// [`from_int`] with its choice made once per column.
#[derive(Debug, Clone, Copy)]
enum IntScale {
    Div(f64),
    Mul(f64),
}

impl IntScale {
    fn new(scale: f64) -> IntScale {
        if scale < 1.0 {
            let inv = (1.0 / scale).round();
            if (inv * scale - 1.0).abs() < 1e-12 {
                return IntScale::Div(inv);
            }
        }
        IntScale::Mul(scale)
    }

    #[inline]
    fn apply(self, q: i64) -> f64 {
        match self {
            IntScale::Div(inv) => q as f64 / inv,
            IntScale::Mul(scale) => q as f64 * scale,
        }
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn fits(zz: u64, bits: u32) -> bool {
    zz < (1u64 << bits)
}

/// Encodes timestamps.
#[derive(Debug, Clone, Default)]
pub struct TimeEncoder {
    out: BitWriter,
    count: u32,
    prev: i64,
    prev_delta: i64,
}

impl TimeEncoder {
    /// Appends `t`.
    pub fn push(&mut self, t: i64) {
        if self.count == 0 {
            self.out.write(t as u64, 64);
        } else {
            let delta = t.wrapping_sub(self.prev);
            let dod = zigzag(delta.wrapping_sub(self.prev_delta));
            if dod == 0 {
                self.out.bit(false);
            } else if fits(dod, 7) {
                self.out.write(0b10, 2);
                self.out.write(dod, 7);
            } else if fits(dod, 12) {
                self.out.write(0b110, 3);
                self.out.write(dod, 12);
            } else if fits(dod, 20) {
                self.out.write(0b1110, 4);
                self.out.write(dod, 20);
            } else {
                self.out.write(0b1111, 4);
                self.out.write(dod, 64);
            }
            self.prev_delta = delta;
        }
        self.prev = t;
        self.count += 1;
    }

    /// The encoded bits.
    pub fn bits(&self) -> &BitWriter {
        &self.out
    }

    /// Gives back spare capacity.
    pub fn shrink(&mut self) {
        self.out.shrink();
    }
}

/// Decodes `count` timestamps; `None` when the bits end early.
pub fn decode_times(bytes: &[u8], bits: u64, count: u32) -> Option<Vec<i64>> {
    let mut r = BitReader::new(bytes, bits);
    let mut out = Vec::with_capacity(count as usize);
    let mut prev = 0i64;
    let mut prev_delta = 0i64;
    for i in 0..count {
        let t = if i == 0 {
            r.read(64)? as i64
        } else {
            // The control prefix (0, 10, 110, 1110, 1111) and its payload
            // from one look at the next 64 bits.
            let w = r.peek();
            let dod = match w.leading_ones() {
                0 => {
                    r.take(w, 1, 0)?;
                    0
                }
                1 => unzigzag(r.take(w, 2, 7)?),
                2 => unzigzag(r.take(w, 3, 12)?),
                3 => unzigzag(r.take(w, 4, 20)?),
                _ => unzigzag(r.take(w, 4, 64)?),
            };
            let delta = prev_delta.wrapping_add(dod);
            prev_delta = delta;
            prev.wrapping_add(delta)
        };
        prev = t;
        out.push(t);
    }
    Some(out)
}

/// Encodes one column's values.
#[derive(Debug, Clone)]
pub struct ValueEncoder {
    encoding: Encoding,
    out: BitWriter,
    count: u32,
    prev: u64,
    prev_delta: i64,
    lead: u32,
    trail: u32,
}

impl ValueEncoder {
    /// An empty column.
    pub fn new(encoding: Encoding) -> ValueEncoder {
        ValueEncoder {
            encoding,
            out: BitWriter::new(),
            count: 0,
            prev: 0,
            prev_delta: 0,
            lead: u32::MAX,
            trail: 0,
        }
    }

    /// Appends `value`.
    pub fn push(&mut self, value: f64) {
        match self.encoding {
            Encoding::Int { scale } => self.push_int(to_int(value, scale)),
            Encoding::Float => self.push_float(value.to_bits()),
        }
        self.count += 1;
    }

    fn push_int(&mut self, value: Option<i64>) {
        let Some(v) = value else {
            self.out.write(0b11111, 5);
            return;
        };
        let delta = v.wrapping_sub(self.prev as i64);
        if delta == self.prev_delta {
            self.out.bit(false);
        } else {
            let zz = zigzag(delta);
            if fits(zz, 7) {
                self.out.write(0b10, 2);
                self.out.write(zz, 7);
            } else if fits(zz, 14) {
                self.out.write(0b110, 3);
                self.out.write(zz, 14);
            } else if fits(zz, 24) {
                self.out.write(0b1110, 4);
                self.out.write(zz, 24);
            } else {
                self.out.write(0b11110, 5);
                self.out.write(zz, 64);
            }
        }
        self.prev = v as u64;
        self.prev_delta = delta;
    }

    fn push_float(&mut self, bits: u64) {
        if self.count == 0 {
            self.out.write(bits, 64);
            self.prev = bits;
            return;
        }
        let xor = bits ^ self.prev;
        self.prev = bits;
        if xor == 0 {
            self.out.bit(false);
            return;
        }
        self.out.bit(true);
        let lead = xor.leading_zeros().min(63);
        let trail = xor.trailing_zeros();
        if self.lead != u32::MAX && lead >= self.lead && trail >= self.trail {
            self.out.bit(false);
            let meaningful = 64 - self.lead - self.trail;
            self.out.write(xor >> self.trail, meaningful);
        } else {
            self.out.bit(true);
            let meaningful = 64 - lead - trail;
            self.out.write(u64::from(lead), 6);
            self.out.write(u64::from(meaningful - 1), 6);
            self.out.write(xor >> trail, meaningful);
            self.lead = lead;
            self.trail = trail;
        }
    }

    /// The encoding.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// The encoded bits.
    pub fn bits(&self) -> &BitWriter {
        &self.out
    }

    /// Gives back spare capacity.
    pub fn shrink(&mut self) {
        self.out.shrink();
    }
}

/// Decodes `count` values; `None` when the bits end early or are malformed.
pub fn decode_values(encoding: Encoding, bytes: &[u8], bits: u64, count: u32) -> Option<Vec<f64>> {
    let mut r = BitReader::new(bytes, bits);
    let mut out = Vec::with_capacity(count as usize);
    match encoding {
        Encoding::Int { scale } => {
            let scale = IntScale::new(scale);
            let mut prev = 0i64;
            let mut prev_delta = 0i64;
            for _ in 0..count {
                // The control prefix (0, 10, 110, 1110, 11110; 11111 for NaN)
                // and its payload from one look at the next 64 bits.
                let w = r.peek();
                let delta = match w.leading_ones() {
                    0 => {
                        r.take(w, 1, 0)?;
                        prev_delta
                    }
                    1 => unzigzag(r.take(w, 2, 7)?),
                    2 => unzigzag(r.take(w, 3, 14)?),
                    3 => unzigzag(r.take(w, 4, 24)?),
                    4 => unzigzag(r.take(w, 5, 64)?),
                    _ => {
                        r.take(w, 5, 0)?;
                        out.push(f64::NAN);
                        continue;
                    }
                };
                prev = prev.wrapping_add(delta);
                prev_delta = delta;
                out.push(scale.apply(prev));
            }
        }
        Encoding::Float => {
            let mut prev = 0u64;
            let mut lead = 0u32;
            let mut trail = 0u32;
            for i in 0..count {
                let bits = if i == 0 {
                    r.read(64)?
                } else if !r.bit()? {
                    prev
                } else if !r.bit()? {
                    let meaningful = 64u32.checked_sub(lead + trail)?;
                    prev ^ (r.read(meaningful)? << trail)
                } else {
                    lead = r.read(6)? as u32;
                    let meaningful = r.read(6)? as u32 + 1;
                    trail = 64u32.checked_sub(lead + meaningful)?;
                    prev ^ (r.read(meaningful)? << trail)
                };
                prev = bits;
                out.push(f64::from_bits(bits));
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn same(a: f64, b: f64) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    proptest! {
        #[test]
        fn times_round_trip(start in any::<i64>(), steps in proptest::collection::vec(-5_000i64..3_600_000, 0..300)) {
            let mut times = vec![start];
            for s in steps {
                times.push(times[times.len() - 1].wrapping_add(s));
            }
            let mut e = TimeEncoder::default();
            for t in &times {
                e.push(*t);
            }
            let got = decode_times(e.bits().bytes(), e.bits().len_bits(), times.len() as u32);
            prop_assert_eq!(got, Some(times));
        }

        #[test]
        fn floats_round_trip_exactly(values in proptest::collection::vec(prop_oneof![
            any::<f64>(),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(-0.0),
            (0u32..100).prop_map(f64::from),
        ], 0..300)) {
            let mut e = ValueEncoder::new(Encoding::Float);
            for v in &values {
                e.push(*v);
            }
            let got = decode_values(Encoding::Float, e.bits().bytes(), e.bits().len_bits(), values.len() as u32).expect("decodes");
            prop_assert_eq!(got.len(), values.len());
            for (a, b) in got.iter().zip(&values) {
                prop_assert!(a.to_bits() == b.to_bits(), "{a} != {b}");
            }
        }

        #[test]
        fn ints_round_trip_at_their_resolution(
            scale in prop_oneof![Just(1.0), Just(0.01), Just(1024.0), Just(0.5)],
            values in proptest::collection::vec(prop_oneof![
                4 => (-1_000_000i64..1_000_000).prop_map(|v| v as f64),
                2 => -1e15f64..1e15,
                1 => Just(f64::NAN),
                1 => any::<i32>().prop_map(f64::from),
            ], 0..300),
        ) {
            let enc = Encoding::Int { scale };
            let mut e = ValueEncoder::new(enc);
            for v in &values {
                e.push(*v);
            }
            let got = decode_values(enc, e.bits().bytes(), e.bits().len_bits(), values.len() as u32).expect("decodes");
            prop_assert_eq!(got.len(), values.len());
            for (g, v) in got.iter().zip(&values) {
                let want = enc.quantize(*v);
                prop_assert!(same(*g, want), "{v} read back as {g}, want {want}");
                if !v.is_nan() {
                    prop_assert!((g - v).abs() <= scale / 2.0 + v.abs() * 1e-12, "{v} vs {g}");
                }
            }
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), count in 0u32..200) {
            let bits = bytes.len() as u64 * 8;
            let _ = decode_times(&bytes, bits, count);
            let _ = decode_values(Encoding::Float, &bytes, bits, count);
            let _ = decode_values(Encoding::Int { scale: 1.0 }, &bytes, bits, count);
        }
    }

    #[test]
    fn a_steady_counter_and_a_flat_gauge_cost_a_bit_a_point() {
        let mut t = TimeEncoder::default();
        let mut counter = ValueEncoder::new(Encoding::Int { scale: 1.0 });
        let mut flat = ValueEncoder::new(Encoding::Int { scale: 0.01 });
        for i in 0..1000i64 {
            t.push(1_700_000_000_000 + i * 1000);
            counter.push((i * 4096) as f64);
            flat.push(42.5);
        }
        // The first point and the first change, then one bit each.
        assert!(
            t.bits().len_bits() <= 64 + 15 + 999,
            "{}",
            t.bits().len_bits()
        );
        assert!(
            counter.bits().len_bits() <= 2 * 69 + 1000,
            "{}",
            counter.bits().len_bits()
        );
        assert!(
            flat.bits().len_bits() <= 69 + 1000,
            "{}",
            flat.bits().len_bits()
        );
    }
}
