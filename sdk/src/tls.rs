//! TLS of the WebSocket and HTTP paths: the platform's certificate store, and optional
//! certificate pinning on top of it.
//!
//! Certificates are validated by the operating system's verifier
//! (`rustls-platform-verifier`): Security.framework on iOS/macOS (user- and
//! MDM-installed CAs included), the system trust store on Windows, and on Linux the
//! system bundle (`SSL_CERT_FILE` / `SSL_CERT_DIR` when set, as OpenSSL does). On
//! Android, where that verifier needs a JNI context the SDK does not have yet, the
//! Mozilla roots (`webpki-roots`) are used, as before.
//!
//! With `Config::pinned_spki_sha256` set, a server certificate that passed validation
//! is also required to carry a pinned key: the base64 SHA-256 of the
//! SubjectPublicKeyInfo of the server's certificate or of one of the intermediates it
//! sends (the `sha256/…` pins of OkHttp and of HPKP). Pinning never replaces
//! validation.

use std::fmt;
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

#[cfg(not(target_os = "android"))]
fn platform_verifier(
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, Error> {
    rustls_platform_verifier::Verifier::new(provider)
        .map(|v| Arc::new(v) as Arc<dyn ServerCertVerifier>)
        .map_err(|e| {
            Error::InvalidConfig(format!(
                "TLS: cannot use the platform's certificate store: {e}"
            ))
        })
}

#[cfg(target_os = "android")]
fn platform_verifier(
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, Error> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map(|v| v as Arc<dyn ServerCertVerifier>)
        .map_err(|e| Error::InvalidConfig(format!("TLS: {e}")))
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
}
