//! Where jobs live: `JobStore`, with an embedded redb file on the gateway's volume for
//! one replica, and PostgreSQL (`postgres`) for several. Every state change is committed (fsync) before it is
//! acted on, so a gateway killed at any point restarts from what it last promised.
//! Progress is not stored: it is live only.
//!
//! Lists come from two index tables written in the same commit as the job: every job by
//! (created at, id), and each API key's jobs by (key id, created at, id). Those fields
//! never change after submit, so a rewrite of the job (a state change) only rewrites
//! the index value, which is the job's state: a state filter reads the index, not the
//! jobs, and a page deserializes only the jobs it returns.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;

use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table, TableDefinition,
};
use serde::Deserialize;

use super::job::{Job, JobState, Millis};

mod postgres;
pub use postgres::{LeaseView, PgStore};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// `<key id>/<Idempotency-Key>` → the job it was first used for. An entry lives as long
/// as its job: retention deletes both in one commit (`unindex` removes this entry and the
/// job's index entries).
const IDEMPOTENCY: TableDefinition<&str, &str> = TableDefinition::new("idempotency");
/// Every job: `time_key` → state code.
const BY_TIME: TableDefinition<&[u8], u8> = TableDefinition::new("jobs_by_time");
/// Jobs per API key: `owner_prefix(key id) ++ time_key` → state code.
const BY_KEY: TableDefinition<&[u8], u8> = TableDefinition::new("jobs_by_key");
/// The store's own facts: `index_version`.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Bumped when the index layout changes: opening an older file rebuilds the index.
const INDEX_VERSION: u64 = 1;
/// Index entries one page may walk past (jobs of other states) before it answers with
/// what it has and a cursor: a rare state never makes a page read the whole index.
const SCAN_BUDGET: usize = 5_000;

#[derive(Debug, thiserror::Error)]
#[error("job store: {message}")]
pub struct StoreError {
    message: String,
    /// The volume failed (full, read-only, gone): the database must be opened again.
    io: bool,
    /// A shared store refused a write: another replica holds the gateway's lease now.
    lease_lost: bool,
}

impl StoreError {
    pub fn from_message(message: String) -> StoreError {
        StoreError {
            message,
            io: false,
            lease_lost: false,
        }
    }

    pub fn lease_lost(message: String) -> StoreError {
        StoreError {
            message,
            io: false,
            lease_lost: true,
        }
    }

    pub fn is_lease_lost(&self) -> bool {
        self.lease_lost
    }
}

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        let e = e.into();
        let io = matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo);
        StoreError {
            message: e.to_string(),
            io,
            lease_lost: false,
        }
    }
}

/// Where a page ends: the next page starts at the job after it (older). Opaque to
/// clients (hex); it carries no key id, so it only moves within the caller's own list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: Millis,
    pub id: String,
}

impl Cursor {
    pub fn encode(&self) -> String {
        hex::encode(time_key(self.created_at, &self.id))
    }

    /// `None`: not a cursor this store gave out.
    pub fn decode(text: &str) -> Option<Cursor> {
        Cursor::from_time_key(&hex::decode(text).ok()?)
    }

    fn from_time_key(key: &[u8]) -> Option<Cursor> {
        let (time, id) = key.split_first_chunk::<8>()?;
        let id = std::str::from_utf8(id).ok().filter(|id| !id.is_empty())?;
        Some(Cursor {
            created_at: u64::from_be_bytes(*time),
            id: id.to_string(),
        })
    }
}

/// What to list: newest first.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    /// Only the jobs submitted with this API key; `None`: every job.
    pub key_id: Option<String>,
    /// Only jobs in these states; empty: any.
    pub states: Vec<JobState>,
    pub limit: usize,
    /// Start after this position (from the previous page's `next`).
    pub cursor: Option<Cursor>,
}

/// One page. `next` is set while the list may go on; a page can hold fewer than `limit`
/// jobs and still have `next` (a state filter met its walk budget).
#[derive(Debug, Default)]
pub struct Page {
    pub jobs: Vec<Job>,
    pub next: Option<Cursor>,
}

/// The jobs of one gateway: an embedded file for one replica (`RedbStore`), or
/// PostgreSQL shared by several (`PgStore`, whose writes are fenced by the lease).
pub trait JobStore: Send + Sync + 'static {
    /// Writes the jobs in one commit, in order, with their index entries; a job with an
    /// idempotency key also records key → id (the first job of a key keeps it).
    fn put_many(&self, jobs: &[Job]) -> Result<(), StoreError>;
    fn put(&self, job: &Job) -> Result<(), StoreError> {
        self.put_many(std::slice::from_ref(job))
    }
    fn get(&self, id: &str) -> Result<Option<Job>, StoreError>;
    /// The job an idempotency key was first used for.
    fn by_idempotency_key(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// A page of jobs, newest first, from the index (never a scan of every job).
    fn list(&self, query: &ListQuery) -> Result<Page, StoreError>;
    /// Jobs that have not ended, oldest first: what a restarted gateway resumes.
    fn unfinished(&self) -> Result<Vec<Job>, StoreError>;
    /// Retention: deletes finished jobs created before `before`, and the oldest finished
    /// ones beyond `max_jobs` in all, with their index and idempotency entries (a key
    /// expires with its job); at most `batch` in one call. Returns how many went.
    fn prune(&self, before: Millis, max_jobs: usize, batch: usize) -> Result<usize, StoreError>;
    /// (bytes used, bytes in all) of the volume the store is on, if it can tell.
    fn fill(&self) -> Option<(u64, u64)> {
        None
    }
}

/// `created_at` (big-endian, so bytes sort as numbers) then the id.
fn time_key(created_at: Millis, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + id.len());
    key.extend_from_slice(&created_at.to_be_bytes());
    key.extend_from_slice(id.as_bytes());
    key
}

/// A key id with its length first, so no key id's entries run into another's.
fn owner_prefix(key_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(4 + key_id.len());
    key.extend_from_slice(&(key_id.len() as u32).to_be_bytes());
    key.extend_from_slice(key_id.as_bytes());
    key
}

fn state_code(state: JobState) -> u8 {
    match state {
        JobState::Queued => 0,
        JobState::Running => 1,
        JobState::Succeeded => 2,
        JobState::Failed => 3,
        JobState::Canceled => 4,
        JobState::Expired => 5,
    }
}

fn state_of(code: u8) -> Option<JobState> {
    JobState::ALL.into_iter().find(|s| state_code(*s) == code)
}

/// The fields the index is built from (a stored job read without its workflow's types).
#[derive(Deserialize)]
struct Indexed {
    created_at: Millis,
    state: JobState,
    #[serde(default)]
    key_id: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

impl Indexed {
    fn of(job: &Job) -> Indexed {
        Indexed {
            created_at: job.created_at,
            state: job.state,
            key_id: job.key_id.clone(),
            idempotency_key: job.idempotency_key.clone(),
        }
    }
}

struct IndexTables<'t> {
    by_time: Table<'t, &'static [u8], u8>,
    by_key: Table<'t, &'static [u8], u8>,
}

impl IndexTables<'_> {
    fn index(&mut self, id: &str, job: &Indexed) -> Result<(), StoreError> {
        let time = time_key(job.created_at, id);
        let code = state_code(job.state);
        self.by_time.insert(time.as_slice(), code)?;
        if let Some(key_id) = &job.key_id {
            let key = [owner_prefix(key_id), time].concat();
            self.by_key.insert(key.as_slice(), code)?;
        }
        Ok(())
    }

    /// Removes a job's index entries. With `idempotency`, its key's entry too when it
    /// points at this job: what deleting a job (retention) must do in the same commit.
    fn unindex(
        &mut self,
        id: &str,
        job: &Indexed,
        idempotency: Option<&mut Table<'_, &'static str, &'static str>>,
    ) -> Result<(), StoreError> {
        let time = time_key(job.created_at, id);
        self.by_time.remove(time.as_slice())?;
        if let Some(key_id) = &job.key_id {
            let key = [owner_prefix(key_id), time].concat();
            self.by_key.remove(key.as_slice())?;
        }
        if let (Some(keys), Some(key)) = (idempotency, &job.idempotency_key) {
            let ours = keys.get(key.as_str())?.is_some_and(|v| v.value() == id);
            if ours {
                keys.remove(key.as_str())?;
            }
        }
        Ok(())
    }
}

pub struct RedbStore {
    db: std::sync::RwLock<Option<Database>>,
    path: std::path::PathBuf,
    /// `SCAN_BUDGET`, smaller in tests.
    scan_budget: usize,
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        Ok(RedbStore {
            db: std::sync::RwLock::new(Some(Self::open_db(path)?)),
            path: path.to_path_buf(),
            scan_budget: SCAN_BUDGET,
        })
    }

    /// Runs `f` on the open database. After a failure it is closed and opened again:
    /// redb refuses every later call on a database that saw an I/O error (a full
    /// volume), so without this the store would never write again.
    fn with_db<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let result = {
            let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
            match guard.as_ref() {
                Some(db) => f(db),
                None => Err(StoreError::from_message("closed after an I/O error".into())),
            }
        };
        if let Err(e) = &result {
            let mut guard = self.db.write().unwrap_or_else(|e| e.into_inner());
            if e.io || guard.is_none() {
                // One open handle per file: the old one goes first.
                guard.take();
                match Self::open_db(&self.path) {
                    Ok(db) => *guard = Some(db),
                    Err(e) => tracing::error!(error = %e, "cannot reopen the job store"),
                }
            }
        }
        result
    }

    fn open_db(path: &Path) -> Result<Database, StoreError> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(JOBS)?;
        txn.open_table(IDEMPOTENCY)?;
        let version = txn
            .open_table(META)?
            .get("index_version")?
            .map(|v| v.value());
        if version != Some(INDEX_VERSION) {
            rebuild_index(&txn)?;
        }
        txn.commit()?;
        Ok(db)
    }
}

/// Builds the index tables from the jobs: once, for a file written before they existed.
fn rebuild_index(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    txn.delete_table(BY_TIME)?;
    txn.delete_table(BY_KEY)?;
    let jobs = txn.open_table(JOBS)?;
    let mut index = IndexTables {
        by_time: txn.open_table(BY_TIME)?,
        by_key: txn.open_table(BY_KEY)?,
    };
    let mut n = 0u64;
    for row in jobs.iter()? {
        let (id, value) = row?;
        match serde_json::from_slice::<Indexed>(value.value()) {
            Ok(job) => {
                index.index(id.value(), &job)?;
                n += 1;
            }
            Err(e) => {
                tracing::warn!(id = %id.value(), error = %e, "stored job not indexed: unreadable")
            }
        }
    }
    txn.open_table(META)?
        .insert("index_version", INDEX_VERSION)?;
    tracing::info!(jobs = n, "job store index built");
    Ok(())
}

impl JobStore for RedbStore {
    fn put_many(&self, batch: &[Job]) -> Result<(), StoreError> {
        self.with_db(|db| Self::put_many_in(db, batch))
    }

    fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        self.with_db(|db| Self::get_in(db, id))
    }

    fn by_idempotency_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.with_db(|db| Self::by_idempotency_key_in(db, key))
    }

    fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
        self.with_db(|db| self.list_in(db, query))
    }

    fn unfinished(&self) -> Result<Vec<Job>, StoreError> {
        self.with_db(Self::unfinished_in)
    }

    fn prune(&self, before: Millis, max_jobs: usize, batch: usize) -> Result<usize, StoreError> {
        self.with_db(|db| Self::prune_in(db, before, max_jobs, batch))
    }

    fn fill(&self) -> Option<(u64, u64)> {
        volume_fill(self.path.parent()?)
    }
}

impl RedbStore {
    fn put_many_in(db: &Database, batch: &[Job]) -> Result<(), StoreError> {
        let txn = db.begin_write()?;
        {
            let mut jobs = txn.open_table(JOBS)?;
            let mut keys = txn.open_table(IDEMPOTENCY)?;
            let mut index = IndexTables {
                by_time: txn.open_table(BY_TIME)?,
                by_key: txn.open_table(BY_KEY)?,
            };
            for job in batch {
                let bytes =
                    serde_json::to_vec(job).map_err(|e| StoreError::from_message(e.to_string()))?;
                let before = jobs
                    .insert(job.id.as_str(), bytes.as_slice())?
                    .and_then(|old| serde_json::from_slice::<Indexed>(old.value()).ok());
                // The index key's fields are set at submit; should a rewrite ever change
                // them, the old entries go, so no entry points at a job that moved.
                if let Some(before) = before
                    && (before.created_at != job.created_at || before.key_id != job.key_id)
                {
                    index.unindex(&job.id, &before, None)?;
                }
                index.index(&job.id, &Indexed::of(job))?;
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

    fn get_in(db: &Database, id: &str) -> Result<Option<Job>, StoreError> {
        let txn = db.begin_read()?;
        let table = txn.open_table(JOBS)?;
        let Some(value) = table.get(id)? else {
            return Ok(None);
        };
        serde_json::from_slice(value.value())
            .map(Some)
            .map_err(|e| StoreError::from_message(format!("job {id}: {e}")))
    }

    fn by_idempotency_key_in(db: &Database, key: &str) -> Result<Option<String>, StoreError> {
        let txn = db.begin_read()?;
        let table = txn.open_table(IDEMPOTENCY)?;
        Ok(table.get(key)?.map(|v| v.value().to_string()))
    }

    fn list_in(&self, db: &Database, query: &ListQuery) -> Result<Page, StoreError> {
        let txn = db.begin_read()?;
        let jobs = txn.open_table(JOBS)?;
        let (index, prefix) = match &query.key_id {
            Some(key_id) => (txn.open_table(BY_KEY)?, owner_prefix(key_id)),
            None => (txn.open_table(BY_TIME)?, Vec::new()),
        };
        // Newest first is a reverse walk from just before the cursor (or the end of this
        // key's entries) down to the key's first entry.
        let upper = match &query.cursor {
            Some(c) => {
                Bound::Excluded([prefix.as_slice(), &time_key(c.created_at, &c.id)].concat())
            }
            // Ids are UTF-8, which has no 0xFF byte: past every entry of this key.
            None if !prefix.is_empty() => Bound::Excluded([prefix.as_slice(), &[0xFF; 9]].concat()),
            None => Bound::Unbounded,
        };
        let lower = Bound::Included(prefix.clone());
        let bounds = (
            lower.as_ref().map(Vec::as_slice),
            upper.as_ref().map(Vec::as_slice),
        );
        let mut page = Page::default();
        let mut last: Option<Cursor> = None;
        for (walked, row) in index.range::<&[u8]>(bounds)?.rev().enumerate() {
            if page.jobs.len() >= query.limit || walked >= self.scan_budget {
                // More entries follow: the next page starts after the last one seen.
                page.next = last;
                return Ok(page);
            }
            let (key, code) = row?;
            let Some(position) = key
                .value()
                .get(prefix.len()..)
                .and_then(Cursor::from_time_key)
            else {
                continue;
            };
            let wanted = query.states.is_empty()
                || state_of(code.value()).is_some_and(|s| query.states.contains(&s));
            if wanted {
                match jobs.get(position.id.as_str())? {
                    Some(value) => match serde_json::from_slice::<Job>(value.value()) {
                        Ok(job) => page.jobs.push(job),
                        Err(e) => {
                            tracing::warn!(id = %position.id, error = %e, "skipping an unreadable stored job")
                        }
                    },
                    None => tracing::warn!(id = %position.id, "index entry without its job"),
                }
            }
            last = Some(position);
        }
        Ok(page)
    }

    fn unfinished_in(db: &Database) -> Result<Vec<Job>, StoreError> {
        let txn = db.begin_read()?;
        let jobs = txn.open_table(JOBS)?;
        let index = txn.open_table(BY_TIME)?;
        let mut out = Vec::new();
        // Oldest first, reading only the jobs whose indexed state has not ended.
        for row in index.iter()? {
            let (key, code) = row?;
            if state_of(code.value()).is_some_and(JobState::is_final) {
                continue;
            }
            let Some(position) = Cursor::from_time_key(key.value()) else {
                continue;
            };
            let Some(value) = jobs.get(position.id.as_str())? else {
                continue;
            };
            match serde_json::from_slice::<Job>(value.value()) {
                Ok(job) if !job.state.is_final() => out.push(job),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(id = %position.id, error = %e, "skipping an unreadable stored job")
                }
            }
        }
        Ok(out)
    }

    /// Retention: walks the time index from the oldest job, deleting finished jobs that
    /// are too old or beyond the count, in one commit.
    fn prune_in(
        db: &Database,
        before: Millis,
        max_jobs: usize,
        batch: usize,
    ) -> Result<usize, StoreError> {
        let txn = db.begin_write()?;
        let mut deleted = 0;
        {
            let mut jobs = txn.open_table(JOBS)?;
            let mut keys = txn.open_table(IDEMPOTENCY)?;
            let mut index = IndexTables {
                by_time: txn.open_table(BY_TIME)?,
                by_key: txn.open_table(BY_KEY)?,
            };
            let total = index.by_time.len()? as usize;
            let mut over = total.saturating_sub(max_jobs);
            let mut doomed = Vec::new();
            for row in index.by_time.iter()? {
                if doomed.len() >= batch {
                    break;
                }
                let (key, code) = row?;
                let Some(position) = Cursor::from_time_key(key.value()) else {
                    continue;
                };
                let finished = state_of(code.value()).is_some_and(JobState::is_final);
                let old = position.created_at < before;
                if !old && over == 0 {
                    // The index is in creation order: nothing newer is older.
                    break;
                }
                if finished {
                    over = over.saturating_sub(1);
                    doomed.push(position);
                }
            }
            for position in doomed {
                let Some(stored) = jobs.remove(position.id.as_str())? else {
                    continue;
                };
                match serde_json::from_slice::<Indexed>(stored.value()) {
                    Ok(job) => index.unindex(&position.id, &job, Some(&mut keys))?,
                    Err(_) => {
                        let time = time_key(position.created_at, &position.id);
                        index.by_time.remove(time.as_slice())?;
                    }
                }
                deleted += 1;
            }
        }
        txn.commit()?;
        Ok(deleted)
    }
}

/// (used, total) bytes of the filesystem holding `dir`.
fn volume_fill(dir: &Path) -> Option<(u64, u64)> {
    let st = rustix::fs::statvfs(dir).ok()?;
    let total = st.f_blocks.saturating_mul(st.f_frsize);
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    Some((total.saturating_sub(free), total))
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

    pub async fn list(&self, query: ListQuery) -> Result<Page, StoreError> {
        let store = self.0.clone();
        blocking(move || store.list(&query)).await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::from_message(format!("store task: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::job::now_millis;
    use redb::ReadableTableMetadata;
    use std::collections::BTreeSet;

    pub fn job(id: &str, state: JobState, created_at: u64) -> Job {
        Job::for_test(id, state, created_at)
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
        assert_eq!(ids(store.list(&all(10)).unwrap().jobs), ["c", "b", "a"]);
        let succeeded = ListQuery {
            states: vec![JobState::Succeeded],
            ..all(10)
        };
        assert_eq!(ids(store.list(&succeeded).unwrap().jobs), ["b"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn all(limit: usize) -> ListQuery {
        ListQuery {
            limit,
            ..Default::default()
        }
    }

    fn of_key(key: &str, limit: usize) -> ListQuery {
        ListQuery {
            key_id: Some(key.into()),
            limit,
            ..Default::default()
        }
    }

    fn keyed(id: &str, key: &str, state: JobState, created_at: u64) -> Job {
        Job {
            key_id: Some(key.into()),
            ..job(id, state, created_at)
        }
    }

    #[test]
    fn retention_deletes_old_and_surplus_finished_jobs_with_their_keys() {
        let (dir, path) = temp_store("retention");
        let store = RedbStore::open(&path).unwrap();
        let mut old_done = keyed("old-done", "a", JobState::Succeeded, 1);
        old_done.idempotency_key = Some("a/k1".into());
        store.put(&old_done).unwrap();
        for (id, key, state, at) in [
            ("old-queued", "a", JobState::Queued, 2),
            ("new-done-1", "a", JobState::Failed, 10),
            ("new-done-2", "b", JobState::Succeeded, 11),
            ("new-running", "b", JobState::Running, 12),
        ] {
            store.put(&keyed(id, key, state, at)).unwrap();
        }
        let ids = |page: Page| page.jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();

        // By age: only the finished job from before the cutoff, and its key with it.
        assert_eq!(store.prune(5, 100, 100).unwrap(), 1);
        assert!(store.get("old-done").unwrap().is_none());
        assert_eq!(store.by_idempotency_key("a/k1").unwrap(), None);
        assert!(
            store.get("old-queued").unwrap().is_some(),
            "unfinished jobs stay"
        );
        assert_eq!(
            ids(store.list(&of_key("a", 10)).unwrap()),
            ["new-done-1", "old-queued"]
        );

        // By count: 4 stored, 2 allowed: the oldest finished ones go, unfinished stay.
        assert_eq!(store.prune(0, 2, 100).unwrap(), 2);
        assert_eq!(
            ids(store.list(&all(10)).unwrap()),
            ["new-running", "old-queued"]
        );
        assert_eq!(store.prune(0, 2, 100).unwrap(), 0);
        // The batch bound holds.
        for i in 0..5 {
            store
                .put(&job(&format!("x{i}"), JobState::Canceled, 20 + i))
                .unwrap();
        }
        assert_eq!(store.prune(u64::MAX, 100, 3).unwrap(), 3);
        assert_eq!(store.prune(u64::MAX, 100, 3).unwrap(), 2);
        assert!(
            store
                .fill()
                .is_some_and(|(used, total)| used <= total && total > 0)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A fresh store file in its own directory (removed by the caller).
    fn temp_store(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "sdfleet-store-{name}-{}-{}",
            std::process::id(),
            now_millis()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("jobs.redb");
        (dir, path)
    }

    /// Every page of `query`, following `next` (bounded).
    fn walk(store: &RedbStore, mut query: ListQuery) -> (Vec<String>, usize) {
        let mut ids = Vec::new();
        for pages in 1..=1000 {
            let page = store.list(&query).unwrap();
            assert!(page.jobs.len() <= query.limit);
            ids.extend(page.jobs.into_iter().map(|j| j.id));
            match page.next {
                Some(next) => query.cursor = Some(next),
                None => return (ids, pages),
            }
        }
        panic!("more than 1000 pages");
    }

    #[test]
    fn pages_are_newest_first_per_key_and_every_job_comes_once() {
        let (dir, path) = temp_store("pages");
        let store = RedbStore::open(&path).unwrap();
        // 25 jobs of key a, 10 of key b, 2 without a key; two share a creation time.
        let mut batch = Vec::new();
        for i in 0..25u64 {
            batch.push(keyed(
                &format!("a{i:02}"),
                "a",
                JobState::Succeeded,
                100 + 2 * i,
            ));
        }
        for i in 0..10u64 {
            batch.push(keyed(
                &format!("b{i:02}"),
                "b",
                JobState::Queued,
                101 + 2 * i,
            ));
        }
        batch.push(job("n0", JobState::Failed, 100));
        batch.push(job("n1", JobState::Failed, 500));
        store.put_many(&batch).unwrap();

        let (a, pages) = walk(&store, of_key("a", 7));
        let expected: Vec<String> = (0..25).rev().map(|i| format!("a{i:02}")).collect();
        assert_eq!(a, expected);
        assert_eq!(pages, 4);
        let (b, _) = walk(&store, of_key("b", 3));
        assert!(
            b.iter().all(|id| id.starts_with('b')) && b.len() == 10,
            "{b:?}"
        );
        // A key that submitted nothing sees nothing, and a prefix of a key id is not it.
        assert!(store.list(&of_key("c", 10)).unwrap().jobs.is_empty());
        assert!(store.list(&of_key("", 10)).unwrap().jobs.is_empty());

        let (every, _) = walk(&store, all(4));
        assert_eq!(every.len(), 37);
        assert_eq!(
            every.iter().collect::<BTreeSet<_>>().len(),
            37,
            "a job twice"
        );
        assert_eq!(every[0], "n1");
        let times: Vec<u64> = every
            .iter()
            .map(|id| store.get(id).unwrap().unwrap().created_at)
            .collect();
        assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
        // The cursor says where, not whose: key b's cursor moves within key a's list.
        let page = store.list(&of_key("b", 1)).unwrap();
        let query = ListQuery {
            cursor: page.next,
            ..of_key("a", 100)
        };
        assert!(
            store
                .list(&query)
                .unwrap()
                .jobs
                .iter()
                .all(|j| j.id.starts_with('a'))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_index_follows_rewrites_and_a_state_filter_walks_a_bounded_page() {
        let (dir, path) = temp_store("rewrite");
        let mut store = RedbStore::open(&path).unwrap();
        store.scan_budget = 4;
        let mut jobs: Vec<Job> = (0..12u64)
            .map(|i| keyed(&format!("j{i:02}"), "a", JobState::Queued, 10 + i))
            .collect();
        store.put_many(&jobs).unwrap();
        // Every third job runs, then ends: each rewrite replaces its index value.
        for job in jobs.iter_mut().filter(|j| j.created_at % 3 == 0) {
            job.state = JobState::Running;
            store.put(job).unwrap();
            job.state = JobState::Succeeded;
            job.finished_at = Some(job.created_at + 1);
            store.put(job).unwrap();
        }
        let succeeded = ListQuery {
            states: vec![JobState::Succeeded],
            ..of_key("a", 10)
        };
        // Four index entries per page at most: short pages with `next`, and every
        // succeeded job once in the end.
        let (found, pages) = walk(&store, succeeded.clone());
        assert_eq!(found, ["j11", "j08", "j05", "j02"]);
        assert!(pages >= 3, "{pages} pages");
        let queued = ListQuery {
            states: vec![JobState::Queued],
            ..all(100)
        };
        assert_eq!(walk(&store, queued).0.len(), 8);
        // One entry per job in each index, whatever the rewrites.
        store.scan_budget = SCAN_BUDGET;
        assert_eq!(walk(&store, all(5)).0.len(), 12);
        {
            let guard = store.db.read().unwrap();
            let txn = guard.as_ref().unwrap().begin_read().unwrap();
            assert_eq!(txn.open_table(BY_TIME).unwrap().len().unwrap(), 12);
            assert_eq!(txn.open_table(BY_KEY).unwrap().len().unwrap(), 12);
        }
        // A rewrite that moved a job (not done today) leaves no stale entry.
        let mut moved = jobs[0].clone();
        moved.key_id = Some("b".into());
        moved.created_at = 1;
        store.put(&moved).unwrap();
        assert_eq!(walk(&store, of_key("a", 50)).0.len(), 11);
        assert_eq!(walk(&store, of_key("b", 50)).0, ["j00"]);
        assert_eq!(walk(&store, all(50)).0.len(), 12);
        let unfinished: Vec<String> = store
            .unfinished()
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(
            unfinished,
            ["j00", "j01", "j03", "j04", "j06", "j07", "j09", "j10"]
        );
        drop(store);
        // Reopened: the same pages.
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(walk(&store, succeeded).0, ["j11", "j08", "j05", "j02"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_written_before_the_index_gets_one_on_open() {
        let (dir, path) = temp_store("upgrade");
        {
            // What an earlier gateway wrote: jobs and idempotency keys, no index.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut jobs = txn.open_table(JOBS).unwrap();
                for j in [
                    keyed("old-a", "a", JobState::Succeeded, 1),
                    keyed("old-b", "b", JobState::Queued, 2),
                    job("old-n", JobState::Running, 3),
                ] {
                    let bytes = serde_json::to_vec(&j).unwrap();
                    jobs.insert(j.id.as_str(), bytes.as_slice()).unwrap();
                }
                txn.open_table(IDEMPOTENCY).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        let ids = |q: ListQuery| walk(&store, q).0;
        assert_eq!(ids(all(10)), ["old-n", "old-b", "old-a"]);
        assert_eq!(ids(of_key("a", 10)), ["old-a"]);
        let unfinished: Vec<String> = store
            .unfinished()
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(unfinished, ["old-b", "old-n"]);
        // A job stored without a request hash still reads.
        assert_eq!(store.get("old-a").unwrap().unwrap().request_hash, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cursors_round_trip_and_junk_is_refused() {
        let c = Cursor {
            created_at: 1_764_000_000_123,
            id: "0f6c-id".into(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        for junk in [
            "",
            "zz",
            "00",
            &hex::encode([0u8; 8]),
            &hex::encode([0xFFu8; 10]),
        ] {
            assert_eq!(Cursor::decode(junk), None, "{junk:?}");
        }
    }
}
