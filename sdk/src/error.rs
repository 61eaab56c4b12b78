//! The SDK's error type.

use std::time::Duration;

/// Everything that can go wrong in the SDK. `is_terminal` tells whether the client
/// stopped retrying because of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The configuration (base URL, device id, data directory) is unusable.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// Connection refused, DNS failure, reset, TLS failure: retried with backoff.
    #[error("network error: {0}")]
    Network(String),
    /// The gateway's TLS certificate was refused: not trusted by the platform's
    /// certificate store, expired, for another name, or a certificate pin mismatch
    /// (`Config::pinned_spki_sha256`). Not terminal (a captive portal or an
    /// intercepting proxy may be in the way; another network may work): retried with
    /// backoff, and reported to the listener at each attempt.
    #[error("certificate refused: {0}")]
    Certificate(String),
    /// A request or connect attempt took too long.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The gateway rejected the device token even after a fresh one was fetched.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The token is valid but not allowed (device owned by another user, wrong scope).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The device was deleted on the gateway.
    #[error("device not found: {0}")]
    DeviceNotFound(String),
    /// The app's token provider failed (repeatedly, when terminal).
    #[error("token provider failed: {0}")]
    TokenProvider(String),
    /// Any other error answer of the gateway.
    #[error("gateway answered {status} {code}: {message}")]
    Server {
        status: u16,
        code: String,
        message: String,
    },
    /// 429 from the gateway.
    #[error("rate limited (retry after {retry_after:?})")]
    RateLimited { retry_after: Option<Duration> },
    /// The local SQLite file could not be opened or written.
    #[error("storage error: {0}")]
    Storage(String),
    /// `handle_push` was given a payload that is not a Herald push.
    #[error("not a Herald push payload")]
    NotHeraldPush,
    /// A Herald push payload with missing or malformed fields.
    #[error("invalid push payload: {0}")]
    InvalidPayload(String),
    /// The gateway sent something the SDK does not understand, or an `error` frame.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The client was closed.
    #[error("client is closed")]
    Closed,
}

impl Error {
    /// True for errors after which retrying cannot help: the client stops reconnecting
    /// until the app calls `connect()` again.
    pub fn is_terminal(&self) -> bool {
        match self {
            Error::InvalidConfig(_)
            | Error::Unauthorized(_)
            | Error::Forbidden(_)
            | Error::DeviceNotFound(_)
            | Error::TokenProvider(_)
            | Error::Closed => true,
            Error::Server { status, .. } => matches!(status, 400 | 409 | 413 | 422),
            _ => false,
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

/// Maps an HTTP error answer (status + `{"error": {"code", "message"}}` body) to an
/// [`Error`].
pub(crate) fn from_status(status: u16, body: &[u8], retry_after: Option<Duration>) -> Error {
    let (code, message) = match serde_json::from_slice::<herald_protocol::ErrorBody>(body) {
        Ok(b) => (b.error.code, b.error.message),
        Err(_) => (
            format!("http_{status}"),
            String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        ),
    };
    match status {
        401 => Error::Unauthorized(format!("{code}: {message}")),
        403 => Error::Forbidden(format!("{code}: {message}")),
        404 => Error::DeviceNotFound(format!("{code}: {message}")),
        429 => Error::RateLimited { retry_after },
        _ => Error::Server {
            status,
            code,
            message,
        },
    }
}
