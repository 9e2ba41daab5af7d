//! The ingress balancer of one service: which endpoint takes the next request or
//! connection. Pure: it holds each endpoint's state and takes `now` and the
//! random draws as parameters; the proxy around it does the I/O.
//!
//! - **Choice:** power of two choices over least outstanding requests: two
//!   distinct endpoints drawn at random among those that may take work, each with
//!   a chance in proportion to its weight, and the one with fewer requests in
//!   flight for its weight wins (ties go to the first draw).
//! - **Passive health and circuit breaker:** each endpoint's breaker is closed
//!   while it answers. [`EJECT_AFTER_GATEWAY_FAILURES`] consecutive failures to
//!   connect or to get an answer, or [`EJECT_AFTER_5XX`] consecutive 5xx answers,
//!   open it (the endpoint is ejected) for [`BASE_EJECTION`] doubled on each
//!   ejection in a row, up to [`MAX_EJECTION`]. When that time ends it is half
//!   open: one trial request; success closes it, failure opens it again for
//!   longer. At most [`MAX_EJECTED_PERCENT`] of a service's endpoints are ejected
//!   at once, and when every endpoint is ejected or busy the balancer still picks
//!   among all (a guess is better than a certain 503).
//! - **Overload:** an endpoint with [`MAX_OUTSTANDING`] requests in flight takes
//!   no more until one ends.
//! - **Draining:** an endpoint the controller no longer lists takes no new work;
//!   its requests in flight finish, then it is forgotten.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use novacron_common::wire::IngressEndpoint;

/// Consecutive connection-level failures that eject an endpoint.
pub const EJECT_AFTER_GATEWAY_FAILURES: u32 = 2;
/// Consecutive 5xx answers that eject an endpoint.
pub const EJECT_AFTER_5XX: u32 = 5;
/// The first ejection's length.
pub const BASE_EJECTION: Duration = Duration::from_secs(5);
/// The longest ejection.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);
/// The most endpoints ejected at once, in percent of the service's (at least one).
pub const MAX_EJECTED_PERCENT: usize = 50;
/// Requests (or connections) in flight to one endpoint before it takes no more.
pub const MAX_OUTSTANDING: u32 = 1024;

/// How one request or connection to an endpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer below 500 (or a TCP connection that was made).
    Success,
    /// A 5xx answer from the endpoint.
    ServerError,
    /// No answer: connect refused or timed out, or the connection closed before
    /// the answer's head.
    GatewayFailure,
}

/// An endpoint's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    /// Takes work.
    Closed,
    /// Ejected until then.
    Open {
        /// When it turns half open.
        until: Instant,
    },
    /// Takes one trial request; `trial` while it is in flight.
    HalfOpen {
        /// A trial is in flight.
        trial: bool,
    },
}

/// One endpoint's state.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The allocation.
    pub alloc: String,
    /// Where it is reached.
    pub address: SocketAddr,
    /// Its share of traffic (at least 1).
    pub weight: u16,
    /// Requests or connections in flight.
    pub outstanding: u32,
    /// Consecutive connection-level failures.
    pub gateway_failures: u32,
    /// Consecutive 5xx answers.
    pub server_errors: u32,
    /// Ejections in a row (reset by a success).
    pub ejections: u32,
    /// The breaker.
    pub breaker: Breaker,
    /// No longer listed: takes no new work.
    pub draining: bool,
}

impl Endpoint {
    fn new(e: &IngressEndpoint) -> Endpoint {
        Endpoint {
            alloc: e.alloc.clone(),
            address: e.address,
            weight: e.weight.max(1),
            outstanding: 0,
            gateway_failures: 0,
            server_errors: 0,
            ejections: 0,
            breaker: Breaker::Closed,
            draining: false,
        }
    }

    /// Turns an open breaker whose time is over half open.
    fn refresh(&mut self, now: Instant) {
        if let Breaker::Open { until } = self.breaker
            && now >= until
        {
            self.breaker = Breaker::HalfOpen { trial: false };
        }
    }

    /// Whether the breaker lets work through.
    fn admits(&self) -> bool {
        match self.breaker {
            Breaker::Closed => self.outstanding < MAX_OUTSTANDING,
            Breaker::Open { .. } => false,
            Breaker::HalfOpen { trial } => !trial,
        }
    }

    fn ejected(&self) -> bool {
        !matches!(self.breaker, Breaker::Closed)
    }
}

/// A pick: the endpoint's key (for [`Balancer::finish`]) and where to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pick {
    /// The endpoint's key.
    pub key: EndpointKey,
    /// Its address.
    pub address: SocketAddr,
    /// Its allocation.
    pub alloc: String,
}

/// An endpoint's identity: its allocation and address (an allocation that moves
/// is a new endpoint).
pub type EndpointKey = (String, SocketAddr);

/// What happened to the endpoints when a result was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Effects {
    /// The endpoint was ejected (its breaker opened).
    pub ejected: bool,
}

/// The balancer of one service.
#[derive(Debug, Clone, Default)]
pub struct Balancer {
    endpoints: BTreeMap<EndpointKey, Endpoint>,
}

impl Balancer {
    /// A balancer over `endpoints`.
    pub fn new(endpoints: &[IngressEndpoint]) -> Balancer {
        let mut b = Balancer::default();
        b.set_endpoints(endpoints);
        b
    }

    /// Replaces the listed endpoints: new ones join closed, listed ones keep
    /// their state, and the others drain (forgotten once nothing is in flight).
    pub fn set_endpoints(&mut self, endpoints: &[IngressEndpoint]) {
        let listed: BTreeMap<EndpointKey, &IngressEndpoint> = endpoints
            .iter()
            .map(|e| ((e.alloc.clone(), e.address), e))
            .collect();
        self.endpoints.retain(|key, e| {
            e.draining = !listed.contains_key(key);
            !e.draining || e.outstanding > 0
        });
        for (key, e) in listed {
            self.endpoints
                .entry(key)
                .or_insert_with(|| Endpoint::new(e))
                .weight = e.weight.max(1);
        }
    }

    /// The endpoints, drained ones with work in flight included.
    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.values()
    }

    /// Endpoints that take new work (listed), ejected or not.
    pub fn listed(&self) -> usize {
        self.endpoints.values().filter(|e| !e.draining).count()
    }

    /// Picks an endpoint for the next request at `now`, avoiding those in
    /// `tried` (earlier attempts of the same request) where another exists.
    /// `draws` are two uniform random numbers. `None` only when no endpoint is
    /// listed (or every listed one was tried). The pick counts as in flight until
    /// [`Balancer::finish`].
    pub fn pick(&mut self, now: Instant, draws: (u64, u64), tried: &[EndpointKey]) -> Option<Pick> {
        let mut admitted: Vec<(&EndpointKey, u32, u16)> = Vec::new();
        let mut fallback: Vec<(&EndpointKey, u32, u16)> = Vec::new();
        for e in self.endpoints.values_mut() {
            e.refresh(now);
        }
        for (key, e) in &self.endpoints {
            if e.draining || tried.contains(key) {
                continue;
            }
            if e.admits() {
                admitted.push((key, e.outstanding, e.weight));
            } else {
                fallback.push((key, e.outstanding, e.weight));
            }
        }
        let pool = if admitted.is_empty() {
            &fallback
        } else {
            &admitted
        };
        let key = match pool.len() {
            0 => return None,
            1 => pool[0].0.clone(),
            _ => {
                let (first, second) = two_weighted(pool, draws);
                let (a, b) = (pool[first], pool[second]);
                // b.outstanding / b.weight < a.outstanding / a.weight
                let busier = |x: (&EndpointKey, u32, u16), y: (&EndpointKey, u32, u16)| {
                    u64::from(x.1) * u64::from(y.2) > u64::from(y.1) * u64::from(x.2)
                };
                if busier(a, b) {
                    b.0.clone()
                } else {
                    a.0.clone()
                }
            }
        };
        let e = self.endpoints.get_mut(&key)?;
        e.outstanding += 1;
        if let Breaker::HalfOpen { trial } = &mut e.breaker {
            *trial = true;
        }
        Some(Pick {
            address: e.address,
            alloc: e.alloc.clone(),
            key,
        })
    }

    /// Records how a pick ended at `now`.
    pub fn finish(&mut self, key: &EndpointKey, now: Instant, outcome: Outcome) -> Effects {
        let total = self.listed();
        let ejected_now = self
            .endpoints
            .values()
            .filter(|e| !e.draining && e.ejected())
            .count();
        let mut effects = Effects::default();
        let Some(e) = self.endpoints.get_mut(key) else {
            return effects;
        };
        e.outstanding = e.outstanding.saturating_sub(1);
        match outcome {
            Outcome::Success => {
                e.gateway_failures = 0;
                e.server_errors = 0;
                if e.ejected() {
                    e.breaker = Breaker::Closed;
                }
                e.ejections = 0;
            }
            Outcome::ServerError | Outcome::GatewayFailure => {
                if outcome == Outcome::ServerError {
                    e.server_errors += 1;
                } else {
                    e.gateway_failures += 1;
                }
                let trial_failed = matches!(e.breaker, Breaker::HalfOpen { .. });
                let tripped = e.gateway_failures >= EJECT_AFTER_GATEWAY_FAILURES
                    || e.server_errors >= EJECT_AFTER_5XX;
                let room = ejected_now < (total * MAX_EJECTED_PERCENT / 100).max(1);
                if trial_failed || (tripped && !e.ejected() && room) {
                    let factor = 1u32 << e.ejections.min(16);
                    let length = BASE_EJECTION.saturating_mul(factor).min(MAX_EJECTION);
                    e.breaker = Breaker::Open {
                        until: now + length,
                    };
                    e.ejections += 1;
                    e.gateway_failures = 0;
                    e.server_errors = 0;
                    effects.ejected = true;
                }
            }
        }
        if e.draining && e.outstanding == 0 {
            self.endpoints.remove(key);
        }
        effects
    }

    /// Ejected endpoints now (breaker not closed), listed ones only.
    pub fn ejected(&self) -> usize {
        self.endpoints
            .values()
            .filter(|e| !e.draining && e.ejected())
            .count()
    }
}

/// Two distinct indexes of `pool` (at least two long), each drawn with a chance
/// in proportion to its weight (the third field): `draws.0` picks the first
/// among all, `draws.1` the second among the rest. Equal weights draw uniformly.
fn two_weighted<K>(pool: &[(K, u32, u16)], draws: (u64, u64)) -> (usize, usize) {
    let n = pool.len() as u64;
    if pool.iter().all(|p| p.2 == pool[0].2) {
        let first = (draws.0 % n) as usize;
        let mut second = (draws.1 % (n - 1)) as usize;
        if second >= first {
            second += 1;
        }
        return (first, second);
    }
    let at = |skip: Option<usize>, draw: u64| -> usize {
        let total: u64 = pool
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != skip)
            .map(|(_, p)| u64::from(p.2.max(1)))
            .sum();
        let mut left = draw % total.max(1);
        for (i, p) in pool.iter().enumerate() {
            if Some(i) == skip {
                continue;
            }
            let w = u64::from(p.2.max(1));
            if left < w {
                return i;
            }
            left -= w;
        }
        pool.len() - 1
    };
    let first = at(None, draws.0);
    (first, at(Some(first), draws.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(n: usize) -> Vec<IngressEndpoint> {
        (0..n)
            .map(|i| IngressEndpoint {
                alloc: format!("a{i}"),
                address: format!("127.0.0.1:{}", 20000 + i).parse().expect("addr"),
                weight: 100,
            })
            .collect()
    }

    #[test]
    fn weights_share_the_picks_and_the_load() {
        let now = Instant::now();
        let mut list = eps(2);
        list[1].weight = 10;
        let mut b = Balancer::new(&list);
        // Idle endpoints: the picks follow the weights (draws cover the range).
        let mut picks = BTreeMap::<String, u32>::new();
        for d in 0..1100u64 {
            let p = b.pick(now, (d, d * 7 + 3), &[]).expect("pick");
            *picks.entry(p.alloc.clone()).or_default() += 1;
            b.finish(&p.key, now, Outcome::Success);
        }
        assert_eq!(picks["a0"], 1000, "{picks:?}");
        assert_eq!(picks["a1"], 100, "{picks:?}");
        // Under load, requests in flight are counted per unit of weight: a0 with
        // 5 in flight (0.05 per unit) still beats a1 with 1 (0.1 per unit).
        let a0 = b
            .endpoints
            .keys()
            .find(|k| k.0 == "a0")
            .expect("a0")
            .clone();
        b.endpoints.get_mut(&a0).expect("a0").outstanding = 5;
        let p = b.pick(now, (0, 0), &[]).expect("a0 drawn first, a1 idle");
        assert_eq!(p.alloc, "a1", "0 in flight beats 5");
        let p = b.pick(now, (0, 0), &[]).expect("again");
        assert_eq!(
            p.alloc, "a0",
            "a1 has 1 of weight 10 in flight; a0 5 of 100"
        );
        // A new weight from the table applies to a listed endpoint.
        list[1].weight = 100;
        b.set_endpoints(&list);
        assert!(b.endpoints().all(|e| e.weight == 100));
    }

    #[test]
    fn two_choices_prefer_the_less_busy_endpoint() {
        let now = Instant::now();
        let mut b = Balancer::new(&eps(2));
        let first = b.pick(now, (0, 0), &[]).expect("pick");
        assert_eq!(first.alloc, "a0");
        // a0 has one in flight: whatever the draws, a1 wins now.
        for draws in [(0, 0), (1, 0), (7, 3)] {
            let p = b.pick(now, draws, &[]).expect("pick");
            assert_eq!(p.alloc, "a1");
            b.finish(&p.key, now, Outcome::Success);
        }
    }

    #[test]
    fn failures_eject_then_half_open_admits_one_trial() {
        let t0 = Instant::now();
        let mut b = Balancer::new(&eps(2));
        let a0 = ("a0".to_string(), "127.0.0.1:20000".parse().expect("addr"));
        for _ in 0..EJECT_AFTER_GATEWAY_FAILURES {
            let p = b.pick(t0, (0, 0), &[]).expect("pick");
            assert_eq!(p.key, a0);
            b.finish(&p.key, t0, Outcome::GatewayFailure);
        }
        assert_eq!(b.ejected(), 1);
        for draws in [(0, 0), (1, 0), (5, 9)] {
            let p = b.pick(t0, draws, &[]).expect("pick");
            assert_eq!(p.alloc, "a1", "an ejected endpoint takes no work");
            b.finish(&p.key, t0, Outcome::Success);
        }
        // After the ejection: one trial at a time.
        let later = t0 + BASE_EJECTION;
        let trial = b.pick(later, (0, 0), &[]).expect("pick");
        assert_eq!(trial.alloc, "a0");
        for draws in [(0, 0), (1, 0)] {
            let p = b.pick(later, draws, &[]).expect("pick");
            assert_eq!(p.alloc, "a1", "one trial in flight");
            b.finish(&p.key, later, Outcome::Success);
        }
        // The trial fails: open again, for twice as long.
        assert!(b.finish(&trial.key, later, Outcome::GatewayFailure).ejected);
        let p = b.pick(later + BASE_EJECTION, (0, 0), &[]).expect("pick");
        assert_eq!(p.alloc, "a1", "still ejected after one base ejection");
        b.finish(&p.key, later, Outcome::Success);
        let trial = b
            .pick(later + BASE_EJECTION * 2, (0, 0), &[])
            .expect("pick");
        assert_eq!(trial.alloc, "a0");
        b.finish(&trial.key, later + BASE_EJECTION * 2, Outcome::Success);
        assert_eq!(b.ejected(), 0, "a successful trial closes the breaker");
    }

    #[test]
    fn at_most_half_are_ejected_and_all_ejected_still_serve() {
        let now = Instant::now();
        let mut b = Balancer::new(&eps(2));
        for alloc in ["a0", "a1"] {
            let key = (
                alloc.to_string(),
                b.endpoints.keys().find(|k| k.0 == alloc).expect("key").1,
            );
            for _ in 0..EJECT_AFTER_GATEWAY_FAILURES {
                b.endpoints.get_mut(&key).expect("ep").outstanding += 1;
                b.finish(&key, now, Outcome::GatewayFailure);
            }
        }
        assert_eq!(b.ejected(), 1, "one of two at most");
        let mut one = Balancer::new(&eps(1));
        let key = one.endpoints.keys().next().expect("key").clone();
        for _ in 0..EJECT_AFTER_GATEWAY_FAILURES {
            one.endpoints.get_mut(&key).expect("ep").outstanding += 1;
            one.finish(&key, now, Outcome::GatewayFailure);
        }
        assert_eq!(one.ejected(), 1);
        assert!(
            one.pick(now, (0, 0), &[]).is_some(),
            "a guess beats a certain 503"
        );
    }

    #[test]
    fn retries_avoid_tried_endpoints() {
        let now = Instant::now();
        let mut b = Balancer::new(&eps(3));
        let first = b.pick(now, (0, 1), &[]).expect("pick");
        let second = b
            .pick(now, (0, 1), std::slice::from_ref(&first.key))
            .expect("pick");
        assert_ne!(first.key, second.key);
        let third = b
            .pick(now, (0, 1), &[first.key.clone(), second.key.clone()])
            .expect("pick");
        assert!(third.key != first.key && third.key != second.key);
        assert!(
            b.pick(now, (0, 1), &[first.key, second.key, third.key])
                .is_none()
        );
    }

    #[test]
    fn removed_endpoints_drain_then_go() {
        let now = Instant::now();
        let mut b = Balancer::new(&eps(2));
        let p = b.pick(now, (1, 0), &[]).expect("pick");
        assert_eq!(p.alloc, "a1");
        b.set_endpoints(&eps(1));
        assert_eq!(
            b.endpoints().count(),
            2,
            "a1 drains with a request in flight"
        );
        for draws in [(0, 0), (1, 0)] {
            let q = b.pick(now, draws, &[]).expect("pick");
            assert_eq!(q.alloc, "a0", "a draining endpoint takes no new work");
            b.finish(&q.key, now, Outcome::Success);
        }
        b.finish(&p.key, now, Outcome::Success);
        assert_eq!(b.endpoints().count(), 1, "forgotten once idle");
        b.set_endpoints(&[]);
        assert!(b.pick(now, (0, 0), &[]).is_none());
    }

    #[test]
    fn a_busy_endpoint_takes_no_more_than_its_limit() {
        let now = Instant::now();
        let mut b = Balancer::new(&eps(2));
        let key = b.endpoints.keys().next().expect("key").clone();
        b.endpoints.get_mut(&key).expect("ep").outstanding = MAX_OUTSTANDING;
        for draws in [(0, 0), (0, 5), (3, 1)] {
            let p = b.pick(now, draws, &[]).expect("pick");
            assert_ne!(p.key, key);
        }
    }
}
