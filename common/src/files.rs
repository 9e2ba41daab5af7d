//! Small file helpers shared by the agent and the controller for their state
//! directories: atomic writes with an explicit mode, and private directories.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `contents` to `path` atomically: a temporary file created with `mode`
/// (so a key is never readable by others, not even briefly), synced, then renamed
/// over `path`.
pub fn write_atomic(path: &Path, contents: &str, mode: u32) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

/// Creates `dir` (and its parents) and makes it private to its owner (0700).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replace_atomically_with_the_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let private = dir.path().join("state");
        create_private_dir(&private).expect("dir");
        let mode = |p: &Path| fs::metadata(p).expect("exists").permissions().mode() & 0o777;
        assert_eq!(mode(&private), 0o700);
        let key = private.join("key.pem");
        write_atomic(&key, "one", 0o600).expect("write");
        write_atomic(&key, "two", 0o600).expect("replace");
        assert_eq!(fs::read_to_string(&key).expect("read"), "two");
        assert_eq!(mode(&key), 0o600);
        assert!(!key.with_extension("tmp").exists());
    }
}
