//! What the store gets and when: every state change is queued here under the state lock
//! (so writes land in the order made), many per commit, and a failed one is written
//! again until it lands; submits wait for theirs. Also recovery after a restart,
//! retention, and the flush before exit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{Engine, PersistRequest, Unflushed};
use crate::gateway::job::{Job, now_millis};
use crate::gateway::metrics::GatewayMetrics;
use crate::gateway::store::Store;

/// Writes jobs in order, many per commit. A write that fails (a full or broken volume) is
/// tried again with backoff, always with the job's latest version, and reads keep
/// seeing that version until it is stored: a state change is never dropped, so a job
/// that ended stays ended.
pub(super) async fn persister(
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

impl Engine {
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

    pub(super) fn track(&self, job: &Job) {
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
    pub(super) fn persist_later(&self, job: &Job) {
        self.track(job);
        let _ = self.persist.send(PersistRequest {
            job: job.clone(),
            ack: None,
            retry: true,
        });
    }

    /// Queues a store write (under the state lock, as `persist_later`); the receiver
    /// says when it is committed, or why not. `retry`: a failed write is tried again.
    pub(super) fn persist_acked(
        &self,
        job: &Job,
        retry: bool,
    ) -> oneshot::Receiver<Result<(), String>> {
        self.track(job);
        let (tx, rx) = oneshot::channel();
        let _ = self.persist.send(PersistRequest {
            job: job.clone(),
            ack: Some(tx),
            retry,
        });
        rx
    }

    /// Loads unfinished jobs after a start: those on no pod are queued again; those on a
    /// pod wait for it to reappear and be asked (so no job runs twice).
    pub async fn recover(&self) -> Result<usize, crate::gateway::store::StoreError> {
        let store = self.store.0.clone();
        let jobs = tokio::task::spawn_blocking(move || store.unfinished())
            .await
            .map_err(|e| crate::gateway::store::StoreError::from_message(e.to_string()))??;
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::job::{JobState, Millis};
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
        // The writer forgets the entry just after the store has it: a bounded wait.
        for _ in 0..100 {
            if unflushed.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(unflushed.lock().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
