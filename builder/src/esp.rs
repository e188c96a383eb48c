//! The EFI system partition's contents: systemd-boot at the removable path with a Boot Loader
//! Specification (type #1) entry, and `extlinux/extlinux.conf` for U-Boot boards; both boot the
//! same kernel, initrd and command line from `/kiln/`. On Raspberry Pi platforms the partition
//! is the Pi boot partition instead (`crate::raspberrypi`: firmware, device trees, `config.txt`).
//!
//! The systemd-boot entry is slot A's, `loader/entries/kiln-a.conf`: an A/B update on the device
//! (`overlays/appliance/usr/sbin/kiln-update`, docs/updates.md) adds `kiln-b+1.conf` beside it
//! with a higher generation in `version`, and `default kiln-*` lets systemd-boot's ordering pick
//! the newest entry that still has tries left.
//!
//! Boards whose loader does not read those entries (U-Boot's extlinux, the Raspberry Pi
//! firmware's `config.txt`) get slot A's entry too when the profile has `update:`: the entries
//! are kiln-update's record of the slots on every platform, and `loader/kiln-loader` names the
//! loader whose configuration kiln-update writes from them after every change (docs/updates.md,
//! "Boards without systemd-boot").

use anyhow::Result;

use crate::arch::Arch;
use crate::platform::Platform;
use crate::tree::{Content, Entry, Kind, Meta, Tree, TreePath};

/// Everything needed to lay out the ESP.
pub struct BootFiles<'a> {
    pub arch: Arch,
    pub title: &'a str,
    pub kernel_version: &'a str,
    /// The profile's `update.version`, when it has an `update:` section; the entry's `version`
    /// (after the generation) is this, else the kernel version.
    pub update_version: Option<&'a str>,
    pub kernel: Content,
    pub initrd: Content,
    /// systemd-boot's EFI binary for the arch.
    pub systemd_boot: Option<Content>,
    pub cmdline: &'a str,
    /// The board's device tree (`platform.device_tree`), for extlinux's `fdt` line.
    pub device_tree: Option<Content>,
    /// Raspberry Pi platforms: the firmware files and device trees, by their names on the
    /// partition (empty otherwise).
    pub board_files: &'a [(String, Content)],
}

pub const KERNEL_PATH: &str = "kiln/vmlinuz";
pub const INITRD_PATH: &str = "kiln/initrd";
/// Where the board's device tree goes on the ESP: `kiln/dtb/<platform.device_tree>`.
pub const DTB_DIR: &str = "kiln/dtb";
/// Slot A's systemd-boot entry. systemd-boot strips boot counters (`+1`, `+0-1`) from the
/// name, so the entry's id stays `kiln-a.conf` during a trial too.
pub const ENTRY_A: &str = "loader/entries/kiln-a.conf";
/// `loader.conf`: `default` is a glob that matches both slots' entries, so systemd-boot takes
/// the first of them in its sort order: entries with 0 tries left last, then by `sort-key`
/// (`kiln` for both), then by `version`, newest first. Each entry's `version` starts with a
/// generation (1 for what a build writes; kiln-update writes the running one's plus 1), so the
/// newest update boots first even when it is a signed downgrade, and a failed trial (0 tries
/// left) never wins over a good slot. `timeout 0` boots it at once (a key press still shows
/// the menu); `editor no`: no editing the command line at the console.
pub const LOADER_CONF: &str = "timeout 0\ndefault kiln-*\neditor no\n";
/// On a board that takes updates but does not boot systemd-boot: the loader kiln-update writes
/// the configuration of (`extlinux` or `raspberrypi`).
pub const LOADER_KIND: &str = "loader/kiln-loader";

/// The entry's `version`: generation 1 (see [`LOADER_CONF`]), then the update version or the
/// kernel version.
fn entry_version(b: &BootFiles<'_>) -> String {
    format!("1-{}", b.update_version.unwrap_or(b.kernel_version))
}

fn file(tree: &mut Tree, path: &str, content: Content) -> Result<()> {
    tree.insert(&TreePath::parse(path)?, Entry { meta: Meta::root(0o644), kind: Kind::File(content) })?;
    Ok(())
}

/// The loader of a platform without systemd-boot whose configuration kiln-update writes from
/// the entries, if it has one.
fn rendered_loader(platform: &Platform) -> Option<&'static str> {
    if platform.boot.raspberrypi.is_some() {
        Some("raspberrypi")
    } else if platform.boot.extlinux {
        Some("extlinux")
    } else {
        None
    }
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
    // A board's device tree: U-Boot passes it to the kernel instead of its own copy.
    let dtb_path = match (&platform.device_tree, &b.device_tree) {
        (Some(name), Some(dtb)) => {
            let path = format!("{DTB_DIR}/{name}");
            file(&mut t, &path, dtb.clone())?;
            Some(path)
        }
        (Some(name), None) => anyhow::bail!("platform `{}` names the device tree {name} but none was provided", platform.name),
        (None, _) => None,
    };
    let fdt = dtb_path.as_ref().map(|p| format!("    fdt /{p}\n")).unwrap_or_default();
    // `# kiln-version`: the version kiln-update reports for this slot (systemd-boot ignores
    // comment lines). `devicetree`: the board's, which extlinux's `fdt` line names.
    let entry = format!(
        "title {}\nsort-key kiln\nversion {}\n# kiln-version {}\nlinux /{kernel_path}\ninitrd /{initrd_path}\n{}options {}\n",
        b.title,
        entry_version(b),
        b.update_version.unwrap_or(b.kernel_version),
        dtb_path.as_ref().map(|p| format!("devicetree /{p}\n")).unwrap_or_default(),
        b.cmdline
    );
    if platform.boot.systemd_boot {
        let Some(efi) = &b.systemd_boot else {
            anyhow::bail!("platform `{}` boots systemd-boot but no systemd-boot binary was provided", platform.name)
        };
        file(&mut t, &format!("EFI/BOOT/{}", b.arch.efi_boot_file()), efi.clone())?;
        file(&mut t, "loader/loader.conf", Content::bytes(LOADER_CONF))?;
        file(&mut t, ENTRY_A, Content::bytes(entry))?;
    } else if let (Some(_), Some(kind)) = (b.update_version, rendered_loader(platform)) {
        file(&mut t, ENTRY_A, Content::bytes(entry))?;
        file(&mut t, LOADER_KIND, Content::bytes(format!("{kind}\n")))?;
    }
    // U-Boot tries extlinux.conf before the EFI removable path, and extlinux has no boot
    // counting: an image that takes A/B updates (a profile with `update:`) on a platform that
    // also boots systemd-boot leaves extlinux out, so U-Boot goes on to systemd-boot (riscv64).
    let extlinux = platform.boot.extlinux && !(b.update_version.is_some() && platform.boot.systemd_boot);
    if extlinux {
        // U-Boot's extlinux reader boots `default` at once when there is no `prompt`.
        let conf = format!(
            "# U-Boot distro boot (extlinux) configuration written by kiln\ndefault kiln\nmenu title {title}\ntimeout 10\n\nlabel kiln\n    menu label {title}\n    kernel /{kernel_path}\n    initrd /{initrd_path}\n{fdt}    append {cmdline}\n",
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
            update_version: None,
            kernel: Content::bytes("k"),
            initrd: Content::bytes("i"),
            systemd_boot: Some(Content::bytes("efi")),
            cmdline: "root=PARTUUID=x console=ttyS0",
            device_tree: None,
            board_files: &[],
        };
        let t = tree(&p, &b).unwrap();
        assert!(t.contains("EFI/BOOT/BOOTRISCV64.EFI"));
        for f in [ENTRY_A, "extlinux/extlinux.conf"] {
            let Kind::File(c) = &t.get_str(f).unwrap().kind else { panic!() };
            let text = String::from_utf8(c.read().unwrap().into_owned()).unwrap();
            assert!(text.contains("/kiln/vmlinuz") && text.contains("root=PARTUUID=x console=ttyS0"), "{text}");
            assert!(!text.contains("fdt"), "{text}");
        }
    }

    /// Slot A's entry as kiln-update and systemd-boot's ordering expect it: `kiln-a.conf`, sort
    /// key `kiln`, generation 1 before the version, and a `default` glob matching both slots.
    #[test]
    fn slot_a_entry_sorts_by_generation_and_loader_defaults_to_any_slot() {
        let p = Platform::load("generic-uefi").unwrap();
        let text = |t: &Tree, f: &str| {
            let Kind::File(c) = &t.get_str(f).unwrap().kind else { panic!() };
            String::from_utf8(c.read().unwrap().into_owned()).unwrap()
        };
        for (update, version) in [(None, "6.12.0"), (Some("1.2.0"), "1.2.0")] {
            let b = BootFiles {
                arch: Arch::X86_64,
                title: "kiln demo (x86_64)",
                kernel_version: "6.12.0",
                update_version: update,
                kernel: Content::bytes("k"),
                initrd: Content::bytes("i"),
                systemd_boot: Some(Content::bytes("efi")),
                cmdline: "root=PARTUUID=x",
                device_tree: None,
                board_files: &[],
            };
            let t = tree(&p, &b).unwrap();
            assert!(!t.contains("loader/entries/kiln.conf"));
            let entry = text(&t, ENTRY_A);
            assert!(entry.contains("\nsort-key kiln\n"), "{entry}");
            assert!(entry.contains(&format!("\nversion 1-{version}\n# kiln-version {version}\n")), "{entry}");
            let loader = text(&t, "loader/loader.conf");
            assert!(loader.lines().any(|l| l == "default kiln-*"), "{loader}");
            // Updatable images reach systemd-boot (boot counting) also where U-Boot would
            // prefer extlinux.
            assert_eq!(t.contains("extlinux/extlinux.conf"), update.is_none());
        }
    }

    #[test]
    fn a_board_gets_its_device_tree_and_the_fdt_line() {
        let p = Platform::load("hifive-unleashed").unwrap();
        let mut b = BootFiles {
            arch: Arch::Riscv64,
            title: "kiln demo (riscv64)",
            kernel_version: "6.12.0",
            update_version: None,
            kernel: Content::bytes("k"),
            initrd: Content::bytes("i"),
            systemd_boot: None,
            cmdline: "root=PARTUUID=x console=ttySIF0",
            device_tree: Some(Content::bytes("dtb")),
            board_files: &[],
        };
        let t = tree(&p, &b).unwrap();
        assert!(t.contains("kiln/dtb/sifive/hifive-unleashed-a00.dtb") && !t.contains("EFI/BOOT/BOOTRISCV64.EFI"));
        let Kind::File(c) = &t.get_str("extlinux/extlinux.conf").unwrap().kind else { panic!() };
        let text = String::from_utf8(c.read().unwrap().into_owned()).unwrap();
        assert!(text.contains("    fdt /kiln/dtb/sifive/hifive-unleashed-a00.dtb\n"), "{text}");
        assert!(!t.contains(ENTRY_A) && !t.contains(LOADER_KIND), "no slot record without update:");
        // With update: slot A's entry (naming the device tree) and the loader kiln-update
        // writes extlinux.conf for; extlinux stays (U-Boot has no other way here).
        b.update_version = Some("1.2.0");
        let t = tree(&p, &b).unwrap();
        let read = |f: &str| {
            let Kind::File(c) = &t.get_str(f).unwrap().kind else { panic!() };
            String::from_utf8(c.read().unwrap().into_owned()).unwrap()
        };
        assert_eq!(read(LOADER_KIND), "extlinux\n");
        let entry = read(ENTRY_A);
        assert!(
            entry.contains("\nversion 1-1.2.0\n") && entry.contains("\ndevicetree /kiln/dtb/sifive/hifive-unleashed-a00.dtb\n"),
            "{entry}"
        );
        assert!(t.contains("extlinux/extlinux.conf") && !t.contains("loader/loader.conf"));
        b.update_version = None;
        b.device_tree = None;
        assert!(tree(&p, &b).unwrap_err().to_string().contains("hifive-unleashed-a00.dtb"));
    }

    /// The Pi boot partition, written as FAT32 and read back with mtools as the firmware reads
    /// it: every firmware file and device tree byte for byte, config.txt naming files that are
    /// there, cmdline.txt the command line; no systemd-boot or extlinux files.
    #[test]
    fn raspberrypi_boot_partition_reads_back_as_the_firmware_needs() {
        let p = Platform::load("rpi3").unwrap();
        let rpi = p.boot.raspberrypi.clone().unwrap();
        let mut pkg = Tree::new();
        for f in ["bootcode.bin", "start.elf", "fixup.dat"] {
            pkg.add_file(&format!("usr/lib/raspi-firmware/{f}"), 0o644, format!("firmware {f}").into_bytes()).unwrap();
        }
        let mut root = Tree::new();
        for dt in &rpi.device_trees {
            root.add_file(
                &format!("usr/lib/linux-image-6.12.0-arm64/broadcom/{}", dt.file),
                0o644,
                format!("dtb {}", dt.file).into_bytes(),
            )
            .unwrap();
        }
        let mut board = rpi.firmware_files(&pkg).unwrap();
        board.extend(rpi.device_tree_files(&root, "6.12.0-arm64").unwrap());
        let cmdline = "root=PARTUUID=x kiln.rootname=kiln-root-a console=tty0 console=ttyS1,115200";
        let b = BootFiles {
            arch: Arch::Aarch64,
            title: "kiln pi (aarch64)",
            kernel_version: "6.12.0-arm64",
            update_version: None,
            kernel: Content::bytes("kernel image"),
            initrd: Content::bytes("initramfs"),
            systemd_boot: None,
            cmdline,
            board_files: &board,
            device_tree: None,
        };
        let t = tree(&p, &b).unwrap();
        assert!(!t.contains("EFI") && !t.contains("loader") && !t.contains("extlinux") && !t.contains("kiln"), "no other boot method");

        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("boot.fat");
        let size = crate::fat::fat32_size_for(&t, 1 << 20).unwrap();
        let mut out = std::fs::File::create(&img).unwrap();
        out.set_len(size).unwrap();
        crate::fat::write_fat32(&mut out, size, &t, &crate::fat::FatOptions { volume_id: 1, label: "KILN-ESP".into(), mtime: 0 }).unwrap();
        drop(out);
        let read = |name: &str| {
            let o = std::process::Command::new("mcopy")
                .args(["-n", "-i", img.to_str().unwrap(), &format!("::/{name}"), "-"])
                .output()
                .expect("running mcopy (install the Debian package `mtools`)");
            assert!(o.status.success(), "/{name}: {}", String::from_utf8_lossy(&o.stderr));
            o.stdout
        };
        for (name, content) in &board {
            assert_eq!(read(name), content.read().unwrap().into_owned(), "{name}");
        }
        let config = String::from_utf8(read(crate::raspberrypi::CONFIG_TXT)).unwrap();
        for filters in [&["pi3"][..], &["pi3", "pi3+"]] {
            let keys = crate::raspberrypi::read_config_txt(&config, filters);
            assert_eq!(read(&keys["kernel"]), b"kernel image");
            assert_eq!(read(keys["initramfs"].split_whitespace().next().unwrap()), b"initramfs");
            assert!(read(&keys["device_tree"]).starts_with(b"dtb bcm2837-rpi-3-b"), "{filters:?}: {keys:?}");
        }
        assert_eq!(read(crate::raspberrypi::CMDLINE_TXT), format!("{cmdline}\n").into_bytes());

        // With update: slot A's entry names the files config.txt names, for kiln-update.
        let t = tree(&p, &BootFiles { update_version: Some("1.0.0"), ..b }).unwrap();
        let Kind::File(c) = &t.get_str(LOADER_KIND).unwrap().kind else { panic!() };
        assert_eq!(&c.read().unwrap()[..], b"raspberrypi\n");
        let Kind::File(c) = &t.get_str(ENTRY_A).unwrap().kind else { panic!() };
        let entry = String::from_utf8(c.read().unwrap().into_owned()).unwrap();
        assert!(entry.contains(&format!("\nlinux /vmlinuz\ninitrd /initrd.img\noptions {cmdline}\n")), "{entry}");
    }
}
