//! Server-Sent Events: the WebSocket session's delivery rules over plain HTTP, for
//! networks whose proxies break WebSocket upgrades.
//!
//! The session state machine (`session::run_session`) is written over any
//! `Stream + Sink` of WebSocket messages; `SseSocket` is such a pair whose sink renders
//! frames as SSE events into the response body. Replay, live delivery, gap filling,
//! ack timeout, slow-consumer kicks, replacement and shutdown are therefore the very
//! same code as for a WebSocket. The client acks over `POST /v1/me/ack`, which already
//! reaches the live session.
//!
//! SSE has no client → server channel, so what the session reads as "the client is
//! alive" is the response body being drained: every chunk the HTTP connection takes
//! from us is reported as a pong. A client that stops reading stops draining, and the
//! session ends after two heartbeats like a silent WebSocket client.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::ws::Message;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::{Sink, Stream};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::{PollSendError, PollSender};

use super::device::{open_session, serve_session, ConnectParams};
use super::{ApiQuery, AppState, ClientIp, DeviceAuth};
use crate::error::AppError;

/// Events buffered between the session and the HTTP connection. Small: the bytes
/// waiting here are what a slow reader costs, and the session's own queue (bounded,
/// slow consumers kicked) is where backlog belongs.
const BODY_BUFFER_EVENTS: usize = 16;

/// `GET /v1/connect/sse?device_id=D&after=SEQ`.
pub async fn connect(
    State(state): State<AppState>,
    ClientIp(client_ip): ClientIp,
    DeviceAuth(claims): DeviceAuth,
    ApiQuery(params): ApiQuery<ConnectParams>,
    headers: HeaderMap,
) -> Result<Response, AppError> {
    if !accepts_event_stream(&headers) {
        return Err(AppError::NotAcceptable(
            "this route answers `text/event-stream`; send `Accept: text/event-stream`".into(),
        ));
    }
    // EventSource resends the URL it was opened with plus the id of the last event it
    // received, so that id is newer than the `after` in the URL.
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .filter(|n| *n >= 0)
                .ok_or_else(|| {
                    AppError::invalid("Last-Event-ID", "must be a seq (an integer, 0 or more)")
                })?,
        ),
    };
    let requested_after = last_event_id.or(params.after);
    let start = open_session(
        &state,
        client_ip,
        &claims,
        &params.device_id,
        requested_after,
    )
    .await?;

    let (socket, body) = SseSocket::pair();
    let tracker = state.sessions.clone();
    tracker.spawn(serve_session(state, start, socket));

    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::OK;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // nginx buffers responses by default, which would hold events back.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

fn accepts_event_stream(headers: &HeaderMap) -> bool {
    let Some(accept) = headers.get(header::ACCEPT) else {
        return true;
    };
    let Ok(accept) = accept.to_str() else {
        return false;
    };
    accept.split(',').any(|range| {
        let media = range.split(';').next().unwrap_or("").trim();
        media.eq_ignore_ascii_case("text/event-stream")
            || media.eq_ignore_ascii_case("text/*")
            || media == "*/*"
    })
}

/// The session's view of an SSE response: frames in, drain signals out.
pub struct SseSocket {
    events: PollSender<Bytes>,
    drained: mpsc::Receiver<()>,
}

impl SseSocket {
    /// The socket the session drives, and the response body it feeds.
    pub fn pair() -> (SseSocket, Body) {
        let (tx, rx) = mpsc::channel(BODY_BUFFER_EVENTS);
        let (drained_tx, drained_rx) = mpsc::channel(1);
        let socket = SseSocket {
            events: PollSender::new(tx),
            drained: drained_rx,
        };
        let body = Body::from_stream(DrainingBody {
            events: rx,
            drained: drained_tx,
        });
        (socket, body)
    }
}

impl Stream for SseSocket {
    type Item = Result<Message, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // The body is gone (client disconnected) when the drain signal's sender is.
        match ready!(self.drained.poll_recv(cx)) {
            Some(()) => Poll::Ready(Some(Ok(Message::Pong(Bytes::new())))),
            None => Poll::Ready(None),
        }
    }
}

impl Sink<Message> for SseSocket {
    type Error = PollSendError<Bytes>;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.events.poll_reserve(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, msg: Message) -> Result<(), Self::Error> {
        match render_event(&msg) {
            Some(event) => self.events.send_item(event),
            // Nothing to write; the reserved slot is kept for the next frame.
            None => Ok(()),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Result<(), Self::Error>> {
        self.events.close();
        Poll::Ready(Ok(()))
    }
}

/// The response body: events in order, and a signal each time the connection takes one.
struct DrainingBody {
    events: mpsc::Receiver<Bytes>,
    drained: mpsc::Sender<()>,
}

impl Stream for DrainingBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let event = ready!(self.events.poll_recv(cx));
        if event.is_some() {
            // Full means a signal is already pending: one is as good as many.
            let _ = self.drained.try_send(());
        }
        Poll::Ready(event.map(Ok))
    }
}

#[derive(Deserialize)]
struct FrameHead {
    #[serde(rename = "type")]
    kind: String,
    seq: Option<i64>,
}

/// One WebSocket message as SSE: a server frame becomes an event named by its `type`
/// (a `msg` also gets `id: <seq>`, so `Last-Event-ID` resumes); a ping becomes a
/// comment line that keeps proxies from timing the connection out; a close frame
/// becomes a `close` event carrying its code and reason.
pub fn render_event(msg: &Message) -> Option<Bytes> {
    match msg {
        Message::Text(text) => {
            let head: FrameHead = serde_json::from_str(text.as_str()).ok()?;
            let mut out = String::with_capacity(text.len() + 48);
            if head.kind == "msg" {
                if let Some(seq) = head.seq {
                    out.push_str(&format!("id: {seq}\n"));
                }
            }
            out.push_str("event: ");
            out.push_str(&head.kind);
            out.push('\n');
            push_data(&mut out, text.as_str());
            Some(Bytes::from(out))
        }
        Message::Ping(_) => Some(Bytes::from_static(b": heartbeat\n\n")),
        Message::Close(frame) => {
            let (code, reason) = frame
                .as_ref()
                .map(|f| (f.code, f.reason.as_str().to_owned()))
                .unwrap_or((1000, String::new()));
            let data = serde_json::json!({ "code": code, "reason": reason }).to_string();
            let mut out = String::from("event: close\n");
            push_data(&mut out, &data);
            Some(Bytes::from(out))
        }
        Message::Pong(_) | Message::Binary(_) => None,
    }
}

/// `data:` lines end an SSE field at any line break, so a payload holding raw line
/// breaks (JSON whitespace the backend sent) is split over several `data:` lines; the
/// client joins them with `\n`, which is the same JSON.
fn push_data(out: &mut String, text: &str) {
    for line in text.split(['\n', '\r']) {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::ws::{CloseFrame, Utf8Bytes};

    fn text(s: &str) -> Message {
        Message::Text(Utf8Bytes::from(s.to_owned()))
    }

    #[test]
    fn msg_frames_carry_their_seq_as_event_id() {
        let ev = render_event(&text(r#"{"type":"msg","seq":7,"id":"m","data":{}}"#)).unwrap();
        assert_eq!(
            ev,
            "id: 7\nevent: msg\ndata: {\"type\":\"msg\",\"seq\":7,\"id\":\"m\",\"data\":{}}\n\n"
        );
    }

    #[test]
    fn other_frames_are_named_by_type_without_id() {
        let ev = render_event(&text(r#"{"type":"welcome","session_id":"s1"}"#)).unwrap();
        assert_eq!(
            ev,
            "event: welcome\ndata: {\"type\":\"welcome\",\"session_id\":\"s1\"}\n\n"
        );
    }

    #[test]
    fn line_breaks_in_a_frame_become_separate_data_lines() {
        let ev = render_event(&text("{\"type\":\"msg\",\"seq\":1,\n\"data\":\r\n1}")).unwrap();
        assert_eq!(
            ev,
            "id: 1\nevent: msg\ndata: {\"type\":\"msg\",\"seq\":1,\ndata: \"data\":\ndata: \ndata: 1}\n\n"
        );
    }

    #[test]
    fn pings_are_comments_and_close_is_an_event() {
        assert_eq!(
            render_event(&Message::Ping(Bytes::new())).unwrap(),
            ": heartbeat\n\n"
        );
        let close = Message::Close(Some(CloseFrame {
            code: 1008,
            reason: Utf8Bytes::from_static("ack timeout"),
        }));
        assert_eq!(
            render_event(&close).unwrap(),
            "event: close\ndata: {\"code\":1008,\"reason\":\"ack timeout\"}\n\n"
        );
        assert!(render_event(&Message::Pong(Bytes::new())).is_none());
    }

    #[test]
    fn accept_header_is_read_as_media_ranges() {
        let mut h = HeaderMap::new();
        assert!(accepts_event_stream(&h));
        h.insert(header::ACCEPT, "Text/Event-Stream".parse().unwrap());
        assert!(accepts_event_stream(&h));
        h.insert(
            header::ACCEPT,
            "application/json, */*;q=0.1".parse().unwrap(),
        );
        assert!(accepts_event_stream(&h));
        h.insert(header::ACCEPT, "application/json".parse().unwrap());
        assert!(!accepts_event_stream(&h));
    }
}
