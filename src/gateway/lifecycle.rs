//! A job's lifecycle as a state machine: which change is allowed from which state, and
//! what each one writes into the job. Pure (no I/O, no clock): the engine decides when,
//! this decides whether and how.
//!
//! ```text
//!            assign              start
//!  queued ──────────▶ queued@pod ─────▶ running
//!    ▲  ▲                │  │             │ │
//!    │  └── hand back ───┘  │             │ │ request cancel (stays running)
//!    └───── hand back ──────┼─────────────┘ │
//!                           ▼               ▼
//!           succeeded · failed · canceled      (expired: only before it starts)
//! ```

use super::job::{Job, JobError, JobState, Millis};

/// A change to a job.
#[derive(Clone, Debug, PartialEq)]
pub enum Transition {
    /// Handed to a pod (still queued: on the pod's queue).
    Assign {
        pod: String,
        at: Millis,
        /// The pod had run nothing and held nothing.
        cold_start: bool,
        /// The pod has another checkpoint loaded.
        checkpoint_switch: bool,
    },
    /// The pod began to run it.
    Start { at: Millis },
    /// The pod lost it (died, restarted, forgot it): back to the fleet's queue.
    HandBack { at: Millis, why: String },
    /// A client asked to cancel while it runs: it ends when the pod says so.
    RequestCancel { at: Millis },
    /// It ended: `state` is final.
    End {
        state: JobState,
        error: Option<JobError>,
        at: Millis,
    },
}

/// Why a transition does not apply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Illegal {
    #[error("the job already ended ({0:?})")]
    Ended(JobState),
    #[error("the job is already on pod {0}")]
    AlreadyAssigned(String),
    #[error("the job is on no pod")]
    NotAssigned,
    #[error("the job is already running")]
    AlreadyRunning,
    #[error("the job is not running")]
    NotRunning,
    #[error("{0:?} is not a final state")]
    NotFinal(JobState),
    #[error("a job that started cannot expire")]
    StartedCannotExpire,
    #[error("a job that no pod ran cannot succeed")]
    NeverRan,
}

/// Applies `transition` to `job`, or says why it does not apply (the job unchanged).
pub fn apply(job: &mut Job, transition: Transition) -> Result<(), Illegal> {
    if job.state.is_final() {
        return Err(Illegal::Ended(job.state));
    }
    match transition {
        Transition::Assign {
            pod,
            at,
            cold_start,
            checkpoint_switch,
        } => {
            if job.state == JobState::Running {
                return Err(Illegal::AlreadyRunning);
            }
            if let Some(on) = &job.pod {
                return Err(Illegal::AlreadyAssigned(on.clone()));
            }
            job.pod = Some(pod);
            job.dispatched_at = Some(at);
            job.attempts += 1;
            job.cold_start = cold_start;
            job.checkpoint_switch = checkpoint_switch;
        }
        Transition::Start { at } => {
            if job.state == JobState::Running {
                return Err(Illegal::AlreadyRunning);
            }
            if job.pod.is_none() {
                return Err(Illegal::NotAssigned);
            }
            job.state = JobState::Running;
            job.started_at = Some(at);
            job.record_change(at, None);
        }
        Transition::HandBack { at, why } => {
            if job.pod.is_none() {
                return Err(Illegal::NotAssigned);
            }
            // What the lost run made is not this run's: it starts over.
            job.state = JobState::Queued;
            job.pod = None;
            job.started_at = None;
            job.progress = None;
            job.outputs.clear();
            job.record_change(at, Some(why));
        }
        Transition::RequestCancel { at } => {
            if job.state != JobState::Running {
                return Err(Illegal::NotRunning);
            }
            job.cancel_requested = true;
            job.record_change(at, None);
        }
        Transition::End { state, error, at } => {
            if !state.is_final() {
                return Err(Illegal::NotFinal(state));
            }
            let started = job.state == JobState::Running || job.started_at.is_some();
            if state == JobState::Expired && started {
                return Err(Illegal::StartedCannotExpire);
            }
            // Success comes from a pod: a job still in the fleet's queue never ran.
            if state == JobState::Succeeded && job.pod.is_none() {
                return Err(Illegal::NeverRan);
            }
            job.state = state;
            job.error = error;
            job.finished_at = Some(at);
            job.pod = None;
            // Inputs were only needed to run it; keep the store small.
            job.inputs.clear();
            job.record_change(at, None);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::job::{InputFile, Output, Progress};

    fn queued() -> Job {
        let mut job = Job::for_test("j", JobState::Queued, 1);
        job.inputs.push(InputFile {
            name: "in.png".into(),
            source: "base64:AA==".into(),
        });
        job
    }

    fn assign(pod: &str) -> Transition {
        Transition::Assign {
            pod: pod.into(),
            at: 10,
            cold_start: true,
            checkpoint_switch: false,
        }
    }

    fn end(state: JobState) -> Transition {
        Transition::End {
            state,
            error: None,
            at: 99,
        }
    }

    fn assigned() -> Job {
        let mut job = queued();
        apply(&mut job, assign("p")).unwrap();
        job
    }

    fn running() -> Job {
        let mut job = assigned();
        apply(&mut job, Transition::Start { at: 20 }).unwrap();
        job
    }

    fn ended(state: JobState) -> Job {
        let mut job = running();
        if state == JobState::Expired {
            job = queued();
        }
        apply(&mut job, end(state)).unwrap();
        job
    }

    #[test]
    fn every_visible_change_is_numbered_in_the_history_and_a_hand_back_says_why() {
        let mut job = running();
        apply(
            &mut job,
            Transition::HandBack {
                at: 30,
                why: "pod p lost".into(),
            },
        )
        .unwrap();
        apply(&mut job, assign("q")).unwrap();
        apply(&mut job, Transition::Start { at: 40 }).unwrap();
        apply(&mut job, Transition::RequestCancel { at: 45 }).unwrap();
        apply(&mut job, end(JobState::Canceled)).unwrap();
        let seen: Vec<(u32, JobState, Option<&str>, Option<&str>)> = job
            .history
            .iter()
            .map(|c| (c.seq, c.state, c.pod.as_deref(), c.reason.as_deref()))
            .collect();
        assert_eq!(
            seen,
            [
                (1, JobState::Running, Some("p"), None),
                (2, JobState::Queued, None, Some("pod p lost")),
                (3, JobState::Running, Some("q"), None),
                (4, JobState::Running, Some("q"), None),
                (5, JobState::Canceled, None, None),
            ]
        );
        assert!(job.history[3].cancel_requested);
        assert_eq!(job.seq(), 5);
        // A refused change records nothing.
        assert!(apply(&mut job, Transition::Start { at: 50 }).is_err());
        assert_eq!(job.seq(), 5);
    }

    #[test]
    fn assign_puts_a_queued_job_on_a_pod_and_counts_the_attempt() {
        let job = assigned();
        assert_eq!(job.state, JobState::Queued);
        assert_eq!(job.pod.as_deref(), Some("p"));
        assert_eq!(
            (job.dispatched_at, job.attempts, job.cold_start),
            (Some(10), 1, true)
        );
    }

    #[test]
    fn assign_is_refused_on_a_pod_already_and_while_running() {
        let mut job = assigned();
        assert_eq!(
            apply(&mut job, assign("q")),
            Err(Illegal::AlreadyAssigned("p".into()))
        );
        assert_eq!(job.attempts, 1, "unchanged");
        let mut job = running();
        assert_eq!(apply(&mut job, assign("q")), Err(Illegal::AlreadyRunning));
    }

    #[test]
    fn start_runs_an_assigned_job_only() {
        let job = running();
        assert_eq!((job.state, job.started_at), (JobState::Running, Some(20)));
        let mut job = queued();
        assert_eq!(
            apply(&mut job, Transition::Start { at: 1 }),
            Err(Illegal::NotAssigned)
        );
        // Seen again after a reconnect: the first start stands.
        let mut job = running();
        assert_eq!(
            apply(&mut job, Transition::Start { at: 30 }),
            Err(Illegal::AlreadyRunning)
        );
        assert_eq!(job.started_at, Some(20));
    }

    #[test]
    fn hand_back_clears_the_lost_run_from_an_assigned_or_running_job() {
        for mut job in [assigned(), running()] {
            job.progress = Some(Progress {
                node: Some("3".into()),
                value: 4,
                max: 20,
            });
            job.outputs.push(Output {
                node: "9".into(),
                filename: "x.png".into(),
                subfolder: String::new(),
                folder_type: "output".into(),
                key: None,
                size: None,
            });
            apply(
                &mut job,
                Transition::HandBack {
                    at: 5,
                    why: "pod lost".into(),
                },
            )
            .unwrap();
            assert_eq!(job.state, JobState::Queued);
            assert_eq!(job.pod, None);
            assert_eq!(job.started_at, None);
            assert_eq!(job.progress, None);
            assert!(job.outputs.is_empty());
            assert_eq!(job.attempts, 1, "attempts count hand-offs, kept");
            assert_eq!(job.inputs.len(), 1, "its inputs go with it to the next pod");
        }
        let mut job = queued();
        assert_eq!(
            apply(
                &mut job,
                Transition::HandBack {
                    at: 5,
                    why: "pod lost".into()
                }
            ),
            Err(Illegal::NotAssigned)
        );
    }

    #[test]
    fn cancel_is_requested_of_a_running_job_only() {
        let mut job = running();
        apply(&mut job, Transition::RequestCancel { at: 5 }).unwrap();
        assert!(job.cancel_requested);
        assert_eq!(job.state, JobState::Running, "it ends when the pod says so");
        for mut job in [queued(), assigned()] {
            assert_eq!(
                apply(&mut job, Transition::RequestCancel { at: 5 }),
                Err(Illegal::NotRunning)
            );
        }
    }

    #[test]
    fn end_is_final_and_drops_the_pod_and_inputs() {
        let failed = JobError::new("execution_error", "OOM");
        for (mut job, state) in [
            (running(), JobState::Succeeded),
            (assigned(), JobState::Succeeded),
            (running(), JobState::Failed),
            (assigned(), JobState::Failed),
            (queued(), JobState::Failed),
            (running(), JobState::Canceled),
            (assigned(), JobState::Canceled),
            (queued(), JobState::Canceled),
            (queued(), JobState::Expired),
            (assigned(), JobState::Expired),
        ] {
            let error = (state == JobState::Failed).then(|| failed.clone());
            apply(
                &mut job,
                Transition::End {
                    state,
                    error: error.clone(),
                    at: 99,
                },
            )
            .unwrap_or_else(|e| panic!("{state:?}: {e}"));
            assert_eq!(job.state, state);
            assert_eq!(job.error, error);
            assert_eq!(job.finished_at, Some(99));
            assert_eq!(job.pod, None);
            assert!(job.inputs.is_empty());
        }
    }

    #[test]
    fn end_refuses_what_cannot_have_happened() {
        let mut job = queued();
        assert_eq!(
            apply(&mut job, end(JobState::Running)),
            Err(Illegal::NotFinal(JobState::Running))
        );
        assert_eq!(
            apply(&mut job, end(JobState::Succeeded)),
            Err(Illegal::NeverRan)
        );
        let mut job = running();
        assert_eq!(
            apply(&mut job, end(JobState::Expired)),
            Err(Illegal::StartedCannotExpire)
        );
        assert_eq!(job.state, JobState::Running, "unchanged");
    }

    #[test]
    fn nothing_changes_a_job_that_ended() {
        for state in [
            JobState::Succeeded,
            JobState::Failed,
            JobState::Canceled,
            JobState::Expired,
        ] {
            for transition in [
                assign("q"),
                Transition::Start { at: 1 },
                Transition::HandBack {
                    at: 5,
                    why: "pod lost".into(),
                },
                Transition::RequestCancel { at: 5 },
                end(JobState::Failed),
                end(JobState::Canceled),
            ] {
                let mut job = ended(state);
                let before = job.clone();
                assert_eq!(apply(&mut job, transition), Err(Illegal::Ended(state)));
                assert_eq!(job, before);
            }
        }
    }
}
