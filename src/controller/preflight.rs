//! What a fleet needs installed in the cluster before its children can work: the
//! Karpenter CRDs, the mountpoint-s3 CSIDriver, the IngressClass. Missing pieces become
//! `Ready=False, reason MissingDependency` with a message that names what to install.

use k8s_openapi::api::networking::v1::IngressClass;
use k8s_openapi::api::storage::v1::CSIDriver;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::ApiResource;
use kube::{Api, Client};

use crate::crd::ComfyUIDeployment;
use crate::render::storage::CSI_DRIVER;

/// Names what is missing, each with what to install. Empty when all is there.
pub async fn missing(
    client: &Client,
    cud: &ComfyUIDeployment,
    node_class: &ApiResource,
    nodepool: &ApiResource,
) -> Result<Vec<String>, kube::Error> {
    let mut missing = Vec::new();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
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
        if crds.get_opt(&name).await?.is_none() {
            missing.push(format!("CRD {name} is not installed: {hint}"));
        }
    }
    let spec = &cud.spec;
    if spec.storage.outputs.is_some() || spec.storage.inputs.is_some() {
        let drivers: Api<CSIDriver> = Api::all(client.clone());
        if drivers.get_opt(CSI_DRIVER).await?.is_none() {
            missing.push(format!(
                "CSIDriver {CSI_DRIVER} is not installed: install the Mountpoint for Amazon S3 CSI driver v2 (EKS add-on aws-mountpoint-s3-csi-driver)"
            ));
        }
    }
    let mut ingresses = vec![("ingress", &spec.ingress)];
    if let Some(gateway) = &spec.gateway {
        ingresses.push(("gateway.ingress", &gateway.ingress));
    }
    let classes: Api<IngressClass> = Api::all(client.clone());
    let mut checked = Vec::new();
    for (field, ingress) in ingresses {
        if !ingress.enabled || checked.contains(&&ingress.class_name) {
            continue;
        }
        checked.push(&ingress.class_name);
        if classes.get_opt(&ingress.class_name).await?.is_none() {
            missing.push(format!(
                "IngressClass {} does not exist: install the AWS Load Balancer Controller (it provides class alb), or set {field}.enabled: false",
                ingress.class_name
            ));
        }
    }
    Ok(missing)
}
