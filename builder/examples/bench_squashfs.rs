//! Compares kiln's two heaviest compression stages with the reference tools on the same input, in
//! one run: the root squashfs (backhand with kiln's parallel block compression) against
//! `mksquashfs -processors 2` (same compressor, level and block size), and the initramfs's zstd
//! against the `zstd` CLI at the same level with `-T1` and `-T2`. Each is run `--reps` times (3)
//! in its own process; the table gives medians, the ratio kiln/reference and each run's peak RSS.
//!
//! Usage: `cargo run -p kiln --example bench_squashfs -- [SOURCE_DIR...] [--mib N] [--level L]
//! [--data DIR] [--reps N] [--cpio FILE] [--kiln-only] [--levels]`
//! Default sources: /usr/share /usr/lib/x86_64-linux-gnu /usr/bin /usr/lib/python3, an equal share of each.
//! Files are copied to a temp dir first (or to `--data DIR`, kept, and reused when it exists) so both
//! writers read exactly the same data. `--cpio FILE` is the initramfs input (an uncompressed cpio
//! archive, e.g. `zstd -dc out/x86_64/netboot/initrd`); without it, the first 16 MiB of a cpio
//! archive of the sample data. `--kiln-only` skips the reference tools; `--levels` adds a
//! size-vs-time table of kiln's initramfs compression at levels 3/9/15/19, 1 and 2 threads.
//! The dev profile already optimises dependencies (backhand, zstd), which do the work.

use std::io::{Read, Write};
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use kiln::initramfs::{zstd_encoder, ZstdSettings, ZSTD};
use kiln::squashfs::{write_squashfs, SquashfsOptions};
use kiln::tree::{Content, Entry, Kind, Meta, Tree, TreePath};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        return child(&args[1..]);
    }
    let mut sources: Vec<PathBuf> = Vec::new();
    let mut mib: u64 = 100;
    let mut level: i32 = 15;
    let mut keep: Option<PathBuf> = None;
    let mut cpio: Option<PathBuf> = None;
    let mut reps = 3usize;
    let mut kiln_only = false;
    let mut levels = false;
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mib" => mib = args.next().context("--mib N")?.parse()?,
            "--level" => level = args.next().context("--level L")?.parse()?,
            "--data" => keep = Some(args.next().context("--data DIR")?.into()),
            "--cpio" => cpio = Some(args.next().context("--cpio FILE")?.into()),
            "--reps" => reps = args.next().context("--reps N")?.parse()?,
            "--kiln-only" => kiln_only = true,
            "--levels" => levels = true,
            _ => sources.push(a.into()),
        }
    }
    ensure!(reps >= 1, "--reps must be at least 1");
    if sources.is_empty() {
        sources = ["/usr/share", "/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/lib/python3"].iter().map(PathBuf::from).collect();
    }

    let tmp = tempfile::tempdir()?;
    let data = keep.unwrap_or_else(|| tmp.path().join("data"));
    let (files, bytes) = if data.exists() { dir_totals(&data)? } else { copy_sample(&sources, &data, mib * 1024 * 1024)? };
    println!("squashfs input: {files} files, {:.1} MiB from {}", bytes as f64 / 1048576.0, data.display());
    let cpio = match cpio {
        Some(c) => c,
        None => {
            let c = tmp.path().join("sample.cpio");
            let mut out = LimitedWriter { inner: std::fs::File::create(&c)?, left: 16 << 20 };
            let _ = kiln::cpio::write_newc(&tree_from_dir(&data)?, &mut out, 0); // stops at the limit
            c
        }
    };
    let cpio_len = std::fs::metadata(&cpio).with_context(|| format!("reading {}", cpio.display()))?.len();
    println!("initramfs input: {} ({:.1} MiB cpio)", cpio.display(), cpio_len as f64 / 1048576.0);

    let me = std::env::current_exe()?;
    let data_s = data.to_str().context("non-UTF-8 data dir")?;
    let lvl = level.to_string();
    let sq = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let mut rows: Vec<Row> = Vec::new();

    // Squashfs: kiln on all cores, kiln on one (to show what the parallel path gives), mksquashfs.
    let kiln_par = sq("kiln.sqfs");
    let kiln_seq = sq("kiln-1.sqfs");
    let mk = sq("mksquashfs.sqfs");
    let mut squashfs: Vec<(String, Vec<String>, bool, String)> = vec![
        (
            "kiln squashfs (2 threads)".into(),
            vec!["squashfs".into(), data_s.into(), kiln_par.clone(), lvl.clone(), "0".into()],
            true,
            kiln_par.clone(),
        ),
        (
            "kiln squashfs (1 thread)".into(),
            vec!["squashfs".into(), data_s.into(), kiln_seq.clone(), lvl.clone(), "1".into()],
            true,
            kiln_seq.clone(),
        ),
    ];
    if !kiln_only {
        let args = [
            data_s,
            &mk,
            "-comp",
            "zstd",
            "-Xcompression-level",
            &lvl,
            "-b",
            "131072",
            "-noappend",
            "-quiet",
            "-no-progress",
            "-processors",
            "2",
        ];
        squashfs.push(("mksquashfs -processors 2".into(), args.iter().map(|s| s.to_string()).collect(), false, mk.clone()));
    }
    for (label, args, ours, out) in &squashfs {
        rows.push(measure(label, reps, || if *ours { run_child(&me, args) } else { run_tool("mksquashfs", args) }, out)?);
    }
    ensure!(same_bytes(&kiln_par, &kiln_seq)?, "kiln's parallel and sequential squashfs images differ");

    // Initramfs: kiln's settings against the zstd CLI at the same level.
    let cpio_s = cpio.to_str().context("non-UTF-8 cpio path")?.to_string();
    let zl = ZSTD.level.to_string();
    let kz = sq("kiln.cpio.zst");
    let args = vec!["initramfs".into(), cpio_s.clone(), kz.clone(), zl.clone(), ZSTD.workers.to_string(), ZSTD.job_size.to_string()];
    rows.push(measure(&format!("kiln initramfs (zstd {}, {} workers)", ZSTD.level, ZSTD.workers), reps, || run_child(&me, &args), &kz)?);
    if !kiln_only {
        for t in ["-T1", "-T2"] {
            let out = sq("cli.zst");
            let args: Vec<String> = [&format!("-{zl}"), t, "-q", "-f", "-o", &out, &cpio_s].iter().map(|s| s.to_string()).collect();
            rows.push(measure(&format!("zstd -{zl} {t}"), reps, || run_tool("zstd", &args), &out)?);
        }
    }

    println!("\nmedians of {reps} runs; squashfs: zstd {level}, 128 KiB blocks; ratio = time / the reference tool's");
    println!("{:<36} {:>8} {:>8} {:>11} {:>10} {:>9}", "", "time", "CPU", "size", "peak RSS", "ratio");
    let reference = |prefix: &str| rows.iter().find(|r| r.label.starts_with(prefix)).map(|r| r.time);
    for r in &rows {
        let base =
            if r.label.contains("squashfs") { reference("mksquashfs") } else { reference("zstd") }.filter(|_| r.label.starts_with("kiln"));
        let ratio = base.map(|b| format!("{:.2}x", r.time / b)).unwrap_or_default();
        println!(
            "{:<36} {:>6.2} s {:>6.2} s {:>7.2} MiB {:>6.0} MiB {:>9}",
            r.label,
            r.time,
            r.cpu,
            r.size as f64 / 1048576.0,
            r.rss_kib as f64 / 1024.0,
            ratio
        );
    }

    if levels {
        println!("\nkiln's initramfs compression of the same input (in process, median of {reps}):");
        println!("{:<8} {:>8} {:>8} {:>11}", "level", "threads", "time", "size");
        let input = std::fs::read(&cpio)?;
        for level in [3, 9, 15, 19] {
            for workers in [0, 2] {
                let settings = ZstdSettings { level, workers, job_size: ZSTD.job_size };
                let mut times = Vec::new();
                let mut size = 0;
                for _ in 0..reps {
                    let t0 = Instant::now();
                    let mut z = zstd_encoder(Vec::new(), &settings)?;
                    z.write_all(&input)?;
                    size = z.finish()?.len();
                    times.push(t0.elapsed().as_secs_f64());
                }
                println!("{level:<8} {:>8} {:>6.2} s {:>7.2} MiB", workers.max(1), median(times), size as f64 / 1048576.0);
            }
        }
    }
    Ok(())
}

struct Row {
    label: String,
    time: f64,
    /// User + system time: on a host shared with other work, the wall time of a parallel run
    /// says little; its CPU time shows the work it did.
    cpu: f64,
    size: u64,
    rss_kib: u64,
}

/// Runs `run` `reps` times; the median time and peak RSS, and the size of `out`.
fn measure(label: &str, reps: usize, mut run: impl FnMut() -> anyhow::Result<(f64, Usage)>, out: &str) -> anyhow::Result<Row> {
    let (mut times, mut cpu, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let (t, u) = run().with_context(|| label.to_string())?;
        times.push(t);
        cpu.push(u.cpu);
        rss.push(u.rss_kib as f64);
    }
    let size = std::fs::metadata(out).with_context(|| format!("{label} wrote no {out}"))?.len();
    Ok(Row { label: label.into(), time: median(times), cpu: median(cpu), size, rss_kib: median(rss) as u64 })
}

/// Compares two files without holding either (the parent's RSS would count in its children's).
fn same_bytes(a: &str, b: &str) -> anyhow::Result<bool> {
    let (mut fa, mut fb) = (std::io::BufReader::new(std::fs::File::open(a)?), std::io::BufReader::new(std::fs::File::open(b)?));
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = fa.read(&mut ba)?;
        if na == 0 {
            return Ok(fb.read(&mut bb[..1])? == 0);
        }
        if fb.read_exact(&mut bb[..na]).is_err() || ba[..na] != bb[..na] {
            return Ok(false);
        }
    }
}

struct Usage {
    cpu: f64,
    rss_kib: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs a reference tool; its wall time (process start included) and peak RSS in KiB.
fn run_tool(tool: &str, args: &[String]) -> anyhow::Result<(f64, Usage)> {
    let t0 = Instant::now();
    let child = Command::new(tool).args(args).spawn().with_context(|| format!("running {tool} (install it)"))?;
    let rss = wait_rss(child.id()).with_context(|| format!("{tool} {args:?}"))?;
    Ok((t0.elapsed().as_secs_f64(), rss))
}

/// Runs this program's `--child` mode; the time it reports (the compression alone, not building
/// the tree from the directory) and its peak RSS in KiB (the whole process).
fn run_child(me: &Path, args: &[String]) -> anyhow::Result<(f64, Usage)> {
    let mut child = Command::new(me).arg("--child").args(args).stdout(Stdio::piped()).spawn()?;
    let mut out = String::new();
    child.stdout.take().context("child stdout")?.read_to_string(&mut out)?;
    let rss = wait_rss(child.id())?;
    let secs = out.trim().parse::<f64>().with_context(|| format!("child printed `{out}`"))?;
    Ok((secs, rss))
}

/// Waits for `pid` (instead of std's wait, which has no resource usage); its peak RSS in KiB.
fn wait_rss(pid: u32) -> anyhow::Result<Usage> {
    let mut status = 0;
    // SAFETY: plain FFI call with valid pointers; the rusage struct is fully written by the kernel.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
    ensure!(r == pid as libc::pid_t, "waiting for process {pid}: {}", std::io::Error::last_os_error());
    ensure!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "exited with status {status:#x}");
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Usage { cpu: secs(usage.ru_utime) + secs(usage.ru_stime), rss_kib: usage.ru_maxrss as u64 })
}

/// `--child squashfs DATA OUT LEVEL THREADS` or `--child initramfs CPIO OUT LEVEL WORKERS JOB`:
/// one kiln compression in its own process (so its peak RSS is its own); prints the seconds.
fn child(args: &[String]) -> anyhow::Result<()> {
    let arg = |i: usize| args.get(i).with_context(|| format!("--child: argument {i} missing"));
    let t = match arg(0)?.as_str() {
        "squashfs" => {
            let tree = tree_from_dir(Path::new(arg(1)?))?;
            let opts =
                SquashfsOptions { mtime: 1_700_000_000, zstd_level: arg(3)?.parse()?, block_size: 128 * 1024, threads: arg(4)?.parse()? };
            let t0 = Instant::now();
            let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(arg(2)?)?);
            write_squashfs(&tree, &mut f, &opts)?;
            f.flush()?;
            t0.elapsed()
        }
        "initramfs" => {
            let settings = ZstdSettings { level: arg(3)?.parse()?, workers: arg(4)?.parse()?, job_size: arg(5)?.parse()? };
            let t0 = Instant::now();
            // Streamed, as kiln streams the cpio archive into the compressor.
            let mut input = std::fs::File::open(arg(1)?)?;
            let mut z = zstd_encoder(std::io::BufWriter::new(std::fs::File::create(arg(2)?)?), &settings)?;
            std::io::copy(&mut input, &mut z)?;
            z.finish()?.flush()?;
            t0.elapsed()
        }
        other => bail!("--child: unknown stage {other}"),
    };
    println!("{}", t.as_secs_f64());
    Ok(())
}

/// Stops accepting bytes after `left` (an error ends the cpio writer).
struct LimitedWriter<W> {
    inner: W,
    left: u64,
}

impl<W: Write> Write for LimitedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other("sample limit reached"));
        }
        let n = (buf.len() as u64).min(self.left) as usize;
        let n = self.inner.write(&buf[..n])?;
        self.left -= n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
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
        let ft = md.file_type();
        // Device nodes as nodes (an extracted root has /dev/console: reading it would block).
        let (major, minor) = ((libc::major(md.rdev()) as u32), (libc::minor(md.rdev()) as u32));
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink(std::fs::read_link(e.path())?.to_str().context("non-UTF-8 link")?.to_string())
        } else if ft.is_char_device() {
            Kind::CharDevice { major, minor }
        } else if ft.is_block_device() {
            Kind::BlockDevice { major, minor }
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_file() {
            Kind::File(Content::HostFile(e.path().to_path_buf()))
        } else {
            continue; // sockets: not in a root image
        };
        tree.insert(&TreePath::parse(rel)?, Entry { meta, kind })?;
    }
    Ok(tree)
}
