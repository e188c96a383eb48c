//! Arbitrary bytes as an image layer (plain tar), applied onto a root that already has a
//! symlink to `/etc` (as a lower layer would): errors are fine, panics are not, and whatever is
//! accepted stays a normalised path inside the root that does not pass through a symlink.
#![no_main]

use kiln::arch::Arch;
use kiln::oci::flatten::apply_layer;
use kiln::tree::{Kind, Tree};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut root = Tree::merged_usr(Arch::X86_64);
    root.add_symlink("lower-link", "/etc").unwrap();
    root.add_file("lower/file", 0o644, "x").unwrap();
    if apply_layer(data, "application/vnd.oci.image.layer.v1.tar", &mut root, "fuzz").is_err() {
        return;
    }
    for (path, entry) in root.iter() {
        let p = path.as_str();
        assert!(!p.starts_with('/') && !p.split('/').any(|c| c == ".." || c == "." || (c.is_empty() && !p.is_empty())), "{p}");
        assert!(!matches!(entry.kind, Kind::CharDevice { .. } | Kind::BlockDevice { .. } | Kind::Fifo), "{p}");
        // Every proper ancestor is a directory (merged-/usr aliases are resolved on insert).
        let mut parent = path.parent();
        while let Some(dir) = parent {
            assert!(matches!(root.get(&dir).map(|e| &e.kind), Some(Kind::Dir)), "{p} under non-directory {dir}");
            parent = dir.parent();
        }
    }
});
