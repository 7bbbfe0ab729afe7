//! A sync's timeline, to find where a slow run loses its time: spans (the listing, the
//! plan, each fsync, rename and checkpoint) and, every 100 ms, a sample of the bytes
//! received and written so far, the GETs in flight, the fsyncs waiting, and the
//! kernel's dirty and writeback pages. Written as JSON by `sdfleet sync --timeline`;
//! `bench/sync-bench.py` compares a fast run with a slow one from it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// How often the counters are sampled.
const EVERY: Duration = Duration::from_millis(100);
/// Spans kept (a sync of 100k small files makes about 300k; the rest are counted).
const SPANS_KEPT: usize = 1_000_000;

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    List,
    Plan,
    Get,
    Fsync,
    Rename,
    Checkpoint,
}

#[derive(Serialize)]
struct Span {
    phase: Phase,
    /// Seconds since the start.
    start: f64,
    seconds: f64,
}

#[derive(Serialize, Default, Clone)]
struct Sample {
    t: f64,
    received: u64,
    written: u64,
    gets: i64,
    fsyncs: i64,
    dirty_kib: u64,
    writeback_kib: u64,
}

/// Shared by every task of one sync; all counters are lock-free, spans take a lock.
pub struct Timeline {
    start: Instant,
    received: AtomicU64,
    written: AtomicU64,
    gets: AtomicI64,
    fsyncs: AtomicI64,
    first_byte: Mutex<Option<f64>>,
    spans: Mutex<Vec<Span>>,
    dropped: AtomicU64,
    samples: Mutex<Vec<Sample>>,
}

/// Ends a span when dropped (so an early return still closes it).
pub struct SpanGuard<'a> {
    timeline: Option<&'a Timeline>,
    phase: Phase,
    started: Instant,
}

impl Drop for SpanGuard<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.timeline {
            t.close(self.phase, self.started);
        }
    }
}

/// Opens a span on an optional timeline (a no-op without one).
pub fn span(timeline: Option<&Timeline>, phase: Phase) -> SpanGuard<'_> {
    if let Some(t) = timeline {
        match phase {
            Phase::Get => t.gets.fetch_add(1, Ordering::Relaxed),
            Phase::Fsync => t.fsyncs.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }
    SpanGuard {
        timeline,
        phase,
        started: Instant::now(),
    }
}

impl Timeline {
    pub fn new() -> Timeline {
        Timeline {
            start: Instant::now(),
            received: AtomicU64::new(0),
            written: AtomicU64::new(0),
            gets: AtomicI64::new(0),
            fsyncs: AtomicI64::new(0),
            first_byte: Mutex::new(None),
            spans: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
            samples: Mutex::new(Vec::new()),
        }
    }

    fn since(&self, at: Instant) -> f64 {
        at.duration_since(self.start).as_secs_f64()
    }

    fn close(&self, phase: Phase, started: Instant) {
        match phase {
            Phase::Get => self.gets.fetch_sub(1, Ordering::Relaxed),
            Phase::Fsync => self.fsyncs.fetch_sub(1, Ordering::Relaxed),
            _ => 0,
        };
        let span = Span {
            phase,
            start: self.since(started),
            seconds: started.elapsed().as_secs_f64(),
        };
        let mut spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        if spans.len() < SPANS_KEPT {
            spans.push(span);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `n` bytes came off the network.
    pub fn received(&self, n: u64) {
        if self.received.fetch_add(n, Ordering::Relaxed) == 0 {
            let mut first = self.first_byte.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert(self.since(Instant::now()));
        }
    }

    /// `n` bytes were written to their file (into the page cache).
    pub fn written(&self, n: u64) {
        self.written.fetch_add(n, Ordering::Relaxed);
    }

    fn sample(&self) {
        let (dirty_kib, writeback_kib) = meminfo();
        let sample = Sample {
            t: self.since(Instant::now()),
            received: self.received.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            gets: self.gets.load(Ordering::Relaxed),
            fsyncs: self.fsyncs.load(Ordering::Relaxed),
            dirty_kib,
            writeback_kib,
        };
        self.samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(sample);
    }

    /// Samples every 100 ms until the returned task is aborted.
    pub fn sampler(self: &std::sync::Arc<Self>) -> tokio::task::JoinHandle<()> {
        let timeline = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                timeline.sample();
            }
        })
    }

    /// The whole timeline as JSON (a last sample taken now).
    pub fn to_json(&self) -> serde_json::Value {
        self.sample();
        let spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::json!({
            "seconds": self.since(Instant::now()),
            "firstByte": *self.first_byte.lock().unwrap_or_else(|e| e.into_inner()),
            "spans": &*spans,
            "spansDropped": self.dropped.load(Ordering::Relaxed),
            "samples": &*samples,
        })
    }
}

impl std::fmt::Debug for Timeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timeline")
            .field("received", &self.received.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Default for Timeline {
    fn default() -> Self {
        Timeline::new()
    }
}

/// The kernel's dirty and writeback page totals (KiB); zeros where /proc is not there.
fn meminfo() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    parse_meminfo(&text)
}

fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("Dirty:"), field("Writeback:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_are_read_in_kib() {
        let text = "MemFree: 100 kB\nDirty:          2048 kB\nWriteback:        16 kB\nWritebackTmp: 0 kB\n";
        assert_eq!(parse_meminfo(text), (2048, 16));
        assert_eq!(parse_meminfo(""), (0, 0));
    }

    #[test]
    fn spans_count_what_is_in_flight_until_they_close() {
        let t = Timeline::new();
        let get = span(Some(&t), Phase::Get);
        let fsync = span(Some(&t), Phase::Fsync);
        assert_eq!(
            (
                t.gets.load(Ordering::Relaxed),
                t.fsyncs.load(Ordering::Relaxed)
            ),
            (1, 1)
        );
        drop(get);
        drop(fsync);
        t.received(10);
        t.received(5);
        let json = t.to_json();
        assert_eq!(json["spans"].as_array().unwrap().len(), 2);
        assert_eq!(json["spans"][0]["phase"], "get");
        assert_eq!(json["samples"][0]["received"], 15);
        assert_eq!(json["samples"][0]["gets"], 0);
        assert!(json["firstByte"].is_f64());
    }
}
