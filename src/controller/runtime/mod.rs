//! What both reconcilers run on, and none of them: the context every reconcile shares
//! (`context`), the watch caches (`cache`), apply and prune of a fleet's children
//! (`resources`), status writes (`status`), condition reasons (`conditions`), finalizers
//! and the one error type. Nothing here names a reconciler (`tests/layers.rs` checks it).

pub mod cache;
pub mod conditions;
pub mod context;
pub mod error;
pub mod finalizer;
pub mod resources;
pub mod status;
