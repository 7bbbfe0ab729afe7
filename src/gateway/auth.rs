//! API keys. The admin's Secret holds one entry per key: the key id as the entry name
//! and the SHA-256 (hex) of the key as its value, so the cluster never stores a usable
//! key. It is mounted into the gateway and re-read as the kubelet updates it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;

use sha2::{Digest, Sha256};

pub struct ApiKeys {
    dir: Option<PathBuf>,
    /// id → SHA-256 of the key.
    keys: RwLock<BTreeMap<String, [u8; 32]>>,
}

/// The hex SHA-256 of a key: what goes in the Secret.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl ApiKeys {
    /// `None`: no authentication (only when the admin turned it off).
    pub fn new(dir: Option<PathBuf>) -> ApiKeys {
        let keys = ApiKeys {
            dir,
            keys: RwLock::new(BTreeMap::new()),
        };
        keys.reload();
        keys
    }

    pub fn required(&self) -> bool {
        self.dir.is_some()
    }

    pub fn reload(&self) {
        let Some(dir) = &self.dir else { return };
        let loaded = read_keys(dir);
        if let Ok(mut keys) = self.keys.write() {
            *keys = loaded;
        }
    }

    /// Re-reads the directory every `period`.
    pub async fn watch(&self, period: Duration) {
        loop {
            tokio::time::sleep(period).await;
            self.reload();
        }
    }

    /// The id of the key presented, if it is one.
    pub fn verify(&self, presented: &str) -> Option<String> {
        let digest: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        let keys = self.keys.read().ok()?;
        let mut found = None;
        // Compare against every key, each in constant time.
        for (id, hash) in keys.iter() {
            let diff = hash
                .iter()
                .zip(digest.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(id.clone());
            }
        }
        found
    }
}

fn read_keys(dir: &Path) -> BTreeMap<String, [u8; 32]> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        tracing::warn!(dir = %dir.display(), "API keys directory unreadable: every request is refused");
        return out;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        // The kubelet's projected volume has `..data` links and dot-directories.
        if name.starts_with('.') || !entry.path().is_file() {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        match hex::decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
        {
            Some(hash) => {
                out.insert(name, hash);
            }
            None => tracing::warn!(key_id = %name, "API key entry is not a hex SHA-256; ignored"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_by_hash_and_name_their_id() {
        let dir = std::env::temp_dir().join(format!("sdfleet-keys-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("..data")).unwrap();
        std::fs::write(dir.join("team-a"), hash_key("secret-a")).unwrap();
        std::fs::write(dir.join("broken"), "not hex").unwrap();
        let keys = ApiKeys::new(Some(dir.clone()));
        assert_eq!(keys.verify("secret-a").as_deref(), Some("team-a"));
        assert_eq!(keys.verify("secret-b"), None);
        assert_eq!(keys.verify("not hex"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
