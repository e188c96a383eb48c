//! The EFI system partition's contents: systemd-boot at the removable path with a Boot Loader
//! Specification (type #1) entry, and `extlinux/extlinux.conf` for U-Boot boards; both boot the
//! same kernel, initrd and command line from `/kiln/`.

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
    /// The board's device tree (`platform.device_tree`), for extlinux's `fdt` line.
    pub device_tree: Option<Content>,
}

pub const KERNEL_PATH: &str = "kiln/vmlinuz";
pub const INITRD_PATH: &str = "kiln/initrd";
/// Where the board's device tree goes on the ESP: `kiln/dtb/<platform.device_tree>`.
pub const DTB_DIR: &str = "kiln/dtb";

fn file(tree: &mut Tree, path: &str, content: Content) -> Result<()> {
    tree.insert(&TreePath::parse(path)?, Entry { meta: Meta::root(0o644), kind: Kind::File(content) })?;
    Ok(())
}

/// Builds the ESP tree for a platform.
pub fn tree(platform: &Platform, b: &BootFiles<'_>) -> Result<Tree> {
    let mut t = Tree::new();
    file(&mut t, KERNEL_PATH, b.kernel.clone())?;
    file(&mut t, INITRD_PATH, b.initrd.clone())?;
    if platform.boot.systemd_boot {
        let Some(efi) = &b.systemd_boot else {
            anyhow::bail!("platform `{}` boots systemd-boot but no systemd-boot binary was provided", platform.name)
        };
        file(&mut t, &format!("EFI/BOOT/{}", b.arch.efi_boot_file()), efi.clone())?;
        // timeout 0: boot the default entry at once (a key press still shows the menu).
        file(&mut t, "loader/loader.conf", Content::bytes("timeout 0\ndefault kiln.conf\neditor no\n"))?;
        let entry = format!(
            "title {}\nversion {}\nlinux /{KERNEL_PATH}\ninitrd /{INITRD_PATH}\noptions {}\n",
            b.title, b.kernel_version, b.cmdline
        );
        file(&mut t, "loader/entries/kiln.conf", Content::bytes(entry))?;
    }
    // A board's device tree: U-Boot passes it to the kernel instead of its own copy.
    let fdt = match (&platform.device_tree, &b.device_tree) {
        (Some(name), Some(dtb)) => {
            let path = format!("{DTB_DIR}/{name}");
            file(&mut t, &path, dtb.clone())?;
            format!("    fdt /{path}\n")
        }
        (Some(name), None) => anyhow::bail!("platform `{}` names the device tree {name} but none was provided", platform.name),
        (None, _) => String::new(),
    };
    if platform.boot.extlinux {
        // U-Boot's extlinux reader boots `default` at once when there is no `prompt`.
        let conf = format!(
            "# U-Boot distro boot (extlinux) configuration written by kiln\ndefault kiln\nmenu title {title}\ntimeout 10\n\nlabel kiln\n    menu label {title}\n    kernel /{KERNEL_PATH}\n    initrd /{INITRD_PATH}\n{fdt}    append {cmdline}\n",
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
            device_tree: None,
        };
        let t = tree(&p, &b).unwrap();
        assert!(t.contains("EFI/BOOT/BOOTRISCV64.EFI"));
        for f in ["loader/entries/kiln.conf", "extlinux/extlinux.conf"] {
            let Kind::File(c) = &t.get_str(f).unwrap().kind else { panic!() };
            let text = String::from_utf8(c.read().unwrap().into_owned()).unwrap();
            assert!(text.contains("/kiln/vmlinuz") && text.contains("root=PARTUUID=x console=ttyS0"), "{text}");
            assert!(!text.contains("fdt"), "{text}");
        }
    }

    #[test]
    fn a_board_gets_its_device_tree_and_the_fdt_line() {
        let p = Platform::load("hifive-unleashed").unwrap();
        let mut b = BootFiles {
            arch: Arch::Riscv64,
            title: "kiln demo (riscv64)",
            kernel_version: "6.12.0",
            kernel: Content::bytes("k"),
            initrd: Content::bytes("i"),
            systemd_boot: None,
            cmdline: "root=PARTUUID=x console=ttySIF0",
            device_tree: Some(Content::bytes("dtb")),
        };
        let t = tree(&p, &b).unwrap();
        assert!(t.contains("kiln/dtb/sifive/hifive-unleashed-a00.dtb") && !t.contains("EFI/BOOT/BOOTRISCV64.EFI"));
        let Kind::File(c) = &t.get_str("extlinux/extlinux.conf").unwrap().kind else { panic!() };
        let text = String::from_utf8(c.read().unwrap().into_owned()).unwrap();
        assert!(text.contains("    fdt /kiln/dtb/sifive/hifive-unleashed-a00.dtb\n"), "{text}");
        b.device_tree = None;
        assert!(tree(&p, &b).unwrap_err().to_string().contains("hifive-unleashed-a00.dtb"));
    }
}
