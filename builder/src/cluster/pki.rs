//! The cluster PKI: a CA per cluster and the certificates the etcd group needs (each member's
//! server and peer certificate, a client certificate for each k3s server of an `external-etcd`
//! cluster, one for the operator's `etcdctl`). Kept in `<out>/secrets/<cluster>-pki/` (mode 0700,
//! files 0600), created once from the kernel's randomness and reused by every later build, so
//! rebuilt images trust the nodes already running and stay byte-reproducible. A member added to
//! the inventory later gets its certificates from the existing CA. The CA's private key stays in
//! that directory: only certificates and the owning node's own keys go into the image.
//!
//! Each identity is one file holding a comment line (what it was issued for), its certificate and
//! its private key, created with [`secrets::create_new`], so a certificate and its key can never
//! come from two different builds. A certificate whose names changed (a member's new address) or
//! whose CA is not the current one is issued again by the current CA.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData, SanType,
};
use sha2::Digest;

use super::secrets;
use crate::profile::cluster::{Cluster, Datastore, Node, Role};

/// The directory of a node's TLS files: in the image under `etc/kiln/nodes/<node>/`, and where
/// `boot.d/35-identity.sh` copies them on the device (`/etc/kiln/etcd/`).
pub const SUBDIR: &str = "etcd";
/// Where the node's TLS files are on the device; `etcd.env` and `k3s-config.yaml` name them there.
pub const DEVICE_DIR: &str = "/etc/kiln/etcd";
/// The CA certificate (public; mode 0644 in the image).
pub const CA_CERT: &str = "ca.crt";

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// An etcd member's client-port certificate. It also authenticates as a client: etcd's own
    /// gRPC gateway dials the member with it when client certificates are required.
    EtcdServer,
    /// An etcd member's peer certificate (members are each other's servers and clients).
    EtcdPeer,
    /// A k3s server's client certificate for its datastore.
    DatastoreClient,
    /// The operator's `etcdctl`.
    Operator,
}

impl Kind {
    /// The file name stem in the image (`server.crt`, `server.key`, ...) and in `secrets/`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::EtcdServer => "server",
            Kind::EtcdPeer => "peer",
            Kind::DatastoreClient => "client",
            Kind::Operator => "etcdctl",
        }
    }

    fn usages(self) -> Vec<ExtendedKeyUsagePurpose> {
        match self {
            Kind::EtcdServer | Kind::EtcdPeer => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            Kind::DatastoreClient | Kind::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
        }
    }
}

/// A certificate and its private key, both PEM. `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Pair {
    pub cert: String,
    key: String,
}

impl Pair {
    /// The private key (PKCS#8 PEM), for the one file that must hold it.
    pub fn key_pem(&self) -> &str {
        &self.key
    }
}

impl fmt::Debug for Pair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pair").field("cert", &self.cert).field("key", &"<redacted>").finish()
    }
}

/// The cluster's certificates, ready to be rendered into the image.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA certificate (PEM).
    pub ca_cert: String,
    /// Per node name, its certificates by kind.
    pub nodes: BTreeMap<String, BTreeMap<Kind, Pair>>,
    /// Where it is kept: `<out>/secrets/<cluster>-pki`.
    pub dir: PathBuf,
}

/// `<out>/secrets/<cluster>-pki`.
pub fn dir(out_dir: &Path, cluster: &str) -> PathBuf {
    secrets::dir(out_dir).join(format!("{cluster}-pki"))
}

/// The certificates `node` carries: server and peer for an etcd member, a datastore client
/// certificate for a k3s server of an `external-etcd` cluster.
pub fn kinds_for(c: &Cluster, node: &Node) -> Vec<Kind> {
    let mut kinds = Vec::new();
    if node.has(Role::Etcd) {
        kinds.extend([Kind::EtcdServer, Kind::EtcdPeer]);
    }
    if node.has(Role::Server) && c.datastore == Datastore::ExternalEtcd {
        kinds.push(Kind::DatastoreClient);
    }
    kinds
}

/// The cluster's PKI, created on first use (`None` when the cluster has no etcd members).
pub fn load_or_create(c: &Cluster, out_dir: &Path) -> Result<Option<Pki>> {
    if !c.has_etcd() {
        return Ok(None);
    }
    let dir = dir(out_dir, &c.name);
    secrets::ensure_dir(&secrets::dir(out_dir))?;
    secrets::ensure_dir(&dir)?;
    let ca = Ca::load_or_create(&dir, &c.name)?;
    // A plain copy of the CA certificate for `etcdctl --cacert` and other clients.
    secrets::ensure(&dir.join(CA_CERT), ca.cert.as_bytes())?;
    let mut nodes = BTreeMap::new();
    for n in &c.nodes {
        let mut certs = BTreeMap::new();
        for kind in kinds_for(c, n) {
            certs.insert(kind, ca.issue_or_reuse(&dir, kind, &n.name, &sans(kind, n))?);
        }
        if !certs.is_empty() {
            nodes.insert(n.name.clone(), certs);
        }
    }
    // The operator's client certificate, also as separate files for `etcdctl --cert/--key`.
    let op = ca.issue_or_reuse(&dir, Kind::Operator, "etcdctl", &[])?;
    secrets::ensure(&dir.join("etcdctl.crt"), op.cert.as_bytes())?;
    secrets::ensure(&dir.join("etcdctl.key"), op.key.as_bytes())?;
    Ok(Some(Pki { ca_cert: ca.cert, nodes, dir }))
}

/// A member's names: its static address, its name, and loopback (the local health check and
/// `etcdctl` through a forwarded port connect to 127.0.0.1).
fn sans(kind: Kind, n: &Node) -> Vec<SanType> {
    if !matches!(kind, Kind::EtcdServer | Kind::EtcdPeer) {
        return Vec::new();
    }
    let mut v = Vec::new();
    if let Some(ip) = n.ip() {
        v.push(SanType::IpAddress(ip));
    }
    // Node names are validated DNS labels.
    if let Ok(name) = n.name.clone().try_into() {
        v.push(SanType::DnsName(name));
    }
    let loopback = SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST));
    if !v.contains(&loopback) {
        v.push(loopback);
    }
    v.push(SanType::DnsName("localhost".try_into().expect("a valid DNS name")));
    v
}

fn san_text(sans: &[SanType]) -> String {
    let names: Vec<String> = sans
        .iter()
        .map(|s| match s {
            SanType::IpAddress(ip) => format!("IP:{ip}"),
            SanType::DnsName(d) => format!("DNS:{}", d.as_str()),
            other => format!("{other:?}"),
        })
        .collect();
    if names.is_empty() {
        "no names".into()
    } else {
        names.join(" ")
    }
}

/// Validity of every certificate: from the Unix epoch to the end of year 9999.
///
/// Edge boards often have no battery-backed clock and boot at 1970-01-01 until NTP (or never, on
/// an isolated site), and etcd members must already trust each other then: a `not_before` of
/// "now" would make every handshake fail as "not yet valid" on such a board. `not_after` is
/// RFC 5280's "no well-defined expiration" date (99991231235959Z) because kiln has no rotation
/// on the device yet: a certificate that expires would take the datastore down on a date nobody
/// chose. A compromised key is dealt with by making a new CA (see docs/clusters.md).
fn validity(p: &mut CertificateParams) {
    p.not_before = rcgen::date_time_ymd(1970, 1, 1);
    p.not_after = rcgen::date_time_ymd(9999, 12, 31) + std::time::Duration::from_secs(86_399);
}

/// The CA: its certificate, and the key that signs (only in memory and in `ca.pem`).
struct Ca {
    cert: String,
    issuer: Issuer<'static, KeyPair>,
    /// Short fingerprint of the CA certificate, recorded in every certificate file it issued.
    id: String,
}

const CA_FILE: &str = "ca.pem";
const CA_MARK: &str = "# kiln cluster CA: ";

impl Ca {
    fn load_or_create(dir: &Path, cluster: &str) -> Result<Ca> {
        let path = dir.join(CA_FILE);
        let help = || {
            format!(
                "cluster CA {} (restore it from your backup; deleting {} makes a new CA that the running nodes do not trust)",
                path.display(),
                dir.display()
            )
        };
        if path.exists() {
            let text = std::fs::read_to_string(&path).with_context(help)?;
            return Ca::parse(&text).with_context(help);
        }
        let cn = format!("kiln cluster {cluster} CA");
        let key = KeyPair::generate().context("generating the CA key")?;
        let params = ca_params(&cn);
        let cert = params.self_signed(&key).context("signing the CA certificate")?;
        let text = format!("{CA_MARK}{cn}\n{}{}", cert.pem(), key.serialize_pem());
        match secrets::create_new(&path, text.as_bytes()).with_context(help)? {
            secrets::Created::Written => Ca::parse(&text).with_context(help),
            secrets::Created::Existing(other) => Ca::parse(&String::from_utf8_lossy(&other)).with_context(help),
        }
    }

    fn parse(text: &str) -> Result<Ca> {
        let cn = text.lines().next().and_then(|l| l.strip_prefix(CA_MARK)).context("its first line is not kiln's CA line")?;
        let cert = pem_block(text, "CERTIFICATE").context("it holds no certificate")?;
        let key_pem = pem_block(text, "PRIVATE KEY").context("it holds no private key")?;
        let key = KeyPair::from_pem(&key_pem).context("its private key cannot be read")?;
        if !contains(&der(&cert)?, &key.subject_public_key_info()) {
            bail!("its certificate is not the private key's");
        }
        let id = hex::encode(&sha2::Sha256::digest(der(&cert)?)[..8]);
        Ok(Ca { cert, issuer: Issuer::new(ca_params(cn), key), id })
    }

    /// The certificate of `kind` for `name` from `dir`, or a new one when there is none, when
    /// its names differ from `sans`, or when another CA issued it.
    fn issue_or_reuse(&self, dir: &Path, kind: Kind, name: &str, sans: &[SanType]) -> Result<Pair> {
        let file = match kind {
            Kind::Operator => "etcdctl.pem".to_string(),
            k => format!("{name}.{}.pem", k.name()),
        };
        let path = dir.join(&file);
        let mark = format!("# kiln {} certificate of {name}: {}; CA {}", describe(kind), san_text(sans), self.id);
        let help = || format!("certificate file {} (delete it to have kiln issue a new one from the cluster CA)", path.display());
        if let Ok(text) = std::fs::read_to_string(&path) {
            if text.lines().next() == Some(mark.as_str()) {
                return parse_pair(&text).with_context(help);
            }
            tracing::info!("issuing the {} certificate of {name} again: its names or its CA changed", describe(kind));
            let text = self.issue(kind, name, sans, &mark)?;
            secrets::replace(&path, text.as_bytes()).with_context(help)?;
            return parse_pair(&text).with_context(help);
        }
        let text = self.issue(kind, name, sans, &mark)?;
        match secrets::create_new(&path, text.as_bytes()).with_context(help)? {
            secrets::Created::Written => parse_pair(&text),
            // Another build issued it meanwhile (for the same inputs): use that one.
            secrets::Created::Existing(other) => parse_pair(&String::from_utf8_lossy(&other)),
        }
        .with_context(help)
    }

    fn issue(&self, kind: Kind, name: &str, sans: &[SanType], mark: &str) -> Result<String> {
        let key = KeyPair::generate().context("generating a key")?;
        let mut p = named_params(name);
        p.subject_alt_names = sans.to_vec();
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = kind.usages();
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.issuer).with_context(|| format!("signing the {} certificate of {name}", describe(kind)))?;
        Ok(format!("{mark}\n{}{}", cert.pem(), key.serialize_pem()))
    }
}

fn describe(kind: Kind) -> &'static str {
    match kind {
        Kind::EtcdServer => "etcd server",
        Kind::EtcdPeer => "etcd peer",
        Kind::DatastoreClient => "datastore client",
        Kind::Operator => "etcdctl client",
    }
}

/// Parameters every certificate kiln issues starts from: its validity and the name `cn` (O=kiln).
fn named_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    validity(&mut p);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "kiln");
    p.distinguished_name = dn;
    p
}

/// The CA's parameters; rebuilt from its common name when the CA is loaded, so certificates it
/// issues later name it exactly as its own certificate does.
fn ca_params(cn: &str) -> CertificateParams {
    let mut p = named_params(cn);
    // Signs leaf certificates only.
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

fn parse_pair(text: &str) -> Result<Pair> {
    let cert = pem_block(text, "CERTIFICATE").context("it holds no certificate")?;
    let key = pem_block(text, "PRIVATE KEY").context("it holds no private key")?;
    let kp = KeyPair::from_pem(&key).context("its private key cannot be read")?;
    if !contains(&der(&cert)?, &kp.subject_public_key_info()) {
        bail!("its certificate is not the private key's");
    }
    Ok(Pair { cert, key })
}

/// The first `-----BEGIN <label>-----` ... `-----END <label>-----` block, with its final newline.
fn pem_block(text: &str, label: &str) -> Option<String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)?;
    let stop = text[start..].find(&end)? + start + end.len();
    Some(format!("{}\n", &text[start..stop]))
}

/// The DER inside one PEM block.
fn der(block: &str) -> Result<Vec<u8>> {
    let b64: String = block.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(b64.trim()).context("its PEM is not base64")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests;
