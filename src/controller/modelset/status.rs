//! A ModelSet's status: the catalog and conditions the controller writes (never
//! `status.nodes`, SSM's instance entries, written apart), and the Synced condition from
//! the nodes' reports (the agents' `ModelSync` objects, or SSM's entries).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::{Resource, ResourceExt};
use serde_json::Value;

use super::catalog_maps::MODELS_IN_STATUS;
use crate::controller::runtime::conditions::{self, DesiredCondition, Reason};
use crate::controller::runtime::context::Context;
use crate::controller::runtime::error::Error;
use crate::controller::runtime::status as status_writer;
use crate::crd::modelset::{CatalogRef, ModelEntry, ModelSet, ModelSetStatus, NodeSync};
use crate::sync::catalog::{Catalog, model_type};

pub const SYNCED: &str = "Synced";
pub const KIND: &str = "ModelSet";

/// The Synced condition from the nodes' reports: the agents' (`reports`, one per live
/// node: the garbage collector removes a departed node's), else SSM's `status.nodes`.
pub fn synced_condition(status: &ModelSetStatus, reports: Option<&[NodeSync]>) -> DesiredCondition {
    let entries: Vec<&NodeSync> = reports.unwrap_or(&status.nodes).iter().collect();
    let failed = entries
        .iter()
        .find(|n| n.state == crate::crd::modelset::NodeSyncState::Failed);
    let synced = entries
        .iter()
        .filter(|n| n.is_synced_at(&status.revision))
        .count();
    let total = entries.len();
    if total == 0 {
        DesiredCondition::new(
            SYNCED,
            false,
            Reason::NoNodes,
            "no node syncs this ModelSet yet",
        )
    } else if let Some(f) = failed {
        DesiredCondition::new(
            SYNCED,
            false,
            Reason::SyncFailed,
            format!("{}: {}", f.node, f.message),
        )
    } else if synced == total {
        DesiredCondition::new(
            SYNCED,
            true,
            Reason::AllNodesSynced,
            format!("{synced}/{synced} nodes at {}", status.revision),
        )
    } else {
        DesiredCondition::new(
            SYNCED,
            false,
            Reason::Syncing,
            format!("{synced}/{total} nodes at {}", status.revision),
        )
    }
}

/// The controller's part of the status (never `nodes`, which agents own): the catalog
/// when listed, and the conditions.
fn next_status(
    previous: &ModelSetStatus,
    generation: Option<i64>,
    catalog: Option<(&Catalog, Option<CatalogRef>)>,
    conditions: &[DesiredCondition],
    reports: Option<&[NodeSync]>,
) -> ModelSetStatus {
    let mut status = previous.clone();
    status.observed_generation = generation;
    if let Some((catalog, catalog_ref)) = catalog {
        status.revision = catalog.revision();
        status.object_count = catalog.objects.len() as u64;
        status.total_bytes = catalog.total_bytes();
        status.by_type = catalog.by_type();
        status.models = catalog
            .objects
            .iter()
            .take(MODELS_IN_STATUS)
            .map(|o| ModelEntry {
                key: o.key.clone(),
                type_: model_type(&o.key).to_string(),
                size: o.size,
                etag: o.etag.clone(),
                last_modified: o.last_modified.clone(),
            })
            .collect();
        status.catalog_ref = catalog_ref;
    }
    let mut all = conditions.to_vec();
    all.push(synced_condition(&status, reports));
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    status.conditions = conditions::merge(&previous.conditions, &all, generation, &now);
    status
}

/// Merge-patches the status when it changed: without `nodes` (the agents' field), and
/// with an explicit null for a catalogRef that went away.
async fn patch(
    ctx: &Context,
    namespace: &str,
    name: &str,
    previous: &ModelSetStatus,
    next: &ModelSetStatus,
) -> Result<(), Error> {
    let cleared = next.catalog_ref.is_none();
    status_writer::patch_if_changed(
        &ctx.raw_api::<ModelSet>(namespace),
        &ctx.metrics,
        KIND,
        name,
        (previous, None),
        next,
        |body| {
            body.remove("nodes");
            if cleared {
                body.insert("catalogRef".into(), Value::Null);
            }
        },
    )
    .await?;
    Ok(())
}

pub async fn write_status(
    ctx: &Context,
    ms: &ModelSet,
    catalog: Option<(&Catalog, Option<CatalogRef>)>,
    conditions: &[DesiredCondition],
    reports: Option<&[NodeSync]>,
) -> Result<(), Error> {
    let previous = ms.status.clone().unwrap_or_default();
    let next = next_status(
        &previous,
        ms.meta().generation,
        catalog,
        conditions,
        reports,
    );
    patch(
        ctx,
        &ms.namespace().unwrap_or_default(),
        &ms.name_any(),
        &previous,
        &next,
    )
    .await
}

/// Status of an object that cannot be read as a ModelSet: its stored status is read
/// raw, so that an unchanged result writes nothing.
pub async fn write_raw_status(
    ctx: &Context,
    meta: &ObjectMeta,
    conditions: &[DesiredCondition],
) -> Result<(), Error> {
    let namespace = meta.namespace.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();
    let Some((previous, generation)) =
        status_writer::stored::<ModelSetStatus>(&ctx.raw_api::<ModelSet>(&namespace), &name)
            .await?
    else {
        return Ok(());
    };
    let next = next_status(&previous, generation, None, conditions, None);
    patch(ctx, &namespace, &name, &previous, &next).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::modelset::NodeSyncState;

    #[test]
    fn synced_counts_the_reports_not_the_status_entries() {
        let entry = |node: &str, revision: &str| NodeSync {
            node: node.into(),
            revision: revision.into(),
            state: NodeSyncState::Synced,
            bytes_done: 0,
            message: String::new(),
            command_id: None,
            hot_ready: false,
            gpu_allocatable_at: None,
            hot_recent: Vec::new(),
        };
        let status = ModelSetStatus {
            revision: "r2".into(),
            // Left from before the reports moved to ModelSync objects: not counted.
            nodes: vec![entry("n1", "r2"), entry("n-old", "r1")],
            ..Default::default()
        };
        let c = synced_condition(&status, Some(&[entry("n1", "r2")]));
        assert_eq!((c.status, c.reason), (true, Reason::AllNodesSynced));
        assert_eq!(c.message, "1/1 nodes at r2");
        let all = synced_condition(&status, None);
        assert_eq!((all.status, all.reason), (false, Reason::Syncing));
    }

    #[test]
    fn node_messages_are_bounded() {
        let long = "x".repeat(10_000);
        let cut = NodeSync::bounded(&long);
        assert_eq!(cut.chars().count(), crate::crd::modelset::NODE_MESSAGE_MAX);
        assert!(cut.ends_with('…'));
        assert_eq!(NodeSync::bounded("short"), "short");
    }
}
