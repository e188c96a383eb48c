//! The data kiln carries inside its binary: the repository's `overlays/` (the appliance's
//! on-device shell, the initramfs `/init`) and `firmware/` (platform descriptions).

use anyhow::{bail, Result};

use crate::tree::{Content, Entry, Meta, Tree, TreePath};

include!(concat!(env!("OUT_DIR"), "/embedded.rs"));

/// One embedded file: contents and permission bits.
pub fn file(path: &str) -> Option<(&'static [u8], u32)> {
    EMBEDDED.iter().find(|(p, _, _)| *p == path).map(|(_, mode, data)| (*data, *mode))
}

/// The embedded overlay `overlays/<name>/` as a root-owned tree.
pub fn overlay(name: &str) -> Result<Tree> {
    let prefix = format!("overlays/{name}/");
    let mut tree = Tree::new();
    for (path, mode, data) in EMBEDDED.iter().filter(|(p, _, _)| p.starts_with(&prefix)) {
        let rel = TreePath::parse_relative(&path[prefix.len()..])?;
        tree.insert(&rel, Entry { meta: Meta::root(*mode), kind: crate::tree::Kind::File(Content::bytes(data.to_vec())) })?;
    }
    if tree.is_empty() {
        bail!("kiln was built without overlays/{name}: rebuild it from a complete checkout");
    }
    Ok(tree)
}

/// Names of the embedded platforms (`firmware/<name>.yaml`).
pub fn platforms() -> Vec<&'static str> {
    EMBEDDED.iter().filter_map(|(p, _, _)| p.strip_prefix("firmware/").and_then(|n| n.strip_suffix(".yaml"))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlays_and_platforms_are_embedded_with_modes() {
        let init = overlay("initramfs").unwrap();
        let e = init.get_str("init").expect("initramfs /init embedded");
        assert_eq!(e.meta.mode, 0o755);
        let app = overlay("appliance").unwrap();
        assert!(app.contains("usr/lib/kiln/boot"));
        assert!(platforms().contains(&"generic-uefi"));
        assert!(overlay("nope").is_err());
    }
}
