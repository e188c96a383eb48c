//! The network-boot output of a build (`kiln build --format netboot`): the layout of
//! `OUT/<arch>/netboot/` and its iPXE script template. `kiln serve` (module `serve`) serves it.
//!
//! The directory holds the kernel, the installer initrd (the same initramfs as the disk image;
//! `kiln.install=URL` on the command line makes it fetch instead of reading a USB medium), the
//! install plan (the USB installer's plan with file names as copy sources), the two images the
//! plan copies (the target's ESP and root squashfs: the squashfs is compressed already, and
//! raw images let the installer hash exactly what it writes), the inventory (MAC to node
//! name, for `kiln serve`), `boot.ipxe` and iPXE's EFI binary for machines whose firmware needs
//! to load iPXE first.

use std::fmt::Write as _;

/// The directory under `OUT/<arch>/`.
pub const DIR: &str = "netboot";
pub const KERNEL: &str = "vmlinuz";
pub const INITRD: &str = "initrd";
/// The install plan (`builder/src/installer.rs` format).
pub const PLAN: &str = "plan";
/// The installed system's ESP image.
pub const ESP: &str = "esp.img";
/// The installed system's root squashfs.
pub const ROOT: &str = "root.img";
/// `MAC NODE` lines (the appliance's `/etc/kiln/inventory`); empty without a cluster.
pub const INVENTORY: &str = "inventory";
/// The iPXE script template.
pub const SCRIPT: &str = "boot.ipxe";
/// iPXE's EFI binary for the architecture (Debian's `ipxe` package): the first stage for UEFI
/// PXE (TFTP) or UEFI HTTP boot clients that have no iPXE in their NIC ROM.
pub const IPXE: &str = "ipxe.efi";
/// Every file of the directory, in the order they are written.
pub const FILES: &[&str] = &[IPXE, KERNEL, INITRD, PLAN, ESP, ROOT, INVENTORY, SCRIPT];

/// The iPXE variable holding this directory's URL (with the trailing `/`); `kiln serve` sets it.
pub const BASE_VAR: &str = "kiln-base";
/// The iPXE variable holding `kiln.node=NAME` for inventory machines; unset otherwise (an unset
/// iPXE variable expands to nothing).
pub const NODE_VAR: &str = "kiln-node-arg";

/// The `boot.ipxe` template: boots the installer kernel with the installed system's command
/// line plus `kiln.install=<this directory's URL>` and `kiln.mac=` (the MAC iPXE booted from,
/// which the installer reports back to `kiln serve`). `initrd=initrd` stays on the command line:
/// older iPXE builds (Debian bookworm's ROMs) hand the initrd to the kernel only that way.
pub fn script_template(profile: &str, arch: &str, cmdline: &str) -> String {
    let mut s = String::from("#!ipxe\n");
    writeln!(s, "# kiln netboot installer for profile {profile} ({arch}), written by `kiln build --format netboot`.").unwrap();
    writeln!(s, "# `kiln serve` answers /boot.ipxe with this script after setting ${{{BASE_VAR}}} (this directory's").unwrap();
    writeln!(s, "# URL) and, for machines in the inventory, ${{{NODE_VAR}}} (`kiln.node=NAME`).").unwrap();
    writeln!(s, "echo kiln: installing {profile} ({arch}) from ${{{BASE_VAR}}}").unwrap();
    writeln!(s, "kernel ${{{BASE_VAR}}}{KERNEL} initrd={INITRD} {cmdline} {}=${{{BASE_VAR}}} kiln.mac=${{net0/mac}} ${{{NODE_VAR}}}", crate::installer::CMDLINE_FLAG).unwrap();
    writeln!(s, "initrd ${{{BASE_VAR}}}{INITRD}").unwrap();
    s.push_str("boot\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_names_the_files_and_the_installer_flag() {
        let t = script_template("rack", "x86_64", "console=ttyS0 root=PARTUUID=abc");
        assert!(t.starts_with("#!ipxe\n"));
        assert!(t.contains("kernel ${kiln-base}vmlinuz initrd=initrd console=ttyS0 root=PARTUUID=abc kiln.install=${kiln-base} kiln.mac=${net0/mac} ${kiln-node-arg}\n"), "{t}");
        assert!(t.contains("initrd ${kiln-base}initrd\n") && t.ends_with("boot\n"), "{t}");
    }
}
