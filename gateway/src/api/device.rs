//! Device routes (device JWT): connect, register or remove a push token, sync, ack.

use std::net::IpAddr;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use herald_protocol::{AckRequest, AckResponse, DeviceInfo, RegisterDeviceRequest, SUBPROTOCOL};
use serde::Deserialize;

use super::{require_id, ApiJson, ApiPath, ApiQuery, AppState, ClientIp, DeviceAuth};
use crate::auth::{DeviceClaims, TopicAccess};
use crate::clock::now_ms;
use crate::config::TopicPolicy;
use crate::error::AppError;
use crate::session::{run_session, SessionStart};
use crate::store::Device;

/// A token acts for the device in its `did` claim only; without one it is refused,
/// unless `auth.require_device_claim = false` allows user-wide tokens.
fn check_bound(state: &AppState, claims: &DeviceClaims, device_id: &str) -> Result<(), AppError> {
    match &claims.did {
        Some(did) if did == device_id => Ok(()),
        Some(did) => Err(AppError::Forbidden(format!(
            "this device token is bound to device {did} (its `did` claim), not {device_id}"
        ))),
        None if state.config.auth.require_device_claim => Err(AppError::Forbidden(
            "this device token has no `did` claim; mint one with `device_id` (POST /v1/tokens) or set auth.require_device_claim = false".into(),
        )),
        None => Ok(()),
    }
}

/// `limits.max_devices_per_user`, which the store's claim enforces (a 409 `conflict`).
fn device_cap(state: &AppState) -> u64 {
    state.config.limits.max_devices_per_user as u64
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectParams {
    pub device_id: String,
    pub after: Option<i64>,
    /// Read by `DeviceAuth`; declared so it is not an unknown parameter.
    #[allow(dead_code)]
    pub access_token: Option<String>,
}

pub async fn connect(
    State(state): State<AppState>,
    ClientIp(client_ip): ClientIp,
    DeviceAuth(claims): DeviceAuth,
    ApiQuery(params): ApiQuery<ConnectParams>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, AppError> {
    // axum answers a request that is not a WebSocket upgrade with plain text; every
    // error here is the documented JSON, and nothing is claimed or acked for it.
    let ws = ws.map_err(|rejection| {
        AppError::Malformed(format!(
            "{}: this route is a WebSocket (send the upgrade headers, subprotocol {SUBPROTOCOL}); plain HTTP clients use GET /v1/connect/sse or GET /v1/me/sync",
            rejection.body_text()
        ))
    })?;
    let start = open_session(&state, client_ip, &claims, &params.device_id, params.after).await?;
    let limits = &state.config.limits;
    let ws = ws
        .protocols([SUBPROTOCOL])
        .max_message_size(limits.max_ws_frame_bytes)
        .max_frame_size(limits.max_ws_frame_bytes)
        .read_buffer_size(limits.ws_read_buffer_bytes)
        .write_buffer_size(limits.ws_write_buffer_bytes)
        .max_write_buffer_size(limits.ws_max_write_buffer_bytes);
    let tracker = state.sessions.clone();
    Ok(ws
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "websocket upgrade failed"))
        .on_upgrade(move |socket| tracker.track_future(serve_session(state, start, socket))))
}

/// What every live transport (WebSocket, SSE) checks before it starts a session:
/// rate, shutdown, the device id, the token's device (`did`), ownership, the per-user
/// device cap; drops stored topics the token no longer allows; and the client's
/// cursor, which acks everything up to it. Returns where the session starts.
pub(super) async fn open_session(
    state: &AppState,
    client_ip: IpAddr,
    claims: &DeviceClaims,
    device_id: &str,
    after: Option<i64>,
) -> Result<SessionStart, AppError> {
    state
        .connect_limiter
        .check_ip(client_ip)
        .map_err(|retry_after_s| {
            tracing::debug!(%client_ip, device = %device_id, retry_after_s, "connect rate limited");
            AppError::RateLimited { retry_after_s }
        })?;
    if state.shutdown.is_cancelled() {
        return Err(AppError::Unavailable);
    }
    require_id("device_id", device_id)?;
    if after.is_some_and(|a| a < 0) {
        return Err(AppError::invalid("after", "must be 0 or more"));
    }
    check_bound(state, claims, device_id)?;
    let now = now_ms();
    let device = state
        .store
        .claim_device(device_id, &claims.sub, now, device_cap(state))
        .await?;
    let topics = TopicAccess::new(state.config.auth.topic_policy, claims);
    if state.config.auth.topic_policy == TopicPolicy::Claims {
        // The token may allow less than an earlier one did: what it no longer allows
        // is dropped, so a narrowed token is never outlived by its subscriptions.
        for topic in state.store.device_topics(&device.id).await? {
            if !topics.allows(&topic) {
                state.store.unsubscribe(&device.id, &topic).await?;
            }
        }
    }
    // A cursor above every seq this device was ever assigned belongs to an inbox that
    // no longer exists (device deleted, store restored from a backup). Trusting it
    // would ack entries never delivered and skip the next ones; the session resumes
    // from the gateway's own cursor instead, and the welcome's `last_seq` below the
    // client's cursor tells the client to reset (docs/protocol.md).
    let after = match after {
        Some(a) if a <= device.last_seq => a,
        _ => device.acked_seq,
    };
    if after > device.acked_seq {
        // The client holds everything up to `after`: that is an ack.
        state.store.ack(&device.id, after, now, false).await?;
    }
    Ok(SessionStart {
        device_id: device.id,
        after,
        // Read here, with the claim: the welcome must not depend on a second read
        // that could fail and report 0 ("device re-created" to the SDK).
        last_seq: device.last_seq,
        topics,
    })
}

/// One live session of a device over any transport, from registration to the
/// presence update after it ends. Replaces (kicks) the device's previous session,
/// whatever its transport.
pub(super) async fn serve_session<S, E>(state: AppState, start: SessionStart, socket: S)
where
    S: futures_util::Stream<Item = Result<axum::extract::ws::Message, E>>
        + futures_util::Sink<axum::extract::ws::Message>
        + Unpin,
    E: std::error::Error + 'static,
{
    let device_id = start.device_id.clone();
    let inbox = state.registry.register(&device_id);
    let session_id = inbox.session_id;
    // Reachable from other nodes before the replay reads the store.
    let _presence = match state.registry.current(&device_id, session_id) {
        Some(handle) => Some(Box::pin(state.router.cluster.attach(&device_id, handle)).await),
        None => None, // already replaced by a newer session of the device
    };
    state.metrics.connections.inc();
    state.metrics.connections_total.inc();
    let reason = run_session(
        socket,
        start,
        inbox,
        &state.router,
        &state.session_cfg,
        state.shutdown.clone(),
    )
    .await;
    state.registry.deregister(&device_id, session_id);
    state.metrics.connections.dec();
    state
        .metrics
        .sessions_closed
        .with_label_values(&[reason.label()])
        .inc();
    let _ = state.store.touch_device(&device_id, now_ms()).await;
    tracing::debug!(device = %device_id, reason = reason.label(), "session closed");
}

pub async fn register_device(
    State(state): State<AppState>,
    DeviceAuth(claims): DeviceAuth,
    ApiPath(device_id): ApiPath<String>,
    ApiJson(req): ApiJson<RegisterDeviceRequest>,
) -> Result<Json<DeviceInfo>, AppError> {
    require_id("device_id", &device_id)?;
    check_bound(&state, &claims, &device_id)?;
    match (&req.push_provider, &req.push_token) {
        (Some(_), None) => {
            return Err(AppError::invalid(
                "push_token",
                "is required with push_provider",
            ))
        }
        (None, Some(_)) => {
            return Err(AppError::invalid(
                "push_provider",
                "is required with push_token",
            ))
        }
        _ => {}
    }
    if let Some(t) = &req.push_token {
        if t.is_empty() || t.len() > 4096 || t.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(AppError::invalid(
                "push_token",
                "must be 1 to 4096 characters without spaces",
            ));
        }
    }
    if req.apns_environment.is_some()
        && req.push_provider != Some(herald_protocol::PushProviderKind::Apns)
    {
        return Err(AppError::invalid(
            "apns_environment",
            "only applies to push_provider apns",
        ));
    }
    let device = state
        .store
        .register_device(&device_id, &claims.sub, &req, now_ms(), device_cap(&state))
        .await?;
    Ok(Json(device.to_wire(state.is_online(&device_id).await)))
}

/// `DELETE /v1/me/devices/{device_id}/push_token`: the app logs out or switches
/// account, so this installation must get no more pushes. The device, its inbox and
/// cursor stay (a service deletes devices with `DELETE /v1/devices/{id}`). Idempotent.
pub async fn remove_push_token(
    State(state): State<AppState>,
    DeviceAuth(claims): DeviceAuth,
    ApiPath(device_id): ApiPath<String>,
) -> Result<StatusCode, AppError> {
    require_id("device_id", &device_id)?;
    check_bound(&state, &claims, &device_id)?;
    let Some(device) = state.store.device(&device_id).await? else {
        return Err(AppError::NotFound(format!("no device {device_id}")));
    };
    if device.user_id != claims.sub {
        return Err(crate::store::StoreError::DeviceOwnedByOtherUser(device_id).into());
    }
    // A token can only have been registered together with a platform.
    if let (Some(platform), Some(_)) = (device.platform, &device.push_token) {
        let req = RegisterDeviceRequest {
            platform,
            push_provider: None,
            push_token: None,
            apns_environment: None,
        };
        state
            .store
            .register_device(&device_id, &claims.sub, &req, now_ms(), device_cap(&state))
            .await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncParams {
    pub device_id: String,
    #[serde(default)]
    pub after: i64,
    pub limit: Option<u32>,
    /// Long-poll: seconds to hold the request when nothing is waiting.
    pub wait: Option<u64>,
}

/// The longest a long-poll (`GET /v1/me/sync?wait=S`) is held.
pub const MAX_SYNC_WAIT_S: u64 = 60;

/// The device must exist, belong to the caller and be the token's device.
async fn owned_device(
    state: &AppState,
    claims: &DeviceClaims,
    device_id: &str,
) -> Result<Device, AppError> {
    require_id("device_id", device_id)?;
    check_bound(state, claims, device_id)?;
    let user = claims.sub.as_str();
    let device = state.store.device(device_id).await?.ok_or_else(|| {
        AppError::NotFound(format!(
            "no device {device_id}; connect or register it first"
        ))
    })?;
    if device.user_id != user {
        return Err(AppError::Forbidden(format!(
            "device {device_id} belongs to another user"
        )));
    }
    Ok(device)
}

pub async fn sync(
    State(state): State<AppState>,
    DeviceAuth(claims): DeviceAuth,
    ApiQuery(params): ApiQuery<SyncParams>,
) -> Result<impl IntoResponse, AppError> {
    let device = owned_device(&state, &claims, &params.device_id).await?;
    let max = state.config.delivery.replay_batch;
    let limit = params.limit.unwrap_or(100);
    if limit == 0 || limit > max {
        return Err(AppError::invalid(
            "limit",
            format!("must be between 1 and {max}"),
        ));
    }
    if params.after < 0 {
        return Err(AppError::invalid("after", "must be 0 or more"));
    }
    let wait = params.wait.unwrap_or(0);
    if wait > MAX_SYNC_WAIT_S {
        return Err(AppError::invalid(
            "wait",
            format!("must be at most {MAX_SYNC_WAIT_S} seconds"),
        ));
    }
    // Not a cursor above last_seq: that one is from another inbox (see open_session).
    if wait > 0 && params.after > device.acked_seq && params.after <= device.last_seq {
        // A long-poll client loops with its cursor, so `after` acknowledges what it
        // already has, as on the WebSocket; otherwise an entry it holds but never
        // acked would be offered to every following poll instead of being pushed.
        state
            .store
            .ack(&device.id, params.after, now_ms(), false)
            .await?;
    }
    let mut entries = state
        .store
        .fetch_after(&device.id, params.after, limit + 1, now_ms())
        .await?;
    if entries.is_empty() && wait > 0 {
        entries = hold_for_entries(&state, &device.id, params.after, limit + 1, wait).await?;
    }
    let has_more = entries.len() > limit as usize;
    // `SyncResponse`, written by hand so each message's `data` goes out verbatim.
    let mut body = String::from(r#"{"messages":["#);
    for (i, e) in entries.iter().take(limit as usize).enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&e.sync_item());
    }
    body.push_str(&format!(
        r#"],"has_more":{has_more},"last_seq":{}}}"#,
        device.last_seq.max(entries.last().map_or(0, |e| e.seq))
    ));
    Ok(([(header::CONTENT_TYPE, "application/json")], body))
}

/// A long-poll: while held, the request is the device's live session (it replaces a
/// WebSocket or SSE session, makes the device online, and is offered new entries), so
/// what it returns counts as sent and falls back to push if not acked in time, exactly
/// like a live delivery.
async fn hold_for_entries(
    state: &AppState,
    device_id: &str,
    after: i64,
    limit: u32,
    wait_s: u64,
) -> Result<Vec<crate::store::InboxEntry>, AppError> {
    use crate::registry::SessionEvent;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait_s);
    let mut inbox = state.registry.register(device_id);
    let session_id = inbox.session_id;
    let _presence = match state.registry.current(device_id, session_id) {
        Some(handle) => Some(Box::pin(state.router.cluster.attach(device_id, handle)).await),
        None => None,
    };
    let kill = inbox.kill.clone();
    // Registered first, read second: an entry committed in between is either in the
    // store read or announced on the queue, never neither.
    let result = loop {
        let entries = match state
            .store
            .fetch_after(device_id, after, limit, now_ms())
            .await
        {
            Ok(e) => e,
            Err(e) => break Err(AppError::from(e)),
        };
        if let Some(last) = entries.last() {
            inbox.progress.wrote(last.seq);
            break Ok(entries);
        }
        tokio::select! {
            event = inbox.events.recv() => match event {
                Some(SessionEvent::Deliver(d)) => {
                    inbox.queued.release(d.2);
                    state.metrics.session_queue_depth.dec();
                }
                Some(_) => {}
                None => break Ok(Vec::new()),
            },
            // Also cancelled by shutdown: `kill` is a child of the server's token.
            _ = kill.cancelled() => break Ok(Vec::new()),
            _ = tokio::time::sleep_until(deadline) => break Ok(Vec::new()),
        }
    };
    state.registry.deregister(device_id, session_id);
    inbox.events.close();
    while let Ok(event) = inbox.events.try_recv() {
        if matches!(event, SessionEvent::Deliver(..)) {
            state.metrics.session_queue_depth.dec();
        }
    }
    let _ = state.store.touch_device(device_id, now_ms()).await;
    if let Ok(entries) = &result {
        if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
            state
                .router
                .sent
                .record(device_id, first.seq, last.seq, None);
        }
    }
    result
}

pub async fn ack(
    State(state): State<AppState>,
    DeviceAuth(claims): DeviceAuth,
    ApiJson(req): ApiJson<AckRequest>,
) -> Result<Json<AckResponse>, AppError> {
    let device = owned_device(&state, &claims, &req.device_id).await?;
    if req.seq < 0 {
        return Err(AppError::invalid("seq", "must be 0 or more"));
    }
    if req.seq > device.last_seq {
        return Err(AppError::invalid(
            "seq",
            format!("is beyond the last assigned seq {}", device.last_seq),
        ));
    }
    let acked_seq = state
        .store
        .ack(&device.id, req.seq, now_ms(), false)
        .await?;
    // A live session must not push (after its ack timeout) what was acked here.
    if let Some(session) = state.registry.get(&device.id) {
        let _ = session
            .events
            .try_send(crate::registry::SessionEvent::AckedElsewhere(acked_seq));
    } else {
        state.router.cluster.acked(&device.id, acked_seq).await;
    }
    Ok(Json(AckResponse { acked_seq }))
}
