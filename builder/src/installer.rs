//! Installer mode: the layout of the installer medium and the install plan that the on-device
//! installer (`overlays/initramfs/init`) follows.
//!
//! The medium boots like any kiln image (its ESP has `kiln.install` on the command line) and
//! carries the system in two partitions: `kiln-image` holds the root squashfs, `kiln-install`
//! holds the plan (text at its start) and, from 1 MiB on, the FAT image of the installed
//! system's ESP. The ESP that ends up on the target is a separate image because it must not
//! carry `kiln.install`, and its digest cannot live inside itself: the plan holds the digests.
//!
//! The plan is `key=value` lines a POSIX shell reads with `sed`; `copy=` lines repeat, and
//! `end=1` comes last so a truncated read is detected. `deployment=` names the profile's
//! deployment: the installer takes a kiln disk only if its ESP's GPT name records the same one
//! (`esp@<deployment>`, see `pipeline::disk::esp_name`), and refuses others without `wipe=1`.
//! The installer writes the `copy=` ranges at their offsets, reads them back, and only then
//! runs the `sgdisk=` arguments that write the partition table.

use std::fmt::Write as _;

use anyhow::{ensure, Result};

use crate::gpt::{DiskLayout, Guid, Partition};
use crate::profile::{AfterInstall, Install, InstallTarget};

/// GPT name of the medium's partition holding the root squashfs (not `kiln-root-a`: the
/// installed system finds its root by that name, and must never find the medium's).
pub const IMAGE_PARTITION: &str = "kiln-image";
/// GPT name of the medium's partition holding the plan and the target ESP image.
pub const INSTALL_PARTITION: &str = "kiln-install";
/// Kernel command-line word that turns the initramfs into the installer.
pub const CMDLINE_FLAG: &str = "kiln.install";
/// Where the target's ESP image starts inside `kiln-install` (the plan text comes before it).
pub const ESP_IMAGE_OFFSET: u64 = 1 << 20;
/// The free space a target needs beyond the system partitions, at least (the data partition).
pub const MIN_DATA_SPACE: u64 = 256 << 20;
/// The default `install.min_size` margin over the system partitions.
pub const DEFAULT_DATA_SPACE: u64 = 1 << 30;

/// One range the installer copies from the medium to the target and then verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// The target partition's name (for console lines).
    pub name: String,
    /// GPT name of the medium partition the bytes come from, and the offset inside it.
    pub source_partition: &'static str,
    pub source_offset: u64,
    /// Byte offset on the target disk.
    pub target_offset: u64,
    pub length: u64,
    pub sha256: String,
}

/// Everything the on-device installer needs to know.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    /// Names this image; an identical image already on the target is booted, not reinstalled.
    pub image_id: &'a str,
    /// The profile's deployment: a kiln disk recording another one is foreign to the installer.
    pub deployment: &'a str,
    pub install: &'a Install,
    /// `install.min_size`, or its default.
    pub min_size: u64,
    pub disk_guid: Guid,
    /// The installed system's partitions (positions, types, GUIDs, names).
    pub target: &'a DiskLayout,
    pub copies: Vec<Copy>,
}

/// The smallest target for a system layout: `install.min_size` if given (refused if it leaves
/// less than [`MIN_DATA_SPACE`] for data), else the system plus [`DEFAULT_DATA_SPACE`].
pub fn min_size(install: &Install, target: &DiskLayout) -> Result<u64, String> {
    let system = target.size;
    match install.min_size {
        None => Ok(system + DEFAULT_DATA_SPACE),
        Some(s) if s.0 >= system + MIN_DATA_SPACE => Ok(s.0),
        Some(s) => Err(format!(
            "key `install.min_size`: {s} is too small: the system takes {} MiB and the data partition needs at least {} MiB",
            system.div_ceil(1 << 20),
            MIN_DATA_SPACE >> 20
        )),
    }
}

/// sgdisk arguments that recreate the target's partition table: a fresh GPT, the disk GUID,
/// then each partition with its exact sectors, type, GUID, name and attribute bits.
pub fn sgdisk_args(layout: &DiskLayout, disk_guid: Guid) -> String {
    let mut a = format!("--clear --disk-guid={disk_guid}");
    for (i, p) in layout.partitions.iter().enumerate() {
        let n = i + 1;
        let Partition { name, type_guid, guid, first_lba, last_lba, attributes } = p;
        write!(a, " --new={n}:{first_lba}:{last_lba} --typecode={n}:{type_guid} --partition-guid={n}:{guid} --change-name={n}:{name}")
            .expect("writing to a String");
        for bit in (0..64).filter(|b| attributes & (1u64 << b) != 0) {
            write!(a, " --attributes={n}:set:{bit}").expect("writing to a String");
        }
    }
    a
}

impl Plan<'_> {
    /// The plan text written at the start of the `kiln-install` partition.
    pub fn render(&self) -> Result<String> {
        for p in &self.target.partitions {
            // The shell splits the sgdisk line on spaces.
            ensure!(!p.name.contains(char::is_whitespace), "partition name `{}` contains a space", p.name);
        }
        let target = match &self.install.target {
            InstallTarget::Auto => "auto".to_string(),
            InstallTarget::Device(d) => d.clone(),
        };
        let after = match self.install.after {
            AfterInstall::Poweroff => "poweroff",
            AfterInstall::Reboot => "reboot",
        };
        let mut s = String::new();
        // The installer compares it with the ESP's GPT name, in a shell: the profile checks the
        // alphabet, this keeps a bad name from ever reaching a plan.
        ensure!(
            !self.deployment.is_empty() && self.deployment.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "deployment `{}` is not a plain name",
            self.deployment
        );
        s.push_str("kiln-install=1\n");
        writeln!(s, "image={}", self.image_id)?;
        writeln!(s, "deployment={}", self.deployment)?;
        writeln!(s, "target={target}")?;
        writeln!(s, "min_size={}", self.min_size)?;
        writeln!(s, "wipe={}", u8::from(self.install.wipe))?;
        writeln!(s, "after={after}")?;
        writeln!(s, "disk_guid={}", self.disk_guid)?;
        writeln!(s, "system_size={}", self.target.size)?;
        writeln!(s, "sgdisk={}", sgdisk_args(self.target, self.disk_guid))?;
        for c in &self.copies {
            ensure!(c.source_offset % (1 << 20) == 0 && c.target_offset % (1 << 20) == 0, "copy `{}` is not MiB-aligned", c.name);
            writeln!(s, "copy={} {} {} {} {} {}", c.name, c.source_partition, c.source_offset, c.target_offset, c.length, c.sha256)?;
        }
        s.push_str("end=1\n");
        ensure!((s.len() as u64) < ESP_IMAGE_OFFSET, "install plan is larger than its space");
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpt::{self, PartitionSpec};
    use crate::profile::Size;
    use std::process::Command;

    fn layout() -> DiskLayout {
        let g = |s: &str| Guid::derive("test", &[s.as_bytes()]);
        let specs = vec![
            PartitionSpec {
                name: "esp@lab-7".into(),
                type_guid: gpt::ESP_TYPE.parse().unwrap(),
                guid: g("esp"),
                size: 3 << 20,
                attributes: 0,
            },
            PartitionSpec {
                name: "kiln-root-a".into(),
                type_guid: gpt::LINUX_DATA_TYPE.parse().unwrap(),
                guid: g("a"),
                size: 5 << 20,
                attributes: 0,
            },
            PartitionSpec {
                name: "kiln-root-b".into(),
                type_guid: gpt::LINUX_DATA_TYPE.parse().unwrap(),
                guid: g("b"),
                size: 5 << 20,
                attributes: 1 << 63,
            },
        ];
        gpt::plan(&specs, None, 0).unwrap()
    }

    #[test]
    fn min_size_defaults_to_system_plus_a_gib_and_refuses_too_small() {
        let l = layout();
        let mut i = Install::default();
        assert_eq!(min_size(&i, &l).unwrap(), l.size + (1 << 30));
        i.min_size = Some(Size(l.size + 10));
        let err = min_size(&i, &l).unwrap_err();
        assert!(err.contains("install.min_size") && err.contains("too small"), "{err}");
        i.min_size = Some(Size(8 << 30));
        assert_eq!(min_size(&i, &l).unwrap(), 8 << 30);
    }

    /// The reference tool runs the generated arguments on a blank file: the table it writes must
    /// be the layout kiln planned, byte for byte in what matters (sectors, GUIDs, names, bits).
    #[test]
    fn sgdisk_recreates_the_planned_table() {
        let l = layout();
        let disk_guid = Guid::derive("test", &[b"disk"]);
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("target.img");
        std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
        let args = sgdisk_args(&l, disk_guid);
        let out = Command::new("sgdisk").args(args.split(' ')).arg(&img).output().expect("running sgdisk (install the `gdisk` package)");
        assert!(out.status.success(), "sgdisk {args}: {}", String::from_utf8_lossy(&out.stderr));
        let p = Command::new("sgdisk").arg("-p").arg(&img).output().unwrap();
        let table = String::from_utf8_lossy(&p.stdout).to_lowercase();
        assert!(table.contains(&format!("disk identifier (guid): {disk_guid}")), "{table}");
        for (i, part) in l.partitions.iter().enumerate() {
            let row = format!("{} {} {}", i + 1, part.first_lba, part.last_lba);
            assert!(
                table.lines().any(|line| line.split_whitespace().collect::<Vec<_>>().join(" ").starts_with(&row)),
                "no `{row}` in\n{table}"
            );
            let info = Command::new("sgdisk").arg(format!("-i={}", i + 1)).arg(&img).output().unwrap();
            let info = String::from_utf8_lossy(&info.stdout).to_lowercase();
            assert!(info.contains(&part.guid.to_string()) && info.contains(&part.type_guid.to_string()), "{info}");
            assert!(info.contains(&format!("partition name: '{}'", part.name)), "{info}");
            let attrs = format!("attribute flags: {:016x}", part.attributes);
            assert!(info.contains(&attrs), "want `{attrs}` in {info}");
        }
    }

    #[test]
    fn plan_text_has_every_key_and_ends_with_the_terminator() {
        let l = layout();
        let install = Install { wipe: true, after: AfterInstall::Reboot, ..Default::default() };
        let plan = Plan {
            image_id: "abc123",
            deployment: "lab-7",
            install: &install,
            min_size: 1 << 30,
            disk_guid: Guid::derive("test", &[b"disk"]),
            target: &l,
            copies: vec![Copy {
                name: "esp".into(),
                source_partition: INSTALL_PARTITION,
                source_offset: ESP_IMAGE_OFFSET,
                target_offset: l.partitions[0].offset(),
                length: 3 << 20,
                sha256: "00ff".into(),
            }],
        };
        let text = plan.render().unwrap();
        for want in [
            "kiln-install=1\n",
            "image=abc123\n",
            "deployment=lab-7\n",
            "target=auto\n",
            "min_size=1073741824\n",
            "wipe=1\n",
            "after=reboot\n",
            "sgdisk=--clear --disk-guid=",
            "copy=esp kiln-install 1048576 1048576 3145728 00ff\n",
        ] {
            assert!(text.contains(want), "no `{want}` in\n{text}");
        }
        assert!(text.ends_with("end=1\n"));
        assert!(text.contains(" --change-name=1:esp@lab-7 "), "the ESP's name records the deployment:\n{text}");
        for deployment in ["", "a b", "a\nwipe=1"] {
            let bad = Plan { deployment, ..plan.clone() };
            assert!(bad.render().is_err(), "{deployment:?}");
        }
        let bad = Plan { copies: vec![Copy { source_offset: 5, ..plan.copies[0].clone() }], ..plan };
        assert!(bad.render().is_err());
    }
}
