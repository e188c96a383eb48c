//! FAT32 filesystem writer: turns a [`Tree`] of directories and regular files into the bytes of
//! the EFI system partition (fsck.vfat-clean, readable by mtools, OVMF, AAVMF and U-Boot).
//!
//! The format is written directly rather than through the `fatfs` crate, whose released version
//! writes `.`/`..` entries that fsck rejects. The layout is deliberately simple and reproducible:
//! root directory at cluster 2, then every directory, then every file, each one contiguous, all
//! in the tree's sorted order; every time stamp comes from [`FatOptions::mtime`].

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};

use anyhow::{bail, Context, Result};

use crate::tree::{Content, Kind, Tree, TreePath};

const SECTOR: u64 = 512;
const RESERVED_SECTORS: u32 = 32;
const FAT_COUNT: u32 = 2;
const FSINFO_SECTOR: u64 = 1;
const BACKUP_BOOT_SECTOR: u64 = 6;
const ROOT_CLUSTER: u32 = 2;
const MEDIA: u8 = 0xF8;
/// Below this many clusters a volume is FAT16 by the specification's count rule, whatever its
/// BPB says; some readers (and fsck) then misjudge it.
pub const FAT32_MIN_CLUSTERS: u32 = 65525;
/// Largest cluster number FAT32 can address (0x0FFFFFF6 and up are reserved values).
const FAT32_MAX_CLUSTERS: u32 = 0x0FFF_FFF5 - 2;
/// Cluster sizes tried, largest first (in sectors): 4 KiB clusters for large volumes, down to
/// 512 bytes for small ones, so small ESPs still reach the FAT32 minimum cluster count.
const SECTORS_PER_CLUSTER_CHOICES: [u32; 4] = [8, 4, 2, 1];
const DIR_ENTRY: usize = 32;
/// The FAT specification caps a directory at 65536 entries (2 MiB); readers index them in 16 bits.
const MAX_DIR_ENTRIES: usize = 65536;
const LFN_CHARS_PER_ENTRY: usize = 13;
const MAX_LFN_UNITS: usize = 255;

const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_DIRECTORY: u8 = 0x10;
const ATTR_ARCHIVE: u8 = 0x20;
const ATTR_LFN: u8 = 0x0F;
const FAT_END_OF_CHAIN: u32 = 0x0FFF_FFFF;

/// Inputs that make the filesystem reproducible.
#[derive(Debug, Clone)]
pub struct FatOptions {
    /// Volume serial number; the caller derives it from its inputs (reproducible).
    pub volume_id: u32,
    /// Volume label, at most 11 characters, stored upper-case (e.g. "KILN-ESP"). Empty means none.
    pub label: String,
    /// Unix seconds used for every directory entry's times (UTC), clamped to FAT's 1980..2107.
    pub mtime: u64,
}

/// Failures a caller may want to act on (e.g. retry with a larger size).
#[derive(Debug, thiserror::Error)]
pub enum FatError {
    #[error(
        "the tree needs {needed_clusters} clusters of {cluster_bytes} bytes, but a FAT32 filesystem of \
         {size} bytes holds only {available_clusters}: use a larger size (fat32_size_for computes one)"
    )]
    TooSmall { size: u64, cluster_bytes: u64, needed_clusters: u64, available_clusters: u64 },
    #[error(
        "{size} bytes is too small for FAT32 (it needs at least {FAT32_MIN_CLUSTERS} clusters of 512 bytes; \
         about 33 MiB)"
    )]
    BelowMinimum { size: u64 },
    #[error("{size} bytes is not a usable FAT32 size ({why})")]
    BadSize { size: u64, why: &'static str },
}

/// Smallest size (bytes, a multiple of 1 MiB) of a FAT32 filesystem that holds `tree` with at least
/// `headroom` bytes free, and never below the FAT32 minimum cluster count.
pub fn fat32_size_for(tree: &Tree, headroom: u64) -> Result<u64> {
    const MIB: u64 = 1 << 20;
    let plan = Plan::build(tree)?;
    // The data alone bounds the size from below; FAT and slack overhead are a few percent, so
    // walking up 1 MiB at a time from there takes few steps.
    let mut mib = ((plan.content_bytes + headroom) / MIB).max(32);
    loop {
        let size = mib * MIB;
        if size / SECTOR > u64::from(u32::MAX) {
            bail!("no FAT32 filesystem up to 2 TiB holds this tree with {headroom} bytes of headroom");
        }
        if let Ok(layout) = Layout::for_size(size) {
            let cluster_bytes = layout.cluster_bytes();
            let needed = plan.allocate(cluster_bytes).used_clusters;
            let available = u64::from(layout.clusters);
            if needed <= available && (available - needed) * cluster_bytes >= headroom {
                return Ok(size);
            }
        }
        mib += 1;
    }
}

/// Writes a FAT32 filesystem of exactly `size` bytes holding `tree`, starting at `out`'s current stream
/// position. `out` must already be zero-filled over that range (e.g. a fresh file extended with set_len):
/// the writer may seek over regions that stay zero instead of writing them.
pub fn write_fat32<W: Write + Seek>(out: &mut W, size: u64, tree: &Tree, opts: &FatOptions) -> Result<()> {
    let label = volume_label(&opts.label)?;
    let plan = Plan::build(tree)?;
    let layout = Layout::for_size(size)?;
    let cluster_bytes = layout.cluster_bytes();
    let alloc = plan.allocate(cluster_bytes);
    if alloc.used_clusters > u64::from(layout.clusters) {
        return Err(FatError::TooSmall {
            size,
            cluster_bytes,
            needed_clusters: alloc.used_clusters,
            available_clusters: u64::from(layout.clusters),
        }
        .into());
    }
    let stamp = Stamp::from_unix(opts.mtime);
    let base = out.stream_position().context("reading the FAT32 writer's start position")?;
    let mut w = Placed { out, base };

    let used = alloc.used_clusters as u32; // <= layout.clusters, a u32
    let boot = boot_sector(&layout, opts.volume_id, &label);
    let info = fsinfo_sector(layout.clusters - used, used);
    for (sector, bytes) in [(0, &boot), (FSINFO_SECTOR, &info), (BACKUP_BOOT_SECTOR, &boot), (BACKUP_BOOT_SECTOR + 1, &info)] {
        w.write_at(sector * SECTOR, bytes).context("writing the FAT32 boot sectors")?;
    }

    let fat = fat_table(&alloc);
    for copy in 0..FAT_COUNT {
        let offset = u64::from(RESERVED_SECTORS + copy * layout.fat_sectors) * SECTOR;
        w.write_at(offset, &fat).context("writing the file allocation table")?;
    }

    for (i, dir) in plan.dirs.iter().enumerate() {
        let bytes = plan.dir_bytes(i, &alloc, cluster_bytes, &label, &stamp);
        w.write_at(layout.cluster_offset(alloc.dir_start[i]), &bytes).with_context(|| format!("writing directory {}", dir.path))?;
    }

    for (i, file) in plan.files.iter().enumerate() {
        if file.size == 0 {
            continue;
        }
        w.seek_to(layout.cluster_offset(alloc.file_start[i]))?;
        write_file_data(w.out, file).with_context(|| format!("writing {} into the FAT32 filesystem", file.path))?;
    }
    w.seek_to(size).context("seeking to the end of the FAT32 filesystem")?;
    Ok(())
}

/// A writer whose offsets are relative to where the filesystem starts.
struct Placed<'w, W> {
    out: &'w mut W,
    base: u64,
}

impl<W: Write + Seek> Placed<'_, W> {
    fn seek_to(&mut self, offset: u64) -> std::io::Result<()> {
        self.out.seek(SeekFrom::Start(self.base + offset)).map(|_| ())
    }

    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.seek_to(offset)?;
        self.out.write_all(bytes)
    }
}

/// Streams a file's contents in chunks rather than reading them whole.
fn write_file_data<W: Write>(out: &mut W, file: &FileNode<'_>) -> Result<()> {
    let mut reader = file.content.stream().take(file.size);
    let copied = std::io::copy(&mut reader, out).context("copying file contents")?;
    if copied != file.size {
        bail!("contents shrank from {} to {copied} bytes while the image was written", file.size);
    }
    Ok(())
}

/// Where the regions of a FAT32 filesystem of a given size lie.
#[derive(Debug, Clone, Copy)]
struct Layout {
    total_sectors: u32,
    sectors_per_cluster: u32,
    fat_sectors: u32,
    /// Data clusters (numbered 2 ..= clusters + 1).
    clusters: u32,
}

impl Layout {
    /// Picks the largest cluster size (up to 4 KiB) that still gives FAT32's minimum cluster count.
    fn for_size(size: u64) -> Result<Layout, FatError> {
        if size % SECTOR != 0 {
            return Err(FatError::BadSize { size, why: "not a multiple of 512-byte sectors" });
        }
        let total_sectors = u32::try_from(size / SECTOR).map_err(|_| FatError::BadSize { size, why: "over 2 TiB" })?;
        SECTORS_PER_CLUSTER_CHOICES
            .iter()
            .filter_map(|&spc| Layout::with_cluster_size(total_sectors, spc))
            .find(|l| l.clusters >= FAT32_MIN_CLUSTERS)
            .ok_or(FatError::BelowMinimum { size })
    }

    fn with_cluster_size(total_sectors: u32, sectors_per_cluster: u32) -> Option<Layout> {
        let entries_per_sector = (SECTOR / 4) as u32;
        // FAT size and cluster count depend on each other: grow the FAT until it covers the
        // clusters left beside it (each step only shrinks the cluster count, so this settles).
        // Keeping the FAT size a multiple of 4 sectors puts the data region on a 4 KiB boundary
        // (32 reserved + 2 x 4k sectors), which flash media prefer.
        let mut fat_sectors = 4u32;
        loop {
            let data_sectors = total_sectors.checked_sub(RESERVED_SECTORS + FAT_COUNT * fat_sectors)?;
            let clusters = (data_sectors / sectors_per_cluster).min(FAT32_MAX_CLUSTERS);
            let needed = (clusters + 2).div_ceil(entries_per_sector).next_multiple_of(4);
            if needed <= fat_sectors {
                return Some(Layout { total_sectors, sectors_per_cluster, fat_sectors, clusters });
            }
            fat_sectors = needed;
        }
    }

    fn cluster_bytes(&self) -> u64 {
        u64::from(self.sectors_per_cluster) * SECTOR
    }

    fn data_start(&self) -> u64 {
        u64::from(RESERVED_SECTORS + FAT_COUNT * self.fat_sectors) * SECTOR
    }

    fn cluster_offset(&self, cluster: u32) -> u64 {
        self.data_start() + u64::from(cluster - 2) * self.cluster_bytes()
    }
}

/// The tree, checked and named for FAT: directories (root first) and files, each child with
/// its short name and, where needed, its long name.
struct Plan<'t> {
    dirs: Vec<DirNode>,
    files: Vec<FileNode<'t>>,
    content_bytes: u64,
}

struct DirNode {
    path: TreePath,
    parent: Option<usize>,
    children: Vec<Child>,
}

struct FileNode<'t> {
    path: &'t TreePath,
    content: &'t Content,
    size: u64,
}

struct Child {
    short: [u8; 11],
    /// UTF-16 long name, when the name is not a valid upper-case 8.3 name.
    long: Option<Vec<u16>>,
    target: Target,
}

#[derive(Clone, Copy)]
enum Target {
    Dir(usize),
    File(usize),
}

impl Child {
    fn slots(&self) -> usize {
        1 + self.long.as_ref().map_or(0, |l| l.len().div_ceil(LFN_CHARS_PER_ENTRY))
    }
}

/// Clusters given to each directory and file, allocated one after another from cluster 2.
struct Allocation {
    dir_start: Vec<u32>,
    file_start: Vec<u32>,
    /// Every chain as (first cluster, length), in cluster order.
    extents: Vec<(u32, u64)>,
    used_clusters: u64,
}

impl<'t> Plan<'t> {
    fn build(tree: &'t Tree) -> Result<Plan<'t>> {
        let mut dirs: Vec<DirNode> = Vec::new();
        let mut files: Vec<FileNode<'t>> = Vec::new();
        let mut dir_index: HashMap<TreePath, usize> = HashMap::new();
        // Children by directory, in the tree's sorted order, before naming.
        let mut pending: Vec<Vec<(&'t str, Target)>> = Vec::new();
        let mut content_bytes = 0u64;

        if let Some((p, e)) = tree.iter().next() {
            if p.is_root() && !matches!(e.kind, Kind::Dir) {
                bail!("the ESP tree's root is not a directory");
            }
        }
        dirs.push(DirNode { path: TreePath::root(), parent: None, children: Vec::new() });
        pending.push(Vec::new());
        dir_index.insert(TreePath::root(), 0);

        for (path, entry) in tree.iter().filter(|(p, _)| !p.is_root()) {
            let parent = path.parent().unwrap_or_else(TreePath::root);
            let &parent_idx = dir_index.get(&parent).with_context(|| format!("{path} has no parent directory in the ESP tree"))?;
            let target = match &entry.kind {
                Kind::Dir => {
                    dirs.push(DirNode { path: path.clone(), parent: Some(parent_idx), children: Vec::new() });
                    pending.push(Vec::new());
                    dir_index.insert(path.clone(), dirs.len() - 1);
                    Target::Dir(dirs.len() - 1)
                }
                Kind::File(content) => {
                    let size = content.len().with_context(|| format!("reading the size of {path}"))?;
                    if size > u64::from(u32::MAX) {
                        bail!("{path} is {size} bytes; FAT32 files must be under 4 GiB");
                    }
                    content_bytes += size;
                    files.push(FileNode { path, content, size });
                    Target::File(files.len() - 1)
                }
                other => bail!("{path} is a {}; a FAT32 filesystem holds only directories and regular files", kind_name(other)),
            };
            pending[parent_idx].push((path.file_name(), target));
        }

        for (i, children) in pending.into_iter().enumerate() {
            let named = name_children(&dirs[i].path, &children)?;
            let header = if i == 0 { 1 } else { 2 }; // volume label, or `.` and `..`
            let slots: usize = header + named.iter().map(Child::slots).sum::<usize>();
            if slots > MAX_DIR_ENTRIES {
                bail!("directory {} needs {slots} entries; FAT allows {MAX_DIR_ENTRIES}", dirs[i].path);
            }
            dirs[i].children = named;
        }
        Ok(Plan { dirs, files, content_bytes })
    }

    fn dir_slots(&self, i: usize) -> usize {
        let header = if i == 0 { 1 } else { 2 };
        header + self.dirs[i].children.iter().map(Child::slots).sum::<usize>()
    }

    fn allocate(&self, cluster_bytes: u64) -> Allocation {
        let mut next = u64::from(ROOT_CLUSTER);
        let mut extents = Vec::new();
        let mut take = |clusters: u64| -> u32 {
            if clusters == 0 {
                return 0;
            }
            let start = next;
            next += clusters;
            // Clamped only for absurd trees; the caller compares used_clusters to the layout first.
            let start = u32::try_from(start).unwrap_or(u32::MAX);
            extents.push((start, clusters));
            start
        };
        let dir_start =
            (0..self.dirs.len()).map(|i| take(((self.dir_slots(i) * DIR_ENTRY) as u64).div_ceil(cluster_bytes).max(1))).collect();
        let file_start = self.files.iter().map(|f| take(f.size.div_ceil(cluster_bytes))).collect();
        Allocation { dir_start, file_start, extents, used_clusters: next - u64::from(ROOT_CLUSTER) }
    }

    /// The directory's clusters: header entries, then each child's long-name entries and short entry.
    fn dir_bytes(&self, i: usize, alloc: &Allocation, cluster_bytes: u64, label: &[u8; 11], stamp: &Stamp) -> Vec<u8> {
        let dir = &self.dirs[i];
        let size = ((self.dir_slots(i) * DIR_ENTRY) as u64).div_ceil(cluster_bytes).max(1) * cluster_bytes;
        let mut bytes = Vec::with_capacity(size as usize);
        match dir.parent {
            None => {
                if label != NO_LABEL {
                    bytes.extend(short_entry(label, ATTR_VOLUME_ID, 0, 0, stamp));
                }
            }
            Some(parent) => {
                bytes.extend(short_entry(b".          ", ATTR_DIRECTORY, alloc.dir_start[i], 0, stamp));
                // `..` pointing at the root is written as cluster 0, as the specification requires.
                let up = if parent == 0 { 0 } else { alloc.dir_start[parent] };
                bytes.extend(short_entry(b"..         ", ATTR_DIRECTORY, up, 0, stamp));
            }
        }
        for child in &dir.children {
            if let Some(long) = &child.long {
                for e in lfn_entries(long, &child.short) {
                    bytes.extend(e);
                }
            }
            let (attr, cluster, len) = match child.target {
                Target::Dir(d) => (ATTR_DIRECTORY, alloc.dir_start[d], 0),
                // Sizes were checked to fit in u32 when the plan was built.
                Target::File(f) => (ATTR_ARCHIVE, alloc.file_start[f], self.files[f].size as u32),
            };
            bytes.extend(short_entry(&child.short, attr, cluster, len, stamp));
        }
        bytes.resize(size as usize, 0);
        bytes
    }
}

fn kind_name(kind: &Kind) -> &'static str {
    match kind {
        Kind::Dir => "directory",
        Kind::File(_) => "regular file",
        Kind::Symlink(_) => "symlink",
        Kind::CharDevice { .. } => "character device",
        Kind::BlockDevice { .. } => "block device",
        Kind::Fifo => "fifo",
    }
}

/// Gives each child of `dir` its short name (and long name where needed), refusing names FAT
/// cannot hold and names that differ only in case.
fn name_children(dir: &TreePath, children: &[(&str, Target)]) -> Result<Vec<Child>> {
    let mut seen: HashMap<String, &str> = HashMap::new();
    for (name, _) in children {
        check_long_name(dir, name)?;
        if let Some(other) = seen.insert(name.to_uppercase(), name) {
            bail!("{dir} holds both `{other}` and `{name}`, which FAT (case-insensitive) cannot tell apart");
        }
    }
    // Names that are already valid short names keep them; aliases are made around them, in
    // sorted order, so the result is deterministic.
    let mut taken: HashSet<[u8; 11]> = children.iter().filter_map(|(n, _)| exact_short_name(n)).collect();
    let mut named = Vec::with_capacity(children.len());
    for &(name, target) in children {
        let (short, long) = match exact_short_name(name) {
            Some(short) => (short, None),
            None => {
                let short = short_alias(name, &taken).with_context(|| format!("no free short name for {dir}/{name}"))?;
                taken.insert(short);
                (short, Some(name.encode_utf16().collect()))
            }
        };
        named.push(Child { short, long, target });
    }
    Ok(named)
}

/// Characters allowed in a short name besides upper-case letters and digits.
const SHORT_NAME_SPECIALS: &[u8] = b"!#$%&'()-@^_`{}~";

fn is_short_char(c: u8) -> bool {
    c.is_ascii_uppercase() || c.is_ascii_digit() || SHORT_NAME_SPECIALS.contains(&c)
}

/// The 11-byte short name if `name` already is a valid upper-case 8.3 name.
fn exact_short_name(name: &str) -> Option<[u8; 11]> {
    let (base, ext) = match name.split_once('.') {
        Some((b, e)) => (b, Some(e)),
        None => (name, None),
    };
    let valid = |s: &str, max: usize| !s.is_empty() && s.len() <= max && s.bytes().all(is_short_char);
    if !valid(base, 8) || ext.is_some_and(|e| !valid(e, 3)) {
        return None;
    }
    Some(pack_short(base.as_bytes(), ext.unwrap_or("").as_bytes()))
}

fn pack_short(base: &[u8], ext: &[u8]) -> [u8; 11] {
    let mut out = [b' '; 11];
    out[..base.len()].copy_from_slice(base);
    out[8..8 + ext.len()].copy_from_slice(ext);
    out
}

/// A short alias in the Windows style: `loader` -> `LOADER`, `kiln.conf` -> `KILN~1.CON`. A numeric
/// tail is added whenever the upper-cased name does not fit 8.3 as is, and bumped until unique.
fn short_alias(name: &str, taken: &HashSet<[u8; 11]>) -> Option<[u8; 11]> {
    let trimmed = name.trim_start_matches('.');
    let (base, ext, lossy) = match trimmed.rsplit_once('.') {
        Some((b, e)) => {
            let (base, lossy_base) = short_chars(b);
            let (ext, lossy_ext) = short_chars(e);
            (base, ext, lossy_base || lossy_ext)
        }
        None => {
            let (base, lossy) = short_chars(trimmed);
            (base, Vec::new(), lossy)
        }
    };
    let lossy = lossy || trimmed.len() != name.len();
    let base = if base.is_empty() { b"_".to_vec() } else { base };
    let fits = base.len() <= 8 && ext.len() <= 3;
    let ext = &ext[..ext.len().min(3)];
    if fits && !lossy {
        let plain = pack_short(&base, ext);
        if !taken.contains(&plain) {
            return Some(plain);
        }
    }
    (1..=999_999u32).find_map(|n| {
        let tail = format!("~{n}");
        let keep = base.len().min(8 - tail.len());
        let mut b = base[..keep].to_vec();
        b.extend_from_slice(tail.as_bytes());
        let candidate = pack_short(&b, ext);
        (!taken.contains(&candidate)).then_some(candidate)
    })
}

/// Upper-cases `part` into short-name characters, as Windows does: spaces and dots are dropped,
/// anything else not allowed becomes `_`. The flag says whether information was lost.
fn short_chars(part: &str) -> (Vec<u8>, bool) {
    let mut lossy = false;
    let mut out = Vec::new();
    for c in part.chars() {
        let upper = c.to_ascii_uppercase();
        if c == ' ' || c == '.' {
            lossy = true;
        } else if upper.is_ascii() && is_short_char(upper as u8) {
            out.push(upper as u8);
        } else {
            lossy = true;
            out.push(b'_');
        }
    }
    (out, lossy)
}

/// Refuses names that FAT long-name entries cannot hold or that readers would mangle.
fn check_long_name(dir: &TreePath, name: &str) -> Result<()> {
    let bad = |why: &str| anyhow::anyhow!("{dir}/{name}: {why}, which FAT cannot store");
    if let Some(c) = name.chars().find(|c| (*c as u32) < 0x20 || "\"*/:<>?\\|".contains(*c)) {
        return Err(bad(&format!("the name contains {c:?}")));
    }
    if name.ends_with('.') || name.ends_with(' ') {
        return Err(bad("the name ends in a dot or space (readers strip them)"));
    }
    if name.encode_utf16().count() > MAX_LFN_UNITS {
        return Err(bad("the name is longer than 255 UTF-16 units"));
    }
    Ok(())
}

/// The long-name entries for `long`, in on-disk order (last part first).
fn lfn_entries(long: &[u16], short: &[u8; 11]) -> Vec<[u8; 32]> {
    let sum = short_name_checksum(short);
    let parts: Vec<&[u16]> = long.chunks(LFN_CHARS_PER_ENTRY).collect();
    let mut entries = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate().rev() {
        // A short last part ends with a NUL, then 0xFFFF padding.
        let mut units = [0xFFFFu16; LFN_CHARS_PER_ENTRY];
        units[..part.len()].copy_from_slice(part);
        if part.len() < LFN_CHARS_PER_ENTRY {
            units[part.len()] = 0;
        }
        let mut e = [0u8; 32];
        e[0] = (i as u8 + 1) | if i + 1 == parts.len() { 0x40 } else { 0 };
        e[11] = ATTR_LFN;
        e[13] = sum;
        let offsets = (0..5).map(|k| 1 + 2 * k).chain((0..6).map(|k| 14 + 2 * k)).chain((0..2).map(|k| 28 + 2 * k));
        for (unit, off) in units.iter().zip(offsets) {
            e[off..off + 2].copy_from_slice(&unit.to_le_bytes());
        }
        entries.push(e);
    }
    entries
}

fn short_name_checksum(short: &[u8; 11]) -> u8 {
    short.iter().fold(0u8, |sum, &b| (sum >> 1 | (sum & 1) << 7).wrapping_add(b))
}

fn short_entry(name: &[u8; 11], attr: u8, cluster: u32, size: u32, stamp: &Stamp) -> [u8; 32] {
    let mut e = [0u8; 32];
    e[..11].copy_from_slice(name);
    e[11] = attr;
    e[13] = stamp.tenths;
    e[14..16].copy_from_slice(&stamp.time.to_le_bytes());
    e[16..18].copy_from_slice(&stamp.date.to_le_bytes());
    e[18..20].copy_from_slice(&stamp.date.to_le_bytes());
    e[20..22].copy_from_slice(&((cluster >> 16) as u16).to_le_bytes());
    e[22..24].copy_from_slice(&stamp.time.to_le_bytes());
    e[24..26].copy_from_slice(&stamp.date.to_le_bytes());
    e[26..28].copy_from_slice(&(cluster as u16).to_le_bytes());
    e[28..32].copy_from_slice(&size.to_le_bytes());
    e
}

const NO_LABEL: &[u8; 11] = b"NO NAME    ";

/// The label as stored: upper-case, space-padded to 11 bytes; "NO NAME" when empty.
fn volume_label(label: &str) -> Result<[u8; 11]> {
    if label.is_empty() {
        return Ok(*NO_LABEL);
    }
    let upper = label.to_ascii_uppercase();
    if upper.len() > 11 || !upper.bytes().all(|c| c == b' ' || is_short_char(c)) {
        bail!("FAT volume label `{label}` must be at most 11 characters of A-Z, 0-9, space and !#$%&'()-@^_`{{}}~");
    }
    let mut out = [b' '; 11];
    out[..upper.len()].copy_from_slice(upper.as_bytes());
    Ok(out)
}

fn fat_table(alloc: &Allocation) -> Vec<u8> {
    let entries = 2 + alloc.used_clusters as usize;
    let mut fat = vec![0u8; entries * 4];
    let mut put = |cluster: u64, value: u32| {
        let i = cluster as usize * 4;
        fat[i..i + 4].copy_from_slice(&value.to_le_bytes());
    };
    put(0, 0x0FFF_FF00 | u32::from(MEDIA));
    // Both "clean shutdown" and "no I/O error" bits set.
    put(1, FAT_END_OF_CHAIN);
    for &(start, len) in &alloc.extents {
        let start = u64::from(start);
        for c in start..start + len - 1 {
            put(c, (c + 1) as u32);
        }
        put(start + len - 1, FAT_END_OF_CHAIN);
    }
    fat
}

fn boot_sector(layout: &Layout, volume_id: u32, label: &[u8; 11]) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[0..3].copy_from_slice(&[0xEB, 0x58, 0x90]);
    b[3..11].copy_from_slice(b"MSWIN4.1"); // the OEM name the specification recommends
    b[11..13].copy_from_slice(&(SECTOR as u16).to_le_bytes());
    b[13] = layout.sectors_per_cluster as u8;
    b[14..16].copy_from_slice(&(RESERVED_SECTORS as u16).to_le_bytes());
    b[16] = FAT_COUNT as u8;
    // 17..21: root entry count and 16-bit sector count stay 0 on FAT32.
    b[21] = MEDIA;
    // CHS geometry is meaningless here, but mtools refuses a volume whose sector count is not
    // a multiple of sectors-per-track: 32 divides every size on a 16 KiB boundary.
    let sectors_per_track: u16 = if layout.total_sectors % 32 == 0 { 32 } else { 1 };
    b[24..26].copy_from_slice(&sectors_per_track.to_le_bytes());
    b[26..28].copy_from_slice(&64u16.to_le_bytes());
    // 28..32 hidden sectors: 0, the filesystem does not know where its partition lies.
    b[32..36].copy_from_slice(&layout.total_sectors.to_le_bytes());
    b[36..40].copy_from_slice(&layout.fat_sectors.to_le_bytes());
    // 40..44: flags 0 (FATs mirrored), version 0.0.
    b[44..48].copy_from_slice(&ROOT_CLUSTER.to_le_bytes());
    b[48..50].copy_from_slice(&(FSINFO_SECTOR as u16).to_le_bytes());
    b[50..52].copy_from_slice(&(BACKUP_BOOT_SECTOR as u16).to_le_bytes());
    b[64] = 0x80;
    b[66] = 0x29; // extended boot signature: id, label and type follow
    b[67..71].copy_from_slice(&volume_id.to_le_bytes());
    b[71..82].copy_from_slice(label);
    b[82..90].copy_from_slice(b"FAT32   ");
    // Boot code for BIOS boots of the bare partition: int 0x18 ("no bootable disk"), then halt.
    b[90..94].copy_from_slice(&[0xCD, 0x18, 0xEB, 0xFE]);
    b[510] = 0x55;
    b[511] = 0xAA;
    b
}

fn fsinfo_sector(free_clusters: u32, used_clusters: u32) -> [u8; 512] {
    let mut s = [0u8; 512];
    s[0..4].copy_from_slice(&0x4161_5252u32.to_le_bytes());
    s[484..488].copy_from_slice(&0x6141_7272u32.to_le_bytes());
    s[488..492].copy_from_slice(&free_clusters.to_le_bytes());
    let next_free = if free_clusters == 0 { u32::MAX } else { ROOT_CLUSTER + used_clusters };
    s[492..496].copy_from_slice(&next_free.to_le_bytes());
    s[508..512].copy_from_slice(&0xAA55_0000u32.to_le_bytes());
    s
}

/// A FAT time stamp (2-second resolution plus a tenths field for creation time).
struct Stamp {
    date: u16,
    time: u16,
    tenths: u8,
}

impl Stamp {
    fn from_unix(secs: u64) -> Stamp {
        const FAT_EPOCH: u64 = 315_532_800; // 1980-01-01T00:00:00Z
        const FAT_END: u64 = 4_354_819_199; // 2107-12-31T23:59:59Z
        let secs = secs.clamp(FAT_EPOCH, FAT_END);
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let (year, month, day) = civil_from_days(days as i64);
        let (h, m, s) = (rem / 3600, rem / 60 % 60, rem % 60);
        Stamp {
            date: (((year - 1980) as u16) << 9) | ((month as u16) << 5) | day as u16,
            time: ((h as u16) << 11) | ((m as u16) << 5) | (s / 2) as u16,
            tenths: ((s % 2) * 100) as u8,
        }
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{Entry, Meta};
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};

    const MIB: u64 = 1 << 20;
    /// 2023-11-14T22:13:20Z
    const MTIME: u64 = 1_700_000_000;

    fn opts() -> FatOptions {
        FatOptions { volume_id: 0x4B49_4C4E, label: "kiln-esp".into(), mtime: MTIME }
    }

    /// Runs a reference tool; a missing tool fails the test naming the package to install.
    fn run(tool: &str, package: &str, args: &[&str]) -> Output {
        Command::new(tool)
            .args(args)
            .env("LC_ALL", "C.UTF-8")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool} ({e}): install the Debian package `{package}`"))
    }

    fn mtools(tool: &str, args: &[&str]) -> Vec<u8> {
        let out = run(tool, "mtools", args);
        assert!(out.status.success(), "{tool} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }

    /// What fsck.vfat -n finds wrong, if anything. fsck.vfat -n exits 0 even for some problems it
    /// reports (a bad long-name checksum), so any line besides its version and summary counts.
    fn fsck_problems(img: &Path) -> Option<String> {
        let out = run("fsck.vfat", "dosfstools", &["-n", img.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
        let clean = out.status.success()
            && lines.len() == 2
            && lines[0].starts_with("fsck.fat")
            && lines[1].contains("clusters")
            && stderr.trim().is_empty();
        (!clean).then(|| format!("exit {:?}\n{stdout}\n{stderr}", out.status.code()))
    }

    fn assert_fsck_clean(img: &Path) {
        if let Some(problems) = fsck_problems(img) {
            panic!("fsck.vfat -n {} is not clean: {problems}", img.display());
        }
    }

    fn write_image(dir: &Path, name: &str, tree: &Tree, size: u64) -> Result<PathBuf> {
        let path = dir.join(name);
        let file = std::fs::File::create(&path)?;
        file.set_len(size)?;
        let mut out = std::io::BufWriter::new(file);
        write_fat32(&mut out, size, tree, &opts())?;
        out.flush()?;
        Ok(path)
    }

    /// Deterministic, incompressible-looking bytes.
    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    const LONG_NAME: &str = "a very long file name with spaces.txt";
    const NAME_13: &str = "thirteen.char"; // exactly one long-name entry, no terminator
    const NAME_26: &str = "twenty-six-characters.long"; // exactly two entries

    fn esp_tree() -> Tree {
        let mut t = Tree::new();
        t.add_file("EFI/BOOT/BOOTX64.EFI", 0o644, pattern(70_000, 1)).unwrap();
        t.add_file("loader/loader.conf", 0o644, "timeout 0\ndefault kiln.conf\n").unwrap();
        t.add_file("loader/entries/kiln.conf", 0o644, "title kiln\nlinux /kiln/vmlinuz\n").unwrap();
        t.add_file("loader/entries/kiln.config", 0o644, "second alias").unwrap();
        t.add_file("kiln/vmlinuz", 0o644, pattern(20 * MIB as usize, 2)).unwrap();
        t.add_file("kiln/initrd.img", 0o644, pattern(3000, 3)).unwrap();
        t.add_file(&format!("kiln/{LONG_NAME}"), 0o644, "long").unwrap();
        t.add_file(&format!("kiln/{NAME_13}"), 0o644, "13").unwrap();
        t.add_file(&format!("kiln/{NAME_26}"), 0o644, "26").unwrap();
        t.add_file("kiln/empty", 0o644, Vec::new()).unwrap();
        t.add_file("café.txt", 0o644, "unicode").unwrap();
        t.add_dir("empty-dir", 0o755).unwrap();
        t
    }

    #[test]
    fn esp_tree_passes_fsck_and_reads_back_with_mtools() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = esp_tree();
        let size = fat32_size_for(&tree, MIB).unwrap();
        let img = write_image(tmp.path(), "esp.img", &tree, size).unwrap();
        assert_fsck_clean(&img);
        let i = img.to_str().unwrap();

        for (path, entry) in tree.iter() {
            if let Kind::File(c) = &entry.kind {
                let got = mtools("mcopy", &["-n", "-i", i, &format!("::/{}", path.as_str()), "-"]);
                assert!(got == *c.read().unwrap(), "{path} read back differently ({} bytes)", got.len());
            }
        }
        let kiln = String::from_utf8(mtools("mdir", &["-i", i, "::/kiln"])).unwrap();
        for name in [LONG_NAME, NAME_13, NAME_26, "vmlinuz", "empty"] {
            assert!(kiln.contains(name), "mdir ::/kiln lacks {name}:\n{kiln}");
        }
        let root = String::from_utf8(mtools("mdir", &["-i", i, "::/"])).unwrap();
        for name in ["EFI", "loader", "kiln", "empty-dir", "café.txt"] {
            assert!(root.contains(name), "mdir ::/ lacks {name}:\n{root}");
        }
        assert!(root.contains("2023-11-14"), "entries are not stamped with opts.mtime:\n{root}");
        let entries = String::from_utf8(mtools("mdir", &["-i", i, "::/loader/entries"])).unwrap();
        assert!(entries.contains("KILN~1") && entries.contains("KILN~2"), "aliases:\n{entries}");
        let empty = String::from_utf8(mtools("mdir", &["-i", i, "::/empty-dir"])).unwrap();
        // mdir counts `.` and `..` as files.
        assert!(empty.contains("2 files") && empty.contains(" 0 bytes\n"), "{empty}");

        let label = String::from_utf8(mtools("mlabel", &["-i", i, "-s", "::"])).unwrap();
        assert!(label.contains("Volume label is KILN-ESP"), "{label}");
        let info = String::from_utf8(mtools("minfo", &["-i", i, "::"])).unwrap();
        assert!(info.contains("serial number: 4B494C4E"), "{info}");
        assert!(info.contains("label=\"KILN-ESP   \""), "{info}");
    }

    #[test]
    fn the_fsck_check_catches_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let mut tree = Tree::new();
        tree.add_file("loader/entries/kiln.conf", 0o644, "x").unwrap();
        let img = write_image(tmp.path(), "esp.img", &tree, 33 * MIB).unwrap();
        assert_fsck_clean(&img);
        let mut bytes = std::fs::read(&img).unwrap();
        let layout = Layout::for_size(33 * MIB).unwrap();
        // Root directory: label, then `loader`'s long-name entry; break its checksum.
        let lfn = layout.cluster_offset(ROOT_CLUSTER) as usize + DIR_ENTRY;
        assert_eq!(bytes[lfn + 11], ATTR_LFN);
        bytes[lfn + 13] ^= 0xFF;
        std::fs::write(&img, &bytes).unwrap();
        let problems = fsck_problems(&img).expect("fsck.vfat missed a bad long-name checksum");
        assert!(problems.contains("checksum"), "{problems}");
    }

    #[test]
    fn two_writes_give_identical_bytes_at_any_start_offset() {
        let tmp = tempfile::tempdir().unwrap();
        let mut tree = Tree::new();
        tree.add_file("EFI/BOOT/BOOTAA64.EFI", 0o644, pattern(5000, 4)).unwrap();
        tree.add_file("loader/entries/kiln.conf", 0o644, "x").unwrap();
        let size = 40 * MIB;
        let a = std::fs::read(write_image(tmp.path(), "a.img", &tree, size).unwrap()).unwrap();
        let b = std::fs::read(write_image(tmp.path(), "b.img", &tree, size).unwrap()).unwrap();
        assert!(a == b, "two writes differ");
        assert_eq!(a.len() as u64, size);

        // Written after a 1 MiB "partition table" gap, the filesystem bytes are the same.
        let mut cursor = std::io::Cursor::new(vec![0u8; (size + MIB) as usize]);
        cursor.seek(SeekFrom::Start(MIB)).unwrap();
        write_fat32(&mut cursor, size, &tree, &opts()).unwrap();
        assert_eq!(cursor.position(), MIB + size, "the writer ends at the filesystem's end");
        assert!(cursor.get_ref()[MIB as usize..] == a[..], "offset write differs");
        assert!(cursor.get_ref()[..MIB as usize].iter().all(|&b| b == 0), "wrote before its start");
    }

    #[test]
    fn host_files_are_streamed_into_the_image() {
        let tmp = tempfile::tempdir().unwrap();
        let data = pattern(3 * MIB as usize + 17, 5);
        let host = tmp.path().join("vmlinuz");
        std::fs::write(&host, &data).unwrap();
        let mut tree = Tree::new();
        let meta = Meta::root(0o644);
        let p = TreePath::parse("kiln/vmlinuz").unwrap();
        tree.insert(&p, Entry { meta, kind: Kind::File(Content::HostFile(host)) }).unwrap();
        let img = write_image(tmp.path(), "esp.img", &tree, 34 * MIB).unwrap();
        assert_fsck_clean(&img);
        let got = mtools("mcopy", &["-n", "-i", img.to_str().unwrap(), "::/kiln/vmlinuz", "-"]);
        assert!(got == data, "host file read back differently");
    }

    #[test]
    fn a_tree_that_does_not_fit_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let mut tree = Tree::new();
        tree.add_file("kiln/vmlinuz", 0o644, vec![0u8; 40 * MIB as usize]).unwrap();
        let err = write_image(tmp.path(), "small.img", &tree, 34 * MIB).unwrap_err();
        assert!(matches!(err.downcast_ref::<FatError>(), Some(FatError::TooSmall { .. })), "{err:#}");
        assert!(format!("{err:#}").contains("use a larger size"), "{err:#}");

        let err = write_image(tmp.path(), "tiny.img", &Tree::new(), 16 * MIB).unwrap_err();
        assert!(matches!(err.downcast_ref::<FatError>(), Some(FatError::BelowMinimum { .. })), "{err:#}");
    }

    #[test]
    fn sizes_from_fat32_size_for_pass_fsck_and_keep_the_headroom() {
        let tmp = tempfile::tempdir().unwrap();
        let mut tree = Tree::new();
        tree.add_file("EFI/BOOT/BOOTX64.EFI", 0o644, pattern(1000, 6)).unwrap();
        let min = fat32_size_for(&tree, 0).unwrap();
        assert_eq!(min, 33 * MIB, "smallest FAT32 with 512-byte clusters");
        let big = fat32_size_for(&tree, 300 * MIB).unwrap();
        assert_eq!(big % MIB, 0);
        for (name, size, headroom) in [("min.img", min, 0), ("big.img", big, 300 * MIB)] {
            let img = write_image(tmp.path(), name, &tree, size).unwrap();
            assert_fsck_clean(&img);
            let layout = Layout::for_size(size).unwrap();
            assert!(layout.clusters >= FAT32_MIN_CLUSTERS);
            let free = |l: &Layout| {
                let used = Plan::build(&tree).unwrap().allocate(l.cluster_bytes()).used_clusters;
                (u64::from(l.clusters) - used) * l.cluster_bytes()
            };
            assert!(free(&layout) >= headroom, "{name}: {} bytes free < {headroom}", free(&layout));
            // One MiB less would not do.
            let smaller = Layout::for_size(size - MIB).ok();
            assert!(smaller.is_none_or(|l| free(&l) < headroom), "{name}: {size} is not the smallest");
        }
    }

    #[test]
    fn cluster_size_grows_with_the_volume_but_keeps_the_fat32_minimum() {
        let spc = |mib: u64| Layout::for_size(mib * MIB).unwrap().sectors_per_cluster;
        assert_eq!(spc(33), 1);
        assert_eq!(spc(100), 2); // 512-byte clusters up to ~64 MiB, then 1 KiB ...
        assert_eq!(spc(200), 4);
        assert_eq!(spc(600), 8);
        for mib in [33, 64, 65, 100, 128, 129, 200, 256, 257, 600, 4096] {
            let l = Layout::for_size(mib * MIB).unwrap();
            assert!(l.clusters >= FAT32_MIN_CLUSTERS, "{mib} MiB: {l:?}");
            assert!(u64::from(l.fat_sectors) * 128 >= u64::from(l.clusters) + 2, "{mib} MiB: FAT too small");
            assert_eq!(l.data_start() % 4096, 0, "{mib} MiB: data region not 4 KiB aligned");
        }
    }

    #[test]
    fn other_entry_kinds_are_refused_naming_the_path() {
        let mut tree = Tree::new();
        tree.add_file("EFI/BOOT/BOOTX64.EFI", 0o644, "x").unwrap();
        tree.add_symlink("EFI/link", "BOOT").unwrap();
        let err = fat32_size_for(&tree, 0).unwrap_err();
        assert!(format!("{err:#}").contains("/EFI/link is a symlink"), "{err:#}");
    }

    #[test]
    fn names_differing_only_in_case_are_refused() {
        let mut tree = Tree::new();
        tree.add_file("EFI/Boot/a", 0o644, "x").unwrap();
        tree.add_file("EFI/BOOT/b", 0o644, "x").unwrap();
        let err = fat32_size_for(&tree, 0).unwrap_err();
        assert!(format!("{err:#}").contains("`BOOT` and `Boot`"), "{err:#}");
    }

    #[test]
    fn names_fat_cannot_hold_are_refused() {
        for bad in ["a:b", "trailing.", "x?"] {
            let mut tree = Tree::new();
            tree.add_file(&format!("d/{bad}"), 0o644, "x").unwrap();
            let err = fat32_size_for(&tree, 0).unwrap_err();
            assert!(format!("{err:#}").contains(&format!("/d/{bad}")), "{err:#}");
        }
    }

    #[test]
    fn short_names_and_aliases_are_windows_style_and_unique() {
        let names = ["BOOTX64.EFI", "KILN~1.CON", "entries", "kiln.conf", "kiln.config", "loader", LONG_NAME, ".hidden"];
        let children: Vec<(&str, Target)> = names.iter().map(|n| (*n, Target::File(0))).collect();
        let named = name_children(&TreePath::root(), &children).unwrap();
        let shorts: Vec<String> = named.iter().map(|c| String::from_utf8_lossy(&c.short).into_owned()).collect();
        assert_eq!(
            shorts,
            ["BOOTX64 EFI", "KILN~1  CON", "ENTRIES    ", "KILN~2  CON", "KILN~3  CON", "LOADER     ", "AVERYL~1TXT", "HIDDEN~1   "]
        );
        let long: Vec<bool> = named.iter().map(|c| c.long.is_some()).collect();
        assert_eq!(long, [false, false, true, true, true, true, true, true]);
    }

    #[test]
    fn long_name_entries_carry_the_checksum_and_padding() {
        let short = *b"KILN~1  CON";
        // Reference checksum computed by hand with the specification's rotate-and-add loop.
        let mut sum = 0u8;
        for b in short {
            sum = ((sum & 1) << 7).wrapping_add(sum >> 1).wrapping_add(b);
        }
        assert_eq!(short_name_checksum(&short), sum);
        let long: Vec<u16> = "kiln.conf".encode_utf16().collect();
        let e = lfn_entries(&long, &short);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0][0], 0x41);
        assert_eq!(e[0][11], ATTR_LFN);
        assert_eq!(e[0][13], sum);
        assert_eq!(&e[0][1..3], &[b'k', 0]);
        // 9 units, then NUL (unit 10, at offset 22), then 0xFFFF padding.
        assert_eq!(&e[0][20..22], &[b'f', 0]);
        assert_eq!(&e[0][22..24], &[0, 0]);
        assert_eq!(&e[0][24..26], &[0xFF, 0xFF]);
        assert_eq!(&e[0][30..32], &[0xFF, 0xFF]);
        let e2 = lfn_entries(&"x".repeat(14).encode_utf16().collect::<Vec<_>>(), &short);
        assert_eq!((e2[0][0], e2[1][0]), (0x42, 0x01), "last part first, flagged 0x40");
    }

    #[test]
    fn time_stamps_follow_the_fat_encoding() {
        let s = Stamp::from_unix(MTIME); // 2023-11-14 22:13:20
        assert_eq!(s.date, ((2023 - 1980) << 9) | (11 << 5) | 14);
        assert_eq!(s.time, (22 << 11) | (13 << 5) | 10);
        let early = Stamp::from_unix(0);
        assert_eq!((early.date, early.time), ((1 << 5) | 1, 0), "clamped to 1980-01-01");
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn labels_are_upper_cased_and_checked() {
        assert_eq!(&volume_label("kiln-esp").unwrap(), b"KILN-ESP   ");
        assert_eq!(&volume_label("").unwrap(), NO_LABEL);
        assert!(volume_label("twelve-chars").is_err());
        assert!(volume_label("a.b").is_err());
    }
}
