//! Slow tier: builds `profiles/quickstart.yaml` for all three architectures with the real Debian
//! packages, checks the images with the reference tools, rebuilds offline in another directory
//! (byte-identical), and boots each image in QEMU to the `[kiln] ready` line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln::arch::Arch;
use kiln::qemu::{Disk, Vm, VmSpec};
use kiln_qemu_tests::{cache_dir, extract_range, kiln_with_cache, manifest, quickstart as build_quickstart, repo_root, tool, work_dir, BOOT_TIMEOUT};

fn quickstart() -> Result<&'static Path> {
    build_quickstart("quickstart-build")
}

/// Runs kiln with the tier's shared cache; returns (success, stdout+stderr).
fn kiln(args: &[&str]) -> Result<(bool, String)> {
    let (code, text) = kiln_with_cache(&cache_dir()?, args)?;
    Ok((code == 0, text))
}


#[test]
fn quickstart_images_pass_the_reference_tools() -> Result<()> {
    let out = quickstart()?;
    let dir = work_dir("quickstart-reference-tools")?;
    for arch in Arch::ALL {
        let img = out.join(arch.name()).join("disk.img");
        let m = manifest(out, arch)?;
        let gpt = tool(Command::new("sgdisk").arg("-v").arg(&img), "gdisk")?;
        ensure!(gpt.contains("No problems found"), "{arch}: sgdisk -v:\n{gpt}");

        let esp = &m.partitions[0];
        let esp_file = dir.join(format!("{arch}-esp.img"));
        extract_range(&img, esp.offset, esp.size, &esp_file)?;
        tool(Command::new("fsck.vfat").arg("-n").arg(&esp_file), "dosfstools")?;
        let listing = tool(Command::new("mdir").args(["-i"]).arg(&esp_file).arg("::/EFI/BOOT"), "mtools")?;
        ensure!(listing.contains(&arch.efi_boot_file()[..arch.efi_boot_file().len() - 4]), "{arch}: {listing}");

        let root = &m.partitions[1];
        let root_file = dir.join(format!("{arch}-root.img"));
        extract_range(&img, root.offset, root.content_size.context("root content size")?, &root_file)?;
        let sb = tool(Command::new("unsquashfs").arg("-s").arg(&root_file), "squashfs-tools")?;
        ensure!(sb.contains("zstd"), "{arch}: root is not zstd squashfs:\n{sb}");
        let ls = tool(Command::new("unsquashfs").args(["-lln"]).arg(&root_file).arg("/usr/lib/kiln/boot"), "squashfs-tools")?;
        ensure!(ls.contains("0/0"), "{arch}: boot script not root-owned:\n{ls}");
        ensure!(root.type_guid == arch.root_partition_type(), "{arch}: root type {}", root.type_guid);
        eprintln!("{arch}: sgdisk, fsck.vfat, mtools, unsquashfs OK ({} MiB image)", std::fs::metadata(&img)?.len() >> 20);
    }
    Ok(())
}

#[test]
fn offline_rebuild_in_another_directory_is_byte_identical() -> Result<()> {
    let first = quickstart()?;
    let second = work_dir("quickstart-rebuild")?.join("elsewhere");
    let (ok, log) = kiln(&["build", "profiles/quickstart.yaml", "--offline", "--out", second.to_str().unwrap()])?;
    ensure!(ok, "offline rebuild failed:\n{log}");
    for arch in Arch::ALL {
        let a = std::fs::read(first.join(arch.name()).join("disk.img"))?;
        let b = std::fs::read(second.join(arch.name()).join("disk.img"))?;
        ensure!(a == b, "{arch}: disk.img differs between the two builds");
    }
    let sums_a = std::fs::read_to_string(first.join("SHA256SUMS"))?;
    let sums_b = std::fs::read_to_string(second.join("SHA256SUMS"))?;
    ensure!(sums_a == sums_b, "SHA256SUMS differ:\n{sums_a}\n{sums_b}");
    Ok(())
}

fn boots_to_ready(arch: Arch) -> Result<()> {
    let out = quickstart()?;
    let dir = work_dir(&format!("quickstart-boot-{arch}"))?;
    let mut spec = VmSpec::new(arch);
    spec.disks = vec![Disk { path: out.join(arch.name()).join("disk.img"), snapshot: true }];
    let mut vm = Vm::start(&spec, &dir.join("console.log"))?;
    let line = vm.wait_for("[kiln] ready", BOOT_TIMEOUT)?;
    eprintln!("{arch}: `{line}` after {:.1} s", vm.elapsed().as_secs_f64());
    ensure!(line.contains(&format!("arch={}", arch.name())), "{arch}: wrong ready line: {line}");
    let console = vm.console();
    for step in ["[kiln] modules:", "[kiln] root:", "[kiln] filesystems:", "[kiln] hostname: quickstart"] {
        ensure!(console.contains(step), "{arch}: console lacks `{step}`");
    }
    vm.kill();
    Ok(())
}

#[test]
fn x86_64_quickstart_boots_to_ready() -> Result<()> {
    boots_to_ready(Arch::X86_64)
}

#[test]
fn aarch64_quickstart_boots_to_ready() -> Result<()> {
    boots_to_ready(Arch::Aarch64)
}

#[test]
fn riscv64_quickstart_boots_to_ready() -> Result<()> {
    boots_to_ready(Arch::Riscv64)
}

/// A copy of the quickstart profile with `extra` appended, in its own directory.
fn variant(name: &str, extra: &str) -> Result<PathBuf> {
    let dir = work_dir(name)?;
    let text = std::fs::read_to_string(repo_root().join("profiles/quickstart.yaml"))?
        .replace("../overlays/site-example", &repo_root().join("overlays/site-example").display().to_string());
    std::fs::write(dir.join("p.yaml"), format!("{text}{extra}"))?;
    Ok(dir)
}

#[test]
fn a_package_that_does_not_exist_fails_naming_it_and_leaves_no_image() -> Result<()> {
    quickstart()?; // fills the cache, so this runs offline
    let dir = variant("bad-package", "")?;
    let p = dir.join("p.yaml");
    let text = std::fs::read_to_string(&p)?.replace("packages: []", "packages: [kiln-no-such-package]");
    std::fs::write(&p, text)?;
    let out = dir.join("out");
    let (code, log) = kiln_with_cache(&cache_dir()?, &["build", p.to_str().unwrap(), "--offline", "--arch", "riscv64", "--out", out.to_str().unwrap()])?;
    ensure!(code == 1, "exit {code}:\n{log}");
    ensure!(log.contains("kiln-no-such-package"), "{log}");
    ensure!(!out.join("riscv64/disk.img").exists(), "image left behind");
    Ok(())
}

#[test]
fn an_undefined_template_variable_fails_naming_it_and_leaves_no_image() -> Result<()> {
    quickstart()?;
    let dir = variant("bad-template", "")?;
    let p = dir.join("p.yaml");
    let text = std::fs::read_to_string(&p)?.replace("Welcome to {{name}}", "Welcome to {{vars.undefined_thing}}");
    std::fs::write(&p, text)?;
    let out = dir.join("out");
    let (code, log) = kiln_with_cache(&cache_dir()?, &["build", p.to_str().unwrap(), "--offline", "--arch", "riscv64", "--out", out.to_str().unwrap()])?;
    ensure!(code == 2, "exit {code}:\n{log}");
    ensure!(log.contains("undefined_thing"), "{log}");
    ensure!(!out.join("riscv64/disk.img").exists(), "image left behind");
    Ok(())
}

#[test]
fn a_tampered_cache_entry_is_reported_offline_and_refetched_online() -> Result<()> {
    let dir = work_dir("tampered-cache")?;
    let cache = dir.join("cache");
    let profile = repo_root().join("profiles/quickstart.yaml");
    let profile = profile.to_str().unwrap();
    let (code, log) = kiln_with_cache(&cache, &["fetch", profile, "--arch", "riscv64"])?;
    ensure!(code == 0, "fetch failed:\n{log}");
    // Corrupt the largest blob (the kernel package) by one byte.
    let blobs = cache.join("blobs/sha256");
    let victim = std::fs::read_dir(&blobs)?
        .filter_map(|e| e.ok())
        .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .context("no blobs cached")?
        .path();
    let mut bytes = std::fs::read(&victim)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&victim, &bytes)?;
    let name = victim.file_name().unwrap().to_string_lossy().into_owned();

    let out = dir.join("out");
    let (code, log) = kiln_with_cache(&cache, &["build", profile, "--offline", "--arch", "riscv64", "--out", out.to_str().unwrap()])?;
    ensure!(code == 1, "offline build with a tampered cache: exit {code}:\n{log}");
    ensure!(log.contains("corrupt") && log.contains(&name[..12]), "error does not name the corrupt blob:\n{log}");
    ensure!(!out.join("riscv64/disk.img").exists(), "image left behind");

    let (code, log) = kiln_with_cache(&cache, &["fetch", profile, "--arch", "riscv64"])?;
    ensure!(code == 0, "online fetch did not repair the cache:\n{log}");
    let repaired = kiln::cache::sha256_file(&victim)?;
    ensure!(repaired == name, "blob {name} still has digest {repaired}");
    Ok(())
}

#[test]
fn a_failing_boot_step_reports_an_error_and_leaves_a_console_shell() -> Result<()> {
    quickstart()?; // shares the cache: this build runs offline
    let dir = variant("broken-step", "")?;
    let overlay = dir.join("broken");
    std::fs::create_dir_all(overlay.join("usr/lib/kiln/boot.d"))?;
    std::fs::write(overlay.join("usr/lib/kiln/boot.d/15-broken.sh"), "kiln_log broken \"about to fail\"\nfalse\n")?;
    let p = dir.join("p.yaml");
    let text = std::fs::read_to_string(&p)?.replace("overlays:\n", &format!("overlays:\n  - {}\n", overlay.display()));
    std::fs::write(&p, text)?;
    let out = dir.join("out");
    let (code, log) = kiln_with_cache(&cache_dir()?, &["build", p.to_str().unwrap(), "--offline", "--arch", "riscv64", "--out", out.to_str().unwrap()])?;
    ensure!(code == 0, "build failed:\n{log}");

    let mut spec = VmSpec::new(Arch::Riscv64);
    spec.disks = vec![Disk { path: out.join("riscv64/disk.img"), snapshot: true }];
    let mut vm = Vm::start(&spec, &dir.join("console.log"))?;
    let line = vm.wait_for("[kiln] error:", BOOT_TIMEOUT)?;
    ensure!(line.contains("boot step broken failed"), "unexpected error line: {line}");
    vm.wait_for("root shell follows", Duration::from_secs(30))?;
    // The shell is really there: it evaluates what we type (the tty buffers input until it reads).
    vm.send("echo alive-$((6*7))\n")?;
    vm.wait_for("alive-42", Duration::from_secs(30))?;
    ensure!(!vm.console().contains("[kiln] ready"), "boot claimed ready after a failed step");
    vm.kill();
    Ok(())
}
