//! Semantic checks of the `cluster` key: what the types cannot say. Every error names the key
//! (`cluster.nodes[2].mac`) and says what to change.

use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::{bail, Context, Result};

use super::{is_label, normalise_mac, ApiAddress, Cluster, Datastore, DefaultRole, Role, ETCD_METRICS_PORT};
use crate::profile::system::parse_cidr;
use crate::profile::Profile;

/// Keys of a node's k3s `config.yaml` that kiln writes itself (`k3s.config` may not set them).
pub const KILN_K3S_KEYS: &[&str] = &["token", "server", "cluster-init", "datastore-endpoint", "node-name", "node-ip"];
/// Keys kiln also sets with `datastore: external-etcd`: the servers' TLS files for the etcd group.
pub const KILN_ETCD_TLS_KEYS: &[&str] = &["datastore-cafile", "datastore-certfile", "datastore-keyfile"];

/// Longest cluster name: `<name>-<12 hex digits>` must stay a 63-character host name.
const MAX_CLUSTER_NAME: usize = 63 - 13;

/// Checks the profile's `cluster` key (if any).
pub fn validate(p: &Profile) -> Result<()> {
    let Some(c) = &p.cluster else { return Ok(()) };
    if !is_label(&c.name) || c.name.len() > MAX_CLUSTER_NAME {
        bail!(
            "key `cluster.name`: `{}` must be a lower-case DNS label (letters, digits, `-`) of at most {MAX_CLUSTER_NAME} characters",
            c.name
        );
    }
    if let Some(f) = &c.token_file {
        if f.as_os_str().is_empty() {
            bail!("key `cluster.token_file`: empty path; remove the key to have kiln generate a token");
        }
    }
    match (c.datastore, &c.datastore_endpoint) {
        (Datastore::External, None) => bail!("key `cluster.datastore_endpoint`: `datastore: external` needs the k3s datastore endpoint (e.g. `postgres://user:pass@db:5432/k3s`)"),
        (Datastore::External, Some(e)) if e.trim().is_empty() || e.contains(['\n', '\r']) => {
            bail!("key `cluster.datastore_endpoint`: must be one non-empty line")
        }
        (Datastore::External, Some(_)) => {}
        (d, Some(_)) => bail!("key `cluster.datastore_endpoint`: only used with `datastore: external` (this cluster uses `{}`)", d.name()),
        (_, None) => {}
    }
    if let Some(a) = &c.api_address {
        ApiAddress::parse(a).map_err(|e| anyhow::anyhow!("key `cluster.api_address`: {e}"))?;
    }
    nodes(c)?;
    datastore_and_roles(c)?;
    api_needed(c)?;
    k3s_config(c)?;
    match &c.k3s.version {
        None if c.needs_k3s() => bail!("key `cluster.k3s.version`: required for clusters that run k3s (a `server` or `agent` node, or a `default_role` other than `none`): the k3s release to install, e.g. `v1.33.5+k3s1`"),
        None => {}
        Some(v) => check_version(v).map_err(|e| anyhow::anyhow!("key `cluster.k3s.version`: {e}"))?,
    }
    if let Some(s) = &c.k3s.source {
        if s.trim().is_empty() || s.contains(['\n', '\r']) {
            bail!(
                "key `cluster.k3s.source`: give an `http(s)://` mirror URL or a directory, or remove the key for the k3s release downloads"
            );
        }
    }
    for (arch, pin) in &c.k3s.sha256 {
        if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("key `cluster.k3s.sha256.{arch}`: `{pin}` is not a sha256 (64 hex digits)");
        }
        if !p.arch.contains(arch) {
            bail!("key `cluster.k3s.sha256.{arch}`: the profile does not build {arch} (key `arch`)");
        }
    }
    if c.etcd.client_port == 0 || c.etcd.peer_port == 0 || c.etcd.client_port == c.etcd.peer_port {
        bail!("key `cluster.etcd`: `client_port` and `peer_port` must be two different non-zero ports");
    }
    if c.has_etcd() && [c.etcd.client_port, c.etcd.peer_port].contains(&ETCD_METRICS_PORT) {
        bail!("key `cluster.etcd`: port {ETCD_METRICS_PORT} is etcd's loopback health port on every member; choose another `client_port` or `peer_port`");
    }
    network(p, c)?;
    Ok(())
}

fn nodes(c: &Cluster) -> Result<()> {
    let mut names = BTreeMap::new();
    let mut macs = BTreeMap::new();
    let mut ips: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for (i, n) in c.nodes.iter().enumerate() {
        let key = format!("cluster.nodes[{i}]");
        if !is_label(&n.name) {
            bail!("key `{key}.name`: `{}` must be a lower-case DNS label (letters, digits, `-`, at most 63)", n.name);
        }
        if let Some(j) = names.insert(n.name.as_str(), i) {
            bail!("key `{key}.name`: `{}` is also the name of `cluster.nodes[{j}]`", n.name);
        }
        if n.mac.as_slice().is_empty() {
            bail!("key `{key}.mac`: give at least one MAC address");
        }
        for m in n.mac.as_slice() {
            let norm = normalise_mac(m).with_context(|| format!("key `{key}.mac`: `{m}` is not a MAC address like `52:54:00:12:34:56`"))?;
            if let Some(j) = macs.insert(norm.clone(), i) {
                bail!("key `{key}.mac`: {norm} is also a MAC of `cluster.nodes[{j}]` (`{}`)", c.nodes[j].name);
            }
        }
        if n.roles.is_empty() {
            bail!("key `{key}.roles`: give at least one of `server`, `agent`, `etcd`");
        }
        if n.sorted_roles().len() != n.roles.len() {
            bail!("key `{key}.roles`: a role is listed twice");
        }
        if n.has(Role::Server) && n.has(Role::Agent) {
            bail!("key `{key}.roles`: a k3s server is also an agent; list `server` alone");
        }
        match (&n.address, &n.gateway) {
            (None, Some(_)) => bail!("key `{key}.gateway`: a gateway goes with a static `address`"),
            (None, None) => {}
            (Some(a), g) => {
                let ip = parse_cidr(a).with_context(|| format!("key `{key}.address`"))?;
                if let Some(j) = ips.insert(ip, i) {
                    bail!("key `{key}.address`: {ip} is also the address of `cluster.nodes[{j}]` (`{}`)", c.nodes[j].name);
                }
                if let Some(g) = g {
                    let gw: IpAddr = g.parse().map_err(|_| anyhow::anyhow!("key `{key}.gateway`: `{g}` is not an IP address"))?;
                    if gw.is_ipv4() != ip.is_ipv4() {
                        bail!("key `{key}.gateway`: `{g}` is not of the address's family");
                    }
                }
            }
        }
    }
    Ok(())
}

/// The datastore mode must fit the roles, and URLs fixed at build time need fixed addresses.
fn datastore_and_roles(c: &Cluster) -> Result<()> {
    let servers: Vec<usize> = index_of(c, Role::Server);
    let etcd: Vec<usize> = index_of(c, Role::Etcd);
    if c.datastore != Datastore::ExternalEtcd {
        if let Some(&i) = etcd.first() {
            bail!(
                "key `cluster.nodes[{i}].roles`: the `etcd` role runs a separate etcd group, which needs `datastore: external-etcd` (this cluster uses `{}`)",
                c.datastore.name()
            );
        }
    }
    match c.datastore {
        Datastore::Sqlite => {
            if servers.len() > 1 || (servers.len() == 1 && c.default_role == DefaultRole::Server) {
                bail!("key `cluster.datastore`: `sqlite` keeps state on one server, but this inventory (or `default_role: server`) has more; use `embedded-etcd` or `external-etcd`");
            }
        }
        Datastore::EmbeddedEtcd => {
            if servers.is_empty() {
                bail!("key `cluster.datastore`: `embedded-etcd` needs at least one node with the `server` role in `cluster.nodes`");
            }
            if servers.len() % 2 == 0 {
                bail!("key `cluster.nodes`: `embedded-etcd` needs an odd number of servers for quorum (found {})", servers.len());
            }
            if servers.len() > 1 {
                if let Some(&i) = servers.iter().find(|&&i| c.nodes[i].address.is_none()) {
                    bail!("key `cluster.nodes[{i}].address`: the servers of a multi-server `embedded-etcd` cluster need static addresses (their etcd URLs are fixed at build time)");
                }
            }
        }
        Datastore::ExternalEtcd => {
            if etcd.is_empty() || etcd.len() % 2 == 0 {
                bail!("key `cluster.nodes`: `external-etcd` needs an odd number of nodes with the `etcd` role (found {})", etcd.len());
            }
            if let Some(&i) = etcd.iter().find(|&&i| c.nodes[i].address.is_none()) {
                bail!("key `cluster.nodes[{i}].address`: etcd members need static addresses (the initial cluster and the servers' `datastore-endpoint` are fixed at build time)");
            }
            if c.default_role == DefaultRole::Server {
                bail!("key `cluster.default_role`: with `external-etcd` each server needs its own etcd client certificate, issued at build time to an inventory node; list the servers in `cluster.nodes`, or use `agent` or `none`");
            }
        }
        Datastore::External => {}
    }
    Ok(())
}

fn index_of(c: &Cluster, r: Role) -> Vec<usize> {
    c.nodes.iter().enumerate().filter(|(_, n)| n.has(r)).map(|(i, _)| i).collect()
}

/// Agents, joining servers and unknown machines register through the API address.
fn api_needed(c: &Cluster) -> Result<()> {
    if c.api().is_some() {
        return Ok(());
    }
    let why = "set `cluster.api_address` (a VIP, DNS name or the first server's address), or give the only server a static `address`";
    if let Some(i) = c.nodes.iter().position(|n| n.has(Role::Agent)) {
        bail!("key `cluster.nodes[{i}].roles`: agent `{}` needs the server's address to join: {why}", c.nodes[i].name);
    }
    if c.datastore == Datastore::EmbeddedEtcd && c.servers().count() > 1 {
        bail!("key `cluster.api_address`: the servers after the first join through it: {why}");
    }
    match c.default_role {
        DefaultRole::None => Ok(()),
        r => bail!(
            "key `cluster.default_role`: machines not in the inventory join as `{}` and need the server's address: {why}; or set `default_role: none`",
            r.role().map(Role::name).unwrap_or_default()
        ),
    }
}

fn k3s_config(c: &Cluster) -> Result<()> {
    for (k, v) in &c.k3s.config {
        let base = k.trim_end_matches('+');
        if KILN_K3S_KEYS.contains(&base) {
            bail!("key `cluster.k3s.config.{k}`: kiln sets `{base}` itself from the `cluster` key; remove it");
        }
        if c.datastore == Datastore::ExternalEtcd && KILN_ETCD_TLS_KEYS.contains(&base) {
            bail!("key `cluster.k3s.config.{k}`: with `datastore: external-etcd` kiln sets `{base}` itself (the cluster CA's certificates in /etc/kiln/etcd/); remove it");
        }
        if k.is_empty() || !k.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_+.".contains(ch)) {
            bail!("key `cluster.k3s.config.{k}`: not a k3s setting name (the flag without dashes, e.g. `flannel-backend`)");
        }
        if base == "tls-san" {
            let ok = v.is_string() || v.as_array().is_some_and(|a| a.iter().all(|x| x.is_string()));
            if !ok {
                bail!("key `cluster.k3s.config.{k}`: a name or a list of names");
            }
        }
    }
    Ok(())
}

/// A node's static address is applied to one NIC at boot; a static address in the profile's
/// global `network.interfaces` would be the same on every machine of the cluster.
fn network(p: &Profile, c: &Cluster) -> Result<()> {
    let Some(i) = c.nodes.iter().position(|n| n.address.is_some()) else { return Ok(()) };
    if let Some((ifname, _)) = p.network.interfaces.iter().find(|(_, iface)| iface.address.is_some()) {
        bail!(
            "key `cluster.nodes[{i}].address`: `network.interfaces.{ifname}` also sets a static address, which every machine booting this image would share; give static addresses per node in `cluster.nodes` only"
        );
    }
    Ok(())
}

/// Checks the shape of a k3s release name: `vMAJOR.MINOR.PATCH+k3sN`.
pub fn check_version(v: &str) -> Result<(), String> {
    let bad = || format!("`{v}` is not a k3s release name of the form `vMAJOR.MINOR.PATCH+k3sN` (e.g. `v1.33.5+k3s1`)");
    let rest = v.strip_prefix('v').ok_or_else(bad)?;
    let (semver, build) = rest.split_once('+').ok_or_else(bad)?;
    let number = |s: &str| !s.is_empty() && s.len() <= 9 && s.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = semver.split('.').collect();
    if parts.len() != 3 || !parts.iter().all(|p| number(p)) {
        return Err(bad());
    }
    match build.strip_prefix("k3s") {
        Some(n) if number(n) => Ok(()),
        _ => Err(bad()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::profile::{test_parse, test_profile};

    const MACS: [&str; 6] =
        ["52:54:00:00:00:01", "52:54:00:00:00:02", "52:54:00:00:00:03", "52:54:00:00:00:04", "52:54:00:00:00:05", "52:54:00:00:00:06"];

    fn node(i: usize, roles: &str, addr: bool) -> String {
        let a = if addr { format!(", address: 10.0.0.{}/24", 10 + i) } else { String::new() };
        format!("    - {{name: n{i}, mac: \"{}\", roles: [{roles}]{a}}}\n", MACS[i])
    }

    /// Adds the required `k3s.version` to a fixture's `cluster` lines unless it sets one.
    pub(crate) fn with_version(cluster: &str) -> String {
        if cluster.contains("version") {
            cluster.to_string()
        } else if cluster.contains("k3s: {") {
            cluster.replace("k3s: {", "k3s: {version: v1.33.5+k3s1, ")
        } else {
            format!("{cluster}  k3s: {{version: v1.33.5+k3s1}}\n")
        }
    }

    fn check(cluster: &str) -> Result<(), String> {
        let p = test_parse(&format!("cluster:\n  name: lab\n{}", with_version(cluster))).map_err(|e| e.to_string())?;
        super::validate(&p).map_err(|e| format!("{e:#}"))
    }

    fn nodes(list: &[String]) -> String {
        format!("  nodes:\n{}", list.concat())
    }

    #[test]
    fn good_layouts_pass() {
        check(&format!("  default_role: none\n{}", nodes(&[node(0, "server", false)]))).unwrap();
        check(&nodes(&[node(0, "server", true), node(1, "agent", false)])).unwrap();
        check(&format!(
            "  datastore: embedded-etcd\n  api_address: 10.0.0.10\n{}",
            nodes(&[node(0, "server", true), node(1, "server", true), node(2, "server", true), node(3, "agent", false)])
        ))
        .unwrap();
        check(&format!(
            "  datastore: external-etcd\n  api_address: k3s.lab:6443\n{}",
            nodes(&[node(0, "etcd, server", true), node(1, "etcd, server", true), node(2, "etcd, server", true), node(3, "agent", false)])
        ))
        .unwrap();
        check("  api_address: 10.0.0.10\n  token_file: lab.token\n  nodes:\n    - {name: a1, mac: [\"52:54:00:00:00:01\", \"52-54-00-00-00-0A\"], roles: [agent]}\n").unwrap();
        check("  datastore: external\n  datastore_endpoint: \"postgres://k3s@db/k3s\"\n  api_address: 10.0.0.10\n").unwrap();
    }

    #[test]
    fn bad_layouts_name_the_key() {
        let n = |list: &[String]| nodes(list);
        for (cluster, key) in [
            (format!("  default_role: none\n{}", n(&[node(0, "server", true), node(0, "agent", false)])), "`cluster.nodes[1].name`"),
            (
                "  default_role: none\n  nodes:\n    - {name: a, mac: \"52:54:00:00:00:01\", roles: [server]}\n    - {name: b, mac: [\"52:54:00:00:00:02\", \"52:54:00:00:00:01\"], roles: [agent]}\n".into(),
                "`cluster.nodes[1].mac`",
            ),
            ("  default_role: none\n  nodes:\n    - {name: a, mac: \"52:54:00:00:00\", roles: [server]}\n".into(), "`cluster.nodes[0].mac`"),
            ("  default_role: none\n  nodes:\n    - {name: a, mac: [], roles: [server]}\n".into(), "`cluster.nodes[0].mac`"),
            ("  default_role: none\n  nodes:\n    - {name: a, mac: \"52:54:00:00:00:01\", roles: []}\n".into(), "`cluster.nodes[0].roles`"),
            ("  default_role: none\n  nodes:\n    - {name: a, mac: \"52:54:00:00:00:01\", roles: [server, agent]}\n".into(), "`cluster.nodes[0].roles`"),
            ("  default_role: none\n  nodes:\n    - {name: a, mac: \"52:54:00:00:00:01\", roles: [server], address: 10.0.0.1}\n".into(), "`cluster.nodes[0].address`"),
            ("  default_role: none\n  nodes:\n    - {name: a, mac: \"52:54:00:00:00:01\", roles: [server], gateway: 10.0.0.1}\n".into(), "`cluster.nodes[0].gateway`"),
            ("  default_role: none\n  nodes:\n    - {name: a, mac: \"52:54:00:00:00:01\", roles: [server], address: 10.0.0.5/24, gateway: \"fd00::1\"}\n".into(), "`cluster.nodes[0].gateway`"),
            ("  api_address: 10.0.0.1\n  nodes:\n    - {name: a, mac: \"52:54:00:00:00:01\", roles: [agent], address: 10.0.0.5/24}\n    - {name: b, mac: \"52:54:00:00:00:02\", roles: [agent], address: 10.0.0.5/16}\n".into(), "`cluster.nodes[1].address`"),
            // datastore modes against roles
            (format!("  datastore: external-etcd\n  api_address: 10.0.0.1\n{}", n(&[node(0, "etcd", true), node(1, "etcd", true)])), "`cluster.nodes`"),
            ("  datastore: external-etcd\n  api_address: 10.0.0.1\n".into(), "`cluster.nodes`"),
            (format!("  datastore: external-etcd\n  api_address: 10.0.0.1\n{}", n(&[node(0, "etcd", true), node(1, "etcd", false), node(2, "etcd", true)])), "`cluster.nodes[1].address`"),
            (format!("  api_address: 10.0.0.1\n{}", n(&[node(0, "etcd", true)])), "`cluster.nodes[0].roles`"),
            (format!("  datastore: embedded-etcd\n  api_address: 10.0.0.1\n{}", n(&[node(0, "agent", false)])), "`cluster.datastore`"),
            (format!("  datastore: embedded-etcd\n  api_address: 10.0.0.1\n{}", n(&[node(0, "server", true), node(1, "server", true)])), "`cluster.nodes`"),
            (format!("  datastore: embedded-etcd\n  api_address: 10.0.0.1\n{}", n(&[node(0, "server", true), node(1, "server", false), node(2, "server", true)])), "`cluster.nodes[1].address`"),
            (format!("  datastore: embedded-etcd\n  default_role: none\n{}", n(&[node(0, "server", true), node(1, "server", true), node(2, "server", true)])), "`cluster.api_address`"),
            (format!("  api_address: 10.0.0.1\n{}", n(&[node(0, "server", true), node(1, "server", true)])), "`cluster.datastore`"),
            (format!("  api_address: 10.0.0.1\n  default_role: server\n{}", n(&[node(0, "server", true)])), "`cluster.datastore`"),
            // agents need an API address
            (n(&[node(0, "server", false), node(1, "agent", false)]), "`cluster.nodes[1].roles`"),
            (n(&[node(0, "server", false)]), "`cluster.default_role`"),
            ("  datastore: external\n  api_address: 10.0.0.1\n".into(), "`cluster.datastore_endpoint`"),
            ("  datastore_endpoint: \"postgres://db\"\n  api_address: 10.0.0.1\n".into(), "`cluster.datastore_endpoint`"),
            ("  api_address: \"10.0.0.1:http\"\n".into(), "`cluster.api_address`"),
            ("  api_address: 10.0.0.1\n  k3s: {config: {token: x}}\n".into(), "`cluster.k3s.config.token`"),
            ("  api_address: 10.0.0.1\n  k3s: {config: {node-ip: x}}\n".into(), "`cluster.k3s.config.node-ip`"),
            ("  api_address: 10.0.0.1\n  k3s: {config: {\"server+\": x}}\n".into(), "`cluster.k3s.config.server+`"),
            ("  api_address: 10.0.0.1\n  k3s: {config: {tls-san: {a: 1}}}\n".into(), "`cluster.k3s.config.tls-san`"),
            ("  api_address: 10.0.0.1\n  k3s: {version: \"1 2\"}\n".into(), "`cluster.k3s.version`"),
            ("  api_address: 10.0.0.1\n  etcd: {client_port: 2380}\n".into(), "`cluster.etcd`"),
        ] {
            let err = check(&cluster).expect_err(&cluster);
            assert!(err.contains(key), "{cluster}: error does not name {key}: {err}");
        }
        for bad in ["Lab", "a_b", "x".repeat(51).as_str()] {
            let p = test_profile(&format!("cluster: {{name: {bad}, default_role: none, k3s: {{version: v1.33.5+k3s1}}}}\n"));
            let err = format!("{:#}", super::validate(&p).unwrap_err());
            assert!(err.contains("`cluster.name`"), "{bad}: {err}");
        }
        let err = check("  api_address: 10.0.0.1\n  k3s: {config: {cluster-init: true}}\n").unwrap_err();
        assert!(err.contains("kiln sets `cluster-init`"), "{err}");
    }

    #[test]
    fn node_addresses_may_not_contradict_the_global_network() {
        let p = test_profile(&format!(
            "network: {{interfaces: {{eth0: {{address: 10.0.0.5/24}}}}}}\ncluster:\n  name: lab\n{}",
            with_version(&nodes(&[node(0, "server", true)]))
        ));
        let err = format!("{:#}", super::validate(&p).unwrap_err());
        assert!(err.contains("cluster.nodes[0].address") && err.contains("network.interfaces.eth0"), "{err}");
        let ok = test_profile(&format!(
            "network: {{interfaces: {{eth0: {{dhcp: true}}}}}}\ncluster:\n  name: lab\n{}",
            with_version(&nodes(&[node(0, "server", true)]))
        ));
        super::validate(&ok).unwrap();
    }

    #[test]
    fn unknown_roles_and_datastores_are_parse_errors_naming_the_value() {
        let err = check("  nodes:\n    - {name: a, mac: \"52:54:00:00:00:01\", roles: [master]}\n").unwrap_err();
        assert!(err.contains("master") && err.contains("server"), "{err}");
        let err = check("  datastore: mysql\n").unwrap_err();
        assert!(err.contains("mysql"), "{err}");
    }

    #[test]
    fn versions_must_be_k3s_release_names() {
        for good in ["v1.33.5+k3s1", "v1.30.0+k3s12"] {
            super::check_version(good).unwrap();
        }
        for bad in
            ["", "1.33.5+k3s1", "v1.33.5", "v1.33+k3s1", "v1.33.5+rke2r1", "v1.33.5+k3s", "v1.33.x+k3s1", "v1.33.5-rc1+k3s1", "latest"]
        {
            let err = super::check_version(bad).unwrap_err();
            assert!(err.contains("vMAJOR.MINOR.PATCH+k3sN"), "{bad}: {err}");
        }
    }
}
