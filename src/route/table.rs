//! The routing table: everything the request path reads from one configuration, built
//! whole by a reload and swapped in (`ArcSwap`), so requests in flight finish on the one
//! they started with.

use std::collections::HashMap;
use std::sync::Arc;

use crate::admission::ratelimit;
use crate::config::{Cidr, Config};
use crate::observe::http::{HttpMetrics, RouteMetrics};
use crate::route::Route;
use crate::upstream::forward::{self, Upstream};
use crate::upstream::resilience::UpstreamStates;

/// Everything the request path reads from one configuration, immutable. A reload builds a
/// new one and swaps it in; requests in flight finish on the one they started with.
#[derive(Debug)]
pub struct Snapshot {
    pub listeners: HashMap<String, ListenerRoutes>,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    pub trusted_proxies: Vec<Cidr>,
    pub access_log: bool,
    /// The configuration this snapshot was built from (`/admin/config`).
    pub config: Arc<Config>,
}

impl Snapshot {
    /// Fails only on TLS material that cannot be loaded (a CA file named in the config) or
    /// a Redis client that cannot be made. State that must outlive a snapshot comes from
    /// `states` (breakers, budgets, endpoint health) and `limiters` (rate-limit counts), so
    /// names that existed in the previous snapshot keep theirs.
    pub fn build(
        cfg: &Config,
        states: &UpstreamStates,
        limiters: &ratelimit::Registry,
        caches: &Arc<crate::cache::Registry>,
        metrics: &HttpMetrics,
    ) -> Result<Snapshot, String> {
        let policies = limiters.update(cfg)?;
        let caches = caches.update(cfg, limiters.redis_client());
        // TLS settings per distinct `tls:`: loading the system store is not free.
        let mut tls_by_settings = HashMap::new();
        let mut upstreams = HashMap::new();
        for (name, u) in &cfg.upstreams {
            forward::warn_insecure(u);
            if !tls_by_settings.contains_key(&u.tls) {
                let tls = forward::upstream_tls(&u.tls)?;
                tls_by_settings.insert(u.tls.clone(), tls);
            }
            let Some(tls) = tls_by_settings.get(&u.tls) else {
                continue;
            };
            let errors = metrics.upstream_errors(name);
            upstreams.insert(
                name.clone(),
                Arc::new(Upstream::new(u, tls, states, errors)?),
            );
        }
        let mut listeners = HashMap::new();
        for l in &cfg.listeners {
            let routes = l
                .routes
                .iter()
                // Validation guarantees the upstream and policy names exist.
                .filter_map(|r| {
                    let rate_limits = r
                        .rate_limits
                        .iter()
                        .filter_map(|name| policies.get(name).cloned())
                        .collect();
                    let upstream = upstreams.get(&r.upstream)?.clone();
                    let m =
                        metrics.route(&l.name, &r.name, &r.upstream, Some(upstream.errors.clone()));
                    let mut route = Route::new(r, upstream, rate_limits, m);
                    route.cache = r.cache.as_ref().and_then(|c| caches.get(c).cloned());
                    Some(route)
                })
                .collect();
            listeners.insert(
                l.name.clone(),
                ListenerRoutes {
                    routes,
                    path: l.path,
                    max_in_flight: l.max_in_flight,
                    unrouted: metrics.route(&l.name, "", "", None),
                },
            );
        }
        Ok(Snapshot {
            listeners,
            upstreams,
            trusted_proxies: cfg.trusted_proxies.clone(),
            access_log: cfg.logging.access_log,
            config: Arc::new(cfg.clone()),
        })
    }
}

#[derive(Debug)]
pub struct ListenerRoutes {
    pub routes: Vec<Route>,
    /// How request paths are read before matching (`normalize_path` and friends).
    pub path: crate::config::PathConfig,
    pub max_in_flight: Option<usize>,
    /// For the requests no route takes (404, shed, refused framing).
    pub unrouted: Arc<RouteMetrics>,
}

impl Snapshot {
    /// Every route's metric handles (and each listener's unrouted ones), for the sampler.
    pub fn route_metrics(&self) -> impl Iterator<Item = &Arc<RouteMetrics>> {
        self.listeners.values().flat_map(|l| {
            l.routes
                .iter()
                .map(|r| &r.metrics)
                .chain(std::iter::once(&l.unrouted))
        })
    }
}
