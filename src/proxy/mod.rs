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
use crate::reload::KeyedState;
use crate::shutdown::{Background, InFlight};
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
    /// Fails only on TLS material that cannot be loaded (a CA file named in the config).
    pub fn build(cfg: &Config) -> Result<Snapshot, String> {
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
                routes.push(Route::new(r, upstream.clone(), client));
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

/// State shared by every listener and the admin endpoints. It outlives every snapshot:
/// state kept by name (limiters, breakers, endpoint health, caches) lives here, not in the
/// `Snapshot`, so a reload keeps it for the names that still exist (see `keyed_state`).
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    /// Frozen after start-up; `/metrics` encodes it.
    pub registry: Arc<prometheus_client::registry::Registry>,
    /// Set when a drain starts: `/readyz` answers 503 (traffic is still served during the
    /// accept grace; connections told to close answer 503 themselves, see server.rs).
    pub draining: AtomicBool,
    /// Requests and SSE streams in flight, for the drain.
    pub in_flight: Arc<InFlight>,
    /// Stopped at the end of a drain, before the pools close.
    pub background: Background,
}

impl Shared {
    pub fn new(snapshot: Snapshot, registry: prometheus_client::registry::Registry) -> Arc<Shared> {
        Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            registry: Arc::new(registry),
            draining: AtomicBool::new(false),
            in_flight: Arc::new(InFlight::default()),
            background: Background::default(),
        })
    }

    /// Every registry of state kept by name. A reload calls `reconcile` on each with the new
    /// configuration before the new snapshot is swapped in. Add one entry per registry,
    /// e.g. `vec![&self.limiters, &self.breakers]`.
    pub fn keyed_state(&self) -> Vec<&dyn KeyedState> {
        Vec::new()
    }
}

/// What a connection's service needs: which listener it belongs to, and the shared state.
pub struct ListenerCtx {
    pub name: Arc<str>,
    pub shared: Arc<Shared>,
    /// "http" or "https", for X-Forwarded-Proto.
    pub proto: &'static str,
}
