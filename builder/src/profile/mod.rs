//! The profile: the one declarative YAML file a user writes. Its types are the single source of
//! the file format, the CLI's view of it, the JSON schema and the reference in docs/profile-reference.md.
//!
//! This module owns every profile key's type and its validation: the top level, `os`, `kernel`,
//! `disk`, `install`, `overlays`, `files` and `vars` here, and one submodule per section
//! ([`system`], [`cluster`], [`containers`], [`images`], [`deploy`], [`registries`], [`site`],
//! [`update`]), plus the generated [`reference`]. Feature modules import their section from here; nothing here imports
//! a feature module. A new key: its type and check go into the section's file, and the feature
//! that acts on it reads it from there.
//!
//! Parsing is strict: unknown keys, wrong types and bad values are errors naming the file,
//! line and key. Semantic checks (`validate`) report locations too, via `Spanned` values.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_saphyr::Spanned;

use crate::arch::Arch;
use crate::image_ref::ImageRef;
pub use crate::size::Size;

pub mod check;
pub mod cluster;
pub mod containers;
pub mod deploy;
pub mod images;
pub mod install;
pub mod reference;
pub mod registries;
pub mod site;
pub mod system;
pub mod update;

pub use install::{AfterInstall, Disk, DiskSize, Install, InstallMode, InstallTarget};

/// A kiln profile: everything one build needs.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The profile format this file is written for: `1` (the only one so far). Optional; a
    /// profile written for a newer format is refused with a message saying so, not misread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kiln: Option<u32>,
    /// Name of the appliance; names the default output directory `out/<name>`.
    /// Lower-case letters, digits, `-`, `_` and `.`.
    pub name: String,
    /// Architectures to build, e.g. `[x86_64, aarch64, riscv64]`.
    pub arch: Vec<Arch>,
    /// The Debian base system.
    #[serde(default)]
    pub os: Os,
    /// Kernel settings.
    #[serde(default)]
    pub kernel: Kernel,
    /// Platform (under `firmware/`) per architecture; `generic-uefi` when not given.
    #[serde(default)]
    pub platform: BTreeMap<Arch, String>,
    /// Disk image size.
    #[serde(default)]
    pub disk: Disk,
    /// How the image gets onto the machine's disk.
    #[serde(default)]
    pub install: Install,
    /// Directories laid onto the root, in order, after kiln's own appliance overlay.
    /// Relative paths are relative to the profile file.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    #[serde(serialize_with = "ser_spanned_paths")]
    pub overlays: Vec<Spanned<PathBuf>>,
    /// Files written into the root after the overlays.
    #[serde(default)]
    pub files: Vec<InlineFile>,
    /// Values for templates (`*.hbs` files in overlays), available as `{{vars.KEY}}`.
    #[serde(default)]
    pub vars: BTreeMap<String, serde_json::Value>,
    /// Host name (an RFC 1123 label: letters, digits, `-`). Default: the profile's `name`.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Login accounts, with SSH keys (see docs/first-boot.md).
    #[serde(default)]
    pub users: Vec<system::User>,
    /// The SSH server and its login policy.
    #[serde(default)]
    pub ssh: system::Ssh,
    /// Network configuration. Default: DHCP on every wired interface.
    #[serde(default)]
    pub network: system::Network,
    /// Time zone and time synchronisation.
    #[serde(default)]
    pub time: system::Time,
    /// Kernel parameters (`net.ipv4.ip_forward: 1`), written to `/etc/sysctl.d/kiln.conf` and
    /// applied at every boot.
    #[serde(default)]
    pub sysctl: BTreeMap<String, system::SysctlValue>,
    /// A k3s cluster formed from this one image (see docs/clusters.md). Absent: no cluster.
    #[serde(default)]
    pub cluster: Option<cluster::Cluster>,
    /// Container images bundled for k3s (needs `cluster`) or for `engine: containerd`:
    /// references by tag or digest (`registry/repository:tag`, `...@sha256:<hex>`;
    /// `busybox:1.36` means Docker Hub). Each is pulled once per architecture (an index is
    /// resolved to `linux/<arch>`), verified, cached, and bundled into
    /// `/usr/lib/kiln/images/kiln-images-<arch>.tar.zst` (k3s) or `.tar` (containerd), which the
    /// engine imports at boot. See docs/containers.md, "Air-gapped container images".
    #[serde(default)]
    pub images: Vec<ImageRef>,
    /// Pull options per registry host (as written in `images`, e.g. `registry.local:5000`):
    /// `insecure_http: true` (plain HTTP for this host only), `ca_file` (PEM CA certificates to
    /// trust), `username` with `password_file` (default: the host's entry in
    /// `$REGISTRY_AUTH_FILE` or `~/.docker/config.json`, else anonymous).
    #[serde(default)]
    pub image_registries: BTreeMap<String, images::Registry>,
    /// What runs the workloads: `k3s` (default; `images` need `cluster`) or `containerd`
    /// (container appliances without Kubernetes: `images` are imported by containerd and
    /// `containers` run from them; not together with `cluster`). See docs/containers.md,
    /// "Container appliances (engine: containerd)".
    #[serde(default)]
    pub engine: containers::Engine,
    /// Containers an `engine: containerd` appliance runs, each from one of `images`, started
    /// and supervised by init (logs in `/var/log/containers/<name>.log` and on the console).
    #[serde(default)]
    pub containers: Vec<containers::Container>,
    /// Kubernetes YAML that the k3s servers apply at start (needs a `cluster` with servers):
    /// files or directories (relative to the profile), installed into k3s's auto-deploy
    /// directory `/var/lib/rancher/k3s/server/manifests/`. Files must end in `.yaml`, `.yml` or
    /// `.json`; a file ending in `.hbs` too is a handlebars template rendered with the overlay
    /// context (`{{vars.KEY}}`, `{{arch}}`, ...) and installed without the suffix. See docs/containers.md,
    /// "Manifests and charts".
    #[serde(default)]
    pub manifests: Vec<PathBuf>,
    /// Helm charts the k3s servers install at start (needs a `cluster` with servers): each a
    /// chart directory (packed by kiln), a packaged `.tgz` or `oci://host/repo/name:version`,
    /// with optional release `name`, `namespace`, expected `version` and `values`. The `.tgz`
    /// goes to `/var/lib/rancher/k3s/server/static/charts/<name>-<version>.tgz`, with a
    /// `HelmChart` manifest (`chart-<release>.yaml`) in the auto-deploy directory.
    #[serde(default)]
    pub charts: Vec<deploy::ChartSpec>,
    /// k3s's registry configuration, rendered to `/etc/rancher/k3s/registries.yaml` (mode
    /// 0600; needs a `cluster`): `mirrors` (endpoints and rewrites per registry) and `configs`
    /// (per host: `auth` with `username` and `password_file`, `tls` with `ca_file`, `cert_file`,
    /// `key_file`, `insecure_skip_verify`). Named files are copied into the image under
    /// `/etc/rancher/k3s/certs/<host>/`.
    #[serde(default)]
    pub registries: Option<registries::Registries>,
    /// Site-specific boot steps: shell run at every boot after kiln's own steps, in order
    /// (see docs/first-boot.md, "Site steps and services").
    #[serde(default)]
    pub boot_scripts: Vec<site::BootScript>,
    /// Site services: programs init starts once the boot steps are done and supervises like
    /// kiln's own (exit status and last log lines on the console, restart with backoff).
    #[serde(default)]
    pub services: Vec<site::Service>,
    /// Signed A/B updates (docs/updates.md): this build's `version`, the `trusted_keys` whose
    /// bundles the appliance accepts, `min_version`, `health_timeout`. Absent: the image refuses
    /// every update; `kiln build --format update` needs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<update::Update>,
    /// Settings for debugging a device on the bench. Not for machines on untrusted sites.
    #[serde(default)]
    pub debug: system::DebugOptions,
}

impl Profile {
    /// The deployment this image belongs to (`install.deployment` or derived: see
    /// [`install::deployment`]).
    pub fn deployment(&self) -> String {
        install::deployment(&self.name, self.cluster.as_ref().map(|c| c.name.as_str()), self.install.deployment.as_deref())
    }
}

/// The Debian base system.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Os {
    /// Debian suite (codename) to build from.
    #[serde(default = "default_suite")]
    pub suite: String,
    /// Debian mirror URL. Default: the Debian mirror in the host's apt sources.
    #[serde(default)]
    pub mirror: Option<String>,
    /// OpenPGP keyring (file or directory) that signs the suite's InRelease.
    /// Default: `/usr/share/keyrings/debian-archive-keyring.gpg`.
    #[serde(default)]
    pub keyring: Option<PathBuf>,
    /// Debian components whose package lists are read (`main`, `contrib`, `non-free`,
    /// `non-free-firmware`), each verified by the digest in the suite's signed Release; packages
    /// resolve across all of them. A package name found in two belongs to the first listed.
    /// `non-free-firmware` carries e.g. the Raspberry Pi boot firmware (`raspi-firmware`).
    #[serde(default = "default_components")]
    pub components: Vec<String>,
    /// Extra Debian packages installed into the root (with their dependencies). With `image`
    /// they are unpacked on top of the image's files.
    #[serde(default)]
    pub packages: Vec<String>,
    /// An OCI image whose filesystem becomes the root instead of Debian's packages
    /// (`registry/repository:tag` or `...@sha256:<hex>`; registry options in
    /// `image_registries`). Pulled for each architecture, verified, cached and flattened; its
    /// kernel and modules boot the appliance. kiln still adds busybox, its boot scripts and init
    /// from `suite`. See docs/containers.md, "Base OS from an OCI image".
    #[serde(default)]
    pub image: Option<ImageRef>,
}

fn default_suite() -> String {
    "trixie".into()
}

fn default_components() -> Vec<String> {
    // Debian's free software only, as before the key existed.
    vec!["main".into()]
}

impl Default for Os {
    fn default() -> Self {
        Os { suite: default_suite(), mirror: None, keyring: None, components: default_components(), packages: Vec::new(), image: None }
    }
}

/// Kernel settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    /// Extra kernel command line, appended to kiln's own: printable characters on one line;
    /// `kiln.*` parameters are kiln's own (set per image and per machine) and refused here.
    #[serde(default)]
    pub cmdline: String,
    /// Extra kernel modules to put in the initramfs (with their dependencies).
    #[serde(default)]
    pub modules: Vec<String>,
    /// Kernel modules loaded (with `modprobe`) by the appliance at every boot; each must exist
    /// in the kernel package.
    #[serde(default)]
    pub load: Vec<String>,
    /// Which of the kernel package's modules the root carries: `platform` (the default) leaves
    /// out the subtrees the platform file names in `root_modules_omit` (displays, sound,
    /// cameras, Wi-Fi, Bluetooth: hardware the appliance has no use for), keeping every module
    /// named in `modules`/`load`, the initramfs's and the features' and whatever those depend on;
    /// `all` keeps every module (a site script that loads a driver by hand needs it).
    #[serde(default)]
    pub root_modules: RootModules,
}

/// `kernel.root_modules`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RootModules {
    /// The platform's module set (`root_modules_omit` in `firmware/<platform>.yaml`).
    #[default]
    Platform,
    /// Every module of the kernel package.
    All,
}
/// A file written into the root.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InlineFile {
    /// Absolute path inside the appliance, e.g. `/etc/motd`.
    pub path: String,
    /// The file's contents.
    pub content: String,
    /// Permission bits as an octal string, e.g. `"0644"` (the default) or `"0755"`.
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// Render `content` as a handlebars template (like `*.hbs` overlay files).
    #[serde(default)]
    pub template: bool,
}

/// Permission bits written as an octal string (`"0644"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(into = "String")]
#[schemars(with = "String")]
pub struct Mode(pub u32);

fn default_mode() -> Mode {
    Mode(0o644)
}

impl From<Mode> for String {
    fn from(m: Mode) -> String {
        format!("{:04o}", m.0)
    }
}

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let v = u32::from_str_radix(s.trim_start_matches("0o"), 8)
            .map_err(|_| serde::de::Error::custom(format!("mode `{s}` is not an octal number like \"0644\"")))?;
        if v > 0o7777 {
            return Err(serde::de::Error::custom(format!("mode `{s}` is larger than 7777")));
        }
        Ok(Mode(v))
    }
}

fn ser_spanned_paths<S: serde::Serializer>(v: &[Spanned<PathBuf>], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(v.len()))?;
    for p in v {
        seq.serialize_element(&p.value)?;
    }
    seq.end()
}

pub use crate::error::ProfileError;

/// The profile format this kiln reads (the `kiln:` key).
pub const FORMAT: u32 = 1;

/// The default platform under `firmware/`.
pub const DEFAULT_PLATFORM: &str = "generic-uefi";

/// A profile together with where it came from (relative paths resolve against its directory).
#[derive(Debug, Clone)]
pub struct LoadedProfile {
    pub profile: Profile,
    pub path: PathBuf,
    /// The exact bytes read, hashed into the build manifest.
    pub source: Vec<u8>,
}

impl LoadedProfile {
    /// Reads, parses and validates a profile file; every problem found is in the error.
    pub fn load(path: &Path) -> Result<LoadedProfile> {
        match Self::check(path)? {
            (Some(loaded), problems) if problems.is_empty() => Ok(loaded),
            (_, problems) => Err(ProfileError(check::render_all(&path.display().to_string(), &problems)).into()),
        }
    }

    /// Reads a profile and finds every static problem: structure against the schema (all of
    /// them, located), then values, then the semantic checks of every section. The profile
    /// comes back when it parses; `Err` only when the file cannot be read as text.
    pub fn check(path: &Path) -> Result<(Option<LoadedProfile>, Vec<check::Problem>)> {
        // Each failure is marked as a profile error (exit status 2).
        let source = std::fs::read(path).context(ProfileError(format!("reading profile {}", path.display())))?;
        let text = std::str::from_utf8(&source).map_err(|_| ProfileError(format!("profile {} is not UTF-8", path.display())))?;
        // Every structural problem at once, located, before serde would stop at the first.
        let tree = match check::read_tree(text) {
            Ok(t) => t,
            Err(p) => return Ok((None, vec![p])),
        };
        if let Some(p) = check::newer_format(&tree, FORMAT) {
            return Ok((None, vec![p]));
        }
        let found = check::structure(&tree, &json_schema());
        if !found.is_empty() {
            return Ok((None, found));
        }
        // What the schema cannot say (a mode that is not octal, a bad size) fails here, located.
        let profile = match parse(text) {
            Ok(p) => p,
            Err(e) => return Ok((None, vec![check::serde_problem(&e.0, "bad value")])),
        };
        let loaded = LoadedProfile { profile, path: path.to_path_buf(), source };
        let found = loaded.locate(&loaded.semantic_problems());
        Ok((Some(loaded), found))
    }

    /// The failures of checks that name the key they are about (`key `users[0].name`: ...`),
    /// located in the profile's text: one problem each.
    pub fn locate(&self, errors: &[anyhow::Error]) -> Vec<check::Problem> {
        let tree = std::str::from_utf8(&self.source).ok().and_then(|t| check::read_tree(t).ok());
        errors
            .iter()
            .map(|e| {
                let message = format!("{e:#}");
                let (line, column) = match (&tree, check::key_in_message(&message)) {
                    (Some(tree), Some(k)) => check::locate(tree, k),
                    _ => (0, 0),
                };
                check::Problem { line, column, key: String::new(), message }
            })
            .collect()
    }

    /// A [`ProfileError`] listing every one of `errors`, located; `Ok` when there are none.
    pub fn fail_on(&self, errors: &[anyhow::Error]) -> Result<()> {
        if errors.is_empty() {
            return Ok(());
        }
        Err(ProfileError(check::render_all(&self.path.display().to_string(), &self.locate(errors))).into())
    }

    /// The directory relative paths in the profile are relative to.
    pub fn base_dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// Resolves an overlay path against the profile's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir().join(p)
        }
    }

    /// The platform name for an architecture.
    pub fn platform(&self, arch: Arch) -> &str {
        self.profile.platform.get(&arch).map(String::as_str).unwrap_or(DEFAULT_PLATFORM)
    }

    /// Checks what the types cannot: names, duplicates, paths that must exist. Fails with one
    /// [`ProfileError`] listing every problem (`FILE: key `...`: ...`, one per line).
    pub fn validate(&self) -> Result<()> {
        let found = self.semantic_problems();
        if found.is_empty() {
            return Ok(());
        }
        let lines: Vec<String> = found.iter().map(|e| format!("{}: {e:#}", self.path.display())).collect();
        Err(ProfileError(lines.join("\n")).into())
    }

    /// The semantic checks' failures: every failing top-level key, then each section's first
    /// failure (so one run reports a problem in every section that has one).
    pub fn semantic_problems(&self) -> Vec<anyhow::Error> {
        let p = &self.profile;
        let base = self.base_dir();
        let sections = [
            check_cmdline(&p.kernel.cmdline),
            install::validate(&p.install),
            system::validate(p),
            cluster::validate(p),
            images::validate(p, &base),
            containers::validate(p),
            deploy::validate(p, &base),
            registries::validate(p, &base),
            site::validate(p),
            update::validate(p, &base),
        ];
        self.check_top_level().into_iter().chain(sections.into_iter().filter_map(Result::err)).collect()
    }

    /// The checks of the top-level keys (name, arch, platform, packages, overlays, files, vars).
    fn check_top_level(&self) -> Vec<anyhow::Error> {
        let p = &self.profile;
        let mut found = Vec::new();
        // Every failing key is reported, not only the first.
        macro_rules! fail {
            ($($t:tt)*) => { found.push(anyhow::anyhow!($($t)*)) };
        }
        if p.name.is_empty()
            || !p.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
            || p.name.starts_with('.')
        {
            fail!("key `name`: `{}` must be lower-case letters, digits, `-`, `_` or `.`", p.name);
        }
        if p.arch.is_empty() {
            fail!("key `arch`: list at least one of x86_64, aarch64, riscv64");
        }
        let mut seen = Vec::new();
        for a in &p.arch {
            if seen.contains(a) {
                fail!("key `arch`: `{a}` is listed twice (amd64/arm64 are aliases of x86_64/aarch64)");
            }
            seen.push(*a);
        }
        for (a, _) in p.platform.iter() {
            if !p.arch.contains(a) {
                fail!("key `platform.{a}`: {a} is not in `arch`");
            }
        }
        if p.os.components.is_empty() {
            fail!("key `os.components`: list at least one Debian component (the default is [main])");
        }
        for (i, c) in p.os.components.iter().enumerate() {
            // The name becomes a path on the mirror (`dists/<suite>/<component>/...`).
            if c.is_empty() || !c.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c)) || c.starts_with('.') {
                fail!("key `os.components`: `{c}` is not a Debian component name (e.g. main, contrib, non-free-firmware)");
            }
            if p.os.components[..i].contains(c) {
                fail!("key `os.components`: `{c}` is listed twice");
            }
        }
        for pkg in &p.os.packages {
            if pkg.is_empty() || pkg.contains(char::is_whitespace) {
                fail!("key `os.packages`: `{pkg}` is not a Debian package name");
            }
        }
        for (i, o) in p.overlays.iter().enumerate() {
            let dir = self.resolve(&o.value);
            if !dir.is_dir() {
                fail!("key `overlays[{i}]`: overlay directory {} does not exist (paths are relative to the profile)", dir.display());
            }
        }
        for (i, f) in p.files.iter().enumerate() {
            if !f.path.starts_with('/') || crate::tree::TreePath::parse(&f.path).is_err() || f.path.len() < 2 {
                fail!("key `files[{i}].path`: `{}` must be an absolute path inside the appliance", f.path);
            }
        }
        for k in p.vars.keys() {
            if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                fail!("key `vars.{k}`: variable names are letters, digits, `_` and `-`");
            }
        }
        found
    }
}

/// `kernel.cmdline` goes into boot loader entries, extlinux and iPXE scripts line by line: a
/// control character could end the line and start a directive of its own. `kiln.*` parameters
/// steer first boot and installs (`kiln.rootname`, `kiln.install`, `kiln.node`, `kiln.mac`):
/// kiln sets them, a profile must not.
fn check_cmdline(cmdline: &str) -> Result<()> {
    if let Some(c) = cmdline.chars().find(|c| c.is_control()) {
        bail!("key `kernel.cmdline`: contains the control character {c:?}; write the parameters on one line, separated by spaces");
    }
    if let Some(word) = cmdline.split_whitespace().find(|w| w.starts_with("kiln.")) {
        let key = word.split('=').next().unwrap_or(word);
        bail!("key `kernel.cmdline`: `{key}` is reserved: kiln sets the `kiln.*` parameters itself (a machine's node comes from `cluster.nodes` by MAC, or `kiln.node=` typed at its boot loader)");
    }
    Ok(())
}

/// Profile YAML that does not parse into a [`Profile`]: bad YAML, an unknown key, a wrong type
/// or a bad value. The message carries line and column and shows the YAML around them.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ParseError(#[from] serde_saphyr::Error);

/// Parses profile YAML (no semantic validation). Errors carry line and column.
pub fn parse(text: &str) -> Result<Profile, ParseError> {
    Ok(serde_saphyr::from_str::<Profile>(text)?)
}

/// A test profile: `name: d`, `arch: [x86_64]`, then `extra_yaml` (top-level keys, each line
/// ending in a newline), parsed (not validated).
#[cfg(test)]
pub(crate) fn test_parse(extra_yaml: &str) -> Result<Profile, ParseError> {
    parse(&format!("name: d\narch: [x86_64]\n{extra_yaml}"))
}

/// [`test_parse`] for a profile that parses; panics with the error otherwise.
#[cfg(test)]
pub(crate) fn test_profile(extra_yaml: &str) -> Profile {
    test_parse(extra_yaml).unwrap_or_else(|e| panic!("test profile does not parse: {e}"))
}

/// [`test_parse`] for a profile the types refuse: the error's message; panics if it parses.
#[cfg(test)]
pub(crate) fn test_parse_error(extra_yaml: &str) -> String {
    match test_parse(extra_yaml) {
        Ok(_) => panic!("test profile parses:\n{extra_yaml}"),
        Err(e) => e.to_string(),
    }
}

/// The JSON schema of the profile, generated from the types.
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Profile)).expect("schema serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "name: demo\narch: [amd64, riscv64]\n";

    #[test]
    fn minimal_profile_gets_defaults() {
        let p = parse(MINIMAL).unwrap();
        assert_eq!(p.arch, vec![Arch::X86_64, Arch::Riscv64]);
        assert_eq!(p.os.suite, "trixie");
        assert_eq!(p.disk.size, DiskSize::Auto);
        assert_eq!(p.disk.headroom, Size(64 << 20));
        assert_eq!(p.install.mode, InstallMode::InPlace);
    }
    #[test]
    fn unknown_key_names_key_and_line() {
        let err = test_parse_error("os:\n  suit: trixie\n");
        assert!(err.contains("suit"), "{err}");
        assert!(err.contains('4'), "line number missing: {err}");
    }

    #[test]
    fn unknown_arch_is_an_error_naming_it() {
        let err = parse("name: demo\narch: [mips]\n").unwrap_err().to_string();
        assert!(err.contains("mips") && err.contains("x86_64"), "{err}");
    }

    #[test]
    fn wrong_type_is_an_error() {
        let err = parse("name: demo\narch: x86_64\n").unwrap_err().to_string();
        assert!(!err.is_empty());
        let err = test_parse_error("disk:\n  size: lots\n");
        assert!(err.contains("lots"), "{err}");
    }

    #[test]
    fn modes_parse() {
        let p = test_profile("files:\n  - path: /etc/x\n    content: hi\n    mode: \"0755\"\n");
        assert_eq!(p.files[0].mode, Mode(0o755));
        assert!(test_parse("files:\n  - path: /x\n    content: hi\n    mode: \"999\"\n").is_err());
    }

    fn loaded(text: &str, dir: &Path) -> Result<LoadedProfile> {
        let path = dir.join("p.yaml");
        std::fs::write(&path, text).unwrap();
        LoadedProfile::load(&path)
    }

    #[test]
    fn kernel_cmdline_is_one_line_without_kiln_parameters() {
        let d = tempfile::tempdir().unwrap();
        let check = |cmdline: &str| {
            let yaml = format!("name: d\narch: [x86_64]\nkernel: {{cmdline: {}}}\n", serde_json::to_string(cmdline).unwrap());
            loaded(&yaml, d.path()).map(|_| ()).map_err(|e| format!("{e:#}"))
        };
        assert!(check("quiet loglevel=3 console=ttyS1,115200").is_ok());
        let newline = check("quiet\ninitrd /evil").unwrap_err();
        assert!(newline.contains("kernel.cmdline") && newline.contains("control character"), "{newline}");
        assert!(check("quiet\tx").is_err());
        let reserved = check("quiet kiln.install=1").unwrap_err();
        assert!(reserved.contains("`kiln.install` is reserved"), "{reserved}");
        assert!(check("kiln.node").unwrap_err().contains("`kiln.node` is reserved"));
        assert!(check("nokiln.x=1 akiln.y").is_ok(), "only parameters named kiln.* are kiln's");
    }

    #[test]
    fn os_components_default_to_main_and_are_checked() {
        assert_eq!(test_profile("").os.components, ["main"]);
        assert_eq!(test_profile("os: {components: [main, non-free-firmware]}\n").os.components, ["main", "non-free-firmware"]);
        let d = tempfile::tempdir().unwrap();
        let check = |components: &str| {
            let yaml = format!("name: d\narch: [x86_64]\nos: {{components: {components}}}\n");
            loaded(&yaml, d.path()).map(|_| ()).map_err(|e| format!("{e:#}"))
        };
        assert!(check("[main, contrib, non-free, non-free-firmware]").is_ok());
        for (bad, want) in [
            ("[]", "at least one"),
            ("[main, main]", "`main` is listed twice"),
            ("[\"../main\"]", "`../main` is not"),
            ("[Main]", "`Main` is not"),
        ] {
            let err = check(bad).unwrap_err();
            assert!(err.contains("key `os.components`") && err.contains(want) && err.contains("p.yaml"), "{bad}: {err}");
        }
    }

    #[test]
    fn validation_reports_file_key_and_line() {
        let d = tempfile::tempdir().unwrap();
        let err =
            loaded("name: demo\narch: [x86_64]\noverlays:\n  - ./nope\n", d.path()).map(|_| ()).map_err(|e| format!("{e:#}")).unwrap_err();
        assert!(err.contains("p.yaml:4") && err.contains("overlays") && err.contains("nope"), "{err}");
        let err = loaded("name: Demo!\narch: [x86_64]\n", d.path()).map(|_| ()).map_err(|e| format!("{e:#}")).unwrap_err();
        assert!(err.contains("`name`"), "{err}");
        let err = loaded("name: d\narch: [x86_64, amd64]\n", d.path()).map(|_| ()).map_err(|e| format!("{e:#}")).unwrap_err();
        assert!(err.contains("twice"), "{err}");
        let err =
            loaded("name: d\narch: [x86_64]\ninstall: { wipe: true }\n", d.path()).map(|_| ()).map_err(|e| format!("{e:#}")).unwrap_err();
        assert!(err.contains("install.wipe") && err.contains("installer"), "{err}");
        let err = loaded("name: d\narch: [x86_64]\nfiles:\n  - path: etc/x\n    content: y\n", d.path())
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
            .unwrap_err();
        assert!(err.contains("files[0].path"), "{err}");
    }

    #[test]
    fn every_example_profile_parses_and_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles");
        let mut names: Vec<PathBuf> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "yaml")).collect();
        names.sort();
        for p in &names {
            LoadedProfile::load(p).unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
        }
        let stems: Vec<String> = names.iter().map(|p| p.file_stem().unwrap().to_string_lossy().into_owned()).collect();
        for want in ["quickstart", "single-server", "ha-embedded-etcd", "ha-external-etcd", "agents-only"] {
            assert!(stems.iter().any(|s| s == want), "profiles/{want}.yaml missing: {stems:?}");
        }
    }

    #[test]
    fn schema_lists_every_top_level_key() {
        let s = json_schema();
        let props = s["properties"].as_object().unwrap();
        for k in [
            "name", "arch", "os", "kernel", "platform", "disk", "install", "overlays", "files", "vars", "hostname", "users", "ssh",
            "network", "time", "sysctl", "cluster",
        ] {
            assert!(props.contains_key(k), "schema lacks {k}");
        }
    }
}
