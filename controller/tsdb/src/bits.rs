//! Bit-level writing and reading, most significant bit first.

/// Appends bits to a byte buffer.
#[derive(Debug, Clone, Default)]
pub struct BitWriter {
    bytes: Vec<u8>,
    bits: u64,
}

impl BitWriter {
    /// An empty writer.
    pub fn new() -> BitWriter {
        BitWriter::default()
    }

    /// Writes the low `n` bits of `value` (`n` ≤ 64), most significant first.
    pub fn write(&mut self, value: u64, n: u32) {
        debug_assert!(n <= 64);
        let mut n = n.min(64);
        let value = if n < 64 {
            value & ((1u64 << n) - 1)
        } else {
            value
        };
        while n > 0 {
            let used = (self.bits % 8) as u32;
            if used == 0 {
                self.bytes.push(0);
            }
            let free = 8 - used;
            let take = free.min(n);
            let shift = n - take;
            let part = ((value >> shift) & ((1u64 << take) - 1)) as u8;
            if let Some(last) = self.bytes.last_mut() {
                *last |= part << (free - take);
            }
            self.bits += u64::from(take);
            n -= take;
        }
    }

    /// Writes one bit.
    pub fn bit(&mut self, one: bool) {
        self.write(u64::from(one), 1);
    }

    /// The bits written.
    pub fn len_bits(&self) -> u64 {
        self.bits
    }

    /// The bytes (the last one padded with zeros).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The bytes this writer holds in memory, its spare capacity included.
    pub fn heap_bytes(&self) -> usize {
        self.bytes.capacity()
    }

    /// Gives back spare capacity (a closed chunk keeps only what it holds).
    pub fn shrink(&mut self) {
        self.bytes.shrink_to_fit();
    }
}

/// Reads bits written by a [`BitWriter`]; every read past the end is `None`.
#[derive(Debug, Clone)]
pub struct BitReader<'a> {
    bytes: &'a [u8],
    pos: u64,
    end: u64,
}

impl<'a> BitReader<'a> {
    /// Reads the first `bits` bits of `bytes` (at most all of them).
    pub fn new(bytes: &'a [u8], bits: u64) -> BitReader<'a> {
        let end = bits.min(bytes.len() as u64 * 8);
        BitReader { bytes, pos: 0, end }
    }

    /// The next 64 bits, left-aligned, without moving (bits past the data
    /// read as 0; whether they may be taken is for [`BitReader::read`] and
    /// [`BitReader::take`] to check).
    #[inline]
    pub fn peek(&self) -> u64 {
        let start = (self.pos / 8) as usize;
        let shift = (self.pos % 8) as u32;
        if let Some(b) = self.bytes.get(start..start + 9) {
            let hi = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
            if shift == 0 {
                return hi;
            }
            return (hi << shift) | (u64::from(b[8]) >> (8 - shift));
        }
        let mut window = [0u8; 16];
        let avail = self.bytes.len().saturating_sub(start).min(9);
        window[..avail].copy_from_slice(&self.bytes[start..start + avail]);
        ((u128::from_be_bytes(window) << shift) >> 64) as u64
    }

    /// Reads `n` bits (`n` ≤ 64): one load of the 9 bytes that can hold them.
    #[inline]
    pub fn read(&mut self, n: u32) -> Option<u64> {
        if n > 64 || self.pos + u64::from(n) > self.end {
            return None;
        }
        if n == 0 {
            return Some(0);
        }
        let v = self.peek() >> (64 - n);
        self.pos += u64::from(n);
        Some(v)
    }

    /// Takes a `prefix` of bits already seen in `w` (this reader's
    /// [`BitReader::peek`]) and the `n` bits after it, returning those.
    #[inline]
    pub fn take(&mut self, w: u64, prefix: u32, n: u32) -> Option<u64> {
        if prefix + n > 64 {
            if self.pos + u64::from(prefix) > self.end {
                return None;
            }
            self.pos += u64::from(prefix);
            return self.read(n);
        }
        if self.pos + u64::from(prefix + n) > self.end {
            return None;
        }
        self.pos += u64::from(prefix + n);
        if n == 0 {
            return Some(0);
        }
        Some((w << prefix) >> (64 - n))
    }

    /// Reads one bit.
    pub fn bit(&mut self) -> Option<bool> {
        self.read(1).map(|b| b == 1)
    }

    /// Whether every bit has been read.
    pub fn at_end(&self) -> bool {
        self.pos >= self.end
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn round_trip(items in proptest::collection::vec((any::<u64>(), 0u32..=64), 0..200)) {
            let mut w = BitWriter::new();
            for (v, n) in &items {
                w.write(*v, *n);
            }
            let mut r = BitReader::new(w.bytes(), w.len_bits());
            for (v, n) in &items {
                let mask = if *n == 64 { u64::MAX } else { (1u64 << n) - 1 };
                prop_assert_eq!(r.read(*n), Some(v & mask));
            }
            prop_assert!(r.at_end());
            prop_assert_eq!(r.read(1), None);
        }
    }
}
