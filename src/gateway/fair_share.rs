//! Fair shares between the clients of one fleet. Each API key, or the group its Secret
//! entry names, is a share with a weight and an optional cap on its jobs on pods.
//! Dispatch takes the next job from the share with the least use per unit of weight, FIFO
//! within a share with a higher `priority` first. A share's use is its jobs started
//! recently (each counts 1, halving every `USAGE_HALF_LIFE`), plus those on pods now,
//! plus those already put ahead in this order. So a client that has kept the pods busy
//! for a while yields to one that just came (its few jobs go next, not behind the
//! batch), and under saturation starts split by weight. A share at its cap waits; the
//! others go on (nothing idles while any share may run).
//!
//! Jobs, not GPU seconds: with jobs of unequal length, throughput splits by weight only
//! as far as the jobs are alike.

use std::collections::HashMap;
use std::time::Duration;

/// How fast a share's past use fades: half of it every this long.
pub const USAGE_HALF_LIFE: Duration = Duration::from_secs(30);

/// One share's recent starts, decayed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    value: f64,
    /// When `value` was last brought up to date (ms since the epoch).
    at: u64,
}

impl Usage {
    /// The use at `now`.
    pub fn at(&self, now: u64) -> f64 {
        let elapsed = now.saturating_sub(self.at) as f64 / 1000.0;
        self.value * 0.5f64.powf(elapsed / USAGE_HALF_LIFE.as_secs_f64())
    }

    /// One more start at `now`.
    pub fn add_start(&mut self, now: u64) {
        self.value = self.at(now) + 1.0;
        self.at = now.max(self.at);
    }
}

/// Who a job's share is, and what it may take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    /// The group named in the key's entry, else the key id (`-` without a key).
    pub name: String,
    pub weight: u32,
    /// At most this many of the share's jobs on pods (running or prefetched).
    pub max_running: Option<u32>,
}

impl Share {
    /// `on_pods` of its jobs on pods leave it no room under its cap.
    pub fn at_cap(&self, on_pods: u64) -> bool {
        self.max_running
            .is_some_and(|cap| on_pods >= u64::from(cap))
    }
}

pub const DEFAULT_WEIGHT: u32 = 1;
/// Weights are bounded so that loads times weights stay far from overflow.
pub const MAX_WEIGHT: u32 = 10_000;
/// The share of jobs submitted without a key (authentication off).
pub const ANONYMOUS: &str = "-";

/// Where shares come from (the API keys' Secret).
pub trait Shares: Send + Sync {
    fn share_of(&self, key_id: Option<&str>) -> Share;
}

/// Every key its own share of weight 1, without a cap: what a gateway without share
/// settings does.
pub struct EqualShares;

impl Shares for EqualShares {
    fn share_of(&self, key_id: Option<&str>) -> Share {
        Share {
            name: key_id.unwrap_or(ANONYMOUS).to_string(),
            weight: DEFAULT_WEIGHT,
            max_running: None,
        }
    }
}

/// A queued job as fair share sees it, in arrival order.
pub struct Waiting<'a, T> {
    pub item: T,
    pub key_id: Option<&'a str>,
    pub priority: i32,
}

/// Whether a share at its cap is left out (dispatch) or ordered as if it had room (a
/// job's place in line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caps {
    Respect,
    Ignore,
}

struct Lane<T> {
    share: Share,
    /// Jobs on pods (what the cap counts).
    on_pods: u64,
    /// Recent use, plus jobs on pods, plus those put ahead in this order.
    load: f64,
    /// (priority, arrival, item), the next at the end.
    items: Vec<(i32, usize, T)>,
}

/// The first `limit` of `queued` in fair-share order. `on_pods` holds the key id of
/// every job of the fleet on a pod; `usage` each share's recent use (by share name).
pub fn order<'a, T>(
    queued: impl IntoIterator<Item = Waiting<'a, T>>,
    on_pods: impl IntoIterator<Item = Option<&'a str>>,
    usage: &HashMap<String, f64>,
    shares: &dyn Shares,
    caps: Caps,
    limit: usize,
) -> Vec<T> {
    let mut resolved: HashMap<Option<&str>, Share> = HashMap::new();
    let mut share_of = |key: Option<&'a str>| {
        resolved
            .entry(key)
            .or_insert_with(|| shares.share_of(key))
            .clone()
    };
    let mut lanes: HashMap<String, Lane<T>> = HashMap::new();
    for (arrival, w) in queued.into_iter().enumerate() {
        let share = share_of(w.key_id);
        lanes
            .entry(share.name.clone())
            .or_insert_with(|| Lane {
                load: usage.get(&share.name).copied().unwrap_or(0.0),
                share,
                on_pods: 0,
                items: Vec::new(),
            })
            .items
            .push((w.priority, arrival, w.item));
    }
    if lanes.is_empty() {
        return Vec::new();
    }
    for key in on_pods {
        let name = share_of(key).name;
        if let Some(lane) = lanes.get_mut(&name) {
            lane.on_pods += 1;
            lane.load += 1.0;
        }
    }
    let mut lanes: Vec<Lane<T>> = lanes
        .into_values()
        .filter(|l| caps == Caps::Ignore || !l.share.at_cap(l.on_pods))
        .collect();
    for lane in &mut lanes {
        // Higher priority first, then arrival; popped from the end.
        lane.items.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    }
    let mut out = Vec::with_capacity(limit.min(lanes.iter().map(|l| l.items.len()).sum()));
    while out.len() < limit {
        // The lane with the least load per weight; on a tie, the earliest next job.
        let best = lanes
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.items.last().map(|next| (i, l, next.1)))
            .min_by(|(_, a, a_next), (_, b, b_next)| {
                let wa = f64::from(a.share.weight.clamp(1, MAX_WEIGHT));
                let wb = f64::from(b.share.weight.clamp(1, MAX_WEIGHT));
                (a.load * wb)
                    .total_cmp(&(b.load * wa))
                    .then(a_next.cmp(b_next))
            })
            .map(|(i, _, _)| i);
        let Some(i) = best else { break };
        let lane = &mut lanes[i];
        if let Some((_, _, item)) = lane.items.pop() {
            out.push(item);
            lane.load += 1.0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shares from a table: key → (group, weight, cap).
    struct Table(Vec<(&'static str, &'static str, u32, Option<u32>)>);

    impl Shares for Table {
        fn share_of(&self, key_id: Option<&str>) -> Share {
            self.0
                .iter()
                .find(|(k, ..)| Some(*k) == key_id)
                .map(|(_, group, weight, cap)| Share {
                    name: group.to_string(),
                    weight: *weight,
                    max_running: *cap,
                })
                .unwrap_or_else(|| EqualShares.share_of(key_id))
        }
    }

    fn none() -> HashMap<String, f64> {
        HashMap::new()
    }

    fn jobs(spec: &[(&'static str, i32)]) -> Vec<Waiting<'static, usize>> {
        spec.iter()
            .enumerate()
            .map(|(i, (key, priority))| Waiting {
                item: i,
                key_id: Some(key),
                priority: *priority,
            })
            .collect()
    }

    #[test]
    fn a_late_small_batch_is_not_buried_behind_a_large_one() {
        // A queued 1000 first, then B 3: B's jobs come at once, in turn with A's.
        let mut spec = vec![("a", 0); 1000];
        spec.extend([("b", 0); 3]);
        let got = order(jobs(&spec), [], &none(), &EqualShares, Caps::Respect, 8);
        assert_eq!(got, vec![0, 1000, 1, 1001, 2, 1002, 3, 4]);
    }

    #[test]
    fn under_saturation_slots_split_by_weight() {
        let shares = Table(vec![("a", "a", 3, None), ("b", "b", 1, None)]);
        let mut spec = vec![("a", 0); 100];
        spec.extend([("b", 0); 100]);
        let got = order(jobs(&spec), [], &none(), &shares, Caps::Respect, 40);
        let from_a = got.iter().filter(|i| **i < 100).count();
        assert_eq!((from_a, got.len() - from_a), (30, 10));
        // Jobs already on pods count: A holds 6, B none, so B goes first twice.
        let on_pods = vec![Some("a"); 6];
        let got = order(jobs(&spec), on_pods, &none(), &shares, Caps::Respect, 3);
        assert_eq!(got, vec![100, 101, 0]);
    }

    #[test]
    fn a_share_at_its_cap_waits_and_the_others_go_on() {
        let shares = Table(vec![("a", "a", 1, Some(2)), ("b", "b", 1, None)]);
        let spec = [("a", 0), ("a", 0), ("b", 0)];
        assert_eq!(
            order(
                jobs(&spec),
                [Some("a"), Some("a")],
                &none(),
                &shares,
                Caps::Respect,
                10
            ),
            vec![2]
        );
        // Its place in line is still known.
        assert_eq!(
            order(
                jobs(&spec),
                [Some("a"), Some("a")],
                &none(),
                &shares,
                Caps::Ignore,
                10
            ),
            vec![2, 0, 1]
        );
    }

    #[test]
    fn keys_of_one_group_share_its_lane_fifo_with_priority_first() {
        let shares = Table(vec![
            ("a1", "studio", 1, None),
            ("a2", "studio", 1, None),
            ("b", "b", 1, None),
        ]);
        let spec = [("a1", 0), ("a2", 0), ("a1", 5), ("b", 0), ("b", 0)];
        // studio: 2 (priority 5), 0, 1; b: 3, 4; interleaved, the earliest next first.
        assert_eq!(
            order(jobs(&spec), [], &none(), &shares, Caps::Respect, 10),
            vec![2, 3, 0, 4, 1]
        );
    }

    #[test]
    fn one_share_alone_is_plain_fifo() {
        let spec = [("a", 0); 5];
        assert_eq!(
            order(jobs(&spec), [], &none(), &EqualShares, Caps::Respect, 10),
            vec![0, 1, 2, 3, 4]
        );
        assert!(
            order(
                Vec::<Waiting<usize>>::new(),
                [],
                &none(),
                &EqualShares,
                Caps::Respect,
                3
            )
            .is_empty()
        );
    }

    #[test]
    fn a_share_that_kept_the_pods_busy_yields_to_one_that_just_came() {
        // A started 40 jobs lately, B none: B's 3 go first, then A's.
        let mut spec = vec![("a", 0); 10];
        spec.extend([("b", 0); 3]);
        let usage = HashMap::from([("a".to_string(), 40.0)]);
        let got = order(jobs(&spec), [], &usage, &EqualShares, Caps::Respect, 5);
        assert_eq!(got, vec![10, 11, 12, 0, 1]);
    }

    #[test]
    fn use_halves_every_half_life_and_counts_each_start() {
        let mut u = Usage::default();
        u.add_start(1_000);
        u.add_start(1_000);
        assert_eq!(u.at(1_000), 2.0);
        let half = 1_000 + USAGE_HALF_LIFE.as_millis() as u64;
        assert!((u.at(half) - 1.0).abs() < 1e-9);
        // A clock that went back reads no more than now.
        assert_eq!(u.at(0), 2.0);
    }
}
