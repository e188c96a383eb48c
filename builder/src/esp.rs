//! The EFI system partition's contents: systemd-boot at the removable path with a Boot Loader
//! Specification (type #1) entry, and `extlinux/extlinux.conf` for U-Boot boards; both boot the
//! same kernel, initrd and command line from `/kiln/`. On Raspberry Pi platforms the partition
//! is the Pi boot partition instead (`crate::raspberrypi`: firmware, device trees, `config.txt`).

use anyhow::Result;

use crate::arch::Arch;
use crate::platform::Platform;
use crate::tree::{Content, Entry, Kind, Meta, Tree, TreePath};

/// Everything needed to lay out the ESP.
pub struct BootFiles<'a> {
    pub arch: Arch,
    pub title: &'a str,
    pub kernel_version: &'a str,
    pub kernel: Content,
    pub initrd: Content,
    /// systemd-boot's EFI binary for the arch.
    pub systemd_boot: Option<Content>,
    pub cmdline: &'a str,
    /// Raspberry Pi platforms: the firmware files and device trees, by their names on the
    /// partition (empty otherwise).
    pub board_files: &'a [(String, Content)],
}

pub const KERNEL_PATH: &str = "kiln/vmlinuz";
pub const INITRD_PATH: &str = "kiln/initrd";

fn file(tree: &mut Tree, path: &str, content: Content) -> Result<()> {
    tree.insert(&TreePath::parse(path)?, Entry { meta: Meta::root(0o644), kind: Kind::File(content) })?;
    Ok(())
}

/// Builds the ESP tree for a platform.
pub fn tree(platform: &Platform, b: &BootFiles<'_>) -> Result<Tree> {
    let mut t = Tree::new();
    // The Pi firmware is given the kernel and initrd by name in config.txt; they sit at the top
    // level there, as Debian's own raspi-firmware hook puts them.
    let (kernel_path, initrd_path) = match &platform.boot.raspberrypi {
        Some(_) => (crate::raspberrypi::KERNEL, crate::raspberrypi::INITRD),
        None => (KERNEL_PATH, INITRD_PATH),
    };
    file(&mut t, kernel_path, b.kernel.clone())?;
    file(&mut t, initrd_path, b.initrd.clone())?;
    if let Some(rpi) = &platform.boot.raspberrypi {
        for (name, content) in crate::raspberrypi::boot_files(rpi, b.board_files, b.cmdline) {
            file(&mut t, &name, content)?;
        }
    }
    if platform.boot.systemd_boot {
        let Some(efi) = &b.systemd_boot else {
            anyhow::bail!("platform `{}` boots systemd-boot but no systemd-boot binary was provided", platform.name)
        };
        file(&mut t, &format!("EFI/BOOT/{}", b.arch.efi_boot_file()), efi.clone())?;
        // timeout 0: boot the default entry at once (a key press still shows the menu).
        file(&mut t, "loader/loader.conf", Content::bytes("timeout 0\ndefault kiln.conf\neditor no\n"))?;
        let entry = format!(
            "title {}\nversion {}\nlinux /{kernel_path}\ninitrd /{initrd_path}\noptions {}\n",
            b.title, b.kernel_version, b.cmdline
        );
        file(&mut t, "loader/entries/kiln.conf", Content::bytes(entry))?;
    }
    if platform.boot.extlinux {
        // U-Boot's extlinux reader boots `default` at once when there is no `prompt`.
        let conf = format!(
            "# U-Boot distro boot (extlinux) configuration written by kiln\ndefault kiln\nmenu title {title}\ntimeout 10\n\nlabel kiln\n    menu label {title}\n    kernel /{kernel_path}\n    initrd /{initrd_path}\n    append {cmdline}\n",
            title = b.title,
            cmdline = b.cmdline
        );
        file(&mut t, "extlinux/extlinux.conf", Content::bytes(conf))?;
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_boot_paths_point_at_the_same_kernel_and_cmdline() {
        let p = Platform::load("generic-uefi").unwrap();
        let b = BootFiles {
            arch: Arch::Riscv64,
            title: "kiln demo (riscv64)",
            kernel_version: "6.12.0",
            kernel: Content::bytes("k"),
            initrd: Content::bytes("i"),
            systemd_boot: Some(Content::bytes("efi")),
            cmdline: "root=PARTUUID=x console=ttyS0",
            board_files: &[],
        };
        let t = tree(&p, &b).unwrap();
        assert!(t.contains("EFI/BOOT/BOOTRISCV64.EFI"));
        for f in ["loader/entries/kiln.conf", "extlinux/extlinux.conf"] {
            let Kind::File(c) = &t.get_str(f).unwrap().kind else { panic!() };
            let text = String::from_utf8(c.read().unwrap().into_owned()).unwrap();
            assert!(text.contains("/kiln/vmlinuz") && text.contains("root=PARTUUID=x console=ttyS0"), "{text}");
        }
    }
}
