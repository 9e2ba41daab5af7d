//! Dashboard sessions, kept in memory only: a random 256-bit id (the cookie)
//! maps to who logged in, which API token they logged in with, the per-session
//! CSRF token of their forms and the expiry. The API token itself is never kept
//! here, never put in the cookie and never in a URL.
//!
//! Pure apart from the ids' randomness: every method takes `now`, so expiry and
//! the bound are tested without a clock.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use axum::http::HeaderMap;
use novacron_common::pki::Identity;
use novacron_common::sync::lock;

/// The session cookie. The `__Host-` prefix makes browsers refuse it unless it is
/// `Secure`, has `Path=/` and no `Domain`: no other host and no plain-HTTP page
/// can set or shadow it.
pub const COOKIE: &str = "__Host-novacron_session";
/// How long a session lasts at most (less when its API token expires sooner).
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The most sessions kept at once; logging in past it drops the expired ones,
/// then the oldest.
pub const MAX_SESSIONS: usize = 10_000;

/// A session's id: 32 random bytes, written as 64 hex digits in the cookie.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SessionId([u8; 32]);

impl SessionId {
    /// A fresh id from the operating system's cryptographic generator (through
    /// `rand`'s thread-local ChaCha, seeded from it).
    pub fn generate() -> SessionId {
        SessionId(rand::random())
    }

    /// The id a cookie value names, if it is 64 hex digits.
    pub fn parse(text: &str) -> Option<SessionId> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(SessionId(bytes))
    }

    /// The cookie value.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// Never printed: the id is a credential.
impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionId(..)")
    }
}

/// What a session holds.
#[derive(Clone, PartialEq, Eq)]
pub struct Session {
    /// Who logged in (the API token's holder and role).
    pub identity: Identity,
    /// The id of the API token they logged in with: revoking it ends the session.
    pub token_id: String,
    /// The token every form of this session carries (64 hex digits).
    pub csrf: String,
    /// When it was created.
    pub created: SystemTime,
    /// When it ends.
    pub expires: SystemTime,
    /// A message for the next page (what the last action did), shown once.
    pub flash: Option<String>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("identity", &self.identity)
            .field("token_id", &self.token_id)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// The sessions of this controller (in memory: a restart logs everyone out).
#[derive(Debug)]
pub struct Sessions {
    map: Mutex<HashMap<SessionId, Session>>,
    max: usize,
    ttl: Duration,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions::new(MAX_SESSIONS, SESSION_TTL)
    }
}

impl Sessions {
    /// A store of at most `max` sessions, each lasting at most `ttl`.
    pub fn new(max: usize, ttl: Duration) -> Sessions {
        Sessions {
            map: Mutex::new(HashMap::new()),
            max: max.max(1),
            ttl,
        }
    }

    /// Starts a session for `identity`, who presented API token `token_id`
    /// (expiring at `token_expires`): it ends at `now` + the TTL or with the
    /// token, whichever comes first.
    pub fn create(
        &self,
        identity: Identity,
        token_id: &str,
        token_expires: SystemTime,
        now: SystemTime,
    ) -> (SessionId, Session) {
        let id = SessionId::generate();
        let session = Session {
            identity,
            token_id: token_id.to_owned(),
            csrf: hex::encode(rand::random::<[u8; 32]>()),
            created: now,
            expires: (now + self.ttl).min(token_expires),
            flash: None,
        };
        let mut map = lock(&self.map);
        if map.len() >= self.max {
            map.retain(|_, s| s.expires > now);
        }
        while map.len() >= self.max {
            let oldest = map
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(old) => map.remove(&old),
                None => break,
            };
        }
        map.insert(id.clone(), session.clone());
        (id, session)
    }

    /// The live session `id`, if any (an expired one is dropped).
    pub fn get(&self, id: &SessionId, now: SystemTime) -> Option<Session> {
        let mut map = lock(&self.map);
        match map.get(id) {
            Some(s) if s.expires > now => Some(s.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    /// Ends session `id` (logout, or its token was revoked).
    pub fn remove(&self, id: &SessionId) {
        lock(&self.map).remove(id);
    }

    /// Leaves `message` for the session's next page.
    pub fn flash(&self, id: &SessionId, message: String) {
        if let Some(s) = lock(&self.map).get_mut(id) {
            s.flash = Some(message);
        }
    }

    /// Takes the message left for this page, if any.
    pub fn take_flash(&self, id: &SessionId) -> Option<String> {
        lock(&self.map).get_mut(id).and_then(|s| s.flash.take())
    }

    /// Sessions kept (expired ones included until they are next touched).
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    /// Whether none are kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether `presented` is the session's CSRF token, compared in constant time.
pub fn csrf_matches(session: &Session, presented: &str) -> bool {
    let (a, b) = (session.csrf.as_bytes(), presented.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `Set-Cookie` value that hands session `id` to the browser until
/// `expires`: never readable by scripts, only over HTTPS, only on same-site
/// requests.
pub fn set_cookie(id: &SessionId, now: SystemTime, expires: SystemTime) -> String {
    let max_age = expires.duration_since(now).unwrap_or_default().as_secs();
    format!(
        "{COOKIE}={}; Max-Age={max_age}; Path=/; Secure; HttpOnly; SameSite=Strict",
        id.to_hex()
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Max-Age=0; Path=/; Secure; HttpOnly; SameSite=Strict")
}

/// The session id the request's `Cookie` headers carry, if any.
pub fn from_cookies(headers: &HeaderMap) -> Option<SessionId> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .and_then(|(_, value)| SessionId::parse(value.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use novacron_common::pki::Role;

    fn alice() -> Identity {
        Identity {
            name: "alice".into(),
            role: Role::Operator,
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    const FAR: u64 = 365 * 24 * 3600;

    #[test]
    fn a_session_ends_at_its_ttl_or_with_its_token() {
        let s = Sessions::new(10, Duration::from_secs(100));
        let (id, session) = s.create(alice(), "t1", at(FAR), at(0));
        assert_eq!(session.expires, at(100));
        assert_eq!(s.get(&id, at(99)).map(|s| s.identity), Some(alice()));
        assert!(s.get(&id, at(100)).is_none(), "expired at its TTL");
        assert!(s.is_empty(), "an expired session is dropped when touched");

        // A token that expires first ends the session with it.
        let (id, session) = s.create(alice(), "t2", at(30), at(0));
        assert_eq!(session.expires, at(30));
        assert!(s.get(&id, at(29)).is_some());
        assert!(s.get(&id, at(30)).is_none());
    }

    #[test]
    fn the_store_is_bounded_dropping_expired_then_oldest() {
        let s = Sessions::new(3, Duration::from_secs(100));
        let (first, _) = s.create(alice(), "t", at(FAR), at(0));
        let (second, _) = s.create(alice(), "t", at(FAR), at(1));
        let (third, _) = s.create(alice(), "t", at(FAR), at(2));
        // Full: the oldest goes.
        let (fourth, _) = s.create(alice(), "t", at(FAR), at(3));
        assert_eq!(s.len(), 3);
        assert!(s.get(&first, at(4)).is_none());
        for id in [&second, &third, &fourth] {
            assert!(s.get(id, at(4)).is_some());
        }
        // Full with expired ones: they go, the live ones stay.
        let (fifth, _) = s.create(alice(), "t", at(FAR), at(101));
        assert!(s.get(&second, at(101)).is_none());
        assert!(s.get(&fourth, at(101)).is_some());
        assert!(s.get(&fifth, at(101)).is_some());
        assert!(s.len() <= 3);
    }

    #[test]
    fn ids_and_csrf_tokens_are_random_and_compared_exactly() {
        let s = Sessions::default();
        let (a, sa) = s.create(alice(), "t", at(FAR), at(0));
        let (b, sb) = s.create(alice(), "t", at(FAR), at(0));
        assert_ne!(a, b);
        assert_ne!(sa.csrf, sb.csrf);
        assert_eq!(sa.csrf.len(), 64);
        assert!(csrf_matches(&sa, &sa.csrf));
        assert!(!csrf_matches(&sa, &sb.csrf));
        assert!(!csrf_matches(&sa, ""));
        assert!(!csrf_matches(&sa, &sa.csrf[..63]));
        assert_eq!(SessionId::parse(&a.to_hex()), Some(a.clone()));
        assert!(SessionId::parse("not hex").is_none());
        assert!(!format!("{a:?}{sa:?}").contains(&a.to_hex()));
        assert!(!format!("{sa:?}").contains(&sa.csrf));
    }

    #[test]
    fn the_cookie_is_secure_http_only_and_strict() {
        let id = SessionId::generate();
        let c = set_cookie(&id, at(0), at(60));
        assert!(c.starts_with(&format!("{COOKIE}={};", id.to_hex())));
        for part in [
            "Max-Age=60",
            "Path=/",
            "Secure",
            "HttpOnly",
            "SameSite=Strict",
        ] {
            assert!(c.split("; ").any(|p| p == part), "{part} in {c}");
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::COOKIE,
            format!("other=1; {COOKIE}={}", id.to_hex())
                .parse()
                .expect("header"),
        );
        assert_eq!(from_cookies(&headers), Some(id));
        assert!(from_cookies(&HeaderMap::new()).is_none());
    }

    #[test]
    fn a_flash_message_is_shown_once() {
        let s = Sessions::default();
        let (id, _) = s.create(alice(), "t", at(FAR), at(0));
        s.flash(&id, "job web scaled to 3".into());
        assert_eq!(s.take_flash(&id).as_deref(), Some("job web scaled to 3"));
        assert!(s.take_flash(&id).is_none());
    }
}
