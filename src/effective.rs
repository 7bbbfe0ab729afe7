//! What a fleet becomes before it is rendered: its FleetClass resolved and checked, the
//! class's settings applied, and the delivery method of its ModelSet. The controller and
//! `sdfleet render` both call [`fleet`], so what `render` prints is what the controller
//! applies (autoscaling, which only a running controller knows, aside).

use crate::crd::modelset::SyncMethod;
use crate::crd::{ComfyUIDeployment, FleetClass, ModelSet};
use crate::policy::{self, ClassError, Namespace};

/// The fleet as it is rendered.
#[derive(Debug, Clone)]
pub struct EffectiveFleet {
    /// The fleet with its class's settings applied (node class, tenant taint, ...).
    pub fleet: ComfyUIDeployment,
    /// The class that decided.
    pub class: String,
    /// How its ModelSet's models reach the nodes.
    pub model_sync: SyncMethod,
}

/// Why a fleet is not rendered.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Refusal {
    /// No class applies to it.
    #[error(transparent)]
    NoClass(#[from] ClassError),
    /// Its class forbids what it asks.
    #[error("{0}")]
    Forbids(String),
}

/// What a fleet is decided with.
pub struct Inputs<'a> {
    /// Every FleetClass.
    pub classes: &'a [FleetClass],
    /// The fleet's namespace with its labels; `None` where nothing can read it (`sdfleet
    /// render`): class selectors are then not checked.
    pub namespace: Option<&'a Namespace>,
    /// The ModelSet `spec.modelSet` names, if it exists.
    pub model_set: Option<&'a ModelSet>,
}

/// The fleet `cud` within its class, or why it may not be.
pub fn fleet(cud: &ComfyUIDeployment, inputs: &Inputs) -> Result<EffectiveFleet, Refusal> {
    let name = cud.metadata.name.clone().unwrap_or_default();
    let namespace = cud.metadata.namespace.clone().unwrap_or_default();
    let class = policy::resolve(
        cud.spec.class_name.as_deref(),
        inputs.classes,
        inputs.namespace,
    )?;
    let class_name = class.metadata.name.clone().unwrap_or_default();
    policy::check_fleet(&cud.spec, &class_name, &class.spec, &namespace)
        .map_err(|v| Refusal::Forbids(v.to_string()))?;
    if let Some(message) = model_set_class_differs(cud, inputs, &class_name) {
        return Err(Refusal::Forbids(message));
    }
    let mut fleet = cud.clone();
    policy::apply_class(&mut fleet.spec, &class.spec, &namespace, &name);
    Ok(EffectiveFleet {
        fleet,
        class: class_name,
        model_sync: inputs
            .model_set
            .map(|ms| ms.spec.sync.method)
            .unwrap_or_default(),
    })
}

/// Why the fleet may not use its ModelSet: the two must share a class, or a fleet of a
/// narrow class could mount models a wider class let the ModelSet read. A ModelSet with
/// no class of its own is refused in its own status, not here.
fn model_set_class_differs(
    cud: &ComfyUIDeployment,
    inputs: &Inputs,
    class_name: &str,
) -> Option<String> {
    let (model_set, ms) = (cud.spec.model_set.as_ref()?, inputs.model_set?);
    let theirs = policy::resolve(
        ms.spec.class_name.as_deref(),
        inputs.classes,
        inputs.namespace,
    )
    .ok()?
    .metadata
    .name
    .clone()
    .unwrap_or_default();
    (theirs != class_name).then(|| {
        format!(
            "spec.modelSet {model_set:?} is not allowed by FleetClass {class_name}: a fleet and its ModelSet must use the same class, and ModelSet {model_set} uses {theirs}; set the same spec.className on both"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(name: &str, default: bool) -> FleetClass {
        let mut c: FleetClass = serde_json::from_value(serde_json::json!({
            "apiVersion": "sdfleet.io/v1alpha1", "kind": "FleetClass",
            "metadata": {"name": name},
            "spec": {"nodeClass": {"role": "KarpenterNodeRole-test"}}
        }))
        .unwrap();
        if default {
            c.metadata.annotations = Some(
                [(
                    "sdfleet.io/is-default-class".to_string(),
                    "true".to_string(),
                )]
                .into(),
            );
        }
        c
    }

    fn fleet_of(class: Option<&str>, model_set: Option<&str>) -> ComfyUIDeployment {
        let mut spec =
            serde_json::json!({"image": "comfyui:1", "gpu": {"instanceTypes": ["g5.xlarge"]}});
        if let Some(c) = class {
            spec["className"] = c.into();
        }
        if let Some(m) = model_set {
            spec["modelSet"] = m.into();
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
            "metadata": {"name": "sd", "namespace": "team-a"},
            "spec": spec
        }))
        .unwrap()
    }

    fn model_set(class: Option<&str>, method: &str) -> ModelSet {
        let mut spec = serde_json::json!({
            "source": {"s3": {"bucket": "models", "prefix": "sdxl/"}},
            "sync": {"method": method}
        });
        if let Some(c) = class {
            spec["className"] = c.into();
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSet",
            "metadata": {"name": "sdxl", "namespace": "team-a"},
            "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn the_default_class_decides_and_the_model_set_says_how_models_arrive() {
        let classes = [class("gpu", true), class("other", false)];
        let ms = model_set(None, "SSM");
        let inputs = Inputs {
            classes: &classes,
            namespace: None,
            model_set: Some(&ms),
        };
        let effective = fleet(&fleet_of(None, Some("sdxl")), &inputs).unwrap();
        assert_eq!(effective.class, "gpu");
        assert_eq!(effective.model_sync, SyncMethod::Ssm);
        let mut applied = fleet_of(None, Some("sdxl"));
        policy::apply_class(&mut applied.spec, &classes[0].spec, "team-a", "sd");
        assert_eq!(
            serde_json::to_value(&effective.fleet).unwrap(),
            serde_json::to_value(&applied).unwrap()
        );
    }

    #[test]
    fn a_missing_class_and_a_model_set_of_another_class_are_refused() {
        let classes = [class("gpu", true), class("other", false)];
        let none = Inputs {
            classes: &classes,
            namespace: None,
            model_set: None,
        };
        assert_eq!(
            fleet(&fleet_of(Some("gone"), None), &none).unwrap_err(),
            Refusal::NoClass(ClassError::NotFound("gone".into()))
        );
        let ms = model_set(Some("other"), "Agent");
        let inputs = Inputs {
            model_set: Some(&ms),
            ..none
        };
        let refusal = fleet(&fleet_of(Some("gpu"), Some("sdxl")), &inputs).unwrap_err();
        let Refusal::Forbids(message) = refusal else {
            panic!("not a refusal by the class: {refusal:?}")
        };
        assert!(message.contains("ModelSet sdxl uses other"), "{message}");
        // The same class on both: allowed.
        let ms = model_set(Some("gpu"), "Agent");
        let inputs = Inputs {
            model_set: Some(&ms),
            ..inputs
        };
        assert!(fleet(&fleet_of(Some("gpu"), Some("sdxl")), &inputs).is_ok());
    }
}
