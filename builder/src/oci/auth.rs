//! Registry credentials: from the profile (`image_registries.HOST.username` + `password_file`),
//! else from the standard container auth files (`$REGISTRY_AUTH_FILE`, then
//! `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`), else anonymous. Entries are read
//! as Docker reads them (the `docker_credential` crate): `credHelpers`, inline `auths`,
//! `credsStore`; a credential helper (`docker-credential-<name>`) is run for its entry.
//! Secrets never reach a log: [`Credentials`] prints the user name only.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

/// A user name and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

/// Docker Hub's names; Docker keys its credentials (and asks its helpers) as
/// `https://index.docker.io/v1/`.
fn is_docker_hub(host: &str) -> bool {
    matches!(host, "docker.io" | "index.docker.io" | "registry-1.docker.io")
}

/// Looks `registry` up in an auth file's text, as Docker does: `credHelpers` for the host,
/// then inline `auths` entries (`auth`, or `username` and `password`), then `credsStore`. A
/// credential helper (`docker-credential-<name> get`) is run through the `docker_credential`
/// crate. `origin` names the file in errors.
pub fn lookup(text: &str, registry: &str, origin: &str) -> Result<Option<Credentials>> {
    use docker_credential::{CredentialRetrievalError as E, DockerCredential};
    let server = if is_docker_hub(registry) { "https://index.docker.io/v1/" } else { registry };
    match docker_credential::get_credential_from_reader(text.as_bytes(), server) {
        Ok(DockerCredential::UsernamePassword(username, password)) => Ok(Some(Credentials { username, password })),
        Ok(DockerCredential::IdentityToken(_)) => Err(anyhow!(
            "{origin}: the entry for {registry} is an identity token (an OAuth refresh token), which kiln does not use: log in with a user name and a password or access token (`docker login -u USER {registry}`), or set `image_registries.{registry}.username` and `password_file`"
        )),
        Err(E::NoCredentialConfigured) => Ok(None),
        // A helper that has nothing for this host: anonymous, as Docker does.
        Err(E::HelperFailure { stdout, .. }) if stdout.contains("credentials not found") => Ok(None),
        Err(E::HelperFailure { helper, stderr, .. }) => {
            Err(anyhow!("{origin}: credential helper `{helper}` failed for {registry}: {}", stderr.trim()))
        }
        Err(E::HelperCommunicationError) => {
            // Docker fails here; kiln pulls anonymously (public images still work) but says so.
            tracing::warn!(
                "registry {registry}: {origin} names a credential helper (credsStore/credHelpers) that could not be run (is docker-credential-<name> installed and on PATH?): pulling anonymously"
            );
            Ok(None)
        }
        Err(E::MalformedHelperResponse) => Err(anyhow!("{origin}: the credential helper for {registry} answered something that is not Docker's credential JSON")),
        Err(E::CredentialDecodingError) => Err(anyhow!("{origin}: the `auths` entry's `auth` for {registry} is not base64 of `user:password`")),
        Err(E::CredentialMismatchError) => Err(anyhow!("{origin}: the `auths` entry for {registry} has an `auth` that does not match its `username` and `password`")),
        Err(e) => Err(anyhow!("{origin} is not a container auth file ({e})")),
    }
}

/// The auth files consulted, in order: `$REGISTRY_AUTH_FILE`, then Docker's config.
pub fn auth_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|f| !f.is_empty()) {
        files.push(PathBuf::from(f));
    }
    match std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        Some(d) => files.push(Path::new(&d).join("config.json")),
        None => {
            if let Some(home) = dirs::home_dir() {
                files.push(home.join(".docker/config.json"));
            }
        }
    }
    files
}

/// Credentials for `registry` from the first auth file that has an entry for it.
pub fn from_auth_files(registry: &str) -> Result<Option<Credentials>> {
    for f in auth_files() {
        let text = match std::fs::read_to_string(&f) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading registry credentials {}", f.display())),
        };
        if let Some(c) = lookup(&text, registry, &f.display().to_string())? {
            tracing::info!("registry {registry}: credentials of user `{}` from {}", c.username, f.display());
            return Ok(Some(c));
        }
    }
    Ok(None)
}

/// Credentials from the profile: `username` and the first line of `password_file`.
pub fn from_profile(registry: &str, username: &str, password_file: &Path) -> Result<Credentials> {
    let text = std::fs::read_to_string(password_file)
        .with_context(|| format!("key `image_registries.{registry}.password_file`: reading {}", password_file.display()))?;
    let password = text.lines().next().unwrap_or("").to_string();
    if password.is_empty() {
        anyhow::bail!("key `image_registries.{registry}.password_file`: {} is empty", password_file.display());
    }
    Ok(Credentials { username: username.to_string(), password })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_entries_decode_by_host() {
        let text = r#"{"auths": {
            "registry.example:5000": {"auth": "YWxpY2U6czNjcmV0"},
            "https://index.docker.io/v1/": {"username": "bob", "password": "hunter2"}
        }, "credsStore": "desktop"}"#;
        let c = lookup(text, "registry.example:5000", "f").unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("alice", "s3cret"));
        let c = lookup(text, "docker.io", "f").unwrap().unwrap();
        assert_eq!(c.username, "bob");
        // Not in `auths`: `credsStore` names a helper this host does not have: anonymous, with a warning.
        assert!(lookup(text, "registry.example", "f").unwrap().is_none(), "the port is part of the host");
        assert!(!format!("{c:?}").contains("hunter2"), "Debug never shows the password");
    }

    #[test]
    fn malformed_auth_files_are_named() {
        let err = lookup("{\"auths\": {\"r\": {\"auth\": \"!!\"}}}", "r", "/x/config.json").unwrap_err().to_string();
        assert!(err.contains("/x/config.json") && err.contains("`auth` for r"), "{err}");
        assert!(lookup("{\"auths\": 5}", "r", "/x/config.json").unwrap_err().to_string().contains("/x/config.json"));
    }
}
