//! `Size`: a byte count as profiles and the CLI write it (`2GiB`, `512M`, `1073741824`), with
//! its parsing, display and serde form. A leaf: used by the profile (`disk`, `install.min_size`)
//! and by `qemu` (`kiln run --disk FILE:SIZE`).

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

/// A byte size: a number with an optional unit `K`/`KiB`, `M`/`MiB`, `G`/`GiB` (all powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, JsonSchema)]
#[serde(into = "String")]
#[schemars(with = "String")]
pub struct Size(pub u64);

impl From<Size> for String {
    fn from(s: Size) -> String {
        s.to_string()
    }
}

/// Bytes in binary units with one decimal, for people ("29.8 GiB", "512 bytes").
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b != 0 && b % (1 << 30) == 0 {
            write!(f, "{}GiB", b >> 30)
        } else if b != 0 && b % (1 << 20) == 0 {
            write!(f, "{}MiB", b >> 20)
        } else {
            write!(f, "{b}")
        }
    }
}

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size (examples: 2GiB, 512MiB, 1073741824)"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "K" | "KiB" | "k" => 1 << 10,
            "M" | "MiB" => 1 << 20,
            "G" | "GiB" => 1 << 30,
            "T" | "TiB" => 1 << 40,
            u => return Err(format!("unknown size unit `{u}` in `{s}` (use KiB, MiB, GiB or TiB)")),
        };
        n.checked_mul(mult).map(Size).ok_or_else(|| format!("size `{s}` is too large"))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_display() {
        assert_eq!("2GiB".parse::<Size>().unwrap(), Size(2 << 30));
        assert_eq!("512M".parse::<Size>().unwrap(), Size(512 << 20));
        assert!("12 parsecs".parse::<Size>().is_err());
        assert_eq!(
            (Size(2 << 30).to_string(), Size(512 << 20).to_string(), Size(1000).to_string()),
            ("2GiB".into(), "512MiB".into(), "1000".into())
        );
    }
}
