//! What shapes a build (the command line's choices) and what a build reports back.

use std::path::PathBuf;

use anyhow::Result;

use crate::arch::Arch;
use crate::error::UsageError;
use crate::fetch::Fetcher;
use crate::manifest::Manifest;
use crate::profile::LoadedProfile;

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
    /// The minisign secret key that signs update bundles (`--signing-key`, else
    /// `$KILN_SIGNING_KEY`); needed by [`Format::Update`] only.
    pub signing_key: Option<PathBuf>,
    /// The bundle may install an older version than the device runs (`downgrade yes`).
    pub allow_downgrade: bool,
}

/// An output format of `kiln build --format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `OUT/<arch>/disk.img`: the disk image (or installer medium) to write to a disk or stick.
    Disk,
    /// `OUT/<arch>/netboot/`: kernel, installer initrd, system images and iPXE script for
    /// network installs served by `kiln serve`.
    Netboot,
    /// `OUT/<arch>/disk.img.zst`: `disk.img` compressed with zstd in the same pass that writes
    /// it (so `disk.img` is written too). `kiln flash` and `bmaptool copy` read it.
    #[value(name = "disk.img.zst")]
    DiskZst,
    /// `OUT/<arch>/disk.img.xz`: `disk.img` compressed with xz in the same pass (Raspberry Pi
    /// Imager reads `.img.xz`).
    #[value(name = "disk.img.xz")]
    DiskXz,
    /// `OUT/<arch>/disk.img.bmap`: the block map of `disk.img` (bmaptool's format, a sha256 per
    /// range), so `kiln flash` and `bmaptool copy` write only the blocks that hold data.
    #[value(name = "disk.img.bmap")]
    DiskBmap,
    /// `OUT/<arch>/update/`: a signed update bundle (`update.txt`, `update.txt.minisig`, the
    /// root squashfs, kernel and initrd) for `kiln-update` on installed devices; needs the
    /// profile's `update:` and a signing key (docs/updates.md).
    Update,
}

impl Format {
    /// The formats derived from `disk.img`, which is then written too.
    fn needs_disk(self) -> bool {
        matches!(self, Format::Disk | Format::DiskZst | Format::DiskXz | Format::DiskBmap)
    }
}

impl BuildOptions {
    /// Whether a format was asked for (no formats given means `disk`).
    /// `disk.img` is wanted also when a format derived from it is.
    pub fn wants(&self, f: Format) -> bool {
        if self.formats.is_empty() {
            f == Format::Disk
        } else {
            self.formats.contains(&f) || (f == Format::Disk && self.formats.iter().any(|g| g.needs_disk()))
        }
    }

    /// The compressed copies of `disk.img` asked for.
    pub fn disk_compressions(&self) -> Vec<crate::compress::Compression> {
        use crate::compress::Compression;
        [(Format::DiskZst, Compression::Zstd), (Format::DiskXz, Compression::Xz)]
            .into_iter()
            .filter(|(f, _)| self.formats.contains(f))
            .map(|(_, c)| c)
            .collect()
    }

    /// The downloader for a build of `profile`: its cache, and the CAs its HTTPS downloads
    /// trust (the host's bundle and the profile's `image_registries.<host>.ca_file`s).
    pub(super) fn fetcher(&self, profile: &LoadedProfile) -> Result<Fetcher> {
        let root = match &self.cache_dir {
            Some(d) => d.clone(),
            None => crate::cache::Cache::default_root()?,
        };
        let extra = profile
            .profile
            .image_registries
            .iter()
            .filter_map(|(host, r)| r.ca_file.as_ref().map(|f| (format!("image_registries.{host}.ca_file"), profile.resolve(f))))
            .collect();
        let trust = crate::trust::Trust::new(extra);
        Ok(Fetcher { offline: self.offline, cache: crate::cache::Cache::new(root), progress: self.progress, trust })
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

/// What a successful build wrote.
#[derive(Debug)]
pub struct BuildReport {
    pub out_dir: PathBuf,
    /// `OUT/SHA256SUMS`.
    pub checksums: PathBuf,
    /// Per architecture, in the order built.
    pub images: Vec<ArchOutputs>,
}

/// What a build wrote for one architecture.
#[derive(Debug)]
pub struct ArchOutputs {
    pub arch: Arch,
    /// `OUT/<arch>`.
    pub dir: PathBuf,
    /// `OUT/<arch>/disk.img`, when the disk format was built.
    pub disk: Option<PathBuf>,
    /// `OUT/<arch>/netboot/`, when the netboot format was built.
    pub netboot: Option<PathBuf>,
    /// `OUT/<arch>/update/`, when the update bundle was built.
    pub update: Option<PathBuf>,
    pub manifest: Manifest,
}
