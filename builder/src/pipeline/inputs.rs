//! The first stage: everything one architecture's build needs, resolved, fetched (or found in the
//! cache) and verified before anything is written: Debian packages, the base OS image, k3s,
//! container images and charts.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tracing::info;

use super::{BuildOptions, Format};
use crate::arch::Arch;
use crate::debian::{self, Suite};
use crate::error::{ResultExt, UsageError};
use crate::fetch::Fetcher;
use crate::profile::{LoadedProfile, Profile};

/// Packages every appliance has besides the profile's: busybox provides init, the shell and
/// the initramfs tools.
const BASE_PACKAGES: &[&str] = &["busybox-static"];
/// Packages whose programs first boot runs in the initramfs (in-place mode): sgdisk grows the
/// GPT and adds the data partition, mke2fs formats it. Only the programs and their libraries
/// are copied into the initramfs; the root does not get them.
const FIRSTBOOT_PACKAGES: &[&str] = &["gdisk", "e2fsprogs"];
/// The package holding systemd-boot's EFI binaries (used on the ESP only, not installed).
const SYSTEMD_BOOT_PACKAGE: &str = "systemd-boot-efi";
/// The package holding iPXE's EFI binaries (netboot output only: the first network stage).
const IPXE_PACKAGE: &str = "ipxe";
const DEFAULT_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Everything fetched and verified for one architecture.
pub(super) struct Inputs {
    pub(super) arch: Arch,
    pub(super) suite: Suite,
    pub(super) index: debian::Index,
    pub(super) root_debs: Vec<(debian::Package, PathBuf)>,
    /// Packages the initramfs takes programs from (first boot), with their dependencies.
    pub(super) firstboot_debs: Vec<(debian::Package, PathBuf)>,
    /// The kernel package; `None` when the kernel comes from `os.image`.
    pub(super) kernel_deb: Option<(debian::Package, PathBuf)>,
    /// `os.image`: the base OS image, verified in the cache.
    pub(super) os_image: Option<crate::oci::Image>,
    pub(super) systemd_boot_deb: Option<(debian::Package, PathBuf)>,
    /// Raspberry Pi platforms: the GPU firmware package (`raspi-firmware`), used on the boot
    /// partition only, not installed.
    pub(super) firmware_deb: Option<(debian::Package, PathBuf)>,
    /// Netboot builds: Debian's `ipxe` (its EFI binary goes to `netboot/ipxe.efi`).
    pub(super) ipxe_deb: Option<(debian::Package, PathBuf)>,
    /// U-Boot SPL boards: the platform's U-Boot package (its loaders go to their own partitions).
    pub(super) uboot_deb: Option<(debian::Package, PathBuf)>,
    /// Cluster images: the verified k3s binary and air-gap archive.
    pub(super) k3s: Option<crate::k3s::Artifacts>,
    /// Container images (profile key `images`), verified in the cache.
    pub(super) images: Vec<crate::oci::Image>,
    /// The cache the images' blobs are in (the archive is written from it).
    pub(super) cache: crate::cache::Cache,
    /// Helm charts (profile key `charts`), verified or packed.
    pub(super) charts: Vec<crate::deploy::chart::Chart>,
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

/// The packages the root is resolved from: kiln's base, the profile's, and what its features need.
fn root_packages(p: &Profile) -> Vec<&str> {
    let mut roots: Vec<&str> = BASE_PACKAGES.to_vec();
    roots.extend(p.os.packages.iter().map(String::as_str));
    roots.extend(crate::provision::packages(p));
    if let Some(c) = &p.cluster {
        roots.extend(crate::cluster::services::packages(c));
    }
    roots.extend(crate::containerd::packages(p));
    roots.extend(crate::update::packages(p));
    roots
}

/// Resolves and downloads (or finds in the cache) every package one architecture needs.
pub(super) fn gather(profile: &LoadedProfile, opts: &BuildOptions, fetcher: &Fetcher, arch: Arch) -> Result<Inputs> {
    // Before any download: a board whose firmware is in a component the profile does not read.
    let platform = crate::platform::Platform::load_for(profile.platform(arch), arch).in_profile(&profile.path)?;
    platform.check_components(&profile.profile.os.components).in_profile(&profile.path)?;
    // An installer medium or netboot cannot give a board what its boot ROM reads from its card.
    platform
        .check_install_mode(profile.profile.install.mode)
        .map_err(|e| UsageError(format!("{}: key `install.mode`: {e}", profile.path.display())))?;
    if platform.boots_its_card() && opts.wants(Format::Netboot) {
        return Err(UsageError(format!("--format netboot: platform `{}` boots from its SD card, not the network", platform.name)).into());
    }
    let suite = suite_for(profile, opts)?;
    info!("{arch}: reading {} {} for {}", suite.mirror, suite.suite, arch.debian());
    let components = &profile.profile.os.components;
    let index = debian::load_index_from(fetcher, &suite, arch.debian(), components, &opts.reuse()?).map_err(|e| {
        // A component the suite lacks is the profile's doing: name the key that asked for it.
        let e = match e.downcast_ref::<debian::MissingComponent>() {
            Some(_) => e.context(format!("{}: key `os.components`", profile.path.display())),
            None => e,
        };
        e.context(format!("{arch}: loading the Debian {} package index ({})", suite.suite, components.join(", ")))
    })?;

    let roots = root_packages(&profile.profile);
    let root_pkgs =
        debian::resolve::resolve(&index.packages, &roots).with_context(|| format!("{arch}: resolving packages {}", roots.join(", ")))?;

    // `os.image`: the root and kernel come from an OCI image; kiln's runtime still from Debian.
    let p = &profile.profile;
    // One registry session for the base OS image, `images` and `charts`.
    let mut puller = crate::oci::pull::Puller::new(fetcher, &p.image_registries, &profile.base_dir());
    let os_image =
        p.os.image
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
    let fetch = |p: debian::Package| -> Result<(debian::Package, PathBuf)> {
        let path = debian::fetch_deb(fetcher, &suite, &p)?;
        Ok((p, path))
    };
    let root_debs = root_pkgs.into_iter().map(fetch).collect::<Result<_>>()?;
    let firstboot_debs = firstboot_pkgs.into_iter().map(fetch).collect::<Result<_>>()?;
    let kernel_deb = kernel_pkg.map(fetch).transpose()?;
    let systemd_boot_deb = systemd_boot.map(fetch).transpose()?;
    let firmware_deb = match platform.boot.raspberrypi.as_ref().and_then(|r| r.firmware.as_ref()) {
        Some(fw) => {
            let pkg = one_package(&index, &fw.package)
                .with_context(|| format!("{arch}: finding {} (platform `{}`)", fw.package, platform.name))?
                .with_context(|| {
                    format!("{arch}: the suite's {} component has no `{}` package (platform `{}`)", fw.component, fw.package, platform.name)
                })?;
            Some(fetch(pkg)?)
        }
        None => None,
    };
    let ipxe_deb = if opts.wants(Format::Netboot) { Some(fetch(ipxe_package(&index, arch)?)?) } else { None };
    let uboot_deb = uboot_package(profile, &index, arch)?.map(fetch).transpose()?;
    let k3s = match &p.cluster {
        Some(c) if c.needs_k3s() => Some(gather_k3s(profile, opts, fetcher, c, arch)?),
        _ => None,
    };
    let images: Vec<crate::oci::Image> = p
        .images
        .iter()
        .map(|i| puller.bundled(i, arch))
        .collect::<Result<_>>()
        .with_context(|| format!("{arch}: pulling the profile's `images`"))?;
    let charts = crate::deploy::chart::gather(&p.charts, &profile.base_dir(), &mut puller, source_date_epoch(&index)?)
        .with_context(|| format!("{}: {arch}: the profile's `charts`", profile.path.display()))?;
    // Everything is resolved: the package lists (~70k packages, the largest thing a build holds)
    // are done with. Inputs of every arch are gathered before the first image is written, so
    // keeping them would hold one list per arch until the end.
    let mut index = index;
    index.packages = Default::default();
    let cache = fetcher.cache.clone();
    Ok(Inputs {
        arch,
        suite,
        index,
        root_debs,
        firstboot_debs,
        kernel_deb,
        os_image,
        systemd_boot_deb,
        firmware_deb,
        ipxe_deb,
        uboot_deb,
        k3s,
        images,
        cache,
        charts,
    })
}

/// The named package of the index alone, its dependencies left out (`None` if the suite lacks it).
fn one_package(index: &debian::Index, name: &str) -> Result<Option<debian::Package>> {
    Ok(debian::resolve::resolve(&index.packages, &[name])?.into_iter().find(|p| p.name == name))
}

/// Debian's `ipxe` (netboot builds), which the suite must have.
fn ipxe_package(index: &debian::Index, arch: Arch) -> Result<debian::Package> {
    one_package(index, IPXE_PACKAGE)
        .with_context(|| format!("{arch}: finding {IPXE_PACKAGE} (iPXE for the netboot output)"))?
        .with_context(|| format!("{arch}: the suite has no `{IPXE_PACKAGE}` package"))
}

/// The U-Boot package of the profile's platform for `arch`, if it is a U-Boot SPL board.
fn uboot_package(profile: &LoadedProfile, index: &debian::Index, arch: Arch) -> Result<Option<debian::Package>> {
    let platform = crate::platform::Platform::load(profile.platform(arch))?;
    let Some(spl) = &platform.uboot_spl else { return Ok(None) };
    let pkg = one_package(index, &spl.package)
        .with_context(|| format!("{arch}: finding {} (platform `{}`)", spl.package, platform.name))?
        .with_context(|| format!("{arch}: the suite has no `{}` package, which platform `{}` boots from", spl.package, platform.name))?;
    Ok(Some(pkg))
}

/// The k3s assets of a cluster image: from `--k3s-assets`, else `cluster.k3s.source`, else the
/// k3s release downloads; verified and cached.
fn gather_k3s(
    profile: &LoadedProfile,
    opts: &BuildOptions,
    fetcher: &Fetcher,
    c: &crate::profile::cluster::Cluster,
    arch: Arch,
) -> Result<crate::k3s::Artifacts> {
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

/// The build's timestamp: SOURCE_DATE_EPOCH if set, else the suite's Release date.
pub(super) fn source_date_epoch(index: &debian::Index) -> Result<u64> {
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        return v.trim().parse().with_context(|| format!("SOURCE_DATE_EPOCH=`{v}` is not a number of seconds"));
    }
    index.release.date_unix.context("the suite's Release file has no parseable Date; set SOURCE_DATE_EPOCH")
}

#[cfg(test)]
mod tests {
    #[test]
    fn update_adds_the_verifier_to_the_root() {
        let with = crate::profile::test_profile("update: {version: \"1\"}\n");
        assert!(super::root_packages(&with).contains(&"minisign"));
        assert!(!super::root_packages(&crate::profile::test_profile("")).contains(&"minisign"));
    }
}
