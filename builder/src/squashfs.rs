//! Turns a [`Tree`] into a reproducible, zstd-compressed squashfs image (via backhand).
//!
//! Ownership, modes (setuid included) and device nodes come from the tree, so no root privileges
//! or host filesystem are involved. Every time in the image is clamped to [`SquashfsOptions::mtime`].
//!
//! Data blocks are compressed on every core (see [`CompressAhead`]); the image is byte-identical to
//! the one backhand writes alone on one thread.

use std::cell::RefCell;
use std::io::{BufReader, Cursor, Read, Seek, Write};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;

use anyhow::{anyhow, ensure, Context};
use backhand::compression::{CompressionAction, CompressionOptions, Compressor, DefaultCompressor, Zstd};
use backhand::kind::{Kind as ImageKind, LE_V4_0};
use backhand::{BackhandError, FilesystemCompressor, FilesystemReader, FilesystemWriter, Id, NodeHeader, SuperBlock};

use crate::tree::{Content, Entry, Kind, Meta, Tree, TreePath};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SquashfsOptions {
    /// The image's time and the upper bound of every entry's mtime (seconds since the epoch).
    pub mtime: u32,
    /// zstd level, 1..=22 (mksquashfs's default, 15, unless told otherwise).
    pub zstd_level: i32,
    /// Data block size: a power of two from 4 KiB to 1 MiB.
    pub block_size: u32,
    /// Threads compressing data blocks: 0 means one per core, 1 compresses on the calling thread
    /// only (backhand alone). The image is the same bytes whatever the number.
    pub threads: usize,
}

impl Default for SquashfsOptions {
    fn default() -> Self {
        SquashfsOptions { mtime: 0, zstd_level: 15, block_size: 128 * 1024, threads: 0 }
    }
}

/// Writes `tree` as squashfs (zstd) to `out` (from its current position); returns bytes written.
/// Every entry keeps its mode (incl. setuid), uid/gid and kind (dirs, files, symlinks, char/block devices,
/// fifos). The image's time is `opts.mtime` and every entry's mtime is clamped to it (older times are
/// kept, as with `SOURCE_DATE_EPOCH`), so output is reproducible.
/// The image is staged in a temporary file (`$TMPDIR`) of the image's size before it reaches `out`.
pub fn write_squashfs<W: Write>(tree: &Tree, out: &mut W, opts: &SquashfsOptions) -> anyhow::Result<u64> {
    write_counted(tree, out, opts, &crate::reuse::Reuse::disabled()).map(|(written, _)| written)
}

/// [`write_squashfs`], taking each data block's compressed form from `reuse` when the same bytes
/// were compressed before with the same settings (and keeping the new ones there): a rebuild
/// compresses only the blocks of files that changed. A kept block is used only if it
/// decompresses to exactly the block's bytes; the image is the same bytes as without reuse.
/// Reuse needs the parallel writer (`threads` other than 1).
pub fn write_squashfs_reusing<W: Write>(
    tree: &Tree,
    out: &mut W,
    opts: &SquashfsOptions,
    reuse: &crate::reuse::Reuse,
) -> anyhow::Result<u64> {
    write_counted(tree, out, opts, reuse).map(|(written, _)| written)
}

/// The reuse kind of compressed blocks: everything besides the block's bytes that decides them.
fn block_kind(opts: &SquashfsOptions) -> String {
    format!("squashfs-zstd{}-l{}-b{}", zstd::zstd_safe::version_number(), opts.zstd_level, opts.block_size)
}

/// A block's compressed form from `reuse`, checked by decompressing it.
fn reused_block(reuse: &crate::reuse::Reuse, kind: &str, key: &str, raw: &[u8]) -> Option<Vec<u8>> {
    let packed = reuse.get(kind, key)?;
    let unpacked = zstd::bulk::decompress(&packed, raw.len()).ok()?;
    (unpacked == raw).then_some(packed)
}

/// How many data blocks were compressed ahead, and how many of those backhand took.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct AheadCounts {
    compressed: u64,
    taken: u64,
}

fn write_counted<W: Write>(
    tree: &Tree,
    out: &mut W,
    opts: &SquashfsOptions,
    reuse: &crate::reuse::Reuse,
) -> anyhow::Result<(u64, AheadCounts)> {
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
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    };
    // The same on-disk kind either way; only who compresses the data blocks differs.
    fs.set_kind(if threads > 1 { ImageKind::new_v4_with_const(&COMPRESS_AHEAD, LE_V4_0) } else { image_kind()? });
    fs.set_block_size(opts.block_size);
    fs.set_time(opts.mtime);
    let compressor = zstd_compressor(opts.zstd_level)?;
    fs.set_compressor(compressor);

    // Tree iteration is sorted, so parents always come before their children.
    for (path, entry) in tree.iter().filter(|(p, _)| !p.is_root()) {
        push_entry(&mut fs, path, entry, opts.mtime).with_context(|| format!("adding {path} to the squashfs image"))?;
    }

    // backhand removes a duplicate file by writing its data, then seeking back so later data
    // overwrites it: the stream can end with stale bytes past the image. Write to a temporary
    // file and copy exactly the image, so `out` gets nothing else (and memory stays small).
    let mut spool = tempfile::tempfile().context("creating a temporary file for the squashfs image")?;
    let result = if threads > 1 {
        let files = files_in_backhand_order(tree);
        // Plain threads blocking on a channel rather than a rayon pool: rayon's idle workers
        // spin, which cost 40% more CPU time here on a busy host.
        // Blocks in flight: 16 per thread (8 MiB at most for two threads at 128 KiB, raw and
        // compressed, whatever the image's size). Fewer left the workers idle on a busy host
        // while the writer and the reading thread waited to be scheduled.
        let in_flight = threads * 16;
        let (jobs, job_queue) = sync_channel::<Job>(in_flight);
        let job_queue = Mutex::new(job_queue);
        let kind = block_kind(opts);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                let (job_queue, kind) = (&job_queue, &kind);
                scope.spawn(move || loop {
                    let Ok((raw, done)) = job_queue.lock().map_err(|_| ()).and_then(|q| q.recv().map_err(|_| ())) else { break };
                    let key = reuse.enabled().then(|| crate::digest::sha256_hex(&raw));
                    let packed = match key.as_deref().and_then(|k| reused_block(reuse, kind, k, &raw)) {
                        Some(packed) => Some(packed),
                        None => {
                            let packed = DefaultCompressor.compress(&raw, compressor, opts.block_size).ok();
                            if let (Some(k), Some(p)) = (&key, &packed) {
                                reuse.put(kind, k, p);
                            }
                            packed
                        }
                    };
                    let _ = done.send(Block { raw, packed }); // the writer may be gone
                });
            }
            let (tx, rx) = sync_channel(in_flight);
            let ahead = scope.spawn(move || compress_ahead(&files, opts.block_size, jobs, tx));
            let queue = AheadQueue::install(rx);
            let result = fs.write(&mut spool);
            // Dropping the queue ends the compressing thread even when the write failed early.
            let taken = queue.finish();
            let compressed = ahead.join().unwrap_or(0);
            result.map(|(_, written)| (written, AheadCounts { compressed, taken }))
        })
    } else {
        fs.write(&mut spool).map(|(_, written)| (written, AheadCounts::default()))
    };
    let (written, counts) = result.map_err(|e| backhand_error(e, "writing the squashfs image"))?;
    spool.rewind().context("rewinding the temporary squashfs image")?;
    let copied = std::io::copy(&mut BufReader::with_capacity(1 << 20, spool).take(written), out)
        .context("copying the squashfs image to its destination")?;
    ensure!(copied == written, "the temporary squashfs image is {copied} bytes, expected {written}");
    Ok((written, counts))
}

// Parallel compression. backhand writes data blocks one after the other on the calling thread,
// calling its compressor once per block. It takes a custom compressor (`CompressionAction`), so
// a second thread reads the files ahead in the order backhand will, cuts the same blocks, has
// worker threads compress them (backhand's own zstd call, so the bytes are the same) and queues
// them in order; the custom compressor hands backhand the queued result when backhand's block
// is the next queued one (compared byte for byte), and compresses the block itself otherwise
// (metadata blocks, or a file that changed between the two reads). Only 16 blocks per thread are in
// flight, so memory does not grow with the image and nothing needs to be spilled to disk.

/// The compressor backhand is given; its state is the calling thread's [`AheadQueue`]
/// (backhand wants a `&'static` compressor, and a thread-local lets several images be written
/// at once on different threads).
struct CompressAhead;
static COMPRESS_AHEAD: CompressAhead = CompressAhead;

thread_local! {
    static AHEAD_QUEUE: RefCell<Option<AheadQueue>> = const { RefCell::new(None) };
}

/// One data block: its bytes and their compressed form (`None` if compressing failed: backhand
/// then compresses it itself and reports the error).
struct Block {
    raw: Vec<u8>,
    packed: Option<Vec<u8>>,
}

/// A block to compress and where its result goes.
type Job = (Vec<u8>, SyncSender<Block>);

struct AheadQueue {
    /// Each queued block's result, in backhand's order.
    blocks: Receiver<Receiver<Block>>,
    next: Option<Block>,
    taken: u64,
}

impl AheadQueue {
    /// Makes the queue the current thread's until the returned guard is finished or dropped.
    fn install(blocks: Receiver<Receiver<Block>>) -> AheadGuard {
        AHEAD_QUEUE.with_borrow_mut(|q| *q = Some(AheadQueue { blocks, next: None, taken: 0 }));
        AheadGuard
    }

    /// The compressed form of `raw` if it is the next queued block.
    fn take_if_next(&mut self, raw: &[u8]) -> Option<Vec<u8>> {
        if self.next.is_none() {
            // Waits until the next block is compressed, or the reading-ahead thread is done.
            self.next = Some(self.blocks.recv().ok()?.recv().ok()?);
        }
        let next = self.next.as_ref()?;
        if next.raw != raw || next.packed.is_none() {
            return None;
        }
        self.taken += 1;
        self.next.take().and_then(|b| b.packed)
    }
}

struct AheadGuard;

impl AheadGuard {
    /// Removes the queue (closing its channel); returns how many blocks were taken from it.
    fn finish(self) -> u64 {
        AHEAD_QUEUE.with_borrow_mut(|q| q.take()).map_or(0, |q| q.taken)
    }
}

impl Drop for AheadGuard {
    fn drop(&mut self) {
        AHEAD_QUEUE.with_borrow_mut(|q| q.take());
    }
}

impl CompressionAction for CompressAhead {
    type Error = BackhandError;
    type Compressor = Compressor;
    type FilesystemCompressor = FilesystemCompressor;
    type SuperBlock = SuperBlock;

    fn decompress(&self, bytes: &[u8], out: &mut Vec<u8>, compressor: Compressor) -> Result<(), BackhandError> {
        DefaultCompressor.decompress(bytes, out, compressor)
    }

    fn compress(&self, bytes: &[u8], fc: FilesystemCompressor, block_size: u32) -> Result<Vec<u8>, BackhandError> {
        match AHEAD_QUEUE.with_borrow_mut(|q| q.as_mut().and_then(|q| q.take_if_next(bytes))) {
            Some(packed) => Ok(packed),
            None => DefaultCompressor.compress(bytes, fc, block_size),
        }
    }

    fn compression_options(
        &self,
        superblock: &mut SuperBlock,
        kind: &ImageKind,
        fs_compressor: FilesystemCompressor,
    ) -> Result<Option<Vec<u8>>, BackhandError> {
        DefaultCompressor.compression_options(superblock, kind, fs_compressor)
    }
}

/// Regular files in the order backhand writes their data: sorted as paths (component by
/// component: `a/b` before `a-b`), which is not the tree's string order.
fn files_in_backhand_order(tree: &Tree) -> Vec<(&TreePath, &Content)> {
    let mut files: Vec<_> = tree
        .iter()
        .filter_map(|(path, entry)| match &entry.kind {
            Kind::File(content) => Some((path, content)),
            _ => None,
        })
        .collect();
    files.sort_by(|(a, _), (b, _)| Path::new(a.as_str()).cmp(Path::new(b.as_str())));
    files
}

/// Cuts `files` into the blocks backhand compresses, in its order, hands each to the compressing
/// threads (`jobs`) and sends the writer where its result will arrive (so no thread waits for a
/// slow block while the queue has room); returns how many blocks it queued. It mirrors backhand
/// 0.25's `DataWriter::add_bytes`: a file shorter than a block goes to the shared fragment block
/// (written when the next one does not fit), a longer one is cut into blocks (its tail is a short
/// block, not a fragment), and a block of zeros is a hole (not compressed). Any difference only
/// costs speed: backhand compresses a block it does not find next in the queue itself.
fn compress_ahead(files: &[(&TreePath, &Content)], block_size: u32, jobs: SyncSender<Job>, tx: SyncSender<Receiver<Block>>) -> u64 {
    let bs = block_size as usize;
    let mut queued = 0u64;
    let mut send = |raw: Vec<u8>| -> bool {
        let (done, result) = sync_channel(1);
        // Waits while the queue is full: that bounds the blocks in flight.
        if tx.send(result).is_err() {
            return false; // the writer is gone (finished or failed): stop
        }
        queued += 1;
        jobs.send((raw, done)).is_ok()
    };
    let mut fragment: Vec<u8> = Vec::with_capacity(bs);
    'files: for (_, content) in files {
        let mut reader = content.stream();
        let mut first = true;
        loop {
            // A file that cannot be read is backhand's error to report; stop reading ahead.
            let Ok(chunk) = read_block(&mut reader, bs) else { break 'files };
            if first && chunk.len() < bs {
                if !chunk.is_empty() {
                    if chunk.len() + fragment.len() > bs && !send(std::mem::replace(&mut fragment, Vec::with_capacity(bs))) {
                        break 'files;
                    }
                    fragment.extend_from_slice(&chunk);
                }
                break;
            }
            first = false;
            if chunk.is_empty() {
                break;
            }
            let last = chunk.len() < bs;
            if chunk.iter().any(|&b| b != 0) && !send(chunk) {
                break 'files;
            }
            if last {
                break;
            }
        }
    }
    if !fragment.is_empty() {
        send(fragment);
    }
    queued
}

/// Reads up to `len` bytes: fewer only at the end of the stream (as backhand reads a block).
fn read_block(reader: &mut dyn Read, len: usize) -> std::io::Result<Vec<u8>> {
    let mut block = Vec::with_capacity(len);
    reader.take(len as u64).read_to_end(&mut block)?;
    Ok(block)
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

    /// Files that exercise every way backhand cuts data: fragments (several fragment blocks),
    /// a file of exactly one block, a short tail block, holes (a zero block mid-file and a zero
    /// tail), duplicates, incompressible blocks (stored raw), and names whose path order differs
    /// from their string order (`a/b` sorts before `a-b` as a path, after it as a string).
    fn cutting_tree() -> Tree {
        let bs = 128 * 1024;
        let mut tree = Tree::new();
        let text = |n: usize, seed: u8| -> Vec<u8> { (0..n).map(|i| b"kiln squashfs "[(i + seed as usize) % 14]).collect() };
        for i in 0..40 {
            tree.add_file(&format!("etc/small-{i:02}"), 0o644, text(9000 + i * 97, i as u8)).unwrap();
        }
        tree.add_file("a-b", 0o644, noise(bs + 5, 1)).unwrap();
        tree.add_file("a/b", 0o644, text(3 * bs + 17, 2)).unwrap();
        tree.add_file("a.b", 0o644, noise(bs, 3)).unwrap();
        tree.add_file("a/c", 0o644, vec![0u8; bs + 5]).unwrap();
        let mut holes = text(2 * bs, 4);
        holes.extend(vec![0u8; bs]);
        holes.extend(noise(bs, 5));
        holes.extend(vec![0u8; 100]);
        tree.add_file("var/holes", 0o644, holes).unwrap();
        for p in ["var/dup1", "var/dup2"] {
            tree.add_file(p, 0o644, noise(2 * bs + 1, 6)).unwrap();
        }
        tree.add_file("var/empty", 0o644, Vec::new()).unwrap();
        tree
    }

    #[test]
    fn parallel_compression_gives_the_sequential_image_and_is_used_for_every_block() {
        let tree = cutting_tree();
        let write = |threads: usize| {
            let mut cursor = Cursor::new(Vec::new());
            let (n, counts) =
                write_counted(&tree, &mut cursor, &SquashfsOptions { threads, ..opts(1_700_000_000) }, &crate::reuse::Reuse::disabled())
                    .unwrap();
            assert_eq!(n as usize, cursor.get_ref().len());
            (cursor.into_inner(), counts)
        };
        let (sequential, none) = write(1);
        assert_eq!(none, AheadCounts::default(), "one thread must leave backhand alone");
        for threads in [2, 3] {
            let (parallel, counts) = write(threads);
            assert!(parallel == sequential, "{threads} threads: the image differs from the sequential one");
            // Every block compressed ahead was used: the reading-ahead mirrors backhand's cutting
            // (a mismatch would still give the right image, only slower).
            assert!(counts.compressed >= 20, "{threads} threads: only {} blocks compressed ahead", counts.compressed);
            assert_eq!(counts.taken, counts.compressed, "{threads} threads: blocks compressed ahead but not used");
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("p.sqfs");
        std::fs::write(&img, &sequential).unwrap();
        let out = dir.path().join("x");
        run("unsquashfs", "squashfs-tools", &["-q", "-n", "-d", out.to_str().unwrap(), img.to_str().unwrap()]);
        for (path, entry) in tree.iter() {
            if let Kind::File(c) = &entry.kind {
                assert!(std::fs::read(out.join(path.as_str())).unwrap() == *c.read().unwrap(), "{path} differs after extraction");
            }
        }
    }

    /// Blocks kept from an earlier image are reused (every block, when nothing changed), the image
    /// is the same bytes as one written without reuse, and a kept block that does not decompress
    /// to the block's bytes (damaged, or planted) is compressed again instead of used.
    #[test]
    fn reused_blocks_give_the_same_image_and_bad_ones_are_not_used() {
        let tree = cutting_tree();
        let o = SquashfsOptions { threads: 2, ..opts(1_700_000_000) };
        let cache = tempfile::tempdir().unwrap();
        let reuse = crate::reuse::Reuse::with_key(cache.path(), [3; 32]);
        let write = |reuse: &crate::reuse::Reuse| {
            let mut cursor = Cursor::new(Vec::new());
            write_counted(&tree, &mut cursor, &o, reuse).unwrap();
            cursor.into_inner()
        };
        let fresh = write(&crate::reuse::Reuse::disabled());
        assert!(write(&reuse) == fresh, "the first image with reuse differs");
        let kind_dir = cache.path().join("reuse").join(block_kind(&o));
        let mut kept = Vec::new();
        for shard in std::fs::read_dir(&kind_dir).unwrap() {
            for f in std::fs::read_dir(shard.unwrap().path()).unwrap() {
                kept.push(f.unwrap().path());
            }
        }
        assert!(kept.len() >= 10, "only {} blocks kept", kept.len());
        let stamp = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
        let before: Vec<_> = kept.iter().map(|p| stamp(p)).collect();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(write(&reuse) == fresh, "the image from reused blocks differs");
        assert!(kept.iter().zip(&before).all(|(p, t)| stamp(p) > *t), "not every kept block was reused");
        // A planted block: valid zstd of other bytes, stored under each block's key with a
        // valid MAC (as a bug in kiln could). It must not end up in the image.
        let planted = zstd::bulk::compress(&noise(o.block_size as usize, 99), 15).unwrap();
        for p in &kept {
            reuse.put(&block_kind(&o), p.file_name().unwrap().to_str().unwrap(), &planted);
        }
        assert!(write(&reuse) == fresh, "a planted block was used");
    }

    #[test]
    fn a_file_changed_after_reading_ahead_is_still_written_as_it_is_read() {
        // The writer compares each block with the one compressed ahead: a host file that changes
        // between the two reads is compressed again, not replaced by stale data.
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("grows");
        // Compressible: backhand stores an incompressible block raw and would not show stale bytes.
        let text = |word: &[u8]| -> Vec<u8> { word.iter().copied().cycle().take(300 * 1024).collect() };
        let first = text(b"first version ");
        std::fs::write(&host, &first).unwrap();
        let stale: Vec<Block> = read_blocks_for_test(&first, 128 * 1024);
        let (tx, rx) = sync_channel(stale.len());
        for block in stale {
            let (done, result) = sync_channel(1);
            done.send(block).unwrap();
            tx.send(result).unwrap();
        }
        drop(tx);
        let second = text(b"second, other ");
        std::fs::write(&host, &second).unwrap();
        let _guard = AheadQueue::install(rx);
        let mut fs = FilesystemWriter::default();
        fs.set_kind(ImageKind::new_v4_with_const(&COMPRESS_AHEAD, LE_V4_0));
        fs.set_compressor(zstd_compressor(3).unwrap());
        fs.push_file(std::fs::File::open(&host).unwrap(), "f", NodeHeader::new(0o644, 0, 0, 0)).unwrap();
        let img = dir.path().join("c.sqfs");
        fs.write(std::fs::File::create(&img).unwrap()).unwrap();
        let out = dir.path().join("x");
        run("unsquashfs", "squashfs-tools", &["-q", "-n", "-d", out.to_str().unwrap(), img.to_str().unwrap()]);
        assert!(std::fs::read(out.join("f")).unwrap() == second, "stale blocks were written");
    }

    /// Blocks of `data` as the reading-ahead thread would queue them (all compressed).
    fn read_blocks_for_test(data: &[u8], bs: usize) -> Vec<Block> {
        let fc = zstd_compressor(3).unwrap();
        data.chunks(bs).map(|c| Block { raw: c.to_vec(), packed: DefaultCompressor.compress(c, fc, bs as u32).ok() }).collect()
    }

    #[test]
    fn device_numbers_use_the_linux_encoding() {
        assert_eq!(encode_dev(1, 3).unwrap(), 0x103);
        assert_eq!(encode_dev(8, 0x12345).unwrap(), 0x1230_0845);
        assert!(encode_dev(4096, 0).is_err());
        assert!(encode_dev(0, 1 << 20).is_err());
    }
}
