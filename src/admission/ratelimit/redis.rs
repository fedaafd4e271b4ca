//! The distributed store: one Lua script per decision, atomic in Redis, timed by Redis's own
//! clock (`TIME`) so replicas with skewed clocks agree. The rules are those of
//! `memory::step`; the key's expiry is set by the same script, so no key outlives its
//! window or block.

use std::time::Duration;

use crate::redis::{Redis, RedisError, Script};

use super::{Decision, Limits};

/// KEYS[1] = rl:{policy}:key, a hash of c (count), w (window end), b (blocked until), all in
/// ms of Redis time. ARGV = points, window ms, block ms (0 = none).
/// Returns {allowed, remaining, ms to window end, ms until allowed again}.
const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local points = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local block = tonumber(ARGV[3])
local h = redis.call('HMGET', KEYS[1], 'c', 'w', 'b')
local count = tonumber(h[1]) or 0
local wend = tonumber(h[2]) or 0
local blocked = tonumber(h[3]) or 0
if blocked > now then
  return {0, 0, math.max(wend - now, 0), math.max(blocked, wend) - now}
end
blocked = 0
if wend <= now then
  count = 0
  wend = now + window
end
count = count + 1
local allowed = 1
local retry = 0
if count > points then
  allowed = 0
  if block > 0 then blocked = now + block end
  retry = math.max(blocked, wend) - now
end
redis.call('HSET', KEYS[1], 'c', count, 'w', wend, 'b', blocked)
redis.call('PEXPIRE', KEYS[1], math.max(blocked, wend) - now)
return {allowed, math.max(points - count, 0), wend - now, retry}
"#;

pub(crate) struct RedisLimiter {
    script: Script,
}

impl Default for RedisLimiter {
    fn default() -> Self {
        RedisLimiter {
            script: Script::new(SCRIPT),
        }
    }
}

impl RedisLimiter {
    /// `key` is the full Redis key (`rl:{policy}:...`).
    pub(crate) async fn check(
        &self,
        redis: &Redis,
        key: &str,
        limits: &Limits,
    ) -> Result<Decision, RedisError> {
        let args = [
            limits.points,
            millis(limits.window),
            limits.block.map_or(0, millis),
        ];
        let reply: Vec<i64> = redis.eval(&self.script, key, &args).await?;
        let field = |i: usize| -> Result<u64, RedisError> {
            reply
                .get(i)
                .and_then(|v| u64::try_from(*v).ok())
                .ok_or_else(|| RedisError::Reply(format!("{reply:?}")))
        };
        Ok(Decision {
            allowed: field(0)? == 1,
            remaining: field(1)?,
            reset: Duration::from_millis(field(2)?),
            retry_after: Duration::from_millis(field(3)?),
        })
    }
}

/// At least 1: a sub-millisecond window would never count anything.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
