//! Webhooks: `job.succeeded`, `job.failed` (and `job.canceled`, `job.expired`), signed
//! with the Standard Webhooks scheme, retried with exponential backoff until a 2xx or
//! the attempt bound. Deliveries in flight are not persisted: a gateway restart drops
//! them (the job itself is never lost).
//!
//! A webhook URL comes from a client, and the gateway sits inside the cluster: without
//! a check, a job could make it POST to a fleet pod's `/interrupt`, the instance
//! metadata service or any cluster address. So deliveries go only to public addresses
//! (plus the ranges the admin allows), checked on the addresses actually connected to:
//! names in a resolver that drops refused addresses, IP literals before the request.
//! Redirects are not followed (one could point anywhere), and logs carry no URL's
//! query, fragment, userinfo or path (tokens live there).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::{Value, json};

pub struct Webhooks {
    http: reqwest::Client,
    policy: Arc<AddressPolicy>,
    signer: Option<Arc<standardwebhooks::Webhook>>,
    pub max_attempts: u32,
    pub first_delay: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("webhook secret: {0}")]
    Secret(String),
    #[error("webhook http client: {0}")]
    Client(#[source] reqwest::Error),
}

/// Why a webhook URL is refused (at submit, or before a delivery). The messages go to
/// clients: they never repeat the URL.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("webhook is not a valid URL")]
    Invalid,
    #[error("webhook must be an http or https URL")]
    Scheme,
    #[error(
        "webhook must not carry credentials (user:password@): deliveries are signed with the webhook secret"
    )]
    UserInfo,
    #[error("webhook has no host")]
    NoHost,
    #[error(
        "webhook address {0} is not allowed: loopback, private, link-local, CGNAT, multicast and reserved addresses are refused unless the FleetClass allows them (spec.gateway.webhookAllowedCIDRs)"
    )]
    Address(IpAddr),
}

/// Every address a name resolved to is refused: the resolver's error, found again in
/// a failed request's source chain.
#[derive(Debug, thiserror::Error)]
#[error("every address of {0} is refused by the webhook address policy")]
struct NameRefused(String);

/// How one delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// A 2xx answer.
    Delivered,
    /// The URL or every address it resolved to is refused: nothing was sent.
    Refused,
    /// No 2xx after every attempt.
    GaveUp,
    /// No secret (or the payload could not be signed): nothing was sent.
    NotSigned,
}

/// Where webhooks may connect: any address but the refused ranges, plus the admin's
/// allowed CIDRs (`--webhook-allow-cidr`).
#[derive(Clone, Debug, Default)]
pub struct AddressPolicy {
    allowed: Vec<IpNet>,
}

impl AddressPolicy {
    pub fn new(allowed: Vec<IpNet>) -> AddressPolicy {
        AddressPolicy { allowed }
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        let embedded = embedded_v4(ip).map(IpAddr::V4);
        let allowed = self
            .allowed
            .iter()
            .any(|net| net.contains(&ip) || embedded.is_some_and(|v4| net.contains(&v4)));
        allowed || !refused(ip)
    }
}

/// Refused by default. IPv4 includes "this network", the private, shared (CGNAT),
/// loopback, link-local (instance metadata), protocol-assignment, documentation,
/// benchmarking, multicast and reserved ranges (the broadcast address among them).
const REFUSED_V4: [Ipv4Net; 15] = [
    Ipv4Net::new_assert(Ipv4Addr::new(0, 0, 0, 0), 8),
    Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 0, 0), 8),
    Ipv4Net::new_assert(Ipv4Addr::new(100, 64, 0, 0), 10),
    Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8),
    Ipv4Net::new_assert(Ipv4Addr::new(169, 254, 0, 0), 16),
    Ipv4Net::new_assert(Ipv4Addr::new(172, 16, 0, 0), 12),
    Ipv4Net::new_assert(Ipv4Addr::new(192, 0, 0, 0), 24),
    Ipv4Net::new_assert(Ipv4Addr::new(192, 0, 2, 0), 24),
    Ipv4Net::new_assert(Ipv4Addr::new(192, 88, 99, 0), 24),
    Ipv4Net::new_assert(Ipv4Addr::new(192, 168, 0, 0), 16),
    Ipv4Net::new_assert(Ipv4Addr::new(198, 18, 0, 0), 15),
    Ipv4Net::new_assert(Ipv4Addr::new(198, 51, 100, 0), 24),
    Ipv4Net::new_assert(Ipv4Addr::new(203, 0, 113, 0), 24),
    Ipv4Net::new_assert(Ipv4Addr::new(224, 0, 0, 0), 4),
    Ipv4Net::new_assert(Ipv4Addr::new(240, 0, 0, 0), 4),
];

/// IPv6: unspecified, loopback and IPv4-compatible (`::/96`), local-use NAT64,
/// discard, IETF protocol assignments (Teredo, benchmarking), documentation, SRv6,
/// unique local (the EKS Service range, `fd00:ec2::254` metadata), link-local,
/// site-local and multicast. Mapped, NAT64 and 6to4 forms are judged by their IPv4.
const REFUSED_V6: [Ipv6Net; 12] = [
    Ipv6Net::new_assert(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 0), 96),
    Ipv6Net::new_assert(Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48),
    Ipv6Net::new_assert(Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64),
    Ipv6Net::new_assert(Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 23),
    Ipv6Net::new_assert(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32),
    Ipv6Net::new_assert(Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20),
    Ipv6Net::new_assert(Ipv6Addr::new(0x5f00, 0, 0, 0, 0, 0, 0, 0), 16),
    Ipv6Net::new_assert(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),
    Ipv6Net::new_assert(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
    Ipv6Net::new_assert(Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10),
    Ipv6Net::new_assert(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),
    // The well-known NAT64 prefix is judged by its IPv4 below; this is its
    // neighbour reserved for local use.
    Ipv6Net::new_assert(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 48),
];

/// The IPv4 address an IPv6 address reaches: mapped (`::ffff:a.b.c.d`), NAT64
/// (`64:ff9b::a.b.c.d`) or 6to4 (`2002:aabb:ccdd::`).
fn embedded_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else { return None };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    let [a, b, c, d] = v6.octets()[12..] else {
        return None;
    };
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(Ipv4Addr::new(a, b, c, d));
    }
    if s[0] == 0x2002 {
        let [a, b] = s[1].to_be_bytes();
        let [c, d] = s[2].to_be_bytes();
        return Some(Ipv4Addr::new(a, b, c, d));
    }
    None
}

fn refused(ip: IpAddr) -> bool {
    if let Some(v4) = embedded_v4(ip) {
        return refused(IpAddr::V4(v4));
    }
    match ip {
        IpAddr::V4(v4) => REFUSED_V4.iter().any(|n| n.contains(&v4)),
        IpAddr::V6(v6) => REFUSED_V6.iter().any(|n| n.contains(&v6)),
    }
}

/// `scheme://host:port` of a webhook URL, for logs: its userinfo, query and fragment
/// hold tokens, and so do the paths of many webhook services.
pub fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => match (u.host_str(), u.port_or_known_default()) {
            (Some(host), Some(port)) => format!("{}://{host}:{port}", u.scheme()),
            (Some(host), None) => format!("{}://{host}", u.scheme()),
            _ => format!("{}://", u.scheme()),
        },
        Err(_) => "<invalid URL>".into(),
    }
}

/// A request error's chain for logs, without the URL reqwest puts in its message.
fn error_chain(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

fn refused_by_resolver(e: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        if inner.is::<NameRefused>() {
            return true;
        }
        source = inner.source();
    }
    false
}

/// Resolves as the system does, then drops refused addresses: the check is on the
/// addresses connected to, so a name that later points inside (DNS rebinding) is
/// caught too.
struct PolicyResolver {
    policy: Arc<AddressPolicy>,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| policy.permits(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(Box::new(NameRefused(host)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl Webhooks {
    /// `secret` is a Standard Webhooks secret (`whsec_<base64>`); none: jobs that ask
    /// for a webhook are refused at submit. `policy`: where deliveries may connect.
    pub fn new(
        policy: AddressPolicy,
        secret: Option<&str>,
        max_attempts: u32,
        first_delay: Duration,
    ) -> Result<Webhooks, SetupError> {
        let signer = secret
            .map(|s| {
                standardwebhooks::Webhook::new(s.trim())
                    .map(Arc::new)
                    .map_err(|e| SetupError::Secret(e.to_string()))
            })
            .transpose()?;
        let policy = Arc::new(policy);
        // Its own client: no redirects (a 3xx could point anywhere), no proxy (one
        // would resolve the name itself, past the resolver's check).
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(PolicyResolver {
                policy: policy.clone(),
            })
            .build()
            .map_err(SetupError::Client)?;
        Ok(Webhooks {
            http,
            policy,
            signer,
            max_attempts,
            first_delay,
        })
    }

    pub fn enabled(&self) -> bool {
        self.signer.is_some()
    }

    /// Whether a webhook URL may be used: http(s), no userinfo, and a host that is not
    /// a refused IP literal. Names are checked when connecting (DNS can change).
    pub fn check_url(&self, url: &str) -> Result<reqwest::Url, UrlError> {
        let parsed = reqwest::Url::parse(url).map_err(|_| UrlError::Invalid)?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(UrlError::Scheme);
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(UrlError::UserInfo);
        }
        let host = parsed.host_str().ok_or(UrlError::NoHost)?;
        // The connector skips the resolver for IP literals, so they are checked here.
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>()
            && !self.policy.permits(ip)
        {
            return Err(UrlError::Address(ip));
        }
        Ok(parsed)
    }

    /// Delivers one event in the background.
    pub fn send(self: &Arc<Self>, url: String, event: &str, job_id: &str, job: Value) {
        if !self.enabled() {
            return;
        }
        let this = self.clone();
        let msg_id = format!("{job_id}.{event}");
        let payload =
            json!({"type": event, "timestamp": super::job::now_millis(), "data": job}).to_string();
        tokio::spawn(async move { this.deliver(&url, &msg_id, &payload).await });
    }

    /// One event, with retries: a 2xx ends it, a refused URL or address stops it.
    pub async fn deliver(&self, url: &str, msg_id: &str, payload: &str) -> Delivery {
        let Some(signer) = &self.signer else {
            return Delivery::NotSigned;
        };
        let target = redact(url);
        // Jobs stored before a policy change, too, are checked before every delivery.
        let url = match self.check_url(url) {
            Ok(url) => url,
            Err(e) => {
                tracing::warn!(%msg_id, %target, reason = %e, "webhook refused");
                return Delivery::Refused;
            }
        };
        let mut delay = self.first_delay;
        for attempt in 1..=self.max_attempts {
            if attempt > 1 {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(300));
            }
            let ts = (super::job::now_millis() / 1000) as i64;
            let signature = match signer.sign(msg_id, ts, payload.as_bytes()) {
                Ok(signature) => signature,
                Err(e) => {
                    tracing::error!(%msg_id, error = %e, "cannot sign webhook");
                    return Delivery::NotSigned;
                }
            };
            let result = self
                .http
                .post(url.clone())
                .header("content-type", "application/json")
                .header("webhook-id", msg_id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", signature)
                .body(payload.to_string())
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .map(|r| r.status());
            match result {
                Ok(status) if status.is_success() => return Delivery::Delivered,
                Ok(status) if status.is_redirection() => {
                    tracing::warn!(%msg_id, %target, attempt, %status, "webhook answered a redirect, which is not followed");
                }
                Ok(status) => tracing::warn!(%msg_id, %target, attempt, %status, "webhook refused"),
                Err(e) if refused_by_resolver(&e) => {
                    tracing::warn!(%msg_id, %target, error = %error_chain(e), "webhook refused");
                    return Delivery::Refused;
                }
                Err(e) => {
                    tracing::warn!(%msg_id, %target, attempt, error = %error_chain(e), "webhook failed")
                }
            }
        }
        tracing::error!(%msg_id, %target, "webhook given up after {} attempts", self.max_attempts);
        Delivery::GaveUp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn webhooks(allowed: &[&str]) -> Webhooks {
        let allowed = allowed.iter().map(|c| c.parse().unwrap()).collect();
        Webhooks::new(
            AddressPolicy::new(allowed),
            Some(SECRET),
            2,
            Duration::from_millis(20),
        )
        .unwrap()
    }

    /// A webhook receiver on 127.0.0.1 that records the path of every request:
    /// `/redirect` answers a 302 to `/target`, every other path 200.
    async fn receiver() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
        use axum::http::{StatusCode, Uri, header};
        use axum::response::IntoResponse;
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let record = seen.clone();
        let app = axum::Router::new().fallback(move |uri: Uri| {
            record.lock().unwrap().push(uri.path().to_string());
            async move {
                match uri.path() {
                    "/redirect" => {
                        (StatusCode::FOUND, [(header::LOCATION, "/target")]).into_response()
                    }
                    _ => StatusCode::OK.into_response(),
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (addr, seen)
    }

    async fn deliver(hooks: &Webhooks, url: &str) -> Delivery {
        let payload = json!({"type": "job.succeeded", "data": {}}).to_string();
        tokio::time::timeout(
            Duration::from_secs(20),
            hooks.deliver(url, "job-1.job.succeeded", &payload),
        )
        .await
        .expect("the delivery ends within its attempts")
    }

    #[tokio::test]
    async fn loopback_is_refused_by_default_and_delivered_when_allowed() {
        let (addr, seen) = receiver().await;
        let url = format!("http://{addr}/hook");
        assert_eq!(deliver(&webhooks(&[]), &url).await, Delivery::Refused);
        assert!(seen.lock().unwrap().is_empty(), "the server saw a request");
        assert_eq!(
            deliver(&webhooks(&["127.0.0.0/8"]), &url).await,
            Delivery::Delivered
        );
        assert_eq!(*seen.lock().unwrap(), ["/hook"]);
    }

    #[tokio::test]
    async fn a_redirect_is_a_failed_attempt_and_is_not_followed() {
        let (addr, seen) = receiver().await;
        let url = format!("http://{addr}/redirect");
        assert_eq!(
            deliver(&webhooks(&["127.0.0.0/8"]), &url).await,
            Delivery::GaveUp
        );
        assert_eq!(*seen.lock().unwrap(), ["/redirect", "/redirect"]);
    }

    #[tokio::test]
    async fn a_name_resolving_to_loopback_is_refused_at_connect() {
        let (addr, seen) = receiver().await;
        let url = format!("http://localhost:{}/hook", addr.port());
        let hooks = webhooks(&[]);
        // A name passes the URL check: only its addresses tell.
        assert!(hooks.check_url(&url).is_ok());
        assert_eq!(deliver(&hooks, &url).await, Delivery::Refused);
        assert!(seen.lock().unwrap().is_empty(), "the server saw a request");
    }

    #[tokio::test]
    async fn instance_metadata_is_refused_without_a_connection() {
        let hooks = webhooks(&[]);
        for url in [
            "http://169.254.169.254/latest/meta-data/",
            "http://[::ffff:169.254.169.254]/",
            "http://[fd00:ec2::254]/",
        ] {
            assert!(
                matches!(hooks.check_url(url), Err(UrlError::Address(_))),
                "{url}"
            );
            assert_eq!(deliver(&hooks, url).await, Delivery::Refused, "{url}");
        }
    }

    #[test]
    fn urls_are_checked_for_scheme_userinfo_and_refused_literals() {
        let hooks = webhooks(&[]);
        assert_eq!(hooks.check_url("ftp://example.com/"), Err(UrlError::Scheme));
        assert_eq!(
            hooks.check_url("https://user:pw@example.com/"),
            Err(UrlError::UserInfo)
        );
        assert_eq!(hooks.check_url("not a url"), Err(UrlError::Invalid));
        // Other spellings of loopback are IP literals too.
        for url in [
            "http://2130706433/",
            "http://0x7f.1/",
            "http://[::1]:8188/interrupt",
            "http://0.0.0.0/",
        ] {
            assert!(
                matches!(hooks.check_url(url), Err(UrlError::Address(_))),
                "{url}"
            );
        }
        assert!(hooks.check_url("https://93.184.215.14/hook").is_ok());
        assert!(
            hooks
                .check_url("https://hooks.example.com/x?token=1")
                .is_ok()
        );
    }

    #[test]
    fn the_default_policy_refuses_internal_ranges_and_permits_public_ones() {
        let policy = AddressPolicy::default();
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.31.255.255",
            "192.168.0.1",
            "100.64.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "198.18.0.1",
            "192.0.2.1",
            "::",
            "::1",
            "fe80::1",
            "fd00:ec2::254",
            "ff02::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "2002:a00:1::1",
            "2001:db8::1",
        ] {
            assert!(!policy.permits(ip.parse().unwrap()), "{ip} permitted");
        }
        for ip in [
            "8.8.8.8",
            "93.184.215.14",
            "172.32.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(policy.permits(ip.parse().unwrap()), "{ip} refused");
        }
        let allowed = AddressPolicy::new(vec!["10.20.0.0/16".parse().unwrap()]);
        assert!(allowed.permits("10.20.3.4".parse().unwrap()));
        assert!(allowed.permits("::ffff:10.20.3.4".parse().unwrap()));
        assert!(!allowed.permits("10.21.0.1".parse().unwrap()));
    }

    #[test]
    fn redacted_urls_keep_no_userinfo_path_query_or_fragment() {
        assert_eq!(
            redact("https://user:pw@hooks.example.com/services/T0/B0/SECRET?token=abc#frag"),
            "https://hooks.example.com:443"
        );
        assert_eq!(
            redact("http://10.0.0.1:8188/interrupt?x=1"),
            "http://10.0.0.1:8188"
        );
        assert_eq!(redact("no url ?token=abc"), "<invalid URL>");
        for text in [
            redact("https://a:b@h.example/p?token=abc"),
            redact("http://[::1]/?k=v"),
        ] {
            for secret in ["token", "abc", "a:b", "k=v", "/p"] {
                assert!(!text.contains(secret), "{text} keeps {secret}");
            }
        }
    }
}
