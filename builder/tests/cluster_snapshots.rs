//! Snapshot tests of the cluster configuration kiln renders for every node of every example
//! profile in `profiles/`. The expected files live in `builder/tests/snapshots/<profile>/`:
//! `<node>/{node.conf,k3s-config.yaml,etcd.env}`, `_default/` (machines not in the inventory) and
//! `_cluster/{cluster.conf,inventory,modes}`. The token is a fixed test token. The etcd group's
//! certificates and keys (`<node>/etcd/`) are made afresh by each run: they are listed with their
//! modes in `_cluster/modes`, not kept as files (their checks are `cluster::pki`'s unit tests).
//!
//! When the rendering changes on purpose, rewrite them with
//! `KILN_BLESS=1 cargo test -p kiln --test cluster_snapshots` and review the diff in git.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln::cluster::{files, pki, Secrets, Token};
use kiln::profile::LoadedProfile;

const TEST_TOKEN: &str = "K10-kiln-snapshot-test-token";

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Snapshot path (relative to the profile's snapshot directory) of a rendered root path.
fn snapshot_path(root_path: &str) -> String {
    match root_path.strip_prefix("etc/kiln/nodes/") {
        Some(rest) => rest.to_string(),
        None => format!("_cluster/{}", root_path.rsplit('/').next().unwrap_or(root_path)),
    }
}

/// Every snapshot file of one profile: relative path -> content.
fn expected_for(profile: &LoadedProfile) -> Option<BTreeMap<String, String>> {
    let cluster = profile.profile.cluster.as_ref()?;
    let d = tempfile::tempdir().unwrap();
    let secrets = Secrets { token: Token::new(TEST_TOKEN).unwrap(), pki: pki::load_or_create(cluster, d.path()).unwrap(), rollout: None };
    let rendered = files(cluster, &secrets).unwrap();
    let mut out = BTreeMap::new();
    let mut modes = String::new();
    for f in rendered {
        let p = snapshot_path(&f.path);
        modes.push_str(&format!("{:04o} {p}\n", f.mode));
        if !f.content.starts_with("-----BEGIN ") {
            out.insert(p, f.content);
        }
    }
    out.insert("_cluster/modes".into(), modes);
    Some(out)
}

fn files_below(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return v };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            v.extend(files_below(&p).into_iter().map(|f| format!("{name}/{f}")));
        } else {
            v.push(p.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    v.sort();
    v
}

/// A line diff (longest common subsequence; the files are small).
fn diff(old: &str, new: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (old.lines().collect(), new.lines().collect());
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push_str(&format!("   {}\n", a[i]));
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push_str(&format!("  +{}\n", b[j]));
            j += 1;
        } else {
            out.push_str(&format!("  -{}\n", a[i]));
            i += 1;
        }
    }
    out
}

#[test]
fn rendered_cluster_files_match_the_snapshots() {
    let bless = std::env::var("KILN_BLESS").is_ok_and(|v| v == "1");
    let snapshots = manifest_dir().join("tests/snapshots");
    let mut profiles: Vec<PathBuf> = std::fs::read_dir(manifest_dir().join("../profiles"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    profiles.sort();
    let mut problems = Vec::new();
    let mut seen = Vec::new();
    for path in profiles {
        let profile = LoadedProfile::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        let Some(expected) = expected_for(&profile) else { continue };
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let dir = snapshots.join(&name);
        seen.push(name.clone());
        if bless {
            let _ = std::fs::remove_dir_all(&dir);
            for (rel, content) in &expected {
                let f = dir.join(rel);
                std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                std::fs::write(&f, content).unwrap();
            }
            continue;
        }
        for (rel, want) in &expected {
            match std::fs::read_to_string(dir.join(rel)) {
                Ok(have) if &have == want => {}
                Ok(have) => problems.push(format!("{name}/{rel} differs (- snapshot, + rendered):\n{}", diff(&have, want))),
                Err(_) => problems.push(format!("{name}/{rel} is rendered but has no snapshot")),
            }
        }
        for rel in files_below(&dir) {
            if !expected.contains_key(&rel) {
                problems.push(format!("{name}/{rel} is in the snapshots but no longer rendered"));
            }
        }
    }
    for stale in files_below(&snapshots).iter().filter_map(|f| f.split('/').next()).collect::<std::collections::BTreeSet<_>>() {
        if !seen.iter().any(|s| s == stale) {
            problems.push(format!("snapshots/{stale} belongs to no example profile with a `cluster` key"));
        }
    }
    assert!(seen.len() >= 4, "expected the four cluster example profiles, found {seen:?}");
    assert!(
        problems.is_empty(),
        "cluster snapshots in {} do not match the rendering:\n\n{}\n\nIf the change is intended, rewrite them with\n    KILN_BLESS=1 cargo test -p kiln --test cluster_snapshots\nand review the diff in git.",
        snapshots.display(),
        problems.join("\n")
    );
}
