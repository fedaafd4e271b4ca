//! HTTP/1.1 Upgrade (WebSocket) pass-through, checked as Envoy's `upgrade_configs` are:
//!
//! - Only the protocols the route lists in `upgrades` (default `[websocket]`) are forwarded;
//!   h2c never. A request asking for anything else loses its `Upgrade` and is served as
//!   plain HTTP/1.1 (as nginx does, and as Envoy does for h2c): the upstream answers what
//!   it answers a plain request (typically 426), and a client that can do without the
//!   upgrade still gets served.
//! - The handshake is forwarded like any request, on a fresh connection; bytes are piped only
//!   once the upstream has answered 101 switching to a protocol the request offered (RFC 9110
//!   7.8). A 101 to anything else is a 502 and its connection is closed.
//! - The tunnel holds its client connection's slot under `max_connections` and its place in
//!   the open-connection count (`shutdown::ConnHold`), so the cap and the drain see it. It is
//!   closed after `timeouts.idle` with no byte either way, when either side closes (what the
//!   other sent before is passed on first, as nginx does), or at the drain deadline (a TCP
//!   close: no WebSocket close frame, rampart does not speak the protocol inside).
//! - At close it is counted (`rampart_tunnels_*`) and gets its access-log line (status 101,
//!   bytes each way, how it ended).

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::body::ClientBody;
use crate::observe::access_log::{AccessRecord, Outcome};
use crate::observe::http::RouteMetrics;
use crate::route::headers::{self, strip_hop_by_hop};
use crate::shutdown::RequestGuard;
use crate::shutdown::{ConnHold, Handover};
use crate::stream::body::ProxyBody;

/// Per direction: what is read from one side waits here until written to the other.
const BUF: usize = 16 * 1024;
/// Rounds of read-then-write per direction before a busy tunnel lets other tasks run.
const ROUNDS_PER_POLL: usize = 32;
/// After one side closed, how long the other gets to take its close (TLS close_notify, FIN).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Where the client's connection comes from once it switched: hyper's server, or rampart's.
enum ClientSide {
    Hyper(OnUpgrade),
    Rampart(crate::h1::OnUpgrade),
}

/// The client's side of an upgrade the route allows.
pub(crate) struct ClientUpgrade {
    on: ClientSide,
    /// The request's `Upgrade`, as forwarded: what the 101 may switch to.
    pub offered: HeaderValue,
    handover: Option<Handover>,
}

/// Called only for requests with an `Upgrade` header. Narrows the request's upgrade to the
/// `allowed` protocols (see `headers::narrow_upgrade`): Some when one is left (the request is
/// then forwarded as a handshake), None when the request is to be served plainly. Either way
/// the request no longer carries its connection's `Handover`. Kept out of line: it is off
/// the plain request's path, into which the pipeline's steps are inlined.
#[cold]
#[inline(never)]
pub(crate) fn offer(
    req: &mut Request<ClientBody>,
    allowed: &[String],
) -> Option<Box<ClientUpgrade>> {
    let handover = req.extensions_mut().remove::<Handover>();
    let offered = headers::narrow_upgrade(req.headers_mut(), allowed)?;
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let on = match req.body() {
        ClientBody::Hyper(_) => ClientSide::Hyper(hyper::upgrade::on(&mut *req)),
        ClientBody::Rampart(_) => {
            ClientSide::Rampart(req.extensions_mut().remove::<crate::h1::OnUpgrade>()?)
        }
    };
    Some(Box::new(ClientUpgrade {
        on,
        offered,
        handover,
    }))
}

/// What a tunnel needs besides its two sockets.
pub(crate) struct Tunnel {
    /// Closed after this long with no byte either way (the route's `timeouts.idle`).
    pub idle: Duration,
    /// The handshake's access-log record, written when the tunnel closes.
    pub log: Option<Box<AccessRecord>>,
    pub metrics: Arc<RouteMetrics>,
    pub request_id: HeaderValue,
    /// Counts the tunnel among the requests in flight the drain reports on.
    pub in_flight: RequestGuard,
    /// The request's `max_streams` permits: a tunnel is an open stream until it closes.
    #[allow(dead_code, reason = "held for its Drop, which gives the permits back")]
    pub rate_limit_hold: crate::admission::ratelimit::Hold,
}

/// The 101 for the client, and the tunnel's task, started once both sides have switched.
/// `resp` switches to a protocol `client` offered (the caller checked).
pub(crate) fn tunnel(
    mut resp: http::Response<Incoming>,
    client: ClientUpgrade,
    t: Tunnel,
) -> http::Response<ProxyBody> {
    let upstream = hyper::upgrade::on(&mut resp);
    // Taken now, while the connection is surely still there (it ends once hyper hands the
    // socket over).
    let hold = client.handover.and_then(|h| h.take());
    let (mut parts, _empty) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, true);
    tokio::spawn(async move {
        let client_side = async {
            match client.on {
                ClientSide::Hyper(on) => on.await.map(Switched::Hyper).map_err(|_| ()),
                ClientSide::Rampart(on) => on.get().await.map(Switched::Rampart).map_err(|_| ()),
            }
        };
        match tokio::join!(client_side, upstream) {
            (Ok(Switched::Hyper(c)), Ok(u)) => {
                run(TokioIo::new(c), TokioIo::new(u), t, hold).await;
            }
            (Ok(Switched::Rampart(c)), Ok(u)) => run(c, TokioIo::new(u), t, hold).await,
            (c, u) => {
                let request_id = t.request_id.to_str().unwrap_or("-");
                tracing::warn!(
                    request_id,
                    client_ok = c.is_ok(),
                    upstream_ok = u.is_ok(),
                    "upgrade failed after 101"
                );
                if let Some(mut log) = t.log {
                    log.outcome = if c.is_err() {
                        Outcome::ClientAborted
                    } else {
                        Outcome::UpstreamReset
                    };
                }
            }
        }
    });
    http::Response::from_parts(parts, ProxyBody::empty())
}

/// The client's connection after the switch.
enum Switched {
    Hyper(hyper::upgrade::Upgraded),
    Rampart(crate::h1::Upgraded),
}

/// How a tunnel ended.
#[derive(Debug)]
enum End {
    ClientClosed,
    UpstreamClosed,
    Idle,
    Drained,
    ClientError(io::Error),
    UpstreamError(io::Error),
}

impl End {
    fn outcome(&self) -> Outcome {
        match self {
            End::ClientClosed => Outcome::ClientClosed,
            End::UpstreamClosed => Outcome::UpstreamClosed,
            End::Idle => Outcome::IdleTimeout,
            End::Drained => Outcome::Drained,
            End::ClientError(_) => Outcome::ClientAborted,
            End::UpstreamError(_) => Outcome::UpstreamReset,
        }
    }
}

async fn run<C, U>(mut client: C, mut upstream: U, t: Tunnel, mut hold: Option<ConnHold>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let metrics = t.metrics.tunnel_opened();
    let mut up = Flow::new(metrics.from_client.clone());
    let mut down = Flow::new(metrics.from_upstream.clone());
    let end = {
        let deadline = pin!(async {
            match hold.as_mut() {
                Some(h) => h.deadline().await,
                // The connection was gone before the tunnel started: nothing to drain.
                None => std::future::pending().await,
            }
        });
        pipe(
            &mut client,
            &mut upstream,
            &mut up,
            &mut down,
            t.idle,
            deadline,
        )
        .await
    };
    if matches!(end, End::ClientClosed | End::UpstreamClosed) {
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
            let _ = tokio::join!(client.shutdown(), upstream.shutdown());
        })
        .await;
    }
    drop((client, upstream));
    let outcome = end.outcome();
    let error = match &end {
        End::ClientError(e) | End::UpstreamError(e) => Some(e.to_string()),
        _ => None,
    };
    tracing::debug!(
        request_id = t.request_id.to_str().unwrap_or("-"),
        outcome = outcome.as_str(),
        error,
        "tunnel closed"
    );
    metrics.ended(outcome.as_str());
    if let Some(mut log) = t.log {
        log.bytes_in += up.total;
        log.bytes_out += down.total;
        log.outcome = outcome;
    }
    // Last: the connection's slot is free once its socket is closed.
    drop((t.in_flight, hold));
}

/// Moves bytes both ways until one side closes or fails, nothing moved for `idle`, or
/// `deadline` resolves.
async fn pipe<C, U>(
    client: &mut C,
    upstream: &mut U,
    up: &mut Flow,
    down: &mut Flow,
    idle: Duration,
    mut deadline: Pin<&mut impl Future<Output = ()>>,
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut last = Instant::now();
    // Re-armed only when it fires: moving it on every byte would cost a timer update each.
    let mut timer = pin!(tokio::time::sleep_until(last + idle));
    std::future::poll_fn(|cx| {
        if deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(End::Drained);
        }
        let mut moved = false;
        match up.poll(cx, client, upstream, &mut moved) {
            Poll::Ready(Ok(())) => return Poll::Ready(End::ClientClosed),
            Poll::Ready(Err(Fault::Read(e))) => return Poll::Ready(End::ClientError(e)),
            Poll::Ready(Err(Fault::Write(e))) => return Poll::Ready(End::UpstreamError(e)),
            Poll::Pending => {}
        }
        match down.poll(cx, upstream, client, &mut moved) {
            Poll::Ready(Ok(())) => return Poll::Ready(End::UpstreamClosed),
            Poll::Ready(Err(Fault::Read(e))) => return Poll::Ready(End::UpstreamError(e)),
            Poll::Ready(Err(Fault::Write(e))) => return Poll::Ready(End::ClientError(e)),
            Poll::Pending => {}
        }
        if moved {
            last = Instant::now();
        }
        // Bounded: each turn returns or moves the timer to a time not yet passed.
        for _ in 0..4 {
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let at = last + idle;
            if Instant::now() >= at {
                return Poll::Ready(End::Idle);
            }
            timer.as_mut().reset(at);
        }
        // The clock is jumping: look again at the next wake-up.
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// Which side of a direction failed.
enum Fault {
    Read(io::Error),
    Write(io::Error),
}

/// One direction of a tunnel.
struct Flow {
    buf: Box<[u8]>,
    /// `buf[start..end]` is read and not yet written.
    start: usize,
    end: usize,
    /// The reading side has closed.
    eof: bool,
    /// Written since the last flush.
    unflushed: bool,
    total: u64,
    counter: Counter,
}

impl Flow {
    fn new(counter: Counter) -> Self {
        Flow {
            buf: vec![0; BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            unflushed: false,
            total: 0,
            counter,
        }
    }

    /// Moves bytes from `from` to `to` until neither can go on; `moved` is set when any did.
    /// Ready(Ok) once `from` has closed and all it sent is written and flushed.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
        moved: &mut bool,
    ) -> Poll<Result<(), Fault>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        for _ in 0..ROUNDS_PER_POLL {
            while self.start < self.end {
                match Pin::new(&mut *to).poll_write(cx, &self.buf[self.start..self.end]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(Fault::Write(io::ErrorKind::WriteZero.into())));
                    }
                    Poll::Ready(Ok(n)) => {
                        self.start += n;
                        self.unflushed = true;
                        *moved = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(Fault::Write(e))),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.eof {
                return Pin::new(&mut *to).poll_flush(cx).map_err(Fault::Write);
            }
            let mut rb = ReadBuf::new(&mut self.buf);
            match Pin::new(&mut *from).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        self.eof = true;
                    } else {
                        (self.start, self.end) = (0, n);
                        self.total += n as u64;
                        self.counter.inc_by(n as u64);
                        *moved = true;
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Fault::Read(e))),
                Poll::Pending => {
                    // Nothing more to read for now: what was written must leave (a TLS
                    // writer holds bytes until flushed).
                    if self.unflushed {
                        match Pin::new(&mut *to).poll_flush(cx) {
                            Poll::Ready(Ok(())) => self.unflushed = false,
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(Fault::Write(e))),
                            Poll::Pending => {}
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
        // Busy both ways: come back after the other tasks had their turn.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, DuplexStream, duplex};

    fn counter() -> Counter {
        Counter::default()
    }

    /// A tunnel between two in-memory pipes: (client's end, upstream's end, the tunnel).
    fn tunnel_between(
        idle: Duration,
        deadline: impl Future<Output = ()> + Send + 'static,
    ) -> (
        DuplexStream,
        DuplexStream,
        tokio::task::JoinHandle<(End, u64, u64)>,
    ) {
        let (client, client_side) = duplex(64);
        let (upstream, upstream_side) = duplex(64);
        let task = tokio::spawn(async move {
            let (mut c, mut u) = (client_side, upstream_side);
            let (mut up, mut down) = (Flow::new(counter()), Flow::new(counter()));
            let deadline = pin!(deadline);
            let end = pipe(&mut c, &mut u, &mut up, &mut down, idle, deadline).await;
            (end, up.total, down.total)
        });
        (client, upstream, task)
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_go_both_ways_and_either_close_ends_it() {
        let (mut client, mut upstream, task) =
            tunnel_between(Duration::from_secs(60), std::future::pending());
        let big = vec![7u8; 200_000];
        let (_, got) = tokio::join!(client.write_all(&big), async {
            let mut got = vec![0u8; big.len()];
            upstream.read_exact(&mut got).await.unwrap();
            got
        });
        assert_eq!(got, big);
        upstream.write_all(b"pong").await.unwrap();
        let mut four = [0u8; 4];
        client.read_exact(&mut four).await.unwrap();
        assert_eq!(&four, b"pong");
        // The upstream's last words reach the client before the close.
        upstream.write_all(b"bye").await.unwrap();
        drop(upstream);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"bye");
        let (end, up, down) = task.await.unwrap();
        assert!(matches!(end, End::UpstreamClosed), "{end:?}");
        assert_eq!((up, down), (200_000, 7));

        let (client, mut upstream, task) =
            tunnel_between(Duration::from_secs(60), std::future::pending());
        drop(client);
        let mut rest = Vec::new();
        upstream.read_to_end(&mut rest).await.unwrap();
        assert!(matches!(task.await.unwrap().0, End::ClientClosed));
    }

    #[tokio::test(start_paused = true)]
    async fn silence_either_way_for_idle_ends_it_and_traffic_does_not() {
        let idle = Duration::from_secs(10);
        let (mut client, mut upstream, task) = tunnel_between(idle, std::future::pending());
        let start = Instant::now();
        // Traffic one way only, every 6 s for a minute: never idle.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            upstream.write_all(b"tick").await.unwrap();
            let mut b = [0u8; 4];
            client.read_exact(&mut b).await.unwrap();
        }
        assert!(!task.is_finished());
        let quiet_from = Instant::now();
        let (end, _, down) = task.await.unwrap();
        assert!(matches!(end, End::Idle), "{end:?}");
        assert_eq!(Instant::now() - quiet_from, idle);
        assert_eq!(down, 40);
        assert!(Instant::now() - start >= Duration::from_secs(70));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_reads_nothing_is_idle_once_the_buffers_are_full() {
        let idle = Duration::from_secs(10);
        let (_client, mut upstream, task) = tunnel_between(idle, std::future::pending());
        let start = Instant::now();
        // The upstream keeps writing; nobody reads the client's end (64-byte pipe).
        let writer = tokio::spawn(async move {
            let mut sent = 0;
            while upstream.write_all(&[1u8; 1024]).await.is_ok() {
                sent += 1024;
            }
            sent
        });
        let (end, _, _) = task.await.unwrap();
        assert!(matches!(end, End::Idle), "{end:?}");
        assert_eq!(Instant::now() - start, idle);
        writer.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_ends_it() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (mut client, mut upstream, task) = tunnel_between(Duration::from_secs(60), async {
            let _ = rx.await;
        });
        client.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        upstream.read_exact(&mut b).await.unwrap();
        tx.send(()).unwrap();
        assert!(matches!(task.await.unwrap().0, End::Drained));
    }
}
