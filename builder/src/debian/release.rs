//! Verifying a suite's `InRelease` (OpenPGP cleartext signature, apt's acceptance rule), parsing
//! the verified text into a [`Release`], and apt's rules for which verified file to accept: the
//! suite asked for, not expired, not older than the copy already held.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use sequoia_openpgp as openpgp;

use openpgp::cert::prelude::*;
use openpgp::parse::stream::{GoodChecksum, MessageLayer, MessageStructure, VerificationError, VerificationHelper, VerifierBuilder};
use openpgp::parse::Parse;
use openpgp::policy::{Policy, StandardPolicy};
use openpgp::types::RevocationStatus;
use openpgp::{Cert, KeyHandle};

use super::packages::{field, field_words, stanzas};

/// The fields of a verified `Release` text kiln uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// `Date:` as written (RFC 2822).
    pub date: String,
    /// `Date:` in seconds since the epoch: kiln's reproducible build time when SOURCE_DATE_EPOCH is unset.
    pub date_unix: Option<u64>,
    pub suite: String,
    pub codename: String,
    /// `Valid-Until:` as written, when the suite sets one (security and updates suites do,
    /// stable does not), and in seconds since the epoch.
    pub valid_until: Option<(String, u64)>,
    pub architectures: Vec<String>,
    pub components: Vec<String>,
    /// Path (`main/binary-arm64/Packages.xz`) -> (sha256 hex, size).
    pub sha256: BTreeMap<String, (String, u64)>,
    /// The mirror serves indexes under `by-hash/SHA256/<digest>` (safe against mid-sync mirrors).
    pub acquire_by_hash: bool,
}

/// Verifies `data` (an `InRelease` file) against a keyring and returns the verified signed text.
///
/// apt's rule: at least one good signature by a key in the keyring and no bad signature. A signature
/// by a key that is not in the keyring is ignored; one by a key that is expired or revoked now
/// counts for nothing (apt's "worthless" signature) but does not fail the check by itself.
pub fn verify_inrelease(data: &[u8], keyring: &Path) -> anyhow::Result<String> {
    verify_inrelease_at(data, keyring, SystemTime::now())
}

/// [`verify_inrelease`] with the "keys alive" check made at `now` (tests use fixed times).
pub fn verify_inrelease_at(data: &[u8], keyring: &Path, now: SystemTime) -> anyhow::Result<String> {
    let certs = load_keyring(keyring)?;
    let policy = StandardPolicy::new();
    let helper = Helper { certs, policy: &policy, now, good: Vec::new() };
    let mut verifier = VerifierBuilder::from_bytes(data)
        .context("InRelease is not an OpenPGP signed message")?
        .with_policy(&policy, now, helper)
        .context("verifying InRelease")?;
    let mut text = Vec::new();
    verifier.read_to_end(&mut text).context("verifying InRelease")?;
    // The verifier only yields all data once `check` has passed; make that explicit.
    if !verifier.message_processed() || verifier.helper_ref().good.is_empty() {
        bail!("InRelease: signature check did not complete");
    }
    for signer in &verifier.helper_ref().good {
        tracing::debug!("InRelease: good signature by {signer}");
    }
    String::from_utf8(text).context("InRelease: signed text is not UTF-8")
}

/// Loads every certificate from a keyring: a binary or armored file, or a directory of
/// `.gpg`/`.pgp`/`.asc` files (read in name order).
pub fn load_keyring(path: &Path) -> anyhow::Result<Vec<Cert>> {
    let files = if path.is_dir() {
        let mut files: Vec<_> = fs::read_dir(path)
            .with_context(|| format!("listing keyring directory {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "gpg" || e == "pgp" || e == "asc"))
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut certs = Vec::new();
    for file in &files {
        let data = fs::read(file).with_context(|| format!("reading keyring {}", file.display()))?;
        let parser = CertParser::from_bytes(&data).with_context(|| format!("parsing keyring {}", file.display()))?;
        for cert in parser {
            match cert {
                Ok(cert) => certs.push(cert),
                Err(e) => tracing::warn!("keyring {}: skipping an unreadable certificate: {e}", file.display()),
            }
        }
    }
    if certs.is_empty() {
        bail!("keyring {} holds no OpenPGP certificates", path.display());
    }
    Ok(certs)
}

struct Helper<'p> {
    certs: Vec<Cert>,
    policy: &'p dyn Policy,
    now: SystemTime,
    /// Fingerprints of keys that made good signatures (filled by `check`).
    good: Vec<String>,
}

impl VerificationHelper for Helper<'_> {
    fn get_certs(&mut self, _ids: &[KeyHandle]) -> openpgp::Result<Vec<Cert>> {
        Ok(self.certs.clone())
    }

    fn check(&mut self, structure: MessageStructure) -> openpgp::Result<()> {
        let mut bad = Vec::new();
        let mut worthless = Vec::new();
        let mut unknown = Vec::new();
        for layer in structure.into_iter() {
            let MessageLayer::SignatureGroup { results } = layer else {
                bad.push("unexpected encryption or compression layer".to_string());
                continue;
            };
            for result in results {
                match result {
                    Ok(GoodChecksum { ka, .. }) => {
                        let fpr = ka.key().fingerprint().to_hex();
                        match alive_now(ka.cert(), &ka.key().key_handle(), self.policy, self.now) {
                            Ok(()) => self.good.push(fpr),
                            Err(e) => worthless.push(format!("{fpr}: {e}")),
                        }
                    }
                    Err(VerificationError::MissingKey { sig }) => {
                        unknown.push(sig.get_issuers().first().map_or("unknown issuer".into(), |h| h.to_hex()))
                    }
                    Err(e @ (VerificationError::BadKey { .. } | VerificationError::UnboundKey { .. })) => worthless.push(e.to_string()),
                    Err(e) => bad.push(e.to_string()),
                }
            }
        }
        if !bad.is_empty() {
            return Err(anyhow!("bad signature: {}", bad.join("; ")));
        }
        if self.good.is_empty() {
            let mut why = Vec::new();
            if !unknown.is_empty() {
                why.push(format!("signed only by keys not in the keyring ({})", unknown.join(", ")));
            }
            if !worthless.is_empty() {
                why.push(format!("signatures by unusable keys ({})", worthless.join("; ")));
            }
            if why.is_empty() {
                why.push("no signatures".to_string());
            }
            return Err(anyhow!("no good signature: {}", why.join("; ")));
        }
        Ok(())
    }
}

/// Sequoia judges keys at signature time; apt (gpgv) also wants them alive and unrevoked now.
fn alive_now(cert: &Cert, key: &KeyHandle, policy: &dyn Policy, now: SystemTime) -> anyhow::Result<()> {
    let valid = cert.with_policy(policy, now).context("certificate not valid now")?;
    valid.alive().context("certificate expired")?;
    if let RevocationStatus::Revoked(_) = valid.revocation_status() {
        bail!("certificate revoked");
    }
    let ka = valid.keys().key_handle(key.clone()).next().context("signing key not valid now")?;
    ka.alive().context("signing key expired")?;
    if let RevocationStatus::Revoked(_) = ka.revocation_status() {
        bail!("signing key revoked");
    }
    Ok(())
}

impl Release {
    /// Parses a verified Release text (never the raw InRelease file).
    pub fn parse(text: &str) -> anyhow::Result<Release> {
        let fields = stanzas(text).next().context("Release: empty")?;
        let get = |key: &str| field(&fields, key);
        let words = |key: &str| field_words(&fields, key);
        let date = get("Date").context("Release: missing field `Date`")?.to_string();
        let mut sha256 = BTreeMap::new();
        for line in get("SHA256").context("Release: missing field `SHA256`")?.lines() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let parts: Vec<&str> = line.split_whitespace().collect();
            let [digest, size, path] = parts[..] else {
                bail!("Release: field `SHA256`: bad line {line:?}");
            };
            if digest.len() != 64 || !digest.bytes().all(|c| c.is_ascii_hexdigit()) {
                bail!("Release: field `SHA256`: bad digest in {line:?}");
            }
            let size = size.parse().with_context(|| format!("Release: field `SHA256`: bad size in {line:?}"))?;
            sha256.insert(path.to_string(), (digest.to_ascii_lowercase(), size));
        }
        let valid_until = match get("Valid-Until") {
            Some(v) => Some((v.to_string(), parse_rfc2822(v).with_context(|| format!("Release: field `Valid-Until`: not a date: {v:?}"))?)),
            None => None,
        };
        let release = Release {
            date_unix: parse_rfc2822(&date),
            date,
            suite: get("Suite").unwrap_or_default().to_string(),
            codename: get("Codename").unwrap_or_default().to_string(),
            valid_until,
            architectures: words("Architectures"),
            components: words("Components"),
            sha256,
            acquire_by_hash: get("Acquire-By-Hash").is_some_and(|v| v.eq_ignore_ascii_case("yes")),
        };
        if release.suite.is_empty() && release.codename.is_empty() {
            bail!("Release: neither `Suite` nor `Codename` is set");
        }
        Ok(release)
    }
}

/// apt's rules for a verified Release fetched from `mirror` for the suite `requested`
/// (`os.suite`). Each error names the suite, the mirror and the values that disagree.
impl Release {
    /// The file is the suite asked for: its `Suite` or its `Codename` (apt accepts either, so
    /// `stable` and `trixie` both name trixie's file) equals `requested`. Another validly signed
    /// suite (an older release, say) is refused.
    pub fn check_suite(&self, requested: &str, mirror: &str) -> anyhow::Result<()> {
        if self.suite == requested || self.codename == requested {
            return Ok(());
        }
        bail!(
            "InRelease from {mirror} for suite `{requested}` describes Suite `{}`, Codename `{}`: \
             not the suite asked for (a misconfigured mirror, or another signed suite substituted)",
            self.suite,
            self.codename
        )
    }

    /// `Valid-Until`, when set, is still ahead of `now`.
    pub fn check_valid_until(&self, now: SystemTime, requested: &str, mirror: &str) -> anyhow::Result<()> {
        let Some((text, until)) = &self.valid_until else {
            return Ok(());
        };
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if now <= *until {
            return Ok(());
        }
        bail!(
            "InRelease of `{requested}` from {mirror} expired on {text} (Valid-Until): the index of \
             os.suite `{requested}` is out of date, so its security fixes may be missing (a mirror \
             that stopped syncing, or an old copy replayed; check this machine's clock too). Stable \
             has no Valid-Until; security and updates suites do"
        )
    }

    /// The `Date` has not gone back from that of `cached` (the copy kept from the last fetch):
    /// an older file, even validly signed, would freeze or roll back the packages.
    pub fn check_not_older(&self, cached: &Release, requested: &str, mirror: &str) -> anyhow::Result<()> {
        match (self.date_unix, cached.date_unix) {
            (Some(new), Some(old)) if new < old => bail!(
                "InRelease of `{requested}` from {mirror} is dated {} but the copy fetched before is \
                 dated {}: refusing to go back to an older index (a stale mirror, or a rollback to \
                 packages with known vulnerabilities)",
                self.date,
                cached.date
            ),
            _ => Ok(()),
        }
    }
}

/// `Sat, 09 Aug 2025 09:26:35 UTC` (weekday optional; zone `UTC`, `GMT`, `Z` or `+hhmm`) -> Unix seconds.
pub fn parse_rfc2822(s: &str) -> Option<u64> {
    let s = s.trim();
    let s = s.split_once(',').map_or(s, |(_, rest)| rest).trim();
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [day, month, year, time, zone] = parts[..] else {
        return None;
    };
    const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
    let month = MONTHS.iter().position(|m| month.eq_ignore_ascii_case(m))? as u32 + 1;
    let day: u32 = day.parse().ok()?;
    let year: i64 = year.parse().ok()?;
    let hms: Vec<u32> = time.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let (h, m, sec) = match hms[..] {
        [h, m, s] => (h, m, s),
        [h, m] => (h, m, 0),
        _ => return None,
    };
    if !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    let offset: i64 = match zone {
        "UTC" | "GMT" | "UT" | "Z" => 0,
        z if z.len() == 5 && (z.starts_with('+') || z.starts_with('-')) => {
            let hh: i64 = z[1..3].parse().ok()?;
            let mm: i64 = z[3..5].parse().ok()?;
            let off = hh * 3600 + mm * 60;
            if z.starts_with('-') {
                -off
            } else {
                off
            }
        }
        _ => return None,
    };
    let secs = days_from_civil(year, month, day) * 86400 + i64::from(h * 3600 + m * 60 + sec) - offset;
    u64::try_from(secs).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// A fixed point in time from Unix seconds (for callers that pass `now` explicitly).
pub fn unix_time(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// Test certificates and signed InRelease files (also for `debian::tests`).
#[cfg(test)]
pub(crate) mod testkeys {
    use super::*;
    use openpgp::serialize::stream::{Message, Signer};
    use openpgp::serialize::Serialize;
    use std::io::Write;

    /// Certificates are made at a fixed past time so signatures are deterministic in what they test.
    pub fn t(secs: u64) -> SystemTime {
        unix_time(secs)
    }
    pub const T0: u64 = 1_700_000_000;

    pub fn cert(created: u64, validity: Option<Duration>) -> Cert {
        let (cert, _rev) = CertBuilder::new()
            .add_userid("kiln test <test@kiln.invalid>")
            .set_creation_time(t(created))
            .set_validity_period(validity)
            .add_signing_subkey()
            .generate()
            .unwrap();
        cert
    }

    fn signer(cert: &Cert, at: u64) -> openpgp::crypto::KeyPair {
        let p = StandardPolicy::new();
        cert.keys().with_policy(&p, t(at)).secret().for_signing().next().unwrap().key().clone().into_keypair().unwrap()
    }

    pub fn sign(text: &str, signers: &[&Cert], at: u64) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let message = Message::new(&mut out);
            let mut s = Signer::new(message, signer(signers[0], at)).unwrap();
            for extra in &signers[1..] {
                s = s.add_signer(signer(extra, at)).unwrap();
            }
            let mut w = s.cleartext().creation_time(t(at)).build().unwrap();
            w.write_all(text.as_bytes()).unwrap();
            w.finalize().unwrap();
        }
        out
    }

    pub fn keyring(dir: &tempfile::TempDir, name: &str, certs: &[&Cert]) -> std::path::PathBuf {
        let path = dir.path().join(name);
        let mut f = fs::File::create(&path).unwrap();
        for c in certs {
            c.serialize(&mut f).unwrap(); // public parts only
        }
        path
    }
}

#[cfg(test)]
mod tests {
    use super::testkeys::*;
    use super::*;
    use openpgp::serialize::Serialize;

    const RELEASE: &str = "\
Origin: Debian
Label: Debian
Suite: stable
Codename: trixie
Date: Sat, 09 Aug 2025 09:26:35 UTC
Acquire-By-Hash: yes
Architectures: all amd64 arm64 riscv64
Components: main contrib non-free-firmware non-free
Description: Debian 13.0 Released 09 August 2025
SHA256:
 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef   738242 contrib/Contents-all
 ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789 12345678 main/binary-arm64/Packages.xz
";

    const NOW: u64 = T0 + 86400;

    #[test]
    fn good_signature_verifies_and_parses() {
        let dir = tempfile::tempdir().unwrap();
        let good = cert(T0, None);
        let data = sign(RELEASE, &[&good], T0 + 60);
        assert!(data.starts_with(b"-----BEGIN PGP SIGNED MESSAGE-----"));
        let text = verify_inrelease_at(&data, &keyring(&dir, "k.gpg", &[&good]), t(NOW)).unwrap();
        assert_eq!(text.trim_end(), RELEASE.trim_end());
        let r = Release::parse(&text).unwrap();
        assert_eq!(r.codename, "trixie");
        assert_eq!(r.date_unix, Some(1_754_731_595));
        assert!(r.acquire_by_hash);
        assert_eq!(r.architectures, ["all", "amd64", "arm64", "riscv64"]);
        assert_eq!(r.components.len(), 4);
        assert_eq!(
            r.sha256["main/binary-arm64/Packages.xz"],
            ("abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789".to_string(), 12345678)
        );
        assert_eq!(r.sha256["contrib/Contents-all"].1, 738242);
    }

    #[test]
    fn tampered_text_fails() {
        let dir = tempfile::tempdir().unwrap();
        let good = cert(T0, None);
        let mut data = sign(RELEASE, &[&good], T0 + 60);
        let at = data.windows(7).position(|w| w == b"Codenam").unwrap();
        data[at + 9] ^= 0x01; // one byte of "trixie"
        let err = verify_inrelease_at(&data, &keyring(&dir, "k.gpg", &[&good]), t(NOW)).unwrap_err();
        assert!(format!("{err:#}").contains("bad signature"), "{err:#}");
    }

    #[test]
    fn keyring_without_signer_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (good, other) = (cert(T0, None), cert(T0, None));
        let data = sign(RELEASE, &[&good], T0 + 60);
        let err = verify_inrelease_at(&data, &keyring(&dir, "k.gpg", &[&other]), t(NOW)).unwrap_err();
        assert!(format!("{err:#}").contains("not in the keyring"), "{err:#}");
    }

    #[test]
    fn good_plus_unknown_signer_passes() {
        let dir = tempfile::tempdir().unwrap();
        let (good, unknown) = (cert(T0, None), cert(T0, None));
        let data = sign(RELEASE, &[&unknown, &good], T0 + 60);
        verify_inrelease_at(&data, &keyring(&dir, "k.gpg", &[&good]), t(NOW)).unwrap();
    }

    #[test]
    fn key_expired_now_is_not_good() {
        let dir = tempfile::tempdir().unwrap();
        let expiring = cert(T0, Some(Duration::from_secs(3600)));
        let data = sign(RELEASE, &[&expiring], T0 + 60); // valid when signed
        let ring = keyring(&dir, "k.gpg", &[&expiring]);
        verify_inrelease_at(&data, &ring, t(T0 + 120)).unwrap();
        let err = verify_inrelease_at(&data, &ring, t(NOW)).unwrap_err();
        assert!(format!("{err:#}").contains("no good signature"), "{err:#}");
        // ...but alongside a good signature it is only ignored, as apt does.
        let good = cert(T0, None);
        let data = sign(RELEASE, &[&expiring, &good], T0 + 60);
        verify_inrelease_at(&data, &keyring(&dir, "k2.gpg", &[&expiring, &good]), t(NOW)).unwrap();
    }

    #[test]
    fn keyring_directory_and_armor() {
        let dir = tempfile::tempdir().unwrap();
        let good = cert(T0, None);
        let data = sign(RELEASE, &[&good], T0 + 60);
        let ring = dir.path().join("ring.d");
        fs::create_dir(&ring).unwrap();
        let mut armored = Vec::new();
        good.armored().serialize(&mut armored).unwrap();
        fs::write(ring.join("good.asc"), armored).unwrap();
        fs::write(ring.join("ignored.txt"), b"not a key").unwrap();
        verify_inrelease_at(&data, &ring, t(NOW)).unwrap();
        assert!(load_keyring(dir.path()).is_err(), "a directory without keys is an error");
    }

    #[test]
    fn unsigned_input_fails() {
        let dir = tempfile::tempdir().unwrap();
        let ring = keyring(&dir, "k.gpg", &[&cert(T0, None)]);
        assert!(verify_inrelease_at(RELEASE.as_bytes(), &ring, t(NOW)).is_err());
    }

    #[test]
    fn host_keyring_loads() {
        let path = Path::new("/usr/share/keyrings/debian-archive-keyring.gpg");
        assert!(path.exists(), "{} missing: install the `debian-archive-keyring` package", path.display());
        assert!(!load_keyring(path).unwrap().is_empty());
    }

    #[test]
    fn release_parse_errors() {
        assert!(Release::parse("Suite: x\nSHA256:\n 00 1 a\n").unwrap_err().to_string().contains("`Date`"));
        let bad = RELEASE.replace("  738242", " big");
        assert!(Release::parse(&bad).unwrap_err().to_string().contains("`SHA256`"));
    }

    const MIRROR: &str = "http://deb.example/debian";

    #[test]
    fn suite_or_codename_must_be_the_one_asked_for() {
        let r = Release::parse(RELEASE).unwrap();
        r.check_suite("stable", MIRROR).unwrap();
        r.check_suite("trixie", MIRROR).unwrap();
        let err = r.check_suite("bookworm", MIRROR).unwrap_err().to_string();
        for want in ["bookworm", "`stable`", "`trixie`", MIRROR] {
            assert!(err.contains(want), "{want}: {err}");
        }
        // Only one of the two set (some third-party repositories): that one decides.
        let codename_only = Release::parse(&RELEASE.replace("Suite: stable\n", "")).unwrap();
        codename_only.check_suite("trixie", MIRROR).unwrap();
        assert!(codename_only.check_suite("stable", MIRROR).is_err());
    }

    #[test]
    fn valid_until_in_the_past_is_refused() {
        let date = parse_rfc2822("Sat, 09 Aug 2025 09:26:35 UTC").unwrap();
        let text = RELEASE.replace("Acquire-By-Hash", "Valid-Until: Sat, 16 Aug 2025 09:26:35 UTC\nAcquire-By-Hash");
        let r = Release::parse(&text).unwrap();
        assert_eq!(r.valid_until.as_ref().map(|v| v.1), Some(date + 7 * 86400));
        r.check_valid_until(t(date + 86400), "trixie-security", MIRROR).unwrap();
        r.check_valid_until(t(date + 7 * 86400), "trixie-security", MIRROR).unwrap();
        let err = r.check_valid_until(t(date + 7 * 86400 + 1), "trixie-security", MIRROR).unwrap_err().to_string();
        for want in ["expired", "Sat, 16 Aug 2025 09:26:35 UTC", "os.suite `trixie-security`", MIRROR] {
            assert!(err.contains(want), "{want}: {err}");
        }
        // Stable has none: never expired.
        Release::parse(RELEASE).unwrap().check_valid_until(t(u64::from(u32::MAX)), "stable", MIRROR).unwrap();
        let bad = RELEASE.replace("Acquire-By-Hash", "Valid-Until: soon\nAcquire-By-Hash");
        let err = Release::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("`Valid-Until`"), "{err}");
    }

    #[test]
    fn a_date_older_than_the_cached_copy_is_refused() {
        let cached = Release::parse(RELEASE).unwrap();
        let older = Release::parse(&RELEASE.replace("09 Aug 2025", "02 Aug 2025")).unwrap();
        let newer = Release::parse(&RELEASE.replace("09 Aug 2025", "16 Aug 2025")).unwrap();
        newer.check_not_older(&cached, "trixie", MIRROR).unwrap();
        cached.check_not_older(&cached, "trixie", MIRROR).unwrap();
        let err = older.check_not_older(&cached, "trixie", MIRROR).unwrap_err().to_string();
        for want in ["older", "02 Aug 2025", "09 Aug 2025", MIRROR] {
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn rfc2822_dates() {
        assert_eq!(parse_rfc2822("Sat, 09 Aug 2025 09:26:35 UTC"), Some(1_754_731_595));
        assert_eq!(parse_rfc2822("Thu, 01 Jan 1970 00:00:00 UTC"), Some(0));
        assert_eq!(parse_rfc2822("29 Feb 2024 12:00:00 +0100"), Some(1_709_204_400));
        assert_eq!(parse_rfc2822("Sat, 09 Aug 2025 09:26:35 CEST"), None);
        assert_eq!(parse_rfc2822("garbage"), None);
    }
}
