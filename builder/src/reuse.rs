//! Intermediate results kept between builds, content-addressed by their inputs, under
//! `<cache>/reuse/<kind>/<key[..2]>/<key>`: work a rebuild would redo byte for byte (a kernel's
//! module index, the compressed squashfs blocks of unchanged files, a package's unpacked
//! contents) is looked up instead.
//!
//! Reuse is an optimisation and never changes what a build writes: a key is the sha256 of
//! everything the result depends on (and the version of the code that makes it), a value that
//! cannot be read or does not check out is made again, and a value that cannot be stored is
//! only logged. Every value ends in an HMAC-SHA256 over its kind, key and bytes, under a key
//! kept outside the cache (`reuse.key` in the user's state directory, 0600): a kept result is
//! used only if this user's kiln made it, so a cache copied from elsewhere (a shared directory,
//! a CI cache restored from another job) or a planted file is made again, never put into an
//! image. Downloads need no such key: they are checked against their published digests.
//! `kiln build --no-reuse` ignores it all (downloads still come from the cache); `kiln cache
//! gc` bounds its size, dropping the least recently used results first.

use std::fs;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, Result};

use crate::digest::HmacSha256;

/// The directory below the cache root.
const DIR: &str = "reuse";
/// The length of the HMAC that ends every value.
const MAC_LEN: usize = 32;
/// The key's file in the user's state directory (`$XDG_STATE_HOME/kiln/`).
const KEY_FILE: &str = "reuse.key";

/// Where a build keeps and finds intermediate results; disabled with `--no-reuse`.
#[derive(Clone, Default)]
pub struct Reuse {
    dir: Option<PathBuf>,
    key: Option<Arc<[u8; 32]>>,
}

impl std::fmt::Debug for Reuse {
    // Never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reuse").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Reuse {
    /// Reuse below the cache at `cache_root`, or none at all when `enabled` is false. Without a
    /// key (no state directory, or it cannot be written) nothing is reused, with a warning.
    pub fn at(cache_root: &Path, enabled: bool) -> Reuse {
        if !enabled {
            return Reuse::disabled();
        }
        match load_or_create_key() {
            Ok(key) => Reuse::with_key(cache_root, key),
            Err(e) => {
                tracing::warn!("not reusing intermediate results of earlier builds: {e:#}");
                Reuse::disabled()
            }
        }
    }

    /// Reuse below `cache_root` with this authentication key (tests; `at` reads the user's).
    pub fn with_key(cache_root: &Path, key: [u8; 32]) -> Reuse {
        Reuse { dir: Some(cache_root.join(DIR)), key: Some(Arc::new(key)) }
    }

    /// No reuse: every result is made afresh (and nothing is stored).
    pub fn disabled() -> Reuse {
        Reuse { dir: None, key: None }
    }

    pub fn enabled(&self) -> bool {
        self.dir.is_some()
    }

    fn path(&self, kind: &str, key: &str) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        let shard = key.get(..2)?;
        Some(dir.join(kind).join(shard).join(key))
    }

    /// The MAC of a value stored under `kind`/`key`, fed its bytes.
    fn mac(&self, kind: &str, key: &str) -> Option<HmacSha256> {
        let mut mac = HmacSha256::new(self.key.as_deref()?);
        mac.update(format!("kiln-reuse-v1\n{kind}\n{key}\n").as_bytes());
        Some(mac)
    }

    /// The result stored under `key`, if any and if its MAC checks out. Touches it, so `gc`
    /// keeps what builds use.
    pub fn get(&self, kind: &str, key: &str) -> Option<Vec<u8>> {
        let mut data = Vec::new();
        self.open(kind, key)?.read_to_end(&mut data).ok()?;
        Some(data)
    }

    /// A reader over the result stored under `key`, if any and if its MAC checks out: for values
    /// too large to hold in memory. The file is read twice (to check, then by the caller).
    pub fn open(&self, kind: &str, key: &str) -> Option<io::Take<BufReader<fs::File>>> {
        let path = self.path(kind, key)?;
        let mut mac = self.mac(kind, key)?;
        let mut file = fs::File::open(&path).ok()?;
        let len = file.metadata().ok()?.len().checked_sub(MAC_LEN as u64)?;
        let mut reader = BufReader::with_capacity(1 << 20, &mut file);
        let mut left = len;
        while left > 0 {
            let buf = reader.fill_buf().ok()?;
            if buf.is_empty() {
                return None;
            }
            let n = buf.len().min(left as usize);
            mac.update(&buf[..n]);
            reader.consume(n);
            left -= n as u64;
        }
        let mut stored = [0u8; MAC_LEN];
        reader.read_exact(&mut stored).ok()?;
        if stored != mac.finalize() {
            tracing::debug!("kept {kind} {key} fails its MAC: made again");
            return None;
        }
        let _ = file.set_modified(SystemTime::now());
        file.rewind().ok()?;
        Some(BufReader::with_capacity(1 << 20, file).take(len))
    }

    /// Stores `data` under `key`. Failures are logged, not returned: the build goes on.
    pub fn put(&self, kind: &str, key: &str, data: &[u8]) {
        if let Some(mut w) = self.writer(kind, key) {
            if w.write_all(data).is_ok() {
                w.keep();
            }
        }
    }

    /// A writer for a value too large to hold in memory; stored by [`KeptWriter::keep`]
    /// (atomically: a temporary file renamed into place, so a reader never sees half a value),
    /// dropped without a trace otherwise. `None` when reuse is off or the file cannot be made.
    pub fn writer(&self, kind: &str, key: &str) -> Option<KeptWriter> {
        let path = self.path(kind, key)?;
        let mac = self.mac(kind, key)?;
        let dir = path.parent()?;
        let made = fs::create_dir_all(dir).and_then(|_| tempfile::NamedTempFile::new_in(dir));
        match made {
            Ok(tmp) => Some(KeptWriter { out: BufWriter::with_capacity(1 << 20, tmp), mac, path, what: format!("{kind} {key}") }),
            Err(e) => {
                tracing::debug!("not keeping {kind} {key} for reuse: {e}");
                None
            }
        }
    }
}

/// A value being stored (`Reuse::writer`).
pub struct KeptWriter {
    out: BufWriter<tempfile::NamedTempFile>,
    mac: HmacSha256,
    path: PathBuf,
    what: String,
}

impl Write for KeptWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.mac.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl KeptWriter {
    /// Appends the MAC and puts the value in place. Failures are logged: the build goes on.
    pub fn keep(self) {
        let KeptWriter { mut out, mac, path, what } = self;
        let stored = out
            .write_all(&mac.finalize())
            .and_then(|_| out.into_inner().map_err(|e| e.into_error()))
            .and_then(|tmp| tmp.persist(&path).map(drop).map_err(|e| e.error));
        if let Err(e) = stored {
            tracing::debug!("not keeping {what} for reuse: {e}");
        }
    }
}

/// The user's reuse key, created (32 random bytes, 0600) on first use.
fn load_or_create_key() -> Result<[u8; 32]> {
    let dir = dirs::state_dir().context("no user state directory (set $XDG_STATE_HOME or $HOME)")?.join("kiln");
    let path = dir.join(KEY_FILE);
    if let Some(key) = read_key(&path)? {
        return Ok(key);
    }
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut key = [0u8; 32];
    fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut key)).context("reading /dev/urandom")?;
    let mut tmp = tempfile::NamedTempFile::new_in(&dir).with_context(|| format!("creating a file in {}", dir.display()))?;
    tmp.as_file().set_permissions(fs::Permissions::from_mode(0o600))?;
    tmp.write_all(&key)?;
    // Two builds at once: the first key written wins, the other build reads it.
    match tmp.persist_noclobber(&path) {
        Ok(_) => Ok(key),
        Err(_) => read_key(&path)?.with_context(|| format!("{} appeared but cannot be read", path.display())),
    }
}

fn read_key(path: &Path) -> Result<Option<[u8; 32]>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(
            bytes
                .try_into()
                .map_err(|_| anyhow::anyhow!("{} is not a 32-byte key: remove it (kept results are then made again)", path.display()))?,
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
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
        let r = Reuse::with_key(d.path(), [7; 32]);
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
    fn a_value_is_used_only_with_its_mac_under_this_key_kind_and_key() {
        let d = tempfile::tempdir().unwrap();
        let r = Reuse::with_key(d.path(), [7; 32]);
        let mut w = r.writer("k", "ab12").unwrap();
        w.write_all(&[5u8; 3 << 20]).unwrap();
        w.keep();
        let mut big = Vec::new();
        r.open("k", "ab12").unwrap().read_to_end(&mut big).unwrap();
        assert_eq!(big, vec![5u8; 3 << 20]);
        // Another user's kiln (another key) does not trust it.
        assert!(Reuse::with_key(d.path(), [8; 32]).get("k", "ab12").is_none());
        // Nor under another key or kind (a value moved or copied).
        let path = d.path().join("reuse/k/ab/ab12");
        fs::create_dir_all(d.path().join("reuse/k/cd")).unwrap();
        fs::copy(&path, d.path().join("reuse/k/cd/cd34")).unwrap();
        assert!(r.get("k", "cd34").is_none());
        // One flipped byte.
        let mut bytes = fs::read(&path).unwrap();
        bytes[1000] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(r.get("k", "ab12").is_none());
        // Nor a truncated or empty file.
        fs::write(&path, b"short").unwrap();
        assert!(r.get("k", "ab12").is_none());
        // A writer dropped without `keep` stores nothing.
        let mut w = r.writer("k", "ef56").unwrap();
        w.write_all(b"half").unwrap();
        drop(w);
        assert!(r.get("k", "ef56").is_none());
        assert!(fs::read_dir(d.path().join("reuse/k/ef")).unwrap().next().is_none());
    }

    #[test]
    fn gc_keeps_the_most_recently_used_within_the_bound() {
        let d = tempfile::tempdir().unwrap();
        let r = Reuse::with_key(d.path(), [7; 32]);
        for (i, key) in ["aa01", "bb02", "cc03"].iter().enumerate() {
            r.put("k", key, &[0u8; 100]);
            let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64);
            fs::File::options().write(true).open(d.path().join(format!("reuse/k/{}/{key}", &key[..2]))).unwrap().set_modified(t).unwrap();
        }
        // A download beside it is never touched.
        fs::create_dir_all(d.path().join("blobs")).unwrap();
        fs::write(d.path().join("blobs/x"), [0u8; 500]).unwrap();
        // Each value is 100 bytes and its 32-byte MAC.
        let report = gc(d.path(), 270).unwrap();
        assert_eq!(report, GcReport { kept_bytes: 264, kept_files: 2, removed_bytes: 132, removed_files: 1 });
        assert!(!d.path().join("reuse/k/aa/aa01").exists() && d.path().join("reuse/k/cc/cc03").exists());
        assert!(d.path().join("blobs/x").exists());
    }
}
