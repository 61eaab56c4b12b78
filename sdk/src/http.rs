//! The device-side REST calls (`/v1/me/...`), with the token retry rule: one 401
//! invalidates the token and retries once with a fresh one; a second 401 is final.

use std::sync::Arc;
use std::time::Duration;

use herald_protocol::{AckRequest, AckResponse, DeviceInfo, RegisterDeviceRequest, SyncResponse};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use url::Url;

use crate::token::Tokens;
use crate::Error;

pub(crate) struct Api {
    http: reqwest::Client,
    base: Url,
    device_id: String,
    tokens: Arc<Tokens>,
    timeout: Duration,
}

/// Page size of `GET /v1/me/sync`.
pub(crate) const SYNC_PAGE: u32 = 100;

fn net_error(e: reqwest::Error) -> Error {
    if e.is_timeout() {
        Error::Timeout(e.to_string())
    } else if let Some(refused) = crate::tls::certificate_error(&e) {
        if refused == crate::tls::NOT_INITIALIZED {
            Error::InvalidConfig(refused)
        } else {
            Error::Certificate(refused)
        }
    } else {
        Error::Network(e.to_string())
    }
}

impl Api {
    pub fn new(
        base: Url,
        device_id: String,
        tokens: Arc<Tokens>,
        timeout: Duration,
        tls: Option<&rustls::ClientConfig>,
    ) -> Result<Api, Error> {
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout);
        if let Some(tls) = tls {
            // The same verification as the WebSocket (`crate::tls`).
            builder = builder.use_preconfigured_tls(tls.clone());
        }
        let http = builder
            .build()
            .map_err(|e| Error::InvalidConfig(e.to_string()))?;
        Ok(Api {
            http,
            base,
            device_id,
            tokens,
            timeout,
        })
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("http base url")
            .pop_if_empty()
            .extend(segments);
        url
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<&B>,
    ) -> Result<T, Error> {
        self.call_timed(method, url, body, None).await
    }

    /// [`call`](Self::call) with this request's own time limit (a held long-poll).
    async fn call_timed<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<&B>,
        timeout: Option<Duration>,
    ) -> Result<T, Error> {
        let mut rejected = false;
        loop {
            let token = self.tokens.get().await?;
            let mut req = self
                .http
                .request(method.clone(), url.clone())
                .bearer_auth(&token.value);
            if let Some(b) = body {
                req = req.json(b);
            }
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            let resp = req.send().await.map_err(net_error)?;
            let status = resp.status();
            if status.is_success() {
                let bytes = resp.bytes().await.map_err(net_error)?;
                // 204 No Content reads as JSON `null`.
                let body: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
                return serde_json::from_slice::<T>(body)
                    .map_err(|e| Error::Protocol(format!("unexpected answer from {url}: {e}")));
            }
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let bytes = resp.bytes().await.unwrap_or_default();
            if status == StatusCode::UNAUTHORIZED && !rejected {
                rejected = true;
                self.tokens.invalidate(&token.value).await;
                continue;
            }
            return Err(crate::error::from_status(
                status.as_u16(),
                &bytes,
                retry_after,
            ));
        }
    }

    /// `PUT /v1/me/devices/{device_id}`.
    pub async fn register_device(&self, req: &RegisterDeviceRequest) -> Result<DeviceInfo, Error> {
        let url = self.url(&["v1", "me", "devices", &self.device_id]);
        self.call(Method::PUT, url, Some(req)).await
    }

    /// One page of `GET /v1/me/sync`.
    pub async fn sync_page(&self, after: i64, limit: u32) -> Result<SyncResponse, Error> {
        let mut url = self.url(&["v1", "me", "sync"]);
        url.query_pairs_mut()
            .append_pair("device_id", &self.device_id)
            .append_pair("after", &after.to_string())
            .append_pair("limit", &limit.to_string());
        self.call::<(), _>(Method::GET, url, None).await
    }

    /// `GET /v1/me/sync?wait=S` (long-poll): answers at once when entries exist,
    /// else when one arrives or `wait` passes. Its `after` acknowledges (when `wait` > 0).
    pub async fn long_poll(&self, after: i64, wait: Duration) -> Result<SyncResponse, Error> {
        let mut url = self.url(&["v1", "me", "sync"]);
        url.query_pairs_mut()
            .append_pair("device_id", &self.device_id)
            .append_pair("after", &after.to_string())
            .append_pair("limit", &SYNC_PAGE.to_string())
            .append_pair("wait", &wait.as_secs().to_string());
        let limit = wait + self.timeout;
        self.call_timed::<(), _>(Method::GET, url, None, Some(limit))
            .await
    }

    /// `GET /healthz` answered (any status): plain HTTP reaches the gateway.
    pub async fn reachable(&self) -> bool {
        let url = self.url(&["healthz"]);
        self.http.get(url).send().await.is_ok()
    }

    /// Everything after `after`, following `has_more` up to `max_pages` pages.
    pub async fn sync_all(
        &self,
        mut after: i64,
        max_pages: u32,
    ) -> Result<Vec<herald_protocol::InboxMessage>, Error> {
        let mut out = Vec::new();
        for _ in 0..max_pages.max(1) {
            let page = self.sync_page(after, SYNC_PAGE).await?;
            let more = page.has_more && !page.messages.is_empty();
            if let Some(last) = page.messages.last() {
                after = last.seq;
            }
            out.extend(page.messages);
            if !more {
                break;
            }
        }
        Ok(out)
    }

    /// `DELETE /v1/me/devices/{device_id}/push_token` (404: no such device, so no
    /// token either).
    pub async fn remove_push_token(&self) -> Result<(), Error> {
        let url = self.url(&["v1", "me", "devices", &self.device_id, "push_token"]);
        match self
            .call::<(), serde::de::IgnoredAny>(Method::DELETE, url, None)
            .await
        {
            Ok(_) | Err(Error::DeviceNotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `POST /v1/me/ack`.
    pub async fn ack(&self, seq: i64) -> Result<AckResponse, Error> {
        let url = self.url(&["v1", "me", "ack"]);
        let body = AckRequest {
            device_id: self.device_id.clone(),
            seq,
        };
        self.call(Method::POST, url, Some(&body)).await
    }
}
