//! Container images from OCI registries (profile key `images`): pulled once per target
//! architecture, verified and cached by digest ([`pull`]), then bundled per architecture into
//! one OCI image layout archive ([`layout`]) that k3s imports at boot.
//!
//! The archive lives in the read-only root under `/usr/lib/kiln/images/` (an update brings its
//! own; first boot copies nothing onto the data partition); k3s's images directory gets a
//! symlink to it, like the k3s air-gap archive.

pub mod auth;
pub mod base;
pub mod flatten;
pub mod chart;
pub mod layout;
pub mod manifest;
pub mod pull;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::arch::Arch;
use crate::profile::containers::Engine;
use crate::manifest::Input;
use crate::profile::Profile;
use crate::tree::{Content, Entry, Kind, Meta, Tree, TreePath};

/// Where the archives really live (read-only root).
pub const ARCHIVE_DIR: &str = "usr/lib/kiln/images";

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
    /// in `$REGISTRY_AUTH_FILE` or `~/.docker/config.json` (inline `auth` entries), else
    /// anonymous pulls.
    #[serde(default)]
    pub username: Option<String>,
    /// File whose first line is the password or token for `username` (relative to the
    /// profile). Never logged and never put into the image.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// One pulled image for one architecture: the reference as the profile wrote it (normalised),
/// the digest the reference resolved to, and the platform's manifest with its blobs (all in
/// the cache, verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Normalised reference (`docker.io/library/busybox:1.36`).
    pub reference: String,
    /// What the reference resolved to: the index (multi-arch) or manifest digest.
    pub resolved: String,
    /// The platform's image manifest.
    pub manifest: manifest::Descriptor,
    /// Config first, then the layers in order.
    pub blobs: Vec<manifest::Descriptor>,
}

impl Image {
    /// Manifest, config and layers: every blob of the image.
    pub fn all_blobs(&self) -> impl Iterator<Item = &manifest::Descriptor> {
        std::iter::once(&self.manifest).chain(&self.blobs)
    }

    /// The layers, bottom first.
    pub fn layers(&self) -> &[manifest::Descriptor] {
        self.blobs.get(1..).unwrap_or_default()
    }
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

/// The archive's file name for an architecture: zstd-compressed for k3s, a plain tar for
/// containerd (see [`layout::write_archive`]).
pub fn archive_name(arch: Arch, engine: Engine) -> String {
    match engine {
        Engine::K3s => format!("kiln-images-{}.tar.zst", arch.debian()),
        Engine::Containerd => format!("kiln-images-{}.tar", arch.debian()),
    }
}

/// Puts the archive (a file on the host, read when the squashfs is written) into the root:
/// for k3s with the symlink k3s imports it through; for containerd with `<archive>.sha256`,
/// its digest, which the appliance's `images-import` records once imported (later boots with
/// the same archive import nothing).
pub fn place(archive: &Path, arch: Arch, engine: Engine, root: &mut Tree) -> Result<()> {
    let name = archive_name(arch, engine);
    let path = format!("{ARCHIVE_DIR}/{name}");
    root.insert(
        &TreePath::parse(&path)?,
        Entry { meta: Meta::root(0o644), kind: Kind::File(Content::HostFile(archive.to_path_buf())) },
    )?;
    match engine {
        Engine::K3s => {
            root.add_symlink(&format!("{}/{name}", crate::k3s::IMAGES_DIR), &format!("/{path}"))?;
        }
        Engine::Containerd => {
            let sha = crate::cache::sha256_file(archive)?;
            root.add_file(&format!("{path}.sha256"), 0o644, format!("{sha}\n"))?;
        }
    }
    Ok(())
}

/// The manifest's records (kind `oci`): the reference, what it resolved to, and the platform
/// manifest's digest and size.
pub fn manifest_inputs(images: &[Image]) -> Vec<Input> {
    images
        .iter()
        .map(|i| Input {
            kind: "oci".into(),
            name: i.reference.clone(),
            version: Some(i.resolved.clone()),
            sha256: i.manifest.hex().to_string(),
            size: Some(i.manifest.size),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_need_a_cluster_and_no_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = "cluster: {name: lab, nodes: [{name: s1, mac: \"52:54:00:00:00:01\", roles: [server]}]}\n";
        let p = crate::profile::parse("name: d\narch: [x86_64]\nimages: [busybox:1.36]\n").unwrap();
        assert!(validate(&p, dir.path()).unwrap_err().to_string().contains("needs `cluster`"));
        let p = crate::profile::parse(&format!("name: d\narch: [x86_64]\nimages: [busybox:1.36, docker.io/library/busybox:1.36]\n{cluster}")).unwrap();
        assert!(validate(&p, dir.path()).unwrap_err().to_string().contains("same image as `images[0]`"));
        let p = crate::profile::parse(&format!("name: d\narch: [x86_64]\nimages: [busybox:1.36]\nimage_registries: {{\"r:5000\": {{username: u}}}}\n{cluster}")).unwrap();
        assert!(validate(&p, dir.path()).unwrap_err().to_string().contains("go together"));
        let p = crate::profile::parse(&format!("name: d\narch: [x86_64]\nimages: [busybox:1.36]\nimage_registries: {{\"r:5000\": {{ca_file: nope.pem}}}}\n{cluster}")).unwrap();
        assert!(validate(&p, dir.path()).unwrap_err().to_string().contains("image_registries.r:5000.ca_file"));
        let p = crate::profile::parse(&format!("name: d\narch: [x86_64]\nimages: [busybox:1.36]\nimage_registries: {{\"r:5000\": {{insecure_http: true}}}}\n{cluster}")).unwrap();
        validate(&p, dir.path()).unwrap();
    }
}
