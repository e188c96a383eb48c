//! Build output files: what goes into a partition or an output file ([`Part`]: bytes built in
//! memory, or a file staged beside the outputs, with its digest), and writing them with an exact
//! mode (0600 when the build holds secrets, see `pipeline::image_mode`). The disk image
//! (`pipeline`) and the netboot directory (`netboot`) are written with these.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// What goes into a partition or an output file: bytes built in memory (the partition table, a
/// board's loaders) or a file in the staging directory ([`Staged`]: the root squashfs, the ESP,
/// the install plan; streamed, their digests taken once).
#[derive(Debug, Clone, Copy)]
pub enum Part<'a> {
    Bytes(&'a [u8]),
    File { path: &'a Path, len: u64, sha256: &'a str },
}

impl Part<'_> {
    pub fn len(&self) -> u64 {
        match self {
            Part::Bytes(b) => b.len() as u64,
            Part::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn sha256(&self) -> String {
        match self {
            Part::Bytes(b) => crate::digest::sha256_hex(b),
            Part::File { sha256, .. } => sha256.to_string(),
        }
    }
}

/// A file written into the staging directory, with its size and digest: a partition's contents
/// kept out of memory (two architectures are built at once, each with an ESP of tens of MiB).
#[derive(Debug, Clone)]
pub struct Staged {
    pub path: PathBuf,
    pub len: u64,
    pub sha256: String,
}

impl Staged {
    /// A staged file just written: its size and digest, read back (from the page cache).
    pub fn read_back(path: PathBuf) -> Result<Staged> {
        let len = std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?.len();
        let sha256 = crate::digest::sha256_file(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Staged { path, len, sha256 })
    }

    pub fn part(&self) -> Part<'_> {
        Part::File { path: &self.path, len: self.len, sha256: &self.sha256 }
    }

    /// Creates (or empties) a file to stage, readable too (a writer may read back what it wrote).
    pub fn create(path: &Path) -> Result<File> {
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))
    }
}

/// Creates (or truncates) an output file with exactly `mode`.
pub fn create(path: &Path, mode: u32) -> Result<File> {
    let f = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    // The mode given at creation is masked by the umask; set it exactly.
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    Ok(f)
}

/// Writes a part to its own file (the netboot output): bytes, or a copy of the staged file.
pub fn write_part(path: &Path, part: &Part, mode: u32) -> Result<()> {
    match part {
        Part::Bytes(b) => write_file(path, b, mode),
        Part::File { path: from, .. } => {
            let _ = std::fs::remove_file(path);
            std::fs::copy(from, path).with_context(|| format!("copying {} to {}", from.display(), path.display()))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
            File::open(path)?.sync_all()?;
            Ok(())
        }
    }
}

/// Writes one output file with an exact mode.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = create(path, mode)?;
    f.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()?;
    Ok(())
}
