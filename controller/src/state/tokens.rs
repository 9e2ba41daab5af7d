//! Join tokens: the one-time secrets an agent presents to enroll.
//!
//! A token reads `<id>.<secret>`: 12 lowercase hex digits of public id (it names the
//! token in lists and logs), a dot, then 32 lowercase hex digits of secret. The
//! controller keeps only a [`TokenRecord`], which holds the SHA-256 of the secret, so a
//! copy of the store does not let anyone enroll.
//!
//! Everything here is pure: no I/O, and the time is always the `now` parameter.
//! **Architecture Invariant:** the secret part of a token never appears in an error
//! message, a log line or a `Debug` output; only the id does.

use std::fmt;
use std::fmt::Write as _;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use novacron_common::clock::unix_ms;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The number of hex digits of a token id (6 random bytes).
pub const ID_LEN: usize = 12;
/// The number of hex digits of a token secret (16 random bytes).
pub const SECRET_LEN: usize = 32;
/// The shortest lifetime a token may be created with.
pub const MIN_TTL: Duration = Duration::from_secs(60);
/// The longest lifetime a token may be created with (30 days).
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// A sensible default lifetime for a new token (24 hours).
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// The fewest enrollments a token may allow.
pub const MIN_USES: u32 = 1;
/// The most enrollments a token may allow.
pub const MAX_USES: u32 = 10_000;
/// A sensible default number of uses for a new token.
pub const DEFAULT_USES: u32 = 1;

/// What the token text should look like, for error messages.
const EXPECTED_FORM: &str =
    "<12 hex digit id>.<32 hex digit secret>, as printed by `novacron-controller token create`";

/// Why a token was refused, could not be parsed, or could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token's lifetime is over.
    #[error(
        "join token {id} has expired (at {}); create a new one with `novacron-controller token create`",
        display_time(.expired_at)
    )]
    Expired {
        /// The token id.
        id: String,
        /// When it expired.
        expired_at: SystemTime,
    },
    /// The token has been used as many times as it allows.
    #[error(
        "join token {id} has no uses left; create a new one with `novacron-controller token create`"
    )]
    UsedUp {
        /// The token id.
        id: String,
    },
    /// The secret does not match the token's stored hash.
    #[error(
        "the secret of join token {id} does not match; check that the whole token was copied, or create a new one with `novacron-controller token create`"
    )]
    WrongSecret {
        /// The token id.
        id: String,
    },
    /// No token with this id exists (it was never created, or the store was replaced).
    #[error(
        "no join token with id {id} exists; create one with `novacron-controller token create`"
    )]
    Unknown {
        /// The token id that was presented.
        id: String,
    },
    /// The token text (or a stored record) does not have the expected shape.
    #[error("malformed join token: {reason}")]
    Malformed {
        /// What is wrong, and what was expected. Never contains the secret.
        reason: String,
    },
    /// A token was requested with a lifetime outside [`MIN_TTL`]..=[`MAX_TTL`].
    #[error(
        "join token lifetime {} is out of range; use a lifetime between {} and {}",
        humantime::format_duration(*.ttl),
        humantime::format_duration(MIN_TTL),
        humantime::format_duration(MAX_TTL)
    )]
    InvalidTtl {
        /// The rejected lifetime.
        ttl: Duration,
    },
    /// A token was requested with a use count outside [`MIN_USES`]..=[`MAX_USES`].
    #[error(
        "join token uses {uses} is out of range; use a number between {MIN_USES} and {MAX_USES}"
    )]
    InvalidUses {
        /// The rejected use count.
        uses: u32,
    },
}

/// A join token as the operator and the agent hold it: `<id>.<secret>`.
///
/// The fields are private so that every value has the exact shape; build one with
/// [`JoinToken::generate`] or parse it with [`str::parse`]. `Debug` hides the secret;
/// `Display` shows the whole token (it is what the operator copies).
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    id: String,
    secret: String,
}

impl JoinToken {
    /// Makes a new random token from the thread-local CSPRNG.
    pub fn generate() -> JoinToken {
        let id: [u8; ID_LEN / 2] = rand::random();
        let secret: [u8; SECRET_LEN / 2] = rand::random();
        JoinToken {
            id: hex::encode(id),
            secret: hex::encode(secret),
        }
    }

    /// The public id (12 lowercase hex digits).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The secret (32 lowercase hex digits). Do not log it.
    pub fn secret(&self) -> &str {
        &self.secret
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.id, self.secret)
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl FromStr for JoinToken {
    type Err = TokenError;

    /// Parses `<id>.<secret>`. Surrounding whitespace (a trailing newline from a file)
    /// is ignored; anything else must match exactly, in lowercase hex.
    fn from_str(s: &str) -> Result<JoinToken, TokenError> {
        let s = s.trim();
        let malformed = |what: String| TokenError::Malformed {
            reason: format!("{what}; expected {EXPECTED_FORM}"),
        };
        let Some((id, secret)) = s.split_once('.') else {
            return Err(malformed(format!(
                "the {}-character input has no '.' between id and secret",
                s.chars().count()
            )));
        };
        if !is_lower_hex(id, ID_LEN) {
            // The id part is not echoed: a token pasted the wrong way round would put
            // the secret here.
            return Err(malformed(format!(
                "the id part ({} characters before the '.') is not {ID_LEN} lowercase hex digits",
                id.chars().count()
            )));
        }
        if !is_lower_hex(secret, SECRET_LEN) {
            return Err(malformed(format!(
                "the secret part of token {id} ({} characters after the '.') is not {SECRET_LEN} lowercase hex digits",
                secret.chars().count()
            )));
        }
        Ok(JoinToken {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }
}

/// What the controller stores about a token: never the secret, only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The token id.
    pub id: String,
    /// SHA-256 of the secret, lowercase hex.
    pub secret_sha256: String,
    /// When the token was created, Unix milliseconds.
    pub created_at_unix_ms: u64,
    /// When the token stops being accepted, Unix milliseconds.
    pub expires_at_unix_ms: u64,
    /// How many more enrollments it allows.
    pub uses_left: u32,
    /// Free text from the operator (what the token is for).
    pub description: String,
}

impl TokenRecord {
    /// The record of a freshly generated `token`, valid from `now` for `ttl` and for
    /// `uses` enrollments. Refuses a `ttl` or `uses` outside the limits.
    pub fn new(
        token: &JoinToken,
        ttl: Duration,
        uses: u32,
        description: impl Into<String>,
        now: SystemTime,
    ) -> Result<TokenRecord, TokenError> {
        check_limits(ttl, uses)?;
        let created = unix_ms(now);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        Ok(TokenRecord {
            id: token.id.clone(),
            secret_sha256: hex::encode(Sha256::digest(token.secret.as_bytes())),
            created_at_unix_ms: created,
            expires_at_unix_ms: created.saturating_add(ttl_ms),
            uses_left: uses,
            description: description.into(),
        })
    }

    /// When the token stops being accepted.
    pub fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.expires_at_unix_ms)
    }

    /// Whether the token has expired at `now`.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        unix_ms(now) >= self.expires_at_unix_ms
    }
}

/// Checks the creation limits: `ttl` in [`MIN_TTL`]..=[`MAX_TTL`] and `uses` in
/// [`MIN_USES`]..=[`MAX_USES`]. [`TokenRecord::new`] calls it; a CLI may call it
/// first to report a bad flag before doing anything else.
pub fn check_limits(ttl: Duration, uses: u32) -> Result<(), TokenError> {
    if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
        return Err(TokenError::InvalidTtl { ttl });
    }
    if !(MIN_USES..=MAX_USES).contains(&uses) {
        return Err(TokenError::InvalidUses { uses });
    }
    Ok(())
}

/// Whether `secret` is accepted by `record` at `now`. It does not change the record;
/// the caller decrements `uses_left` (see `Store::consume_token`).
///
/// The secret is checked first, so someone without it learns nothing about the
/// token's state; its hash is compared in constant time.
pub fn check(record: &TokenRecord, secret: &str, now: SystemTime) -> Result<(), TokenError> {
    let mut stored = [0u8; 32];
    hex::decode_to_slice(&record.secret_sha256, &mut stored).map_err(|_| {
        TokenError::Malformed {
            reason: format!(
                "the stored record of token {} has a secret hash that is not 64 hex digits; recreate the token",
                record.id
            ),
        }
    })?;
    let presented: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    if !constant_time_eq(&stored, &presented) {
        return Err(TokenError::WrongSecret {
            id: record.id.clone(),
        });
    }
    if record.is_expired(now) {
        return Err(TokenError::Expired {
            id: record.id.clone(),
            expired_at: record.expires_at(),
        });
    }
    if record.uses_left == 0 {
        return Err(TokenError::UsedUp {
            id: record.id.clone(),
        });
    }
    Ok(())
}

/// Milliseconds since the Unix epoch; 0 before it, saturating far after it.
/// RFC 3339 (seconds) when representable, otherwise Unix milliseconds.
fn display_time(t: &SystemTime) -> String {
    let Ok(since_epoch) = t.duration_since(UNIX_EPOCH) else {
        return "before 1970".to_owned();
    };
    let mut out = String::new();
    // humantime's Display fails (it does not panic) after year 9999.
    if write!(out, "{}", humantime::format_rfc3339_seconds(*t)).is_ok() {
        out
    } else {
        format!("unix time {} ms", since_epoch.as_millis())
    }
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Compares without an early exit, so the time taken does not depend on where the
/// inputs differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| std::hint::black_box(acc | (x ^ y)));
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn record(token: &JoinToken, uses: u32) -> TokenRecord {
        TokenRecord::new(token, Duration::from_secs(3600), uses, "test", t0())
            .expect("limits are valid")
    }

    #[test]
    fn generated_token_has_the_documented_shape() {
        let token = JoinToken::generate();
        assert_eq!(token.id().len(), ID_LEN);
        assert_eq!(token.secret().len(), SECRET_LEN);
        let text = token.to_string();
        assert_eq!(text, format!("{}.{}", token.id(), token.secret()));
        let parsed: JoinToken = text.parse().expect("a generated token parses");
        assert_eq!(parsed, token);
        assert_ne!(JoinToken::generate(), token, "tokens are random");
    }

    #[test]
    fn parse_ignores_surrounding_whitespace() {
        let token = JoinToken::generate();
        let parsed: JoinToken = format!("  {token}\n").parse().expect("trimmed");
        assert_eq!(parsed, token);
    }

    #[test]
    fn parse_errors_show_the_form_but_never_the_secret() {
        let secret = "0123456789abcdef0123456789abcdef";
        let cases = [
            secret.to_owned(),                                 // no dot
            format!("{secret}.abcdefabcdef"),                  // swapped
            format!("abcdefabcdef.{}", &secret[..31]),         // short secret
            format!("abcdefabcdef.{}", secret.to_uppercase()), // uppercase
            format!("abcdefabcdeg.{secret}"),                  // non-hex id
            format!("abcdefabcdef.{secret}.x"),                // extra part
            String::new(),
        ];
        for input in cases {
            let err = input
                .parse::<JoinToken>()
                .expect_err("malformed input is refused");
            let msg = err.to_string();
            assert!(matches!(err, TokenError::Malformed { .. }), "{msg}");
            assert!(
                msg.contains("<12 hex digit id>.<32 hex digit secret>"),
                "{msg}"
            );
            assert!(
                !msg.to_lowercase().contains(&secret[..16]),
                "secret leaked: {msg}"
            );
        }
    }

    #[test]
    fn secret_error_names_the_id() {
        let err = "abcdefabcdef.xyz"
            .parse::<JoinToken>()
            .expect_err("short secret");
        assert!(err.to_string().contains("abcdefabcdef"), "{err}");
        assert!(err.to_string().contains("3 characters"), "{err}");
    }

    #[test]
    fn debug_hides_the_secret() {
        let token = JoinToken::generate();
        let debug = format!("{token:?}");
        assert!(debug.contains(token.id()));
        assert!(!debug.contains(token.secret()));
    }

    #[test]
    fn record_stores_only_the_hash() {
        let token = JoinToken::generate();
        let rec = record(&token, 3);
        assert_eq!(rec.id, token.id());
        assert_eq!(rec.secret_sha256.len(), 64);
        assert!(!rec.secret_sha256.contains(token.secret()));
        assert_eq!(rec.created_at_unix_ms, 1_700_000_000_000);
        assert_eq!(rec.expires_at_unix_ms, 1_700_003_600_000);
        assert_eq!(rec.uses_left, 3);
        assert_eq!(rec.description, "test");
        let json = serde_json::to_string(&rec).expect("serializes");
        assert!(!json.contains(token.secret()));
        let back: TokenRecord = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, rec);
    }

    #[test]
    fn check_accepts_the_right_secret_until_expiry() {
        let token = JoinToken::generate();
        let rec = record(&token, 1);
        assert_eq!(check(&rec, token.secret(), t0()), Ok(()));
        let just_before = t0() + Duration::from_secs(3600) - Duration::from_millis(1);
        assert_eq!(check(&rec, token.secret(), just_before), Ok(()));
    }

    #[test]
    fn check_refuses_an_expired_token() {
        let token = JoinToken::generate();
        let rec = record(&token, 1);
        let at_expiry = t0() + Duration::from_secs(3600);
        let err = check(&rec, token.secret(), at_expiry).expect_err("expired");
        assert_eq!(
            err,
            TokenError::Expired {
                id: token.id().to_owned(),
                expired_at: at_expiry,
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("2023-11-14T23:13:20Z"), "{msg}");
        assert!(msg.contains("novacron-controller token create"), "{msg}");
    }

    #[test]
    fn check_refuses_a_used_up_token() {
        let token = JoinToken::generate();
        let mut rec = record(&token, 1);
        rec.uses_left = 0;
        assert_eq!(
            check(&rec, token.secret(), t0()),
            Err(TokenError::UsedUp {
                id: token.id().to_owned()
            })
        );
    }

    #[test]
    fn check_refuses_a_wrong_secret_before_revealing_state() {
        let token = JoinToken::generate();
        let other = JoinToken::generate();
        let mut rec = record(&token, 1);
        let wrong = Err(TokenError::WrongSecret {
            id: token.id().to_owned(),
        });
        assert_eq!(check(&rec, other.secret(), t0()), wrong);
        assert_eq!(check(&rec, "", t0()), wrong);
        rec.uses_left = 0;
        assert_eq!(check(&rec, other.secret(), t0() + MAX_TTL), wrong);
    }

    #[test]
    fn check_reports_a_corrupt_stored_hash() {
        let token = JoinToken::generate();
        let mut rec = record(&token, 1);
        rec.secret_sha256 = "zz".into();
        let err = check(&rec, token.secret(), t0()).expect_err("corrupt");
        assert!(matches!(err, TokenError::Malformed { .. }));
        assert!(err.to_string().contains(token.id()));
    }

    #[test]
    fn limits_accept_the_bounds_and_refuse_beyond() {
        let token = JoinToken::generate();
        for (ttl, uses) in [
            (MIN_TTL, MIN_USES),
            (MAX_TTL, MAX_USES),
            (DEFAULT_TTL, DEFAULT_USES),
        ] {
            TokenRecord::new(&token, ttl, uses, "", t0()).expect("within limits");
        }
        let short = MIN_TTL - Duration::from_millis(1);
        let long = MAX_TTL + Duration::from_secs(1);
        for ttl in [Duration::ZERO, short, long] {
            let err = TokenRecord::new(&token, ttl, 1, "", t0()).expect_err("bad ttl");
            assert_eq!(err, TokenError::InvalidTtl { ttl });
            let msg = err.to_string();
            assert!(msg.contains("between 1m and 30days"), "{msg}");
            assert!(
                msg.contains(&humantime::format_duration(ttl).to_string()),
                "{msg}"
            );
        }
        for uses in [0, MAX_USES + 1] {
            let err = TokenRecord::new(&token, MIN_TTL, uses, "", t0()).expect_err("bad uses");
            assert_eq!(err, TokenError::InvalidUses { uses });
            let msg = err.to_string();
            assert!(msg.contains(&uses.to_string()), "{msg}");
            assert!(msg.contains("between 1 and 10000"), "{msg}");
        }
    }

    #[test]
    fn unknown_error_says_what_to_do() {
        let msg = TokenError::Unknown {
            id: "abcdefabcdef".into(),
        }
        .to_string();
        assert!(msg.contains("abcdefabcdef"));
        assert!(msg.contains("token create"));
    }

    #[test]
    fn times_out_of_rfc3339_range_still_display() {
        let far = UNIX_EPOCH + Duration::from_millis(u64::MAX);
        assert!(display_time(&far).starts_with("unix time "));
        assert_eq!(display_time(&UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }
}
