//! What the agent-owned containers ([`crate::runtime::oci`]) take from Docker:
//! images (their configuration and their files, exported once per image id)
//! and a **sandbox** per container: a Docker container that only waits (the
//! live probe's program, imported as an image) and holds the network namespace
//! that the runc container joins, with Docker's address, published ports, DNS
//! files and volumes, as a Kubernetes pod's pause container does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::query_parameters::CreateImageOptions;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::{CALL_TIMEOUT, DockerRuntime, LABEL_MANAGED, PULL_TIMEOUT, classify, timed};
use crate::runtime::RuntimeError;
use crate::runtime::oci::spec::ImageRun;

/// The sandbox image (tagged with the program's format version).
pub const SANDBOX_IMAGE: &str = "novacron-sandbox:1";
/// The sandbox's program in its image.
pub const SANDBOX_PROGRAM: &str = "/pause";

/// A started sandbox, as the runc container needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxInfo {
    /// The sandbox's process (its network namespace is `/proc/<pid>/ns/net`).
    pub pid: u32,
    /// Docker's `/etc/hosts`, `/etc/resolv.conf` and `/etc/hostname` for it.
    pub etc: Vec<(PathBuf, &'static str)>,
    /// Its mounts: (target in the container, source on the host).
    pub mounts: Vec<(String, PathBuf)>,
}

fn daemon(op: &'static str, message: String) -> RuntimeError {
    RuntimeError::Daemon { op, message }
}

impl DockerRuntime {
    /// Imports [`SANDBOX_IMAGE`] unless it is here.
    pub async fn ensure_sandbox_image(&self) -> Result<(), RuntimeError> {
        if crate::runtime::ContainerRuntime::image_present(self, SANDBOX_IMAGE).await? {
            return Ok(());
        }
        let program =
            crate::checkpoint::pause_program(std::env::consts::ARCH).ok_or_else(|| {
                daemon(
                    "sandbox image",
                    format!(
                        "no sandbox program for {}: agent-owned containers are not supported here",
                        std::env::consts::ARCH
                    ),
                )
            })?;
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(program.len() as u64);
        header.set_mode(0o755);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(
            &mut header,
            SANDBOX_PROGRAM.trim_start_matches('/'),
            &program[..],
        )
        .map_err(|e| daemon("sandbox image", e.to_string()))?;
        let rootfs = tar
            .into_inner()
            .map_err(|e| daemon("sandbox image", e.to_string()))?;
        let (repo, tag) = SANDBOX_IMAGE
            .split_once(':')
            .unwrap_or((SANDBOX_IMAGE, "1"));
        let options = CreateImageOptions {
            from_src: Some("-".to_owned()),
            repo: Some(repo.to_owned()),
            tag: Some(tag.to_owned()),
            changes: vec![format!(r#"ENTRYPOINT ["{SANDBOX_PROGRAM}"]"#)],
            ..Default::default()
        };
        let docker = self.client().await?;
        let import = async {
            let mut stream = std::pin::pin!(docker.create_image(
                Some(options),
                Some(bollard::body_full(rootfs.into())),
                None
            ));
            while let Some(item) = stream.next().await {
                let info = item.map_err(|e| classify("sandbox image", e))?;
                if let Some(message) = info.error_detail.and_then(|d| d.message) {
                    return Err(daemon("sandbox image", message));
                }
            }
            Ok(())
        };
        tokio::time::timeout(CALL_TIMEOUT, import)
            .await
            .map_err(|_| RuntimeError::Timeout {
                op: "sandbox image",
                after: CALL_TIMEOUT,
            })?
    }

    /// The id of image `image` and how it says to run it.
    pub async fn image_run(&self, image: &str) -> Result<(String, ImageRun), RuntimeError> {
        let docker = self.client().await?;
        let inspected = timed("inspect image", CALL_TIMEOUT, docker.inspect_image(image)).await?;
        let config = inspected.config.unwrap_or_default();
        Ok((
            inspected.id.unwrap_or_default(),
            ImageRun {
                entrypoint: config.entrypoint.unwrap_or_default(),
                cmd: config.cmd.unwrap_or_default(),
                env: config.env.unwrap_or_default(),
                working_dir: config.working_dir.unwrap_or_default(),
                user: config.user.unwrap_or_default(),
            },
        ))
    }

    /// Writes the file system of image `image` into `dest` (made; it must not
    /// exist), through a container created and never started (`docker export`),
    /// owners, modes and device nodes kept.
    pub async fn export_image(&self, image: &str, dest: &Path) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        let body = bollard::models::ContainerCreateBody {
            image: Some(image.to_owned()),
            cmd: Some(vec!["/novacron-never-started".to_owned()]),
            network_disabled: Some(true),
            labels: Some(HashMap::from([(
                LABEL_MANAGED.to_owned(),
                "true".to_owned(),
            )])),
            ..Default::default()
        };
        let created = timed(
            "create",
            CALL_TIMEOUT,
            docker.create_container(
                None::<bollard::query_parameters::CreateContainerOptions>,
                body,
            ),
        )
        .await?;
        let tar_path = dest.with_extension("tar");
        let result = async {
            let mut file = tokio::fs::File::create(&tar_path)
                .await
                .map_err(|e| daemon("export", format!("{}: {e}", tar_path.display())))?;
            let mut stream = docker.export_container(&created.id);
            let download = async {
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| classify("export", e))?;
                    file.write_all(&chunk)
                        .await
                        .map_err(|e| daemon("export", format!("{}: {e}", tar_path.display())))?;
                }
                file.flush()
                    .await
                    .map_err(|e| daemon("export", format!("{}: {e}", tar_path.display())))
            };
            tokio::time::timeout(PULL_TIMEOUT, download)
                .await
                .map_err(|_| RuntimeError::Timeout {
                    op: "export",
                    after: PULL_TIMEOUT,
                })??;
            let (from, to) = (tar_path.clone(), dest.to_path_buf());
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                std::fs::create_dir_all(&to)?;
                let mut archive = tar::Archive::new(std::fs::File::open(&from)?);
                archive.set_preserve_permissions(true);
                archive.set_preserve_ownerships(true);
                archive.set_unpack_xattrs(true);
                archive.set_overwrite(true);
                archive.unpack(&to)
            })
            .await
            .map_err(|e| daemon("export", e.to_string()))?
            .map_err(|e| daemon("export", format!("unpacking {image}: {e}")))
        }
        .await;
        let _ = tokio::fs::remove_file(&tar_path).await;
        let _ = crate::runtime::ContainerRuntime::remove(self, &created.id).await;
        result
    }

    /// The started sandbox `id`.
    pub async fn sandbox(&self, id: &str) -> Result<SandboxInfo, RuntimeError> {
        let docker = self.client().await?;
        let inspected = timed(
            "inspect",
            CALL_TIMEOUT,
            docker.inspect_container(
                id,
                None::<bollard::query_parameters::InspectContainerOptions>,
            ),
        )
        .await?;
        let pid = inspected
            .state
            .as_ref()
            .and_then(|s| s.pid)
            .filter(|p| *p > 0)
            .ok_or_else(|| daemon("sandbox", format!("sandbox {id} is not running")))?;
        let mut etc = Vec::new();
        for (path, target) in [
            (inspected.hosts_path, "/etc/hosts"),
            (inspected.resolv_conf_path, "/etc/resolv.conf"),
            (inspected.hostname_path, "/etc/hostname"),
        ] {
            if let Some(p) = path.filter(|p| !p.is_empty()) {
                etc.push((PathBuf::from(p), target));
            }
        }
        let mounts = inspected
            .mounts
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| Some((m.destination?, PathBuf::from(m.source?))))
            .collect();
        Ok(SandboxInfo {
            pid: u32::try_from(pid).unwrap_or(0),
            etc,
            mounts,
        })
    }
}

impl DockerRuntime {
    /// Every sandbox on this daemon: (its id, the runc container it serves).
    pub async fn sandboxes(&self) -> Result<Vec<(String, String)>, RuntimeError> {
        let docker = self.client().await?;
        let options = bollard::query_parameters::ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&HashMap::from([(
                "label",
                vec![crate::runtime::oci::LABEL_SANDBOX],
            )]))
            .build();
        let listed = timed("list", CALL_TIMEOUT, docker.list_containers(Some(options))).await?;
        Ok(listed
            .into_iter()
            .filter_map(|c| {
                let of = c.labels?.get(crate::runtime::oci::LABEL_SANDBOX)?.clone();
                Some((c.id?, of))
            })
            .collect())
    }
}
