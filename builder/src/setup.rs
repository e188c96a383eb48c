//! What Debian's maintainer scripts would have done, done by kiln on the root model:
//! accounts, the base directory layout, device nodes, busybox links and kernel module indexes.
//! No package script ever runs.

use anyhow::{Context, Result};

use crate::tree::{Entry, Kind, Meta, Tree, TreePath};

/// System accounts (Debian's base-passwd numbering). Everything is locked: logins come from the
/// profile's users (ssh keys), never from a default password.
pub(crate) const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
bin:x:2:2:bin:/bin:/usr/sbin/nologin
sys:x:3:3:sys:/dev:/usr/sbin/nologin
sshd:x:100:65534::/run/sshd:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
";

pub(crate) const GROUP: &str = "\
root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
kmem:x:15:
dialout:x:20:
shadow:x:42:
utmp:x:43:
video:x:44:
staff:x:50:
users:x:100:
nogroup:x:65534:
";

const SHADOW_GID: u32 = 42;

fn shadow() -> String {
    PASSWD.lines().map(|l| format!("{}:*:0:0:99999:7:::\n", l.split(':').next().unwrap_or_default())).collect()
}

/// Adds the files and directories every kiln appliance has. Existing files from packages win
/// for everything but the account databases, which kiln owns.
pub fn base_system(tree: &mut Tree) -> Result<()> {
    for (dir, mode) in [
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("root", 0o700),
        ("etc", 0o755),
        ("var", 0o755),
        ("var/lib", 0o755),
        ("var/log", 0o755),
        ("var/tmp", 0o1777),
        ("mnt", 0o755),
        ("usr/sbin", 0o755),
        ("usr/bin", 0o755),
    ] {
        if tree.get_str(dir).is_none() {
            tree.add_dir(dir, mode)?;
        }
    }
    if tree.get_str("var/run").is_none() {
        tree.add_symlink("var/run", "/run")?;
    }
    tree.add_file("etc/passwd", 0o644, PASSWD)?;
    tree.add_file("etc/group", 0o644, GROUP)?;
    let shadow_path = TreePath::parse("etc/shadow")?;
    tree.insert(
        &shadow_path,
        Entry { meta: Meta { mode: 0o640, uid: 0, gid: SHADOW_GID, mtime: 0 }, kind: Kind::File(crate::tree::Content::bytes(shadow())) },
    )?;
    if !tree.contains("etc/shells") {
        tree.add_file("etc/shells", 0o644, "/bin/sh\n/usr/bin/sh\n")?;
    }
    // Device nodes for the moment before devtmpfs is mounted (a console for init's first lines).
    add_console_nodes(tree)?;
    Ok(())
}

/// `/dev/console` and `/dev/null`: the kernel opens the console from the root (or initramfs)
/// before /init runs; without it init has no output at all.
pub fn add_console_nodes(tree: &mut Tree) -> Result<()> {
    for (path, major, minor, mode) in [("dev/console", 5, 1, 0o600), ("dev/null", 1, 3, 0o666)] {
        let p = TreePath::parse(path)?;
        tree.insert(&p, Entry { meta: Meta::root(mode), kind: Kind::CharDevice { major, minor } })?;
    }
    Ok(())
}

/// Writes `modules.dep`, `modules.alias` and a copy of `modules.builtin` handling for the kernel's
/// modules so `modprobe` works on the device. Returns the module set for initramfs use.
pub fn module_indexes(tree: &mut Tree, kver: &str) -> Result<crate::kmod::ModuleSet> {
    let set = crate::kmod::ModuleSet::from_tree(tree, kver).with_context(|| format!("reading kernel {kver} modules"))?;
    let dir = set.dir.clone();
    tree.add_file(&format!("{}/modules.dep", dir.as_str()), 0o644, set.modules_dep())?;
    tree.add_file(&format!("{}/modules.alias", dir.as_str()), 0o644, set.modules_alias())?;
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_are_locked_and_shadow_is_private() {
        let mut t = Tree::merged_usr(crate::arch::Arch::Riscv64);
        base_system(&mut t).unwrap();
        let e = t.get_str("etc/shadow").unwrap();
        assert_eq!((e.meta.mode, e.meta.gid), (0o640, SHADOW_GID));
        let Kind::File(c) = &e.kind else { panic!() };
        let text = String::from_utf8(c.read().unwrap().into_owned()).unwrap();
        assert!(text.lines().all(|l| l.split(':').nth(1) == Some("*")), "{text}");
        assert_eq!(text.lines().count(), PASSWD.lines().count());
        assert!(matches!(t.get_str("dev/console").unwrap().kind, Kind::CharDevice { major: 5, minor: 1 }));
        assert_eq!(t.get_str("tmp").unwrap().meta.mode, 0o1777);
    }
}
