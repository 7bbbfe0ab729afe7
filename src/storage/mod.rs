//! Where models come from, behind one small trait: list what is there, read (a range
//! of) one object. The sync engine, the node agent, `sdfleet sync` and the ModelSet
//! controller's catalog use only [`ObjectStore`]; [`open`] picks the backend a
//! ModelSet's source names (`s3` today).

pub mod s3;
pub mod urls;

use std::future::Future;

use bytes::Bytes;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::crd::modelset::ModelSource;

/// One object, with its key relative to the store's root (a bucket's prefix).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Object {
    pub key: String,
    pub size: u64,
    /// What pins one version: S3's ETag.
    pub etag: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
}

/// A store that cannot be read, naming where (`s3://bucket/prefix`, a manifest's URL).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("listing {location}: {message}")]
    List { location: String, message: String },
    #[error("reading {object}: {message}")]
    Get { object: String, message: String },
}

pub type ByteChunks = BoxStream<'static, Result<Bytes, StoreError>>;

/// An object's bytes as they arrive, and how they are verified.
pub struct Body {
    pub chunks: ByteChunks,
    pub check: BodyCheck,
}

/// What proves a whole object's bytes are S3's, besides its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyCheck {
    /// S3 sent a full-object checksum (CRC64NVME, CRC32C, CRC32, SHA-1 or SHA-256) and
    /// the client checks the bytes against it as they stream: a mismatch is an error at
    /// the end of the body. Cheaper than an MD5 (a third of a small-file sync's CPU).
    Checksum,
    /// The ETag is the MD5 of the bytes, when it looks like one (a multipart upload's
    /// has a '-').
    EtagMd5,
    /// SSE-KMS and SSE-C objects: their ETag is 32 hex characters, not the MD5.
    SizeOnly,
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
    /// Whether an object's ETag is the SHA-256 of its bytes (a list of files by URL):
    /// the sync engine then hashes what it wrote, however it was read, before the file
    /// goes into place.
    fn etag_is_sha256(&self) -> bool {
        false
    }
}

/// An error and its chain of causes, as one line.
pub(crate) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

/// The store a ModelSet's source names, ready to list and read.
pub enum Store {
    S3(s3::S3Store),
    Urls(urls::UrlStore),
}

/// Connects to the store `source` names; buckets are in `default_region` unless the
/// source names one.
pub async fn open(source: &ModelSource, default_region: Option<&str>) -> Result<Store, StoreError> {
    open_as(source, default_region, None).await
}

/// As `open`, reading an S3 source as `tenant` (the class's role, the team's session).
pub async fn open_as(
    source: &ModelSource,
    default_region: Option<&str>,
    tenant: Option<&s3::Tenant>,
) -> Result<Store, StoreError> {
    match (&source.s3, &source.urls) {
        (Some(s3), _) => {
            let location = s3::BucketLocation::of(s3, default_region);
            Ok(Store::S3(s3::S3Store::connect_as(&location, tenant).await))
        }
        (None, Some(files)) => Ok(Store::Urls(urls::UrlStore::new(files)?)),
        (None, None) => Err(StoreError::List {
            location: "spec.source".into(),
            message: "names neither s3 nor urls".into(),
        }),
    }
}

impl ObjectStore for Store {
    async fn list(&self) -> Result<Vec<Object>, StoreError> {
        match self {
            Store::S3(s) => s.list().await,
            Store::Urls(u) => u.list().await,
        }
    }

    async fn get(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
        etag: &str,
    ) -> Result<Body, StoreError> {
        match self {
            Store::S3(s) => s.get(key, range, etag).await,
            Store::Urls(u) => u.get(key, range, etag).await,
        }
    }

    fn etag_is_sha256(&self) -> bool {
        match self {
            Store::S3(s) => s.etag_is_sha256(),
            Store::Urls(u) => u.etag_is_sha256(),
        }
    }
}
