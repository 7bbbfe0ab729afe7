//! Results in object storage: the gateway streams each output from the pod (`/view`)
//! into the fleet's outputs bucket under `<prefix><job id>/<type>/<subfolder>/<file>`,
//! then hands out presigned URLs. The job id in every key means no job can be handed
//! another's file, whatever the workflow's save prefix, save node or folder type.
//! Fetch-and-upload works whether or not the fleet mounts its outputs bucket. Large files
//! go up in parts, never whole in memory. Inputs named `s3://bucket/key` are read from the
//! allowed buckets only.

use std::time::Duration;

use aws_sdk_s3::presigning::PresigningConfig;
use bytes::Bytes;

use crate::storage::s3::{BucketLocation, S3Store};

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
    pub fn key(&self, job_id: &str, output: &Output) -> String {
        output_key(&self.s3.prefix, job_id, output)
    }

    /// Streams a `/view` response into the output's object: one put for a small file,
    /// a multipart upload of `PART`-sized parts otherwise (aborted on failure). Returns
    /// the size. A retry writes the same key again: the key is the job's own.
    pub async fn put_response(
        &self,
        key: &str,
        mut body: reqwest::Response,
    ) -> Result<u64, OutputError> {
        let err = |e: String| OutputError(format!("s3://{}/{key}: {e}", self.s3.bucket));
        let mut first = bytes::BytesMut::new();
        let mut more = true;
        while first.len() < PART {
            match body.chunk().await {
                Ok(Some(chunk)) => first.extend_from_slice(&chunk),
                Ok(None) => {
                    more = false;
                    break;
                }
                Err(e) => return Err(err(format!("reading from the pod: {}", e.without_url()))),
            }
        }
        if !more {
            let size = first.len() as u64;
            self.s3
                .client
                .put_object()
                .bucket(&self.s3.bucket)
                .key(key)
                .body(first.freeze().into())
                .send()
                .await
                .map_err(|e| err(aws_sdk_s3::error::DisplayErrorContext(&e).to_string()))?;
            return Ok(size);
        }
        let upload = self
            .s3
            .client
            .create_multipart_upload()
            .bucket(&self.s3.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| err(aws_sdk_s3::error::DisplayErrorContext(&e).to_string()))?;
        let upload_id = upload.upload_id().unwrap_or_default().to_string();
        let result = self.upload_parts(key, &upload_id, first, &mut body).await;
        match result {
            Ok((parts, size)) => {
                self.s3
                    .client
                    .complete_multipart_upload()
                    .bucket(&self.s3.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .multipart_upload(
                        aws_sdk_s3::types::CompletedMultipartUpload::builder()
                            .set_parts(Some(parts))
                            .build(),
                    )
                    .send()
                    .await
                    .map_err(|e| err(aws_sdk_s3::error::DisplayErrorContext(&e).to_string()))?;
                Ok(size)
            }
            Err(e) => {
                // No half-written object, and no parts left to pay for.
                let _ = self
                    .s3
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.s3.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .send()
                    .await;
                Err(err(e))
            }
        }
    }

    async fn upload_parts(
        &self,
        key: &str,
        upload_id: &str,
        mut buf: bytes::BytesMut,
        body: &mut reqwest::Response,
    ) -> Result<(Vec<aws_sdk_s3::types::CompletedPart>, u64), String> {
        let mut parts = Vec::new();
        let mut size = 0u64;
        let mut done = false;
        while !done {
            while buf.len() < PART {
                match body.chunk().await {
                    Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
                    Ok(None) => {
                        done = true;
                        break;
                    }
                    Err(e) => return Err(format!("reading from the pod: {}", e.without_url())),
                }
            }
            if buf.is_empty() {
                break;
            }
            let chunk = buf.split_to(buf.len().min(PART)).freeze();
            size += chunk.len() as u64;
            let number = parts.len() as i32 + 1;
            let part = self
                .s3
                .client
                .upload_part()
                .bucket(&self.s3.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .body(chunk.into())
                .send()
                .await
                .map_err(|e| aws_sdk_s3::error::DisplayErrorContext(&e).to_string())?;
            parts.push(
                aws_sdk_s3::types::CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(part.e_tag().map(str::to_string))
                    .build(),
            );
            if done && !buf.is_empty() {
                done = false;
            }
        }
        Ok((parts, size))
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

/// The size of a multipart upload's parts (S3's minimum is 5 MiB, except the last).
const PART: usize = 8 << 20;

/// `<prefix><job id>/<type>/<subfolder>/<file>`: ComfyUI's names under the job's own
/// folder, so a linked `filename_prefix`, a custom save node or a temp preview cannot
/// write into another job's keys. Path segments that could climb (`..`, empty) are
/// dropped.
pub fn output_key(prefix: &str, job_id: &str, output: &Output) -> String {
    let folder_type = if output.folder_type.is_empty() {
        "output"
    } else {
        output.folder_type.as_str()
    };
    let mut segments = vec![job_id, folder_type];
    segments.extend(
        output
            .subfolder
            .split(['/', '\\'])
            .chain(output.filename.split(['/', '\\']))
            .filter(|s| !s.is_empty() && *s != "." && *s != ".."),
    );
    format!("{prefix}{}", segments.join("/"))
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
    fn output_keys_are_under_the_job_and_its_folder_type() {
        let out = |sub: &str, file: &str, t: &str| Output {
            node: "9".into(),
            filename: file.into(),
            subfolder: sub.into(),
            folder_type: t.into(),
            key: None,
            size: None,
        };
        assert_eq!(
            output_key("results/", "j1", &out("", "ComfyUI_00001_.png", "output")),
            "results/j1/output/ComfyUI_00001_.png"
        );
        assert_eq!(
            output_key("", "j1", &out("a/b", "x.png", "temp")),
            "j1/temp/a/b/x.png"
        );
        assert_eq!(
            output_key("p/", "j1", &out("../j2", "x.png", "")),
            "p/j1/output/j2/x.png"
        );
    }

    #[test]
    fn s3_urls() {
        assert_eq!(parse_s3_url("s3://b/in/x.png"), Some(("b", "in/x.png")));
        assert_eq!(parse_s3_url("s3://b/"), None);
        assert_eq!(parse_s3_url("https://b/x"), None);
    }
}
