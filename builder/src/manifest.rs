//! `manifest.json`: every input of a build (name, version, sha256) and the digests of what it
//! produced. The installer (and anyone auditing an image) checks against it.

use serde::{Deserialize, Serialize};

use crate::arch::Arch;

/// What an input artifact is; written as its lower-case name (`deb`, `oci`, ...).
///
/// The variants are in the alphabetical order of those names: inputs are sorted by kind first,
/// and the order must stay the one the names had as strings.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    /// A Helm chart (profile key `charts`): the `.tgz` as pulled, read or packed.
    Chart,
    /// A Debian package.
    Deb,
    /// A Debian index: the suite's `InRelease` and the arch's `Packages`.
    Index,
    /// A k3s release asset (the binary, the air-gap image archive).
    K3s,
    /// A Kubernetes manifest (profile key `manifests`), as rendered.
    Manifest,
    /// A container image (profile keys `images` and `os.image`): its platform manifest.
    Oci,
    /// The profile file.
    Profile,
}

impl InputKind {
    pub fn as_str(self) -> &'static str {
        match self {
            InputKind::Chart => "chart",
            InputKind::Deb => "deb",
            InputKind::Index => "index",
            InputKind::K3s => "k3s",
            InputKind::Manifest => "manifest",
            InputKind::Oci => "oci",
            InputKind::Profile => "profile",
        }
    }
}

/// One input artifact.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Input {
    pub kind: InputKind,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub sha256: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// One partition of the disk image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionRecord {
    pub number: u32,
    pub name: String,
    pub type_guid: String,
    pub guid: String,
    pub offset: u64,
    pub size: u64,
    /// Digest of the filesystem written into the partition (`content_size` bytes from its start);
    /// `None` for slots left empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_size: Option<u64>,
}

/// What an installer image installs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstallRecord {
    pub disk_guid: String,
    pub partitions: Vec<PartitionRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Output {
    pub file: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub kiln_version: String,
    pub profile: String,
    pub arch: Arch,
    pub suite: String,
    pub kernel_version: String,
    /// The build's timestamp (SOURCE_DATE_EPOCH, else the suite's Release date).
    pub source_date_epoch: u64,
    pub kernel_cmdline: String,
    pub disk_guid: String,
    pub inputs: Vec<Input>,
    pub partitions: Vec<PartitionRecord>,
    /// Installer images: the system the installer writes onto the target disk (its disk GUID
    /// and partitions with content digests); the same digests are in the medium's install plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install: Option<InstallRecord>,
    /// Netboot outputs: the system a network install writes. Its root is the image's root
    /// without the secrets (docs/security.md), so its digests differ from `install`'s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netboot_install: Option<InstallRecord>,
    pub initramfs_modules: Vec<String>,
    pub outputs: Vec<Output>,
}

impl Manifest {
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("manifest serialises");
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [InputKind; 7] =
        [InputKind::Chart, InputKind::Deb, InputKind::Index, InputKind::K3s, InputKind::Manifest, InputKind::Oci, InputKind::Profile];

    #[test]
    fn kinds_serialise_to_their_names_and_sort_as_the_names_do() {
        for k in ALL {
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{}\"", k.as_str()));
            assert_eq!(serde_json::from_str::<InputKind>(&format!("\"{}\"", k.as_str())).unwrap(), k);
        }
        let mut by_name = ALL;
        by_name.sort_by_key(|k| k.as_str());
        assert_eq!(by_name, ALL);
    }

    #[test]
    fn arch_is_written_as_its_name() {
        let m = Manifest {
            kiln_version: "0".into(),
            profile: "p".into(),
            arch: Arch::Aarch64,
            suite: "trixie".into(),
            kernel_version: "6".into(),
            source_date_epoch: 1,
            kernel_cmdline: String::new(),
            disk_guid: String::new(),
            inputs: vec![Input { kind: InputKind::K3s, name: "k3s".into(), version: None, sha256: "00".into(), size: None }],
            partitions: Vec::new(),
            install: None,
            netboot_install: None,
            initramfs_modules: Vec::new(),
            outputs: Vec::new(),
        };
        let json = m.to_json();
        assert!(json.contains("\"arch\": \"aarch64\",") && json.contains("\"kind\": \"k3s\","), "{json}");
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!((back.arch, back.inputs[0].kind), (Arch::Aarch64, InputKind::K3s));
    }
}
