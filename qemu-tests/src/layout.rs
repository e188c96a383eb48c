//! OCI image layouts the VM tier makes itself, to push to the test registry with
//! [`crate::registry::push`] (which copies the layout's tag `1`): blobs stored by digest, image
//! manifests over given layers, an optional multi-platform index, and `index.json` naming the
//! top object `1`. The image tests (`oci_images`, `oci_base`, `containerd`) all build theirs here.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::registry::sha;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// An uncompressed layer.
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// One layer: its media type, the blob as stored, and the digest (hex) of its uncompressed tar
/// (the config's `diff_id`; the blob's own digest for an uncompressed layer).
pub struct Layer {
    pub media_type: &'static str,
    pub blob: Vec<u8>,
    pub diff_id: String,
}

impl Layer {
    /// An uncompressed tar as a layer.
    pub fn plain(tar: Vec<u8>) -> Layer {
        let diff_id = sha(&tar);
        Layer { media_type: LAYER_TAR, blob: tar, diff_id }
    }
}

/// A layer whose blob is stored in the layout (see [`TestLayout::blob_file`]).
pub struct StoredLayer {
    pub media_type: &'static str,
    /// The blob's digest (hex).
    pub hex: String,
    pub size: u64,
    /// The digest (hex) of the uncompressed tar.
    pub diff_id: String,
}

/// The digests (hex) of one image written into a layout.
pub struct Made {
    pub manifest: String,
    pub config: String,
    pub layers: Vec<String>,
    /// The manifest's descriptor, for an index entry or `index.json`.
    pub descriptor: Value,
}

/// An OCI image layout directory being written.
pub struct TestLayout {
    dir: PathBuf,
}

impl TestLayout {
    pub fn create(dir: &Path) -> Result<TestLayout> {
        std::fs::create_dir_all(dir.join("blobs/sha256"))?;
        Ok(TestLayout { dir: dir.to_path_buf() })
    }

    /// Stores `data` as a blob; returns its digest (hex).
    pub fn blob(&self, data: &[u8]) -> Result<String> {
        let hex = sha(data);
        std::fs::write(self.dir.join("blobs/sha256").join(&hex), data)?;
        Ok(hex)
    }

    /// Moves the file at `path` into the layout as a blob, hashing it as a stream (a layer of
    /// a GiB is never in memory); returns its digest (hex) and size.
    pub fn blob_file(&self, path: &Path) -> Result<(String, u64)> {
        let hex = kiln::digest::sha256_file(path)?;
        let size = std::fs::metadata(path)?.len();
        std::fs::rename(path, self.dir.join("blobs/sha256").join(&hex))
            .with_context(|| format!("moving {} into the layout", path.display()))?;
        Ok((hex, size))
    }

    /// An image of `layers` (bottom first) for `linux/<arch>` (OCI architecture name); `config`
    /// is the image config's `config` object (Cmd, Env, ...).
    pub fn image(&self, arch: &str, layers: &[Layer], config: Value) -> Result<Made> {
        let stored = layers
            .iter()
            .map(|l| {
                Ok(StoredLayer {
                    media_type: l.media_type,
                    hex: self.blob(&l.blob)?,
                    size: l.blob.len() as u64,
                    diff_id: l.diff_id.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.image_of(arch, &stored, config)
    }

    /// [`TestLayout::image`] over layers whose blobs are in the layout already.
    pub fn image_of(&self, arch: &str, layers: &[StoredLayer], config: Value) -> Result<Made> {
        let descriptors: Vec<Value> =
            layers.iter().map(|l| json!({"mediaType": l.media_type, "digest": format!("sha256:{}", l.hex), "size": l.size})).collect();
        let config = serde_json::to_vec(&json!({
            "architecture": arch, "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| format!("sha256:{}", l.diff_id)).collect::<Vec<_>>()},
        }))?;
        let config_hex = self.blob(&config)?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": format!("sha256:{config_hex}"), "size": config.len()},
            "layers": descriptors,
        }))?;
        let manifest_hex = self.blob(&manifest)?;
        let descriptor = json!({"mediaType": OCI_MANIFEST, "digest": format!("sha256:{manifest_hex}"), "size": manifest.len()});
        Ok(Made { manifest: manifest_hex, config: config_hex, layers: layers.iter().map(|l| l.hex.clone()).collect(), descriptor })
    }

    /// An index over `images`, each with its platform (`linux/<arch>[/<variant>]`); returns
    /// the index's digest (hex) and descriptor.
    pub fn index(&self, images: &[(&Made, &str, Option<&str>)]) -> Result<(String, Value)> {
        let entries: Vec<Value> = images
            .iter()
            .map(|(made, arch, variant)| {
                let mut entry = made.descriptor.clone();
                let mut platform = json!({"os": "linux", "architecture": arch});
                if let Some(v) = variant {
                    platform["variant"] = json!(v);
                }
                entry["platform"] = platform;
                entry
            })
            .collect();
        let index = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}))?;
        let hex = self.blob(&index)?;
        Ok((hex.clone(), json!({"mediaType": OCI_INDEX, "digest": format!("sha256:{hex}"), "size": index.len()})))
    }

    /// Writes `oci-layout` and `index.json` naming `top` (an image's or index's descriptor) as
    /// tag `1`, the tag [`crate::registry::push`] copies.
    pub fn tag(&self, top: &Value) -> Result<()> {
        let mut entry = top.clone();
        entry["annotations"] = json!({"org.opencontainers.image.ref.name": "1"});
        std::fs::write(self.dir.join("oci-layout"), "{\"imageLayoutVersion\":\"1.0.0\"}")?;
        std::fs::write(self.dir.join("index.json"), serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [entry]}))?)?;
        Ok(())
    }
}

/// A tar of test entries written header by header (raw names: `..` and whiteouts as given).
/// Each entry is (name, contents); a name ending in `/` is a directory.
pub fn raw_tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in entries {
        let dir = name.ends_with('/');
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let octal = |field: &mut [u8], v: u64| {
            let text = format!("{v:0width$o}\0", width = field.len() - 1);
            field.copy_from_slice(text.as_bytes());
        };
        octal(&mut h[100..108], if dir { 0o755 } else { 0o644 });
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], if dir { 0 } else { data.len() as u64 });
        octal(&mut h[136..148], 1_700_000_000);
        h[156] = if dir { b'5' } else { b'0' };
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|b| *b as u64).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&h);
        if !dir {
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// A Debian package's files as one tar (its `data.tar`, as `dpkg-deb --fsys-tarfile` gives it):
/// a ready-made layer.
pub fn deb_data_tar(deb: &Path) -> Result<Vec<u8>> {
    let out =
        std::process::Command::new("dpkg-deb").arg("--fsys-tarfile").arg(deb).output().context("running dpkg-deb (install `dpkg`)")?;
    anyhow::ensure!(out.status.success(), "dpkg-deb --fsys-tarfile {}: {}", deb.display(), String::from_utf8_lossy(&out.stderr));
    Ok(out.stdout)
}
