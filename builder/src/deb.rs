//! Unpacking Debian binary packages (`.deb`: an ar archive of `debian-binary`, `control.tar*`,
//! `data.tar*`) and plain or compressed tar streams into a [`Tree`], refusing anything that
//! would escape the tree.
//!
//! Nothing touches the host filesystem: ownership, setuid bits and device nodes land in the
//! in-memory tree, and every path goes through [`TreePath::parse_relative`] and [`Tree::insert`],
//! which refuse `..`, absolute paths and paths through symlinks (other than merged-/usr aliases).

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};

use crate::spill::{Spill, SPILL_MIN};
use crate::tree::{Content, Entry, Kind, Meta, Tree, TreePath};

/// What a package said about itself, and the paths it placed in the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebInfo {
    pub package: String,
    pub version: String,
    pub architecture: String,
    /// Every entry of `data.tar` as inserted (after merged-/usr alias resolution), in archive order.
    pub files: Vec<TreePath>,
}

const AR_MAGIC: &[u8; 8] = b"!<arch>\n";
const AR_HEADER_LEN: usize = 60;

/// Reads the ar archive at `path`, checks `debian-binary` is 2.x, reads the control fields
/// and unpacks `data.tar{,.gz,.xz,.zst}` into `tree`.
///
/// The archive is streamed: each member is decompressed and walked as it is read, so neither
/// the compressed nor the decompressed data is held in memory as a whole (only file contents,
/// which the tree keeps anyway). On error the tree may hold part of the package: callers treat
/// the error as fatal for the tree.
pub fn unpack_deb(path: &Path, tree: &mut Tree) -> anyhow::Result<DebInfo> {
    let what = path.display().to_string();
    let file = File::open(path).with_context(|| format!("opening {what}"))?;
    unpack_deb_from(BufReader::new(file), tree, &what)
}

/// [`unpack_deb`] over any reader; `what` names the package in errors.
pub fn unpack_deb_from<R: Read>(r: R, tree: &mut Tree, what: &str) -> anyhow::Result<DebInfo> {
    unpack_ar(r, tree, what, &mut io::sink())
}

/// [`unpack_deb`], also writing `data.tar`, decompressed, to `copy`: to keep a package's
/// contents for later builds (`crate::reuse`), which [`unpack_tar`] then places without
/// decompressing the package again.
pub fn unpack_deb_copying(path: &Path, tree: &mut Tree, copy: &mut dyn Write) -> anyhow::Result<DebInfo> {
    let what = path.display().to_string();
    let file = File::open(path).with_context(|| format!("opening {what}"))?;
    unpack_ar(BufReader::new(file), tree, &what, copy)
}

/// The ar archive of a package; `data.tar`, decompressed, is also written to `copy`.
fn unpack_ar<R: Read>(mut r: R, tree: &mut Tree, what: &str, copy: &mut dyn Write) -> anyhow::Result<DebInfo> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).with_context(|| format!("{what}: reading the ar magic"))?;
    if &magic != AR_MAGIC {
        bail!("{what} is not a Debian package (no `!<arch>` ar header)");
    }

    let mut seen_version = false;
    let mut control: Option<ControlFields> = None;
    let mut files: Option<Vec<TreePath>> = None;
    while let Some(header) = read_ar_header(&mut r).with_context(|| format!("{what}: reading an ar header"))? {
        let mut member = (&mut r).take(header.size);
        let name = header.resolve_name(&mut member).with_context(|| format!("{what}: reading an ar member name"))?;
        match name.as_str() {
            "debian-binary" => {
                let mut v = String::new();
                (&mut member).take(64).read_to_string(&mut v).with_context(|| format!("{what}: reading debian-binary"))?;
                let v = v.trim();
                if !v.starts_with("2.") {
                    bail!("{what}: unsupported package format version `{v}` (expected 2.x)");
                }
                seen_version = true;
            }
            n if n.starts_with("control.tar") => {
                if !seen_version {
                    bail!("{what}: `{n}` comes before `debian-binary`");
                }
                let fields = read_control(&mut member, &format!("{what}: {n}"))?;
                control = Some(fields);
            }
            n if n.starts_with("data.tar") => {
                if !seen_version {
                    bail!("{what}: `{n}` comes before `debian-binary`");
                }
                // dpkg allows one; a second would be laid over the first, and a kept copy of
                // both would not unpack to the same tree.
                if files.is_some() {
                    bail!("{what}: a second data member `{n}`");
                }
                files = Some(unpack_tar_copying(&mut member, tree, &format!("{what}: {n}"), copy)?);
            }
            // ar symbol tables, GNU long-name tables and dpkg's `_`-prefixed extra members
            // carry nothing kiln needs.
            other => tracing::debug!("{what}: skipping ar member `{other}`"),
        }
        // Whatever a member's reader left unread (tar end padding, skipped members).
        io::copy(&mut member, &mut io::sink()).with_context(|| format!("{what}: reading member `{name}`"))?;
        if member.limit() > 0 {
            bail!("{what} is truncated (member `{name}` lacks {} bytes)", member.limit());
        }
        if header.size % 2 == 1 {
            let mut pad = [0u8; 1];
            // The final member's padding byte may be missing in some writers: tolerate EOF.
            let _ = r.read(&mut pad).with_context(|| format!("{what}: reading ar padding"))?;
        }
    }

    if !seen_version {
        bail!("{what}: no `debian-binary` member");
    }
    let control = control.with_context(|| format!("{what}: no `control.tar*` member"))?;
    let files = files.with_context(|| format!("{what}: no `data.tar*` member"))?;
    Ok(DebInfo { package: control.package, version: control.version, architecture: control.architecture, files })
}

/// One parsed ar member header.
struct ArHeader {
    /// The raw 16-byte name field, trimmed.
    name: String,
    /// Bytes of member data following the header (before BSD long-name adjustment).
    size: u64,
}

impl ArHeader {
    /// The member's name: GNU names end in `/`; BSD long names (`#1/<len>`) store the name at
    /// the start of the data, which this consumes from `member`.
    fn resolve_name<R: Read>(&self, member: &mut R) -> io::Result<String> {
        if let Some(len) = self.name.strip_prefix("#1/") {
            let len: u64 = len.trim().parse().map_err(|_| invalid(format!("bad BSD ar name `{}`", self.name)))?;
            let mut buf = Vec::new();
            member.take(len.min(4096)).read_to_end(&mut buf)?;
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            return Ok(String::from_utf8_lossy(&buf[..end]).into_owned());
        }
        // "/" (symbol table) and "//" (GNU name table) stay as they are; "name/" loses its slash.
        match self.name.as_str() {
            "/" | "//" => Ok(self.name.clone()),
            n => Ok(n.strip_suffix('/').unwrap_or(n).to_string()),
        }
    }
}

/// Reads the next 60-byte ar header, or `None` at a clean end of archive.
fn read_ar_header<R: Read>(r: &mut R) -> io::Result<Option<ArHeader>> {
    let mut h = [0u8; AR_HEADER_LEN];
    let got = read_full(r, &mut h)?;
    if got == 0 {
        return Ok(None);
    }
    if got < AR_HEADER_LEN {
        return Err(invalid(format!("truncated ar header ({got} of {AR_HEADER_LEN} bytes)")));
    }
    if &h[58..60] != b"`\n" {
        return Err(invalid("bad ar header terminator".into()));
    }
    let name = String::from_utf8_lossy(&h[0..16]).trim_end().to_string();
    let size_field = String::from_utf8_lossy(&h[48..58]);
    let size: u64 = size_field.trim().parse().map_err(|_| invalid(format!("bad ar member size `{}`", size_field.trim())))?;
    Ok(Some(ArHeader { name, size }))
}

/// Like `read_exact`, but returns how many bytes were read when EOF comes first.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

struct ControlFields {
    package: String,
    version: String,
    architecture: String,
}

/// Finds `./control` in a (compressed) control tarball and parses its three identity fields.
fn read_control<R: Read>(r: R, what: &str) -> anyhow::Result<ControlFields> {
    let mut archive = tar::Archive::new(decompress(r).with_context(|| format!("{what}: detecting compression"))?);
    for entry in archive.entries().with_context(|| format!("reading {what}"))? {
        let mut entry = entry.with_context(|| format!("reading {what}"))?;
        let path = entry.path().with_context(|| format!("{what}: entry path"))?;
        if path.to_str().map(|p| p.trim_start_matches("./")) != Some("control") {
            continue;
        }
        let mut text = String::new();
        // A control file is a few KiB; the cap keeps a hostile one from filling memory.
        (&mut entry).take(1 << 20).read_to_string(&mut text).with_context(|| format!("{what}: reading control"))?;
        return parse_control(&text).with_context(|| format!("{what}: control file"));
    }
    bail!("{what} has no `control` file")
}

/// Reads the first paragraph's `Package`, `Version` and `Architecture` fields.
fn parse_control(text: &str) -> anyhow::Result<ControlFields> {
    let field = |name: &str| -> anyhow::Result<String> {
        text.lines()
            .take_while(|l| !l.trim().is_empty())
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
            .with_context(|| format!("no `{name}` field"))
    };
    Ok(ControlFields { package: field("Package")?, version: field("Version")?, architecture: field("Architecture")? })
}

/// Wraps `r` in the decompressor its magic bytes call for (gzip, xz, zstd), or passes a plain
/// tar through.
pub fn decompress<'a, R: Read + 'a>(mut r: R) -> io::Result<Box<dyn Read + 'a>> {
    let mut head = [0u8; 6];
    let n = read_full(&mut r, &mut head)?;
    let stream = io::Cursor::new(head[..n].to_vec()).chain(r);
    Ok(match &head[..n] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::MultiGzDecoder::new(stream)),
        [0xfd, b'7', b'z', b'X', b'Z', 0x00] => Box::new(liblzma::read::XzDecoder::new_multi_decoder(stream)),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Box::new(zstd::stream::read::Decoder::new(stream)?),
        _ => Box::new(stream),
    })
}

/// Unpacks a (possibly gzip/xz/zstd-compressed) tar stream into `tree` and returns the paths
/// inserted, in archive order. `what` names the archive in errors. Any entry that is refused
/// (escaping path, path through a symlink, bad hard link, unsupported type) fails the whole
/// unpack with an error naming `what` and the entry.
pub fn unpack_tar<R: Read>(tar: R, tree: &mut Tree, what: &str) -> anyhow::Result<Vec<TreePath>> {
    let plain = decompress(tar).with_context(|| format!("{what}: detecting compression"))?;
    let spill = tree.spill().cloned();
    for_each_entry(plain, what, Contents::keep(spill.as_ref()), |item| insert_item(tree, item).map(Some))
}

/// [`unpack_tar`], writing the decompressed tar to `copy` as it is read (all of it, the end
/// padding too, so the copy unpacks to the same tree).
fn unpack_tar_copying<R: Read>(tar: R, tree: &mut Tree, what: &str, copy: &mut dyn Write) -> anyhow::Result<Vec<TreePath>> {
    let plain = decompress(tar).with_context(|| format!("{what}: detecting compression"))?;
    let mut tee = Tee { inner: plain, copy };
    let spill = tree.spill().cloned();
    let placed = for_each_entry(&mut tee, what, Contents::keep(spill.as_ref()), |item| insert_item(tree, item).map(Some))?;
    io::copy(&mut tee, &mut io::sink()).with_context(|| format!("reading the end of {what}"))?;
    Ok(placed)
}

/// A reader that writes what it reads to `copy`.
struct Tee<'c, R> {
    inner: R,
    copy: &'c mut dyn Write,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// One tar entry read into the tree model: paths already checked by
/// [`TreePath::parse_relative`] (no `..`, not absolute), a file's contents read into memory.
#[derive(Debug)]
pub enum TarItem {
    /// Anything but a hard link.
    Entry(TreePath, Entry),
    /// A hard link to an earlier entry `target`, with the link's own metadata.
    HardLink { path: TreePath, target: TreePath, meta: Meta },
}

/// What [`for_each_entry`] does with a regular file's contents.
#[derive(Debug, Clone, Copy)]
pub enum Contents<'s> {
    /// Read into memory.
    Memory,
    /// Large contents parked in the spill file, small ones in memory.
    Spill(&'s Arc<Spill>),
    /// Not kept: the item's file is empty. For walks that only check the entries (bundled
    /// images' layers); the tar reader skips the bytes as it streams past them.
    Skip,
}

impl<'s> Contents<'s> {
    /// Into the spill file if there is one, else into memory.
    pub fn keep(spill: Option<&'s Arc<Spill>>) -> Self {
        spill.map_or(Contents::Memory, Contents::Spill)
    }
}

/// The one tar walker of kiln (packages and OCI layers): reads each entry of an uncompressed
/// tar stream into a [`TarItem`] and hands it to `apply`, which places it (and returns the path
/// placed, if any). An error, from reading or from `apply`, names `what` and the entry.
/// `contents` says where file contents go.
pub fn for_each_entry<R: Read>(
    plain_tar: R,
    what: &str,
    contents: Contents<'_>,
    mut apply: impl FnMut(TarItem) -> anyhow::Result<Option<TreePath>>,
) -> anyhow::Result<Vec<TreePath>> {
    let mut archive = tar::Archive::new(plain_tar);
    let mut placed = Vec::new();
    for entry in archive.entries().with_context(|| format!("reading {what}"))? {
        let mut entry = entry.with_context(|| format!("reading {what}"))?;
        let raw_path = entry_path(&entry).with_context(|| format!("{what}: reading an entry name"))?;
        let item = read_item(&mut entry, &raw_path, contents).with_context(|| format!("{what}: entry `{raw_path}`"))?;
        if let Some(item) = item {
            if let Some(p) = apply(item).with_context(|| format!("{what}: entry `{raw_path}`"))? {
                placed.push(p);
            }
        }
    }
    Ok(placed)
}

/// Places an item as a package's `data.tar` does: inserted over what is there (a hard link
/// shares its target's content).
pub fn insert_item(tree: &mut Tree, item: TarItem) -> anyhow::Result<TreePath> {
    Ok(match item {
        TarItem::Entry(path, entry) => tree.insert(&path, entry)?,
        TarItem::HardLink { path, target, meta } => tree.add_hardlink(&path, &target, meta)?,
    })
}

fn entry_path<R: Read>(entry: &tar::Entry<'_, R>) -> anyhow::Result<String> {
    let p = entry.path()?;
    p.to_str().map(str::to_string).with_context(|| format!("name {} is not UTF-8", p.display()))
}

/// Reads one tar entry; `None` for metadata-only headers.
fn read_item<R: Read>(entry: &mut tar::Entry<'_, R>, raw_path: &str, contents: Contents<'_>) -> anyhow::Result<Option<TarItem>> {
    use tar::EntryType as T;
    let etype = entry.header().entry_type();
    if etype.is_pax_global_extensions() {
        // Global PAX headers hold archive-wide defaults (comments, mtimes) kiln does not use.
        return Ok(None);
    }
    let path = TreePath::parse_relative(raw_path)?;
    let meta = entry_meta(entry)?;
    let kind = match etype {
        T::Directory => Kind::Dir,
        // GNU sparse files are expanded by the tar crate's reader; `7` is a contiguous file.
        T::Regular | T::Continuous | T::GNUSparse => {
            let size = entry.size();
            match contents {
                Contents::Skip => Kind::File(Content::bytes(Vec::new())),
                Contents::Spill(spill) if size >= SPILL_MIN => {
                    Kind::File(Content::Spilled(spill.store(entry, size).context("reading contents")?))
                }
                Contents::Spill(_) | Contents::Memory => {
                    // The header's size bounds what is read; the cap only limits the up-front allocation.
                    let mut data = Vec::with_capacity(size.min(64 << 20) as usize);
                    entry.read_to_end(&mut data).context("reading contents")?;
                    Kind::File(Content::bytes(data))
                }
            }
        }
        T::Symlink => Kind::Symlink(link_target(entry)?),
        T::Link => {
            let target = TreePath::parse_relative(&link_target(entry)?)?;
            return Ok(Some(TarItem::HardLink { path, target, meta }));
        }
        T::Char | T::Block => {
            let (major, minor) = device_numbers(entry)?;
            if etype == T::Char {
                Kind::CharDevice { major, minor }
            } else {
                Kind::BlockDevice { major, minor }
            }
        }
        T::Fifo => Kind::Fifo,
        other => bail!("unsupported tar entry type {other:?}"),
    };
    Ok(Some(TarItem::Entry(path, Entry { meta, kind })))
}

fn link_target<R: Read>(entry: &tar::Entry<'_, R>) -> anyhow::Result<String> {
    let target = entry.link_name()?.context("link without a target")?;
    let t = target.to_str().with_context(|| format!("link target {} is not UTF-8", target.display()))?;
    if t.is_empty() {
        bail!("link with an empty target");
    }
    Ok(t.to_string())
}

fn device_numbers<R: Read>(entry: &tar::Entry<'_, R>) -> anyhow::Result<(u32, u32)> {
    let h = entry.header();
    let major = h.device_major()?.context("device without a major number")?;
    let minor = h.device_minor()?.context("device without a minor number")?;
    Ok((major, minor))
}

/// Mode (permission bits incl. setuid/setgid/sticky), numeric owner and mtime. The tar crate
/// already applies PAX `uid`/`gid` overrides to the header; a PAX `mtime` (possibly
/// fractional, as Go's archive/tar writes) is applied here.
fn entry_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> anyhow::Result<Meta> {
    let h = entry.header();
    let mode = h.mode().context("reading mode")? & 0o7777;
    let uid = u32::try_from(h.uid().context("reading uid")?).context("uid out of range")?;
    let gid = u32::try_from(h.gid().context("reading gid")?).context("gid out of range")?;
    let mut mtime = h.mtime().context("reading mtime")?;
    if let Some(exts) = entry.pax_extensions().context("reading PAX headers")? {
        for ext in exts {
            let ext = ext.context("reading a PAX record")?;
            if ext.key() == Ok("mtime") {
                if let Some(secs) = ext.value().ok().and_then(|v| v.split('.').next()?.parse::<u64>().ok()) {
                    mtime = secs;
                }
            }
        }
    }
    Ok(Meta { mode, uid, gid, mtime })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::arch::Arch;
    use std::io::Write;

    /// How a test tarball is compressed.
    #[derive(Clone, Copy)]
    enum Comp {
        None,
        Gz,
        Xz,
        Zst,
    }

    impl Comp {
        fn suffix(self) -> &'static str {
            match self {
                Comp::None => "",
                Comp::Gz => ".gz",
                Comp::Xz => ".xz",
                Comp::Zst => ".zst",
            }
        }

        fn apply(self, data: Vec<u8>) -> Vec<u8> {
            match self {
                Comp::None => data,
                Comp::Gz => {
                    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                    e.write_all(&data).unwrap();
                    e.finish().unwrap()
                }
                Comp::Xz => {
                    let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
                    e.write_all(&data).unwrap();
                    e.finish().unwrap()
                }
                Comp::Zst => zstd::encode_all(&data[..], 3).unwrap(),
            }
        }
    }

    /// One entry of a test tarball. Names are written raw into the header (bypassing the tar
    /// crate's own `..` checks) so hostile archives can be built.
    pub(crate) enum E<'a> {
        Dir(&'a str, u32),
        File(&'a str, u32, &'a [u8]),
        Owned(&'a str, u32, u32, u32, &'a [u8]),
        Symlink(&'a str, &'a str),
        Hardlink(&'a str, &'a str),
        Char(&'a str, u32, u32),
        Block(&'a str, u32, u32),
        Fifo(&'a str),
    }

    pub(crate) fn tarball(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(1_700_000_000);
            h.set_uid(0);
            h.set_gid(0);
            let (name, data): (&str, &[u8]) = match *e {
                E::Dir(n, mode) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(mode);
                    (n, &[])
                }
                E::File(n, mode, d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(mode);
                    (n, d)
                }
                E::Owned(n, mode, uid, gid, d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(mode);
                    h.set_uid(uid.into());
                    h.set_gid(gid.into());
                    (n, d)
                }
                E::Symlink(n, t) | E::Hardlink(n, t) => {
                    let ty = if matches!(e, E::Symlink(..)) { tar::EntryType::Symlink } else { tar::EntryType::Link };
                    h.set_entry_type(ty);
                    h.set_mode(0o777);
                    raw_set(&mut h.as_old_mut().linkname, t);
                    (n, &[])
                }
                E::Char(n, major, minor) | E::Block(n, major, minor) => {
                    let ty = if matches!(e, E::Char(..)) { tar::EntryType::Char } else { tar::EntryType::Block };
                    h.set_entry_type(ty);
                    h.set_mode(0o600);
                    h.set_device_major(major).unwrap();
                    h.set_device_minor(minor).unwrap();
                    (n, &[])
                }
                E::Fifo(n) => {
                    h.set_entry_type(tar::EntryType::Fifo);
                    h.set_mode(0o644);
                    (n, &[])
                }
            };
            raw_set(&mut h.as_old_mut().name, name);
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn raw_set(field: &mut [u8], s: &str) {
        assert!(s.len() < field.len(), "test name too long for a raw header");
        field.fill(0);
        field[..s.len()].copy_from_slice(s.as_bytes());
    }

    fn ar_member(out: &mut Vec<u8>, name: &str, data: &[u8]) {
        let header = format!("{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n", name, 0, 0, 0, "100644", data.len());
        assert_eq!(header.len(), AR_HEADER_LEN);
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        if data.len() % 2 == 1 {
            out.push(b'\n');
        }
    }

    fn deb(control: &str, data: &[E], comp: Comp) -> Vec<u8> {
        let control_tar = tarball(&[E::Dir("./", 0o755), E::File("./control", 0o644, control.as_bytes())]);
        let mut out = AR_MAGIC.to_vec();
        ar_member(&mut out, "debian-binary", b"2.0\n");
        ar_member(&mut out, &format!("control.tar{}", Comp::Xz.suffix()), &Comp::Xz.apply(control_tar));
        ar_member(&mut out, &format!("data.tar{}", comp.suffix()), &comp.apply(tarball(data)));
        out
    }

    const CONTROL: &str = "Package: hello\nVersion: 1.0-1\nArchitecture: amd64\nMaintainer: x\nDescription: y\n";

    fn normal_entries() -> Vec<E<'static>> {
        vec![
            E::Dir("./", 0o755),
            E::Dir("./usr/", 0o755),
            E::Dir("./usr/bin/", 0o755),
            E::File("./usr/bin/hello", 0o755, b"#!/bin/sh\necho hi\n"),
            E::File("./usr/bin/su", 0o4755, b"setuid"),
            E::Symlink("./usr/bin/hi", "hello"),
            E::Hardlink("./usr/bin/hello2", "./usr/bin/hello"),
            E::Owned("./home/user/file", 0o640, 1000, 1000, b"mine"),
            E::Dir("./bin/", 0o755),
            E::File("./bin/legacy", 0o755, b"old"),
            E::Char("./dev/null", 1, 3),
            E::Fifo("./run/fifo"),
        ]
    }

    fn unpack(bytes: &[u8]) -> anyhow::Result<(DebInfo, Tree)> {
        let mut tree = Tree::merged_usr(Arch::X86_64);
        let info = unpack_deb_from(bytes, &mut tree, "test.deb")?;
        Ok((info, tree))
    }

    fn file_bytes(tree: &Tree, p: &str) -> Vec<u8> {
        match &tree.get_str(p).unwrap_or_else(|| panic!("{p} missing")).kind {
            Kind::File(c) => c.read().unwrap().into_owned(),
            k => panic!("{p} is {k:?}"),
        }
    }

    #[test]
    fn a_normal_package_unpacks_with_owners_modes_links_and_devices() {
        for comp in [Comp::None, Comp::Gz, Comp::Xz, Comp::Zst] {
            let (info, tree) = unpack(&deb(CONTROL, &normal_entries(), comp)).unwrap();
            assert_eq!((info.package.as_str(), info.version.as_str(), info.architecture.as_str()), ("hello", "1.0-1", "amd64"));
            assert_eq!(file_bytes(&tree, "usr/bin/hello"), b"#!/bin/sh\necho hi\n");
            assert_eq!(file_bytes(&tree, "usr/bin/hello2"), b"#!/bin/sh\necho hi\n");
            let su = tree.get_str("usr/bin/su").unwrap();
            assert_eq!(su.meta.mode, 0o4755);
            assert_eq!(su.meta.mtime, 1_700_000_000);
            let own = tree.get_str("home/user/file").unwrap();
            assert_eq!((own.meta.uid, own.meta.gid, own.meta.mode), (1000, 1000, 0o640));
            assert!(matches!(&tree.get_str("usr/bin/hi").unwrap().kind, Kind::Symlink(t) if t == "hello"));
            assert!(matches!(tree.get_str("dev/null").unwrap().kind, Kind::CharDevice { major: 1, minor: 3 }));
            assert!(matches!(tree.get_str("run/fifo").unwrap().kind, Kind::Fifo));
            // `bin/legacy` lands in usr/bin through the merged-/usr alias.
            assert_eq!(file_bytes(&tree, "usr/bin/legacy"), b"old");
            assert!(info.files.iter().any(|p| p.as_str() == "usr/bin/legacy"));
            assert_eq!(info.files.len(), normal_entries().len());
        }
    }

    fn refused(data: &[E], entry: &str) {
        let err = unpack(&deb(CONTROL, data, Comp::Gz)).expect_err("hostile package was accepted");
        let msg = format!("{err:#}");
        assert!(msg.contains("test.deb: data.tar.gz"), "archive not named: {msg}");
        assert!(msg.contains(&format!("`{entry}`")), "entry not named: {msg}");
    }

    #[test]
    fn parent_traversal_is_refused() {
        refused(&[E::Dir("./", 0o755), E::File("../../etc/passwd", 0o644, b"root::0:0")], "../../etc/passwd");
    }

    #[test]
    fn absolute_paths_are_refused() {
        refused(&[E::File("/etc/shadow", 0o640, b"root::")], "/etc/shadow");
    }

    #[test]
    fn writing_through_a_package_symlink_is_refused() {
        refused(&[E::Symlink("./evil", "/etc"), E::File("./evil/passwd", 0o644, b"x")], "./evil/passwd");
        refused(&[E::Symlink("./evil", "../.."), E::File("./evil/passwd", 0o644, b"x")], "./evil/passwd");
    }

    #[test]
    fn hard_links_out_of_the_tree_or_to_missing_files_are_refused() {
        refused(&[E::File("./a", 0o644, b"x"), E::Hardlink("./x", "../x")], "./x");
        refused(&[E::Hardlink("./y", "./nothing")], "./y");
    }

    #[test]
    fn unknown_entry_types_are_errors() {
        let mut tar = tarball(&[E::File("./a", 0o644, b"x")]);
        tar[156] = b'Z'; // type flag of the first header
        let mut h = tar::Header::from_byte_slice(&tar[..512]).clone();
        h.set_cksum();
        tar[..512].copy_from_slice(h.as_bytes());
        let err = unpack_tar(&tar[..], &mut Tree::new(), "t.tar").unwrap_err();
        assert!(format!("{err:#}").contains("unsupported tar entry type"), "{err:#}");
    }

    #[test]
    fn long_names_and_pax_headers_are_read() {
        let long = format!("./usr/share/{}/file", "d".repeat(150));
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(2);
        b.append_data(&mut h, &long, &b"hi"[..]).unwrap(); // GNU long-name header
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(1);
        h.set_mtime(5);
        h.set_uid(0);
        h.set_gid(0);
        b.append_pax_extensions([("mtime", &b"1234.5"[..]), ("uid", b"4242")]).unwrap();
        b.append_data(&mut h, "./pax", &b"p"[..]).unwrap();
        let mut tree = Tree::new();
        unpack_tar(&b.into_inner().unwrap()[..], &mut tree, "t.tar").unwrap();
        assert_eq!(file_bytes(&tree, &long), b"hi");
        let pax = tree.get_str("pax").unwrap();
        assert_eq!((pax.meta.mtime, pax.meta.uid), (1234, 4242));
    }

    #[test]
    fn large_contents_go_to_the_tree_spill_and_read_back() {
        let big: Vec<u8> = (0..(SPILL_MIN as u32 + 1000)).map(|i| (i % 251) as u8).collect();
        let mut b = tar::Builder::new(Vec::new());
        // A root-owned 0644 file header of `len` bytes.
        let header = |len: usize| {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(len as u64);
            h.set_cksum();
            h
        };
        for (path, data) in [("./big", &big[..]), ("./small", &b"tiny"[..])] {
            b.append_data(&mut header(data.len()), path, data).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let mut tree = Tree::new().spill_to(Spill::create_in(dir.path()).unwrap());
        unpack_tar(&b.into_inner().unwrap()[..], &mut tree, "t.tar").unwrap();
        assert!(matches!(tree.get_str("big").unwrap().kind, Kind::File(Content::Spilled(_))));
        assert!(matches!(tree.get_str("small").unwrap().kind, Kind::File(Content::Bytes(_))));
        assert_eq!(file_bytes(&tree, "big"), big);
        assert_eq!(file_bytes(&tree, "small"), b"tiny");

        // A truncated archive is an error naming the entry, not a short file.
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut header(big.len()), "./big", &big[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let mut tree = Tree::new().spill_to(Spill::create_in(dir.path()).unwrap());
        let err = unpack_tar(&tar[..600], &mut tree, "t.tar").unwrap_err();
        assert!(format!("{err:#}").contains("entry `big`") && format!("{err:#}").contains("reading contents"), "{err:#}");
    }

    #[test]
    fn bad_format_versions_and_missing_members_are_errors() {
        let mut bad = deb(CONTROL, &normal_entries(), Comp::None);
        let at = bad.windows(4).position(|w| w == b"2.0\n").unwrap();
        bad[at] = b'3';
        assert!(format!("{:#}", unpack(&bad).unwrap_err()).contains("3.0"));

        let mut no_data = AR_MAGIC.to_vec();
        ar_member(&mut no_data, "debian-binary", b"2.0\n");
        assert!(format!("{:#}", unpack(&no_data).unwrap_err()).contains("control.tar"));
        assert!(unpack(b"not an archive").is_err());
        assert!(unpack(&AR_MAGIC[..]).is_err());

        let mut two_data = deb(CONTROL, &normal_entries(), Comp::None);
        ar_member(&mut two_data, "data.tar", &tarball(&[E::File("./extra", 0o644, b"x")]));
        assert!(format!("{:#}", unpack(&two_data).unwrap_err()).contains("a second data member `data.tar`"));
    }

    /// What `unpack_deb_copying` keeps is `data.tar`, decompressed, and unpacks to the same tree.
    #[test]
    fn the_kept_data_tar_unpacks_to_the_same_tree() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("p.deb");
        std::fs::write(&path, deb(CONTROL, &normal_entries(), Comp::Xz)).unwrap();
        let (mut direct, mut again) = (Tree::merged_usr(Arch::X86_64), Tree::merged_usr(Arch::X86_64));
        let mut kept = Vec::new();
        unpack_deb_copying(&path, &mut direct, &mut kept).unwrap();
        assert_eq!(kept, tarball(&normal_entries()), "the copy is not the decompressed data.tar");
        unpack_tar(&kept[..], &mut again, "kept").unwrap();
        let listing = |t: &Tree| {
            let body = |k: &Kind| match k {
                Kind::File(c) => format!("{:?}", c.read().unwrap()),
                other => format!("{other:?}"),
            };
            t.iter().map(|(p, e)| format!("{p:?} {:?} {}", e.meta, body(&e.kind))).collect::<Vec<_>>()
        };
        assert_eq!(listing(&direct), listing(&again));
    }

    #[test]
    fn odd_ar_members_do_not_crash_the_parser() {
        let good = deb(CONTROL, &normal_entries(), Comp::Zst);
        // Insert a GNU symbol table, a GNU name table and a BSD long-name member (odd size).
        let mut out = AR_MAGIC.to_vec();
        ar_member(&mut out, "/", b"\0\0\0\0");
        ar_member(&mut out, "//", b"some-long-name.o/\n");
        ar_member(&mut out, "#1/5", b"abcdeXYZ");
        out.extend_from_slice(&good[8..]);
        let (info, _) = unpack(&out).unwrap();
        assert_eq!(info.package, "hello");
        // Truncated archives fail cleanly.
        for cut in [9, 70, good.len() / 2, good.len() - 3] {
            assert!(unpack(&good[..cut]).is_err(), "truncated at {cut} accepted");
        }
    }

    /// Cross-check against dpkg-deb: a package built by the reference tool unpacks the same.
    #[test]
    fn a_package_built_by_dpkg_deb_unpacks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("pkg");
        std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::write(root.join("DEBIAN/control"), CONTROL).unwrap();
        std::fs::write(root.join("usr/bin/tool"), b"tool").unwrap();
        std::os::unix::fs::symlink("tool", root.join("usr/bin/t")).unwrap();
        let out = dir.path().join("p.deb");
        for comp in ["xz", "zstd", "gzip", "none"] {
            let status = std::process::Command::new("dpkg-deb")
                .args(["--root-owner-group", &format!("-Z{comp}"), "--build"])
                .arg(&root)
                .arg(&out)
                .stdout(std::process::Stdio::null())
                .status()
                .expect("dpkg-deb not found: install the `dpkg` package");
            assert!(status.success());
            let mut tree = Tree::merged_usr(Arch::X86_64);
            let info = unpack_deb(&out, &mut tree).unwrap();
            assert_eq!(info.package, "hello");
            assert_eq!(file_bytes(&tree, "usr/bin/tool"), b"tool");
            assert_eq!(tree.get_str("usr/bin/tool").unwrap().meta.uid, 0);
            assert!(matches!(&tree.get_str("usr/bin/t").unwrap().kind, Kind::Symlink(t) if t == "tool"));
        }
    }

    /// A real Debian package, fetched with apt (needs the Debian mirror).
    #[test]
    #[ignore = "downloads busybox-static with apt-get"]
    fn a_real_debian_package_unpacks() {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("apt-get")
            .args(["download", "busybox-static"])
            .current_dir(dir.path())
            .status()
            .expect("apt-get not found");
        assert!(status.success(), "apt-get download busybox-static failed");
        let deb = std::fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
        let mut tree = Tree::merged_usr(Arch::X86_64);
        let info = unpack_deb(&deb, &mut tree).unwrap();
        assert_eq!(info.package, "busybox-static");
        assert_eq!(info.architecture, "amd64");
        // bookworm ships /bin/busybox: it lands in usr/bin through the alias.
        let bb = file_bytes(&tree, "usr/bin/busybox");
        assert_eq!(&bb[..4], b"\x7fELF");
        assert!(bb.len() > 1_000_000);
        assert_eq!(tree.get_str("usr/bin/busybox").unwrap().meta.mode, 0o755);
    }
}
