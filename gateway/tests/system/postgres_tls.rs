//! PostgreSQL over TLS, against a real server: a throwaway cluster of this test's own
//! (`initdb`, `ssl = on`, a certificate from a test CA, on a free port of 127.0.0.1),
//! whose `pg_hba.conf` rejects every connection without TLS. The machine's PostgreSQL
//! (127.0.0.1:5432) has no TLS, so it cannot serve here.
//!
//! Needs the PostgreSQL server binaries (`/usr/lib/postgresql/*/bin`, installed by
//! `scripts/ensure-services.sh`, or `HERALD_TEST_PG_BIN`); without them the test fails,
//! it never skips. As root, the cluster runs as the `postgres` user (`runuser`).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::certs::Pki;
use herald_gateway::config::Config;
use herald_gateway::testing::{TempDir, TestGateway};
use serde_json::json;
use sqlx::{Connection, PgConnection, Row};

fn pg_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("HERALD_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().unwrap_or_else(|| {
        panic!(
            "the PostgreSQL TLS test starts a PostgreSQL server of its own and found no \
             /usr/lib/postgresql/*/bin/initdb{}: install the server (scripts/ensure-services.sh, \
             Debian package postgresql) or set HERALD_TEST_PG_BIN",
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                " (CI=true)"
            } else {
                ""
            }
        )
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a PostgreSQL binary, as `postgres` when we are root (the server refuses root).
fn run(bin: &Path, args: &[&str]) -> Output {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    let out = cmd.args(args).output().unwrap_or_else(|e| {
        panic!(
            "cannot run {} (as postgres: {}): {e}",
            bin.display(),
            is_root()
        )
    });
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}\n{}",
        bin.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A PostgreSQL cluster with `ssl = on` that only accepts TLS over TCP; stopped on drop.
struct TlsPostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    pki: Pki,
    _dir: TempDir,
}

impl TlsPostgres {
    fn start() -> TlsPostgres {
        let bin = pg_bin();
        let dir = TempDir::new("herald-pg-tls");
        let pki = Pki::write(&dir.0);
        let data = dir.0.join("data");
        if is_root() {
            let st = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir.0)
                .status()
                .expect("chown");
            assert!(st.success(), "chown -R postgres {}", dir.0.display());
        }
        let data_s = data.to_str().unwrap();
        run(
            &bin.join("initdb"),
            &[
                "-D",
                data_s,
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{dir}'\n\
             ssl = on\nssl_cert_file = '{cert}'\nssl_key_file = '{key}'\n\
             fsync = off\nmax_connections = 60\nshared_buffers = 16MB\n",
            dir = dir.0.display(),
            cert = pki.server_cert.display(),
            key = pki.server_key.display(),
        );
        let mut text = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        text.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), text).unwrap();
        // TLS or nothing over TCP: a connection that stayed plain is rejected.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n",
        )
        .unwrap();
        let log = dir.0.join("postgres.log");
        let started = std::panic::catch_unwind(|| {
            run(
                &bin.join("pg_ctl"),
                &[
                    "-D",
                    data_s,
                    "-l",
                    log.to_str().unwrap(),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            )
        });
        if started.is_err() {
            panic!(
                "PostgreSQL did not start; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        TlsPostgres {
            bin,
            data,
            port,
            pki,
            _dir: dir,
        }
    }

    fn url(&self, host: &str, params: &str) -> String {
        format!(
            "postgres://postgres@{host}:{}/postgres?application_name=herald-tls-test&{params}",
            self.port
        )
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"));
            c
        } else {
            Command::new(self.bin.join("pg_ctl"))
        };
        let _ = cmd
            .args(["-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
    }
}

async fn gateway_on(url: String) -> TestGateway {
    TestGateway::start_with(move |c| {
        c.store = "postgres".into();
        c.database_url = Some(url);
    })
    .await
}

/// Publishes to a device and reads the message back over the REST API.
async fn publish_and_fetch(tg: &TestGateway) {
    common::register(tg, "tls-user", "tls-phone", None).await;
    let v = common::publish(
        tg,
        json!({"to": {"device": "tls-phone"}, "data": {"over": "tls"}, "push": "never"}),
    )
    .await;
    let id = v["message_id"].as_str().unwrap().to_owned();
    let (s, m) = common::get(tg, &format!("/v1/messages/{id}"), &tg.api_key).await;
    assert_eq!(s, 200, "{m}");
    assert_eq!(m["data"], json!({"over": "tls"}), "{m}");
    assert_eq!(m["deliveries"][0]["device_id"], "tls-phone", "{m}");
}

/// (connections of the test's application name, how many of them use TLS, a version).
async fn ssl_connections(pg: &TlsPostgres) -> (i64, i64, Option<String>) {
    let mut c = PgConnection::connect(&pg.url("127.0.0.1", "sslmode=require"))
        .await
        .unwrap();
    let row = sqlx::query(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl), max(s.version) \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.application_name = 'herald-tls-test' AND a.pid <> pg_backend_pid()",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    let _ = c.close().await;
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_talks_to_postgresql_over_tls() {
    let pg = tokio::task::spawn_blocking(TlsPostgres::start)
        .await
        .unwrap();

    // The server refuses plain connections, so everything that works below is TLS.
    let plain = match PgConnection::connect(&pg.url("127.0.0.1", "sslmode=disable")).await {
        Ok(_) => panic!("a plain connection is rejected by pg_hba.conf"),
        Err(e) => e,
    };
    assert!(plain.to_string().contains("no encryption"), "{plain}");

    // sslmode=require: encrypted, the certificate not checked. The gateway works end
    // to end, and the server sees every one of its connections encrypted.
    let tg = gateway_on(pg.url("127.0.0.1", "sslmode=require")).await;
    publish_and_fetch(&tg).await;
    let (total, encrypted, version) = ssl_connections(&pg).await;
    assert!(total >= 1, "no gateway connection seen in pg_stat_activity");
    assert_eq!(encrypted, total, "a gateway connection is not encrypted");
    assert!(
        version.as_deref().is_some_and(|v| v.starts_with("TLSv1.")),
        "{version:?}"
    );
    tg.stop().await;

    // verify-full with the CA that signed the server's certificate, by IP and by name.
    let ca = pg.pki.ca.display().to_string();
    for host in ["127.0.0.1", "localhost"] {
        let tg = gateway_on(pg.url(host, &format!("sslmode=verify-full&sslrootcert={ca}"))).await;
        publish_and_fetch(&tg).await;
        tg.stop().await;
    }

    // verify-full with another CA: the gateway does not start, and says why.
    let wrong = pg.pki.other_ca.display().to_string();
    let dir = TempDir::new("herald-pg-tls-wrong");
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.0.clone(),
        store: "postgres".into(),
        database_url: Some(pg.url(
            "127.0.0.1",
            &format!("sslmode=verify-full&sslrootcert={wrong}"),
        )),
        ..Config::default()
    };
    let err = match tokio::time::timeout(
        Duration::from_secs(30),
        herald_gateway::Application::build(config),
    )
    .await
    .expect("a refused certificate fails at once, it is not retried")
    {
        Ok(_) => panic!("the gateway started with a server certificate its root does not sign"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("cannot connect to PostgreSQL"), "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    // The password-free URL is shown, with the host and port.
    assert!(err.contains(&format!("127.0.0.1:{}", pg.port)), "{err}");
}
