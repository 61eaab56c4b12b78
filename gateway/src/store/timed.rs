//! `TimedStore`: any `Store`, with the latency of its hot calls observed in
//! `herald_store_op_duration_seconds{op}`. Every other call passes straight through.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use herald_protocol::RegisterDeviceRequest;
use prometheus::HistogramVec;

use super::{
    ApiKeyRecord, DeliveryRow, Device, InboxEntry, NewMessage, PublishOutcome, PushMark,
    PushResult, Store, StoreResult, StoredMessage,
};

pub struct TimedStore {
    inner: Arc<dyn Store>,
    ops: HistogramVec,
}

impl TimedStore {
    pub fn new(inner: Arc<dyn Store>, ops: HistogramVec) -> TimedStore {
        TimedStore { inner, ops }
    }

    async fn timed<T>(&self, op: &str, call: impl std::future::Future<Output = T>) -> T {
        let started = Instant::now();
        let out = call.await;
        self.ops
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        out
    }
}

#[async_trait]
impl Store for TimedStore {
    async fn setting(&self, key: &str) -> StoreResult<Option<String>> {
        self.inner.setting(key).await
    }
    async fn init_setting(&self, key: &str, value: &str) -> StoreResult<String> {
        self.inner.init_setting(key, value).await
    }
    async fn create_api_key(&self, key: &ApiKeyRecord) -> StoreResult<()> {
        self.inner.create_api_key(key).await
    }
    async fn api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        self.inner.api_keys().await
    }
    async fn revoke_api_key(&self, id_or_prefix: &str, now: i64) -> StoreResult<u64> {
        self.inner.revoke_api_key(id_or_prefix, now).await
    }
    async fn api_key_by_hash(&self, hash: &[u8]) -> StoreResult<Option<ApiKeyRecord>> {
        self.inner.api_key_by_hash(hash).await
    }
    async fn claim_device(
        &self,
        device_id: &str,
        user: &str,
        now: i64,
        max_devices: u64,
    ) -> StoreResult<Device> {
        self.inner
            .claim_device(device_id, user, now, max_devices)
            .await
    }
    async fn register_device(
        &self,
        device_id: &str,
        user: &str,
        req: &RegisterDeviceRequest,
        now: i64,
        max_devices: u64,
    ) -> StoreResult<Device> {
        self.inner
            .register_device(device_id, user, req, now, max_devices)
            .await
    }
    async fn device(&self, device_id: &str) -> StoreResult<Option<Device>> {
        self.inner.device(device_id).await
    }
    async fn user_devices(&self, user: &str) -> StoreResult<Vec<Device>> {
        self.inner.user_devices(user).await
    }
    async fn delete_device(&self, device_id: &str) -> StoreResult<bool> {
        self.inner.delete_device(device_id).await
    }
    async fn touch_device(&self, device_id: &str, now: i64) -> StoreResult<()> {
        self.inner.touch_device(device_id, now).await
    }
    async fn invalidate_push_token(
        &self,
        device_id: &str,
        token: &str,
        reason: &str,
    ) -> StoreResult<()> {
        self.inner
            .invalidate_push_token(device_id, token, reason)
            .await
    }
    async fn subscribe(&self, device_id: &str, topic: &str) -> StoreResult<()> {
        self.inner.subscribe(device_id, topic).await
    }
    async fn unsubscribe(&self, device_id: &str, topic: &str) -> StoreResult<()> {
        self.inner.unsubscribe(device_id, topic).await
    }
    async fn device_topics(&self, device_id: &str) -> StoreResult<Vec<String>> {
        self.inner.device_topics(device_id).await
    }
    async fn revoke_user_tokens(&self, user: &str, before: i64) -> StoreResult<()> {
        self.inner.revoke_user_tokens(user, before).await
    }
    async fn tokens_revoked_before(&self, user: &str) -> StoreResult<Option<i64>> {
        self.inner.tokens_revoked_before(user).await
    }
    async fn publish(&self, msg: NewMessage) -> StoreResult<PublishOutcome> {
        self.timed("publish", self.inner.publish(msg)).await
    }
    async fn publish_batch(
        &self,
        msgs: Vec<NewMessage>,
    ) -> StoreResult<Vec<StoreResult<PublishOutcome>>> {
        self.timed("publish_batch", self.inner.publish_batch(msgs))
            .await
    }
    async fn fetch_after(
        &self,
        device_id: &str,
        after: i64,
        limit: u32,
        now: i64,
    ) -> StoreResult<Vec<InboxEntry>> {
        self.timed(
            "fetch",
            self.inner.fetch_after(device_id, after, limit, now),
        )
        .await
    }
    async fn ack(&self, device_id: &str, seq: i64, now: i64, wrote_live: bool) -> StoreResult<i64> {
        self.timed("ack", self.inner.ack(device_id, seq, now, wrote_live))
            .await
    }
    async fn mark_sent(&self, ranges: &[(String, i64, i64)], now: i64) -> StoreResult<()> {
        self.timed("mark_sent", self.inner.mark_sent(ranges, now))
            .await
    }
    async fn claim_push(&self, device_id: &str, seq: i64, now: i64) -> StoreResult<bool> {
        self.timed("claim", self.inner.claim_push(device_id, seq, now))
            .await
    }
    async fn retry_push(
        &self,
        device_id: &str,
        seq: i64,
        due_at: i64,
        reason: &str,
    ) -> StoreResult<()> {
        self.inner.retry_push(device_id, seq, due_at, reason).await
    }
    async fn take_due_pushes(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> StoreResult<Vec<InboxEntry>> {
        self.timed(
            "take_due",
            self.inner.take_due_pushes(now, lease_until, limit),
        )
        .await
    }
    async fn fail_orphaned_pushes(&self, stale_before: i64, now: i64) -> StoreResult<u64> {
        self.inner.fail_orphaned_pushes(stale_before, now).await
    }
    async fn finish_push(
        &self,
        device_id: &str,
        seq: i64,
        mark: PushMark,
        provider: Option<&str>,
        reason: Option<&str>,
        now: i64,
    ) -> StoreResult<()> {
        self.inner
            .finish_push(device_id, seq, mark, provider, reason, now)
            .await
    }
    async fn claim_pushes(&self, items: &[(String, i64)], now: i64) -> StoreResult<Vec<bool>> {
        self.timed("claim", self.inner.claim_pushes(items, now))
            .await
    }
    async fn record_push_results(&self, results: &[PushResult], now: i64) -> StoreResult<()> {
        self.timed(
            "record_push_results",
            self.inner.record_push_results(results, now),
        )
        .await
    }
    async fn message(&self, id: &str) -> StoreResult<Option<(StoredMessage, Vec<DeliveryRow>)>> {
        self.inner.message(id).await
    }
    async fn sweep(&self, now: i64, retention_ms: i64) -> StoreResult<u64> {
        self.inner.sweep(now, retention_ms).await
    }
    async fn webhook_due(&self, now: i64, limit: u32) -> StoreResult<(u64, Option<i64>)> {
        self.inner.webhook_due(now, limit).await
    }
    async fn webhook_claim(
        &self,
        now: i64,
        lease_until: i64,
        limit: u32,
    ) -> StoreResult<Vec<crate::webhooks::QueuedEvent>> {
        self.inner.webhook_claim(now, lease_until, limit).await
    }
    async fn webhook_delete(&self, queue_ids: &[i64]) -> StoreResult<()> {
        self.inner.webhook_delete(queue_ids).await
    }
    async fn webhook_retry(&self, items: &[(i64, i64)]) -> StoreResult<()> {
        self.inner.webhook_retry(items).await
    }
    async fn webhook_queue_stats(&self) -> StoreResult<(u64, Option<i64>)> {
        self.inner.webhook_queue_stats().await
    }
    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }
}
