//! The build pipeline: profile -> verified inputs -> root model -> initramfs, squashfs, ESP ->
//! GPT disk image + manifest, per architecture. Outputs appear only when every architecture
//! succeeded (staging directory, then renames).
//!
//! One module per stage: [`inputs`] (fetch and verify), [`root`] (the root filesystem and its
//! squashfs), [`boot`] (initramfs, command line, ESP), [`disk`] (the partition layouts and the
//! disk image), [`update`] (the signed update bundle); the netboot directory is `crate::netboot`'s. [`options`] holds what shapes a
//! build and what it reports.

mod boot;
pub mod disk;
mod inputs;
mod options;
mod root;
mod unpack;
mod update;
pub use root::template_problems;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tracing::info;

use crate::arch::Arch;
use crate::error::ResultExt;
use crate::manifest::{InstallRecord, Manifest, Output};
use crate::output::Part;
use crate::platform::Platform;
use crate::profile::LoadedProfile;
use crate::tree::Kind;

pub use disk::image_mode;
pub use inputs::kernel_package;
pub use options::{ArchOutputs, BuildOptions, BuildReport, Format};

use inputs::Inputs;
use root::ManifestInputs;

/// What `kiln fetch` put in (or found in) the cache for one architecture.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Fetched {
    pub arch: Arch,
    /// Debian packages: the root's, plus the kernel and busybox for the initramfs.
    pub packages: usize,
    pub container_images: usize,
    pub container_image_bytes: u64,
}

/// `kiln fetch`: fills the cache with everything the profile's builds need.
pub fn fetch(profile: &LoadedProfile, opts: &BuildOptions) -> Result<Vec<Fetched>> {
    let started = std::time::Instant::now();
    let fetcher = opts.fetcher(profile)?;
    let mut fetched = Vec::new();
    for arch in opts.archs_for(profile)? {
        let inputs = inputs::gather(profile, opts, &fetcher, arch)?;
        let f = Fetched {
            arch,
            packages: inputs.root_debs.len() + 2,
            container_images: inputs.images.len(),
            container_image_bytes: inputs.images.iter().flat_map(|i| i.all_blobs()).map(|b| b.size).sum(),
        };
        info!("{arch}: {} packages cached", f.packages);
        if f.container_images > 0 {
            info!("{arch}: {} container images cached ({} MiB)", f.container_images, f.container_image_bytes >> 20);
        }
        fetched.push(f);
    }
    log_finished("fetch", started);
    Ok(fetched)
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

/// Where a build of `profile` writes when no `--out` is given: `out/<profile name>`.
pub fn default_out_dir(profile: &LoadedProfile) -> PathBuf {
    PathBuf::from("out").join(&profile.profile.name)
}

/// The cluster's secrets for a build into `out_dir` (`None` without a `cluster` key): the token
/// from the profile's `token_file` or generated once into `<out>/secrets/`, and, with etcd
/// members, the cluster PKI in `<out>/secrets/<cluster>-pki/`, created once and reused by later
/// builds (`kiln build`, `kiln secrets`), and the rollout master key (`crate::rollout`). Never logged.
pub fn cluster_secrets(profile: &LoadedProfile, out_dir: &Path) -> Result<Option<crate::cluster::Secrets>> {
    let Some(c) = &profile.profile.cluster else { return Ok(None) };
    let t = crate::cluster::token::load_or_create(profile, out_dir);
    let token = if c.token_file.is_some() { t.in_profile(&profile.path)? } else { t? };
    let pki = crate::cluster::pki::load_or_create(c, out_dir)
        .with_context(|| format!("the cluster PKI in {}", crate::cluster::pki::dir(out_dir, &c.name).display()))?;
    let rollout = match profile.profile.update.as_ref().and_then(|u| u.server.as_ref()) {
        Some(_) => Some(crate::cluster::secrets::load_or_create_rollout_key(out_dir)?),
        None => None,
    };
    Ok(Some(crate::cluster::Secrets { token, pki, rollout }))
}

/// `kiln build`.
pub fn build(profile: &LoadedProfile, opts: &BuildOptions) -> Result<BuildReport> {
    let started = std::time::Instant::now();
    let archs = opts.archs_for(profile)?;
    // `--format update` without `update:` or a signing key fails before any download.
    let signing = update::preflight(profile, opts)?;
    let out_dir = opts.out.clone().unwrap_or_else(|| default_out_dir(profile));
    let fetcher = opts.fetcher(profile)?;
    let platforms: Vec<Platform> =
        archs.iter().map(|a| Platform::load_for(profile.platform(*a), *a).in_profile(&profile.path)).collect::<Result<_>>()?;

    // Templates render with the profile's vars before anything is downloaded or written.
    profile.fail_on(&template_problems(profile))?;
    let secrets = cluster_secrets(profile, &out_dir)?;

    // Fetch everything before writing anything: a bad package name fails fast.
    let mut all_inputs = Vec::new();
    for arch in &archs {
        all_inputs.push(inputs::gather(profile, opts, &fetcher, *arch)?);
    }

    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating output directory {}", out_dir.display()))?;
    let staging_dir = out_dir.join(".kiln-staging");
    if staging_dir.exists() {
        std::fs::remove_dir_all(&staging_dir).with_context(|| format!("removing stale {}", staging_dir.display()))?;
    }
    let mut staging = Staging { dir: staging_dir.clone(), done: false };

    one_heap();
    let jobs: Vec<_> = all_inputs.iter().zip(&platforms).collect();
    let built = concurrently(&jobs, ARCH_WORKERS, |(inputs, platform)| {
        let dir = staging_dir.join(inputs.arch.name());
        std::fs::create_dir_all(&dir)?;
        let manifest = build_arch(profile, opts, inputs, platform, &dir, secrets.as_ref(), signing.as_ref())
            .with_context(|| format!("building the {} image", inputs.arch))?;
        Ok((inputs.arch, manifest))
    })?;

    // Everything succeeded: move the outputs into place.
    let mut images = Vec::new();
    for (arch, manifest) in built {
        images.push(move_into_place(opts, &staging_dir, &out_dir, arch, manifest)?);
    }
    let checksums = write_sha256sums(&out_dir, &images)?;
    staging.done = true;
    let _ = std::fs::remove_dir_all(&staging_dir);
    log_finished("build", started);
    Ok(BuildReport { out_dir, checksums, images })
}

/// Architectures built at once. Two keep both cores of a small build machine busy through the
/// stages that run on one (unpacking, the module index, the initramfs, the disk image) while
/// staying within the memory budget: each architecture's build holds its root's metadata and its
/// in-memory boot files (docs/design.md, Memory; docs/benchmarks.md has the figures).
const ARCH_WORKERS: usize = 2;

/// Runs `work` on every item, at most `workers` at a time, and returns the results in the
/// items' order; the first error (in the items' order) if any failed. A failed item does not
/// stop the others already running, but no new one starts.
fn concurrently<T: Sync, R: Send>(items: &[T], workers: usize, work: impl Fn(&T) -> Result<R> + Sync) -> Result<Vec<R>> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Vec<std::sync::Mutex<Option<Result<R>>>> = items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..workers.clamp(1, items.len().max(1)) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= items.len() || failed.load(Ordering::SeqCst) {
                    break;
                }
                let result = work(&items[i]);
                failed.fetch_or(result.is_err(), Ordering::SeqCst);
                *results[i].lock().expect("no worker panics holding it") = Some(result);
            });
        }
    });
    // Items never started (after a failure) have no result.
    let mut done: Vec<Option<Result<R>>> = results.into_iter().map(|m| m.into_inner().expect("no worker panics holding it")).collect();
    if let Some(i) = done.iter().position(|r| matches!(r, Some(Err(_)))) {
        return Err(done[i].take().expect("just found").err().expect("an error"));
    }
    Ok(done.into_iter().map(|r| r.expect("every item ran").expect("no errors")).collect())
}

/// Moves one architecture's outputs from the staging directory to `OUT/<arch>/`. Outputs of
/// formats not built this time are removed: they would not match the manifest.
fn move_into_place(opts: &BuildOptions, staging_dir: &Path, out_dir: &Path, arch: Arch, manifest: Manifest) -> Result<ArchOutputs> {
    let dest = out_dir.join(arch.name());
    std::fs::create_dir_all(&dest)?;
    for f in disk::DISK_FILES.into_iter().chain([crate::netboot::DIR, crate::update::DIR, disk::MANIFEST]) {
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
    move_node_secrets(staging_dir, out_dir, arch)?;
    let disk = opts.wants(Format::Disk).then(|| dest.join(disk::DISK_IMAGE));
    let netboot = opts.wants(Format::Netboot).then(|| dest.join(crate::netboot::DIR));
    let update = opts.wants(Format::Update).then(|| dest.join(crate::update::DIR));
    Ok(ArchOutputs { arch, dir: dest, disk, netboot, update, manifest })
}

/// The closing log line of `kiln build` and `kiln fetch`: time taken and peak memory.
fn log_finished(what: &str, started: std::time::Instant) {
    let peak = peak_memory_kib().map_or_else(|| "unknown".to_string(), |k| format!("{} MiB", k / 1024));
    info!("{what} finished in {:.0} s, peak memory {peak}", started.elapsed().as_secs_f64());
}

/// Makes every thread allocate from one heap. glibc gives each new thread a heap (arena) of its
/// own, and memory freed in one (the package index, dropped once resolved) is not reused by the
/// others: with architectures built at once, three arenas took the peak from 246 to 342 MiB for
/// the same build (docs/benchmarks.md). kiln's threads spend their time compressing, not in
/// malloc, so they lose nothing by sharing it.
fn one_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a tunable of glibc's allocator; M_ARENA_MAX takes effect for
    // threads created later and does not touch existing allocations.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// The process's peak resident memory (the kernel's `VmHWM`): memory must not grow with the
/// images bundled (docs/design.md, Memory).
fn peak_memory_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim().parse().ok()
}

fn clamp32(t: u64) -> u32 {
    t.min(u32::MAX as u64) as u32
}

/// What every stage of one architecture's build reads.
struct Job<'a> {
    profile: &'a LoadedProfile,
    opts: &'a BuildOptions,
    inputs: &'a Inputs,
    platform: &'a Platform,
    /// The architecture's staging directory.
    dir: &'a Path,
    /// The build's timestamp.
    epoch: u64,
    /// Intermediate results of earlier builds (`--no-reuse`: none).
    reuse: crate::reuse::Reuse,
}

/// One architecture: inputs -> root -> boot -> disk -> netboot -> update bundle -> manifest.
fn build_arch(
    profile: &LoadedProfile,
    opts: &BuildOptions,
    inputs: &Inputs,
    platform: &Platform,
    dir: &Path,
    secrets: Option<&crate::cluster::Secrets>,
    signing: Option<&crate::update::SigningKey>,
) -> Result<Manifest> {
    let reuse = opts.reuse()?;
    let job = Job { profile, opts, inputs, platform, dir, epoch: inputs::source_date_epoch(&inputs.index)?, reuse };
    let mut record = ManifestInputs::new(profile, inputs);
    let root = root::assemble(&job, secrets, &mut record)?;
    let initrds = boot::initrds(&job, &root, &mut record)?;
    let squashfs = root::write_squashfs(&job, &root.tree, "root.squashfs")?;
    // Identities derived from the inputs met so far: same inputs, same GUIDs, same bytes.
    let ids = disk::Ids::new(inputs.arch, record.build_id());
    let boot = boot::Boot::new(&job, &root, initrds.initrd.clone(), &mut record)?;
    let cmdline = boot::kernel_cmdline(platform, inputs.arch, &ids.root_a_guid(), &profile.profile.kernel.cmdline);
    // The installed system's ESP, as a FAT image in memory.
    let esp = boot.esp(&cmdline, ids.esp_guid(), dir.join(".esp.img"))?;
    let system = disk::System::new(inputs.arch, &ids, &profile.profile.deployment(), esp.part(), squashfs.part())
        .with_loaders(board_loaders(&job, &ids, &mut record)?);
    let disk = disk::write(&job, &ids, &system, &boot, &cmdline)?;
    // What goes to the network (the netboot system, an update bundle) is the root without its
    // secrets, written once for both.
    let public = (initrds.netboot.is_some() || signing.is_some()).then(|| PublicRoot::write(&job, &root, &squashfs)).transpose()?;
    let netboot = match (initrds.netboot.as_deref(), &public) {
        (Some(initrd), Some(public)) => Some(write_netboot(&job, &root, &ids, esp.part(), &cmdline, initrd, public, &mut record)?),
        _ => None,
    };
    // The bundle carries the files the ESP holds and the public root (the same bytes as slot A's
    // when the build has no secrets).
    let bundle = match (signing, &public) {
        (Some(key), Some(public)) => Some(update::write(&job, key, public, &root.kernel, &initrds.initrd, &ids.image_id(), &cmdline)?),
        _ => None,
    };
    let manifest = manifest(&job, root.kver, initrds.modules, &ids, disk, netboot, bundle, record);
    std::fs::write(dir.join(disk::MANIFEST), manifest.to_json())?;
    Ok(manifest)
}

/// A U-Boot SPL board's loaders, read from the platform's U-Boot package (none for other platforms).
fn board_loaders(job: &Job, ids: &disk::Ids, record: &mut ManifestInputs) -> Result<Vec<crate::board::uboot_spl::LoaderImage>> {
    let (Some(spl), Some((pkg, deb))) = (&job.platform.uboot_spl, &job.inputs.uboot_deb) else { return Ok(Vec::new()) };
    let loaders = spl
        .read(deb, job.inputs.arch, |name| ids.loader_guid(name))
        .with_context(|| format!("platform `{}`: the loaders from {} {}", job.platform.name, pkg.name, pkg.version))?;
    record.push(root::deb_input(pkg));
    Ok(loaders)
}

/// The build's record: its inputs, the image's partitions, what an installer installs, and the
/// outputs (`disk.img` first, then the netboot files, then the update bundle's).
#[allow(clippy::too_many_arguments)]
fn manifest(
    job: &Job,
    kver: String,
    initramfs_modules: Vec<String>,
    ids: &disk::Ids,
    disk: disk::Disk,
    netboot: Option<(Vec<Output>, InstallRecord)>,
    bundle: Option<Vec<Output>>,
    record: ManifestInputs,
) -> Manifest {
    let (netboot_outputs, netboot_install) = netboot.unzip();
    Manifest {
        kiln_version: env!("CARGO_PKG_VERSION").into(),
        profile: job.profile.profile.name.clone(),
        arch: job.inputs.arch,
        suite: job.inputs.suite.suite.clone(),
        kernel_version: kver,
        source_date_epoch: job.epoch,
        kernel_cmdline: disk.cmdline,
        disk_guid: ids.disk_guid().to_string(),
        inputs: record.into_sorted(),
        partitions: disk.partitions,
        install: disk.install,
        netboot_install,
        initramfs_modules,
        outputs: disk.outputs.into_iter().chain(netboot_outputs.into_iter().flatten()).chain(bundle.into_iter().flatten()).collect(),
    }
}

/// The root without its secrets (`crate::secret_files`): its own squashfs when there are any,
/// else the full root's.
pub(super) struct PublicRoot {
    secrets: crate::secret_files::Secrets,
    squashfs: root::Squashfs,
}

impl PublicRoot {
    fn write(job: &Job, root: &root::Root, full: &root::Squashfs) -> Result<PublicRoot> {
        let secrets = crate::secret_files::Secrets::find(&root.tree, &root.baseline).in_profile(&job.profile.path)?;
        info!("{}: {} secret files kept out of the root served to the network", job.inputs.arch, secrets.paths().len());
        let squashfs = if secrets.paths().is_empty() {
            full.clone()
        } else {
            root::write_squashfs(job, &secrets.public_root(&root.tree), "root-public.squashfs")?
        };
        Ok(PublicRoot { secrets, squashfs })
    }

    pub(super) fn part(&self) -> Part<'_> {
        self.squashfs.part()
    }

    /// The secret paths, as an update bundle's `keep` lines name them.
    pub(super) fn keep(&self) -> Vec<String> {
        self.secrets.paths().iter().map(|p| p.to_string().trim_start_matches('/').to_string()).collect()
    }
}

/// The netboot output: the installer's kernel and initrd, a plan that copies the system from
/// the directory's files, the system's images, the inventory, iPXE and its script; and beside
/// it, never served as a file, each inventory node's secrets (`crate::secret_files`). The
/// served root is the root without its secrets, so the netboot system has a squashfs of its
/// own. Returns the files' records and what the plan installs.
#[allow(clippy::too_many_arguments)] // the boot files of this build, each made by another stage
fn write_netboot(
    job: &Job,
    root: &root::Root,
    ids: &disk::Ids,
    esp: Part,
    cmdline: &str,
    initrd: &[u8],
    public: &PublicRoot,
    record: &mut ManifestInputs,
) -> Result<(Vec<Output>, InstallRecord)> {
    let (profile, arch) = (job.profile, job.inputs.arch);
    let secrets = &public.secrets;
    let system = disk::System::new(arch, ids, &profile.profile.deployment(), esp, public.part());
    let target = system.target()?;
    // A network install always reboots: `kiln serve` then sends the machine to its disk.
    let install = crate::profile::Install { after: crate::profile::AfterInstall::Reboot, ..profile.profile.install.clone() };
    let plan = disk::install_plan(profile, &install, ids, &system, &target, &disk::NETBOOT)?;
    let inventory = match root.tree.get_str("etc/kiln/inventory").map(|e| &e.kind) {
        Some(Kind::File(c)) => c.read()?.to_vec(),
        _ => Vec::new(),
    };
    write_node_secrets(job, root, secrets)?;
    let script = crate::netboot::script_template(&profile.profile.name, arch.name(), cmdline, &crate::digest::sha256_hex(plan.as_bytes()));
    let kernel = root.kernel.read()?;
    let (ipxe_pkg, ipxe_path) = job.inputs.ipxe_deb.as_ref().context("netboot build without the ipxe package")?;
    let ipxe = boot::ipxe_efi_binary(ipxe_path, arch).with_context(|| format!("reading {} {}", ipxe_pkg.name, ipxe_pkg.version))?;
    let ipxe = ipxe.read()?;
    let dir = job.dir.join(crate::netboot::DIR);
    info!("{arch}: writing {}", dir.display());
    let contents = crate::netboot::Contents {
        ipxe: &ipxe,
        kernel: &kernel,
        initrd,
        plan: &plan,
        esp: system.esp,
        root: system.squashfs,
        inventory: &inventory,
        script: &script,
    };
    let outputs = crate::netboot::write(&dir, &contents, image_mode(&profile.profile))?;
    record.add_once(root::deb_input(ipxe_pkg));
    Ok((outputs, system.install_record(&target, ids)))
}

/// The staging directory's bundles of node secrets, moved to `OUT/secrets/netboot/<arch>/`.
const NODE_SECRETS: &str = "netboot-secrets";

/// One newc archive per inventory node, mode 0600 in a 0700 directory. Machines outside the
/// inventory get none (docs/security.md).
fn write_node_secrets(job: &Job, root: &root::Root, secrets: &crate::secret_files::Secrets) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = job.dir.join(NODE_SECRETS);
    std::fs::DirBuilder::new().mode(0o700).create(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for node in job.profile.profile.cluster.iter().flat_map(|c| &c.nodes) {
        let bundle = secrets.for_node(&root.tree, &node.name)?;
        let path = dir.join(crate::secret_files::bundle_file(&node.name));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        crate::cpio::write_newc(&bundle, std::io::BufWriter::new(file), clamp32(job.epoch))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Replaces `OUT/secrets/netboot/<arch>/` with this build's bundles (or removes it when the
/// build has no netboot output: old bundles would not match the served root).
fn move_node_secrets(staging_dir: &Path, out_dir: &Path, arch: Arch) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let (from, to) = (staging_dir.join(arch.name()).join(NODE_SECRETS), crate::secret_files::bundle_dir(out_dir, arch));
    if to.exists() {
        std::fs::remove_dir_all(&to).with_context(|| format!("removing the old {}", to.display()))?;
    }
    if from.exists() {
        let parent = to.parent().expect("a bundle directory has a parent");
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(parent).with_context(|| format!("creating {}", parent.display()))?;
        std::fs::rename(&from, &to).with_context(|| format!("moving the node secrets into {}", to.display()))?;
    }
    Ok(())
}

/// `SHA256SUMS` over every image and manifest in the output directory, sorted by path: this
/// build's from the digests its manifests record, other architectures' files (left by earlier
/// builds) hashed. Returns its path.
fn write_sha256sums(out_dir: &Path, built: &[ArchOutputs]) -> Result<PathBuf> {
    let mut lines = BTreeMap::new();
    for arch in Arch::ALL {
        if let Some(b) = built.iter().find(|b| b.arch == arch) {
            for o in &b.manifest.outputs {
                lines.insert(format!("{}/{}", arch.name(), o.file), o.sha256.clone());
            }
            lines.insert(format!("{}/{}", arch.name(), disk::MANIFEST), crate::digest::sha256_hex(b.manifest.to_json().as_bytes()));
            continue;
        }
        let netboot = crate::netboot::FILES.iter().map(|f| format!("{}/{f}", crate::netboot::DIR));
        let bundle = crate::update::FILES.iter().map(|f| format!("{}/{f}", crate::update::DIR));
        for f in disk::DISK_FILES.into_iter().chain([disk::MANIFEST]).map(String::from).chain(netboot).chain(bundle) {
            let p = out_dir.join(arch.name()).join(&f);
            if p.exists() {
                lines.insert(format!("{}/{f}", arch.name()), crate::digest::sha256_file(&p)?);
            }
        }
    }
    let text: String = lines.iter().map(|(p, h)| format!("{h}  {p}\n")).collect();
    let tmp = out_dir.join(".SHA256SUMS.tmp");
    std::fs::write(&tmp, text)?;
    let path = out_dir.join("SHA256SUMS");
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::concurrently;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn concurrently_keeps_the_order_bounds_the_workers_and_reports_the_error() {
        let (running, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let items: Vec<u64> = (0..6).collect();
        let out = concurrently(&items, 2, |&i| {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            // Later items finish first: the results still come back in the items' order.
            std::thread::sleep(std::time::Duration::from_millis(30 - 5 * i));
            running.fetch_sub(1, Ordering::SeqCst);
            Ok(i * 10)
        })
        .unwrap();
        assert_eq!(out, [0, 10, 20, 30, 40, 50]);
        assert_eq!(most.load(Ordering::SeqCst), 2, "two at a time, both used");

        let started = AtomicUsize::new(0);
        let err = concurrently(&items, 1, |&i| {
            started.fetch_add(1, Ordering::SeqCst);
            if i == 1 {
                anyhow::bail!("item {i} failed")
            }
            Ok(i)
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "item 1 failed");
        assert_eq!(started.load(Ordering::SeqCst), 2, "nothing starts after a failure");
        assert!(concurrently(&[] as &[u64], 2, |&i| Ok(i)).unwrap().is_empty());
    }
}
