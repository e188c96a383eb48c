//! Turns a [`Tree`] into a reproducible, zstd-compressed squashfs image (via backhand).
//!
//! Ownership, modes (setuid included) and device nodes come from the tree, so no root privileges
//! or host filesystem are involved. Every time in the image is clamped to [`SquashfsOptions::mtime`].

use std::io::{BufReader, Cursor, Read, Seek, Write};

use anyhow::{anyhow, ensure, Context};
use backhand::compression::{CompressionOptions, Compressor, Zstd};
use backhand::kind::{Kind as ImageKind, LE_V4_0};
use backhand::{BackhandError, FilesystemCompressor, FilesystemReader, FilesystemWriter, Id, NodeHeader};

use crate::tree::{Entry, Kind, Meta, Tree, TreePath};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SquashfsOptions {
    /// The image's time and the upper bound of every entry's mtime (seconds since the epoch).
    pub mtime: u32,
    /// zstd level, 1..=22 (mksquashfs's default, 15, unless told otherwise).
    pub zstd_level: i32,
    /// Data block size: a power of two from 4 KiB to 1 MiB.
    pub block_size: u32,
}

impl Default for SquashfsOptions {
    fn default() -> Self {
        SquashfsOptions { mtime: 0, zstd_level: 15, block_size: 128 * 1024 }
    }
}

/// Writes `tree` as squashfs (zstd) to `out` (from its current position); returns bytes written.
/// Every entry keeps its mode (incl. setuid), uid/gid and kind (dirs, files, symlinks, char/block devices,
/// fifos). The image's time is `opts.mtime` and every entry's mtime is clamped to it (older times are
/// kept, as with `SOURCE_DATE_EPOCH`), so output is reproducible.
/// The image is staged in a temporary file (`$TMPDIR`) of the image's size before it reaches `out`.
pub fn write_squashfs<W: Write>(tree: &Tree, out: &mut W, opts: &SquashfsOptions) -> anyhow::Result<u64> {
    check_options(opts)?;
    let root = tree.get(&TreePath::root()).context("the tree has no root directory entry")?;
    ensure!(matches!(root.kind, Kind::Dir), "the tree's root entry is not a directory");
    let root_header = header(&root.meta, opts.mtime);

    // backhand has no public way to set the root's mtime or to register the root's uid/gid in its
    // id table (set_root_uid alone leaves a dangling id). A writer derived from a reader takes both
    // from the reader, whose fields are public: read a root-only image and adjust it.
    let mut seed = seed_reader()?;
    seed.root.nodes[0].header = root_header;
    seed.id_table = vec![Id::new(root_header.uid)];
    if root_header.gid != root_header.uid {
        seed.id_table.push(Id::new(root_header.gid));
    }
    let mut fs = FilesystemWriter::from_fs_reader(&seed).map_err(|e| backhand_error(e, "preparing the image"))?;
    fs.set_kind(image_kind()?);
    fs.set_block_size(opts.block_size);
    fs.set_time(opts.mtime);
    fs.set_compressor(zstd_compressor(opts.zstd_level)?);

    // Tree iteration is sorted, so parents always come before their children.
    for (path, entry) in tree.iter().filter(|(p, _)| !p.is_root()) {
        push_entry(&mut fs, path, entry, opts.mtime).with_context(|| format!("adding {path} to the squashfs image"))?;
    }

    // backhand removes a duplicate file by writing its data, then seeking back so later data
    // overwrites it: the stream can end with stale bytes past the image. Write to a temporary
    // file and copy exactly the image, so `out` gets nothing else (and memory stays small).
    let mut spool = tempfile::tempfile().context("creating a temporary file for the squashfs image")?;
    let (_, written) = fs.write(&mut spool).map_err(|e| backhand_error(e, "writing the squashfs image"))?;
    spool.rewind().context("rewinding the temporary squashfs image")?;
    let copied = std::io::copy(&mut BufReader::with_capacity(1 << 20, spool).take(written), out)
        .context("copying the squashfs image to its destination")?;
    ensure!(copied == written, "the temporary squashfs image is {copied} bytes, expected {written}");
    Ok(written)
}

fn check_options(opts: &SquashfsOptions) -> anyhow::Result<()> {
    ensure!((1..=22).contains(&opts.zstd_level), "zstd level {} is outside 1..=22", opts.zstd_level);
    let bs = opts.block_size;
    ensure!(
        bs.is_power_of_two() && (4096..=1024 * 1024).contains(&bs),
        "squashfs block size {bs} is not a power of two from 4096 to 1048576"
    );
    Ok(())
}

fn image_kind() -> anyhow::Result<ImageKind> {
    ImageKind::from_const(LE_V4_0).map_err(|e| anyhow!("backhand squashfs kind: {e}"))
}

fn zstd_compressor(level: i32) -> anyhow::Result<FilesystemCompressor> {
    // The level travels in the compression options, which are also stored in the image.
    let level = u32::try_from(level).context("zstd level")?;
    let options = CompressionOptions::Zstd(Zstd { compression_level: level });
    FilesystemCompressor::new(Compressor::Zstd, Some(options)).map_err(|e| backhand_error(e, "setting up zstd"))
}

/// A reader over an image holding only a root directory (see `write_squashfs` for why).
fn seed_reader() -> anyhow::Result<FilesystemReader<'static>> {
    let mut fs = FilesystemWriter::default();
    fs.set_kind(image_kind()?);
    fs.set_compressor(zstd_compressor(1)?);
    fs.set_no_padding();
    let mut image = Cursor::new(Vec::new());
    fs.write(&mut image).map_err(|e| backhand_error(e, "writing the seed image"))?;
    image.set_position(0);
    FilesystemReader::from_reader(image).map_err(|e| backhand_error(e, "reading the seed image"))
}

fn header(meta: &Meta, max_mtime: u32) -> NodeHeader {
    let mtime = u32::try_from(meta.mtime).unwrap_or(u32::MAX).min(max_mtime);
    // The mask keeps only permission bits; the result always fits in 16 bits.
    NodeHeader::new((meta.mode & 0o7777) as u16, meta.uid, meta.gid, mtime)
}

/// Linux's `new_encode_dev`, the device number layout squashfs stores (as mksquashfs does).
fn encode_dev(major: u32, minor: u32) -> anyhow::Result<u32> {
    ensure!(major < (1 << 12) && minor < (1 << 20), "device number {major}:{minor} is too large for squashfs");
    Ok((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12))
}

fn push_entry<'c>(fs: &mut FilesystemWriter<'_, '_, 'c>, path: &TreePath, entry: &'c Entry, max_mtime: u32) -> anyhow::Result<()> {
    let hdr = header(&entry.meta, max_mtime);
    let p = path.as_str();
    let result = match &entry.kind {
        Kind::Dir => fs.push_dir(p, hdr),
        Kind::File(content) => fs.push_file(content.stream(), p, hdr),
        // Symlink permissions are meaningless on Linux; 0777 is what every tool shows.
        Kind::Symlink(target) => fs.push_symlink(target.as_str(), p, NodeHeader { permissions: 0o777, ..hdr }),
        Kind::CharDevice { major, minor } => fs.push_char_device(encode_dev(*major, *minor)?, p, hdr),
        Kind::BlockDevice { major, minor } => fs.push_block_device(encode_dev(*major, *minor)?, p, hdr),
        Kind::Fifo => fs.push_fifo(p, hdr),
    };
    result.map_err(|e| backhand_error(e, "inserting the entry"))
}

/// backhand is built without its `error-strings` feature, so its errors print nothing: describe them here.
fn backhand_error(e: BackhandError, doing: &str) -> anyhow::Error {
    let what = match e {
        BackhandError::StdIo(io) => return anyhow::Error::new(io).context(doing.to_string()),
        BackhandError::DuplicatedFileName => "a path is present twice".to_string(),
        BackhandError::InvalidFilePath => "the parent is missing or not a directory".to_string(),
        BackhandError::InvalidCompressionOption => "invalid compression options".to_string(),
        BackhandError::IdNotFoundInTable => "a uid/gid is missing from the id table".to_string(),
        BackhandError::MutexPoisoned => "a file reader panicked".to_string(),
        other => format!("backhand failed ({:?})", std::io::Error::from(other).kind()),
    };
    anyhow!("{doing}: {what}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Content;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;
    use std::process::Command;

    fn run(tool: &str, package: &str, args: &[&str]) -> String {
        let out = Command::new(tool)
            .args(args)
            .env("TZ", "UTC") // listings print local time
            .output()
            .unwrap_or_else(|e| panic!("cannot run `{tool}` ({e}): install the Debian package `{package}`"));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{tool} {args:?} failed:\n{text}");
        text
    }

    /// glibc's `major()`/`minor()`.
    fn dev_numbers(rdev: u64) -> (u64, u64) {
        (((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff), (rdev & 0xff) | ((rdev >> 12) & !0xff))
    }

    fn meta(mode: u32, uid: u32, gid: u32, mtime: u64) -> Meta {
        Meta { mode, uid, gid, mtime }
    }

    /// Incompressible but reproducible bytes (xorshift).
    fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            v.extend_from_slice(&seed.to_le_bytes());
        }
        v.truncate(len);
        v
    }

    fn sample_tree(host_file: &Path) -> Tree {
        let mut t = Tree::new();
        let ins = |t: &mut Tree, p: &str, meta: Meta, kind: Kind| {
            t.insert(&TreePath::parse(p).unwrap(), Entry { meta, kind }).unwrap();
        };
        ins(&mut t, "usr/bin", meta(0o755, 0, 0, 100), Kind::Dir);
        ins(&mut t, "usr/bin/su", meta(0o4755, 0, 0, 100), Kind::File(Content::bytes(b"#!/bin/sh\necho su\n".to_vec())));
        ins(&mut t, "home/user", meta(0o700, 1000, 1000, 100), Kind::Dir);
        ins(&mut t, "home/user/notes", meta(0o640, 1000, 1000, 100), Kind::File(Content::bytes(b"hello".to_vec())));
        ins(&mut t, "bin", meta(0o777, 0, 0, 100), Kind::Symlink("usr/bin".into()));
        ins(&mut t, "dev/null", meta(0o666, 0, 0, 100), Kind::CharDevice { major: 1, minor: 3 });
        ins(&mut t, "dev/sda1", meta(0o660, 0, 6, 100), Kind::BlockDevice { major: 8, minor: 1 });
        ins(&mut t, "dev/big", meta(0o600, 0, 0, 100), Kind::CharDevice { major: 300, minor: 70000 });
        ins(&mut t, "run/initctl", meta(0o600, 0, 0, 100), Kind::Fifo);
        ins(&mut t, "var/big", meta(0o644, 0, 0, 100), Kind::File(Content::bytes(noise(5 * 1024 * 1024, 42))));
        ins(&mut t, "var/empty", meta(0o644, 0, 0, 100), Kind::File(Content::bytes(Vec::new())));
        ins(&mut t, "etc/overlay", meta(0o600, 0, 0, u64::MAX), Kind::File(Content::HostFile(host_file.to_path_buf())));
        // Contents parked in a spill file (as packages' large files are) stream in like the rest.
        let spill = crate::spill::Spill::create_in(host_file.parent().unwrap()).unwrap();
        let parked = noise(300 * 1024, 9);
        let spilled = spill.store(&mut &parked[..], parked.len() as u64).unwrap();
        ins(&mut t, "var/spilled", meta(0o644, 0, 0, 100), Kind::File(Content::Spilled(spilled)));
        t
    }

    fn write_to_vec(tree: &Tree, opts: &SquashfsOptions) -> Vec<u8> {
        let mut cursor = Cursor::new(Vec::new());
        let n = write_squashfs(tree, &mut cursor, opts).unwrap();
        let bytes = cursor.into_inner();
        assert_eq!(n as usize, bytes.len());
        bytes
    }

    fn opts(mtime: u32) -> SquashfsOptions {
        // A low level keeps the test fast; the level itself is checked in `unsquashfs -s` below.
        SquashfsOptions { mtime, zstd_level: 3, ..SquashfsOptions::default() }
    }

    #[test]
    fn unsquashfs_sees_every_kind_owner_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("overlay");
        std::fs::write(&host, b"from the host").unwrap();
        let tree = sample_tree(&host);
        let img = dir.path().join("root.sqfs");
        std::fs::write(&img, write_to_vec(&tree, &opts(1_700_000_000))).unwrap();
        let img_s = img.to_str().unwrap();

        let sb = run("unsquashfs", "squashfs-tools", &["-s", img_s]);
        assert!(sb.contains("Compression zstd"), "{sb}");
        assert!(sb.contains("compression-level 3"), "{sb}");
        assert!(sb.contains("Block size 131072"), "{sb}");

        let list = run("unsquashfs", "squashfs-tools", &["-lln", img_s]);
        let line = |path: &str| -> String {
            list.lines()
                .find(|l| l.ends_with(&format!("squashfs-root{path}")) || l.contains(&format!("squashfs-root{path} -> ")))
                .unwrap_or_else(|| panic!("{path} not listed:\n{list}"))
                // column widths vary with the listing; compare single-spaced
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        let check = |path: &str, prefix: &str| {
            let l = line(path);
            assert!(l.starts_with(prefix), "{path}: `{l}` should start with `{prefix}`");
        };
        check("", "drwxr-xr-x 0/0");
        check("/usr/bin/su", "-rwsr-xr-x 0/0");
        check("/home/user", "drwx------ 1000/1000");
        check("/home/user/notes", "-rw-r----- 1000/1000 5 ");
        check("/dev/null", "crw-rw-rw- 0/0 1, 3 ");
        check("/dev/sda1", "brw-rw---- 0/6 8, 1 ");
        // unsquashfs 4.5 lists a minor above 255 as `rdev >> 8, rdev & 0xff` (it does the same for
        // mksquashfs images); the extracted node below shows the real numbers.
        check("/dev/big", "crw------- 0/0 ");
        check("/run/initctl", "prw------- 0/0");
        check("/var/big", &format!("-rw-r--r-- 0/0 {} ", 5 * 1024 * 1024));
        check("/var/empty", "-rw-r--r-- 0/0 0 ");
        check("/var/spilled", &format!("-rw-r--r-- 0/0 {} ", 300 * 1024));
        assert!(line("/bin").starts_with("lrwxrwxrwx 0/0") && line("/bin").ends_with("squashfs-root/bin -> usr/bin"));
        // times: entry times kept when older, clamped when newer (etc/overlay had u64::MAX)
        assert!(line("/usr/bin/su").contains("1970-01-01 00:01"), "{}", line("/usr/bin/su"));
        assert!(line("/etc/overlay").contains("2023-11-14 22:13"), "{}", line("/etc/overlay"));

        let out = dir.path().join("x");
        run("unsquashfs", "squashfs-tools", &["-q", "-n", "-d", out.to_str().unwrap(), img_s]);
        for (path, entry) in tree.iter() {
            if let Kind::File(c) = &entry.kind {
                let got = std::fs::read(out.join(path.as_str())).unwrap();
                assert!(got == *c.read().unwrap(), "{path} differs after extraction");
            }
        }
        assert_eq!(std::fs::read_link(out.join("bin")).unwrap(), Path::new("usr/bin"));
        for (path, want) in [("dev/null", (1, 3)), ("dev/sda1", (8, 1)), ("dev/big", (300, 70000))] {
            let md = std::fs::symlink_metadata(out.join(path)).unwrap();
            assert_eq!(dev_numbers(md.rdev()), want, "{path} after extraction (unsquashfs runs as root here)");
        }
        let md = std::fs::symlink_metadata(out.join("usr/bin/su")).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o4755);
    }

    #[test]
    fn duplicate_files_are_stored_once_and_leave_no_bytes_past_the_image() {
        // Identical contents last in path order: backhand writes a duplicate's data and then
        // rewinds, which used to leave its bytes past the end of the image.
        let data = noise(1024 * 1024, 7);
        let mut tree = Tree::new();
        tree.add_file("a", 0o644, "small").unwrap();
        for p in ["z/1", "z/2", "z/3"] {
            tree.add_file(p, 0o644, data.clone()).unwrap();
        }
        let bytes = write_to_vec(&tree, &opts(0)); // checks the length equals the returned count
        assert!(bytes.len() < data.len() + 64 * 1024, "{} bytes for one 1 MiB file stored thrice", bytes.len());
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d.sqfs");
        std::fs::write(&img, &bytes).unwrap();
        let out = dir.path().join("x");
        run("unsquashfs", "squashfs-tools", &["-q", "-n", "-d", out.to_str().unwrap(), img.to_str().unwrap()]);
        for p in ["z/1", "z/2", "z/3"] {
            assert!(std::fs::read(out.join(p)).unwrap() == data, "{p}");
        }
    }

    #[test]
    fn root_metadata_comes_from_the_tree_root() {
        let mut tree = Tree::new();
        tree.insert(&TreePath::root(), Entry { meta: meta(0o750, 7, 9, 5), kind: Kind::Dir }).unwrap();
        tree.add_file("f", 0o644, "x").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("r.sqfs");
        std::fs::write(&img, write_to_vec(&tree, &opts(1000))).unwrap();
        let list = run("unsquashfs", "squashfs-tools", &["-lln", img.to_str().unwrap()]);
        let root = list.lines().find(|l| l.ends_with(" squashfs-root")).unwrap_or_else(|| panic!("{list}"));
        assert!(root.starts_with("drwxr-x--- 7/9 "), "{root}");
        assert!(root.contains("1970-01-01 00:00"), "{root}");
    }

    #[test]
    fn output_is_reproducible_and_depends_on_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("overlay");
        std::fs::write(&host, b"h").unwrap();
        let tree = sample_tree(&host);
        let a = write_to_vec(&tree, &opts(1_700_000_000));
        let b = write_to_vec(&tree, &opts(1_700_000_000));
        assert!(a == b, "two writes differ");
        let c = write_to_vec(&tree, &opts(1_700_000_001));
        assert!(a != c, "mtime did not change the image");
    }

    #[test]
    fn writes_at_the_current_position_and_leaves_the_stream_after_the_image() {
        let mut tree = Tree::new();
        tree.add_file("f", 0o644, "data").unwrap();
        let alone = write_to_vec(&tree, &opts(0));
        let mut cursor = Cursor::new(vec![0xAAu8; 4096]);
        cursor.set_position(4096);
        let n = write_squashfs(&tree, &mut cursor, &opts(0)).unwrap();
        assert_eq!(cursor.position(), 4096 + n);
        let bytes = cursor.into_inner();
        assert!(bytes[..4096].iter().all(|&b| b == 0xAA), "bytes before the start were touched");
        assert!(bytes[4096..] == alone[..], "an offset image must be the same bytes");
    }

    #[test]
    fn bad_options_and_missing_host_files_are_errors() {
        let tree = Tree::new();
        let mut sink = Cursor::new(Vec::new());
        for bad in [
            SquashfsOptions { zstd_level: 0, ..opts(0) },
            SquashfsOptions { zstd_level: 23, ..opts(0) },
            SquashfsOptions { block_size: 3000, ..opts(0) },
            SquashfsOptions { block_size: 2 * 1024 * 1024, ..opts(0) },
        ] {
            assert!(write_squashfs(&tree, &mut sink, &bad).is_err(), "{bad:?}");
        }
        let mut tree = Tree::new();
        let missing = Path::new("/nonexistent/kiln-test-file");
        tree.insert(&TreePath::parse("x").unwrap(), Entry { meta: Meta::root(0o644), kind: Kind::File(Content::HostFile(missing.into())) })
            .unwrap();
        let err = format!("{:#}", write_squashfs(&tree, &mut sink, &opts(0)).unwrap_err());
        assert!(err.contains("/nonexistent/kiln-test-file"), "{err}");
    }

    #[test]
    fn device_numbers_use_the_linux_encoding() {
        assert_eq!(encode_dev(1, 3).unwrap(), 0x103);
        assert_eq!(encode_dev(8, 0x12345).unwrap(), 0x1230_0845);
        assert!(encode_dev(4096, 0).is_err());
        assert!(encode_dev(0, 1 << 20).is_err());
    }
}
