//! Registry credentials: from the profile (`image_registries.HOST.username` + `password_file`),
//! else from the standard container auth files (`$REGISTRY_AUTH_FILE`, then
//! `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`), else anonymous. Only inline `auth`
//! (or `username`/`password`) entries are read: credential helpers (`credsStore`) are not run.
//! Secrets never reach a log: [`Credentials`] prints the user name only.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use base64::Engine;
use serde::Deserialize;

/// A user name and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The host part of an auths key: keys may be `host`, `host:port`, `https://host/v1/` ...
fn key_host(key: &str) -> &str {
    let k = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

/// The names Docker Hub goes by in auth files.
fn same_registry(a: &str, b: &str) -> bool {
    let hub = |h: &str| matches!(h, "docker.io" | "index.docker.io" | "registry-1.docker.io");
    a == b || (hub(a) && hub(b))
}

/// Looks `registry` up in an auth file's text. `origin` names the file in errors.
pub fn lookup(text: &str, registry: &str, origin: &str) -> Result<Option<Credentials>> {
    let file: AuthFile = serde_json::from_str(text).map_err(|e| anyhow!("{origin} is not a container auth file: {e}"))?;
    let Some((key, entry)) = file.auths.iter().find(|(k, _)| same_registry(key_host(k), registry)) else {
        return Ok(None);
    };
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(Some(Credentials { username: u.clone(), password: p.clone() }));
    }
    let Some(auth) = &entry.auth else { return Ok(None) };
    let bad = || anyhow!("{origin}: `auths.{key}.auth` is not base64 of `user:password`");
    let decoded = base64::engine::general_purpose::STANDARD.decode(auth.trim()).map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    let (u, p) = decoded.split_once(':').ok_or_else(bad)?;
    Ok(Some(Credentials { username: u.to_string(), password: p.to_string() }))
}

/// The auth files consulted, in order: `$REGISTRY_AUTH_FILE`, then Docker's config.
pub fn auth_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|f| !f.is_empty()) {
        files.push(PathBuf::from(f));
    }
    match std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        Some(d) => files.push(Path::new(&d).join("config.json")),
        None => {
            if let Some(home) = dirs::home_dir() {
                files.push(home.join(".docker/config.json"));
            }
        }
    }
    files
}

/// Credentials for `registry` from the first auth file that has an entry for it.
pub fn from_auth_files(registry: &str) -> Result<Option<Credentials>> {
    for f in auth_files() {
        let text = match std::fs::read_to_string(&f) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading registry credentials {}", f.display())),
        };
        if let Some(c) = lookup(&text, registry, &f.display().to_string())? {
            tracing::info!("registry {registry}: credentials of user `{}` from {}", c.username, f.display());
            return Ok(Some(c));
        }
    }
    Ok(None)
}

/// Credentials from the profile: `username` and the first line of `password_file`.
pub fn from_profile(registry: &str, username: &str, password_file: &Path) -> Result<Credentials> {
    let text = std::fs::read_to_string(password_file)
        .with_context(|| format!("key `image_registries.{registry}.password_file`: reading {}", password_file.display()))?;
    let password = text.lines().next().unwrap_or("").to_string();
    if password.is_empty() {
        anyhow::bail!("key `image_registries.{registry}.password_file`: {} is empty", password_file.display());
    }
    Ok(Credentials { username: username.to_string(), password })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_entries_decode_by_host() {
        let text = r#"{"auths": {
            "registry.example:5000": {"auth": "YWxpY2U6czNjcmV0"},
            "https://index.docker.io/v1/": {"username": "bob", "password": "hunter2"}
        }, "credsStore": "desktop"}"#;
        let c = lookup(text, "registry.example:5000", "f").unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("alice", "s3cret"));
        let c = lookup(text, "docker.io", "f").unwrap().unwrap();
        assert_eq!(c.username, "bob");
        assert!(lookup(text, "registry.example", "f").unwrap().is_none(), "the port is part of the host");
        assert!(!format!("{c:?}").contains("hunter2"), "Debug never shows the password");
    }

    #[test]
    fn malformed_auth_files_are_named() {
        let err = lookup("{\"auths\": {\"r\": {\"auth\": \"!!\"}}}", "r", "/x/config.json").unwrap_err().to_string();
        assert!(err.contains("/x/config.json") && err.contains("auths.r.auth"), "{err}");
        assert!(lookup("{\"auths\": 5}", "r", "/x/config.json").unwrap_err().to_string().contains("/x/config.json"));
    }
}
