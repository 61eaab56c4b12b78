//! Request ids: one per HTTP request (the client's `x-request-id` when it is short and
//! plain, else a new one), returned in the `x-request-id` response header, recorded
//! in the access log, and remembered per published message so the log lines that
//! deliver and push that message carry the publish's `request_id`.
//!
//! The message → request id map lives in memory only (bounded, oldest forgotten
//! first): after a restart, or on another node of a cluster, delivery and push log
//! lines of older messages have no `request_id`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

/// The header read and written.
pub const HEADER: &str = "x-request-id";

/// Longest incoming id that is kept; longer ones are replaced by a generated id.
pub const MAX_LEN: usize = 64;

/// Messages whose request id is remembered (the oldest are forgotten first).
const REMEMBERED: usize = 65_536;

/// A request's id, in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub Arc<str>);

impl RequestId {
    /// The client's id if it is 1 to [`MAX_LEN`] characters of `A-Z a-z 0-9 - _ . : /`
    /// (no spaces, quotes or control characters, so it cannot forge log fields);
    /// otherwise a new one.
    pub fn from_header(value: Option<&[u8]>) -> RequestId {
        match value {
            Some(v) if well_formed(v) => {
                RequestId(Arc::from(std::str::from_utf8(v).expect("ascii")))
            }
            _ => RequestId::generate(),
        }
    }

    pub fn generate() -> RequestId {
        RequestId(Arc::from(uuid::Uuid::new_v4().simple().to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

pub fn well_formed(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= MAX_LEN
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/'))
}

#[derive(Default)]
struct Remembered {
    by_message: HashMap<Box<str>, Arc<str>>,
    order: VecDeque<Box<str>>,
}

fn remembered() -> &'static Mutex<Remembered> {
    static MAP: OnceLock<Mutex<Remembered>> = OnceLock::new();
    MAP.get_or_init(Default::default)
}

/// Remembers that `message_id` was published by the request `id`.
pub fn remember(message_id: &str, id: &RequestId) {
    let mut r = remembered().lock().unwrap();
    if r.by_message
        .insert(message_id.into(), id.0.clone())
        .is_none()
    {
        r.order.push_back(message_id.into());
    }
    while r.order.len() > REMEMBERED {
        if let Some(old) = r.order.pop_front() {
            r.by_message.remove(&old);
        }
    }
}

/// The request id that published `message_id`, if this process remembers it.
pub fn of_message(message_id: &str) -> Option<Arc<str>> {
    remembered()
        .lock()
        .unwrap()
        .by_message
        .get(message_id)
        .cloned()
}

/// For a log field: the id, or empty when unknown.
pub fn field(message_id: &str) -> tracing::field::DisplayValue<String> {
    tracing::field::display(
        of_message(message_id)
            .map(|s| s.to_string())
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incoming_ids_are_kept_only_when_short_and_plain() {
        let kept = |v: &str| RequestId::from_header(Some(v.as_bytes())).as_str() == v;
        assert!(kept("abc-123"));
        assert!(kept("7d0c6b2e-1b5c-4d0e-9a63-0f1e2d3c4b5a"));
        assert!(kept(&"a".repeat(MAX_LEN)));
        assert!(!kept(&"a".repeat(MAX_LEN + 1)));
        assert!(!kept(""));
        assert!(!kept("a b"));
        assert!(!kept("a\"b"));
        assert!(!kept("é"));
        let generated = RequestId::from_header(None);
        assert_eq!(generated.as_str().len(), 32);
        assert!(well_formed(generated.as_str().as_bytes()));
    }

    #[test]
    fn remembered_ids_are_bounded() {
        let id = RequestId::generate();
        remember("msg_first_of_many", &id);
        assert_eq!(of_message("msg_first_of_many"), Some(id.0.clone()));
        for i in 0..REMEMBERED {
            remember(&format!("msg_filler_{i}"), &id);
        }
        assert_eq!(of_message("msg_first_of_many"), None);
        assert!(remembered().lock().unwrap().by_message.len() <= REMEMBERED);
    }
}
