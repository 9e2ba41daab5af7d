//! The ingress's counters per service, rendered on the agent's `/metrics`:
//! requests by status class, their latency (a histogram, to the answer's head),
//! upstream failures, retries, ejections, answers the ingress gave itself for want
//! of an endpoint, and client connections. Atomics: the data plane never waits on
//! a scrape.

use std::sync::atomic::{AtomicU64, Ordering};

use novacron_common::exposition::{Family, Histogram, Labels, Samples};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One service's counters.
#[derive(Debug, Default)]
pub struct ServiceStats {
    by_class: [AtomicU64; 5],
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
    upstream_failures: AtomicU64,
    retries: AtomicU64,
    ejections: AtomicU64,
    no_endpoint: AtomicU64,
    connections: AtomicU64,
    open_connections: AtomicU64,
}

impl ServiceStats {
    /// A request answered with `status` after `took`.
    pub fn request(&self, status: u16, took: Duration) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// An endpoint could not be reached or closed before answering.
    pub fn upstream_failure(&self) {
        self.upstream_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A request or connection went to another endpoint.
    pub fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// An endpoint was ejected.
    pub fn ejection(&self) {
        self.ejections.fetch_add(1, Ordering::Relaxed);
    }

    /// No endpoint could take a request or connection.
    pub fn no_endpoint(&self) {
        self.no_endpoint.fetch_add(1, Ordering::Relaxed);
    }

    /// A client connected.
    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.open_connections.fetch_add(1, Ordering::Relaxed);
    }

    /// A client connection ended.
    pub fn connection_closed(&self) {
        self.open_connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// What [`render`] shows of one service besides its counters.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Endpoints listed by the controller.
    pub endpoints: usize,
    /// Of those, ejected now.
    pub ejected: usize,
}

/// The ingress's families, in the order `/metrics` shows them.
pub static FAMILIES: [Family; 10] = [
    REQUESTS,
    COUNTERS[0].0,
    COUNTERS[1].0,
    COUNTERS[2].0,
    COUNTERS[3].0,
    COUNTERS[4].0,
    COUNTERS[5].0,
    ENDPOINTS,
    EJECTED,
    DURATION,
];

const REQUESTS: Family = Family::counter(
    "novacron_ingress_requests",
    "Requests the ingress answered, by status class.",
);

type Field = fn(&ServiceStats) -> &AtomicU64;

/// The families read straight from one of a service's atomics.
const COUNTERS: [(Family, Field); 6] = [
    (
        Family::counter(
            "novacron_ingress_upstream_failures",
            "Attempts whose endpoint could not be reached or closed before answering.",
        ),
        |s| &s.upstream_failures,
    ),
    (
        Family::counter(
            "novacron_ingress_retries",
            "Requests and connections sent again to another endpoint.",
        ),
        |s| &s.retries,
    ),
    (
        Family::counter(
            "novacron_ingress_ejections",
            "Endpoints ejected by passive health checks (breaker opened).",
        ),
        |s| &s.ejections,
    ),
    (
        Family::counter(
            "novacron_ingress_no_endpoint",
            "Requests and connections no endpoint could take (503 for HTTP).",
        ),
        |s| &s.no_endpoint,
    ),
    (
        Family::counter(
            "novacron_ingress_connections",
            "Client connections accepted.",
        ),
        |s| &s.connections,
    ),
    (
        Family::gauge(
            "novacron_ingress_open_connections",
            "Client connections open now.",
        ),
        |s| &s.open_connections,
    ),
];

const ENDPOINTS: Family = Family::gauge(
    "novacron_ingress_endpoints",
    "Endpoints the controller lists for the service.",
);
const EJECTED: Family = Family::gauge(
    "novacron_ingress_ejected_endpoints",
    "Listed endpoints ejected now.",
);
const DURATION: Family = Family::histogram(
    "novacron_ingress_request_duration_seconds",
    "Time from a request to the head of its answer.",
);

/// Adds every service's samples of [`FAMILIES`] to `out`.
pub fn collect(services: &[(String, &ServiceStats, Gauges)], node: &str, out: &mut Samples) {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    for (svc, s, gauges) in services {
        let base = || -> Labels { vec![("node", node.to_owned()), ("service", svc.clone())] };
        for (c, count) in s.by_class.iter().enumerate() {
            let mut labels = base();
            labels.push(("code", format!("{}xx", c + 1)));
            out.int(&REQUESTS, labels, load(count));
        }
        for (family, field) in &COUNTERS {
            out.int(family, base(), load(field(s)));
        }
        out.int(&ENDPOINTS, base(), gauges.endpoints as u64);
        out.int(&EJECTED, base(), gauges.ejected as u64);
        let count = load(&s.count);
        let mut buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .zip(&s.buckets)
            .map(|(bound, n)| (*bound, load(n)))
            .collect();
        let counted: u64 = buckets.iter().map(|b| b.1).sum();
        buckets.push((f64::INFINITY, count.saturating_sub(counted)));
        out.histogram(
            &DURATION,
            base(),
            Histogram {
                sum: load(&s.sum_micros) as f64 / 1e6,
                count,
                buckets,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_a_cumulative_histogram() {
        let s = ServiceStats::default();
        s.request(200, Duration::from_micros(300));
        s.request(503, Duration::from_millis(20));
        s.retry();
        let mut samples = Samples::default();
        collect(
            &[(
                "web".into(),
                &s,
                Gauges {
                    endpoints: 2,
                    ejected: 1,
                },
            )],
            "n1",
            &mut samples,
        );
        let families: Vec<&Family> = FAMILIES.iter().collect();
        let out = novacron_common::exposition::render_text(&families, samples);
        for line in [
            "novacron_ingress_requests_total{node=\"n1\",service=\"web\",code=\"2xx\"} 1",
            "novacron_ingress_requests_total{node=\"n1\",service=\"web\",code=\"5xx\"} 1",
            "novacron_ingress_retries_total{node=\"n1\",service=\"web\"} 1",
            "novacron_ingress_ejected_endpoints{node=\"n1\",service=\"web\"} 1",
            "novacron_ingress_request_duration_seconds_bucket{le=\"0.0005\",node=\"n1\",service=\"web\"} 1",
            "novacron_ingress_request_duration_seconds_bucket{le=\"0.025\",node=\"n1\",service=\"web\"} 2",
            "novacron_ingress_request_duration_seconds_bucket{le=\"+Inf\",node=\"n1\",service=\"web\"} 2",
            "novacron_ingress_endpoints{node=\"n1\",service=\"web\"} 2",
            "novacron_ingress_request_duration_seconds_count{node=\"n1\",service=\"web\"} 2",
        ] {
            assert!(out.contains(line), "{line}\n{out}");
        }
    }
}
