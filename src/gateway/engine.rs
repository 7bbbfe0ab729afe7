//! The gateway's queue and its pods. Each fleet has one FIFO queue; each pod gets at most
//! `pod_slots` jobs (one running plus one prefetched in ComfyUI's own queue); one
//! websocket per pod carries the events of every prompt this gateway sent there, split
//! by `prompt_id`. Every state change is in the store before it is acted on.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::comfy::{HistoryEntry, PodClient, PodError, PodEvent, QueueView};
use super::job::{InputFile, Job, JobError, JobState, Progress, now_millis};
use super::lifecycle::{self, Transition};
use super::metrics::GatewayMetrics;
use super::outputs::{OutputStore, parse_s3_url};
use super::placement::{self, Placement, PodLoad, Queued};
use super::store::Store;
use super::webhook::Webhooks;
use super::workflow::rename_input;

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
}

/// One event of one job, for its SSE stream.
#[derive(Clone, Debug)]
pub struct JobEvent {
    pub kind: &'static str,
    pub data: Value,
    /// The job ended: the stream closes after this one.
    pub last: bool,
}

/// A pod endpoint as discovery sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub name: String,
    pub url: String,
    /// Ready and not terminating: may get new jobs.
    pub ready: bool,
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
    ran_any: bool,
    commands: mpsc::UnboundedSender<PodCommand>,
    task: JoinHandle<()>,
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

/// Tries to store one output before the job fails `output_failed`.
const OUTPUT_ATTEMPTS: u32 = 3;

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
        tokio::spawn(persister(
            engine.store.clone(),
            rx,
            unflushed,
            engine.metrics.clone(),
        ));
        engine
    }

    /// Stops for a SIGTERM: hands out no more jobs, closes the pods' websockets (so
    /// ComfyUI drops this client at once), and waits, up to `within`, until every state
    /// change made so far is in the store. Jobs on pods stay theirs: the next process
    /// asks those pods about them, as after any restart.
    pub async fn drain(&self, within: Duration) {
        self.stopping.send_replace(true);
        let deadline = Instant::now() + within;
        loop {
            let pending = self
                .unflushed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .len();
            if pending == 0 {
                tracing::info!("every state change is stored");
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(pending, "exiting with state changes not yet stored");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Reads a pod's node types unless its fleet's are known for this ComfyUI version.
    async fn learn_node_types(&self, client: &PodClient, version: &str) {
        let fleet = match self.lock().pods.get(&client.name) {
            Some(p) => p.fleet.clone(),
            None => return,
        };
        let known = self
            .node_types
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fleet)
            .is_some_and(|(v, _)| v == version);
        if known {
            return;
        }
        match client.node_types().await {
            Ok(types) if !types.is_empty() => {
                tracing::info!(%fleet, %version, types = types.len(), "node types read from a pod");
                self.node_types
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(fleet, (version.to_string(), Arc::new(types)));
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(pod = %client.name, error = %e, "cannot read /object_info"),
        }
    }

    /// The prompt's nodes (id, type) whose type the fleet's ComfyUI does not have. Empty
    /// while no pod has told the fleet's types yet (the pod's own validation stays).
    pub fn unknown_node_types(&self, fleet: &str, prompt: &Value) -> Vec<(String, String)> {
        let types = match self
            .node_types
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(fleet)
        {
            Some((_, types)) => types.clone(),
            None => return vec![],
        };
        let mut out: Vec<(String, String)> = prompt
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(id, node)| {
                let class = node.get("class_type")?.as_str()?;
                (!types.contains(class)).then(|| (id.clone(), class.to_string()))
            })
            .collect();
        out.sort();
        out
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; the state is still consistent enough
        // to serve (every change is one assignment).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn track(&self, job: &Job) {
        let mut unflushed = self.unflushed.lock().unwrap_or_else(|e| e.into_inner());
        // One copy of the job per write (a job carries its whole workflow).
        match unflushed.get_mut(&job.id) {
            Some(entry) => {
                entry.0 = job.clone();
                entry.1 += 1;
            }
            None => {
                unflushed.insert(job.id.clone(), (job.clone(), 1));
            }
        }
    }

    /// Queues a store write. Called under the state lock, so writes reach the store in
    /// the order the changes were made (a stale copy cannot overwrite a newer one).
    fn persist_later(&self, job: &Job) {
        self.track(job);
        let _ = self.persist.send(PersistRequest {
            job: job.clone(),
            ack: None,
            retry: true,
        });
    }

    /// Queues a store write (under the state lock, as `persist_later`); the receiver
    /// says when it is committed, or why not. `retry`: a failed write is tried again.
    fn persist_acked(&self, job: &Job, retry: bool) -> oneshot::Receiver<Result<(), String>> {
        self.track(job);
        let (tx, rx) = oneshot::channel();
        let _ = self.persist.send(PersistRequest {
            job: job.clone(),
            ack: Some(tx),
            retry,
        });
        rx
    }

    fn publish(state: &mut State, job: &Job, kind: &'static str, mut data: Value) {
        let last = job.state.is_final();
        // Every event names its job, so a client can check it got only its own.
        if let Value::Object(map) = &mut data {
            map.insert("job".into(), Value::String(job.id.clone()));
        }
        if let Some(tx) = state.watchers.get(&job.id) {
            let _ = tx.send(JobEvent { kind, data, last });
        }
        if last {
            state.watchers.remove(&job.id);
        }
    }

    /// Loads unfinished jobs after a start: those on no pod are queued again; those on a
    /// pod wait for it to reappear and be asked (so no job runs twice).
    pub async fn recover(&self) -> Result<usize, super::store::StoreError> {
        let store = self.store.0.clone();
        let jobs = tokio::task::spawn_blocking(move || store.unfinished())
            .await
            .map_err(|e| super::store::StoreError::from_message(e.to_string()))??;
        let n = jobs.len();
        let mut st = self.lock();
        for job in jobs {
            if let Some(key) = &job.idempotency_key {
                st.keys.insert(key.clone(), job.id.clone());
            }
            match &job.pod {
                Some(pod) => st
                    .orphans
                    .entry(pod.clone())
                    .or_default()
                    .push(job.id.clone()),
                None => st
                    .queues
                    .entry(job.fleet.clone())
                    .or_default()
                    .push_back(job.id.clone()),
            }
            st.jobs.insert(job.id.clone(), job);
        }
        drop(st);
        self.wake.notify_one();
        Ok(n)
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
        let committed = {
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
            // Not retried: on failure the submit answers 503 and the job is forgotten.
            self.persist_acked(&job, false)
        };
        // Acknowledged only once it is durable: a 201 for a job the store never got would
        // be a job lost at the next restart.
        let committed = match committed.await {
            Ok(result) => result,
            Err(_) => Err("the store writer stopped".into()),
        };
        let mut st = self.lock();
        if let Err(e) = committed {
            if let Some(key) = &job.idempotency_key {
                st.keys.remove(key);
            }
            st.jobs.remove(&job.id);
            return Err(super::store::StoreError::from_message(e));
        }
        st.queues
            .entry(job.fleet.clone())
            .or_default()
            .push_back(job.id.clone());
        drop(st);
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
        let (job, command) = if lifecycle::apply(job, Transition::RequestCancel).is_ok() {
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
            pod.assigned.retain(|j| j != id);
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
        if let Err(illegal) = lifecycle::apply(job, Transition::HandBack) {
            tracing::debug!(job = %id, %illegal, "nothing to hand back");
        }
        let job = job.clone();
        if let Some(p) = st
            .pods
            .values_mut()
            .find(|p| p.assigned.iter().any(|j| j == id))
        {
            p.assigned.retain(|j| j != id);
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

    /// Discovery's view of one fleet's pods: new pods get a worker, gone pods give their
    /// jobs back, readiness gates new hand-offs.
    pub fn sync_pods(self: &Arc<Self>, fleet: &str, endpoints: Vec<Endpoint>) {
        let mut st = self.lock();
        // A known fleet reports its gauges from the first listing on, even with no pod
        // and no job (autoscaling reads zeros too).
        st.queues.entry(fleet.to_string()).or_default();
        let gone: Vec<String> = st
            .pods
            .iter()
            .filter(|(name, p)| p.fleet == fleet && !endpoints.iter().any(|e| &e.name == *name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(pod) = st.pods.remove(&name) {
                pod.task.abort();
                tracing::info!(pod = %name, jobs = pod.assigned.len(), "pod gone");
                for id in pod.assigned {
                    self.requeue_locked(&mut st, &id, "pod gone");
                }
            }
        }
        for ep in endpoints {
            if let Some(pod) = st.pods.get_mut(&ep.name) {
                pod.ready = ep.ready;
                if pod.client.base != ep.url {
                    // Same name, new address: a new pod behind an old name.
                    pod.task.abort();
                    let assigned = std::mem::take(&mut pod.assigned);
                    st.pods.remove(&ep.name);
                    for id in assigned {
                        self.requeue_locked(&mut st, &id, "pod replaced");
                    }
                } else {
                    continue;
                }
            }
            let mut client = PodClient::new(
                &ep.name,
                &ep.url,
                &self.settings.client_id,
                self.http.clone(),
            );
            client.silence_limit = self.settings.silence_limit;
            let (tx, rx) = mpsc::unbounded_channel();
            let assigned = st.orphans.remove(&ep.name).unwrap_or_default();
            let task = tokio::spawn(run_pod(self.clone(), client.clone(), rx));
            tracing::info!(pod = %ep.name, url = %ep.url, ready = ep.ready, "pod found");
            st.pods.insert(
                ep.name.clone(),
                Pod {
                    fleet: fleet.to_string(),
                    client,
                    ready: ep.ready,
                    connected: false,
                    unreachable_since: None,
                    assigned,
                    handing_off: Vec::new(),
                    overran: None,
                    checkpoint: None,
                    ran_any: false,
                    commands: tx,
                    task,
                },
            );
        }
        drop(st);
        self.wake.notify_one();
    }

    /// The dispatcher: hands jobs to pods, expires what waited too long, gives back the
    /// jobs of unreachable pods. Runs until the process ends.
    pub async fn run(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            self.housekeeping();
            for (job, commands, committed) in self.assign() {
                // The hand-off goes out once the store knows which pod the job is on, so
                // a restart asks that pod instead of running the job again elsewhere.
                if let Ok(Err(e)) = committed.await {
                    tracing::error!(job = %job.id, error = %e, "cannot store a hand-off");
                }
                let _ = commands.send(PodCommand::Submit(Box::new(job)));
            }
            self.refresh_gauges();
        }
    }

    /// Retention and the store's fill level, every `retention_every`, until the process
    /// ends. A volume that fills anyway makes submits answer 503, never a lost job.
    pub async fn retain(self: Arc<Self>) {
        const BATCH: usize = 1_000;
        loop {
            let before = now_millis().saturating_sub(self.settings.retention.as_millis() as u64);
            // Bounded: a backlog goes a batch per commit, a few batches per round.
            for _ in 0..20 {
                let store = self.store.0.clone();
                let max = self.settings.retention_max_jobs;
                let pruned =
                    tokio::task::spawn_blocking(move || store.prune(before, max, BATCH)).await;
                match pruned {
                    Ok(Ok(n)) => {
                        self.metrics.pruned.inc_by(n as u64);
                        if n > 0 {
                            tracing::info!(jobs = n, "retention deleted finished jobs");
                        }
                        if n < BATCH {
                            break;
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "retention failed");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "retention task failed");
                        break;
                    }
                }
            }
            if let Some((used, total)) = self.store.0.fill() {
                self.metrics.store_used_bytes.set(used as i64);
                self.metrics.store_capacity_bytes.set(total as i64);
            }
            tokio::time::sleep(self.settings.retention_every).await;
        }
    }

    fn housekeeping(&self) {
        let now = now_millis();
        let mut st = self.lock();
        let expired: Vec<(String, Option<String>)> = st
            .jobs
            .values()
            .filter(|j| j.state == JobState::Queued && j.expires_at <= now)
            .map(|j| (j.id.clone(), j.pod.clone()))
            .collect();
        for (id, pod) in expired {
            if let Some(p) = pod.as_ref().and_then(|p| st.pods.get(p)) {
                let _ = p.commands.send(PodCommand::Delete(id.clone()));
            }
            let msg = "not started before its TTL";
            self.finish_locked(
                &mut st,
                &id,
                JobState::Expired,
                Some(JobError::new("expired", msg)),
            );
        }
        if let Some(limit) = self.settings.max_run {
            let limit_ms = limit.as_millis() as u64;
            let overran: Vec<(String, Option<String>)> = st
                .jobs
                .values()
                .filter(|j| j.state == JobState::Running)
                .filter(|j| {
                    j.started_at
                        .is_some_and(|t| now.saturating_sub(t) >= limit_ms)
                })
                .map(|j| (j.id.clone(), j.pod.clone()))
                .collect();
            for (id, pod) in overran {
                if let Some(p) = pod.as_ref().and_then(|p| st.pods.get_mut(p)) {
                    let _ = p.commands.send(PodCommand::Interrupt(id.clone()));
                    p.overran = Some(id.clone());
                }
                let msg = format!("ran longer than the run limit ({} s)", limit.as_secs());
                tracing::warn!(job = %id, ?pod, "run limit: interrupting the job");
                self.finish_locked(
                    &mut st,
                    &id,
                    JobState::Failed,
                    Some(JobError::new("run_timeout", msg)),
                );
            }
        }
        let lost: Vec<(String, Vec<String>)> = st
            .pods
            .iter_mut()
            .filter(|(_, p)| {
                p.unreachable_since
                    .is_some_and(|t| t.elapsed() >= self.settings.lost_after)
            })
            .filter(|(_, p)| !p.assigned.is_empty())
            .map(|(name, p)| (name.clone(), std::mem::take(&mut p.assigned)))
            .collect();
        for (name, ids) in lost {
            for id in ids {
                if let Some(j) = st.jobs.get_mut(&id) {
                    j.pod = Some(name.clone());
                }
                self.requeue_locked(&mut st, &id, "pod unreachable");
            }
        }
        if self.started.elapsed() >= self.settings.orphan_grace && !st.orphans.is_empty() {
            let orphans: Vec<String> = st.orphans.drain().flat_map(|(_, ids)| ids).collect();
            for id in orphans {
                self.requeue_locked(&mut st, &id, "its pod did not come back");
            }
        }
    }

    /// Chooses hand-offs under the lock and queues their store writes; the caller waits
    /// for each commit before sending it.
    #[allow(clippy::type_complexity)]
    fn assign(
        &self,
    ) -> Vec<(
        Job,
        mpsc::UnboundedSender<PodCommand>,
        oneshot::Receiver<Result<(), String>>,
    )> {
        let mut out = Vec::new();
        if *self.stopping.borrow() {
            return out;
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        let now = now_millis();
        let fleets: Vec<String> = st.queues.keys().cloned().collect();
        for fleet in fleets {
            loop {
                let choice = {
                    let Some(queue) = st.queues.get(&fleet) else {
                        break;
                    };
                    let queued: VecDeque<Queued> = queue
                        .iter()
                        .take(placement::WINDOW)
                        .filter_map(|id| st.jobs.get(id))
                        .map(|j| Queued {
                            id: &j.id,
                            checkpoint: j.checkpoint.as_deref(),
                            waited: Duration::from_millis(now.saturating_sub(j.created_at)),
                        })
                        .collect();
                    let mut names: Vec<&String> = st
                        .pods
                        .iter()
                        .filter(|(_, p)| {
                            p.fleet == fleet
                                && p.ready
                                && p.connected
                                && p.unreachable_since.is_none()
                                && p.overran.is_none()
                        })
                        .map(|(n, _)| n)
                        .collect();
                    names.sort();
                    let loads: Vec<PodLoad> = names
                        .iter()
                        .map(|n| {
                            let p = &st.pods[*n];
                            PodLoad {
                                name: n,
                                assigned: p.assigned.len(),
                                full: p.assigned.len() >= self.settings.pod_slots,
                                checkpoint: p.checkpoint.as_deref(),
                            }
                        })
                        .collect();
                    let max_skip = Duration::from_secs(30);
                    placement::next(self.settings.placement, &queued, &loads, max_skip)
                        .map(|(j, p)| (queued[j].id.to_string(), loads[p].name.to_string()))
                };
                let Some((id, pod_name)) = choice else { break };
                if let Some(q) = st.queues.get_mut(&fleet) {
                    q.retain(|j| *j != id);
                }
                let (Some(job), Some(pod)) = (st.jobs.get_mut(&id), st.pods.get_mut(&pod_name))
                else {
                    continue;
                };
                let assign = Transition::Assign {
                    pod: pod_name.clone(),
                    at: now,
                    cold_start: !pod.ran_any && pod.assigned.is_empty(),
                    checkpoint_switch: pod.checkpoint.is_some()
                        && job.checkpoint.is_some()
                        && pod.checkpoint != job.checkpoint,
                };
                if let Err(illegal) = lifecycle::apply(job, assign) {
                    tracing::warn!(job = %id, pod = %pod_name, %illegal, "not assigned");
                    continue;
                }
                tracing::debug!(job = %id, pod = %pod_name, attempt = job.attempts, "job handed to a pod");
                if job.checkpoint.is_some() {
                    pod.checkpoint = job.checkpoint.clone();
                }
                pod.assigned.push(id.clone());
                let (job, commands) = (job.clone(), pod.commands.clone());
                let committed = self.persist_acked(&job, true);
                out.push((job, commands, committed));
            }
        }
        out
    }

    fn refresh_gauges(&self) {
        let st = self.lock();
        let mut fleets: Vec<&String> = st.queues.keys().collect();
        fleets.extend(st.pods.values().map(|p| &p.fleet));
        for fleet in fleets {
            let labels = GatewayMetrics::fleet(fleet);
            let queued = st.queues.get(fleet).map_or(0, |q| q.len());
            let pods = st.pods.values().filter(|p| &p.fleet == fleet);
            let in_flight: usize = pods.clone().map(|p| p.assigned.len()).sum();
            let ready = pods.filter(|p| p.ready && p.connected).count();
            self.metrics
                .queued
                .get_or_create(&labels)
                .set(queued as i64);
            self.metrics
                .in_flight
                .get_or_create(&labels)
                .set(in_flight as i64);
            self.metrics.pods.get_or_create(&labels).set(ready as i64);
        }
    }

    /// Whether `id` is still meant to go to `pod` (a cancel may have come in between).
    fn still_assigned(&self, id: &str, pod: &str) -> bool {
        let st = self.lock();
        st.jobs
            .get(id)
            .is_some_and(|j| j.pod.as_deref() == Some(pod) && j.state == JobState::Queued)
    }

    /// A hand-off failed on the way (not refused): the job goes back to the queue, and
    /// the pod is taken out of service only if it does not answer `/system_stats` either.
    fn dispatch_failed(&self, id: &str, pod: &str, error: &PodError, pod_answers: bool) {
        tracing::warn!(job = %id, %pod, %error, pod_answers, "hand-off failed");
        let mut st = self.lock();
        if let Some(p) = st.pods.get_mut(pod) {
            self.metrics
                .dispatch_errors
                .get_or_create(&GatewayMetrics::fleet(&p.fleet))
                .inc();
            p.handing_off.retain(|j| j != id);
            if !pod_answers {
                p.connected = false;
                p.unreachable_since.get_or_insert_with(Instant::now);
            }
        }
        self.requeue_locked(&mut st, id, "hand-off failed");
    }

    /// Marks the start or end of a hand-off to `pod`.
    fn handing_off(&self, pod: &str, id: &str, active: bool) {
        if let Some(p) = self.lock().pods.get_mut(pod) {
            p.handing_off.retain(|j| j != id);
            if active {
                p.handing_off.push(id.to_string());
            }
        }
    }

    fn set_connected(&self, pod: &str, connected: bool) -> Vec<String> {
        let mut st = self.lock();
        let Some(p) = st.pods.get_mut(pod) else {
            return vec![];
        };
        p.connected = connected;
        if connected {
            p.unreachable_since = None;
        } else {
            p.unreachable_since.get_or_insert_with(Instant::now);
        }
        Self::settled_jobs(p)
    }

    /// The jobs of `pod` to ask it about, and whether there is anything to ask (a busy pod
    /// or one that overran).
    fn resync_targets(&self, pod: &str) -> Option<Vec<String>> {
        let st = self.lock();
        let p = st.pods.get(pod)?;
        (!p.assigned.is_empty() || p.overran.is_some()).then(|| Self::settled_jobs(p))
    }

    /// The pod's jobs whose hand-off is complete (the others it cannot know yet).
    fn settled_jobs(p: &Pod) -> Vec<String> {
        p.assigned
            .iter()
            .filter(|j| !p.handing_off.contains(j))
            .cloned()
            .collect()
    }

    /// The overrun prompt is no longer running on the pod: it may get jobs again.
    fn clear_overran(&self, pod: &str, queue: &QueueView) {
        let mut st = self.lock();
        if let Some(p) = st.pods.get_mut(pod)
            && p.overran.as_deref().is_some_and(|id| !queue.is_running(id))
        {
            p.overran = None;
            drop(st);
            self.wake.notify_one();
        }
    }

    async fn input_bytes(&self, input: &InputFile) -> Result<Bytes, String> {
        use base64::Engine as _;
        if let Some(data) = input.source.strip_prefix("base64:") {
            return base64::engine::general_purpose::STANDARD
                .decode(data)
                .map(Bytes::from)
                .map_err(|e| format!("input {}: bad base64: {e}", input.name));
        }
        let (bucket, key) = parse_s3_url(&input.source)
            .ok_or_else(|| format!("input {}: not base64: or s3://", input.name))?;
        if !self.settings.input_buckets.iter().any(|b| b == bucket) {
            return Err(format!(
                "input {}: bucket {bucket} is not allowed",
                input.name
            ));
        }
        let store = self.outputs.as_ref().ok_or("no S3 access configured")?;
        store
            .get_input(bucket, key)
            .await
            .map_err(|e| e.to_string())
    }

    /// A websocket event of `pod`.
    fn on_event(self: &Arc<Self>, pod: &str, client: &PodClient, event: PodEvent) {
        let id = event.prompt_id().to_string();
        let mut guard = self.lock();
        let st = &mut *guard;
        let ours = st
            .jobs
            .get(&id)
            .is_some_and(|j| j.pod.as_deref() == Some(pod));
        if !ours {
            if matches!(
                event,
                PodEvent::Succeeded { .. } | PodEvent::Failed { .. } | PodEvent::Interrupted { .. }
            ) && let Some(p) = st.pods.get_mut(pod)
                && p.overran.as_deref() == Some(id.as_str())
            {
                // The prompt that overran its limit has stopped: the pod may work again.
                p.overran = None;
                self.wake.notify_one();
            }
            // A prompt this gateway canceled, expired or moved: stop it there.
            if matches!(event, PodEvent::Started { .. }) {
                tracing::info!(job = %id, %pod, "stopping a prompt that is no longer this pod's");
                let client = client.clone();
                tokio::spawn(async move { client.interrupt(&id).await });
            }
            return;
        }
        match event {
            PodEvent::Succeeded { .. } => {
                if !self.release_slot(st, pod, &id) {
                    // A resync already saw it end and is storing its outputs.
                    return;
                }
                let Some(job) = st.jobs.get(&id).cloned() else {
                    return;
                };
                let this = self.clone();
                let client = client.clone();
                tokio::spawn(async move { this.complete(job, &client).await });
                return;
            }
            PodEvent::Failed { node, message, .. } => {
                self.release_slot(st, pod, &id);
                let mut error = JobError::new("execution_error", message);
                error.node = node;
                self.finish_locked(st, &id, JobState::Failed, Some(error));
                return;
            }
            PodEvent::Interrupted { .. } => {
                self.release_slot(st, pod, &id);
                if st.jobs.get(&id).is_some_and(|j| j.cancel_requested) {
                    self.finish_locked(st, &id, JobState::Canceled, None);
                } else {
                    let error = JobError::new("interrupted", "interrupted on the pod");
                    self.finish_locked(st, &id, JobState::Failed, Some(error));
                }
                return;
            }
            _ => {}
        }
        let Some(job) = st.jobs.get_mut(&id) else {
            return;
        };
        match event {
            PodEvent::Started { .. } => {
                let now = now_millis();
                // Refused when seen again on a resync after a reconnect or restart.
                if lifecycle::apply(job, Transition::Start { at: now }).is_err() {
                    return;
                }
                let waited = now.saturating_sub(job.created_at) as f64 / 1000.0;
                self.metrics
                    .queue_seconds
                    .get_or_create(&GatewayMetrics::fleet(&job.fleet))
                    .observe(waited);
                let job = job.clone();
                self.persist_later(&job);
                let data = json!({"state": "running", "pod": pod, "cold_start": job.cold_start, "checkpoint_switch": job.checkpoint_switch});
                Self::publish(st, &job, "state", data);
            }
            PodEvent::Executing { node, .. } => {
                let progress = job.progress.get_or_insert_with(Progress::default);
                if progress.node.as_deref() != Some(node.as_str()) {
                    *progress = Progress {
                        node: Some(node),
                        value: 0,
                        max: 0,
                    };
                }
                let (job, data) = (
                    job.clone(),
                    serde_json::to_value(&job.progress).unwrap_or_default(),
                );
                Self::publish(st, &job, "progress", data);
            }
            PodEvent::Progress {
                node, value, max, ..
            } => {
                let node = node.or_else(|| job.progress.as_ref().and_then(|p| p.node.clone()));
                job.progress = Some(Progress { node, value, max });
                let (job, data) = (
                    job.clone(),
                    serde_json::to_value(&job.progress).unwrap_or_default(),
                );
                Self::publish(st, &job, "progress", data);
            }
            PodEvent::Executed { outputs, .. } => {
                merge_outputs(&mut job.outputs, outputs);
                let (job, data) = (job.clone(), json!({"outputs": job.outputs}));
                Self::publish(st, &job, "output", data);
            }
            PodEvent::Succeeded { .. } | PodEvent::Failed { .. } | PodEvent::Interrupted { .. } => {
            }
        }
    }

    /// The pod is done with `id`: its slot frees now, before outputs are uploaded.
    /// Whether it held the job (false: someone else already saw it end).
    fn release_slot(&self, st: &mut State, pod: &str, id: &str) -> bool {
        let mut held = false;
        if let Some(p) = st.pods.get_mut(pod) {
            held = p.assigned.iter().any(|j| j == id);
            p.assigned.retain(|j| j != id);
            p.ran_any = true;
        }
        self.wake.notify_one();
        held
    }

    /// Stores a finished prompt's outputs and ends the job `succeeded`. The outputs are
    /// read from `/history`: the websocket may have missed some (ComfyUI drops events for
    /// a client whose socket is down). Each upload is tried `OUTPUT_ATTEMPTS` times; a
    /// pod that cannot be read any more gives the job back to the queue.
    async fn complete(&self, mut job: Job, client: &PodClient) {
        match client.history(&job.id).await {
            Ok(Some(entry)) => merge_outputs(&mut job.outputs, entry.outputs),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(job = %job.id, error = %e, "cannot read the job's outputs from its pod");
                let mut st = self.lock();
                self.requeue_locked(&mut st, &job.id, "its outputs could not be read");
                return;
            }
        }
        if let Some(store) = &self.outputs {
            for output in job.outputs.iter_mut() {
                let key = store.key(&job.id, output);
                let mut last_error = String::new();
                for attempt in 1..=OUTPUT_ATTEMPTS {
                    let stored = match client.view(output).await {
                        Ok(resp) => store
                            .put_response(&key, resp)
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    match stored {
                        Ok(size) => {
                            output.key = Some(key.clone());
                            output.size = Some(size);
                            last_error.clear();
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(job = %job.id, attempt, error = %e, "output upload failed");
                            last_error = e;
                            if attempt < OUTPUT_ATTEMPTS {
                                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                            }
                        }
                    }
                }
                if !last_error.is_empty() {
                    let error = JobError::new("output_failed", last_error);
                    self.finish(&job.id, JobState::Failed, Some(error));
                    return;
                }
            }
        }
        let cold = self.signals.get(&job.fleet).cold_start;
        let mut st = self.lock();
        if let Some(live) = st.jobs.get_mut(&job.id) {
            live.outputs = job.outputs;
            if let (Some(cold), Some(started)) = (cold, live.started_at) {
                live.cold_start_phases = super::demand::phases_for(&cold, live.created_at, started);
            }
        }
        self.finish_locked(&mut st, &job.id, JobState::Succeeded, None);
    }

    /// After (re)connecting: asks the pod about every job it should have, so that a job
    /// that ended while nobody listened ends here too, and one the pod lost runs again.
    async fn resync(
        self: &Arc<Self>,
        client: &PodClient,
        assigned: Vec<String>,
    ) -> Result<(), PodError> {
        let queue = client.queue().await?;
        self.clear_overran(&client.name, &queue);
        for id in &assigned {
            if queue.contains(id) {
                if queue.is_running(id) {
                    self.on_event(
                        &client.name,
                        client,
                        PodEvent::Started {
                            prompt_id: id.clone(),
                        },
                    );
                }
                continue;
            }
            let entry = client.history(id).await?;
            if let Some(job) = self.settle(&client.name, id, entry) {
                self.complete(job, client).await;
            }
        }
        // Prompts of this gateway's client that are no longer this pod's: stop them.
        for (id, running) in self.strays(client, &queue) {
            if running {
                client.interrupt(&id).await?;
            } else {
                client.delete_queued(&[&id]).await?;
            }
        }
        Ok(())
    }

    /// Ends or requeues a job the pod no longer queues, from its history entry. Returns
    /// the job when it succeeded there and its outputs are still to be stored.
    fn settle(&self, pod: &str, id: &str, entry: Option<HistoryEntry>) -> Option<Job> {
        let mut guard = self.lock();
        let st = &mut *guard;
        match entry {
            Some(entry) if entry.succeeded => {
                if !self.release_slot(st, pod, id) {
                    return None;
                }
                let job = st.jobs.get_mut(id)?;
                merge_outputs(&mut job.outputs, entry.outputs);
                job.started_at.get_or_insert_with(now_millis);
                Some(job.clone())
            }
            Some(entry) => {
                self.release_slot(st, pod, id);
                let cancel = st.jobs.get(id).is_some_and(|j| j.cancel_requested);
                let (state, error) = if cancel {
                    (JobState::Canceled, None)
                } else {
                    let msg = entry.error.unwrap_or_else(|| "interrupted".into());
                    (
                        JobState::Failed,
                        Some(JobError::new("execution_error", msg)),
                    )
                };
                self.finish_locked(st, id, state, error);
                None
            }
            None => {
                // Stored as handed off, unknown to the pod: the hand-off never arrived,
                // or the pod restarted and lost it. Run it again.
                self.requeue_locked(st, id, "unknown to its pod");
                None
            }
        }
    }

    /// (prompt id, running) of this client's prompts on `pod` that are not its jobs.
    fn strays(&self, client: &PodClient, queue: &QueueView) -> Vec<(String, bool)> {
        let pod = client.name.as_str();
        let st = self.lock();
        queue
            .running
            .iter()
            .map(|e| (e, true))
            .chain(queue.pending.iter().map(|e| (e, false)))
            .filter(|((_, c), _)| c.as_deref().is_some_and(|c| client.is_ours(c)))
            .filter(|((id, _), _)| {
                st.jobs
                    .get(id)
                    .is_none_or(|j| j.pod.as_deref() != Some(pod))
            })
            .map(|((id, _), running)| (id.clone(), running))
            .collect()
    }
}

/// Writes jobs in order, many per commit. A write that fails (a full or broken volume) is
/// tried again with backoff, always with the job's latest version, and reads keep
/// seeing that version until it is stored: a state change is never dropped, so a job
/// that ended stays ended.
async fn persister(
    store: Store,
    mut rx: mpsc::UnboundedReceiver<PersistRequest>,
    unflushed: Unflushed,
    metrics: Arc<GatewayMetrics>,
) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(100);
    let mut retry: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    let mut backoff = FIRST_BACKOFF;
    loop {
        let first = if retry.is_empty() {
            match rx.recv().await {
                Some(request) => Some(request),
                None => return,
            }
        } else {
            match tokio::time::timeout(backoff, rx.recv()).await {
                Ok(Some(request)) => Some(request),
                Ok(None) => return,
                Err(_) => None,
            }
        };
        let mut batch: Vec<PersistRequest> = first.into_iter().collect();
        while batch.len() < 256 {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        // Each job once, in its latest version (the one reads see).
        let mut ids: Vec<String> = Vec::new();
        for id in retry.iter().chain(batch.iter().map(|r| &r.job.id)) {
            if !ids.contains(id) {
                ids.push(id.clone());
            }
        }
        let jobs: Vec<Job> = {
            let map = unflushed.lock().unwrap_or_else(|e| e.into_inner());
            ids.iter()
                .filter_map(|id| match map.get(id) {
                    Some((job, _)) => Some(job.clone()),
                    None => batch
                        .iter()
                        .find(|r| &r.job.id == id)
                        .map(|r| r.job.clone()),
                })
                .collect()
        };
        let result = store.put_many(jobs).await.map_err(|e| e.to_string());
        match &result {
            Ok(()) => {
                retry.clear();
                backoff = FIRST_BACKOFF;
            }
            Err(e) => {
                metrics.store_errors.inc();
                tracing::error!(error = %e, retry_in = ?backoff, "cannot store jobs");
                retry.extend(batch.iter().filter(|r| r.retry).map(|r| r.job.id.clone()));
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        {
            let mut map = unflushed.lock().unwrap_or_else(|e| e.into_inner());
            for request in &batch {
                if let Some(entry) = map.get_mut(&request.job.id) {
                    entry.1 = entry.1.saturating_sub(1);
                }
            }
            // Stored, or given up (a refused submit): reads go to the store again.
            for id in &ids {
                if !retry.contains(id) && map.get(id).is_some_and(|(_, n)| *n == 0) {
                    map.remove(id);
                }
            }
        }
        for request in batch {
            if let Some(ack) = request.ack {
                let _ = ack.send(result.clone());
            }
        }
    }
}

/// One pod's worker: keeps its websocket, hands it jobs, stops what it is told to.
async fn run_pod(
    engine: Arc<Engine>,
    client: PodClient,
    mut commands: mpsc::UnboundedReceiver<PodCommand>,
) {
    let mut backoff = Duration::from_millis(200);
    let mut stop = engine.stopping.subscribe();
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        match client.events().await {
            Ok(mut events) => {
                backoff = Duration::from_millis(200);
                if let Some(version) = client.learn_version().await {
                    engine.learn_node_types(&client, &version).await;
                }
                let assigned = engine.set_connected(&client.name, true);
                if let Err(e) = engine.resync(&client, assigned).await {
                    tracing::warn!(pod = %client.name, error = %e, "resync failed");
                    engine.set_connected(&client.name, false);
                    tokio::time::sleep(backoff).await;
                    continue;
                }
                engine.wake.notify_one();
                let mut resync = tokio::time::interval(engine.settings.resync_every);
                resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                resync.tick().await;
                loop {
                    tokio::select! {
                        event = events.next() => match event {
                            Some(event) => engine.on_event(&client.name, &client, event),
                            None => break,
                        },
                        command = commands.recv() => match command {
                            Some(command) => handle(&engine, &client, command),
                            None => return,
                        },
                        // The socket closes as `events` drops.
                        _ = stop.changed() => return,
                        _ = resync.tick() => {
                            if let Some(jobs) = engine.resync_targets(&client.name)
                                && let Err(e) = engine.resync(&client, jobs).await
                            {
                                tracing::warn!(pod = %client.name, error = %e, "periodic resync failed");
                                break;
                            }
                        }
                    }
                }
                tracing::warn!(pod = %client.name, "websocket closed");
            }
            Err(e) => tracing::debug!(pod = %client.name, error = %e, "cannot connect"),
        }
        engine.set_connected(&client.name, false);
        // Commands that came while disconnected still go out (a delete or interrupt
        // may reach a pod whose websocket alone failed).
        while let Ok(command) = commands.try_recv() {
            handle(&engine, &client, command);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn handle(engine: &Arc<Engine>, client: &PodClient, command: PodCommand) {
    let (engine, client) = (engine.clone(), client.clone());
    tokio::spawn(async move {
        match command {
            PodCommand::Submit(job) => hand_off(&engine, &client, *job).await,
            PodCommand::Interrupt(id) => {
                if let Err(e) = client.interrupt(&id).await {
                    tracing::warn!(job = %id, error = %e, "interrupt failed");
                }
            }
            PodCommand::Delete(id) => {
                if let Err(e) = client.delete_queued(&[&id]).await {
                    tracing::warn!(job = %id, error = %e, "queue delete failed");
                }
            }
        }
    });
}

/// Uploads the job's inputs to the pod and queues its prompt there. A refusal (4xx)
/// fails the job: the input or workflow is wrong, and another pod would refuse it too.
/// A transport failure sends the job back to the queue, and takes the pod out of
/// service only if it does not answer `/system_stats` either.
async fn hand_off(engine: &Arc<Engine>, client: &PodClient, job: Job) {
    if !engine.still_assigned(&job.id, &client.name) {
        return;
    }
    engine.handing_off(&client.name, &job.id, true);
    let result = send_job(engine, client, &job).await;
    engine.handing_off(&client.name, &job.id, false);
    match result {
        Ok(()) => {}
        Err(HandOffError::Input(e)) => {
            engine.finish(
                &job.id,
                JobState::Failed,
                Some(JobError::new("input_failed", e)),
            );
        }
        Err(HandOffError::Pod {
            error:
                PodError::Rejected {
                    message,
                    error,
                    node_errors,
                },
            ..
        }) => {
            let error = super::comfy::rejection_error(&message, &error, &node_errors);
            engine.finish(&job.id, JobState::Failed, Some(error));
        }
        Err(HandOffError::Pod {
            error: PodError::Refused { status, message },
            input,
        }) => {
            let (kind, what) = match &input {
                Some(name) => ("invalid_input", format!("input {name}")),
                None => ("invalid_workflow", "the prompt".to_string()),
            };
            let mut error = JobError::new(
                kind,
                format!("ComfyUI refused {what} (HTTP {status}): {message}"),
            );
            error.input = input;
            engine.finish(&job.id, JobState::Failed, Some(error));
        }
        Err(HandOffError::Pod { error, .. }) => {
            let answers = client.system_stats().await.is_ok();
            engine.dispatch_failed(&job.id, &client.name, &error, answers);
        }
    }
}

enum HandOffError {
    /// The job's own input could not be read (bad base64, a bucket not allowed).
    Input(String),
    /// The pod refused or could not be reached; `input` names the input being uploaded.
    Pod {
        error: PodError,
        input: Option<String>,
    },
}

async fn send_job(engine: &Arc<Engine>, client: &PodClient, job: &Job) -> Result<(), HandOffError> {
    let mut prompt = job.prompt.clone();
    for input in &job.inputs {
        let bytes = engine
            .input_bytes(input)
            .await
            .map_err(HandOffError::Input)?;
        let stored = client
            .upload_image(&input.name, bytes)
            .await
            .map_err(|error| HandOffError::Pod {
                error,
                input: Some(input.name.clone()),
            })?;
        rename_input(&mut prompt, &input.name, &stored);
    }
    if !engine.still_assigned(&job.id, &client.name) {
        return Ok(());
    }
    client
        .submit(&job.id, &prompt)
        .await
        .map_err(|error| HandOffError::Pod { error, input: None })
}

/// Adds the outputs not yet listed (the websocket's and `/history`'s overlap).
fn merge_outputs(into: &mut Vec<super::job::Output>, more: Vec<super::job::Output>) {
    for o in more {
        if !into.iter().any(|x| {
            x.filename == o.filename && x.subfolder == o.subfolder && x.folder_type == o.folder_type
        }) {
            into.push(o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::job::Millis;
    use crate::gateway::store::{JobStore, ListQuery, Page, RedbStore, StoreError};
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A store whose writes fail while `down` (a full volume), over a real redb file.
    struct Flaky {
        inner: RedbStore,
        down: AtomicBool,
    }

    impl JobStore for Flaky {
        fn put_many(&self, jobs: &[Job]) -> Result<(), StoreError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::from_message("No space left on device".into()));
            }
            self.inner.put_many(jobs)
        }
        fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
            self.inner.get(id)
        }
        fn by_idempotency_key(&self, key: &str) -> Result<Option<String>, StoreError> {
            self.inner.by_idempotency_key(key)
        }
        fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
            self.inner.list(query)
        }
        fn unfinished(&self) -> Result<Vec<Job>, StoreError> {
            self.inner.unfinished()
        }
        fn prune(&self, before: Millis, max: usize, batch: usize) -> Result<usize, StoreError> {
            self.inner.prune(before, max, batch)
        }
    }

    fn request(job: &Job, unflushed: &Unflushed, retry: bool) -> PersistRequest {
        let mut map = unflushed.lock().unwrap();
        map.entry(job.id.clone()).or_insert((job.clone(), 0)).1 += 1;
        map.get_mut(&job.id).unwrap().0 = job.clone();
        PersistRequest {
            job: job.clone(),
            ack: None,
            retry,
        }
    }

    async fn stored_state(flaky: &Flaky, id: &str, want: Option<JobState>) -> Option<JobState> {
        for _ in 0..100 {
            let now = flaky.inner.get(id).unwrap().map(|j| j.state);
            if now == want {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        flaky.inner.get(id).unwrap().map(|j| j.state)
    }

    #[tokio::test]
    async fn a_state_change_the_store_refused_is_written_once_it_can_be() {
        let dir = std::env::temp_dir().join(format!(
            "sdfleet-persister-{}-{}",
            std::process::id(),
            now_millis()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let flaky = Arc::new(Flaky {
            inner: RedbStore::open(&dir.join("jobs.redb")).unwrap(),
            down: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let unflushed = Unflushed::default();
        tokio::spawn(persister(
            Store(flaky.clone()),
            rx,
            unflushed.clone(),
            Arc::new(GatewayMetrics::default()),
        ));
        let mut job = Job::for_test("j", JobState::Running, 1);
        tx.send(request(&job, &unflushed, true)).unwrap();
        assert_eq!(
            stored_state(&flaky, "j", Some(JobState::Running)).await,
            Some(JobState::Running)
        );

        // The volume fills as the job ends: the end is kept, and reads see it.
        flaky.down.store(true, Ordering::SeqCst);
        job.state = JobState::Succeeded;
        tx.send(request(&job, &unflushed, true)).unwrap();
        // A submit refused meanwhile is given up, never written later.
        let refused = Job::for_test("refused", JobState::Queued, 2);
        tx.send(request(&refused, &unflushed, false)).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            flaky.inner.get("j").unwrap().unwrap().state,
            JobState::Running
        );
        let seen = unflushed.lock().unwrap().get("j").map(|(j, _)| j.state);
        assert_eq!(
            seen,
            Some(JobState::Succeeded),
            "reads see the unstored end"
        );

        // Space again: the end is written without anyone asking.
        flaky.down.store(false, Ordering::SeqCst);
        assert_eq!(
            stored_state(&flaky, "j", Some(JobState::Succeeded)).await,
            Some(JobState::Succeeded)
        );
        assert_eq!(flaky.inner.get("refused").unwrap(), None);
        assert!(unflushed.lock().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
