//! What Herald puts into every push, shared by the APNs and FCM mappings.
//!
//! Both providers carry the same flat string map of Herald keys (APNs: top-level keys
//! of the payload next to `aps`, i.e. the app's `userInfo`; FCM: the `data` map), so
//! the SDK's `handle_push` reads both the same way:
//!
//! | key             | value                                              |
//! |-----------------|----------------------------------------------------|
//! | `herald_id`     | message id                                         |
//! | `herald_seq`    | inbox seq of this device, decimal string           |
//! | `herald_device` | device id                                          |
//! | `herald_data`   | full push: the message `data`, JSON-encoded        |
//! | `herald_hint`   | sync hint: `"1"` (no `herald_data`; app must sync) |

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use herald_protocol::push_keys;

use super::PushRequest;

/// APNs payload limit and FCM message payload limit, in bytes.
pub const MAX_PUSH_PAYLOAD_BYTES: usize = 4096;

/// The Herald keys of a push. `hint` leaves out the data and marks the push a sync hint.
pub fn herald_keys(req: &PushRequest, hint: bool) -> BTreeMap<String, String> {
    let mut keys = BTreeMap::new();
    keys.insert(push_keys::MESSAGE_ID.to_string(), req.message_id.clone());
    keys.insert(push_keys::SEQ.to_string(), req.seq.to_string());
    keys.insert(push_keys::DEVICE_ID.to_string(), req.device_id.clone());
    if hint {
        keys.insert(push_keys::HINT.to_string(), "1".to_string());
    } else {
        keys.insert(push_keys::DATA.to_string(), req.data.to_string());
    }
    keys
}

/// Current Unix time in seconds.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Parses a `Retry-After` header: delay in seconds or an HTTP date (RFC 9110).
/// A date in the past gives a zero delay; garbage gives `None`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Shortens provider-supplied text put into reasons, so a hostile or broken answer
/// cannot blow up delivery records.
pub(crate) fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A secret (private key, access token, password) that never shows in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }
    /// The secret itself: only for handing to the code that uses it.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_protocol::{Priority, PushContent, PushProviderKind};
    use serde_json::json;

    #[test]
    fn keys_full_and_hint() {
        let req = PushRequest {
            device_id: "d1".into(),
            seq: 42,
            message_id: "m1".into(),
            provider: PushProviderKind::Fcm,
            token: "t".into(),
            apns_environment: None,
            data: json!({"a": 1}).into(),
            notification: None,
            priority: Priority::Normal,
            collapse_key: None,
            push_content: PushContent::Full,
            expires_at: 0,
        };
        let full = herald_keys(&req, false);
        assert_eq!(full["herald_seq"], "42");
        assert_eq!(full["herald_data"], r#"{"a":1}"#);
        assert!(!full.contains_key("herald_hint"));
        let hint = herald_keys(&req, true);
        assert_eq!(hint["herald_hint"], "1");
        assert!(!hint.contains_key("herald_data"));
    }

    #[test]
    fn retry_after_forms() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:30 GMT").unwrap();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn secrets_do_not_debug() {
        let s = Secret::new("hunter2".to_string());
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(clip("abcdef", 3), "abc…");
        assert_eq!(clip("ééé", 3), "é…");
    }
}
