//! Flattening an image's layers into one root [`Tree`], safely: layers are applied in order,
//! streamed from the cache through the decompressor their media type names, with OCI whiteouts
//! honoured, and every entry that could reach outside the root refused.
//!
//! The tar walking is [`crate::deb::for_each_entry`] (the same walker packages go through); this
//! module adds the layer rules:
//!
//! - `.wh.NAME` deletes `NAME` of the lower layers; `.wh..wh..opq` empties its directory of
//!   everything the lower layers put there. Entries of the same layer are never deleted by a
//!   whiteout, whatever their order in the tar.
//! - A non-directory entry replaces a lower layer's directory (and everything below it), as
//!   overlay filesystems do.
//! - Refused, naming the image, layer and entry: `..` components, absolute paths (`./` is a
//!   harmless prefix and stripped; `/` is not written by any image tool and is refused), paths
//!   whose parent is a symlink (other than the root's merged-/usr links), hard links to
//!   something missing or outside the root, device nodes and FIFOs (a root has no use for them:
//!   `/dev` is a devtmpfs on the appliance), and whiteouts that go through a symlink.
//! - setuid/setgid bits are kept: the image is the operating system, as trusted as Debian's
//!   packages (`su`, `mount`, `passwd` need them). The flattening logs how many it kept.
//!
//! Layers are read from the cache once, re-hashed as they are read ([`crate::cache::Cache::open`]).
//! The same rules check the layers of bundled images (profile key `images`) as they are pulled,
//! without building a root: [`LayerCheck`].

use std::collections::HashSet;
use std::io::{BufReader, Read};

use anyhow::{bail, Context, Result};

use super::manifest::Descriptor;
use super::Image;
use crate::cache::Cache;
use crate::deb::{Contents, TarItem};
use crate::tree::{Kind, Tree, TreePath};

/// How a layer's tar is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Layer media types kiln applies (OCI and Docker names); any other is refused by name.
pub fn compression(media_type: &str) -> Result<Compression> {
    Ok(match media_type {
        "application/vnd.oci.image.layer.v1.tar" => Compression::None,
        "application/vnd.oci.image.layer.v1.tar+gzip" | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Compression::Gzip,
        "application/vnd.oci.image.layer.v1.tar+zstd" => Compression::Zstd,
        other => bail!(
            "layer media type `{other}` is not one kiln applies (tar, tar+gzip or tar+zstd layers: application/vnd.oci.image.layer.v1.tar[+gzip|+zstd], application/vnd.docker.image.rootfs.diff.tar.gzip)"
        ),
    })
}

/// The plain tar stream of a layer.
fn decoder<'a, R: Read + 'a>(r: R, c: Compression) -> Result<Box<dyn Read + 'a>> {
    Ok(match c {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(r).context("starting the zstd decoder")?),
    })
}

/// What applying layers did (for the build log and throughput figures).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    /// Bytes of file contents (uncompressed).
    pub file_bytes: u64,
    pub whiteouts: u64,
    /// Files kept with their setuid or setgid bit.
    pub setid: u64,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.entries += o.entries;
        self.file_bytes += o.file_bytes;
        self.whiteouts += o.whiteouts;
        self.setid += o.setid;
    }
}

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Applies one layer (a tar stream compressed as `media_type` says) onto `tree`. `what` names
/// the image and layer in errors. On error the tree holds part of the layer: callers drop it.
pub fn apply_layer<R: Read>(layer: R, media_type: &str, tree: &mut Tree, what: &str) -> Result<Stats> {
    let spill = tree.spill().cloned();
    apply_layer_with(layer, media_type, tree, what, Contents::keep(spill.as_ref()))
}

fn apply_layer_with<R: Read>(layer: R, media_type: &str, tree: &mut Tree, what: &str, contents: Contents<'_>) -> Result<Stats> {
    let plain = decoder(layer, compression(media_type).with_context(|| what.to_string())?)?;
    let mut stats = Stats::default();
    // Paths this layer placed: whiteouts and replacements act on lower layers only.
    let mut placed: HashSet<TreePath> = HashSet::new();
    crate::deb::for_each_entry(plain, what, contents, |item| {
        stats.entries += 1;
        match item {
            TarItem::HardLink { path, target, meta } => {
                let p = tree.add_hardlink(&path, &target, meta)?;
                placed.insert(p.clone());
                Ok(Some(p))
            }
            TarItem::Entry(path, entry) => {
                let name = path.file_name();
                if let Some(hidden) = name.strip_prefix(WHITEOUT) {
                    stats.whiteouts += 1;
                    let dir = path.parent().unwrap_or_else(TreePath::root);
                    if name == OPAQUE {
                        opaque(tree, &dir, &placed)?;
                    } else if hidden.is_empty() || hidden.starts_with(WHITEOUT) {
                        bail!("`{name}` is not a whiteout kiln understands (only `.wh.<name>` and `.wh..wh..opq`)");
                    } else {
                        let victim = tree.resolve(&dir.join(hidden)?)?;
                        if tree.is_alias(&victim) {
                            // Deleting the link would leave kiln redirecting /bin into /usr
                            // while the image says /bin is gone.
                            bail!("it would delete {victim}, which the root keeps as its merged-/usr link into /usr (delete the files under /usr instead)");
                        }
                        if !placed.contains(&victim) {
                            tree.remove(&victim);
                        }
                    }
                    return Ok(None);
                }
                match entry.kind {
                    Kind::CharDevice { major, minor } | Kind::BlockDevice { major, minor } => {
                        bail!("a device node ({major}:{minor}): image layers may not create device nodes (the appliance's /dev is a devtmpfs)")
                    }
                    Kind::Fifo => bail!("a FIFO: image layers may not create FIFOs (create them at run time)"),
                    Kind::File(ref c) => {
                        stats.file_bytes += c.len()?;
                        if entry.meta.mode & 0o6000 != 0 {
                            stats.setid += 1;
                        }
                    }
                    Kind::Dir | Kind::Symlink(_) => {}
                }
                let resolved = tree.resolve(&path)?;
                if !matches!(entry.kind, Kind::Dir) && !placed.contains(&resolved) {
                    if let Some(Kind::Dir) = tree.get(&resolved).map(|e| &e.kind) {
                        // A lower layer's directory replaced by a file or link.
                        tree.remove(&resolved);
                    }
                }
                let p = tree.insert(&path, entry)?;
                placed.insert(p.clone());
                Ok(Some(p))
            }
        }
    })?;
    Ok(stats)
}

/// `.wh..wh..opq` in `dir`: everything the lower layers put in `dir` goes.
fn opaque(tree: &mut Tree, dir: &TreePath, placed: &HashSet<TreePath>) -> Result<()> {
    let dir = tree.resolve(dir)?;
    match tree.get(&dir).map(|e| &e.kind) {
        None | Some(Kind::Dir) => {}
        Some(_) => bail!("an opaque-directory marker in {dir}, which is not a directory"),
    }
    let lower: Vec<TreePath> = tree.children(&dir).map(|(p, _)| p.clone()).filter(|p| !placed.contains(p)).collect();
    for p in lower {
        tree.remove(&p);
    }
    Ok(())
}

/// Applies every layer of `image` in order onto `tree`, each streamed from the cache and
/// verified as it is read (see [`apply_cached`]).
pub fn flatten(image: &Image, cache: &Cache, tree: &mut Tree, arch: crate::arch::Arch) -> Result<Stats> {
    let mut total = Stats::default();
    for layer in image.layers() {
        total += apply_cached(layer, cache, tree, &format!("image `{}` ({arch}): layer {}", image.reference, layer.digest))?;
    }
    Ok(total)
}

/// One layer from the cache: opened once and re-hashed while it is applied, never re-opened by
/// path after the pull verified it (a shared cache's file may have been replaced since). A
/// mismatch fails the layer whatever was applied (the caller drops the tree), and is the error
/// reported even when the changed bytes also broke the tar.
fn apply_cached(layer: &Descriptor, cache: &Cache, tree: &mut Tree, what: &str) -> Result<Stats> {
    let mut blob = cache
        .open(layer.hex(), layer.size)
        .with_context(|| what.to_string())?
        .with_context(|| format!("{what}: not in the cache (it was removed after the pull; run the build again to fetch it)"))?;
    let applied = apply_layer(BufReader::with_capacity(1 << 20, &mut blob), &layer.media_type, tree, what);
    super::used_as_pulled(blob, what)?;
    applied
}

/// The layer rules applied to a bundled image (profile key `images`), whose layers a container
/// engine unpacks on the device, without building its root: the entries go into a tree of their
/// own with no file contents (memory grows with the number of entries, never with their
/// bytes), layer after layer (a symlink of a lower layer counts for the paths of the upper
/// ones). Unlike an `os.image`, the tree has no merged-/usr links: the image is its own root.
pub struct LayerCheck {
    tree: Tree,
    /// Layers and entries checked so far.
    pub layers: u64,
    pub entries: u64,
}

impl Default for LayerCheck {
    fn default() -> Self {
        LayerCheck { tree: Tree::new(), layers: 0, entries: 0 }
    }
}

impl LayerCheck {
    /// Checks the next layer (a tar stream compressed as `media_type` says) against the rules
    /// of [`apply_layer`]. It reads only as far as the tar's end-of-archive blocks: a caller
    /// verifying the whole stream reads the rest itself. `what` names the image and the layer.
    pub fn layer<R: Read>(&mut self, layer: R, media_type: &str, what: &str) -> Result<()> {
        let stats = apply_layer_with(layer, media_type, &mut self.tree, what, Contents::Skip)?;
        self.layers += 1;
        self.entries += stats.entries;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::Arch;
    use crate::deb::tests::{tarball, E};
    use std::io::Write;

    const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    const GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    const ZST: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn layers(ls: &[&[E]]) -> Result<Tree> {
        let mut t = Tree::merged_usr(Arch::X86_64);
        for (i, l) in ls.iter().enumerate() {
            apply_layer(&tarball(l)[..], TAR, &mut t, &format!("image `test` (x86_64): layer {i}"))?;
        }
        Ok(t)
    }

    fn text(t: &Tree, p: &str) -> String {
        match &t.get_str(p).unwrap_or_else(|| panic!("{p} missing")).kind {
            Kind::File(c) => String::from_utf8(c.read().unwrap().into_owned()).unwrap(),
            k => panic!("{p} is {k:?}"),
        }
    }

    /// The error of a hostile layer (the second of `ls`) names the image, the layer and the entry.
    fn refused(ls: &[&[E]], entry: &str, why: &str) {
        let err = format!("{:#}", layers(ls).expect_err("a hostile layer was applied"));
        assert!(err.contains("image `test` (x86_64): layer"), "image and layer not named: {err}");
        assert!(err.contains(&format!("entry `{entry}`")), "entry not named: {err}");
        assert!(err.contains(why), "reason `{why}` missing: {err}");
    }

    #[test]
    fn layers_apply_in_order_in_each_compression() {
        let l1 = tarball(&[E::Dir("etc/", 0o755), E::File("etc/os-release", 0o644, b"one"), E::File("usr/bin/su", 0o4755, b"su")]);
        let l2 = tarball(&[E::File("etc/os-release", 0o644, b"two"), E::Symlink("usr/bin/sh", "dash")]);
        for (ty, pack) in
            [(TAR, (|d: Vec<u8>| d) as fn(Vec<u8>) -> Vec<u8>), (GZ, |d| gzip(&d)), (ZST, |d| zstd::encode_all(&d[..], 3).unwrap())]
        {
            let mut t = Tree::merged_usr(Arch::X86_64);
            let s1 = apply_layer(&pack(l1.clone())[..], ty, &mut t, "l1").unwrap();
            apply_layer(&pack(l2.clone())[..], ty, &mut t, "l2").unwrap();
            assert_eq!(text(&t, "etc/os-release"), "two");
            assert_eq!(t.get_str("usr/bin/su").unwrap().meta.mode, 0o4755, "setuid bits are kept");
            assert_eq!((s1.entries, s1.file_bytes, s1.setid), (3, 5, 1));
            assert!(matches!(&t.get_str("bin/sh").unwrap().kind, Kind::Symlink(s) if s == "dash"));
        }
    }

    #[test]
    fn unknown_media_types_and_mislabelled_layers_are_refused() {
        let l = tarball(&[E::File("a", 0o644, b"x")]);
        let err = format!(
            "{:#}",
            apply_layer(&l[..], "application/vnd.oci.image.layer.v1.tar+bzip2", &mut Tree::new(), "image `test`: layer x").unwrap_err()
        );
        assert!(err.contains("image `test`: layer x") && err.contains("`application/vnd.oci.image.layer.v1.tar+bzip2`"), "{err}");
        // A plain tar labelled gzip is not sniffed into working.
        assert!(apply_layer(&l[..], GZ, &mut Tree::new(), "l").is_err());
    }

    #[test]
    fn whiteouts_delete_lower_entries_only() {
        let t = layers(&[
            &[
                E::File("etc/motd", 0o644, b"hi"),
                E::File("etc/keep", 0o644, b"k"),
                E::Dir("opt/tool/", 0o755),
                E::File("opt/tool/bin", 0o755, b"b"),
            ],
            // The whiteout comes after a same-layer entry of the same name: that entry stays.
            &[
                E::File("etc/.wh.motd", 0o644, b""),
                E::File("opt/.wh.tool", 0o644, b""),
                E::File("etc/new", 0o644, b"n"),
                E::File("etc/.wh.new", 0o644, b""),
            ],
        ])
        .unwrap();
        assert!(!t.contains("etc/motd") && !t.contains("etc/.wh.motd"));
        assert!(!t.contains("opt/tool") && !t.contains("opt/tool/bin") && t.contains("opt"));
        assert_eq!(text(&t, "etc/keep"), "k");
        assert_eq!(text(&t, "etc/new"), "n");
    }

    #[test]
    fn an_opaque_directory_hides_lower_contents() {
        let t = layers(&[
            &[E::File("var/lib/app/old", 0o644, b"o"), E::File("var/lib/app/sub/deep", 0o644, b"d"), E::File("var/lib/other", 0o644, b"x")],
            &[E::File("var/lib/app/new", 0o644, b"n"), E::Dir("var/lib/app/", 0o700), E::File("var/lib/app/.wh..wh..opq", 0o644, b"")],
        ])
        .unwrap();
        assert!(!t.contains("var/lib/app/old") && !t.contains("var/lib/app/sub"));
        assert_eq!(text(&t, "var/lib/app/new"), "n");
        assert_eq!(t.get_str("var/lib/app").unwrap().meta.mode, 0o700);
        assert_eq!(text(&t, "var/lib/other"), "x");
        assert!(!t.contains("var/lib/app/.wh..wh..opq"));
    }

    #[test]
    fn a_file_replaces_a_lower_directory() {
        let t = layers(&[&[E::File("srv/data/x", 0o644, b"x")], &[E::Symlink("srv/data", "/var/data")]]).unwrap();
        assert!(matches!(&t.get_str("srv/data").unwrap().kind, Kind::Symlink(s) if s == "/var/data"));
        assert!(t.get_str("srv/data/x").is_none());
    }

    #[test]
    fn parent_traversal_is_refused() {
        refused(&[&[], &[E::File("../../etc/evil", 0o644, b"x")]], "../../etc/evil", "`..`");
        refused(&[&[], &[E::File("usr/../../x", 0o644, b"x")]], "usr/../../x", "`..`");
    }

    #[test]
    fn absolute_paths_are_refused_and_dot_slash_is_not() {
        refused(&[&[], &[E::File("/etc/shadow", 0o640, b"x")]], "/etc/shadow", "absolute");
        let t = layers(&[&[E::File("./etc/x", 0o644, b"dot")]]).unwrap();
        assert_eq!(text(&t, "etc/x"), "dot");
    }

    #[test]
    fn paths_through_symlinks_are_refused() {
        // Within a layer, and across layers (the link in a lower layer).
        refused(&[&[], &[E::Symlink("evil", "/etc"), E::File("evil/passwd", 0o644, b"x")]], "evil/passwd", "through the symlink");
        refused(&[&[E::Symlink("up", "../../..")], &[E::File("up/x", 0o644, b"x")]], "up/x", "through the symlink");
        refused(&[&[E::Symlink("up", "/")], &[E::File("up/.wh.etc", 0o644, b"")]], "up/.wh.etc", "through the symlink");
    }

    #[test]
    fn bad_hard_links_are_refused() {
        refused(&[&[E::File("a", 0o644, b"a")], &[E::Hardlink("x", "../a")]], "x", "`..`");
        refused(&[&[], &[E::Hardlink("x", "/etc/passwd")]], "x", "absolute");
        refused(&[&[], &[E::Hardlink("x", "missing")]], "x", "not a regular file");
        // A target deleted by a whiteout is missing too; one from a lower layer is fine.
        refused(&[&[E::File("a", 0o644, b"a")], &[E::File(".wh.a", 0o644, b""), E::Hardlink("x", "a")]], "x", "not a regular file");
        let t = layers(&[&[E::File("a", 0o644, b"a")], &[E::Hardlink("x", "a")]]).unwrap();
        assert_eq!(text(&t, "x"), "a");
    }

    #[test]
    fn device_nodes_and_fifos_are_refused() {
        refused(&[&[], &[E::Char("dev/mem", 1, 1)]], "dev/mem", "device node (1:1)");
        refused(&[&[], &[E::Block("dev/sda", 8, 0)]], "dev/sda", "device node (8:0)");
        refused(&[&[], &[E::Fifo("run/pipe")]], "run/pipe", "FIFO");
    }

    #[test]
    fn odd_whiteouts_are_refused() {
        refused(&[&[], &[E::File("etc/.wh..wh.plnk", 0o644, b"")]], "etc/.wh..wh.plnk", "not a whiteout kiln understands");
        refused(&[&[E::File("f", 0o644, b"f")], &[E::File("f/.wh..wh..opq", 0o644, b"")]], "f/.wh..wh..opq", "is not a directory");
    }

    #[test]
    fn merged_usr_links_of_an_image_keep_the_root_merged() {
        let t = layers(&[
            &[E::Symlink("bin", "usr/bin"), E::Dir("usr/bin/", 0o755), E::File("usr/bin/dash", 0o755, b"d")],
            &[E::File("bin/extra", 0o755, b"e")],
        ])
        .unwrap();
        assert_eq!(text(&t, "usr/bin/extra"), "e");
        assert_eq!(text(&t, "bin/dash"), "d");
    }

    #[test]
    fn whiteouts_of_merged_usr_links_are_refused() {
        refused(&[&[E::File("usr/bin/dash", 0o755, b"d")], &[E::File(".wh.bin", 0o644, b"")]], ".wh.bin", "merged-/usr link");
        refused(&[&[], &[E::File("./.wh.lib", 0o644, b"")]], "./.wh.lib", "merged-/usr link");
    }

    /// The fuzz target's seeds, on the fuzz target's root (`lower-link -> /etc` from a lower
    /// layer): the hostile ones are refused naming their entry, the others apply.
    #[test]
    fn the_fuzz_seeds_are_refused_or_applied_as_intended() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/flatten");
        let hostile = [
            ("lower-link-child.tar", "lower-link/x", "through the symlink"),
            ("symlink-then-child.tar", "evil/passwd", "through the symlink"),
            ("hardlink-into-link.tar", "lower-link/h", "through the symlink"),
            ("whiteout-under-link.tar", "lower-link/.wh.passwd", "through the symlink"),
            ("opaque-under-link.tar", "lower-link/.wh..wh..opq", "not a directory"),
        ];
        let mut seen = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let mut root = Tree::merged_usr(Arch::X86_64);
            root.add_symlink("lower-link", "/etc").unwrap();
            root.add_file("lower/file", 0o644, "x").unwrap();
            let applied = apply_layer(&std::fs::read(&path).unwrap()[..], TAR, &mut root, "fuzz seed");
            match hostile.iter().find(|(n, ..)| *n == name) {
                Some((_, entry, why)) => {
                    let err = format!("{:#}", applied.expect_err(&name));
                    assert!(err.contains(&format!("entry `{entry}`")) && err.contains(why), "{name}: {err}");
                    seen += 1;
                }
                None => {
                    applied.unwrap_or_else(|e| panic!("{name}: {e:#}"));
                }
            }
        }
        assert_eq!(seen, hostile.len(), "a hostile seed is missing from {}", dir.display());
    }
}
