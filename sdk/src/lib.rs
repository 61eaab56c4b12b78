//! Herald client core: one connection per client with reconnect/backoff, heartbeats,
//! catch-up from a persisted cursor, de-duplication, token refresh, push handling.
//! Pure Rust; the Swift/Kotlin bindings (`herald-ffi`) wrap [`HeraldClient`].
//!
//! Threads: every client runs a small current-thread tokio runtime on its own thread
//! (`herald-sdk-io`: the connection state machine and HTTP calls) and calls the app's
//! [`Listener`] from one dedicated thread (`herald-sdk-listener`), in order; the
//! app's [`Logger`] gets its own thread (`herald-sdk-log`). Public calls only post a
//! command, except [`HeraldClient::handle_push`], [`HeraldClient::register_push_token`],
//! [`HeraldClient::unregister`] and [`HeraldClient::reset`], which wait (bounded).
//!
//! Layout: [`backoff`] (policy), [`transport`] (WebSocket, behind a trait),
//! `engine` (state machine), [`store`] (SQLite cursor, shared safely by two
//! processes), [`push`] (payload parsing), `http` (REST), [`token`] (token provider
//! and expiry), `log` (logger and counters).

pub mod backoff;
mod client;
mod engine;
mod error;
mod http;
mod http_transport;
mod log;
pub mod push;
pub mod store;
pub mod tls;
pub mod token;
pub mod transport;

pub use client::{Config, HeraldClient, Listener};
pub use error::Error;
pub use herald_protocol::{
    ApnsEnvironment, DeviceInfo, InboxMessage, Notification, PushProviderKind,
};
pub use log::{set_logger, LogLevel, Logger, Stats};
pub use push::{is_herald_push, parse_push, PushInfo, PushOutcome};
pub use tls::spki_sha256;
pub use token::{jwt_expiry, TokenProvider};

/// Connection state, reported to [`Listener::on_state_changed`] on every change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Not connecting (initial state, after `disconnect()` or a terminal error).
    Disconnected,
    /// A connect attempt is running (token, TCP/TLS, upgrade, welcome).
    Connecting,
    /// Welcome received; messages flow over `transport`.
    Connected { transport: TransportKind },
    /// The connection failed or dropped; the next attempt starts after `delay_ms`.
    WaitingToReconnect { delay_ms: u64 },
    /// The app wants a connection but is in the background or offline.
    Suspended,
    /// `close()` was called; the client is finished.
    Closed,
}

/// The transport a session runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// `GET /v1/connect` upgraded to a WebSocket (the normal case).
    WebSocket,
    /// `GET /v1/connect/sse` (Server-Sent Events), acks over `POST /v1/me/ack`.
    Sse,
    /// `GET /v1/me/sync?wait=S` in a loop, acks over `POST /v1/me/ack`.
    LongPoll,
}

impl TransportKind {
    /// `ws`, `sse` or `poll`.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::WebSocket => "ws",
            TransportKind::Sse => "sse",
            TransportKind::LongPoll => "poll",
        }
    }
}

/// Which transport the client uses ([`Config::transport`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportPreference {
    /// WebSocket; when the network refuses WebSocket upgrades, Server-Sent Events,
    /// then long-poll, retrying WebSocket every [`Config::websocket_retry`] and on
    /// every network change.
    #[default]
    Auto,
    /// Only WebSocket.
    WebSocket,
    /// Only Server-Sent Events.
    Sse,
    /// Only long-poll.
    LongPoll,
}

impl std::str::FromStr for TransportPreference {
    type Err = String;
    /// `auto`, `ws`, `sse` or `poll`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(TransportPreference::Auto),
            "ws" | "websocket" => Ok(TransportPreference::WebSocket),
            "sse" => Ok(TransportPreference::Sse),
            "poll" | "long-poll" | "longpoll" => Ok(TransportPreference::LongPoll),
            other => Err(format!(
                "unknown transport {other:?} (auto, ws, sse or poll)"
            )),
        }
    }
}

#[cfg(test)]
mod engine_tests;
