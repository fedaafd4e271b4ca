//! The Postgres check: one round trip on a pooled connection reads the liveness (`SELECT
//! 1`), the server's role (`pg_is_in_recovery()`), its connection saturation (client
//! backends in `pg_stat_activity` over `max_connections`) and which server answered.
//!
//! The pool (bb8-postgres) is built unchecked, so rampart starts with Postgres down. Several
//! hosts and `target_session_attrs` in the URL are tokio-postgres's: each new connection
//! tries the hosts in order and keeps the first that qualifies, so after a switch-over the
//! next connection lands on the new primary. A pooled connection whose server went away is
//! noticed before use (it is closed) and replaced in the same probe.

use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bb8_postgres::PostgresConnectionManager;
use bb8_postgres::tokio_postgres::{self, NoTls, SimpleQueryMessage};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::{PoolSources, Probe, Value, error_chain};
use crate::config::PostgresDependency;

type Manager = PostgresConnectionManager<NoTls>;

const QUERY: &str = "SELECT 1, pg_is_in_recovery(), \
     (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'), \
     current_setting('max_connections')::int, \
     host(inet_server_addr()), inet_server_port()";

pub struct PgPool {
    pool: bb8::Pool<Manager>,
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
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(text);
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<tokio_postgres::Error>> {
        Box::new(self.clone())
    }
}

impl PgPool {
    /// No connection is made here.
    pub fn new(dep: &PostgresDependency) -> Result<PgPool, String> {
        let mut config = tokio_postgres::Config::from_str(&dep.url)
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
        let pool = bb8::Pool::builder()
            .max_size(dep.pool.max_size)
            .min_idle(Some(dep.pool.min_idle).filter(|n| *n > 0))
            .idle_timeout(Some(dep.pool.idle_timeout))
            .max_lifetime(Some(dep.pool.max_lifetime))
            // A check-out waits at most as long as the check may take, and a failed connect
            // is the check's failure, not something to retry inside it.
            .connection_timeout(dep.check.timeout)
            .retry_connection(false)
            // `checkout` tests connections itself, without a round trip.
            .test_on_check_out(false)
            .error_sink(Box::new(LastError(last_error.clone())))
            .build_unchecked(PostgresConnectionManager::new(config, NoTls));
        Ok(PgPool { pool, last_error })
    }

    pub fn state(&self) -> bb8::State {
        self.pool.state()
    }

    /// One probe. The caller bounds it by the check's timeout.
    pub async fn probe(&self, warn_above: f64) -> Probe {
        let rows = match self.checkout_and_query().await {
            Ok(rows) => rows,
            Err(e) => return Probe::failed(e),
        };
        match parse(&rows) {
            Some(stats) => judge(&stats, warn_above),
            None => Probe::failed("unexpected answer to the health query"),
        }
    }

    async fn checkout_and_query(&self) -> Result<Vec<SimpleQueryMessage>, String> {
        // Idle connections first: one whose server went away is dropped (bb8 sees it
        // closed when it comes back) and the next one tried.
        for _ in 0..=self.pool.state().idle_connections {
            if self.pool.state().idle_connections == 0 {
                break;
            }
            let conn = match self.pool.get().await {
                Ok(c) => c,
                Err(bb8::RunError::User(e)) => return Err(error_chain(&e)),
                Err(bb8::RunError::TimedOut) => return Err(self.timed_out()),
            };
            if conn.is_closed() {
                continue;
            }
            return conn.simple_query(QUERY).await.map_err(|e| error_chain(&e));
        }
        // None idle: connect here, so a refused connection is reported as such at once
        // (a pool check-out would only time out), then lend the connection to the pool.
        let client = self.pool.dedicated_connection().await.map_err(|e| {
            let text = error_chain(&e);
            *self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(text.clone());
            text
        })?;
        let rows = client
            .simple_query(QUERY)
            .await
            .map_err(|e| error_chain(&e))?;
        // Full pool: the connection just ends.
        let _ = self.pool.add(client);
        Ok(rows)
    }

    fn timed_out(&self) -> String {
        match self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_deref()
        {
            Some(e) => format!("no connection in time; last connection error: {e}"),
            None => "no connection in time".into(),
        }
    }

    /// Drops the pool; its connections close their sessions as they go. The connection
    /// tasks run on the runtime: give them a moment to say goodbye to the server.
    pub async fn close(self: Arc<Self>) {
        let open = self.pool.state().connections;
        drop(self);
        if open > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
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

pub fn judge(s: &Stats, warn_above: f64) -> Probe {
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
        details,
    }
}

// === pool gauges, read at scrape time ===

/// `rampart_pool_connections{pool,state}` and `rampart_pool_waiting{pool}` for the
/// health-check Postgres pool and the program's Redis pool.
#[derive(Debug)]
pub struct PoolCollector(pub Arc<PoolSources>);

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
