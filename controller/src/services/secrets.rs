//! Secrets: named sets of values, versioned, sealed at rest.
//!
//! Each version's values (a JSON map) are sealed with AES-256-GCM under the
//! controller's secrets key ([`SecretsKey`], a file of 32 random bytes in hex that
//! `novacron-controller init` writes, mode 0600), with a random nonce and the
//! secret's name and version as associated data, so a sealed value moved to
//! another record does not open. The store holds only sealed values; this service
//! keeps the opened ones in memory, for the desired sets sent to agents.
//!
//! **Invariants:** no value is ever logged, put in an event or an error, or
//! returned by the API; a version a job version uses is never pruned; a secret a
//! job uses cannot be deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use novacron_common::manifest::secret::{SecretData, SecretType};
use novacron_common::sync::{read, write};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};
use tracing::warn;

use crate::state::store::{SecretRecord, SecretVersionRecord, Store, StoreError};

/// The secrets key file in the data directory, unless configured elsewhere.
pub const KEY_FILE: &str = "secrets.key";
/// Versions of a secret kept beyond the ones job versions use.
pub const KEEP_UNUSED_VERSIONS: usize = 2;

/// Why the secrets key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be read or written.
    #[error("secrets key {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not hold 64 hex digits.
    #[error(
        "secrets key {path}: expected 64 hex digits (32 bytes); generate one with `openssl rand -hex 32`"
    )]
    Malformed {
        /// The file.
        path: PathBuf,
    },
}

/// The key that seals secrets at rest.
pub struct SecretsKey {
    key: LessSafeKey,
    id: String,
}

impl std::fmt::Debug for SecretsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretsKey({})", self.id)
    }
}

impl SecretsKey {
    /// A key from 32 bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> SecretsKey {
        let id = hex::encode(&Sha256::digest(bytes)[..8]);
        // AES-256 takes any 32 bytes.
        let unbound = UnboundKey::new(&AES_256_GCM, bytes).expect("32-byte AES-256 key");
        SecretsKey {
            key: LessSafeKey::new(unbound),
            id,
        }
    }

    /// Reads the key file (64 hex digits).
    pub fn load(path: &Path) -> Result<SecretsKey, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes).map_err(|_| KeyError::Malformed {
            path: path.to_path_buf(),
        })?;
        Ok(SecretsKey::from_bytes(&bytes))
    }

    /// Writes a new random key to `path` (mode 0600), unless a file is there.
    /// Whether it wrote one.
    pub fn create(path: &Path) -> Result<bool, KeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut bytes = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| io(std::io::Error::other("no system randomness")))?;
        let mut file = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io(e)),
        };
        file.write_all(format!("{}\n", hex::encode(bytes)).as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io)?;
        Ok(true)
    }

    /// The key's id: 16 hex digits of its SHA-256.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn aad(name: &str, version: u64) -> Vec<u8> {
        format!("novacron-secret\0{name}\0{version}").into_bytes()
    }

    /// Seals `data` as version `version` of `name`: (nonce, sealed), hex.
    fn seal(&self, name: &str, version: u64, data: &SecretData) -> (String, String) {
        let mut nonce = [0u8; 12];
        // The system RNG does not fail on Linux after boot.
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("system randomness");
        // A map of strings always serializes.
        let mut buf = serde_json::to_vec(&data.0).unwrap_or_default();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad(name, version)),
                &mut buf,
            )
            .expect("AES-GCM seals any length below 64 GiB");
        (hex::encode(nonce), hex::encode(buf))
    }

    /// Opens a sealed version; `None` when it does not open (another key, a
    /// record altered or moved).
    fn open(&self, name: &str, v: &SecretVersionRecord) -> Option<SecretData> {
        let mut nonce = [0u8; 12];
        hex::decode_to_slice(&v.nonce, &mut nonce).ok()?;
        let mut buf = hex::decode(&v.sealed).ok()?;
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad(name, v.version)),
                &mut buf,
            )
            .ok()?;
        serde_json::from_slice(plain).ok().map(SecretData)
    }
}

/// Why a secret operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// No such secret.
    #[error("secret {0:?} does not exist")]
    NotFound(String),
    /// The secret is in use.
    #[error("secret {name:?} is used by jobs {jobs:?}; remove it from their manifests first")]
    InUse {
        /// The secret.
        name: String,
        /// The jobs.
        jobs: Vec<String>,
    },
    /// A secret's type cannot change while jobs use it that way.
    #[error("secret {name:?} is a {was} secret; delete it first to make it a {now} secret")]
    TypeChange {
        /// The secret.
        name: String,
        /// Its type.
        was: SecretType,
        /// The type asked for.
        now: SecretType,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The secret was saved, but the jobs that use it could not be rolled out.
    #[error("the secret was saved, but rolling out the jobs that use it failed: {0}")]
    Rollout(String),
}

#[derive(Debug, Clone)]
struct Entry {
    record: SecretRecord,
    /// Opened values by version (versions that did not open are absent).
    open: BTreeMap<u64, Arc<SecretData>>,
}

/// What [`Secrets::set`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetOutcome {
    /// A new secret, version 1.
    Created,
    /// A new version.
    Updated,
    /// The same type and values as the latest version: nothing changed.
    Unchanged,
}

/// How a secret is used now: the versions kept job versions run, and whether a
/// job pulls with it.
#[derive(Debug, Clone, Copy)]
pub struct Usage<'a> {
    /// Versions some kept job version runs.
    pub versions: &'a BTreeSet<u64>,
    /// A job's current version names it as its `imagePullSecret`.
    pub for_pulls: bool,
}

/// The secrets, opened in memory.
#[derive(Debug)]
pub struct Secrets {
    store: Arc<dyn Store>,
    key: SecretsKey,
    entries: RwLock<BTreeMap<String, Entry>>,
}

impl Secrets {
    /// Loads every secret and opens what `key` opens; a version that does not open
    /// is logged (by name and version) and left out.
    pub fn load(store: Arc<dyn Store>, key: SecretsKey) -> Result<Secrets, StoreError> {
        let mut entries = BTreeMap::new();
        for record in store.secrets()? {
            let mut open = BTreeMap::new();
            for v in &record.versions {
                match key.open(&record.name, v) {
                    Some(data) => {
                        open.insert(v.version, Arc::new(data));
                    }
                    None => warn!(
                        secret = %record.name,
                        version = v.version,
                        sealed_with = %v.key_id,
                        key = %key.id(),
                        "a secret version does not open with this controller's secrets key; jobs that use it get no value"
                    ),
                }
            }
            entries.insert(record.name.clone(), Entry { record, open });
        }
        Ok(Secrets {
            store,
            key,
            entries: RwLock::new(entries),
        })
    }

    /// Sets `name` to `data` as a new version (unless the latest version has the
    /// same type and values). Versions not in `in_use` beyond the newest
    /// [`KEEP_UNUSED_VERSIONS`] are dropped.
    pub fn set(
        &self,
        name: &str,
        secret_type: SecretType,
        data: SecretData,
        by: &str,
        now_ms: u64,
        usage: Usage<'_>,
    ) -> Result<(u64, SetOutcome), SecretError> {
        let in_use = usage.versions;
        let mut entries = write(&self.entries);
        let existing = entries.get(name);
        if let Some(e) = existing {
            let latest = e.record.versions.last().map_or(0, |v| v.version);
            if e.record.secret_type == secret_type
                && e.open.get(&latest).is_some_and(|d| **d == data)
            {
                return Ok((latest, SetOutcome::Unchanged));
            }
            if e.record.secret_type != secret_type && (usage.for_pulls || !in_use.is_empty()) {
                return Err(SecretError::TypeChange {
                    name: name.into(),
                    was: e.record.secret_type,
                    now: secret_type,
                });
            }
        }
        let mut entry = existing.cloned().unwrap_or_else(|| Entry {
            record: SecretRecord {
                name: name.into(),
                secret_type,
                versions: Vec::new(),
            },
            open: BTreeMap::new(),
        });
        let outcome = if entry.record.versions.is_empty() {
            SetOutcome::Created
        } else {
            SetOutcome::Updated
        };
        let version = entry.record.versions.last().map_or(1, |v| v.version + 1);
        let (nonce, sealed) = self.key.seal(name, version, &data);
        entry.record.secret_type = secret_type;
        entry.record.versions.push(SecretVersionRecord {
            version,
            keys: data.0.keys().cloned().collect(),
            bytes: data.0.values().map(|v| v.len() as u64).sum(),
            created_unix_ms: now_ms,
            by: by.into(),
            key_id: self.key.id().into(),
            nonce,
            sealed,
        });
        entry.open.insert(version, Arc::new(data));
        prune(&mut entry, in_use);
        self.store.put_secret(&entry.record)?;
        entries.insert(name.into(), entry);
        Ok((version, outcome))
    }

    /// Deletes `name`, unless `users` (the jobs using it) is not empty.
    pub fn delete(&self, name: &str, users: Vec<String>) -> Result<(), SecretError> {
        if !users.is_empty() {
            return Err(SecretError::InUse {
                name: name.into(),
                jobs: users,
            });
        }
        let mut entries = write(&self.entries);
        if !entries.contains_key(name) {
            return Err(SecretError::NotFound(name.into()));
        }
        self.store.delete_secret(name)?;
        entries.remove(name);
        Ok(())
    }

    /// The latest version of `name`, its type and keys.
    pub fn latest(&self, name: &str) -> Option<(u64, SecretType, Vec<String>)> {
        let entries = read(&self.entries);
        let e = entries.get(name)?;
        let v = e.record.versions.last()?;
        Some((v.version, e.record.secret_type, v.keys.clone()))
    }

    /// The values of version `version` of `name`, when kept and opened.
    pub fn values(&self, name: &str, version: u64) -> Option<Arc<SecretData>> {
        read(&self.entries).get(name)?.open.get(&version).cloned()
    }

    /// Every secret's record (metadata and sealed values), by name.
    pub fn records(&self) -> Vec<SecretRecord> {
        read(&self.entries)
            .values()
            .map(|e| e.record.clone())
            .collect()
    }
}

fn prune(entry: &mut Entry, in_use: &BTreeSet<u64>) {
    let n = entry.record.versions.len();
    let mut i = 0;
    entry.record.versions.retain(|v| {
        i += 1;
        i + KEEP_UNUSED_VERSIONS > n || in_use.contains(&v.version)
    });
    let kept: BTreeSet<u64> = entry.record.versions.iter().map(|v| v.version).collect();
    entry.open.retain(|v, _| kept.contains(v));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::MemoryStore;

    fn data(pairs: &[(&str, &str)]) -> SecretData {
        SecretData(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn values_are_sealed_in_the_store_and_open_after_a_reload() {
        let store = Arc::new(MemoryStore::new());
        let key = [7u8; 32];
        let secrets = Secrets::load(store.clone(), SecretsKey::from_bytes(&key)).expect("load");
        let none = BTreeSet::new();
        let (v, outcome) = secrets
            .set(
                "db",
                SecretType::Opaque,
                data(&[("password", "hunter2-plain")]),
                "alice",
                1,
                Usage {
                    versions: &none,
                    for_pulls: false,
                },
            )
            .expect("set");
        assert_eq!((v, outcome), (1, SetOutcome::Created));
        let stored = serde_json::to_string(&store.secrets().expect("list")).expect("json");
        assert!(!stored.contains("hunter2"), "{stored}");
        assert!(stored.contains("password"), "keys stay in clear");
        let again = secrets
            .set(
                "db",
                SecretType::Opaque,
                data(&[("password", "hunter2-plain")]),
                "bob",
                2,
                Usage {
                    versions: &none,
                    for_pulls: false,
                },
            )
            .expect("same");
        assert_eq!(again, (1, SetOutcome::Unchanged));
        let reloaded = Secrets::load(store.clone(), SecretsKey::from_bytes(&key)).expect("reload");
        assert_eq!(
            reloaded.values("db", 1).expect("opens").0["password"],
            "hunter2-plain"
        );
        let wrong =
            Secrets::load(store.clone(), SecretsKey::from_bytes(&[8u8; 32])).expect("reload");
        assert!(wrong.values("db", 1).is_none(), "another key opens nothing");
        assert_eq!(
            wrong.latest("db").map(|l| l.0),
            Some(1),
            "metadata still lists it"
        );
    }

    #[test]
    fn a_sealed_value_moved_to_another_version_does_not_open() {
        let store = Arc::new(MemoryStore::new());
        let key = [1u8; 32];
        let secrets = Secrets::load(store.clone(), SecretsKey::from_bytes(&key)).expect("load");
        let none = BTreeSet::new();
        for value in ["one", "two"] {
            secrets
                .set(
                    "db",
                    SecretType::Opaque,
                    data(&[("k", value)]),
                    "a",
                    1,
                    Usage {
                        versions: &none,
                        for_pulls: false,
                    },
                )
                .expect("set");
        }
        let mut record = store.secrets().expect("list").remove(0);
        let first = record.versions[0].clone();
        record.versions[1].nonce = first.nonce;
        record.versions[1].sealed = first.sealed;
        store.put_secret(&record).expect("tamper");
        let reloaded = Secrets::load(store, SecretsKey::from_bytes(&key)).expect("reload");
        assert!(reloaded.values("db", 1).is_some());
        assert!(
            reloaded.values("db", 2).is_none(),
            "the version is bound to its record"
        );
    }

    #[test]
    fn versions_in_use_are_kept_and_others_pruned() {
        let store = Arc::new(MemoryStore::new());
        let secrets = Secrets::load(store, SecretsKey::from_bytes(&[2u8; 32])).expect("load");
        let in_use = BTreeSet::from([1]);
        for i in 0..6 {
            secrets
                .set(
                    "db",
                    SecretType::Opaque,
                    data(&[("k", &i.to_string())]),
                    "a",
                    1,
                    Usage {
                        versions: &in_use,
                        for_pulls: false,
                    },
                )
                .expect("set");
        }
        let versions: Vec<u64> = secrets.records()[0]
            .versions
            .iter()
            .map(|v| v.version)
            .collect();
        assert_eq!(versions, [1, 5, 6]);
        assert!(secrets.values("db", 1).is_some() && secrets.values("db", 2).is_none());
        assert!(matches!(
            secrets.delete("db", vec!["api".into()]),
            Err(SecretError::InUse { .. })
        ));
        assert!(matches!(
            secrets.set(
                "db",
                SecretType::Registry,
                data(&[("username", "u"), ("password", "p")]),
                "a",
                1,
                Usage {
                    versions: &in_use,
                    for_pulls: false
                }
            ),
            Err(SecretError::TypeChange { .. })
        ));
        secrets.delete("db", vec![]).expect("unused");
        assert!(secrets.latest("db").is_none());
    }

    #[test]
    fn the_key_file_is_created_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(KEY_FILE);
        assert!(SecretsKey::create(&path).expect("create"));
        let first = std::fs::read_to_string(&path).expect("read");
        assert!(
            !SecretsKey::create(&path).expect("exists"),
            "never overwritten"
        );
        assert_eq!(std::fs::read_to_string(&path).expect("read"), first);
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        SecretsKey::load(&path).expect("loads");
        std::fs::write(&path, "not hex").expect("write");
        assert!(matches!(
            SecretsKey::load(&path),
            Err(KeyError::Malformed { .. })
        ));
    }
}
