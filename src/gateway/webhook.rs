//! Webhooks: `job.succeeded`, `job.failed` (and `job.canceled`, `job.expired`), signed
//! with the Standard Webhooks scheme, retried with exponential backoff until a 2xx or
//! the attempt bound. Deliveries in flight are not persisted: a gateway restart drops
//! them (the job itself is never lost).

use std::time::Duration;

use serde_json::{Value, json};

pub struct Webhooks {
    http: reqwest::Client,
    signer: Option<std::sync::Arc<standardwebhooks::Webhook>>,
    pub max_attempts: u32,
    pub first_delay: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("webhook secret: {0}")]
pub struct SecretError(String);

impl Webhooks {
    /// `secret` is a Standard Webhooks secret (`whsec_<base64>`); none: jobs that ask
    /// for a webhook are refused at submit.
    pub fn new(
        http: reqwest::Client,
        secret: Option<&str>,
        max_attempts: u32,
        first_delay: Duration,
    ) -> Result<Webhooks, SecretError> {
        let signer = secret
            .map(|s| {
                standardwebhooks::Webhook::new(s.trim())
                    .map(std::sync::Arc::new)
                    .map_err(|e| SecretError(e.to_string()))
            })
            .transpose()?;
        Ok(Webhooks {
            http,
            signer,
            max_attempts,
            first_delay,
        })
    }

    pub fn enabled(&self) -> bool {
        self.signer.is_some()
    }

    /// Delivers one event in the background.
    pub fn send(self: &std::sync::Arc<Self>, url: String, event: &str, job_id: &str, job: Value) {
        let Some(signer) = self.signer.clone() else {
            return;
        };
        let this = self.clone();
        let msg_id = format!("{job_id}.{event}");
        let payload =
            json!({"type": event, "timestamp": super::job::now_millis(), "data": job}).to_string();
        tokio::spawn(async move {
            let mut delay = this.first_delay;
            for attempt in 1..=this.max_attempts {
                let ts = (super::job::now_millis() / 1000) as i64;
                let result = match signer.sign(&msg_id, ts, payload.as_bytes()) {
                    Ok(signature) => this
                        .http
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("webhook-id", &msg_id)
                        .header("webhook-timestamp", ts.to_string())
                        .header("webhook-signature", signature)
                        .body(payload.clone())
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await
                        .map(|r| r.status()),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot sign webhook");
                        return;
                    }
                };
                match result {
                    Ok(status) if status.is_success() => return,
                    Ok(status) => tracing::warn!(%msg_id, attempt, %status, "webhook refused"),
                    Err(e) => tracing::warn!(%msg_id, attempt, error = %e, "webhook failed"),
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(300));
            }
            tracing::error!(%msg_id, "webhook given up after {} attempts", this.max_attempts);
        });
    }
}
