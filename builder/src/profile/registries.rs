//! The profile's `registries` key (k3s's registry configuration: mirrors, per-host credentials
//! and TLS): its types and checks, each error naming its key. The profile names files, never
//! secrets. The `registries` module renders `/etc/rancher/k3s/registries.yaml` from it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Profile;

/// k3s's registry configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Registries {
    /// Per registry name as written in image references (`docker.io`, `registry.lan:5000`, or
    /// `"*"` for every registry): the endpoints containerd tries first, in order.
    #[serde(default)]
    pub mirrors: BTreeMap<String, Mirror>,
    /// Per registry host (`host` or `host:port`, as in a mirror endpoint): credentials and TLS.
    #[serde(default)]
    pub configs: BTreeMap<String, RegistryConfig>,
}

/// The endpoints of one mirrored registry.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// Endpoint URLs (`https://mirror.lan:5000`, `http://10.0.0.5:5000`), tried in order; the
    /// registry's own endpoint is tried last.
    pub endpoint: Vec<String>,
    /// Regular expression -> replacement applied to the repository path when pulling through
    /// the endpoints (`"^rancher/(.*)": "mirrored/rancher/$1"`).
    #[serde(default)]
    pub rewrite: BTreeMap<String, String>,
}

/// Credentials and TLS settings for one registry host.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Log in with a user name and a password read from a file.
    #[serde(default)]
    pub auth: Option<Auth>,
    /// TLS settings.
    #[serde(default)]
    pub tls: Option<Tls>,
}

/// Registry credentials.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    pub username: String,
    /// File (relative to the profile) whose first line is the password. The password goes
    /// into `registries.yaml` in the image (mode 0600), never into logs.
    pub password_file: PathBuf,
}

/// TLS settings of a registry host. The files (relative to the profile) are copied into the image.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM CA certificate(s) that sign the registry's certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), with `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM), with `cert_file`; mode 0600 in the image.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Do not verify the registry's certificate.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

fn check_host(host: &str, key: &str) -> Result<()> {
    if host.is_empty() || host.contains(['/', '\\']) || host.contains(char::is_whitespace) || host.starts_with('.') {
        bail!("key `{key}`: `{host}` must be a registry host as written in image references (`host`, `host:port` or `*`), without a scheme or path");
    }
    Ok(())
}

/// Semantic checks (the profile file is named by the caller).
pub fn validate(p: &Profile, base_dir: &Path) -> Result<()> {
    let Some(r) = &p.registries else { return Ok(()) };
    if !p.cluster.as_ref().is_some_and(|c| c.needs_k3s()) {
        bail!("key `registries`: this is k3s's registry configuration, but the profile has no `cluster` whose machines run k3s");
    }
    for (host, m) in &r.mirrors {
        check_host(host, &format!("registries.mirrors.{host}"))?;
        if m.endpoint.is_empty() {
            bail!("key `registries.mirrors.{host}.endpoint`: list at least one endpoint URL");
        }
        for e in &m.endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) || e.contains(char::is_whitespace) {
                bail!("key `registries.mirrors.{host}.endpoint`: `{e}` is not an http:// or https:// URL");
            }
        }
    }
    for (host, c) in &r.configs {
        check_host(host, &format!("registries.configs.{host}"))?;
        let mut files = Vec::new();
        if let Some(a) = &c.auth {
            if a.username.is_empty() {
                bail!("key `registries.configs.{host}.auth.username`: must not be empty");
            }
            files.push(("auth.password_file", &a.password_file));
        }
        if let Some(t) = &c.tls {
            if t.cert_file.is_some() != t.key_file.is_some() {
                bail!("key `registries.configs.{host}.tls`: `cert_file` and `key_file` go together (a client certificate and its key)");
            }
            for (k, f) in [("tls.ca_file", &t.ca_file), ("tls.cert_file", &t.cert_file), ("tls.key_file", &t.key_file)] {
                if let Some(f) = f {
                    files.push((k, f));
                }
            }
        }
        for (k, f) in files {
            let path = base_dir.join(f);
            if !path.is_file() {
                bail!("key `registries.configs.{host}.{k}`: {} does not exist (paths are relative to the profile)", path.display());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{test_parse, test_profile};

    const SERVER: &str = "cluster: {name: lab, nodes: [{name: s1, mac: \"52:54:00:00:00:01\", roles: [server]}]}\n";

    #[test]
    fn registries_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let check = |extra: &str, reg: &str| {
            let p = test_profile(&format!("{extra}registries:\n{reg}"));
            validate(&p, d.path()).map(|_| ()).map_err(|e| e.to_string())
        };
        let ok_reg = "  mirrors: {docker.io: {endpoint: [\"https://m.lan\"]}}\n";
        assert!(check("", ok_reg).unwrap_err().contains("no `cluster`"));
        check(SERVER, ok_reg).unwrap();
        assert!(check(SERVER, "  mirrors: {docker.io: {endpoint: [\"m.lan\"]}}\n").unwrap_err().contains("not an http:// or https:// URL"));
        assert!(check(SERVER, "  configs: {\"r:5000\": {auth: {username: u, password_file: nope}}}\n")
            .unwrap_err()
            .contains("registries.configs.r:5000.auth.password_file"));
        assert!(check(SERVER, "  configs: {\"r:5000\": {tls: {cert_file: c.pem}}}\n").unwrap_err().contains("go together"));
        assert!(check(SERVER, "  configs: {\"https://r\": {}}\n").unwrap_err().contains("without a scheme"));
        // Passwords are never written inline in the profile.
        assert!(test_parse("registries: {configs: {r: {auth: {username: u, password: p}}}}\n").is_err());
    }
}
