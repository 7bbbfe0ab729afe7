//! AWS on loopback (moto): clients, buckets, notification queues.

use super::testbed::{Testbed, unique_suffix};

/// An S3 client on moto (path-style addressing, as moto needs).
pub async fn s3_client(tb: &Testbed) -> aws_sdk_s3::Client {
    let aws = tb.aws().await;
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&aws)
            .force_path_style(true)
            .build(),
    )
}

/// A new bucket in us-west-2 named `<prefix>-<unique>`.
pub async fn create_bucket(s3: &aws_sdk_s3::Client, prefix: &str) -> String {
    let name = format!("{prefix}-{}", unique_suffix());
    s3.create_bucket()
        .bucket(&name)
        .create_bucket_configuration(
            aws_sdk_s3::types::CreateBucketConfiguration::builder()
                .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::UsWest2)
                .build(),
        )
        .send()
        .await
        .unwrap();
    name
}

/// A queue receiving the bucket's ObjectCreated/ObjectRemoved notifications; its URL.
pub async fn notify_to_new_queue(
    s3: &aws_sdk_s3::Client,
    sqs: &aws_sdk_sqs::Client,
    bucket: &str,
) -> String {
    use aws_sdk_sqs::types::QueueAttributeName;
    let queue = sqs
        .create_queue()
        .queue_name(bucket)
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(&queue)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap();
    let arn = attrs.attributes().unwrap()[&QueueAttributeName::QueueArn].clone();
    let config = aws_sdk_s3::types::QueueConfiguration::builder()
        .queue_arn(arn)
        .events(aws_sdk_s3::types::Event::from("s3:ObjectCreated:*"))
        .events(aws_sdk_s3::types::Event::from("s3:ObjectRemoved:*"))
        .build()
        .unwrap();
    s3.put_bucket_notification_configuration()
        .bucket(bucket)
        .notification_configuration(
            aws_sdk_s3::types::NotificationConfiguration::builder()
                .queue_configurations(config)
                .build(),
        )
        .send()
        .await
        .unwrap();
    queue
}

/// One request that passed through a `Recorder`, with the answer it got.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub uri: String,
    pub authorization: String,
    pub body: String,
    pub response: String,
}

/// A loopback HTTP recorder in front of moto: every request passes through unchanged,
/// and is kept with its answer, to check exactly what a client sent (an STS call's
/// parameters, which credentials signed each S3 request).
pub struct Recorder {
    pub url: String,
    pub seen: std::sync::Arc<std::sync::Mutex<Vec<Recorded>>>,
}

impl Recorder {
    pub async fn start(upstream: &str) -> Recorder {
        use axum::body::Body;
        use axum::extract::Request;
        let seen: std::sync::Arc<std::sync::Mutex<Vec<Recorded>>> = Default::default();
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let upstream = upstream.trim_end_matches('/').to_string();
        let log = seen.clone();
        let app = axum::Router::new().fallback(move |req: Request| {
            let (http, upstream, log) = (http.clone(), upstream.clone(), log.clone());
            async move {
                let (parts, body) = req.into_parts();
                let body = axum::body::to_bytes(body, 64 << 20).await.unwrap();
                let uri = parts
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_string();
                let mut headers = parts.headers.clone();
                headers.remove("host");
                let resp = http
                    .request(parts.method.clone(), format!("{upstream}{uri}"))
                    .headers(headers)
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                let status = resp.status();
                let resp_headers = resp.headers().clone();
                let answer = resp.bytes().await.unwrap();
                log.lock().unwrap().push(Recorded {
                    method: parts.method.to_string(),
                    uri,
                    authorization: parts
                        .headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string(),
                    body: String::from_utf8_lossy(&body).into_owned(),
                    response: String::from_utf8_lossy(&answer).into_owned(),
                });
                let mut out = axum::response::Response::builder().status(status);
                for (k, v) in &resp_headers {
                    if k != "transfer-encoding" && k != "connection" {
                        out = out.header(k, v);
                    }
                }
                out.body(Body::from(answer)).unwrap()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Recorder { url, seen }
    }

    pub fn seen(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().clone()
    }
}
