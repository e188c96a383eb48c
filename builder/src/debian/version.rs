//! Debian version comparison (`[epoch:]upstream[-revision]`), following dpkg's `verrevcmp`.

use std::cmp::Ordering;

/// Compares two Debian version strings the way `dpkg --compare-versions` does.
///
/// Never fails: malformed versions are still ordered (by the same character rules), because a
/// resolver must be total over whatever an index contains.
pub fn compare(a: &str, b: &str) -> Ordering {
    let (ea, ua, ra) = split(a.trim());
    let (eb, ub, rb) = split(b.trim());
    compare_digit_runs(ea, eb).then_with(|| verrevcmp(ua, ub)).then_with(|| verrevcmp(ra, rb))
}

/// Splits into (epoch, upstream, revision). A missing epoch is "0"; a missing revision is ""
/// (dpkg orders "" and "0" equal, which `verrevcmp` does by itself).
fn split(v: &str) -> (&str, &str, &str) {
    let (epoch, rest) = match v.split_once(':') {
        Some((e, rest)) if !e.is_empty() && e.bytes().all(|c| c.is_ascii_digit()) => (e, rest),
        _ => ("0", v),
    };
    match rest.rsplit_once('-') {
        Some((upstream, revision)) => (epoch, upstream, revision),
        None => (epoch, rest, ""),
    }
}

/// dpkg's character weight in non-digit runs: `~` before the end of the string, the end before
/// letters, letters before everything else.
fn weight(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(b'~') => -1,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(c) => i32::from(c) + 256,
    }
}

/// Alternating non-digit / digit runs; digit runs compare numerically (any length, no overflow).
fn verrevcmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    while !a.is_empty() || !b.is_empty() {
        // Non-digit prefix, character by character.
        while a.first().is_some_and(|c| !c.is_ascii_digit()) || b.first().is_some_and(|c| !c.is_ascii_digit()) {
            let (wa, wb) = (weight(a.first().copied()), weight(b.first().copied()));
            if wa != wb {
                return wa.cmp(&wb);
            }
            a = &a[1.min(a.len())..];
            b = &b[1.min(b.len())..];
        }
        let (da, rest_a) = take_digits(a);
        let (db, rest_b) = take_digits(b);
        let ord = compare_digit_runs(da, db);
        if ord != Ordering::Equal {
            return ord;
        }
        a = rest_a;
        b = rest_b;
    }
    Ordering::Equal
}

fn take_digits(s: &[u8]) -> (&[u8], &[u8]) {
    let n = s.iter().take_while(|c| c.is_ascii_digit()).count();
    s.split_at(n)
}

/// Numeric comparison of two digit strings of any length ("" counts as 0).
fn compare_digit_runs(a: impl AsRef<[u8]>, b: impl AsRef<[u8]>) -> Ordering {
    fn strip(s: &[u8]) -> &[u8] {
        let zeros = s.iter().take_while(|c| **c == b'0').count();
        &s[zeros..]
    }
    let (a, b) = (strip(a.as_ref()), strip(b.as_ref()));
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering::{Equal, Greater, Less};

    const CASES: &[(&str, &str, Ordering)] = &[
        ("1.0~rc1", "1.0", Less),
        ("1.0~rc1", "1.0~rc2", Less),
        ("1.0~~", "1.0~", Less),
        ("1.0~", "1.0", Less),
        ("1.0", "1.0a", Less),
        ("1.0a", "1.0+", Less),
        ("1:0.1", "2.0", Greater),
        ("0:1.0", "1.0", Equal),
        ("1.0", "1.0-0", Equal),
        ("1.0-1", "1.0-1.1", Less),
        ("2.30-1+deb12u1", "2.30-1", Greater),
        ("2.41-12", "2.41-9", Greater),
        ("1.10", "1.9", Greater),
        ("1.010", "1.10", Equal),
        ("1.2.3", "1.2", Greater),
        ("6.12.38-1", "6.12.41-1", Less),
        ("1.36.1-9", "1:1.36.1-1", Less),
        ("2.0-1~bpo12+1", "2.0-1", Less),
        ("1.0-1ubuntu1", "1.0-1", Greater),
        ("99999999999999999999", "99999999999999999998", Greater),
        ("1.0a", "1.0b", Less),
        ("1.0-a-1", "1.0-a", Greater),
    ];

    #[test]
    fn table() {
        for (a, b, want) in CASES {
            assert_eq!(compare(a, b), *want, "{a} vs {b}");
            assert_eq!(compare(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    /// Cross-check the table with dpkg itself (every Debian host has it; a missing dpkg fails loudly).
    #[test]
    fn agrees_with_dpkg() {
        for (a, b, want) in CASES {
            let op = match want {
                Less => "lt",
                Equal => "eq",
                Greater => "gt",
            };
            let status = std::process::Command::new("dpkg")
                .args(["--compare-versions", a, op, b])
                .status()
                .expect("`dpkg` not found: this test needs the `dpkg` package");
            assert!(status.success(), "dpkg disagrees: {a} {op} {b}");
        }
    }
}
