//! The small part of HTTP/1.1 that `kiln serve` speaks: one request per connection
//! (`Connection: close`), request line and headers parsed into [`Request`], a single
//! `Range: bytes=` range resolved against a file length.

use std::io::{BufRead, Read};

/// Longest request line or header line accepted; iPXE and wget send short ones.
const MAX_LINE: usize = 8192;
/// Largest request head (request line plus headers) accepted: a few hundred bytes is usual.
pub const MAX_HEAD: usize = 16 * 1024;
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

/// Why a request head could not be read; each kind has its own answer ([`BadRequest::status`]).
#[derive(Debug, thiserror::Error)]
pub enum BadRequest {
    /// The connection closed before it sent anything (a port probe): not answered, not logged.
    #[error("connection closed before the request started")]
    Closed,
    /// The head did not arrive in time (the reader's deadline ran out): 408.
    #[error("no complete request head in time")]
    TimedOut,
    /// A line or the whole head is over its size limit: 431.
    #[error("{0}")]
    TooLarge(String),
    /// Anything else: 400.
    #[error("{0}")]
    Malformed(String),
}

impl BadRequest {
    /// Status code and reason phrase to answer with (`None`: just close the connection).
    pub fn status(&self) -> Option<(u16, &'static str)> {
        match self {
            BadRequest::Closed => None,
            BadRequest::TimedOut => Some((408, "Request Timeout")),
            BadRequest::TooLarge(_) => Some((431, "Request Header Fields Too Large")),
            BadRequest::Malformed(_) => Some((400, "Bad Request")),
        }
    }
}

fn malformed(why: impl Into<String>) -> BadRequest {
    BadRequest::Malformed(why.into())
}

/// Reads the request head (request line and headers, at most [`MAX_HEAD`] bytes) from a
/// connection. Bodies are not read: the only POST kiln serves carries its data in the query.
/// The caller bounds the time (a reader whose reads time out at a deadline).
pub fn read_request(r: &mut impl BufRead) -> Result<Request, BadRequest> {
    let mut budget = MAX_HEAD;
    let line = read_line(r, &mut budget)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(malformed(format!("malformed request line `{}`", line.escape_debug())));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(malformed(format!("unsupported protocol `{}`", version.escape_debug())));
    }
    let (raw_path, raw_query) = target.split_once('?').unwrap_or((target, ""));
    let path = percent_decode(raw_path).ok_or_else(|| malformed("bad percent-encoding in the path"))?;
    let mut query = Vec::new();
    for pair in raw_query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(&k.replace('+', " ")).ok_or_else(|| malformed("bad percent-encoding in the query"))?;
        let v = percent_decode(&v.replace('+', " ")).ok_or_else(|| malformed("bad percent-encoding in the query"))?;
        query.push((k, v));
    }
    let mut req = Request { method: method.to_string(), path, query, host: None, range: None };
    for _ in 0..MAX_HEADERS {
        let h = read_line(r, &mut budget)?;
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
    Err(BadRequest::TooLarge(format!("more than {MAX_HEADERS} headers")))
}

/// One line of the head, taken from `budget` (the bytes of the head still allowed).
fn read_line(r: &mut impl BufRead, budget: &mut usize) -> Result<String, BadRequest> {
    let mut buf = Vec::new();
    let limit = MAX_LINE.min(*budget);
    let n = r.take(limit as u64 + 1).read_until(b'\n', &mut buf).map_err(|e| match e.kind() {
        // What a read timeout gives on Unix (WouldBlock) or elsewhere (TimedOut).
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => BadRequest::TimedOut,
        _ => malformed(format!("reading the request: {e}")),
    })?;
    if n == 0 {
        return Err(if *budget == MAX_HEAD {
            BadRequest::Closed
        } else {
            malformed("connection closed in the middle of the request head")
        });
    }
    // A line (newline included) of `limit + 1` bytes is over the limit, ended or not.
    if n > limit {
        return Err(if limit < MAX_LINE {
            BadRequest::TooLarge(format!("request head larger than {MAX_HEAD} bytes"))
        } else {
            BadRequest::TooLarge(format!("request line or header longer than {MAX_LINE} bytes"))
        });
    }
    if !buf.ends_with(b"\n") {
        return Err(malformed("connection closed in the middle of the request head"));
    }
    *budget -= n;
    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        buf.pop();
    }
    String::from_utf8(buf).map_err(|_| malformed("request head is not UTF-8"))
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
        assert!(matches!(read_request(&mut long.as_bytes()), Err(BadRequest::TooLarge(_))));
        // Every line within its limit, the head as a whole not.
        let big = format!("GET / HTTP/1.1\r\n{}\r\n", format!("X-A: {}\r\n", "a".repeat(1000)).repeat(17));
        let err = read_request(&mut big.as_bytes()).unwrap_err();
        assert!(matches!(&err, BadRequest::TooLarge(m) if m.contains("16384")), "{err}");
        assert!(matches!(read_request(&mut &b""[..]), Err(BadRequest::Closed)));
        assert!(matches!(read_request(&mut &b"GET / HTTP/1.1\r\nHo"[..]), Err(BadRequest::Malformed(_))));
        // A read that times out (the connection's deadline) is a timeout, not a bad request.
        struct Slow;
        impl Read for Slow {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::WouldBlock.into())
            }
        }
        let err = read_request(&mut std::io::BufReader::new(Slow)).unwrap_err();
        assert!(matches!(err, BadRequest::TimedOut) && err.status() == Some((408, "Request Timeout")));
    }

    /// What a client does to put any text in a path or query: everything but unreserved
    /// characters as `%XX`.
    fn percent_encode(s: &str) -> String {
        s.bytes()
            .map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect()
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A header value as clients send it: visible ASCII with inner spaces, no surrounding space.
        fn header_value() -> impl Strategy<Value = String> {
            "[!-~]([ !-~]{0,40}[!-~])?"
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn read_request_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
                let _ = read_request(&mut &data[..]);
            }

            #[test]
            fn read_request_never_panics_on_near_requests(
                line in "[A-Z]{1,7} /[ -~]{0,60} HTTP/1\\.[01]",
                headers in proptest::collection::vec("[ -~\t\r]{0,80}", 0..8),
                end in "(\r\n){0,2}",
            ) {
                let raw = format!("{line}\r\n{}{end}", headers.join("\r\n"));
                let _ = read_request(&mut raw.as_bytes());
            }

            #[test]
            fn well_formed_requests_round_trip(
                method in "[A-Z]{1,10}",
                segments in proptest::collection::vec(any::<String>(), 0..4),
                query in proptest::collection::vec((any::<String>(), any::<String>()), 0..4),
                host in proptest::option::of(header_value()),
                range in proptest::option::of(header_value()),
                others in proptest::collection::vec(("X-[A-Za-z0-9-]{1,20}", header_value()), 0..6),
                crlf in any::<bool>(),
            ) {
                let path = format!("/{}", segments.join("/"));
                let mut target = segments.iter().map(|s| percent_encode(s)).collect::<Vec<_>>().join("/");
                target.insert(0, '/');
                if !query.is_empty() {
                    target.push('?');
                    target.push_str(&query.iter().map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v))).collect::<Vec<_>>().join("&"));
                }
                let eol = if crlf { "\r\n" } else { "\n" };
                let mut raw = format!("{method} {target} HTTP/1.1{eol}");
                for (name, value) in &others {
                    raw.push_str(&format!("{name}: {value}{eol}"));
                }
                if let Some(h) = &host {
                    raw.push_str(&format!("hOsT:  {h}{eol}"));
                }
                if let Some(r) = &range {
                    raw.push_str(&format!("Range: {r}{eol}"));
                }
                raw.push_str(eol);
                raw.push_str("a body that is never read");
                let req = read_request(&mut raw.as_bytes()).unwrap();
                // Keys that are empty once decoded are still pairs; only empty `&&` pieces are dropped.
                prop_assert_eq!(req, Request { method, path, query, host, range });
            }

            #[test]
            fn percent_decode_never_panics(s in any::<String>(), raw in "[%0-9a-fA-F]{0,12}") {
                let _ = percent_decode(&s);
                let _ = percent_decode(&raw);
            }

            #[test]
            fn percent_decode_inverts_the_encoder(s in any::<String>()) {
                prop_assert_eq!(percent_decode(&percent_encode(&s)), Some(s));
            }
        }
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
