//! The `cluster` section of the profile: one image for every machine of a k3s cluster (and its
//! etcd group). The types here are the file format; [`validate`] checks what the types cannot.
//! The `cluster` module renders each inventory node's configuration into the root at build
//! time, and the boot step `boot.d/35-identity.sh` picks the node on the device.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub mod validate;

pub use validate::validate;

/// The k3s API port (`https://<api_address>:6443`) when `api_address` names none.
pub const DEFAULT_API_PORT: u16 = 6443;
/// etcd's plain-HTTP `/health` and `/metrics` listener, on loopback only (the node's own health
/// check; the client port requires a client certificate). Its usual port (kubeadm's too).
pub const ETCD_METRICS_PORT: u16 = 2381;

/// A k3s cluster (and, for `external-etcd`, its etcd group) formed from one image: every machine
/// boots the same image and finds its place by MAC address or `kiln.node=<name>`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Cluster name (a lower-case DNS label of at most 50 characters): the etcd cluster token and
    /// the prefix of the host names of machines that are not in the inventory
    /// (`<name>-<mac without colons>`).
    pub name: String,
    /// File holding the cluster token (relative to the profile), e.g. the token of an existing
    /// cluster that agents join. Absent: a random token is generated at the first build into
    /// `<out>/secrets/<name>.token` (mode 0600) and reused by later builds.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Where the servers keep cluster state: `sqlite` (one server, k3s's default),
    /// `embedded-etcd` (an odd number of servers, k3s's own etcd), `external-etcd` (an odd
    /// number of nodes with the `etcd` role run etcd; servers use it) or `external` (any k3s
    /// `datastore-endpoint`, given in `datastore_endpoint`).
    #[serde(default)]
    pub datastore: Datastore,
    /// The k3s `datastore-endpoint` for `datastore: external` (e.g.
    /// `postgres://user:pass@db:5432/k3s`); only allowed there.
    #[serde(default)]
    pub datastore_endpoint: Option<String>,
    /// The fixed registration address agents and joining servers use: a VIP, a DNS name or the
    /// first server's address, with an optional port (default 6443): `10.0.0.10`,
    /// `k3s.lab:6443`, `[fd00::10]:6443`. Also put in the servers' `tls-san`. Absent: the address
    /// of the only server, if there is exactly one and it has a static `address`.
    #[serde(default)]
    pub api_address: Option<String>,
    /// The machines kiln knows: each one's configuration is rendered at build time and chosen at
    /// boot by MAC address or by `kiln.node=<name>` on the kernel command line.
    #[serde(default)]
    pub nodes: Vec<Node>,
    /// Role of a machine whose MAC is not in `nodes`: `agent` (joins through `api_address`),
    /// `server` (joins as another server; not with `external-etcd`, whose servers need a client
    /// certificate issued to an inventory node) or `none` (runs no k3s). Its host name is
    /// `<cluster name>-<MAC of its first wired NIC without colons>`.
    #[serde(default)]
    pub default_role: DefaultRole,
    /// k3s settings shared by every node.
    #[serde(default)]
    pub k3s: K3s,
    /// Ports of the etcd group (`datastore: external-etcd`; both mutual TLS with certificates
    /// from the cluster CA; neither may be 2381, each member's loopback health port).
    #[serde(default)]
    pub etcd: Etcd,
}

/// Where the k3s servers keep cluster state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Datastore {
    /// SQLite on the single server (k3s's default).
    #[default]
    Sqlite,
    /// k3s's embedded etcd on an odd number of servers; the first one starts the cluster.
    EmbeddedEtcd,
    /// A separate etcd group on the nodes with the `etcd` role.
    ExternalEtcd,
    /// Any datastore k3s reaches through `datastore_endpoint`.
    External,
}

impl Datastore {
    pub fn name(self) -> &'static str {
        match self {
            Datastore::Sqlite => "sqlite",
            Datastore::EmbeddedEtcd => "embedded-etcd",
            Datastore::ExternalEtcd => "external-etcd",
            Datastore::External => "external",
        }
    }
}

/// One machine of the inventory.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Node name: a lower-case DNS label; the host name, the k3s `node-name` and the etcd member name.
    pub name: String,
    /// MAC address of the machine (`52:54:00:12:34:56`), or a list of them (one per NIC). Any NIC
    /// with one of them identifies the machine. Compared in lower case; `-` separators are accepted.
    pub mac: Macs,
    /// What the node runs: any of `server`, `agent`, `etcd` (`etcd` only with
    /// `datastore: external-etcd`). A server is also an agent in k3s: list `server` alone.
    pub roles: Vec<Role>,
    /// Static address with prefix length, e.g. `10.0.0.11/24`, set on the NIC whose MAC matched
    /// (the first wired NIC when the node was chosen by `kiln.node=`). Absent: the profile's
    /// `network` settings (DHCP by default). Needed on etcd members and on the servers of a
    /// multi-server `embedded-etcd` cluster: their URLs are fixed at build time.
    #[serde(default)]
    pub address: Option<String>,
    /// Default gateway for `address`.
    #[serde(default)]
    pub gateway: Option<String>,
}

/// One MAC address or a list of them.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Macs {
    One(String),
    Many(Vec<String>),
}

impl Macs {
    pub fn as_slice(&self) -> &[String] {
        match self {
            Macs::One(m) => std::slice::from_ref(m),
            Macs::Many(v) => v,
        }
    }
}

/// What a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// A member of the external etcd group; started before a server on the same node.
    Etcd,
    /// A k3s server (control plane; also runs workloads).
    Server,
    /// A k3s agent (workloads only).
    Agent,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Etcd => "etcd",
            Role::Server => "server",
            Role::Agent => "agent",
        }
    }
}

/// Role of machines that are not in the inventory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultRole {
    /// Join as an agent through `api_address`.
    #[default]
    Agent,
    /// Join as another server through `api_address`.
    Server,
    /// Run no k3s.
    None,
}

impl DefaultRole {
    pub fn role(self) -> Option<Role> {
        match self {
            DefaultRole::Agent => Some(Role::Agent),
            DefaultRole::Server => Some(Role::Server),
            DefaultRole::None => None,
        }
    }
}

/// k3s settings shared by every node.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct K3s {
    /// Any other k3s setting, copied into every node's `/etc/rancher/k3s/config.yaml` (keys are
    /// the k3s flags without dashes: `disable: [traefik]`, `flannel-backend: host-gw`,
    /// `cluster-cidr`, `node-label`, ...). kiln sets `token`, `server`, `cluster-init`,
    /// `datastore-endpoint`, `node-name` and `node-ip` itself (with `external-etcd` also
    /// `datastore-cafile`, `datastore-certfile` and `datastore-keyfile`, the etcd group's TLS
    /// files): they are refused here. `tls-san` entries are added after `api_address`.
    #[serde(default)]
    pub config: BTreeMap<String, serde_json::Value>,
    /// k3s release to install (required): `vMAJOR.MINOR.PATCH+k3sN`, e.g. `v1.33.5+k3s1`. Its
    /// binary and air-gap image archive for each architecture are verified against the release's
    /// `sha256sum-<arch>.txt` and cached like every other input.
    #[serde(default)]
    pub version: Option<String>,
    /// Where the release assets come from: an `http(s)://` mirror laid out like the release
    /// (`<source>/<version>/<asset>`) or a local directory (relative to the profile) holding the
    /// assets (`k3s`, `k3s-arm64`, `k3s-riscv64`, `k3s-airgap-images-<amd64|arm64|riscv64>.tar.zst`,
    /// `sha256sum-<amd64|arm64|riscv64>.txt`) directly. Default: k3s's GitHub release downloads.
    /// `kiln build --k3s-assets DIR|URL` overrides it.
    #[serde(default)]
    pub source: Option<String>,
    /// Optional pins: the sha256 of the k3s binary per architecture (`{x86_64: <sha256>}`),
    /// checked as well as the release's checksum list. Without pins, the list is trusted as
    /// served: its integrity rests on HTTPS (or on the local directory).
    #[serde(default)]
    pub sha256: BTreeMap<crate::arch::Arch, String>,
}

/// Ports of the etcd group.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Etcd {
    /// Client port (k3s servers connect here).
    #[serde(default = "default_client_port")]
    pub client_port: u16,
    /// Peer port (etcd members talk to each other here).
    #[serde(default = "default_peer_port")]
    pub peer_port: u16,
}

fn default_client_port() -> u16 {
    2379
}

fn default_peer_port() -> u16 {
    2380
}

impl Default for Etcd {
    fn default() -> Self {
        Etcd { client_port: default_client_port(), peer_port: default_peer_port() }
    }
}

/// `host[:port]` of the k3s API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiAddress {
    /// IP address or DNS name, without brackets.
    pub host: String,
    pub port: u16,
}

impl ApiAddress {
    /// Parses `10.0.0.10`, `k3s.lab:6443`, `fd00::10` or `[fd00::10]:6443`.
    pub fn parse(s: &str) -> Result<ApiAddress, String> {
        let bad = || format!("`{s}` is not an IP address or DNS name with an optional port (e.g. `10.0.0.10`, `k3s.lab:6443`)");
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(bad)?;
            if h.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad());
            }
            match after.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if after.is_empty() => (h, None),
                None => return Err(bad()),
            }
        } else if s.matches(':').count() > 1 {
            if s.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad());
            }
            (s, None)
        } else {
            match s.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let port = match port {
            None => DEFAULT_API_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(format!("`{p}` in `{s}` is not a port")),
            },
        };
        if host.parse::<IpAddr>().is_err() && !is_dns_name(host) {
            return Err(bad());
        }
        Ok(ApiAddress { host: host.to_string(), port })
    }

    /// `https://host:port`, with an IPv6 host in brackets.
    pub fn url(&self) -> String {
        format!("https://{}:{}", url_host(&self.host), self.port)
    }
}

impl std::fmt::Display for ApiAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", url_host(&self.host), self.port)
    }
}

/// An IPv6 address in brackets, anything else as is (for URLs).
pub fn url_host(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// A lower-case RFC 1123 label (node and cluster names).
pub fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Dot-separated labels (case-insensitive), not all-numeric.
fn is_dns_name(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    s.len() <= 253 && lower.split('.').all(is_label) && !lower.chars().all(|c| c.is_ascii_digit() || c == '.')
}

/// `AA-BB-CC-dd-ee-ff` / `aa:bb:cc:dd:ee:ff` to `aa:bb:cc:dd:ee:ff`; `None` if malformed.
pub fn normalise_mac(s: &str) -> Option<String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    let ok = parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    ok.then(|| parts.join(":").to_ascii_lowercase())
}

impl Node {
    pub fn has(&self, r: Role) -> bool {
        self.roles.contains(&r)
    }

    /// The static address without its prefix length.
    pub fn ip(&self) -> Option<IpAddr> {
        self.address.as_deref().and_then(|a| a.split_once('/')).and_then(|(ip, _)| ip.parse().ok())
    }

    /// Roles in start order (`etcd server agent`), without duplicates.
    pub fn sorted_roles(&self) -> Vec<Role> {
        let mut r = self.roles.clone();
        r.sort();
        r.dedup();
        r
    }
}

impl Cluster {
    pub fn servers(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.has(Role::Server))
    }

    pub fn etcd_members(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.has(Role::Etcd))
    }

    /// The registration address: `api_address`, else the only server's static address.
    pub fn api(&self) -> Option<ApiAddress> {
        if let Some(a) = &self.api_address {
            return ApiAddress::parse(a).ok();
        }
        let servers: Vec<&Node> = self.servers().collect();
        match servers.as_slice() {
            [only] => only.ip().map(|ip| ApiAddress { host: ip.to_string(), port: DEFAULT_API_PORT }),
            _ => None,
        }
    }
}

impl Cluster {
    /// Whether any machine runs k3s: a node with the `server` or `agent` role, or a default role
    /// other than `none`. An etcd-only cluster (e.g. the datastore group of an external-etcd
    /// layout built as its own image) needs no k3s release.
    pub fn needs_k3s(&self) -> bool {
        self.default_role != DefaultRole::None || self.nodes.iter().any(|n| n.has(Role::Server) || n.has(Role::Agent))
    }

    pub fn has_etcd(&self) -> bool {
        self.etcd_members().next().is_some()
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_addresses_parse_with_default_port() {
        let a = |s: &str| ApiAddress::parse(s).map(|a| (a.host, a.port));
        assert_eq!(a("10.0.0.10"), Ok(("10.0.0.10".into(), 6443)));
        assert_eq!(a("k3s.lab:7443"), Ok(("k3s.lab".into(), 7443)));
        assert_eq!(a("fd00::10"), Ok(("fd00::10".into(), 6443)));
        assert_eq!(a("[fd00::10]:6444"), Ok(("fd00::10".into(), 6444)));
        assert_eq!(ApiAddress::parse("[fd00::10]:6444").unwrap().url(), "https://[fd00::10]:6444");
        for bad in ["", "10.0.0.10:0", "a b", "[nope]:1", "host:port", "-x.lab", "10.0.0.300"] {
            assert!(ApiAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn macs_normalise_to_lower_case_colons() {
        assert_eq!(normalise_mac("52-54-00-AB-cd-EF").as_deref(), Some("52:54:00:ab:cd:ef"));
        for bad in ["52:54:00:ab:cd", "52:54:00:ab:cd:eg", "5254.00ab.cdef", "52:54:00:ab:cd:ef:01"] {
            assert!(normalise_mac(bad).is_none(), "{bad}");
        }
    }
}
