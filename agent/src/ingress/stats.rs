//! The ingress's counters per service, rendered on the agent's `/metrics`:
//! requests by status class, their latency (a histogram, to the answer's head),
//! upstream failures, retries, ejections, answers the ingress gave itself for want
//! of an endpoint, and client connections. Atomics: the data plane never waits on
//! a scrape.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Appends the Prometheus text format of every service's counters to `out`.
pub fn render(services: &[(String, &ServiceStats, Gauges)], node: &str, out: &mut String) {
    if services.is_empty() {
        return;
    }
    let label = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let node = label(node);
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let counter = |out: &mut String,
                   name: &str,
                   help: &str,
                   rows: &mut dyn Iterator<Item = (String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (labels, v) in rows {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    };
    let base = |svc: &str| format!("node=\"{node}\",service=\"{}\"", label(svc));
    counter(
        out,
        "novacron_ingress_requests_total",
        "Requests the ingress answered, by status class.",
        &mut services.iter().flat_map(|(svc, s, _)| {
            let base = base(svc);
            (0..5).map(move |c| (format!("{base},code=\"{}xx\"", c + 1), load(&s.by_class[c])))
        }),
    );
    type Field = fn(&ServiceStats) -> &AtomicU64;
    let simple: [(&str, &str, Field); 5] = [
        (
            "novacron_ingress_upstream_failures_total",
            "Attempts whose endpoint could not be reached or closed before answering.",
            |s| &s.upstream_failures,
        ),
        (
            "novacron_ingress_retries_total",
            "Requests and connections sent again to another endpoint.",
            |s| &s.retries,
        ),
        (
            "novacron_ingress_ejections_total",
            "Endpoints ejected by passive health checks (breaker opened).",
            |s| &s.ejections,
        ),
        (
            "novacron_ingress_no_endpoint_total",
            "Requests and connections no endpoint could take (503 for HTTP).",
            |s| &s.no_endpoint,
        ),
        (
            "novacron_ingress_connections_total",
            "Client connections accepted.",
            |s| &s.connections,
        ),
    ];
    for (name, help, field) in simple {
        counter(
            out,
            name,
            help,
            &mut services
                .iter()
                .map(|(svc, s, _)| (base(svc), load(field(s)))),
        );
    }
    let gauge = |out: &mut String, name: &str, help: &str, rows: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, v) in rows {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    };
    gauge(
        out,
        "novacron_ingress_open_connections",
        "Client connections open now.",
        services
            .iter()
            .map(|(svc, s, _)| (base(svc), load(&s.open_connections)))
            .collect(),
    );
    gauge(
        out,
        "novacron_ingress_endpoints",
        "Endpoints the controller lists for the service.",
        services
            .iter()
            .map(|(svc, _, g)| (base(svc), g.endpoints as u64))
            .collect(),
    );
    gauge(
        out,
        "novacron_ingress_ejected_endpoints",
        "Listed endpoints ejected now.",
        services
            .iter()
            .map(|(svc, _, g)| (base(svc), g.ejected as u64))
            .collect(),
    );
    let name = "novacron_ingress_request_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time from a request to the head of its answer.\n# TYPE {name} histogram"
    );
    for (svc, s, _) in services {
        let base = base(svc);
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += load(&s.buckets[i]);
            let _ = writeln!(out, "{name}_bucket{{{base},le=\"{bound}\"}} {cumulative}");
        }
        let count = load(&s.count);
        let _ = writeln!(out, "{name}_bucket{{{base},le=\"+Inf\"}} {count}");
        let sum = load(&s.sum_micros) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{base}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{base}}} {count}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let s = ServiceStats::default();
        s.request(200, Duration::from_micros(300));
        s.request(503, Duration::from_millis(20));
        s.retry();
        let mut out = String::new();
        render(
            &[(
                "web".into(),
                &s,
                Gauges {
                    endpoints: 2,
                    ejected: 1,
                },
            )],
            "n1",
            &mut out,
        );
        for line in [
            "novacron_ingress_requests_total{node=\"n1\",service=\"web\",code=\"2xx\"} 1",
            "novacron_ingress_requests_total{node=\"n1\",service=\"web\",code=\"5xx\"} 1",
            "novacron_ingress_retries_total{node=\"n1\",service=\"web\"} 1",
            "novacron_ingress_ejected_endpoints{node=\"n1\",service=\"web\"} 1",
            "novacron_ingress_request_duration_seconds_bucket{node=\"n1\",service=\"web\",le=\"0.0005\"} 1",
            "novacron_ingress_request_duration_seconds_bucket{node=\"n1\",service=\"web\",le=\"0.025\"} 2",
            "novacron_ingress_request_duration_seconds_count{node=\"n1\",service=\"web\"} 2",
        ] {
            assert!(out.contains(line), "{line}\n{out}");
        }
    }
}
