//! The profile's site-specific steps: `boot_scripts` (shell run at every boot after kiln's own
//! boot steps) and `services` (programs init starts and supervises like kiln's own). Rendered
//! into the root by `site_steps`.

use anyhow::{bail, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Profile;

/// One `boot_scripts` entry.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BootScript {
    /// A short name (lower-case letters, digits, `-`): the step's name on the console
    /// (`[kiln] error: boot step site-<name> failed`).
    pub name: String,
    /// POSIX shell (busybox `sh`), run at every boot after kiln's own boot steps, in list order,
    /// with `set -eu`; `kiln_log NAME TEXT` prints a `[kiln] NAME: TEXT` console line. A failing
    /// script is reported on the console and the node does not report ready.
    pub script: String,
}

/// When a service is started again after it exits: the same policy (and YAML forms) as a
/// container's `restart`.
pub use super::containers::Restart;

/// One `services` entry.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// A short name (lower-case letters, digits, `-`): its log is `/var/log/<name>.log`, its
    /// console lines `[kiln] <name>: ...`.
    pub name: String,
    /// The program and its arguments (no shell: `[/usr/bin/sh, -c, "..."]` for one), run as
    /// root once the boot steps are done, output appended to `/var/log/<name>.log`. When it
    /// exits, its status and the log's last lines go to the console.
    pub command: Vec<String>,
    /// `always` (default; with a backoff from 1 s to 60 s while it keeps exiting early),
    /// `on-failure` (only after a non-zero exit status) or `no` (once per boot).
    #[serde(default)]
    pub restart: Restart,
}

/// Names kiln's own steps and services use: a site entry with one would be confused with them.
const RESERVED: &[&str] = &["boot", "k3s", "etcd", "containerd", "ssh", "network", "time", "identity", "ready", "error"];

fn check_name(key: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-');
    if !ok {
        bail!("key `{key}`: `{name}` must be lower-case letters, digits and `-` (at most 32)");
    }
    if RESERVED.contains(&name) {
        bail!("key `{key}`: `{name}` is one of kiln's own step or service names; choose another");
    }
    Ok(())
}

/// Names unique and well-formed, commands and scripts not empty.
pub fn validate(p: &Profile) -> Result<()> {
    for (i, s) in p.boot_scripts.iter().enumerate() {
        check_name(&format!("boot_scripts[{i}].name"), &s.name)?;
        if p.boot_scripts[..i].iter().any(|o| o.name == s.name) {
            bail!("key `boot_scripts[{i}].name`: `{}` is used twice", s.name);
        }
        if s.script.trim().is_empty() {
            bail!("key `boot_scripts[{i}].script`: empty");
        }
    }
    for (i, s) in p.services.iter().enumerate() {
        check_name(&format!("services[{i}].name"), &s.name)?;
        if p.services[..i].iter().any(|o| o.name == s.name) {
            bail!("key `services[{i}].name`: `{}` is used twice", s.name);
        }
        match s.command.first() {
            None => bail!(
                "key `services[{i}].command`: give the program and its arguments, e.g. [/usr/bin/my-agent, --config, /etc/my-agent.conf]"
            ),
            Some(prog) if !prog.starts_with('/') => {
                bail!("key `services[{i}].command`: the program `{prog}` must be an absolute path inside the appliance")
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::test_profile;

    #[test]
    fn names_and_commands_are_checked() {
        let ok = test_profile(
            "boot_scripts: [{name: site-net, script: \"kiln_log site-net hello\"}]\nservices: [{name: agent, command: [/usr/bin/sleep, \"3600\"], restart: on-failure}]\n",
        );
        validate(&ok).unwrap();
        assert_eq!(ok.services[0].restart, Restart::OnFailure);
        for (yaml, want) in [
            ("services: [{name: Agent, command: [/x]}]\n", "services[0].name"),
            ("services: [{name: k3s, command: [/x]}]\n", "kiln's own"),
            ("services: [{name: a, command: []}]\n", "services[0].command"),
            ("services: [{name: a, command: [sleep, \"1\"]}]\n", "absolute path"),
            ("services: [{name: a, command: [/x]}, {name: a, command: [/y]}]\n", "used twice"),
            ("boot_scripts: [{name: s, script: \"  \"}]\n", "boot_scripts[0].script"),
        ] {
            let err = validate(&test_profile(yaml)).unwrap_err().to_string();
            assert!(err.contains(want), "{yaml}: {err}");
        }
    }
}
