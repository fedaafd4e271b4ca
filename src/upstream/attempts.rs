//! The retry loop: each attempt picks an endpoint (another one than before when it can),
//! sends, classifies the result, feeds endpoint health, and decides whether to go again,
//! under the retry budget and, after a refused connect, the endpoint's connect wait. It
//! hands back the upstream's answer (or the last error) and what the breaker should be
//! told; streaming the answer back is the caller's (`pipeline`).

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri, header};
use tokio::time::Instant;

use crate::body::RequestBody;
use crate::error::ProxyError;
use crate::observe::http::UpstreamErrorKind;
use crate::upstream::breaker::Outcome;
use crate::upstream::forward::{self, Upstream};
use crate::upstream::forwarded::Forwarded;
use crate::upstream::pool::PooledBody;
use crate::upstream::resilience::{EndpointState, InFlight, UpstreamMetrics};
use crate::upstream::retry::{self, Failure};

/// The retry loop: each attempt picks an endpoint (another one than before when it can),
/// sends, classifies the result, feeds endpoint health, and decides whether to go again.
/// Never retries once the response was handed on; never retries what may have reached the
/// upstream unless the method is idempotent and the body was kept.
///
/// Owned by `handle`'s future and lent to `run` and `forward::send`: passed by value, the
/// request would be copied into every future on the way, and kept there.
pub(crate) struct Attempts<'a> {
    upstream: &'a Upstream,
    method: Method,
    /// The request for the next attempt: taken by the send, put back when it provably
    /// never left.
    request: Option<Request<RequestBody>>,
    /// Headers written after the request's own (see `crate::upstream::forwarded::Forwarded`), every attempt.
    forwarded: Option<Forwarded>,
    /// The request body, kept for a retry (None: not replayable).
    replay: Option<Bytes>,
    /// How a request that was sent is sent again (with `method` and `replay`).
    resend: Resend,
    timers: forward::Timers,
    /// Something else can answer if the upstream is down (a stale cache entry): a refused
    /// connect fails at once rather than waiting out `retry.connect_wait`.
    no_connect_wait: bool,
    /// The endpoint group chosen for this request (`groups:`); None: plain endpoints.
    group: Option<usize>,
}

/// How a retry after the send gets the request again: only needed when such a retry is
/// possible (see `pipeline::outgoing`).
pub(crate) enum Resend {
    No,
    /// Our own client gives back what it sent (`client::exchange`): nothing is copied.
    Kept,
    /// URI and headers copied before the first send, for a client that keeps nothing
    /// (hyper's, HTTP/2). Boxed: rarely there, and `Attempts` moves with every request.
    Copy(Box<(Uri, HeaderMap)>),
}

impl Resend {
    /// For a request to `upstream` that may be retried after it was sent.
    pub(crate) fn for_upstream(upstream: &Upstream, uri: &Uri, headers: &HeaderMap) -> Resend {
        if upstream.gives_back_sent {
            Resend::Kept
        } else {
            Resend::Copy(Box::new((uri.clone(), headers.clone())))
        }
    }
}

/// The upstream's answer, before it is streamed back.
pub(crate) struct Answer {
    pub response: Response<PooledBody>,
    /// The endpoint's in-flight slot, held until the body ends.
    pub endpoint_slot: Option<InFlight>,
    /// What the breaker is told now; None: the body's end decides (a stream may still die).
    pub verdict: Option<Outcome>,
}

/// The attempts are over without an answer to pass on.
pub(crate) struct Failed {
    pub error: ProxyError,
    /// What the breaker is told (None: the client's own body failed, nothing to learn).
    pub verdict: Option<Outcome>,
}

impl<'a> Attempts<'a> {
    // Built where the request is (in `pipeline::outgoing`): a call would copy the request
    // in and the loop out.
    #[inline(always)]
    pub(crate) fn new(
        upstream: &'a Upstream,
        request: Request<RequestBody>,
        forwarded: Option<Forwarded>,
        replay: Option<Bytes>,
        resend: Resend,
        timers: forward::Timers,
    ) -> Attempts<'a> {
        Attempts {
            upstream,
            method: request.method().clone(),
            request: Some(request),
            forwarded,
            replay,
            resend,
            timers,
            no_connect_wait: false,
            group: None,
        }
    }

    /// Sends every attempt to `group` of the upstream's groups (see `Upstream::pick_in_group`).
    pub(crate) fn in_group(&mut self, group: usize) {
        self.group = Some(group);
    }

    /// See `no_connect_wait`.
    pub(crate) fn skip_connect_wait(&mut self) {
        self.no_connect_wait = true;
    }

    /// The route's total deadline, which the response body runs under as well.
    #[inline]
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.timers.deadline
    }

    pub(crate) async fn run(&mut self) -> Result<Answer, Failed> {
        let upstream = self.upstream;
        let cfg = &upstream.resilience;
        crate::sync::lock(&upstream.state.budget).record_request(crate::clock::now());
        let mut tried: u64 = 0;
        // Endpoints whose connect failed during this request: counted once toward their
        // ejection, not once per connect of a connect wait (the errors metric counts each).
        let mut refused: u64 = 0;
        let mut wait = retry::ConnectWait::default();
        let mut attempt = 1;
        // Only an upstream with groups times its requests here (for the group's figures).
        let started = self.group.map(|_| crate::clock::now());
        // What our own client sent last (`Resend::Kept`), its body left empty. A local of
        // this future, which stays where it is, not a field of `Attempts`, which moves
        // with every request.
        let mut sent = None;
        loop {
            let picked = match self.group {
                None => upstream.pick(tried),
                Some(g) => upstream.pick_in_group(g, tried),
            };
            let idx = picked.ok_or_else(|| Failed {
                error: no_endpoints(upstream),
                verdict: None,
            })?;
            if idx < 64 {
                tried |= 1 << idx;
            }
            let endpoint = &upstream.endpoints[idx];
            if self.request.is_none() {
                self.request = self.rebuild(&mut sent);
            }
            let Some(request) = self.request.as_mut() else {
                // Nothing left to send (cannot happen: a retry is only chosen with a request).
                return Err(Failed {
                    error: no_endpoints(upstream),
                    verdict: None,
                });
            };
            request
                .headers_mut()
                .insert(header::HOST, endpoint.pool.host_header.clone());
            let slot = InFlight::try_acquire(endpoint.state.clone(), None);
            let sent_at = crate::clock::now();
            // The answer is looked at in this block, which awaits nothing once it has it: so
            // it passes through on the stack, not through this future's room (written there,
            // cold at 1,000 connections, for every request). A retry's pause comes after.
            let (failed, can_go_again) = {
                let result = forward::send(
                    &upstream.name,
                    endpoint,
                    &mut self.request,
                    self.forwarded.as_ref(),
                    &self.timers,
                    matches!(self.resend, Resend::Kept).then_some(&mut sent),
                )
                .await;
                let can_go_again = attempt < cfg.retry.attempts
                    && self.timers.deadline.is_none_or(|d| crate::clock::now() < d);
                match result {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let failed = matches!(status, 502..=504)
                            || (status == 500 && cfg.circuit_breaker.count_500);
                        // 429/503 with Retry-After: "back off", not "dead". Passed on, not retried.
                        let backoff_signal = matches!(status, 429 | 503)
                            && resp.headers().contains_key(header::RETRY_AFTER);
                        upstream
                            .state
                            .endpoint_result(&endpoint.state, !failed, cfg);
                        if failed
                            && !backoff_signal
                            && can_go_again
                            && retry::retryable(
                                &cfg.retry,
                                Failure::Status(status),
                                &self.method,
                                self.replay.is_some(),
                            )
                            && self.take_budget("status")
                        {
                            drop(resp);
                            (None, can_go_again)
                        } else {
                            if let (Some(groups), Some(t)) = (&upstream.groups, started) {
                                groups.record(idx, Some(status), t.elapsed());
                            }
                            let verdict = if backoff_signal && !cfg.circuit_breaker.count_backoff {
                                Some(Outcome::Ignored)
                            } else if failed {
                                Some(Outcome::Failure)
                            } else {
                                None
                            };
                            return Ok(Answer {
                                response: resp,
                                endpoint_slot: slot,
                                verdict,
                            });
                        }
                    }
                    Err(e) => (Some(e), can_go_again),
                }
            };
            let Some(e) = failed else {
                Box::pin(self.pause(attempt)).await;
                attempt += 1;
                continue;
            };
            let Some(failure) = e.failure else {
                // The client's own request body failed: nothing to learn or retry.
                return Err(Failed {
                    error: e.error,
                    verdict: None,
                });
            };
            if let Some(kind) = error_kind(failure) {
                upstream.errors.inc(kind);
            }
            let connect = matches!(failure, Failure::Connect | Failure::ConnectTimeout);
            let bit = if idx < 64 { 1 << idx } else { 0 };
            if !(connect && refused & bit != 0) {
                upstream.state.endpoint_result(&endpoint.state, false, cfg);
            }
            if connect {
                refused |= bit;
            }
            if e.by_deadline && self.replay.is_none() {
                // Cut short while connecting: retried, as before, only with a kept
                // body.
                self.request = None;
            }
            let replayable = self.request.is_some() || self.replay.is_some();
            if replayable
                && !self.no_connect_wait
                && retry::ConnectWait::applies(&cfg.retry, failure)
            {
                // A restart: wait for the upstream to listen again (`upstream::retry`). No
                // retry budget is spent: it keeps retries from multiplying the load
                // that reaches the upstream, and a refused connect reaches nothing.
                // The endpoint's gate paces the connects of all waiting requests.
                // Boxed, as `pause`: the timer stays out of every request's future.
                if Box::pin(self.connect_turn(&mut wait, failure, &endpoint.state, sent_at)).await {
                    self.count_retry("connect_wait");
                    continue;
                }
            } else if can_go_again
                && retry::retryable(&cfg.retry, failure, &self.method, replayable)
                && self.take_budget(failure.reason())
            {
                Box::pin(self.pause(attempt)).await;
                attempt += 1;
                continue;
            }
            if let (Some(groups), Some(t)) = (&upstream.groups, started) {
                groups.record(idx, None, t.elapsed());
            }
            return Err(Failed {
                error: e.error,
                verdict: Some(Outcome::Failure),
            });
        }
    }

    fn rebuild(&self, sent: &mut Option<Request<RequestBody>>) -> Option<Request<RequestBody>> {
        let body = self.replay.clone()?;
        let body = if body.is_empty() {
            RequestBody::Empty
        } else {
            RequestBody::Full(Some(body))
        };
        match &self.resend {
            Resend::No => None,
            Resend::Kept => {
                let mut req = sent.take()?;
                *req.body_mut() = body;
                Some(req)
            }
            Resend::Copy(template) => {
                let (uri, headers) = &**template;
                let mut req = Request::new(body);
                *req.method_mut() = self.method.clone();
                *req.uri_mut() = uri.clone();
                *req.headers_mut() = headers.clone();
                Some(req)
            }
        }
    }

    fn take_budget(&self, reason: &'static str) -> bool {
        let upstream = self.upstream;
        let ok = crate::sync::lock(&upstream.state.budget).try_retry(Instant::now());
        if ok {
            self.count_retry(reason);
        } else {
            upstream
                .state
                .metrics()
                .retry_budget_exhausted
                .get_or_create(&UpstreamMetrics::upstream(&upstream.name))
                .inc();
        }
        ok
    }

    fn count_retry(&self, reason: &'static str) {
        let mut labels = UpstreamMetrics::upstream(&self.upstream.name);
        labels.push(("reason", reason.to_string()));
        self.upstream
            .state
            .metrics()
            .retries
            .get_or_create(&labels)
            .inc();
    }

    /// Sleeps until this request, in a connect wait after a connect failure, may connect to
    /// `endpoint` again (its turn at the endpoint's gate, or the endpoint accepted a connect
    /// meanwhile, or its wait ends: one last connect); false when the wait is over. `tried_at`:
    /// when the failed connect began (a connect timeout began long before it failed).
    async fn connect_turn(
        &self,
        wait: &mut retry::ConnectWait,
        failure: Failure,
        endpoint: &EndpointState,
        tried_at: Instant,
    ) -> bool {
        let cfg = &self.upstream.resilience.retry;
        // Bounded: `next` ends the wait after `connect_wait` and after a bounded number of
        // sleeps.
        loop {
            let step = wait.next(
                cfg,
                failure,
                Instant::now(),
                self.timers.deadline,
                crate::jitter::unit(),
            );
            let retry::WaitStep::Again { after, last } = step else {
                let now = Instant::now();
                return wait.stale(
                    endpoint.connect_gate.connected_since(tried_at),
                    now,
                    self.timers.deadline,
                );
            };
            tokio::time::sleep(after).await;
            if last
                || endpoint
                    .connect_gate
                    .turn(Instant::now(), tried_at, crate::jitter::unit())
            {
                return true;
            }
        }
    }

    async fn pause(&self, attempt: u32) {
        let mut wait = retry::backoff(&self.upstream.resilience.retry, attempt);
        if let Some(d) = self.timers.deadline {
            wait = wait.min(d.saturating_duration_since(Instant::now()));
        }
        tokio::time::sleep(wait).await;
    }
}

pub(crate) fn error_kind(f: Failure) -> Option<UpstreamErrorKind> {
    match f {
        Failure::Connect | Failure::Tls => Some(UpstreamErrorKind::ConnectError),
        Failure::ConnectTimeout => Some(UpstreamErrorKind::ConnectTimeout),
        Failure::FirstByteTimeout => Some(UpstreamErrorKind::FirstByteTimeout),
        Failure::Reset => Some(UpstreamErrorKind::Reset),
        Failure::Status(_) => None,
    }
}

pub(crate) fn no_endpoints(upstream: &Upstream) -> ProxyError {
    ProxyError::UpstreamUnavailable {
        upstream: upstream.name.clone(),
        detail: "no endpoints".into(),
    }
}

#[cfg(test)]
mod tests {
    //! The loop against scripted upstreams on real sockets: what it retries, what it does
    //! not, and what it tells the breaker.

    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::admission::ratelimit;
    use crate::observe::http::HttpMetrics;
    use crate::route::Snapshot;
    use crate::upstream::resilience::{UpstreamMetrics, UpstreamStates};

    /// Answers each request on 127.0.0.1 with the next of `answers` (the last one repeats);
    /// counts the requests it read.
    async fn scripted(answers: &'static [&'static str]) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let i = seen.fetch_add(1, Ordering::SeqCst);
                            let a = answers[i.min(answers.len() - 1)];
                            if s.write_all(a.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (format!("http://{addr}"), count)
    }

    /// A port nothing listens on (bound, then closed).
    async fn refused() -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        format!("http://{addr}")
    }

    fn upstream(endpoints: &[String], resilience: &str) -> (Arc<Upstream>, Arc<UpstreamStates>) {
        let list = endpoints
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let yaml = format!(
            "listeners:\n  - name: l\n    listen: \"127.0.0.1:0\"\n    routes:\n      - upstream: u\n\
             upstreams:\n  u:\n    endpoints: [{list}]\n{resilience}"
        );
        let cfg = crate::config::parse_str(&yaml, "t.yaml", &|_| None).unwrap();
        let mut reg = prometheus_client::registry::Registry::default();
        let states = Arc::new(UpstreamStates::new(UpstreamMetrics::register(&mut reg)));
        let limiters = ratelimit::Registry::new(ratelimit::Metrics::register(&mut reg));
        let http = HttpMetrics::register(&mut reg);
        let caches = crate::cache::Registry::new(crate::cache::CacheMetrics::register(&mut reg));
        let snapshot = Snapshot::build(&cfg, &states, &limiters, &caches, &http).unwrap();
        (snapshot.upstreams["u"].clone(), states)
    }

    fn request(method: Method) -> Request<RequestBody> {
        let mut r = Request::new(RequestBody::Empty);
        *r.method_mut() = method;
        *r.uri_mut() = Uri::from_static("/x");
        r
    }

    fn attempts<'a>(u: &'a Upstream, method: Method) -> Attempts<'a> {
        let req = request(method.clone());
        let resend = Resend::for_upstream(u, req.uri(), req.headers());
        Attempts::new(
            u,
            req,
            None,
            Some(Bytes::new()),
            resend,
            forward::Timers {
                connect: Duration::from_secs(1),
                first_byte: Duration::from_secs(2),
                deadline: None,
            },
        )
    }

    fn retries(states: &UpstreamStates, reason: &str) -> u64 {
        let mut labels = UpstreamMetrics::upstream("u");
        labels.push(("reason", reason.to_string()));
        states.metrics.retries.get_or_create(&labels).get()
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    const BUSY: &str = "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
    const BAD_GATEWAY: &str = "HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n";
    const BACK_OFF: &str =
        "HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n";
    const RETRY_503: &str = "    retry:\n      attempts: 3\n      backoff: { base: 1ms, max: 2ms }\n      on: [connect_error, 503]\n";

    #[tokio::test]
    async fn an_idempotent_request_is_retried_past_a_listed_status() {
        let (url, seen) = scripted(&[BUSY, OK]).await;
        let (u, states) = upstream(&[url], RETRY_503);
        let answer = match attempts(&u, Method::GET).run().await {
            Ok(a) => a,
            Err(f) => panic!("no answer: {}", f.error),
        };
        assert_eq!(answer.response.status(), 200);
        assert_eq!(
            answer.verdict, None,
            "a 200 leaves the verdict to the body's end"
        );
        assert_eq!(seen.load(Ordering::SeqCst), 2);
        assert_eq!(retries(&states, "status"), 1);
    }

    #[tokio::test]
    async fn a_post_that_reached_the_upstream_is_not_retried() {
        let (url, seen) = scripted(&[BUSY, OK]).await;
        let (u, _) = upstream(&[url], RETRY_503);
        let answer = match attempts(&u, Method::POST).run().await {
            Ok(a) => a,
            Err(f) => panic!("no answer: {}", f.error),
        };
        assert_eq!(answer.response.status(), 503, "passed on as it came");
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_refused_connect_is_retried_on_another_endpoint_even_for_a_post() {
        let (url, seen) = scripted(&[OK]).await;
        let dead = refused().await;
        let (u, states) = upstream(
            &[dead, url],
            "    load_balancing: round_robin\n    retry:\n      attempts: 2\n      connect_wait: off\n      backoff: { base: 1ms, max: 2ms }\n",
        );
        // Round robin may start on either endpoint: two requests, one of them meets the
        // dead endpoint first.
        for _ in 0..2 {
            let answer = match attempts(&u, Method::POST).run().await {
                Ok(a) => a,
                Err(f) => panic!("no answer: {}", f.error),
            };
            assert_eq!(answer.response.status(), 200);
        }
        assert_eq!(seen.load(Ordering::SeqCst), 2);
        // Each request met the dead endpoint at most once (never twice: it tries another).
        let r = retries(&states, "connect_error");
        assert!((1..=2).contains(&r), "{r} retries");
    }

    #[tokio::test]
    async fn a_back_off_answer_is_passed_on_and_the_breaker_ignores_it() {
        let (url, seen) = scripted(&[BACK_OFF, OK]).await;
        let (u, _) = upstream(&[url], RETRY_503);
        let answer = match attempts(&u, Method::GET).run().await {
            Ok(a) => a,
            Err(f) => panic!("no answer: {}", f.error),
        };
        assert_eq!(answer.response.status(), 503);
        assert_eq!(answer.verdict, Some(Outcome::Ignored));
        assert_eq!(seen.load(Ordering::SeqCst), 1, "never retried");
    }

    #[tokio::test]
    async fn the_last_failure_is_a_breaker_failure() {
        let (url, seen) = scripted(&[BAD_GATEWAY]).await;
        let (u, _) = upstream(&[url], RETRY_503);
        let answer = match attempts(&u, Method::GET).run().await {
            Ok(a) => a,
            Err(f) => panic!("no answer: {}", f.error),
        };
        assert_eq!(
            answer.response.status(),
            502,
            "502 is not listed: passed on"
        );
        assert_eq!(answer.verdict, Some(Outcome::Failure));
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn every_endpoint_refusing_ends_in_an_error_the_breaker_counts() {
        let dead = refused().await;
        let (u, _) = upstream(
            &[dead],
            "    retry:\n      attempts: 3\n      connect_wait: off\n      backoff: { base: 1ms, max: 2ms }\n",
        );
        let failed = match attempts(&u, Method::GET).run().await {
            Ok(a) => panic!("an answer from nowhere: {}", a.response.status()),
            Err(f) => f,
        };
        assert_eq!(failed.verdict, Some(Outcome::Failure));
        assert!(
            matches!(failed.error, ProxyError::UpstreamUnavailable { .. }),
            "{}",
            failed.error
        );
    }

    #[tokio::test]
    async fn an_empty_retry_budget_stops_the_retries() {
        let (url, seen) = scripted(&[BUSY, OK]).await;
        let (u, states) = upstream(
            &[url],
            "    retry:\n      attempts: 3\n      backoff: { base: 1ms, max: 2ms }\n      on: [503]\n      budget: { ratio: 0, min_per_s: 0 }\n",
        );
        let answer = match attempts(&u, Method::GET).run().await {
            Ok(a) => a,
            Err(f) => panic!("no answer: {}", f.error),
        };
        assert_eq!(answer.response.status(), 503);
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        let exhausted = states
            .metrics
            .retry_budget_exhausted
            .get_or_create(&UpstreamMetrics::upstream("u"))
            .get();
        assert_eq!(exhausted, 1);
    }
}
