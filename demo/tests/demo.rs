//! The real `herald-demo` binary: it exits 0 by itself, its output tells every step of
//! the story with the values of this run (message ids, seqs, the push body, the final
//! statuses), and it removes its temporary directory unless `--keep`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use herald_gateway::testing::TempDir;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_herald-demo");
/// The demo takes a few seconds; this only bounds a hang.
const LIMIT: Duration = Duration::from_secs(120);

struct Demo {
    stdout: String,
    stderr: String,
}

impl Demo {
    /// Runs `herald-demo <args>` with its temporary directory under `tmp`; panics
    /// unless it exits 0 within `LIMIT`.
    fn run(tmp: &Path, args: &[&str]) -> Demo {
        let mut child = Command::new(BIN)
            .args(args)
            .env("TMPDIR", tmp)
            .env_remove("HERALD_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn herald-demo");
        let drain = |mut pipe: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                text
            })
        };
        let stdout = drain(Box::new(child.stdout.take().unwrap()));
        let stderr = drain(Box::new(child.stderr.take().unwrap()));
        let deadline = Instant::now() + LIMIT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for herald-demo") {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let demo = Demo {
            stdout: stdout.join().unwrap(),
            stderr: stderr.join().unwrap(),
        };
        match status {
            Some(s) if s.success() => demo,
            Some(s) => panic!("herald-demo exited with {s}\n{}", demo.output()),
            None => panic!(
                "herald-demo did not finish within {} s\n{}",
                LIMIT.as_secs(),
                demo.output()
            ),
        }
    }

    fn output(&self) -> String {
        format!("--- stdout\n{}\n--- stderr\n{}", self.stdout, self.stderr)
    }

    fn lines(&self) -> impl Iterator<Item = &str> {
        self.stdout.lines()
    }

    fn assert_line(&self, what: &str, matches: impl Fn(&str) -> bool) -> &str {
        self.lines()
            .find(|l| matches(l))
            .unwrap_or_else(|| panic!("no line shows {what}\n{}", self.output()))
    }

    fn data_dir(&self) -> PathBuf {
        let line = self.assert_line("the data directory", |l| l.starts_with("Data directory: "));
        let path = line["Data directory: ".len()..].split(" (").next().unwrap();
        PathBuf::from(path)
    }

    /// The ids of the two published messages, in order.
    fn message_ids(&self) -> (String, String) {
        let ids: Vec<String> = self
            .lines()
            .filter_map(|l| l.split_once("POST /v1/messages → 202, message "))
            .map(|(_, id)| id.trim().to_string())
            .collect();
        assert_eq!(ids.len(), 2, "two publishes\n{}", self.output());
        assert!(ids.iter().all(|id| id.starts_with("msg_")), "{ids:?}");
        (ids[0].clone(), ids[1].clone())
    }

    /// The push shown in step 5: its request line, header lines and parsed JSON body.
    fn push(&self) -> (String, Vec<String>, Value) {
        let lines: Vec<&str> = self.lines().collect();
        let start = lines
            .iter()
            .position(|l| l.contains("would receive"))
            .unwrap_or_else(|| panic!("no push shown\n{}", self.output()));
        let request = lines[start + 1].trim().to_string();
        let open = (start + 1..lines.len())
            .find(|&i| lines[i] == "      {")
            .expect("push body starts");
        let close = (open..lines.len())
            .find(|&i| lines[i] == "      }")
            .expect("push body ends");
        let headers = lines[start + 2..open]
            .iter()
            .map(|l| l.trim().to_string())
            .collect();
        let body = serde_json::from_str(&lines[open..=close].join("\n"))
            .unwrap_or_else(|e| panic!("push body is not JSON ({e})\n{}", self.output()));
        (request, headers, body)
    }

    /// The final table's row of a message.
    fn status_row(&self, id: &str) -> Vec<&str> {
        let at = self
            .stdout
            .find("[7] Delivery status")
            .unwrap_or_else(|| panic!("no status table\n{}", self.output()));
        let row = self.stdout[at..]
            .lines()
            .find(|l| l.trim_start().starts_with(id))
            .unwrap_or_else(|| panic!("no status row for {id}\n{}", self.output()));
        row.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect()
    }

    /// The checks that hold for either platform.
    fn assert_story(&self, provider: &str) -> (String, String, Value) {
        let (first, second) = self.message_ids();
        self.assert_line("the device connected", |l| l.contains("phone-1: connected"));
        self.assert_line("the live delivery", |l| {
            l.contains(&format!(
                "phone-1 received seq 1 {first} live over the WebSocket"
            )) && l.contains(r#""text":"hello, live""#)
        });
        self.assert_line("the SDK's ack", |l| l.contains("gateway: acked at "));
        self.assert_line("the ack timeout", |l| {
            l.contains("no ack came: the gateway closed the session (ack_timeout)")
        });
        let (_, _, body) = self.push();
        self.assert_line("the push outcome", |l| {
            l.contains(&format!("gateway: pushed via {provider} at "))
        });
        self.assert_line("the reconnect", |l| {
            l.contains("the SDK reconnects by itself")
        });
        self.assert_line("the catch-up", |l| {
            l.contains(&format!(
                "phone-1 received seq 2 {second} from the inbox replay"
            ))
        });

        let live = self.status_row(&first);
        assert_eq!(live[2..5], ["phone-1", "1", "acked"], "{live:?}");
        assert_eq!(live[6], "-", "never pushed: {live:?}");
        let pushed = self.status_row(&second);
        assert_eq!(pushed[2..5], ["phone-1", "2", "acked"], "{pushed:?}");
        assert!(
            pushed[6].ends_with(&format!("({provider})")),
            "pushed via {provider}: {pushed:?}"
        );
        assert!(
            self.stdout.contains("Demo complete in "),
            "{}",
            self.output()
        );
        (first, second, body)
    }
}

fn assert_herald_keys(keys: &Value, id: &str) {
    assert_eq!(keys["herald_id"], id, "{keys}");
    assert_eq!(keys["herald_seq"], "2", "{keys}");
    assert_eq!(keys["herald_device"], "phone-1", "{keys}");
    let data: Value = serde_json::from_str(keys["herald_data"].as_str().unwrap()).unwrap();
    assert_eq!(data["text"], "while you were away");
}

#[test]
fn demo_fcm_tells_the_story_and_cleans_up() {
    let tmp = TempDir::new("herald-demo-test");
    let demo = Demo::run(&tmp.0, &[]);
    let (_, second, body) = demo.assert_story("fcm");

    let (request, _, _) = demo.push();
    assert_eq!(
        request,
        "POST https://fcm.googleapis.com/v1/projects/herald-demo/messages:send"
    );
    let message = &body["message"];
    assert_eq!(message["token"], "demo-fcm-registration-token", "{body}");
    assert_eq!(message["notification"]["title"], "Herald demo", "{body}");
    assert_herald_keys(&message["data"], &second);

    let dir = demo.data_dir();
    assert!(dir.starts_with(&tmp.0), "{} is under TMPDIR", dir.display());
    assert!(!dir.exists(), "{} was removed", dir.display());
    assert!(
        demo.stdout
            .contains(&format!("Removed the data directory {}.", dir.display())),
        "{}",
        demo.output()
    );
    assert_eq!(
        std::fs::read_dir(&tmp.0).unwrap().count(),
        0,
        "nothing left"
    );
}

#[test]
fn demo_apns_shows_the_apns_request_and_keep_keeps_the_directory() {
    let tmp = TempDir::new("herald-demo-test");
    let demo = Demo::run(&tmp.0, &["--platform", "apns", "--keep"]);
    let (_, second, body) = demo.assert_story("apns");

    let (request, headers, _) = demo.push();
    assert!(
        request.starts_with("POST https://api.sandbox.push.apple.com/3/device/"),
        "{request}"
    );
    assert!(
        headers.contains(&"apns-push-type: alert".to_string()),
        "{headers:?}"
    );
    assert!(
        headers.contains(&"apns-topic: com.example.herald-demo".to_string()),
        "{headers:?}"
    );
    assert_eq!(body["aps"]["alert"]["title"], "Herald demo", "{body}");
    assert_herald_keys(&body, &second);

    let dir = demo.data_dir();
    assert!(dir.join("gateway").is_dir(), "{} was kept", dir.display());
    assert!(
        demo.stdout
            .contains(&format!("Kept the data directory {}.", dir.display())),
        "{}",
        demo.output()
    );
}
