//! `sdfleet render`: every child of the fleets in some files, as the controller with the
//! same flags applies them. Needs no cluster.

use std::path::PathBuf;

use super::ClusterArgs;
use crate::crd::{ComfyUIDeployment, FleetClass, ModelSet};
use crate::effective::{self, Refusal};
use crate::render::{RenderContext, build};

#[derive(clap::Args)]
pub struct RenderArgs {
    /// Files with ComfyUIDeployments, and the FleetClasses and ModelSets they use
    /// (repeat `-f`); e.g. `-f examples/fleetclass.yaml -f examples/sdxl.yaml`.
    #[arg(short = 'f', long = "file", required = true)]
    file: Vec<PathBuf>,
    /// The controller's flags. Without `--cluster-name`, `my-cluster`; without
    /// `--region`, `us-west-2`.
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// The children as YAML documents.
pub fn run(args: RenderArgs) -> Result<String, Box<dyn std::error::Error>> {
    let mut docs = Vec::new();
    for file in &args.file {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        docs.extend(serde_saphyr::from_multiple::<serde_json::Value>(&text)?);
    }
    let mut cluster = args.cluster.settings();
    cluster
        .cluster_name
        .get_or_insert_with(|| "my-cluster".into());
    cluster.region.get_or_insert_with(|| "us-west-2".into());
    let of_kind = |kind: &'static str| docs.iter().filter(move |d| d["kind"] == kind);
    let classes: Vec<FleetClass> = of_kind("FleetClass")
        .map(|d| serde_json::from_value(d.clone()))
        .collect::<Result<_, _>>()?;
    // ModelSets in the same files say how their fleets' models are delivered.
    let model_sets: Vec<ModelSet> = of_kind("ModelSet")
        .map(|d| serde_json::from_value(d.clone()))
        .collect::<Result<_, _>>()?;
    let mut out = String::new();
    for doc in of_kind("ComfyUIDeployment") {
        let mut cud: ComfyUIDeployment = serde_json::from_value(doc.clone())?;
        let namespace = cud
            .metadata
            .namespace
            .get_or_insert_with(|| "default".into())
            .clone();
        let name = cud.metadata.name.clone().unwrap_or_default();
        let model_set = cud.spec.model_set.as_deref().and_then(|wanted| {
            model_sets.iter().find(|ms| {
                ms.metadata.name.as_deref() == Some(wanted)
                    && ms.metadata.namespace.as_deref().unwrap_or("default") == namespace
            })
        });
        // As the controller decides it, without the namespace's labels (no cluster).
        let inputs = effective::Inputs {
            classes: &classes,
            namespace: None,
            model_set,
        };
        let decided = effective::fleet(&cud, &inputs).map_err(|e| match e {
            Refusal::NoClass(e) => format!("fleet {name}: {e} (pass the FleetClass with -f)"),
            Refusal::Forbids(e) => format!("fleet {name}: {e}"),
        })?;
        let ctx = RenderContext {
            cluster: &cluster,
            node_class: args.cluster.cloud.provider(),
            model_sync: decided.model_sync,
        };
        for child in build(&decided.fleet, &ctx)? {
            out.push_str(&format!(
                "---\n{}\n",
                serde_saphyr::to_string(&child.manifest)?.trim_end()
            ));
        }
    }
    Ok(out)
}
