//! The catalog of a model bucket: every object under the prefix that the include and
//! exclude globs let through, its ComfyUI model type, and a revision digest.

use std::collections::BTreeMap;

use globset::{Glob, GlobSet, GlobSetBuilder};
use sha2::{Digest, Sha256};

pub use crate::storage::Object;
use crate::storage::{ObjectStore, StoreError};

/// Lists `store` into a catalog of what `filter` accepts: the one listing pipeline of
/// the controller, the node agent and `sdfleet sync`.
pub async fn list<S: ObjectStore>(store: &S, filter: &Filter) -> Result<Catalog, StoreError> {
    let objects = store.list().await?;
    Ok(Catalog::new(
        objects
            .into_iter()
            .filter(|o| filter.accepts(&o.key))
            .collect(),
    ))
}

/// An object for unit tests.
#[cfg(test)]
pub fn obj(key: &str, size: u64, etag: &str) -> Object {
    Object {
        key: key.into(),
        size,
        etag: etag.into(),
        last_modified: None,
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid glob {glob:?}: {source}")]
pub struct GlobError {
    glob: String,
    source: globset::Error,
}

/// Include and exclude globs over keys relative to the prefix. Empty include = all.
#[derive(Debug)]
pub struct Filter {
    include: Option<GlobSet>,
    exclude: GlobSet,
}

impl Filter {
    pub fn new(include: &[String], exclude: &[String]) -> Result<Filter, GlobError> {
        let build = |globs: &[String]| -> Result<GlobSet, GlobError> {
            let mut b = GlobSetBuilder::new();
            for g in globs {
                // `*` stays within one path segment, as in a shell.
                let glob = globset::GlobBuilder::new(g)
                    .literal_separator(true)
                    .build()
                    .or_else(|_| Glob::new(g))
                    .map_err(|source| GlobError {
                        glob: g.clone(),
                        source,
                    })?;
                b.add(glob);
            }
            b.build().map_err(|source| GlobError {
                glob: globs.join(","),
                source,
            })
        };
        Ok(Filter {
            include: if include.is_empty() {
                None
            } else {
                Some(build(include)?)
            },
            exclude: build(exclude)?,
        })
    }

    pub fn accepts(&self, key: &str) -> bool {
        self.include.as_ref().is_none_or(|i| i.is_match(key)) && !self.exclude.is_match(key)
    }
}

/// ComfyUI's model type: the first segment of the key (`checkpoints/x.safetensors`).
/// Keys at the top level have type `other`.
pub fn model_type(key: &str) -> &str {
    match key.split_once('/') {
        Some((first, _)) if !first.is_empty() => first,
        _ => "other",
    }
}

/// A listed catalog, sorted by key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Catalog {
    pub objects: Vec<Object>,
}

pub use crate::crd::modelset::TypeSummary;

impl Catalog {
    pub fn new(mut objects: Vec<Object>) -> Catalog {
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Catalog { objects }
    }

    /// A digest of every key, size and ETag: equal catalogs, equal revisions.
    pub fn revision(&self) -> String {
        let mut h = Sha256::new();
        for o in &self.objects {
            h.update(o.key.as_bytes());
            h.update([0]);
            h.update(o.size.to_le_bytes());
            h.update(o.etag.as_bytes());
            h.update([0]);
        }
        format!("sha256:{}", &hex::encode(h.finalize())[..16])
    }

    pub fn total_bytes(&self) -> u64 {
        self.objects.iter().map(|o| o.size).sum()
    }

    pub fn by_type(&self) -> BTreeMap<String, TypeSummary> {
        let mut out: BTreeMap<String, TypeSummary> = BTreeMap::new();
        for o in &self.objects {
            let t = out.entry(model_type(&o.key).to_string()).or_default();
            t.count += 1;
            t.bytes += o.size;
        }
        out
    }

    /// One line per object, `key\tsize\tetag`, for storing a large catalog compactly.
    pub fn to_tsv(&self) -> String {
        let mut out = String::new();
        for o in &self.objects {
            out.push_str(&o.key);
            out.push('\t');
            out.push_str(&o.size.to_string());
            out.push('\t');
            out.push_str(&o.etag);
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_come_from_the_first_segment() {
        assert_eq!(model_type("checkpoints/sdxl.safetensors"), "checkpoints");
        assert_eq!(model_type("loras/style/x.safetensors"), "loras");
        assert_eq!(model_type("readme.txt"), "other");
    }

    #[test]
    fn include_and_exclude_globs() {
        let f = Filter::new(
            &["checkpoints/*".into(), "loras/**".into()],
            &["**/*.tmp".into()],
        )
        .unwrap();
        assert!(f.accepts("checkpoints/a.safetensors"));
        assert!(
            !f.accepts("checkpoints/sub/a.safetensors"),
            "* stays in one segment"
        );
        assert!(f.accepts("loras/style/x.safetensors"));
        assert!(!f.accepts("loras/x.tmp"));
        assert!(!f.accepts("vae/v.safetensors"));
        let all = Filter::new(&[], &[]).unwrap();
        assert!(all.accepts("anything/at/all"));
        assert!(Filter::new(&["[".into()], &[]).is_err());
    }

    #[test]
    fn revision_is_order_independent_and_sees_every_change() {
        let a = Catalog::new(vec![obj("b", 2, "e2"), obj("a", 1, "e1")]);
        let b = Catalog::new(vec![obj("a", 1, "e1"), obj("b", 2, "e2")]);
        assert_eq!(a.revision(), b.revision());
        assert_ne!(
            a.revision(),
            Catalog::new(vec![obj("a", 1, "e1"), obj("b", 2, "e3")]).revision()
        );
        assert_ne!(
            a.revision(),
            Catalog::new(vec![obj("a", 1, "e1")]).revision()
        );
        assert_ne!(
            a.revision(),
            Catalog::new(vec![obj("a", 1, "e1"), obj("b", 3, "e2")]).revision()
        );
    }

    #[test]
    fn summary_by_type() {
        let c = Catalog::new(vec![
            obj("checkpoints/a", 10, "x"),
            obj("checkpoints/b", 5, "y"),
            obj("vae/v", 1, "z"),
        ]);
        let t = c.by_type();
        assert_eq!(
            t["checkpoints"],
            TypeSummary {
                count: 2,
                bytes: 15
            }
        );
        assert_eq!(t["vae"], TypeSummary { count: 1, bytes: 1 });
        assert_eq!(c.total_bytes(), 16);
        assert_eq!(
            c.to_tsv(),
            "checkpoints/a\t10\tx\ncheckpoints/b\t5\ty\nvae/v\t1\tz\n"
        );
    }
}
