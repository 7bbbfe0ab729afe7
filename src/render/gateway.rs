//! The fleet's job gateway (`sdfleet gateway`, this same binary): its ServiceAccount, a
//! RoleBinding to the chart's gateway ClusterRole (read the fleet's EndpointSlices and
//! ModelSets), the store's claim, the Deployment (one replica on the embedded store;
//! several, rolled one at a time, with a PodDisruptionBudget, on PostgreSQL), its
//! Service and Ingress.

use serde_json::{Value, json};

use super::settings::GatewaySettings;
use crate::crd::comfyui::ComfyUIDeploymentSpec;
use crate::crd::gateway::GatewaySpec;
use crate::names::FleetNames;

pub const CONTAINER_NAME: &str = "gateway";
pub const API_PORT: i32 = 8080;
pub const METRICS_PORT: i32 = 9090;
/// Where the store claim is mounted, and the store file in it.
pub const STORE_DIR: &str = "/var/lib/sdfleet-gateway";
pub const API_KEYS_DIR: &str = "/etc/sdfleet-gateway/api-keys";
pub const WEBHOOK_SECRET_DIR: &str = "/etc/sdfleet-gateway/webhook";
pub const WORKFLOWS_DIR: &str = "/etc/sdfleet-gateway/workflows";
/// Seconds a stopping gateway pod keeps serving, while the Service drops its endpoint.
pub const SHUTDOWN_DELAY_SECONDS: u64 = 3;
/// The PostgreSQL Secret's URL (and CA bundle) as files.
pub const POSTGRES_DIR: &str = "/etc/sdfleet-gateway/postgres";

/// The ServiceAccount's only content: its annotations (an IRSA role, if any).
pub fn service_account_annotations(gateway: &GatewaySpec) -> Value {
    json!(gateway.service_account_annotations)
}

/// `roleRef` and `subjects` of the RoleBinding (a RoleBinding has no `spec`).
pub fn role_binding(fleet: &FleetNames, settings: &GatewaySettings) -> (Value, Value) {
    (
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": settings.cluster_role}),
        json!([{"kind": "ServiceAccount", "name": fleet.gateway(), "namespace": fleet.namespace}]),
    )
}

pub fn claim_spec(gateway: &GatewaySpec) -> Value {
    let mut spec = json!({
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": gateway.store.size}},
    });
    if let Some(class) = &gateway.store.storage_class_name {
        spec["storageClassName"] = json!(class);
    }
    spec
}

/// The gateway's command-line flags, from the fleet's spec.
pub fn args(
    fleet: &FleetNames,
    spec: &ComfyUIDeploymentSpec,
    gateway: &GatewaySpec,
) -> Vec<String> {
    let fleet_arg = match &spec.model_set {
        Some(model_set) => format!("{}:{model_set}", fleet.name),
        None => fleet.name.clone(),
    };
    let mut args: Vec<String> = [
        "gateway",
        "--fleet",
        &fleet_arg,
        "--listen",
        &format!("0.0.0.0:{API_PORT}"),
        "--metrics-listen",
        &format!("0.0.0.0:{METRICS_PORT}"),
        "--queue-cap",
        &gateway.queue_cap.to_string(),
        "--job-ttl-seconds",
        &gateway.job_ttl_seconds.to_string(),
        "--max-wait-seconds",
        &gateway.max_wait_seconds.to_string(),
        "--placement",
        gateway.placement.as_arg(),
        "--shutdown-delay-seconds",
        &SHUTDOWN_DELAY_SECONDS.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    match &gateway.store.postgres {
        Some(pg) => {
            args.extend(["--postgres-url-file".into(), format!("{POSTGRES_DIR}/url")]);
            if pg.ca_key.is_some() {
                args.extend([
                    "--postgres-ca-file".into(),
                    format!("{POSTGRES_DIR}/ca.pem"),
                ]);
            }
        }
        None => args.extend(["--store".into(), format!("{STORE_DIR}/jobs.redb")]),
    }
    if gateway.api_keys_secret.is_some() {
        args.extend(["--api-keys-dir".into(), API_KEYS_DIR.into()]);
    } else {
        args.push("--no-auth".into());
    }
    if gateway.webhook_secret.is_some() {
        args.extend([
            "--webhook-secret-file".into(),
            format!("{WEBHOOK_SECRET_DIR}/secret"),
        ]);
        // Only with webhooks on: a class change then rolls no gateway that has none.
        for cidr in &gateway.class_webhook_allowed_cidrs {
            args.extend(["--webhook-allow-cidr".into(), cidr.clone()]);
        }
    }
    if gateway.workflows_config_map.is_some() {
        args.extend(["--workflows-dir".into(), WORKFLOWS_DIR.into()]);
    }
    if let Some(outputs) = &spec.storage.outputs {
        args.extend(["--outputs-bucket".into(), outputs.bucket.clone()]);
        if !outputs.prefix.is_empty() {
            args.extend(["--outputs-prefix".into(), outputs.prefix.clone()]);
        }
        if let Some(region) = &outputs.region {
            args.extend(["--outputs-region".into(), region.clone()]);
        }
    }
    for bucket in &gateway.input_buckets {
        args.extend(["--input-bucket".into(), bucket.clone()]);
    }
    if let Some(limit) = gateway.max_run_seconds {
        args.extend(["--max-run-seconds".into(), limit.to_string()]);
    }
    args.extend([
        "--retention-hours".into(),
        gateway.store.retention_hours.to_string(),
        "--retention-max-jobs".into(),
        gateway.store.max_jobs.to_string(),
    ]);
    if let Some(autoscaling) = &spec.autoscaling {
        args.extend([
            "--publish-demand".into(),
            "--max-cold-start-wait-seconds".into(),
            autoscaling.max_cold_start_wait_seconds.to_string(),
        ]);
    }
    args
}

pub fn deployment_spec(
    fleet: &FleetNames,
    spec: &ComfyUIDeploymentSpec,
    gateway: &GatewaySpec,
    settings: &GatewaySettings,
) -> Value {
    let mut mounts = Vec::new();
    let mut volumes = Vec::new();
    if gateway.store.postgres.is_none() {
        mounts.push(json!({"name": "store", "mountPath": STORE_DIR}));
        volumes.push(
            json!({"name": "store", "persistentVolumeClaim": {"claimName": fleet.gateway_store()}}),
        );
    }
    let mut mount = |name: &str, path: &str, kind: &str, source: Value| {
        mounts.push(json!({"name": name, "mountPath": path, "readOnly": true}));
        let mut volume = serde_json::Map::new();
        volume.insert("name".into(), json!(name));
        volume.insert(kind.into(), source);
        volumes.push(Value::Object(volume));
    };
    if let Some(pg) = &gateway.store.postgres {
        let mut items = vec![json!({"key": pg.url_key, "path": "url"})];
        if let Some(ca) = &pg.ca_key {
            items.push(json!({"key": ca, "path": "ca.pem"}));
        }
        mount(
            "postgres",
            POSTGRES_DIR,
            "secret",
            json!({"secretName": pg.secret_name, "items": items}),
        );
    }
    if let Some(keys) = &gateway.api_keys_secret {
        mount(
            "api-keys",
            API_KEYS_DIR,
            "secret",
            json!({"secretName": keys}),
        );
    }
    if let Some(webhook) = &gateway.webhook_secret {
        mount(
            "webhook",
            WEBHOOK_SECRET_DIR,
            "secret",
            json!({"secretName": webhook, "items": [{"key": "secret", "path": "secret"}]}),
        );
    }
    if let Some(workflows) = &gateway.workflows_config_map {
        mount(
            "workflows",
            WORKFLOWS_DIR,
            "configMap",
            json!({"name": workflows}),
        );
    }
    let resources = match &gateway.resources {
        Some(r) => json!({"requests": r.requests, "limits": r.limits}),
        None => json!({"requests": {"cpu": "100m", "memory": "256Mi"}}),
    };
    let probe = |path: &str, period: i32| json!({"httpGet": {"path": path, "port": "http"}, "periodSeconds": period});
    let shared = gateway.store.postgres.is_some();
    let (replicas, strategy) = if shared {
        // A new replica is ready (it reaches the store) before an old one goes, and the
        // lease holder hands over on SIGTERM: the API answers throughout a rollout.
        (
            gateway.replicas.max(1),
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}),
        )
    } else {
        // One writer of the store file: the old pod lets go of the claim first.
        (1, json!({"type": "Recreate"}))
    };
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let mut env = vec![field("POD_NAMESPACE", "metadata.namespace")];
    if shared {
        // The lease names its holder and where the other replicas send requests.
        env.push(field("POD_NAME", "metadata.name"));
        env.push(field("POD_IP", "status.podIP"));
        env.push(json!({"name": "SDFLEET_GATEWAY_ADVERTISE", "value": format!("http://$(POD_IP):{API_PORT}")}));
    }
    let mut deployment = json!({
        "replicas": replicas,
        "strategy": strategy,
        "selector": {"matchLabels": fleet.gateway_pod_selector()},
        "template": {
            "metadata": {"labels": fleet.gateway_pod_selector()},
            "spec": {
                "serviceAccountName": fleet.gateway(),
                "securityContext": {
                    "runAsNonRoot": true,
                    "runAsUser": 65532,
                    "runAsGroup": 65532,
                    "fsGroup": 65532,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                // Jobs on pods keep running: give in-flight requests time to finish.
                "terminationGracePeriodSeconds": 30,
                "containers": [{
                    "name": CONTAINER_NAME,
                    "image": settings.image,
                    "args": args(fleet, spec, gateway),
                    "env": env,
                    "ports": [
                        {"name": "http", "containerPort": API_PORT, "protocol": "TCP"},
                        {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                    ],
                    "readinessProbe": probe("/readyz", 5),
                    "livenessProbe": probe("/healthz", 10),
                    "resources": resources,
                    "volumeMounts": mounts,
                    "securityContext": {
                        "allowPrivilegeEscalation": false,
                        "readOnlyRootFilesystem": true,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }],
                "volumes": volumes,
            },
        },
    });
    // Where the gateway runs is the user's choice (a CPU pool, a system taint); unset,
    // the fields stay out of the manifest, so a later setting is a plain addition.
    let pod = &mut deployment["template"]["spec"];
    if !gateway.node_selector.is_empty() {
        pod["nodeSelector"] = json!(gateway.node_selector);
    }
    if !gateway.tolerations.is_empty() {
        pod["tolerations"] = json!(gateway.tolerations);
    }
    if replicas > 1 {
        // Replicas on different nodes where there are several: one node's loss costs
        // one replica, not the API.
        pod["topologySpreadConstraints"] = json!([{
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": fleet.gateway_pod_selector()},
        }]);
    }
    deployment
}

/// With several replicas: a voluntary disruption (a node drain, a consolidation) takes
/// at most one at a time. None with one replica (a budget of one would block drains).
pub fn disruption_budget_spec(fleet: &FleetNames, gateway: &GatewaySpec) -> Option<Value> {
    (gateway.store.postgres.is_some() && gateway.replicas > 1).then(|| {
        json!({
            "maxUnavailable": 1,
            "selector": {"matchLabels": fleet.gateway_pod_selector()},
        })
    })
}

pub fn service_spec(fleet: &FleetNames) -> Value {
    json!({
        "type": "ClusterIP",
        "selector": fleet.gateway_pod_selector(),
        "ports": [
            {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
            {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
        ],
    })
}

/// The in-cluster URL of the job API.
pub fn url(fleet: &FleetNames) -> String {
    format!("http://{}.{}.svc", fleet.gateway(), fleet.namespace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::nodeclass::Cloud;
    use crate::render::tests::{SDXL, example, render};
    use crate::render::{Child, ChildKind};

    fn with_gateway(extra: &str) -> Vec<Child> {
        let yaml = format!("{SDXL}  gateway: {{apiKeysSecret: sdxl-keys{extra}}}\n");
        render(&example(&yaml), Cloud::Kwok)
    }

    #[test]
    fn an_autoscaled_fleets_gateway_publishes_demand_and_caps_cold_sync_waits() {
        let yaml = format!(
            "{SDXL}  gateway: {{allowUnauthenticated: true}}\n  autoscaling: {{minReplicas: 0, maxReplicas: 4, maxColdStartWaitSeconds: 20}}\n"
        );
        let children = render(&example(&yaml), Cloud::Kwok);
        let d = gateway_child(&children, ChildKind::Deployment);
        let args = d["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
        assert!(
            args.contains(r#""--publish-demand","--max-cold-start-wait-seconds","20""#),
            "{args}"
        );
    }

    #[test]
    fn a_gateway_on_postgres_runs_several_replicas_rolled_one_at_a_time_with_a_budget() {
        let children = with_gateway(
            ", replicas: 3, store: {postgres: {secretName: jobs-db, caKey: rds-ca.pem}}",
        );
        assert!(
            !children
                .iter()
                .any(|c| c.kind == ChildKind::PersistentVolumeClaim && c.name.contains("gateway")),
            "no store volume with a shared store"
        );
        let d = &gateway_child(&children, ChildKind::Deployment)["spec"];
        assert_eq!(d["replicas"], 3);
        assert_eq!(d["strategy"]["type"], "RollingUpdate");
        assert_eq!(d["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
        let pod = &d["template"]["spec"];
        let container = &pod["containers"][0];
        let args: Vec<&str> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(!args.contains(&"--store"), "{args:?}");
        let after = |flag: &str| args[args.iter().position(|a| *a == flag).unwrap() + 1];
        assert_eq!(
            after("--postgres-url-file"),
            "/etc/sdfleet-gateway/postgres/url"
        );
        assert_eq!(
            after("--postgres-ca-file"),
            "/etc/sdfleet-gateway/postgres/ca.pem"
        );
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "postgres")
            .unwrap();
        assert_eq!(volume["secret"]["secretName"], "jobs-db");
        assert_eq!(
            volume["secret"]["items"],
            json!([{"key": "url", "path": "url"}, {"key": "rds-ca.pem", "path": "ca.pem"}])
        );
        let env = container["env"].to_string();
        assert!(env.contains("http://$(POD_IP):8080"), "{env}");
        assert!(
            env.contains("status.podIP") && env.contains("metadata.name"),
            "{env}"
        );
        assert_eq!(
            pod["topologySpreadConstraints"][0]["topologyKey"],
            "kubernetes.io/hostname"
        );
        let budget = gateway_child(&children, ChildKind::PodDisruptionBudget);
        assert_eq!(budget["spec"]["maxUnavailable"], 1);
        assert_eq!(
            budget["spec"]["selector"]["matchLabels"],
            d["selector"]["matchLabels"]
        );
        // One replica on PostgreSQL: rolled the same way, but no budget (it would block
        // every drain).
        let one = with_gateway(", store: {postgres: {secretName: jobs-db}}");
        assert!(!one.iter().any(|c| c.kind == ChildKind::PodDisruptionBudget));
        let d = &gateway_child(&one, ChildKind::Deployment)["spec"];
        assert_eq!(
            (d["replicas"].as_i64(), d["strategy"]["type"].as_str()),
            (Some(1), Some("RollingUpdate"))
        );
    }

    fn gateway_child(children: &[Child], kind: ChildKind) -> &Value {
        &children
            .iter()
            .find(|c| c.kind == kind && c.name.starts_with("sdxl-gateway"))
            .unwrap_or_else(|| panic!("no gateway {kind:?}"))
            .manifest
    }

    #[test]
    fn a_gateway_adds_its_children_beside_the_fleets() {
        let children = with_gateway("");
        let names: Vec<_> = children.iter().map(|c| (c.kind, c.name.as_str())).collect();
        for wanted in [
            (ChildKind::ServiceAccount, "sdxl-gateway"),
            (ChildKind::RoleBinding, "sdxl-gateway"),
            (ChildKind::PersistentVolumeClaim, "sdxl-gateway-store"),
            (ChildKind::Service, "sdxl-gateway"),
            (ChildKind::Deployment, "sdxl-gateway"),
            (ChildKind::Ingress, "sdxl-gateway"),
        ] {
            assert!(names.contains(&wanted), "{wanted:?} in {names:?}");
        }
        // The fleet's own children are unchanged, but for the NetworkPolicy: with a
        // gateway, ComfyUI takes in-cluster traffic from it alone.
        let without = render(&example(SDXL), Cloud::Kwok);
        for child in without
            .iter()
            .filter(|c| c.kind != ChildKind::NetworkPolicy)
        {
            assert!(children.contains(child), "{} changed", child.name);
        }
        let rb = gateway_child(&children, ChildKind::RoleBinding);
        assert_eq!(rb["roleRef"]["name"], "sdfleet-gateway");
        assert_eq!(rb["subjects"][0]["name"], "sdxl-gateway");
        assert_eq!(rb["subjects"][0]["namespace"], "studio");
        assert!(rb.get("spec").is_none());
    }

    #[test]
    fn the_gateway_pods_are_not_the_fleets_and_run_locked_down() {
        let children = with_gateway("");
        let d = gateway_child(&children, ChildKind::Deployment);
        let fleet_service = children
            .iter()
            .find(|c| c.kind == ChildKind::Service && c.name == "sdxl")
            .unwrap();
        let pod_labels = &d["spec"]["template"]["metadata"]["labels"];
        let fleet_selector = fleet_service.manifest["spec"]["selector"]
            .as_object()
            .unwrap();
        assert!(
            fleet_selector.iter().any(|(k, v)| &pod_labels[k] != v),
            "the fleet's Service would select the gateway"
        );
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"]["type"], "Recreate");
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        let c = &pod["containers"][0];
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
        assert!(
            pod["tolerations"].is_null(),
            "no GPU toleration: a CPU node runs it"
        );
    }

    #[test]
    fn the_gateway_goes_where_its_node_selector_and_tolerations_say() {
        let children = with_gateway(
            ", nodeSelector: {pool: system}, tolerations: [{key: dedicated, operator: Exists, effect: NoSchedule}]",
        );
        let pod = &gateway_child(&children, ChildKind::Deployment)["spec"]["template"]["spec"];
        assert_eq!(pod["nodeSelector"], json!({"pool": "system"}));
        assert_eq!(
            pod["tolerations"],
            json!([{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}])
        );
    }

    #[test]
    fn args_carry_the_fleet_outputs_keys_and_limits() {
        let children = with_gateway(
            ", queueCap: 7, webhookSecret: hooks, inputBuckets: [in-a], maxRunSeconds: 600",
        );
        let d = gateway_child(&children, ChildKind::Deployment);
        let args: Vec<&str> = d["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let flag = |name: &str| {
            let i = args
                .iter()
                .position(|a| *a == name)
                .unwrap_or_else(|| panic!("{name} in {args:?}"));
            args[i + 1]
        };
        assert_eq!(args[0], "gateway");
        assert_eq!(flag("--fleet"), "sdxl");
        assert_eq!(flag("--queue-cap"), "7");
        assert_eq!(flag("--outputs-bucket"), "comfyui-outputs-demo");
        assert_eq!(flag("--outputs-prefix"), "sdxl/");
        assert_eq!(flag("--api-keys-dir"), API_KEYS_DIR);
        assert_eq!(
            flag("--webhook-secret-file"),
            "/etc/sdfleet-gateway/webhook/secret"
        );
        assert_eq!(flag("--input-bucket"), "in-a");
        assert_eq!(flag("--max-run-seconds"), "600");
        assert_eq!(flag("--retention-hours"), "168");
        assert_eq!(flag("--retention-max-jobs"), "100000");
        assert!(!args.contains(&"--no-auth"));
        assert!(
            !args.contains(&"--publish-demand"),
            "no autoscaling, no demand writes"
        );
        let volumes = &d["spec"]["template"]["spec"]["volumes"];
        assert_eq!(
            volumes[0]["persistentVolumeClaim"]["claimName"],
            "sdxl-gateway-store"
        );
        assert_eq!(volumes[1]["secret"]["secretName"], "sdxl-keys");
        assert_eq!(volumes[2]["secret"]["secretName"], "hooks");
    }

    fn container_args(children: &[Child]) -> Vec<String> {
        let d = gateway_child(children, ChildKind::Deployment);
        serde_json::from_value(d["spec"]["template"]["spec"]["containers"][0]["args"].clone())
            .unwrap()
    }

    fn allowed_cidrs(args: &[String]) -> Vec<&str> {
        args.windows(2)
            .filter(|w| w[0] == "--webhook-allow-cidr")
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn the_class_webhook_ranges_become_gateway_flags_and_a_fleet_cannot_add_its_own() {
        let class: crate::crd::fleetclass::FleetClassSpec = serde_json::from_value(json!({
            "nodeClass": {"role": "KarpenterNodeRole-demo"},
            "gateway": {"webhookAllowedCIDRs": ["10.20.0.0/16", "fd00:1::/64"]},
        }))
        .unwrap();
        let yaml = format!("{SDXL}  gateway: {{apiKeysSecret: sdxl-keys, webhookSecret: hooks}}\n");
        let mut cud = example(&yaml);
        crate::policy::apply_class(&mut cud.spec, &class, "studio", "sdxl");
        let args = container_args(&render(&cud, Cloud::Kwok));
        assert_eq!(allowed_cidrs(&args), ["10.20.0.0/16", "fd00:1::/64"]);

        // Under a class that allows nothing, the default refusals stand...
        let mut cud = example(&yaml);
        let strict: crate::crd::fleetclass::FleetClassSpec =
            serde_json::from_value(json!({"nodeClass": {"role": "KarpenterNodeRole-demo"}}))
                .unwrap();
        crate::policy::apply_class(&mut cud.spec, &strict, "studio", "sdxl");
        assert!(allowed_cidrs(&container_args(&render(&cud, Cloud::Kwok))).is_empty());
        // ...and the field is not the fleet's to set.
        let sneaky = format!(
            "{SDXL}  gateway: {{apiKeysSecret: sdxl-keys, webhookSecret: hooks, classWebhookAllowedCidrs: [0.0.0.0/0], webhookAllowedCIDRs: [0.0.0.0/0]}}\n"
        );
        let mut cud = example(&sneaky);
        crate::policy::apply_class(&mut cud.spec, &strict, "studio", "sdxl");
        assert!(allowed_cidrs(&container_args(&render(&cud, Cloud::Kwok))).is_empty());
    }

    #[test]
    fn the_gateway_ingress_points_at_its_service_and_checks_its_health() {
        let children = with_gateway("");
        let ing = gateway_child(&children, ChildKind::Ingress);
        let backend = &ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"];
        assert_eq!(backend["name"], "sdxl-gateway");
        assert_eq!(backend["port"]["number"], 80);
        let a = &ing["metadata"]["annotations"];
        assert_eq!(a["alb.ingress.kubernetes.io/healthcheck-path"], "/healthz");
        assert!(
            a.get("alb.ingress.kubernetes.io/target-group-attributes")
                .is_none()
        );
    }
}
