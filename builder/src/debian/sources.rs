//! Finding the Debian mirror the host already uses, from its apt sources (kiln never hard-codes one).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::packages::{field, field_words, stanzas};

/// One `deb` source as apt would see it (only what kiln needs to judge it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Source {
    uris: Vec<String>,
    suites: Vec<String>,
    signed_by: Option<String>,
}

/// The first enabled `deb` source of the host that is a Debian archive, without trailing slash.
///
/// Reads `sources.list` and then `sources.list.d/*.list` / `*.sources` in name order (apt's order).
/// Skips security and debug archives and third-party repositories: a source counts as Debian when
/// its URI path ends in `/debian` or it is signed by `debian-archive-keyring` (snapshot URIs).
pub fn host_debian_mirror(etc_apt: &Path) -> anyhow::Result<String> {
    let mut files = Vec::new();
    let main = etc_apt.join("sources.list");
    if main.is_file() {
        files.push(main);
    }
    files.extend(drop_in_files(&etc_apt.join("sources.list.d"))?);

    for file in &files {
        let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let deb822 = file.extension().is_some_and(|e| e == "sources");
        let sources = if deb822 { parse_deb822(&text) } else { parse_one_line(&text) };
        for source in sources {
            if let Some(uri) = debian_uri(&source) {
                return Ok(uri);
            }
        }
    }
    let read: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let read = if read.is_empty() { format!("{} (no source files)", etc_apt.display()) } else { read.join(", ") };
    bail!("no Debian mirror found in {read}; set `os.mirror` in the profile or pass `--mirror`")
}

/// `sources.list.d/*.list` and `*.sources`, sorted by file name; a missing directory is empty.
fn drop_in_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.with_context(|| format!("listing {}", dir.display()))?.path();
        let wanted = path.extension().is_some_and(|e| e == "list" || e == "sources");
        if wanted && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// One-line format: `deb [opt=value ...] URI suite [components...]`; `deb-src` and comments skipped.
fn parse_one_line(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb").filter(|r| r.starts_with([' ', '\t'])) else {
            continue;
        };
        let mut rest = rest.trim_start();
        let mut options = "";
        if let Some(after) = rest.strip_prefix('[') {
            let Some((opts, tail)) = after.split_once(']') else {
                continue;
            };
            options = opts;
            rest = tail.trim_start();
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        let option = |name: &str| {
            options.split_whitespace().find_map(|o| {
                let (k, v) = o.split_once('=')?;
                k.eq_ignore_ascii_case(name).then(|| v.to_string())
            })
        };
        if option("enabled").is_some_and(|v| v.eq_ignore_ascii_case("no")) {
            continue;
        }
        out.push(Source { uris: vec![uri.to_string()], suites: vec![suite.to_string()], signed_by: option("signed-by") });
    }
    out
}

/// deb822 format: stanzas with `Types`, `URIs`, `Suites`, `Signed-By`, `Enabled`.
fn parse_deb822(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for stanza in stanzas(text) {
        let get = |key: &str| field(&stanza, key);
        let words = |key: &str| field_words(&stanza, key);
        if get("Enabled").is_some_and(|v| v.trim().eq_ignore_ascii_case("no")) {
            continue;
        }
        if !words("Types").iter().any(|t| t == "deb") {
            continue;
        }
        out.push(Source { uris: words("URIs"), suites: words("Suites"), signed_by: get("Signed-By").map(str::to_string) });
    }
    out
}

/// The source's first usable Debian archive URI, if it is one.
fn debian_uri(source: &Source) -> Option<String> {
    // Security and debug suites live in separate archives with a different layout and content.
    if source.suites.iter().any(|s| s.ends_with("-security") || s.ends_with("-debug")) {
        return None;
    }
    let debian_signed = source.signed_by.as_deref().is_some_and(|s| s.contains("debian-archive-keyring"));
    source.uris.iter().find_map(|uri| {
        let uri = uri.trim_end_matches('/');
        let (scheme, rest) = uri.split_once("://")?;
        if !(scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")) {
            return None; // kiln downloads over HTTP(S) only (no file:, cdrom:, mirror+ lists)
        }
        let path = rest.split_once('/').map_or("", |(_, p)| p);
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        if segments.iter().any(|s| matches!(*s, "debian-security" | "debian-debug" | "debian-ports")) {
            return None;
        }
        let ends_in_debian = segments.last() == Some(&"debian");
        (ends_in_debian || debian_signed).then(|| uri.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etc(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sources.list.d")).unwrap();
        for (name, text) in files {
            fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    /// The layout of the machines kiln is developed on (mirror host replaced).
    #[test]
    fn this_machines_layout() {
        let dir = etc(&[
            (
                "sources.list.d/debian.sources",
                "Types: deb\n# http://snapshot.example/archive/debian/20250520T000000Z\n\
                 URIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\
                 Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                 Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\
                 Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
            ),
            (
                "sources.list.d/google-cloud-sdk.list.disabled-by-farm",
                "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n",
            ),
            (
                "sources.list.d/nodesource.sources.disabled-by-farm",
                "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\nComponents: main\n",
            ),
        ]);
        assert_eq!(host_debian_mirror(dir.path()).unwrap(), "http://mirror.example/debian");
    }

    #[test]
    fn skips_third_party_security_and_disabled() {
        let dir = etc(&[
            // Read first (sources.list), but nothing in it qualifies.
            (
                "sources.list",
                "# comment\ndeb-src http://src.example/debian bookworm main\n\
                 deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://sec.example/debian-security bookworm-security main\n\
                 deb [enabled=no] http://off.example/debian bookworm main\n",
            ),
            (
                "sources.list.d/a-nodesource.sources",
                "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\nComponents: main\n\
                 Signed-By: /usr/share/keyrings/nodesource.gpg\n",
            ),
            (
                "sources.list.d/b-cloud.list",
                "deb [signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt cloud-sdk main\n",
            ),
            (
                "sources.list.d/c-debian.sources",
                "Types: deb\nURIs: http://disabled.example/debian\nSuites: trixie\nEnabled: no\n\n\
                 Types: deb-src\nURIs: http://srconly.example/debian\nSuites: trixie\n\n\
                 Types: deb deb-src\nURIs: https://good.example/pub/debian/\nSuites: trixie\nComponents: main\n",
            ),
        ]);
        assert_eq!(host_debian_mirror(dir.path()).unwrap(), "https://good.example/pub/debian");
    }

    #[test]
    fn one_line_format_and_snapshot_by_keyring() {
        let dir = etc(&[(
            "sources.list",
            "deb [ arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg ] \
             http://snapshot.example/archive/debian/20250520T000000Z/ bookworm main\n",
        )]);
        assert_eq!(host_debian_mirror(dir.path()).unwrap(), "http://snapshot.example/archive/debian/20250520T000000Z");

        let dir = etc(&[("sources.list", "deb http://ftp.example/debian/ bookworm main contrib\n")]);
        assert_eq!(host_debian_mirror(dir.path()).unwrap(), "http://ftp.example/debian");
    }

    #[test]
    fn error_names_files_and_the_fix() {
        let dir = etc(&[("sources.list.d/x.list", "deb http://sec.example/debian-security bookworm-security main\n")]);
        let err = host_debian_mirror(dir.path()).unwrap_err().to_string();
        assert!(err.starts_with("no Debian mirror found in "), "{err}");
        assert!(err.contains("x.list") && err.contains("`os.mirror`") && err.contains("`--mirror`"), "{err}");

        let empty = tempfile::tempdir().unwrap();
        let err = host_debian_mirror(empty.path()).unwrap_err().to_string();
        assert!(err.contains("no source files"), "{err}");
    }

    /// The real host: it has a Debian mirror configured (all kiln development hosts do).
    #[test]
    fn host_has_a_mirror() {
        let mirror = host_debian_mirror(Path::new("/etc/apt")).unwrap();
        assert!(mirror.starts_with("http") && !mirror.ends_with('/'), "{mirror}");
    }
}
