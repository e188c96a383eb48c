//! Compressed disk images (`disk.img.zst`, `disk.img.xz`): a streaming compressor to write them
//! in one sequential pass, and decompressing readers chosen by file extension for `kiln flash`.
//!
//! Levels: zstd 3 and xz preset 6, single-threaded. The root partition is already a zstd
//! squashfs, so higher levels buy little on a kiln image; the unmapped space is zeros, which both
//! formats compress at memory speed. (zstd's multithreaded mode needs the `zstdmt` build of the C
//! library; not worth a second build of zstd-sys for that.)

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::Path;

use anyhow::{Context, Result};

/// zstd's default level: the root partition inside a disk image is zstd squashfs already, so
/// higher levels shrink little and cost much.
pub const ZSTD_LEVEL: i32 = 3;
/// xz preset 3: its encoder needs ~32 MiB against preset 6's ~94 MiB, which would take a build
/// writing `disk.img.xz` past kiln's 256 MiB memory bound (measured: 236 MiB peak with preset 6
/// for the quickstart); the already-compressed root gains little from a larger dictionary.
pub const XZ_PRESET: u32 = 3;

/// How an image file is compressed, known from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
    Xz,
}

impl Compression {
    /// `.zst` is zstd, `.xz` is xz, anything else is a raw image.
    pub fn from_path(path: &Path) -> Compression {
        match path.extension().and_then(|e| e.to_str()) {
            Some("zst") => Compression::Zstd,
            Some("xz") => Compression::Xz,
            _ => Compression::None,
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Zstd => "zst",
            Compression::Xz => "xz",
        }
    }
}

/// A `Write` that compresses what is written to it sequentially; `finish` writes the end of the
/// stream and returns the inner writer.
pub enum Compressor<W: Write> {
    None(W),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Xz(liblzma::write::XzEncoder<W>),
}

impl<W: Write> Compressor<W> {
    /// `size`, when known, is recorded in the zstd frame header (`zstd -l` shows it).
    pub fn new(c: Compression, inner: W, size: Option<u64>) -> std::io::Result<Compressor<W>> {
        Ok(match c {
            Compression::None => Compressor::None(inner),
            Compression::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(inner, ZSTD_LEVEL)?;
                e.include_checksum(true)?;
                e.set_pledged_src_size(size)?;
                Compressor::Zstd(e)
            }
            Compression::Xz => Compressor::Xz(liblzma::write::XzEncoder::new(inner, XZ_PRESET)),
        })
    }

    pub fn finish(self) -> std::io::Result<W> {
        match self {
            Compressor::None(w) => Ok(w),
            Compressor::Zstd(e) => e.finish(),
            Compressor::Xz(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Compressor::None(w) => w.write(buf),
            Compressor::Zstd(e) => e.write(buf),
            Compressor::Xz(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Compressor::None(w) => w.flush(),
            Compressor::Zstd(e) => e.flush(),
            Compressor::Xz(e) => e.flush(),
        }
    }
}

/// Opens an image for reading, decompressing by its extension (`.zst`, `.xz`, else raw).
pub fn open_image(path: &Path) -> Result<Box<dyn Read + Send>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(match Compression::from_path(path) {
        Compression::None => Box::new(BufReader::with_capacity(1 << 20, f)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(f).with_context(|| format!("starting to decompress {}", path.display()))?)
        }
        // Multi-stream: `xz -T` and pixz write several concatenated streams.
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(BufReader::with_capacity(1 << 20, f))),
    })
}

/// Writes `out`, the whole of the (sparse) disk image `image` compressed as `c`, in one pass:
/// the byte ranges `mapped` are read from the image, everything else is written as zeros without
/// reading it. `mapped` must cover every non-zero byte (the ranges a bmap lists do).
pub fn compress_sparse_image(image: &Path, mapped: &[Range<u64>], out: &Path, c: Compression) -> Result<()> {
    let mut src = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let size = src.metadata().with_context(|| format!("reading the size of {}", image.display()))?.len();
    let dst = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = Compressor::new(c, BufWriter::with_capacity(1 << 20, dst), Some(size))?;
    let ctx = || format!("compressing {} into {}", image.display(), out.display());
    let mut ranges: Vec<Range<u64>> = mapped.iter().map(|r| r.start.min(size)..r.end.min(size)).filter(|r| r.start < r.end).collect();
    ranges.sort_by_key(|r| r.start);
    let zeros = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    let fill_zeros = |w: &mut Compressor<_>, mut n: u64| -> std::io::Result<()> {
        while n > 0 {
            let k = n.min(zeros.len() as u64) as usize;
            w.write_all(&zeros[..k])?;
            n -= k as u64;
        }
        Ok(())
    };
    for r in ranges {
        let start = r.start.max(pos);
        if start >= r.end {
            continue; // overlapped by the previous range
        }
        fill_zeros(&mut w, start - pos).with_context(ctx)?;
        src.seek(SeekFrom::Start(start)).with_context(ctx)?;
        let mut left = r.end - start;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            src.read_exact(&mut buf[..k]).with_context(ctx)?;
            w.write_all(&buf[..k]).with_context(ctx)?;
            left -= k as u64;
        }
        pos = r.end;
    }
    fill_zeros(&mut w, size - pos).with_context(ctx)?;
    let mut inner = w.finish().with_context(ctx)?;
    inner.flush().with_context(ctx)?;
    inner.into_inner().map_err(|e| e.into_error()).with_context(ctx)?.sync_all().with_context(ctx)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(dir: &Path) -> (std::path::PathBuf, Vec<Range<u64>>) {
        let p = dir.join("disk.img");
        let mut f = File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(&[7u8; 10000]).unwrap();
        f.seek(SeekFrom::Start(5 << 20)).unwrap();
        f.write_all(b"root").unwrap();
        (p, vec![5 << 20..(5 << 20) + 4096, 0..16384])
    }

    #[test]
    fn sparse_image_compresses_and_decompresses_to_the_same_bytes() {
        let d = tempfile::tempdir().unwrap();
        let (img, mapped) = image(d.path());
        for c in [Compression::Zstd, Compression::Xz, Compression::None] {
            let out = d.path().join(format!("disk.img.{}", if c == Compression::None { "raw" } else { c.extension() }));
            compress_sparse_image(&img, &mapped, &out, c).unwrap();
            assert_eq!(Compression::from_path(&out), c);
            let mut back = Vec::new();
            open_image(&out).unwrap().read_to_end(&mut back).unwrap();
            assert!(back == std::fs::read(&img).unwrap(), "{c:?} round trip differs");
            if c != Compression::None {
                assert!(std::fs::metadata(&out).unwrap().len() < 64 << 10, "{c:?} output is not small");
            }
        }
    }

    /// The files are what the command-line tools read.
    #[test]
    fn zstd_and_xz_tools_read_the_output() {
        let d = tempfile::tempdir().unwrap();
        let (img, mapped) = image(d.path());
        let want = std::fs::read(&img).unwrap();
        for (c, tool) in [(Compression::Zstd, "zstd"), (Compression::Xz, "xz")] {
            let out = d.path().join(format!("disk.img.{}", c.extension()));
            compress_sparse_image(&img, &mapped, &out, c).unwrap();
            match std::process::Command::new(tool).arg("-dc").arg(&out).output() {
                Ok(o) => assert!(o.status.success() && o.stdout == want, "{tool} -dc differs"),
                Err(_) => eprintln!("skipped {tool}: not installed"),
            }
        }
    }
}
