//! Files copied out of an image once per image id, for the runtimes that do
//! not run the image through Docker: a VM's kernel, initrd and base disk, and
//! a runc container's root filesystem.
//!
//! Two allocations of one image may be created at once (two replicas, two
//! VMs on a fresh node). [`ensure`] holds a lock per directory while it
//! copies, so the second waits for the first and finds the files there; it
//! copies only what is missing (a second job may want another path of the
//! same image) and never removes a file that exists, which a running guest or
//! container may be using. Each wanted path appears whole or not at all: it is
//! copied into a scratch directory and renamed into place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use novacron_common::sync::lock;

/// One lock per image directory.
static LOCKS: LazyLock<std::sync::Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>> =
    LazyLock::new(Default::default);

/// A wanted path (`/boot/vmlinuz`, `rootfs`) under `dir`.
fn under(dir: &Path, path: &str) -> PathBuf {
    dir.join(path.trim_start_matches('/'))
}

/// The wanted paths not yet under `dir`. Pure but for reading the directory.
pub fn missing(dir: &Path, wanted: &[String]) -> Vec<String> {
    wanted
        .iter()
        .filter(|p| !under(dir, p).exists())
        .cloned()
        .collect()
}

/// Makes every path of `wanted` exist under `dir`: `fill(scratch, missing)`
/// copies the missing ones into `scratch` (each at its own path there), and
/// they are renamed into `dir`. Whether anything was copied; `Err` says what
/// failed.
pub async fn ensure<F, Fut, E>(dir: &Path, wanted: &[String], fill: F) -> Result<bool, String>
where
    F: FnOnce(PathBuf, Vec<String>) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    if missing(dir, wanted).is_empty() {
        return Ok(false);
    }
    let held = lock(&LOCKS).entry(dir.to_path_buf()).or_default().clone();
    let _held = held.lock().await;
    let todo = missing(dir, wanted);
    if todo.is_empty() {
        return Ok(false);
    }
    let scratch = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let filled = fill(scratch.clone(), todo.clone())
        .await
        .map_err(|e| e.to_string());
    let placed = filled.and_then(|()| {
        for path in &todo {
            let (from, to) = (under(&scratch, path), under(dir, path));
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("{}: {e}", parent.display()))?;
            }
            std::fs::rename(&from, &to)
                .map_err(|e| format!("{} to {}: {e}", from.display(), to.display()))?;
        }
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&scratch);
    placed.map(|()| true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_fills_copy_once_and_add_only_what_is_missing() {
        let tmp = tempfile::tempdir().expect("test input");
        let dir = tmp.path().join("image");
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let fill = |wanted: Vec<String>| {
            let calls = calls.clone();
            move |scratch: PathBuf, todo: Vec<String>| async move {
                assert_eq!(todo, wanted);
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // Slow enough that the other fill waits on the lock.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                for p in &todo {
                    let at = under(&scratch, p);
                    std::fs::create_dir_all(at.parent().expect("test input")).expect("test input");
                    std::fs::write(&at, p.as_bytes()).expect("test input");
                }
                Ok::<(), String>(())
            }
        };
        let kernel = vec!["/boot/vmlinuz".to_owned()];
        let (a, b) = tokio::join!(
            ensure(&dir, &kernel, fill(kernel.clone())),
            ensure(&dir, &kernel, fill(kernel.clone()))
        );
        let copied = [a.expect("test input"), b.expect("test input")];
        assert_eq!(
            copied.iter().filter(|c| **c).count(),
            1,
            "one of them copied"
        );
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Another path of the same image: only it is copied, the kernel stays.
        let both = vec!["/boot/vmlinuz".to_owned(), "/boot/initrd.img".to_owned()];
        ensure(&dir, &both, fill(vec!["/boot/initrd.img".to_owned()]))
            .await
            .expect("test input");
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(
            std::fs::read_to_string(dir.join("boot/vmlinuz")).expect("test input"),
            "/boot/vmlinuz"
        );
        assert!(missing(&dir, &both).is_empty());
        assert!(!dir.with_extension("partial").exists());
        // A failed copy places nothing and says why.
        let err = ensure(&dir, &["/disk.qcow2".to_owned()], |_, _| async {
            Err::<(), String>("no such file in the image".to_owned())
        })
        .await
        .expect_err("an error");
        assert!(err.contains("no such file"), "{err}");
        assert!(!dir.join("disk.qcow2").exists());
    }
}
