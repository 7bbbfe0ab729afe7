//! What a fleet needs installed in the cluster before its children can work: the
//! Karpenter CRDs, the mountpoint-s3 CSIDriver, the IngressClass. Missing pieces become
//! `Ready=False, reason MissingDependency` with a message that names what to install.

use kube::core::ApiResource;
use kube::runtime::reflector::{ObjectRef, Store};

use super::runtime::cache::Caches;
use crate::crd::ComfyUIDeployment;
use crate::render::storage::CSI_DRIVER;

fn exists<K>(store: &Store<kube::core::PartialObjectMeta<K>>, name: &str) -> bool
where
    K: kube::Resource<DynamicType = ()> + Clone,
{
    store.get(&ObjectRef::new(name)).is_some()
}

/// Names what is missing, each with what to install. Empty when all is there. Read from
/// the watch caches of the CRDs, CSIDrivers and IngressClasses.
pub fn missing(
    caches: &Caches,
    cud: &ComfyUIDeployment,
    node_class: &ApiResource,
    nodepool: &ApiResource,
) -> Vec<String> {
    let mut missing = Vec::new();
    for (api, hint) in [
        (
            nodepool,
            "install Karpenter v1 (its chart installs the NodePool CRD)",
        ),
        (
            node_class,
            "install Karpenter's cloud provider CRDs (EC2NodeClass with --cloud aws)",
        ),
    ] {
        let name = format!("{}.{}", api.plural, api.group);
        if !caches.crd_installed(&name) {
            missing.push(format!("CRD {name} is not installed: {hint}"));
        }
    }
    let spec = &cud.spec;
    if (spec.storage.outputs.is_some() || spec.storage.inputs.is_some())
        && !exists(&caches.csi_drivers, CSI_DRIVER)
    {
        missing.push(format!(
            "CSIDriver {CSI_DRIVER} is not installed: install the Mountpoint for Amazon S3 CSI driver v2 (EKS add-on aws-mountpoint-s3-csi-driver)"
        ));
    }
    let mut ingresses = vec![("ingress", &spec.ingress)];
    if let Some(gateway) = &spec.gateway {
        ingresses.push(("gateway.ingress", &gateway.ingress));
    }
    let mut checked = Vec::new();
    for (field, ingress) in ingresses {
        if !ingress.enabled || checked.contains(&&ingress.class_name) {
            continue;
        }
        checked.push(&ingress.class_name);
        if !exists(&caches.ingress_classes, &ingress.class_name) {
            missing.push(format!(
                "IngressClass {} does not exist: install the AWS Load Balancer Controller (it provides class alb), or set {field}.enabled: false",
                ingress.class_name
            ));
        }
    }
    missing
}
