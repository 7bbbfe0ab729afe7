//! One check of a spec against its class: the refusal it makes names the class, the
//! field, the value and the rule.

use super::Violation;
use super::patterns::*;
use crate::crd::fleetclass::S3Policy;

pub(super) struct Check<'a> {
    pub(super) class: &'a str,
    pub(super) namespace: &'a str,
}

impl Check<'_> {
    pub(super) fn deny(&self, field: &str, value: &str, rule: impl Into<String>) -> Violation {
        Violation {
            class: self.class.to_string(),
            field: field.to_string(),
            value: value.to_string(),
            rule: rule.into(),
        }
    }

    /// A bucket and key prefix against the class's locations.
    pub(super) fn location(
        &self,
        s3: &S3Policy,
        field: &str,
        bucket: &str,
        prefix: &str,
    ) -> Result<(), Violation> {
        if location_allowed(&s3.allowed_buckets, self.namespace, bucket, prefix) {
            return Ok(());
        }
        let allowed: Vec<String> = s3
            .allowed_buckets
            .iter()
            .map(|p| for_namespace(p, self.namespace))
            .collect();
        Err(self.deny(
            field,
            &format!("{bucket}/{prefix}"),
            format!(
                "allowed buckets and folders for namespace {} are {allowed:?}",
                self.namespace
            ),
        ))
    }

    pub(super) fn url(
        &self,
        patterns: &[String],
        field: &str,
        value: &str,
        what: &str,
    ) -> Result<(), Violation> {
        match url_allowed(patterns, value) {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.deny(field, value, format!("allowed {what} are {patterns:?}"))),
            Err(why) => Err(self.deny(field, value, why)),
        }
    }
}
