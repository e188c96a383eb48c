//! The profile's `images` (container images bundled into the appliance) and `image_registries`
//! (pull options per registry host): the options' type and the checks of both keys, each error
//! naming its key. `oci` pulls and bundles the images.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::containers::Engine;
use super::Profile;

/// Pull options for one registry, keyed by its host as written in image references
/// (`registry.example:5000`, `docker.io`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// Talk plain HTTP to this registry (a local registry without TLS). Only the hosts named
    /// here with `insecure_http: true` are ever spoken to without TLS.
    #[serde(default)]
    pub insecure_http: bool,
    /// A PEM file of CA certificates to trust (besides the system's) for this registry's TLS.
    /// Relative paths are relative to the profile. (The registry client has one trust store, so
    /// while kiln pulls, these certificates are trusted for every registry of the profile.)
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// User name to log in with (needs `password_file`). Absent: the credentials for this host
    /// in `$REGISTRY_AUTH_FILE` or `~/.docker/config.json` (as Docker reads them: `credHelpers`,
    /// inline `auths`, `credsStore`, running `docker-credential-<name>`), else anonymous pulls.
    #[serde(default)]
    pub username: Option<String>,
    /// File whose first line is the password or token for `username` (relative to the
    /// profile). Never logged and never put into the image.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// Semantic checks of `images` and `image_registries` (the profile file is named by the caller).
pub fn validate(p: &Profile, base_dir: &Path) -> Result<()> {
    let mut seen = BTreeMap::new();
    for (i, r) in p.images.iter().enumerate() {
        if let Some(j) = seen.insert(r.whole(), i) {
            bail!("key `images[{i}]`: `{}` is the same image as `images[{j}]` ({r})", r.as_str());
        }
    }
    if !p.images.is_empty() && p.cluster.is_none() && p.engine == Engine::K3s {
        bail!("key `images`: with the default engine the bundled images are imported by k3s, so `images` needs `cluster`; for containers without Kubernetes set `engine: containerd`");
    }
    for (host, r) in &p.image_registries {
        if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
            bail!("key `image_registries.{host}`: must be a registry host as written in image references (`host` or `host:port`)");
        }
        match (&r.username, &r.password_file) {
            (Some(_), None) | (None, Some(_)) => {
                bail!("key `image_registries.{host}`: `username` and `password_file` go together")
            }
            _ => {}
        }
        for (key, f) in [("ca_file", &r.ca_file), ("password_file", &r.password_file)] {
            if let Some(f) = f {
                let path = base_dir.join(f);
                if !path.is_file() {
                    bail!("key `image_registries.{host}.{key}`: {} does not exist (paths are relative to the profile)", path.display());
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::test_profile;

    fn profile(extra: &str) -> Profile {
        test_profile(&format!("images: [busybox:1.36]\n{extra}"))
    }

    #[test]
    fn images_need_a_cluster_and_no_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = "cluster: {name: lab, nodes: [{name: s1, mac: \"52:54:00:00:00:01\", roles: [server]}]}\n";
        let p = test_profile("images: [busybox:1.36]\n");
        assert!(validate(&p, dir.path()).unwrap_err().to_string().contains("needs `cluster`"));
        let p = test_profile(&format!("images: [busybox:1.36, docker.io/library/busybox:1.36]\n{cluster}"));
        assert!(validate(&p, dir.path()).unwrap_err().to_string().contains("same image as `images[0]`"));
        let p = test_profile(&format!("images: [busybox:1.36]\nimage_registries: {{\"r:5000\": {{username: u}}}}\n{cluster}"));
        assert!(validate(&p, dir.path()).unwrap_err().to_string().contains("go together"));
        let p = test_profile(&format!("images: [busybox:1.36]\nimage_registries: {{\"r:5000\": {{ca_file: nope.pem}}}}\n{cluster}"));
        assert!(validate(&p, dir.path()).unwrap_err().to_string().contains("image_registries.r:5000.ca_file"));
        let p = test_profile(&format!("images: [busybox:1.36]\nimage_registries: {{\"r:5000\": {{insecure_http: true}}}}\n{cluster}"));
        validate(&p, dir.path()).unwrap();
    }

    #[test]
    fn images_need_a_cluster_only_with_k3s() {
        let dir = tempfile::tempdir().unwrap();
        validate(&profile("engine: containerd\n"), dir.path()).unwrap();
        let e = format!("{:#}", validate(&profile(""), dir.path()).unwrap_err());
        assert!(e.contains("needs `cluster`") && e.contains("engine: containerd"), "{e}");
    }
}
