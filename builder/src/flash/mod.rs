//! `kiln flash IMAGE DEVICE`: writes a disk image (raw, `.zst` or `.xz`) to an SD card, USB stick
//! or file, only its mapped blocks when it has a bmap, then reads it back to verify. Before that it
//! inspects the target (`device`) and refuses what would likely be a mistake (`refusals`).

pub mod device;
pub mod write;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub use device::{inspect, BlockFacts, HostRoots, Target};
pub use write::{flash, FlashOptions, FlashReport};

use crate::bmap::Bmap;
use crate::compress::Compression;
use crate::size::human;

/// A refusal to write, with every reason; the CLI exits 2 on it (a usage error, not a failure).
#[derive(Debug, thiserror::Error)]
#[error("not writing to {target}:\n  - {}", reasons.join("\n  - "))]
pub struct Refused {
    pub target: String,
    pub reasons: Vec<String>,
}

/// The image to write: where it is, how it is compressed, its bmap and its size when known.
#[derive(Debug)]
pub struct Image {
    pub path: PathBuf,
    pub compression: Compression,
    pub bmap: Option<Bmap>,
    /// Known for a raw image, from the bmap, from the build's manifest, or from a zstd frame header.
    pub size: Option<u64>,
    /// Without a bmap: the digest the build recorded for the uncompressed image in the
    /// `manifest.json` beside it, checked over the bytes written (a damaged download is caught).
    pub expected: Option<ManifestDigest>,
}

/// The build's record of the uncompressed image (`outputs` entry of `manifest.json`).
#[derive(Debug, Clone)]
pub struct ManifestDigest {
    pub manifest: PathBuf,
    pub sha256: [u8; 32],
    pub size: u64,
}

impl Image {
    /// Opens IMAGE's metadata: `bmap` if given, else `IMAGE.bmap` or (for `disk.img.zst`)
    /// `disk.img.bmap` beside it if present.
    pub fn open(path: &Path, bmap: Option<&Path>) -> Result<Image> {
        let compression = Compression::from_path(path);
        let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        let bmap_path = match bmap {
            Some(b) => Some(b.to_path_buf()),
            None => default_bmap(path),
        };
        let bmap = match bmap_path {
            Some(p) => Some(Bmap::read(&p)?),
            None => None,
        };
        let expected = if bmap.is_none() { manifest_digest(path)? } else { None };
        let size = match (&bmap, compression, &expected) {
            (Some(b), _, _) => Some(b.image_size),
            (None, Compression::None, _) => Some(meta.len()),
            (None, _, Some(e)) => Some(e.size),
            (None, Compression::Zstd, None) => zstd_content_size(path),
            (None, Compression::Xz, None) => None,
        };
        if let (Some(e), Compression::None) = (&expected, compression) {
            if e.size != meta.len() {
                anyhow::bail!(
                    "{} is {} bytes but {} records {} for it: the manifest belongs to another build (move it away, or pass the image's bmap with --bmap)",
                    path.display(),
                    meta.len(),
                    e.manifest.display(),
                    e.size
                );
            }
        }
        if let (Some(b), Compression::None) = (&bmap, compression) {
            if b.image_size != meta.len() {
                anyhow::bail!(
                    "{} is {} bytes but its bmap says {}: the bmap belongs to another image (pass the right one with --bmap)",
                    path.display(),
                    meta.len(),
                    b.image_size
                );
            }
        }
        Ok(Image { path: path.into(), compression, bmap, size, expected })
    }
}

/// `IMAGE.bmap`, or the bmap of the uncompressed name (`disk.img.xz` -> `disk.img.bmap`).
pub fn default_bmap(image: &Path) -> Option<PathBuf> {
    let name = image.file_name()?.to_string_lossy().into_owned();
    let mut candidates = vec![image.with_file_name(format!("{name}.bmap"))];
    if Compression::from_path(image) != Compression::None {
        if let Some(stem) = image.file_stem() {
            candidates.push(image.with_file_name(format!("{}.bmap", stem.to_string_lossy())));
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// The digest `manifest.json` beside IMAGE records for the uncompressed image (`disk.img` for
/// `disk.img.xz`), if there is such a manifest; one that cannot be read is an error, not ignored.
fn manifest_digest(image: &Path) -> Result<Option<ManifestDigest>> {
    let manifest = image.with_file_name("manifest.json");
    if !manifest.is_file() {
        return Ok(None);
    }
    let name = match Compression::from_path(image) {
        Compression::None => image.file_name(),
        _ => image.file_stem(),
    };
    let Some(name) = name.map(|n| n.to_string_lossy().into_owned()) else { return Ok(None) };
    let text = std::fs::read(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
    let m: crate::manifest::Manifest =
        serde_json::from_slice(&text).with_context(|| format!("{} is not a kiln build manifest", manifest.display()))?;
    let Some(out) = m.outputs.iter().find(|o| o.file == name) else { return Ok(None) };
    let mut sha256 = [0u8; 32];
    hex::decode_to_slice(&out.sha256, &mut sha256).with_context(|| format!("{}: bad sha256 for {name}", manifest.display()))?;
    Ok(Some(ManifestDigest { manifest, sha256, size: out.size }))
}

fn zstd_content_size(path: &Path) -> Option<u64> {
    use std::io::Read;
    let mut head = [0u8; 18];
    let n = std::fs::File::open(path).ok()?.read(&mut head).ok()?;
    zstd::zstd_safe::get_frame_content_size(&head[..n]).ok().flatten()
}

/// Every reason not to write an image of `image_size` bytes to `target` (empty: go ahead).
/// Each names the device and what to do instead; `--force` overrides them all.
pub fn refusals(target: &Target, image_size: Option<u64>) -> Vec<String> {
    let mut out = Vec::new();
    match target {
        Target::File { path, exists, size } => {
            // A new or empty file is created at the image's size; an existing one is never
            // truncated, and one smaller than the image is likely the wrong file.
            if let (true, Some(img)) = (*exists && *size > 0, image_size) {
                if *size < img {
                    out.push(format!(
                        "{} is a file of {} smaller than the image ({}); pass an empty or new file, or --force to write anyway (the file grows)",
                        path.display(),
                        human(*size),
                        human(img)
                    ));
                }
            }
        }
        Target::Block(b) => {
            let dev = b.path.display();
            if let Some(disk) = &b.partition_of {
                out.push(format!(
                    "{dev} is a partition of {disk}; an image holds a partition table, so write it to the whole disk /dev/{disk}"
                ));
            }
            if b.boot_disk {
                let is = if b.partition_of.is_some() { "is on" } else { "is" };
                out.push(format!(
                    "{dev} {is} the disk the running system booted from (it holds /); writing it would destroy this system; pick another device, or --force to write anyway"
                ));
            }
            if !b.mounts.is_empty() {
                out.push(format!(
                    "{dev} has mounted file systems ({}); unmount them first (e.g. `umount {}`), or --force to write anyway",
                    b.mounts.join(", "),
                    b.mounts.join(" ")
                ));
            }
            if !b.removable && !b.boot_disk {
                out.push(format!(
                    "{dev} ({}) is not a removable disk (not a USB stick or SD card); check it is the right device, then --force to write anyway",
                    if b.model.is_empty() { "no model" } else { &b.model }
                ));
            }
            if b.read_only {
                out.push(format!("{dev} is read-only (an SD card's lock switch?); unlock it and try again"));
            }
            if let Some(img) = image_size {
                if b.size < img {
                    out.push(format!("{dev} ({}) is smaller than the image ({}); use a larger device", human(b.size), human(img)));
                }
            }
        }
    }
    out
}

/// What the CLI prints before asking: model, size and partitions with their mounts.
pub fn describe(target: &Target) -> String {
    match target {
        Target::File { path, exists: false, .. } => format!("{}: new file", path.display()),
        Target::File { path, size, .. } => format!("{}: regular file, {}", path.display(), human(*size)),
        Target::Block(b) => {
            let mut s = format!(
                "{}: {}, {}{}{}\n",
                b.path.display(),
                if b.model.is_empty() { "unknown model" } else { &b.model },
                human(b.size),
                if b.removable { ", removable" } else { "" },
                if b.boot_disk { ", holds the running system" } else { "" }
            );
            if b.partitions.is_empty() {
                s.push_str("  no partitions\n");
            }
            for p in &b.partitions {
                let m = if p.mounts.is_empty() { String::new() } else { format!(", mounted on {}", p.mounts.join(", ")) };
                s.push_str(&format!("  {}: {}{m}\n", p.name, human(p.size)));
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots(machine: &str) -> HostRoots {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flash").join(machine);
        HostRoots { sys: base.join("sys"), proc: base.join("proc") }
    }

    const GIB: u64 = 1 << 30;

    /// The refusal rules over recorded (virtio-vm) and hand-written (laptop) fixtures: each row is
    /// a device, the image size, and the fragments every expected reason contains (none: allowed).
    #[test]
    fn refusal_rules_over_sysfs_fixtures() {
        #[rustfmt::skip]
        let table: &[(&str, &str, u64, &[&str])] = &[
            // USB stick with its vfat partition automounted by the desktop.
            ("laptop", "sda", 2 * GIB, &["mounted file systems (/media/user/KILN-ESP)"]),
            // The same stick's partition.
            ("laptop", "sda1", 2 * GIB, &["partition of sda", "mounted file systems"]),
            // SD card in the built-in reader: removable 0 in sysfs, but an SD card; not mounted.
            ("laptop", "mmcblk0", 2 * GIB, &[]),
            // Too small an SD card.
            ("laptop", "mmcblk0", 40 * GIB, &["smaller than the image"]),
            // USB SD-card reader, nothing mounted.
            ("laptop", "sdb", 2 * GIB, &[]),
            // The NVMe system disk: booted from, mounted; not called non-removable on top.
            ("laptop", "nvme0n1", 2 * GIB, &["booted from", "mounted file systems (/, /boot/efi)"]),
            ("laptop", "nvme0n1p1", 2 * GIB, &["partition of nvme0n1", "booted from", "mounted file systems (/boot/efi)", "smaller"]),
            // / on dm-crypt over a partition: found through dm-0's slaves and the partition's holders.
            ("luks-laptop", "nvme0n1", 2 * GIB, &["booted from", "mounted file systems (/, /boot/efi)"]),
            ("luks-laptop", "nvme0n1p2", 2 * GIB, &["partition of nvme0n1", "booted from", "mounted file systems (/)"]),
            // Recorded in QEMU with a real kernel: USB stick, SD card (removable 0, type SD), NVMe.
            ("qemu-usb-sd-nvme", "sda", 32 << 20, &[]),
            ("qemu-usb-sd-nvme", "mmcblk0", 32 << 20, &[]),
            ("qemu-usb-sd-nvme", "mmcblk0", GIB, &["smaller than the image"]),
            ("qemu-usb-sd-nvme", "nvme0n1", 32 << 20, &["not a removable disk"]),
            ("qemu-usb-sd-nvme", "sda2", 4 << 20, &["partition of sda"]),
            // Recorded: this VM's virtio disk, / with no partition table.
            ("virtio-vm", "vda", 2 * GIB, &["booted from", "mounted file systems (/)"]),
        ];
        for (machine, dev, size, want) in table {
            let facts = device::inspect_block(dev, &roots(machine)).unwrap();
            let got = refusals(&Target::Block(facts.clone()), Some(*size));
            assert_eq!(got.len(), want.len(), "{machine} {dev}: {got:#?}\n{facts:#?}");
            for (g, w) in got.iter().zip(want.iter()) {
                assert!(g.contains(w) && g.contains(&format!("/dev/{dev}")), "{machine} {dev}: {g:?} lacks {w:?}");
            }
        }
    }

    #[test]
    fn facts_from_fixtures() {
        let sda = device::inspect_block("sda", &roots("laptop")).unwrap();
        assert_eq!(sda.model, "SanDisk Cruzer Blade");
        assert_eq!(sda.size, 60437492 * 512);
        assert!(sda.removable && !sda.boot_disk);
        assert_eq!(sda.partitions.len(), 1);
        let vda = device::inspect_block("vda", &roots("virtio-vm")).unwrap();
        assert_eq!((vda.size, vda.model.as_str(), vda.removable, vda.boot_disk), (256 * GIB, "0x1af4", false, true));
        let nvme = device::inspect_block("nvme0n1", &roots("laptop")).unwrap();
        assert!(!nvme.removable && nvme.boot_disk && nvme.partitions.len() == 2);
        let text = describe(&Target::Block(nvme));
        assert!(
            text.contains("Samsung SSD 970 EVO Plus 500GB, 476.9 GiB") && text.contains("nvme0n1p2: 476.4 GiB, mounted on /"),
            "{text}"
        );
        let sd = device::inspect_block("mmcblk0", &roots("laptop")).unwrap();
        assert_eq!(sd.model, "SC64G");
        let q = roots("qemu-usb-sd-nvme");
        let usb = device::inspect_block("sda", &q).unwrap();
        assert_eq!((usb.model.as_str(), usb.size, usb.removable, usb.partitions.len()), ("QEMU QEMU HARDDISK", 64 << 20, true, 2));
        let sd = device::inspect_block("mmcblk0", &q).unwrap();
        assert_eq!((sd.model.as_str(), sd.removable, sd.partitions.len()), ("QEMU!", true, 2));
        let nvme = device::inspect_block("nvme0n1", &q).unwrap();
        assert_eq!((nvme.model.as_str(), nvme.removable, nvme.boot_disk, nvme.partitions.len()), ("QEMU NVMe Ctrl", false, false, 2));
    }

    #[test]
    fn files_are_refused_only_when_smaller_than_the_image() {
        let f = |exists, size| Target::File { path: "t.img".into(), exists, size };
        assert!(refusals(&f(false, 0), Some(GIB)).is_empty());
        assert!(refusals(&f(true, 0), Some(GIB)).is_empty());
        assert!(refusals(&f(true, 2 * GIB), Some(GIB)).is_empty());
        let r = refusals(&f(true, GIB / 2), Some(GIB));
        assert!(r.len() == 1 && r[0].contains("t.img") && r[0].contains("--force"), "{r:?}");
    }
}
