//! `novacron image push|load|list|rm`: the controller's image store, for fleets
//! without a registry. `push` reads an image from this machine's Docker (`docker
//! save`), `load` reads a `docker save` archive; both send the layers the
//! controller does not have yet (each layer once, whatever images share it) and
//! tag an OCI manifest. Nodes then pull it through their loopback registry when
//! a job names it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use clap::Subcommand;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::CliError;
use super::client::ApiClient;
use super::output::{self, OutputFormat, TableRow};

/// OCI media types of what `push` writes.
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Layers go as `docker save` gives them: uncompressed tars (their digest is the
/// layer's diff id, so a layer shared by two images is the same blob).
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// `novacron image` subcommands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum ImageCommand {
    /// Send an image from this machine's Docker to the controller's image store
    /// (layers it already has are not sent again).
    Push {
        /// The image (`team/api:1.4`).
        image: String,
        /// Store it under this name instead (`team/api:1.4`).
        #[arg(long = "as", value_name = "NAME:TAG")]
        as_name: Option<String>,
    },
    /// Send the images of a `docker save` archive, under their tags.
    Load {
        /// The archive.
        file: PathBuf,
    },
    /// List the images in the controller's store.
    List,
    /// Remove a tag from the controller's store.
    Rm {
        /// `NAME:TAG`.
        image: String,
    },
}

pub use novacron_api::ImageRecord as ImageView;

/// What one push sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PushReport {
    /// `name:tag`.
    pub image: String,
    /// The manifest's digest.
    pub digest: String,
    /// Layers of the image.
    pub layers: usize,
    /// Blobs (config and layers) sent.
    pub sent_blobs: usize,
    /// Their bytes.
    pub sent_bytes: u64,
    /// Blobs the controller had already.
    pub skipped_blobs: usize,
    /// Their bytes.
    pub skipped_bytes: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SavedImage {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Runs an `image` subcommand.
pub async fn run(
    cmd: &ImageCommand,
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
    now: SystemTime,
) -> Result<(), CliError> {
    match cmd {
        ImageCommand::Push { image, as_name } => {
            let dir = tempfile::tempdir().map_err(|e| CliError::Usage(e.to_string()))?;
            let archive = dir.path().join("image.tar");
            save(image, &archive).await?;
            let target = as_name.clone().unwrap_or_else(|| image.clone());
            let reports = push_archive(client, &archive, dir.path(), Some(&target)).await?;
            write_reports(out, format, &reports)?;
        }
        ImageCommand::Load { file } => {
            let dir = tempfile::tempdir().map_err(|e| CliError::Usage(e.to_string()))?;
            let reports = push_archive(client, file, dir.path(), None).await?;
            write_reports(out, format, &reports)?;
        }
        ImageCommand::List => {
            let images: Vec<ImageView> = client.get(&["v1", "images"]).await?;
            output::write_list(out, format, &images, now)?;
        }
        ImageCommand::Rm { image } => {
            let (name, tag) = split(image);
            client
                .delete_query(&["v1", "images"], &[("name", &name), ("tag", &tag)])
                .await?;
            writeln!(out, "image {name}:{tag} removed").map_err(output::OutputError::Io)?;
        }
    }
    Ok(())
}

fn write_reports(
    out: &mut dyn Write,
    format: OutputFormat,
    reports: &[PushReport],
) -> Result<(), CliError> {
    match format {
        OutputFormat::Table | OutputFormat::Wide => {
            for r in reports {
                writeln!(
                    out,
                    "pushed {} ({}): {} layers; sent {} blobs ({} bytes), {} already stored ({} bytes)",
                    r.image,
                    r.digest,
                    r.layers,
                    r.sent_blobs,
                    r.sent_bytes,
                    r.skipped_blobs,
                    r.skipped_bytes
                )
                .map_err(output::OutputError::Io)?;
            }
        }
        _ => output::write_value(out, format, reports)?,
    }
    Ok(())
}

/// `name:tag` of a reference (tag `latest` when none); a `docker.io/library/`
/// prefix is left out, as Docker names such images.
pub fn split(image: &str) -> (String, String) {
    let image = image.strip_prefix("docker.io/").unwrap_or(image);
    let image = image.strip_prefix("library/").unwrap_or(image);
    let (name, tag) = novacron_common::names::split_image_tag(image);
    (name.to_string(), tag.unwrap_or("latest").to_string())
}

/// Writes `docker save IMAGE` from this machine's Docker (the `docker` command,
/// as the operator would run it) to `to`.
async fn save(image: &str, to: &Path) -> Result<(), CliError> {
    let out = tokio::process::Command::new("docker")
        .arg("save")
        .arg("-o")
        .arg(to)
        .arg(image)
        .output()
        .await
        .map_err(|e| {
            CliError::Usage(format!(
                "cannot run docker ({e}); `image push` reads the image from this machine's Docker, or use `image load FILE` with a docker save archive"
            ))
        })?;
    if !out.status.success() {
        return Err(CliError::Usage(format!(
            "docker save {image}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The SHA-256 digest and size of a file.
fn digest_of(path: &Path) -> std::io::Result<(String, u64)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let got = file.read(&mut buf)?;
        if got == 0 {
            break;
        }
        hash.update(&buf[..got]);
        n += got as u64;
    }
    Ok((format!("sha256:{}", hex::encode(hash.finalize())), n))
}

/// Unpacks a `docker save` archive into `work` and pushes its images: as
/// `target` (the first image) when given, else under each image's tags.
async fn push_archive(
    client: &ApiClient,
    archive: &Path,
    work: &Path,
    target: Option<&str>,
) -> Result<Vec<PushReport>, CliError> {
    let unpacked = work.join("unpacked");
    let (a, u) = (archive.to_path_buf(), unpacked.clone());
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        std::fs::create_dir_all(&u)?;
        // `unpack` keeps every entry inside `u` (no absolute paths, no `..`).
        tar::Archive::new(std::fs::File::open(&a)?).unpack(&u)
    })
    .await
    .map_err(|e| CliError::Usage(e.to_string()))?
    .map_err(|e| {
        CliError::Usage(format!(
            "{}: not a docker save archive: {e}",
            archive.display()
        ))
    })?;
    let manifest = std::fs::read(unpacked.join("manifest.json")).map_err(|e| {
        CliError::Usage(format!(
            "{}: no manifest.json ({e}); expected a docker save archive",
            archive.display()
        ))
    })?;
    let saved: Vec<SavedImage> = serde_json::from_slice(&manifest)
        .map_err(|e| CliError::Usage(format!("{}: manifest.json: {e}", archive.display())))?;
    let mut reports = Vec::new();
    for (i, image) in saved.iter().enumerate() {
        let tags: Vec<String> = match target {
            Some(t) if i == 0 => vec![t.to_string()],
            Some(_) => continue,
            None => image.repo_tags.clone().unwrap_or_default(),
        };
        if tags.is_empty() {
            continue;
        }
        let mut report = PushReport::default();
        let mut blobs = Vec::new();
        for path in std::iter::once(&image.config).chain(&image.layers) {
            let file = unpacked.join(path);
            if !file.starts_with(&unpacked) || path.contains("..") {
                return Err(CliError::Usage(format!(
                    "manifest.json names {path:?} outside the archive"
                )));
            }
            let f = file.clone();
            let (digest, size) = tokio::task::spawn_blocking(move || digest_of(&f))
                .await
                .map_err(|e| CliError::Usage(e.to_string()))?
                .map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?;
            if client.blob_stored(&digest).await? {
                report.skipped_blobs += 1;
                report.skipped_bytes += size;
            } else {
                client.put_blob(&digest, &file).await?;
                report.sent_blobs += 1;
                report.sent_bytes += size;
            }
            blobs.push((digest, size));
        }
        let (config, layers) = blobs.split_first().expect("the config is first");
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {"mediaType": CONFIG, "digest": config.0, "size": config.1},
            "layers": layers.iter().map(|(d, s)| serde_json::json!({"mediaType": LAYER, "digest": d, "size": s})).collect::<Vec<_>>(),
        })
        .to_string();
        report.layers = layers.len();
        for tag in tags {
            let (name, tag) = split(&tag);
            let answer: ImageView = client
                .put(
                    &["v1", "images", "manifests"],
                    &serde_json::json!({"name": name, "tag": tag, "manifest": manifest}),
                )
                .await?;
            reports.push(PushReport {
                image: format!("{}:{}", answer.name, answer.tag),
                digest: answer.digest,
                ..report.clone()
            });
        }
    }
    if reports.is_empty() {
        return Err(CliError::Usage(format!(
            "{}: no tagged image in the archive; push one by name with `novacron image push`",
            archive.display()
        )));
    }
    Ok(reports)
}

impl TableRow for ImageView {
    fn headers() -> &'static [&'static str] {
        &["IMAGE", "DIGEST", "LAYERS", "SIZE", "PUSHED", "BY"]
    }

    fn cells(&self, now: SystemTime) -> Vec<String> {
        vec![
            format!("{}:{}", self.name, self.tag),
            self.digest.clone(),
            self.layers.to_string(),
            format!("{:.1} MB", self.size as f64 / 1e6),
            output::ago(now, output::from_unix_ms(self.pushed_unix_ms)),
            self.by.clone(),
        ]
    }

    fn resource_name(&self) -> Option<String> {
        Some(format!("image/{}:{}", self.name, self.tag))
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn references_split_into_name_and_tag() {
        assert_eq!(split("team/api:1.4"), ("team/api".into(), "1.4".into()));
        assert_eq!(split("busybox"), ("busybox".into(), "latest".into()));
        assert_eq!(
            split("docker.io/library/busybox:1"),
            ("busybox".into(), "1".into())
        );
        assert_eq!(
            split("registry.example:5000/api"),
            ("registry.example:5000/api".into(), "latest".into())
        );
    }
}
