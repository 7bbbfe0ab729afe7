//! `--cloud aws`: the fleet's nodes come from a Karpenter EC2NodeClass.

use std::collections::BTreeMap;

use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use super::NodeClassProvider;
use crate::crd::comfyui::{NodeClassSpec, SociPull};
use crate::names::FleetNames;
use crate::render::error::RenderError;
use crate::render::settings::ClusterSettings;

pub struct Aws;

impl NodeClassProvider for Aws {
    fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk(&GroupVersionKind::gvk(
            "karpenter.k8s.aws",
            "v1",
            "EC2NodeClass",
        ))
    }

    fn node_class_spec(
        &self,
        fleet: &FleetNames,
        node_class: &NodeClassSpec,
        cluster: &ClusterSettings,
    ) -> Result<Value, RenderError> {
        let subnet_tags = selector_tags(
            &node_class.subnet_selector_tags,
            "subnetSelectorTags",
            cluster,
        )?;
        let security_group_tags = selector_tags(
            &node_class.security_group_selector_tags,
            "securityGroupSelectorTags",
            cluster,
        )?;
        // Bottlerocket boots from a small OS volume; its data volume is the second device.
        let root_device = if node_class.ami_alias.starts_with("bottlerocket@") {
            "/dev/xvdb"
        } else {
            "/dev/xvda"
        };
        let mut spec = json!({
            "amiSelectorTerms": [{"alias": node_class.ami_alias}],
            "subnetSelectorTerms": [{"tags": subnet_tags}],
            "securityGroupSelectorTerms": [{"tags": security_group_tags}],
            "blockDeviceMappings": [{
                "deviceName": root_device,
                "rootVolume": true,
                "ebs": {
                    "volumeSize": node_class.root_volume_size,
                    "volumeType": "gp3",
                    "encrypted": true,
                    "deleteOnTermination": true,
                },
            }],
            // IMDSv2 only, and pods cannot reach IMDS (hop limit 1): they use IRSA/Pod Identity.
            "metadataOptions": {
                "httpEndpoint": "enabled",
                "httpProtocolIPv6": "disabled",
                "httpPutResponseHopLimit": 1,
                "httpTokens": "required",
            },
            // On AL2023 this builds a RAID0 of the NVMe instance-store disks at
            // /mnt/k8s-disks/0, where the models directory lives, with no userData mkfs.
            "instanceStorePolicy": "RAID0",
            "tags": fleet.node_labels(),
        });
        if let Some(pull) = &node_class.image_pull {
            if let Some(snapshot) = &pull.snapshot_id {
                // Bottlerocket's data volume (the CRD allows imagePull on Bottlerocket only).
                spec["blockDeviceMappings"][0]["ebs"]["snapshotID"] = json!(snapshot);
            }
            if let Some(soci) = &pull.soci {
                spec["userData"] = json!(soci_settings(soci));
            }
        }
        if let Some(role) = node_class.role() {
            spec["role"] = json!(role);
        } else if let Some(profile) = node_class.instance_profile() {
            spec["instanceProfile"] = json!(profile);
        }
        Ok(spec)
    }
}

/// Bottlerocket settings (TOML, merged by Karpenter with its own) that pull images with
/// the SOCI snapshotter in parallel pull-and-unpack mode.
fn soci_settings(soci: &SociPull) -> String {
    let mut toml = String::from(
        "[settings.container-runtime]\nsnapshotter = \"soci\"\n\n[settings.container-runtime-plugins.soci-snapshotter]\npull-mode = \"parallel-pull-unpack\"\n",
    );
    let limits = [
        (
            "max-concurrent-downloads-per-image",
            soci.max_concurrent_downloads_per_image,
        ),
        (
            "max-concurrent-unpacks-per-image",
            soci.max_concurrent_unpacks_per_image,
        ),
    ];
    if limits.iter().any(|(_, v)| v.is_some()) {
        toml.push_str(
            "\n[settings.container-runtime-plugins.soci-snapshotter.parallel-pull-unpack]\n",
        );
        for (key, value) in limits {
            if let Some(v) = value {
                toml.push_str(&format!("{key} = {v}\n"));
            }
        }
    }
    toml
}

/// The given tags, or the Karpenter discovery tag of the controller's `--cluster-name`.
fn selector_tags(
    tags: &BTreeMap<String, String>,
    field: &str,
    cluster: &ClusterSettings,
) -> Result<BTreeMap<String, String>, RenderError> {
    if !tags.is_empty() {
        return Ok(tags.clone());
    }
    match &cluster.cluster_name {
        Some(name) => Ok(BTreeMap::from([(
            "karpenter.sh/discovery".to_string(),
            name.clone(),
        )])),
        None => Err(RenderError::InvalidSpec {
            field: format!("spec.nodeClass.{field}"),
            message: "is empty and the controller has no --cluster-name to default it from".into(),
        }),
    }
}
