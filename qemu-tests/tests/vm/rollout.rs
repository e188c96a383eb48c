//! Slow tier, the cluster rollout (issue 16, docs/updates.md "Rollout"): three etcd members on a
//! private LAN (`lan.rs`), installed from one v1 image (`qemu-tests/profiles/rollout-etcd.yaml`),
//! updated by `kiln serve --rollout` running on the LAN's host side while a loop on the host
//! writes to etcd every second.
//! (a) v2: the server hands the update to one member at a time (the next only when the previous
//!     one is back on v2 and ready, and every other member reported ready recently), each member
//!     applies it, boots slot B on trial and reports ready; all three end on v2 with their data,
//!     and no write of the loop failed: quorum was never lost.
//! (b) v3, whose boot step fails: the first member applies it, its trial fails, it rolls back to
//!     v2 by itself and reports so; the server halts, and the other two are never updated.
//! Reports are signed with each node's own key (the server refuses forged ones: fast tier).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kiln::arch::Arch;
use kiln::qemu::{Disk, Net, Vm, VmSpec};
use kiln_qemu_tests::lan::Lan;
use kiln_qemu_tests::{cache_dir, flash_grown, kiln_bin, kiln_with_cache, repo_root, wait_ready, work_dir};

const PROFILE: &str = "qemu-tests/profiles/rollout-etcd.yaml";
const PLACEHOLDER_KEY: &str = "RWRpO/OP8xTqM96NbbUrc16SWUXPnFWMnPeeVf1D9qkxxDtvUZaKSRTn";
/// The profile's `update.server`, inside the test's namespace.
const LISTEN: &str = "10.0.0.1:8080";
const MEMBERS: [(&str, &str, &str); 3] = [
    ("etcd-1", "52:54:00:e8:00:01", "10.0.0.11"),
    ("etcd-2", "52:54:00:e8:00:02", "10.0.0.12"),
    ("etcd-3", "52:54:00:e8:00:03", "10.0.0.13"),
];
/// Three VMs boot at once on two cores under TCG; a member is ready only with quorum.
const GROUP_TIMEOUT: Duration = Duration::from_secs(900);
/// One member's turn: poll, fetch and write ~120 MiB, reboot, trial boot, rejoin.
const TURN_TIMEOUT: Duration = Duration::from_secs(900);
const DISK_SIZE: u64 = 2 << 30;

/// `kiln serve OUT --rollout` inside the LAN's namespace; its log lines are kept; killed on drop.
struct RolloutServer {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl RolloutServer {
    fn start(lan: &Lan, out: &Path) -> Result<RolloutServer> {
        let mut child = lan
            .command(kiln_bin()?.to_str().context("non-UTF-8 path")?)
            .args(["serve", out.to_str().context("non-UTF-8 dir")?, "--listen", LISTEN, "--rollout", "--poll", "5"])
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kiln serve --rollout")?;
        let err = child.stderr.take().context("kiln serve's stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("serve: {line}");
                keep.lock().unwrap().push(line);
            }
        });
        Ok(RolloutServer { child, log })
    }

    /// The `rollout:` lines so far (the transitions), without the log's time and level.
    fn transitions(&self) -> Vec<String> {
        let log = self.log.lock().unwrap();
        log.iter().filter_map(|l| l.find("rollout: ").map(|i| l[i..].to_string())).collect()
    }

    /// Waits for a log line containing `needle` (the server's log is the test's view of it).
    fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return Ok(l.clone());
            }
            ensure!(Instant::now() < deadline, "kiln serve never logged `{needle}`; its rollout lines:\n{}", self.transitions().join("\n"));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for RolloutServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `kiln/tick = N` every second through etcdctl on the LAN's host side. A write goes to one
/// member at a time (5 s each, starting with a different member each second) until one accepts
/// it, as a client of a group does: a member that is shutting down for its reboot may take a
/// request and never answer it. A write fails when no member accepts it: what losing quorum
/// looks like to a client. Writes that needed a second member are counted too.
struct WriteLoop {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    retried: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WriteLoop {
    fn start(lan: &Lan, tls: &[String]) -> WriteLoop {
        let (stop, writes, retried) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let endpoints: Vec<String> = MEMBERS.iter().map(|(_, _, ip)| format!("https://{ip}:2379")).collect();
        let ns = lan.namespace().to_string();
        let tls = tls.to_vec();
        let (s, w, r, f) = (stop.clone(), writes.clone(), retried.clone(), failures.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                let started = Instant::now();
                n += 1;
                let mut errors = Vec::new();
                for i in 0..endpoints.len() {
                    let endpoint = &endpoints[(n as usize + i) % endpoints.len()];
                    let out = std::process::Command::new("ip")
                        .args(["netns", "exec", &ns, "etcdctl"])
                        .env("ETCDCTL_API", "3")
                        .arg(format!("--endpoints={endpoint}"))
                        .args(&tls)
                        .args(["--dial-timeout=5s", "--command-timeout=5s", "put", "kiln/tick", &n.to_string()])
                        .output();
                    match out {
                        Ok(o) if o.status.success() => break,
                        Ok(o) => errors.push(format!("{endpoint}: {}", String::from_utf8_lossy(&o.stderr).trim())),
                        Err(e) => errors.push(format!("{endpoint}: running etcdctl: {e}")),
                    }
                }
                if errors.len() == endpoints.len() {
                    f.lock().unwrap().push(format!("write {n}: no member accepted it:\n{}", errors.join("\n")));
                } else {
                    w.fetch_add(1, Ordering::Relaxed);
                    if !errors.is_empty() {
                        r.fetch_add(1, Ordering::Relaxed);
                        eprintln!("rollout: write {n} went to another member after {}", errors.join("; "));
                    }
                }
                // One write a second: the next starts a second after this one started.
                if let Some(rest) = Duration::from_secs(1).checked_sub(started.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
        });
        WriteLoop { stop, writes, retried, failures, thread: Some(thread) }
    }

    /// Stops the loop; returns (accepted writes, of those the ones a second member took, failures).
    fn finish(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (self.writes.load(Ordering::Relaxed), self.retried.load(Ordering::Relaxed), self.failures.lock().unwrap().clone())
    }
}

fn build(dir: &Path, name: &str, text: &str, formats: &str, key: &Path, out: &Path) -> Result<()> {
    let profile = dir.join(format!("{name}.yaml"));
    std::fs::write(&profile, text)?;
    let started = Instant::now();
    let s = |p: &Path| p.to_str().map(String::from).context("non-UTF-8 dir");
    let (code, log) =
        kiln_with_cache(&cache_dir()?, &["build", &s(&profile)?, "--format", formats, "--signing-key", &s(key)?, "--out", &s(out)?])?;
    ensure!(code == 0, "kiln build {name} ({formats}) failed (exit {code}):\n{log}");
    eprintln!("rollout: {name} build ({formats}): {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `etcdctl` flags with the operator's TLS files from the build's `secrets/<cluster>-pki/`.
fn tls_flags(out: &Path) -> Result<Vec<String>> {
    let dir = out.join("secrets").join("rolllab-pki");
    let files = [("cacert", "ca.crt"), ("cert", "etcdctl.crt"), ("key", "etcdctl.key")];
    files
        .iter()
        .map(|(flag, f)| {
            let p = dir.join(f);
            ensure!(p.is_file(), "the build left no {}", p.display());
            Ok(format!("--{flag}={}", p.display()))
        })
        .collect()
}

fn etcdctl(lan: &Lan, tls: &[String], args: &[&str]) -> Result<String> {
    let endpoints = MEMBERS.iter().map(|(_, _, ip)| format!("https://{ip}:2379")).collect::<Vec<_>>().join(",");
    let out = lan
        .command("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .args(tls)
        .args(["--dial-timeout=5s", "--command-timeout=15s"])
        .args(args)
        .output()
        .context("running etcdctl: install Debian's `etcd-client`")?;
    ensure!(out.status.success(), "etcdctl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Member names and IDs from `member list` (`ID, started, NAME, ...`).
fn member_ids(list: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = list
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(", ").collect();
            (f.len() >= 3 && f[1] == "started").then(|| (f[2].to_string(), f[0].to_string()))
        })
        .collect();
    v.sort();
    v
}

/// The rollout's `status` JSON, fetched inside the namespace.
fn status(lan: &Lan) -> Result<serde_json::Value> {
    let out = lan.command("curl").args(["-sf", &format!("http://{LISTEN}/rollout/status")]).output().context("running curl")?;
    ensure!(out.status.success(), "GET /rollout/status failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).context("/rollout/status is not JSON")
}

fn node_versions(status: &serde_json::Value) -> Vec<(String, String, String)> {
    status["nodes"]
        .as_array()
        .map(|ns| {
            ns.iter()
                .map(|n| {
                    let s = |k: &str| n[k].as_str().unwrap_or("-").to_string();
                    (s("name"), s("version"), s("phase"))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn x86_64_rollout_keeps_etcd_quorum_and_halts_on_a_bad_update() -> Result<()> {
    let arch = Arch::X86_64;
    let dir = work_dir("rollout")?;
    let s = |p: &Path| p.to_str().map(String::from).context("non-UTF-8 dir");
    let (code, log) = kiln_with_cache(&cache_dir()?, &["keygen", "--out", &s(&dir)?, "--name", "site"])?;
    ensure!(code == 0, "kiln keygen failed (exit {code}):\n{log}");
    let key = dir.join("site.key");
    let public = log.lines().rev().find(|l| l.starts_with("RW")).context("kiln keygen printed no public key line")?.trim().to_string();
    let text = std::fs::read_to_string(repo_root().join(PROFILE))?;
    ensure!(text.contains(PLACEHOLDER_KEY), "{PROFILE} lacks the placeholder key");
    let v1 = text.replace(PLACEHOLDER_KEY, &public);
    let v2 = v1.replace("version: 1.0.0", "version: 2.0.0").replace("content: \"v1\"", "content: \"v2\"");
    let v3 = v2.replace("version: 2.0.0", "version: 3.0.0").replace(
        "boot_scripts:\n",
        "boot_scripts:\n  - name: broken\n    script: |\n      kiln_log broken \"this version fails on purpose\"\n      false\n",
    );
    ensure!(v1 != v2 && v2 != v3 && v3.contains("name: broken"), "the profile's placeholders changed");

    // One output directory, as an operator keeps it: its secrets/ (cluster PKI, rollout key)
    // carry over from v1's build to the bundles'.
    let out = dir.join("out");
    build(&dir, "v1", &v1, "disk", &key, &out)?;
    let mut disks = Vec::new();
    for (name, _, _) in MEMBERS {
        let disk = dir.join(format!("{name}.img"));
        flash_grown(&out.join(arch.name()).join("disk.img"), &disk, DISK_SIZE)?;
        disks.push(disk);
    }
    build(&dir, "v2", &v2, "update", &key, &out)?;
    let manifest = std::fs::read_to_string(out.join(arch.name()).join("update/update.txt"))?;
    for want in ["\nversion 2.0.0\n", "\nnode etcd-1 etcd\n", "\nkeep etc/kiln/nodes/etcd-1/update/report.key\n"] {
        ensure!(manifest.contains(want), "update.txt lacks `{}`:\n{manifest}", want.trim());
    }
    let tls = tls_flags(&out)?;

    let lan = Lan::new("rollout", "10.0.0.1/24", MEMBERS.len())?;
    let mut vms = Vec::new();
    for (i, ((name, mac, _), disk)) in MEMBERS.iter().zip(&disks).enumerate() {
        let spec = VmSpec {
            net: Net::Tap { netns: lan.namespace().to_string(), ifname: Lan::tap(i) },
            mac: Some(mac.to_string()),
            disks: vec![Disk { path: disk.clone(), snapshot: false }],
            memory_mib: 768,
            cpus: 1,
            ..VmSpec::new(arch)
        };
        vms.push(Vm::start(&spec, &dir.join(format!("{name}.log")))?);
    }
    for (vm, (name, _, _)) in vms.iter_mut().zip(MEMBERS) {
        vm.wait_for("[kiln] rollout-test: version=v1", GROUP_TIMEOUT)?;
        wait_ready(vm, &format!("{name} v1"), GROUP_TIMEOUT)?;
    }
    etcdctl(&lan, &tls, &["put", "kiln/before", "written on v1"])?;
    let ids_before = member_ids(&etcdctl(&lan, &tls, &["member", "list"])?);
    ensure!(ids_before.len() == 3, "member list on v1: {ids_before:?}");

    // (a) v2, one member at a time, while the host writes every second.
    let writes = WriteLoop::start(&lan, &tls);
    let started = Instant::now();
    let server = RolloutServer::start(&lan, &out)?;
    for (vm, (name, _, _)) in vms.iter_mut().zip(MEMBERS) {
        vm.wait_for("[kiln] update: slot b holds version 2.0.0", TURN_TIMEOUT).with_context(|| format!("{name} applying v2"))?;
        vm.wait_for("[kiln] update: trial boot of slot b (version 2.0.0)", TURN_TIMEOUT)?;
        vm.wait_for("[kiln] rollout-test: version=v2", TURN_TIMEOUT)?;
        wait_ready(vm, &format!("{name} v2 (trial)"), TURN_TIMEOUT)?;
        vm.wait_for("[kiln] update: slot b good (version 2.0.0)", TURN_TIMEOUT)?;
    }
    server.wait_for("rollout: done", TURN_TIMEOUT)?;
    let rollout_secs = started.elapsed().as_secs_f64();
    let (ok, retried, failed) = writes.finish();
    eprintln!(
        "rollout: 3 members on v2 in {rollout_secs:.0} s; {ok} writes accepted ({retried} by a second member), {} failed",
        failed.len()
    );
    ensure!(failed.is_empty(), "writes failed during the rollout (quorum lost?):\n{}", failed.join("\n"));
    ensure!(ok as f64 >= rollout_secs * 0.5, "only {ok} writes in {rollout_secs:.0} s: the loop did not run");

    // One at a time: each member was told only after the one before it was done (in the order
    // their reports came: a member that is down holds no one else back), each member once.
    let steps: Vec<(String, &str)> = server
        .transitions()
        .into_iter()
        .filter_map(|l| {
            let node = l.split(':').nth(1)?.trim().to_string();
            if l.contains(": told to update") {
                Some((node, "told"))
            } else if l.contains(": done, on") {
                Some((node, "done"))
            } else {
                None
            }
        })
        .collect();
    let alternates = steps.chunks(2).all(|p| p.len() == 2 && p[0].1 == "told" && p[1].1 == "done" && p[0].0 == p[1].0);
    let mut order: Vec<&str> = steps.iter().step_by(2).map(|(n, _)| n.as_str()).collect();
    eprintln!("rollout: order {order:?}");
    order.sort();
    ensure!(alternates && order == ["etcd-1", "etcd-2", "etcd-3"], "the rollout's steps: {steps:?}");
    let st = status(&lan)?;
    ensure!(st["state"] == "done", "status: {st}");
    for (name, version, phase) in node_versions(&st) {
        ensure!(version == "2.0.0" && phase == "done", "status of {name}: {version} {phase}: {st}");
    }
    // Same members (each kept its data directory and keys across the update), data intact.
    let ids_after = member_ids(&etcdctl(&lan, &tls, &["member", "list"])?);
    ensure!(ids_after == ids_before, "members changed: {ids_before:?} -> {ids_after:?}");
    let got = etcdctl(&lan, &tls, &["get", "kiln/before", "--print-value-only"])?;
    ensure!(got.trim() == "written on v1", "kiln/before after the rollout: {got:?}");
    drop(server);

    // (b) v3 fails its trial on the first member told (whichever reports first while the others
    // are fresh); the rollout stops there.
    build(&dir, "v3", &v3, "update", &key, &out)?;
    let server = RolloutServer::start(&lan, &out)?;
    let told = server.wait_for("told to update 2.0.0 -> 3.0.0", TURN_TIMEOUT)?;
    let first = MEMBERS.iter().position(|(n, _, _)| told.contains(&format!("rollout: {n}: told"))).context(told.clone())?;
    let name = MEMBERS[first].0;
    let vm = &mut vms[first];
    vm.wait_for("[kiln] update: slot a holds version 3.0.0", TURN_TIMEOUT)?;
    vm.wait_for("[kiln] update: trial boot of slot a (version 3.0.0)", TURN_TIMEOUT)?;
    vm.wait_for("[kiln] error: boot step site-broken failed", TURN_TIMEOUT)?;
    vm.wait_for("[kiln] update: rolled back from 3.0.0 to 2.0.0: boot step(s) failed: site-broken", TURN_TIMEOUT)?;
    wait_ready(vm, &format!("{name} back on v2"), TURN_TIMEOUT)?;
    let halted = server.wait_for("rollout: halted", TURN_TIMEOUT)?;
    ensure!(halted.contains(name), "the halt names another node than {name}: {halted}");
    // The others hear the halt on their next poll, and never touch their slots.
    for (i, (vm, (other, _, _))) in vms.iter_mut().zip(MEMBERS).enumerate().filter(|(i, _)| *i != first) {
        vm.wait_for("[kiln] update: rollout: the rollout to 3.0.0 is halted", TURN_TIMEOUT)
            .with_context(|| format!("{other} (member {i}) hearing the halt"))?;
        ensure!(!vm.console().contains("version 3.0.0"), "{other} was given v3:\n{}", vm.console());
    }
    let st = status(&lan)?;
    ensure!(st["state"] == "halted", "status: {st}");
    let versions = node_versions(&st);
    ensure!(versions.iter().all(|(_, v, _)| v == "2.0.0"), "versions after the halt: {versions:?}");
    let got = etcdctl(&lan, &tls, &["get", "kiln/tick", "--print-value-only"])?;
    ensure!(!got.trim().is_empty(), "the group answers after the halt");
    for vm in &mut vms {
        vm.kill();
    }
    for d in &disks {
        let _ = std::fs::remove_file(d);
    }
    Ok(())
}
