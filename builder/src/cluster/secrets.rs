//! The output's `secrets/` directory (mode 0700) and the files in it (mode 0600): the cluster
//! token and the cluster PKI. A secret is created once, race-safely: written to a private
//! temporary file, then hard-linked to its name, which fails instead of replacing a file another
//! build created meanwhile; that build's file is then the one used.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// `<out>/secrets`.
pub fn dir(out_dir: &Path) -> PathBuf {
    out_dir.join("secrets")
}

/// The output's rollout master key (`crate::rollout`), created on first use from /dev/urandom
/// (mode 0600, race-safe) and reused by every later build into `out_dir`.
pub fn load_or_create_rollout_key(out_dir: &Path) -> Result<[u8; 32]> {
    let path = crate::rollout::master_key_path(out_dir);
    debug_assert_eq!(path.parent(), Some(dir(out_dir).as_path()));
    if !path.exists() {
        let mut fresh = [0u8; 32];
        use std::io::Read;
        std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut fresh)).context("reading /dev/urandom")?;
        ensure_dir(&dir(out_dir))?;
        // Another build may have created it meanwhile: then its key is the one read below.
        create_new(&path, format!("{}\n", hex::encode(fresh)).as_bytes())?;
    }
    crate::rollout::read_master_key(&path)
}

/// Creates `dir` (and missing parents) and sets it to 0700, so no other account lists or reads
/// what is inside.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(|| format!("setting {} to mode 0700", dir.display()))
}

/// What [`create_new`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// `content` is now at the path.
    Written,
    /// Another writer was first: the file's content, to use instead.
    Existing(Vec<u8>),
}

/// Writes `content` to `path` (mode 0600, synced) unless the path exists. The parent directory
/// must exist ([`ensure_dir`]).
pub fn create_new(path: &Path, content: &[u8]) -> Result<Created> {
    let tmp = temp_beside(path)?;
    write_private(&tmp, content)?;
    // A link, not a rename: fails instead of replacing a secret that appeared meanwhile.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(Created::Written),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(Created::Existing(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?))
        }
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// Replaces `path` with `content` (mode 0600) in one rename: for files derived from a secret
/// that is already fixed (a certificate re-issued by the same CA, a copy of the CA certificate),
/// where two writers would write equally valid contents.
pub fn replace(path: &Path, content: &[u8]) -> Result<()> {
    let tmp = temp_beside(path)?;
    write_private(&tmp, content)?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// [`replace`] unless the file already holds exactly `content` (mode 0600).
pub fn ensure(path: &Path, content: &[u8]) -> Result<()> {
    match std::fs::read(path) {
        Ok(old) if old == content => Ok(std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?),
        _ => replace(path, content),
    }
}

fn temp_beside(path: &Path) -> Result<PathBuf> {
    let dir = path.parent().with_context(|| format!("{} has no directory", path.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // The process id keeps two builds apart; the name keeps one build's files apart.
    Ok(dir.join(format!(".{name}.{}.tmp", std::process::id())))
}

fn write_private(tmp: &Path, content: &[u8]) -> Result<()> {
    let _ = std::fs::remove_file(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(content)?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rollout_key_is_created_once_private_and_checked() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let a = load_or_create_rollout_key(d.path()).unwrap();
        let b = load_or_create_rollout_key(d.path()).unwrap();
        assert_eq!(a, b, "a second build must reuse the key");
        let path = crate::rollout::master_key_path(d.path());
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_ne!(crate::rollout::node_key(&a, "etcd-1"), crate::rollout::node_key(&a, "etcd-2"));
        std::fs::write(&path, "nope\n").unwrap();
        let err = load_or_create_rollout_key(d.path()).unwrap_err().to_string();
        assert!(err.contains("not 64 hex digits"), "{err}");
    }

    #[test]
    fn created_once_0600_and_the_first_writer_wins() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("secrets");
        ensure_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let p = dir.join("a.pem");
        assert_eq!(create_new(&p, b"first").unwrap(), Created::Written);
        assert_eq!(create_new(&p, b"second").unwrap(), Created::Existing(b"first".to_vec()));
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        replace(&p, b"third").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"third");
        ensure(&dir.join("b"), b"x").unwrap();
        ensure(&dir.join("b"), b"x").unwrap();
        assert_eq!(std::fs::metadata(dir.join("b")).unwrap().permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
    }
}
