//! One-time install credentials. Each installer script `kiln serve` hands out carries a fresh
//! random credential for that MAC (`kiln.cred=` on the installer's command line). With it the
//! installer may fetch its node's secrets once (`GET /secrets`) and report its install once
//! (`POST /installed`); nothing else in a request proves which install it belongs to.
//! Credentials live only in the server's memory: a restarted server issues new ones.
//!
//! What this does not do: a MAC is no identity. A machine on the rack network that asks for
//! `/boot.ipxe` with the MAC of a node whose install is pending gets that node's credential
//! (docs/security.md says what it can then take and how `--reinstall` windows bound it).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// How long a credential is good for: an install takes minutes; a machine that boots the
/// installer again gets a new one anyway.
pub const LIFETIME: Duration = Duration::from_secs(60 * 60);
/// At most this many credentials are held; the oldest give way (every answer to
/// `/boot.ipxe?mac=` issues one, so the table must not grow with what strangers ask).
pub const MAX_GRANTS: usize = 4096;

/// What one credential allows.
#[derive(Debug, Clone)]
pub struct Grant {
    credential: String,
    /// The inventory node the MAC belongs to, if any.
    pub node: Option<String>,
    /// The node's secrets bundle (`OUT/secrets/netboot/<arch>/<node>.cpio`), if it has one.
    pub secrets: Option<PathBuf>,
    issued: Instant,
    secrets_taken: bool,
}

/// Why a request with a credential was refused (answered 403 and logged).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no install credential was handed out for this MAC (or the server restarted since)")]
    NoGrant,
    #[error("the credential does not match the one handed out for this MAC")]
    WrongCredential,
    #[error("the credential expired")]
    Expired,
    #[error("this install's secrets were fetched already (at most once per install)")]
    AlreadyTaken,
    #[error("this machine has no secrets: it is not in the inventory")]
    NoSecrets,
}

/// The credentials handed out, by MAC.
#[derive(Default)]
pub struct Grants {
    by_mac: Mutex<BTreeMap<String, Grant>>,
}

impl Grants {
    /// Issues a new credential for `mac`, replacing any earlier one. Returns the credential.
    pub fn issue(&self, mac: &str, node: Option<String>, secrets: Option<PathBuf>) -> Result<String> {
        let credential = random_hex(16)?;
        let mut map = self.by_mac.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, g| g.issued.elapsed() < LIFETIME);
        while map.len() >= MAX_GRANTS && !map.contains_key(mac) {
            let oldest = map.iter().min_by_key(|(_, g)| g.issued).map(|(m, _)| m.clone()).expect("a full table has entries");
            map.remove(&oldest);
        }
        let grant = Grant { credential: credential.clone(), node, secrets, issued: Instant::now(), secrets_taken: false };
        map.insert(mac.to_string(), grant);
        Ok(credential)
    }

    /// The secrets bundle for `mac`, once per credential.
    pub fn take_secrets(&self, mac: &str, credential: &str) -> Result<Grant, Refusal> {
        let mut map = self.by_mac.lock().unwrap_or_else(|p| p.into_inner());
        let grant = check(&mut map, mac, credential)?;
        if grant.secrets.is_none() {
            return Err(Refusal::NoSecrets);
        }
        if grant.secrets_taken {
            return Err(Refusal::AlreadyTaken);
        }
        grant.secrets_taken = true;
        Ok(grant.clone())
    }

    /// Ends the install of `mac` (its report): the credential is used up.
    pub fn complete(&self, mac: &str, credential: &str) -> Result<Grant, Refusal> {
        let mut map = self.by_mac.lock().unwrap_or_else(|p| p.into_inner());
        check(&mut map, mac, credential)?;
        Ok(map.remove(mac).expect("checked above"))
    }
}

fn check<'m>(map: &'m mut BTreeMap<String, Grant>, mac: &str, credential: &str) -> Result<&'m mut Grant, Refusal> {
    let grant = map.get_mut(mac).ok_or(Refusal::NoGrant)?;
    if !same(grant.credential.as_bytes(), credential.as_bytes()) {
        return Err(Refusal::WrongCredential);
    }
    if grant.issued.elapsed() >= LIFETIME {
        return Err(Refusal::Expired);
    }
    Ok(grant)
}

/// Compares in time independent of where the inputs differ (the credential is a secret).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)).context("reading /dev/urandom")?;
    Ok(hex::encode(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: &str = "52:54:00:00:00:01";

    #[test]
    fn secrets_once_report_once_and_only_with_the_latest_credential() {
        let g = Grants::default();
        let first = g.issue(MAC, Some("n1".into()), Some("/x/n1.cpio".into())).unwrap();
        let second = g.issue(MAC, Some("n1".into()), Some("/x/n1.cpio".into())).unwrap();
        assert_eq!(second.len(), 32);
        assert_ne!(first, second);
        assert_eq!(g.take_secrets(MAC, &first).unwrap_err(), Refusal::WrongCredential);
        assert_eq!(g.take_secrets("52:54:00:00:00:02", &second).unwrap_err(), Refusal::NoGrant);
        assert_eq!(g.take_secrets(MAC, &second).unwrap().node.as_deref(), Some("n1"));
        assert_eq!(g.take_secrets(MAC, &second).unwrap_err(), Refusal::AlreadyTaken);
        assert_eq!(g.complete(MAC, "0".repeat(32).as_str()).unwrap_err(), Refusal::WrongCredential);
        assert!(g.complete(MAC, &second).is_ok());
        assert_eq!(g.complete(MAC, &second).unwrap_err(), Refusal::NoGrant);
    }

    #[test]
    fn machines_outside_the_inventory_get_no_secrets_and_the_table_is_bounded() {
        let g = Grants::default();
        let c = g.issue(MAC, None, None).unwrap();
        assert_eq!(g.take_secrets(MAC, &c).unwrap_err(), Refusal::NoSecrets);
        for i in 0..MAX_GRANTS + 10 {
            g.issue(&format!("02:00:00:00:{:02x}:{:02x}", i >> 8, i & 0xff), None, None).unwrap();
        }
        assert_eq!(g.by_mac.lock().unwrap().len(), MAX_GRANTS);
    }
}
