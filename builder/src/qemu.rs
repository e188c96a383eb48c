//! QEMU: finding firmware, building the command line for an [`Arch`]'s machine, and running a VM
//! whose serial console is captured (automated tests) or attached to the terminal (`kiln run`).
//!
//! Every run is `-accel tcg`: KVM is not available where kiln is built and tested, and TCG behaves
//! the same on every host. The per-arch machine facts live in [`Arch::qemu`]; this module only
//! turns them into flags.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::arch::{Arch, FirmwareKind};

/// Environment variable naming a firmware directory (used when no `--firmware-dir` is given).
pub const FIRMWARE_DIR_ENV: &str = "KILN_FIRMWARE_DIR";

/// Console lines that mean the guest failed: waiting stops at once instead of running into the timeout.
const FAILURE_MARKERS: [&str; 2] = ["[kiln] error:", "Kernel panic"];

/// How many console lines an error carries.
const TAIL_LINES: usize = 60;

/// A needle in an unfinished line (a prompt) matches once the console has been quiet this long;
/// until then the line may still be arriving and is returned whole when it ends.
const PROMPT_QUIET: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------------------------
// Firmware
// ---------------------------------------------------------------------------------------------

/// The firmware files one arch's machine boots from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Firmware {
    /// UEFI in two pflash units: `code` read-only, and a writable copy of `vars_template`.
    Pflash { code: PathBuf, vars_template: PathBuf },
    /// OpenSBI (`-bios`) loading U-Boot (`-kernel`).
    OpenSbiUboot { opensbi: PathBuf, uboot: PathBuf },
}

/// Firmware files that are not where they were looked for.
#[derive(Debug, thiserror::Error)]
#[error(
    "firmware for {arch} not found: looked for {}; install the Debian package(s) `{package}`, \
     or pass --firmware-dir / set {FIRMWARE_DIR_ENV} to a directory holding them",
    .looked_for.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
)]
pub struct FirmwareNotFound {
    pub arch: Arch,
    /// Every path tried, in order.
    pub looked_for: Vec<PathBuf>,
    /// The Debian package(s) that ship the files.
    pub package: &'static str,
}

/// Firmware files for an arch: found from `dir` (a `--firmware-dir` flag), else $KILN_FIRMWARE_DIR, else the
/// Debian package paths (/usr/share for OVMF/AAVMF, /usr/lib for opensbi/u-boot). A miss is an error naming the
/// files looked for and the Debian package to install (`Arch::qemu().firmware_package`).
///
/// A given directory is searched alone (no silent fallback to the system files, so the user gets what
/// they asked for): each file is looked for at its Debian-relative path (`OVMF/OVMF_CODE_4M.fd`) and
/// then by bare name (`OVMF_CODE_4M.fd`), so both a copied Debian tree and a flat directory work.
pub fn find_firmware(arch: Arch, dir: Option<&Path>) -> anyhow::Result<Firmware> {
    let env_dir = std::env::var_os(FIRMWARE_DIR_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
    let root = dir.map(Path::to_path_buf).or(env_dir);
    Ok(find_firmware_under(arch, root.as_deref())?)
}

/// [`find_firmware`] without the environment: `root` is the user's directory, `None` the Debian paths.
fn find_firmware_under(arch: Arch, root: Option<&Path>) -> Result<Firmware, FirmwareNotFound> {
    let machine = arch.qemu();
    let mut looked_for = Vec::new();
    let mut find = |debian_root: &str, rel: &str| -> Option<PathBuf> {
        let candidates = match root {
            Some(dir) => {
                let mut c = vec![dir.join(rel)];
                if let Some(name) = Path::new(rel).file_name() {
                    c.push(dir.join(name));
                }
                c
            }
            None => vec![Path::new(debian_root).join(rel)],
        };
        let found = candidates.iter().find(|p| p.is_file()).cloned();
        if found.is_none() {
            looked_for.extend(candidates);
        }
        found
    };
    let firmware = match machine.firmware {
        FirmwareKind::Pflash { code, vars } => match (find("/usr/share", code), find("/usr/share", vars)) {
            (Some(code), Some(vars_template)) => Some(Firmware::Pflash { code, vars_template }),
            _ => None,
        },
        FirmwareKind::OpenSbiUboot { opensbi, uboot } => match (find("/usr/lib", opensbi), find("/usr/lib", uboot)) {
            (Some(opensbi), Some(uboot)) => Some(Firmware::OpenSbiUboot { opensbi, uboot }),
            _ => None,
        },
    };
    firmware.ok_or(FirmwareNotFound { arch, looked_for, package: machine.firmware_package })
}

// ---------------------------------------------------------------------------------------------
// The VM description and its command line
// ---------------------------------------------------------------------------------------------

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
        return Err(crate::pipeline::UsageError(format!(
            "--disk {arg}: {file} does not exist; give a size (`{file}:8GiB`) to create a blank disk"
        ))
        .into());
    };
    let bytes: crate::size::Size =
        size.parse().map_err(|e| crate::pipeline::UsageError(format!("--disk {arg}: {e}")))?;
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
            extra_args: Vec::new(),
        }
    }
}

/// Where the serial console goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConsoleMode {
    /// Serial on stdio, no monitor: a program reads it and nothing can type QEMU monitor commands.
    Captured,
    /// `-nographic`: serial and monitor multiplexed on the user's terminal (Ctrl-A x quits).
    Interactive,
}

/// Builds the qemu command line (always `-accel tcg`; each flag commented where it is added). The writable UEFI
/// variable store is copied into `workdir` (pflash unit 1). Serial console on stdio, no graphics, no monitor
/// on stdio (so an automated run cannot type into the monitor).
pub fn command(spec: &VmSpec, workdir: &Path) -> anyhow::Result<Command> {
    build_command(spec, workdir, ConsoleMode::Captured)
}

fn build_command(spec: &VmSpec, workdir: &Path, console: ConsoleMode) -> anyhow::Result<Command> {
    let machine = spec.arch.qemu();
    let firmware = find_firmware(spec.arch, spec.firmware_dir.as_deref())?;
    let mut cmd = match &spec.net {
        // QEMU must run inside the namespace to open the tap device there.
        Net::Tap { netns, .. } => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", netns, machine.binary]);
            c
        }
        _ => Command::new(machine.binary),
    };

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

    match &firmware {
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

    match console {
        ConsoleMode::Captured => {
            // No window: the serial console is the only output.
            cmd.args(["-display", "none"]);
            // The guest's first serial port on QEMU's stdin/stdout (pipes, read by `Vm`).
            cmd.args(["-serial", "stdio"]);
            // No monitor at all, so nothing written to stdin can reach it.
            cmd.args(["-monitor", "none"]);
        }
        ConsoleMode::Interactive => {
            // Serial (and monitor, behind Ctrl-A c) on the user's terminal; Ctrl-A x quits.
            cmd.arg("-nographic");
        }
    }
    if spec.no_reboot {
        // A guest reboot ends QEMU, so a boot loop shows up as an exit instead of a timeout.
        cmd.arg("-no-reboot");
    }
    cmd.args(&spec.extra_args);
    Ok(cmd)
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
    fs::copy(template, &dest)
        .with_context(|| format!("copying UEFI variable store {} to {}", template.display(), dest.display()))?;
    // Debian's templates are read-only (0644 as root, but a copy of a 0444 file stays 0444): QEMU must write it.
    let mut perms = fs::metadata(&dest).with_context(|| format!("reading {}", dest.display()))?.permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    fs::set_permissions(&dest, perms).with_context(|| format!("making {} writable", dest.display()))?;
    Ok(dest)
}

/// A path inside a QEMU `-drive` option string: UTF-8, with commas doubled (QEMU's escape).
fn qemu_path(path: &Path) -> anyhow::Result<String> {
    let s = path.to_str().with_context(|| format!("path {} is not UTF-8; QEMU options need text", path.display()))?;
    Ok(s.replace(',', ",,"))
}

/// Spawns `cmd`, turning "binary not found" into a message naming the package to install.
fn spawn(mut cmd: Command, arch: Arch) -> anyhow::Result<Child> {
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

// ---------------------------------------------------------------------------------------------
// A captured VM
// ---------------------------------------------------------------------------------------------

/// Why [`Vm::wait_for`] gave up. Each variant carries the console's last lines.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("timed out after {:.1} s waiting for `{needle}` on the {arch} console; last console lines:\n{tail}", .after.as_secs_f64())]
    Timeout { arch: Arch, needle: String, after: Duration, tail: String },
    #[error("QEMU ({arch}) exited ({status}) before `{needle}` appeared; QEMU stderr:\n{stderr}\nlast console lines:\n{tail}")]
    Exited { arch: Arch, needle: String, status: String, stderr: String, tail: String },
    #[error("the {arch} guest failed while waiting for `{needle}`: {line}\nlast console lines:\n{tail}")]
    GuestFailed { arch: Arch, needle: String, line: String, tail: String },
}

/// What the reader threads share with [`Vm`].
struct Shared {
    state: Mutex<Captured>,
    changed: Condvar,
}

struct Captured {
    /// Raw serial console bytes.
    console: Vec<u8>,
    /// QEMU's own messages (bad options, missing files).
    stderr: Vec<u8>,
    /// QEMU closed its stdout: it has exited (or is exiting).
    console_closed: bool,
    /// QEMU closed its stderr (its last message may arrive after stdout closed).
    stderr_closed: bool,
    /// Everything, appended as it arrives.
    log: File,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Captured> {
        // A reader thread that panicked leaves valid bytes behind; keep using them.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A running VM whose serial console is captured (pipes), appended to a log file and kept in memory.
pub struct Vm {
    arch: Arch,
    child: Child,
    stdin: Option<ChildStdin>,
    shared: Arc<Shared>,
    /// Console bytes before this offset have been consumed by `wait_for`.
    scan_pos: usize,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
    killed: bool,
    /// Holds the UEFI variable store copy for the VM's lifetime.
    _workdir: tempfile::TempDir,
}

impl Vm {
    /// Starts QEMU for `spec`; the console (and QEMU's stderr) are appended to `log`.
    pub fn start(spec: &VmSpec, log: &Path) -> anyhow::Result<Vm> {
        let workdir =
            tempfile::Builder::new().prefix("kiln-vm-").tempdir().context("creating a temporary directory")?;
        let mut cmd = command(spec, workdir.path())?;
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening console log {}", log.display()))?;
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        tracing::debug!(?cmd, log = %log.display(), "starting QEMU");
        let mut child = spawn(cmd, spec.arch)?;

        let shared = Arc::new(Shared {
            state: Mutex::new(Captured {
                console: Vec::new(),
                stderr: Vec::new(),
                console_closed: false,
                stderr_closed: false,
                log: log_file,
            }),
            changed: Condvar::new(),
        });
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(spawn_reader(out, shared.clone(), Stream::Console));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(spawn_reader(err, shared.clone(), Stream::Stderr));
        }
        Ok(Vm {
            arch: spec.arch,
            stdin: child.stdin.take(),
            child,
            shared,
            scan_pos: 0,
            readers,
            started: Instant::now(),
            killed: false,
            _workdir: workdir,
        })
    }

    /// Time since QEMU was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until a console line contains `needle`; returns that line (escape sequences removed).
    /// Fails early (with the last ~60 console lines in the error) if QEMU exits, if a line contains
    /// `[kiln] error:` or `Kernel panic`, or on timeout. Output up to the match is consumed: the next
    /// call looks only at what follows. A needle in an unfinished line matches once the console has been
    /// quiet for [`PROMPT_QUIET`] (a prompt waiting for input).
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let shared = self.shared.clone();
        let mut state = shared.lock();
        // (console length, when first seen) while the needle sits in an unfinished line.
        let mut prompt_since: Option<(usize, Instant)> = None;
        loop {
            // Complete lines first: a failure marker is judged on whole lines.
            while let Some(nl) = state.console[self.scan_pos..].iter().position(|&b| b == b'\n') {
                let line = clean_line(&state.console[self.scan_pos..self.scan_pos + nl]);
                self.scan_pos += nl + 1;
                if line.contains(needle) {
                    return Ok(line);
                }
                if FAILURE_MARKERS.iter().any(|m| line.contains(m)) {
                    let tail = tail_lines(&state.console, TAIL_LINES);
                    return Err(WaitError::GuestFailed { arch: self.arch, needle: needle.into(), line, tail }.into());
                }
            }
            let partial = clean_line(&state.console[self.scan_pos..]);
            let mut wake_at = deadline;
            if partial.contains(needle) {
                let len = state.console.len();
                match prompt_since {
                    Some((seen_len, since)) if seen_len == len => {
                        if since.elapsed() >= PROMPT_QUIET {
                            self.scan_pos = len;
                            return Ok(partial);
                        }
                        wake_at = wake_at.min(since + PROMPT_QUIET);
                    }
                    _ => {
                        prompt_since = Some((len, Instant::now()));
                        wake_at = wake_at.min(Instant::now() + PROMPT_QUIET);
                    }
                }
            }
            if state.console_closed {
                // QEMU's own error message (the likely reason it exited) may still be in flight.
                state = wait_until(&shared, state, Duration::from_secs(1), |s| s.stderr_closed);
                let (tail, stderr) =
                    (tail_lines(&state.console, TAIL_LINES), String::from_utf8_lossy(&state.stderr).into_owned());
                drop(state);
                let status = self.exit_status_soon();
                return Err(WaitError::Exited { arch: self.arch, needle: needle.into(), status, stderr, tail }.into());
            }
            let now = Instant::now();
            if now >= deadline {
                let tail = tail_lines(&state.console, TAIL_LINES);
                return Err(WaitError::Timeout { arch: self.arch, needle: needle.into(), after: timeout, tail }.into());
            }
            let wait = wake_at.saturating_duration_since(now).max(Duration::from_millis(1));
            state = shared.changed.wait_timeout(state, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// All serial console output so far (raw, with the firmware's escape sequences).
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.shared.lock().console).into_owned()
    }

    /// Types `text` on the serial console (e.g. a key to stop a boot countdown).
    pub fn send(&mut self, text: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("the VM's console input is closed")?;
        stdin.write_all(text.as_bytes()).and_then(|()| stdin.flush()).context("writing to the VM's serial console")
    }

    /// Stops QEMU (if still running) and waits for it; also done on drop, so no QEMU outlives its `Vm`.
    pub fn kill(&mut self) {
        if self.killed {
            return;
        }
        self.killed = true;
        self.stdin = None;
        // Errors mean it already exited; either way wait() reaps it.
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Let the readers take QEMU's last output, but do not block on them: a helper process QEMU
        // started could hold the pipes open. Readers left running end when the pipes close.
        let shared = self.shared.clone();
        let state = wait_until(&shared, shared.lock(), Duration::from_secs(2), |s| s.console_closed && s.stderr_closed);
        let all_closed = state.console_closed && state.stderr_closed;
        drop(state);
        for reader in self.readers.drain(..) {
            if all_closed {
                let _ = reader.join();
            }
        }
    }

    /// Waits (at most `timeout`) for QEMU to end by itself, e.g. the guest powered off, and returns
    /// its exit status; on timeout the error carries the last console lines.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let shared = self.shared.clone();
        let state = wait_until(&shared, shared.lock(), timeout, |s| s.console_closed);
        let closed = state.console_closed;
        let tail = tail_lines(&state.console, TAIL_LINES);
        drop(state);
        if !closed {
            bail!("{}: QEMU still running after {} s (the guest did not power off); last console lines:\n{tail}", self.arch, timeout.as_secs());
        }
        let status = self.child.wait().context("waiting for QEMU")?;
        self.killed = true;
        Ok(status)
    }

    /// QEMU's exit status, given a moment to exit after it closed its console.
    fn exit_status_soon(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Ok(None) => return "console closed, process still running".into(),
                Err(e) => return format!("status unknown: {e}"),
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Clone, Copy)]
enum Stream {
    Console,
    Stderr,
}

/// Copies one of QEMU's output pipes into the shared state and the log until it closes.
fn spawn_reader(mut pipe: impl Read + Send + 'static, shared: Arc<Shared>, stream: Stream) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let mut state = shared.lock();
            // A full disk must not stop the capture; the in-memory copy is what wait_for reads.
            let _ = state.log.write_all(&buf[..n]);
            match stream {
                Stream::Console => state.console.extend_from_slice(&buf[..n]),
                Stream::Stderr => state.stderr.extend_from_slice(&buf[..n]),
            }
            drop(state);
            shared.changed.notify_all();
        }
        let mut state = shared.lock();
        match stream {
            Stream::Console => state.console_closed = true,
            Stream::Stderr => state.stderr_closed = true,
        }
        drop(state);
        shared.changed.notify_all();
    })
}

/// Waits (at most `limit`) until `done` holds for the shared state; returns the guard either way.
fn wait_until<'a>(
    shared: &'a Shared,
    mut state: MutexGuard<'a, Captured>,
    limit: Duration,
    done: impl Fn(&Captured) -> bool,
) -> MutexGuard<'a, Captured> {
    let deadline = Instant::now() + limit;
    while !done(&state) {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        state = shared.changed.wait_timeout(state, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
    }
    state
}

/// One console line as text: lossy UTF-8, terminal escape sequences and carriage returns removed.
fn clean_line(bytes: &[u8]) -> String {
    strip_escapes(&String::from_utf8_lossy(bytes)).replace('\r', "")
}

/// Removes ANSI/VT100 escape sequences (the UEFI firmware draws its screen with them).
fn strip_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        // CSI (ESC [): parameters and intermediates, then one final byte in '@'..='~'.
        // Any other escape is two characters long (ESC c, ESC 7, ...) and is dropped by the `next()`.
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// The last `n` lines of the console, cleaned, for error messages.
fn tail_lines(console: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(console);
    let lines: Vec<String> = text.split('\n').map(|l| strip_escapes(l).replace('\r', "")).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A firmware directory laid out flat, with tiny stand-in files (the command line never reads them).
    fn fake_firmware_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for name in
            ["OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd", "AAVMF_CODE.fd", "AAVMF_VARS.fd", "fw_dynamic.bin", "u-boot.bin"]
        {
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
        assert!(has(&args, "-m", "1024") && has(&args, "-smp", "1"), "{args:?}");
        let code = fw.path().join("OVMF_CODE_4M.fd");
        let vars = work.path().join("OVMF_VARS_4M.fd");
        assert!(
            has(&args, "-drive", &format!("if=pflash,format=raw,unit=0,readonly=on,file={}", code.display())),
            "{args:?}"
        );
        assert!(has(&args, "-drive", &format!("if=pflash,format=raw,unit=1,file={}", vars.display())), "{args:?}");
        assert_eq!(fs::read(&vars).unwrap(), b"OVMF_VARS_4M.fd", "vars copy made in the work dir");
        assert!(!fs::metadata(&vars).unwrap().permissions().readonly());
        assert!(has(&args, "-nic", "none") && has(&args, "-serial", "stdio"), "{args:?}");
        assert!(has(&args, "-monitor", "none") && has(&args, "-display", "none"), "{args:?}");
        assert!(!args.contains(&"-nographic".to_string()), "the monitor must not be on stdio: {args:?}");
    }

    #[test]
    fn aarch64_uses_virt_cortex_a72_and_aavmf() {
        let fw = fake_firmware_dir();
        let work = tempfile::tempdir().unwrap();
        let cmd = command(&spec_with(Arch::Aarch64, fw.path()), work.path()).unwrap();
        let args = args_of(&cmd);
        assert_eq!(cmd.get_program(), "qemu-system-aarch64");
        assert!(
            has(&args, "-accel", "tcg") && has(&args, "-machine", "virt") && has(&args, "-cpu", "cortex-a72"),
            "{args:?}"
        );
        let code = fw.path().join("AAVMF_CODE.fd");
        assert!(
            has(&args, "-drive", &format!("if=pflash,format=raw,unit=0,readonly=on,file={}", code.display())),
            "{args:?}"
        );
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
            disks: vec![
                Disk { path: "/img/a,b.img".into(), snapshot: false },
                Disk { path: "/img/boot.img".into(), snapshot: true },
            ],
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
        let tap = VmSpec { net: Net::Tap { netns: "kiln-t".into(), ifname: "tap1".into() }, mac: Some("52:54:00:e7:00:01".into()), ..spec.clone() };
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
    fn firmware_in_a_debian_shaped_dir_is_found() {
        let dir = tempfile::tempdir().unwrap();
        for rel in ["riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin", "u-boot/qemu-riscv64_smode/u-boot.bin"] {
            let p = dir.path().join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, b"x").unwrap();
        }
        let fw = find_firmware(Arch::Riscv64, Some(dir.path())).unwrap();
        assert_eq!(
            fw,
            Firmware::OpenSbiUboot {
                opensbi: dir.path().join("riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin"),
                uboot: dir.path().join("u-boot/qemu-riscv64_smode/u-boot.bin"),
            }
        );
    }

    #[test]
    fn missing_firmware_names_the_files_and_the_package() {
        let empty = tempfile::tempdir().unwrap();
        for (arch, file, package) in [
            (Arch::X86_64, "OVMF_CODE_4M.fd", "ovmf"),
            (Arch::Aarch64, "AAVMF_VARS.fd", "qemu-efi-aarch64"),
            (Arch::Riscv64, "u-boot.bin", "opensbi u-boot-qemu"),
        ] {
            let err = find_firmware(arch, Some(empty.path())).unwrap_err();
            let typed = err.downcast_ref::<FirmwareNotFound>().expect("typed error");
            assert_eq!(typed.package, package);
            let msg = err.to_string();
            assert!(msg.contains(file) && msg.contains(&format!("`{package}`")), "{msg}");
            assert!(msg.contains(&empty.path().display().to_string()), "{msg}");
            // The command line is not built without firmware either.
            let work = tempfile::tempdir().unwrap();
            assert!(command(&spec_with(arch, empty.path()), work.path()).is_err());
        }
    }

    #[test]
    fn debian_paths_are_the_fallback() {
        // Only the path list is checked; whether the files exist depends on the host.
        match find_firmware_under(Arch::Riscv64, None) {
            Ok(Firmware::OpenSbiUboot { opensbi, .. }) => {
                assert_eq!(opensbi, Path::new("/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin"))
            }
            Ok(other) => panic!("wrong firmware kind {other:?}"),
            Err(e) => assert!(e.looked_for.iter().all(|p| p.starts_with("/usr/lib")), "{e}"),
        }
        match find_firmware_under(Arch::X86_64, None) {
            Ok(Firmware::Pflash { code, .. }) => {
                assert_eq!(code, Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd"))
            }
            Ok(other) => panic!("wrong firmware kind {other:?}"),
            Err(e) => assert!(e.looked_for.iter().all(|p| p.starts_with("/usr/share")), "{e}"),
        }
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
    fn escapes_are_stripped_from_console_lines() {
        let raw = b"\x1b[2J\x1b[01;01H\x1b[=3hBdsDxe: loading Boot0001\r";
        assert_eq!(clean_line(raw), "BdsDxe: loading Boot0001");
        assert_eq!(tail_lines(b"a\nb\nc\n", 2), "c\n");
    }

    /// `wait_for` over a real process: `sh` stands in for QEMU (no VM needed).
    fn fake_vm(script: &str, log: &Path) -> Vm {
        let mut child = Command::new("sh")
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(Captured {
                console: Vec::new(),
                stderr: Vec::new(),
                console_closed: false,
                stderr_closed: false,
                log: OpenOptions::new().create(true).append(true).open(log).unwrap(),
            }),
            changed: Condvar::new(),
        });
        let readers = vec![
            spawn_reader(child.stdout.take().unwrap(), shared.clone(), Stream::Console),
            spawn_reader(child.stderr.take().unwrap(), shared.clone(), Stream::Stderr),
        ];
        Vm {
            arch: Arch::X86_64,
            stdin: child.stdin.take(),
            child,
            shared,
            scan_pos: 0,
            readers,
            started: Instant::now(),
            killed: false,
            _workdir: tempfile::tempdir().unwrap(),
        }
    }

    #[test]
    fn wait_for_matches_consumes_and_logs() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let mut vm = fake_vm("printf 'one\\r\\ntwo ready\\nthree\\nprompt> '; exec sleep 5", &log);
        let t = Duration::from_secs(3);
        assert_eq!(vm.wait_for("ready", t).unwrap(), "two ready");
        assert_eq!(vm.wait_for("three", t).unwrap(), "three");
        assert_eq!(vm.wait_for("prompt>", t).unwrap(), "prompt> ", "a partial line matches");
        // Already consumed: "ready" does not match again, so this times out.
        let err = vm.wait_for("ready", Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err.downcast_ref::<WaitError>(), Some(WaitError::Timeout { .. })), "{err:#}");
        assert!(err.to_string().contains("two ready"), "tail in error: {err}");
        vm.kill();
        assert!(vm.console().starts_with("one\r\ntwo ready"));
        assert!(fs::read_to_string(&log).unwrap().contains("prompt> "));
    }

    #[test]
    fn a_line_printed_in_pieces_is_returned_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut vm = fake_vm(
            "printf 'BdsDxe'; sleep 0.1; printf ': loading Boot0001\\n'; exec sleep 5",
            &dir.path().join("p.log"),
        );
        assert_eq!(vm.wait_for("BdsDxe", Duration::from_secs(3)).unwrap(), "BdsDxe: loading Boot0001");
    }

    #[test]
    fn wait_for_fails_early_on_panic_and_on_exit() {
        let dir = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let mut vm =
            fake_vm("echo booting; echo 'Kernel panic - not syncing: VFS'; exec sleep 5", &dir.path().join("a.log"));
        let err = vm.wait_for("login:", Duration::from_secs(4)).unwrap_err();
        assert!(matches!(err.downcast_ref::<WaitError>(), Some(WaitError::GuestFailed { .. })), "{err:#}");
        assert!(err.to_string().contains("booting"), "{err}");

        let mut vm = fake_vm("echo '[kiln] error: no root'; exec sleep 5", &dir.path().join("b.log"));
        let err = vm.wait_for("ready", Duration::from_secs(4)).unwrap_err();
        assert!(err.to_string().contains("[kiln] error: no root"), "{err}");

        let mut vm = fake_vm("echo bye; echo oops >&2; exit 3", &dir.path().join("c.log"));
        let err = vm.wait_for("ready", Duration::from_secs(4)).unwrap_err();
        assert!(matches!(err.downcast_ref::<WaitError>(), Some(WaitError::Exited { .. })), "{err:#}");
        let msg = err.to_string();
        assert!(msg.contains("exit status: 3") && msg.contains("oops") && msg.contains("bye"), "{msg}");
        assert!(start.elapsed() < Duration::from_secs(3), "failures are reported early");
    }

    #[test]
    fn drop_kills_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let vm = fake_vm("echo $$; exec sleep 30", &dir.path().join("k.log"));
        let pid = vm.child.id();
        drop(vm);
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "process {pid} still exists after drop");
    }

    #[test]
    fn missing_qemu_binary_names_the_package() {
        let err = spawn(Command::new("/nonexistent/qemu-system-x86_64"), Arch::X86_64).unwrap_err().to_string();
        assert!(err.contains("package `qemu-system-x86`"), "{err}");
    }
}
