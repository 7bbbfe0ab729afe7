//! Exact latency figures: raw samples of each reconcile's duration and of its
//! queue-to-done time (from the first watch event that asked for it to the end of the
//! reconcile that handled it), kept in a bounded ring per controller and served as JSON
//! on `/debug/latency`. A histogram's buckets only bound a quantile; these give it.
//!
//! Each reconcile's time is also split: the time it waited for the apiserver (every
//! request wrapped in `waiting`, overlapping requests counted once) and the rest, the
//! controller's own work. Under a loaded apiserver the first is most of a writing
//! reconcile, and says nothing of the controller.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// The newest samples kept per controller and measure (about 1.6 MB in all).
const KEPT: usize = 100_000;

#[derive(Default)]
struct Series {
    reconcile: VecDeque<f64>,
    queue: VecDeque<f64>,
    /// Each reconcile's time less its waits for the apiserver.
    own: VecDeque<f64>,
}

/// One reconcile's waits for the apiserver so far.
#[derive(Default)]
struct Waits {
    in_flight: u32,
    since: Option<Instant>,
    total: Duration,
}

tokio::task_local! {
    static WAITS: RefCell<Waits>;
}

/// Runs one reconcile, and returns with its output how long it waited for the
/// apiserver in all.
pub async fn measured<F: Future>(reconcile: F) -> (F::Output, Duration) {
    WAITS
        .scope(RefCell::new(Waits::default()), async {
            let out = reconcile.await;
            let waited = WAITS.with(|w| w.borrow().total);
            (out, waited)
        })
        .await
}

/// Awaits one apiserver request; inside `measured`, the wall time while any request is
/// in flight counts as waiting.
pub async fn waiting<F: Future>(request: F) -> F::Output {
    let _ = WAITS.try_with(|w| {
        let mut w = w.borrow_mut();
        if w.in_flight == 0 {
            w.since = Some(Instant::now());
        }
        w.in_flight += 1;
    });
    let out = request.await;
    let _ = WAITS.try_with(|w| {
        let mut w = w.borrow_mut();
        w.in_flight = w.in_flight.saturating_sub(1);
        if w.in_flight == 0
            && let Some(since) = w.since.take()
        {
            w.total += since.elapsed();
        }
    });
    out
}

/// Raw samples per controller (by its metric name), and when each object was first
/// asked for since its last reconcile.
#[derive(Default)]
pub struct Latency {
    series: Mutex<HashMap<&'static str, Series>>,
    asked: Mutex<HashMap<String, Instant>>,
}

/// p50/p99/max of one measure, from its raw samples (seconds).
#[derive(Debug, Serialize, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Report<'a> {
    reconcile: Option<Summary>,
    queue_to_done: Option<Summary>,
    /// Reconcile time less the apiserver's.
    reconcile_own: Option<Summary>,
    reconcile_seconds: &'a VecDeque<f64>,
    queue_to_done_seconds: &'a VecDeque<f64>,
    reconcile_own_seconds: &'a VecDeque<f64>,
}

fn push(ring: &mut VecDeque<f64>, value: f64) {
    if ring.len() == KEPT {
        ring.pop_front();
    }
    ring.push_back(value);
}

/// The nearest-rank quantiles of `samples`; None when there are none.
pub fn summarize<'a>(samples: impl IntoIterator<Item = &'a f64>) -> Option<Summary> {
    let mut sorted: Vec<f64> = samples.into_iter().copied().collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let rank =
        |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
    Some(Summary {
        count: sorted.len(),
        p50: rank(0.50),
        p99: rank(0.99),
        max: sorted[sorted.len() - 1],
    })
}

impl Latency {
    fn key(controller: &str, object: &str) -> String {
        format!("{controller}/{object}")
    }

    /// A watch event asked for `object` (`namespace/name`): its queue time starts now,
    /// unless an earlier event is still waiting.
    pub fn asked(&self, controller: &str, object: &str) {
        let mut asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
        asked
            .entry(Self::key(controller, object))
            .or_insert_with(Instant::now);
    }

    /// A reconcile of `object` starts: the events it answers are those seen before now.
    pub fn started(&self, controller: &str, object: &str) -> Option<Instant> {
        let mut asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
        asked.remove(&Self::key(controller, object))
    }

    /// A reconcile ended after `took`, `waited` of it for the apiserver; `asked_at` is
    /// what `started` returned.
    pub fn finished(
        &self,
        controller: &'static str,
        (took, waited): (Duration, Duration),
        asked_at: Option<Instant>,
    ) {
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let s = series.entry(controller).or_default();
        push(&mut s.reconcile, took.as_secs_f64());
        push(&mut s.own, took.saturating_sub(waited).as_secs_f64());
        if let Some(at) = asked_at {
            push(&mut s.queue, at.elapsed().as_secs_f64());
        }
    }

    /// Every controller's summary and raw samples, as JSON.
    pub fn report(&self) -> String {
        let series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let reports: HashMap<&str, Report> = series
            .iter()
            .map(|(name, s)| {
                let report = Report {
                    reconcile: summarize(&s.reconcile),
                    queue_to_done: summarize(&s.queue),
                    reconcile_own: summarize(&s.own),
                    reconcile_seconds: &s.reconcile,
                    queue_to_done_seconds: &s.queue,
                    reconcile_own_seconds: &s.own,
                };
                (*name, report)
            })
            .collect();
        serde_json::to_string(&reports).unwrap_or_else(|_| "{}".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank_over_raw_samples() {
        let samples: Vec<f64> = (1..=200).map(f64::from).collect();
        let s = summarize(&samples).unwrap();
        assert_eq!((s.count, s.p50, s.p99, s.max), (200, 100.0, 198.0, 200.0));
        assert_eq!(summarize(&[]), None);
        assert_eq!(summarize(&[3.0]).unwrap().p99, 3.0);
    }

    #[test]
    fn queue_time_runs_from_the_first_event_to_the_end() {
        let l = Latency::default();
        l.asked("modelset", "ns/a");
        let first = l.started("modelset", "ns/a");
        assert!(first.is_some());
        // Nothing asked since: a timer's reconcile has no queue time.
        assert!(l.started("modelset", "ns/a").is_none());
        l.finished(
            "modelset",
            (Duration::from_millis(5), Duration::ZERO),
            first,
        );
        l.finished("modelset", (Duration::from_millis(7), Duration::ZERO), None);
        let report: serde_json::Value = serde_json::from_str(&l.report()).unwrap();
        assert_eq!(report["modelset"]["reconcile"]["count"], 2);
        assert_eq!(report["modelset"]["queueToDone"]["count"], 1);
    }

    #[test]
    fn the_ring_keeps_the_newest() {
        let l = Latency::default();
        for i in 0..(KEPT + 10) {
            l.finished(
                "modelset",
                (Duration::from_micros(i as u64), Duration::ZERO),
                None,
            );
        }
        let series = l.series.lock().unwrap();
        let s = &series["modelset"];
        assert_eq!(s.reconcile.len(), KEPT);
        assert_eq!(s.reconcile[0], 10e-6);
    }

    #[tokio::test]
    async fn overlapping_requests_count_once_and_the_rest_is_own_time() {
        let pause = |ms| tokio::time::sleep(Duration::from_millis(ms));
        let ((), waited) = measured(async {
            // Two requests at once: 40 ms of waiting, not 70.
            futures::future::join(waiting(pause(40)), waiting(pause(30))).await;
            pause(20).await;
            waiting(pause(10)).await;
        })
        .await;
        assert!(waited >= Duration::from_millis(50), "{waited:?}");
        assert!(waited < Duration::from_millis(70), "{waited:?}");
        // Outside a measured reconcile, waiting only awaits.
        assert_eq!(waiting(async { 7 }).await, 7);
    }
}
