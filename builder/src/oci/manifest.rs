//! OCI/Docker manifest documents as kiln reads them: which kind a document is (index or image
//! manifest, by media type), which index entry serves a target architecture, and the blobs an
//! image manifest names. Only sha256 descriptors with a size are accepted: every blob is
//! verified against both before it is stored.

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};

use crate::arch::Arch;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// What kiln asks registries for (and all it understands).
pub const ACCEPTED: &[&str] = &[OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];

/// A content descriptor: a blob's media type, sha256 digest (`sha256:<hex>`) and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

impl Descriptor {
    /// The lowercase hex of a `sha256:` digest (checked when the document was parsed).
    pub fn hex(&self) -> &str {
        &self.digest["sha256:".len()..]
    }
}

/// A parsed manifest document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Document {
    /// A multi-platform index (OCI index or Docker manifest list).
    Index(Vec<IndexEntry>),
    /// One platform's image: its config blob and layers, in order.
    Image { media_type: String, config: Descriptor, layers: Vec<Descriptor> },
}

/// One entry of an index: a manifest for one platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub manifest: Descriptor,
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct RawDescriptor {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    digest: String,
    size: Option<u64>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct RawDocument {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u32>,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<RawDescriptor>>,
    #[serde(default)]
    config: Option<RawDescriptor>,
    #[serde(default)]
    layers: Option<Vec<RawDescriptor>>,
}

/// Checks that `digest` is `sha256:` plus 64 lowercase hex digits (the only algorithm the
/// cache stores; a registry naming another is refused rather than trusted unverified). Shared
/// with the profile's image references, which check their pinned digests the same way.
pub use crate::image_ref::check_digest;

fn descriptor(raw: RawDescriptor, default_type: &str, what: &str) -> Result<Descriptor> {
    check_digest(&raw.digest).map_err(|e| anyhow!("{what}: {e}"))?;
    let size = raw.size.ok_or_else(|| anyhow!("{what} {} has no size", raw.digest))?;
    Ok(Descriptor { media_type: raw.media_type.unwrap_or_else(|| default_type.to_string()), digest: raw.digest, size })
}

/// Parses a manifest document. `content_type` is what the registry said it was (if anything);
/// the document's own `mediaType` wins. Unknown media types are refused, naming the type.
pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Document> {
    let raw: RawDocument = serde_json::from_slice(bytes).map_err(|e| anyhow!("the manifest is not valid JSON: {e}"))?;
    if raw.schema_version != Some(2) {
        bail!("unsupported manifest schemaVersion {:?} (kiln reads schema 2 manifests and indexes)", raw.schema_version);
    }
    let media_type = match (raw.media_type.as_deref(), content_type) {
        (Some(t), _) => t.to_string(),
        (None, Some(t)) if ACCEPTED.contains(&t) => t.to_string(),
        // OCI documents may omit mediaType: tell them apart by shape.
        (None, _) if raw.manifests.is_some() => OCI_INDEX.to_string(),
        (None, _) if raw.config.is_some() => OCI_MANIFEST.to_string(),
        (None, _) => bail!("the manifest has no mediaType and is neither an index nor an image manifest"),
    };
    match media_type.as_str() {
        OCI_INDEX | DOCKER_LIST => {
            let entries = raw.manifests.ok_or_else(|| anyhow!("the {media_type} document has no `manifests`"))?;
            let mut out = Vec::new();
            for (i, e) in entries.into_iter().enumerate() {
                let platform = e.platform.clone();
                let manifest = descriptor(e, OCI_MANIFEST, &format!("manifests[{i}]"))?;
                out.push(IndexEntry { manifest, platform });
            }
            Ok(Document::Index(out))
        }
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let config = raw.config.ok_or_else(|| anyhow!("the {media_type} document has no `config`"))?;
            let config = descriptor(config, "application/vnd.oci.image.config.v1+json", "config")?;
            let mut layers = Vec::new();
            for (i, l) in raw.layers.unwrap_or_default().into_iter().enumerate() {
                layers.push(descriptor(l, "application/vnd.oci.image.layer.v1.tar+gzip", &format!("layers[{i}]"))?);
            }
            Ok(Document::Image { media_type, config, layers })
        }
        other => bail!("unknown manifest media type `{other}`: kiln understands {}", ACCEPTED.join(", ")),
    }
}

/// Whether an index entry's platform runs on `arch` (linux only; arm64 entries may carry the
/// variant `v8`, which is the only arm64 variant).
pub fn matches(p: &Platform, arch: Arch) -> bool {
    p.os == "linux"
        && p.architecture == arch.oci()
        && match p.variant.as_deref() {
            None => true,
            Some("v8") => arch == Arch::Aarch64,
            Some(_) => false,
        }
}

/// The index entry for `arch`, or an error listing the platforms the index does have.
pub fn select(entries: &[IndexEntry], arch: Arch) -> Result<&IndexEntry> {
    if let Some(e) = entries.iter().find(|e| e.platform.as_ref().is_some_and(|p| matches(p, arch))) {
        return Ok(e);
    }
    let have: Vec<String> =
        entries.iter().map(|e| e.platform.as_ref().map_or_else(|| "(no platform)".to_string(), |p| p.to_string())).collect();
    bail!(
        "no linux/{} image for {arch}: the index has only {}",
        arch.oci(),
        if have.is_empty() { "no platforms at all".to_string() } else { have.join(", ") }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn index(platforms: &[(&str, &str, Option<&str>)]) -> String {
        let entries: Vec<String> = platforms
            .iter()
            .enumerate()
            .map(|(i, (os, arch, var))| {
                let var = var.map(|v| format!(",\"variant\":\"{v}\"")).unwrap_or_default();
                format!(
                    "{{\"mediaType\":\"{OCI_MANIFEST}\",\"digest\":\"sha256:{}\",\"size\":{},\"platform\":{{\"os\":\"{os}\",\"architecture\":\"{arch}\"{var}}}}}",
                    format!("{i:x}").repeat(64),
                    100 + i
                )
            })
            .collect();
        format!("{{\"schemaVersion\":2,\"mediaType\":\"{OCI_INDEX}\",\"manifests\":[{}]}}", entries.join(","))
    }

    #[test]
    fn index_entries_are_selected_per_arch() {
        let doc =
            parse(index(&[("linux", "amd64", None), ("linux", "arm64", Some("v8")), ("linux", "riscv64", None)]).as_bytes(), None).unwrap();
        let Document::Index(entries) = doc else { panic!("not an index") };
        assert_eq!(select(&entries, Arch::X86_64).unwrap().manifest.size, 100);
        assert_eq!(select(&entries, Arch::Aarch64).unwrap().manifest.size, 101);
        assert_eq!(select(&entries, Arch::Riscv64).unwrap().manifest.size, 102);
    }

    #[test]
    fn a_missing_platform_names_the_ones_there_are() {
        let doc =
            parse(index(&[("linux", "arm64", Some("v8")), ("windows", "amd64", None), ("linux", "arm", Some("v7"))]).as_bytes(), None)
                .unwrap();
        let Document::Index(entries) = doc else { panic!("not an index") };
        let err = select(&entries, Arch::X86_64).unwrap_err().to_string();
        assert!(err.contains("no linux/amd64 image") && err.contains("linux/arm64/v8, windows/amd64, linux/arm/v7"), "{err}");
        assert!(select(&entries, Arch::Aarch64).is_ok());
        assert!(select(&entries, Arch::Riscv64).is_err());
    }

    #[test]
    fn image_manifests_list_config_and_layers() {
        let text = format!(
            "{{\"schemaVersion\":2,\"mediaType\":\"{DOCKER_MANIFEST}\",\"config\":{{\"mediaType\":\"application/vnd.docker.container.image.v1+json\",\"digest\":\"{}\",\"size\":5}},\"layers\":[{{\"mediaType\":\"application/vnd.docker.image.rootfs.diff.tar.gzip\",\"digest\":\"{}\",\"size\":7}}]}}",
            d('a'),
            d('b')
        );
        let Document::Image { media_type, config, layers } = parse(text.as_bytes(), None).unwrap() else { panic!("not an image") };
        assert_eq!(media_type, DOCKER_MANIFEST);
        assert_eq!((config.digest.as_str(), config.size), (d('a').as_str(), 5));
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0].hex(), "b".repeat(64));
        // Without mediaType an OCI manifest is known by its shape.
        let text = format!("{{\"schemaVersion\":2,\"config\":{{\"digest\":\"{}\",\"size\":5}},\"layers\":[]}}", d('c'));
        assert!(matches!(parse(text.as_bytes(), None).unwrap(), Document::Image { .. }));
    }

    #[test]
    fn unknown_media_types_and_bad_descriptors_are_refused() {
        let err = parse(b"{\"schemaVersion\":2,\"mediaType\":\"application/vnd.example.thing+json\",\"layers\":[]}", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown manifest media type `application/vnd.example.thing+json`"), "{err}");
        let err = parse(b"{\"schemaVersion\":1,\"name\":\"x\"}", None).unwrap_err().to_string();
        assert!(err.contains("schemaVersion"), "{err}");
        let sha512 = format!("{{\"schemaVersion\":2,\"config\":{{\"digest\":\"sha512:{}\",\"size\":5}}}}", "a".repeat(128));
        assert!(parse(sha512.as_bytes(), None).unwrap_err().to_string().contains("not a sha256 digest"));
        let no_size = format!("{{\"schemaVersion\":2,\"config\":{{\"digest\":\"{}\"}}}}", d('a'));
        assert!(parse(no_size.as_bytes(), None).unwrap_err().to_string().contains("has no size"));
        let upper = format!("{{\"schemaVersion\":2,\"config\":{{\"digest\":\"sha256:{}\",\"size\":1}}}}", "A".repeat(64));
        assert!(parse(upper.as_bytes(), None).is_err());
        assert!(parse(b"not json", None).is_err());
    }
}
