//! A base OS from an OCI image (profile key `os.image`): the image's layers flattened into the
//! root in place of Debian's packages, and the kernel that boots the appliance taken from it.
//!
//! The contract (also in docs/containers.md, "Base OS from an OCI image"):
//! - the image must contain one kernel, `/boot/vmlinuz-<version>` (`vmlinux-` on riscv64) or
//!   `/usr/lib/modules/<version>/vmlinuz`, with its modules in `/usr/lib/modules/<version>`;
//! - the root stays merged-/usr: files an image keeps under `/bin`, `/sbin`, `/lib` land in
//!   `/usr` (kiln's scripts and links live there);
//! - kiln adds from Debian: busybox (`/usr/bin/busybox`; its applet links only where the image
//!   has no program of that name), its boot scripts and `/etc/inittab`, and the account files;
//!   PID 1 is busybox init (`/usr/sbin/init`), replacing an init the image brings, because the
//!   appliance's boot sequence is an inittab.

use anyhow::{bail, Result};
use tracing::{info, warn};

use super::Image;
use crate::arch::Arch;
use crate::cache::Cache;
use crate::tree::{Content, Kind, Tree, TreePath};

/// Flattens `image` onto `root` and makes busybox init PID 1. Returns the flattening's stats.
pub fn lay_image(image: &Image, cache: &Cache, root: &mut Tree, arch: Arch) -> Result<super::flatten::Stats> {
    let started = std::time::Instant::now();
    let stats = super::flatten::flatten(image, cache, root, arch)?;
    let secs = started.elapsed().as_secs_f64();
    info!(
        "{arch}: image {}: {} layers flattened, {} entries, {} MiB of files in {secs:.1} s ({:.0} MB/s); {} whiteouts, {} setuid/setgid files kept",
        image.reference,
        image.layers().len(),
        stats.entries,
        stats.file_bytes >> 20,
        stats.file_bytes as f64 / 1e6 / secs.max(1e-6),
        stats.whiteouts,
        stats.setid
    );
    claim_init(root, &image.reference)?;
    Ok(stats)
}

/// Points `/usr/sbin/init` at busybox (whose applets kiln installs later): the appliance's boot
/// sequence is busybox init's inittab, whatever init the image brought.
fn claim_init(root: &mut Tree, reference: &str) -> Result<()> {
    let init = TreePath::parse("usr/sbin/init")?;
    match root.get(&init).map(|e| &e.kind) {
        None => {}
        Some(Kind::Symlink(t)) if t.ends_with("busybox") => return Ok(()),
        Some(k) => {
            let what = match k {
                Kind::Symlink(t) => format!("a link to {t}"),
                _ => "a program".to_string(),
            };
            warn!("image `{reference}`: its /usr/sbin/init ({what}) is replaced by busybox init, which runs kiln's boot sequence");
            root.remove(&init);
        }
    }
    root.add_symlink("usr/sbin/init", "../bin/busybox")?;
    Ok(())
}

/// The image's kernel version and bootable kernel, taken out of the root (it goes to the ESP):
/// `/boot/<prefix><version>` or `/usr/lib/modules/<version>/vmlinuz`, for the one version with
/// a modules directory. `/boot` goes with it.
pub fn take_kernel(root: &mut Tree, reference: &str, arch: Arch) -> Result<(String, Content)> {
    let prefix = arch.kernel_file_prefix();
    let versions = crate::kmod::kernel_versions(root);
    let kver = match versions.as_slice() {
        [one] => one.clone(),
        [] => bail!(
            "image `{reference}` has no kernel: kiln looked for /usr/lib/modules/<version>/ with /{prefix}<version> or /usr/lib/modules/<version>/vmlinuz, and found no /usr/lib/modules/<version> at all; an OS image must bring the kernel and modules it boots with"
        ),
        many => bail!("image `{reference}` has several kernels ({}); kiln boots exactly one", many.join(", ")),
    };
    let candidates = [format!("{prefix}{kver}"), format!("usr/lib/modules/{kver}/vmlinuz")];
    let found = candidates.iter().find_map(|p| match root.get_str(p).map(|e| &e.kind) {
        Some(Kind::File(c)) => Some((p.clone(), c.clone())),
        _ => None,
    });
    let Some((path, kernel)) = found else {
        bail!("image `{reference}` has modules for kernel {kver} but no kernel: kiln looked at /{} and /{}", candidates[0], candidates[1]);
    };
    info!("{arch}: kernel {kver} from image {reference} (/{path})");
    root.remove(&TreePath::parse(&path)?);
    root.remove(&TreePath::parse("boot")?);
    Ok((kver, kernel))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_with(files: &[&str]) -> Tree {
        let mut t = Tree::merged_usr(Arch::X86_64);
        for f in files {
            t.add_file(f, 0o644, format!("contents of {f}")).unwrap();
        }
        t
    }

    #[test]
    fn the_kernel_comes_from_boot_or_the_modules_directory() {
        for path in ["boot/vmlinuz-6.12.1-amd64", "usr/lib/modules/6.12.1-amd64/vmlinuz"] {
            let mut t = root_with(&[path, "usr/lib/modules/6.12.1-amd64/kernel/fs/x.ko.xz"]);
            let (kver, k) = take_kernel(&mut t, "r/os:1", Arch::X86_64).unwrap();
            assert_eq!(kver, "6.12.1-amd64");
            assert_eq!(&*k.read().unwrap(), format!("contents of {path}").as_bytes());
            assert!(!t.contains(path) && !t.contains("boot"));
            assert!(t.contains("usr/lib/modules/6.12.1-amd64/kernel/fs/x.ko.xz"));
        }
    }

    #[test]
    fn an_image_without_a_kernel_is_named_with_the_paths_looked_at() {
        let err = take_kernel(&mut root_with(&["etc/os-release"]), "r/os:1", Arch::X86_64).unwrap_err().to_string();
        assert!(
            err.contains("image `r/os:1` has no kernel")
                && err.contains("/boot/vmlinuz-<version>")
                && err.contains("/usr/lib/modules/<version>/vmlinuz"),
            "{err}"
        );
        let err = take_kernel(&mut root_with(&["usr/lib/modules/6.1/modules.order"]), "r/os:1", Arch::Riscv64).unwrap_err().to_string();
        assert!(err.contains("/boot/vmlinux-6.1") && err.contains("/usr/lib/modules/6.1/vmlinuz"), "{err}");
    }

    #[test]
    fn busybox_init_replaces_the_images_init() {
        let mut t = Tree::merged_usr(Arch::X86_64);
        t.add_symlink("sbin/init", "/lib/systemd/systemd").unwrap();
        claim_init(&mut t, "r/os:1").unwrap();
        assert!(matches!(&t.get_str("usr/sbin/init").unwrap().kind, Kind::Symlink(s) if s == "../bin/busybox"));
        let mut t = Tree::merged_usr(Arch::X86_64);
        claim_init(&mut t, "r/os:1").unwrap();
        assert!(t.contains("usr/sbin/init"));
    }
}
