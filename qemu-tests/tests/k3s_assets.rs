//! Slow tier, build only (no VM): `profiles/single-server.yaml` built for x86_64 with a stand-in
//! k3s asset directory (files named like the release assets, random contents, a matching
//! `sha256sum-amd64.txt`) places the verified files in the image, records them in the manifest,
//! and rebuilds offline without the directory. Nothing here runs k3s: the stand-ins are not k3s.
//!
//! The profile is copied with the made-up release name `v0.0.0+k3s0`, so the cache refs the
//! stand-ins leave in the tier's shared cache can never be taken for a real release's.

use std::process::Command;

use anyhow::{ensure, Context, Result};
use kiln::arch::Arch;
use kiln_qemu_tests::{cache_dir, extract_range, kiln_with_cache, manifest, tool, work_dir};
use sha2::{Digest, Sha256};

const STAND_IN_VERSION: &str = "v0.0.0+k3s0";

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[test]
fn single_server_build_places_verified_k3s_assets() -> Result<()> {
    let dir = work_dir("k3s-assets-build")?;
    let assets = dir.join("stand-in-assets");
    std::fs::create_dir_all(&assets)?;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let mut list = String::new();
    for name in ["k3s", "k3s-airgap-images-amd64.tar.zst"] {
        let data = format!("stand-in for {name}, not k3s ({seed})\n").repeat(64).into_bytes();
        std::fs::write(assets.join(name), &data)?;
        list.push_str(&format!("{}  {name}\n", sha(&data)));
    }
    std::fs::write(assets.join("sha256sum-amd64.txt"), &list)?;

    let profile = std::fs::read_to_string(kiln_qemu_tests::repo_root().join("profiles/single-server.yaml"))?;
    ensure!(profile.contains("version: v1.33.5+k3s1"), "profiles/single-server.yaml names another k3s version");
    let profile_path = dir.join("single-server.yaml");
    std::fs::write(&profile_path, profile.replace("version: v1.33.5+k3s1", &format!("version: {STAND_IN_VERSION}")))?;

    let p = profile_path.to_str().context("non-UTF-8 work dir")?;
    let a = assets.to_str().context("non-UTF-8 work dir")?;
    let out = dir.join("out");
    let o = out.to_str().context("non-UTF-8 work dir")?;
    let started = std::time::Instant::now();
    let (code, log) = kiln_with_cache(&cache_dir()?, &["build", p, "--arch", "x86_64", "--k3s-assets", a, "--out", o])?;
    ensure!(code == 0, "kiln build failed (exit {code}):\n{log}");
    eprintln!("single-server x86_64 build with stand-in k3s assets: {:.1} s", started.elapsed().as_secs_f64());

    let m = manifest(&out, Arch::X86_64)?;
    let k3s: Vec<_> = m.inputs.iter().filter(|i| i.kind == "k3s").collect();
    ensure!(k3s.len() == 2, "manifest k3s inputs: {k3s:?}");
    ensure!(k3s.iter().all(|i| i.version.as_deref() == Some(STAND_IN_VERSION)), "{k3s:?}");

    // The root partition's squashfs, listed by the reference tool.
    let root = m.partitions.iter().find(|p| p.name == "kiln-root-a").context("no kiln-root-a")?;
    let sqfs = dir.join("root.sqfs");
    extract_range(&out.join("x86_64/disk.img"), root.offset, root.content_size.context("empty root")?, &sqfs)?;
    let listing = tool(Command::new("unsquashfs").arg("-lls").arg(&sqfs), "squashfs-tools")?;
    let line = |suffix: &str| listing.lines().find(|l| l.ends_with(suffix)).map(str::to_string);
    let bin = line("squashfs-root/usr/local/bin/k3s").context("no /usr/local/bin/k3s in the root")?;
    ensure!(bin.starts_with("-rwxr-xr-x root/root"), "{bin}");
    let link = line("-> /usr/lib/kiln/k3s/k3s-airgap-images-amd64.tar.zst").context("no air-gap archive link")?;
    ensure!(link.contains("var/lib/rancher/k3s/agent/images/k3s-airgap-images-amd64.tar.zst"), "{link}");
    let got = Command::new("unsquashfs").arg("-cat").arg(&sqfs).arg("usr/local/bin/k3s").output()?;
    ensure!(got.status.success(), "unsquashfs -cat: {got:?}");
    ensure!(sha(&got.stdout) == sha(&std::fs::read(assets.join("k3s"))?), "the placed binary is not the verified one");

    // Offline, without the directory: from the cache refs.
    std::fs::remove_dir_all(&assets)?;
    let out2 = dir.join("out-offline");
    let o2 = out2.to_str().context("non-UTF-8 work dir")?;
    let (code, log) = kiln_with_cache(&cache_dir()?, &["build", p, "--arch", "x86_64", "--offline", "--out", o2])?;
    ensure!(code == 0, "offline kiln build failed (exit {code}):\n{log}");
    Ok(())
}

