//! The request path: a `Snapshot` built from one config, and the pipeline that walks a
//! request through it.

pub mod access_log;
pub mod body;
pub mod forward;
pub mod headers;
pub mod pipeline;
pub mod route;
mod upgrade;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::{Cidr, Config};
use crate::ratelimit;
use forward::{Upstream, UpstreamClient};
use route::Route;

/// Everything the request path reads from one configuration, immutable. A reload builds a
/// new one and swaps it in; requests in flight finish on the one they started with.
pub struct Snapshot {
    pub listeners: HashMap<String, Vec<Route>>,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    pub trusted_proxies: Vec<Cidr>,
    pub access_log: bool,
}

impl Snapshot {
    /// Fails only on TLS material that cannot be loaded (a CA file named in the config) or
    /// a Redis client that cannot be made. Rate-limit policies come from `limiters`, which
    /// keeps their counts across snapshots.
    pub fn build(cfg: &Config, limiters: &ratelimit::Registry) -> Result<Snapshot, String> {
        let policies = limiters.update(cfg)?;
        // TLS settings per distinct CA file: loading the system store is not free.
        let mut tls_by_ca = HashMap::new();
        for u in cfg.upstreams.values() {
            if !tls_by_ca.contains_key(&u.tls_ca_file) {
                let tls = forward::tls_config(u.tls_ca_file.as_deref())?;
                tls_by_ca.insert(u.tls_ca_file.clone(), tls);
            }
        }
        let upstreams: HashMap<String, Arc<Upstream>> = cfg
            .upstreams
            .iter()
            .map(|(name, u)| (name.clone(), Arc::new(Upstream::new(u))))
            .collect();
        // One pool per (upstream, connect timeout), shared by the routes that agree on both.
        let mut clients: HashMap<(String, Duration), UpstreamClient> = HashMap::new();
        let mut listeners = HashMap::new();
        for l in &cfg.listeners {
            let mut routes = Vec::with_capacity(l.routes.len());
            for r in &l.routes {
                let (Some(ucfg), Some(upstream)) =
                    (cfg.upstreams.get(&r.upstream), upstreams.get(&r.upstream))
                else {
                    // Validation guarantees the name exists; skip rather than panic.
                    continue;
                };
                let Some(tls) = tls_by_ca.get(&ucfg.tls_ca_file) else {
                    continue;
                };
                let client = clients
                    .entry((r.upstream.clone(), r.timeouts.connect))
                    .or_insert_with(|| forward::build_client(ucfg, r.timeouts.connect, tls.clone()))
                    .clone();
                let rate_limits = r
                    .rate_limits
                    .iter()
                    .filter_map(|name| policies.get(name).cloned())
                    .collect();
                routes.push(Route::new(r, upstream.clone(), client, rate_limits));
            }
            listeners.insert(l.name.clone(), routes);
        }
        Ok(Snapshot {
            listeners,
            upstreams,
            trusted_proxies: cfg.trusted_proxies.clone(),
            access_log: cfg.logging.access_log,
        })
    }
}

/// State shared by every listener and the admin endpoints.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    /// Frozen after start-up; `/metrics` encodes it.
    pub registry: Arc<prometheus_client::registry::Registry>,
    /// Set when shutdown starts: new requests get 503 SERVICE_UNAVAILABLE.
    pub draining: AtomicBool,
    /// Rate-limit state by policy name; `Snapshot::build` takes the policies from here.
    pub limiters: ratelimit::Registry,
}

impl Shared {
    pub fn new(
        snapshot: Snapshot,
        registry: prometheus_client::registry::Registry,
        limiters: ratelimit::Registry,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            registry: Arc::new(registry),
            draining: AtomicBool::new(false),
            limiters,
        })
    }
}

/// What a connection's service needs: which listener it belongs to, and the shared state.
pub struct ListenerCtx {
    pub name: Arc<str>,
    pub shared: Arc<Shared>,
    /// "http" or "https", for X-Forwarded-Proto.
    pub proto: &'static str,
}
