//! API tokens: bearer credentials for operators and tools (CI pipelines, Prometheus,
//! dashboards) that cannot hold a client certificate.
//!
//! A token reads `nca_<id>.<secret>` (the `nca_` prefix tells it from a join
//! token); it carries a name and a role like an operator certificate does. The
//! controller stores only an [`ApiTokenRecord`] with the SHA-256 of the secret.
//! Everything here is pure; the time is always a parameter.
//! **Architecture Invariant:** the secret never appears in an error, a log line or
//! a `Debug` output.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use novacron_common::clock::unix_ms;
use novacron_common::pki::{self, Identity, Role};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::state::tokens::{JoinToken, TokenError};

/// The prefix of every API token.
pub const PREFIX: &str = "nca_";
/// The shortest lifetime of an API token.
pub const MIN_TTL: Duration = Duration::from_secs(60);
/// The longest lifetime of an API token (one year).
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// The default lifetime (30 days).
pub const DEFAULT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why an API token was refused or could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiTokenError {
    /// The text is not an API token.
    #[error(
        "malformed API token: {reason}; expected nca_<12 hex digit id>.<32 hex digit secret>, as printed by `novacron-controller admin token`"
    )]
    Malformed {
        /// What is wrong (never the secret).
        reason: String,
    },
    /// No token has this id.
    #[error("unknown API token {id}; create one with `novacron-controller admin token`")]
    Unknown {
        /// The id presented.
        id: String,
    },
    /// The secret does not match.
    #[error("the secret of API token {id} does not match; check that the whole token was copied")]
    WrongSecret {
        /// The token id.
        id: String,
    },
    /// The token expired.
    #[error(
        "API token {id} ({name}) expired at {}; ask an admin for a new one",
        humantime::format_rfc3339_seconds(*.expired_at)
    )]
    Expired {
        /// The token id.
        id: String,
        /// Its name.
        name: String,
        /// When.
        expired_at: SystemTime,
    },
    /// The token was revoked.
    #[error("API token {id} ({name}) has been revoked; ask an admin for a new one")]
    Revoked {
        /// The token id.
        id: String,
        /// Its name.
        name: String,
    },
    /// A token was requested with a lifetime out of range.
    #[error(
        "API token lifetime {} is out of range; use a lifetime between {} and {}",
        humantime::format_duration(*.ttl),
        humantime::format_duration(MIN_TTL),
        humantime::format_duration(MAX_TTL)
    )]
    InvalidTtl {
        /// The rejected lifetime.
        ttl: Duration,
    },
    /// A token was requested for the node role or with a bad name.
    #[error("API token {what}")]
    Invalid {
        /// What is wrong and what is accepted.
        what: String,
    },
}

/// An API token as its holder has it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(JoinToken);

impl ApiToken {
    /// A new random token.
    pub fn generate() -> ApiToken {
        ApiToken(JoinToken::generate())
    }

    /// The public id.
    pub fn id(&self) -> &str {
        self.0.id()
    }

    fn secret(&self) -> &str {
        self.0.secret()
    }
}

impl fmt::Display for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.0)
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiToken")
            .field("id", &self.id())
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl FromStr for ApiToken {
    type Err = ApiTokenError;

    fn from_str(s: &str) -> Result<ApiToken, ApiTokenError> {
        let Some(rest) = s.trim().strip_prefix(PREFIX) else {
            return Err(ApiTokenError::Malformed {
                reason: format!("it does not start with {PREFIX:?}"),
            });
        };
        rest.parse::<JoinToken>()
            .map(ApiToken)
            .map_err(|e| match e {
                TokenError::Malformed { reason } => ApiTokenError::Malformed {
                    reason: reason
                        .split("; expected")
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                },
                other => ApiTokenError::Malformed {
                    reason: other.to_string(),
                },
            })
    }
}

/// What the controller keeps about an API token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenRecord {
    /// The public id.
    pub id: String,
    /// Who or what holds it (`ci`, `prometheus`); the caller's name in events.
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    /// SHA-256 of the secret, lowercase hex.
    pub secret_sha256: String,
    /// When it was created (Unix ms).
    pub created_at_unix_ms: u64,
    /// When it stops being accepted (Unix ms).
    pub expires_at_unix_ms: u64,
    /// Who created it.
    pub created_by: String,
    /// Whether it was revoked.
    #[serde(default)]
    pub revoked: bool,
}

impl ApiTokenRecord {
    /// The record of a new `token` for `name` with `role`, valid for `ttl` from `now`.
    pub fn new(
        token: &ApiToken,
        name: &str,
        role: Role,
        ttl: Duration,
        created_by: &str,
        now: SystemTime,
    ) -> Result<ApiTokenRecord, ApiTokenError> {
        if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
            return Err(ApiTokenError::InvalidTtl { ttl });
        }
        if role == Role::Node {
            return Err(ApiTokenError::Invalid {
                what: "role \"node\" is not accepted; use viewer, operator or admin".into(),
            });
        }
        // The same rules as certificate names, so a token's caller reads like one.
        pki::validate_name(name).map_err(|e| ApiTokenError::Invalid {
            what: format!("name {name:?}: {e}"),
        })?;
        let created = unix_ms(now);
        Ok(ApiTokenRecord {
            id: token.id().to_owned(),
            name: name.to_owned(),
            role: role.as_str().to_owned(),
            secret_sha256: hex::encode(Sha256::digest(token.secret().as_bytes())),
            created_at_unix_ms: created,
            expires_at_unix_ms: created
                .saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
            created_by: created_by.to_owned(),
            revoked: false,
        })
    }
}

/// The identity `token` proves against its stored `record` at `now`, or why not.
/// The secret is checked first and in constant time.
pub fn authenticate(
    record: Option<&ApiTokenRecord>,
    token: &ApiToken,
    now: SystemTime,
) -> Result<Identity, ApiTokenError> {
    let Some(record) = record else {
        return Err(ApiTokenError::Unknown {
            id: token.id().to_owned(),
        });
    };
    let mut stored = [0u8; 32];
    hex::decode_to_slice(&record.secret_sha256, &mut stored).map_err(|_| {
        ApiTokenError::Malformed {
            reason: format!("the stored record of token {} is corrupt", record.id),
        }
    })?;
    let presented: [u8; 32] = Sha256::digest(token.secret().as_bytes()).into();
    let same = stored
        .iter()
        .zip(presented.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0;
    if !same {
        return Err(ApiTokenError::WrongSecret {
            id: record.id.clone(),
        });
    }
    if record.revoked {
        return Err(ApiTokenError::Revoked {
            id: record.id.clone(),
            name: record.name.clone(),
        });
    }
    if unix_ms(now) >= record.expires_at_unix_ms {
        return Err(ApiTokenError::Expired {
            id: record.id.clone(),
            name: record.name.clone(),
            expired_at: UNIX_EPOCH + Duration::from_millis(record.expires_at_unix_ms),
        });
    }
    let role = match record.role.parse::<Role>() {
        Ok(role) if role != Role::Node => role,
        _ => {
            return Err(ApiTokenError::Malformed {
                reason: format!(
                    "the stored role {:?} of token {} is not an operator role",
                    record.role, record.id
                ),
            });
        }
    };
    Ok(Identity {
        name: record.name.clone(),
        role,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn issued(role: Role) -> (ApiToken, ApiTokenRecord) {
        let token = ApiToken::generate();
        let record =
            ApiTokenRecord::new(&token, "ci", role, DEFAULT_TTL, "admin:root", t0()).expect("new");
        (token, record)
    }

    #[test]
    fn round_trips_through_text() {
        let token = ApiToken::generate();
        let text = token.to_string();
        assert!(text.starts_with("nca_"));
        assert_eq!(text.parse::<ApiToken>().expect("parse"), token);
        assert!(!format!("{token:?}").contains(token.secret()));
    }

    #[test]
    fn refuses_join_tokens_and_garbage_without_echoing_secrets() {
        let join = JoinToken::generate().to_string();
        let err = join.parse::<ApiToken>().expect_err("no prefix");
        assert!(err.to_string().contains("nca_"), "{err}");
        let err = "nca_zz.secretsecret".parse::<ApiToken>().expect_err("bad");
        assert!(!err.to_string().contains("secretsecret"), "{err}");
    }

    #[test]
    fn authenticates_the_right_secret_with_its_role() {
        let (token, record) = issued(Role::Operator);
        let id = authenticate(Some(&record), &token, t0()).expect("ok");
        assert_eq!(id.name, "ci");
        assert_eq!(id.role, Role::Operator);
    }

    #[test]
    fn refuses_wrong_secret_expired_revoked_and_unknown() {
        let (token, mut record) = issued(Role::Viewer);
        let other = ApiToken::generate();
        let forged: ApiToken = format!("{PREFIX}{}.{}", token.id(), other.secret())
            .parse()
            .expect("shape");
        assert!(matches!(
            authenticate(Some(&record), &forged, t0()),
            Err(ApiTokenError::WrongSecret { .. })
        ));
        assert!(matches!(
            authenticate(Some(&record), &token, t0() + DEFAULT_TTL),
            Err(ApiTokenError::Expired { .. })
        ));
        record.revoked = true;
        let err = authenticate(Some(&record), &token, t0()).expect_err("revoked");
        assert!(err.to_string().contains("revoked"), "{err}");
        assert!(matches!(
            authenticate(None, &token, t0()),
            Err(ApiTokenError::Unknown { .. })
        ));
    }

    #[test]
    fn creation_limits_name_the_accepted_values() {
        let token = ApiToken::generate();
        let err = ApiTokenRecord::new(
            &token,
            "ci",
            Role::Viewer,
            Duration::from_secs(1),
            "x",
            t0(),
        )
        .expect_err("short");
        assert!(err.to_string().contains("between"), "{err}");
        let err = ApiTokenRecord::new(&token, "ci", Role::Node, DEFAULT_TTL, "x", t0())
            .expect_err("node");
        assert!(
            err.to_string().contains("viewer, operator or admin"),
            "{err}"
        );
    }
}
