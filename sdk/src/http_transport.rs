//! Server-Sent Events and long-poll: the session over plain HTTP, for networks whose
//! proxies break WebSocket upgrades. Both look like a WebSocket connection to the
//! engine (`Connection`): the server's frames come in order, a `ClientFrame::Ack`
//! becomes `POST /v1/me/ack` (coalesced: cumulative, only the newest one is sent),
//! pings are not answered (`can_ping` is false; liveness is the SSE heartbeat
//! comments / the held polls answering within their wait). Subscribe/unsubscribe
//! have no HTTP route for devices: they wait for the next WebSocket session.
//!
//! A background task reads the HTTP side into a small bounded channel, so `recv` is
//! cancel-safe and a listener that falls behind stops the reading (the gateway then
//! treats the device as a slow consumer, as on a WebSocket).

use std::sync::Arc;
use std::time::Duration;

use herald_protocol::{ClientFrame, ServerFrame};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use url::Url;

use crate::http::Api;
use crate::log::log;
use crate::transport::{not_here, ConnectError, Incoming};

/// Events read ahead of the engine.
const READ_AHEAD: usize = 64;

pub(crate) struct HttpTransport {
    /// No overall time limit (an event stream lasts); connect timeout only.
    stream_http: reqwest::Client,
    api: Arc<Api>,
    /// How long a long-poll is held (also the heartbeat the engine is told).
    poll_wait: Duration,
}

impl HttpTransport {
    pub fn new(
        api: Arc<Api>,
        connect_timeout: Duration,
        poll_wait: Duration,
        tls: &rustls::ClientConfig,
    ) -> Self {
        let stream_http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            // The same verification as the WebSocket (`crate::tls`).
            .use_preconfigured_tls(tls.clone())
            .build()
            .unwrap_or_default();
        HttpTransport {
            stream_http,
            api,
            poll_wait: poll_wait.clamp(Duration::from_secs(1), Duration::from_secs(60)),
        }
    }

    pub async fn reachable(&self, _base: &Url) -> bool {
        self.api.reachable().await
    }

    /// `GET {base}/v1/connect/sse?device_id=D&after=SEQ`.
    pub async fn connect_sse(
        &self,
        base: &Url,
        device_id: &str,
        after: i64,
        token: &str,
    ) -> Result<HttpConnection, ConnectError> {
        let mut url = base.clone();
        url.path_segments_mut()
            .map_err(|_| ConnectError::Network("base url cannot be a base".into()))?
            .pop_if_empty()
            .extend(["v1", "connect", "sse"]);
        url.query_pairs_mut()
            .append_pair("device_id", device_id)
            .append_pair("after", &after.to_string());
        let resp = self
            .stream_http
            .get(url)
            .bearer_auth(token)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .header(reqwest::header::CACHE_CONTROL, "no-store")
            .send()
            .await
            .map_err(|e| match crate::tls::certificate_error(&e) {
                Some(refused) => ConnectError::Certificate(refused),
                None => ConnectError::Network(e.to_string()),
            })?;
        let status = resp.status().as_u16();
        let is_stream = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
        if status == 200 && is_stream {
            let (tx, rx) = mpsc::channel(READ_AHEAD);
            let reader = tokio::spawn(read_sse(resp, tx));
            return Ok(HttpConnection {
                rx,
                acks: Acker::start(self.api.clone(), after),
                task: reader,
            });
        }
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = resp.bytes().await.unwrap_or_default();
        if status == 200 || not_here(status, &body) {
            return Err(ConnectError::NotHere(format!(
                "the event stream was answered with HTTP {status}{} (not from the gateway)",
                if status == 200 {
                    " but no text/event-stream"
                } else {
                    ""
                }
            )));
        }
        Err(ConnectError::Rejected {
            status,
            error: crate::error::from_status(status, &body, retry_after),
        })
    }

    /// Long-poll: a first `GET /v1/me/sync` that answers at once (its `last_seq` makes
    /// the welcome), then held polls in a loop.
    pub async fn connect_poll(&self, after: i64) -> Result<HttpConnection, ConnectError> {
        let first = match self.api.long_poll(after, Duration::ZERO).await {
            // The WebSocket and SSE routes create the device on first connect; sync
            // does not. A device that does not exist has no push token to lose.
            Err(crate::Error::DeviceNotFound(m)) if !m.starts_with("http_") => {
                let req = herald_protocol::RegisterDeviceRequest {
                    platform: herald_protocol::Platform::Other,
                    push_provider: None,
                    push_token: None,
                    apns_environment: None,
                };
                self.api
                    .register_device(&req)
                    .await
                    .map_err(poll_connect_error)?;
                self.api.long_poll(after, Duration::ZERO).await
            }
            r => r,
        }
        .map_err(poll_connect_error)?;
        let (tx, rx) = mpsc::channel(READ_AHEAD.max(crate::http::SYNC_PAGE as usize + 1));
        let wait_s = self.poll_wait.as_secs().max(1);
        let welcome = ServerFrame::Welcome {
            session_id: "long-poll".into(),
            heartbeat_s: wait_s,
            ack_timeout_s: 0,
            last_seq: first.last_seq,
        };
        let _ = tx.try_send(Ok(Incoming::Frame(welcome)));
        let mut received = after;
        for m in first.messages {
            received = received.max(m.seq);
            let _ = tx.try_send(Ok(Incoming::Frame(ServerFrame::Msg(m))));
        }
        let acks = Acker::start(self.api.clone(), after);
        let poller = tokio::spawn(poll_loop(
            self.api.clone(),
            acks.watch.subscribe(),
            received,
            self.poll_wait,
            tx,
        ));
        Ok(HttpConnection {
            rx,
            acks,
            task: poller,
        })
    }
}

/// The long-poll's first answer as a connect error: the gateway's refusals as on
/// the WebSocket; answers that are not the gateway's, "not here".
fn poll_connect_error(e: crate::Error) -> ConnectError {
    use crate::Error as E;
    let status = match &e {
        E::Network(m) | E::Timeout(m) => return ConnectError::Network(m.clone()),
        E::Certificate(m) => return ConnectError::Certificate(m.clone()),
        E::Unauthorized(_) => 401,
        E::Forbidden(m) if m.starts_with("http_") => {
            return ConnectError::NotHere(format!("sync answered {m}"))
        }
        E::Forbidden(_) => 403,
        E::DeviceNotFound(m) if m.starts_with("http_") => {
            return ConnectError::NotHere(format!("sync answered {m}"))
        }
        E::DeviceNotFound(_) => 404,
        E::RateLimited { .. } => 429,
        // `from_status` names a body that is not the gateway's `http_<status>`.
        E::Server { status, code, .. } if code.starts_with("http_") => {
            return ConnectError::NotHere(format!("sync answered HTTP {status}"))
        }
        E::Server { status, .. } => *status,
        E::Protocol(m) => return ConnectError::NotHere(format!("sync answer unreadable: {m}")),
        _ => 0,
    };
    ConnectError::Rejected { status, error: e }
}

/// Sends the newest cumulative ack with `POST /v1/me/ack`; acks that arrive while one
/// is in flight are folded into the next.
/// Dropping it lets an ack in flight (or one just asked for) finish, then the task ends.
struct Acker {
    watch: watch::Sender<i64>,
}

impl Acker {
    fn start(api: Arc<Api>, after: i64) -> Acker {
        let (watch, mut rx) = watch::channel(after);
        tokio::spawn(async move {
            let mut sent = after;
            while rx.changed().await.is_ok() {
                let seq = *rx.borrow_and_update();
                if seq <= sent {
                    continue;
                }
                match api.ack(seq).await {
                    Ok(_) => sent = seq,
                    // The next ack covers it; the gateway's ack timeout ends the
                    // session if none gets through, and reconnecting acks by `after`.
                    Err(e) => log!(Debug, "ack of {seq} over HTTP failed: {e}"),
                }
            }
        });
        Acker { watch }
    }

    fn ack(&self, seq: i64) {
        self.watch.send_if_modified(|v| {
            let newer = seq > *v;
            if newer {
                *v = seq;
            }
            newer
        });
    }
}

fn frame_without_http_route(frame: &ClientFrame) {
    if let ClientFrame::Subscribe { topic } | ClientFrame::Unsubscribe { topic } = frame {
        log!(
            Info,
            "topic change for {topic} waits for a WebSocket session (no HTTP route for it)"
        );
    }
}

/// An SSE stream or a long-poll loop: either way a task that feeds the engine's
/// frames into a channel, with acks going over `POST /v1/me/ack`.
pub struct HttpConnection {
    rx: mpsc::Receiver<Result<Incoming, String>>,
    acks: Acker,
    task: JoinHandle<()>,
}

impl crate::transport::Connection for HttpConnection {
    fn can_ping(&self) -> bool {
        false
    }

    async fn send(&mut self, frame: &ClientFrame) -> Result<(), String> {
        match frame {
            ClientFrame::Ack { seq } => self.acks.ack(*seq),
            ClientFrame::Ping => {}
            other => frame_without_http_route(other),
        }
        Ok(())
    }

    async fn recv(&mut self) -> Option<Result<Incoming, String>> {
        self.rx.recv().await
    }

    async fn close(&mut self) {
        self.task.abort();
        self.rx.close();
    }
}

impl Drop for HttpConnection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Held polls in a loop. A poll's `after` acknowledges everything up to it, so it is
/// the engine's ack (what the app has handled), never merely what was received:
/// while received entries are not all handled, no new poll starts (it would only
/// bring them again); an `Activity` every `wait` keeps the engine's liveness check
/// quiet meanwhile.
async fn poll_loop(
    api: Arc<Api>,
    mut acked: watch::Receiver<i64>,
    mut received: i64,
    wait: Duration,
    tx: mpsc::Sender<Result<Incoming, String>>,
) {
    loop {
        while *acked.borrow_and_update() < received {
            match tokio::time::timeout(wait, acked.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    if tx.send(Ok(Incoming::Activity)).await.is_err() {
                        return;
                    }
                }
            }
        }
        let after = received.max(*acked.borrow());
        match api.long_poll(after, wait).await {
            Ok(page) => {
                if page.messages.is_empty() && tx.send(Ok(Incoming::Activity)).await.is_err() {
                    return;
                }
                for m in page.messages {
                    received = received.max(m.seq);
                    if tx
                        .send(Ok(Incoming::Frame(ServerFrame::Msg(m))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            Err(e) => {
                let _ = tx.send(Err(format!("long-poll failed: {e}"))).await;
                return;
            }
        }
    }
}

/// Reads the event stream into `tx` until it ends, errs, or a `close` event comes.
async fn read_sse(mut resp: reqwest::Response, tx: mpsc::Sender<Result<Incoming, String>>) {
    let mut parser = SseParser::default();
    loop {
        match resp.chunk().await {
            Ok(Some(bytes)) => {
                for item in parser.feed(&bytes) {
                    match item {
                        SseItem::Incoming(i) => {
                            if tx.send(Ok(i)).await.is_err() {
                                return;
                            }
                        }
                        SseItem::Close(data) => {
                            log!(Debug, "event stream closed by the gateway: {data}");
                            return;
                        }
                    }
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = tx.send(Err(format!("event stream: {e}"))).await;
                return;
            }
        }
    }
}

#[derive(Debug, PartialEq)]
enum SseItem {
    Incoming(Incoming),
    /// `event: close` (the WebSocket close frame's code and reason as JSON).
    Close(String),
}

/// The `text/event-stream` format: lines, `field: value`, an empty line dispatches;
/// a line starting with `:` is a comment (the heartbeat).
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
    event: String,
    data: Vec<String>,
}

impl SseParser {
    fn feed(&mut self, bytes: &[u8]) -> Vec<SseItem> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(pos) = self.buf[start..].iter().position(|b| *b == b'\n') {
            let end = start + pos;
            let mut line = &self.buf[start..end];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            let line = String::from_utf8_lossy(line).into_owned();
            start = end + 1;
            if let Some(item) = self.line(&line) {
                out.push(item);
            }
        }
        self.buf.drain(..start);
        out
    }

    fn line(&mut self, line: &str) -> Option<SseItem> {
        if line.is_empty() {
            let event = std::mem::take(&mut self.event);
            let data = std::mem::take(&mut self.data);
            if data.is_empty() {
                return None;
            }
            let data = data.join("\n");
            if event == "close" {
                return Some(SseItem::Close(data));
            }
            return Some(SseItem::Incoming(
                match serde_json::from_str::<ServerFrame>(&data) {
                    Ok(f) => Incoming::Frame(f),
                    Err(e) => {
                        log!(Debug, "ignoring unknown event {event:?}: {e}");
                        Incoming::Activity
                    }
                },
            ));
        }
        if line.starts_with(':') {
            return Some(SseItem::Incoming(Incoming::Activity));
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            "data" => self.data.push(value.to_string()),
            _ => {} // `id` (the seq is in the data too), `retry`
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_split_anywhere() {
        let stream = "event: welcome\ndata: {\"type\":\"welcome\",\"session_id\":\"s\",\"heartbeat_s\":25,\"ack_timeout_s\":10,\"last_seq\":3}\n\n\
: heartbeat\n\n\
id: 4\r\nevent: msg\r\ndata: {\"type\":\"msg\",\"seq\":4,\"id\":\"m\",\ndata: \"data\":{\"a\":\"é\"},\"sent_at\":\"t\"}\r\n\r\n\
event: close\ndata: {\"code\":1001,\"reason\":\"shutdown\"}\n\n";
        for split in [1, 2, 3, 7, 50, 1000] {
            let mut p = SseParser::default();
            let mut items = Vec::new();
            for chunk in stream.as_bytes().chunks(split) {
                items.extend(p.feed(chunk));
            }
            assert_eq!(items.len(), 4, "split {split}: {items:?}");
            assert!(matches!(
                &items[0],
                SseItem::Incoming(Incoming::Frame(ServerFrame::Welcome { last_seq: 3, .. }))
            ));
            assert_eq!(items[1], SseItem::Incoming(Incoming::Activity));
            match &items[2] {
                SseItem::Incoming(Incoming::Frame(ServerFrame::Msg(m))) => {
                    assert_eq!(m.seq, 4);
                    assert_eq!(m.data["a"], "é");
                }
                other => panic!("{other:?}"),
            }
            assert!(matches!(&items[3], SseItem::Close(d) if d.contains("1001")));
        }
    }
}
