//! The disk stage, and the one place that names the layouts kiln writes:
//! - the installed system ([`System`]): the ESP, root slot A holding the squashfs, root slot B
//!   (same size, empty, for A/B updates);
//! - the installer medium: its own ESP, the squashfs, the install plan with the target's ESP;
//! - where an installer copies the system from ([`MEDIUM`], [`NETBOOT`]);
//! - the files of a build's `OUT/<arch>/` directory.
//!
//! The on-device scripts find partitions by these names too (`overlays/initramfs/init` takes
//! the root's from `kiln.rootname=`; `overlays/initramfs/lib/kiln/install.sh` writes them in its
//! own words): a rename here must be made there as well.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, Result};
use tracing::info;

use super::boot::Boot;
use super::{Format, Job};
use crate::arch::Arch;
use crate::compress::{Compression, Compressor};
use crate::digest::HashingWriter;
use crate::error::ResultExt;
use crate::gpt::{self, DiskLayout, Guid, PartitionSpec};
use crate::installer;
use crate::manifest::{InstallRecord, Output, PartitionRecord};
use crate::output::Part;
use crate::profile::{DiskSize, Install, InstallMode, LoadedProfile};

/// GPT name of the installer medium's EFI system partition, and the installed system's ESP in
/// console lines; on an installed system the ESP's GPT name is [`esp_name`].
pub const ESP: &str = "esp";
/// GPT name of root slot A: the slot an image boots first (the kernel command line names it in
/// `kiln.rootname=`, and the installer refuses a disk holding one only with `wipe`).
pub const ROOT_A: &str = "kiln-root-a";
/// GPT name of root slot B, for A/B updates.
pub const ROOT_B: &str = "kiln-root-b";
/// GPT attribute bit 63, "do not automount" (Discoverable Partitions Specification): set on
/// the empty B slot.
const NO_AUTO: u64 = 1 << 63;
/// GPT attribute bit 2, "legacy BIOS bootable": U-Boot's distro boot scans only the partitions
/// marked so (else partition 1 alone), so a board's ESP after its loader partitions carries it.
const LEGACY_BOOTABLE: u64 = 1 << 2;

/// The disk image (or installer medium) in `OUT/<arch>/`.
pub const DISK_IMAGE: &str = "disk.img";
/// The build manifest in `OUT/<arch>/`.
pub const MANIFEST: &str = "manifest.json";
/// The block map of [`DISK_IMAGE`] (`--format disk.img.bmap`).
pub const DISK_BMAP: &str = "disk.img.bmap";
/// The compressed copies of [`DISK_IMAGE`] (`--format disk.img.zst,disk.img.xz`).
pub const DISK_ZST: &str = "disk.img.zst";
pub const DISK_XZ: &str = "disk.img.xz";
/// Every file of the disk formats, for moving outputs into place and for `SHA256SUMS`.
pub const DISK_FILES: [&str; 4] = [DISK_IMAGE, DISK_ZST, DISK_XZ, DISK_BMAP];

/// The file name of a compressed copy of the disk image.
fn compressed_name(c: Compression) -> &'static str {
    match c {
        Compression::Zstd => DISK_ZST,
        Compression::Xz => DISK_XZ,
        Compression::None => DISK_IMAGE,
    }
}

/// The GPT name of the installed system's ESP: `esp@<deployment>`. The ESP is the partition
/// that records the deployment because firmware ignores its name (nothing finds it by name, unlike
/// `kiln-root-a`), it exists in every layout kiln writes (in place, installer target, netboot),
/// and the initramfs reads partition names from sysfs (`PARTNAME=` in `uevent`) with no tool
/// at all; a name also reads plainly in `sgdisk -p`, `lsblk -o PARTLABEL` and the installer's
/// refusal, which a GUID derived from the deployment would not.
pub fn esp_name(deployment: &str) -> String {
    format!("{}{deployment}", crate::profile::install::ESP_NAME_PREFIX)
}

/// The size of a root slot for a squashfs: the squashfs plus a quarter and 16 MiB, so an update
/// may grow, in whole MiB.
pub fn root_slot_size(squashfs_len: u64) -> u64 {
    round_up(squashfs_len + squashfs_len / 4 + (16 << 20), 1 << 20)
}

/// A build's identities, derived from its inputs: same inputs, same GUIDs, same bytes.
pub(super) struct Ids {
    arch: Arch,
    build_id: [u8; 32],
}

impl Ids {
    pub(super) fn new(arch: Arch, build_id: [u8; 32]) -> Ids {
        Ids { arch, build_id }
    }

    fn guid(&self, what: &str) -> Guid {
        Guid::derive("kiln", &[self.arch.name().as_bytes(), what.as_bytes(), &self.build_id])
    }

    /// The installed system's disk GUID.
    pub(super) fn disk_guid(&self) -> Guid {
        self.guid("disk")
    }

    pub(super) fn esp_guid(&self) -> Guid {
        self.guid("esp")
    }

    pub(super) fn root_a_guid(&self) -> Guid {
        self.guid("root-a")
    }

    /// A board loader partition's GUID.
    pub(super) fn loader_guid(&self, name: &str) -> Guid {
        self.guid(&format!("loader-{name}"))
    }

    /// Names the image in install plans (an identical image already on a target is not
    /// reinstalled) and the build in an update bundle's `update.txt`.
    pub(super) fn image_id(&self) -> String {
        hex::encode(&self.build_id[..8])
    }
}

/// The installed system: its partitions and what goes into them.
pub(super) struct System<'a> {
    /// A U-Boot SPL board's loaders, in their partitions at fixed sectors before the others.
    loaders: Vec<crate::board::uboot_spl::LoaderImage>,
    specs: Vec<PartitionSpec>,
    pub(super) esp: Part<'a>,
    pub(super) squashfs: Part<'a>,
}

impl<'a> System<'a> {
    pub(super) fn new(arch: Arch, ids: &Ids, deployment: &str, esp: Part<'a>, squashfs: Part<'a>) -> System<'a> {
        let slot = root_slot_size(squashfs.len());
        let specs = vec![
            PartitionSpec { name: esp_name(deployment), type_guid: Guid::esp_type(), guid: ids.esp_guid(), size: esp.len(), attributes: 0 },
            PartitionSpec {
                name: ROOT_A.into(),
                type_guid: arch.root_partition_type(),
                guid: ids.root_a_guid(),
                size: slot,
                attributes: 0,
            },
            // The B slot for A/B updates: same size, empty, and marked "do not auto-mount".
            PartitionSpec {
                name: ROOT_B.into(),
                type_guid: arch.root_partition_type(),
                guid: ids.guid("root-b"),
                size: slot,
                attributes: NO_AUTO,
            },
        ];
        System { loaders: Vec::new(), specs, esp, squashfs }
    }

    /// The system on a U-Boot SPL board's card: the loaders first, at their sectors, and the
    /// ESP marked bootable for U-Boot's distro boot.
    pub(super) fn with_loaders(mut self, loaders: Vec<crate::board::uboot_spl::LoaderImage>) -> System<'a> {
        if !loaders.is_empty() {
            self.specs[0].attributes |= LEGACY_BOOTABLE;
        }
        self.loaders = loaders;
        self
    }

    /// The partitions' contents in table order (the loaders', then the system's).
    fn contents(&self) -> Vec<Option<Part<'_>>> {
        let loaders = self.loaders.iter().map(|l| Some(Part::Bytes(&l.bytes)));
        loaders.chain([Some(self.esp), Some(self.squashfs), None]).collect()
    }

    /// The installed layout on a disk of `fixed_size` (or the smallest one with `headroom`).
    fn layout(&self, fixed_size: Option<u64>, headroom: u64) -> Result<DiskLayout> {
        let fixed: Vec<gpt::Partition> = self.loaders.iter().map(|l| l.partition.clone()).collect();
        gpt::plan_after(&fixed, &self.specs, fixed_size, headroom)
    }

    /// The system as it sits on an installer's target (the partitions alone, no free space).
    pub(super) fn target(&self) -> Result<DiskLayout> {
        gpt::plan(&self.specs, None, 0)
    }

    /// The manifest's record of what an installer writes onto `target`.
    pub(super) fn install_record(&self, target: &DiskLayout, ids: &Ids) -> InstallRecord {
        InstallRecord { disk_guid: ids.disk_guid().to_string(), partitions: partition_records(target, &self.contents()) }
    }

    /// The two ranges an installer copies onto the target: the ESP image and the root squashfs.
    fn copies(&self, target: &DiskLayout, from: &Sources) -> Vec<installer::Copy> {
        vec![
            installer::Copy {
                name: ESP.into(),
                source_partition: from.esp.0,
                source_offset: from.esp.1,
                target_offset: target.partitions[0].offset(),
                length: self.esp.len(),
                sha256: self.esp.sha256(),
            },
            installer::Copy {
                name: ROOT_A.into(),
                source_partition: from.root,
                source_offset: 0,
                target_offset: target.partitions[1].offset(),
                length: self.squashfs.len(),
                sha256: self.squashfs.sha256(),
            },
        ]
    }
}

/// Where an installer finds the system's two images: the ESP image (a medium partition or
/// netboot file, and the offset in it) and the root squashfs (from offset 0).
pub(super) struct Sources {
    esp: (&'static str, u64),
    root: &'static str,
}

/// The installer medium: the plan partition holds the ESP image after the plan, the image
/// partition the squashfs.
pub(super) const MEDIUM: Sources =
    Sources { esp: (installer::INSTALL_PARTITION, installer::ESP_IMAGE_OFFSET), root: installer::IMAGE_PARTITION };
/// A netboot install: the directory's files.
pub(super) const NETBOOT: Sources = Sources { esp: (crate::netboot::ESP, 0), root: crate::netboot::ROOT };

/// The install plan of the system: `install`'s settings, the minimum target size checked
/// against the system, and the copies from `from`.
pub(super) fn install_plan(
    profile: &LoadedProfile,
    install: &Install,
    ids: &Ids,
    system: &System,
    target: &DiskLayout,
    from: &Sources,
) -> Result<String> {
    let min_size = installer::min_size(install, target).map_err(anyhow::Error::msg).in_profile(&profile.path)?;
    installer::Plan {
        image_id: &ids.image_id(),
        deployment: &profile.profile.deployment(),
        install,
        min_size,
        disk_guid: ids.disk_guid(),
        target,
        copies: system.copies(target, from),
    }
    .render()
}

/// What the disk stage records.
pub(super) struct Disk {
    /// The image's partitions: the system's, or the installer medium's.
    pub(super) partitions: Vec<PartitionRecord>,
    /// Installer images: the system the installer writes onto the target.
    pub(super) install: Option<InstallRecord>,
    /// The command line the image boots with (the installer's, on a medium).
    pub(super) cmdline: String,
    /// The records of `disk.img` and the files derived from it, when the disk format is built.
    pub(super) outputs: Vec<Output>,
}

/// Lays out the image (the system itself, or an installer medium carrying it) and writes
/// `disk.img` if that format is wanted.
pub(super) fn write(job: &Job, ids: &Ids, system: &System, boot: &Boot, cmdline: &str) -> Result<Disk> {
    let p = &job.profile.profile;
    match p.install.mode {
        InstallMode::InPlace => {
            let layout = system.layout(fixed_size(job), p.disk.headroom.0).usage(disk_size_key(job.profile))?;
            let contents = system.contents();
            let outputs = write_wanted(job, &layout, ids.disk_guid(), &contents)?;
            Ok(Disk { partitions: partition_records(&layout, &contents), install: None, cmdline: cmdline.to_string(), outputs })
        }
        InstallMode::Installer => installer_medium(job, ids, system, boot, cmdline),
    }
}

/// The installer medium: its own ESP (booting the installer), the root squashfs, and the plan
/// partition (the plan text, then from [`installer::ESP_IMAGE_OFFSET`] the target's ESP).
fn installer_medium(job: &Job, ids: &Ids, system: &System, boot: &Boot, cmdline: &str) -> Result<Disk> {
    let target = system.target()?;
    let plan = install_plan(job.profile, &job.profile.profile.install, ids, system, &target, &MEDIUM)?;
    let install_part = install_partition(&job.dir.join(".install-plan.img"), &plan, system.esp)?;

    let installer_cmdline = format!("{cmdline} {}", installer::CMDLINE_FLAG);
    let (esp_guid, image_guid, install_guid) = (ids.guid("installer-esp"), ids.guid("installer-image"), ids.guid("installer-plan"));
    let medium_esp = boot.esp(&installer_cmdline, esp_guid, job.dir.join(".installer-esp.img"))?;
    let specs = vec![
        PartitionSpec { name: ESP.into(), type_guid: Guid::esp_type(), guid: esp_guid, size: medium_esp.len, attributes: 0 },
        PartitionSpec {
            name: installer::IMAGE_PARTITION.into(),
            type_guid: Guid::linux_data_type(),
            guid: image_guid,
            size: system.squashfs.len(),
            attributes: 0,
        },
        PartitionSpec {
            name: installer::INSTALL_PARTITION.into(),
            type_guid: Guid::linux_data_type(),
            guid: install_guid,
            size: install_part.len,
            attributes: 0,
        },
    ];
    let contents = [Some(medium_esp.part()), Some(system.squashfs), Some(install_part.part())];
    let layout = gpt::plan(&specs, fixed_size(job), 0).usage(disk_size_key(job.profile))?;
    let outputs = write_wanted(job, &layout, ids.guid("installer-disk"), &contents)?;
    let install = Some(system.install_record(&target, ids));
    Ok(Disk { partitions: partition_records(&layout, &contents), install, cmdline: installer_cmdline, outputs })
}

/// The installer medium's plan partition, staged at `path`: the plan text, then from
/// [`installer::ESP_IMAGE_OFFSET`] the target's ESP.
fn install_partition(path: &Path, plan: &str, esp: Part) -> Result<crate::output::Staged> {
    use std::io::{Seek, SeekFrom, Write};
    let mut out = std::io::BufWriter::with_capacity(1 << 20, crate::output::Staged::create(path)?);
    out.write_all(plan.as_bytes())?;
    // The gap up to the ESP stays a hole (zeros).
    out.seek(SeekFrom::Start(installer::ESP_IMAGE_OFFSET))?;
    match esp {
        Part::Bytes(bytes) => out.write_all(bytes)?,
        Part::File { path: from, .. } => {
            std::io::copy(&mut File::open(from).with_context(|| format!("reading {}", from.display()))?, &mut out)?;
        }
    }
    out.flush().with_context(|| format!("writing {}", path.display()))?;
    crate::output::Staged::read_back(path.to_path_buf())
}

fn fixed_size(job: &Job) -> Option<u64> {
    match job.profile.profile.disk.size {
        DiskSize::Auto => None,
        DiskSize::Fixed(s) => Some(s.0),
    }
}

fn disk_size_key(profile: &LoadedProfile) -> String {
    format!("{}: key `disk.size`", profile.path.display())
}

/// Writes `disk.img` if the disk format is wanted, with its compressed copies and block map if
/// those are; their records for the manifest, `disk.img` first.
fn write_wanted(job: &Job, layout: &DiskLayout, disk_guid: Guid, contents: &[Option<Part>]) -> Result<Vec<Output>> {
    if !job.opts.wants(Format::Disk) {
        return Ok(Vec::new());
    }
    let mode = image_mode(&job.profile.profile);
    let compressed: Vec<(Compression, std::path::PathBuf)> =
        job.opts.disk_compressions().into_iter().map(|c| (c, job.dir.join(compressed_name(c)))).collect();
    let image = job.dir.join(DISK_IMAGE);
    // The Raspberry Pi firmware reads only the MBR (the Pi 3's boot ROM) or prefers it: its
    // boot partition, partition 1, is shown there as FAT32 (docs/boards.md).
    let table = match job.platform.boot.raspberrypi {
        Some(_) => Table::HybridMbr { partition: 0, mbr_type: MBR_FAT32_LBA },
        None => Table::Gpt,
    };
    let written = write_disk(&image, layout, disk_guid, table, contents, mode, &compressed)?;
    let mut outputs = vec![Output { file: DISK_IMAGE.into(), sha256: written.sha256, size: layout.size }];
    outputs.extend(written.compressed);
    if job.opts.wants(Format::DiskBmap) {
        // The mapped ranges' digests are read back from the image just written (page cache);
        // the holes are not read.
        let path = job.dir.join(DISK_BMAP);
        crate::bmap::write_bmap(&image, &written.mapped, &path).with_context(|| format!("writing {}", path.display()))?;
        outputs.push(Output { file: DISK_BMAP.into(), sha256: crate::digest::sha256_file(&path)?, size: std::fs::metadata(&path)?.len() });
    }
    Ok(outputs)
}

/// The file mode of a built image. Images that carry secrets (the cluster token in the k3s
/// configs, users' password hashes in /etc/shadow) are readable by their owner only: the 0600
/// modes inside the image protect nothing once the image file itself is world-readable.
pub fn image_mode(p: &crate::profile::Profile) -> u32 {
    let secrets = p.cluster.is_some() || p.users.iter().any(|u| u.password_hash.is_some());
    if secrets {
        0o600
    } else {
        0o644
    }
}

/// MBR partition type of FAT32 with LBA addressing, the type the Raspberry Pi boot ROM looks for.
const MBR_FAT32_LBA: u8 = 0x0C;

/// The partition table of an image.
#[derive(Clone, Copy)]
enum Table {
    /// GPT with a protective MBR.
    Gpt,
    /// GPT with a hybrid MBR showing one partition ([`gpt::write_gpt_hybrid`]).
    HybridMbr { partition: usize, mbr_type: u8 },
}

/// What [`write_disk`] wrote.
struct Written {
    /// The image's sha256, taken while writing.
    sha256: String,
    /// The byte ranges that hold data (the partition table and the partitions' contents).
    mapped: Vec<std::ops::Range<u64>>,
    /// The compressed copies' records.
    compressed: Vec<Output>,
}

/// Writes a sparse disk image front to back: the partition table's sectors and each
/// partition's contents (`None`: left empty) in offset order, the gaps left as holes. The
/// image's sha256 is taken while writing (the holes hash as the zeros they read back as), and
/// the same bytes stream into each `compressed` copy (the holes as zeros), so the disk is
/// written once whatever the formats. `mode` is the files' permission bits (see [`image_mode`]).
fn write_disk(
    path: &Path,
    layout: &DiskLayout,
    disk_guid: Guid,
    table_kind: Table,
    contents: &[Option<Part>],
    mode: u32,
    compressed: &[(Compression, std::path::PathBuf)],
) -> Result<Written> {
    info!("writing {} ({} MiB){}", path.display(), layout.size >> 20, if mode == 0o600 { ", mode 0600: it holds secrets" } else { "" });
    let img = crate::output::create(path, mode)?;
    img.set_len(layout.size)?;
    let mut copies = Vec::new();
    for (c, copy) in compressed {
        let file = HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, crate::output::create(copy, mode)?));
        copies.push((copy, Compressor::new(*c, file, Some(layout.size)).with_context(|| format!("starting {}", copy.display()))?));
    }
    let mut table = Sectors::default();
    match table_kind {
        Table::Gpt => gpt::write_gpt(&mut table, layout, disk_guid),
        Table::HybridMbr { partition, mbr_type } => gpt::write_gpt_hybrid(&mut table, layout, disk_guid, partition, mbr_type),
    }
    .context("writing the partition table")?;
    let mut pieces: Vec<(u64, Part, Option<&str>)> = table.runs.iter().map(|(at, b)| (*at, Part::Bytes(b), None)).collect();
    for (part, content) in layout.partitions.iter().zip(contents) {
        if let Some(content) = content {
            pieces.push((part.offset(), *content, Some(part.name.as_str())));
        }
    }
    pieces.sort_by_key(|p| p.0);
    let mut out = Tee {
        image: HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, img)),
        copies: copies.iter_mut().map(|(_, c)| c).collect(),
    };
    let mut mapped = Vec::new();
    for (offset, content, name) in pieces {
        let written = out.zeros_to(offset).and_then(|()| match content {
            Part::Bytes(bytes) => out.write_all(bytes),
            Part::File { path, .. } => File::open(path).and_then(|mut f| std::io::copy(&mut f, &mut out).map(|_| ())),
        });
        written.with_context(|| match name {
            Some(name) => format!("writing partition {name} into {}", path.display()),
            None => format!("writing the partition table into {}", path.display()),
        })?;
        mapped.push(offset..out.image.len());
    }
    out.zeros_to(layout.size)?;
    let (img, sha256, _) = out.image.finish();
    img.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    let mut records = Vec::new();
    for (copy, compressor) in copies {
        let (file, sha256, size) = compressor.finish().with_context(|| format!("finishing {}", copy.display()))?.finish();
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        let name = copy.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        info!("wrote {} ({} MiB)", copy.display(), size >> 20);
        records.push(Output { file: name, sha256, size });
    }
    Ok(Written { sha256, mapped, compressed: records })
}

/// The image being written and its compressed copies, fed the same bytes in order.
struct Tee<'a> {
    image: HashingWriter<std::io::BufWriter<File>>,
    copies: Vec<&'a mut Compressor<HashingWriter<std::io::BufWriter<File>>>>,
}

impl Tee<'_> {
    /// Moves on to `offset` over a hole: a hole in the image, zeros in the copies.
    fn zeros_to(&mut self, offset: u64) -> std::io::Result<()> {
        let mut gap = offset.saturating_sub(self.image.len());
        self.image.zeros_to(offset)?;
        while gap > 0 && !self.copies.is_empty() {
            let n = gap.min(crate::digest::ZEROS.len() as u64) as usize;
            for c in self.copies.iter_mut() {
                c.write_all(&crate::digest::ZEROS[..n])?;
            }
            gap -= n as u64;
        }
        Ok(())
    }
}

impl Write for Tee<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.image.write(buf)?;
        for c in self.copies.iter_mut() {
            c.write_all(&buf[..n])?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.image.flush()?;
        self.copies.iter_mut().try_for_each(|c| c.flush())
    }
}

/// The runs of bytes written to it, by offset: the partition table, collected to be written in
/// offset order with the partitions.
#[derive(Default)]
struct Sectors {
    runs: Vec<(u64, Vec<u8>)>,
    pos: u64,
}

impl Write for Sectors {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.runs.last_mut() {
            Some((at, run)) if *at + run.len() as u64 == self.pos => run.extend_from_slice(buf),
            _ => self.runs.push((self.pos, buf.to_vec())),
        }
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Seek for Sectors {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        match to {
            SeekFrom::Start(p) => self.pos = p,
            _ => return Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "the partition table seeks to offsets only")),
        }
        Ok(self.pos)
    }
}

/// The manifest's view of a layout: each partition with the digest of what was written into it.
fn partition_records(layout: &DiskLayout, contents: &[Option<Part>]) -> Vec<PartitionRecord> {
    layout
        .partitions
        .iter()
        .zip(contents)
        .enumerate()
        .map(|(i, (p, content))| PartitionRecord {
            number: i as u32 + 1,
            name: p.name.clone(),
            type_guid: p.type_guid.to_string(),
            guid: p.guid.to_string(),
            offset: p.offset(),
            size: p.size(),
            content_sha256: content.map(|c| c.sha256()),
            content_size: content.map(|c| c.len()),
        })
        .collect()
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::parse;
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn images_with_secrets_are_written_owner_only() -> Result<()> {
        let plain = parse("name: d\narch: [x86_64]\nusers: [{name: ops}]\n").unwrap();
        let hashed = parse("name: d\narch: [x86_64]\nusers: [{name: ops, password_hash: \"$y$j9T$abcdefgh$0123456789\"}]\n").unwrap();
        let cluster =
            parse("name: d\narch: [x86_64]\ncluster: {name: lab, nodes: [{name: s1, mac: \"52:54:00:00:00:01\", roles: [server]}]}\n")
                .unwrap();
        assert_eq!((image_mode(&plain), image_mode(&hashed), image_mode(&cluster)), (0o644, 0o600, 0o600));

        let dir = tempfile::tempdir()?;
        let spec = gpt::PartitionSpec {
            name: "p".into(),
            type_guid: Guid::linux_data_type(),
            guid: Guid::derive("test", &[b"g"]),
            size: 1 << 20,
            attributes: 0,
        };
        let layout = gpt::plan(&[spec], None, 0)?;
        for mode in [0o600, 0o644] {
            let path = dir.path().join(format!("disk-{mode:o}.img"));
            let copy = dir.path().join(format!("disk-{mode:o}.img.zst"));
            write_disk(
                &path,
                &layout,
                Guid::derive("test", &[b"d"]),
                Table::Gpt,
                &[Some(Part::Bytes(&[1u8; 512]))],
                mode,
                &[(Compression::Zstd, copy.clone())],
            )?;
            assert_eq!(std::fs::metadata(&path)?.permissions().mode() & 0o777, mode);
            assert_eq!(std::fs::metadata(&copy)?.permissions().mode() & 0o777, mode, "a compressed copy holds the same secrets");
        }
        Ok(())
    }

    #[test]
    fn the_digest_taken_while_writing_is_the_images() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let staged = dir.path().join("staged");
        let staged_bytes = b"squashfs".repeat(300_000);
        std::fs::write(&staged, &staged_bytes)?;
        let staged_sha = crate::digest::sha256_hex(&staged_bytes);
        let g = |w: &str| Guid::derive("test", &[w.as_bytes()]);
        let specs: Vec<PartitionSpec> = [("a", 3 << 20), ("b", 5 << 20), ("c", 1 << 20)]
            .into_iter()
            .map(|(name, size)| PartitionSpec { name: name.into(), type_guid: Guid::linux_data_type(), guid: g(name), size, attributes: 0 })
            .collect();
        let layout = gpt::plan(&specs, None, 7 << 20)?;
        let contents = [
            Some(Part::Bytes(&[7u8; 4096])),
            Some(Part::File { path: &staged, len: staged_bytes.len() as u64, sha256: &staged_sha }),
            None,
        ];
        let path = dir.path().join(DISK_IMAGE);
        let copies = [(Compression::Zstd, dir.path().join(DISK_ZST)), (Compression::Xz, dir.path().join(DISK_XZ))];
        let written = write_disk(&path, &layout, g("disk"), Table::Gpt, &contents, 0o644, &copies)?;
        assert_eq!(std::fs::metadata(&path)?.len(), layout.size);
        assert_eq!(written.sha256, crate::digest::sha256_file(&path)?);
        // The compressed copies decompress to the image, and their records are their files'.
        for (record, (_, copy)) in written.compressed.iter().zip(&copies) {
            let mut whole = Vec::new();
            crate::compress::open_image(copy)?.read_to_end(&mut whole)?;
            assert_eq!(crate::digest::sha256_hex(&whole), written.sha256, "{}", copy.display());
            assert_eq!((record.sha256.clone(), record.size), (crate::digest::sha256_file(copy)?, std::fs::metadata(copy)?.len()));
        }
        // Every non-zero byte is in a mapped range: the table, the two written partitions, the backup table.
        let image = std::fs::read(&path)?;
        let unmapped_nonzero =
            image.iter().enumerate().filter(|(i, b)| **b != 0 && !written.mapped.iter().any(|r| r.contains(&(*i as u64)))).count();
        assert_eq!(unmapped_nonzero, 0, "mapped: {:?}", written.mapped);
        assert!(crate::bmap::Bmap::from_ranges(&path, &written.mapped)?.mapped_bytes() < layout.size / 2);
        // The table is the one write_gpt writes in place.
        let mut direct = std::io::Cursor::new(vec![0u8; layout.size as usize]);
        gpt::write_gpt(&mut direct, &layout, g("disk"))?;
        assert_eq!(image[..34 * 512], direct.get_ref()[..34 * 512]);
        assert_eq!(image[image.len() - 33 * 512..], direct.get_ref()[direct.get_ref().len() - 33 * 512..]);
        assert_eq!(&image[layout.partitions[1].offset() as usize..][..staged_bytes.len()], &staged_bytes[..]);
        Ok(())
    }

    #[test]
    fn a_boards_loaders_are_written_at_their_sectors_before_a_bootable_esp() -> Result<()> {
        let p = crate::platform::Platform::load("hifive-unleashed")?;
        let spl = p.uboot_spl.as_ref().expect("hifive-unleashed is a U-Boot SPL board");
        let ids = Ids::new(Arch::Riscv64, [3; 32]);
        let fixed = spl.partitions(|n| ids.loader_guid(n))?;
        let loaders: Vec<crate::board::uboot_spl::LoaderImage> = fixed
            .into_iter()
            .zip([vec![0x5au8; 83_035], vec![0xa5u8; 849_401]])
            .map(|(partition, bytes)| crate::board::uboot_spl::LoaderImage { partition, bytes })
            .collect();
        let dir = tempfile::tempdir()?;
        let squashfs = dir.path().join("root");
        std::fs::write(&squashfs, [1u8; 4096])?;
        let esp = vec![7u8; 2 << 20];
        let system = System::new(Arch::Riscv64, &ids, "d", Part::Bytes(&esp), Part::File { path: &squashfs, len: 4096, sha256: "00" })
            .with_loaders(loaders.clone());
        let layout = system.layout(None, 0)?;
        let path = dir.path().join(DISK_IMAGE);
        write_disk(&path, &layout, ids.disk_guid(), Table::Gpt, &system.contents(), 0o644, &[])?;

        // Table order: loader1, loader2, the ESP, the root slots; the loaders where U-Boot's
        // docs put them (SPL from sector 34, u-boot.itb from sector 2082), with their type GUIDs.
        let names: Vec<&str> = layout.partitions.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["loader1", "loader2", "esp@d", ROOT_A, ROOT_B]);
        let at = |i: usize| (layout.partitions[i].first_lba, layout.partitions[i].type_guid.to_string());
        assert_eq!(at(0), (34, "5b193300-fc78-40cd-8002-e86c45580b47".to_string()));
        assert_eq!(at(1), (2082, "2e54b353-1271-4842-806f-e436d6af6985".to_string()));
        assert_eq!(layout.partitions[2].attributes, LEGACY_BOOTABLE, "U-Boot's distro boot scans bootable partitions");
        assert_eq!(layout.partitions[2].first_lba % 2048, 0, "the ESP starts on a MiB");
        let image = std::fs::read(&path)?;
        for l in &loaders {
            let off = l.partition.offset() as usize;
            assert_eq!(
                crate::digest::sha256_hex(&image[off..off + l.bytes.len()]),
                crate::digest::sha256_hex(&l.bytes),
                "{}",
                l.partition.name
            );
        }
        let esp_off = layout.partitions[2].offset() as usize;
        assert_eq!(&image[esp_off..esp_off + esp.len()], &esp[..]);
        // The reference tool agrees with the table.
        let out = std::process::Command::new("sgdisk").arg("-v").arg(&path).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("No problems found"), "{text}");
        let out = std::process::Command::new("sgdisk").arg("-i=1").arg(&path).output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
        assert!(text.contains("5b193300-fc78-40cd-8002-e86c45580b47") && text.contains("first sector: 34 "), "{text}");
        Ok(())
    }

    #[test]
    fn the_installed_layout_names_its_slots_and_sizes_them_alike() {
        let ids = Ids::new(Arch::X86_64, [1; 32]);
        let esp = vec![0u8; 3 << 20];
        let dummy = Path::new("unused");
        let system =
            System::new(Arch::X86_64, &ids, "lab-7", Part::Bytes(&esp), Part::File { path: dummy, len: (100 << 20) + 1, sha256: "00" });
        let names: Vec<&str> = system.specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["esp@lab-7", ROOT_A, ROOT_B]);
        assert_eq!(system.specs[1].size, 142 << 20, "100 MiB + a quarter + 16 MiB, rounded up to whole MiB");
        assert_eq!(system.specs[1].size, system.specs[2].size);
        assert_eq!((system.specs[1].attributes, system.specs[2].attributes), (0, 1 << 63));
        assert_eq!(system.specs[1].type_guid, Arch::X86_64.root_partition_type());
        assert_eq!(system.specs[0].type_guid, Guid::esp_type());
    }
}
