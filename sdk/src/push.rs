//! Recognising Herald pushes in APNs `userInfo` / FCM `data` payloads.

use herald_protocol::{push_keys, InboxMessage, Notification};
use serde_json::{Map, Value};

use crate::Error;

/// What `HeraldClient::handle_push` did with a push.
#[derive(Debug, Clone, PartialEq)]
pub struct PushOutcome {
    /// The new messages the push brings, for the caller to show. Recorded as
    /// handled: they never reach the listener too.
    pub messages: Vec<InboxMessage>,
    /// The gateway confirmed the ack of everything handled (so it will not push
    /// these again). False when the ack failed or did not finish by the deadline, or
    /// a message came from the payload alone (out of order, not ackable yet): the
    /// next connect or push acks it.
    pub acked: bool,
}

/// What a Herald push says.
#[derive(Debug, Clone, PartialEq)]
pub struct PushInfo {
    pub message_id: String,
    pub seq: i64,
    /// The device the push was addressed to, when the payload says.
    pub device_id: Option<String>,
    /// Content-free sync hint: the body must be fetched.
    pub hint: bool,
    /// The message's data (full pushes).
    pub data: Option<Value>,
    /// The visible part (APNs `aps.alert` / FCM `title`/`body` keys), if any.
    pub notification: Option<Notification>,
}

impl PushInfo {
    /// The message as far as the push carries it (`sent_at` is unknown: empty).
    pub fn to_message(&self) -> Option<InboxMessage> {
        Some(InboxMessage {
            seq: self.seq,
            id: self.message_id.clone(),
            data: self.data.clone()?,
            notification: self.notification.clone(),
            sent_at: String::new(),
        })
    }
}

/// True when `payload_json` is a Herald push.
pub fn is_herald_push(payload_json: &str) -> bool {
    parse_push(payload_json).is_ok()
}

/// Finds the object holding the `herald_*` keys: the payload itself (FCM data map,
/// APNs userInfo with top-level keys), its `herald` object (APNs), or its `data` object
/// (a whole FCM message).
fn herald_keys(root: &Map<String, Value>) -> Option<&Map<String, Value>> {
    if root.contains_key(push_keys::MESSAGE_ID) {
        return Some(root);
    }
    for key in [push_keys::HERALD, "data"] {
        match root.get(key) {
            Some(Value::Object(o)) if o.contains_key(push_keys::MESSAGE_ID) => return Some(o),
            // FCM data values are strings: the herald object may be JSON-encoded.
            _ => {}
        }
    }
    if let Some(Value::Object(msg)) = root.get("message") {
        return herald_keys(msg);
    }
    None
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn notification_from(root: &Map<String, Value>, keys: &Map<String, Value>) -> Option<Notification> {
    let mut n = Notification::default();
    if let Some(Value::Object(aps)) = root.get("aps") {
        match aps.get("alert") {
            Some(Value::String(body)) => n.body = Some(body.clone()),
            Some(Value::Object(alert)) => {
                n.title = alert.get("title").and_then(as_string);
                n.body = alert.get("body").and_then(as_string);
            }
            _ => {}
        }
        n.badge = aps.get("badge").and_then(Value::as_u64).map(|b| b as u32);
        n.sound = aps.get("sound").and_then(as_string);
    }
    if let Some(Value::Object(notif)) = root.get("notification") {
        n.title = n.title.or_else(|| notif.get("title").and_then(as_string));
        n.body = n.body.or_else(|| notif.get("body").and_then(as_string));
    }
    n.title = n
        .title
        .or_else(|| keys.get("herald_title").and_then(as_string));
    n.body = n
        .body
        .or_else(|| keys.get("herald_body").and_then(as_string));
    (n != Notification::default()).then_some(n)
}

/// Parses a push payload given as JSON (APNs `userInfo`, FCM `RemoteMessage.data`
/// map, or a whole FCM message).
pub fn parse_push(payload_json: &str) -> Result<PushInfo, Error> {
    let root: Value = serde_json::from_str(payload_json).map_err(|_| Error::NotHeraldPush)?;
    let Value::Object(root) = root else {
        return Err(Error::NotHeraldPush);
    };
    let keys = herald_keys(&root).ok_or(Error::NotHeraldPush)?;
    let message_id = keys
        .get(push_keys::MESSAGE_ID)
        .and_then(as_string)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Error::InvalidPayload(format!("{} is empty", push_keys::MESSAGE_ID)))?;
    let seq = keys
        .get(push_keys::SEQ)
        .and_then(as_string)
        .and_then(|s| s.trim().parse::<i64>().ok())
        .filter(|s| *s > 0)
        .ok_or_else(|| {
            Error::InvalidPayload(format!(
                "{} missing or not a positive integer",
                push_keys::SEQ
            ))
        })?;
    let device_id = keys.get(push_keys::DEVICE_ID).and_then(as_string);
    let hint_flag = keys
        .get(push_keys::HINT)
        .and_then(as_string)
        .is_some_and(|h| h == "1" || h == "true");
    let data =
        match keys.get(push_keys::DATA) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(serde_json::from_str(s).map_err(|e| {
                Error::InvalidPayload(format!("{} is not JSON: {e}", push_keys::DATA))
            })?),
            Some(other) => Some(other.clone()),
        };
    Ok(PushInfo {
        message_id,
        seq,
        device_id,
        hint: hint_flag || data.is_none(),
        data: if hint_flag { None } else { data },
        notification: notification_from(&root, keys),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fcm_data_map_full_push() {
        let p = parse_push(
            r#"{"herald_id":"m1","herald_seq":"7","herald_device":"d1","herald_data":"{\"k\":1}"}"#,
        )
        .unwrap();
        assert_eq!(p.message_id, "m1");
        assert_eq!(p.seq, 7);
        assert_eq!(p.device_id.as_deref(), Some("d1"));
        assert!(!p.hint);
        assert_eq!(p.data, Some(serde_json::json!({"k":1})));
        assert_eq!(p.to_message().unwrap().seq, 7);
    }

    #[test]
    fn apns_nested_hint() {
        let p = parse_push(
            r#"{"aps":{"alert":{"title":"T","body":"B"},"badge":2},
                "herald":{"herald_id":"m2","herald_seq":12,"herald_hint":"1"}}"#,
        )
        .unwrap();
        assert!(p.hint);
        assert_eq!(p.seq, 12);
        assert_eq!(p.data, None);
        let n = p.notification.clone().unwrap();
        assert_eq!(n.title.as_deref(), Some("T"));
        assert_eq!(n.badge, Some(2));
        assert!(p.to_message_is_none_for_hint());
    }

    impl PushInfo {
        fn to_message_is_none_for_hint(&self) -> bool {
            self.to_message().is_none()
        }
    }

    #[test]
    fn whole_fcm_message_and_rejections() {
        let p = parse_push(r#"{"message":{"data":{"herald_id":"m","herald_seq":"3"}}}"#).unwrap();
        assert_eq!(p.seq, 3);
        assert!(p.hint, "no data: must be fetched");
        assert_eq!(parse_push(r#"{"foo":1}"#), Err(Error::NotHeraldPush));
        assert_eq!(parse_push("nope"), Err(Error::NotHeraldPush));
        assert_eq!(parse_push("[1]"), Err(Error::NotHeraldPush));
        assert!(matches!(
            parse_push(r#"{"herald_id":"m","herald_seq":"x"}"#),
            Err(Error::InvalidPayload(_))
        ));
        assert!(is_herald_push(r#"{"herald_id":"m","herald_seq":1}"#));
    }
}
