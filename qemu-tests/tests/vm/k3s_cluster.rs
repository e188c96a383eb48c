//! Slow tier, k3s clusters from one image (issue 4's k3s scenarios), x86_64. These need the real
//! k3s release assets, which cannot be downloaded on kiln's test machines: they run when
//! `KILN_K3S_ASSETS` names a directory holding `k3s`, `k3s-airgap-images-amd64.tar.zst` and
//! `sha256sum-amd64.txt` of the release `KILN_K3S_VERSION` (default `v1.33.5+k3s1`), and
//! otherwise report `skipped: KILN_K3S_ASSETS not set` (nothing here fakes k3s).
//!
//! - a single server (SQLite) reaches `[kiln] ready` (which waits for its node to be Ready), its
//!   CoreDNS pod runs from the air-gap images, and a pod made from the bundled busybox image runs
//!   with no registry reachable;
//! - three servers with embedded etcd form one cluster of three Ready control-plane nodes;
//! - the external-etcd layout: three nodes run etcd and a k3s server each, an agent joins through
//!   the fixed registration address; four Ready nodes.
//!
//! VMs on the LAN are reached with ssh from inside its namespace; the test profiles let the `ops`
//! user read the kubeconfig (`write-kubeconfig-mode: 0644`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kiln::arch::Arch;
use kiln::qemu::{Disk, Net, Vm, VmSpec};
use kiln_qemu_tests::lan::Lan;
use kiln_qemu_tests::{build_with_test_key, flash_grown, free_port, skip, ssh_at, ssh_at_until_ok, wait_ready, work_dir, KeyedBuild};

/// k3s under TCG is slow: a server's first start unpacks its userspace, imports the air-gap
/// images and starts the control plane on an emulated CPU.
const K3S_TIMEOUT: Duration = Duration::from_secs(1800);
const DISK_SIZE: u64 = 4 << 30;
const PROFILE_VERSION: &str = "    version: v1.33.5+k3s1";

/// The assets directory, `None` when the variable is unset (the tests skip); a variable naming
/// something that is not a directory is an error, not a skip.
fn assets() -> Result<Option<PathBuf>> {
    let Some(dir) = std::env::var_os("KILN_K3S_ASSETS") else { return Ok(None) };
    let dir = std::fs::canonicalize(&dir).with_context(|| format!("KILN_K3S_ASSETS={}", Path::new(&dir).display()))?;
    ensure!(dir.is_dir(), "KILN_K3S_ASSETS={} is not a directory of k3s release assets", dir.display());
    Ok(Some(dir))
}

/// Builds a k3s test profile with the assets and version of this run and a run-time SSH key.
fn build(cell: &'static OnceLock<Result<KeyedBuild, String>>, profile: &str, assets: &Path) -> Result<&'static KeyedBuild> {
    let name = Path::new(profile).file_stem().and_then(|s| s.to_str()).context("profile name")?;
    let dir = work_dir(&format!("{name}-profile"))?;
    let version = std::env::var("KILN_K3S_VERSION").unwrap_or_else(|_| "v1.33.5+k3s1".into());
    let text = std::fs::read_to_string(kiln_qemu_tests::repo_root().join(profile))?;
    ensure!(text.contains(PROFILE_VERSION), "{profile} lacks `{PROFILE_VERSION}`");
    let text = text.replace(PROFILE_VERSION, &format!("    version: {version}\n    source: {:?}", assets.display().to_string()));
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text)?;
    build_with_test_key(cell, path.to_str().context("non-UTF-8 work dir")?, &format!("{name}-build"))
}

fn disk_for(out: &Path, dir: &Path, name: &str) -> Result<PathBuf> {
    let disk = dir.join(format!("{name}.img"));
    flash_grown(&out.join("x86_64").join("disk.img"), &disk, DISK_SIZE)?;
    Ok(disk)
}

fn start(net: Net, mac: &str, disk: &Path, log: &Path) -> Result<Vm> {
    let spec = VmSpec {
        disks: vec![Disk { path: disk.to_path_buf(), snapshot: false }],
        memory_mib: 2048,
        cpus: 2,
        net,
        mac: Some(mac.into()),
        ..VmSpec::new(Arch::X86_64)
    };
    Vm::start(&spec, log)
}

/// Runs `kubectl` on a node over ssh until `ok` accepts the output.
fn kubectl_until(via: Option<&Lan>, key: &Path, host: &str, port: u16, args: &str, ok: impl Fn(&str) -> bool) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (_, out) = ssh_at(via, key, host, port, "ops", &format!("/usr/local/bin/k3s kubectl {args}"))?;
        if ok(&out) {
            return Ok(out);
        }
        if Instant::now() > deadline {
            bail!("`k3s kubectl {args}` on {host} never gave the expected answer; last:\n{out}");
        }
        std::thread::sleep(Duration::from_secs(5));
    }
}

/// `get nodes` lines as (name, status, roles).
fn nodes(table: &str) -> Vec<(String, String, String)> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3).then(|| (f[0].to_string(), f[1].to_string(), f[2].to_string()))
        })
        .collect()
}

fn all_ready(table: &str, names: &[&str]) -> bool {
    let n = nodes(table);
    n.len() == names.len() && names.iter().all(|want| n.iter().any(|(name, status, _)| name == want && status == "Ready"))
}

#[test]
fn x86_64_single_server_is_ready_and_runs_a_pod_from_the_air_gap_images() -> Result<()> {
    let Some(assets) = assets()? else {
        skip("KILN_K3S_ASSETS not set");
        return Ok(());
    };
    static BUILD: OnceLock<Result<KeyedBuild, String>> = OnceLock::new();
    let b = build(&BUILD, "qemu-tests/profiles/k3s-single.yaml", &assets)?;
    let dir = work_dir("k3s-single")?;
    let port = free_port()?;
    let disk = disk_for(&b.out, &dir, "server-1")?;
    let net = Net::User { hostfwd: vec![format!("tcp:127.0.0.1:{port}-:22")] };
    let mut vm = start(net, "52:54:00:3a:00:01", &disk, &dir.join("console.log"))?;
    wait_ready(&mut vm, "server-1", K3S_TIMEOUT)?;
    ensure!(vm.console().contains("[kiln] k3s: k3s server: node server-1 Ready"), "no readiness line for the server");
    ssh_at_until_ok(None, &b.key, "127.0.0.1", port, "ops", "true")?;
    kubectl_until(None, &b.key, "127.0.0.1", port, "get nodes", |t| all_ready(t, &["server-1"]))?;
    // No registry is reachable: running pods prove the air-gap images were imported.
    kubectl_until(
        None,
        &b.key,
        "127.0.0.1",
        port,
        "-n kube-system get pods -l k8s-app=kube-dns -o 'jsonpath={.items[*].status.phase}'",
        |t| t.trim() == "Running",
    )?;
    let images = kubectl_until(None, &b.key, "127.0.0.1", port, "get node server-1 -o 'jsonpath={.status.images[*].names}'", |t| {
        t.contains("busybox")
    })?;
    let busybox = images
        .split(|c: char| c == '"' || c == ',' || c == '[' || c == ']' || c.is_whitespace())
        .find(|n| n.contains("busybox") && n.contains(':') && !n.contains("@sha256"))
        .with_context(|| format!("no busybox image among the node's images: {images}"))?
        .to_string();
    let run =
        format!("run kiln-probe --image={busybox} --image-pull-policy=Never --restart=Never --command -- sh -c 'echo kiln-airgap-pod-ok'");
    let (ok, out) = ssh_at(None, &b.key, "127.0.0.1", port, "ops", &format!("/usr/local/bin/k3s kubectl {run}"))?;
    ensure!(ok, "kubectl {run}:\n{out}");
    kubectl_until(None, &b.key, "127.0.0.1", port, "get pod kiln-probe -o 'jsonpath={.status.phase}'", |t| t.trim() == "Succeeded")?;
    kubectl_until(None, &b.key, "127.0.0.1", port, "logs kiln-probe", |t| t.contains("kiln-airgap-pod-ok"))?;
    vm.kill();
    let _ = std::fs::remove_file(&disk);
    Ok(())
}

/// Boots every node of a LAN profile at once and waits until each is ready and `kubectl get
/// nodes` on the first server lists all of them Ready; returns that table.
fn lan_cluster(
    profile: &str,
    cell: &'static OnceLock<Result<KeyedBuild, String>>,
    nodes_: &[(&str, &str, &str)],
) -> Result<Option<String>> {
    let Some(assets) = assets()? else {
        skip("KILN_K3S_ASSETS not set");
        return Ok(None);
    };
    let b = build(cell, profile, &assets)?;
    let name = Path::new(profile).file_stem().and_then(|s| s.to_str()).unwrap_or("k3s");
    let dir = work_dir(name)?;
    let lan = Lan::new("k3s", "10.0.0.1/24", nodes_.len())?;
    let mut vms = Vec::new();
    for (i, (node, mac, _)) in nodes_.iter().enumerate() {
        let disk = disk_for(&b.out, &dir, node)?;
        let net = Net::Tap { netns: lan.namespace().to_string(), ifname: Lan::tap(i) };
        vms.push((start(net, mac, &disk, &dir.join(format!("{node}.log")))?, disk));
    }
    for ((vm, _), (node, _, _)) in vms.iter_mut().zip(nodes_) {
        wait_ready(vm, node, K3S_TIMEOUT)?;
    }
    let (_, _, first) = nodes_[0];
    ssh_at_until_ok(Some(&lan), &b.key, first, 22, "ops", "true")?;
    let names: Vec<&str> = nodes_.iter().map(|(n, _, _)| *n).collect();
    let table = kubectl_until(Some(&lan), &b.key, first, 22, "get nodes", |t| all_ready(t, &names))?;
    for (vm, disk) in &mut vms {
        vm.kill();
        let _ = std::fs::remove_file(disk);
    }
    Ok(Some(table))
}

#[test]
fn x86_64_three_servers_with_embedded_etcd_form_one_cluster() -> Result<()> {
    static BUILD: OnceLock<Result<KeyedBuild, String>> = OnceLock::new();
    let servers = [
        ("server-1", "52:54:00:3b:00:01", "10.0.0.11"),
        ("server-2", "52:54:00:3b:00:02", "10.0.0.12"),
        ("server-3", "52:54:00:3b:00:03", "10.0.0.13"),
    ];
    let Some(table) = lan_cluster("qemu-tests/profiles/k3s-embedded.yaml", &BUILD, &servers)? else { return Ok(()) };
    for (name, _, roles) in nodes(&table) {
        ensure!(roles.contains("control-plane") && roles.contains("etcd"), "{name} is not an etcd control-plane node:\n{table}");
    }
    Ok(())
}

#[test]
fn x86_64_external_etcd_layout_servers_on_the_etcd_nodes_and_an_agent() -> Result<()> {
    static BUILD: OnceLock<Result<KeyedBuild, String>> = OnceLock::new();
    let nodes_ = [
        ("node-1", "52:54:00:3c:00:01", "10.0.0.11"),
        ("node-2", "52:54:00:3c:00:02", "10.0.0.12"),
        ("node-3", "52:54:00:3c:00:03", "10.0.0.13"),
        ("agent-1", "52:54:00:3c:00:11", "10.0.0.21"),
    ];
    let Some(table) = lan_cluster("qemu-tests/profiles/k3s-external.yaml", &BUILD, &nodes_)? else { return Ok(()) };
    for (name, _, roles) in nodes(&table) {
        let server = name.starts_with("node-");
        // External datastore: servers are control-plane nodes without k3s's own etcd role.
        ensure!(roles.contains("control-plane") == server && !roles.contains("etcd"), "{name} has roles {roles}:\n{table}");
    }
    Ok(())
}
