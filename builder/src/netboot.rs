//! The network-boot output of a build (`kiln build --format netboot`): the layout of
//! `OUT/<arch>/netboot/`, its iPXE script template and its writer. `kiln serve` (module `serve`)
//! serves it.
//!
//! The directory holds the kernel, the installer initrd (the same initramfs as the disk image;
//! `kiln.install=URL` on the command line makes it fetch instead of reading a USB medium), the
//! install plan (the USB installer's plan with file names as copy sources), the two images the
//! plan copies (the target's ESP and root squashfs: the squashfs is compressed already, and
//! raw images let the installer hash exactly what it writes), the inventory (MAC to node
//! name, for `kiln serve`), `boot.ipxe` and iPXE's EFI binary for machines whose firmware needs
//! to load iPXE first.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use crate::manifest::Output;
use crate::output::{write_part, Part};

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
/// The files `kiln serve` hands to machines (the inventory is the server's own).
pub const SERVED: &[&str] = &[IPXE, KERNEL, INITRD, PLAN, ESP, ROOT, SCRIPT];

/// The iPXE variable holding this directory's URL (with the trailing `/`); `kiln serve` sets it.
pub const BASE_VAR: &str = "kiln-base";
/// The iPXE variable holding `kiln.node=NAME` for inventory machines; unset otherwise (an unset
/// iPXE variable expands to nothing).
pub const NODE_VAR: &str = "kiln-node-arg";
/// The iPXE variable holding this install's one-time credential (`kiln.cred=HEX`, and
/// `kiln.secrets=SHA256` when the node has secrets to fetch); `kiln serve` sets it.
pub const CRED_VAR: &str = "kiln-cred-arg";

/// The `boot.ipxe` template: boots the installer kernel with the installed system's command
/// line plus `kiln.install=<this directory's URL>`, `kiln.mac=` (the MAC iPXE booted from,
/// which the installer reports back to `kiln serve`) and `kiln.plan=<sha256 of the plan>`: the
/// installer refuses any other plan, so whoever answers its later downloads cannot make it
/// install something else than this script named. `initrd=initrd` stays on the command line:
/// older iPXE builds (Debian bookworm's ROMs) hand the initrd to the kernel only that way.
pub fn script_template(profile: &str, arch: &str, cmdline: &str, plan_sha256: &str) -> String {
    let mut s = String::from("#!ipxe\n");
    writeln!(s, "# kiln netboot installer for profile {profile} ({arch}), written by `kiln build --format netboot`.").unwrap();
    writeln!(s, "# `kiln serve` answers /boot.ipxe with this script after setting ${{{BASE_VAR}}} (this directory's").unwrap();
    writeln!(s, "# URL) and, for machines in the inventory, ${{{NODE_VAR}}} (`kiln.node=NAME`).").unwrap();
    writeln!(s, "echo kiln: installing {profile} ({arch}) from ${{{BASE_VAR}}}").unwrap();
    writeln!(
        s,
        "kernel ${{{BASE_VAR}}}{KERNEL} initrd={INITRD} {cmdline} {}=${{{BASE_VAR}}} kiln.mac=${{net0/mac}} kiln.plan={plan_sha256} ${{{NODE_VAR}}} ${{{CRED_VAR}}}",
        crate::installer::CMDLINE_FLAG
    )
    .unwrap();
    writeln!(s, "initrd ${{{BASE_VAR}}}{INITRD}").unwrap();
    s.push_str("boot\n");
    s
}

/// What the directory holds, built by the pipeline.
pub struct Contents<'a> {
    pub ipxe: &'a [u8],
    pub kernel: &'a [u8],
    pub initrd: &'a [u8],
    pub plan: &'a str,
    pub esp: Part<'a>,
    /// The root squashfs, staged beside the outputs: copied, not read into memory.
    pub root: Part<'a>,
    pub inventory: &'a [u8],
    pub script: &'a str,
}

/// Writes the directory `dir`, every file with `mode`, and returns the manifest's records of its
/// files (named `netboot/<file>`), in [`FILES`] order.
pub fn write(dir: &Path, c: &Contents, mode: u32) -> Result<Vec<Output>> {
    let files: [(&str, Part); 8] = [
        (IPXE, Part::Bytes(c.ipxe)),
        (KERNEL, Part::Bytes(c.kernel)),
        (INITRD, Part::Bytes(c.initrd)),
        (PLAN, Part::Bytes(c.plan.as_bytes())),
        (ESP, c.esp),
        (ROOT, c.root),
        (INVENTORY, Part::Bytes(c.inventory)),
        (SCRIPT, Part::Bytes(c.script.as_bytes())),
    ];
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut outputs = Vec::new();
    for (name, part) in files {
        write_part(&dir.join(name), &part, mode)?;
        outputs.push(Output { file: format!("{DIR}/{name}"), sha256: part.sha256(), size: part.len() });
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_names_the_files_and_the_installer_flag() {
        let t = script_template("rack", "x86_64", "console=ttyS0 root=PARTUUID=abc", "5a5a");
        assert!(t.starts_with("#!ipxe\n"));
        assert!(t.contains("kernel ${kiln-base}vmlinuz initrd=initrd console=ttyS0 root=PARTUUID=abc kiln.install=${kiln-base} kiln.mac=${net0/mac} kiln.plan=5a5a ${kiln-node-arg} ${kiln-cred-arg}\n"), "{t}");
        assert!(t.contains("initrd ${kiln-base}initrd\n") && t.ends_with("boot\n"), "{t}");
    }

    #[test]
    fn the_directory_holds_every_file_in_order_with_its_digest() -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir()?;
        let staged = d.path().join("root.squashfs");
        std::fs::write(&staged, b"root")?;
        let root_sha = crate::digest::sha256_hex(b"root");
        let c = Contents {
            ipxe: b"i",
            kernel: b"k",
            initrd: b"r",
            plan: "p",
            esp: Part::Bytes(b"e"),
            root: Part::File { path: &staged, len: 4, sha256: &root_sha },
            inventory: b"",
            script: "s",
        };
        let dir = d.path().join(DIR);
        let outputs = write(&dir, &c, 0o600)?;
        assert_eq!(
            outputs.iter().map(|o| o.file.clone()).collect::<Vec<_>>(),
            FILES.iter().map(|f| format!("{DIR}/{f}")).collect::<Vec<_>>()
        );
        for o in &outputs {
            let path = d.path().join(&o.file);
            assert_eq!((crate::digest::sha256_file(&path)?, std::fs::metadata(&path)?.len()), (o.sha256.clone(), o.size), "{}", o.file);
            assert_eq!(std::fs::metadata(&path)?.permissions().mode() & 0o777, 0o600);
        }
        Ok(())
    }
}
