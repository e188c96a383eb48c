//! k3s release artifacts for cluster images: which assets an architecture needs, where they come
//! from (the release download location, a mirror laid out like it, or a local directory), their
//! verification against the release's `sha256sum-<arch>.txt` (plus optional pins in the profile),
//! the download cache (blobs by digest, a ref from version/arch/asset to the digest so offline
//! builds work), and their place in the root: the binary, the air-gap archive and the init entry
//! that supervises `/usr/lib/kiln/k3s-run`.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::arch::Arch;
use crate::cache::{CacheError, Mismatch};
use crate::fetch::Fetcher;
use crate::manifest::{Input, InputKind};
use crate::tree::{Content, Entry, Kind, Meta, Tree, TreePath};

/// Where k3s publishes its releases: `<base>/<version with + as %2B>/<asset>`.
pub const RELEASE_BASE: &str = "https://github.com/k3s-io/k3s/releases/download";
/// The binary in the root.
pub const BINARY_PATH: &str = "usr/local/bin/k3s";
/// Links to the k3s binary beside it, which k3s runs as its embedded tools.
pub const CLIENT_TOOLS: [&str; 3] = ["kubectl", "crictl", "ctr"];
/// The directory k3s imports air-gap image archives from (on the data partition at run time).
pub const IMAGES_DIR: &str = "var/lib/rancher/k3s/agent/images";
/// Where the air-gap archive really lives: in the read-only root, so first boot does not copy
/// hundreds of MB onto the data partition and an updated image brings its own archive. The
/// images directory gets a symlink to it.
pub const ARCHIVE_DIR: &str = "usr/lib/kiln/k3s";
/// The supervisor script init runs (from the appliance overlay).
pub const RUN_SCRIPT: &str = "/usr/lib/kiln/k3s-run";

/// The air-gap image archive of an architecture.
pub fn airgap_name(arch: Arch) -> String {
    format!("k3s-airgap-images-{}.tar.zst", arch.debian())
}

/// The release's checksum list of an architecture.
pub fn checksums_name(arch: Arch) -> String {
    format!("sha256sum-{}.txt", arch.debian())
}

/// Where the k3s assets come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The official release download location.
    Release,
    /// A mirror laid out like the release: `<base>/<version>/<asset>`.
    Mirror(String),
    /// A local directory holding the assets directly.
    Dir(PathBuf),
}

impl Source {
    /// `http(s)://...` is a mirror; anything else a directory, relative to `base_dir`.
    pub fn parse(s: &str, base_dir: &Path) -> Source {
        if s.starts_with("http://") || s.starts_with("https://") {
            Source::Mirror(s.trim_end_matches('/').to_string())
        } else {
            Source::Dir(base_dir.join(s))
        }
    }

    /// The URL of an asset (`None` for a directory). The `+` of the version is sent as `%2B`:
    /// some servers (S3 among them) read a bare `+` in a path as a space.
    pub fn url(&self, version: &str, asset: &str) -> Option<String> {
        let version = version.replace('+', "%2B");
        match self {
            Source::Release => Some(format!("{RELEASE_BASE}/{version}/{asset}")),
            Source::Mirror(base) => Some(format!("{base}/{version}/{asset}")),
            Source::Dir(_) => None,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Release => write!(f, "the k3s release download location ({RELEASE_BASE})"),
            Source::Mirror(base) => write!(f, "mirror {base}"),
            Source::Dir(d) => write!(f, "directory {}", d.display()),
        }
    }
}

/// Parses a checksum list as `sha256sum` prints it: `<sha256>  <name>` (or `<sha256> *<name>`)
/// per line. Blank lines are skipped; anything else malformed is an error naming the line.
pub fn parse_checksums(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let parsed = line.split_once(' ').and_then(|(sha, name)| {
            let name = name.strip_prefix(' ').or_else(|| name.strip_prefix('*')).unwrap_or(name);
            let hex_ok = sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit());
            (hex_ok && !name.is_empty()).then(|| (name.to_string(), sha.to_ascii_lowercase()))
        });
        let (name, sha) = parsed.ok_or_else(|| format!("line {}: `{line}` is not `<sha256>  <file name>`", i + 1))?;
        out.insert(name, sha);
    }
    Ok(out)
}

/// One verified asset in the cache.
#[derive(Debug, Clone)]
pub struct Asset {
    pub name: String,
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
}

/// The verified k3s assets of one architecture.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub version: String,
    pub arch: Arch,
    pub binary: Asset,
    pub airgap: Asset,
}

/// The cache ref that maps (version, arch, asset) to the asset's digest.
pub fn ref_key(version: &str, arch: Arch, asset: &str) -> String {
    format!("k3s/{version}/{}/{asset}", arch.name())
}

/// Finds (in the cache) or fetches and verifies the binary and air-gap archive of `version` for
/// `arch`. `pin` is the profile's `cluster.k3s.sha256` entry for the arch, checked against the
/// list's entry for the binary.
///
/// Online (or from a directory) the checksum list is read first and every asset is verified
/// against its entry for the exact asset name; the digests are then recorded as cache refs.
/// Offline from a URL source, the refs recorded by an earlier build stand in for the list.
pub fn fetch(fetcher: &Fetcher, source: &Source, version: &str, arch: Arch, pin: Option<&str>) -> Result<Artifacts> {
    let list_name = checksums_name(arch);
    let sums = match source {
        Source::Dir(dir) => {
            let path = dir.join(&list_name);
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!("reading the k3s checksum list {}: the directory must hold the {version} release assets for {arch} (`{}`, `{}`, `{list_name}`)", path.display(), arch.k3s_binary(), airgap_name(arch))
            })?;
            Some(parse_checksums(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?)
        }
        _ if fetcher.offline => None,
        _ => {
            let url = source.url(version, &list_name).expect("URL sources have URLs");
            let data = fetcher.document(&url, &format!("k3s/{version}/{list_name}"), &format!("k3s {version} {list_name}"))?;
            let text = String::from_utf8(data).map_err(|_| anyhow!("{url} is not a text file"))?;
            Some(parse_checksums(&text).map_err(|e| anyhow!("{url}: {e}"))?)
        }
    };
    let get = |name: &str, pin: Option<&str>| -> Result<Asset> {
        let key = ref_key(version, arch, name);
        let sha = match &sums {
            Some(sums) => sums.get(name).cloned().ok_or_else(|| {
                anyhow!("k3s asset `{name}` has no entry in {list_name} from {source}: the list and the assets must come from the same release ({version}); get both again from the release page")
            })?,
            None => {
                let stored = fetcher.cache.get_ref(&key).with_context(|| format!("reading cache entry `{key}`"))?;
                let stored = stored.ok_or_else(|| {
                    anyhow!("k3s asset `{name}` ({version}, {arch}) is not in the cache; offline mode: run one build without --offline, or pass --k3s-assets DIR naming a directory with the release assets")
                })?;
                String::from_utf8_lossy(&stored).trim().to_string()
            }
        };
        if let Some(pin) = pin {
            if !pin.eq_ignore_ascii_case(&sha) {
                bail!(
                    "key `cluster.k3s.sha256.{arch}`: pins `{name}` to sha256 {pin}, but {list_name} from {source} lists {sha}: either the pin is for another release than {version} or the source serves different files; check the release page"
                );
            }
        }
        let path = match source {
            Source::Dir(dir) => from_dir(fetcher, dir, name, &sha, &list_name)?,
            _ => {
                let url = source.url(version, name).expect("URL sources have URLs");
                fetcher.blob(&url, &sha, None, &format!("k3s {version} {name}")).map_err(|e| {
                    if e.downcast_ref::<Mismatch>().is_some() {
                        e.context(format!("k3s asset `{name}` from {source} does not match its entry in {list_name}: the mirror holds a damaged file or one from another release; fix the mirror (assets and list from the same release)"))
                    } else {
                        e
                    }
                })?
            }
        };
        if sums.is_some() {
            fetcher.cache.put_ref(&key, sha.as_bytes())?;
        }
        let size = std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?.len();
        Ok(Asset { name: name.to_string(), path, sha256: sha, size })
    };
    let binary = get(arch.k3s_binary(), pin)?;
    let airgap = get(&airgap_name(arch), None)?;
    Ok(Artifacts { version: version.to_string(), arch, binary, airgap })
}

/// An asset from a local directory, streamed into the cache (and verified on the way), so a
/// later build finds it without the directory.
fn from_dir(fetcher: &Fetcher, dir: &Path, name: &str, sha: &str, list_name: &str) -> Result<PathBuf> {
    match fetcher.cache.get(sha, None) {
        Ok(Some(p)) => return Ok(p),
        Ok(None) => {}
        Err(CacheError::Corrupt { path, .. }) => {
            tracing::warn!("the cached copy of k3s asset {name} is corrupt ({}); taking it from {} again", path.display(), dir.display());
            fetcher.cache.remove(sha).with_context(|| format!("removing corrupt {}", path.display()))?;
        }
        Err(e) => return Err(e).with_context(|| format!("looking up k3s asset {name} in the cache")),
    }
    let path = dir.join(name);
    let file = File::open(&path).with_context(|| format!("opening k3s asset {} (listed in {list_name})", path.display()))?;
    tracing::info!("k3s: copying {} into the cache", path.display());
    fetcher.cache.put(sha, None, file, name).map_err(|e| {
        if e.downcast_ref::<Mismatch>().is_some() {
            e.context(format!("k3s asset {} does not match its entry in {list_name}: the file is damaged or from another release; put the assets and the list of one release in the directory", path.display()))
        } else {
            e
        }
    })
}

/// Puts the verified assets into the root: the binary at `/usr/local/bin/k3s` (0755), the
/// air-gap archive under `/usr/lib/kiln/k3s/` (0644) with a symlink to it in k3s's images
/// directory, and an init entry that keeps `/usr/lib/kiln/k3s-run` running.
pub fn place(a: &Artifacts, root: &mut Tree) -> Result<()> {
    root_insert_file(root, BINARY_PATH, 0o755, &a.binary.path)?;
    // k3s is a multi-call binary: these names give an operator kubectl, crictl and ctr on every
    // node (kubectl reads /etc/rancher/k3s/k3s.yaml, which k3s writes on servers).
    for tool in CLIENT_TOOLS {
        root.add_symlink(&format!("usr/local/bin/{tool}"), "k3s")?;
    }
    let archive = format!("{ARCHIVE_DIR}/{}", airgap_name(a.arch));
    root_insert_file(root, &archive, 0o644, &a.airgap.path)?;
    root.add_symlink(&format!("{IMAGES_DIR}/{}", airgap_name(a.arch)), &format!("/{archive}"))?;
    if !root.contains(RUN_SCRIPT.trim_start_matches('/')) {
        bail!("{RUN_SCRIPT} is missing from the root (kiln's cluster overlay)");
    }
    crate::inittab::append(
        root,
        "k3s (profile key `cluster`), restarted by init if it exits; output in /var/log/k3s.log.",
        &format!("::respawn:{RUN_SCRIPT}"),
    )
}

fn root_insert_file(root: &mut Tree, path: &str, mode: u32, src: &Path) -> Result<()> {
    // Read when the squashfs is written: the archive is not held in memory before that.
    root.insert(&TreePath::parse(path)?, Entry { meta: Meta::root(mode), kind: Kind::File(Content::HostFile(src.to_path_buf())) })?;
    Ok(())
}

/// The manifest's records of the assets (kind `k3s`).
pub fn manifest_inputs(a: &Artifacts) -> Vec<Input> {
    [&a.binary, &a.airgap]
        .into_iter()
        .map(|x| Input {
            kind: InputKind::K3s,
            name: x.name.clone(),
            version: Some(a.version.clone()),
            sha256: x.sha256.clone(),
            size: Some(x.size),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;
    use sha2::{Digest, Sha256};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    const V: &str = "v1.33.5+k3s1";

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    /// A stand-in release directory: files named like the release assets of `arch`, with small
    /// random contents (not k3s!), and a matching checksum list.
    fn stand_in(dir: &Path, arch: Arch) -> BTreeMap<String, Vec<u8>> {
        let mut files = BTreeMap::new();
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        for name in [arch.k3s_binary().to_string(), airgap_name(arch)] {
            let data = format!("stand-in for {name}, not k3s; {seed}\n").into_bytes();
            std::fs::write(dir.join(&name), &data).unwrap();
            files.insert(name, data);
        }
        let list: String = files.iter().map(|(n, d)| format!("{}  {n}\n", sha(d))).collect();
        std::fs::write(dir.join(checksums_name(arch)), list).unwrap();
        files
    }

    fn fetcher(cache: &Path, offline: bool) -> Fetcher {
        Fetcher { offline, cache: Cache::new(cache.to_path_buf()), progress: false }
    }

    /// A loopback HTTP server serving `files` (request path -> body); counts requests.
    fn server(files: BTreeMap<String, Vec<u8>>) -> (String, Arc<AtomicUsize>) {
        crate::testhttp::serve(move |path| match files.get(path) {
            Some(b) => ("200 OK", b.clone()),
            None => ("404 Not Found", b"missing".to_vec()),
        })
    }

    #[test]
    fn urls_encode_the_plus_and_follow_the_release_layout() {
        assert_eq!(
            Source::Release.url(V, "k3s-arm64").unwrap(),
            "https://github.com/k3s-io/k3s/releases/download/v1.33.5%2Bk3s1/k3s-arm64"
        );
        let m = Source::parse("http://mirror.lan/k3s/", Path::new("/p"));
        assert_eq!(m, Source::Mirror("http://mirror.lan/k3s".into()));
        assert_eq!(m.url(V, "sha256sum-amd64.txt").unwrap(), "http://mirror.lan/k3s/v1.33.5%2Bk3s1/sha256sum-amd64.txt");
        assert_eq!(Source::parse("assets", Path::new("/p")), Source::Dir("/p/assets".into()));
        assert_eq!(Source::parse("/abs", Path::new("/p")), Source::Dir("/abs".into()));
        assert_eq!(Source::Dir("/x".into()).url(V, "k3s"), None);
        assert_eq!(Arch::X86_64.k3s_binary(), "k3s");
        assert_eq!(Arch::Riscv64.k3s_binary(), "k3s-riscv64");
        assert_eq!(airgap_name(Arch::Aarch64), "k3s-airgap-images-arm64.tar.zst");
        assert_eq!(checksums_name(Arch::X86_64), "sha256sum-amd64.txt");
    }

    #[test]
    fn checksum_lists_parse_like_sha256sum_prints_them() {
        let a = "a".repeat(64);
        let b = "B".repeat(64);
        let text = format!("{a}  k3s\r\n\n{b} *k3s-airgap-images-amd64.tar.zst\n");
        let sums = parse_checksums(&text).unwrap();
        assert_eq!(sums["k3s"], a);
        assert_eq!(sums["k3s-airgap-images-amd64.tar.zst"], "b".repeat(64));
        assert_eq!(sums.len(), 2);
        for bad in ["nothex  k3s", &a.clone(), &format!("{}  k3s", "a".repeat(63))] {
            let err = parse_checksums(bad).unwrap_err();
            assert!(err.starts_with("line 1:"), "{bad}: {err}");
        }
    }

    #[test]
    fn local_directory_is_verified_cached_and_reused_offline() {
        let assets = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let files = stand_in(assets.path(), Arch::X86_64);
        let src = Source::Dir(assets.path().to_path_buf());
        let a = fetch(&fetcher(cache.path(), false), &src, V, Arch::X86_64, None).unwrap();
        assert_eq!(std::fs::read(&a.binary.path).unwrap(), files["k3s"]);
        assert!(a.binary.path.starts_with(cache.path()), "streamed into the cache");
        assert_eq!(a.airgap.size, files["k3s-airgap-images-amd64.tar.zst"].len() as u64);
        let inputs = manifest_inputs(&a);
        assert_eq!(inputs[0].kind, InputKind::K3s);
        assert_eq!(inputs[0].version.as_deref(), Some(V));
        assert_eq!(inputs[0].sha256, sha(&files["k3s"]));
        // Without the directory: offline from the cache refs, with the release as the source.
        drop(assets);
        let b = fetch(&fetcher(cache.path(), true), &Source::Release, V, Arch::X86_64, None).unwrap();
        assert_eq!(b.binary.sha256, a.binary.sha256);
        assert_eq!(b.airgap.path, a.airgap.path);
        // Another arch or version was never fetched: the error names the asset and the fix.
        let err = format!("{:#}", fetch(&fetcher(cache.path(), true), &Source::Release, V, Arch::Aarch64, None).unwrap_err());
        assert!(err.contains("`k3s-arm64`") && err.contains("not in the cache") && err.contains("--k3s-assets"), "{err}");
    }

    #[test]
    fn mismatch_and_missing_entry_name_the_asset_source_and_fix() {
        let assets = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        stand_in(assets.path(), Arch::Aarch64);
        std::fs::write(assets.path().join("k3s-arm64"), b"tampered").unwrap();
        let src = Source::Dir(assets.path().to_path_buf());
        let err = format!("{:#}", fetch(&fetcher(cache.path(), false), &src, V, Arch::Aarch64, None).unwrap_err());
        assert!(
            err.contains("k3s-arm64") && err.contains("does not match its entry in sha256sum-arm64.txt") && err.contains("expected sha256"),
            "{err}"
        );
        assert!(err.contains(&assets.path().display().to_string()), "{err}");

        let list = assets.path().join("sha256sum-arm64.txt");
        let text = std::fs::read_to_string(&list).unwrap();
        let kept: String = text.lines().filter(|l| !l.ends_with(" k3s-arm64")).map(|l| format!("{l}\n")).collect();
        std::fs::write(&list, kept).unwrap();
        let err = format!("{:#}", fetch(&fetcher(cache.path(), false), &src, V, Arch::Aarch64, None).unwrap_err());
        assert!(
            err.contains("`k3s-arm64` has no entry in sha256sum-arm64.txt") && err.contains("directory") && err.contains("same release"),
            "{err}"
        );

        std::fs::remove_file(&list).unwrap();
        let err = format!("{:#}", fetch(&fetcher(cache.path(), false), &src, V, Arch::Aarch64, None).unwrap_err());
        assert!(err.contains("sha256sum-arm64.txt") && err.contains("k3s-airgap-images-arm64.tar.zst"), "{err}");
    }

    #[test]
    fn pins_are_checked_against_the_list() {
        let assets = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let files = stand_in(assets.path(), Arch::Riscv64);
        let src = Source::Dir(assets.path().to_path_buf());
        let good = sha(&files["k3s-riscv64"]).to_uppercase();
        fetch(&fetcher(cache.path(), false), &src, V, Arch::Riscv64, Some(&good)).unwrap();
        let err = format!("{:#}", fetch(&fetcher(cache.path(), false), &src, V, Arch::Riscv64, Some(&"0".repeat(64))).unwrap_err());
        assert!(err.contains("key `cluster.k3s.sha256.riscv64`") && err.contains("k3s-riscv64"), "{err}");
        // Offline the pin is checked against the recorded digest too.
        let err =
            format!("{:#}", fetch(&fetcher(cache.path(), true), &Source::Release, V, Arch::Riscv64, Some(&"0".repeat(64))).unwrap_err());
        assert!(err.contains("key `cluster.k3s.sha256.riscv64`"), "{err}");
    }

    #[test]
    fn mirror_over_http_is_verified_and_cached() {
        let dir = tempfile::tempdir().unwrap();
        let files = stand_in(dir.path(), Arch::X86_64);
        let mut served: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for name in ["k3s", "k3s-airgap-images-amd64.tar.zst", "sha256sum-amd64.txt"] {
            served.insert(format!("/rel/v1.33.5%2Bk3s1/{name}"), std::fs::read(dir.path().join(name)).unwrap());
        }
        let (base, hits) = server(served);
        let cache = tempfile::tempdir().unwrap();
        let src = Source::parse(&format!("{base}/rel/"), Path::new("/"));
        let a = fetch(&fetcher(cache.path(), false), &src, V, Arch::X86_64, None).unwrap();
        assert_eq!(std::fs::read(&a.airgap.path).unwrap(), files["k3s-airgap-images-amd64.tar.zst"]);
        assert_eq!(hits.load(Ordering::SeqCst), 3);
        // Again: only the list is fetched, the assets come from the cache.
        fetch(&fetcher(cache.path(), false), &src, V, Arch::X86_64, None).unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 4);
        fetch(&fetcher(cache.path(), true), &src, V, Arch::X86_64, None).unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 4, "offline: no requests");
    }

    #[test]
    fn mirror_serving_a_wrong_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        stand_in(dir.path(), Arch::X86_64);
        let mut served: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for name in ["k3s-airgap-images-amd64.tar.zst", "sha256sum-amd64.txt"] {
            served.insert(format!("/v1.33.5%2Bk3s1/{name}"), std::fs::read(dir.path().join(name)).unwrap());
        }
        served.insert("/v1.33.5%2Bk3s1/k3s".into(), b"not what the list says".to_vec());
        let (base, _) = server(served);
        let cache = tempfile::tempdir().unwrap();
        let err = format!(
            "{:#}",
            fetch(&fetcher(cache.path(), false), &Source::parse(&base, Path::new("/")), V, Arch::X86_64, None).unwrap_err()
        );
        assert!(
            err.contains("k3s asset `k3s` from mirror http://") && err.contains("does not match its entry in sha256sum-amd64.txt"),
            "{err}"
        );
    }

    #[test]
    fn placement_puts_binary_archive_link_and_init_entry() {
        let assets = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let files = stand_in(assets.path(), Arch::X86_64);
        let a = fetch(&fetcher(cache.path(), false), &Source::Dir(assets.path().to_path_buf()), V, Arch::X86_64, None).unwrap();
        let mut root = Tree::new();
        root.add_file("etc/inittab", 0o644, "::sysinit:/usr/lib/kiln/boot\n").unwrap();
        let err = place(&a, &mut root.clone()).unwrap_err().to_string();
        assert!(err.contains("k3s-run is missing"), "{err}");
        root.add_file("usr/lib/kiln/k3s-run", 0o755, "#!/bin/sh\n").unwrap();
        place(&a, &mut root).unwrap();
        let file = |p: &str| match root.get_str(p) {
            Some(Entry { meta, kind: Kind::File(c) }) => (meta.mode, c.read().unwrap().into_owned()),
            other => panic!("{p}: {other:?}"),
        };
        assert_eq!(file("usr/local/bin/k3s"), (0o755, files["k3s"].clone()));
        assert_eq!(file("usr/lib/kiln/k3s/k3s-airgap-images-amd64.tar.zst"), (0o644, files["k3s-airgap-images-amd64.tar.zst"].clone()));
        match root.get_str("var/lib/rancher/k3s/agent/images/k3s-airgap-images-amd64.tar.zst").map(|e| &e.kind) {
            Some(Kind::Symlink(t)) => assert_eq!(t, "/usr/lib/kiln/k3s/k3s-airgap-images-amd64.tar.zst"),
            other => panic!("{other:?}"),
        }
        for tool in ["kubectl", "crictl", "ctr"] {
            match root.get_str(&format!("usr/local/bin/{tool}")).map(|e| &e.kind) {
                Some(Kind::Symlink(t)) => assert_eq!(t, "k3s"),
                other => panic!("{tool}: {other:?}"),
            }
        }
        let inittab = String::from_utf8(file("etc/inittab").1).unwrap();
        assert!(inittab.starts_with("::sysinit:/usr/lib/kiln/boot\n"), "{inittab}");
        assert!(inittab.ends_with("::respawn:/usr/lib/kiln/k3s-run\n"), "{inittab}");
    }
}
