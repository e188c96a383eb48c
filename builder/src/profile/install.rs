//! The profile's `disk` (image size) and `install` (how the image gets onto the machine's disk:
//! in place or through the installer, its target, size floor, wipe policy and what happens
//! after) keys: their types and the check the types cannot express. Re-exported from `profile`;
//! `installer` and the pipeline act on them.

use anyhow::{bail, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use super::Size;

/// Disk image size.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// `auto` (content plus headroom) or a size such as `2GiB`, `512MiB`.
    #[serde(default)]
    pub size: DiskSize,
    /// Free space added after the partitions when `size` is `auto`.
    #[serde(default = "default_headroom")]
    pub headroom: Size,
}

fn default_headroom() -> Size {
    Size(64 << 20)
}

impl Default for Disk {
    fn default() -> Self {
        Disk { size: DiskSize::Auto, headroom: default_headroom() }
    }
}

/// How the image gets onto the machine's disk.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Install {
    /// `in-place`: the image is written straight to the disk the machine boots from (SD card,
    /// disk); the first boot grows the partition table to the end of the medium and creates the
    /// `kiln-data` partition in the free space. `installer`: the image is a boot medium (USB
    /// stick) that writes the system onto another disk of the machine, verifies it, creates the
    /// data partition there and then powers off or reboots. It never writes to itself.
    #[serde(default)]
    pub mode: InstallMode,
    /// Installer mode: the disk to install onto. `auto` (the default): the largest disk that is
    /// not removable, not read-only, not the boot medium and at least `min_size`. Or a device
    /// path: `/dev/nvme0n1`, `/dev/sd?` (shell pattern on kernel names), or
    /// `/dev/disk/by-id/PATTERN`, where kiln's installer knows the ids `virtio-SERIAL` and
    /// `nvme-MODEL_SERIAL` (it has no udev; other buses: use a `/dev/NAME` pattern). A pattern
    /// must match exactly one disk.
    #[serde(default)]
    pub target: InstallTarget,
    /// Installer mode: the smallest disk `auto` considers. Default: the system's partitions plus
    /// 1 GiB for the data partition. Smaller explicit targets are refused too.
    #[serde(default)]
    pub min_size: Option<Size>,
    /// Installer mode: overwrite a target that holds data which is not a kiln system of this
    /// image's `deployment` (any partition table, non-zero bytes in its first or last MiB, or a
    /// kiln system of another deployment). Default `false`: such a disk is refused and left
    /// untouched. A kiln disk of the same deployment is always replaced.
    #[serde(default)]
    pub wipe: bool,
    /// The deployment this image belongs to: a short name (lower-case letters, digits, `-`, `_`,
    /// `.`; at most 32 characters) recorded on every disk kiln writes (the ESP's GPT name is
    /// `esp@<deployment>`). An installer replaces a kiln disk of the same deployment and refuses
    /// one of another deployment unless `wipe` is set. Default: the profile's `name`, joined with
    /// `-` to `cluster.name` when there is a cluster (long names are shortened with a hash).
    #[serde(default)]
    pub deployment: Option<String>,
    /// Installer mode: what the machine does once the install is written and verified.
    #[serde(default)]
    pub after: AfterInstall,
}

/// Install mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum InstallMode {
    /// The image is the installed system; first boot grows it into the whole medium.
    #[default]
    InPlace,
    /// The image is an installer medium that writes the system onto another disk.
    Installer,
}

/// The installer's target disk: `auto` or a device path / pattern.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(into = "String")]
#[schemars(with = "String")]
pub enum InstallTarget {
    #[default]
    Auto,
    Device(String),
}

impl From<InstallTarget> for String {
    fn from(t: InstallTarget) -> String {
        match t {
            InstallTarget::Auto => "auto".into(),
            InstallTarget::Device(d) => d,
        }
    }
}

impl<'de> Deserialize<'de> for InstallTarget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "auto" {
            return Ok(InstallTarget::Auto);
        }
        check_target_path(&s).map_err(serde::de::Error::custom)?;
        Ok(InstallTarget::Device(s))
    }
}

/// The forms the installer can resolve without udev (see [`Install::target`]).
fn check_target_path(s: &str) -> Result<(), String> {
    let bad_char = |t: &str| t.is_empty() || t.chars().any(|c| c.is_whitespace() || c == '/' || c == '\\' || c == '\'' || c == '"');
    if let Some(id) = s.strip_prefix("/dev/disk/by-id/") {
        if bad_char(id) || !(id.starts_with("virtio-") || id.starts_with("nvme-")) {
            return Err(format!(
                "install target `{s}`: the installer knows by-id names `virtio-SERIAL` and `nvme-MODEL_SERIAL` only; use `auto` or a /dev/NAME pattern"
            ));
        }
        return Ok(());
    }
    if let Some(name) = s.strip_prefix("/dev/") {
        if !name.starts_with("disk/") && !bad_char(name) {
            return Ok(());
        }
    }
    Err(format!("install target `{s}` must be `auto`, /dev/NAME (e.g. /dev/nvme0n1, /dev/sd?) or /dev/disk/by-id/PATTERN"))
}

/// What the installer does when it is done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AfterInstall {
    /// Power off, so the medium can be removed before the next start (safe with any boot order).
    #[default]
    Poweroff,
    /// Reboot. If the firmware boots the installer medium again, it sees the finished install
    /// of the same image and boots it instead of installing again.
    Reboot,
}

/// `auto` or a fixed size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(into = "String")]
#[schemars(with = "String")]
pub enum DiskSize {
    #[default]
    Auto,
    Fixed(Size),
}

impl From<DiskSize> for String {
    fn from(d: DiskSize) -> String {
        match d {
            DiskSize::Auto => "auto".into(),
            DiskSize::Fixed(s) => s.to_string(),
        }
    }
}

impl<'de> Deserialize<'de> for DiskSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "auto" {
            return Ok(DiskSize::Auto);
        }
        s.parse().map(DiskSize::Fixed).map_err(serde::de::Error::custom)
    }
}

/// The longest deployment name: a GPT partition name holds 36 characters, and the ESP's is
/// `esp@<deployment>`.
pub const DEPLOYMENT_MAX: usize = 32;
/// The GPT name of the installed system's ESP starts with this, the deployment follows.
pub const ESP_NAME_PREFIX: &str = "esp@";

/// Whether `s` can be a deployment name: it goes into a GPT partition name, the install plan and
/// the installer's shell words, so only a small alphabet.
fn is_deployment_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= DEPLOYMENT_MAX
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
}

/// The profile's deployment: `install.deployment`, else derived from the profile's name and its
/// cluster's name, so that builds of the same profile agree without anyone choosing a name (and
/// stay reproducible). A derived name too long for the GPT keeps its start and gets a hash of
/// the whole, so two long names that share a start still differ.
pub fn deployment(name: &str, cluster: Option<&str>, explicit: Option<&str>) -> String {
    if let Some(d) = explicit {
        return d.to_string();
    }
    let full = match cluster {
        Some(c) if c != name => format!("{name}-{c}"),
        _ => name.to_string(),
    };
    // The profile's name may start with `-` or `_`; the deployment starts with a letter or digit.
    let full = full.trim_start_matches(['-', '_', '.']).to_string();
    let full = if full.is_empty() { "kiln".to_string() } else { full };
    if full.len() <= DEPLOYMENT_MAX {
        return full;
    }
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(full.as_bytes()));
    format!("{}-{}", &full[..DEPLOYMENT_MAX - 9], &hash[..8])
}

/// `install.deployment`'s alphabet and length (it applies to both modes: in-place disks record it
/// too); the installer-only keys are refused with `install.mode: in-place`.
pub fn validate(i: &Install) -> Result<()> {
    if let Some(d) = &i.deployment {
        if !is_deployment_name(d) {
            bail!(
                "key `install.deployment`: `{d}` must be 1-{DEPLOYMENT_MAX} lower-case letters, digits, `-`, `_` or `.`, starting with a letter or digit"
            );
        }
    }
    if i.mode == InstallMode::InPlace {
        let set = [
            ("target", i.target != InstallTarget::Auto),
            ("min_size", i.min_size.is_some()),
            ("wipe", i.wipe),
            ("after", i.after != AfterInstall::Poweroff),
        ];
        if let Some((key, _)) = set.iter().find(|(_, s)| *s) {
            bail!("key `install.{key}` applies to `install.mode: installer` only (this profile installs in place)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{test_parse_error, test_profile};

    #[test]
    fn install_modes_parse_and_unknown_ones_are_named() {
        let p = test_profile("install: { mode: installer }\n");
        assert_eq!(p.install.mode, InstallMode::Installer);
        let p = test_profile("install:\n  mode: in-place\n");
        assert_eq!(p.install.mode, InstallMode::InPlace);
        let err = test_parse_error("install:\n  mode: pxe\n");
        assert!(err.contains("pxe"), "{err}");
        let p =
            test_profile("install: { mode: installer, target: /dev/disk/by-id/virtio-kiln*, wipe: true, after: reboot, min_size: 4GiB }\n");
        assert_eq!(p.install.target, InstallTarget::Device("/dev/disk/by-id/virtio-kiln*".into()));
        assert!(p.install.wipe);
        assert_eq!(p.install.after, AfterInstall::Reboot);
        assert_eq!(p.install.min_size, Some(Size(4 << 30)));
        let p = test_profile("install: { mode: installer }\n");
        assert_eq!(p.install.target, InstallTarget::Auto);
        assert_eq!(p.install.after, AfterInstall::Poweroff);
        assert!(!p.install.wipe);
        for bad in ["/dev/disk/by-path/pci-0000:00:04.0", "sda", "/dev/", "/dev/disk/by-id/ata-x", "/dev/sd a"] {
            let err = test_parse_error(&format!("install: {{ target: \"{bad}\" }}\n"));
            assert!(err.contains("install target"), "{bad}: {err}");
        }
        let err = test_parse_error("install:\n  after: halt\n");
        assert!(err.contains("halt"), "{err}");
    }

    #[test]
    fn deployment_is_explicit_or_derived_from_the_names_and_fits_a_gpt_name() {
        assert_eq!(deployment("edge", None, None), "edge");
        assert_eq!(deployment("edge", Some("lab"), None), "edge-lab");
        assert_eq!(deployment("lab", Some("lab"), None), "lab");
        assert_eq!(deployment("edge", Some("lab"), Some("site-7")), "site-7");
        let long = "a-very-long-profile-name-for-the-factory-floor";
        let a = deployment(long, Some("north"), None);
        let b = deployment(long, Some("south"), None);
        assert!(a.len() <= DEPLOYMENT_MAX && is_deployment_name(&a), "{a}");
        assert!(a.starts_with("a-very-long-profile-nam-") && a != b, "{a} {b}");
        assert_eq!(a, deployment(long, Some("north"), None), "derived names are deterministic");
        assert!(is_deployment_name(&deployment("_x.y", None, None)));
        assert!(is_deployment_name(&deployment("-.x", None, None)));
        assert!((ESP_NAME_PREFIX.len() + DEPLOYMENT_MAX) <= 36, "a GPT partition name holds 36 UTF-16 units");
    }

    #[test]
    fn deployment_names_outside_the_alphabet_are_refused_naming_the_key() {
        for bad in ["", "Lab", "a b", "a/b", "-x", &"x".repeat(33), "a@b"] {
            let mut i = Install { deployment: Some(bad.to_string()), ..Default::default() };
            let err = validate(&i).unwrap_err().to_string();
            assert!(err.contains("install.deployment") && err.contains("32"), "{bad}: {err}");
            i.deployment = Some("site-7.a_b".into());
            validate(&i).unwrap();
        }
    }
}
