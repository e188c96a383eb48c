//! Slow tier, cluster formation with Debian's real etcd (issue 4's etcd scenarios). One image for
//! every VM; each finds its identity by MAC address and its static address in the inventory.
//!
//! x86_64, on a private LAN (a network namespace with a bridge, see `lan.rs`):
//! (a) three `[etcd]` nodes form a 3-member group on power-on, checked from the host side of the
//!     LAN with Debian's `etcdctl` (`member list`, `endpoint health`);
//! (b) one member is killed: the other two keep accepting writes; booted again from its disk, it
//!     rejoins as the same member with its data and serves the writes it missed from its own copy;
//! (c) a fourth VM whose MAC is not in the inventory comes up with the default role (`none`) and a
//!     MAC-derived host name.
//! aarch64 and riscv64: (d) a single-member group on QEMU user networking, its client port
//! forwarded to the host.
//! Everything runs over mutual TLS: `etcdctl` uses the CA certificate and the operator's client
//! certificate from the build's `secrets/<cluster>-pki/`; the same call without the client
//! certificate fails, and a TLS client shows that the member refused it in the handshake
//! (etcdctl alone cannot tell that from an unreachable endpoint).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kiln::arch::Arch;
use kiln::qemu::{Disk, Net, Vm, VmSpec};
use kiln_qemu_tests::lan::Lan;
use kiln_qemu_tests::tls::{self, Outcome};
use kiln_qemu_tests::{build_once, flash_grown, free_port, wait_ready, work_dir};

/// Four VMs boot at once on two host cores under TCG, and a member's `[kiln] ready` also waits
/// for the group's quorum, i.e. for the slowest of three boots.
const GROUP_TIMEOUT: Duration = Duration::from_secs(900);
/// The disk each VM gets: a copy of the image, grown so first boot makes the data partition.
const DISK_SIZE: u64 = 1 << 30;
const MEMBERS: [(&str, &str, &str); 3] = [
    ("etcd-1", "52:54:00:e7:00:01", "10.0.0.11"),
    ("etcd-2", "52:54:00:e7:00:02", "10.0.0.12"),
    ("etcd-3", "52:54:00:e7:00:03", "10.0.0.13"),
];
const STRANGER_MAC: &str = "52:54:00:e7:00:99";

fn group_image() -> Result<&'static Path> {
    static OUT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    build_once(&OUT, "qemu-tests/profiles/etcd-group.yaml", "etcd-group-build")
}

fn single_image() -> Result<&'static Path> {
    static OUT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    build_once(&OUT, "qemu-tests/profiles/etcd-single.yaml", "etcd-single-build")
}

/// A private copy of the image, grown to `DISK_SIZE` (booted without snapshot: data persists).
fn disk_for(image: &Path, arch: Arch, dir: &Path, name: &str) -> Result<PathBuf> {
    let disk = dir.join(format!("{name}.img"));
    flash_grown(&image.join(arch.name()).join("disk.img"), &disk, DISK_SIZE)?;
    Ok(disk)
}

fn start(spec: VmSpec, disk: &Path, log: &Path) -> Result<Vm> {
    let spec = VmSpec { disks: vec![Disk { path: disk.to_path_buf(), snapshot: false }], memory_mib: 768, cpus: 1, ..spec };
    Vm::start(&spec, log)
}

fn kiln_lines(console: &str) -> String {
    console.lines().filter(|l| l.contains("[kiln] identity:") || l.contains("[kiln] etcd:")).collect::<Vec<_>>().join("\n")
}

/// The operator's TLS files from a build's `secrets/<cluster>-pki/` (`kiln secrets` prints them).
struct ClientTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl ClientTls {
    fn of(image: &Path, cluster: &str) -> Result<ClientTls> {
        let dir = image.join("secrets").join(format!("{cluster}-pki"));
        let tls = ClientTls { ca: dir.join("ca.crt"), cert: dir.join("etcdctl.crt"), key: dir.join("etcdctl.key") };
        for f in [&tls.ca, &tls.cert, &tls.key] {
            ensure!(f.is_file(), "the build left no {}", f.display());
        }
        Ok(tls)
    }

    /// `etcdctl` flags: the CA, and the client certificate unless `with_cert` is false.
    fn flags(&self, with_cert: bool) -> Vec<String> {
        let mut v = vec![format!("--cacert={}", self.ca.display())];
        if with_cert {
            v.push(format!("--cert={}", self.cert.display()));
            v.push(format!("--key={}", self.key.display()));
        }
        v
    }
}

/// Runs Debian's `etcdctl` (API v3) with the operator's certificate against `endpoints`, through
/// `via` (the LAN's namespace) or on the host; returns stdout, or the error with stderr.
fn etcdctl(via: Option<&Lan>, tls: &ClientTls, endpoints: &[String], args: &[&str]) -> Result<String> {
    etcdctl_tls(via, tls, endpoints, true, args)
}

fn etcdctl_tls(via: Option<&Lan>, tls: &ClientTls, endpoints: &[String], with_cert: bool, args: &[&str]) -> Result<String> {
    let mut cmd = match via {
        Some(lan) => lan.command("etcdctl"),
        None => Command::new("etcdctl"),
    };
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .args(tls.flags(with_cert))
        .args(["--dial-timeout=5s", "--command-timeout=15s"])
        .args(args);
    let out = cmd.output().context("running etcdctl: install Debian's `etcd-client` (.ci/install-host-deps does)")?;
    if !out.status.success() {
        bail!("etcdctl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Retries `etcdctl` until it succeeds and `ok` accepts the output (a member that just printed
/// `ready` may still be catching up on the raft log).
fn etcdctl_until(via: Option<&Lan>, tls: &ClientTls, endpoints: &[String], args: &[&str], ok: impl Fn(&str) -> bool) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let last = etcdctl(via, tls, endpoints, args);
        match &last {
            Ok(out) if ok(out) => return Ok(out.clone()),
            _ if Instant::now() > deadline => bail!("etcdctl {} never gave the expected answer; last: {last:?}", args.join(" ")),
            _ => std::thread::sleep(Duration::from_secs(2)),
        }
    }
}

/// `member list` as (name, id hex, started) triples, from etcdctl's simple output
/// `ID, started, NAME, PEER_URLS, CLIENT_URLS, IS_LEARNER`.
fn members(list: &str) -> Vec<(String, String, bool)> {
    list.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(", ").collect();
            (f.len() >= 3).then(|| (f[2].to_string(), f[0].to_string(), f[1] == "started"))
        })
        .collect()
}

fn url(ip: &str) -> String {
    format!("https://{ip}:2379")
}

/// Without a client certificate the member at `addr` refuses the same `etcdctl` call, in the TLS
/// handshake: etcdctl fails, and a TLS client with the same CA gets the member's alert, while with
/// the operator's certificate it gets `/health` answered from the same address (so the refusal is
/// no timeout or unreachable port).
fn refused_without_client_cert(
    via: Option<&Lan>,
    tls: &ClientTls,
    endpoint: &str,
    addr: std::net::SocketAddr,
    server_name: &str,
) -> Result<()> {
    let started = Instant::now();
    let denied = etcdctl_tls(via, tls, &[endpoint.to_string()], false, &["get", "kiln/before", "--print-value-only"]);
    ensure!(denied.is_err(), "etcdctl without a client certificate was served: {denied:?}");
    eprintln!("etcdctl without a client certificate failed after {:.1} s: {:#}", started.elapsed().as_secs_f64(), denied.unwrap_err());
    match tls::get(via, addr, server_name, &tls.ca, None, "/health")? {
        Outcome::Tls(rustls::Error::AlertReceived(
            a @ (rustls::AlertDescription::BadCertificate | rustls::AlertDescription::CertificateRequired),
        )) => {
            eprintln!("{endpoint} without a client certificate: TLS alert {a:?}");
        }
        other => {
            bail!("{endpoint} without a client certificate: expected the member's TLS alert (bad or required certificate), got {other:?}")
        }
    }
    match tls::get(via, addr, server_name, &tls.ca, Some((&tls.cert, &tls.key)), "/health")? {
        Outcome::Answered(a) if a.contains(r#""health":"true""#) => Ok(()),
        other => bail!("{endpoint} with the operator's certificate: expected a healthy /health, got {other:?}"),
    }
}

#[test]
fn x86_64_etcd_group_forms_keeps_quorum_and_a_member_rejoins() -> Result<()> {
    let arch = Arch::X86_64;
    let image = group_image()?;
    let tls = ClientTls::of(image, "etcdlab")?;
    let dir = work_dir("etcd-group")?;
    let lan = Lan::new("etcd", "10.0.0.1/24", MEMBERS.len() + 1)?;
    let spec = |i: usize, mac: &str| VmSpec {
        net: Net::Tap { netns: lan.namespace().to_string(), ifname: Lan::tap(i) },
        mac: Some(mac.to_string()),
        ..VmSpec::new(arch)
    };

    // Power on all four at once: the three members and a machine the inventory does not know.
    let mut disks = Vec::new();
    let mut vms = Vec::new();
    for (i, (name, mac, _)) in MEMBERS.iter().enumerate() {
        let disk = disk_for(image, arch, &dir, name)?;
        vms.push(start(spec(i, mac), &disk, &dir.join(format!("{name}-boot1.log")))?);
        disks.push(disk);
    }
    let stranger_disk = disk_for(image, arch, &dir, "stranger")?;
    let mut stranger = start(spec(MEMBERS.len(), STRANGER_MAC), &stranger_disk, &dir.join("stranger.log"))?;

    for (vm, (name, _, _)) in vms.iter_mut().zip(MEMBERS) {
        let ready = wait_ready(vm, name, GROUP_TIMEOUT)?;
        ensure!(ready.contains(&format!("host={name} ")), "{name}: {ready}");
        let console = vm.console();
        for want in [
            format!("[kiln] identity: node={name} roles=etcd by=mac"),
            format!("[kiln] etcd: starting member {name}, joining the initial cluster"),
            format!("[kiln] etcd: etcd member {name}: member healthy, cluster has quorum"),
        ] {
            ensure!(console.contains(&want), "{name}: console lacks `{want}`:\n{}", kiln_lines(&console));
        }
    }

    // (c) The unknown machine: default role `none`, host name from its MAC, nothing to wait for.
    let ready = wait_ready(&mut stranger, "stranger", GROUP_TIMEOUT)?;
    let derived = format!("etcdlab-{}", STRANGER_MAC.replace(':', ""));
    let console = stranger.console();
    ensure!(
        console.contains(&format!("[kiln] identity: node={derived} roles=none by=default")),
        "stranger: console lacks its default identity:\n{}",
        kiln_lines(&console)
    );
    ensure!(ready.contains(&format!("host={derived} ")), "stranger: {ready}");
    ensure!(console.contains("[kiln] etcd: not started: this node has no etcd role"), "stranger:\n{}", kiln_lines(&console));
    stranger.kill();

    // (a) Seen from the LAN's host side: three started members with the inventory's names, all healthy.
    let all: Vec<String> = MEMBERS.iter().map(|(_, _, ip)| url(ip)).collect();
    let list = etcdctl(Some(&lan), &tls, &all, &["member", "list"])?;
    let before = members(&list);
    let mut names: Vec<&str> = before.iter().map(|(n, _, _)| n.as_str()).collect();
    names.sort();
    ensure!(names == ["etcd-1", "etcd-2", "etcd-3"] && before.iter().all(|m| m.2), "member list:\n{list}");
    // Exits non-zero if any endpoint is unhealthy.
    etcdctl(Some(&lan), &tls, &all, &["endpoint", "health"]).context("endpoint health of the three members")?;
    etcdctl(Some(&lan), &tls, &all, &["put", "kiln/before", "written with three members"])?;
    // Mutual TLS: no client certificate, no answer (checked at one member; all share the settings).
    let (_, _, ip1) = MEMBERS[0];
    refused_without_client_cert(Some(&lan), &tls, &url(ip1), format!("{ip1}:2379").parse()?, ip1)?;

    // (b) Lose etcd-3: the remaining two still have quorum and accept writes.
    let (lost, _, lost_ip) = MEMBERS[2];
    vms[2].kill();
    let survivors: Vec<String> = MEMBERS[..2].iter().map(|(_, _, ip)| url(ip)).collect();
    // If etcd-3 was the leader, the two elect a new one first: the write may need a retry.
    etcdctl_until(Some(&lan), &tls, &survivors, &["put", "kiln/during", "written while etcd-3 was down"], |_| true)?;
    let got = etcdctl(Some(&lan), &tls, &survivors, &["get", "kiln/during", "--print-value-only"])?;
    ensure!(got.trim() == "written while etcd-3 was down", "linearizable read from the survivors: {got:?}");

    // Power it on again from the same disk: it restarts from its data directory as the same member.
    let mut vm = start(spec(2, MEMBERS[2].1), &disks[2], &dir.join(format!("{lost}-boot2.log")))?;
    wait_ready(&mut vm, &format!("{lost} (second boot)"), GROUP_TIMEOUT)?;
    let console = vm.console();
    ensure!(
        console.contains(&format!("[kiln] etcd: starting member {lost}, rejoining with its data")),
        "{lost}: second boot did not find its data:\n{}",
        kiln_lines(&console)
    );
    vms[2] = vm;
    let list = etcdctl(Some(&lan), &tls, &all, &["member", "list"])?;
    let after = members(&list);
    ensure!(after.len() == 3 && after.iter().all(|m| m.2), "member list after the rejoin:\n{list}");
    let id = |ms: &[(String, String, bool)]| ms.iter().find(|m| m.0 == lost).map(|m| m.1.clone());
    ensure!(id(&before).is_some() && id(&before) == id(&after), "{lost} came back as another member:\n{list}");
    // A serializable read is answered from the member's own copy: it has caught up on what it missed.
    let own = vec![url(lost_ip)];
    for (key, want) in [("kiln/before", "written with three members"), ("kiln/during", "written while etcd-3 was down")] {
        etcdctl_until(Some(&lan), &tls, &own, &["get", key, "--print-value-only", "--consistency=s"], |v| v.trim() == want)?;
    }
    for vm in &mut vms {
        vm.kill();
    }
    for d in disks.iter().chain([&stranger_disk]) {
        let _ = std::fs::remove_file(d);
    }
    Ok(())
}

/// (d) One member on its own: ready only once etcd answers healthy; reachable and writable.
fn single_member(arch: Arch) -> Result<()> {
    let image = single_image()?;
    let tls = ClientTls::of(image, "etcdsolo")?;
    let dir = work_dir(&format!("etcd-single-{arch}"))?;
    let port = free_port()?;
    let disk = disk_for(image, arch, &dir, "etcd-solo")?;
    let spec = VmSpec {
        net: Net::User { hostfwd: vec![format!("tcp:127.0.0.1:{port}-:2379")] },
        mac: Some("52:54:00:e7:00:21".into()),
        ..VmSpec::new(arch)
    };
    let mut vm = start(spec, &disk, &dir.join("console.log"))?;
    wait_ready(&mut vm, &format!("{arch} etcd-solo"), GROUP_TIMEOUT)?;
    let console = vm.console();
    ensure!(
        console.contains("[kiln] etcd: etcd member etcd-solo: member healthy, cluster has quorum"),
        "{arch}: console:\n{}",
        kiln_lines(&console)
    );
    // Through the forwarded port the member is 127.0.0.1, one of the names in its certificate.
    let endpoint = vec![format!("https://127.0.0.1:{port}")];
    let list = etcdctl(None, &tls, &endpoint, &["member", "list"])?;
    let m = members(&list);
    ensure!(m.len() == 1 && m[0].0 == "etcd-solo" && m[0].2, "{arch}: member list:\n{list}");
    etcdctl(None, &tls, &endpoint, &["put", "kiln/arch", arch.name()])?;
    let got = etcdctl(None, &tls, &endpoint, &["get", "kiln/arch", "--print-value-only"])?;
    ensure!(got.trim() == arch.name(), "{arch}: read back {got:?}");
    refused_without_client_cert(None, &tls, &endpoint[0], format!("127.0.0.1:{port}").parse()?, "127.0.0.1")?;
    vm.kill();
    let _ = std::fs::remove_file(&disk);
    Ok(())
}

#[test]
fn aarch64_single_member_etcd_serves_reads_and_writes() -> Result<()> {
    single_member(Arch::Aarch64)
}

#[test]
fn riscv64_single_member_etcd_serves_reads_and_writes() -> Result<()> {
    single_member(Arch::Riscv64)
}
