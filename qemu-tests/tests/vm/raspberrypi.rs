//! Slow tier: Raspberry Pi cards (platforms `rpi3` and `rpi4`, docs/boards.md).
//!
//! - The card as the firmware sees it (rpi3 and rpi4, host-side): a hybrid MBR whose entry 1 is
//!   the boot partition as FAT32 (0x0C) and entry 2 the 0xEE entry over the GPT; the partition
//!   passes `fsck.vfat`; the GPU firmware files on it are byte for byte those of the
//!   `raspi-firmware` package the manifest records (read from the cache by its digest);
//!   `config.txt`, read per board with its conditional filters, sets `arm_64bit=1` and
//!   `enable_uart=1`, and names a kernel, an initramfs (`followkernel`) and a device tree that are
//!   on the partition and equal to the kernel package's files; `cmdline.txt` is the manifest's
//!   command line with the mini UART console.
//! - `qemu-tests/profiles/rpi3.yaml` boots on QEMU's `raspi3b` with the card as its SD card. QEMU
//!   has no Pi boot ROM or VideoCore firmware, so the test does the firmware's part: it reads
//!   `config.txt` (the `[pi3]` board, a 3 Model B) and `cmdline.txt` from the card's own boot
//!   partition and passes the kernel, device tree, initramfs and command line they name. The card
//!   is a copy padded to a power of two (QEMU's SD card rule) with room to grow; the boot reaches
//!   `[kiln] ready` with `kiln-data` created over the free space on `mmcblk0`.
//! - `profiles/rpi4-agent.yaml` (a k3s agent) builds with stand-in arm64 k3s assets, and its card
//!   passes the same checks for the Pi 4, 400 and CM4. QEMU's `raspi4b` cannot boot Debian's
//!   kernel with the unmodified device tree (docs/boards.md), so the Pi 4 card is not booted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use kiln::arch::Arch;
use kiln::manifest::{InputKind, Manifest};
use kiln::qemu::Vm;
use kiln_qemu_tests::registry::sha;
use kiln_qemu_tests::{
    build_once, cache_dir, extract_range, kiln_with_cache, manifest, sgdisk_partition, stand_in, tool, wait_ready, work_dir,
};

/// `raspi3b` under TCG is slower than the virt machines (no virtio, an emulated SD card): the
/// first boot with the data partition's creation took ~90 s on a quiet host.
const PI_BOOT_TIMEOUT: Duration = Duration::from_secs(420);

fn rpi3_build() -> Result<&'static Path> {
    static OUT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    build_once(&OUT, "qemu-tests/profiles/rpi3.yaml", "rpi3-build")
}

/// The files of a card's boot partition, read with mtools.
struct BootPartition {
    fat: PathBuf,
}

impl BootPartition {
    fn read(&self, name: &str) -> Result<Vec<u8>> {
        let out = Command::new("mcopy").arg("-n").arg("-i").arg(&self.fat).arg(format!("::/{name}")).arg("-").output();
        let out = out.context("running mcopy (install the `mtools` package)")?;
        ensure!(out.status.success(), "/{name} is not on the boot partition: {}", String::from_utf8_lossy(&out.stderr));
        Ok(out.stdout)
    }

    fn text(&self, name: &str) -> Result<String> {
        String::from_utf8(self.read(name)?).with_context(|| format!("/{name} is not UTF-8"))
    }

    /// `config.txt` as the firmware of a board matching `filters` reads it.
    fn config(&self, filters: &[&str]) -> Result<BTreeMap<String, String>> {
        Ok(kiln::raspberrypi::read_config_txt(&self.text("config.txt")?, filters))
    }
}

/// Partition 1 of the card, checked by `fsck.vfat`, with the MBR entries the Pi firmware reads.
fn boot_partition(img: &Path, m: &Manifest, dir: &Path) -> Result<BootPartition> {
    let p = m.partitions.first().context("the manifest lists no partitions")?;
    let mbr = std::fs::read(img)?.into_iter().take(512).collect::<Vec<u8>>();
    let entry = |i: usize| {
        let e = &mbr[446 + 16 * i..462 + 16 * i];
        (e[4], u32::from_le_bytes(e[8..12].try_into().unwrap()) as u64, u32::from_le_bytes(e[12..16].try_into().unwrap()) as u64)
    };
    ensure!(entry(0) == (0x0C, p.offset / 512, p.size / 512), "MBR entry 1 is {:?}, not the boot partition as FAT32 (0x0C)", entry(0));
    ensure!(entry(1) == (0xEE, 1, p.offset / 512 - 1), "MBR entry 2 is {:?}, not 0xEE over the GPT", entry(1));
    let scan = tool(Command::new("gdisk").arg("-l").arg(img), "gdisk")?;
    ensure!(scan.contains("MBR: hybrid") && scan.contains("GPT: present"), "gdisk -l:\n{scan}");
    let fat = dir.join("boot.fat");
    extract_range(img, p.offset, p.size, &fat)?;
    tool(Command::new("fsck.vfat").arg("-n").arg(&fat), "dosfstools")?;
    Ok(BootPartition { fat })
}

/// A package the build used, unpacked from the cache (where it is stored by the digest the
/// manifest records) into `dir/<name>`.
fn unpack_input(m: &Manifest, name_prefix: &str, dir: &Path) -> Result<PathBuf> {
    let input = m
        .inputs
        .iter()
        .find(|i| i.kind == InputKind::Deb && i.name.starts_with(name_prefix))
        .with_context(|| format!("the manifest records no package {name_prefix}*"))?;
    let deb = cache_dir()?.join("blobs/sha256").join(&input.sha256);
    ensure!(kiln::digest::sha256_file(&deb)? == input.sha256, "cached {} does not match the manifest", input.name);
    let to = dir.join(&input.name);
    tool(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&to), "dpkg")?;
    Ok(to)
}

/// One board of a platform: its `config.txt` filters and the device tree it must get.
struct Board {
    filters: &'static [&'static str],
    dtb: &'static str,
}

/// The host-side checks of a Pi card (see the module comment); returns its boot partition.
fn check_card(out: &Path, dir: &Path, firmware: &[&str], boards: &[Board]) -> Result<BootPartition> {
    let m = manifest(out, Arch::Aarch64)?;
    let img = out.join("aarch64/disk.img");
    let boot = boot_partition(&img, &m, dir)?;

    let fw = unpack_input(&m, "raspi-firmware", dir)?;
    for f in firmware {
        let packaged = std::fs::read(fw.join("usr/lib/raspi-firmware").join(f)).with_context(|| format!("raspi-firmware has no {f}"))?;
        ensure!(sha(&boot.read(f)?) == sha(&packaged), "/{f} on the card is not raspi-firmware's");
    }

    let kernel_pkg = unpack_input(&m, "linux-image-", dir)?;
    let kver = &m.kernel_version;
    for board in boards {
        let cfg = boot.config(board.filters)?;
        let key = |k: &str| cfg.get(k).cloned().with_context(|| format!("config.txt sets no `{k}` for {:?}: {cfg:?}", board.filters));
        ensure!(key("arm_64bit")? == "1" && key("enable_uart")? == "1", "{:?}: {cfg:?}", board.filters);
        let kernel = boot.read(&key("kernel")?)?;
        ensure!(
            sha(&kernel) == sha(&std::fs::read(kernel_pkg.join(format!("boot/vmlinuz-{kver}")))?),
            "the card's kernel is not the package's"
        );
        let initramfs = key("initramfs")?;
        let words: Vec<&str> = initramfs.split_whitespace().collect();
        ensure!(words.len() == 2 && words[1] == "followkernel", "initramfs line `{initramfs}`");
        ensure!(!boot.read(words[0])?.is_empty(), "the initramfs {} is empty", words[0]);
        let dtb = key("device_tree")?;
        ensure!(dtb == board.dtb, "{:?}: device_tree={dtb}, expected {}", board.filters, board.dtb);
        let packaged = std::fs::read(kernel_pkg.join(format!("usr/lib/linux-image-{kver}/broadcom/{dtb}")))?;
        ensure!(sha(&boot.read(&dtb)?) == sha(&packaged), "/{dtb} on the card is not the kernel package's");
    }
    let cmdline = boot.text("cmdline.txt")?;
    ensure!(cmdline == format!("{}\n", m.kernel_cmdline), "cmdline.txt `{cmdline}` is not the manifest's `{}`", m.kernel_cmdline);
    let last_console = cmdline.split_whitespace().rfind(|w| w.starts_with("console="));
    ensure!(last_console == Some("console=ttyS1,115200"), "the kernel console is {last_console:?}, not the mini UART");
    // The packages were only read, not kept: a kernel package unpacked is ~400 MB.
    let _ = std::fs::remove_dir_all(&fw);
    let _ = std::fs::remove_dir_all(&kernel_pkg);
    Ok(boot)
}

#[test]
fn rpi3_card_holds_what_the_firmware_reads() -> Result<()> {
    let out = rpi3_build()?;
    let dir = work_dir("rpi3-card")?;
    let boards =
        [Board { filters: &["pi3"], dtb: "bcm2837-rpi-3-b.dtb" }, Board { filters: &["pi3", "pi3+"], dtb: "bcm2837-rpi-3-b-plus.dtb" }];
    check_card(out, &dir, &["bootcode.bin", "start.elf", "fixup.dat"], &boards)?;
    Ok(())
}

/// The QEMU serial port a kernel console is on in the `raspi*` machines: QEMU wires its first
/// serial to the PL011 (`ttyAMA0`) and its second to the mini UART (`ttyS1` in Debian's device
/// trees).
fn serial_args(console: &str) -> Result<&'static [&'static str]> {
    let device = console.trim_start_matches("console=").split(',').next().unwrap_or_default();
    Ok(match device {
        "ttyS1" => &["-serial", "null", "-serial", "stdio"],
        "ttyAMA0" => &["-serial", "stdio"],
        other => bail!("no QEMU raspi serial port for console {other}"),
    })
}

/// A card in QEMU's SD slot: a copy of a built image padded to a power of two (QEMU's SD rule),
/// at least twice the image, and where its boot partition is.
struct Card {
    path: PathBuf,
    boot: (u64, u64),
}

impl Card {
    fn flash(out: &Path, dir: &Path) -> Result<Card> {
        let m = manifest(out, Arch::Aarch64)?;
        let img = out.join("aarch64/disk.img");
        let p = m.partitions.first().context("the manifest lists no partitions")?;
        let path = dir.join("card.img");
        let size = (std::fs::metadata(&img)?.len() * 2).next_power_of_two();
        kiln_qemu_tests::flash_grown(&img, &path, size)?;
        Ok(Card { path, boot: (p.offset, p.size) })
    }

    /// The card's boot partition as it is now (after the boots so far).
    fn boot_partition(&self, dir: &Path) -> Result<BootPartition> {
        let fat = dir.join("boot-now.fat");
        extract_range(&self.path, self.boot.0, self.boot.1, &fat)?;
        Ok(BootPartition { fat })
    }

    /// Powers a Pi 3 Model B on with this card, doing the firmware's part: `config.txt` (the
    /// `[pi3]` board) as it is on the card now, then the kernel, device tree and initramfs it
    /// names and the command line in the file its `cmdline=` names (`cmdline.txt` by default).
    /// With `stick`, a USB stick (raspi3b's dwc2 host). `-no-reboot`: a reboot ends QEMU, and the
    /// next power-on reads the card again, as the firmware would. Returns the VM and the kernel
    /// `config.txt` named.
    fn power_on(&self, dir: &Path, log: &str, stick: Option<&Path>) -> Result<(Vm, String)> {
        let boot = self.boot_partition(dir)?;
        let cfg = boot.config(&["pi3"])?;
        let named = |k: &str| cfg.get(k).with_context(|| format!("config.txt sets no `{k}`: {cfg:?}"));
        let initramfs = named("initramfs")?.split_whitespace().next().context("empty initramfs line")?.to_string();
        let files = [("kernel", named("kernel")?.clone()), ("dtb", named("device_tree")?.clone()), ("initrd", initramfs)];
        let mut paths = BTreeMap::new();
        for (what, name) in &files {
            let path = dir.join(format!("firmware-loaded-{what}"));
            std::fs::write(&path, boot.read(name)?)?;
            paths.insert(*what, path);
        }
        let cmdline_file = cfg.get("cmdline").map(String::as_str).unwrap_or("cmdline.txt");
        let cmdline = boot.text(cmdline_file)?.lines().next().with_context(|| format!("empty {cmdline_file}"))?.to_string();
        let console = cmdline.split_whitespace().rfind(|w| w.starts_with("console=")).context("no console= in cmdline.txt")?;

        let mut cmd = Command::new("qemu-system-aarch64");
        cmd.args(["-accel", "tcg"]);
        // The Pi 3 Model B: BCM2837, 1 GiB, its SD card on the SDHOST controller.
        cmd.args(["-machine", "raspi3b"]);
        cmd.arg("-kernel").arg(&paths["kernel"]).arg("-dtb").arg(&paths["dtb"]).arg("-initrd").arg(&paths["initrd"]);
        cmd.args(["-append", &cmdline]);
        cmd.args(["-drive", &format!("if=sd,format=raw,file={}", self.path.to_str().context("non-UTF-8 work dir")?)]);
        if let Some(stick) = stick {
            let file = stick.to_str().context("non-UTF-8 work dir")?;
            cmd.args(["-drive", &format!("if=none,id=stick,format=raw,snapshot=on,file={file}")]);
            cmd.args(["-device", "usb-storage,drive=stick"]);
        }
        cmd.args(["-display", "none", "-monitor", "none", "-no-reboot"]);
        cmd.args(serial_args(console)?);
        let vm = Vm::start_command(cmd, Arch::Aarch64, &dir.join(log))?;
        Ok((vm, named("kernel")?.clone()))
    }
}

#[test]
fn rpi3_card_boots_on_raspi3b_from_its_own_boot_partition() -> Result<()> {
    let out = rpi3_build()?;
    let dir = work_dir("rpi3-boot")?;
    let m = manifest(out, Arch::Aarch64)?;
    boot_partition(&out.join("aarch64/disk.img"), &m, &dir)?;
    let card = Card::flash(out, &dir)?;
    let size = std::fs::metadata(&card.path)?.len();
    let (mut vm, _) = card.power_on(&dir, "console.log", None)?;
    let grown = vm.wait_for("firstboot: created partition 4 kiln-data (/dev/mmcblk0p4", PI_BOOT_TIMEOUT)?;
    wait_ready(&mut vm, "raspi3b (rpi3 card)", PI_BOOT_TIMEOUT)?;
    vm.kill();
    eprintln!("{}", grown.trim());

    // On the card: kiln-data over the free space, up to the end; the firmware's MBR entry kept.
    let table = tool(Command::new("sgdisk").arg("-p").arg(&card.path), "gdisk")?;
    let (_, end, name) = sgdisk_partition(&table, 4).with_context(|| format!("no partition 4 on the card:\n{table}"))?;
    ensure!(name == "kiln-data", "partition 4 is `{name}`");
    ensure!(size / 512 - end < 4096, "kiln-data ends at sector {end} of {}:\n{table}", size / 512);
    let after = std::fs::read(&card.path)?.into_iter().take(512).collect::<Vec<u8>>();
    ensure!(after[446 + 4] == 0x0C, "first boot lost the MBR entry the Pi firmware boots from");
    Ok(())
}

/// A/B updates on the Pi card, whose firmware reads `config.txt` and not the boot entries:
/// `qemu-tests/profiles/rpi3-update.yaml` built as v1 (the card), v2 (a changed file) and v3 (a
/// boot step that fails), the bundles on USB sticks. v1 applies v2 from the stick at boot and
/// reboots; `config.txt` then names slot B's kernel (the trial), which reaches ready and is kept.
/// v3 goes to slot A the same way; its trial fails a boot step, and the reboot after it finds
/// `config.txt` naming slot B again: the node rolls back by itself and says so.
#[test]
fn rpi3_card_updates_from_usb_sticks_and_a_failed_trial_falls_back() -> Result<()> {
    use crate::update::{build, keygen_and_profile, usb_stick, with_broken_step, APPLY_TIMEOUT};
    let dir = work_dir("rpi3-update")?;
    let (key, v1) = keygen_and_profile(&dir, "qemu-tests/profiles/rpi3-update.yaml")?;
    let v2 = v1.replace("version: 1.0.0", "version: 2.0.0").replace("content: \"v1\"", "content: \"v2\"");
    let v3 = with_broken_step(&v2.replace("version: 2.0.0", "version: 3.0.0"));
    ensure!(v1 != v2 && v3.contains("name: broken"), "the profile's placeholders changed");
    let out1 = build(&dir, "v1", &v1, Arch::Aarch64, "disk", &key)?;
    let out2 = build(&dir, "v2", &v2, Arch::Aarch64, "update", &key)?;
    let out3 = build(&dir, "v3", &v3, Arch::Aarch64, "update", &key)?;
    let (stick2, stick3) = (dir.join("usb-v2.img"), dir.join("usb-v3.img"));
    usb_stick(&out2.join("aarch64/update"), Arch::Aarch64, &stick2)?;
    usb_stick(&out3.join("aarch64/update"), Arch::Aarch64, &stick3)?;
    let card = Card::flash(&out1, &dir)?;
    let kernel_is = |kernel: &str, want: &str, when: &str| {
        ensure!(kernel == want, "{when}: config.txt names the kernel {kernel}, not {want}");
        eprintln!("rpi3 update: {when}: config.txt names {kernel}");
        Ok(())
    };

    // Powers on with `stick`, whose bundle (`version`) the boot step applies to `slot`, then
    // reboots into its trial: QEMU must exit (-no-reboot), so the machine really restarted.
    let apply_from_stick = |log: &str, stick: &Path, kernel_now: &str, slot: char, version: &str| -> Result<()> {
        let (mut vm, kernel) = card.power_on(&dir, log, Some(stick))?;
        kernel_is(&kernel, kernel_now, &format!("before {version}"))?;
        vm.wait_for("[kiln] update: applying the bundle on /dev/sda (KILN-UPDATE)", PI_BOOT_TIMEOUT)?;
        let started = vm.elapsed();
        vm.wait_for(&format!("[kiln] update: slot {slot} holds version {version}"), APPLY_TIMEOUT)?;
        eprintln!("rpi3 update: {version} applied from the stick in {:.1} s", (vm.elapsed() - started).as_secs_f64());
        vm.wait_for(&format!("[kiln] update: rebooting into the trial of slot {slot}"), PI_BOOT_TIMEOUT)?;
        vm.wait_exit(PI_BOOT_TIMEOUT).context("the reboot into the trial did not restart the machine")?;
        Ok(())
    };

    // v1, slot A: the boot step applies v2 from the stick and reboots.
    apply_from_stick("console-1-v1.log", &stick2, "vmlinuz", 'b', "2.0.0")?;

    // The trial of v2, slot B, as config.txt names it now; kept at ready.
    let (mut vm, kernel) = card.power_on(&dir, "console-2-v2-trial.log", None)?;
    kernel_is(&kernel, "kiln-b/vmlinuz", "trial of v2")?;
    vm.wait_for("[kiln] update: trial boot of slot b (version 2.0.0)", PI_BOOT_TIMEOUT)?;
    vm.wait_for("[kiln] update-test: etc=v2", PI_BOOT_TIMEOUT)?;
    wait_ready(&mut vm, "raspi3b v2 (slot b, trial)", PI_BOOT_TIMEOUT)?;
    vm.wait_for("[kiln] update: slot b good (version 2.0.0)", PI_BOOT_TIMEOUT)?;
    vm.kill();

    // v2, kept: applies v3 to slot A from the other stick.
    apply_from_stick("console-3-v2.log", &stick3, "kiln-b/vmlinuz", 'a', "3.0.0")?;

    // The trial of v3 fails a boot step and reboots by itself.
    let (mut vm, kernel) = card.power_on(&dir, "console-4-v3-trial.log", None)?;
    kernel_is(&kernel, "kiln/vmlinuz", "trial of v3")?;
    vm.wait_for("[kiln] update: trial boot of slot a (version 3.0.0)", PI_BOOT_TIMEOUT)?;
    // The failing step's error is the expected one (wait_for stops at any other error line).
    vm.wait_for("[kiln] error: boot step site-broken failed", PI_BOOT_TIMEOUT)?;
    vm.wait_for("[kiln] update: trial of slot a (version 3.0.0) failed: boot step(s) failed: site-broken", PI_BOOT_TIMEOUT)?;
    let failed = std::time::Instant::now();
    vm.wait_exit(PI_BOOT_TIMEOUT).context("the failed trial did not restart the machine")?;

    // config.txt names slot B again: v2 boots and reports the rollback.
    let (mut vm, kernel) = card.power_on(&dir, "console-5-rollback.log", None)?;
    kernel_is(&kernel, "kiln-b/vmlinuz", "after the failed trial")?;
    vm.wait_for("[kiln] update: rolled back from 3.0.0 to 2.0.0: boot step(s) failed: site-broken", PI_BOOT_TIMEOUT)?;
    vm.wait_for("[kiln] update-test: etc=v2", PI_BOOT_TIMEOUT)?;
    wait_ready(&mut vm, "raspi3b v2 after the rollback", PI_BOOT_TIMEOUT)?;
    eprintln!("rpi3 update: from v3's failed trial to v2 ready again (rollback): {:.1} s", failed.elapsed().as_secs_f64());
    vm.kill();
    Ok(())
}

#[test]
fn rpi4_agent_card_holds_what_the_firmware_reads() -> Result<()> {
    let dir = work_dir("rpi4-agent")?;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let assets = stand_in::assets_arm64(&dir, &seed.to_string())?;
    std::fs::write(dir.join("edge.token"), "K10stand-in-token-of-an-existing-cluster\n")?;
    let profile = dir.join("rpi4-agent.yaml");
    std::fs::write(&profile, stand_in::profile_text("rpi4-agent")?)?;
    let out = dir.join("out");
    let s = |p: &Path| p.to_str().context("non-UTF-8 work dir").map(str::to_string);
    let started = std::time::Instant::now();
    let (code, log) = kiln_with_cache(
        &cache_dir()?,
        &["build", &s(&profile)?, "--k3s-assets", &s(&assets)?, "--out", &s(&out)?, "--format", "disk,disk.img.bmap"],
    )?;
    ensure!(code == 0, "kiln build rpi4-agent failed (exit {code}):\n{log}");
    eprintln!("rpi4-agent build: {:.1} s", started.elapsed().as_secs_f64());

    let boards = [
        Board { filters: &["pi4"], dtb: "bcm2711-rpi-4-b.dtb" },
        Board { filters: &["pi4", "pi400"], dtb: "bcm2711-rpi-400.dtb" },
        Board { filters: &["pi4", "cm4"], dtb: "bcm2711-rpi-cm4-io.dtb" },
    ];
    check_card(&out, &dir, &["start4.elf", "fixup4.dat"], &boards)?;
    let m = manifest(&out, Arch::Aarch64)?;
    // The Pi 4's SD slot (emmc2) and its supply regulators are modules the initramfs carries.
    for module in ["sdhci_iproc", "fixed", "gpio_regulator"] {
        ensure!(m.initramfs_modules.iter().any(|x| x == module), "{module} is not in the initramfs: {:?}", m.initramfs_modules);
    }
    // The card's block map: what `kiln flash` and `bmaptool copy` write of it.
    let bmap = kiln::bmap::Bmap::read(&out.join("aarch64/disk.img.bmap"))?;
    let img = std::fs::metadata(out.join("aarch64/disk.img"))?.len();
    eprintln!("rpi4-agent: disk.img {} MiB, {} MiB mapped", img >> 20, bmap.mapped_bytes() >> 20);
    Ok(())
}
