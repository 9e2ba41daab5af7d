//! rustls configurations shared by the agent, the controller, the CLI and the tests.
//!
//! ring is the only crypto provider. Call [`install_crypto_provider`] once per process
//! before building a configuration.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::pki::Fingerprint;

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
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier {
            pin,
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
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
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
