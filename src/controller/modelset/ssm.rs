//! `sync.method: SSM`, for parity with the seed system: the controller finds the running
//! instances of the fleets' NodePools by tag, runs `sdfleet sync` on them with
//! `AWS-RunShellScript`, waits for each invocation's result and records it in
//! `status.nodes`. Unlike the seed's Lambda, failures are visible and retried.

use std::time::Duration;

use aws_sdk_ec2::types::Filter;
use aws_sdk_ssm::types::CommandInvocationStatus;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};

use crate::crd::ComfyUIDeployment;
use crate::crd::modelset::{ModelSet, NodeSync, NodeSyncState};
use crate::names::{FleetNames, MODELS_HOST_ROOT, NODEPOOL_LABEL, models_dir};

/// How long one reconcile waits for the invocations (then the next reconcile retries).
const WAIT_ATTEMPTS: usize = 30;
const WAIT_STEP: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum SsmError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
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

/// The command every instance runs.
pub fn sync_command(ms: &ModelSet, region: Option<&str>) -> String {
    let s3 = &ms.spec.source.s3;
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
    cmd
}

/// Syncs every running instance of the fleets using `ms` that is not yet at `revision`.
pub async fn sync_instances(
    client: &Client,
    ms: &ModelSet,
    revision: &str,
    region: Option<&str>,
) -> Result<(), SsmError> {
    let ns = ms.namespace().unwrap_or_default();
    let name = ms.name_any();
    let cuds: Api<ComfyUIDeployment> = Api::namespaced(client.clone(), &ns);
    let pools: Vec<String> = cuds
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|c| c.spec.model_set.as_deref() == Some(name.as_str()))
        .map(|c| FleetNames::new(&ns, &c.name_any()).nodepool())
        .collect();
    if pools.is_empty() {
        return Ok(());
    }
    let aws = crate::aws::sdk_config(region, None).await;
    let ec2 = aws_sdk_ec2::Client::new(&aws);
    let ssm = aws_sdk_ssm::Client::new(&aws);

    let described = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name(format!("tag:{NODEPOOL_LABEL}"))
                .set_values(Some(pools))
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
        .map_err(|e| SsmError::Describe(aws_sdk_ec2::error::DisplayErrorContext(&e).to_string()))?;
    let instances: Vec<String> = described
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect();
    let status = ms.status.clone().unwrap_or_default();
    let current = |id: &String| status.node(id).filter(|n| n.is_synced_at(revision));
    // Entries of instances already at the revision are re-applied as they are: this
    // field manager owns the whole set, and SSA drops what an apply leaves out (so
    // terminated instances leave the status too).
    let mut entries: Vec<NodeSync> = instances
        .iter()
        .filter_map(|id| current(id).cloned())
        .collect();
    let pending: Vec<String> = instances
        .iter()
        .filter(|id| current(id).is_none())
        .cloned()
        .collect();
    if pending.is_empty() {
        return Ok(());
    }

    let command = sync_command(ms, region);
    let sent = ssm
        .send_command()
        .document_name("AWS-RunShellScript")
        .comment(format!("sdfleet: sync ModelSet {ns}/{name} to {revision}"))
        .set_instance_ids(Some(pending.clone()))
        .parameters("commands", vec![command])
        .send()
        .await
        .map_err(|e| SsmError::Send(aws_sdk_ssm::error::DisplayErrorContext(&e).to_string()))?;
    let command_id = sent
        .command()
        .and_then(|c| c.command_id())
        .unwrap_or_default()
        .to_string();
    tracing::info!(modelset = %format!("{ns}/{name}"), %command_id, instances = pending.len(), "sent sdfleet sync through SSM");

    let api: Api<ModelSet> = Api::namespaced(client.clone(), &ns);
    let mut failures = Vec::new();
    for id in &pending {
        let (state, message) = wait_for(&ssm, &command_id, id).await;
        if state == NodeSyncState::Failed {
            failures.push(format!("{id}: {message}"));
        }
        entries.push(NodeSync {
            node: id.clone(),
            revision: revision.to_string(),
            state,
            bytes_done: 0,
            message: NodeSync::bounded(&message),
        });
    }
    let body = ModelSet::node_entries_patch(&name, &entries);
    api.patch_status(
        &name,
        &PatchParams::apply("sdfleet-ssm").force(),
        &Patch::Apply(body),
    )
    .await?;
    match failures.first() {
        Some(first) => Err(SsmError::Failed {
            failed: failures.len(),
            total: pending.len(),
            first: first.clone(),
        }),
        None => Ok(()),
    }
}

async fn wait_for(
    ssm: &aws_sdk_ssm::Client,
    command_id: &str,
    instance: &str,
) -> (NodeSyncState, String) {
    for _ in 0..WAIT_ATTEMPTS {
        match ssm
            .get_command_invocation()
            .command_id(command_id)
            .instance_id(instance)
            .send()
            .await
        {
            Ok(out) => match out.status() {
                Some(CommandInvocationStatus::Success) => {
                    return (NodeSyncState::Synced, String::new());
                }
                Some(
                    s @ (CommandInvocationStatus::Failed
                    | CommandInvocationStatus::Cancelled
                    | CommandInvocationStatus::TimedOut),
                ) => {
                    let err = out.standard_error_content().unwrap_or_default().trim();
                    return (
                        NodeSyncState::Failed,
                        format!(
                            "{}: {}",
                            s.as_str(),
                            err.chars().take(500).collect::<String>()
                        ),
                    );
                }
                _ => {}
            },
            // The invocation may not be registered yet right after SendCommand.
            Err(e) => {
                tracing::debug!(%instance, error = %aws_sdk_ssm::error::DisplayErrorContext(&e), "invocation not ready")
            }
        }
        tokio::time::sleep(WAIT_STEP).await;
    }
    (
        NodeSyncState::Failed,
        format!(
            "no result after {}s",
            WAIT_ATTEMPTS as u64 * WAIT_STEP.as_secs()
        ),
    )
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
            sync_command(&ms, Some("us-west-2")),
            "sdfleet sync --bucket 'b' --dest '/mnt/k8s-disks/0/sdfleet/models/studio/m' --prefix 'models/' --region 'us-west-2' --include 'loras/*' --delete"
        );
    }
}
