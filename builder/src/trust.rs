//! The certificates kiln's HTTPS downloads trust: the host's CA bundle (what the host's own tools
//! trust, including a site's CA added with `update-ca-certificates`) and the profile's
//! `image_registries.<host>.ca_file`s. The Debian, k3s and chart downloads (ureq) use this list;
//! the registry client (reqwest, platform verifier) reads the same host bundle and gets the
//! same extra files (`oci::pull`), so one site CA works for every download.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};

/// Where Debian, Fedora and Alpine keep the host's CA bundle; `SSL_CERT_FILE` overrides.
const HOST_BUNDLES: [&str; 3] = ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

/// The extra CA files a build trusts, and the root list made from them once.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// PEM files trusted on top of the host's bundle, each with the profile key naming it.
    pub extra: Vec<(String, PathBuf)>,
    roots: Arc<OnceLock<ureq::tls::RootCerts>>,
}

impl Trust {
    pub fn new(extra: Vec<(String, PathBuf)>) -> Trust {
        Trust { extra, roots: Arc::default() }
    }

    /// The roots for ureq: the host bundle and the extra files; ureq's built-in Mozilla roots
    /// when the host has no bundle and there is nothing extra.
    pub fn root_certs(&self) -> Result<ureq::tls::RootCerts> {
        if let Some(r) = self.roots.get() {
            return Ok(r.clone());
        }
        let mut certs = Vec::new();
        let bundle = host_bundle();
        if let Some(b) = &bundle {
            certs.extend(read_pem(b).with_context(|| format!("reading the host's CA bundle {}", b.display()))?);
        }
        for (key, f) in &self.extra {
            let found = read_pem(f).with_context(|| format!("key `{key}`: reading {}", f.display()))?;
            anyhow::ensure!(!found.is_empty(), "key `{key}`: {} holds no PEM certificate", f.display());
            certs.extend(found);
        }
        let roots = match (&bundle, certs.is_empty()) {
            (None, true) => ureq::tls::RootCerts::WebPki,
            (None, false) => {
                tracing::warn!(
                    "this host has no CA bundle ({}; set SSL_CERT_FILE): HTTPS downloads trust only the profile's ca_file certificates",
                    HOST_BUNDLES.join(", ")
                );
                ureq::tls::RootCerts::new_with_certs(&certs)
            }
            (Some(_), _) => ureq::tls::RootCerts::new_with_certs(&certs),
        };
        Ok(self.roots.get_or_init(|| roots).clone())
    }
}

/// The host's CA bundle: `SSL_CERT_FILE`, else the first that exists of [`HOST_BUNDLES`].
pub fn host_bundle() -> Option<PathBuf> {
    if let Some(f) = std::env::var_os("SSL_CERT_FILE").filter(|f| !f.is_empty()) {
        return Some(PathBuf::from(f));
    }
    HOST_BUNDLES.iter().map(PathBuf::from).find(|p| p.is_file())
}

fn read_pem(path: &Path) -> Result<Vec<ureq::tls::Certificate<'static>>> {
    let data = std::fs::read(path)?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&data) {
        if let ureq::tls::PemItem::Certificate(c) = item.context("not PEM")? {
            certs.push(c);
        }
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// An HTTPS server on 127.0.0.1 whose certificate (for `localhost`) a new site CA signed;
    /// it answers one request with `body`. Returns its port and the CA's PEM.
    fn https_server(body: &'static str) -> (u16, String) {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(leaf.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let config = std::sync::Arc::new(config);
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                let conn = rustls::ServerConnection::new(config.clone()).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut head = [0u8; 4096];
                if tls.read(&mut head).is_ok() {
                    let _ = write!(tls, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                    let _ = tls.flush();
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                }
            }
        });
        (port, ca.pem())
    }

    /// A download from a server with a site CA's certificate fails without the CA and works
    /// when the profile's ca_file names it: the ureq client uses the trust list.
    #[test]
    fn a_profile_ca_file_is_trusted_by_downloads() {
        let d = tempfile::tempdir().unwrap();
        let (port, ca_pem) = https_server("hello over tls");
        let ca = d.path().join("site-ca.pem");
        std::fs::write(&ca, ca_pem).unwrap();
        let url = format!("https://localhost:{port}/file");
        let digest = crate::digest::sha256_hex(b"hello over tls");
        let fetcher = |trust| crate::fetch::Fetcher {
            offline: false,
            cache: crate::cache::Cache::new(d.path().join("cache")),
            progress: false,
            trust,
        };
        let err = format!("{:#}", fetcher(Trust::default()).blob(&url, &digest, None, "file").unwrap_err());
        assert!(err.to_lowercase().contains("certificate") || err.contains("UnknownIssuer"), "{err}");
        let trust = Trust::new(vec![("image_registries.r.ca_file".into(), ca)]);
        let path = fetcher(trust).blob(&url, &digest, None, "file").unwrap();
        assert_eq!(std::fs::read_to_string(path).unwrap(), "hello over tls");
    }

    #[test]
    fn extra_files_are_read_and_named_when_bad() {
        let d = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let good = d.path().join("ca.pem");
        std::fs::write(&good, ca.cert.pem()).unwrap();
        let t = Trust::new(vec![("image_registries.r.ca_file".into(), good)]);
        assert!(matches!(t.root_certs().unwrap(), ureq::tls::RootCerts::Specific(c) if !c.is_empty()));
        let empty = d.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let err = format!("{:#}", Trust::new(vec![("image_registries.r.ca_file".into(), empty)]).root_certs().unwrap_err());
        assert!(err.contains("image_registries.r.ca_file") && err.contains("empty.pem"), "{err}");
    }
}
