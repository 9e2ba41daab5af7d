//! Node liveness as a pure function of connection state and time.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Default QUIC keep-alive interval on the agent link.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_millis(500);
/// Default QUIC idle timeout: a silent peer is disconnected after this long.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_millis(2000);
/// Default time a node stays `disconnected` before it is `down`.
pub const DEFAULT_DOWN_AFTER: Duration = Duration::from_millis(800);

/// The liveness of a node as the controller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum NodeStatus {
    /// Connected.
    Ready,
    /// Not connected, for less than the down threshold.
    Disconnected,
    /// Not connected for at least the down threshold; its work is to be moved.
    Down,
}

impl std::fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeStatus::Ready => "ready",
            NodeStatus::Disconnected => "disconnected",
            NodeStatus::Down => "down",
        })
    }
}

/// Liveness thresholds. With the defaults a dead agent (no packets at all) is
/// `down` at most `keep_alive + idle_timeout + down_after` = 3.3 s after its last
/// packet, so within 3 s of its death plus the last keep-alive period at worst;
/// a graceful disconnect is noticed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Liveness {
    /// QUIC keep-alive interval.
    #[serde(with = "humantime_serde_compat")]
    pub keep_alive: Duration,
    /// QUIC idle timeout.
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// Time from disconnect to `down`.
    #[serde(with = "humantime_serde_compat")]
    pub down_after: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            keep_alive: DEFAULT_KEEP_ALIVE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            down_after: DEFAULT_DOWN_AFTER,
        }
    }
}

/// The status of a node: `connected` now, or disconnected since `since`.
pub fn node_status(
    connected: bool,
    since: Instant,
    now: Instant,
    down_after: Duration,
) -> NodeStatus {
    if connected {
        NodeStatus::Ready
    } else if now.saturating_duration_since(since) >= down_after {
        NodeStatus::Down
    } else {
        NodeStatus::Disconnected
    }
}

/// Durations as milliseconds in serialized form.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis().try_into().unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_then_disconnected_then_down() {
        let t0 = Instant::now();
        let down = Duration::from_secs(1);
        assert_eq!(
            node_status(true, t0, t0 + down * 5, down),
            NodeStatus::Ready
        );
        assert_eq!(
            node_status(false, t0, t0 + down / 2, down),
            NodeStatus::Disconnected
        );
        assert_eq!(node_status(false, t0, t0 + down, down), NodeStatus::Down);
    }

    #[test]
    fn defaults_notice_a_dead_agent_quickly() {
        let l = Liveness::default();
        assert!(l.idle_timeout + l.down_after <= Duration::from_secs(3));
        assert!(l.keep_alive < l.idle_timeout / 2);
    }
}
