//! The globs of a class's lists: buckets and folders (with `{namespace}`), URLs
//! compared part by part, hosts label by label.

use globset::{GlobBuilder, GlobMatcher};

/// `*` within one `/`-separated segment, as in a shell.
pub(super) fn glob(pattern: &str) -> Option<GlobMatcher> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .ok()
        .map(|g| g.compile_matcher())
}

/// Whether `value` matches one of the patterns (annotation keys). `*` alone allows
/// anything; otherwise `*` stays within one `/`-separated segment.
pub(super) fn matches_any(patterns: &[String], value: &str) -> bool {
    patterns
        .iter()
        .any(|p| p == "*" || p == value || glob(p).is_some_and(|g| g.is_match(value)))
}

/// One segment (a bucket name, a folder, a host label, a path segment) against its
/// pattern. `{namespace}` was replaced before.
pub(super) fn segment_matches(pattern: &str, value: &str) -> bool {
    pattern == value
        || (!value.is_empty()
            && !pattern.contains('/')
            && glob(pattern).is_some_and(|g| g.is_match(value)))
}

pub(super) fn for_namespace(pattern: &str, namespace: &str) -> String {
    pattern.replace("{namespace}", namespace)
}

/// Whether `bucket` with key prefix `prefix` lies within one of the class's locations:
/// `bucket-glob` (the whole bucket) or `bucket-glob/folder/.../` (that folder and
/// below). The prefix is compared as S3 compares it, as a string: `team-a` is not
/// within `team-a/` (it also lists `team-a-other/`).
pub fn location_allowed(patterns: &[String], namespace: &str, bucket: &str, prefix: &str) -> bool {
    let parts: Vec<&str> = prefix.split('/').collect();
    if parts.iter().any(|p| *p == ".." || *p == ".") {
        return false;
    }
    patterns.iter().any(|pattern| {
        if pattern == "*" {
            return true;
        }
        let pattern = for_namespace(pattern, namespace);
        let mut segments = pattern.trim_end_matches('/').split('/');
        let Some(bucket_pattern) = segments.next() else {
            return false;
        };
        let folders: Vec<&str> = segments.collect();
        segment_matches(bucket_pattern, bucket)
            // each folder of the pattern is a whole segment of the prefix, '/' after it
            && parts.len() > folders.len()
            && folders
                .iter()
                .zip(&parts)
                .all(|(f, p)| segment_matches(f, p))
    })
}

/// Why a URL is refused before any pattern is looked at: only plain `scheme://host[:port]/path`.
pub(super) fn plain_url(value: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(value).map_err(|e| format!("not a URL ({e})"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("a URL with a user or password is refused".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("a URL with a query or fragment is refused".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("a URL needs a host".into());
    }
    Ok(url)
}

/// Whether the URL `value` matches one of the patterns, compared part by part: scheme,
/// host (label by label, `*` within one label), port, path (segment by segment). The
/// URL is parsed first, so `..` segments, a user, a query or a fragment cannot make a
/// foreign host match. `Err`: why the URL itself is refused.
pub fn url_allowed(patterns: &[String], value: &str) -> Result<bool, String> {
    let url = plain_url(value)?;
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    let port = url.port_or_known_default();
    let path: Vec<&str> = url.path().trim_start_matches('/').split('/').collect();
    Ok(patterns.iter().any(|pattern| {
        if pattern == "*" {
            return true;
        }
        let Some((scheme, rest)) = pattern.split_once("://") else {
            return false;
        };
        let (authority, pattern_path) = rest.split_once('/').unwrap_or((rest, ""));
        let (pattern_host, pattern_port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (h, Some(p)),
            _ => (authority, None),
        };
        let port_matches = match pattern_port {
            Some("*") => true,
            Some(p) => p.parse::<u16>().ok() == port,
            None => {
                url::Url::parse(&format!("{scheme}://x"))
                    .ok()
                    .and_then(|u| u.port_or_known_default())
                    == port
            }
        };
        let pattern_path: Vec<&str> = pattern_path.split('/').collect();
        scheme.eq_ignore_ascii_case(url.scheme())
            && port_matches
            && labels_match(&pattern_host.to_ascii_lowercase(), &host)
            && pattern_path.len() == path.len()
            && pattern_path
                .iter()
                .zip(&path)
                .all(|(p, v)| segment_matches(p, v))
    }))
}

/// A host name against a pattern, label by label (`*.example.com` is one label deep).
pub(super) fn labels_match(pattern: &str, host: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let host: Vec<&str> = host.split('.').collect();
    pattern.len() == host.len()
        && pattern
            .iter()
            .zip(&host)
            .all(|(p, h)| segment_matches(p, h))
}

/// Whether an Ingress host is one of the class's (empty list: any).
pub fn host_allowed(patterns: &[String], namespace: &str, host: &str) -> bool {
    patterns.is_empty()
        || patterns.iter().any(|p| {
            labels_match(
                &for_namespace(p, namespace).to_ascii_lowercase(),
                &host.to_ascii_lowercase(),
            )
        })
}
