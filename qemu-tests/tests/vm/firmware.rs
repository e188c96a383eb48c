//! Slow tier: each arch's firmware boots in QEMU with no disk and prints to the captured serial
//! console. Proves the harness (command line, firmware discovery, console capture, kill on drop)
//! before any image is involved.

use std::io::Write;
use std::time::Duration;

use kiln::arch::Arch;
use kiln::qemu::{Vm, VmSpec};
use kiln_qemu_tests::work_dir;

/// Under TCG on 2 shared cores each firmware reaches its first boot-manager line well within this.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Boots `arch`'s firmware with no disk and waits for `needle` on the serial console.
fn firmware_prints(arch: Arch, needle: &str) -> anyhow::Result<()> {
    let dir = work_dir(&format!("firmware-{arch}"))?;
    let log = dir.join("console.log");
    let mut vm = Vm::start(&VmSpec::new(arch), &log)?;
    let line = vm.wait_for(needle, TIMEOUT)?;
    // Straight to stderr (libtest captures eprintln!): the boot time is worth seeing in passing runs.
    let _ = writeln!(std::io::stderr(), "{arch}: `{needle}` after {:.1} s: {line}", vm.elapsed().as_secs_f64());
    vm.kill();
    Ok(())
}

#[test]
fn x86_64_ovmf_reaches_its_boot_manager() -> anyhow::Result<()> {
    // OVMF's BDS phase logs each boot option it tries on the serial console.
    firmware_prints(Arch::X86_64, "BdsDxe")
}

#[test]
fn aarch64_aavmf_reaches_its_boot_manager() -> anyhow::Result<()> {
    firmware_prints(Arch::Aarch64, "BdsDxe")
}

#[test]
fn riscv64_opensbi_starts_uboot() -> anyhow::Result<()> {
    // U-Boot's banner: "U-Boot 2023.01+dfsg-..." (version depends on the Debian release).
    firmware_prints(Arch::Riscv64, "U-Boot 20")
}
