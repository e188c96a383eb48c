//! Slow tier, A/B updates (docs/updates.md): one VM boot chain per architecture (x86_64 OVMF,
//! aarch64 AAVMF, riscv64 U-Boot's EFI; each with systemd-boot).
//! `qemu-tests/profiles/update-v1.yaml` is built three times with a key made by `kiln keygen`: v1
//! (disk image), v2 (update bundle: a changed file) and v3 (update bundle: a boot script that
//! fails). A grown copy of v1 boots; its `updater` service applies the bundle that `kiln serve`
//! offers at `/updates/<arch>/` and reboots (x86_64: v2 comes from a second disk labelled
//! KILN-UPDATE instead, applied by the boot step with no server running); v2 must boot from slot B
//! on trial, reach `[kiln] ready`, be kept, show the changed file and the `/var/lib` file v1 wrote.
//! Then the server offers v3 (x86_64: a USB stick holding v3 is plugged into the running node
//! through the QEMU monitor, and its KILN-UPDATE watcher applies it): it is applied to slot A, its
//! trial fails a boot step, the node reboots by itself into v2 and says `rolled back from 3.0.0
//! to 2.0.0`, and is ready again. The console lines' times give the time to apply and to roll back.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kiln::arch::Arch;
use kiln::qemu::{Disk, Net, Vm, VmSpec};
use kiln_qemu_tests::{cache_dir, flash_grown, free_port, kiln_bin, kiln_with_cache, repo_root, wait_ready, work_dir, BOOT_TIMEOUT};

const PROFILE: &str = "qemu-tests/profiles/update-v1.yaml";
/// The profile's placeholder trusted key.
pub(crate) const PLACEHOLDER_KEY: &str = "RWRpO/OP8xTqM96NbbUrc16SWUXPnFWMnPeeVf1D9qkxxDtvUZaKSRTn";
/// Fetching, staging, writing and reading back a root of ~100 MiB under TCG.
pub(crate) const APPLY_TIMEOUT: Duration = Duration::from_secs(600);

/// `kiln serve OUT` on the host's loopback (the guest reaches it as 10.0.2.2), which serves the
/// build's bundle at `/updates/<arch>/`; killed on drop.
struct Serve(Child);

impl Serve {
    fn start(out: &Path, port: u16) -> Result<Serve> {
        let mut child = Command::new(kiln_bin()?)
            .args(["serve", out.to_str().context("non-UTF-8 dir")?, "--listen", &format!("127.0.0.1:{port}")])
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kiln serve")?;
        let err = child.stderr.take().context("kiln serve's stderr")?;
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("serve: {line}");
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            ensure!(Instant::now() < deadline, "kiln serve did not listen on port {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Serve(child))
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Builds variant `version` of the profile (`formats`) into `dir/<name>`, signed with `key`.
pub(crate) fn build(dir: &Path, name: &str, text: &str, arch: Arch, formats: &str, key: &Path) -> Result<PathBuf> {
    let profile = dir.join(format!("{name}.yaml"));
    std::fs::write(&profile, text)?;
    let out = dir.join(name);
    let started = Instant::now();
    let (code, log) = kiln_with_cache(
        &cache_dir()?,
        &[
            "build",
            profile.to_str().context("non-UTF-8 dir")?,
            "--arch",
            arch.name(),
            "--format",
            formats,
            "--signing-key",
            key.to_str().context("non-UTF-8 dir")?,
            "--out",
            out.to_str().context("non-UTF-8 dir")?,
        ],
    )?;
    ensure!(code == 0, "kiln build {name} ({formats}) failed (exit {code}):\n{log}");
    eprintln!("{arch} {name} build ({formats}): {:.1} s", started.elapsed().as_secs_f64());
    Ok(out)
}

/// The VM's elapsed time now, just after `wait_for` returned a line (logged with `what`): the
/// difference of two marks is the time between their console lines.
fn mark(vm: &Vm, arch: Arch, what: &str) -> f64 {
    let t = vm.elapsed().as_secs_f64();
    eprintln!("update ({arch}): {what} at {t:.1} s");
    t
}

/// v2 from a second disk labelled KILN-UPDATE present at boot, v3 from a USB stick plugged in while
/// v2 runs (no network for either).
#[test]
fn x86_64_update_from_usb_to_slot_b_then_a_bad_update_rolls_back() -> Result<()> {
    chain(Arch::X86_64, V2From::Usb)
}

#[test]
fn aarch64_update_to_slot_b_then_a_bad_update_rolls_back() -> Result<()> {
    chain(Arch::Aarch64, V2From::Http)
}

/// Through U-Boot's EFI (the image has no extlinux.conf when it takes updates).
#[test]
fn riscv64_update_to_slot_b_then_a_bad_update_rolls_back() -> Result<()> {
    chain(Arch::Riscv64, V2From::Http)
}

/// Through U-Boot's extlinux, as the U-Boot SPL boards boot (docs/updates.md, "Boards without
/// systemd-boot"): QEMU's `sifive_u` takes over four minutes a boot, so the same chain runs on
/// `virt`'s U-Boot with the v1 disk's ESP made a board's (see [`as_extlinux_board`]).
#[test]
fn riscv64_extlinux_update_to_slot_b_then_a_bad_update_rolls_back() -> Result<()> {
    chain_on(Arch::Riscv64, V2From::Http, Loader::Extlinux)
}

#[derive(PartialEq)]
enum Loader {
    /// What the image's platform boots (systemd-boot).
    Built,
    /// U-Boot's extlinux, written by kiln-update from the entries.
    Extlinux,
}

/// Makes the ESP of `disk` (flashed from `out`) an extlinux board's, as a build for an SPL
/// board with `update:` writes it: no systemd-boot (U-Boot's distro boot then has only
/// `extlinux/extlinux.conf`), `loader/kiln-loader` saying `extlinux`, and `extlinux.conf`
/// booting slot A's entry. Edited in place with mtools.
fn as_extlinux_board(disk: &Path, out: &Path, arch: Arch, dir: &Path) -> Result<()> {
    let m = kiln_qemu_tests::manifest(out, arch)?;
    let esp = m.partitions.iter().find(|p| p.name.starts_with("esp")).context("the manifest lists no ESP")?;
    let img = format!("{}@@{}", disk.to_str().context("non-UTF-8 dir")?, esp.offset);
    let mtool = |args: &[&str]| kiln_qemu_tests::tool(Command::new(args[0]).args(["-i", &img]).args(&args[1..]), "mtools");
    let entry = mtool(&["mtype", "::/loader/entries/kiln-a.conf"])?;
    let key =
        |k: &str| entry.lines().find_map(|l| l.strip_prefix(&format!("{k} "))).with_context(|| format!("kiln-a.conf has no {k}: {entry}"));
    let conf = format!(
        "default kiln\ntimeout 10\n\nlabel kiln\n    kernel {}\n    initrd {}\n    append {}\n",
        key("linux")?,
        key("initrd")?,
        key("options")?
    );
    let (conf_file, kind_file) = (dir.join("extlinux.conf"), dir.join("kiln-loader"));
    std::fs::write(&conf_file, conf)?;
    std::fs::write(&kind_file, "extlinux\n")?;
    mtool(&["mdel", &format!("::/EFI/BOOT/{}", arch.efi_boot_file())])?;
    mtool(&["mmd", "::/extlinux"])?;
    mtool(&["mcopy", conf_file.to_str().context("non-UTF-8 dir")?, "::/extlinux/extlinux.conf"])?;
    mtool(&["mcopy", kind_file.to_str().context("non-UTF-8 dir")?, "::/loader/kiln-loader"])?;
    Ok(())
}

#[derive(PartialEq)]
enum V2From {
    /// The updater service, from the test's HTTP server.
    Http,
    /// The boot step, from a FAT disk labelled KILN-UPDATE holding `kiln-update/<arch>/`; then v3
    /// from a USB stick hot-plugged into the running v2.
    Usb,
}

/// Plugs a USB stick holding the image `stick` into the running VM (its xHCI controller), through
/// the monitor: the drive (writes to a temporary overlay, like the boot-time disk), then the
/// usb-storage device on it. The guest sees a new SCSI disk, `/dev/sda`.
fn plug_usb_stick(vm: &mut Vm, stick: &Path) -> Result<()> {
    let file = stick.to_str().context("non-UTF-8 dir")?;
    ensure!(!file.contains(','), "{file}: a comma would end QEMU's file= option");
    vm.monitor(&format!("drive_add 0 if=none,id=stick,format=raw,snapshot=on,file={file}"))?;
    vm.monitor("device_add usb-storage,bus=xhci.0,drive=stick,id=stick-dev")?;
    Ok(())
}

/// A FAT32 disk image labelled KILN-UPDATE with the bundle `bundle` under `kiln-update/<arch>/`
/// (written by kiln's own FAT writer).
pub(crate) fn usb_stick(bundle: &Path, arch: Arch, to: &Path) -> Result<()> {
    let mut tree = kiln::tree::Tree::new();
    for entry in std::fs::read_dir(bundle)? {
        let entry = entry?;
        let name = entry.file_name().into_string().map_err(|n| anyhow::anyhow!("non-UTF-8 file name {n:?}"))?;
        tree.add_file(&format!("kiln-update/{}/{name}", arch.name()), 0o644, std::fs::read(entry.path())?)?;
    }
    let size = kiln::fat::fat32_size_for(&tree, 1 << 20)?;
    let mut out = std::fs::File::create(to)?;
    out.set_len(size)?;
    let opts = kiln::fat::FatOptions { volume_id: 0x4b55_5044, label: "KILN-UPDATE".into(), mtime: 0 };
    kiln::fat::write_fat32(&mut out, size, &tree, &opts)
}

/// Cuts the power (kills QEMU) at a random point while `kiln-update` writes slot B, then powers
/// the machine on again: it must boot v1 from slot A (the new entry, the commit point, was never
/// written). Returns the new VM, up to the update step's first line.
fn power_loss_while_writing(mut vm: Vm, arch: Arch, spec: &VmSpec, dir: &Path) -> Result<Vm> {
    vm.wait_for("[kiln] update: writing the root to slot b", APPLY_TIMEOUT)?;
    // The point of the cut: 0 to 4 s into writing ~120 MiB (it takes longer than that under TCG),
    // varied from run to run and printed, so a failure can be reproduced with its delay. This
    // wait is the experiment itself, not a wait for the guest.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos();
    let delay = Duration::from_millis(u64::from(nanos % 4000));
    std::thread::sleep(delay);
    vm.kill();
    let console = vm.console();
    let cut_after = if console.contains("slot b written and read back") {
        "after the write (while the boot files were written)"
    } else {
        "during the write"
    };
    eprintln!("update ({arch}): power cut {} ms into writing slot b, {cut_after}", delay.as_millis());
    ensure!(
        !console.contains("slot b holds version 2.0.0"),
        "the update committed within {} ms: the cut came too late to test anything",
        delay.as_millis()
    );
    let mut vm = Vm::start(spec, &dir.join("console-after-power-loss.log"))?;
    vm.wait_for("[kiln] root: /dev/vda2", BOOT_TIMEOUT).context("after the power cut the machine must boot slot a")?;
    vm.wait_for("[kiln] update: slot a, version 1.0.0", BOOT_TIMEOUT)?;
    Ok(vm)
}

/// A key pair made by `kiln keygen` in `dir` and the profile `profile` trusting it (in place of
/// its placeholder key): (secret key file, profile text).
pub(crate) fn keygen_and_profile(dir: &Path, profile: &str) -> Result<(PathBuf, String)> {
    let (code, log) = kiln_with_cache(&cache_dir()?, &["keygen", "--out", dir.to_str().context("non-UTF-8 dir")?, "--name", "test"])?;
    ensure!(code == 0, "kiln keygen failed (exit {code}):\n{log}");
    let public = log.lines().rev().find(|l| l.starts_with("RW")).context("kiln keygen printed no public key line")?.trim().to_string();
    let text = std::fs::read_to_string(repo_root().join(profile))?;
    ensure!(text.contains(PLACEHOLDER_KEY), "{profile} lacks the placeholder key");
    Ok((dir.join("test.key"), text.replace(PLACEHOLDER_KEY, &public)))
}

/// `text` with a boot script that fails on purpose (step `site-broken`) added.
pub(crate) fn with_broken_step(text: &str) -> String {
    text.replace(
        "boot_scripts:\n",
        "boot_scripts:\n  - name: broken\n    script: |\n      kiln_log broken \"this version fails on purpose\"\n      false\n",
    )
}

/// The whole chain on one architecture: v1 → v2 (kept) → v3 (rolled back to v2).
fn chain(arch: Arch, v2_from: V2From) -> Result<()> {
    chain_on(arch, v2_from, Loader::Built)
}

fn chain_on(arch: Arch, v2_from: V2From, loader: Loader) -> Result<()> {
    let suffix = if loader == Loader::Extlinux { "-extlinux" } else { "" };
    let dir = work_dir(&format!("update-{arch}{suffix}"))?;
    let port = free_port()?;
    let (key, text) = keygen_and_profile(&dir, PROFILE)?;
    let v1 = text.replace("@PORT@", &port.to_string());
    // Both files' contents change: the image's /etc and the (hidden) /var/lib seed.
    let v2 = v1.replace("version: 1.0.0", "version: 2.0.0").replace("content: \"v1\"", "content: \"v2\"");
    let v3 = with_broken_step(&v2.replace("version: 2.0.0", "version: 3.0.0").replace("content: \"v2\"", "content: \"v3\""));
    ensure!(v1 != v2 && v2 != v3 && v3.contains("name: broken"), "the profile's placeholders changed");
    let out1 = build(&dir, "v1", &v1, arch, "disk", &key)?;
    let out2 = build(&dir, "v2", &v2, arch, "update", &key)?;
    let out3 = build(&dir, "v3", &v3, arch, "update", &key)?;
    for (out, v) in [(&out2, "2.0.0"), (&out3, "3.0.0")] {
        let manifest = std::fs::read_to_string(out.join(arch.name()).join("update/update.txt"))?;
        ensure!(manifest.contains(&format!("\nversion {v}\n")), "{manifest}");
    }
    let disk = dir.join("disk.img");
    flash_grown(&out1.join(arch.name()).join("disk.img"), &disk, 2 << 30)?;
    if loader == Loader::Extlinux {
        as_extlinux_board(&disk, &out1, arch, &dir)?;
    }

    let mut spec = VmSpec::new(arch);
    spec.disks = vec![Disk { path: disk.clone(), snapshot: false }];
    spec.net = Net::User { hostfwd: vec![] };
    // kiln serve offers v2 only on the HTTP path (until v3, nothing answers on the USB path).
    let serve = if v2_from == V2From::Usb {
        let stick = dir.join("usb.img");
        usb_stick(&out2.join(arch.name()).join("update"), arch, &stick)?;
        spec.disks.push(Disk { path: stick, snapshot: true });
        // v3 comes on a USB stick plugged in later: a USB controller, and the monitor to add it.
        spec.usb = true;
        spec.monitor = Some(dir.join("monitor.sock"));
        None
    } else {
        Some(Serve::start(&out2, port)?)
    };
    let mut vm = Vm::start(&spec, &dir.join("console.log"))?;
    vm.wait_for("[kiln] update: slot a, version 1.0.0", BOOT_TIMEOUT)?;
    let apply_start = if v2_from == V2From::Usb {
        // Applied by the boot step, before v1 is ready, with no network involved.
        vm.wait_for("[kiln] update: applying the bundle on /dev/vdb (KILN-UPDATE)", BOOT_TIMEOUT)?;
        // Power loss while slot B is written: v1 still boots, and applies the stick again.
        vm = power_loss_while_writing(vm, arch, &spec, &dir)?;
        vm.wait_for("[kiln] update: applying the bundle on /dev/vdb (KILN-UPDATE)", BOOT_TIMEOUT)?;
        mark(&vm, arch, "v2 apply from the KILN-UPDATE disk started (again)")
    } else {
        vm.wait_for("[kiln] update-test: etc=v1 varlib=v1 first=v1", BOOT_TIMEOUT)?;
        wait_ready(&mut vm, &format!("{arch} v1 (slot a)"), BOOT_TIMEOUT)?;
        // v2: applied by the updater service from the HTTP server, then the trial of slot B.
        vm.wait_for("[kiln] update: fetching update.txt from http://10.0.2.2", APPLY_TIMEOUT)?;
        mark(&vm, arch, "v2 apply started")
    };
    vm.wait_for("[kiln] update: slot b written and read back (sha256 ok)", APPLY_TIMEOUT)?;
    vm.wait_for("[kiln] update: slot b holds version 2.0.0", APPLY_TIMEOUT)?;
    let applied = mark(&vm, arch, "v2 applied");
    if v2_from == V2From::Usb {
        // v1's remaining boot steps are skipped: no ready before the reboot.
        let line = vm.wait_for("[kiln] ", BOOT_TIMEOUT)?;
        ensure!(line.contains("[kiln] update: rebooting into the trial of slot b"), "{line}");
        let line = vm.wait_for("[kiln] ", BOOT_TIMEOUT)?;
        ensure!(line.contains("[kiln] boot: rebooting for an update; the remaining steps are skipped"), "{line}");
    }
    eprintln!("update ({arch}): time to apply v2: {:.1} s", applied - apply_start);
    vm.wait_for("[kiln] root: /dev/vda3", BOOT_TIMEOUT)?;
    vm.wait_for("[kiln] update: trial boot of slot b (version 2.0.0)", BOOT_TIMEOUT)?;
    // The data partition's files from v1: the seed, and first-booted (on the USB path the update
    // step applied v2 before v1's boot script ran, so v2 is the first to write that one).
    let first = if v2_from == V2From::Usb { "v2" } else { "v1" };
    vm.wait_for(&format!("[kiln] update-test: etc=v2 varlib=v1 first={first}"), BOOT_TIMEOUT)?;
    wait_ready(&mut vm, &format!("{arch} v2 (slot b, trial)"), BOOT_TIMEOUT)?;
    vm.wait_for("[kiln] update: slot b good (version 2.0.0)", BOOT_TIMEOUT)?;
    let good = mark(&vm, arch, "v2 kept");
    eprintln!("update ({arch}): from applied to v2 good (reboot + trial boot): {:.1} s", good - applied);
    // systemd-boot counts the try itself on EDK2 firmware; U-Boot's EFI cannot rename files, so
    // there the update step counts it (docs/updates.md).
    let counted_here = vm.console().contains("the boot loader did not count this trial boot");
    eprintln!("update ({arch}): trial counted by {}", if counted_here { "kiln-update" } else { "systemd-boot" });
    ensure!(arch == Arch::Riscv64 || !counted_here, "systemd-boot on EDK2 should have counted the try itself");

    // v3: a boot step fails on its trial; the node goes back to v2 by itself.
    drop(serve);
    let _serve = if v2_from == V2From::Usb {
        // Plugged into the running node: its watcher (kiln-update media) applies it.
        let stick3 = dir.join("usb-v3.img");
        usb_stick(&out3.join(arch.name()).join("update"), arch, &stick3)?;
        plug_usb_stick(&mut vm, &stick3)?;
        let plugged = mark(&vm, arch, "v3 stick plugged in");
        vm.wait_for("[kiln] update: applying the bundle on /dev/sda (KILN-UPDATE)", BOOT_TIMEOUT)?;
        let seen = mark(&vm, arch, "v3 stick seen by the watcher");
        eprintln!("update ({arch}): from plugging the stick in to its apply starting: {:.1} s", seen - plugged);
        None
    } else {
        Some(Serve::start(&out3, port)?)
    };
    vm.wait_for("[kiln] update: slot a holds version 3.0.0", APPLY_TIMEOUT)?;
    let applied3 = mark(&vm, arch, "v3 applied");
    vm.wait_for("[kiln] update: trial boot of slot a (version 3.0.0)", BOOT_TIMEOUT)?;
    // The failing step's error is the expected one (wait_for stops at any other error line).
    vm.wait_for("[kiln] error: boot step site-broken failed", BOOT_TIMEOUT)?;
    vm.wait_for("[kiln] update: trial of slot a (version 3.0.0) failed: boot step(s) failed: site-broken", BOOT_TIMEOUT)?;
    let failed = mark(&vm, arch, "v3 trial failed");
    vm.wait_for("[kiln] root: /dev/vda3", BOOT_TIMEOUT)?;
    vm.wait_for("[kiln] update: rolled back from 3.0.0 to 2.0.0: boot step(s) failed: site-broken", BOOT_TIMEOUT)?;
    // Where the rollback boot's report is: the lines after it are that boot's.
    let after_rollback = vm.console().rfind("rolled back from 3.0.0 to 2.0.0").context("the rollback line is gone")?;
    if v2_from == V2From::Usb {
        // The disk is still there (a trial boot does not use it): the running version is not
        // applied again.
        vm.wait_for("[kiln] update: /dev/vdb (KILN-UPDATE) holds version 2.0.0, which is running; remove the medium", BOOT_TIMEOUT)?;
    }
    vm.wait_for(&format!("[kiln] update-test: etc=v2 varlib=v1 first={first}"), BOOT_TIMEOUT)?;
    wait_ready(&mut vm, &format!("{arch} v2 after the rollback"), BOOT_TIMEOUT)?;
    let back = mark(&vm, arch, "v2 ready again");
    if v2_from == V2From::Usb {
        // So is the stick with v3, which failed here: refused once, by the boot step or (if USB
        // found it after the boot step looked) by the watcher, maybe after ready.
        let refused = "[kiln] update: /dev/sda (KILN-UPDATE) holds version 3.0.0, which failed its trial here; not applied again";
        if !vm.console()[after_rollback..].contains(refused) {
            vm.wait_for(refused, BOOT_TIMEOUT)?;
        }
        let lines = vm.console()[after_rollback..].matches(refused).count();
        ensure!(lines == 1, "the v3 stick was refused {lines} times after the rollback; once is the rule");
    }
    eprintln!(
        "update ({arch}): v3 applied to trial failure {:.1} s; trial failure to v2 ready (rollback) {:.1} s",
        failed - applied3,
        back - failed
    );
    if loader == Loader::Extlinux {
        // U-Boot read kiln-update's extlinux.conf at each boot: v1 (slot a), v2's trial (b),
        // v3's trial (a), the rollback (b).
        let console = vm.console();
        let kernels: Vec<&str> =
            console.lines().filter_map(|l| l.trim().strip_prefix("Retrieving file: ")).filter(|f| f.ends_with("/vmlinuz")).collect();
        ensure!(
            kernels == ["/kiln/vmlinuz", "/kiln-b/vmlinuz", "/kiln/vmlinuz", "/kiln-b/vmlinuz"],
            "U-Boot's extlinux loaded {kernels:?}"
        );
    }
    Ok(())
}
