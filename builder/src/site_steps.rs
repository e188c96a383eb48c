//! The profile's site steps in the root: each `boot_scripts` entry as a boot step after kiln's
//! own (`/usr/lib/kiln/boot.d/9NN-<name>.sh`, run in list order by `/usr/lib/kiln/boot`), and
//! each `services` entry as a run script under `/usr/lib/kiln/services/` with an inittab
//! respawn entry, supervised by `kiln_supervise` like kiln's own services.

use anyhow::{bail, Result};

use crate::profile::Profile;
use crate::tree::Tree;

/// Where the run scripts of site services go.
pub const SERVICES_DIR: &str = "usr/lib/kiln/services";

/// Quotes a word for a POSIX shell: `'...'` with each `'` written as `'\''`.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

pub fn render(p: &Profile, root: &mut Tree) -> Result<()> {
    if p.boot_scripts.len() > 100 {
        bail!("key `boot_scripts`: at most 100 entries");
    }
    for (i, s) in p.boot_scripts.iter().enumerate() {
        // 9NN sorts after kiln's own steps (10- to 60-) and keeps the list's order; the boot
        // runner names the step after the digits: `site-<name>`.
        let text = format!(
            "# The profile's boot_scripts[{i}] `{}`, written by kiln; sourced by /usr/lib/kiln/boot with set -eu.\n{}\n",
            s.name, s.script
        );
        root.add_file(&format!("usr/lib/kiln/boot.d/9{i:02}-site-{}.sh", s.name), 0o644, text)?;
    }
    for (i, s) in p.services.iter().enumerate() {
        let restart = s.restart.as_str();
        let command: Vec<String> = s.command.iter().map(|w| quote(w)).collect();
        let name = &s.name;
        let text = format!(
            "#!/bin/sh\n\
             # The profile's services[{i}] `{name}`, written by kiln. init runs this (an inittab respawn\n\
             # entry) once the boot steps are done; kiln_supervise logs to /var/log/{name}.log and, when\n\
             # the program exits, prints its status and last log lines, then backs off (restart: {restart}).\n\
             set -eu\n\
             . /usr/lib/kiln/lib.sh\n\
             mkdir -p /var/log\n\
             kiln_log {name} \"starting (log /var/log/{name}.log)\"\n\
             KILN_RESTART={restart} kiln_supervise {name} /var/log/{name}.log {}\n",
            command.join(" ")
        );
        let path = format!("{SERVICES_DIR}/{name}");
        root.add_file(&path, 0o755, text)?;
        crate::inittab::append(root, &format!("site service `{name}` (profile key `services[{i}]`)"), &format!("::respawn:/{path}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Kind;

    fn text(t: &Tree, p: &str) -> String {
        match t.get_str(p).map(|e| &e.kind) {
            Some(Kind::File(c)) => String::from_utf8(c.read().unwrap().into_owned()).unwrap(),
            other => panic!("{p}: {other:?}"),
        }
    }

    #[test]
    fn scripts_become_late_boot_steps_and_services_supervised_entries() {
        let p = crate::profile::test_profile(
            "boot_scripts:\n  - {name: net-check, script: \"kiln_log net-check ok\"}\n  - {name: banner, script: \"echo hi\"}\nservices:\n  - {name: agent, command: [/usr/bin/sh, -c, \"echo it's up; sleep 60\"], restart: on-failure}\n",
        );
        let mut t = Tree::new();
        t.add_file("etc/inittab", 0o644, "::sysinit:/usr/lib/kiln/boot\n").unwrap();
        render(&p, &mut t).unwrap();
        assert!(text(&t, "usr/lib/kiln/boot.d/900-site-net-check.sh").ends_with("kiln_log net-check ok\n"));
        assert!(t.contains("usr/lib/kiln/boot.d/901-site-banner.sh"));
        let run = text(&t, "usr/lib/kiln/services/agent");
        assert!(
            run.contains(
                "KILN_RESTART=on-failure kiln_supervise agent /var/log/agent.log '/usr/bin/sh' '-c' 'echo it'\\''s up; sleep 60'\n"
            ),
            "{run}"
        );
        assert!(text(&t, "etc/inittab").ends_with("::respawn:/usr/lib/kiln/services/agent\n"));
    }
}
