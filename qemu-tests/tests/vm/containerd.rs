//! Slow tier: container appliances (`engine: containerd`) on x86_64 and aarch64, with no NIC.
//!
//! The test makes its own image: Debian's `busybox-static` for amd64 and arm64 (fetched and
//! verified through kiln's own Debian code, into the tier's cache), each package's data tar as
//! the one layer of that platform's image, under one OCI index. It pushes it to a real
//! `docker-registry` on 127.0.0.1 and builds a profile with two containers from it:
//!
//! - `hello` (restart: always): prints `kiln-container-hello-<uname -m> greeting=<env>
//!   boots=<n>`, where n counts lines in a file on a bind mount of `/var/lib/hello` (the data
//!   partition), then sleeps;
//! - `once` (restart: no): prints a line and exits with status 3.
//!
//! Each architecture boots with `Net::None` and 1 vCPU, both at once. The test waits for
//! hello's line on the console (prefixed `[hello] `), `once`'s exit line, and `[kiln] ready`
//! (printed only once hello's task is RUNNING). Then it boots the same disk again: the images
//! are not imported again, and hello runs again and counts the second boot.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use kiln::arch::Arch;
use kiln::qemu::{Disk, Net, Vm, VmSpec};
use kiln_qemu_tests::layout::{deb_data_tar, Layer, TestLayout};
use kiln_qemu_tests::registry::{push, Registry};
use kiln_qemu_tests::{cache_dir, kiln_with_cache, tool, work_dir};

/// Containerd under TCG (and two VMs on two host cores) needs more than a plain boot.
const TIMEOUT: Duration = Duration::from_secs(420);

const ARCHS: [Arch; 2] = [Arch::X86_64, Arch::Aarch64];

/// Debian's `busybox-static` for `arch`, fetched and verified by kiln into the tier's cache.
fn busybox_deb(arch: Arch) -> Result<PathBuf> {
    let fetcher =
        kiln::fetch::Fetcher { offline: false, cache: kiln::cache::Cache::new(cache_dir()?), progress: false, trust: Default::default() };
    let suite = kiln::debian::Suite {
        mirror: kiln::debian::host_debian_mirror(Path::new("/etc/apt"))?,
        suite: "trixie".into(),
        keyring: "/usr/share/keyrings/debian-archive-keyring.gpg".into(),
    };
    let index = kiln::debian::load_index(&fetcher, &suite, arch.debian())?;
    let pkg = kiln::debian::resolve::resolve(&index.packages, &["busybox-static"])?
        .into_iter()
        .find(|p| p.name == "busybox-static")
        .context("busybox-static is not in trixie")?;
    kiln::debian::fetch_deb(&fetcher, &suite, &pkg)
}

/// An OCI layout with tag `1`: an index over one image per architecture whose single layer is
/// that architecture's busybox-static data tar. Returns where busybox is inside the image.
fn busybox_layout(layout: &Path) -> Result<String> {
    let l = TestLayout::create(layout)?;
    let mut images = Vec::new();
    let mut busybox = String::new();
    for arch in ARCHS {
        let layer = deb_data_tar(&busybox_deb(arch)?)?;
        let tar = layout.join(format!("layer-{arch}.tar"));
        std::fs::write(&tar, &layer)?;
        let listing = tool(Command::new("tar").arg("-tf").arg(&tar), "tar")?;
        let path = listing.lines().find(|l| l.ends_with("bin/busybox")).context("busybox-static has no bin/busybox")?;
        busybox = format!("/{}", path.trim_start_matches("./"));
        let config = serde_json::json!({"Cmd": [busybox, "sh"], "Env": ["PATH=/usr/bin:/bin"]});
        let made = l.image(arch.debian(), &[Layer::plain(layer)], config)?;
        images.push((made, arch));
    }
    let platforms: Vec<_> = images.iter().map(|(made, arch)| (made, arch.debian(), (*arch == Arch::Aarch64).then_some("v8"))).collect();
    let (_, index) = l.index(&platforms)?;
    l.tag(&index)?;
    Ok(busybox)
}

/// The test profile: both architectures, the image from the test registry, two containers.
fn profile(dir: &Path, host: &str, busybox: &str) -> Result<PathBuf> {
    let image = format!("{host}/kiln-test/busybox:1");
    let hello = format!(
        "[{busybox}, sh, -c, 'echo boot >> /data/boots && busybox sync && echo \"kiln-container-hello-$(busybox uname -m) greeting=$GREETING boots=$(busybox wc -l < /data/boots)\" && exec busybox sleep 2147483647']"
    );
    let lines = [
        "name: containerd-test".to_string(),
        "arch: [x86_64, aarch64]".into(),
        "engine: containerd".into(),
        "images:".into(),
        format!("  - {image}"),
        "image_registries:".into(),
        format!("  \"{host}\": {{insecure_http: true}}"),
        "containers:".into(),
        "  - name: hello".into(),
        format!("    image: {image}"),
        "    env: {GREETING: hi-there}".into(),
        "    mounts: [{host: /var/lib/hello, container: /data}]".into(),
        format!("    args: {hello}"),
        "  - name: once".into(),
        format!("    image: {image}"),
        "    restart: no".into(),
        format!("    args: [{busybox}, sh, -c, 'echo kiln-container-once-ran; exit 3']"),
    ];
    let text = lines.join("\n") + "\n";
    let path = dir.join("containerd-test.yaml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Polls the whole console (several lines may come in any order) until it holds every needle;
/// returns, per needle, the line and the seconds since QEMU started. Fails on `[kiln] error:`.
fn wait_all(vm: &Vm, needles: &[&str], what: &str) -> Result<Vec<(String, f64)>> {
    let mut found: Vec<Option<(String, f64)>> = vec![None; needles.len()];
    loop {
        let console = vm.console();
        for (i, n) in needles.iter().enumerate() {
            if found[i].is_none() {
                if let Some(line) = console.lines().find(|l| l.contains(n)) {
                    found[i] = Some((line.trim().to_string(), vm.elapsed().as_secs_f64()));
                }
            }
        }
        if found.iter().all(Option::is_some) {
            return Ok(found.into_iter().flatten().collect());
        }
        let tail: Vec<&str> = console.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
        ensure!(!console.contains("[kiln] error:"), "{what}: a boot error:\n{}", tail.join("\n"));
        ensure!(
            vm.elapsed() < TIMEOUT,
            "{what}: after {TIMEOUT:?} the console lacks {:?}:\n{}",
            needles.iter().zip(&found).filter(|(_, f)| f.is_none()).map(|(n, _)| *n).collect::<Vec<_>>(),
            tail.join("\n")
        );
        // Polling the console buffer the VM's reader thread fills; there is no event per line here.
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Boots `disk` and waits for the containers' lines and `[kiln] ready`; returns the console.
fn boot(arch: Arch, disk: &Path, log: &Path, boots: u32) -> Result<String> {
    let mut spec = VmSpec::new(arch);
    spec.net = Net::None;
    spec.cpus = 1;
    spec.disks = vec![Disk { path: disk.to_path_buf(), snapshot: false }];
    let mut vm = Vm::start(&spec, log)?;
    let hello = format!("[hello] kiln-container-hello-{} greeting=hi-there boots={boots}", arch.name());
    let what = format!("{arch} boot {boots} ({})", log.display());
    let got = wait_all(&vm, &[&hello, "[kiln] ready", "[kiln] container once: exited with status 3"], &what)?;
    let (ready, to_ready) = &got[1];
    ensure!(ready.contains(&format!("arch={}", arch.name())), "{arch}: {ready}");
    let console = vm.console();
    vm.kill();
    eprintln!("{arch} boot {boots}: container line after {:.1} s, `{ready}` after {to_ready:.1} s", got[0].1);
    Ok(console)
}

fn boots_twice(arch: Arch, out: &Path, dir: &Path) -> Result<()> {
    let disk = dir.join(format!("{arch}-disk.img"));
    std::fs::copy(out.join(arch.name()).join("disk.img"), &disk)?;
    let first = boot(arch, &disk, &dir.join(format!("{arch}-console-1.log")), 1)?;
    let archive = format!("kiln-images-{}.tar", arch.debian());
    ensure!(
        first.contains(&format!("[kiln] images: the import of {archive}: imported {archive} in")),
        "{arch}: no import line on the first boot"
    );
    ensure!(first.contains("[once] kiln-container-once-ran"), "{arch}: `once` printed nothing");
    ensure!(first.contains("[kiln] containerd: starting (data on ext4"), "{arch}: containerd's data is not on the ext4 data partition");
    ensure!(!first.contains("container once: starting again"), "{arch}: a `restart: no` container was started again");

    let second = boot(arch, &disk, &dir.join(format!("{arch}-console-2.log")), 2)?;
    ensure!(second.contains(&format!("[kiln] images: {archive} already imported")), "{arch}: the second boot did not skip the import");
    ensure!(!second.contains(&format!("imported {archive} in")), "{arch}: the second boot imported again");
    Ok(())
}

#[test]
fn container_appliances_run_their_containers_without_a_nic() -> Result<()> {
    let dir = work_dir("containerd")?;
    let registry = Registry::start(&dir)?;
    let busybox = busybox_layout(&dir.join("busybox"))?;
    push(&dir.join("busybox"), &format!("{}/kiln-test/busybox:1", registry.host()))?;
    let p = profile(&dir, &registry.host(), &busybox)?;
    let out = dir.join("out");
    let started = std::time::Instant::now();
    let (code, log) =
        kiln_with_cache(&cache_dir()?, &["build", p.to_str().context("non-UTF-8 dir")?, "--out", out.to_str().context("non-UTF-8 dir")?])?;
    ensure!(code == 0, "kiln build failed (exit {code}):\n{log}");
    eprintln!("containerd profile build (x86_64 + aarch64): {:.1} s", started.elapsed().as_secs_f64());
    drop(registry);
    for arch in ARCHS {
        let m = kiln_qemu_tests::manifest(&out, arch)?;
        let root = m.partitions.iter().find(|p| p.name == "kiln-root-a").context("no kiln-root-a")?;
        eprintln!(
            "{arch}: root squashfs {:.1} MiB, disk.img {} MiB",
            root.content_size.unwrap_or(0) as f64 / 1048576.0,
            m.partitions.last().map(|p| (p.offset + p.size) >> 20).unwrap_or(0)
        );
    }

    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = ARCHS
            .iter()
            .map(|&arch| {
                s.spawn({
                    let (out, dir) = (&out, &dir);
                    move || boots_twice(arch, out, dir)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("boot thread panicked")))).collect()
    });
    for r in results {
        r?;
    }
    Ok(())
}
