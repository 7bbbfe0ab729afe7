//! One pod's worker: its websocket, hand-offs (inputs, `/prompt`), its events, and the
//! resync that asks the pod about every job it should have.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;

use super::completion::{Outputs, merge_outputs};
use super::{Engine, Pod, PodCommand, State};
use crate::gateway::comfy::{HistoryEntry, PodClient, PodError, PodEvent, QueueView};
use crate::gateway::job::{InputFile, Job, JobError, JobState, Progress, now_millis};
use crate::gateway::lifecycle::{self, Transition};
use crate::gateway::metrics::{GatewayMetrics, ShareLabels};
use crate::gateway::outputs::parse_s3_url;
use crate::gateway::workflow::rename_input;

/// One pod's worker: keeps its websocket, hands it jobs, stops what it is told to.
pub(super) async fn run_pod(
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

pub(super) fn handle(engine: &Arc<Engine>, client: &PodClient, command: PodCommand) {
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
pub(super) async fn hand_off(engine: &Arc<Engine>, client: &PodClient, job: Job) {
    if !engine.still_assigned(&job.id, &client.name) {
        return;
    }
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
            let error = crate::gateway::comfy::rejection_error(&message, &error, &node_errors);
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

pub(super) enum HandOffError {
    /// The job's own input could not be read (bad base64, a bucket not allowed).
    Input(String),
    /// The pod refused or could not be reached; `input` names the input being uploaded.
    Pod {
        error: PodError,
        input: Option<String>,
    },
}

pub(super) async fn send_job(
    engine: &Arc<Engine>,
    client: &PodClient,
    job: &Job,
) -> Result<(), HandOffError> {
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
    engine.prompt_going_out(&client.name, &job.id);
    client
        .submit(&job.id, &prompt)
        .await
        .map_err(|error| HandOffError::Pod { error, input: None })
}

impl Engine {
    /// Whether `id` is still meant to go to `pod` (a cancel may have come in between).
    pub(super) fn still_assigned(&self, id: &str, pod: &str) -> bool {
        let st = self.lock();
        st.jobs
            .get(id)
            .is_some_and(|j| j.pod.as_deref() == Some(pod) && j.state == JobState::Queued)
    }

    /// A hand-off failed on the way (not refused): the job goes back to the queue, and
    /// the pod is taken out of service only if it does not answer `/system_stats` either.
    pub(super) fn dispatch_failed(&self, id: &str, pod: &str, error: &PodError, pod_answers: bool) {
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

    /// `id`'s prompt is about to be sent to `pod`: on which socket its events will come.
    pub(super) fn prompt_going_out(&self, pod: &str, id: &str) {
        if let Some(p) = self.lock().pods.get_mut(pod)
            && p.connected
        {
            let socket = p.socket;
            p.prompted_on.insert(id.to_string(), socket);
        }
    }

    /// Marks the start or end of a hand-off to `pod`.
    pub(super) fn handing_off(&self, pod: &str, id: &str, active: bool) {
        if let Some(p) = self.lock().pods.get_mut(pod) {
            p.handing_off.retain(|j| j != id);
            if active {
                p.handing_off.push(id.to_string());
            }
        }
    }

    pub(super) fn set_connected(&self, pod: &str, connected: bool) -> Vec<String> {
        let mut st = self.lock();
        let Some(p) = st.pods.get_mut(pod) else {
            return vec![];
        };
        p.connected = connected;
        if connected {
            p.socket += 1;
            p.unreachable_since = None;
        } else {
            p.unreachable_since.get_or_insert_with(Instant::now);
        }
        Self::settled_jobs(p)
    }

    /// The jobs of `pod` to ask it about, and whether there is anything to ask (a busy pod
    /// or one that overran).
    pub(super) fn resync_targets(&self, pod: &str) -> Option<Vec<String>> {
        let st = self.lock();
        let p = st.pods.get(pod)?;
        (!p.assigned.is_empty() || p.overran.is_some()).then(|| Self::settled_jobs(p))
    }

    /// The pod's jobs whose hand-off is complete (the others it cannot know yet).
    pub(super) fn settled_jobs(p: &Pod) -> Vec<String> {
        p.assigned
            .iter()
            .filter(|j| !p.handing_off.contains(j))
            .cloned()
            .collect()
    }

    /// The overrun prompt is no longer running on the pod: it may get jobs again.
    pub(super) fn clear_overran(&self, pod: &str, queue: &QueueView) {
        let mut st = self.lock();
        if let Some(p) = st.pods.get_mut(pod)
            && p.overran.as_deref().is_some_and(|id| !queue.is_running(id))
        {
            p.overran = None;
            drop(st);
            self.wake.notify_one();
        }
    }

    pub(super) async fn input_bytes(&self, input: &InputFile) -> Result<Bytes, String> {
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
    pub(super) fn on_event(self: &Arc<Self>, pod: &str, client: &PodClient, event: PodEvent) {
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
                let heard_all = st.pods.get(pod).is_some_and(|p| p.heard_all_of(&id));
                if !self.release_slot(st, pod, &id) {
                    // A resync already saw it end and is storing its outputs.
                    return;
                }
                let Some(job) = st.jobs.get(&id).cloned() else {
                    return;
                };
                let this = self.clone();
                let client = client.clone();
                let outputs = if heard_all {
                    Outputs::Complete
                } else {
                    Outputs::AskHistory
                };
                tokio::spawn(async move { this.complete(job, &client, outputs).await });
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
                let share = ShareLabels {
                    fleet: job.fleet.clone(),
                    share: self.settings.shares.share_of(job.key_id.as_deref()).name,
                };
                self.metrics
                    .share_waited_seconds
                    .get_or_create(&share)
                    .inc_by(waited);
                self.metrics.share_started.get_or_create(&share).inc();
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
    pub(super) fn release_slot(&self, st: &mut State, pod: &str, id: &str) -> bool {
        let mut held = false;
        if let Some(p) = st.pods.get_mut(pod) {
            held = p.assigned.iter().any(|j| j == id);
            p.release(id);
            p.ran_any = true;
        }
        self.wake.notify_one();
        held
    }

    /// After (re)connecting: asks the pod about every job it should have, so that a job
    /// that ended while nobody listened ends here too, and one the pod lost runs again.
    pub(super) async fn resync(
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
                // `settle` took its outputs from the `/history` entry just read.
                self.complete(job, client, Outputs::Complete).await;
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
    pub(super) fn settle(&self, pod: &str, id: &str, entry: Option<HistoryEntry>) -> Option<Job> {
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
    pub(super) fn strays(&self, client: &PodClient, queue: &QueueView) -> Vec<(String, bool)> {
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
