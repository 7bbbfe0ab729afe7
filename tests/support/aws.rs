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
