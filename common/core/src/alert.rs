//! Alerting: `AlertRule` and `NotificationChannel` manifests, conditions over
//! metrics ([`expr`]), the pending → firing → resolved state machine and the
//! notifications it makes due ([`engine`]), the messages as channels receive
//! them ([`message`]), and the export of rules as a Prometheus rule file
//! ([`export`]). Pure: the controller's alert service gathers the values, keeps
//! the state and the outbox, and sends.

pub mod catalog;
pub mod engine;
pub mod export;
pub mod expr;
pub mod message;
pub mod rule;

pub use engine::{Change, Instance, Notification, Observation, Silence, State, Transition};
pub use expr::{Expr, Subject, ValueRef};
pub use rule::{AlertRule, Channel, Severity, Target, builtin_rules, parse_channels, parse_rules};
