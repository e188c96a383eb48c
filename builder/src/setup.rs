//! What Debian's maintainer scripts would have done, done by kiln on the root model:
//! accounts, the base directory layout, device nodes, busybox links and kernel module indexes.
//! No package script ever runs.
//!
//! This module owns the account databases (`/etc/passwd`, `/etc/group`, `/etc/shadow`): the base
//! accounts, the service accounts kiln adds ([`add_system_account`]) and the file handling every
//! later addition (the profile's users, in `provision`) goes through ([`AccountFiles`]).

use anyhow::{bail, Context, Result};

use crate::tree::{Content, Entry, Kind, Meta, Tree, TreePath};

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

/// A locked service account with a group of its own, which a Debian maintainer script would have
/// created (kiln runs none). Ids are below 1000, clear of the base accounts and of each other.
pub struct SystemAccount {
    pub name: &'static str,
    pub id: u32,
    pub gecos: &'static str,
    pub home: &'static str,
}

/// The account chronyd drops to after start-up (profile key `time.servers`).
pub const CHRONY_ACCOUNT: SystemAccount = SystemAccount { name: "_chrony", id: 101, gecos: "chrony", home: "/var/lib/chrony" };
/// The account etcd runs as (nodes with the `etcd` role).
pub const ETCD_ACCOUNT: SystemAccount = SystemAccount { name: "etcd", id: 102, gecos: "etcd", home: "/var/lib/etcd" };

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

/// The account databases of a root, read to be extended and written back with [`AccountFiles::write`].
pub struct AccountFiles {
    pub passwd: String,
    pub group: String,
    pub shadow: String,
}

impl AccountFiles {
    /// Reads `/etc/passwd`, `/etc/group` and `/etc/shadow` (laid down by [`base_system`]).
    pub fn read(root: &Tree) -> Result<AccountFiles> {
        Ok(AccountFiles {
            passwd: file_text(root, "etc/passwd")?,
            group: file_text(root, "etc/group")?,
            shadow: file_text(root, "etc/shadow")?,
        })
    }

    /// Writes the three files back: passwd and group 0644, shadow 0600 owned by root (it holds
    /// the password hashes).
    pub fn write(self, root: &mut Tree) -> Result<()> {
        root.add_file("etc/passwd", 0o644, self.passwd)?;
        root.add_file("etc/group", 0o644, self.group)?;
        insert(root, "etc/shadow", owned(0o600, 0, 0), Kind::File(Content::bytes(self.shadow)))
    }
}

/// Adds a locked system account with its own group (what a Debian maintainer script would have
/// created; kiln runs none).
pub fn add_system_account(root: &mut Tree, a: &SystemAccount) -> Result<()> {
    let mut files = AccountFiles::read(root)?;
    let SystemAccount { name, id, gecos, home } = a;
    files.passwd.push_str(&format!("{name}:x:{id}:{id}:{gecos}:{home}:/usr/sbin/nologin\n"));
    files.group.push_str(&format!("{name}:x:{id}:\n"));
    files.shadow.push_str(&format!("{name}:*:0:0:99999:7:::\n"));
    files.write(root)
}

/// The text of a file of the root.
pub(crate) fn file_text(root: &Tree, path: &str) -> Result<String> {
    match root.get_str(path).map(|e| &e.kind) {
        Some(Kind::File(c)) => String::from_utf8(c.read()?.into_owned()).with_context(|| format!("/{path} is not UTF-8")),
        _ => bail!("/{path} is missing from the root"),
    }
}

/// Inserts an entry with the given owner and mode.
pub(crate) fn insert(root: &mut Tree, path: &str, meta: Meta, kind: Kind) -> Result<()> {
    root.insert(&TreePath::parse(path)?, Entry { meta, kind })?;
    Ok(())
}

/// Metadata with an owner: `mode`, `uid`, `gid`, time 0.
pub(crate) fn owned(mode: u32, uid: u32, gid: u32) -> Meta {
    Meta { mode, uid, gid, mtime: 0 }
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
pub fn module_indexes(tree: &mut Tree, kver: &str, reuse: &crate::reuse::Reuse) -> Result<crate::kmod::ModuleSet> {
    let set = crate::kmod::ModuleSet::from_tree_reusing(tree, kver, reuse).with_context(|| format!("reading kernel {kver} modules"))?;
    write_module_indexes(tree, &set)?;
    Ok(set)
}

fn write_module_indexes(tree: &mut Tree, set: &crate::kmod::ModuleSet) -> Result<()> {
    let dir = set.dir.clone();
    tree.add_file(&format!("{}/modules.dep", dir.as_str()), 0o644, set.modules_dep())?;
    tree.add_file(&format!("{}/modules.alias", dir.as_str()), 0o644, set.modules_alias())?;
    Ok(())
}

/// The platform's module set (`kernel.root_modules: platform`): the root without the modules
/// under `omit` (`Platform::root_modules_omit`), keeping `keep` and every module the appliance
/// loads at boot (`kmod::BOOT_MODULES`, written by then) with their dependencies; the indexes
/// are written again for what stays. Returns the smaller set.
pub fn omit_root_modules(tree: &mut Tree, set: crate::kmod::ModuleSet, omit: &[String], keep: &[&str]) -> Result<crate::kmod::ModuleSet> {
    if omit.is_empty() {
        return Ok(set);
    }
    let boot = file_text(tree, crate::kmod::BOOT_MODULES).unwrap_or_default();
    let mut keep = keep.to_vec();
    keep.extend(boot.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')));
    let (kept, dropped) = set.without(omit, &keep);
    for m in &dropped {
        tree.remove(&m.path);
    }
    write_module_indexes(tree, &kept)?;
    tracing::info!(
        "kernel {}: the root carries {} of {} modules: the platform leaves out {} subtrees ({}, ...); `kernel.root_modules: all` keeps every one",
        kept.kver,
        kept.modules.len(),
        kept.modules.len() + dropped.len(),
        omit.len(),
        omit.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
    );
    Ok(kept)
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

    #[test]
    fn system_accounts_are_locked_with_a_group_of_their_own() {
        let mut t = Tree::merged_usr(crate::arch::Arch::X86_64);
        base_system(&mut t).unwrap();
        add_system_account(&mut t, &CHRONY_ACCOUNT).unwrap();
        assert!(file_text(&t, "etc/passwd").unwrap().ends_with("\n_chrony:x:101:101:chrony:/var/lib/chrony:/usr/sbin/nologin\n"));
        assert!(file_text(&t, "etc/group").unwrap().ends_with("\n_chrony:x:101:\n"));
        assert!(file_text(&t, "etc/shadow").unwrap().ends_with("\n_chrony:*:0:0:99999:7:::\n"));
        let shadow = t.get_str("etc/shadow").unwrap().meta;
        assert_eq!((shadow.mode, shadow.uid, shadow.gid), (0o600, 0, 0));
        let ids: Vec<&str> = PASSWD.lines().chain(GROUP.lines()).filter_map(|l| l.split(':').nth(2)).collect();
        for a in [&CHRONY_ACCOUNT, &ETCD_ACCOUNT] {
            assert!(a.id < 1000 && !ids.contains(&a.id.to_string().as_str()), "{}", a.name);
        }
        assert_ne!(CHRONY_ACCOUNT.id, ETCD_ACCOUNT.id);
    }
}
