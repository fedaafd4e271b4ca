//! The one shutdown sequence, whatever starts it (SIGTERM, SIGINT, `POST /admin/drain`):
//!
//! 1. readiness fails at once (`/readyz` 503), traffic is still served normally for
//!    `drain.accept_grace` while load balancers converge;
//! 2. inbound listeners stop accepting (the port is released) and every connection closes
//!    gracefully: HTTP/1 after the response in flight (`Connection: close`), idle keep-alive
//!    connections at once, HTTP/2 with GOAWAY; a request that still arrives on a closing
//!    connection gets 503 SERVICE_UNAVAILABLE;
//! 3. in-flight requests finish, until `drain.timeout` after the signal. Egress listeners
//!    keep accepting meanwhile (the app behind us still finishes its own work through them);
//! 4. at the deadline, SSE streams still open get a final `event: error` with a jittered
//!    `retry:` and end cleanly; after a short flush, whatever is left is cut;
//! 5. background tasks stop and pools close; the caller exits 0 and logs the report.
//!
//! A second signal exits at once (`app::run`).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{DrainConfig, DrainMode};

/// After the final events, how long connections get to write them and close before they
/// are cut.
pub(crate) const FINAL_FLUSH: Duration = Duration::from_secs(1);
/// How often the drain looks at whether egress listeners are still in use.
const EGRESS_POLL: Duration = Duration::from_millis(50);

// === phases of a listener and its connections ===

/// Where a listener is in its life. Ordered: each phase includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    Serving,
    /// Not accepting (the port is released); every connection closes after the response in
    /// flight (HTTP/1 `Connection: close`, idle ones at once; HTTP/2 GOAWAY).
    Closing,
    /// The drain deadline: SSE streams still open get a final event and end.
    Finale,
    /// Connections still open are dropped.
    Cut,
}

/// Marks a request that arrived on a connection already told to close (an HTTP/2 stream
/// racing the GOAWAY): the pipeline answers it 503 SERVICE_UNAVAILABLE.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnClosing;

/// What an open client connection holds: its slot under the listener's `max_connections`,
/// its place in the open-connection count, and a receiver of the listener's phase (the drain
/// waits until every receiver is gone, see [`Server::finished`]). A connection that becomes
/// a tunnel hands it to the tunnel ([`Handover`]), so the cap and the drain see tunnels too.
pub(crate) struct ConnHold {
    _permit: OwnedSemaphorePermit,
    _open: OpenGuard,
    phase: watch::Receiver<Phase>,
}

impl ConnHold {
    /// Counts the connection in `open` until the hold is dropped.
    pub(crate) fn new(
        permit: OwnedSemaphorePermit,
        open: &Arc<AtomicUsize>,
        phase: watch::Receiver<Phase>,
    ) -> Self {
        ConnHold {
            _permit: permit,
            _open: OpenGuard::new(open),
            phase,
        }
    }

    /// Resolves at the drain deadline of the connection's listener (`Phase::Finale`), where
    /// whatever still runs on it is ended.
    pub(crate) async fn deadline(&mut self) {
        reached(&mut self.phase, Phase::Finale).await;
    }
}

/// In the extensions of an HTTP/1.1 request that may switch protocols (only those: nothing
/// on the plain request path): the tunnel takes its connection's [`ConnHold`] through it.
/// Weak: a request kept anywhere longer than its connection keeps nothing of it alive.
#[derive(Clone)]
pub(crate) struct Handover(pub Weak<dyn HoldSource>);

/// Where a connection keeps its [`ConnHold`] until a tunnel takes it (the listener's
/// per-connection state).
pub(crate) trait HoldSource: Send + Sync {
    fn release(&self) -> Option<ConnHold>;
}

impl Handover {
    /// The connection's hold, once: None when the connection is already gone.
    pub(crate) fn take(&self) -> Option<ConnHold> {
        self.0.upgrade()?.release()
    }
}

/// Resolves once the phase is at least `p` (or the server handle is gone).
pub(crate) async fn reached(phase: &mut watch::Receiver<Phase>, p: Phase) {
    let _ = phase.wait_for(|now| *now >= p).await;
}

struct OpenGuard(Arc<AtomicUsize>);

impl OpenGuard {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(open.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves once the flag is true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

// === in-flight accounting ===

/// Requests and SSE streams in flight, process-wide: what a drain still waits for.
/// Counted per thread (worker), each in its own allocation, so that workers counting every
/// request never write to the same cache line; readers add them up.
#[derive(Debug)]
pub struct InFlight {
    shards: Box<[Arc<Shard>]>,
}

#[derive(Debug, Default)]
pub(crate) struct Shard {
    requests: AtomicUsize,
    streams: AtomicUsize,
    /// Streams ended with the final event since start (drains and replaced listeners).
    streams_ended: AtomicUsize,
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight {
            shards: (0..crate::workers::slots())
                .map(|_| Arc::default())
                .collect(),
        }
    }
}

impl InFlight {
    /// Counts a request until the guard (moved into its response body) is dropped.
    pub fn request(&self) -> RequestGuard {
        // Never empty (at least one slot).
        let shard = &self.shards[crate::workers::slot_in(self.shards.len())];
        shard.requests.fetch_add(1, Ordering::Relaxed);
        RequestGuard(shard.clone())
    }

    fn sum(&self, field: impl Fn(&Shard) -> &AtomicUsize) -> usize {
        self.shards
            .iter()
            .map(|s| field(s).load(Ordering::Relaxed))
            .sum()
    }

    pub fn requests(&self) -> usize {
        self.sum(|s| &s.requests)
    }

    pub fn streams(&self) -> usize {
        self.sum(|s| &s.streams)
    }

    pub fn streams_ended(&self) -> usize {
        self.sum(|s| &s.streams_ended)
    }
}

#[derive(Debug)]
pub struct RequestGuard(Arc<Shard>);

impl RequestGuard {
    /// The request's answer is an SSE stream.
    pub fn stream(&self) -> StreamGuard {
        self.0.streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.0.clone())
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct StreamGuard(Arc<Shard>);

impl StreamGuard {
    pub fn ended_by_drain(&self) {
        self.0.streams_ended.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

// === background tasks ===

/// Tasks that run beside the traffic (probes, alert timers, pool maintenance). Each gets a
/// stop flag; the last step of a drain raises it and waits for them, briefly.
#[derive(Debug)]
pub struct Background {
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<(&'static str, JoinHandle<()>)>>,
}

impl Default for Background {
    fn default() -> Self {
        Background {
            stop: watch::Sender::new(false),
            tasks: Mutex::new(Vec::new()),
        }
    }
}

impl Background {
    /// Spawns `task(stop)`; it should return soon after `stop` turns true.
    pub fn spawn<F, Fut>(&self, name: &'static str, task: F)
    where
        F: FnOnce(watch::Receiver<bool>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(task(self.stop.subscribe()));
        crate::sync::lock(&self.tasks).push((name, handle));
    }

    /// Raises the stop flag and waits up to `wait` for each task; the late ones are aborted.
    pub async fn stop(&self, wait: Duration) {
        self.stop.send_replace(true);
        let tasks = std::mem::take(&mut *crate::sync::lock(&self.tasks));
        let deadline = Instant::now() + wait;
        for (name, mut task) in tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                tracing::warn!(task = name, "background task did not stop in time; aborted");
                task.abort();
            }
        }
    }
}

// === the drain ===

/// What a drain did, for the exit log and `Running::drain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainReport {
    /// Everything ended before the deadline.
    pub finished: bool,
    pub elapsed: Duration,
    /// Requests (streams included) still open when connections were cut.
    pub requests_cut: usize,
    /// SSE streams ended with the final event.
    pub streams_ended: usize,
}

impl DrainReport {
    pub fn log(&self) {
        let elapsed_ms = u64::try_from(self.elapsed.as_millis()).unwrap_or(u64::MAX);
        if self.finished {
            tracing::info!(elapsed_ms, "drain finished: every request completed");
        } else {
            tracing::warn!(
                elapsed_ms,
                streams_ended_with_final_event = self.streams_ended,
                requests_cut = self.requests_cut,
                "drain timed out"
            );
        }
    }
}

/// Runs steps 1 to 4 over `servers` (the current listeners and any still draining after a
/// reload). `skip_grace` stops accepting at once (in-process tests, `Running::shutdown`).
/// A listener as the drain sees it.
pub(crate) trait Drainable: Send + Sync {
    fn name(&self) -> &str;
    fn addr(&self) -> std::net::SocketAddr;
    fn mode(&self) -> DrainMode;
    fn phase(&self) -> Phase;
    fn advance(&self, to: Phase);
    fn open_connections(&self) -> usize;
    /// Resolves once the listener is closed and every connection has ended.
    fn finished(&self) -> impl Future<Output = ()> + Send;
}

pub(crate) async fn drain<S: Drainable>(
    servers: Vec<Arc<S>>,
    in_flight: Arc<InFlight>,
    cfg: DrainConfig,
    skip_grace: bool,
) -> DrainReport {
    let start = Instant::now();
    let deadline = start + cfg.timeout;
    let ended_before = in_flight.streams_ended();
    let grace = if skip_grace {
        Duration::ZERO
    } else {
        cfg.accept_grace
    };
    tracing::info!(
        accept_grace_ms = millis(grace),
        timeout_ms = millis(cfg.timeout),
        requests_in_flight = in_flight.requests(),
        "draining: readiness is off; still accepting during the grace"
    );
    tokio::time::sleep_until(start + grace).await;

    let (egress, inbound): (Vec<_>, Vec<_>) = servers
        .into_iter()
        .partition(|s| s.mode() == DrainMode::Egress && s.phase() == Phase::Serving);
    for s in &inbound {
        s.advance(Phase::Closing);
    }
    tracing::info!(
        requests_in_flight = in_flight.requests(),
        streams_open = in_flight.streams(),
        egress_listeners = egress.len(),
        "inbound listeners closed; waiting for requests in flight"
    );

    let quiet = async {
        for s in &inbound {
            s.finished().await;
        }
        // The app behind an egress listener is done with it once nothing is connected (it
        // has exited or closed its pool); until then it may still need its outbound path.
        while egress.iter().any(|s| s.open_connections() > 0) {
            tokio::time::sleep(EGRESS_POLL).await;
        }
    };
    let finished = tokio::time::timeout_at(deadline, quiet).await.is_ok();
    let all: Vec<&Arc<S>> = inbound.iter().chain(&egress).collect();
    let mut requests_cut = 0;
    if finished {
        for s in &all {
            s.advance(Phase::Closing);
        }
    } else {
        tracing::info!(
            streams_open = in_flight.streams(),
            requests_in_flight = in_flight.requests(),
            "drain deadline: ending SSE streams with a final event"
        );
        for s in &all {
            s.advance(Phase::Finale);
        }
        let flushed = tokio::time::timeout(FINAL_FLUSH, async {
            for s in &all {
                s.finished().await;
            }
        })
        .await
        .is_ok();
        if !flushed {
            requests_cut = in_flight.requests();
            for s in &all {
                s.advance(Phase::Cut);
            }
        }
    }
    // Bounded: after Cut the connection tasks end at their next poll.
    let _ = tokio::time::timeout(FINAL_FLUSH, async {
        for s in &all {
            s.finished().await;
        }
    })
    .await;
    DrainReport {
        finished,
        elapsed: start.elapsed(),
        requests_cut,
        streams_ended: in_flight.streams_ended().saturating_sub(ended_before),
    }
}

/// Drains one listener replaced by a reload: it stops accepting now (its successor is
/// already bound), then gets the same deadline treatment as a whole drain.
pub(crate) async fn retire<S: Drainable>(server: Arc<S>, timeout: Duration) {
    server.advance(Phase::Closing);
    if tokio::time::timeout(timeout, server.finished())
        .await
        .is_ok()
    {
        tracing::info!(listener = server.name(), addr = %server.addr(), "replaced listener drained");
        return;
    }
    server.advance(Phase::Finale);
    if tokio::time::timeout(FINAL_FLUSH, server.finished())
        .await
        .is_err()
    {
        server.advance(Phase::Cut);
    }
    tracing::warn!(
        listener = server.name(),
        addr = %server.addr(),
        "replaced listener hit the drain timeout; its remaining connections were cut"
    );
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

// === signals ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    /// SIGTERM: drain.
    Terminate,
    /// SIGINT (Ctrl-C): drain, like SIGTERM.
    Interrupt,
    /// SIGQUIT: exit at once, without draining.
    Quit,
    /// SIGHUP: reload the configuration file.
    Hangup,
}

impl Signal {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Signal::Terminate => "SIGTERM",
            Signal::Interrupt => "SIGINT",
            Signal::Quit => "SIGQUIT",
            Signal::Hangup => "SIGHUP",
        }
    }
}

/// The process signals rampart handles. Installed before anything is bound, so an early
/// SIGTERM drains instead of killing.
#[cfg(unix)]
pub(crate) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    pub(crate) fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    pub(crate) async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Terminate,
            _ = self.int.recv() => Signal::Interrupt,
            _ = self.quit.recv() => Signal::Quit,
            _ = self.hup.recv() => Signal::Hangup,
        }
    }
}

#[cfg(not(unix))]
pub struct Signals;

#[cfg(not(unix))]
impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        Ok(Signals)
    }

    pub async fn recv(&mut self) -> Signal {
        match tokio::signal::ctrl_c().await {
            Ok(()) => Signal::Interrupt,
            Err(_) => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_count_requests_and_streams() {
        let f = Arc::new(InFlight::default());
        let r1 = f.request();
        let r2 = f.request();
        let s = r2.stream();
        assert_eq!((f.requests(), f.streams()), (2, 1));
        s.ended_by_drain();
        drop(s);
        drop(r1);
        assert_eq!((f.requests(), f.streams(), f.streams_ended()), (1, 0, 1));
        drop(r2);
        assert_eq!(f.requests(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn background_tasks_stop_or_are_aborted() {
        let bg = Background::default();
        let stopped = Arc::new(AtomicUsize::new(0));
        let s = stopped.clone();
        bg.spawn("polite", move |mut stop| async move {
            let _ = stop.wait_for(|s| *s).await;
            s.fetch_add(1, Ordering::SeqCst);
        });
        bg.spawn("stuck", |_stop| std::future::pending());
        let start = Instant::now();
        bg.stop(Duration::from_secs(2)).await;
        assert_eq!(stopped.load(Ordering::SeqCst), 1);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }
}
