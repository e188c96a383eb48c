//! `engine: containerd`: container appliances without Kubernetes. The profile's `containers`
//! run from the bundled `images` under Debian's containerd and runc, each started and
//! supervised by init through kiln's POSIX-sh runner (`overlays/containerd/`).
//!
//! What this module puts into the root:
//! - the containerd overlay: `containerd-run` (the daemon, restarted by init), `images-import`
//!   (imports the image archive once per archive, not at every boot), `container-run NAME` (one
//!   container with its restart policy and backoff) and `await-containers` (prints
//!   `[kiln] ready` once every container that should keep running is RUNNING);
//! - `/etc/containerd/config.toml` (CRI off: no Kubernetes here);
//! - `/etc/kiln/containers/<name>.conf`, one shell fragment per container (image, policy and
//!   the `ctr run` arguments, each single-quoted), so no profile value is ever re-parsed by a
//!   shell on the device;
//! - the `overlay` module at boot (containerd's overlayfs snapshotter) and the init entries.
//!
//! Where containerd keeps its data: `/var/lib/containerd`, which is on the ext4 data partition
//! (the initramfs binds `/var/lib` from it), so the overlayfs snapshotter works. It could not
//! put its upper directories on the root, itself an overlay with a tmpfs upper layer.
//!
//! The `engine` and `containers` keys' types and checks are in `profile::containers`.

use anyhow::{bail, Result};

use crate::kmod::ModuleSet;
use crate::profile::containers::{Container, Engine};
use crate::profile::Profile;
use crate::tree::Tree;

/// Debian packages of the engine: the daemon with `ctr` and the runc shim, and runc itself.
pub const PACKAGES: &[&str] = &["containerd", "runc"];
/// Programs the runner scripts call; the build fails if a package stops shipping one.
const PROGRAMS: &[&str] = &["usr/bin/containerd", "usr/bin/ctr", "usr/bin/containerd-shim-runc-v2", "usr/sbin/runc"];
/// Kernel modules containerd needs at run time (its overlayfs snapshotter).
pub const MODULES: &[&str] = &["overlay"];
/// The per-container settings the runner reads.
pub const CONF_DIR: &str = "etc/kiln/containers";
const CONFIG_TOML: &str = "etc/containerd/config.toml";
const CONTAINERD_RUN: &str = "/usr/lib/kiln/containerd-run";
const IMAGES_IMPORT: &str = "/usr/lib/kiln/images-import";
const CONTAINER_RUN: &str = "/usr/lib/kiln/container-run";
/// The readiness script (the boot script leaves `[kiln] ready` to it when it exists).
pub const AWAIT_CONTAINERS: &str = "/usr/lib/kiln/await-containers";
/// The log rotation helper of every supervised service (in kiln's appliance overlay).
const LOGPIPE: &str = "usr/lib/kiln/logpipe";

/// Containerd's settings. The CRI plugin serves Kubernetes only; left on it would look for CNI
/// configuration and log errors at every start.
const CONFIG: &str = "# Written by kiln (engine: containerd). Containers are run by /usr/lib/kiln/container-run\n\
# with `ctr`, not by Kubernetes, so the CRI plugin is off.\n\
version = 2\n\
root = \"/var/lib/containerd\"\n\
state = \"/run/containerd\"\n\
disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n";
/// The Debian packages the engine needs in the root.
pub fn packages(p: &Profile) -> Vec<&'static str> {
    if p.engine == Engine::Containerd {
        PACKAGES.to_vec()
    } else {
        Vec::new()
    }
}

/// Quotes a value for a POSIX shell: `'...'` with each `'` written as `'\''`.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The shell fragment `container-run` sources for one container: the image, the policy, the
/// host directories to create, and the `ctr run` arguments after `--net-host` as positional
/// parameters (options, image, container name, command).
pub fn container_conf(c: &Container, image: &str) -> String {
    let mut args: Vec<String> = Vec::new();
    for (k, v) in &c.env {
        args.push("--env".into());
        args.push(quote(&format!("{k}={v}")));
    }
    for m in &c.mounts {
        let mode = if m.read_only { "ro" } else { "rw" };
        args.push("--mount".into());
        args.push(quote(&format!("type=bind,src={},dst={},options=rbind:{mode}", m.host, m.container)));
    }
    args.push(quote(image));
    args.push(quote(&c.name));
    args.extend(c.args.iter().map(|a| quote(a)));
    let dirs: Vec<&str> = c.mounts.iter().map(|m| m.host.as_str()).collect();
    format!(
        "# shellcheck shell=sh\n# Container `{}`, written by kiln from the profile's `containers`; sourced by container-run.\n\
KILN_CONTAINER_IMAGE={}\nKILN_CONTAINER_RESTART={}\nKILN_CONTAINER_DIRS={}\nset -- {}\n",
        c.name,
        quote(image),
        c.restart.as_str(),
        quote(&dirs.join(" ")),
        args.join(" ")
    )
}

/// Lays the containerd overlay onto the root with containerd's settings, one settings file per
/// container (the profile's `containers`), the `overlay` module and the init entries. `with_images`: the root carries an
/// image archive to import.
pub fn install(containers: &[Container], root: &mut Tree, modules: &ModuleSet, with_images: bool) -> Result<()> {
    for prog in PROGRAMS {
        if !root.contains(prog) {
            bail!("key `engine`: containerd needs /{prog}, which the packages {} did not install", PACKAGES.join(", "));
        }
    }
    root.merge(&crate::assets::overlay("containerd")?)?;
    if !root.contains(LOGPIPE) {
        bail!("/{LOGPIPE} is missing from the root (kiln's appliance overlay)");
    }
    root.add_file(CONFIG_TOML, 0o644, CONFIG)?;
    crate::kmod::load_needed_at_boot(root, modules, MODULES, "engine")?;
    for c in containers {
        let image = c.image.whole();
        root.add_file(&format!("{CONF_DIR}/{}.conf", c.name), 0o644, container_conf(c, &image))?;
    }
    crate::inittab::append(
        root,
        "containerd (engine: containerd), restarted by init if it exits; output in /var/log/containerd.log.",
        &format!("::respawn:{CONTAINERD_RUN}"),
    )?;
    if with_images {
        crate::inittab::append(
            root,
            "Imports the bundled image archive into containerd (once per archive, not at every boot).",
            &format!("::once:{IMAGES_IMPORT}"),
        )?;
    } else {
        root.remove(&crate::tree::TreePath::parse(IMAGES_IMPORT)?);
    }
    for c in containers {
        crate::inittab::append(
            root,
            &format!(
                "Container `{}` (restart: {}); output in /var/log/containers/{}.log and on the console.",
                c.name,
                c.restart.as_str(),
                c.name
            ),
            &format!("::respawn:{CONTAINER_RUN} {}", c.name),
        )?;
    }
    crate::inittab::append(
        root,
        "Prints `[kiln] ready` once every container that keeps running (restart other than `no`) is RUNNING.",
        &format!("::once:{AWAIT_CONTAINERS}"),
    )
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::Arch;
    use crate::profile::test_profile;

    const IMAGES: &str =
        "images: [busybox:1.36, \"registry.local:5000/app@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"]\n";

    fn profile(extra: &str) -> Profile {
        test_profile(&format!("{IMAGES}{extra}"))
    }

    /// Runs a generated settings file through a real shell and prints the parameters it sets,
    /// one per line: what `ctr run` would receive.
    #[test]
    fn settings_survive_the_shell_verbatim() {
        let p = profile("engine: containerd\ncontainers:\n  - name: web\n    image: busybox:1.36\n    restart: on-failure\n    args: [sh, -c, \"echo 'it''s' $HOME `id` \\\"q\\\"; exit 3\"]\n    env: {GREETING: \"a b 'c'\", B: \"$x\"}\n    mounts: [{host: /var/lib/web, container: /srv, read_only: true}, {host: /run/x, container: /x}]\n");
        let conf = container_conf(&p.containers[0], "docker.io/library/busybox:1.36");
        let script = format!("{conf}\necho \"image=$KILN_CONTAINER_IMAGE restart=$KILN_CONTAINER_RESTART dirs=$KILN_CONTAINER_DIRS\"\nfor a in \"$@\"; do echo \"[$a]\"; done\n");
        let out = std::process::Command::new("sh").arg("-c").arg(&script).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            text,
            "image=docker.io/library/busybox:1.36 restart=on-failure dirs=/var/lib/web /run/x\n\
[--env]\n[B=$x]\n[--env]\n[GREETING=a b 'c']\n\
[--mount]\n[type=bind,src=/var/lib/web,dst=/srv,options=rbind:ro]\n[--mount]\n[type=bind,src=/run/x,dst=/x,options=rbind:rw]\n\
[docker.io/library/busybox:1.36]\n[web]\n[sh]\n[-c]\n[echo 'it''s' $HOME `id` \"q\"; exit 3]\n"
        );
    }

    fn file_text(root: &Tree, path: &str) -> String {
        match &root.get_str(path).map(|e| &e.kind) {
            Some(crate::tree::Kind::File(c)) => String::from_utf8(c.read().unwrap().into_owned()).unwrap(),
            _ => panic!("{path} is not a file"),
        }
    }

    fn root() -> Tree {
        let mut t = Tree::merged_usr(Arch::X86_64);
        t.add_file("etc/inittab", 0o644, "::sysinit:/usr/lib/kiln/boot\n").unwrap();
        t.add_file("usr/lib/kiln/boot", 0o755, "#!/bin/sh\n").unwrap();
        t
    }

    fn kernel() -> ModuleSet {
        ModuleSet {
            kver: "6.12.0-test".into(),
            dir: crate::tree::TreePath::parse("usr/lib/modules/6.12.0-test").unwrap(),
            modules: Default::default(),
            builtin: ["overlay".to_string()].into_iter().collect(),
        }
    }

    #[test]
    fn install_adds_runner_settings_module_and_init_entries() {
        let p = profile(
            "engine: containerd\ncontainers: [{name: hello, image: busybox:1.36}, {name: once, image: busybox:1.36, restart: no}]\n",
        );
        let mut t = root();
        let e = format!("{:#}", install(&p.containers, &mut t, &kernel(), true).unwrap_err());
        assert!(e.contains("/usr/bin/containerd") && e.contains("key `engine`"), "{e}");
        for prog in PROGRAMS {
            t.add_file(prog, 0o755, "elf").unwrap();
        }
        let e = format!("{:#}", install(&p.containers, &mut t, &kernel(), true).unwrap_err());
        assert!(e.contains("logpipe") && e.contains("appliance overlay"), "{e}");
        t.add_file(
            LOGPIPE,
            0o755,
            "#!/bin/sh
",
        )
        .unwrap();
        install(&p.containers, &mut t, &kernel(), true).unwrap();
        let inittab = file_text(&t, "etc/inittab");
        let order: Vec<usize> = [
            "::respawn:/usr/lib/kiln/containerd-run",
            "::once:/usr/lib/kiln/images-import",
            "::respawn:/usr/lib/kiln/container-run hello",
            "::respawn:/usr/lib/kiln/container-run once",
            "::once:/usr/lib/kiln/await-containers",
        ]
        .iter()
        .map(|e| inittab.find(e).unwrap_or_else(|| panic!("{e} missing:\n{inittab}")))
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{inittab}");
        assert!(file_text(&t, "etc/kiln/containers/hello.conf").contains("KILN_CONTAINER_IMAGE='docker.io/library/busybox:1.36'"));
        assert!(file_text(&t, "etc/kiln/containers/once.conf").contains("KILN_CONTAINER_RESTART=no"));
        assert!(file_text(&t, crate::kmod::BOOT_MODULES).lines().any(|l| l == "overlay"));
        assert!(file_text(&t, CONFIG_TOML).contains("io.containerd.grpc.v1.cri"));
        for s in ["containerd-run", "images-import", "container-run", "await-containers", "containers.sh", "logpipe"] {
            assert!(t.contains(&format!("usr/lib/kiln/{s}")), "{s}");
        }
        crate::inittab::check_programs(&t).unwrap();

        // No images: nothing to import, and no entry for it.
        let p = profile("engine: containerd\n");
        let mut t = root();
        for prog in PROGRAMS {
            t.add_file(prog, 0o755, "elf").unwrap();
        }
        t.add_file(
            LOGPIPE,
            0o755,
            "#!/bin/sh
",
        )
        .unwrap();
        install(&p.containers, &mut t, &kernel(), false).unwrap();
        assert!(!file_text(&t, "etc/inittab").contains("images-import") && !t.contains("usr/lib/kiln/images-import"));
        crate::inittab::check_programs(&t).unwrap();
    }
}
