//! The Helm chart is lint-clean under `helm lint --strict`, with its monitoring objects
//! off (the default) and on, and those objects are what Grafana's sidecar and the
//! Prometheus Operator read. No cluster needed.

mod support;

use serde_json::Value;

#[test]
fn helm_lint_strict_is_clean() {
    let chart = support::repo_root().join("charts/sdfleet");
    let monitoring = support::MONITORING_ON.join(",");
    for extra in [vec![], vec!["--set", monitoring.as_str()]] {
        let out = std::process::Command::new(support::tool("helm"))
            .args(["lint", "--strict"])
            .arg(&chart)
            .args(&extra)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{extra:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !text.contains("[WARNING]") && !text.contains("[ERROR]"),
            "{extra:?}: {text}"
        );
    }
}

#[test]
fn monitoring_objects_are_off_by_default() {
    let docs = support::render_chart(&[]);
    for kind in [
        "ConfigMap",
        "PrometheusRule",
        "PodMonitor",
        "ServiceMonitor",
    ] {
        assert!(
            docs.iter().all(|d| d["kind"] != kind),
            "{kind} rendered by default"
        );
    }
}

#[test]
fn the_dashboard_and_the_alerts_render_as_what_grafana_and_prometheus_read() {
    let mut sets = support::MONITORING_ON.to_vec();
    sets.extend([
        "grafanaDashboard.namespace=monitoring",
        "grafanaDashboard.annotations.grafana_folder=sdfleet",
        "prometheusRules.labels.release=kube-prometheus-stack",
    ]);
    let docs = support::render_chart(&sets);

    // The dashboard: in Grafana's namespace, with the sidecar's label, valid JSON.
    let cm = support::one_of_kind(&docs, "ConfigMap");
    assert_eq!(cm["apiVersion"], "v1");
    assert_eq!(cm["metadata"]["namespace"], "monitoring");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["metadata"]["annotations"]["grafana_folder"], "sdfleet");
    let json = cm["data"]["sdfleet.json"]
        .as_str()
        .expect("data sdfleet.json");
    let dashboard: Value = serde_json::from_str(json).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "sdfleet");
    let panels = dashboard["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .filter_map(|p| p["title"].as_str())
        .collect();
    assert_eq!(
        titles,
        [
            "Fleets",
            "GPU nodes",
            "ModelSet sync",
            "Job gateway",
            "Cold starts and scaling"
        ]
    );
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for t in targets {
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.is_empty()),
                "{}",
                panel["title"]
            );
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "{}",
                panel["title"]
            );
        }
    }

    // The rules: every alert with a `for`, a severity, what happened, and the runbook.
    let rules = support::one_of_kind(&docs, "PrometheusRule");
    assert_eq!(rules["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rules["metadata"]["namespace"], "sdfleet-system");
    assert_eq!(
        rules["metadata"]["labels"]["release"],
        "kube-prometheus-stack"
    );
    let mut alerts = Vec::new();
    for group in rules["spec"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().expect("only alerting rules");
            alerts.push(name.to_string());
            assert!(
                rule["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "{name}"
            );
            assert!(
                rule["for"]
                    .as_str()
                    .is_some_and(|f| f.ends_with('m') && f != "0m"),
                "{name}: for"
            );
            assert!(
                ["warning", "critical"]
                    .contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
                "{name}: severity"
            );
            for annotation in ["summary", "description"] {
                assert!(
                    rule["annotations"][annotation]
                        .as_str()
                        .is_some_and(|a| a.len() > 20),
                    "{name}: {annotation}"
                );
            }
            assert_eq!(
                rule["annotations"]["runbook_url"], "README.md#troubleshooting-status-reasons",
                "{name}"
            );
        }
    }
    for wanted in [
        "SdfleetNoCapacity",
        "SdfleetJobsWaitingWithoutPods",
        "SdfleetModelSyncFailed",
        "SdfleetQueueBackingUp",
        "SdfleetGatewayStoreFilling",
    ] {
        assert!(alerts.iter().any(|a| a == wanted), "{wanted} in {alerts:?}");
    }
    // The thresholds are the values'.
    let text = serde_json::to_string(rules).unwrap();
    assert!(text.contains(">= 50") && text.contains("> 300") && text.contains("> 0.8"));

    // The README's anchor the runbook links name exists.
    let readme = std::fs::read_to_string(support::repo_root().join("README.md")).unwrap();
    assert!(readme.contains("\n## Troubleshooting: status reasons\n"));

    // Scraping: the controller keeps its metrics' namespace label; the gateways are found.
    let monitor = support::one_of_kind(&docs, "ServiceMonitor");
    assert_eq!(monitor["spec"]["endpoints"][0]["honorLabels"], true);
    let pods = support::one_of_kind(&docs, "PodMonitor");
    assert_eq!(
        pods["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        "sdfleet-gateway"
    );
    assert_eq!(pods["spec"]["namespaceSelector"]["any"], true);
    assert_eq!(pods["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
}

/// What the models volume's safety rests on: the kubelet tells the plugin the pod's
/// namespace (podInfoOnMount) and no PersistentVolume can use the driver (Ephemeral
/// only); the privileged plugin holds no API credentials; the renderer's pods name the
/// driver the chart registers.
#[test]
fn the_csi_driver_is_inline_only_told_the_pods_namespace_and_its_plugin_has_no_token() {
    let docs = support::render_chart(&["csi.kubeletDir=/var/lib/kubelet/"]);
    let driver = support::one_of_kind(&docs, "CSIDriver");
    assert_eq!(
        driver["metadata"]["name"],
        sdfleet::csi::publish::DRIVER_NAME
    );
    assert_eq!(driver["spec"]["podInfoOnMount"], true);
    assert_eq!(
        driver["spec"]["volumeLifecycleModes"],
        serde_json::json!(["Ephemeral"])
    );
    assert_eq!(driver["spec"]["attachRequired"], false);
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == "obs-sdfleet-csi-node")
        .expect("the CSI node DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false);
    let containers = pod["containers"].as_array().unwrap();
    let plugin = &containers[0];
    assert_eq!(plugin["args"][0], "csi-node");
    assert_eq!(plugin["securityContext"]["privileged"], true);
    let mount = |name: &str| {
        plugin["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap()
            .clone()
    };
    let kubelet_mount = mount("kubelet-dir");
    // The path inside is the host's (the kubelet's target paths), propagated both ways.
    assert_eq!(kubelet_mount["mountPath"], "/var/lib/kubelet");
    assert_eq!(kubelet_mount["mountPropagation"], "Bidirectional");
    assert_eq!(mount("models")["readOnly"], true);
    // Only the plugin is privileged; the registrar drops every capability.
    let registrar = &containers[1];
    assert!(registrar["securityContext"].get("privileged").is_none());
    assert_eq!(
        registrar["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert_eq!(
        registrar["args"][1],
        "--kubelet-registration-path=/var/lib/kubelet/plugins/csi.sdfleet.io/csi.sock"
    );
    // One release per cluster may register the driver: off, nothing of it renders.
    let off = support::render_chart(&["csi.enabled=false"]);
    assert!(off.iter().all(|d| d["kind"] != "CSIDriver"));
    assert!(
        off.iter()
            .all(|d| d["metadata"]["name"] != "obs-sdfleet-csi-node")
    );
}

/// The Argo CD Application of the chart (examples/argocd/sdfleet-app.yaml): its
/// `valuesObject` passes the chart's schema and renders, as Argo CD would template it.
#[test]
fn the_argocd_applications_values_render_the_chart() {
    let text =
        std::fs::read_to_string(support::repo_root().join("examples/argocd/sdfleet-app.yaml"))
            .unwrap();
    let app: Value = serde_saphyr::from_str(&text).expect("the Application is YAML");
    assert_eq!(app["kind"], "Application");
    let values = &app["spec"]["source"]["helm"]["valuesObject"];
    assert!(values.is_object(), "no valuesObject in {app}");
    let file =
        std::env::temp_dir().join(format!("sdfleet-argocd-values-{}.json", std::process::id()));
    std::fs::write(&file, values.to_string()).unwrap();
    let out = std::process::Command::new(support::tool("helm"))
        .args(["template", "sdfleet"])
        .arg(support::repo_root().join("charts/sdfleet"))
        .args([
            "--kube-version",
            "v1.35.4",
            "--namespace",
            "sdfleet-system",
            "-f",
        ])
        .arg(&file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "helm template with the Application's values: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8_lossy(&out.stdout);
    // What the Application asks for is there: the default FleetClass, and the CSI driver.
    assert!(rendered.contains("kind: FleetClass"), "{rendered}");
    assert!(rendered.contains("kind: CSIDriver"));
}
