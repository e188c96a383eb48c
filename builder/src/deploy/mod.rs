//! What k3s deploys by itself from the image (profile keys `manifests` and `charts`): Kubernetes
//! YAML in k3s's auto-deploy directory, and Helm charts in its static directory with one
//! `HelmChart` manifest each, so a server with no uplink installs them at its first start.
//!
//! The files go into the read-only root under `/var/lib/rancher/k3s/server/`: at run time that
//! path is on the overlay over the data partition, so k3s still writes its own files beside them.

pub mod chart;
pub mod manifests;

use std::path::Path;

use anyhow::{bail, Result};

use crate::profile::cluster::{Cluster, DefaultRole};
use crate::manifest::Input;
use crate::profile::Profile;
use crate::tree::Tree;

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
        chart::validate(i, c, base_dir)?;
    }
    for (i, m) in p.manifests.iter().enumerate() {
        let path = base_dir.join(m);
        if !path.exists() {
            bail!("key `manifests[{i}]`: {} does not exist (paths are relative to the profile)", path.display());
        }
    }
    Ok(())
}

/// Renders the profile's manifests into the root (0644 under k3s's manifests directory) and
/// returns their records for `manifest.json` (kind `manifest`, digest of the rendered file).
pub fn place_manifests(p: &Profile, base_dir: &Path, context: &serde_json::Value, root: &mut Tree) -> Result<Vec<Input>> {
    let mut inputs = Vec::new();
    for r in manifests::render(&p.manifests, base_dir, context)? {
        let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&r.content));
        let size = r.content.len() as u64;
        root.add_file(&format!("{}/{}", manifests::DIR, r.path), 0o644, r.content)?;
        inputs.push(Input { kind: "manifest".into(), name: r.path, version: None, sha256, size: Some(size) });
    }
    Ok(inputs)
}

/// Puts each chart's `.tgz` into k3s's static directory (0644) and its `HelmChart` into the
/// manifests directory, and returns their records for `manifest.json` (kind `chart`). Runs after
/// [`place_manifests`], so a manifest of the profile with a `HelmChart`'s file name is refused.
pub fn place_charts(charts: &[chart::Chart], root: &mut Tree) -> Result<Vec<Input>> {
    use crate::tree::{Entry, Kind, Meta, TreePath};
    let mut inputs = Vec::new();
    for c in charts {
        let tgz = format!("{}/{}", chart::STATIC_DIR, c.meta.file_name());
        if !root.contains(&tgz) {
            root.insert(&TreePath::parse(&tgz)?, Entry { meta: Meta::root(0o644), kind: Kind::File(c.content.clone()) })?;
        }
        let file = chart::helmchart_file(c);
        let path = format!("{}/{file}", manifests::DIR);
        if root.contains(&path) {
            bail!("key `charts[{}]`: its HelmChart goes to {path}, but `manifests` already has a file of that name; rename that file", c.index);
        }
        root.add_file(&path, 0o644, chart::helmchart(c)?)?;
        inputs.push(Input { kind: "chart".into(), name: c.source.clone(), version: Some(c.meta.version.clone()), sha256: c.sha256.clone(), size: Some(c.size) });
    }
    Ok(inputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = "cluster: {name: lab, nodes: [{name: s1, mac: \"52:54:00:00:00:01\", roles: [server]}]}\n";
    const AGENTS: &str = "cluster: {name: lab, api_address: 10.0.0.1, token_file: t, nodes: [{name: a1, mac: \"52:54:00:00:00:01\", roles: [agent]}]}\n";

    #[test]
    fn manifests_need_a_cluster_with_servers_and_existing_paths() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("app.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n").unwrap();
        let parse = |extra: &str| crate::profile::parse(&format!("name: d\narch: [x86_64]\nmanifests: [app.yaml]\n{extra}")).unwrap();
        let err = validate(&parse(""), d.path()).unwrap_err().to_string();
        assert!(err.contains("key `manifests`") && err.contains("no `cluster`"), "{err}");
        let err = validate(&parse(AGENTS), d.path()).unwrap_err().to_string();
        assert!(err.contains("role `server`"), "{err}");
        validate(&parse(SERVER), d.path()).unwrap();
        let p = crate::profile::parse(&format!("name: d\narch: [x86_64]\nmanifests: [app.yaml, gone]\n{SERVER}")).unwrap();
        let err = validate(&p, d.path()).unwrap_err().to_string();
        assert!(err.contains("key `manifests[1]`") && err.contains("gone"), "{err}");
    }

    #[test]
    fn manifests_land_in_the_auto_deploy_directory() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("app.yaml.hbs"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: \"{{name}}\"}\n").unwrap();
        let p = crate::profile::parse(&format!("name: d\narch: [x86_64]\nmanifests: [app.yaml.hbs]\n{SERVER}")).unwrap();
        let mut root = Tree::new();
        let inputs = place_manifests(&p, d.path(), &serde_json::json!({"name": "shop"}), &mut root).unwrap();
        let e = root.get_str("var/lib/rancher/k3s/server/manifests/app.yaml").expect("placed");
        assert_eq!(e.meta.mode, 0o644);
        match &e.kind {
            crate::tree::Kind::File(c) => assert!(String::from_utf8_lossy(&c.read().unwrap()).contains("name: \"shop\"")),
            k => panic!("{k:?}"),
        }
        assert_eq!((inputs.len(), inputs[0].kind.as_str(), inputs[0].name.as_str()), (1, "manifest", "app.yaml"));
    }

    #[test]
    fn charts_need_servers_and_land_beside_their_helmchart() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("hello")).unwrap();
        std::fs::write(d.path().join("hello/Chart.yaml"), "apiVersion: v2\nname: hello\nversion: 0.2.0\n").unwrap();
        let text = "name: d\narch: [x86_64]\ncharts: [{chart: hello, namespace: shop, values: {replicas: 2}}]\n";
        let p = crate::profile::parse(text).unwrap();
        assert!(validate(&p, d.path()).unwrap_err().to_string().contains("key `charts`"));
        let p = crate::profile::parse(&format!("{text}{SERVER}")).unwrap();
        validate(&p, d.path()).unwrap();

        let fetcher = crate::fetch::Fetcher { offline: true, cache: crate::cache::Cache::new(d.path().join("cache")), progress: false };
        let mut puller = crate::oci::pull::Puller::new(&fetcher, &p.image_registries, d.path());
        let charts = chart::gather(&p.charts, d.path(), &mut puller, 0).unwrap();
        let mut root = Tree::new();
        let inputs = place_charts(&charts, &mut root).unwrap();
        assert!(root.contains("var/lib/rancher/k3s/server/static/charts/hello-0.2.0.tgz"));
        assert!(root.contains("var/lib/rancher/k3s/server/manifests/chart-hello.yaml"));
        assert_eq!((inputs[0].kind.as_str(), inputs[0].version.as_deref()), ("chart", Some("0.2.0")));
        assert_eq!(inputs[0].sha256, charts[0].sha256);

        // A pinned version that the chart does not have, and a manifest in the HelmChart's place.
        let p = crate::profile::parse(&format!("name: d\narch: [x86_64]\ncharts: [{{chart: hello, version: 9.9.9}}]\n{SERVER}")).unwrap();
        let err = chart::gather(&p.charts, d.path(), &mut puller, 0).unwrap_err().to_string();
        assert!(err.contains("charts[0].version") && err.contains("0.2.0"), "{err}");
        let mut root = Tree::new();
        root.add_file("var/lib/rancher/k3s/server/manifests/chart-hello.yaml", 0o644, "x").unwrap();
        assert!(place_charts(&charts, &mut root).unwrap_err().to_string().contains("already has a file"));
    }
}
