//! Snapshots of virtual machines: the bundle's `vm/state` is QEMU's migration
//! stream (memory and devices) written to a file instead of a peer, with the
//! same pre-copy as a live migration (the guest runs while its memory is
//! copied and pauses only for the last pages), and a restore is QEMU started
//! with `-incoming`, fed that file. The snapshot goes into the cache and the
//! controller's store like a container's bundle, so periodic checkpoints and
//! the recovery of a lost node's allocation work for VMs unchanged.

use std::time::Instant;

use novacron_common::checkpoint::{BUNDLE_FORMAT, BundleInfo, BundleMeta, CheckpointMode};
use novacron_common::wire::{PROTOCOL_VERSION, VmSendRequest};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::bundle::{Budget, VM_DISK, VM_STATE, unpack};
use super::cache::ensure_space;
use super::{CheckpointError, Checkpointer, blocking, now_ms};
use crate::runtime::vm::VmDriver;

/// The longest pause planned for a snapshot's last pages.
const SNAPSHOT_DOWNTIME_MS: u64 = 300;
/// How long the guest may run while its memory is copied before it is paused.
const SNAPSHOT_CONVERGE_MS: u64 = 60_000;
/// How long a snapshot may take.
const SNAPSHOT_LIMIT_MS: u64 = 300_000;

/// Why a snapshot of a guest that had bridged address `snapshot` cannot be
/// restored into a guest that gets `here` on this node (`None`: not bridged
/// here); `None` when it can. A restored guest keeps the address it had (it
/// is in its memory, set from `ip=` or cloud-init at boot), while this node's
/// bridge, its DNAT rules and its neighbours expect `here`: restored, it
/// would run unreachable. Booted afresh, it takes `here`. Pure.
pub fn address_problem(
    snapshot: Option<std::net::Ipv4Addr>,
    here: Option<std::net::Ipv4Addr>,
) -> Option<String> {
    let had = snapshot?;
    match here {
        Some(here) if here == had => None,
        Some(here) => Some(format!(
            "the guest had address {had} on its node's VM bridge, which a restored guest keeps, but this node gives it {here} (its bridge has another range), so it would be unreachable; it must boot afresh here"
        )),
        None => Some(format!(
            "the guest had address {had} on its node's VM bridge, and here it is not on a bridge, so a restored guest would be unreachable; it must boot afresh here"
        )),
    }
}

impl Checkpointer {
    /// Snapshots VM `vm_id` of allocation `alloc` into a bundle. The guest runs
    /// while its memory is copied and is paused for the last pages; it runs on
    /// afterwards unless `keep_paused` (a migration that stops the source).
    /// `dump_ms` is how long it was paused.
    #[allow(clippy::too_many_arguments)]
    pub async fn checkpoint_vm(
        &self,
        vms: &VmDriver,
        vm_id: &str,
        alloc: &str,
        job: &str,
        node: &str,
        image: &str,
        keep_paused: bool,
    ) -> Result<BundleInfo, CheckpointError> {
        let failed = |message: String| CheckpointError::Vm {
            vm: vm_id.to_owned(),
            message,
        };
        let stage = self.temp_dir(".stage-")?;
        let state_path = stage.path().join(VM_STATE);
        let dir = state_path.parent().unwrap_or(stage.path()).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|source| CheckpointError::Io {
            what: "creating",
            path: dir.clone(),
            source,
        })?;
        let mut file = tokio::fs::File::create(&state_path)
            .await
            .map_err(|source| CheckpointError::Io {
                what: "creating",
                path: state_path.clone(),
                source,
            })?;
        let created_unix_ms = now_ms();
        let request = VmSendRequest {
            protocol_version: PROTOCOL_VERSION,
            alloc_id: alloc.to_owned(),
            with_disk: false,
            hold_ms: 0,
            downtime_limit_ms: SNAPSHOT_DOWNTIME_MS,
            converge_ms: SNAPSHOT_CONVERGE_MS,
            limit_ms: SNAPSHOT_LIMIT_MS,
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
        let mut budget = Budget::new(self.max_bytes);
        // The writer owns the receiver: when it fails (the size limit, a full
        // disk), the receiver goes and QEMU's stream is cancelled at once,
        // instead of waiting, guest paused, for a reader that is gone.
        let (file, budget_used, state_path) = (&mut file, &mut budget, &state_path);
        let write = async move {
            let budget = budget_used;
            while let Some(chunk) = rx.recv().await {
                budget.add(chunk.len() as u64, "the VM's memory")?;
                file.write_all(&chunk)
                    .await
                    .map_err(|source| CheckpointError::Io {
                        what: "writing",
                        path: state_path.clone(),
                        source,
                    })?;
            }
            file.flush().await.map_err(|source| CheckpointError::Io {
                what: "writing",
                path: state_path.clone(),
                source,
            })
        };
        let started = Instant::now();
        let (sent, written) = tokio::join!(vms.send_migration(vm_id, &request, tx, |_| {}), write);
        let paused_since = Instant::now();
        let mut outcome = match (sent, written) {
            (Ok(p), Ok(())) => Ok(p),
            (Err(e), _) => Err(failed(e)),
            (Ok(_), Err(e)) => Err(e),
        };
        // The guest is paused and QEMU has flushed its disk: a copy of the
        // overlay now agrees with the memory.
        if outcome.is_ok()
            && let Some(disk) = vms.disk(vm_id)
        {
            let to = stage.path().join(VM_DISK);
            let copied = tokio::fs::copy(&disk, &to)
                .await
                .map_err(|source| CheckpointError::Io {
                    what: "copying the disk into",
                    path: to.clone(),
                    source,
                })
                .and_then(|n| budget.add(n, "the VM's disk"));
            if let Err(e) = copied {
                outcome = Err(e);
            }
        }
        if outcome.is_err() || !keep_paused {
            let resumed = vms.resume_after_abort(vm_id).await;
            if let Err(e) = resumed {
                warn!(vm = %vm_id, error = %e, "cannot resume the guest after its snapshot");
                if outcome.is_ok() {
                    return Err(failed(format!("resuming after the snapshot: {e}")));
                }
            }
        }
        let progress = outcome?;
        let dump_ms = progress.downtime_ms.unwrap_or(0)
            + u64::try_from(paused_since.elapsed().as_millis()).unwrap_or(u64::MAX);
        let meta = BundleMeta {
            format: BUNDLE_FORMAT,
            mode: CheckpointMode::Live,
            alloc: alloc.to_owned(),
            job: job.to_owned(),
            image: image.to_owned(),
            criu_name: None,
            deleted: Vec::new(),
            volumes: Vec::new(),
            created_unix_ms,
            container: None,
            vm: true,
            runc: false,
            vm_address: vms.bridged_address(vm_id),
        };
        let bundle = self.seal(stage, &meta, budget.used, node, dump_ms).await?;
        info!(vm = %vm_id, alloc, digest = %bundle.digest, size = bundle.size, state_bytes = budget.used, rounds = progress.rounds, dump_ms, total_ms = started.elapsed().as_millis(), "virtual machine snapshot written");
        Ok(bundle)
    }

    /// Restores the cached VM snapshot `digest` into VM `vm_id`, created (not
    /// started) from the snapshot's image with the caller's config: QEMU starts
    /// waiting for its state, is fed `vm/state`, and runs from there. An error
    /// can leave the VM's QEMU exited, so the caller removes it.
    pub async fn restore_vm(
        &self,
        vms: &VmDriver,
        digest: &str,
        vm_id: &str,
    ) -> Result<(), CheckpointError> {
        let failed = |message: String| CheckpointError::Vm {
            vm: vm_id.to_owned(),
            message,
        };
        let size = self.verify(digest).await?;
        ensure_space(&self.cache_dir, size)?;
        let stage = self.temp_dir(".restore-")?;
        let bundle = self.bundle_path(digest)?;
        let dest = stage.path().to_path_buf();
        let limit = self.max_bytes;
        let started = Instant::now();
        let meta = blocking(move || unpack(&bundle, &dest, limit)).await?;
        if !meta.vm {
            return Err(CheckpointError::BadBundle {
                bundle: digest.to_owned(),
                reason: "it is a container's checkpoint, not a virtual machine's snapshot"
                    .to_owned(),
            });
        }
        // Before QEMU starts: the controller then starts the VM afresh.
        if let Some(why) = address_problem(meta.vm_address, vms.bridged_address(vm_id)) {
            return Err(failed(why));
        }
        let state_path = stage.path().join(VM_STATE);
        let mut state =
            tokio::fs::File::open(&state_path)
                .await
                .map_err(|source| CheckpointError::Io {
                    what: "opening",
                    path: state_path.clone(),
                    source,
                })?;
        let disk = stage.path().join(VM_DISK);
        match (disk.is_file(), vms.disk(vm_id).is_some()) {
            (true, _) => vms.adopt_disk(vm_id, &disk).await.map_err(failed)?,
            (false, true) => {
                return Err(failed(
                    "the snapshot has no disk and this virtual machine has one".to_owned(),
                ));
            }
            (false, false) => {}
        }
        vms.start_incoming(vm_id)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let conn = vms
            .incoming_connection(vm_id, std::time::Duration::from_secs(30))
            .await
            .map_err(failed)?;
        let bytes = vms
            .receive_migration(vm_id, &mut state, conn)
            .await
            .map_err(failed)?;
        vms.await_incoming(
            vm_id,
            std::time::Duration::from_millis(SNAPSHOT_LIMIT_MS),
            || true,
        )
        .await
        .map_err(failed)?;
        info!(vm = %vm_id, digest, bytes, total_ms = started.elapsed().as_millis(), "virtual machine restored from its snapshot");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::address_problem;
    use std::net::Ipv4Addr;

    #[test]
    fn a_snapshot_is_restored_only_where_the_guest_keeps_its_address() {
        let a = Ipv4Addr::new(10, 215, 7, 9);
        let b = Ipv4Addr::new(10, 216, 0, 9);
        // The user network, or a bundle from before the address was kept.
        assert_eq!(address_problem(None, Some(b)), None);
        assert_eq!(address_problem(None, None), None);
        // The same range: the same address by the name's hash.
        assert_eq!(address_problem(Some(a), Some(a)), None);
        let other = address_problem(Some(a), Some(b)).expect("another range");
        assert!(
            other.contains("10.215.7.9") && other.contains("10.216.0.9"),
            "{other}"
        );
        assert!(other.contains("boot afresh"), "{other}");
        let none = address_problem(Some(a), None).expect("no bridge");
        assert!(none.contains("not on a bridge"), "{none}");
    }
}
