//! Where a key may be written: strictly inside DEST. A key that could escape it (`..`,
//! an absolute path, a backslash, a NUL, an over-long name, or a symlink on the way) is
//! refused, never sanitised into something else.

use std::path::{Component, Path, PathBuf};

/// Linux NAME_MAX and a conservative PATH_MAX budget for the relative part.
const MAX_COMPONENT: usize = 255;
const MAX_RELATIVE: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnsafeKey {
    #[error("key {0:?} is empty or ends with '/'")]
    Empty(String),
    #[error("key {0:?} contains a NUL byte")]
    Nul(String),
    #[error("key {0:?} contains a backslash")]
    Backslash(String),
    #[error("key {0:?} is absolute")]
    Absolute(String),
    #[error("key {0:?} has a '.' or '..' segment")]
    DotSegment(String),
    #[error(
        "key {0:?} has a segment longer than {MAX_COMPONENT} bytes or is longer than {MAX_RELATIVE} bytes"
    )]
    TooLong(String),
    #[error("key {0:?} would be written through the symlink {1}")]
    Symlink(String, String),
    #[error("key {0:?} is reserved for sdfleet's own state")]
    Reserved(String),
    #[error(
        "key {0:?} and {1:?} cannot both exist on disk (one is a file, the other a folder); {0:?} is refused"
    )]
    Conflict(String, String),
}

impl UnsafeKey {
    pub fn key(&self) -> &str {
        match self {
            UnsafeKey::Empty(k)
            | UnsafeKey::Nul(k)
            | UnsafeKey::Backslash(k)
            | UnsafeKey::Absolute(k)
            | UnsafeKey::DotSegment(k)
            | UnsafeKey::TooLong(k)
            | UnsafeKey::Symlink(k, _)
            | UnsafeKey::Reserved(k)
            | UnsafeKey::Conflict(k, _) => k,
        }
    }
}

/// The directory inside DEST where sdfleet keeps its manifest and partial files.
pub const STATE_DIR: &str = ".sdfleet";

/// The relative path of `key` under DEST, checked lexically (no I/O).
pub fn relative_path(key: &str) -> Result<PathBuf, UnsafeKey> {
    let owned = || key.to_string();
    if key.is_empty() || key.ends_with('/') {
        return Err(UnsafeKey::Empty(owned()));
    }
    if key.contains('\0') {
        return Err(UnsafeKey::Nul(owned()));
    }
    if key.contains('\\') {
        return Err(UnsafeKey::Backslash(owned()));
    }
    if key.starts_with('/') {
        return Err(UnsafeKey::Absolute(owned()));
    }
    if key.len() > MAX_RELATIVE {
        return Err(UnsafeKey::TooLong(owned()));
    }
    let mut out = PathBuf::new();
    for segment in key.split('/') {
        if segment == "." || segment == ".." {
            return Err(UnsafeKey::DotSegment(owned()));
        }
        if segment.len() > MAX_COMPONENT {
            return Err(UnsafeKey::TooLong(owned()));
        }
        // "a//b": S3 allows it, a filesystem folds it; refuse rather than alias two keys.
        if segment.is_empty() {
            return Err(UnsafeKey::Empty(owned()));
        }
        out.push(segment);
    }
    if out.components().next() == Some(Component::Normal(STATE_DIR.as_ref())) {
        return Err(UnsafeKey::Reserved(owned()));
    }
    // Lexically the path can now only go down.
    if out.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(UnsafeKey::DotSegment(owned()));
    }
    Ok(out)
}

/// The final path of `key` under `dest`, refusing any existing symlink between `dest`
/// and the file (a symlinked directory, or the file itself being one).
pub fn destination(dest: &Path, key: &str) -> Result<PathBuf, UnsafeKey> {
    let relative = relative_path(key)?;
    let mut at = dest.to_path_buf();
    for component in relative.components() {
        at.push(component);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(UnsafeKey::Symlink(
                    key.to_string(),
                    at.display().to_string(),
                ));
            }
            Ok(_) => {}
            // Nothing here yet: nothing below can be a symlink either.
            Err(_) => break,
        }
    }
    Ok(dest.join(relative))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_keys_map_below_dest() {
        assert_eq!(
            relative_path("checkpoints/sdxl.safetensors").unwrap(),
            PathBuf::from("checkpoints/sdxl.safetensors")
        );
        assert_eq!(
            relative_path("loras/a b+c.safetensors").unwrap(),
            PathBuf::from("loras/a b+c.safetensors")
        );
        assert_eq!(
            relative_path("..hidden/x..y").unwrap(),
            PathBuf::from("..hidden/x..y")
        );
    }

    #[test]
    fn escaping_keys_are_refused() {
        for (key, expect) in [
            ("../etc/passwd", "DotSegment"),
            ("loras/../../x", "DotSegment"),
            ("a/./b", "DotSegment"),
            ("/etc/passwd", "Absolute"),
            ("loras\\..\\x", "Backslash"),
            ("a\0b", "Nul"),
            ("", "Empty"),
            ("dir/", "Empty"),
            ("a//b", "Empty"),
            (".sdfleet/manifest.json", "Reserved"),
        ] {
            let err = relative_path(key).unwrap_err();
            assert!(format!("{err:?}").starts_with(expect), "{key:?}: {err:?}");
            assert_eq!(err.key(), key);
        }
        assert!(matches!(
            relative_path(&format!("a/{}", "x".repeat(256))),
            Err(UnsafeKey::TooLong(_))
        ));
        assert!(matches!(
            relative_path(&"ab/".repeat(400)),
            Err(UnsafeKey::TooLong(_) | UnsafeKey::Empty(_))
        ));
    }

    #[test]
    fn symlinks_on_the_way_are_refused() {
        let dest = std::env::temp_dir().join(format!("sdfleet-paths-{}", std::process::id()));
        let outside = std::env::temp_dir().join(format!("sdfleet-outside-{}", std::process::id()));
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let _ = std::fs::remove_file(dest.join("loras"));
        std::os::unix::fs::symlink(&outside, dest.join("loras")).unwrap();
        let err = destination(&dest, "loras/evil.safetensors").unwrap_err();
        assert!(matches!(err, UnsafeKey::Symlink(..)), "{err:?}");
        assert_eq!(
            destination(&dest, "vae/ok.safetensors").unwrap(),
            dest.join("vae/ok.safetensors")
        );
        std::fs::remove_dir_all(&dest).unwrap();
        std::fs::remove_dir_all(&outside).unwrap();
    }
}
