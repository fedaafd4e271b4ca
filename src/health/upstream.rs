//! Active checks of an upstream's endpoints: `GET <path>` on each endpoint on its own
//! (jittered) interval; a 2xx within the timeout is a success. Each endpoint has its own
//! counter (`unhealthy_after` failures in a row take it out, `healthy_after` successes bring
//! it back), and its verdict is written on the endpoint's state, which `Upstream::pick`
//! reads: an endpoint that fails its checks is skipped like an ejected one.
//!
//! Passes also feed health-informed recovery (Envoy's
//! `successful_active_health_check_uneject_host`): `healthy_after` in a row end the
//! endpoint's ejection and turn the upstream's open breakers HALF_OPEN. While a breaker or
//! ejection is open the check runs at `unhealthy_interval`, and one opening wakes it; a
//! refused connect then, and each pass short of `healthy_after` in a row, is followed by
//! the next probe after `fast_interval` (HAProxy's `fastinter`), so traffic returns about
//! half a second after the upstream listens again.
//!
//! Probes use their own connections (a private copy of the upstream's endpoints), so they
//! never take a pooled connection from traffic nor leave one in a state traffic would see.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{HeaderValue, Method, Request, Uri, header};
use http_body_util::BodyExt;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use super::counter::Transition;
use super::{Hooks, Probe, Runner, Slot, Value, View};
use crate::body::RequestBody;
use crate::config::UpstreamConfig;
use crate::upstream::forward::{self, Timers, Upstream};
use crate::upstream::resilience::UpstreamStates;
use crate::upstream::retry::Failure;

/// A health endpoint answers in a few bytes; more is read and dropped up to here, then the
/// connection is dropped rather than read on.
const MAX_BODY: usize = 64 * 1024;

/// One task for the upstream, which runs one runner per endpoint.
pub(super) fn spawn(
    states: &Arc<UpstreamStates>,
    cfg: &UpstreamConfig,
    slots: &[(String, Slot)],
    runner: impl Fn(&Slot) -> Runner,
) -> Vec<JoinHandle<()>> {
    let Some(hc) = cfg.resilience.health_check.clone() else {
        return Vec::new();
    };
    let path: Uri = match hc.path.parse() {
        Ok(p) => p,
        Err(_) => {
            fail_all(slots, format!("invalid health check path {}", hc.path));
            return Vec::new();
        }
    };
    let runners: Vec<Runner> = slots.iter().map(|(_, s)| runner(s)).collect();
    let slots = slots.to_vec();
    let states = states.clone();
    let cfg = cfg.clone();
    vec![tokio::spawn(async move {
        let upstream = match build(&cfg, &states).await {
            Ok(u) => Arc::new(u),
            Err(e) => {
                fail_all(&slots, e);
                return;
            }
        };
        let connect = cfg.connect_timeout.min(hc.check.timeout);
        let mut set = JoinSet::new();
        for (i, r) in runners.into_iter().enumerate() {
            let (u, path) = (upstream.clone(), path.clone());
            let timeout = hc.check.timeout;
            let hooks = EndpointHooks {
                attention: upstream.state.attention(),
                upstream: upstream.clone(),
                index: i,
                healthy_after: hc.check.healthy_after,
            };
            set.spawn(r.run_with(
                move || {
                    let (u, path) = (u.clone(), path.clone());
                    async move { probe(&u, i, path, connect, timeout).await }
                },
                hooks,
            ));
        }
        while set.join_next().await.is_some() {}
    })]
}

/// What one endpoint's check does besides its verdict: it steers endpoint choice, and its
/// passes end the upstream's open breakers and the endpoint's ejection early
/// (health-informed recovery, `upstream::breaker`).
struct EndpointHooks {
    upstream: Arc<Upstream>,
    index: usize,
    healthy_after: u32,
    attention: watch::Receiver<u64>,
}

impl Hooks for EndpointHooks {
    fn probed(&mut self, ok: bool, change: Option<Transition>) {
        let Some(ep) = self.upstream.endpoints.get(self.index) else {
            return;
        };
        if let Some(t) = change {
            ep.state
                .active_ok
                .store(t == Transition::Up, Ordering::Relaxed);
        }
        let state = &self.upstream.state;
        state.endpoint_check(&ep.state, ok, self.healthy_after);
        if ok {
            state.health_passed(self.healthy_after);
        } else {
            state.health_failed();
        }
    }

    fn needs_attention(&self) -> bool {
        self.upstream.state.needs_attention()
    }

    fn attention(&mut self) -> Option<&mut watch::Receiver<u64>> {
        Some(&mut self.attention)
    }
}

/// A private copy of the upstream: its own pools, the shared endpoint state.
async fn build(cfg: &UpstreamConfig, states: &UpstreamStates) -> Result<Upstream, String> {
    let https = cfg
        .endpoints
        .iter()
        .any(|e| e.scheme() == Some(&http::uri::Scheme::HTTPS));
    let tls = if https {
        let settings = cfg.tls.clone();
        // Loading the trust store reads (and parses) files: not on the runtime.
        tokio::task::spawn_blocking(move || forward::upstream_tls(&settings))
            .await
            .map_err(|e| e.to_string())??
    } else {
        // Never used by plain-http endpoints; saves the first check the store's load time.
        unused_tls()?
    };
    Upstream::new(cfg, &tls, states, Default::default())
}

fn unused_tls() -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn fail_all(slots: &[(String, Slot)], error: String) {
    for (_, s) in slots {
        s.store(Arc::new(View {
            error: Some(error.clone()),
            ..View::pending()
        }));
    }
}

async fn probe(u: &Upstream, i: usize, path: Uri, connect: Duration, timeout: Duration) -> Probe {
    let Some(ep) = u.endpoints.get(i) else {
        return Probe::failed("endpoint gone");
    };
    let mut req = Request::new(RequestBody::Empty);
    *req.method_mut() = Method::GET;
    *req.uri_mut() = path;
    let h = req.headers_mut();
    h.insert(header::HOST, ep.pool.host_header.clone());
    h.insert(
        header::USER_AGENT,
        HeaderValue::from_static(concat!("rampart-health/", env!("CARGO_PKG_VERSION"))),
    );
    let timers = Timers {
        connect,
        first_byte: timeout,
        deadline: None,
    };
    let resp = match forward::send(&u.name, ep, &mut Some(req), None, &timers, None).await {
        Ok(r) => r,
        Err(e) => {
            return Probe {
                refused: matches!(e.failure, Some(Failure::Connect)),
                ..Probe::failed(e.error.to_string())
            };
        }
    };
    let status = resp.status();
    let mut body = resp.into_body();
    let mut read = 0;
    while read <= MAX_BODY {
        match body.frame().await {
            Some(Ok(f)) => read += f.data_ref().map_or(0, |d| d.len()),
            Some(Err(e)) => return Probe::failed(format!("body cut short: {e}")),
            None => break,
        }
    }
    let details = vec![("http_status", Value::Int(i64::from(status.as_u16())))];
    if status.is_success() {
        Probe {
            ok: true,
            details,
            ..Probe::default()
        }
    } else {
        Probe {
            details,
            ..Probe::failed(format!("answered {status}"))
        }
    }
}

/// The check of `cfg` stopped: unless it is restarted, its verdicts no longer steer traffic.
pub(super) fn forget(states: &UpstreamStates, cfg: &UpstreamConfig, restarted: bool) {
    if restarted {
        return;
    }
    if let Some(state) = states.get(&cfg.name) {
        for e in &cfg.endpoints {
            state
                .endpoint(&e.to_string())
                .active_ok
                .store(true, Ordering::Relaxed);
        }
    }
}
