//! The distributed store: one Lua script per decision, atomic in Redis, timed by Redis's own
//! clock (`TIME`) so replicas with skewed clocks agree. The rules are those of
//! `memory::step`; the key's expiry is set by the same script, so no key outlives its
//! window or block.
//!
//! With quota leasing (lease.rs, `lease:`), LEASE replaces SCRIPT: one call reserves a
//! slice of the key's points for one replica, which spends it without asking again.

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

/// Quota leasing (lease.rs). KEYS[1] as SCRIPT, plus d: until when (ms of Redis time) a
/// slice of more than one point may still be held unspent by some replica. ARGV = points,
/// window ms, block ms (0 = none), want (0 = only give back), give_back, the window end
/// (ms) the points given back were leased in, replicas, lease ms.
///
/// Points given back count again only in the window they came from. Then up to `want`
/// points are reserved at once (c += granted), at most `remaining / (2 * replicas)` but at
/// least one, so replicas share what is left and the last points go one by one. Nothing granted:
/// while a slice may be held elsewhere (until d, and 200 ms more for its unused points to
/// come back: lease.rs gives them back within a 100 ms tick; never past the window) the
/// refusal is "retry then" and starts no block;
/// otherwise the key has spent its points: refused until the window ends, or `block`.
/// A slice never outlives its window. Returns {granted, remaining (not reserved), ms to
/// window end, ms until allowed again, window end (ms), ms the slice may be used}.
const LEASE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local points = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local block = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local back = tonumber(ARGV[5])
local backw = tonumber(ARGV[6])
local replicas = tonumber(ARGV[7])
local ttl = tonumber(ARGV[8])
local h = redis.call('HMGET', KEYS[1], 'c', 'w', 'b', 'd')
local count = tonumber(h[1]) or 0
local wend = tonumber(h[2]) or 0
local blocked = tonumber(h[3]) or 0
local leased = tonumber(h[4]) or 0
if back > 0 and backw == wend and wend > now then
  count = math.max(count - back, 0)
  if want == 0 then redis.call('HSET', KEYS[1], 'c', count) end
end
if want == 0 then return {0, 0, 0, 0, 0, 0} end
if blocked > now then
  if back > 0 and backw == wend then redis.call('HSET', KEYS[1], 'c', count) end
  return {0, 0, math.max(wend - now, 0), math.max(blocked, wend) - now, wend, 0}
end
blocked = 0
if wend <= now then
  count = 0
  wend = now + window
  leased = 0
end
local remaining = math.max(points - count, 0)
local granted = math.min(want, remaining, math.max(1, math.floor(remaining / (2 * replicas))))
local lease = math.min(ttl, wend - now)
local retry = 0
if granted > 0 then
  count = count + granted
  if granted > 1 then leased = math.max(leased, now + lease) end
elseif leased + 200 > now then
  retry = math.min(leased + 200, wend) - now
else
  -- Counted as SCRIPT counts a refused request: the hash reads as without leasing.
  count = count + 1
  if block > 0 then blocked = now + block end
  retry = math.max(blocked, wend) - now
end
redis.call('HSET', KEYS[1], 'c', count, 'w', wend, 'b', blocked, 'd', leased)
redis.call('PEXPIRE', KEYS[1], math.max(blocked, wend) - now)
return {granted, math.max(points - count, 0), wend - now, retry, wend, lease}
"#;

/// `cost: tokens` admission (`memory::peek`): the same hash, read only.
/// ARGV = points, window ms. Returns as SCRIPT.
const PEEK: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local points = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local h = redis.call('HMGET', KEYS[1], 'c', 'w', 'b')
local count = tonumber(h[1]) or 0
local wend = tonumber(h[2]) or 0
local blocked = tonumber(h[3]) or 0
if wend <= now then
  count = 0
  wend = now
end
if blocked <= now and count < points then
  local reset = wend - now
  if count == 0 then reset = window end
  return {1, points - count, reset, 0}
end
return {0, 0, wend - now, math.max(blocked, wend) - now}
"#;

/// `memory::charge`: ARGV = points, window ms, block ms (0 = none), cost. Returns 1.
const CHARGE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local points = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local block = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local h = redis.call('HMGET', KEYS[1], 'c', 'w', 'b')
local count = tonumber(h[1]) or 0
local wend = tonumber(h[2]) or 0
local blocked = tonumber(h[3]) or 0
if wend <= now then
  count = 0
  wend = now + window
end
count = count + cost
if count >= points and block > 0 then blocked = math.max(blocked, now + block) end
redis.call('HSET', KEYS[1], 'c', count, 'w', wend, 'b', blocked)
redis.call('PEXPIRE', KEYS[1], math.max(blocked, wend) - now)
return 1
"#;

/// `max_streams`: KEYS[1] = rl:{policy}:s:key, a sorted set of permit ids scored by their
/// lease's end (ms of Redis time). ARGV = max, lease ms, id. Expired leases (a replica that
/// died holding them) are dropped first. Returns {taken, remaining}.
const ACQUIRE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
if n >= max then return {0, 0} end
redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
if redis.call('PTTL', KEYS[1]) < lease then redis.call('PEXPIRE', KEYS[1], lease) end
return {1, max - n - 1}
"#;

/// Renews the leases of permits this replica holds on one key: ARGV = lease ms, ids...
/// Only ids still there (XX): one released or expired meanwhile is not brought back. The
/// key's expiry covers its longest lease (leases differ after a reload changed them).
const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local renewed = 0
for i = 2, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', now + lease, ARGV[i])
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl ~= -2 and ttl < lease then redis.call('PEXPIRE', KEYS[1], lease) end
return renewed
"#;

/// ARGV = id. Returns how many were removed.
const RELEASE: &str = r#"
return redis.call('ZREM', KEYS[1], ARGV[1])
"#;

/// One LEASE call's question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ask {
    /// Points wanted; 0: only give back.
    pub(crate) want: u64,
    /// Unused points of an ended slice, leased in the window ending at `window`.
    pub(crate) give_back: u64,
    /// The window end (ms of Redis time) as a previous [`Grant`] said.
    pub(crate) window: u64,
    pub(crate) replicas: u64,
    /// How long a slice may be used (shortened to the window's end by the script).
    pub(crate) lease: Duration,
}

/// LEASE's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grant {
    /// Points reserved for this replica; 0 = refused.
    pub(crate) granted: u64,
    /// Points nobody has reserved yet.
    pub(crate) remaining: u64,
    /// Until the window ends.
    pub(crate) reset: Duration,
    /// Refused: until a request may be allowed again.
    pub(crate) retry_after: Duration,
    /// The window's end in ms of Redis time: names the window points are given back to.
    pub(crate) window: u64,
    /// How long the slice may be used.
    pub(crate) lease: Duration,
}

#[derive(Debug)]
pub(crate) struct RedisLimiter {
    script: Script,
    lease: Script,
    peek: Script,
    charge: Script,
    acquire: Script,
    renew: Script,
    release: Script,
}

impl Default for RedisLimiter {
    fn default() -> Self {
        RedisLimiter {
            script: Script::new(SCRIPT),
            lease: Script::new(LEASE),
            peek: Script::new(PEEK),
            charge: Script::new(CHARGE),
            acquire: Script::new(ACQUIRE),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
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
        decision(&reply)
    }

    /// Quota leasing: reserves a slice of `key`'s points, gives back unused ones.
    pub(crate) async fn lease(
        &self,
        redis: &Redis,
        key: &str,
        limits: &Limits,
        ask: &Ask,
    ) -> Result<Grant, RedisError> {
        let args = [
            limits.points,
            millis(limits.window),
            limits.block.map_or(0, millis),
            ask.want,
            ask.give_back,
            ask.window,
            ask.replicas.max(1),
            millis(ask.lease),
        ];
        let reply: Vec<i64> = redis.eval(&self.lease, key, &args).await?;
        let field = |i: usize| -> Result<u64, RedisError> {
            reply
                .get(i)
                .and_then(|v| u64::try_from(*v).ok())
                .ok_or_else(|| RedisError::Reply(format!("{reply:?}")))
        };
        Ok(Grant {
            granted: field(0)?,
            remaining: field(1)?,
            reset: Duration::from_millis(field(2)?),
            retry_after: Duration::from_millis(field(3)?),
            window: field(4)?,
            lease: Duration::from_millis(field(5)?),
        })
    }

    /// `cost: tokens` admission: nothing is counted.
    pub(crate) async fn peek(
        &self,
        redis: &Redis,
        key: &str,
        limits: &Limits,
    ) -> Result<Decision, RedisError> {
        let args = [limits.points, millis(limits.window)];
        let reply: Vec<i64> = redis.eval(&self.peek, key, &args).await?;
        decision(&reply)
    }

    pub(crate) async fn charge(
        &self,
        redis: &Redis,
        key: &str,
        limits: &Limits,
        cost: u64,
    ) -> Result<(), RedisError> {
        let args = [
            limits.points,
            millis(limits.window),
            limits.block.map_or(0, millis),
            cost,
        ];
        let _: i64 = redis.eval(&self.charge, key, &args).await?;
        Ok(())
    }

    /// Some(remaining) when the permit `id` was taken.
    pub(crate) async fn acquire(
        &self,
        redis: &Redis,
        key: &str,
        max: u64,
        lease: Duration,
        id: u64,
    ) -> Result<Option<u64>, RedisError> {
        let reply: Vec<i64> = redis
            .eval(&self.acquire, key, &[max, millis(lease), id])
            .await?;
        match reply.as_slice() {
            [1, remaining] => Ok(Some(u64::try_from(*remaining).unwrap_or(0))),
            [0, _] => Ok(None),
            _ => Err(RedisError::Reply(format!("{reply:?}"))),
        }
    }

    /// Renews `ids` on `key`, all in one call.
    pub(crate) async fn renew(
        &self,
        redis: &Redis,
        key: &str,
        lease: Duration,
        ids: &[u64],
    ) -> Result<(), RedisError> {
        let mut args = Vec::with_capacity(ids.len() + 1);
        args.push(millis(lease));
        args.extend_from_slice(ids);
        let _: i64 = redis.eval(&self.renew, key, &args).await?;
        Ok(())
    }

    pub(crate) async fn release(
        &self,
        redis: &Redis,
        key: &str,
        id: u64,
    ) -> Result<(), RedisError> {
        let _: i64 = redis.eval(&self.release, key, &[id]).await?;
        Ok(())
    }
}

/// {allowed, remaining, ms to window end, ms until allowed again}
fn decision(reply: &[i64]) -> Result<Decision, RedisError> {
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

/// At least 1: a sub-millisecond window would never count anything.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}
