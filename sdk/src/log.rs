//! The app's log sink ([`set_logger`]) and the SDK's counters ([`Stats`]).
//!
//! Logs also go to `tracing` (for Rust hosts). The app's [`Logger`] is called on one
//! dedicated thread (`herald-sdk-log`), in order, so a slow logger (Logcat, os_log
//! through a bridge) never holds up the connection or the listener.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

/// Severity of an SDK log line; a logger gets lines at its level and above.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// Receives the SDK's log lines (e.g. forwards them to `os_log` or `android.util.Log`).
pub trait Logger: Send + Sync {
    fn log(&self, level: LogLevel, message: String);
}

struct Sink {
    level: LogLevel,
    tx: mpsc::Sender<(LogLevel, String)>,
}

static SINK: Mutex<Option<Sink>> = Mutex::new(None);

/// Sends the SDK's log lines at `level` and above to `logger` (process-wide, for
/// every client); `None` stops it. Replacing a logger lets the old one finish the
/// lines it was given.
pub fn set_logger(logger: Option<Arc<dyn Logger>>, level: LogLevel) {
    let sink = match logger {
        None => None,
        Some(logger) => {
            let (tx, rx) = mpsc::channel::<(LogLevel, String)>();
            let spawned = std::thread::Builder::new()
                .name("herald-sdk-log".into())
                .spawn(move || {
                    for (level, message) in rx {
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            logger.log(level, message)
                        }));
                    }
                });
            spawned.ok().map(|_| Sink { level, tx })
        }
    };
    *SINK.lock().unwrap_or_else(|e| e.into_inner()) = sink;
}

pub(crate) fn emit(level: LogLevel, args: fmt::Arguments<'_>) {
    match level {
        LogLevel::Error => tracing::error!("herald: {args}"),
        LogLevel::Warn => tracing::warn!("herald: {args}"),
        LogLevel::Info => tracing::info!("herald: {args}"),
        LogLevel::Debug => tracing::debug!("herald: {args}"),
        LogLevel::Trace => tracing::trace!("herald: {args}"),
    }
    let sink = SINK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = sink.as_ref().filter(|s| level <= s.level) {
        let _ = s.tx.send((level, args.to_string()));
    }
}

/// `log!(Warn, "...", args)`: to `tracing` and to the app's logger.
macro_rules! log {
    ($level:ident, $($arg:tt)*) => {
        $crate::log::emit($crate::log::LogLevel::$level, format_args!($($arg)*))
    };
}
pub(crate) use log;

/// Counters of one client, readable at any time with `HeraldClient::stats()`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connect attempts (the first one included).
    pub connect_attempts: u64,
    /// Sessions established (welcome received).
    pub connections: u64,
    /// Sessions established after the first one: how often the connection was lost
    /// (or replaced) and came back.
    pub reconnects: u64,
    /// Messages given to the listener.
    pub messages_delivered: u64,
    /// Messages not given to the listener because they were handled already (replay
    /// after a reconnect, or handled by another process on the same data directory).
    pub duplicates_skipped: u64,
    /// Round trip of the last client `ping` → `pong`, in ms (`None` before the first).
    pub last_rtt_ms: Option<u64>,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub connect_attempts: AtomicU64,
    pub connections: AtomicU64,
    pub messages_delivered: AtomicU64,
    pub duplicates_skipped: AtomicU64,
    /// RTT + 1 (0 = none yet).
    pub last_rtt_ms: AtomicU64,
}

impl Counters {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Stats {
        let connections = self.connections.load(Ordering::Relaxed);
        let rtt = self.last_rtt_ms.load(Ordering::Relaxed);
        Stats {
            connect_attempts: self.connect_attempts.load(Ordering::Relaxed),
            connections,
            reconnects: connections.saturating_sub(1),
            messages_delivered: self.messages_delivered.load(Ordering::Relaxed),
            duplicates_skipped: self.duplicates_skipped.load(Ordering::Relaxed),
            last_rtt_ms: (rtt > 0).then(|| rtt - 1),
        }
    }
}
