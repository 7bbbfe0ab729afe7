//! The FleetClass decides; a fleet or ModelSet asks. Pure: which class applies to a
//! namespace, and whether a spec stays within it. A refusal names the field, the value
//! and the rule, and nothing is applied (or, for a ModelSet, listed) for it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::crd::FleetClass;
use crate::crd::fleetclass::FleetClassSpec;

mod check;
mod fleet;
mod modelset;
mod patterns;

pub use fleet::{apply_class, check_fleet};
pub use modelset::{ModelSetRefusal, admit_modelset, check_modelset};
pub use patterns::{host_allowed, location_allowed, url_allowed};

/// Why no class applies.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ClassError {
    #[error("FleetClass {0} does not exist")]
    NotFound(String),
    #[error(
        "no FleetClass is annotated sdfleet.io/is-default-class: \"true\", and spec.className is not set: ask a platform admin for a class"
    )]
    NoDefault,
    #[error("several FleetClasses are marked default ({0}); an admin must keep one")]
    SeveralDefaults(String),
    #[error(
        "FleetClass {class} is not for namespace {namespace} (its spec.namespaceSelector does not select it): name a class of this namespace in spec.className, or ask a platform admin"
    )]
    NotForNamespace { class: String, namespace: String },
}

/// A spec that asks for more than its class allows.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{field} {value:?} is not allowed by FleetClass {class}: {rule}")]
pub struct Violation {
    pub class: String,
    pub field: String,
    pub value: String,
    pub rule: String,
}

/// The namespace a fleet or ModelSet lives in, as a class's selector sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// The class named `name`, or the default one, if it admits `namespace` (`None`: not
/// checked, for `sdfleet render`, which has no cluster to read a namespace from).
pub fn resolve<'a>(
    name: Option<&str>,
    classes: &'a [FleetClass],
    namespace: Option<&Namespace>,
) -> Result<&'a FleetClass, ClassError> {
    let class = named_or_default(name, classes)?;
    match namespace {
        Some(ns) if !admits(&class.spec, ns) => Err(ClassError::NotForNamespace {
            class: class.metadata.name.clone().unwrap_or_default(),
            namespace: ns.name.clone(),
        }),
        _ => Ok(class),
    }
}

fn named_or_default<'a>(
    name: Option<&str>,
    classes: &'a [FleetClass],
) -> Result<&'a FleetClass, ClassError> {
    if let Some(name) = name {
        return classes
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
            .ok_or_else(|| ClassError::NotFound(name.to_string()));
    }
    let defaults: Vec<&FleetClass> = classes.iter().filter(|c| c.is_default()).collect();
    match defaults.as_slice() {
        [one] => Ok(one),
        [] => Err(ClassError::NoDefault),
        many => Err(ClassError::SeveralDefaults(
            many.iter()
                .filter_map(|c| c.metadata.name.clone())
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

/// Whether the class is for `namespace` (no selector: every namespace).
pub fn admits(class: &FleetClassSpec, namespace: &Namespace) -> bool {
    class
        .namespace_selector
        .as_ref()
        .is_none_or(|s| selects(s, &namespace.labels))
}

/// A label selector's meaning, as the apiserver's: every `matchLabels` pair and every
/// expression must hold; an unknown operator selects nothing.
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let pairs = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    pairs && expressions
}

/// Whether an object that names `class_name` (or none) follows `class`: what a change of
/// the class must reconcile again.
pub fn follows(class_name: Option<&str>, class: &FleetClass) -> bool {
    match class_name {
        Some(name) => class.metadata.name.as_deref() == Some(name),
        None => class.is_default(),
    }
}

#[cfg(test)]
mod tests;
