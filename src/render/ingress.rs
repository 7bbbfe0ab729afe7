//! The Ingress, for the AWS Load Balancer Controller (ALB) by default.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::crd::comfyui::{ComfyUIDeploymentSpec, IngressSpec};
use crate::names::FleetNames;

const ALB: &str = "alb.ingress.kubernetes.io";

/// The ALB annotations the operator sets on every Ingress (after `alb.ingress.kubernetes.io/`).
/// A fleet cannot override them: the scheme is the class's decision, and the rest keep
/// ComfyUI reachable (websocket timeout, stickiness, health check, TLS).
pub const OPERATOR_ANNOTATIONS: [&str; 9] = [
    "scheme",
    "target-type",
    "healthcheck-path",
    "success-codes",
    "load-balancer-attributes",
    "target-group-attributes",
    "certificate-arn",
    "listen-ports",
    "ssl-redirect",
];

/// Whether the operator sets annotation `key` (a fleet may not).
pub fn is_operator_annotation(key: &str) -> bool {
    key.strip_prefix(ALB)
        .and_then(|rest| rest.strip_prefix('/'))
        .is_some_and(|k| OPERATOR_ANNOTATIONS.contains(&k))
}

/// What the ALB checks and keeps per client: differs between ComfyUI and the gateway.
pub struct Backend<'a> {
    pub service: String,
    pub port: i32,
    pub health_path: &'a str,
    /// Pin a client to one target (ComfyUI's prompts, `/ws` and `/view` must meet).
    pub sticky: bool,
}

impl Backend<'_> {
    /// Any backend: what the annotations of an Ingress are, where only its spec matters
    /// (the class checks them before anything renders).
    pub fn placeholder() -> Backend<'static> {
        Backend {
            service: String::new(),
            port: 0,
            health_path: "/",
            sticky: false,
        }
    }

    pub fn comfyui(fleet: &FleetNames, spec: &ComfyUIDeploymentSpec) -> Backend<'static> {
        Backend {
            service: fleet.service(),
            port: spec.port,
            health_path: "/system_stats",
            sticky: true,
        }
    }
}

pub fn ingress_spec(backend: &Backend, ingress: &IngressSpec) -> Value {
    let mut rule = json!({"http": {"paths": [{
        "path": "/",
        "pathType": "Prefix",
        "backend": {"service": {"name": backend.service, "port": {"number": backend.port}}},
    }]}});
    if let Some(host) = ingress.host.as_deref().filter(|h| !h.is_empty()) {
        rule["host"] = json!(host);
    }
    json!({"ingressClassName": ingress.class_name, "rules": [rule]})
}

/// The fleet's annotations, then the operator's, which win (`OPERATOR_ANNOTATIONS`).
pub fn annotations(backend: &Backend, ingress: &IngressSpec) -> BTreeMap<String, String> {
    let mut a = ingress.annotations.clone();
    let mut set = |k: &str, v: String| {
        a.insert(format!("{ALB}/{k}"), v);
    };
    set("scheme", ingress.scheme.as_str().to_string());
    // ip targets need no NodePort and support stickiness.
    set("target-type", "ip".to_string());
    set("healthcheck-path", backend.health_path.to_string());
    set("success-codes", "200".to_string());
    // The ALB default of 60 s drops ComfyUI's /ws websocket every minute.
    set(
        "load-balancer-attributes",
        format!(
            "idle_timeout.timeout_seconds={}",
            ingress.idle_timeout_seconds
        ),
    );
    if backend.sticky {
        set(
            "target-group-attributes",
            "stickiness.enabled=true,stickiness.type=lb_cookie,stickiness.lb_cookie.duration_seconds=86400".to_string(),
        );
    }
    match ingress.certificate_arn.as_deref().filter(|c| !c.is_empty()) {
        Some(arn) => {
            set("certificate-arn", arn.to_string());
            set(
                "listen-ports",
                r#"[{"HTTP": 80}, {"HTTPS": 443}]"#.to_string(),
            );
            set("ssl-redirect", "443".to_string());
        }
        None => set("listen-ports", r#"[{"HTTP": 80}]"#.to_string()),
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::comfyui::IngressScheme;
    use crate::render::ChildKind;
    use crate::render::nodeclass::Cloud;
    use crate::render::tests::{SDXL, example, render};

    #[test]
    fn default_ingress_is_internal_alb_with_websocket_timeout_and_stickiness() {
        let children = render(&example(SDXL), Cloud::Aws);
        let ing = &children
            .iter()
            .find(|c| c.kind == ChildKind::Ingress)
            .unwrap()
            .manifest;
        let a = &ing["metadata"]["annotations"];
        assert_eq!(a["alb.ingress.kubernetes.io/scheme"], "internal");
        assert_eq!(a["alb.ingress.kubernetes.io/target-type"], "ip");
        assert_eq!(
            a["alb.ingress.kubernetes.io/healthcheck-path"],
            "/system_stats"
        );
        assert_eq!(
            a["alb.ingress.kubernetes.io/load-balancer-attributes"],
            "idle_timeout.timeout_seconds=4000"
        );
        assert!(
            a["alb.ingress.kubernetes.io/target-group-attributes"]
                .as_str()
                .unwrap()
                .contains("stickiness.enabled=true")
        );
        assert!(a.get("alb.ingress.kubernetes.io/certificate-arn").is_none());
        assert_eq!(ing["spec"]["ingressClassName"], "alb");
        assert_eq!(
            ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"],
            json!({"name": "sdxl", "port": {"number": 8188}})
        );
        assert!(ing["spec"]["rules"][0].get("host").is_none());
    }

    #[test]
    fn certificate_turns_on_tls_and_the_operators_annotations_win() {
        let mut ingress = IngressSpec {
            scheme: IngressScheme::InternetFacing,
            certificate_arn: Some("arn:aws:acm:us-west-2:123456789012:certificate/abc".into()),
            ..IngressSpec::default()
        };
        ingress
            .annotations
            .insert("alb.ingress.kubernetes.io/scheme".into(), "internal".into());
        ingress.annotations.insert(
            "alb.ingress.kubernetes.io/auth-type".into(),
            "cognito".into(),
        );
        let backend = Backend {
            service: "sdxl".into(),
            port: 8188,
            health_path: "/system_stats",
            sticky: true,
        };
        let a = annotations(&backend, &ingress);
        assert_eq!(
            a["alb.ingress.kubernetes.io/certificate-arn"],
            "arn:aws:acm:us-west-2:123456789012:certificate/abc"
        );
        assert_eq!(
            a["alb.ingress.kubernetes.io/listen-ports"],
            r#"[{"HTTP": 80}, {"HTTPS": 443}]"#
        );
        assert_eq!(a["alb.ingress.kubernetes.io/ssl-redirect"], "443");
        // The fleet's own keys stay; one the operator sets cannot turn the scheme.
        assert_eq!(a["alb.ingress.kubernetes.io/scheme"], "internet-facing");
        assert_eq!(a["alb.ingress.kubernetes.io/auth-type"], "cognito");
        assert!(is_operator_annotation("alb.ingress.kubernetes.io/scheme"));
        assert!(!is_operator_annotation(
            "alb.ingress.kubernetes.io/auth-type"
        ));
    }
}
