//! `[push.fcm]` and `[push.apns]` settings and the constructors of the real providers.
//!
//! Secrets (inline service-account JSON, inline .p8 key, certificate password) are
//! redacted from `Debug` and never serialized, so dumping the effective config is safe.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use herald_protocol::ApnsEnvironment;
use serde::{Deserialize, Serialize};

use super::apns::{ApnsAuth, ApnsProvider};
use super::fcm::{FcmOptions, FcmProvider, ServiceAccount};
use super::payload::Secret;
use super::PushProvider;

/// Why a push provider could not be built. Messages name the setting to fix and never
/// contain key material.
#[derive(Debug, thiserror::Error)]
pub enum PushConfigError {
    #[error("[push.{section}] {field} is required: {hint}")]
    Missing {
        section: &'static str,
        field: &'static str,
        hint: &'static str,
    },
    #[error("[push.{section}] {message}")]
    Invalid {
        section: &'static str,
        message: String,
    },
    #[error("[push.{section}] cannot read {field} {path:?}: {source}; check the path and its permissions")]
    ReadFile {
        section: &'static str,
        field: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl PushConfigError {
    pub(crate) fn invalid(section: &'static str, message: impl Into<String>) -> Self {
        PushConfigError::Invalid {
            section,
            message: message.into(),
        }
    }
}

fn read_file(
    section: &'static str,
    field: &'static str,
    path: &Path,
) -> Result<Vec<u8>, PushConfigError> {
    std::fs::read(path).map_err(|source| PushConfigError::ReadFile {
        section,
        field,
        path: path.to_path_buf(),
        source,
    })
}

fn redacted<T>(v: &Option<T>) -> Option<&'static str> {
    v.as_ref().map(|_| "<redacted>")
}

/// `[push.fcm]`: Firebase Cloud Messaging HTTP v1 with a service account.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FcmConfig {
    /// Firebase project id; defaults to the service account's `project_id`.
    pub project_id: Option<String>,
    /// Path of the service-account JSON key downloaded from the Firebase console.
    pub service_account_file: Option<PathBuf>,
    /// The service-account JSON itself (e.g. from a secret store via the environment).
    /// Takes precedence over `service_account_file`. Never serialized.
    #[serde(skip_serializing)]
    pub service_account_json: Option<String>,
    /// FCM endpoint; default `https://fcm.googleapis.com`. For tests and proxies.
    pub base_url: Option<String>,
    /// OAuth token endpoint; defaults to the service account's `token_uri`.
    pub token_uri: Option<String>,
    /// Timeout of one HTTP request (token exchange or send).
    pub timeout_ms: u64,
}

impl Default for FcmConfig {
    fn default() -> Self {
        FcmConfig {
            project_id: None,
            service_account_file: None,
            service_account_json: None,
            base_url: None,
            token_uri: None,
            timeout_ms: 10_000,
        }
    }
}

impl fmt::Debug for FcmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FcmConfig")
            .field("project_id", &self.project_id)
            .field("service_account_file", &self.service_account_file)
            .field(
                "service_account_json",
                &redacted(&self.service_account_json),
            )
            .field("base_url", &self.base_url)
            .field("token_uri", &self.token_uri)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

impl FcmConfig {
    /// The provider these settings describe; reads and checks the service account.
    pub fn provider(&self) -> Result<FcmProvider, PushConfigError> {
        let account = match (&self.service_account_json, &self.service_account_file) {
            (Some(json), _) => ServiceAccount::from_json(json)?,
            (None, Some(path)) => {
                let bytes = read_file("fcm", "service_account_file", path)?;
                let text = String::from_utf8(bytes).map_err(|_| {
                    PushConfigError::invalid(
                        "fcm",
                        format!("service_account_file {path:?} is not UTF-8 JSON"),
                    )
                })?;
                ServiceAccount::from_json(&text)?
            }
            (None, None) => {
                return Err(PushConfigError::Missing {
                    section: "fcm",
                    field: "service_account_file",
                    hint: "set service_account_file to the service-account JSON key from the \
                           Firebase console (Project settings > Service accounts), or put the \
                           JSON itself in service_account_json",
                })
            }
        };
        if self.timeout_ms == 0 {
            return Err(PushConfigError::invalid(
                "fcm",
                "timeout_ms must be greater than 0",
            ));
        }
        let options = FcmOptions {
            project_id: self.project_id.clone(),
            base_url: self
                .base_url
                .clone()
                .unwrap_or_else(|| FcmOptions::DEFAULT_BASE_URL.to_string()),
            token_uri: self.token_uri.clone(),
            timeout: Duration::from_millis(self.timeout_ms),
        };
        FcmProvider::new(account, options)
    }

    pub fn build(&self) -> Result<Arc<dyn PushProvider>, PushConfigError> {
        Ok(Arc::new(self.provider()?))
    }
}

/// `[push.apns]`: Apple Push Notification service.
///
/// Token auth (recommended): `key_file` (or inline `key_pem`) + `key_id` + `team_id`.
/// Certificate auth: `certificate_file` (PEM certificate) + `certificate_key_file` (PEM
/// PKCS#8 key). PKCS#12 (.p12) files are not supported by this build (no OpenSSL);
/// convert them with `openssl pkcs12 -in cert.p12 -clcerts -nokeys -out cert.pem` and
/// `openssl pkcs12 -in cert.p12 -nocerts -nodes | openssl pkcs8 -topk8 -nocrypt -out key.pem`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApnsConfig {
    /// The .p8 signing key from the Apple developer account (Keys).
    pub key_file: Option<PathBuf>,
    /// The .p8 key's PEM text itself; takes precedence over `key_file`. Never serialized.
    #[serde(skip_serializing)]
    pub key_pem: Option<String>,
    /// 10-character Key ID of the .p8 key.
    pub key_id: Option<String>,
    /// 10-character Team ID of the developer account.
    pub team_id: Option<String>,
    /// The app's bundle id (`apns-topic`).
    pub topic: Option<String>,
    /// PEM client certificate (certificate auth).
    pub certificate_file: Option<PathBuf>,
    /// PEM PKCS#8 private key of the client certificate.
    pub certificate_key_file: Option<PathBuf>,
    /// Only meaningful for PKCS#12, which this build rejects with conversion advice.
    #[serde(skip_serializing)]
    pub certificate_password: Option<String>,
    /// Environment of devices registered without `apns_environment`.
    pub default_environment: ApnsEnvironment,
    /// Timeout of one request to APNs (whole seconds, at least 1).
    pub timeout_ms: u64,
}

impl Default for ApnsConfig {
    fn default() -> Self {
        ApnsConfig {
            key_file: None,
            key_pem: None,
            key_id: None,
            team_id: None,
            topic: None,
            certificate_file: None,
            certificate_key_file: None,
            certificate_password: None,
            default_environment: ApnsEnvironment::Production,
            timeout_ms: 10_000,
        }
    }
}

impl fmt::Debug for ApnsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApnsConfig")
            .field("key_file", &self.key_file)
            .field("key_pem", &redacted(&self.key_pem))
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .field("topic", &self.topic)
            .field("certificate_file", &self.certificate_file)
            .field("certificate_key_file", &self.certificate_key_file)
            .field(
                "certificate_password",
                &redacted(&self.certificate_password),
            )
            .field("default_environment", &self.default_environment)
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

fn looks_like_pkcs12(path: &Path, bytes: &[u8]) -> bool {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    matches!(ext.as_deref(), Some("p12" | "pfx")) || !bytes.starts_with(b"-----")
}

impl ApnsConfig {
    /// The provider these settings describe; reads the key and checks it signs.
    pub fn provider(&self) -> Result<ApnsProvider, PushConfigError> {
        let topic = self.topic.clone().filter(|t| !t.trim().is_empty()).ok_or(
            PushConfigError::Missing {
                section: "apns",
                field: "topic",
                hint: "set topic to the app's bundle id, e.g. \"com.example.app\"",
            },
        )?;
        let token_auth = self.key_pem.is_some() || self.key_file.is_some();
        let cert_auth = self.certificate_file.is_some();
        let auth = match (token_auth, cert_auth) {
            (true, true) => {
                return Err(PushConfigError::invalid(
                    "apns",
                    "both a token key (key_file/key_pem) and certificate_file are set; \
                     keep one (token auth with a .p8 key is recommended)",
                ))
            }
            (false, false) => {
                return Err(PushConfigError::Missing {
                    section: "apns",
                    field: "key_file",
                    hint: "set key_file (the .p8 key) with key_id and team_id, or \
                           certificate_file with certificate_key_file",
                })
            }
            (true, false) => {
                let key_pem = match (&self.key_pem, &self.key_file) {
                    (Some(pem), _) => pem.clone().into_bytes(),
                    (None, Some(path)) => read_file("apns", "key_file", path)?,
                    (None, None) => unreachable!("token_auth"),
                };
                let key_id = self.key_id.clone().ok_or(PushConfigError::Missing {
                    section: "apns",
                    field: "key_id",
                    hint: "set key_id to the 10-character Key ID shown next to the .p8 key \
                           in the Apple developer account",
                })?;
                let team_id = self.team_id.clone().ok_or(PushConfigError::Missing {
                    section: "apns",
                    field: "team_id",
                    hint: "set team_id to the 10-character Team ID of the Apple developer \
                           account",
                })?;
                ApnsAuth::Token {
                    key_pem: Secret::new(key_pem),
                    key_id,
                    team_id,
                }
            }
            (false, true) => {
                let path = self.certificate_file.as_ref().expect("cert_auth");
                let cert_pem = read_file("apns", "certificate_file", path)?;
                if self.certificate_password.is_some() || looks_like_pkcs12(path, &cert_pem) {
                    return Err(PushConfigError::invalid(
                        "apns",
                        format!(
                            "certificate_file {path:?} looks like PKCS#12 (.p12), which this \
                             build cannot read; convert it to PEM: `openssl pkcs12 -in cert.p12 \
                             -clcerts -nokeys -out cert.pem` and `openssl pkcs12 -in cert.p12 \
                             -nocerts -nodes | openssl pkcs8 -topk8 -nocrypt -out key.pem`, then \
                             set certificate_file and certificate_key_file and remove \
                             certificate_password (or better, use a .p8 token key)"
                        ),
                    ));
                }
                let key_path =
                    self.certificate_key_file
                        .as_ref()
                        .ok_or(PushConfigError::Missing {
                            section: "apns",
                            field: "certificate_key_file",
                            hint: "set certificate_key_file to the PEM (PKCS#8) private key of \
                               certificate_file",
                        })?;
                let key_pem = read_file("apns", "certificate_key_file", key_path)?;
                ApnsAuth::Certificate {
                    cert_pem,
                    key_pem: Secret::new(key_pem),
                }
            }
        };
        if self.timeout_ms == 0 {
            return Err(PushConfigError::invalid(
                "apns",
                "timeout_ms must be greater than 0",
            ));
        }
        ApnsProvider::new(
            auth,
            topic,
            self.default_environment,
            Duration::from_millis(self.timeout_ms),
        )
    }

    pub fn build(&self) -> Result<Arc<dyn PushProvider>, PushConfigError> {
        Ok(Arc::new(self.provider()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_secrets() {
        let fcm = FcmConfig {
            service_account_json: Some("{\"private_key\": \"SECRET\"}".into()),
            ..Default::default()
        };
        let apns = ApnsConfig {
            key_pem: Some("SECRET".into()),
            certificate_password: Some("SECRET".into()),
            ..Default::default()
        };
        for s in [format!("{fcm:?}"), format!("{apns:?}")] {
            assert!(!s.contains("SECRET"), "{s}");
            assert!(s.contains("<redacted>"), "{s}");
        }
        let ser = serde_json::to_string(&fcm).unwrap() + &serde_json::to_string(&apns).unwrap();
        assert!(!ser.contains("SECRET"), "{ser}");
    }

    #[test]
    fn toml_sections_parse() {
        let fcm: FcmConfig = toml::from_str(
            r#"
            service_account_file = "/etc/herald/fcm.json"
            base_url = "http://127.0.0.1:9000"
            timeout_ms = 5000
            "#,
        )
        .unwrap();
        assert_eq!(fcm.timeout_ms, 5000);
        assert_eq!(fcm.project_id, None);
        let apns: ApnsConfig = toml::from_str(
            r#"
            key_file = "/etc/herald/AuthKey_ABC123DEFG.p8"
            key_id = "ABC123DEFG"
            team_id = "DEF123GHIJ"
            topic = "com.example.app"
            default_environment = "sandbox"
            "#,
        )
        .unwrap();
        assert_eq!(apns.default_environment, ApnsEnvironment::Sandbox);
        assert_eq!(apns.timeout_ms, 10_000);
        assert!(toml::from_str::<ApnsConfig>("colour = 1").is_err());
    }

    #[test]
    fn missing_settings_say_what_to_fix() {
        let err = FcmConfig::default().provider().unwrap_err().to_string();
        assert!(err.contains("service_account_file"), "{err}");
        let err = ApnsConfig::default().provider().unwrap_err().to_string();
        assert!(err.contains("topic"), "{err}");
        let err = ApnsConfig {
            topic: Some("com.example.app".into()),
            ..Default::default()
        }
        .provider()
        .unwrap_err()
        .to_string();
        assert!(err.contains("key_file"), "{err}");
        let err = ApnsConfig {
            topic: Some("com.example.app".into()),
            key_pem: Some("not a key".into()),
            ..Default::default()
        }
        .provider()
        .unwrap_err()
        .to_string();
        assert!(err.contains("key_id"), "{err}");
        let err = ApnsConfig {
            topic: Some("com.example.app".into()),
            key_file: Some("/nonexistent/AuthKey.p8".into()),
            key_id: Some("K".into()),
            team_id: Some("T".into()),
            ..Default::default()
        }
        .provider()
        .unwrap_err()
        .to_string();
        assert!(err.contains("cannot read key_file"), "{err}");
    }
}
