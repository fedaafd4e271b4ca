//! The Redis check, on the program's one Redis client (the top-level `redis:` section, the
//! pool the rate limiter uses): `PING`, then the role from `INFO replication`. Each call is
//! also bounded by `redis.timeout`, as every call of that client is; the check's timeout
//! bounds the whole probe, check-out included.

use std::time::Duration;

use super::{Probe, Value, error_chain};
use crate::redis::Redis;

pub(crate) async fn probe(redis: &Redis, timeout: Duration) -> Probe {
    match redis.check(timeout).await {
        Ok((rtt, role)) => Probe {
            ok: true,
            warning: None,
            error: None,
            refused: false,
            details: vec![
                ("role", Value::Str(role)),
                ("ping_ms", Value::Num(rtt.as_secs_f64() * 1000.0)),
            ],
        },
        Err(e) => Probe::failed(error_chain(&e)),
    }
}
