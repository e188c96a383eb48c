//! Unpacking the build's Debian packages, reusing what earlier builds kept (`crate::reuse`): a
//! package's `data.tar`, decompressed, under the package's verified sha256. Decompressing the
//! kernel package (about 110 MB of xz) was most of a rebuild's time; reading the kept tar back
//! costs a tenth of that.
//!
//! The kept tar is the package's own, byte for byte (written as the package was unpacked), and
//! is used only if its MAC shows this user's kiln wrote it, so the tree it unpacks to is the
//! package's.

use std::path::Path;

use anyhow::{Context, Result};

use crate::debian::Package;
use crate::reuse::Reuse;
use crate::tree::Tree;

/// The kind of kept result: the decompressed `data.tar` of a package, keyed by the package's sha256.
const KIND: &str = "deb-data-v1";

/// Unpacks `pkg` (verified in the cache at `path`) into `tree`, from its kept `data.tar` when
/// an earlier build left one, else from the package, keeping its `data.tar` for later builds.
pub(super) fn unpack_package(reuse: &Reuse, pkg: &Package, path: &Path, tree: &mut Tree) -> Result<()> {
    let what = || format!("unpacking {} {}", pkg.name, pkg.version);
    if let Some(kept) = reuse.open(KIND, &pkg.sha256) {
        let name = format!("{} (its data.tar kept by an earlier build)", path.display());
        crate::deb::unpack_tar(kept, tree, &name).with_context(what)?;
        return Ok(());
    }
    match reuse.writer(KIND, &pkg.sha256) {
        Some(mut kept) => {
            crate::deb::unpack_deb_copying(path, tree, &mut kept).with_context(what)?;
            kept.keep();
        }
        None => {
            crate::deb::unpack_deb(path, tree).with_context(what)?;
        }
    }
    Ok(())
}
