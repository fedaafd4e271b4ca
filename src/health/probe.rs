//! The probe loop of one check: probe, count the verdict through the consecutive
//! success/failure counter, publish the view, log and count transitions, then wait (faster
//! while something is unhealthy, see `next_wait`).

use super::*;

/// Runs one probed thing: probe, count, publish, wait; until stopped.
pub(crate) struct Runner {
    pub name: String,
    pub cfg: CheckConfig,
    pub slot: Slot,
    pub stop: watch::Receiver<bool>,
    pub metrics: HealthMetrics,
    pub health: Weak<Health>,
}

/// What the owner of a check adds to the probe loop (upstream checks use it; a dependency
/// check runs with `()`).
pub(crate) trait Hooks {
    /// After every probe: whether it passed, and the verdict change it made, if any.
    fn probed(&mut self, _ok: bool, _change: Option<Transition>) {}
    /// Something outside the check wants it at `unhealthy_interval` (an open breaker or
    /// ejection of the upstream), and at `fast_interval` after a refused connect or a pass
    /// that does not yet make `healthy_after` in a row.
    fn needs_attention(&self) -> bool {
        false
    }
    /// Changes when `needs_attention` may have turned true: the wait is cut short.
    fn attention(&mut self) -> Option<&mut watch::Receiver<u64>> {
        None
    }
}

impl Hooks for () {}

/// `run`'s verdict-change callback as hooks.
struct OnChange<F>(F);

impl<F: FnMut(Transition)> Hooks for OnChange<F> {
    fn probed(&mut self, _ok: bool, change: Option<Transition>) {
        if let Some(t) = change {
            (self.0)(t);
        }
    }
}

impl Runner {
    /// `probe` makes one probe; the runner bounds it by the check's timeout. `on_change` is
    /// called on every verdict change.
    pub(crate) async fn run<P, Fut>(self, probe: P, on_change: impl FnMut(Transition))
    where
        P: FnMut() -> Fut,
        Fut: Future<Output = Probe>,
    {
        self.run_with(probe, OnChange(on_change)).await
    }

    /// As `run`, with `hooks` told of every probe and able to ask for the faster interval.
    pub(crate) async fn run_with<P, Fut>(mut self, mut probe: P, mut hooks: impl Hooks)
    where
        P: FnMut() -> Fut,
        Fut: Future<Output = Probe>,
    {
        // A restarted check (reload) goes on from the verdict it had.
        let previous = self.slot.load().verdict;
        let mut counter = Counter::new(previous, self.cfg.unhealthy_after, self.cfg.healthy_after);
        let labels = HealthMetrics::labels(&self.name);
        // Passes in a row since the last failure or the last opening of a breaker or
        // ejection (each counts passes afresh from its opening, as `Breaker::health_passed`).
        let mut streak: u32 = 0;
        loop {
            if *self.stop.borrow() {
                return;
            }
            let started = Instant::now();
            let result = match tokio::time::timeout(self.cfg.timeout, probe()).await {
                Ok(p) => p,
                Err(_) => Probe::failed(format!(
                    "no answer within {}",
                    humantime::format_duration(self.cfg.timeout)
                )),
            };
            let latency = started.elapsed();
            self.metrics
                .latency
                .get_or_create(&labels)
                .observe(latency.as_secs_f64());
            let (ok, refused) = (result.ok, result.refused);
            if hooks
                .attention()
                .is_some_and(|rx| rx.has_changed().unwrap_or(false))
            {
                streak = 0;
            }
            streak = if ok { streak.saturating_add(1) } else { 0 };
            let transition = counter.record(ok);
            if self.name == "postgres"
                && let Some(s) = self.health.upgrade().map(|h| h.inputs.signals.clone())
            {
                s.db_query(result.ok);
            }
            let view = view_of(&counter, result, latency, started);
            if let Some(t) = transition {
                self.log_transition(t, &view);
                let to = match t {
                    Transition::Up => "up",
                    Transition::Down => "down",
                };
                let mut l = labels.clone();
                l.push(("to", to.to_owned()));
                self.metrics.transitions.get_or_create(&l).inc();
            }
            hooks.probed(ok, transition);
            self.slot.store(Arc::new(view));
            if let Some(h) = self.health.upgrade() {
                let check = h.checks().iter().find(|c| c.name == self.name).cloned();
                if let Some(c) = check {
                    self.metrics
                        .status
                        .get_or_create(&labels)
                        .set(c.status().as_gauge());
                }
                h.publish_overall();
            }
            // Envoy's unhealthy_interval: a failing check (or an upstream with an open
            // breaker or ejection) is probed often, so its recovery is seen within about a
            // second; never slower than `interval`.
            let unhealthy = self.cfg.unhealthy_interval.min(self.cfg.interval);
            // What happened before this point is seen by `needs_attention` below.
            if let Some(rx) = hooks.attention() {
                rx.borrow_and_update();
            }
            let wait = next_wait(
                &self.cfg,
                After {
                    ok,
                    refused,
                    streak,
                    down: counter.verdict() == Verdict::Down,
                    attention: hooks.needs_attention(),
                    failures: counter.failures(),
                },
            );
            let mut until = started + crate::jitter::spread(wait, JITTER);
            if wait > unhealthy
                && let Some(rx) = hooks.attention()
            {
                // A breaker that opens (or an endpoint ejected) during the long wait cuts
                // it short: health-informed recovery must not wait out `interval` first.
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => continue,
                    _ = crate::shutdown::stopped(&mut self.stop) => return,
                    changed = rx.changed() => {
                        if changed.is_ok() {
                            until = started + crate::jitter::spread(unhealthy, JITTER);
                            streak = 0;
                        }
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {}
                _ = crate::shutdown::stopped(&mut self.stop) => return,
            }
        }
    }

    fn log_transition(&self, t: Transition, view: &View) {
        // The endpoint for upstream checks; a dependency is its check's name.
        let key = self.slot_key();
        let what = if key.is_empty() {
            self.name.clone()
        } else {
            format!("{} {key}", self.name)
        };
        match t {
            Transition::Down => tracing::warn!(
                check = %what,
                critical = self.cfg.critical,
                error = view.error.as_deref().unwrap_or(""),
                "health check DOWN"
            ),
            Transition::Up => tracing::info!(check = %what, "health check UP"),
        }
    }

    /// The endpoint URL for upstream checks; empty otherwise.
    fn slot_key(&self) -> String {
        self.health
            .upgrade()
            .and_then(|h| {
                h.checks()
                    .iter()
                    .find(|c| c.name == self.name)
                    .and_then(|c| {
                        c.slots
                            .iter()
                            .find(|(_, s)| Arc::ptr_eq(s, &self.slot))
                            .map(|(k, _)| k.clone())
                    })
            })
            .unwrap_or_default()
    }
}

/// What the wait after a probe depends on.
#[derive(Debug, Clone, Copy)]
struct After {
    ok: bool,
    /// The probe's connect was refused.
    refused: bool,
    /// Passes in a row, this one included.
    streak: u32,
    /// The check's verdict is DOWN.
    down: bool,
    /// A breaker or ejection of the upstream is open (`Hooks::needs_attention`).
    attention: bool,
    /// Failures in a row, this one included (0 after a pass).
    failures: u32,
}

/// The wait until the next probe: `interval` while all is well, Envoy's
/// `unhealthy_interval` while the check is down or something of the upstream is open, and
/// HAProxy's `fastinter` where the next probe settles something:
/// - after a pass short of `healthy_after` in a row (the next pass may end the outage:
///   verdict, breaker, ejection), so the passes that confirm a recovery take ~0.5 s;
/// - after a refused connect while a breaker or ejection is open: known down, watched for
///   its return, and a refused connect costs it nothing. Not with nothing open: the only
///   endpoint restarting in 0.4 s must not meet three quick probes and be marked down.
///   Nor when the next failure would mark a check that is still UP down: a breaker of
///   another route (chat, with the LLM down) must not turn a 0.5 s restart of the backend
///   into a DOWN verdict (and, with `critical`, an unready fleet) that slow probes would
///   never have seen.
fn next_wait(cfg: &CheckConfig, a: After) -> Duration {
    let unhealthy = cfg.unhealthy_interval.min(cfg.interval);
    let fast = cfg.fast_interval.min(unhealthy);
    let confirming = a.ok && a.streak < cfg.healthy_after && (a.down || a.attention);
    let marks_down = !a.down && a.failures.saturating_add(1) >= cfg.unhealthy_after;
    let returning = !a.ok && a.refused && a.attention && !marks_down;
    if confirming || returning {
        fast
    } else if a.down || a.attention {
        unhealthy
    } else {
        cfg.interval
    }
}

/// The slot's new content after one probe.
fn view_of(counter: &Counter, probe: Probe, latency: Duration, at: Instant) -> View {
    let verdict = counter.verdict();
    let status = match verdict {
        Verdict::Up if probe.ok && probe.warning.is_some() => Status::Degraded,
        Verdict::Up => Status::Healthy,
        Verdict::Down | Verdict::Unknown => Status::Unhealthy,
    };
    View {
        verdict,
        status,
        latency: Some(latency),
        error: if probe.ok { probe.warning } else { probe.error },
        details: probe.details,
        checked_at: Some(at),
        failures: counter.failures(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn cfg() -> CheckConfig {
        CheckConfig {
            interval: ms(5000),
            unhealthy_interval: ms(1000),
            fast_interval: ms(250),
            timeout: ms(2000),
            critical: false,
            unhealthy_after: 3,
            healthy_after: 2,
        }
    }

    fn after(ok: bool, refused: bool, streak: u32, down: bool, attention: bool) -> After {
        After {
            ok,
            refused,
            streak,
            down,
            attention,
            failures: u32::from(!ok),
        }
    }

    #[test]
    fn fast_only_where_the_next_probe_settles_something() {
        let c = cfg();
        // All well: interval; a failure that is not yet DOWN (nothing open) too.
        assert_eq!(next_wait(&c, after(true, false, 9, false, false)), ms(5000));
        assert_eq!(next_wait(&c, after(false, true, 0, false, false)), ms(5000));
        // DOWN, refused, nothing open: unhealthy_interval, never fast.
        assert_eq!(next_wait(&c, after(false, true, 0, true, false)), ms(1000));
        // The first pass of a DOWN check: the confirming one comes fast, then UP: interval.
        assert_eq!(next_wait(&c, after(true, false, 1, true, false)), ms(250));
        assert_eq!(next_wait(&c, after(true, false, 2, false, false)), ms(5000));
        // A breaker open: refused probes fast, other failures at unhealthy_interval.
        assert_eq!(next_wait(&c, after(false, true, 0, true, true)), ms(250));
        assert_eq!(next_wait(&c, after(false, false, 0, true, true)), ms(1000));
        // Still UP with a breaker open (another route's): refused probes fast, except the
        // one that would mark it DOWN (unhealthy_after 3), which comes at unhealthy_interval.
        assert_eq!(next_wait(&c, after(false, true, 0, false, true)), ms(250));
        let second = After {
            failures: 2,
            ..after(false, true, 0, false, true)
        };
        assert_eq!(next_wait(&c, second), ms(1000));
        // Passes while it is open: fast until healthy_after in a row, then unhealthy_interval.
        assert_eq!(next_wait(&c, after(true, false, 1, false, true)), ms(250));
        assert_eq!(next_wait(&c, after(true, false, 2, false, true)), ms(1000));
        // healthy_after: 1 needs no confirming pass.
        let one = CheckConfig {
            healthy_after: 1,
            ..cfg()
        };
        assert_eq!(
            next_wait(&one, after(true, false, 1, false, true)),
            ms(1000)
        );
    }

    #[test]
    fn fast_interval_is_never_above_unhealthy_interval_nor_interval() {
        let c = CheckConfig {
            interval: ms(100),
            unhealthy_interval: ms(1000),
            fast_interval: ms(250),
            ..cfg()
        };
        assert_eq!(next_wait(&c, after(false, true, 0, true, true)), ms(100));
        let c = CheckConfig {
            unhealthy_interval: ms(50),
            ..cfg()
        };
        assert_eq!(next_wait(&c, after(true, false, 1, true, false)), ms(50));
    }
}
