//! The download cache: content-addressed blobs (`blobs/sha256/<hex>`) and named documents (`refs/<key>`),
//! both written atomically so an interrupted download never leaves a file that looks complete.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::{Digest, Sha256};

use crate::digest::sha256_file;

/// Cache failures callers branch on (a corrupt blob is refetched online, reported offline).
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("the cached file is corrupt: {path} (expected {expected}, found {actual})")]
    Corrupt { path: PathBuf, expected: String, actual: String },
    #[error("not a sha256 hex digest: {0:?}")]
    BadDigest(String),
    #[error("reading cached file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Content that did not match its expected digest or size while being stored.
#[derive(Debug, thiserror::Error)]
#[error("{what}: expected {expected}, got {actual}")]
pub struct Mismatch {
    pub what: String,
    pub expected: String,
    pub actual: String,
}

#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

const BUF: usize = 256 * 1024;

impl Cache {
    pub fn new(root: PathBuf) -> Self {
        Cache { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `$KILN_CACHE_DIR`, else the user's cache dir (`dirs::cache_dir()`) + `/kiln`.
    pub fn default_root() -> anyhow::Result<PathBuf> {
        if let Some(dir) = std::env::var_os("KILN_CACHE_DIR").filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(dir));
        }
        let base = dirs::cache_dir().context("no user cache directory (set $KILN_CACHE_DIR or $XDG_CACHE_HOME/$HOME)")?;
        Ok(base.join("kiln"))
    }

    fn blob_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    /// Where a blob with this digest lives (whether or not it exists).
    pub fn blob_path(&self, sha256_hex: &str) -> Result<PathBuf, CacheError> {
        Ok(self.blob_dir().join(check_digest(sha256_hex)?))
    }

    /// The path of a blob if present and its sha256 (and size, if given) verify.
    /// A present but wrong blob is `Err(CacheError::Corrupt)`.
    pub fn get(&self, sha256_hex: &str, size: Option<u64>) -> Result<Option<PathBuf>, CacheError> {
        let path = self.blob_path(sha256_hex)?;
        let io_err = |source| CacheError::Io { path: path.clone(), source };
        let meta = match fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        // The size check is free; do it before hashing a possibly large file.
        if let Some(size) = size.filter(|s| *s != meta.len()) {
            return Err(CacheError::Corrupt {
                path: path.clone(),
                expected: format!("{size} bytes"),
                actual: format!("{} bytes", meta.len()),
            });
        }
        let actual = sha256_file(&path).map_err(io_err)?;
        if actual != sha256_hex.to_ascii_lowercase() {
            return Err(CacheError::Corrupt { path, expected: format!("sha256 {sha256_hex}"), actual: format!("sha256 {actual}") });
        }
        Ok(Some(path))
    }

    /// Streams `reader` into the cache, hashing while writing; verifies digest and size, fsyncs and
    /// renames into place. On any failure nothing is left behind; errors name `what`, and a digest
    /// or size mismatch is a [`Mismatch`] (downcastable) so callers can tell it from a read error.
    pub fn put(&self, sha256_hex: &str, size: Option<u64>, reader: impl Read, what: &str) -> anyhow::Result<PathBuf> {
        let mut w = self.writer(sha256_hex, size, what)?;
        match copy_into(reader, &mut w) {
            // More than `size` bytes: reported as the size mismatch it is, below.
            Err(_) if w.over_limit() => {}
            Err(e) => return Err(e).with_context(|| format!("downloading {what}")),
            Ok(()) => {}
        }
        w.check()?;
        w.persist()
    }

    /// A blob to be written in pieces (a download that is also read by someone else, as the
    /// layer check of `oci::pull` does): [`BlobWriter::persist`] verifies and stores it.
    pub fn writer(&self, sha256_hex: &str, size: Option<u64>, what: &str) -> anyhow::Result<BlobWriter> {
        let final_path = self.blob_path(sha256_hex)?;
        let dir = self.blob_dir();
        let (file, path) = temp_file_in(&dir)?.into_parts();
        Ok(BlobWriter {
            file: io::BufWriter::with_capacity(BUF, file),
            path,
            final_path,
            dir,
            expected: sha256_hex.to_ascii_lowercase(),
            size,
            hasher: Sha256::new(),
            written: 0,
            what: what.to_string(),
        })
    }

    /// Opens a blob for one streaming read that is verified as it goes: see [`VerifiedBlob`].
    /// `Ok(None)` if the blob is not in the cache.
    ///
    /// Readers that use a blob after the pull (flattening, bundling) go through this rather than
    /// re-opening [`Cache::blob_path`]: a shared cache's file may have been replaced since it was
    /// verified, and the bytes read are the ones checked.
    pub fn open(&self, sha256_hex: &str, size: u64) -> Result<Option<VerifiedBlob>, CacheError> {
        let path = self.blob_path(sha256_hex)?;
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(CacheError::Io { path, source }),
        };
        Ok(Some(VerifiedBlob {
            file,
            path,
            expected: sha256_hex.to_ascii_lowercase(),
            size,
            hasher: Sha256::new(),
            read: 0,
            verdict: None,
        }))
    }

    pub fn remove(&self, sha256_hex: &str) -> io::Result<()> {
        let path = self.blob_path(sha256_hex).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        match fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Where a named entry lives: a readable slug plus a hash of the whole key, so any key
    /// (URLs included) maps to one safe file name inside `refs/`.
    pub fn ref_path(&self, key: &str) -> PathBuf {
        self.root.join("refs").join(ref_file_name(key))
    }

    /// A named, mutable entry (e.g. a mirror's InRelease), if stored.
    pub fn get_ref(&self, key: &str) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.ref_path(key)) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replaces a named entry atomically (temp file, fsync, rename).
    pub fn put_ref(&self, key: &str, data: &[u8]) -> anyhow::Result<()> {
        let path = self.ref_path(key);
        let dir = self.root.join("refs");
        let mut tmp = temp_file_in(&dir)?;
        tmp.write_all(data).and_then(|()| tmp.as_file().sync_all()).with_context(|| format!("writing cache entry `{key}`"))?;
        tmp.persist(&path).with_context(|| format!("storing cache entry `{key}` as {}", path.display()))?;
        sync_dir(&dir);
        Ok(())
    }
}

/// A temporary file beside its final name (same filesystem, so the rename is atomic).
fn temp_file_in(dir: &Path) -> anyhow::Result<tempfile::NamedTempFile> {
    fs::create_dir_all(dir).with_context(|| format!("creating cache directory {}", dir.display()))?;
    tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir).with_context(|| format!("creating a temporary file in {}", dir.display()))
}

/// Copies `reader` into a blob writer, `BUF` bytes at a time.
fn copy_into(mut reader: impl Read, w: &mut BlobWriter) -> io::Result<()> {
    let mut buf = vec![0u8; BUF];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => w.write_all(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// A blob being written into the cache: what is written is hashed and counted. Writing more than
/// the expected size fails at once (as a size mismatch for [`BlobWriter::check`] to report), so a
/// wrong server response cannot fill the disk. Dropped without [`BlobWriter::persist`], it leaves
/// nothing behind.
pub struct BlobWriter {
    file: io::BufWriter<File>,
    path: tempfile::TempPath,
    final_path: PathBuf,
    dir: PathBuf,
    expected: String,
    size: Option<u64>,
    hasher: Sha256,
    written: u64,
    what: String,
}

impl BlobWriter {
    /// More bytes arrived than the expected size.
    pub fn over_limit(&self) -> bool {
        self.size.is_some_and(|s| self.written > s)
    }

    /// Do the bytes written so far match the expected size and digest? A [`Mismatch`] if not.
    pub fn check(&self) -> anyhow::Result<()> {
        if let Some(size) = self.size.filter(|s| *s != self.written) {
            return Err(
                Mismatch { what: self.what.clone(), expected: format!("{size} bytes"), actual: format!("{} bytes", self.written) }.into()
            );
        }
        let actual = hex::encode(self.hasher.clone().finalize());
        if actual != self.expected {
            return Err(Mismatch {
                what: self.what.clone(),
                expected: format!("sha256 {}", self.expected),
                actual: format!("sha256 {actual}"),
            }
            .into());
        }
        Ok(())
    }

    /// Checks the blob, then fsyncs it and renames it into place; returns its path.
    pub fn persist(self) -> anyhow::Result<PathBuf> {
        self.check()?;
        let what = &self.what;
        let file =
            self.file.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {what} to {}", self.dir.display()))?;
        file.sync_all().with_context(|| format!("syncing {what} to {}", self.dir.display()))?;
        self.path.persist(&self.final_path).with_context(|| format!("storing {what} as {}", self.final_path.display()))?;
        sync_dir(&self.dir);
        Ok(self.final_path)
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len() as u64;
        if let Some(size) = self.size.filter(|_| self.over_limit()) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{}: more than the expected {size} bytes", self.what)));
        }
        self.hasher.update(buf);
        self.file.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// A cached blob opened once and verified while it is read: what is read is hashed and counted,
/// and the read that reaches the expected size fails (its bytes withheld) unless the digest
/// matches; so does a file that ends early or runs on. The whole stream is only good once a read
/// has returned the end (`Ok(0)`) or [`VerifiedBlob::finish`] has succeeded: a consumer that
/// stops early (a tar reader at the end-of-archive blocks) calls `finish`, which reads the rest.
pub struct VerifiedBlob {
    file: File,
    path: PathBuf,
    expected: String,
    size: u64,
    hasher: Sha256,
    read: u64,
    /// Set once the expected size is reached: `Err` (kept, so every later read fails the same
    /// way) if the bytes were not the expected ones.
    verdict: Option<Result<(), CacheError>>,
}

impl VerifiedBlob {
    fn corrupt(&self, actual: String) -> CacheError {
        CacheError::Corrupt { path: self.path.clone(), expected: format!("sha256 {}, {} bytes", self.expected, self.size), actual }
    }

    fn conclude(&mut self) {
        let actual = hex::encode(self.hasher.clone().finalize());
        self.verdict = Some(if actual == self.expected { Ok(()) } else { Err(self.corrupt(format!("sha256 {actual}"))) });
    }

    fn failed(&self) -> Option<io::Error> {
        match &self.verdict {
            Some(Err(CacheError::Corrupt { path, expected, actual })) => Some(io::Error::new(
                io::ErrorKind::InvalidData,
                CacheError::Corrupt { path: path.clone(), expected: expected.clone(), actual: actual.clone() },
            )),
            _ => None,
        }
    }

    /// Reads what is left and returns the verdict: `Err(CacheError::Corrupt)` if the bytes read
    /// (by the consumer and here) were not the blob's.
    pub fn finish(mut self) -> Result<(), CacheError> {
        let mut buf = vec![0u8; BUF];
        loop {
            match self.read(&mut buf) {
                Ok(0) => return self.verdict.unwrap_or(Ok(())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(match self.verdict {
                        Some(Err(c)) => c,
                        _ => CacheError::Io { path: self.path, source: e },
                    })
                }
            }
        }
    }
}

impl Read for VerifiedBlob {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(e) = self.failed() {
            return Err(e);
        }
        let n = self.file.read(buf).map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", self.path.display())))?;
        if n == 0 {
            if self.read < self.size {
                self.verdict = Some(Err(self.corrupt(format!("{} bytes", self.read))));
                return Err(self.failed().expect("just set"));
            }
            if self.verdict.is_none() {
                self.conclude(); // an empty blob
            }
            return self.failed().map_or(Ok(0), Err);
        }
        self.read += n as u64;
        if self.read > self.size {
            self.verdict = Some(Err(self.corrupt(format!("more than {} bytes", self.size))));
            return Err(self.failed().expect("just set"));
        }
        self.hasher.update(&buf[..n]);
        if self.read == self.size {
            self.conclude();
            if let Some(e) = self.failed() {
                return Err(e);
            }
        }
        Ok(n)
    }
}

fn check_digest(sha256_hex: &str) -> Result<String, CacheError> {
    if sha256_hex.len() == 64 && sha256_hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        Ok(sha256_hex.to_ascii_lowercase())
    } else {
        Err(CacheError::BadDigest(sha256_hex.to_string()))
    }
}

fn ref_file_name(key: &str) -> String {
    let slug: String = key
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' })
        .collect::<String>()
        .trim_matches(|c| c == '.' || c == '_')
        .chars()
        .rev()
        .take(80) // the end of a key (suite, file name) is the readable part
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let hash = crate::digest::sha256_hex(key.as_bytes());
    format!("{slug}-{}", &hash[..32])
}

/// Makes a rename durable; best effort, as not every filesystem supports syncing directories.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    fn leftovers(cache: &Cache) -> Vec<String> {
        fs::read_dir(cache.blob_dir())
            .map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn put_get_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_path_buf());
        let data = b"hello kiln".repeat(100_000);
        let digest = sha(&data);
        assert!(cache.get(&digest, None).unwrap().is_none());
        let path = cache.put(&digest, Some(data.len() as u64), &data[..], "test blob").unwrap();
        assert_eq!(path, dir.path().join("blobs/sha256").join(&digest));
        assert_eq!(fs::read(&path).unwrap(), data);
        assert_eq!(cache.get(&digest, Some(data.len() as u64)).unwrap(), Some(path.clone()));
        assert_eq!(cache.get(&digest.to_uppercase(), None).unwrap(), Some(path));
        assert_eq!(sha256_file(&dir.path().join("blobs/sha256").join(&digest)).unwrap(), digest);
        cache.remove(&digest).unwrap();
        assert!(cache.get(&digest, None).unwrap().is_none());
        cache.remove(&digest).unwrap();
    }

    #[test]
    fn mismatch_leaves_nothing_and_names_what() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_path_buf());
        let err = cache.put(&sha(b"other"), None, &b"data"[..], "busybox.deb").unwrap_err();
        assert!(err.downcast_ref::<Mismatch>().is_some());
        assert!(err.to_string().contains("busybox.deb"), "{err}");
        let err = cache.put(&sha(b"data"), Some(5), &b"data"[..], "x.deb").unwrap_err();
        assert!(err.to_string().contains("expected 5 bytes, got 4 bytes"), "{err}");
        // Oversized input stops early and is rejected.
        let err = cache.put(&sha(b"data"), Some(2), &b"data"[..], "x.deb").unwrap_err();
        assert!(err.downcast_ref::<Mismatch>().is_some(), "{err}");
        assert!(leftovers(&cache).is_empty(), "{:?}", leftovers(&cache));
    }

    #[test]
    fn corrupt_blob_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_path_buf());
        let digest = sha(b"good");
        let path = cache.put(&digest, None, &b"good"[..], "t").unwrap();
        fs::write(&path, b"evil").unwrap();
        match cache.get(&digest, None) {
            Err(CacheError::Corrupt { path: p, .. }) => assert_eq!(p, path),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        fs::write(&path, b"longer").unwrap();
        let err = cache.get(&digest, Some(4)).unwrap_err();
        assert!(err.to_string().contains("corrupt") && err.to_string().contains("4 bytes"), "{err}");
    }

    /// `open` reads each byte once and checks it: the read that completes a changed blob fails
    /// with its bytes withheld, and a shorter, longer or changed file fails `finish`.
    #[test]
    fn opened_blobs_are_verified_as_they_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_path_buf());
        let good = b"layer".repeat(100_000);
        let digest = sha(&good);
        let path = cache.put(&digest, None, &good[..], "t").unwrap();
        let size = good.len() as u64;
        let mut read = Vec::new();
        cache.open(&digest, size).unwrap().unwrap().read_to_end(&mut read).unwrap();
        assert_eq!(read, good);
        cache.open(&digest, size).unwrap().unwrap().finish().unwrap();
        assert!(cache.open(&sha(b"absent"), 1).unwrap().is_none());
        let empty = sha(b"");
        cache.put(&empty, Some(0), &b""[..], "t").unwrap();
        cache.open(&empty, 0).unwrap().unwrap().finish().unwrap();

        let mut changed = good.clone();
        changed[good.len() - 1] ^= 1;
        for (bad, why) in [(changed, "sha256 "), (good[..10].to_vec(), "10 bytes"), ([&good[..], b"+"].concat(), "more than")] {
            fs::write(&path, &bad).unwrap();
            let mut blob = cache.open(&digest, size).unwrap().unwrap();
            let mut seen = Vec::new();
            let err = blob.read_to_end(&mut seen).unwrap_err();
            assert!(err.to_string().contains("corrupt") && err.to_string().contains(why), "{err}");
            assert!(seen.len() < good.len(), "the bytes of the read that reached the size were handed out");
            let err = cache.open(&digest, size).unwrap().unwrap().finish().unwrap_err();
            assert!(matches!(err, CacheError::Corrupt { .. }) && err.to_string().contains(why), "{err}");
        }
    }

    #[test]
    fn bad_digests_are_rejected() {
        let cache = Cache::new(PathBuf::from("/nonexistent"));
        for bad in ["../../etc/passwd", "", &"g".repeat(64), &"a".repeat(63)] {
            assert!(matches!(cache.get(bad, None), Err(CacheError::BadDigest(_))), "{bad}");
        }
    }

    #[test]
    fn refs_are_atomic_and_keys_safe() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_path_buf());
        let key = "http://mirror.example/debian/trixie/InRelease";
        assert_eq!(cache.get_ref(key).unwrap(), None);
        cache.put_ref(key, b"one").unwrap();
        cache.put_ref(key, b"two").unwrap();
        assert_eq!(cache.get_ref(key).unwrap().as_deref(), Some(&b"two"[..]));
        for evil in ["../../escape", "/abs/path", "..", "a/../../b"] {
            cache.put_ref(evil, b"x").unwrap();
            let path = cache.ref_path(evil);
            assert_eq!(path.parent().unwrap(), dir.path().join("refs"), "{evil}");
            assert!(!path.file_name().unwrap().to_string_lossy().starts_with('.'), "{evil}");
        }
        assert_ne!(cache.ref_path("a/b"), cache.ref_path("a_b"), "different keys, different files");
        let names: Vec<_> = fs::read_dir(dir.path().join("refs")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 5, "no temp files left: {names:?}");
        assert!(cache.ref_path(key).to_string_lossy().contains("debian_trixie_InRelease"));
    }

    #[test]
    fn default_root_honours_env() {
        // Only read here: set by the test runner if at all; check the fallback shape instead of mutating env.
        let root = Cache::default_root().unwrap();
        match std::env::var_os("KILN_CACHE_DIR").filter(|d| !d.is_empty()) {
            Some(d) => assert_eq!(root, PathBuf::from(d)),
            None => assert!(root.ends_with("kiln"), "{}", root.display()),
        }
    }
}
