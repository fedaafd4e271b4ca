//! Accept loop and connection serving: the connection cap, HTTP/1.1 and h2c prior
//! knowledge on one port (`proto`: told apart by peeking, then hyper's builders with the
//! edge-safe limits), and each listener's drain phases.
//!
//! A [`Server`] is one running listener. Its [`Phase`] only moves forward, driven by the
//! shutdown sequence (`shutdown.rs`) or by a reload that replaces the listener:
//! `Serving` -> `Closing` (stop accepting, close each connection gracefully) -> `Finale`
//! (SSE streams get their final event) -> `Cut` (whatever is left is dropped).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Sleep;

use crate::body::ClientBody;
use crate::config::{DrainMode, Http1Server, ListenerConfig};
use crate::observe::certs::CertExpiry;
use crate::pipeline::{ListenerCtx, Traffic};
use crate::reload::watch::FileWatch;
use crate::shutdown::{ConnHold, Drainable, HoldSource, Phase, reached};
use crate::workers::Workers;
use proto::{Builders, Proto, Served};
use timeouts::{Clock, Clocks, Expired, SendTimed, Socket};

pub(crate) mod h1_guard;
pub(crate) mod h2_guard;
pub(crate) mod proto;
mod service;
pub(crate) mod timeouts;
pub(crate) mod tls;

pub(crate) use tls::TlsSetup;

/// A listener's TLS setup (certificates read, rustls configured), None for plain HTTP.
pub(crate) fn prepare_tls(cfg: &ListenerConfig) -> Result<Option<TlsSetup>, String> {
    cfg.tls.as_ref().map(tls::prepare).transpose()
}

/// Longest wait, once closing, for the first request of a connection that has sent none:
/// it was just accepted, so its request is most likely on the wire.
const FIRST_REQUEST_WAIT: Duration = Duration::from_secs(1);

/// Binds with SO_REUSEADDR so a restart is not refused by sockets in TIME_WAIT, and with
/// SO_REUSEPORT so a new process (rolling restart) or a reload binds the same port while
/// this socket still drains.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    #[cfg(unix)]
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// A traffic listener's sockets: one per worker, all on the same address.
pub(crate) struct Bound {
    /// The bound address (the real port when the config says 0).
    pub addr: SocketAddr,
    sockets: Vec<std::net::TcpListener>,
}

/// Binds `count` sockets on `addr` (SO_REUSEPORT), the first one deciding the port when
/// `addr` has port 0. Must run inside a runtime.
pub(crate) fn bind_listener(addr: SocketAddr, count: usize) -> io::Result<Bound> {
    let first = bind(addr)?;
    let addr = first.local_addr()?;
    let mut sockets = vec![first.into_std()?];
    for _ in 1..count {
        sockets.push(bind(addr)?.into_std()?);
    }
    Ok(Bound { addr, sockets })
}

/// One running traffic listener.
pub(crate) struct Server {
    pub name: Arc<str>,
    /// The bound address (the real port when the config says 0).
    pub addr: SocketAddr,
    pub config: ListenerConfig,
    phase: watch::Sender<Phase>,
    open: Arc<AtomicUsize>,
    certs: Option<Arc<Certs>>,
}

/// A TLS listener's certificates, which a reload or a change of the files re-reads in
/// place.
struct Certs {
    listener: Arc<str>,
    store: Arc<crate::tls::CertStore>,
    reloaded: prometheus_client::metrics::counter::Counter,
    refused: prometheus_client::metrics::counter::Counter,
    expiry: CertExpiry,
    /// Dropped with the server: ends its file watch.
    _watching: Option<watch::Sender<()>>,
}

impl Certs {
    /// Re-reads the files: new handshakes get the new pairs, open connections keep theirs.
    /// A bad pair is refused (the old ones stay), said in a warning and counted.
    fn reload(&self) -> Result<(), String> {
        match self.store.reload() {
            Ok(()) => {
                self.reloaded.inc();
                let names: Vec<String> = self
                    .store
                    .leaves()
                    .into_iter()
                    .map(|l| format!("{} ({})", l.cert.display(), l.names.join(" ")))
                    .collect();
                tracing::info!(
                    listener = &*self.listener,
                    certificates = %names.join(", "),
                    "TLS certificates reloaded"
                );
                self.record_expiry();
                Ok(())
            }
            Err(e) => {
                self.refused.inc();
                tracing::warn!(
                    listener = &*self.listener,
                    error = %e,
                    "TLS certificates not reloaded: still serving the previous ones"
                );
                Err(e)
            }
        }
    }

    /// The served leaves' notAfter, for `rampart_tls_certificate_expiry_days` and its alert.
    fn record_expiry(&self) {
        let leaves: Vec<(String, Vec<u8>)> = self
            .store
            .leaves()
            .into_iter()
            .map(|l| (l.names.first().cloned().unwrap_or_default(), l.der.to_vec()))
            .collect();
        if let Err(e) = self.expiry.record(&self.listener, &leaves) {
            tracing::warn!(listener = &*self.listener, error = %e, "certificate expiry unknown");
        }
    }
}

/// Reloads a listener's certificates each time their files change on disk, until the
/// listener is dropped.
async fn watch_certs(mut files: FileWatch, certs: Weak<Certs>, mut stop: watch::Receiver<()>) {
    loop {
        let changed = tokio::select! {
            c = files.changed() => c,
            _ = stop.changed() => return,
        };
        let Some(certs) = certs.upgrade() else {
            return;
        };
        let names: Vec<String> = changed.iter().map(|p| p.display().to_string()).collect();
        tracing::info!(
            listener = &*certs.listener,
            files = %names.join(", "),
            "TLS certificate files changed on disk: reloading them"
        );
        // Reading files can block: off the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || certs.reload()).await;
    }
}

impl Server {
    /// Starts accepting on `bound`: one accept loop per socket, each on its worker. `tls`
    /// is the listener's (`prepare_tls`) when its config has `tls`.
    pub(crate) fn start(
        bound: Bound,
        config: ListenerConfig,
        tls: Option<TlsSetup>,
        traffic: Arc<Traffic>,
        expiry: &CertExpiry,
        workers: &Workers,
    ) -> Server {
        let addr = bound.addr;
        let name: Arc<str> = Arc::from(config.name.as_str());
        let (phase, phase_rx) = watch::channel(Phase::Serving);
        let open = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        traffic.http.track_listener(&name, &open, &in_flight);
        let terminator = tls
            .as_ref()
            .map(|t| Arc::new(tls::Terminator::new(t, &name, &traffic.http)));
        let certs = tls.map(|mut t| {
            let files = t.take_watch();
            let (stop, stopped) = watch::channel(());
            let certs = Arc::new(Certs {
                listener: name.clone(),
                store: t.store().clone(),
                reloaded: traffic.http.tls.cert_reloads(&name, "ok"),
                refused: traffic.http.tls.cert_reloads(&name, "error"),
                expiry: expiry.clone(),
                _watching: files.is_some().then_some(stop),
            });
            certs.record_expiry();
            if let Some(files) = files {
                tokio::spawn(watch_certs(files, Arc::downgrade(&certs), stopped));
            }
            certs
        });
        let acceptor = Acceptor {
            builders: Builders::new(&config),
            ctx: Arc::new(ListenerCtx {
                name: name.clone(),
                proto: if terminator.is_some() {
                    "https"
                } else {
                    "http"
                },
                traffic,
                in_flight,
            }),
            tls: terminator,
            redirect_to_https: config.redirect_to_https,
            http1_server: config.http1_server,
            h1_settings: crate::h1::Settings {
                header_read_timeout: config.header_read_timeout,
                max_head: config.max_header_bytes,
                max_headers: h1_guard::max_headers(config.max_headers),
            },
            max_header_bytes: config.max_header_bytes,
            max_headers: h1_guard::max_headers(config.max_headers),
            first_request_wait: config.header_read_timeout.min(FIRST_REQUEST_WAIT),
            header_read_timeout: config.header_read_timeout,
            h2_idle_timeout: config.http2.idle_timeout,
            open: open.clone(),
            health_path: config.health_path.as_deref().map(Arc::from),
        };
        // One cap for the listener, whichever worker accepts.
        let slots = Arc::new(Semaphore::new(config.max_connections));
        // The last socket to close says the listener stopped accepting: one line per
        // listener, not one per worker.
        let sockets_open = Arc::new(AtomicUsize::new(bound.sockets.len()));
        for (i, socket) in bound.sockets.into_iter().enumerate() {
            let mut acceptor = acceptor.clone();
            // Its own copy per worker: every request clones this Arc, and a count two
            // cores keep writing would bounce between them.
            acceptor.ctx = Arc::new(ListenerCtx::clone(&acceptor.ctx));
            let slots = slots.clone();
            let phase_rx = phase_rx.clone();
            let sockets_open = sockets_open.clone();
            let name = name.clone();
            workers.spawn_on(i, async move {
                // Registered with the runtime of the worker that polls it.
                match TcpListener::from_std(socket) {
                    Ok(listener) => Arc::new(acceptor).run(listener, slots, phase_rx).await,
                    Err(e) => tracing::error!(
                        listener = &*acceptor.ctx.name,
                        error = %e,
                        "cannot register the listening socket"
                    ),
                }
                if sockets_open.fetch_sub(1, Ordering::AcqRel) == 1 {
                    tracing::info!(listener = &*name, "stopped accepting");
                }
            });
        }
        Server {
            name,
            addr,
            config,
            phase,
            open,
            certs,
        }
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.phase.receiver_count() == 0
    }

    /// A TLS listener's certificates (None for plain HTTP).
    pub(crate) fn cert_store(&self) -> Option<&Arc<crate::tls::CertStore>> {
        self.certs.as_ref().map(|c| &c.store)
    }

    /// Re-reads a TLS listener's certificate files: new handshakes get the new pairs, open
    /// connections keep theirs. A bad pair is refused (the old ones stay), said in a warning
    /// and counted. Ok(false) for a plain listener.
    pub(crate) fn reload_certs(&self) -> Result<bool, String> {
        match &self.certs {
            Some(c) => c.reload().map(|()| true),
            None => Ok(false),
        }
    }
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certs")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Drainable for Server {
    fn name(&self) -> &str {
        &self.name
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn mode(&self) -> DrainMode {
        self.config.drain
    }

    /// Moves to `to` unless already there or further.
    fn advance(&self, to: Phase) {
        self.phase.send_if_modified(|p| {
            let later = to > *p;
            if later {
                *p = to;
            }
            later
        });
    }

    fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Resolves once the listener is closed and every connection has ended: each of them,
    /// and the accept loop, holds a receiver of the phase.
    async fn finished(&self) {
        self.phase.closed().await;
    }
}

/// What the accept loop needs to serve a connection.
#[derive(Clone)]
struct Acceptor {
    builders: Builders,
    ctx: Arc<ListenerCtx>,
    max_header_bytes: usize,
    max_headers: usize,
    first_request_wait: Duration,
    header_read_timeout: Duration,
    h2_idle_timeout: Duration,
    open: Arc<AtomicUsize>,
    /// `health_path`: answered here, before the pipeline (no route, no rate limit).
    health_path: Option<Arc<str>>,
    /// A TLS listener's handshake side.
    tls: Option<Arc<tls::Terminator>>,
    /// Every request but `health_path` gets a 308 to https.
    redirect_to_https: bool,
    /// Which server reads HTTP/1.1 requests, and its limits.
    http1_server: Http1Server,
    h1_settings: crate::h1::Settings,
}

impl Acceptor {
    async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        slots: Arc<Semaphore>,
        mut phase: watch::Receiver<Phase>,
    ) {
        let accepted = self
            .ctx
            .traffic
            .http
            .worker_connections(&self.ctx.name, crate::workers::index());
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(listener = &*self.ctx.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = reached(&mut phase, Phase::Closing) => break,
            };
            // A slot after accepting, not before: every worker has a socket of its own on
            // the port and the kernel picks which one a connection lands on, so a worker
            // holding a slot while its socket stays empty would starve a connection waiting
            // on another's (with `max_connections` under the worker count, for ever). Above
            // the cap this worker stops accepting until a slot frees: one connection per
            // worker waits accepted and unread, the rest in the kernel's backlog.
            let permit = match slots.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => tokio::select! {
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    _ = reached(&mut phase, Phase::Closing) => break,
                },
            };
            accepted.inc();
            self.serve(stream, peer, permit, phase.clone());
        }
        self.sweep(listener, &slots, &phase);
    }

    /// Closing a listening socket resets the connections the kernel has completed but we
    /// have not accepted yet (with SO_REUSEPORT, the kernel keeps queueing to every socket on
    /// the port until it is closed). Take them and answer their first request instead.
    fn sweep(
        self: &Arc<Self>,
        listener: TcpListener,
        slots: &Arc<Semaphore>,
        phase: &watch::Receiver<Phase>,
    ) {
        let Ok(listener) = listener.into_std() else {
            return;
        };
        let mut swept = 0usize;
        // Bounded: a flood must not keep a closing listener open.
        while swept < 1024 {
            let Ok((stream, peer)) = listener.accept() else {
                break;
            };
            swept += 1;
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let stream = stream
                .set_nonblocking(true)
                .and_then(|()| TcpStream::from_std(stream));
            if let Ok(stream) = stream {
                self.serve(stream, peer, permit, phase.clone());
            }
        }
        if swept > 0 {
            tracing::debug!(
                listener = &*self.ctx.name,
                swept,
                "took queued connections before closing"
            );
        }
        drop(listener);
    }

    /// Serves an accepted connection in a task of its own; a TLS handshake runs there too,
    /// holding the connection's permit.
    fn serve(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
        phase: watch::Receiver<Phase>,
    ) {
        let _ = stream.set_nodelay(true);
        let this = self.clone();
        // Counted open from accept, through the first look or the handshake.
        let hold = ConnHold::new(permit, &self.open, phase.clone());
        match &self.tls {
            None => {
                // The header read timeout runs from accept, through the first look.
                let clocks = Clocks::new(self.header_read_timeout, self.h2_idle_timeout);
                tokio::spawn(async move {
                    let mut phase = phase;
                    // Boxed: the first look's state is the largest, and the task's future,
                    // sized by it, would keep the connection's hot fields apart (each apart
                    // is another cache line read at every wake-up).
                    let proto = Box::pin(sniff(
                        &stream,
                        this.header_read_timeout,
                        &mut phase,
                        this.first_request_wait,
                        peer,
                    ))
                    .await;
                    if let Some(proto) = proto {
                        this.connection(stream, proto, clocks, peer, hold, phase)
                            .await;
                    }
                });
            }
            Some(tls) => {
                let tls = tls.clone();
                tokio::spawn(async move {
                    let mut phase = phase;
                    if let Some(stream) = tls.accept(stream, peer, &mut phase).await {
                        let proto = Proto::from_alpn(stream.get_ref().1.alpn_protocol());
                        // Over TLS the header read timeout runs from the handshake's end.
                        let clocks = Clocks::new(this.header_read_timeout, this.h2_idle_timeout);
                        this.connection(stream, proto, clocks, peer, hold, phase)
                            .await;
                    }
                });
            }
        }
    }

    fn connection<S: Socket + Send + 'static>(
        &self,
        stream: S,
        proto: Proto,
        clocks: Arc<Clocks>,
        peer: SocketAddr,
        hold: ConnHold,
        mut phase: watch::Receiver<Phase>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let stream = SendTimed::new(stream, clocks.clone());
        let conn_state = Arc::new(ConnState::new(phase.clone(), clocks, hold));
        let handler = |verdicts| service::Handler {
            ctx: self.ctx.clone(),
            state: conn_state.clone(),
            peer,
            health_path: self.health_path.clone(),
            redirect_to_https: self.redirect_to_https,
            verdicts,
        };
        let conn = if proto == Proto::H1 && self.http1_server == Http1Server::Rampart {
            let h = handler(None);
            Served::Rampart(crate::h1::Connection::new(
                stream,
                self.h1_settings,
                move |req: Request<crate::h1::Body>| h.call(req.map(ClientBody::Rampart)),
            ))
        } else {
            // hyper hides Content-Length next to Transfer-Encoding from the service; the
            // guard sees the raw heads and tells the service per request.
            let (stream, verdicts) =
                h1_guard::wrap(stream, self.max_header_bytes, self.max_headers);
            let h = handler(Some(verdicts));
            let svc = service_fn(move |req: Request<Incoming>| h.call(req.map(ClientBody::Hyper)));
            self.builders.serve(proto, stream, svc)
        };
        let first_request_wait = self.first_request_wait;
        async move {
            let mut conn = std::pin::pin!(conn);
            let ended = drive(
                conn.as_mut(),
                |c| c.graceful_shutdown(),
                &conn_state,
                &mut phase,
                first_request_wait,
            )
            .await;
            match ended {
                Ended::Done(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                Ended::Cut => tracing::debug!(%peer, "connection cut at the drain deadline"),
                Ended::Expired(Expired::HeaderRead) => {
                    tracing::debug!(%peer, "no request head within header_read_timeout: closed");
                }
                Ended::Expired(Expired::Idle) => {
                    tracing::debug!(%peer, "HTTP/2 connection idle: closed");
                }
                Ended::Done(Ok(())) => {}
            }
            // Unless a tunnel took it over.
            drop(conn_state.release());
        }
    }
}

/// The protocol of a new plain connection, from its first bytes (`proto::sniff`), within
/// the same bounds `drive` puts on a connection that has sent nothing: the header read
/// timeout from accept, and once closing, `first_request_wait`. None: closed, silent or
/// unreadable; nothing to serve.
async fn sniff(
    tcp: &TcpStream,
    header_read_timeout: Duration,
    phase: &mut watch::Receiver<Phase>,
    first_request_wait: Duration,
    peer: SocketAddr,
) -> Option<Proto> {
    let looked = tokio::select! {
        r = proto::sniff(tcp) => r,
        _ = tokio::time::sleep(header_read_timeout) => {
            tracing::debug!(%peer, "no request head within header_read_timeout: closed");
            return None;
        }
        _ = reached(phase, Phase::Closing) => tokio::select! {
            r = proto::sniff(tcp) => r,
            _ = tokio::time::sleep(first_request_wait) => return None,
            _ = reached(phase, Phase::Cut) => return None,
        },
    };
    match looked {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "connection failed before its first byte");
            None
        }
    }
}

/// What a connection's service and its driver share.
struct ConnState {
    /// Set when the connection was told to close; requests after that get 503.
    closing: AtomicBool,
    /// A request has arrived on this connection.
    seen: AtomicBool,
    first: Notify,
    /// For the SSE streams answered on this connection.
    phase: watch::Receiver<Phase>,
    clocks: Arc<Clocks>,
    /// Until the connection ends, or a tunnel takes it (locked once or twice per connection).
    hold: Mutex<Option<ConnHold>>,
}

impl HoldSource for ConnState {
    fn release(&self) -> Option<ConnHold> {
        ConnState::release(self)
    }
}

impl ConnState {
    fn new(phase: watch::Receiver<Phase>, clocks: Arc<Clocks>, hold: ConnHold) -> Self {
        ConnState {
            closing: AtomicBool::new(false),
            seen: AtomicBool::new(false),
            first: Notify::new(),
            phase,
            clocks,
            hold: Mutex::new(Some(hold)),
        }
    }

    fn release(&self) -> Option<ConnHold> {
        crate::sync::lock(&self.hold).take()
    }

    fn request_seen(&self) {
        if !self.seen.load(Ordering::Relaxed) && !self.seen.swap(true, Ordering::Relaxed) {
            // Stores a permit if the driver is not waiting yet.
            self.first.notify_one();
        }
    }
}

enum Ended<E> {
    Done(Result<(), E>),
    Cut,
    /// Closed by the connection's own clock (`timeouts`).
    Expired(Expired),
}

/// Serves a connection through its listener's phases: normally until `Closing`, then a
/// graceful shutdown (after its first request, if it has not sent one yet), until it ends
/// or `Cut` drops it. Its clock (`timeouts::Clocks`) ends it earlier: dropped when no request
/// head came within the header read timeout of accept, closed gracefully (GOAWAY) when an
/// HTTP/2 connection has been idle for its idle timeout.
async fn drive<C, E>(
    mut conn: Pin<&mut C>,
    graceful: impl FnOnce(Pin<&mut C>),
    state: &ConnState,
    phase: &mut watch::Receiver<Phase>,
    first_request_wait: Duration,
) -> Ended<E>
where
    C: Future<Output = Result<(), E>>,
{
    // The connection's task wakes several times per request; the phase changes once or
    // twice in its life. Look at the phase only when it changed (`probe`, a receiver of
    // its own, tells without a lock), after one first look that registers the wake-up.
    // The clock (`timeouts::Clock`) costs a flag load per wake-up when it has nothing to do.
    let ended = {
        let probe = phase.clone();
        let closing = std::pin::pin!(reached(phase, Phase::Closing));
        let timer = std::pin::pin!(state.clocks.timer());
        Serving {
            looked: false,
            clock: Clock::default(),
            conn: conn.as_mut(),
            probe,
            state,
            closing,
            timer,
        }
        .await
    };
    match ended {
        Stop::Done(r) => return Ended::Done(r),
        // Nothing was asked on it: nothing to finish.
        Stop::Expired(Expired::HeaderRead) => return Ended::Expired(Expired::HeaderRead),
        Stop::Expired(Expired::Idle) => {
            state.closing.store(true, Ordering::Relaxed);
            graceful(conn.as_mut());
            return tokio::select! {
                r = conn.as_mut() => Ended::Done(r),
                _ = reached(phase, Phase::Cut) => Ended::Cut,
                _ = tokio::time::sleep(timeouts::GOAWAY_GRACE) => Ended::Expired(Expired::Idle),
            };
        }
        Stop::Closing => {}
    }
    if !state.seen.load(Ordering::Relaxed) {
        tokio::select! {
            r = conn.as_mut() => return Ended::Done(r),
            _ = state.first.notified() => {}
            _ = tokio::time::sleep(first_request_wait) => {}
            _ = reached(phase, Phase::Cut) => return Ended::Cut,
        }
    }
    state.closing.store(true, Ordering::Relaxed);
    graceful(conn.as_mut());
    tokio::select! {
        r = conn.as_mut() => Ended::Done(r),
        _ = reached(phase, Phase::Cut) => Ended::Cut,
    }
}

/// `drive`'s first stage, polled at every wake-up of the connection's task. What each poll
/// reads is here, together (`repr(C)`, 56 bytes): as a closure's captures and the locals
/// they pointed to, it was spread over four cache lines of the task's future, each a miss
/// per wake-up when 1,000 connections share a core.
#[repr(C)]
struct Serving<'a, C, F> {
    /// The phase was looked at once (which registered the wake-up).
    looked: bool,
    clock: Clock,
    conn: Pin<&'a mut C>,
    probe: watch::Receiver<Phase>,
    state: &'a ConnState,
    closing: Pin<&'a mut F>,
    timer: Pin<&'a mut Sleep>,
}

impl<C, E, F> Future for Serving<'_, C, F>
where
    C: Future<Output = Result<(), E>>,
    F: Future<Output = ()>,
{
    type Output = Stop<E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Stop<E>> {
        let this = self.get_mut();
        if let Poll::Ready(r) = this.conn.as_mut().poll(cx) {
            return Poll::Ready(Stop::Done(r));
        }
        if !this.looked || this.probe.has_changed().unwrap_or(true) {
            this.looked = true;
            if this.closing.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Stop::Closing);
            }
        }
        let state = this.state;
        if let Poll::Ready(e) = this
            .clock
            .poll(this.timer.as_mut(), &state.clocks, &state.seen, cx)
        {
            return Poll::Ready(Stop::Expired(e));
        }
        Poll::Pending
    }
}

/// Why the first stage of `drive` stopped.
enum Stop<E> {
    Done(Result<(), E>),
    Closing,
    Expired(Expired),
}

/// Counts an open connection of a listener.
#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_socket_binds_the_same_port_while_the_first_listens() {
        let first = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind(addr).expect("SO_REUSEPORT lets a new process take over");
        assert_eq!(second.local_addr().unwrap(), addr);
    }
}
