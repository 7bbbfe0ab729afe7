//! Several gateway replicas on one PostgreSQL store. One replica at a time holds the
//! gateway's dispatch lease (a row with a deadline, renewed every fifth of its length):
//! it runs the engine, so it alone sends pods their jobs and holds their websockets,
//! and it serves the API. The others forward every API request to it, and take the
//! lease when it lapses: a replica killed without a word is replaced within the lease's
//! length plus one renewal, and the new holder resumes every unfinished job from the
//! store, asking each pod about its jobs before it resubmits anything (the same path as
//! a restart of a single replica).
//!
//! While no replica holds the lease, a follower answers reads (a job, a list, an event
//! stream's missed changes) from the store after a moment, marked `sdfleet-served-by:
//! store`; writes wait for the next holder.
//!
//! A holder that cannot renew in time stops (the process exits and is restarted as a
//! follower) before anyone else may take the lease, and the store refuses its writes
//! once another holds it.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower::ServiceExt;

use super::api::ApiError;
use super::auth::ApiKeys;
use super::engine::Engine;
use super::metrics::GatewayMetrics;
use super::store::{JobStore, PgStore, Store};
use super::{DRAIN, FLUSH, GatewayArgs, GatewayError, serve_until_signal, start};
use crate::render::gateway::SHUTDOWN_DELAY_SECONDS;

/// Set on a request a follower forwards: the receiver answers it itself or refuses it
/// (`not_leader`), never forwards it again.
const FORWARDED_BY: &str = "sdfleet-forwarded-by";
/// On a replica's own refusals, so a follower tells `not_leader` from the API's 503s.
const REFUSED: &str = "sdfleet-refused";
/// How long a follower holds a request while no replica holds the lease (a takeover,
/// a rollout) before it answers 503.
const FORWARD_WAIT: Duration = Duration::from_secs(20);
/// How long a follower waits for a holder before it answers a read from the store.
const READ_FALLBACK: Duration = Duration::from_millis(1500);
/// Says a read was answered from the store (no replica held the lease).
const SERVED_BY: &str = "sdfleet-served-by";
/// The largest request body a follower forwards (the API's own limit).
const MAX_BODY: usize = 32 * 1024 * 1024;

enum Mode {
    /// No lease round has answered yet.
    Starting,
    /// Another replica holds the lease: its address, while its deadline holds.
    Follow(Option<String>),
    Lead {
        engine: Arc<Engine>,
        router: Router,
    },
}

struct Switch {
    mode: RwLock<Mode>,
    /// SIGTERM came: never claim the lease again, only follow.
    leaving: std::sync::atomic::AtomicBool,
    /// When a lease round last reached the store: ready while it is recent.
    reached_store: Mutex<Option<Instant>>,
    lease: Duration,
    http: reqwest::Client,
    holder: String,
    /// The API over the store alone: reads while no replica holds the lease.
    reader: Router,
}

impl Switch {
    fn local_router(&self) -> Option<Router> {
        match &*self.mode.read().unwrap_or_else(|e| e.into_inner()) {
            Mode::Lead { router, .. } => Some(router.clone()),
            _ => None,
        }
    }

    fn engine(&self) -> Option<Arc<Engine>> {
        match &*self.mode.read().unwrap_or_else(|e| e.into_inner()) {
            Mode::Lead { engine, .. } => Some(engine.clone()),
            _ => None,
        }
    }

    fn leader_address(&self) -> Option<String> {
        match &*self.mode.read().unwrap_or_else(|e| e.into_inner()) {
            Mode::Follow(address) => address.clone(),
            _ => None,
        }
    }

    fn set(&self, mode: Mode) {
        *self.mode.write().unwrap_or_else(|e| e.into_inner()) = mode;
    }
}

/// The jobs of one gateway: its namespace and fleets (several gateways may share a
/// database).
pub fn scope_of(args: &GatewayArgs) -> String {
    let mut fleets: Vec<&str> = args.fleets.iter().map(|f| f.name.as_str()).collect();
    fleets.sort();
    format!("{}/{}", args.namespace, fleets.join(","))
}

pub async fn run(
    client: kube::Client,
    args: GatewayArgs,
    url: String,
    listener: tokio::net::TcpListener,
    metrics: Arc<GatewayMetrics>,
    keys: Arc<ApiKeys>,
) -> Result<(), GatewayError> {
    let scope = scope_of(&args);
    let name = std::env::var("POD_NAME").unwrap_or_else(|_| "gateway".into());
    let holder = format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let address = args
        .advertise
        .clone()
        .unwrap_or_else(|| format!("http://{}", args.listen));
    let pg = {
        let (ca, scope, holder) = (args.postgres_ca_file.clone(), scope.clone(), holder.clone());
        tokio::task::spawn_blocking(move || PgStore::connect(&url, ca.as_deref(), &scope, &holder))
            .await
            .map_err(|e| GatewayError::Io("connecting to PostgreSQL".into(), e.into()))??
    };
    tracing::info!(%scope, %holder, %address, "job store on PostgreSQL; waiting for the lease");
    let lease = Duration::from_secs(args.lease_seconds.max(2));
    let pg = Arc::new(pg);
    let reader =
        super::store_reader(&args, Store(pg.clone() as Arc<dyn JobStore>), keys.clone()).await?;
    let switch = Arc::new(Switch {
        mode: RwLock::new(Mode::Starting),
        leaving: std::sync::atomic::AtomicBool::new(false),
        reached_store: Mutex::new(None),
        lease,
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            // A sync submit may wait max-wait seconds for its job before the first byte.
            .read_timeout(Duration::from_secs(args.max_wait_seconds + 30))
            .build()?,
        holder: holder.clone(),
        reader,
    });
    let router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .fallback(forward)
        .with_state(switch.clone());
    let held = hold_lease(&client, &args, pg.clone(), &switch, metrics, keys, address);
    let delay = Duration::from_secs(args.shutdown_delay_seconds);
    let result = tokio::select! {
        held = held => held,
        served = serve_until_signal(listener, router, delay) => served,
        never = hand_over_on_signal(switch.clone(), pg.clone()) => match never {},
    };
    // Still the holder (the serve failed, or the lease round ended it): hand over now.
    hand_over(&switch, &pg).await;
    result
}

/// On SIGTERM the holder hands over at once instead of at exit: it stops dispatching,
/// stores what is pending (briefly: the store refuses its writes once another replica
/// holds the lease, and the next holder asks the pods about anything not stored),
/// releases the lease, and forwards requests for the rest of its shutdown like any
/// follower. The API then waits for about one lease round, not this pod's whole exit.
async fn hand_over_on_signal(switch: Arc<Switch>, pg: Arc<PgStore>) -> std::convert::Infallible {
    crate::leader::shutdown_signal().await;
    hand_over(&switch, &pg).await;
    std::future::pending().await
}

async fn hand_over(switch: &Switch, pg: &Arc<PgStore>) {
    switch
        .leaving
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let Some(engine) = switch.engine() else {
        return;
    };
    engine.drain(HAND_OVER_FLUSH).await;
    switch.set(Mode::Follow(None));
    let pg = pg.clone();
    match tokio::task::spawn_blocking(move || pg.release()).await {
        Ok(Ok(())) => tracing::info!("lease released: the next replica takes the pods"),
        Ok(Err(e)) => tracing::warn!(error = %e, "could not release the lease (it lapses)"),
        Err(e) => tracing::warn!(error = %e, "could not release the lease (it lapses)"),
    }
}

/// How long a holder on its way out waits for its pending writes before it releases.
const HAND_OVER_FLUSH: Duration = Duration::from_secs(1);

/// Claims or renews the lease every fifth of its length, and follows whoever holds it.
/// Returns only with an error: this replica held the lease and lost it.
async fn hold_lease(
    client: &kube::Client,
    args: &GatewayArgs,
    pg: Arc<PgStore>,
    switch: &Switch,
    metrics: Arc<GatewayMetrics>,
    keys: Arc<ApiKeys>,
    address: String,
) -> Result<(), GatewayError> {
    let lease = switch.lease;
    let every = lease / 5;
    let mut renewed: Option<Instant> = None;
    loop {
        let leaving = switch.leaving.load(std::sync::atomic::Ordering::Relaxed);
        let round = {
            let (pg, address) = (pg.clone(), address.clone());
            tokio::time::timeout(
                every * 2,
                tokio::task::spawn_blocking(move || {
                    if leaving {
                        // On its way out: follow whoever holds it, never take it.
                        pg.observe()
                    } else {
                        pg.claim(&address, lease).map(Some)
                    }
                }),
            )
            .await
        };
        match round {
            Ok(Ok(Ok(None))) => switch.set(Mode::Follow(None)),
            Ok(Ok(Ok(Some(view)))) => {
                *switch
                    .reached_store
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                if view.ours && !leaving {
                    renewed = Some(Instant::now());
                    if switch.engine().is_none() {
                        tracing::info!(
                            epoch = view.epoch,
                            "this replica holds the lease: taking the pods"
                        );
                        metrics.lease_takeovers.inc();
                        let store = Store(pg.clone() as Arc<dyn JobStore>);
                        let leader =
                            start(client, args, store, metrics.clone(), keys.clone()).await?;
                        switch.set(Mode::Lead {
                            engine: leader.engine,
                            router: leader.router,
                        });
                        metrics.lease_held.set(1);
                    }
                } else if leaving {
                    let holder = view.live && !view.ours;
                    switch.set(Mode::Follow(holder.then_some(view.address)));
                } else if switch.engine().is_some() {
                    return Err(GatewayError::LeaseLost(format!(
                        "replica {} holds the lease now",
                        view.holder
                    )));
                } else {
                    switch.set(Mode::Follow(view.live.then_some(view.address)));
                }
            }
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "lease round failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "lease round failed"),
            Err(_) => tracing::warn!(after = ?every * 2, "lease round timed out"),
        }
        // Stop dispatching before the deadline another replica goes by can pass.
        if switch.engine().is_some() && renewed.is_some_and(|at| at.elapsed() + every >= lease) {
            return Err(GatewayError::LeaseLost(format!(
                "could not renew the lease for {:?}",
                renewed.map(|at| at.elapsed()).unwrap_or_default()
            )));
        }
        tokio::time::sleep(every).await;
    }
}

async fn readyz(State(switch): State<Arc<Switch>>) -> Response {
    let reached = *switch
        .reached_store
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if reached.is_some_and(|at| at.elapsed() < switch.lease) {
        "ok".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the job store is unreachable",
        )
            .into_response()
    }
}

/// A replica's own refusal, in the API's error shape with `Retry-After: 1`, and named in
/// a header so that a follower tells `not_leader` from the API's own 503s.
fn refusal(status: StatusCode, code: &'static str, message: &str) -> Response {
    let mut response = ApiError::new(status, code, message)
        .retry_after(1)
        .into_response();
    response.headers_mut().insert(
        HeaderName::from_static(REFUSED),
        header::HeaderValue::from_static(code),
    );
    response
}

/// Every API request: answered here while this replica holds the lease, else sent to
/// the replica that does (held while there is none, up to FORWARD_WAIT).
async fn forward(State(switch): State<Arc<Switch>>, req: Request) -> Response {
    if let Some(router) = switch.local_router() {
        return serve_locally(router, req).await;
    }
    if req.headers().contains_key(FORWARDED_BY) {
        // The sender took this replica for the holder; it retries with the real one.
        return refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_leader",
            "this gateway replica does not hold the lease",
        );
    }
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY).await else {
        return refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
            "the request body is too large or was cut off",
        );
    };
    let idempotent = matches!(parts.method.as_str(), "GET" | "HEAD");
    let started = Instant::now();
    let deadline = started + FORWARD_WAIT;
    loop {
        if let Some(router) = switch.local_router() {
            return serve_locally(router, Request::from_parts(parts, Body::from(body))).await;
        }
        if let Some(address) = switch.leader_address() {
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let sent = switch
                .http
                .request(parts.method.clone(), format!("{address}{path}"))
                .headers(forwarded_headers(&parts.headers, &switch.holder))
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(resp) if !is_not_leader(&resp) => return relay(resp),
                Ok(_) => {}
                // Not sent at all (refused, no route): the holder is going or gone.
                Err(e) if e.is_connect() || idempotent => {
                    tracing::debug!(error = %e, %address, "the lease holder did not answer; retrying")
                }
                Err(e) => {
                    tracing::warn!(error = %e, %address, "the lease holder failed mid-request");
                    return refusal(
                        StatusCode::BAD_GATEWAY,
                        "leader_failed",
                        "the gateway replica serving this request failed; retry it (with an Idempotency-Key, a retry cannot make a second job)",
                    );
                }
            }
        }
        if idempotent && started.elapsed() >= READ_FALLBACK {
            // No holder (a takeover under way): the job as last stored, said to be so.
            let req = Request::from_parts(parts, Body::from(body));
            let mut resp = serve_locally(switch.reader.clone(), req).await;
            resp.headers_mut().insert(
                HeaderName::from_static(SERVED_BY),
                header::HeaderValue::from_static("store"),
            );
            return resp;
        }
        if Instant::now() >= deadline {
            return refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_leader",
                "no gateway replica holds the lease yet; retry shortly",
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn serve_locally(router: Router, req: Request) -> Response {
    match router.oneshot(req).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

fn is_not_leader(resp: &reqwest::Response) -> bool {
    resp.status() == StatusCode::SERVICE_UNAVAILABLE
        && resp.headers().contains_key(header::RETRY_AFTER)
        && resp
            .headers()
            .get(REFUSED)
            .is_some_and(|v| v == "not_leader")
}

/// Hop-by-hop headers stay on their own connection.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "te"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

fn forwarded_headers(headers: &HeaderMap, holder: &str) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        if !hop_by_hop(name) {
            out.append(name.clone(), value.clone());
        }
    }
    if let Ok(v) = header::HeaderValue::from_str(holder) {
        out.insert(HeaderName::from_static(FORWARDED_BY), v);
    }
    out
}

fn relay(resp: reqwest::Response) -> Response {
    let mut builder = Response::builder().status(resp.status());
    for (name, value) in resp.headers() {
        if !hop_by_hop(name) {
            builder = builder.header(name, value);
        }
    }
    builder
        .body(Body::from_stream(resp.bytes_stream()))
        .unwrap_or_else(|e| {
            refusal(
                StatusCode::BAD_GATEWAY,
                "leader_failed",
                &format!("the lease holder's answer could not be relayed: {e}"),
            )
        })
}

/// The drain and flush a holder does before it gives the lease up stay within a pod's
/// grace period.
const _: () = assert!(
    HAND_OVER_FLUSH.as_secs() + DRAIN.as_secs() + FLUSH.as_secs() + SHUTDOWN_DELAY_SECONDS < 30
);
