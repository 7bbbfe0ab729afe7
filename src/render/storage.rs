//! S3 volumes through the mountpoint-s3 CSI driver, statically provisioned: one
//! PersistentVolume (cluster-scoped, reclaim policy Retain) and one claim bound to it by
//! name. Deleting either never touches the bucket: S3 data is never deleted.

use serde_json::{Value, json};

use super::error::RenderError;
use super::settings::ClusterSettings;
use crate::crd::comfyui::{ComfyUIDeploymentSpec, S3Location};
use crate::names::FleetNames;

pub const CSI_DRIVER: &str = "s3.csi.aws.com";
/// Required by the API, ignored by mountpoint-s3.
const NOMINAL_CAPACITY: &str = "1200Gi";

/// One S3 volume of the pods: what it is for, where it mounts, and its bucket.
#[derive(Clone, Debug, PartialEq)]
pub struct S3Volume {
    pub purpose: &'static str,
    pub mount_path: &'static str,
    pub bucket: String,
    pub prefix: String,
    pub region: String,
    /// Mounted with the pods' own ServiceAccount's role (the class's
    /// `s3.volumeServiceAccountAnnotations`), not the S3 CSI driver's.
    pub as_pod: bool,
}

pub fn volumes(
    spec: &ComfyUIDeploymentSpec,
    cluster: &ClusterSettings,
) -> Result<Vec<S3Volume>, RenderError> {
    let mut out = Vec::new();
    let mut add = |purpose, mount_path, location: &Option<S3Location>| -> Result<(), RenderError> {
        if let Some(l) = location {
            // The schema forbids these; objects stored before a rule existed still get a clear error.
            if l.prefix.starts_with('/') || l.prefix.contains("..") {
                return Err(RenderError::InvalidSpec {
                    field: format!("spec.storage.{purpose}.prefix"),
                    message: format!("{:?} must not start with '/' or contain '..'", l.prefix),
                });
            }
            let region = l
                .region
                .clone()
                .filter(|r| !r.is_empty())
                .or_else(|| cluster.region.clone())
                .ok_or_else(|| RenderError::InvalidSpec {
                    field: format!("spec.storage.{purpose}.region"),
                    message: "is not set and the controller has no --region to default it from"
                        .into(),
                })?;
            out.push(S3Volume {
                purpose,
                mount_path,
                bucket: l.bucket.clone(),
                prefix: l.prefix.clone(),
                region,
                as_pod: !spec.storage.class_volume_identity.is_empty(),
            });
        }
        Ok(())
    };
    add("outputs", "/app/ComfyUI/output", &spec.storage.outputs)?;
    add("inputs", "/app/ComfyUI/input", &spec.storage.inputs)?;
    Ok(out)
}

pub fn volume_spec(fleet: &FleetNames, volume: &S3Volume) -> Value {
    // Pass the region: IMDS region detection fails at the nodes' hop limit of 1.
    let mut mount_options = vec![
        "allow-other".to_string(),
        format!("region {}", volume.region),
    ];
    if !volume.prefix.is_empty() {
        mount_options.push(format!("prefix {}", volume.prefix));
    }
    json!({
        "capacity": {"storage": NOMINAL_CAPACITY},
        "accessModes": ["ReadWriteMany"],
        "persistentVolumeReclaimPolicy": "Retain",
        "storageClassName": "",
        "mountOptions": mount_options,
        // Pre-bound, so no other claim can take this volume.
        "claimRef": {"namespace": fleet.namespace, "name": fleet.volume_claim(volume.purpose)},
        "csi": {
            "driver": CSI_DRIVER,
            // Unique per PV across the cluster.
            "volumeHandle": format!("sdfleet-{}", fleet.volume(volume.purpose)),
            "volumeAttributes": volume_attributes(volume),
        },
    })
}

fn volume_attributes(volume: &S3Volume) -> Value {
    let mut attributes = json!({"bucketName": volume.bucket});
    if volume.as_pod {
        // The driver takes the pod's ServiceAccount token from the kubelet and assumes
        // that account's role; STS in the bucket's region (IMDS detection fails at the
        // nodes' hop limit of 1).
        attributes["authenticationSource"] = json!("pod");
        attributes["stsRegion"] = json!(volume.region);
    }
    attributes
}

pub fn claim_spec(fleet: &FleetNames, volume: &S3Volume) -> Value {
    json!({
        "accessModes": ["ReadWriteMany"],
        "storageClassName": "",
        "resources": {"requests": {"storage": NOMINAL_CAPACITY}},
        "volumeName": fleet.volume(volume.purpose),
    })
}

#[cfg(test)]
mod tests {
    use crate::crd::comfyui::S3Location;
    use crate::render::nodeclass::Cloud;
    use crate::render::tests::{SDXL, example, render};
    use crate::render::{ChildKind, RenderContext, RenderError, build};
    use serde_json::json;

    #[test]
    fn outputs_volume_is_retained_pre_bound_and_scoped_to_the_prefix() {
        let children = render(&example(SDXL), Cloud::Aws);
        let pv = &children
            .iter()
            .find(|c| c.kind == ChildKind::PersistentVolume)
            .unwrap()
            .manifest["spec"];
        assert_eq!(pv["persistentVolumeReclaimPolicy"], "Retain");
        assert_eq!(pv["csi"]["driver"], "s3.csi.aws.com");
        assert_eq!(
            pv["csi"]["volumeAttributes"]["bucketName"],
            "comfyui-outputs-demo"
        );
        assert_eq!(pv["csi"]["volumeHandle"], "sdfleet-studio.sdxl-outputs");
        assert_eq!(
            pv["mountOptions"],
            json!(["allow-other", "region us-west-2", "prefix sdxl/"])
        );
        assert_eq!(
            pv["claimRef"],
            json!({"namespace": "studio", "name": "sdxl-outputs"})
        );
        let pvc = &children
            .iter()
            .find(|c| c.kind == ChildKind::PersistentVolumeClaim)
            .unwrap()
            .manifest["spec"];
        assert_eq!(pvc["volumeName"], "studio.sdxl-outputs");
        assert_eq!(pvc["storageClassName"], "");
    }

    #[test]
    fn with_the_class_identity_volumes_are_mounted_as_the_pods_own_account() {
        let mut cud = example(SDXL);
        assert!(
            !render(&cud, Cloud::Aws)
                .iter()
                .any(|c| c.kind == ChildKind::ServiceAccount),
            "without it, the driver's identity and no account of the pods"
        );
        // What apply_class puts there from the FleetClass.
        cud.spec.storage.class_volume_identity = [(
            "eks.amazonaws.com/role-arn".to_string(),
            "arn:aws:iam::123456789012:role/comfy-volumes-studio".to_string(),
        )]
        .into();
        let children = render(&cud, Cloud::Aws);
        let sa = children
            .iter()
            .find(|c| c.kind == ChildKind::ServiceAccount)
            .unwrap();
        assert_eq!(sa.name, "sdxl-comfyui");
        assert_eq!(
            sa.manifest["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
            "arn:aws:iam::123456789012:role/comfy-volumes-studio"
        );
        assert_eq!(sa.manifest["automountServiceAccountToken"], false);
        let pv = &children
            .iter()
            .find(|c| c.kind == ChildKind::PersistentVolume)
            .unwrap()
            .manifest["spec"]["csi"]["volumeAttributes"];
        assert_eq!(
            *pv,
            json!({"bucketName": "comfyui-outputs-demo", "authenticationSource": "pod", "stsRegion": "us-west-2"})
        );
        let pod = &children
            .iter()
            .find(|c| c.kind == ChildKind::Deployment)
            .unwrap()
            .manifest["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "sdxl-comfyui");
        // The driver gets the token from the kubelet: none in ComfyUI.
        assert_eq!(pod["automountServiceAccountToken"], false);
    }

    #[test]
    fn inputs_get_their_own_volume_with_their_own_region() {
        let mut cud = example(SDXL);
        cud.spec.storage.inputs = Some(S3Location {
            bucket: "in-bucket".into(),
            prefix: String::new(),
            region: Some("eu-west-1".into()),
        });
        let children = render(&cud, Cloud::Aws);
        let pvs: Vec<_> = children
            .iter()
            .filter(|c| c.kind == ChildKind::PersistentVolume)
            .collect();
        assert_eq!(pvs.len(), 2);
        assert_eq!(pvs[1].name, "studio.sdxl-inputs");
        assert_eq!(
            pvs[1].manifest["spec"]["mountOptions"],
            json!(["allow-other", "region eu-west-1"])
        );
    }

    #[test]
    fn an_escaping_prefix_is_an_error_not_a_volume() {
        let mut cud = example(SDXL);
        cud.spec.storage.outputs.as_mut().unwrap().prefix = "../other/".into();
        let cluster = crate::render::tests::cluster();
        let err = build(
            &cud,
            &RenderContext {
                cluster: &cluster,
                node_class: Cloud::Aws.provider(),
                model_sync: Default::default(),
            },
        )
        .unwrap_err();
        assert!(
            matches!(err, RenderError::InvalidSpec { ref field, .. } if field == "spec.storage.outputs.prefix")
        );
    }
}
