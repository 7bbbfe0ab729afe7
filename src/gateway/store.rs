//! Where jobs live: `JobStore`, with an embedded redb file on the gateway's volume as
//! the one implementation today. Every state change is committed (fsync) before it is
//! acted on, so a gateway killed at any point restarts from what it last promised.
//! Progress is not stored: it is live only.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::job::{Job, JobState};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const IDEMPOTENCY: TableDefinition<&str, &str> = TableDefinition::new("idempotency");

#[derive(Debug, thiserror::Error)]
#[error("job store: {0}")]
pub struct StoreError(String);

impl StoreError {
    pub fn from_message(message: String) -> StoreError {
        StoreError(message)
    }
}

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        StoreError(e.into().to_string())
    }
}

/// The jobs of one gateway. A shared store for several replicas (a later issue) would
/// implement this over a database with conditional writes.
pub trait JobStore: Send + Sync + 'static {
    /// Writes the jobs in one commit, in order; a job with an idempotency key also
    /// records key → id (the first job of a key keeps it).
    fn put_many(&self, jobs: &[Job]) -> Result<(), StoreError>;
    fn put(&self, job: &Job) -> Result<(), StoreError> {
        self.put_many(std::slice::from_ref(job))
    }
    fn get(&self, id: &str) -> Result<Option<Job>, StoreError>;
    /// The job an idempotency key was first used for.
    fn by_idempotency_key(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// Jobs in `states` (all when empty), newest first, at most `limit`.
    fn list(&self, states: &[JobState], limit: usize) -> Result<Vec<Job>, StoreError>;
    /// Jobs that have not ended: what a restarted gateway resumes.
    fn unfinished(&self) -> Result<Vec<Job>, StoreError>;
}

pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(JOBS)?;
        txn.open_table(IDEMPOTENCY)?;
        txn.commit()?;
        Ok(RedbStore { db })
    }

    fn scan(&self, keep: impl Fn(&Job) -> bool) -> Result<Vec<Job>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(JOBS)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (_, value) = row?;
            match serde_json::from_slice::<Job>(value.value()) {
                Ok(job) if keep(&job) => out.push(job),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable stored job"),
            }
        }
        Ok(out)
    }
}

impl JobStore for RedbStore {
    fn put_many(&self, batch: &[Job]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut jobs = txn.open_table(JOBS)?;
            let mut keys = txn.open_table(IDEMPOTENCY)?;
            for job in batch {
                let bytes = serde_json::to_vec(job).map_err(|e| StoreError(e.to_string()))?;
                jobs.insert(job.id.as_str(), bytes.as_slice())?;
                if let Some(key) = &job.idempotency_key
                    && keys.get(key.as_str())?.is_none()
                {
                    keys.insert(key.as_str(), job.id.as_str())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(JOBS)?;
        let Some(value) = table.get(id)? else {
            return Ok(None);
        };
        serde_json::from_slice(value.value())
            .map(Some)
            .map_err(|e| StoreError(format!("job {id}: {e}")))
    }

    fn by_idempotency_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(IDEMPOTENCY)?;
        Ok(table.get(key)?.map(|v| v.value().to_string()))
    }

    fn list(&self, states: &[JobState], limit: usize) -> Result<Vec<Job>, StoreError> {
        let mut jobs = self.scan(|j| states.is_empty() || states.contains(&j.state))?;
        jobs.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        jobs.truncate(limit);
        Ok(jobs)
    }

    fn unfinished(&self) -> Result<Vec<Job>, StoreError> {
        let mut jobs = self.scan(|j| !j.state.is_final())?;
        jobs.sort_by_key(|j| j.created_at);
        Ok(jobs)
    }
}

/// The store from async code: each call runs on the blocking pool (a commit waits for
/// fsync).
#[derive(Clone)]
pub struct Store(pub Arc<dyn JobStore>);

impl Store {
    pub async fn put_many(&self, jobs: Vec<Job>) -> Result<(), StoreError> {
        let store = self.0.clone();
        blocking(move || store.put_many(&jobs)).await
    }

    pub async fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        let (store, id) = (self.0.clone(), id.to_string());
        blocking(move || store.get(&id)).await
    }

    pub async fn by_idempotency_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        let (store, key) = (self.0.clone(), key.to_string());
        blocking(move || store.by_idempotency_key(&key)).await
    }

    pub async fn list(&self, states: Vec<JobState>, limit: usize) -> Result<Vec<Job>, StoreError> {
        let store = self.0.clone();
        blocking(move || store.list(&states, limit)).await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError(format!("store task: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::job::now_millis;
    use serde_json::json;

    pub fn job(id: &str, state: JobState, created_at: u64) -> Job {
        Job {
            id: id.into(),
            fleet: "sdxl".into(),
            state,
            prompt: json!({}),
            inputs: vec![],
            checkpoint: None,
            webhook: None,
            idempotency_key: None,
            key_id: None,
            created_at,
            dispatched_at: None,
            started_at: None,
            finished_at: None,
            expires_at: now_millis() + 60_000,
            pod: None,
            attempts: 0,
            checkpoint_switch: false,
            cold_start: false,
            cold_start_phases: None,
            cancel_requested: false,
            progress: None,
            outputs: vec![],
            error: None,
        }
    }

    #[test]
    fn jobs_and_keys_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("sdfleet-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jobs.redb");
        let _ = std::fs::remove_file(&path);
        {
            let store = RedbStore::open(&path).unwrap();
            let mut a = job("a", JobState::Queued, 1);
            a.idempotency_key = Some("k1".into());
            store.put(&a).unwrap();
            store.put(&job("b", JobState::Succeeded, 2)).unwrap();
            // A second job with the same key does not take the key over.
            let mut c = job("c", JobState::Running, 3);
            c.idempotency_key = Some("k1".into());
            store.put(&c).unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(
            store.by_idempotency_key("k1").unwrap().as_deref(),
            Some("a")
        );
        assert_eq!(store.get("b").unwrap().unwrap().state, JobState::Succeeded);
        let ids = |jobs: Vec<Job>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
        assert_eq!(ids(store.unfinished().unwrap()), ["a", "c"]);
        assert_eq!(ids(store.list(&[], 10).unwrap()), ["c", "b", "a"]);
        assert_eq!(ids(store.list(&[JobState::Succeeded], 10).unwrap()), ["b"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
