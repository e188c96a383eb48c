//! A TLS client for checking what a server demands of its clients: the etcd group's client port
//! must refuse a connection without a client certificate from the cluster CA. etcdctl (gRPC)
//! reports such a refusal only as `context deadline exceeded`, the same words as an unreachable
//! endpoint; this client sees the server's TLS alert itself. It can connect from inside a
//! [`Lan`]'s network namespace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::lan::Lan;

/// How a request over TLS ended.
#[derive(Debug)]
pub enum Outcome {
    /// The server answered (what it sent back, lossy UTF-8).
    Answered(String),
    /// The TLS layer ended the exchange: the server's alert, or a certificate the client refused.
    Tls(rustls::Error),
}

/// Sends an HTTP/1.1 `GET path` to `addr` over TLS, trusting only `ca` (PEM) and naming the server
/// `server_name`, with `client` (certificate and key PEM files) or no client certificate; from
/// inside `via`'s network namespace when given. Timeouts and refused connections are errors, not
/// outcomes: they say nothing about TLS.
pub fn get(
    via: Option<&Lan>,
    addr: SocketAddr,
    server_name: &str,
    ca: &Path,
    client: Option<(&Path, &Path)>,
    path: &str,
) -> Result<Outcome> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))? {
        roots.add(cert.with_context(|| format!("reading {}", ca.display()))?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("reading {}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    let name = ServerName::try_from(server_name.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n");
    let ns = via.map(|l| l.namespace().to_string());
    let what = format!("HTTPS GET {path} from {addr}");
    // A network namespace is per thread: join it in a thread of its own.
    std::thread::spawn(move || -> Result<Outcome> {
        if let Some(ns) = ns {
            enter_netns(&ns)?;
        }
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).with_context(|| format!("connecting to {addr}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
        let conn = rustls::ClientConnection::new(Arc::new(config), name)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut answer = Vec::new();
        let result = tls.write_all(request.as_bytes()).and_then(|()| tls.flush()).and_then(|()| tls.read_to_end(&mut answer).map(|_| ()));
        match result {
            Ok(()) => Ok(Outcome::Answered(String::from_utf8_lossy(&answer).into_owned())),
            Err(e) => match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
                Some(tls_error) => Ok(Outcome::Tls(tls_error.clone())),
                // Some servers close without `close_notify` after a full answer.
                None if e.kind() == std::io::ErrorKind::UnexpectedEof && !answer.is_empty() => {
                    Ok(Outcome::Answered(String::from_utf8_lossy(&answer).into_owned()))
                }
                None => Err(e).context(what),
            },
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the TLS client thread panicked"))?
}

fn enter_netns(ns: &str) -> Result<()> {
    let path = format!("/run/netns/{ns}");
    let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns on a valid namespace file descriptor; it changes only this thread's namespace.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("joining network namespace {ns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
