//! The profile's `manifests` and `charts` keys (what k3s deploys by itself from the image): the
//! chart entry's types, where a chart comes from, and the checks that need no chart (paths,
//! names, a cluster with servers), each error naming its key. `deploy` renders and places them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::cluster::{Cluster, DefaultRole};
use super::Profile;
use crate::image_ref::{ImageRef, InvalidImageRef};

/// Release names of k3s's own packaged `HelmChart`s: a chart of the profile with one of these
/// names would fight k3s over it.
const K3S_RELEASES: &[&str] = &["traefik", "traefik-crd"];

/// One entry of `charts`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChartSpec {
    /// The chart: `oci://host/repository/name:version` (or `...@sha256:<hex>`; pulled with the
    /// options of `image_registries` for that host, verified and cached like images), a packaged
    /// chart `.tgz`, or a chart directory (with `Chart.yaml`) that kiln packs itself. Paths are
    /// relative to the profile. With `repo`: the chart's name in that repository.
    pub chart: ChartRef,
    /// A classic Helm chart repository (`https://charts.example.org/stable`): `chart` is the
    /// chart's name and `version` is required. The repository's `index.yaml` gives the chart's
    /// URL and sha256; the `.tgz` is verified against it and cached, so builds after `kiln fetch`
    /// run offline.
    #[serde(default)]
    pub repo: Option<String>,
    /// The release name (the `HelmChart`'s name): a lower-case DNS label of at most 53
    /// characters. Default: the chart's name.
    #[serde(default)]
    pub name: Option<String>,
    /// The namespace the chart's resources go into (`targetNamespace`; created if missing).
    /// Default: `default`.
    #[serde(default)]
    pub namespace: Option<String>,
    /// The chart version this entry expects: the build fails if the chart's `Chart.yaml` says
    /// otherwise. Written into the `HelmChart` as `version`.
    #[serde(default)]
    pub version: Option<String>,
    /// Values for the chart (a YAML mapping), written into the `HelmChart` as `valuesContent`.
    #[serde(default)]
    pub values: BTreeMap<String, serde_json::Value>,
}

/// A `charts` entry's `chart` as written: `oci://<reference>`, whose reference is parsed and
/// checked when the profile is read, or a path. `Display` and serde give the text back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChartRef {
    /// A registry chart (the reference after `oci://`).
    Oci(ImageRef),
    /// A packaged chart or a chart directory, relative to the profile.
    Path(String),
}

impl FromStr for ChartRef {
    type Err = InvalidImageRef;
    fn from_str(s: &str) -> Result<ChartRef, InvalidImageRef> {
        match s.strip_prefix("oci://") {
            Some(r) => r.parse().map(ChartRef::Oci),
            None => Ok(ChartRef::Path(s.to_string())),
        }
    }
}

impl fmt::Display for ChartRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChartRef::Oci(r) => write!(f, "oci://{}", r.as_str()),
            ChartRef::Path(p) => f.write_str(p),
        }
    }
}

impl<'de> Deserialize<'de> for ChartRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for ChartRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

// A plain string in the schema, like [`ImageRef`].
crate::image_ref::json_schema_as_string!(ChartRef);

/// Where a chart entry comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A registry reference.
    Oci(ImageRef),
    /// A chart of a classic Helm repository: the repository URL, the chart's name, its version.
    Repo { url: String, name: String, version: String },
    /// A packaged chart.
    Archive(PathBuf),
    /// A chart directory.
    Dir(PathBuf),
}

impl Source {
    pub fn of(spec: &ChartSpec, base_dir: &Path) -> Source {
        if let Some(url) = &spec.repo {
            let version = spec.version.clone().unwrap_or_default();
            return Source::Repo { url: url.trim_end_matches('/').to_string(), name: spec.chart.to_string(), version };
        }
        match &spec.chart {
            ChartRef::Oci(r) => Source::Oci(r.clone()),
            ChartRef::Path(s) if s.ends_with(".tgz") || s.ends_with(".tar.gz") => Source::Archive(base_dir.join(s)),
            ChartRef::Path(s) => Source::Dir(base_dir.join(s)),
        }
    }
}

/// Whether any machine of the cluster runs a k3s server (only servers deploy manifests).
fn has_servers(c: &Cluster) -> bool {
    c.servers().next().is_some() || c.default_role == DefaultRole::Server
}

/// Semantic checks of `manifests` and `charts` (the profile file is named by the caller).
pub fn validate(p: &Profile, base_dir: &Path) -> Result<()> {
    for (key, used) in [("manifests", !p.manifests.is_empty()), ("charts", !p.charts.is_empty())] {
        match &p.cluster {
            _ if !used => {}
            Some(c) if has_servers(c) => {}
            _ => bail!("key `{key}`: k3s servers deploy these, but the profile has no `cluster` with a node of role `server` (or `default_role: server`); an image of agents only joins a cluster whose servers carry them"),
        }
    }
    for (i, c) in p.charts.iter().enumerate() {
        validate_chart(i, c, base_dir)?;
    }
    for (i, m) in p.manifests.iter().enumerate() {
        let path = base_dir.join(m);
        if !path.exists() {
            bail!("key `manifests[{i}]`: {} does not exist (paths are relative to the profile)", path.display());
        }
    }
    Ok(())
}

/// Whether `s` is a lower-case DNS label (RFC 1123) of at most `max` characters.
fn is_label(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && super::cluster::is_label(s)
}

/// Checks of one `charts` entry that need no chart: the source's shape and the names.
fn validate_chart(i: usize, spec: &ChartSpec, base_dir: &Path) -> Result<()> {
    let key = format!("charts[{i}]");
    match Source::of(spec, base_dir) {
        Source::Repo { url, name, version } => {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                bail!("key `{key}.repo`: `{url}` is not an http(s):// URL of a Helm chart repository");
            }
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                bail!("key `{key}.chart`: with `repo`, `chart` is the chart's name in the repository (e.g. `nginx`), not `{name}`");
            }
            if version.is_empty() {
                bail!("key `{key}.version`: a chart from `repo` needs its version (the repository's index lists them)");
            }
        }
        Source::Oci(r) if !r.as_str().contains('/') => {
            bail!("key `{key}.chart`: `{}` names no registry host (`oci://host/repository/name:version`)", spec.chart)
        }
        Source::Archive(p) if !p.is_file() => bail!("key `{key}.chart`: {} does not exist (paths are relative to the profile)", p.display()),
        Source::Dir(p) if !p.join("Chart.yaml").is_file() => bail!(
            "key `{key}.chart`: {} is not a chart directory (no Chart.yaml); give a directory with Chart.yaml, a `.tgz`, or `oci://host/repository/name:version`",
            p.display()
        ),
        _ => {}
    }
    if let Some(n) = &spec.name {
        check_release(n, &key)?;
    }
    if let Some(ns) = &spec.namespace {
        if !is_label(ns, 63) {
            bail!("key `{key}.namespace`: `{ns}` is not a Kubernetes namespace name (a lower-case DNS label)");
        }
    }
    Ok(())
}

/// A release name (`charts[i].name`, or the chart's own name): a DNS label that is not one of
/// k3s's packaged charts. Checked again by `deploy::chart::gather` once the chart's name is known.
pub fn check_release(n: &str, key: &str) -> Result<()> {
    if !is_label(n, 53) {
        bail!("key `{key}`: release name `{n}` must be a lower-case DNS label of at most 53 characters (set `name:` to choose another)");
    }
    if K3S_RELEASES.contains(&n) {
        bail!("key `{key}`: release name `{n}` is one of k3s's packaged charts; set another `name:`, or turn k3s's own off with `cluster.k3s.config` `disable: [traefik]`");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::test_profile;

    const SERVER: &str = "cluster: {name: lab, nodes: [{name: s1, mac: \"52:54:00:00:00:01\", roles: [server]}]}\n";
    const AGENTS: &str =
        "cluster: {name: lab, api_address: 10.0.0.1, token_file: t, nodes: [{name: a1, mac: \"52:54:00:00:00:01\", roles: [agent]}]}\n";

    #[test]
    fn manifests_need_a_cluster_with_servers_and_existing_paths() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("app.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n").unwrap();
        let with = |extra: &str| test_profile(&format!("manifests: [app.yaml]\n{extra}"));
        let err = validate(&with(""), d.path()).unwrap_err().to_string();
        assert!(err.contains("key `manifests`") && err.contains("no `cluster`"), "{err}");
        let err = validate(&with(AGENTS), d.path()).unwrap_err().to_string();
        assert!(err.contains("role `server`"), "{err}");
        validate(&with(SERVER), d.path()).unwrap();
        let p = test_profile(&format!("manifests: [app.yaml, gone]\n{SERVER}"));
        let err = validate(&p, d.path()).unwrap_err().to_string();
        assert!(err.contains("key `manifests[1]`") && err.contains("gone"), "{err}");
    }

    #[test]
    fn entries_are_checked_before_anything_is_pulled() {
        let d = tempfile::tempdir().unwrap();
        let spec = |chart: &str| ChartSpec {
            chart: chart.parse().unwrap(),
            repo: None,
            name: None,
            namespace: None,
            version: None,
            values: BTreeMap::new(),
        };
        let e = validate_chart(0, &spec("missing.tgz"), d.path()).unwrap_err().to_string();
        assert!(e.contains("charts[0].chart") && e.contains("missing.tgz"), "{e}");
        let e = validate_chart(1, &spec("nodir"), d.path()).unwrap_err().to_string();
        assert!(e.contains("charts[1].chart") && e.contains("no Chart.yaml"), "{e}");
        assert!("oci://Not A Ref".parse::<ChartRef>().unwrap_err().to_string().contains("`Not A Ref` is not an image reference"));
        let e = validate_chart(0, &spec("oci://hello:0.1.0"), d.path()).unwrap_err().to_string();
        assert!(e.contains("charts[0].chart") && e.contains("`oci://hello:0.1.0` names no registry host"), "{e}");
        validate_chart(0, &spec("oci://r.example:5000/charts/hello:0.1.0"), d.path()).unwrap();
        let e = validate_chart(0, &ChartSpec { name: Some("traefik".into()), ..spec("oci://r.example/c/t:1") }, d.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("packaged charts"), "{e}");
        let e = validate_chart(0, &ChartSpec { namespace: Some("Bad_NS".into()), ..spec("oci://r.example/c/t:1") }, d.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("charts[0].namespace"), "{e}");
        let repo = |url: &str, chart: &str, version: Option<&str>| ChartSpec {
            repo: Some(url.into()),
            version: version.map(String::from),
            ..spec(chart)
        };
        validate_chart(0, &repo("https://charts.example.org/stable", "nginx", Some("1.2.3")), d.path()).unwrap();
        let e = validate_chart(0, &repo("https://charts.example.org", "nginx", None), d.path()).unwrap_err().to_string();
        assert!(e.contains("charts[0].version") && e.contains("needs its version"), "{e}");
        let e = validate_chart(0, &repo("ftp://x", "nginx", Some("1")), d.path()).unwrap_err().to_string();
        assert!(e.contains("charts[0].repo"), "{e}");
        let e = validate_chart(0, &repo("https://x", "stable/nginx", Some("1")), d.path()).unwrap_err().to_string();
        assert!(e.contains("charts[0].chart") && e.contains("chart's name"), "{e}");
    }
}
