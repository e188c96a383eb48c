//! Writing an image to its target and reading it back: mapped ranges only when there is a bmap
//! (everything else is skipped, on the target and in the decompressed stream), then fsync, drop
//! the target's cached pages, and compare each range's sha256 with what was written.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::Image;
use crate::bmap::sha256_of;

/// Without a bmap the image is verified in chunks of this size, so a mismatch names where it is.
const CHUNK: u64 = 4 << 20;

/// What a flash writes to: a block device or a file. Tests wrap it to corrupt writes.
pub trait Medium: Read + Write + Seek {
    /// Makes the written data durable and drops it from the page cache, so the read-back reads
    /// the medium, not memory.
    fn sync(&mut self) -> std::io::Result<()>;
}

impl Medium for File {
    fn sync(&mut self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        self.sync_all()?;
        // SAFETY: advisory call on a descriptor we own; len 0 means to the end.
        unsafe { libc::posix_fadvise(self.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        Ok(())
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct FlashOptions {
    pub verify: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlashReport {
    pub image_size: u64,
    /// Bytes written to the target (the mapped bytes with a bmap).
    pub written: u64,
    /// Bytes read back and compared (0 with `verify` off).
    pub verified: u64,
}

/// Opens the target for writing: a block device exclusively (`O_EXCL`: the kernel refuses while
/// anything has it mounted or open exclusively); a file created if new, grown to `size` if
/// shorter (never truncated).
pub fn open_target(path: &Path, size: Option<u64>) -> Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let is_block = std::fs::metadata(path).map(|m| m.file_type().is_block_device()).unwrap_or(false);
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if is_block {
        o.custom_flags(libc::O_EXCL);
    } else {
        o.create(true);
    }
    let f = o
        .open(path)
        .with_context(|| format!("opening {} for writing{}", path.display(), if is_block { " (is it mounted or in use?)" } else { "" }))?;
    if let (false, Some(size)) = (is_block, size) {
        if f.metadata()?.len() < size {
            f.set_len(size).with_context(|| format!("growing {} to {size} bytes", path.display()))?;
        }
    }
    Ok(f)
}

/// Writes `image` to `target` and (with `verify`) reads it back. `progress` gets the bytes
/// written so far, out of the mapped size (bmap) or the image size.
pub fn flash(image: &Image, target: &mut dyn Medium, opts: FlashOptions, progress: &mut dyn FnMut(u64)) -> Result<FlashReport> {
    let mut src = crate::compress::open_image(&image.path)?;
    let src_name = image.path.display().to_string();
    // The ranges to write with their expected digest (bmap) or, without a bmap, fixed chunks
    // whose digests are taken while writing.
    let plan: Vec<(Range<u64>, Option<[u8; 32]>)> = match &image.bmap {
        Some(b) => b.ranges.iter().map(|r| (b.byte_range(r), r.sha256)).collect(),
        None => Vec::new(),
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64; // position in the decompressed image
    let mut written = 0u64;
    let mut digests: Vec<(Range<u64>, [u8; 32])> = Vec::new();
    if image.bmap.is_some() {
        let mut write_range = |src: &mut dyn Read, range: Range<u64>, target: &mut dyn Medium, pos: &mut u64| -> Result<[u8; 32]> {
            target.seek(SeekFrom::Start(range.start)).context("seeking on the target")?;
            let mut h = Sha256::new();
            let mut left = range.end - range.start;
            while left > 0 {
                let k = left.min(buf.len() as u64) as usize;
                src.read_exact(&mut buf[..k])
                    .with_context(|| format!("reading {src_name} at byte {}: image shorter than its bmap?", *pos))?;
                h.update(&buf[..k]);
                target.write_all(&buf[..k]).with_context(|| format!("writing bytes at {}", *pos))?;
                *pos += k as u64;
                left -= k as u64;
                written += k as u64;
                progress(written);
            }
            Ok(h.finalize().into())
        };
        for (range, want) in &plan {
            // Skip the unmapped bytes before the range in the stream (no seek in a compressed one).
            let gap = range.start - pos;
            let skipped = std::io::copy(&mut (&mut src).take(gap), &mut std::io::sink()).context("reading the image")?;
            if skipped != gap {
                bail!("{src_name} ends at byte {} before its bmap's range at {}", pos + skipped, range.start);
            }
            pos += gap;
            let got = write_range(&mut src, range.clone(), target, &mut pos)?;
            if let Some(want) = want {
                if &got != want {
                    bail!(
                        "{src_name}: bytes {}..{} do not match its bmap (sha256 {} instead of {}): the image or the bmap is damaged; the target is partly written",
                        range.start,
                        range.end,
                        hex::encode(got),
                        hex::encode(want)
                    );
                }
            }
            digests.push((range.clone(), got));
        }
    } else {
        let mut whole = Sha256::new();
        loop {
            // Whole image, chunk by chunk, until the stream ends.
            let start = pos;
            let mut h = Sha256::new();
            let mut n = 0u64;
            target.seek(SeekFrom::Start(start)).context("seeking on the target")?;
            while n < CHUNK {
                let k = (CHUNK - n).min(buf.len() as u64) as usize;
                let r = src.read(&mut buf[..k]).with_context(|| format!("reading {src_name} at byte {pos}"))?;
                if r == 0 {
                    break;
                }
                h.update(&buf[..r]);
                whole.update(&buf[..r]);
                target.write_all(&buf[..r]).with_context(|| format!("writing bytes at {pos}"))?;
                pos += r as u64;
                n += r as u64;
                written += r as u64;
                progress(written);
            }
            if n == 0 {
                break;
            }
            digests.push((start..pos, h.finalize().into()));
        }
        if let Some(e) = &image.expected {
            let got: [u8; 32] = whole.finalize().into();
            if got != e.sha256 || pos != e.size {
                bail!(
                    "{src_name} does not match {} (sha256 {} of {pos} bytes instead of {} of {}): the image is damaged or the manifest is another build's; the target is written with it, flash a good copy",
                    e.manifest.display(),
                    hex::encode(got),
                    hex::encode(e.sha256),
                    e.size
                );
            }
        }
    }
    let image_size = match &image.bmap {
        Some(b) => b.image_size,
        None => pos,
    };
    target.flush().context("flushing the target")?;
    target.sync().context("syncing the target (fsync)")?;
    let mut verified = 0;
    if opts.verify {
        for (range, want) in digests {
            let got = sha256_of(target, range.clone()).with_context(|| format!("reading back bytes {}..{}", range.start, range.end))?;
            if got != want {
                let at = first_difference(&image.path, target, &range).unwrap_or(range.start);
                bail!(
                    "verify failed: bytes {}..{} read back differ from what was written (first difference at byte {at}; sha256 {} instead of {}): the medium is faulty or was changed while writing",
                    range.start,
                    range.end,
                    hex::encode(got),
                    hex::encode(want)
                );
            }
            verified += range.end - range.start;
        }
    }
    Ok(FlashReport { image_size, written, verified })
}

/// The first byte of `range` where the target differs from the image (decompressing again).
fn first_difference(image: &Path, target: &mut dyn Medium, range: &Range<u64>) -> Option<u64> {
    let mut src = crate::compress::open_image(image).ok()?;
    std::io::copy(&mut (&mut src).take(range.start), &mut std::io::sink()).ok()?;
    target.seek(SeekFrom::Start(range.start)).ok()?;
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    let mut pos = range.start;
    while pos < range.end {
        let k = (range.end - pos).min(a.len() as u64) as usize;
        src.read_exact(&mut a[..k]).ok()?;
        target.read_exact(&mut b[..k]).ok()?;
        if let Some(i) = a[..k].iter().zip(&b[..k]).position(|(x, y)| x != y) {
            return Some(pos + i as u64);
        }
        pos += k as u64;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::{compress_sparse_image, Compression};

    const MIB: u64 = 1 << 20;

    /// A 64 MiB sparse image with data in three places, and its bmap beside it.
    fn image(dir: &Path) -> std::path::PathBuf {
        let p = dir.join("disk.img");
        let mut f = File::create(&p).unwrap();
        f.set_len(64 * MIB).unwrap();
        let data: Vec<u8> = (0..3 * MIB as u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        for (off, len) in [(0, 17 * 1024), (MIB, 3 * MIB), (40 * MIB, 8192)] {
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&data[..len as usize]).unwrap();
        }
        let mapped = [0..17 * 1024, MIB..4 * MIB, 40 * MIB..40 * MIB + 8192];
        crate::bmap::write_bmap(&p, &mapped, &dir.join("disk.img.bmap")).unwrap();
        p
    }

    /// Flashing to a file the card's size writes exactly the mapped ranges, leaves the others
    /// untouched (a file full of 0xEE stays 0xEE there), and verifies.
    #[test]
    fn bmap_flash_writes_mapped_ranges_only() {
        let d = tempfile::tempdir().unwrap();
        let img = image(d.path());
        // Compressed from the bmap's ranges, as the pipeline will: the holes become zeros.
        let b = Image::open(&img, None).unwrap().bmap.unwrap();
        let mapped: Vec<Range<u64>> = b.ranges.iter().map(|r| b.byte_range(r)).collect();
        compress_sparse_image(&img, &mapped, &d.path().join("disk.img.zst"), Compression::Zstd).unwrap();
        compress_sparse_image(&img, &mapped, &d.path().join("disk.img.xz"), Compression::Xz).unwrap();
        let want = std::fs::read(&img).unwrap();
        for name in ["disk.img", "disk.img.zst", "disk.img.xz"] {
            let image = Image::open(&d.path().join(name), None).unwrap();
            let bmap = image.bmap.clone().expect("disk.img.bmap found beside the image");
            let card = d.path().join("card");
            std::fs::write(&card, vec![0xEEu8; 80 * MIB as usize]).unwrap();
            let mut t = open_target(&card, image.size).unwrap();
            let mut last = 0;
            let report = flash(&image, &mut t, FlashOptions { verify: true }, &mut |n| last = n).unwrap();
            assert_eq!(report.written, bmap.mapped_bytes(), "{name}");
            assert_eq!((report.verified, last), (report.written, report.written), "{name}");
            let got = std::fs::read(&card).unwrap();
            assert_eq!(got.len(), 80 * MIB as usize, "{name}: the card file changed size");
            let mut mapped = vec![false; got.len()];
            for r in &bmap.ranges {
                let b = bmap.byte_range(r);
                assert!(got[b.start as usize..b.end as usize] == want[b.start as usize..b.end as usize], "{name}: {b:?}");
                mapped[b.start as usize..b.end as usize].iter_mut().for_each(|m| *m = true);
            }
            assert!(got.iter().zip(&mapped).all(|(&g, &m)| m || g == 0xEE), "{name}: an unmapped byte was written");
        }
    }

    /// Without a bmap the whole image is written to a new file, which equals the image.
    #[test]
    fn raw_flash_without_bmap_writes_everything() {
        let d = tempfile::tempdir().unwrap();
        let img = image(d.path());
        let image = Image::open(&img, Some(&d.path().join("disk.img.bmap"))).unwrap();
        let image = Image { bmap: None, ..image };
        let out = d.path().join("new.img");
        let mut t = open_target(&out, image.size).unwrap();
        let report = flash(&image, &mut t, FlashOptions { verify: true }, &mut |_| {}).unwrap();
        assert_eq!((report.written, report.verified, report.image_size), (64 * MIB, 64 * MIB, 64 * MIB));
        assert!(std::fs::read(&out).unwrap() == std::fs::read(&img).unwrap());
    }

    /// A build's manifest.json beside the image: `disk.img` recorded with this digest and size.
    fn write_manifest(dir: &Path, sha256: &str, size: u64) {
        let m = crate::manifest::Manifest {
            kiln_version: "0".into(),
            profile: "p".into(),
            arch: crate::arch::Arch::Aarch64,
            suite: "trixie".into(),
            kernel_version: "6".into(),
            source_date_epoch: 1,
            kernel_cmdline: String::new(),
            disk_guid: String::new(),
            inputs: Vec::new(),
            partitions: Vec::new(),
            install: None,
            netboot_install: None,
            initramfs_modules: Vec::new(),
            outputs: vec![crate::manifest::Output { file: "disk.img".into(), sha256: sha256.into(), size }],
        };
        std::fs::write(dir.join("manifest.json"), m.to_json()).unwrap();
    }

    /// Without a bmap, the manifest's digest of disk.img is checked over the bytes written, for
    /// the raw image and for a compressed copy (whose size the manifest supplies); a damaged
    /// image is reported naming the manifest.
    #[test]
    fn without_bmap_the_manifest_digest_is_checked() {
        let d = tempfile::tempdir().unwrap();
        let img = image(d.path());
        let bmap = Image::open(&img, None).unwrap().bmap.unwrap();
        let mapped: Vec<Range<u64>> = bmap.ranges.iter().map(|r| bmap.byte_range(r)).collect();
        compress_sparse_image(&img, &mapped, &d.path().join("disk.img.xz"), Compression::Xz).unwrap();
        std::fs::remove_file(d.path().join("disk.img.bmap")).unwrap();
        write_manifest(d.path(), &crate::digest::sha256_file(&img).unwrap(), 64 * MIB);
        for name in ["disk.img", "disk.img.xz"] {
            let image = Image::open(&d.path().join(name), None).unwrap();
            assert!(image.bmap.is_none() && image.expected.is_some() && image.size == Some(64 * MIB), "{name}: {image:?}");
            let out = d.path().join("card");
            let _ = std::fs::remove_file(&out);
            let mut t = open_target(&out, image.size).unwrap();
            flash(&image, &mut t, FlashOptions { verify: true }, &mut |_| {}).unwrap();
        }
        // One byte of the raw image changed: the write goes through, the check says so.
        let mut f = OpenOptions::new().write(true).open(&img).unwrap();
        f.seek(SeekFrom::Start(MIB + 5)).unwrap();
        f.write_all(b"X").unwrap();
        let image = Image::open(&img, None).unwrap();
        let mut t = open_target(&d.path().join("card2"), image.size).unwrap();
        let err = format!("{:#}", flash(&image, &mut t, FlashOptions { verify: true }, &mut |_| {}).unwrap_err());
        assert!(err.contains("does not match") && err.contains("manifest.json") && err.contains("damaged"), "{err}");
        // A manifest recording another size belongs to another build: refused before writing.
        write_manifest(d.path(), &"00".repeat(32), 32 * MIB);
        let err = format!("{:#}", Image::open(&img, None).unwrap_err());
        assert!(err.contains("another build"), "{err}");
    }

    /// A medium that flips one byte as it is written (a failing card), read back faithfully.
    struct FlipByte {
        inner: File,
        at: u64,
    }

    impl Read for FlipByte {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.inner.read(buf)
        }
    }
    impl Seek for FlipByte {
        fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
            self.inner.seek(pos)
        }
    }
    impl Write for FlipByte {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let pos = self.inner.stream_position()?;
            let mut b = buf.to_vec();
            if (pos..pos + b.len() as u64).contains(&self.at) {
                b[(self.at - pos) as usize] ^= 0x01;
            }
            self.inner.write(&b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }
    impl Medium for FlipByte {
        fn sync(&mut self) -> std::io::Result<()> {
            self.inner.sync()
        }
    }

    #[test]
    fn corrupted_write_is_detected_with_its_range_and_offset() {
        let d = tempfile::tempdir().unwrap();
        let img = image(d.path());
        let at = 2 * MIB + 12345;
        for bmap in [true, false] {
            let mut image = Image::open(&img, None).unwrap();
            if !bmap {
                image.bmap = None;
            }
            let out = d.path().join("card");
            let _ = std::fs::remove_file(&out);
            let mut t = FlipByte { inner: open_target(&out, image.size).unwrap(), at };
            let err = format!("{:#}", flash(&image, &mut t, FlashOptions { verify: true }, &mut |_| {}).unwrap_err());
            let range = if bmap { format!("{}..{}", MIB, 4 * MIB) } else { format!("{}..{}", 0, 4 * MIB) };
            assert!(err.contains("verify failed") && err.contains(&range) && err.contains(&format!("byte {at}")), "bmap {bmap}: {err}");
            // With --no-verify the corruption goes unnoticed: that is what verify is for.
            let mut t = FlipByte { inner: open_target(&out, image.size).unwrap(), at };
            assert!(flash(&image, &mut t, FlashOptions { verify: false }, &mut |_| {}).is_ok());
        }
    }

    /// A damaged image is caught against its bmap's checksums while writing.
    #[test]
    fn image_not_matching_its_bmap_is_reported() {
        let d = tempfile::tempdir().unwrap();
        let img = image(d.path());
        let mut f = OpenOptions::new().write(true).open(&img).unwrap();
        f.seek(SeekFrom::Start(MIB + 5)).unwrap();
        f.write_all(b"X").unwrap();
        let image = Image::open(&img, None).unwrap();
        let mut t = open_target(&d.path().join("card"), image.size).unwrap();
        let err = format!("{:#}", flash(&image, &mut t, FlashOptions { verify: true }, &mut |_| {}).unwrap_err());
        assert!(err.contains("do not match its bmap") && err.contains(&format!("{}..{}", MIB, 4 * MIB)), "{err}");
    }
}
