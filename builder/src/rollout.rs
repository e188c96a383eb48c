//! The shared secret behind rollout reports (docs/updates.md, "Rollout"): how `kiln serve
//! --rollout` knows that a "ready on 2.0.0" came from the node it names.
//!
//! The first build of a profile with `update.server` creates a random master key in
//! `OUT/secrets/rollout.key` (kept, like the cluster PKI, so every later build into the same
//! output gives the nodes the same keys). Each inventory node gets only its own key,
//! `HMAC-SHA256(master, "kiln-rollout-node\n" + node)`, in `etc/kiln/nodes/<node>/update/report.key`
//! (0600: a secret, so netboot hands it to that node alone). A node signs each report with its key
//! over a fresh nonce the server issued (no clocks: boards without an RTC boot in 1970), so a report
//! cannot be forged by another node or replayed. The device computes the same HMAC in shell
//! (`kiln_hmac_sha256` in the appliance's lib.sh).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The master key's file name in `OUT/secrets/`.
pub const MASTER_KEY_FILE: &str = "rollout.key";
/// Where a node's key is, under its inventory directory `etc/kiln/nodes/<node>/`.
pub const NODE_KEY_PATH: &str = "update/report.key";

/// HMAC-SHA256 (RFC 2104) over sha2: the one MAC the device can also compute with busybox alone.
pub use crate::digest::hmac_sha256;

/// A node's report key (32 bytes; hex in its `report.key`).
pub fn node_key(master: &[u8; 32], node: &str) -> [u8; 32] {
    hmac_sha256(master, format!("kiln-rollout-node\n{node}").as_bytes())
}

/// What a report's signature covers: every field of the report and the server's nonce.
pub fn report_message(node: &str, arch: &str, version: &str, state: &str, nonce: &str) -> String {
    format!("kiln-rollout-report\n{node}\n{arch}\n{version}\n{state}\n{nonce}")
}

/// The lowercase hex signature of a report, with the node's key.
pub fn report_signature(node_key: &[u8; 32], message: &str) -> String {
    hex::encode(hmac_sha256(node_key, message.as_bytes()))
}

/// `OUT/secrets/rollout.key` (created by `cluster::secrets::load_or_create_rollout_key`).
pub fn master_key_path(out_dir: &Path) -> PathBuf {
    out_dir.join("secrets").join(MASTER_KEY_FILE)
}

/// Reads the master key (64 hex digits and a newline).
pub fn read_master_key(path: &Path) -> Result<[u8; 32]> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!("reading the rollout key {}: build a profile with `update.server` into this output directory first", path.display())
    })?;
    let bytes = hex::decode(text.trim()).ok().filter(|b| b.len() == 32);
    match bytes {
        Some(b) => Ok(b.try_into().expect("checked length")),
        None => bail!(
            "{} is not 64 hex digits: it is not a kiln rollout key (delete it only if no node runs an image built with it)",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2 (a short key) and test case 6 (a key longer than the block).
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex::encode(hmac_sha256(&[0xaa; 131], b"Test Using Larger Than Block-Size Key - Hash Key First")),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }
}
