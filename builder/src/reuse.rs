//! Intermediate results kept between builds, content-addressed by their inputs, under
//! `<cache>/reuse/<kind>/<key[..2]>/<key>`: work a rebuild would redo byte for byte (a kernel's
//! module index, the compressed squashfs blocks of unchanged files) is looked up instead.
//!
//! Reuse is an optimisation and never changes what a build writes: a key is the sha256 of
//! everything the result depends on (and the version of the code that makes it), a value that
//! cannot be read or does not check out is made again, and a value that cannot be stored is
//! only logged. `kiln build --no-reuse` ignores it all (downloads still come from the cache);
//! `kiln cache gc` bounds its size, dropping the least recently used results first.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};

/// The directory below the cache root.
const DIR: &str = "reuse";

/// Where a build keeps and finds intermediate results; disabled with `--no-reuse`.
#[derive(Debug, Clone, Default)]
pub struct Reuse {
    dir: Option<PathBuf>,
}

impl Reuse {
    /// Reuse below the cache at `cache_root`, or none at all when `enabled` is false.
    pub fn at(cache_root: &Path, enabled: bool) -> Reuse {
        Reuse { dir: enabled.then(|| cache_root.join(DIR)) }
    }

    /// No reuse: every result is made afresh (and nothing is stored).
    pub fn disabled() -> Reuse {
        Reuse { dir: None }
    }

    pub fn enabled(&self) -> bool {
        self.dir.is_some()
    }

    fn path(&self, kind: &str, key: &str) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        let shard = key.get(..2)?;
        Some(dir.join(kind).join(shard).join(key))
    }

    /// The result stored under `key`, if any. Touches it, so `gc` keeps what builds use.
    pub fn get(&self, kind: &str, key: &str) -> Option<Vec<u8>> {
        let path = self.path(kind, key)?;
        let data = fs::read(&path).ok()?;
        if let Ok(f) = fs::File::options().write(true).open(&path) {
            let _ = f.set_modified(SystemTime::now());
        }
        Some(data)
    }

    /// Stores `data` under `key` (atomically: a temporary file renamed into place, so a reader
    /// never sees half a value). Failures are logged, not returned: the build goes on.
    pub fn put(&self, kind: &str, key: &str, data: &[u8]) {
        let Some(path) = self.path(kind, key) else { return };
        if let Err(e) = write_atomic(&path, data) {
            tracing::debug!("not keeping {kind} {key} for reuse: {e:#}");
        }
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().context("no parent directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("creating a file in {}", dir.display()))?;
    tmp.write_all(data)?;
    tmp.persist(path).map_err(|e| e.error).with_context(|| format!("storing {}", path.display()))?;
    Ok(())
}

/// What `gc` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcReport {
    pub kept_bytes: u64,
    pub kept_files: u64,
    pub removed_bytes: u64,
    pub removed_files: u64,
}

/// Removes the least recently used results below `<cache_root>/reuse` until at most
/// `max_bytes` remain. Downloads (blobs and refs) are never touched.
pub fn gc(cache_root: &Path, max_bytes: u64) -> Result<GcReport> {
    let mut files = Vec::new();
    collect(&cache_root.join(DIR), &mut files)?;
    // Newest first: keep those while they fit.
    files.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut report = GcReport::default();
    for (path, _, len) in files {
        if report.kept_bytes + len <= max_bytes {
            report.kept_bytes += len;
            report.kept_files += 1;
        } else {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            report.removed_bytes += len;
            report.removed_files += 1;
        }
    }
    Ok(report)
}

fn collect(dir: &Path, out: &mut Vec<(PathBuf, SystemTime, u64)>) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for e in entries {
        let e = e?;
        let meta = e.metadata()?;
        if meta.is_dir() {
            collect(&e.path(), out)?;
        } else {
            out.push((e.path(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_disabled_reuse_stores_nothing() {
        let d = tempfile::tempdir().unwrap();
        let r = Reuse::at(d.path(), true);
        assert_eq!(r.get("k", "ab12"), None);
        r.put("k", "ab12", b"value");
        assert_eq!(r.get("k", "ab12").as_deref(), Some(&b"value"[..]));
        assert!(d.path().join("reuse/k/ab/ab12").is_file());
        let off = Reuse::at(d.path(), false);
        assert_eq!(off.get("k", "ab12"), None);
        off.put("k", "cd34", b"x");
        assert!(!d.path().join("reuse/k/cd").exists());
    }

    #[test]
    fn gc_keeps_the_most_recently_used_within_the_bound() {
        let d = tempfile::tempdir().unwrap();
        let r = Reuse::at(d.path(), true);
        for (i, key) in ["aa01", "bb02", "cc03"].iter().enumerate() {
            r.put("k", key, &[0u8; 100]);
            let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64);
            fs::File::options().write(true).open(d.path().join(format!("reuse/k/{}/{key}", &key[..2]))).unwrap().set_modified(t).unwrap();
        }
        // A download beside it is never touched.
        fs::create_dir_all(d.path().join("blobs")).unwrap();
        fs::write(d.path().join("blobs/x"), [0u8; 500]).unwrap();
        let report = gc(d.path(), 250).unwrap();
        assert_eq!(report, GcReport { kept_bytes: 200, kept_files: 2, removed_bytes: 100, removed_files: 1 });
        assert!(!d.path().join("reuse/k/aa/aa01").exists() && d.path().join("reuse/k/cc/cc03").exists());
        assert!(d.path().join("blobs/x").exists());
    }
}
