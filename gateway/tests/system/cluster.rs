//! Cluster mode, black box: several real `herald` processes sharing one PostgreSQL
//! database and one NATS server, a real FCM HTTP v1 mock, real WebSockets.
//!
//! NATS: the machine's (`nats://127.0.0.1:4222`, or `HERALD_TEST_NATS_URL`), with a
//! subject prefix of its own per test; the NATS-restart test runs a `nats-server` of
//! its own. PostgreSQL: a fresh database per test (see `common::pg`). Missing services
//! fail the tests (never skip): `scripts/ensure-services.sh` starts them.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::fcm_mock::MockFcm;
use common::pg::PgDb;
use common::process::{toml_string, HeraldProcess};
use common::{connect_with_token, Device};
use herald_gateway::testing::TempDir;
use herald_protocol::ServerFrame;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Generous: three processes and their databases share two cores with other tests.
const SLOW_WAIT: Duration = Duration::from_secs(30);

fn machine_nats_url() -> String {
    std::env::var("HERALD_TEST_NATS_URL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into())
}

/// N gateway nodes on one fresh database and one NATS, pushing to one FCM mock.
struct Cluster {
    db: PgDb,
    nodes: Vec<HeraldProcess>,
    dirs: Vec<TempDir>,
    config: PathBuf,
    api_key: String,
    fcm: MockFcm,
    http: reqwest::Client,
}

impl Cluster {
    /// `database_url` overrides the fresh database's URL (e.g. through a proxy).
    async fn start(n: usize, nats_url: &str, extra_toml: &str) -> Cluster {
        Cluster::start_via(n, nats_url, extra_toml, None, "").await
    }

    async fn start_via(
        n: usize,
        nats_url: &str,
        extra_toml: &str,
        database_url: Option<&dyn Fn(&str) -> String>,
        nats_toml: &str,
    ) -> Cluster {
        let db = PgDb::create().await;
        let fcm = MockFcm::start(3600).await;
        let fcm_cfg = fcm.config();
        let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let url = database_url.map_or_else(|| db.url.clone(), |f| f(&db.url));
        let config_dir = TempDir::new("herald-cluster-cfg");
        let config = config_dir.0.join("herald.toml");
        std::fs::write(
            &config,
            format!(
                "store = \"postgres\"\ndatabase_url = {url}\nbus = \"nats\"\n\
                 [nats]\nurl = {nats}\nsubject_prefix = {prefix}\nrequest_timeout_ms = 1000\n{nats_toml}\n\
                 [limits]\npublish_rate_per_key = 100000\npublish_burst_per_key = 100000\n\
                 [push]\npoll_interval_ms = 100\nbase_backoff_ms = 50\nstale_claim_ms = 3000\n\
                 [push.fcm]\nservice_account_json = {account}\nbase_url = {base}\ntimeout_ms = 2000\n\
                 {extra_toml}",
                url = toml_string(&url),
                nats = toml_string(nats_url),
                prefix = toml_string(&prefix),
                account = toml_string(fcm_cfg.service_account_json.as_deref().unwrap()),
                base = toml_string(fcm_cfg.base_url.as_deref().unwrap()),
            ),
        )
        .unwrap();
        let mut cluster = Cluster {
            db,
            nodes: Vec::new(),
            dirs: vec![config_dir],
            config,
            api_key: String::new(),
            fcm,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
        };
        for _ in 0..n {
            cluster.add_node();
        }
        cluster.api_key = cluster.nodes[0]
            .api_key
            .clone()
            .expect("the first node creates the cluster's first API key");
        cluster
    }

    fn add_node(&mut self) {
        self.add_node_with_env(&[]);
    }

    fn add_node_with_env(&mut self, envs: &[(&str, &str)]) {
        let dir = TempDir::new("herald-cluster-node");
        let node = HeraldProcess::spawn(&dir.0, &["--config", self.config.to_str().unwrap()], envs);
        self.dirs.push(dir);
        self.nodes.push(node);
    }

    fn base(&self, node: usize) -> String {
        self.nodes[node].base.clone()
    }

    /// A token of `user` bound to `device`, allowed every topic.
    async fn token(&self, user: &str, device: &str) -> String {
        let v: Value = self
            .http
            .post(format!("{}/v1/tokens", self.base(0)))
            .bearer_auth(&self.api_key)
            .json(&json!({ "user": user, "device_id": device, "topics": ["*"] }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["token"].as_str().expect("token").to_owned()
    }

    async fn register(&self, node: usize, token: &str, device: &str, push_token: &str) {
        let r = self
            .http
            .put(format!("{}/v1/me/devices/{device}", self.base(node)))
            .bearer_auth(token)
            .json(&json!({"platform": "android", "push_provider": "fcm", "push_token": push_token}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    }

    async fn publish(&self, node: usize, body: Value) -> String {
        let r = self
            .http
            .post(format!("{}/v1/messages", self.base(node)))
            .bearer_auth(&self.api_key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202, "{}", r.text().await.unwrap());
        let v: Value = r.json().await.unwrap();
        v["message_id"].as_str().unwrap().to_owned()
    }

    async fn get(&self, node: usize, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.base(node)))
            .bearer_auth(&self.api_key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "GET {path}");
        r.json().await.unwrap()
    }

    async fn online(&self, node: usize, device: &str) -> bool {
        self.get(node, &format!("/v1/devices/{device}")).await["online"]
            .as_bool()
            .unwrap()
    }

    async fn readyz(&self, node: usize) -> (u16, String) {
        match self
            .http
            .get(format!("{}/readyz", self.base(node)))
            .send()
            .await
        {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    }

    /// Waits until `node`'s `/readyz` says 200. A node listens before its NATS
    /// connection is made (it is retried in the background, and `/readyz` says
    /// "NATS pending" meanwhile); over TLS on a loaded machine that takes a moment.
    async fn wait_ready(&self, node: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = self.readyz(node).await;
            if status == 200 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {node} not ready within 10 s: {status} {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Pushes the FCM mock received, as (device, message id) pairs.
    fn pushes(&self) -> Vec<(String, String)> {
        self.fcm
            .bodies()
            .iter()
            .map(|b| {
                let data = &b["message"]["data"];
                (
                    data["herald_device"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    data["herald_id"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    async fn stop(self) {
        let Cluster { db, nodes, .. } = self;
        drop(nodes);
        db.drop_db().await;
    }
}

/// Polls `f` until it returns Some, for at most `SLOW_WAIT`.
async fn eventually<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    common::eventually_within(SLOW_WAIT, what, f).await
}

async fn connect(url: &str, token: &str) -> Device {
    connect_with_token(url, token)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

/// Next frame, or None when the server closed the connection.
async fn closed(device: &mut Device) -> bool {
    loop {
        match device.frame().await {
            None => return true,
            Some(ServerFrame::Error { .. }) => continue,
            Some(other) => panic!("expected the session to close, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_on_one_node_gets_what_any_node_accepts() {
    let c = Cluster::start(
        3,
        &machine_nats_url(),
        "[delivery]\nack_timeout_ms = 4000\n",
    )
    .await;
    let token = c.token("ana", "ana.phone").await;
    c.register(0, &token, "ana.phone", "fcm-ana").await;
    let mut phone = connect(&c.nodes[1].ws_url("ana.phone", 0), &token).await;

    // Published on every node, received in order on node 1.
    let mut ids = Vec::new();
    for (i, node) in [0usize, 2, 1, 0].into_iter().enumerate() {
        let body = if i == 3 {
            json!({"to": {"user": "ana"}, "data": {"n": i}})
        } else {
            json!({"to": {"device": "ana.phone"}, "data": {"n": i}})
        };
        let id = c.publish(node, body).await;
        let m = phone.msg().await;
        assert_eq!(
            (m.seq, &m.id, &m.data),
            (i as i64 + 1, &id, &json!({"n": i}))
        );
        phone.ack(m.seq).await;
        ids.push(id);
    }
    // Presence and delivery state are the same from every node.
    for node in 0..3 {
        assert!(
            c.online(node, "ana.phone").await,
            "online seen from node {node}"
        );
        let list = c.get(node, "/v1/users/ana/devices").await;
        assert_eq!(list["devices"][0]["online"], true);
    }
    let acked = eventually("acked state", || async {
        let v = c.get(2, &format!("/v1/messages/{}", ids[0])).await;
        (v["deliveries"][0]["state"] == "acked").then_some(v)
    })
    .await;
    assert_eq!(acked["deliveries"][0]["device_id"], "ana.phone");

    // A message taken live on node 1 but not acked yet: its fallback push is due only
    // one ack timeout (4 s) after the publish, so none goes out meanwhile.
    c.publish(0, json!({"to": {"device": "ana.phone"}, "data": {"n": 4}}))
        .await;
    let m = phone.msg().await;
    assert_eq!(m.seq, 5);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(c.fcm.send_requests(), 0, "{:?}", c.pushes());
    // An ack over HTTP on node 2 reaches the session on node 1: no ack timeout (4 s
    // after the send) closes it.
    let r = c
        .http
        .post(format!("{}/v1/me/ack", c.base(2)))
        .bearer_auth(&token)
        .json(&json!({"device_id": "ana.phone", "seq": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    phone.quiet_for(Duration::from_millis(2500)).await;
    // Everything was delivered live, so no fallback push went out.
    assert_eq!(c.fcm.send_requests(), 0, "{:?}", c.pushes());

    // The same device connecting to node 0 closes its session on node 1.
    let mut tablet = connect(&c.nodes[0].ws_url("ana.phone", 5), &token).await;
    assert!(closed(&mut phone).await);
    let id = c
        .publish(1, json!({"to": {"device": "ana.phone"}, "data": {"n": 5}}))
        .await;
    assert_eq!(tablet.msg().await.id, id);
    tablet.ack(6).await;

    // Offline everywhere: the next message is pushed once, and caught up on return.
    drop(tablet);
    eventually("offline on every node", || async {
        for node in 0..3 {
            if c.online(node, "ana.phone").await {
                return None;
            }
        }
        Some(())
    })
    .await;
    let offline_id = c
        .publish(2, json!({"to": {"device": "ana.phone"}, "data": {"n": 6}}))
        .await;
    eventually("one push", || async {
        (c.fcm.send_requests() == 1).then_some(())
    })
    .await;
    assert_eq!(c.pushes(), [("ana.phone".to_string(), offline_id.clone())]);
    let mut back = connect(&c.nodes[2].ws_url("ana.phone", 6), &token).await;
    let m = back.msg().await;
    assert_eq!((m.seq, m.id), (7, offline_id));
    back.ack(7).await;
    back.quiet_for(Duration::from_millis(300)).await;

    // Deleting the device on node 0 closes its session on node 2.
    let r = c
        .http
        .delete(format!("{}/v1/devices/ana.phone", c.base(0)))
        .bearer_auth(&c.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    assert!(closed(&mut back).await);
    assert_eq!(c.fcm.send_requests(), 1);
    c.fcm.assert_no_problems();
    c.stop().await;
}

/// Live delivery across nodes does not depend on the push policy: `never` and
/// `always` entries reach a session on another node too (only `fallback` entries went
/// there once), and `always` is pushed as well, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_push_policy_reaches_a_session_on_another_node() {
    let c = Cluster::start(2, &machine_nats_url(), "").await;
    let token = c.token("pia", "pia.phone").await;
    c.register(0, &token, "pia.phone", "fcm-pia").await;
    let mut phone = connect(&c.nodes[1].ws_url("pia.phone", 0), &token).await;
    for (i, push) in ["never", "always", "fallback"].into_iter().enumerate() {
        let id = c
            .publish(
                0,
                json!({"to": {"device": "pia.phone"}, "data": {"n": i}, "push": push}),
            )
            .await;
        let m = phone.msg().await;
        assert_eq!((m.seq, &m.id), (i as i64 + 1, &id), "push {push}");
        if push == "always" {
            // An ack cancels a push not yet claimed, so wait for it before acking.
            eventually("the `always` push", || async {
                (c.fcm.send_requests() == 1).then_some(())
            })
            .await;
        }
        phone.ack(m.seq).await;
    }
    phone.quiet_for(Duration::from_millis(500)).await;
    assert_eq!(c.fcm.send_requests(), 1, "{:?}", c.pushes());
    c.stop().await;
}

/// What one connected test device has received, across reconnects.
#[derive(Default)]
struct Received {
    ids: HashSet<String>,
    last_seq: i64,
}

/// Reads, acks and records messages; reconnects to the next surviving node when its
/// connection dies, resuming from the last seq it has. Runs until `stop`.
async fn run_device(
    nodes: Vec<String>,
    first: usize,
    device: String,
    token: String,
    received: Arc<Mutex<Received>>,
    stop: CancellationToken,
) {
    let mut node = first;
    while !stop.is_cancelled() {
        let after = received.lock().unwrap().last_seq;
        let url = format!(
            "{}/v1/connect?device_id={device}&after={after}",
            nodes[node].replacen("http://", "ws://", 1)
        );
        let Ok(mut dev) = connect_with_token(&url, &token).await else {
            node = (node + 1) % nodes.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            let frame = tokio::select! {
                f = dev.frame() => f,
                _ = stop.cancelled() => return,
            };
            match frame {
                Some(ServerFrame::Msg(m)) => {
                    {
                        let mut r = received.lock().unwrap();
                        assert!(
                            m.seq > r.last_seq,
                            "{device}: seq {} after {}",
                            m.seq,
                            r.last_seq
                        );
                        r.last_seq = m.seq;
                        r.ids.insert(m.id);
                    }
                    dev.ack(m.seq).await;
                }
                Some(_) => {}
                None => break,
            }
        }
        // The node died or closed us: try the next one, like a client behind a load
        // balancer would.
        node = (node + 1) % nodes.len();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_a_node_during_a_burst_loses_nothing_and_pushes_at_most_once() {
    let mut c = Cluster::start(3, &machine_nats_url(), "").await;
    let bases: Vec<String> = (0..3).map(|n| c.base(n)).collect();
    let stop = CancellationToken::new();

    // Four devices live on node 0 (the victim), two on node 1, four offline.
    let mut live = Vec::new();
    let mut readers = Vec::new();
    for (i, first) in [0usize, 0, 0, 0, 1, 1].into_iter().enumerate() {
        let device = format!("live-{i}");
        let token = c.token(&format!("u-{device}"), &device).await;
        c.register(1, &token, &device, &format!("fcm-{device}"))
            .await;
        let received = Arc::new(Mutex::new(Received::default()));
        readers.push(tokio::spawn(run_device(
            bases.clone(),
            first,
            device.clone(),
            token,
            received.clone(),
            stop.clone(),
        )));
        live.push((device, received));
    }
    let mut offline = Vec::new();
    for i in 0..4 {
        let device = format!("off-{i}");
        let token = c.token(&format!("u-{device}"), &device).await;
        c.register(2, &token, &device, &format!("fcm-{device}"))
            .await;
        offline.push((device, token));
    }
    eventually("live devices connected", || async {
        for (d, _) in &live {
            if !c.online(2, d).await {
                return None;
            }
        }
        Some(())
    })
    .await;

    // The burst: round-robin over the nodes, every device in turn. Only 202s count.
    let targets: Vec<String> = live
        .iter()
        .map(|(d, _)| d.clone())
        .chain(offline.iter().map(|(d, _)| d.clone()))
        .collect();
    let sent = Arc::new(AtomicUsize::new(0));
    let accepted: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let publisher = {
        let (bases, api_key, targets) = (bases.clone(), c.api_key.clone(), targets.clone());
        let (sent, accepted) = (sent.clone(), accepted.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            for i in 0..600usize {
                let device = &targets[i % targets.len()];
                let r = http
                    .post(format!("{}/v1/messages", bases[i % bases.len()]))
                    .bearer_auth(&api_key)
                    .json(&json!({"to": {"device": device}, "data": {"i": i}}))
                    .send()
                    .await;
                if let Ok(r) = r {
                    if r.status().as_u16() == 202 {
                        let v: Value = r.json().await.unwrap();
                        let id = v["message_id"].as_str().unwrap().to_owned();
                        accepted.lock().unwrap().push((device.clone(), id));
                    }
                }
                sent.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    eventually("a third of the burst", || async {
        (sent.load(Ordering::SeqCst) >= 200).then_some(())
    })
    .await;
    c.nodes[0].kill_9();
    tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .expect("burst finishes")
        .unwrap();
    let accepted = accepted.lock().unwrap().clone();
    assert!(accepted.len() >= 400, "only {} accepted", accepted.len());
    let mut by_device: HashMap<String, HashSet<String>> = HashMap::new();
    for (d, id) in &accepted {
        by_device.entry(d.clone()).or_default().insert(id.clone());
    }

    // Zero loss: every live device (including the victim's, reconnected elsewhere)
    // receives everything accepted for it...
    for (device, received) in &live {
        let want = &by_device[device];
        eventually(&format!("{device} to catch up"), || async {
            let got = &received.lock().unwrap().ids;
            want.is_subset(got).then_some(())
        })
        .await;
    }
    stop.cancel();
    for r in readers {
        r.await.unwrap();
    }
    // ...and every offline device finds everything accepted for it in its inbox.
    for (device, token) in &offline {
        let v: Value = c
            .http
            .get(format!(
                "{}/v1/me/sync?device_id={device}&after=0&limit=500",
                c.base(1)
            ))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let got: HashSet<String> = v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect();
        assert!(by_device[device].is_subset(&got), "{device} lost messages");
    }

    // Every offline delivery's push settles, on the surviving nodes: pushed, or
    // failed with an unknown outcome if the victim died while sending it...
    let mut orphaned = 0;
    for (device, id) in accepted.iter().filter(|(d, _)| d.starts_with("off-")) {
        let d = eventually(&format!("push of {id} to settle"), || async {
            let v = c.get(1, &format!("/v1/messages/{id}")).await;
            let d = v["deliveries"][0].clone();
            matches!(d["state"].as_str(), Some("pushed" | "push_failed")).then_some(d)
        })
        .await;
        assert_eq!(d["device_id"], device.as_str());
        if d["state"] == "push_failed" {
            assert_eq!(
                d["reason"].as_str(),
                Some(herald_gateway::store::ORPHANED_PUSH_REASON)
            );
            orphaned += 1;
        }
    }
    // ...and no device ever got the same message pushed twice.
    let pushes = c.pushes();
    let unique: HashSet<&(String, String)> = pushes.iter().collect();
    assert_eq!(unique.len(), pushes.len(), "a push went out twice");
    let accepted_set: HashSet<(String, String)> = accepted.iter().cloned().collect();
    for p in &pushes {
        assert!(
            accepted_set.contains(p),
            "pushed something never accepted: {p:?}"
        );
    }
    assert!(orphaned <= 64, "{orphaned} pushes orphaned by one node");
    eprintln!(
        "accepted {} of 600, pushes {}, orphaned by the kill {orphaned}",
        accepted.len(),
        pushes.len()
    );
    c.fcm.assert_no_problems();
    c.stop().await;
}

/// A `nats-server` of this test's own, on a fixed port so it can be restarted.
struct NatsServer {
    child: Option<Child>,
    port: u16,
    config: Option<PathBuf>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl NatsServer {
    fn binary() -> String {
        if let Ok(b) = std::env::var("HERALD_TEST_NATS_SERVER") {
            return b;
        }
        for candidate in [
            "nats-server",
            "/usr/sbin/nats-server",
            "/usr/bin/nats-server",
        ] {
            if Command::new(candidate)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
            {
                return candidate.to_owned();
            }
        }
        panic!(
            "nats-server is not installed; the NATS restart test runs one of its own. \
             Install it with scripts/ensure-services.sh (Debian package nats-server) or \
             set HERALD_TEST_NATS_SERVER to its path"
        );
    }

    fn start() -> NatsServer {
        let mut s = NatsServer {
            child: None,
            port: free_port(),
            config: None,
        };
        s.restart();
        s
    }

    /// With a configuration file (`{port}` in `config` is replaced by the port).
    fn start_with_config(dir: &std::path::Path, config: &str) -> NatsServer {
        let port = free_port();
        let file = dir.join("nats-server.conf");
        std::fs::write(&file, config.replace("{port}", &port.to_string())).unwrap();
        let mut s = NatsServer {
            child: None,
            port,
            config: Some(file),
        };
        s.restart();
        s
    }

    fn restart(&mut self) {
        let mut cmd = Command::new(Self::binary());
        match &self.config {
            Some(file) => cmd.arg("-c").arg(file),
            None => cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]),
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + SLOW_WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_that_lose_nats_go_unready_and_recover_by_themselves() {
    let mut nats = NatsServer::start();
    let c = Cluster::start(2, &nats.url(), "").await;
    let token = c.token("bo", "bo-phone").await;
    c.register(0, &token, "bo-phone", "fcm-bo").await;
    let mut phone = connect(&c.nodes[1].ws_url("bo-phone", 0), &token).await;
    let id = c
        .publish(0, json!({"to": {"device": "bo-phone"}, "data": {"n": 1}}))
        .await;
    assert_eq!(phone.msg().await.id, id);
    phone.ack(1).await;
    for node in 0..2 {
        assert_eq!(c.readyz(node).await.0, 200);
    }

    nats.kill();
    for node in 0..2 {
        let (status, body) = eventually("not ready without NATS", || async {
            let r = c.readyz(node).await;
            (r.0 == 503).then_some(r)
        })
        .await;
        assert_eq!(status, 503);
        assert!(body.contains("cluster bus unavailable"), "{body}");
    }
    // Publishing still works (the store is fine); the message waits in the inbox.
    let during = c
        .publish(0, json!({"to": {"device": "bo-phone"}, "data": {"n": 2}}))
        .await;

    nats.restart();
    for node in 0..2 {
        eventually("ready again", || async {
            (c.readyz(node).await.0 == 200).then_some(())
        })
        .await;
    }
    // The session on node 1 re-reads its inbox once NATS is back: no reconnect needed.
    let m = tokio::time::timeout(SLOW_WAIT, phone.msg())
        .await
        .expect("the outage's message arrives");
    assert_eq!((m.seq, m.id), (2, during));
    phone.ack(2).await;
    let after = c
        .publish(0, json!({"to": {"device": "bo-phone"}, "data": {"n": 3}}))
        .await;
    let m = phone.msg().await;
    assert_eq!((m.seq, m.id), (3, after));
    c.stop().await;
}

/// A TCP proxy that can cut every connection and refuse new ones, then come back on
/// the same port: a network partition between a node and PostgreSQL.
struct Partition {
    addr: SocketAddr,
    upstream: SocketAddr,
    cut: Mutex<CancellationToken>,
}

impl Partition {
    async fn start(upstream: SocketAddr) -> Arc<Partition> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let p = Arc::new(Partition {
            addr: listener.local_addr().unwrap(),
            upstream,
            cut: Mutex::new(CancellationToken::new()),
        });
        p.serve(listener);
        p
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let (cut, upstream) = (self.cut.lock().unwrap().clone(), self.upstream);
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    _ = cut.cancelled() => return,
                };
                let cut = cut.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.cancelled() => {}
                    }
                });
            }
        });
    }

    fn cut(&self) {
        self.cut.lock().unwrap().cancel();
    }

    async fn heal(&self) {
        *self.cut.lock().unwrap() = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .expect("rebind the partition's port");
        self.serve(listener);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_loses_postgres_goes_unready_and_recovers_by_itself() {
    // The node reaches the database through the partition; the test itself directly.
    let pg_addr: SocketAddr = {
        let url = reqwest::Url::parse(&PgDb::admin_url()).unwrap();
        let host = url
            .host_str()
            .unwrap_or("127.0.0.1")
            .replace("localhost", "127.0.0.1");
        format!("{host}:{}", url.port().unwrap_or(5432))
            .parse()
            .unwrap()
    };
    let partition = Partition::start(pg_addr).await;
    let proxied = {
        let port = partition.addr.port();
        move |url: &str| {
            let mut u = reqwest::Url::parse(url).unwrap();
            u.set_host(Some("127.0.0.1")).unwrap();
            u.set_port(Some(port)).unwrap();
            u.to_string()
        }
    };
    let c = Cluster::start_via(1, &machine_nats_url(), "", Some(&proxied), "").await;
    let token = c.token("cy", "cy-phone").await;
    c.register(0, &token, "cy-phone", "fcm-cy").await;
    c.wait_ready(0).await;

    partition.cut();
    let (_, body) = eventually("not ready without PostgreSQL", || async {
        let r = c.readyz(0).await;
        (r.0 == 503).then_some(r)
    })
    .await;
    assert!(body.contains("store unavailable"), "{body}");
    // A publish now is refused with an error, not accepted and lost.
    let r = c
        .http
        .post(format!("{}/v1/messages", c.base(0)))
        .bearer_auth(&c.api_key)
        .json(&json!({"to": {"device": "cy-phone"}, "data": {}}))
        .send()
        .await;
    if let Ok(r) = r {
        assert!(r.status().as_u16() >= 500, "{}", r.status());
    }

    partition.heal().await;
    eventually("ready again", || async {
        (c.readyz(0).await.0 == 200).then_some(())
    })
    .await;
    let id = c
        .publish(0, json!({"to": {"device": "cy-phone"}, "data": {"n": 1}}))
        .await;
    let mut phone = connect(&c.nodes[0].ws_url("cy-phone", 0), &token).await;
    // (The refused publish may have committed once the database came back; the
    // client was told it failed, so a retry would be its idempotency key's job.)
    let mut m = phone.msg().await;
    if m.id != id {
        m = phone.msg().await;
    }
    assert_eq!(m.id, id);
    c.stop().await;
}

/// Sum of a counter over the given nodes' `/metrics`.
async fn counter(c: &Cluster, nodes: &[usize], name: &str) -> u64 {
    let mut sum = 0;
    for &node in nodes {
        let text = c
            .http
            .get(format!("{}/metrics", c.base(node)))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        sum += text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_whose_doorbell_never_rang_still_reaches_the_device_live() {
    // Node 2 reaches NATS through a partition; nodes 0 and 1 directly.
    let nats_addr: SocketAddr = {
        let url = reqwest::Url::parse(&machine_nats_url()).unwrap();
        let host = url
            .host_str()
            .unwrap_or("127.0.0.1")
            .replace("localhost", "127.0.0.1");
        format!("{host}:{}", url.port().unwrap_or(4222))
            .parse()
            .unwrap()
    };
    let partition = Partition::start(nats_addr).await;
    let mut c = Cluster::start(
        2,
        &machine_nats_url(),
        "[delivery]\nack_timeout_ms = 2000\n",
    )
    .await;
    let proxied = format!("nats://{}", partition.addr);
    c.add_node_with_env(&[("HERALD_NATS__URL", &proxied)]);
    let token = c.token("dee", "dee.phone").await;
    c.register(0, &token, "dee.phone", "fcm-dee").await;
    let mut phone = connect(&c.nodes[1].ws_url("dee.phone", 0), &token).await;
    let first = c
        .publish(2, json!({"to": {"device": "dee.phone"}, "data": {"n": 1}}))
        .await;
    assert_eq!(
        phone.msg().await.id,
        first,
        "node 2 rings through the proxy"
    );
    phone.ack(1).await;

    // Node 2 is cut off NATS: what it accepts now has no doorbell. Before, it pushed
    // such a message at once ("no push token" or a needless push) and the device,
    // online on node 1 all along, saw it only with a later message or a reconnect.
    partition.cut();
    eventually("node 2 unready without NATS", || async {
        (c.readyz(2).await.0 == 503).then_some(())
    })
    .await;
    let silent = c
        .publish(2, json!({"to": {"device": "dee.phone"}, "data": {"n": 2}}))
        .await;
    let m = tokio::time::timeout(SLOW_WAIT, phone.msg())
        .await
        .expect("the message arrives live once its push is due");
    assert_eq!((m.seq, &m.id), (2, &silent));
    phone.ack(2).await;

    // The same when the node dies right after its 202.
    let orphan = c
        .publish(2, json!({"to": {"device": "dee.phone"}, "data": {"n": 3}}))
        .await;
    c.nodes[2].kill_9();
    let m = tokio::time::timeout(SLOW_WAIT, phone.msg())
        .await
        .expect("the dead node's message arrives live");
    assert_eq!((m.seq, &m.id), (3, &orphan));
    phone.ack(3).await;

    for id in [&silent, &orphan] {
        eventually(&format!("{id} acked"), || async {
            let v = c.get(0, &format!("/v1/messages/{id}")).await;
            (v["deliveries"][0]["state"] == "acked").then_some(())
        })
        .await;
    }
    // Offered live by a surviving node when due, so never pushed.
    assert!(counter(&c, &[0, 1], "herald_due_offered_live_total").await >= 2);
    phone.quiet_for(Duration::from_millis(500)).await;
    assert_eq!(c.fcm.send_requests(), 0, "{:?}", c.pushes());
    c.fcm.assert_no_problems();
    c.stop().await;
}

/// Topic drops and revocation reach every node: the store is shared, and the kick
/// travels over NATS to whichever node holds the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revocation_and_topic_drops_hold_on_every_node() {
    use futures_util::StreamExt;
    use herald_protocol::ClientFrame;
    use tokio_tungstenite::tungstenite::Message;

    let c = Cluster::start(3, &machine_nats_url(), "").await;
    let mint = |device: &str, topics: Value| {
        let body = json!({"user": "rita", "device_id": device, "topics": topics});
        let (http, base, key) = (c.http.clone(), c.base(0), c.api_key.clone());
        async move {
            let v: Value = http
                .post(format!("{base}/v1/tokens"))
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["token"].as_str().expect("token").to_owned()
        }
    };

    // Subscribed on node 1 under a wide token…
    let wide = mint("rita-1", json!(["news", "user.rita.*"])).await;
    let mut d = connect(&c.nodes[1].ws_url("rita-1", 0), &wide).await;
    for topic in ["news", "user.rita.x"] {
        d.send(&ClientFrame::Subscribe {
            topic: topic.into(),
        })
        .await;
        assert!(matches!(
            d.frame().await,
            Some(ServerFrame::Subscribed { .. })
        ));
    }
    drop(d);
    // …then connected on node 2 with a narrower one: node 0 sees the drop.
    let narrow = mint("rita-1", json!(["news"])).await;
    let mut d1 = connect(&c.nodes[2].ws_url("rita-1", 0), &narrow).await;
    assert_eq!(
        c.get(0, "/v1/devices/rita-1/topics").await,
        json!({"topics": ["news"]})
    );
    let r = c
        .http
        .post(format!("{}/v1/messages", c.base(0)))
        .bearer_auth(&c.api_key)
        .json(&json!({"to": {"topic": "user.rita.x"}, "data": {}, "push": "never"}))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["recipients"], 0, "{v}");

    // A second device of rita's on node 1; revoke on node 0: both close with 1008
    // `revoked`, and their tokens are refused on every node.
    let t2 = mint("rita-2", json!([])).await;
    let mut d2 = connect(&c.nodes[1].ws_url("rita-2", 0), &t2).await;
    let r = c
        .http
        .post(format!("{}/v1/users/rita/revoke_tokens", c.base(0)))
        .bearer_auth(&c.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    for d in [&mut d1, &mut d2] {
        let close = loop {
            let msg = tokio::time::timeout(SLOW_WAIT, d.ws.next())
                .await
                .expect("closed in time");
            match msg {
                Some(Ok(Message::Close(f))) => break f,
                Some(Ok(_)) => continue,
                other => panic!("closed without a close frame: {other:?}"),
            }
        };
        let close = close.expect("a close frame with a code");
        assert_eq!(u16::from(close.code), 1008);
        assert_eq!(close.reason.as_str(), "revoked");
    }
    for (node, device, token) in [
        (0, "rita-1", &narrow),
        (1, "rita-2", &t2),
        (2, "rita-1", &narrow),
    ] {
        let err = connect_with_token(&c.nodes[node].ws_url(device, 0), token)
            .await
            .err()
            .expect("a revoked token is refused");
        assert!(err.starts_with("HTTP 401"), "node {node}: {err}");
    }
    c.stop().await;
}

/// `herald serve` that must refuse to start: its stderr, once it exited non-zero.
fn failed_start(config: &std::path::Path, envs: &[(&str, &str)]) -> String {
    let dir = TempDir::new("herald-cluster-refused");
    let mut child = Command::new(common::process::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir.0)
        .arg("--config")
        .arg(config)
        .envs(envs.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn herald");
    let deadline = std::time::Instant::now() + SLOW_WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("herald kept running with {envs:?}; it should refuse to start");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "herald exited 0 with {envs:?}: {stderr}");
    stderr
}

/// A NATS that takes only mutual TLS (client certificates from the test CA) and a
/// user/password: two nodes deliver across it, every connection is TLS and
/// authenticated (the server's /connz says so), and a node that does not trust the
/// server's CA, or has the wrong password, refuses to start and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_reach_each_other_through_nats_over_mutual_tls_with_a_password() {
    let dir = TempDir::new("herald-nats-tls");
    let pki = common::certs::Pki::write(&dir.0);
    let monitor = free_port();
    let nats = NatsServer::start_with_config(
        &dir.0,
        &format!(
            "listen: \"127.0.0.1:{{port}}\"\nhttp: \"127.0.0.1:{monitor}\"\n\
             tls {{\n  cert_file: {cert:?}\n  key_file: {key:?}\n  ca_file: {ca:?}\n  verify: true\n  timeout: 5\n}}\n\
             authorization {{\n  user: herald\n  password: \"n4ts-s3cret\"\n}}\n",
            cert = pki.server_cert.display().to_string(),
            key = pki.server_key.display().to_string(),
            ca = pki.ca.display().to_string(),
        ),
    );
    let nats_toml = format!(
        "tls_ca_file = {}\ntls_cert_file = {}\ntls_key_file = {}\nuser = \"herald\"\npassword = \"n4ts-s3cret\"",
        toml_string(pki.ca.to_str().unwrap()),
        toml_string(pki.client_cert.to_str().unwrap()),
        toml_string(pki.client_key.to_str().unwrap()),
    );
    let c = Cluster::start_via(2, &nats.url(), "", None, &nats_toml).await;
    for node in 0..2 {
        c.wait_ready(node).await;
    }

    // Published on node 0, delivered live on node 1: the doorbell went through NATS.
    let token = c.token("tia", "tia-phone").await;
    c.register(0, &token, "tia-phone", "fcm-tia").await;
    let mut phone = connect(&c.nodes[1].ws_url("tia-phone", 0), &token).await;
    assert!(c.online(0, "tia-phone").await, "presence crosses nodes");
    let id = c
        .publish(
            0,
            json!({"to": {"device": "tia-phone"}, "data": {"tls": true}}),
        )
        .await;
    let m = phone.msg().await;
    assert_eq!((&m.id, &m.data), (&id, &json!({"tls": true})));
    phone.ack(m.seq).await;
    phone.quiet_for(Duration::from_millis(300)).await;
    assert_eq!(c.fcm.send_requests(), 0, "delivered live, no push");

    // The server's view: two nodes, both on TLS, both the password's user.
    let connz: Value = c
        .http
        .get(format!("http://127.0.0.1:{monitor}/connz?auth=1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let conns = connz["connections"].as_array().unwrap();
    let herald: Vec<&Value> = conns
        .iter()
        .filter(|c| c["name"].as_str().is_some_and(|n| n.starts_with("herald-")))
        .collect();
    assert_eq!(herald.len(), 2, "{connz}");
    for conn in herald {
        assert!(
            conn["tls_version"]
                .as_str()
                .is_some_and(|v| v.starts_with("1.")),
            "{conn}"
        );
        assert_eq!(conn["authorized_user"], "herald", "{conn}");
    }

    // Another CA than the one that signed the server's certificate: no start.
    let other_ca = pki.other_ca.to_str().unwrap();
    let err = failed_start(&c.config, &[("HERALD_NATS__TLS_CA_FILE", other_ca)]);
    assert!(err.contains("refused this node"), "{err}");
    assert!(err.contains("tls_ca_file"), "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // The right CA and the wrong password: no start either.
    let err = failed_start(&c.config, &[("HERALD_NATS__PASSWORD", "wrong")]);
    assert!(err.contains("refused this node"), "{err}");
    assert!(err.contains("authorization violation"), "{err}");
    // A CA file that is not there.
    let err = failed_start(
        &c.config,
        &[("HERALD_NATS__TLS_CA_FILE", "/nonexistent/ca.pem")],
    );
    assert!(
        err.contains("nats.tls_ca_file /nonexistent/ca.pem"),
        "{err}"
    );

    c.fcm.assert_no_problems();
    drop(phone);
    c.stop().await;
    drop(nats);
}

/// A NATS JWT (`ed25519-nkey`) with `claims`, issued and signed by `issuer`.
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: Value) -> String {
    use base64::Engine;
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = json!({
        "jti": uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
        "iat": 1_700_000_000,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let payload = b64(claims.to_string().as_bytes());
    let signed = format!("{header}.{payload}");
    let sig = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", b64(&sig))
}

/// NATS in operator mode (decentralized auth: an operator, an account, a user JWT):
/// two nodes authenticated by a `.creds` file deliver across it; a node without
/// credentials refuses to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_authenticate_to_nats_with_a_creds_file() {
    let dir = TempDir::new("herald-nats-creds");
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let unlimited = json!({"subs": -1, "data": -1, "payload": -1, "imports": -1,
        "exports": -1, "wildcards": true, "conn": -1, "leaf": -1});
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        "herald-test-operator",
        json!({"type": "operator", "version": 2}),
    );
    let account_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        "herald-test-account",
        json!({"limits": unlimited, "default_permissions": {"pub": {}, "sub": {}},
               "type": "account", "version": 2}),
    );
    let user_jwt = nats_jwt(
        &account,
        &user.public_key(),
        "herald-node",
        json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
               "type": "user", "version": 2}),
    );
    let creds = dir.0.join("herald.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        ),
    )
    .unwrap();
    let monitor = free_port();
    let nats = NatsServer::start_with_config(
        &dir.0,
        &format!(
            "listen: \"127.0.0.1:{{port}}\"\nhttp: \"127.0.0.1:{monitor}\"\n\
             operator: \"{operator_jwt}\"\nresolver: MEMORY\n\
             resolver_preload: {{\n  {acc}: \"{account_jwt}\"\n}}\n",
            acc = account.public_key(),
        ),
    );
    let nats_toml = format!("creds_file = {}", toml_string(creds.to_str().unwrap()));
    let c = Cluster::start_via(2, &nats.url(), "", None, &nats_toml).await;
    for node in 0..2 {
        c.wait_ready(node).await;
    }
    let token = c.token("cy", "cy-phone").await;
    c.register(1, &token, "cy-phone", "fcm-cy").await;
    let mut phone = connect(&c.nodes[0].ws_url("cy-phone", 0), &token).await;
    let id = c
        .publish(
            1,
            json!({"to": {"device": "cy-phone"}, "data": {"creds": 1}}),
        )
        .await;
    let m = phone.msg().await;
    assert_eq!(m.id, id);
    phone.ack(m.seq).await;

    // The server saw both nodes as the creds' user, in the account.
    let connz: Value = c
        .http
        .get(format!("http://127.0.0.1:{monitor}/connz?auth=1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let herald: Vec<&Value> = connz["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"].as_str().is_some_and(|n| n.starts_with("herald-")))
        .collect();
    assert_eq!(herald.len(), 2, "{connz}");
    for conn in herald {
        assert_eq!(conn["authorized_user"], user.public_key(), "{conn}");
        assert_eq!(conn["account"], account.public_key(), "{conn}");
    }

    // Without the creds file the server refuses the node, which does not start.
    let bare = dir.0.join("no-creds.toml");
    let text = std::fs::read_to_string(&c.config).unwrap();
    let without: String = text
        .lines()
        .filter(|l| !l.starts_with("creds_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&bare, without).unwrap();
    let err = failed_start(&bare, &[]);
    assert!(err.contains("refused this node"), "{err}");
    // A file that is not a creds file.
    let err = failed_start(
        &c.config,
        &[("HERALD_NATS__CREDS_FILE", c.config.to_str().unwrap())],
    );
    assert!(err.contains("is not a NATS credentials file"), "{err}");

    drop(phone);
    c.stop().await;
    drop(nats);
}
