//! Which node directory a pod's models volume is, and putting it in place read-only.
//!
//! A pod asks for `csi: {driver: csi.sdfleet.io, volumeAttributes: {modelSet: NAME}}`.
//! The namespace is never the pod's to say: the kubelet adds the pod's own (the
//! CSIDriver's `podInfoOnMount`), overriding any attribute of that name. So a pod gets
//! `<root>/<its namespace>/<modelSet>` or nothing: another team's models are never a
//! path it can name. The directory exists only on a node the ModelSet's fleet prepared
//! (its agent's init container makes it), so a pod that reached another fleet's node
//! finds nothing there either.

use std::path::{Component, Path, PathBuf};

use super::proto::{NodePublishVolumeRequest, NodeUnpublishVolumeRequest};

/// The driver's name (the CSIDriver object's and every pod volume's `driver`).
pub const DRIVER_NAME: &str = "csi.sdfleet.io";
/// The pod volume attribute naming the ModelSet (of the pod's own namespace).
pub const MODEL_SET_ATTRIBUTE: &str = "modelSet";
/// Set by the kubelet with `podInfoOnMount`.
const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
/// Set by the kubelet for an inline (ephemeral) volume.
const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl PublishError {
    /// The gRPC code the spec asks for: the kubelet retries, and reports the message on
    /// the pod's events.
    pub fn code(&self) -> tonic::Code {
        match self {
            PublishError::InvalidArgument(_) => tonic::Code::InvalidArgument,
            PublishError::PermissionDenied(_) => tonic::Code::PermissionDenied,
            PublishError::NotFound(_) => tonic::Code::NotFound,
            PublishError::Io { .. } => tonic::Code::Internal,
        }
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PublishError {
    let path = path.to_path_buf();
    move |source| PublishError::Io { what, path, source }
}

/// What one publish asks for, checked: the node directory and where it goes.
#[derive(Debug, PartialEq, Eq)]
pub struct Publish {
    pub source: PathBuf,
    pub target: PathBuf,
    /// `<namespace>/<pod>`, for the log.
    pub pod: String,
}

/// The node directory `request` may have, or why not. No I/O.
pub fn plan(root: &Path, request: &NodePublishVolumeRequest) -> Result<Publish, PublishError> {
    let invalid = |m: &str| Err(PublishError::InvalidArgument(m.to_string()));
    if request.volume_id.is_empty() {
        return invalid("volume_id is required");
    }
    let target = Path::new(&request.target_path);
    if request.target_path.is_empty() || !target.is_absolute() {
        return invalid("target_path must be an absolute path");
    }
    if target.components().any(|c| c == Component::ParentDir) {
        return invalid("target_path must not contain '..'");
    }
    let Some(capability) = &request.volume_capability else {
        return invalid("volume_capability is required");
    };
    if capability.block.is_some() {
        return invalid("models are a directory: only mount access, not block");
    }
    let context = &request.volume_context;
    if context.get(EPHEMERAL).map(String::as_str) != Some("true") {
        return invalid(
            "csi.sdfleet.io serves only inline volumes in a pod's spec (volumeLifecycleModes: Ephemeral), not PersistentVolumes",
        );
    }
    let Some(namespace) = context.get(POD_NAMESPACE) else {
        return invalid(
            "the kubelet sent no pod namespace: the CSIDriver csi.sdfleet.io must have podInfoOnMount: true",
        );
    };
    let Some(model_set) = context.get(MODEL_SET_ATTRIBUTE) else {
        return invalid(
            "volumeAttributes.modelSet is required: the name of a ModelSet in the pod's namespace",
        );
    };
    for (what, value) in [("pod namespace", namespace), ("modelSet", model_set)] {
        if !is_dns_subdomain(value) {
            return Err(PublishError::InvalidArgument(format!(
                "{what} {value:?} is not a Kubernetes object name"
            )));
        }
    }
    let pod = format!(
        "{namespace}/{}",
        context.get(POD_NAME).map(String::as_str).unwrap_or("?")
    );
    Ok(Publish {
        source: crate::names::models_dir(root, namespace, model_set),
        target: target.to_path_buf(),
        pod,
    })
}

/// A Kubernetes object name: lower-case alphanumerics, '-' and '.', at most 253, no
/// empty label. Never '/', never '..' as a path component.
fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Checks the unpublish request's fields.
pub fn check_unpublish(request: &NodeUnpublishVolumeRequest) -> Result<PathBuf, PublishError> {
    if request.volume_id.is_empty() {
        return Err(PublishError::InvalidArgument(
            "volume_id is required".into(),
        ));
    }
    let target = Path::new(&request.target_path);
    if request.target_path.is_empty() || !target.is_absolute() {
        return Err(PublishError::InvalidArgument(
            "target_path must be an absolute path".into(),
        ));
    }
    Ok(target.to_path_buf())
}

/// Bind-mounts `plan.source` onto `plan.target`, read-only, nosuid, nodev, noexec.
/// Again for a target already mounted: nothing to do (the kubelet retries).
pub fn publish(root: &Path, plan: &Publish) -> Result<(), PublishError> {
    // Every step from the root down must be a real directory: the agent's user owns the
    // ModelSet's directory, and a symlink there must not lead a mount elsewhere.
    let mut walked = root.to_path_buf();
    let below = plan.source.strip_prefix(root).unwrap_or(&plan.source);
    for part in below.components() {
        walked.push(part);
        match std::fs::symlink_metadata(&walked) {
            Ok(m) if m.file_type().is_dir() => {}
            Ok(_) => {
                return Err(PublishError::PermissionDenied(format!(
                    "{} is not a directory on this node",
                    walked.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(PublishError::NotFound(format!(
                    "this node has no models for {} (no {}): the ModelSet must be of the pod's namespace and the pod on a node of a fleet that uses it",
                    plan.pod,
                    plan.source.display()
                )));
            }
            Err(e) => return Err(io("reading", &walked)(e)),
        }
    }
    if is_mount_point(&plan.target)? {
        return Ok(());
    }
    std::fs::create_dir_all(&plan.target).map_err(io("creating", &plan.target))?;
    use rustix::mount::{MountFlags, UnmountFlags, mount_bind, mount_remount, unmount};
    mount_bind(&plan.source, &plan.target)
        .map_err(|e| io("bind-mounting onto", &plan.target)(e.into()))?;
    // A bind mount takes its flags only from a remount; never leave it writable.
    let flags = MountFlags::BIND
        | MountFlags::RDONLY
        | MountFlags::NOSUID
        | MountFlags::NODEV
        | MountFlags::NOEXEC;
    if let Err(e) = mount_remount(&plan.target, flags, "") {
        let _ = unmount(&plan.target, UnmountFlags::DETACH);
        return Err(io("remounting read-only", &plan.target)(e.into()));
    }
    Ok(())
}

/// Unmounts `target` and removes the directory (the spec: the plugin deletes what it
/// created). Again for a target already gone: nothing to do.
pub fn unpublish(target: &Path) -> Result<(), PublishError> {
    if is_mount_point(target)? {
        rustix::mount::unmount(target, rustix::mount::UnmountFlags::empty())
            .map_err(|e| io("unmounting", target)(e.into()))?;
    }
    match std::fs::remove_dir(target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("removing", target)(e)),
    }
}

/// Whether `path` is a mount point, from this process's mount table.
pub fn is_mount_point(path: &Path) -> Result<bool, PublishError> {
    let table = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io("reading", Path::new("/proc/self/mountinfo")))?;
    Ok(mount_points(&table).any(|p| p == path))
}

/// The mount points of a mountinfo table (the fifth field, octal escapes undone).
fn mount_points(table: &str) -> impl Iterator<Item = PathBuf> + '_ {
    table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_octal(field)))
}

fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'\\' && i + 3 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 4]).ok())
            .flatten()
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        if let Some(n) = escaped {
            out.push(n);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::proto::{BlockVolume, MountVolume, VolumeCapability};

    fn request(pairs: &[(&str, &str)]) -> NodePublishVolumeRequest {
        NodePublishVolumeRequest {
            volume_id: "csi-0123".into(),
            target_path: "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/models/mount".into(),
            volume_capability: Some(VolumeCapability {
                mount: Some(MountVolume::default()),
                ..Default::default()
            }),
            volume_context: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    const POD: [(&str, &str); 3] = [
        (EPHEMERAL, "true"),
        (POD_NAMESPACE, "team-a"),
        (POD_NAME, "comfy-0"),
    ];

    fn with(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        POD.iter().chain(extra).copied().collect()
    }

    #[test]
    fn a_pod_gets_its_own_namespaces_modelset_directory() {
        let plan = plan(
            Path::new("/models"),
            &request(&with(&[("modelSet", "sdxl")])),
        )
        .unwrap();
        assert_eq!(plan.source, Path::new("/models/team-a/sdxl"));
        assert_eq!(plan.pod, "team-a/comfy-0");
    }

    #[test]
    fn no_attribute_climbs_out_of_the_pods_namespace() {
        for bad in [
            "../team-b/sdxl",
            "team-b/sdxl",
            "..",
            "Sdxl",
            "",
            "-x",
            "a..b",
        ] {
            let err =
                plan(Path::new("/models"), &request(&with(&[("modelSet", bad)]))).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_request_without_the_kubelets_pod_info_or_not_inline_is_refused() {
        let no_ns = request(&[(EPHEMERAL, "true"), ("modelSet", "sdxl")]);
        let err = plan(Path::new("/models"), &no_ns).unwrap_err();
        assert!(err.to_string().contains("podInfoOnMount"), "{err}");
        let pv = request(&[(POD_NAMESPACE, "team-a"), ("modelSet", "sdxl")]);
        let err = plan(Path::new("/models"), &pv).unwrap_err();
        assert!(err.to_string().contains("only inline volumes"), "{err}");
    }

    #[test]
    fn missing_fields_and_block_access_are_invalid_arguments() {
        let good = request(&with(&[("modelSet", "sdxl")]));
        let mut cases = Vec::new();
        let mut r = good.clone();
        r.volume_id.clear();
        cases.push(r);
        let mut r = good.clone();
        r.target_path.clear();
        cases.push(r);
        let mut r = good.clone();
        r.target_path = "relative/mount".into();
        cases.push(r);
        let mut r = good.clone();
        r.volume_capability = None;
        cases.push(r);
        let mut r = good.clone();
        r.volume_capability = Some(VolumeCapability {
            block: Some(BlockVolume {}),
            ..Default::default()
        });
        cases.push(r);
        for r in cases {
            let err = plan(Path::new("/models"), &r).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{r:?}");
        }
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        let table = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw\n\
                     37 35 98:0 / /models ro - ext4 /dev/x rw\n";
        let points: Vec<_> = mount_points(table).collect();
        assert_eq!(
            points,
            [PathBuf::from("/mnt/with space"), PathBuf::from("/models")]
        );
    }
}
