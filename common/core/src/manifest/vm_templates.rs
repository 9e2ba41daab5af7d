//! Parsing `kind: VMTemplate` files (apart from [`super::vm`], which the job
//! validation uses, so that the document loader and the job rules do not depend
//! on each other).

use yaml_serde::Value;

use super::ManifestErrors;
use super::document::{self, Kind, Rule};
use super::vm::{TEMPLATE_KIND, VmTemplate, VmTemplateManifest, problems};

/// Parses a file of VM templates separated by `---`.
pub fn parse_vm_templates(file: &str, text: &str) -> Result<Vec<VmTemplate>, ManifestErrors> {
    document::load_all(
        file,
        text,
        &Kind {
            kind: TEMPLATE_KIND,
            noun: "VM template",
        },
        |m: VmTemplateManifest, _: &Value| {
            let mut rules = document::envelope(
                &m.api_version,
                &m.kind,
                TEMPLATE_KIND,
                &m.metadata,
                "VM template",
            );
            rules.extend(
                problems(&m.spec)
                    .into_iter()
                    .map(|(key, message)| Rule::at(format!("spec.{key}"), message)),
            );
            if m.spec.disk.is_none() {
                for (key, set) in [
                    ("diskSize", m.spec.disk_size.is_some()),
                    ("diskBandwidth", m.spec.disk_bandwidth.is_some()),
                    ("diskIops", m.spec.disk_iops.is_some()),
                ] {
                    if set {
                        rules.push(Rule::at(
                            format!("spec.{key}"),
                            format!("{key} needs a base disk (disk)"),
                        ));
                    }
                }
            }
            if rules.is_empty() {
                Ok(VmTemplate {
                    name: m.metadata.name,
                    spec: m.spec,
                })
            } else {
                Err(rules)
            }
        },
        |t: &VmTemplate| &t.name,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ByteSize;

    #[test]
    fn templates_parse_with_located_errors() {
        let ok = parse_vm_templates(
            "t.yaml",
            "apiVersion: novacron.io/v1\nkind: VMTemplate\nmetadata: {name: small}\nspec: {vcpus: 1, memory: 256Mi, initrd: /boot/initrd.img}\n",
        )
        .expect("valid");
        assert_eq!(ok[0].name, "small");
        assert_eq!(ok[0].spec.memory, Some(ByteSize(256 << 20)));
        let bad = parse_vm_templates(
            "t.yaml",
            "apiVersion: novacron.io/v1\nkind: VMTemplate\nmetadata: {name: big}\nspec:\n  vcpus: 99\n  machine: virt\n  diskSize: 1Gi\n",
        )
        .expect_err("invalid")
        .to_string();
        for wanted in [
            "t.yaml:5:10: spec.vcpus: 99 is out of range",
            "t.yaml:6:12: spec.machine: \"virt\" is not a machine",
            "spec.diskSize: diskSize needs a base disk",
        ] {
            assert!(bad.contains(wanted), "{wanted}\n{bad}");
        }
    }
}
