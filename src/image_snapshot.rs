//! `sdfleet snapshot`: an EBS snapshot of a Bottlerocket data volume with container
//! images already pulled. Nodes whose FleetClass names it (`nodeClass.imagePull.snapshotID`)
//! start ComfyUI without pulling its image. The steps are those of
//! aws-samples/bottlerocket-images-cache: launch a Bottlerocket instance, pull the images
//! through SSM Run Command, stop it, snapshot its data volume (`/dev/xvdb`), terminate it.
//! Whatever fails after the launch, the instance is terminated.

use std::future::Future;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, IamInstanceProfileSpecification, InstanceStateName,
    InstanceType, ResourceType, SnapshotState, Tag, TagSpecification, VolumeType,
};
use base64::Engine;

/// Bottlerocket's data volume, where containerd keeps its images.
pub const DATA_VOLUME_DEVICE: &str = "/dev/xvdb";
/// The tag on the instance and the snapshot: the build's name.
pub const BUILD_TAG: &str = "sdfleet.io/image-snapshot";
/// User data of the build instance: the admin container runs the pulls (`apiclient exec
/// admin`). It joins no cluster: containerd runs without the kubelet.
const USER_DATA: &str = "[settings.host-containers.admin]\nenabled = true\n";

/// What to build.
#[derive(Clone, Debug)]
pub struct SnapshotRequest {
    /// The build's name: tagged on the instance and the snapshot.
    pub name: String,
    /// Image references to pull, e.g. `<account>.dkr.ecr.<region>.amazonaws.com/comfyui:1.2`.
    pub images: Vec<String>,
    /// The Bottlerocket AMI (the variant the fleet's nodes run).
    pub ami: String,
    pub instance_type: String,
    /// An instance profile whose role lets SSM manage the instance
    /// (`AmazonSSMManagedInstanceCore`) and read the registry.
    pub instance_profile: Option<String>,
    pub subnet: Option<String>,
    pub security_groups: Vec<String>,
    /// The data volume's size: the images unpacked, with room to spare.
    pub volume_gib: i32,
    /// `user:password` for the registry (for ECR: `AWS:$(aws ecr get-login-password)`).
    /// It travels in the SSM command's parameters, as in the AWS sample.
    pub registry_auth: Option<String>,
}

/// A finished build.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub snapshot_id: String,
    pub instance_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "{0:?} is not an image reference sdfleet passes to a shell (letters, digits and ._/:@- only)"
    )]
    BadImage(String),
    #[error("the registry credentials must be user:password of letters, digits and +/=._- only")]
    BadAuth,
    #[error("no images to pull")]
    NoImages,
    #[error("{step}: {message}")]
    Aws { step: &'static str, message: String },
    #[error("{step}: not done after {waited:?}")]
    Timeout {
        step: &'static str,
        waited: Duration,
    },
    #[error("pulling the images on {instance} ended {status}: {output}")]
    Pull {
        instance: String,
        status: String,
        output: String,
    },
    #[error("instance {0} has no data volume at {DATA_VOLUME_DEVICE}")]
    NoDataVolume(String),
}

fn aws<E: std::error::Error>(step: &'static str) -> impl FnOnce(E) -> SnapshotError {
    move |e| SnapshotError::Aws {
        step,
        message: aws_sdk_ec2::error::DisplayErrorContext(&e).to_string(),
    }
}

fn is_shell_safe(s: &str, extra: &str) -> bool {
    !s.is_empty()
        && s.len() <= 1024
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
}

/// The shell commands that pull `images` into containerd's `k8s.io` namespace, labelled
/// as the kubelet's own pulls are, so the kubelet counts them as present.
pub fn pull_commands(
    images: &[String],
    registry_auth: Option<&str>,
) -> Result<Vec<String>, SnapshotError> {
    if images.is_empty() {
        return Err(SnapshotError::NoImages);
    }
    if let Some(auth) = registry_auth
        && (!auth.contains(':') || !is_shell_safe(auth, "+/=._-:"))
    {
        return Err(SnapshotError::BadAuth);
    }
    let user = registry_auth
        .map(|a| format!(" --user {a}"))
        .unwrap_or_default();
    images
        .iter()
        .map(|image| {
            if !is_shell_safe(image, "._/:@-") || image.starts_with('-') {
                return Err(SnapshotError::BadImage(image.clone()));
            }
            Ok(format!(
                "apiclient exec admin sheltie ctr -a /run/containerd/containerd.sock -n k8s.io images pull --label io.cri-containerd.image=managed{user} {image}"
            ))
        })
        .collect()
}

/// Runs a build against EC2 and SSM, polling every `poll` for at most `deadline` a step.
pub struct SnapshotBuilder {
    pub ec2: aws_sdk_ec2::Client,
    pub ssm: aws_sdk_ssm::Client,
    pub poll: Duration,
    pub deadline: Duration,
}

impl SnapshotBuilder {
    pub fn new(config: &aws_config::SdkConfig) -> SnapshotBuilder {
        SnapshotBuilder {
            ec2: aws_sdk_ec2::Client::new(config),
            ssm: aws_sdk_ssm::Client::new(config),
            poll: Duration::from_secs(5),
            deadline: Duration::from_secs(30 * 60),
        }
    }

    /// The AMI an SSM public parameter names, e.g.
    /// `/aws/service/bottlerocket/aws-k8s-1.33-nvidia/x86_64/latest/image_id`.
    pub async fn ami_from_parameter(&self, parameter: &str) -> Result<String, SnapshotError> {
        let out = self
            .ssm
            .get_parameter()
            .name(parameter)
            .send()
            .await
            .map_err(aws("reading the AMI parameter"))?;
        out.parameter()
            .and_then(|p| p.value())
            .map(str::to_string)
            .ok_or_else(|| SnapshotError::Aws {
                step: "reading the AMI parameter",
                message: format!("{parameter} has no value"),
            })
    }

    /// Builds the snapshot; the instance is terminated whether or not it succeeds.
    pub async fn build(&self, req: &SnapshotRequest) -> Result<Snapshot, SnapshotError> {
        // Refused before anything is launched.
        let commands = pull_commands(&req.images, req.registry_auth.as_deref())?;
        let instance = self.launch(req).await?;
        tracing::info!(%instance, "launched the build instance");
        let built = self.pull_and_snapshot(req, &instance, commands).await;
        let terminated = self
            .ec2
            .terminate_instances()
            .instance_ids(&instance)
            .send()
            .await
            .map_err(aws("terminating the build instance"));
        let snapshot_id = built?;
        terminated?;
        tracing::info!(%instance, %snapshot_id, "terminated the build instance");
        Ok(Snapshot {
            snapshot_id,
            instance_id: instance,
        })
    }

    async fn launch(&self, req: &SnapshotRequest) -> Result<String, SnapshotError> {
        let tags = |kind: ResourceType| {
            TagSpecification::builder()
                .resource_type(kind)
                .tags(Tag::builder().key(BUILD_TAG).value(&req.name).build())
                .build()
        };
        let mut run = self
            .ec2
            .run_instances()
            .image_id(&req.ami)
            .instance_type(InstanceType::from(req.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .user_data(base64::engine::general_purpose::STANDARD.encode(USER_DATA))
            .block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(DATA_VOLUME_DEVICE)
                    .ebs(
                        EbsBlockDevice::builder()
                            .volume_size(req.volume_gib)
                            .volume_type(VolumeType::Gp3)
                            .delete_on_termination(true)
                            .build(),
                    )
                    .build(),
            )
            .tag_specifications(tags(ResourceType::Instance))
            .tag_specifications(tags(ResourceType::Volume))
            .set_subnet_id(req.subnet.clone())
            .set_security_group_ids(
                (!req.security_groups.is_empty()).then(|| req.security_groups.clone()),
            );
        if let Some(profile) = &req.instance_profile {
            run = run.iam_instance_profile(
                IamInstanceProfileSpecification::builder()
                    .name(profile)
                    .build(),
            );
        }
        let out = run
            .send()
            .await
            .map_err(aws("launching the build instance"))?;
        out.instances()
            .first()
            .and_then(|i| i.instance_id())
            .map(str::to_string)
            .ok_or_else(|| SnapshotError::Aws {
                step: "launching the build instance",
                message: "no instance in the answer".into(),
            })
    }

    async fn pull_and_snapshot(
        &self,
        req: &SnapshotRequest,
        instance: &str,
        commands: Vec<String>,
    ) -> Result<String, SnapshotError> {
        self.wait_for_state(
            instance,
            InstanceStateName::Running,
            "waiting for the instance to run",
        )
        .await?;
        // Until the SSM agent has registered, SendCommand answers InvalidInstanceId.
        let command_id = self
            .until("sending the pull command", || async {
                let sent = self
                    .ssm
                    .send_command()
                    .document_name("AWS-RunShellScript")
                    .comment(format!("sdfleet: pull images for {}", req.name))
                    .instance_ids(instance)
                    .parameters("commands", commands.clone())
                    .send()
                    .await;
                match sent {
                    Ok(out) => Ok(out
                        .command()
                        .and_then(|c| c.command_id())
                        .map(str::to_string)),
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|e| e.is_invalid_instance_id()) =>
                    {
                        Ok(None)
                    }
                    Err(e) => Err(aws("sending the pull command")(e)),
                }
            })
            .await?;
        tracing::info!(%instance, %command_id, images = req.images.len(), "pulling");
        self.until("pulling the images", || async {
            let got = self
                .ssm
                .get_command_invocation()
                .command_id(&command_id)
                .instance_id(instance)
                .send()
                .await;
            let out = match got {
                Ok(out) => out,
                // Not yet visible right after SendCommand.
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|e| e.is_invocation_does_not_exist()) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(aws("reading the pull command")(e)),
            };
            let status = out
                .status()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default();
            match status.as_str() {
                "Success" => Ok(Some(())),
                "Pending" | "InProgress" | "Delayed" | "" => Ok(None),
                _ => Err(SnapshotError::Pull {
                    instance: instance.to_string(),
                    status,
                    output: out
                        .standard_error_content()
                        .unwrap_or_default()
                        .chars()
                        .take(2000)
                        .collect(),
                }),
            }
        })
        .await?;
        // Stopped, so the snapshot holds a clean file system.
        self.ec2
            .stop_instances()
            .instance_ids(instance)
            .send()
            .await
            .map_err(aws("stopping the build instance"))?;
        self.wait_for_state(
            instance,
            InstanceStateName::Stopped,
            "waiting for the instance to stop",
        )
        .await?;
        let volume = self.data_volume(instance).await?;
        let description: String = format!(
            "sdfleet image snapshot {}: {}",
            req.name,
            req.images.join(" ")
        )
        .chars()
        .take(255)
        .collect();
        let snapshot = self
            .ec2
            .create_snapshot()
            .volume_id(&volume)
            .description(description)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Snapshot)
                    .tags(Tag::builder().key(BUILD_TAG).value(&req.name).build())
                    .build(),
            )
            .send()
            .await
            .map_err(aws("creating the snapshot"))?;
        let snapshot_id =
            snapshot
                .snapshot_id()
                .map(str::to_string)
                .ok_or_else(|| SnapshotError::Aws {
                    step: "creating the snapshot",
                    message: "no snapshot id in the answer".into(),
                })?;
        tracing::info!(%instance, %volume, %snapshot_id, "snapshotting the data volume");
        self.until("waiting for the snapshot", || async {
            let out = self
                .ec2
                .describe_snapshots()
                .snapshot_ids(&snapshot_id)
                .send()
                .await
                .map_err(aws("reading the snapshot"))?;
            match out.snapshots().first().and_then(|s| s.state()) {
                Some(SnapshotState::Completed) => Ok(Some(())),
                Some(SnapshotState::Error) => Err(SnapshotError::Aws {
                    step: "waiting for the snapshot",
                    message: format!("{snapshot_id} failed"),
                }),
                _ => Ok(None),
            }
        })
        .await?;
        Ok(snapshot_id)
    }

    async fn data_volume(&self, instance: &str) -> Result<String, SnapshotError> {
        let out = self
            .ec2
            .describe_instances()
            .instance_ids(instance)
            .send()
            .await
            .map_err(aws("reading the build instance"))?;
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .flat_map(|i| i.block_device_mappings())
            .find(|m| m.device_name() == Some(DATA_VOLUME_DEVICE))
            .and_then(|m| m.ebs()?.volume_id())
            .map(str::to_string)
            .ok_or_else(|| SnapshotError::NoDataVolume(instance.to_string()))
    }

    async fn wait_for_state(
        &self,
        instance: &str,
        want: InstanceStateName,
        step: &'static str,
    ) -> Result<(), SnapshotError> {
        self.until(step, || async {
            let out = self
                .ec2
                .describe_instances()
                .instance_ids(instance)
                .filters(
                    Filter::builder()
                        .name("instance-state-name")
                        .values(want.as_str())
                        .build(),
                )
                .send()
                .await
                .map_err(aws("reading the build instance"))?;
            let there = out.reservations().iter().any(|r| !r.instances().is_empty());
            Ok(there.then_some(()))
        })
        .await
    }

    /// Calls `f` every `poll` until it gives a value, at most `deadline`.
    async fn until<T, F, Fut>(&self, step: &'static str, mut f: F) -> Result<T, SnapshotError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>, SnapshotError>>,
    {
        let start = Instant::now();
        loop {
            if let Some(value) = f().await? {
                return Ok(value);
            }
            if start.elapsed() >= self.deadline {
                return Err(SnapshotError::Timeout {
                    step,
                    waited: start.elapsed(),
                });
            }
            tokio::time::sleep(self.poll).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_pulled_as_the_kubelet_pulls_them_and_nothing_reaches_the_shell() {
        let commands = pull_commands(
            &["111122223333.dkr.ecr.us-west-2.amazonaws.com/comfyui:1.2@sha256:abc".into()],
            Some("AWS:eyJwYXlsb2Fk+/="),
        )
        .unwrap();
        assert_eq!(
            commands,
            [
                "apiclient exec admin sheltie ctr -a /run/containerd/containerd.sock -n k8s.io images pull --label io.cri-containerd.image=managed --user AWS:eyJwYXlsb2Fk+/= 111122223333.dkr.ecr.us-west-2.amazonaws.com/comfyui:1.2@sha256:abc"
            ]
        );
        for bad in ["comfyui; rm -rf /", "comfyui:$(id)", "--help", "a b", ""] {
            assert!(
                matches!(
                    pull_commands(&[bad.into()], None),
                    Err(SnapshotError::BadImage(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            pull_commands(&["comfyui".into()], Some("AWS:x;reboot")),
            Err(SnapshotError::BadAuth)
        ));
        assert!(matches!(
            pull_commands(&[], None),
            Err(SnapshotError::NoImages)
        ));
    }
}
