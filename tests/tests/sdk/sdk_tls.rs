//! TLS of the SDK, black-box: the real gateway behind a TLS gateway on 127.0.0.1 whose
//! certificate comes from a throw-away CA (rcgen). The CA is made trusted the way the
//! platform verifier on Linux reads the system store: `SSL_CERT_FILE`. Both paths are
//! checked: the WebSocket (connect) and HTTP (`register_push_token`).
//!
//! One `#[test]`: `SSL_CERT_FILE` is process-wide, set once before any thread starts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use herald_gateway::testing::{TempDir, TestGateway};
use herald_protocol::{PublishRequest, PushPolicy, PushProviderKind, Target};
use herald_sdk::{Config, Error, HeraldClient, TransportPreference};
use herald_system_tests::{wait_until, Recorder, T};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;

struct Ca {
    cert: rcgen::Certificate,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        cert,
        issuer: Issuer::new(params, key),
    }
}

/// A leaf for 127.0.0.1 signed by `ca`: (DER, PKCS#8 key).
fn leaf(ca: &Ca) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca.issuer)
        .unwrap();
    (
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

/// TLS on 127.0.0.1 in front of the gateway at `upstream`; returns its address.
async fn tls_gateway(
    upstream: SocketAddr,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> SocketAddr {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A refused handshake (the client distrusts us) just ends here.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    addr
}

struct Setup {
    tg: TestGateway,
    _dir: TempDir,
    dir: std::path::PathBuf,
}

impl Setup {
    fn config(&self, addr: SocketAddr, device: &str, pins: &[String]) -> Config {
        let mut c = Config::new(format!("https://{addr}"), device, self.dir.join(device));
        c.backoff_min = Duration::from_millis(50);
        c.backoff_max = Duration::from_millis(400);
        c.connect_timeout = Duration::from_secs(5);
        c.request_timeout = Duration::from_secs(5);
        c.pinned_spki_sha256 = pins.to_vec();
        c
    }

    fn client(&self, config: Config) -> (HeraldClient, Arc<Recorder>) {
        let tokens = self.tg.state.tokens.clone();
        let rec = Arc::new(Recorder::default());
        let client = HeraldClient::new(
            config,
            rec.clone(),
            Arc::new(move |device: &str| {
                let grant = herald_gateway::auth::Grant {
                    device_id: Some(device.to_string()),
                    topics: Some(vec!["*".to_string()]),
                };
                Ok::<_, String>(tokens.mint_grant("alice", &grant, 3600).unwrap().0)
            }),
        )
        .unwrap();
        (client, rec)
    }

    /// Connects, receives a message, registers a push token (WebSocket and HTTP).
    async fn works(&self, config: Config) {
        let device = config.device_id.clone();
        let (client, rec) = self.client(config);
        client.connect();
        wait_until(&format!("{device} connected"), T, || rec.connected()).await;
        let mut req = PublishRequest::new(Target::Device(device.clone()), json!({ "n": 1 }));
        req.push = PushPolicy::Never;
        self.tg.publish(&req).await;
        wait_until(&format!("{device}'s message"), T, || {
            rec.messages.lock().unwrap().len() == 1
        })
        .await;
        let registered = tokio::task::block_in_place(|| {
            client.register_push_token(PushProviderKind::Fcm, "fcm-tls", None)
        })
        .expect("register over HTTPS");
        assert_eq!(registered.device_id, device);
        client.close();
    }

    /// The connection and an HTTP call both fail with an error containing `expect`.
    async fn refused(&self, config: Config, expect: &str) -> String {
        let device = config.device_id.clone();
        let (client, rec) = self.client(config);
        client.connect();
        wait_until(&format!("{device}'s connect error"), T, || {
            !rec.errors.lock().unwrap().is_empty()
        })
        .await;
        let error = rec.error_texts()[0].clone();
        assert!(error.contains(expect), "{device}: {error}");
        let http = tokio::task::block_in_place(|| {
            client.register_push_token(PushProviderKind::Fcm, "fcm-tls", None)
        })
        .expect_err("HTTPS call must be refused");
        assert!(
            matches!(&http, Error::Certificate(m) if m.contains(expect)),
            "{device} over HTTP: {http:?}"
        );
        assert!(!rec.connected(), "{device} connected");
        client.close();
        error
    }
}

#[test]
fn platform_store_and_pinning() {
    let trusted = ca("herald test CA");
    let other = ca("herald untrusted CA");
    let bundle_dir = TempDir::new("sdk-tls-bundle");
    let bundle = bundle_dir.0.join("ca.pem");
    std::fs::write(&bundle, trusted.cert.pem()).unwrap();
    // What the platform verifier reads on Linux (as OpenSSL does); set before any
    // thread exists.
    std::env::set_var("SSL_CERT_FILE", &bundle);
    std::env::remove_var("SSL_CERT_DIR");

    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            let tg = TestGateway::start().await;
            let upstream: SocketAddr = tg.base_url.trim_start_matches("http://").parse().unwrap();
            let dir = TempDir::new("sdk-tls");
            let s = Setup {
                dir: dir.0.clone(),
                _dir: dir,
                tg,
            };
            let (good_cert, good_key) = leaf(&trusted);
            let good_pin = herald_sdk::spki_sha256(&good_cert).unwrap();
            let good = tls_gateway(upstream, good_cert, good_key).await;
            let (bad_cert, bad_key) = leaf(&other);
            let bad_pin = herald_sdk::spki_sha256(&bad_cert).unwrap();
            let bad = tls_gateway(upstream, bad_cert, bad_key).await;
            assert_ne!(good_pin, bad_pin);

            // The CA in the platform store: trusted, on both paths.
            s.works(s.config(good, "tls-trusted", &[])).await;
            // A CA the platform does not trust: refused.
            let e = s
                .refused(
                    s.config(bad, "tls-untrusted", &[]),
                    "invalid peer certificate",
                )
                .await;
            println!("untrusted CA: {e}");
            // Trusted, but the key is not pinned: refused, saying so.
            let e = s
                .refused(
                    s.config(good, "tls-wrong-pin", std::slice::from_ref(&bad_pin)),
                    "certificate pin mismatch",
                )
                .await;
            assert!(e.contains(&good_pin), "the error names the key seen: {e}");
            println!("wrong pin: {e}");
            // The right pin (next to another one, e.g. a backup key): connects.
            s.works(s.config(
                good,
                "tls-right-pin",
                &[bad_pin.clone(), format!("sha256/{good_pin}")],
            ))
            .await;
            // The same TLS on the fallback transports (SSE, long-poll).
            for (name, kind) in [
                ("sse", TransportPreference::Sse),
                ("poll", TransportPreference::LongPoll),
            ] {
                let mut c = s.config(
                    good,
                    &format!("tls-{name}-pin"),
                    std::slice::from_ref(&good_pin),
                );
                c.transport = kind;
                s.works(c).await;
                let mut c = s.config(
                    good,
                    &format!("tls-{name}-wrong-pin"),
                    std::slice::from_ref(&bad_pin),
                );
                c.transport = kind;
                s.refused(c, "certificate pin mismatch").await;
            }
            // A pin never replaces validation: the untrusted server's own key is pinned.
            s.refused(
                s.config(bad, "tls-pinned-untrusted", std::slice::from_ref(&bad_pin)),
                "invalid peer certificate",
            )
            .await;
            // A malformed pin is a configuration error.
            let mut c = s.config(good, "tls-bad-pin", &[]);
            c.pinned_spki_sha256 = vec!["abc".into()];
            let rec = Arc::new(Recorder::default());
            let r = HeraldClient::new(c, rec, Arc::new(|_: &str| Ok::<_, String>("t".into())));
            assert!(
                matches!(&r, Err(Error::InvalidConfig(m)) if m.contains("pinned_spki_sha256")),
                "{:?}",
                r.err()
            );
            s.tg.stop().await;
        });
}
