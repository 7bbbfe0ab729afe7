//! The one error type of both reconcilers (it names none of them). Each variant has a reason: the metric label
//! of `sdfleet_reconcile_errors_total` and, where it reaches status, the condition reason.

use super::resources::ApplyError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Apply(#[from] ApplyError),
    #[error("{}", super::resources::said(.0))]
    Kube(#[from] kube::Error),
    #[error("missing dependencies: {0}")]
    MissingDependency(String),
    #[error("{0}")]
    Class(String),
    #[error("listing the bucket: {0}")]
    List(String),
    #[error("writing the catalog: {0}")]
    Catalog(String),
    #[error("SSM sync: {0}")]
    Ssm(String),
    #[error("{0}")]
    CacheNotReady(#[from] super::cache::NotListed),
}

impl Error {
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Apply(ApplyError::NameConflict { .. }) => "NameConflict",
            Error::Apply(_) => "ApplyFailed",
            Error::Kube(_) => "KubeError",
            Error::MissingDependency(_) => "MissingDependency",
            Error::Class(_) => "FleetClassNotFound",
            Error::List(_) => "ListFailed",
            Error::Catalog(_) => "CatalogFailed",
            Error::Ssm(_) => "SsmSyncFailed",
            Error::CacheNotReady(_) => "CacheNotReady",
        }
    }
}
