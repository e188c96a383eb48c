//! Which files of a root are secrets, the public root without them, and the per-node bundles
//! that `kiln serve` hands to one machine each (docs/security.md).
//!
//! The rule: a regular file that others may not read (no `o+r`) is a secret, unless it came
//! unchanged from a Debian package or the base OS image (those are public data, whatever their
//! mode). So everything kiln and the profile write owner-only (`/etc/shadow` with password
//! hashes, the cluster token in `etc/kiln/nodes/*/k3s-config.yaml`, registry credentials and
//! client keys, etcd keys, an operator's 0600 `files:`) is one, and a new feature that writes a
//! key 0600 is covered without a list to keep up to date.
//!
//! The netboot root (`root.img`, served to any machine) is the root without its secrets. A node's
//! bundle holds the secrets it needs: every secret except other nodes' `etc/kiln/nodes/<name>/`
//! files and those of `_default`. The installer lays the bundle into the persistent data
//! partition (`/etc` upper layer and `/var/lib`), so only paths there can be delivered.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::cluster::render::NODES_DIR;
use crate::tree::{Entry, Kind, Meta, Tree, TreePath};

/// Directories a bundle can deliver into: the installer writes them onto the data partition,
/// which holds the `/etc` upper layer and `/var/lib` (docs/first-boot.md).
pub const DELIVERABLE: &[&str] = &["etc", "var/lib"];

/// The owner-only files a root had before kiln and the profile added anything: package files.
pub struct Baseline(BTreeMap<TreePath, String>);

impl Baseline {
    /// Records every owner-only regular file of `tree` with its digest.
    pub fn of(tree: &Tree) -> Result<Baseline> {
        let mut files = BTreeMap::new();
        for (path, entry) in tree.iter() {
            if let Some(digest) = private_file_digest(entry)? {
                files.insert(path.clone(), digest);
            }
        }
        Ok(Baseline(files))
    }
}

/// A regular file's sha256 if others may not read it; `None` for everything else.
fn private_file_digest(entry: &Entry) -> Result<Option<String>> {
    match &entry.kind {
        Kind::File(content) if entry.meta.mode & 0o004 == 0 => Ok(Some(crate::digest::sha256_hex(&content.read()?))),
        _ => Ok(None),
    }
}

/// The secrets of a root, by path.
pub struct Secrets(Vec<TreePath>);

impl Secrets {
    /// The owner-only files of `tree` that are not in `baseline` with the same contents.
    /// Refuses a secret outside [`DELIVERABLE`]: no install could hand it to its node alone.
    pub fn find(tree: &Tree, baseline: &Baseline) -> Result<Secrets> {
        let mut found = Vec::new();
        for (path, entry) in tree.iter() {
            let Some(digest) = private_file_digest(entry)? else { continue };
            if baseline.0.get(path) == Some(&digest) {
                continue;
            }
            if !DELIVERABLE.iter().any(|d| path.as_str().starts_with(&format!("{d}/"))) {
                bail!(
                    "{path} is owner-only (mode {:04o}), so it counts as a secret, but it lies outside /etc and /var/lib: \
                     a network install cannot deliver it to its node alone. Make it readable (mode 0644) if it is no \
                     secret, or place it under /etc",
                    entry.meta.mode
                );
            }
            found.push(path.clone());
        }
        Ok(Secrets(found))
    }

    pub fn paths(&self) -> &[TreePath] {
        &self.0
    }

    /// `tree` without its secrets: what the netboot `root.img` holds.
    pub fn public_root(&self, tree: &Tree) -> Tree {
        let mut public = tree.clone();
        for p in &self.0 {
            public.remove(p);
        }
        public
    }

    /// The secrets node `node` needs, as a tree: all of them except other nodes' directories
    /// (and `_default`'s, which is for machines outside the inventory). Parent directories
    /// are taken from `tree` with their modes.
    pub fn for_node(&self, tree: &Tree, node: &str) -> Result<Tree> {
        let own = TreePath::parse_relative(&format!("{NODES_DIR}/{node}")).context("node name")?;
        let nodes = TreePath::parse_relative(NODES_DIR).expect("constant path");
        let mut bundle = Tree::new();
        for path in &self.0 {
            if path.starts_with(&nodes) && !path.starts_with(&own) {
                continue;
            }
            let mut parent = path.parent();
            let mut parents = Vec::new();
            while let Some(p) = parent.filter(|p| !p.is_root()) {
                parents.push(p.clone());
                parent = p.parent();
            }
            for dir in parents.into_iter().rev() {
                let meta = tree.get(&dir).map_or(Meta::root(0o755), |e| e.meta);
                bundle.insert(&dir, Entry { meta, kind: Kind::Dir })?;
            }
            let entry = tree.get(path).expect("a secret found in this tree").clone();
            bundle.insert(path, entry)?;
        }
        Ok(bundle)
    }
}

/// Where `kiln build` keeps the bundles of one architecture: `OUT/secrets/netboot/<arch>/`.
pub fn bundle_dir(out_dir: &Path, arch: crate::arch::Arch) -> std::path::PathBuf {
    out_dir.join("secrets").join("netboot").join(arch.name())
}

/// The bundle file of `node` in [`bundle_dir`].
pub fn bundle_file(node: &str) -> String {
    format!("{node}.cpio")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(t: &mut Tree, path: &str, mode: u32, data: &str) {
        t.add_file(path, mode, data.as_bytes().to_vec()).unwrap();
    }

    fn names(paths: &[TreePath]) -> Vec<&str> {
        paths.iter().map(|p| p.as_str()).collect()
    }

    #[test]
    fn owner_only_files_kiln_wrote_are_secrets_and_package_files_are_not() -> Result<()> {
        let mut t = Tree::new();
        file(&mut t, "etc/sudoers", 0o440, "package");
        file(&mut t, "etc/ssl/private/unchanged.pem", 0o600, "package");
        file(&mut t, "etc/changed", 0o600, "package");
        let baseline = Baseline::of(&t)?;
        file(&mut t, "etc/changed", 0o600, "kiln changed it");
        file(&mut t, "etc/shadow", 0o600, "alice:$y$hash:");
        file(&mut t, "etc/kiln/nodes/n1/k3s-config.yaml", 0o600, "token: a");
        file(&mut t, "etc/kiln/nodes/n2/k3s-config.yaml", 0o600, "token: a");
        file(&mut t, "etc/kiln/nodes/n2/node.conf", 0o644, "public");
        file(&mut t, "etc/kiln/nodes/_default/k3s-config.yaml", 0o600, "token: a");
        file(&mut t, "var/lib/app/key", 0o640, "k");
        file(&mut t, "etc/motd", 0o644, "public");
        let s = Secrets::find(&t, &baseline)?;
        assert_eq!(
            names(s.paths()),
            [
                "etc/changed",
                "etc/kiln/nodes/_default/k3s-config.yaml",
                "etc/kiln/nodes/n1/k3s-config.yaml",
                "etc/kiln/nodes/n2/k3s-config.yaml",
                "etc/shadow",
                "var/lib/app/key"
            ]
        );

        let public = s.public_root(&t);
        for p in s.paths() {
            assert!(public.get(p).is_none(), "{p} left in the public root");
        }
        for kept in ["etc/sudoers", "etc/ssl/private/unchanged.pem", "etc/motd", "etc/kiln/nodes/n2/node.conf"] {
            assert!(public.contains(kept), "{kept} missing from the public root");
        }

        let n1 = s.for_node(&t, "n1")?;
        let files: Vec<&str> = n1.iter().filter(|(_, e)| matches!(e.kind, Kind::File(_))).map(|(p, _)| p.as_str()).collect();
        assert_eq!(files, ["etc/changed", "etc/kiln/nodes/n1/k3s-config.yaml", "etc/shadow", "var/lib/app/key"]);
        assert_eq!(n1.get_str("etc/kiln/nodes/n1/k3s-config.yaml").unwrap().meta.mode, 0o600);
        Ok(())
    }

    #[test]
    fn a_secret_outside_etc_and_var_lib_is_refused_naming_it() {
        let mut t = Tree::new();
        let baseline = Baseline::of(&t).unwrap();
        file(&mut t, "opt/app/secret.key", 0o600, "k");
        let err = format!("{:#}", Secrets::find(&t, &baseline).err().expect("refused"));
        assert!(err.contains("/opt/app/secret.key") && err.contains("0600") && err.contains("/etc"), "{err}");
    }
}
