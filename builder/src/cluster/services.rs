//! The services of a cluster image and what they need in the root: Debian's `etcd-server` and
//! an `etcd` account when the inventory has etcd members, kiln's cluster overlay
//! (`overlays/cluster/`: the supervisors `etcd-run` and `k3s-run`, the health checks, the log
//! rotation and `await-roles`, which prints `[kiln] ready` once the node's roles are healthy)
//! and the init entries that start them; k3s's kernel modules go into the boot-time list that
//! `kmod` owns. k3s itself is placed by `crate::k3s::place`.

use anyhow::{bail, Result};

use crate::kmod::ModuleSet;
use crate::profile::cluster::Cluster;
use crate::tree::Tree;

/// Debian's etcd server package (`/usr/bin/etcd`).
pub const ETCD_PACKAGE: &str = "etcd-server";
/// The etcd binary `etcd-run` starts.
const ETCD_BINARY: &str = "usr/bin/etcd";
/// The modules k3s's agent loads at start (its `syssetup`: overlay filesystem for containerd,
/// conntrack and bridge netfilter for kube-proxy and flannel, the iptables tables it writes).
/// Loaded at boot by `22-modules.sh` as well, so a kernel without them fails the build instead
/// of the node.
pub const K3S_MODULES: &[&str] = &["overlay", "nf_conntrack", "br_netfilter", "iptable_nat", "iptable_filter"];
/// The readiness script, an inittab `once` entry (the boot script leaves `[kiln] ready` to it).
pub const AWAIT_ROLES: &str = "/usr/lib/kiln/await-roles";
const ETCD_RUN: &str = "/usr/lib/kiln/etcd-run";

/// The Debian packages the cluster's services need in the root.
pub fn packages(c: &Cluster) -> Vec<&'static str> {
    if c.has_etcd() {
        vec![ETCD_PACKAGE]
    } else {
        Vec::new()
    }
}

/// Lays the cluster overlay onto the root and adds the etcd account, k3s's kernel modules and
/// the init entries.
pub fn install(c: &Cluster, root: &mut Tree, modules: &ModuleSet) -> Result<()> {
    root.merge(&crate::assets::overlay("cluster")?)?;
    if c.has_etcd() {
        if !root.contains(ETCD_BINARY) {
            bail!("key `cluster.nodes`: etcd members need the `{ETCD_PACKAGE}` package, but /{ETCD_BINARY} is missing from the root");
        }
        crate::setup::add_system_account(root, &crate::setup::ETCD_ACCOUNT)?;
        crate::inittab::append(
            root,
            "etcd member (nodes with the `etcd` role; others idle), restarted by init if it exits; output in /var/log/etcd.log.",
            &format!("::respawn:{ETCD_RUN}"),
        )?;
    } else {
        root.remove(&crate::tree::TreePath::parse(ETCD_RUN)?);
    }
    if c.needs_k3s() {
        crate::kmod::load_needed_at_boot(root, modules, K3S_MODULES, "cluster")?;
    } else {
        root.remove(&crate::tree::TreePath::parse(crate::k3s::RUN_SCRIPT)?);
    }
    crate::inittab::append(
        root,
        "Prints `[kiln] ready` once this node's roles are healthy (etcd quorum, k3s node Ready or agent registered).",
        &format!("::once:{AWAIT_ROLES}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::Arch;
    use crate::profile::test_profile;
    use crate::tree::Kind;

    fn cluster(yaml: &str) -> Cluster {
        let p = test_profile(&format!("cluster:\n{yaml}"));
        p.cluster.unwrap()
    }

    fn root() -> Tree {
        let mut t = Tree::merged_usr(Arch::X86_64);
        t.add_file("etc/inittab", 0o644, "::sysinit:/usr/lib/kiln/boot\n").unwrap();
        t.add_file("usr/lib/kiln/boot", 0o755, "#!/bin/sh\n").unwrap();
        t.add_file("etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        t.add_file("etc/group", 0o644, "root:x:0:\n").unwrap();
        t.add_file("etc/shadow", 0o600, "root:*:0:0:99999:7:::\n").unwrap();
        t
    }

    /// A kernel whose modules (as built-ins) are `names`.
    fn kernel(names: &[&str]) -> ModuleSet {
        ModuleSet {
            kver: "6.12.0-test".into(),
            dir: crate::tree::TreePath::parse("usr/lib/modules/6.12.0-test").unwrap(),
            modules: Default::default(),
            builtin: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    fn text(t: &Tree, path: &str) -> String {
        match &t.get_str(path).unwrap().kind {
            Kind::File(c) => String::from_utf8(c.read().unwrap().into_owned()).unwrap(),
            _ => panic!("{path} is not a file"),
        }
    }

    const ETCD_ONLY: &str = "  name: lab\n  datastore: external-etcd\n  default_role: none\n  nodes:\n    - {name: e1, mac: \"52:54:00:00:00:01\", roles: [etcd], address: 10.0.0.11/24}\n";

    #[test]
    fn etcd_members_get_the_package_account_and_supervisor_but_no_k3s() {
        let c = cluster(ETCD_ONLY);
        assert!(!c.needs_k3s());
        assert_eq!(packages(&c), vec![ETCD_PACKAGE]);
        let mut t = root();
        let err = format!("{:#}", install(&c, &mut t, &kernel(&[])).unwrap_err());
        assert!(err.contains("etcd-server") && err.contains("/usr/bin/etcd"), "{err}");
        let mut t = root();
        t.add_file(ETCD_BINARY, 0o755, "elf").unwrap();
        install(&c, &mut t, &kernel(&[])).unwrap();
        assert!(text(&t, "etc/passwd").contains("etcd:x:102:102:etcd:/var/lib/etcd:/usr/sbin/nologin\n"));
        assert!(text(&t, "etc/group").contains("etcd:x:102:\n"));
        let inittab = text(&t, "etc/inittab");
        assert!(inittab.starts_with("::sysinit:/usr/lib/kiln/boot\n"), "{inittab}");
        let etcd = inittab.find("::respawn:/usr/lib/kiln/etcd-run").expect("etcd entry");
        let ready = inittab.find("::once:/usr/lib/kiln/await-roles").expect("readiness entry");
        assert!(etcd < ready, "{inittab}");
        // (logpipe, which the supervisors use, is in kiln's appliance overlay.)
        for script in ["usr/lib/kiln/etcd-run", "usr/lib/kiln/await-roles", "usr/lib/kiln/health.sh"] {
            assert!(t.contains(script), "{script}");
        }
        assert!(!t.contains("usr/lib/kiln/k3s-run"));
        assert!(!t.contains(crate::kmod::BOOT_MODULES), "an etcd-only image loads no k3s modules");
        crate::inittab::check_programs(&t).unwrap();
    }

    #[test]
    fn k3s_clusters_without_etcd_members_get_no_etcd() {
        let c = cluster("  name: lab\n  nodes: [{name: s1, mac: \"52:54:00:00:00:01\", roles: [server], address: 10.0.0.1/24}]\n  k3s: {version: v1.33.5+k3s1}\n");
        assert!(c.needs_k3s() && !c.has_etcd());
        assert!(packages(&c).is_empty());
        let mut t = root();
        let err = format!("{:#}", install(&c, &mut t, &kernel(&["overlay"])).unwrap_err());
        assert!(err.contains("`nf_conntrack`") && err.contains("6.12.0-test"), "{err}");
        let mut t = root();
        t.add_file(crate::kmod::BOOT_MODULES, 0o644, "# from kernel.load\nbr_netfilter\ntun\n").unwrap();
        install(&c, &mut t, &kernel(K3S_MODULES)).unwrap();
        // The profile's own list first, then k3s's, each once.
        assert_eq!(
            text(&t, crate::kmod::BOOT_MODULES),
            "# from kernel.load\nbr_netfilter\ntun\noverlay\nnf_conntrack\niptable_nat\niptable_filter\n"
        );
        assert!(t.contains("usr/lib/kiln/k3s-run") && !t.contains("usr/lib/kiln/etcd-run"));
        assert!(!text(&t, "etc/passwd").contains("etcd"));
        assert!(!text(&t, "etc/inittab").contains("etcd-run"));
    }
}
