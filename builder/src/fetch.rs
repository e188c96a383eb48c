//! HTTP(S) downloads through the [`Cache`]: verified blobs by digest, mutable documents by key,
//! and an offline mode that only ever reads the cache.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use crate::cache::{Cache, CacheError, Mismatch};

/// Downloads happen at most this many times per file (network errors and 5xx only).
const TRIES: u32 = 3;
/// Documents (InRelease) are small; anything bigger is a wrong response.
const DOCUMENT_LIMIT: u64 = 64 * 1024 * 1024;
/// Below this a progress bar is noise.
const BAR_THRESHOLD: u64 = 1024 * 1024;

pub struct Fetcher {
    pub offline: bool,
    pub cache: Cache,
    /// Show indicatif progress bars (the CLI sets this only on a TTY).
    pub progress: bool,
    /// The CA certificates HTTPS downloads trust (the host's bundle and the profile's).
    pub trust: crate::trust::Trust,
}

/// Why one download attempt failed, and whether trying again can help.
enum Attempt {
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

impl Fetcher {
    /// Returns the cached blob path, downloading and verifying it first when online.
    ///
    /// Offline, a miss or a corrupt blob is an error naming `what`, the url and the fix.
    /// Online, a corrupt cached blob is deleted and fetched again.
    pub fn blob(&self, url: &str, sha256_hex: &str, size: Option<u64>, what: &str) -> anyhow::Result<PathBuf> {
        match self.cache.get(sha256_hex, size) {
            Ok(Some(path)) => return Ok(path),
            Ok(None) if self.offline => bail!(
                "{what} is not in the cache ({url}, sha256 {sha256_hex}); offline mode: \
                 run `kiln fetch PROFILE` on a connected host"
            ),
            Ok(None) => {}
            Err(corrupt @ CacheError::Corrupt { .. }) if self.offline => {
                return Err(anyhow!(corrupt)).with_context(|| format!("{what} ({url}) in offline mode"));
            }
            Err(CacheError::Corrupt { path, expected, actual }) => {
                tracing::warn!(
                    "the cached file is corrupt: {} (expected {expected}, found {actual}); fetching {what} again",
                    path.display()
                );
                self.cache.remove(sha256_hex).with_context(|| format!("removing corrupt {}", path.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("looking up {what} in the cache")),
        }
        with_retries(&self.trust, url, what, |agent| {
            let response = request(agent, url)?;
            let length = response.body().content_length().or(size);
            let reader = response.into_body().into_reader();
            let reader = self.progress_reader(reader, length, what);
            self.cache.put(sha256_hex, size, reader, what).map_err(|e| {
                if e.downcast_ref::<Mismatch>().is_some() {
                    Attempt::Fatal(e.context(format!("verifying {url}")))
                } else {
                    Attempt::Retry(e.context(format!("downloading {url}")))
                }
            })
        })
    }

    /// A mutable document (e.g. InRelease). Online: downloads it and stores it under `key`.
    /// Offline: the stored copy, or an error naming the key and url.
    pub fn document(&self, url: &str, key: &str, what: &str) -> anyhow::Result<Vec<u8>> {
        if self.offline {
            return self.cache.get_ref(key).with_context(|| format!("reading cached {what} (`{key}`)"))?.with_context(|| {
                format!(
                    "{what} is not in the cache (key `{key}`, {url}); offline mode: \
                         run `kiln fetch PROFILE` on a connected host"
                )
            });
        }
        let data = with_retries(&self.trust, url, what, |agent| {
            let response = request(agent, url)?;
            let mut data = Vec::new();
            response
                .into_body()
                .into_reader()
                .take(DOCUMENT_LIMIT + 1)
                .read_to_end(&mut data)
                .map_err(|e| Attempt::Retry(anyhow!(e).context(format!("downloading {url}"))))?;
            if data.len() as u64 > DOCUMENT_LIMIT {
                return Err(Attempt::Fatal(anyhow!("{url} is larger than {DOCUMENT_LIMIT} bytes")));
            }
            Ok(data)
        })?;
        self.cache.put_ref(key, &data)?;
        Ok(data)
    }

    /// Wraps a download in a progress bar (large files, `progress` on) or logs one line, and for
    /// long downloads without a bar (logs, CI) a progress line every [`PROGRESS_LINE_EVERY`].
    pub(crate) fn progress_reader<'r>(&self, reader: impl Read + 'r, length: Option<u64>, what: &str) -> Box<dyn Read + 'r> {
        let big = length.is_none_or(|l| l >= BAR_THRESHOLD);
        if self.progress && big {
            let bar = match length {
                Some(l) => indicatif::ProgressBar::new(l),
                None => indicatif::ProgressBar::no_length(),
            };
            let style = indicatif::ProgressStyle::with_template("{msg:30!} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_message(what.to_string());
            Box::new(BarReader { inner: reader, bar })
        } else {
            match length {
                Some(l) => tracing::info!("downloading {what} ({l} bytes)"),
                None => tracing::info!("downloading {what}"),
            }
            if big {
                Box::new(LineReader { inner: reader, what: what.to_string(), length, done: 0, last: std::time::Instant::now() })
            } else {
                Box::new(reader)
            }
        }
    }
}

/// How often a download without a progress bar logs how far it got.
const PROGRESS_LINE_EVERY: Duration = Duration::from_secs(10);

/// Logs `what: N/M MiB` at most every [`PROGRESS_LINE_EVERY`] while bytes arrive.
struct LineReader<R> {
    inner: R,
    what: String,
    length: Option<u64>,
    done: u64,
    last: std::time::Instant,
}

impl<R: Read> Read for LineReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.last.elapsed() >= PROGRESS_LINE_EVERY {
            self.last = std::time::Instant::now();
            match self.length {
                Some(l) => tracing::info!("{}: {}/{} MiB", self.what, self.done >> 20, l >> 20),
                None => tracing::info!("{}: {} MiB", self.what, self.done >> 20),
            }
        }
        Ok(n)
    }
}

/// Advances a bar as bytes arrive and clears it when dropped (done or failed).
struct BarReader<R> {
    inner: R,
    bar: indicatif::ProgressBar,
}

impl<R: Read> Read for BarReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

impl<R> Drop for BarReader<R> {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// One HTTP client configuration for every download: timeouts, the trusted CAs, and the proxy
/// from `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY` with `NO_PROXY` (ureq reads them by default).
fn agent(trust: &crate::trust::Trust) -> anyhow::Result<ureq::Agent> {
    let tls = ureq::tls::TlsConfig::builder().root_certs(trust.root_certs()?).build();
    Ok(ureq::Agent::config_builder()
        .tls_config(tls)
        .timeout_connect(Some(Duration::from_secs(30)))
        // A stalled transfer is a network error (and retried), not a hang.
        .timeout_recv_body(Some(Duration::from_secs(120)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
        .build()
        .into())
}

fn request(agent: &ureq::Agent, url: &str) -> Result<ureq::http::Response<ureq::Body>, Attempt> {
    agent.get(url).call().map_err(|e| {
        let retry = match &e {
            ureq::Error::StatusCode(code) => *code >= 500 || *code == 429,
            ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::HostNotFound
            | ureq::Error::ConnectionFailed
            | ureq::Error::Protocol(_) => true,
            _ => false,
        };
        let err = match &e {
            ureq::Error::StatusCode(code) => anyhow!("GET {url}: HTTP status {code}"),
            _ => anyhow!(e).context(format!("GET {url}")),
        };
        if retry {
            Attempt::Retry(err)
        } else {
            Attempt::Fatal(err)
        }
    })
}

/// Runs `attempt` up to [`TRIES`] times with 1 s, 2 s backoff while it fails with a retryable error.
fn with_retries<T>(
    trust: &crate::trust::Trust,
    url: &str,
    what: &str,
    mut attempt: impl FnMut(&ureq::Agent) -> Result<T, Attempt>,
) -> anyhow::Result<T> {
    let agent = agent(trust)?;
    let mut try_no = 1;
    loop {
        match attempt(&agent) {
            Ok(v) => return Ok(v),
            Err(Attempt::Fatal(e)) => return Err(e).with_context(|| format!("fetching {what}")),
            Err(Attempt::Retry(e)) if try_no >= TRIES => {
                return Err(e).with_context(|| format!("fetching {what} failed after {TRIES} tries"));
            }
            Err(Attempt::Retry(e)) => {
                let wait = Duration::from_secs(1 << (try_no - 1));
                tracing::warn!("{url}: {e:#}; retrying in {}s", wait.as_secs());
                std::thread::sleep(wait);
                try_no += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// `/ok` serves `body`, `/flaky` fails (500) once then serves, anything else 404.
    fn server(body: &'static [u8]) -> (String, Arc<AtomicUsize>) {
        let mut flaky_failed = false;
        crate::testhttp::serve(move |path| match path {
            "/ok" => ("200 OK", body.to_vec()),
            "/flaky" if !flaky_failed => {
                flaky_failed = true;
                ("500 Internal Server Error", b"no".to_vec())
            }
            "/flaky" => ("200 OK", body.to_vec()),
            _ => ("404 Not Found", b"missing".to_vec()),
        })
    }

    fn fetcher(dir: &tempfile::TempDir, offline: bool) -> Fetcher {
        Fetcher { offline, cache: Cache::new(dir.path().to_path_buf()), progress: false, trust: Default::default() }
    }

    const BODY: &[u8] = b"a package";

    fn digest() -> String {
        hex::encode(Sha256::digest(BODY))
    }

    #[test]
    fn downloads_once_then_hits_cache() {
        let (base, hits) = server(BODY);
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(&dir, false);
        let url = format!("{base}/ok");
        let path = f.blob(&url, &digest(), Some(BODY.len() as u64), "test.deb").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), BODY);
        f.blob(&url, &digest(), Some(BODY.len() as u64), "test.deb").unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 1, "second call served from the cache");
        // Offline works from the cache.
        fetcher(&dir, true).blob(&url, &digest(), None, "test.deb").unwrap();
    }

    #[test]
    fn corrupt_cache_is_refetched_online_and_reported_offline() {
        let (base, hits) = server(BODY);
        let dir = tempfile::tempdir().unwrap();
        let url = format!("{base}/ok");
        let path = fetcher(&dir, false).blob(&url, &digest(), None, "test.deb").unwrap();
        std::fs::write(&path, b"tampered!").unwrap();
        let err = format!("{:#}", fetcher(&dir, true).blob(&url, &digest(), None, "test.deb").unwrap_err());
        assert!(err.contains("the cached file is corrupt") && err.contains("test.deb"), "{err}");
        fetcher(&dir, false).blob(&url, &digest(), None, "test.deb").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), BODY);
        assert_eq!(hits.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn offline_miss_names_what_url_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        let err = fetcher(&dir, true).blob("http://x.invalid/a.deb", &digest(), None, "busybox-static").unwrap_err();
        let err = err.to_string();
        assert!(err.contains("busybox-static") && err.contains("http://x.invalid/a.deb"), "{err}");
        assert!(err.contains("run `kiln fetch PROFILE` on a connected host"), "{err}");
        let err = fetcher(&dir, true).document("http://x.invalid/InRelease", "k/trixie", "InRelease").unwrap_err();
        assert!(err.to_string().contains("`k/trixie`"), "{err}");
    }

    #[test]
    fn not_found_is_not_retried_and_5xx_is() {
        let (base, hits) = server(BODY);
        let dir = tempfile::tempdir().unwrap();
        let f = fetcher(&dir, false);
        let err = format!("{:#}", f.blob(&format!("{base}/gone"), &digest(), None, "gone.deb").unwrap_err());
        assert!(err.contains("404") && err.contains("gone.deb"), "{err}");
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        f.blob(&format!("{base}/flaky"), &digest(), None, "flaky.deb").unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 3, "one 500, then success");
    }

    #[test]
    fn wrong_content_is_rejected() {
        let (base, _) = server(BODY);
        let dir = tempfile::tempdir().unwrap();
        let wrong = hex::encode(Sha256::digest(b"something else"));
        let err = format!("{:#}", fetcher(&dir, false).blob(&format!("{base}/ok"), &wrong, None, "x.deb").unwrap_err());
        assert!(err.contains("x.deb") && err.contains("expected sha256"), "{err}");
    }

    #[test]
    fn documents_are_stored_and_read_offline() {
        let (base, _) = server(BODY);
        let dir = tempfile::tempdir().unwrap();
        let url = format!("{base}/ok");
        assert_eq!(fetcher(&dir, false).document(&url, "m/s/InRelease", "InRelease").unwrap(), BODY);
        assert_eq!(fetcher(&dir, true).document(&url, "m/s/InRelease", "InRelease").unwrap(), BODY);
    }
}
