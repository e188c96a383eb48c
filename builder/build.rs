//! Embeds the repository's `overlays/` and `firmware/` trees into the kiln binary, with their
//! permission bits, so one binary carries everything a build needs.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut out = String::from("/// (path relative to the repository, permission bits, contents)\n");
    out.push_str("pub static EMBEDDED: &[(&str, u32, &[u8])] = &[\n");
    for top in ["overlays", "firmware"] {
        let dir = root.join(top);
        println!("cargo:rerun-if-changed={}", dir.display());
        let mut files = Vec::new();
        collect(&dir, &mut files);
        files.sort();
        for f in files {
            let rel = f.strip_prefix(&root).unwrap().to_str().expect("UTF-8 paths in overlays/ and firmware/");
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
