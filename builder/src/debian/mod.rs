//! Debian repository access: a suite's verified index for one architecture, and its `.deb` files.

pub mod packages;
pub mod release;
pub mod resolve;
pub mod sources;
pub mod version;

use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::digest::sha256_file;
use crate::fetch::Fetcher;

pub use packages::{Dep, Op, Package, PackageIndex};
pub use release::Release;
pub use resolve::resolve;
pub use sources::host_debian_mirror;

/// A Debian suite on a mirror, and the keyring its InRelease must verify with.
#[derive(Debug, Clone)]
pub struct Suite {
    /// Mirror root without trailing slash (e.g. from [`host_debian_mirror`]).
    pub mirror: String,
    /// Suite or codename (`trixie`, `stable`).
    pub suite: String,
    pub keyring: PathBuf,
}

/// One architecture's verified package index, with the digests that identify its inputs.
#[derive(Debug, Clone)]
pub struct Index {
    pub release: Release,
    pub arch: String,
    pub packages: PackageIndex,
    /// sha256 of the InRelease file as fetched (for the build manifest).
    pub inrelease_sha256: String,
    /// sha256 of `main/binary-<arch>/Packages.xz` (as listed in the verified InRelease).
    pub packages_sha256: String,
}

/// The component kiln installs from (Debian's free software only).
const COMPONENT: &str = "main";

/// Fetches `{mirror}/dists/{suite}/InRelease`, verifies it, then fetches and parses
/// `main/binary-{arch}/Packages.xz` by the digest the verified InRelease gives.
pub fn load_index(fetcher: &Fetcher, suite: &Suite, debian_arch: &str) -> anyhow::Result<Index> {
    let name = &suite.suite;
    let mirror = suite.mirror.trim_end_matches('/');
    let dists = format!("{mirror}/dists/{name}");

    let inrelease_url = format!("{dists}/InRelease");
    let key = format!("{mirror}/{name}/InRelease");
    let data = fetcher.document(&inrelease_url, &key, &format!("InRelease of {name}"))?;
    let text = release::verify_inrelease(&data, &suite.keyring).with_context(|| {
        format!(
            "InRelease of {name} ({inrelease_url}) does not verify with {}",
            suite.keyring.display()
        )
    })?;
    let release = Release::parse(&text).with_context(|| format!("parsing InRelease of {name}"))?;
    if !release.architectures.iter().any(|a| a == debian_arch) {
        bail!(
            "suite {name} has no architecture {debian_arch} (it has: {})",
            release.architectures.join(" ")
        );
    }

    let path = format!("{COMPONENT}/binary-{debian_arch}/Packages.xz");
    let (sha256, size) = release
        .sha256
        .get(&path)
        .cloned()
        .with_context(|| format!("InRelease of {name} lists no SHA256 for {path}"))?;
    // by-hash URLs never change content, so a mirror in the middle of an update cannot hand
    // us a Packages file that disagrees with the InRelease we verified.
    let url = if release.acquire_by_hash {
        format!("{dists}/{COMPONENT}/binary-{debian_arch}/by-hash/SHA256/{sha256}")
    } else {
        format!("{dists}/{path}")
    };
    let what = format!("{path} of {name}");
    let blob = fetcher.blob(&url, &sha256, Some(size), &what)?;

    let packages =
        read_packages_xz(&blob).with_context(|| format!("reading {what} ({})", blob.display()))?;
    let packages = PackageIndex::new(debian_arch, packages);
    tracing::info!("{name}/{debian_arch}: {} packages", packages.len());
    Ok(Index {
        release,
        arch: debian_arch.to_string(),
        packages,
        inrelease_sha256: crate::digest::sha256_hex(&data),
        packages_sha256: sha256,
    })
}

fn read_packages_xz(path: &std::path::Path) -> anyhow::Result<Vec<Package>> {
    let file = std::fs::File::open(path)?;
    let text = liblzma::read::XzDecoder::new(std::io::BufReader::new(file));
    packages::read_packages(std::io::BufReader::with_capacity(1 << 16, text))
}

/// The `.deb` URL of a package on a mirror.
pub fn deb_url(mirror: &str, pkg: &Package) -> String {
    format!(
        "{}/{}",
        mirror.trim_end_matches('/'),
        pkg.filename.trim_start_matches('/')
    )
}

/// Downloads (or takes from the cache) a package's `.deb`, verified against its Packages sha256+size.
pub fn fetch_deb(fetcher: &Fetcher, suite: &Suite, pkg: &Package) -> anyhow::Result<PathBuf> {
    let what = format!("{}_{}_{}.deb", pkg.name, pkg.version, pkg.architecture);
    fetcher.blob(
        &deb_url(&suite.mirror, pkg),
        &pkg.sha256,
        Some(pkg.size),
        &what,
    )
}

/// sha256 of a downloaded file, re-exported for manifest writers that hold a path.
pub fn file_sha256(path: &std::path::Path) -> anyhow::Result<String> {
    sha256_file(path).with_context(|| format!("hashing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;
    use std::time::Instant;

    #[test]
    fn deb_url_joins_cleanly() {
        let pkg = Package {
            name: "busybox-static".into(),
            version: "1:1.37.0-6".into(),
            architecture: "arm64".into(),
            source: None,
            depends: Default::default(),
            pre_depends: Default::default(),
            provides: vec![],
            filename: "pool/main/b/busybox/busybox-static_1.37.0-6_arm64.deb".into(),
            size: 1,
            sha256: "0".repeat(64),
            essential: false,
            multi_arch: None,
        };
        assert_eq!(
            deb_url("http://m.example/debian/", &pkg),
            "http://m.example/debian/pool/main/b/busybox/busybox-static_1.37.0-6_arm64.deb"
        );
    }

    /// Network test against the host's real mirror: `cargo test -p kiln --lib debian::tests::real -- --ignored`.
    #[test]
    #[ignore = "downloads trixie's arm64 index from the host's Debian mirror"]
    fn real_trixie_arm64() {
        let mirror = host_debian_mirror(std::path::Path::new("/etc/apt")).unwrap();
        let cache_dir = std::env::var_os("KILN_TEST_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("kiln-test-cache"));
        let fetcher = Fetcher {
            offline: false,
            cache: Cache::new(cache_dir),
            progress: false,
        };
        let suite = Suite {
            mirror,
            suite: "trixie".into(),
            keyring: "/usr/share/keyrings/debian-archive-keyring.gpg".into(),
        };
        let start = Instant::now();
        let index = load_index(&fetcher, &suite, "arm64").unwrap();
        let loaded = start.elapsed();
        assert_eq!(index.release.codename, "trixie");
        assert!(index.release.date_unix.is_some());
        assert!(index.packages.len() > 50_000, "{}", index.packages.len());

        let start = Instant::now();
        let pkgs = resolve(&index.packages, &["busybox-static", "linux-image-arm64"]).unwrap();
        let resolved = start.elapsed();
        let names: Vec<&str> = pkgs.iter().map(|p| p.name.as_str()).collect();
        assert!(names.contains(&"busybox-static"), "{names:?}");
        assert!(
            names.iter().any(|n| n.starts_with("linux-image-6.")),
            "{names:?}"
        );
        eprintln!(
            "trixie/arm64: {} packages, load {:?}, resolve {:?}: {} selected: {}",
            index.packages.len(),
            loaded,
            resolved,
            pkgs.len(),
            pkgs.iter()
                .map(|p| format!("{}={}", p.name, p.version))
                .collect::<Vec<_>>()
                .join(" ")
        );

        // One real .deb, through the cache, verified.
        let bb = pkgs.iter().find(|p| p.name == "busybox-static").unwrap();
        let start = Instant::now();
        let deb = fetch_deb(&fetcher, &suite, bb).unwrap();
        eprintln!(
            "busybox-static .deb ({} bytes) in {:?}",
            bb.size,
            start.elapsed()
        );
        assert_eq!(file_sha256(&deb).unwrap(), bb.sha256);

        // Offline, the same index loads from the cache alone.
        let offline = Fetcher {
            offline: true,
            cache: fetcher.cache.clone(),
            progress: false,
        };
        let start = Instant::now();
        let again = load_index(&offline, &suite, "arm64").unwrap();
        eprintln!("offline reload from the cache in {:?}", start.elapsed());
        assert_eq!(again.packages_sha256, index.packages_sha256);
    }
}
