//! Object storage behind a small trait: list a prefix, read (a range of) an object.
//! `S3Store` is the AWS SDK implementation; it also serves S3-compatible endpoints.

use std::future::Future;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

use super::catalog::{Catalog, Filter, Object};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("listing s3://{bucket}/{prefix}: {message}")]
    List {
        bucket: String,
        prefix: String,
        message: String,
    },
    #[error("reading s3://{bucket}/{key}: {message}")]
    Get {
        bucket: String,
        key: String,
        message: String,
    },
}

pub type ByteChunks = BoxStream<'static, Result<Bytes, StoreError>>;

/// An object's bytes as they arrive, and whether its ETag is the MD5 of those bytes:
/// not for SSE-KMS or SSE-C objects, whose ETag is 32 hex characters all the same.
pub struct Body {
    pub chunks: ByteChunks,
    pub etag_is_md5: bool,
}

pub trait ObjectStore: Send + Sync {
    /// Every object under the prefix, keys relative to it.
    fn list(&self) -> impl Future<Output = Result<Vec<Object>, StoreError>> + Send;
    /// The object's bytes, or bytes `start..=end` of it, only while its ETag is still
    /// `etag` (empty: any version): a file is never stitched from two versions.
    fn get(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
        etag: &str,
    ) -> impl Future<Output = Result<Body, StoreError>> + Send;
}

/// Where a bucket's objects are: what `S3Store::connect` needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BucketLocation {
    pub bucket: String,
    pub prefix: String,
    pub region: Option<String>,
    /// An S3-compatible endpoint (path-style addressing there).
    pub endpoint: Option<String>,
}

/// A prefix names a folder: `models` is `models/`, so `models-old/...` is not in it and
/// keys under it are relative to it.
pub fn folder(prefix: &str) -> String {
    if prefix.is_empty() || prefix.ends_with('/') {
        prefix.to_string()
    } else {
        format!("{prefix}/")
    }
}

/// A bucket and prefix in S3 (or an S3-compatible store).
#[derive(Clone)]
pub struct S3Store {
    pub client: aws_sdk_s3::Client,
    pub bucket: String,
    pub prefix: String,
}

impl S3Store {
    /// A client for the location's region, at its endpoint if it names one.
    pub async fn connect(location: &BucketLocation) -> S3Store {
        let endpoint = location.endpoint.as_deref().filter(|e| !e.is_empty());
        let shared = crate::aws::sdk_config(location.region.as_deref(), endpoint).await;
        let mut config = aws_sdk_s3::config::Builder::from(&shared);
        if endpoint.is_some() || shared.endpoint_url().is_some() {
            config = config.force_path_style(true);
        }
        S3Store {
            client: aws_sdk_s3::Client::from_conf(config.build()),
            bucket: location.bucket.clone(),
            prefix: folder(&location.prefix),
        }
    }

    /// Connects and lists the location into a catalog of what `filter` accepts: the one
    /// listing pipeline of the controller, the node agent and `sdfleet sync`.
    pub async fn open_catalog(
        location: &BucketLocation,
        filter: &Filter,
    ) -> Result<(S3Store, Catalog), StoreError> {
        let store = S3Store::connect(location).await;
        let objects = store.list().await?;
        let catalog = Catalog::new(
            objects
                .into_iter()
                .filter(|o| filter.accepts(&o.key))
                .collect(),
        );
        Ok((store, catalog))
    }
}

impl ObjectStore for S3Store {
    async fn list(&self) -> Result<Vec<Object>, StoreError> {
        let err = |e: String| StoreError::List {
            bucket: self.bucket.clone(),
            prefix: self.prefix.clone(),
            message: e,
        };
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&self.prefix)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page =
                page.map_err(|e| err(aws_sdk_s3::error::DisplayErrorContext(&e).to_string()))?;
            for o in page.contents() {
                let Some(full) = o.key() else { continue };
                let key = full.strip_prefix(&self.prefix).unwrap_or(full);
                // Folder markers made by consoles are not models.
                if key.is_empty() || key.ends_with('/') {
                    continue;
                }
                out.push(Object {
                    key: key.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    etag: o.e_tag().unwrap_or_default().trim_matches('"').to_string(),
                    last_modified: o.last_modified().map(|t| t.to_string()),
                });
            }
        }
        Ok(out)
    }

    async fn get(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
        etag: &str,
    ) -> Result<Body, StoreError> {
        let full = format!("{}{key}", self.prefix);
        let mut req = self.client.get_object().bucket(&self.bucket).key(&full);
        if let Some((start, end)) = range {
            req = req.range(format!("bytes={start}-{end}"));
        }
        if !etag.is_empty() {
            req = req.if_match(format!("\"{etag}\""));
        }
        let (bucket, k) = (self.bucket.clone(), full.clone());
        let out = req.send().await.map_err(|e| {
            let changed = e
                .raw_response()
                .is_some_and(|r| r.status().as_u16() == 412);
            StoreError::Get {
                bucket: bucket.clone(),
                key: k.clone(),
                message: if changed {
                    format!("the object changed during the sync (no longer ETag {etag}); it is fetched again next sync")
                } else {
                    aws_sdk_s3::error::DisplayErrorContext(&e).to_string()
                },
            }
        })?;
        use aws_sdk_s3::types::ServerSideEncryption;
        let encrypted = matches!(
            out.server_side_encryption(),
            Some(ServerSideEncryption::AwsKms | ServerSideEncryption::AwsKmsDsse)
        ) || out.sse_customer_algorithm().is_some();
        let stream = futures::stream::try_unfold(out.body, |mut body| async move {
            match body.try_next().await {
                Ok(Some(chunk)) => Ok(Some((chunk, body))),
                Ok(None) => Ok(None),
                Err(e) => Err(e.to_string()),
            }
        })
        .map_err(move |message| StoreError::Get {
            bucket: bucket.clone(),
            key: k.clone(),
            message,
        });
        Ok(Body {
            chunks: stream.boxed(),
            etag_is_md5: !encrypted,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_prefix_is_a_folder() {
        assert_eq!(super::folder("models"), "models/");
        assert_eq!(super::folder("models/"), "models/");
        assert_eq!(super::folder(""), "");
    }
}
