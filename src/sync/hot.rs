//! Which catalog keys are hot: the ModelSet's `spec.hot` globs, and exact keys beside
//! them (the fleets' recent checkpoints). One rule for both sides: the agent syncs these
//! first, and the gateway sends a hot-only node jobs of these only, so the two can never
//! disagree about what such a node holds.

use std::sync::Arc;

use super::catalog::{Filter, GlobError};

#[derive(Clone, Debug)]
pub struct HotSet {
    pub globs: Vec<String>,
    pub keys: Vec<String>,
    /// The globs compiled; none without globs (an empty filter would take every key).
    filter: Option<Arc<Filter>>,
}

impl PartialEq for HotSet {
    fn eq(&self, other: &HotSet) -> bool {
        self.globs == other.globs && self.keys == other.keys
    }
}

impl HotSet {
    /// `globs` (an error when one does not compile) and the exact `keys`.
    pub fn new(globs: &[String], keys: &[String]) -> Result<HotSet, GlobError> {
        let filter = if globs.is_empty() {
            None
        } else {
            Some(Arc::new(Filter::new(globs, &[])?))
        };
        Ok(HotSet {
            globs: globs.to_vec(),
            keys: keys.to_vec(),
            filter,
        })
    }

    /// Only the exact `keys`.
    pub fn keys_only(keys: &[String]) -> HotSet {
        HotSet {
            globs: Vec::new(),
            keys: keys.to_vec(),
            filter: None,
        }
    }

    /// This set with the exact `keys` instead of its own.
    pub fn with_keys(&self, keys: &[String]) -> HotSet {
        HotSet {
            keys: keys.to_vec(),
            ..self.clone()
        }
    }

    pub fn holds(&self, key: &str) -> bool {
        self.filter.as_ref().is_some_and(|f| f.accepts(key)) || self.keys.iter().any(|k| k == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_and_exact_keys_and_nothing_else() {
        let hot = HotSet::new(
            &["checkpoints/sdxl*".into()],
            &["loras/a.safetensors".into()],
        )
        .unwrap();
        assert!(hot.holds("checkpoints/sdxl_base.safetensors"));
        assert!(hot.holds("loras/a.safetensors"));
        assert!(!hot.holds("loras/b.safetensors"));
        // No globs: only the keys, never every key.
        let keys_only = HotSet::keys_only(&["loras/a.safetensors".into()]);
        assert!(keys_only.holds("loras/a.safetensors"));
        assert!(!keys_only.holds("checkpoints/sdxl_base.safetensors"));
        assert!(HotSet::new(&["[".into()], &[]).is_err());
    }
}
