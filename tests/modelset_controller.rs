//! The ModelSet controller against moto: the catalog in status matches the bucket, a
//! large catalog goes to ConfigMaps, and with SQS the revision follows puts and deletes
//! within seconds (polling set to an hour, so only the events can explain it).

mod support;

use std::io::Read;
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use sdfleet::crd::ModelSet;
use sdfleet::crd::modelset::ModelSetStatus;
use sdfleet::sync::catalog::{Catalog, Object};
use serde_json::json;
use support::{ControllerProcess, TestNamespace, Testbed, eventually, install_crds};

async fn clients(tb: &Testbed) -> (aws_sdk_s3::Client, aws_sdk_sqs::Client) {
    let aws = tb.aws().await;
    (
        aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&aws)
                .force_path_style(true)
                .build(),
        ),
        aws_sdk_sqs::Client::new(&aws),
    )
}

async fn bucket(s3: &aws_sdk_s3::Client) -> String {
    support::create_bucket(s3, "models").await
}

async fn put(s3: &aws_sdk_s3::Client, bucket: &str, key: &str, len: usize) {
    s3.put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(vec![b'x'; len]))
        .send()
        .await
        .unwrap();
}

/// The catalog as the SDK lists it, independently of the controller.
async fn expected(s3: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Catalog {
    let out = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .max_keys(1000)
        .send()
        .await
        .unwrap();
    Catalog::new(
        out.contents()
            .iter()
            .map(|o| Object {
                key: o.key().unwrap().strip_prefix(prefix).unwrap().to_string(),
                size: o.size().unwrap() as u64,
                etag: o.e_tag().unwrap().trim_matches('"').to_string(),
                last_modified: None,
            })
            .collect(),
    )
}

fn modelset(name: &str, bucket: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut spec =
        json!({"source": {"s3": {"bucket": bucket, "prefix": "models/", "region": "us-west-2"}}});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSet", "metadata": {"name": name}, "spec": spec})
}

async fn status(api: &Api<ModelSet>, name: &str) -> Option<ModelSetStatus> {
    api.get_opt(name).await.ok()??.status
}

#[tokio::test]
async fn catalog_in_status_matches_the_bucket() {
    let tb = Testbed::get();
    install_crds(tb);
    let (s3, _) = clients(tb).await;
    let b = bucket(&s3).await;
    put(&s3, &b, "models/checkpoints/sdxl.safetensors", 3000).await;
    put(&s3, &b, "models/checkpoints/refiner.safetensors", 2000).await;
    put(&s3, &b, "models/loras/detail.safetensors", 100).await;
    put(&s3, &b, "models/vae/sdxl_vae.safetensors", 50).await;
    put(&s3, &b, "models/loras/skip.tmp", 7).await;
    put(&s3, &b, "elsewhere/x.safetensors", 1).await;
    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "ms-catalog").await;
    let _controller = ControllerProcess::start_with_env(tb, &ns.name, &[], &tb.aws_env());
    let api: Api<ModelSet> = Api::namespaced(client.clone(), &ns.name);
    let ssa = PatchParams::apply("test-user").force();
    api.patch(
        "sdxl",
        &ssa,
        &Patch::Apply(modelset("sdxl", &b, json!({"exclude": ["**/*.tmp"]}))),
    )
    .await
    .unwrap();

    let mut want = expected(&s3, &b, "models/").await;
    want.objects.retain(|o| !o.key.ends_with(".tmp"));
    let s = eventually("the catalog in status", Duration::from_secs(60), || async {
        status(&api, "sdxl")
            .await
            .filter(|s| !s.revision.is_empty())
    })
    .await;
    assert_eq!(s.revision, want.revision());
    assert_eq!(s.object_count, 4);
    assert_eq!(s.total_bytes, 5150);
    assert_eq!(s.by_type["checkpoints"].count, 2);
    assert_eq!(s.by_type["checkpoints"].bytes, 5000);
    assert_eq!(s.by_type["loras"].count, 1);
    assert_eq!(
        s.models.iter().map(|m| m.key.as_str()).collect::<Vec<_>>(),
        [
            "checkpoints/refiner.safetensors",
            "checkpoints/sdxl.safetensors",
            "loras/detail.safetensors",
            "vae/sdxl_vae.safetensors"
        ]
    );
    assert_eq!(s.models[0].type_, "checkpoints");
    assert!(s.catalog_ref.is_none());
    let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Listed")
    );
    let synced = s.conditions.iter().find(|c| c.type_ == "Synced").unwrap();
    assert_eq!(synced.reason, "NoNodes");
    api.delete("sdxl", &DeleteParams::default()).await.unwrap();
}

#[tokio::test]
async fn large_catalog_goes_to_configmaps() {
    let tb = Testbed::get();
    install_crds(tb);
    let (s3, _) = clients(tb).await;
    let b = bucket(&s3).await;
    let n = 260;
    futures::future::join_all((0..n).map(|i| {
        let (s3, b) = (s3.clone(), b.clone());
        async move {
            put(
                &s3,
                &b,
                &format!("models/loras/lora_{i:05}.safetensors"),
                i + 1,
            )
            .await
        }
    }))
    .await;
    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "ms-large").await;
    let _controller = ControllerProcess::start_with_env(tb, &ns.name, &[], &tb.aws_env());
    let api: Api<ModelSet> = Api::namespaced(client.clone(), &ns.name);
    api.patch(
        "many",
        &PatchParams::apply("test-user").force(),
        &Patch::Apply(modelset(
            "many",
            &b,
            json!({"sync": {"pollInterval": "2s"}}),
        )),
    )
    .await
    .unwrap();
    let s = eventually("the catalog in status", Duration::from_secs(60), || async {
        status(&api, "many")
            .await
            .filter(|s| s.object_count == n as u64)
    })
    .await;
    assert_eq!(
        s.models.len(),
        sdfleet::controller::modelset::catalog_maps::MODELS_IN_STATUS
    );
    let cref = s.catalog_ref.expect("catalogRef for a large catalog");
    assert_eq!(cref.objects, n as u64);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let mut gz = Vec::new();
    for name in &cref.config_maps {
        let cm = cms.get(name).await.unwrap();
        gz.extend_from_slice(&cm.binary_data.unwrap()["catalog.tsv.gz"].0);
    }
    let mut tsv = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut tsv)
        .unwrap();
    let want = expected(&s3, &b, "models/").await;
    assert_eq!(tsv, want.to_tsv(), "the stored catalog is the whole bucket");
    assert_eq!(s.revision, want.revision());

    // Shrunk to what the status holds: the ConfigMaps go (the controller finds them in
    // its watch cache, not by a list per relisting).
    futures::future::join_all((50..n).map(|i| {
        let (s3, b) = (s3.clone(), b.clone());
        async move {
            s3.delete_object()
                .bucket(&b)
                .key(format!("models/loras/lora_{i:05}.safetensors"))
                .send()
                .await
                .unwrap()
        }
    }))
    .await;
    let s = eventually("the catalog shrunk", Duration::from_secs(60), || async {
        status(&api, "many").await.filter(|s| s.object_count == 50)
    })
    .await;
    assert_eq!(s.catalog_ref, None);
    eventually(
        "the catalog ConfigMaps deleted",
        Duration::from_secs(30),
        || async {
            let left = cms
                .list(&ListParams::default().labels("sdfleet.io/catalog-of=many"))
                .await
                .unwrap();
            left.items.is_empty().then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn sqs_events_update_the_revision_within_seconds() {
    let tb = Testbed::get();
    install_crds(tb);
    let (s3, sqs) = clients(tb).await;
    let b = bucket(&s3).await;
    put(&s3, &b, "models/checkpoints/a.safetensors", 10).await;
    let queue = support::notify_to_new_queue(&s3, &sqs, &b).await;
    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "ms-sqs").await;
    let _controller = ControllerProcess::start_with_env(tb, &ns.name, &[], &tb.aws_env());
    let api: Api<ModelSet> = Api::namespaced(client.clone(), &ns.name);
    let spec = json!({"sync": {"pollInterval": "1h", "sqsQueueUrl": queue}});
    api.patch(
        "ev",
        &PatchParams::apply("test-user").force(),
        &Patch::Apply(modelset("ev", &b, spec)),
    )
    .await
    .unwrap();
    let first = eventually("the first listing", Duration::from_secs(60), || async {
        status(&api, "ev").await.filter(|s| s.object_count == 1)
    })
    .await;

    put(&s3, &b, "models/loras/new lora.safetensors", 20).await;
    let t = Instant::now();
    let after_put = eventually(
        "the revision to follow the put",
        Duration::from_secs(30),
        || async { status(&api, "ev").await.filter(|s| s.object_count == 2) },
    )
    .await;
    println!("revision updated {:?} after the put", t.elapsed());
    assert_ne!(after_put.revision, first.revision);

    s3.delete_object()
        .bucket(&b)
        .key("models/checkpoints/a.safetensors")
        .send()
        .await
        .unwrap();
    let t = Instant::now();
    let after_delete = eventually(
        "the revision to follow the delete",
        Duration::from_secs(30),
        || async {
            status(&api, "ev")
                .await
                .filter(|s| s.object_count == 1 && s.revision != after_put.revision)
        },
    )
    .await;
    println!("revision updated {:?} after the delete", t.elapsed());
    assert_eq!(after_delete.models[0].key, "loras/new lora.safetensors");
    // Messages are deleted once handled.
    let left = sqs
        .get_queue_attributes()
        .queue_url(&queue)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
        .send()
        .await
        .unwrap();
    let left = &left.attributes().unwrap()
        [&aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages];
    assert_eq!(left, "0");
}

#[tokio::test]
async fn ssm_method_finds_instances_by_tag_sends_sync_and_records_results() {
    let tb = Testbed::get();
    install_crds(tb);
    let (s3, _) = clients(tb).await;
    let aws = tb.aws().await;
    let ec2 = aws_sdk_ec2::Client::new(&aws);
    let ssm = aws_sdk_ssm::Client::new(&aws);
    let b = bucket(&s3).await;
    put(&s3, &b, "models/checkpoints/a.safetensors", 10).await;
    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "ms-ssm").await;
    let pool = format!("{}.fleet", ns.name);
    let image = ec2.describe_images().send().await.unwrap().images()[0]
        .image_id()
        .unwrap()
        .to_string();
    // As Karpenter tags its instances: the NodePool and the cluster.
    let tags = |pool: &str, cluster: &str| {
        aws_sdk_ec2::types::TagSpecification::builder()
            .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
            .tags(
                aws_sdk_ec2::types::Tag::builder()
                    .key("karpenter.sh/nodepool")
                    .value(pool)
                    .build(),
            )
            .tags(
                aws_sdk_ec2::types::Tag::builder()
                    .key(format!("kubernetes.io/cluster/{cluster}"))
                    .value("owned")
                    .build(),
            )
            .build()
    };
    let ours = ec2
        .run_instances()
        .image_id(&image)
        .min_count(2)
        .max_count(2)
        .tag_specifications(tags(&pool, "testbed"))
        .send()
        .await
        .unwrap();
    let mut ids: Vec<String> = ours
        .instances()
        .iter()
        .map(|i| i.instance_id().unwrap().to_string())
        .collect();
    ids.sort();
    ec2.run_instances()
        .image_id(&image)
        .min_count(1)
        .max_count(1)
        .tag_specifications(tags("another-pool", "testbed"))
        .send()
        .await
        .unwrap();
    // Same NodePool name, another cluster in the account: not ours.
    ec2.run_instances()
        .image_id(&image)
        .min_count(1)
        .max_count(1)
        .tag_specifications(tags(&pool, "another-cluster"))
        .send()
        .await
        .unwrap();

    let _controller = ControllerProcess::start_with_env(
        tb,
        &ns.name,
        &["--agent-namespace", &ns.name],
        &tb.aws_env(),
    );
    let ssa = PatchParams::apply("test-user").force();
    let api: Api<ModelSet> = Api::namespaced(client.clone(), &ns.name);
    api.patch(
        "viassm",
        &ssa,
        &Patch::Apply(modelset("viassm", &b, json!({"sync": {"method": "SSM"}}))),
    )
    .await
    .unwrap();
    let cuds: Api<sdfleet::crd::ComfyUIDeployment> = Api::namespaced(client.clone(), &ns.name);
    let cud = json!({"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment", "metadata": {"name": "fleet"},
        "spec": {"image": "comfyui:test", "replicas": 0, "modelSet": "viassm", "ingress": {"enabled": false}}});
    cuds.patch("fleet", &ssa, &Patch::Apply(cud)).await.unwrap();

    let s = eventually(
        "SSM results of both instances in status",
        Duration::from_secs(90),
        || async {
            let s = status(&api, "viassm").await?;
            let synced = s
                .nodes
                .iter()
                .filter(|n| {
                    n.state == sdfleet::crd::modelset::NodeSyncState::Synced
                        && n.revision == s.revision
                })
                .count();
            (synced == 2
                && s.conditions
                    .iter()
                    .any(|c| c.type_ == "Synced" && c.status == "True"))
            .then_some(s)
        },
    )
    .await;
    let mut recorded: Vec<String> = s.nodes.iter().map(|n| n.node.clone()).collect();
    recorded.sort();
    assert_eq!(recorded, ids, "exactly the fleet's running instances");
    let commands = ssm.list_commands().send().await.unwrap();
    let sent = commands
        .commands()
        .iter()
        .find(|c| c.instance_ids().iter().any(|i| i == &ids[0]))
        .expect("a command for the fleet's instances");
    assert_eq!(sent.document_name(), Some("AWS-RunShellScript"));
    let script = &sent.parameters().unwrap()["commands"][0];
    assert!(
        script.starts_with(&format!("sdfleet sync --bucket '{b}'")),
        "{script}"
    );
    assert!(
        script.contains(&format!("/models/{}/viassm'", ns.name)),
        "{script}"
    );
    // moto records the command but runs nothing, and reports Success: run what the
    // instances would run, here, against the same S3, and see the models arrive.
    let dest = std::env::temp_dir().join(format!("sdfleet-ssm-{}", support::unique_suffix()));
    let local = script
        .replacen(
            "sdfleet ",
            &format!("{} ", support::sdfleet_bin().display()),
            1,
        )
        .replace(
            &format!("'/mnt/k8s-disks/0/sdfleet/models/{}/viassm'", ns.name),
            &format!("'{}'", dest.display()),
        );
    let out = std::process::Command::new("sh")
        .args(["-c", &local])
        .envs(tb.aws_env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{local}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::metadata(dest.join("checkpoints/a.safetensors"))
            .unwrap()
            .len(),
        10
    );
    let _ = std::fs::remove_dir_all(&dest);
    cuds.delete("fleet", &DeleteParams::default())
        .await
        .unwrap();
    eventually("fleet deleted", Duration::from_secs(60), || async {
        cuds.get_opt("fleet").await.ok()?.is_none().then_some(())
    })
    .await;
}

/// 100,000 keys: the status stays small (first 100 models) and the full catalog lands in
/// ConfigMaps under the 1 MiB object limit. Prints how long the listing took.
/// Run explicitly: `cargo test --test modelset_controller -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "fills moto with 100,000 objects (about 10 minutes on 2 cores); run with --ignored"]
async fn hundred_thousand_keys_are_catalogued_within_object_limits() {
    const N: usize = 100_000;
    let tb = Testbed::get();
    install_crds(tb);
    let (s3, _) = clients(tb).await;
    let b = bucket(&s3).await;
    let t = Instant::now();
    use futures::StreamExt;
    futures::stream::iter(0..N)
        .for_each_concurrent(64, |i| {
            let (s3, b) = (s3.clone(), b.clone());
            async move {
                let key = format!(
                    "models/{}/model_{i:06}.safetensors",
                    ["checkpoints", "loras", "vae", "controlnet"][i % 4]
                );
                s3.put_object()
                    .bucket(&b)
                    .key(key)
                    .body(ByteStream::from_static(b"w"))
                    .send()
                    .await
                    .unwrap();
            }
        })
        .await;
    println!("filled moto with {N} objects in {:?}", t.elapsed());
    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "ms-100k").await;
    let _controller = ControllerProcess::start_with_env(tb, &ns.name, &[], &tb.aws_env());
    let api: Api<ModelSet> = Api::namespaced(client.clone(), &ns.name);
    let t = Instant::now();
    api.patch(
        "huge",
        &PatchParams::apply("test-user").force(),
        &Patch::Apply(modelset("huge", &b, json!({}))),
    )
    .await
    .unwrap();
    let s = eventually("the 100k catalog", Duration::from_secs(600), || async {
        status(&api, "huge")
            .await
            .filter(|s| s.object_count == N as u64)
    })
    .await;
    println!(
        "catalogued {N} objects (listed, digested, stored) in {:?}",
        t.elapsed()
    );
    assert_eq!(s.by_type["loras"].count, (N / 4) as u64);
    let object = serde_json::to_vec(&api.get("huge").await.unwrap()).unwrap();
    assert!(
        object.len() < 100 * 1024,
        "the ModelSet object is {} bytes",
        object.len()
    );
    let cref = s.catalog_ref.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns.name);
    let mut gz = Vec::new();
    for name in &cref.config_maps {
        let cm = cms.get(name).await.unwrap();
        let size = serde_json::to_vec(&cm).unwrap().len();
        assert!(size < 1024 * 1024, "{name} is {size} bytes");
        gz.extend_from_slice(&cm.binary_data.unwrap()["catalog.tsv.gz"].0);
    }
    let mut tsv = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut tsv)
        .unwrap();
    assert_eq!(tsv.lines().count(), N);
    println!(
        "catalog: {} ConfigMap(s), {} compressed bytes",
        cref.config_maps.len(),
        gz.len()
    );
}
