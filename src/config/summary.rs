//! `rampart check`'s short human summary of a valid file.

use std::time::Duration;

use super::{
    CacheStore, Config, DrainMode, RateLimitCost, RateLimitStore, RedisTarget, Resilience, RetryOn,
    redis_url_shown,
};

/// "1 route", "2 routes".
fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A byte size in the largest binary unit that divides it ("10 MiB", "1500 B").
fn human_bytes(n: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= size && n.is_multiple_of(size) {
            return format!("{} {unit}", n / size);
        }
    }
    format!("{n} B")
}

/// The breaker, retry and health-check lines of one upstream in `rampart check`.
fn summarize_resilience(s: &mut String, r: &Resilience) {
    use std::fmt::Write;
    let d = |d: Duration| humantime::format_duration(d).to_string();
    let b = &r.circuit_breaker;
    let rate = b.failure_rate.as_ref().map_or(String::new(), |f| {
        format!(
            ", or {:.0}% of at least {} calls in {}",
            f.threshold * 100.0,
            f.min_calls,
            d(f.window)
        )
    });
    let _ = writeln!(
        s,
        "  breaker per {}: {} failures{rate}, open {} (max {}), closes after {} successes",
        b.scope.as_str(),
        b.failures,
        d(b.open_for),
        d(b.max_open_for),
        b.half_open_successes
    );
    let t = &r.retry;
    let on: Vec<String> =
        t.on.iter()
            .map(|o| match o {
                RetryOn::ConnectError => "connect_error".to_owned(),
                RetryOn::Timeout => "timeout".to_owned(),
                RetryOn::Reset => "reset".to_owned(),
                RetryOn::Status(code) => code.to_string(),
            })
            .collect();
    let _ = writeln!(
        s,
        "  retry   {} attempts on {}, backoff {}..{}, budget {:.0}% + {}/s",
        t.attempts,
        on.join(","),
        d(t.backoff_base),
        d(t.backoff_max),
        t.budget_ratio * 100.0,
        t.budget_min_per_s
    );
    let _ = match &r.health_check {
        Some(h) => writeln!(
            s,
            "  health  GET {} every {}, timeout {}, down after {}, up after {}{}",
            h.path,
            d(h.check.interval),
            d(h.check.timeout),
            h.check.unhealthy_after,
            h.check.healthy_after,
            if h.check.critical { ", critical" } else { "" }
        ),
        None => writeln!(
            s,
            "  health  none (passive ejection only: {} failures)",
            r.ejection.consecutive_failures
        ),
    };
}

impl Config {
    /// A short human summary for `rampart check`.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "{}: ok", self.source);
        let _ = writeln!(
            s,
            "admin     {}{}",
            self.admin.listen,
            match (&self.admin.token, self.admin.insecure_no_token) {
                (Some(_), _) => " (token)",
                (None, true) => " (NO TOKEN: insecure_no_token)",
                (None, false) => "",
            }
        );
        for l in &self.listeners {
            let _ = writeln!(
                s,
                "listener  {} on {} ({}, max {} connections{})",
                l.name,
                l.listen,
                plural(l.routes.len(), "route"),
                l.max_connections,
                if l.drain == DrainMode::Egress {
                    ", egress"
                } else {
                    ""
                }
            );
            for r in &l.routes {
                let methods = r
                    .methods
                    .as_ref()
                    .map(|m| m.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(","))
                    .unwrap_or_else(|| "*".into());
                let total = r
                    .timeouts
                    .total
                    .map(|d| humantime::format_duration(d).to_string())
                    .unwrap_or_else(|| "off".into());
                let limits = if r.rate_limits.is_empty() {
                    String::new()
                } else {
                    format!(", rate limits {}", r.rate_limits.join(","))
                };
                let cache = r
                    .cache
                    .as_ref()
                    .map_or(String::new(), |c| format!(", cache {c}"));
                let _ = writeln!(
                    s,
                    "  route   {} {}{} [{}] -> {} (first_byte {}, idle {}, total {}, body {}{limits}{cache})",
                    r.name,
                    r.host.as_deref().unwrap_or(""),
                    r.path_prefix,
                    methods,
                    r.upstream,
                    humantime::format_duration(r.timeouts.first_byte),
                    humantime::format_duration(r.timeouts.idle),
                    total,
                    human_bytes(r.max_body_bytes)
                );
            }
        }
        if let Some(r) = &self.redis {
            let target = match &r.target {
                // Credentials stay out of the summary.
                RedisTarget::Url(url) => redis_url_shown(url),
                RedisTarget::Sentinel { master, addresses } => {
                    format!("sentinel master {master} via {}", addresses.join(", "))
                }
                RedisTarget::Cluster {
                    nodes, username, ..
                } => match username {
                    Some(user) => format!("cluster {} as {user}", nodes.join(", ")),
                    None => format!("cluster {}", nodes.join(", ")),
                },
            };
            let _ = writeln!(
                s,
                "redis     {target} (timeout {}, pool {}, replicas {})",
                humantime::format_duration(r.timeout),
                r.pool_max_size,
                self.replicas
            );
        }
        for p in self.rate_limits.values() {
            let block = p
                .block_for
                .map(|d| humantime::format_duration(d).to_string())
                .unwrap_or_else(|| "off".into());
            let store = match p.store {
                RateLimitStore::Redis => "redis",
                RateLimitStore::Memory => "memory",
            };
            let mut what = String::new();
            if let Some(points) = p.points {
                let unit = match p.cost {
                    RateLimitCost::Requests => "",
                    RateLimitCost::Tokens => " tokens",
                };
                let _ = write!(
                    what,
                    "{points}{unit} per {}",
                    humantime::format_duration(p.per)
                );
            }
            if let Some(n) = p.max_streams {
                if !what.is_empty() {
                    what.push_str(", ");
                }
                let _ = write!(
                    what,
                    "max {n} streams (lease {})",
                    humantime::format_duration(p.stream_lease)
                );
            }
            // Blocking follows spent points: a streams-only policy has none to spend.
            let block = match p.points {
                Some(_) => format!("block {block}, "),
                None => String::new(),
            };
            let _ = writeln!(s, "ratelimit {} {what} ({block}store {store})", p.name);
        }
        for (name, c) in &self.caches {
            let stale = c
                .stale_if_error
                .map(|d| humantime::format_duration(d).to_string())
                .unwrap_or_else(|| "off".into());
            let store = match c.store {
                CacheStore::Redis => "redis",
                CacheStore::Memory => "memory",
            };
            let vary = if c.vary.is_empty() {
                String::new()
            } else {
                format!(", vary {}", c.vary.join(","))
            };
            let _ = writeln!(
                s,
                "cache     {name} ttl {} (stale_if_error {stale}, max entry {}, store {store}, memory {}{vary})",
                humantime::format_duration(c.ttl),
                human_bytes(c.max_entry_size),
                human_bytes(c.memory_max),
            );
        }
        let _ = writeln!(
            s,
            "drain     accept grace {}, timeout {}",
            humantime::format_duration(self.drain.accept_grace),
            humantime::format_duration(self.drain.timeout)
        );
        let sinks: Vec<&str> = self.alerts.sinks.iter().map(|k| k.kind.as_str()).collect();
        let _ = writeln!(
            s,
            "alerts    {} every {}, log{}{}",
            plural(self.alerts.rules.len(), "rule"),
            humantime::format_duration(self.alerts.interval),
            if sinks.is_empty() { "" } else { ", " },
            sinks.join(", ")
        );
        for u in self.upstreams.values() {
            let eps: Vec<String> = u.endpoints.iter().map(|e| e.to_string()).collect();
            let _ = writeln!(
                s,
                "upstream  {} -> {} (connect {}, pool idle {})",
                u.name,
                eps.join(", "),
                humantime::format_duration(u.connect_timeout),
                humantime::format_duration(u.pool.idle_timeout)
            );
            if !u.groups.is_empty() {
                let total: u64 = u.groups.iter().map(|g| u64::from(g.weight)).sum();
                let groups: Vec<String> = u
                    .groups
                    .iter()
                    .map(|g| {
                        let share = u64::from(g.weight) as f64 * 100.0 / total.max(1) as f64;
                        let eps: Vec<String> = g.endpoints.iter().map(|e| e.to_string()).collect();
                        format!(
                            "{} weight {} ({share:.1}%) -> {}",
                            g.name,
                            g.weight,
                            eps.join(", ")
                        )
                    })
                    .collect();
                let sticky = u
                    .sticky
                    .as_ref()
                    .map_or_else(|| "none".to_owned(), ToString::to_string);
                let _ = writeln!(
                    s,
                    "          groups: {}; sticky {sticky}",
                    groups.join("; ")
                );
            }
            // What decides how this upstream behaves in an outage.
            summarize_resilience(&mut s, &u.resilience);
        }
        for r in &self.releases {
            let g = &r.gate;
            let _ = writeln!(
                s,
                "release   {} -> {} steps {:?} every {} (gate errors <= {}%, p95 <= {}, min {} requests)",
                r.upstream,
                r.to,
                r.steps,
                humantime::format_duration(r.step_for),
                g.max_error_rate * 100.0,
                humantime::format_duration(g.max_p95),
                g.min_requests
            );
        }
        if let Some(path) = &self.releases_state {
            let _ = writeln!(s, "release   state kept in {}", path.display());
        }
        let d = &self.dependencies;
        // The memory check reads a file, so it has no timeout to show.
        let checks = [
            d.postgres
                .as_ref()
                .map(|p| ("postgres".to_owned(), &p.check, true)),
            d.redis.as_ref().map(|c| ("redis".to_owned(), c, true)),
            d.memory
                .as_ref()
                .map(|m| ("memory".to_owned(), &m.check, false)),
        ];
        let upstream_checks = self.upstreams.values().filter_map(|u| {
            let hc = u.resilience.health_check.as_ref()?;
            Some((
                format!("upstream:{} GET {}", u.name, hc.path),
                &hc.check,
                true,
            ))
        });
        for (name, c, timed) in checks.into_iter().flatten().chain(upstream_checks) {
            let timeout = if timed {
                format!(", timeout {}", humantime::format_duration(c.timeout))
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "check     {name} every {}{timeout}{}",
                humantime::format_duration(c.interval),
                if c.critical { ", critical" } else { "" }
            );
        }
        s
    }
}
