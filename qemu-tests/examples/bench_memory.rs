//! Benchmark (figures, not a test): peak memory and time of `kiln build` for every example
//! profile (`profiles/*.yaml`) and every VM-tier profile (`qemu-tests/profiles/*.yaml`), all of
//! each profile's architectures in one build (two at a time, as `kiln build` does), downloads
//! cached, no intermediate results (`--no-reuse`: the most work a build does). Issue 18's bound
//! is 256 MiB for each.
//!
//! ```sh
//! cargo run --release -p kiln-qemu-tests --example bench_memory [-- NAME...]
//! ```
//! (NAME: only the profiles whose file name contains one of them.)
//! Each profile is fetched first (`kiln fetch`, untimed; Debian's mirror is reachable, so a
//! board's U-Boot package comes into the cache). Cluster profiles get stand-in k3s assets
//! (`kiln_qemu_tests::stand_in`: no k3s release can be downloaded here), and only the
//! architectures a stand-in exists for (x86_64, aarch64); a `token_file` the profile names gets a
//! made-up token. A profile whose container images or charts come from a registry this machine
//! cannot reach is measured again without its `images`, `charts` and `containers` (which name
//! images) and marked so (what
//! bundling images costs in memory is `bench_bundle_memory`'s, with a local registry). Peak
//! memory is the `VmHWM` kiln logs as its last line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use kiln_qemu_tests::{cache_dir, copy_dir, kiln_bin, peak_memory_mib, repo_root, stand_in, work_dir};

/// The k3s release the example profiles name, replaced by the stand-in's.
const K3S_RELEASE: &str = "version: v1.33.5+k3s1";

fn main() -> Result<()> {
    let dir = work_dir("bench-memory")?;
    let assets = stand_in_assets(&dir)?;
    let mut profiles = Vec::new();
    for folder in ["profiles", "qemu-tests/profiles"] {
        // A copy of the folder (the profiles' relative paths resolve inside it), whose cluster
        // profiles name the stand-in release.
        copy_dir(&repo_root().join(folder), &dir.join(folder))?;
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir.join(folder))?
            .map(|e| Ok(e?.path()))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        found.sort();
        profiles.extend(found.into_iter().map(|p| (folder, p)));
    }
    println!("kiln {}; downloads cached in {}", kiln_bin()?.display(), cache_dir()?.display());
    println!("\n{:<40} {:>8} {:>10}  note", "profile (kiln build --no-reuse)", "wall", "peak RSS");
    let mut worst = 0;
    let only: Vec<String> = std::env::args().skip(1).collect();
    for (folder, path) in &profiles {
        let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("?");
        if !only.is_empty() && !only.iter().any(|o| file.contains(o.as_str())) {
            continue;
        }
        let name = format!("{folder}/{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("?"));
        let text = std::fs::read_to_string(path)?;
        let cluster = text.contains(K3S_RELEASE);
        std::fs::write(path, text.replace(K3S_RELEASE, &format!("version: {}", stand_in::VERSION)))?;
        let out = dir.join("out").join(name.replace('/', "_"));
        let mut common: Vec<String> = vec![path.display().to_string()];
        if cluster {
            common.extend(["--k3s-assets".into(), assets.display().to_string()]);
            let loaded = kiln::profile::LoadedProfile::load(path)?;
            if let Some(token) = loaded.profile.cluster.as_ref().and_then(|c| c.token_file.as_ref()) {
                std::fs::write(loaded.resolve(token), "K10stand-in-token-for-the-benchmark\n")?;
            }
            for arch in loaded.profile.arch.iter().filter(|a| **a != kiln::arch::Arch::Riscv64) {
                common.extend(["--arch".into(), arch.name().into()]);
            }
        }
        // Untimed: fills the cache with what a board needs; a failure shows in the build below.
        let fetch = || -> Result<std::process::Output> {
            Ok(Command::new(kiln_bin()?).arg("fetch").args(&common).env("KILN_CACHE_DIR", cache_dir()?).current_dir(&dir).output()?)
        };
        let _ = fetch();
        let mut args: Vec<String> = vec!["build".into()];
        args.extend(common.iter().cloned());
        args.extend(["--offline".into(), "--no-reuse".into(), "--out".into(), out.display().to_string()]);
        let mut note = if cluster { "stand-in k3s assets" } else { "" }.to_string();
        let run = || -> Result<(f64, std::process::Output)> {
            let started = Instant::now();
            let output = Command::new(kiln_bin()?).args(&args).env("KILN_CACHE_DIR", cache_dir()?).current_dir(&dir).output();
            let _ = std::fs::remove_dir_all(&out);
            Ok((started.elapsed().as_secs_f64(), output.context("running kiln")?))
        };
        let (mut secs, mut output) = run()?;
        if !output.status.success() && String::from_utf8_lossy(&output.stderr).contains("pulling the profile's") {
            let text = std::fs::read_to_string(path)?;
            let stripped = ["images", "charts", "containers"].iter().fold(text, |t, key| without_top_level(&t, key));
            std::fs::write(path, stripped)?;
            let _ = fetch();
            (secs, output) = run()?;
            note =
                format!("{note}{}without its images, charts, containers (unreachable registry)", if note.is_empty() { "" } else { "; " });
        }
        let log = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            let reason = log.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("no output").trim();
            println!("{name:<40} {:>8} {:>10}  not built here: {}", "-", "-", truncate(reason, 110));
            continue;
        }
        let peak = peak_memory_mib(&log);
        worst = worst.max(peak.unwrap_or(0));
        println!("{name:<40} {secs:>7.1}s {:>10}  {note}", peak.map_or("?".into(), |m| format!("{m} MiB")));
    }
    println!("\nhighest peak: {worst} MiB (bound: 256 MiB)");
    Ok(())
}

/// Stand-in assets for both release architectures, in one directory.
fn stand_in_assets(dir: &Path) -> Result<PathBuf> {
    let assets = stand_in::assets(dir, "bench-memory")?;
    stand_in::assets_arm64(dir, "bench-memory")?;
    Ok(assets)
}

/// `text` without the top-level YAML key `key` and its block (indented or list lines after it).
fn without_top_level(text: &str, key: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in text.lines() {
        let top = !line.starts_with([' ', '\t', '-', '#']) && !line.trim().is_empty();
        if top {
            skipping = line.starts_with(&format!("{key}:"));
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn truncate(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}
