//! What k3s deploys by itself from the image (profile keys `manifests` and `charts`): Kubernetes
//! YAML in k3s's auto-deploy directory, and Helm charts in its static directory with one
//! `HelmChart` manifest each, so a server with no uplink installs them at its first start.
//!
//! The files go into the read-only root under `/var/lib/rancher/k3s/server/`: at run time that
//! path is on the overlay over the data partition, so k3s still writes its own files beside them.
//!
//! The `manifests` and `charts` keys' types and checks are in `profile::deploy`.

pub mod chart;
pub mod helm_repo;
pub mod manifests;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::manifest::{Input, InputKind};
use crate::tree::Tree;

/// Renders the profile's manifests into the root (0644 under k3s's manifests directory) and
/// returns their records for `manifest.json` (kind `manifest`, digest of the rendered file).
pub fn place_manifests(manifests: &[PathBuf], base_dir: &Path, context: &serde_json::Value, root: &mut Tree) -> Result<Vec<Input>> {
    let mut inputs = Vec::new();
    for r in manifests::render(manifests, base_dir, context)? {
        let sha256 = crate::digest::sha256_hex(&r.content);
        let size = r.content.len() as u64;
        root.add_file(&format!("{}/{}", manifests::DIR, r.path), 0o644, r.content)?;
        inputs.push(Input { kind: InputKind::Manifest, name: r.path, version: None, sha256, size: Some(size) });
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
            bail!(
                "key `charts[{}]`: its HelmChart goes to {path}, but `manifests` already has a file of that name; rename that file",
                c.index
            );
        }
        root.add_file(&path, 0o644, chart::helmchart(c)?)?;
        inputs.push(Input {
            kind: InputKind::Chart,
            name: c.source.clone(),
            version: Some(c.meta.version.clone()),
            sha256: c.sha256.clone(),
            size: Some(c.size),
        });
    }
    Ok(inputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::test_profile;

    const SERVER: &str = "cluster: {name: lab, nodes: [{name: s1, mac: \"52:54:00:00:00:01\", roles: [server]}]}\n";

    #[test]
    fn manifests_land_in_the_auto_deploy_directory() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("app.yaml.hbs"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: \"{{name}}\"}\n").unwrap();
        let p = test_profile(&format!("manifests: [app.yaml.hbs]\n{SERVER}"));
        let mut root = Tree::new();
        let inputs = place_manifests(&p.manifests, d.path(), &serde_json::json!({"name": "shop"}), &mut root).unwrap();
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
        let charts = "charts: [{chart: hello, namespace: shop, values: {replicas: 2}}]\n";
        let p = test_profile(charts);
        assert!(crate::profile::deploy::validate(&p, d.path()).unwrap_err().to_string().contains("key `charts`"));
        let p = test_profile(&format!("{charts}{SERVER}"));
        crate::profile::deploy::validate(&p, d.path()).unwrap();

        let fetcher = crate::fetch::Fetcher {
            offline: true,
            cache: crate::cache::Cache::new(d.path().join("cache")),
            progress: false,
            trust: Default::default(),
        };
        let mut puller = crate::oci::pull::Puller::new(&fetcher, &p.image_registries, d.path());
        let charts = chart::gather(&p.charts, d.path(), &mut puller, 0).unwrap();
        let mut root = Tree::new();
        let inputs = place_charts(&charts, &mut root).unwrap();
        assert!(root.contains("var/lib/rancher/k3s/server/static/charts/hello-0.2.0.tgz"));
        assert!(root.contains("var/lib/rancher/k3s/server/manifests/chart-hello.yaml"));
        assert_eq!((inputs[0].kind.as_str(), inputs[0].version.as_deref()), ("chart", Some("0.2.0")));
        assert_eq!(inputs[0].sha256, charts[0].sha256);

        // A pinned version that the chart does not have, and a manifest in the HelmChart's place.
        let p = test_profile(&format!("charts: [{{chart: hello, version: 9.9.9}}]\n{SERVER}"));
        let err = chart::gather(&p.charts, d.path(), &mut puller, 0).unwrap_err().to_string();
        assert!(err.contains("charts[0].version") && err.contains("0.2.0"), "{err}");
        let mut root = Tree::new();
        root.add_file("var/lib/rancher/k3s/server/manifests/chart-hello.yaml", 0o644, "x").unwrap();
        assert!(place_charts(&charts, &mut root).unwrap_err().to_string().contains("already has a file"));
    }
}
