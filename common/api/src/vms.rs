//! Virtual machine templates as the API shows them (`/v1/vms/templates`).

use serde::{Deserialize, Serialize};

/// What applying did to one `VMTemplate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AppliedTemplate {
    /// Its name.
    pub name: String,
    /// `created`, `updated` or `unchanged`.
    pub outcome: String,
}

/// A template as `GET /v1/vms/templates` shows it: its fields with the defaults
/// filled in, and who applied it when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VmTemplateView {
    /// Its name.
    pub name: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory, bytes.
    pub memory_bytes: u64,
    /// The kernel's path in the image.
    pub kernel: String,
    /// The initrd's path in the image.
    pub initrd: Option<String>,
    /// The kernel command line.
    pub cmdline: String,
    /// The base disk's path in the image.
    pub disk: Option<String>,
    /// The overlay disk's size, bytes (0: the base disk's).
    pub disk_bytes: u64,
    /// The QEMU machine.
    pub machine: String,
    /// Whether it carries cloud-init user data.
    #[serde(default)]
    pub user_data: bool,
    /// The file it was applied from.
    pub file: String,
    /// When (Unix ms).
    pub applied_unix_ms: u64,
    /// By whom.
    pub by: String,
}
