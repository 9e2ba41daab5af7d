//! The controller's image store: images pushed with `novacron image push`, kept
//! layer by layer in a content-addressed blob store (a layer shared by two images
//! is stored once) with their tags in the record store, and read back by agents
//! as an OCI distribution registry relayed over their link
//! ([`BiRequest::Registry`](novacron_common::wire::BiRequest)), so a fleet without
//! a registry can run what an operator pushed.
//!
//! Blobs are `images/sha256/<hex>` under the data directory; an upload goes to
//! `images/partial/` first and is renamed once its digest is checked. Manifests
//! are blobs too; a tag names one.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::state::blobs::{BlobKey, BlobStore, FsBlobs};
use crate::state::store::{ImageRecord, Store, StoreError};

/// The largest blob (layer) accepted.
pub const MAX_BLOB_BYTES: u64 = 32 << 30;
/// The largest manifest accepted.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// The most layers one image may have.
pub const MAX_LAYERS: usize = 256;
/// The media type of the manifests `novacron image push` writes.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

const BLOBS: &str = "sha256";
const PARTIAL: &str = "partial";

/// Why an image operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A bad name, tag, digest or manifest.
    #[error("{0}")]
    Invalid(String),
    /// Something it needs is not stored.
    #[error("{0}")]
    Missing(String),
    /// The blob store failed.
    #[error("image store: {0}")]
    Io(#[from] io::Error),
    /// The record store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a reference resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// `sha256:...`.
    pub digest: String,
    /// Its media type.
    pub media_type: String,
    /// Its length.
    pub length: u64,
    /// Its file.
    pub path: PathBuf,
}

/// The image store.
#[derive(Debug)]
pub struct Images {
    blobs: FsBlobs,
    store: Arc<dyn Store>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    digest: String,
    size: u64,
}

/// Whether `name` is a repository name (see
/// [`is_repository_name`](novacron_common::names::is_repository_name)).
pub fn valid_name(name: &str) -> bool {
    novacron_common::names::is_repository_name(name)
}

/// Whether `tag` is a tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || b"_.-".contains(&x))
}

/// The hex of a `sha256:<64 hex>` digest.
pub fn digest_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(hex)
}

impl Images {
    /// The image store under `dir`.
    pub fn open(dir: &Path, store: Arc<dyn Store>) -> io::Result<Images> {
        Ok(Images {
            blobs: FsBlobs::open(dir, &[BLOBS, PARTIAL])?,
            store,
        })
    }

    /// The length of blob `digest`, when stored.
    pub fn blob_len(&self, digest: &str) -> Option<u64> {
        let hex = digest_hex(digest)?;
        self.blobs.len(BlobKey::new(BLOBS, hex)).ok().flatten()
    }

    /// Where an upload named `upload` is written before its digest is checked.
    pub fn partial_path(&self, upload: &str) -> io::Result<PathBuf> {
        if !upload
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad upload name",
            ));
        }
        Ok(self.blobs.locate(BlobKey::new(PARTIAL, upload)))
    }

    /// Keeps upload `upload` as blob `digest` (its hash was checked by the
    /// caller), or drops it when the blob is already there.
    pub fn commit(&self, upload: &str, digest: &str) -> Result<(), ImageError> {
        let hex = digest_hex(digest)
            .ok_or_else(|| ImageError::Invalid(format!("{digest:?} is not a sha256 digest")))?;
        if self.blobs.len(BlobKey::new(BLOBS, hex))?.is_some() {
            self.blobs.remove(BlobKey::new(PARTIAL, upload))?;
            return Ok(());
        }
        self.blobs
            .rename(BlobKey::new(PARTIAL, upload), BlobKey::new(BLOBS, hex))?;
        Ok(())
    }

    /// Drops an upload that failed.
    pub fn abort(&self, upload: &str) {
        let _ = self.blobs.remove(BlobKey::new(PARTIAL, upload));
    }

    /// Stores `manifest` and tags it `name:tag`: every blob it names must be
    /// stored with the size it says.
    pub fn put_manifest(
        &self,
        name: &str,
        tag: &str,
        manifest: &[u8],
        by: &str,
        now_ms: u64,
    ) -> Result<ImageRecord, ImageError> {
        use sha2::{Digest, Sha256};
        if !valid_name(name) {
            return Err(ImageError::Invalid(format!(
                "{name:?} is not a repository name; expected lowercase letters, digits and '.', '_', '-' in components separated by '/' (like team/api)"
            )));
        }
        if !valid_tag(tag) {
            return Err(ImageError::Invalid(format!(
                "{tag:?} is not a tag; expected up to 128 letters, digits, '_', '.' and '-' (like 1.4)"
            )));
        }
        if manifest.len() > MAX_MANIFEST_BYTES {
            return Err(ImageError::Invalid(format!(
                "the manifest has {} bytes; at most {MAX_MANIFEST_BYTES} are accepted",
                manifest.len()
            )));
        }
        let m: Manifest = serde_json::from_slice(manifest).map_err(|e| {
            ImageError::Invalid(format!("the manifest is not an image manifest: {e}"))
        })?;
        if m.schema_version != 2 || m.layers.len() > MAX_LAYERS {
            return Err(ImageError::Invalid(format!(
                "expected schemaVersion 2 and at most {MAX_LAYERS} layers"
            )));
        }
        let mut size = 0u64;
        for d in std::iter::once(&m.config).chain(&m.layers) {
            match self.blob_len(&d.digest) {
                Some(len) if len == d.size => size += len,
                Some(len) => {
                    return Err(ImageError::Invalid(format!(
                        "blob {} has {len} bytes, not the {} the manifest says",
                        d.digest, d.size
                    )));
                }
                None => {
                    return Err(ImageError::Missing(format!(
                        "blob {} is not stored; push it first",
                        d.digest
                    )));
                }
            }
        }
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(manifest)));
        let hex = digest_hex(&digest).unwrap_or_default();
        if self.blobs.len(BlobKey::new(BLOBS, hex))?.is_none() {
            self.blobs.put(BlobKey::new(BLOBS, hex), manifest)?;
        }
        let record = ImageRecord {
            name: name.into(),
            tag: tag.into(),
            digest,
            media_type: m.media_type.unwrap_or_else(|| OCI_MANIFEST.into()),
            size,
            layers: m.layers.len() as u32,
            pushed_unix_ms: now_ms,
            by: by.into(),
        };
        self.store.put_image(&record)?;
        Ok(record)
    }

    /// Every tag, by `name:tag`.
    pub fn list(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.store.images()
    }

    /// Removes tag `name:tag` (its blobs stay for other tags).
    pub fn untag(&self, name: &str, tag: &str) -> Result<bool, StoreError> {
        self.store.delete_image(&format!("{name}:{tag}"))
    }

    /// Answers the path of a distribution API read (after `/v2/`): a manifest by
    /// tag or digest, or a blob by digest. `Err` is the HTTP status and why.
    pub fn resolve(&self, path: &str) -> Result<Resolved, (u16, String)> {
        let bad = |why: String| (400u16, why);
        let (name, kind, reference) = if let Some(i) = path.rfind("/manifests/") {
            (&path[..i], "manifests", &path[i + "/manifests/".len()..])
        } else if let Some(i) = path.rfind("/blobs/") {
            (&path[..i], "blobs", &path[i + "/blobs/".len()..])
        } else {
            return Err(bad(format!("{path:?} names no manifest or blob")));
        };
        if !valid_name(name) {
            return Err(bad(format!("{name:?} is not a repository name")));
        }
        let not_found = |what: String| (404u16, what);
        let by_digest = |digest: &str, media_type: String| {
            let hex = digest_hex(digest)
                .ok_or_else(|| bad(format!("{digest:?} is not a sha256 digest")))?;
            let key = BlobKey::new(BLOBS, hex);
            let length = self
                .blobs
                .len(key)
                .map_err(|e| (500u16, e.to_string()))?
                .ok_or_else(|| not_found(format!("{digest} is not stored")))?;
            Ok(Resolved {
                digest: digest.to_string(),
                media_type,
                length,
                path: self.blobs.locate(key),
            })
        };
        match kind {
            "blobs" => by_digest(reference, "application/octet-stream".into()),
            _ if reference.starts_with("sha256:") => {
                let tags = self.store.images().map_err(|e| (500u16, e.to_string()))?;
                let tagged = tags
                    .iter()
                    .find(|r| r.name == name && r.digest == reference)
                    .ok_or_else(|| not_found(format!("{name}@{reference} is not stored")))?;
                by_digest(reference, tagged.media_type.clone())
            }
            _ => {
                if !valid_tag(reference) {
                    return Err(bad(format!("{reference:?} is not a tag")));
                }
                let tags = self.store.images().map_err(|e| (500u16, e.to_string()))?;
                let tagged = tags
                    .iter()
                    .find(|r| r.name == name && r.tag == reference)
                    .ok_or_else(|| not_found(format!("{name}:{reference} is not stored")))?;
                by_digest(&tagged.digest, tagged.media_type.clone())
            }
        }
    }
}

/// Answers one [`RegistryRequest`](novacron_common::wire::RegistryRequest) on
/// `send`: the [`RegistryReply`](novacron_common::wire::RegistryReply), then the
/// bytes for a `GET` that found something. Returns the bytes sent.
pub async fn serve_registry<W>(
    images: Arc<Images>,
    request: &novacron_common::wire::RegistryRequest,
    send: &mut W,
) -> io::Result<u64>
where
    W: tokio::io::AsyncWrite + Unpin + Send,
{
    use novacron_common::wire::{self, MAX_REGISTRY_PATH, RegistryReply};
    let path = request.path.clone();
    let resolved = if path.len() > MAX_REGISTRY_PATH {
        Err((400, format!("a path of {} bytes is too long", path.len())))
    } else {
        // Reads the tag records and stats a file: off the async workers.
        tokio::task::spawn_blocking(move || images.resolve(&path))
            .await
            .unwrap_or_else(|e| Err((500, e.to_string())))
    };
    let reply = match &resolved {
        Ok(r) => RegistryReply {
            status: 200,
            media_type: r.media_type.clone(),
            digest: Some(r.digest.clone()),
            length: r.length,
            message: String::new(),
        },
        Err((status, why)) => RegistryReply {
            status: *status,
            media_type: "application/json".into(),
            digest: None,
            length: 0,
            message: why.clone(),
        },
    };
    wire::write_frame(send, &reply)
        .await
        .map_err(io::Error::other)?;
    let Ok(r) = resolved else { return Ok(0) };
    if request.head {
        return Ok(0);
    }
    let mut file = tokio::fs::File::open(&r.path).await?;
    tokio::io::copy(&mut file, send).await
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::state::store::MemoryStore;

    fn put_blob(images: &Images, data: &[u8]) -> String {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
        let upload = format!("u{}", data.len());
        std::fs::write(images.partial_path(&upload).expect("path"), data).expect("write");
        images.commit(&upload, &digest).expect("commit");
        digest
    }

    #[test]
    fn manifests_name_stored_blobs_and_resolve_by_tag_and_digest() {
        let dir = tempfile::tempdir().expect("dir");
        let images = Images::open(dir.path(), Arc::new(MemoryStore::new())).expect("open");
        let config = put_blob(&images, b"{}");
        let layer = put_blob(&images, b"layer bytes");
        let again = put_blob(&images, b"layer bytes");
        assert_eq!(layer, again, "stored once");
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"digest":"{config}","size":2}},"layers":[{{"digest":"{layer}","size":11}}]}}"#
        );
        let record = images
            .put_manifest("team/api", "1.4", manifest.as_bytes(), "me", 1)
            .expect("tagged");
        assert_eq!((record.size, record.layers), (13, 1));
        let by_tag = images.resolve("team/api/manifests/1.4").expect("tag");
        assert_eq!(by_tag.digest, record.digest);
        assert_eq!(by_tag.media_type, OCI_MANIFEST);
        let by_digest = images
            .resolve(&format!("team/api/manifests/{}", record.digest))
            .expect("digest");
        assert_eq!(by_digest, by_tag);
        let blob = images
            .resolve(&format!("team/api/blobs/{layer}"))
            .expect("blob");
        assert_eq!(std::fs::read(blob.path).expect("read"), b"layer bytes");
        assert_eq!(
            images.resolve("team/api/manifests/9").map_err(|e| e.0),
            Err(404)
        );
        assert_eq!(
            images.resolve("Team/api/manifests/1").map_err(|e| e.0),
            Err(400)
        );
        assert_eq!(images.resolve("../etc/blobs/x").map_err(|e| e.0), Err(400));
        // A manifest naming a blob that is not stored, or with the wrong size.
        let missing = manifest.replace(&layer, &format!("sha256:{}", "0".repeat(64)));
        assert!(matches!(
            images.put_manifest("team/api", "2", missing.as_bytes(), "me", 1),
            Err(ImageError::Missing(_))
        ));
        let wrong = manifest.replace("\"size\":11", "\"size\":12");
        assert!(matches!(
            images.put_manifest("team/api", "2", wrong.as_bytes(), "me", 1),
            Err(ImageError::Invalid(_))
        ));
        assert!(images.untag("team/api", "1.4").expect("untag"));
        assert_eq!(
            images.resolve("team/api/manifests/1.4").map_err(|e| e.0),
            Err(404)
        );
    }

    #[test]
    fn names_and_tags_follow_the_distribution_grammar() {
        for ok in ["api", "team/api", "registry.example/team/my_app", "a-b.c"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "Api", "team//api", "-a", "a-", "host:5000/a", "../a"] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(valid_tag("1.4") && valid_tag("_x") && !valid_tag(".x") && !valid_tag("a/b"));
        assert!(digest_hex(&format!("sha256:{}", "a".repeat(64))).is_some());
        assert!(digest_hex("sha256:../x").is_none());
    }
}
