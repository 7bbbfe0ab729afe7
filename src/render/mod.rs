//! Pure functions: a ComfyUIDeployment (plus the controller's settings) becomes the list
//! of children the controller applies. No I/O here; `sdfleet render` prints exactly this.

pub mod agent;
pub mod deployment;
pub mod ingress;
pub mod names;
pub mod nodepool;
pub mod service;
pub mod storage;

use kube::core::ApiResource;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::cloud::{ClusterSettings, NodeClassProvider};
use crate::crd::comfyui::ComfyUIDeployment;
use names::FleetNames;

/// Which kind of child; also the order of creation (and, reversed, of deletion).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChildKind {
    NodeClass,
    NodePool,
    PersistentVolume,
    PersistentVolumeClaim,
    Service,
    Deployment,
    Ingress,
    /// The node agent DaemonSet, in the operator's namespace (not the fleet's).
    AgentDaemonSet,
}

impl ChildKind {
    pub fn namespaced(self) -> bool {
        !matches!(
            self,
            ChildKind::NodeClass
                | ChildKind::NodePool
                | ChildKind::PersistentVolume
                | ChildKind::AgentDaemonSet
        )
    }
}

/// One desired child: its kind, API and the full manifest to server-side apply.
#[derive(Clone, Debug, PartialEq)]
pub struct Child {
    pub kind: ChildKind,
    pub api: ApiResource,
    pub name: String,
    pub manifest: Value,
}

impl Child {
    fn new(kind: ChildKind, api: ApiResource, name: String, manifest: Value) -> Child {
        Child {
            kind,
            api,
            name,
            manifest,
        }
    }
}

/// A spec the schema let through but the controller cannot build (e.g. an object stored
/// before a CEL rule existed). Each variant becomes a status reason.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RenderError {
    #[error("the resource has no namespace")]
    NoNamespace,
    #[error("{field}: {message}")]
    InvalidSpec { field: String, message: String },
}

/// Everything render needs besides the resource itself.
pub struct RenderContext<'a> {
    pub cluster: &'a ClusterSettings,
    pub node_class: &'a dyn NodeClassProvider,
}

/// The desired children of `cud`, in creation order.
pub fn build(cud: &ComfyUIDeployment, ctx: &RenderContext) -> Result<Vec<Child>, RenderError> {
    let namespace = cud.namespace().ok_or(RenderError::NoNamespace)?;
    let fleet = FleetNames::new(&namespace, &cud.name_any());
    let spec = &cud.spec;
    let owner = owner_reference(cud);
    let mut children = Vec::new();

    let class_api = ctx.node_class.api_resource();
    children.push(Child::new(
        ChildKind::NodeClass,
        class_api.clone(),
        fleet.node_class(),
        manifest(
            &class_api,
            &fleet.node_class(),
            None,
            &fleet,
            None,
            ctx.node_class.spec(&fleet, &spec.node_class, ctx.cluster)?,
        ),
    ));
    let pool_api = nodepool::api_resource();
    children.push(Child::new(
        ChildKind::NodePool,
        pool_api.clone(),
        fleet.nodepool(),
        manifest(
            &pool_api,
            &fleet.nodepool(),
            None,
            &fleet,
            None,
            nodepool::spec(&fleet, spec, &class_api),
        ),
    ));

    let volumes = storage::volumes(spec, ctx.cluster)?;
    for volume in &volumes {
        let pv_api = ApiResource::erase::<k8s_openapi::api::core::v1::PersistentVolume>(&());
        let pv_name = fleet.volume(volume.purpose);
        children.push(Child::new(
            ChildKind::PersistentVolume,
            pv_api.clone(),
            pv_name.clone(),
            manifest(
                &pv_api,
                &pv_name,
                None,
                &fleet,
                None,
                storage::volume_spec(&fleet, volume),
            ),
        ));
        let pvc_api = ApiResource::erase::<k8s_openapi::api::core::v1::PersistentVolumeClaim>(&());
        let pvc_name = fleet.volume_claim(volume.purpose);
        children.push(Child::new(
            ChildKind::PersistentVolumeClaim,
            pvc_api.clone(),
            pvc_name.clone(),
            manifest(
                &pvc_api,
                &pvc_name,
                Some(&namespace),
                &fleet,
                Some(&owner),
                storage::claim_spec(&fleet, volume),
            ),
        ));
    }

    let svc_api = ApiResource::erase::<k8s_openapi::api::core::v1::Service>(&());
    children.push(Child::new(
        ChildKind::Service,
        svc_api.clone(),
        fleet.service(),
        manifest(
            &svc_api,
            &fleet.service(),
            Some(&namespace),
            &fleet,
            Some(&owner),
            service::spec(&fleet, spec),
        ),
    ));

    let deploy_api = ApiResource::erase::<k8s_openapi::api::apps::v1::Deployment>(&());
    children.push(Child::new(
        ChildKind::Deployment,
        deploy_api.clone(),
        fleet.deployment(),
        manifest(
            &deploy_api,
            &fleet.deployment(),
            Some(&namespace),
            &fleet,
            Some(&owner),
            deployment::spec(&fleet, spec, &volumes)?,
        ),
    ));

    if spec.model_set.is_some() {
        let ds_api = ApiResource::erase::<k8s_openapi::api::apps::v1::DaemonSet>(&());
        let agent = &ctx.cluster.agent;
        let name = fleet.agent_daemonset();
        children.push(Child::new(
            ChildKind::AgentDaemonSet,
            ds_api.clone(),
            name.clone(),
            manifest(
                &ds_api,
                &name,
                Some(&agent.namespace),
                &fleet,
                None,
                agent::spec(&fleet, agent),
            ),
        ));
    }

    if spec.ingress.enabled {
        let ing_api = ApiResource::erase::<k8s_openapi::api::networking::v1::Ingress>(&());
        let mut ing = manifest(
            &ing_api,
            &fleet.ingress(),
            Some(&namespace),
            &fleet,
            Some(&owner),
            ingress::spec(&fleet, spec),
        );
        ing["metadata"]["annotations"] = json!(ingress::annotations(&spec.ingress));
        children.push(Child::new(
            ChildKind::Ingress,
            ing_api,
            fleet.ingress(),
            ing,
        ));
    }
    Ok(children)
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

fn manifest(
    api: &ApiResource,
    name: &str,
    namespace: Option<&str>,
    fleet: &FleetNames,
    owner: Option<&Value>,
    spec: Value,
) -> Value {
    let mut metadata = json!({"name": name, "labels": fleet.owner_labels()});
    if let Some(ns) = namespace {
        metadata["namespace"] = json!(ns);
    }
    if let Some(owner) = owner {
        metadata["ownerReferences"] = json!([owner]);
    }
    json!({"apiVersion": api.api_version, "kind": api.kind, "metadata": metadata, "spec": spec})
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cloud::Cloud;

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
            },
        )
        .unwrap()
    }

    #[test]
    fn children_of_the_example_in_creation_order() {
        let children = render(&example(SDXL), Cloud::Aws);
        let kinds: Vec<_> = children.iter().map(|c| (c.kind, c.name.as_str())).collect();
        assert_eq!(
            kinds,
            [
                (ChildKind::NodeClass, "studio-sdxl"),
                (ChildKind::NodePool, "studio-sdxl"),
                (ChildKind::PersistentVolume, "studio-sdxl-outputs"),
                (ChildKind::PersistentVolumeClaim, "sdxl-outputs"),
                (ChildKind::Service, "sdxl"),
                (ChildKind::Deployment, "sdxl"),
                (ChildKind::Ingress, "sdxl"),
            ]
        );
        for child in &children {
            let labels = &child.manifest["metadata"]["labels"];
            assert_eq!(labels["app.kubernetes.io/managed-by"], "sdfleet");
            assert_eq!(labels["sdfleet.io/owner-namespace"], "studio");
            assert_eq!(labels["sdfleet.io/owner-name"], "sdxl");
            let owned = child.manifest["metadata"].get("ownerReferences").is_some();
            assert_eq!(owned, child.kind.namespaced(), "{:?}", child.kind);
            assert_eq!(
                child.manifest["metadata"].get("namespace").is_some(),
                child.kind.namespaced()
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
                ChildKind::Deployment
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
        cud.spec.node_class.role = Some(String::new());
        cud.spec.node_class.instance_profile = Some("NodeProfile".into());
        cud.spec.node_class.subnet_selector_tags =
            [("tier".to_string(), "private".to_string())].into();
        let spec = &render(&cud, Cloud::Aws)[0].manifest["spec"];
        assert_eq!(spec["instanceProfile"], "NodeProfile");
        assert!(spec.get("role").is_none());
        assert_eq!(
            spec["subnetSelectorTerms"][0]["tags"],
            json!({"tier": "private"})
        );
    }

    #[test]
    fn missing_controller_defaults_name_the_field_to_set() {
        let cud = example(SDXL);
        let bare = ClusterSettings {
            agent: Default::default(),
            cluster_name: None,
            region: None,
        };
        let ctx = RenderContext {
            cluster: &bare,
            node_class: Cloud::Aws.provider(),
        };
        let err = build(&cud, &ctx).unwrap_err().to_string();
        assert!(err.contains("spec.nodeClass.subnetSelectorTags"), "{err}");
        let kwok = RenderContext {
            cluster: &bare,
            node_class: Cloud::Kwok.provider(),
        };
        let err = build(&cud, &kwok).unwrap_err().to_string();
        assert!(err.contains("spec.storage.outputs.region"), "{err}");
    }
}
