//! Models by URL: a list of files (path, URL, SHA-256, size), read over HTTP(S), in
//! ranges for large files. The list is the listing; a file's "ETag" is its SHA-256, so
//! the sync engine hashes every file before it goes into place, and a resumed download
//! is keyed on it like an S3 object on its ETag.
//!
//! The FleetClass decides which URLs a ModelSet may name (`models.allowedURLs`). Whatever
//! it says, a link-local address (the instance metadata service, 169.254.169.254) is
//! never read: a URL naming one, or a host resolving to one, is refused, and a redirect
//! is followed only to a URL that names no such address (at most 5, as a model hub's
//! redirect to its CDN needs).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use reqwest::StatusCode;

use super::{Body, BodyCheck, Object, ObjectStore, StoreError, with_causes};
use crate::crd::modelset::UrlFile;

const MAX_REDIRECTS: usize = 5;

/// A list of files by URL.
pub struct UrlStore {
    client: reqwest::Client,
    files: BTreeMap<String, UrlFile>,
}

/// Whether `ip` is link-local (IPv4 169.254.0.0/16, IPv6 fe80::/10), where cloud
/// metadata services answer.
fn link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_link_local())
        }
    }
}

/// The address a URL names literally, if it names one.
fn literal_ip(url: &reqwest::Url) -> Option<IpAddr> {
    match url.host()? {
        url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
        url::Host::Domain(_) => None,
    }
}

impl UrlStore {
    /// A store of `files`; two files with one path are refused.
    pub fn new(files: &[UrlFile]) -> Result<UrlStore, StoreError> {
        let refuse = |message: String| StoreError::List {
            location: "source.urls".into(),
            message,
        };
        let mut by_path = BTreeMap::new();
        for file in files {
            if by_path.insert(file.path.clone(), file.clone()).is_some() {
                return Err(refuse(format!("{} is listed twice", file.path)));
            }
        }
        let policy = reqwest::redirect::Policy::custom(|attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
            } else if literal_ip(attempt.url()).is_some_and(link_local) {
                attempt.error("a redirect to a link-local address")
            } else {
                attempt.follow()
            }
        });
        let client = reqwest::Client::builder()
            .redirect(policy)
            .connect_timeout(Duration::from_secs(10))
            // A stalled transfer fails (and resumes next pass) instead of hanging a sync.
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| refuse(with_causes(&e)))?;
        Ok(UrlStore {
            client,
            files: by_path,
        })
    }

    /// Refuses a URL that names, or whose host resolves to, a link-local address.
    async fn guard(&self, url: &reqwest::Url) -> Result<(), String> {
        if let Some(ip) = literal_ip(url) {
            return match link_local(ip) {
                true => Err(format!("{ip} is link-local (instance metadata); not read")),
                false => Ok(()),
            };
        }
        let host = url.host_str().unwrap_or_default();
        let port = url.port_or_known_default().unwrap_or(443);
        let addresses = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("resolving {host}: {e}"))?;
        for address in addresses {
            if link_local(address.ip()) {
                return Err(format!(
                    "{host} resolves to {}, a link-local address (instance metadata); not read",
                    address.ip()
                ));
            }
        }
        Ok(())
    }
}

impl ObjectStore for UrlStore {
    async fn list(&self) -> Result<Vec<Object>, StoreError> {
        Ok(self
            .files
            .values()
            .map(|f| Object {
                key: f.path.clone(),
                size: f.size,
                etag: f.sha256.clone(),
                last_modified: None,
            })
            .collect())
    }

    async fn get(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
        _etag: &str,
    ) -> Result<Body, StoreError> {
        let Some(file) = self.files.get(key) else {
            return Err(StoreError::Get {
                object: key.to_string(),
                message: "not in source.urls".into(),
            });
        };
        let object = file.url.clone();
        let fail = |message: String| StoreError::Get {
            object: object.clone(),
            message,
        };
        let url = reqwest::Url::parse(&file.url).map_err(|e| fail(e.to_string()))?;
        self.guard(&url).await.map_err(&fail)?;
        let mut request = self.client.get(url);
        if let Some((start, end)) = range {
            request = request.header(reqwest::header::RANGE, format!("bytes={start}-{end}"));
        }
        let response = request.send().await.map_err(|e| fail(with_causes(&e)))?;
        match (range, response.status()) {
            (None, StatusCode::OK) | (Some(_), StatusCode::PARTIAL_CONTENT) => {}
            (Some(_), StatusCode::OK) => {
                return Err(fail(
                    "the server ignored the Range header (it must answer 206 for a large file)"
                        .into(),
                ));
            }
            (_, status) => return Err(fail(format!("HTTP {status}"))),
        }
        let chunks = response
            .bytes_stream()
            .map_err(move |e| StoreError::Get {
                object: object.clone(),
                message: with_causes(&e),
            })
            .boxed();
        // The SHA-256 of the whole file is checked by the sync engine (`etag_is_sha256`).
        Ok(Body {
            chunks,
            check: BodyCheck::SizeOnly,
        })
    }

    fn etag_is_sha256(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_addresses_are_the_metadata_ranges() {
        for ip in ["169.254.169.254", "fe80::1", "::ffff:169.254.169.254"] {
            assert!(link_local(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["127.0.0.1", "10.0.0.1", "::1", "2600:1f18::1"] {
            assert!(!link_local(ip.parse().unwrap()), "{ip}");
        }
    }

    #[tokio::test]
    async fn the_metadata_service_is_never_read_and_a_path_is_listed_once() {
        let file = |path: &str, url: &str| UrlFile {
            path: path.into(),
            url: url.into(),
            sha256: "0".repeat(64),
            size: 1,
        };
        let store = UrlStore::new(&[file(
            "checkpoints/a",
            "http://169.254.169.254/latest/meta-data",
        )])
        .unwrap();
        let err = store.get("checkpoints/a", None, "").await.err().unwrap();
        assert!(err.to_string().contains("link-local"), "{err}");
        let twice = UrlStore::new(&[file("a", "http://x/a"), file("a", "http://x/b")]);
        assert!(twice.err().unwrap().to_string().contains("listed twice"));
    }
}
