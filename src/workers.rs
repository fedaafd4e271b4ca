//! Traffic workers, one thread per core, as nginx has worker processes: each thread runs
//! its own single-threaded tokio runtime, accepts on its own socket of every listener
//! (SO_REUSEPORT: the kernel spreads new connections over them) and keeps its own idle
//! upstream connections. A request then lives on one thread from accept to its last byte:
//! no cross-thread wake-ups, no work stealing, no idle pool shared between cores. The
//! control plane (admin, health checks, alerts, reloads, signals) stays on the main runtime.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// Set on worker threads only.
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Tasks a worker polls between two looks at its sockets and timers while it has work
/// (tokio's default is 61). nginx takes up to 512 events from each `epoll_wait`; with 61,
/// a worker busy with 1,000 connections took ~61 events per look, 6x as many looks as
/// nginx, and answered in small bursts, so the load generator and the upstream fell
/// asleep between answers and each answer paid for waking them (IPIs). 512 cut CPU per
/// request at 1,000 connections by ~6% (docs/benchmarks.md); an idle worker still looks
/// at once, so latency at low load is unchanged.
const EVENT_INTERVAL: u32 = 512;

/// The most workers any `Workers::start` in this process asked for.
static MAX_WORKERS: AtomicUsize = AtomicUsize::new(0);

/// This thread's worker number (0 off the worker threads).
pub fn index() -> usize {
    INDEX.with(Cell::get).unwrap_or(0)
}

/// How many slots per-thread state (an upstream pool's idle stacks) needs: one per worker,
/// plus one for every other thread (the control plane's health checks).
pub fn slots() -> usize {
    MAX_WORKERS.load(Ordering::Relaxed) + 1
}

/// This thread's worker number; None off the worker threads.
pub fn worker() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// The most workers started in this process so far.
pub fn max_workers() -> usize {
    MAX_WORKERS.load(Ordering::Relaxed)
}

/// This thread's entry in per-thread state of `len` entries (sized by [`slots`] when it was
/// made; state made before more workers started folds them in). Off the workers, always the
/// last entry: not one that moves when workers start later (in tests, other tests' workers),
/// which would hide what this thread put in the entry it used before (the upstream pool's
/// idle connections).
pub fn slot_in(len: usize) -> usize {
    let len = len.max(1);
    INDEX.with(Cell::get).map_or(len - 1, |i| i % len)
}

/// This thread's slot among [`slots`]: its worker number, or the last one off the workers.
pub fn slot() -> usize {
    INDEX
        .with(Cell::get)
        .unwrap_or_else(|| MAX_WORKERS.load(Ordering::Relaxed))
}

/// Where listeners run: on the worker threads, or (empty, the default: tests and embedding)
/// on the runtime of whoever starts them.
#[derive(Clone, Default)]
pub struct Workers {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field(
                "threads",
                &self.inner.as_ref().map_or(0, |i| i.handles.len()),
            )
            .finish_non_exhaustive()
    }
}

struct Inner {
    handles: Vec<Handle>,
    /// Dropped with the last `Workers`: each thread then leaves its runtime and ends.
    _stop: Vec<oneshot::Sender<()>>,
}

/// Keeps a timer due within a second on the worker's runtime, forever.
///
/// tokio wakes its own event loop (a write(2) to an eventfd, then an early return from
/// epoll_wait) whenever a timer is armed to fire before the loop's next planned wake-up,
/// and with no timer pending there is no planned wake-up at all. hyper arms a header-read
/// timer for every request: without this, about one request in five paid for that write.
/// With a wake-up always planned within a second, per-request timers (seconds away) never
/// trigger it; the price is one wake-up per second per worker.
async fn heartbeat() {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

impl Workers {
    /// Listeners run on the caller's runtime.
    pub fn current() -> Workers {
        Workers::default()
    }

    /// Starts `n` worker threads (at least one), each with its runtime.
    pub fn start(n: usize) -> io::Result<Workers> {
        let n = n.max(1);
        let mut handles = Vec::with_capacity(n);
        let mut stop = Vec::with_capacity(n);
        for i in 0..n {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("rampart-worker-{i}"))
                .spawn(move || {
                    INDEX.with(|c| c.set(Some(i)));
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .event_interval(EVENT_INTERVAL)
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let (stop_tx, stop_rx) = oneshot::channel::<()>();
                    if ready_tx.send(Ok((rt.handle().clone(), stop_tx))).is_err() {
                        return;
                    }
                    rt.block_on(async {
                        tokio::select! {
                            _ = stop_rx => {}
                            () = heartbeat() => {}
                        }
                    });
                })?;
            let (handle, stop_tx) = ready_rx
                .recv()
                .map_err(|_| io::Error::other("a worker thread ended before it started"))??;
            handles.push(handle);
            stop.push(stop_tx);
        }
        MAX_WORKERS.fetch_max(n, Ordering::Relaxed);
        Ok(Workers {
            inner: Some(Arc::new(Inner {
                handles,
                _stop: stop,
            })),
        })
    }

    /// How many accept loops (and listening sockets) each listener gets.
    pub fn count(&self) -> usize {
        self.inner.as_ref().map_or(1, |i| i.handles.len())
    }

    /// Runs `fut` on worker `i` (on the caller's runtime without workers).
    pub fn spawn_on<F>(&self, i: usize, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match &self.inner {
            Some(inner) if !inner.handles.is_empty() => {
                inner.handles[i % inner.handles.len()].spawn(fut);
            }
            _ => {
                tokio::spawn(fut);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Off the workers a thread keeps its entry however many workers start meanwhile.
    /// Before, it was `MAX_WORKERS % len`: a pool made before workers started put idle
    /// connections in one stack and, once they had, looked for them in another.
    #[test]
    fn a_thread_off_the_workers_keeps_its_entry_when_workers_start() {
        for len in [1, 2, 3, 9] {
            let before = slot_in(len);
            let workers = Workers::start(3).unwrap();
            assert_eq!(slot_in(len), before, "len {len}");
            assert_eq!(before, len - 1);
            drop(workers);
        }
    }

    #[test]
    fn each_worker_runs_its_tasks_on_its_own_thread() {
        let workers = Workers::start(2).unwrap();
        assert_eq!(workers.count(), 2);
        assert!(slots() >= 3);
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..4 {
            let tx = tx.clone();
            workers.spawn_on(i, async move {
                let _ = tx.send((i, slot(), std::thread::current().id()));
            });
        }
        let mut seen: Vec<_> = (0..4)
            .map(|_| rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap())
            .collect();
        seen.sort_by_key(|s| s.0);
        // Task i runs on worker i % 2, and each worker is one thread.
        assert_eq!(seen[0].1, 0);
        assert_eq!(seen[1].1, 1);
        assert_eq!(seen[2].1, 0);
        assert_eq!(seen[3].1, 1);
        assert_eq!(seen[0].2, seen[2].2);
        assert_eq!(seen[1].2, seen[3].2);
        assert_ne!(seen[0].2, seen[1].2);
    }
}
