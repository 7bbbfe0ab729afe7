use super::*;
use crate::crd::comfyui::{ComfyUIDeploymentSpec, IngressScheme};
use crate::crd::modelset::ModelSetSpec;
use serde_json::json;

fn class(annotations: serde_json::Value, name: &str) -> FleetClass {
    serde_json::from_value(json!({
            "apiVersion": "sdfleet.io/v1alpha1", "kind": "FleetClass",
            "metadata": {"name": name, "annotations": annotations},
            "spec": {
                "nodeClass": {"role": "NodeRole-platform"},
                "gpu": {"allowedInstanceTypes": ["g5.2xlarge"], "maxGpusPerFleet": 8},
                "s3": {"allowedBuckets": ["comfyui-*"], "allowedEndpoints": ["https://minio.internal"],
                       "allowedQueues": ["https://sqs.us-west-2.amazonaws.com/1/models-*"]},
                "ingress": {"allowedSchemes": ["internal", "internet-facing"],
                            "internetFacingRequiredAnnotations": {"alb.ingress.kubernetes.io/auth-type": "cognito"},
                            "allowedAnnotationKeys": ["alb.ingress.kubernetes.io/auth-*"]}
            }
        }))
        .unwrap()
}

fn fleet(spec: serde_json::Value) -> ComfyUIDeploymentSpec {
    let mut base = json!({"image": "comfyui:1", "gpu": {"instanceTypes": ["g5.2xlarge"], "limit": 8},
            "storage": {"outputs": {"bucket": "comfyui-out"}}});
    for (k, v) in spec.as_object().unwrap() {
        base[k] = v.clone();
    }
    serde_json::from_value(base).unwrap()
}

fn refused(spec: serde_json::Value) -> Violation {
    let c = class(json!({}), "gpu");
    check_fleet(&fleet(spec), "gpu", &c.spec, "team-a").unwrap_err()
}

#[test]
fn a_fleet_within_its_class_passes() {
    let c = class(json!({}), "gpu");
    check_fleet(&fleet(json!({})), "gpu", &c.spec, "team-a").unwrap();
    // Asking for exactly the class's node settings is no violation.
    let same = fleet(json!({"nodeClass": {"role": "NodeRole-platform"}}));
    check_fleet(&same, "gpu", &c.spec, "team-a").unwrap();
}

#[test]
fn each_thing_outside_the_class_is_named() {
    let role = refused(json!({"nodeClass": {"role": "Admin"}}));
    assert_eq!(
        (role.field.as_str(), role.value.as_str()),
        ("spec.nodeClass", "Admin")
    );
    let sg = refused(json!({"nodeClass": {"role": "NodeRole-platform",
            "securityGroupSelectorTags": {"Name": "wide-open"}}}));
    assert_eq!(sg.field, "spec.nodeClass");
    let bucket = refused(json!({"storage": {"outputs": {"bucket": "payroll-exports"}}}));
    assert_eq!(
        (bucket.field.as_str(), bucket.value.as_str()),
        ("spec.storage.outputs", "payroll-exports/")
    );
    let types = refused(json!({"gpu": {"instanceTypes": ["p5.48xlarge"]}}));
    assert_eq!(types.value, "p5.48xlarge");
    let limit = refused(json!({"gpu": {"instanceTypes": ["g5.2xlarge"], "limit": 64}}));
    assert_eq!(limit.field, "spec.gpu.limit");
    let annotation = refused(
        json!({"ingress": {"annotations": {"alb.ingress.kubernetes.io/group.name": "payments"}}}),
    );
    assert_eq!(annotation.value, "alb.ingress.kubernetes.io/group.name");
    let gateway = refused(json!({"gateway": {"allowUnauthenticated": true,
            "ingress": {"annotations": {"alb.ingress.kubernetes.io/group.name": "payments"}}}}));
    assert_eq!(gateway.field, "spec.gateway.ingress.annotations");
    let inputs =
        refused(json!({"gateway": {"allowUnauthenticated": true, "inputBuckets": ["payroll"]}}));
    assert_eq!(
        (inputs.field.as_str(), inputs.value.as_str()),
        ("spec.gateway.inputBuckets", "payroll/")
    );
    let no_cert = refused(json!({"ingress": {"scheme": "internet-facing",
            "annotations": {"alb.ingress.kubernetes.io/auth-type": "cognito"}}}));
    assert_eq!(no_cert.field, "spec.ingress.certificateArn");
    let no_auth = refused(json!({"ingress": {"scheme": "internet-facing",
            "certificateArn": "arn:aws:acm:us-west-2:123456789012:certificate/x"}}));
    assert_eq!(no_auth.value, "alb.ingress.kubernetes.io/auth-type=(unset)");
    assert!(no_auth.to_string().contains("FleetClass gpu"), "{no_auth}");
}

#[test]
fn an_internal_only_class_refuses_internet_facing() {
    let mut c = class(json!({}), "internal");
    c.spec.ingress.allowed_schemes = vec![IngressScheme::Internal];
    let v = check_fleet(
        &fleet(json!({"ingress": {"scheme": "internet-facing"}})),
        "internal",
        &c.spec,
        "team-a",
    )
    .unwrap_err();
    assert_eq!(
        (v.field.as_str(), v.value.as_str()),
        ("spec.ingress.scheme", "internet-facing")
    );
}

#[test]
fn files_by_url_need_the_class_to_allow_each_url() {
    let mut c = class(json!({}), "gpu");
    let ms = |urls: &[&str]| -> ModelSetSpec {
        let files: Vec<serde_json::Value> = urls
                .iter()
                .enumerate()
                .map(|(i, u)| json!({"path": format!("checkpoints/{i}"), "url": u, "sha256": "0".repeat(64), "size": 1}))
                .collect();
        serde_json::from_value(json!({"source": {"urls": files}})).unwrap()
    };
    let hub = "https://huggingface.co/stabilityai/sdxl/resolve/main/sd_xl_base_1.0.safetensors";
    // A class that names no URL allows none.
    let none = check_modelset(&ms(&[hub]), "gpu", &c.spec, "team-a").unwrap_err();
    assert_eq!(none.field, "spec.source.urls[0].url");
    c.spec.models.allowed_urls = vec!["https://huggingface.co/stabilityai/*/resolve/main/*".into()];
    check_modelset(&ms(&[hub]), "gpu", &c.spec, "team-a").unwrap();
    let other = check_modelset(
        &ms(&[hub, "https://attacker.example/sd_xl_base_1.0.safetensors"]),
        "gpu",
        &c.spec,
        "team-a",
    )
    .unwrap_err();
    assert_eq!(
        (other.field.as_str(), other.value.as_str()),
        (
            "spec.source.urls[1].url",
            "https://attacker.example/sd_xl_base_1.0.safetensors"
        )
    );
}

#[test]
fn a_modelset_may_use_only_allowed_buckets_endpoints_and_queues() {
    let c = class(json!({}), "gpu");
    let ms = |s3: serde_json::Value, sync: serde_json::Value| -> ModelSetSpec {
        serde_json::from_value(json!({"source": {"s3": s3}, "sync": sync})).unwrap()
    };
    check_modelset(
        &ms(json!({"bucket": "comfyui-models"}), json!({})),
        "gpu",
        &c.spec,
        "team-a",
    )
    .unwrap();
    let bucket = check_modelset(
        &ms(json!({"bucket": "other-team"}), json!({})),
        "gpu",
        &c.spec,
        "team-a",
    )
    .unwrap_err();
    assert_eq!(bucket.field, "spec.source.s3");
    let endpoint = check_modelset(
        &ms(
            json!({"bucket": "comfyui-models", "endpoint": "https://attacker.example"}),
            json!({}),
        ),
        "gpu",
        &c.spec,
        "team-a",
    )
    .unwrap_err();
    assert_eq!(endpoint.value, "https://attacker.example");
    let queue = check_modelset(
        &ms(
            json!({"bucket": "comfyui-models"}),
            json!({"sqsQueueUrl": "https://sqs.us-west-2.amazonaws.com/1/billing"}),
        ),
        "gpu",
        &c.spec,
        "team-a",
    )
    .unwrap_err();
    assert_eq!(queue.field, "spec.sync.sqsQueueUrl");
}

#[test]
fn urls_are_compared_part_by_part() {
    let any = vec!["*".to_string()];
    assert_eq!(
        url_allowed(&any, "http://127.0.0.1:4566/123/queue"),
        Ok(true)
    );
    let team = vec!["https://sqs.us-west-2.amazonaws.com/1/team-*".to_string()];
    let allowed = |u: &str| url_allowed(&team, u);
    assert_eq!(
        allowed("https://sqs.us-west-2.amazonaws.com/1/team-models"),
        Ok(true)
    );
    assert_eq!(
        allowed("https://sqs.us-west-2.amazonaws.com:443/1/team-models"),
        Ok(true)
    );
    // `..` is resolved before the comparison; another account, port or scheme is not the queue.
    assert_eq!(
        allowed("https://sqs.us-west-2.amazonaws.com/1/team-a/../billing"),
        Ok(false)
    );
    assert_eq!(
        allowed("https://sqs.us-west-2.amazonaws.com/2/team-models"),
        Ok(false)
    );
    assert_eq!(
        allowed("https://sqs.us-west-2.amazonaws.com:8443/1/team-models"),
        Ok(false)
    );
    assert_eq!(
        allowed("http://sqs.us-west-2.amazonaws.com/1/team-models"),
        Ok(false)
    );
    assert_eq!(
        allowed("https://sqs.us-west-2.amazonaws.com/1/team-x/more"),
        Ok(false)
    );
    let corp = vec!["https://*.corp.example".to_string()];
    assert_eq!(url_allowed(&corp, "https://minio.corp.example"), Ok(true));
    assert_eq!(url_allowed(&corp, "https://minio.corp.example/"), Ok(true));
    // A glob over the raw string took these; parsed, each is refused or another host.
    assert!(url_allowed(&corp, "https://x@169.254.169.254?.corp.example").is_err());
    assert!(url_allowed(&corp, "https://169.254.169.254#.corp.example").is_err());
    assert!(url_allowed(&corp, "https://u:p@minio.corp.example").is_err());
    assert_eq!(url_allowed(&corp, "https://a.b.corp.example"), Ok(false));
    assert_eq!(
        url_allowed(&corp, "https://minio.corp.example.attacker.io"),
        Ok(false)
    );
    let port = vec!["http://127.0.0.1:*".to_string()];
    assert_eq!(url_allowed(&port, "http://127.0.0.1:5000"), Ok(true));
    assert_eq!(url_allowed(&port, "http://127.0.0.2:5000"), Ok(false));
}

#[test]
fn buckets_and_folders_with_the_namespace() {
    let patterns = vec![
        "comfyui-*".to_string(),
        "shared-models/{namespace}/".to_string(),
    ];
    let ok = |ns: &str, b: &str, p: &str| location_allowed(&patterns, ns, b, p);
    assert!(ok("team-a", "comfyui-out", ""));
    assert!(ok("team-a", "comfyui-out", "any/where/"));
    assert!(ok("team-a", "shared-models", "team-a/"));
    assert!(ok("team-a", "shared-models", "team-a/sdxl/"));
    // Another team's folder, the whole bucket, a string prefix that lists beyond the
    // folder, and a climb out of it are all refused.
    assert!(!ok("team-a", "shared-models", "team-b/"));
    assert!(!ok("team-a", "shared-models", ""));
    assert!(!ok("team-a", "shared-models", "team-a"));
    assert!(!ok("team-a", "shared-models", "team-a-evil/"));
    assert!(!ok("team-a", "shared-models", "team-a/../team-b/"));
    assert!(!ok("team-a", "payroll", ""));
    let c = class(json!({}), "gpu");
    let mut spec = c.spec.clone();
    spec.s3.allowed_buckets = patterns.clone();
    let ms: ModelSetSpec = serde_json::from_value(
        json!({"source": {"s3": {"bucket": "shared-models", "prefix": "team-b/"}}}),
    )
    .unwrap();
    let v = check_modelset(&ms, "gpu", &spec, "team-a").unwrap_err();
    assert_eq!(
        (v.field.as_str(), v.value.as_str()),
        ("spec.source.s3", "shared-models/team-b/")
    );
    assert!(v.rule.contains("shared-models/team-a/"), "{v}");
    check_modelset(&ms, "gpu", &spec, "team-b").unwrap();
}

#[test]
fn a_class_is_for_the_namespaces_it_selects() {
    let mut c = class(json!({}), "team-a-gpu");
    c.spec.namespace_selector = Some(
        serde_json::from_value(json!({
            "matchLabels": {"kubernetes.io/metadata.name": "team-a"},
            "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["sandbox"]}]
        }))
        .unwrap(),
    );
    let ns = |name: &str, labels: serde_json::Value| Namespace {
        name: name.into(),
        labels: serde_json::from_value(labels).unwrap(),
    };
    let classes = vec![c];
    let a = ns("team-a", json!({"kubernetes.io/metadata.name": "team-a"}));
    let b = ns("team-b", json!({"kubernetes.io/metadata.name": "team-b"}));
    let sandbox = ns(
        "team-a",
        json!({"kubernetes.io/metadata.name": "team-a", "tier": "sandbox"}),
    );
    assert!(resolve(Some("team-a-gpu"), &classes, Some(&a)).is_ok());
    assert_eq!(
        resolve(Some("team-a-gpu"), &classes, Some(&b)).unwrap_err(),
        ClassError::NotForNamespace {
            class: "team-a-gpu".into(),
            namespace: "team-b".into()
        }
    );
    assert!(resolve(Some("team-a-gpu"), &classes, Some(&sandbox)).is_err());
    // Without a namespace (sdfleet render) the selector is not checked.
    assert!(resolve(Some("team-a-gpu"), &classes, None).is_ok());
    let exists: LabelSelector = serde_json::from_value(
        json!({"matchExpressions": [{"key": "tenant", "operator": "Exists"}]}),
    )
    .unwrap();
    assert!(selects(
        &exists,
        &a.labels
            .clone()
            .into_iter()
            .chain([("tenant".into(), "x".into())])
            .collect()
    ));
    assert!(!selects(&exists, &a.labels));
    let unknown: LabelSelector = serde_json::from_value(
        json!({"matchExpressions": [{"key": "tenant", "operator": "Gt", "values": ["1"]}]}),
    )
    .unwrap();
    assert!(!selects(&unknown, &a.labels));
}

#[test]
fn ingress_hosts_required_values_and_operator_keys() {
    let mut c = class(json!({}), "gpu");
    c.spec.ingress.allowed_hosts = vec!["*.{namespace}.comfy.example.com".into()];
    let check = |spec: serde_json::Value| check_fleet(&fleet(spec), "gpu", &c.spec, "team-a");
    check(json!({"ingress": {"host": "sdxl.team-a.comfy.example.com"}})).unwrap();
    let other = check(json!({"ingress": {"host": "sdxl.team-b.comfy.example.com"}})).unwrap_err();
    assert_eq!(other.field, "spec.ingress.host");
    let none = check(json!({"ingress": {}})).unwrap_err();
    assert_eq!(
        (none.field.as_str(), none.value.as_str()),
        ("spec.ingress.host", "")
    );
    let internet = |auth: &str| {
        json!({"ingress": {"scheme": "internet-facing",
            "host": "sdxl.team-a.comfy.example.com",
            "certificateArn": "arn:aws:acm:us-west-2:123456789012:certificate/x",
            "annotations": {"alb.ingress.kubernetes.io/auth-type": auth}}})
    };
    check(internet("cognito")).unwrap();
    let open = check(internet("none")).unwrap_err();
    assert_eq!(open.value, "alb.ingress.kubernetes.io/auth-type=none");
    c.spec.ingress.allowed_annotation_keys = vec!["alb.ingress.kubernetes.io/*".into()];
    let check = |spec: serde_json::Value| check_fleet(&fleet(spec), "gpu", &c.spec, "team-a");
    let scheme = check(json!({"ingress": {"host": "x.team-a.comfy.example.com",
            "annotations": {"alb.ingress.kubernetes.io/scheme": "internet-facing"}}}))
    .unwrap_err();
    assert_eq!(scheme.value, "alb.ingress.kubernetes.io/scheme");
    assert!(scheme.rule.contains("operator sets it"), "{scheme}");
}

#[test]
fn the_class_decides_the_gateways_service_account() {
    let mut c = class(json!({}), "gpu");
    c.spec.gateway.service_account_annotations = BTreeMap::from([(
        "eks.amazonaws.com/role-arn".to_string(),
        "arn:aws:iam::123456789012:role/comfy-{namespace}-{fleet}".to_string(),
    )]);
    let asked = fleet(json!({"gateway": {"allowUnauthenticated": true,
            "serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/Admin"}}}));
    let v = check_fleet(&asked, "gpu", &c.spec, "team-a").unwrap_err();
    assert_eq!(v.field, "spec.gateway.serviceAccountAnnotations");
    let mut plain = fleet(json!({"gateway": {"allowUnauthenticated": true}}));
    check_fleet(&plain, "gpu", &c.spec, "team-a").unwrap();
    c.spec.s3.volume_service_account_annotations = BTreeMap::from([(
        "eks.amazonaws.com/role-arn".to_string(),
        "arn:aws:iam::123456789012:role/volumes-{namespace}".to_string(),
    )]);
    apply_class(&mut plain, &c.spec, "team-a", "sdxl");
    assert_eq!(
        plain.gateway.unwrap().service_account_annotations["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::123456789012:role/comfy-team-a-sdxl"
    );
    // So does the account its pods' S3 volumes are mounted with.
    assert_eq!(
        plain.storage.class_volume_identity["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::123456789012:role/volumes-team-a"
    );
    for (t, ok) in [
        (json!({"key": "dedicated", "operator": "Exists"}), true),
        (json!({"operator": "Exists"}), false),
        (
            json!({"key": "sdfleet.io/tenant", "operator": "Equal", "value": "team-a"}),
            true,
        ),
        (
            json!({"key": "sdfleet.io/tenant", "operator": "Equal", "value": "team-b"}),
            false,
        ),
        (
            json!({"key": "sdfleet.io/tenant", "operator": "Exists"}),
            false,
        ),
    ] {
        let spec =
            fleet(json!({"gateway": {"allowUnauthenticated": true, "tolerations": [t.clone()]}}));
        assert_eq!(
            check_fleet(&spec, "gpu", &c.spec, "team-a").is_ok(),
            ok,
            "{t}"
        );
    }
}

#[test]
fn the_named_class_or_the_one_default() {
    let classes = vec![
        class(json!({"sdfleet.io/is-default-class": "true"}), "standard"),
        class(json!({}), "premium"),
    ];
    assert_eq!(
        resolve(None, &classes, None)
            .unwrap()
            .metadata
            .name
            .as_deref(),
        Some("standard")
    );
    assert_eq!(
        resolve(Some("premium"), &classes, None)
            .unwrap()
            .metadata
            .name
            .as_deref(),
        Some("premium")
    );
    assert_eq!(
        resolve(Some("gold"), &classes, None).unwrap_err(),
        ClassError::NotFound("gold".into())
    );
    assert_eq!(
        resolve(None, &classes[1..], None).unwrap_err(),
        ClassError::NoDefault
    );
    let two = vec![
        classes[0].clone(),
        class(json!({"sdfleet.io/is-default-class": "true"}), "b"),
    ];
    assert!(matches!(
        resolve(None, &two, None),
        Err(ClassError::SeveralDefaults(_))
    ));
}

#[test]
fn an_admitted_modelset_reads_as_its_class_tenant_role_when_there_is_one() {
    let ms: ModelSetSpec = serde_json::from_value(json!({
        "className": "gpu", "source": {"s3": {"bucket": "comfyui-models", "prefix": "team-a/"}}
    }))
    .unwrap();
    let namespace = Namespace {
        name: "team-a".into(),
        labels: Default::default(),
    };
    let mut c = class(json!({}), "gpu");
    assert_eq!(
        admit_modelset(&ms, std::slice::from_ref(&c), &namespace).unwrap(),
        None,
        "no role in the class: the reader's own identity"
    );
    let role = "arn:aws:iam::123456789012:role/sdfleet-tenant-models";
    c.spec.s3.tenant_role_arn = Some(role.into());
    assert_eq!(
        admit_modelset(&ms, &[c], &namespace).unwrap().as_deref(),
        Some(role)
    );
}
