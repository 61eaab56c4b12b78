//! Prometheus metrics, exposed on `GET /metrics`.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub connections: IntGauge,
    pub connections_total: IntCounter,
    pub published: IntCounter,
    pub inbox_entries: IntCounter,
    pub delivered_live: IntCounter,
    pub replayed: IntCounter,
    pub acked: IntCounter,
    pub pushes: IntCounterVec,
    pub sessions_closed: IntCounterVec,
    pub publish_to_deliver: Histogram,
    pub session_queue_depth: IntGauge,
    pub push_queue_depth: IntGauge,
    pub cluster_routes: IntCounterVec,
    pub due_offered_live: IntCounter,
    pub http_connections: IntGauge,
    pub connections_refused: IntCounterVec,
    /// `http_request_duration_seconds{route,method,status}`: `route` is the matched
    /// route template (`/v1/devices/{id}`), `unmatched` for a 404 of the router.
    pub http_requests: HistogramVec,
    /// `store_op_duration_seconds{op}` around the store's hot calls.
    pub store_ops: HistogramVec,
    /// `push_queue_lag_seconds`: from a push becoming due on this node (queued by the
    /// router, or taken due from the store by the poller) to a worker claiming it.
    pub push_queue_lag: Histogram,
    pub webhook_queue_lag: Gauge,
    pub webhook_queue_depth: IntGauge,
    pub webhook_posts: IntCounterVec,
    pub webhook_events_dropped: IntCounter,
}

/// The `op` values of `store_op_duration_seconds` (`store::timed::TimedStore`).
pub const STORE_OPS: [&str; 8] = [
    "publish",
    "publish_batch",
    "fetch",
    "ack",
    "mark_sent",
    "claim",
    "take_due",
    "record_push_results",
];

/// Latency buckets (seconds) shared by the HTTP and store histograms.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("herald".into()), None).expect("registry");
        let connections = IntGauge::new("connections", "Live WebSocket sessions").unwrap();
        let connections_total =
            IntCounter::new("connections_total", "WebSocket sessions opened").unwrap();
        let published = IntCounter::new("published_total", "Messages accepted (202)").unwrap();
        let inbox_entries =
            IntCounter::new("inbox_entries_total", "Inbox entries created by publishes").unwrap();
        let delivered_live = IntCounter::new(
            "delivered_live_total",
            "Inbox entries written to a live session as they were published",
        )
        .unwrap();
        let replayed = IntCounter::new(
            "replayed_total",
            "Inbox entries sent from the store (catch-up on connect or gap fill)",
        )
        .unwrap();
        let acked = IntCounter::new("acked_total", "Inbox entries acknowledged").unwrap();
        let pushes = IntCounterVec::new(
            Opts::new("pushes_total", "Push attempts by provider and outcome"),
            &["provider", "outcome"],
        )
        .unwrap();
        let sessions_closed = IntCounterVec::new(
            Opts::new(
                "sessions_closed_total",
                "WebSocket sessions closed, by reason",
            ),
            &["reason"],
        )
        .unwrap();
        let publish_to_deliver = Histogram::with_opts(
            HistogramOpts::new(
                "publish_to_deliver_seconds",
                "Time from publish commit to the live frame being written",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )
        .unwrap();
        let session_queue_depth = IntGauge::new(
            "session_queue_depth",
            "Frames waiting in session send queues, summed",
        )
        .unwrap();
        let push_queue_depth =
            IntGauge::new("push_queue_depth", "Pushes waiting for a worker").unwrap();
        let cluster_routes = IntCounterVec::new(
            Opts::new(
                "cluster_routes_total",
                "Inbox entries sent to other nodes over NATS, by outcome (live: a session took it; offline: no node has the device; error: NATS failed or timed out)",
            ),
            &["outcome"],
        )
        .unwrap();
        let due_offered_live = IntCounter::new(
            "due_offered_live_total",
            "Fallback entries a live session took when their push came due (it never had them: their doorbell was lost)",
        )
        .unwrap();
        let http_connections = IntGauge::new(
            "http_connections",
            "Open TCP connections, WebSockets included (capped by limits.max_connections)",
        )
        .unwrap();
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "connections_refused_total",
                "TCP connections refused with 503, by the cap they hit (max_connections, max_connections_per_ip)",
            ),
            &["cap"],
        )
        .unwrap();
        let http_requests = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "HTTP requests by route template, method and status: time to the response head",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "method", "status"],
        )
        .unwrap();
        let store_ops = HistogramVec::new(
            HistogramOpts::new(
                "store_op_duration_seconds",
                "Store calls on the hot path, by operation (publish: the durable commit, group commit included)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["op"],
        )
        .unwrap();
        let push_queue_lag = Histogram::with_opts(
            HistogramOpts::new(
                "push_queue_lag_seconds",
                "Time from a push becoming due on this node (queued at publish, or taken due from the store) to a worker claiming it",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
        )
        .unwrap();
        let webhook_queue_lag = Gauge::new(
            "webhook_queue_lag_seconds",
            "Age of the oldest webhook event not yet delivered (0 when the queue is empty); updated each second by a node whose webhooks are on",
        )
        .unwrap();
        let webhook_queue_depth = IntGauge::new(
            "webhook_queue_depth",
            "Webhook events queued in the store, not yet delivered",
        )
        .unwrap();
        let webhook_posts = IntCounterVec::new(
            Opts::new(
                "webhook_posts_total",
                "Webhook batch POSTs by result (ok: 2xx, events deleted; retry: failed, events due again after a backoff; dropped: failed and events older than webhooks.max_age_hours were dropped)",
            ),
            &["result"],
        )
        .unwrap();
        let webhook_events_dropped = IntCounter::new(
            "webhook_events_dropped_total",
            "Webhook events dropped undelivered after webhooks.max_age_hours",
        )
        .unwrap();
        for result in ["ok", "retry", "dropped"] {
            webhook_posts.with_label_values(&[result]);
        }
        for c in [
            Box::new(connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_connections.clone()),
            Box::new(connections_refused.clone()),
            Box::new(connections_total.clone()),
            Box::new(published.clone()),
            Box::new(inbox_entries.clone()),
            Box::new(delivered_live.clone()),
            Box::new(replayed.clone()),
            Box::new(acked.clone()),
            Box::new(pushes.clone()),
            Box::new(sessions_closed.clone()),
            Box::new(publish_to_deliver.clone()),
            Box::new(session_queue_depth.clone()),
            Box::new(push_queue_depth.clone()),
            Box::new(cluster_routes.clone()),
            Box::new(due_offered_live.clone()),
            Box::new(http_requests.clone()),
            Box::new(store_ops.clone()),
            Box::new(push_queue_lag.clone()),
            Box::new(webhook_queue_lag.clone()),
            Box::new(webhook_queue_depth.clone()),
            Box::new(webhook_posts.clone()),
            Box::new(webhook_events_dropped.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        // Series with known label values exist from the start (at 0), so rates and
        // alerts see them before the first event.
        for op in STORE_OPS {
            store_ops.with_label_values(&[op]);
        }
        for outcome in ["live", "offline", "error"] {
            cluster_routes.with_label_values(&[outcome]);
        }
        for cap in ["max_connections", "max_connections_per_ip"] {
            connections_refused.with_label_values(&[cap]);
        }
        Metrics {
            registry,
            connections,
            connections_total,
            published,
            inbox_entries,
            delivered_live,
            replayed,
            acked,
            pushes,
            sessions_closed,
            publish_to_deliver,
            session_queue_depth,
            push_queue_depth,
            cluster_routes,
            due_offered_live,
            http_connections,
            connections_refused,
            http_requests,
            store_ops,
            push_queue_lag,
            webhook_queue_lag,
            webhook_queue_depth,
            webhook_posts,
            webhook_events_dropped,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("utf8 metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
