//! Slow tier: the HiFive Unleashed card image (`profiles/hifive-unleashed.yaml`, platform
//! `hifive-unleashed`; `profiles/visionfive2.yaml` is built and gets the same host checks, with
//! its own sectors and dtb, but is not booted: QEMU has no JH7110 machine). Host side: the loader partitions sit at the sectors U-Boot's docs give
//! with their type GUIDs and hold the Debian package's SPL and `u-boot.itb` byte for byte (the
//! `.deb` read from the cache by the manifest's digest), and the ESP's `extlinux.conf` names a
//! kernel, initrd and the board's dtb that are on it. Then QEMU's `sifive_u,msel=11` (the
//! Unleashed, booting from its SD card) boots the card through the board's own chain: U-Boot SPL
//! read back from the card's `loader1` partition and given with `-bios` (QEMU has no boot ROM to
//! load it: that is the one step not taken from the card), SPL loads OpenSBI + U-Boot proper from
//! sector 2082 of the card, U-Boot reads `extlinux.conf` from the card and boots the kernel with
//! the Unleashed dtb, to `[kiln] ready` with `kiln-data` grown over the rest of the card.
//!
//! Two limits of QEMU, not of the image, shape the boot:
//! - QEMU 9.1 and later fail U-Boot's SPI-mode SD card init (`spl: mmc init failed with error:
//!   -110`; QEMU issue 2945, from commit da954d0e "hw/sd/sdcard: Add spi_cmd_SEND_CSD/CID
//!   handlers"), so the test runs a QEMU before it: `$KILN_QEMU_SIFIVE_U`, else the bookworm QEMU
//!   7.2 that `.ci/install-host-deps` unpacks to [`OLD_QEMU`], else the host's if older than 9.1.
//! - With QEMU 7.2, the first card access of U-Boot proper after SPL fails silently (the emulated
//!   card is not reset between the two; `mmc dev 0` then works), so autoboot would skip the card.
//!   The test stops autoboot and types `mmc rescan` and `boot` at U-Boot's prompt: the same
//!   distro boot command autoboot runs, on the same card.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use kiln::arch::Arch;
use kiln::qemu::Vm;
use kiln_qemu_tests::{build_once, cache_dir, extract_range, flash_grown, manifest, sha256_range, tool, wait_ready, work_dir};

/// Where `.ci/install-host-deps` unpacks bookworm's `qemu-system-misc` (7.2) on bookworm hosts.
const OLD_QEMU: &str = "/opt/kiln-qemu-7.2/usr/bin/qemu-system-riscv64";
/// The card as the board sees it: the image on a 1 GiB card (QEMU wants a power of two).
const CARD_SIZE: u64 = 1 << 30;
/// SPL over the emulated SPI bus is slow: the 31 MB kernel alone takes ~25 s to load.
const BOOT_TIMEOUT: Duration = Duration::from_secs(420);

fn build() -> Result<&'static Path> {
    static OUT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    build_once(&OUT, "profiles/hifive-unleashed.yaml", "hifive-unleashed-build")
}

/// `(file in the U-Boot package, partition name, first sector, type GUID)`.
type Loaders = [(&'static str, &'static str, u64, &'static str); 2];

/// HiFive Unleashed: U-Boot's doc/board/sifive/unleashed.rst and Debian's sifive_unleashed
/// config (`0x822` = 2082).
const UNLEASHED: Loaders = [
    ("usr/lib/u-boot/sifive_unleashed/u-boot-spl.bin", "loader1", 34, "5b193300-fc78-40cd-8002-e86c45580b47"),
    ("usr/lib/u-boot/sifive_unleashed/u-boot.itb", "loader2", 2082, "2e54b353-1271-4842-806f-e436d6af6985"),
];
/// VisionFive 2: U-Boot's doc/board/starfive/visionfive2.rst.
const VISIONFIVE2: Loaders = [
    ("usr/lib/u-boot/starfive_visionfive2/u-boot-spl.bin.normal.out", "spl", 4096, "2e54b353-1271-4842-806f-e436d6af6985"),
    ("usr/lib/u-boot/starfive_visionfive2/u-boot.itb", "uboot", 8192, "bc13c2ff-59e6-4262-a352-b275fd6f7172"),
];

#[test]
fn unleashed_card_holds_the_packages_loaders_and_extlinux_with_the_dtb() -> Result<()> {
    check_card(build()?, "hifive-unleashed-card", "u-boot-sifive", &UNLEASHED, "/sifive/hifive-unleashed-a00.dtb", "console=ttySIF0")
}

#[test]
fn visionfive2_profile_builds_a_card_with_the_packages_loaders_and_dtb() -> Result<()> {
    static OUT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let out = build_once(&OUT, "profiles/visionfive2.yaml", "visionfive2-build")?;
    check_card(
        out,
        "visionfive2-card",
        "u-boot-starfive",
        &VISIONFIVE2,
        "/starfive/jh7110-starfive-visionfive-2-v1.3b.dtb",
        "console=ttyS0",
    )
}

fn check_card(out: &Path, work: &str, package: &str, loaders: &Loaders, dtb: &str, console: &str) -> Result<()> {
    let img = out.join("riscv64/disk.img");
    let m = manifest(out, Arch::Riscv64)?;
    let dir = work_dir(work)?;

    // The U-Boot package as built from: its .deb from the cache by the digest the manifest records.
    let deb = m.inputs.iter().find(|i| i.name == package).with_context(|| format!("the manifest records no {package} input"))?;
    let deb_path = cache_dir()?.join("blobs/sha256").join(&deb.sha256);
    let unpacked = dir.join(package);
    tool(Command::new("dpkg-deb").arg("-x").arg(&deb_path).arg(&unpacked), "dpkg")?;

    let table = tool(Command::new("sgdisk").arg("-p").arg(&img), "gdisk")?;
    for (n, (file, name, first, type_guid)) in loaders.iter().enumerate() {
        let number = n as u32 + 1;
        let (start, _, got_name) =
            kiln_qemu_tests::sgdisk_partition(&table, number).with_context(|| format!("no partition {number}:\n{table}"))?;
        ensure!((start, got_name.as_str()) == (*first, *name), "partition {number}: {got_name} at {start}, want {name} at {first}");
        let info = tool(Command::new("sgdisk").arg(format!("-i={number}")).arg(&img), "gdisk")?;
        ensure!(info.to_lowercase().contains(type_guid), "partition {number} type is not {type_guid}:\n{info}");
        let want = std::fs::read(unpacked.join(file)).with_context(|| format!("{file} in {}", deb_path.display()))?;
        let got = sha256_range(&img, first * 512, want.len() as u64)?;
        ensure!(got == kiln::digest::sha256_hex(&want), "partition {number} ({name}) does not hold the package's /{file}");
    }

    // The ESP (partition 3, marked legacy-bootable for U-Boot's distro boot): extlinux.conf names
    // a kernel, an initrd and the board's dtb, and each is on the ESP.
    let esp = m.partitions.iter().find(|p| p.name.starts_with("esp@")).context("no ESP in the manifest")?;
    ensure!(esp.number == 3, "the ESP is partition {}, want 3 (after the two loaders)", esp.number);
    let info = tool(Command::new("sgdisk").arg("-i=3").arg(&img), "gdisk")?;
    ensure!(info.contains("Attribute flags: 0000000000000004"), "the ESP is not legacy-bootable:\n{info}");
    let esp_img = dir.join("esp.img");
    extract_range(&img, esp.offset, esp.size, &esp_img)?;
    let conf = tool(Command::new("mtype").arg("-i").arg(&esp_img).arg("::/extlinux/extlinux.conf"), "mtools")?;
    let named = |key: &str| conf.lines().find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim().to_string()));
    let fdt = named("fdt ").with_context(|| format!("no fdt line:\n{conf}"))?;
    ensure!(fdt.ends_with(dtb), "fdt {fdt}, want {dtb}");
    ensure!(named("append ").is_some_and(|a| a.contains(console)), "no {console}:\n{conf}");
    for key in ["kernel ", "initrd ", "fdt "] {
        let path = named(key).with_context(|| format!("no `{key}` line:\n{conf}"))?;
        let copy = dir.join("check");
        let _ = std::fs::remove_file(&copy);
        tool(Command::new("mcopy").arg("-i").arg(&esp_img).arg(format!("::{path}")).arg(&copy), "mtools")
            .with_context(|| format!("extlinux.conf names {path}, which is not on the ESP"))?;
        ensure!(std::fs::metadata(&copy)?.len() > 0, "{path} is empty");
    }
    Ok(())
}

/// A QEMU whose SPI-mode SD card U-Boot can initialise (see the module comment).
fn old_qemu() -> Result<PathBuf> {
    if let Some(q) = std::env::var_os("KILN_QEMU_SIFIVE_U") {
        return Ok(PathBuf::from(q));
    }
    if Path::new(OLD_QEMU).exists() {
        return Ok(PathBuf::from(OLD_QEMU));
    }
    let v = tool(Command::new("qemu-system-riscv64").arg("--version"), "qemu-system-misc")?;
    let version: Vec<u32> = v.split_whitespace().nth(3).unwrap_or("").split('.').filter_map(|n| n.parse().ok()).collect();
    if version.as_slice() < [9, 1].as_slice() {
        return Ok(PathBuf::from("qemu-system-riscv64"));
    }
    bail!(
        "the host's QEMU ({}) cannot boot sifive_u from its SD card (QEMU issue 2945, from 9.1 on): run .ci/install-host-deps \
         (it unpacks bookworm's QEMU 7.2 to {OLD_QEMU}) or set KILN_QEMU_SIFIVE_U to a qemu-system-riscv64 older than 9.1",
        v.lines().next().unwrap_or("").trim()
    )
}

#[test]
fn unleashed_boots_from_its_card_through_spl_and_u_boot_to_ready() -> Result<()> {
    let out = build()?;
    let img = out.join("riscv64/disk.img");
    let m = manifest(out, Arch::Riscv64)?;
    let dir = work_dir("hifive-unleashed-boot")?;
    let card = dir.join("card.img");
    flash_grown(&img, &card, CARD_SIZE)?;
    // The SPL the boot ROM would load, read back from the card's own loader1 partition.
    let loader1 = m.partitions.iter().find(|p| p.name == "loader1").context("no loader1 partition")?;
    let spl = dir.join("spl.bin");
    extract_range(&card, loader1.offset, loader1.content_size.context("loader1 has no content")?, &spl)?;

    let mut cmd = Command::new(old_qemu()?);
    cmd.args(["-M", "sifive_u,msel=11"]) // the Unleashed; MSEL 11: boot from the SD card
        .args(["-smp", "5", "-m", "8G"]) // the board's 1+4 harts; SPL sizes DRAM as 8 GiB and faults with less
        .args(["-accel", "tcg", "-display", "none", "-serial", "stdio", "-monitor", "none"])
        .args(["-nic", "none"]) // no network: autoboot's DHCP fallback would wait for ever
        .arg("-bios")
        .arg(&spl)
        .arg("-drive")
        .arg(format!("file={},if=sd,format=raw", card.display()));
    let mut vm = Vm::start_command(cmd, Arch::Riscv64, &dir.join("console.log"))?;
    let wait = |vm: &mut Vm, what: &str| vm.wait_for(what, BOOT_TIMEOUT).with_context(|| format!("waiting for `{what}`"));
    wait(&mut vm, "U-Boot SPL 2")?;
    wait(&mut vm, "Model: SiFive HiFive Unleashed A00")?; // U-Boot proper, loaded by SPL from the card
    wait(&mut vm, "Hit any key to stop autoboot")?;
    vm.send(" ")?;
    wait(&mut vm, "=>")?;
    vm.send("mmc rescan\r")?;
    wait(&mut vm, "=>")?;
    vm.send("boot\r")?;
    wait(&mut vm, "Retrieving file: /extlinux/extlinux.conf")?;
    wait(&mut vm, "Retrieving file: /kiln/dtb/sifive/hifive-unleashed-a00.dtb")?;
    wait(&mut vm, "Machine model: SiFive HiFive Unleashed A00")?; // the kernel runs on the card's dtb
    let created = wait(&mut vm, "kiln-data (/dev/mmcblk0p")?;
    ensure!(created.contains("created partition 6"), "kiln-data is not partition 6 after the loaders: {created}");
    wait_ready(&mut vm, "hifive-unleashed (sifive_u from SD)", BOOT_TIMEOUT)?;
    eprintln!("hifive-unleashed: QEMU start to ready {:.1} s (TCG)", vm.elapsed().as_secs_f64());
    vm.kill();
    let table = tool(Command::new("sgdisk").arg("-p").arg(&card), "gdisk")?;
    let (start, end, name) = kiln_qemu_tests::sgdisk_partition(&table, 6).with_context(|| format!("no partition 6:\n{table}"))?;
    ensure!(name == "kiln-data" && (end + 1 - start) * 512 > CARD_SIZE / 2, "kiln-data not grown over the card:\n{table}");
    Ok(())
}
