//! `oci::manifest::parse` on arbitrary bytes (with and without a registry content type), then
//! platform selection over whatever index it accepts: errors are fine, panics are not, and an
//! accepted document only ever holds checked sha256 digests.
#![no_main]

use kiln::arch::Arch;
use kiln::oci::manifest::{self, Document};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let content_type = data.first().map(|b| manifest::ACCEPTED[*b as usize % manifest::ACCEPTED.len()]);
    for ct in [None, content_type] {
        match manifest::parse(data, ct) {
            Ok(Document::Index(entries)) => {
                for e in &entries {
                    assert!(manifest::check_digest(&e.manifest.digest).is_ok());
                    assert_eq!(e.manifest.hex().len(), 64);
                }
                for arch in Arch::ALL {
                    let _ = manifest::select(&entries, arch);
                }
            }
            Ok(Document::Image { config, layers, .. }) => {
                for d in std::iter::once(&config).chain(&layers) {
                    assert!(manifest::check_digest(&d.digest).is_ok());
                    let _ = kiln::oci::flatten::compression(&d.media_type);
                }
            }
            Err(_) => {}
        }
    }
});
