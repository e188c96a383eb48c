//! The bmaptool block map (`disk.img.bmap`, format 2.0): which 4 KiB blocks of an image hold data,
//! with a sha256 per range, so `bmaptool copy` and `kiln flash` write only those and verify them.
//!
//! The XML layout follows what `bmaptool create` (bmap-tools 3.6, `BmapCreate.py`) writes, and the
//! file checksum is computed as `BmapCopy.py` checks it: sha256 of the file with the value of
//! `<BmapFileChecksum>` replaced by 64 ASCII `0`s. A range's checksum covers its blocks, the last
//! one cut at the image's end when the image size is not a multiple of the block size.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// The block size kiln writes (bmaptool's default and the page size of every target).
pub const BLOCK_SIZE: u64 = 4096;

/// One `<Range>`: blocks `first..=last`, with the sha256 of their bytes if the bmap has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedRange {
    pub first: u64,
    pub last: u64,
    pub sha256: Option<[u8; 32]>,
}

/// A parsed or computed block map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bmap {
    pub image_size: u64,
    pub block_size: u64,
    /// Sorted, non-overlapping.
    pub ranges: Vec<MappedRange>,
}

impl Bmap {
    pub fn blocks_count(&self) -> u64 {
        self.image_size.div_ceil(self.block_size)
    }

    pub fn mapped_blocks(&self) -> u64 {
        self.ranges.iter().map(|r| r.last - r.first + 1).sum()
    }

    /// The bytes of the image a range covers (the last block cut at the image's end).
    pub fn byte_range(&self, r: &MappedRange) -> Range<u64> {
        r.first * self.block_size..((r.last + 1) * self.block_size).min(self.image_size)
    }

    /// The mapped bytes (what a bmap-aware copy writes).
    pub fn mapped_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| self.byte_range(r)).map(|b| b.end - b.start).sum()
    }

    /// The block map of `image` whose data lies in `mapped` (byte ranges, in any order, rounded
    /// out to whole blocks and merged), with each range's sha256 read from the image once.
    pub fn from_ranges(image: &Path, mapped: &[Range<u64>]) -> Result<Bmap> {
        let mut f = File::open(image).with_context(|| format!("opening {}", image.display()))?;
        let image_size = f.metadata().with_context(|| format!("reading the size of {}", image.display()))?.len();
        let blocks = merge_blocks(mapped, image_size, BLOCK_SIZE);
        let mut bmap = Bmap { image_size, block_size: BLOCK_SIZE, ranges: Vec::with_capacity(blocks.len()) };
        for b in blocks {
            let mut r = MappedRange { first: b.start, last: b.end - 1, sha256: None };
            let bytes = bmap.byte_range(&r);
            r.sha256 = Some(
                sha256_of(&mut f, bytes.clone())
                    .with_context(|| format!("reading bytes {}..{} of {}", bytes.start, bytes.end, image.display()))?,
            );
            bmap.ranges.push(r);
        }
        Ok(bmap)
    }

    /// The block map of a sparse image from its allocated extents (`SEEK_DATA`/`SEEK_HOLE`), as
    /// `bmaptool create` does, for images whose data ranges are not otherwise known.
    pub fn from_sparse_file(image: &Path) -> Result<Bmap> {
        let f = File::open(image).with_context(|| format!("opening {}", image.display()))?;
        let ranges = data_ranges(&f).with_context(|| format!("finding the data extents of {}", image.display()))?;
        drop(f);
        Bmap::from_ranges(image, &ranges)
    }

    /// The bmap file's text, checksummed, laid out as `bmaptool create` writes it.
    pub fn to_xml(&self) -> String {
        let unsummed = self.xml_with_checksum(&"0".repeat(64));
        let sum = hex::encode(Sha256::digest(unsummed.as_bytes()));
        self.xml_with_checksum(&sum)
    }

    fn xml_with_checksum(&self, checksum: &str) -> String {
        use std::fmt::Write;
        let mut x = String::new();
        let pct = if self.blocks_count() == 0 { 0.0 } else { self.mapped_blocks() as f64 * 100.0 / self.blocks_count() as f64 };
        x.push_str("<?xml version=\"1.0\" ?>\n");
        x.push_str("<!-- Block map written by kiln: the blocks of the image that hold data, with the sha256\n");
        x.push_str("     of each range. `bmaptool copy` and `kiln flash` write only these blocks. -->\n\n");
        x.push_str("<bmap version=\"2.0\">\n");
        let _ = writeln!(x, "    <!-- Image size in bytes: {} -->", crate::size::human(self.image_size));
        let _ = writeln!(x, "    <ImageSize> {} </ImageSize>\n", self.image_size);
        x.push_str("    <!-- Size of a block in bytes -->\n");
        let _ = writeln!(x, "    <BlockSize> {} </BlockSize>\n", self.block_size);
        x.push_str("    <!-- Count of blocks in the image file -->\n");
        let _ = writeln!(x, "    <BlocksCount> {} </BlocksCount>\n", self.blocks_count());
        let _ =
            writeln!(x, "    <!-- Count of mapped blocks: {} or {pct:.1}% -->", crate::size::human(self.mapped_blocks() * self.block_size));
        let _ = writeln!(x, "    <MappedBlocksCount> {} </MappedBlocksCount>\n", self.mapped_blocks());
        x.push_str("    <!-- Type of checksum used in this file -->\n");
        x.push_str("    <ChecksumType> sha256 </ChecksumType>\n\n");
        x.push_str("    <!-- The checksum of this bmap file. When it is calculated, the value of\n");
        x.push_str("         the checksum has be zero (all ASCII \"0\" symbols).  -->\n");
        let _ = writeln!(x, "    <BmapFileChecksum> {checksum} </BmapFileChecksum>\n");
        x.push_str("    <!-- The block map: ranges of blocks or single blocks, each with the sha256 of its bytes. -->\n");
        x.push_str("    <BlockMap>\n");
        for r in &self.ranges {
            let blocks = if r.first == r.last { r.first.to_string() } else { format!("{}-{}", r.first, r.last) };
            match &r.sha256 {
                Some(s) => {
                    let _ = writeln!(x, "        <Range chksum=\"{}\"> {blocks} </Range>", hex::encode(s));
                }
                None => {
                    let _ = writeln!(x, "        <Range> {blocks} </Range>");
                }
            }
        }
        x.push_str("    </BlockMap>\n</bmap>\n");
        x
    }

    /// Writes the bmap file.
    pub fn write(&self, out: &Path) -> Result<()> {
        std::fs::write(out, self.to_xml()).with_context(|| format!("writing {}", out.display()))
    }

    /// Reads and parses a bmap file (ours or `bmaptool create`'s), checking its file checksum.
    pub fn read(path: &Path) -> Result<Bmap> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Bmap::parse(&text).with_context(|| format!("parsing the block map {}", path.display()))
    }

    /// Parses a bmap file's text (format 2.x, sha256), checking its file checksum.
    pub fn parse(raw: &str) -> Result<Bmap> {
        // bmaptool's comments name the elements (`<BlocksCount>` blocks...): read without them.
        let text = &strip_comments(raw);
        let version = attr(text, "<bmap", "version").context("no <bmap version=\"...\"> element")?;
        if !version.starts_with("2.") {
            bail!("bmap format version {version} is not supported (kiln reads 2.x, as bmaptool 3.x writes)");
        }
        let checksum_type = element(text, "ChecksumType")?;
        if checksum_type != "sha256" {
            bail!("checksum type {checksum_type} is not supported (kiln reads sha256 bmaps)");
        }
        let file_sum = element(text, "BmapFileChecksum")?;
        // As BmapCopy.py: the first occurrence of the value in the file, zeroed.
        let pos = raw.find(file_sum).expect("the element's text is in the file");
        let zeroed = format!("{}{}{}", &raw[..pos], "0".repeat(file_sum.len()), &raw[pos + file_sum.len()..]);
        let computed = hex::encode(Sha256::digest(zeroed.as_bytes()));
        if computed != file_sum {
            bail!("the bmap file's checksum does not match (recorded {file_sum}, computed {computed}): it is damaged or was edited");
        }
        let image_size: u64 = number(text, "ImageSize")?;
        let block_size: u64 = number(text, "BlockSize")?;
        if block_size == 0 {
            bail!("<BlockSize> is 0");
        }
        let bmap_blocks: u64 = number(text, "BlocksCount")?;
        let mapped: u64 = number(text, "MappedBlocksCount")?;
        let body = text.split_once("<BlockMap>").and_then(|(_, b)| b.split_once("</BlockMap>")).context("no <BlockMap> element")?.0;
        let mut bmap = Bmap { image_size, block_size, ranges: Vec::new() };
        if bmap.blocks_count() != bmap_blocks {
            bail!("<BlocksCount> {bmap_blocks} does not match <ImageSize> {image_size} / <BlockSize> {block_size}");
        }
        for chunk in body.split("<Range").skip(1) {
            let (open, rest) = chunk.split_once('>').context("unterminated <Range")?;
            let blocks = rest.split_once("</Range>").context("<Range> without </Range>")?.0.trim();
            let sha256 = match attr(&format!("<Range{open}>"), "<Range", "chksum") {
                Some(s) => Some(parse_sha256(&s).with_context(|| format!("range {blocks}: chksum {s}"))?),
                None => None,
            };
            let (first, last) = match blocks.split_once('-') {
                Some((a, b)) => (a.trim().parse::<u64>(), b.trim().parse::<u64>()),
                None => (blocks.parse::<u64>(), blocks.parse::<u64>()),
            };
            let (first, last) = match (first, last) {
                (Ok(a), Ok(b)) if a <= b => (a, b),
                _ => bail!("bad block range {blocks:?}"),
            };
            if last >= bmap_blocks {
                bail!("range {blocks} reaches past the image's {bmap_blocks} blocks");
            }
            if bmap.ranges.last().is_some_and(|p| p.last >= first) {
                bail!("range {blocks} overlaps or precedes the range before it");
            }
            bmap.ranges.push(MappedRange { first, last, sha256 });
        }
        if bmap.mapped_blocks() != mapped {
            bail!("<MappedBlocksCount> {mapped} does not match the {} blocks of <BlockMap>", bmap.mapped_blocks());
        }
        Ok(bmap)
    }
}

/// Writes `out`, the block map of `image` whose data lies in the byte ranges `mapped` (any order;
/// rounded out to 4 KiB blocks and merged). Reads each mapped range of the image once.
pub fn write_bmap(image: &Path, mapped: &[Range<u64>], out: &Path) -> Result<Bmap> {
    let bmap = Bmap::from_ranges(image, mapped)?;
    bmap.write(out)?;
    Ok(bmap)
}

/// The allocated (data) extents of a file, from `SEEK_DATA`/`SEEK_HOLE`. On a file system without
/// hole reporting this is the whole file, which is still correct, only not sparse.
pub fn data_ranges(f: &File) -> std::io::Result<Vec<Range<u64>>> {
    use std::os::fd::AsRawFd;
    let size = f.metadata()?.len();
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on a descriptor we own; it only moves the file offset.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        out.push(data as u64..hole as u64);
        pos = hole as u64;
    }
    Ok(out)
}

/// Byte ranges rounded out to blocks of `block_size`, clipped to the image, sorted and merged
/// (adjacent ranges join, as bmaptool's do), as block-number ranges.
pub fn merge_blocks(mapped: &[Range<u64>], image_size: u64, block_size: u64) -> Vec<Range<u64>> {
    let mut blocks: Vec<Range<u64>> = mapped
        .iter()
        .filter_map(|r| {
            let end = r.end.min(image_size);
            (r.start < end).then(|| r.start / block_size..end.div_ceil(block_size))
        })
        .collect();
    blocks.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(blocks.len());
    for b in blocks {
        match merged.last_mut() {
            Some(m) if b.start <= m.end => m.end = m.end.max(b.end),
            _ => merged.push(b),
        }
    }
    merged
}

/// The sha256 of `bytes` of a file.
pub fn sha256_of(f: &mut (impl Read + Seek + ?Sized), bytes: Range<u64>) -> std::io::Result<[u8; 32]> {
    f.seek(SeekFrom::Start(bytes.start))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes.end - bytes.start;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.read_exact(&mut buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(h.finalize().into())
}

fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("<!--") {
        out.push_str(&rest[..start]);
        rest = match rest[start..].find("-->") {
            Some(end) => &rest[start + end + 3..],
            None => "",
        };
    }
    out.push_str(rest);
    out
}

fn parse_sha256(s: &str) -> Result<[u8; 32]> {
    let v = hex::decode(s).context("not hexadecimal")?;
    v.try_into().map_err(|_| anyhow::anyhow!("not a sha256 (64 hex digits)"))
}

/// The trimmed text of the first `<name>...</name>`.
fn element<'a>(text: &'a str, name: &str) -> Result<&'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = text.find(&open).with_context(|| format!("no <{name}> element"))? + open.len();
    let len = text[start..].find(&close).with_context(|| format!("<{name}> is not closed"))?;
    Ok(text[start..start + len].trim())
}

fn number(text: &str, name: &str) -> Result<u64> {
    let v = element(text, name)?;
    v.parse().with_context(|| format!("<{name}> {v:?} is not a number"))
}

/// The value of attribute `name` of the first tag starting with `tag` (e.g. `<bmap`).
fn attr(text: &str, tag: &str, name: &str) -> Option<String> {
    let start = text.find(tag)?;
    let end = start + text[start..].find('>')?;
    let head = &text[start..end];
    let key = format!("{name}=");
    let at = head.find(&key)? + key.len();
    let quote = head[at..].chars().next()?;
    if quote != '"' && quote != '\'' {
        return None;
    }
    let rest = &head[at + 1..];
    Some(rest[..rest.find(quote)?].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::Command;

    /// A 10 MiB sparse image with data at block 3 (5 bytes), blocks 100..105 and the last 1000
    /// bytes (the file's size is not a multiple of 4096).
    fn sparse_image(dir: &Path) -> (std::path::PathBuf, Vec<Range<u64>>) {
        let p = dir.join("img");
        let size = 10 * 1024 * 1024 + 1000;
        let mut f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        let mut put = |off: u64, data: &[u8]| {
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(data).unwrap();
        };
        put(3 * 4096, b"hello");
        let noise: Vec<u8> = (0..20000u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
        put(100 * 4096, &noise);
        put(size - 1000, &[0xab; 1000]);
        (p, vec![3 * 4096..3 * 4096 + 5, 100 * 4096..100 * 4096 + 20000, size - 1000..size])
    }

    fn have_bmaptool() -> bool {
        Command::new("bmaptool").arg("--version").output().is_ok_and(|o| o.status.success())
    }

    #[test]
    fn ranges_round_out_to_blocks_and_merge() {
        let m = merge_blocks(&[8192..8193, 0..10, 4096..4097, 20000..30000, 1 << 40..(1 << 40) + 1], 40000, 4096);
        assert_eq!(m, vec![0..3, 4..8]);
    }

    #[test]
    fn written_bmap_parses_back_and_checks_its_checksum() {
        let d = tempfile::tempdir().unwrap();
        let (img, mapped) = sparse_image(d.path());
        let bmap = Bmap::from_ranges(&img, &mapped).unwrap();
        assert_eq!(bmap.ranges.iter().map(|r| (r.first, r.last)).collect::<Vec<_>>(), vec![(3, 3), (100, 104), (2560, 2560)]);
        assert_eq!(bmap.blocks_count(), 2561);
        let xml = bmap.to_xml();
        assert_eq!(Bmap::parse(&xml).unwrap(), bmap);
        let tampered = xml.replace("<ImageSize> 10486760 </ImageSize>", "<ImageSize> 10486761 </ImageSize>");
        assert_ne!(tampered, xml);
        let err = format!("{:#}", Bmap::parse(&tampered).unwrap_err());
        assert!(err.contains("checksum does not match"), "{err}");
    }

    #[test]
    fn sparse_file_extents_cover_the_data() {
        let d = tempfile::tempdir().unwrap();
        let (img, mapped) = sparse_image(d.path());
        let bmap = Bmap::from_sparse_file(&img).unwrap();
        // File systems allocate in their own block size, so the extents may be larger than the
        // data, never smaller.
        for r in &mapped {
            let (first, last) = (r.start / 4096, (r.end - 1) / 4096);
            assert!(bmap.ranges.iter().any(|m| m.first <= first && last <= m.last), "{r:?} not in {:?}", bmap.ranges);
        }
        assert!(bmap.mapped_blocks() < bmap.blocks_count() / 2, "{bmap:?}");
    }

    /// `bmaptool copy` accepts our bmap, and writes the image's mapped ranges to the destination.
    #[test]
    fn bmaptool_copy_accepts_our_bmap() {
        if !have_bmaptool() {
            eprintln!("skipped: bmaptool not installed (package bmap-tools)");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let (img, mapped) = sparse_image(d.path());
        let bmap = write_bmap(&img, &mapped, &d.path().join("img.bmap")).unwrap();
        let dest = d.path().join("dest");
        let out = Command::new("bmaptool").arg("copy").arg("--bmap").arg(d.path().join("img.bmap")).arg(&img).arg(&dest).output().unwrap();
        assert!(out.status.success(), "bmaptool copy: {}", String::from_utf8_lossy(&out.stderr));
        let (a, b) = (std::fs::read(&img).unwrap(), std::fs::read(&dest).unwrap());
        assert_eq!(a.len(), b.len());
        for r in &bmap.ranges {
            let br = bmap.byte_range(r);
            assert!(a[br.start as usize..br.end as usize] == b[br.start as usize..br.end as usize], "range {r:?} differs");
        }
    }

    /// Our parser reads what `bmaptool create` writes, with the same ranges and checksums.
    #[test]
    fn parses_bmaptool_create_output() {
        if !have_bmaptool() {
            eprintln!("skipped: bmaptool not installed (package bmap-tools)");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let (img, _) = sparse_image(d.path());
        let out = Command::new("bmaptool").arg("create").arg(&img).output().unwrap();
        assert!(out.status.success(), "bmaptool create: {}", String::from_utf8_lossy(&out.stderr));
        let theirs = Bmap::parse(std::str::from_utf8(&out.stdout).unwrap()).unwrap();
        assert_eq!(theirs, Bmap::from_sparse_file(&img).unwrap());
    }
}
