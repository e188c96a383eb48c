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

/// The host's busybox, if it has one.
fn busybox() -> Option<&'static str> {
    ["/usr/bin/busybox", "/bin/busybox"].into_iter().find(|p| Path::new(p).exists())
}

/// busybox sh as on the device when the host has it, else the host's POSIX sh.
fn shell() -> Command {
    match busybox() {
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
        self.sh_env(&[], args)
    }

    /// [`FakeRoot::sh`] with more environment variables.
    fn sh_env<I, S>(&self, env: &[(&str, &str)], args: I) -> (bool, String)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let path = format!("{}:{}", self.path().join("bin").display(), std::env::var("PATH").unwrap_or_default());
        let out = shell().args(args).env("KILN_ROOT", self.path()).env("PATH", path).envs(env.iter().copied()).output().unwrap();
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
        let secrets = Secrets { token: Token::new("t0ken").unwrap(), pki: pki::load_or_create(c, keep.path()).unwrap(), rollout: None };
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
        assert!(out.starts_with("[kiln] etcd: starting member e1, joining the initial cluster (log /var/log/etcd.log)\n"), "{out}");
        // The stand-in etcd exits at once: the supervisor says so, with the log's last lines.
        assert!(out.contains("[kiln] etcd: exited with status 0 after 0s; last lines of /var/log/etcd.log:\n"), "{out}");
        assert!(
            out.ends_with("[kiln] etcd: | etcd started: -S -c etcd:etcd -x /usr/bin/etcd\n[kiln] etcd: starting again in 1s\n"),
            "{out}"
        );
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
            let dir = if script == "logpipe" { overlay("appliance") } else { cluster.clone() };
            m.write_mode(
                &format!("usr/lib/kiln/{script}"),
                &std::fs::read_to_string(dir.join("usr/lib/kiln").join(script)).unwrap(),
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
        m.write("proc/uptime", "100.52 180.11\n");
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
            let exited = format!(
                "k3s-run: starting k3s {role}\n[kiln] k3s: | stand-in binary called with: {role}\n[kiln] k3s: starting again in 1s\n"
            );
            assert!(out.contains("[kiln] k3s: exited with status 0 after 0s; last lines of /var/log/k3s.log:\n"), "{out}");
            assert!(out.starts_with(&format!("{waited}[kiln] k3s: starting {role} (log /var/log/k3s.log)\n")), "{roles}: {out}");
            assert!(out.ends_with(&exited), "{roles}: {out}");
            let asked = std::fs::read_to_string(m.path().join("wget-args")).unwrap_or_default();
            assert_eq!(asked.contains("http://127.0.0.1:2381/health"), roles.contains("etcd"), "{asked}");
            let log = m.read("var/log/k3s.log");
            assert!(log.contains(&format!("k3s-run: starting k3s {role}\n")), "{log}");
            assert!(log.ends_with(&format!("stand-in binary called with: {role}\n")), "{log}");
            assert_eq!(m.read("slept"), "1\n", "a backoff before init restarts it");
        }
    }

    /// A role that needs room warns when the data partition is smaller (an image booted without
    /// growing its disk), and stays quiet when it is large enough.
    #[test]
    fn a_small_data_partition_is_named_on_the_console() {
        let m = FakeRoot::new();
        let lib = overlay("appliance").join("usr/lib/kiln/lib.sh");
        let df = |kib: u64| {
            format!(
                "#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted on'\necho \"/dev/vda4 {kib} 10 10 1% /var/lib\"\n"
            )
        };
        m.write_mode("bin/df", &df(65536), 0o755);
        let script = format!(". {}; kiln_need_space etcd 512", lib.display());
        let (ok, out) = m.sh(["-c", script.as_str()]);
        assert!(ok, "{out}");
        assert!(out.starts_with("[kiln] etcd: warning: the data partition (/var/lib) holds 64 MiB; etcd needs at least 512 MiB"), "{out}");
        m.write_mode("bin/df", &df(8 << 20), 0o755);
        let (ok, out) = m.sh(["-c", script.as_str()]);
        assert!(ok && out.is_empty(), "{out}");
        // The bundled images: three times the archive plus 256 MiB (a 10 MiB archive: 289 MiB).
        // `archive=keep` and the echo: the helper must not overwrite its caller's variables
        // (images-import keeps the archive's path in `archive`).
        let images = format!(". {}; archive=keep; kiln_need_images_space images; [ \"$archive\" = keep ] || echo clobbered", lib.display());
        m.write_mode("bin/df", &df(65536), 0o755);
        let (ok, out) = m.sh(["-c", images.as_str()]);
        assert!(ok && out.is_empty(), "no archive, no warning: {out}");
        m.write("usr/lib/kiln/images/kiln-images-amd64.tar.zst", &"x".repeat(10 << 20));
        m.write("usr/lib/kiln/images/kiln-images-amd64.tar.zst.sha256", "abc\n");
        let (ok, out) = m.sh(["-c", images.as_str()]);
        assert!(ok && out == "[kiln] images: warning: the data partition (/var/lib) holds 64 MiB; images needs at least 289 MiB: give the image a larger disk (the data partition grows to fill it on first boot)\n", "{out}");
        m.write_mode("bin/df", &df(8 << 20), 0o755);
        let (ok, out) = m.sh(["-c", images.as_str()]);
        assert!(ok && out.is_empty(), "{out}");
    }

    /// A site service with `restart: no` (or `on-failure` after a clean exit) is reported once
    /// and then left alone: the script idles instead of returning to init.
    #[test]
    fn site_services_follow_their_restart_policy() {
        for (policy, exit, restarts) in [("no", 3, false), ("on-failure", 0, false), ("on-failure", 3, true), ("always", 0, true)] {
            let m = FakeRoot::new();
            let lib = overlay("appliance").join("usr/lib/kiln/lib.sh");
            m.write_mode(
                "usr/lib/kiln/logpipe",
                &std::fs::read_to_string(overlay("appliance").join("usr/lib/kiln/logpipe")).unwrap(),
                0o755,
            );
            m.write_mode("bin/sleep", "#!/bin/sh\necho \"$*\" >> \"$KILN_ROOT/slept\"\n", 0o755);
            m.write("proc/uptime", "5.00 9.00\n");
            let script = format!(
                ". {}; KILN_RESTART={policy} kiln_supervise agent \"$KILN_ROOT/agent.log\" sh -c 'echo working; exit {exit}'",
                lib.display()
            );
            let (ok, out) = m.sh(["-c", script.as_str()]);
            assert!(ok, "{out}");
            assert!(
                out.contains(&format!("[kiln] agent: exited with status {exit} after 0s")) && out.contains("[kiln] agent: | working\n"),
                "{out}"
            );
            if restarts {
                assert!(out.contains("[kiln] agent: starting again in 1s"), "{policy}: {out}");
                assert_eq!(m.read("slept"), "1\n");
            } else {
                assert!(out.contains(&format!("[kiln] agent: not started again (restart: {policy})")), "{policy}: {out}");
                assert_eq!(m.read("slept"), "2147483647\n", "{policy}: idles for good");
            }
        }
    }

    /// kiln's own long-running programs (dropbear, chronyd) run under `supervise`: an exit puts
    /// the program's status (not tee's, with `--console`) and its log's last lines on the console,
    /// the output lands in `/var/log/NAME.log`, and with `--console` it is copied to the console.
    #[test]
    fn dropbear_and_chronyd_exits_are_reported_with_their_logs() {
        for console in [false, true] {
            let m = FakeRoot::new();
            for script in ["lib.sh", "logpipe"] {
                let text = std::fs::read_to_string(overlay("appliance").join("usr/lib/kiln").join(script)).unwrap();
                m.write_mode(&format!("usr/lib/kiln/{script}"), &text, 0o755);
            }
            m.write_mode("bin/sleep", "#!/bin/sh\necho \"$*\" >> \"$KILN_ROOT/slept\"\n", 0o755);
            m.write("proc/uptime", "5.00 9.00\n");
            let supervise = overlay("appliance").join("usr/lib/kiln/supervise");
            let console_file = m.path().join("console");
            let mut args = vec![supervise.display().to_string()];
            if console {
                args.push("--console".into());
            }
            args.extend(["chronyd", "sh", "-c", "echo Selected source 10.0.2.2; exit 7"].map(String::from));
            let script = format!("KILN_CONSOLE={} sh \"$@\"", console_file.display());
            let (ok, out) = m.sh([&["-c".to_string(), script, "supervise-test".into()][..], &args[..]].concat());
            assert!(ok, "{out}");
            assert!(out.contains("[kiln] chronyd: exited with status 7 after 0s"), "console={console}: {out}");
            assert!(out.contains("[kiln] chronyd: | Selected source 10.0.2.2\n"), "console={console}: {out}");
            assert!(out.contains("[kiln] chronyd: starting again in 1s"), "{out}");
            assert_eq!(m.read("var/log/chronyd.log"), "Selected source 10.0.2.2\n");
            let copied = std::fs::read_to_string(&console_file).unwrap_or_default();
            assert_eq!(copied == "Selected source 10.0.2.2\n", console, "console copy: {copied:?}");
        }
    }

    /// A k3s that keeps failing at once: each exit puts its status and the log's last lines on
    /// the console, and the wait before the next start doubles (1, 2, 4 s ...), capped at 60 s.
    #[test]
    fn a_failing_service_says_why_and_backs_off() {
        let cluster = overlay("cluster");
        let m = FakeRoot::new();
        m.write_mode("usr/lib/kiln/lib.sh", &std::fs::read_to_string(overlay("appliance").join("usr/lib/kiln/lib.sh")).unwrap(), 0o644);
        for script in ["health.sh", "logpipe"] {
            let dir = if script == "logpipe" { overlay("appliance") } else { cluster.clone() };
            let text = std::fs::read_to_string(dir.join("usr/lib/kiln").join(script)).unwrap();
            m.write_mode(&format!("usr/lib/kiln/{script}"), &text, 0o755);
        }
        let k3s = "#!/bin/sh\nfor i in 1 2 3 4 5 6 7; do echo \"line $i\"; done\necho 'fatal: no space left on device'\nexit 3\n";
        m.write_mode("usr/local/bin/k3s", k3s, 0o755);
        m.write_mode("bin/sleep", "#!/bin/sh\necho \"$*\" >> \"$KILN_ROOT/slept\"\n", 0o755);
        m.write("proc/uptime", "42.00 80.00\n");
        m.write_mode("run/kiln/node.conf", "KILN_NODE_NAME=\"n1\"\nKILN_NODE_ROLES=\"agent\"\n", 0o644);
        for _ in 0..8 {
            let (ok, out) = m.sh([cluster.join("usr/lib/kiln/k3s-run")]);
            assert!(ok, "{out}");
            assert!(out.contains("[kiln] k3s: exited with status 3 after 0s; last lines of /var/log/k3s.log:\n"), "{out}");
            assert!(out.contains("[kiln] k3s: | line 7\n[kiln] k3s: | fatal: no space left on device\n"), "{out}");
            assert!(!out.contains("| line 3\n"), "only the last 5 lines: {out}");
        }
        assert_eq!(m.read("slept"), "1\n2\n4\n8\n16\n32\n60\n60\n");
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

/// The installer (`overlays/initramfs/lib/kiln/install.sh`): which disks it takes, and the order
/// and bounds of its writes. Its functions run against a fake `/sys`, `/dev` (disks are sparse
/// files) and `/run`, with `/init`'s own helpers stood in by [`INIT_STAND_INS`] and the real
/// `fail` (`lib/kiln/fail.sh`); `sleep`, `reboot`, `sgdisk`, `blockdev` and `wget` are stand-ins
/// that record what they were asked.
mod installer {
    use std::ffi::OsStr;

    use super::{overlay, FakeRoot};

    const MIB: u64 = 1 << 20;
    const DISK_MIB: u64 = 64;

    /// `/init`'s helpers that install.sh uses: the console line, device nodes (the fake disks
    /// are files already) and partitions by name (the fake medium's are files named after them).
    const INIT_STAND_INS: &str = "log() { echo \"[kiln] $*\"; }\nensure_node() { :; }\npartition_named() { echo \"$1-$2\"; }\n";

    /// A root with disk `vdb` (64 MiB, blank), the plan `plan` and the stand-in commands.
    fn root(plan: &str) -> FakeRoot {
        let m = FakeRoot::new();
        m.write("sys/block/vdb/size", &format!("{}\n", DISK_MIB * MIB / 512));
        m.write("sys/block/vdb/removable", "0\n");
        m.write("sys/block/vdb/ro", "0\n");
        std::fs::create_dir_all(m.path().join("sys/class/block")).unwrap();
        std::os::unix::fs::symlink("../../block/vdb", m.path().join("sys/class/block/vdb")).unwrap();
        std::fs::create_dir_all(m.path().join("dev")).unwrap();
        std::fs::File::create(m.path().join("dev/vdb")).unwrap().set_len(DISK_MIB * MIB).unwrap();
        std::fs::create_dir_all(m.path().join("proc/sys/vm")).unwrap();
        m.write("run/kiln-install.plan", plan);
        m.write_mode("bin/sleep", "#!/bin/sh\necho \"sleep $*\" >> \"$KILN_ROOT/calls\"\n", 0o755);
        m.write_mode("bin/reboot", "#!/bin/sh\necho \"reboot $*\" >> \"$KILN_ROOT/calls\"\n", 0o755);
        m.write_mode("bin/blockdev", "#!/bin/sh\n", 0o755);
        m.write_mode("sbin/sgdisk", "#!/bin/sh\necho \"sgdisk $*\" >> \"$KILN_ROOT/calls\"\n", 0o755);
        m
    }

    /// A partition of the fake `vdb` with GPT name `name`.
    fn partition(m: &FakeRoot, n: u32, name: &str) {
        m.write(
            &format!("sys/block/vdb/vdb{n}/uevent"),
            &format!("MAJOR=254\nMINOR={n}\nDEVNAME=vdb{n}\nDEVTYPE=partition\nPARTN={n}\nPARTNAME={name}\n"),
        );
    }

    fn plan(deployment: &str, wipe: bool) -> String {
        format!(
            "kiln-install=1\nimage=abc\ndeployment={deployment}\ntarget=auto\nmin_size={}\nwipe={}\nafter=poweroff\nend=1\n",
            32 * MIB,
            u8::from(wipe)
        )
    }

    /// Runs `script` after sourcing fail.sh and install.sh (with `/init`'s stand-ins).
    fn run(m: &FakeRoot, script: &str) -> (bool, String) {
        let initramfs = overlay("initramfs");
        let fail = initramfs.join("lib/kiln/fail.sh");
        let install = initramfs.join("lib/kiln/install.sh");
        let text = format!("set -eu\n{INIT_STAND_INS}. \"$1\"\n. \"$2\"\nMEDIUM=\"\"\n{script}");
        m.sh([OsStr::new("-c"), OsStr::new(&text), OsStr::new("install-test"), fail.as_os_str(), install.as_os_str()])
    }

    fn calls(m: &FakeRoot) -> String {
        std::fs::read_to_string(m.path().join("calls")).unwrap_or_default()
    }

    /// `select_target` on the fake `vdb`: what it printed, and whether it chose it.
    fn select(m: &FakeRoot) -> (String, bool) {
        let (_, out) = run(m, "select_target\necho \"chosen=$TARGET\"\n");
        let chosen = out.contains("chosen=vdb");
        (out, chosen)
    }

    #[test]
    fn blank_disks_and_kiln_disks_of_the_same_deployment_are_taken_without_wipe() {
        let m = root(&plan("lab-7", false));
        let (out, chosen) = select(&m);
        assert!(chosen && !out.contains("error"), "blank disk: {out}");

        let m = root(&plan("lab-7", false));
        partition(&m, 1, "esp@lab-7");
        partition(&m, 2, "kiln-root-a");
        partition(&m, 3, "kiln-root-b");
        partition(&m, 4, "kiln-data");
        let (out, chosen) = select(&m);
        assert!(chosen && !out.contains("error") && !out.contains("wipe"), "same deployment: {out}");
        assert_eq!(calls(&m), "", "nothing rebooted, nothing written");
    }

    #[test]
    fn a_kiln_disk_of_another_deployment_is_refused_without_wipe_and_taken_with_it() {
        for wipe in [false, true] {
            let m = root(&plan("lab-7", wipe));
            partition(&m, 1, "esp@plant-2");
            partition(&m, 2, "kiln-root-a");
            partition(&m, 4, "kiln-data");
            let (out, chosen) = select(&m);
            let said = "/dev/vdb holds a kiln system of another deployment (plant-2; this image is deployment lab-7)";
            assert!(out.contains(said), "wipe={wipe}: {out}");
            if wipe {
                assert!(chosen && out.contains("install.wipe is set: overwriting it") && !out.contains("error"), "{out}");
            } else {
                assert!(!chosen, "{out}");
                let error = out.lines().find(|l| l.starts_with("[kiln] error: install: ")).unwrap_or_else(|| panic!("{out}"));
                assert!(error.contains(said) && error.contains("Set install.wipe: true") && error.contains("vdb 64 MiB"), "{error}");
                assert!(!out.contains("dropping to a shell"), "no console shell by default: {out}");
                assert!(out.contains("rebooting in 30 s"), "{out}");
                assert_eq!(calls(&m), "sleep 30\nreboot -f\nsleep 2147483647\n");
            }
        }
        // A kiln disk from before deployments were recorded (the ESP named plain `esp`).
        let m = root(&plan("lab-7", false));
        partition(&m, 1, "esp");
        partition(&m, 2, "kiln-root-a");
        let (out, chosen) = select(&m);
        assert!(!chosen && out.contains("/dev/vdb holds a kiln system that records no deployment"), "{out}");
    }

    #[test]
    fn disks_with_other_data_are_refused_without_wipe() {
        let m = root(&plan("lab-7", false));
        partition(&m, 1, "precious");
        let (out, chosen) = select(&m);
        assert!(!chosen && out.contains("/dev/vdb holds data that is not a kiln system (it has partitions: vdb1)"), "{out}");

        // No table, but bytes in the last MiB (e.g. a RAID superblock).
        let m = root(&plan("lab-7", false));
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::OpenOptions::new().write(true).open(m.path().join("dev/vdb")).unwrap();
            f.seek(SeekFrom::Start(DISK_MIB * MIB - 4096)).unwrap();
            f.write_all(b"superblock").unwrap();
        }
        let (out, chosen) = select(&m);
        assert!(!chosen && out.contains("holds data that is not a kiln system (its last MiB is not blank)"), "{out}");
        let m2 = root(&plan("lab-7", true));
        std::fs::copy(m.path().join("dev/vdb"), m2.path().join("dev/vdb")).unwrap();
        let (out, chosen) = select(&m2);
        assert!(chosen, "wipe takes it: {out}");
    }

    /// A plan copying `ranges` (name, bytes) to 1 MiB, 8 MiB, ... of the target; the served (or
    /// medium) bytes are `served`, which may differ from what the plan's digests say.
    fn write_and_verify(network: bool, ranges: &[(&str, Vec<u8>)], served: &[Vec<u8>]) -> (FakeRoot, bool, String) {
        use sha2::Digest;
        let mut text = plan("lab-7", false).replace("end=1\n", "");
        text.push_str("sgdisk=--clear --disk-guid=G --new=1:2048:4095 --change-name=1:esp@lab-7\n");
        for (i, (name, bytes)) in ranges.iter().enumerate() {
            let sha = hex::encode(sha2::Sha256::digest(bytes));
            text.push_str(&format!("copy={name} src{i} 0 {} {} {sha}\n", (1 + 7 * i as u64) * MIB, bytes.len()));
        }
        text.push_str("end=1\n");
        let m = root(&text);
        for (i, bytes) in served.iter().enumerate() {
            // The network path fetches srv/srcN, the USB path reads the medium's partition.
            let name = if network { format!("srv/src{i}") } else { format!("dev/vda-src{i}") };
            m.write(&name, "");
            std::fs::write(m.path().join(name), bytes).unwrap();
        }
        m.write_mode("bin/wget", "#!/bin/sh\nfor last; do :; done\ncat \"$KILN_ROOT/srv/${last#http://server/}\"\n", 0o755);
        let setup = if network { "INSTALL_URL=http://server/\nMEDIUM=vda\n" } else { "INSTALL_URL=\"\"\nMEDIUM=vda\n" };
        let (ok, out) = run(&m, &format!("{setup}TARGET=vdb\nwrite_system\nverify_system\necho installed\n"));
        (m, ok && out.contains("installed"), out)
    }

    #[test]
    fn the_partition_table_is_written_only_after_every_range_verified() {
        let esp = vec![0xe5u8; (MIB + 123) as usize];
        let root_fs = vec![0x5au8; (3 * MIB + 7) as usize];
        for network in [false, true] {
            let (m, ok, out) =
                write_and_verify(network, &[("esp", esp.clone()), ("kiln-root-a", root_fs.clone())], &[esp.clone(), root_fs.clone()]);
            assert!(ok, "network={network}: {out}");
            let calls = calls(&m);
            let lines: Vec<&str> = calls.lines().collect();
            assert_eq!(lines.len(), 2, "{calls}");
            assert!(lines[0].starts_with("sgdisk --zap-all "), "the old table goes first: {calls}");
            assert!(lines[1].starts_with("sgdisk --clear --disk-guid=G "), "the new table comes last: {calls}");
            let verified = out.find("[kiln] install: verified kiln-root-a").unwrap_or_else(|| panic!("{out}"));
            assert!(out.find("[kiln] install: partition table written").unwrap() > verified, "{out}");
            let disk = std::fs::read(m.path().join("dev/vdb")).unwrap();
            assert_eq!(&disk[MIB as usize..][..esp.len()], &esp[..]);
            assert_eq!(&disk[8 * MIB as usize..][..root_fs.len()], &root_fs[..]);
        }
    }

    #[test]
    fn an_oversized_or_tampered_source_writes_nothing_past_its_length_and_no_table() {
        let esp = vec![0xe5u8; (MIB + 123) as usize];
        for network in [false, true] {
            // A source longer than the plan says: only the plan's length reaches the disk, and the
            // bytes written are the ones verified.
            let mut long = esp.clone();
            long.extend(vec![0xffu8; 3 * MIB as usize]);
            let (m, ok, out) = write_and_verify(network, &[("esp", esp.clone())], &[long]);
            assert!(ok, "network={network}: {out}");
            let disk = std::fs::read(m.path().join("dev/vdb")).unwrap();
            assert_eq!(&disk[MIB as usize..][..esp.len()], &esp[..]);
            assert!(
                disk[MIB as usize + esp.len()..].iter().all(|&b| b == 0),
                "network={network}: bytes past the plan's length were written"
            );

            // Different bytes: refused before any partition table is written.
            let mut bad = esp.clone();
            bad[1000] ^= 1;
            let (m, ok, out) = write_and_verify(network, &[("esp", esp.clone())], &[bad]);
            assert!(!ok && out.contains("[kiln] error: install: esp"), "network={network}: {out}");
            let calls = calls(&m);
            assert!(calls.starts_with("sgdisk --zap-all ") && !calls.contains("--clear"), "network={network}: {calls}");
        }
    }
}

/// The console policy: a failed step leaves no shell on the console unless the profile has
/// `debug.rescue_shell: true` (the build then writes the marker files these tests create).
mod console_policy {
    use std::ffi::OsStr;

    use super::{overlay, FakeRoot};

    /// A stand-in `sh` that records it was started (a console shell).
    fn with_shell_stand_in(m: &FakeRoot) {
        m.write_mode("bin/sh", "#!/bin/sh\necho \"shell $*\" >> \"$KILN_ROOT/calls\"\n", 0o755);
        m.write_mode("bin/sleep", "#!/bin/sh\necho \"sleep $*\" >> \"$KILN_ROOT/calls\"\n", 0o755);
        m.write_mode("bin/reboot", "#!/bin/sh\necho \"reboot $*\" >> \"$KILN_ROOT/calls\"\n", 0o755);
        m.write_mode("init", "#!/bin/sh\necho \"init again\" >> \"$KILN_ROOT/calls\"\n", 0o755);
    }

    fn initramfs_fail(m: &FakeRoot) -> String {
        let fail = overlay("initramfs").join("lib/kiln/fail.sh");
        let (_, out) = m.sh([
            OsStr::new("-c"),
            OsStr::new(". \"$1\"; fail 'root partition not found'; echo returned"),
            OsStr::new("t"),
            fail.as_os_str(),
        ]);
        out
    }

    #[test]
    fn the_initramfs_reboots_after_a_delay_without_a_shell_by_default() {
        let m = FakeRoot::new();
        with_shell_stand_in(&m);
        let out = initramfs_fail(&m);
        assert!(out.starts_with("[kiln] error: root partition not found\n"), "{out}");
        assert!(out.contains("[kiln] initramfs: no shell on the console (debug.rescue_shell is off); rebooting in 30 s"), "{out}");
        assert_eq!(m.read("calls"), "sleep 30\nreboot -f\nsleep 2147483647\n");
        assert!(!out.contains("returned"), "fail must not return to the failed step: {out}");
    }

    #[test]
    fn the_initramfs_rescue_shell_is_opt_in() {
        let m = FakeRoot::new();
        with_shell_stand_in(&m);
        m.write("lib/kiln/rescue-shell", "# debug.rescue_shell: true\n");
        let out = initramfs_fail(&m);
        assert!(out.contains("dropping to a shell (debug.rescue_shell)"), "{out}");
        assert_eq!(m.read("calls"), "shell \ninit again\n", "a shell, then /init again");
    }

    /// Runs the appliance's `boot` over three steps, the middle one failing.
    fn boot_with_a_failing_step(m: &FakeRoot) -> (bool, String) {
        let appliance = overlay("appliance");
        m.write("usr/lib/kiln/lib.sh", &std::fs::read_to_string(appliance.join("usr/lib/kiln/lib.sh")).unwrap());
        m.write("usr/lib/kiln/boot.d/10-first.sh", "kiln_log first ok\n");
        m.write("usr/lib/kiln/boot.d/35-identity.sh", "kiln_log identity about to fail\nfalse\nkiln_log identity not reached\n");
        m.write("usr/lib/kiln/boot.d/60-ssh.sh", "kiln_log ssh started\n");
        m.write("dev/console", "");
        std::fs::create_dir_all(m.path().join("run/kiln")).unwrap();
        m.sh([appliance.join("usr/lib/kiln/boot")])
    }

    #[test]
    fn a_failed_appliance_step_is_reported_the_rest_run_and_the_node_is_not_ready() {
        let m = FakeRoot::new();
        let (ok, out) = boot_with_a_failing_step(&m);
        assert!(ok, "{out}");
        let want = "[kiln] first: ok\n[kiln] identity: about to fail\n[kiln] error: boot step identity failed\n[kiln] no shell on the console (debug.rescue_shell is off): the error above stays here and in /run/kiln/status\n[kiln] ssh: started\n[kiln] boot: not ready: failed step(s): identity (errors above); the node reports ready only after a boot without errors\n";
        assert_eq!(out, want);
        assert!(!m.exists("run/kiln/booted"));
    }

    /// A profile's boot script (`boot_scripts`, written as `9NN-site-<name>.sh`) runs after
    /// kiln's steps and, when it fails, is named `site-<name>` on the console.
    #[test]
    fn a_failing_site_boot_script_is_named_and_the_node_is_not_ready() {
        let m = FakeRoot::new();
        m.write(
            "usr/lib/kiln/boot.d/900-site-net-check.sh",
            "kiln_log site-net-check probing
false
",
        );
        let (ok, out) = boot_with_a_failing_step(&m);
        assert!(ok, "{out}");
        assert!(
            out.contains("[kiln] ssh: started\n[kiln] site-net-check: probing\n[kiln] error: boot step site-net-check failed\n"),
            "{out}"
        );
        assert!(out.contains("failed step(s): identity site-net-check"), "{out}");
    }

    /// An update applied by a boot step (a KILN-UPDATE medium) reboots; init acts on it only
    /// after the boot sequence, which skips the remaining steps and reports no readiness.
    #[test]
    fn a_reboot_for_an_update_skips_the_remaining_steps() {
        let m = FakeRoot::new();
        m.write("usr/lib/kiln/boot.d/23-update.sh", "kiln_log update rebooting\n: > \"$KILN_ROOT/run/kiln/rebooting\"\n");
        let (ok, out) = boot_with_a_failing_step(&m);
        assert!(ok, "{out}");
        assert!(
            out.ends_with("[kiln] update: rebooting\n[kiln] boot: rebooting for an update; the remaining steps are skipped\n"),
            "{out}"
        );
        assert!(!out.contains("identity") && !out.contains("ssh") && !m.exists("run/kiln/booted"), "{out}");
    }

    #[test]
    fn the_appliance_rescue_shell_is_opt_in() {
        let m = FakeRoot::new();
        m.write("usr/lib/kiln/rescue-shell", "# debug.rescue_shell: true\n");
        // `boot` sets the system's PATH: the host's `sh` is the console shell here, reading the
        // fake console (empty) and leaving at once, like an operator typing `exit`.
        let (ok, out) = boot_with_a_failing_step(&m);
        assert!(ok, "{out}");
        assert!(out.contains("[kiln] boot paused: a root shell follows on the console (debug.rescue_shell)"), "{out}");
        assert!(out.contains("[kiln] ssh: started") && !out.contains("ready arch"), "{out}");
    }
}

/// `profiles/rancher-import/overlay/usr/local/sbin/rancher-import`, the rancher-import profile's
/// service: applies Rancher's import manifest once on a k3s server, never printing its URL.
mod rancher_import {
    use std::path::PathBuf;

    use super::FakeRoot;

    const URL: &str = "https://rancher.lan/v3/import/s3cr3ttoken_c-m-x1.yaml";

    fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../profiles/rancher-import/overlay/usr/local/sbin/rancher-import")
    }

    /// A root with the node's roles, the URL and CA files, and a stand-in `k3s` that records its
    /// arguments and SSL_CERT_FILE, answers `/readyz` when `api_up`, and fails `apply` quoting the
    /// URL when `apply_fails`.
    fn root(roles: &str, api_up: bool, apply_fails: bool) -> FakeRoot {
        let m = FakeRoot::new();
        m.write("run/kiln/node.conf", &format!("KILN_NODE_NAME=\"n1\"\nKILN_NODE_ROLES=\"{roles}\"\n"));
        m.write("etc/kiln/rancher-import.url", &format!("{URL}\n"));
        m.write("etc/kiln/rancher-ca.pem", "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n");
        let k3s = format!(
            "#!/bin/sh\necho \"$* ca=${{SSL_CERT_FILE:-none}}\" >> \"$KILN_ROOT/k3s-calls\"\ncase \"$*\" in\n  *readyz*) exit {} ;;\n  *apply*) {} ;;\nesac\n",
            if api_up { 0 } else { 1 },
            if apply_fails { "echo \"error: unable to read URL \\\"$4\\\", server reported 503\" >&2; exit 1" } else { "echo namespace/cattle-system created" }
        );
        m.write_mode("usr/local/bin/k3s", &k3s, 0o755);
        m
    }

    fn run(m: &FakeRoot) -> (bool, String) {
        m.sh([script()])
    }

    #[test]
    fn imports_once_on_a_server_and_never_prints_the_url() {
        let m = root("server", true, false);
        let (ok, out) = run(&m);
        assert!(ok && out.contains("imported into Rancher") && !out.contains("s3cr3ttoken"), "{out}");
        let calls = m.read("k3s-calls");
        let ca = m.path().join("etc/kiln/rancher-ca.pem");
        assert!(calls.contains(&format!("kubectl apply -f {URL} ca={}", ca.display())), "{calls}");
        assert!(m.exists("var/lib/kiln/rancher-imported"));
        // A second start (a reboot) does nothing.
        std::fs::remove_file(m.path().join("k3s-calls")).unwrap();
        let (ok, out) = run(&m);
        assert!(ok && out.contains("already imported") && !m.exists("k3s-calls"), "{out}");
    }

    #[test]
    fn failures_exit_non_zero_with_the_reason_and_without_the_token() {
        // Rancher unreachable: kubectl's message quotes the URL; the script prints it masked.
        let m = root("etcd server", true, true);
        let (ok, out) = run(&m);
        assert!(!ok && out.contains("unable to read URL \"<import URL>\"") && out.contains("is Rancher reachable"), "{out}");
        assert!(!out.contains("s3cr3ttoken") && !m.exists("var/lib/kiln/rancher-imported"), "{out}");
        // k3s's API not up yet: nothing applied.
        let m = root("server", false, false);
        let (ok, out) = run(&m);
        assert!(!ok && out.contains("waiting for the k3s API") && !m.read("k3s-calls").contains("apply"), "{out}");
        // The profile's placeholder left in: named, not sent anywhere.
        let m = root("server", true, false);
        m.write("etc/kiln/rancher-import.url", "REPLACE ME\n");
        let (ok, out) = run(&m);
        assert!(!ok && out.contains("vars.rancher_import_url") && !m.exists("k3s-calls"), "{out}");
    }

    #[test]
    fn agents_have_nothing_to_do() {
        let m = root("agent", true, false);
        let (ok, out) = run(&m);
        assert!(ok && out.contains("is not a k3s server") && !m.exists("k3s-calls"), "{out}");
    }
}

/// `usr/sbin/kiln-update`: A/B updates on the device. A fake disk `vda` (ESP, slot A, slot B with
/// a GPT that names slot B's GUID), the running slot on the command line, the ESP's files in
/// `run/kiln/esp`, and bundles signed with the host's `minisign` (Debian package `minisign`).
/// Every refusal must leave slot B's bytes and the ESP as they were.
mod update {
    use std::path::Path;
    use std::process::Command;

    use super::{overlay, FakeRoot};

    const MIB: usize = 1 << 20;
    const SLOT_B: usize = 4 * MIB;
    const GUID_B: &str = "0a1b2c3d-4e5f-4061-8273-8495a6b7c8d9";

    /// A minisign key pair in `dir`: (public key file, secret key file).
    fn keypair(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let (p, s) = (dir.join(format!("{name}.pub")), dir.join(format!("{name}.key")));
        let out = Command::new("minisign")
            .args(["-G", "-W", "-f", "-p"])
            .arg(&p)
            .arg("-s")
            .arg(&s)
            .output()
            .expect("running minisign (install the Debian package `minisign`)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (p, s)
    }

    /// The GPT bytes kiln-update reads: header at LBA 1 (entries at LBA 2, 128 bytes each) and
    /// partition 3's unique GUID in its mixed-endian on-disk form.
    fn gpt_disk(guid: &str) -> Vec<u8> {
        let mut d = vec![0u8; 64 * 1024];
        d[512..520].copy_from_slice(b"EFI PART");
        d[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        d[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        let h = guid.replace('-', "");
        let b: Vec<u8> = (0..16).map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap()).collect();
        let mut on_disk = Vec::new();
        on_disk.extend(b[0..4].iter().rev());
        on_disk.extend(b[4..6].iter().rev());
        on_disk.extend(b[6..8].iter().rev());
        on_disk.extend(&b[8..16]);
        let at = 2 * 512 + 2 * 128 + 16;
        d[at..at + 16].copy_from_slice(&on_disk);
        d
    }

    struct Device {
        m: FakeRoot,
        keys: tempfile::TempDir,
        /// The trusted key pair (0.pub on the device).
        trusted: (std::path::PathBuf, std::path::PathBuf),
    }

    const STUBS: &[&str] = &["mount", "umount", "modprobe", "reboot", "setsid"];

    /// A device running `version` from slot `slot`, trusting one key (allowed to downgrade
    /// when `downgrade`).
    fn device(version: &str, slot: char, downgrade: bool) -> Device {
        let m = FakeRoot::new();
        let appliance = overlay("appliance");
        for lib in ["lib.sh", "loaders.sh"] {
            m.write(&format!("usr/lib/kiln/{lib}"), &std::fs::read_to_string(appliance.join("usr/lib/kiln").join(lib)).unwrap());
        }
        m.write_mode("usr/sbin/kiln-update", &std::fs::read_to_string(appliance.join("usr/sbin/kiln-update")).unwrap(), 0o755);
        m.write("usr/lib/kiln/update/version", &format!("{version}\n"));
        m.write("usr/lib/kiln/update/platform", "generic-uefi\n");
        m.write("usr/lib/kiln/update/health_timeout", "120\n");
        let keys = tempfile::tempdir().unwrap();
        let trusted = keypair(keys.path(), "trusted");
        m.write("usr/lib/kiln/update/keys/0.pub", &std::fs::read_to_string(&trusted.0).unwrap());
        if downgrade {
            m.write("usr/lib/kiln/update/keys/0.downgrade", "");
        }
        m.write("proc/cmdline", &format!("root=PARTUUID=x kiln.rootname=kiln-root-{slot} console=ttyS0\n"));
        std::fs::create_dir_all(m.path().join("proc/sys/vm")).unwrap();
        m.write("proc/sys/vm/drop_caches", "");
        std::fs::create_dir_all(m.path().join("sys/class/block")).unwrap();
        for (n, name, size) in [(1, "esp@lab", MIB), (2, "kiln-root-a", SLOT_B), (3, "kiln-root-b", SLOT_B)] {
            m.write(
                &format!("sys/block/vda/vda{n}/uevent"),
                &format!("MAJOR=254\nMINOR={n}\nDEVNAME=vda{n}\nDEVTYPE=partition\nPARTN={n}\nPARTNAME={name}\n"),
            );
            m.write(&format!("sys/block/vda/vda{n}/size"), &format!("{}\n", size / 512));
            std::os::unix::fs::symlink(format!("../../block/vda/vda{n}"), m.path().join(format!("sys/class/block/vda{n}"))).unwrap();
            std::fs::write(m.path().join(format!("dev/vda{n}")).tap_dir(), vec![0xaau8; size]).unwrap();
        }
        std::fs::write(m.path().join("dev/vda"), gpt_disk(GUID_B)).unwrap();
        m.write("run/kiln/esp/loader/loader.conf", "timeout 0\ndefault kiln-*\neditor no\n");
        m.write(
            "run/kiln/esp/loader/entries/kiln-a.conf",
            &format!("title kiln\nsort-key kiln\nversion 1-{version}\n# kiln-version {version}\nlinux /kiln/vmlinuz\n"),
        );
        m.write("run/kiln/esp/kiln/vmlinuz", "old kernel");
        std::fs::create_dir_all(m.path().join("run/kiln/data")).unwrap();
        for stub in STUBS {
            m.write_mode(&format!("bin/{stub}"), &format!("#!/bin/sh\necho \"{stub} $*\" >> \"$KILN_ROOT/calls\"\n"), 0o755);
        }
        m.write_mode("bin/uname", "#!/bin/sh\necho x86_64\n", 0o755);
        m.write_mode("bin/findfs", "#!/bin/sh\nexit 1\n", 0o755);
        // http:// sources: the stand-in wget serves the root's srv/ directory.
        m.write_mode(
            "bin/wget",
            "#!/bin/sh\nwhile [ $# -gt 1 ]; do [ \"$1\" = -O ] && out=$2; shift; done\ncp \"$KILN_ROOT/srv/${1#http://server/updates/x86_64/}\" \"$out\"\n",
            0o755,
        );
        Device { m, keys, trusted }
    }

    trait TapDir {
        fn tap_dir(self) -> Self;
    }
    impl TapDir for std::path::PathBuf {
        /// Creates the parent directory of this path.
        fn tap_dir(self) -> Self {
            std::fs::create_dir_all(self.parent().unwrap()).unwrap();
            self
        }
    }

    struct Bundle {
        root: Vec<u8>,
        lines: Vec<String>,
    }

    fn bundle(version: &str) -> Bundle {
        let root: Vec<u8> = (0..(2 * MIB + 4097)).map(|i| (i * 7 % 251) as u8).collect();
        let lines = vec![
            "kiln-update 1".to_string(),
            "profile lab".to_string(),
            "arch x86_64".to_string(),
            "platform generic-uefi".to_string(),
            format!("version {version}"),
            "build 0123456789abcdef".to_string(),
            "downgrade no".to_string(),
            "options console=ttyS0,115200 quiet".to_string(),
        ];
        Bundle { root, lines }
    }

    impl Bundle {
        fn set(mut self, key: &str, line: Option<&str>) -> Self {
            self.lines.retain(|l| l.split(' ').next() != Some(key));
            if let Some(l) = line {
                // The format line stays first.
                self.lines.insert(usize::from(key != "kiln-update"), l.to_string());
            }
            self
        }

        /// Writes the bundle into `dir`, signed by `key`; `tamper` changes the root after the
        /// manifest is written (a flipped byte).
        fn write(&self, dir: &Path, key: &Path, tamper: bool) {
            use sha2::Digest;
            std::fs::create_dir_all(dir).unwrap();
            let mut text = self.lines.join("\n") + "\n";
            for (role, name, bytes) in
                [("root", "root.squashfs", &self.root[..]), ("kernel", "vmlinuz", b"new kernel"), ("initrd", "initrd", b"new initrd")]
            {
                std::fs::write(dir.join(name), bytes).unwrap();
                text.push_str(&format!("file {role} {name} {} {}\n", bytes.len(), hex::encode(sha2::Sha256::digest(bytes))));
            }
            if tamper {
                let mut r = self.root.clone();
                r[MIB + 3] ^= 1;
                std::fs::write(dir.join("root.squashfs"), r).unwrap();
            }
            std::fs::write(dir.join("update.txt"), text).unwrap();
            let out = Command::new("minisign")
                .args(["-S", "-s"])
                .arg(key)
                .arg("-m")
                .arg(dir.join("update.txt"))
                .args(["-t", "kiln-update test"])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
    }

    impl Device {
        fn run(&self, args: &[&str]) -> (bool, String) {
            let script = self.m.path().join("usr/sbin/kiln-update");
            let mut a = vec![script.to_str().unwrap().to_string()];
            a.extend(args.iter().map(|s| s.to_string()));
            self.m.sh(a)
        }

        fn slot_b(&self) -> Vec<u8> {
            std::fs::read(self.m.path().join("dev/vda3")).unwrap()
        }

        fn entries(&self) -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(self.m.path().join("run/kiln/esp/loader/entries"))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }

        fn calls(&self) -> String {
            std::fs::read_to_string(self.m.path().join("calls")).unwrap_or_default()
        }

        fn set_slot(&self, slot: char) {
            self.m.write("proc/cmdline", &format!("root=PARTUUID=x kiln.rootname=kiln-root-{slot} console=ttyS0\n"));
        }
    }

    /// Applies `b` (signed by the trusted key unless `key` says otherwise) from a directory.
    fn apply(d: &Device, b: &Bundle, key: Option<&Path>, tamper: bool) -> (bool, String) {
        let dir = d.m.path().join("media/kiln-update/x86_64");
        b.write(&dir, key.unwrap_or(&d.trusted.1), tamper);
        d.run(&["apply", dir.to_str().unwrap()])
    }

    /// A refused bundle: non-zero exit, the expected error, and nothing written: slot B's bytes,
    /// the ESP's entries and slot B's boot files as they were.
    fn assert_refused(d: &Device, (ok, out): (bool, String), want: &str) {
        assert!(!ok, "accepted: {out}");
        assert!(out.contains("[kiln] error: update: ") && out.contains(want), "wanted `{want}`: {out}");
        assert!(d.slot_b().iter().all(|&b| b == 0xaa), "slot B was written: {out}");
        assert_eq!(d.entries(), ["kiln-a.conf"], "{out}");
        assert!(!d.m.exists("run/kiln/esp/kiln-b"), "{out}");
    }

    #[test]
    fn a_good_bundle_writes_slot_b_then_its_entry_last() {
        for http in [false, true] {
            let d = device("1.0.0", 'a', false);
            let b = bundle("2.0.0");
            let (ok, out) = if http {
                b.write(&d.m.path().join("srv"), &d.trusted.1, false);
                d.run(&["apply", "http://server/updates/x86_64/", "--reboot"])
            } else {
                apply(&d, &b, None, false)
            };
            assert!(ok, "http={http}: {out}");
            assert_eq!(&d.slot_b()[..b.root.len()], &b.root[..]);
            assert!(d.slot_b()[b.root.len()..].iter().all(|&x| x == 0xaa));
            assert_eq!(d.m.read("run/kiln/esp/kiln-b/vmlinuz"), "new kernel");
            assert_eq!(d.m.read("run/kiln/esp/kiln-b/initrd"), "new initrd");
            assert_eq!(d.entries(), ["kiln-a.conf", "kiln-b+1.conf"]);
            let entry = d.m.read("run/kiln/esp/loader/entries/kiln-b+1.conf");
            assert!(
                entry.contains("\nsort-key kiln\nversion 2-2.0.0\n# kiln-version 2.0.0\nlinux /kiln-b/vmlinuz\ninitrd /kiln-b/initrd\n"),
                "{entry}"
            );
            assert!(
                entry.contains(&format!("options root=PARTUUID={GUID_B} kiln.rootname=kiln-root-b console=ttyS0,115200 quiet panic=10\n")),
                "{entry}"
            );
            let written = out.find("slot b written and read back").unwrap_or_else(|| panic!("{out}"));
            assert!(out[written..].contains("[kiln] update: slot b holds version 2.0.0"), "{out}");
            assert!(!d.m.exists("run/kiln/data/update"), "staged files are removed: {out}");
            assert_eq!(d.calls().contains("reboot"), http, "--reboot reboots: {}", d.calls());
        }
    }

    /// The trial: slot B booted once (counted here when the loader did not), kept at ready; a
    /// second update goes to slot A with the next generation.
    #[test]
    fn a_trial_that_reaches_ready_keeps_the_slot() {
        let d = device("1.0.0", 'a', false);
        assert!(apply(&d, &bundle("2.0.0"), None, false).0);
        d.set_slot('b');
        d.m.write("usr/lib/kiln/update/version", "2.0.0\n");
        let (ok, out) = d.run(&["boot"]);
        assert!(ok, "{out}");
        assert!(out.contains("[kiln] update: trial boot of slot b (version 2.0.0)"), "{out}");
        assert_eq!(d.entries(), ["kiln-a.conf", "kiln-b+0-1.conf"], "the try is counted: {out}");
        assert!(d.calls().contains("setsid ") && d.calls().contains(" watch 120"), "health timer: {}", d.calls());
        assert!(d.m.exists("run/kiln/update-trial"));
        let (ok, out) = d.run(&["apply", "/nowhere"]);
        assert!(!ok && out.contains("this boot is the trial of slot b"), "{out}");
        let (ok, out) = d.run(&["good"]);
        assert!(ok && out.contains("[kiln] update: slot b good (version 2.0.0)"), "{out}");
        assert_eq!(d.entries(), ["kiln-a.conf", "kiln-b.conf"]);
        assert!(!d.m.exists("run/kiln/update-trial"));
        // The health timer then finds nothing to do.
        let (ok, _) = d.run(&["watch", "0"]);
        assert!(ok && !d.calls().contains("reboot"), "{}", d.calls());
        let (_, out) = d.run(&["status"]);
        assert!(out.contains("running: slot b, version 2.0.0") && out.contains("slot b: version 2.0.0 good"), "{out}");

        let (ok, out) = apply(&d, &bundle("3.0.0"), None, false);
        assert!(ok, "{out}");
        assert_eq!(d.entries(), ["kiln-a+1.conf", "kiln-b.conf"], "slot A's old entry is replaced: {out}");
        let entry = d.m.read("run/kiln/esp/loader/entries/kiln-a+1.conf");
        assert!(
            entry.contains("\nversion 3-3.0.0\n") && entry.contains("kiln.rootname=kiln-root-a") && entry.contains("linux /kiln/vmlinuz"),
            "{entry}"
        );
    }

    /// A failed step (or the health timer) marks the entry bad and reboots; the old slot's boot
    /// reports the rollback with the reason and removes the bad entry.
    #[test]
    fn a_failed_trial_rolls_back_and_says_why() {
        for (how, reason) in [("fail", "boot step(s) failed: site-broken"), ("watch", "no [kiln] ready within 0 s")] {
            let d = device("1.0.0", 'a', false);
            assert!(apply(&d, &bundle("2.0.0"), None, false).0);
            d.set_slot('b');
            d.m.write("usr/lib/kiln/update/version", "2.0.0\n");
            assert!(d.run(&["boot"]).0);
            let args: Vec<&str> = if how == "fail" { vec!["fail", "boot step(s) failed: site-broken"] } else { vec!["watch", "0"] };
            let (ok, out) = d.run(&args);
            assert!(ok && out.contains("[kiln] update: trial of slot b (version 2.0.0) failed: ") && out.contains(reason), "{how}: {out}");
            assert!(d.calls().contains("reboot"), "{how}: {}", d.calls());
            assert_eq!(d.entries(), ["kiln-a.conf", "kiln-b+0-1.conf"], "{how}");
            // The old slot boots (systemd-boot sorts the entry with 0 tries left last).
            d.set_slot('a');
            d.m.write("usr/lib/kiln/update/version", "1.0.0\n");
            let (ok, out) = d.run(&["boot"]);
            assert!(ok, "{how}: {out}");
            assert!(out.contains(&format!("[kiln] update: rolled back from 2.0.0 to 1.0.0: {reason}")), "{how}: {out}");
            assert_eq!(d.m.read("run/kiln/update-rolled-back"), "2.0.0\n", "for the rollout agent: {how}");
            assert!(out.contains("data partition was last used by slot=b version=2.0.0"), "{how}: {out}");
            assert_eq!(d.entries(), ["kiln-a.conf"], "{how}");
            let (_, out) = d.run(&["status"]);
            assert!(out.contains("last result: rolled back from 2.0.0 (slot b) to 1.0.0"), "{out}");
        }
    }

    /// `--reboot-at HH:MM`: the trial at the next HH:MM on the node's clock, by a process left
    /// running; refused before anything is written when the time is malformed or the clock was
    /// never set.
    #[test]
    fn reboot_at_schedules_the_trial_and_refuses_an_unset_clock() {
        let d = device("1.0.0", 'a', false);
        let clock = |year: u32, time: &str| {
            d.m.write_mode(
                "bin/date",
                &format!(
                    "#!/bin/sh\ncase \"$1\" in +%Y) echo {year} ;; +%H:%M:%S) echo {time} ;; *) echo \"{year}-01-01 {time}\" ;; esac\n"
                ),
                0o755,
            );
        };
        clock(1970, "00:00:12");
        let dir = d.m.path().join("media/kiln-update/x86_64");
        bundle("2.0.0").write(&dir, &d.trusted.1, false);
        let dir = dir.to_str().unwrap();
        assert_refused(&d, d.run(&["apply", dir, "--reboot-at", "03:00"]), "it was never set");
        clock(2026, "22:30:00");
        assert_refused(&d, d.run(&["apply", dir, "--reboot-at", "3:00"]), "expected HH:MM");
        assert_refused(&d, d.run(&["apply", dir, "--reboot-at", "24:00"]), "expected HH:MM");
        let (ok, out) = d.run(&["apply", dir, "--reboot", "--reboot-at", "03:00"]);
        assert!(!ok && out.contains("usage:"), "{out}");
        // 22:30:00 to 03:00 the next day: 4.5 hours.
        let (ok, out) = d.run(&["apply", dir, "--reboot-at", "03:00"]);
        assert!(ok, "{out}");
        assert!(out.contains("[kiln] update: rebooting into the trial of slot b at 03:00, in 4h30m"), "{out}");
        assert!(d.calls().contains("kiln-update reboot-after 16200 b"), "{}", d.calls());
        assert!(!d.calls().contains("reboot\n") && !d.calls().starts_with("reboot"), "no reboot now: {}", d.calls());
        // What is left running reboots only into a trial still pending.
        let (ok, out) = d.run(&["reboot-after", "0", "a"]);
        assert!(ok && !out.contains("rebooting") && !d.calls().lines().any(|l| l == "reboot "), "{out}");
        let (ok, out) = d.run(&["reboot-after", "0", "b"]);
        assert!(ok && out.contains("rebooting into the trial of slot b (--reboot-at)"), "{out}");
        assert!(d.calls().lines().any(|l| l == "reboot "), "{}", d.calls());
    }

    #[test]
    fn bad_bundles_are_refused_before_anything_is_written() {
        let other = {
            let d = device("1.0.0", 'a', false);
            let k = keypair(d.keys.path(), "other");
            (d, k)
        };
        let d = device("1.0.0", 'a', false);
        let other_key = other.1 .1.clone();
        // Signed by a key the device does not trust.
        assert_refused(&d, apply(&d, &bundle("2.0.0"), Some(&other_key), false), "not signed by any of the 1 key(s)");
        // update.txt changed after signing.
        let dir = d.m.path().join("media/kiln-update/x86_64");
        bundle("2.0.0").write(&dir, &d.trusted.1, false);
        let text = std::fs::read_to_string(dir.join("update.txt")).unwrap().replace("2.0.0", "2.0.1");
        std::fs::write(dir.join("update.txt"), text).unwrap();
        assert_refused(&d, d.run(&["apply", dir.to_str().unwrap()]), "not signed by any");
        assert_refused(
            &d,
            apply(&d, &bundle("2.0.0").set("arch", Some("arch aarch64")), None, false),
            "the bundle is for aarch64; this device is x86_64",
        );
        assert_refused(
            &d,
            apply(&d, &bundle("2.0.0").set("platform", Some("platform rpi4")), None, false),
            "the bundle is for platform rpi4; this device's image is platform generic-uefi",
        );
        assert_refused(&d, apply(&d, &bundle("0.9.0"), None, false), "version 0.9.0 is older than the running 1.0.0");
        assert_refused(&d, apply(&d, &bundle("0.9.0").set("downgrade", Some("downgrade yes")), None, false), "may not sign downgrades");
        assert_refused(
            &d,
            apply(&d, &bundle("2.0.0").set("min_version", Some("min_version 1.5")), None, false),
            "applies only to devices at 1.5 or later",
        );
        assert_refused(&d, apply(&d, &bundle("2.0.0").set("kiln-update", Some("kiln-update 2")), None, false), "the bundle is format 2");
        let (ok, out) = apply(&d, &bundle("2.0.0"), None, true);
        assert_refused(&d, (ok, out.clone()), "root.squashfs from");
        assert!(out.contains("does not match update.txt") && !d.m.exists("run/kiln/data/update"), "{out}");
        // The version order is numeric: 1.10 is newer than 1.9.
        let d9 = device("1.9", 'a', false);
        assert!(apply(&d9, &bundle("1.10"), None, false).0);
    }

    #[test]
    fn downgrades_need_the_bundle_and_the_key_to_allow_them_and_images_without_keys_refuse_all() {
        let d = device("1.0.0", 'a', true);
        assert_refused(&d, apply(&d, &bundle("0.9.0"), None, false), "a downgrade needs a bundle built with --allow-downgrade");
        let (ok, out) = apply(&d, &bundle("0.9.0").set("downgrade", Some("downgrade yes")), None, false);
        assert!(ok && out.contains("downgrade from 1.0.0 to 0.9.0 allowed"), "{out}");
        // The downgrade's entry still sorts first: its generation is higher.
        assert!(d.m.read("run/kiln/esp/loader/entries/kiln-b+1.conf").contains("\nversion 2-0.9.0\n"));

        let d = device("1.0.0", 'a', false);
        std::fs::remove_file(d.m.path().join("usr/lib/kiln/update/keys/0.pub")).unwrap();
        assert_refused(
            &d,
            apply(&d, &bundle("2.0.0"), None, false),
            "this image trusts no update keys (its profile has no update: section)",
        );
        let (ok, out) = d.run(&["boot"]);
        assert!(ok && out.contains("updates off"), "{out}");
    }

    /// `keep` lines: the node's secrets the bundle's public root lacks are copied from the running
    /// root to the persistent layer (mode kept, missing parent directories with the root's modes)
    /// before the slot is written; a copy already there is left alone.
    #[test]
    fn keep_lines_copy_the_nodes_secrets_to_the_persistent_layer() {
        let d = device("1.0.0", 'a', false);
        let lower = |p: &str| format!("run/kiln/lower/{p}");
        d.m.write_mode(&lower("etc/kiln/nodes/n1/update/report.key"), "image key\n", 0o600);
        let private = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o700);
        std::fs::set_permissions(d.m.path().join(lower("etc/kiln/nodes/n1/update")), private).unwrap();
        d.m.write_mode(&lower("etc/kiln/nodes/n1/etcd/peer.key"), "image copy\n", 0o600);
        d.m.write_mode("run/kiln/data/etc/upper/kiln/nodes/n1/etcd/peer.key", "device copy\n", 0o600);
        d.m.write_mode(&lower("var/lib/site/token"), "token\n", 0o640);
        std::fs::create_dir_all(d.m.path().join("run/kiln/data/var/lib")).unwrap();
        let mut b = bundle("2.0.0");
        for k in
            ["etc/kiln/nodes/n1/update/report.key", "etc/kiln/nodes/n1/etcd/peer.key", "var/lib/site/token", "etc/kiln/nodes/n1/gone.key"]
        {
            b.lines.push(format!("keep {k}"));
        }
        let (ok, out) = apply(&d, &b, None, false);
        assert!(ok, "{out}");
        let upper = "run/kiln/data/etc/upper/kiln/nodes/n1";
        assert_eq!(d.m.read(&format!("{upper}/update/report.key")), "image key\n");
        assert_eq!(d.m.mode(&format!("{upper}/update/report.key")), 0o600);
        assert_eq!(d.m.mode(&format!("{upper}/update")), 0o700, "a new parent directory gets the root's mode");
        assert_eq!(d.m.read(&format!("{upper}/etcd/peer.key")), "device copy\n", "the persistent copy wins");
        assert_eq!(d.m.read("run/kiln/data/var/lib/site/token"), "token\n");
        assert_eq!(d.m.mode("run/kiln/data/var/lib/site/token"), 0o640);
        assert!(!d.m.exists(&format!("{upper}/gone.key")));
        let line = "[kiln] update: kept this node's secrets the new root lacks: 2 copied to the persistent layer, 1 already there, 1 not in this image (4 keep line(s))";
        let kept = out.find(line).unwrap_or_else(|| panic!("{out}"));
        assert!(kept < out.find("writing the root to slot b").unwrap(), "kept before the slot is written: {out}");
    }

    /// A keep path that could reach outside the persistent layers (or is not a plain path) makes
    /// the bundle bad: refused while update.txt is read, before anything is written.
    #[test]
    fn keep_paths_outside_etc_and_var_lib_are_refused_before_any_write() {
        let d = device("1.0.0", 'a', false);
        d.m.write_mode("run/kiln/lower/usr/x", "x\n", 0o600);
        d.m.write_mode("run/kiln/lower/etc/x", "x\n", 0o600);
        for bad in ["../x", "usr/x", "/etc/x", "etc/../usr/x", "var/log/x", "var/lib", "etc/*", "etc/a b"] {
            let mut b = bundle("2.0.0");
            b.lines.push("keep etc/x".into());
            b.lines.push(format!("keep {bad}"));
            let (ok, out) = apply(&d, &b, None, false);
            assert_refused(&d, (ok, out.clone()), &format!("keep path '{bad}'"));
            assert!(!d.m.exists("run/kiln/data/etc") && !d.m.exists("run/kiln/data/update"), "{bad}: written: {out}");
        }
    }

    /// Boards whose loader does not read the entries: kiln-update writes U-Boot's
    /// `extlinux.conf` or the Pi firmware's `config.txt` from them after every change, so the
    /// board boots what systemd-boot would: the trial once, then the other slot once the trial
    /// counted its try, the kept slot after `good`.
    mod boards {
        use super::{apply, bundle, device, Device, GUID_B};

        const DTB: &str = "/kiln/dtb/sifive/hifive-unleashed-a00.dtb";
        const BUILT_CMDLINE: &str = "root=PARTUUID=x kiln.rootname=kiln-root-a console=ttySIF0,115200";

        /// A device as a board image with `update:` leaves the build: slot A's entry (with the
        /// device tree on extlinux boards) and `loader/kiln-loader`, no loader.conf.
        fn board(loader: &str) -> Device {
            let d = device("1.0.0", 'a', false);
            let esp = d.m.path().join("run/kiln/esp");
            std::fs::remove_file(esp.join("loader/loader.conf")).unwrap();
            d.m.write("run/kiln/esp/loader/kiln-loader", &format!("{loader}\n"));
            let (kernel, initrd, dt) = match loader {
                "extlinux" => ("/kiln/vmlinuz", "/kiln/initrd", format!("devicetree {DTB}\n")),
                _ => ("/vmlinuz", "/initrd.img", String::new()),
            };
            d.m.write(
                "run/kiln/esp/loader/entries/kiln-a.conf",
                &format!("title kiln lab\nsort-key kiln\nversion 1-1.0.0\n# kiln-version 1.0.0\nlinux {kernel}\ninitrd {initrd}\n{dt}options {BUILT_CMDLINE}\n"),
            );
            match loader {
                "extlinux" => d.m.write("run/kiln/esp/extlinux/extlinux.conf", "default kiln\nlabel kiln\n    kernel /kiln/vmlinuz\n"),
                _ => {
                    std::fs::remove_dir_all(esp.join("kiln")).unwrap();
                    d.m.write("run/kiln/esp/vmlinuz", "built kernel");
                    d.m.write("run/kiln/esp/initrd.img", "built initrd");
                    d.m.write("run/kiln/esp/cmdline.txt", &format!("{BUILT_CMDLINE}\n"));
                    d.m.write(
                        "run/kiln/esp/config.txt",
                        "# written by kiln\n[all]\narm_64bit=1\nkernel=vmlinuz\ninitramfs initrd.img followkernel\n[pi3]\ndevice_tree=bcm2837-rpi-3-b.dtb\n[all]\nenable_uart=1\n",
                    );
                }
            }
            d
        }

        /// What the loader boots now: (kernel, initrd, command line, device tree), read from
        /// its configuration as U-Boot or the firmware would.
        fn booted(d: &Device, loader: &str) -> (String, String, String, String) {
            let esp = |f: &str| d.m.read(&format!("run/kiln/esp/{f}"));
            if loader == "extlinux" {
                let conf = esp("extlinux/extlinux.conf");
                let default = conf.lines().find_map(|l| l.strip_prefix("default ")).unwrap_or_else(|| panic!("{conf}"));
                let label = conf.split("\nlabel ").find(|l| l.starts_with(&format!("{default}\n"))).unwrap_or_else(|| panic!("{conf}"));
                let key = |k: &str| label.lines().find_map(|l| l.trim().strip_prefix(&format!("{k} "))).unwrap_or("").to_string();
                (key("kernel"), key("initrd"), key("append"), key("fdt"))
            } else {
                let keys = kiln::raspberrypi::read_config_txt(&esp("config.txt"), &["pi3"]);
                let cmdline = esp(&keys["cmdline"]).trim_end().to_string();
                let initrd = keys["initramfs"].strip_suffix(" followkernel").unwrap().to_string();
                (format!("/{}", keys["kernel"]), format!("/{initrd}"), cmdline, keys["device_tree"].clone())
            }
        }

        fn assert_boots(d: &Device, loader: &str, slot: char, when: &str) {
            let (kernel, initrd, cmdline, dt) = booted(d, loader);
            let (want_kernel, want_initrd) = match (slot, loader) {
                ('b', _) => ("/kiln-b/vmlinuz".to_string(), "/kiln-b/initrd".to_string()),
                (_, "extlinux") => ("/kiln/vmlinuz".to_string(), "/kiln/initrd".to_string()),
                _ => ("/vmlinuz".to_string(), "/initrd.img".to_string()),
            };
            assert_eq!((kernel.as_str(), initrd.as_str()), (want_kernel.as_str(), want_initrd.as_str()), "{loader}, {when}");
            assert!(cmdline.contains(&format!("kiln.rootname=kiln-root-{slot}")), "{loader}, {when}: {cmdline}");
            if slot == 'b' {
                assert!(
                    cmdline.starts_with(&format!("root=PARTUUID={GUID_B} ")) && cmdline.ends_with(" panic=10"),
                    "{loader}, {when}: {cmdline}"
                );
            }
            let want_dt = if loader == "extlinux" { DTB } else { "bcm2837-rpi-3-b.dtb" };
            assert_eq!(dt, want_dt, "{loader}, {when}: the board's device tree stays");
        }

        #[test]
        fn the_loaders_configuration_follows_the_trial_and_good() {
            for loader in ["extlinux", "raspberrypi"] {
                let d = board(loader);
                let (ok, out) = apply(&d, &bundle("2.0.0"), None, false);
                assert!(ok, "{loader}: {out}");
                assert_boots(&d, loader, 'b', "after apply: the trial");
                d.set_slot('b');
                d.m.write("usr/lib/kiln/update/version", "2.0.0\n");
                let (ok, out) = d.run(&["boot"]);
                assert!(ok && out.contains("counted here"), "{loader}: {out}");
                assert_boots(&d, loader, 'a', "during the trial: a reboot falls back");
                let (ok, out) = d.run(&["good"]);
                assert!(ok, "{loader}: {out}");
                assert_boots(&d, loader, 'b', "after good");
                if loader == "extlinux" {
                    let conf = d.m.read("run/kiln/esp/extlinux/extlinux.conf");
                    assert!(conf.contains("\nlabel kiln-b\n") && conf.contains("\nlabel kiln-a\n"), "both slots at U-Boot's menu: {conf}");
                }
                // The next update goes to slot A; on the Pi its built files at the top of the
                // partition make room for it.
                let (ok, out) = apply(&d, &bundle("3.0.0"), None, false);
                assert!(ok, "{loader}: {out}");
                let (kernel, _, cmdline, _) = booted(&d, loader);
                assert_eq!(kernel, "/kiln/vmlinuz", "{loader}");
                assert!(cmdline.contains("kiln.rootname=kiln-root-a") && cmdline.contains("panic=10"), "{loader}: {cmdline}");
                assert_eq!(d.m.read("run/kiln/esp/kiln/vmlinuz"), "new kernel", "{loader}");
                assert!(!d.m.exists("run/kiln/esp/vmlinuz") && !d.m.exists("run/kiln/esp/initrd.img"), "{loader}");
            }
        }

        #[test]
        fn a_failed_trial_falls_back_on_the_board_too() {
            for loader in ["extlinux", "raspberrypi"] {
                let d = board(loader);
                assert!(apply(&d, &bundle("2.0.0"), None, false).0);
                d.set_slot('b');
                d.m.write("usr/lib/kiln/update/version", "2.0.0\n");
                assert!(d.run(&["boot"]).0);
                let (ok, out) = d.run(&["fail", "boot step(s) failed: site-broken"]);
                assert!(ok && d.calls().contains("reboot"), "{loader}: {out}");
                assert_boots(&d, loader, 'a', "after the failed trial");
                d.set_slot('a');
                d.m.write("usr/lib/kiln/update/version", "1.0.0\n");
                let (ok, out) = d.run(&["boot"]);
                assert!(ok && out.contains("rolled back from 2.0.0 to 1.0.0: boot step(s) failed: site-broken"), "{loader}: {out}");
                assert_eq!(d.entries(), ["kiln-a.conf"], "{loader}");
                assert_boots(&d, loader, 'a', "after the rollback");
                if loader == "extlinux" {
                    let conf = d.m.read("run/kiln/esp/extlinux/extlinux.conf");
                    assert!(!conf.contains("kiln-b"), "the failed slot is off U-Boot's menu: {conf}");
                }
            }
        }

        /// A trial that never reaches the boot step (the new kernel panics) boots again: the
        /// loader cannot count. The boot step's render also repairs a configuration that power
        /// loss left behind the entries.
        #[test]
        fn the_boot_step_renders_what_the_entries_say() {
            let d = board("raspberrypi");
            assert!(apply(&d, &bundle("2.0.0"), None, false).0);
            d.m.write(
                "run/kiln/esp/config.txt",
                &d.m.read("run/kiln/esp/config.txt").replace("kernel=kiln-b/vmlinuz", "kernel=vmlinuz-gone"),
            );
            d.set_slot('b');
            d.m.write("usr/lib/kiln/update/version", "2.0.0\n");
            assert!(d.run(&["boot"]).0);
            assert_boots(&d, "raspberrypi", 'a', "the trial counted");
        }
    }

    /// `kiln-update media`, the KILN-UPDATE watcher, and the boot step's look at the media.
    /// Block devices appear in the fake `/sys/class/block` between two runs of
    /// `KILN_MEDIA_ROUNDS=1` (one look each); the stand-in `mount` mounts nothing, so a medium's
    /// files are where the script mounts it, `run/kiln/usb/`.
    mod media {
        use super::{bundle, device, Device};

        /// The first 64 KiB of a filesystem labelled `label`: `vfat` (FAT32 boot sector) or
        /// `ext4` (superblock magic and label), as `fs_label` reads them.
        fn fs_image(fs: &str, label: &str) -> Vec<u8> {
            let mut d = vec![0u8; 64 * 1024];
            match fs {
                "vfat" => {
                    d[82..90].copy_from_slice(b"FAT32   ");
                    d[71..82].copy_from_slice(format!("{label:<11}").as_bytes());
                }
                "ext4" => {
                    d[1080..1082].copy_from_slice(&[0x53, 0xef]);
                    d[1144..1144 + label.len()].copy_from_slice(label.as_bytes());
                }
                _ => unreachable!(),
            }
            d
        }

        /// Plugs in block device `name` (a whole disk, or a partition of `parent`) holding `image`.
        fn plug(d: &Device, name: &str, parent: Option<&str>, image: &[u8]) {
            let sys = match parent {
                Some(p) => format!("sys/block/{p}/{name}"),
                None => format!("sys/block/{name}"),
            };
            d.m.write(&format!("{sys}/size"), &format!("{}\n", image.len() / 512));
            let link = d.m.path().join(format!("sys/class/block/{name}"));
            std::os::unix::fs::symlink(format!("../../{}", sys.trim_start_matches("sys/")), link).unwrap();
            std::fs::write(d.m.path().join(format!("dev/{name}")), image).unwrap();
        }

        fn unplug(d: &Device, name: &str) {
            std::fs::remove_file(d.m.path().join(format!("sys/class/block/{name}"))).unwrap();
        }

        /// The medium's bundle directory (where the script mounts the medium), holding `version`.
        fn medium_holds(d: &Device, version: &str) {
            bundle(version).write(&d.m.path().join("run/kiln/usb/kiln-update/x86_64"), &d.trusted.1, false);
        }

        /// One look of the watcher: its output.
        fn look(d: &Device) -> String {
            let script = d.m.path().join("usr/sbin/kiln-update");
            let (ok, out) = d.m.sh_env(&[("KILN_MEDIA_ROUNDS", "1")], [script.to_str().unwrap(), "media"]);
            assert!(ok, "{out}");
            out
        }

        #[test]
        fn a_stick_plugged_in_is_applied_once_and_reboots_into_the_trial() {
            for fs in ["vfat", "ext4"] {
                let d = device("1.0.0", 'a', false);
                medium_holds(&d, "2.0.0");
                assert_eq!(look(&d), "", "{fs}: nothing plugged in yet");
                plug(&d, "sda", None, &fs_image(fs, "KILN-UPDATE"));
                let out = look(&d);
                assert!(out.contains("[kiln] update: applying the bundle on /dev/sda (KILN-UPDATE)"), "{fs}: {out}");
                assert!(out.contains("[kiln] update: rebooting into the trial of slot b"), "{fs}: {out}");
                assert_eq!(d.entries(), ["kiln-a.conf", "kiln-b+1.conf"], "{fs}: {out}");
                assert!(
                    d.calls().contains("mount -o ro ") && d.calls().contains("/dev/sda ") && d.calls().contains("\nreboot"),
                    "{}",
                    d.calls()
                );
                // Until the reboot, and after it is cancelled: not again.
                assert_eq!(look(&d), "", "{fs}: rebooting");
                std::fs::remove_file(d.m.path().join("run/kiln/rebooting")).unwrap();
                let calls = d.calls();
                assert_eq!(look(&d), "", "{fs}: the same stick is looked at once");
                assert_eq!(d.calls(), calls, "{fs}: no command ran for a stick already seen");
            }
        }

        /// Sticks that must not be applied: one console line each, once; unlabelled devices and
        /// the node's own disk get none.
        #[test]
        fn running_failed_and_trial_versions_and_own_disks_are_not_applied() {
            let cases: [(&str, &str, Option<&str>); 5] = [
                ("running", "2.0.0", Some("[kiln] update: /dev/sda (KILN-UPDATE) holds version 2.0.0, which is running; remove the medium")),
                ("failed", "3.0.0", Some("[kiln] update: /dev/sda (KILN-UPDATE) holds version 3.0.0, which failed its trial here; not applied again")),
                ("trial", "3.0.0", Some("[kiln] update: /dev/sda (KILN-UPDATE) not used during a trial boot; plug it in again after this boot is kept or rolled back")),
                ("own disk", "3.0.0", None),
                ("no label", "3.0.0", None),
            ];
            for (case, version, line) in cases {
                let d = device("2.0.0", 'a', false);
                medium_holds(&d, version);
                assert_eq!(look(&d), "", "{case}");
                match case {
                    "failed" => d.m.write(
                        "run/kiln/data/kiln-update/last-result",
                        "rolled back from 3.0.0 (slot b) to 2.0.0 (slot a): boot step(s) failed: x\n",
                    ),
                    "trial" => d.m.write("run/kiln/update-trial", "slot=a\nversion=2.0.0\nentry=kiln-a+0-1.conf\n"),
                    _ => {}
                }
                match case {
                    "own disk" => plug(&d, "vda4", Some("vda"), &fs_image("vfat", "KILN-UPDATE")),
                    "no label" => plug(&d, "sda", None, &fs_image("vfat", "DATA")),
                    _ => plug(&d, "sda", None, &fs_image("vfat", "KILN-UPDATE")),
                }
                let out = look(&d);
                match line {
                    Some(l) => assert_eq!(out, format!("{l}\n"), "{case}"),
                    None => assert_eq!(out, "", "{case}"),
                }
                assert!(d.slot_b().iter().all(|&b| b == 0xaa), "{case}: slot B was written: {out}");
                assert_eq!(d.entries(), ["kiln-a.conf"], "{case}");
                assert_eq!(look(&d), "", "{case}: one line per stick");
                // Plugged in again: looked at again.
                if line.is_some() {
                    unplug(&d, "sda");
                    assert_eq!(look(&d), "", "{case}");
                    std::os::unix::fs::symlink("../../block/sda", d.m.path().join("sys/class/block/sda")).unwrap();
                    assert!(look(&d).contains("/dev/sda (KILN-UPDATE)"), "{case}: plugged in again");
                }
            }
        }

        /// The boot step loads the USB drivers, looks at the media present, and leaves the list
        /// for the watcher: a stick it refused is not looked at again, a new one is.
        #[test]
        fn the_boot_step_loads_usb_drivers_and_its_sticks_are_not_looked_at_again() {
            let d = device("2.0.0", 'a', false);
            d.m.write("sys/bus/pci/devices/0000:00:04.0/class", "0x0c0330\n");
            d.m.write("sys/bus/pci/devices/0000:00:04.0/modalias", "pci:v00001B36d0000000Dsv00001AF4sd00001100bc0Csc03i30\n");
            d.m.write("sys/bus/pci/devices/0000:00:03.0/class", "0x020000\n");
            d.m.write("sys/bus/pci/devices/0000:00:03.0/modalias", "pci:v00001AF4d00001000\n");
            std::fs::create_dir_all(d.m.path().join("sys/bus/usb/devices/usb1")).unwrap();
            medium_holds(&d, "2.0.0");
            plug(&d, "vdb", None, &fs_image("vfat", "KILN-UPDATE"));
            let (ok, out) = d.run(&["boot"]);
            assert!(ok, "{out}");
            assert!(
                out.contains("[kiln] update: /dev/vdb (KILN-UPDATE) holds version 2.0.0, which is running; remove the medium"),
                "{out}"
            );
            let calls = d.calls();
            assert!(calls.contains("modprobe -b -q pci:v00001B36d0000000D"), "the xHCI driver: {calls}");
            assert!(!calls.contains("pci:v00001AF4d00001000"), "only USB controllers: {calls}");
            for m in ["usb_storage", "uas", "sd_mod"] {
                assert!(calls.contains(&format!("modprobe -b -q {m}\n")), "{m}: {calls}");
            }
            assert_eq!(look(&d), "", "the boot step already said it");
            medium_holds(&d, "3.0.0");
            plug(&d, "sdb", None, &fs_image("ext4", "KILN-UPDATE"));
            assert!(look(&d).contains("[kiln] update: applying the bundle on /dev/sdb (KILN-UPDATE)"));
            assert_eq!(d.entries(), ["kiln-a.conf", "kiln-b+1.conf"]);
        }
    }

    /// `kiln-update follow`, the rollout agent, against a stand-in for `kiln serve --rollout` that
    /// issues single-use nonces and accepts a report only with the signature kiln's own
    /// `rollout.rs` computes, then answers from the test's script. The node is `etcd-1`, its key
    /// derived from a master key as the build does. `KILN_ROLLOUT_ROUNDS=N` runs N polls back to
    /// back. Busybox's wget talks to the stand-in, as on the device.
    mod follow {
        use std::collections::HashMap;
        use std::ffi::OsStr;
        use std::io::{BufRead, BufReader, Write};
        use std::net::TcpListener;
        use std::path::{Path, PathBuf};
        use std::sync::{Arc, Mutex};

        use kiln::rollout::{node_key, report_message, report_signature};

        use super::{bundle, device, Device};

        const MASTER: [u8; 32] = [7; 32];
        const NODE: &str = "etcd-1";
        const UPDATE: &str = "action update\nversion 2.0.0\npoll 10\nurl /updates/x86_64/\n";

        #[derive(Default)]
        struct Served {
            nonce: Option<String>,
            issued: u64,
            /// Challenges answered 503 before the server "comes back".
            unavailable: usize,
            answer: String,
            /// Accepted reports: (state, version).
            reports: Vec<(String, String)>,
            refused: usize,
            bundle: PathBuf,
        }

        struct Server {
            base: String,
            s: Arc<Mutex<Served>>,
        }

        impl Server {
            fn reports(&self) -> Vec<(String, String)> {
                self.s.lock().unwrap().reports.clone()
            }
            fn answer(&self, a: &str) {
                self.s.lock().unwrap().answer = a.to_string();
            }
        }

        fn server(answer: &str, bundle: &Path) -> Server {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let base = format!("http://{}", l.local_addr().unwrap());
            let s = Arc::new(Mutex::new(Served { answer: answer.into(), bundle: bundle.into(), ..Default::default() }));
            let shared = s.clone();
            std::thread::spawn(move || {
                for c in l.incoming() {
                    let Ok(mut c) = c else { continue };
                    let mut r = BufReader::new(c.try_clone().unwrap());
                    let mut line = String::new();
                    if r.read_line(&mut line).is_err() {
                        continue;
                    }
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    let target = line.split(' ').nth(1).unwrap_or_default().to_string();
                    let (status, body) = respond(&mut shared.lock().unwrap(), &target);
                    let _ = write!(
                        c,
                        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = c.write_all(&body);
                }
            });
            Server { base, s }
        }

        fn respond(s: &mut Served, target: &str) -> (&'static str, Vec<u8>) {
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            let q: HashMap<&str, &str> = query.split('&').filter_map(|kv| kv.split_once('=')).collect();
            let f = |k: &str| q.get(k).copied().unwrap_or_default();
            match path {
                "/rollout/challenge" => {
                    if s.unavailable > 0 {
                        s.unavailable -= 1;
                        return ("503 Service Unavailable", b"down\n".to_vec());
                    }
                    if f("node") != NODE {
                        return ("404 Not Found", b"unknown node\n".to_vec());
                    }
                    s.issued += 1;
                    let nonce = format!("{:064x}", 0xfeed_0000 + s.issued);
                    s.nonce = Some(nonce.clone());
                    ("200 OK", format!("{nonce}\n").into_bytes())
                }
                "/rollout/report" => {
                    let msg = report_message(f("node"), f("arch"), f("version"), f("state"), f("nonce"));
                    let want = report_signature(&node_key(&MASTER, f("node")), &msg);
                    // Single use: the nonce is gone whatever the outcome.
                    if s.nonce.take().as_deref() != Some(f("nonce")) || f("sig") != want {
                        s.refused += 1;
                        return ("403 Forbidden", b"bad signature\n".to_vec());
                    }
                    s.reports.push((f("state").into(), f("version").into()));
                    ("200 OK", s.answer.clone().into_bytes())
                }
                p => match p.strip_prefix("/updates/x86_64/").map(|name| std::fs::read(s.bundle.join(name))) {
                    Some(Ok(bytes)) => ("200 OK", bytes),
                    _ => ("404 Not Found", b"no such file\n".to_vec()),
                },
            }
        }

        /// Node etcd-1 running 1.0.0 whose boot reached ready, with its report key; the server
        /// named in the image (with a trailing slash the agent drops) answers `answer`.
        fn node(answer: &str) -> (Device, Server) {
            let d = device("1.0.0", 'a', false);
            let srv = server(answer, &d.m.path().join("srv"));
            let wget = match super::super::busybox() {
                Some(b) => format!("#!/bin/sh\nexec {b} wget \"$@\"\n"),
                None => "#!/bin/sh\nexec /usr/bin/wget \"$@\"\n".into(),
            };
            d.m.write_mode("bin/wget", &wget, 0o755);
            d.m.write("usr/lib/kiln/update/server", &format!("{}/\n", srv.base));
            d.m.write("run/kiln/node.conf", "KILN_NODE_NAME=\"etcd-1\"\nKILN_NODE_ROLES=\"etcd\"\n");
            d.m.write_mode("etc/kiln/nodes/etcd-1/update/report.key", &format!("{}\n", hex::encode(node_key(&MASTER, NODE))), 0o600);
            d.m.write("run/kiln/status", "identity: node=etcd-1 roles=etcd by=cmdline\nready arch=x86_64 host=etcd-1 uptime=9.12s\n");
            (d, srv)
        }

        fn follow(d: &Device, rounds: u32) -> (bool, String) {
            let script = d.m.path().join("usr/sbin/kiln-update");
            let (ok, out) = d.m.sh_env(&[("KILN_ROLLOUT_ROUNDS", &rounds.to_string())], [script.as_os_str(), OsStr::new("follow")]);
            assert!(!out.contains(&hex::encode(node_key(&MASTER, NODE))), "the key is never printed: {out}");
            (ok, out)
        }

        fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
            v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
        }

        #[test]
        fn a_signed_ready_report_then_the_update_it_is_told() {
            let (d, srv) = node(UPDATE);
            let b = bundle("2.0.0");
            b.write(&d.m.path().join("srv"), &d.trusted.1, false);
            let (ok, out) = follow(&d, 2);
            assert!(ok, "{out}");
            assert_eq!(srv.reports(), pairs(&[("ready", "1.0.0")]), "{out}");
            assert!(
                out.contains(&format!("[kiln] update: rollout: reporting to {} as node etcd-1 (running 1.0.0 on x86_64, ready)", srv.base)),
                "{out}"
            );
            assert!(out.contains(&format!("[kiln] update: rollout: updating 1.0.0 -> 2.0.0 from {}\n", srv.base)), "{out}");
            assert!(out.contains("[kiln] update: slot b holds version 2.0.0"), "{out}");
            assert_eq!(&d.slot_b()[..b.root.len()], &b.root[..]);
            assert!(d.calls().contains("reboot"), "{}", d.calls());
        }

        #[test]
        fn a_refused_update_is_reported_failed_and_not_tried_again_for_that_target() {
            let (d, srv) = node(UPDATE);
            bundle("2.0.0").set("arch", Some("arch aarch64")).write(&d.m.path().join("srv"), &d.trusted.1, false);
            let (ok, out) = follow(&d, 3);
            assert!(ok, "{out}");
            assert_eq!(out.matches("rollout: updating 1.0.0 -> 2.0.0").count(), 1, "{out}");
            assert!(
                out.contains("[kiln] update: rollout: update to 2.0.0 failed: the bundle is for aarch64; this device is x86_64"),
                "{out}"
            );
            // At once after the refusal, then at every poll.
            assert_eq!(srv.reports(), pairs(&[("ready", "1.0.0"), ("failed", "1.0.0"), ("failed", "1.0.0"), ("failed", "1.0.0")]));
            assert!(d.slot_b().iter().all(|&x| x == 0xaa), "slot B untouched");
            // A restarted agent keeps it (this boot's /run).
            let (ok, out) = follow(&d, 1);
            assert!(ok && !out.contains("rollout: updating"), "{out}");
            assert_eq!(srv.reports().last().unwrap().0, "failed");
            // The rollout's target moves on: ready again.
            srv.answer("action wait\nversion 3.0.0\n");
            assert!(follow(&d, 2).0);
            assert_eq!(srv.reports()[5..], pairs(&[("failed", "1.0.0"), ("ready", "1.0.0")]));
        }

        /// The command line's server wins; an outage is one line, so is each change of answer.
        #[test]
        fn outages_and_repeated_answers_are_one_line_each() {
            let (d, srv) = node("action wait\nversion 2.0.0\npoll 5\n");
            d.m.write("usr/lib/kiln/update/server", "http://127.0.0.1:1\n");
            d.m.write("proc/cmdline", &format!("root=PARTUUID=x kiln.rootname=kiln-root-a kiln.update_server={}\n", srv.base));
            srv.s.lock().unwrap().unavailable = 2;
            let (ok, out) = follow(&d, 4);
            assert!(ok, "{out}");
            assert_eq!(out.matches("rollout: cannot get a challenge from").count(), 1, "{out}");
            assert!(out.contains("503") && out.contains("trying again every 30s"), "{out}");
            assert_eq!(out.matches(&format!("rollout: {} answers again", srv.base)).count(), 1, "{out}");
            assert_eq!(out.matches("rollout: waiting for this node's turn (running 1.0.0, rollout target 2.0.0)").count(), 1, "{out}");
            assert_eq!(srv.reports().len(), 2);
            // Lines ending in CRLF read the same.
            srv.answer("action halt\r\nversion 2.0.0\r\n");
            let (_, out) = follow(&d, 3);
            assert_eq!(out.matches("rollout: the rollout to 2.0.0 is halted (running 1.0.0)").count(), 1, "{out}");
        }

        /// What the node reports follows its boot: rolled-back after a rollback (and the version
        /// it rolled back from is not applied again), failed after a failed step, nothing before
        /// the boot ends.
        #[test]
        fn the_state_follows_the_boot() {
            let (d, srv) = node(UPDATE);
            d.m.write("run/kiln/update-rolled-back", "2.0.0\n");
            let (ok, out) = follow(&d, 1);
            assert!(ok && out.contains("rollout: not applying 2.0.0 again: this boot rolled back from it"), "{out}");
            assert_eq!(srv.reports(), pairs(&[("rolled-back", "1.0.0")]));
            assert!(d.slot_b().iter().all(|&x| x == 0xaa));

            let (d, srv) = node("action halt\nversion 2.0.0\n");
            d.m.write("run/kiln/status", "boot: not ready: failed step(s): site-x (errors above)\n");
            assert!(follow(&d, 1).0);
            assert_eq!(srv.reports(), pairs(&[("failed", "1.0.0")]));

            let (d, srv) = node(UPDATE);
            d.m.write("run/kiln/status", "identity: node=etcd-1 roles=etcd by=cmdline\n");
            let (ok, out) = follow(&d, 1);
            assert!(ok && out.contains("rollout: waiting for this boot to reach ready before reporting"), "{out}");
            assert_eq!(srv.s.lock().unwrap().issued, 0, "nothing asked before ready");
        }

        /// Without a key or a server the agent says why once and asks nothing; a key from another
        /// build is refused by the server, which the console says once.
        #[test]
        fn without_a_key_or_server_it_says_why_and_a_wrong_key_is_refused() {
            let (d, srv) = node(UPDATE);
            d.m.write_mode("etc/kiln/nodes/etcd-1/update/report.key", &format!("{}\n", hex::encode(node_key(&[8; 32], NODE))), 0o600);
            let (ok, out) = follow(&d, 2);
            assert!(ok && out.matches("did not take the ready report of etcd-1").count() == 1 && out.contains("403"), "{out}");
            let refused = srv.s.lock().unwrap().refused;
            assert_eq!((refused, srv.reports().len()), (2, 0));

            d.m.write("etc/kiln/nodes/etcd-1/update/report.key", "not hex\n");
            let (ok, out) = follow(&d, 1);
            assert!(ok && out.contains("/etc/kiln/nodes/etcd-1/update/report.key is not 64 lower-case hex digits"), "{out}");
            std::fs::remove_file(d.m.path().join("etc/kiln/nodes/etcd-1/update/report.key")).unwrap();
            let (ok, out) = follow(&d, 1);
            assert!(ok && out.contains("node etcd-1 has no report key (/etc/kiln/nodes/etcd-1/update/report.key;"), "{out}");
            std::fs::remove_file(d.m.path().join("usr/lib/kiln/update/server")).unwrap();
            let (ok, out) = follow(&d, 1);
            assert!(ok && out.contains("rollout: no rollout server"), "{out}");
            assert_eq!(srv.s.lock().unwrap().issued, 2, "only the wrong key's two challenges");
        }
    }
}

/// `kiln_hmac_sha256` in lib.sh: the rollout agent's report signature, in busybox sh. It must
/// agree with RFC 4231 and with what `kiln serve --rollout` checks (`kiln::rollout`).
mod hmac {
    use std::ffi::OsStr;

    use kiln::rollout::{node_key, report_message, report_signature};

    use super::{overlay, shell};

    /// (success, stdout, stderr) of `kiln_hmac_sha256 KEY MSG`, with the caller's variables
    /// `key msg i n out rest byte` set before and printed after.
    fn run(key: &str, msg: &str) -> (bool, String, String) {
        let lib = overlay("appliance").join("usr/lib/kiln/lib.sh");
        let script = "key=K msg=M i=I n=N out=O rest=R byte=B; . \"$1\"; kiln_hmac_sha256 \"$2\" \"$3\" && echo \"$key $msg $i $n $out $rest $byte\"";
        let out = shell()
            .args([OsStr::new("-c"), OsStr::new(script), OsStr::new("hmac"), lib.as_os_str(), OsStr::new(key), OsStr::new(msg)])
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    fn hmac(key: &str, msg: &str) -> String {
        let (ok, out, err) = run(key, msg);
        assert!(ok, "{out}{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert_eq!(lines[1], "K M I N O R B", "the caller's variables are left alone");
        lines[0].to_string()
    }

    #[test]
    fn the_shell_hmac_matches_rfc_4231_and_kiln_rollout() {
        // RFC 4231 test case 2 ("Jefe") and 6 (a 131-byte key: longer than the block, hashed first).
        assert_eq!(
            hmac(&hex::encode("Jefe"), "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hmac(&"aa".repeat(131), "Test Using Larger Than Block-Size Key - Hash Key First"),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        // A report as the agent signs it: newlines, a node key with bytes above 0x7f and zeros.
        let mut master = [0u8; 32];
        master.iter_mut().enumerate().for_each(|(i, b)| *b = (i * 37 + 200) as u8);
        for (node, state) in [("etcd-1", "ready"), ("a-10", "rolled-back"), ("srv-1", "failed")] {
            let key = node_key(&master, node);
            let msg = report_message(node, "riscv64", "2.10.0", state, &"0f".repeat(32));
            assert_eq!(hmac(&hex::encode(key), &msg), report_signature(&key, &msg), "{node}");
        }
        // A key with a NUL byte and one of 0xff; upper-case hex digits are read too.
        let key = [0u8, 0xff, 0x80, 0x01];
        assert_eq!(
            hmac("00FF8001", "x\n\ny\n"),
            kiln::rollout::hmac_sha256(&key, b"x\n\ny\n").iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
    }

    #[test]
    fn a_key_that_is_not_hex_is_an_error() {
        for bad in ["xyz0", "abc", "ab cd"] {
            let (ok, out, _) = run(bad, "m");
            assert!(!ok && out.contains("[kiln] error: kiln_hmac_sha256: the key"), "{bad}: {out}");
        }
    }
}
