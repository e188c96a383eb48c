//! Slow tier, installer mode (`qemu-tests/profiles/installer.yaml`, `install.target: auto`), on
//! every architecture:
//! - with two blank disks (4 and 8 GiB) the installer picks the larger, writes and verifies the
//!   system, creates the data partition over the rest and powers off; the medium's bytes and the
//!   smaller disk are unchanged; the host checks the target against the manifest's digests; the
//!   target booted alone reaches `[kiln] ready` with the data partition spanning the disk, the
//!   profile's host name, and the user's SSH key (the test logs in);
//! - QEMU killed while the installer writes: the next boot of the medium installs completely;
//! - a target holding foreign data is refused, named on the console, and left byte-for-byte as it
//!   was; no shell follows on the console: the installer reboots after its stated delay;
//! - a kiln disk of another deployment is refused the same way, and installed over (a new table,
//!   the ESP naming this image's deployment) with `install.wipe`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln::arch::Arch;
use kiln::manifest::Manifest;
use kiln::qemu::{Disk, Net, Vm, VmSpec};
use kiln_qemu_tests::{
    build_with_test_key, free_port, manifest, sgdisk_partition as partition, sha256_range, ssh_until_ok, tool, work_dir, KeyedBuild,
    BOOT_TIMEOUT,
};

const GIB: u64 = 1 << 30;
/// From power-on to `install: done` and power-off: a boot to the initramfs plus writing and reading
/// back ~150 MiB under TCG.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);

fn built() -> Result<&'static KeyedBuild> {
    static BUILT: OnceLock<Result<KeyedBuild, String>> = OnceLock::new();
    build_with_test_key(&BUILT, "qemu-tests/profiles/installer.yaml", "installer-build")
}

fn image() -> Result<&'static Path> {
    Ok(&built()?.out)
}

fn blank(path: &Path, size: u64) -> Result<PathBuf> {
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    Ok(path.to_path_buf())
}

fn sha256_file(path: &Path) -> Result<String> {
    sha256_range(path, 0, std::fs::metadata(path)?.len())
}

/// A VM booting the first disk, with the others attached in order (the guest sees vda, vdb, ...).
fn start(arch: Arch, disks: &[(&Path, bool)], log: &Path) -> Result<Vm> {
    let mut spec = VmSpec::new(arch);
    spec.disks = disks.iter().map(|(p, snapshot)| Disk { path: p.to_path_buf(), snapshot: *snapshot }).collect();
    Vm::start(&spec, log)
}

/// Waits for `install: done` and for the guest to power off.
fn finish_install(arch: Arch, vm: &mut Vm) -> Result<String> {
    let done = vm.wait_for("[kiln] install: done", INSTALL_TIMEOUT)?;
    let status = vm.wait_exit(Duration::from_secs(60))?;
    eprintln!("{arch}: `{done}`, powered off after {:.1} s ({status})", vm.elapsed().as_secs_f64());
    Ok(done)
}

/// The host's own check of an installed disk: a valid table with the manifest's disk GUID, every
/// written partition's bytes matching the manifest digest, and `kiln-data` running to the end.
fn check_installed(arch: Arch, target: &Path, m: &Manifest) -> Result<()> {
    let install = m.install.as_ref().context("the installer image's manifest has no `install` section")?;
    let verify = tool(Command::new("sgdisk").arg("-v").arg(target), "gdisk")?;
    ensure!(verify.contains("No problems found"), "{arch}: sgdisk -v {}:\n{verify}", target.display());
    let table = tool(Command::new("sgdisk").arg("-p").arg(target), "gdisk")?;
    ensure!(
        table.to_lowercase().contains(&format!("disk identifier (guid): {}", install.disk_guid)),
        "{arch}: disk GUID is not the manifest's:\n{table}"
    );
    for p in &install.partitions {
        let (first, last, name) = partition(&table, p.number).with_context(|| format!("{arch}: no partition {}:\n{table}", p.number))?;
        ensure!(
            name == p.name && first * 512 == p.offset && (last + 1 - first) * 512 == p.size,
            "{arch}: partition {} is `{name}` {first}-{last}, manifest says {p:?}",
            p.number
        );
        if let (Some(sha), Some(len)) = (&p.content_sha256, p.content_size) {
            let got = sha256_range(target, p.offset, len)?;
            ensure!(&got == sha, "{arch}: {} on the target has sha256 {got}, the manifest {sha}", p.name);
        }
    }
    let (_, last, name) = partition(&table, 4).with_context(|| format!("{arch}: no data partition:\n{table}"))?;
    let sectors = std::fs::metadata(target)?.len() / 512;
    ensure!(
        name == "kiln-data" && last + 1 + 2048 >= sectors,
        "{arch}: partition 4 `{name}` ends at {last} of {sectors} sectors:\n{table}"
    );
    Ok(())
}

fn all_zero(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(true);
        }
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
    }
}

fn installs_onto_the_larger_disk_and_boots(arch: Arch) -> Result<()> {
    let out = image()?;
    let m = manifest(out, arch)?;
    let dir = work_dir(&format!("installer-{arch}-auto"))?;
    // The medium is a real copy (no snapshot): its digest proves the installer never wrote to it.
    let medium = dir.join("medium.img");
    std::fs::copy(out.join(arch.name()).join("disk.img"), &medium)?;
    let medium_sha = sha256_file(&medium)?;
    let small = blank(&dir.join("blank-4g.img"), 4 * GIB)?;
    let large = blank(&dir.join("blank-8g.img"), 8 * GIB)?;

    let mut vm = start(arch, &[(&medium, false), (&small, false), (&large, false)], &dir.join("console-install.log"))?;
    let started = vm.wait_for("[kiln] install: target=", INSTALL_TIMEOUT)?;
    ensure!(started.contains("target=/dev/vdc size=8192MiB"), "{arch}: auto did not pick the 8 GiB disk: `{started}`");
    finish_install(arch, &mut vm)?;
    drop(vm);

    ensure!(sha256_file(&medium)? == medium_sha, "{arch}: the installer medium changed during the install");
    ensure!(all_zero(&small)?, "{arch}: the smaller disk, not the target, was written to");
    check_installed(arch, &large, &m)?;

    // The installed disk alone: the installed system boots, its data partition spans the disk,
    // and the profile's host name and user key are in place (the user logs in over SSH).
    let mut spec = VmSpec::new(arch);
    spec.disks = vec![Disk { path: large.clone(), snapshot: false }];
    let port = free_port()?;
    spec.net = Net::User { hostfwd: vec![format!("tcp:127.0.0.1:{port}-:22")] };
    let mut vm = Vm::start(&spec, &dir.join("console-installed.log"))?;
    let ready = vm.wait_for("[kiln] ready", BOOT_TIMEOUT)?;
    eprintln!("{arch}: installed system `{ready}` after {:.1} s", vm.elapsed().as_secs_f64());
    let console = vm.console();
    ensure!(ready.contains("host=kiln-installed"), "{arch}: hostname from the profile missing: `{ready}`");
    ensure!(console.contains("[kiln] data: mounted /dev/vda4 ("), "{arch}: the data partition was not mounted");
    ensure!(!console.contains("[kiln] install:"), "{arch}: the installed system ran the installer");
    let b = built()?;
    let out = ssh_until_ok(
        &b.key,
        port,
        "ops",
        "hostname; cat ~/.ssh/authorized_keys; cat /sys/class/block/vda4/size /sys/class/block/vda/size",
    )?;
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines.first() == Some(&"kiln-installed") && lines.get(1) == Some(&b.public.as_str()), "{arch}: ssh ops@: {out}");
    let (data, disk): (u64, u64) = (lines[2].trim().parse()?, lines[3].trim().parse()?);
    ensure!(data * 512 + (1 << 30) > disk, "{arch}: data partition {data} sectors of a {disk}-sector disk");
    Ok(())
}

fn interrupted_install_completes(arch: Arch) -> Result<()> {
    let out = image()?;
    let m = manifest(out, arch)?;
    let dir = work_dir(&format!("installer-{arch}-crash"))?;
    let medium = out.join(arch.name()).join("disk.img");
    let target = blank(&dir.join("blank-8g.img"), 8 * GIB)?;

    // Power loss while the root is being written: QEMU is killed the moment the line appears.
    let mut vm = start(arch, &[(&medium, true), (&target, false)], &dir.join("console-1.log"))?;
    vm.wait_for("[kiln] install: writing kiln-root-a", INSTALL_TIMEOUT)?;
    vm.kill();
    // The table is written only after verification: the killed install left none.
    let table = tool(Command::new("sgdisk").arg("-p").arg(&target), "gdisk")?;
    ensure!(partition(&table, 1).is_none(), "{arch}: the killed install already had a partition table:\n{table}");

    let mut vm = start(arch, &[(&medium, true), (&target, false)], &dir.join("console-2.log"))?;
    let started = vm.wait_for("[kiln] install: target=", INSTALL_TIMEOUT)?;
    ensure!(started.contains("target=/dev/vdb"), "{arch}: `{started}`");
    finish_install(arch, &mut vm)?;
    drop(vm);
    check_installed(arch, &target, &m)
}

fn foreign_target_is_refused(arch: Arch) -> Result<()> {
    let out = image()?;
    let dir = work_dir(&format!("installer-{arch}-foreign"))?;
    let medium = out.join(arch.name()).join("disk.img");
    // Someone's disk: a partition table with one partition and data in it.
    let foreign = blank(&dir.join("foreign-2g.img"), 2 * GIB)?;
    tool(Command::new("sgdisk").args(["--new=1:0:0", "--change-name=1:precious"]).arg(&foreign), "gdisk")?;
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&foreign)?;
        f.seek(SeekFrom::Start(10 << 20))?;
        f.write_all(&b"precious data, not a kiln system\n".repeat(1000))?;
    }
    let before = sha256_file(&foreign)?;

    let mut vm = start(arch, &[(&medium, true), (&foreign, false)], &dir.join("console.log"))?;
    let line = vm.wait_for("[kiln] error: install:", INSTALL_TIMEOUT)?;
    eprintln!("{arch}: {line}");
    for want in ["/dev/vdb holds data that is not a kiln system", "install.wipe: true", "vda ", "(the installer medium)", "vdb 2048 MiB"] {
        ensure!(line.contains(want), "{arch}: the refusal does not say `{want}`: {line}");
    }
    no_shell_then_reboot(arch, &mut vm)?;
    ensure!(!vm.console().contains("[kiln] install: target="), "{arch}: the installer started writing");
    ensure!(sha256_file(&foreign)? == before, "{arch}: the refused disk was changed");
    Ok(())
}

/// The refusal's aftermath with the default console policy: no shell, the stated delay, then a
/// reboot: the machine starts over and the initramfs runs again (the installer would retry).
fn no_shell_then_reboot(arch: Arch, vm: &mut Vm) -> Result<()> {
    let line = vm.wait_for("[kiln] initramfs: no shell on the console", INSTALL_TIMEOUT)?;
    ensure!(line.contains("rebooting in 30 s"), "{arch}: {line}");
    vm.wait_for("[kiln] initramfs: rebooting", Duration::from_secs(120))?;
    vm.wait_for("[kiln] initramfs: kernel", INSTALL_TIMEOUT)?;
    eprintln!("{arch}: no shell; rebooted and started over after {:.1} s", vm.elapsed().as_secs_f64());
    vm.kill();
    ensure!(!vm.console().contains("dropping to a shell"), "{arch}: a shell was offered on the console");
    Ok(())
}

/// A disk that another deployment's installer wrote: kiln's partition names, but the ESP records
/// `other-site`, and bytes of that deployment's data where its `kiln-data` partition lies.
fn other_deployments_disk(path: &Path) -> Result<PathBuf> {
    let disk = blank(path, 8 * GIB)?;
    tool(
        Command::new("sgdisk")
            .args(["--new=1:2048:+64M", "--typecode=1:ef00", "--change-name=1:esp@other-site"])
            .args(["--new=2:0:+512M", "--change-name=2:kiln-root-a", "--new=3:0:+512M", "--change-name=3:kiln-root-b"])
            .args(["--new=4:0:0", "--change-name=4:kiln-data"])
            .arg(&disk),
        "gdisk",
    )?;
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(&disk)?;
    f.seek(SeekFrom::Start(2 * GIB))?;
    f.write_all(&b"other-site's data\n".repeat(1000))?;
    Ok(disk)
}

fn other_deployment_is_refused_then_wiped(arch: Arch) -> Result<()> {
    let out = image()?;
    let m = manifest(out, arch)?;
    let install = m.install.as_ref().context("no install record")?;
    let deployment = install.partitions[0].name.strip_prefix("esp@").context("the ESP's name records no deployment")?.to_string();
    let dir = work_dir(&format!("installer-{arch}-other-deployment"))?;
    let medium = out.join(arch.name()).join("disk.img");
    let target = other_deployments_disk(&dir.join("other-8g.img"))?;
    let before = sha256_file(&target)?;

    let mut vm = start(arch, &[(&medium, true), (&target, false)], &dir.join("console-refused.log"))?;
    let line = vm.wait_for("[kiln] error: install:", INSTALL_TIMEOUT)?;
    eprintln!("{arch}: {line}");
    let said = format!("/dev/vdb holds a kiln system of another deployment (other-site; this image is deployment {deployment})");
    ensure!(line.contains(&said) && line.contains("install.wipe: true"), "{arch}: want `{said}` in {line}");
    no_shell_then_reboot(arch, &mut vm)?;
    drop(vm);
    ensure!(sha256_file(&target)? == before, "{arch}: the refused disk was changed");

    // The same medium with `wipe=1` in its plan (same length, so the plan stays in place): what
    // `install.wipe: true` builds, without a second image build.
    let wiping = dir.join("medium-wipe.img");
    std::fs::copy(&medium, &wiping)?;
    let plan_part = m.partitions.iter().find(|p| p.name == "kiln-install").context("the medium has no kiln-install partition")?;
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&wiping)?;
        let mut plan = vec![0u8; 64 << 10];
        f.seek(SeekFrom::Start(plan_part.offset))?;
        f.read_exact(&mut plan)?;
        let at = plan.windows(8).position(|w| w == b"\nwipe=0\n").context("no `wipe=0` in the plan")?;
        plan[at + 6] = b'1';
        f.seek(SeekFrom::Start(plan_part.offset))?;
        f.write_all(&plan)?;
    }
    let mut vm = start(arch, &[(&wiping, true), (&target, false)], &dir.join("console-wipe.log"))?;
    let overwriting = vm.wait_for("install.wipe is set: overwriting it", INSTALL_TIMEOUT)?;
    ensure!(overwriting.contains(&said), "{arch}: {overwriting}");
    finish_install(arch, &mut vm)?;
    drop(vm);
    // A fresh table: the manifest's partitions, the ESP naming this deployment, kiln-data after them.
    check_installed(arch, &target, &m)
}

#[test]
fn x86_64_installer_picks_the_larger_disk_and_the_installed_system_boots() -> Result<()> {
    installs_onto_the_larger_disk_and_boots(Arch::X86_64)
}

#[test]
fn aarch64_installer_picks_the_larger_disk_and_the_installed_system_boots() -> Result<()> {
    installs_onto_the_larger_disk_and_boots(Arch::Aarch64)
}

#[test]
fn riscv64_installer_picks_the_larger_disk_and_the_installed_system_boots() -> Result<()> {
    installs_onto_the_larger_disk_and_boots(Arch::Riscv64)
}

#[test]
fn x86_64_install_killed_while_writing_completes_on_the_next_boot() -> Result<()> {
    interrupted_install_completes(Arch::X86_64)
}

#[test]
fn aarch64_install_killed_while_writing_completes_on_the_next_boot() -> Result<()> {
    interrupted_install_completes(Arch::Aarch64)
}

#[test]
fn riscv64_install_killed_while_writing_completes_on_the_next_boot() -> Result<()> {
    interrupted_install_completes(Arch::Riscv64)
}

#[test]
fn x86_64_installer_refuses_a_disk_with_foreign_data() -> Result<()> {
    foreign_target_is_refused(Arch::X86_64)
}

#[test]
fn aarch64_installer_refuses_a_disk_with_foreign_data() -> Result<()> {
    foreign_target_is_refused(Arch::Aarch64)
}

#[test]
fn riscv64_installer_refuses_a_disk_with_foreign_data() -> Result<()> {
    foreign_target_is_refused(Arch::Riscv64)
}

#[test]
fn x86_64_installer_refuses_another_deployments_disk_and_wipes_it_when_told() -> Result<()> {
    other_deployment_is_refused_then_wiped(Arch::X86_64)
}

#[test]
fn aarch64_installer_refuses_another_deployments_disk_and_wipes_it_when_told() -> Result<()> {
    other_deployment_is_refused_then_wiped(Arch::Aarch64)
}

#[test]
fn riscv64_installer_refuses_another_deployments_disk_and_wipes_it_when_told() -> Result<()> {
    other_deployment_is_refused_then_wiped(Arch::Riscv64)
}
