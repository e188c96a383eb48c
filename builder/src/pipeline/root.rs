//! The root filesystem stage: the packages (on the base OS image, if any) unpacked into a tree,
//! then in this order the base system, kiln's appliance overlay, first-boot configuration, the
//! cluster, k3s, the container image archive, containerd, what k3s deploys, and the profile's
//! overlays and files on top; finally its squashfs. Also [`ManifestInputs`], the record of
//! every input met on the way.

use std::io::Write;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use tracing::info;

use super::inputs::Inputs;
use super::Job;
use crate::arch::Arch;
use crate::debian;
use crate::error::ResultExt;
use crate::kmod::ModuleSet;
use crate::manifest::{Input, InputKind};
use crate::profile::LoadedProfile;
use crate::spill::Spill;
use crate::tree::{Content, Kind, Tree, TreePath};

/// The manifest's `inputs`, in the order the build met them: the build id hashes them in that
/// order, the manifest lists them sorted.
pub(super) struct ManifestInputs(Vec<Input>);

impl ManifestInputs {
    /// Starts with the profile and the Debian index files: the InRelease, then each component's
    /// package list in the profile's order (a profile with the default `[main]` records exactly
    /// the two inputs it always did, so its build id is unchanged).
    pub(super) fn new(profile: &LoadedProfile, inputs: &Inputs) -> ManifestInputs {
        let (suite, index) = (&inputs.suite.suite, &inputs.index);
        let mut records = vec![
            Input {
                kind: InputKind::Profile,
                name: profile.profile.name.clone(),
                version: None,
                sha256: crate::digest::sha256_hex(&profile.source),
                size: Some(profile.source.len() as u64),
            },
            Input {
                kind: InputKind::Index,
                name: format!("{suite}/InRelease"),
                version: None,
                sha256: index.inrelease_sha256.clone(),
                size: None,
            },
        ];
        records.extend(index.components.iter().map(|c| Input {
            kind: InputKind::Index,
            name: format!("{suite}/{}/binary-{}/Packages", c.component, inputs.arch.debian()),
            version: None,
            sha256: c.packages_sha256.clone(),
            size: None,
        }));
        ManifestInputs(records)
    }

    pub(super) fn push(&mut self, input: Input) {
        self.0.push(input);
    }

    pub(super) fn extend(&mut self, inputs: impl IntoIterator<Item = Input>) {
        self.0.extend(inputs);
    }

    /// Adds an input unless the same record is there already (a package that both the root and
    /// the initramfs take files from).
    pub(super) fn add_once(&mut self, input: Input) {
        if !self.0.contains(&input) {
            self.0.push(input);
        }
    }

    /// The build id: sha256 over the inputs' digests so far, in order.
    pub(super) fn build_id(&self) -> [u8; 32] {
        let mut ids = Sha256::new();
        for i in &self.0 {
            ids.update(i.sha256.as_bytes());
        }
        ids.finalize().into()
    }

    pub(super) fn into_sorted(mut self) -> Vec<Input> {
        self.0.sort();
        self.0
    }
}

pub(super) fn deb_input(pkg: &debian::Package) -> Input {
    Input {
        kind: InputKind::Deb,
        name: pkg.name.clone(),
        version: Some(pkg.version.clone()),
        sha256: pkg.sha256.clone(),
        size: Some(pkg.size),
    }
}

/// The assembled root and what was taken out of it on the way.
pub(super) struct Root {
    pub(super) tree: Tree,
    pub(super) kver: String,
    /// The bootable kernel image (it lives on the ESP, not in the root).
    pub(super) kernel: Content,
    pub(super) modules: ModuleSet,
    /// Where large contents are parked (beside the image being built), not held in memory.
    pub(super) spill: Arc<Spill>,
    /// The owner-only files the packages brought: not secrets (`crate::secret_files`).
    pub(super) baseline: crate::secret_files::Baseline,
}

/// Builds the root model of one architecture.
pub(super) fn assemble(job: &Job, secrets: Option<&crate::cluster::Secrets>, record: &mut ManifestInputs) -> Result<Root> {
    let (profile, inputs, arch) = (job.profile, job.inputs, job.inputs.arch);
    info!("{arch}: unpacking {} packages", inputs.root_debs.len() + 1);
    // Large contents are parked in a spill file beside the image, not held in memory.
    let spill = Spill::create_in(job.dir)?;
    let mut root = Tree::merged_usr(arch).spill_to(spill.clone());
    let (kver, kernel) = unpack(&mut root, inputs, &job.reuse, record)?;
    let baseline = crate::secret_files::Baseline::of(&root)?;

    crate::setup::base_system(&mut root)?;
    crate::busybox::install_links(&mut root, "usr/bin", "busybox")?;
    let modules = crate::setup::module_indexes(&mut root, &kver, &job.reuse)?;

    let context = template_context(profile, arch, &kver);
    let mut appliance = crate::assets::overlay("appliance")?;
    crate::overlay::render_templates(&mut appliance, &context, "kiln's appliance overlay")?;
    root.merge(&appliance)?;
    // First-boot configuration (accounts, ssh, network, ...) before the profile's overlays, which
    // may still replace any of its files.
    crate::provision::render(&profile.profile, &mut root, &modules).in_profile(&profile.path)?;
    crate::site_steps::render(&profile.profile, &mut root).in_profile(&profile.path)?;
    // The version and the keys `kiln-update` trusts (nothing without `update:`: no update applies).
    crate::update::render(profile.profile.update.as_ref(), &job.platform.name, &profile.base_dir(), &mut root).in_profile(&profile.path)?;
    // Every inventory node's configuration; the device picks its own at boot (35-identity.sh).
    if let (Some(cluster), Some(secrets)) = (&profile.profile.cluster, secrets) {
        crate::cluster::render(cluster, secrets, &mut root).context("rendering the cluster configuration")?;
        crate::cluster::services::install(cluster, &mut root, &modules).in_profile(&profile.path)?;
    }
    add_workloads(job, &mut root, &modules, &context, record)?;
    add_profile_files(profile, &mut root, &context)?;
    let modules = platform_modules(job, &mut root, modules)?;
    Ok(Root { tree: root, kver, kernel, modules, spill, baseline })
}

/// The base OS image (if any) and the packages, unpacked; returns the kernel's version and image.
fn unpack(root: &mut Tree, inputs: &Inputs, reuse: &crate::reuse::Reuse, record: &mut ManifestInputs) -> Result<(String, Content)> {
    let arch = inputs.arch;
    if let Some(image) = &inputs.os_image {
        // `os.image`: the image is the bottom of the root; Debian's packages go on top.
        crate::oci::base::lay_image(image, &inputs.cache, root, arch)?;
        record.extend(crate::oci::manifest_inputs(std::slice::from_ref(image)));
    }
    for (pkg, path) in inputs.root_debs.iter().chain(inputs.kernel_deb.iter()) {
        super::unpack::unpack_package(reuse, pkg, path, root)?;
        record.push(deb_input(pkg));
    }
    match &inputs.os_image {
        Some(image) => crate::oci::base::take_kernel(root, &image.reference, arch),
        None => {
            let kver = single_kernel_version(root)?;
            let kernel = take_kernel(root, arch, &kver)?;
            Ok((kver, kernel))
        }
    }
}

/// k3s, the container image archive, containerd, and what k3s deploys by itself.
fn add_workloads(job: &Job, root: &mut Tree, modules: &ModuleSet, context: &serde_json::Value, record: &mut ManifestInputs) -> Result<()> {
    let (profile, inputs, arch) = (job.profile, job.inputs, job.inputs.arch);
    if let Some(k3s) = &inputs.k3s {
        crate::k3s::place(k3s, root).context("placing k3s in the root")?;
        record.extend(crate::k3s::manifest_inputs(k3s));
    }
    let engine = profile.profile.engine;
    if !inputs.images.is_empty() {
        // Written beside the image being built (the staging directory) and streamed into the
        // squashfs from there: never held in memory.
        let archive = job.dir.join(crate::oci::archive_name(arch, engine));
        let zstd = engine == crate::profile::containers::Engine::K3s;
        let size = crate::oci::layout::write_archive(&inputs.images, &inputs.cache, job.epoch, &archive, zstd)
            .with_context(|| format!("{arch}: writing the image archive {}", archive.display()))?;
        info!("{arch}: {} container images bundled ({} MiB)", inputs.images.len(), size >> 20);
        crate::oci::place(&archive, arch, engine, root).context("placing the image archive in the root")?;
        record.extend(crate::oci::manifest_inputs(&inputs.images));
    }
    if engine == crate::profile::containers::Engine::Containerd {
        crate::containerd::install(&profile.profile.containers, root, modules, !inputs.images.is_empty()).in_profile(&profile.path)?;
    }
    // What k3s deploys by itself (`manifests`, `charts`) and its `registries.yaml`.
    let deployed = crate::deploy::place_manifests(&profile.profile.manifests, &profile.base_dir(), context, root)
        .and_then(|mut m| {
            m.extend(crate::deploy::place_charts(&inputs.charts, root)?);
            if let Some(r) = &profile.profile.registries {
                crate::registries::place(r, &profile.base_dir(), root)?;
            }
            Ok(m)
        })
        .in_profile(&profile.path)?;
    record.extend(deployed);
    Ok(())
}

/// The profile's overlays and files, on top of everything kiln put there; then the check that
/// every program inittab starts is in the root.
fn add_profile_files(profile: &LoadedProfile, root: &mut Tree, context: &serde_json::Value) -> Result<()> {
    for o in &profile.profile.overlays {
        let dir = profile.resolve(&o.value);
        let mut t = crate::overlay::read_dir(&dir)?;
        let origin = format!("overlay {}", dir.display());
        crate::overlay::render_templates(&mut t, context, &origin).in_profile(&profile.path)?;
        root.merge(&t).with_context(|| origin.clone())?;
    }
    let hb = crate::overlay::renderer();
    for (i, f) in profile.profile.files.iter().enumerate() {
        let content = if f.template {
            crate::overlay::render(&hb, &f.content, context, &format!("files[{i}] ({})", f.path)).in_profile(&profile.path)?
        } else {
            f.content.clone()
        };
        root.add_file(&f.path, f.mode.0, content)?;
    }
    crate::inittab::check_programs(root).in_profile(&profile.path)
}

/// Renders every template of the profile (its overlays' `*.hbs`, `files` with `template: true`,
/// its `manifests`) with the profile's vars for each of its architectures, writing nothing:
/// `kiln check`, and `kiln build` before any download, so a template error fails in
/// milliseconds. The kernel version is not known before the download: a placeholder stands in.
pub fn template_problems(profile: &LoadedProfile) -> Vec<anyhow::Error> {
    let mut problems: Vec<anyhow::Error> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    let hb = crate::overlay::renderer();
    for &arch in &profile.profile.arch {
        let context = template_context(profile, arch, "KERNEL-VERSION");
        let mut found: Vec<anyhow::Error> = Vec::new();
        // A missing overlay directory is the profile check's problem, reported there.
        for dir in profile.profile.overlays.iter().map(|o| profile.resolve(&o.value)).filter(|d| d.is_dir()) {
            let origin = format!("overlay {}", dir.display());
            if let Err(e) = crate::overlay::read_dir(&dir).and_then(|mut t| crate::overlay::render_templates(&mut t, &context, &origin)) {
                found.push(e);
            }
        }
        for (i, f) in profile.profile.files.iter().enumerate().filter(|(_, f)| f.template) {
            if let Err(e) = crate::overlay::render(&hb, &f.content, &context, &format!("files[{i}] ({})", f.path)) {
                found.push(e.context(format!("key `files[{i}].content`")));
            }
        }
        if let Err(e) = crate::deploy::manifests::render(&profile.profile.manifests, &profile.base_dir(), &context) {
            found.push(e.context("key `manifests`"));
        }
        for e in found {
            // The same template usually fails the same way for every architecture.
            let text = format!("{e:#}");
            if seen.insert(text.clone()) {
                problems.push(e);
            }
        }
    }
    problems
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

/// `kernel.root_modules: platform`: the root without the module subtrees the platform omits,
/// keeping every module named for the initramfs (the platform's and the profile's), the netboot
/// installer's and the profile's `kernel.load` (the features' are in the boot list by now).
fn platform_modules(job: &Job, root: &mut Tree, modules: crate::kmod::ModuleSet) -> Result<crate::kmod::ModuleSet> {
    let (kernel, platform) = (&job.profile.profile.kernel, job.platform);
    if kernel.root_modules == crate::profile::RootModules::All {
        return Ok(modules);
    }
    let initramfs = &platform.initramfs_modules;
    let keep: Vec<&str> = initramfs
        .required
        .iter()
        .chain(&initramfs.optional)
        .chain(&platform.netboot_modules)
        .chain(&kernel.modules)
        .chain(&kernel.load)
        .map(String::as_str)
        .collect();
    crate::setup::omit_root_modules(root, modules, &platform.root_modules_omit, &keep)
}

/// The root's squashfs, staged beside the outputs; its digest is taken while it is written.
pub(super) type Squashfs = crate::output::Staged;

/// Writes `root` as squashfs to `name` in the staging directory.
pub(super) fn write_squashfs(job: &Job, root: &Tree, name: &str) -> Result<Squashfs> {
    info!("{}: writing the squashfs root {name} ({} entries)", job.inputs.arch, root.len());
    // Written to a file in the staging directory, not into memory: with bundled container
    // images the root can be GiBs.
    let path = job.dir.join(name);
    let file = crate::output::Staged::create(&path)?;
    let mut out = crate::digest::HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, file));
    crate::squashfs::write_squashfs_reusing(
        root,
        &mut out,
        &crate::squashfs::SquashfsOptions { mtime: super::clamp32(job.epoch), zstd_level: 15, block_size: 128 * 1024, threads: 0 },
        &job.reuse,
    )?;
    out.flush().with_context(|| format!("writing {}", path.display()))?;
    let (_, sha256, len) = out.finish();
    Ok(Squashfs { path, len, sha256 })
}
