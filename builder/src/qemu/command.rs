//! The VM description ([`VmSpec`]) and the QEMU command line it turns into: machine, firmware,
//! disks, USB controller, NIC, console and monitor, one helper each, every flag commented where it
//! is added. Also `kiln run`: QEMU with the console on the user's terminal.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};

use anyhow::{bail, Context};

use super::firmware::{find_firmware, Firmware};
use crate::arch::Arch;

/// A raw disk image attached as virtio-blk.
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    /// Writes go to a temporary overlay; the file is untouched.
    pub snapshot: bool,
}

/// A `kiln run --disk` argument: `FILE` (must exist) or `FILE:SIZE` (created blank and sparse
/// when missing; an existing FILE is attached as it is). Returns the file to attach.
pub fn extra_disk(arg: &str) -> anyhow::Result<PathBuf> {
    let (file, size) = match arg.rsplit_once(':') {
        Some((f, s)) if !f.is_empty() && s.chars().next().is_some_and(|c| c.is_ascii_digit()) => (f, Some(s)),
        _ => (arg, None),
    };
    let path = PathBuf::from(file);
    if path.exists() {
        return Ok(path);
    }
    let Some(size) = size else {
        return Err(crate::error::UsageError(format!(
            "--disk {arg}: {file} does not exist; give a size (`{file}:8GiB`) to create a blank disk"
        ))
        .into());
    };
    let bytes: crate::size::Size = size.parse().map_err(|e| crate::error::UsageError(format!("--disk {arg}: {e}")))?;
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating blank disk {}", path.display()))?;
    f.set_len(bytes.0).with_context(|| format!("sizing blank disk {}", path.display()))?;
    Ok(path)
}

/// The VM's network.
#[derive(Debug, Clone)]
pub enum Net {
    /// No NIC at all (also keeps OVMF from trying PXE).
    None,
    /// QEMU user networking (`-netdev user`) with a virtio NIC; `hostfwd` entries are QEMU's
    /// `hostfwd=` values, e.g. `tcp:127.0.0.1:2222-:22`.
    User { hostfwd: Vec<String> },
    /// A virtio NIC on tap device `ifname` inside network namespace `netns` (QEMU itself runs
    /// there, under `ip netns exec`): several VMs on one private LAN (see the multi-node tests).
    Tap { netns: String, ifname: String },
    /// QEMU user networking with a virtio NIC that the firmware boots first (the disks come
    /// after it): QEMU's DHCP hands out `bootfile`, e.g. `http://10.0.2.2:PORT/boot.ipxe` for the
    /// NIC's iPXE option ROM (x86_64), or a file of `tftp` (QEMU's TFTP server) for the
    /// firmware's own PXE (aarch64: `ipxe.efi`); the NIC's MAC is `VmSpec::mac`.
    /// `disk_first` puts the boot disk before the NIC: a blank disk falls through to the network,
    /// an installed one boots (AAVMF does not fall back to the disk after iPXE `exit`s).
    Pxe { bootfile: String, tftp: Option<PathBuf>, disk_first: bool },
}

/// Everything about one VM run.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub arch: Arch,
    /// virtio-blk-pci, in order; bootindex given to `disks[boot_disk]`.
    pub disks: Vec<Disk>,
    pub boot_disk: usize,
    pub memory_mib: u32,
    pub cpus: u32,
    pub net: Net,
    /// The NIC's MAC address (`52:54:00:..`); QEMU's default when absent.
    pub mac: Option<String>,
    /// `--firmware-dir`; see [`find_firmware`].
    pub firmware_dir: Option<PathBuf>,
    /// Exit QEMU instead of rebooting the guest (a guest reboot then shows as "QEMU exited").
    pub no_reboot: bool,
    /// An xHCI USB controller (`qemu-xhci`, id `xhci`, bus `xhci.0`) for USB devices added
    /// while the VM runs (through `monitor`).
    pub usb: bool,
    /// A QEMU monitor (HMP) on this Unix socket, opted into by a test that changes the running
    /// VM (hot-plug, [`Vm::monitor`](super::Vm::monitor)). Never on stdio: an automated run's
    /// console input cannot reach it.
    pub monitor: Option<PathBuf>,
    /// Appended verbatim after kiln's flags.
    pub extra_args: Vec<String>,
}

impl VmSpec {
    /// A VM with no disks, no network, 1024 MiB and 1 CPU. One vCPU: under TCG every vCPU is a
    /// host thread, and kiln's hosts (and its VM tests, several VMs at once on 2 cores) are
    /// often oversubscribed; an x86_64 guest with 2 starved vCPUs was seen to hang in early
    /// boot with RCU stalls (a timer on the second vCPU never firing). A 1-vCPU guest cannot
    /// stall that way, and kiln's boot is sequential anyway.
    pub fn new(arch: Arch) -> VmSpec {
        VmSpec {
            arch,
            disks: Vec::new(),
            boot_disk: 0,
            memory_mib: 1024,
            cpus: 1,
            net: Net::None,
            mac: None,
            firmware_dir: None,
            no_reboot: false,
            usb: false,
            monitor: None,
            extra_args: Vec::new(),
        }
    }
}

/// Where the serial console goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConsoleMode {
    /// Serial on stdio, no monitor there: a program reads it and nothing it writes can reach a QEMU
    /// monitor (a test may still open one on a socket, `VmSpec::monitor`).
    Captured,
    /// `-nographic`: serial and monitor multiplexed on the user's terminal (Ctrl-A x quits).
    Interactive,
}

/// Builds the qemu command line (always `-accel tcg`; each flag commented where it is added). The writable UEFI
/// variable store is copied into `workdir` (pflash unit 1). Serial console on stdio, no graphics, no monitor
/// on stdio (so an automated run cannot type into the monitor); a monitor on a Unix socket only when the
/// spec asks for one.
pub fn command(spec: &VmSpec, workdir: &Path) -> anyhow::Result<Command> {
    build_command(spec, workdir, ConsoleMode::Captured)
}

fn build_command(spec: &VmSpec, workdir: &Path, console: ConsoleMode) -> anyhow::Result<Command> {
    let firmware = find_firmware(spec.arch, spec.firmware_dir.as_deref())?;
    let mut cmd = qemu_program(spec);
    machine_args(&mut cmd, spec);
    firmware_args(&mut cmd, &firmware, workdir)?;
    disk_args(&mut cmd, spec)?;
    if spec.usb {
        // xHCI serves USB 1 to 3 devices; its id names the bus (`xhci.0`) devices are added to.
        cmd.args(["-device", "qemu-xhci,id=xhci"]);
    }
    net_args(&mut cmd, spec)?;
    // A hardware random number generator, as real machines have (RDRAND, the firmware's RNG).
    // Without one the guest's random pool starts empty under TCG, and every read of
    // /dev/urandom before it fills (sgdisk's and mke2fs's UUIDs on first boot, dropbear's host
    // keys) waits for the kernel's jitter entropy: 7-9 s of a first boot (docs/benchmarks.md,
    // Boot time). OVMF and AAVMF hand it to the kernel as the EFI RNG protocol, so the pool is
    // seeded before the kernel starts. Last, so the disks and NICs keep their PCI slots.
    cmd.args(["-device", "virtio-rng-pci"]);
    console_args(&mut cmd, console, spec.monitor.as_deref())?;
    if spec.no_reboot {
        // A guest reboot ends QEMU, so a boot loop shows up as an exit instead of a timeout.
        cmd.arg("-no-reboot");
    }
    cmd.args(&spec.extra_args);
    Ok(cmd)
}

/// The arch's QEMU binary, started inside the spec's network namespace for a tap NIC.
fn qemu_program(spec: &VmSpec) -> Command {
    let machine = spec.arch.qemu();
    match &spec.net {
        // QEMU must run inside the namespace to open the tap device there.
        Net::Tap { netns, .. } => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", netns, machine.binary]);
            c
        }
        _ => Command::new(machine.binary),
    }
}

/// Accelerator, machine, CPU, memory and vCPUs.
fn machine_args(cmd: &mut Command, spec: &VmSpec) {
    let machine = spec.arch.qemu();
    // Software emulation only: KVM is unavailable on kiln's build/test hosts, and TCG is the same everywhere.
    cmd.args(["-accel", "tcg"]);
    // The arch's generic machine (q35 / virt), from the Arch table.
    cmd.args(["-machine", machine.machine]);
    if let Some(cpu) = machine.cpu {
        // A real core the Debian kernel supports (the machine's default CPU may not be).
        cmd.args(["-cpu", cpu]);
    }
    cmd.args(["-m", &spec.memory_mib.to_string()]);
    cmd.args(["-smp", &spec.cpus.to_string()]);
}

/// The firmware: two pflash units for UEFI (the variable store copied into `workdir`), or OpenSBI plus U-Boot.
fn firmware_args(cmd: &mut Command, firmware: &Firmware, workdir: &Path) -> anyhow::Result<()> {
    match firmware {
        Firmware::Pflash { code, vars_template } => {
            let vars = copy_vars(vars_template, workdir)?;
            // Unit 0: the firmware code, read-only so no run can alter the shared system file.
            cmd.args(["-drive", &format!("if=pflash,format=raw,unit=0,readonly=on,file={}", qemu_path(code)?)]);
            // Unit 1: this VM's own writable variable store (boot entries the firmware records).
            cmd.args(["-drive", &format!("if=pflash,format=raw,unit=1,file={}", qemu_path(&vars)?)]);
        }
        Firmware::OpenSbiUboot { opensbi, uboot } => {
            // OpenSBI is the M-mode firmware; it jumps to the payload given as -kernel.
            cmd.arg("-bios").arg(opensbi);
            // U-Boot (S-mode build) as that payload: it boots extlinux.conf or \EFI\BOOT\BOOTRISCV64.EFI.
            cmd.arg("-kernel").arg(uboot);
        }
    }
    Ok(())
}

/// The disks as virtio-blk, the boot disk first.
fn disk_args(cmd: &mut Command, spec: &VmSpec) -> anyhow::Result<()> {
    if !spec.disks.is_empty() && spec.boot_disk >= spec.disks.len() {
        bail!("boot disk index {} is out of range: the VM has {} disk(s)", spec.boot_disk, spec.disks.len());
    }
    // The boot disk goes first on the bus: U-Boot (riscv64) ignores bootindex and boots the
    // first disk it scans; UEFI gets bootindex as well.
    let order = std::iter::once(spec.boot_disk).chain((0..spec.disks.len()).filter(|&i| i != spec.boot_disk));
    for i in order.filter(|&i| i < spec.disks.len()) {
        let disk = &spec.disks[i];
        let snapshot = if disk.snapshot { ",snapshot=on" } else { "" };
        // Raw images only: kiln writes raw disks, and naming the format stops QEMU probing it.
        cmd.args(["-drive", &format!("if=none,id=d{i},format=raw,file={}{snapshot}", qemu_path(&disk.path)?)]);
        // virtio-blk on PCI: the one disk bus every arch's machine and firmware here supports.
        // bootindex makes UEFI try this disk first (U-Boot scans devices in order and ignores it).
        // With a PXE NIC, the NIC is boot option 0 and the boot disk comes next.
        let pxe = matches!(spec.net, Net::Pxe { disk_first: false, .. });
        let bootindex = match (i == spec.boot_disk, pxe) {
            (true, false) => ",bootindex=0",
            (true, true) => ",bootindex=1",
            (false, _) => "",
        };
        cmd.args(["-device", &format!("virtio-blk-pci,drive=d{i}{bootindex}")]);
    }
    Ok(())
}

/// The network: none, user-mode (with forwarded ports or a PXE boot file), or a tap device.
fn net_args(cmd: &mut Command, spec: &VmSpec) -> anyhow::Result<()> {
    match &spec.net {
        // No NIC: otherwise q35 adds an e1000e whose PXE ROM OVMF tries before giving up.
        Net::None => {
            cmd.args(["-nic", "none"]);
        }
        Net::User { hostfwd } => {
            let mut netdev = String::from("user,id=n0");
            for fwd in hostfwd {
                if fwd.contains(',') {
                    bail!("hostfwd `{fwd}` must not contain a comma (QEMU would read it as another option)");
                }
                netdev.push_str(",hostfwd=");
                netdev.push_str(fwd);
            }
            // User-mode networking: no privileges, only the host (10.0.2.2) and forwarded ports.
            cmd.args(["-netdev", &netdev]);
            cmd.args(["-device", &nic_device(spec)?]);
        }
        Net::Tap { ifname, .. } => {
            if ifname.contains(',') {
                bail!("tap device name `{ifname}` must not contain a comma");
            }
            // An existing tap (made by the caller); no helper scripts run as root.
            cmd.args(["-netdev", &format!("tap,id=n0,ifname={ifname},script=no,downscript=no")]);
            cmd.args(["-device", &nic_device(spec)?]);
        }
        Net::Pxe { bootfile, tftp, disk_first } => {
            if bootfile.contains(',') {
                bail!("PXE bootfile `{bootfile}` must not contain a comma (QEMU would read it as another option)");
            }
            let tftp = match tftp {
                Some(dir) => format!(",tftp={}", qemu_path(dir)?),
                None => String::new(),
            };
            // User-mode networking whose DHCP server names the boot file (and serves `tftp` over TFTP).
            cmd.args(["-netdev", &format!("user,id=n0,bootfile={bootfile}{tftp}")]);
            // The NIC first in the boot order (its iPXE ROM runs the boot file), or right after the disk.
            let bootindex = if *disk_first { 1 } else { 0 };
            cmd.args(["-device", &format!("{},bootindex={bootindex}", nic_device(spec)?)]);
        }
    }
    Ok(())
}

/// Where the serial console goes: captured on stdio with no monitor there, or the user's terminal.
/// `monitor`: a monitor on that Unix socket as well.
fn console_args(cmd: &mut Command, console: ConsoleMode, monitor: Option<&Path>) -> anyhow::Result<()> {
    match console {
        ConsoleMode::Captured => {
            // No window: the serial console is the only output.
            cmd.args(["-display", "none"]);
            // The guest's first serial port on QEMU's stdin/stdout (pipes, read by `Vm`).
            cmd.args(["-serial", "stdio"]);
            if monitor.is_none() {
                // No monitor at all, so nothing written to stdin can reach it.
                cmd.args(["-monitor", "none"]);
            }
        }
        ConsoleMode::Interactive => {
            // Serial (and monitor, behind Ctrl-A c) on the user's terminal; Ctrl-A x quits.
            cmd.arg("-nographic");
        }
    }
    if let Some(path) = monitor {
        // The monitor on a socket only the caller connects to (`Vm::monitor`), not on stdio;
        // QEMU listens (server=on) and does not wait for a client before starting the guest.
        cmd.args(["-monitor", &format!("unix:{},server=on,wait=off", qemu_path(path)?)]);
    }
    Ok(())
}

/// The virtio NIC on netdev `n0`, with the spec's MAC if it has one.
fn nic_device(spec: &VmSpec) -> anyhow::Result<String> {
    match &spec.mac {
        Some(mac) if mac.len() != 17 || !mac.split(':').all(|b| b.len() == 2 && b.bytes().all(|c| c.is_ascii_hexdigit())) => {
            bail!("MAC `{mac}` is not of the form 52:54:00:12:34:56")
        }
        Some(mac) => Ok(format!("virtio-net-pci,netdev=n0,mac={mac}")),
        None => Ok("virtio-net-pci,netdev=n0".into()),
    }
}

/// Copies the UEFI variable store template into `workdir`: each VM gets its own writable store.
fn copy_vars(template: &Path, workdir: &Path) -> anyhow::Result<PathBuf> {
    let name = template.file_name().context("UEFI variable store path has no file name")?;
    let dest = workdir.join(name);
    fs::copy(template, &dest).with_context(|| format!("copying UEFI variable store {} to {}", template.display(), dest.display()))?;
    // Debian's templates are read-only (0644 as root, but a copy of a 0444 file stays 0444): QEMU must write it.
    let mut perms = fs::metadata(&dest).with_context(|| format!("reading {}", dest.display()))?.permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    fs::set_permissions(&dest, perms).with_context(|| format!("making {} writable", dest.display()))?;
    Ok(dest)
}

/// A path inside a QEMU `-drive` option string: UTF-8, with commas doubled (QEMU's escape).
pub(super) fn qemu_path(path: &Path) -> anyhow::Result<String> {
    let s = path.to_str().with_context(|| format!("path {} is not UTF-8; QEMU options need text", path.display()))?;
    Ok(s.replace(',', ",,"))
}

/// Spawns `cmd`, turning "binary not found" into a message naming the package to install.
pub(super) fn spawn(mut cmd: Command, arch: Arch) -> anyhow::Result<Child> {
    let machine = arch.qemu();
    cmd.spawn().map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            anyhow::anyhow!("{} not found: install the Debian package `{}`", machine.binary, machine.qemu_package)
        } else {
            anyhow::Error::new(e).context(format!("starting {}", machine.binary))
        }
    })
}

/// `kiln run`: QEMU with the serial console on the user's terminal (inherit stdio, `-nographic`), returns
/// QEMU's exit status.
pub fn run_interactive(spec: &VmSpec) -> anyhow::Result<ExitStatus> {
    let workdir = tempfile::Builder::new().prefix("kiln-run-").tempdir().context("creating a temporary directory")?;
    let cmd = build_command(spec, workdir.path(), ConsoleMode::Interactive)?;
    tracing::debug!(?cmd, "starting QEMU");
    let mut child = spawn(cmd, spec.arch)?;
    child.wait().with_context(|| format!("waiting for {}", spec.arch.qemu().binary))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A firmware directory laid out flat, with tiny stand-in files (the command line never reads them).
    fn fake_firmware_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for name in ["OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd", "AAVMF_CODE.fd", "AAVMF_VARS.fd", "fw_dynamic.bin", "u-boot.bin"] {
            fs::write(dir.path().join(name), name.as_bytes()).unwrap();
        }
        dir
    }

    fn args_of(cmd: &Command) -> Vec<String> {
        cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    /// True if `flag value` appears as consecutive arguments.
    fn has(args: &[String], flag: &str, value: &str) -> bool {
        args.windows(2).any(|w| w[0] == flag && w[1] == value)
    }

    fn spec_with(arch: Arch, fw: &Path) -> VmSpec {
        VmSpec { firmware_dir: Some(fw.to_path_buf()), ..VmSpec::new(arch) }
    }

    #[test]
    fn x86_64_uses_q35_ovmf_and_a_private_vars_copy() {
        let fw = fake_firmware_dir();
        let work = tempfile::tempdir().unwrap();
        let cmd = command(&spec_with(Arch::X86_64, fw.path()), work.path()).unwrap();
        let args = args_of(&cmd);
        assert_eq!(cmd.get_program(), "qemu-system-x86_64");
        assert!(has(&args, "-accel", "tcg"), "{args:?}");
        assert!(has(&args, "-machine", "q35"), "{args:?}");
        assert!(!args.contains(&"-cpu".to_string()), "{args:?}");
        assert!(has(&args, "-device", "virtio-rng-pci"), "{args:?}");
        assert!(has(&args, "-m", "1024") && has(&args, "-smp", "1"), "{args:?}");
        let code = fw.path().join("OVMF_CODE_4M.fd");
        let vars = work.path().join("OVMF_VARS_4M.fd");
        assert!(has(&args, "-drive", &format!("if=pflash,format=raw,unit=0,readonly=on,file={}", code.display())), "{args:?}");
        assert!(has(&args, "-drive", &format!("if=pflash,format=raw,unit=1,file={}", vars.display())), "{args:?}");
        assert_eq!(fs::read(&vars).unwrap(), b"OVMF_VARS_4M.fd", "vars copy made in the work dir");
        assert!(!fs::metadata(&vars).unwrap().permissions().readonly());
        assert!(has(&args, "-nic", "none") && has(&args, "-serial", "stdio"), "{args:?}");
        assert!(has(&args, "-monitor", "none") && has(&args, "-display", "none"), "{args:?}");
        assert!(!args.contains(&"-nographic".to_string()), "the monitor must not be on stdio: {args:?}");
        assert!(!args.iter().any(|a| a.contains("xhci")), "no USB controller unless asked: {args:?}");
    }

    /// A test that hot-plugs gets a monitor on a socket (never on stdio) and a USB controller.
    #[test]
    fn an_opted_in_monitor_is_on_a_unix_socket_and_usb_adds_an_xhci_controller() {
        let fw = fake_firmware_dir();
        let work = tempfile::tempdir().unwrap();
        let spec = VmSpec { usb: true, monitor: Some("/run/t/mon,1.sock".into()), ..spec_with(Arch::X86_64, fw.path()) };
        let args = args_of(&command(&spec, work.path()).unwrap());
        assert!(has(&args, "-monitor", "unix:/run/t/mon,,1.sock,server=on,wait=off"), "{args:?}");
        assert_eq!(args.iter().filter(|a| *a == "-monitor").count(), 1, "{args:?}");
        assert!(has(&args, "-serial", "stdio") && !args.contains(&"-nographic".to_string()), "{args:?}");
        assert!(has(&args, "-device", "qemu-xhci,id=xhci"), "{args:?}");
    }

    #[test]
    fn aarch64_uses_virt_cortex_a72_and_aavmf() {
        let fw = fake_firmware_dir();
        let work = tempfile::tempdir().unwrap();
        let cmd = command(&spec_with(Arch::Aarch64, fw.path()), work.path()).unwrap();
        let args = args_of(&cmd);
        assert_eq!(cmd.get_program(), "qemu-system-aarch64");
        assert!(has(&args, "-accel", "tcg") && has(&args, "-machine", "virt") && has(&args, "-cpu", "cortex-a72"), "{args:?}");
        let code = fw.path().join("AAVMF_CODE.fd");
        assert!(has(&args, "-drive", &format!("if=pflash,format=raw,unit=0,readonly=on,file={}", code.display())), "{args:?}");
        assert!(work.path().join("AAVMF_VARS.fd").is_file(), "vars copy made");
    }

    #[test]
    fn riscv64_uses_opensbi_bios_and_uboot_kernel() {
        let fw = fake_firmware_dir();
        let work = tempfile::tempdir().unwrap();
        let cmd = command(&spec_with(Arch::Riscv64, fw.path()), work.path()).unwrap();
        let args = args_of(&cmd);
        assert_eq!(cmd.get_program(), "qemu-system-riscv64");
        assert!(has(&args, "-accel", "tcg") && has(&args, "-machine", "virt"), "{args:?}");
        assert!(has(&args, "-bios", &fw.path().join("fw_dynamic.bin").to_string_lossy()), "{args:?}");
        assert!(has(&args, "-kernel", &fw.path().join("u-boot.bin").to_string_lossy()), "{args:?}");
        assert!(!args.iter().any(|a| a.contains("pflash")), "{args:?}");
        assert_eq!(fs::read_dir(work.path()).unwrap().count(), 0, "no vars store for U-Boot");
    }

    #[test]
    fn disks_net_and_bootindex() {
        let fw = fake_firmware_dir();
        let work = tempfile::tempdir().unwrap();
        let spec = VmSpec {
            disks: vec![Disk { path: "/img/a,b.img".into(), snapshot: false }, Disk { path: "/img/boot.img".into(), snapshot: true }],
            boot_disk: 1,
            memory_mib: 2048,
            net: Net::User { hostfwd: vec!["tcp:127.0.0.1:2222-:22".into()] },
            no_reboot: true,
            extra_args: vec!["-s".into()],
            ..spec_with(Arch::X86_64, fw.path())
        };
        let args = args_of(&command(&spec, work.path()).unwrap());
        assert!(has(&args, "-drive", "if=none,id=d0,format=raw,file=/img/a,,b.img"), "{args:?}");
        assert!(has(&args, "-device", "virtio-blk-pci,drive=d0"), "{args:?}");
        assert!(has(&args, "-drive", "if=none,id=d1,format=raw,file=/img/boot.img,snapshot=on"), "{args:?}");
        assert!(has(&args, "-device", "virtio-blk-pci,drive=d1,bootindex=0"), "{args:?}");
        // The boot disk comes first on the bus (U-Boot boots the first disk it finds).
        let d1 = args.iter().position(|a| a == "virtio-blk-pci,drive=d1,bootindex=0").unwrap();
        let d0 = args.iter().position(|a| a == "virtio-blk-pci,drive=d0").unwrap();
        assert!(d1 < d0, "{args:?}");
        assert!(has(&args, "-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22"), "{args:?}");
        assert!(has(&args, "-device", "virtio-net-pci,netdev=n0") && has(&args, "-m", "2048"), "{args:?}");
        assert!(args.contains(&"-no-reboot".to_string()) && args.last().unwrap() == "-s", "{args:?}");

        let bad = VmSpec { boot_disk: 2, ..spec.clone() };
        let err = command(&bad, work.path()).unwrap_err().to_string();
        assert!(err.contains("boot disk index 2"), "{err}");
        let bad = VmSpec { net: Net::User { hostfwd: vec!["tcp::1-:2,smb=/".into()] }, ..spec.clone() };
        assert!(command(&bad, work.path()).is_err());

        // A VM on a test LAN: QEMU runs inside the namespace, its NIC on the tap with the given MAC.
        let tap = VmSpec {
            net: Net::Tap { netns: "kiln-t".into(), ifname: "tap1".into() },
            mac: Some("52:54:00:e7:00:01".into()),
            ..spec.clone()
        };
        let cmd = command(&tap, work.path()).unwrap();
        assert_eq!(cmd.get_program(), "ip");
        let args = args_of(&cmd);
        assert_eq!(args[..4], ["netns", "exec", "kiln-t", "qemu-system-x86_64"], "{args:?}");
        assert!(has(&args, "-netdev", "tap,id=n0,ifname=tap1,script=no,downscript=no"), "{args:?}");
        assert!(has(&args, "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:e7:00:01"), "{args:?}");
        let bad = VmSpec { mac: Some("52:54:00:e7:00".into()), ..tap };
        assert!(command(&bad, work.path()).unwrap_err().to_string().contains("52:54:00:e7:00"));
    }

    #[test]
    fn extra_disks_are_attached_or_created_blank_only_when_missing() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("target.img");
        let arg = format!("{}:8GiB", new.display());
        assert_eq!(extra_disk(&arg).unwrap(), new);
        assert_eq!(fs::metadata(&new).unwrap().len(), 8 << 30);
        // An existing file is attached as it is, whatever size is asked for.
        fs::write(&new, b"data").unwrap();
        assert_eq!(extra_disk(&format!("{}:1GiB", new.display())).unwrap(), new);
        assert_eq!(fs::read(&new).unwrap(), b"data");
        let missing = dir.path().join("missing.img");
        let err = extra_disk(missing.to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("does not exist") && err.contains(":8GiB"), "{err}");
        let err = extra_disk(&format!("{}:8 parsecs", dir.path().join("x.img").display())).unwrap_err().to_string();
        assert!(err.contains("parsecs"), "{err}");
    }

    #[test]
    fn interactive_mode_puts_the_console_on_the_terminal() {
        let fw = fake_firmware_dir();
        let work = tempfile::tempdir().unwrap();
        let cmd = build_command(&spec_with(Arch::Aarch64, fw.path()), work.path(), ConsoleMode::Interactive).unwrap();
        let args = args_of(&cmd);
        assert!(args.contains(&"-nographic".to_string()) && !args.contains(&"-monitor".to_string()), "{args:?}");
    }

    #[test]
    fn missing_qemu_binary_names_the_package() {
        let err = spawn(Command::new("/nonexistent/qemu-system-x86_64"), Arch::X86_64).unwrap_err().to_string();
        assert!(err.contains("package `qemu-system-x86`"), "{err}");
    }
}
