//! Image store bodies: `GET /v1/images` and `PUT /v1/images/manifests` answer
//! [`ImageRecord`]s; the controller's store keeps the same records.

use serde::{Deserialize, Serialize};

/// An image tag in the controller's image store: the manifest it names (its
/// blobs are in the image blob store, content-addressed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageRecord {
    /// The repository (`team/api`).
    pub name: String,
    /// The tag (`1.4`).
    pub tag: String,
    /// The manifest's digest (`sha256:...`).
    pub digest: String,
    /// The manifest's media type.
    pub media_type: String,
    /// Bytes of its config and layers.
    pub size: u64,
    /// Its layers.
    pub layers: u32,
    /// When it was pushed (Unix ms).
    pub pushed_unix_ms: u64,
    /// Who pushed it.
    pub by: String,
}

impl ImageRecord {
    /// `name:tag`, its key.
    pub fn key(&self) -> String {
        format!("{}:{}", self.name, self.tag)
    }
}
