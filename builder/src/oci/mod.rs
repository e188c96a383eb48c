//! Container images from OCI registries (profile key `images`): pulled once per target
//! architecture, verified and cached by digest ([`pull`]), then bundled per architecture into
//! one OCI image layout archive ([`layout`]) that k3s imports at boot.
//!
//! The archive lives in the read-only root under `/usr/lib/kiln/images/` (an update brings its
//! own; first boot copies nothing onto the data partition); k3s's images directory gets a
//! symlink to it, like the k3s air-gap archive.
//!
//! The `images` and `image_registries` keys' types and checks are in `profile::images`.

pub mod auth;
pub mod base;
pub mod chart;
pub mod flatten;
pub mod layout;
pub mod manifest;
pub mod pull;

use std::path::Path;

use anyhow::{Context, Result};

use crate::arch::Arch;
use crate::manifest::{Input, InputKind};
use crate::profile::containers::Engine;
use crate::tree::{Content, Entry, Kind, Meta, Tree, TreePath};

/// Where the archives really live (read-only root).
pub const ARCHIVE_DIR: &str = "usr/lib/kiln/images";

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
    root.insert(&TreePath::parse(&path)?, Entry { meta: Meta::root(0o644), kind: Kind::File(Content::HostFile(archive.to_path_buf())) })?;
    match engine {
        Engine::K3s => {
            root.add_symlink(&format!("{}/{name}", crate::k3s::IMAGES_DIR), &format!("/{path}"))?;
        }
        Engine::Containerd => {
            let sha = crate::digest::sha256_file(archive)?;
            root.add_file(&format!("{path}.sha256"), 0o644, format!("{sha}\n"))?;
        }
    }
    Ok(())
}

/// Reads the rest of a blob opened with [`crate::cache::Cache::open`] and fails, naming `what`, if the bytes
/// read were not the ones the pull verified.
pub(crate) fn used_as_pulled(blob: crate::cache::VerifiedBlob, what: &str) -> Result<()> {
    blob.finish().map_err(anyhow::Error::new).with_context(|| {
        format!("{what}: the cached copy changed after it was verified (another process writing the cache?); nothing built from it is kept: run the build again")
    })
}

/// The manifest's records (kind `oci`): the reference, what it resolved to, and the platform
/// manifest's digest and size.
pub fn manifest_inputs(images: &[Image]) -> Vec<Input> {
    images
        .iter()
        .map(|i| Input {
            kind: InputKind::Oci,
            name: i.reference.clone(),
            version: Some(i.resolved.clone()),
            sha256: i.manifest.hex().to_string(),
            size: Some(i.manifest.size),
        })
        .collect()
}
