//! `manifests`: Kubernetes YAML files (or directories of them) that k3s servers apply by
//! themselves at start, from k3s's auto-deploy directory. Files ending in `.hbs` are handlebars
//! templates rendered with the profile's context (the rules of overlays); other files are copied
//! as they are, so YAML holding `{{ }}` for some other tool (Go templates in a ConfigMap, say)
//! is never touched by accident. Every rendered file must parse as YAML, document by document,
//! and each document must be a Kubernetes object (`apiVersion` and `kind`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// k3s's auto-deploy directory (servers only; agents never read it).
pub const DIR: &str = "var/lib/rancher/k3s/server/manifests";

/// What k3s writes into its manifests directory itself at every start (its packaged
/// components): a file of the profile with one of these names would be overwritten.
pub const K3S_PACKAGED: &[&str] =
    &["coredns.yaml", "traefik.yaml", "local-storage.yaml", "metrics-server", "rolebindings.yaml", "ccm.yaml", "runtimes.yaml"];

/// The extensions k3s's deploy controller applies.
const EXTENSIONS: &[&str] = &[".yaml", ".yml", ".json"];

/// One file for the manifests directory: its path below it and its (rendered) content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub path: String,
    pub content: Vec<u8>,
    /// The host file it came from (for errors and the build manifest).
    pub source: PathBuf,
}

/// The host files of one `manifests` entry with their paths below the manifests directory
/// (template suffix still on): a file goes in under its own name, a directory's files under
/// their paths relative to it (sorted, so builds are reproducible).
fn files_of(entry: &Path, key: &str) -> Result<Vec<(String, PathBuf)>> {
    if entry.is_file() {
        let name =
            entry.file_name().and_then(|n| n.to_str()).ok_or_else(|| anyhow!("key `{key}`: {} has no UTF-8 file name", entry.display()))?;
        return Ok(vec![(name.to_string(), entry.to_path_buf())]);
    }
    if !entry.is_dir() {
        bail!("key `{key}`: {} does not exist (paths are relative to the profile)", entry.display());
    }
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(entry).follow_links(true).sort_by_file_name().min_depth(1) {
        let e = e.with_context(|| format!("key `{key}`: reading {}", entry.display()))?;
        if e.file_type().is_dir() {
            continue;
        }
        let rel = e.path().strip_prefix(entry).expect("walkdir stays below its root");
        let rel = rel.to_str().ok_or_else(|| anyhow!("key `{key}`: {} is not a UTF-8 path", e.path().display()))?;
        out.push((rel.to_string(), e.path().to_path_buf()));
    }
    if out.is_empty() {
        bail!("key `{key}`: directory {} holds no files", entry.display());
    }
    Ok(out)
}

/// Checks a path below the manifests directory against the names k3s owns.
pub fn check_name(path: &str, key: &str, source: &Path) -> Result<()> {
    let first = path.split('/').next().unwrap_or(path);
    if K3S_PACKAGED.contains(&first) {
        bail!(
            "key `{key}`: {} would be installed as {DIR}/{first}, a name k3s uses for its own packaged manifests (rewritten at every start); rename the file, or turn the packaged component off with `cluster.k3s.config` `disable: [...]` and use another name",
            source.display()
        );
    }
    Ok(())
}

/// The files of every `manifests` entry, rendered and checked. `base_dir` resolves relative
/// entries (the profile's directory); errors name the key and the file.
pub fn render(entries: &[PathBuf], base_dir: &Path, context: &serde_json::Value) -> Result<Vec<Rendered>> {
    let hb = crate::overlay::renderer();
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut out = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let key = format!("manifests[{i}]");
        for (rel, source) in files_of(&base_dir.join(entry), &key)? {
            let (path, template) = match rel.strip_suffix(".hbs") {
                Some(p) => (p.to_string(), true),
                None => (rel.clone(), false),
            };
            if !EXTENSIONS.iter().any(|e| path.ends_with(e)) {
                bail!(
                    "key `{key}`: {} is not a Kubernetes manifest: k3s applies files ending in {} (templates add `.hbs`); move other files out of the directory",
                    source.display(),
                    EXTENSIONS.join(", ")
                );
            }
            check_name(&path, &key, &source)?;
            if let Some(other) = seen.insert(path.clone(), source.clone()) {
                bail!("key `{key}`: {} and {} would both be installed as {DIR}/{path}; rename one", other.display(), source.display());
            }
            let bytes = std::fs::read(&source).with_context(|| format!("key `{key}`: reading {}", source.display()))?;
            let text = String::from_utf8(bytes).map_err(|_| anyhow!("key `{key}`: {} is not UTF-8 text", source.display()))?;
            let text =
                if template { crate::overlay::render(&hb, &text, context, &format!("{} (key `{key}`)", source.display()))? } else { text };
            check_yaml(&text)
                .map_err(|e| anyhow!("key `{key}`: {}{}: {e}", source.display(), if template { " (rendered)" } else { "" }))?;
            out.push(Rendered { path, content: text.into_bytes(), source });
        }
    }
    Ok(out)
}

/// Parses every document of a manifest; each must be a mapping with `apiVersion` and `kind`.
pub fn check_yaml(text: &str) -> Result<()> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(text).map_err(|e| anyhow!("not valid YAML: {e}"))?;
    if docs.is_empty() {
        bail!("holds no YAML document");
    }
    for (n, d) in docs.iter().enumerate() {
        let ok = d.get("apiVersion").is_some_and(|v| v.is_string()) && d.get("kind").is_some_and(|v| v.is_string());
        if !ok {
            bail!("document {} is not a Kubernetes object (a mapping with `apiVersion` and `kind`)", n + 1);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CM: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: site\ndata:\n  tpl: \"{{ .Values.x }}\"\n";

    fn ctx() -> serde_json::Value {
        json!({"name": "demo", "arch": "x86_64", "vars": {"site": "lab"}})
    }

    #[test]
    fn files_and_directories_render_with_only_hbs_templated() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("apps/sub")).unwrap();
        std::fs::write(d.path().join("apps/a.yaml"), CM).unwrap();
        std::fs::write(
            d.path().join("apps/sub/b.yaml.hbs"),
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: \"{{vars.site}}-{{arch}}\"\n---\n",
        )
        .unwrap();
        std::fs::write(d.path().join("one.yml"), "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n").unwrap();
        let out = render(&["apps".into(), "one.yml".into()], d.path(), &ctx()).unwrap();
        let paths: Vec<&str> = out.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(paths, ["a.yaml", "sub/b.yaml", "one.yml"]);
        assert_eq!(out[0].content, CM.as_bytes(), "a file without .hbs is not a template");
        assert!(String::from_utf8_lossy(&out[1].content).contains("name: \"lab-x86_64\""));
    }

    #[test]
    fn errors_name_the_key_and_file() {
        let d = tempfile::tempdir().unwrap();
        let err = |files: &[(&str, &str)], entry: &str| {
            let dir = tempfile::tempdir_in(d.path()).unwrap();
            for (n, c) in files {
                let p = dir.path().join(n);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, c).unwrap();
            }
            format!("{:#}", render(&[PathBuf::from("x"), PathBuf::from(entry)], dir.path(), &ctx()).unwrap_err())
        };
        let e = err(&[("x/ok.yaml", CM)], "missing.yaml");
        assert!(e.contains("key `manifests[1]`") && e.contains("missing.yaml") && e.contains("does not exist"), "{e}");
        let e = err(&[("x/ok.yaml", CM), ("bad.yaml", "a: [1\n")], "bad.yaml");
        assert!(e.contains("key `manifests[1]`") && e.contains("bad.yaml") && e.contains("not valid YAML"), "{e}");
        let e = err(&[("x/ok.yaml", CM), ("plain.yaml", "just text\n")], "plain.yaml");
        assert!(e.contains("plain.yaml") && e.contains("document 1 is not a Kubernetes object"), "{e}");
        let e = err(&[("x/README.md", "hi")], "x");
        assert!(e.contains("key `manifests[0]`") && e.contains("README.md") && e.contains("not a Kubernetes manifest"), "{e}");
        let e = err(&[("x/t.yaml.hbs", "apiVersion: v1\nkind: {{vars.nope}}\n")], "x");
        assert!(e.contains("key `manifests[0]`") && e.contains("t.yaml.hbs") && e.contains("nope"), "{e}");
        let e = err(&[("x/traefik.yaml", CM)], "x");
        assert!(e.contains("traefik.yaml") && e.contains("k3s uses for its own") && e.contains("disable"), "{e}");
        let e = err(&[("x/metrics-server/extra.yaml", CM)], "x");
        assert!(e.contains("metrics-server"), "{e}");
        let e = err(&[("x/a.yaml", CM), ("y/a.yaml.hbs", CM)], "y");
        assert!(e.contains("both be installed as") && e.contains("a.yaml"), "{e}");
    }
}
