//! Slow tier, first-boot configuration: builds `qemu-tests/profiles/provision.yaml` (hostname, a user
//! with an SSH key generated here at run time, dropbear, DHCP, a time zone, a sysctl, a module to
//! load) for all three architectures, boots each image with QEMU user networking and a forwarded SSH
//! port, and logs in from the host with `ssh`. Root login is refused under the profile's policy, and a
//! second boot of the same disk keeps the host key generated on the first. A NIC on a network without
//! a DHCP server does not hang the boot.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kiln::arch::Arch;
use kiln::qemu::{Disk, Net, Vm, VmSpec};
use kiln_qemu_tests::{cache_dir, kiln_with_cache, repo_root, tool, work_dir, BOOT_TIMEOUT};

const PROFILE: &str = "qemu-tests/profiles/provision.yaml";
/// The public key in the committed profile; replaced by the key generated for this run.
const PLACEHOLDER: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPLACEHOLDERPLACEHOLDERPLACEHOLDERPLACEH kiln-test-placeholder";
const USER: &str = "ops";
const HOSTNAME: &str = "kiln-prov-1";
/// How long after `[kiln] ready` the SSH server may take to accept a login (init starts it then).
const SSH_TIMEOUT: Duration = Duration::from_secs(120);

/// The build output and the private key, made once per test process.
struct Built {
    out: PathBuf,
    key: PathBuf,
}

fn built() -> Result<&'static Built> {
    static BUILT: OnceLock<Result<Built, String>> = OnceLock::new();
    let r = BUILT.get_or_init(|| build().map_err(|e| format!("{e:#}")));
    match r {
        Ok(b) => Ok(b),
        Err(e) => bail!("{e}"),
    }
}

fn build() -> Result<Built> {
    let dir = work_dir("provision-build")?;
    let key = dir.join("id_ed25519");
    tool(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-provision-test", "-f"]).arg(&key), "openssh-client")?;
    let public = std::fs::read_to_string(key.with_extension("pub"))?;
    let text = std::fs::read_to_string(repo_root().join(PROFILE))?;
    ensure!(text.contains(PLACEHOLDER), "{PROFILE} lacks the placeholder key");
    let profile = dir.join("provision.yaml");
    std::fs::write(&profile, text.replace(PLACEHOLDER, public.trim()))?;
    let out = dir.join("out");
    let started = Instant::now();
    let (code, log) = kiln_with_cache(&cache_dir()?, &["build", path_str(&profile)?, "--out", path_str(&out)?])?;
    ensure!(code == 0, "kiln build failed (exit {code}):\n{log}");
    eprintln!("provision build (3 archs): {:.1} s", started.elapsed().as_secs_f64());
    Ok(Built { out, key })
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// A port on the host's loopback that is free right now.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
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

/// `ssh` from the host to the VM; returns (success, stdout + stderr).
fn ssh(key: &Path, port: u16, user: &str, command: &str) -> Result<(bool, String)> {
    let out = Command::new("ssh")
        .arg("-i")
        .arg(key)
        .args(["-p", &port.to_string()])
        .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
        .args(["-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=30", "-o", "LogLevel=ERROR"])
        .arg(format!("{user}@127.0.0.1"))
        .arg(command)
        .output()
        .context("running ssh (install the `openssh-client` package)")?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

/// Retries until the SSH server (started by init after the boot steps) lets the user in.
fn ssh_until_ok(key: &Path, port: u16, command: &str) -> Result<String> {
    let started = Instant::now();
    loop {
        let (ok, text) = ssh(key, port, USER, command)?;
        if ok {
            return Ok(text);
        }
        if started.elapsed() > SSH_TIMEOUT {
            bail!("ssh {USER}@127.0.0.1:{port} still fails after {SSH_TIMEOUT:?}:\n{text}");
        }
        std::thread::sleep(Duration::from_secs(3));
    }
}

/// The VM's ed25519 host key as the host's `ssh-keyscan` sees it (the base64 blob).
fn host_key(port: u16) -> Result<String> {
    let text = tool(Command::new("ssh-keyscan").args(["-T", "30", "-t", "ed25519", "-p", &port.to_string(), "127.0.0.1"]), "openssh-client")?;
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
        "[kiln] network: eth0 10.0.2.15/24 (dhcp)".into(),
        "[kiln] time: zone Europe/Berlin".into(),
        "[kiln] ssh: dropbear on port 22 (root login no, password auth no); generated host keys ed25519 ecdsa in ".into(),
    ] {
        ensure!(console.contains(&want), "{arch}: first boot console lacks `{want}`:\n{}", kiln_lines(&console));
    }
    ensure!(!console.contains("[kiln] error"), "{arch}: errors on the console:\n{}", kiln_lines(&console));

    let command = "hostname; cat /proc/sys/vm/swappiness; date +%Z; test -d /sys/module/tun && echo tun-loaded; \
                   stat -c '%a %U %n' /home/ops/.ssh /home/ops/.ssh/authorized_keys /etc/shadow /etc/dropbear; id -Gn";
    let started = Instant::now();
    let out = ssh_until_ok(&b.key, port, command)?;
    eprintln!("{arch}: ssh {USER}@ ({:.1} s after ready):\n{out}", started.elapsed().as_secs_f64());
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines.first() == Some(&HOSTNAME), "{arch}: hostname: {out}");
    ensure!(lines.get(1) == Some(&"17"), "{arch}: vm.swappiness: {out}");
    ensure!(matches!(lines.get(2), Some(&"CET") | Some(&"CEST")), "{arch}: time zone: {out}");
    for want in [
        "tun-loaded",
        "700 ops /home/ops/.ssh",
        "600 ops /home/ops/.ssh/authorized_keys",
        "600 root /etc/shadow",
        "700 root /etc/dropbear",
    ] {
        ensure!(lines.contains(&want), "{arch}: ssh output lacks `{want}`:\n{out}");
    }
    ensure!(lines.last().is_some_and(|l| l.split_whitespace().any(|g| g == "adm")), "{arch}: ops is not in adm: {out}");

    // The default policy refuses root.
    let (ok, text) = ssh(&b.key, port, "root", "true")?;
    ensure!(!ok && text.contains("Permission denied"), "{arch}: root login was not refused: {text}");
    let first_key = host_key(port)?;
    vm.kill();

    // Second boot of the same disk: the keys from the first boot are kept.
    let mut vm = boot(arch, &disk, port, &dir.join("console-2.log"))?;
    let console = vm.console();
    ensure!(console.contains("[kiln] ssh: dropbear on port 22") && console.contains("host keys kept"), "{arch}: second boot:\n{}", kiln_lines(&console));
    ensure!(!console.contains("generated host keys"), "{arch}: second boot generated host keys again");
    ssh_until_ok(&b.key, port, "true")?;
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
    spec.extra_args = ["-netdev", "hubport,id=lonely,hubid=7", "-device", "virtio-net-pci,netdev=lonely,romfile="].map(String::from).to_vec();
    let mut vm = Vm::start(&spec, &dir.join("console.log"))?;
    vm.wait_for("[kiln] ready", BOOT_TIMEOUT)?;
    let console = vm.console();
    vm.kill();
    let want = "[kiln] network: eth0 no lease after 5 s (dhcp continues in the background)";
    ensure!(console.contains(want), "{arch}: console lacks `{want}`:\n{}", kiln_lines(&console));
    Ok(())
}
