//! The profile reference (Markdown), generated from the profile's JSON schema, which is itself
//! generated from the types in `profile/`: docs/profile-reference.md is this output.

use serde_json::Value;

/// Markdown table of every profile key: `key | type | default | description`.
pub fn markdown() -> String {
    let schema = super::json_schema();
    let mut rows = Vec::new();
    walk(&schema, &schema, "", &mut rows);
    let mut out = String::from("| key | type | default | description |\n|---|---|---|---|\n");
    for (key, ty, default, desc) in rows {
        out.push_str(&format!("| `{key}` | {ty} | {default} | {desc} |\n"));
    }
    out
}

fn resolve<'a>(root: &'a Value, v: &'a Value) -> &'a Value {
    if let Some(r) = v.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or_default();
        if let Some(def) = root.get("$defs").and_then(|d| d.get(name)) {
            return def;
        }
    }
    // `Option<T>` and defaulted structs appear as anyOf/allOf wrappers.
    for key in ["allOf", "anyOf"] {
        if let Some(first) =
            v.get(key).and_then(Value::as_array).and_then(|a| a.iter().find(|x| x.get("type") != Some(&Value::from("null"))))
        {
            return resolve(root, first);
        }
    }
    v
}

fn type_name(root: &Value, v: &Value) -> String {
    let r = resolve(root, v);
    if let Some(e) = r.get("enum").and_then(Value::as_array) {
        return e.iter().filter_map(Value::as_str).map(|s| format!("`{s}`")).collect::<Vec<_>>().join(" / ");
    }
    match r.get("type") {
        Some(Value::String(t)) if t == "array" => match r.get("items") {
            Some(items) => format!("list of {}", type_name(root, items)),
            None => "list".into(),
        },
        Some(Value::String(t)) if t == "object" && r.get("properties").is_none() => "map".into(),
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).filter(|t| *t != "null").collect::<Vec<_>>().join(" or "),
        _ => "value".into(),
    }
}

fn walk(root: &Value, node: &Value, prefix: &str, rows: &mut Vec<(String, String, String, String)>) {
    let node = resolve(root, node);
    let Some(props) = node.get("properties").and_then(Value::as_object) else { return };
    let required: Vec<&str> =
        node.get("required").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    for (name, prop) in props {
        let key = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
        let desc = prop
            .get("description")
            .or_else(|| resolve(root, prop).get("description"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .replace('\n', " ");
        let default = match prop.get("default") {
            Some(Value::Object(_)) => String::new(),
            Some(d) => format!("`{}`", d.to_string().trim_matches('"')),
            None if required.contains(&name.as_str()) => "required".into(),
            None => String::new(),
        };
        rows.push((key.clone(), type_name(root, prop), default, desc));
        let inner = resolve(root, prop);
        if inner.get("properties").is_some() {
            walk(root, inner, &key, rows);
        } else if let Some(items) = inner.get("items") {
            if resolve(root, items).get("properties").is_some() {
                walk(root, items, &format!("{key}[]"), rows);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reference_lists_nested_keys() {
        let md = super::markdown();
        for key in ["`name`", "`arch`", "`os.suite`", "`os.mirror`", "`disk.size`", "`files[].path`", "`kernel.cmdline`"] {
            assert!(md.contains(key), "{key} missing:\n{md}");
        }
    }

    /// profiles/kiln.schema.json (what the examples' `# yaml-language-server: $schema=` lines
    /// point editors at) is `kiln schema`'s output: regenerate it with
    /// `cargo run -p kiln -- schema > profiles/kiln.schema.json`.
    #[test]
    fn the_examples_schema_file_is_current() {
        let file = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../profiles/kiln.schema.json")).unwrap();
        let now = format!("{}\n", serde_json::to_string_pretty(&crate::profile::json_schema()).unwrap());
        assert!(file == now, "profiles/kiln.schema.json is stale: run `cargo run -p kiln -- schema > profiles/kiln.schema.json`");
    }

    /// The profile reference in docs/profile-reference.md is generated, never hand-edited:
    /// regenerate it with `cargo run -p kiln -- schema --markdown` and paste between the markers.
    #[test]
    fn readme_reference_is_current() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/profile-reference.md")).unwrap();
        let start = readme.find("<!-- profile-reference:start -->\n").expect("docs/profile-reference.md start marker");
        let end = readme.find("<!-- profile-reference:end -->").expect("docs/profile-reference.md end marker");
        let section = &readme[start + "<!-- profile-reference:start -->\n".len()..end];
        assert_eq!(section, super::markdown(), "docs/profile-reference.md is stale: run `kiln schema --markdown`");
    }
}
