//! Device routes (device JWT): connect, register a push token, sync, ack.

use std::net::SocketAddr;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Path, State};
use axum::response::Response;
use axum::Json;
use herald_protocol::{
    AckRequest, AckResponse, DeviceInfo, RegisterDeviceRequest, SyncResponse, SUBPROTOCOL,
};
use serde::Deserialize;

use super::{require_id, ApiJson, ApiQuery, AppState, DeviceAuth};
use crate::clock::now_ms;
use crate::error::AppError;
use crate::session::run_session;
use crate::store::Device;

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
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    DeviceAuth(claims): DeviceAuth,
    ApiQuery(params): ApiQuery<ConnectParams>,
    ws: WebSocketUpgrade,
) -> Result<Response, AppError> {
    state
        .connect_limiter
        .check_ip(peer.ip())
        .map_err(|retry_after_s| AppError::RateLimited { retry_after_s })?;
    if state.shutdown.is_cancelled() {
        return Err(AppError::Unavailable);
    }
    require_id("device_id", &params.device_id)?;
    if params.after.is_some_and(|a| a < 0) {
        return Err(AppError::invalid("after", "must be 0 or more"));
    }
    let now = now_ms();
    let device = state
        .store
        .claim_device(&params.device_id, &claims.sub, now)
        .await?;
    let after = params.after.unwrap_or(device.acked_seq);
    if after > device.acked_seq {
        // The client holds everything up to `after`: that is an ack.
        state.store.ack(&device.id, after, now).await?;
    }
    let limits = &state.config.limits;
    let ws = ws
        .protocols([SUBPROTOCOL])
        .max_message_size(limits.max_ws_frame_bytes)
        .max_frame_size(limits.max_ws_frame_bytes)
        .read_buffer_size(limits.ws_read_buffer_bytes)
        .write_buffer_size(limits.ws_write_buffer_bytes)
        .max_write_buffer_size(limits.ws_max_write_buffer_bytes);
    let device_id = device.id;
    let tracker = state.sessions.clone();
    Ok(ws
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "websocket upgrade failed"))
        .on_upgrade(move |socket| {
            tracker.track_future(async move {
                let inbox = state.registry.register(&device_id);
                let session_id = inbox.session_id;
                // Reachable from other nodes before the replay reads the store.
                let _presence = match state.registry.current(&device_id, session_id) {
                    Some(handle) => {
                        Some(Box::pin(state.router.cluster.attach(&device_id, handle)).await)
                    }
                    None => None, // already replaced by a newer session of the device
                };
                state.metrics.connections.inc();
                state.metrics.connections_total.inc();
                let reason = run_session(
                    socket,
                    device_id.clone(),
                    after,
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
            })
        }))
}

pub async fn register_device(
    State(state): State<AppState>,
    DeviceAuth(claims): DeviceAuth,
    Path(device_id): Path<String>,
    ApiJson(req): ApiJson<RegisterDeviceRequest>,
) -> Result<Json<DeviceInfo>, AppError> {
    require_id("device_id", &device_id)?;
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
        .register_device(&device_id, &claims.sub, &req, now_ms())
        .await?;
    Ok(Json(device.to_wire(state.is_online(&device_id).await)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncParams {
    pub device_id: String,
    #[serde(default)]
    pub after: i64,
    pub limit: Option<u32>,
}

/// The device must exist and belong to the caller.
async fn owned_device(state: &AppState, user: &str, device_id: &str) -> Result<Device, AppError> {
    require_id("device_id", device_id)?;
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
) -> Result<Json<SyncResponse>, AppError> {
    let device = owned_device(&state, &claims.sub, &params.device_id).await?;
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
    let entries = state
        .store
        .fetch_after(&device.id, params.after, limit + 1, now_ms())
        .await?;
    let has_more = entries.len() > limit as usize;
    Ok(Json(SyncResponse {
        messages: entries
            .iter()
            .take(limit as usize)
            .map(|e| e.to_wire())
            .collect(),
        has_more,
        last_seq: device.last_seq,
    }))
}

pub async fn ack(
    State(state): State<AppState>,
    DeviceAuth(claims): DeviceAuth,
    ApiJson(req): ApiJson<AckRequest>,
) -> Result<Json<AckResponse>, AppError> {
    let device = owned_device(&state, &claims.sub, &req.device_id).await?;
    if req.seq < 0 {
        return Err(AppError::invalid("seq", "must be 0 or more"));
    }
    if req.seq > device.last_seq {
        return Err(AppError::invalid(
            "seq",
            format!("is beyond the last assigned seq {}", device.last_seq),
        ));
    }
    let acked_seq = state.store.ack(&device.id, req.seq, now_ms()).await?;
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
