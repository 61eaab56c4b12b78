//! The accept loop: HTTP/1.1 (WebSocket upgrades included) with the limits
//! `axum::serve` cannot set: a deadline for each request head, an idle timeout, caps
//! on open connections (global and per client IP), and a bounded drain on shutdown.
//! Cleartext HTTP/2 is not offered: nothing Herald serves needs it, and it would
//! bring its own stream-count and rapid-reset limits to get right.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::config::LimitsConfig;
use crate::metrics::Metrics;

/// Connection-level settings, from `[limits]`.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
}

/// File descriptors kept for the store, push connections, the cluster bus and logs
/// when the connection cap is derived from the open-file limit.
const FD_RESERVE: usize = 64;

impl ServerLimits {
    pub fn from_config(l: &LimitsConfig) -> ServerLimits {
        let max_connections = match l.max_connections {
            0 => open_file_limit().map_or(usize::MAX, |n| n.saturating_sub(FD_RESERVE).max(1)),
            n => n,
        };
        ServerLimits {
            header_read_timeout: Duration::from_millis(l.header_read_timeout_ms.max(1)),
            idle_timeout: Duration::from_millis(l.idle_timeout_ms.max(1)),
            max_connections,
            max_connections_per_ip: match l.max_connections_per_ip {
                0 => usize::MAX,
                n => n,
            },
        }
    }
}

#[cfg(unix)]
fn open_file_limit() -> Option<usize> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    (rc == 0 && lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur as usize)
}

#[cfg(not(unix))]
fn open_file_limit() -> Option<usize> {
    None
}

/// Counts open connections; a `Slot` is one of them, released on drop.
struct Gate {
    limits: ServerLimits,
    total: Mutex<(usize, HashMap<IpAddr, usize>)>,
    metrics: Metrics,
}

struct Slot {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Gate {
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, &'static str> {
        let mut guard = self.total.lock().unwrap();
        let (total, per_ip) = &mut *guard;
        if *total >= self.limits.max_connections {
            return Err("max_connections");
        }
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= self.limits.max_connections_per_ip {
            return Err("max_connections_per_ip");
        }
        *n += 1;
        *total += 1;
        self.metrics.http_connections.inc();
        Ok(Slot {
            gate: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut guard = self.gate.total.lock().unwrap();
        let (total, per_ip) = &mut *guard;
        *total -= 1;
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
        self.gate.metrics.http_connections.dec();
    }
}

fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The TCP stream of one connection. It holds the connection's slot, so a WebSocket
/// (which takes the stream over after the upgrade) keeps counting, and notes when
/// bytes last moved, for the idle timeout.
struct Conn {
    stream: TcpStream,
    last_activity: Arc<AtomicU64>,
    _slot: Slot,
}

impl Conn {
    fn touch(&self) {
        self.last_activity.store(clock_ms(), Ordering::Relaxed);
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.touch();
        }
        r
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Written, without waiting, to a connection refused by a cap.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 89\r\nConnection: close\r\nRetry-After: 1\r\n\r\n{\"error\":{\"code\":\"unavailable\",\"message\":\"too many open connections; retry in a moment\"}}";

/// Accepts until `shutdown` is cancelled, then asks every connection to finish its
/// request and close. Connection tasks are tracked by `conns`; cancelling `abort`
/// drops the ones still open (the caller does it when the drain time is up).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ServerLimits,
    metrics: Metrics,
    shutdown: CancellationToken,
    conns: TaskTracker,
    abort: CancellationToken,
) {
    let gate = Arc::new(Gate {
        limits: limits.clone(),
        total: Mutex::new((0, HashMap::new())),
        metrics: metrics.clone(),
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, or a connection reset before it was
                // accepted: keep serving the connections already open.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = match gate.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(cap) => {
                metrics.connections_refused.with_label_values(&[cap]).inc();
                let _ = stream.try_write(REFUSED);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let last_activity = Arc::new(AtomicU64::new(clock_ms()));
        let io = TokioIo::new(Conn {
            stream,
            last_activity: last_activity.clone(),
            _slot: slot,
        });
        let app = app.clone();
        let http = http.clone();
        let shutdown = shutdown.clone();
        let abort = abort.clone();
        let idle = limits.idle_timeout;
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                let app = app.clone();
                async move {
                    let resp = match app.oneshot(req).await {
                        Ok(r) => r,
                        Err(never) => match never {},
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = http.serve_connection(io, svc).with_upgrades();
            tokio::pin!(conn);
            let mut draining = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    _ = shutdown.cancelled(), if !draining => {
                        conn.as_mut().graceful_shutdown();
                        draining = true;
                    }
                    _ = idle_expired(&last_activity, idle) => {
                        tracing::debug!(%peer, "idle connection closed");
                        break;
                    }
                    _ = abort.cancelled() => break,
                }
            }
        });
    }
}

/// Resolves once no byte has moved for `idle`.
async fn idle_expired(last_activity: &AtomicU64, idle: Duration) {
    let idle_ms = idle.as_millis() as u64;
    loop {
        let last = last_activity.load(Ordering::Relaxed);
        let now = clock_ms();
        if now >= last + idle_ms {
            return;
        }
        tokio::time::sleep(Duration::from_millis(last + idle_ms - now)).await;
    }
}
