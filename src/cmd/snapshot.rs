//! `sdfleet snapshot`: builds an EBS snapshot of a Bottlerocket data volume with the
//! given images already pulled (see `image_snapshot`), and prints its id.

use crate::image_snapshot::{SnapshotBuilder, SnapshotRequest};

#[derive(clap::Args)]
pub struct SnapshotArgs {
    /// Images to pull, e.g. `<account>.dkr.ecr.<region>.amazonaws.com/comfyui:1.2`.
    #[arg(required = true)]
    images: Vec<String>,
    /// The build's name (tagged `sdfleet.io/image-snapshot` on the instance and the snapshot).
    #[arg(long, default_value = "comfyui")]
    name: String,
    /// The Bottlerocket AMI, or an SSM parameter that names it: the variant the fleet's
    /// nodes run, e.g. `/aws/service/bottlerocket/aws-k8s-1.33-nvidia/x86_64/latest/image_id`.
    #[arg(long)]
    ami: String,
    /// A CPU instance is enough to pull a GPU image.
    #[arg(long, default_value = "m6i.xlarge")]
    instance_type: String,
    /// An instance profile with `AmazonSSMManagedInstanceCore` and read access to the registry.
    #[arg(long)]
    instance_profile: Option<String>,
    /// A subnet with a route to the registry (default: the default VPC's).
    #[arg(long)]
    subnet: Option<String>,
    #[arg(long)]
    security_group: Vec<String>,
    /// The data volume's size in GiB (the images unpacked, with room to spare). The
    /// FleetClass's `nodeClass.rootVolumeSize` (the size of each node's restored data
    /// volume) must be at least this.
    #[arg(long, default_value_t = 100)]
    volume_gib: i32,
    /// `user:password` for the registry; for ECR, `AWS:$(aws ecr get-login-password)`.
    #[arg(long, env = "SDFLEET_REGISTRY_AUTH", hide_env_values = true)]
    registry_auth: Option<String>,
    #[arg(long, env = "AWS_REGION")]
    region: Option<String>,
    /// Give up on a step after this many minutes.
    #[arg(long, default_value_t = 30)]
    step_timeout_minutes: u64,
}

pub fn run(args: SnapshotArgs) -> Result<String, Box<dyn std::error::Error>> {
    crate::telemetry::init_logging(false);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let config = crate::aws::sdk_config(args.region.as_deref(), None).await;
        let mut builder = SnapshotBuilder::new(&config);
        builder.deadline = std::time::Duration::from_secs(args.step_timeout_minutes * 60);
        let ami = if args.ami.starts_with('/') {
            builder.ami_from_parameter(&args.ami).await?
        } else {
            args.ami
        };
        let request = SnapshotRequest {
            name: args.name,
            images: args.images,
            ami,
            instance_type: args.instance_type,
            instance_profile: args.instance_profile,
            subnet: args.subnet,
            security_groups: args.security_group,
            volume_gib: args.volume_gib,
            registry_auth: args.registry_auth,
        };
        let built = builder.build(&request).await?;
        Ok(format!(
            "{}\n# In the FleetClass: nodeClass: {{amiAlias: bottlerocket@latest, imagePull: {{snapshotID: {}}}}}\n",
            built.snapshot_id, built.snapshot_id
        ))
    })
}
