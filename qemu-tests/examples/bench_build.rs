//! Benchmark (figures, not a test): whole `kiln build` runs of the quickstart profile, as an
//! operator meets them, with downloads already in the cache (issue 18's table, rows a-e):
//! (a) three architectures without intermediate results (`--no-reuse`), (a2) the same with the
//! results earlier builds kept (`crate::reuse`: a user's second build), (b) one architecture
//! (x86_64) with `--no-reuse`, (c) the same build again with nothing changed, (d) after one
//! overlay file changed, (e) after one package was added (c-e reuse). Each row gives the wall
//! time, kiln's peak memory (the `VmHWM` it logs) and the ratio to row (b).
//!
//! ```sh
//! cargo run -p kiln-qemu-tests --example bench_build
//! ```
//! (the test profile's kiln, like the VM tier; `--release` builds and measures a release kiln).
//! Downloads come from the shared test cache (`target/<profile>/kiln-cache`); row (e)'s package
//! is fetched into it first, untimed. The per-stage comparisons with the reference tools
//! (`mksquashfs`, the `zstd` CLI) are `cargo run -p kiln --example bench_squashfs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use kiln_qemu_tests::{cache_dir, copy_dir, kiln_bin, peak_memory_mib, repo_root, work_dir};

/// One timed `kiln build`: wall seconds and the peak memory kiln reported.
struct Run {
    secs: f64,
    peak_mib: Option<u64>,
}

fn main() -> Result<()> {
    let dir = work_dir("bench-build")?;
    let profile = dir.join("p.yaml");
    std::fs::write(&profile, std::fs::read_to_string(repo_root().join("profiles/quickstart.yaml"))?)?;
    copy_dir(&repo_root().join("profiles/site-example"), &dir.join("site-example"))?;
    println!("kiln {} ; quickstart profile; downloads cached in {}", kiln_bin()?.display(), cache_dir()?.display());
    // Warm-up, untimed: fills the page cache and makes sure every download is cached.
    build(&dir, &profile, &[], "warm-up")?;

    // (a), (b): downloads cached, no intermediate results (`--no-reuse`); the rest reuse what
    // the warm-up and earlier rows kept, as a user's later builds do.
    let a = build(&dir, &profile, &["--no-reuse"], "a")?;
    let a2 = build(&dir, &profile, &[], "a2")?;
    let b = build(&dir, &profile, &["--arch", "x86_64", "--no-reuse"], "b")?;
    let c = build(&dir, &profile, &["--arch", "x86_64"], "c")?;
    let issue = dir.join("site-example/etc/issue.hbs");
    let text = std::fs::read_to_string(&issue)?;
    std::fs::write(&issue, format!("{text}changed for the benchmark\n"))?;
    let d = build(&dir, &profile, &["--arch", "x86_64"], "d")?;
    std::fs::write(&issue, text)?;
    let with_package = dir.join("p-curl.yaml");
    let yaml = std::fs::read_to_string(&profile)?.replace("  packages: []", "  packages: [curl]");
    if !yaml.contains("packages: [curl]") {
        bail!("profiles/quickstart.yaml has no `packages: []` line to add a package to");
    }
    std::fs::write(&with_package, yaml)?;
    fetch(&dir, &with_package)?;
    let e = build(&dir, &with_package, &["--arch", "x86_64"], "e")?;

    println!("\n{:<66} {:>8} {:>10} {:>8}", "kiln build of the quickstart (downloads cached)", "wall", "peak RSS", "vs (b)");
    for (label, r) in [
        ("(a) x86_64 + aarch64 + riscv64, --no-reuse", &a),
        ("(a2) x86_64 + aarch64 + riscv64, intermediate results kept", &a2),
        ("(b) x86_64, --no-reuse", &b),
        ("(c) x86_64 again, nothing changed", &c),
        ("(d) x86_64 after one overlay file changed", &d),
        ("(e) x86_64 after one package (curl) was added", &e),
    ] {
        let peak = r.peak_mib.map_or("?".to_string(), |m| format!("{m} MiB"));
        println!("{label:<66} {:>7.1}s {peak:>10} {:>7.2}x", r.secs, r.secs / b.secs);
    }
    match which("mkosi") {
        Some(p) => println!("\nmkosi is installed ({}): compare with a comparable Debian image by hand (docs/benchmarks.md)", p.display()),
        None => println!("\nmkosi: not installed on this host (optional column)"),
    }
    Ok(())
}

fn build(dir: &Path, profile: &Path, extra: &[&str], label: &str) -> Result<Run> {
    let out = dir.join(format!("out-{label}"));
    let _ = std::fs::remove_dir_all(&out);
    let mut args = vec!["build", profile.to_str().context("UTF-8 path")?, "--offline", "--out", out.to_str().context("UTF-8 path")?];
    args.extend_from_slice(extra);
    let started = Instant::now();
    let output =
        Command::new(kiln_bin()?).args(&args).env("KILN_CACHE_DIR", cache_dir()?).current_dir(dir).output().context("running kiln")?;
    let secs = started.elapsed().as_secs_f64();
    let log = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("kiln {} failed:\n{log}", args.join(" "));
    }
    Ok(Run { secs, peak_mib: peak_memory_mib(&log) })
}

fn fetch(dir: &Path, profile: &Path) -> Result<()> {
    let output = Command::new(kiln_bin()?)
        .args(["fetch", profile.to_str().context("UTF-8 path")?, "--arch", "x86_64"])
        .env("KILN_CACHE_DIR", cache_dir()?)
        .current_dir(dir)
        .output()
        .context("running kiln fetch")?;
    if !output.status.success() {
        bail!("kiln fetch failed:\n{}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|f| f.is_file()))
}
