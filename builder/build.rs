//! Embeds the repository's `overlays/` and `firmware/` trees into the kiln binary, with their
//! permission bits, so one binary carries everything a build needs.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn main() {
    // `builder/overlays` and `builder/firmware` are links to the repository's trees, so the
    // crate is packageable (`cargo package` copies what they point to) and builds the same from
    // a checkout, from `cargo install --path builder` and from the packaged crate.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    commit_id(root);
    let mut out = String::from("/// (path relative to the repository, permission bits, contents)\n");
    out.push_str("pub static EMBEDDED: &[(&str, u32, &[u8])] = &[\n");
    for top in ["overlays", "firmware"] {
        let dir = root.join(top);
        println!("cargo:rerun-if-changed={}", dir.display());
        let mut files = Vec::new();
        collect(&dir, &mut files);
        files.sort();
        for f in files {
            let rel = f.strip_prefix(root).unwrap().to_str().expect("UTF-8 paths in overlays/ and firmware/");
            let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
            // git keeps only the executable bit: normalise so builds do not depend on the umask.
            let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
            let abs = f.canonicalize().unwrap();
            writeln!(out, "    ({rel:?}, 0o{mode:o}, include_bytes!({:?})),", abs.display().to_string()).unwrap();
        }
    }
    out.push_str("];\n");
    let dest = Path::new(&std::env::var("OUT_DIR").unwrap()).join("embedded.rs");
    std::fs::write(dest, out).unwrap();
}

/// `KILN_COMMIT` for `kiln --version`: the checkout's commit (`-dirty` with local changes), or
/// "unknown" outside a git checkout (a packaged crate).
fn commit_id(root: &Path) {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]);
    if let Some(c) = &commit {
        let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
        println!("cargo:rustc-env=KILN_COMMIT={c}{}", if dirty { "-dirty" } else { "" });
        // Rerun when HEAD moves (a commit, a checkout) or the index changes (dirty state).
        for p in ["HEAD", "index"] {
            if let Some(path) = git(&["rev-parse", "--git-path", p]) {
                println!("cargo:rerun-if-changed={}", root.join(path).display());
            }
        }
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]).and_then(|r| git(&["rev-parse", "--git-path", &r])) {
            println!("cargo:rerun-if-changed={}", root.join(r).display());
        }
    } else {
        println!("cargo:rustc-env=KILN_COMMIT=unknown");
    }
}

fn collect(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd {
        let e = e.unwrap();
        let p = e.path();
        println!("cargo:rerun-if-changed={}", p.display());
        if e.file_type().unwrap().is_dir() {
            collect(&p, files);
        } else {
            files.push(p);
        }
    }
}
