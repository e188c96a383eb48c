//! Slow tier, build only (no VM): reuse between builds (issue 18) never changes an image, and
//! neither does building architectures at once. The quickstart for x86_64 built with
//! `--no-reuse`, then twice with reuse (the second certainly from kept results: the packages'
//! contents and lists, the module metadata, the initramfs and every squashfs block), gives the
//! same bytes in every output file, and the reuse directory holds every kind of result. The
//! tier's shared quickstart build (three architectures, built two at a time) has the same
//! x86_64 image and manifest as the one-architecture `--no-reuse` build.

use anyhow::{ensure, Context, Result};
use kiln_qemu_tests::{cache_dir, kiln_with_cache, quickstart, work_dir};

#[test]
fn builds_with_and_without_reuse_are_byte_identical() -> Result<()> {
    let dir = work_dir("reuse-identity")?;
    let cache = cache_dir()?;
    let mut outs = Vec::new();
    for (name, extra) in [("no-reuse", Some("--no-reuse")), ("reuse-1", None), ("reuse-2", None)] {
        let out = dir.join(name);
        let o = out.to_str().context("non-UTF-8 work dir")?;
        let mut args = vec!["build", "profiles/quickstart.yaml", "--arch", "x86_64", "--out", o];
        args.extend(extra);
        let started = std::time::Instant::now();
        let (code, log) = kiln_with_cache(&cache, &args)?;
        ensure!(code == 0, "kiln build ({name}) failed (exit {code}):\n{log}");
        eprintln!("quickstart x86_64, {name}: {:.1} s", started.elapsed().as_secs_f64());
        outs.push((name, out));
    }
    let (_, first) = &outs[0];
    for file in ["x86_64/disk.img", "x86_64/manifest.json", "SHA256SUMS"] {
        let want = std::fs::read(first.join(file)).with_context(|| format!("{file} of the --no-reuse build"))?;
        for (name, out) in &outs[1..] {
            ensure!(std::fs::read(out.join(file))? == want, "{file} of the {name} build differs from the --no-reuse build");
        }
    }
    let reuse = cache.join("reuse");
    let kinds: Vec<String> =
        std::fs::read_dir(&reuse)?.map(|e| Ok(e?.file_name().to_string_lossy().into_owned())).collect::<Result<_>>()?;
    for kind in ["deb-data-", "packages-fields-", "kmod-", "initramfs-", "squashfs-"] {
        ensure!(kinds.iter().any(|k| k.starts_with(kind)), "no kept {kind}* results; reuse kinds: {kinds:?}");
    }

    // Three architectures, two at a time (with reuse): the same x86_64 files.
    let all = quickstart("quickstart-build")?;
    for file in ["x86_64/disk.img", "x86_64/manifest.json"] {
        ensure!(
            std::fs::read(all.join(file))? == std::fs::read(first.join(file))?,
            "{file} of the three-architecture build differs from the one-architecture --no-reuse build"
        );
    }
    Ok(())
}
