//! The Argo CD health checks (examples/argocd/health/*.lua) run in gopher-lua, the Lua
//! 5.1 interpreter Argo CD itself embeds, against sample objects. No cluster needed.

mod support;

use serde_json::{Value, json};
use support::repo_root;

/// A JSON value as a Lua table literal (how Argo CD hands `obj` to the script).
fn lua(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => format!("{{{}}}", a.iter().map(lua).collect::<Vec<_>>().join(", ")),
        Value::Object(m) => {
            format!(
                "{{{}}}",
                m.iter()
                    .map(|(k, v)| format!("[{k:?}] = {}", lua(v)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    }
}

/// Runs a health script on `obj`; returns (status, message).
fn health(script: &str, obj: &Value) -> (String, String) {
    let body =
        std::fs::read_to_string(repo_root().join("examples/argocd/health").join(script)).unwrap();
    let program = format!(
        "obj = {}\nlocal hs = (function()\n{body}\nend)()\nprint(hs.status .. \"|\" .. (hs.message or \"\"))\n",
        lua(obj)
    );
    let dir = std::env::temp_dir().join(format!("sdfleet-lua-{}", support::unique_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("check.lua");
    std::fs::write(&file, program).unwrap();
    let out = std::process::Command::new(support::tool("glua"))
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "lua failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, message) = text.trim().split_once('|').unwrap();
    (status.to_string(), message.to_string())
}

fn cond(t: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({"type": t, "status": status, "reason": reason, "message": message, "lastTransitionTime": "2026-01-01T00:00:00Z"})
}

fn cud(generation: i64, observed: Option<i64>, conditions: Vec<Value>) -> Value {
    let mut o = json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
        "metadata": {"name": "sdxl", "generation": generation}});
    if let Some(g) = observed {
        o["status"] = json!({"observedGeneration": g, "conditions": conditions});
    }
    o
}

#[test]
fn comfyui_deployment_health() {
    let s = "comfyuideployment.lua";
    assert_eq!(health(s, &cud(1, None, vec![])).0, "Progressing");
    let healthy = cud(
        2,
        Some(2),
        vec![
            cond("Ready", "True", "AllReplicasReady", "2/2 replicas ready"),
            cond("Degraded", "False", "AsExpected", "all children applied"),
        ],
    );
    assert_eq!(
        health(s, &healthy),
        ("Healthy".into(), "2/2 replicas ready".into())
    );
    // A new spec not yet observed is Progressing even if the old one was Ready.
    let stale = cud(
        3,
        Some(2),
        vec![cond("Ready", "True", "AllReplicasReady", "2/2")],
    );
    assert_eq!(health(s, &stale).0, "Progressing");
    let waiting = cud(
        2,
        Some(2),
        vec![
            cond("Ready", "False", "WaitingForPods", "0/2 replicas ready"),
            cond("Degraded", "False", "AsExpected", ""),
        ],
    );
    assert_eq!(
        health(s, &waiting),
        (
            "Progressing".into(),
            "WaitingForPods: 0/2 replicas ready".into()
        )
    );
    let degraded = cud(
        2,
        Some(2),
        vec![
            cond(
                "Ready",
                "False",
                "MissingDependency",
                "IngressClass alb does not exist",
            ),
            cond(
                "Degraded",
                "True",
                "MissingDependency",
                "IngressClass alb does not exist",
            ),
        ],
    );
    let (status, message) = health(s, &degraded);
    assert_eq!(status, "Degraded");
    assert!(message.contains("MissingDependency"), "{message}");
}

#[test]
fn model_set_health() {
    let s = "modelset.lua";
    let ms = |conds: Vec<Value>| json!({"kind": "ModelSet", "metadata": {"generation": 1}, "status": {"observedGeneration": 1, "conditions": conds}});
    assert_eq!(
        health(
            s,
            &ms(vec![
                cond("Ready", "True", "Listed", "42 models"),
                cond("Synced", "True", "AllNodesSynced", "3/3 nodes")
            ])
        )
        .0,
        "Healthy"
    );
    assert_eq!(
        health(
            s,
            &ms(vec![
                cond("Ready", "True", "Listed", "42 models"),
                cond("Synced", "False", "Syncing", "1/3 nodes")
            ])
        )
        .0,
        "Progressing"
    );
    assert_eq!(
        health(
            s,
            &ms(vec![cond(
                "Ready",
                "False",
                "AccessDenied",
                "s3:ListBucket denied"
            )])
        )
        .0,
        "Degraded"
    );
    assert_eq!(
        health(
            s,
            &ms(vec![
                cond("Ready", "True", "Listed", ""),
                cond("Synced", "False", "SyncFailed", "node a: disk full")
            ])
        )
        .0,
        "Degraded"
    );
}

/// A fleet with a gateway, its status computed by the controller's own `observe`: Argo
/// CD shows it Progressing until the gateway's pod is ready, then Healthy.
#[test]
fn comfyui_deployment_health_covers_its_gateway() {
    use k8s_openapi::api::apps::v1::DeploymentStatus;
    use sdfleet::controller::fleet::status::{Facts, GatewayFacts, observe};
    use sdfleet::crd::ComfyUIDeployment;
    use sdfleet::names::FleetNames;

    let fleet: ComfyUIDeployment = serde_json::from_value(json!({
        "apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
        "metadata": {"name": "sdxl", "namespace": "studio", "generation": 1},
        "spec": {"image": "comfyui:1", "replicas": 1, "gateway": {"apiKeysSecret": "keys"}},
    }))
    .unwrap();
    let pods_ready = DeploymentStatus {
        replicas: Some(1),
        ready_replicas: Some(1),
        updated_replicas: Some(1),
        ..Default::default()
    };
    let status_with = |gateway_ready: i32| {
        let facts = Facts {
            deployment: Some(pods_ready.clone()),
            gateway: Some(GatewayFacts {
                deployment: Some(DeploymentStatus {
                    ready_replicas: Some(gateway_ready),
                    ..Default::default()
                }),
                ingress: None,
            }),
            ..Default::default()
        };
        let observed = observe(&fleet, &FleetNames::new("studio", "sdxl"), &facts);
        let conditions: Vec<Value> = observed
            .conditions
            .iter()
            .map(|c| {
                let status = if c.status { "True" } else { "False" };
                cond(c.type_, status, c.reason.as_str(), &c.message)
            })
            .collect();
        cud(1, Some(1), conditions)
    };
    let (status, message) = health("comfyuideployment.lua", &status_with(0));
    assert_eq!(status, "Progressing");
    assert!(message.starts_with("GatewayNotReady"), "{message}");
    assert_eq!(
        health("comfyuideployment.lua", &status_with(1)).0,
        "Healthy"
    );
}
