//! Slow tier, network install (x86_64): builds `qemu-tests/profiles/pxe.yaml` with
//! `--format disk,netboot`, runs `kiln serve` on the host's loopback, and boots a VM with a blank
//! 4 GiB disk and a virtio NIC on QEMU user networking whose DHCP names
//! `http://10.0.2.2:PORT/boot.ipxe` (the NIC's iPXE option ROM from `ipxe-qemu`, under OVMF).
//! - iPXE chains to the per-machine script, boots the installer kernel, which gets a DHCP lease,
//!   streams the system onto the disk with its digests checked, reports `POST /installed` and
//!   reboots; the next network boot is sent to the disk, which comes up to `[kiln] ready`;
//! - the server's state file records the MAC; the disk holds the manifest's digests;
//! - a second start of the same VM goes straight to the disk (no installer);
//! - `kiln serve` stops on SIGINT with exit status 0;
//! - served a tampered `root.img`, the installer refuses it (digest named on the console) before
//!   the data partition exists, and reports nothing.
//!
//! The image is one rack's (`cluster` with an inventory): the x86_64 machine is not in the inventory
//! and comes up with no role and a MAC-derived name; the aarch64 machine's MAC is inventory node
//! `rack-a1`, so `kiln serve` passes `kiln.node=rack-a1` to its installer, records the node with
//! the install, and the installed system finds itself as rack-a1 (by the same MAC) and runs that
//! node's single etcd member.
//!
//! aarch64 (AAVMF has no iPXE ROM for virtio-net): the firmware's own PXE loads the build's
//! `netboot/ipxe.efi` (Debian's arm64 iPXE) over QEMU's TFTP, iPXE runs `autoexec.ipxe` from the
//! same TFTP directory (`dhcp`, then `chain` to `kiln serve`), and the install and report follow
//! as on x86_64. The disk comes first in the boot order (a blank disk falls through to the
//! network): AAVMF does not try the disk after iPXE `exit`s (it opens its setup menu), so the
//! "installed: boot from the disk" answer is exercised on x86_64 only.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kiln::arch::Arch;
use kiln::qemu::{Disk, Net, Vm, VmSpec};
use kiln_qemu_tests::{
    cache_dir, free_port, kiln_bin, kiln_with_cache, manifest, sgdisk_partition, sha256_range, tool, work_dir, BOOT_TIMEOUT,
};

const PROFILE: &str = "qemu-tests/profiles/pxe.yaml";
/// From power-on through iPXE, the installer's DHCP and the streamed download (~150 MiB over
/// QEMU's user network under TCG) to `install: done`.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(900);
/// From iPXE's `exit` to `[kiln] ready` on the disk: OVMF first tries its other network boot
/// options (PXE and HTTP over IPv4 and IPv6, each waiting out its DHCP timeouts, slow under TCG
/// on a loaded host) before it reaches the disk.
const DISK_AFTER_NETWORK_TIMEOUT: Duration = Duration::from_secs(420);
const MAC: &str = "52:54:00:4b:00:01";

/// `kiln serve` as a child process; its log lines are collected. SIGINT on drop.
struct Serve {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Serve {
    fn start(dir: &Path, port: u16) -> Result<Serve> {
        let mut child = Command::new(kiln_bin()?)
            .args(["serve", dir.to_str().context("non-UTF-8 dir")?, "--listen", &format!("127.0.0.1:{port}")])
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kiln serve")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        for out in [Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>, Box::new(child.stderr.take().unwrap())] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    eprintln!("serve: {line}");
                    log.lock().unwrap().push(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            ensure!(Instant::now() < deadline, "kiln serve did not listen on port {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Serve { child, log })
    }

    fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// SIGINT, then the exit status (must be success: a clean stop).
    fn interrupt(&mut self) -> Result<std::process::ExitStatus> {
        Command::new("kill").args(["-INT", &self.child.id().to_string()]).status()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("kiln serve did not stop within 10 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn pxe_vm(disk: &Path, port: u16, mac: &str, log: &Path) -> Result<Vm> {
    let mut spec = VmSpec::new(Arch::X86_64);
    spec.disks = vec![Disk { path: disk.to_path_buf(), snapshot: false }];
    spec.net = Net::Pxe { bootfile: format!("http://10.0.2.2:{port}/boot.ipxe"), tftp: None, disk_first: false };
    spec.mac = Some(mac.into());
    Vm::start(&spec, log)
}

/// An aarch64 VM whose firmware PXE-boots `ipxe.efi` from `tftp`.
fn pxe_vm_aarch64(disk: &Path, tftp: &Path, mac: &str, log: &Path) -> Result<Vm> {
    let mut spec = VmSpec::new(Arch::Aarch64);
    spec.disks = vec![Disk { path: disk.to_path_buf(), snapshot: false }];
    // Disk first: AAVMF falls through a blank disk to PXE, but after iPXE `exit`s it opens its
    // setup menu (UiApp) instead of trying the disk, so the installed disk must come first.
    spec.net = Net::Pxe { bootfile: kiln::netboot::IPXE.into(), tftp: Some(tftp.to_path_buf()), disk_first: true };
    spec.mac = Some(mac.into());
    Vm::start(&spec, log)
}

fn blank(path: &Path, size: u64) -> Result<PathBuf> {
    std::fs::File::create(path)?.set_len(size)?;
    Ok(path.to_path_buf())
}

/// The build of one architecture with `--format disk,netboot`, once per cell.
fn build(cell: &'static OnceLock<Result<PathBuf, String>>, arch: Arch) -> Result<&'static Path> {
    let r = cell.get_or_init(|| {
        let run = || -> Result<PathBuf> {
            let out = work_dir(&format!("pxe-build-{arch}"))?;
            let started = Instant::now();
            let (code, log) = kiln_with_cache(
                &cache_dir()?,
                &["build", PROFILE, "--arch", arch.name(), "--format", "disk,netboot", "--out", out.to_str().context("non-UTF-8 dir")?],
            )?;
            ensure!(code == 0, "kiln build --format disk,netboot failed (exit {code}):\n{log}");
            eprintln!("{PROFILE} {arch} build (disk + netboot): {:.1} s", started.elapsed().as_secs_f64());
            Ok(out)
        };
        run().map_err(|e| format!("{e:#}"))
    });
    match r {
        Ok(p) => Ok(p.as_path()),
        Err(e) => bail!("{e}"),
    }
}

fn built() -> Result<&'static Path> {
    static OUT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    build(&OUT, Arch::X86_64)
}

#[test]
fn x86_64_pxe_installs_reports_and_then_boots_from_disk() -> Result<()> {
    let arch = Arch::X86_64;
    let work = work_dir("pxe-x86_64")?;
    let out = built()?.to_path_buf();
    // This test's own state file: the build directory is shared with the other test.
    let _ = std::fs::remove_file(out.join("serve-state.json"));
    let m = manifest(&out, arch)?;
    let netboot = out.join("x86_64/netboot");
    for f in kiln::netboot::FILES {
        ensure!(netboot.join(f).is_file(), "no {f} in {}", netboot.display());
        ensure!(m.outputs.iter().any(|o| o.file == format!("netboot/{f}")), "manifest lists no netboot/{f}");
    }

    // The served root holds no secret: /etc/shadow stays in the disk image's root only.
    let served_root = squashfs_listing(&netboot.join(kiln::netboot::ROOT))?;
    ensure!(served_root.contains("/etc/passwd") && !served_root.contains("/etc/shadow"), "the netboot root.img lists /etc/shadow");
    let disk_root = work.join("disk-root.squashfs");
    // The disk image is the USB installer medium: the partition holding what it installs as kiln-root-a.
    let usb_root =
        m.install.as_ref().and_then(|i| i.partitions.iter().find(|p| p.name == "kiln-root-a")).context("no USB install record")?;
    let root_a = m.partitions.iter().find(|p| p.content_sha256 == usb_root.content_sha256).context("no root squashfs on the medium")?;
    copy_range(&out.join("x86_64/disk.img"), root_a.offset, root_a.content_size.context("kiln-root-a without content")?, &disk_root)?;
    ensure!(squashfs_listing(&disk_root)?.contains("/etc/shadow"), "the disk image's root lost /etc/shadow");

    let port = free_port()?;
    let mut serve = Serve::start(&out, port)?;
    let disk = blank(&work.join("target.img"), 4 << 30)?;

    // First start: network install, report, reboot, network boot sent to the disk, ready.
    let console = work.join("console-1.log");
    let mut vm = pxe_vm(&disk, port, MAC, &console)?;
    vm.wait_for("kiln: installing", INSTALL_TIMEOUT)?;
    let net = vm.wait_for("[kiln] install: network", INSTALL_TIMEOUT)?;
    ensure!(net.contains(MAC), "the installer does not know the machine by iPXE's MAC: {net}");
    vm.wait_for("arrived intact", INSTALL_TIMEOUT)?;
    let done = vm.wait_for("[kiln] install: done", INSTALL_TIMEOUT)?;
    let t_done = vm.elapsed();
    vm.wait_for(&format!("[kiln] install: reported to http://10.0.2.2:{port}"), Duration::from_secs(60))?;
    vm.wait_for("is installed; booting from the local disk", BOOT_TIMEOUT)?;
    vm.wait_for("[kiln] ready", DISK_AFTER_NETWORK_TIMEOUT)?;
    // Not in the inventory: no kiln.node= for the installer, the default identity after it.
    let derived = format!("rack-{}", MAC.replace(':', ""));
    ensure!(
        vm.console().contains(&format!("[kiln] identity: node={derived} roles=none by=default")),
        "no default identity {derived} on the console"
    );
    ensure!(!vm.console().contains("kiln.node="), "a machine outside the inventory was given kiln.node=");
    ensure!(!vm.console().contains("secret files of node"), "a machine outside the inventory was given secrets");
    eprintln!("{arch}: `{done}` at {:.1} s, ready from disk at {:.1} s", t_done.as_secs_f64(), vm.elapsed().as_secs_f64());
    vm.kill();
    drop(vm);

    // The server recorded the install; the disk holds what the manifest says.
    let state: kiln::serve::state::State = serde_json::from_str(&std::fs::read_to_string(out.join("serve-state.json"))?)?;
    let rec = state.installed.get(MAC).with_context(|| format!("serve-state.json has no {MAC}: {state:?}"))?;
    ensure!(rec.arch.as_deref() == Some("x86_64"), "{rec:?}");
    let install = m.netboot_install.as_ref().context("manifest without `netboot_install`")?;
    let table = tool(Command::new("sgdisk").arg("-p").arg(&disk), "gdisk")?;
    ensure!(table.to_lowercase().contains(&format!("disk identifier (guid): {}", install.disk_guid)), "{table}");
    for p in &install.partitions {
        if let (Some(sha), Some(len)) = (&p.content_sha256, p.content_size) {
            ensure!(&sha256_range(&disk, p.offset, len)? == sha, "{} on the target is not the manifest's", p.name);
        }
    }
    let (_, _, name) = sgdisk_partition(&table, 4).context("no data partition")?;
    ensure!(name == "kiln-data", "{table}");

    // Second start: straight to the disk, no installer.
    let console = work.join("console-2.log");
    let mut vm = pxe_vm(&disk, port, MAC, &console)?;
    vm.wait_for("is installed; booting from the local disk", BOOT_TIMEOUT)?;
    vm.wait_for("[kiln] ready", DISK_AFTER_NETWORK_TIMEOUT)?;
    ensure!(!vm.console().contains("[kiln] install:"), "the second start ran the installer");
    eprintln!("{arch}: second start ready from disk at {:.1} s", vm.elapsed().as_secs_f64());
    vm.kill();

    let lines = serve.lines();
    ensure!(
        lines.iter().any(|l| l.contains("GET /x86_64/netboot/root.img") && l.contains(" 200 ")),
        "no root.img download logged:\n{}",
        lines.join("\n")
    );
    ensure!(
        lines.iter().any(|l| l.contains("POST /installed") && l.contains(MAC) && l.contains(" 200 ")),
        "no accepted install report logged"
    );
    ensure!(!lines.iter().any(|l| l.contains("/secrets") && l.contains(" 200 ")), "secrets were served to a machine outside the inventory");
    let status = serve.interrupt()?;
    ensure!(status.success(), "kiln serve exited {status} on SIGINT");
    Ok(())
}

/// A copy of the build's x86_64 netboot directory whose `root.img` has one byte changed.
fn tampered_copy(out: &Path, dest: &Path) -> Result<()> {
    let from = out.join("x86_64/netboot");
    let to = dest.join("x86_64/netboot");
    std::fs::create_dir_all(&to)?;
    for f in kiln::netboot::FILES {
        std::fs::copy(from.join(f), to.join(f)).with_context(|| format!("copying {f}"))?;
    }
    let root = to.join(kiln::netboot::ROOT);
    let mut bytes = std::fs::read(&root)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&root, bytes)?;
    Ok(())
}

#[test]
fn x86_64_pxe_refuses_a_tampered_image_before_the_data_partition() -> Result<()> {
    let work = work_dir("pxe-x86_64-tampered")?;
    let served = work.join("served");
    tampered_copy(built()?, &served)?;
    let port = free_port()?;
    let serve = Serve::start(&served, port)?;
    let disk = blank(&work.join("target.img"), 4 << 30)?;
    let mut vm = pxe_vm(&disk, port, "52:54:00:4b:00:02", &work.join("console.log"))?;
    vm.wait_for("[kiln] install: esp arrived intact", INSTALL_TIMEOUT)?;
    let refused = vm.wait_for("arrived with sha256", INSTALL_TIMEOUT)?;
    ensure!(refused.contains("[kiln] error: install: kiln-root-a"), "{refused}");
    eprintln!("tampered root.img refused after {:.1} s: {refused}", vm.elapsed().as_secs_f64());
    vm.kill();
    drop(vm);
    let table = tool(Command::new("sgdisk").arg("-p").arg(&disk), "gdisk")?;
    // The table is written only after every range verified: the refused install left none.
    ensure!(sgdisk_partition(&table, 1).is_none(), "a partition table was written despite the bad digest:\n{table}");
    ensure!(!served.join("serve-state.json").exists(), "the refused install was reported as installed");
    ensure!(!serve.lines().iter().any(|l| l.contains("POST /installed")), "the refused install was reported");
    Ok(())
}

#[test]
fn aarch64_pxe_through_firmware_tftp_and_ipxe_installs_and_boots_from_disk() -> Result<()> {
    static OUT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let out = build(&OUT, Arch::Aarch64)?;
    let work = work_dir("pxe-aarch64")?;
    let port = free_port()?;
    let mut serve = Serve::start(out, port)?;
    // QEMU's TFTP directory: the build's arm64 iPXE, and the script iPXE looks for next to it.
    let tftp = work.join("tftp");
    std::fs::create_dir_all(&tftp)?;
    std::fs::copy(out.join("aarch64/netboot").join(kiln::netboot::IPXE), tftp.join(kiln::netboot::IPXE))?;
    std::fs::write(tftp.join("autoexec.ipxe"), format!("#!ipxe\ndhcp\nchain http://10.0.2.2:{port}/boot.ipxe\n"))?;
    let disk = blank(&work.join("target.img"), 4 << 30)?;
    let mac = "52:54:00:4b:00:03";

    let mut vm = pxe_vm_aarch64(&disk, &tftp, mac, &work.join("console-1.log"))?;
    vm.wait_for("kiln: installing", INSTALL_TIMEOUT)?;
    vm.wait_for("arrived intact", INSTALL_TIMEOUT)?;
    let done = vm.wait_for("[kiln] install: done", INSTALL_TIMEOUT)?;
    let t_done = vm.elapsed();
    vm.wait_for(&format!("[kiln] install: reported to http://10.0.2.2:{port}"), Duration::from_secs(60))?;
    let ready = vm.wait_for("[kiln] ready", BOOT_TIMEOUT)?;
    ensure!(ready.contains("arch=aarch64"), "{ready}");
    // The inventory node: named to the installer by the server, found again by MAC once installed,
    // and running that node's role.
    let console = vm.console();
    ensure!(
        console
            .contains(&format!("[kiln] install: this machine is inventory node rack-a1 (kiln.node= from the server, chosen by MAC {mac})")),
        "the installer was not told its node"
    );
    ensure!(console.contains("secret files of node rack-a1 delivered into the data partition"), "rack-a1's secrets were not delivered");
    ensure!(console.contains("[kiln] identity: node=rack-a1 roles=etcd by=mac"), "the installed system did not find itself as rack-a1");
    ensure!(console.contains("[kiln] etcd: starting member rack-a1"), "rack-a1's etcd member did not start");
    eprintln!("aarch64: `{done}` at {:.1} s, ready from disk at {:.1} s", t_done.as_secs_f64(), vm.elapsed().as_secs_f64());
    vm.kill();
    let state: kiln::serve::state::State = serde_json::from_str(&std::fs::read_to_string(out.join("serve-state.json"))?)?;
    let rec = state.installed.get(mac).with_context(|| format!("serve-state.json has no {mac}"))?;
    ensure!(rec.arch.as_deref() == Some("aarch64") && rec.node.as_deref() == Some("rack-a1"), "{rec:?}");
    let lines = serve.lines();
    let delivered = lines.iter().filter(|l| l.contains("delivered the secrets of node rack-a1 to 52:54:00:4b:00:03")).count();
    ensure!(delivered == 1, "the secrets of rack-a1 were delivered {delivered} times:\n{}", lines.join("\n"));
    let status = serve.interrupt()?;
    ensure!(status.success(), "kiln serve exited {status} on SIGINT");
    Ok(())
}

/// `unsquashfs -l` of a squashfs image: one path per line.
fn squashfs_listing(image: &Path) -> Result<String> {
    tool(Command::new("unsquashfs").arg("-l").arg(image), "squashfs-tools")
}

/// Copies `len` bytes at `offset` of `from` into the new file `to`.
fn copy_range(from: &Path, offset: u64, len: u64, to: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(from).with_context(|| format!("opening {}", from.display()))?;
    f.seek(SeekFrom::Start(offset))?;
    std::io::copy(&mut f.take(len), &mut std::fs::File::create(to)?)?;
    Ok(())
}
