//! The Identity and Node services as gRPC handlers (tonic, prost messages from
//! `proto`), routed by method path.

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http;
use futures::future::BoxFuture;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

use super::proto::*;
use super::publish::{self, DRIVER_NAME, PublishError};

/// One unary call: decode `Req`, run the handler, encode its `Resp` or status.
async fn unary<Req, Resp, F, Fut>(request: http::Request<Body>, handler: F) -> http::Response<Body>
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
    F: FnOnce(Req) -> Fut + Send + 'static,
    Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
{
    let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<Resp, Req>::default());
    grpc.unary(
        Handler {
            handler: Some(handler),
            types: PhantomData,
        },
        request,
    )
    .await
}

struct Handler<F, Req, Resp> {
    handler: Option<F>,
    types: PhantomData<fn(Req) -> Resp>,
}

impl<F, Fut, Req, Resp> tonic::server::UnaryService<Req> for Handler<F, Req, Resp>
where
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
    Resp: Send + 'static,
{
    type Response = Resp;
    type Future = BoxFuture<'static, Result<tonic::Response<Resp>, Status>>;

    fn call(&mut self, request: tonic::Request<Req>) -> Self::Future {
        match self.handler.take() {
            Some(handler) => {
                let answer = handler(request.into_inner());
                Box::pin(async move { answer.await.map(tonic::Response::new) })
            }
            None => Box::pin(async { Err(Status::internal("one call per request")) }),
        }
    }
}

fn unimplemented(method: &str) -> http::Response<Body> {
    Status::unimplemented(format!("{method} is not implemented by {DRIVER_NAME}")).into_http()
}

type Answer = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

/// The methods of one CSI service, answered by name.
pub trait Methods: NamedService + Clone + Send + Sync + 'static {
    fn answer(self, method: String, request: http::Request<Body>) -> Answer;
}

/// A CSI service as tonic's router takes it: the call's method, from its path
/// (`/csi.v1.Node/NodePublishVolume`), to `Methods::answer`.
#[derive(Clone)]
pub struct Service<M>(pub M);

impl<M: Methods> NamedService for Service<M> {
    const NAME: &'static str = M::NAME;
}

impl<M: Methods> tower::Service<http::Request<Body>> for Service<M> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Answer {
        let path = request.uri().path();
        let method = path
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(M::NAME))
            .and_then(|p| p.strip_prefix('/'))
            .unwrap_or(path)
            .to_string();
        self.0.clone().answer(method, request)
    }
}

/// `csi.v1.Identity`: the driver's name and that it is ready.
#[derive(Clone)]
pub struct Identity;

impl NamedService for Identity {
    const NAME: &'static str = IDENTITY_SERVICE;
}

impl Methods for Identity {
    fn answer(self, method: String, request: http::Request<Body>) -> Answer {
        Box::pin(async move {
            Ok(match method.as_str() {
                "GetPluginInfo" => {
                    unary(request, |_: GetPluginInfoRequest| async {
                        Ok(GetPluginInfoResponse {
                            name: DRIVER_NAME.into(),
                            vendor_version: env!("CARGO_PKG_VERSION").into(),
                            manifest: Default::default(),
                        })
                    })
                    .await
                }
                "GetPluginCapabilities" => {
                    unary(request, |_: GetPluginCapabilitiesRequest| async {
                        Ok(GetPluginCapabilitiesResponse {})
                    })
                    .await
                }
                "Probe" => {
                    unary(request, |_: ProbeRequest| async {
                        Ok(ProbeResponse { ready: Some(true) })
                    })
                    .await
                }
                _ => unimplemented(&method),
            })
        })
    }
}

/// `csi.v1.Node`: publishes a pod's models directory.
#[derive(Clone)]
pub struct NodePlugin {
    pub node_id: String,
    /// The models root on the node, as this process sees it.
    pub models_root: Arc<PathBuf>,
}

impl NamedService for NodePlugin {
    const NAME: &'static str = NODE_SERVICE;
}

fn status(error: PublishError) -> Status {
    Status::new(error.code(), error.to_string())
}

/// Runs a mount operation off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, PublishError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(status)
}

impl Methods for NodePlugin {
    fn answer(self, method: String, request: http::Request<Body>) -> Answer {
        let plugin = self;
        Box::pin(async move {
            Ok(match method.as_str() {
                "NodeGetInfo" => {
                    unary(request, move |_: NodeGetInfoRequest| async move {
                        Ok(NodeGetInfoResponse {
                            node_id: plugin.node_id,
                            max_volumes_per_node: 0,
                        })
                    })
                    .await
                }
                "NodeGetCapabilities" => {
                    unary(request, |_: NodeGetCapabilitiesRequest| async {
                        Ok(NodeGetCapabilitiesResponse {})
                    })
                    .await
                }
                "NodePublishVolume" => {
                    unary(request, move |r: NodePublishVolumeRequest| async move {
                        let root = plugin.models_root.clone();
                        let plan = publish::plan(&root, &r).map_err(|e| {
                            tracing::warn!(volume = %r.volume_id, error = %e, "publish refused");
                            status(e)
                        })?;
                        let pod = plan.pod.clone();
                        let source = plan.source.clone();
                        match blocking(move || publish::publish(&root, &plan)).await {
                            Ok(()) => {
                                tracing::info!(%pod, source = %source.display(), target = %r.target_path, "models published read-only");
                                Ok(NodePublishVolumeResponse {})
                            }
                            Err(e) => {
                                tracing::warn!(%pod, source = %source.display(), error = %e.message(), "publish failed");
                                Err(e)
                            }
                        }
                    })
                    .await
                }
                "NodeUnpublishVolume" => {
                    unary(request, |r: NodeUnpublishVolumeRequest| async move {
                        let target = publish::check_unpublish(&r).map_err(status)?;
                        blocking(move || publish::unpublish(&target)).await?;
                        tracing::info!(target = %r.target_path, "models unpublished");
                        Ok(NodeUnpublishVolumeResponse {})
                    })
                    .await
                }
                _ => unimplemented(&method),
            })
        })
    }
}
