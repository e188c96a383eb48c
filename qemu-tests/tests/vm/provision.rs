//! Slow tier, first-boot configuration: builds `qemu-tests/profiles/provision.yaml` (hostname, a user
//! with an SSH key generated here at run time, dropbear, DHCP, a time zone, an NTP server, a sysctl,
//! a module to load) for all three architectures, boots each image with QEMU user networking and a
//! forwarded SSH port, and logs in from the host with `ssh`. chronyd on the appliance sets its clock
//! from the test's NTP server on the host (`kiln_qemu_tests::ntp`), which runs an hour ahead. Root login is refused under the profile's policy, and a
//! second boot of the same disk keeps the host key generated on the first. A NIC on a network without
//! a DHCP server does not hang the boot.
//!
//! The console policy (`qemu-tests/profiles/console-policy.yaml`, x86_64): a boot step that fails
//! leaves no shell on the console; the later steps still run (the user logs in over SSH) and the
//! node never reports ready.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use kiln::arch::Arch;
use kiln::qemu::{Disk, Net, Vm, VmSpec};
use kiln_qemu_tests::ntp::NtpServer;
use kiln_qemu_tests::{build_with_test_key, free_port, ssh, ssh_until_ok, tool, work_dir, KeyedBuild, BOOT_TIMEOUT};

const PROFILE: &str = "qemu-tests/profiles/provision.yaml";
const USER: &str = "ops";
const HOSTNAME: &str = "kiln-prov-1";
/// The profile's `time.servers` entry is `10.0.2.2:NTP_PORT` (the host, seen from QEMU user networking).
const NTP_PORT: u16 = 11123;
/// The test NTP server runs this far ahead of the host, so a guest clock that matches it was set by it.
const NTP_OFFSET: Duration = Duration::from_secs(3600);
/// From `[kiln] ready` until chronyd has selected the server (iburst: 4 polls 2 s apart, under TCG).
const NTP_TIMEOUT: Duration = Duration::from_secs(120);

fn built() -> Result<&'static KeyedBuild> {
    static BUILT: OnceLock<Result<KeyedBuild, String>> = OnceLock::new();
    build_with_test_key(&BUILT, PROFILE, "provision-build")
}

/// The host's NTP server, shared by the VMs of this test process.
fn ntp_server() -> Result<&'static NtpServer> {
    static SERVER: OnceLock<Result<NtpServer, String>> = OnceLock::new();
    match SERVER.get_or_init(|| NtpServer::start(NTP_PORT, NTP_OFFSET).map_err(|e| format!("{e:#}"))) {
        Ok(s) => Ok(s),
        Err(e) => anyhow::bail!("{e}"),
    }
}

fn boot(arch: Arch, disk: &Path, port: u16, log: &Path) -> Result<Vm> {
    let mut spec = VmSpec::new(arch);
    spec.disks = vec![Disk { path: disk.to_path_buf(), snapshot: false }];
    spec.net = Net::User { hostfwd: vec![format!("tcp:127.0.0.1:{port}-:22")] };
    let mut vm = Vm::start(&spec, log)?;
    let line = vm.wait_for("[kiln] ready", BOOT_TIMEOUT)?;
    eprintln!("{arch}: `{line}` after {:.1} s", vm.elapsed().as_secs_f64());
    Ok(vm)
}

/// The VM's ed25519 host key as the host's `ssh-keyscan` sees it (the base64 blob).
fn host_key(port: u16) -> Result<String> {
    let text =
        tool(Command::new("ssh-keyscan").args(["-T", "30", "-t", "ed25519", "-p", &port.to_string(), "127.0.0.1"]), "openssh-client")?;
    text.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[1] == "ssh-ed25519").then(|| f[2].to_string())
        })
        .with_context(|| format!("ssh-keyscan printed no ed25519 key:\n{text}"))
}

fn kiln_lines(console: &str) -> String {
    console.lines().filter(|l| l.contains("[kiln]")).collect::<Vec<_>>().join("\n")
}

fn provisioned_appliance_accepts_ssh(arch: Arch) -> Result<()> {
    let b = built()?;
    let dir = work_dir(&format!("provision-{arch}"))?;
    let disk = dir.join("disk.img");
    std::fs::copy(b.out.join(arch.name()).join("disk.img"), &disk)?;
    let port = free_port()?;
    let ntp = ntp_server()?;

    // First boot: host keys are generated, the user logs in with the key.
    let mut vm = boot(arch, &disk, port, &dir.join("console-1.log"))?;
    let ready_s = vm.elapsed().as_secs_f64();
    let console = vm.console();
    eprintln!("{arch}: first boot:\n{}", kiln_lines(&console));
    for want in [
        format!("[kiln] hostname: {HOSTNAME}"),
        "[kiln] modules: network drivers: virtio_net".into(),
        "loaded: tun".into(),
        "[kiln] sysctl: applied 1 settings".into(),
        "[kiln] time: zone Europe/Berlin".into(),
        "ntp servers 10.0.2.2 (chronyd)".into(),
        "[kiln] ssh: dropbear on port 22 (root login no, password auth no); generated host keys ed25519 ecdsa in ".into(),
        // The profile's `boot_scripts`: after kiln's steps, with kiln_log.
        format!("[kiln] site-check: hostname {HOSTNAME}"),
    ] {
        ensure!(console.contains(&want), "{arch}: first boot console lacks `{want}`:\n{}", kiln_lines(&console));
    }
    // The step lists every address of the NIC: an IPv6 one from QEMU's router advertisements
    // appears too when autoconfiguration finished first (it does under load).
    ensure!(
        console.lines().any(|l| l.contains("[kiln] network: eth0 10.0.2.15/24 ") && l.trim_end().ends_with("(dhcp)")),
        "{arch}: first boot console lacks `[kiln] network: eth0 10.0.2.15/24 ... (dhcp)`:\n{}",
        kiln_lines(&console)
    );
    ensure!(!console.contains("[kiln] error"), "{arch}: errors on the console:\n{}", kiln_lines(&console));

    let command = "hostname; cat /proc/sys/vm/swappiness; date +%Z; test -d /sys/module/tun && echo tun-loaded; \
                   stat -c '%a %U %n' /home/ops/.ssh /home/ops/.ssh/authorized_keys /etc/shadow /etc/dropbear; id -Gn";
    let started = Instant::now();
    let out = ssh_until_ok(&b.key, port, USER, command)?;
    eprintln!("{arch}: ssh {USER}@ ({:.1} s after ready):\n{out}", started.elapsed().as_secs_f64());
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines.first() == Some(&HOSTNAME), "{arch}: hostname: {out}");
    ensure!(lines.get(1) == Some(&"17"), "{arch}: vm.swappiness: {out}");
    ensure!(matches!(lines.get(2), Some(&"CET") | Some(&"CEST")), "{arch}: time zone: {out}");
    for want in
        ["tun-loaded", "700 ops /home/ops/.ssh", "644 ops /home/ops/.ssh/authorized_keys", "600 root /etc/shadow", "700 root /etc/dropbear"]
    {
        ensure!(lines.contains(&want), "{arch}: ssh output lacks `{want}`:\n{out}");
    }
    ensure!(lines.last().is_some_and(|l| l.split_whitespace().any(|g| g == "adm")), "{arch}: ops is not in adm: {out}");

    // chronyd (started by init after the boot steps) polls the host's NTP server and steps the clock
    // to it: the guest ends up an hour ahead of the host, as the server claims.
    let line = vm.wait_for("Selected source 10.0.2.2", NTP_TIMEOUT)?;
    eprintln!("{arch}: `{}` after {:.1} s", line.trim(), vm.elapsed().as_secs_f64());
    vm.wait_for("System clock was stepped by", NTP_TIMEOUT)?;
    let out = ssh_until_ok(&b.key, port, USER, "date +%s; stat -c %U /var/lib/chrony")?;
    let host = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let guest: u64 = out.lines().next().and_then(|l| l.trim().parse().ok()).with_context(|| format!("{arch}: date +%s printed {out}"))?;
    let want = host + NTP_OFFSET.as_secs();
    ensure!(guest.abs_diff(want) <= 30, "{arch}: guest clock {guest} is not the NTP server's time {want} (host {host})");
    ensure!(out.lines().nth(1) == Some("_chrony"), "{arch}: /var/lib/chrony is not owned by _chrony: {out}");
    ensure!(ntp.answered() > 0, "{arch}: the NTP server answered nothing");

    // init's respawn entries all start: a login prompt on the serial console, no `can't run`.
    // (getty prints its prompt right after `[kiln] ready`, long before chronyd has stepped the clock.)
    let console = vm.console();
    ensure!(console.contains(&format!("{HOSTNAME} login:")), "{arch}: no login prompt on the serial console");
    // The profile's `services` entry is started by init and keeps running.
    ensure!(
        console.contains("[kiln] site-agent: starting (log /var/log/site-agent.log)") && !console.contains("[kiln] site-agent: exited"),
        "{arch}: the site service did not start, or exited:\n{}",
        kiln_lines(&console)
    );
    ensure!(
        !console.contains("can't run"),
        "{arch}: init could not start a program:\n{}",
        console.lines().filter(|l| l.contains("can't run")).collect::<Vec<_>>().join("\n")
    );

    // The default policy refuses root.
    let (ok, text) = ssh(&b.key, port, "root", "true")?;
    ensure!(!ok && text.contains("Permission denied"), "{arch}: root login was not refused: {text}");
    let first_key = host_key(port)?;
    vm.kill();

    // Second boot of the same disk: the keys from the first boot are kept.
    let mut vm = boot(arch, &disk, port, &dir.join("console-2.log"))?;
    let console = vm.console();
    ensure!(
        console.contains("[kiln] ssh: dropbear on port 22") && console.contains("host keys kept"),
        "{arch}: second boot:\n{}",
        kiln_lines(&console)
    );
    ensure!(!console.contains("generated host keys"), "{arch}: second boot generated host keys again");
    ssh_until_ok(&b.key, port, USER, "true")?;
    let second_key = host_key(port)?;
    vm.kill();
    ensure!(first_key == second_key, "{arch}: host key changed between boots");
    eprintln!("{arch}: first boot ready after {ready_s:.1} s; host key kept across boots");
    let _ = std::fs::remove_file(&disk);
    Ok(())
}

#[test]
fn x86_64_first_boot_configuration_and_ssh_login() -> Result<()> {
    provisioned_appliance_accepts_ssh(Arch::X86_64)
}

#[test]
fn aarch64_first_boot_configuration_and_ssh_login() -> Result<()> {
    provisioned_appliance_accepts_ssh(Arch::Aarch64)
}

#[test]
fn riscv64_first_boot_configuration_and_ssh_login() -> Result<()> {
    provisioned_appliance_accepts_ssh(Arch::Riscv64)
}

/// A NIC on a network without a DHCP server (a QEMU hub port with nothing else on the hub): the boot
/// must not hang; the network step reports the missing lease and the appliance still gets ready.
#[test]
fn x86_64_dhcp_without_a_server_does_not_hang_the_boot() -> Result<()> {
    let arch = Arch::X86_64;
    let b = built()?;
    let dir = work_dir("provision-no-dhcp")?;
    let mut spec = VmSpec::new(arch);
    spec.disks = vec![Disk { path: b.out.join(arch.name()).join("disk.img"), snapshot: true }];
    // `romfile=`: no iPXE option ROM, so the firmware does not try to boot from the NIC.
    spec.extra_args =
        ["-netdev", "hubport,id=lonely,hubid=7", "-device", "virtio-net-pci,netdev=lonely,romfile="].map(String::from).to_vec();
    let mut vm = Vm::start(&spec, &dir.join("console.log"))?;
    vm.wait_for("[kiln] ready", BOOT_TIMEOUT)?;
    let console = vm.console();
    vm.kill();
    let want = "[kiln] network: eth0 no lease after 5 s (dhcp continues in the background)";
    ensure!(console.contains(want), "{arch}: console lacks `{want}`:\n{}", kiln_lines(&console));
    Ok(())
}

#[test]
fn x86_64_a_failed_boot_step_leaves_no_console_shell_and_the_node_reachable_but_not_ready() -> Result<()> {
    static BUILT: OnceLock<Result<KeyedBuild, String>> = OnceLock::new();
    let b = build_with_test_key(&BUILT, "qemu-tests/profiles/console-policy.yaml", "console-policy-build")?;
    let arch = Arch::X86_64;
    let dir = work_dir("console-policy-x86_64")?;
    let port = free_port()?;
    let mut spec = VmSpec::new(arch);
    spec.disks = vec![Disk { path: b.out.join(arch.name()).join("disk.img"), snapshot: true }];
    spec.net = Net::User { hostfwd: vec![format!("tcp:127.0.0.1:{port}-:22")] };
    let mut vm = Vm::start(&spec, &dir.join("console.log"))?;
    vm.wait_for("[kiln] error: boot step broken failed", BOOT_TIMEOUT)?;
    let no_shell = vm.wait_for("[kiln] ", Duration::from_secs(30))?;
    ensure!(no_shell.contains("no shell on the console (debug.rescue_shell is off)"), "{arch}: after the error: `{no_shell}`");
    let closing = vm.wait_for("[kiln] boot: not ready", BOOT_TIMEOUT)?;
    eprintln!("{arch}: `{closing}` after {:.1} s", vm.elapsed().as_secs_f64());
    ensure!(closing.contains("failed step(s): broken"), "{arch}: {closing}");
    // The steps after the failed one ran: SSH works, and the status file holds the error.
    let out = ssh_until_ok(&b.key, port, USER, "cat /run/kiln/status; test -e /run/kiln/booted && echo booted || echo not-booted")?;
    ensure!(out.contains("error: boot step broken failed") && out.trim_end().ends_with("not-booted"), "{arch}: {out}");
    let console = vm.console();
    ensure!(!console.contains("root shell follows") && !console.contains("[kiln] ready"), "{arch}: shell or ready on the console");
    Ok(())
}
