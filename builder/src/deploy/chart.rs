//! Helm charts (profile key `charts`): where a chart comes from (an OCI registry, a packaged
//! `.tgz`, or a chart directory that kiln packs itself, reproducibly, so no `helm` binary is
//! needed), its name and version read from its `Chart.yaml`, and the `HelmChart` manifest that
//! makes k3s's Helm controller install it from k3s's own static file server, offline. The
//! `charts` entry's types and checks are in `profile::deploy`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use crate::profile::deploy::{check_release, ChartSpec, Source};
use crate::tree::Content;

/// k3s serves this directory at `https://<api>/static/` to its Helm controller.
pub const STATIC_DIR: &str = "var/lib/rancher/k3s/server/static/charts";
/// The namespace k3s's Helm controller watches for `HelmChart` resources.
const HELMCHART_NAMESPACE: &str = "kube-system";
/// `Chart.yaml` is small; a bigger one is not a chart's.
const CHART_YAML_LIMIT: u64 = 1 << 20;

/// What `Chart.yaml` says about a chart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChartMeta {
    pub name: String,
    pub version: String,
}

impl ChartMeta {
    /// The file name in k3s's static directory: `<name>-<version>.tgz`, as `helm package` names it.
    pub fn file_name(&self) -> String {
        format!("{}-{}.tgz", self.name, self.version)
    }
}

/// Reads `name` and `version` from a `Chart.yaml`. `what` names the chart in errors.
pub fn parse_chart_yaml(text: &str, what: &str) -> Result<ChartMeta> {
    let v: serde_json::Value = serde_saphyr::from_str(text).map_err(|e| anyhow!("{what}: Chart.yaml is not valid YAML: {e}"))?;
    let field = |k: &str| -> Result<String> {
        match v.get(k) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
            _ => bail!("{what}: Chart.yaml has no `{k}`; it is not a Helm chart"),
        }
    };
    let meta = ChartMeta { name: field("name")?, version: field("version")? };
    let safe = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c));
    if !safe(&meta.name) || !safe(&meta.version) || meta.name.starts_with('.') {
        bail!("{what}: Chart.yaml's name `{}` or version `{}` has characters a chart file name cannot hold", meta.name, meta.version);
    }
    Ok(meta)
}

/// Reads `<dir>/Chart.yaml` out of a chart archive (gzip-compressed tar with the chart in one
/// top-level directory, as `helm package` writes it).
pub fn read_meta(archive: impl Read, what: &str) -> Result<ChartMeta> {
    let not_chart =
        |e: &dyn std::fmt::Display| anyhow!("{what} is not a Helm chart archive (a gzip-compressed tar, as `helm package` writes): {e}");
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    for entry in tar.entries().map_err(|e| not_chart(&e))? {
        let entry = entry.map_err(|e| not_chart(&e))?;
        let path = entry.path().map_err(|e| not_chart(&e))?.into_owned();
        let parts: Vec<_> = path.components().collect();
        if parts.len() == 2 && parts[1].as_os_str() == "Chart.yaml" {
            let mut text = String::new();
            entry.take(CHART_YAML_LIMIT).read_to_string(&mut text).map_err(|e| anyhow!("{what}: reading Chart.yaml: {e}"))?;
            return parse_chart_yaml(&text, what);
        }
    }
    bail!("{what} is not a Helm chart: the archive has no `<chart>/Chart.yaml`")
}

/// Packs a chart directory into a `.tgz` the way `helm package` lays it out (everything under
/// `<name>/`), reproducibly: sorted entries, owner 0:0, modes 0644/0755, every time `mtime`, and
/// a gzip header without time or name. `.helmignore` is not interpreted: every file is packed.
pub fn pack_dir(dir: &Path, mtime: u64) -> Result<(ChartMeta, Vec<u8>)> {
    let what = format!("chart directory {}", dir.display());
    let chart_yaml = dir.join("Chart.yaml");
    let text =
        std::fs::read_to_string(&chart_yaml).with_context(|| format!("{what} is not a Helm chart: reading {}", chart_yaml.display()))?;
    let meta = parse_chart_yaml(&text, &what)?;
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    for e in walkdir::WalkDir::new(dir).follow_links(true).sort_by_file_name() {
        let e = e.with_context(|| format!("reading {what}"))?;
        let rel = e.path().strip_prefix(dir).expect("walkdir stays below its root");
        let rel = rel.to_str().ok_or_else(|| anyhow!("{what}: {} is not a UTF-8 path", e.path().display()))?;
        let name = if rel.is_empty() { meta.name.clone() } else { format!("{}/{rel}", meta.name) };
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        if e.file_type().is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            tar.append_data(&mut h, format!("{name}/"), std::io::empty())?;
        } else {
            let data = std::fs::read(e.path()).with_context(|| format!("reading {}", e.path().display()))?;
            let exec = std::os::unix::fs::PermissionsExt::mode(&e.metadata()?.permissions()) & 0o111 != 0;
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(if exec { 0o755 } else { 0o644 });
            h.set_size(data.len() as u64);
            tar.append_data(&mut h, &name, &data[..])?;
        }
    }
    let bytes = tar.into_inner()?.finish()?;
    Ok((meta, bytes))
}

/// One chart resolved for the build: its release, metadata and verified `.tgz`.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Index in `charts` (for errors).
    pub index: usize,
    pub release: String,
    pub namespace: String,
    /// The version pinned in the profile, if any (it matches `meta.version`).
    pub pinned_version: Option<String>,
    pub values: BTreeMap<String, serde_json::Value>,
    pub meta: ChartMeta,
    pub content: Content,
    pub sha256: String,
    pub size: u64,
    /// What the profile named: `oci://...` (normalised), the path as written, or for a
    /// repository chart the archive's URL from the repository's index.
    pub source: String,
    /// For registry charts: the manifest digest the reference resolved to.
    pub resolved: Option<String>,
}

/// Resolves every `charts` entry: pulled (registry), read (archive) or packed (directory),
/// with its `Chart.yaml` read and the profile's expectations checked.
pub fn gather(specs: &[ChartSpec], base_dir: &Path, puller: &mut crate::oci::pull::Puller<'_>, mtime: u64) -> Result<Vec<Chart>> {
    let mut out: Vec<Chart> = Vec::new();
    for (index, spec) in specs.iter().enumerate() {
        let key = format!("charts[{index}]");
        let (meta, content, sha256, size, source, resolved) = match Source::of(spec, base_dir) {
            Source::Repo { url, name, version } => {
                let (r, path) = super::helm_repo::fetch(puller.fetcher(), &url, &name, &version).with_context(|| format!("key `{key}`"))?;
                let what = format!("key `{key}`: chart {name} {version} from {}", r.url);
                let file = std::fs::File::open(&path).with_context(|| format!("{what}: reading {}", path.display()))?;
                let meta = read_meta(file, &what)?;
                let size = std::fs::metadata(&path)?.len();
                (meta, Content::HostFile(path), r.sha256, size, r.url, None)
            }
            Source::Oci(r) => {
                let pulled = puller.chart(&r).with_context(|| format!("key `{key}`"))?;
                let what = format!("key `{key}`: chart `oci://{}`", pulled.reference);
                let file = std::fs::File::open(&pulled.path).with_context(|| format!("{what}: reading {}", pulled.path.display()))?;
                let meta = read_meta(file, &what)?;
                let sha = pulled.layer.hex().to_string();
                (meta, Content::HostFile(pulled.path), sha, pulled.layer.size, format!("oci://{}", pulled.reference), Some(pulled.resolved))
            }
            Source::Archive(p) => {
                let what = format!("key `{key}`: {}", p.display());
                let file = std::fs::File::open(&p).with_context(|| format!("{what}: opening it"))?;
                let meta = read_meta(file, &what)?;
                let sha = crate::digest::sha256_file(&p).with_context(|| format!("{what}: reading it"))?;
                let size = std::fs::metadata(&p)?.len();
                (meta, Content::HostFile(p), sha, size, spec.chart.to_string(), None)
            }
            Source::Dir(p) => {
                let (meta, bytes) = pack_dir(&p, mtime).with_context(|| format!("key `{key}`"))?;
                let sha = crate::digest::sha256_hex(&bytes);
                let size = bytes.len() as u64;
                (meta, Content::bytes(bytes), sha, size, spec.chart.to_string(), None)
            }
        };
        if let Some(want) = &spec.version {
            if *want != meta.version {
                bail!("key `{key}.version`: expects {} {want}, but {} holds version {}", meta.name, spec.chart, meta.version);
            }
        }
        let release = spec.name.clone().unwrap_or_else(|| meta.name.clone());
        check_release(&release, &key)?;
        if let Some(other) = out.iter().find(|c| c.release == release) {
            bail!("key `{key}`: release `{release}` is also `charts[{}]`; set `name:` to tell them apart", other.index);
        }
        if let Some(other) = out.iter().find(|c| c.meta.file_name() == meta.file_name() && c.sha256 != sha256) {
            bail!("key `{key}`: {} differs from the chart of `charts[{}]` with the same name and version", meta.file_name(), other.index);
        }
        out.push(Chart {
            index,
            release,
            namespace: spec.namespace.clone().unwrap_or_else(|| "default".into()),
            pinned_version: spec.version.clone(),
            values: spec.values.clone(),
            meta,
            content,
            sha256,
            size,
            source,
            resolved,
        });
    }
    Ok(out)
}

/// The `HelmChart` manifest of a chart: installed from k3s's static file server
/// (`%{KUBERNETES_API}%` is replaced by k3s with its API address), into `namespace`.
pub fn helmchart(c: &Chart) -> Result<String> {
    let mut spec = serde_json::json!({
        "chart": format!("https://%{{KUBERNETES_API}}%/static/charts/{}", c.meta.file_name()),
        "targetNamespace": c.namespace,
        "createNamespace": true,
    });
    if let Some(v) = &c.pinned_version {
        spec["version"] = v.clone().into();
    }
    if !c.values.is_empty() {
        let values = serde_saphyr::to_string(&c.values).map_err(|e| anyhow!("key `charts[{}].values`: {e}", c.index))?;
        spec["valuesContent"] = values.into();
    }
    let doc = serde_json::json!({
        "apiVersion": "helm.cattle.io/v1",
        "kind": "HelmChart",
        "metadata": {"name": c.release, "namespace": HELMCHART_NAMESPACE},
        "spec": spec,
    });
    let text = serde_saphyr::to_string(&doc).map_err(|e| anyhow!("writing the HelmChart of `charts[{}]`: {e}", c.index))?;
    Ok(format!("# written by kiln from the profile's `charts[{}]` ({})\n{text}", c.index, c.source))
}

/// The manifest file name of a chart's `HelmChart`.
pub fn helmchart_file(c: &Chart) -> String {
    format!("chart-{}.yaml", c.release)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A packaged chart made by `pack_dir` from a temporary directory.
    pub(crate) fn tiny_chart(name: &str, version: &str) -> Vec<u8> {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("Chart.yaml"), format!("apiVersion: v2\nname: {name}\nversion: {version}\n")).unwrap();
        std::fs::create_dir(d.path().join("templates")).unwrap();
        std::fs::write(d.path().join("templates/cm.yaml"), "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}\n")
            .unwrap();
        pack_dir(d.path(), 1_700_000_000).unwrap().1
    }

    #[test]
    fn packed_charts_are_reproducible_and_read_back() {
        let a = tiny_chart("hello", "0.1.0");
        let b = tiny_chart("hello", "0.1.0");
        assert_eq!(a, b, "same directory, same bytes");
        assert_eq!(read_meta(&a[..], "t").unwrap(), ChartMeta { name: "hello".into(), version: "0.1.0".into() });
        let mut names = Vec::new();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&a[..]));
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            assert_eq!((e.header().uid().unwrap(), e.header().mtime().unwrap()), (0, 1_700_000_000));
            names.push(e.path().unwrap().to_string_lossy().into_owned());
        }
        assert_eq!(names, ["hello/", "hello/Chart.yaml", "hello/templates/", "hello/templates/cm.yaml"]);
    }

    #[test]
    fn chart_metadata_errors_say_what_is_wrong() {
        assert!(read_meta(&b"not gzip"[..], "x.tgz").unwrap_err().to_string().contains("x.tgz is not a Helm chart archive"));
        // A tar.gz without Chart.yaml.
        let mut t = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()));
        let mut h = tar::Header::new_gnu();
        h.set_size(2);
        h.set_mode(0o644);
        t.append_data(&mut h, "app/values.yaml", &b"{}"[..]).unwrap();
        let gz = t.into_inner().unwrap().finish().unwrap();
        assert!(read_meta(&gz[..], "x.tgz").unwrap_err().to_string().contains("no `<chart>/Chart.yaml`"));
        assert!(parse_chart_yaml("apiVersion: v2\nname: a\n", "c").unwrap_err().to_string().contains("no `version`"));
        assert!(parse_chart_yaml("name: a/b\nversion: 1\n", "c").is_err());
        assert_eq!(parse_chart_yaml("name: a\nversion: 1.5\n", "c").unwrap().version, "1.5");
    }

    fn chart(values: BTreeMap<String, serde_json::Value>, version: Option<&str>) -> Chart {
        Chart {
            index: 0,
            release: "web".into(),
            namespace: "shop".into(),
            pinned_version: version.map(String::from),
            values,
            meta: ChartMeta { name: "hello".into(), version: "0.1.0".into() },
            content: Content::bytes(vec![]),
            sha256: String::new(),
            size: 0,
            source: "charts/hello".into(),
            resolved: None,
        }
    }

    #[test]
    fn helmchart_manifests_point_at_the_static_file_server() {
        let values = BTreeMap::from([
            ("replicas".to_string(), serde_json::json!(2)),
            ("greeting".to_string(), serde_json::json!("on")),
            ("nested".to_string(), serde_json::json!({"list": ["a", "b: c"], "multi": "one\ntwo\n"})),
        ]);
        let text = helmchart(&chart(values.clone(), Some("0.1.0"))).unwrap();
        assert!(text.starts_with("# written by kiln from the profile's `charts[0]`"), "{text}");
        let doc: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(doc["apiVersion"], "helm.cattle.io/v1");
        assert_eq!(doc["kind"], "HelmChart");
        assert_eq!(doc["metadata"], serde_json::json!({"name": "web", "namespace": "kube-system"}));
        assert_eq!(doc["spec"]["chart"], "https://%{KUBERNETES_API}%/static/charts/hello-0.1.0.tgz");
        assert_eq!(doc["spec"]["targetNamespace"], "shop");
        assert_eq!(doc["spec"]["version"], "0.1.0");
        let back: serde_json::Value = serde_saphyr::from_str(doc["spec"]["valuesContent"].as_str().unwrap()).unwrap();
        assert_eq!(back, serde_json::to_value(&values).unwrap(), "valuesContent parses back to the profile's values");
        let text = helmchart(&chart(BTreeMap::new(), None)).unwrap();
        let doc: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        assert!(doc["spec"].get("valuesContent").is_none() && doc["spec"].get("version").is_none(), "{text}");
    }
}
