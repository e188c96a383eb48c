//! Writing a [`Tree`] as a newc ("070701") cpio archive: the format of kiln's initramfs.
//!
//! Output is a pure function of the tree and the `mtime` parameter: entries in tree order,
//! inode numbers counted from 1, no host state.

use std::io::{self, Write};

use crate::tree::{Entry, Kind, Tree, TreePath};

const MAGIC: &str = "070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

/// Writes every entry of `tree` except the root, parents before children, as a newc archive.
/// Entry times are clamped to `mtime` (the build's timestamp), so nothing newer leaks in.
pub fn write_newc<W: Write>(tree: &Tree, out: W, mtime: u32) -> io::Result<()> {
    let mut w = Counting { inner: out, written: 0 };
    let mut ino: u32 = 0;
    for (path, entry) in tree.iter().filter(|(p, _)| !p.is_root()) {
        ino = ino.checked_add(1).ok_or_else(|| too_big("the tree", "more than 2^32 entries"))?;
        write_entry(&mut w, path, entry, ino, mtime)?;
    }
    let trailer = Header { ino: 0, mode: 0, uid: 0, gid: 0, nlink: 1, mtime: 0, size: 0, rdev: (0, 0) };
    write_record(&mut w, &trailer, TRAILER, &[])?;
    w.inner.flush()
}

/// The header fields that vary per entry; devmajor/devminor and the checksum are always 0.
struct Header {
    ino: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    mtime: u32,
    size: u32,
    rdev: (u32, u32),
}

fn write_entry<W: Write>(w: &mut Counting<W>, path: &TreePath, entry: &Entry, ino: u32, mtime: u32) -> io::Result<()> {
    let perm = entry.meta.mode & 0o7777;
    let (type_bits, nlink, rdev) = match &entry.kind {
        Kind::Dir => (0o040000, 2, (0, 0)),
        Kind::File(_) => (0o100000, 1, (0, 0)),
        Kind::Symlink(_) => (0o120000, 1, (0, 0)),
        Kind::CharDevice { major, minor } => (0o020000, 1, (*major, *minor)),
        Kind::BlockDevice { major, minor } => (0o060000, 1, (*major, *minor)),
        Kind::Fifo => (0o010000, 1, (0, 0)),
    };
    let data: std::borrow::Cow<'_, [u8]> = match &entry.kind {
        Kind::File(c) => c.read()?,
        Kind::Symlink(target) => target.as_bytes().into(),
        _ => (&[][..]).into(),
    };
    let size = u32::try_from(data.len()).map_err(|_| too_big(path.as_str(), "4 GiB or larger (newc limit)"))?;
    let header = Header {
        ino,
        mode: type_bits | perm,
        uid: entry.meta.uid,
        gid: entry.meta.gid,
        nlink,
        mtime: entry.meta.mtime.min(u64::from(mtime)) as u32,
        size,
        rdev,
    };
    write_record(w, &header, path.as_str(), &data)
}

fn write_record<W: Write>(w: &mut Counting<W>, h: &Header, name: &str, data: &[u8]) -> io::Result<()> {
    let namesize = u32::try_from(name.len() + 1).map_err(|_| too_big(name, "name too long"))?;
    let fields = [h.ino, h.mode, h.uid, h.gid, h.nlink, h.mtime, h.size, 0, 0, h.rdev.0, h.rdev.1, namesize, 0];
    let mut header = String::with_capacity(HEADER_LEN);
    header.push_str(MAGIC);
    for f in fields {
        header.push_str(&format!("{f:08X}"));
    }
    debug_assert_eq!(header.len(), HEADER_LEN);
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    w.pad4()?;
    w.write_all(data)?;
    w.pad4()
}

fn too_big(what: &str, why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("cpio: {what}: {why}"))
}

/// Tracks the offset so header+name and data can be padded to 4 bytes.
struct Counting<W> {
    inner: W,
    written: u64,
}

impl<W: Write> Counting<W> {
    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        self.inner.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.write_all(&[0u8; 3][..pad])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::Arch;
    use crate::tree::{Content, Meta};
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::process::{Command, Stdio};

    const BUILD_TIME: u32 = 1_700_000_000;

    fn sample() -> Tree {
        let mut t = Tree::merged_usr(Arch::X86_64);
        t.add_file("init", 0o755, "#!/bin/sh\necho hello\n").unwrap();
        t.add_file("usr/bin/su", 0o4755, vec![7u8; 4099]).unwrap(); // size not a multiple of 4
        t.add_symlink("usr/bin/sh", "busybox").unwrap();
        t.add_file("usr/bin/busybox", 0o755, "bb").unwrap();
        t.add_dir("tmp", 0o1777).unwrap();
        t.add_file("a", 0o644, "").unwrap(); // empty, one-char name
        let mut owned = Meta::root(0o640);
        owned.uid = 1000;
        owned.gid = 1001;
        owned.mtime = 5; // older than the build time: kept
        t.insert(&TreePath::parse("home/u/f").unwrap(), Entry { meta: owned, kind: Kind::File(Content::bytes("x")) }).unwrap();
        let mut newer = Meta::root(0o644);
        newer.mtime = u64::from(BUILD_TIME) + 1000; // newer: clamped
        t.insert(&TreePath::parse("etc/new").unwrap(), Entry { meta: newer, kind: Kind::File(Content::bytes("n")) }).unwrap();
        let dev = |major, minor| Entry { meta: Meta::root(0o600), kind: Kind::CharDevice { major, minor } };
        t.insert(&TreePath::parse("dev/console").unwrap(), dev(5, 1)).unwrap();
        t.insert(&TreePath::parse("dev/loop0").unwrap(), Entry { meta: Meta::root(0o660), kind: Kind::BlockDevice { major: 7, minor: 0 } })
            .unwrap();
        t.insert(&TreePath::parse("run/fifo").unwrap(), Entry { meta: Meta::root(0o644), kind: Kind::Fifo }).unwrap();
        t
    }

    fn archive(t: &Tree) -> Vec<u8> {
        let mut out = Vec::new();
        write_newc(t, &mut out, BUILD_TIME).unwrap();
        out
    }

    fn cpio(args: &[&str], input: &[u8], dir: Option<&std::path::Path>) -> String {
        use std::io::Write as _;
        let mut cmd = Command::new("cpio");
        cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        if let Some(d) = dir {
            cmd.current_dir(d);
        }
        let mut child = cmd.spawn().expect("cpio not found: install the `cpio` package");
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "cpio {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn layout_is_aligned_and_ends_with_the_trailer() {
        let bytes = archive(&sample());
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        // The first entry is `a` (tree order), inode 1.
        assert_eq!(&bytes[6..14], b"00000001");
        assert_eq!(&bytes[110..112], b"a\0");
        let tail = String::from_utf8_lossy(&bytes[bytes.len() - 124..]);
        assert!(tail.contains("TRAILER!!!"), "{tail}");
    }

    #[test]
    fn output_is_deterministic() {
        assert_eq!(archive(&sample()), archive(&sample()));
        let mut other = sample();
        other.add_file("zz", 0o644, "more").unwrap();
        assert_ne!(archive(&sample()), archive(&other));
    }

    #[test]
    fn cpio_lists_names_modes_and_owners() {
        let listing = cpio(&["-itv", "--numeric-uid-gid", "--quiet"], &archive(&sample()), None);
        let line = |name: &str| -> Vec<String> {
            listing
                .lines()
                .find(|l| l.ends_with(&format!(" {name}")) || l.contains(&format!(" {name} -> ")))
                .unwrap_or_else(|| panic!("{name} not listed:\n{listing}"))
                .split_whitespace()
                .map(str::to_string)
                .collect()
        };
        let names = cpio(&["-it", "--quiet"], &archive(&sample()), None);
        let expected: Vec<String> = sample().iter().filter(|(p, _)| !p.is_root()).map(|(p, _)| p.as_str().to_string()).collect();
        assert_eq!(names.lines().collect::<Vec<_>>(), expected);
        assert_eq!(line("usr/bin/su")[0], "-rwsr-xr-x");
        assert_eq!(line("tmp")[0], "drwxrwxrwt");
        assert_eq!(line("usr/bin/sh")[0], "lrwxrwxrwx");
        assert_eq!(line("dev/console")[0], "crw-------");
        assert_eq!(line("dev/loop0")[0], "brw-rw----");
        assert_eq!(line("run/fifo")[0], "prw-r--r--");
        let f = line("home/u/f");
        assert_eq!((f[0].as_str(), f[2].as_str(), f[3].as_str()), ("-rw-r-----", "1000", "1001"));
        assert_eq!(line("usr/bin/su")[4], "4099");
    }

    #[test]
    fn cpio_extracts_identical_contents() {
        let t = sample();
        let dir = tempfile::tempdir().unwrap();
        cpio(&["-idm", "--quiet", "--no-absolute-filenames"], &archive(&t), Some(dir.path()));
        let root = dir.path();
        let root_user = is_root();
        for (p, e) in t.iter().filter(|(p, _)| !p.is_root()) {
            let host = root.join(p.as_str());
            let md = std::fs::symlink_metadata(&host).unwrap_or_else(|err| panic!("{p}: {err}"));
            match &e.kind {
                Kind::File(c) => {
                    assert!(md.is_file(), "{p}");
                    assert_eq!(std::fs::read(&host).unwrap(), c.read().unwrap().as_ref(), "{p}");
                }
                Kind::Dir => assert!(md.is_dir(), "{p}"),
                Kind::Symlink(target) => {
                    assert_eq!(std::fs::read_link(&host).unwrap().to_str().unwrap(), target, "{p}")
                }
                Kind::CharDevice { .. } if root_user => assert!(md.file_type().is_char_device(), "{p}"),
                Kind::BlockDevice { .. } if root_user => assert!(md.file_type().is_block_device(), "{p}"),
                Kind::Fifo => assert!(md.file_type().is_fifo(), "{p}"),
                _ => {}
            }
            if !matches!(e.kind, Kind::Symlink(_)) && (root_user || !matches!(e.kind, Kind::CharDevice { .. })) {
                assert_eq!(md.permissions().mode() & 0o7777, e.meta.mode, "{p}");
                if root_user {
                    assert_eq!((md.uid(), md.gid()), (e.meta.uid, e.meta.gid), "{p}");
                }
                if !matches!(e.kind, Kind::Dir) {
                    let want = e.meta.mtime.min(u64::from(BUILD_TIME)) as i64;
                    assert_eq!(md.mtime(), want, "{p}");
                }
            }
            if let Kind::CharDevice { major, minor } | Kind::BlockDevice { major, minor } = e.kind {
                if root_user {
                    let rdev = md.rdev();
                    assert_eq!((libc_major(rdev), libc_minor(rdev)), (major, minor), "{p}");
                }
            }
        }
    }

    /// Root can create device nodes and chown; otherwise those checks are skipped.
    fn is_root() -> bool {
        std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
    }

    fn libc_major(dev: u64) -> u32 {
        (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)) as u32
    }

    fn libc_minor(dev: u64) -> u32 {
        (((dev >> 12) & 0xffff_ff00) | (dev & 0xff)) as u32
    }
}
