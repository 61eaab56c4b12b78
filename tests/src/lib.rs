//! Helpers shared by the system tests in `tests/tests/`: a listener that records what
//! the SDK reports, bounded waits, a test-speed SDK config and a publisher.

use std::sync::Mutex;
use std::time::Duration;

use herald_gateway::testing::{TempDir, TestGateway};
use herald_protocol::{PublishRequest, PushPolicy, Target};
use herald_sdk::{Config, ConnectionState, Error, InboxMessage, Listener, TransportKind};
use serde_json::json;

/// How long any single wait in these tests may take before it fails.
pub const T: Duration = Duration::from_secs(20);

/// Records every callback the SDK makes, in order.
#[derive(Default)]
pub struct Recorder {
    pub messages: Mutex<Vec<InboxMessage>>,
    pub states: Mutex<Vec<ConnectionState>>,
    pub errors: Mutex<Vec<(Error, bool)>>,
    pub subscriptions: Mutex<Vec<(String, bool)>>,
}

impl Listener for Recorder {
    fn on_state_changed(&self, state: ConnectionState) {
        self.states.lock().unwrap().push(state);
    }
    fn on_message(&self, message: InboxMessage) {
        self.messages.lock().unwrap().push(message);
    }
    fn on_error(&self, error: Error, terminal: bool) {
        eprintln!("on_error: {error} (terminal: {terminal})");
        self.errors.lock().unwrap().push((error, terminal));
    }
    fn on_subscription_changed(&self, topic: String, subscribed: bool) {
        self.subscriptions.lock().unwrap().push((topic, subscribed));
    }
}

impl Recorder {
    pub fn seqs(&self) -> Vec<i64> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .map(|m| m.seq)
            .collect()
    }
    /// The `n` field of every message's data, in delivery order.
    pub fn ns(&self) -> Vec<i64> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .map(|m| m.data["n"].as_i64().unwrap())
            .collect()
    }
    pub fn state(&self) -> Option<ConnectionState> {
        self.states.lock().unwrap().last().cloned()
    }
    /// Whether the client was connected at some point.
    pub fn connected(&self) -> bool {
        self.states
            .lock()
            .unwrap()
            .iter()
            .any(|s| matches!(s, ConnectionState::Connected { .. }))
    }
    /// The transport the client is connected over now, if it is.
    pub fn connected_over(&self) -> Option<TransportKind> {
        match self.state() {
            Some(ConnectionState::Connected { transport }) => Some(transport),
            _ => None,
        }
    }
    pub fn error_texts(&self) -> Vec<String> {
        let errors = self.errors.lock().unwrap();
        errors.iter().map(|(e, _)| e.to_string()).collect()
    }
}

/// Polls `cond` every 20 ms until it holds; fails the test after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An SDK config with test-speed backoff and timeouts.
pub fn test_config(base_url: &str, device: &str, dir: &TempDir) -> Config {
    let mut c = Config::new(base_url, device, dir.0.clone());
    c.backoff_min = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(400);
    c.connect_timeout = Duration::from_secs(5);
    c.request_timeout = Duration::from_secs(5);
    c
}

/// Publishes `{"n": n}` for each `n` of `range` to `device` (no push); returns the ids.
pub async fn publish_n(
    tg: &TestGateway,
    device: &str,
    range: std::ops::RangeInclusive<i64>,
) -> Vec<String> {
    let mut ids = Vec::new();
    for n in range {
        let mut req = PublishRequest::new(Target::Device(device.into()), json!({ "n": n }));
        req.push = PushPolicy::Never;
        ids.push(tg.publish(&req).await.message_id);
    }
    ids
}
