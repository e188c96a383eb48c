//! Platforms: per-board boot knowledge read from `firmware/<name>.yaml` (data, not code).

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::arch::Arch;

/// A platform description (see `firmware/generic-uefi.yaml` for the commented format).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Platform {
    #[serde(skip)]
    pub name: String,
    pub description: String,
    pub boot: BootMethods,
    /// Kernel console arguments; `{serial}` becomes the architecture's serial console.
    pub console_args: String,
    pub initramfs_modules: InitramfsModules,
    /// NIC drivers the netboot installer's initrd carries (taken when the kernel has them).
    #[serde(default)]
    pub netboot_modules: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootMethods {
    pub systemd_boot: bool,
    pub extlinux: bool,
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
        Ok(p)
    }

    /// Kernel console arguments for an architecture.
    pub fn console_args(&self, arch: Arch) -> String {
        self.console_args.replace("{serial}", arch.serial_console())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
