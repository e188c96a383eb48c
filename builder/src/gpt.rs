//! GUIDs, partition layout and the on-disk GPT (protective MBR, primary and backup headers and arrays).
//!
//! Written by hand rather than with the `gpt` crate: the format is small, the crate does not write
//! the protective MBR, and owning every byte keeps images reproducible (all GUIDs are inputs).

use std::fmt;
use std::io::{Seek, SeekFrom, Write};
use std::str::FromStr;

use anyhow::{bail, ensure};
use sha2::{Digest, Sha256};

/// Logical block size. kiln images are raw files booted from 512-byte-sector virtual and real disks.
pub const SECTOR: u64 = 512;
/// Partitions start on, and are sized in, whole MiB: the alignment every modern tool uses.
pub const ALIGN: u64 = 1024 * 1024;
/// Entries in the partition array. 128 is what every tool writes and firmware expects.
pub const ENTRY_COUNT: u32 = 128;
/// Bytes per partition entry.
pub const ENTRY_SIZE: u32 = 128;
/// Sectors taken by one partition array (128 * 128 / 512 = 32).
const ARRAY_SECTORS: u64 = (ENTRY_COUNT as u64 * ENTRY_SIZE as u64) / SECTOR;
/// First usable LBA: MBR, primary header and primary array come before it.
const FIRST_USABLE_LBA: u64 = 2 + ARRAY_SECTORS;
/// Sectors the backup array and header take at the end of the disk.
const BACKUP_SECTORS: u64 = ARRAY_SECTORS + 1;
/// Partition names are at most 36 UTF-16 code units (72 bytes in the entry).
const NAME_UNITS: usize = 36;
const HEADER_SIZE: u32 = 92;

/// EFI System Partition.
pub const ESP_TYPE: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
/// Generic Linux filesystem data.
pub const LINUX_DATA_TYPE: &str = "0fc63daf-8483-4772-8e79-3d69d8477de4";

/// A GUID, stored in RFC 4122 byte order (the order of its text form).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct Guid([u8; 16]);

impl Guid {
    pub const fn from_bytes(bytes: [u8; 16]) -> Guid {
        Guid(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Deterministic GUID from inputs: sha256(namespace || 0 || part1 || 0 || part2 ...), first 16 bytes,
    /// with RFC 4122 variant bits and version 4 bits set (so tools show a normal random-looking GUID).
    /// Parts are separated by a NUL byte, so callers should not pass parts that contain NUL bytes
    /// if they need distinct inputs to give distinct GUIDs.
    pub fn derive(namespace: &str, parts: &[&[u8]]) -> Guid {
        let mut hasher = Sha256::new();
        hasher.update(namespace.as_bytes());
        for part in parts {
            hasher.update([0u8]);
            hasher.update(part);
        }
        let digest = hasher.finalize();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
        bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
        Guid(bytes)
    }

    /// GPT's mixed-endian layout: the first three fields little-endian, the last two as written.
    pub fn to_disk_bytes(&self) -> [u8; 16] {
        let b = self.0;
        let mut d = b;
        d[0..4].copy_from_slice(&[b[3], b[2], b[1], b[0]]);
        d[4..6].copy_from_slice(&[b[5], b[4]]);
        d[6..8].copy_from_slice(&[b[7], b[6]]);
        d
    }

    /// Parses one of the `*_TYPE` constants (or any GUID known to be well formed).
    pub fn constant(text: &str) -> Guid {
        text.parse().unwrap_or_else(|e| panic!("built-in GUID constant {text}: {e}"))
    }

    pub fn esp_type() -> Guid {
        Guid::constant(ESP_TYPE)
    }

    pub fn linux_data_type() -> Guid {
        Guid::constant(LINUX_DATA_TYPE)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{text}` is not a GUID (expected 8-4-4-4-12 hex digits)")]
pub struct ParseGuidError {
    pub text: String,
}

impl FromStr for Guid {
    type Err = ParseGuidError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseGuidError { text: s.to_string() };
        let groups: Vec<&str> = s.split('-').collect();
        let lengths: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        if lengths != [8, 4, 4, 4, 12] {
            return Err(err());
        }
        let hex_digits: String = groups.concat();
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(&hex_digits, &mut bytes).map_err(|_| err())?;
        Ok(Guid(bytes))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = hex::encode(self.0);
        write!(f, "{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
    }
}

/// What the caller asks for: a partition of at least `size` bytes.
#[derive(Debug, Clone)]
pub struct PartitionSpec {
    pub name: String,
    pub type_guid: Guid,
    pub guid: Guid,
    /// Bytes; rounded up to whole MiB.
    pub size: u64,
    /// GPT attribute bits (bit 0 required, bit 2 legacy BIOS bootable, 48-63 type specific).
    pub attributes: u64,
}

/// A placed partition. LBAs are inclusive, in 512-byte sectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub name: String,
    pub type_guid: Guid,
    pub guid: Guid,
    pub first_lba: u64,
    pub last_lba: u64,
    pub attributes: u64,
}

impl Partition {
    /// Byte offset of the partition in the image.
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * SECTOR
    }
}

/// A whole disk: its size in bytes and its partitions in table order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLayout {
    pub size: u64,
    pub partitions: Vec<Partition>,
}

impl DiskLayout {
    fn sectors(&self) -> u64 {
        self.size / SECTOR
    }

    /// Last LBA a partition may use: the backup array and header follow it.
    pub fn last_usable_lba(&self) -> u64 {
        self.sectors() - BACKUP_SECTORS - 1
    }
}

fn round_up(n: u64, to: u64) -> Option<u64> {
    n.checked_add(to - 1).map(|x| x / to * to)
}

fn mib(bytes: u64) -> String {
    format!("{} bytes ({:.1} MiB)", bytes, bytes as f64 / ALIGN as f64)
}

/// Places partitions in order, each starting on a 1 MiB boundary and rounded up to whole MiB; the disk size is
/// `fixed_size` if given (error naming both sizes if the partitions do not fit, leaving room for the backup GPT)
/// or else the smallest whole-MiB size with the partitions, `extra` free bytes after them, and the backup GPT.
pub fn plan(parts: &[PartitionSpec], fixed_size: Option<u64>, extra: u64) -> anyhow::Result<DiskLayout> {
    plan_after(&[], parts, fixed_size, extra)
}

/// As [`plan`], after partitions placed at fixed sectors by the caller (a board's boot loaders
/// where its boot ROM or SPL looks for them, e.g. from sector 34, right after the primary GPT):
/// they come first in the table, and the others start on the first 1 MiB boundary after them.
/// The fixed ones must lie in the usable sectors, in order and without overlapping.
pub fn plan_after(fixed: &[Partition], parts: &[PartitionSpec], fixed_size: Option<u64>, extra: u64) -> anyhow::Result<DiskLayout> {
    let count = fixed.len() + parts.len();
    ensure!(count <= ENTRY_COUNT as usize, "{count} partitions requested, but a GPT holds at most {ENTRY_COUNT}");
    let mut partitions = Vec::with_capacity(count);
    // The first MiB holds the MBR, the primary GPT and alignment padding.
    let mut next = ALIGN;
    let mut free_lba = FIRST_USABLE_LBA;
    for p in fixed {
        check_name(&p.name).map_err(anyhow::Error::msg)?;
        ensure!(
            p.first_lba >= free_lba && p.last_lba >= p.first_lba,
            "partition `{}` at sectors {}..={} overlaps the partition table or the partition before it (first free sector {free_lba})",
            p.name,
            p.first_lba,
            p.last_lba
        );
        free_lba = p.last_lba + 1;
        next = round_up(free_lba * SECTOR, ALIGN).ok_or_else(|| anyhow::anyhow!("partition `{}` is too large", p.name))?;
        partitions.push(p.clone());
    }
    for spec in parts {
        check_name(&spec.name).map_err(anyhow::Error::msg)?;
        ensure!(spec.size > 0, "partition `{}` has size 0", spec.name);
        let size =
            round_up(spec.size, ALIGN).ok_or_else(|| anyhow::anyhow!("partition `{}` size {} is too large", spec.name, spec.size))?;
        let end = next.checked_add(size).ok_or_else(|| anyhow::anyhow!("partition `{}` does not fit in 64-bit offsets", spec.name))?;
        partitions.push(Partition {
            name: spec.name.clone(),
            type_guid: spec.type_guid,
            guid: spec.guid,
            first_lba: next / SECTOR,
            last_lba: end / SECTOR - 1,
            attributes: spec.attributes,
        });
        next = end;
    }
    let needed = next.checked_add(BACKUP_SECTORS * SECTOR).ok_or_else(|| anyhow::anyhow!("partitions do not fit in 64-bit offsets"))?;
    let size = match fixed_size {
        Some(size) => {
            ensure!(size % SECTOR == 0, "disk size {size} is not a multiple of the {SECTOR}-byte sector");
            if size < needed {
                bail!(
                    "the partitions need a disk of at least {} (with the backup GPT), but the disk size is fixed at {}",
                    mib(needed),
                    mib(size)
                );
            }
            size
        }
        None => needed
            .checked_add(extra)
            .and_then(|n| round_up(n, ALIGN))
            .ok_or_else(|| anyhow::anyhow!("disk size with {extra} extra bytes does not fit in 64 bits"))?,
    };
    Ok(DiskLayout { size, partitions })
}

/// A GPT name is at most 36 UTF-16 code units; NUL would end it early.
fn check_name(name: &str) -> Result<(), String> {
    let units = name.encode_utf16().count();
    if units > NAME_UNITS {
        return Err(format!("partition name `{name}` is {units} UTF-16 units long; GPT allows {NAME_UNITS}"));
    }
    if name.contains('\0') {
        return Err(format!("partition name `{}` contains a NUL character", name.escape_debug()));
    }
    Ok(())
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

/// Checks what `write_gpt` relies on, so a hand-made layout cannot produce a corrupt table.
fn validate(layout: &DiskLayout) -> std::io::Result<()> {
    let min = (FIRST_USABLE_LBA + BACKUP_SECTORS + 1) * SECTOR;
    if layout.size % SECTOR != 0 || layout.size < min {
        return Err(invalid(format!("disk size {} is not a multiple of {SECTOR} of at least {min}", layout.size)));
    }
    if layout.partitions.len() > ENTRY_COUNT as usize {
        return Err(invalid(format!("{} partitions; a GPT holds {ENTRY_COUNT}", layout.partitions.len())));
    }
    let last_usable = layout.last_usable_lba();
    for p in &layout.partitions {
        check_name(&p.name).map_err(invalid)?;
        if p.first_lba < FIRST_USABLE_LBA || p.last_lba < p.first_lba || p.last_lba > last_usable {
            return Err(invalid(format!(
                "partition `{}` (LBA {}..={}) is outside the usable LBAs {FIRST_USABLE_LBA}..={last_usable}",
                p.name, p.first_lba, p.last_lba
            )));
        }
    }
    Ok(())
}

fn protective_mbr(sectors: u64) -> [u8; SECTOR as usize] {
    let mut mbr = [0u8; SECTOR as usize];
    let entry = &mut mbr[446..462];
    entry[0] = 0x00; // not bootable
    entry[1..4].copy_from_slice(&[0x00, 0x02, 0x00]); // CHS of LBA 1
    entry[4] = 0xEE; // GPT protective
    entry[5..8].copy_from_slice(&[0xFF, 0xFF, 0xFF]); // CHS "beyond addressable"
    entry[8..12].copy_from_slice(&1u32.to_le_bytes());
    // Covers the whole disk after LBA 0, capped at what 32 bits can say (disks > 2 TiB).
    let count = u32::try_from(sectors - 1).unwrap_or(u32::MAX);
    entry[12..16].copy_from_slice(&count.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    mbr
}

fn partition_array(layout: &DiskLayout) -> Vec<u8> {
    let mut array = vec![0u8; (ENTRY_COUNT * ENTRY_SIZE) as usize];
    for (p, entry) in layout.partitions.iter().zip(array.chunks_exact_mut(ENTRY_SIZE as usize)) {
        entry[0..16].copy_from_slice(&p.type_guid.to_disk_bytes());
        entry[16..32].copy_from_slice(&p.guid.to_disk_bytes());
        entry[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
        entry[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
        entry[48..56].copy_from_slice(&p.attributes.to_le_bytes());
        for (i, unit) in p.name.encode_utf16().take(NAME_UNITS).enumerate() {
            entry[56 + 2 * i..58 + 2 * i].copy_from_slice(&unit.to_le_bytes());
        }
    }
    array
}

/// One GPT header sector. `this_lba`/`other_lba` swap between primary and backup.
fn header(layout: &DiskLayout, disk_guid: Guid, this_lba: u64, other_lba: u64, array_lba: u64, array_crc: u32) -> [u8; SECTOR as usize] {
    let mut h = [0u8; SECTOR as usize];
    h[0..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes()); // revision 1.0
    h[12..16].copy_from_slice(&HEADER_SIZE.to_le_bytes());
    // 16..20 header CRC, filled below; 20..24 reserved
    h[24..32].copy_from_slice(&this_lba.to_le_bytes());
    h[32..40].copy_from_slice(&other_lba.to_le_bytes());
    h[40..48].copy_from_slice(&FIRST_USABLE_LBA.to_le_bytes());
    h[48..56].copy_from_slice(&layout.last_usable_lba().to_le_bytes());
    h[56..72].copy_from_slice(&disk_guid.to_disk_bytes());
    h[72..80].copy_from_slice(&array_lba.to_le_bytes());
    h[80..84].copy_from_slice(&ENTRY_COUNT.to_le_bytes());
    h[84..88].copy_from_slice(&ENTRY_SIZE.to_le_bytes());
    h[88..92].copy_from_slice(&array_crc.to_le_bytes());
    let crc = crc32fast::hash(&h[..HEADER_SIZE as usize]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

fn write_at<W: Write + Seek>(out: &mut W, lba: u64, bytes: &[u8]) -> std::io::Result<()> {
    out.seek(SeekFrom::Start(lba * SECTOR))?;
    out.write_all(bytes)
}

/// Writes the protective MBR (LBA 0, one 0xEE partition covering the disk, capped at 0xFFFFFFFF),
/// primary header (LBA 1) + 128-entry array (LBA 2..33), backup array + backup header at the end.
/// Correct CRC32s. The file must already have length `layout.size`.
pub fn write_gpt<W: Write + Seek>(out: &mut W, layout: &DiskLayout, disk_guid: Guid) -> std::io::Result<()> {
    write_gpt_with_mbr(out, layout, disk_guid, &protective_mbr(layout.sectors()))
}

/// [`write_gpt`] with a hybrid MBR instead of the protective one: MBR entry 1 is GPT partition
/// `mbr_partition` with MBR type `mbr_type` (for firmware that reads only the MBR, such as the
/// Raspberry Pi 3's boot ROM), entry 2 the 0xEE entry over the GPT's own sectors (LBA 1 up to
/// that partition), which tells GPT-aware readers (Linux, sgdisk) to use the GPT.
pub fn write_gpt_hybrid<W: Write + Seek>(
    out: &mut W,
    layout: &DiskLayout,
    disk_guid: Guid,
    mbr_partition: usize,
    mbr_type: u8,
) -> std::io::Result<()> {
    let mbr = hybrid_mbr(layout, disk_guid, mbr_partition, mbr_type)?;
    write_gpt_with_mbr(out, layout, disk_guid, &mbr)
}

fn hybrid_mbr(layout: &DiskLayout, disk_guid: Guid, index: usize, mbr_type: u8) -> std::io::Result<[u8; SECTOR as usize]> {
    let p = layout.partitions.get(index).ok_or_else(|| invalid(format!("no partition {} for the hybrid MBR", index + 1)))?;
    let fits = |v: u64| u32::try_from(v).map_err(|_| invalid(format!("partition `{}` lies beyond what an MBR can address", p.name)));
    let (first, count) = (fits(p.first_lba)?, fits(p.last_lba + 1 - p.first_lba)?);
    let mut mbr = [0u8; SECTOR as usize];
    // The disk signature, from the disk GUID (reproducible); nothing reads the MBR's partitions
    // by it (Linux uses the GPT).
    mbr[440..444].copy_from_slice(&disk_guid.to_disk_bytes()[..4]);
    mbr_entry(&mut mbr[446..462], mbr_type, first, count);
    mbr_entry(&mut mbr[462..478], 0xEE, 1, first - 1);
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    Ok(mbr)
}

/// One MBR partition entry by LBA (CHS fields set to "beyond addressable", as for LBA-only use).
fn mbr_entry(entry: &mut [u8], kind: u8, first_lba: u32, sectors: u32) {
    entry[0] = 0x00; // not marked active: neither the Pi firmware nor Linux needs it
    entry[1..4].copy_from_slice(&[0xFE, 0xFF, 0xFF]);
    entry[4] = kind;
    entry[5..8].copy_from_slice(&[0xFE, 0xFF, 0xFF]);
    entry[8..12].copy_from_slice(&first_lba.to_le_bytes());
    entry[12..16].copy_from_slice(&sectors.to_le_bytes());
}

fn write_gpt_with_mbr<W: Write + Seek>(
    out: &mut W,
    layout: &DiskLayout,
    disk_guid: Guid,
    mbr: &[u8; SECTOR as usize],
) -> std::io::Result<()> {
    validate(layout)?;
    let last_lba = layout.sectors() - 1;
    let backup_array_lba = last_lba - ARRAY_SECTORS;
    let array = partition_array(layout);
    let array_crc = crc32fast::hash(&array);

    write_at(out, 0, mbr)?;
    write_at(out, 1, &header(layout, disk_guid, 1, last_lba, 2, array_crc))?;
    write_at(out, 2, &array)?;
    write_at(out, backup_array_lba, &array)?;
    write_at(out, last_lba, &header(layout, disk_guid, last_lba, 1, backup_array_lba, array_crc))?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    /// Runs a reference tool; a missing tool fails the test and names the Debian package.
    fn run(tool: &str, package: &str, args: &[&str]) -> String {
        let out = Command::new(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run `{tool}` ({e}): install the Debian package `{package}`"));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{tool} {args:?} failed:\n{text}");
        text
    }

    /// `sgdisk -v` says "No problems found" even for a disk whose GPT it could not read (it then
    /// verifies a fresh in-memory table), so also refuse any sign that it fell back or repaired.
    fn assert_sgdisk_clean(img: &str) {
        let verify = run("sgdisk", "gdisk", &["-v", img]);
        assert!(verify.contains("No problems found"), "{verify}");
        for bad in ["Creating new GPT", "Warning", "Caution", "invalid", "corrupt", "damaged", "mismatch"] {
            assert!(!verify.contains(bad), "sgdisk -v mentions `{bad}`:\n{verify}");
        }
    }

    fn tool_present(tool: &str) -> bool {
        Command::new(tool).arg("--version").output().is_ok()
    }

    fn specs() -> Vec<PartitionSpec> {
        vec![
            PartitionSpec {
                name: "ESP".into(),
                type_guid: Guid::esp_type(),
                guid: Guid::derive("kiln-test", &[b"esp"]),
                size: 3 * ALIGN + 1, // rounds up to 4 MiB
                attributes: 0,
            },
            PartitionSpec {
                name: "root-ü".into(),
                type_guid: Guid::linux_data_type(),
                guid: Guid::derive("kiln-test", &[b"root"]),
                size: 2 * ALIGN,
                attributes: 1 << 60, // read-only
            },
        ]
    }

    fn write_image(path: &Path, layout: &DiskLayout, disk_guid: Guid) {
        let mut f = std::fs::File::create(path).unwrap();
        f.set_len(layout.size).unwrap();
        write_gpt(&mut f, layout, disk_guid).unwrap();
    }

    #[test]
    fn guid_text_round_trip_and_disk_order() {
        let g: Guid = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B".parse().unwrap();
        assert_eq!(g.to_string(), ESP_TYPE);
        assert_eq!(
            hex::encode(g.to_disk_bytes()),
            "28732ac11ff8d211ba4b00a0c93ec93b",
            "first three fields little-endian, as the UEFI spec shows the ESP type on disk"
        );
        for bad in ["", "c12a7328f81f11d2ba4b00a0c93ec93b", "c12a7328-f81f-11d2-ba4b-00a0c93ec93", "g12a7328-f81f-11d2-ba4b-00a0c93ec93b"] {
            assert!(bad.parse::<Guid>().is_err(), "{bad}");
        }
    }

    #[test]
    fn derived_guids_are_stable_distinct_and_version_4() {
        let g = Guid::derive("kiln", &[b"disk", b"x86_64"]);
        // Pinned; cross-checked with Python: sha256(b"kiln\0disk\0x86_64")[:16] with version/variant bits set.
        assert_eq!(g.to_string(), "6d5813d4-8a72-40cf-ae3a-4ccd9c6f6e65");
        assert_eq!(g, Guid::derive("kiln", &[b"disk", b"x86_64"]));
        assert_ne!(g, Guid::derive("kiln", &[b"disk", b"aarch64"]));
        assert_ne!(g, Guid::derive("kiln2", &[b"disk", b"x86_64"]));
        assert_ne!(g, Guid::derive("kiln", &[b"diskx86_64"]));
        let s = g.to_string();
        assert_eq!(&s[14..15], "4", "version nibble");
        assert!("89ab".contains(&s[19..20]), "variant nibble in {s}");
    }

    #[test]
    fn plan_aligns_to_mib_and_sizes_the_disk() {
        let layout = plan(&specs(), None, 0).unwrap();
        let p = &layout.partitions;
        assert_eq!((p[0].first_lba, p[0].offset(), p[0].size()), (2048, ALIGN, 4 * ALIGN));
        assert_eq!((p[1].first_lba, p[1].size()), (2048 * 5, 2 * ALIGN));
        // partitions end at 7 MiB; the backup GPT needs 33 more sectors, so 8 MiB.
        assert_eq!(layout.size, 8 * ALIGN);
        assert_eq!(plan(&specs(), None, 10 * ALIGN).unwrap().size, 18 * ALIGN);
        assert_eq!(plan(&specs(), Some(100 * ALIGN), 0).unwrap().size, 100 * ALIGN);
    }

    #[test]
    fn plan_refuses_a_fixed_size_that_is_too_small_and_bad_specs() {
        let need = 7 * ALIGN + 33 * 512;
        let err = plan(&specs(), Some(7 * ALIGN), 0).unwrap_err().to_string();
        assert!(err.contains(&need.to_string()) && err.contains(&(7 * ALIGN).to_string()), "{err}");
        assert!(plan(&specs(), Some(need), 0).is_ok());
        let mut long = specs();
        long[0].name = "x".repeat(37);
        assert!(plan(&long, None, 0).unwrap_err().to_string().contains("36"));
        let mut empty = specs();
        empty[1].size = 0;
        assert!(plan(&empty, None, 0).is_err());
        assert!(plan(&specs(), Some(8 * ALIGN + 1), 0).is_err());
    }

    #[test]
    fn sgdisk_verifies_and_shows_what_we_set() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        let img_s = img.to_str().unwrap();
        let layout = plan(&specs(), None, 0).unwrap();
        let disk_guid = Guid::derive("kiln-test", &[b"disk"]);
        write_image(&img, &layout, disk_guid);

        assert_sgdisk_clean(img_s);

        let print = run("sgdisk", "gdisk", &["-p", img_s]);
        let upper = |g: Guid| g.to_string().to_uppercase();
        assert!(print.contains(&format!("Disk identifier (GUID): {}", upper(disk_guid))), "{print}");
        assert!(print.contains("ESP") && print.contains("root-ü"), "{print}");

        for (n, p) in layout.partitions.iter().enumerate() {
            let info = run("sgdisk", "gdisk", &["-i", &(n + 1).to_string(), img_s]);
            assert!(info.contains(&format!("Partition GUID code: {}", upper(p.type_guid))), "{info}");
            assert!(info.contains(&format!("Partition unique GUID: {}", upper(p.guid))), "{info}");
            assert!(info.contains(&format!("First sector: {} ", p.first_lba)), "{info}");
            assert!(info.contains(&format!("Last sector: {} ", p.last_lba)), "{info}");
            assert!(info.contains(&format!("Partition name: '{}'", p.name)), "{info}");
            assert!(info.contains(&format!("Attribute flags: {:016X}", p.attributes)), "{info}");
            assert_eq!(p.first_lba % 2048, 0);
        }
    }

    #[test]
    fn a_fixed_size_disk_leaves_free_space_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        let layout = plan(&specs(), Some(64 * ALIGN), 0).unwrap();
        write_image(&img, &layout, Guid::derive("kiln-test", &[b"disk"]));
        assert_sgdisk_clean(img.to_str().unwrap());
        let print = run("sgdisk", "gdisk", &["-p", img.to_str().unwrap()]);
        let rows: Vec<&str> = print.lines().filter(|l| l.split_whitespace().next() == Some("2")).collect();
        assert!(rows.len() == 1 && rows[0].contains("root-ü"), "{print}");
        let bytes = std::fs::read(&img).unwrap();
        let count = u32::from_le_bytes(bytes[446 + 12..446 + 16].try_into().unwrap());
        assert_eq!(count as u64, 64 * 2048 - 1, "protective MBR covers the disk after LBA 0");
        assert_eq!(bytes[446 + 4], 0xEE);
    }

    #[test]
    fn huge_disks_cap_the_protective_mbr() {
        let mbr = protective_mbr(1 << 40);
        assert_eq!(&mbr[446 + 12..446 + 16], &[0xFF; 4]);
    }

    #[test]
    fn writing_twice_gives_identical_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        let layout = plan(&specs(), None, 0).unwrap();
        let g = Guid::derive("kiln-test", &[b"disk"]);
        write_image(&a, &layout, g);
        write_image(&b, &layout, g);
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    }

    #[test]
    fn a_hand_made_layout_outside_the_disk_is_refused() {
        let mut layout = plan(&specs(), None, 0).unwrap();
        layout.partitions[1].last_lba = layout.size / SECTOR - 1;
        let mut cursor = std::io::Cursor::new(vec![0u8; layout.size as usize]);
        assert!(write_gpt(&mut cursor, &layout, Guid::derive("x", &[])).is_err());
    }

    #[test]
    fn blkid_and_fdisk_read_the_table_when_present() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        let img_s = img.to_str().unwrap();
        let layout = plan(&specs(), None, 0).unwrap();
        let disk_guid = Guid::derive("kiln-test", &[b"disk"]);
        write_image(&img, &layout, disk_guid);
        if tool_present("fdisk") {
            let out = run("fdisk", "fdisk", &["-l", img_s]);
            assert!(out.contains("Disklabel type: gpt"), "{out}");
            assert!(out.contains(&format!("Disk identifier: {}", disk_guid.to_string().to_uppercase())), "{out}");
            assert!(out.contains("EFI System") && out.contains("Linux filesystem"), "{out}");
        }
        if tool_present("blkid") {
            let out = run("blkid", "util-linux", &["-p", img_s]);
            assert!(out.contains("PTTYPE=\"gpt\"") && out.contains(&format!("PTUUID=\"{disk_guid}\"")), "{out}");
        }
    }

    /// The Raspberry Pi card layout: the hybrid MBR shows partition 1 as FAT32 (0x0C) to an
    /// MBR-only boot ROM; sgdisk reads the GPT (and says so), and first boot's sgdisk calls
    /// (backup header to the end, a new partition) keep the MBR entry the Pi boots from.
    #[test]
    fn hybrid_mbr_shows_the_boot_partition_and_survives_sgdisk() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("card.img");
        let img_s = img.to_str().unwrap();
        let layout = plan(&specs(), None, 0).unwrap();
        let disk_guid = Guid::derive("kiln-test", &[b"card"]);
        {
            let mut f = std::fs::File::create(&img).unwrap();
            f.set_len(layout.size).unwrap();
            write_gpt_hybrid(&mut f, &layout, disk_guid, 0, 0x0C).unwrap();
        }
        let bytes = std::fs::read(&img).unwrap();
        let entry = |i: usize| bytes[446 + 16 * i..462 + 16 * i].to_vec();
        let lba = |e: &[u8], at: usize| u32::from_le_bytes(e[at..at + 4].try_into().unwrap()) as u64;
        let p = &layout.partitions[0];
        assert_eq!((entry(0)[4], lba(&entry(0), 8), lba(&entry(0), 12)), (0x0C, p.first_lba, p.last_lba + 1 - p.first_lba));
        assert_eq!((entry(1)[4], lba(&entry(1), 8), lba(&entry(1), 12)), (0xEE, 1, p.first_lba - 1));
        assert_eq!(entry(2), [0u8; 16]);
        let verify = run("sgdisk", "gdisk", &["-v", img_s]);
        assert!(verify.contains("No problems found"), "{verify}");
        let scan = run("gdisk", "gdisk", &["-l", img_s]);
        assert!(scan.contains("MBR: hybrid") && scan.contains("GPT: present"), "{scan}");

        // First boot on a larger card.
        std::fs::OpenOptions::new().write(true).open(&img).unwrap().set_len(layout.size * 4).unwrap();
        run("sgdisk", "gdisk", &["--move-second-header", img_s]);
        run("sgdisk", "gdisk", &["--new=4:0:0", "--typecode=4:8300", "--change-name=4:kiln-data", img_s]);
        let after = std::fs::read(&img).unwrap();
        // sgdisk rewrites the CHS fields from its own geometry; types and LBAs are what count.
        let lba_view = |b: &[u8]| (0..2).map(|i| (b[446 + 16 * i + 4], b[446 + 16 * i + 8..462 + 16 * i].to_vec())).collect::<Vec<_>>();
        assert_eq!(lba_view(&after), lba_view(&bytes), "sgdisk kept the hybrid MBR's two entries");
        let verify = run("sgdisk", "gdisk", &["-v", img_s]);
        assert!(verify.contains("No problems found"), "{verify}");
    }
}
