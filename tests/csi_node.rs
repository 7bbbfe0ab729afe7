//! The csi.sdfleet.io node plugin on this machine, as root, with real mounts:
//! - the CSI project's own sanity suite (csi-sanity, a Go module) against `sdfleet
//!   csi-node` on its Unix socket: the Identity and Node services, the spec's refusals;
//! - its publish and unpublish: a pod's ModelSet directory bind-mounted read-only (a
//!   write through it fails), once for a repeated call, removed again;
//! - a pod that names what is not its own: another namespace's directory through a
//!   crafted attribute, a ModelSet this node has not got, a symlink planted in the
//!   models root, a PersistentVolume instead of an inline volume.
//!
//! The kubelet's own calls through the registrar, on the testbed's real node, are in
//! `installed`. Needs no cluster.

mod support;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sdfleet::csi::proto::{
    MountVolume, NodePublishVolumeRequest, NodeUnpublishVolumeRequest, VolumeCapability,
};
use sdfleet::csi::publish::{self, PublishError};

fn workdir(case: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sdfleet-csi-{case}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The plugin process; killed and its socket gone on drop.
struct Plugin {
    child: std::process::Child,
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_plugin(socket: &Path, models: &Path) -> Plugin {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_sdfleet"))
        .args(["csi-node", "--node-name", "sanity-node"])
        .arg(format!("--endpoint=unix://{}", socket.display()))
        .arg("--models-root")
        .arg(models)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "the plugin's socket within 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mode = std::fs::metadata(socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "only root on the node talks to the plugin");
    Plugin { child }
}

#[test]
fn the_csi_projects_sanity_suite_passes() {
    let dir = workdir("sanity");
    let socket = dir.join("csi.sock");
    let _plugin = start_plugin(&socket, &dir.join("models"));
    let out = std::process::Command::new(support::tool("csi-sanity"))
        .arg(format!("--csi.endpoint=unix://{}", socket.display()))
        .arg(format!("--csi.mountdir={}", dir.join("mount").display()))
        .arg(format!("--csi.stagingdir={}", dir.join("stage").display()))
        // An inline-only driver has no Controller service: the suite's specs labelled
        // for it, and the one Node spec that makes its volume with CreateVolume first.
        // (The suite skips the other Node specs that need a controller by itself.)
        // Publish and unpublish of a real volume are tested below and on the real node.
        .arg(r"--ginkgo.skip=\[Controller Server\]|should remove target path")
        .arg("--ginkgo.no-color")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "csi-sanity failed:\n{text}");
    // "Ran N of M Specs": the suite ran something, and every spec it ran passed.
    let ran = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Ran "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no 'Ran N of M Specs' in:\n{text}"));
    assert!(ran >= 10, "csi-sanity ran only {ran} specs:\n{text}");
    assert!(text.contains(&format!("{ran} Passed")), "{text}");
    println!("csi-sanity: ran {ran} specs, all passed");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A kubelet's publish of an inline volume for a pod in `namespace`.
fn request(namespace: &str, model_set: &str, target: &Path) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: "csi-4f1e".into(),
        target_path: target.to_string_lossy().into_owned(),
        volume_capability: Some(VolumeCapability {
            mount: Some(MountVolume::default()),
            ..Default::default()
        }),
        readonly: true,
        volume_context: HashMap::from([
            ("csi.storage.k8s.io/ephemeral".into(), "true".into()),
            ("csi.storage.k8s.io/pod.namespace".into(), namespace.into()),
            ("csi.storage.k8s.io/pod.name".into(), "comfy-0".into()),
            ("modelSet".into(), model_set.into()),
        ]),
        ..Default::default()
    }
}

fn publish(root: &Path, r: &NodePublishVolumeRequest) -> Result<(), PublishError> {
    let plan = publish::plan(root, r)?;
    publish::publish(root, &plan)
}

/// Unmounts whatever a failed assertion left, so the directory can go.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (point, _) in support::mounts() {
            if point.starts_with(&self.0) {
                let _ = rustix::mount::unmount(&point, rustix::mount::UnmountFlags::DETACH);
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_pod_gets_its_own_namespaces_models_read_only_and_nothing_else() {
    if !is_root() {
        panic!("mounting needs root (the CI machine and the testbed run as root)");
    }
    let dir = workdir("publish");
    let _cleanup = Cleanup(dir.clone());
    let root = dir.join("models");
    // What the agents left on this node: team-a's ModelSet (this node's fleet), and,
    // as if it were on the same node, team-b's.
    for (ns, ms) in [("team-a", "sdxl"), ("team-b", "secret")] {
        std::fs::create_dir_all(root.join(ns).join(ms).join("checkpoints")).unwrap();
        std::fs::write(
            root.join(ns).join(ms).join("checkpoints/model.safetensors"),
            format!("{ns} weights"),
        )
        .unwrap();
    }
    let pods = dir.join("pods");
    let target = pods.join("uid-1/volumes/kubernetes.io~csi/models/mount");

    publish(&root, &request("team-a", "sdxl", &target)).unwrap();
    assert_eq!(
        std::fs::read_to_string(target.join("checkpoints/model.safetensors")).unwrap(),
        "team-a weights"
    );
    assert!(publish::is_mount_point(&target).unwrap());
    let write = std::fs::write(target.join("checkpoints/evil.safetensors"), "x");
    assert_eq!(
        write.unwrap_err().raw_os_error(),
        Some(libc::EROFS),
        "the pod's models are read-only, even for root in the pod"
    );
    // The kubelet retries a publish it did not see answered: the same answer, one mount.
    publish(&root, &request("team-a", "sdxl", &target)).unwrap();
    let mounts = support::mounts()
        .iter()
        .filter(|(point, _)| *point == target)
        .count();
    assert_eq!(mounts, 1);

    // team-a's pod cannot climb to team-b's directory: the attribute is a name, and the
    // namespace is the kubelet's.
    let other = pods.join("uid-2/volumes/kubernetes.io~csi/models/mount");
    let err = publish(&root, &request("team-a", "../team-b/secret", &other)).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    // A ModelSet this node has none of (another team's name in the pod's own namespace).
    let err = publish(&root, &request("team-a", "secret", &other)).unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    assert!(!other.exists(), "nothing made for a refused publish");
    // A symlink planted where a ModelSet's directory would be leads nowhere.
    std::os::unix::fs::symlink(root.join("team-b/secret"), root.join("team-a/planted")).unwrap();
    let err = publish(&root, &request("team-a", "planted", &other)).unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // A PersistentVolume of this driver (no ephemeral flag) is refused.
    let mut pv = request("team-a", "sdxl", &other);
    pv.volume_context.remove("csi.storage.k8s.io/ephemeral");
    let err = publish(&root, &pv).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(!publish::is_mount_point(&other).unwrap());

    // Unpublish unmounts and removes the directory; again, it is already done.
    let unpublish = NodeUnpublishVolumeRequest {
        volume_id: "csi-4f1e".into(),
        target_path: target.to_string_lossy().into_owned(),
    };
    for _ in 0..2 {
        let target = publish::check_unpublish(&unpublish).unwrap();
        publish::unpublish(&target).unwrap();
    }
    assert!(!target.exists());
    assert!(!publish::is_mount_point(&target).unwrap());
    // The models stayed where they were.
    assert!(
        root.join("team-a/sdxl/checkpoints/model.safetensors")
            .exists()
    );
}
