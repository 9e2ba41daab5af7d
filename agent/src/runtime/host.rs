//! [`HostRuntime`]: the node's one [`ContainerRuntime`], Docker's containers,
//! the agent's own runc containers and its virtual machines together.
//! Operations on an id go to the runtime that owns it (VM ids begin with
//! [`vm::ID_PREFIX`], runc containers' with [`oci::ID_PREFIX`]); a create goes
//! to the VM driver when the config has a
//! [`VmSpec`](novacron_common::wire::VmSpec), to the runc driver when the node
//! runs its containers under runc (GPU tasks excepted: the NVIDIA hook is
//! Docker's), to Docker otherwise. Images are always Docker's: a VM's disk
//! image is a container image, and a runc container's files are exported
//! from its image.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::BoxStream;
use novacron_common::wire::{ImageInventory, PullProgress, RegistryAuth, TerminalSize};

use super::oci::{self, OciDriver};
use super::vm::{self, VmDriver};
use super::{
    ContainerConfig, ContainerDetails, ContainerEvent, ContainerListing, ContainerRuntime,
    DockerRuntime, ExecSession, ExecState, InteractiveExec, LogFrame, PullError, RuntimeError,
    StatsReading, images::LocalImage,
};

/// Docker plus, where QEMU is installed, the VM driver.
#[derive(Debug, Clone)]
pub struct HostRuntime {
    docker: DockerRuntime,
    vms: Option<Arc<VmDriver>>,
    oci: Option<Arc<OciDriver>>,
}

impl HostRuntime {
    /// Containers only.
    pub fn new(docker: DockerRuntime) -> Self {
        HostRuntime {
            docker,
            vms: None,
            oci: None,
        }
    }

    /// Containers and virtual machines.
    pub fn with_vms(mut self, vms: Option<Arc<VmDriver>>) -> Self {
        self.vms = vms;
        self
    }

    /// Containers under runc, when `oci` is given.
    pub fn with_oci(mut self, oci: Option<Arc<OciDriver>>) -> Self {
        self.oci = oci;
        self
    }

    /// The runc driver, when this node runs its containers under runc.
    pub fn oci(&self) -> Option<&Arc<OciDriver>> {
        self.oci.as_ref()
    }

    /// The VM driver, when this node runs VMs.
    pub fn vms(&self) -> Option<&Arc<VmDriver>> {
        self.vms.as_ref()
    }

    /// The Docker runtime.
    pub fn docker(&self) -> &DockerRuntime {
        &self.docker
    }

    fn driver(&self, op: &'static str) -> Result<&Arc<VmDriver>, RuntimeError> {
        self.vms.as_ref().ok_or_else(|| RuntimeError::Daemon {
            op,
            message: format!(
                "this node runs no virtual machines ({} is not installed)",
                vm::QEMU_BINARY
            ),
        })
    }

    fn oci_driver(&self, op: &'static str) -> Result<&Arc<OciDriver>, RuntimeError> {
        self.oci.as_ref().ok_or_else(|| RuntimeError::Daemon {
            op,
            message: "this node does not run containers under runc (container_runtime is docker)"
                .to_owned(),
        })
    }
}

fn no_interactive(op: &'static str) -> RuntimeError {
    RuntimeError::Daemon {
        op,
        message: "interactive and attached exec are not supported in runc containers yet; use a non-interactive command"
            .to_owned(),
    }
}

fn no_exec(op: &'static str) -> RuntimeError {
    RuntimeError::Daemon {
        op,
        message: "a virtual machine runs no commands from its node: attach its serial console with `novacron vm console NAME -i`, or reach it over its network"
            .to_owned(),
    }
}

impl ContainerRuntime for HostRuntime {
    async fn list(&self, node: &str) -> Result<Vec<ContainerListing>, RuntimeError> {
        let mut all = self.docker.list(node).await?;
        if let Some(vms) = &self.vms {
            all.extend(vms.list(node).await?);
        }
        if let Some(oci) = &self.oci {
            all.extend(oci.list(node).await?);
        }
        Ok(all)
    }

    async fn inspect(&self, id: &str) -> Result<ContainerDetails, RuntimeError> {
        if vm::is_vm(id) {
            return self.driver("inspect")?.inspect(id).await;
        }
        if oci::is_oci(id) {
            return self.oci_driver("inspect")?.inspect(id).await;
        }
        self.docker.inspect(id).await
    }

    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        self.docker.image_present(image).await
    }

    async fn local_images(&self) -> Result<Vec<LocalImage>, RuntimeError> {
        self.docker.local_images().await
    }

    async fn images_in_use(&self) -> Result<HashSet<String>, RuntimeError> {
        let mut used = self.docker.images_in_use().await?;
        if let Some(vms) = &self.vms {
            used.extend(vms.images_in_use());
        }
        if let Some(oci) = &self.oci {
            used.extend(oci.images_in_use());
        }
        Ok(used)
    }

    async fn remove_image(&self, reference: &str) -> Result<(), RuntimeError> {
        self.docker.remove_image(reference).await
    }

    async fn tag(&self, source: &str, target: &str) -> Result<(), RuntimeError> {
        self.docker.tag(source, target).await
    }

    async fn image_inventory(&self) -> Result<ImageInventory, RuntimeError> {
        self.docker.image_inventory().await
    }

    async fn repo_digests(&self, image: &str) -> Result<Vec<String>, RuntimeError> {
        self.docker.repo_digests(image).await
    }

    async fn pull(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
        progress: &(dyn Fn(PullProgress) + Send + Sync),
    ) -> Result<(), PullError> {
        self.docker.pull(image, auth, progress).await
    }

    async fn create(&self, name: &str, config: &ContainerConfig) -> Result<String, RuntimeError> {
        let Some(spec) = &config.vm else {
            return match &self.oci {
                Some(oci) if config.gpu_uuids.is_empty() => oci.create(name, config).await,
                _ => self.docker.create(name, config).await,
            };
        };
        let vms = self.driver("create")?;
        // The image's files, copied out once per image id.
        let image_id = self.docker.image_id(&config.image).await?;
        let dir = vms.image_dir(&image_id);
        let mut paths = vec![spec.kernel.clone()];
        paths.extend(spec.initrd.iter().cloned());
        paths.extend(spec.disk.iter().cloned());
        super::image_files::ensure(&dir, &paths, |scratch, missing| async move {
            self.docker
                .copy_from_image(&config.image, &missing, &scratch)
                .await
                .map(drop)
        })
        .await
        .map_err(|message| RuntimeError::Daemon {
            op: "create",
            message: format!("the files of image {}: {message}", config.image),
        })?;
        vms.create(
            name,
            config,
            spec,
            &image_id,
            &dir,
            self.docker.publish_address(),
        )
        .await
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        if vm::is_vm(id) {
            return self.driver("start")?.start(id).await;
        }
        if oci::is_oci(id) {
            return self.oci_driver("start")?.start(id).await;
        }
        self.docker.start(id).await
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        if vm::is_vm(id) {
            return self.driver("stop")?.stop(id, grace).await;
        }
        if oci::is_oci(id) {
            return self.oci_driver("stop")?.stop(id, grace).await;
        }
        self.docker.stop(id, grace).await
    }

    async fn set_paused(&self, id: &str, paused: bool) -> Result<(), RuntimeError> {
        if vm::is_vm(id) {
            return self.driver("pause")?.set_paused(id, paused).await;
        }
        if oci::is_oci(id) {
            return self.oci_driver("pause")?.set_paused(id, paused).await;
        }
        self.docker.set_paused(id, paused).await
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        if vm::is_vm(id) {
            return self.driver("remove")?.remove(id).await;
        }
        if oci::is_oci(id) {
            return self.oci_driver("remove")?.remove(id).await;
        }
        self.docker.remove(id).await
    }

    async fn stats(&self, id: &str) -> Result<StatsReading, RuntimeError> {
        if vm::is_vm(id) {
            return self.driver("stats")?.stats(id).await;
        }
        if oci::is_oci(id) {
            return self.oci_driver("stats")?.stats(id).await;
        }
        self.docker.stats(id).await
    }

    async fn exec(&self, id: &str, command: &[String]) -> Result<i64, RuntimeError> {
        if vm::is_vm(id) {
            return Err(no_exec("exec"));
        }
        if oci::is_oci(id) {
            return self.oci_driver("exec")?.exec(id, command).await;
        }
        self.docker.exec(id, command).await
    }

    async fn exec_attached(
        &self,
        id: &str,
        command: &[String],
    ) -> Result<ExecSession, RuntimeError> {
        if vm::is_vm(id) {
            return Err(no_exec("exec"));
        }
        if oci::is_oci(id) {
            return Err(no_interactive("exec"));
        }
        self.docker.exec_attached(id, command).await
    }

    async fn exec_interactive(
        &self,
        id: &str,
        command: &[String],
        tty: Option<TerminalSize>,
    ) -> Result<InteractiveExec, RuntimeError> {
        if vm::is_vm(id) {
            // A VM runs no commands from its node; its serial console is the
            // one interactive session it has.
            if command != [vm::CONSOLE_COMMAND] {
                return Err(no_exec("exec"));
            }
            return self.driver("console")?.console(id).await;
        }
        if oci::is_oci(id) {
            return Err(no_interactive("exec"));
        }
        self.docker.exec_interactive(id, command, tty).await
    }

    async fn exec_resize(&self, exec_id: &str, size: TerminalSize) -> Result<(), RuntimeError> {
        if exec_id.starts_with(vm::CONSOLE_PREFIX) {
            // A serial line has no size.
            return Ok(());
        }
        self.docker.exec_resize(exec_id, size).await
    }

    async fn exec_state(&self, exec_id: &str) -> Result<ExecState, RuntimeError> {
        if exec_id.starts_with(vm::CONSOLE_PREFIX) {
            // A console session has no process: it is over once its output
            // ended (the client left, or QEMU did).
            return Ok(ExecState {
                running: false,
                exit_code: Some(0),
                pid: None,
            });
        }
        self.docker.exec_state(exec_id).await
    }

    async fn exec_kill(&self, exec_id: &str) -> Result<(), RuntimeError> {
        if exec_id.starts_with(vm::CONSOLE_PREFIX) {
            // Dropping the session's streams closes its connection.
            return Ok(());
        }
        self.docker.exec_kill(exec_id).await
    }

    fn logs(
        &self,
        id: &str,
        follow: bool,
        tail: u32,
    ) -> BoxStream<'static, Result<LogFrame, RuntimeError>> {
        if vm::is_vm(id) {
            return match &self.vms {
                Some(vms) => vms.logs(id, follow, tail),
                None => futures_util::StreamExt::boxed(futures_util::stream::iter([Err(
                    RuntimeError::NotFound {
                        op: "logs",
                        message: format!("no virtual machine {id}"),
                    },
                )])),
            };
        }
        if oci::is_oci(id) {
            return match &self.oci {
                Some(oci) => oci.logs(id, follow, tail),
                None => futures_util::StreamExt::boxed(futures_util::stream::iter([Err(
                    RuntimeError::NotFound {
                        op: "logs",
                        message: format!("no runc container {id}"),
                    },
                )])),
            };
        }
        self.docker.logs(id, follow, tail)
    }

    fn events(&self, node: &str) -> BoxStream<'static, Result<ContainerEvent, RuntimeError>> {
        // VMs and runc containers change state without events; the
        // supervisor's poll finds them.
        self.docker.events(node)
    }
}
