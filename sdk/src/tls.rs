//! TLS of the WebSocket and HTTP paths: the platform's certificate store, and optional
//! certificate pinning on top of it.
//!
//! Certificates are validated by the operating system's verifier
//! (`rustls-platform-verifier`): Security.framework on iOS/macOS (user- and
//! MDM-installed CAs included), the system trust store on Windows, and on Linux the
//! system bundle (`SSL_CERT_FILE` / `SSL_CERT_DIR` when set, as OpenSSL does), and on
//! Android an `X509TrustManager` over the device's CA store (`AndroidCAStore`: system,
//! user- and MDM-installed CAs), through the verifier's Kotlin component. There the
//! verifier calls into the JVM, so the app must first hand the SDK its Context:
//! `HeraldAndroid.init(context)` (the JNI function of herald-ffi, which calls
//! `tls::android::init`). Until then a connect over TLS fails at once with a terminal
//! [`Error::InvalidConfig`] saying so (and an HTTPS request with that error), instead
//! of the verifier's panic.
//!
//! With `Config::pinned_spki_sha256` set, a server certificate that passed validation
//! is also required to carry a pinned key: the base64 SHA-256 of the
//! SubjectPublicKeyInfo of the server's certificate or of one of the intermediates it
//! sends (the `sha256/…` pins of OkHttp and of HPKP). Pinning never replaces
//! validation.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};

use crate::Error;

/// A pinned key: SHA-256 of a DER SubjectPublicKeyInfo.
type Pin = [u8; 32];

/// Parses `pinned_spki_sha256` entries: standard base64 (padding optional) of 32
/// bytes, optionally prefixed `sha256/`.
pub(crate) fn parse_pins(pins: &[String]) -> Result<Vec<Pin>, Error> {
    pins.iter()
        .map(|p| {
            let b64 = p.trim();
            let b64 = b64.strip_prefix("sha256/").unwrap_or(b64);
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(b64))
                .map_err(|e| {
                    Error::InvalidConfig(format!("pinned_spki_sha256 {p:?} is not base64: {e}"))
                })?;
            <Pin>::try_from(bytes.as_slice()).map_err(|_| {
                Error::InvalidConfig(format!(
                    "pinned_spki_sha256 {p:?} is {} bytes, a SHA-256 is 32",
                    bytes.len()
                ))
            })
        })
        .collect()
}

/// The base64 SHA-256 of the SubjectPublicKeyInfo of a DER certificate (what
/// `pinned_spki_sha256` holds), `None` if it does not parse.
pub fn spki_sha256(cert_der: &[u8]) -> Option<String> {
    let cert = CertificateDer::from(cert_der);
    spki_pin(&cert).map(|p| base64::engine::general_purpose::STANDARD.encode(p))
}

fn spki_pin(cert: &CertificateDer<'_>) -> Option<Pin> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    let spki = parsed.subject_public_key_info();
    let digest = ring::digest::digest(&ring::digest::SHA256, spki.as_ref());
    digest.as_ref().try_into().ok()
}

/// The text of a refused server certificate somewhere in `e`'s source chain (the
/// handshake failure of either transport), `None` for any other error.
pub(crate) fn certificate_error(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(rustls::Error::InvalidCertificate(c)) = e.downcast_ref::<rustls::Error>() {
            return Some(match c {
                CertificateError::Other(o) => o.to_string(),
                c => format!("invalid peer certificate: {c:?}"),
            });
        }
        // An io::Error's `source()` skips the error it wraps (how the TLS stream
        // reports a failed handshake).
        next = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

/// The rustls client configuration of both transports.
pub(crate) fn client_config(pins: Vec<Pin>) -> Result<Arc<rustls::ClientConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = platform_verifier(provider.clone())?;
    let verifier: Arc<dyn ServerCertVerifier> = if pins.is_empty() {
        verifier
    } else {
        Arc::new(PinningVerifier {
            inner: verifier,
            pins,
        })
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::InvalidConfig(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn platform_verifier(
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, Error> {
    let verifier = rustls_platform_verifier::Verifier::new(provider).map_err(|e| {
        Error::InvalidConfig(format!(
            "TLS: cannot use the platform's certificate store: {e}"
        ))
    })?;
    Ok(Arc::new(RequireReady(Arc::new(verifier))))
}

/// Whether the platform verifier can be used: always, except on Android before
/// `android::init` (the verifier would panic there: it has no JVM to call).
static PLATFORM_READY: AtomicBool = AtomicBool::new(!cfg!(target_os = "android"));

/// What the app is told when it connects over TLS on Android before the init.
pub(crate) const NOT_INITIALIZED: &str = "TLS on Android needs the app's Context first: call \
     HeraldAndroid.init(context) (dev.herald.sdk.HeraldAndroid) once, e.g. in \
     Application.onCreate, before connecting";

fn platform_ready() -> bool {
    PLATFORM_READY.load(Ordering::Acquire)
}

/// Checked before each connect attempt: over TLS, the platform verifier must be usable
/// (a terminal `InvalidConfig` otherwise: retrying cannot help until the app calls
/// the init). Plain `http` never needs it.
pub(crate) fn ready_for(base: &url::Url) -> Result<(), Error> {
    if matches!(base.scheme(), "https" | "wss") && !platform_ready() {
        return Err(Error::InvalidConfig(NOT_INITIALIZED.to_string()));
    }
    Ok(())
}

/// The platform verifier, refusing (instead of panicking) while it is not usable: the
/// HTTP paths (`register_push_token`, sync …) get [`NOT_INITIALIZED`] as the error.
#[derive(Debug)]
struct RequireReady(Arc<dyn ServerCertVerifier>);

#[derive(Debug)]
struct NotInitialized;

impl fmt::Display for NotInitialized {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(NOT_INITIALIZED)
    }
}

impl std::error::Error for NotInitialized {}

impl ServerCertVerifier for RequireReady {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !platform_ready() {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(NotInitialized)),
            )));
        }
        self.0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.0.root_hint_subjects()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.0.requires_raw_public_keys()
    }
}

/// Android: hand the platform verifier the JVM and the app's Context.
#[cfg(target_os = "android")]
pub mod android {
    use std::sync::atomic::Ordering;

    /// Gives the platform verifier (rustls-platform-verifier) the JVM and the app's
    /// `Context` it calls Android's certificate verifier through. Called by
    /// herald-ffi's `HeraldAndroid.init(context)` JNI function; once is enough (later
    /// calls do nothing). Until it succeeded, TLS connects fail with
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig).
    pub fn init(
        env: &mut jni::Env<'_>,
        context: jni::objects::JObject<'_>,
    ) -> Result<(), jni::errors::Error> {
        rustls_platform_verifier::android::init_with_env(env, context)?;
        super::PLATFORM_READY.store(true, Ordering::Release);
        Ok(())
    }
}

/// The platform's verdict first; then one of the chain's keys must be pinned.
#[derive(Debug)]
struct PinningVerifier {
    inner: Arc<dyn ServerCertVerifier>,
    pins: Vec<Pin>,
}

/// The error a pin mismatch fails the handshake with (its text reaches the app).
#[derive(Debug)]
struct PinMismatch {
    server: String,
    presented: Vec<String>,
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "certificate pin mismatch: no key of {}'s certificate chain is in pinned_spki_sha256 (the chain's keys: {})",
            self.server,
            self.presented.join(", ")
        )
    }
}

impl std::error::Error for PinMismatch {}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let chain: Vec<Option<Pin>> = std::iter::once(end_entity)
            .chain(intermediates)
            .map(spki_pin)
            .collect();
        if chain.iter().flatten().any(|k| self.pins.contains(k)) {
            return Ok(verified);
        }
        let presented = chain
            .iter()
            .map(|k| match k {
                Some(k) => base64::engine::general_purpose::STANDARD.encode(k),
                None => "(unparsable)".to_string(),
            })
            .collect();
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(PinMismatch {
                server: server_name.to_str().into_owned(),
                presented,
            })),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_base64_sha256() {
        let ok = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(
            parse_pins(std::slice::from_ref(&ok)).unwrap(),
            vec![[7u8; 32]]
        );
        assert_eq!(
            parse_pins(&[format!("sha256/{ok}")]).unwrap(),
            vec![[7u8; 32]]
        );
        assert_eq!(
            parse_pins(&[ok.trim_end_matches('=').to_string()]).unwrap(),
            vec![[7u8; 32]]
        );
        let short = base64::engine::general_purpose::STANDARD.encode([7u8; 20]);
        assert!(
            matches!(parse_pins(&[short]), Err(Error::InvalidConfig(m)) if m.contains("20 bytes"))
        );
        assert!(matches!(
            parse_pins(&["not base64!".into()]),
            Err(Error::InvalidConfig(_))
        ));
    }

    /// Android before `HeraldAndroid.init(context)`, simulated on the host by clearing
    /// the flag that init sets: connecting over TLS fails at once with a terminal
    /// `InvalidConfig` naming the init (no connection attempt, no retries), an HTTPS
    /// request fails with the same error instead of the verifier's panic, and plain
    /// `http` is not affected. With the flag set again the same request reaches the
    /// platform verifier (which refuses the self-signed certificate).
    #[test]
    fn tls_before_the_android_init_fails_with_a_clear_terminal_error() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Mutex;
        use std::time::{Duration, Instant};

        use crate::{ConnectionState, InboxMessage, Listener};
        use herald_protocol::PushProviderKind;

        #[derive(Default)]
        struct Errors(Mutex<Vec<(Error, bool)>>);
        impl Listener for Errors {
            fn on_state_changed(&self, _: ConnectionState) {}
            fn on_message(&self, _: InboxMessage) {}
            fn on_error(&self, error: Error, terminal: bool) {
                self.0.lock().unwrap().push((error, terminal));
            }
        }

        let rt = tokio::runtime::Runtime::new().unwrap();
        // A TLS server with a self-signed certificate, counting the TCP connections.
        let accepted = Arc::new(AtomicUsize::new(0));
        let addr = rt.block_on(async {
            let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
            let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
                rustls::pki_types::PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()),
            );
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accepted = accepted.clone();
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let _ = acceptor.accept(tcp).await;
                    });
                }
            });
            addr
        });
        let dir = std::env::temp_dir().join(format!(
            "herald-sdk-android-init-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let client = |base: String, device: &str, listener: Arc<Errors>| {
            let mut c = crate::Config::new(base, device, dir.join(device));
            c.backoff_min = Duration::from_millis(20);
            c.backoff_max = Duration::from_millis(50);
            c.request_timeout = Duration::from_secs(5);
            let tokens = |_: &str| -> Result<String, String> { Ok("token".into()) };
            crate::HeraldClient::new(c, listener, Arc::new(tokens)).unwrap()
        };
        let wait_for_error = |errors: &Errors| {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(e) = errors.0.lock().unwrap().first().cloned() {
                    return e;
                }
                assert!(Instant::now() < deadline, "no error reported");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let not_initialized = Error::InvalidConfig(NOT_INITIALIZED.to_string());
        assert!(NOT_INITIALIZED.contains("HeraldAndroid.init(context)"));

        PLATFORM_READY.store(false, Ordering::Release);
        let outcome = std::panic::catch_unwind(|| {
            let errors = Arc::new(Errors::default());
            let tls = client(format!("https://{addr}"), "before-init", errors.clone());
            tls.connect();
            assert_eq!(wait_for_error(&errors), (not_initialized.clone(), true));
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(
                errors.0.lock().unwrap().len(),
                1,
                "terminal: no retries: {:?}",
                errors.0.lock().unwrap()
            );
            assert_eq!(
                accepted.load(Ordering::SeqCst),
                0,
                "no connection attempted"
            );
            // The HTTP path reaches the handshake and is refused by the guard.
            let e = tls
                .register_push_token(PushProviderKind::Fcm, "fcm-token", None)
                .unwrap_err();
            assert_eq!(e, not_initialized);
            assert!(accepted.load(Ordering::SeqCst) >= 1);
            // Plain http never needs the platform verifier: a network error, retried.
            let errors = Arc::new(Errors::default());
            let plain = client("http://127.0.0.1:1".into(), "plain", errors.clone());
            plain.connect();
            std::thread::sleep(Duration::from_millis(300));
            assert!(
                !errors
                    .0
                    .lock()
                    .unwrap()
                    .contains(&(not_initialized.clone(), true)),
                "{:?}",
                errors.0.lock().unwrap()
            );
            tls
        });
        PLATFORM_READY.store(true, Ordering::Release);
        let tls = outcome.unwrap_or_else(|p| std::panic::resume_unwind(p));
        // Initialized: the same request gets the platform's verdict on the certificate.
        match tls.register_push_token(PushProviderKind::Fcm, "fcm-token", None) {
            Err(Error::Certificate(_)) => {}
            other => panic!("expected the platform verifier to refuse: {other:?}"),
        }
        drop(tls);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
