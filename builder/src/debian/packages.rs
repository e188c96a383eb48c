//! Parsing Debian `Packages` indexes (deb822 stanzas) into [`Package`]s and a name/provides [`PackageIndex`].

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{bail, Context};

use super::version;

/// A version relation in a dependency (`<<`, `<=`, `=`, `>=`, `>>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    Lt,
    Le,
    Eq,
    Ge,
    Gt,
}

impl Op {
    /// Parses an operator. The obsolete `<` and `>` mean `<=` and `>=` (Debian Policy 7.1).
    pub fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "<<" => Op::Lt,
            "<=" | "<" => Op::Le,
            "=" => Op::Eq,
            ">=" | ">" => Op::Ge,
            ">>" => Op::Gt,
            _ => return None,
        })
    }

    /// Whether `have` satisfies `have OP want`.
    pub fn holds(self, have: &str, want: &str) -> bool {
        let ord = version::compare(have, want);
        match self {
            Op::Lt => ord.is_lt(),
            Op::Le => ord.is_le(),
            Op::Eq => ord.is_eq(),
            Op::Ge => ord.is_ge(),
            Op::Gt => ord.is_gt(),
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Lt => "<<",
            Op::Le => "<=",
            Op::Eq => "=",
            Op::Ge => ">=",
            Op::Gt => ">>",
        })
    }
}

/// One alternative of a dependency: `name[:arch] [(op version)]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dep {
    pub name: String,
    /// `any`, `native` or an architecture name, as written after `:`.
    pub arch_qualifier: Option<String>,
    pub constraint: Option<(Op, String)>,
}

impl fmt::Display for Dep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if let Some(q) = &self.arch_qualifier {
            write!(f, ":{q}")?;
        }
        if let Some((op, v)) = &self.constraint {
            write!(f, " ({op} {v})")?;
        }
        Ok(())
    }
}

/// One binary package stanza of a `Packages` index (only the fields kiln uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// The source package name, if the stanza names one (for manifests); else the binary name.
    pub source: Option<String>,
    /// Comma-separated groups of `|` alternatives.
    pub depends: Relations,
    pub pre_depends: Relations,
    /// Virtual names this package provides, with the provided version (`Provides: foo (= 1.0)`).
    pub provides: Vec<(String, Option<String>)>,
    /// Path relative to the mirror root (`pool/main/...`).
    pub filename: String,
    pub size: u64,
    pub sha256: String,
    pub essential: bool,
    pub multi_arch: Option<String>,
}

/// A `Depends`-style field, checked when the index is read but kept as its text: a Packages
/// file has ~250,000 dependency alternatives and a build looks at a few hundred, so parsing them
/// all into [`Dep`]s held most of a build's peak memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Relations(Box<str>);

impl Relations {
    /// Checks `text` (see [`parse_relations`]) and keeps it.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        parse_relations(text)?;
        Ok(Relations(text.into()))
    }

    /// The OR-groups, parsed again from the checked text.
    pub fn groups(&self) -> Vec<Vec<Dep>> {
        parse_relations(&self.0).expect("checked by Relations::parse")
    }
}

/// Parses a whole `Packages` file held in memory (tests and small indexes).
pub fn parse_packages(text: &str) -> anyhow::Result<Vec<Package>> {
    read_packages(text.as_bytes())
}

/// Reads a `Packages` file one stanza at a time, so the ~60 MB text is never held whole.
/// Errors name the stanza (package) and field.
pub fn read_packages(reader: impl std::io::BufRead) -> anyhow::Result<Vec<Package>> {
    read_packages_keeping(reader, None)
}

/// [`read_packages`], also writing to `keep` each stanza with only the fields kiln reads: a
/// third of the text, which reads back to the same packages (kept between builds by
/// `crate::reuse`).
pub fn read_packages_keeping(mut reader: impl std::io::BufRead, mut keep: Option<&mut dyn std::io::Write>) -> anyhow::Result<Vec<Package>> {
    let mut out = Vec::new();
    let mut stanza = String::new();
    let mut stanza_no = 0;
    loop {
        let start = stanza.len();
        let n = reader.read_line(&mut stanza).context("reading the Packages text")?;
        if n > 0 && !stanza[start..].trim().is_empty() {
            continue;
        }
        stanza.truncate(start);
        if !stanza.is_empty() {
            stanza_no += 1;
            out.push(parse_stanza_text(&stanza, stanza_no)?);
            if let Some(w) = keep.as_mut() {
                write_read_fields(&stanza, w).context("keeping the Packages text")?;
            }
            stanza.clear();
        }
        if n == 0 {
            break;
        }
    }
    out.shrink_to_fit();
    Ok(out)
}

/// One stanza's text (no blank lines) into a [`Package`]. A single pass: only a dozen fields
/// matter, so unknown fields are skipped without being looked at twice.
fn parse_stanza_text(text: &str, stanza_no: usize) -> anyhow::Result<Package> {
    let mut fields = Fields { text, ..Default::default() };
    let mut current: Option<usize> = None; // slot of the field being continued
    let mut pos = 0;
    while pos < text.len() {
        let end = text[pos..].find('\n').map_or(text.len(), |i| pos + i);
        let line = text[pos..end].trim_end();
        let at = pos;
        pos = end + 1;
        if line.starts_with([' ', '\t']) {
            if let Some(slot) = current {
                fields.extend(slot, at + line.len());
            }
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            bail!("Packages stanza {stanza_no}: not a `Field: value` line: {line:?}");
        };
        current = Fields::slot(key);
        if let Some(slot) = current {
            let start = at + key.len() + 1 + (value.len() - value.trim_start().len());
            fields.values[slot] = Some((start, at + line.len()));
        }
    }
    parse_stanza(&fields).with_context(|| {
        let name = fields.get("Package").unwrap_or("no Package field");
        format!("Packages stanza {stanza_no} ({name})")
    })
}

/// Writes the lines of `stanza` that belong to the fields kiln reads (continuation lines
/// included), then the blank line that ends a stanza.
fn write_read_fields(stanza: &str, w: &mut dyn std::io::Write) -> std::io::Result<()> {
    let mut kept = false;
    for line in stanza.split_inclusive('\n') {
        if !line.starts_with([' ', '\t']) {
            kept = line.split_once(':').is_some_and(|(key, _)| Fields::slot(key).is_some());
        }
        if kept {
            w.write_all(line.as_bytes())?;
            if !line.ends_with('\n') {
                w.write_all(b"\n")?;
            }
        }
    }
    w.write_all(b"\n")
}

/// The fields of one Packages stanza kiln reads, as byte ranges into the file.
#[derive(Default)]
struct Fields<'t> {
    text: &'t str,
    values: [Option<(usize, usize)>; FIELD_NAMES.len()],
}

const FIELD_NAMES: [&str; 12] = [
    "Package",
    "Version",
    "Architecture",
    "Source",
    "Depends",
    "Pre-Depends",
    "Provides",
    "Filename",
    "Size",
    "SHA256",
    "Essential",
    "Multi-Arch",
];

impl<'t> Fields<'t> {
    fn slot(key: &str) -> Option<usize> {
        FIELD_NAMES.iter().position(|name| *name == key)
    }

    fn extend(&mut self, slot: usize, end: usize) {
        if let Some((_, e)) = self.values[slot].as_mut() {
            *e = end;
        }
    }

    fn get(&self, key: &str) -> Option<&'t str> {
        let (a, b) = self.values[Self::slot(key)?]?;
        self.text.get(a..b.max(a))
    }
}

/// A field of a deb822 stanza by case-insensitive name.
pub(crate) fn field<'t>(stanza: &[(&'t str, &'t str)], key: &str) -> Option<&'t str> {
    stanza.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| *v)
}

/// A whitespace-separated list field of a deb822 stanza (empty when absent).
pub(crate) fn field_words(stanza: &[(&str, &str)], key: &str) -> Vec<String> {
    field(stanza, key).map(|v| v.split_whitespace().map(str::to_string).collect()).unwrap_or_default()
}

/// Splits deb822 text into stanzas of (field, value) pairs without copying: a value spans its
/// continuation lines (still containing their newlines and indentation; callers split on
/// whitespace or lines). `#` comment lines are skipped. Shared with `release.rs` and `sources.rs`
/// so all deb822 input is read one way.
pub(crate) fn stanzas<'t>(text: &'t str) -> impl Iterator<Item = Vec<(&'t str, &'t str)>> + 't {
    let mut offset = 0;
    let mut lines = text.split_inclusive('\n').map(move |line| {
        let at = offset;
        offset += line.len();
        (at, line)
    });
    std::iter::from_fn(move || {
        let mut fields: Vec<(&'t str, &'t str)> = Vec::new();
        // Byte range of the last field's value, extended by continuation lines.
        let mut value: Option<(usize, usize)> = None;
        let finish = |fields: &mut Vec<(&'t str, &'t str)>, value: Option<(usize, usize)>| {
            if let (Some(last), Some((a, b))) = (fields.last_mut(), value) {
                last.1 = &text[a..b];
            }
        };
        loop {
            let Some((at, line)) = lines.next() else {
                finish(&mut fields, value);
                return (!fields.is_empty()).then_some(fields);
            };
            let content = line.trim_end();
            if content.trim_start().is_empty() {
                if fields.is_empty() {
                    continue;
                }
                finish(&mut fields, value);
                return Some(fields);
            }
            if content.starts_with('#') {
                continue;
            }
            if content.starts_with([' ', '\t']) {
                if let Some((_, end)) = value.as_mut() {
                    *end = at + content.len();
                }
                continue;
            }
            finish(&mut fields, value.take());
            match content.split_once(':') {
                Some((key, rest)) => {
                    let lead = rest.len() - rest.trim_start().len();
                    let a = at + key.len() + 1 + lead;
                    fields.push((key.trim(), ""));
                    value = Some((a, (at + content.len()).max(a)));
                }
                // Neither a field nor a continuation: keep it visible as a field with an empty
                // name so callers can report it rather than silently drop it.
                None => fields.push(("", content)),
            }
        }
    })
}

fn parse_stanza(fields: &Fields<'_>) -> anyhow::Result<Package> {
    let get = |key: &str| fields.get(key);
    let required = |key: &str| get(key).with_context(|| format!("missing field `{key}`"));
    let relation = |key: &str| -> anyhow::Result<Relations> {
        get(key).map_or(Ok(Relations::default()), |v| Relations::parse(v).with_context(|| format!("field `{key}`")))
    };
    let size = required("Size")?;
    Ok(Package {
        name: required("Package")?.to_string(),
        version: required("Version")?.to_string(),
        architecture: required("Architecture")?.to_string(),
        source: get("Source").map(|s| s.split_whitespace().next().unwrap_or(s).to_string()),
        depends: relation("Depends")?,
        pre_depends: relation("Pre-Depends")?,
        provides: get("Provides").map_or(Ok(Vec::new()), parse_provides).context("field `Provides`")?,
        filename: required("Filename")?.to_string(),
        size: size.parse().with_context(|| format!("field `Size`: not a number: {size:?}"))?,
        sha256: parse_sha256(required("SHA256")?).context("field `SHA256`")?,
        essential: get("Essential").is_some_and(|v| v.eq_ignore_ascii_case("yes")),
        multi_arch: get("Multi-Arch").map(str::to_string),
    })
}

fn parse_sha256(s: &str) -> anyhow::Result<String> {
    if s.len() != 64 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        bail!("not a sha256 hex digest: {s:?}");
    }
    Ok(s.to_ascii_lowercase())
}

/// Parses a `Depends`-style field: `a (>= 1) | b, c:any`.
pub fn parse_relations(s: &str) -> anyhow::Result<Vec<Vec<Dep>>> {
    s.split(',').map(str::trim).filter(|g| !g.is_empty()).map(|group| group.split('|').map(parse_dep).collect()).collect()
}

/// Parses one alternative: `name[:qualifier] [(op version)]`. Architecture restrictions (`[...]`)
/// and build profiles (`<...>`) only occur in source stanzas and are rejected here.
pub fn parse_dep(s: &str) -> anyhow::Result<Dep> {
    let s = s.trim();
    let (head, constraint) = match s.split_once('(') {
        Some((head, rest)) => {
            let inner = rest.strip_suffix(')').with_context(|| format!("dependency `{s}`: unclosed `(`"))?.trim();
            let split = inner.find(|c: char| !matches!(c, '<' | '>' | '=')).unwrap_or(inner.len());
            let (op, ver) = inner.split_at(split);
            let op = Op::parse(op.trim()).with_context(|| format!("dependency `{s}`: unknown operator {:?}", op.trim()))?;
            let ver = ver.trim();
            if ver.is_empty() || ver.contains(char::is_whitespace) {
                bail!("dependency `{s}`: bad version {ver:?}");
            }
            (head.trim(), Some((op, ver.to_string())))
        }
        None => (s, None),
    };
    if head.is_empty() || head.contains(|c: char| c.is_whitespace() || "[]<>()".contains(c)) {
        bail!("dependency `{s}`: bad package name {head:?}");
    }
    let (name, arch_qualifier) = match head.split_once(':') {
        Some((n, q)) => (n, Some(q.to_string())),
        None => (head, None),
    };
    Ok(Dep { name: name.to_string(), arch_qualifier, constraint })
}

/// `Provides: a, b (= 1.0)` — only `=` is allowed for provided versions.
fn parse_provides(s: &str) -> anyhow::Result<Vec<(String, Option<String>)>> {
    let mut out = Vec::new();
    for group in parse_relations(s)? {
        for dep in group {
            let version = match dep.constraint {
                None => None,
                Some((Op::Eq, v)) => Some(v),
                Some((op, _)) => bail!("`{}`: provides may only use `=`, not `{op}`", dep.name),
            };
            out.push((dep.name, version));
        }
    }
    Ok(out)
}

/// A provider of a virtual name: the providing package and the provided version, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    pub package: String,
    pub package_version: String,
    pub provided_version: Option<String>,
}

/// All packages of one architecture, by name (versions highest first) and by provided name.
#[derive(Debug, Clone, Default)]
pub struct PackageIndex {
    /// The Debian architecture the index was built for (named in errors).
    pub arch: String,
    /// Sorted by name, then version highest first; one entry per (name, version). One flat list
    /// rather than a map of small vectors: ~70,000 of those cost more than the packages.
    packages: Vec<Package>,
    /// Virtual name -> providers, sorted by package name then version (highest first).
    provides: BTreeMap<String, Vec<Provider>>,
}

impl PackageIndex {
    pub fn new(arch: &str, mut packages: Vec<Package>) -> Self {
        packages.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| version::compare(&b.version, &a.version)));
        packages.dedup_by(|a, b| a.name == b.name && a.version == b.version);
        packages.shrink_to_fit();
        let mut provides: BTreeMap<String, Vec<Provider>> = BTreeMap::new();
        // The packages are in name order, so each provider list comes out sorted by name and
        // version already.
        for pkg in &packages {
            for (virt, provided_version) in &pkg.provides {
                provides.entry(virt.clone()).or_default().push(Provider {
                    package: pkg.name.clone(),
                    package_version: pkg.version.clone(),
                    provided_version: provided_version.clone(),
                });
            }
        }
        for providers in provides.values_mut() {
            // A stanza may name one virtual package twice (`Provides: foo, foo (= 1)`); the
            // resolver must still see one provider, not a choice between two.
            providers.dedup_by(|a, b| a.package == b.package && a.package_version == b.package_version);
            providers.shrink_to_fit();
        }
        PackageIndex { arch: arch.to_string(), packages, provides }
    }

    /// All versions of a real package, highest first.
    pub fn versions(&self, name: &str) -> &[Package] {
        let start = self.packages.partition_point(|p| p.name.as_str() < name);
        let len = self.packages[start..].partition_point(|p| p.name == name);
        &self.packages[start..start + len]
    }

    /// A specific version of a real package.
    pub fn get(&self, name: &str, version: &str) -> Option<&Package> {
        self.versions(name).iter().find(|p| p.version == version)
    }

    pub fn providers(&self, virtual_name: &str) -> &[Provider] {
        self.provides.get(virtual_name).map_or(&[], Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.packages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.packages.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kept_fields_read_back_to_the_same_packages() {
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        let text = format!("Package: a\nVersion: 1.0\nArchitecture: amd64\nMaintainer: x <x@example.org>\nDepends: b (>= 2),\n c | d\nDescription: long\n text that is dropped\n .\n more\nFilename: pool/a.deb\nSize: 10\nSHA256: {a}\nProvides: v (= 1)\n\nPackage: b\nVersion: 2\nArchitecture: all\nTag: role::program\nFilename: pool/b.deb\nSize: 3\nSHA256: {b}\nEssential: yes\nMulti-Arch: foreign");
        let mut kept = Vec::new();
        let read = read_packages_keeping(text.as_bytes(), Some(&mut kept)).unwrap();
        let kept = String::from_utf8(kept).unwrap();
        assert!(
            !kept.contains("Description") && !kept.contains("dropped") && !kept.contains("Maintainer") && !kept.contains("Tag"),
            "{kept}"
        );
        assert!(kept.contains("Depends: b (>= 2),\n c | d\n"), "{kept}");
        assert_eq!(read_packages(kept.as_bytes()).unwrap(), read);
        assert_eq!(read.len(), 2);
    }

    use super::*;

    const FIXTURE: &str = "\
Package: libc6
Source: glibc (2.41-12)
Version: 2.41-12
Architecture: arm64
Multi-Arch: same
Depends: libgcc-s1
Provides: libc6-dev-alt (= 2.41), glibc-runtime
Description: GNU C Library
 Contains the standard libraries
 .
 used by nearly all programs.
Filename: pool/main/g/glibc/libc6_2.41-12_arm64.deb
Size: 2712345
SHA256: AA00000000000000000000000000000000000000000000000000000000000001
X-Unknown-Field: ignored

Package: busybox-static
Version: 1:1.37.0-6
Architecture: arm64
Essential: no
Pre-Depends: libc6 (>= 2.34)
Depends: foo:any (<< 2) | bar (>= 1.0~rc1), baz:native,
 qux (> 3)
Filename: pool/main/b/busybox/busybox-static_1.37.0-6_arm64.deb
Size: 1000
SHA256: 00000000000000000000000000000000000000000000000000000000000000bb
";

    #[test]
    fn parses_fields_groups_and_continuations() {
        let pkgs = parse_packages(FIXTURE).unwrap();
        assert_eq!(pkgs.len(), 2);
        let libc = &pkgs[0];
        assert_eq!(libc.name, "libc6");
        assert_eq!(libc.source.as_deref(), Some("glibc"));
        assert_eq!(libc.multi_arch.as_deref(), Some("same"));
        assert_eq!(libc.size, 2712345);
        assert!(libc.sha256.starts_with("aa00"), "sha256 is lowercased");
        assert_eq!(libc.provides, vec![("libc6-dev-alt".into(), Some("2.41".into())), ("glibc-runtime".into(), None)]);
        let bb = &pkgs[1];
        assert_eq!(bb.version, "1:1.37.0-6");
        assert!(!bb.essential);
        assert_eq!(bb.pre_depends.groups()[0][0].constraint, Some((Op::Ge, "2.34".into())));
        assert_eq!(bb.depends.groups().len(), 3, "continuation line joins the third group");
        assert_eq!(
            bb.depends.groups()[0],
            vec![
                Dep { name: "foo".into(), arch_qualifier: Some("any".into()), constraint: Some((Op::Lt, "2".into())) },
                Dep { name: "bar".into(), arch_qualifier: None, constraint: Some((Op::Ge, "1.0~rc1".into())) },
            ]
        );
        assert_eq!(bb.depends.groups()[1][0].arch_qualifier.as_deref(), Some("native"));
        assert_eq!(bb.depends.groups()[2][0].constraint, Some((Op::Ge, "3".into())), "old `>` means `>=`");
    }

    #[test]
    fn errors_name_stanza_and_field() {
        let bad = FIXTURE.replace("Size: 1000", "Size: lots");
        let err = format!("{:#}", parse_packages(&bad).unwrap_err());
        assert!(err.contains("busybox-static") && err.contains("`Size`"), "{err}");

        let bad = FIXTURE.replace("Depends: libgcc-s1", "Depends: libgcc-s1 (~= 3)");
        let err = format!("{:#}", parse_packages(&bad).unwrap_err());
        assert!(err.contains("libc6") && err.contains("`Depends`") && err.contains("operator"), "{err}");

        let bad = FIXTURE.replace("Filename: pool/main/g/glibc/libc6_2.41-12_arm64.deb\n", "");
        let err = format!("{:#}", parse_packages(&bad).unwrap_err());
        assert!(err.contains("libc6") && err.contains("`Filename`"), "{err}");
    }

    #[test]
    fn index_orders_versions_and_providers() {
        let mk = |name: &str, version: &str, provides: &[&str]| Package {
            name: name.into(),
            version: version.into(),
            architecture: "arm64".into(),
            source: None,
            depends: Relations::default(),
            pre_depends: Relations::default(),
            provides: provides.iter().map(|p| (p.to_string(), None)).collect(),
            filename: format!("pool/{name}_{version}.deb"),
            size: 1,
            sha256: "0".repeat(64),
            essential: false,
            multi_arch: None,
        };
        let index = PackageIndex::new(
            "arm64",
            vec![mk("a", "1.0", &["v"]), mk("a", "1.10", &["v"]), mk("a", "1.9", &[]), mk("0z", "1", &["v"]), mk("b", "2", &["w", "w"])],
        );
        let versions: Vec<_> = index.versions("a").iter().map(|p| p.version.as_str()).collect();
        assert_eq!(versions, ["1.10", "1.9", "1.0"]);
        let providers: Vec<_> = index.providers("v").iter().map(|p| format!("{}={}", p.package, p.package_version)).collect();
        assert_eq!(providers, ["0z=1", "a=1.10", "a=1.0"]);
        assert_eq!(index.providers("w").len(), 1, "a name provided twice by one stanza is one provider");
        assert_eq!(index.len(), 5);
    }
}
