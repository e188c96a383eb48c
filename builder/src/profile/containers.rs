//! The profile's `engine` and `containers` keys (container appliances without Kubernetes): their
//! types and the checks the types cannot express, each error naming its key. `containerd`
//! installs the engine and the containers' settings into the root.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use super::Profile;
use crate::image_ref::ImageRef;

/// What runs the profile's workloads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    /// k3s (needs `cluster`): bundled `images` are imported by k3s.
    #[default]
    K3s,
    /// containerd without Kubernetes: bundled `images` are imported by containerd and the
    /// profile's `containers` run from them, supervised by init. Not together with `cluster`.
    Containerd,
}

/// One container of an `engine: containerd` appliance.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Container {
    /// The container's name: letters, digits, `-`, `_`, `.` (starting with a letter or digit,
    /// at most 64). Names its log `/var/log/containers/<name>.log` and its console prefix.
    pub name: String,
    /// The image, exactly one of `images` (compared after normalising: `busybox:1.36` and
    /// `docker.io/library/busybox:1.36` are the same).
    pub image: ImageRef,
    /// The command and its arguments, replacing the image's entrypoint and command. Empty: the
    /// image's own.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables, added to the image's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Bind mounts from the appliance into the container. A missing host directory is created
    /// at start (use a path under `/var/lib` to keep its contents across reboots: the root is
    /// read-only with a RAM layer).
    #[serde(default)]
    pub mounts: Vec<Mount>,
    /// When the container is started again after it exits: `always` (default), `on-failure`
    /// (non-zero exit status) or `no`. Restarts back off from 1 s to 60 s; a container that ran
    /// for a minute starts again after 1 s.
    #[serde(default)]
    pub restart: Restart,
}

/// A bind mount of a container.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// Absolute path on the appliance.
    pub host: String,
    /// Absolute path inside the container.
    pub container: String,
    /// Mount it read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// A container's restart policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    /// Started again whatever its exit status.
    #[default]
    Always,
    /// Started again only after a non-zero exit status.
    OnFailure,
    /// Run once per boot.
    No,
}

impl Restart {
    pub fn as_str(self) -> &'static str {
        match self {
            Restart::Always => "always",
            Restart::OnFailure => "on-failure",
            Restart::No => "no",
        }
    }
}

impl<'de> Deserialize<'de> for Restart {
    /// Accepts the YAML 1.1 boolean `no` (unquoted `restart: no`) as the policy `no`.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            B(bool),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::B(false) => Ok(Restart::No),
            Raw::S(s) if s == "always" => Ok(Restart::Always),
            Raw::S(s) if s == "on-failure" => Ok(Restart::OnFailure),
            Raw::S(s) if s == "no" => Ok(Restart::No),
            Raw::B(true) => Err(serde::de::Error::custom("restart policy `true`: use `always`, `on-failure` or `no`")),
            Raw::S(s) => Err(serde::de::Error::custom(format!("unknown restart policy `{s}`: use `always`, `on-failure` or `no`"))),
        }
    }
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && n.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A path `ctr --mount` can take: absolute, and free of the `,` and `:` its option syntax
/// splits on (and of whitespace, so the runner can list them).
fn valid_mount_path(p: &str) -> bool {
    p.starts_with('/') && !p.contains(|c: char| c == ',' || c == ':' || c.is_whitespace() || c == '\'') && !p.split('/').any(|s| s == "..")
}

/// Semantic checks of `engine` and `containers` (the profile file is named by the caller).
pub fn validate(p: &Profile) -> Result<()> {
    match p.engine {
        Engine::K3s => {
            if !p.containers.is_empty() {
                bail!("key `containers`: containers run with `engine: containerd` only (with k3s, workloads are Kubernetes manifests)");
            }
        }
        Engine::Containerd => {
            if p.cluster.is_some() {
                bail!("key `engine`: `containerd` runs containers without Kubernetes and cannot be combined with `cluster` (k3s brings its own containerd); drop one of them");
            }
        }
    }
    let images: BTreeSet<String> = p.images.iter().map(ImageRef::whole).collect();
    let mut names = BTreeMap::new();
    for (i, c) in p.containers.iter().enumerate() {
        let key = format!("containers[{i}]");
        if !valid_name(&c.name) {
            bail!(
                "key `{key}.name`: `{}` must be letters, digits, `-`, `_` or `.`, starting with a letter or digit, at most 64 characters",
                c.name
            );
        }
        if let Some(j) = names.insert(c.name.as_str(), i) {
            bail!("key `{key}.name`: `{}` is already the name of `containers[{j}]`", c.name);
        }
        if !images.contains(&c.image.whole()) {
            let listed = if p.images.is_empty() {
                "`images` is empty".to_string()
            } else {
                format!("`images` lists {}", p.images.iter().map(ImageRef::as_str).collect::<Vec<_>>().join(", "))
            };
            bail!("key `{key}.image`: `{}` is not one of the bundled images ({listed}); add it to `images`", c.image.as_str());
        }
        for k in c.env.keys() {
            let mut chars = k.chars();
            if !matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
                || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                bail!("key `{key}.env.{k}`: variable names are letters, digits and `_`, not starting with a digit");
            }
        }
        for (m, mount) in c.mounts.iter().enumerate() {
            for (what, path) in [("host", &mount.host), ("container", &mount.container)] {
                if !valid_mount_path(path) {
                    bail!("key `{key}.mounts[{m}].{what}`: `{path}` must be an absolute path without `..`, `,`, `:`, quotes or spaces");
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{test_parse_error, test_profile};

    const IMAGES: &str =
        "images: [busybox:1.36, \"registry.local:5000/app@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"]\n";

    fn profile(extra: &str) -> Profile {
        test_profile(&format!("{IMAGES}{extra}"))
    }

    fn err(extra: &str) -> String {
        format!("{:#}", validate(&profile(extra)).unwrap_err())
    }

    #[test]
    fn keys_parse_with_defaults_and_yaml_no() {
        let p = profile("engine: containerd\ncontainers:\n  - {name: a, image: busybox:1.36}\n  - {name: b, image: busybox:1.36, restart: no, args: [sh, -c, 'echo hi'], env: {A: \"1\"}, mounts: [{host: /var/lib/b, container: /data, read_only: true}]}\n  - {name: c, image: busybox:1.36, restart: on-failure}\n");
        assert_eq!(p.engine, Engine::Containerd);
        let r: Vec<Restart> = p.containers.iter().map(|c| c.restart).collect();
        assert_eq!(r, [Restart::Always, Restart::No, Restart::OnFailure]);
        assert!(p.containers[1].mounts[0].read_only);
        validate(&p).unwrap();
        assert_eq!(test_profile("").engine, Engine::K3s);
        let e = test_parse_error("engine: docker\n");
        assert!(e.contains("docker"), "{e}");
        let e = test_parse_error("containers: [{name: a, image: x, restart: sometimes}]\n");
        assert!(e.contains("sometimes"), "{e}");
        let e = test_parse_error("containers: [{name: a, image: x, ports: [80]}]\n");
        assert!(e.contains("ports"), "{e}");
    }

    #[test]
    fn validation_names_the_key() {
        let e = err("containers: [{name: a, image: busybox:1.36}]\n");
        assert!(e.contains("key `containers`") && e.contains("engine: containerd"), "{e}");
        let e = err("engine: containerd\ncluster: {name: lab, nodes: [{name: s1, mac: \"52:54:00:00:00:01\", roles: [server]}]}\n");
        assert!(e.contains("key `engine`") && e.contains("cluster"), "{e}");
        let e = err("engine: containerd\ncontainers: [{name: a, image: nginx:1}]\n");
        assert!(e.contains("key `containers[0].image`") && e.contains("nginx:1") && e.contains("busybox:1.36"), "{e}");
        let e = err("engine: containerd\ncontainers: [{name: a, image: busybox:1.36}, {name: a, image: docker.io/library/busybox:1.36}]\n");
        assert!(e.contains("key `containers[1].name`") && e.contains("containers[0]"), "{e}");
        let e = err("engine: containerd\ncontainers: [{name: -x, image: busybox:1.36}]\n");
        assert!(e.contains("containers[0].name"), "{e}");
        let e = err("engine: containerd\ncontainers: [{name: a, image: busybox:1.36, env: {1X: y}}]\n");
        assert!(e.contains("containers[0].env.1X"), "{e}");
        let e = err("engine: containerd\ncontainers: [{name: a, image: busybox:1.36, mounts: [{host: data, container: /d}]}]\n");
        assert!(e.contains("containers[0].mounts[0].host"), "{e}");
        let e = err("engine: containerd\ncontainers: [{name: a, image: busybox:1.36, mounts: [{host: /a, container: \"/b,c\"}]}]\n");
        assert!(e.contains("containers[0].mounts[0].container"), "{e}");
        // A digest reference matches itself.
        validate(&profile("engine: containerd\ncontainers: [{name: a, image: \"registry.local:5000/app@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"}]\n")).unwrap();
    }
}
