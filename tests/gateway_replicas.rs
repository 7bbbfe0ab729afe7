//! Several gateway replicas on the testbed's real PostgreSQL: the store behaves as the
//! embedded one, a replica that lost the lease can write nothing, a leader killed with
//! SIGKILL is replaced with no accepted job lost and event streams resumed, and a
//! rolling replacement of every replica answers every request.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use sdfleet::gateway::job::{Job, JobState};
use sdfleet::gateway::store::{Cursor, JobStore, ListQuery, PgStore, RedbStore};
use serde_json::{Value, json};
use support::fake_comfyui::{FakeComfy, FakeConfig};
use support::gateway::*;
use support::*;

const FLEET: &str = "sdxl";
const CKPT: &str = "sd_xl_base_1.0.safetensors";

fn pg_url(tb: &Testbed) -> String {
    tb.var("SDFLEET_TESTBED_POSTGRES_URL").to_string()
}

fn job(id: &str, state: JobState, created_at: u64, key_id: Option<&str>) -> Job {
    serde_json::from_value(json!({
        "id": id, "fleet": FLEET, "state": state, "prompt": {"1": {"class_type": "X", "inputs": {}}},
        "created_at": created_at, "expires_at": created_at + 60_000, "key_id": key_id,
    }))
    .unwrap()
}

/// Every job of a list, page by page (`limit` each), following the cursors.
fn walk(store: &dyn JobStore, query: ListQuery) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<Cursor> = None;
    for _ in 0..100 {
        let page = store
            .list(&ListQuery {
                cursor: cursor.clone(),
                ..query.clone()
            })
            .unwrap();
        assert!(page.jobs.len() <= query.limit);
        ids.extend(page.jobs.into_iter().map(|j| j.id));
        match page.next {
            Some(next) => cursor = Some(next),
            None => return ids,
        }
    }
    panic!("a list that never ends");
}

/// The same calls on a store, and what it answered, as text to compare.
fn transcript(store: &dyn JobStore) -> Vec<String> {
    let mut out = Vec::new();
    let by_key = |key: &str| format!("{key} -> {:?}", store.by_idempotency_key(key).unwrap());
    let states = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Canceled,
    ];
    let mut batch = Vec::new();
    for i in 0..30u64 {
        let key = ["a", "b", "a\u{e9}"][i as usize % 3];
        let mut j = job(
            &format!("j{i:02}"),
            states[i as usize % 5],
            1_000 + i,
            Some(key),
        );
        if i % 4 == 0 {
            j.idempotency_key = Some(format!("{key}/k{i}"));
        }
        batch.push(j);
    }
    // Two jobs at one instant: the id breaks the tie.
    batch.push(job("tie-b", JobState::Succeeded, 1_010, Some("a")));
    batch.push(job("tie-a", JobState::Succeeded, 1_010, Some("a")));
    store.put_many(&batch).unwrap();
    // A rewrite changes the state; a second job with a used key does not take it.
    let mut rewritten = batch[0].clone();
    rewritten.state = JobState::Succeeded;
    store.put(&rewritten).unwrap();
    let mut thief = job("thief", JobState::Queued, 2_000, Some("a"));
    thief.idempotency_key = Some("a/k0".into());
    store.put(&thief).unwrap();
    out.push(by_key("a/k0"));
    out.push(by_key("b/k4"));
    out.push(by_key("a/k1"));
    out.push(format!(
        "j00 -> {:?}",
        store.get("j00").unwrap().map(|j| j.state)
    ));
    out.push(format!(
        "missing -> {:?}",
        store.get("nope").unwrap().map(|j| j.id)
    ));
    let base = ListQuery {
        limit: 7,
        ..Default::default()
    };
    out.push(format!("all {:?}", walk(store, base.clone())));
    for key in ["a", "b", "a\u{e9}", "nobody"] {
        let q = ListQuery {
            key_id: Some(key.into()),
            ..base.clone()
        };
        out.push(format!("key {key} {:?}", walk(store, q)));
    }
    let q = ListQuery {
        states: vec![JobState::Succeeded, JobState::Failed],
        key_id: Some("a".into()),
        ..base.clone()
    };
    out.push(format!("a finished {:?}", walk(store, q)));
    let ids = |jobs: Vec<Job>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
    out.push(format!("unfinished {:?}", ids(store.unfinished().unwrap())));
    // Retention: old finished jobs, then the oldest finished beyond the count.
    out.push(format!(
        "pruned {}",
        store.prune(1_005, 1_000, 100).unwrap()
    ));
    out.push(format!("pruned {}", store.prune(0, 20, 3).unwrap()));
    out.push(format!("pruned {}", store.prune(0, 20, 100).unwrap()));
    out.push(format!("left {:?}", walk(store, base.clone())));
    out.push(by_key("a/k0"));
    out.push(by_key("b/k8"));
    out.push(by_key("a/k28"));
    out
}

#[test]
fn the_postgres_store_answers_every_call_as_the_embedded_store_does() {
    let tb = Testbed::get();
    let dir = std::env::temp_dir().join(format!("pg-conformance-{}", unique_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let redb = RedbStore::open(&dir.join("jobs.redb")).unwrap();
    let scope = format!("conformance-{}", unique_suffix());
    let pg = PgStore::connect(&pg_url(tb), None, &scope, "replica-1").unwrap();
    assert!(
        pg.claim("http://127.0.0.1:1", Duration::from_secs(60))
            .unwrap()
            .ours
    );
    let expected = transcript(&redb);
    let got = transcript(&pg);
    for (e, g) in expected.iter().zip(&got) {
        assert_eq!(g, e);
    }
    assert_eq!(got.len(), expected.len());
    // Another gateway's jobs (another scope) in the same database are not this one's.
    let other = PgStore::connect(&pg_url(tb), None, &format!("{scope}-other"), "x").unwrap();
    assert!(other.get("j01").unwrap().is_none());
    assert!(other.unfinished().unwrap().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_replica_that_lost_the_lease_can_write_nothing_and_one_that_released_it_is_replaced_at_once() {
    let tb = Testbed::get();
    let scope = format!("fence-{}", unique_suffix());
    let a = PgStore::connect(&pg_url(tb), None, &scope, "a").unwrap();
    let b = PgStore::connect(&pg_url(tb), None, &scope, "b").unwrap();
    let lease = Duration::from_secs(1);
    let first = a.claim("http://a", lease).unwrap();
    assert!(first.ours);
    let seen = b.claim("http://b", lease).unwrap();
    assert!(!seen.ours && seen.live, "{seen:?}");
    assert_eq!(
        (seen.holder.as_str(), seen.address.as_str()),
        ("a", "http://a")
    );
    a.put(&job("x", JobState::Queued, 1, None)).unwrap();
    let refused = b.put(&job("x", JobState::Failed, 1, None)).unwrap_err();
    assert!(refused.is_lease_lost(), "{refused}");
    assert!(b.prune(u64::MAX, 0, 10).unwrap_err().is_lease_lost());
    // `a` stops renewing (paused, cut off): `b` takes the lease once it lapses, and
    // `a`'s late write is refused, so it cannot undo what `b` wrote.
    std::thread::sleep(Duration::from_millis(1_300));
    let taken = b.claim("http://b", lease).unwrap();
    assert!(taken.ours);
    assert_eq!(taken.epoch, first.epoch + 1);
    b.put(&job("x", JobState::Running, 1, None)).unwrap();
    let late = a.put(&job("x", JobState::Failed, 1, None)).unwrap_err();
    assert!(late.is_lease_lost(), "{late}");
    assert_eq!(a.get("x").unwrap().unwrap().state, JobState::Running);
    assert!(!a.claim("http://a", lease).unwrap().ours);
    // A clean exit releases it: the other replica takes it at its next try.
    b.release().unwrap();
    assert!(a.claim("http://a", Duration::from_secs(30)).unwrap().ours);
}

struct Fleet {
    ns: TestNamespace,
    fakes: Vec<FakeComfy>,
    args: Vec<String>,
    key: String,
}

async fn fleet(pods: usize, step_ms: u64) -> Fleet {
    let tb = Testbed::get();
    install_crds(tb);
    let client = tb.client().await;
    let ns = TestNamespace::new(&client, "gwr").await;
    let work = std::env::temp_dir().join(format!("gwr-{}", ns.name));
    let mut fakes = Vec::new();
    for i in 0..pods {
        let fake = FakeComfy::start(
            &format!("{FLEET}-pod-{i}"),
            FakeConfig {
                step_time: Duration::from_millis(step_ms),
                switch_penalty: Duration::ZERO,
                models: vec![format!("checkpoints/{CKPT}")],
                output_dir: work.join("output"),
            },
        )
        .await;
        publish_pod(&client, &ns.name, FLEET, i, &fake).await;
        fakes.push(fake);
    }
    let key = format!("key-{}", unique_suffix());
    api_keys_dir(&work.join("keys"), "ci", &key);
    let url_file = work.join("postgres-url");
    std::fs::write(&url_file, pg_url(tb)).unwrap();
    let mut args: Vec<String> = vec![
        "--namespace".into(),
        ns.name.clone(),
        "--fleet".into(),
        FLEET.into(),
        "--postgres-url-file".into(),
        url_file.display().to_string(),
        "--api-keys-dir".into(),
        work.join("keys").display().to_string(),
        "--pod-lost-seconds".into(),
        "2".into(),
        "--queue-cap".into(),
        "1000".into(),
    ];
    args.extend(endpoint_map_args(&fakes));
    Fleet {
        ns,
        fakes,
        args,
        key,
    }
}

async fn holds_lease(gateway: &GatewayProcess) -> bool {
    gateway.metric("sdfleet_gateway_lease_held").await == Some(1.0)
}

/// Waits until one of `replicas` holds the lease and dispatches to `pods` pods.
async fn leader(replicas: &[&GatewayProcess], pods: usize, within: Duration) -> usize {
    let i = eventually("a replica to take the lease", within, || async {
        for (i, r) in replicas.iter().enumerate() {
            if holds_lease(r).await {
                return Some(i);
            }
        }
        None
    })
    .await;
    replicas[i].wait_ready(FLEET, pods).await;
    i
}

/// One SSE event: (kind, id, data).
type Sse = (String, Option<u32>, Value);

/// Reads a job's event stream until it closes or breaks: its events, and whether it
/// ended with the job's `done`.
async fn follow(
    api: &ApiClient,
    id: &str,
    last_event_id: Option<u32>,
    within: Duration,
) -> (Vec<Sse>, bool) {
    let mut req = api.get(&format!("/api/v2/jobs/{id}/events"));
    if let Some(last) = last_event_id {
        req = req.header("Last-Event-ID", last.to_string());
    }
    let mut out: Vec<Sse> = Vec::new();
    let Ok(resp) = req.send().await else {
        return (out, false);
    };
    if resp.status() != 200 {
        return (out, false);
    }
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, body.next()).await {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        for e in drain_sse(&mut buf) {
            let done = e.kind == "done";
            let data = serde_json::from_str(&e.data).unwrap_or(Value::Null);
            out.push((e.kind, e.id, data));
            if done {
                return (out, true);
            }
        }
    }
    (out, false)
}

/// Follows a job's events across breaks, reconnecting (with the last id seen) to the
/// replicas in `bases` in turn, until `done`. Returns every event and the reconnects.
async fn follow_to_the_end(bases: Vec<String>, key: String, id: String) -> (Vec<Sse>, usize) {
    let mut events: Vec<Sse> = Vec::new();
    let started = Instant::now();
    for reconnects in 0..200 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "job {id}: no done within 120 s: {events:?}"
        );
        let api = ApiClient::new(&bases[reconnects % bases.len()], &key);
        let last = events.iter().rev().find_map(|e| e.1);
        let (got, done) = follow(&api, &id, last, Duration::from_secs(90)).await;
        events.extend(got);
        if done {
            return (events, reconnects);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("job {id}: too many reconnects");
}

/// The state changes a client saw: each number once, none skipped, ending in `done`.
fn assert_no_change_missed(id: &str, events: &[Sse]) {
    let seqs: Vec<u32> = events
        .iter()
        .filter(|e| e.0 != "progress" && e.0 != "output")
        .filter_map(|e| e.1)
        .collect();
    let first = seqs.first().copied().unwrap_or(0);
    let expected: Vec<u32> = (first..first + seqs.len() as u32).collect();
    assert_eq!(
        seqs, expected,
        "job {id}: numbered changes skipped or repeated: {events:?}"
    );
    let last = events.last().unwrap();
    assert_eq!(last.0, "done", "{events:?}");
    assert_eq!(last.2["state"], "succeeded", "{last:?}");
    // The final view's history is what the client saw, change by change.
    let history = last.2["history"].as_array().unwrap();
    assert_eq!(history.last().unwrap()["seq"], *seqs.last().unwrap());
}

fn kill_hard(gateway: &mut GatewayProcess) {
    gateway.child.kill().unwrap();
    gateway.child.wait().unwrap();
}

async fn terminate(gateway: &mut GatewayProcess, grace: Duration) {
    // SAFETY: kill(2) on the child's own pid.
    unsafe { libc::kill(gateway.child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while gateway.child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "replica did not exit within {grace:?} of SIGTERM ({})",
            gateway.log.display()
        );
        // Not a thread sleep: the test's client runs on this runtime meanwhile.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many times each job started on a pod.
fn runs(fakes: &[FakeComfy]) -> BTreeMap<String, usize> {
    let mut runs = BTreeMap::new();
    for fake in fakes {
        for id in fake.started() {
            *runs.entry(id).or_default() += 1;
        }
    }
    runs
}

#[tokio::test]
async fn the_leader_killed_mid_stream_is_replaced_within_the_bound_and_no_job_or_event_is_lost() {
    let tb = Testbed::get();
    let f = fleet(4, 20).await;
    let mut first = GatewayProcess::start(tb, f.args.clone());
    assert_eq!(leader(&[&first], 4, Duration::from_secs(60)).await, 0);
    let others = [
        GatewayProcess::start(tb, f.args.clone()),
        GatewayProcess::start(tb, f.args.clone()),
    ];
    for r in &others {
        r.wait_serving().await;
        assert!(!holds_lease(r).await);
    }
    let bases: Vec<String> = [&first, &others[0], &others[1]]
        .iter()
        .map(|g| g.url(""))
        .collect();
    // Jobs through every replica (two of three forwarded to the holder).
    let mut ids = Vec::new();
    for i in 0..120 {
        let api = ApiClient::new(&bases[i % 3], &f.key);
        let (status, job) = api.submit(json!({"prompt": sdxl_workflow(CKPT, 10)})).await;
        assert_eq!(status, 201, "{job}");
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    // Clients following late jobs on the holder and, forwarded, on a follower.
    let mut followers = Vec::new();
    for (n, id) in ids.iter().rev().take(6).enumerate() {
        let order = if n % 2 == 0 {
            vec![bases[0].clone(), bases[1].clone(), bases[2].clone()]
        } else {
            vec![bases[1].clone(), bases[2].clone()]
        };
        followers.push(tokio::spawn(follow_to_the_end(
            order,
            f.key.clone(),
            id.clone(),
        )));
    }
    eventually("jobs to run", Duration::from_secs(60), || async {
        (runs(&f.fakes).len() >= 20).then_some(())
    })
    .await;
    kill_hard(&mut first);
    let killed = Instant::now();
    // While no replica holds the lease, a follower answers a read from the store (the
    // lease lapses seconds after the kill; the follower waits 1.5 s for a holder).
    let reader = ApiClient::new(&bases[1], &f.key);
    let resp = reader
        .get(&format!("/api/v2/jobs/{}", ids[0]))
        .send()
        .await
        .unwrap();
    let served_by = resp
        .headers()
        .get("sdfleet-served-by")
        .map(|v| v.to_str().unwrap().to_string());
    let status = resp.status();
    let read: Value = resp.json().await.unwrap();
    let anyone_holds = holds_lease(&others[0]).await || holds_lease(&others[1]).await;
    assert_eq!(
        (status.as_u16(), &read["id"]),
        (200, &json!(ids[0])),
        "{read}"
    );
    assert!(
        anyone_holds || served_by.as_deref() == Some("store"),
        "a read while no replica held the lease, not from the store: {served_by:?}"
    );
    eprintln!("read during the takeover served by: {served_by:?}");
    let next = leader(&[&others[0], &others[1]], 4, Duration::from_secs(30)).await;
    let takeover = killed.elapsed();
    eprintln!("takeover after SIGKILL: {takeover:?}");
    // The README's bound: lease (5 s) + one renewal (1 s) + resuming the jobs.
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?}"
    );
    assert_eq!(
        others[next].metric("sdfleet_gateway_lease_takeovers").await,
        Some(1.0)
    );
    let api = ApiClient::new(&others[1 - next].url(""), &f.key);
    let mut explained = 0;
    let ran = runs(&f.fakes);
    for id in &ids {
        let job = api.wait_final(id, Duration::from_secs(120)).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        let times = ran.get(id).copied().unwrap_or(0);
        if times > 1 {
            // At least once: a second run is counted in attempts and says why.
            assert!(job["attempts"].as_u64().unwrap() >= times as u64, "{job}");
            assert!(
                job["history"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["reason"].is_string()),
                "{job}"
            );
            explained += 1;
        }
    }
    let ran = runs(&f.fakes);
    assert_eq!(
        ran.keys().collect::<BTreeSet<_>>(),
        ids.iter().collect::<BTreeSet<_>>(),
        "every accepted job ran"
    );
    eprintln!(
        "jobs run twice: {} (explained {explained})",
        ran.values().filter(|n| **n > 1).count()
    );
    let mut broken = 0;
    for handle in followers {
        let (events, reconnects) = handle.await.unwrap();
        broken += usize::from(reconnects > 0);
        let id = events[0].2["job"]
            .as_str()
            .or(events[0].2["id"].as_str())
            .unwrap()
            .to_string();
        assert_no_change_missed(&id, &events);
    }
    assert!(
        broken > 0,
        "no event stream was cut by the kill: the test proved nothing"
    );
    drop(f.ns);
}

#[tokio::test]
async fn replacing_every_replica_one_by_one_under_a_steady_stream_answers_every_request() {
    let tb = Testbed::get();
    let mut f = fleet(2, 5).await;
    // As the pods are rendered: a stopping replica serves on while the Service drops it
    // (here: the client's endpoint list, updated just before SIGTERM).
    f.args.extend([
        "--shutdown-delay-seconds".into(),
        sdfleet::render::gateway::SHUTDOWN_DELAY_SECONDS.to_string(),
    ]);
    let mut old: Vec<GatewayProcess> = Vec::new();
    old.push(GatewayProcess::start(tb, f.args.clone()));
    leader(&[&old[0]], 2, Duration::from_secs(60)).await;
    for _ in 0..2 {
        old.push(GatewayProcess::start(tb, f.args.clone()));
    }
    for r in &old {
        r.wait_serving().await;
    }
    // The Service's endpoints: ready replicas, a terminating one taken out first.
    let endpoints: Arc<Mutex<Vec<String>>> =
        Arc::new(Mutex::new(old.iter().map(|g| g.url("")).collect()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (endpoints, stop, key) = (endpoints.clone(), stop.clone(), f.key.clone());
        tokio::spawn(async move {
            let mut accepted: Vec<String> = Vec::new();
            let mut failures: Vec<String> = Vec::new();
            let mut answered = 0usize;
            let mut slowest = Duration::ZERO;
            for n in 0..10_000usize {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let base = {
                    let e = endpoints.lock().unwrap();
                    e[n % e.len()].clone()
                };
                let api = ApiClient::new(&base, &key);
                let t = Instant::now();
                let sent = api
                    .post("/api/v2/jobs")
                    .header("Idempotency-Key", format!("roll-{n}"))
                    .json(&json!({"prompt": sdxl_workflow(CKPT, 2)}))
                    .send()
                    .await;
                slowest = slowest.max(t.elapsed());
                match sent {
                    Ok(r) if r.status() == 201 => {
                        answered += 1;
                        let job: Value = r.json().await.unwrap();
                        accepted.push(job["id"].as_str().unwrap().to_string());
                    }
                    Ok(r) => failures.push(format!("submit {n} via {base}: {}", r.status())),
                    Err(e) => failures.push(format!("submit {n} via {base}: {e}")),
                }
                if let Some(id) = accepted.get(n / 2) {
                    // A new request goes wherever the endpoints say now.
                    let base = {
                        let e = endpoints.lock().unwrap();
                        e[(n + 1) % e.len()].clone()
                    };
                    let api = ApiClient::new(&base, &key);
                    match api.get(&format!("/api/v2/jobs/{id}")).send().await {
                        Ok(r) if r.status() == 200 => answered += 1,
                        Ok(r) => failures.push(format!("read {id} via {base}: {}", r.status())),
                        Err(e) => failures.push(format!("read {id} via {base}: {e}")),
                    }
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            (accepted, failures, answered, slowest)
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A rollout: a new replica, ready, then an old one out of the endpoints and stopped.
    let mut new: Vec<GatewayProcess> = Vec::new();
    for old_one in old.iter_mut() {
        let fresh = GatewayProcess::start(tb, f.args.clone());
        fresh.wait_serving().await;
        {
            let mut e = endpoints.lock().unwrap();
            e.retain(|u| *u != old_one.url(""));
            e.push(fresh.url(""));
        }
        terminate(old_one, Duration::from_secs(15)).await;
        new.push(fresh);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (accepted, failures, answered, slowest) = client.await.unwrap();
    eprintln!(
        "rollout: {answered} requests answered, {} failed, {} jobs, slowest submit {slowest:?}",
        failures.len(),
        accepted.len()
    );
    assert!(
        failures.is_empty(),
        "requests failed during the rollout: {failures:#?}"
    );
    assert!(accepted.len() > 50, "too few requests to show anything");
    let holder = leader(&[&new[0], &new[1], &new[2]], 2, Duration::from_secs(30)).await;
    let api = ApiClient::new(&new[holder].url(""), &f.key);
    for id in &accepted {
        let job = api.wait_final(id, Duration::from_secs(120)).await;
        assert_eq!(job["state"], "succeeded", "{job}");
    }
    drop(f.ns);
}
