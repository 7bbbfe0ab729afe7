//! The job store on PostgreSQL, for several gateway replicas: the same `JobStore` as the
//! embedded file, plus the dispatch lease (`replicas` runs it). Every write checks, in
//! its own transaction, that this replica still holds the lease, and takes the lease
//! row's lock while it commits: a replica that lost the lease (paused, cut off) can
//! never overwrite what the new holder wrote.
//!
//! The tables and their versions are in `migrations/`; a replica applies what is
//! missing at start, under an advisory lock so that replicas starting together take
//! turns.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postgres::{Client, Config, Transaction};

use super::{Cursor, Indexed, JobStore, ListQuery, Page, StoreError, state_code};
use crate::gateway::job::{Job, JobState, Millis};

mod embedded {
    refinery::embed_migrations!("src/gateway/store/migrations");
}

/// Connections kept open between calls (each call takes one; more open on demand).
const IDLE_CONNECTIONS: usize = 4;
/// Any statement that runs longer fails instead of holding a writer for ever.
const STATEMENT_TIMEOUT_MS: u64 = 15_000;
/// Taken while migrating (an arbitrary constant: "sdfl").
const MIGRATION_LOCK: i64 = 0x7364_666c;

pub struct PgStore {
    config: Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    scope: String,
    holder: String,
    idle: Mutex<Vec<Client>>,
}

/// Who holds a gateway's lease, as the database says now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseView {
    pub holder: String,
    /// Where the holder serves the API (followers send requests there).
    pub address: String,
    pub epoch: i64,
    /// This replica holds it.
    pub ours: bool,
    /// Its deadline has not passed.
    pub live: bool,
}

fn failed(context: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::from_message(format!("{context}: {e}"))
}

fn db(e: postgres::Error) -> StoreError {
    // The server's own words (constraint, timeout, ...) are in the source's message.
    match e.as_db_error() {
        Some(d) => failed("postgres", d.message()),
        None => failed("postgres", e),
    }
}

impl PgStore {
    /// Connects, applies the migrations, and serves the jobs of `scope` as `holder`.
    /// `ca_file`: PEM certificates to trust besides the system's (RDS's CA bundle).
    pub fn connect(
        url: &str,
        ca_file: Option<&Path>,
        scope: &str,
        holder: &str,
    ) -> Result<PgStore, StoreError> {
        let mut config: Config = url.parse().map_err(|e| failed("the PostgreSQL URL", e))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        // A server gone without a reset fails the call instead of hanging it.
        config.tcp_user_timeout(Duration::from_secs(10));
        if config.get_options().is_none() {
            config.options(&format!("-c statement_timeout={STATEMENT_TIMEOUT_MS}"));
        }
        if config.get_application_name().is_none() {
            config.application_name("sdfleet-gateway");
        }
        let store = PgStore {
            config,
            tls: tls_connector(ca_file)?,
            scope: scope.to_string(),
            holder: holder.to_string(),
            idle: Mutex::new(Vec::new()),
        };
        store.with_client(|client| {
            client
                .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
                .map_err(db)?;
            let report = embedded::migrations::runner().run(client);
            client
                .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
                .map_err(db)?;
            let report = report.map_err(|e| failed("migrating the job store", e))?;
            for m in report.applied_migrations() {
                tracing::info!(migration = %m, "job store migrated");
            }
            Ok(())
        })?;
        Ok(store)
    }

    /// Runs `f` on a pooled connection; one that failed is dropped, not pooled again.
    fn with_client<T>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut client = match pooled.filter(|c| !c.is_closed()) {
            Some(c) => c,
            None => self.config.connect(self.tls.clone()).map_err(db)?,
        };
        let result = f(&mut client);
        if result.is_ok() && !client.is_closed() {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < IDLE_CONNECTIONS {
                idle.push(client);
            }
        }
        result
    }

    /// In a write transaction: fails unless this replica holds the lease, and holds the
    /// lease row (shared) until the commit, so no takeover lands in between.
    fn fence(&self, txn: &mut Transaction<'_>) -> Result<(), StoreError> {
        let row = txn
            .query_opt(
                "SELECT holder FROM gateway_leases WHERE scope = $1 FOR SHARE",
                &[&self.scope],
            )
            .map_err(db)?;
        let holder: Option<String> = row.map(|r| r.get(0));
        if holder.as_deref() == Some(self.holder.as_str()) {
            Ok(())
        } else {
            Err(StoreError::lease_lost(format!(
                "this replica ({}) no longer holds the gateway's lease (held by {})",
                self.holder,
                holder.as_deref().unwrap_or("no one")
            )))
        }
    }

    /// Takes the lease if it is free or expired, or renews it if ours, until `ttl` from
    /// the database's clock (replicas' clocks never compare). Returns who holds it.
    pub fn claim(&self, address: &str, ttl: Duration) -> Result<LeaseView, StoreError> {
        let ttl_seconds = ttl.as_secs_f64();
        let claimed = self.with_client(|client| {
            client
                .query_opt(
                    "INSERT INTO gateway_leases AS l (scope, holder, address, deadline, epoch)
                     VALUES ($1, $2, $3, now() + $4::float8 * interval '1 second', 1)
                     ON CONFLICT (scope) DO UPDATE SET
                         holder = EXCLUDED.holder,
                         address = EXCLUDED.address,
                         deadline = EXCLUDED.deadline,
                         epoch = CASE WHEN l.holder = EXCLUDED.holder THEN l.epoch ELSE l.epoch + 1 END
                     WHERE l.holder = EXCLUDED.holder OR l.deadline < now()
                     RETURNING holder, address, epoch",
                    &[&self.scope, &self.holder, &address, &ttl_seconds],
                )
                .map_err(db)
        })?;
        match claimed {
            Some(row) => Ok(LeaseView {
                holder: row.get(0),
                address: row.get(1),
                epoch: row.get(2),
                ours: true,
                live: true,
            }),
            // Held by another replica: the row exists (an insert would have claimed it).
            None => self
                .observe()?
                .ok_or_else(|| StoreError::from_message("the lease row is gone".into())),
        }
    }

    /// Who holds the lease, without claiming it (a replica on its way out).
    pub fn observe(&self) -> Result<Option<LeaseView>, StoreError> {
        self.with_client(|client| {
            let row = client
                .query_opt(
                    "SELECT holder, address, epoch, deadline > now() FROM gateway_leases WHERE scope = $1",
                    &[&self.scope],
                )
                .map_err(db)?;
            Ok(row.map(|row| {
                let holder: String = row.get(0);
                LeaseView {
                    ours: holder == self.holder,
                    holder,
                    address: row.get(1),
                    epoch: row.get(2),
                    live: row.get(3),
                }
            }))
        })
    }

    /// Gives the lease up now (a clean exit): another replica takes it at its next try.
    pub fn release(&self) -> Result<(), StoreError> {
        self.with_client(|client| {
            client
                .execute(
                    "UPDATE gateway_leases SET deadline = now() - interval '1 second'
                     WHERE scope = $1 AND holder = $2",
                    &[&self.scope, &self.holder],
                )
                .map_err(db)?;
            Ok(())
        })
    }

    fn decode(id: &str, body: &[u8]) -> Option<Job> {
        match serde_json::from_slice::<Job>(body) {
            Ok(job) => Some(job),
            Err(e) => {
                tracing::warn!(%id, error = %e, "skipping an unreadable stored job");
                None
            }
        }
    }
}

fn tls_connector(
    ca_file: Option<&Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A system certificate rustls cannot use is skipped, as every client does.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| failed(&format!("reading {}", path.display()), e))?;
        for cert in certs {
            let cert = cert.map_err(|e| failed(&format!("reading {}", path.display()), e))?;
            roots
                .add(cert)
                .map_err(|e| failed(&format!("a certificate of {}", path.display()), e))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| failed("TLS", e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

fn state_number(state: JobState) -> i16 {
    i16::from(state_code(state))
}

impl JobStore for PgStore {
    fn put_many(&self, jobs: &[Job]) -> Result<(), StoreError> {
        if jobs.is_empty() {
            return Ok(());
        }
        self.with_client(|client| {
            let mut txn = client.transaction().map_err(db)?;
            self.fence(&mut txn)?;
            let upsert = txn
                .prepare(
                    "INSERT INTO gateway_jobs (scope, id, created_at, key_id, state, body)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (scope, id) DO UPDATE SET
                         created_at = EXCLUDED.created_at, key_id = EXCLUDED.key_id,
                         state = EXCLUDED.state, body = EXCLUDED.body",
                )
                .map_err(db)?;
            let key = txn
                .prepare(
                    "INSERT INTO gateway_idempotency (scope, key, job_id) VALUES ($1, $2, $3)
                     ON CONFLICT (scope, key) DO NOTHING",
                )
                .map_err(db)?;
            for job in jobs {
                let body = serde_json::to_vec(job).map_err(|e| failed("encoding a job", e))?;
                let indexed = Indexed::of(job);
                txn.execute(
                    &upsert,
                    &[
                        &self.scope,
                        &job.id,
                        &(indexed.created_at as i64),
                        &indexed.key_id,
                        &state_number(indexed.state),
                        &body,
                    ],
                )
                .map_err(db)?;
                if let Some(k) = &job.idempotency_key {
                    txn.execute(&key, &[&self.scope, k, &job.id]).map_err(db)?;
                }
            }
            txn.commit().map_err(db)
        })
    }

    fn get(&self, id: &str) -> Result<Option<Job>, StoreError> {
        self.with_client(|client| {
            let row = client
                .query_opt(
                    "SELECT body FROM gateway_jobs WHERE scope = $1 AND id = $2",
                    &[&self.scope, &id],
                )
                .map_err(db)?;
            match row {
                None => Ok(None),
                Some(row) => {
                    let body: &[u8] = row.get(0);
                    serde_json::from_slice(body)
                        .map(Some)
                        .map_err(|e| failed(&format!("job {id}"), e))
                }
            }
        })
    }

    fn by_idempotency_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.with_client(|client| {
            let row = client
                .query_opt(
                    "SELECT job_id FROM gateway_idempotency WHERE scope = $1 AND key = $2",
                    &[&self.scope, &key],
                )
                .map_err(db)?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn list(&self, query: &ListQuery) -> Result<Page, StoreError> {
        let limit = query.limit.max(1);
        let states: Vec<i16> = query.states.iter().map(|s| state_number(*s)).collect();
        let (cursor_at, cursor_id) = match &query.cursor {
            Some(c) => (Some(c.created_at as i64), Some(c.id.clone())),
            None => (None, None),
        };
        self.with_client(|client| {
            let rows = client
                .query(
                    "SELECT id, created_at, body FROM gateway_jobs
                     WHERE scope = $1
                       AND ($2::text IS NULL OR key_id = $2)
                       AND ($3::bigint IS NULL OR (created_at, id) < ($3, $4::text COLLATE \"C\"))
                       AND (cardinality($5::smallint[]) = 0 OR state = ANY($5))
                     ORDER BY created_at DESC, id DESC
                     LIMIT $6",
                    &[
                        &self.scope,
                        &query.key_id,
                        &cursor_at,
                        &cursor_id,
                        &states,
                        &((limit + 1) as i64),
                    ],
                )
                .map_err(db)?;
            let mut page = Page::default();
            let mut last: Option<Cursor> = None;
            for (i, row) in rows.iter().enumerate() {
                if i == limit {
                    // A row beyond the page: the next page starts after the page's last
                    // row (read or not, so an unreadable one is never walked again).
                    page.next = last;
                    break;
                }
                let id: String = row.get(0);
                let created_at: i64 = row.get(1);
                if let Some(job) = Self::decode(&id, row.get(2)) {
                    page.jobs.push(job);
                }
                last = Some(Cursor {
                    created_at: created_at as Millis,
                    id,
                });
            }
            Ok(page)
        })
    }

    fn unfinished(&self) -> Result<Vec<Job>, StoreError> {
        self.with_client(|client| {
            let rows = client
                .query(
                    "SELECT id, body FROM gateway_jobs WHERE scope = $1 AND state < 2
                     ORDER BY created_at, id",
                    &[&self.scope],
                )
                .map_err(db)?;
            Ok(rows
                .iter()
                .filter_map(|row| Self::decode(row.get(0), row.get(1)))
                .filter(|job| !job.state.is_final())
                .collect())
        })
    }

    fn prune(&self, before: Millis, max_jobs: usize, batch: usize) -> Result<usize, StoreError> {
        self.with_client(|client| {
            let mut txn = client.transaction().map_err(db)?;
            self.fence(&mut txn)?;
            let total: i64 = txn
                .query_one(
                    "SELECT count(*) FROM gateway_jobs WHERE scope = $1",
                    &[&self.scope],
                )
                .map_err(db)?
                .get(0);
            let mut over = (total as usize).saturating_sub(max_jobs);
            // Finished jobs, oldest first: each goes while it is too old or the store is
            // over its count, as the embedded store's walk decides.
            let rows = txn
                .query(
                    "SELECT id, created_at FROM gateway_jobs WHERE scope = $1 AND state >= 2
                     ORDER BY created_at, id LIMIT $2",
                    &[&self.scope, &(batch as i64)],
                )
                .map_err(db)?;
            let mut doomed: Vec<String> = Vec::new();
            for row in rows {
                let created_at: i64 = row.get(1);
                let old = (created_at as u64) < before;
                if !old && over == 0 {
                    break;
                }
                over = over.saturating_sub(1);
                doomed.push(row.get(0));
            }
            if doomed.is_empty() {
                return Ok(0);
            }
            txn.execute(
                "DELETE FROM gateway_idempotency WHERE scope = $1 AND job_id = ANY($2)",
                &[&self.scope, &doomed],
            )
            .map_err(db)?;
            let deleted = txn
                .execute(
                    "DELETE FROM gateway_jobs WHERE scope = $1 AND id = ANY($2)",
                    &[&self.scope, &doomed],
                )
                .map_err(db)?;
            txn.commit().map_err(db)?;
            Ok(deleted as usize)
        })
    }
}
