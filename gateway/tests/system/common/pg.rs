//! A fresh PostgreSQL database per test, on the machine's server.
//!
//! `postgres://postgres@127.0.0.1:5432/test` unless `HERALD_TEST_DATABASE_URL` says
//! otherwise; each test gets its own database (`herald_t_<uuid>`), so tests run in
//! parallel. An unreachable server fails the test (never skips): start it with
//! `scripts/ensure-services.sh`.
#![allow(dead_code)]

use sqlx::{Connection, Executor, PgConnection};

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

pub struct PgDb {
    admin_url: String,
    name: String,
    pub url: String,
}

impl PgDb {
    /// The server's URL, with a role allowed to create databases.
    pub fn admin_url() -> String {
        std::env::var("HERALD_TEST_DATABASE_URL")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_PG_URL.to_string())
    }

    pub async fn create() -> PgDb {
        let admin_url = PgDb::admin_url();
        let mut admin = match PgConnection::connect(&admin_url).await {
            Ok(c) => c,
            Err(e) => {
                let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
                panic!(
                    "PostgreSQL is not reachable at {admin_url}: {e}\n\
                     The PostgreSQL tests (store conformance, cluster) need a server{}: start it with \
                     `scripts/ensure-services.sh`, or point HERALD_TEST_DATABASE_URL at one \
                     (a role allowed to CREATE DATABASE).",
                    if ci { " (CI=true)" } else { "" }
                )
            }
        };
        let name = format!("herald_t_{}", uuid::Uuid::new_v4().simple());
        admin
            .execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} on {admin_url}: {e}"));
        let _ = admin.close().await;
        let mut url = reqwest::Url::parse(&admin_url).expect("HERALD_TEST_DATABASE_URL is a URL");
        url.set_path(&format!("/{name}"));
        PgDb {
            admin_url,
            name,
            url: url.to_string(),
        }
    }

    /// Best effort: a leftover `herald_t_*` database is harmless.
    pub async fn drop_db(&self) {
        if let Ok(mut admin) = PgConnection::connect(&self.admin_url).await {
            let _ = admin
                .execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str())
                .await;
            let _ = admin.close().await;
        }
    }
}
