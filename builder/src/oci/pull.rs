//! Pulling images into the download cache with oci-client: the reference's manifest (an index is
//! resolved to the target architecture's entry), then config and layers, each verified against
//! its digest and size and stored by digest; layers stream to disk and are never whole in
//! memory. A cache ref from (architecture, reference) to the resolved manifest lets `--offline`
//! builds find everything again without a registry.
//!
//! Online, a tag is resolved again on every build (it may have moved): that costs one manifest
//! request, while blobs already in the cache are never downloaded again. A reference by digest
//! whose blobs are all cached needs no request at all.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};

use super::flatten::LayerCheck;
use super::manifest::{self, Descriptor, Document};
use super::Image;
use crate::arch::Arch;
use crate::cache::{BlobWriter, CacheError, Mismatch};
use crate::fetch::Fetcher;
use crate::image_ref::ImageRef;
use crate::profile::images::Registry;

/// Manifests and indexes are small documents; anything bigger is a wrong response.
const MANIFEST_LIMIT: u64 = 4 * 1024 * 1024;

/// What the cache remembers per (architecture, reference).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Record {
    pub(super) resolved: String,
    pub(super) manifest: Descriptor,
}

/// An oci-client error with its causes: the reason a connection failed (an untrusted
/// certificate, a refused connection) is in the source chain, which the error's own text leaves
/// out. An untrusted certificate or refused credentials also say which keys to look at.
fn client_error(e: oci_client::errors::OciDistributionError) -> anyhow::Error {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        source = s.source();
    }
    if text.contains("certificate") {
        text.push_str(" (a registry with a certificate from its own CA needs `image_registries.<host>.ca_file`)");
    } else if text.contains("Not authorized") {
        text.push_str(" (check `image_registries.<host>.username` and `password_file`, or the host's entry in $REGISTRY_AUTH_FILE / ~/.docker/config.json)");
    }
    anyhow!(text)
}

fn ref_key(arch: Arch, reference: &str) -> String {
    format!("oci/{}/{reference}", arch.name())
}

/// A pull session: one client and runtime for all images of a build.
pub struct Puller<'a> {
    fetcher: &'a Fetcher,
    registries: &'a BTreeMap<String, Registry>,
    base_dir: PathBuf,
    /// Created on the first network access: offline builds and fully cached digest references
    /// never build a TLS client.
    online: Option<(tokio::runtime::Runtime, Client)>,
    auths: BTreeMap<String, RegistryAuth>,
}

impl<'a> Puller<'a> {
    /// `base_dir` resolves the relative paths of `registries` (the profile's directory).
    pub fn new(fetcher: &'a Fetcher, registries: &'a BTreeMap<String, Registry>, base_dir: &Path) -> Self {
        Puller { fetcher, registries, base_dir: base_dir.to_path_buf(), online: None, auths: BTreeMap::new() }
    }

    fn client(&mut self) -> Result<&(tokio::runtime::Runtime, Client)> {
        if self.online.is_none() {
            // reqwest is built without a default crypto provider (ring instead of aws-lc, which
            // needs cmake): install ring once; a second install in the process is harmless.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let mut plain_http = Vec::new();
            let mut certs = Vec::new();
            for (host, r) in self.registries {
                if r.insecure_http {
                    plain_http.push(host.clone());
                }
                if let Some(f) = &r.ca_file {
                    let path = self.base_dir.join(f);
                    let data = std::fs::read(&path)
                        .with_context(|| format!("key `image_registries.{host}.ca_file`: reading {}", path.display()))?;
                    certs.push(Certificate { encoding: CertificateEncoding::Pem, data });
                }
            }
            let config = ClientConfig {
                protocol: ClientProtocol::HttpsExcept(plain_http),
                extra_root_certificates: certs,
                // kiln picks the platform itself (and names the ones an index has when it fails).
                platform_resolver: None,
                connect_timeout: Some(Duration::from_secs(30)),
                read_timeout: Some(Duration::from_secs(120)),
                user_agent: concat!("kiln/", env!("CARGO_PKG_VERSION")),
                ..ClientConfig::default()
            };
            let client = Client::try_from(config).context("setting up the registry client")?;
            let rt =
                tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the registry client's runtime")?;
            self.online = Some((rt, client));
        }
        Ok(self.online.as_ref().expect("set above"))
    }

    /// The credentials for a registry host (profile, then auth files, else anonymous).
    fn auth(&mut self, host: &str) -> Result<RegistryAuth> {
        if let Some(a) = self.auths.get(host) {
            return Ok(a.clone());
        }
        let creds = match self.registries.get(host) {
            Some(Registry { username: Some(u), password_file: Some(f), .. }) => {
                Some(super::auth::from_profile(host, u, &self.base_dir.join(f))?)
            }
            _ => super::auth::from_auth_files(host)?,
        };
        let auth = match creds {
            Some(c) => RegistryAuth::Basic(c.username, c.password),
            None => RegistryAuth::Anonymous,
        };
        self.auths.insert(host.to_string(), auth.clone());
        Ok(auth)
    }

    /// Pulls (or finds in the cache) `reference` for `arch`: the base OS image (`os.image`),
    /// whose layers [`super::flatten`] checks as it applies them.
    pub fn image(&mut self, reference: &ImageRef, arch: Arch) -> Result<Image> {
        self.pull(reference, arch, false)
    }

    /// Pulls (or finds in the cache) a bundled image (profile key `images`) for `arch`, its
    /// layers checked by the rules of [`super::flatten`] as they stream in (see
    /// [`Puller::checked_layers`]): the archive k3s or containerd imports on the device holds
    /// only layers kiln would have applied itself.
    pub fn bundled(&mut self, reference: &ImageRef, arch: Arch) -> Result<Image> {
        self.pull(reference, arch, true)
    }

    fn pull(&mut self, reference: &ImageRef, arch: Arch, check_layers: bool) -> Result<Image> {
        let r = reference.oci();
        let name = r.whole();
        let key = ref_key(arch, &name);
        let stored: Option<Record> = match self.fetcher.cache.get_ref(&key).with_context(|| format!("reading cache entry `{key}`"))? {
            Some(data) => serde_json::from_slice(&data).ok(),
            None => None,
        };
        let from_cache = self.fetcher.offline || r.digest().is_some();
        let record = match stored {
            Some(rec) if from_cache => rec,
            None if self.fetcher.offline => bail!(
                "image `{name}` ({arch}) is not in the cache; offline mode: run `kiln fetch PROFILE` on a host that reaches the registry"
            ),
            _ => self.resolve(r, arch)?,
        };
        let what = format!("image `{name}` ({arch}): manifest {}", record.manifest.digest);
        self.manifest_blob(r, &record.manifest, &what)?;
        let bytes = read_verified(&self.fetcher.cache, &record.manifest, &what)?;
        let blobs = match manifest::parse(&bytes, Some(&record.manifest.media_type)) {
            Ok(Document::Image { config, layers, .. }) => std::iter::once(config).chain(layers).collect::<Vec<_>>(),
            Ok(Document::Index(_)) => bail!("image `{name}` ({arch}): the platform manifest {} is itself an index", record.manifest.digest),
            Err(e) => return Err(e.context(format!("image `{name}` ({arch}): manifest {}", record.manifest.digest))),
        };
        let total: u64 = blobs.iter().map(|b| b.size).sum();
        tracing::info!("{arch}: image {name}: {} blobs, {} MiB", blobs.len(), total >> 20);
        let config_what = format!("image `{name}` ({arch}): config {}", blobs[0].digest);
        self.blob(r, &blobs[0], &config_what)?;
        let layers = &blobs[1..];
        if check_layers {
            self.checked_layers(r, &record.manifest, layers, &format!("image `{name}` ({arch})"))?;
        } else {
            for b in layers {
                self.blob(r, b, &format!("image `{name}` ({arch}): layer {}", b.digest))?;
            }
        }
        if record.resolved == record.manifest.digest {
            // A single-platform image: only its config says which platform it is for.
            let config = read_verified(&self.fetcher.cache, &blobs[0], &config_what)?;
            let p: manifest::Platform = serde_json::from_slice(&config)
                .map_err(|e| anyhow!("image `{name}`: its config {} names no os/architecture: {e}", blobs[0].digest))?;
            if !manifest::matches(&p, arch) {
                bail!("image `{name}` is a single-platform image for {p}, not linux/{} ({arch}): use a multi-arch index or a reference built for {arch}", arch.oci());
            }
        }
        self.fetcher.cache.put_ref(&key, &serde_json::to_vec(&record)?)?;
        Ok(Image { reference: name, resolved: record.resolved, manifest: record.manifest, blobs })
    }

    /// Asks the registry what `r` names now and picks the manifest for `arch`.
    fn resolve(&mut self, r: &Reference, arch: Arch) -> Result<Record> {
        let name = r.whole();
        let (top, top_digest) = self.manifest(r).with_context(|| format!("image `{name}`: fetching its manifest"))?;
        let doc = manifest::parse(&top, None).with_context(|| format!("image `{name}`"))?;
        let manifest = match doc {
            Document::Index(entries) => {
                let entry = manifest::select(&entries, arch).with_context(|| format!("image `{name}`"))?;
                entry.manifest.clone()
            }
            Document::Image { media_type, .. } => {
                // A single-platform image: store the manifest already held; its config's
                // platform is checked once the config is pulled (in `image`).
                let d = Descriptor { media_type, digest: top_digest.clone(), size: top.len() as u64 };
                self.fetcher.cache.put(d.hex(), Some(d.size), &top[..], &format!("image `{name}`: manifest"))?;
                d
            }
        };
        tracing::info!("{arch}: image {name} -> {top_digest} (manifest {})", manifest.digest);
        Ok(Record { resolved: top_digest, manifest })
    }

    /// The fetcher (cache, offline flag) of this session.
    pub fn fetcher(&self) -> &'a Fetcher {
        self.fetcher
    }

    /// A manifest document and its digest (checked by oci-client against a digest reference).
    /// Also used for other artifact kinds (charts).
    pub(super) fn manifest(&mut self, r: &Reference) -> Result<(Vec<u8>, String)> {
        let auth = self.auth(r.registry())?;
        let (rt, client) = self.client()?;
        let (bytes, digest) = rt
            .block_on(client.pull_manifest_raw(r, &auth, manifest::ACCEPTED))
            .map_err(client_error)
            .with_context(|| format!("GET manifest {r}"))?;
        if bytes.len() as u64 > MANIFEST_LIMIT {
            bail!("the manifest of {r} is larger than {MANIFEST_LIMIT} bytes");
        }
        manifest::check_digest(&digest)?;
        Ok((bytes.to_vec(), digest))
    }

    /// The verified cached copy of `d`, if there is one. Offline, a missing or corrupt copy is an
    /// error saying what to do; online, a corrupt copy is removed so the caller fetches it again.
    fn cached(&self, d: &Descriptor, what: &str) -> Result<Option<PathBuf>> {
        let cache = &self.fetcher.cache;
        match cache.get(d.hex(), Some(d.size)) {
            Ok(Some(p)) => Ok(Some(p)),
            Ok(None) if self.fetcher.offline => {
                bail!("{what} is not in the cache; offline mode: run `kiln fetch PROFILE` on a host that reaches the registry")
            }
            Ok(None) => Ok(None),
            Err(e @ CacheError::Corrupt { .. }) if self.fetcher.offline => Err(anyhow!(e)).context(what.to_string()),
            Err(CacheError::Corrupt { path, .. }) => {
                tracing::warn!("the cached copy of {what} is corrupt ({}); fetching it again", path.display());
                cache.remove(d.hex()).with_context(|| format!("removing corrupt {}", path.display()))?;
                Ok(None)
            }
            Err(e) => Err(anyhow!(e)).context(what.to_string()),
        }
    }

    /// A platform manifest in the cache: found there, or fetched from the registry's manifest
    /// endpoint by digest (registries need not serve manifests as blobs) and stored once its
    /// digest and size are checked.
    pub(super) fn manifest_blob(&mut self, r: &Reference, d: &Descriptor, what: &str) -> Result<PathBuf> {
        if let Some(p) = self.cached(d, what)? {
            return Ok(p);
        }
        let (bytes, _) = self.manifest(&r.clone_with_digest(d.digest.clone())).with_context(|| what.to_string())?;
        self.fetcher.cache.put(d.hex(), Some(d.size), &bytes[..], what).map_err(|e| {
            if e.downcast_ref::<Mismatch>().is_some() {
                e.context(format!("{what}: the registry served a manifest that does not match the digest or size its index names"))
            } else {
                e
            }
        })
    }

    /// A verified blob in the cache: found there, or pulled (streamed to disk, verified against
    /// its digest and size). `what` names the image and blob in errors.
    pub(super) fn blob(&mut self, r: &Reference, d: &Descriptor, what: &str) -> Result<PathBuf> {
        if let Some(p) = self.cached(d, what)? {
            return Ok(p);
        }
        self.download(r, d, what, None)
    }

    /// The layers of a bundled image, bottom first, each in the cache and checked by the layer
    /// rules ([`LayerCheck`]) unless the cache records that this manifest's layers passed them.
    ///
    /// A layer that is downloaded is checked while it streams in: the verified download is teed
    /// through the decompressor and the tar walker on its way to the cache (no second pass over
    /// the bytes, nothing held beyond the walker's buffers and the entries' names). A refused
    /// layer is not stored. A layer already in the cache (pulled by an earlier build or for
    /// another image) is checked from there, re-hashed as it is read.
    ///
    /// The verdict is recorded per platform manifest digest (which fixes the layers and their
    /// order; the rules look across layers, so a verdict per layer would not do) and per version
    /// of the rules, as a cache entry written only after every layer passed. Later builds
    /// (offline ones included) then decompress nothing again; a cache from before the check, or
    /// from older rules, has no verdict and is walked on first use.
    fn checked_layers(&mut self, r: &Reference, manifest: &Descriptor, layers: &[Descriptor], image: &str) -> Result<()> {
        let key = verdict_key(manifest);
        let verdict = Verdict { layers: layers.iter().map(|l| l.digest.clone()).collect() };
        let cache = &self.fetcher.cache;
        let recorded: Option<Verdict> = cache.get_ref(&key).ok().flatten().and_then(|v| serde_json::from_slice(&v).ok());
        if recorded.as_ref() == Some(&verdict) {
            for l in layers {
                self.blob(r, l, &format!("{image}: layer {}", l.digest))?;
            }
            return Ok(());
        }
        let mut check = LayerCheck::default();
        for l in layers {
            let what = format!("{image}: layer {}", l.digest);
            if self.cached(l, &what)?.is_none() {
                self.download(r, l, &what, Some(&mut check))?;
                continue;
            }
            let mut blob = self
                .fetcher
                .cache
                .open(l.hex(), l.size)
                .with_context(|| what.clone())?
                .with_context(|| format!("{what}: not in the cache"))?;
            let checked = check.layer(BufReader::with_capacity(1 << 20, &mut blob), &l.media_type, &what);
            super::used_as_pulled(blob, &what)?;
            checked?;
        }
        tracing::info!("{image}: {} layers checked ({} entries)", check.layers, check.entries);
        self.fetcher.cache.put_ref(&key, &serde_json::to_vec(&verdict)?)?;
        Ok(())
    }

    /// Downloads a blob into the cache, verified against its digest and size; with `check`, the
    /// stream is also walked as the next layer of an image on its way in (see
    /// [`Puller::checked_layers`]) and the blob is stored only if the walk passed.
    fn download(&mut self, r: &Reference, d: &Descriptor, what: &str, check: Option<&mut LayerCheck>) -> Result<PathBuf> {
        let auth = self.auth(r.registry())?;
        let fetcher = self.fetcher;
        let (rt, client) = self.client()?;
        let at = r.clone_with_digest(d.digest.clone());
        let stream = rt
            .block_on(async {
                client.store_auth_if_needed(at.resolve_registry(), &auth).await;
                client.pull_blob_stream(&at, d.digest.as_str()).await
            })
            .map_err(client_error)
            .with_context(|| format!("{what}: GET blob from {}", at.resolve_registry()))?;
        let failed = Rc::new(Cell::new(false));
        let reader = StreamReader { rt, stream: stream.stream, chunk: bytes::Bytes::new(), digest_failed: failed.clone() };
        let reader = fetcher.progress_reader(reader, Some(d.size), what);
        let mut blob = fetcher.cache.writer(d.hex(), Some(d.size), what)?;
        let mut tee = Tee { inner: reader, out: &mut blob, read_error: None };
        let checked = match check {
            Some(c) => c.layer(&mut tee, &d.media_type, what),
            None => Ok(()),
        };
        // The rest of the stream (all of it without a check; after the tar's end, its padding
        // and the compressor's trailer): the digest covers every byte.
        let rest = std::io::copy(&mut tee, &mut std::io::sink());
        let read_error = tee.read_error.take();
        // What failed first is reported: bytes that are not the blob's (the walk's complaint
        // about them would mislead), then the transfer, then the walk's refusal.
        let mismatch = |e: anyhow::Error| {
            e.context(format!(
                "{what}: the registry served content that does not match the digest or size the manifest names ({} bytes); nothing was stored — the registry's copy is damaged or was tampered with",
                d.size
            ))
        };
        if blob.over_limit() || failed.get() {
            return Err(mismatch(blob.check().err().unwrap_or_else(|| anyhow!("the registry reported a digest mismatch"))));
        }
        if let Some(e) = read_error {
            bail!("downloading {what}: {e}");
        }
        rest.with_context(|| format!("downloading {what}"))?;
        blob.check().map_err(mismatch)?;
        checked?;
        blob.persist()
    }
}

/// The cache entry recording that a platform manifest's layers passed the layer rules. The
/// version names the rules: a change to what [`LayerCheck`] refuses bumps it, so earlier
/// verdicts are not trusted and every bundled image is walked again on its next build.
fn verdict_key(manifest: &Descriptor) -> String {
    format!("oci-layers-checked/v1/{}", manifest.digest)
}

/// What a verdict records: the layers that passed, in order (the manifest names them; kept so
/// a verdict is never taken for other layers).
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Verdict {
    layers: Vec<String>,
}

/// A reader that copies what it reads into the cache's blob writer: the layer walker pulls the
/// download through it, so the cache gets exactly the bytes the walker saw.
struct Tee<'w, R> {
    inner: R,
    out: &'w mut BlobWriter,
    /// The download's own failure, kept: the walker wraps what it reads in its own words, and
    /// a transfer that broke off must not be reported as a short (mismatched) blob.
    read_error: Option<String>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf).inspect_err(|e| {
            if self.read_error.is_none() && e.kind() != std::io::ErrorKind::Interrupted {
                self.read_error = Some(e.to_string());
            }
        })?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// A small blob (manifest, config) from the cache, read once and verified as it is read.
fn read_verified(cache: &crate::cache::Cache, d: &Descriptor, what: &str) -> Result<Vec<u8>> {
    if d.size > MANIFEST_LIMIT {
        bail!("{what}: {} bytes, more than the {MANIFEST_LIMIT} bytes kiln reads for a manifest or config", d.size);
    }
    let mut blob = cache.open(d.hex(), d.size).with_context(|| what.to_string())?.with_context(|| format!("{what}: not in the cache"))?;
    let mut data = Vec::new();
    let read = blob.read_to_end(&mut data);
    super::used_as_pulled(blob, what)?;
    read.with_context(|| format!("{what}: reading it from the cache"))?;
    Ok(data)
}

/// Reads a manifest from the cache (small: bounded).
pub(super) fn read_small(path: &Path) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MANIFEST_LIMIT + 1).read_to_end(&mut data))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(data)
}

/// A blocking [`Read`] over oci-client's async byte stream: the layer goes chunk by chunk from
/// the socket into the cache's hashing writer. oci-client also checks the digest at the end of
/// the stream; that failure is remembered so the caller can report it as a mismatch.
struct StreamReader<'r> {
    rt: &'r tokio::runtime::Runtime,
    stream: futures_util::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>,
    chunk: bytes::Bytes,
    digest_failed: Rc<Cell<bool>>,
}

impl Read for StreamReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rt.block_on(self.stream.next()) {
                None => return Ok(0),
                Some(Ok(b)) => self.chunk = b,
                Some(Err(e)) => {
                    if e.get_ref().is_some_and(|inner| inner.is::<oci_client::errors::DigestError>()) || e.to_string().contains("igest") {
                        self.digest_failed.set(true);
                    }
                    return Err(e);
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        let _ = self.chunk.split_to(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;
    use crate::deb::tests::{tarball, E};
    use sha2::{Digest, Sha256};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn digest(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(data)))
    }

    struct Fake {
        host: String,
        blob_gets: Arc<AtomicUsize>,
        layer: Vec<u8>,
        amd64_manifest: String,
    }

    /// A loopback registry: `t/app:1` is an index over amd64 and arm64 whose amd64 image has
    /// the given layers (the last one served altered when `tamper`), `t/odd:1` a document of
    /// an unknown media type. `layer` is the last layer.
    fn fake_image(layers: &[(&str, Vec<u8>)], tamper: bool) -> Fake {
        let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
        let descriptors: Vec<String> =
            layers.iter().map(|(ty, l)| format!(r#"{{"mediaType":"{ty}","digest":"{}","size":{}}}"#, digest(l), l.len())).collect();
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{}]}}"#,
            manifest::OCI_MANIFEST,
            digest(&config),
            config.len(),
            descriptors.join(",")
        )
        .into_bytes();
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"{}","digest":"{}","size":{},"platform":{{"os":"linux","architecture":"amd64"}}}},{{"mediaType":"{}","digest":"sha256:{}","size":9,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#,
            manifest::OCI_INDEX,
            manifest::OCI_MANIFEST,
            digest(&manifest),
            manifest.len(),
            manifest::OCI_MANIFEST,
            "0".repeat(64)
        )
        .into_bytes();
        let odd = br#"{"schemaVersion":2,"mediaType":"application/vnd.example.odd+json"}"#.to_vec();
        let mut routes = BTreeMap::new();
        routes.insert("/v2/".to_string(), b"{}".to_vec());
        routes.insert("/v2/t/app/manifests/1".to_string(), index);
        routes.insert(format!("/v2/t/app/manifests/{}", digest(&manifest)), manifest.clone());
        routes.insert(format!("/v2/t/app/blobs/{}", digest(&config)), config);
        for (i, (_, layer)) in layers.iter().enumerate() {
            let mut served = layer.clone();
            if tamper && i + 1 == layers.len() {
                let at = served.len() / 2;
                served[at] ^= 1;
            }
            routes.insert(format!("/v2/t/app/blobs/{}", digest(layer)), served);
        }
        routes.insert("/v2/t/odd/manifests/1".to_string(), odd);
        let blob_gets = Arc::new(AtomicUsize::new(0));
        let counter = blob_gets.clone();
        let (base, _) = crate::testhttp::serve(move |path| {
            if path.contains("/blobs/") {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            match routes.get(path) {
                Some(b) => ("200 OK", b.clone()),
                None => ("404 Not Found", br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}"#.to_vec()),
            }
        });
        let layer = layers.last().map(|(_, l)| l.clone()).unwrap_or_default();
        Fake { host: base.trim_start_matches("http://").to_string(), blob_gets, layer, amd64_manifest: digest(&manifest) }
    }

    /// The registry of [`fake_image`] with one layer that is not even a tar (`os.image` pulls
    /// do not read layers; flattening does).
    fn fake(tamper: bool) -> Fake {
        fake_image(&[(TAR, b"layer bytes for amd64".to_vec())], tamper)
    }

    fn registries(host: &str) -> BTreeMap<String, Registry> {
        BTreeMap::from([(host.to_string(), Registry { insecure_http: true, ..Registry::default() })])
    }

    fn fetcher(dir: &Path, offline: bool) -> Fetcher {
        Fetcher { offline, cache: Cache::new(dir.to_path_buf()), progress: false, trust: Default::default() }
    }

    #[test]
    fn pulls_resolve_the_platform_and_a_second_pull_downloads_no_blob() {
        let f = fake(false);
        let dir = tempfile::tempdir().unwrap();
        let regs = registries(&f.host);
        let r: ImageRef = format!("{}/t/app:1", f.host).parse().unwrap();
        let img = Puller::new(&fetcher(dir.path(), false), &regs, dir.path()).image(&r, Arch::X86_64).unwrap();
        assert_eq!(img.manifest.digest, f.amd64_manifest);
        assert_eq!(img.blobs.len(), 2);
        assert_eq!(std::fs::read(fetcher(dir.path(), false).cache.blob_path(img.blobs[1].hex()).unwrap()).unwrap(), f.layer);
        assert_eq!(f.blob_gets.load(Ordering::SeqCst), 2, "config and layer");
        let again = Puller::new(&fetcher(dir.path(), false), &regs, dir.path()).image(&r, Arch::X86_64).unwrap();
        assert_eq!(again, img);
        assert_eq!(f.blob_gets.load(Ordering::SeqCst), 2, "nothing downloaded the second time");
        let offline = Puller::new(&fetcher(dir.path(), true), &regs, dir.path()).image(&r, Arch::X86_64).unwrap();
        assert_eq!(offline, img);
        let err = format!("{:#}", Puller::new(&fetcher(dir.path(), true), &regs, dir.path()).image(&r, Arch::Riscv64).unwrap_err());
        assert!(err.contains(&format!("image `{r}` (riscv64) is not in the cache")), "{err}");
        let err = format!("{:#}", Puller::new(&fetcher(dir.path(), false), &regs, dir.path()).image(&r, Arch::Riscv64).unwrap_err());
        assert!(err.contains(&format!("image `{r}`")) && err.contains("linux/amd64, linux/arm64/v8"), "{err}");
    }

    #[test]
    fn tampered_blobs_and_unknown_media_types_are_refused_naming_the_image() {
        let f = fake(true);
        let dir = tempfile::tempdir().unwrap();
        let regs = registries(&f.host);
        let r: ImageRef = format!("{}/t/app:1", f.host).parse().unwrap();
        let err = format!("{:#}", Puller::new(&fetcher(dir.path(), false), &regs, dir.path()).image(&r, Arch::X86_64).unwrap_err());
        assert!(err.contains(&format!("image `{r}` (x86_64): layer {}", digest(&f.layer))) && err.contains("does not match"), "{err}");
        assert!(!dir.path().join("blobs/sha256").join(&digest(&f.layer)[7..]).exists(), "the bad layer was stored");
        let odd: ImageRef = format!("{}/t/odd:1", f.host).parse().unwrap();
        let err = format!("{:#}", Puller::new(&fetcher(dir.path(), false), &regs, dir.path()).image(&odd, Arch::X86_64).unwrap_err());
        assert!(
            err.contains(&format!("image `{odd}`")) && err.contains("unknown manifest media type `application/vnd.example.odd+json`"),
            "{err}"
        );
    }

    const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    const GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, data).unwrap();
        e.finish().unwrap()
    }

    fn good_layers() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            (GZ, gzip(&tarball(&[E::Dir("bin/", 0o755), E::File("bin/sh", 0o755, b"shell"), E::Symlink("lib", "usr/lib")]))),
            (
                TAR,
                tarball(&[E::File("etc/app.conf", 0o644, b"conf"), E::Hardlink("bin/sh2", "bin/sh"), E::File("usr/lib/x.so", 0o644, b"x")]),
            ),
        ]
    }

    fn verdict(cache_dir: &Path, manifest: &str) -> Option<Vec<u8>> {
        let d = Descriptor { media_type: String::new(), digest: manifest.to_string(), size: 0 };
        Cache::new(cache_dir.to_path_buf()).get_ref(&verdict_key(&d)).unwrap()
    }

    #[test]
    fn bundled_images_with_hostile_entries_are_refused_naming_image_layer_and_entry() {
        let hostile: [(&str, &[E], &str); 6] = [
            ("../../etc/cron.d/x", &[E::File("../../etc/cron.d/x", 0o644, b"x")], "`..`"),
            ("/etc/shadow", &[E::File("/etc/shadow", 0o640, b"x")], "absolute"),
            ("dev/sda", &[E::Block("dev/sda", 8, 0)], "device node (8:0)"),
            ("dev/mem", &[E::Char("dev/mem", 1, 1)], "device node (1:1)"),
            // A symlink, then an entry through it: in the same layer, and under a link a lower
            // layer made (`lib -> usr/lib` of the good bottom layer).
            ("evil/passwd", &[E::Symlink("evil", "/etc"), E::File("evil/passwd", 0o644, b"x")], "through the symlink"),
            ("lib/x", &[E::File("lib/x", 0o644, b"x")], "through the symlink"),
        ];
        for (entry, tar, why) in hostile {
            for (ty, data) in [(TAR, tarball(tar)), (GZ, gzip(&tarball(tar)))] {
                let mut layers = good_layers();
                layers.push((ty, data.clone()));
                let f = fake_image(&layers, false);
                let dir = tempfile::tempdir().unwrap();
                let regs = registries(&f.host);
                let r: ImageRef = format!("{}/t/app:1", f.host).parse().unwrap();
                let err =
                    format!("{:#}", Puller::new(&fetcher(dir.path(), false), &regs, dir.path()).bundled(&r, Arch::X86_64).unwrap_err());
                assert!(err.contains(&format!("image `{r}` (x86_64): layer {}", digest(&data))), "image and layer not named: {err}");
                assert!(err.contains(&format!("entry `{entry}`")) && err.contains(why), "entry `{entry}` or `{why}` missing: {err}");
                let cache = Cache::new(dir.path().to_path_buf());
                assert!(cache.get(&digest(&data)[7..], None).unwrap().is_none(), "the refused layer was stored");
                assert!(cache.get(&digest(&good_layers()[0].1)[7..], None).unwrap().is_some(), "the good layers below are kept");
                assert_eq!(verdict(dir.path(), &f.amd64_manifest), None, "a verdict was recorded for a refused image");
                // The same image as `os.image` is pulled (flattening refuses it later); the
                // hostile layer, now cached without a verdict, is walked on first use.
                Puller::new(&fetcher(dir.path(), false), &regs, dir.path()).image(&r, Arch::X86_64).unwrap();
                let err =
                    format!("{:#}", Puller::new(&fetcher(dir.path(), true), &regs, dir.path()).bundled(&r, Arch::X86_64).unwrap_err());
                assert!(err.contains(&format!("layer {}", digest(&data))) && err.contains(&format!("entry `{entry}`")), "{err}");
            }
        }
    }

    #[test]
    fn a_good_bundled_image_is_stored_as_served_and_checked_once() {
        let layers = good_layers();
        let f = fake_image(&layers, false);
        let dir = tempfile::tempdir().unwrap();
        let regs = registries(&f.host);
        let r: ImageRef = format!("{}/t/app:1", f.host).parse().unwrap();
        let img = Puller::new(&fetcher(dir.path(), false), &regs, dir.path()).bundled(&r, Arch::X86_64).unwrap();
        let cache = Cache::new(dir.path().to_path_buf());
        for (d, (_, served)) in img.layers().iter().zip(&layers) {
            assert_eq!(&std::fs::read(cache.blob_path(d.hex()).unwrap()).unwrap(), served, "cached bytes differ from the served ones");
        }
        let recorded: Verdict = serde_json::from_slice(&verdict(dir.path(), &f.amd64_manifest).expect("no verdict")).unwrap();
        assert_eq!(recorded.layers, img.layers().iter().map(|l| l.digest.clone()).collect::<Vec<_>>());
        assert_eq!(f.blob_gets.load(Ordering::SeqCst), 3, "config and two layers");
        let offline = Puller::new(&fetcher(dir.path(), true), &regs, dir.path()).bundled(&r, Arch::X86_64).unwrap();
        assert_eq!(offline, img);
        assert_eq!(f.blob_gets.load(Ordering::SeqCst), 3, "nothing downloaded again");
    }

    #[test]
    fn a_tampered_layer_of_a_bundled_image_is_a_mismatch_not_a_tar_error() {
        // The altered byte breaks the gzip stream the walker reads: the digest is what is
        // reported, not the decompressor's complaint.
        let f = fake_image(&[(GZ, gzip(&tarball(&[E::File("etc/motd", 0o644, b"a message of the day")])))], true);
        let dir = tempfile::tempdir().unwrap();
        let regs = registries(&f.host);
        let r: ImageRef = format!("{}/t/app:1", f.host).parse().unwrap();
        let err = format!("{:#}", Puller::new(&fetcher(dir.path(), false), &regs, dir.path()).bundled(&r, Arch::X86_64).unwrap_err());
        assert!(err.contains(&format!("layer {}", digest(&f.layer))) && err.contains("does not match"), "{err}");
        assert!(Cache::new(dir.path().to_path_buf()).get(&digest(&f.layer)[7..], None).unwrap().is_none());
    }

    /// A layer replaced in the cache after the pull verified it (another process writing a shared
    /// cache), by bytes of the same size that are still a good tar: flattening and bundling read
    /// it once, re-hashed, and fail naming it.
    #[test]
    fn a_cached_layer_swapped_after_the_pull_is_detected_at_use() {
        let layers = vec![(TAR, tarball(&[E::File("etc/motd", 0o644, b"good")]))];
        let f = fake_image(&layers, false);
        let dir = tempfile::tempdir().unwrap();
        let regs = registries(&f.host);
        let r: ImageRef = format!("{}/t/app:1", f.host).parse().unwrap();
        let img = Puller::new(&fetcher(dir.path(), false), &regs, dir.path()).bundled(&r, Arch::X86_64).unwrap();
        let cache = Cache::new(dir.path().to_path_buf());
        let mut t = crate::tree::Tree::merged_usr(Arch::X86_64);
        super::super::flatten::flatten(&img, &cache, &mut t, Arch::X86_64).unwrap();
        let swapped = tarball(&[E::File("etc/motd", 0o644, b"evil")]);
        assert_eq!(swapped.len(), layers[0].1.len());
        let path = cache.blob_path(img.layers()[0].hex()).unwrap();
        let tmp = dir.path().join("swap");
        std::fs::write(&tmp, &swapped).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let layer = format!("image `{r}` (x86_64): layer {}", img.layers()[0].digest);
        let mut t = crate::tree::Tree::merged_usr(Arch::X86_64);
        let err = format!("{:#}", super::super::flatten::flatten(&img, &cache, &mut t, Arch::X86_64).unwrap_err());
        assert!(err.contains(&layer) && err.contains("changed after it was verified") && err.contains("corrupt"), "{err}");
        let out = dir.path().join("images.tar");
        let err = format!("{:#}", super::super::layout::write_archive(&[img], &cache, 0, &out, false).unwrap_err());
        assert!(err.contains(&format!("blob {}", digest(&layers[0].1))) && err.contains("changed after it was verified"), "{err}");
    }
}
