//! The Postgres check: one round trip on a pooled connection reads the liveness (`SELECT
//! 1`), the server's role (`pg_is_in_recovery()`), its connection saturation (client
//! backends in `pg_stat_activity` over `max_connections`) and which server answered.
//!
//! The pool (bb8-postgres) is built unchecked, so rampart starts with Postgres down. Several
//! hosts and `target_session_attrs` in the URL are tokio-postgres's: each new connection
//! tries the hosts in order and keeps the first that qualifies, so after a switch-over the
//! next connection lands on the new primary. A pooled connection whose server went away is
//! noticed before use (it is closed) and replaced in the same probe.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bb8_postgres::PostgresConnectionManager;
use bb8_postgres::tokio_postgres::config::SslMode;
use bb8_postgres::tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use bb8_postgres::tokio_postgres::{self, Client, NoTls, SimpleQueryMessage, Socket};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsConnector;

use super::{PoolSources, Probe, Value, error_chain};
use crate::config::PostgresDependency;

const QUERY: &str = "SELECT 1, pg_is_in_recovery(), \
     (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'), \
     current_setting('max_connections')::int, \
     host(inet_server_addr()), inet_server_port()";

/// What the pool needs of its connection manager, TLS or not.
trait PgManager: bb8::ManageConnection<Connection = Client, Error = tokio_postgres::Error> {}
impl<T> PgManager for T where
    T: bb8::ManageConnection<Connection = Client, Error = tokio_postgres::Error>
{
}

/// Plain text, or TLS when the URL says `sslmode=require` (tokio-postgres only does TLS
/// through a connector it is given; `prefer` with none is plain text).
enum Pool {
    Plain(bb8::Pool<PostgresConnectionManager<NoTls>>),
    Tls(bb8::Pool<PostgresConnectionManager<MakeRustls>>),
}

pub(crate) struct PgPool {
    pool: Pool,
    /// The last connection error bb8 met in the background, for a probe that timed out.
    last_error: Arc<Mutex<Option<String>>>,
}

/// Keeps the last error of background connects (bb8 reports them nowhere else).
#[derive(Debug, Clone)]
struct LastError(Arc<Mutex<Option<String>>>);

impl bb8::ErrorSink<tokio_postgres::Error> for LastError {
    fn sink(&self, e: tokio_postgres::Error) {
        let text = error_chain(&e);
        tracing::debug!(error = %text, "postgres pool: connection failed");
        *crate::sync::lock(&self.0) = Some(text);
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<tokio_postgres::Error>> {
        Box::new(self.clone())
    }
}

impl PgPool {
    /// No connection is made here; the trust store is read (with TLS), so call it where
    /// blocking a moment is fine.
    pub(crate) fn new(dep: &PostgresDependency) -> Result<PgPool, String> {
        let url = crate::config::postgres_url_for_driver(dep.url.expose());
        let mut config = tokio_postgres::Config::from_str(&url)
            .map_err(|e| format!("invalid Postgres URL: {e}"))?;
        // tokio-postgres waits forever for a host by default; with several hosts, one that
        // does not answer must not keep the next from being tried.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(dep.pool.connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("rampart-health");
        }
        let last_error = Arc::new(Mutex::new(None));
        let sink = LastError(last_error.clone());
        let pool = if config.get_ssl_mode() == SslMode::Require {
            let tls = crate::upstream::forward::tls_config(dep.tls_ca_file.as_deref())?;
            Pool::Tls(build(
                dep,
                sink,
                PostgresConnectionManager::new(config, MakeRustls(tls)),
            ))
        } else {
            Pool::Plain(build(
                dep,
                sink,
                PostgresConnectionManager::new(config, NoTls),
            ))
        };
        Ok(PgPool { pool, last_error })
    }

    pub(crate) fn state(&self) -> bb8::State {
        match &self.pool {
            Pool::Plain(p) => p.state(),
            Pool::Tls(p) => p.state(),
        }
    }

    pub(crate) fn tls(&self) -> bool {
        matches!(self.pool, Pool::Tls(_))
    }

    /// One probe. The caller bounds it by the check's timeout.
    pub(crate) async fn probe(&self, warn_above: f64) -> Probe {
        let rows = match &self.pool {
            Pool::Plain(p) => checkout_and_query(p, &self.last_error).await,
            Pool::Tls(p) => checkout_and_query(p, &self.last_error).await,
        };
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => return Probe::failed(e),
        };
        match parse(&rows) {
            Some(stats) => {
                let mut p = judge(&stats, warn_above);
                p.details.push(("tls", Value::Bool(self.tls())));
                p
            }
            None => Probe::failed("unexpected answer to the health query"),
        }
    }

    /// Drops the pool; its connections close their sessions as they go. The connection
    /// tasks run on the runtime: give them a moment to say goodbye to the server.
    pub(crate) async fn close(self: Arc<Self>) {
        let open = self.state().connections;
        drop(self);
        if open > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn build<M: PgManager>(dep: &PostgresDependency, sink: LastError, manager: M) -> bb8::Pool<M> {
    bb8::Pool::builder()
        .max_size(dep.pool.max_size)
        .min_idle(Some(dep.pool.min_idle).filter(|n| *n > 0))
        .idle_timeout(Some(dep.pool.idle_timeout))
        .max_lifetime(Some(dep.pool.max_lifetime))
        // A check-out waits at most as long as the check may take, and a failed connect is
        // the check's failure, not something to retry inside it.
        .connection_timeout(dep.check.timeout)
        .retry_connection(false)
        // `checkout_and_query` tests connections itself, without a round trip.
        .test_on_check_out(false)
        .error_sink(Box::new(sink))
        .build_unchecked(manager)
}

async fn checkout_and_query<M: PgManager>(
    pool: &bb8::Pool<M>,
    last_error: &Mutex<Option<String>>,
) -> Result<Vec<SimpleQueryMessage>, String> {
    // Idle connections first: one whose server went away is dropped (bb8 sees it closed
    // when it comes back) and the next one tried.
    for _ in 0..=pool.state().idle_connections {
        if pool.state().idle_connections == 0 {
            break;
        }
        let conn = match pool.get().await {
            Ok(c) => c,
            Err(bb8::RunError::User(e)) => return Err(error_chain(&e)),
            Err(bb8::RunError::TimedOut) => return Err(timed_out(last_error)),
        };
        if conn.is_closed() {
            continue;
        }
        return conn.simple_query(QUERY).await.map_err(|e| error_chain(&e));
    }
    // None idle: connect here, so a refused connection is reported as such at once (a pool
    // check-out would only time out), then lend the connection to the pool.
    let client = pool.dedicated_connection().await.map_err(|e| {
        let text = error_chain(&e);
        *crate::sync::lock(last_error) = Some(text.clone());
        text
    })?;
    let rows = client
        .simple_query(QUERY)
        .await
        .map_err(|e| error_chain(&e))?;
    // Full pool: the connection just ends.
    let _ = pool.add(client);
    Ok(rows)
}

fn timed_out(last_error: &Mutex<Option<String>>) -> String {
    match crate::sync::lock(last_error).as_deref() {
        Some(e) => format!("no connection in time; last connection error: {e}"),
        None => "no connection in time".into(),
    }
}

// === TLS through rustls (tokio-postgres takes any connector) ===

/// Verifies the server's certificate and name against the system's trust store plus
/// `tls.ca_file`: stricter than libpq's `require`, which verifies nothing.
#[derive(Clone)]
pub(crate) struct MakeRustls(Arc<rustls::ClientConfig>);

impl MakeTlsConnect<Socket> for MakeRustls {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> io::Result<RustlsConnect> {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(RustlsConnect {
            connector: TlsConnector::from(self.0.clone()),
            name,
        })
    }
}

pub(crate) struct RustlsConnect {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl TlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let tls = self.connector.connect(self.name, stream).await?;
            Ok(RustlsStream(Box::new(tls)))
        })
    }
}

pub(crate) struct RustlsStream(Box<tokio_rustls::client::TlsStream<Socket>>);

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.0.as_mut()).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.0.as_mut()).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.0.as_mut()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.0.as_mut()).poll_shutdown(cx)
    }
}

impl TlsStream for RustlsStream {
    // SCRAM channel binding is optional (`channel_binding=prefer`): without it the
    // password exchange is still SCRAM over a verified TLS connection.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Stats {
    pub in_recovery: bool,
    pub connections: i64,
    pub max_connections: i64,
    /// `addr:port` of the server that answered; None over a Unix socket.
    pub server: Option<String>,
}

fn parse(rows: &[SimpleQueryMessage]) -> Option<Stats> {
    let row = rows.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r),
        _ => None,
    })?;
    if row.get(0)? != "1" {
        return None;
    }
    let server = match (row.get(4), row.get(5)) {
        (Some(addr), Some(port)) if addr.contains(':') => Some(format!("[{addr}]:{port}")),
        (Some(addr), Some(port)) => Some(format!("{addr}:{port}")),
        _ => None,
    };
    Some(Stats {
        in_recovery: row.get(1)? == "t",
        connections: row.get(2)?.parse().ok()?,
        max_connections: row.get(3)?.parse().ok()?,
        server,
    })
}

pub(crate) fn judge(s: &Stats, warn_above: f64) -> Probe {
    let used = if s.max_connections > 0 {
        s.connections as f64 / s.max_connections as f64
    } else {
        0.0
    };
    let warning = (used > warn_above).then(|| {
        format!(
            "{} of {} connections in use ({:.1}%), above {:.0}%",
            s.connections,
            s.max_connections,
            used * 100.0,
            warn_above * 100.0
        )
    });
    let mut details = vec![
        (
            "role",
            Value::Str(if s.in_recovery { "replica" } else { "primary" }.into()),
        ),
        ("connections_used_pct", Value::Num(used * 100.0)),
        ("connections", Value::Int(s.connections)),
        ("max_connections", Value::Int(s.max_connections)),
    ];
    if let Some(server) = &s.server {
        details.push(("server", Value::Str(server.clone())));
    }
    Probe {
        ok: true,
        warning,
        error: None,
        refused: false,
        details,
    }
}

// === pool gauges, read at scrape time ===

/// `rampart_pool_connections{pool,state}` and `rampart_pool_waiting{pool}` for the
/// health-check Postgres pool and the program's Redis pool.
#[derive(Debug)]
pub(crate) struct PoolCollector(pub Arc<PoolSources>);

type PoolLabels = Vec<(&'static str, &'static str)>;

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let connections = Family::<PoolLabels, Gauge>::default();
        let waiting = Family::<PoolLabels, Gauge>::default();
        let mut states = Vec::new();
        if let Some(pg) = self.0.postgres() {
            states.push(("postgres", pg.state()));
        }
        if let Some(redis) = self.0.redis() {
            states.push(("redis", redis.redis.pool_state()));
        }
        if states.is_empty() {
            return Ok(());
        }
        for (pool, s) in states {
            let idle = i64::from(s.idle_connections);
            let in_use = i64::from(s.connections.saturating_sub(s.idle_connections));
            connections
                .get_or_create(&vec![("pool", pool), ("state", "idle")])
                .set(idle);
            connections
                .get_or_create(&vec![("pool", pool), ("state", "in_use")])
                .set(in_use);
            waiting
                .get_or_create(&vec![("pool", pool)])
                .set(i64::try_from(s.statistics.pending_gets()).unwrap_or(i64::MAX));
        }
        connections.encode(encoder.encode_descriptor(
            "pool_connections",
            "Connections of each pool (postgres: the health-check pool; redis: the program's client), idle or in use",
            None,
            connections.metric_type(),
        )?)?;
        waiting.encode(encoder.encode_descriptor(
            "pool_waiting",
            "Callers waiting for a connection of each pool",
            None,
            waiting.metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saturation_warns_above_the_threshold() {
        let s = Stats {
            in_recovery: false,
            connections: 81,
            max_connections: 100,
            server: Some("10.0.0.5:5432".into()),
        };
        let p = judge(&s, 0.8);
        assert!(p.ok);
        assert!(p.warning.unwrap().contains("81 of 100"));
        assert!(p.details.contains(&("role", Value::Str("primary".into()))));
        assert!(
            p.details
                .contains(&("server", Value::Str("10.0.0.5:5432".into())))
        );
        let p = judge(
            &Stats {
                connections: 80,
                in_recovery: true,
                ..s
            },
            0.8,
        );
        assert!(p.warning.is_none());
        assert!(p.details.contains(&("role", Value::Str("replica".into()))));
    }
}
