//! What the gateway learns from the cluster: each fleet's pods (the EndpointSlices of
//! its Service, as kube-proxy sees them) and its ModelSet catalog (for the model check).

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, reflector};
use kube::{Api, Client};

use crate::crd::ModelSync;
use crate::crd::modelset::ModelSet;

use super::engine::{Endpoint, Engine};
use super::pod_models::{HotSet, PodModels};
use super::workflow::{ModelRef, missing_models};

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Pods of one fleet from its Service's EndpointSlices: ready and not terminating ones
/// may get new jobs; a pod that left every slice gives its jobs back.
pub fn endpoints(slices: &[Arc<EndpointSlice>], port_name: &str) -> Vec<Endpoint> {
    let mut out: Vec<Endpoint> = Vec::new();
    for slice in slices {
        let port = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(port_name))
            .or_else(|| slice.ports.iter().flatten().next())
            .and_then(|p| p.port);
        let Some(port) = port else { continue };
        for ep in &slice.endpoints {
            let Some(address) = ep.addresses.first() else {
                continue;
            };
            let host = if address.contains(':') {
                format!("[{address}]")
            } else {
                address.clone()
            };
            let name = ep
                .target_ref
                .as_ref()
                .and_then(|r| r.name.clone())
                .unwrap_or_else(|| format!("{host}:{port}"));
            let cond = ep.conditions.as_ref();
            let ready = cond.and_then(|c| c.ready).unwrap_or(true)
                && !cond.and_then(|c| c.terminating).unwrap_or(false);
            if out.iter().any(|e| e.name == name) {
                continue;
            }
            out.push(Endpoint {
                name,
                url: format!("http://{host}:{port}"),
                ready,
                node: ep.node_name.clone(),
                models: PodModels::All,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Where to reach an endpoint instead of its address (tests: fake pods on loopback).
#[derive(Default)]
pub struct EndpointMap {
    /// `IP:PORT` → `HOST:PORT`.
    pub fixed: HashMap<String, String>,
    /// Lines `IP:PORT=HOST:PORT` or `POD=HOST:PORT`, read at each look.
    pub file: Option<std::path::PathBuf>,
}

impl EndpointMap {
    fn apply(&self, eps: &mut [Endpoint]) {
        let from_file: HashMap<String, String> = self
            .file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .map(|text| {
                text.lines()
                    .filter_map(|l| l.trim().split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        for ep in eps {
            let address = ep.url.trim_start_matches("http://").to_string();
            let to = self
                .fixed
                .get(&address)
                .or_else(|| from_file.get(&address))
                .or_else(|| from_file.get(&ep.name));
            if let Some(to) = to {
                ep.url = format!("http://{to}");
            }
        }
    }
}

/// The fleet a gateway serves, as discovery follows it.
pub struct WatchedFleet {
    pub name: String,
    pub service: String,
    /// Its ModelSet: the nodes' reports then say what each pod's node holds.
    pub model_set: Option<String>,
}

/// Keeps the engine's pods of `fleet` in step with its Service's EndpointSlices, and,
/// for a fleet with a ModelSet, with what their nodes hold (the agents' reports).
pub async fn watch_pods(
    client: Client,
    namespace: String,
    fleet: WatchedFleet,
    engine: Arc<Engine>,
    address_map: Arc<EndpointMap>,
    catalogs: Arc<Catalogs>,
) {
    let WatchedFleet {
        name: fleet,
        service,
        model_set,
    } = fleet;
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &namespace);
    let config = crate::watch::config().labels(&format!("{SERVICE_NAME_LABEL}={service}"));
    let (reader, writer) = reflector::store();
    let mut stream = reflector(writer, watcher::watcher(api, config))
        .default_backoff()
        .boxed();
    let (reports, reports_writer) = reflector::store::<ModelSync>();
    let mut report_stream = match &model_set {
        Some(_) => reflector(
            reports_writer,
            watcher::watcher(
                Api::<ModelSync>::namespaced(client, &namespace),
                crate::watch::config(),
            ),
        )
        .default_backoff()
        .boxed(),
        None => futures::stream::pending().boxed(),
    };
    let mut listed = false;
    // With a ModelSet, no pod is taken in before the reports are listed and the catalog
    // (with the hot models) is read: a pod on a hot-only node must never look whole.
    let mut reports_listed = model_set.is_none();
    let mut catalog_changes = catalogs.subscribe();
    let mut reread = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        let event = tokio::select! {
            event = stream.next() => match event {
                Some(event) => Some(event),
                None => return,
            },
            report = report_stream.next() => {
                match report {
                    Some(Err(e)) => tracing::warn!(%fleet, error = %e, "ModelSync watch"),
                    Some(Ok(Event::InitDone)) => reports_listed = true,
                    _ => {}
                }
                None
            }
            // The ModelSet's catalog (its hot models) can change while the slices do not.
            Ok(()) = catalog_changes.changed(), if model_set.is_some() => None,
            // So can a mapping file.
            _ = reread.tick(), if address_map.file.is_some() => None,
        };
        match event {
            Some(Ok(Event::Init | Event::InitApply(_))) => continue,
            Some(Err(e)) => {
                tracing::warn!(%fleet, error = %e, "EndpointSlice watch");
                continue;
            }
            Some(Ok(_)) => listed = true,
            None => {}
        }
        if !listed || !reports_listed {
            continue;
        }
        let mut eps = endpoints(&reader.state(), "http");
        address_map.apply(&mut eps);
        if let Some(model_set) = &model_set {
            let Some(catalog) = catalogs.get(&fleet) else {
                continue;
            };
            let reports = reports.state();
            for ep in &mut eps {
                ep.models = PodModels::of_node(
                    ep.node.as_deref(),
                    model_set,
                    &reports,
                    catalog.hot.as_ref(),
                );
            }
        }
        engine.sync_pods(&fleet, eps)
    }
}

/// A fleet's ModelSet catalog, as the gateway last read it.
#[derive(Clone, Debug, Default)]
pub struct FleetCatalog {
    pub model_set: String,
    pub ready: bool,
    pub revision: String,
    pub keys: BTreeSet<String>,
    /// The ModelSet's hot models (`spec.hot`), if it names any.
    pub hot: Option<HotSet>,
}

pub struct Catalogs {
    map: RwLock<HashMap<String, FleetCatalog>>,
    /// Counts `set`s: pod discovery applies a new catalog (its hot models) at once.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for Catalogs {
    fn default() -> Self {
        Catalogs {
            map: RwLock::default(),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Catalogs {
    pub fn get(&self, fleet: &str) -> Option<FleetCatalog> {
        self.map.read().ok()?.get(fleet).cloned()
    }

    pub fn set(&self, fleet: &str, catalog: FleetCatalog) {
        if let Ok(mut map) = self.map.write() {
            map.insert(fleet.to_string(), catalog);
        }
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Wakes on every `set` after this call.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The refs the fleet's catalog lacks; `None` while a fleet with a ModelSet has no
    /// catalog loaded. A fleet without a ModelSet is not checked.
    pub fn missing(
        &self,
        fleet: &str,
        has_model_set: bool,
        refs: &[ModelRef],
    ) -> Option<Vec<ModelRef>> {
        if !has_model_set {
            return Some(vec![]);
        }
        let map = self.map.read().ok()?;
        let catalog = map.get(fleet)?;
        Some(missing_models(refs, |k| catalog.keys.contains(k)))
    }
}

/// Keeps `catalogs[fleet]` in step with the ModelSet's status (and its catalog
/// ConfigMaps when the catalog is larger than the status holds).
pub async fn watch_catalog(
    client: Client,
    namespace: String,
    fleet: String,
    model_set: String,
    catalogs: Arc<Catalogs>,
) {
    let api: Api<ModelSet> = Api::namespaced(client.clone(), &namespace);
    let maps: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let config = crate::watch::named(&model_set);
    let mut stream = watcher::watcher(api, config)
        .default_backoff()
        .applied_objects()
        .boxed();
    while let Some(event) = stream.next().await {
        let ms = match event {
            Ok(ms) => ms,
            Err(e) => {
                tracing::warn!(%fleet, error = %e, "ModelSet watch");
                continue;
            }
        };
        let Some(status) = ms.status else { continue };
        let mut keys: BTreeSet<String> = status.models.iter().map(|m| m.key.clone()).collect();
        if let Some(reference) = &status.catalog_ref {
            match read_catalog_maps(&maps, &reference.config_maps).await {
                Ok(all) => keys = all,
                Err(e) => {
                    tracing::warn!(%fleet, error = %e, "cannot read the catalog ConfigMaps");
                    continue;
                }
            }
        }
        let ready = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        catalogs.set(
            &fleet,
            FleetCatalog {
                model_set: model_set.clone(),
                ready,
                revision: status.revision.clone(),
                keys,
                // Globs that do not compile: none (the ModelSet's status says so, and
                // its agents never report hot-ready either).
                hot: (!ms.spec.hot.is_empty())
                    .then(|| HotSet::new(&ms.spec.hot, &[]).ok())
                    .flatten(),
            },
        );
    }
}

async fn read_catalog_maps(
    api: &Api<ConfigMap>,
    names: &[String],
) -> Result<BTreeSet<String>, String> {
    let mut gz = Vec::new();
    for name in names {
        let cm = api.get(name).await.map_err(|e| format!("{name}: {e}"))?;
        let chunk = cm
            .binary_data
            .as_ref()
            .and_then(|d| d.get("catalog.tsv.gz"))
            .ok_or_else(|| format!("{name}: no catalog.tsv.gz"))?;
        gz.extend_from_slice(&chunk.0);
    }
    let mut tsv = String::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .read_to_string(&mut tsv)
        .map_err(|e| e.to_string())?;
    Ok(tsv
        .lines()
        .filter_map(|l| l.split('\t').next())
        .filter(|k| !k.is_empty())
        .map(str::to_string)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn endpoints_by_pod_with_readiness() {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "sdxl-abc"},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8188}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": "sdxl-1"}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}, "targetRef": {"kind": "Pod", "name": "sdxl-2"}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": true, "terminating": true}, "targetRef": {"kind": "Pod", "name": "sdxl-3"}},
            ],
        }))
        .unwrap();
        let eps = endpoints(&[Arc::new(slice)], "http");
        let got: Vec<_> = eps
            .iter()
            .map(|e| (e.name.as_str(), e.url.as_str(), e.ready))
            .collect();
        assert_eq!(
            got,
            [
                ("sdxl-1", "http://10.0.0.1:8188", true),
                ("sdxl-2", "http://10.0.0.2:8188", false),
                ("sdxl-3", "http://10.0.0.3:8188", false),
            ]
        );
    }
}
