//! Build-time rendering of the cluster: for every inventory node a directory
//! `/etc/kiln/nodes/<name>/` with `node.conf` (identity, roles, static address), `k3s-config.yaml`
//! (servers and agents; mode 0600, it holds the token) and `etcd.env` (etcd members); the same
//! for `_default` (machines not in the inventory, completed at boot); and the MAC table
//! `/etc/kiln/inventory` plus `/etc/kiln/cluster.conf`. `boot.d/35-identity.sh` picks one
//! directory at boot. Nodes of the etcd group's PKI also get `etcd/` there: the CA certificate
//! (0644) and their own certificates (0644) and private keys (0600); a key is only ever in its
//! own node's directory. All output is plain text and byte-for-byte deterministic given the
//! secrets.

use anyhow::{bail, Result};
use serde_json::Value;

use super::pki::{self, Kind};
use super::yaml::Doc;
use super::{Secrets, Token};
use crate::profile::cluster::{normalise_mac, url_host, Cluster, Datastore, Node, Role, ETCD_METRICS_PORT};
use crate::tree::Tree;

/// Where the per-node directories live in the root.
pub const NODES_DIR: &str = "etc/kiln/nodes";
/// The directory for machines that are not in the inventory.
pub const DEFAULT_NODE: &str = "_default";
/// The boot step that picks this machine's directory at boot, relative to the appliance overlay.
/// Its console line is `[kiln] identity: node=<name> roles=<r1,r2|none> by=<cmdline|mac|default>`.
pub const IDENTITY_STEP: &str = "usr/lib/kiln/boot.d/35-identity.sh";

/// One file of the rendered cluster configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedFile {
    /// Path in the root, without the leading `/`.
    pub path: String,
    pub mode: u32,
    pub content: String,
}

/// Writes the cluster's files into the root.
pub fn render(c: &Cluster, secrets: &Secrets, root: &mut Tree) -> Result<()> {
    root.add_dir(NODES_DIR, 0o755)?;
    for f in files(c, secrets)? {
        root.add_file(&f.path, f.mode, f.content)?;
    }
    Ok(())
}

/// Every file the cluster puts in the root, in a fixed order.
pub fn files(c: &Cluster, secrets: &Secrets) -> Result<Vec<RenderedFile>> {
    let token = &secrets.token;
    let mut out =
        vec![file("etc/kiln/cluster.conf".into(), 0o644, cluster_conf(c)), file("etc/kiln/inventory".into(), 0o644, inventory(c))];
    for n in &c.nodes {
        let dir = format!("{NODES_DIR}/{}", n.name);
        out.push(file(format!("{dir}/node.conf"), 0o644, node_conf(Some(n), &n.sorted_roles())));
        if let Some(role) = k3s_role(&n.roles) {
            out.push(file(format!("{dir}/k3s-config.yaml"), 0o600, k3s_config(c, token, Some(n), role)));
        }
        if n.has(Role::Etcd) {
            out.push(file(format!("{dir}/etcd.env"), 0o644, etcd_env(c, n)));
        }
        out.extend(tls_files(c, n, secrets.pki.as_ref())?);
        // The node's own rollout report key (`crate::rollout`): only the default node has none.
        if let Some(master) = &secrets.rollout {
            let key = hex::encode(crate::rollout::node_key(master, &n.name));
            out.push(file(format!("{dir}/{}", crate::rollout::NODE_KEY_PATH), 0o600, format!("{key}\n")));
        }
    }
    let dir = format!("{NODES_DIR}/{DEFAULT_NODE}");
    let roles: Vec<Role> = c.default_role.role().into_iter().collect();
    out.push(file(format!("{dir}/node.conf"), 0o644, node_conf(None, &roles)));
    if let Some(role) = c.default_role.role() {
        out.push(file(format!("{dir}/k3s-config.yaml"), 0o600, k3s_config(c, token, None, role)));
    }
    Ok(out)
}

/// `<node>/etcd/`: the CA certificate and the node's own certificates and keys, under the names
/// `etcd.env` and `k3s-config.yaml` use on the device ([`pki::DEVICE_DIR`]).
fn tls_files(c: &Cluster, n: &Node, pki: Option<&pki::Pki>) -> Result<Vec<RenderedFile>> {
    let kinds = pki::kinds_for(c, n);
    if kinds.is_empty() {
        return Ok(Vec::new());
    }
    let Some(pki) = pki else { bail!("node {} needs etcd TLS certificates, but the cluster's PKI was not loaded", n.name) };
    let Some(certs) = pki.nodes.get(&n.name) else { bail!("the cluster's PKI has no certificates for node {}", n.name) };
    let dir = format!("{NODES_DIR}/{}/{}", n.name, pki::SUBDIR);
    let mut out = vec![file(format!("{dir}/{}", pki::CA_CERT), 0o644, pki.ca_cert.clone())];
    for kind in kinds {
        let Some(pair) = certs.get(&kind) else { bail!("the cluster's PKI has no {} certificate for node {}", kind.name(), n.name) };
        out.push(file(format!("{dir}/{}.crt", kind.name()), 0o644, pair.cert.clone()));
        // Private keys: 0600, and only in the owning node's directory (`kiln serve` delivers a
        // node's non-world-readable files to that node alone).
        out.push(file(format!("{dir}/{}.key", kind.name()), 0o600, pair.key_pem().to_string()));
    }
    Ok(out)
}

/// `/etc/kiln/etcd/<name>` on the device.
fn device_file(name: &str) -> String {
    format!("{}/{name}", pki::DEVICE_DIR)
}

fn file(path: String, mode: u32, content: String) -> RenderedFile {
    RenderedFile { path, mode, content }
}

/// What k3s runs as on a node: `server` wins (a server is also an agent).
fn k3s_role(roles: &[Role]) -> Option<Role> {
    [Role::Server, Role::Agent].into_iter().find(|r| roles.contains(r))
}

fn roles_text(roles: &[Role]) -> String {
    roles.iter().map(|r| r.name()).collect::<Vec<_>>().join(" ")
}

fn cluster_conf(c: &Cluster) -> String {
    let api = c.api().map(|a| a.to_string()).unwrap_or_default();
    let nodes: Vec<&str> = c.nodes.iter().map(|n| n.name.as_str()).collect();
    format!(
        "# written by kiln from the profile's `cluster` key; read by boot.d/35-identity.sh\n\
         KILN_CLUSTER_NAME=\"{}\"\nKILN_CLUSTER_DATASTORE=\"{}\"\nKILN_CLUSTER_API_ADDRESS=\"{api}\"\n\
         KILN_CLUSTER_DEFAULT_ROLE=\"{}\"\nKILN_CLUSTER_NODES=\"{}\"\nKILN_K3S_VERSION=\"{}\"\n",
        c.name,
        c.datastore.name(),
        c.default_role.role().map(Role::name).unwrap_or("none"),
        nodes.join(" "),
        c.k3s.version.as_deref().unwrap_or_default(),
    )
}

fn inventory(c: &Cluster) -> String {
    let mut s = String::from("# written by kiln from the profile's `cluster.nodes`: MAC NODE, one line per MAC (lower case)\n");
    for n in &c.nodes {
        for m in n.mac.as_slice() {
            // Validation has checked every MAC.
            let m = normalise_mac(m).unwrap_or_else(|| m.to_ascii_lowercase());
            s.push_str(&format!("{m} {}\n", n.name));
        }
    }
    s
}

/// Shell-sourceable identity; `node` is `None` for the `_default` template (name filled in at boot).
fn node_conf(node: Option<&Node>, roles: &[Role]) -> String {
    let (what, name, address, gateway) = match node {
        Some(n) => (format!("node {}", n.name), n.name.as_str(), n.address.as_deref(), n.gateway.as_deref()),
        None => ("machines not in the inventory (`default_role`); the name is set at boot".to_string(), "", None, None),
    };
    format!(
        "# written by kiln from the profile's `cluster` key: {what}; sourced by boot.d/35-identity.sh\n\
         KILN_NODE_NAME=\"{name}\"\nKILN_NODE_ROLES=\"{}\"\nKILN_NODE_ADDRESS=\"{}\"\nKILN_NODE_GATEWAY=\"{}\"\n",
        roles_text(roles),
        address.unwrap_or_default(),
        gateway.unwrap_or_default(),
    )
}

/// The etcd client URLs k3s servers use in `external-etcd` mode.
fn etcd_client_urls(c: &Cluster) -> String {
    c.etcd_members()
        .filter_map(|n| n.ip())
        .map(|ip| format!("https://{}:{}", url_host(&ip.to_string()), c.etcd.client_port))
        .collect::<Vec<_>>()
        .join(",")
}

/// `/etc/rancher/k3s/config.yaml` of a node (or of the `_default` template when `node` is `None`).
fn k3s_config(c: &Cluster, token: &Token, node: Option<&Node>, role: Role) -> String {
    let who = match node {
        Some(n) => format!("node {} (roles: {})", n.name, roles_text(&n.sorted_roles())),
        None => format!("machines not in the inventory (role: {}); boot.d/35-identity.sh appends `node-name`", role.name()),
    };
    let mut doc = Doc::new(&format!(
        "written by kiln from the profile's `cluster` key: k3s configuration of {who}\nmode 0600: it holds the cluster token"
    ));
    let api = c.api();
    if role == Role::Server {
        let first = node.is_some() && c.servers().next().map(|s| &s.name) == node.map(|n| &n.name);
        match c.datastore {
            Datastore::EmbeddedEtcd if first => doc.push("cluster-init", true),
            Datastore::EmbeddedEtcd => {
                if let Some(a) = &api {
                    doc.push("server", a.url());
                }
            }
            Datastore::ExternalEtcd => {
                // Mutual TLS: the group's CA, and this server's own client certificate.
                doc.push("datastore-endpoint", etcd_client_urls(c));
                doc.push("datastore-cafile", device_file(pki::CA_CERT));
                doc.push("datastore-certfile", device_file(&format!("{}.crt", Kind::DatastoreClient.name())));
                doc.push("datastore-keyfile", device_file(&format!("{}.key", Kind::DatastoreClient.name())));
            }
            Datastore::External => doc.push("datastore-endpoint", c.datastore_endpoint.clone().unwrap_or_default()),
            Datastore::Sqlite => {}
        }
    } else if let Some(a) = &api {
        doc.push("server", a.url());
    }
    doc.push("token", token.expose());
    if role == Role::Server {
        let mut sans: Vec<Value> = api.iter().map(|a| Value::String(a.host.clone())).collect();
        match c.k3s.config.get("tls-san") {
            Some(Value::Array(extra)) => sans.extend(extra.iter().cloned()),
            Some(v) => sans.push(v.clone()),
            None => {}
        }
        let mut seen = Vec::new();
        sans.retain(|s| {
            if seen.contains(s) {
                false
            } else {
                seen.push(s.clone());
                true
            }
        });
        if !sans.is_empty() {
            doc.push("tls-san", Value::Array(sans));
        }
    }
    if let Some(n) = node {
        doc.push("node-name", n.name.as_str());
        if let Some(ip) = n.ip() {
            doc.push("node-ip", ip.to_string());
        }
    }
    for (k, v) in &c.k3s.config {
        // Merged into the servers' `tls-san` above; a server-only setting.
        if k == "tls-san" {
            continue;
        }
        doc.push(k, v.clone());
    }
    doc.to_yaml()
}

/// Environment for Debian's etcd-server (`/etc/default/etcd` names, the same settings as etcd's
/// flags) of one member: TLS on the client and the peer port, each requiring a certificate from
/// the cluster CA (`--client-cert-auth`, `--peer-client-cert-auth`), and plain HTTP only for
/// `/health` and `/metrics` on loopback, for the node's own health check.
fn etcd_env(c: &Cluster, n: &Node) -> String {
    let (peer, client) = (c.etcd.peer_port, c.etcd.client_port);
    let url = |ip: std::net::IpAddr, port: u16| format!("https://{}:{port}", url_host(&ip.to_string()));
    let ip = n.ip().expect("validated: etcd members have static addresses");
    let initial: Vec<String> = c.etcd_members().filter_map(|m| m.ip().map(|ip| format!("{}={}", m.name, url(ip, peer)))).collect();
    let loopback = "127.0.0.1".parse().expect("loopback");
    let (server, peer_name) = (Kind::EtcdServer.name(), Kind::EtcdPeer.name());
    format!(
        "# written by kiln from the profile's `cluster` key: etcd member {name} of cluster {cluster}\n\
         ETCD_NAME={name}\n\
         ETCD_DATA_DIR=/var/lib/etcd\n\
         ETCD_INITIAL_CLUSTER={initial}\n\
         ETCD_INITIAL_CLUSTER_STATE=new\n\
         ETCD_INITIAL_CLUSTER_TOKEN={cluster}\n\
         ETCD_INITIAL_ADVERTISE_PEER_URLS={peer_url}\n\
         ETCD_LISTEN_PEER_URLS={peer_url}\n\
         ETCD_LISTEN_CLIENT_URLS={client_url},{loop_url}\n\
         ETCD_ADVERTISE_CLIENT_URLS={client_url}\n\
         ETCD_LISTEN_METRICS_URLS=http://127.0.0.1:{ETCD_METRICS_PORT}\n\
         ETCD_CERT_FILE={dir}/{server}.crt\n\
         ETCD_KEY_FILE={dir}/{server}.key\n\
         ETCD_TRUSTED_CA_FILE={dir}/{ca}\n\
         ETCD_CLIENT_CERT_AUTH=true\n\
         ETCD_PEER_CERT_FILE={dir}/{peer_name}.crt\n\
         ETCD_PEER_KEY_FILE={dir}/{peer_name}.key\n\
         ETCD_PEER_TRUSTED_CA_FILE={dir}/{ca}\n\
         ETCD_PEER_CLIENT_CERT_AUTH=true\n",
        name = n.name,
        cluster = c.name,
        initial = initial.join(","),
        peer_url = url(ip, peer),
        client_url = url(ip, client),
        loop_url = url(loopback, client),
        dir = pki::DEVICE_DIR,
        ca = pki::CA_CERT,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::test_profile;

    fn cluster(yaml: &str) -> Cluster {
        let p = test_profile(&format!("cluster:\n  name: lab\n{}", crate::profile::cluster::validate::tests::with_version(yaml)));
        crate::profile::cluster::validate(&p).unwrap();
        p.cluster.unwrap()
    }

    fn get<'a>(files: &'a [RenderedFile], path: &str) -> &'a RenderedFile {
        files
            .iter()
            .find(|f| f.path == path)
            .unwrap_or_else(|| panic!("{path} not rendered: {:?}", files.iter().map(|f| &f.path).collect::<Vec<_>>()))
    }

    fn yaml(f: &RenderedFile) -> serde_json::Value {
        serde_saphyr::from_str(&f.content).unwrap_or_else(|e| panic!("{} is not YAML: {e}\n{}", f.path, f.content))
    }

    fn token() -> Token {
        Token::new("t0ken").unwrap()
    }

    /// The test token, and for a cluster with etcd members a PKI made in a temporary directory
    /// (returned too: it lives as long as the test keeps it).
    fn secrets(c: &Cluster) -> (Secrets, tempfile::TempDir) {
        let d = tempfile::tempdir().unwrap();
        (Secrets { token: token(), pki: pki::load_or_create(c, d.path()).unwrap(), rollout: None }, d)
    }

    #[test]
    fn embedded_etcd_first_server_inits_the_others_join() {
        let c = cluster(
            "  datastore: embedded-etcd\n  api_address: 10.0.0.10\n  k3s: {config: {disable: [traefik], tls-san: k3s.lab, flannel-backend: host-gw}}\n  nodes:\n    - {name: s1, mac: \"52:54:00:00:00:01\", roles: [server], address: 10.0.0.11/24, gateway: 10.0.0.1}\n    - {name: s2, mac: \"52:54:00:00:00:02\", roles: [server], address: 10.0.0.12/24}\n    - {name: s3, mac: \"52:54:00:00:00:03\", roles: [server], address: 10.0.0.13/24}\n    - {name: a1, mac: [\"52:54:00:00:00:04\", \"52-54-00-00-00-AA\"], roles: [agent]}\n",
        );
        let (secrets, _keep) = secrets(&c);
        let files = files(&c, &secrets).unwrap();
        let s1 = get(&files, "etc/kiln/nodes/s1/k3s-config.yaml");
        assert_eq!(s1.mode, 0o600);
        assert_eq!(
            yaml(s1),
            serde_json::json!({"cluster-init": true, "token": "t0ken", "tls-san": ["10.0.0.10", "k3s.lab"], "node-name": "s1", "node-ip": "10.0.0.11",
                               "disable": ["traefik"], "flannel-backend": "host-gw"})
        );
        let s2 = yaml(get(&files, "etc/kiln/nodes/s2/k3s-config.yaml"));
        assert_eq!(s2["server"], "https://10.0.0.10:6443");
        assert!(s2.get("cluster-init").is_none());
        let a1 = yaml(get(&files, "etc/kiln/nodes/a1/k3s-config.yaml"));
        assert_eq!(a1["server"], "https://10.0.0.10:6443");
        assert!(a1.get("tls-san").is_none() && a1.get("node-ip").is_none());
        assert_eq!(a1["disable"], serde_json::json!(["traefik"]), "pass-through goes to every node");
        assert!(!files.iter().any(|f| f.path.ends_with("etcd.env")));
        assert_eq!(
            get(&files, "etc/kiln/inventory").content.lines().skip(1).collect::<Vec<_>>(),
            ["52:54:00:00:00:01 s1", "52:54:00:00:00:02 s2", "52:54:00:00:00:03 s3", "52:54:00:00:00:04 a1", "52:54:00:00:00:aa a1"]
        );
        assert!(get(&files, "etc/kiln/nodes/s1/node.conf").content.ends_with(
            "KILN_NODE_NAME=\"s1\"\nKILN_NODE_ROLES=\"server\"\nKILN_NODE_ADDRESS=\"10.0.0.11/24\"\nKILN_NODE_GATEWAY=\"10.0.0.1\"\n"
        ));
        let d = yaml(get(&files, "etc/kiln/nodes/_default/k3s-config.yaml"));
        assert_eq!(d["server"], "https://10.0.0.10:6443");
        assert!(d.get("node-name").is_none());
        assert!(get(&files, "etc/kiln/nodes/_default/node.conf").content.contains("KILN_NODE_NAME=\"\"\nKILN_NODE_ROLES=\"agent\"\n"));
        assert_eq!(files, super::files(&c, &secrets).unwrap(), "deterministic");
        assert!(!files.iter().any(|f| f.path.contains("/etcd/")), "no etcd group, no TLS files");
    }

    #[test]
    fn external_etcd_members_get_env_and_servers_the_endpoint() {
        let c = cluster(
            "  datastore: external-etcd\n  api_address: \"[fd00::10]:7443\"\n  default_role: none\n  etcd: {client_port: 12379}\n  nodes:\n    - {name: e1, mac: \"52:54:00:00:00:01\", roles: [server, etcd], address: 10.0.0.11/24}\n    - {name: e2, mac: \"52:54:00:00:00:02\", roles: [etcd], address: 10.0.0.12/24}\n    - {name: e3, mac: \"52:54:00:00:00:03\", roles: [etcd], address: \"fd00::13/64\"}\n",
        );
        let (secrets, keep) = secrets(&c);
        let files = files(&c, &secrets).unwrap();
        let e1 = yaml(get(&files, "etc/kiln/nodes/e1/k3s-config.yaml"));
        assert_eq!(e1["datastore-endpoint"], "https://10.0.0.11:12379,https://10.0.0.12:12379,https://[fd00::13]:12379");
        assert_eq!(e1["datastore-cafile"], "/etc/kiln/etcd/ca.crt");
        assert_eq!(e1["datastore-certfile"], "/etc/kiln/etcd/client.crt");
        assert_eq!(e1["datastore-keyfile"], "/etc/kiln/etcd/client.key");
        assert_eq!(e1["tls-san"], serde_json::json!(["fd00::10"]));
        assert!(e1.get("server").is_none());
        assert!(!files.iter().any(|f| f.path == "etc/kiln/nodes/e2/k3s-config.yaml"), "etcd-only nodes run no k3s");
        let env = &get(&files, "etc/kiln/nodes/e3/etcd.env").content;
        for line in [
            "ETCD_NAME=e3",
            "ETCD_INITIAL_CLUSTER=e1=https://10.0.0.11:2380,e2=https://10.0.0.12:2380,e3=https://[fd00::13]:2380",
            "ETCD_INITIAL_CLUSTER_STATE=new",
            "ETCD_INITIAL_CLUSTER_TOKEN=lab",
            "ETCD_LISTEN_CLIENT_URLS=https://[fd00::13]:12379,https://127.0.0.1:12379",
            "ETCD_ADVERTISE_CLIENT_URLS=https://[fd00::13]:12379",
            "ETCD_INITIAL_ADVERTISE_PEER_URLS=https://[fd00::13]:2380",
            "ETCD_LISTEN_PEER_URLS=https://[fd00::13]:2380",
            "ETCD_LISTEN_METRICS_URLS=http://127.0.0.1:2381",
            "ETCD_DATA_DIR=/var/lib/etcd",
            "ETCD_CERT_FILE=/etc/kiln/etcd/server.crt",
            "ETCD_KEY_FILE=/etc/kiln/etcd/server.key",
            "ETCD_TRUSTED_CA_FILE=/etc/kiln/etcd/ca.crt",
            "ETCD_CLIENT_CERT_AUTH=true",
            "ETCD_PEER_CERT_FILE=/etc/kiln/etcd/peer.crt",
            "ETCD_PEER_KEY_FILE=/etc/kiln/etcd/peer.key",
            "ETCD_PEER_TRUSTED_CA_FILE=/etc/kiln/etcd/ca.crt",
            "ETCD_PEER_CLIENT_CERT_AUTH=true",
        ] {
            assert!(env.lines().any(|l| l == line), "{line} missing:\n{env}");
        }
        assert!(
            !env.contains("http://")
                || env.lines().filter(|l| l.contains("http://")).all(|l| l.starts_with("ETCD_LISTEN_METRICS_URLS=http://127.0.0.1:")),
            "plain HTTP only on loopback:\n{env}"
        );
        // Each node's TLS files in its own directory: the CA certificate, its certificates
        // (0644) and its keys (0600); e1 is also a k3s server and gets a client certificate.
        let pki = secrets.pki.as_ref().unwrap();
        let tls: Vec<(String, u32)> = files.iter().filter(|f| f.path.contains("/etcd/")).map(|f| (f.path.clone(), f.mode)).collect();
        let mut want = Vec::new();
        for (node, kinds) in [("e1", &["server", "peer", "client"][..]), ("e2", &["server", "peer"][..]), ("e3", &["server", "peer"][..])] {
            want.push((format!("etc/kiln/nodes/{node}/etcd/ca.crt"), 0o644));
            for k in kinds {
                want.push((format!("etc/kiln/nodes/{node}/etcd/{k}.crt"), 0o644));
                want.push((format!("etc/kiln/nodes/{node}/etcd/{k}.key"), 0o600));
            }
        }
        assert_eq!(tls, want);
        for f in files.iter().filter(|f| f.path.contains("/etcd/")) {
            let node = f.path.split('/').nth(3).unwrap();
            if f.path.ends_with(".key") {
                assert!(f.content.starts_with("-----BEGIN PRIVATE KEY-----"), "{}", f.path);
                // The key is this node's own and appears nowhere else.
                let owner = &pki.nodes[node];
                assert!(owner.values().any(|p| p.key_pem() == f.content), "{}", f.path);
                assert_eq!(files.iter().filter(|g| g.content.contains(f.content.as_str())).count(), 1, "{} elsewhere too", f.path);
            } else {
                assert!(f.content.starts_with("-----BEGIN CERTIFICATE-----"), "{}", f.path);
            }
        }
        assert_eq!(get(&files, "etc/kiln/nodes/e2/etcd/ca.crt").content, pki.ca_cert);
        let ca = std::fs::read_to_string(pki.dir.join("ca.pem")).unwrap();
        let ca_key = ca[ca.find("-----BEGIN PRIVATE KEY-----").unwrap()..].lines().nth(1).unwrap();
        assert!(!files.iter().any(|f| f.content.contains(ca_key)), "the CA key is never rendered");
        // A rebuild with the same secrets/ renders the same bytes.
        let again = Secrets { token: token(), pki: pki::load_or_create(&c, keep.path()).unwrap(), rollout: None };
        assert_eq!(super::files(&c, &again).unwrap(), files, "a rebuild renders the same files");
        assert!(get(&files, "etc/kiln/nodes/e1/node.conf").content.contains("KILN_NODE_ROLES=\"etcd server\"\n"));
        assert!(!files.iter().any(|f| f.path == "etc/kiln/nodes/_default/k3s-config.yaml"));
        assert!(get(&files, "etc/kiln/cluster.conf").content.contains(
            "KILN_CLUSTER_API_ADDRESS=\"[fd00::10]:7443\"\nKILN_CLUSTER_DEFAULT_ROLE=\"none\"\nKILN_CLUSTER_NODES=\"e1 e2 e3\"\n"
        ));
    }

    #[test]
    fn single_server_gives_its_address_to_agents_and_render_writes_the_tree() {
        let c = cluster("  nodes:\n    - {name: s1, mac: \"52:54:00:00:00:01\", roles: [server], address: 10.0.0.11/24}\n");
        let files = files(&c, &secrets(&c).0).unwrap();
        let s1 = yaml(get(&files, "etc/kiln/nodes/s1/k3s-config.yaml"));
        assert_eq!(s1, serde_json::json!({"token": "t0ken", "tls-san": ["10.0.0.11"], "node-name": "s1", "node-ip": "10.0.0.11"}));
        assert_eq!(yaml(get(&files, "etc/kiln/nodes/_default/k3s-config.yaml"))["server"], "https://10.0.0.11:6443");
        let mut t = Tree::new();
        render(&c, &secrets(&c).0, &mut t).unwrap();
        let e = t.get_str("etc/kiln/nodes/s1/k3s-config.yaml").unwrap();
        assert_eq!(e.meta.mode, 0o600);
        assert!(t.contains("etc/kiln/inventory") && t.contains("etc/kiln/cluster.conf"));
    }

    #[test]
    fn each_node_gets_only_its_own_rollout_key() {
        let c = cluster("  nodes:\n    - {name: s1, mac: \"52:54:00:00:00:01\", roles: [server], address: 10.0.0.11/24}\n    - {name: a1, mac: \"52:54:00:00:00:02\", roles: [agent]}\n");
        let master = [7u8; 32];
        let secrets = Secrets { token: token(), pki: None, rollout: Some(master) };
        let files = files(&c, &secrets).unwrap();
        for node in ["s1", "a1"] {
            let f = get(&files, &format!("etc/kiln/nodes/{node}/update/report.key"));
            assert_eq!(f.mode, 0o600, "a secret");
            assert_eq!(f.content, format!("{}\n", hex::encode(crate::rollout::node_key(&master, node))));
        }
        let keys = files.iter().filter(|f| f.path.ends_with("report.key")).count();
        assert_eq!(keys, 2, "no key for the default node, none without update.server");
        assert!(!files.iter().any(|f| f.content.contains(&hex::encode(master))), "the master key is never rendered");
        let without = files_of(&c);
        assert!(!without.iter().any(|f| f.path.ends_with("report.key")));
    }

    fn files_of(c: &Cluster) -> Vec<RenderedFile> {
        files(c, &Secrets { token: token(), pki: None, rollout: None }).unwrap()
    }
}
