//! Slow tier, in-place install mode: a quickstart image written to a disk larger than itself grows on
//! first boot (GPT to the end of the medium, partition 4 `kiln-data` with ext4 over the free space),
//! and a second boot mounts that partition without running first boot again. The first boot is
//! interrupted once (QEMU killed right after the partition was created): the next boot resumes.
//!
//! The test makes the larger disk itself: a copy of `disk.img` extended (sparse) to 2 GiB, booted
//! without `snapshot` so the guest's changes land in the copy.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use kiln::arch::Arch;
use kiln::qemu::{Disk, Vm, VmSpec};
use kiln_qemu_tests::{flash_grown, sgdisk_partition as partition, quickstart as build_quickstart, tool, wait_ready, work_dir, BOOT_TIMEOUT};

fn quickstart() -> Result<&'static Path> {
    build_quickstart("inplace-build")
}

/// The medium the image is "flashed" to.
const DISK_SIZE: u64 = 2 << 30;
const SECTOR: u64 = 512;

/// Copies the partition into its own file, leaving all-zero MiBs as holes (the partition is
/// mostly empty; the reference tools want a filesystem file).
fn extract_sparse(img: &Path, offset: u64, len: u64, to: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::File::open(img)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut out = std::fs::File::create(to)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = buf.len().min(left as usize);
        f.read_exact(&mut buf[..n])?;
        if buf[..n].iter().all(|&b| b == 0) {
            out.seek(SeekFrom::Current(n as i64))?;
        } else {
            out.write_all(&buf[..n])?;
        }
        left -= n as u64;
    }
    out.set_len(len)?;
    Ok(())
}

fn boot(arch: Arch, disk: &Path, log: &Path) -> Result<Vm> {
    let mut spec = VmSpec::new(arch);
    spec.disks = vec![Disk { path: disk.to_path_buf(), snapshot: false }];
    let mut vm = Vm::start(&spec, log)?;
    wait_ready(&mut vm, arch.name(), BOOT_TIMEOUT)?;
    Ok(vm)
}

fn kiln_lines(console: &str) -> Vec<&str> {
    console.lines().filter(|l| l.contains("[kiln] firstboot:") || l.contains("[kiln] data:")).collect()
}

fn grows_on_first_boot_once(arch: Arch) -> Result<()> {
    let out = quickstart()?;
    let dir = work_dir(&format!("inplace-{arch}"))?;
    let disk = dir.join("disk.img");
    let image = out.join(arch.name()).join("disk.img");
    let image_size = std::fs::metadata(&image)?.len();
    flash_grown(&image, &disk, DISK_SIZE)?;

    // First boot, with power lost right after the data partition was created (before mke2fs).
    let mut spec = VmSpec::new(arch);
    spec.disks = vec![Disk { path: disk.clone(), snapshot: false }];
    let mut vm = Vm::start(&spec, &dir.join("console-0.log"))?;
    vm.wait_for("[kiln] firstboot: created partition 4 kiln-data", BOOT_TIMEOUT)?;
    vm.kill();
    let console = vm.console();
    ensure!(
        console.contains("[kiln] firstboot: partition table of /dev/vda grown to the end of the medium (2048 MiB)"),
        "{arch}: interrupted first boot did not grow the table:\n{}",
        kiln_lines(&console).join("\n")
    );

    // The next boot resumes: the partition exists, so it only formats and seeds it.
    let mut vm = boot(arch, &disk, &dir.join("console-1.log"))?;
    let console = vm.console();
    vm.kill();
    eprintln!("{arch}: resumed first boot:\n{}", kiln_lines(&console).join("\n"));
    for want in [
        "[kiln] firstboot: made ext4 (label kiln-data) on /dev/vda4",
        "[kiln] firstboot: /dev/vda4 ready",
        "[kiln] data: mounted /dev/vda4 (",
    ] {
        ensure!(console.contains(want), "{arch}: resumed first boot console lacks `{want}`");
    }
    ensure!(!console.contains("[kiln] firstboot: created partition"), "{arch}: resumed first boot created the partition again");

    // The partition table, checked by the reference tool.
    let verify = tool(Command::new("sgdisk").arg("-v").arg(&disk), "gdisk")?;
    ensure!(verify.contains("No problems found"), "{arch}: sgdisk -v:\n{verify}");
    let table = tool(Command::new("sgdisk").arg("-p").arg(&disk), "gdisk")?;
    let (first, last, name) = partition(&table, 4).with_context(|| format!("{arch}: no partition 4:\n{table}"))?;
    ensure!(name == "kiln-data", "{arch}: partition 4 is named `{name}`:\n{table}");
    let disk_sectors = DISK_SIZE / SECTOR;
    ensure!(last + 1 + (1 << 20) / SECTOR >= disk_sectors, "{arch}: partition 4 ends at sector {last} of {disk_sectors}:\n{table}");
    // It takes the free space right after the B slot (1 MiB-aligned), which was the image's headroom.
    let (_, b_last, _) = partition(&table, 3).with_context(|| format!("{arch}: no partition 3:\n{table}"))?;
    ensure!(first > b_last && first <= (b_last + 1).div_ceil(2048) * 2048, "{arch}: partition 4 starts at sector {first}, not after partition 3:\n{table}");
    ensure!(first * SECTOR < image_size, "{arch}: partition 4 does not use the image's headroom:\n{table}");

    // The filesystem, checked by the reference tool on a (sparse) copy of the partition.
    let part = dir.join("data.img");
    extract_sparse(&disk, first * SECTOR, (last + 1 - first) * SECTOR, &part)?;
    let sb = tool(Command::new("dumpe2fs").arg("-h").arg(&part), "e2fsprogs")?;
    ensure!(sb.lines().any(|l| l.starts_with("Filesystem volume name:") && l.ends_with("kiln-data")), "{arch}: dumpe2fs -h:\n{sb}");
    let _ = std::fs::remove_file(&part);

    // Second boot (the first was killed, not shut down): mounts, does not run first boot again.
    let mut vm = boot(arch, &disk, &dir.join("console-2.log"))?;
    let console = vm.console();
    vm.kill();
    eprintln!("{arch}: second boot:\n{}", kiln_lines(&console).join("\n"));
    ensure!(console.contains("[kiln] data: mounted /dev/vda4 ("), "{arch}: second boot did not mount the data partition");
    ensure!(!console.contains("[kiln] firstboot:"), "{arch}: second boot ran first boot again:\n{}", kiln_lines(&console).join("\n"));
    let _ = std::fs::remove_file(&disk);
    Ok(())
}

#[test]
fn x86_64_in_place_image_grows_on_first_boot_once() -> Result<()> {
    grows_on_first_boot_once(Arch::X86_64)
}

#[test]
fn aarch64_in_place_image_grows_on_first_boot_once() -> Result<()> {
    grows_on_first_boot_once(Arch::Aarch64)
}

#[test]
fn riscv64_in_place_image_grows_on_first_boot_once() -> Result<()> {
    grows_on_first_boot_once(Arch::Riscv64)
}
