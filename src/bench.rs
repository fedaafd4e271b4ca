//! Entry points of the Criterion micro-benchmarks (`benches/`): thin handles on the
//! per-request hot paths (routing, the rate-limit step, the breaker, the event-stream
//! scanner and token meter), built by the config loader and `Snapshot::build` from a YAML
//! text, as a reload builds them, so a bench measures the code a request runs and nothing
//! written for the bench. `tests/it/benches_smoke.rs` calls every handle once on the same
//! fixtures, so `cargo test` keeps them compiling and their answers right.
//! Not an API: hidden from the docs, and nothing else calls it.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Request};
use tokio::time::Instant;

use crate::admission::ratelimit::{self, Limits, memory};
use crate::observe::http::HttpMetrics;
use crate::route::{self, ListenerRoutes, Route, Snapshot};
use crate::stream::sse::Scanner;
use crate::stream::usage::StreamUsage;
use crate::upstream::breaker::{self, Breaker, Outcome};
use crate::upstream::resilience::{BreakerTicket, UpstreamMetrics, UpstreamStates};

/// The benches' configuration. Listeners (none is bound):
/// - `limits`: routes `ip` (a policy by client address), `user` (by `x-user-id`), `chat`
///   (the users' chat route: by address, by user, and a `max_streams` per user), `tokens`
///   (a `cost: tokens` policy), `tight` (3 points an hour, for the smoke test); the busy
///   policies have points enough never to refuse during a bench;
/// - `breakers`: routes `closed` (default breaker), `rated` (with `failure_rate`), `open`
///   (its breaker opens on the first failure and stays open an hour);
/// - `r5`, `r50`: 5 and 50 routes on path prefixes `/api/v1/svcK`;
/// - `h5`, `h50`: 5 and 50 routes on an exact host `svcK.example.com` (GET and POST only)
///   and the prefix `/api`.
pub fn config() -> String {
    let mut yaml = String::from(
        r#"
admin: { listen: "127.0.0.1:0" }
logging: { level: warn, access_log: false }
trusted_proxies: ["10.0.0.0/8"]
rate_limits:
  per_ip: { points: 1000000000000000, per: 1h, store: memory }
  per_user: { points: 1000000000000000, per: 1h, key: "header:x-user-id", store: memory }
  user_streams: { max_streams: 1000000, key: "header:x-user-id", store: memory }
  user_tokens: { points: 1000000000000000, per: 1h, cost: tokens, key: "header:x-user-id", store: memory }
  tight: { points: 3, per: 1h, block_for: 1h, store: memory }
upstreams:
  backend: { endpoints: ["http://127.0.0.1:9"] }
  rated:
    endpoints: ["http://127.0.0.1:9"]
    circuit_breaker: { failure_rate: { threshold: 90%, window: 30s, min_calls: 20 } }
  down:
    endpoints: ["http://127.0.0.1:9"]
    circuit_breaker: { failures: 1, open_for: 1h }
listeners:
  - name: limits
    listen: "127.0.0.1:0"
    routes:
      - { name: ip, match: { path_prefix: /ip }, upstream: backend, rate_limits: [per_ip] }
      - { name: user, match: { path_prefix: /user }, upstream: backend, rate_limits: [per_user] }
      - name: chat
        match: { path_prefix: /chat }
        upstream: backend
        rate_limits: [per_ip, per_user, user_streams]
      - { name: tokens, match: { path_prefix: /llm }, upstream: backend, rate_limits: [user_tokens] }
      - { name: tight, match: { path_prefix: /tight }, upstream: backend, rate_limits: [tight] }
  - name: breakers
    listen: "127.0.0.1:0"
    routes:
      - { name: closed, match: { path_prefix: /closed }, upstream: backend }
      - { name: rated, match: { path_prefix: /rated }, upstream: rated }
      - { name: open, match: { path_prefix: /open }, upstream: down }
"#,
    );
    for n in [5, 50] {
        let _ = write!(
            yaml,
            "  - name: r{n}\n    listen: \"127.0.0.1:0\"\n    routes:\n"
        );
        for k in 0..n {
            let _ = writeln!(
                yaml,
                "      - {{ name: r{n}-{k}, match: {{ path_prefix: /api/v1/svc{k} }}, upstream: backend }}"
            );
        }
        let _ = write!(
            yaml,
            "  - name: h{n}\n    listen: \"127.0.0.1:0\"\n    routes:\n"
        );
        for k in 0..n {
            let _ = writeln!(
                yaml,
                "      - name: h{n}-{k}\n        match: {{ host: svc{k}.example.com, methods: [GET, POST], path_prefix: /api }}\n        upstream: backend"
            );
        }
    }
    yaml
}

/// Everything one configuration builds for the request path, as the proxy holds it.
pub struct Proxy {
    snapshot: Snapshot,
    /// Breakers are kept by name here (the routes hold them).
    _states: Arc<UpstreamStates>,
    /// Rate-limit counts are kept by policy name here (the routes' policies hold them).
    _limiters: ratelimit::Registry,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").finish_non_exhaustive()
    }
}

impl Proxy {
    /// Loads `yaml` (no `${VAR}` is set) and builds its snapshot.
    pub fn from_yaml(yaml: &str) -> Result<Proxy, String> {
        let cfg =
            crate::config::parse_str(yaml, "bench.yaml", &|_| None).map_err(|e| e.to_string())?;
        let mut reg = prometheus_client::registry::Registry::default();
        let states = Arc::new(UpstreamStates::new(UpstreamMetrics::register(&mut reg)));
        let limiters = ratelimit::Registry::new(ratelimit::Metrics::register(&mut reg));
        let http = HttpMetrics::register(&mut reg);
        let caches = crate::cache::Registry::new(crate::cache::CacheMetrics::register(&mut reg));
        let snapshot = Snapshot::build(&cfg, &states, &limiters, &caches, &http)?;
        Ok(Proxy {
            snapshot,
            _states: states,
            _limiters: limiters,
        })
    }

    /// The routes of listener `name`.
    pub fn router(&self, name: &str) -> Option<Router<'_>> {
        self.snapshot.listeners.get(name).map(Router)
    }

    /// Route `route` of listener `listener`.
    pub fn route(&self, listener: &str, route: &str) -> Option<RouteRef<'_>> {
        let routes = &self.snapshot.listeners.get(listener)?.routes;
        let route = routes.iter().find(|r| &*r.name == route)?;
        Some(RouteRef {
            route,
            trusted: &self.snapshot.trusted_proxies,
        })
    }

    /// The client address the proxy believes (`trusted_proxies`, `X-Forwarded-For`).
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        route::client_ip::client_ip(peer, headers, &self.snapshot.trusted_proxies)
    }
}

/// One listener's routing table.
pub struct Router<'a>(&'a ListenerRoutes);

impl std::fmt::Debug for Router<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("routes", &self.0.routes.len())
            .finish()
    }
}

impl Router<'_> {
    /// The name of the route `req` goes to, as the pipeline picks it (the path in the
    /// listener's normal form, then the first route that matches); None: 404 (or a path
    /// refused by normalisation).
    pub fn route<B>(&self, req: &Request<B>) -> Option<&str> {
        let path = route::match_path(req.uri().path(), &self.0.path).ok()?;
        route::find(&self.0.routes, req, &path).map(|r| &*r.name)
    }
}

/// One route, for its rate-limit step and its breaker.
pub struct RouteRef<'a> {
    route: &'a Route,
    trusted: &'a [crate::config::Cidr],
}

impl std::fmt::Debug for RouteRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteRef")
            .field("route", &self.route.name)
            .finish_non_exhaustive()
    }
}

/// What the rate-limit step said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub allowed: bool,
    /// RateLimit and X-RateLimit-* fields given to the response.
    pub headers: usize,
    /// `memory`, `fail_open`...
    pub source: Option<&'static str>,
}

/// The breaker's answer to a request that it let through, to report how it went.
pub struct Ticket(BreakerTicket);

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("probe", &self.0.is_probe())
            .finish()
    }
}

impl Ticket {
    pub fn succeeded(mut self) {
        self.0.report(Outcome::Success);
    }

    pub fn failed(mut self) {
        self.0.report(Outcome::Failure);
    }
}

impl RouteRef<'_> {
    /// The route's rate-limit step (`ratelimit::check`, every policy of the route) for a
    /// request with `headers` from `peer`, the client address found as the pipeline does.
    /// Memory stores decide without waiting: None if the step would have waited (Redis).
    /// Stream permits taken are given back at once.
    pub fn rate_limit(&self, headers: &HeaderMap, peer: IpAddr) -> Option<Limited> {
        let route = self.route;
        // As the pipeline asks it (`ratelimit::check_now`), the fields written into a
        // response's map as the pipeline writes them.
        let verdict = ratelimit::check_now(&route.rate_limits, &route.name, headers, || {
            route::client_ip::client_ip(peer, headers, self.trusted)
        })?;
        let headers = verdict.headers.map_or(0, |h| {
            let mut response = HeaderMap::with_capacity(8);
            h.write_to(&mut response);
            response.len()
        });
        Some(Limited {
            allowed: verdict.retry_after_secs.is_none(),
            headers,
            source: verdict.source,
        })
    }

    /// The breaker's admission as the pipeline asks it (`RouteBreaker::admit`, a ticket
    /// holding the breaker): Err(retry after) when it fails the request fast.
    pub fn admit(&self) -> Result<Ticket, Duration> {
        let b = &self.route.breaker;
        match b.admit() {
            breaker::Admit::Allowed { probe } => Ok(Ticket(BreakerTicket::new(b.clone(), probe))),
            breaker::Admit::Rejected { retry_after } => Err(retry_after),
        }
    }

    /// A breaker state machine with this route's settings, alone: no lock, no clock, no
    /// metrics.
    pub fn breaker_machine(&self, now: Instant) -> BreakerMachine {
        BreakerMachine(Breaker::new(
            self.route.upstream.resilience.circuit_breaker.clone(),
            now,
        ))
    }
}

/// `Breaker`, the state machine under `RouteBreaker`.
#[derive(Debug)]
pub struct BreakerMachine(Breaker);

impl BreakerMachine {
    /// Whether a request at `now` goes ahead (and, if so, whether it is a half-open probe).
    pub fn admit(&mut self, now: Instant) -> Option<Option<u64>> {
        match self.0.admit(now).0 {
            breaker::Admit::Allowed { probe } => Some(probe),
            breaker::Admit::Rejected { .. } => None,
        }
    }

    /// Reports how an admitted request went; true when that changed the state.
    pub fn report(&mut self, now: Instant, ok: bool, probe: Option<u64>) -> bool {
        let outcome = if ok {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        self.0.on_result(now, outcome, probe).is_some()
    }
}

/// The memory store of a rate-limit policy (`ratelimit::memory::Table`), alone: the
/// decision for one key, without the key, the headers or the metrics.
#[derive(Debug)]
pub struct MemoryTable {
    table: memory::Table,
    limits: Limits,
}

impl MemoryTable {
    /// A table of `max_keys` keys (a policy has 100,000) allowing `points` per `window`.
    pub fn new(max_keys: usize, points: u64, window: Duration, block: Option<Duration>) -> Self {
        MemoryTable {
            table: memory::Table::new(max_keys),
            limits: Limits {
                points,
                window,
                block,
            },
        }
    }

    /// A request counted (`cost: requests`): Some(allowed), None when the table is full.
    pub fn check(&self, key: &str, now: Instant) -> Option<bool> {
        self.table.check(key, now, &self.limits).map(|d| d.allowed)
    }

    /// Whether points are left, nothing counted (`cost: tokens`).
    pub fn peek(&self, key: &str, now: Instant) -> Option<bool> {
        self.table.peek(key, now, &self.limits).map(|d| d.allowed)
    }

    /// Keys tracked.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

/// What the scanner found in the bytes fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Events {
    pub events: usize,
    pub errors: usize,
    pub comments: usize,
    /// The last offset between events in the chunk.
    pub boundary: Option<usize>,
}

/// The event-stream guard's reading of a stream (`stream::events`): the scanner, and the
/// token meter fed by it when the route counts tokens (`tokens: streams`, the default).
#[derive(Debug)]
pub struct Sse {
    scanner: Scanner,
    usage: Option<StreamUsage>,
}

impl Sse {
    /// Counting events named `error` as in-band errors (the default `error_events`).
    pub fn new(count_tokens: bool) -> Sse {
        Sse {
            scanner: Scanner::default(),
            usage: count_tokens.then(StreamUsage::new),
        }
    }

    /// Reads the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) -> Events {
        let scan = match &mut self.usage {
            Some(usage) => self.scanner.feed_with(chunk, usage),
            None => self.scanner.feed(chunk),
        };
        Events {
            events: scan.events,
            errors: scan.errors,
            comments: scan.comments,
            boundary: scan.boundary,
        }
    }

    /// Prompt and completion tokens of the events dispatched so far.
    pub fn tokens(&self) -> Option<(u64, u64)> {
        let u = self.usage.as_ref()?.usage()?;
        Some((u.prompt, u.completion))
    }
}

/// An OpenAI chat completion streamed: `chunks` content events (about 200 bytes each, as
/// gpt-4o sends them), the usage event (12 prompt tokens, `chunks` completion tokens) and
/// `data: [DONE]`.
pub fn openai_stream(chunks: usize) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..chunks {
        let _ = write!(
            out,
            "data: {{\"id\":\"chatcmpl-AbC123\",\"object\":\"chat.completion.chunk\",\"created\":1733480000,\
             \"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_1\",\"choices\":[{{\"index\":0,\
             \"delta\":{{\"content\":\" word{i}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
        );
    }
    let _ = write!(
        out,
        "data: {{\"id\":\"chatcmpl-AbC123\",\"object\":\"chat.completion.chunk\",\"created\":1733480000,\
         \"model\":\"gpt-4o-2024-08-06\",\"choices\":[],\"usage\":{{\"prompt_tokens\":12,\
         \"completion_tokens\":{chunks},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n",
        chunks + 12
    );
    out.into_bytes()
}

/// One large event: FastGPT's `flowResponses`, the JSON array of `nodes` node responses,
/// each with a history preview of about 1 KiB of text (a JSON string with escapes) and
/// 10 input and 20 output tokens.
pub fn flow_event(nodes: usize) -> Vec<u8> {
    let text = "Ein Satz mit \\\"Zitat\\\" und \\n Zeilenumbruch, noch einer. ".repeat(16);
    let mut out = String::from("event: flowResponses\ndata: [");
    for i in 0..nodes {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"id\":\"node{i}\",\"nodeId\":\"n{i}\",\"moduleName\":\"AI Chat\",\"moduleType\":\"chatNode\",\
             \"runningTime\":1.25,\"model\":\"gpt-4o\",\"inputTokens\":10,\"outputTokens\":20,\
             \"historyPreview\":[{{\"obj\":\"Human\",\"value\":\"{text}\"}},{{\"obj\":\"AI\",\"value\":\"{text}\"}}]}}"
        );
    }
    out.push_str("]\n\n");
    out.into_bytes()
}

/// `stream` cut after each blank line: one chunk per event, as an upstream that flushes
/// each event sends them.
pub fn split_events(stream: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = stream;
    while let Some(end) = rest.windows(2).position(|w| w == b"\n\n") {
        let (event, tail) = rest.split_at(end + 2);
        out.push(event);
        rest = tail;
    }
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}
