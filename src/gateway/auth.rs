//! API keys. The admin's Secret holds one entry per key: the key id as the entry name
//! and the SHA-256 (hex) of the key as its value, so the cluster never stores a usable
//! key. It is mounted into the gateway and re-read as the kubelet updates it.
//!
//! A key sees and controls only the jobs it submitted. A value of `<sha256hex> admin`
//! (the word after the hash, separated by whitespace) marks an admin key, which sees and
//! controls every job: a plain hash stays a plain key, so existing Secrets keep meaning
//! what they meant.
//!
//! Fair shares (`fair_share`) take more words after the hash: `weight=3` (default 1),
//! `max-running=10` (the key's jobs on pods at once; default none) and `group=studio`
//! (keys of one group share one turn; the group's settings are those of its first key
//! by name). For example `<sha256hex> weight=3 group=studio`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::fair_share;

pub struct ApiKeys {
    dir: Option<PathBuf>,
    /// id → the key's entry.
    keys: RwLock<BTreeMap<String, KeyEntry>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct KeyEntry {
    /// SHA-256 of the key.
    hash: [u8; 32],
    admin: bool,
    group: Option<String>,
    weight: u32,
    max_running: Option<u32>,
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
    let mut entry = KeyEntry {
        hash,
        admin: false,
        group: None,
        weight: fair_share::DEFAULT_WEIGHT,
        max_running: None,
    };
    for word in words {
        let setting = word.split_once('=');
        match setting {
            None if word == ADMIN_ROLE => entry.admin = true,
            Some(("weight", n)) => match n.parse::<u32>() {
                Ok(w) if (1..=fair_share::MAX_WEIGHT).contains(&w) => entry.weight = w,
                _ => {
                    tracing::warn!(%key_id, %word, "weight is 1 to {}; the key keeps weight 1", fair_share::MAX_WEIGHT)
                }
            },
            Some(("max-running", n)) => match n.parse::<u32>() {
                Ok(cap) if cap >= 1 => entry.max_running = Some(cap),
                _ => {
                    tracing::warn!(%key_id, %word, "max-running is a whole number from 1; ignored")
                }
            },
            Some(("group", g)) if valid_group(g) => entry.group = Some(g.to_string()),
            // A typo must not grant anything: the key stays a plain key.
            _ => tracing::warn!(%key_id, %word, "unknown word after the API key's hash; ignored"),
        }
    }
    Some(entry)
}

/// A DNS label: it becomes a metric label value.
fn valid_group(g: &str) -> bool {
    (1..=63).contains(&g.len())
        && g.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl fair_share::Shares for ApiKeys {
    /// The key's group (settings of the group's first key by name), else the key itself.
    fn share_of(&self, key_id: Option<&str>) -> fair_share::Share {
        let Some(id) = key_id else {
            return fair_share::EqualShares.share_of(None);
        };
        let Ok(keys) = self.keys.read() else {
            return fair_share::EqualShares.share_of(key_id);
        };
        let Some(entry) = keys.get(id) else {
            // A key deleted since it submitted: its jobs keep their own share.
            return fair_share::EqualShares.share_of(key_id);
        };
        let Some(group) = &entry.group else {
            return fair_share::Share {
                name: id.to_string(),
                weight: entry.weight,
                max_running: entry.max_running,
            };
        };
        let first = keys
            .values()
            .find(|e| e.group.as_ref() == Some(group))
            .unwrap_or(entry);
        fair_share::Share {
            name: group.clone(),
            weight: first.weight,
            max_running: first.max_running,
        }
    }
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
    use crate::gateway::fair_share::Shares;

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

    #[test]
    fn words_after_the_hash_set_the_keys_share() {
        let dir = std::env::temp_dir().join(format!("sdfleet-keys-share-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, words: &str| {
            std::fs::write(dir.join(name), format!("{} {words}", hash_key(name))).unwrap();
        };
        write("batch", "weight=3 max-running=4");
        write("a1", "group=studio weight=2");
        write("a2", "group=studio weight=9 admin");
        write("odd", "weight=0 max-running=x group=Not_A_Label");
        let keys = ApiKeys::new(Some(dir.clone()));
        let share = |id: &str| {
            let s = keys.share_of(Some(id));
            (s.name, s.weight, s.max_running)
        };
        assert_eq!(share("batch"), ("batch".into(), 3, Some(4)));
        // One group, one share: the settings of its first key by name.
        assert_eq!(share("a1"), ("studio".into(), 2, None));
        assert_eq!(share("a2"), ("studio".into(), 2, None));
        assert_eq!(keys.verify("a2").map(|c| c.admin), Some(true));
        // Bad settings are ignored, never half-applied.
        assert_eq!(share("odd"), ("odd".into(), 1, None));
        assert_eq!(share("gone"), ("gone".into(), 1, None));
        assert_eq!(keys.share_of(None).name, fair_share::ANONYMOUS);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
