//! `herald config check|print|docs` and `herald healthcheck`, run as the real binary:
//! a good configuration passes; each class of mistake exits non-zero with a message
//! naming the setting and creates nothing (no data directory, so no store); unknown
//! `HERALD_*` variables are warned about; `print` never shows a secret; `serve` refuses
//! what `check` refuses, also before creating anything.

use crate::common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::fcm_mock::test_keys;
use common::process::{toml_string, HeraldProcess, BIN};
use herald_gateway::testing::TempDir;

/// `herald ARGS` with `envs` and no other `HERALD_*` variable from the test's own
/// environment (the runner's must not change the outcome).
fn herald(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("HERALD_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("run herald")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

struct Setup {
    tmp: TempDir,
    data: PathBuf,
    file: PathBuf,
}

impl Setup {
    /// A config file whose data_dir does not exist yet.
    fn new(body: &str) -> Setup {
        let tmp = TempDir::new("herald-config");
        let data = tmp.0.join("data");
        let file = tmp.0.join("herald.toml");
        std::fs::write(
            &file,
            format!("data_dir = {}\n{body}", toml_string(data.to_str().unwrap())),
        )
        .unwrap();
        Setup { tmp, data, file }
    }

    fn write(&self, name: &str, content: &str) -> String {
        let p = self.tmp.0.join(name);
        std::fs::write(&p, content).unwrap();
        toml_string(p.to_str().unwrap())
    }

    fn run(&self, args: &[&str], envs: &[(&str, &str)]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--config", self.file.to_str().unwrap()]);
        herald(&all, envs)
    }

    fn assert_nothing_created(&self) {
        assert!(
            !self.data.exists(),
            "{} was created by a command that must not create anything",
            self.data.display()
        );
    }
}

fn service_account(private_key: &str) -> String {
    serde_json::json!({
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": "k1",
        "private_key": private_key,
        "client_email": "herald-test@test-project.iam.gserviceaccount.com",
        "token_uri": "http://127.0.0.1:9/token",
    })
    .to_string()
}

#[test]
fn check_accepts_a_good_config_and_creates_nothing() {
    let (private, public) = test_keys();
    let s = Setup::new("");
    let key = s.write("jwt.pub.pem", public);
    let account = s.write("fcm.json", &service_account(private));
    std::fs::write(
        &s.file,
        format!(
            "data_dir = {}\nlisten = \"127.0.0.1:18099\"\n[auth]\njwt_algorithm = \"RS256\"\n\
             jwt_public_key_file = {key}\n[push.fcm]\nservice_account_file = {account}\n",
            toml_string(s.data.to_str().unwrap())
        ),
    )
    .unwrap();
    let out = s.run(&["config", "check"], &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("configuration OK") && stdout.contains("1 push provider"),
        "{stdout}"
    );
    assert!(!stderr.contains("warning"), "{stderr}");
    s.assert_nothing_created();
}

/// One class of mistake: the file body (and env), the words the error must contain.
fn assert_refused(body: &str, envs: &[(&str, &str)], expect: &[&str]) {
    let s = Setup::new(body);
    let out = s.run(&["config", "check"], envs);
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "config check must fail for {body:?} {envs:?}: {stdout}\n{stderr}"
    );
    for e in expect {
        assert!(stderr.contains(e), "no {e:?} in: {stderr}");
    }
    assert!(!stdout.contains("configuration OK"), "{stdout}");
    s.assert_nothing_created();
}

#[test]
fn check_refuses_store_and_bus_mistakes() {
    assert_refused(
        "store = \"postgres\"\n",
        &[],
        &["store \"postgres\" needs database_url"],
    );
    assert_refused(
        "store = \"postgres\"\ndatabase_url = \"mysql://h:pw@db/h\"\n",
        &[],
        &["database_url must be a postgres:// URL", "h:<redacted>@db"],
    );
    assert_refused(
        "store = \"mongo\"\n",
        &[],
        &["store \"mongo\" is not supported"],
    );
    assert_refused(
        "bus = \"nats\"\n",
        &[],
        &["bus \"nats\"", "store = \"postgres\""],
    );
    // The same mistake made through the environment.
    assert_refused(
        "",
        &[("HERALD_BUS", "redis")],
        &["bus \"redis\" is not supported"],
    );
}

#[test]
fn check_refuses_jwt_mistakes() {
    assert_refused(
        "[auth]\njwt_secret = \"short\"\n",
        &[],
        &["auth.jwt_secret must be at least 32 characters"],
    );
    assert_refused(
        "[auth]\njwt_algorithm = \"HS512\"\n",
        &[],
        &["auth.jwt_algorithm \"HS512\" is not supported"],
    );
    assert_refused(
        "[auth]\njwt_algorithm = \"RS256\"\n",
        &[],
        &["needs auth.jwks_url", "auth.jwt_public_key_file"],
    );
    assert_refused(
        "[auth]\njwt_algorithm = \"RS256\"\njwt_public_key_file = \"/nonexistent/key.pem\"\n",
        &[],
        &["auth.jwt_public_key_file /nonexistent/key.pem: cannot read it"],
    );
    let s = Setup::new("");
    let garbage = s.write(
        "not-a-key.pem",
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    );
    assert_refused(
        &format!("[auth]\njwt_algorithm = \"ES256\"\njwt_public_key_file = {garbage}\n"),
        &[],
        &["is not a PEM EC (P-256) public key"],
    );
    assert_refused(
        "[auth]\ndefault_token_ttl_seconds = 100\nmax_token_ttl_seconds = 10\n",
        &[],
        &["auth.default_token_ttl_seconds (100) must be between 1 and auth.max_token_ttl_seconds (10)"],
    );
}

#[test]
fn check_refuses_push_provider_mistakes() {
    assert_refused(
        "[push.fcm]\nservice_account_file = \"/nonexistent/fcm.json\"\n",
        &[],
        &[
            "[push.fcm] cannot read service_account_file",
            "/nonexistent/fcm.json",
        ],
    );
    let s = Setup::new("");
    let bad = s.write("fcm.json", &service_account("not a key"));
    assert_refused(
        &format!("[push.fcm]\nservice_account_file = {bad}\n"),
        &[],
        &["[push.fcm]"],
    );
    assert_refused(
        "[push.apns]\nkey_file = \"/nonexistent/AuthKey.p8\"\nkey_id = \"ABC123DEFG\"\n\
         team_id = \"DEF123GHIJ\"\ntopic = \"com.example.app\"\n",
        &[],
        &["[push.apns] cannot read key_file"],
    );
    assert_refused(
        "[push.apns]\nkey_id = \"ABC123DEFG\"\n",
        &[],
        &["[push.apns] topic is required"],
    );
}

#[test]
fn check_refuses_limits_out_of_range_and_lists_every_problem() {
    assert_refused(
        "[limits]\nmax_message_bytes = 0\nidle_timeout_ms = 0\n[delivery]\n\
         default_ttl_seconds = 100\nmax_ttl_seconds = 50\n",
        &[],
        &[
            "limits.max_message_bytes must be greater than 0",
            "limits.idle_timeout_ms must be greater than 0",
            "delivery.default_ttl_seconds (100) must be between 1 and delivery.max_ttl_seconds (50)",
            "3 problems",
        ],
    );
    assert_refused(
        "[push]\nbase_backoff_ms = 5000\nmax_backoff_ms = 10\n",
        &[],
        &["push.base_backoff_ms (5000) must not exceed push.max_backoff_ms (10)"],
    );
}

#[test]
fn check_refuses_what_load_refuses() {
    assert_refused("colour = \"blue\"\n", &[], &["herald.toml", "colour"]);
    assert_refused(
        "",
        &[("HERALD_LIMITS__MAX_MESSAGE_BYTES", "lots")],
        &["HERALD_LIMITS__MAX_MESSAGE_BYTES"],
    );
    // A data_dir that cannot be created (its parent is a file).
    let s = Setup::new("");
    let file = s.tmp.0.join("a-file");
    std::fs::write(&file, "").unwrap();
    let dir = file.join("data");
    std::fs::write(
        &s.file,
        format!("data_dir = {}\n", toml_string(dir.to_str().unwrap())),
    )
    .unwrap();
    let out = s.run(&["config", "check"], &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("data_dir") && stderr.contains("cannot be created"),
        "{stderr}"
    );
}

#[test]
fn check_warns_about_unknown_herald_variables_with_a_suggestion() {
    let s = Setup::new("");
    let out = s.run(
        &["config", "check"],
        &[
            ("HERALD_LIMITS__MAX_MESAGE_BYTES", "1000"),
            ("HERALD_LIMITS__MAX_MESSAGE_BYTES", "2000"),
            ("HERALD_LOG", "warn"),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(
            "warning: unknown environment variable HERALD_LIMITS__MAX_MESAGE_BYTES is ignored \
             (not a Herald setting; did you mean HERALD_LIMITS__MAX_MESSAGE_BYTES?)"
        ),
        "{stderr}"
    );
    assert!(
        !stderr.contains("HERALD_LOG"),
        "HERALD_LOG is known: {stderr}"
    );
    assert_eq!(
        stderr.matches("unknown environment variable").count(),
        1,
        "{stderr}"
    );
    s.assert_nothing_created();
}

#[test]
fn print_shows_the_effective_config_without_secrets() {
    let secrets = [
        "jwt-secret-0123456789abcdef0123456789",
        "db-password-42",
        "metrics-token-77",
        "apns-inline-key-pem-99",
        "fcm-inline-json-55",
    ];
    let s = Setup::new(&format!(
        "store = \"postgres\"\ndatabase_url = \"postgres://herald:{}@db:5432/herald\"\n\
         [auth]\njwt_secret = \"{}\"\n[ops]\nmetrics_token = \"{}\"\n",
        secrets[1], secrets[0], secrets[2]
    ));
    let out = s.run(
        &["config", "print"],
        &[
            ("HERALD_PUSH__APNS__KEY_PEM", secrets[3]),
            ("HERALD_PUSH__FCM__SERVICE_ACCOUNT_JSON", secrets[4]),
            ("HERALD_LIMITS__MAX_MESSAGE_BYTES", "1234"),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for secret in secrets {
        assert!(!stdout.contains(secret), "{secret} printed:\n{stdout}");
        assert!(!stderr.contains(secret), "{secret} printed:\n{stderr}");
    }
    let printed: toml::Value = stdout.parse().expect("print is TOML");
    assert_eq!(printed["auth"]["jwt_secret"].as_str(), Some("<redacted>"));
    assert_eq!(printed["ops"]["metrics_token"].as_str(), Some("<redacted>"));
    assert_eq!(
        printed["database_url"].as_str(),
        Some("postgres://herald:<redacted>@db:5432/herald")
    );
    // The effective values: file, environment and defaults merged.
    assert_eq!(printed["store"].as_str(), Some("postgres"));
    assert_eq!(
        printed["limits"]["max_message_bytes"].as_integer(),
        Some(1234)
    );
    assert_eq!(
        printed["delivery"]["ack_timeout_ms"].as_integer(),
        Some(10_000)
    );
    assert!(printed["push"].get("apns").is_some(), "{stdout}");
    s.assert_nothing_created();
}

#[test]
fn serve_refuses_what_check_refuses_before_creating_anything() {
    let s = Setup::new("[auth]\njwt_secret = \"short\"\n");
    let out = s.run(&["serve", "--listen", "127.0.0.1:0"], &[]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("auth.jwt_secret must be at least 32 characters"),
        "{stderr}"
    );
    s.assert_nothing_created();

    let s = Setup::new("[limits]\nmax_body_bytes = 0\n");
    let out = s.run(&["serve", "--listen", "127.0.0.1:0"], &[]);
    assert!(!out.status.success());
    assert!(text(&out)
        .1
        .contains("limits.max_body_bytes must be greater than 0"));
    s.assert_nothing_created();
}

#[test]
fn docs_prints_every_setting() {
    let out = herald(
        &["config", "docs"],
        &[("HERALD_LIMITS__MAX_MESSAGE_BYTES", "x")],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "docs loads no config: {stderr}");
    assert_eq!(stdout, herald_gateway::settings::markdown().unwrap());
    assert!(stdout.contains("`HERALD_LIMITS__MAX_MESSAGE_BYTES`"));
}

#[test]
fn healthcheck_asks_the_running_gateway() {
    let tmp = TempDir::new("herald-health");
    let gw = HeraldProcess::spawn(&tmp.0.join("data"), &[], &[]);
    let port = gw.base.rsplit(':').next().unwrap().to_owned();
    for args in [
        vec!["healthcheck", "--url", gw.base.as_str()],
        vec!["healthcheck", "--ready", "--url", gw.base.as_str()],
    ] {
        let out = herald(&args, &[]);
        assert!(out.status.success(), "{:?}", text(&out));
    }
    // Without --url: the listen address, 0.0.0.0 asked on loopback.
    let listen = format!("0.0.0.0:{port}");
    let out = herald(&["healthcheck"], &[("HERALD_LISTEN", &listen)]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(text(&out).0.contains("/healthz: ok"), "{:?}", text(&out));
    drop(gw);
    let out = herald(&["healthcheck"], &[("HERALD_LISTEN", &listen)]);
    assert!(!out.status.success(), "a stopped gateway is not healthy");
}
