//! Benchmark (figures, not a test): where the quickstart's boot time goes under QEMU (TCG), per
//! architecture, first boot (the data partition is made) and second boot. Each boot is split at
//! console lines, timed on the host from QEMU's start:
//! firmware and boot loader (up to the kernel's first console line), kernel and initramfs (up to
//! `[kiln] root:`, the root found and mounted), the appliance's boot steps (up to `[kiln] ready`).
//! The kernel's own console output is buffered until its serial console registers, so the first
//! split point is a little late; the totals are exact.
//!
//! ```sh
//! cargo run -p kiln-qemu-tests --example bench_boot [-- x86_64 ...]
//! ```
//! Boots one VM at a time (the machine should be otherwise idle); issue 18's targets are printed
//! beside the totals.

use anyhow::{Context, Result};
use kiln::arch::Arch;
use kiln::qemu::{Disk, Vm, VmSpec};
use kiln_qemu_tests::{cache_dir, flash_grown, kiln_with_cache, work_dir, BOOT_TIMEOUT};
use std::path::Path;

/// The first line the kernel prints (buffered until its console is up).
const KERNEL_LINE: &str = "Linux version";
const ROOT_LINE: &str = "[kiln] root: /dev/";
const READY_LINE: &str = "[kiln] ready";

/// Issue 18's boot targets (first boot, wall, firmware included).
fn target(arch: Arch) -> f64 {
    match arch {
        Arch::X86_64 => 20.0,
        Arch::Aarch64 => 25.0,
        Arch::Riscv64 => 15.0,
    }
}

struct Split {
    kernel: f64,
    root: f64,
    ready: f64,
}

fn boot(arch: Arch, disk: &Path, log: &Path) -> Result<Split> {
    let mut spec = VmSpec::new(arch);
    spec.disks = vec![Disk { path: disk.to_path_buf(), snapshot: false }];
    let mut vm = Vm::start(&spec, log)?;
    let mut at = |needle: &str| -> Result<f64> {
        vm.wait_for(needle, BOOT_TIMEOUT).with_context(|| format!("{arch}: waiting for `{needle}`"))?;
        Ok(vm.elapsed().as_secs_f64())
    };
    let split = Split { kernel: at(KERNEL_LINE)?, root: at(ROOT_LINE)?, ready: at(READY_LINE)? };
    vm.kill();
    Ok(split)
}

fn main() -> Result<()> {
    let dir = work_dir("bench-boot")?;
    let out = dir.join("out");
    let (code, log) = kiln_with_cache(&cache_dir()?, &["build", "profiles/quickstart.yaml", "--out", out.to_str().context("UTF-8 path")?])?;
    anyhow::ensure!(code == 0, "kiln build failed:\n{log}");
    println!("quickstart, QEMU TCG, one VM at a time; seconds from QEMU's start");
    println!("{:8} {:6} {:>10} {:>15} {:>11} {:>7} {:>7}", "arch", "boot", "firmware", "kernel+initrd", "boot steps", "total", "target");
    // Optional arguments: the architectures to boot (default: all three).
    let wanted: Vec<String> = std::env::args().skip(1).collect();
    for arch in Arch::ALL.into_iter().filter(|a| wanted.is_empty() || wanted.iter().any(|w| w == a.name())) {
        let disk = dir.join(format!("{arch}.img"));
        flash_grown(&out.join(arch.name()).join("disk.img"), &disk, 2 << 30)?;
        for (n, label) in [(1, "first"), (2, "second")] {
            let s = boot(arch, &disk, &dir.join(format!("{arch}-boot{n}.log")))?;
            let goal = if n == 1 { format!("{:.0}", target(arch)) } else { "-".into() };
            println!(
                "{:8} {:6} {:>10.1} {:>15.1} {:>11.1} {:>7.1} {:>7}",
                arch.name(),
                label,
                s.kernel,
                s.root - s.kernel,
                s.ready - s.root,
                s.ready,
                goal
            );
        }
        let _ = std::fs::remove_file(&disk);
    }
    Ok(())
}
