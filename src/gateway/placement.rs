//! Which queued job goes to which pod. Pure: the engine calls it with a snapshot.
//!
//! A pod that last ran a checkpoint keeps it loaded; loading another costs seconds to
//! minutes. So a free pod takes the oldest job (within a window of the queue) for the
//! checkpoint it has, idle pods first; a fresh pod takes the head; a busy pod prefetches
//! a job of its checkpoint before an idle pod switches; a busy pod prefetches another
//! checkpoint only when no pod has the head's. A head that waited past `max_skip` goes
//! to the least loaded pod, so nothing starves.

use std::collections::VecDeque;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Placement {
    /// Prefer a pod with the job's checkpoint loaded, then the least loaded pod.
    Affinity,
    /// Any free pod (a baseline for the placement benchmark).
    Random,
}

/// A queued job, as placement sees it.
pub struct Queued<'a> {
    pub id: &'a str,
    pub checkpoint: Option<&'a str>,
    pub waited: Duration,
}

/// A ready pod, as placement sees it.
pub struct PodLoad<'a> {
    pub name: &'a str,
    /// Jobs handed to it and not finished.
    pub assigned: usize,
    /// No slot free (one running plus one prefetched).
    pub full: bool,
    /// The checkpoint of the last job it was handed.
    pub checkpoint: Option<&'a str>,
}

/// How far past the head a free pod looks for a job of its checkpoint.
pub const WINDOW: usize = 64;

/// The next (job index in `queue`, pod index in `pods`), or none.
pub fn next(
    policy: Placement,
    queue: &VecDeque<Queued>,
    pods: &[PodLoad],
    max_skip: Duration,
) -> Option<(usize, usize)> {
    let head = queue.front()?;
    let free: Vec<usize> = (0..pods.len()).filter(|&i| !pods[i].full).collect();
    if free.is_empty() {
        return None;
    }
    let least_loaded = |filter: &dyn Fn(&PodLoad) -> bool| {
        pods.iter()
            .enumerate()
            .filter(|(_, p)| !p.full && filter(p))
            .min_by_key(|(_, p)| p.assigned)
            .map(|(i, _)| i)
    };
    if policy == Placement::Random {
        let hash = head
            .id
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        return Some((0, free[hash % free.len()]));
    }
    if head.waited >= max_skip {
        return least_loaded(&|_| true).map(|p| (0, p));
    }
    let matching = |idle: bool| {
        queue.iter().take(WINDOW).enumerate().find_map(|(j, job)| {
            let p = least_loaded(&|p| {
                (p.assigned == 0) == idle
                    && job.checkpoint.is_some()
                    && p.checkpoint == job.checkpoint
            })?;
            Some((j, p))
        })
    };
    // 1. An idle pod with a job of its checkpoint.
    if let Some(found) = matching(true) {
        return Some(found);
    }
    // 2. A fresh idle pod (nothing loaded: any job costs it a load) takes the head.
    if let Some(p) = least_loaded(&|p| p.assigned == 0 && p.checkpoint.is_none()) {
        return Some((0, p));
    }
    // 3. A busy pod prefetches a job of its checkpoint.
    if let Some(found) = matching(false) {
        return Some(found);
    }
    // 4. An idle pod takes the head: a switch, but no GPU sits idle.
    if let Some(p) = least_loaded(&|p| p.assigned == 0) {
        return Some((0, p));
    }
    // 5. A busy pod prefetches another checkpoint only when no pod has the head's.
    let any_has_it =
        head.checkpoint.is_some() && pods.iter().any(|p| p.checkpoint == head.checkpoint);
    if any_has_it {
        return None;
    }
    least_loaded(&|_| true).map(|p| (0, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q<'a>(jobs: &[(&'a str, &'a str)]) -> VecDeque<Queued<'a>> {
        jobs.iter()
            .map(|(id, ck)| Queued {
                id,
                checkpoint: Some(ck),
                waited: Duration::ZERO,
            })
            .collect()
    }

    fn pod<'a>(name: &'a str, assigned: usize, ck: Option<&'a str>) -> PodLoad<'a> {
        PodLoad {
            name,
            assigned,
            full: assigned >= 2,
            checkpoint: ck,
        }
    }

    const SKIP: Duration = Duration::from_secs(30);

    #[test]
    fn a_pod_takes_the_oldest_job_of_its_checkpoint() {
        let queue = q(&[("1", "A"), ("2", "B"), ("3", "B")]);
        let pods = [pod("p", 0, Some("B"))];
        assert_eq!(next(Placement::Affinity, &queue, &pods, SKIP), Some((1, 0)));
    }

    #[test]
    fn an_idle_pod_without_a_match_takes_the_head() {
        let queue = q(&[("1", "A")]);
        let pods = [pod("busy", 1, Some("B")), pod("idle", 0, Some("C"))];
        assert_eq!(next(Placement::Affinity, &queue, &pods, SKIP), Some((0, 1)));
    }

    #[test]
    fn a_busy_pod_does_not_prefetch_a_checkpoint_another_pod_has() {
        let queue = q(&[("1", "A")]);
        // "a" has A loaded but is full: "b" waits rather than switch.
        let pods = [pod("b", 1, Some("B")), pod("a", 2, Some("A"))];
        assert_eq!(next(Placement::Affinity, &queue, &pods, SKIP), None);
        // Nobody has A: "b" prefetches it.
        let pods = [pod("b", 1, Some("B"))];
        assert_eq!(next(Placement::Affinity, &queue, &pods, SKIP), Some((0, 0)));
    }

    #[test]
    fn least_loaded_among_matches_and_a_long_wait_goes_first() {
        let queue = q(&[("1", "A")]);
        let pods = [pod("a1", 1, Some("A")), pod("a2", 0, Some("A"))];
        assert_eq!(next(Placement::Affinity, &queue, &pods, SKIP), Some((0, 1)));
        let mut queue = q(&[("1", "A"), ("2", "B")]);
        queue[0].waited = SKIP;
        let pods = [pod("b", 0, Some("B"))];
        assert_eq!(next(Placement::Affinity, &queue, &pods, SKIP), Some((0, 0)));
    }

    #[test]
    fn a_fresh_pod_goes_before_a_prefetch_and_a_prefetch_before_a_switch() {
        let queue = q(&[("1", "A")]);
        let pods = [pod("a", 1, Some("A")), pod("fresh", 0, None)];
        assert_eq!(next(Placement::Affinity, &queue, &pods, SKIP), Some((0, 1)));
        let pods = [pod("a", 1, Some("A")), pod("b", 0, Some("B"))];
        assert_eq!(next(Placement::Affinity, &queue, &pods, SKIP), Some((0, 0)));
    }

    #[test]
    fn nothing_to_place() {
        assert_eq!(
            next(Placement::Affinity, &q(&[]), &[pod("p", 0, None)], SKIP),
            None
        );
        assert_eq!(
            next(Placement::Affinity, &q(&[("1", "A")]), &[], SKIP),
            None
        );
        assert_eq!(
            next(
                Placement::Random,
                &q(&[("1", "A")]),
                &[pod("p", 2, None)],
                SKIP
            ),
            None
        );
    }
}
