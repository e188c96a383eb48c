//! Platforms: per-board boot knowledge read from `firmware/<name>.yaml` (data, not code).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::arch::Arch;

/// A platform description (see `firmware/generic-uefi.yaml` for the commented format, and
/// `firmware/rpi4.yaml` for `boot.raspberrypi`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Platform {
    #[serde(skip)]
    pub name: String,
    /// One line: what hardware this platform is for (shown by `kiln platforms`).
    pub description: String,
    /// The architectures it boots (a board family is usually one).
    pub arch: Vec<Arch>,
    pub boot: BootMethods,
    /// Kernel console arguments; `{serial}` becomes the architecture's serial console.
    pub console_args: String,
    pub initramfs_modules: InitramfsModules,
    /// NIC drivers the netboot installer's initrd carries (taken when the kernel has them).
    #[serde(default)]
    pub netboot_modules: Vec<String>,
    /// The board's device tree, relative to the kernel package's dtb directory (e.g.
    /// `sifive/hifive-unleashed-a00.dtb`): copied to the ESP and named by extlinux's `fdt` line.
    #[serde(default)]
    pub device_tree: Option<String>,
    /// U-Boot SPL boards: the loaders written into their own partitions at fixed sectors.
    #[serde(default)]
    pub uboot_spl: Option<crate::board::uboot_spl::UbootSpl>,
    /// Module subtrees (relative to the modules directory's `kernel/`, e.g. `drivers/gpu`) the
    /// root leaves out unless the profile says `kernel.root_modules: all` (`crate::kmod::prune`).
    #[serde(default)]
    pub root_modules_omit: Vec<String>,
}

/// What `kiln platforms` shows of a platform (`--json`: a list of these).
#[derive(Debug, Clone, Serialize)]
pub struct PlatformSummary {
    pub name: String,
    pub arch: Vec<String>,
    pub boot: Vec<String>,
    pub description: String,
}

/// `kiln platforms`: one aligned line per platform (name, architectures, boot methods, description).
pub fn table(platforms: &[Platform]) -> String {
    let rows: Vec<[String; 4]> =
        platforms.iter().map(|p| [p.name.clone(), p.arch_list(), p.boot_methods().join(","), p.description.clone()]).collect();
    let header = ["PLATFORM", "ARCH", "BOOT", "DESCRIPTION"].map(String::from);
    let widths: Vec<usize> = (0..3).map(|i| rows.iter().chain([&header]).map(|r| r[i].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in [&header].into_iter().chain(&rows) {
        out.push_str(&format!("{:w0$}  {:w1$}  {:w2$}  {}\n", r[0], r[1], r[2], r[3], w0 = widths[0], w1 = widths[1], w2 = widths[2]));
    }
    out
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootMethods {
    #[serde(default)]
    pub systemd_boot: bool,
    #[serde(default)]
    pub extlinux: bool,
    /// The Raspberry Pi firmware's boot partition (`crate::raspberrypi`).
    #[serde(default)]
    pub raspberrypi: Option<crate::raspberrypi::RaspberryPi>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitramfsModules {
    pub required: Vec<String>,
    #[serde(default)]
    pub optional: Vec<String>,
}

impl Platform {
    /// Loads an embedded platform by name.
    pub fn load(name: &str) -> Result<Platform> {
        let (data, _) = crate::assets::file(&format!("firmware/{name}.yaml"))
            .with_context(|| format!("unknown platform `{name}` (known: {})", crate::assets::platforms().join(", ")))?;
        let text = std::str::from_utf8(data).context("platform file is not UTF-8")?;
        let mut p: Platform = serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("firmware/{name}.yaml: {e}"))?;
        p.name = name.to_string();
        if p.uboot_spl.is_some() && !p.boot.extlinux {
            bail!("firmware/{name}.yaml: `uboot_spl` boards boot through extlinux: set `boot.extlinux: true`");
        }
        Ok(p)
    }

    /// Every embedded platform, by name.
    pub fn all() -> Result<Vec<Platform>> {
        crate::assets::platforms().into_iter().map(Platform::load).collect()
    }

    /// Loads a platform for one architecture of a build, refusing one that does not boot it.
    pub fn load_for(name: &str, arch: Arch) -> Result<Platform> {
        let p = Platform::load(name)?;
        p.check_arch(arch)?;
        Ok(p)
    }

    fn check_arch(&self, arch: Arch) -> Result<()> {
        if !self.arch.contains(&arch) {
            bail!(
                "platform `{}` is for {}, not {arch}: set `platform.{arch}` to a platform of {arch} (`kiln platforms` lists them)",
                self.name,
                self.arch_list()
            );
        }
        Ok(())
    }

    /// Whether the platform boots only the card kiln writes: a Raspberry Pi (an installer writes a
    /// plain GPT its firmware may not read) and a U-Boot SPL board (its boot ROM reads the
    /// loaders from the card it boots).
    pub fn boots_its_card(&self) -> bool {
        self.boot.raspberrypi.is_some() || self.uboot_spl.is_some()
    }

    /// Refuses an install mode the platform cannot boot: an installer medium for a platform that
    /// boots only its own card ([`Platform::boots_its_card`]).
    pub fn check_install_mode(&self, mode: crate::profile::InstallMode) -> Result<()> {
        if self.boots_its_card() && mode == crate::profile::InstallMode::Installer {
            bail!(
                "platform `{}` boots the card kiln writes (`in-place`, the default); installer media are not supported for it",
                self.name
            );
        }
        Ok(())
    }

    /// The boot methods this platform writes, by their common names.
    pub fn boot_methods(&self) -> Vec<&'static str> {
        let BootMethods { systemd_boot, extlinux, ref raspberrypi } = self.boot;
        let spl = self.uboot_spl.is_some();
        [
            (spl, "u-boot-spl"),
            (systemd_boot, "uefi/systemd-boot"),
            (extlinux, "u-boot/extlinux"),
            (raspberrypi.is_some(), "raspberrypi-firmware"),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, m)| m)
        .collect()
    }

    /// The architectures, comma-separated.
    pub fn arch_list(&self) -> String {
        self.arch.iter().map(|a| a.name()).collect::<Vec<_>>().join(",")
    }

    /// The one-line summary `kiln platforms` prints and `--json` carries.
    pub fn summary(&self) -> PlatformSummary {
        PlatformSummary {
            name: self.name.clone(),
            arch: self.arch.iter().map(|a| a.name().to_string()).collect(),
            boot: self.boot_methods().into_iter().map(String::from).collect(),
            description: self.description.clone(),
        }
    }

    /// Refuses a profile whose `os.components` lack the component the platform's boot files
    /// come from (the Raspberry Pi firmware is in `non-free-firmware`).
    pub fn check_components(&self, components: &[String]) -> Result<()> {
        match &self.boot.raspberrypi {
            Some(rpi) => rpi.check_components(&self.name, components),
            None => Ok(()),
        }
    }

    /// Kernel console arguments for an architecture.
    pub fn console_args(&self, arch: Arch) -> String {
        self.console_args.replace("{serial}", arch.serial_console())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A KILN-UPDATE stick (docs/updates.md): `kiln-update` loads the USB host controller's and
    /// the mass storage drivers, and mounts vfat or ext4. No platform may leave them out of the root.
    #[test]
    fn no_platform_omits_the_drivers_of_a_usb_update_stick() {
        let stick = [
            "drivers/usb/core/usbcore.ko",
            "drivers/usb/host/xhci-pci.ko",
            "drivers/usb/host/ehci-pci.ko",
            "drivers/usb/dwc2/dwc2.ko",
            "drivers/usb/storage/usb-storage.ko",
            "drivers/usb/storage/uas.ko",
            "drivers/scsi/sd_mod.ko",
            "fs/fat/vfat.ko",
            "fs/nls/nls_cp437.ko",
            "fs/ext4/ext4.ko",
        ];
        for name in crate::assets::platforms() {
            let p = Platform::load(name).unwrap();
            for o in &p.root_modules_omit {
                let o = o.trim_matches('/');
                for m in stick {
                    assert!(!m.starts_with(&format!("{o}/")), "firmware/{name}.yaml root_modules_omit `{o}` drops {m}");
                }
            }
        }
    }

    #[test]
    fn every_embedded_platform_parses() {
        for name in crate::assets::platforms() {
            let p = Platform::load(name).unwrap();
            assert!(!p.initramfs_modules.required.is_empty(), "{name}");
        }
        let p = Platform::load("generic-uefi").unwrap();
        assert_eq!(p.console_args(Arch::Aarch64), "console=tty0 console=ttyAMA0");
        let err = Platform::load("toaster").unwrap_err().to_string();
        assert!(err.contains("toaster") && err.contains("generic-uefi"), "{err}");
        assert_eq!(p.arch, [Arch::X86_64, Arch::Aarch64, Arch::Riscv64]);
        assert_eq!(p.boot_methods(), ["uefi/systemd-boot", "u-boot/extlinux"]);
    }

    #[test]
    fn a_platform_is_refused_for_an_arch_it_does_not_boot() {
        let mut p = Platform::load("generic-uefi").unwrap();
        Platform::load_for("generic-uefi", Arch::Riscv64).unwrap();
        p.arch = vec![Arch::Aarch64];
        p.name = "board".into();
        p.check_arch(Arch::Aarch64).unwrap();
        let err = p.check_arch(Arch::X86_64).unwrap_err().to_string();
        assert!(err.contains("`board` is for aarch64, not x86_64") && err.contains("platform.x86_64"), "{err}");
    }

    #[test]
    fn boards_that_boot_their_card_refuse_installer_mode() {
        use crate::profile::InstallMode;
        for board in ["hifive-unleashed", "visionfive2", "rpi4"] {
            let p = Platform::load(board).unwrap();
            let err = p.check_install_mode(InstallMode::Installer).unwrap_err().to_string();
            assert!(err.contains(board) && err.contains("in-place"), "{err}");
            p.check_install_mode(InstallMode::InPlace).unwrap();
        }
        Platform::load("generic-uefi").unwrap().check_install_mode(InstallMode::Installer).unwrap();
    }

    #[test]
    fn table_has_one_aligned_line_per_platform() {
        let mut p = Platform::load("generic-uefi").unwrap();
        p.arch = vec![Arch::Aarch64];
        p.name = "board".into();
        let table = table(std::slice::from_ref(&p));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2, "{table}");
        assert!(lines[1].starts_with("board ") && lines[1].contains("aarch64") && lines[1].ends_with(&p.description), "{table}");
        // Columns line up under the header.
        assert_eq!(lines[0].find("ARCH"), lines[1].find("aarch64"), "{table}");
    }
}
