//! The small part of HTTP/1.1 that `kiln serve` speaks: one request per connection
//! (`Connection: close`), request line and headers parsed into [`Request`], a single
//! `Range: bytes=` range resolved against a file length.

use std::io::{BufRead, Read};

/// Longest request line or header line accepted; iPXE and wget send short ones.
const MAX_LINE: usize = 8192;
/// Most headers accepted in one request.
const MAX_HEADERS: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The percent-decoded path, without the query.
    pub path: String,
    /// Query parameters, percent-decoded, in order.
    pub query: Vec<(String, String)>,
    pub host: Option<String>,
    pub range: Option<String>,
}

impl Request {
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Why a request could not be parsed; answered with 400.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

/// The message of a connection closed before it sent anything (a port probe): not logged.
pub const CLOSED_EMPTY: &str = "connection closed before the request ended";

/// Reads the request head (request line and headers) from a connection. Bodies are not read:
/// the only POST kiln serves carries its data in the query.
pub fn read_request(r: &mut impl BufRead) -> Result<Request, BadRequest> {
    let line = read_line(r)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(BadRequest(format!("malformed request line `{}`", line.escape_debug())));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(BadRequest(format!("unsupported protocol `{}`", version.escape_debug())));
    }
    let (raw_path, raw_query) = target.split_once('?').unwrap_or((target, ""));
    let path = percent_decode(raw_path).ok_or_else(|| BadRequest("bad percent-encoding in the path".into()))?;
    let mut query = Vec::new();
    for pair in raw_query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(&k.replace('+', " ")).ok_or_else(|| BadRequest("bad percent-encoding in the query".into()))?;
        let v = percent_decode(&v.replace('+', " ")).ok_or_else(|| BadRequest("bad percent-encoding in the query".into()))?;
        query.push((k, v));
    }
    let mut req = Request { method: method.to_string(), path, query, host: None, range: None };
    for _ in 0..MAX_HEADERS {
        let h = read_line(r)?;
        if h.is_empty() {
            return Ok(req);
        }
        if let Some((name, value)) = h.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "host" => req.host = Some(value.trim().to_string()),
                "range" => req.range = Some(value.trim().to_string()),
                _ => {}
            }
        }
    }
    Err(BadRequest(format!("more than {MAX_HEADERS} headers")))
}

fn read_line(r: &mut impl BufRead) -> Result<String, BadRequest> {
    let mut buf = Vec::new();
    let n = r.take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf).map_err(|e| BadRequest(format!("reading the request: {e}")))?;
    if n == 0 {
        return Err(BadRequest(CLOSED_EMPTY.into()));
    }
    if !buf.ends_with(b"\n") {
        return Err(BadRequest(format!("request line or header longer than {MAX_LINE} bytes")));
    }
    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        buf.pop();
    }
    String::from_utf8(buf).map_err(|_| BadRequest("request head is not UTF-8".into()))
}

/// `%XX` decoding; `None` for a truncated or non-hex escape or a result that is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// What a `Range` header asks of a file of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No usable range (absent, not `bytes=`, or several ranges): the whole file, 200.
    Whole,
    /// Bytes `start..=end`, 206.
    Part { start: u64, end: u64 },
    /// Outside the file, 416.
    Unsatisfiable,
}

/// Resolves a single `bytes=a-b`, `bytes=a-` or `bytes=-n` range (RFC 9110 14.1.2). Multi-range
/// requests are answered with the whole file, which the RFC allows.
pub fn resolve_range(header: Option<&str>, len: u64) -> RangeAnswer {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeAnswer::Whole;
    };
    if spec.contains(',') {
        return RangeAnswer::Whole;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAnswer::Whole;
    };
    let (a, b) = (a.trim(), b.trim());
    let parse = |s: &str| s.parse::<u64>().ok();
    match (a.is_empty(), b.is_empty()) {
        // Suffix: the last n bytes.
        (true, false) => match parse(b) {
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(n) if len > 0 => RangeAnswer::Part { start: len.saturating_sub(n), end: len - 1 },
            Some(_) => RangeAnswer::Unsatisfiable,
            None => RangeAnswer::Whole,
        },
        (false, _) => {
            let Some(start) = parse(a) else { return RangeAnswer::Whole };
            let end = if b.is_empty() { Some(u64::MAX) } else { parse(b) };
            match end {
                None => RangeAnswer::Whole,
                Some(end) if end < start => RangeAnswer::Whole,
                Some(_) if start >= len => RangeAnswer::Unsatisfiable,
                Some(end) => RangeAnswer::Part { start, end: end.min(len - 1) },
            }
        }
        (true, true) => RangeAnswer::Whole,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_request_line_query_and_headers() {
        let raw = b"GET /boot.ipxe?mac=52%3A54%3A00%3A12%3A34%3A56&arch=x86_64 HTTP/1.1\r\nHost: 10.0.2.2:8080\r\nrange: bytes=0-9\r\n\r\n";
        let req = read_request(&mut &raw[..]).unwrap();
        assert_eq!(req.method, "GET");
        assert_eq!(req.path, "/boot.ipxe");
        assert_eq!(req.param("mac"), Some("52:54:00:12:34:56"));
        assert_eq!(req.param("arch"), Some("x86_64"));
        assert_eq!(req.host.as_deref(), Some("10.0.2.2:8080"));
        assert_eq!(req.range.as_deref(), Some("bytes=0-9"));
    }

    #[test]
    fn refuses_malformed_requests() {
        for raw in [&b"GET /\r\n\r\n"[..], b"GET / SPDY/3\r\n\r\n", b"GET /%zz HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n", b""] {
            assert!(read_request(&mut &raw[..]).is_err(), "{}", String::from_utf8_lossy(raw));
        }
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_LINE + 10));
        assert!(read_request(&mut long.as_bytes()).is_err());
    }

    #[test]
    fn ranges() {
        use RangeAnswer::*;
        assert_eq!(resolve_range(None, 100), Whole);
        assert_eq!(resolve_range(Some("bytes=0-9"), 100), Part { start: 0, end: 9 });
        assert_eq!(resolve_range(Some("bytes=90-"), 100), Part { start: 90, end: 99 });
        assert_eq!(resolve_range(Some("bytes=90-1000"), 100), Part { start: 90, end: 99 });
        assert_eq!(resolve_range(Some("bytes=-10"), 100), Part { start: 90, end: 99 });
        assert_eq!(resolve_range(Some("bytes=-1000"), 100), Part { start: 0, end: 99 });
        assert_eq!(resolve_range(Some("bytes=100-"), 100), Unsatisfiable);
        assert_eq!(resolve_range(Some("bytes=-0"), 100), Unsatisfiable);
        assert_eq!(resolve_range(Some("bytes=0-"), 0), Unsatisfiable);
        assert_eq!(resolve_range(Some("bytes=5-2"), 100), Whole);
        assert_eq!(resolve_range(Some("bytes=0-1,5-6"), 100), Whole);
        assert_eq!(resolve_range(Some("items=0-1"), 100), Whole);
    }
}
