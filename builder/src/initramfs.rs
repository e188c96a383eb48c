//! The initramfs kiln writes itself: static busybox, the storage and filesystem modules needed to
//! find the root (a dependency closure computed from `.modinfo`), the list to load them in order,
//! and kiln's `/init` (from `overlays/initramfs/`). Packed as cpio newc, zstd-compressed.

use anyhow::{bail, Context, Result};

use crate::kmod::ModuleSet;
use crate::platform::Platform;
use crate::tree::{Content, Entry, Kind, Meta, Tree, TreePath};

/// Present in the initramfs when the profile has `debug.rescue_shell: true`: `/init`'s `fail`
/// (`overlays/initramfs/lib/kiln/fail.sh`) then leaves a shell instead of rebooting.
pub const RESCUE_SHELL: &str = "lib/kiln/rescue-shell";

/// What went into an initramfs, for the build log and manifest.
pub struct Initramfs {
    pub tree: Tree,
    /// Modules in load order (names).
    pub modules: Vec<String>,
    /// Optional platform modules this kernel does not have (neither module nor built in).
    pub absent: Vec<String>,
}

/// Assembles the initramfs tree from the (already unpacked) appliance root. `extra_modules` are
/// required (the profile's `kernel.modules`), `extra_optional` are taken when the kernel has them
/// (the netboot installer's NIC drivers).
pub fn assemble(
    root: &Tree,
    modules: &ModuleSet,
    platform: &Platform,
    extra_modules: &[String],
    extra_optional: &[String],
) -> Result<Initramfs> {
    let mut tree = Tree::new();
    for dir in ["bin", "dev", "proc", "sys", "run", "etc/kiln", "lib/modules", "newroot", "lower", "rw"] {
        tree.add_dir(dir, 0o755)?;
    }
    crate::setup::add_console_nodes(&mut tree)?;

    let busybox = match root.get_str(crate::busybox::BUSYBOX).map(|e| &e.kind) {
        Some(Kind::File(c)) => c.clone(),
        _ => bail!("/{} is missing from the root: the initramfs needs `busybox-static`", crate::busybox::BUSYBOX),
    };
    tree.insert(&TreePath::parse("bin/busybox")?, Entry { meta: Meta::root(0o755), kind: Kind::File(busybox.clone()) })?;
    for applet in crate::busybox::applets(&busybox.read()?)? {
        if applet != "busybox" {
            tree.add_symlink(&format!("bin/{applet}"), "busybox")?;
        }
    }

    let init = crate::assets::overlay("initramfs")?;
    tree.merge(&init)?;
    copy_console_policy(root, &mut tree)?;

    // Required modules must exist (or be built in); optional ones are taken when present.
    let required: Vec<&str> = platform.initramfs_modules.required.iter().chain(extra_modules.iter()).map(String::as_str).collect();
    let optional: Vec<&str> = platform.initramfs_modules.optional.iter().chain(extra_optional).map(String::as_str).collect();
    let (req, _) = modules
        .closure(&required, false)
        .with_context(|| format!("initramfs modules of platform `{}` and `kernel.modules`", platform.name))?;
    let (opt, absent) = modules.closure(&optional, true)?;

    let mut order: Vec<String> = Vec::new();
    let mut names = Vec::new();
    for m in req.into_iter().chain(opt) {
        if order.contains(&m.rel) {
            continue;
        }
        let content = match root.get(&m.path).map(|e| &e.kind) {
            Some(Kind::File(c)) => c.clone(),
            _ => bail!("module {} listed but missing at {}", m.name, m.path),
        };
        tree.insert(&TreePath::parse(&format!("lib/modules/{}", m.rel))?, Entry { meta: Meta::root(0o644), kind: Kind::File(content) })?;
        order.push(m.rel.clone());
        names.push(m.name.clone());
    }
    let mut list = order.join("\n");
    list.push('\n');
    tree.insert(
        &TreePath::parse("etc/kiln/modules")?,
        Entry { meta: Meta::root(0o644), kind: Kind::File(Content::bytes(list.into_bytes())) },
    )?;
    Ok(Initramfs { tree, modules: names, absent })
}

/// The console policy follows the root the initramfs boots (`debug.rescue_shell`, written by
/// `provision`): one setting, so the initramfs and the appliance cannot disagree.
fn copy_console_policy(root: &Tree, initramfs: &mut Tree) -> Result<()> {
    if let Some(Entry { kind: Kind::File(c), .. }) = root.get_str(crate::provision::RESCUE_SHELL) {
        initramfs.insert(&TreePath::parse(RESCUE_SHELL)?, Entry { meta: Meta::root(0o644), kind: Kind::File(c.clone()) })?;
    }
    Ok(())
}

/// cpio newc + zstd: what the kernel unpacks (Debian kernels have CONFIG_RD_ZSTD).
pub fn pack(tree: &Tree, mtime: u32) -> Result<Vec<u8>> {
    use zstd::zstd_safe::CParameter;
    // Level 19: the archive is small and compressed once per build; the kernel reads it at boot.
    // Its own tables (a 64 MiB chain table) were the largest part of a build's peak memory;
    // smaller chain and hash tables cost 0.6% in size on kiln's initramfs and save 57 MB.
    let mut zst = zstd::stream::Encoder::new(Vec::new(), 19).context("starting the initramfs compressor")?;
    zst.set_parameter(CParameter::ChainLog(22)).context("setting the zstd chain log")?;
    zst.set_parameter(CParameter::HashLog(21)).context("setting the zstd hash log")?;
    // The cpio archive streams into the compressor rather than being held whole.
    crate::cpio::write_newc(tree, &mut zst, mtime).context("writing the initramfs cpio archive")?;
    zst.finish().context("compressing the initramfs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rescue_shell_marker_follows_the_root() {
        let mut root = Tree::new();
        let mut initramfs = Tree::new();
        copy_console_policy(&root, &mut initramfs).unwrap();
        assert!(!initramfs.contains(RESCUE_SHELL), "no console shell unless the root has one");
        root.add_file(crate::provision::RESCUE_SHELL, 0o644, "# on\n").unwrap();
        copy_console_policy(&root, &mut initramfs).unwrap();
        assert!(initramfs.contains(RESCUE_SHELL));
    }
}
