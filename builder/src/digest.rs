//! sha256 digests as kiln records them (lowercase hex): of bytes, of a file, and of a stream
//! while it is written, so a file just written need not be read back to be hashed.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

/// A run of zeros to hash or write for the holes of a sparse image, 64 KiB at a time.
pub static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Lowercase hex sha256 of bytes.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Lowercase hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut w = HashingWriter::new(io::sink());
    io::copy(&mut File::open(path)?, &mut w)?;
    Ok(w.finish().1)
}

/// HMAC-SHA256 (RFC 2104), fed in pieces: the rollout's report signatures and the
/// authentication of intermediate results kept between builds.
pub struct HmacSha256 {
    inner: Sha256,
    outer_pad: [u8; 64],
}

impl HmacSha256 {
    pub fn new(key: &[u8]) -> HmacSha256 {
        let mut k = [0u8; 64];
        if key.len() > k.len() {
            k[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            k[..key.len()].copy_from_slice(key);
        }
        let pad = |byte: u8| k.map(|b| b ^ byte);
        HmacSha256 { inner: Sha256::new().chain_update(pad(0x36)), outer_pad: pad(0x5c) }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
    }

    pub fn finalize(self) -> [u8; 32] {
        Sha256::new().chain_update(self.outer_pad).chain_update(self.inner.finalize()).finalize().into()
    }
}

/// HMAC-SHA256 of one message.
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new(key);
    mac.update(msg);
    mac.finalize()
}

/// A writer that hashes what passes through it, and counts it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> HashingWriter<W> {
        HashingWriter { inner, hasher: Sha256::new(), len: 0 }
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The inner writer, the hex digest and the byte count.
    pub fn finish(self) -> (W, String, u64) {
        (self.inner, hex::encode(self.hasher.finalize()), self.len)
    }
}

impl<W: Write + Seek> HashingWriter<W> {
    /// Moves on to `offset` (at or after what was written) over a hole: the skipped bytes are
    /// hashed as zeros and not written, so `inner` must read back zeros there (a fresh sparse
    /// file does).
    pub fn zeros_to(&mut self, offset: u64) -> io::Result<()> {
        if offset < self.len {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("offset {offset} is before the {} bytes written", self.len)));
        }
        let gap = offset - self.len;
        let mut left = gap;
        while left > 0 {
            let n = left.min(ZEROS.len() as u64) as usize;
            self.hasher.update(&ZEROS[..n]);
            left -= n as u64;
        }
        self.inner.seek(SeekFrom::Current(gap as i64))?;
        self.len = offset;
        Ok(())
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_ways_agree() -> io::Result<()> {
        let data = b"kiln".repeat(100_000);
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f");
        let mut w = HashingWriter::new(File::create(&path)?);
        for chunk in data.chunks(7_000) {
            w.write_all(chunk)?;
        }
        let (_, streamed, len) = w.finish();
        assert_eq!(len, data.len() as u64);
        assert_eq!(streamed, sha256_hex(&data));
        assert_eq!(sha256_file(&path)?, streamed);
        assert_eq!(sha256_hex(b""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        Ok(())
    }

    #[test]
    fn holes_hash_as_the_zeros_a_sparse_file_reads_back() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("sparse");
        let f = File::create(&path)?;
        f.set_len(300_000)?;
        let mut w = HashingWriter::new(f);
        w.write_all(b"head")?;
        w.zeros_to(100_000)?;
        w.write_all(b"middle")?;
        w.zeros_to(300_000)?;
        assert!(w.zeros_to(5).is_err(), "going back is refused");
        let (_, digest, len) = w.finish();
        assert_eq!(len, 300_000);
        assert_eq!(digest, sha256_file(&path)?);
        Ok(())
    }
}
