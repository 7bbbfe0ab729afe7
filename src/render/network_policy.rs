//! The fleet's NetworkPolicy: ComfyUI has no authentication of its own, so its pods take
//! traffic only from the fleet's gateway (or, without one, from the fleet's namespace)
//! and from its load balancer, never from another team's pods.

use serde_json::{Value, json};

use crate::crd::comfyui::ComfyUIDeploymentSpec;
use crate::names::FleetNames;

/// Any address, for an Ingress whose class names no load-balancer subnets.
const ANYWHERE: [&str; 2] = ["0.0.0.0/0", "::/0"];

pub fn network_policy_spec(fleet: &FleetNames, spec: &ComfyUIDeploymentSpec) -> Value {
    let ports = json!([{"protocol": "TCP", "port": spec.port}]);
    // With a gateway, jobs go through it and ComfyUI serves nobody else in the cluster;
    // without one, the team's own clients (its namespace) talk to ComfyUI directly.
    let in_cluster = if spec.gateway.is_some() {
        json!({"podSelector": {"matchLabels": fleet.gateway_pod_selector()}})
    } else {
        json!({"podSelector": {}})
    };
    let mut rules = vec![json!({"from": [in_cluster], "ports": ports})];
    if spec.ingress.enabled {
        // An ALB in IP mode connects from its subnets' addresses, not from a pod.
        let cidrs: Vec<&str> = if spec.ingress.class_source_cidrs.is_empty() {
            ANYWHERE.to_vec()
        } else {
            spec.ingress
                .class_source_cidrs
                .iter()
                .map(String::as_str)
                .collect()
        };
        let from: Vec<Value> = cidrs
            .iter()
            .map(|c| json!({"ipBlock": {"cidr": c}}))
            .collect();
        rules.push(json!({"from": from, "ports": ports}));
    }
    json!({
        "podSelector": {"matchLabels": fleet.pod_selector()},
        "policyTypes": ["Ingress"],
        "ingress": rules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::gateway::GatewaySpec;

    fn spec(gateway: bool, ingress: bool, cidrs: &[&str]) -> ComfyUIDeploymentSpec {
        let mut spec: ComfyUIDeploymentSpec = serde_json::from_value(
            json!({"image": "comfy:1", "gpu": {"instanceTypes": ["g5.xlarge"]}}),
        )
        .unwrap();
        spec.ingress.enabled = ingress;
        spec.ingress.class_source_cidrs = cidrs.iter().map(|c| c.to_string()).collect();
        if gateway {
            spec.gateway = Some(serde_json::from_value::<GatewaySpec>(json!({})).unwrap());
        }
        spec
    }

    fn sources(policy: &Value) -> Vec<Value> {
        policy["ingress"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r["from"].as_array().unwrap().clone())
            .collect()
    }

    #[test]
    fn with_a_gateway_only_the_gateway_and_the_load_balancer_reach_comfyui() {
        let fleet = FleetNames::new("team-a", "sdxl");
        let policy = network_policy_spec(&fleet, &spec(true, true, &["10.0.0.0/19"]));
        assert_eq!(
            policy["podSelector"]["matchLabels"],
            json!(fleet.pod_selector())
        );
        assert_eq!(policy["policyTypes"], json!(["Ingress"]));
        assert_eq!(
            sources(&policy),
            [
                json!({"podSelector": {"matchLabels": fleet.gateway_pod_selector()}}),
                json!({"ipBlock": {"cidr": "10.0.0.0/19"}}),
            ]
        );
        // No namespaceSelector anywhere: another namespace's pods match no rule.
        assert!(!policy.to_string().contains("namespaceSelector"));
        for rule in policy["ingress"].as_array().unwrap() {
            assert_eq!(rule["ports"], json!([{"protocol": "TCP", "port": 8188}]));
        }
    }

    #[test]
    fn without_a_gateway_the_fleets_namespace_reaches_comfyui_and_without_an_ingress_nothing_else()
    {
        let fleet = FleetNames::new("team-a", "sdxl");
        let policy = network_policy_spec(&fleet, &spec(false, false, &[]));
        assert_eq!(sources(&policy), [json!({"podSelector": {}})]);
    }

    #[test]
    fn an_ingress_whose_class_names_no_subnets_is_reachable_from_anywhere() {
        let fleet = FleetNames::new("team-a", "sdxl");
        let policy = network_policy_spec(&fleet, &spec(true, true, &[]));
        assert_eq!(
            sources(&policy)[1..],
            [
                json!({"ipBlock": {"cidr": "0.0.0.0/0"}}),
                json!({"ipBlock": {"cidr": "::/0"}}),
            ]
        );
    }
}
