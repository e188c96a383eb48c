//! `manifest.json`: every input of a build (name, version, sha256) and the digests of what it
//! produced. The installer (and anyone auditing an image) checks against it.

use serde::{Deserialize, Serialize};

/// One input artifact.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Input {
    /// `deb`, `index`, `profile`, `overlay`.
    pub kind: String,
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
    pub arch: String,
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
