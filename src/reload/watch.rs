//! Noticing that files changed on disk (certificates and keys), by polling.
//!
//! Polling rather than inotify: Kubernetes rotates a mounted secret by swapping the
//! `..data` symlink to a new directory, which leaves the file a watch was put on untouched;
//! a poll that follows the symlinks (as opening the file does) sees the new file. Each poll
//! opens every path, takes its device, inode, size and mtime from the open file, and hashes
//! its first [`MAX_HASHED`] bytes (a rewrite with the same size within one mtime tick is
//! still seen). Between polls nothing runs: [`FileWatch::changed`] is a timer and this
//! struct.
//!
//! A change is reported once the new set of fingerprints has been seen on two polls in a
//! row, so a rotation half done (a file missing, the key new and the certificate not yet)
//! is not reported until it is finished. A file that disappears is not a change until it
//! is back: the caller would only fail to read it.

use std::hash::Hasher;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How often the files are looked at, unless told otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// Bytes of each file hashed: certificates and keys are a few KiB; a file larger than this
/// is still compared by size, mtime and inode.
const MAX_HASHED: u64 = 1 << 20;

/// What one poll saw of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: Option<SystemTime>,
    hash: u64,
}

/// One poll of every path, in order; `None`: missing or unreadable now.
type Seen = Vec<Option<Fingerprint>>;

/// Watches a set of paths; [`FileWatch::changed`] resolves when any of them changed.
/// Cancelled by dropping the future (or the watch): no task is left behind.
#[derive(Debug)]
pub struct FileWatch {
    paths: Vec<PathBuf>,
    interval: Duration,
    /// What the caller last acted on: at creation, then each reported change.
    baseline: Seen,
    /// A set that differs from the baseline, seen on the last poll, waiting for a second
    /// poll to see it the same.
    candidate: Option<Seen>,
}

impl FileWatch {
    /// Watches `paths` from what they hold now: make it before reading the files, so a
    /// change in between is reported rather than missed.
    pub fn new(paths: impl IntoIterator<Item = PathBuf>) -> Self {
        let paths: Vec<PathBuf> = paths.into_iter().collect();
        let baseline = look(&paths);
        FileWatch {
            paths,
            interval: DEFAULT_INTERVAL,
            baseline,
            candidate: None,
        }
    }

    /// Polls every `interval` instead of [`DEFAULT_INTERVAL`] (tests; at least 1 ms).
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(1));
        self
    }

    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Resolves with the paths whose content changed, once the change has settled; what
    /// they hold then is the new baseline. Cancel-safe: dropped while waiting, the next
    /// call goes on from where this one was.
    pub async fn changed(&mut self) -> Vec<PathBuf> {
        loop {
            tokio::time::sleep(self.interval).await;
            let paths = self.paths.clone();
            // Opening files can block (a network volume); a task stuck there keeps only
            // itself waiting.
            let seen = match tokio::task::spawn_blocking(move || look(&paths)).await {
                Ok(seen) => seen,
                Err(e) => {
                    tracing::warn!(error = %e, "file watch: a poll failed");
                    continue;
                }
            };
            if let Some(changed) = self.step(seen) {
                return changed;
            }
        }
    }

    /// One poll's verdict: the changed paths once `seen` is a settled change.
    fn step(&mut self, seen: Seen) -> Option<Vec<PathBuf>> {
        if seen == self.baseline {
            // Back as it was (a file put back, a rotation undone): nothing happened.
            self.candidate = None;
            return None;
        }
        let gone = seen
            .iter()
            .zip(&self.baseline)
            .any(|(now, before)| now.is_none() && before.is_some());
        if gone {
            self.candidate = None;
            return None;
        }
        if self.candidate.as_ref() != Some(&seen) {
            self.candidate = Some(seen);
            return None;
        }
        self.candidate = None;
        let changed = self
            .paths
            .iter()
            .zip(seen.iter().zip(&self.baseline))
            .filter(|(_, (now, before))| now != before)
            .map(|(p, _)| p.clone())
            .collect();
        self.baseline = seen;
        Some(changed)
    }

    /// One poll, now, without waiting (tests).
    #[cfg(test)]
    fn poll_now(&mut self) -> Option<Vec<PathBuf>> {
        let seen = look(&self.paths);
        self.step(seen)
    }
}

fn look(paths: &[PathBuf]) -> Seen {
    paths.iter().map(|p| fingerprint(p)).collect()
}

/// The file `path` leads to (symlinks followed), as one open file: the inode and the
/// content are the same file's even while a rotation swaps it.
fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let file = std::fs::File::open(path).ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let mut hasher = std::hash::DefaultHasher::new();
    let mut buf = [0u8; 8192];
    let mut reader = file.take(MAX_HASHED);
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.write(buf.get(..n)?),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
    let (dev, ino) = dev_ino(&meta);
    Some(Fingerprint {
        dev,
        ino,
        len: meta.len(),
        mtime: meta.modified().ok(),
        hash: hasher.finish(),
    })
}

#[cfg(unix)]
fn dev_ino(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

#[cfg(not(unix))]
fn dev_ino(_: &std::fs::Metadata) -> (u64, u64) {
    (0, 0)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;

    use super::*;

    /// A fresh directory under the system's temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let p = std::env::temp_dir().join(format!(
                "rampart-watch-{name}-{}-{nanos}",
                std::process::id()
            ));
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.0.join(rel)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Polls `n` times; every poll must report nothing.
    fn quiet(w: &mut FileWatch, n: usize) {
        for i in 0..n {
            assert_eq!(w.poll_now(), None, "poll {i} reported a change");
        }
    }

    #[test]
    fn nothing_changes_nothing_is_reported() {
        let d = TempDir::new("idle");
        fs::write(d.path("a"), "one").unwrap();
        fs::write(d.path("b"), "two").unwrap();
        let mut w = FileWatch::new([d.path("a"), d.path("b"), d.path("never")]);
        quiet(&mut w, 10);
        // Read, not written: the access time moving is no change.
        assert_eq!(fs::read(d.path("a")).unwrap(), b"one");
        quiet(&mut w, 3);
    }

    #[test]
    fn a_rewrite_is_reported_once_after_two_polls() {
        let d = TempDir::new("rewrite");
        fs::write(d.path("cert"), "old certificate").unwrap();
        fs::write(d.path("key"), "key").unwrap();
        let mut w = FileWatch::new([d.path("cert"), d.path("key")]);
        fs::write(d.path("cert"), "a new, longer certificate").unwrap();
        assert_eq!(w.poll_now(), None, "seen once: not settled yet");
        assert_eq!(w.poll_now(), Some(vec![d.path("cert")]));
        quiet(&mut w, 5);
    }

    #[test]
    fn a_same_size_rewrite_in_the_same_mtime_is_seen_by_its_content() {
        let d = TempDir::new("samesize");
        let p = d.path("cert");
        fs::write(&p, "AAAA").unwrap();
        let mtime = fs::metadata(&p).unwrap().modified().unwrap();
        let mut w = FileWatch::new([p.clone()]);
        // Same inode (truncated in place), same size, mtime put back: only the bytes differ.
        fs::write(&p, "BBBB").unwrap();
        fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let before = fingerprint(&p).unwrap();
        assert_eq!((before.len, before.mtime), (4, Some(mtime)));
        assert_eq!(w.poll_now(), None);
        assert_eq!(w.poll_now(), Some(vec![p]));
    }

    /// The layout of a Kubernetes secret volume: `tls.crt -> ..data/tls.crt`, and `..data`
    /// a symlink to a timestamped directory, swapped atomically (rename over it) to a new
    /// one at each rotation, the old directory then removed.
    #[test]
    fn a_kubernetes_secret_rotation_is_seen_through_the_symlinks() {
        let d = TempDir::new("k8s");
        let write_version = |name: &str, crt: &str, key: &str| {
            fs::create_dir(d.path(name)).unwrap();
            fs::write(d.path(&format!("{name}/tls.crt")), crt).unwrap();
            fs::write(d.path(&format!("{name}/tls.key")), key).unwrap();
        };
        write_version("..2026_12_06_12_00_00.000000001", "CERT-v1", "KEY-v1");
        symlink("..2026_12_06_12_00_00.000000001", d.path("..data")).unwrap();
        symlink("..data/tls.crt", d.path("tls.crt")).unwrap();
        symlink("..data/tls.key", d.path("tls.key")).unwrap();
        let mut w = FileWatch::new([d.path("tls.crt"), d.path("tls.key")]);
        quiet(&mut w, 3);

        // The kubelet's rotation; same sizes, so only the inode and the bytes tell.
        write_version("..2026_12_06_13_00_00.000000002", "CERT-v2", "KEY-v2");
        symlink("..2026_12_06_13_00_00.000000002", d.path("..data_tmp")).unwrap();
        fs::rename(d.path("..data_tmp"), d.path("..data")).unwrap();
        fs::remove_dir_all(d.path("..2026_12_06_12_00_00.000000001")).unwrap();

        assert_eq!(w.poll_now(), None);
        assert_eq!(
            w.poll_now(),
            Some(vec![d.path("tls.crt"), d.path("tls.key")])
        );
        quiet(&mut w, 3);
        // The symlinks the watch was given never changed: only where they lead did.
        assert_eq!(
            fs::read_link(d.path("tls.crt")).unwrap(),
            PathBuf::from("..data/tls.crt")
        );

        // A rotation that keeps the bytes (the secret re-applied unchanged) is still a new
        // file: reported, and reloading the same certificate is harmless.
        write_version("..2026_12_06_14_00_00.000000003", "CERT-v2", "KEY-v2");
        symlink("..2026_12_06_14_00_00.000000003", d.path("..data_tmp")).unwrap();
        fs::rename(d.path("..data_tmp"), d.path("..data")).unwrap();
        assert_eq!(w.poll_now(), None);
        assert!(w.poll_now().is_some());
    }

    /// Mid-rotation the certificate is gone for a moment: no change until it is back, and
    /// then once the new set has held for two polls.
    #[test]
    fn a_file_missing_for_a_moment_is_no_change_until_it_is_back() {
        let d = TempDir::new("missing");
        fs::write(d.path("cert"), "v1").unwrap();
        fs::write(d.path("key"), "k1").unwrap();
        let mut w = FileWatch::new([d.path("cert"), d.path("key")]);
        fs::remove_file(d.path("cert")).unwrap();
        fs::write(d.path("key"), "k2").unwrap();
        quiet(&mut w, 5);
        fs::write(d.path("cert"), "v2").unwrap();
        assert_eq!(w.poll_now(), None);
        assert_eq!(w.poll_now(), Some(vec![d.path("cert"), d.path("key")]));

        // Gone and put back with the same bytes: a new file (reported, once) unless the
        // file system gave it the old inode and mtime tick (then nothing): never twice.
        fs::remove_file(d.path("cert")).unwrap();
        quiet(&mut w, 3);
        fs::write(d.path("cert"), "v2").unwrap();
        let reports: Vec<_> = (0..5).filter_map(|_| w.poll_now()).collect();
        assert!(reports.len() <= 1, "{reports:?}");
    }

    #[test]
    fn a_change_undone_before_it_settled_is_none() {
        let d = TempDir::new("flap");
        let p = d.path("cert");
        fs::write(&p, "v1").unwrap();
        let mut w = FileWatch::new([p.clone()]);
        let baseline = fingerprint(&p).unwrap();
        fs::write(&p, "v2-longer").unwrap();
        assert_eq!(w.poll_now(), None);
        // Truncated in place back to the same bytes and mtime.
        fs::write(&p, "v1").unwrap();
        fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(baseline.mtime.unwrap())
            .unwrap();
        assert_eq!(fingerprint(&p), Some(baseline));
        quiet(&mut w, 3);
    }

    #[test]
    fn a_file_changing_on_every_poll_is_reported_once_it_holds_still() {
        let d = TempDir::new("busy");
        let p = d.path("cert");
        fs::write(&p, "v0").unwrap();
        let mut w = FileWatch::new([p.clone()]);
        for i in 1..=5 {
            fs::write(&p, format!("v{i}-{}", "x".repeat(i))).unwrap();
            assert_eq!(w.poll_now(), None, "write {i}");
        }
        assert_eq!(w.poll_now(), Some(vec![p]));
    }

    #[test]
    fn a_file_that_appears_is_a_change_and_a_directory_is_not_a_file() {
        let d = TempDir::new("appear");
        let mut w = FileWatch::new([d.path("later")]);
        fs::create_dir(d.path("later")).unwrap();
        quiet(&mut w, 3);
        fs::remove_dir(d.path("later")).unwrap();
        fs::write(d.path("later"), "here").unwrap();
        assert_eq!(w.poll_now(), None);
        assert_eq!(w.poll_now(), Some(vec![d.path("later")]));
    }

    #[tokio::test]
    async fn changed_resolves_after_a_change_and_is_cancelled_by_drop() {
        let d = TempDir::new("async");
        let p = d.path("cert");
        fs::write(&p, "v1").unwrap();
        let mut w = FileWatch::new([p.clone()]).with_interval(Duration::from_millis(10));
        // Twenty polls or so with nothing to report.
        let idle = tokio::time::timeout(Duration::from_millis(200), w.changed()).await;
        assert!(idle.is_err(), "reported {idle:?} with nothing changed");
        let writer = {
            let p = p.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                fs::write(&p, "v2").unwrap();
            })
        };
        let got = tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .expect("the change was not reported within 5 s");
        assert_eq!(got, vec![p.clone()]);
        writer.await.unwrap();
        // The new content is the baseline.
        let idle = tokio::time::timeout(Duration::from_millis(100), w.changed()).await;
        assert!(idle.is_err());
    }

    #[test]
    fn the_default_interval_is_five_seconds() {
        let w = FileWatch::new([PathBuf::from("/nonexistent/rampart/cert")]);
        assert_eq!(w.interval, Duration::from_secs(5));
        assert_eq!(w.paths(), [PathBuf::from("/nonexistent/rampart/cert")]);
        let w = w.with_interval(Duration::ZERO);
        assert_eq!(w.interval, Duration::from_millis(1));
    }
}
