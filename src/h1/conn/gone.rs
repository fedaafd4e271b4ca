//! The watch `poll_gone` keeps on the client's socket while an answer is awaited or
//! streamed: a waker that wakes the connection's task and remembers that it did. Until it
//! has (and while the task is the same), the client has sent nothing and is still there,
//! so the socket need not be asked again: a stream asked it after every event (through the
//! socket's waiter list), ~400 instructions of the ~4,700 an event cost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Wake, Waker};

struct Watch {
    fired: AtomicBool,
    task: Waker,
}

impl Wake for Watch {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

/// The connection's watch: its waker (kept for the next exchange's, to reuse the
/// allocation) and whether it is the waker the socket would wake for a read now.
#[derive(Default)]
pub(super) struct GoneWatch {
    watch: Option<Arc<Watch>>,
    on_socket: bool,
}

impl GoneWatch {
    /// The socket is watched for `cx`'s task and has not woken it: nothing to look at.
    pub(super) fn quiet(&self, cx: &Context<'_>) -> bool {
        self.on_socket
            && self
                .watch
                .as_ref()
                .is_some_and(|w| !w.fired.load(Ordering::Acquire) && w.task.will_wake(cx.waker()))
    }

    /// A fresh watch for `cx`'s task, to poll the socket with (then tell `placed` whether
    /// the poll left it there: Pending).
    pub(super) fn arm(&mut self, cx: &Context<'_>) -> Waker {
        let fresh = || {
            Arc::new(Watch {
                fired: AtomicBool::new(false),
                task: cx.waker().clone(),
            })
        };
        // The last watch's allocation again when the socket no longer holds it.
        let watch = match self.watch.take() {
            Some(mut w) => match Arc::get_mut(&mut w) {
                Some(free) => {
                    free.fired = AtomicBool::new(false);
                    free.task.clone_from(cx.waker());
                    w
                }
                None => fresh(),
            },
            None => fresh(),
        };
        self.watch = Some(watch.clone());
        Waker::from(watch)
    }

    /// Whether the socket's read waker is the watch now: after `arm`, the poll's outcome;
    /// any other read of the socket puts another waker (or none) there.
    pub(super) fn placed(&mut self, on_socket: bool) {
        self.on_socket = on_socket;
    }
}
