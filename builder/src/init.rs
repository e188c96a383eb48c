//! `kiln init DIR`: a first profile that builds as it is, from the commented examples in
//! `profiles/` (built into the binary, so the starter is the same text the repository tests),
//! with the name, architectures and platform filled in, an overlay directory beside it and the
//! JSON schema for editor completion.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::platform::Platform;

/// The cluster layouts `kiln init --cluster` offers, each from its example profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// No cluster: the quickstart appliance.
    None,
    /// One k3s server (SQLite) and agents: profiles/single-server.yaml.
    Single,
    /// Three k3s servers with embedded etcd, plus agents: profiles/ha-embedded-etcd.yaml.
    HaEtcd,
    /// Three etcd members, k3s servers using them, agents joining a fixed address:
    /// profiles/ha-external-etcd.yaml.
    HaExternalEtcd,
    /// Agents joining an existing cluster: profiles/agents-only.yaml.
    Agents,
}

impl Layout {
    fn example(self) -> (&'static str, &'static str) {
        match self {
            Layout::None => ("quickstart", include_str!("../profiles/quickstart.yaml")),
            Layout::Single => ("single-server", include_str!("../profiles/single-server.yaml")),
            Layout::HaEtcd => ("ha-embedded-etcd", include_str!("../profiles/ha-embedded-etcd.yaml")),
            Layout::HaExternalEtcd => ("ha-external-etcd", include_str!("../profiles/ha-external-etcd.yaml")),
            Layout::Agents => ("agents-only", include_str!("../profiles/agents-only.yaml")),
        }
    }
}

/// The overlay every starter gets: the console banner, a template that uses only what every
/// profile has (the examples' own `vars` differ).
const OVERLAY_ISSUE: &str = "{{name}} ({{arch}}) - kiln appliance, kernel {{kiln.kernel_version}}\nConsole: \\l\n\n";

/// What `kiln init` wrote.
#[derive(Debug)]
pub struct Written {
    pub profile: PathBuf,
    pub overlay: PathBuf,
    pub schema: PathBuf,
}

/// The starter profile's text: the layout's example with `name`, `arch` and `platform` set.
pub fn starter(name: &str, platform: &Platform, layout: Layout) -> Result<String> {
    let (example, text) = layout.example();
    let archs: Vec<&str> = platform.arch.iter().map(|a| a.name()).collect();
    let mut out = String::new();
    let mut seen = (false, false);
    for line in text.lines() {
        if line.starts_with("name: ") {
            out.push_str(&format!("name: {name}\n"));
            seen.0 = true;
        } else if line.starts_with("arch: ") {
            out.push_str(&format!("arch: [{}]\n", archs.join(", ")));
            if platform.name != crate::profile::DEFAULT_PLATFORM {
                out.push_str("# The board (`kiln platforms` lists them) per architecture.\n");
                out.push_str(&format!(
                    "platform: {{{}}}\n",
                    archs.iter().map(|a| format!("{a}: {}", platform.name)).collect::<Vec<_>>().join(", ")
                ));
            }
            seen.1 = true;
        } else if line.trim() == "- site-example" {
            out.push_str(&line.replace("site-example", "overlay"));
            out.push('\n');
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if seen != (true, true) {
        bail!("the example profile {example}.yaml has no `name:` or `arch:` line (a kiln bug)");
    }
    // Boards whose boot files come from another Debian component (the Raspberry Pi firmware
    // is in non-free-firmware) need it read.
    if let Some(fw) = platform.boot.raspberrypi.as_ref().and_then(|r| r.firmware.as_ref()) {
        let line = format!("  # {} ({}) is in {}.\n  components: [main, {}]\n", fw.package, platform.name, fw.component, fw.component);
        out = match out.find("\nos:\n") {
            Some(i) => format!("{}{line}{}", &out[..i + "\nos:\n".len()], &out[i + "\nos:\n".len()..]),
            None => format!("{out}\nos:\n{line}"),
        };
    }
    if !text.contains("- site-example") {
        out.push_str("\n# Directories laid onto the root after kiln's own overlay (relative to this file).\noverlays:\n  - overlay\n");
    }
    // A starter is a template for the user's site, not the example: say where it came from.
    Ok(out.replacen(
        "# yaml-language-server: $schema=kiln.schema.json\n",
        &format!("# yaml-language-server: $schema=kiln.schema.json\n# Written by `kiln init` from profiles/{example}.yaml; `kiln check` checks it.\n"),
        1,
    ))
}

/// A profile name from a directory name: lower-case, other characters as `-`.
pub fn name_for(dir: &Path) -> String {
    let base = dir.canonicalize().ok().and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_default();
    let name: String = base.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let name = name.trim_matches('-').to_string();
    if name.is_empty() {
        "site".into()
    } else {
        name
    }
}

/// Writes DIR/profile.yaml, DIR/overlay/etc/issue.hbs and DIR/kiln.schema.json. Refuses to
/// replace any of them: nothing is overwritten.
pub fn write(dir: &Path, name: &str, platform: &Platform, layout: Layout) -> Result<Written> {
    let w = Written { profile: dir.join("profile.yaml"), overlay: dir.join("overlay"), schema: dir.join("kiln.schema.json") };
    for p in [&w.profile, &w.overlay, &w.schema] {
        if p.exists() {
            bail!("{} exists: kiln init writes a new profile and never replaces files; pick an empty directory", p.display());
        }
    }
    let text = starter(name, platform, layout)?;
    std::fs::create_dir_all(w.overlay.join("etc")).with_context(|| format!("creating {}", w.overlay.display()))?;
    std::fs::write(w.overlay.join("etc/issue.hbs"), OVERLAY_ISSUE)?;
    let schema = serde_json::to_string_pretty(&crate::profile::json_schema())? + "\n";
    std::fs::write(&w.schema, schema)?;
    std::fs::write(&w.profile, text).with_context(|| format!("writing {}", w.profile.display()))?;
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::LoadedProfile;

    /// Every layout on the default platform gives a profile that passes the profile checks,
    /// named as asked, with the overlay beside it.
    #[test]
    fn every_layout_writes_a_profile_that_checks() {
        for layout in [Layout::None, Layout::Single, Layout::HaEtcd, Layout::HaExternalEtcd, Layout::Agents] {
            let d = tempfile::tempdir().unwrap();
            let p = Platform::load("generic-uefi").unwrap();
            let w = write(d.path(), "my-site", &p, layout).unwrap();
            let loaded = LoadedProfile::load(&w.profile).unwrap_or_else(|e| panic!("{layout:?}: {e:#}"));
            let templates = crate::pipeline::template_problems(&loaded);
            assert!(templates.is_empty(), "{layout:?}: {templates:?}");
            assert_eq!(loaded.profile.name, "my-site");
            assert_eq!(loaded.profile.arch.len(), 3);
            assert!(w.overlay.join("etc/issue.hbs").is_file() && w.schema.is_file());
            let again = write(d.path(), "my-site", &p, layout).unwrap_err().to_string();
            assert!(again.contains("exists") && again.contains("never replaces"), "{again}");
        }
    }

    /// A Raspberry Pi starter is aarch64 only, names the platform and reads non-free-firmware.
    #[test]
    fn board_starters_get_their_architectures_platform_and_component() {
        for layout in [Layout::None, Layout::Agents] {
            let d = tempfile::tempdir().unwrap();
            let w = write(d.path(), "pis", &Platform::load("rpi4").unwrap(), layout).unwrap();
            let loaded = LoadedProfile::load(&w.profile).unwrap_or_else(|e| panic!("{layout:?}: {e:#}"));
            assert_eq!(loaded.profile.arch, vec![crate::arch::Arch::Aarch64]);
            assert_eq!(loaded.platform(crate::arch::Arch::Aarch64), "rpi4");
            assert!(loaded.profile.os.components.contains(&"non-free-firmware".to_string()), "{layout:?}");
            Platform::load("rpi4").unwrap().check_components(&loaded.profile.os.components).unwrap();
        }
    }

    #[test]
    fn names_come_from_the_directory() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("Rack 7_North");
        std::fs::create_dir(&dir).unwrap();
        assert_eq!(name_for(&dir), "rack-7-north");
    }
}
