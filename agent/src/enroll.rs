//! Enrollment (`novacron-agent join`) and the agent's state directory.
//!
//! The agent makes its own key and sends only a CSR. It trusts the controller only
//! if the controller's chain holds a CA with the pinned fingerprint, and it keeps
//! the returned CA only if it has that same fingerprint.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use novacron_api::{ApiError, EnrollRequest, EnrollResponse};
use novacron_common::files;
use novacron_common::pki::{self, Fingerprint, Identity};
use novacron_common::tls;
use serde::{Deserialize, Serialize};

/// How long a join request may take.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Errors of enrollment and of reading the state directory.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The state directory already holds an enrollment.
    #[error(
        "{dir} already holds the enrollment of node {name:?}; pass --force to enroll again (the old identity is discarded)"
    )]
    AlreadyEnrolled {
        /// The state directory.
        dir: PathBuf,
        /// The enrolled name.
        name: String,
    },
    /// The state directory has no enrollment.
    #[error(
        "{dir} holds no enrollment: run `novacron-agent join --controller URL --token TOKEN --ca-fingerprint sha256:...` first"
    )]
    NotEnrolled {
        /// The state directory.
        dir: PathBuf,
    },
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
    /// The controller could not be reached (a wrong fingerprint is
    /// [`EnrollError::Untrusted`] instead).
    #[error("cannot reach the controller at {url}: {reason}")]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The TLS handshake failed on trust: the controller's certificate does not
    /// chain to the CA with the pinned fingerprint (a wrong `--ca-fingerprint`, or
    /// not the controller meant). The join token was not sent.
    #[error(
        "the controller at {url} is not trusted: {reason}; the join token was not sent. Check --ca-fingerprint {pin} against the fingerprint `novacron-controller token create` prints"
    )]
    Untrusted {
        /// The URL.
        url: String,
        /// The pinned fingerprint.
        pin: Fingerprint,
        /// What TLS said.
        reason: String,
    },
    /// The controller refused the enrollment.
    #[error("the controller refused the enrollment ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The controller's message.
        message: String,
    },
    /// The controller's answer does not check out.
    #[error("the controller's answer is not trustworthy: {0}")]
    BadAnswer(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A state file is corrupt.
    #[error("{path} is corrupt: {reason}; enroll again with --force")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// What the agent remembers about its enrollment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrollment {
    /// The node name in the certificate.
    pub node_name: String,
    /// The controller's API URL used to join.
    pub controller_api: String,
    /// Where to connect over QUIC (`host:port`).
    pub quic_endpoint: String,
    /// The server name on the controller's certificate.
    pub server_name: String,
}

/// Paths in the agent's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    /// The directory.
    pub dir: PathBuf,
}

impl StateDir {
    /// The state directory at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> StateDir {
        StateDir { dir: dir.into() }
    }
    /// `enrollment.json`.
    pub fn enrollment(&self) -> PathBuf {
        self.dir.join("enrollment.json")
    }
    /// The node certificate.
    pub fn cert(&self) -> PathBuf {
        self.dir.join("node.pem")
    }
    /// The node key (0600).
    pub fn key(&self) -> PathBuf {
        self.dir.join("node-key.pem")
    }
    /// The fleet CA.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Reads the enrollment record.
    pub fn load_enrollment(&self) -> Result<Enrollment, EnrollError> {
        let path = self.enrollment();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(EnrollError::NotEnrolled {
                    dir: self.dir.clone(),
                });
            }
            Err(source) => return Err(EnrollError::Io { path, source }),
        };
        serde_json::from_str(&text).map_err(|e| EnrollError::Corrupt {
            path,
            reason: e.to_string(),
        })
    }

    /// Reads the current credentials: (certificate PEM, key PEM, CA PEM).
    pub fn load_credentials(&self) -> Result<Credentials, EnrollError> {
        Ok(Credentials {
            cert_pem: read(&self.cert())?,
            key_pem: read(&self.key())?,
            ca_pem: read(&self.ca())?,
        })
    }

    /// Replaces the certificate and key (after a renewal), key first.
    pub fn store_identity(&self, cert_pem: &str, key_pem: &str) -> Result<(), EnrollError> {
        write_atomic(&self.key(), key_pem, 0o600)?;
        write_atomic(&self.cert(), cert_pem, 0o644)
    }
}

/// The agent's TLS credentials.
#[derive(Clone)]
pub struct Credentials {
    /// Node certificate, PEM.
    pub cert_pem: String,
    /// Node key, PEM.
    pub key_pem: String,
    /// Fleet CA, PEM.
    pub ca_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

/// Arguments of `join`.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// The controller's API URL, `https://host:port`.
    pub controller: String,
    /// The join token.
    pub token: String,
    /// The pinned CA fingerprint.
    pub ca_fingerprint: Fingerprint,
    /// The node name to ask for.
    pub node_name: String,
    /// The name the controller's certificate is checked for; `None`: the URL's host.
    pub server_name: Option<rustls_pki_types::ServerName<'static>>,
    /// Where to keep the identity.
    pub state: StateDir,
    /// Replace an existing enrollment.
    pub force: bool,
}

/// Enrolls with the controller and writes the identity into the state directory.
pub async fn join(opts: &JoinOptions) -> Result<Enrollment, EnrollError> {
    tls::install_crypto_provider();
    pki::validate_name(&opts.node_name)
        .map_err(|e| EnrollError::Invalid(format!("--name: {e}")))?;
    if !opts.force
        && let Ok(existing) = opts.state.load_enrollment()
    {
        return Err(EnrollError::AlreadyEnrolled {
            dir: opts.state.dir.clone(),
            name: existing.node_name,
        });
    }
    let url = format!("{}/v1/enroll", opts.controller.trim_end_matches('/'));
    if !url.starts_with("https://") {
        return Err(EnrollError::Invalid(format!(
            "--controller {:?}: expected an https:// URL such as https://controller.example:7443",
            opts.controller
        )));
    }
    // Before the token is spent: the identity must be storable.
    ensure_writable(&opts.state.dir)?;
    let (csr_pem, key_pem) =
        pki::generate_csr(&opts.node_name).map_err(|e| EnrollError::Invalid(e.to_string()))?;
    let tls_config =
        tls::pinned_client_config_for(opts.ca_fingerprint.clone(), opts.server_name.clone())
            .map_err(|e| EnrollError::Invalid(e.to_string()))?;
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls_config)
        .timeout(JOIN_TIMEOUT)
        .build()
        .map_err(|e| EnrollError::Invalid(e.to_string()))?;
    let unreachable = |e: reqwest::Error| match trust_failure(&e) {
        Some(reason) => EnrollError::Untrusted {
            url: opts.controller.clone(),
            pin: opts.ca_fingerprint.clone(),
            reason,
        },
        None => EnrollError::Unreachable {
            url: opts.controller.clone(),
            reason: error_chain(&e),
        },
    };
    let resp = client
        .post(&url)
        .json(&EnrollRequest {
            token: opts.token.clone(),
            node_name: opts.node_name.clone(),
            csr_pem,
        })
        .send()
        .await
        .map_err(unreachable)?;
    let status = resp.status();
    if !status.is_success() {
        let message = resp
            .json::<ApiError>()
            .await
            .map(|e| e.error)
            .unwrap_or_else(|e| format!("unreadable error body: {e}"));
        return Err(EnrollError::Refused {
            status: status.as_u16(),
            message,
        });
    }
    let answer: EnrollResponse = resp.json().await.map_err(unreachable)?;
    let ca_der = pki::first_cert_der(&answer.ca_pem)
        .map_err(|e| EnrollError::BadAnswer(format!("ca_pem: {e}")))?;
    if Fingerprint::of(&ca_der) != opts.ca_fingerprint {
        return Err(EnrollError::BadAnswer(format!(
            "the returned CA has fingerprint {}, not the pinned {}",
            Fingerprint::of(&ca_der),
            opts.ca_fingerprint
        )));
    }
    let cert_der = pki::first_cert_der(&answer.cert_pem)
        .map_err(|e| EnrollError::BadAnswer(format!("cert_pem: {e}")))?;
    let identity = Identity::from_cert_der(&cert_der)
        .map_err(|e| EnrollError::BadAnswer(format!("cert_pem: {e}")))?;
    if identity
        != Identity::node(&answer.node_name).map_err(|e| EnrollError::BadAnswer(e.to_string()))?
    {
        return Err(EnrollError::BadAnswer(format!(
            "the certificate is for {identity}, not node {:?}",
            answer.node_name
        )));
    }

    create_private_dir(&opts.state.dir)?;
    opts.state.store_identity(&answer.cert_pem, &key_pem)?;
    write_atomic(&opts.state.ca(), &answer.ca_pem, 0o644)?;
    let enrollment = Enrollment {
        node_name: answer.node_name,
        controller_api: opts.controller.clone(),
        quic_endpoint: answer.quic_endpoint,
        server_name: answer.server_name,
    };
    let json = serde_json::to_string_pretty(&enrollment)
        .map_err(|e| EnrollError::Invalid(e.to_string()))?;
    write_atomic(&opts.state.enrollment(), &json, 0o644)?;
    Ok(enrollment)
}

/// Flattens an error and its sources into one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// What TLS said when `e` (or an error under it) is the server certificate failing
/// verification: refused by the pinned verifier (`General`) or invalid for the
/// pinned CA (`InvalidCertificate`: bad signature, wrong name, expired, ...).
pub fn trust_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(e);
    while let Some(err) = next {
        match err.downcast_ref::<rustls::Error>() {
            Some(rustls::Error::General(why)) => return Some(why.clone()),
            Some(e @ rustls::Error::InvalidCertificate(_)) => return Some(e.to_string()),
            _ => {}
        }
        // `io::Error::source` skips the error it wraps (often another `io::Error`
        // around the TLS one), so step into it instead.
        next = match err.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

fn read(path: &Path) -> Result<String, EnrollError> {
    fs::read_to_string(path).map_err(|source| EnrollError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write_atomic(path: &Path, contents: &str, mode: u32) -> Result<(), EnrollError> {
    files::write_atomic(path, contents, mode).map_err(|source| EnrollError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Checks that `dir`, or the nearest ancestor that exists when it does not, takes a
/// new file, so that `join` fails before it spends a one-use token on an identity
/// it could not store. It leaves nothing behind: a failed join writes nothing.
fn ensure_writable(dir: &Path) -> Result<(), EnrollError> {
    let refuse = |e: &dyn std::fmt::Display| {
        EnrollError::Invalid(format!(
            "cannot write the state directory {}: {e}; run join as root (the packaged \
             service runs as root and reads /var/lib/novacron/agent), or choose a \
             directory you can write with --state-dir (and pass it to run too)",
            dir.display()
        ))
    };
    // A relative path's last ancestor is "", which never exists: "." stands for it.
    let probe = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("."));
    if !probe.is_dir() {
        return Err(refuse(&format!("{} is not a directory", probe.display())));
    }
    tempfile::Builder::new()
        .prefix(".novacron-write-check")
        .tempfile_in(probe)
        .map(drop)
        .map_err(|e| refuse(&e))
}

fn create_private_dir(dir: &Path) -> Result<(), EnrollError> {
    files::create_private_dir(dir).map_err(|source| EnrollError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[tokio::test]
    async fn join_refuses_a_state_directory_it_cannot_write_before_asking_the_controller() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a-file");
        std::fs::write(&file, "x").expect("write");
        let opts = JoinOptions {
            // Nothing listens there: reaching it would fail as Unreachable.
            controller: "https://127.0.0.1:1".into(),
            token: "3f9c0a1b2c3d.0123456789abcdef0123456789abcdef".into(),
            ca_fingerprint: Fingerprint::of(b"ca"),
            node_name: "n1".into(),
            server_name: None,
            state: StateDir::new(file.join("state")),
            force: false,
        };
        let e = join(&opts).await.expect_err("not writable");
        assert!(matches!(e, EnrollError::Invalid(_)), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains("cannot write the state directory") && text.contains("--state-dir"),
            "{text}"
        );
    }

    #[test]
    fn identity_files_are_written_with_private_key_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(dir.path());
        state.store_identity("CERT", "KEY").expect("write");
        let mode = fs::metadata(state.key()).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read_to_string(state.cert()).expect("cert"), "CERT");
    }

    #[test]
    fn a_certificate_refused_by_tls_is_a_trust_failure_wherever_it_is_wrapped() {
        let pinned = rustls::Error::General("no CA with the pinned fingerprint".into());
        let wrapped =
            std::io::Error::other(std::io::Error::new(std::io::ErrorKind::InvalidData, pinned));
        assert_eq!(
            trust_failure(&wrapped).as_deref(),
            Some("no CA with the pinned fingerprint")
        );
        let bad = rustls::Error::InvalidCertificate(rustls::CertificateError::Expired);
        assert!(trust_failure(&bad).is_some_and(|r| r.contains("invalid peer certificate")));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(trust_failure(&refused), None);
    }

    #[test]
    fn missing_and_corrupt_enrollments_say_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = StateDir::new(dir.path());
        let err = state.load_enrollment().expect_err("none");
        assert!(err.to_string().contains("novacron-agent join"), "{err}");
        fs::write(state.enrollment(), "{not json").expect("write");
        let err = state.load_enrollment().expect_err("corrupt");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }
}
