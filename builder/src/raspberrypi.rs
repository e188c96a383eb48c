//! Raspberry Pi boot partitions: the GPU firmware from Debian's `raspi-firmware`, the board
//! device trees from the kernel package, `config.txt` and `cmdline.txt`, as the Pi's boot ROM /
//! EEPROM bootloader and `start*.elf` read them (docs/boards.md). The platform file says which
//! files (`boot.raspberrypi` in `firmware/rpi*.yaml`); this module lays them out.

use anyhow::{bail, Result};
use serde::Deserialize;

use crate::tree::{Content, Kind, Tree};

/// The kernel and initramfs on the boot partition, named in `config.txt`. At the partition's
/// top level, where Debian's own `raspi-firmware` hook puts them (every firmware since the
/// Pi 1 finds a kernel there).
pub const KERNEL: &str = "vmlinuz";
pub const INITRD: &str = "initrd.img";
pub const CONFIG_TXT: &str = "config.txt";
pub const CMDLINE_TXT: &str = "cmdline.txt";

/// `boot.raspberrypi` of a platform file: what goes on the Pi boot partition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaspberryPi {
    /// The GPU firmware; absent for boards whose firmware is in EEPROM (Pi 5).
    #[serde(default)]
    pub firmware: Option<Firmware>,
    /// Device trees, from the kernel package's `usr/lib/linux-image-<version>/<dtb_dir>/`.
    pub dtb_dir: String,
    /// One `device_tree=` per board, under its `config.txt` conditional filter (`[pi4]`,
    /// `[pi400]`, ...), in order: a later filter that also matches wins.
    pub device_trees: Vec<DeviceTree>,
    /// Lines added to `config.txt` under `[all]` (e.g. `enable_uart=1`).
    #[serde(default)]
    pub config: Vec<String>,
}

/// The GPU firmware files and the Debian package (and component) they come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Firmware {
    pub package: String,
    /// The Debian component holding the package: the profile must list it in `os.components`.
    pub component: String,
    /// Where the files are in the package.
    pub dir: String,
    /// The files copied to the boot partition's top level.
    pub files: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceTree {
    /// A `config.txt` conditional filter without brackets (`pi3`, `pi3+`, `pi4`, `pi400`, `cm4`).
    pub filter: String,
    pub file: String,
}

impl RaspberryPi {
    /// Refuses a profile that cannot read the firmware package: names the key and what to add.
    pub fn check_components(&self, platform: &str, components: &[String]) -> Result<()> {
        let Some(fw) = &self.firmware else { return Ok(()) };
        if !components.iter().any(|c| c == &fw.component) {
            bail!(
                "key `os.components`: platform `{platform}` needs `{}` from the Debian component `{}`, which the profile does not read \
                 (it reads [{}]): set `os: {{components: [main, {}]}}`",
                fw.package,
                fw.component,
                components.join(", "),
                fw.component
            );
        }
        Ok(())
    }

    /// `config.txt`: 64-bit mode, the kernel and initramfs by name, each board's device tree
    /// under its filter, then the platform's lines.
    pub fn config_txt(&self) -> String {
        let mut c = String::from("# Raspberry Pi firmware configuration written by kiln (docs/boards.md)\n[all]\n");
        // Start the ARM cores in AArch64 state: Debian's arm64 kernel is a 64-bit Image.
        c.push_str("arm_64bit=1\n");
        c.push_str(&format!("kernel={KERNEL}\n"));
        // `followkernel`: the firmware places the initramfs right after the kernel and tells
        // the kernel where (in the device tree's /chosen).
        c.push_str(&format!("initramfs {INITRD} followkernel\n"));
        for dt in &self.device_trees {
            c.push_str(&format!("[{}]\ndevice_tree={}\n", dt.filter, dt.file));
        }
        c.push_str("[all]\n");
        for line in &self.config {
            c.push_str(line);
            c.push('\n');
        }
        c
    }

    /// The firmware files, by their names on the boot partition, from the unpacked package.
    pub fn firmware_files(&self, package: &Tree) -> Result<Vec<(String, Content)>> {
        let Some(fw) = &self.firmware else { return Ok(Vec::new()) };
        fw.files
            .iter()
            .map(|f| {
                let path = format!("{}/{f}", fw.dir.trim_matches('/'));
                match package.get_str(&path).map(|e| &e.kind) {
                    Some(Kind::File(c)) => Ok((f.clone(), c.clone())),
                    _ => bail!("{} has no /{path} (the platform file's `boot.raspberrypi.firmware.files`)", fw.package),
                }
            })
            .collect()
    }

    /// The device trees, by file name, from the root the kernel package was unpacked into.
    pub fn device_tree_files(&self, root: &Tree, kernel_version: &str) -> Result<Vec<(String, Content)>> {
        let dir = format!("usr/lib/linux-image-{kernel_version}/{}", self.dtb_dir.trim_matches('/'));
        let mut out: Vec<(String, Content)> = Vec::new();
        for dt in &self.device_trees {
            if out.iter().any(|(n, _)| n == &dt.file) {
                continue;
            }
            let path = format!("{dir}/{}", dt.file);
            match root.get_str(&path).map(|e| &e.kind) {
                Some(Kind::File(c)) => out.push((dt.file.clone(), c.clone())),
                _ => bail!("the kernel {kernel_version} has no /{path}: a Raspberry Pi platform needs Debian's arm64 kernel package"),
            }
        }
        Ok(out)
    }
}

/// The boot partition's files besides the kernel and initrd: the firmware and device trees
/// (`board_files`), `config.txt`, `cmdline.txt`.
pub fn boot_files(rpi: &RaspberryPi, board_files: &[(String, Content)], cmdline: &str) -> Vec<(String, Content)> {
    let mut files: Vec<(String, Content)> = board_files.to_vec();
    files.push((CONFIG_TXT.into(), Content::bytes(rpi.config_txt())));
    // The firmware passes cmdline.txt's first line to the kernel.
    files.push((CMDLINE_TXT.into(), Content::bytes(format!("{cmdline}\n"))));
    files
}

/// What the firmware of one board reads from `config.txt`: the keys of the `[all]` sections
/// and of the sections whose filter is one of `filters`, a later value winning. Lines other
/// than `key=value` (such as `initramfs FILE followkernel`) are returned as key `initramfs`
/// with the rest as value. Used by the tests that boot a card the way the firmware would.
pub fn read_config_txt(text: &str, filters: &[&str]) -> std::collections::BTreeMap<String, String> {
    let mut keys = std::collections::BTreeMap::new();
    let mut active = true;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(filter) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            active = filter == "all" || filters.contains(&filter);
            continue;
        }
        if !active {
            continue;
        }
        let (k, v) = match line.split_once('=') {
            Some((k, v)) if !k.contains(' ') => (k.trim(), v.trim()),
            _ => line.split_once(' ').map(|(k, v)| (k, v.trim())).unwrap_or((line, "")),
        };
        keys.insert(k.to_string(), v.to_string());
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpi() -> RaspberryPi {
        let p = crate::platform::Platform::load("rpi4").unwrap();
        p.boot.raspberrypi.unwrap()
    }

    #[test]
    fn config_txt_names_the_kernel_initramfs_and_each_boards_device_tree() {
        let r = rpi();
        let text = r.config_txt();
        let pi4 = read_config_txt(&text, &["pi4"]);
        assert_eq!(pi4["arm_64bit"], "1");
        assert_eq!(pi4["kernel"], KERNEL);
        assert_eq!(pi4["initramfs"], format!("{INITRD} followkernel"));
        assert_eq!(pi4["enable_uart"], "1");
        assert_eq!(pi4["upstream_kernel"], "1");
        assert_eq!(pi4["device_tree"], "bcm2711-rpi-4-b.dtb");
        // A Pi 400 matches [pi4] and [pi400]: the later section wins.
        assert_eq!(read_config_txt(&text, &["pi4", "pi400"])["device_tree"], "bcm2711-rpi-400.dtb");
        assert_eq!(read_config_txt(&text, &["pi4", "cm4"])["device_tree"], "bcm2711-rpi-cm4-io.dtb");
        // Another board's section is not read.
        assert!(!read_config_txt(&text, &["pi3"]).contains_key("device_tree"));
    }

    #[test]
    fn a_profile_without_the_firmware_component_is_told_what_to_add() {
        let r = rpi();
        let err = r.check_components("rpi4", &["main".into()]).unwrap_err().to_string();
        assert!(err.contains("`os.components`") && err.contains("raspi-firmware") && err.contains("[main, non-free-firmware]"), "{err}");
        r.check_components("rpi4", &["main".into(), "non-free-firmware".into()]).unwrap();
    }

    #[test]
    fn missing_files_name_the_package_and_path() {
        let r = rpi();
        let mut pkg = Tree::new();
        pkg.add_file("usr/lib/raspi-firmware/start4.elf", 0o644, b"elf".to_vec()).unwrap();
        let err = r.firmware_files(&pkg).unwrap_err().to_string();
        assert!(err.contains("raspi-firmware has no /usr/lib/raspi-firmware/fixup4.dat"), "{err}");
        pkg.add_file("usr/lib/raspi-firmware/fixup4.dat", 0o644, b"dat".to_vec()).unwrap();
        let files = r.firmware_files(&pkg).unwrap();
        assert_eq!(files.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["start4.elf", "fixup4.dat"]);

        let root = Tree::new();
        let err = r.device_tree_files(&root, "6.12.0-arm64").unwrap_err().to_string();
        assert!(err.contains("/usr/lib/linux-image-6.12.0-arm64/broadcom/bcm2711-rpi-4-b.dtb"), "{err}");
    }
}
