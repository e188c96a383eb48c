//! The build pipeline: profile -> verified inputs -> root model -> initramfs, squashfs, ESP ->
//! GPT disk image + manifest, per architecture. Outputs appear only when every architecture
//! succeeded (staging directory, then renames).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use tracing::info;

use crate::arch::Arch;
use crate::debian::{self, Suite};
use crate::fetch::Fetcher;
use crate::gpt::{self, Guid, PartitionSpec};
use crate::manifest::{Input, Manifest, Output, PartitionRecord};
use crate::platform::Platform;
use crate::profile::{DiskSize, InstallMode, LoadedProfile};
use crate::tree::{Content, Kind, Tree, TreePath};

/// Packages every appliance has besides the profile's: busybox provides init, the shell and
/// the initramfs tools.
const BASE_PACKAGES: &[&str] = &["busybox-static"];
/// Packages whose programs first boot runs in the initramfs (in-place mode): sgdisk grows the
/// GPT and adds the data partition, mke2fs formats it. Only the programs and their libraries
/// are copied into the initramfs; the root does not get them.
const FIRSTBOOT_PACKAGES: &[&str] = &["gdisk", "e2fsprogs"];
/// (path in the packages, path in the initramfs) of the first-boot programs.
const FIRSTBOOT_PROGRAMS: &[(&str, &str)] = &[("usr/sbin/sgdisk", "sbin/sgdisk"), ("usr/sbin/mke2fs", "sbin/mke2fs")];
/// Modules the initramfs needs to mount the data partition. ext4 asks the crypto API for
/// `crc32c`, which the kernel would load through modprobe; the initramfs has none, so the
/// generic implementation is loaded up front.
const FIRSTBOOT_MODULES: &[&str] = &["crc32c_generic", "ext4"];
/// The package holding systemd-boot's EFI binaries (used on the ESP only, not installed).
const SYSTEMD_BOOT_PACKAGE: &str = "systemd-boot-efi";
/// The package holding iPXE's EFI binaries (netboot output only: the first network stage).
const IPXE_PACKAGE: &str = "ipxe";
const DEFAULT_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Command-line choices that shape a build.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Subset of the profile's architectures (empty: all of them).
    pub archs: Vec<Arch>,
    pub out: Option<PathBuf>,
    pub offline: bool,
    /// Overrides the profile's and the host's mirror.
    pub mirror: Option<String>,
    /// Progress bars (only on a TTY).
    pub progress: bool,
    /// Overrides the cache directory.
    pub cache_dir: Option<PathBuf>,
    /// Overrides the profile's `cluster.k3s.source`: a directory (relative to the working
    /// directory) or an `http(s)://` mirror of the k3s release assets.
    pub k3s_assets: Option<String>,
    /// What to write per architecture (empty: [`Format::Disk`]).
    pub formats: Vec<Format>,
}

/// An output format of `kiln build --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `OUT/<arch>/disk.img`: the disk image (or installer medium) to write to a disk or stick.
    Disk,
    /// `OUT/<arch>/netboot/`: kernel, installer initrd, system images and iPXE script for
    /// network installs served by `kiln serve`.
    Netboot,
}

impl BuildOptions {
    /// Whether a format was asked for (no formats given means `disk`).
    pub fn wants(&self, f: Format) -> bool {
        if self.formats.is_empty() {
            f == Format::Disk
        } else {
            self.formats.contains(&f)
        }
    }
}

/// A usage problem (exit status 2), as opposed to a build failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// What a successful build wrote.
#[derive(Debug)]
pub struct BuildReport {
    pub out_dir: PathBuf,
    /// Per architecture: its output directory (`OUT/<arch>`) and manifest.
    pub images: Vec<(Arch, PathBuf, Manifest)>,
}

/// Everything fetched and verified for one architecture.
struct Inputs {
    arch: Arch,
    suite: Suite,
    index: debian::Index,
    root_debs: Vec<(debian::Package, PathBuf)>,
    /// Packages the initramfs takes programs from (first boot), with their dependencies.
    firstboot_debs: Vec<(debian::Package, PathBuf)>,
    /// The kernel package; `None` when the kernel comes from `os.image`.
    kernel_deb: Option<(debian::Package, PathBuf)>,
    /// `os.image`: the base OS image, verified in the cache.
    os_image: Option<crate::oci::Image>,
    systemd_boot_deb: Option<(debian::Package, PathBuf)>,
    /// Netboot builds: Debian's `ipxe` (its EFI binary goes to `netboot/ipxe.efi`).
    ipxe_deb: Option<(debian::Package, PathBuf)>,
    /// Cluster images: the verified k3s binary and air-gap archive.
    k3s: Option<crate::k3s::Artifacts>,
    /// Container images (profile key `images`), verified in the cache.
    images: Vec<crate::oci::Image>,
    /// The cache the images' blobs are in (the archive is written from it).
    cache: crate::cache::Cache,
    /// Helm charts (profile key `charts`), verified or packed.
    charts: Vec<crate::deploy::chart::Chart>,
}

impl BuildOptions {
    fn fetcher(&self) -> Result<Fetcher> {
        let root = match &self.cache_dir {
            Some(d) => d.clone(),
            None => crate::cache::Cache::default_root()?,
        };
        Ok(Fetcher { offline: self.offline, cache: crate::cache::Cache::new(root), progress: self.progress })
    }

    /// The architectures to build, checked against the profile.
    pub fn archs_for(&self, profile: &LoadedProfile) -> Result<Vec<Arch>> {
        if self.archs.is_empty() {
            return Ok(profile.profile.arch.clone());
        }
        for a in &self.archs {
            if !profile.profile.arch.contains(a) {
                return Err(UsageError(format!(
                    "--arch {a}: the profile {} builds only {}",
                    profile.path.display(),
                    profile.profile.arch.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ")
                ))
                .into());
            }
        }
        Ok(self.archs.clone())
    }
}

fn suite_for(profile: &LoadedProfile, opts: &BuildOptions) -> Result<Suite> {
    let os = &profile.profile.os;
    let mirror = match (&opts.mirror, &os.mirror) {
        (Some(m), _) | (None, Some(m)) => m.trim_end_matches('/').to_string(),
        (None, None) => debian::sources::host_debian_mirror(Path::new("/etc/apt"))?,
    };
    let keyring = match &os.keyring {
        Some(k) => profile.resolve(k),
        None => PathBuf::from(DEFAULT_KEYRING),
    };
    if !keyring.exists() {
        bail!(
            "keyring {} does not exist: install the `debian-archive-keyring` package or set `os.keyring` in {}",
            keyring.display(),
            profile.path.display()
        );
    }
    Ok(Suite { mirror, suite: os.suite.clone(), keyring })
}

/// Resolves and downloads (or finds in the cache) every package one architecture needs.
fn gather(profile: &LoadedProfile, opts: &BuildOptions, fetcher: &Fetcher, arch: Arch) -> Result<Inputs> {
    let suite = suite_for(profile, opts)?;
    info!("{arch}: reading {} {} for {}", suite.mirror, suite.suite, arch.debian());
    let index = debian::load_index(fetcher, &suite, arch.debian())
        .with_context(|| format!("{arch}: loading the Debian {} package index", suite.suite))?;

    let mut roots: Vec<&str> = BASE_PACKAGES.to_vec();
    roots.extend(profile.profile.os.packages.iter().map(String::as_str));
    roots.extend(crate::provision::packages(&profile.profile));
    if let Some(c) = &profile.profile.cluster {
        roots.extend(crate::cluster::services::packages(c));
    }
    roots.extend(crate::containerd::packages(&profile.profile));
    let root_pkgs = debian::resolve::resolve(&index.packages, &roots)
        .with_context(|| format!("{arch}: resolving packages {}", roots.join(", ")))?;

    // `os.image`: the root and kernel come from an OCI image; kiln's runtime still from Debian.
    let p = &profile.profile;
    // One registry session for the base OS image, `images` and `charts`.
    let mut puller = crate::oci::pull::Puller::new(fetcher, &p.image_registries, &profile.base_dir());
    let os_image = p
        .os
        .image
        .as_ref()
        .map(|r| puller.image(r, arch))
        .transpose()
        .with_context(|| format!("{arch}: pulling the base OS image (`os.image`)"))?;
    // The kernel is installed without its dependencies (initramfs-tools, kmod, linux-base):
    // kiln writes the initramfs and module indexes itself.
    let kernel_pkg = if os_image.is_none() { Some(kernel_package(&index, arch)?) } else { None };
    let systemd_boot = one_package(&index, SYSTEMD_BOOT_PACKAGE).with_context(|| format!("{arch}: finding {SYSTEMD_BOOT_PACKAGE}"))?;

    let firstboot_pkgs = debian::resolve::resolve(&index.packages, FIRSTBOOT_PACKAGES)
        .with_context(|| format!("{arch}: resolving the first-boot packages {}", FIRSTBOOT_PACKAGES.join(", ")))?;

    let total: u64 = root_pkgs.iter().map(|p| p.size).sum::<u64>() + kernel_pkg.as_ref().map_or(0, |k| k.size);
    let kernel_from = kernel_pkg.as_ref().map_or_else(|| "the image's kernel".to_string(), |k| format!("kernel {}", k.version));
    info!("{arch}: {} packages + {kernel_from} ({} MiB)", root_pkgs.len(), total >> 20);
    let mut root_debs = Vec::new();
    for p in root_pkgs {
        let path = debian::fetch_deb(fetcher, &suite, &p)?;
        root_debs.push((p, path));
    }
    let mut firstboot_debs = Vec::new();
    for p in firstboot_pkgs {
        let path = debian::fetch_deb(fetcher, &suite, &p)?;
        firstboot_debs.push((p, path));
    }
    let fetch = |p: debian::Package| -> Result<(debian::Package, PathBuf)> {
        let path = debian::fetch_deb(fetcher, &suite, &p)?;
        Ok((p, path))
    };
    let kernel_deb = kernel_pkg.map(fetch).transpose()?;
    let systemd_boot_deb = systemd_boot.map(fetch).transpose()?;
    let ipxe_deb = if opts.wants(Format::Netboot) {
        let p = one_package(&index, IPXE_PACKAGE)
            .with_context(|| format!("{arch}: finding {IPXE_PACKAGE} (iPXE for the netboot output)"))?
            .with_context(|| format!("{arch}: the suite has no `{IPXE_PACKAGE}` package"))?;
        Some(fetch(p)?)
    } else {
        None
    };
    let k3s = match &profile.profile.cluster {
        Some(c) if c.needs_k3s() => Some(gather_k3s(profile, opts, fetcher, c, arch)?),
        _ => None,
    };
    let images: Vec<crate::oci::Image> = p
        .images
        .iter()
        .map(|i| puller.image(i, arch))
        .collect::<Result<_>>()
        .with_context(|| format!("{arch}: pulling the profile's `images`"))?;
    let charts = crate::deploy::chart::gather(&p.charts, &profile.base_dir(), &mut puller, source_date_epoch(&index)?)
        .with_context(|| format!("{}: {arch}: the profile's `charts`", profile.path.display()))?;
    // Everything is resolved: the package lists (~70k packages, the largest thing a build holds)
    // are done with. Inputs of every arch are gathered before the first image is written, so
    // keeping them would hold one list per arch until the end.
    let mut index = index;
    index.packages = Default::default();
    Ok(Inputs {
        arch,
        suite,
        index,
        root_debs,
        firstboot_debs,
        kernel_deb,
        os_image,
        systemd_boot_deb,
        ipxe_deb,
        k3s,
        images,
        cache: fetcher.cache.clone(),
        charts,
    })
}

/// The named package of the index alone, its dependencies left out (`None` if the suite lacks it).
fn one_package(index: &debian::Index, name: &str) -> Result<Option<debian::Package>> {
    Ok(debian::resolve::resolve(&index.packages, &[name])?.into_iter().find(|p| p.name == name))
}

/// The k3s assets of a cluster image: from `--k3s-assets`, else `cluster.k3s.source`, else the
/// k3s release downloads; verified and cached.
fn gather_k3s(profile: &LoadedProfile, opts: &BuildOptions, fetcher: &Fetcher, c: &crate::profile::cluster::Cluster, arch: Arch) -> Result<crate::k3s::Artifacts> {
    use crate::k3s::Source;
    let version = c
        .k3s
        .version
        .as_deref()
        .ok_or_else(|| UsageError(format!("{}: key `cluster.k3s.version`: required for cluster images", profile.path.display())))?;
    let source = match (&opts.k3s_assets, &c.k3s.source) {
        (Some(s), _) => Source::parse(s, Path::new(".")),
        (None, Some(s)) => Source::parse(s, &profile.base_dir()),
        (None, None) => Source::Release,
    };
    info!("{arch}: k3s {version} from {source}");
    crate::k3s::fetch(fetcher, &source, version, arch, c.k3s.sha256.get(&arch).map(String::as_str))
        .with_context(|| format!("{arch}: k3s {version}"))
}

/// The versioned kernel image package the arch's metapackage points at. Only these two names
/// are looked up: the kernel's own dependencies are not installed.
pub fn kernel_package(index: &debian::Index, arch: Arch) -> Result<debian::Package> {
    let meta_name = arch.kernel_metapackage();
    let meta = index
        .packages
        .versions(meta_name)
        .first()
        .with_context(|| format!("{arch}: kernel metapackage {meta_name} is not in the index"))?;
    let image = meta
        .depends
        .groups()
        .into_iter()
        .flatten()
        .find(|d| d.name.starts_with("linux-image-"))
        .with_context(|| format!("{meta_name} does not depend on a linux-image package"))?;
    index
        .packages
        .versions(&image.name)
        .first()
        .cloned()
        .with_context(|| format!("{arch}: kernel package {} (from {meta_name}) is not in the index", image.name))
}

/// `kiln fetch`: fills the cache with everything the profile's builds need.
pub fn fetch(profile: &LoadedProfile, opts: &BuildOptions) -> Result<()> {
    let started = std::time::Instant::now();
    let fetcher = opts.fetcher()?;
    for arch in opts.archs_for(profile)? {
        let inputs = gather(profile, opts, &fetcher, arch)?;
        info!("{arch}: {} packages cached", inputs.root_debs.len() + 2);
        if !inputs.images.is_empty() {
            let blobs: u64 = inputs.images.iter().flat_map(|i| i.all_blobs()).map(|b| b.size).sum();
            info!("{arch}: {} container images cached ({} MiB)", inputs.images.len(), blobs >> 20);
        }
    }
    log_finished("fetch", started);
    Ok(())
}

/// Removes the staging directory unless the build completed.
struct Staging {
    dir: PathBuf,
    done: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `kiln build`.
pub fn build(profile: &LoadedProfile, opts: &BuildOptions) -> Result<BuildReport> {
    let started = std::time::Instant::now();
    let archs = opts.archs_for(profile)?;
    let out_dir = opts.out.clone().unwrap_or_else(|| PathBuf::from("out").join(&profile.profile.name));
    let fetcher = opts.fetcher()?;
    let platforms: Vec<Platform> = archs
        .iter()
        .map(|a| Platform::load(profile.platform(*a)).map_err(|e| UsageError(format!("{}: {e:#}", profile.path.display())).into()))
        .collect::<Result<_>>()?;

    // The cluster token: from the profile's `token_file`, or generated once into
    // `<out>/secrets/` and reused by later builds. Never logged.
    let token = match &profile.profile.cluster {
        Some(c) => {
            let t = crate::cluster::token::load_or_create(profile, &out_dir);
            Some(if c.token_file.is_some() { t.map_err(|e| UsageError(format!("{}: {e:#}", profile.path.display())))? } else { t? })
        }
        None => None,
    };

    // Fetch everything before writing anything: a bad package name fails fast.
    let mut all_inputs = Vec::new();
    for arch in &archs {
        all_inputs.push(gather(profile, opts, &fetcher, *arch)?);
    }

    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating output directory {}", out_dir.display()))?;
    let staging_dir = out_dir.join(".kiln-staging");
    if staging_dir.exists() {
        std::fs::remove_dir_all(&staging_dir).with_context(|| format!("removing stale {}", staging_dir.display()))?;
    }
    let mut staging = Staging { dir: staging_dir.clone(), done: false };

    let mut built = Vec::new();
    for (inputs, platform) in all_inputs.iter().zip(&platforms) {
        let dir = staging_dir.join(inputs.arch.name());
        std::fs::create_dir_all(&dir)?;
        let manifest = build_arch(profile, opts, inputs, platform, &dir, token.as_ref())
            .with_context(|| format!("building the {} image", inputs.arch))?;
        built.push((inputs.arch, manifest));
    }

    // Everything succeeded: move the outputs into place.
    let mut images = Vec::new();
    for (arch, manifest) in built {
        let dest = out_dir.join(arch.name());
        std::fs::create_dir_all(&dest)?;
        // Outputs of formats not built this time are removed: they would not match the manifest.
        for f in ["disk.img", crate::netboot::DIR, "manifest.json"] {
            let (from, to) = (staging_dir.join(arch.name()).join(f), dest.join(f));
            if to.is_dir() {
                std::fs::remove_dir_all(&to).with_context(|| format!("removing the old {}", to.display()))?;
            } else if to.exists() {
                std::fs::remove_file(&to).with_context(|| format!("removing the old {}", to.display()))?;
            }
            if from.exists() {
                std::fs::rename(&from, &to).with_context(|| format!("moving {f} into {}", dest.display()))?;
            }
        }
        images.push((arch, dest, manifest));
    }
    write_sha256sums(&out_dir)?;
    staging.done = true;
    let _ = std::fs::remove_dir_all(&staging_dir);
    log_finished("build", started);
    Ok(BuildReport { out_dir, images })
}

/// The closing log line of `kiln build` and `kiln fetch`: time taken and peak memory.
fn log_finished(what: &str, started: std::time::Instant) {
    let peak = peak_memory_kib().map_or_else(|| "unknown".to_string(), |k| format!("{} MiB", k / 1024));
    info!("{what} finished in {:.0} s, peak memory {peak}", started.elapsed().as_secs_f64());
}

/// The process's peak resident memory (the kernel's `VmHWM`): memory must not grow with the
/// images bundled (README, Memory).
fn peak_memory_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim().parse().ok()
}

/// The build's timestamp: SOURCE_DATE_EPOCH if set, else the suite's Release date.
fn source_date_epoch(index: &debian::Index) -> Result<u64> {
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        return v.trim().parse().with_context(|| format!("SOURCE_DATE_EPOCH=`{v}` is not a number of seconds"));
    }
    index.release.date_unix.context("the suite's Release file has no parseable Date; set SOURCE_DATE_EPOCH")
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn build_arch(profile: &LoadedProfile, opts: &BuildOptions, inputs: &Inputs, platform: &Platform, dir: &Path, token: Option<&crate::cluster::Token>) -> Result<Manifest> {
    let arch = inputs.arch;
    let epoch = source_date_epoch(&inputs.index)?;

    // --- the root model ---------------------------------------------------------------
    info!("{arch}: unpacking {} packages", inputs.root_debs.len() + 1);
    // Large contents are parked in a spill file beside the image, not held in memory.
    let spill = crate::spill::Spill::create_in(dir)?;
    let mut root = Tree::merged_usr(arch).spill_to(spill.clone());
    let mut manifest_inputs = vec![
        Input { kind: "profile".into(), name: profile.profile.name.clone(), version: None, sha256: sha256_hex(&profile.source), size: Some(profile.source.len() as u64) },
        Input { kind: "index".into(), name: format!("{}/InRelease", inputs.suite.suite), version: None, sha256: inputs.index.inrelease_sha256.clone(), size: None },
        Input { kind: "index".into(), name: format!("{}/main/binary-{}/Packages", inputs.suite.suite, arch.debian()), version: None, sha256: inputs.index.packages_sha256.clone(), size: None },
    ];
    if let Some(image) = &inputs.os_image {
        // `os.image`: the image is the bottom of the root; Debian's packages go on top.
        crate::oci::base::lay_image(image, &inputs.cache, &mut root, arch)?;
        manifest_inputs.extend(crate::oci::manifest_inputs(std::slice::from_ref(image)));
    }
    for (pkg, path) in inputs.root_debs.iter().chain(inputs.kernel_deb.iter()) {
        crate::deb::unpack_deb(path, &mut root).with_context(|| format!("unpacking {} {}", pkg.name, pkg.version))?;
        manifest_inputs.push(deb_input(pkg));
    }
    let (kver, kernel) = match &inputs.os_image {
        Some(image) => crate::oci::base::take_kernel(&mut root, &image.reference, arch)?,
        None => {
            let kver = single_kernel_version(&root)?;
            let kernel = take_kernel(&mut root, arch, &kver)?;
            (kver, kernel)
        }
    };

    crate::setup::base_system(&mut root)?;
    crate::busybox::install_links(&mut root, "usr/bin", "busybox")?;
    let modules = crate::setup::module_indexes(&mut root, &kver)?;

    let context = template_context(profile, arch, &kver);
    let mut appliance = crate::assets::overlay("appliance")?;
    crate::overlay::render_templates(&mut appliance, &context, "kiln's appliance overlay")?;
    root.merge(&appliance)?;
    // First-boot configuration (accounts, ssh, network, ...) before the profile's overlays, which
    // may still replace any of its files.
    crate::provision::render(&profile.profile, &mut root, &modules)
        .map_err(|e| UsageError(format!("{}: {e:#}", profile.path.display())))?;
    // Every inventory node's configuration; the device picks its own at boot (35-identity.sh).
    if let (Some(cluster), Some(token)) = (&profile.profile.cluster, token) {
        crate::cluster::render(cluster, token, &mut root).context("rendering the cluster configuration")?;
        crate::cluster::services::install(cluster, &mut root, &modules).map_err(|e| UsageError(format!("{}: {e:#}", profile.path.display())))?;
    }
    if let Some(k3s) = &inputs.k3s {
        crate::k3s::place(k3s, &mut root).context("placing k3s in the root")?;
        manifest_inputs.extend(crate::k3s::manifest_inputs(k3s));
    }
    let engine = profile.profile.engine;
    if !inputs.images.is_empty() {
        // Written beside the image being built (the staging directory) and streamed into the
        // squashfs from there: never held in memory.
        let archive = dir.join(crate::oci::archive_name(arch, engine));
        let zstd = engine == crate::profile::containers::Engine::K3s;
        let size = crate::oci::layout::write_archive(&inputs.images, &inputs.cache, epoch, &archive, zstd)
            .with_context(|| format!("{arch}: writing the image archive {}", archive.display()))?;
        info!("{arch}: {} container images bundled ({} MiB)", inputs.images.len(), size >> 20);
        crate::oci::place(&archive, arch, engine, &mut root).context("placing the image archive in the root")?;
        manifest_inputs.extend(crate::oci::manifest_inputs(&inputs.images));
    }
    if engine == crate::profile::containers::Engine::Containerd {
        crate::containerd::install(&profile.profile.containers, &mut root, &modules, !inputs.images.is_empty())
            .map_err(|e| UsageError(format!("{}: {e:#}", profile.path.display())))?;
    }
    // What k3s deploys by itself (`manifests`, `charts`) and its `registries.yaml`.
    let deployed = crate::deploy::place_manifests(&profile.profile.manifests, &profile.base_dir(), &context, &mut root)
        .and_then(|mut m| {
            m.extend(crate::deploy::place_charts(&inputs.charts, &mut root)?);
            if let Some(r) = &profile.profile.registries {
                crate::registries::place(r, &profile.base_dir(), &mut root)?;
            }
            Ok(m)
        })
        .map_err(|e| UsageError(format!("{}: {e:#}", profile.path.display())))?;
    manifest_inputs.extend(deployed);
    for o in &profile.profile.overlays {
        let dir = profile.resolve(&o.value);
        let mut t = crate::overlay::read_dir(&dir)?;
        let origin = format!("overlay {}", dir.display());
        crate::overlay::render_templates(&mut t, &context, &origin)
            .map_err(|e| UsageError(format!("{}: {e:#}", profile.path.display())))?;
        root.merge(&t).with_context(|| origin.clone())?;
    }
    let hb = crate::overlay::renderer();
    for (i, f) in profile.profile.files.iter().enumerate() {
        let content = if f.template {
            crate::overlay::render(&hb, &f.content, &context, &format!("files[{i}] ({})", f.path))
                .map_err(|e| UsageError(format!("{}: {e:#}", profile.path.display())))?
        } else {
            f.content.clone()
        };
        root.add_file(&f.path, f.mode.0, content)?;
    }
    crate::inittab::check_programs(&root).map_err(|e| UsageError(format!("{}: {e:#}", profile.path.display())))?;

    // --- initramfs, squashfs, ESP ----------------------------------------------------
    let initramfs_modules: Vec<String> =
        FIRSTBOOT_MODULES.iter().map(|m| m.to_string()).chain(profile.profile.kernel.modules.iter().cloned()).collect();
    let mut initramfs = crate::initramfs::assemble(&root, &modules, platform, &initramfs_modules, &[])?;
    add_firstboot_tools(&mut initramfs.tree, inputs, &spill, &mut manifest_inputs)?;
    info!("{arch}: initramfs with {} modules", initramfs.modules.len());
    let initrd = Content::bytes(crate::initramfs::pack(&initramfs.tree, clamp32(epoch))?);
    // The netboot installer's initrd: the same, plus the platform's NIC drivers (kept out of the
    // disk image's initramfs, which never needs the network).
    let netboot_initrd = if opts.wants(Format::Netboot) {
        let mut nb = crate::initramfs::assemble(&root, &modules, platform, &initramfs_modules, &platform.netboot_modules)?;
        add_firstboot_tools(&mut nb.tree, inputs, &spill, &mut manifest_inputs)?;
        let nics: Vec<&String> = nb.modules.iter().filter(|m| !initramfs.modules.contains(m)).collect();
        info!("{arch}: netboot initrd with {} more modules for NICs", nics.len());
        Some(crate::initramfs::pack(&nb.tree, clamp32(epoch))?)
    } else {
        None
    };

    info!("{arch}: writing the squashfs root ({} entries)", root.len());
    // Written to a file in the staging directory, not into memory: with bundled container
    // images the root can be GiBs.
    let squashfs_path = dir.join("root.squashfs");
    let mut squashfs_file = std::io::BufWriter::with_capacity(
        1 << 20,
        File::options().read(true).write(true).create(true).truncate(true).open(&squashfs_path)
            .with_context(|| format!("creating {}", squashfs_path.display()))?,
    );
    crate::squashfs::write_squashfs(&root, &mut squashfs_file, &crate::squashfs::SquashfsOptions {
        mtime: clamp32(epoch),
        zstd_level: 15,
        block_size: 128 * 1024,
    })?;
    squashfs_file.flush()?;
    drop(squashfs_file);
    let squashfs_sha = crate::cache::sha256_file(&squashfs_path).with_context(|| format!("reading {}", squashfs_path.display()))?;
    let squashfs = Part::File { path: &squashfs_path, len: std::fs::metadata(&squashfs_path)?.len(), sha256: &squashfs_sha };

    // Identities derived from the inputs: same inputs, same GUIDs, same bytes.
    let mut ids = Sha256::new();
    for i in &manifest_inputs {
        ids.update(i.sha256.as_bytes());
    }
    let build_id = ids.finalize();
    let guid = |what: &str| Guid::derive("kiln", &[arch.name().as_bytes(), what.as_bytes(), &build_id]);
    let (disk_guid, esp_guid, root_a_guid, root_b_guid) = (guid("disk"), guid("esp"), guid("root-a"), guid("root-b"));

    let cmdline = kernel_cmdline(platform, arch, &root_a_guid, &profile.profile.kernel.cmdline);
    let systemd_boot = match &inputs.systemd_boot_deb {
        Some((pkg, path)) => Some(systemd_boot_binary(path, arch).with_context(|| format!("reading {} {}", pkg.name, pkg.version))?),
        None => None,
    };
    if let Some((pkg, _)) = &inputs.systemd_boot_deb {
        manifest_inputs.push(deb_input(pkg));
    }
    let title = format!("kiln {} ({arch})", profile.profile.name);
    let esp_tree = |cmdline: &str| {
        crate::esp::tree(platform, &crate::esp::BootFiles {
            arch,
            title: &title,
            kernel_version: &kver,
            kernel: kernel.clone(),
            initrd: initrd.clone(),
            systemd_boot: systemd_boot.clone(),
            cmdline,
        })
    };
    // The installed system's ESP, as a FAT image in memory.
    let esp = fat_image(&esp_tree(&cmdline)?, esp_guid, epoch)?;

    // --- the installed system's partitions ---------------------------------------------
    let root_slot = round_up(squashfs.len() + squashfs.len() / 4 + (16 << 20), 1 << 20);
    let specs = vec![
        PartitionSpec { name: "esp".into(), type_guid: gpt::ESP_TYPE.parse()?, guid: esp_guid, size: esp.len() as u64, attributes: 0 },
        PartitionSpec { name: "kiln-root-a".into(), type_guid: arch.root_partition_type().parse()?, guid: root_a_guid, size: root_slot, attributes: 0 },
        // The B slot for A/B updates: same size, empty, and marked "do not auto-mount" (bit 63).
        PartitionSpec { name: "kiln-root-b".into(), type_guid: arch.root_partition_type().parse()?, guid: root_b_guid, size: root_slot, attributes: 1 << 63 },
    ];
    let system_contents = [Some(Part::Bytes(&esp)), Some(squashfs), None];
    let fixed = match profile.profile.disk.size {
        DiskSize::Auto => None,
        DiskSize::Fixed(s) => Some(s.0),
    };
    let disk_size_error = |e: anyhow::Error| UsageError(format!("{}: key `disk.size`: {e:#}", profile.path.display()));
    let img_path = dir.join("disk.img");

    let (layout, partitions, install, image_cmdline) = match profile.profile.install.mode {
        InstallMode::InPlace => {
            let layout = gpt::plan(&specs, fixed, profile.profile.disk.headroom.0).map_err(disk_size_error)?;
            if opts.wants(Format::Disk) {
                write_disk(&img_path, &layout, disk_guid, &system_contents, image_mode(&profile.profile))?;
            }
            let records = partition_records(&layout, &system_contents);
            (layout, records, None, cmdline.clone())
        }
        InstallMode::Installer => {
            // The system as it will sit on the target; the medium carries it in other partitions.
            let target = gpt::plan(&specs, None, 0)?;
            let min_size = crate::installer::min_size(&profile.profile.install, &target)
                .map_err(|e| UsageError(format!("{}: {e}", profile.path.display())))?;
            let copies = system_copies(&target, &esp, &squashfs, (crate::installer::INSTALL_PARTITION, crate::installer::ESP_IMAGE_OFFSET), crate::installer::IMAGE_PARTITION);
            let plan = crate::installer::Plan {
                image_id: &hex::encode(&build_id[..8]),
                install: &profile.profile.install,
                min_size,
                disk_guid,
                target: &target,
                copies,
            }
            .render()?;
            let mut install_part = Vec::with_capacity(crate::installer::ESP_IMAGE_OFFSET as usize + esp.len());
            install_part.extend_from_slice(plan.as_bytes());
            install_part.resize(crate::installer::ESP_IMAGE_OFFSET as usize, 0);
            install_part.extend_from_slice(&esp);

            // The medium: its own ESP (booting the installer), the root squashfs, the plan and target ESP.
            let installer_cmdline = format!("{cmdline} {}", crate::installer::CMDLINE_FLAG);
            let (m_esp_guid, m_image_guid, m_install_guid) = (guid("installer-esp"), guid("installer-image"), guid("installer-plan"));
            let medium_esp = fat_image(&esp_tree(&installer_cmdline)?, m_esp_guid, epoch)?;
            let medium_specs = vec![
                PartitionSpec { name: "esp".into(), type_guid: gpt::ESP_TYPE.parse()?, guid: m_esp_guid, size: medium_esp.len() as u64, attributes: 0 },
                PartitionSpec { name: crate::installer::IMAGE_PARTITION.into(), type_guid: gpt::LINUX_DATA_TYPE.parse()?, guid: m_image_guid, size: squashfs.len(), attributes: 0 },
                PartitionSpec { name: crate::installer::INSTALL_PARTITION.into(), type_guid: gpt::LINUX_DATA_TYPE.parse()?, guid: m_install_guid, size: install_part.len() as u64, attributes: 0 },
            ];
            let medium_contents = [Some(Part::Bytes(&medium_esp)), Some(squashfs), Some(Part::Bytes(&install_part))];
            let layout = gpt::plan(&medium_specs, fixed, 0).map_err(disk_size_error)?;
            if opts.wants(Format::Disk) {
                write_disk(&img_path, &layout, guid("installer-disk"), &medium_contents, image_mode(&profile.profile))?;
            }
            let install = crate::manifest::InstallRecord {
                disk_guid: disk_guid.to_string(),
                partitions: partition_records(&target, &system_contents),
            };
            let records = partition_records(&layout, &medium_contents);
            (layout, records, Some(install), installer_cmdline)
        }
    };
    let mut outputs = Vec::new();
    if opts.wants(Format::Disk) {
        outputs.push(Output { file: "disk.img".into(), sha256: crate::cache::sha256_file(&img_path)?, size: layout.size });
    }
    let mut install = install;
    if let Some(nb_initrd) = netboot_initrd {
        let target = gpt::plan(&specs, None, 0)?;
        let min_size = crate::installer::min_size(&profile.profile.install, &target)
            .map_err(|e| UsageError(format!("{}: {e}", profile.path.display())))?;
        // A network install always reboots: `kiln serve` then sends the machine to its disk.
        let install_settings = crate::profile::Install { after: crate::profile::AfterInstall::Reboot, ..profile.profile.install.clone() };
        let plan = crate::installer::Plan {
            image_id: &hex::encode(&build_id[..8]),
            install: &install_settings,
            min_size,
            disk_guid,
            target: &target,
            copies: system_copies(&target, &esp, &squashfs, (crate::netboot::ESP, 0), crate::netboot::ROOT),
        }
        .render()?;
        let inventory = match root.get_str("etc/kiln/inventory").map(|e| &e.kind) {
            Some(Kind::File(c)) => c.read()?.to_vec(),
            _ => Vec::new(),
        };
        let script = crate::netboot::script_template(&profile.profile.name, arch.name(), &cmdline);
        let kernel_bytes = kernel.read()?;
        let (ipxe_pkg, ipxe_path) = inputs.ipxe_deb.as_ref().context("netboot build without the ipxe package")?;
        let ipxe = ipxe_efi_binary(ipxe_path, arch).with_context(|| format!("reading {} {}", ipxe_pkg.name, ipxe_pkg.version))?;
        let ipxe = ipxe.read()?;
        let files: [(&str, Part); 8] = [
            (crate::netboot::IPXE, Part::Bytes(&ipxe)),
            (crate::netboot::KERNEL, Part::Bytes(&kernel_bytes)),
            (crate::netboot::INITRD, Part::Bytes(&nb_initrd)),
            (crate::netboot::PLAN, Part::Bytes(plan.as_bytes())),
            (crate::netboot::ESP, Part::Bytes(&esp)),
            (crate::netboot::ROOT, squashfs),
            (crate::netboot::INVENTORY, Part::Bytes(&inventory)),
            (crate::netboot::SCRIPT, Part::Bytes(script.as_bytes())),
        ];
        let nb_dir = dir.join(crate::netboot::DIR);
        std::fs::create_dir_all(&nb_dir).with_context(|| format!("creating {}", nb_dir.display()))?;
        info!("{arch}: writing {}", nb_dir.display());
        for (name, part) in files {
            write_part(&nb_dir.join(name), &part, image_mode(&profile.profile))?;
            outputs.push(Output { file: format!("{}/{name}", crate::netboot::DIR), sha256: part.sha256(), size: part.len() });
        }
        let input = deb_input(ipxe_pkg);
        if !manifest_inputs.contains(&input) {
            manifest_inputs.push(input);
        }
        if install.is_none() {
            install = Some(crate::manifest::InstallRecord { disk_guid: disk_guid.to_string(), partitions: partition_records(&target, &system_contents) });
        }
    }
    manifest_inputs.sort();
    let manifest = Manifest {
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        profile: profile.profile.name.clone(),
        arch: arch.name().into(),
        suite: inputs.suite.suite.clone(),
        kernel_version: kver,
        source_date_epoch: epoch,
        kernel_cmdline: image_cmdline,
        disk_guid: disk_guid.to_string(),
        inputs: manifest_inputs,
        partitions,
        install,
        initramfs_modules: initramfs.modules,
        outputs,
    };
    std::fs::write(dir.join("manifest.json"), manifest.to_json())?;
    Ok(manifest)
}

/// The two ranges an installer copies onto the target: the ESP image and the root squashfs,
/// from `esp_source` (medium partition or netboot file, and offset) and `root_source` (offset 0).
fn system_copies(target: &gpt::DiskLayout, esp: &[u8], squashfs: &Part, esp_source: (&'static str, u64), root_source: &'static str) -> Vec<crate::installer::Copy> {
    vec![
        crate::installer::Copy {
            name: "esp".into(),
            source_partition: esp_source.0,
            source_offset: esp_source.1,
            target_offset: target.partitions[0].offset(),
            length: esp.len() as u64,
            sha256: sha256_hex(esp),
        },
        crate::installer::Copy {
            name: "kiln-root-a".into(),
            source_partition: root_source,
            source_offset: 0,
            target_offset: target.partitions[1].offset(),
            length: squashfs.len(),
            sha256: squashfs.sha256(),
        },
    ]
}

/// Writes one output file with an exact mode (0600 when the build holds secrets).
/// Writes a part to its own file (the netboot output): bytes, or a copy of the staged file.
fn write_part(path: &Path, part: &Part, mode: u32) -> Result<()> {
    match part {
        Part::Bytes(b) => write_file(path, b, mode),
        Part::File { path: from, .. } => {
            let _ = std::fs::remove_file(path);
            std::fs::copy(from, path).with_context(|| format!("copying {} to {}", from.display(), path.display()))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
            File::open(path)?.sync_all()?;
            Ok(())
        }
    }
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = File::options().write(true).create(true).truncate(true).mode(mode).open(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()?;
    Ok(())
}

/// Unpacks the first-boot packages into a scratch tree and copies their programs, with the
/// libraries and loader they need, into the initramfs.
fn add_firstboot_tools(initramfs: &mut Tree, inputs: &Inputs, spill: &std::sync::Arc<crate::spill::Spill>, manifest_inputs: &mut Vec<Input>) -> Result<()> {
    let mut scratch = Tree::merged_usr(inputs.arch).spill_to(spill.clone());
    for (pkg, path) in &inputs.firstboot_debs {
        crate::deb::unpack_deb(path, &mut scratch).with_context(|| format!("unpacking {} {}", pkg.name, pkg.version))?;
        let input = deb_input(pkg);
        if !manifest_inputs.contains(&input) {
            manifest_inputs.push(input);
        }
    }
    let libs = crate::elfclosure::copy_programs(&scratch, initramfs, inputs.arch, FIRSTBOOT_PROGRAMS)
        .context("copying the first-boot programs into the initramfs")?;
    info!("{}: initramfs first-boot tools with {} libraries", inputs.arch, libs.len());
    Ok(())
}

fn deb_input(pkg: &debian::Package) -> Input {
    Input {
        kind: "deb".into(),
        name: pkg.name.clone(),
        version: Some(pkg.version.clone()),
        sha256: pkg.sha256.clone(),
        size: Some(pkg.size),
    }
}

fn clamp32(t: u64) -> u32 {
    t.min(u32::MAX as u64) as u32
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

fn kernel_cmdline(platform: &Platform, arch: Arch, root: &Guid, extra: &str) -> String {
    let mut c = format!("root=PARTUUID={root} kiln.rootname=kiln-root-a {}", platform.console_args(arch));
    if !extra.trim().is_empty() {
        c.push(' ');
        c.push_str(extra.trim());
    }
    c
}

fn template_context(profile: &LoadedProfile, arch: Arch, kver: &str) -> serde_json::Value {
    serde_json::json!({
        "name": profile.profile.name,
        "arch": arch.name(),
        "profile": profile.profile,
        "vars": profile.profile.vars,
        "kiln": {
            "version": env!("CARGO_PKG_VERSION"),
            "console": arch.serial_console(),
            "kernel_version": kver,
            "debian_arch": arch.debian(),
        }
    })
}

fn single_kernel_version(root: &Tree) -> Result<String> {
    let versions = crate::kmod::kernel_versions(root);
    match versions.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no kernel modules directory in the root: the kernel package did not unpack"),
        many => bail!("several kernels in the root ({}); kiln boots exactly one", many.join(", ")),
    }
}

/// Takes the bootable kernel image out of the root (it lives on the ESP) and drops `/boot`.
fn take_kernel(root: &mut Tree, arch: Arch, kver: &str) -> Result<Content> {
    let path = format!("{}{kver}", arch.kernel_file_prefix());
    let content = match root.get_str(&path).map(|e| &e.kind) {
        Some(Kind::File(c)) => c.clone(),
        _ => bail!("the kernel package has no /{path}"),
    };
    root.remove(&TreePath::parse("boot")?);
    Ok(content)
}

/// systemd-boot's EFI binary for the arch, from the systemd-boot-efi package.
fn systemd_boot_binary(deb: &Path, arch: Arch) -> Result<Content> {
    file_from_deb(deb, arch, &format!("usr/lib/systemd/boot/efi/{}", arch.systemd_boot_file()), "")
}

/// iPXE's EFI binary for the arch (the netboot output's first stage), from the ipxe package.
fn ipxe_efi_binary(deb: &Path, arch: Arch) -> Result<Content> {
    file_from_deb(deb, arch, &format!("usr/lib/ipxe/{}", arch.ipxe_efi_file()), " (Debian ships per-architecture iPXE EFI binaries from trixie on)")
}

/// One file of a package, unpacked into a scratch tree; `hint` follows the error if it is missing.
fn file_from_deb(deb: &Path, arch: Arch, path: &str, hint: &str) -> Result<Content> {
    let mut t = Tree::merged_usr(arch);
    crate::deb::unpack_deb(deb, &mut t)?;
    match t.get_str(path).map(|e| &e.kind) {
        Some(Kind::File(c)) => Ok(c.clone()),
        _ => bail!("{} has no /{path}{hint}", deb.display()),
    }
}

/// The FAT32 image of an ESP tree, sized for its contents plus 8 MiB.
fn fat_image(esp: &Tree, guid: Guid, epoch: u64) -> Result<Vec<u8>> {
    let size = crate::fat::fat32_size_for(esp, 8 << 20)?;
    let mut out = std::io::Cursor::new(Vec::with_capacity(size as usize));
    crate::fat::write_fat32(&mut out, size, esp, &crate::fat::FatOptions {
        // The volume id comes from the partition GUID: derived, so reproducible.
        volume_id: u32::from_le_bytes(guid.to_disk_bytes()[..4].try_into().expect("4 bytes")),
        label: "KILN-ESP".into(),
        mtime: epoch,
    })
    .context("writing the EFI system partition")?;
    let mut bytes = out.into_inner();
    bytes.resize(size as usize, 0);
    Ok(bytes)
}

/// The file mode of a built image. Images that carry secrets (the cluster token in the k3s
/// configs, users' password hashes in /etc/shadow) are readable by their owner only: the 0600
/// modes inside the image protect nothing once the image file itself is world-readable.
pub fn image_mode(p: &crate::profile::Profile) -> u32 {
    let secrets = p.cluster.is_some() || p.users.iter().any(|u| u.password_hash.is_some());
    if secrets {
        0o600
    } else {
        0o644
    }
}

/// Writes a sparse disk image: the partition table, then each partition's contents (`None`:
/// left empty) at its offset.
/// `mode` is the image file's permission bits (see [`image_mode`]).
fn write_disk(path: &Path, layout: &gpt::DiskLayout, disk_guid: Guid, contents: &[Option<Part>], mode: u32) -> Result<()> {
    info!("writing {} ({} MiB){}", path.display(), layout.size >> 20, if mode == 0o600 { ", mode 0600: it holds secrets" } else { "" });
    let mut img = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    // The mode given at creation is masked by the umask; set it exactly.
    img.set_permissions(std::fs::Permissions::from_mode(mode))?;
    img.set_len(layout.size)?;
    gpt::write_gpt(&mut img, layout, disk_guid).context("writing the partition table")?;
    for (part, content) in layout.partitions.iter().zip(contents) {
        if let Some(content) = content {
            img.seek(SeekFrom::Start(part.offset()))?;
            let written = match content {
                Part::Bytes(bytes) => img.write_all(bytes),
                Part::File { path, .. } => File::open(path).and_then(|mut f| std::io::copy(&mut f, &mut img).map(|_| ())),
            };
            written.with_context(|| format!("writing partition {} into {}", part.name, path.display()))?;
        }
    }
    img.sync_all()?;
    Ok(())
}

/// What goes into a partition: bytes built in memory (ESP, install plan) or a file in the
/// staging directory (the root squashfs, streamed onto the disk; its digest taken once).
#[derive(Debug, Clone, Copy)]
enum Part<'a> {
    Bytes(&'a [u8]),
    File { path: &'a Path, len: u64, sha256: &'a str },
}

impl Part<'_> {
    fn len(&self) -> u64 {
        match self {
            Part::Bytes(b) => b.len() as u64,
            Part::File { len, .. } => *len,
        }
    }

    fn sha256(&self) -> String {
        match self {
            Part::Bytes(b) => sha256_hex(b),
            Part::File { sha256, .. } => sha256.to_string(),
        }
    }
}

/// The manifest's view of a layout: each partition with the digest of what was written into it.
fn partition_records(layout: &gpt::DiskLayout, contents: &[Option<Part>]) -> Vec<PartitionRecord> {
    layout
        .partitions
        .iter()
        .zip(contents)
        .enumerate()
        .map(|(i, (p, content))| PartitionRecord {
            number: i as u32 + 1,
            name: p.name.clone(),
            type_guid: p.type_guid.to_string(),
            guid: p.guid.to_string(),
            offset: p.offset(),
            size: p.size(),
            content_sha256: content.map(|c| c.sha256()),
            content_size: content.map(|c| c.len()),
        })
        .collect()
}

/// `SHA256SUMS` over every image and manifest in the output directory, sorted by path.
fn write_sha256sums(out_dir: &Path) -> Result<()> {
    let mut lines = BTreeMap::new();
    for arch in Arch::ALL {
        let netboot = crate::netboot::FILES.iter().map(|f| format!("{}/{f}", crate::netboot::DIR));
        for f in ["disk.img".to_string(), "manifest.json".to_string()].into_iter().chain(netboot) {
            let p = out_dir.join(arch.name()).join(&f);
            if p.exists() {
                lines.insert(format!("{}/{f}", arch.name()), crate::cache::sha256_file(&p)?);
            }
        }
    }
    let text: String = lines.iter().map(|(p, h)| format!("{h}  {p}\n")).collect();
    let tmp = out_dir.join(".SHA256SUMS.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, out_dir.join("SHA256SUMS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::parse;

    #[test]
    fn images_with_secrets_are_written_owner_only() -> Result<()> {
        let plain = parse("name: d\narch: [x86_64]\nusers: [{name: ops}]\n").unwrap();
        let hashed = parse("name: d\narch: [x86_64]\nusers: [{name: ops, password_hash: \"$y$j9T$abcdefgh$0123456789\"}]\n").unwrap();
        let cluster = parse("name: d\narch: [x86_64]\ncluster: {name: lab, nodes: [{name: s1, mac: \"52:54:00:00:00:01\", roles: [server]}]}\n").unwrap();
        assert_eq!((image_mode(&plain), image_mode(&hashed), image_mode(&cluster)), (0o644, 0o600, 0o600));

        let dir = tempfile::tempdir()?;
        let spec = gpt::PartitionSpec { name: "p".into(), type_guid: Guid::linux_data_type(), guid: Guid::derive("test", &[b"g"]), size: 1 << 20, attributes: 0 };
        let layout = gpt::plan(&[spec], None, 0)?;
        for mode in [0o600, 0o644] {
            let path = dir.path().join(format!("disk-{mode:o}.img"));
            write_disk(&path, &layout, Guid::derive("test", &[b"d"]), &[Some(Part::Bytes(&[1u8; 512]))], mode)?;
            assert_eq!(std::fs::metadata(&path)?.permissions().mode() & 0o777, mode);
        }
        Ok(())
    }
}
