//! Helm charts stored in OCI registries (`charts: [{chart: oci://host/repo/name:version}]`): one
//! image manifest (not per platform) whose config has the Helm config media type and whose chart
//! layer is the packaged `.tgz`. Pulled with the same client, verification and cache as images:
//! the manifest and the layer are stored by digest, and a cache ref from the reference to the
//! manifest lets `--offline` builds find the chart again.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};

use super::manifest::{self, Descriptor, Document};
use super::pull::{read_small, Puller, Record};
use crate::image_ref::ImageRef;

/// The config media type of a Helm chart artifact (IANA-registered by the Helm project).
pub const HELM_CONFIG: &str = "application/vnd.cncf.helm.config.v1+json";
/// The media type of the chart layer: the chart's `.tgz`.
pub const HELM_CHART: &str = "application/vnd.cncf.helm.chart.content.v1.tar+gzip";
/// The chart layer type of Helm's experimental OCI support (before Helm 3.8), still served by
/// some registries for old pushes.
const HELM_CHART_LEGACY: &str = "application/tar+gzip";

/// A chart in the cache: the reference, what it resolved to, and its verified `.tgz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledChart {
    /// Normalised reference without the `oci://` scheme.
    pub reference: String,
    /// The manifest digest the reference resolved to.
    pub resolved: String,
    /// The chart layer (the `.tgz`).
    pub layer: Descriptor,
    /// The layer in the cache.
    pub path: PathBuf,
}

fn ref_key(reference: &str) -> String {
    format!("oci-chart/{reference}")
}

/// The chart layer an artifact manifest names; an error saying what the artifact is otherwise.
pub fn chart_layer(manifest_bytes: &[u8]) -> Result<Descriptor> {
    match manifest::parse(manifest_bytes, Some(manifest::OCI_MANIFEST))? {
        Document::Index(_) => bail!("is an image index (container images for several platforms), not a Helm chart"),
        Document::Image { config, layers, .. } => {
            if config.media_type != HELM_CONFIG {
                bail!("is not a Helm chart: its config has media type `{}` (a Helm chart's is `{HELM_CONFIG}`); container images go in `images`", config.media_type);
            }
            let found: Vec<&Descriptor> =
                layers.iter().filter(|l| l.media_type == HELM_CHART || l.media_type == HELM_CHART_LEGACY).collect();
            match found.as_slice() {
                [one] => Ok((*one).clone()),
                [] => bail!("is a Helm artifact without a chart layer (`{HELM_CHART}`)"),
                _ => bail!("has {} chart layers; a Helm chart has one", found.len()),
            }
        }
    }
}

impl Puller<'_> {
    /// Pulls (or finds in the cache) the chart `reference` (`host/repo/name:version`, no scheme).
    pub fn chart(&mut self, reference: &ImageRef) -> Result<PulledChart> {
        let r = reference.oci();
        let name = r.whole();
        let key = ref_key(&name);
        let fetcher = self.fetcher();
        let stored: Option<Record> = match fetcher.cache.get_ref(&key).with_context(|| format!("reading cache entry `{key}`"))? {
            Some(data) => serde_json::from_slice(&data).ok(),
            None => None,
        };
        let from_cache = fetcher.offline || r.digest().is_some();
        let record = match stored {
            Some(rec) if from_cache => rec,
            None if fetcher.offline => {
                bail!(
                    "chart `oci://{name}` is not in the cache; offline mode: run `kiln fetch PROFILE` on a host that reaches the registry"
                )
            }
            _ => {
                let (top, digest) = self.manifest(r).with_context(|| format!("chart `oci://{name}`: fetching its manifest"))?;
                let layer = chart_layer(&top).with_context(|| format!("chart `oci://{name}`"))?;
                let d = Descriptor { media_type: manifest::OCI_MANIFEST.into(), digest: digest.clone(), size: top.len() as u64 };
                self.fetcher().cache.put(d.hex(), Some(d.size), &top[..], &format!("chart `oci://{name}`: manifest"))?;
                tracing::info!("chart oci://{name} -> {digest} (chart layer {})", layer.digest);
                Record { resolved: digest, manifest: d }
            }
        };
        let what = format!("chart `oci://{name}`: manifest {}", record.manifest.digest);
        let manifest_path = self.manifest_blob(r, &record.manifest, &what)?;
        let layer = chart_layer(&read_small(&manifest_path)?).map_err(|e| anyhow!("chart `oci://{name}` {e}"))?;
        let path = self.blob(r, &layer, &format!("chart `oci://{name}`: chart layer {}", layer.digest))?;
        self.fetcher().cache.put_ref(&key, &serde_json::to_vec(&record)?)?;
        Ok(PulledChart { reference: name, resolved: record.resolved, layer, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;
    use crate::fetch::Fetcher;
    use crate::profile::images::Registry;
    use sha2::{Digest, Sha256};
    use std::collections::BTreeMap;

    fn digest(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(data)))
    }

    fn artifact(config_type: &str, chart: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let config = br#"{"name":"hello","version":"0.1.0","apiVersion":"v2"}"#.to_vec();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": manifest::OCI_MANIFEST,
            "config": {"mediaType": config_type, "digest": digest(&config), "size": config.len()},
            "layers": [{"mediaType": HELM_CHART, "digest": digest(chart), "size": chart.len()}],
        }))
        .unwrap();
        (manifest, config)
    }

    /// A loopback registry with `charts/hello:0.1.0` (its layer altered when `tamper`) and
    /// `charts/image:1` (an image, not a chart).
    fn fake(chart: &[u8], tamper: bool) -> String {
        let (manifest, _) = artifact(HELM_CONFIG, chart);
        let (image, _) = artifact("application/vnd.oci.image.config.v1+json", chart);
        let mut served = chart.to_vec();
        if tamper {
            served[10] ^= 1;
        }
        let mut routes = BTreeMap::new();
        routes.insert("/v2/".to_string(), b"{}".to_vec());
        routes.insert("/v2/charts/hello/manifests/0.1.0".to_string(), manifest.clone());
        routes.insert(format!("/v2/charts/hello/manifests/{}", digest(&manifest)), manifest);
        routes.insert(format!("/v2/charts/hello/blobs/{}", digest(chart)), served);
        routes.insert("/v2/charts/image/manifests/1".to_string(), image);
        let (base, _) = crate::testhttp::serve(move |path| match routes.get(path) {
            Some(b) => ("200 OK", b.clone()),
            None => ("404 Not Found", br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}"#.to_vec()),
        });
        base.trim_start_matches("http://").to_string()
    }

    fn fetcher(dir: &std::path::Path, offline: bool) -> Fetcher {
        Fetcher { offline, cache: Cache::new(dir.to_path_buf()), progress: false, trust: Default::default() }
    }

    #[test]
    fn charts_are_pulled_verified_and_found_offline() {
        let chart = crate::deploy::chart::tests::tiny_chart("hello", "0.1.0");
        let host = fake(&chart, false);
        let regs = BTreeMap::from([(host.clone(), Registry { insecure_http: true, ..Registry::default() })]);
        let dir = tempfile::tempdir().unwrap();
        let r: ImageRef = format!("{host}/charts/hello:0.1.0").parse().unwrap();
        let got = Puller::new(&fetcher(dir.path(), false), &regs, dir.path()).chart(&r).unwrap();
        assert_eq!(got.layer.digest, digest(&chart));
        assert_eq!(std::fs::read(&got.path).unwrap(), chart);
        let offline = Puller::new(&fetcher(dir.path(), true), &regs, dir.path()).chart(&r).unwrap();
        assert_eq!(offline, got);
        let err = format!(
            "{:#}",
            Puller::new(&fetcher(dir.path(), false), &regs, dir.path())
                .chart(&format!("{host}/charts/image:1").parse().unwrap())
                .unwrap_err()
        );
        assert!(err.contains("charts/image:1") && err.contains("is not a Helm chart"), "{err}");
    }

    #[test]
    fn a_tampered_chart_blob_is_refused_and_not_stored() {
        let chart = crate::deploy::chart::tests::tiny_chart("hello", "0.1.0");
        let host = fake(&chart, true);
        let regs = BTreeMap::from([(host.clone(), Registry { insecure_http: true, ..Registry::default() })]);
        let dir = tempfile::tempdir().unwrap();
        let r: ImageRef = format!("{host}/charts/hello:0.1.0").parse().unwrap();
        let err = format!("{:#}", Puller::new(&fetcher(dir.path(), false), &regs, dir.path()).chart(&r).unwrap_err());
        assert!(err.contains(&format!("chart `oci://{r}`: chart layer {}", digest(&chart))) && err.contains("does not match"), "{err}");
        assert!(!dir.path().join("blobs/sha256").join(&digest(&chart)[7..]).exists(), "the bad chart was stored");
    }

    #[test]
    fn only_helm_artifacts_are_charts() {
        let (m, _) = artifact(HELM_CONFIG, b"x");
        assert_eq!(chart_layer(&m).unwrap().media_type, HELM_CHART);
        let (m, _) = artifact("application/vnd.oci.image.config.v1+json", b"x");
        assert!(chart_layer(&m).unwrap_err().to_string().contains("not a Helm chart"));
    }
}
