//! Routing between gateway nodes (cluster mode, `bus = "nats"`).
//!
//! Every live session subscribes to its device's subject, `{prefix}.dev.{device}`.
//! A node that committed an entry for a device with no session on it sends the entry
//! there as a NATS request: a reply means a session on some node took it; "no
//! responders" means no node has the device, so the push path takes over. Presence
//! questions, kicks (replaced, deleted) and HTTP acks travel on the same subject.
//!
//! NATS is only a doorbell: the entry is already committed to the shared store, so
//! a lost request costs at most a late delivery, never a message — the session fills
//! any gap from the store, an entry nobody took comes due and is offered again by
//! whichever node takes it (`DeliveryRouter::settle_due`), and after a NATS outage
//! every session re-reads its inbox (`SessionEvent::Resync`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{Client, Event, RequestErrorKind};
use futures_util::stream::{self, StreamExt};
use herald_protocol::Target;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::clock::now_ms;
use crate::config::{Config, NatsConfig};
use crate::metrics::Metrics;
use crate::registry::{KickReason, Offer, SessionEvent, SessionHandle, SessionRegistry};
use crate::store::{InboxEntry, MessagePayload, StoredMessage};

/// Requests in flight at once when a publish fans out to devices on other nodes.
const ROUTE_CONCURRENCY: usize = 256;

/// How a node reaches the sessions of other nodes. `Local` is the single-node bus:
/// every session is in this node's registry, so there is nobody else to ask.
#[derive(Clone)]
pub enum ClusterBus {
    Local,
    Nats(Arc<NatsBus>),
}

pub struct NatsBus {
    client: Client,
    prefix: String,
    /// Tells kicks this node sent from kicks other nodes sent.
    node_id: String,
    request_timeout: Duration,
    metrics: Metrics,
    /// Notified when the connection comes back after a loss.
    reconnected: Arc<Notify>,
}

/// What one node tells the session of a device on another node.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum BusFrame {
    /// A committed inbox entry (request; the reply is `REPLY_LIVE`, `_FULL`, `_GONE`,
    /// `_OVERDUE`). `due`: its push is due, so a session that already had it declines
    /// (`SessionHandle::offer_due`).
    Deliver {
        entry: Box<WireEntry>,
        committed_at_ms: i64,
        #[serde(default)]
        due: bool,
    },
    /// Is the device connected here? (request; any reply means yes)
    Presence,
    /// The device acked up to `seq` over HTTP.
    Acked { seq: i64 },
    /// Close the session: a newer one replaced it, or the device was deleted.
    Kick {
        reason: WireKick,
        node: String,
        session_id: u64,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WireKick {
    Replaced,
    Deleted,
    Revoked,
}

const REPLY_LIVE: &[u8] = b"live";
const REPLY_FULL: &[u8] = b"full";
const REPLY_GONE: &[u8] = b"gone";
const REPLY_OVERDUE: &[u8] = b"overdue";

/// What offering an entry to the sessions of other nodes found out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// A session took it.
    Live,
    /// No node has a session that takes it ("no responders", or it declined).
    Offline,
    /// No answer in time (NATS down or slow, a partition): a session may exist, so
    /// the caller leaves the push to its due time rather than deciding now.
    Unknown,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireEntry {
    device_id: String,
    seq: i64,
    push_pending: bool,
    push_attempts: u32,
    id: String,
    target: Target,
    #[serde(with = "payload_text")]
    payload: MessagePayload,
    created_at: i64,
    expires_at: i64,
}

/// The payload crosses the bus as JSON text inside the frame: serde buffers internally
/// tagged enums like `BusFrame` into its own value type, which cannot hold `data`'s
/// verbatim JSON (it would fail to deserialize, or round big numbers).
mod payload_text {
    use serde::{de::Error as _, ser::Error as _, Deserialize, Deserializer, Serializer};

    use crate::store::MessagePayload;

    pub fn serialize<S: Serializer>(p: &MessagePayload, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&serde_json::to_string(p).map_err(S::Error::custom)?)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<MessagePayload, D::Error> {
        let text = String::deserialize(d)?;
        serde_json::from_str(&text).map_err(D::Error::custom)
    }
}

impl From<&InboxEntry> for WireEntry {
    fn from(e: &InboxEntry) -> WireEntry {
        WireEntry {
            device_id: e.device_id.clone(),
            seq: e.seq,
            push_pending: e.push_pending,
            push_attempts: e.push_attempts,
            id: e.message.id.clone(),
            target: e.message.target.clone(),
            payload: e.message.payload.clone(),
            created_at: e.message.created_at,
            expires_at: e.message.expires_at,
        }
    }
}

impl From<WireEntry> for InboxEntry {
    fn from(w: WireEntry) -> InboxEntry {
        InboxEntry {
            device_id: w.device_id,
            seq: w.seq,
            push_pending: w.push_pending,
            push_attempts: w.push_attempts,
            message: Arc::new(StoredMessage::new(
                w.id,
                w.target,
                w.payload,
                w.created_at,
                w.expires_at,
            )),
        }
    }
}

/// Keeps a session reachable from other nodes; dropping it unsubscribes.
pub struct ClusterPresence {
    task: Option<tokio::task::AbortHandle>,
}

impl Drop for ClusterPresence {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// `ConnectOptions` with the `[nats]` TLS and credentials settings.
async fn nats_options(nats: &NatsConfig) -> anyhow::Result<async_nats::ConnectOptions> {
    let readable = |setting: &str, path: &std::path::Path| -> anyhow::Result<()> {
        std::fs::metadata(path).map(|_| ()).map_err(|e| {
            anyhow::anyhow!(
                "nats.{setting} {}: {e} (HERALD_NATS__{})",
                path.display(),
                setting.to_ascii_uppercase()
            )
        })
    };
    let mut options = async_nats::ConnectOptions::new();
    if nats.tls_required {
        options = options.require_tls(true);
    }
    if let Some(ca) = &nats.tls_ca_file {
        readable("tls_ca_file", ca)?;
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    match (&nats.tls_cert_file, &nats.tls_key_file) {
        (Some(cert), Some(key)) => {
            readable("tls_cert_file", cert)?;
            readable("tls_key_file", key)?;
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        (None, None) => {}
        _ => anyhow::bail!(
            "nats.tls_cert_file and nats.tls_key_file go together (mutual TLS): set both or neither"
        ),
    }
    let methods = [
        nats.creds_file.is_some(),
        nats.user.is_some() || nats.password.is_some(),
        nats.token.is_some(),
    ];
    if methods.iter().filter(|m| **m).count() > 1 {
        anyhow::bail!("[nats]: set one way to authenticate: creds_file, user + password, or token");
    }
    if let Some(creds) = &nats.creds_file {
        readable("creds_file", creds)?;
        options = options.credentials_file(creds).await.map_err(|e| {
            anyhow::anyhow!(
                "nats.creds_file {} is not a NATS credentials file: {e} (HERALD_NATS__CREDS_FILE)",
                creds.display()
            )
        })?;
    }
    match (&nats.user, &nats.password) {
        (Some(user), Some(password)) => {
            options = options.user_and_password(user.clone(), password.clone())
        }
        (None, None) => {}
        _ => anyhow::bail!("nats.user and nats.password go together: set both or neither"),
    }
    if let Some(token) = &nats.token {
        options = options.token(token.clone());
    }
    Ok(options)
}

/// One connection attempt, without retries: a NATS that is down is fine (the real
/// connection retries), one that refuses our TLS or credentials is not.
async fn probe_nats(nats: &NatsConfig) -> anyhow::Result<()> {
    let attempt = nats_options(nats)
        .await?
        .connection_timeout(Duration::from_secs(5))
        .connect(nats.url.as_str())
        .await;
    let err = match attempt {
        Ok(client) => {
            let _ = client.drain().await;
            return Ok(());
        }
        Err(e) => e,
    };
    use async_nats::ConnectErrorKind as K;
    let (refused, hint) = match err.kind() {
        K::Tls => (true, "TLS: check [nats] tls_ca_file, tls_cert_file, tls_key_file and the url's host name"),
        K::Authentication | K::AuthorizationViolation => {
            (true, "check [nats] creds_file, user/password or token")
        }
        _ if is_tls_error(&err) => (true, "TLS: check [nats] tls_ca_file (the CA that signed the server's certificate), tls_cert_file/tls_key_file and the url's host name"),
        _ => (false, ""),
    };
    if refused {
        anyhow::bail!(
            "NATS at {} refused this node: {err}{}; {hint}",
            nats.url,
            source_chain(&err)
        );
    }
    tracing::warn!(url = %nats.url, error = %err, "NATS is not reachable yet; retrying in the background");
    Ok(())
}

/// Whether a rustls error (a refused certificate, a failed handshake) is in the chain.
fn is_tls_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.is::<async_nats::rustls::Error>() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<async_nats::rustls::Error>())
            {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

/// `: cause: its cause` for the sources `err`'s own text does not show.
fn source_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let shown = err.to_string();
    let mut out = String::new();
    let mut cur = err.source();
    while let Some(e) = cur {
        let text = e.to_string();
        if !shown.contains(&text) && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = e.source();
    }
    out
}

/// NATS subjects are dot-separated tokens; device ids may contain dots (and `%` is
/// not a valid id character, so the escape cannot collide with a real id).
fn subject_token(device_id: &str) -> String {
    device_id.replace('.', "%2E")
}

impl ClusterBus {
    /// Connects to NATS if the config asks for it. The connection is retried in the
    /// background for as long as it takes; `/readyz` reports it meanwhile. A NATS that
    /// answers but refuses this node (TLS: unknown CA, wrong name; bad credentials) is
    /// a startup error instead: retrying would not fix the config.
    pub async fn connect(config: &Config, metrics: &Metrics) -> anyhow::Result<ClusterBus> {
        match config.bus.as_str() {
            "local" => Ok(ClusterBus::Local),
            "nats" => {
                if config.store != "postgres" {
                    anyhow::bail!(
                        "bus \"nats\" routes between nodes that share one store; set store = \"postgres\" (HERALD_STORE=postgres) and database_url"
                    );
                }
                let node_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
                // Set while the connection is down, so the reconnect triggers a resync.
                let lost = Arc::new(AtomicBool::new(false));
                let reconnected = Arc::new(Notify::new());
                let (cb_lost, cb_reconnected) = (lost.clone(), reconnected.clone());
                probe_nats(&config.nats).await?;
                let client = nats_options(&config.nats)
                    .await?
                    .name(format!("herald-{node_id}"))
                    .retry_on_initial_connect()
                    .max_reconnects(None)
                    .event_callback(move |event| {
                        let (lost, reconnected) = (cb_lost.clone(), cb_reconnected.clone());
                        async move {
                            match event {
                                Event::Disconnected => {
                                    tracing::warn!(
                                        "lost the NATS connection; node not ready until it is back"
                                    );
                                    lost.store(true, Ordering::SeqCst);
                                }
                                Event::Connected => {
                                    tracing::info!("connected to NATS");
                                    if lost.swap(false, Ordering::SeqCst) {
                                        reconnected.notify_one();
                                    }
                                }
                                other => tracing::warn!(event = %other, "NATS"),
                            }
                        }
                    })
                    .connect(config.nats.url.as_str())
                    .await
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "NATS url {:?} is not usable: {e}; check [nats] url / HERALD_NATS__URL",
                            config.nats.url
                        )
                    })?;
                tracing::info!(node = %node_id, url = %config.nats.url, "cluster mode: routing over NATS");
                Ok(ClusterBus::Nats(Arc::new(NatsBus {
                    client,
                    prefix: config.nats.subject_prefix.clone(),
                    node_id,
                    request_timeout: Duration::from_millis(config.nats.request_timeout_ms.max(1)),
                    metrics: metrics.clone(),
                    reconnected,
                })))
            }
            other => anyhow::bail!("bus {other:?} is not supported; use \"local\" or \"nats\""),
        }
    }

    pub fn is_clustered(&self) -> bool {
        matches!(self, ClusterBus::Nats(_))
    }

    /// `Err` with the reason while this node cannot reach the other nodes.
    pub fn health(&self) -> Result<(), String> {
        match self {
            ClusterBus::Local => Ok(()),
            ClusterBus::Nats(bus) => match bus.client.connection_state() {
                async_nats::connection::State::Connected => Ok(()),
                state => Err(format!("NATS {state}")),
            },
        }
    }

    /// Makes the session reachable from other nodes and closes older sessions of the
    /// same device on them. Must complete before the session replays its inbox, so
    /// that every commit after the replay's read is also routed to it.
    pub async fn attach(&self, device_id: &str, handle: SessionHandle) -> ClusterPresence {
        let ClusterBus::Nats(bus) = self else {
            return ClusterPresence { task: None };
        };
        let subject = bus.device_subject(device_id);
        bus.send(
            &subject,
            &BusFrame::Kick {
                reason: WireKick::Replaced,
                node: bus.node_id.clone(),
                session_id: handle.session_id,
            },
        )
        .await;
        let mut sub = match bus.client.subscribe(subject.clone()).await {
            Ok(sub) => sub,
            Err(e) => {
                // Still served locally; other nodes see it offline and push instead.
                tracing::warn!(device = %device_id, error = %e, "cannot subscribe on NATS");
                return ClusterPresence { task: None };
            }
        };
        // The subscription must be on the server before the replay reads the store.
        if tokio::time::timeout(bus.request_timeout, bus.client.flush())
            .await
            .map(|r| r.is_err())
            .unwrap_or(true)
        {
            tracing::warn!(device = %device_id, "NATS flush failed; the session resyncs when NATS is back");
        }
        let bus = bus.clone();
        let task = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let frame: BusFrame = match serde_json::from_slice(&msg.payload) {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::warn!(subject = %msg.subject, error = %e, "ignoring a malformed cluster frame");
                        continue;
                    }
                };
                let reply: Option<&'static [u8]> = match frame {
                    BusFrame::Deliver {
                        entry,
                        committed_at_ms,
                        due,
                    } => {
                        let waited =
                            Duration::from_millis((now_ms() - committed_at_ms).max(0) as u64);
                        let committed_at = Instant::now()
                            .checked_sub(waited)
                            .unwrap_or_else(Instant::now);
                        let entry: InboxEntry = (*entry).into();
                        let offer = if due {
                            handle.offer_due(entry, &bus.metrics)
                        } else {
                            let weight = crate::registry::entry_weight(&entry.message);
                            handle.offer(entry, committed_at, weight, &bus.metrics)
                        };
                        Some(match offer {
                            Offer::Taken => REPLY_LIVE,
                            Offer::Full => REPLY_FULL,
                            Offer::Gone => REPLY_GONE,
                            Offer::Overdue => REPLY_OVERDUE,
                        })
                    }
                    BusFrame::Presence => Some(REPLY_LIVE),
                    BusFrame::Acked { seq } => {
                        let _ = handle.events.try_send(SessionEvent::AckedElsewhere(seq));
                        None
                    }
                    BusFrame::Kick {
                        reason,
                        node,
                        session_id,
                    } => {
                        if node != bus.node_id || session_id != handle.session_id {
                            handle.kick(match reason {
                                WireKick::Replaced => KickReason::Replaced,
                                WireKick::Deleted => KickReason::Deleted,
                                WireKick::Revoked => KickReason::Revoked,
                            });
                        }
                        None
                    }
                };
                if let (Some(reply), Some(to)) = (reply, msg.reply) {
                    let _ = bus.client.publish(to, reply.into()).await;
                }
            }
        });
        ClusterPresence {
            task: Some(task.abort_handle()),
        }
    }

    /// Offers entries to sessions on other nodes; returns each entry with what came of
    /// it. `due`: the entries' pushes are due (see `BusFrame::Deliver`).
    pub async fn deliver_remote(
        &self,
        entries: Vec<InboxEntry>,
        due: bool,
    ) -> Vec<(InboxEntry, Reach)> {
        let ClusterBus::Nats(bus) = self else {
            return entries.into_iter().map(|e| (e, Reach::Offline)).collect();
        };
        let committed_at_ms = now_ms();
        stream::iter(entries)
            .map(|entry| {
                let bus = bus.clone();
                async move {
                    let frame = BusFrame::Deliver {
                        entry: Box::new(WireEntry::from(&entry)),
                        committed_at_ms,
                        due,
                    };
                    let subject = bus.device_subject(&entry.device_id);
                    let reach = match bus.request(subject, &frame).await {
                        Ok(reply) if reply == REPLY_LIVE => Reach::Live,
                        Ok(_) | Err(RequestFailed::NoResponders) => Reach::Offline,
                        Err(RequestFailed::NoAnswer) => Reach::Unknown,
                    };
                    (entry, reach)
                }
            })
            .buffer_unordered(ROUTE_CONCURRENCY)
            .collect()
            .await
    }

    /// Whether the device has a live session on another node.
    pub async fn is_live_remote(&self, device_id: &str) -> bool {
        match self {
            ClusterBus::Local => false,
            ClusterBus::Nats(bus) => bus
                .request(bus.device_subject(device_id), &BusFrame::Presence)
                .await
                .is_ok(),
        }
    }

    /// Closes the device's session wherever it is (the device was deleted).
    pub async fn kick_deleted(&self, device_id: &str) {
        self.kick_everywhere(device_id, WireKick::Deleted).await
    }

    /// Closes the device's session wherever it is (its user's tokens were revoked).
    pub async fn kick_revoked(&self, device_id: &str) {
        self.kick_everywhere(device_id, WireKick::Revoked).await
    }

    async fn kick_everywhere(&self, device_id: &str, reason: WireKick) {
        if let ClusterBus::Nats(bus) = self {
            let frame = BusFrame::Kick {
                reason,
                node: bus.node_id.clone(),
                session_id: 0,
            };
            bus.send(&bus.device_subject(device_id), &frame).await;
        }
    }

    /// Tells the device's session, wherever it is, about an ack made over HTTP.
    pub async fn acked(&self, device_id: &str, seq: i64) {
        if let ClusterBus::Nats(bus) = self {
            bus.send(&bus.device_subject(device_id), &BusFrame::Acked { seq })
                .await;
        }
    }

    /// After a NATS outage, sessions may have missed doorbells: make every local
    /// session re-read its inbox.
    pub fn spawn_resync(&self, registry: Arc<SessionRegistry>) {
        if let ClusterBus::Nats(bus) = self {
            let reconnected = bus.reconnected.clone();
            tokio::spawn(async move {
                loop {
                    reconnected.notified().await;
                    let n = registry.broadcast(|| SessionEvent::Resync);
                    tracing::info!(
                        sessions = n,
                        "NATS is back; local sessions re-read their inboxes"
                    );
                }
            });
        }
    }
}

/// Why a request got no reply.
enum RequestFailed {
    /// NATS says nobody listens on the subject: no node has a session for it.
    NoResponders,
    /// Timeout or connection trouble: nobody knows.
    NoAnswer,
}

impl NatsBus {
    fn device_subject(&self, device_id: &str) -> String {
        format!("{}.dev.{}", self.prefix, subject_token(device_id))
    }

    async fn send(&self, subject: &str, frame: &BusFrame) {
        let body = serde_json::to_vec(frame).expect("bus frames serialize");
        if let Err(e) = self.client.publish(subject.to_owned(), body.into()).await {
            tracing::warn!(subject, error = %e, "cannot publish on NATS");
        }
    }

    /// Ok(reply) from the first node that answered; Err when none did.
    async fn request(
        &self,
        subject: String,
        frame: &BusFrame,
    ) -> Result<bytes::Bytes, RequestFailed> {
        let body = serde_json::to_vec(frame).expect("bus frames serialize");
        let request = async_nats::Request::new()
            .payload(body.into())
            .timeout(Some(self.request_timeout));
        let outcome = |label: &str| {
            self.metrics
                .cluster_routes
                .with_label_values(&[label])
                .inc()
        };
        match self.client.send_request(subject, request).await {
            Ok(msg) => {
                if matches!(frame, BusFrame::Deliver { .. }) {
                    outcome(if &msg.payload[..] == REPLY_LIVE {
                        "live"
                    } else {
                        "offline"
                    });
                }
                Ok(msg.payload)
            }
            Err(e) => {
                let (label, failed) = match e.kind() {
                    RequestErrorKind::NoResponders => ("offline", RequestFailed::NoResponders),
                    _ => {
                        tracing::debug!(error = %e, "NATS request failed");
                        ("error", RequestFailed::NoAnswer)
                    }
                };
                if matches!(frame, BusFrame::Deliver { .. }) {
                    outcome(label);
                }
                Err(failed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_with_dots_stay_one_subject_token() {
        assert_eq!(subject_token("ios.phone-1"), "ios%2Ephone-1");
        assert_eq!(subject_token("user@x:1"), "user@x:1");
    }

    #[test]
    fn frames_round_trip() {
        let frame = BusFrame::Kick {
            reason: WireKick::Deleted,
            node: "n1".into(),
            session_id: 7,
        };
        let json = serde_json::to_string(&frame).unwrap();
        assert_eq!(
            json,
            r#"{"t":"kick","reason":"deleted","node":"n1","session_id":7}"#
        );
        let back: BusFrame = serde_json::from_str(&json).unwrap();
        assert!(matches!(back, BusFrame::Kick { session_id: 7, .. }));
    }
}
