//! The transports (WebSocket here; Server-Sent Events and long-poll in
//! `http_transport`), behind a small trait so the connection state machine (`engine`)
//! can be driven by a fake in tests.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use herald_protocol::{ClientFrame, ServerFrame, SUBPROTOCOL};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, http::HeaderValue, Message};
use url::Url;

use crate::http_transport::{HttpConnection, HttpTransport};
use crate::{Error, TransportKind};

/// What a connection yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Frame(ServerFrame),
    /// Any other sign of life (WS ping/pong, unknown frame).
    Activity,
}

/// Why a connect attempt failed.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectError {
    /// The gateway refused the upgrade with this status.
    Rejected {
        status: u16,
        error: Error,
    },
    Network(String),
    /// The answer did not come from the gateway and says this transport does not get
    /// through here (a proxy refused or stripped the WebSocket upgrade, or did not
    /// pass an event stream): the engine falls back to the next transport.
    NotHere(String),
    /// The server's certificate was refused (`crate::tls`).
    Certificate(String),
}

/// Whether an HTTP answer to a connect request says "this transport does not get
/// through here" rather than "the gateway refused": any status but 101 (WebSocket) /
/// 200 (SSE) whose body is not the gateway's JSON error, except 401 and 429 (an
/// authenticating or rate-limiting proxy: retrying another transport would not help).
/// The gateway's own refusals (401, 403, 404, 422, 429 …) always carry its error body.
pub fn not_here(status: u16, body: &[u8]) -> bool {
    if matches!(status, 401 | 429) {
        return false;
    }
    serde_json::from_slice::<herald_protocol::ErrorBody>(body).is_err()
}

/// `not_here` for the WebSocket upgrade, plus the gateway's own 400: the only 400 it
/// gives on `GET /v1/connect` is "no upgrade headers arrived" (docs/protocol.md), which
/// a client library that sent them only sees when something on the way stripped them.
pub fn ws_upgrade_not_here(status: u16, body: &[u8]) -> bool {
    status == 400 || not_here(status, body)
}

pub trait Connection: Send {
    /// Whether a `ClientFrame::Ping` is answered (WebSocket). Over SSE and long-poll
    /// it is not; liveness is the server's heartbeat comments / held polls answering.
    fn can_ping(&self) -> bool {
        true
    }
    fn send(&mut self, frame: &ClientFrame) -> impl Future<Output = Result<(), String>> + Send;
    /// Next event; `None` when the connection is closed. Must be cancel-safe.
    fn recv(&mut self) -> impl Future<Output = Option<Result<Incoming, String>>> + Send;
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}

pub trait Transport: Send + Sync + 'static {
    type Conn: Connection + 'static;
    fn connect(
        &self,
        kind: TransportKind,
        base: &Url,
        device_id: &str,
        after: i64,
        token: &str,
    ) -> impl Future<Output = Result<Self::Conn, ConnectError>> + Send;
    /// Whether plain HTTP(S) to the gateway works (`GET /healthz` answers): told apart
    /// from a dead network when WebSocket handshakes keep timing out.
    fn http_reachable(&self, base: &Url) -> impl Future<Output = bool> + Send;
}

/// `GET {base}/v1/connect?device_id=D&after=SEQ` as a WebSocket URL.
pub fn connect_url(base: &Url, device_id: &str, after: i64) -> Url {
    let mut url = base.clone();
    let scheme = match base.scheme() {
        "https" | "wss" => "wss",
        _ => "ws",
    };
    let _ = url.set_scheme(scheme);
    url.path_segments_mut()
        .expect("http base url")
        .pop_if_empty()
        .extend(["v1", "connect"]);
    url.query_pairs_mut()
        .append_pair("device_id", device_id)
        .append_pair("after", &after.to_string());
    url
}

/// tokio-tungstenite over TCP/TLS.
#[derive(Debug, Clone, Default)]
pub struct WsTransport {
    /// TLS of `wss://` (`crate::tls`); `None`: tokio-tungstenite's default.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl WsTransport {
    pub fn new(tls: Arc<rustls::ClientConfig>) -> Self {
        WsTransport { tls: Some(tls) }
    }
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct WsConnection {
    ws: WsStream,
}

impl WsTransport {
    pub async fn connect(
        &self,
        base: &Url,
        device_id: &str,
        after: i64,
        token: &str,
    ) -> Result<WsConnection, ConnectError> {
        let url = connect_url(base, device_id, after);
        let mut req = url
            .as_str()
            .into_client_request()
            .map_err(|e| ConnectError::Network(e.to_string()))?;
        let headers = req.headers_mut();
        headers.insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
        let auth = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            ConnectError::Rejected {
                status: 401,
                error: Error::Unauthorized("token is not a valid header value".into()),
            }
        })?;
        headers.insert("Authorization", auth);
        let connector = self.tls.clone().map(tokio_tungstenite::Connector::Rustls);
        match tokio_tungstenite::connect_async_tls_with_config(req, None, false, connector).await {
            Ok((ws, _resp)) => Ok(WsConnection { ws }),
            Err(tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let body = resp.body().as_deref().unwrap_or_default();
                if ws_upgrade_not_here(status, body) {
                    return Err(ConnectError::NotHere(format!(
                        "the WebSocket upgrade was answered with HTTP {status} (not from the gateway)"
                    )));
                }
                Err(ConnectError::Rejected {
                    status,
                    error: crate::error::from_status(status, body, retry_after),
                })
            }
            // A 101 without the upgrade's headers (a middlebox answered for the
            // gateway), or a response that is not HTTP/1.1 at all.
            Err(e @ (tungstenite::Error::Protocol(_) | tungstenite::Error::HttpFormat(_))) => Err(
                ConnectError::NotHere(format!("WebSocket handshake broken: {e}")),
            ),
            Err(e) => Err(match crate::tls::certificate_error(&e) {
                Some(refused) => ConnectError::Certificate(refused),
                None => ConnectError::Network(e.to_string()),
            }),
        }
    }
}

/// The real transports: WebSocket, SSE and long-poll, chosen per attempt.
pub struct Transports {
    pub(crate) ws: WsTransport,
    pub(crate) http: HttpTransport,
}

/// A connection of any of [`Transports`].
pub enum AnyConnection {
    Ws(Box<WsConnection>),
    /// SSE or long-poll.
    Http(HttpConnection),
}

impl Transport for Transports {
    type Conn = AnyConnection;

    async fn connect(
        &self,
        kind: TransportKind,
        base: &Url,
        device_id: &str,
        after: i64,
        token: &str,
    ) -> Result<AnyConnection, ConnectError> {
        Ok(match kind {
            TransportKind::WebSocket => AnyConnection::Ws(Box::new(
                self.ws.connect(base, device_id, after, token).await?,
            )),
            TransportKind::Sse => {
                AnyConnection::Http(self.http.connect_sse(base, device_id, after, token).await?)
            }
            TransportKind::LongPoll => AnyConnection::Http(self.http.connect_poll(after).await?),
        })
    }

    async fn http_reachable(&self, base: &Url) -> bool {
        self.http.reachable(base).await
    }
}

impl Connection for AnyConnection {
    fn can_ping(&self) -> bool {
        matches!(self, AnyConnection::Ws(_))
    }

    async fn send(&mut self, frame: &ClientFrame) -> Result<(), String> {
        match self {
            AnyConnection::Ws(c) => c.send(frame).await,
            AnyConnection::Http(c) => c.send(frame).await,
        }
    }

    async fn recv(&mut self) -> Option<Result<Incoming, String>> {
        match self {
            AnyConnection::Ws(c) => c.recv().await,
            AnyConnection::Http(c) => c.recv().await,
        }
    }

    async fn close(&mut self) {
        match self {
            AnyConnection::Ws(c) => c.close().await,
            AnyConnection::Http(c) => c.close().await,
        }
    }
}

impl Connection for WsConnection {
    async fn send(&mut self, frame: &ClientFrame) -> Result<(), String> {
        let text = serde_json::to_string(frame).expect("frames serialize");
        self.ws
            .send(Message::text(text))
            .await
            .map_err(|e| e.to_string())
    }

    async fn recv(&mut self) -> Option<Result<Incoming, String>> {
        match self.ws.next().await? {
            Ok(Message::Text(t)) => {
                Some(Ok(match serde_json::from_str::<ServerFrame>(t.as_str()) {
                    Ok(f) => Incoming::Frame(f),
                    Err(e) => {
                        crate::log::log!(Debug, "ignoring unknown frame: {e}");
                        Incoming::Activity
                    }
                }))
            }
            Ok(Message::Close(_)) => None,
            Ok(_) => Some(Ok(Incoming::Activity)),
            Err(e) => Some(Err(e.to_string())),
        }
    }

    async fn close(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ws.close(None)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_url_maps_scheme_and_path() {
        let u = connect_url(&Url::parse("http://h:1").unwrap(), "d 1", 5);
        assert_eq!(u.as_str(), "ws://h:1/v1/connect?device_id=d+1&after=5");
        let u = connect_url(&Url::parse("https://h/base/").unwrap(), "d", 0);
        assert_eq!(u.as_str(), "wss://h/base/v1/connect?device_id=d&after=0");
    }

    #[test]
    fn answers_not_from_the_gateway_mean_not_here() {
        let herald = br#"{"error":{"code":"forbidden","message":"no"}}"#;
        assert!(!not_here(403, herald));
        assert!(!not_here(422, herald));
        assert!(not_here(403, b"<html>Blocked by policy</html>"));
        assert!(not_here(
            400,
            b"Connection header did not include 'upgrade'"
        ));
        assert!(not_here(200, b""));
        assert!(not_here(502, b""));
        assert!(!not_here(401, b""));
        // The gateway's 400 to an upgrade means the upgrade headers did not arrive.
        let stripped = br#"{"error":{"code":"malformed","message":"Connection header did not include 'upgrade'"}}"#;
        assert!(!not_here(400, stripped));
        assert!(ws_upgrade_not_here(400, stripped));
        assert!(!ws_upgrade_not_here(403, herald));
        assert!(!ws_upgrade_not_here(401, b""));
        assert!(!not_here(429, b""));
    }
}
