//! The one Redis client of the program (`redis:` in proxy.yaml): a bb8 pool of multiplexed
//! connections, every call under one hard timeout, the master found through Sentinel when
//! so configured. Rate limits use it now; the health checks will too.
//!
//! bb8's defaults suit a database, not a per-request decision: a 30 s check-out timeout,
//! connect retries, and a validity check on every check-out (bb8-redis's is a PING). Here
//! the check-out timeout is the call timeout, a failed connect is not retried inside the
//! request, and nothing is sent but the call itself.
//!
//! The connection manager is our own rather than bb8-redis's: that one never reports a
//! connection broken (after a Redis restart its dead connections would stay in the pool
//! and fail every call) and connects to one fixed address (no Sentinel). Ours drops a
//! connection whose call failed or was cut short, and asks the sentinels for the master.
//!
//! The connections are multiplexed, so calls share one: the last connection checked out
//! stays the current one, and calls clone its handle (pipelining on it) without touching
//! the pool until it breaks or the master changes. The pool then makes the next one, under
//! the same timeout.
//!
//! Each worker thread (`workers.rs`) keeps a connection of its own instead, made on its own
//! runtime (outside the pool, with the pool's manager): a multiplexed connection is driven
//! by a task on the runtime that made it, and a call from another worker would wake that
//! thread, and be woken by it, on every decision. The same rules replace it.
//!
//! With `cluster:` a "connection" is the redis crate's cluster connection: one multiplexed
//! connection per node, also driven by a task on the runtime that made it (so per worker
//! too), which routes each call by its key's slot, follows MOVED and ASK, refreshes the slot
//! map and reconnects to a node by itself. It is made without waiting (the nodes are
//! connected in the background, within `connect_timeout`, not within one call's timeout)
//! and kept through a node's failure: dropping it would cut the calls to the healthy
//! masters too and start over from the seed nodes. It is replaced only when its task is
//! gone. A node's script cache is its own: EVALSHA answered NOSCRIPT by one master is sent
//! as EVAL to that same master (the same key, so the same slot).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, FromRedisValue};
use tokio::time::Instant;

use crate::config::{RedisConfig, RedisTarget};

mod budget;
pub(crate) use budget::Budget;

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    #[error("no connection: {0}")]
    Pool(String),
    #[error("sentinel: {0}")]
    Sentinel(String),
    #[error("unexpected reply: {0}")]
    Reply(String),
}

/// A Lua script called by its SHA1, sent whole only when Redis does not know it.
#[derive(Debug)]
pub struct Script {
    source: &'static str,
    sha: String,
}

impl Script {
    pub fn new(source: &'static str) -> Script {
        Script {
            source,
            sha: redis::Script::new(source).get_hash().to_owned(),
        }
    }
}

pub struct Redis {
    pool: bb8::Pool<Manager>,
    /// The connection calls off the worker threads share while it works.
    current: ArcSwapOption<Handle>,
    /// Each worker thread's own connection, and the lock that lets one call per worker
    /// connect while the others wait for it.
    per_worker: Box<[(ArcSwapOption<Handle>, tokio::sync::Mutex<()>)]>,
    timeout: Duration,
    target: Arc<Target>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// Connects lazily: a Redis that is down never stops rampart from starting.
    pub fn new(cfg: &RedisConfig) -> Result<Redis, RedisError> {
        // The connection timeout covers connect and handshake; replies need no timer of
        // their own: every call is already under `timeout` as a whole.
        let conn_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout))
            .set_response_timeout(None);
        let kind = match &cfg.target {
            RedisTarget::Url(url) => TargetKind::Url(redis::Client::open(url.expose().as_str())?),
            RedisTarget::Sentinel { master, addresses } => TargetKind::Sentinel {
                master: master.clone(),
                sentinels: addresses.clone(),
                current: Mutex::new(None),
            },
            RedisTarget::Cluster {
                nodes,
                username,
                password,
            } => {
                let mut builder =
                    ClusterClient::builder(nodes.iter().map(|n| format!("redis://{n}")))
                        // A MOVED, an ASK and a reconnect fit; more would outlive the call.
                        .retries(4)
                        // The call's own timeout bounds the whole call, retries included.
                        .overall_response_timeout(None);
                if let Some(user) = username {
                    builder = builder.username(user);
                }
                if let Some(password) = password {
                    builder = builder.password(password.expose());
                }
                TargetKind::Cluster {
                    client: Box::new(builder.build()?),
                    // Per attempt on one node: a frozen node is given up within the call.
                    config: ClusterConfig::new()
                        .set_connection_timeout(cfg.connect_timeout)
                        .set_response_timeout(cfg.timeout),
                }
            }
        };
        let target = Arc::new(Target {
            kind,
            generation: AtomicU64::new(0),
            conn_config,
            resolve_timeout: cfg.connect_timeout + cfg.timeout,
        });
        let pool = bb8::Pool::builder()
            .max_size(cfg.pool_max_size)
            .connection_timeout(cfg.timeout)
            .retry_connection(false)
            .test_on_check_out(false)
            .build_unchecked(Manager {
                target: target.clone(),
            });
        Ok(Redis {
            pool,
            current: ArcSwapOption::empty(),
            per_worker: (0..crate::workers::max_workers())
                .map(|_| (ArcSwapOption::empty(), tokio::sync::Mutex::new(())))
                .collect(),
            timeout: cfg.timeout,
            target,
        })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `script` with one key (EVALSHA, then EVAL on NOSCRIPT, as after a fail-over or a
    /// restart), check-out included, within the timeout.
    pub async fn eval<T: FromRedisValue>(
        &self,
        script: &Script,
        key: &str,
        args: &[u64],
    ) -> Result<T, RedisError> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&script.sha).arg(1).arg(key).arg(args);
        let whole = || {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(script.source).arg(1).arg(key).arg(args);
            cmd
        };
        self.run(&cmd, Some(&whole)).await
    }

    /// Any one command (the response cache's GET, SET, purge log), check-out included,
    /// within the timeout.
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        self.run(cmd, None).await
    }

    /// `cmd` within the timeout; on NOSCRIPT, `on_noscript`'s command on the same
    /// connection. A READONLY answer (this server was demoted) is tried once more: the retry
    /// connects to the master the sentinels name now.
    async fn run<T: FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        on_noscript: Option<&(dyn Fn() -> redis::Cmd + Sync)>,
    ) -> Result<T, RedisError> {
        let work = async {
            let mut result = Err(RedisError::Pool("no attempt".into()));
            for _ in 0..2 {
                let mut call = self.checkout().await?;
                let mut r = cmd.query_async::<T>(&mut call.conn).await;
                if let Some(whole) = on_noscript
                    && matches!(&r, Err(e) if e.code() == Some("NOSCRIPT"))
                {
                    r = whole().query_async::<T>(&mut call.conn).await;
                }
                call.finish(match &r {
                    Ok(_) => false,
                    Err(e) => self.connection_is_done(&call.conn, e),
                });
                let again = matches!(&r, Err(e) if is_readonly(e));
                result = r.map_err(RedisError::from);
                if !again {
                    break;
                }
            }
            result
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(RedisError::Timeout(self.timeout)),
        }
    }

    /// PING within the timeout; the round trip on success.
    pub async fn ping(&self) -> Result<Duration, RedisError> {
        let start = Instant::now();
        let work = async {
            let mut call = self.checkout().await?;
            let r = redis::cmd("PING")
                .query_async::<String>(&mut call.conn)
                .await;
            call.finish(match &r {
                Ok(_) => false,
                Err(e) => self.connection_is_done(&call.conn, e),
            });
            r.map_err(RedisError::from)
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r.map(|_| start.elapsed()),
            Err(_) => Err(RedisError::Timeout(self.timeout)),
        }
    }

    /// For the health check: PING, then the role from `INFO replication` ("primary" or
    /// "replica"), within `timeout` (check-out included); the round trip of the PING.
    ///
    /// A connection made before Redis restarted fails its first call (broken pipe, reset,
    /// EOF) though Redis answers again: that says nothing about Redis now. Such a failure
    /// drops the connection and the check asks again on a new one, within the same
    /// timeout, so a restart costs at most the checks that fall inside its downtime. The
    /// pool may hold a stale connection per slot, a worker one of its own: one try for
    /// each, plus a fresh one.
    pub async fn check(&self, timeout: Duration) -> Result<(Duration, String), RedisError> {
        let work = async {
            let tries = self.pool.state().connections as usize + 2;
            let mut last = RedisError::Pool("no attempt".into());
            for _ in 0..tries {
                match self.check_once().await {
                    Ok(r) => return Ok(r),
                    Err(e) => {
                        let stale = matches!(&e, RedisError::Redis(e) if is_stale(e));
                        last = e;
                        if !stale {
                            break;
                        }
                    }
                }
            }
            Err(last)
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(RedisError::Timeout(timeout)),
        }
    }

    /// One PING and INFO on one connection.
    async fn check_once(&self) -> Result<(Duration, String), RedisError> {
        let mut call = self.checkout().await?;
        let start = Instant::now();
        let r = redis::cmd("PING")
            .query_async::<String>(&mut call.conn)
            .await;
        let rtt = start.elapsed();
        let cluster = matches!(call.conn, Link::Cluster(_));
        // A cluster has no one role: its state says whether every slot is served.
        let r = match r {
            Ok(_) if cluster => {
                redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async::<String>(&mut call.conn)
                    .await
            }
            Ok(_) => {
                redis::cmd("INFO")
                    .arg("replication")
                    .query_async::<String>(&mut call.conn)
                    .await
            }
            Err(e) => Err(e),
        };
        call.finish(match &r {
            Ok(_) => false,
            Err(e) => self.connection_is_done(&call.conn, e),
        });
        let info = r?;
        if cluster {
            return match info
                .lines()
                .find_map(|l| l.trim().strip_prefix("cluster_state:"))
            {
                Some("ok") => Ok((rtt, "cluster".to_owned())),
                Some(state) => Err(RedisError::Reply(format!("cluster_state:{state}"))),
                None => Err(RedisError::Reply("no cluster_state in CLUSTER INFO".into())),
            };
        }
        let role = info
            .lines()
            .find_map(|l| l.trim().strip_prefix("role:"))
            .map(|r| match r {
                "master" => "primary".to_owned(),
                "slave" | "replica" => "replica".to_owned(),
                other => other.to_owned(),
            })
            .ok_or_else(|| RedisError::Reply("no role in INFO replication".into()))?;
        Ok((rtt, role))
    }

    /// Connections, idle ones and waiting callers (pool gauges).
    pub fn pool_state(&self) -> bb8::State {
        self.pool.state()
    }

    /// A handle on the shared connection while it works; otherwise on the next pooled one
    /// to the current master, which becomes the shared one. Pooled connections marked
    /// broken by an earlier call, or made before the master was last forgotten (a
    /// fail-over), are dropped on the way.
    async fn checkout(&self) -> Result<Call, RedisError> {
        if let Some((slot, connecting)) =
            crate::workers::worker().and_then(|i| self.per_worker.get(i))
        {
            return self.checkout_on_worker(slot, connecting).await;
        }
        if let Some(call) = self.usable_call(&self.current) {
            return Ok(call);
        }
        loop {
            let conn = self
                .pool
                .get()
                .await
                .map_err(|e| RedisError::Pool(e.to_string()))?;
            let handle = Handle::of(&conn);
            if handle.usable(&self.target) {
                let call = handle.call();
                self.current.store(Some(Arc::new(handle)));
                return Ok(call);
            }
            // Returned marked: bb8 drops it.
            conn.broken.store(true, Ordering::Relaxed);
        }
    }

    /// A call on the connection in `slot`, if it still works.
    fn usable_call(&self, slot: &ArcSwapOption<Handle>) -> Option<Call> {
        slot.load()
            .as_ref()
            .filter(|h| h.usable(&self.target))
            .map(|h| h.call())
    }

    /// A worker's own connection while it works; otherwise a new one, made here so that
    /// its driving task runs on this worker.
    async fn checkout_on_worker(
        &self,
        slot: &ArcSwapOption<Handle>,
        connecting: &tokio::sync::Mutex<()>,
    ) -> Result<Call, RedisError> {
        if let Some(call) = self.usable_call(slot) {
            return Ok(call);
        }
        // One connect per worker at a time: the calls that missed with it wait for its
        // result (all of them are under the call timeout).
        let _connecting = connecting.lock().await;
        if let Some(call) = self.usable_call(slot) {
            return Ok(call);
        }
        let handle = Handle::of(&self.pool.dedicated_connection().await?);
        let call = handle.call();
        slot.store(Some(Arc::new(handle)));
        Ok(call)
    }

    /// Whether the connection that produced `e` must be dropped. A READONLY answer means
    /// this server was demoted by a fail-over: ask the sentinels again. A cluster connection
    /// recovers from a node's failure by itself (see the top of this file): only its task
    /// being gone, which every call then reports, drops it.
    fn connection_is_done(&self, link: &Link, e: &redis::RedisError) -> bool {
        if matches!(link, Link::Cluster(_)) {
            return cluster_task_gone(e);
        }
        if is_readonly(e) {
            self.target.forget_master();
            return true;
        }
        let done = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_unrecoverable_error();
        if done {
            // Sentinels cut clients of a master they demote: ask them again.
            self.target.forget_master();
        }
        done
    }
}

/// The connection was cut under the call (the server restarted or closed it): a new
/// connection may well work. A timeout or a refusal says Redis itself is slow or down.
fn is_stale(e: &redis::RedisError) -> bool {
    (e.is_io_error() || e.is_connection_dropped()) && !e.is_timeout() && !e.is_connection_refusal()
}

/// The cluster connection's task no longer takes or answers calls (its runtime ended): the
/// crate reports that as a broken pipe of its own, named so.
fn cluster_task_gone(e: &redis::RedisError) -> bool {
    e.is_connection_dropped() && e.to_string().contains("redis_cluster: Unable to")
}

fn is_readonly(e: &redis::RedisError) -> bool {
    // Inside a script the replica's refusal may come wrapped: look at the text too.
    e.code() == Some("READONLY") || e.to_string().contains("READONLY")
}

// === impl Target ===

struct Target {
    kind: TargetKind,
    /// Bumped whenever the master is forgotten; connections of older generations are stale.
    generation: AtomicU64,
    conn_config: AsyncConnectionConfig,
    /// One sentinel's answer: connect and ask.
    resolve_timeout: Duration,
}

enum TargetKind {
    Url(redis::Client),
    Sentinel {
        master: String,
        sentinels: Vec<String>,
        /// The master last named by a sentinel; cleared after a failure.
        current: Mutex<Option<redis::Client>>,
    },
    /// Boxed: the client is far larger than the other kinds.
    Cluster {
        client: Box<ClusterClient>,
        config: ClusterConfig,
    },
}

/// One server's multiplexed connection, or a cluster's (a connection per node, each call
/// sent to the master of its key's slot). Clones share the connection.
#[derive(Clone)]
enum Link {
    Server(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Link::Server(c) => c.req_packed_command(cmd),
            Link::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Link::Server(c) => c.req_packed_commands(cmd, offset, count),
            Link::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Server(c) => c.get_db(),
            Link::Cluster(c) => c.get_db(),
        }
    }
}

impl Target {
    /// A new connection to the server (Sentinel's master included) or the cluster.
    async fn connect(&self) -> Result<Link, RedisError> {
        if let TargetKind::Cluster { client, config } = &self.kind {
            // Its task connects the nodes in the background, on this runtime.
            return Ok(Link::Cluster(
                client.get_pending_async_connection_with_config(config.clone()),
            ));
        }
        let client = self.client().await?;
        match client
            .get_multiplexed_async_connection_with_config(&self.conn_config)
            .await
        {
            Ok(conn) => Ok(Link::Server(conn)),
            Err(e) => {
                // The master may have moved (fail-over): ask the sentinels next time.
                self.forget_master();
                Err(e.into())
            }
        }
    }

    async fn client(&self) -> Result<redis::Client, RedisError> {
        match &self.kind {
            TargetKind::Cluster { .. } => Err(RedisError::Pool(
                "a cluster has no one server to connect to".into(),
            )),
            TargetKind::Url(client) => Ok(client.clone()),
            TargetKind::Sentinel {
                master,
                sentinels,
                current,
            } => {
                if let Some(c) = crate::sync::lock(current).clone() {
                    return Ok(c);
                }
                let client = self.resolve(master, sentinels).await?;
                *crate::sync::lock(current) = Some(client.clone());
                Ok(client)
            }
        }
    }

    /// Asks each sentinel in turn for the master's address.
    async fn resolve(
        &self,
        master: &str,
        sentinels: &[String],
    ) -> Result<redis::Client, RedisError> {
        let mut errors = Vec::new();
        for addr in sentinels {
            let ask = async {
                let sentinel = redis::Client::open(format!("redis://{addr}"))?;
                let mut conn = sentinel
                    .get_multiplexed_async_connection_with_config(&self.conn_config)
                    .await?;
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(master)
                    .query_async::<Option<(String, u16)>>(&mut conn)
                    .await
            };
            match tokio::time::timeout(self.resolve_timeout, ask).await {
                Ok(Ok(Some((host, port)))) => {
                    let host = if host.contains(':') {
                        format!("[{host}]")
                    } else {
                        host
                    };
                    tracing::debug!(%master, %host, port, sentinel = %addr, "redis master resolved");
                    return Ok(redis::Client::open(format!("redis://{host}:{port}"))?);
                }
                Ok(Ok(None)) => errors.push(format!("{addr}: does not know master \"{master}\"")),
                Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
                Err(_) => errors.push(format!(
                    "{addr}: no answer within {:?}",
                    self.resolve_timeout
                )),
            }
        }
        Err(RedisError::Sentinel(errors.join("; ")))
    }

    fn forget_master(&self) {
        if let TargetKind::Sentinel { current, .. } = &self.kind
            && crate::sync::lock(current).take().is_some()
        {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// === impl Manager ===

pub(crate) struct Conn {
    inner: Link,
    /// `Target::generation` when connected.
    generation: u64,
    /// Set by a call that failed on it or was cut short; bb8 then drops it.
    broken: Arc<AtomicBool>,
}

/// The shared connection: a clone of a pooled one's handle and flag.
struct Handle {
    conn: Link,
    broken: Arc<AtomicBool>,
    generation: u64,
}

impl Handle {
    fn of(conn: &Conn) -> Handle {
        Handle {
            conn: conn.inner.clone(),
            broken: conn.broken.clone(),
            generation: conn.generation,
        }
    }

    /// Not marked broken, and made since the master was last forgotten.
    fn usable(&self, target: &Target) -> bool {
        self.generation == target.generation.load(Ordering::Relaxed)
            && !self.broken.load(Ordering::Relaxed)
    }

    fn call(&self) -> Call {
        Call {
            conn: self.conn.clone(),
            broken: self.broken.clone(),
            done: false,
        }
    }
}

/// One call's handle on a shared connection.
struct Call {
    conn: Link,
    broken: Arc<AtomicBool>,
    done: bool,
}

impl Call {
    fn finish(&mut self, broken: bool) {
        self.done = true;
        if broken {
            self.broken.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // Dropped mid-call (the timeout): the late answer may still come on this
        // connection, and Redis is slow or gone; nobody should wait on it again. A
        // cluster's slow node is one of several, which the cluster connection retries or
        // reconnects by itself.
        if !self.done && matches!(self.conn, Link::Server(_)) {
            self.broken.store(true, Ordering::Relaxed);
        }
    }
}

struct Manager {
    target: Arc<Target>,
}

impl bb8::ManageConnection for Manager {
    type Connection = Conn;
    type Error = RedisError;

    async fn connect(&self) -> Result<Conn, RedisError> {
        let generation = self.target.generation.load(Ordering::Relaxed);
        Ok(Conn {
            inner: self.target.connect().await?,
            generation,
            broken: Arc::new(AtomicBool::new(false)),
        })
    }

    async fn is_valid(&self, conn: &mut Conn) -> Result<(), RedisError> {
        redis::cmd("PING")
            .query_async::<String>(&mut conn.inner)
            .await
            .map(|_| ())
            .map_err(RedisError::from)
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.broken.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// The one case a cluster connection is dropped: its task is gone (the runtime that
    /// made it ended). The crate's own error is recognised, a node refusing is not.
    #[test]
    fn a_cluster_connection_is_replaced_only_when_its_task_is_gone() {
        let client = ClusterClient::builder(["redis://127.0.0.1:1"])
            .retries(0)
            .build()
            .unwrap();
        let made_on = runtime();
        let conn = made_on.block_on(async {
            client.get_pending_async_connection_with_config(ClusterConfig::new())
        });
        let mut link = Link::Cluster(conn);

        // Nothing listens: the node is refused, the connection is kept.
        let e = made_on
            .block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(5),
                    redis::cmd("PING").query_async::<String>(&mut link),
                )
                .await
            })
            .expect("an answer, not a hang")
            .unwrap_err();
        assert!(!cluster_task_gone(&e), "{e}");

        drop(made_on);
        let e = runtime()
            .block_on(redis::cmd("PING").query_async::<String>(&mut link))
            .unwrap_err();
        assert!(cluster_task_gone(&e), "{e}");
    }
}
