//! Where release state outlives the process: a small JSON file (`releases_state:`,
//! replaced atomically: written beside, then renamed over) and, with `redis:`, one Redis
//! key that every replica reads.
//!
//! Who drives with Redis: a lease (`<prefix>:lease`, SET with a 5 s expiry, renewed every
//! tick by its holder), taken only while some release runs, is paused or waits (here or
//! in the state key), and given up when none does. The holder evaluates the releases and
//! writes the state key; the other replicas read that key every tick and set the weights
//! it says, so all of them route alike. They refuse the admin API's actions (409, naming the driver): one writer.
//! When the holder dies, another replica takes the lease within 5 s and resumes from the
//! state key. The gate reads the driver's own traffic: each replica serves a share of the
//! requests, and the driver's share is the sample.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Groups;
use super::machine::{Event, Release, State};
use crate::admission::ratelimit::fallback::RedisStore;
use crate::config::{ReleaseConfig, ReleaseGate};

/// The lease outlives a few missed ticks, not a dead process.
pub(crate) const LEASE: Duration = Duration::from_secs(5);
const FORMAT: u32 = 1;

/// The saved state: every release, and which configuration releases already ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Persisted {
    pub format: u32,
    pub seq: u64,
    pub config_done: Vec<String>,
    pub releases: Vec<Saved>,
}

/// One release as saved: what it is, where it is, and its history. The step's window is
/// not saved (the groups' counters restart with the process): it starts again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Saved {
    pub id: String,
    pub upstream: String,
    pub to: String,
    pub steps: Vec<u32>,
    pub step_for_ms: u64,
    pub max_error_rate: f64,
    pub max_p95_ms: u64,
    pub min_requests: u64,
    pub from_config: bool,
    pub from: String,
    pub state: State,
    pub started_at: u64,
    pub weights: Vec<(String, u32)>,
    pub history: Vec<Event>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Persisted {
    pub(crate) fn of<'a>(
        seq: u64,
        config_done: impl IntoIterator<Item = &'a String>,
        releases: &[Release],
    ) -> Persisted {
        Persisted {
            format: FORMAT,
            seq,
            config_done: config_done.into_iter().cloned().collect(),
            releases: releases
                .iter()
                .map(|r| Saved {
                    id: r.id.clone(),
                    upstream: r.spec.upstream.clone(),
                    to: r.spec.to.clone(),
                    steps: r.spec.steps.clone(),
                    step_for_ms: ms(r.spec.step_for),
                    max_error_rate: r.spec.gate.max_error_rate,
                    max_p95_ms: ms(r.spec.gate.max_p95),
                    min_requests: r.spec.gate.min_requests,
                    from_config: r.from_config,
                    from: r.from.clone(),
                    state: r.state.clone(),
                    started_at: r.started_at,
                    weights: r.weights.clone(),
                    history: r.history.clone(),
                })
                .collect(),
        }
    }

    pub(crate) fn releases(&self, groups: &dyn Groups, now: u64) -> Vec<Release> {
        self.releases
            .iter()
            .map(|s| {
                let spec = ReleaseConfig {
                    upstream: s.upstream.clone(),
                    to: s.to.clone(),
                    steps: s.steps.clone(),
                    step_for: Duration::from_millis(s.step_for_ms),
                    gate: ReleaseGate {
                        max_error_rate: s.max_error_rate,
                        max_p95: Duration::from_millis(s.max_p95_ms),
                        min_requests: s.min_requests,
                    },
                };
                Release::restored(
                    s.id.clone(),
                    spec,
                    s.from_config,
                    s.from.clone(),
                    s.state.clone(),
                    s.started_at,
                    s.weights.clone(),
                    s.history.clone(),
                    groups,
                    now,
                )
            })
            .collect()
    }

    /// Whether a release runs, is paused or waits: something to drive.
    pub(crate) fn has_work(&self) -> bool {
        self.releases.iter().any(|r| !r.state.finished())
    }

    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    pub(crate) fn from_bytes(b: &[u8]) -> Result<Persisted, String> {
        let p: Persisted = serde_json::from_slice(b).map_err(|e| e.to_string())?;
        if p.format != FORMAT {
            return Err(format!("format {} (this rampart reads {FORMAT})", p.format));
        }
        Ok(p)
    }
}

/// Writes `p` to `path` atomically: a reader (or a crash) sees the old file or the new
/// one, never half of one.
pub(crate) fn save_file(path: &Path, p: &Persisted) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&p.to_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// None when there is no file yet.
pub(crate) fn load_file(path: &Path) -> Result<Option<Persisted>, String> {
    match std::fs::read(path) {
        Ok(b) => Persisted::from_bytes(&b)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The Redis side: the state key and the lease.
#[derive(Clone)]
pub(crate) struct Shared {
    pub client: Arc<RedisStore>,
    /// `rampart:{releases}`: the hash tag keeps both keys on one Cluster slot.
    pub prefix: String,
    /// Names this replica in the lease.
    pub instance: String,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("prefix", &self.prefix)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

/// Takes the lease when free, renews it when ours; answers the holder's name.
const LEASE_SCRIPT: &str = "local v = redis.call('GET', KEYS[1]) \
    if v == false or v == ARGV[1] then \
      redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return ARGV[1] \
    end return v";

const UNLEASE_SCRIPT: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
      return redis.call('DEL', KEYS[1]) end return 0";

impl Shared {
    fn state_key(&self) -> String {
        format!("{}:state", self.prefix)
    }

    fn lease_key(&self) -> String {
        format!("{}:lease", self.prefix)
    }

    /// Who holds the lease after this call (this replica if it was free or ours).
    pub(crate) async fn lease(&self) -> Result<String, String> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(LEASE_SCRIPT)
            .arg(1)
            .arg(self.lease_key())
            .arg(&self.instance)
            .arg(ms(LEASE));
        self.client
            .redis
            .query::<String>(&cmd)
            .await
            .map_err(|e| e.to_string())
    }

    /// Who holds the lease now, if anyone.
    pub(crate) async fn holder(&self) -> Result<Option<String>, String> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.lease_key());
        self.client
            .redis
            .query::<Option<String>>(&cmd)
            .await
            .map_err(|e| e.to_string())
    }

    /// Gives the lease up if it is ours (nothing left to drive).
    pub(crate) async fn unlease(&self) -> Result<(), String> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(UNLEASE_SCRIPT)
            .arg(1)
            .arg(self.lease_key())
            .arg(&self.instance);
        self.client
            .redis
            .query::<i64>(&cmd)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    pub(crate) async fn save(&self, p: &Persisted) -> Result<(), String> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.state_key()).arg(p.to_bytes());
        self.client
            .redis
            .query::<()>(&cmd)
            .await
            .map_err(|e| e.to_string())
    }

    /// The raw state, so a follower can tell whether it changed before parsing.
    pub(crate) async fn load_raw(&self) -> Result<Option<Vec<u8>>, String> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.state_key());
        self.client
            .redis
            .query::<Option<Vec<u8>>>(&cmd)
            .await
            .map_err(|e| e.to_string())
    }

    pub(crate) async fn load(&self) -> Result<Option<Persisted>, String> {
        match self.load_raw().await? {
            Some(b) => Persisted::from_bytes(&b).map(Some),
            None => Ok(None),
        }
    }
}

/// The program's Redis client now (a reload may change it): `app` gives the rate
/// limiters' one.
pub(crate) type RedisSource = Arc<dyn Fn() -> Option<Arc<RedisStore>> + Send + Sync>;

/// The prefix of the keys in production.
pub(crate) const PREFIX: &str = "rampart:{releases}";

/// Where the state goes now (a reload may change both).
pub(crate) struct Store {
    file: Mutex<Option<PathBuf>>,
    /// Set by tests: this client and prefix, whatever the source says.
    redis: Mutex<Option<Shared>>,
    source: Mutex<Option<RedisSource>>,
    instance: String,
    /// What this replica last wrote to the Redis key.
    last_saved: Mutex<Option<Vec<u8>>>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            file: Mutex::new(None),
            redis: Mutex::new(None),
            source: Mutex::new(None),
            instance: instance_name(),
            last_saved: Mutex::new(None),
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("file", &self.file())
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl Store {
    pub(crate) fn last_saved(&self) -> Option<Vec<u8>> {
        crate::sync::lock(&self.last_saved).clone()
    }

    pub(crate) fn set_last_saved(&self, bytes: Option<Vec<u8>>) {
        *crate::sync::lock(&self.last_saved) = bytes;
    }

    pub(crate) fn set_redis_source(&self, source: RedisSource) {
        *crate::sync::lock(&self.source) = Some(source);
    }

    pub(crate) fn set_file(&self, path: Option<PathBuf>) {
        *crate::sync::lock(&self.file) = path;
    }

    pub(crate) fn file(&self) -> Option<PathBuf> {
        crate::sync::lock(&self.file).clone()
    }

    #[cfg(test)]
    pub(crate) fn set_redis(&self, shared: Option<Shared>) {
        *crate::sync::lock(&self.redis) = shared;
    }

    pub(crate) fn redis(&self) -> Option<Shared> {
        if let Some(fixed) = crate::sync::lock(&self.redis).clone() {
            return Some(fixed);
        }
        let source = crate::sync::lock(&self.source).clone()?;
        Some(Shared {
            client: source()?,
            prefix: PREFIX.to_owned(),
            instance: self.instance.clone(),
        })
    }
}

/// The replica's name in the lease: the host name, the process id and a count (two
/// processes on one host, or two instances in one test process, are two replicas).
pub(crate) fn instance_name() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "rampart".into());
    format!("{host}:{}:{n}", std::process::id())
}
