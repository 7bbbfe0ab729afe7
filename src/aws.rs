//! The one AWS SDK configuration loader: S3 (the sync engine, the catalog), SQS and SSM
//! all start from it, so region and endpoint rules are the same everywhere.

/// The shared SDK configuration for `region` (else the environment's), at `endpoint`
/// (else AWS, or `AWS_ENDPOINT_URL*` from the environment). Empty strings mean unset.
pub async fn sdk_config(region: Option<&str>, endpoint: Option<&str>) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(r) = region.filter(|r| !r.is_empty()) {
        loader = loader.region(aws_config::Region::new(r.to_string()));
    }
    if let Some(e) = endpoint.filter(|e| !e.is_empty()) {
        loader = loader.endpoint_url(e);
    }
    loader.load().await
}
