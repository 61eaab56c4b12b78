//! Checks of a loaded `Config` that `herald serve` and `herald config check` share, so
//! they cannot disagree: everything here is free of side effects (it reads the key files
//! the config names, and nothing else: no directory created, no database opened, no
//! port bound, no network). `serve` runs the same checks before it touches anything.

use std::path::Path;
use std::sync::Arc;

use herald_protocol::PushProviderKind;

use crate::config::Config;
use crate::push::stub::StubProvider;
use crate::push::PushProvider;
use crate::settings::{catalog, is_secret_key, OTHER_ENV};

/// Everything wrong with `cfg`, each message naming the setting to fix; empty when
/// `serve` would accept it. Push providers are checked by [`push_providers`].
pub fn problems(cfg: &Config) -> Vec<String> {
    let mut errors = Vec::new();
    let mut err = |m: String| errors.push(m);

    match cfg.store.as_str() {
        "sqlite" => {
            if let Some(m) = data_dir_problem(&cfg.data_dir) {
                err(m);
            }
        }
        "postgres" => match cfg.database_url.as_deref() {
            None => err(
                "store \"postgres\" needs database_url (config key, or HERALD_DATABASE_URL), \
                 e.g. postgres://herald:secret@127.0.0.1:5432/herald"
                    .into(),
            ),
            Some(url) if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) => {
                err(format!(
                    "database_url must be a postgres:// URL, not {:?}",
                    redact_url(url)
                ))
            }
            Some(_) => {}
        },
        other => err(format!(
            "store {other:?} is not supported; use \"sqlite\" or \"postgres\" (HERALD_STORE)"
        )),
    }
    match cfg.bus.as_str() {
        "local" => {}
        "nats" => {
            if cfg.store != "postgres" {
                err(
                    "bus \"nats\" routes between nodes that share one store; set store = \
                     \"postgres\" (HERALD_STORE=postgres) and database_url"
                        .into(),
                );
            }
            if cfg.nats.url.split(',').all(|u| u.trim().is_empty()) {
                err(
                    "nats.url is empty; set it to the NATS server(s), e.g. nats://127.0.0.1:4222"
                        .into(),
                );
            }
        }
        other => err(format!(
            "bus {other:?} is not supported; use \"local\" or \"nats\" (HERALD_BUS)"
        )),
    }
    if let Some(ops) = cfg.ops.listen {
        if ops == cfg.listen && ops.port() != 0 {
            err(format!(
                "ops.listen {ops} is the same address as listen; give the ops listener its own \
                 port, or leave ops.listen unset"
            ));
        }
    }

    let a = &cfg.auth;
    match a.jwt_algorithm.to_ascii_uppercase().as_str() {
        "HS256" => {
            if matches!(&a.jwt_secret, Some(s) if s.len() < 32) {
                err(
                    "auth.jwt_secret must be at least 32 characters; generate one with \
                     `openssl rand -hex 32`"
                        .into(),
                );
            }
        }
        alg @ ("RS256" | "ES256") => match (&a.jwks_url, &a.jwt_public_key_file) {
            (Some(_), Some(_)) => {
                err("set one of auth.jwks_url and auth.jwt_public_key_file, not both".into())
            }
            (Some(url), None) => {
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    err(format!("auth.jwks_url must be an http(s) URL, not {url:?}"));
                }
            }
            (None, Some(path)) => {
                if let Err(m) = check_public_key(alg, path) {
                    err(m);
                }
            }
            (None, None) => err(format!(
                "auth.jwt_algorithm = {alg} needs auth.jwks_url (a JWKS) or \
                 auth.jwt_public_key_file (a PEM public key)"
            )),
        },
        other => err(format!(
            "auth.jwt_algorithm {other:?} is not supported; use HS256, RS256 or ES256"
        )),
    }
    if a.default_token_ttl_seconds == 0 || a.default_token_ttl_seconds > a.max_token_ttl_seconds {
        err(format!(
            "auth.default_token_ttl_seconds ({}) must be between 1 and \
             auth.max_token_ttl_seconds ({})",
            a.default_token_ttl_seconds, a.max_token_ttl_seconds
        ));
    }

    let d = &cfg.delivery;
    if d.default_ttl_seconds == 0 || d.default_ttl_seconds > d.max_ttl_seconds {
        err(format!(
            "delivery.default_ttl_seconds ({}) must be between 1 and delivery.max_ttl_seconds ({})",
            d.default_ttl_seconds, d.max_ttl_seconds
        ));
    }
    let l = &cfg.limits;
    let positive: [(&str, u64); 12] = [
        ("delivery.ack_timeout_ms", d.ack_timeout_ms),
        ("delivery.heartbeat_ms", d.heartbeat_ms),
        ("delivery.session_queue", d.session_queue as u64),
        ("delivery.replay_batch", d.replay_batch as u64),
        ("limits.max_message_bytes", l.max_message_bytes as u64),
        ("limits.max_batch_bytes", l.max_batch_bytes as u64),
        ("limits.max_body_bytes", l.max_body_bytes as u64),
        ("limits.max_ws_frame_bytes", l.max_ws_frame_bytes as u64),
        ("limits.ws_read_buffer_bytes", l.ws_read_buffer_bytes as u64),
        ("limits.request_timeout_ms", l.request_timeout_ms),
        ("limits.header_read_timeout_ms", l.header_read_timeout_ms),
        ("limits.idle_timeout_ms", l.idle_timeout_ms),
    ];
    for (name, v) in positive {
        if v == 0 {
            err(format!("{name} must be greater than 0"));
        }
    }
    let p = &cfg.push;
    if p.workers == 0 || p.queue == 0 {
        err("push.workers and push.queue must be greater than 0".into());
    }
    if p.base_backoff_ms > p.max_backoff_ms {
        err(format!(
            "push.base_backoff_ms ({}) must not exceed push.max_backoff_ms ({})",
            p.base_backoff_ms, p.max_backoff_ms
        ));
    }
    errors
}

/// `Err` with every problem, one per line, when `cfg` is not one `serve` accepts.
pub fn check(cfg: &Config) -> anyhow::Result<()> {
    let problems = problems(cfg);
    if problems.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "invalid configuration ({} problem{}):\n  - {}",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" },
        problems.join("\n  - ")
    )
}

/// The push providers `cfg` names (stubs if `push.stub`), built as `serve` builds them:
/// key files read and parsed, nothing sent.
pub fn push_providers(cfg: &Config) -> anyhow::Result<Vec<Arc<dyn PushProvider>>> {
    let mut providers: Vec<Arc<dyn PushProvider>> = Vec::new();
    if cfg.push.stub {
        providers.push(Arc::new(StubProvider::new(PushProviderKind::Apns)));
        providers.push(Arc::new(StubProvider::new(PushProviderKind::Fcm)));
    } else {
        if let Some(fcm) = &cfg.push.fcm {
            providers.push(fcm.build()?);
        }
        if let Some(apns) = &cfg.push.apns {
            providers.push(apns.build()?);
        }
    }
    Ok(providers)
}

/// Where the SQLite store goes must be a directory, or creatable as one.
fn data_dir_problem(dir: &Path) -> Option<String> {
    if dir.exists() {
        if !dir.is_dir() {
            return Some(format!(
                "data_dir {} exists and is not a directory (HERALD_DATA_DIR, --data-dir)",
                dir.display()
            ));
        }
        return (!writable(dir)).then(|| {
            format!(
                "data_dir {} is not writable by this user (HERALD_DATA_DIR, --data-dir)",
                dir.display()
            )
        });
    }
    let absolute = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
    let ancestor = absolute.ancestors().skip(1).find(|p| p.exists())?;
    if !ancestor.is_dir() || !writable(ancestor) {
        return Some(format!(
            "data_dir {} does not exist and cannot be created: {} is not a writable directory \
             (HERALD_DATA_DIR, --data-dir)",
            dir.display(),
            ancestor.display()
        ));
    }
    None
}

fn writable(p: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated path; access(2) only reads it.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

fn check_public_key(alg: &str, path: &Path) -> Result<(), String> {
    let pem = std::fs::read(path).map_err(|e| {
        format!(
            "auth.jwt_public_key_file {}: cannot read it: {e}",
            path.display()
        )
    })?;
    let parsed = if alg == "RS256" {
        jsonwebtoken::DecodingKey::from_rsa_pem(&pem).map(drop)
    } else {
        jsonwebtoken::DecodingKey::from_ec_pem(&pem).map(drop)
    };
    parsed.map_err(|e| {
        format!(
            "auth.jwt_public_key_file {} is not a PEM {} public key: {e}",
            path.display(),
            if alg == "RS256" { "RSA" } else { "EC (P-256)" }
        )
    })
}

// ---- unknown HERALD_* variables ---------------------------------------------------

fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A warning for each `HERALD_*` variable that is neither a setting nor one of
/// [`OTHER_ENV`], with the closest setting's name when one is close.
pub fn unknown_env_vars(vars: impl IntoIterator<Item = String>) -> Vec<String> {
    let Ok(c) = catalog() else {
        return Vec::new();
    };
    let known: Vec<&str> = c
        .settings
        .iter()
        .map(|s| s.env.as_str())
        .chain(OTHER_ENV.iter().map(|(n, _)| *n))
        .collect();
    let mut out = Vec::new();
    let mut vars: Vec<String> = vars
        .into_iter()
        .filter(|v| v.starts_with("HERALD_"))
        .collect();
    vars.sort();
    for var in vars {
        if known.contains(&var.as_str()) {
            continue;
        }
        let last = |s: &str| -> String {
            s.trim_start_matches("HERALD_")
                .rsplit("__")
                .next()
                .unwrap_or("")
                .to_owned()
        };
        let same_key = known
            .iter()
            .filter(|k| last(k) == last(&var) && !last(&var).is_empty())
            .min_by_key(|k| distance(k, &var));
        let close = known
            .iter()
            .map(|k| (distance(k, &var), *k))
            .min()
            .filter(|(d, _)| *d <= 3);
        let hint = same_key
            .copied()
            .or(close.map(|(_, k)| k))
            .map(|k| format!("; did you mean {k}?"))
            .unwrap_or_default();
        out.push(format!(
            "unknown environment variable {var} is ignored (not a Herald setting{hint})"
        ));
    }
    out
}

// ---- redaction --------------------------------------------------------------------

/// A URL (or a comma-separated list of them) with the password of each replaced.
pub fn redact_url(s: &str) -> String {
    s.split(',')
        .map(|part| {
            let mut part = part.to_owned();
            if let Some(scheme_end) = part.find("://") {
                let rest = &part[scheme_end + 3..];
                let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
                if let Some(at) = rest[..authority_end].rfind('@') {
                    if let Some(colon) = rest[..at].find(':') {
                        let start = scheme_end + 3 + colon + 1;
                        let end = scheme_end + 3 + at;
                        part.replace_range(start..end, "<redacted>");
                    }
                }
            }
            // postgres://...?password=... (libpq style)
            if let Some(i) = part.find("password=") {
                let start = i + "password=".len();
                let end = part[start..]
                    .find('&')
                    .map(|e| start + e)
                    .unwrap_or(part.len());
                part.replace_range(start..end, "<redacted>");
            }
            part
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn redact(v: &mut toml::Value) {
    if let toml::Value::Table(t) = v {
        for (k, child) in t.iter_mut() {
            match child {
                toml::Value::Table(_) => redact(child),
                _ if is_secret_key(k) => *child = toml::Value::String("<redacted>".into()),
                toml::Value::String(s) if s.contains("://") => *s = redact_url(s),
                _ => {}
            }
        }
    }
}

/// The effective configuration as TOML with every secret replaced by `<redacted>`
/// (and URL passwords); fields that are never serialized (inline keys) stay absent.
pub fn redacted_toml(cfg: &Config) -> anyhow::Result<String> {
    let mut v = toml::Value::try_from(cfg)?;
    redact(&mut v);
    Ok(toml::to_string_pretty(&v)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(
            redact_url("postgres://herald:s3cret@db:5432/herald"),
            "postgres://herald:<redacted>@db:5432/herald"
        );
        assert_eq!(
            redact_url("postgres://db/herald?user=h&password=s3cret&sslmode=require"),
            "postgres://db/herald?user=h&password=<redacted>&sslmode=require"
        );
        assert_eq!(
            redact_url("nats://a:p1@n1:4222,nats://b:p2@n2:4222"),
            "nats://a:<redacted>@n1:4222,nats://b:<redacted>@n2:4222"
        );
        assert_eq!(redact_url("nats://n1:4222"), "nats://n1:4222");
    }

    #[test]
    fn unknown_variables_get_a_suggestion() {
        let w = unknown_env_vars([
            "HERALD_LIMITS__MAX_MESAGE_BYTES".to_string(),
            "HERALD_JWT_SECRET".to_string(),
            "HERALD_LISTEN".to_string(),
            "HERALD_LOG".to_string(),
            "PATH".to_string(),
        ]);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("HERALD_JWT_SECRET") && w[0].contains("HERALD_AUTH__JWT_SECRET"),
            "{w:?}"
        );
        assert!(w[1].contains("did you mean HERALD_LIMITS__MAX_MESSAGE_BYTES?"));
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(problems(&Config::default()), Vec::<String>::new());
    }
}
