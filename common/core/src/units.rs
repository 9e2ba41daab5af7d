//! The one way NovaCron writes sizes and durations for people: sizes in binary
//! units with one decimal (`512B`, `3.1Gi`, `15.6Gi`), or the same trimmed of a
//! `.0` (`8Gi`) in sentences; durations as humantime writes them (`1m 30s`).
//!
//! Manifests write sizes exactly instead (`manifest::ByteSize`: `256Mi`), since
//! what they print must parse back to the same number.

use std::fmt;
use std::time::Duration;

/// A size in bytes, displayed in binary units with one decimal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanBytes {
    bytes: u64,
    trim: bool,
}

/// `n` bytes for people: `512B`, `1.0Ki`, `3.1Gi` (rounded to one decimal).
pub fn bytes(n: u64) -> HumanBytes {
    HumanBytes {
        bytes: n,
        trim: false,
    }
}

impl HumanBytes {
    /// The same without a `.0`: `8Gi`, `3.5Gi`, `512Mi`, `100B`.
    pub fn trimmed(self) -> HumanBytes {
        HumanBytes { trim: true, ..self }
    }
}

impl fmt::Display for HumanBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
        let n = self.bytes;
        if n < 1024 {
            return write!(f, "{n}B");
        }
        // Precision loss above 2^53 bytes does not show at one decimal.
        let mut value = n as f64 / 1024.0;
        let mut unit = 0;
        while value >= 1023.95 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        let text = format!("{value:.1}");
        let text = match text.strip_suffix(".0") {
            Some(whole) if self.trim => whole,
            _ => &text,
        };
        write!(f, "{text}{}", UNITS[unit])
    }
}

/// `d` for people, as humantime writes it: `1m 30s`, `250ms`.
pub fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GI: u64 = 1 << 30;

    #[test]
    fn sizes_in_binary_units_with_one_decimal() {
        assert_eq!(bytes(0).to_string(), "0B");
        assert_eq!(bytes(1023).to_string(), "1023B");
        assert_eq!(bytes(1024).to_string(), "1.0Ki");
        assert_eq!(bytes(1024 * 1024 - 1).to_string(), "1.0Mi");
        assert_eq!(bytes(3 * GI + GI / 10).to_string(), "3.1Gi");
        assert_eq!(bytes(u64::MAX).to_string(), "16.0Ei");
    }

    #[test]
    fn trimmed_sizes_drop_a_zero_decimal_only() {
        assert_eq!(bytes(8 * GI).trimmed().to_string(), "8Gi");
        assert_eq!(bytes(3 * GI + GI / 2).trimmed().to_string(), "3.5Gi");
        assert_eq!(bytes(512 << 20).trimmed().to_string(), "512Mi");
        assert_eq!(bytes(100).trimmed().to_string(), "100B");
    }

    #[test]
    fn durations_as_humantime_writes_them() {
        assert_eq!(duration(Duration::from_secs(90)), "1m 30s");
        assert_eq!(duration(Duration::from_millis(250)), "250ms");
    }
}
