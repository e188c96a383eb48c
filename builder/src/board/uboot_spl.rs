//! U-Boot SPL boards (SiFive HiFive Unleashed/Unmatched, StarFive VisionFive 2): the loaders
//! (SPL and the U-Boot proper FIT image) taken from a Debian U-Boot package and placed in GPT
//! partitions at the fixed sectors where the board's boot ROM and SPL look for them; and the
//! board's device tree taken from the kernel package for extlinux's `fdt` line.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

use crate::arch::Arch;
use crate::gpt::{Guid, Partition};
use crate::tree::{Content, Kind, Tree};

/// `uboot_spl:` in a platform file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UbootSpl {
    /// The Debian package holding the loaders (e.g. `u-boot-sifive`).
    pub package: String,
    /// The loaders, in table order (they become the card's first partitions).
    pub loaders: Vec<Loader>,
}

/// One loader partition: a file of the package written at a fixed place on the card.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Loader {
    /// GPT partition name (e.g. `loader1`).
    pub name: String,
    /// Path of the file in the package (e.g. `usr/lib/u-boot/sifive_unleashed/u-boot-spl.bin`).
    pub file: String,
    /// GPT partition type GUID the boot ROM or SPL looks for.
    pub type_guid: String,
    /// First 512-byte sector: where the boot ROM or SPL reads it.
    pub first_sector: u64,
    /// Partition size in 512-byte sectors.
    pub sectors: u64,
}

/// A loader read from its package, with the partition it goes in.
#[derive(Debug, Clone)]
pub struct LoaderImage {
    pub partition: Partition,
    pub bytes: Vec<u8>,
}

impl UbootSpl {
    /// The loader partitions (GUIDs from `guid`, derived by the caller) without their contents:
    /// each type GUID parsed and each place checked (in order, after the partition table).
    pub fn partitions(&self, guid: impl Fn(&str) -> Guid) -> Result<Vec<Partition>> {
        self.loaders
            .iter()
            .map(|l| {
                let type_guid: Guid =
                    l.type_guid.parse().map_err(|e| anyhow::anyhow!("loader `{}`: type_guid `{}`: {e}", l.name, l.type_guid))?;
                ensure!(l.sectors > 0, "loader `{}` has 0 sectors", l.name);
                Ok(Partition {
                    name: l.name.clone(),
                    type_guid,
                    guid: guid(&l.name),
                    first_lba: l.first_sector,
                    last_lba: l.first_sector + l.sectors - 1,
                    attributes: 0,
                })
            })
            .collect()
    }

    /// Reads each loader's file out of the package `deb` and pairs it with its partition,
    /// refusing a file that is missing or larger than its partition.
    pub fn read(&self, deb: &Path, arch: Arch, guid: impl Fn(&str) -> Guid) -> Result<Vec<LoaderImage>> {
        let mut t = Tree::merged_usr(arch);
        crate::deb::unpack_deb(deb, &mut t).with_context(|| format!("unpacking {}", deb.display()))?;
        let partitions = self.partitions(guid)?;
        self.loaders
            .iter()
            .zip(partitions)
            .map(|(l, partition)| {
                let bytes = match t.get_str(l.file.trim_start_matches('/')).map(|e| &e.kind) {
                    Some(Kind::File(c)) => c.read()?.into_owned(),
                    _ => {
                        bail!("{} (package {}) has no /{}: the loader `{}` cannot be written", deb.display(), self.package, l.file, l.name)
                    }
                };
                ensure!(
                    bytes.len() as u64 <= partition.size(),
                    "loader `{}` (/{}) is {} bytes, larger than its partition of {} sectors",
                    l.name,
                    l.file,
                    bytes.len(),
                    l.sectors
                );
                Ok(LoaderImage { partition, bytes })
            })
            .collect()
    }
}

/// Where the kernel package keeps its device trees: `usr/lib/linux-image-<kver>/`.
pub fn device_tree_dir(kver: &str) -> String {
    format!("usr/lib/linux-image-{kver}")
}

/// The board's device tree (`dtb`, relative to the kernel's dtb directory, e.g.
/// `sifive/hifive-unleashed-a00.dtb`) from the root the kernel package was unpacked into.
pub fn device_tree(root: &Tree, kver: &str, dtb: &str) -> Result<Content> {
    let path = format!("{}/{dtb}", device_tree_dir(kver));
    match root.get_str(&path).map(|e| &e.kind) {
        Some(Kind::File(c)) => Ok(c.clone()),
        _ => bail!("the kernel package has no /{path}: check `device_tree` in the platform file"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spl() -> UbootSpl {
        UbootSpl {
            package: "u-boot-sifive".into(),
            loaders: vec![
                Loader {
                    name: "loader1".into(),
                    file: "usr/lib/u-boot/b/spl.bin".into(),
                    type_guid: "5B193300-FC78-40CD-8002-E86C45580B47".into(),
                    first_sector: 34,
                    sectors: 2048,
                },
                Loader {
                    name: "loader2".into(),
                    file: "usr/lib/u-boot/b/u-boot.itb".into(),
                    type_guid: "2E54B353-1271-4842-806F-E436D6AF6985".into(),
                    first_sector: 2082,
                    sectors: 8192,
                },
            ],
        }
    }

    #[test]
    fn loaders_sit_at_their_sectors_and_the_rest_starts_on_the_next_mib() {
        let fixed = spl().partitions(|n| Guid::derive("test", &[n.as_bytes()])).unwrap();
        assert_eq!((fixed[0].first_lba, fixed[0].last_lba, fixed[1].first_lba, fixed[1].last_lba), (34, 2081, 2082, 10273));
        assert_eq!(fixed[0].type_guid.to_string(), "5b193300-fc78-40cd-8002-e86c45580b47");
        let esp = crate::gpt::PartitionSpec {
            name: "esp".into(),
            type_guid: Guid::esp_type(),
            guid: Guid::derive("test", &[b"esp"]),
            size: 1 << 20,
            attributes: 0,
        };
        let layout = crate::gpt::plan_after(&fixed, &[esp], None, 0).unwrap();
        // 10274 sectors end inside MiB 5: the ESP starts at 6 MiB.
        assert_eq!(layout.partitions[2].first_lba, 6 * 2048);
        // Loaders in the wrong order or over the table are refused.
        let mut bad = fixed.clone();
        bad.swap(0, 1);
        assert!(crate::gpt::plan_after(&bad, &[], None, 0).unwrap_err().to_string().contains("overlaps"));
        let mut bad = spl();
        bad.loaders[0].first_sector = 2;
        let bad = bad.partitions(|_| Guid::derive("t", &[])).unwrap();
        assert!(crate::gpt::plan_after(&bad, &[], None, 0).is_err());
    }

    #[test]
    fn a_bad_type_guid_names_the_loader() {
        let mut s = spl();
        s.loaders[1].type_guid = "not-a-guid".into();
        let err = s.partitions(|_| Guid::derive("t", &[])).unwrap_err().to_string();
        assert!(err.contains("loader2") && err.contains("not-a-guid"), "{err}");
    }
}
