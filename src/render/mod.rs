//! Pure functions: a ComfyUIDeployment (plus the controller's settings) becomes the list
//! of children the controller applies. No I/O here; `sdfleet render` prints exactly this.

pub mod agent_daemonset;
pub mod child;
pub mod deployment;
pub mod error;
pub mod gateway;
pub mod ingress;
pub mod network_policy;
pub mod nodeclass;
pub mod nodepool;
pub mod service;
pub mod settings;
pub mod storage;

use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

pub use child::{Child, ChildKind, Scope};
pub use error::RenderError;

use crate::crd::comfyui::ComfyUIDeployment;
use crate::crd::modelset::SyncMethod;
use crate::names::FleetNames;
use nodeclass::NodeClassProvider;
use settings::ClusterSettings;

/// Everything render needs besides the resource itself.
pub struct RenderContext<'a> {
    pub cluster: &'a ClusterSettings,
    pub node_class: &'a dyn NodeClassProvider,
    /// How the fleet's ModelSet reaches its nodes (read from the ModelSet): the agent
    /// DaemonSet and the startup taint exist only for `Agent`.
    pub model_sync: SyncMethod,
}

/// Builds children of one fleet: names, labels, namespace and owner reference by kind.
struct Builder<'a> {
    fleet: FleetNames,
    owner: Value,
    ctx: &'a RenderContext<'a>,
    children: Vec<Child>,
}

impl Builder<'_> {
    fn push(&mut self, kind: ChildKind, name: String, spec: Value) -> &mut Value {
        self.push_fields(kind, name, json!({"spec": spec}))
    }

    /// A child whose content is not under `spec` (RoleBinding, ServiceAccount).
    fn push_fields(&mut self, kind: ChildKind, name: String, fields: Value) -> &mut Value {
        let api = kind.api_resource(self.ctx.node_class);
        let mut metadata = json!({"name": name, "labels": self.fleet.owner_labels()});
        if let Some(ns) = kind.namespace(&self.fleet.namespace, &self.ctx.cluster.agent) {
            metadata["namespace"] = json!(ns);
        }
        if kind.scope() == Scope::FleetNamespace {
            metadata["ownerReferences"] = json!([self.owner]);
        }
        let mut manifest =
            json!({"apiVersion": api.api_version, "kind": api.kind, "metadata": metadata});
        if let (Some(m), Value::Object(fields)) = (manifest.as_object_mut(), fields) {
            m.extend(fields);
        }
        self.children.push(Child {
            kind,
            api,
            name,
            manifest,
        });
        let last = self.children.len() - 1;
        &mut self.children[last].manifest
    }
}

/// The desired children of `cud`: the fleet's in the order of `ChildKind::ALL`, then its gateway's.
pub fn build(cud: &ComfyUIDeployment, ctx: &RenderContext) -> Result<Vec<Child>, RenderError> {
    let namespace = cud.namespace().ok_or(RenderError::NoNamespace)?;
    let fleet = FleetNames::new(&namespace, &cud.name_any());
    let spec = &cud.spec;
    let mut b = Builder {
        owner: owner_reference(cud),
        fleet: fleet.clone(),
        ctx,
        children: Vec::new(),
    };

    let class_api = ctx.node_class.api_resource();
    // The controller puts the FleetClass's node settings here before it builds.
    let settings = spec
        .node_class
        .as_ref()
        .ok_or_else(|| RenderError::InvalidSpec {
            field: "spec.className".into(),
            message: "no node settings: they come from the fleet's FleetClass".into(),
        })?;
    let class_spec = ctx
        .node_class
        .node_class_spec(&fleet, settings, ctx.cluster)?;
    b.push(ChildKind::NodeClass, fleet.node_class(), class_spec);
    let agent_syncs = spec.model_set.is_some() && ctx.model_sync == SyncMethod::Agent;
    b.push(
        ChildKind::NodePool,
        fleet.nodepool(),
        nodepool::nodepool_spec(&fleet, spec, &class_api, agent_syncs),
    );
    let volumes = storage::volumes(spec, ctx.cluster)?;
    if volumes.iter().any(|v| v.as_pod) {
        let sa = b.push_fields(
            ChildKind::ServiceAccount,
            fleet.comfyui_service_account(),
            json!({"automountServiceAccountToken": false}),
        );
        sa["metadata"]["annotations"] = json!(spec.storage.class_volume_identity);
    }
    for volume in &volumes {
        b.push(
            ChildKind::PersistentVolume,
            fleet.volume(volume.purpose),
            storage::volume_spec(&fleet, volume),
        );
        b.push(
            ChildKind::PersistentVolumeClaim,
            fleet.volume_claim(volume.purpose),
            storage::claim_spec(&fleet, volume),
        );
    }
    b.push(
        ChildKind::Service,
        fleet.service(),
        service::service_spec(&fleet, spec),
    );
    b.push(
        ChildKind::Deployment,
        fleet.deployment(),
        deployment::deployment_spec(&fleet, spec, &volumes)?,
    );
    if spec.ingress.enabled {
        let backend = ingress::Backend::comfyui(&fleet, spec);
        let ingress = b.push(
            ChildKind::Ingress,
            fleet.ingress(),
            ingress::ingress_spec(&backend, &spec.ingress),
        );
        ingress["metadata"]["annotations"] = json!(ingress::annotations(&backend, &spec.ingress));
    }
    b.push(
        ChildKind::NetworkPolicy,
        fleet.network_policy(),
        network_policy::network_policy_spec(&fleet, spec),
    );
    if let Some(gw) = &spec.gateway {
        push_gateway(&mut b, spec, gw);
    }
    if let Some(model_set) = spec.model_set.as_ref().filter(|_| agent_syncs) {
        b.push(
            ChildKind::AgentDaemonSet,
            fleet.agent_daemonset(),
            agent_daemonset::daemonset_spec(&fleet, &ctx.cluster.agent, model_set),
        );
    }
    Ok(b.children)
}

/// The gateway's children, after the fleet's own (so a fleet without one renders as
/// before).
fn push_gateway(
    b: &mut Builder,
    spec: &crate::crd::comfyui::ComfyUIDeploymentSpec,
    gw: &crate::crd::gateway::GatewaySpec,
) {
    let fleet = b.fleet.clone();
    let settings = &b.ctx.cluster.gateway;
    let sa = b.push_fields(ChildKind::ServiceAccount, fleet.gateway(), json!({}));
    sa["metadata"]["annotations"] = gateway::service_account_annotations(gw);
    let (role_ref, subjects) = gateway::role_binding(&fleet, settings);
    b.push_fields(
        ChildKind::RoleBinding,
        fleet.gateway(),
        json!({"roleRef": role_ref, "subjects": subjects}),
    );
    if gw.store.postgres.is_none() {
        b.push(
            ChildKind::PersistentVolumeClaim,
            fleet.gateway_store(),
            gateway::claim_spec(gw),
        );
    }
    b.push(
        ChildKind::Service,
        fleet.gateway(),
        gateway::service_spec(&fleet),
    );
    b.push(
        ChildKind::Deployment,
        fleet.gateway(),
        gateway::deployment_spec(&fleet, spec, gw, settings),
    );
    if let Some(budget) = gateway::disruption_budget_spec(&fleet, gw) {
        b.push(ChildKind::PodDisruptionBudget, fleet.gateway(), budget);
    }
    if gw.ingress.enabled {
        let backend = ingress::Backend {
            service: fleet.gateway(),
            port: 80,
            health_path: "/healthz",
            sticky: false,
        };
        let ing = b.push(
            ChildKind::Ingress,
            fleet.gateway(),
            ingress::ingress_spec(&backend, &gw.ingress),
        );
        ing["metadata"]["annotations"] = json!(ingress::annotations(&backend, &gw.ingress));
    }
}

fn owner_reference(cud: &ComfyUIDeployment) -> Value {
    json!({
        "apiVersion": ComfyUIDeployment::api_version(&()),
        "kind": ComfyUIDeployment::kind(&()),
        "name": cud.name_any(),
        "uid": cud.metadata.uid.clone().unwrap_or_default(),
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::render::nodeclass::Cloud;

    pub fn example(yaml: &str) -> ComfyUIDeployment {
        let mut cud: ComfyUIDeployment = serde_saphyr::from_str(yaml).unwrap();
        cud.metadata.uid = Some("uid-1".into());
        cud
    }

    pub const SDXL: &str = r#"
apiVersion: sdfleet.io/v1alpha1
kind: ComfyUIDeployment
metadata: {name: sdxl, namespace: studio}
spec:
  image: comfyui:latest
  nodeClass: {role: KarpenterNodeRole-demo}
  storage:
    outputs: {bucket: comfyui-outputs-demo, prefix: sdxl/}
"#;

    pub fn cluster() -> ClusterSettings {
        ClusterSettings {
            agent: Default::default(),
            gateway: Default::default(),
            cluster_name: Some("demo".into()),
            region: Some("us-west-2".into()),
        }
    }

    pub fn render(cud: &ComfyUIDeployment, cloud: Cloud) -> Vec<Child> {
        let cluster = cluster();
        build(
            cud,
            &RenderContext {
                cluster: &cluster,
                node_class: cloud.provider(),
                model_sync: Default::default(),
            },
        )
        .unwrap()
    }

    #[test]
    fn children_of_the_example_in_order() {
        let children = render(&example(SDXL), Cloud::Aws);
        let kinds: Vec<_> = children.iter().map(|c| (c.kind, c.name.as_str())).collect();
        assert_eq!(
            kinds,
            [
                (ChildKind::NodeClass, "studio.sdxl"),
                (ChildKind::NodePool, "studio.sdxl"),
                (ChildKind::PersistentVolume, "studio.sdxl-outputs"),
                (ChildKind::PersistentVolumeClaim, "sdxl-outputs"),
                (ChildKind::Service, "sdxl"),
                (ChildKind::Deployment, "sdxl"),
                (ChildKind::Ingress, "sdxl"),
                (ChildKind::NetworkPolicy, "sdxl-comfyui"),
            ]
        );
        for child in &children {
            let labels = &child.manifest["metadata"]["labels"];
            assert_eq!(labels["app.kubernetes.io/managed-by"], "sdfleet");
            assert_eq!(labels["sdfleet.io/owner-namespace"], "studio");
            assert_eq!(labels["sdfleet.io/owner-name"], "sdxl");
            let owned = child.manifest["metadata"].get("ownerReferences").is_some();
            assert_eq!(
                owned,
                child.kind.scope() == Scope::FleetNamespace,
                "{:?}",
                child.kind
            );
            assert_eq!(
                child.manifest["metadata"].get("namespace").is_some(),
                child.kind.scope() != Scope::Cluster
            );
        }
    }

    #[test]
    fn ingress_disabled_and_no_storage_render_no_such_children() {
        let mut cud = example(SDXL);
        cud.spec.ingress.enabled = false;
        cud.spec.storage.outputs = None;
        let kinds: Vec<_> = render(&cud, Cloud::Kwok).iter().map(|c| c.kind).collect();
        assert_eq!(
            kinds,
            [
                ChildKind::NodeClass,
                ChildKind::NodePool,
                ChildKind::Service,
                ChildKind::Deployment,
                ChildKind::NetworkPolicy
            ]
        );
    }

    #[test]
    fn kwok_and_aws_differ_only_in_the_node_class() {
        let cud = example(SDXL);
        let aws = render(&cud, Cloud::Aws);
        let kwok = render(&cud, Cloud::Kwok);
        assert_eq!(aws[0].manifest["kind"], "EC2NodeClass");
        assert_eq!(kwok[0].manifest["kind"], "KWOKNodeClass");
        assert_eq!(
            aws[1].manifest["spec"]["template"]["spec"]["nodeClassRef"]["kind"],
            "EC2NodeClass"
        );
        assert_eq!(
            kwok[1].manifest["spec"]["template"]["spec"]["nodeClassRef"]["group"],
            "karpenter.kwok.sh"
        );
        assert_eq!(aws[2..], kwok[2..]);
    }

    #[test]
    fn ec2_node_class_has_role_imdsv2_raid0_and_gp3_root() {
        let spec = &render(&example(SDXL), Cloud::Aws)[0].manifest["spec"];
        assert_eq!(spec["amiSelectorTerms"][0]["alias"], "al2023@latest");
        assert_eq!(spec["role"], "KarpenterNodeRole-demo");
        assert!(spec.get("instanceProfile").is_none());
        assert_eq!(spec["metadataOptions"]["httpTokens"], "required");
        assert_eq!(spec["instanceStorePolicy"], "RAID0");
        assert_eq!(spec["blockDeviceMappings"][0]["ebs"]["volumeType"], "gp3");
        assert_eq!(spec["blockDeviceMappings"][0]["ebs"]["volumeSize"], "100Gi");
        assert_eq!(
            spec["subnetSelectorTerms"][0]["tags"]["karpenter.sh/discovery"],
            "demo"
        );
        assert_eq!(
            spec["securityGroupSelectorTerms"][0]["tags"]["karpenter.sh/discovery"],
            "demo"
        );
    }

    #[test]
    fn ec2_node_class_uses_instance_profile_and_custom_selectors() {
        let mut cud = example(SDXL);
        let node_class = cud.spec.node_class.as_mut().unwrap();
        node_class.role = Some(String::new());
        node_class.instance_profile = Some("NodeProfile".into());
        node_class.subnet_selector_tags = [("tier".to_string(), "private".to_string())].into();
        let spec = &render(&cud, Cloud::Aws)[0].manifest["spec"];
        assert_eq!(spec["instanceProfile"], "NodeProfile");
        assert!(spec.get("role").is_none());
        assert_eq!(
            spec["subnetSelectorTerms"][0]["tags"],
            json!({"tier": "private"})
        );
    }

    #[test]
    fn a_bottlerocket_data_volume_comes_from_the_image_snapshot_or_soci_pulls_in_parallel() {
        use crate::crd::comfyui::{ImagePull, SociPull};
        let mut cud = example(SDXL);
        let node_class = cud.spec.node_class.as_mut().unwrap();
        node_class.ami_alias = "bottlerocket@latest".into();
        node_class.image_pull = Some(ImagePull {
            snapshot_id: Some("snap-0123456789abcdef0".into()),
            soci: None,
        });
        let spec = render(&cud, Cloud::Aws)[0].manifest["spec"].clone();
        let volume = &spec["blockDeviceMappings"][0];
        assert_eq!(
            volume["deviceName"], "/dev/xvdb",
            "Bottlerocket's data volume"
        );
        assert_eq!(volume["ebs"]["snapshotID"], "snap-0123456789abcdef0");
        assert_eq!(volume["ebs"]["volumeSize"], "100Gi");
        assert!(spec.get("userData").is_none());

        let node_class = cud.spec.node_class.as_mut().unwrap();
        node_class.image_pull = Some(ImagePull {
            snapshot_id: None,
            soci: Some(SociPull {
                max_concurrent_downloads_per_image: Some(20),
                max_concurrent_unpacks_per_image: None,
            }),
        });
        let spec = render(&cud, Cloud::Aws)[0].manifest["spec"].clone();
        assert!(
            spec["blockDeviceMappings"][0]["ebs"]
                .get("snapshotID")
                .is_none()
        );
        // Bottlerocket's own keys (settings.container-runtime.snapshotter, and the
        // soci-snapshotter plugin's pull-mode and parallel-pull-unpack limits).
        assert_eq!(
            spec["userData"].as_str().unwrap(),
            "[settings.container-runtime]\nsnapshotter = \"soci\"\n\n\
             [settings.container-runtime-plugins.soci-snapshotter]\npull-mode = \"parallel-pull-unpack\"\n\n\
             [settings.container-runtime-plugins.soci-snapshotter.parallel-pull-unpack]\n\
             max-concurrent-downloads-per-image = 20\n"
        );
    }

    #[test]
    fn missing_controller_defaults_name_the_field_to_set() {
        let cud = example(SDXL);
        let bare = ClusterSettings {
            agent: Default::default(),
            gateway: Default::default(),
            cluster_name: None,
            region: None,
        };
        let ctx = RenderContext {
            cluster: &bare,
            node_class: Cloud::Aws.provider(),
            model_sync: Default::default(),
        };
        let err = build(&cud, &ctx).unwrap_err().to_string();
        assert!(err.contains("spec.nodeClass.subnetSelectorTags"), "{err}");
        let kwok = RenderContext {
            cluster: &bare,
            node_class: Cloud::Kwok.provider(),
            model_sync: Default::default(),
        };
        let err = build(&cud, &kwok).unwrap_err().to_string();
        assert!(err.contains("spec.storage.outputs.region"), "{err}");
    }
}
