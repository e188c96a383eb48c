//! busybox: the applet list read from the binary itself, and the links that make it usable.
//!
//! Debian's busybox packages ship only `/bin/busybox` (links are made by a maintainer script kiln
//! does not run). busybox stores its applet names as one sorted, NUL-separated string table
//! (`applet_names[]` in the generated applet_tables.h) starting with `[` and `[[`; reading it
//! from the binary works for any target architecture without running the binary.

use anyhow::{bail, Result};

use crate::tree::{Kind, Tree};

/// Where the busybox binary lands in a merged-/usr tree.
pub const BUSYBOX: &str = "usr/bin/busybox";

/// The applet names compiled into a busybox binary.
pub fn applets(binary: &[u8]) -> Result<Vec<String>> {
    let marker = b"[\0[[\0";
    let Some(start) = binary.windows(marker.len()).position(|w| w == marker) else {
        bail!("no applet table found in the busybox binary (is it busybox?)");
    };
    let mut names = Vec::new();
    for raw in binary[start..].split(|b| *b == 0) {
        let valid = !raw.is_empty()
            && raw.iter().all(|b| b.is_ascii_alphanumeric() || b"[-_.".contains(b))
            && names.last().is_none_or(|prev: &String| prev.as_bytes() < raw);
        if !valid {
            break;
        }
        names.push(String::from_utf8_lossy(raw).into_owned());
    }
    if names.len() < 20 {
        bail!("the busybox applet table has only {} entries; refusing to trust it", names.len());
    }
    Ok(names)
}

/// Adds `dir/<applet> -> <target>` symlinks for every applet not already provided by a real file,
/// plus `usr/sbin/init`. Returns how many links were made.
pub fn install_links(tree: &mut Tree, dir: &str, target: &str) -> Result<usize> {
    let binary = match tree.get_str(BUSYBOX).map(|e| &e.kind) {
        Some(Kind::File(c)) => c.read()?.into_owned(),
        _ => bail!("/{BUSYBOX} is missing: add the `busybox-static` package"),
    };
    let mut made = 0;
    for applet in applets(&binary)? {
        if applet == "busybox" {
            continue;
        }
        let path = format!("{dir}/{applet}");
        if tree.contains(&path) {
            continue;
        }
        tree.add_symlink(&path, target)?;
        made += 1;
    }
    if !tree.contains("usr/sbin/init") && !tree.contains("sbin/init") {
        tree.add_symlink("usr/sbin/init", "../bin/busybox")?;
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_binary() -> Vec<u8> {
        let mut b = b"\x7fELF junk\0more junk\0".to_vec();
        b.extend_from_slice(b"[\0[[\0");
        for n in ["acpid", "ash", "awk", "cat", "getty", "init", "insmod", "ls", "mount", "sh", "sleep", "switch_root"] {
            b.extend_from_slice(n.as_bytes());
            b.push(0);
        }
        for n in ["sync", "tar", "test", "true", "umount", "uname", "vi", "wget", "xargs", "yes", "zcat"] {
            b.extend_from_slice(n.as_bytes());
            b.push(0);
        }
        b.extend_from_slice(b"\0\x01\x02tail data");
        b
    }

    #[test]
    fn applet_table_is_read_until_it_ends() {
        let a = applets(&fake_binary()).unwrap();
        assert_eq!(a.first().unwrap(), "[");
        assert_eq!(a.last().unwrap(), "zcat");
        assert!(a.contains(&"switch_root".to_string()));
        assert!(applets(b"not busybox").is_err());
    }

    #[test]
    fn links_skip_real_files_and_add_init() {
        let mut t = Tree::merged_usr(crate::arch::Arch::X86_64);
        t.add_file(BUSYBOX, 0o755, fake_binary()).unwrap();
        t.add_file("usr/bin/mount", 0o755, "real mount").unwrap();
        let n = install_links(&mut t, "usr/bin", "busybox").unwrap();
        assert_eq!(n, 24); // 25 applets, less the real mount
        assert!(matches!(t.get_str("usr/bin/mount").unwrap().kind, Kind::File(_)));
        assert!(matches!(&t.get_str("bin/sh").unwrap().kind, Kind::Symlink(s) if s == "busybox"));
        assert!(t.contains("sbin/init"));
    }
}
