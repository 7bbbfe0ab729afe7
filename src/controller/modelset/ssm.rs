//! `sync.method: SSM`, for parity with the seed system: the controller finds the running
//! instances of the fleets' NodePools in this cluster by tag, runs `sdfleet sync` on them
//! with `AWS-RunShellScript` (in batches of at most 50, SSM's limit per command), and
//! records each instance in `status.nodes`: Syncing with its command id while the
//! invocation runs, then Synced or Failed from the invocation's result. Each reconcile
//! polls the commands in flight instead of sending again; a failed instance is sent
//! again (with backoff). Unlike the seed's Lambda, failures are visible and retried.
//!
//! What a node needs (nothing is installed on it): the SSM agent (in EKS AMIs), an
//! instance role with `AmazonSSMManagedInstanceCore` and read access to the bucket, and
//! `sdfleet` on its PATH (bake it into the AMI). The agent DaemonSet and the startup
//! taint are not rendered for such a fleet.

use aws_sdk_ec2::types::Filter;
use aws_sdk_ssm::types::CommandInvocationStatus;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};

use crate::crd::ComfyUIDeployment;
use crate::crd::modelset::{ModelSet, NodeSync, NodeSyncState};
use crate::names::{FleetNames, MODELS_HOST_ROOT, NODEPOOL_LABEL, models_dir};

/// SSM's limit of instance ids per SendCommand.
pub const BATCH: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum SsmError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(
        "the SSM method needs the controller's --cluster-name, to find only this cluster's instances"
    )]
    NoClusterName,
    #[error("the SSM method needs source.s3: instances sync from a bucket")]
    NoBucket,
    #[error("EC2 DescribeInstances: {0}")]
    Describe(String),
    #[error("SSM SendCommand: {0}")]
    Send(String),
    #[error("sync failed on {failed} of {total} instances; first: {first}")]
    Failed {
        failed: usize,
        total: usize,
        first: String,
    },
}

/// POSIX single-quoting, so no key, bucket or path is ever interpreted by the shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The command every instance runs, or `None` for a ModelSet with no bucket (the CRD
/// refuses SSM without one).
pub fn sync_command(ms: &ModelSet, region: Option<&str>) -> Option<String> {
    let s3 = ms.spec.source.s3.as_ref()?;
    let ns = ms.namespace().unwrap_or_default();
    let dest = models_dir(std::path::Path::new(MODELS_HOST_ROOT), &ns, &ms.name_any());
    let dest = dest.to_string_lossy();
    let mut cmd = format!(
        "sdfleet sync --bucket {} --dest {}",
        shell_quote(&s3.bucket),
        shell_quote(&dest)
    );
    if !s3.prefix.is_empty() {
        cmd.push_str(&format!(" --prefix {}", shell_quote(&s3.prefix)));
    }
    if let Some(r) = region {
        cmd.push_str(&format!(" --region {}", shell_quote(r)));
    }
    if let Some(e) = s3.endpoint.as_deref().filter(|e| !e.is_empty()) {
        cmd.push_str(&format!(" --endpoint {}", shell_quote(e)));
    }
    for g in &ms.spec.include {
        cmd.push_str(&format!(" --include {}", shell_quote(g)));
    }
    for g in &ms.spec.exclude {
        cmd.push_str(&format!(" --exclude {}", shell_quote(g)));
    }
    if ms.spec.sync.delete_removed {
        cmd.push_str(" --delete");
    }
    Some(cmd)
}

/// Brings every running instance of the fleets using `ms` to `revision`: polls the
/// commands in flight, sends to the rest. Returns true while invocations still run.
pub async fn sync_instances(
    client: &Client,
    ms: &ModelSet,
    revision: &str,
    cluster: Option<&str>,
    region: Option<&str>,
) -> Result<bool, SsmError> {
    let ns = ms.namespace().unwrap_or_default();
    let name = ms.name_any();
    let cuds: Api<ComfyUIDeployment> = Api::namespaced(client.clone(), &ns);
    let pools: Vec<String> = crate::latency::waiting(cuds.list(&ListParams::default()))
        .await?
        .items
        .iter()
        .filter(|c| c.spec.model_set.as_deref() == Some(name.as_str()))
        .map(|c| FleetNames::new(&ns, &c.name_any()).nodepool())
        .collect();
    if pools.is_empty() {
        return Ok(false);
    }
    let cluster = cluster.ok_or(SsmError::NoClusterName)?;
    let aws = crate::aws::sdk_config(region, None).await;
    let ec2 = aws_sdk_ec2::Client::new(&aws);
    let ssm = aws_sdk_ssm::Client::new(&aws);
    let instances = running_instances(&ec2, cluster, pools).await?;

    let status = ms.status.clone().unwrap_or_default();
    // Every instance's entry is applied each time: this field manager owns the whole set,
    // and SSA drops what an apply leaves out (so terminated instances leave the status).
    let mut entries = Vec::new();
    let mut pending = Vec::new();
    for id in &instances {
        match status.node(id) {
            Some(e) if e.is_synced_at(revision) => entries.push(e.clone()),
            Some(e) if e.state == NodeSyncState::Syncing && e.revision == revision => {
                match e.command_id.as_deref() {
                    Some(command) => entries.push(poll(&ssm, command, e).await),
                    None => pending.push(id.clone()),
                }
            }
            _ => pending.push(id.clone()),
        }
    }
    let command = sync_command(ms, region).ok_or(SsmError::NoBucket)?;
    for batch in pending.chunks(BATCH) {
        let sent = ssm
            .send_command()
            .document_name("AWS-RunShellScript")
            .comment(format!("sdfleet: sync ModelSet {ns}/{name} to {revision}"))
            .set_instance_ids(Some(batch.to_vec()))
            .parameters("commands", vec![command.clone()])
            .send()
            .await
            .map_err(|e| SsmError::Send(aws_sdk_ssm::error::DisplayErrorContext(&e).to_string()))?;
        let command_id = sent
            .command()
            .and_then(|c| c.command_id())
            .unwrap_or_default()
            .to_string();
        tracing::info!(modelset = %format!("{ns}/{name}"), %command_id, instances = batch.len(), "sent sdfleet sync through SSM");
        entries.extend(batch.iter().map(|id| NodeSync {
            node: id.clone(),
            revision: revision.to_string(),
            state: NodeSyncState::Syncing,
            bytes_done: 0,
            message: String::new(),
            command_id: Some(command_id.clone()),
            hot_ready: false,
            gpu_allocatable_at: None,
            hot_recent: Vec::new(),
        }));
    }
    let api: Api<ModelSet> = Api::namespaced(client.clone(), &ns);
    crate::latency::waiting(api.patch_status(
        &name,
        &PatchParams::apply("sdfleet-ssm").force(),
        &Patch::Apply(ModelSet::node_entries_patch(&name, &entries)),
    ))
    .await?;
    let failed: Vec<&NodeSync> = entries
        .iter()
        .filter(|e| e.state == NodeSyncState::Failed)
        .collect();
    if let Some(first) = failed.first() {
        return Err(SsmError::Failed {
            failed: failed.len(),
            total: entries.len(),
            first: format!("{}: {}", first.node, first.message),
        });
    }
    Ok(entries.iter().any(|e| e.state == NodeSyncState::Syncing))
}

/// The running instances of `pools` in `cluster` (Karpenter tags its instances with both).
async fn running_instances(
    ec2: &aws_sdk_ec2::Client,
    cluster: &str,
    pools: Vec<String>,
) -> Result<Vec<String>, SsmError> {
    let filter = |name: String, values: Vec<String>| {
        Filter::builder()
            .name(name)
            .set_values(Some(values))
            .build()
    };
    let mut pages = ec2
        .describe_instances()
        .filters(filter(format!("tag:{NODEPOOL_LABEL}"), pools))
        .filters(filter(
            format!("tag:kubernetes.io/cluster/{cluster}"),
            vec!["owned".into()],
        ))
        .filters(filter("instance-state-name".into(), vec!["running".into()]))
        .into_paginator()
        .send();
    let mut instances = Vec::new();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| {
            SsmError::Describe(aws_sdk_ec2::error::DisplayErrorContext(&e).to_string())
        })?;
        instances.extend(
            page.reservations()
                .iter()
                .flat_map(|r| r.instances())
                .filter_map(|i| i.instance_id().map(str::to_string)),
        );
    }
    instances.sort();
    Ok(instances)
}

/// The entry of an instance whose invocation of `command` was in flight, from its result
/// now (unchanged while it still runs or is not registered yet).
async fn poll(ssm: &aws_sdk_ssm::Client, command: &str, entry: &NodeSync) -> NodeSync {
    let mut next = entry.clone();
    match ssm
        .get_command_invocation()
        .command_id(command)
        .instance_id(&entry.node)
        .send()
        .await
    {
        Ok(out) => match out.status() {
            Some(CommandInvocationStatus::Success) => {
                next.state = NodeSyncState::Synced;
                next.command_id = None;
            }
            Some(
                s @ (CommandInvocationStatus::Failed
                | CommandInvocationStatus::Cancelled
                | CommandInvocationStatus::TimedOut),
            ) => {
                let err = out.standard_error_content().unwrap_or_default().trim();
                next.state = NodeSyncState::Failed;
                next.message = NodeSync::bounded(&format!("{}: {err}", s.as_str()));
                next.command_id = None;
            }
            _ => {}
        },
        // Not registered yet right after SendCommand: still in flight.
        Err(e) => {
            tracing::debug!(instance = %entry.node, error = %aws_sdk_ssm::error::DisplayErrorContext(&e), "invocation not ready")
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_command_quotes_everything() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        let ms: ModelSet = serde_json::from_value(json!({
            "apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSet", "metadata": {"name": "m", "namespace": "studio"},
            "spec": {"source": {"s3": {"bucket": "b", "prefix": "models/"}}, "include": ["loras/*"]}
        }))
        .unwrap();
        assert_eq!(
            sync_command(&ms, Some("us-west-2")).unwrap(),
            "sdfleet sync --bucket 'b' --dest '/mnt/k8s-disks/0/sdfleet/models/studio/m' --prefix 'models/' --region 'us-west-2' --include 'loras/*' --delete"
        );
    }
}
