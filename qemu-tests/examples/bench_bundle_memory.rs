//! Benchmark (figures, not a test): peak memory and time of `kiln fetch` and `kiln build` while
//! bundling a large container image. A build's memory must not grow with the images it bundles
//! (docs/design.md, Memory); the issue's bound is 256 MiB while bundling 1 GiB of layers.
//!
//! Starts Debian's `docker-registry` on 127.0.0.1, pushes one x86_64 image whose single
//! uncompressed layer holds SIZE MiB of incompressible bytes (default 1024), then, each with a
//! cache that lacks the image (Debian packages hard-linked from the shared test cache), so the
//! layer is downloaded every time:
//! - `kiln fetch` of a k3s profile (stand-in k3s assets) with the image;
//! - `kiln build` of that profile (archive `.tar.zst`), and of the same profile without images;
//! - `kiln build` of an `engine: containerd` profile with the image (a plain `.tar` archive).
//!
//! Peak memory is the kernel's high-water mark (`VmHWM`) that kiln prints as its last log line.
//!
//! ```sh
//! cargo run -p kiln-qemu-tests --example bench_bundle_memory -- [SIZE_MIB]
//! ```
//! (the test profile's kiln, as the figures in docs/benchmarks.md; `--release` builds and measures a release kiln).
//! Needs `docker-registry`, `skopeo` and GNU `tar` (the VM tier's host packages) and about
//! 4 × SIZE of free disk under `target/`. Debian packages come from the shared test cache.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use kiln_qemu_tests::layout::{StoredLayer, TestLayout, LAYER_TAR};
use kiln_qemu_tests::registry::{push, Registry};
use kiln_qemu_tests::{cache_dir, kiln_bin, peak_memory_mib, stand_in, tool, work_dir};

fn main() -> Result<()> {
    let size_mib: u64 = match std::env::args().nth(1) {
        Some(a) => a.parse().with_context(|| format!("SIZE_MIB must be a number of MiB, not {a:?}"))?,
        None => 1024,
    };
    let dir = work_dir("bench-bundle-memory")?;
    let registry = Registry::start(&dir)?;
    let started = Instant::now();
    let image = format!("{}/bench/big:1", registry.host());
    push_big_image(&dir, size_mib, &image)?;
    println!("pushed {image} ({size_mib} MiB layer) in {:.1} s", started.elapsed().as_secs_f64());

    let assets = stand_in::assets(&dir, "bench")?;
    let host = registry.host();
    let k3s_with = write_profile(&dir, "k3s-with-image", &k3s_profile(&host, Some(&image))?)?;
    let k3s_without = write_profile(&dir, "k3s-without-images", &k3s_profile(&host, None)?)?;
    let containerd = write_profile(&dir, "containerd-with-image", &containerd_profile(&host, &image))?;

    println!("\n{:<44} {:>10} {:>12}", "run (x86_64)", "time", "peak memory");
    // Each run has a cache without the image, so each downloads the layer.
    let runs: [(&str, &[&str], &Path); 4] = [
        ("kiln fetch, k3s, with the image", &["fetch"], &k3s_with),
        ("kiln build, k3s, no images", &["build"], &k3s_without),
        ("kiln build, k3s, with the image (.tar.zst)", &["build"], &k3s_with),
        ("kiln build, containerd, with the image (.tar)", &["build"], &containerd),
    ];
    for (i, (label, command, profile)) in runs.iter().enumerate() {
        let images_cache = dir.join(format!("images-cache-{i}"));
        let (secs, peak) = run_kiln(&dir, command, profile, &assets, &images_cache)?;
        println!("{label:<44} {secs:>8.1} s {peak:>8} MiB");
    }
    Ok(())
}

/// Writes an OCI layout with one image (one uncompressed layer: `/big.bin`, `size_mib` MiB of
/// pseudo-random bytes) and pushes it as `target`.
fn push_big_image(dir: &Path, size_mib: u64, target: &str) -> Result<()> {
    let src = dir.join("layer-src");
    std::fs::create_dir_all(&src)?;
    write_noise(&src.join("big.bin"), size_mib << 20)?;
    let tar = dir.join("layer.tar");
    tool(
        Command::new("tar")
            .args(["--numeric-owner", "--owner=0", "--group=0", "--mtime=@0", "-cf"])
            .arg(&tar)
            .arg("-C")
            .arg(&src)
            .arg("big.bin"),
        "tar",
    )?;
    std::fs::remove_dir_all(&src)?;
    let layout_dir = dir.join("layout");
    let layout = TestLayout::create(&layout_dir)?;
    let (hex, size) = layout.blob_file(&tar)?;
    let layer = StoredLayer { media_type: LAYER_TAR, hex: hex.clone(), size, diff_id: hex };
    let made = layout.image_of("amd64", &[layer], serde_json::json!({"Cmd": ["/big.bin"]}))?;
    layout.tag(&made.descriptor)?;
    push(&layout_dir, target)?;
    std::fs::remove_dir_all(&layout_dir)?;
    Ok(())
}

/// `len` bytes of xorshift output: incompressible, like the compressed layers of real images.
fn write_noise(path: &Path, len: u64) -> Result<()> {
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for chunk in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}

/// `profiles/single-server.yaml` with the stand-in k3s release and, optionally, `image`.
fn k3s_profile(host: &str, image: Option<&str>) -> Result<String> {
    let mut text = stand_in::profile_text("single-server")?;
    if let Some(image) = image {
        text.push_str(&format!("images:\n  - {image}\nimage_registries:\n  \"{host}\": {{insecure_http: true}}\n"));
    }
    Ok(text)
}

fn containerd_profile(host: &str, image: &str) -> String {
    format!(
        "name: bench-containerd\narch: [x86_64]\nengine: containerd\nimages:\n  - {image}\n\
         image_registries:\n  \"{host}\": {{insecure_http: true}}\n\
         containers:\n  - name: big\n    image: {image}\n"
    )
}

fn write_profile(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Runs kiln; returns the wall time and the peak memory (MiB) kiln reports as it finishes. The
/// Debian packages come from the tier's shared cache; container images go to `images_cache`, a
/// fresh directory, so each run downloads the layer (KILN_CACHE_DIR holds both, so the shared
/// cache's Debian blobs are hard-linked into it first).
fn run_kiln(dir: &Path, command: &[&str], profile: &Path, assets: &Path, images_cache: &Path) -> Result<(f64, u64)> {
    link_tree(&cache_dir()?, images_cache)?;
    let out = dir.join("out");
    let mut cmd = Command::new(kiln_bin()?);
    cmd.args(command)
        .arg(profile)
        .args(["--arch", "x86_64", "--k3s-assets"])
        .arg(assets)
        .env("KILN_CACHE_DIR", images_cache)
        .env("RUST_LOG", "info");
    if command == ["build"] {
        cmd.arg("--out").arg(&out);
    }
    let started = Instant::now();
    let output = cmd.output().context("running kiln")?;
    let secs = started.elapsed().as_secs_f64();
    let log = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        bail!("kiln {} {} failed ({}):\n{log}", command.join(" "), profile.display(), output.status);
    }
    let peak = peak_memory_mib(&log).with_context(|| format!("kiln printed no `peak memory` line:\n{log}"))?;
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(images_cache);
    Ok((secs, peak))
}

/// Hard-links every file of `from` into `to` (same layout): a copy of the shared cache that
/// costs no space, so images fetched into `to` never reach the shared cache.
fn link_tree(from: &Path, to: &Path) -> Result<()> {
    for entry in walk(from)? {
        let rel = entry.strip_prefix(from)?;
        let dest = to.join(rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::hard_link(&entry, &dest).with_context(|| format!("linking {} to {}", entry.display(), dest.display()))?;
    }
    Ok(())
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            } else if e.file_type()?.is_file() {
                files.push(e.path());
            }
        }
    }
    Ok(files)
}
