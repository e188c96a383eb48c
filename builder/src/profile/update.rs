//! The profile's `update:` section: the appliance's version, the minisign public keys its
//! `kiln-update` accepts, the oldest version a bundle of this build applies to, and how long a
//! trial boot may take to reach ready. Rendered into the root by the `update` feature; the bundle
//! (`kiln build --format update`) is written from it too (docs/updates.md).

use std::path::Path;

use anyhow::{bail, Context, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Profile;

/// `update:`: signed A/B updates. Absent: the image trusts no key and refuses every update.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Update {
    /// This build's version: dotted numbers (`1`, `1.2`, `1.2.0`), compared number by number.
    /// Written to `/usr/lib/kiln/update/version` and into the bundle's `update.txt`.
    pub version: String,
    /// The minisign public keys the appliance accepts bundles from: the key itself (the `RW...`
    /// base64 line `kiln keygen` prints), a path to a `.pub` file (relative to the profile), or
    /// `{key: ..., allow_downgrade: true}` for a key that may also sign downgrades. List two to
    /// rotate keys. Empty: every update is refused.
    #[serde(default)]
    pub trusted_keys: Vec<TrustedKey>,
    /// The oldest installed version this build's bundle applies to (dotted numbers). Absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_version: Option<String>,
    /// How long a trial boot of a new version may take to reach `[kiln] ready` before it is
    /// rolled back: seconds (`300`, `300s`), minutes (`5m`) or hours (`1h`).
    #[serde(default = "default_health_timeout")]
    pub health_timeout: String,
    /// The `kiln serve --rollout` address the nodes ask for updates (`http://10.0.0.1:8080`): each
    /// inventory node reports to it and applies the update when the rollout reaches it
    /// (docs/updates.md, "Rollout"). Needs `cluster.nodes`. Absent: updates are applied by hand
    /// (`kiln-update apply`) or from a KILN-UPDATE stick only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
}

fn default_health_timeout() -> String {
    "5m".into()
}

/// One `update.trusted_keys` entry.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum TrustedKey {
    /// A minisign public key (`RW...`) or the path of a `.pub` file.
    Key(String),
    /// A key with options.
    Entry(KeyEntry),
}

/// A trusted key with options.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// A minisign public key (`RW...`) or the path of a `.pub` file (relative to the profile).
    pub key: String,
    /// Bundles signed by this key may install an older version than the running one (when the
    /// bundle was built with `--allow-downgrade`).
    #[serde(default)]
    pub allow_downgrade: bool,
}

impl TrustedKey {
    pub fn key(&self) -> &str {
        match self {
            TrustedKey::Key(k) => k,
            TrustedKey::Entry(e) => &e.key,
        }
    }

    pub fn allow_downgrade(&self) -> bool {
        matches!(self, TrustedKey::Entry(e) if e.allow_downgrade)
    }

    /// The public key: parsed from the entry, or read from the file it names (relative to
    /// `base_dir`). The error names what is wrong, not the key path (the caller adds it).
    pub fn load(&self, base_dir: &Path) -> Result<minisign::PublicKey> {
        let s = self.key().trim();
        if let Ok(pk) = minisign::PublicKey::from_base64(s) {
            return Ok(pk);
        }
        // Not a key: a file, unless it looks like a mistyped key (no path characters).
        let looks_like_key = s.starts_with("RW") && !s.contains('/') && !s.ends_with(".pub");
        if looks_like_key {
            bail!("`{s}` is not a minisign public key (the `RW...` line of a .pub file, 56 characters; `kiln keygen` prints one)");
        }
        let path = if Path::new(s).is_absolute() { Path::new(s).to_path_buf() } else { base_dir.join(s) };
        if !path.is_file() {
            bail!("key file {} does not exist (paths are relative to the profile; or give the `RW...` key itself)", path.display());
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        public_key_from_text(&text)
            .with_context(|| format!("{} is not a minisign public key file (`kiln keygen` writes NAME.pub)", path.display()))
    }
}

/// A minisign public key from a `.pub` file's text: the box (`untrusted comment:` line, then the
/// key) or the bare `RW...` line.
pub fn public_key_from_text(text: &str) -> Result<minisign::PublicKey> {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with("untrusted comment:")).unwrap_or_default();
    minisign::PublicKey::from_base64(line).map_err(|e| anyhow::anyhow!("{e}"))
}

/// A version as numbers: `1.2.0` -> [1, 2, 0]; `None` unless dotted decimal numbers.
pub fn parse_version(v: &str) -> Option<Vec<u64>> {
    if v.is_empty() || v.len() > 64 {
        return None;
    }
    v.split('.').map(|n| if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) { n.parse().ok() } else { None }).collect()
}

/// A duration in seconds: `300`, `300s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.as_bytes().last()? {
        b's' => (&s[..s.len() - 1], 1),
        b'm' => (&s[..s.len() - 1], 60),
        b'h' => (&s[..s.len() - 1], 3600),
        _ => (s, 1),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    num.parse::<u64>().ok()?.checked_mul(mult).filter(|&n| n > 0)
}

impl Update {
    /// `health_timeout` in seconds (validated).
    pub fn health_timeout_secs(&self) -> u64 {
        parse_duration(&self.health_timeout).unwrap_or(300)
    }

    /// `server` without a trailing `/`, as the device reads it.
    pub fn server_base(&self) -> Option<&str> {
        self.server.as_deref().map(|s| s.trim_end_matches('/'))
    }
}

/// Semantic checks of `update`: versions, the timeout, every trusted key parses.
pub fn validate(p: &Profile, base_dir: &Path) -> Result<()> {
    let Some(u) = &p.update else { return Ok(()) };
    if parse_version(&u.version).is_none() {
        bail!("key `update.version`: `{}`: expected dotted numbers like 1.2.0", u.version);
    }
    if let Some(m) = &u.min_version {
        let Some(min) = parse_version(m) else { bail!("key `update.min_version`: `{m}`: expected dotted numbers like 1.0.0") };
        if cmp_versions(&min, &parse_version(&u.version).unwrap_or_default()) == std::cmp::Ordering::Greater {
            bail!("key `update.min_version`: {m} is newer than `update.version` {}: no device could take this build's bundle", u.version);
        }
    }
    if parse_duration(&u.health_timeout).is_none() {
        bail!("key `update.health_timeout`: `{}`: expected seconds (`300`, `300s`), minutes (`5m`) or hours (`1h`)", u.health_timeout);
    }
    if let Some(url) = &u.server {
        validate_server(url, p)?;
    }
    let mut seen = Vec::new();
    for (i, k) in u.trusted_keys.iter().enumerate() {
        let key = match k {
            TrustedKey::Key(_) => format!("update.trusted_keys[{i}]"),
            TrustedKey::Entry(_) => format!("update.trusted_keys[{i}].key"),
        };
        let pk = k.load(base_dir).with_context(|| format!("key `{key}`"))?;
        let b64 = pk.to_base64();
        if seen.contains(&b64) {
            bail!("key `{key}`: the same public key is listed twice");
        }
        seen.push(b64);
    }
    Ok(())
}

/// `update.server`: a plain `http://host[:port]` base (busybox wget on the device; a path would
/// be ambiguous with the server's own `/rollout/` and `/updates/` paths), and an inventory to roll out to.
fn validate_server(url: &str, p: &Profile) -> Result<()> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        anyhow::anyhow!("key `update.server`: `{url}`: expected `http://HOST[:PORT]`, the address of `kiln serve --rollout` (reports are signed, bundles are verified: no TLS is needed)")
    })?;
    let host_port = rest.trim_end_matches('/');
    if host_port.is_empty() || host_port.contains(['/', '?', '#', '@', ' ']) {
        bail!("key `update.server`: `{url}`: expected `http://HOST[:PORT]` with no path");
    }
    if p.cluster.as_ref().is_none_or(|c| c.nodes.is_empty()) {
        bail!("key `update.server`: a rollout hands the update to the inventory's nodes: add `cluster.nodes`, or drop `update.server` and apply updates with `kiln-update apply`");
    }
    Ok(())
}

/// Compares two versions number by number; missing numbers count as 0 (`1.2` == `1.2.0`).
pub fn cmp_versions(a: &[u64], b: &[u64]) -> std::cmp::Ordering {
    let n = a.len().max(b.len());
    (0..n).map(|i| a.get(i).unwrap_or(&0).cmp(b.get(i).unwrap_or(&0))).find(|o| o.is_ne()).unwrap_or(std::cmp::Ordering::Equal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::test_profile;

    const KEY: &str = "RWQf6LRCGA9i53mlYecO4IzT51TGPpvWucNSCh1CBM0QTaLn73Y7GFO3";

    fn check(yaml: &str, dir: &Path) -> Result<(), String> {
        validate(&test_profile(yaml), dir).map_err(|e| format!("{e:#}"))
    }

    #[test]
    fn versions_and_durations_parse() {
        assert_eq!(parse_version("1.2.0"), Some(vec![1, 2, 0]));
        assert_eq!(parse_version("7"), Some(vec![7]));
        for bad in ["", "1.", ".1", "1.2.x", "v1", "1..2", "1.2-rc1"] {
            assert_eq!(parse_version(bad), None, "{bad}");
        }
        assert_eq!(parse_duration("5m"), Some(300));
        assert_eq!(parse_duration("90"), Some(90));
        assert_eq!(parse_duration("90s"), Some(90));
        assert_eq!(parse_duration("1h"), Some(3600));
        for bad in ["", "m", "0", "5 m", "5d", "-1"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        assert_eq!(cmp_versions(&[1, 2], &[1, 2, 0]), std::cmp::Ordering::Equal);
        assert_eq!(cmp_versions(&[1, 10], &[1, 9, 9]), std::cmp::Ordering::Greater);
    }

    #[test]
    fn the_section_parses_with_its_defaults() {
        let p = test_profile(&format!(
            "update:\n  version: 1.2.0\n  trusted_keys:\n    - {KEY}\n    - {{key: keys/r.pub, allow_downgrade: true}}\n"
        ));
        let u = p.update.unwrap();
        assert_eq!(u.health_timeout_secs(), 300);
        assert_eq!(u.trusted_keys[0].key(), KEY);
        assert!(!u.trusted_keys[0].allow_downgrade());
        assert!(u.trusted_keys[1].allow_downgrade());
        assert_eq!(u.trusted_keys[1].key(), "keys/r.pub");
    }

    #[test]
    fn bad_values_name_their_key() {
        let d = tempfile::tempdir().unwrap();
        assert!(check(&format!("update: {{version: 1.2.0, trusted_keys: [{KEY}]}}\n"), d.path()).is_ok());
        for (yaml, want) in [
            ("update: {version: v1.2}\n", "key `update.version`: `v1.2`: expected dotted numbers like 1.2.0"),
            ("update: {version: \"1.2\", min_version: 1.x}\n", "key `update.min_version`"),
            ("update: {version: \"1.2\", min_version: 1.3}\n", "newer than"),
            ("update: {version: \"1\", health_timeout: soon}\n", "key `update.health_timeout`"),
            (
                "update: {version: \"1\", trusted_keys: [RWQnotakey]}\n",
                "key `update.trusted_keys[0]`: `RWQnotakey` is not a minisign public key",
            ),
            ("update: {version: \"1\", trusted_keys: [keys/missing.pub]}\n", "key `update.trusted_keys[0]`: key file"),
            ("update: {version: \"1\", trusted_keys: [{key: keys/missing.pub}]}\n", "key `update.trusted_keys[0].key`"),
            ("update: {version: \"1\", server: \"https://x:1\"}\n", "key `update.server`: `https://x:1`: expected `http://HOST[:PORT]`"),
            ("update: {version: \"1\", server: \"http://x:1/path\"}\n", "with no path"),
            ("update: {version: \"1\", server: \"http://10.0.0.1:8080\"}\n", "add `cluster.nodes`"),
        ] {
            let err = check(yaml, d.path()).unwrap_err();
            assert!(err.contains(want), "{yaml}: {err}");
        }
        let dup = check(&format!("update: {{version: \"1\", trusted_keys: [{KEY}, {KEY}]}}\n"), d.path()).unwrap_err();
        assert!(dup.contains("update.trusted_keys[1]") && dup.contains("twice"), "{dup}");
    }

    #[test]
    fn key_files_are_read_relative_to_the_profile() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("keys")).unwrap();
        std::fs::write(d.path().join("keys/a.pub"), format!("untrusted comment: minisign public key 1234\n{KEY}\n")).unwrap();
        std::fs::write(d.path().join("keys/bad.pub"), "untrusted comment: x\nhello\n").unwrap();
        assert!(check("update: {version: \"1\", trusted_keys: [keys/a.pub]}\n", d.path()).is_ok());
        let err = check("update: {version: \"1\", trusted_keys: [keys/bad.pub]}\n", d.path()).unwrap_err();
        assert!(err.contains("update.trusted_keys[0]") && err.contains("is not a minisign public key file"), "{err}");
    }
}
