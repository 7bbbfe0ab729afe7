//! The gateway's queue and its pods. Each fleet has one FIFO queue; each pod gets at most
//! `pod_slots` jobs (one running plus one prefetched in ComfyUI's own queue); one
//! websocket per pod carries the events of every prompt this gateway sent there, split
//! by `prompt_id`. Every state change is in the store before it is acted on.
//!
//! This file holds the state and what the API calls (submit, read, cancel, end a job);
//! whether a change is allowed is `lifecycle`'s; `persistence` writes it, `dispatch`
//! hands jobs to pods, `pod_worker` talks to one pod, `completion` stores the outputs,
//! `node_types` checks workflows against the fleet's nodes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::comfy::PodClient;
use super::job::{Job, JobError, JobState, now_millis};
use super::lifecycle::{self, Transition};
use super::metrics::GatewayMetrics;
use super::outputs::OutputStore;
use super::placement::Placement;
use super::pod_models::PodModels;
use super::store::Store;
use super::webhook::Webhooks;

mod completion;
mod dispatch;
mod node_types;
mod persistence;
mod pod_worker;

pub struct Settings {
    /// This gateway process's client id on the pods' websockets (each connection adds
    /// its number).
    pub client_id: String,
    /// Jobs a fleet may hold waiting (not yet started); more get 429.
    pub queue_cap: usize,
    pub ttl: Duration,
    /// Jobs a pod holds at once: one running plus prefetched ones.
    pub pod_slots: usize,
    /// Hand-offs of one job before it fails `pod_lost`.
    pub max_attempts: u32,
    pub placement: Placement,
    /// A pod unreachable this long loses its jobs to other pods.
    pub lost_after: Duration,
    /// After a restart, how long jobs wait for the pod they were on to reappear.
    pub orphan_grace: Duration,
    /// Buckets `s3://` inputs may come from.
    pub input_buckets: Vec<String>,
    /// A pod's websocket silent this long (pings unanswered) counts as a lost connection.
    pub silence_limit: Duration,
    /// How often a busy pod is asked about its jobs (`/queue`, `/history`), events or no
    /// events: ComfyUI drops the events of a client whose socket is down, and a restarted
    /// gateway's new client id gets none of the prompts sent before.
    pub resync_every: Duration,
    /// A job running longer is interrupted and fails `run_timeout`.
    pub max_run: Option<Duration>,
    /// Finished jobs are deleted this long after they were submitted...
    pub retention: Duration,
    /// ...or when more than this many jobs are stored (the oldest finished ones first).
    pub retention_max_jobs: usize,
    /// How often retention runs and the store's fill level is read.
    pub retention_every: Duration,
    /// Each API key's (or group's) weight and cap: dispatch shares the pods by them.
    pub shares: Arc<dyn super::fair_share::Shares>,
}

/// One event of one job, for its SSE stream.
#[derive(Clone, Debug)]
pub struct JobEvent {
    pub kind: &'static str,
    pub data: Value,
    /// The job ended: the stream closes after this one.
    pub last: bool,
    /// A change of state: its number in the job's history, the stream's event id.
    pub seq: Option<u32>,
}

/// A pod endpoint as discovery sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub name: String,
    pub url: String,
    /// Ready and not terminating: may get new jobs.
    pub ready: bool,
    /// The node it runs on (the EndpointSlice's `nodeName`).
    pub node: Option<String>,
    /// What its node holds of the fleet's ModelSet.
    pub models: PodModels,
}

enum PodCommand {
    Submit(Box<Job>),
    Interrupt(String),
    Delete(String),
}

struct Pod {
    fleet: String,
    client: PodClient,
    ready: bool,
    connected: bool,
    unreachable_since: Option<Instant>,
    assigned: Vec<String>,
    /// Jobs whose hand-off (inputs, `/prompt`) is in progress: a resync must not take
    /// them for lost because the pod does not know them yet.
    handing_off: Vec<String>,
    /// A prompt that overran the run limit and was interrupted: the pod gets no new job
    /// until it has stopped it (a hung ComfyUI would queue them behind it).
    overran: Option<String>,
    checkpoint: Option<String>,
    /// What its node holds: a pod on a node with only the hot models gets only jobs of those.
    models: PodModels,
    ran_any: bool,
    /// Which websocket connection is up (counts connects): the events of a prompt sent
    /// while connection N was up all arrive on N, as long as N stays up.
    socket: u64,
    /// Jobs whose prompt went out while the socket (by its count) was up.
    prompted_on: HashMap<String, u64>,
    commands: mpsc::UnboundedSender<PodCommand>,
    task: JoinHandle<()>,
}

impl Pod {
    /// The job leaves this pod: no slot, no hand-off in progress.
    fn release(&mut self, id: &str) {
        self.assigned.retain(|j| j != id);
        self.handing_off.retain(|j| j != id);
        self.prompted_on.remove(id);
    }

    /// Whether this socket carried every event of `id`'s prompt: it was up when the
    /// prompt went out and has not dropped since. ComfyUI sends a client's events only
    /// to its open socket (none are kept for later), and sends `executed` even for an
    /// output node it served from its cache, so the socket's outputs are then complete.
    fn heard_all_of(&self, id: &str) -> bool {
        self.connected && self.prompted_on.get(id) == Some(&self.socket)
    }
}

#[derive(Default)]
struct State {
    /// Unfinished jobs.
    jobs: HashMap<String, Job>,
    queues: HashMap<String, VecDeque<String>>,
    pods: HashMap<String, Pod>,
    /// After a restart: pod name → jobs that were on it, until it reappears.
    orphans: HashMap<String, Vec<String>>,
    watchers: HashMap<String, broadcast::Sender<JobEvent>>,
    /// Idempotency keys of unfinished jobs (the store has all).
    keys: HashMap<String, String>,
    /// Recent run time per fleet (seconds), for `Retry-After`.
    run_time: HashMap<String, f64>,
    /// Jobs whose submit is not yet committed: nothing else writes them before it is.
    admitting: std::collections::HashSet<String>,
    /// Per fleet, the checkpoints of the last `demand::RECENT_JOBS` accepted jobs.
    recent: HashMap<String, VecDeque<String>>,
    /// Per fleet, each fair share's recent starts (decayed).
    usage: HashMap<String, HashMap<String, super::fair_share::Usage>>,
}

pub enum Admission {
    Accepted(Job),
    /// The idempotency key was used before: that job.
    Existing(Job),
    QueueFull {
        retry_after: u64,
    },
}

pub enum CancelOutcome {
    Done(Box<Job>),
    NotFound,
}

/// One store write: the job, who waits for its commit, and whether a failed write is
/// tried again (every state change) or given up (a submit, which answers 503 and is
/// forgotten: a retry would store a job its client was told was refused).
struct PersistRequest {
    job: Job,
    ack: Option<oneshot::Sender<Result<(), String>>>,
    retry: bool,
}

/// Jobs written to the in-memory state but not yet committed, with their count of
/// writes in flight: reads see them until the store has them.
/// A fleet's node types and the ComfyUI version they were read from.
type NodeTypes = (String, Arc<std::collections::BTreeSet<String>>);

type Unflushed = Arc<Mutex<HashMap<String, (Job, u32)>>>;

pub struct Engine {
    pub settings: Settings,
    pub store: Store,
    pub metrics: Arc<GatewayMetrics>,
    pub outputs: Option<OutputStore>,
    pub webhooks: Arc<Webhooks>,
    state: Mutex<State>,
    wake: Notify,
    persist: mpsc::UnboundedSender<PersistRequest>,
    unflushed: Unflushed,
    http: reqwest::Client,
    started: Instant,
    /// What the operator reports about each fleet (capacity, cold starts).
    pub signals: Arc<super::demand::FleetSignals>,
    /// Each fleet's node types (`/object_info` of a pod), with the ComfyUI version they
    /// were read from: read again only when a pod reports another version.
    node_types: Mutex<HashMap<String, NodeTypes>>,
    /// Set once the process is told to stop: nothing more is handed out, pod workers
    /// close their sockets.
    stopping: tokio::sync::watch::Sender<bool>,
}

impl Engine {
    pub fn new(
        settings: Settings,
        store: Store,
        metrics: Arc<GatewayMetrics>,
        outputs: Option<OutputStore>,
        webhooks: Arc<Webhooks>,
        http: reqwest::Client,
    ) -> Arc<Engine> {
        let (persist, rx) = mpsc::unbounded_channel();
        let unflushed = Unflushed::default();
        let engine = Arc::new(Engine {
            unflushed: unflushed.clone(),
            settings,
            store,
            metrics,
            outputs,
            webhooks,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            persist,
            http,
            started: Instant::now(),
            signals: Arc::default(),
            node_types: Mutex::default(),
            stopping: tokio::sync::watch::Sender::new(false),
        });
        tokio::spawn(persistence::persister(
            engine.store.clone(),
            rx,
            unflushed,
            engine.metrics.clone(),
        ));
        engine
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; the state is still consistent enough
        // to serve (every change is one assignment).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(state: &mut State, job: &Job, kind: &'static str, mut data: Value) {
        let last = job.state.is_final();
        // Every event names its job, so a client can check it got only its own.
        if let Value::Object(map) = &mut data {
            map.insert("job".into(), Value::String(job.id.clone()));
        }
        if let Some(tx) = state.watchers.get(&job.id) {
            let seq = matches!(kind, "state" | "done").then(|| job.seq());
            let _ = tx.send(JobEvent {
                kind,
                data,
                last,
                seq,
            });
        }
        if last {
            state.watchers.remove(&job.id);
        }
    }

    /// Admits a job: the same job again for a known idempotency key, 429 when the
    /// fleet's queue is full, else stored and queued.
    pub async fn submit(&self, mut job: Job) -> Result<Admission, super::store::StoreError> {
        if let Some(key) = job.idempotency_key.clone() {
            let live = self.lock().keys.get(&key).cloned();
            if let Some(existing) = live
                && let Some(found) = self.get(&existing).await?
            {
                return Ok(Admission::Existing(found));
            }
            if let Some(id) = self.store.by_idempotency_key(&key).await?
                && let Some(found) = self.get(&id).await?
            {
                return Ok(Admission::Existing(found));
            }
        }
        let (committed, placed) = {
            let mut st = self.lock();
            if let Some(key) = &job.idempotency_key {
                // Two requests with one key at once: the first one in wins.
                if let Some(id) = st.keys.get(key)
                    && let Some(found) = st.jobs.get(id)
                {
                    return Ok(Admission::Existing(found.clone()));
                }
            }
            let waiting = st
                .jobs
                .values()
                .filter(|j| j.fleet == job.fleet && j.state == JobState::Queued)
                .count();
            if waiting >= self.settings.queue_cap {
                let pods = st
                    .pods
                    .values()
                    .filter(|p| p.fleet == job.fleet && p.ready)
                    .count()
                    .max(1);
                let run = st.run_time.get(&job.fleet).copied().unwrap_or(10.0);
                let retry_after = ((waiting as f64 / pods as f64) * run)
                    .ceil()
                    .clamp(1.0, 3600.0) as u64;
                return Ok(Admission::QueueFull { retry_after });
            }
            job.state = JobState::Queued;
            if let Some(key) = &job.idempotency_key {
                st.keys.insert(key.clone(), job.id.clone());
            }
            st.jobs.insert(job.id.clone(), job.clone());
            let placed = self.place_at_admission(&mut st, &job.id, &job.fleet);
            let placed = placed.map(|(assigned, commands)| {
                job = assigned;
                commands
            });
            st.admitting.insert(job.id.clone());
            // Not retried: on failure the submit answers 503 and the job is forgotten.
            (self.persist_acked(&job, false), placed)
        };
        // Acknowledged only once it is durable: a 201 for a job the store never got would
        // be a job lost at the next restart.
        let committed = match committed.await {
            Ok(result) => result,
            Err(_) => Err("the store writer stopped".into()),
        };
        let mut guard = self.lock();
        let st = &mut *guard;
        st.admitting.remove(&job.id);
        if let Err(e) = committed {
            if let Some(key) = &job.idempotency_key {
                st.keys.remove(key);
            }
            st.jobs.remove(&job.id);
            for pod in st.pods.values_mut() {
                pod.release(&job.id);
            }
            return Err(super::store::StoreError::from_message(e));
        }
        if let Some(ckpt) = &job.checkpoint {
            let recent = st.recent.entry(job.fleet.clone()).or_default();
            recent.push_back(ckpt.clone());
            if recent.len() > super::demand::RECENT_JOBS {
                recent.pop_front();
            }
        }
        let live = st.jobs.get(&job.id).cloned();
        match (placed, live) {
            // Still on the pod it was placed on: the hand-off goes out now.
            (Some(commands), Some(live)) if live.pod.is_some() => {
                let _ = commands.send(PodCommand::Submit(Box::new(live)));
            }
            // Waits in the queue (or its pod went while the write was in flight).
            (_, Some(live)) if live.state == JobState::Queued => {
                st.queues
                    .entry(job.fleet.clone())
                    .or_default()
                    .push_back(job.id.clone());
            }
            _ => {}
        }
        drop(guard);
        self.wake.notify_one();
        Ok(Admission::Accepted(job))
    }

    /// The job, live if it has not ended, else from the store.
    pub async fn get(&self, id: &str) -> Result<Option<Job>, super::store::StoreError> {
        if let Some(job) = self.live(id) {
            return Ok(Some(job));
        }
        self.store.get(id).await
    }

    /// The job as the engine has it now, if it has not ended or is not yet committed:
    /// what a page read from the store may be behind.
    pub fn live(&self, id: &str) -> Option<Job> {
        if let Some(job) = self.lock().jobs.get(id) {
            return Some(job.clone());
        }
        self.unflushed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|(job, _)| job.clone())
    }

    /// The job now and, while it runs, a receiver of its next events (subscribed under
    /// the same lock, so nothing falls between the two).
    pub async fn subscribe(
        &self,
        id: &str,
    ) -> Result<Option<(Job, Option<broadcast::Receiver<JobEvent>>)>, super::store::StoreError>
    {
        {
            let mut st = self.lock();
            if let Some(job) = st.jobs.get(id).cloned() {
                let rx = st
                    .watchers
                    .entry(id.to_string())
                    .or_insert_with(|| broadcast::channel(256).0)
                    .subscribe();
                return Ok(Some((job, Some(rx))));
            }
        }
        Ok(self.get(id).await?.map(|j| (j, None)))
    }

    /// Jobs queued or on a pod, per fleet: (queued, in flight).
    pub fn load(&self, fleet: &str) -> (usize, usize) {
        let d = self.demand(fleet);
        (d.queued, d.running)
    }

    /// A fleet's demand for autoscaling: queued and on-pod jobs, and the pods holding one.
    pub fn demand(&self, fleet: &str) -> super::demand::Demand {
        let st = self.lock();
        let mut busy_pods: Vec<String> = st
            .pods
            .iter()
            .filter(|(_, p)| p.fleet == fleet && !p.assigned.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        busy_pods.sort();
        super::demand::Demand {
            queued: st.queues.get(fleet).map_or(0, |q| q.len()),
            running: st
                .pods
                .values()
                .filter(|p| p.fleet == fleet)
                .map(|p| p.assigned.len())
                .sum(),
            busy_pods,
            recent_models: super::demand::recent_models(
                st.recent
                    .get(fleet)
                    .into_iter()
                    .flat_map(|r| r.iter().map(String::as_str)),
            ),
        }
    }

    /// Pods of `fleet` that may get jobs now.
    pub fn ready_pods(&self, fleet: &str) -> usize {
        self.lock()
            .pods
            .values()
            .filter(|p| p.fleet == fleet && p.ready && p.connected)
            .count()
    }

    pub async fn cancel(&self, id: &str) -> Result<CancelOutcome, super::store::StoreError> {
        match self.cancel_live(id) {
            Some(job) => Ok(CancelOutcome::Done(Box::new(job))),
            None => Ok(match self.get(id).await? {
                Some(job) => CancelOutcome::Done(Box::new(job)),
                None => CancelOutcome::NotFound,
            }),
        }
    }

    /// Cancels a live job: a queued one ends here (and leaves the pod's queue if it was
    /// prefetched there); a running one is interrupted on its pod and ends `canceled`
    /// when the pod says so. `None`: no live job of that id.
    fn cancel_live(&self, id: &str) -> Option<Job> {
        let mut guard = self.lock();
        let st = &mut *guard;
        let job = st.jobs.get_mut(id)?;
        let pod = job.pod.clone();
        let (job, command) =
            if lifecycle::apply(job, Transition::RequestCancel { at: now_millis() }).is_ok() {
                let job = job.clone();
                self.persist_later(&job);
                Self::publish(
                    st,
                    &job,
                    "state",
                    json!({"state": "running", "cancel_requested": true}),
                );
                (job, PodCommand::Interrupt(id.to_string()))
            } else {
                (
                    self.finish_locked(st, id, JobState::Canceled, None)?,
                    PodCommand::Delete(id.to_string()),
                )
            };
        if let Some(p) = pod.as_ref().and_then(|p| st.pods.get(p)) {
            let _ = p.commands.send(command);
        }
        Some(job)
    }

    /// Ends a live job: out of queues and pods, stored, announced. Returns it.
    fn finish_locked(
        &self,
        st: &mut State,
        id: &str,
        state: JobState,
        error: Option<JobError>,
    ) -> Option<Job> {
        let live = st.jobs.get_mut(id)?;
        let pod = live.pod.clone();
        let end = Transition::End {
            state,
            error,
            at: now_millis(),
        };
        if let Err(illegal) = lifecycle::apply(live, end) {
            tracing::warn!(job = %id, ?state, %illegal, "not ended");
            return None;
        }
        tracing::debug!(job = %id, state = state.as_str(), "job ended");
        let job = st.jobs.remove(id)?;
        if let Some(q) = st.queues.get_mut(&job.fleet) {
            q.retain(|j| j != id);
        }
        if let Some(pod) = pod.as_ref().and_then(|p| st.pods.get_mut(p)) {
            pod.release(id);
        }
        if let Some(key) = &job.idempotency_key {
            st.keys.remove(key);
        }
        let fleet = GatewayMetrics::fleet(&job.fleet);
        if let Some(started) = job.started_at {
            let secs = job.finished_at.unwrap_or(started).saturating_sub(started) as f64 / 1000.0;
            self.metrics.run_seconds.get_or_create(&fleet).observe(secs);
            if state == JobState::Succeeded {
                let avg = st.run_time.entry(job.fleet.clone()).or_insert(secs);
                *avg = 0.8 * *avg + 0.2 * secs;
            }
        }
        self.metrics
            .finished
            .get_or_create(&super::metrics::FinishedLabels {
                fleet: job.fleet.clone(),
                state: state.as_str().into(),
            })
            .inc();
        self.persist_later(&job);
        Self::publish(st, &job, "done", job.public_view());
        if let Some(url) = &job.webhook {
            let event = format!("job.{}", state.as_str());
            self.webhooks
                .send(url.clone(), &event, &job.id, job.public_view());
        }
        self.wake.notify_one();
        Some(job)
    }

    fn finish(&self, id: &str, state: JobState, error: Option<JobError>) -> Option<Job> {
        let mut st = self.lock();
        self.finish_locked(&mut st, id, state, error)
    }

    /// Puts a job that a pod lost back at the head of its queue (or fails it after
    /// `max_attempts` hand-offs).
    fn requeue_locked(&self, st: &mut State, id: &str, why: &str) {
        let Some(job) = st.jobs.get_mut(id) else {
            return;
        };
        if job.cancel_requested {
            self.finish_locked(st, id, JobState::Canceled, None);
            return;
        }
        if job.attempts >= self.settings.max_attempts {
            let msg = format!("{why}; gave up after {} attempts", job.attempts);
            self.finish_locked(
                st,
                id,
                JobState::Failed,
                Some(JobError::new("pod_lost", msg)),
            );
            return;
        }
        tracing::info!(job = %id, pod = ?job.pod, %why, "job back in the queue");
        let hand_back = Transition::HandBack {
            at: now_millis(),
            why: why.to_string(),
        };
        if let Err(illegal) = lifecycle::apply(job, hand_back) {
            tracing::debug!(job = %id, %illegal, "nothing to hand back");
        } else {
            let fleet = GatewayMetrics::fleet(&job.fleet);
            self.metrics.requeued.get_or_create(&fleet).inc();
        }
        let job = job.clone();
        if let Some(p) = st
            .pods
            .values_mut()
            .find(|p| p.assigned.iter().any(|j| j == id))
        {
            p.release(id);
        }
        if st.admitting.contains(id) {
            // Placed at admission, its submit still in flight: the submit queues it once
            // committed (a write now could store a job its client is told was refused).
            return;
        }
        st.queues
            .entry(job.fleet.clone())
            .or_default()
            .push_front(id.to_string());
        self.persist_later(&job);
        Self::publish(
            st,
            &job,
            "state",
            json!({"state": "queued", "requeued": why}),
        );
        self.wake.notify_one();
    }
}
