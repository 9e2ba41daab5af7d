//! The controller's PKI on disk: the fleet CA, the server certificate and the local
//! admin certificate, under `<data_dir>/pki/`. Private keys are written with mode 0600.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use novacron_common::files;
use novacron_common::pki::{self, CertAndKey, Fingerprint, Identity, Role, Validity};

/// Lifetime of the controller's server certificate.
pub const SERVER_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Lifetime of the local admin certificate written by `init`.
pub const ADMIN_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Errors reading or writing the PKI files.
#[derive(Debug, thiserror::Error)]
pub enum PkiFilesError {
    /// `init` found an existing CA.
    #[error(
        "{path} already exists: this data directory is initialized; pass --force to replace the fleet CA (every enrolled node must then join again)"
    )]
    AlreadyInitialized {
        /// The CA certificate path.
        path: PathBuf,
    },
    /// A file is missing: the data directory was not initialized.
    #[error("cannot read {path}: {source}; run `novacron-controller init --data-dir <dir>` first")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Certificate generation or parsing failed.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
}

/// Paths of the PKI files in a data directory.
#[derive(Debug, Clone)]
pub struct PkiPaths {
    /// `<data>/pki`.
    pub dir: PathBuf,
}

impl PkiPaths {
    /// The PKI paths of `data_dir`.
    pub fn new(data_dir: &Path) -> PkiPaths {
        PkiPaths {
            dir: data_dir.join("pki"),
        }
    }
    /// Fleet CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// Fleet CA key (0600).
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }
    /// Server certificate chain (leaf, then CA).
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    /// Server key (0600).
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server-key.pem")
    }
    /// Local admin client certificate.
    pub fn admin_cert(&self) -> PathBuf {
        self.dir.join("admin.pem")
    }
    /// Local admin client key (0600).
    pub fn admin_key(&self) -> PathBuf {
        self.dir.join("admin-key.pem")
    }
}

/// The loaded PKI of a running controller.
#[derive(Debug, Clone)]
pub struct ControllerPki {
    /// The fleet CA with its key.
    pub ca: CertAndKey,
    /// The server chain (leaf then CA) and key.
    pub server: CertAndKey,
    /// The CA's fingerprint, which agents pin.
    pub fingerprint: Fingerprint,
}

/// Creates the fleet CA, the server certificate for `server_names` and an admin
/// client certificate. Returns the CA fingerprint.
pub fn init(
    data_dir: &Path,
    server_names: &[String],
    force: bool,
    now: SystemTime,
) -> Result<Fingerprint, PkiFilesError> {
    let paths = PkiPaths::new(data_dir);
    if paths.ca_cert().exists() && !force {
        return Err(PkiFilesError::AlreadyInitialized {
            path: paths.ca_cert(),
        });
    }
    create_private_dir(data_dir)?;
    create_private_dir(&paths.dir)?;
    let ca = pki::generate_ca(
        "NovaCron fleet CA",
        Validity::starting(now, pki::DEFAULT_CA_TTL),
    )?;
    let server =
        pki::issue_server_cert(&ca, server_names, Validity::starting(now, SERVER_CERT_TTL))?;
    let admin = pki::issue_client_cert(
        &ca,
        &Identity {
            name: "admin".into(),
            role: Role::Admin,
        },
        Validity::starting(now, ADMIN_CERT_TTL),
    )?;
    write_file(&paths.ca_key(), &ca.key_pem, 0o600)?;
    write_file(&paths.ca_cert(), &ca.cert_pem, 0o644)?;
    write_file(&paths.server_key(), &server.key_pem, 0o600)?;
    write_file(
        &paths.server_cert(),
        &format!("{}{}", server.cert_pem, ca.cert_pem),
        0o644,
    )?;
    write_file(&paths.admin_key(), &admin.key_pem, 0o600)?;
    write_file(&paths.admin_cert(), &admin.cert_pem, 0o644)?;
    Ok(Fingerprint::of(&pki::first_cert_der(&ca.cert_pem)?))
}

/// Loads the PKI of an initialized data directory.
pub fn load(data_dir: &Path) -> Result<ControllerPki, PkiFilesError> {
    let paths = PkiPaths::new(data_dir);
    let ca = CertAndKey {
        cert_pem: read(&paths.ca_cert())?,
        key_pem: read(&paths.ca_key())?,
    };
    let server = CertAndKey {
        cert_pem: read(&paths.server_cert())?,
        key_pem: read(&paths.server_key())?,
    };
    let fingerprint = Fingerprint::of(&pki::first_cert_der(&ca.cert_pem)?);
    Ok(ControllerPki {
        ca,
        server,
        fingerprint,
    })
}

/// Reads a text file, with an error that names it.
pub fn read(path: &Path) -> Result<String, PkiFilesError> {
    fs::read_to_string(path).map_err(|source| PkiFilesError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `contents` to `path` atomically (temporary file, then rename) with `mode`.
pub fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiFilesError> {
    files::write_atomic(path, contents, mode).map_err(|source| PkiFilesError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn create_private_dir(dir: &Path) -> Result<(), PkiFilesError> {
    files::create_private_dir(dir).map_err(|source| PkiFilesError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn init_writes_keys_0600_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fp = init(dir.path(), &["localhost".into()], false, SystemTime::now()).expect("init");
        let paths = PkiPaths::new(dir.path());
        for key in [paths.ca_key(), paths.server_key(), paths.admin_key()] {
            let mode = fs::metadata(&key).expect("exists").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let loaded = load(dir.path()).expect("load");
        assert_eq!(loaded.fingerprint, fp);
        let err = init(dir.path(), &["localhost".into()], false, SystemTime::now())
            .expect_err("second init");
        assert!(err.to_string().contains("--force"), "{err}");
    }

    #[test]
    fn load_of_an_empty_dir_says_to_run_init() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = load(dir.path()).expect_err("nothing there");
        assert!(
            err.to_string().contains("novacron-controller init"),
            "{err}"
        );
    }
}
