//! S3 event notifications as delivered to SQS.

use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Created,
    Removed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectEvent {
    pub change: Change,
    pub bucket: String,
    /// The decoded key (S3 URL-encodes keys in events, with `+` for spaces).
    pub key: String,
}

/// The object events of one SQS message body. `s3:TestEvent` (sent when a notification
/// is configured) and anything that is not an S3 event give none.
pub fn parse(body: &str) -> Vec<ObjectEvent> {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return Vec::new();
    };
    // S3 → SNS → SQS wraps the event in the SNS envelope's Message.
    if let Some(inner) = v["Message"].as_str() {
        return parse(inner);
    }
    v["Records"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let name = r["eventName"].as_str()?;
            let change = if name.starts_with("ObjectCreated") {
                Change::Created
            } else if name.starts_with("ObjectRemoved") {
                Change::Removed
            } else {
                return None;
            };
            let raw = r["s3"]["object"]["key"].as_str()?;
            let key = percent_encoding::percent_decode_str(&raw.replace('+', " "))
                .decode_utf8()
                .ok()?
                .into_owned();
            Some(ObjectEvent {
                change,
                bucket: r["s3"]["bucket"]["name"].as_str()?.to_string(),
                key,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_event_is_ignored_and_keys_are_decoded() {
        assert!(parse(r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Bucket":"b"}"#).is_empty());
        assert!(parse("not json").is_empty());
        let body = r#"{"Records":[
            {"eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"b"},"object":{"key":"loras/my+lora%2Bv2%C3%A9.safetensors","size":3}}},
            {"eventName":"ObjectRemoved:Delete","s3":{"bucket":{"name":"b"},"object":{"key":"vae/x"}}},
            {"eventName":"ObjectRestore:Completed","s3":{"bucket":{"name":"b"},"object":{"key":"y"}}}]}"#;
        let events = parse(body);
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[0],
            ObjectEvent {
                change: Change::Created,
                bucket: "b".into(),
                key: "loras/my lora+v2é.safetensors".into()
            }
        );
        assert_eq!(events[1].change, Change::Removed);
        let sns = serde_json::json!({"Type": "Notification", "Message": body}).to_string();
        assert_eq!(parse(&sns).len(), 2);
    }
}
