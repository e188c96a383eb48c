//! Stand-in k3s release assets for build-only tests and benchmarks: no k3s binary can be
//! downloaded where kiln is developed. Files named like the x86_64 release assets, made-up
//! contents, a matching `sha256sum-amd64.txt`; nothing here is k3s and nothing boots it.
//!
//! Profiles get the made-up release name [`VERSION`], so the cache refs stand-ins leave in the
//! tier's shared cache can never be taken for a real release's.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};

use crate::registry::sha;

/// The release name stand-in assets are filed under.
pub const VERSION: &str = "v0.0.0+k3s0";

/// Writes the stand-in asset directory `dir/stand-in-assets`; `seed` goes into the contents, so
/// different seeds give different digests.
pub fn assets(dir: &Path, seed: &str) -> Result<PathBuf> {
    assets_for(dir, seed, "amd64", "k3s")
}

/// [`assets`] for the arm64 release names (`k3s-arm64`, `...-arm64.tar.zst`, `sha256sum-arm64.txt`).
pub fn assets_arm64(dir: &Path, seed: &str) -> Result<PathBuf> {
    assets_for(dir, seed, "arm64", "k3s-arm64")
}

fn assets_for(dir: &Path, seed: &str, arch: &str, binary: &str) -> Result<PathBuf> {
    let assets = dir.join("stand-in-assets");
    std::fs::create_dir_all(&assets)?;
    let mut list = String::new();
    for name in [binary.to_string(), format!("k3s-airgap-images-{arch}.tar.zst")] {
        let data = format!("stand-in for {name}, not k3s ({seed})\n").repeat(64).into_bytes();
        std::fs::write(assets.join(&name), &data)?;
        list.push_str(&format!("{}  {name}\n", sha(&data)));
    }
    std::fs::write(assets.join(format!("sha256sum-{arch}.txt")), &list)?;
    Ok(assets)
}

/// The text of `profiles/<name>.yaml` with the stand-in release name.
pub fn profile_text(name: &str) -> Result<String> {
    let text = std::fs::read_to_string(crate::repo_root().join(format!("profiles/{name}.yaml")))?;
    ensure!(text.contains("version: v1.33.5+k3s1"), "profiles/{name}.yaml names another k3s version");
    Ok(text.replace("version: v1.33.5+k3s1", &format!("version: {VERSION}")))
}
