//! How every watch of this crate is configured (the controller's caches, the node agent,
//! the gateway).
//!
//! kube-rs ends a watch after 290 s unless told otherwise, and each restart is a new
//! request: the controller's two dozen watches made about five a minute at rest, the
//! whole of its steady traffic. A watch here lasts nine minutes, inside client-go's 5-10
//! minute range for its reflectors. The apiserver sends a bookmark about every minute,
//! so a live watch never looks idle; the cost is that a silently dropped connection is
//! noticed after nine minutes instead of five (kube-rs waits the timeout plus 5 s).

use kube::runtime::watcher;

/// How long one watch request lasts before the watcher starts the next.
pub const TIMEOUT_SECONDS: u32 = 540;

/// The watcher settings every watch starts from.
pub fn config() -> watcher::Config {
    watcher::Config::default().timeout(TIMEOUT_SECONDS)
}

/// The watch of the one object named `name` (a field selector: RBAC may grant only it).
pub fn named(name: &str) -> watcher::Config {
    config().fields(&format!("metadata.name={name}"))
}
