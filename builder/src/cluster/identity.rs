//! The boot-time half of cluster identity: `boot.d/35-identity.sh` in kiln's appliance overlay
//! picks one of the per-node directories `render` wrote. Its console line is
//! `[kiln] identity: node=<name> roles=<r1,r2|none> by=<cmdline|mac|default>`.
//!
//! The script keeps every path under `$KILN_ROOT`, so the tests below run it on the host against
//! a temporary root holding the rendered files, a fake `/proc/cmdline` and `/sys/class/net`.

/// The identity boot step, relative to the appliance overlay.
pub const STEP: &str = "usr/lib/kiln/boot.d/35-identity.sh";

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use super::STEP;
    use crate::cluster::{files, Token};

    fn overlay() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../overlays/appliance")
    }

    /// busybox sh as on the device when the host has it, else the host's POSIX sh.
    fn shell() -> Command {
        let busybox = ["/usr/bin/busybox", "/bin/busybox"].into_iter().find(|p| Path::new(p).exists());
        match busybox {
            Some(b) => {
                let mut c = Command::new(b);
                c.arg("sh");
                c
            }
            None => Command::new("sh"),
        }
    }

    struct Machine {
        dir: tempfile::TempDir,
    }

    impl Machine {
        /// A root with the rendered files of the example cluster, the given NICs and cmdline.
        fn new(cmdline: &str, nics: &[(&str, &str)]) -> Machine {
            let yaml = "name: demo\narch: [x86_64]\nnetwork: {dns: [10.0.0.1]}\ncluster:\n  name: lab\n  datastore: external-etcd\n  api_address: 10.0.0.10\n  nodes:\n    - {name: e1, mac: \"52:54:00:00:00:01\", roles: [etcd, server], address: 10.0.0.11/24, gateway: 10.0.0.1}\n    - {name: e2, mac: \"52:54:00:00:00:02\", roles: [etcd, server], address: 10.0.0.12/24}\n    - {name: e3, mac: \"52:54:00:00:00:03\", roles: [etcd, server], address: 10.0.0.13/24}\n    - {name: a1, mac: [\"52:54:00:00:00:04\", \"52:54:00:00:00:14\"], roles: [agent]}\n  k3s: {version: v1.33.5+k3s1}\n";
            let p = crate::profile::parse(yaml).unwrap();
            crate::profile::cluster::validate(&p).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("root");
            let write = |path: &str, text: &str| {
                let f = root.join(path);
                std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                std::fs::write(f, text).unwrap();
            };
            for f in files(p.cluster.as_ref().unwrap(), &Token::new("t0ken").unwrap()) {
                write(&f.path, &f.content);
            }
            write("etc/kiln/network.conf", &crate::provision::network_conf(&p.network));
            write("etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tdemo\n");
            write("proc/cmdline", &format!("console=ttyS0 quiet {cmdline}\n"));
            write("sys/class/net/lo/address", "00:00:00:00:00:00\n");
            for (name, mac) in nics {
                write(&format!("sys/class/net/{name}/address"), &format!("{mac}\n"));
            }
            // A stand-in for `hostname NAME` that records the name.
            write("bin/hostname", "#!/bin/sh\necho \"$1\" > \"$KILN_ROOT/hostname-set\"\n");
            let hostname = root.join("bin/hostname");
            std::fs::set_permissions(&hostname, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
            Machine { dir }
        }

        fn root(&self) -> PathBuf {
            self.dir.path().join("root")
        }

        /// Runs the step as `/usr/lib/kiln/boot` does: lib.sh loaded, the step sourced in a
        /// `set -eu` subshell.
        fn boot(&self) -> (bool, String) {
            let lib = overlay().join("usr/lib/kiln/lib.sh");
            let step = overlay().join(STEP);
            let path = format!("{}:{}", self.root().join("bin").display(), std::env::var("PATH").unwrap_or_default());
            let out = shell()
                .arg("-c")
                .arg("set -u; . \"$1\"; (set -eu; . \"$2\")")
                .arg("identity-test")
                .arg(&lib)
                .arg(&step)
                .env("KILN_ROOT", self.root())
                .env("PATH", path)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            (out.status.success(), text)
        }

        fn read(&self, path: &str) -> String {
            std::fs::read_to_string(self.root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
        }

        fn exists(&self, path: &str) -> bool {
            self.root().join(path).exists()
        }
    }

    fn mode(m: &Machine, path: &str) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(m.root().join(path)).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn kernel_command_line_wins_over_the_mac() {
        let m = Machine::new("kiln.node=e2", &[("eth0", "52:54:00:00:00:01")]);
        let (ok, out) = m.boot();
        assert!(ok, "{out}");
        assert_eq!(out.trim_end(), "[kiln] identity: node=e2 roles=etcd,server by=cmdline");
        assert!(m.read("etc/rancher/k3s/config.yaml").contains("node-name: \"e2\"\n"));
        assert_eq!(mode(&m, "etc/rancher/k3s/config.yaml"), 0o600);
        assert!(m.read("etc/kiln/etcd.env").contains("ETCD_NAME=e2\n"));
        assert_eq!(m.read("etc/hostname"), "e2\n");
        assert_eq!(m.read("hostname-set"), "e2\n");
        assert!(m.read("etc/hosts").contains("127.0.1.1\te2\n"));
        let net = m.read("run/kiln/network.conf");
        assert!(net.contains("\nstatic eth0 10.0.0.12/24 -\ndns 10.0.0.1\n") && !net.contains("dhcp-all"), "{net}");
        assert!(m.read("run/kiln/node.conf").contains("KILN_NODE_BY=\"cmdline\""));
    }

    #[test]
    fn any_nic_with_an_inventory_mac_names_the_node() {
        let m = Machine::new("", &[("eth0", "52:54:00:99:99:99"), ("eth1", "52:54:00:00:00:01")]);
        let (ok, out) = m.boot();
        assert!(ok, "{out}");
        assert_eq!(out.trim_end(), "[kiln] identity: node=e1 roles=etcd,server by=mac");
        let net = m.read("run/kiln/network.conf");
        assert!(net.contains("\nstatic eth1 10.0.0.11/24 10.0.0.1\n"), "the address goes on the NIC that matched: {net}");
        // A later boot as an agent (no static address, no etcd) drops the etcd files.
        std::fs::write(m.root().join("sys/class/net/eth1/address"), "52:54:00:00:00:14\n").unwrap();
        let (ok, out) = m.boot();
        assert!(ok, "{out}");
        assert_eq!(out.trim_end(), "[kiln] identity: node=a1 roles=agent by=mac");
        assert!(!m.exists("etc/kiln/etcd.env") && !m.exists("run/kiln/network.conf"));
        assert!(m.read("etc/rancher/k3s/config.yaml").contains("server: \"https://10.0.0.10:6443\"\n"));
    }

    #[test]
    fn unknown_machines_take_the_default_role_and_a_mac_name() {
        let m = Machine::new("", &[("enp1s0", "52:54:00:ab:cd:01"), ("eth9", "52:54:00:00:00:77")]);
        let (ok, out) = m.boot();
        assert!(ok, "{out}");
        assert_eq!(out.trim_end(), "[kiln] identity: node=lab-525400abcd01 roles=agent by=default");
        let cfg = m.read("etc/rancher/k3s/config.yaml");
        assert!(cfg.ends_with("node-name: \"lab-525400abcd01\"\n"), "{cfg}");
        let parsed: serde_json::Value = serde_saphyr::from_str(&cfg).unwrap();
        assert_eq!(parsed["server"], "https://10.0.0.10:6443");
        assert_eq!(m.read("etc/hostname"), "lab-525400abcd01\n");
        assert!(!m.exists("run/kiln/network.conf"));
    }

    #[test]
    fn an_unknown_name_on_the_command_line_stops_with_the_known_names() {
        for bad in ["kiln.node=e9", "kiln.node=_default", "kiln.node=../e1"] {
            let m = Machine::new(bad, &[("eth0", "52:54:00:00:00:01")]);
            let (ok, out) = m.boot();
            assert!(!ok, "{bad}: {out}");
            let line = out.lines().next().unwrap_or_default();
            assert!(line.starts_with("[kiln] error: identity: ") && line.contains("known nodes: e1 e2 e3 a1"), "{bad}: {out}");
            assert!(!m.exists("etc/rancher/k3s/config.yaml"));
        }
    }

    #[test]
    fn images_without_a_cluster_say_so() {
        let m = Machine::new("", &[("eth0", "52:54:00:00:00:01")]);
        std::fs::remove_file(m.root().join("etc/kiln/cluster.conf")).unwrap();
        let (ok, out) = m.boot();
        assert!(ok && out.trim_end() == "[kiln] identity: no cluster in this image", "{out}");
    }
}
