//! The install state `kiln serve` keeps in `DIR/serve-state.json`: which machines (by MAC) have
//! reported a finished install. An installed machine's next network boot is sent to its local
//! disk. The file is re-read on every use, so an operator may edit or delete entries while the
//! server runs; writes go to a temporary file renamed over the old one (never half-written).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// File name of the state file inside the served directory.
pub const STATE_FILE: &str = "serve-state.json";
/// The lock file serialising writers of the state file across processes (a dot file: never served).
const LOCK_FILE: &str = ".serve-state.lock";

/// The most machines the state records: it is rewritten whole on each report, so it must stay
/// small; a site with more machines than this serves them from more than one output directory.
pub const MAX_INSTALLED: usize = 10_000;

/// One installed machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    /// Unix time of the report.
    pub installed_at: u64,
    /// Architecture directory it installed from, when it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// Inventory node name it was given, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The image id from the install plan, when it said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// The whole file: MAC (lower case, colon-separated) to install record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    #[serde(default)]
    pub installed: BTreeMap<String, Installed>,
}

/// The state file with a lock serialising read-modify-write cycles inside this process.
pub struct Store {
    path: PathBuf,
    lock: Mutex<()>,
}

impl Store {
    pub fn new(dir: &Path) -> Store {
        Store { path: dir.join(STATE_FILE), lock: Mutex::new(()) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current state; a missing file is an empty state.
    pub fn load(&self) -> Result<State> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => serde_json::from_str(&text).with_context(|| {
                format!("parsing {} (fix or delete it; it only records which machines are installed)", self.path.display())
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.path.display())),
        }
    }

    pub fn is_installed(&self, mac: &str) -> Result<bool> {
        Ok(self.load()?.installed.contains_key(mac))
    }

    /// Applies `change` to the state and writes it back atomically. The read-modify-write holds
    /// this process's mutex and an exclusive `flock` on `.serve-state.lock` beside the file, so
    /// `kiln serve --reinstall` run while the server records a report cannot lose either change.
    pub fn update<T>(&self, change: impl FnOnce(&mut State) -> T) -> Result<T> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let lock_path = self.path.with_file_name(LOCK_FILE);
        let lock = std::fs::File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
        lock_exclusive(&lock).with_context(|| format!("locking {}", lock_path.display()))?;
        let mut state = self.load()?;
        let out = change(&mut state);
        let mut text = serde_json::to_string_pretty(&state).expect("state serialises");
        text.push('\n');
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path).with_context(|| format!("renaming {} to {}", tmp.display(), self.path.display()))?;
        Ok(out)
    }
}

/// Waits for an exclusive `flock` on `file`; it is released when the file is closed.
/// (`File::lock` is newer than the workspace's minimum Rust.)
fn lock_exclusive(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function borrows; it touches no memory.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A MAC in the form kiln compares: lower case, `:`-separated; `-` separators are accepted.
/// `None` unless it is six two-digit hex groups.
pub fn normalise_mac(mac: &str) -> Option<String> {
    let m = mac.trim().to_ascii_lowercase().replace('-', ":");
    let groups: Vec<&str> = m.split(':').collect();
    (groups.len() == 6 && groups.iter().all(|g| g.len() == 2 && g.bytes().all(|b| b.is_ascii_hexdigit()))).then_some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_forgets_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path());
        assert!(!store.is_installed("52:54:00:00:00:01").unwrap());
        store
            .update(|s| {
                s.installed
                    .insert("52:54:00:00:00:01".into(), Installed { installed_at: 1, arch: Some("x86_64".into()), node: None, image: None })
            })
            .unwrap();
        assert!(store.is_installed("52:54:00:00:00:01").unwrap());
        assert!(!dir.path().join("serve-state.json.tmp").exists());
        let removed = store.update(|s| s.installed.remove("52:54:00:00:00:01").is_some()).unwrap();
        assert!(removed);
        assert!(!store.is_installed("52:54:00:00:00:01").unwrap());
        std::fs::write(store.path(), "{ not json").unwrap();
        let err = format!("{:#}", store.load().unwrap_err());
        assert!(err.contains("serve-state.json"), "{err}");
    }

    #[test]
    fn macs_normalise() {
        assert_eq!(normalise_mac("52-54-00-AB-cd-01").as_deref(), Some("52:54:00:ab:cd:01"));
        assert_eq!(normalise_mac("52:54:00:ab:cd"), None);
        assert_eq!(normalise_mac("52:54:00:ab:cd:0g"), None);
        assert_eq!(normalise_mac("../../etc"), None);
    }
}
