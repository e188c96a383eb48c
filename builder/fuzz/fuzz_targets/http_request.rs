//! `serve::http::read_request` (the head of a request from any network peer) on arbitrary bytes,
//! then the range and boot-script checks on whatever it accepts: errors are fine, panics are
//! not, an accepted head stays within the parser's size limit, and a byte range it resolves lies
//! inside the file.
#![no_main]

use kiln::serve::http::{self, RangeAnswer};
use kiln::serve::{ipxe, state};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = http::read_request(&mut &data[..]) else { return };
    assert!(req.method.len() + req.path.len() <= http::MAX_HEAD, "an accepted head is at most MAX_HEAD bytes");
    for len in [0u64, 1, 1000, u64::MAX] {
        match http::resolve_range(req.range.as_deref(), len) {
            RangeAnswer::Part { start, end } => assert!(start <= end && end < len, "{start}-{end} of {len}"),
            RangeAnswer::Whole | RangeAnswer::Unsatisfiable => {}
        }
    }
    // What `/boot.ipxe` would put into a script is either refused or free of iPXE syntax.
    if let Some(host) = req.host.as_deref().filter(|h| ipxe::host_is_safe(h)) {
        assert!(!host.contains(['$', '&', '|', ' ', '\t', '\r', '\n', '#', '/']), "{host:?}");
    }
    if let Some(mac) = req.param("mac").and_then(state::normalise_mac) {
        assert!(mac.len() == 17 && mac.bytes().all(|b| b.is_ascii_hexdigit() || b == b':'), "{mac:?}");
    }
    let _ = req.param("arch").and_then(ipxe::arch_from_buildarch);
});
