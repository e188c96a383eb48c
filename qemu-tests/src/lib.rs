//! Shared helpers for kiln's slow VM test tier: where the repository, the build output and the `kiln`
//! binary are, a per-test work directory, and how a test reports that it was skipped.
//!
//! Run the tier with `cargo test -p kiln-qemu-tests` (it is not a default workspace member, so plain
//! `cargo test` stays fast). Every VM runs under TCG; budget ~10 s per boot to an initramfs.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context};

pub mod lan;
pub mod layout;
pub mod ntp;
pub mod registry;
pub mod stand_in;
pub mod static_http;
pub mod tls;

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn repo_root() -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    crate_dir.parent().unwrap_or(crate_dir).to_path_buf()
}

/// The profile directory this test binary was built into (`<target>/debug`, `<target>/release`, ...).
///
/// Test executables live in `<target>/<profile>/deps/`, so this follows `CARGO_TARGET_DIR` and the
/// profile the tests were built with, without re-deriving cargo's rules.
pub fn profile_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running test executable")?;
    let deps = exe.parent().context("test executable has no parent directory")?;
    let profile = deps.parent().context("test executable is not under <target>/<profile>/deps")?;
    Ok(profile.to_path_buf())
}

/// The `kiln` binary, built from this workspace (once per test process) with the same profile and
/// target directory as the tests. `CARGO_BIN_EXE_kiln` exists only inside the `kiln` crate's own tests,
/// so this runs `cargo build -p kiln --bin kiln` instead; cargo makes it a no-op when up to date.
pub fn kiln_bin() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| build_kiln().map_err(|e| format!("{e:#}"))).clone().map_err(anyhow::Error::msg)
}

fn build_kiln() -> anyhow::Result<PathBuf> {
    let profile_dir = profile_dir()?;
    let target_dir = profile_dir.parent().context("profile directory has no parent")?;
    let profile = profile_dir.file_name().and_then(|n| n.to_str()).context("profile directory name is not UTF-8")?;
    // `cargo test` sets $CARGO to the cargo running it; use the same toolchain.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root()).args(["build", "--quiet", "-p", "kiln", "--bin", "kiln"]);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    cmd.env("CARGO_TARGET_DIR", target_dir);
    // The test process carries the variables cargo sets for it (CARGO_PKG_NAME=kiln-qemu-tests,
    // CARGO_MANIFEST_DIR, ...). Build scripts of dependencies (ring, via cc) rerun when those
    // change, so passing them on made this build and the next `cargo test` rebuild each other's
    // dependencies every time; the nested build gets the environment of a plain shell instead.
    for (key, _) in std::env::vars_os() {
        if let Some(k) = key.to_str() {
            if k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_MANIFEST_")
                || k == "CARGO_CRATE_NAME"
                || k == "CARGO_PRIMARY_PACKAGE"
                || k == "OUT_DIR"
                || k == "CARGO_TARGET_TMPDIR"
            {
                cmd.env_remove(&key);
            }
        }
    }
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("building kiln failed ({status}): {cmd:?}");
    }
    let bin = profile_dir.join("kiln");
    if !bin.is_file() {
        bail!("cargo built kiln but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// A fresh work directory for one test: `<target>/<profile>/qemu-tests/<name>`, emptied first and left
/// in place afterwards so console logs and images can be read after a failure.
pub fn work_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = profile_dir()?.join("qemu-tests").join(name);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("emptying work directory {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating work directory {}", dir.display()))?;
    Ok(dir)
}

/// Reports a test as skipped (cargo has no skip state: the test passes, and this line says why).
/// Only for inputs the machine cannot have (e.g. k3s release assets); a missing host tool is a failure.
pub fn skip(reason: &str) {
    // Written to the stderr handle, not with `eprintln!`: libtest captures the print macros (shown only on
    // failure), and a skip must be visible in a passing run.
    let _ = writeln!(std::io::stderr(), "skipped: {reason}");
}

/// Each boot reaches `[kiln] ready` within 3 minutes under TCG (the foundation issue's bound).
pub const BOOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);

/// The VM tier's shared download cache (`$KILN_CACHE_DIR`, else `<target>/<profile>/kiln-cache`), kept between
/// runs so reruns fetch nothing.
pub fn cache_dir() -> anyhow::Result<PathBuf> {
    match std::env::var_os("KILN_CACHE_DIR") {
        Some(d) => Ok(PathBuf::from(d)),
        None => Ok(profile_dir()?.join("kiln-cache")),
    }
}

/// The peak memory (MiB) of kiln's closing log line (`... finished in N s, peak memory M MiB`),
/// for the benchmarks.
pub fn peak_memory_mib(log: &str) -> Option<u64> {
    log.lines().rev().filter_map(|l| l.split("peak memory ").nth(1)).find_map(|rest| rest.trim().strip_suffix(" MiB")?.parse().ok())
}

/// Copies a directory tree (files and directories; a symlink's target is copied).
pub fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for e in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()))?;
        } else {
            fs::copy(e.path(), to.join(e.file_name())).with_context(|| format!("copying {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Runs kiln from the repository root with a given cache; returns (exit code, stdout + stderr).
pub fn kiln_with_cache(cache: &Path, args: &[&str]) -> anyhow::Result<(i32, String)> {
    let out =
        Command::new(kiln_bin()?).args(args).env("KILN_CACHE_DIR", cache).current_dir(repo_root()).output().context("running kiln")?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.code().unwrap_or(-1), text))
}

/// Builds `profiles/quickstart.yaml` for all three architectures into work dir `name`, once per test
/// process (every test of a test binary shares it).
pub fn quickstart(name: &'static str) -> anyhow::Result<&'static Path> {
    static OUT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    build_once(&OUT, "profiles/quickstart.yaml", name)
}

/// Builds a profile (path relative to the repository) for all its architectures into work dir
/// `name`, once per `cell`: give each profile a `static` cell so the tests of one binary share it.
pub fn build_once(cell: &'static OnceLock<Result<PathBuf, String>>, profile: &str, name: &str) -> anyhow::Result<&'static Path> {
    let r = cell.get_or_init(|| {
        let run = || -> anyhow::Result<PathBuf> {
            let out = work_dir(name)?;
            let started = std::time::Instant::now();
            let dest = out.to_str().context("non-UTF-8 work dir")?;
            let (code, log) = kiln_with_cache(&cache_dir()?, &["build", profile, "--out", dest])?;
            if code != 0 {
                bail!("kiln build {profile} failed (exit {code}):\n{log}");
            }
            eprintln!("{profile} build: {:.1} s", started.elapsed().as_secs_f64());
            Ok(out)
        };
        run().map_err(|e| format!("{e:#}"))
    });
    match r {
        Ok(p) => Ok(p.as_path()),
        Err(e) => bail!("{e}"),
    }
}

/// The build manifest of one architecture in a build output directory.
pub fn manifest(out: &Path, arch: kiln::arch::Arch) -> anyhow::Result<kiln::manifest::Manifest> {
    let path = out.join(arch.name()).join("manifest.json");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// sha256 (hex) of `len` bytes at `offset` of a file.
pub fn sha256_range(file: &Path, offset: u64, len: u64) -> anyhow::Result<String> {
    use sha2::Digest;
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    f.seek(SeekFrom::Start(offset))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = buf.len().min(left as usize);
        f.read_exact(&mut buf[..n]).with_context(|| format!("{} ends inside the {len}-byte range at {offset}", file.display()))?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(hex::encode(h.finalize()))
}

/// Runs a reference tool; a missing tool names the Debian package to install.
pub fn tool(cmd: &mut Command, package: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?} (install the `{package}` package)"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("{cmd:?} failed:\n{text}");
    }
    Ok(text)
}

/// The public key test profiles carry (`users[].ssh_authorized_keys`); [`build_with_test_key`]
/// replaces it with a key generated for the run, so no private key lives in the repository.
pub const PLACEHOLDER_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPLACEHOLDERPLACEHOLDERPLACEHOLDERPLACEH kiln-test-placeholder";

/// A build of a test profile with a run-time SSH key: the output directory and the private key.
pub struct KeyedBuild {
    pub out: PathBuf,
    pub key: PathBuf,
    /// The public key line the image authorises.
    pub public: String,
}

/// Generates an ed25519 key with ssh-keygen, writes `profile` (repository path) with
/// [`PLACEHOLDER_KEY`] replaced into work dir `name` and builds it there, once per `cell`.
pub fn build_with_test_key(
    cell: &'static OnceLock<Result<KeyedBuild, String>>,
    profile: &str,
    name: &str,
) -> anyhow::Result<&'static KeyedBuild> {
    let r = cell.get_or_init(|| {
        let run = || -> anyhow::Result<KeyedBuild> {
            let dir = work_dir(name)?;
            let key = dir.join("id_ed25519");
            tool(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"]).arg(&key), "openssh-client")?;
            let public = fs::read_to_string(key.with_extension("pub"))?.trim().to_string();
            let text = fs::read_to_string(repo_root().join(profile)).with_context(|| format!("reading {profile}"))?;
            if !text.contains(PLACEHOLDER_KEY) {
                bail!("{profile} lacks the placeholder key");
            }
            let file_name = Path::new(profile).file_name().context("profile path has no file name")?;
            let keyed = dir.join(file_name);
            fs::write(&keyed, text.replace(PLACEHOLDER_KEY, &public))?;
            let out = dir.join("out");
            let started = std::time::Instant::now();
            let (code, log) = kiln_with_cache(
                &cache_dir()?,
                &["build", keyed.to_str().context("non-UTF-8 work dir")?, "--out", out.to_str().context("non-UTF-8 work dir")?],
            )?;
            if code != 0 {
                bail!("kiln build {profile} failed (exit {code}):\n{log}");
            }
            eprintln!("{profile} build: {:.1} s", started.elapsed().as_secs_f64());
            Ok(KeyedBuild { out, key, public })
        };
        run().map_err(|e| format!("{e:#}"))
    });
    match r {
        Ok(b) => Ok(b),
        Err(e) => bail!("{e}"),
    }
}

/// A port on the host's loopback that is free right now (for a QEMU `hostfwd`).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `ssh` from the host to a VM's forwarded port; returns (success, stdout + stderr).
pub fn ssh(key: &Path, port: u16, user: &str, command: &str) -> anyhow::Result<(bool, String)> {
    ssh_at(None, key, "127.0.0.1", port, user, command)
}

/// `ssh` to `host:port`, from inside a test LAN's namespace when `via` is given.
pub fn ssh_at(via: Option<&lan::Lan>, key: &Path, host: &str, port: u16, user: &str, command: &str) -> anyhow::Result<(bool, String)> {
    let mut cmd = match via {
        Some(lan) => lan.command("ssh"),
        None => Command::new("ssh"),
    };
    let out = cmd
        .arg("-i")
        .arg(key)
        .args(["-p", &port.to_string()])
        .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
        .args(["-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=30", "-o", "LogLevel=ERROR"])
        .arg(format!("{user}@{host}"))
        .arg(command)
        .output()
        .context("running ssh (install the `openssh-client` package)")?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

/// How long after `[kiln] ready` the SSH server may take to accept a login (init starts it then).
pub const SSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Retries `ssh` until the server (started by init after the boot steps) lets the user in.
pub fn ssh_until_ok(key: &Path, port: u16, user: &str, command: &str) -> anyhow::Result<String> {
    ssh_at_until_ok(None, key, "127.0.0.1", port, user, command)
}

/// [`ssh_until_ok`] to `host:port`, from inside a test LAN's namespace when `via` is given.
pub fn ssh_at_until_ok(via: Option<&lan::Lan>, key: &Path, host: &str, port: u16, user: &str, command: &str) -> anyhow::Result<String> {
    let started = std::time::Instant::now();
    loop {
        let (ok, text) = ssh_at(via, key, host, port, user, command)?;
        if ok {
            return Ok(text);
        }
        if started.elapsed() > SSH_TIMEOUT {
            bail!("ssh {user}@{host}:{port} still fails after {SSH_TIMEOUT:?}:\n{text}");
        }
        // Polling a TCP service: there is no console line for "dropbear accepts logins".
        std::thread::sleep(std::time::Duration::from_secs(3));
    }
}

/// (first sector, last sector, name) of partition `number` in `sgdisk -p` output.
pub fn sgdisk_partition(table: &str, number: u32) -> Option<(u64, u64, String)> {
    table.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 7 && f[0] == number.to_string() {
            Some((f[1].parse().ok()?, f[2].parse().ok()?, f[6..].join(" ")))
        } else {
            None
        }
    })
}

/// Copies `len` bytes at `offset` of `img` into a new file (the reference tools want a filesystem
/// file, not a disk image).
pub fn extract_range(img: &Path, offset: u64, len: u64, to: &Path) -> anyhow::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::File::open(img).with_context(|| format!("opening {}", img.display()))?;
    f.seek(SeekFrom::Start(offset))?;
    let mut out = fs::File::create(to).with_context(|| format!("creating {}", to.display()))?;
    std::io::copy(&mut f.take(len), &mut out)?;
    Ok(())
}

/// "Flashes" a built image onto a larger medium: copies `image` to `disk` and extends the copy
/// (sparse) to `size`, so the in-place first boot makes the data partition in the new space.
pub fn flash_grown(image: &Path, disk: &Path, size: u64) -> anyhow::Result<()> {
    fs::copy(image, disk).with_context(|| format!("copying {} to {}", image.display(), disk.display()))?;
    fs::OpenOptions::new().write(true).open(disk)?.set_len(size)?;
    Ok(())
}

/// Waits for `[kiln] ready` on a VM's console, naming the VM in the error and logging the time.
pub fn wait_ready(vm: &mut kiln::qemu::Vm, who: &str, timeout: std::time::Duration) -> anyhow::Result<String> {
    let line = vm.wait_for("[kiln] ready", timeout).with_context(|| format!("{who} did not reach `[kiln] ready`"))?;
    eprintln!("{who}: `{}` after {:.1} s", line.trim(), vm.elapsed().as_secs_f64());
    Ok(line)
}
