//! The per-architecture image archive: an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`) in a zstd-compressed tar, the format k3s (containerd) imports from its
//! images directory. `index.json` names each manifest with the profile's reference in both
//! `io.containerd.image.name` (what containerd tags the import as) and
//! `org.opencontainers.image.ref.name`.
//!
//! Reproducible: entries sorted by path, fixed mtime (the build's timestamp), owner 0:0, fixed
//! modes, blobs deduplicated by digest. Blobs are streamed from the cache into the compressor,
//! so memory stays flat however large the layers are, and re-hashed on the way
//! ([`crate::cache::Cache::open`]): a blob changed in the cache after the pull fails the build.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;

use super::manifest::OCI_INDEX;
use super::Image;
use crate::cache::Cache;

/// Level 3: layers are compressed already; higher levels cost time for almost nothing.
const ZSTD_LEVEL: i32 = 3;

/// `index.json` for the images (sorted by reference).
pub fn index_json(images: &[Image]) -> Vec<u8> {
    let mut sorted: Vec<&Image> = images.iter().collect();
    sorted.sort_by(|a, b| a.reference.cmp(&b.reference));
    let manifests: Vec<_> = sorted
        .iter()
        .map(|i| {
            json!({
                "mediaType": i.manifest.media_type,
                "digest": i.manifest.digest,
                "size": i.manifest.size,
                "annotations": {
                    "io.containerd.image.name": i.reference,
                    "org.opencontainers.image.ref.name": i.reference,
                }
            })
        })
        .collect();
    let mut out = serde_json::to_vec_pretty(&json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests }))
        .expect("index serialises");
    out.push(b'\n');
    out
}

fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64, mtime: u64) -> Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).with_context(|| format!("tar path {path}"))?;
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(mtime);
    h.set_uid(0);
    h.set_gid(0);
    h.set_username("root")?;
    h.set_groupname("root")?;
    h.set_cksum();
    Ok(h)
}

/// Writes the archive of `images` (every blob already verified in `cache`) to `out`, zstd-
/// compressed (`zstd: true`, what k3s reads) or as a plain tar (containerd 1.7's `ctr images
/// import` reads no compressed archives; the squashfs root compresses it anyway).
/// Returns the archive's size.
pub fn write_archive(images: &[Image], cache: &Cache, mtime: u64, out: &Path, zstd: bool) -> Result<u64> {
    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let w = BufWriter::with_capacity(1 << 20, file);
    let mut w = if zstd {
        let mut enc = zstd::Encoder::new(w, ZSTD_LEVEL)?;
        enc.include_checksum(true)?;
        let enc = append_layout(tar::Builder::new(enc), images, cache, mtime, out)?;
        enc.finish().context("finishing the zstd stream")?
    } else {
        append_layout(tar::Builder::new(w), images, cache, mtime, out)?
    };
    w.flush()?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
}

/// Appends the layout's entries to `tar` and finishes it, returning the writer underneath.
fn append_layout<W: Write>(mut tar: tar::Builder<W>, images: &[Image], cache: &Cache, mtime: u64, out: &Path) -> Result<W> {
    let mut blobs = BTreeMap::new();
    for img in images {
        for d in img.all_blobs() {
            blobs.insert(d.hex().to_string(), d.size);
        }
    }
    let dir = |p: &str| header(p, tar::EntryType::Directory, 0o755, 0, mtime);
    tar.append(&dir("blobs/")?, std::io::empty())?;
    tar.append(&dir("blobs/sha256/")?, std::io::empty())?;
    for (hex, size) in &blobs {
        // Opened once and re-hashed while copied (not re-opened by path and trusted): the archive
        // holds the bytes the pull verified, or the build fails.
        let what = format!("blob sha256:{hex}");
        let mut blob = cache
            .open(hex, *size)?
            .with_context(|| format!("{what} is not in the cache (removed after the pull?): run the build again to fetch it"))?;
        let h = header(&format!("blobs/sha256/{hex}"), tar::EntryType::Regular, 0o644, *size, mtime)?;
        let appended = tar.append(&h, &mut blob);
        super::used_as_pulled(blob, &what)?;
        appended.with_context(|| format!("adding {what} to {}", out.display()))?;
    }
    let index = index_json(images);
    tar.append(&header("index.json", tar::EntryType::Regular, 0o644, index.len() as u64, mtime)?, &index[..])?;
    let layout = b"{\"imageLayoutVersion\":\"1.0.0\"}\n";
    tar.append(&header("oci-layout", tar::EntryType::Regular, 0o644, layout.len() as u64, mtime)?, &layout[..])?;
    tar.into_inner().context("finishing the tar stream")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::manifest::{Descriptor, OCI_MANIFEST};
    use sha2::{Digest, Sha256};
    use std::io::Read;

    fn put(cache: &Cache, data: &[u8], media_type: &str) -> Descriptor {
        let hex = hex::encode(Sha256::digest(data));
        cache.put(&hex, Some(data.len() as u64), data, "test blob").unwrap();
        Descriptor { media_type: media_type.into(), digest: format!("sha256:{hex}"), size: data.len() as u64 }
    }

    fn images(cache: &Cache) -> Vec<Image> {
        let config = put(cache, b"{\"architecture\":\"amd64\",\"os\":\"linux\"}", "application/vnd.oci.image.config.v1+json");
        let layer = put(cache, &vec![7u8; 300_000], "application/vnd.oci.image.layer.v1.tar");
        let manifest = put(cache, b"{\"schemaVersion\":2}", OCI_MANIFEST);
        let img = |r: &str| Image {
            reference: r.into(),
            resolved: manifest.digest.clone(),
            manifest: manifest.clone(),
            blobs: vec![config.clone(), layer.clone()],
        };
        vec![img("r.example/b:2"), img("r.example/a:1")]
    }

    #[test]
    fn archives_are_sorted_deduplicated_and_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache"));
        let imgs = images(&cache);
        let (a, b) = (dir.path().join("a.tar.zst"), dir.path().join("b.tar.zst"));
        write_archive(&imgs, &cache, 1_700_000_000, &a, true).unwrap();
        let mut reversed = imgs.clone();
        reversed.reverse();
        write_archive(&reversed, &cache, 1_700_000_000, &b, true).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "same images, same bytes");
        // The plain tar (engine: containerd) is the same tar stream, uncompressed.
        let plain = dir.path().join("a.tar");
        write_archive(&imgs, &cache, 1_700_000_000, &plain, false).unwrap();
        assert_eq!(zstd::decode_all(File::open(&a).unwrap()).unwrap(), std::fs::read(&plain).unwrap());

        let mut ar = tar::Archive::new(zstd::Decoder::new(File::open(&a).unwrap()).unwrap());
        let mut names = Vec::new();
        let mut index = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let h = e.header();
            assert_eq!((h.mtime().unwrap(), h.uid().unwrap(), h.gid().unwrap()), (1_700_000_000, 0, 0), "{name}");
            if let Some(hex) = name.strip_prefix("blobs/sha256/").filter(|h| !h.is_empty()) {
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                assert_eq!(hex::encode(Sha256::digest(&data)), hex, "blob content matches its name");
            }
            if name == "index.json" {
                e.read_to_end(&mut index).unwrap();
            }
            names.push(name);
        }
        assert_eq!(names.len(), 2 + 3 + 2, "two dirs, three distinct blobs, index.json, oci-layout: {names:?}");
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        let index: serde_json::Value = serde_json::from_slice(&index).unwrap();
        let refs: Vec<&str> =
            index["manifests"].as_array().unwrap().iter().map(|m| m["annotations"]["io.containerd.image.name"].as_str().unwrap()).collect();
        assert_eq!(refs, ["r.example/a:1", "r.example/b:2"]);
        assert_eq!(index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"], "r.example/a:1");
    }

    /// The archive of a fixed set of images, pinned by digest: recorded with the code before the
    /// blobs were read through the verifying reader, so a change in what is bundled shows here.
    #[test]
    fn a_good_image_bundles_byte_identically_to_before() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache"));
        let imgs = images(&cache);
        let (zst, plain) = (dir.path().join("a.tar.zst"), dir.path().join("a.tar"));
        write_archive(&imgs, &cache, 1_700_000_000, &zst, true).unwrap();
        write_archive(&imgs, &cache, 1_700_000_000, &plain, false).unwrap();
        let sha = |p: &Path| crate::digest::sha256_file(p).unwrap();
        assert_eq!(
            (sha(&zst), sha(&plain)),
            (
                "0fc3a018c1b3883f13bedf122bb5597f01a0c4e4f9cb9e75433ab50bdfd78839".to_string(),
                "287d22010e097468b34ffe5df6a3079a6a6a203268f780a58dc8f80908e60a77".to_string()
            )
        );
    }
}
