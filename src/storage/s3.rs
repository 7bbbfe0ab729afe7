//! Models in S3 (or an S3-compatible store): `S3Store` is the AWS SDK implementation of
//! [`ObjectStore`]; the gateway's outputs use its client to write.

use futures::{StreamExt, TryStreamExt};

use super::{Body, BodyCheck, Object, ObjectStore, StoreError, with_causes};

/// Whether the SDK verifies a GetObject body from the checksums in its response: it
/// takes the first of CRC64NVME, CRC32C, CRC32, SHA-1, SHA-256 that is present, and
/// checks it unless it is part-level (a multipart upload's "<base64>-<parts>"; base64
/// itself has no '-'). Only a whole-object GET carries a full-object checksum.
fn sdk_verifies(checksums_in_priority_order: &[Option<&str>]) -> bool {
    checksums_in_priority_order
        .iter()
        .flatten()
        .next()
        .is_some_and(|c| !c.contains('-'))
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

impl BucketLocation {
    /// Where a ModelSet's objects are, in `default_region` unless the source names one.
    pub fn of(source: &crate::crd::modelset::S3Source, default_region: Option<&str>) -> Self {
        BucketLocation {
            bucket: source.bucket.clone(),
            prefix: folder(&source.prefix),
            region: source
                .region
                .clone()
                .or_else(|| default_region.map(str::to_string))
                .filter(|r| !r.is_empty()),
            endpoint: source.endpoint.clone().filter(|e| !e.is_empty()),
        }
    }
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

/// Whose models a read is for, when the class names a role to read them as: the role is
/// assumed with the team's session tags, and every request of the store is signed with
/// that session's credentials.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Tenant {
    pub role_arn: String,
    pub namespace: String,
    /// The ModelSet.
    pub name: String,
}

/// Session tag keys a role's policy reads as `aws:PrincipalTag/<key>`.
pub const NAMESPACE_TAG: &str = "sdfleet-namespace";
pub const MODELSET_TAG: &str = "sdfleet-modelset";

impl Tenant {
    /// The session's name, as CloudTrail shows it: `sdfleet-<namespace>-<name>`, cut to
    /// STS's 64 characters (namespace and name are DNS labels, all allowed characters).
    pub fn session_name(&self) -> String {
        let mut name = format!("sdfleet-{}-{}", self.namespace, self.name);
        name.truncate(64);
        name
    }
}

impl S3Store {
    /// A client for the location's region, at its endpoint if it names one.
    pub async fn connect(location: &BucketLocation) -> S3Store {
        Self::connect_as(location, None).await
    }

    /// As `connect`, reading as `tenant` when one is given.
    pub async fn connect_as(location: &BucketLocation, tenant: Option<&Tenant>) -> S3Store {
        let endpoint = location.endpoint.as_deref().filter(|e| !e.is_empty());
        let shared = crate::aws::sdk_config(location.region.as_deref(), endpoint).await;
        Self::with_config(&shared, location, tenant).await
    }

    /// As `connect_as`, on `shared` (the process's AWS configuration).
    pub async fn with_config(
        shared: &aws_config::SdkConfig,
        location: &BucketLocation,
        tenant: Option<&Tenant>,
    ) -> S3Store {
        let client = match tenant {
            Some(tenant) => tenant_client(shared, location, tenant).await,
            None => client(shared, location, None),
        };
        S3Store {
            client,
            bucket: location.bucket.clone(),
            prefix: folder(&location.prefix),
        }
    }
}

fn client(
    shared: &aws_config::SdkConfig,
    location: &BucketLocation,
    credentials: Option<aws_config::sts::AssumeRoleProvider>,
) -> aws_sdk_s3::Client {
    let mut config = aws_sdk_s3::config::Builder::from(shared);
    if let Some(provider) = credentials {
        config = config.credentials_provider(provider);
    }
    let endpoint = location.endpoint.as_deref().filter(|e| !e.is_empty());
    if endpoint.is_some() || shared.endpoint_url().is_some() {
        config = config.force_path_style(true);
    }
    aws_sdk_s3::Client::from_conf(config.build())
}

/// Where a tenant's client reads: its role and tags, the region and the endpoint.
type TenantKey = (Tenant, Option<String>, Option<String>);

/// One client per tenant session for the process's life. Its identity cache keeps the
/// assumed role's credentials until shortly before they expire (an hour), so a
/// ModelSet's lists and syncs assume the role about once an hour, not once per call.
static TENANT_CLIENTS: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<TenantKey, aws_sdk_s3::Client>>,
> = std::sync::LazyLock::new(Default::default);

/// More tenant sessions than a cluster has ModelSets: past it, start over (those in use
/// assume their role once more).
const MAX_TENANT_CLIENTS: usize = 4096;

async fn tenant_client(
    shared: &aws_config::SdkConfig,
    location: &BucketLocation,
    tenant: &Tenant,
) -> aws_sdk_s3::Client {
    let key = (
        tenant.clone(),
        location.region.clone().filter(|r| !r.is_empty()),
        location.endpoint.clone().filter(|e| !e.is_empty()),
    );
    let cached = |key: &TenantKey| {
        TENANT_CLIENTS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    };
    if let Some(client) = cached(&key) {
        return client;
    }
    let provider = aws_config::sts::AssumeRoleProvider::builder(&tenant.role_arn)
        .session_name(tenant.session_name())
        .tags([
            (NAMESPACE_TAG, tenant.namespace.as_str()),
            (MODELSET_TAG, tenant.name.as_str()),
        ])
        .configure(shared)
        .build()
        .await;
    let built = client(shared, location, Some(provider));
    let mut clients = TENANT_CLIENTS.lock().unwrap_or_else(|p| p.into_inner());
    if clients.len() >= MAX_TENANT_CLIENTS {
        clients.clear();
    }
    // Two callers that raced here: the first one's client stays, so both share it.
    clients.entry(key).or_insert(built).clone()
}

impl ObjectStore for S3Store {
    async fn list(&self) -> Result<Vec<Object>, StoreError> {
        let err = |e: String| StoreError::List {
            location: format!("s3://{}/{}", self.bucket, self.prefix),
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
        let object = format!("s3://{}/{full}", self.bucket);
        let out = req.send().await.map_err(|e| {
            let changed = e
                .raw_response()
                .is_some_and(|r| r.status().as_u16() == 412);
            StoreError::Get {
                object: object.clone(),
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
        // The client asks for checksums (checksum mode is on unless configured off) and
        // wraps the body in a validator when one applies.
        let check = if range.is_none()
            && sdk_verifies(&[
                out.checksum_crc64_nvme(),
                out.checksum_crc32_c(),
                out.checksum_crc32(),
                out.checksum_sha1(),
                out.checksum_sha256(),
            ]) {
            BodyCheck::Checksum
        } else if encrypted {
            BodyCheck::SizeOnly
        } else {
            BodyCheck::EtagMd5
        };
        let stream = futures::stream::try_unfold(out.body, |mut body| async move {
            match body.try_next().await {
                Ok(Some(chunk)) => Ok(Some((chunk, body))),
                Ok(None) => Ok(None),
                // "streaming error" alone hides why: a checksum mismatch is in its causes.
                Err(e) => Err(with_causes(&e)),
            }
        })
        .map_err(move |message| StoreError::Get {
            object: object.clone(),
            message,
        });
        Ok(Body {
            chunks: stream.boxed(),
            check,
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

    #[test]
    fn only_a_full_object_checksum_first_in_the_sdks_order_is_verified() {
        use super::sdk_verifies;
        assert!(sdk_verifies(&[Some("AAAAAAAAAAA="), None]));
        assert!(sdk_verifies(&[None, None, Some("mB/XwA==")]));
        // A multipart upload's composite checksum: the SDK checks nothing, even with a
        // full-object one later in its order.
        assert!(!sdk_verifies(&[None, Some("mB/XwA==-3"), Some("AAAA")]));
        assert!(!sdk_verifies(&[None, None, None]));
    }
}
