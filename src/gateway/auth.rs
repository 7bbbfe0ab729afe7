//! API keys. The admin's Secret holds one entry per key: the key id as the entry name
//! and the SHA-256 (hex) of the key as its value, so the cluster never stores a usable
//! key. It is mounted into the gateway and re-read as the kubelet updates it.
//!
//! A key sees and controls only the jobs it submitted. A value of `<sha256hex> admin`
//! (the word after the hash, separated by whitespace) marks an admin key, which sees and
//! controls every job: a plain hash stays a plain key, so existing Secrets keep meaning
//! what they meant.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;

use sha2::{Digest, Sha256};

pub struct ApiKeys {
    dir: Option<PathBuf>,
    /// id → the key's entry.
    keys: RwLock<BTreeMap<String, KeyEntry>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KeyEntry {
    /// SHA-256 of the key.
    hash: [u8; 32],
    admin: bool,
}

/// Who made a request: the id of the key it carried (never the key) and its role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub key_id: String,
    /// Sees and controls every job, not only its own.
    pub admin: bool,
}

/// The role word that follows the hash in an admin key's Secret value.
pub const ADMIN_ROLE: &str = "admin";

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

    /// The caller the presented key names, if it is one.
    pub fn verify(&self, presented: &str) -> Option<Caller> {
        let digest: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        let keys = self.keys.read().ok()?;
        let mut found = None;
        // Compare against every key, each in constant time.
        for (id, entry) in keys.iter() {
            let diff = entry
                .hash
                .iter()
                .zip(digest.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(Caller {
                    key_id: id.clone(),
                    admin: entry.admin,
                });
            }
        }
        found
    }
}

/// One Secret value: `<sha256hex>` or `<sha256hex> admin`. `None`: no valid hash.
fn parse_entry(key_id: &str, text: &str) -> Option<KeyEntry> {
    let mut words = text.split_whitespace();
    let hash = hex::decode(words.next()?)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())?;
    let mut admin = false;
    for word in words {
        if word == ADMIN_ROLE {
            admin = true;
        } else {
            // A typo must not grant anything: the key stays a plain key.
            tracing::warn!(%key_id, role = %word, "unknown role after the API key's hash; ignored");
        }
    }
    Some(KeyEntry { hash, admin })
}

fn read_keys(dir: &Path) -> BTreeMap<String, KeyEntry> {
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
        match parse_entry(&name, &text) {
            Some(entry) => {
                out.insert(name, entry);
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
        let caller = |key: &str| keys.verify(key).map(|c| (c.key_id, c.admin));
        assert_eq!(caller("secret-a"), Some(("team-a".into(), false)));
        assert_eq!(caller("secret-b"), None);
        assert_eq!(caller("not hex"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_role_word_after_the_hash_marks_an_admin_key() {
        let dir = std::env::temp_dir().join(format!("sdfleet-keys-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("ops"),
            format!("{} admin\n", hash_key("secret-ops")),
        )
        .unwrap();
        // `sha256sum` output pasted whole: the `-` is not a role, the key stays plain.
        std::fs::write(dir.join("ci"), format!("{}  -", hash_key("secret-ci"))).unwrap();
        std::fs::write(dir.join("typo"), format!("{} admn", hash_key("secret-t"))).unwrap();
        let keys = ApiKeys::new(Some(dir.clone()));
        let caller = |key: &str| keys.verify(key).map(|c| (c.key_id, c.admin));
        assert_eq!(caller("secret-ops"), Some(("ops".into(), true)));
        assert_eq!(caller("secret-ci"), Some(("ci".into(), false)));
        assert_eq!(caller("secret-t"), Some(("typo".into(), false)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
