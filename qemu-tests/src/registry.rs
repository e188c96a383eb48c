//! A real OCI registry for the VM tier: Debian's `docker-registry` (distribution 2.8) on
//! 127.0.0.1 with a minimal config (no auth, no TLS), plus pushing OCI layouts to it with skopeo.
//! Used by the image tests (`oci_images.rs`, `containerd.rs`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use sha2::{Digest, Sha256};

use crate::{free_port, tool};

/// sha256 (hex) of `data`.
pub fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A running `docker-registry serve`; stopped (by its PID) when dropped.
pub struct Registry {
    child: Child,
    pub port: u16,
    pub storage: PathBuf,
    /// Its log (the access log included).
    pub log: PathBuf,
}

/// TLS and basic-auth settings for a registry (see [`Registry::start_secured`]).
pub struct Secured {
    /// The server certificate (PEM, for 127.0.0.1) and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// An htpasswd file (bcrypt entries).
    pub htpasswd: PathBuf,
}

impl Registry {
    /// Starts a registry storing into `dir/registry-storage`; returns once `GET /v2/` answers.
    pub fn start(dir: &Path) -> Result<Registry> {
        Self::start_with(dir, None)
    }

    /// [`Registry::start`] serving HTTPS with `secured.cert` and asking for the htpasswd
    /// credentials; returns once the registry logs that it listens with TLS.
    pub fn start_secured(dir: &Path, secured: &Secured) -> Result<Registry> {
        Self::start_with(dir, Some(secured))
    }

    fn start_with(dir: &Path, secured: Option<&Secured>) -> Result<Registry> {
        let port = free_port()?;
        let storage = dir.join("registry-storage");
        std::fs::create_dir_all(&storage)?;
        let config = dir.join("registry.yml");
        let mut text = format!(
            "version: 0.1\nlog: {{level: info}}\nstorage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\n",
            storage.display()
        );
        match secured {
            None => text.push_str(&format!("http: {{addr: 127.0.0.1:{port}}}\n")),
            Some(s) => text.push_str(&format!(
                "http: {{addr: 127.0.0.1:{port}, tls: {{certificate: {}, key: {}}}}}\nauth: {{htpasswd: {{realm: kiln-test, path: {}}}}}\n",
                s.cert.display(),
                s.key.display(),
                s.htpasswd.display()
            )),
        }
        std::fs::write(&config, text)?;
        let log = dir.join("registry.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting docker-registry (install the `docker-registry` package)")?;
        let r = Registry { child, port, storage, log };
        let started = Instant::now();
        // Plain HTTP is probed; with TLS the registry's own "listening on ..., tls" line is awaited.
        let up = |r: &Registry| match secured {
            None => r.ready(),
            Some(_) => std::fs::read_to_string(&r.log).is_ok_and(|l| l.contains(&format!("listening on 127.0.0.1:{port}, tls"))),
        };
        while !up(&r) {
            ensure!(started.elapsed() < Duration::from_secs(30), "docker-registry did not come up within 30 s; see {}", r.log.display());
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(r)
    }

    pub fn ready(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = write!(s, "GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        let mut head = String::new();
        let _ = s.take(64).read_to_string(&mut head);
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200")
    }

    /// `127.0.0.1:PORT`, as written in image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Blob downloads so far, from the access log (`"GET /v2/<name>/blobs/sha256:..."`).
    pub fn blob_gets(&self) -> Result<usize> {
        let text = std::fs::read_to_string(&self.log)?;
        Ok(text.lines().filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:")).count())
    }

    /// The registry's stored copy of a blob.
    pub fn blob_file(&self, hex: &str) -> PathBuf {
        self.storage.join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pushes tag `1` of the OCI layout `layout` (all platforms, digests kept) to `target`
/// (`host/repository:tag`) over plain HTTP.
pub fn push(layout: &Path, target: &str) -> Result<()> {
    push_as(layout, target, None)
}

/// [`push`] with `user:password` credentials (the test's own registry: its certificate is not
/// checked).
pub fn push_as(layout: &Path, target: &str, creds: Option<&str>) -> Result<()> {
    let mut cmd = Command::new("skopeo");
    cmd.args(["--insecure-policy", "copy", "--all", "--preserve-digests", "--dest-tls-verify=false", "-q"]);
    if let Some(c) = creds {
        cmd.arg("--dest-creds").arg(c);
    }
    tool(cmd.arg(format!("oci:{}:1", layout.display())).arg(format!("docker://{target}")), "skopeo")?;
    Ok(())
}
