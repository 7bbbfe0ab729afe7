//! Handing out jobs: the pods discovery reports, the main loop (expiry, the run limit,
//! lost pods, then placement of queued jobs on pods with a free slot) and the gauges.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::pod_worker::run_pod;
use super::{Endpoint, Engine, Pod, PodCommand, State};
use crate::gateway::comfy::PodClient;
use crate::gateway::fair_share::{self, Caps, Waiting};
use crate::gateway::job::{Job, JobError, JobState, now_millis};
use crate::gateway::lifecycle::{self, Transition};
use crate::gateway::metrics::{GatewayMetrics, ShareLabels};
use crate::gateway::placement::{self, PodLoad, Queued};
use crate::gateway::pod_models::PodModels;

impl Engine {
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
                pod.models = ep.models.clone();
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
                    models: ep.models.clone(),
                    ran_any: false,
                    socket: 0,
                    prompted_on: HashMap::new(),
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

    pub(super) fn housekeeping(&self) {
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
    pub(super) fn assign(
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
            while let Some((id, pod_name)) = self.choose_locked(st, &fleet, now) {
                if let Some(q) = st.queues.get_mut(&fleet) {
                    q.retain(|j| *j != id);
                }
                let Some((job, commands)) = self.hand_to_locked(st, &id, &pod_name, now) else {
                    continue;
                };
                let committed = self.persist_acked(&job, true);
                out.push((job, commands, committed));
            }
        }
        out
    }

    /// The next hand-off of `fleet`'s queue, by the placement policy: (job, pod). Pods
    /// whose nodes hold the whole ModelSet are placed first; a pod on a node with only
    /// the hot models then gets a job whose models are all hot, if one waits.
    pub(super) fn choose_locked(
        &self,
        st: &State,
        fleet: &str,
        now: u64,
    ) -> Option<(String, String)> {
        let queue = st.queues.get(fleet)?;
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
        let (whole, hot): (Vec<&String>, Vec<&String>) = names
            .into_iter()
            .partition(|n| st.pods[*n].models == PodModels::All);
        self.place(st, fleet, queue, &whole, None, now).or_else(|| {
            let models = &st.pods[*hot.first()?].models;
            self.place(st, fleet, queue, &hot, Some(models), now)
        })
    }

    /// The placement policy over `pods`, among the queued jobs that `models` (when given)
    /// runs.
    fn place(
        &self,
        st: &State,
        fleet: &str,
        queue: &VecDeque<String>,
        pods: &[&String],
        models: Option<&PodModels>,
        now: u64,
    ) -> Option<(String, String)> {
        if pods.is_empty() {
            return None;
        }
        // The window in fair-share order: a share at its cap is left out.
        let window = fair_share::order(
            waiting(st, queue).filter(|w| models.is_none_or(|m| m.runs(&w.item.prompt))),
            on_pods(st, fleet),
            &usage_at(st, fleet, now),
            self.settings.shares.as_ref(),
            Caps::Respect,
            placement::WINDOW,
        );
        let queued: VecDeque<Queued> = window
            .into_iter()
            .map(|j| Queued {
                id: &j.id,
                checkpoint: j.checkpoint.as_deref(),
                waited: Duration::from_millis(now.saturating_sub(j.created_at)),
            })
            .collect();
        let loads: Vec<PodLoad> = pods
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
    }

    /// True when job `id` waits only because every ready pod of its fleet is on a node
    /// that holds just the hot models, and the job needs more.
    pub fn waits_for_models(&self, id: &str) -> bool {
        let st = self.lock();
        let Some(job) = st.jobs.get(id) else {
            return false;
        };
        let mut ready = st
            .pods
            .values()
            .filter(|p| p.fleet == job.fleet && p.ready)
            .peekable();
        ready.peek().is_some() && ready.all(|p| !p.models.runs(&job.prompt))
    }

    /// Puts job `id` (out of its queue) on `pod_name`: assigned and in hand-off. The job
    /// as it is to be stored, and the pod's command channel; `None` if it may not go.
    pub(super) fn hand_to_locked(
        &self,
        st: &mut State,
        id: &str,
        pod_name: &str,
        now: u64,
    ) -> Option<(Job, mpsc::UnboundedSender<PodCommand>)> {
        let (Some(job), Some(pod)) = (st.jobs.get_mut(id), st.pods.get_mut(pod_name)) else {
            return None;
        };
        let assign = Transition::Assign {
            pod: pod_name.to_string(),
            at: now,
            cold_start: !pod.ran_any && pod.assigned.is_empty(),
            checkpoint_switch: pod.checkpoint.is_some()
                && job.checkpoint.is_some()
                && pod.checkpoint != job.checkpoint,
        };
        if let Err(illegal) = lifecycle::apply(job, assign) {
            tracing::warn!(job = %id, pod = %pod_name, %illegal, "not assigned");
            return None;
        }
        tracing::debug!(job = %id, pod = %pod_name, attempt = job.attempts, "job handed to a pod");
        if job.checkpoint.is_some() {
            pod.checkpoint = job.checkpoint.clone();
        }
        pod.assigned.push(id.to_string());
        // In hand-off from now: a resync that runs before the pod has the prompt must
        // not take the job for lost (it would run twice, and the stop sent to the first
        // run would interrupt the second).
        pod.handing_off.push(id.to_string());
        let handed = (job.clone(), pod.commands.clone());
        // Its share's use: fair share orders the next jobs by it.
        let share = self
            .settings
            .shares
            .share_of(handed.0.key_id.as_deref())
            .name;
        st.usage
            .entry(handed.0.fleet.clone())
            .or_default()
            .entry(share)
            .or_default()
            .add_start(now);
        Some(handed)
    }

    /// At admission, a job of a fleet with nothing waiting goes to a pod at once, so its
    /// one store write holds both the job and where it runs (a hand-off otherwise waits
    /// for a second write). The job as placed and its pod's command channel, if placed.
    pub(super) fn place_at_admission(
        &self,
        st: &mut State,
        id: &str,
        fleet: &str,
    ) -> Option<(Job, mpsc::UnboundedSender<PodCommand>)> {
        if *self.stopping.borrow() || st.queues.get(fleet).is_some_and(|q| !q.is_empty()) {
            return None;
        }
        let now = now_millis();
        st.queues
            .entry(fleet.to_string())
            .or_default()
            .push_back(id.to_string());
        let choice = self.choose_locked(st, fleet, now);
        if let Some(q) = st.queues.get_mut(fleet) {
            q.retain(|j| j != id);
        }
        let (chosen, pod_name) = choice?;
        self.hand_to_locked(st, &chosen, &pod_name, now)
    }

    pub(super) fn refresh_gauges(&self) {
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
        self.refresh_share_gauges(&st);
    }
}

/// The jobs of `queue`, in its order, as fair share sees them.
fn waiting<'a>(
    st: &'a State,
    queue: &'a VecDeque<String>,
) -> impl Iterator<Item = Waiting<'a, &'a Job>> {
    queue
        .iter()
        .filter_map(|id| st.jobs.get(id))
        .map(|j| Waiting {
            item: j,
            key_id: j.key_id.as_deref(),
            priority: j.priority,
        })
}

/// Each share's recent use of `fleet`'s pods at `now`.
fn usage_at(st: &State, fleet: &str, now: u64) -> HashMap<String, f64> {
    st.usage
        .get(fleet)
        .map(|shares| shares.iter().map(|(s, u)| (s.clone(), u.at(now))).collect())
        .unwrap_or_default()
}

/// The key id of each of `fleet`'s jobs on a pod: handed over, prefetched or running,
/// until it ends (its outputs stored), as its client sees it `running`.
fn on_pods<'a>(st: &'a State, fleet: &'a str) -> impl Iterator<Item = Option<&'a str>> {
    st.jobs
        .values()
        .filter(move |j| j.fleet == fleet && j.pod.is_some())
        .map(|j| j.key_id.as_deref())
}

impl Engine {
    /// Jobs ahead of queued job `id` in its fleet's fair-share order (caps aside: a share
    /// at its cap holds its place); `None` once it left the queue.
    pub fn queue_position(&self, id: &str) -> Option<usize> {
        let st = self.lock();
        let job = st.jobs.get(id).filter(|j| j.pod.is_none())?;
        let queue = st.queues.get(&job.fleet)?;
        fair_share::order(
            waiting(&st, queue),
            on_pods(&st, &job.fleet),
            &usage_at(&st, &job.fleet, now_millis()),
            self.settings.shares.as_ref(),
            Caps::Ignore,
            queue.len(),
        )
        .iter()
        .position(|j| j.id == id)
    }
}

impl Engine {
    /// Queued and on-pod jobs per fair share; shares seen before and now empty read 0.
    fn refresh_share_gauges(&self, st: &State) {
        let mut counts: HashMap<ShareLabels, (i64, i64)> = HashMap::new();
        let mut names: HashMap<Option<&str>, String> = HashMap::new();
        // `jobs` holds unfinished jobs only.
        for job in st.jobs.values() {
            let share = names
                .entry(job.key_id.as_deref())
                .or_insert_with(|| self.settings.shares.share_of(job.key_id.as_deref()).name)
                .clone();
            let entry = counts
                .entry(ShareLabels {
                    fleet: job.fleet.clone(),
                    share,
                })
                .or_default();
            if job.pod.is_some() {
                entry.1 += 1;
            } else {
                entry.0 += 1;
            }
        }
        let mut seen = self
            .metrics
            .shares_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        seen.extend(counts.keys().cloned());
        for labels in seen.iter() {
            let (queued, on_pods) = counts.get(labels).copied().unwrap_or_default();
            self.metrics.share_queued.get_or_create(labels).set(queued);
            self.metrics
                .share_in_flight
                .get_or_create(labels)
                .set(on_pods);
        }
    }
}

impl Engine {
    /// The cap of queued job `id`'s share when the share holds that many jobs on pods
    /// already (it waits for one of them to end, whatever the pods' room).
    pub fn share_at_cap(&self, id: &str) -> Option<u32> {
        let st = self.lock();
        let job = st.jobs.get(id).filter(|j| j.pod.is_none())?;
        let share = self.settings.shares.share_of(job.key_id.as_deref());
        let held = on_pods(&st, &job.fleet)
            .filter(|key| self.settings.shares.share_of(*key).name == share.name)
            .count();
        share
            .at_cap(held as u64)
            .then_some(share.max_running)
            .flatten()
    }
}
