//! SIGTERM on the real binary finishes within `limits.shutdown_drain_ms` and exits 0,
//! whatever clients hold open and whatever happened to the log output.

use crate::common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::process::HeraldProcess;
use herald_gateway::testing::TempDir;

const DRAIN_MS: &str = "2000";
/// The drain, plus time to start the shutdown and exit, on a loaded machine.
const EXIT_WITHIN: Duration = Duration::from_secs(8);

fn addr(gw: &HeraldProcess) -> String {
    gw.base.trim_start_matches("http://").to_owned()
}

#[test]
fn sigterm_with_a_half_sent_header_and_a_trickling_client_exits_0_within_the_drain() {
    let tmp = TempDir::new("herald-drain");
    let mut gw = HeraldProcess::spawn(
        &tmp.0,
        &[],
        &[
            ("HERALD_LIMITS__SHUTDOWN_DRAIN_MS", DRAIN_MS),
            // Only the drain may end these connections.
            ("HERALD_LIMITS__HEADER_READ_TIMEOUT_MS", "600000"),
            ("HERALD_LIMITS__IDLE_TIMEOUT_MS", "600000"),
        ],
    );
    let mut half = TcpStream::connect(addr(&gw)).unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut trickle = TcpStream::connect(addr(&gw)).unwrap();
    trickle
        .write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // One byte every 100 ms, until the gateway hangs up or the test ends.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if trickle.write_all(b"a").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let status = gw.terminate(EXIT_WITHIN);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    trickler.join().unwrap();
    let status = status.unwrap_or_else(|| panic!("still running {EXIT_WITHIN:?} after SIGTERM"));
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the drain was not waited for"
    );
    drop(half);
}

#[test]
fn sigterm_with_stderr_a_closed_pipe_exits_0() {
    let tmp = TempDir::new("herald-epipe");
    let mut gw = HeraldProcess::spawn_with_stderr_closed(
        &tmp.0,
        &[
            ("HERALD_LOG", "debug"),
            ("HERALD_LIMITS__SHUTDOWN_DRAIN_MS", DRAIN_MS),
        ],
    );
    // Requests make log lines, each written to the closed pipe.
    for _ in 0..3 {
        let (status, _) = get(&gw, "/readyz");
        assert_eq!(status, 200);
    }
    let status = gw
        .terminate(EXIT_WITHIN)
        .unwrap_or_else(|| panic!("still running {EXIT_WITHIN:?} after SIGTERM"));
    assert_eq!(status.code(), Some(0));
}

fn get(gw: &HeraldProcess, path: &str) -> (u16, String) {
    use std::io::Read;
    let mut s = TcpStream::connect(addr(gw)).unwrap();
    s.set_read_timeout(Some(common::WAIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}
