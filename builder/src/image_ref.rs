//! `ImageRef`: an OCI image reference as a profile writes it (`busybox:1.36`,
//! `registry.local:5000/app@sha256:<hex>`), parsed, normalised and checked once, when the profile
//! is read. A leaf: the profile's keys (`images`, `os.image`, `containers[].image`, OCI `charts`)
//! hold it, and the registry client (`oci`) pulls by it.

use std::fmt;
use std::str::FromStr;

use anyhow::{anyhow, bail, Result};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An image reference: the text as written (serialised back unchanged, e.g. into the template
/// context) and its normalised form (`busybox` is `docker.io/library/busybox:latest`). `Display`
/// gives the normalised form ([`ImageRef::whole`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    text: String,
    reference: oci_client::Reference,
}

/// A string that is not an image reference kiln can pull (the message says why).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidImageRef(String);

impl ImageRef {
    /// The reference as written in the profile.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The normalised reference (`docker.io/library/busybox:1.36`): what two spellings of one
    /// image have in common, and the name kiln reports, caches and tags the image by.
    pub fn whole(&self) -> String {
        self.reference.whole()
    }

    /// The registry host (`docker.io`, `127.0.0.1:5000`).
    pub fn registry(&self) -> &str {
        self.reference.registry()
    }

    /// The pinned digest (`sha256:<hex>`), if the reference has one.
    pub fn digest(&self) -> Option<&str> {
        self.reference.digest()
    }

    /// The parsed reference, for the registry client.
    pub fn oci(&self) -> &oci_client::Reference {
        &self.reference
    }
}

impl FromStr for ImageRef {
    type Err = InvalidImageRef;
    fn from_str(s: &str) -> Result<ImageRef, InvalidImageRef> {
        let reference: oci_client::Reference = s.parse().map_err(|e| {
            InvalidImageRef(format!("`{s}` is not an image reference (`registry/repository:tag` or `...@sha256:<digest>`): {e}"))
        })?;
        if let Some(d) = reference.digest() {
            check_digest(d).map_err(|e| InvalidImageRef(format!("`{s}`: {e}")))?;
        }
        Ok(ImageRef { text: s.to_string(), reference })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.reference)
    }
}

impl<'de> Deserialize<'de> for ImageRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for ImageRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// Implements `JsonSchema` for a type that a profile writes as one string: in the schema it is a
/// plain string, exactly like `String` (inline, no definition of its own), so the schema and the
/// reference generated from it name no Rust type.
macro_rules! json_schema_as_string {
    ($t:ty) => {
        impl schemars::JsonSchema for $t {
            fn inline_schema() -> bool {
                String::inline_schema()
            }

            fn schema_name() -> std::borrow::Cow<'static, str> {
                String::schema_name()
            }

            fn schema_id() -> std::borrow::Cow<'static, str> {
                String::schema_id()
            }

            fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
                String::json_schema(generator)
            }
        }
    };
}
pub(crate) use json_schema_as_string;

json_schema_as_string!(ImageRef);

/// Checks that `digest` is `sha256:` plus 64 lowercase hex digits (the only algorithm the
/// cache stores; a registry naming another is refused rather than trusted unverified).
pub fn check_digest(digest: &str) -> Result<()> {
    let hex =
        digest.strip_prefix("sha256:").ok_or_else(|| anyhow!("digest `{digest}` is not a sha256 digest (kiln verifies sha256 only)"))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        bail!("digest `{digest}` is not `sha256:` followed by 64 lowercase hex digits");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> ImageRef {
        s.parse().unwrap()
    }

    #[test]
    fn references_are_normalised_and_checked() {
        assert_eq!(r("busybox").whole(), "docker.io/library/busybox:latest");
        assert_eq!(
            (r("busybox:1.36").as_str(), r("busybox:1.36").to_string().as_str()),
            ("busybox:1.36", "docker.io/library/busybox:1.36")
        );
        assert_eq!(r("127.0.0.1:5000/t/hello:1").registry(), "127.0.0.1:5000");
        let d = format!("r.example/app@sha256:{}", "a".repeat(64));
        assert_eq!(r(&d).digest(), Some(format!("sha256:{}", "a".repeat(64)).as_str()));
        let e = "Not A Ref".parse::<ImageRef>().unwrap_err().to_string();
        assert!(e.contains("`Not A Ref` is not an image reference"), "{e}");
        let e = format!("r.example/app@sha512:{}", "a".repeat(128)).parse::<ImageRef>().unwrap_err().to_string();
        assert!(e.contains("not a sha256 digest"), "{e}");
    }

    #[test]
    fn serde_keeps_the_text_as_written() {
        let v: Vec<ImageRef> = serde_json::from_str(r#"["busybox:1.36", "docker.io/library/busybox:1.36"]"#).unwrap();
        assert_eq!(v[0].whole(), v[1].whole());
        assert_eq!(serde_json::to_string(&v).unwrap(), r#"["busybox:1.36","docker.io/library/busybox:1.36"]"#);
        let e = serde_json::from_str::<ImageRef>(r#""a b""#).unwrap_err().to_string();
        assert!(e.contains("`a b` is not an image reference"), "{e}");
        assert_eq!(serde_json::to_value(schemars::schema_for!(ImageRef)).unwrap()["type"], "string");
    }
}
