//! Compares kiln's squashfs writer (backhand, zstd) with `mksquashfs` on the same ~100 MiB of real files.
//!
//! Usage: `cargo run -p kiln --example bench_squashfs [SOURCE_DIR...] [--mib N] [--level L] [--data DIR] [--kiln-only]`
//! Default sources: /usr/share /usr/lib/x86_64-linux-gnu /usr/bin /usr/lib/python3, an equal share of each.
//! Files are copied to a temp dir first (or to `--data DIR`, kept, and reused when it exists) so both
//! writers read exactly the same data. `--kiln-only` skips mksquashfs (to run each under `/usr/bin/time`).
//! The dev profile already optimises dependencies (backhand, zstd), which do the work.

use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use kiln::squashfs::{write_squashfs, SquashfsOptions};
use kiln::tree::{Content, Entry, Kind, Meta, Tree, TreePath};

fn main() -> anyhow::Result<()> {
    let mut sources: Vec<PathBuf> = Vec::new();
    let mut mib: u64 = 100;
    let mut level: i32 = 15;
    let mut keep: Option<PathBuf> = None;
    let mut kiln_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mib" => mib = args.next().context("--mib N")?.parse()?,
            "--level" => level = args.next().context("--level L")?.parse()?,
            "--data" => keep = Some(args.next().context("--data DIR")?.into()),
            "--kiln-only" => kiln_only = true,
            _ => sources.push(a.into()),
        }
    }
    if sources.is_empty() {
        sources = ["/usr/share", "/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/lib/python3"].iter().map(PathBuf::from).collect();
    }

    let tmp = tempfile::tempdir()?;
    let data = keep.unwrap_or_else(|| tmp.path().join("data"));
    let (files, bytes) = if data.exists() { dir_totals(&data)? } else { copy_sample(&sources, &data, mib * 1024 * 1024)? };
    println!("data: {files} files, {:.1} MiB from {sources:?}", bytes as f64 / 1048576.0);

    let tree = tree_from_dir(&data)?;
    let opts = SquashfsOptions { mtime: 1_700_000_000, zstd_level: level, block_size: 128 * 1024, threads: 0 };
    let ours = tmp.path().join("kiln.sqfs");
    let t0 = Instant::now();
    let mut f = std::fs::File::create(&ours)?;
    write_squashfs(&tree, &mut f, &opts)?;
    drop(f);
    let ours_time = t0.elapsed();
    let ours_size = std::fs::metadata(&ours)?.len();

    let mut results = vec![("kiln (backhand, 1 thread)".to_string(), ours_time, ours_size)];
    let mksquashfs_runs: &[Option<u32>] = if kiln_only { &[] } else { &[None, Some(1)] };
    for &procs in mksquashfs_runs {
        let img = tmp.path().join("mksquashfs.sqfs");
        let mut cmd = Command::new("mksquashfs");
        cmd.arg(&data).arg(&img).args(["-comp", "zstd", "-Xcompression-level", &level.to_string(), "-noappend", "-quiet", "-no-progress"]);
        if let Some(p) = procs {
            cmd.args(["-processors", &p.to_string()]);
        }
        let t0 = Instant::now();
        let status = cmd.status().context("running mksquashfs (install squashfs-tools)")?;
        if !status.success() {
            bail!("mksquashfs failed: {status}");
        }
        let label = match procs {
            None => {
                format!("mksquashfs ({} cores)", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
            }
            Some(p) => format!("mksquashfs -processors {p}"),
        };
        results.push((label, t0.elapsed(), std::fs::metadata(&img)?.len()));
    }

    println!("zstd level {level}, block size 128 KiB");
    for (label, time, size) in &results {
        println!(
            "{label:<30} {:>7.2} s  {:>9.2} MiB  ({:.1}% of input)",
            time.as_secs_f64(),
            *size as f64 / 1048576.0,
            *size as f64 * 100.0 / bytes as f64
        );
    }
    Ok(())
}

/// Copies regular files, symlinks and directories in sorted order, an equal share of `limit`
/// bytes of file data from each source (so the sample mixes text, binaries and data).
fn copy_sample(sources: &[PathBuf], dest: &Path, limit: u64) -> anyhow::Result<(u64, u64)> {
    let (mut files, mut bytes) = (0u64, 0u64);
    for (i, src) in sources.iter().enumerate() {
        let share_end = limit * (i as u64 + 1) / sources.len() as u64;
        let base = src.file_name().context("source without a name")?;
        for e in walkdir::WalkDir::new(src).sort_by_file_name() {
            let Ok(e) = e else { continue };
            let rel = e.path().strip_prefix(src)?;
            let to = dest.join(base).join(rel);
            let ft = e.file_type();
            if ft.is_dir() {
                std::fs::create_dir_all(&to)?;
            } else if ft.is_symlink() {
                symlink(std::fs::read_link(e.path())?, &to)?;
            } else if ft.is_file() {
                // unreadable files are skipped, not fatal: this is only sample data
                if std::fs::copy(e.path(), &to).is_ok() {
                    files += 1;
                    bytes += std::fs::metadata(&to)?.len();
                }
                if bytes >= share_end {
                    break;
                }
            }
        }
    }
    Ok((files, bytes))
}

fn dir_totals(dir: &Path) -> anyhow::Result<(u64, u64)> {
    let (mut files, mut bytes) = (0, 0);
    for e in walkdir::WalkDir::new(dir) {
        let e = e?;
        if e.file_type().is_file() {
            files += 1;
            bytes += e.metadata()?.len();
        }
    }
    Ok((files, bytes))
}

fn tree_from_dir(root: &Path) -> anyhow::Result<Tree> {
    let mut tree = Tree::new();
    for e in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let e = e?;
        let rel = e.path().strip_prefix(root)?.to_str().context("non-UTF-8 path")?;
        let md = e.path().symlink_metadata()?;
        let meta = Meta { mode: md.mode() & 0o7777, uid: md.uid(), gid: md.gid(), mtime: md.mtime().max(0) as u64 };
        let kind = if md.is_dir() {
            Kind::Dir
        } else if md.file_type().is_symlink() {
            Kind::Symlink(std::fs::read_link(e.path())?.to_str().context("non-UTF-8 link")?.to_string())
        } else {
            Kind::File(Content::HostFile(e.path().to_path_buf()))
        };
        tree.insert(&TreePath::parse(rel)?, Entry { meta, kind })?;
    }
    Ok(tree)
}
