//! A small, deterministic YAML writer for k3s `config.yaml`: a block mapping at the top, keys in
//! the order given, scalars as JSON (valid YAML: strings always double-quoted, so `on`, `01` or
//! `*` never change type), lists of scalars as block sequences, anything deeper in JSON flow style.

use serde_json::Value;

/// A top-level mapping, written in the order of `entries`.
#[derive(Debug, Default)]
pub struct Doc {
    header: String,
    entries: Vec<(String, Value)>,
}

impl Doc {
    /// A document starting with `# <line>` comment lines.
    pub fn new(header: &str) -> Doc {
        let header = header.lines().map(|l| format!("# {l}\n")).collect();
        Doc { header, entries: Vec::new() }
    }

    pub fn push(&mut self, key: &str, value: impl Into<Value>) {
        self.entries.push((key.to_string(), value.into()));
    }

    pub fn to_yaml(&self) -> String {
        let mut out = self.header.clone();
        for (k, v) in &self.entries {
            out.push_str(&entry(k, v));
        }
        out
    }
}

/// One `key: value` entry of a block mapping.
pub fn entry(key: &str, value: &Value) -> String {
    let key = plain_key(key);
    match value {
        Value::Array(items) if !items.is_empty() && items.iter().all(|i| !i.is_array() && !i.is_object()) => {
            let mut s = format!("{key}:\n");
            for i in items {
                s.push_str(&format!("  - {}\n", flow(i)));
            }
            s
        }
        v => format!("{key}: {}\n", flow(v)),
    }
}

/// JSON is YAML's flow style; serde_json writes no escapes YAML lacks.
fn flow(v: &Value) -> String {
    serde_json::to_string(v).expect("JSON values serialise")
}

/// Keys such as `flannel-backend` or `node-label+` plain, anything unusual quoted.
fn plain_key(k: &str) -> String {
    let plain = k.starts_with(|c: char| c.is_ascii_alphabetic()) && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_+.".contains(c));
    if plain {
        k.to_string()
    } else {
        flow(&Value::String(k.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn output_parses_back_to_the_same_values() {
        let mut d = Doc::new("header\nsecond line");
        d.push("cluster-init", true);
        d.push("token", "on");
        d.push("tls-san", json!(["10.0.0.1", "k3s.lab"]));
        d.push("kubelet-arg", json!([{"a": 1}]));
        d.push("empty", json!([]));
        d.push("node-label+", json!({"b": [1, 2], "a": null}));
        d.push("weird key", "x\n\"y\"");
        let text = d.to_yaml();
        assert!(text.starts_with("# header\n# second line\ncluster-init: true\ntoken: \"on\"\ntls-san:\n  - \"10.0.0.1\"\n"), "{text}");
        let back: Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(
            back,
            json!({"cluster-init": true, "token": "on", "tls-san": ["10.0.0.1", "k3s.lab"], "kubelet-arg": [{"a": 1}], "empty": [],
                   "node-label+": {"a": null, "b": [1, 2]}, "weird key": "x\n\"y\""})
        );
    }
}
