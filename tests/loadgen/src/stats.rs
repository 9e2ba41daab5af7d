//! What a run counts and how it is reported: per-worker tallies merged at the
//! end, and the report built from them (a table or one JSON object).

use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;

/// The largest latency the histogram holds, in microseconds (larger ones are
/// clamped to it): one minute, far above any request timeout in use.
const MAX_LATENCY_US: u64 = 60_000_000;

/// An empty histogram of microseconds: 1 us to one minute, three significant
/// digits.
pub fn latency_histogram() -> Histogram<u64> {
    // A valid, fixed configuration.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("fixed histogram bounds are valid")
}

/// Records `latency` in microseconds, clamped to the histogram's top.
pub fn record_us(histogram: &mut Histogram<u64>, latency: Duration) {
    let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    histogram.saturating_record(us.min(MAX_LATENCY_US));
}

/// How a request that got no response failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The TCP connect or the HTTP/1.1 handshake failed.
    Connect,
    /// The connection broke while the request was on it (reset, closed early,
    /// malformed response).
    Io,
    /// No response came before the request's deadline (its scheduled time plus
    /// the timeout), counting the time it waited for a connection.
    Timeout,
}

/// One worker's tallies (or several merged).
#[derive(Debug, Clone)]
pub struct Tally {
    /// Requests that ended in a 2xx response.
    pub ok: u64,
    /// Requests that ended in a response outside 2xx.
    pub non_2xx: u64,
    /// Requests that failed at connect or handshake.
    pub errors_connect: u64,
    /// Requests whose connection broke.
    pub errors_io: u64,
    /// Requests that missed their deadline.
    pub errors_timeout: u64,
    /// 2xx responses that completed inside the measured window (the basis of
    /// the throughput).
    pub ok_in_window: u64,
    /// Latencies in microseconds of every request that got a response (2xx or
    /// not).
    pub latency_us: Histogram<u64>,
}

impl Tally {
    /// An empty tally.
    pub fn new() -> Self {
        // Three significant digits up to one minute: a valid, fixed configuration.
        let latency_us = latency_histogram();
        Tally {
            ok: 0,
            non_2xx: 0,
            errors_connect: 0,
            errors_io: 0,
            errors_timeout: 0,
            ok_in_window: 0,
            latency_us,
        }
    }

    /// Counts a response with `status` that took `latency`.
    pub fn response(&mut self, status: u16, latency: Duration, in_window: bool) {
        if (200..300).contains(&status) {
            self.ok += 1;
            if in_window {
                self.ok_in_window += 1;
            }
        } else {
            self.non_2xx += 1;
        }
        record_us(&mut self.latency_us, latency);
    }

    /// Counts a request that got no response.
    pub fn failure(&mut self, failure: Failure) {
        match failure {
            Failure::Connect => self.errors_connect += 1,
            Failure::Io => self.errors_io += 1,
            Failure::Timeout => self.errors_timeout += 1,
        }
    }

    /// Every failed request.
    pub fn errors(&self) -> u64 {
        self.errors_connect + self.errors_io + self.errors_timeout
    }

    /// Every request that has ended (response or failure).
    pub fn ended(&self) -> u64 {
        self.ok + self.non_2xx + self.errors()
    }

    /// Adds `other`'s counts and latencies to this tally.
    pub fn merge(&mut self, other: &Tally) {
        self.ok += other.ok;
        self.non_2xx += other.non_2xx;
        self.errors_connect += other.errors_connect;
        self.errors_io += other.errors_io;
        self.errors_timeout += other.errors_timeout;
        self.ok_in_window += other.ok_in_window;
        // Both histograms have the same fixed bounds and clamp on record, so
        // adding cannot go out of range.
        self.latency_us
            .add(&other.latency_us)
            .expect("histograms with the same bounds add");
    }
}

impl Default for Tally {
    fn default() -> Self {
        Self::new()
    }
}

/// Which kind of run a report describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Requests at a fixed rate, latency from each scheduled time.
    Open {
        /// The requested rate, per second.
        rate: u32,
    },
    /// Each connection sends its next request when the last one ends; latency
    /// from the actual send.
    Closed,
}

/// The outcome of a run, for the reported (post-warmup) requests.
#[derive(Debug, Clone)]
pub struct Report {
    /// The kind of run.
    pub mode: Mode,
    /// The target URL.
    pub url: String,
    /// The size of the connection pool.
    pub connections: usize,
    /// The warmup that was left out.
    pub warmup: Duration,
    /// The measured window.
    pub window: Duration,
    /// Requests due in the window (open loop) or started in it (closed loop).
    pub scheduled: u64,
    /// Requests that found the queue full and were never sent.
    pub dropped: u64,
    /// The tallies of the requests that were not dropped.
    pub tally: Tally,
    /// Open loop only: how late the generator itself put each reported
    /// request on its queue (timer wake-up lag). It is part of every latency;
    /// when it is large next to them, the generator is the bottleneck.
    pub lag_us: Option<Histogram<u64>>,
}

impl Report {
    /// Requests that were not dropped (each ends as ok, non-2xx or an error).
    pub fn sent(&self) -> u64 {
        self.scheduled.saturating_sub(self.dropped)
    }

    /// 2xx responses completed inside the window, per second of the window.
    pub fn throughput(&self) -> f64 {
        let secs = self.window.as_secs_f64();
        if secs > 0.0 {
            self.tally.ok_in_window as f64 / secs
        } else {
            0.0
        }
    }

    /// The latency at `quantile` (0..=1) in microseconds, 0 when nothing was
    /// recorded.
    pub fn latency_us(&self, q: f64) -> u64 {
        quantile(&self.tally.latency_us, q)
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        let (mode, rate) = match self.mode {
            Mode::Open { rate } => ("open", Some(rate)),
            Mode::Closed => ("closed", None),
        };
        let t = &self.tally;
        let lag = self.lag_us.as_ref().map(|lag| {
            serde_json::json!({
                "p50": quantile(lag, 0.5),
                "p99": quantile(lag, 0.99),
                "max": lag.max(),
            })
        });
        serde_json::json!({
            "mode": mode,
            "url": self.url,
            "rate": rate,
            "connections": self.connections,
            "warmup_s": self.warmup.as_secs_f64(),
            "window_s": self.window.as_secs_f64(),
            "scheduled": self.scheduled,
            "sent": self.sent(),
            "ok": t.ok,
            "non_2xx": t.non_2xx,
            "errors": t.errors(),
            "errors_connect": t.errors_connect,
            "errors_io": t.errors_io,
            "errors_timeout": t.errors_timeout,
            "dropped": self.dropped,
            "throughput_ok_per_s": (self.throughput() * 10.0).round() / 10.0,
            "latency_us": {
                "p50": self.latency_us(0.5),
                "p90": self.latency_us(0.9),
                "p99": self.latency_us(0.99),
                "p99_9": self.latency_us(0.999),
                "max": t.latency_us.max(),
            },
            "schedule_lag_us": lag,
        })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.tally;
        match self.mode {
            Mode::Open { rate } => writeln!(
                f,
                "open loop  {}  rate {rate}/s  {} connections",
                self.url, self.connections
            )?,
            Mode::Closed => writeln!(
                f,
                "closed loop  {}  {} connections",
                self.url, self.connections
            )?,
        }
        writeln!(
            f,
            "window {:.1} s after {:.1} s warmup",
            self.window.as_secs_f64(),
            self.warmup.as_secs_f64()
        )?;
        writeln!(f, "  scheduled  {:>10}", self.scheduled)?;
        writeln!(f, "  sent       {:>10}", self.sent())?;
        writeln!(f, "  ok (2xx)   {:>10}", t.ok)?;
        writeln!(f, "  non-2xx    {:>10}", t.non_2xx)?;
        writeln!(
            f,
            "  errors     {:>10}  (connect {}, io {}, timeout {})",
            t.errors(),
            t.errors_connect,
            t.errors_io,
            t.errors_timeout
        )?;
        writeln!(f, "  dropped    {:>10}", self.dropped)?;
        writeln!(f, "  throughput {:>10.1} ok/s", self.throughput())?;
        writeln!(f, "  latency (us)")?;
        for (name, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)] {
            writeln!(f, "    {name:<6} {:>10}", self.latency_us(q))?;
        }
        writeln!(f, "    {:<6} {:>10}", "max", t.latency_us.max())?;
        if let Some(lag) = &self.lag_us {
            writeln!(
                f,
                "  schedule lag (us)  p50 {}  p99 {}  max {}",
                quantile(lag, 0.5),
                quantile(lag, 0.99),
                lag.max()
            )?;
        }
        Ok(())
    }
}

/// The value at `q` (0..=1), 0 when nothing was recorded.
fn quantile(histogram: &Histogram<u64>, q: f64) -> u64 {
    if histogram.is_empty() {
        0
    } else {
        histogram.value_at_quantile(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_merge_and_count_every_outcome_once() {
        let mut a = Tally::new();
        a.response(200, Duration::from_micros(100), true);
        a.response(204, Duration::from_micros(300), false);
        a.response(503, Duration::from_micros(50), true);
        a.failure(Failure::Timeout);
        let mut b = Tally::new();
        b.failure(Failure::Connect);
        b.failure(Failure::Io);
        b.response(200, Duration::from_secs(3600), true);
        a.merge(&b);
        assert_eq!((a.ok, a.non_2xx, a.errors()), (3, 1, 3));
        assert_eq!(a.ended(), 7);
        assert_eq!(a.ok_in_window, 2);
        assert_eq!(a.latency_us.len(), 4);
        // An hour is clamped to the histogram's top.
        assert!(a.latency_us.max() >= MAX_LATENCY_US);
    }

    #[test]
    fn report_json_carries_counts_and_quantiles() {
        let mut tally = Tally::new();
        for us in 1..=1000 {
            tally.response(200, Duration::from_micros(us), true);
        }
        let report = Report {
            mode: Mode::Open { rate: 100 },
            url: "http://127.0.0.1:1/".into(),
            connections: 4,
            warmup: Duration::ZERO,
            window: Duration::from_secs(10),
            scheduled: 1010,
            dropped: 10,
            tally,
            lag_us: Some(latency_histogram()),
        };
        let json = report.to_json();
        assert_eq!(json["sent"], 1000);
        assert_eq!(json["ok"], 1000);
        assert_eq!(json["dropped"], 10);
        assert_eq!(json["throughput_ok_per_s"], 100.0);
        assert_eq!(json["latency_us"]["p50"], 500);
        assert_eq!(json["latency_us"]["max"], 1000);
        assert_eq!(json["schedule_lag_us"]["p99"], 0);
        assert!(report.to_string().contains("dropped"));
    }
}
