//! `registries`: k3s's `/etc/rancher/k3s/registries.yaml` (mirrors with endpoints and rewrites;
//! per-host credentials and TLS), which k3s turns into containerd's registry configuration. The
//! profile names files, never secrets: passwords come from `password_file`, and CA, client
//! certificate and key files are copied into the image under `/etc/rancher/k3s/certs/<host>/`,
//! where the rendered file points. The rendered file holds passwords, so it is mode 0600 and its
//! content is never logged. The key's types and checks are in `profile::registries`.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use crate::profile::registries::Registries;
use crate::tree::Tree;

/// Where k3s reads its registry configuration.
pub const PATH: &str = "etc/rancher/k3s/registries.yaml";
/// Where the certificate files of `configs.<host>.tls` are copied (one directory per host).
pub const CERTS_DIR: &str = "etc/rancher/k3s/certs";

/// The directory of a host's certificates in the image (`*` is not a friendly directory name).
fn cert_dir(host: &str) -> String {
    format!("{CERTS_DIR}/{}", if host == "*" { "_default" } else { host })
}

/// Writes `registries.yaml` (0600) and the certificate files into the root. Nothing is logged.
pub fn place(r: &Registries, base_dir: &Path, root: &mut Tree) -> Result<()> {
    let mut mirrors = serde_json::Map::new();
    for (host, m) in &r.mirrors {
        let mut v = serde_json::json!({ "endpoint": m.endpoint });
        if !m.rewrite.is_empty() {
            v["rewrite"] = serde_json::to_value(&m.rewrite)?;
        }
        mirrors.insert(host.clone(), v);
    }
    let mut configs = serde_json::Map::new();
    for (host, c) in &r.configs {
        let mut v = serde_json::Map::new();
        if let Some(a) = &c.auth {
            let path = base_dir.join(&a.password_file);
            let key = format!("registries.configs.{host}.auth.password_file");
            let text = std::fs::read_to_string(&path).with_context(|| format!("key `{key}`: reading {}", path.display()))?;
            let password = text.lines().next().unwrap_or("").trim_end_matches('\r');
            if password.is_empty() {
                bail!("key `{key}`: {} is empty (its first line is the password)", path.display());
            }
            v.insert("auth".into(), serde_json::json!({ "username": a.username, "password": password }));
        }
        if let Some(t) = &c.tls {
            let mut tls = serde_json::Map::new();
            for (k, f, name, mode) in [
                ("ca_file", &t.ca_file, "ca.crt", 0o644),
                ("cert_file", &t.cert_file, "client.crt", 0o644),
                ("key_file", &t.key_file, "client.key", 0o600),
            ] {
                if let Some(f) = f {
                    let src = base_dir.join(f);
                    let data = std::fs::read(&src)
                        .with_context(|| format!("key `registries.configs.{host}.tls.{k}`: reading {}", src.display()))?;
                    let dest = format!("{}/{name}", cert_dir(host));
                    root.add_file(&dest, mode, data).map_err(|e| anyhow!("placing /{dest}: {e}"))?;
                    tls.insert(k.into(), format!("/{dest}").into());
                }
            }
            if t.insecure_skip_verify {
                tls.insert("insecure_skip_verify".into(), true.into());
            }
            v.insert("tls".into(), tls.into());
        }
        configs.insert(host.clone(), v.into());
    }
    let doc = serde_json::json!({ "mirrors": mirrors, "configs": configs });
    let text = serde_saphyr::to_string(&doc).map_err(|e| anyhow!("writing /{PATH}: {e}"))?;
    let header = "# written by kiln from the profile's `registries` key: k3s's registry configuration\n# mode 0600: it may hold registry passwords\n";
    root.add_file(PATH, 0o600, format!("{header}{text}")).map_err(|e| anyhow!("placing /{PATH}: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Kind;

    const SERVER: &str = "cluster: {name: lab, nodes: [{name: s1, mac: \"52:54:00:00:00:01\", roles: [server]}]}\n";

    fn file(root: &Tree, path: &str) -> (u32, String) {
        let e = root.get_str(path).unwrap_or_else(|| panic!("{path} missing"));
        match &e.kind {
            Kind::File(c) => (e.meta.mode, String::from_utf8(c.read().unwrap().to_vec()).unwrap()),
            k => panic!("{k:?}"),
        }
    }

    #[test]
    fn registries_yaml_has_k3s_format_copied_certs_and_mode_0600() {
        let d = tempfile::tempdir().unwrap();
        for (n, c) in [("ca.pem", "CA\n"), ("c.pem", "CERT\n"), ("c.key", "KEY\n"), ("pw", "s3cret:\"on\"\nignored\n")] {
            std::fs::write(d.path().join(n), c).unwrap();
        }
        let text = format!(
            "{SERVER}registries:\n  mirrors:\n    docker.io:\n      endpoint: [\"https://mirror.lan:5000\"]\n      rewrite: {{\"^rancher/(.*)\": \"mirrored/$1\"}}\n  configs:\n    \"mirror.lan:5000\":\n      auth: {{username: puller, password_file: pw}}\n      tls: {{ca_file: ca.pem, cert_file: c.pem, key_file: c.key}}\n    \"10.0.0.5:5000\":\n      tls: {{insecure_skip_verify: true}}\n"
        );
        let p = crate::profile::test_profile(&text);
        crate::profile::registries::validate(&p, d.path()).unwrap();
        let mut root = Tree::new();
        place(p.registries.as_ref().unwrap(), d.path(), &mut root).unwrap();
        let (mode, yaml) = file(&root, PATH);
        assert_eq!(mode, 0o600);
        let doc: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(
            doc,
            serde_json::json!({
                "mirrors": {"docker.io": {"endpoint": ["https://mirror.lan:5000"], "rewrite": {"^rancher/(.*)": "mirrored/$1"}}},
                "configs": {
                    "mirror.lan:5000": {
                        "auth": {"username": "puller", "password": "s3cret:\"on\""},
                        "tls": {"ca_file": "/etc/rancher/k3s/certs/mirror.lan:5000/ca.crt", "cert_file": "/etc/rancher/k3s/certs/mirror.lan:5000/client.crt", "key_file": "/etc/rancher/k3s/certs/mirror.lan:5000/client.key"}
                    },
                    "10.0.0.5:5000": {"tls": {"insecure_skip_verify": true}}
                }
            }),
            "{yaml}"
        );
        assert_eq!(file(&root, "etc/rancher/k3s/certs/mirror.lan:5000/ca.crt"), (0o644, "CA\n".into()));
        assert_eq!(file(&root, "etc/rancher/k3s/certs/mirror.lan:5000/client.key"), (0o600, "KEY\n".into()));
    }
}
