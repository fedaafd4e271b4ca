//! Accept loop and connection serving: the connection cap, hyper-util's auto builder
//! (HTTP/1.1 and h2c prior knowledge on one port) with the edge-safe limits, and the
//! graceful-shutdown watcher every connection is registered with.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::UPGRADE;
use http::{Method, Request, StatusCode, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, watch};

use crate::config::ListenerConfig;
use crate::proxy::{ListenerCtx, pipeline};
use h1_guard::Verdict;

pub mod h1_guard;

/// Binds with SO_REUSEADDR so a restart is not refused by sockets in TIME_WAIT.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

pub fn builder(cfg: &ListenerConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        // Without a timer hyper silently ignores header_read_timeout.
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .keep_alive(true)
        .max_buf_size(cfg.max_header_bytes)
        .max_headers(cfg.max_headers);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.http2.max_concurrent_streams)
        .max_pending_accept_reset_streams(cfg.http2.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(cfg.http2.max_local_error_reset_streams)
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
        // Pings find dead peers of idle HTTP/2 connections.
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    b
}

/// Serves one listener until `stop` turns true, then closes every connection gracefully
/// (HTTP/1: after the response in flight; HTTP/2: GOAWAY) and waits for them, at most
/// `drain_timeout`. Returns whether every connection finished in time.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<ListenerCtx>,
    cfg: &ListenerConfig,
    mut stop: watch::Receiver<bool>,
    drain_timeout: Duration,
) -> bool {
    let builder = Arc::new(builder(cfg));
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    loop {
        // Take a slot before accepting: above the cap, connections wait in the kernel's
        // backlog instead of being accepted and starved.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stopped(&mut stop) => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = &*ctx.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        // hyper hides Content-Length next to Transfer-Encoding from the service; the guard
        // sees the raw heads and tells the service per request.
        let (stream, verdicts) = h1_guard::wrap(stream, cfg.max_header_bytes, cfg.max_headers);
        let svc = service_fn(move |req: Request<Incoming>| {
            let ctx = ctx.clone();
            // HTTP/2 heads never go through the guard, and hyper already hands the service
            // every header of those.
            let h1 = req.version() != Version::HTTP_2;
            let framing_ok = !h1 || verdicts.next() == Verdict::Ok;
            // Only a possible upgrade needs the handle after the answer.
            let upgrading = (h1
                && (req.method() == Method::CONNECT || req.headers().contains_key(UPGRADE)))
            .then(|| verdicts.clone());
            async move {
                let resp = pipeline::handle(ctx, peer, req, framing_ok).await;
                if let Some(v) = upgrading
                    && resp.status() == StatusCode::SWITCHING_PROTOCOLS
                {
                    v.switched();
                }
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::time::timeout(drain_timeout, graceful.shutdown())
        .await
        .is_ok()
}

/// Resolves once the flag is true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
