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

/// The label on a sandbox: the runc container it holds the network of.
pub const LABEL_SANDBOX: &str = "novacron.sandbox-of";

/// What an image says about how to run it (Docker's image `Config`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageRun {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env` (`KEY=value`).
    pub env: Vec<String>,
    /// `WorkingDir`.
    pub working_dir: String,
    /// `User`.
    pub user: String,
}

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
        let program = pause_program(std::env::consts::ARCH).ok_or_else(|| {
            daemon(
                "sandbox image",
                format!(
                    "no sandbox program for {}: agent-owned containers are not supported here",
                    std::env::consts::ARCH
                ),
            )
        })?;
        let rootfs = program_rootfs(SANDBOX_PROGRAM.trim_start_matches('/'), &program)
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
    /// Every sandbox of `node` on this daemon (several agents may share a
    /// daemon): (its id, the runc container it serves).
    pub async fn sandboxes(&self, node: &str) -> Result<Vec<(String, String)>, RuntimeError> {
        let docker = self.client().await?;
        let options = bollard::query_parameters::ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&HashMap::from([(
                "label",
                vec![
                    LABEL_SANDBOX.to_owned(),
                    format!("{}={node}", crate::runtime::LABEL_NODE),
                ],
            )]))
            .build();
        let listed = timed("list", CALL_TIMEOUT, docker.list_containers(Some(options))).await?;
        Ok(listed
            .into_iter()
            .filter_map(|c| {
                let of = c.labels?.get(LABEL_SANDBOX)?.clone();
                Some((c.id?, of))
            })
            .collect())
    }
}

/// An image's root file system holding only `program` at `/<name>` (mode
/// 0755): the live probe's and the sandboxes' images.
pub fn program_rootfs(name: &str, program: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(program.len() as u64);
    header.set_mode(0o755);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, name, program)?;
    tar.into_inner()
}

/// A static program that only waits (the `pause` system call, in a loop), for
/// `arch` (`std::env::consts::ARCH`): a static ELF executable without libc, so
/// its image needs nothing but this file. The live probe's container and the
/// sandboxes of runc containers run it. `None` for architectures without one.
pub fn pause_program(arch: &str) -> Option<Vec<u8>> {
    // (e_machine, machine code). x86-64: `mov eax, 34 (pause); syscall; jmp back`.
    // AArch64: `mov x0..x3, 0; mov x8, 73 (ppoll); svc 0; b back`.
    let (machine, code): (u16, Vec<u8>) = match arch {
        "x86_64" => (0x3e, vec![0xb8, 34, 0, 0, 0, 0x0f, 0x05, 0xeb, 0xf7]),
        "aarch64" => (
            0xb7,
            [
                0xd280_0000u32,
                0xd280_0001,
                0xd280_0002,
                0xd280_0003,
                0xd280_0928,
                0xd400_0001,
                0x17ff_fffa,
            ]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect(),
        ),
        _ => return None,
    };
    Some(static_elf(machine, &code))
}

/// A 64-bit little-endian ELF executable whose one loadable segment (read and
/// execute, at 0x400000) holds the headers and `code`, entered at `code`.
fn static_elf(machine: u16, code: &[u8]) -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    const EHSIZE: u16 = 64;
    const PHSIZE: u16 = 56;
    let total = u64::from(EHSIZE + PHSIZE) + code.len() as u64;
    let mut elf = Vec::with_capacity(total as usize);
    // e_ident: ELFCLASS64, ELFDATA2LSB, EV_CURRENT, System V ABI.
    elf.extend_from_slice(b"\x7fELF");
    elf.extend_from_slice(&[2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&machine.to_le_bytes());
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&(BASE + u64::from(EHSIZE + PHSIZE)).to_le_bytes()); // e_entry
    elf.extend_from_slice(&u64::from(EHSIZE).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for half in [EHSIZE, PHSIZE, 1, 0, 0, 0] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // PF_R | PF_X
    for word in [0, BASE, BASE, total, total, 0x1000] {
        // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.extend_from_slice(code);
    elf
}
