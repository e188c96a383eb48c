//! The layering rules of docs/architecture.md, checked on the source: which module may name
//! which (`crate::<module>` in product code, tests excluded), and no import cycle between the
//! top-level modules. A change that draws a forbidden arrow fails here, naming file and module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules at the bottom: they know bytes, not builds or profiles.
const FORMATS: &[&str] = &["gpt", "fat", "squashfs", "cpio", "deb", "tree", "spill"];
/// What `profile/` may use besides itself: leaves and the format it checks paths with.
const PROFILE_MAY_USE: &[&str] = &["arch", "error", "size", "image_ref", "tree", "setup"];

/// Every product source file under `builder/src`, with its top-level module name.
fn sources() -> Vec<(PathBuf, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(&src).sort_by_file_name() {
        let entry = entry.unwrap();
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(&src).unwrap();
            let first = rel.components().next().unwrap().as_os_str().to_string_lossy().to_string();
            out.push((path.to_path_buf(), first.trim_end_matches(".rs").to_string()));
        }
    }
    out
}

/// The top-level modules a file names as `crate::<module>`, in its product code only.
fn uses(path: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let product = text.split("#[cfg(test)]\nmod tests").next().unwrap();
    let mut found = BTreeSet::new();
    for (i, _) in product.match_indices("crate::") {
        let name: String = product[i + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() {
            found.insert(name);
        }
    }
    found
}

#[test]
fn forbidden_arrows_are_not_drawn() {
    let mut broken = Vec::new();
    for (path, module) in sources() {
        let used = uses(&path);
        let file = path.display();
        if module != "pipeline" && module != "main" && used.contains("pipeline") {
            broken.push(format!("{file}: only main.rs drives the pipeline; `{module}` must not import it"));
        }
        if module == "profile" {
            for u in used.iter().filter(|u| *u != "profile" && !PROFILE_MAY_USE.contains(&u.as_str())) {
                broken.push(format!("{file}: profile/ imports the feature module `{u}` (features import the profile, not the reverse)"));
            }
        }
        if FORMATS.contains(&module.as_str()) {
            for u in used.iter().filter(|u| *u == "pipeline" || *u == "profile") {
                broken.push(format!("{file}: the format module `{module}` imports `{u}`"));
            }
        }
    }
    assert!(broken.is_empty(), "layering rules broken (docs/architecture.md):\n{}", broken.join("\n"));
}

#[test]
fn top_level_modules_form_no_cycle() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let modules: BTreeSet<String> = sources().into_iter().map(|(_, m)| m).collect();
    for (path, module) in sources() {
        for u in uses(&path) {
            if u != module && modules.contains(&u) {
                edges.entry(module.clone()).or_default().insert(u);
            }
        }
    }
    // A module on a cycle reaches itself: walk from each and report the first cycle found.
    for start in &modules {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((at, trail)) = stack.pop() {
            for next in edges.get(&at).into_iter().flatten() {
                if next == start {
                    panic!("import cycle: {} -> {start}", trail.join(" -> "));
                }
                if seen.insert(next.clone()) {
                    let mut t = trail.clone();
                    t.push(next.clone());
                    stack.push((next.clone(), t));
                }
            }
        }
    }
}
