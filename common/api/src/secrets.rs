//! Secret bodies: `GET /v1/secrets`, `PUT /v1/secrets/{name}`, `POST /v1/secrets`
//! (a manifest) and `DELETE /v1/secrets/{name}`. No answer ever holds a value.

use std::collections::BTreeMap;
use std::fmt;

use novacron_common::manifest::secret::SecretType;
use serde::{Deserialize, Serialize};

/// A secret as the API shows it: names, versions and sizes, never values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SecretView {
    /// Name.
    pub name: String,
    /// `opaque` or `registry`.
    #[serde(rename = "type")]
    pub secret_type: SecretType,
    /// The latest version.
    pub version: u64,
    /// Every version kept (older ones still used by a job version), oldest first.
    pub versions: Vec<u64>,
    /// The latest version's keys.
    pub keys: Vec<String>,
    /// Bytes of the latest version's values.
    pub bytes: u64,
    /// When the latest version was set (Unix ms).
    pub updated_unix_ms: u64,
    /// Who set it.
    pub updated_by: String,
    /// Jobs whose current version uses it, with the version each uses.
    pub used_by: Vec<SecretUser>,
}

/// A job that uses a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SecretUser {
    /// The job.
    pub job: String,
    /// The secret version its current version runs.
    pub secret_version: u64,
}

/// `PUT /v1/secrets/{name}`: the whole new value set (a new version). Its
/// [`fmt::Debug`] shows keys only.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SecretSetRequest {
    /// `opaque` (default) or `registry`.
    #[serde(default, rename = "type")]
    pub secret_type: SecretType,
    /// Key → value.
    pub data: BTreeMap<String, String>,
}

impl fmt::Debug for SecretSetRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretSetRequest")
            .field("secret_type", &self.secret_type)
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// What setting a secret did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SecretSetResult {
    /// The secret.
    pub secret: String,
    /// Its latest version now.
    pub version: u64,
    /// `created`, `updated` (a new version) or `unchanged` (same type and values).
    pub outcome: String,
    /// Jobs that roll out to the new version: each job and its new version.
    pub rolled: Vec<JobRoll>,
}

/// A job version created because a secret it uses changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobRoll {
    /// The job.
    pub job: String,
    /// Its new version, rolling out.
    pub version: u64,
}
