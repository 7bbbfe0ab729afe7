//! What a sync must do: compare the catalog with the manifest of what is on disk.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::catalog::{Catalog, Object};
use super::paths::{self, UnsafeKey};
use std::collections::BTreeSet;

/// One file sdfleet wrote: the object it came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub size: u64,
    pub etag: String,
}

/// Every file sdfleet wrote under DEST, by key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub entries: BTreeMap<String, ManifestEntry>,
}

pub const MANIFEST: &str = "manifest.json";

impl Manifest {
    /// The saved manifest, or an empty one (first sync, or an unreadable file: refetch).
    pub async fn load(state: &Path) -> std::io::Result<Manifest> {
        match tokio::fs::read(state.join(MANIFEST)).await {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).unwrap_or_default()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Manifest::default()),
            Err(e) => Err(e),
        }
    }

    /// Written to a temporary file and renamed: never half-written.
    pub async fn save(&self, state: &Path) -> std::io::Result<()> {
        let tmp = state.join(format!("{MANIFEST}.tmp"));
        let bytes = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        tokio::fs::write(&tmp, bytes).await?;
        tokio::fs::File::open(&tmp).await?.sync_all().await?;
        tokio::fs::rename(&tmp, state.join(MANIFEST)).await
    }
}

#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub download: Vec<Object>,
    /// Keys in the manifest whose objects are gone (only with delete).
    pub delete: Vec<String>,
    pub unchanged: usize,
    pub refused: Vec<UnsafeKey>,
}

/// An object is fetched unless the manifest has the same size and ETag and the file on
/// disk has that size.
pub fn plan(catalog: &Catalog, manifest: &Manifest, dest: &Path, delete: bool) -> Plan {
    let mut plan = Plan::default();
    let wanted: BTreeSet<&str> = catalog.objects.iter().map(|o| o.key.as_str()).collect();
    // Every folder the keys need: a key that is also a folder (`a` beside `a/b`) is refused.
    let mut folders: BTreeMap<&str, &str> = BTreeMap::new();
    for key in &wanted {
        for (i, _) in key.match_indices('/') {
            folders.entry(&key[..i]).or_insert(key);
        }
    }
    // Files that stay on disk: a new key beneath one of them cannot be written.
    let kept: BTreeSet<&str> = manifest
        .entries
        .keys()
        .map(String::as_str)
        .filter(|k| !delete || wanted.contains(k))
        .collect();
    for object in &catalog.objects {
        if let Some(child) = folders.get(object.key.as_str()) {
            plan.refused
                .push(UnsafeKey::Conflict(object.key.clone(), child.to_string()));
            continue;
        }
        if let Some(file) = object
            .key
            .match_indices('/')
            .map(|(i, _)| &object.key[..i])
            .find(|parent| kept.contains(parent))
        {
            plan.refused
                .push(UnsafeKey::Conflict(object.key.clone(), file.to_string()));
            continue;
        }
        let path = match paths::destination(dest, &object.key) {
            Ok(p) => p,
            Err(e) => {
                plan.refused.push(e);
                continue;
            }
        };
        let recorded = manifest.entries.get(&object.key);
        let on_disk = std::fs::symlink_metadata(&path)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len());
        match (recorded, on_disk) {
            (Some(e), Some(len))
                if e.size == object.size && e.etag == object.etag && len == object.size =>
            {
                plan.unchanged += 1
            }
            _ => plan.download.push(object.clone()),
        }
    }
    if delete {
        plan.delete = manifest
            .entries
            .keys()
            .filter(|k| !wanted.contains(k.as_str()))
            .cloned()
            .collect();
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::catalog::obj;

    #[test]
    fn a_key_that_is_also_a_folder_is_refused_and_the_rest_arrives() {
        let dest =
            std::env::temp_dir().join(format!("sdfleet-plan-conflict-{}", std::process::id()));
        let catalog = Catalog::new(vec![
            obj("loras/a", 1, "e1"),
            obj("loras/a/b", 2, "e2"),
            obj("vae/v", 3, "e3"),
        ]);
        let plan = plan(&catalog, &Manifest::default(), &dest, true);
        assert_eq!(
            plan.refused,
            [UnsafeKey::Conflict("loras/a".into(), "loras/a/b".into())]
        );
        let keys: Vec<&str> = plan.download.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["loras/a/b", "vae/v"]);
    }

    #[test]
    fn a_file_replaced_by_a_folder_is_deleted_with_delete_and_refused_without() {
        let dest = std::env::temp_dir().join(format!("sdfleet-plan-folder-{}", std::process::id()));
        let mut manifest = Manifest::default();
        manifest.entries.insert(
            "x".into(),
            ManifestEntry {
                size: 1,
                etag: "old".into(),
            },
        );
        let catalog = Catalog::new(vec![obj("x/y", 2, "new")]);
        let with_delete = plan(&catalog, &manifest, &dest, true);
        assert_eq!(with_delete.delete, ["x"]);
        assert_eq!(with_delete.download.len(), 1);
        let without = plan(&catalog, &manifest, &dest, false);
        assert_eq!(
            without.refused,
            [UnsafeKey::Conflict("x/y".into(), "x".into())]
        );
        assert!(without.download.is_empty());
    }

    #[test]
    fn only_new_or_changed_objects_are_fetched_and_only_ours_deleted() {
        let dest = std::env::temp_dir().join(format!("sdfleet-plan-{}", std::process::id()));
        std::fs::create_dir_all(dest.join("vae")).unwrap();
        std::fs::write(dest.join("vae/same"), b"1234").unwrap();
        std::fs::write(dest.join("vae/changed"), b"1234").unwrap();
        std::fs::write(dest.join("vae/truncated"), b"12").unwrap();
        let mut manifest = Manifest::default();
        for (k, etag) in [
            ("vae/same", "a"),
            ("vae/changed", "a"),
            ("vae/truncated", "a"),
            ("vae/gone", "a"),
        ] {
            manifest.entries.insert(
                k.into(),
                ManifestEntry {
                    size: 4,
                    etag: etag.into(),
                },
            );
        }
        let catalog = Catalog::new(vec![
            obj("vae/same", 4, "a"),
            obj("vae/changed", 4, "b"),
            obj("vae/truncated", 4, "a"),
            obj("vae/new", 9, "c"),
            obj("../escape", 1, "d"),
        ]);
        let p = plan(&catalog, &manifest, &dest, true);
        let keys: Vec<_> = p.download.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["vae/changed", "vae/new", "vae/truncated"]);
        assert_eq!(p.unchanged, 1);
        assert_eq!(p.delete, ["vae/gone"]);
        assert_eq!(p.refused.len(), 1);
        assert_eq!(p.refused[0].key(), "../escape");
        assert!(plan(&catalog, &manifest, &dest, false).delete.is_empty());
        std::fs::remove_dir_all(&dest).unwrap();
    }
}
