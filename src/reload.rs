//! Configuration hot reload (SIGHUP, `POST /admin/reload`): the parts that are not wiring.
//! `app` reads the file, binds what changed and swaps the snapshot; this module says what
//! a reload reports, counts it, and how state kept by name follows the new configuration;
//! `watch.rs` notices files (certificates) changed on disk.

pub mod watch;

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::config::{Config, ConfigError, ListenerConfig};
use crate::error::push_json_string;

/// A registry of state kept by name (rate limiters, breakers, endpoint health, caches). It
/// lives in `Shared`, outside the snapshot, so it survives reloads.
pub trait KeyedState: Send + Sync {
    /// Called with a new, valid configuration before its snapshot is swapped in: keep the
    /// state of names that still exist (unchanged), create the new ones, drop the rest.
    /// Requests still running on the old snapshot may look up a dropped name afterwards, so
    /// lookups must not assume the name exists.
    fn reconcile(&self, config: &Config);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    Ok,
    /// The file is invalid or could not be applied: the old configuration keeps running.
    Error,
    /// A drain is in progress: nothing was read.
    Refused,
}

/// What one reload did, logged and answered by `POST /admin/reload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub result: ReloadResult,
    /// `file:line:column: key.path: message`, one per problem.
    pub errors: Vec<String>,
    /// Listeners bound anew, added or drained.
    pub changes: Vec<String>,
    /// Settings that only take effect at the next start.
    pub warnings: Vec<String>,
}

impl ReloadReport {
    pub fn ok(changes: Vec<String>, warnings: Vec<String>) -> Self {
        ReloadReport {
            result: ReloadResult::Ok,
            errors: Vec::new(),
            changes,
            warnings,
        }
    }

    pub fn error(errors: Vec<String>) -> Self {
        ReloadReport {
            result: ReloadResult::Error,
            errors,
            changes: Vec::new(),
            warnings: Vec::new(),
        }
    }

    pub fn invalid(e: &ConfigError) -> Self {
        // ConfigError prints one located problem per line.
        Self::error(e.to_string().lines().map(str::to_owned).collect())
    }

    pub fn refused(reason: &str) -> Self {
        ReloadReport {
            result: ReloadResult::Refused,
            errors: vec![reason.to_owned()],
            changes: Vec::new(),
            warnings: Vec::new(),
        }
    }

    pub fn is_ok(&self) -> bool {
        self.result == ReloadResult::Ok
    }

    pub fn to_json(&self) -> String {
        let result = match self.result {
            ReloadResult::Ok => "ok",
            ReloadResult::Error => "error",
            ReloadResult::Refused => "refused",
        };
        let mut out = format!("{{\"result\":\"{result}\"");
        for (key, list) in [
            ("errors", &self.errors),
            ("changes", &self.changes),
            ("warnings", &self.warnings),
        ] {
            out.push_str(",\"");
            out.push_str(key);
            out.push_str("\":[");
            for (i, item) in list.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_json_string(&mut out, item);
            }
            out.push(']');
        }
        out.push_str("}\n");
        out
    }

    pub fn log(&self) {
        match self.result {
            ReloadResult::Ok => tracing::info!(
                changes = ?self.changes,
                warnings = ?self.warnings,
                "configuration reloaded"
            ),
            ReloadResult::Error => {
                for e in &self.errors {
                    tracing::error!("reload: {e}");
                }
                tracing::error!(
                    problems = self.errors.len(),
                    "configuration reload failed; the previous configuration keeps running"
                );
            }
            ReloadResult::Refused => tracing::warn!(reason = ?self.errors, "reload refused"),
        }
    }
}

/// `rampart_config_reloads_total{result="ok|error"}`.
#[derive(Clone, Debug)]
pub struct ReloadMetrics {
    ok: Counter,
    error: Counter,
}

impl ReloadMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let family = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        // Both series exist from the start, so `increase(...{result="error"})` has data.
        let ok = family.get_or_create(&vec![("result", "ok")]).clone();
        let error = family.get_or_create(&vec![("result", "error")]).clone();
        registry.register(
            "config_reloads",
            "Configuration reloads (SIGHUP, POST /admin/reload) by result",
            family,
        );
        ReloadMetrics { ok, error }
    }

    pub fn record(&self, report: &ReloadReport) {
        match report.result {
            ReloadResult::Ok => {
                self.ok.inc();
            }
            ReloadResult::Error => {
                self.error.inc();
            }
            ReloadResult::Refused => {}
        }
    }
}

/// Whether a listener's connection-level settings are the same, so its running server can
/// stay (its routes come from the snapshot). Anything else needs a new socket.
pub fn same_server(a: &ListenerConfig, b: &ListenerConfig) -> bool {
    let strip = |l: &ListenerConfig| ListenerConfig {
        routes: Vec::new(),
        ..l.clone()
    };
    strip(a) == strip(b)
}

/// Settings a reload cannot change in a running process.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if old.logging.level != new.logging.level {
        out.push("logging.level takes effect at the next start".to_owned());
    }
    if old.logging.format != new.logging.format {
        out.push("logging.format takes effect at the next start".to_owned());
    }
    out
}

// === a reload never ends the process ===

/// Runs `f`; a panic in it comes back as its message. What `f` touched is the caller's to
/// put back.
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(&*p))
}

/// Polls `f`, turning a panic in any poll into its message, so a reload that panics where
/// nothing expected it is a failed reload rather than a dead supervisor (and, with it,
/// every listener and the process).
pub fn catch_async<F: Future>(f: F) -> CatchUnwind<F> {
    CatchUnwind(Box::pin(f))
}

pub struct CatchUnwind<F>(Pin<Box<F>>);

impl<F> std::fmt::Debug for CatchUnwind<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatchUnwind").finish_non_exhaustive()
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.get_mut().0.as_mut();
        match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(p) => Poll::Ready(Err(panic_message(&*p))),
        }
    }
}

pub fn panic_message(p: &(dyn Any + Send)) -> String {
    let text = p
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned());
    format!("panicked: {text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_caught_with_its_message() {
        assert_eq!(catch(|| 7), Ok(7));
        assert_eq!(
            catch(|| -> u8 { panic!("boom {}", 1) }),
            Err("panicked: boom 1".to_owned())
        );
        assert_eq!(
            catch(|| -> u8 { std::panic::panic_any(3u8) }),
            Err("panicked: (no message)".to_owned())
        );
    }

    #[tokio::test]
    async fn a_panic_in_any_poll_of_a_future_is_caught() {
        assert_eq!(catch_async(async { 5 }).await, Ok(5));
        let r = catch_async(async {
            tokio::task::yield_now().await;
            if true {
                panic!("late");
            }
            1
        })
        .await;
        assert_eq!(r, Err("panicked: late".to_owned()));
    }

    #[test]
    fn report_json_lists_everything_escaped() {
        let r = ReloadReport::error(vec!["a.yaml:1:2: x: \"bad\"".into()]);
        assert_eq!(
            r.to_json(),
            "{\"result\":\"error\",\"errors\":[\"a.yaml:1:2: x: \\\"bad\\\"\"],\"changes\":[],\"warnings\":[]}\n"
        );
        let r = ReloadReport::ok(vec!["c".into()], vec![]);
        assert!(r.to_json().starts_with("{\"result\":\"ok\""));
    }

    #[test]
    fn reload_counter_is_exported_by_result() {
        let mut reg = crate::observe::new_registry();
        let m = ReloadMetrics::register(&mut reg);
        m.record(&ReloadReport::ok(vec![], vec![]));
        m.record(&ReloadReport::error(vec![]));
        m.record(&ReloadReport::error(vec![]));
        m.record(&ReloadReport::refused("draining"));
        let text = crate::observe::encode_registry(&std::sync::Arc::new(reg));
        assert!(
            text.contains("rampart_config_reloads_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("rampart_config_reloads_total{result=\"error\"} 2"),
            "{text}"
        );
    }
}
