//! The full catalog of a large ModelSet, gzipped into ConfigMaps beside it (the status
//! holds the first `MODELS_IN_STATUS` models). They are for users and tools
//! (`status.catalogRef` says where they are); the agents list the bucket themselves, so
//! that a node never depends on the controller to learn what to fetch.

use std::io::Write;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Resource, ResourceExt};

use crate::controller::runtime::context::Context;
use crate::controller::runtime::error::Error;
use crate::controller::runtime::resources::{FIELD_MANAGER, delete_if_present};
use crate::crd::modelset::{CatalogRef, ModelSet};
use crate::names::{CATALOG_OF_KEY, MANAGED_BY, MANAGED_BY_KEY};
use crate::sync::catalog::Catalog;

/// Models listed in the status itself; the rest go to ConfigMaps.
pub const MODELS_IN_STATUS: usize = 100;
/// Bytes of compressed catalog per ConfigMap (the object limit is 1 MiB).
const CATALOG_CHUNK: usize = 900 * 1024;
const CATALOG_KEY: &str = "catalog.tsv.gz";
const REVISION_ANNOTATION: &str = "sdfleet.io/revision";

/// Writes the full catalog into ConfigMaps when it is larger than the status holds;
/// rewrites them only when the revision changed, and removes stale ones.
pub async fn store_catalog(
    ctx: &Context,
    ms: &ModelSet,
    catalog: &Catalog,
) -> Result<Option<CatalogRef>, Error> {
    let ns = ms.namespace().unwrap_or_default();
    let name = ms.name_any();
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    // From the watch cache: a relisting whose catalog did not change sends nothing. A
    // lagging copy costs at most an idempotent apply, or a delete that finds nothing.
    let existing = ctx.caches()?.catalog_maps_of(&ns, &name);
    if catalog.objects.len() <= MODELS_IN_STATUS {
        for cm in existing {
            delete(ctx, &api, &cm.name_any()).await?;
        }
        return Ok(None);
    }
    let revision = catalog.revision();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(catalog.to_tsv().as_bytes())
        .map_err(|e| Error::Catalog(e.to_string()))?;
    let compressed = gz.finish().map_err(|e| Error::Catalog(e.to_string()))?;
    let names: Vec<String> = (0..compressed.len().div_ceil(CATALOG_CHUNK))
        .map(|i| format!("{name}-catalog-{i}"))
        .collect();
    let current = |n: &str| {
        existing.iter().any(|cm| {
            cm.name_any() == n
                && cm
                    .annotations()
                    .get(REVISION_ANNOTATION)
                    .map(String::as_str)
                    == Some(revision.as_str())
        })
    };
    let owner = ms
        .controller_owner_ref(&())
        .map(|o| vec![o])
        .unwrap_or_default();
    for (i, chunk) in compressed.chunks(CATALOG_CHUNK).enumerate() {
        if current(&names[i]) {
            continue;
        }
        let cm = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(names[i].clone()),
                namespace: Some(ns.clone()),
                owner_references: Some(owner.clone()),
                labels: Some(
                    [
                        (MANAGED_BY_KEY.to_string(), MANAGED_BY.to_string()),
                        (CATALOG_OF_KEY.to_string(), name.clone()),
                    ]
                    .into(),
                ),
                annotations: Some(
                    [
                        (REVISION_ANNOTATION.to_string(), revision.clone()),
                        (
                            "sdfleet.io/part".to_string(),
                            format!("{i}/{}", names.len()),
                        ),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            binary_data: Some(
                [(
                    CATALOG_KEY.to_string(),
                    k8s_openapi::ByteString(chunk.to_vec()),
                )]
                .into(),
            ),
            ..Default::default()
        };
        ctx.metrics.record_write("apply", "ConfigMap");
        crate::latency::waiting(api.patch(
            &names[i],
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&cm),
        ))
        .await?;
    }
    for cm in existing.iter().filter(|cm| !names.contains(&cm.name_any())) {
        delete(ctx, &api, &cm.name_any()).await?;
    }
    Ok(Some(CatalogRef {
        config_maps: names,
        format: "tsv+gzip".into(),
        objects: catalog.objects.len() as u64,
    }))
}

/// Deletes a catalog ConfigMap (one already gone, a lagging cache, is no error).
async fn delete(ctx: &Context, api: &Api<ConfigMap>, name: &str) -> Result<(), Error> {
    ctx.metrics.record_write("delete", "ConfigMap");
    Ok(delete_if_present(api, name, &DeleteParams::default()).await?)
}
