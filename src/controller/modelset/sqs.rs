//! SQS listeners of ModelSets with `sqsQueueUrl`: each long-polls its queue and wakes
//! the ModelSet's reconcile within a second of an S3 change under its prefix.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use kube::core::DeserializeGuard;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc;

use crate::crd::ModelSet;
use crate::sync::events;

type Guarded = DeserializeGuard<ModelSet>;

/// SQS listeners, one per ModelSet with a queue, and the channel they wake reconciles on.
pub struct SqsWatchers {
    tasks: Mutex<HashMap<String, (String, tokio::task::JoinHandle<()>)>>,
    trigger: mpsc::UnboundedSender<ObjectRef<Guarded>>,
}

impl SqsWatchers {
    pub fn new() -> (SqsWatchers, mpsc::UnboundedReceiver<ObjectRef<Guarded>>) {
        let (trigger, rx) = mpsc::unbounded_channel();
        (
            SqsWatchers {
                tasks: Mutex::new(HashMap::new()),
                trigger,
            },
            rx,
        )
    }

    /// Runs a listener for `key` on `url` (replacing one on another URL), or none.
    pub fn ensure(
        &self,
        key: &str,
        url: Option<&str>,
        obj: ObjectRef<Guarded>,
        prefix: String,
        region: Option<String>,
    ) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((current, handle)) = tasks.get(key) {
            if Some(current.as_str()) == url && !handle.is_finished() {
                return;
            }
            handle.abort();
            tasks.remove(key);
        }
        if let Some(url) = url {
            let handle = tokio::spawn(listen(
                url.to_string(),
                obj,
                prefix,
                region,
                self.trigger.clone(),
            ));
            tasks.insert(key.to_string(), (url.to_string(), handle));
        }
    }
}

/// Long-polls the queue; every batch with a change under the prefix triggers one relist.
/// Messages are deleted once handled. Errors back off (polling still runs meanwhile).
async fn listen(
    url: String,
    obj: ObjectRef<Guarded>,
    prefix: String,
    region: Option<String>,
    trigger: mpsc::UnboundedSender<ObjectRef<Guarded>>,
) {
    let sqs = aws_sdk_sqs::Client::new(&crate::aws::sdk_config(region.as_deref(), None).await);
    let mut backoff = Duration::from_secs(1);
    loop {
        let received = sqs
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .wait_time_seconds(5)
            .send()
            .await;
        let out = match received {
            Ok(out) => {
                backoff = Duration::from_secs(1);
                out
            }
            Err(e) => {
                tracing::warn!(queue = %url, error = %aws_sdk_sqs::error::DisplayErrorContext(&e), retry_in = ?backoff, "SQS receive failed; polling continues");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
                continue;
            }
        };
        let mut changed = BTreeSet::new();
        for message in out.messages() {
            for event in events::parse(message.body().unwrap_or_default()) {
                if event.key.starts_with(&prefix) {
                    changed.insert(event.key);
                }
            }
            if let Some(receipt) = message.receipt_handle()
                && let Err(e) = sqs
                    .delete_message()
                    .queue_url(&url)
                    .receipt_handle(receipt)
                    .send()
                    .await
            {
                tracing::warn!(queue = %url, error = %aws_sdk_sqs::error::DisplayErrorContext(&e), "cannot delete SQS message");
            }
        }
        if !changed.is_empty() {
            tracing::info!(modelset = %obj, keys = changed.len(), "S3 change notified; relisting");
            if trigger.send(obj.clone()).is_err() {
                return;
            }
        }
    }
}
