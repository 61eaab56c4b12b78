//! The real `herald` binary as a child process.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use super::WAIT;

pub const BIN: &str = env!("CARGO_BIN_EXE_herald");

/// A running `herald serve`; killed (and reaped) on drop.
pub struct HeraldProcess {
    pub child: Child,
    pub base: String,
    /// The first-start banner's API key, if this start printed one.
    pub api_key: Option<String>,
}

impl Drop for HeraldProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HeraldProcess {
    /// `herald serve --listen 127.0.0.1:0 --data-dir DIR EXTRA...` with `envs` set;
    /// returns once it printed the address it listens on.
    pub fn spawn(data_dir: &Path, extra: &[&str], envs: &[(&str, &str)]) -> HeraldProcess {
        HeraldProcess::spawn_inner(data_dir, extra, envs, true)
    }

    /// As `spawn`, but the read end of the log pipe (stderr) is closed at once, as
    /// `herald serve 2>&1 | head` does once `head` has its lines.
    pub fn spawn_with_stderr_closed(data_dir: &Path, envs: &[(&str, &str)]) -> HeraldProcess {
        HeraldProcess::spawn_inner(data_dir, &[], envs, false)
    }

    // The child is reaped by Drop.
    #[allow(clippy::zombie_processes)]
    fn spawn_inner(
        data_dir: &Path,
        extra: &[&str],
        envs: &[(&str, &str)],
        keep_stderr: bool,
    ) -> HeraldProcess {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("HERALD_LOG", "info")
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn herald");
        let (tx, rx) = mpsc::channel::<String>();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        if !keep_stderr {
            drop(err);
        } else {
            // Logs go to stderr; keep the last ones so a failure can show them, and drain
            // the pipe so the child never blocks on it.
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    if std::env::var_os("HERALD_TEST_LOGS").is_some() {
                        eprintln!("[herald] {line}");
                    }
                }
            });
        }
        let mut api_key = None;
        let deadline = Instant::now() + WAIT;
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("herald did not report its address (HERALD_TEST_LOGS=1 shows its log)");
            if let Some(k) = line.strip_prefix("API key (service routes):") {
                api_key = Some(k.trim().to_owned());
            }
            if let Some(base) = line.strip_prefix("herald listening on ") {
                let base = base.trim().to_owned();
                std::thread::spawn(move || while rx.recv().is_ok() {});
                return HeraldProcess {
                    child,
                    base,
                    api_key,
                };
            }
        }
    }

    /// SIGTERM, then waits up to `within` for the exit; None if it did not exit.
    pub fn terminate(&mut self, within: std::time::Duration) -> Option<std::process::ExitStatus> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill_9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn ws_url(&self, device: &str, after: i64) -> String {
        format!(
            "{}/v1/connect?device_id={device}&after={after}",
            self.base.replacen("http://", "ws://", 1)
        )
    }
}

/// A TOML basic string holding `s`.
pub fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}
