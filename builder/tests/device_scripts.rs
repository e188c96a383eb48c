//! Host-side tests of the shell kiln puts on the device. The scripts keep every path under
//! `${KILN_ROOT:-}`, so each test runs the real script from `overlays/` against a [`FakeRoot`]:
//! a temporary directory holding the files the script reads (rendered config, `/proc/cmdline`,
//! `/sys/class/net`) and stand-in commands in its `bin/`, under busybox `sh` as on the device.
//! The VM tier then boots the same scripts for real.
//!
//! One `mod` per script. A new boot step (`overlays/appliance/usr/lib/kiln/boot.d/NN-x.sh`)
//! gets its host test here, in a `mod` of its own like `identity` below: fill a [`FakeRoot`] with
//! what the step reads, run it with [`FakeRoot::boot_step`], check what it wrote and logged.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// An overlay directory of the repository (`appliance`, `cluster`).
fn overlay(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../overlays").join(name)
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

/// A temporary root that a script sees as `$KILN_ROOT`; its `bin/` comes first on `PATH`, so
/// stand-in commands written there (e.g. one that records its arguments) replace the host's.
struct FakeRoot {
    dir: tempfile::TempDir,
}

impl FakeRoot {
    fn new() -> FakeRoot {
        FakeRoot { dir: tempfile::tempdir().unwrap() }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `text` at `path` (relative to the root), creating the parent directories.
    fn write(&self, path: &str, text: &str) {
        let f = self.path().join(path);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, text).unwrap();
    }

    /// [`FakeRoot::write`], then sets the file's mode.
    fn write_mode(&self, path: &str, text: &str, mode: u32) {
        self.write(path, text);
        std::fs::set_permissions(self.path().join(path), PermissionsExt::from_mode(mode)).unwrap();
    }

    fn read(&self, path: &str) -> String {
        std::fs::read_to_string(self.path().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn exists(&self, path: &str) -> bool {
        self.path().join(path).exists()
    }

    fn mode(&self, path: &str) -> u32 {
        std::fs::metadata(self.path().join(path)).unwrap().permissions().mode() & 0o777
    }

    /// Runs the shell with `args` against this root; returns whether it succeeded and its
    /// stdout followed by its stderr.
    fn sh<I, S>(&self, args: I) -> (bool, String)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let path = format!("{}:{}", self.path().join("bin").display(), std::env::var("PATH").unwrap_or_default());
        let out = shell().args(args).env("KILN_ROOT", self.path()).env("PATH", path).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    /// Runs a boot step (relative to the appliance overlay) as `/usr/lib/kiln/boot` does:
    /// lib.sh loaded, the step sourced in a `set -eu` subshell.
    fn boot_step(&self, step: &str) -> (bool, String) {
        let appliance = overlay("appliance");
        let lib = appliance.join("usr/lib/kiln/lib.sh");
        let step = appliance.join(step);
        let script = OsStr::new("set -u; . \"$1\"; (set -eu; . \"$2\")");
        self.sh([OsStr::new("-c"), script, OsStr::new("boot-step-test"), lib.as_os_str(), step.as_os_str()])
    }
}

/// `boot.d/35-identity.sh` picks this machine's node from the cluster kiln rendered. Its console
/// line is `[kiln] identity: node=<name> roles=<r1,r2|none> by=<cmdline|mac|default>`.
mod identity {
    use kiln::cluster::render::IDENTITY_STEP;
    use kiln::cluster::{files, pki, Secrets, Token};

    use super::FakeRoot;

    /// A root with the rendered files of the example cluster, the given NICs and cmdline.
    fn cluster_root(cmdline: &str, nics: &[(&str, &str)]) -> FakeRoot {
        let yaml = "name: demo\narch: [x86_64]\nnetwork: {dns: [10.0.0.1]}\ncluster:\n  name: lab\n  datastore: external-etcd\n  api_address: 10.0.0.10\n  nodes:\n    - {name: e1, mac: \"52:54:00:00:00:01\", roles: [etcd, server], address: 10.0.0.11/24, gateway: 10.0.0.1}\n    - {name: e2, mac: \"52:54:00:00:00:02\", roles: [etcd, server], address: 10.0.0.12/24}\n    - {name: e3, mac: \"52:54:00:00:00:03\", roles: [etcd, server], address: 10.0.0.13/24}\n    - {name: a1, mac: [\"52:54:00:00:00:04\", \"52:54:00:00:00:14\"], roles: [agent]}\n  k3s: {version: v1.33.5+k3s1}\n";
        let p = kiln::profile::parse(yaml).unwrap();
        kiln::profile::cluster::validate(&p).unwrap();
        let m = FakeRoot::new();
        let keep = tempfile::tempdir().unwrap();
        let c = p.cluster.as_ref().unwrap();
        let secrets = Secrets { token: Token::new("t0ken").unwrap(), pki: pki::load_or_create(c, keep.path()).unwrap() };
        for f in files(c, &secrets).unwrap() {
            m.write_mode(&f.path, &f.content, f.mode);
        }
        m.write("etc/kiln/network.conf", &kiln::provision::network_conf(&p.network));
        m.write("etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tdemo\n");
        m.write("proc/cmdline", &format!("console=ttyS0 quiet {cmdline}\n"));
        m.write("sys/class/net/lo/address", "00:00:00:00:00:00\n");
        for (name, mac) in nics {
            m.write(&format!("sys/class/net/{name}/address"), &format!("{mac}\n"));
        }
        // A stand-in for `hostname NAME` that records the name.
        m.write_mode("bin/hostname", "#!/bin/sh\necho \"$1\" > \"$KILN_ROOT/hostname-set\"\n", 0o755);
        m
    }

    #[test]
    fn kernel_command_line_wins_over_the_mac() {
        let m = cluster_root("kiln.node=e2", &[("eth0", "52:54:00:00:00:01")]);
        let (ok, out) = m.boot_step(IDENTITY_STEP);
        assert!(ok, "{out}");
        assert_eq!(out.trim_end(), "[kiln] identity: node=e2 roles=etcd,server by=cmdline");
        assert!(m.read("etc/rancher/k3s/config.yaml").contains("node-name: \"e2\"\n"));
        assert_eq!(m.mode("etc/rancher/k3s/config.yaml"), 0o600);
        assert!(m.read("etc/kiln/etcd.env").contains("ETCD_NAME=e2\n"));
        // e2's own TLS files, as etcd.env and config.yaml name them: keys 0600, certificates 0644.
        let mut tls: Vec<(String, u32)> = std::fs::read_dir(m.path().join("etc/kiln/etcd"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .map(|n| {
                let mode = m.mode(&format!("etc/kiln/etcd/{n}"));
                (n, mode)
            })
            .collect();
        tls.sort();
        let want: Vec<(String, u32)> = [
            ("ca.crt", 0o644),
            ("client.crt", 0o644),
            ("client.key", 0o600),
            ("peer.crt", 0o644),
            ("peer.key", 0o600),
            ("server.crt", 0o644),
            ("server.key", 0o600),
        ]
        .iter()
        .map(|(n, m)| (n.to_string(), *m))
        .collect();
        assert_eq!(tls, want);
        assert_eq!(m.mode("etc/kiln/etcd"), 0o755);
        for f in ["ca.crt", "server.key", "client.key"] {
            assert_eq!(m.read(&format!("etc/kiln/etcd/{f}")), m.read(&format!("etc/kiln/nodes/e2/etcd/{f}")), "{f}");
        }
        let cfg = m.read("etc/rancher/k3s/config.yaml");
        assert!(cfg.contains("datastore-keyfile: \"/etc/kiln/etcd/client.key\"\n"), "{cfg}");
        assert_eq!(m.read("etc/hostname"), "e2\n");
        assert_eq!(m.read("hostname-set"), "e2\n");
        assert!(m.read("etc/hosts").contains("127.0.1.1\te2\n"));
        let net = m.read("run/kiln/network.conf");
        assert!(net.contains("\nstatic eth0 10.0.0.12/24 -\ndns 10.0.0.1\n") && !net.contains("dhcp-all"), "{net}");
        assert!(m.read("run/kiln/node.conf").contains("KILN_NODE_BY=\"cmdline\""));
    }

    #[test]
    fn any_nic_with_an_inventory_mac_names_the_node() {
        let m = cluster_root("", &[("eth0", "52:54:00:99:99:99"), ("eth1", "52:54:00:00:00:01")]);
        let (ok, out) = m.boot_step(IDENTITY_STEP);
        assert!(ok, "{out}");
        assert_eq!(out.trim_end(), "[kiln] identity: node=e1 roles=etcd,server by=mac");
        let net = m.read("run/kiln/network.conf");
        assert!(net.contains("\nstatic eth1 10.0.0.11/24 10.0.0.1\n"), "the address goes on the NIC that matched: {net}");
        // A later boot as an agent (no static address, no etcd) drops the etcd files.
        std::fs::write(m.path().join("sys/class/net/eth1/address"), "52:54:00:00:00:14\n").unwrap();
        let (ok, out) = m.boot_step(IDENTITY_STEP);
        assert!(ok, "{out}");
        assert_eq!(out.trim_end(), "[kiln] identity: node=a1 roles=agent by=mac");
        assert!(!m.exists("etc/kiln/etcd.env") && !m.exists("run/kiln/network.conf"));
        assert!(!m.exists("etc/kiln/etcd"), "an agent keeps no etcd keys of its former identity");
        assert!(m.read("etc/rancher/k3s/config.yaml").contains("server: \"https://10.0.0.10:6443\"\n"));
    }

    #[test]
    fn unknown_machines_take_the_default_role_and_a_mac_name() {
        let m = cluster_root("", &[("enp1s0", "52:54:00:ab:cd:01"), ("eth9", "52:54:00:00:00:77")]);
        let (ok, out) = m.boot_step(IDENTITY_STEP);
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
            let m = cluster_root(bad, &[("eth0", "52:54:00:00:00:01")]);
            let (ok, out) = m.boot_step(IDENTITY_STEP);
            assert!(!ok, "{bad}: {out}");
            let line = out.lines().next().unwrap_or_default();
            assert!(line.starts_with("[kiln] error: identity: ") && line.contains("known nodes: e1 e2 e3 a1"), "{bad}: {out}");
            assert!(!m.exists("etc/rancher/k3s/config.yaml"));
        }
    }

    /// The cluster overlay's `etcd-run` after the identity step: it hands the member's keys to
    /// the etcd account and starts etcd (a stand-in) only when etcd.env sets up TLS completely.
    #[test]
    fn etcd_run_starts_a_member_only_with_its_tls_files() {
        let cluster = super::overlay("cluster");
        let run = |m: &FakeRoot| m.sh([cluster.join("usr/lib/kiln/etcd-run")]);
        let setup = || {
            let m = cluster_root("kiln.node=e1", &[("eth0", "52:54:00:00:00:01")]);
            let (ok, out) = m.boot_step(IDENTITY_STEP);
            assert!(ok, "{out}");
            let lib = std::fs::read_to_string(super::overlay("appliance").join("usr/lib/kiln/lib.sh")).unwrap();
            m.write_mode("usr/lib/kiln/lib.sh", &lib, 0o644);
            m.write_mode("usr/lib/kiln/logpipe", "#!/bin/sh\ncat >> \"$1\"\n", 0o755);
            m.write_mode("bin/chown", "#!/bin/sh\necho \"$*\" >> \"$KILN_ROOT/chowned\"\n", 0o755);
            m.write_mode("bin/start-stop-daemon", "#!/bin/sh\necho \"etcd started: $*\"\n", 0o755);
            m.write_mode("bin/sleep", "#!/bin/sh\necho \"$*\" > \"$KILN_ROOT/slept\"\n", 0o755);
            m
        };
        let m = setup();
        let (ok, out) = run(&m);
        assert!(ok, "{out}");
        assert_eq!(out, "[kiln] etcd: starting member e1, joining the initial cluster (log /var/log/etcd.log)\n");
        assert!(m.read("var/log/etcd.log").contains("etcd started: -S -c etcd:etcd -x /usr/bin/etcd\n"));
        let root = m.path().display().to_string();
        let chowned = m.read("chowned");
        assert!(chowned.contains(&format!("etcd:etcd {root}/etc/kiln/etcd/server.key {root}/etc/kiln/etcd/peer.key\n")), "{chowned}");
        assert!(!chowned.contains("client.key"), "the k3s server's client key stays root's: {chowned}");
        assert_eq!((m.mode("etc/kiln/etcd/server.key"), m.mode("etc/kiln/etcd/peer.key")), (0o600, 0o600));

        // Without client certificate checks, or without a key file, no etcd.
        for (broken, why) in
            [("ETCD_CLIENT_CERT_AUTH=true", "does not require client certificates"), ("ETCD_PEER_KEY_FILE=", "ETCD_PEER_KEY_FILE")]
        {
            let m = setup();
            let env = m.read("etc/kiln/etcd.env");
            let env: String = env.lines().filter(|l| !l.starts_with(broken)).map(|l| format!("{l}\n")).collect();
            m.write("etc/kiln/etcd.env", &env);
            let (ok, out) = run(&m);
            assert!(ok && out.starts_with("[kiln] etcd: not started: ") && out.contains(why), "{broken}: {out}");
            assert_eq!(m.read("slept"), "2147483647\n");
            assert!(!m.exists("var/log/etcd.log"), "{broken}: etcd was started");
        }
        let m = setup();
        std::fs::remove_file(m.path().join("etc/kiln/etcd/server.key")).unwrap();
        let (_, out) = run(&m);
        assert!(out.contains("ETCD_KEY_FILE names /etc/kiln/etcd/server.key, which is missing"), "{out}");
    }

    #[test]
    fn images_without_a_cluster_say_so() {
        let m = cluster_root("", &[("eth0", "52:54:00:00:00:01")]);
        std::fs::remove_file(m.path().join("etc/kiln/cluster.conf")).unwrap();
        let (ok, out) = m.boot_step(IDENTITY_STEP);
        assert!(ok && out.trim_end() == "[kiln] identity: no cluster in this image", "{out}");
    }
}

/// The cluster overlay's `k3s-run`: the supervisor init respawns, running k3s as this node's role.
mod k3s_run {
    use super::{overlay, FakeRoot};

    /// Runs the cluster overlay's `k3s-run` against a root with `node.conf` holding `roles`
    /// (`None`: no node.conf). The root's `/usr/local/bin/k3s` is a stand-in script that only
    /// records its arguments: this checks which command the supervisor runs and where output goes,
    /// not k3s.
    fn run_supervisor(roles: Option<&str>) -> (String, FakeRoot) {
        let cluster = overlay("cluster");
        let m = FakeRoot::new();
        m.write_mode("usr/lib/kiln/lib.sh", &std::fs::read_to_string(overlay("appliance").join("usr/lib/kiln/lib.sh")).unwrap(), 0o644);
        for script in ["health.sh", "logpipe"] {
            m.write_mode(
                &format!("usr/lib/kiln/{script}"),
                &std::fs::read_to_string(cluster.join("usr/lib/kiln").join(script)).unwrap(),
                0o755,
            );
        }
        m.write_mode("usr/local/bin/k3s", "#!/bin/sh\necho \"stand-in binary called with: $*\"\n", 0o755);
        // An etcd member's k3s waits for the local member's /health on its loopback metrics
        // listener (here: a stand-in wget); the client port would want a client certificate.
        m.write_mode(
            "etc/kiln/etcd.env",
            "ETCD_LISTEN_CLIENT_URLS=https://10.0.0.11:2379,https://127.0.0.1:2379\nETCD_LISTEN_METRICS_URLS=http://127.0.0.1:2381\n",
            0o644,
        );
        m.write_mode(
            "bin/wget",
            "#!/bin/sh\necho \"$*\" >> \"$KILN_ROOT/wget-args\"\necho '{\"health\":\"true\",\"reason\":\"\"}'\n",
            0o755,
        );
        m.write_mode("bin/sleep", "#!/bin/sh\necho \"$*\" > \"$KILN_ROOT/slept\"\n", 0o755);
        if let Some(r) = roles {
            m.write_mode("run/kiln/node.conf", &format!("KILN_NODE_NAME=\"n1\"\nKILN_NODE_ROLES=\"{r}\"\n"), 0o644);
        }
        let (ok, out) = m.sh([cluster.join("usr/lib/kiln/k3s-run")]);
        assert!(ok, "{out}");
        (out, m)
    }

    #[test]
    fn supervisor_runs_the_nodes_role_with_output_in_the_log() {
        for (roles, role) in [("server", "server"), ("etcd server", "server"), ("agent", "agent")] {
            let (out, m) = run_supervisor(Some(roles));
            let waited = if roles.contains("etcd") {
                "[kiln] k3s: the local etcd member before starting k3s: member healthy, cluster has quorum\n"
            } else {
                ""
            };
            assert_eq!(out, format!("{waited}[kiln] k3s: starting {role} (log /var/log/k3s.log)\n"), "{roles}");
            let asked = std::fs::read_to_string(m.path().join("wget-args")).unwrap_or_default();
            assert_eq!(asked.contains("http://127.0.0.1:2381/health"), roles.contains("etcd"), "{asked}");
            let log = m.read("var/log/k3s.log");
            assert!(log.contains(&format!("k3s-run: starting k3s {role}\n")), "{log}");
            assert!(log.ends_with(&format!("stand-in binary called with: {role}\n")), "{log}");
            assert!(!m.exists("slept"));
        }
    }

    #[test]
    fn supervisor_without_a_k3s_role_logs_once_and_sleeps() {
        for roles in [Some("etcd"), Some(""), None] {
            let (out, m) = run_supervisor(roles);
            assert_eq!(out.lines().count(), 1, "{out}");
            assert!(out.starts_with("[kiln] k3s: not started: "), "{out}");
            assert_eq!(m.read("slept"), "2147483647\n");
            assert!(!m.exists("var/log/k3s.log"));
        }
    }
}
