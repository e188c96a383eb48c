//! The initramfs kiln writes itself: static busybox, the storage and filesystem modules needed to
//! find the root (a dependency closure computed from `.modinfo`), the list to load them in order,
//! and kiln's `/init` (from `overlays/initramfs/`). Packed as cpio newc, zstd-compressed.

use anyhow::{bail, Context, Result};

use crate::kmod::ModuleSet;
use crate::platform::Platform;
use crate::tree::{Content, Entry, Kind, Meta, Tree, TreePath};

/// Present in the initramfs when the profile has `debug.rescue_shell: true`: `/init`'s `fail`
/// (`overlays/initramfs/lib/kiln/fail.sh`) then leaves a shell instead of rebooting.
pub const RESCUE_SHELL: &str = "lib/kiln/rescue-shell";

/// What went into an initramfs, for the build log and manifest.
pub struct Initramfs {
    pub tree: Tree,
    /// Modules in load order (names).
    pub modules: Vec<String>,
    /// Optional platform modules this kernel does not have (neither module nor built in).
    pub absent: Vec<String>,
}

/// Assembles the initramfs tree from the (already unpacked) appliance root. `extra_modules` are
/// required (the profile's `kernel.modules`), `extra_optional` are taken when the kernel has them
/// (the netboot installer's NIC drivers).
pub fn assemble(
    root: &Tree,
    modules: &ModuleSet,
    platform: &Platform,
    extra_modules: &[String],
    extra_optional: &[String],
) -> Result<Initramfs> {
    let mut tree = Tree::new();
    for dir in ["bin", "dev", "proc", "sys", "run", "etc/kiln", "lib/modules", "newroot", "lower", "rw"] {
        tree.add_dir(dir, 0o755)?;
    }
    crate::setup::add_console_nodes(&mut tree)?;

    let busybox = match root.get_str(crate::busybox::BUSYBOX).map(|e| &e.kind) {
        Some(Kind::File(c)) => c.clone(),
        _ => bail!("/{} is missing from the root: the initramfs needs `busybox-static`", crate::busybox::BUSYBOX),
    };
    tree.insert(&TreePath::parse("bin/busybox")?, Entry { meta: Meta::root(0o755), kind: Kind::File(busybox.clone()) })?;
    for applet in crate::busybox::applets(&busybox.read()?)? {
        if applet != "busybox" {
            tree.add_symlink(&format!("bin/{applet}"), "busybox")?;
        }
    }

    let init = crate::assets::overlay("initramfs")?;
    tree.merge(&init)?;
    copy_console_policy(root, &mut tree)?;

    // Required modules must exist (or be built in); optional ones are taken when present.
    let required: Vec<&str> = platform.initramfs_modules.required.iter().chain(extra_modules.iter()).map(String::as_str).collect();
    let optional: Vec<&str> = platform.initramfs_modules.optional.iter().chain(extra_optional).map(String::as_str).collect();
    let (req, _) = modules
        .closure(&required, false)
        .with_context(|| format!("initramfs modules of platform `{}` and `kernel.modules`", platform.name))?;
    let (opt, absent) = modules.closure(&optional, true)?;

    let mut order: Vec<String> = Vec::new();
    let mut names = Vec::new();
    for m in req.into_iter().chain(opt) {
        if order.contains(&m.rel) {
            continue;
        }
        let content = match root.get(&m.path).map(|e| &e.kind) {
            Some(Kind::File(c)) => c.clone(),
            _ => bail!("module {} listed but missing at {}", m.name, m.path),
        };
        tree.insert(&TreePath::parse(&format!("lib/modules/{}", m.rel))?, Entry { meta: Meta::root(0o644), kind: Kind::File(content) })?;
        order.push(m.rel.clone());
        names.push(m.name.clone());
    }
    let mut list = order.join("\n");
    list.push('\n');
    tree.insert(
        &TreePath::parse("etc/kiln/modules")?,
        Entry { meta: Meta::root(0o644), kind: Kind::File(Content::bytes(list.into_bytes())) },
    )?;
    Ok(Initramfs { tree, modules: names, absent })
}

/// The console policy follows the root the initramfs boots (`debug.rescue_shell`, written by
/// `provision`): one setting, so the initramfs and the appliance cannot disagree.
fn copy_console_policy(root: &Tree, initramfs: &mut Tree) -> Result<()> {
    if let Some(Entry { kind: Kind::File(c), .. }) = root.get_str(crate::provision::RESCUE_SHELL) {
        initramfs.insert(&TreePath::parse(RESCUE_SHELL)?, Entry { meta: Meta::root(0o644), kind: Kind::File(c.clone()) })?;
    }
    Ok(())
}

/// How the initramfs is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZstdSettings {
    /// zstd level, 1..=19.
    pub level: i32,
    /// Worker threads; 0 compresses on the calling thread (zstd's single-threaded mode, whose
    /// output differs from the multi-threaded mode's).
    pub workers: u32,
    /// Bytes per multi-threaded job (ignored without workers). Fixed rather than zstd's default,
    /// which is derived from the level and larger than an initramfs (one job, one busy core).
    pub job_size: u32,
}

/// What kiln uses, chosen by measurement (docs/benchmarks.md, "Initramfs compression"): an
/// initramfs is mostly modules that are already xz-compressed, so level 9 is within 5% of level
/// 19's size at a twentieth of the time, and two workers were slower than one on a busy 2-core
/// host (and double the memory). No workers, so the output is zstd's single-threaded stream,
/// the same on every host. (Multi-threaded output would also be the same for any number of
/// workers at a fixed job size: a test checks it, should a later measurement choose workers.)
pub const ZSTD: ZstdSettings = ZstdSettings { level: 9, workers: 0, job_size: 2 << 20 };

/// A zstd stream encoder with `settings` and kiln's table sizes, writing to `out`.
pub fn zstd_encoder<W: std::io::Write>(out: W, settings: &ZstdSettings) -> Result<zstd::stream::Encoder<'static, W>> {
    use zstd::zstd_safe::CParameter;
    let mut zst = zstd::stream::Encoder::new(out, settings.level).context("starting the initramfs compressor")?;
    // From level 16 up zstd's own tables (a 64 MiB chain table at 19) were the largest part of a
    // build's peak memory; smaller chain and hash tables cost 0.6% in size on kiln's initramfs
    // and saved 57 MB (each worker has its own tables). Lower levels have smaller ones.
    if settings.level >= 16 {
        zst.set_parameter(CParameter::ChainLog(22)).context("setting the zstd chain log")?;
        zst.set_parameter(CParameter::HashLog(21)).context("setting the zstd hash log")?;
    }
    if settings.workers > 0 {
        zst.multithread(settings.workers).context("starting the initramfs compression threads")?;
        zst.set_parameter(CParameter::JobSize(settings.job_size)).context("setting the zstd job size")?;
    }
    Ok(zst)
}

/// cpio newc + zstd: what the kernel unpacks (Debian kernels have CONFIG_RD_ZSTD).
pub fn pack(tree: &Tree, mtime: u32) -> Result<Vec<u8>> {
    pack_with(tree, mtime, &ZSTD)
}

/// [`pack`], taking the compressed archive an earlier build kept for the same cpio bytes
/// (`crate::reuse`, keyed by the cpio's sha256): compressing is most of the initramfs's time,
/// writing the cpio to hash it a small part. A kept archive is used only if it decompresses to
/// exactly those bytes.
pub fn pack_reusing(tree: &Tree, mtime: u32, reuse: &crate::reuse::Reuse) -> Result<Vec<u8>> {
    if !reuse.enabled() {
        return pack(tree, mtime);
    }
    let mut hashed = crate::digest::HashingWriter::new(std::io::sink());
    crate::cpio::write_newc(tree, &mut hashed, mtime).context("writing the initramfs cpio archive")?;
    let (_, key, _) = hashed.finish();
    let kind = reuse_kind(&ZSTD);
    if let Some(kept) = reuse.get(&kind, &key).filter(|kept| decompresses_to(kept, &key)) {
        return Ok(kept);
    }
    let packed = pack(tree, mtime)?;
    reuse.put(&kind, &key, &packed);
    Ok(packed)
}

/// The kind of kept initramfs: everything about the compressor that shapes its bytes.
fn reuse_kind(settings: &ZstdSettings) -> String {
    format!("initramfs-zstd{}-l{}-w{}-j{}", zstd::zstd_safe::version_number(), settings.level, settings.workers, settings.job_size)
}

/// Whether zstd data decompresses to bytes with this sha256.
fn decompresses_to(packed: &[u8], sha256: &str) -> bool {
    let mut hashed = crate::digest::HashingWriter::new(std::io::sink());
    let copied = zstd::stream::read::Decoder::new(packed).and_then(|mut d| std::io::copy(&mut d, &mut hashed));
    copied.is_ok() && hashed.finish().1 == sha256
}

fn pack_with(tree: &Tree, mtime: u32, settings: &ZstdSettings) -> Result<Vec<u8>> {
    let mut zst = zstd_encoder(Vec::new(), settings)?;
    // The cpio archive streams into the compressor rather than being held whole.
    crate::cpio::write_newc(tree, &mut zst, mtime).context("writing the initramfs cpio archive")?;
    zst.finish().context("compressing the initramfs")
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_kept_initramfs_is_used_only_if_it_holds_the_same_archive() {
        let mut tree = Tree::new();
        tree.add_file("init", 0o755, sample()).unwrap();
        let fresh = pack(&tree, 1).unwrap();
        let d = tempfile::tempdir().unwrap();
        let reuse = crate::reuse::Reuse::with_key(d.path(), [9; 32]);
        assert!(pack_reusing(&tree, 1, &reuse).unwrap() == fresh, "the first pack differs");
        assert!(pack_reusing(&tree, 1, &crate::reuse::Reuse::disabled()).unwrap() == fresh);
        // Its key: the file below the kind's directory.
        let kind = d.path().join("reuse").join(reuse_kind(&ZSTD));
        let shard = std::fs::read_dir(&kind).unwrap().next().unwrap().unwrap().path();
        let file = std::fs::read_dir(shard).unwrap().next().unwrap().unwrap().path();
        let key = file.file_name().unwrap().to_str().unwrap();
        // Another compression of the same archive is used (which shows the kept value is read)...
        let mut cpio = Vec::new();
        crate::cpio::write_newc(&tree, &mut cpio, 1).unwrap();
        let other = zstd::bulk::compress(&cpio, 1).unwrap();
        reuse.put(&reuse_kind(&ZSTD), key, &other);
        assert!(pack_reusing(&tree, 1, &reuse).unwrap() == other, "the kept archive was not used");
        // ...one of other bytes is not.
        reuse.put(&reuse_kind(&ZSTD), key, &zstd::bulk::compress(b"planted", 1).unwrap());
        assert!(pack_reusing(&tree, 1, &reuse).unwrap() == fresh, "a planted archive was used");
    }
    use super::*;
    use std::io::Write;

    /// Compressible but not trivially so: a few MiB of varied text.
    fn sample() -> Vec<u8> {
        let mut seed = 7u64;
        let words: [&[u8]; 6] = [b"module ", b"busybox ", b"kiln ", b"initramfs\n", b"0x1f2e ", b"/lib/modules/"];
        let mut v = Vec::new();
        while v.len() < 5 << 20 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            v.extend_from_slice(words[(seed % 6) as usize]);
            v.extend_from_slice(&seed.to_le_bytes()[..(seed % 3) as usize]);
        }
        v
    }

    fn compress(data: &[u8], settings: &ZstdSettings, chunk: usize) -> Vec<u8> {
        let mut z = zstd_encoder(Vec::new(), settings).unwrap();
        for part in data.chunks(chunk) {
            z.write_all(part).unwrap();
        }
        z.finish().unwrap()
    }

    #[test]
    fn output_depends_on_the_settings_not_on_how_the_archive_is_written() {
        let data = sample();
        let st = compress(&data, &ZSTD, 1 << 20);
        assert_eq!(compress(&data, &ZSTD, 4093), st, "kiln's settings: the stream's write sizes changed the output");
        assert_eq!(zstd::decode_all(&st[..]).unwrap(), data);
        // Multi-threaded: the same bytes for any number of workers (and write sizes), so pinning
        // the job size is what matters; it differs from the single-threaded stream.
        let mt = |workers, chunk| compress(&data, &ZstdSettings { level: 3, workers, job_size: 1 << 20 }, chunk);
        let two = mt(2, 1 << 20);
        for (workers, chunk) in [(1, 1 << 20), (3, 4093), (2, 65536)] {
            assert!(mt(workers, chunk) == two, "{workers} workers, writes of {chunk}: different output");
        }
        assert!(two != compress(&data, &ZstdSettings { level: 3, workers: 0, job_size: 1 << 20 }, 1 << 20));
        assert_eq!(zstd::decode_all(&two[..]).unwrap(), data);
    }

    #[test]
    fn the_rescue_shell_marker_follows_the_root() {
        let mut root = Tree::new();
        let mut initramfs = Tree::new();
        copy_console_policy(&root, &mut initramfs).unwrap();
        assert!(!initramfs.contains(RESCUE_SHELL), "no console shell unless the root has one");
        root.add_file(crate::provision::RESCUE_SHELL, 0o644, "# on\n").unwrap();
        copy_console_policy(&root, &mut initramfs).unwrap();
        assert!(initramfs.contains(RESCUE_SHELL));
    }
}
