//! The node agent DaemonSet of a fleet that uses a ModelSet: one agent per node of the
//! fleet's NodePool, writing the models onto the node's instance store and lifting the
//! node's startup taint once they are there.

use serde_json::{Value, json};

use super::settings::AgentSettings;
use crate::names::{
    FleetNames, GPU_RESOURCE, MODELS_HOST_ROOT, MODELS_NOT_READY_TAINT, NODEPOOL_LABEL,
};

pub const AGENT_MODELS_PATH: &str = "/models";
/// The image's unprivileged user and group (the Dockerfile's `USER`).
pub const AGENT_UID: u32 = 65532;
pub const AGENT_GID: u32 = 65532;

/// The agent DaemonSet's spec. `model_set` is the fleet's ModelSet: the one directory
/// (`<root>/<namespace>/<model_set>`) the init container hands to the agent's user.
pub fn daemonset_spec(fleet: &FleetNames, agent: &AgentSettings, model_set: &str) -> Value {
    let selector = fleet.agent_pod_selector();
    let mut labels = fleet.owner_labels();
    labels.extend(selector.clone());
    json!({
        "selector": {"matchLabels": selector},
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "100%"}},
        "template": {
            "metadata": {"labels": labels},
            "spec": {
                "serviceAccountName": agent.service_account,
                "nodeSelector": {NODEPOOL_LABEL: fleet.nodepool()},
                // It must run exactly where ComfyUI cannot yet.
                "tolerations": [
                    {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
                    {"key": MODELS_NOT_READY_TAINT, "operator": "Exists", "effect": "NoSchedule"},
                    super::nodepool::tenant_toleration(&fleet.namespace),
                ],
                "priorityClassName": "system-node-critical",
                // kubelet makes the hostPath root root:root 0755. Root with CAP_CHOWN
                // alone creates the fleet's models directory and gives it to the agent's
                // user; the agent itself keeps no capability and can write nowhere else.
                "initContainers": [{
                    "name": "prepare-models-dir",
                    "image": agent.image,
                    "args": [
                        "prepare-models-dir",
                        format!("--root={AGENT_MODELS_PATH}"),
                        format!("--namespace={}", fleet.namespace),
                        format!("--model-set={model_set}"),
                        format!("--owner={AGENT_UID}:{AGENT_GID}"),
                    ],
                    "volumeMounts": [{"name": "models", "mountPath": AGENT_MODELS_PATH}],
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
                    "securityContext": {
                        "runAsUser": 0,
                        "runAsGroup": 0,
                        "runAsNonRoot": false,
                        "allowPrivilegeEscalation": false,
                        "readOnlyRootFilesystem": true,
                        "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                }],
                "containers": [{
                    "name": "agent",
                    "image": agent.image,
                    "args": ["agent", "--node-name=$(NODE_NAME)", format!("--models-root={AGENT_MODELS_PATH}")],
                    "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                    "volumeMounts": [{"name": "models", "mountPath": AGENT_MODELS_PATH}],
                    "resources": {"requests": {"cpu": "200m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
                    "securityContext": {
                        "runAsUser": AGENT_UID,
                        "runAsGroup": AGENT_GID,
                        "runAsNonRoot": true,
                        "allowPrivilegeEscalation": false,
                        "readOnlyRootFilesystem": true,
                        "capabilities": {"drop": ["ALL"]},
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                }],
                "volumes": [{"name": "models", "hostPath": {"path": MODELS_HOST_ROOT, "type": "DirectoryOrCreate"}}],
            },
        },
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_ssm_modelset_gets_no_agent_and_no_startup_taint() {
        let mut cud = example(SDXL);
        cud.spec.model_set = Some("sdxl-models".into());
        let cluster = crate::render::tests::cluster();
        let ctx = crate::render::RenderContext {
            cluster: &cluster,
            node_class: Cloud::Kwok.provider(),
            model_sync: crate::crd::modelset::SyncMethod::Ssm,
        };
        let children = crate::render::build(&cud, &ctx).unwrap();
        assert!(!children.iter().any(|c| c.kind == ChildKind::AgentDaemonSet));
        let pool = &children[1].manifest["spec"]["template"];
        assert_eq!(pool["spec"]["startupTaints"], serde_json::json!([]));
        // The nodes still say which ModelSet they are for.
        assert_eq!(
            pool["metadata"]["labels"]["sdfleet.io/modelset"],
            "sdxl-models"
        );
    }

    use crate::render::ChildKind;
    use crate::render::nodeclass::Cloud;
    use crate::render::tests::{SDXL, example, render};

    #[test]
    fn a_fleet_with_a_modelset_gets_an_agent_and_a_startup_taint() {
        let mut cud = example(SDXL);
        assert!(
            !render(&cud, Cloud::Kwok)
                .iter()
                .any(|c| c.kind == ChildKind::AgentDaemonSet)
        );
        assert_eq!(
            render(&cud, Cloud::Kwok)[1].manifest["spec"]["template"]["spec"]["startupTaints"],
            serde_json::json!([])
        );
        cud.spec.model_set = Some("sdxl-models".into());
        let children = render(&cud, Cloud::Kwok);
        let pool = &children[1].manifest["spec"]["template"]["spec"];
        assert_eq!(
            pool["startupTaints"][0]["key"],
            "sdfleet.io/models-not-ready"
        );
        let ds = children
            .iter()
            .find(|c| c.kind == ChildKind::AgentDaemonSet)
            .unwrap();
        assert_eq!(ds.name, "sdfleet-agent-studio.sdxl");
        assert_eq!(ds.manifest["metadata"]["namespace"], "sdfleet-system");
        assert!(ds.manifest["metadata"].get("ownerReferences").is_none());
        let pod = &ds.manifest["spec"]["template"]["spec"];
        assert_eq!(pod["nodeSelector"]["karpenter.sh/nodepool"], "studio.sdxl");
        assert_eq!(pod["tolerations"][1]["key"], "sdfleet.io/models-not-ready");
        assert_eq!(
            pod["volumes"][0]["hostPath"]["path"],
            "/mnt/k8s-disks/0/sdfleet/models"
        );
        // The init container, root with CAP_CHOWN only, prepares exactly the fleet's
        // ModelSet directory for the agent's user; the agent has no capability.
        let init = &pod["initContainers"][0];
        assert_eq!(init["securityContext"]["runAsUser"], 0);
        assert_eq!(
            init["securityContext"]["capabilities"],
            serde_json::json!({"drop": ["ALL"], "add": ["CHOWN"]})
        );
        assert_eq!(
            init["args"],
            serde_json::json!([
                "prepare-models-dir",
                "--root=/models",
                "--namespace=studio",
                "--model-set=sdxl-models",
                "--owner=65532:65532"
            ])
        );
        let agent = &pod["containers"][0]["securityContext"];
        assert_eq!(agent["runAsUser"], 65532);
        assert_eq!(agent["runAsNonRoot"], true);
        assert_eq!(agent["capabilities"], serde_json::json!({"drop": ["ALL"]}));
        // The pods run only on nodes made for this ModelSet: a switch to another one
        // changes the NodePool's node labels (Karpenter replaces the nodes) and the pods'.
        let labels = &children[1].manifest["spec"]["template"]["metadata"]["labels"];
        assert_eq!(labels["sdfleet.io/modelset"], "sdxl-models");
        let deploy_pod = &children
            .iter()
            .find(|c| c.kind == ChildKind::Deployment)
            .unwrap()
            .manifest["spec"]["template"]["spec"];
        assert_eq!(
            deploy_pod["nodeSelector"]["sdfleet.io/modelset"],
            "sdxl-models"
        );
        // ComfyUI pods do not tolerate the startup taint.
        let deploy = children
            .iter()
            .find(|c| c.kind == ChildKind::Deployment)
            .unwrap();
        let tolerations = deploy.manifest["spec"]["template"]["spec"]["tolerations"].to_string();
        assert!(!tolerations.contains("models-not-ready"));
    }
}
