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
mod cli;
use cli::check::checked_profile;
use cli::report::{build_summary, json_or_error, output_paths, warnings, WarningLog};

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
        /// (OUT/<arch>/netboot/, served by `kiln serve`), `update` (OUT/<arch>/update/, a signed
        /// update bundle: needs the profile's `update:` and --signing-key).
        #[arg(long = "format", value_enum, value_delimiter = ',', default_value = "disk")]
        formats: Vec<kiln::pipeline::Format>,
        /// The minisign secret key (`kiln keygen`'s NAME.key) that signs `--format update`
        /// bundles.
        #[arg(long, env = "KILN_SIGNING_KEY", hide_env_values = true, value_name = "FILE")]
        signing_key: Option<PathBuf>,
        /// Mark the update bundle as a downgrade: devices install it over a newer version when
        /// the key that signed it is trusted with `allow_downgrade: true`.
        #[arg(long)]
        allow_downgrade: bool,
        /// Print one JSON summary on stdout: every output with its path, size and sha256, or
        /// the errors.
        #[arg(long)]
        json: bool,
        /// Make every intermediate result afresh instead of reusing earlier builds' (the
        /// module index, compressed squashfs blocks); downloads still come from the cache. The
        /// images are the same bytes either way.
        #[arg(long)]
        no_reuse: bool,
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
    /// Serve build outputs to machines booting from the network (iPXE), and update bundles as
    /// /updates/<arch>/ to `kiln-update`, until Ctrl-C.
    Serve {
        /// A `kiln build` output directory (holding <arch>/netboot/ from `--format netboot`,
        /// <arch>/update/ from `--format update`).
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
        /// Roll DIR's update bundles out to the inventory's nodes (profile `update.server`):
        /// etcd members one at a time, then servers, then agents; halt on the first failure.
        /// Progress: GET /rollout/status.
        #[arg(long)]
        rollout: bool,
        /// With --rollout: agents updated at once (etcd and server nodes: always one).
        #[arg(long, value_name = "N")]
        max_unavailable: Option<usize>,
        /// With --rollout: how often nodes report, in seconds (default 30).
        #[arg(long, value_name = "SECS")]
        poll: Option<String>,
        /// With --rollout: a node told to update that does not report within this fails the
        /// rollout (`90`, `90s`, `15m`, `1h`; default 15m).
        #[arg(long, value_name = "DURATION")]
        node_timeout: Option<String>,
        /// Also serve another output directory's update bundles as channel NAME, at
        /// /updates/NAME/<arch>/ (repeatable; DIR's own bundles stay at /updates/<arch>/).
        #[arg(long, value_name = "NAME=DIR")]
        channel: Vec<String>,
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
    /// Bound the cache of intermediate build results (downloads are kept): removes the least
    /// recently used results until at most --max-size remain.
    CacheGc {
        /// The most the intermediate results may take, e.g. 2GiB, 512MiB.
        #[arg(long, default_value = "2GiB")]
        max_size: kiln::size::Size,
        /// Download cache (default: $KILN_CACHE_DIR, else ~/.cache/kiln).
        #[arg(long, env = "KILN_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Create a key pair for signing update bundles: DIR/NAME.key (the secret, mode 0600, not
    /// encrypted: keep it off the appliances and out of backups anyone can read) and DIR/NAME.pub.
    /// Prints the public key line for the profile's `update.trusted_keys`. Never replaces a file.
    Keygen {
        /// The directory to write into (created if missing).
        #[arg(long, default_value = ".", value_name = "DIR")]
        out: PathBuf,
        /// The files' name: NAME.key and NAME.pub.
        #[arg(long, default_value = "kiln-update")]
        name: String,
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
        // Our own stdout piped into a program that stopped reading (`kiln man | head`) is not a
        // failure. Only a bare write error counts: a broken pipe under context (a download, a
        // device write) is a real failure and is reported below.
        Err(e)
            if e.chain().count() == 1
                && e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
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
        no_reuse: false,
        signing_key: None,
        allow_downgrade: false,
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Build { input, out, offline, formats, signing_key, allow_downgrade, json, no_reuse } => {
            let build = || {
                let profile = checked_profile(&input.profile)?;
                let opts = BuildOptions { out, offline, formats, signing_key, allow_downgrade, no_reuse, ..options(&input, cli.quiet) };
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
        Command::Flash { image, device, bmap, yes, force, no_verify } => cli::flash::flash(
            &image,
            &device,
            bmap.as_deref(),
            cli::flash::FlashFlags { yes, force, verify: !no_verify, quiet: cli.quiet },
        )?,
        Command::Serve { dir, listen, reinstall, dnsmasq, rollout, max_unavailable, poll, node_timeout, channel } => {
            let rollout = cli::serve::RolloutFlags { rollout, max_unavailable, poll, node_timeout };
            cli::serve::serve(&dir, &listen, &reinstall, dnsmasq.as_deref(), &rollout, &channel)?
        }
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
        Command::CacheGc { max_size, cache_dir } => {
            let root = match cache_dir {
                Some(d) => d,
                None => kiln::cache::Cache::default_root()?,
            };
            let r = kiln::reuse::gc(&root, max_size.0)?;
            println!(
                "{}: kept {} intermediate results ({}), removed {} ({}); downloads untouched",
                root.join("reuse").display(),
                r.kept_files,
                kiln::size::human(r.kept_bytes),
                r.removed_files,
                kiln::size::human(r.removed_bytes)
            );
        }
        Command::Keygen { out, name } => {
            let k = kiln::update::keygen(&out, &name)?;
            eprintln!("secret key: {} (mode 0600; sign with `kiln build --format update --signing-key {0}`)", k.secret.display());
            eprintln!("public key: {}", k.public.display());
            eprintln!("add this line to the profile's update.trusted_keys:");
            println!("{}", k.public_line);
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
        Command::Check { profiles, json } => return cli::check::check(&profiles, json),
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
