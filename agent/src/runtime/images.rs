//! Image garbage collection with a disk budget. The agent records the images it
//! pulls (from a registry or the controller's store) and when a container last
//! started from each, in `<state dir>/pulled-images.json`. Past the budget, the
//! pulled images no container uses (running or stopped) are removed, least
//! recently used first, until the pulled images fit again. Images built, loaded
//! or tagged by hand are never removed: an image that carries a reference the
//! agent did not pull is left alone.
//!
//! [`plan`] decides (pure); [`collect`] lists, plans and removes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use novacron_common::sync::lock;
use tracing::{info, warn};

use super::ContainerRuntime;

/// How often the collector runs.
pub const GC_INTERVAL: Duration = Duration::from_secs(30);
/// The most references the record keeps (the least recently used go first).
pub const MAX_RECORDED: usize = 4096;

/// An image on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalImage {
    /// Its id (`sha256:...`).
    pub id: String,
    /// Its tags (`repo:tag`).
    pub tags: Vec<String>,
    /// Its digest references (`repo@sha256:...`).
    pub digests: Vec<String>,
    /// Its size, bytes.
    pub size: u64,
}

/// The images this agent pulled: reference → when a container last started
/// from it (or it was pulled), Unix ms.
#[derive(Debug)]
pub struct PulledImages {
    path: PathBuf,
    refs: Mutex<BTreeMap<String, u64>>,
}

impl LocalImage {
    /// The references that name it: its tags, or its digests when it has no
    /// tag (an image pulled by digest). Removing these removes the image.
    pub fn names(&self) -> &[String] {
        if self.tags.is_empty() {
            &self.digests
        } else {
            &self.tags
        }
    }
}

impl PulledImages {
    /// The record at `path` (empty when missing; a damaged one is logged and
    /// started afresh).
    pub fn load(path: PathBuf) -> PulledImages {
        let refs = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(path = %path.display(), error = %e, "the record of pulled images is damaged; starting a new one");
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        PulledImages {
            path,
            refs: Mutex::new(refs),
        }
    }

    /// Records that `reference` was pulled at `now_ms`.
    pub fn pulled(&self, reference: &str, now_ms: u64) {
        let mut refs = lock(&self.refs);
        refs.insert(reference.to_owned(), now_ms);
        while refs.len() > MAX_RECORDED {
            let oldest = refs.iter().min_by_key(|(_, t)| **t).map(|(r, _)| r.clone());
            match oldest {
                Some(r) => refs.remove(&r),
                None => break,
            };
        }
        self.save(&refs);
    }

    /// Records that a container started from `reference` at `now_ms`, when the
    /// agent pulled it.
    pub fn used(&self, reference: &str, now_ms: u64) {
        let mut refs = lock(&self.refs);
        if let Some(t) = refs.get_mut(reference) {
            *t = now_ms;
            self.save(&refs);
        }
    }

    /// A copy of the record.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        lock(&self.refs).clone()
    }

    /// Forgets references that were removed.
    pub fn forget(&self, removed: &[String]) {
        let mut refs = lock(&self.refs);
        for r in removed {
            refs.remove(r);
        }
        self.save(&refs);
    }

    fn save(&self, refs: &BTreeMap<String, u64>) {
        let Ok(text) = serde_json::to_string(refs) else {
            return;
        };
        if let Err(e) = novacron_common::files::write_atomic(&self.path, &text, 0o600) {
            warn!(path = %self.path.display(), error = %e, "cannot save the record of pulled images");
        }
    }
}

/// The references to remove so that the images this agent pulled fit in
/// `budget`: whole images, not used by any container (`in_use`: image ids),
/// whose every reference the agent pulled, least recently used first.
pub fn plan(
    pulled: &BTreeMap<String, u64>,
    images: &[LocalImage],
    in_use: &HashSet<String>,
    budget: u64,
) -> Vec<String> {
    // The pulled images: id → (size, last used, every ref pulled by the agent).
    let mut ours: HashMap<&str, (u64, u64, bool)> = HashMap::new();
    for image in images {
        let names = image.names();
        let mine = names.iter().filter(|r| pulled.contains_key(*r)).count();
        if mine == 0 {
            continue;
        }
        let all_mine = mine == names.len();
        let last = image
            .tags
            .iter()
            .chain(&image.digests)
            .filter_map(|r| pulled.get(r).copied())
            .max()
            .unwrap_or(0);
        ours.insert(&image.id, (image.size, last, all_mine));
    }
    let mut total: u64 = ours.values().map(|(s, _, _)| s).sum();
    if total <= budget {
        return Vec::new();
    }
    let mut candidates: Vec<&LocalImage> = images
        .iter()
        .filter(|i| {
            ours.get(i.id.as_str())
                .is_some_and(|(_, _, all_mine)| *all_mine)
                && !in_use.contains(&i.id)
        })
        .collect();
    candidates.sort_by_key(|i| (ours[i.id.as_str()].1, i.id.clone()));
    let mut remove = Vec::new();
    for image in candidates {
        if total <= budget {
            break;
        }
        total = total.saturating_sub(image.size);
        remove.extend(image.names().iter().cloned());
    }
    remove
}

/// One collection: lists the images and the containers' images, plans, removes.
/// Returns the references removed.
pub async fn collect<R: ContainerRuntime>(
    runtime: &R,
    pulled: &PulledImages,
    budget: u64,
) -> Vec<String> {
    let images = match runtime.local_images().await {
        Ok(i) => i,
        Err(e) => {
            warn!(error = %e, "image collection: cannot list images");
            return Vec::new();
        }
    };
    let in_use = match runtime.images_in_use().await {
        Ok(u) => u,
        Err(e) => {
            warn!(error = %e, "image collection: cannot list containers");
            return Vec::new();
        }
    };
    let remove = plan(&pulled.snapshot(), &images, &in_use, budget);
    let mut removed = Vec::new();
    for reference in remove {
        match runtime.remove_image(&reference).await {
            Ok(()) => {
                info!(image = %reference, budget, "removed an unused pulled image (over the image budget)");
                removed.push(reference);
            }
            Err(e) if e.is_not_found() => removed.push(reference),
            Err(e) => warn!(image = %reference, error = %e, "image collection: cannot remove"),
        }
    }
    pulled.forget(&removed);
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: &str, refs: &[&str], size: u64) -> LocalImage {
        LocalImage {
            id: id.into(),
            tags: refs.iter().map(|r| r.to_string()).collect(),
            // A registry digest, as every pulled image has: not a name of its own.
            digests: vec![format!("{id}@sha256:00")],
            size,
        }
    }

    #[test]
    fn unused_pulled_images_go_least_recently_used_first_until_they_fit() {
        let pulled = BTreeMap::from([
            ("a:1".to_string(), 10),
            ("b:1".to_string(), 30),
            ("c:1".to_string(), 20),
            ("d:1".to_string(), 5),
            ("mixed:1".to_string(), 1),
        ]);
        let images = vec![
            image("A", &["a:1"], 100),
            image("B", &["b:1"], 100),
            image("C", &["c:1"], 100),
            image("D", &["d:1"], 100),
            // Also tagged by hand: never removed.
            image("M", &["mixed:1", "mine:latest"], 100),
            // Not pulled by the agent: never counted nor removed.
            image("X", &["built:1"], 1000),
        ];
        // D is used by a container.
        let in_use = HashSet::from(["D".to_string()]);
        assert!(plan(&pulled, &images, &in_use, 500).is_empty(), "fits");
        assert_eq!(plan(&pulled, &images, &in_use, 400), ["a:1"]);
        assert_eq!(plan(&pulled, &images, &in_use, 250), ["a:1", "c:1", "b:1"]);
        assert_eq!(
            plan(&pulled, &images, &in_use, 0),
            ["a:1", "c:1", "b:1"],
            "what is used or also someone else's stays, even over the budget"
        );
    }

    #[test]
    fn the_record_survives_a_restart_and_is_bounded() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("pulled-images.json");
        let record = PulledImages::load(path.clone());
        record.pulled("a:1", 1);
        record.used("a:1", 5);
        record.used("never-pulled:1", 6);
        let again = PulledImages::load(path.clone());
        assert_eq!(again.snapshot(), BTreeMap::from([("a:1".to_string(), 5)]));
        again.forget(&["a:1".to_string()]);
        assert!(PulledImages::load(path.clone()).snapshot().is_empty());
        std::fs::write(&path, "not json").expect("damage");
        assert!(PulledImages::load(path).snapshot().is_empty());
    }
}
