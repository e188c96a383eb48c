//! Debian repository access: a suite's verified index for one architecture, and its `.deb` files.

pub mod packages;
pub mod release;
pub mod resolve;
pub mod sources;
pub mod version;

use std::collections::HashSet;
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
    /// The packages of every component read, merged (see [`load_index_from`] for precedence).
    pub packages: PackageIndex,
    /// sha256 of the InRelease file as fetched (for the build manifest).
    pub inrelease_sha256: String,
    /// Each component's `Packages.xz`, in the order they were asked for.
    pub components: Vec<ComponentIndex>,
}

/// One component's package list as read: its name and the sha256 of its
/// `<component>/binary-<arch>/Packages.xz` (as listed in the verified InRelease).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentIndex {
    pub component: String,
    pub packages_sha256: String,
}

/// The component kiln installs from unless told otherwise (Debian's free software only).
pub const DEFAULT_COMPONENT: &str = "main";

/// A component asked for that the suite's verified Release does not list. A typed error so
/// the caller can name the profile key that asked for it.
#[derive(Debug, thiserror::Error)]
#[error("suite {suite} has no component `{component}` (its Release lists: {})", available.join(" "))]
pub struct MissingComponent {
    pub suite: String,
    pub component: String,
    pub available: Vec<String>,
}

/// [`load_index_from`] for the `main` component alone.
pub fn load_index(fetcher: &Fetcher, suite: &Suite, debian_arch: &str) -> anyhow::Result<Index> {
    load_index_from(fetcher, suite, debian_arch, &[DEFAULT_COMPONENT.to_string()], &crate::reuse::Reuse::disabled())
}

/// Fetches `{mirror}/dists/{suite}/InRelease`, verifies it, then fetches and parses each
/// component's `<component>/binary-{arch}/Packages.xz` by the digest the verified InRelease
/// gives. A component the Release does not list is refused ([`MissingComponent`]).
///
/// Precedence: a package name belongs to the first component (in `components` order) that has
/// it; the same name in a later component is ignored. Debian's archive never puts one name in
/// two components of a suite, so this only matters for third-party repositories: there the
/// order written in the profile decides, predictably, and `main` first (the default) means a
/// later component can add packages but never replace one of `main`'s.
///
/// The InRelease must be the suite asked for (`Suite` or `Codename`). One fetched from the
/// network must also be unexpired (`Valid-Until`) and not older (`Date`) than the copy the cache
/// held; when it is refused, the cache keeps that copy. Offline, the cached copy was checked
/// when it was fetched, and an expired `Valid-Until` does not stop a build from it (as apt
/// installs from lists already on disk).
pub fn load_index_from(
    fetcher: &Fetcher,
    suite: &Suite,
    debian_arch: &str,
    components: &[String],
    reuse: &crate::reuse::Reuse,
) -> anyhow::Result<Index> {
    let name = &suite.suite;
    let mirror = suite.mirror.trim_end_matches('/');
    let dists = format!("{mirror}/dists/{name}");

    let inrelease_url = format!("{dists}/InRelease");
    let key = format!("{mirror}/{name}/InRelease");
    let previous = if fetcher.offline { None } else { fetcher.cache.get_ref(&key).ok().flatten() };
    let data = fetcher.document(&inrelease_url, &key, &format!("InRelease of {name}"))?;
    let accepted = accept_inrelease(&data, suite, &inrelease_url, !fetcher.offline, previous.as_deref()).map_err(|e| match previous {
        // The one way to accept an older index on purpose (a mirror rolled back by its operator).
        Some(_) if format!("{e}").contains("older index") => {
            anyhow::anyhow!("{e}; to accept it anyway, delete the cached copy {}", fetcher.cache.ref_path(&key).display())
        }
        _ => e,
    });
    let release = match accepted {
        Ok(release) => release,
        Err(e) => {
            // `document` already stored the refused file: put the last good copy back, so an
            // offline build and the next check still go by it.
            if let Some(previous) = &previous {
                if let Err(restore) = fetcher.cache.put_ref(&key, previous) {
                    tracing::warn!("restoring the cached InRelease of {name}: {restore:#}");
                }
            }
            return Err(e);
        }
    };
    if !release.architectures.iter().any(|a| a == debian_arch) {
        bail!("suite {name} has no architecture {debian_arch} (it has: {})", release.architectures.join(" "));
    }
    // Checked before any download: the Release's `Components` is the suite's own list, so a
    // misspelt name is reported as such rather than as a missing SHA256 entry.
    if let Some(missing) = components.iter().find(|c| !release.components.contains(c)) {
        return Err(MissingComponent { suite: name.clone(), component: missing.clone(), available: release.components.clone() }.into());
    }

    let mut all = Vec::new();
    let mut read = Vec::with_capacity(components.len());
    let mut earlier_names = HashSet::new();
    let mut kept = 0;
    for component in components {
        let (packages, sha256) = read_component(fetcher, reuse, &release, &dists, name, component, debian_arch)?;
        // First-listed component wins a name (see above). The names are only needed while a
        // later component is still to come (not at all for the default `[main]`).
        let last = read.len() + 1 == components.len();
        let names: HashSet<String> = if last { HashSet::new() } else { packages.iter().map(|p| p.name.clone()).collect() };
        let before = packages.len();
        all.extend(packages.into_iter().filter(|p| !earlier_names.contains(&p.name)));
        let shadowed = before - (all.len() - kept);
        if shadowed > 0 {
            tracing::warn!("{name}/{component}/{debian_arch}: {shadowed} packages whose name an earlier component has are ignored");
        }
        kept = all.len();
        earlier_names.extend(names);
        read.push(ComponentIndex { component: component.clone(), packages_sha256: sha256 });
    }

    let packages = PackageIndex::new(debian_arch, all);
    tracing::info!("{name}/{debian_arch}: {} packages from {}", packages.len(), components.join(", "));
    Ok(Index { release, arch: debian_arch.to_string(), packages, inrelease_sha256: crate::digest::sha256_hex(&data), components: read })
}

/// Fetches one component's `Packages.xz` by the digest the verified Release lists for it, and
/// parses it.
fn read_component(
    fetcher: &Fetcher,
    reuse: &crate::reuse::Reuse,
    release: &Release,
    dists: &str,
    name: &str,
    component: &str,
    debian_arch: &str,
) -> anyhow::Result<(Vec<Package>, String)> {
    let path = format!("{component}/binary-{debian_arch}/Packages.xz");
    let (sha256, size) = release.sha256.get(&path).cloned().with_context(|| format!("InRelease of {name} lists no SHA256 for {path}"))?;
    // by-hash URLs never change content, so a mirror in the middle of an update cannot hand
    // us a Packages file that disagrees with the InRelease we verified.
    let url = if release.acquire_by_hash {
        format!("{dists}/{component}/binary-{debian_arch}/by-hash/SHA256/{sha256}")
    } else {
        format!("{dists}/{path}")
    };
    let what = format!("{path} of {name}");
    // An earlier build kept the fields kiln reads of this very file (named by its verified digest).
    if let Some(kept) = reuse.open(KEPT_PACKAGES, &sha256) {
        let packages = packages::read_packages(kept).with_context(|| format!("reading {what} as an earlier build kept it"))?;
        return Ok((packages, sha256));
    }
    let blob = fetcher.blob(&url, &sha256, Some(size), &what)?;
    let mut kept = reuse.writer(KEPT_PACKAGES, &sha256);
    let packages = read_packages_xz(&blob, kept.as_mut().map(|w| w as &mut dyn std::io::Write))
        .with_context(|| format!("reading {what} ({})", blob.display()))?;
    if let Some(kept) = kept {
        kept.keep();
    }
    Ok((packages, sha256))
}

/// The kind of kept result (`crate::reuse`) holding a `Packages` file's read fields, keyed by
/// the file's sha256: decompressing and reading the whole file was most of a rebuild's index time.
const KEPT_PACKAGES: &str = "packages-fields-v1";

/// Verifies an InRelease and applies apt's acceptance rules (see [`load_index`]); `previous` is
/// the copy the cache held before this fetch.
fn accept_inrelease(data: &[u8], suite: &Suite, url: &str, fetched: bool, previous: Option<&[u8]>) -> anyhow::Result<Release> {
    let name = &suite.suite;
    let mirror = suite.mirror.trim_end_matches('/');
    let verified = |data: &[u8]| -> anyhow::Result<Release> {
        let text = release::verify_inrelease(data, &suite.keyring)
            .with_context(|| format!("InRelease of {name} ({url}) does not verify with {}", suite.keyring.display()))?;
        Release::parse(&text).with_context(|| format!("parsing InRelease of {name}"))
    };
    let release = verified(data)?;
    release.check_suite(name, mirror)?;
    if fetched {
        release.check_valid_until(std::time::SystemTime::now(), name, mirror)?;
        // The cached copy counts only if it still verifies (a cache entry carries no integrity
        // of its own).
        match previous.filter(|p| *p != data).map(verified) {
            Some(Ok(cached)) => release.check_not_older(&cached, name, mirror)?,
            Some(Err(e)) => {
                tracing::warn!("ignoring the cached InRelease of {name} for the date check: {e:#}")
            }
            None => {}
        }
    }
    Ok(release)
}

fn read_packages_xz(path: &std::path::Path, keep: Option<&mut dyn std::io::Write>) -> anyhow::Result<Vec<Package>> {
    let file = std::fs::File::open(path)?;
    let text = liblzma::read::XzDecoder::new(std::io::BufReader::new(file));
    packages::read_packages_keeping(std::io::BufReader::with_capacity(1 << 16, text), keep)
}

/// The `.deb` URL of a package on a mirror.
pub fn deb_url(mirror: &str, pkg: &Package) -> String {
    format!("{}/{}", mirror.trim_end_matches('/'), pkg.filename.trim_start_matches('/'))
}

/// Downloads (or takes from the cache) a package's `.deb`, verified against its Packages sha256+size.
pub fn fetch_deb(fetcher: &Fetcher, suite: &Suite, pkg: &Package) -> anyhow::Result<PathBuf> {
    let what = format!("{}_{}_{}.deb", pkg.name, pkg.version, pkg.architecture);
    fetcher.blob(&deb_url(&suite.mirror, pkg), &pkg.sha256, Some(pkg.size), &what)
}

/// sha256 of a downloaded file, re-exported for manifest writers that hold a path.
pub fn file_sha256(path: &std::path::Path) -> anyhow::Result<String> {
    sha256_file(path).with_context(|| format!("hashing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;
    use crate::reuse::Reuse;
    use std::time::Instant;

    /// A mirror on loopback whose InRelease the test replaces: the suite, expiry and rollback
    /// rules on the fetch path, and the cache keeping the last good copy.
    #[test]
    fn inrelease_of_another_suite_expired_or_older_is_refused_and_not_cached() {
        use release::testkeys::{cert, keyring, sign, T0};
        use std::io::Write;
        use std::sync::{Arc, Mutex};

        let dir = tempfile::tempdir().unwrap();
        let signer = cert(T0, None);
        let ring = keyring(&dir, "k.gpg", &[&signer]);
        let stanza = format!(
            "Package: hello\nVersion: 1.0\nArchitecture: amd64\nFilename: pool/main/h/hello/hello_1.0_amd64.deb\nSize: 1\nSHA256: {}\n\n",
            "0".repeat(64)
        );
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(stanza.as_bytes()).unwrap();
        let packages = xz.finish().unwrap();
        let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&packages));
        let inrelease = |suite: &str, codename: &str, date: &str, extra: &str| {
            let text = format!(
                "Suite: {suite}\nCodename: {codename}\nDate: {date}\n{extra}Architectures: amd64\nComponents: main\nSHA256:\n {digest} {} main/binary-amd64/Packages.xz\n",
                packages.len()
            );
            sign(&text, &[&signer], T0 + 60)
        };
        let served = Arc::new(Mutex::new(inrelease("stable", "trixie", "Sat, 09 Aug 2025 09:26:35 UTC", "")));
        let current = served.clone();
        let packages = packages.clone();
        let (base, _) = crate::testhttp::serve(move |path| match path {
            "/dists/trixie/InRelease" => ("200 OK", current.lock().unwrap().clone()),
            "/dists/trixie/main/binary-amd64/Packages.xz" => ("200 OK", packages.clone()),
            _ => ("404 Not Found", Vec::new()),
        });
        let fetcher =
            |offline| Fetcher { offline, cache: Cache::new(dir.path().join("cache")), progress: false, trust: Default::default() };
        let suite = Suite { mirror: base.clone(), suite: "trixie".into(), keyring: ring };
        let cached = |f: &Fetcher| f.cache.get_ref(&format!("{base}/trixie/InRelease")).unwrap().unwrap();
        let good = load_index(&fetcher(false), &suite, "amd64").unwrap();
        assert_eq!(good.packages.len(), 1);
        let good_bytes = cached(&fetcher(false));

        let refused = [
            (inrelease("oldstable", "bookworm", "Sun, 10 Aug 2025 09:26:35 UTC", ""), "Codename `bookworm`"),
            (inrelease("stable", "trixie", "Sun, 10 Aug 2025 09:26:35 UTC", "Valid-Until: Sun, 17 Aug 2025 09:26:35 UTC\n"), "expired"),
            (inrelease("stable", "trixie", "Fri, 01 Aug 2025 09:26:35 UTC", ""), "older index"),
        ];
        for (data, want) in refused {
            *served.lock().unwrap() = data;
            let err = format!("{:#}", load_index(&fetcher(false), &suite, "amd64").unwrap_err());
            assert!(err.contains(want) && err.contains(&base), "{want}: {err}");
            assert_eq!(cached(&fetcher(false)), good_bytes, "{want}: the last good copy stays cached");
            // Offline builds go on from the cached copy.
            load_index(&fetcher(true), &suite, "amd64").unwrap();
        }
        // A newer one (the suite's name as its Codename, an unexpired Valid-Until) replaces it.
        let newer = inrelease("stable", "trixie", "Sat, 16 Aug 2025 09:26:35 UTC", "Valid-Until: Tue, 16 Aug 2095 09:26:35 UTC\n");
        *served.lock().unwrap() = newer.clone();
        load_index(&fetcher(false), &suite, "amd64").unwrap();
        assert_eq!(cached(&fetcher(false)), newer);
    }

    /// Two components on a loopback mirror: each `Packages.xz` fetched by the digest the signed
    /// InRelease lists (a tampered one refused), packages resolved across both, the first-listed
    /// component winning a name found in both, and a component the suite lacks refused by name.
    #[test]
    fn components_are_each_verified_and_resolve_together() {
        use release::testkeys::{cert, keyring, sign, T0};
        use std::io::Write;
        use std::sync::{Arc, Mutex};

        let dir = tempfile::tempdir().unwrap();
        let signer = cert(T0, None);
        let ring = keyring(&dir, "k.gpg", &[&signer]);
        let stanza = |name: &str, version: &str, depends: &str, component: &str| {
            format!(
                "Package: {name}\nVersion: {version}\nArchitecture: arm64\n{depends}Filename: pool/{component}/{name}_{version}_arm64.deb\nSize: 1\nSHA256: {}\n\n",
                "0".repeat(64)
            )
        };
        let xz = |text: String| {
            let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 1);
            xz.write_all(text.as_bytes()).unwrap();
            xz.finish().unwrap()
        };
        let main = xz(stanza("linux-image", "1.0", "", "main") + &stanza("shared", "1.0", "", "main"));
        // `raspi-firmware` depends on a package of main; `shared` is here too, at a higher version.
        let nff = xz(stanza("raspi-firmware", "1:1.2", "Depends: linux-image\n", "non-free-firmware")
            + &stanza("shared", "9.0", "", "non-free-firmware"));
        let digest = |b: &[u8]| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b));
        let text = format!(
            "Suite: stable\nCodename: trixie\nDate: Sat, 09 Aug 2025 09:26:35 UTC\nArchitectures: arm64\nComponents: main non-free-firmware\nSHA256:\n {} {} main/binary-arm64/Packages.xz\n {} {} non-free-firmware/binary-arm64/Packages.xz\n",
            digest(&main),
            main.len(),
            digest(&nff),
            nff.len()
        );
        let inrelease = sign(&text, &[&signer], T0 + 60);
        let served_nff = Arc::new(Mutex::new(nff.clone()));
        let current = served_nff.clone();
        let served_main = main.clone();
        let (base, _) = crate::testhttp::serve(move |path| match path {
            "/dists/trixie/InRelease" => ("200 OK", inrelease.clone()),
            "/dists/trixie/main/binary-arm64/Packages.xz" => ("200 OK", served_main.clone()),
            "/dists/trixie/non-free-firmware/binary-arm64/Packages.xz" => ("200 OK", current.lock().unwrap().clone()),
            _ => ("404 Not Found", Vec::new()),
        });
        let suite = Suite { mirror: base.clone(), suite: "trixie".into(), keyring: ring };
        let components = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        // Each load with an empty cache of its own, so every list is fetched and checked.
        let caches = std::cell::Cell::new(0);
        let fresh = || {
            caches.set(caches.get() + 1);
            Fetcher {
                offline: false,
                cache: Cache::new(dir.path().join(format!("cache{}", caches.get()))),
                progress: false,
                trust: Default::default(),
            }
        };

        // A tampered component list is refused by its digest, like main's.
        // (same size, one byte changed: only the digest can tell)
        let mut tampered = nff.clone();
        tampered[40] ^= 1;
        *served_nff.lock().unwrap() = tampered;
        let err = format!(
            "{:#}",
            load_index_from(&fresh(), &suite, "arm64", &components(&["main", "non-free-firmware"]), &Reuse::disabled()).unwrap_err()
        );
        assert!(err.contains("non-free-firmware/binary-arm64/Packages.xz"), "{err}");
        assert!(err.contains(&digest(&nff)), "names the digest the Release lists: {err}");
        *served_nff.lock().unwrap() = nff.clone();

        let index = load_index_from(&fresh(), &suite, "arm64", &components(&["main", "non-free-firmware"]), &Reuse::disabled()).unwrap();
        assert_eq!(
            index.components,
            vec![
                ComponentIndex { component: "main".into(), packages_sha256: digest(&main) },
                ComponentIndex { component: "non-free-firmware".into(), packages_sha256: digest(&nff) },
            ]
        );
        let picked = resolve(&index.packages, &["raspi-firmware", "shared"]).unwrap();
        let mut names: Vec<String> = picked.iter().map(|p| format!("{}={}", p.name, p.version)).collect();
        names.sort();
        assert_eq!(names, ["linux-image=1.0", "raspi-firmware=1:1.2", "shared=1.0"], "main listed first keeps `shared`");
        let shared = |order: &[&str]| {
            let index = load_index_from(&fresh(), &suite, "arm64", &components(order), &Reuse::disabled()).unwrap();
            index.packages.versions("shared").iter().map(|p| p.version.clone()).collect::<Vec<_>>()
        };
        assert_eq!(shared(&["non-free-firmware", "main"]), ["9.0"], "the first-listed component wins a name");

        // Kept between builds (`crate::reuse`): a later load reads the kept fields of each list
        // by its digest, not the list itself (gone from the cache here), to the same packages.
        let both = components(&["main", "non-free-firmware"]);
        let reuse = Reuse::with_key(&dir.path().join("reuse"), [1; 32]);
        let online = fresh();
        let first = load_index_from(&online, &suite, "arm64", &both, &reuse).unwrap();
        for c in &first.components {
            std::fs::remove_file(online.cache.blob_path(&c.packages_sha256).unwrap()).unwrap();
        }
        let offline = Fetcher { offline: true, ..online };
        assert!(load_index_from(&offline, &suite, "arm64", &both, &Reuse::disabled()).is_err(), "the lists are gone");
        let again = load_index_from(&offline, &suite, "arm64", &both, &reuse).unwrap();
        assert_eq!(again.components, first.components);
        let all = |i: &Index| {
            let mut v: Vec<Package> =
                ["shared", "raspi-firmware", "linux-image"].iter().flat_map(|n| i.packages.versions(n).to_vec()).collect();
            v.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
            v
        };
        assert_eq!(all(&again), all(&first));
        assert_eq!(again.packages.len(), first.packages.len());

        // Main alone (the default) reads one list and does not see the other's packages.
        let main_only = load_index(&fresh(), &suite, "arm64").unwrap();
        assert_eq!(main_only.components.len(), 1);
        assert!(main_only.packages.versions("raspi-firmware").is_empty());

        let err = load_index_from(&fresh(), &suite, "arm64", &components(&["main", "non-free"]), &Reuse::disabled()).unwrap_err();
        let missing = err.downcast_ref::<MissingComponent>().unwrap_or_else(|| panic!("typed: {err:#}"));
        assert_eq!(missing.component, "non-free");
        let err = format!("{err:#}");
        assert!(err.contains("`non-free`") && err.contains("main non-free-firmware") && err.contains("trixie"), "{err}");
    }

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
        let cache_dir =
            std::env::var_os("KILN_TEST_CACHE").map(PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join("kiln-test-cache"));
        let fetcher = Fetcher { offline: false, cache: Cache::new(cache_dir), progress: false, trust: Default::default() };
        let suite = Suite { mirror, suite: "trixie".into(), keyring: "/usr/share/keyrings/debian-archive-keyring.gpg".into() };
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
        assert!(names.iter().any(|n| n.starts_with("linux-image-6.")), "{names:?}");
        eprintln!(
            "trixie/arm64: {} packages, load {:?}, resolve {:?}: {} selected: {}",
            index.packages.len(),
            loaded,
            resolved,
            pkgs.len(),
            pkgs.iter().map(|p| format!("{}={}", p.name, p.version)).collect::<Vec<_>>().join(" ")
        );

        // One real .deb, through the cache, verified.
        let bb = pkgs.iter().find(|p| p.name == "busybox-static").unwrap();
        let start = Instant::now();
        let deb = fetch_deb(&fetcher, &suite, bb).unwrap();
        eprintln!("busybox-static .deb ({} bytes) in {:?}", bb.size, start.elapsed());
        assert_eq!(file_sha256(&deb).unwrap(), bb.sha256);

        // Offline, the same index loads from the cache alone.
        let offline = Fetcher { offline: true, cache: fetcher.cache.clone(), progress: false, trust: Default::default() };
        let start = Instant::now();
        let again = load_index(&offline, &suite, "arm64").unwrap();
        eprintln!("offline reload from the cache in {:?}", start.elapsed());
        assert_eq!(again.components, index.components);
    }
}
