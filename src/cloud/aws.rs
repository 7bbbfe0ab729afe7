//! `--cloud aws`: the fleet's nodes come from a Karpenter EC2NodeClass.

use std::collections::BTreeMap;

use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use super::{ClusterSettings, NodeClassProvider};
use crate::crd::comfyui::NodeClassSpec;
use crate::render::names::{FLEET_KEY, FleetNames};

pub struct Aws;

impl NodeClassProvider for Aws {
    fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk(&GroupVersionKind::gvk(
            "karpenter.k8s.aws",
            "v1",
            "EC2NodeClass",
        ))
    }

    fn spec(
        &self,
        fleet: &FleetNames,
        node_class: &NodeClassSpec,
        cluster: &ClusterSettings,
    ) -> Value {
        let discovery = || {
            BTreeMap::from([(
                "karpenter.sh/discovery".to_string(),
                cluster.cluster_name.clone(),
            )])
        };
        let subnet_tags = non_empty_or(&node_class.subnet_selector_tags, discovery);
        let security_group_tags = non_empty_or(&node_class.security_group_selector_tags, discovery);
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
            "tags": {
                FLEET_KEY: fleet.nodepool(),
                "sdfleet.io/owner-namespace": fleet.namespace,
                "sdfleet.io/owner-name": fleet.name,
            },
        });
        if let Some(role) = node_class.role() {
            spec["role"] = json!(role);
        } else if let Some(profile) = node_class.instance_profile() {
            spec["instanceProfile"] = json!(profile);
        }
        spec
    }
}

fn non_empty_or(
    tags: &BTreeMap<String, String>,
    default: impl Fn() -> BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    if tags.is_empty() {
        default()
    } else {
        tags.clone()
    }
}
