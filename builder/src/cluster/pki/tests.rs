//! The PKI checked the way a TLS peer checks it (rustls-webpki): chains, names, usages, validity
//! at a 1970 boot clock; reuse, a member added later, re-issue on a new address, file modes.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

use super::*;
use crate::profile::test_profile;

fn cluster(members: &[(&str, &str)], servers: bool) -> Cluster {
    let roles = if servers { "[etcd, server]" } else { "[etcd]" };
    let nodes: String = members
        .iter()
        .enumerate()
        .map(|(i, (name, addr))| format!("    - {{name: {name}, mac: \"52:54:00:00:00:0{i}\", roles: {roles}, address: {addr}/24}}\n"))
        .collect();
    let k3s = if servers { "  k3s: {version: v1.33.5+k3s1}\n  api_address: 10.0.0.10\n" } else { "" };
    test_profile(&format!("cluster:\n  name: lab\n  datastore: external-etcd\n  default_role: none\n{k3s}  nodes:\n{nodes}"))
        .cluster
        .unwrap()
}

const THREE: [(&str, &str); 3] = [("e1", "10.0.0.11"), ("e2", "10.0.0.12"), ("e3", "10.0.0.13")];

fn der_of(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from(der(pem).unwrap())
}

/// Verifies `cert` against `ca` for `usage` at `at` seconds after the epoch.
fn verify(ca: &str, cert: &str, usage: KeyUsage, at: u64) -> Result<(), webpki::Error> {
    let ca = der_of(ca);
    let anchor = webpki::anchor_from_trusted_cert(&ca).unwrap();
    let cert = der_of(cert);
    let ee = EndEntityCert::try_from(&cert).unwrap();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &[],
        UnixTime::since_unix_epoch(Duration::from_secs(at)),
        usage,
        None,
        None,
    )
    .map(|_| ())
}

fn names_ok(cert: &str, name: &str) -> bool {
    let cert = der_of(cert);
    let ee = EndEntityCert::try_from(&cert).unwrap();
    ee.verify_is_valid_for_subject_name(&ServerName::try_from(name.to_string()).unwrap()).is_ok()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// A boot clock just after the epoch (no RTC, no NTP yet) and a clock in the present.
const CLOCKS: [u64; 2] = [5, 1_796_000_000];

#[test]
fn chains_names_and_usages_verify_from_a_1970_clock_on() {
    let d = tempfile::tempdir().unwrap();
    let c = cluster(&THREE, true);
    let pki = load_or_create(&c, d.path()).unwrap().unwrap();
    assert_eq!(pki.nodes.keys().collect::<Vec<_>>(), ["e1", "e2", "e3"]);
    for (name, ip) in THREE {
        let certs = &pki.nodes[name];
        assert_eq!(certs.keys().copied().collect::<Vec<_>>(), [Kind::EtcdServer, Kind::EtcdPeer, Kind::DatastoreClient]);
        for at in CLOCKS {
            for kind in [Kind::EtcdServer, Kind::EtcdPeer] {
                verify(&pki.ca_cert, &certs[&kind].cert, KeyUsage::server_auth(), at).unwrap();
                verify(&pki.ca_cert, &certs[&kind].cert, KeyUsage::client_auth(), at).unwrap();
            }
            verify(&pki.ca_cert, &certs[&Kind::DatastoreClient].cert, KeyUsage::client_auth(), at).unwrap();
        }
        let server = &certs[&Kind::EtcdServer].cert;
        for good in [ip, name, "127.0.0.1", "localhost"] {
            assert!(names_ok(server, good), "{name}: {good}");
            assert!(names_ok(&certs[&Kind::EtcdPeer].cert, good), "{name} peer: {good}");
        }
        let other = if name == "e1" { "10.0.0.12" } else { "10.0.0.11" };
        assert!(!names_ok(server, other) && !names_ok(server, "e9"), "{name} is valid for another member");
        // A client certificate is no server certificate.
        assert!(verify(&pki.ca_cert, &certs[&Kind::DatastoreClient].cert, KeyUsage::server_auth(), CLOCKS[1]).is_err());
    }
    let op = std::fs::read_to_string(pki.dir.join("etcdctl.crt")).unwrap();
    verify(&pki.ca_cert, &op, KeyUsage::client_auth(), CLOCKS[1]).unwrap();
    assert!(verify(&pki.ca_cert, &op, KeyUsage::server_auth(), CLOCKS[1]).is_err());
    // Another cluster's CA does not vouch for these.
    let other = load_or_create(&c, &d.path().join("other")).unwrap().unwrap();
    assert_ne!(other.ca_cert, pki.ca_cert);
    assert!(verify(&other.ca_cert, &pki.nodes["e1"][&Kind::EtcdServer].cert, KeyUsage::server_auth(), CLOCKS[1]).is_err());
}

#[test]
fn reused_across_calls_with_private_modes() {
    let d = tempfile::tempdir().unwrap();
    let c = cluster(&THREE, false);
    let a = load_or_create(&c, d.path()).unwrap().unwrap();
    let b = load_or_create(&c, d.path()).unwrap().unwrap();
    assert_eq!(a.ca_cert, b.ca_cert);
    assert_eq!(a.nodes, b.nodes, "a second build reuses every certificate and key");
    assert!(a.nodes.values().all(|k| !k.contains_key(&Kind::DatastoreClient)), "no k3s servers, no client certificates");
    assert_eq!(mode(&d.path().join("secrets")), 0o700);
    assert_eq!(mode(&a.dir), 0o700);
    let mut names = Vec::new();
    for e in std::fs::read_dir(&a.dir).unwrap() {
        let e = e.unwrap();
        assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    assert_eq!(
        names,
        [
            "ca.crt",
            "ca.pem",
            "e1.peer.pem",
            "e1.server.pem",
            "e2.peer.pem",
            "e2.server.pem",
            "e3.peer.pem",
            "e3.server.pem",
            "etcdctl.crt",
            "etcdctl.key",
            "etcdctl.pem"
        ]
    );
    assert_eq!(std::fs::read_to_string(a.dir.join("ca.crt")).unwrap(), a.ca_cert);
    let key = a.nodes["e1"][&Kind::EtcdServer].key_pem().to_string();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----") && !format!("{a:?}").contains(&key), "keys never in Debug");
}

#[test]
fn a_member_added_later_and_a_moved_member_get_certificates_from_the_same_ca() {
    let d = tempfile::tempdir().unwrap();
    let one = load_or_create(&cluster(&THREE[..1], false), d.path()).unwrap().unwrap();
    let ca_before = std::fs::read(one.dir.join("ca.pem")).unwrap();
    let three = load_or_create(&cluster(&THREE, false), d.path()).unwrap().unwrap();
    assert_eq!(std::fs::read(three.dir.join("ca.pem")).unwrap(), ca_before, "the CA is kept");
    assert_eq!(three.nodes["e1"], one.nodes["e1"], "the first member keeps its certificates");
    verify(&one.ca_cert, &three.nodes["e3"][&Kind::EtcdServer].cert, KeyUsage::server_auth(), CLOCKS[0]).unwrap();
    assert!(names_ok(&three.nodes["e3"][&Kind::EtcdServer].cert, "10.0.0.13"));

    // e2 moves to another address: issued again, by the same CA, for the new address only.
    let moved = load_or_create(&cluster(&[THREE[0], ("e2", "10.0.0.22"), THREE[2]], false), d.path()).unwrap().unwrap();
    let e2 = &moved.nodes["e2"][&Kind::EtcdServer].cert;
    assert_ne!(e2, &three.nodes["e2"][&Kind::EtcdServer].cert);
    assert!(names_ok(e2, "10.0.0.22") && !names_ok(e2, "10.0.0.12"));
    verify(&one.ca_cert, e2, KeyUsage::server_auth(), CLOCKS[0]).unwrap();
    assert_eq!(moved.nodes["e3"], three.nodes["e3"]);
}

#[test]
fn a_broken_ca_file_is_refused_naming_it_and_no_etcd_means_no_pki() {
    let d = tempfile::tempdir().unwrap();
    let c = cluster(&THREE[..1], false);
    let pki = load_or_create(&c, d.path()).unwrap().unwrap();
    let ca = pki.dir.join("ca.pem");
    let text = std::fs::read_to_string(&ca).unwrap();
    let without_key = &text[..text.find("-----BEGIN PRIVATE KEY-----").unwrap()];
    std::fs::write(&ca, without_key).unwrap();
    let err = format!("{:#}", load_or_create(&c, d.path()).unwrap_err());
    assert!(err.contains("ca.pem") && err.contains("no private key") && err.contains("backup"), "{err}");
    // A CA certificate with another CA's key.
    let other = load_or_create(&c, &d.path().join("b")).unwrap().unwrap();
    let other_key = std::fs::read_to_string(other.dir.join("ca.pem")).unwrap();
    let other_key = &other_key[other_key.find("-----BEGIN PRIVATE KEY-----").unwrap()..];
    std::fs::write(&ca, format!("{without_key}{other_key}")).unwrap();
    let err = format!("{:#}", load_or_create(&c, d.path()).unwrap_err());
    assert!(err.contains("not the private key's"), "{err}");

    let none = test_profile("cluster:\n  name: lab\n  default_role: none\n  nodes: [{name: s1, mac: \"52:54:00:00:00:01\", roles: [server], address: 10.0.0.1/24}]\n  k3s: {version: v1.33.5+k3s1}\n").cluster.unwrap();
    let e = tempfile::tempdir().unwrap();
    assert!(load_or_create(&none, e.path()).unwrap().is_none());
    assert!(!e.path().join("secrets").exists());
}
