//! The node plugin of the `csi.sdfleet.io` CSI driver: ComfyUI pods get their
//! ModelSet's directory on the node's instance store as an inline CSI volume, read-only,
//! instead of a hostPath. A pod with no hostPath can run in a namespace that enforces
//! Pod Security `restricted`, and can name only its own namespace's models (see
//! `publish`).
//!
//! It serves the CSI Identity and Node services on a Unix socket; the standard
//! node-driver-registrar sidecar registers it with the kubelet. No Controller service:
//! inline volumes need none. It runs in the chart's privileged DaemonSet (a bind mount
//! must reach the host's mount namespace) with no API credentials at all.

pub mod grpc;
pub mod proto;
pub mod publish;

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    #[error("endpoint {0:?} is not unix:///path or an absolute path")]
    Endpoint(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("serving gRPC: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// The socket path of a CSI endpoint (`unix:///csi/csi.sock` or `/csi/csi.sock`).
pub fn socket_path(endpoint: &str) -> Result<PathBuf, CsiError> {
    let path = PathBuf::from(endpoint.strip_prefix("unix://").unwrap_or(endpoint));
    if !path.is_absolute() {
        return Err(CsiError::Endpoint(endpoint.to_string()));
    }
    Ok(path)
}

/// Serves the plugin on `socket` until `shutdown` resolves.
pub async fn serve(
    socket: &Path,
    plugin: grpc::NodePlugin,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), CsiError> {
    let io = |what| {
        let path = socket.to_path_buf();
        move |source| CsiError::Io { what, path, source }
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(io("creating the directory of"))?;
    }
    // A socket left by the last run (the container restarted) refuses the bind.
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io("removing the stale socket")(e));
        }
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(socket).map_err(io("listening on"))?;
    // Only root on the node (the kubelet, the registrar) talks to it.
    std::fs::set_permissions(socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(io("restricting"))?;
    let incoming = futures::stream::unfold(listener, |listener| async move {
        let next = listener.accept().await.map(|(stream, _)| stream);
        Some((next, listener))
    });
    tracing::info!(socket = %socket.display(), node = %plugin.node_id, "CSI node plugin serving");
    tonic::transport::Server::builder()
        .add_service(grpc::Service(grpc::Identity))
        .add_service(grpc::Service(plugin))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    let _ = std::fs::remove_file(socket);
    Ok(())
}
