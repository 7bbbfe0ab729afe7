//! The one directory a node agent may write: `<root>/<namespace>/<modelset>`. kubelet
//! creates the hostPath root as root:root 0755, and the agent runs as an unprivileged
//! user with no capabilities, so the DaemonSet's init container (root, with only
//! CAP_CHOWN) creates that directory and hands it to the agent's user. The agent can
//! then write there and nowhere else on the node.

use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(
        "{0:?} is not a plain name (a namespace or ModelSet name has no '/', '.' or '..' parts)"
    )]
    NotAName(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Creates `<root>/<namespace>/<model_set>` (the parents stay root's) and makes the last
/// one owned by `uid:gid`, mode 0755 (ComfyUI pods read it through a read-only mount).
pub fn prepare(
    root: &Path,
    namespace: &str,
    model_set: &str,
    uid: u32,
    gid: u32,
) -> Result<PathBuf, PrepareError> {
    for part in [namespace, model_set] {
        let mut components = Path::new(part).components();
        let plain = matches!(components.next(), Some(Component::Normal(_)))
            && components.next().is_none()
            && !part.contains('/');
        if !plain {
            return Err(PrepareError::NotAName(part.to_string()));
        }
    }
    let dir = crate::names::models_dir(root, namespace, model_set);
    let io = |source| PrepareError::Io {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(io)?;
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(&dir).map_err(io)?;
    if meta.is_dir() && meta.uid() == uid && meta.gid() == gid && meta.mode() & 0o7777 == 0o755 {
        // Prepared by an earlier start of the pod.
        return Ok(dir);
    }
    // The mode first, while root still owns it (chmod of another's file needs
    // CAP_FOWNER, which the init container does not have).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
    // Never follow a symlink planted where the directory should be.
    std::os::unix::fs::lchown(&dir, Some(uid), Some(gid)).map_err(io)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_are_prepared() {
        let root = std::env::temp_dir().join(format!("sdfleet-prep-{}", std::process::id()));
        for (ns, name) in [
            ("..", "m"),
            ("team", "../x"),
            ("team", "a/b"),
            ("", "m"),
            ("team", "."),
        ] {
            assert!(
                matches!(
                    prepare(&root, ns, name, 0, 0),
                    Err(PrepareError::NotAName(_))
                ),
                "{ns}/{name}"
            );
        }
        std::fs::create_dir_all(&root).unwrap();
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&root).unwrap();
        let (uid, gid) = (meta.uid(), meta.gid());
        let dir = prepare(&root, "team", "models", uid, gid).unwrap();
        assert_eq!(dir, root.join("team/models"));
        assert!(dir.is_dir());
        // A second start of the pod finds it prepared.
        assert_eq!(prepare(&root, "team", "models", uid, gid).unwrap(), dir);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
