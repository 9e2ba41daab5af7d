//! rustls configurations shared by the agent, the controller, the CLI and the tests.
//!
//! ring is the only crypto provider. Call [`install_crypto_provider`] once per process
//! before building a configuration.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::pki::{Fingerprint, Serial};
use crate::sync::{read, write};

/// Errors building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// PEM input held no usable certificate.
    #[error("no certificate in {what}")]
    NoCertificate {
        /// Which input.
        what: &'static str,
    },
    /// PEM input held no usable private key.
    #[error("no private key in {what}: {reason}")]
    NoKey {
        /// Which input.
        what: &'static str,
        /// The parser's reason.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration error: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// Installs ring as the process-wide rustls provider. Safe to call more than once.
pub fn install_crypto_provider() {
    // An Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate in a PEM text.
pub fn certs_from_pem(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(certs)
}

/// Parses the private key in a PEM text.
pub fn key_from_pem(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::NoKey {
        what,
        reason: e.to_string(),
    })
}

/// A root store holding only the fleet CA.
pub fn fleet_roots(ca_pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem, "the fleet CA")? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

/// A verifier that requires a client certificate signed by the fleet CA (or, with
/// `optional`, accepts clients without one; the application then checks).
pub fn fleet_client_verifier(
    ca_pem: &str,
    optional: bool,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let builder = WebPkiClientVerifier::builder_with_provider(fleet_roots(ca_pem)?, provider());
    let builder = if optional {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    builder
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))
}

/// Serials of revoked certificates, shared by the client-certificate verifiers of a
/// running server and updated while it serves: a serial inserted here is refused by
/// the next handshake, without rebuilding the TLS configuration.
#[derive(Debug, Default)]
pub struct RevokedSerials(RwLock<HashSet<Serial>>);

impl RevokedSerials {
    /// A list holding `serials`.
    pub fn new(serials: impl IntoIterator<Item = Serial>) -> RevokedSerials {
        RevokedSerials(RwLock::new(serials.into_iter().collect()))
    }

    /// Whether `serial` is revoked.
    pub fn contains(&self, serial: &Serial) -> bool {
        // A panic while holding the lock cannot leave a half-inserted serial behind.
        read(&self.0).contains(serial)
    }

    /// Revokes `serial`; whether it was not revoked before.
    pub fn insert(&self, serial: Serial) -> bool {
        write(&self.0).insert(serial)
    }

    /// How many serials are revoked.
    pub fn len(&self) -> usize {
        read(&self.0).len()
    }

    /// Whether no serial is revoked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A check a verifier makes after the chain was accepted: refuses certificates
/// that are revoked (by serial, or by whatever identity the implementor tracks).
pub trait CertRevocation: std::fmt::Debug + Send + Sync {
    /// `Err` (`CertificateError::Revoked`, or `BadEncoding` when the certificate
    /// cannot be read) refuses the handshake.
    fn check(&self, end_entity: &[u8]) -> Result<(), rustls::Error>;
}

impl CertRevocation for RevokedSerials {
    /// Refuses a certificate whose serial is revoked, with the error rustls turns
    /// into a `certificate_revoked` alert. A certificate whose serial cannot be read
    /// is refused too.
    fn check(&self, end_entity: &[u8]) -> Result<(), rustls::Error> {
        let serial = Serial::of_cert_der(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        if self.contains(&serial) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(())
    }
}

/// Wraps `inner` so that, after `inner` accepts a client certificate, it is refused
/// when `revoked` refuses it (read at every handshake; for example
/// [`RevokedSerials`]).
pub fn revocation_checking_verifier(
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Arc<dyn CertRevocation>,
) -> Arc<dyn ClientCertVerifier> {
    Arc::new(RevocationCheckingVerifier { inner, revoked })
}

/// See [`revocation_checking_verifier`].
#[derive(Debug)]
struct RevocationCheckingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Arc<dyn CertRevocation>,
}

impl ClientCertVerifier for RevocationCheckingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.revoked.check(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A server configuration presenting `chain_pem` (leaf first, then the CA, so that
/// joining agents can check their pinned fingerprint) and verifying clients with
/// `verifier`.
pub fn server_config(
    chain_pem: &str,
    key_pem: &str,
    verifier: Arc<dyn ClientCertVerifier>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs_from_pem(chain_pem, "the server certificate chain")?,
            key_from_pem(key_pem, "the server key")?,
        )?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client configuration that trusts only the fleet CA and presents `client`
/// (certificate chain PEM, key PEM) when given.
pub fn client_config(
    ca_pem: &str,
    client: Option<(&str, &str)>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(fleet_roots(ca_pem)?);
    let mut config = match client {
        Some((cert_pem, key_pem)) => builder.with_client_auth_cert(
            certs_from_pem(cert_pem, "the client certificate")?,
            key_from_pem(key_pem, "the client key")?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client configuration for enrollment: the server's chain must contain a CA whose
/// fingerprint is `pin`, and the server certificate must verify against that CA.
pub fn pinned_client_config(pin: Fingerprint) -> Result<rustls::ClientConfig, TlsError> {
    pinned_client_config_for(pin, None)
}

/// As [`pinned_client_config`], checking the server certificate for `server_name`
/// instead of the URL's host when given: a client that reaches the controller
/// through an address the certificate does not name (a VM reaching its host's
/// loopback at 10.0.2.2) still verifies a name the certificate must hold.
pub fn pinned_client_config_for(
    pin: Fingerprint,
    server_name: Option<ServerName<'static>>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier {
            pin,
            server_name,
            provider: provider(),
        }))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Trusts a server whose presented chain includes the CA with a pinned fingerprint.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: Fingerprint,
    /// Checked instead of the connection's name when set.
    server_name: Option<ServerName<'static>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| Fingerprint::of(c) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the controller's chain holds no CA with the pinned fingerprint {}",
                    self.pin
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let name = self.server_name.as_ref().unwrap_or(server_name);
        inner.verify_server_cert(end_entity, &[], name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::pki::{self, CertAndKey, Identity, Role, Validity};

    fn ca() -> CertAndKey {
        pki::generate_ca(
            "test CA",
            Validity::starting(SystemTime::now(), Duration::from_secs(3600)),
        )
        .expect("CA")
    }

    fn leaf(ca: &CertAndKey, name: &str) -> CertificateDer<'static> {
        let id = Identity {
            name: name.into(),
            role: Role::Admin,
        };
        let ck = pki::issue_client_cert(
            ca,
            &id,
            Validity::starting(SystemTime::now(), Duration::from_secs(600)),
        )
        .expect("issued");
        CertificateDer::from(pki::first_cert_der(&ck.cert_pem).expect("der"))
    }

    fn verify(
        v: &Arc<dyn ClientCertVerifier>,
        cert: &CertificateDer<'_>,
    ) -> Result<ClientCertVerified, rustls::Error> {
        v.verify_client_cert(cert, &[], UnixTime::now())
    }

    #[test]
    fn a_serial_revoked_after_the_verifier_was_built_is_refused_at_the_next_handshake() {
        install_crypto_provider();
        let ca = ca();
        let (alice, bob) = (leaf(&ca, "alice"), leaf(&ca, "bob"));
        let revoked = Arc::new(RevokedSerials::default());
        let v = revocation_checking_verifier(
            fleet_client_verifier(&ca.cert_pem, true).expect("inner"),
            revoked.clone(),
        );
        verify(&v, &alice).expect("not revoked yet");
        assert!(revoked.insert(Serial::of_cert_der(&alice).expect("serial")));
        let err = verify(&v, &alice).expect_err("revoked");
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
            ),
            "{err:?}"
        );
        verify(&v, &bob).expect("another serial is unaffected");
        assert!(!v.client_auth_mandatory(), "optional stays optional");
    }

    #[test]
    fn the_chain_is_checked_before_the_revocation_list() {
        install_crypto_provider();
        let (ours, theirs) = (ca(), ca());
        let foreign = leaf(&theirs, "mallory");
        let v = revocation_checking_verifier(
            fleet_client_verifier(&ours.cert_pem, false).expect("inner"),
            Arc::new(RevokedSerials::default()),
        );
        let err = verify(&v, &foreign).expect_err("foreign CA");
        assert!(
            !matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
            ),
            "{err:?}"
        );
        assert!(v.client_auth_mandatory());
    }

    #[test]
    fn an_unreadable_certificate_is_refused_not_accepted() {
        let revoked = RevokedSerials::new([Serial::from_bytes(&[1])]);
        assert!(revoked.check(b"not a certificate").is_err());
        assert_eq!(revoked.len(), 1);
    }
}
