//! The boot stage: the initramfs (and the netboot installer's initrd: the same plus the
//! platform's NIC drivers), the kernel command line, and the ESP (systemd-boot and/or extlinux
//! with the kernel and initrd) as a FAT image; the EFI binaries come from Debian packages.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tracing::info;

use super::inputs::Inputs;
use super::root::{deb_input, ManifestInputs, Root};
use super::{clamp32, disk, Format, Job};
use crate::arch::Arch;
use crate::gpt::Guid;
use crate::platform::Platform;
use crate::tree::{Content, Kind, Tree};

/// (path in the packages, path in the initramfs) of the first-boot programs.
const FIRSTBOOT_PROGRAMS: &[(&str, &str)] = &[("usr/sbin/sgdisk", "sbin/sgdisk"), ("usr/sbin/mke2fs", "sbin/mke2fs")];
/// Modules the initramfs needs to mount the data partition. ext4 asks the crypto API for
/// `crc32c`, which the kernel would load through modprobe; the initramfs has none, so the
/// generic implementation is loaded up front.
const FIRSTBOOT_MODULES: &[&str] = &["crc32c_generic", "ext4"];

/// The packed initramfs images of a build.
pub(super) struct Initrds {
    /// The image's initramfs.
    pub(super) initrd: Content,
    /// The netboot installer's initrd, when that format is built.
    pub(super) netboot: Option<Vec<u8>>,
    /// The modules in the image's initramfs (for the manifest).
    pub(super) modules: Vec<String>,
}

pub(super) fn initrds(job: &Job, root: &Root, record: &mut ManifestInputs) -> Result<Initrds> {
    let (platform, arch) = (job.platform, job.inputs.arch);
    let modules: Vec<String> =
        FIRSTBOOT_MODULES.iter().map(|m| m.to_string()).chain(job.profile.profile.kernel.modules.iter().cloned()).collect();
    let mut initramfs = crate::initramfs::assemble(&root.tree, &root.modules, platform, &modules, &[])?;
    add_firstboot_tools(&mut initramfs.tree, job.inputs, &job.reuse, &root.spill, record)?;
    info!("{arch}: initramfs with {} modules", initramfs.modules.len());
    let initrd = Content::bytes(crate::initramfs::pack_reusing(&initramfs.tree, clamp32(job.epoch), &job.reuse)?);
    // The netboot installer's initrd: the same, plus the platform's NIC drivers (kept out of the
    // disk image's initramfs, which never needs the network).
    let netboot = if job.opts.wants(Format::Netboot) {
        let mut nb = crate::initramfs::assemble(&root.tree, &root.modules, platform, &modules, &platform.netboot_modules)?;
        add_firstboot_tools(&mut nb.tree, job.inputs, &job.reuse, &root.spill, record)?;
        let nics: Vec<&String> = nb.modules.iter().filter(|m| !initramfs.modules.contains(m)).collect();
        info!("{arch}: netboot initrd with {} more modules for NICs", nics.len());
        Some(crate::initramfs::pack_reusing(&nb.tree, clamp32(job.epoch), &job.reuse)?)
    } else {
        None
    };
    Ok(Initrds { initrd, netboot, modules: initramfs.modules })
}

/// Unpacks the first-boot packages into a scratch tree and copies their programs, with the
/// libraries and loader they need, into the initramfs.
fn add_firstboot_tools(
    initramfs: &mut Tree,
    inputs: &Inputs,
    reuse: &crate::reuse::Reuse,
    spill: &Arc<crate::spill::Spill>,
    record: &mut ManifestInputs,
) -> Result<()> {
    let mut scratch = Tree::merged_usr(inputs.arch).spill_to(spill.clone());
    for (pkg, path) in &inputs.firstboot_debs {
        super::unpack::unpack_package(reuse, pkg, path, &mut scratch)?;
        record.add_once(deb_input(pkg));
    }
    let libs = crate::elfclosure::copy_programs(&scratch, initramfs, inputs.arch, FIRSTBOOT_PROGRAMS)
        .context("copying the first-boot programs into the initramfs")?;
    info!("{}: initramfs first-boot tools with {} libraries", inputs.arch, libs.len());
    Ok(())
}

/// What every ESP of a build boots (the installed system's and an installer medium's): the same
/// kernel and initrd, with the command line as the one difference.
pub(super) struct Boot<'a> {
    platform: &'a Platform,
    arch: Arch,
    title: String,
    kver: String,
    kernel: Content,
    initrd: Content,
    /// systemd-boot's EFI binary for the arch.
    systemd_boot: Option<Content>,
    /// The board's device tree from the kernel package (`platform.device_tree`).
    device_tree: Option<Content>,
    /// Raspberry Pi platforms: the GPU firmware and the device trees.
    board_files: Vec<(String, Content)>,
    epoch: u64,
    /// The profile's `update.version`: names slot A's boot entry (and leaves extlinux out where
    /// systemd-boot is there too, for boot counting).
    update_version: Option<String>,
    /// The profile has `update:`: the ESP holds a second set of boot files (slot B's).
    update_slots: bool,
}

impl<'a> Boot<'a> {
    pub(super) fn new(job: &Job<'a>, root: &Root, initrd: Content, record: &mut ManifestInputs) -> Result<Boot<'a>> {
        let arch = job.inputs.arch;
        // Only a platform that boots systemd-boot gets it (and records the package it came from).
        let systemd_boot = match &job.inputs.systemd_boot_deb {
            Some((pkg, path)) if job.platform.boot.systemd_boot => {
                let binary = systemd_boot_binary(path, arch).with_context(|| format!("reading {} {}", pkg.name, pkg.version))?;
                record.push(deb_input(pkg));
                Some(binary)
            }
            _ => None,
        };
        let device_tree = job
            .platform
            .device_tree
            .as_deref()
            .map(|dtb| crate::board::uboot_spl::device_tree(&root.tree, &root.kver, dtb))
            .transpose()
            .with_context(|| format!("platform `{}`", job.platform.name))?;
        let title = format!("kiln {} ({arch})", job.profile.profile.name);
        let board_files = match &job.platform.boot.raspberrypi {
            Some(rpi) => raspberrypi_files(job, rpi, root, record)?,
            None => Vec::new(),
        };
        Ok(Boot {
            platform: job.platform,
            arch,
            title,
            kver: root.kver.clone(),
            kernel: root.kernel.clone(),
            initrd,
            systemd_boot,
            device_tree,
            board_files,
            epoch: job.epoch,
            update_version: job.profile.profile.update.as_ref().map(|u| u.version.clone()),
            update_slots: job.profile.profile.update.is_some(),
        })
    }

    /// The FAT image of an ESP that boots the kernel with `cmdline`.
    /// The ESP as a FAT image, written to `path` in the staging directory.
    pub(super) fn esp(&self, cmdline: &str, guid: Guid, path: PathBuf) -> Result<crate::output::Staged> {
        let tree = crate::esp::tree(
            self.platform,
            &crate::esp::BootFiles {
                arch: self.arch,
                title: &self.title,
                kernel_version: &self.kver,
                update_version: self.update_version.as_deref(),
                kernel: self.kernel.clone(),
                initrd: self.initrd.clone(),
                systemd_boot: self.systemd_boot.clone(),
                cmdline,
                device_tree: self.device_tree.clone(),
                board_files: &self.board_files,
            },
        )?;
        let boot_set = self.kernel.len()? + self.initrd.len()? + self.device_tree.as_ref().map_or(Ok(0), Content::len)?;
        fat_image(&tree, guid, self.epoch, esp_headroom(boot_set, self.update_slots), path)
    }
}

/// The installed system's command line: its root by partition GUID (and by name, for the
/// initramfs to find the slot), the platform's console, then the profile's `kernel.cmdline`.
pub(super) fn kernel_cmdline(platform: &Platform, arch: Arch, root: &Guid, extra: &str) -> String {
    let mut c = format!("root=PARTUUID={root} kiln.rootname={} {}", disk::ROOT_A, platform.console_args(arch));
    if !extra.trim().is_empty() {
        c.push(' ');
        c.push_str(extra.trim());
    }
    c
}

/// The Raspberry Pi firmware files (from the verified firmware package, recorded in the
/// manifest) and the board device trees (from the kernel package in the root).
fn raspberrypi_files(
    job: &Job,
    rpi: &crate::raspberrypi::RaspberryPi,
    root: &Root,
    record: &mut ManifestInputs,
) -> Result<Vec<(String, Content)>> {
    let mut files = Vec::new();
    if let Some((pkg, path)) = &job.inputs.firmware_deb {
        let mut t = Tree::merged_usr(job.inputs.arch);
        super::unpack::unpack_package(&job.reuse, pkg, path, &mut t)?;
        files = rpi.firmware_files(&t).with_context(|| format!("{} {}", pkg.name, pkg.version))?;
        record.add_once(deb_input(pkg));
    }
    files.extend(rpi.device_tree_files(&root.tree, &root.kver).with_context(|| format!("platform `{}`", job.platform.name))?);
    Ok(files)
}

/// systemd-boot's EFI binary for the arch, from the systemd-boot-efi package.
fn systemd_boot_binary(deb: &Path, arch: Arch) -> Result<Content> {
    file_from_deb(deb, arch, &format!("usr/lib/systemd/boot/efi/{}", arch.systemd_boot_file()), "")
}

/// iPXE's EFI binary for the arch (the netboot output's first stage), from the ipxe package.
pub(super) fn ipxe_efi_binary(deb: &Path, arch: Arch) -> Result<Content> {
    file_from_deb(
        deb,
        arch,
        &format!("usr/lib/ipxe/{}", arch.ipxe_efi_file()),
        " (Debian ships per-architecture iPXE EFI binaries from trixie on)",
    )
}

/// One file of a package, unpacked into a scratch tree; `hint` follows the error if it is missing.
fn file_from_deb(deb: &Path, arch: Arch, path: &str, hint: &str) -> Result<Content> {
    let mut t = Tree::merged_usr(arch);
    crate::deb::unpack_deb(deb, &mut t)?;
    match t.get_str(path).map(|e| &e.kind) {
        Some(Kind::File(c)) => Ok(c.clone()),
        _ => bail!("{} has no /{path}{hint}", deb.display()),
    }
}

/// The free space an ESP gets beyond its contents: 8 MiB; with `update:` also room for the
/// second slot's boot files (kernel, initrd, device tree) at up to 1.5 times this build's size,
/// so a later build whose kernel or initrd grew still fits beside the running one.
pub(super) fn esp_headroom(boot_set: u64, update_slots: bool) -> u64 {
    let base = 8 << 20;
    if update_slots {
        base + boot_set + boot_set / 2
    } else {
        base
    }
}

/// The FAT32 image of an ESP tree, sized for its contents plus `headroom` bytes.
fn fat_image(esp: &Tree, guid: Guid, epoch: u64, headroom: u64, path: PathBuf) -> Result<crate::output::Staged> {
    use std::io::Write;
    let size = crate::fat::fat32_size_for(esp, headroom)?;
    let file = crate::output::Staged::create(&path)?;
    // Zeros where the writer seeks past (the FAT writer's contract); a hole, not written.
    file.set_len(size).with_context(|| format!("sizing {}", path.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    crate::fat::write_fat32(
        &mut out,
        size,
        esp,
        &crate::fat::FatOptions {
            // The volume id comes from the partition GUID: derived, so reproducible.
            volume_id: u32::from_le_bytes(guid.to_disk_bytes()[..4].try_into().expect("4 bytes")),
            label: "KILN-ESP".into(),
            mtime: epoch,
        },
    )
    .context("writing the EFI system partition")?;
    out.flush().with_context(|| format!("writing {}", path.display()))?;
    crate::output::Staged::read_back(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn with_update_the_esp_has_room_for_a_second_boot_set() {
        assert_eq!(super::esp_headroom(40 << 20, false), 8 << 20);
        // Slot B's set at 1.5 times this build's beside slot A's, plus the usual 8 MiB.
        assert_eq!(super::esp_headroom(40 << 20, true), (8 << 20) + (60 << 20));
    }
}
