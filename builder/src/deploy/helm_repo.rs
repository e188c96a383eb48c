//! Charts from classic Helm repositories (`charts: [{repo: https://..., chart: NAME, version: V}]`):
//! the repository's `index.yaml` names, per chart and version, the `.tgz` URLs and the archive's
//! sha256 (`digest`). kiln reads the entry, downloads the archive through the verifying cache
//! (the digest must match) and records `{url, sha256}` under a cache ref, so `--offline` builds
//! (and builds after the index changes) take the same archive from the cache.
//!
//! Trust: a classic repository's index is not signed (Helm's `.prov` files are optional and
//! rare), so the digest is as trustworthy as the HTTPS connection the index came over, the same
//! as k3s's checksum list without pins. Once recorded, a chart never changes under a build.

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};

use crate::fetch::Fetcher;

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    entries: std::collections::BTreeMap<String, Vec<Entry>>,
}

#[derive(Deserialize)]
struct Entry {
    version: String,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    urls: Vec<String>,
}

/// What a build takes for one repository chart: where the archive came from and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    pub url: String,
    pub sha256: String,
}

fn ref_key(repo: &str, name: &str, version: &str) -> String {
    format!("helm-repo/{repo}/{name}/{version}")
}

/// The archive of `name` `version` from the repository at `repo`, verified and in the cache.
pub fn fetch(fetcher: &Fetcher, repo: &str, name: &str, version: &str) -> Result<(Resolved, std::path::PathBuf)> {
    let key = ref_key(repo, name, version);
    let stored: Option<Resolved> = fetcher.cache.get_ref(&key)?.and_then(|d| serde_json::from_slice(&d).ok());
    let resolved = match stored {
        Some(r) => r,
        None if fetcher.offline => {
            bail!("chart {name} {version} of {repo} is not in the cache; offline mode: run `kiln fetch PROFILE` on a host that reaches the repository")
        }
        None => resolve(fetcher, repo, name, version)?,
    };
    let what = format!("chart {name} {version} from {}", resolved.url);
    let path = fetcher.blob(&resolved.url, &resolved.sha256, None, &what)?;
    fetcher.cache.put_ref(&key, &serde_json::to_vec(&resolved)?)?;
    Ok((resolved, path))
}

/// Reads the repository's index and finds the chart's archive URL and digest.
fn resolve(fetcher: &Fetcher, repo: &str, name: &str, version: &str) -> Result<Resolved> {
    let index_url = format!("{repo}/index.yaml");
    let data = fetcher.document(&index_url, &format!("helm-index/{repo}"), &format!("the Helm repository index {index_url}"))?;
    let text = String::from_utf8(data).map_err(|_| anyhow!("{index_url} is not UTF-8 text: not a Helm repository index"))?;
    let index: Index = serde_saphyr::from_str(&text).map_err(|e| anyhow!("{index_url} is not a Helm repository index: {e}"))?;
    let Some(versions) = index.entries.get(name) else {
        let mut names: Vec<&str> = index.entries.keys().map(String::as_str).collect();
        names.truncate(20);
        bail!(
            "the repository {repo} has no chart `{name}` (it has: {}{})",
            names.join(", "),
            if index.entries.len() > 20 { ", ..." } else { "" }
        );
    };
    let Some(entry) = versions.iter().find(|e| e.version == version) else {
        let mut have: Vec<&str> = versions.iter().map(|e| e.version.as_str()).collect();
        have.truncate(20);
        bail!("the repository {repo} has no version {version} of `{name}` (it has: {})", have.join(", "));
    };
    let Some(sha256) = entry.digest.as_deref().filter(|d| d.len() == 64 && d.chars().all(|c| c.is_ascii_hexdigit())) else {
        bail!("{index_url}: `{name}` {version} has no sha256 `digest`, so its archive cannot be verified; kiln does not use unverified charts");
    };
    let Some(first) = entry.urls.first() else { bail!("{index_url}: `{name}` {version} lists no `urls`") };
    // URLs in an index are absolute or relative to the repository.
    let url = if first.starts_with("https://") || first.starts_with("http://") { first.clone() } else { format!("{repo}/{first}") };
    tracing::info!("chart {name} {version}: {url} (sha256 {sha256} from {index_url})");
    Ok(Resolved { url, sha256: sha256.to_ascii_lowercase() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;

    fn fetcher(dir: &std::path::Path, offline: bool) -> Fetcher {
        Fetcher { offline, cache: Cache::new(dir.join("cache")), progress: false, trust: Default::default() }
    }

    /// A repository serving `index.yaml` with two charts, their archives at relative and
    /// absolute URLs; `tamper` changes the served archive.
    fn repo(chart: Vec<u8>, tamper: bool) -> String {
        let sha = crate::digest::sha256_hex(&chart);
        let mut served = chart.clone();
        if tamper {
            served[20] ^= 1;
        }
        let holder = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let base_for_handler = holder.clone();
        let (base, _) = crate::testhttp::serve(move |path| {
            let base = base_for_handler.lock().unwrap().clone();
            match path {
                "/stable/index.yaml" => (
                    "200 OK",
                    format!(
                        "apiVersion: v1\nentries:\n  hello:\n  - version: 0.2.0\n    digest: {sha}\n    urls: [charts/hello-0.2.0.tgz]\n  - version: 0.1.0\n    digest: {sha}\n    urls: [\"{base}/stable/charts/hello-0.2.0.tgz\"]\n  other:\n  - version: 1.0.0\n    urls: [charts/other-1.0.0.tgz]\n"
                    )
                    .into_bytes(),
                ),
                "/stable/charts/hello-0.2.0.tgz" => ("200 OK", served.clone()),
                _ => ("404 Not Found", b"not found".to_vec()),
            }
        });
        *holder.lock().unwrap() = base.clone();
        format!("{base}/stable")
    }

    fn chart() -> Vec<u8> {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("Chart.yaml"), "apiVersion: v2\nname: hello\nversion: 0.2.0\n").unwrap();
        super::super::chart::pack_dir(d.path(), 0).unwrap().1
    }

    #[test]
    fn charts_resolve_through_the_index_verify_and_work_offline() {
        let d = tempfile::tempdir().unwrap();
        let url = repo(chart(), false);
        for version in ["0.2.0", "0.1.0"] {
            let (resolved, path) = fetch(&fetcher(d.path(), false), &url, "hello", version).unwrap();
            assert!(resolved.url.ends_with("/stable/charts/hello-0.2.0.tgz"), "{resolved:?}");
            assert_eq!(std::fs::read(path).unwrap(), chart());
        }
        // Offline: from the recorded resolution and the cache.
        let (_, path) = fetch(&fetcher(d.path(), true), &url, "hello", "0.2.0").unwrap();
        assert_eq!(std::fs::read(path).unwrap(), chart());
        let err = format!("{:#}", fetch(&fetcher(d.path(), true), &url, "hello", "9.9.9").unwrap_err());
        assert!(err.contains("not in the cache") && err.contains("kiln fetch"), "{err}");
    }

    #[test]
    fn missing_charts_versions_digests_and_tampered_archives_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let url = repo(chart(), false);
        let err = format!("{:#}", fetch(&fetcher(d.path(), false), &url, "nope", "1").unwrap_err());
        assert!(err.contains("no chart `nope`") && err.contains("hello, other"), "{err}");
        let err = format!("{:#}", fetch(&fetcher(d.path(), false), &url, "hello", "3.0.0").unwrap_err());
        assert!(err.contains("no version 3.0.0") && err.contains("0.2.0, 0.1.0"), "{err}");
        let err = format!("{:#}", fetch(&fetcher(d.path(), false), &url, "other", "1.0.0").unwrap_err());
        assert!(err.contains("no sha256 `digest`"), "{err}");
        let bad = repo(chart(), true);
        let err = format!("{:#}", fetch(&fetcher(d.path(), false), &bad, "hello", "0.2.0").unwrap_err());
        assert!(err.to_lowercase().contains("sha256") || err.contains("digest"), "{err}");
    }
}
