//! Slow tier: builds `profiles/quickstart.yaml` for all three architectures with the real Debian
//! packages, checks the images with the reference tools, rebuilds offline in another directory
//! (byte-identical; with `disk.img.zst` and `disk.img.bmap`, which `bmaptool copy` and `kiln flash`
//! turn back into `disk.img`), and boots each image in QEMU (in-place mode, below) to the `[kiln] ready` line.
//!
//! In-place mode: the image written to a disk larger than itself grows on first boot (GPT to the
//! end of the medium, partition 4 `kiln-data` with ext4 over the free space), and a second boot
//! mounts that partition without running first boot again. The first boot is interrupted once
//! (QEMU killed right after the partition was created): the next boot resumes and reaches ready.
//! The test makes the larger disk itself: a copy of `disk.img` extended (sparse) to 2 GiB, booted
//! without `snapshot` so the guest's changes land in the copy.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln::arch::Arch;
use kiln::qemu::{Disk, Vm, VmSpec};
use kiln_qemu_tests::{
    cache_dir, extract_range, flash_grown, kiln_with_cache, manifest, quickstart as build_quickstart, repo_root,
    sgdisk_partition as partition, tool, wait_ready, work_dir, BOOT_TIMEOUT,
};

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
        ensure!(root.type_guid == arch.root_partition_type().to_string(), "{arch}: root type {}", root.type_guid);
        eprintln!("{arch}: sgdisk, fsck.vfat, mtools, unsquashfs OK ({} MiB image)", std::fs::metadata(&img)?.len() >> 20);
    }
    Ok(())
}

#[test]
fn offline_rebuild_in_another_directory_is_byte_identical() -> Result<()> {
    let first = quickstart()?;
    let second = work_dir("quickstart-rebuild")?.join("elsewhere");
    // The rebuild also writes the flashing formats: they must not change disk.img.
    let formats = "disk,disk.img.zst,disk.img.bmap";
    let (ok, log) =
        kiln(&["build", "profiles/quickstart.yaml", "--offline", "--out", second.to_str().unwrap(), "--format", formats, "--json"])?;
    ensure!(ok, "offline rebuild failed:\n{log}");
    // `--json`: one summary first on stdout, naming every output with its digest.
    let summary: serde_json::Value = serde_json::Deserializer::from_str(&log)
        .into_iter()
        .next()
        .context("no JSON summary from kiln build --json")?
        .with_context(|| format!("kiln build --json printed no JSON first:\n{log}"))?;
    ensure!(summary["ok"] == true && summary["archs"].as_array().map(Vec::len) == Some(3), "{summary}");
    for a in summary["archs"].as_array().into_iter().flatten() {
        let disk = a["outputs"].as_array().into_iter().flatten().find(|o| o["file"] == "disk.img").context("no disk.img output")?;
        let path = PathBuf::from(disk["path"].as_str().unwrap_or_default());
        ensure!(disk["sha256"].as_str() == Some(kiln::digest::sha256_file(&path)?.as_str()), "{disk}: digest differs from the file's");
    }
    for arch in Arch::ALL {
        let a = std::fs::read(first.join(arch.name()).join("disk.img"))?;
        let b = std::fs::read(second.join(arch.name()).join("disk.img"))?;
        ensure!(a == b, "{arch}: disk.img differs between the two builds");
        // The manifests are the same but for the second build's extra outputs.
        let (ma, mut mb) = (manifest(first, arch)?, manifest(&second, arch)?);
        mb.outputs.retain(|o| ma.outputs.iter().any(|p| p.file == o.file));
        ensure!(ma.to_json() == mb.to_json(), "{arch}: the manifests differ beyond the added outputs");
        flashing_formats_write_the_image(&second.join(arch.name()), arch)?;
    }
    let sums_a = std::fs::read_to_string(first.join("SHA256SUMS"))?;
    let sums_b = std::fs::read_to_string(second.join("SHA256SUMS"))?;
    let image_lines = |s: &str| s.lines().filter(|l| l.ends_with("/disk.img")).collect::<Vec<_>>().join("\n");
    ensure!(image_lines(&sums_a) == image_lines(&sums_b), "SHA256SUMS differ:\n{sums_a}\n{sums_b}");
    Ok(())
}

/// `disk.img.zst` with `disk.img.bmap`, written by the real `bmaptool copy` and by `kiln flash`
/// to files, gives back `disk.img` exactly, and the manifest records both files' digests.
fn flashing_formats_write_the_image(dir: &Path, arch: Arch) -> Result<()> {
    let image_sha = kiln::digest::sha256_file(&dir.join("disk.img"))?;
    let recorded: Vec<String> = manifest(dir.parent().unwrap(), arch)?.outputs.iter().map(|o| o.file.clone()).collect();
    ensure!(
        recorded.iter().any(|f| f == "disk.img.zst") && recorded.iter().any(|f| f == "disk.img.bmap"),
        "{arch}: manifest outputs {recorded:?}"
    );
    let by_bmaptool = dir.join("bmaptool.img");
    tool(
        Command::new("bmaptool").arg("copy").arg("--bmap").arg(dir.join("disk.img.bmap")).arg(dir.join("disk.img.zst")).arg(&by_bmaptool),
        "bmap-tools",
    )?;
    ensure!(kiln::digest::sha256_file(&by_bmaptool)? == image_sha, "{arch}: bmaptool copy of disk.img.zst is not disk.img");
    let by_kiln = dir.join("flashed.img");
    let (ok, log) = kiln(&["flash", dir.join("disk.img.zst").to_str().unwrap(), by_kiln.to_str().unwrap(), "--yes"])?;
    ensure!(ok, "{arch}: kiln flash failed:\n{log}");
    ensure!(kiln::digest::sha256_file(&by_kiln)? == image_sha, "{arch}: kiln flash of disk.img.zst is not disk.img");
    std::fs::remove_file(&by_bmaptool)?;
    std::fs::remove_file(&by_kiln)?;
    Ok(())
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
    let dir = work_dir(&format!("quickstart-inplace-{arch}"))?;
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
    let ready = console.lines().find(|l| l.contains("[kiln] ready")).unwrap_or_default();
    ensure!(ready.contains(&format!("arch={}", arch.name())), "{arch}: wrong ready line: {ready}");
    for step in ["[kiln] modules:", "[kiln] root:", "[kiln] filesystems:", "[kiln] hostname: quickstart"] {
        ensure!(console.contains(step), "{arch}: console lacks `{step}`");
    }
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
    ensure!(
        first > b_last && first <= (b_last + 1).div_ceil(2048) * 2048,
        "{arch}: partition 4 starts at sector {first}, not after partition 3:\n{table}"
    );
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

/// A copy of the quickstart profile with `extra` appended, in its own directory.
fn variant(name: &str, extra: &str) -> Result<PathBuf> {
    let dir = work_dir(name)?;
    let text = std::fs::read_to_string(repo_root().join("profiles/quickstart.yaml"))?
        .replace("  - site-example", &format!("  - {}", repo_root().join("profiles/site-example").display()));
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
    let (code, log) =
        kiln_with_cache(&cache_dir()?, &["build", p.to_str().unwrap(), "--offline", "--arch", "riscv64", "--out", out.to_str().unwrap()])?;
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
    let (code, log) =
        kiln_with_cache(&cache_dir()?, &["build", p.to_str().unwrap(), "--offline", "--arch", "riscv64", "--out", out.to_str().unwrap()])?;
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
    let repaired = kiln::digest::sha256_file(&victim)?;
    ensure!(repaired == name, "blob {name} still has digest {repaired}");
    Ok(())
}

#[test]
/// With `debug.rescue_shell: true` (the bench setting) a failed step leaves a root shell; the
/// default (no shell) is checked by `provision::x86_64_a_failed_boot_step_leaves_no_console_shell...`.
fn a_failing_boot_step_reports_an_error_and_with_rescue_shell_leaves_a_console_shell() -> Result<()> {
    quickstart()?; // shares the cache: this build runs offline
    let dir = variant("broken-step", "\ndebug:\n  rescue_shell: true\n")?;
    let overlay = dir.join("broken");
    std::fs::create_dir_all(overlay.join("usr/lib/kiln/boot.d"))?;
    std::fs::write(overlay.join("usr/lib/kiln/boot.d/15-broken.sh"), "kiln_log broken \"about to fail\"\nfalse\n")?;
    let p = dir.join("p.yaml");
    let text = std::fs::read_to_string(&p)?.replace("overlays:\n", &format!("overlays:\n  - {}\n", overlay.display()));
    std::fs::write(&p, text)?;
    let out = dir.join("out");
    let (code, log) =
        kiln_with_cache(&cache_dir()?, &["build", p.to_str().unwrap(), "--offline", "--arch", "riscv64", "--out", out.to_str().unwrap()])?;
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
