//! Certificate revocation by serial, for operator and node certificates alike.
//!
//! A revocation is persisted in the store first ([`Store::revoke_cert`]), then its
//! serial joins the [`RevokedSerials`] list that the client-certificate verifiers of
//! the agent link and of the HTTPS API read at every handshake, and finally the live
//! connections that presented the certificate are closed (QUIC connections of the
//! node, HTTPS keep-alive connections of the operator). On start the list is loaded
//! from the store, so a revocation survives a restart.
//!
//! **Architecture Invariant:** the verifiers, the API and this module share one
//! `Arc<RevokedSerials>`; nothing rebuilds a TLS configuration to revoke.

use std::sync::Arc;
use std::time::SystemTime;

use novacron_common::pki::Serial;
use novacron_common::tls::RevokedSerials;
use tracing::warn;

use crate::services::agents::Agents;
use crate::state::store::{CertRevocation, Store, StoreError};
use novacron_common::clock::unix_ms;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// Reading or writing the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored revocation holds a serial that does not parse.
    #[error(
        "the store holds a certificate revocation with an unreadable serial {serial:?}: {reason}; the store file is damaged"
    )]
    BadStoredSerial {
        /// The stored text.
        serial: String,
        /// Why it does not parse.
        reason: String,
    },
}

/// Loads the revoked serials from the store.
pub fn load(store: &dyn Store) -> Result<Arc<RevokedSerials>, CertsError> {
    let mut serials = Vec::new();
    for r in store.cert_revocations()? {
        let serial = r
            .serial
            .parse::<Serial>()
            .map_err(|e| CertsError::BadStoredSerial {
                serial: r.serial.clone(),
                reason: e.to_string(),
            })?;
        serials.push(serial);
    }
    Ok(Arc::new(RevokedSerials::new(serials)))
}

/// Persists the revocation of `serial` (keeping an earlier one); returns the record
/// that holds and whether it is new. Used online by [`CertRevocations`] and offline
/// by `novacron-controller cert revoke` on a stopped controller's data directory.
pub fn persist(
    store: &dyn Store,
    serial: &Serial,
    by: &str,
    reason: &str,
    now: SystemTime,
) -> Result<(CertRevocation, bool), StoreError> {
    let wanted = CertRevocation {
        serial: serial.to_string(),
        at_unix_ms: unix_ms(now),
        by: by.to_owned(),
        reason: reason.to_owned(),
    };
    let held = store.revoke_cert(&wanted)?;
    let new = held == wanted;
    Ok((held, new))
}

/// What [`CertRevocations::revoke`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Revoked {
    /// The revocation that holds (an earlier one when the serial was revoked before).
    pub record: CertRevocation,
    /// Whether this call revoked it (false: it already was).
    pub new: bool,
    /// HTTPS connections closed.
    pub closed_api_connections: usize,
    /// Nodes whose agent link was closed.
    pub closed_nodes: Vec<String>,
}

/// Live connections tracked by the client certificate that opened them (the HTTPS
/// listener's), which a revocation closes.
pub trait ConnectionsBySerial: std::fmt::Debug + Send + Sync {
    /// Closes the connections whose client certificate has `serial`; returns how
    /// many.
    fn close(&self, serial: &Serial) -> usize;
}

/// The revocation service of a running controller.
#[derive(Debug)]
pub struct CertRevocations {
    store: Arc<dyn Store>,
    revoked: Arc<RevokedSerials>,
    api_connections: Arc<dyn ConnectionsBySerial>,
    link: Arc<Agents>,
}

impl CertRevocations {
    /// The service over `revoked` (the list the verifiers read).
    pub fn new(
        store: Arc<dyn Store>,
        revoked: Arc<RevokedSerials>,
        api_connections: Arc<dyn ConnectionsBySerial>,
        link: Arc<Agents>,
    ) -> CertRevocations {
        CertRevocations {
            store,
            revoked,
            api_connections,
            link,
        }
    }

    /// Whether `serial` is revoked.
    pub fn is_revoked(&self, serial: &Serial) -> bool {
        self.revoked.contains(serial)
    }

    /// Revokes `serial`: persists it, refuses it at every later handshake and closes
    /// the connections that use it now.
    pub fn revoke(
        &self,
        serial: &Serial,
        by: &str,
        reason: &str,
        now: SystemTime,
    ) -> Result<Revoked, StoreError> {
        let (record, new) = persist(self.store.as_ref(), serial, by, reason, now)?;
        // The list before the connections: a connection registered after the scan
        // below checks the list itself.
        self.revoked.insert(serial.clone());
        let closed_api_connections = self.api_connections.close(serial);
        let closed_nodes = self.link.close_revoked(serial);
        warn!(%serial, by, reason, closed_api_connections, closed_nodes = ?closed_nodes, "certificate revoked");
        Ok(Revoked {
            record,
            new,
            closed_api_connections,
            closed_nodes,
        })
    }

    /// Every revocation, by serial.
    pub fn list(&self) -> Result<Vec<CertRevocation>, StoreError> {
        self.store.cert_revocations()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::state::store::MemoryStore;

    #[test]
    fn persisted_revocations_are_loaded_into_the_list() {
        let store = MemoryStore::default();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let a: Serial = "00:0A:1B".parse().expect("serial");
        let (first, new) = persist(&store, &a, "admin:root", "leaked", t).expect("persist");
        assert!(new);
        assert_eq!(first.serial, "0a1b", "stored in its one spelling");
        let (again, new) = persist(&store, &a, "admin:bob", "twice", t).expect("persist");
        assert!(!new, "already revoked");
        assert_eq!(again, first, "the first record is kept");
        let list = load(&store).expect("load");
        assert!(list.contains(&a));
        assert!(!list.contains(&"0a1c".parse().expect("serial")));
        assert_eq!(list.len(), 1);
    }

    #[test]
    fn a_damaged_stored_serial_is_reported_not_skipped() {
        let store = MemoryStore::default();
        store
            .revoke_cert(&CertRevocation {
                serial: "not hex".into(),
                at_unix_ms: 1,
                by: "x".into(),
                reason: String::new(),
            })
            .expect("store");
        let err = load(&store).expect_err("damaged");
        assert!(err.to_string().contains("not hex"), "{err}");
    }
}
