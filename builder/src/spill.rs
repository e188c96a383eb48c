//! Spill: file contents parked on disk while a root is assembled, so a build's memory does not
//! grow with the root. A Debian kernel package alone unpacks to well over 100 MB; held in memory,
//! the packages of a root were most of a build's peak.
//!
//! One unlinked temporary file per build and architecture, in the build's staging directory
//! (inside the output directory the user named; never `/tmp`, which may be RAM). Contents are
//! appended once and read back by offset, so a file in the tree costs a few words of memory.
//! The file disappears when the last [`Spilled`] range is dropped, or with the process.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Contents smaller than this stay in memory: a spilled range costs a `pread` to read back, and
/// small files (configuration, scripts) are the ones later build steps read and rewrite.
pub const SPILL_MIN: u64 = 16 * 1024;

/// The append-only file contents are spilled to.
#[derive(Debug)]
pub struct Spill {
    file: File,
    /// Where the next range starts.
    end: Mutex<u64>,
}

/// A range of a [`Spill`]: one file's contents.
#[derive(Debug, Clone)]
pub struct Spilled {
    spill: Arc<Spill>,
    offset: u64,
    len: u64,
}

impl Spill {
    /// A new spill file in `dir` (created unlinked: nothing is left behind, even on a crash).
    pub fn create_in(dir: &Path) -> io::Result<Arc<Spill>> {
        let file =
            tempfile::tempfile_in(dir).map_err(|e| io::Error::new(e.kind(), format!("creating a spill file in {}: {e}", dir.display())))?;
        Ok(Arc::new(Spill { file, end: Mutex::new(0) }))
    }

    /// Copies exactly `len` bytes from `reader` into the spill. A reader that ends early is an
    /// error (a truncated archive), not a short file.
    pub fn store(self: &Arc<Self>, reader: &mut dyn Read, len: u64) -> io::Result<Spilled> {
        let offset = {
            let mut end = self.end.lock().expect("spill lock poisoned");
            let offset = *end;
            *end += len;
            offset
        };
        let mut buf = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(buf.len() as u64) as usize;
            let n = reader.read(&mut buf[..want])?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("contents end after {done} of {len} bytes")));
            }
            self.file.write_all_at(&buf[..n], offset + done)?;
            done += n as u64;
        }
        Ok(Spilled { spill: Arc::clone(self), offset, len })
    }
}

impl Spilled {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole contents, read back into memory.
    pub fn read_all(&self) -> io::Result<Vec<u8>> {
        let mut data = vec![0u8; self.len as usize];
        self.spill.file.read_exact_at(&mut data, self.offset)?;
        Ok(data)
    }

    /// A reader over the contents (positioned reads: many may be open at once).
    pub fn reader(&self) -> SpilledReader {
        SpilledReader { range: self.clone(), pos: 0 }
    }
}

/// Reads one [`Spilled`] range from its start.
pub struct SpilledReader {
    range: Spilled,
    pos: u64,
}

impl Read for SpilledReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.range.len - self.pos;
        let want = (buf.len() as u64).min(left) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.range.spill.file.read_at(&mut buf[..want], self.range.offset + self.pos)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the spill file is shorter than a range in it"));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_read_back_exactly_and_independently() {
        let dir = tempfile::tempdir().unwrap();
        let spill = Spill::create_in(dir.path()).unwrap();
        let a: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7) as u8).collect();
        let b = b"second".to_vec();
        let ra = spill.store(&mut &a[..], a.len() as u64).unwrap();
        let rb = spill.store(&mut &b[..], b.len() as u64).unwrap();
        assert_eq!(rb.read_all().unwrap(), b);
        assert_eq!(ra.read_all().unwrap(), a);
        let mut streamed = Vec::new();
        // Small reads cross the 1 MiB copy chunks and must stop at the range's end.
        let mut r = ra.reader();
        let mut chunk = [0u8; 4093];
        loop {
            let n = r.read(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            streamed.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(streamed, a);
        // Nothing visible in the directory: the file is unlinked from the start.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_short_reader_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let spill = Spill::create_in(dir.path()).unwrap();
        let err = spill.store(&mut &b"abc"[..], 10).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("3 of 10"), "{err}");
    }
}
