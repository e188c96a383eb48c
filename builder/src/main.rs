//! The `kiln` command: parses arguments, sets up logging, calls the library, prints the error
//! chain and exits 0 (success), 2 (profile or usage error) or 1 (any other failure).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kiln::arch::Arch;
use kiln::error::{ResultExt, UsageError};
use kiln::pipeline::BuildOptions;
use kiln::profile::LoadedProfile;

/// `kiln --version`: the crate version and the commit it was built from.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("KILN_COMMIT"), ")");

/// kiln builds offline, self-installing edge Kubernetes disk images.
#[derive(Parser)]
#[command(name = "kiln", version = VERSION, about)]
struct Cli {
    /// Only warnings and errors on stderr; no progress bars.
    #[arg(long, short, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// More detail on stderr: -v adds debug lines, -vv traces. KILN_LOG (e.g. `kiln=debug`)
    /// overrides both flags.
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct InputArgs {
    /// The profile (YAML).
    profile: PathBuf,
    /// Build only these architectures (default: all in the profile). Repeatable.
    #[arg(long = "arch", value_name = "ARCH")]
    archs: Vec<Arch>,
    /// Debian mirror URL (default: the profile's `os.mirror`, else the host's apt sources).
    #[arg(long, env = "KILN_MIRROR")]
    mirror: Option<String>,
    /// Download cache (default: $KILN_CACHE_DIR, else ~/.cache/kiln).
    #[arg(long, env = "KILN_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Where the k3s release assets come from (cluster profiles), overriding
    /// `cluster.k3s.source`: a directory holding them, or an http(s):// mirror laid out like the
    /// release (`<URL>/<version>/<asset>`).
    #[arg(long, value_name = "DIR|URL")]
    k3s_assets: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Build images: OUT/<arch>/disk.img (and/or OUT/<arch>/netboot/), OUT/<arch>/manifest.json, OUT/SHA256SUMS.
    Build {
        #[command(flatten)]
        input: InputArgs,
        /// Output directory (default: out/<profile name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Use only the download cache; fail naming anything missing.
        #[arg(long)]
        offline: bool,
        /// What to write per architecture, comma-separated: `disk` (OUT/<arch>/disk.img),
        /// `disk.img.zst` / `disk.img.xz` (compressed copies, written in the same pass),
        /// `disk.img.bmap` (its block map for `kiln flash` and `bmaptool`), `netboot`
        /// (OUT/<arch>/netboot/, served by `kiln serve`).
        #[arg(long = "format", value_enum, value_delimiter = ',', default_value = "disk")]
        formats: Vec<kiln::pipeline::Format>,
        /// Print one JSON summary on stdout: every output with its path, size and sha256, or
        /// the errors.
        #[arg(long)]
        json: bool,
    },
    /// Start a site: write DIR/profile.yaml (a commented starter that builds as it is), an
    /// overlay directory and the schema for editor completion. Never replaces a file.
    Init {
        /// The directory to write into (created if missing).
        dir: PathBuf,
        /// The board or firmware family (`kiln platforms` lists them); sets the architectures.
        #[arg(long, default_value = kiln::profile::DEFAULT_PLATFORM)]
        platform: String,
        /// The cluster layout, from the matching example profile.
        #[arg(long, value_enum, default_value = "none")]
        cluster: kiln::init::Layout,
        /// The profile's name (default: from the directory's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Check profiles without downloading anything: schema and keys, values, files and overlays
    /// present, templates rendered with the profile's vars, platforms, the cluster inventory.
    /// Reports every problem with file:line:column; exits 2 if there is any.
    Check {
        /// The profiles (YAML).
        #[arg(required = true)]
        profiles: Vec<PathBuf>,
        /// Print one JSON summary instead: per profile, `ok` and its problems.
        #[arg(long)]
        json: bool,
    },
    /// Download and verify everything a build of the profile needs into the cache.
    Fetch {
        #[command(flatten)]
        input: InputArgs,
        /// Print one JSON summary on stdout (per architecture: packages and container images),
        /// or the errors.
        #[arg(long)]
        json: bool,
    },
    /// Boot an image in QEMU with its serial console on this terminal (Ctrl-a x quits).
    Run {
        /// The disk image (OUT/<arch>/disk.img).
        image: PathBuf,
        /// Architecture of the image (default: from the manifest.json beside it).
        #[arg(long)]
        arch: Option<Arch>,
        /// Directory holding the firmware files (default: $KILN_FIRMWARE_DIR, else Debian's paths).
        #[arg(long, env = "KILN_FIRMWARE_DIR")]
        firmware_dir: Option<PathBuf>,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        /// Keep the image unchanged: guest writes go to a temporary overlay.
        #[arg(long)]
        snapshot: bool,
        /// Another disk, after IMAGE (repeatable): `FILE`, or `FILE:SIZE` to create FILE as a
        /// blank (sparse) disk of SIZE if it does not exist yet, e.g. `target.img:8GiB` as the
        /// target of an installer image.
        #[arg(long = "disk", value_name = "FILE[:SIZE]")]
        disks: Vec<String>,
        /// Which disk the firmware boots: 0 is IMAGE, 1 the first --disk, and so on.
        #[arg(long, default_value_t = 0)]
        boot: usize,
    },
    /// Serve build outputs to machines booting from the network (iPXE) until Ctrl-C.
    Serve {
        /// A `kiln build` output directory (holding <arch>/netboot/ from `--format netboot`).
        dir: PathBuf,
        /// Address (or host name) and port to listen on.
        #[arg(long, default_value = "0.0.0.0:8080", value_name = "HOST:PORT")]
        listen: String,
        /// Forget that this machine is installed, so its next network boot installs again
        /// (repeatable; edits DIR/serve-state.json before serving).
        #[arg(long, value_name = "MAC")]
        reinstall: Vec<String>,
        /// Write a dnsmasq proxy-DHCP/TFTP snippet for PXE ROMs that must load iPXE first.
        #[arg(long, value_name = "FILE")]
        dnsmasq: Option<PathBuf>,
    },
    /// Write an image (raw, .zst or .xz) to an SD card, USB stick or file, only its mapped blocks
    /// when it has a bmap, then read it back to verify.
    Flash {
        /// The image: disk.img, disk.img.zst or disk.img.xz.
        image: PathBuf,
        /// The whole disk to write (/dev/sdX, /dev/mmcblkN), or a file (created at the image's size if new).
        device: PathBuf,
        /// The block map (default: IMAGE.bmap, or disk.img.bmap beside disk.img.zst/.xz, if present).
        #[arg(long, value_name = "FILE")]
        bmap: Option<PathBuf>,
        /// Do not ask for confirmation (needed when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
        /// Write even to a non-removable or mounted disk, the boot disk, a partition or a smaller device.
        #[arg(long)]
        force: bool,
        /// Skip reading the written data back to compare digests.
        #[arg(long)]
        no_verify: bool,
    },
    /// Create the cluster's secrets without building: the token (unless `cluster.token_file`
    /// gives one) and, with etcd members, the cluster CA and every certificate, in
    /// OUT/secrets/ (reused as they are if present). Back this directory up.
    Secrets {
        /// The profile (YAML).
        profile: PathBuf,
        /// Output directory the builds will use (default: out/<profile name>).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List the platforms (boards and firmware) kiln knows: name, architectures, boot methods.
    Platforms {
        /// Print a JSON list instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Print the profile's JSON schema, or with --markdown the profile reference.
    Schema {
        #[arg(long)]
        markdown: bool,
    },
    /// Print a shell completion script, e.g. `kiln completions bash > ~/.local/share/bash-completion/completions/kiln`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (kiln.1) to stdout, or with --dir write kiln.1 and one page per
    /// subcommand (kiln-build.1, ...) into DIR.
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| level.into());
    let stderr =
        tracing_subscriber::fmt::layer().with_ansi(colour_on_stderr()).with_writer(std::io::stderr).with_target(false).without_time();
    tracing_subscriber::registry().with(stderr.with_filter(filter)).with(WarningLog).init();
    match run(cli) {
        Ok(code) => code,
        // Output piped into a program that stopped reading (`kiln man | head`) is not a failure.
        Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if kiln::error::is_usage(&e) {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// Colour only for a person at a terminal: not in piped logs or files, and never with `NO_COLOR`
/// set to anything (https://no-color.org).
fn colour_on_stderr() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

fn options(input: &InputArgs, quiet: bool) -> BuildOptions {
    BuildOptions {
        archs: input.archs.clone(),
        out: None,
        offline: false,
        mirror: input.mirror.clone(),
        progress: !quiet && std::io::stderr().is_terminal(),
        cache_dir: input.cache_dir.clone(),
        k3s_assets: input.k3s_assets.clone(),
        formats: Vec::new(),
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Build { input, out, offline, formats, json } => {
            let build = || {
                let profile = checked_profile(&input.profile)?;
                let opts = BuildOptions { out, offline, formats, ..options(&input, cli.quiet) };
                kiln::pipeline::build(&profile, &opts)
            };
            let report = json_or_error(json, build())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&build_summary(&report))?);
            } else {
                for image in &report.images {
                    for path in output_paths(image) {
                        println!("{}: {}", image.arch, path.display());
                    }
                }
                println!("checksums: {}", report.checksums.display());
            }
        }
        Command::Fetch { input, json } => {
            let fetch = || kiln::pipeline::fetch(&checked_profile(&input.profile)?, &options(&input, cli.quiet));
            let fetched = json_or_error(json, fetch())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "ok": true, "archs": fetched, "warnings": warnings() }))?);
            }
        }
        Command::Run { image, arch, firmware_dir, memory, snapshot, disks, boot } => {
            if !image.exists() {
                return Err(UsageError(format!("no such image: {} (build one with `kiln build PROFILE`)", image.display())).into());
            }
            let arch = match arch {
                Some(a) => a,
                None => arch_from_manifest(&image)?,
            };
            let mut spec = kiln::qemu::VmSpec::new(arch);
            spec.disks = vec![kiln::qemu::Disk { path: image, snapshot }];
            for d in &disks {
                spec.disks.push(kiln::qemu::Disk { path: kiln::qemu::extra_disk(d)?, snapshot: false });
            }
            if boot >= spec.disks.len() {
                return Err(UsageError(format!("--boot {boot}: there are {} disks (0 is IMAGE)", spec.disks.len())).into());
            }
            spec.boot_disk = boot;
            spec.memory_mib = memory;
            spec.firmware_dir = firmware_dir;
            let status = kiln::qemu::run_interactive(&spec)?;
            return Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::from(1) });
        }
        Command::Flash { image, device, bmap, yes, force, no_verify } => {
            flash(&image, &device, bmap.as_deref(), FlashFlags { yes, force, verify: !no_verify, quiet: cli.quiet })?
        }
        Command::Serve { dir, listen, reinstall, dnsmasq } => serve(&dir, &listen, &reinstall, dnsmasq.as_deref())?,
        Command::Secrets { profile, out } => {
            let profile = checked_profile(&profile)?;
            let out = out.unwrap_or_else(|| kiln::pipeline::default_out_dir(&profile));
            let Some(c) = &profile.profile.cluster else {
                return Err(
                    UsageError(format!("{} has no `cluster` key: there are no cluster secrets to create", profile.path.display())).into()
                );
            };
            let secrets = kiln::pipeline::cluster_secrets(&profile, &out)?.context("the profile has a cluster")?;
            if c.token_file.is_none() {
                println!("token: {}", kiln::cluster::token::generated_path(&out, &c.name).display());
            }
            if let Some(pki) = &secrets.pki {
                println!("cluster CA: {} (certificate: {})", pki.dir.join("ca.pem").display(), pki.dir.join("ca.crt").display());
                println!(
                    "etcdctl: --cacert {} --cert {} --key {}",
                    pki.dir.join("ca.crt").display(),
                    pki.dir.join("etcdctl.crt").display(),
                    pki.dir.join("etcdctl.key").display()
                );
            }
        }
        Command::Platforms { json } => {
            let platforms = kiln::platform::Platform::all()?;
            if json {
                let summaries: Vec<_> = platforms.iter().map(kiln::platform::Platform::summary).collect();
                println!("{}", serde_json::to_string_pretty(&summaries)?);
            } else {
                print!("{}", kiln::platform::table(&platforms));
            }
        }
        Command::Schema { markdown } => {
            if markdown {
                print!("{}", kiln::profile::reference::markdown());
            } else {
                println!("{}", serde_json::to_string_pretty(&kiln::profile::json_schema())?);
            }
        }
        Command::Check { profiles, json } => return check(&profiles, json),
        Command::Init { dir, platform, cluster, name } => {
            let platform = kiln::platform::Platform::load(&platform).usage("--platform")?;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let name = name.unwrap_or_else(|| kiln::init::name_for(&dir));
            let w = kiln::init::write(&dir, &name, &platform, cluster).usage("kiln init")?;
            println!("wrote {}, {}/ and {}", w.profile.display(), w.overlay.display(), w.schema.display());
            println!("next: edit it, then `kiln check {0}` and `kiln build {0}`", w.profile.display());
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "kiln", &mut std::io::stdout());
        }
        Command::Man { dir } => man_pages(dir.as_deref())?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Every warning of this run (whatever `-q` or `KILN_LOG` show), for the `--json` summaries.
static WARNINGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// A tracing layer that keeps the text of each warning (and error) event in [`WARNINGS`].
struct WarningLog;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for WarningLog {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        // tracing orders levels by verbosity: WARN and ERROR are the ones at or below WARN.
        if *event.metadata().level() <= tracing::Level::WARN {
            let mut m = Message(String::new());
            event.record(&mut m);
            WARNINGS.lock().unwrap_or_else(|e| e.into_inner()).push(m.0);
        }
    }
}

fn warnings() -> Vec<String> {
    WARNINGS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// With `--json`, a failure is also printed on stdout as `{"ok": false, "error": ...}` (the
/// error still goes to stderr and sets the exit status).
fn json_or_error<T>(json: bool, r: Result<T>) -> Result<T> {
    if let (true, Err(e)) = (json, &r) {
        println!(
            "{}",
            serde_json::json!({ "ok": false, "error": format!("{e:#}"), "usage_error": kiln::error::is_usage(e), "warnings": warnings() })
        );
    }
    r
}

/// Per architecture: disk.img, the files derived from it (compressed copies, block map), the
/// netboot script.
fn output_paths(image: &kiln::pipeline::ArchOutputs) -> Vec<PathBuf> {
    let script = image.netboot.as_ref().map(|d| d.join(kiln::netboot::SCRIPT));
    let derived = image
        .manifest
        .outputs
        .iter()
        .filter(|o| kiln::pipeline::disk::DISK_FILES[1..].contains(&o.file.as_str()))
        .map(|o| image.dir.join(&o.file));
    image.disk.iter().cloned().chain(derived).chain(script).collect()
}

/// `kiln build --json`: the outputs of every architecture with their digests (from the
/// manifests kiln wrote), and where the manifests and checksums are.
fn build_summary(report: &kiln::pipeline::BuildReport) -> serde_json::Value {
    let archs: Vec<serde_json::Value> = report
        .images
        .iter()
        .map(|i| {
            let outputs: Vec<serde_json::Value> = i
                .manifest
                .outputs
                .iter()
                .map(|o| serde_json::json!({ "file": o.file, "path": i.dir.join(&o.file), "size": o.size, "sha256": o.sha256 }))
                .collect();
            serde_json::json!({
                "arch": i.arch,
                "dir": i.dir,
                "manifest": i.dir.join(kiln::pipeline::disk::MANIFEST),
                "kernel_version": i.manifest.kernel_version,
                "outputs": outputs,
            })
        })
        .collect();
    serde_json::json!({ "ok": true, "out_dir": report.out_dir, "checksums": report.checksums, "archs": archs, "warnings": warnings() })
}

/// Every static problem of a profile, sorted by position: the profile's own checks, then what
/// needs the rest of kiln (templates rendered with its vars, its platforms). Nothing is fetched.
fn profile_problems(path: &std::path::Path) -> Result<(Option<LoadedProfile>, Vec<kiln::profile::check::Problem>)> {
    let (loaded, mut problems) = LoadedProfile::check(path)?;
    if let Some(p) = &loaded {
        let mut more = kiln::pipeline::template_problems(p);
        for &a in &p.profile.arch {
            match kiln::platform::Platform::load_for(p.platform(a), a) {
                Err(e) => more.push(e.context(format!("key `platform.{a}`"))),
                Ok(platform) => {
                    if let Err(e) = platform.check_components(&p.profile.os.components) {
                        more.push(e.context("key `os.components`"));
                    }
                    if let Err(e) = platform.check_install_mode(p.profile.install.mode) {
                        more.push(e.context("key `install.mode`"));
                    }
                }
            }
        }
        problems.extend(p.locate(&more));
    }
    problems.sort_by_key(|p| (p.line, p.column));
    Ok((loaded, problems))
}

/// The profile for `build`, `fetch` and `secrets`: the same checks as `kiln check` first, so a
/// template or key error fails in milliseconds, listing every problem, before any download.
fn checked_profile(path: &std::path::Path) -> Result<LoadedProfile> {
    match profile_problems(path)? {
        (Some(p), problems) if problems.is_empty() => Ok(p),
        (_, problems) => Err(kiln::profile::ProfileError(kiln::profile::check::render_all(&path.display().to_string(), &problems)).into()),
    }
}

/// `kiln check`: every static problem of each profile, as text or one JSON summary.
fn check(profiles: &[PathBuf], json: bool) -> Result<ExitCode> {
    let mut summary = Vec::new();
    for path in profiles {
        let (_, problems) = profile_problems(path)?;
        let file = path.display().to_string();
        if !json {
            if problems.is_empty() {
                println!("{file}: ok");
            } else {
                eprintln!("{}", kiln::profile::check::render_all(&file, &problems));
            }
        }
        summary.push(serde_json::json!({ "profile": file, "ok": problems.is_empty(), "problems": problems }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    let ok = summary.iter().all(|s| s["ok"] == true);
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

/// `kiln man`: the page for `kiln` on stdout, or pages for it and every subcommand in DIR.
fn man_pages(dir: Option<&std::path::Path>) -> Result<()> {
    let cmd = <Cli as clap::CommandFactory>::command().version(VERSION);
    let Some(dir) = dir else {
        return Ok(clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let pages = std::iter::once(("kiln".to_string(), cmd.clone()))
        .chain(cmd.get_subcommands().filter(|c| c.get_name() != "help").map(|c| (format!("kiln-{}", c.get_name()), c.clone())));
    for (name, page) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(page.name(name.clone())).render(&mut out)?;
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `kiln serve`: apply --reinstall, print the DHCP settings, serve until SIGINT/SIGTERM.
fn serve(dir: &std::path::Path, listen: &str, reinstall: &[String], dnsmasq: Option<&std::path::Path>) -> Result<()> {
    use std::net::ToSocketAddrs;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    if !dir.is_dir() {
        return Err(UsageError(format!("{}: not a directory; pass a `kiln build` output directory", dir.display())).into());
    }
    let listen = listen
        .to_socket_addrs()
        .map_err(|e| UsageError(format!("--listen {listen}: {e}; give HOST:PORT, e.g. 0.0.0.0:8080 or pxe-host.lan:8080")))?
        .next()
        .ok_or_else(|| UsageError(format!("--listen {listen}: the name has no address")))?;
    if kiln::serve::Server::netboot_archs(dir).is_empty() {
        eprintln!(
            "warning: {} holds no netboot output (<arch>/netboot/boot.ipxe): machines booting from the network get nothing; build with `kiln build PROFILE --format netboot`",
            dir.display()
        );
    }
    if !reinstall.is_empty() {
        for mac in kiln::serve::reinstall(dir, reinstall)? {
            eprintln!("note: {mac} was not recorded as installed");
        }
    }
    let server = kiln::serve::Server::bind(dir, listen)?;
    let addr = server.local_addr();
    // The address machines use: the listen address, or a placeholder when listening on all.
    let url_host = if addr.ip().is_unspecified() { format!("<this host's address>:{}", addr.port()) } else { addr.to_string() };
    println!("kiln serve: {} on http://{addr}/ (Ctrl-C stops)", dir.display());
    print!("{}", kiln::serve::dhcp_settings(&url_host));
    if let Some(f) = dnsmasq {
        std::fs::write(f, kiln::serve::dnsmasq_snippet(&url_host)).with_context(|| format!("writing {}", f.display()))?;
        println!("dnsmasq snippet: {}", f.display());
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing the signal handler")?;
    }
    server.run(&stop)
}

/// Reads the architecture from the manifest.json written beside an image.
fn arch_from_manifest(image: &std::path::Path) -> Result<Arch> {
    let manifest = image.with_file_name(kiln::pipeline::disk::MANIFEST);
    let text = std::fs::read_to_string(&manifest).map_err(|e| {
        UsageError(format!("cannot tell the architecture of {}: {} ({e}); pass --arch", image.display(), manifest.display()))
    })?;
    let m: kiln::manifest::Manifest = serde_json::from_str(&text).map_err(|e| {
        // An architecture kiln does not know is a usage problem, as `--arch` with one would be.
        let v: Option<serde_json::Value> = serde_json::from_str(&text).ok();
        match v.as_ref().and_then(|v| v["arch"].as_str()).map(str::parse::<Arch>) {
            Some(Err(unknown)) => UsageError(format!("{}: {unknown}", manifest.display())).into(),
            _ => anyhow::Error::new(e).context(format!("parsing {}", manifest.display())),
        }
    })?;
    Ok(m.arch)
}

struct FlashFlags {
    yes: bool,
    force: bool,
    verify: bool,
    quiet: bool,
}

/// `kiln flash`: describe the target, apply the refusal rules, confirm, write with a progress
/// bar on a TTY, verify. Refusals and an unconfirmed write are usage errors (exit 2).
fn flash(image: &std::path::Path, device: &std::path::Path, bmap: Option<&std::path::Path>, f: FlashFlags) -> Result<()> {
    use kiln::flash;
    let img = flash::Image::open(image, bmap).usage("cannot use the image")?;
    let target = flash::inspect(device, &flash::HostRoots::default())?;
    println!("{}", flash::describe(&target).trim_end());
    match &img.bmap {
        Some(b) => {
            println!("image: {}, {} ({} mapped)", image.display(), kiln::size::human(b.image_size), kiln::size::human(b.mapped_bytes()))
        }
        None => println!(
            "image: {}, {} (no bmap: every byte is written{})",
            image.display(),
            img.size.map_or("size unknown".into(), kiln::size::human),
            img.expected.as_ref().map_or(String::new(), |e| format!(", checked against {}", e.manifest.display()))
        ),
    }
    let reasons = flash::refusals(&target, img.size);
    if !reasons.is_empty() {
        if !f.force {
            return Err(UsageError(flash::Refused { target: device.display().to_string(), reasons }.to_string()).into());
        }
        for r in &reasons {
            eprintln!("warning: --force: {r}");
        }
    }
    if !f.yes {
        if !std::io::stdin().is_terminal() {
            return Err(
                UsageError(format!("not writing to {}: stdin is not a terminal to confirm on; pass --yes", device.display())).into()
            );
        }
        eprint!("write {} to {}? [y/N] ", image.display(), device.display());
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer).context("reading the answer")?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Err(UsageError(format!("not writing to {}: not confirmed", device.display())).into());
        }
    }
    let mut medium = flash::write::open_target(device, img.size)?;
    let total = img.bmap.as_ref().map(|b| b.mapped_bytes()).or(img.size);
    let bar = (!f.quiet && std::io::stderr().is_terminal()).then(|| {
        let bar = total.map_or_else(indicatif::ProgressBar::no_length, indicatif::ProgressBar::new);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message("writing");
        bar
    });
    let start = std::time::Instant::now();
    let report = flash::flash(&img, &mut medium, flash::FlashOptions { verify: f.verify }, &mut |n| {
        if let Some(b) = &bar {
            b.set_position(n)
        }
    })
    .with_context(|| format!("writing {} to {}", image.display(), device.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    println!(
        "wrote {} of {} to {} in {:.1} s{}",
        kiln::size::human(report.written),
        kiln::size::human(report.image_size),
        device.display(),
        start.elapsed().as_secs_f64(),
        if f.verify { format!(", verified {}", kiln::size::human(report.verified)) } else { ", not verified (--no-verify)".into() }
    );
    Ok(())
}
