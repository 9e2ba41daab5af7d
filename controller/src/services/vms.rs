//! `VMTemplate`s: machine shapes that jobs name in `spec.task.vm.template`. They
//! are kept in the store (table `vm_templates`) as their manifests; a job version
//! pins the machine it resolved when it was applied
//! ([`crate::state::store::JobVersion::vm`]), so changing or deleting a template
//! never changes a running VM.

use std::time::SystemTime;

pub use novacron_api::{AppliedTemplate, VmTemplateView};
use novacron_common::clock::unix_ms;
use novacron_common::manifest::vm::{TEMPLATE_KIND, VmTemplateManifest, VmTemplateSpec, resolve};
use novacron_common::manifest::vm_templates::parse_vm_templates;
use novacron_common::manifest::{API_VERSION, Metadata, VmTask, VmTemplate};

use crate::state::store::{PoolManifestRecord, Store, StoreError};

/// Why applying or deleting templates failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The manifest is invalid (the message locates it).
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Every stored template, parsed (a record that no longer parses is skipped
/// with a warning: it cannot be used, and deleting it stays possible).
pub fn templates(store: &dyn Store) -> Result<Vec<VmTemplate>, StoreError> {
    Ok(records(store)?
        .into_iter()
        .filter_map(|(r, t)| {
            if t.is_none() {
                tracing::warn!(template = %r.name, "a stored VM template no longer parses");
            }
            t
        })
        .collect())
}

fn records(store: &dyn Store) -> Result<Vec<(PoolManifestRecord, Option<VmTemplate>)>, StoreError> {
    Ok(store
        .vm_templates()?
        .into_iter()
        .map(|r| {
            let t = parse_vm_templates(&r.file, &r.source)
                .ok()
                .and_then(|mut v| v.pop());
            (r, t)
        })
        .collect())
}

/// The templates as shown.
pub fn views(store: &dyn Store) -> Result<Vec<VmTemplateView>, StoreError> {
    Ok(records(store)?
        .into_iter()
        .filter_map(|(r, t)| {
            let t = t?;
            let vm = resolve(&VmTask::default(), Some(&t.spec));
            Some(VmTemplateView {
                name: t.name,
                vcpus: vm.vcpus,
                memory_bytes: vm.memory_mib << 20,
                kernel: vm.kernel,
                initrd: vm.initrd,
                cmdline: vm.cmdline,
                disk: vm.disk,
                disk_bytes: vm.disk_bytes,
                machine: vm.machine,
                user_data: vm.user_data.is_some(),
                file: r.file,
                applied_unix_ms: r.applied_unix_ms,
                by: r.by,
            })
        })
        .collect())
}

/// Applies a file of `VMTemplate` documents: all are checked before any is stored.
pub fn apply(
    store: &dyn Store,
    file: &str,
    text: &str,
    by: &str,
    now: SystemTime,
) -> Result<Vec<AppliedTemplate>, VmError> {
    let parsed = parse_vm_templates(file, text).map_err(|e| VmError::Invalid(e.to_string()))?;
    let old = store.vm_templates()?;
    let mut applied = Vec::new();
    for t in parsed {
        let source = canonical(&t.name, &t.spec);
        let outcome = match old.iter().find(|r| r.name == t.name) {
            None => "created",
            Some(r) if r.source == source => "unchanged",
            Some(_) => "updated",
        };
        if outcome != "unchanged" {
            store.put_vm_template(&PoolManifestRecord {
                name: t.name.clone(),
                file: file.to_owned(),
                source,
                applied_unix_ms: unix_ms(now),
                by: by.to_owned(),
            })?;
        }
        applied.push(AppliedTemplate {
            name: t.name,
            outcome: outcome.to_owned(),
        });
    }
    Ok(applied)
}

/// The one-document manifest a template is stored as.
fn canonical(name: &str, spec: &VmTemplateSpec) -> String {
    let m = VmTemplateManifest {
        api_version: API_VERSION.to_owned(),
        kind: TEMPLATE_KIND.to_owned(),
        metadata: Metadata {
            name: name.to_owned(),
            labels: Default::default(),
        },
        spec: spec.clone(),
    };
    yaml_serde::to_string(&m).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::MemoryStore;

    #[test]
    fn templates_apply_list_and_report_unchanged() {
        let store = MemoryStore::default();
        let text = "apiVersion: novacron.io/v1\nkind: VMTemplate\nmetadata: {name: small}\nspec: {vcpus: 2, memory: 512Mi}\n";
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000);
        let a = apply(&store, "t.yaml", text, "admin", now).expect("apply");
        assert_eq!(a[0].outcome, "created");
        let again = apply(&store, "t.yaml", text, "admin", now).expect("apply");
        assert_eq!(again[0].outcome, "unchanged");
        let v = views(&store).expect("views");
        assert_eq!((v[0].vcpus, v[0].memory_bytes), (2, 512 << 20));
        assert_eq!(v[0].kernel, "/boot/vmlinuz");
        let bad = apply(
            &store,
            "b.yaml",
            "apiVersion: novacron.io/v1\nkind: VMTemplate\nmetadata: {name: x}\nspec: {vcpus: 0}\n",
            "admin",
            now,
        )
        .expect_err("invalid");
        assert!(
            bad.to_string().contains("spec.vcpus: 0 is out of range"),
            "{bad}"
        );
        assert_eq!(templates(&store).expect("list").len(), 1);
    }
}
