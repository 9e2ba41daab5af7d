//! Autoscaling policies as the store keeps them, with the autoscaler's memory
//! between decisions ([`ScaleRecord`]) and its latest decision.

use novacron_common::autoscale::{Recommendation, ScaleState};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An autoscaling policy as the controller keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// `metadata.name`.
    pub name: String,
    /// The manifest as applied (YAML); parsed again on load.
    pub source: String,
    /// The file name it came from, for messages.
    pub file: String,
    /// Who applied it.
    pub applied_by: String,
    /// When (Unix ms).
    pub applied_at_unix_ms: u64,
    /// What the autoscaler remembers between decisions.
    #[serde(default)]
    pub scale: ScaleRecord,
    /// The latest decision.
    #[serde(default)]
    pub last_decision: Option<DecisionRecord>,
}

/// The persisted form of the autoscaler's [`ScaleState`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleRecord {
    /// The size last decided.
    pub current: u32,
    /// The last scale-out (Unix ms).
    pub last_scale_out_unix_ms: Option<u64>,
    /// The last scale-in (Unix ms).
    pub last_scale_in_unix_ms: Option<u64>,
    /// Recent recommendations, oldest first (for stabilization).
    pub recommendations: Vec<RecommendationRecord>,
}

/// One remembered recommendation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecommendationRecord {
    /// When (Unix ms).
    pub at_unix_ms: u64,
    /// The size recommended.
    pub size: u32,
}

impl ScaleRecord {
    /// The core's state, at the target's `current` size.
    pub fn state(&self, current: u32) -> ScaleState {
        ScaleState {
            current,
            last_scale_out_ms: self.last_scale_out_unix_ms,
            last_scale_in_ms: self.last_scale_in_unix_ms,
            recommendations: self
                .recommendations
                .iter()
                .map(|r| Recommendation {
                    at_ms: r.at_unix_ms,
                    size: r.size,
                })
                .collect(),
            unit_price_per_hour: None,
        }
    }

    /// What to save of `state`.
    pub fn from_state(state: &ScaleState) -> ScaleRecord {
        ScaleRecord {
            current: state.current,
            last_scale_out_unix_ms: state.last_scale_out_ms,
            last_scale_in_unix_ms: state.last_scale_in_ms,
            recommendations: state
                .recommendations
                .iter()
                .map(|r| RecommendationRecord {
                    at_unix_ms: r.at_ms,
                    size: r.size,
                })
                .collect(),
        }
    }
}

/// A decision as kept and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DecisionRecord {
    /// When (Unix ms).
    pub at_unix_ms: u64,
    /// The size before.
    pub from: u32,
    /// The size decided (equal to `from` when holding).
    pub to: u32,
    /// Why, in one line: `api 4 → 6: cpu 91% over 5m, target 75%`.
    pub explanation: String,
}

impl From<DecisionRecord> for novacron_api::DecisionView {
    fn from(d: DecisionRecord) -> Self {
        novacron_api::DecisionView {
            at_unix_ms: d.at_unix_ms,
            from: d.from,
            to: d.to,
            explanation: d.explanation,
        }
    }
}
