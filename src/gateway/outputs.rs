//! Results in object storage: the gateway fetches each output from the pod (`/view`)
//! and puts it into the fleet's outputs bucket under `<prefix><job id>/`, then hands out
//! presigned URLs. Fetch-and-upload works whether or not the fleet mounts its outputs
//! bucket (a mounted bucket already holds the file: then the upload is skipped).
//! Inputs named `s3://bucket/key` are read from the allowed buckets only.

use std::time::Duration;

use aws_sdk_s3::presigning::PresigningConfig;
use bytes::Bytes;

use crate::sync::store::{BucketLocation, S3Store};

use super::job::Output;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OutputError(pub String);

pub struct OutputStore {
    s3: S3Store,
    url_ttl: Duration,
}

impl OutputStore {
    pub async fn connect(location: &BucketLocation, url_ttl: Duration) -> OutputStore {
        OutputStore {
            s3: S3Store::connect(location).await,
            url_ttl,
        }
    }

    /// The object key of a job's output file.
    pub fn key(&self, output: &Output) -> String {
        let sub = output.subfolder.trim_matches('/');
        if sub.is_empty() {
            format!("{}{}", self.s3.prefix, output.filename)
        } else {
            format!("{}{sub}/{}", self.s3.prefix, output.filename)
        }
    }

    /// Stores `bytes` as the output's object unless an object of that size is there.
    pub async fn put(&self, output: &Output, bytes: Bytes) -> Result<String, OutputError> {
        let key = self.key(output);
        let err = |e: String| OutputError(format!("s3://{}/{key}: {e}", self.s3.bucket));
        let head = self
            .s3
            .client
            .head_object()
            .bucket(&self.s3.bucket)
            .key(&key)
            .send()
            .await;
        if head.ok().and_then(|h| h.content_length()) == Some(bytes.len() as i64) {
            return Ok(key);
        }
        self.s3
            .client
            .put_object()
            .bucket(&self.s3.bucket)
            .key(&key)
            .body(bytes.into())
            .send()
            .await
            .map_err(|e| err(aws_sdk_s3::error::DisplayErrorContext(&e).to_string()))?;
        Ok(key)
    }

    pub async fn presign(&self, key: &str) -> Result<String, OutputError> {
        let config =
            PresigningConfig::expires_in(self.url_ttl).map_err(|e| OutputError(e.to_string()))?;
        let req = self
            .s3
            .client
            .get_object()
            .bucket(&self.s3.bucket)
            .key(key)
            .presigned(config)
            .await
            .map_err(|e| OutputError(aws_sdk_s3::error::DisplayErrorContext(&e).to_string()))?;
        Ok(req.uri().to_string())
    }

    /// An input named `s3://bucket/key`, read with the gateway's credentials.
    pub async fn get_input(&self, bucket: &str, key: &str) -> Result<Bytes, OutputError> {
        let err = |e: String| OutputError(format!("s3://{bucket}/{key}: {e}"));
        let obj = self
            .s3
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| err(aws_sdk_s3::error::DisplayErrorContext(&e).to_string()))?;
        let data = obj.body.collect().await.map_err(|e| err(e.to_string()))?;
        Ok(data.into_bytes())
    }
}

/// `s3://bucket/key` → (bucket, key).
pub fn parse_s3_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("s3://")?;
    let (bucket, key) = rest.split_once('/')?;
    (!bucket.is_empty() && !key.is_empty()).then_some((bucket, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls() {
        assert_eq!(parse_s3_url("s3://b/in/x.png"), Some(("b", "in/x.png")));
        assert_eq!(parse_s3_url("s3://b/"), None);
        assert_eq!(parse_s3_url("https://b/x"), None);
    }
}
