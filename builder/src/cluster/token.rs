//! The cluster token: the k3s join secret, also the passphrase of k3s's bootstrap data. Read from
//! the profile's `token_file`, or generated once per output directory into
//! `<out>/secrets/<cluster>.token` (mode 0600) and reused by later builds, so rebuilt images
//! join the cluster the earlier ones formed. Its `Debug` and `Display` are redacted: it never
//! reaches a log or an error message.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::secrets;
use crate::profile::LoadedProfile;

/// A cluster token. Only [`Token::expose`] shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Wraps a secret (trimmed; must be one non-empty line).
    pub fn new(secret: &str) -> Result<Token> {
        let t = secret.trim();
        if t.is_empty() {
            bail!("the token is empty");
        }
        if t.contains(['\n', '\r']) || t.chars().any(char::is_control) {
            bail!("the token must be one line without control characters");
        }
        Ok(Token(t.to_string()))
    }

    /// The secret itself, for the files that must hold it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where a generated token is kept: `<out>/secrets/<cluster>.token`.
pub fn generated_path(out_dir: &Path, cluster: &str) -> PathBuf {
    secrets::dir(out_dir).join(format!("{cluster}.token"))
}

/// The profile's cluster token: `cluster.token_file` if given, else the generated one in
/// `out_dir` (created on the first build).
pub fn load_or_create(profile: &LoadedProfile, out_dir: &Path) -> Result<Token> {
    let Some(c) = &profile.profile.cluster else { bail!("the profile has no `cluster` key") };
    if let Some(f) = &c.token_file {
        let path = profile.resolve(f);
        return read(&path).with_context(|| format!("key `cluster.token_file`: token file {}", path.display()));
    }
    let path = generated_path(out_dir, &c.name);
    if path.exists() {
        return read(&path).with_context(|| format!("generated token file {} (delete it to make a new token)", path.display()));
    }
    create(&path).with_context(|| format!("creating the cluster token {}", path.display()))
}

fn read(path: &Path) -> Result<Token> {
    let text = std::fs::read_to_string(path).context("cannot be read")?;
    Token::new(&text)
}

/// 32 random bytes from the kernel, hex; created once ([`secrets::create_new`]) so a concurrent
/// build cannot overwrite a token another build already used.
fn create(path: &Path) -> Result<Token> {
    secrets::ensure_dir(path.parent().context("token path has no directory")?)?;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes).context("reading /dev/urandom")?;
    let token = Token(hex::encode(bytes));
    match secrets::create_new(path, format!("{}\n", token.expose()).as_bytes())? {
        secrets::Created::Written => Ok(token),
        secrets::Created::Existing(_) => read(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn loaded(dir: &Path, cluster: &str) -> LoadedProfile {
        let text = format!(
            "name: demo\narch: [x86_64]\ncluster:\n  name: lab\n  api_address: 10.0.0.1\n{}",
            crate::profile::cluster::validate::tests::with_version(cluster)
        );
        let path = dir.join("p.yaml");
        std::fs::write(&path, text).unwrap();
        LoadedProfile::load(&path).unwrap()
    }

    #[test]
    fn generated_once_with_mode_0600_and_reused() {
        let d = tempfile::tempdir().unwrap();
        let p = loaded(d.path(), "");
        let out = d.path().join("out");
        let t1 = load_or_create(&p, &out).unwrap();
        assert_eq!(t1.expose().len(), 64);
        assert!(t1.expose().chars().all(|c| c.is_ascii_hexdigit()));
        let path = out.join("secrets/lab.token");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(out.join("secrets")).unwrap().permissions().mode() & 0o777, 0o700);
        let t2 = load_or_create(&p, &out).unwrap();
        assert_eq!(t1, t2, "later builds reuse the token");
        assert_ne!(t1, load_or_create(&p, &d.path().join("other")).unwrap());
        assert_eq!(std::fs::read_dir(out.join("secrets")).unwrap().count(), 1, "no temporary file left");
    }

    #[test]
    fn token_file_is_read_trimmed_and_never_shown() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("lab.token"), "  K10abc::server:s3cr3t \n").unwrap();
        let p = loaded(d.path(), "  token_file: lab.token\n");
        let t = load_or_create(&p, &d.path().join("out")).unwrap();
        assert_eq!(t.expose(), "K10abc::server:s3cr3t");
        assert!(!format!("{t:?} {t}").contains("s3cr3t"));
        assert!(!d.path().join("out").exists(), "nothing generated when a file is given");

        std::fs::write(d.path().join("lab.token"), "\n  \n").unwrap();
        let err = format!("{:#}", load_or_create(&p, d.path()).unwrap_err());
        assert!(err.contains("cluster.token_file") && err.contains("lab.token") && err.contains("empty"), "{err}");
        let p = loaded(d.path(), "  token_file: missing.token\n");
        let err = format!("{:#}", load_or_create(&p, d.path()).unwrap_err());
        assert!(err.contains("missing.token"), "{err}");
    }
}
