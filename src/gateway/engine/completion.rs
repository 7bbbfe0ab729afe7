//! A job's end on success: its outputs, read from `/history`, streamed to the bucket under
//! the job's own keys, then the job ends `succeeded`.

use std::time::Duration;

use super::Engine;
use crate::gateway::comfy::PodClient;
use crate::gateway::job::{Job, JobError, JobState};

/// Tries to store one output before the job fails `output_failed`.
pub(super) const OUTPUT_ATTEMPTS: u32 = 3;

/// Adds the outputs not yet listed (the websocket's and `/history`'s overlap).
pub(super) fn merge_outputs(
    into: &mut Vec<crate::gateway::job::Output>,
    more: Vec<crate::gateway::job::Output>,
) {
    for o in more {
        if !into.iter().any(|x| {
            x.filename == o.filename && x.subfolder == o.subfolder && x.folder_type == o.folder_type
        }) {
            into.push(o);
        }
    }
}

/// Whether a finished job's outputs are all known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outputs {
    /// Every `executed` event reached this gateway, or `/history` was just read.
    Complete,
    /// The socket dropped while the prompt ran: events may be missing, `/history` has them.
    AskHistory,
}

impl Engine {
    /// Stores a finished prompt's outputs and ends the job `succeeded`. The outputs are
    /// read from `/history` unless they are known to be complete: a websocket that was
    /// down for part of the run missed some (ComfyUI drops events for a client whose
    /// socket is down). Each upload is tried `OUTPUT_ATTEMPTS` times; a pod that cannot be
    /// read any more gives the job back to the queue.
    pub(super) async fn complete(&self, mut job: Job, client: &PodClient, outputs: Outputs) {
        let history = match outputs {
            Outputs::Complete => Ok(None),
            Outputs::AskHistory => client.history(&job.id).await,
        };
        match history {
            Ok(Some(entry)) => merge_outputs(&mut job.outputs, entry.outputs),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(job = %job.id, error = %e, "cannot read the job's outputs from its pod");
                let mut st = self.lock();
                self.requeue_locked(&mut st, &job.id, "its outputs could not be read");
                return;
            }
        }
        if let Some(store) = &self.outputs {
            for output in job.outputs.iter_mut() {
                let key = store.key(&job.id, output);
                let mut last_error = String::new();
                for attempt in 1..=OUTPUT_ATTEMPTS {
                    let stored = match client.view(output).await {
                        Ok(resp) => store
                            .put_response(&key, resp)
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    match stored {
                        Ok(size) => {
                            output.key = Some(key.clone());
                            output.size = Some(size);
                            last_error.clear();
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(job = %job.id, attempt, error = %e, "output upload failed");
                            last_error = e;
                            if attempt < OUTPUT_ATTEMPTS {
                                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                            }
                        }
                    }
                }
                if !last_error.is_empty() {
                    let error = JobError::new("output_failed", last_error);
                    self.finish(&job.id, JobState::Failed, Some(error));
                    return;
                }
            }
        }
        let cold = self.signals.get(&job.fleet).cold_start;
        let mut st = self.lock();
        if let Some(live) = st.jobs.get_mut(&job.id) {
            live.outputs = job.outputs;
            if let (Some(cold), Some(started)) = (cold, live.started_at) {
                live.cold_start_phases =
                    crate::gateway::demand::phases_for(&cold, live.created_at, started);
            }
        }
        self.finish_locked(&mut st, &job.id, JobState::Succeeded, None);
    }
}
