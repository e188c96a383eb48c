//! Every static problem of a profile at once, each with `file:line:column` and its key path.
//!
//! serde stops at the first unknown key or wrong type, which makes a user fix a profile one
//! run at a time. So before the typed parse, the YAML is read as a plain tree with positions
//! ([`Node`]) and checked against the profile's own JSON schema ([`super::json_schema`], the
//! same one `kiln schema` prints): unknown keys (with the closest known key as a suggestion),
//! wrong types (naming what was expected and what was given), numbers out of range, missing
//! keys. Only a profile without such problems is parsed by serde; its semantic checks
//! (`LoadedProfile::validate`) then run section by section, and their messages are located
//! through the key path they name ([`locate`]).

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value as Json;
use serde_saphyr::Spanned;

/// One problem: where, which key, what.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub line: u64,
    pub column: u64,
    /// The key path, e.g. `ssh.port` or `cluster.nodes[1].mac`; empty for the whole file.
    pub key: String,
    pub message: String,
}

impl Problem {
    /// `FILE:LINE:COLUMN: key `KEY`: MESSAGE` (the position left out when unknown).
    pub fn render(&self, file: &str) -> String {
        let at = if self.line > 0 { format!("{file}:{}:{}", self.line, self.column) } else { file.to_string() };
        if self.key.is_empty() {
            format!("{at}: {}", self.message)
        } else {
            format!("{at}: key `{}`: {}", self.key, self.message)
        }
    }
}

/// Renders problems one per line, sorted by position.
pub fn render_all(file: &str, problems: &[Problem]) -> String {
    let mut sorted = problems.to_vec();
    sorted.sort_by_key(|p| (p.line, p.column));
    let lines: Vec<String> = sorted.iter().map(|p| p.render(file)).collect();
    let head = match lines.len() {
        1 => String::new(),
        n => format!("{n} problems:\n"),
    };
    format!("{head}{}", lines.join("\n"))
}

/// A YAML value with the position of every node.
#[derive(Debug, Clone)]
pub enum Node {
    Map(Vec<(Spanned<String>, Spanned<Node>)>),
    Seq(Vec<Spanned<Node>>),
    Str(String),
    Int(i128),
    Float(f64),
    Bool(bool),
    Null,
}

impl Node {
    fn kind(&self) -> String {
        match self {
            Node::Map(_) => "a mapping".into(),
            Node::Seq(_) => "a list".into(),
            Node::Str(s) => format!("{s:?}"),
            Node::Int(i) => i.to_string(),
            Node::Float(f) => f.to_string(),
            Node::Bool(b) => b.to_string(),
            Node::Null => "an empty value".into(),
        }
    }

    fn to_json(&self) -> Json {
        match self {
            Node::Map(m) => Json::Object(m.iter().map(|(k, v)| (k.value.clone(), v.value.to_json())).collect()),
            Node::Seq(s) => Json::Array(s.iter().map(|v| v.value.to_json()).collect()),
            Node::Str(s) => Json::String(s.clone()),
            Node::Int(i) => i64::try_from(*i).map(Json::from).unwrap_or(Json::Null),
            Node::Float(f) => serde_json::Number::from_f64(*f).map(Json::Number).unwrap_or(Json::Null),
            Node::Bool(b) => Json::Bool(*b),
            Node::Null => Json::Null,
        }
    }
}

/// A mapping key: YAML allows any scalar; the profile's keys are all strings.
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a scalar key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
                Ok(Node::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
                Ok(Node::Int(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
                Ok(Node::Int(v.into()))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Node, E> {
                Ok(Node::Int(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
                Ok(Node::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
                Ok(Node::Str(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Node, D2::Error> {
                Node::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = a.next_element::<Spanned<Node>>()? {
                    out.push(v);
                }
                Ok(Node::Seq(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Node, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = a.next_key::<Spanned<Key>>()? {
                    let v = a.next_value::<Spanned<Node>>()?;
                    out.push((Spanned::new(k.value.0, k.referenced, k.defined), v));
                }
                Ok(Node::Map(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// Reads the YAML as a positioned tree; a syntax error is one problem.
pub fn read_tree(text: &str) -> Result<Spanned<Node>, Problem> {
    serde_saphyr::from_str::<Spanned<Node>>(text).map_err(|e| serde_problem(&e, "YAML syntax"))
}

/// A serde-saphyr error as a problem: its position and its message, without the library's
/// own `error:` prefix, `line N column M` and source snippet (kiln prints `file:line:column`).
pub fn serde_problem(e: &serde_saphyr::Error, what: &str) -> Problem {
    let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
    let raw = e.without_snippet().to_string();
    let mut msg = raw.lines().next().unwrap_or("").trim();
    msg = msg.strip_prefix("error:").unwrap_or(msg).trim();
    if let Some(rest) = msg.strip_prefix("line ") {
        // `line 5 column 3: message`
        if let Some((_, m)) = rest.split_once(": ") {
            msg = m;
        }
    }
    Problem { line, column, key: String::new(), message: format!("{what}: {msg}") }
}

/// A `kiln:` format newer than `supported` (or not a format number): the one problem to report,
/// since the rest of such a file may use keys this kiln does not know.
pub fn newer_format(tree: &Spanned<Node>, supported: u32) -> Option<Problem> {
    let Node::Map(entries) = &tree.value else { return None };
    let (_, v) = entries.iter().find(|(k, _)| k.value == "kiln")?;
    let message = match &v.value {
        Node::Int(n) if (1..=supported as i128).contains(n) => return None,
        Node::Int(n) if *n > supported as i128 => format!(
            "this profile is written for profile format {n}; this kiln ({}) reads format {supported}: use a newer kiln",
            env!("CARGO_PKG_VERSION")
        ),
        other => format!("expected the profile format number (1), got {}", other.kind()),
    };
    Some(Problem { line: v.referenced.line(), column: v.referenced.column(), key: "kiln".into(), message })
}

/// Every structural problem of the tree against the schema.
pub fn structure(tree: &Spanned<Node>, schema: &Json) -> Vec<Problem> {
    let mut c = Checker { root: schema, problems: Vec::new() };
    c.check(schema, tree, "");
    c.problems
}

struct Checker<'a> {
    root: &'a Json,
    problems: Vec<Problem>,
}

impl<'a> Checker<'a> {
    fn resolve(&self, mut s: &'a Json) -> &'a Json {
        while let Some(r) = s.get("$ref").and_then(Json::as_str) {
            let name = r.trim_start_matches("#/$defs/");
            match self.root.get("$defs").and_then(|d| d.get(name)) {
                Some(t) => s = t,
                None => break,
            }
        }
        s
    }

    fn problem(&mut self, at: &Spanned<Node>, key: &str, message: String) {
        self.problems.push(Problem { line: at.referenced.line(), column: at.referenced.column(), key: key.to_string(), message });
    }

    fn check(&mut self, schema: &'a Json, node: &Spanned<Node>, path: &str) {
        let s = self.resolve(schema);
        if let Some(alts) = s.get("anyOf").or_else(|| s.get("oneOf")).and_then(Json::as_array) {
            return self.check_alternatives(alts, node, path);
        }
        if let Some(c) = s.get("const") {
            if !same_value(&node.value, c) {
                self.problem(node, path, format!("expected {c}, got {}", node.value.kind()));
            }
            return;
        }
        if let Some(values) = s.get("enum").and_then(Json::as_array) {
            if !values.iter().any(|v| same_value(&node.value, v)) {
                let names: Vec<String> = values.iter().map(|v| v.as_str().map_or(v.to_string(), String::from)).collect();
                self.problem(node, path, format!("expected one of {}, got {}", names.join(", "), node.value.kind()));
            }
            return;
        }
        let types = type_names(s);
        if !types.is_empty() && !types.iter().any(|t| fits(t, &node.value)) {
            let msg = format!("expected {}, got {}", expected(s, &types, path), node.value.kind());
            return self.problem(node, path, msg);
        }
        match &node.value {
            Node::Int(i) => self.check_range(s, *i as f64, node, path),
            Node::Float(f) => self.check_range(s, *f, node, path),
            Node::Map(entries) => self.check_map(s, entries, node, path),
            Node::Seq(items) => {
                if let Some(item) = s.get("items") {
                    for (i, v) in items.iter().enumerate() {
                        self.check(item, v, &format!("{path}[{i}]"));
                    }
                }
            }
            _ => {}
        }
    }

    /// Accepted when one alternative fits without problems; else the problems of the one
    /// whose type fits (the user meant that form), or one message listing the forms.
    fn check_alternatives(&mut self, alts: &'a [Json], node: &Spanned<Node>, path: &str) {
        let mut best: Option<Vec<Problem>> = None;
        for alt in alts {
            let mut sub = Checker { root: self.root, problems: Vec::new() };
            sub.check(alt, node, path);
            if sub.problems.is_empty() {
                return;
            }
            let t = type_names(self.resolve(alt));
            let type_fits = !t.is_empty() && t.iter().any(|t| fits(t, &node.value));
            if type_fits && best.as_ref().is_none_or(|b| sub.problems.len() < b.len()) {
                best = Some(sub.problems);
            }
        }
        match best {
            Some(p) => self.problems.extend(p),
            None => {
                let forms: Vec<String> = alts
                    .iter()
                    .map(|a| {
                        let a = self.resolve(a);
                        match a.get("const") {
                            Some(c) => c.as_str().map_or(c.to_string(), |s| format!("`{s}`")),
                            None => expected(a, &type_names(a), path),
                        }
                    })
                    .collect();
                self.problem(node, path, format!("expected {}, got {}", forms.join(" or "), node.value.kind()));
            }
        }
    }

    fn check_range(&mut self, s: &Json, v: f64, node: &Spanned<Node>, path: &str) {
        let min = s.get("minimum").and_then(Json::as_f64);
        let max = s.get("maximum").and_then(Json::as_f64);
        let port = is_port(s, path);
        let min = if port { Some(1.0) } else { min };
        if min.is_some_and(|m| v < m) || max.is_some_and(|m| v > m) {
            let msg = format!("expected {}, got {}", expected(s, &["integer".into()], path), node.value.kind());
            self.problem(node, path, msg);
        }
    }

    fn check_map(&mut self, s: &'a Json, entries: &[(Spanned<String>, Spanned<Node>)], node: &Spanned<Node>, path: &str) {
        let props = s.get("properties").and_then(Json::as_object);
        let extra = s.get("additionalProperties");
        let join = |k: &str| if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
        for (k, v) in entries {
            let key = join(&k.value);
            if let Some(p) = props.and_then(|p| p.get(&k.value)) {
                self.check(p, v, &key);
            } else if let Some(Json::Bool(false)) = extra {
                let known: Vec<&str> = props.map(|p| p.keys().map(String::as_str).collect()).unwrap_or_default();
                let hint = match closest(&k.value, &known) {
                    Some(c) => format!("; did you mean `{c}`?"),
                    None => format!("; known keys here: {}", known.join(", ")),
                };
                self.problems.push(Problem {
                    line: k.referenced.line(),
                    column: k.referenced.column(),
                    key,
                    message: format!("unknown key{hint}"),
                });
            } else if let Some(schema @ Json::Object(_)) = extra {
                self.check(schema, v, &key);
            }
        }
        for r in s.get("required").and_then(Json::as_array).into_iter().flatten().filter_map(Json::as_str) {
            if !entries.iter().any(|(k, _)| k.value == r) {
                self.problem(node, &join(r), "missing: this key is required".into());
            }
        }
    }
}

fn type_names(s: &Json) -> Vec<String> {
    match s.get("type") {
        Some(Json::String(t)) => vec![t.clone()],
        Some(Json::Array(a)) => a.iter().filter_map(Json::as_str).map(String::from).collect(),
        _ => Vec::new(),
    }
}

/// A node equals a schema value. A plain YAML scalar that reads as a boolean or a number
/// (`no`, `on`, `10`) still equals the string it is written as: the typed parse takes it as
/// that string where the profile wants one (`root_login: no`).
fn same_value(n: &Node, v: &Json) -> bool {
    if n.to_json() == *v {
        return true;
    }
    let Some(want) = v.as_str() else { return false };
    match n {
        Node::Int(i) => i.to_string() == want,
        Node::Float(f) => f.to_string() == want,
        Node::Bool(b) => {
            let words: &[&str] = if *b { &["true", "yes", "y", "on"] } else { &["false", "no", "n", "off"] };
            words.iter().any(|w| w.eq_ignore_ascii_case(want))
        }
        _ => false,
    }
}

/// Whether a node has a schema type. Any scalar fits `string`: a plain `10` or `yes` is read
/// as the text it is written as where the profile wants a string.
fn fits(t: &str, n: &Node) -> bool {
    matches!(
        (t, n),
        ("object", Node::Map(_))
            | ("array", Node::Seq(_))
            | ("string", Node::Str(_) | Node::Int(_) | Node::Float(_) | Node::Bool(_))
            | ("integer", Node::Int(_))
            | ("number", Node::Int(_) | Node::Float(_))
            | ("boolean", Node::Bool(_))
            | ("null", Node::Null)
    )
}

/// A 16-bit integer whose key names a port: ports start at 1.
fn is_port(s: &Json, path: &str) -> bool {
    s.get("format").and_then(Json::as_str) == Some("uint16") && path.rsplit('.').next().is_some_and(|k| k.ends_with("port"))
}

/// What a schema expects, in words: `a port number 1-65535`, `an integer 0-255`, `a list`.
fn expected(s: &Json, types: &[String], path: &str) -> String {
    let words: Vec<String> = types
        .iter()
        .filter(|t| *t != "null")
        .map(|t| match t.as_str() {
            "integer" if is_port(s, path) => "a port number 1-65535".to_string(),
            "integer" | "number" => {
                let noun = if t == "integer" { "an integer" } else { "a number" };
                match (s.get("minimum").and_then(Json::as_f64), s.get("maximum").and_then(Json::as_f64)) {
                    (Some(a), Some(b)) => format!("{noun} {a}-{b}"),
                    (Some(a), None) => format!("{noun} >= {a}"),
                    _ => noun.to_string(),
                }
            }
            "string" => "a string".into(),
            "boolean" => "true or false".into(),
            "object" => "a mapping".into(),
            "array" => "a list".into(),
            other => other.to_string(),
        })
        .collect();
    if words.is_empty() {
        "nothing".into()
    } else {
        words.join(" or ")
    }
}

/// The known key closest to a misspelt one, if it is close enough to be what was meant.
fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known.iter().map(|k| (strsim::damerau_levenshtein(key, k), *k)).filter(|(d, k)| *d <= 2.max(k.len() / 3)).min().map(|(_, k)| k)
}

/// The position of the node a key path names (`cluster.nodes[1].mac`), or of its deepest
/// existing ancestor: semantic checks name keys, this finds them in the file. Keys that
/// contain dots (`sysctl.vm.swappiness`) are matched whole when a split does not exist.
pub fn locate(tree: &Spanned<Node>, path: &str) -> (u64, u64) {
    let mut at = (tree.referenced.line(), tree.referenced.column());
    let mut node = tree;
    let mut rest = path;
    while !rest.is_empty() {
        rest = rest.trim_start_matches('.');
        if let Some(r) = rest.strip_prefix('[') {
            let Some((i, r2)) = r.split_once(']') else { break };
            let Node::Seq(items) = &node.value else { break };
            let Some(item) = i.parse::<usize>().ok().and_then(|i| items.get(i)) else { break };
            node = item;
            rest = r2;
        } else {
            let Node::Map(entries) = &node.value else { break };
            // The longest key that prefixes the rest (keys may contain dots).
            let found = entries
                .iter()
                .filter(|(k, _)| {
                    rest.strip_prefix(k.value.as_str()).is_some_and(|r| r.is_empty() || r.starts_with('.') || r.starts_with('['))
                })
                .max_by_key(|(k, _)| k.value.len());
            let Some((k, v)) = found else { break };
            rest = &rest[k.value.len()..];
            at = (k.referenced.line(), k.referenced.column());
            node = v;
            continue;
        }
        at = (node.referenced.line(), node.referenced.column());
    }
    at
}

/// The key path a semantic check's message names first (`key `users[0].name`: ...`).
pub fn key_in_message(msg: &str) -> Option<&str> {
    let (_, rest) = msg.split_once("key `")?;
    rest.split_once('`').map(|(k, _)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(yaml: &str) -> Vec<Problem> {
        let tree = read_tree(yaml).unwrap();
        structure(&tree, &super::super::json_schema())
    }

    #[test]
    fn a_valid_profile_has_no_structural_problems() {
        let p = problems("name: t\narch: [x86_64]\nssh: {port: 2222, root_login: no}\nsysctl: {vm.swappiness: 10}\nfiles:\n  - path: /etc/x\n    content: y\n    mode: \"0755\"\n");
        assert!(p.is_empty(), "{p:#?}");
    }

    #[test]
    fn five_problems_are_all_reported_with_positions_and_keys() {
        let yaml = "name: t\narch: [x86_64, sparc]\nos:\n  packges: [curl]\nssh:\n  port: x\n  root_login: maybe\nusers:\n  - name: a\n    shel: /bin/sh\n";
        let p = problems(yaml);
        let text = render_all("p.yaml", &p);
        assert_eq!(p.len(), 5, "{text}");
        for want in [
            "p.yaml:2:",
            "key `arch[1]`",
            "p.yaml:4:3: key `os.packges`: unknown key; did you mean `packages`?",
            "p.yaml:6:9: key `ssh.port`: expected a port number 1-65535, got \"x\"",
            "key `ssh.root_login`",
            "p.yaml:10:5: key `users[0].shel`: unknown key; did you mean `shell`?",
        ] {
            assert!(text.contains(want), "{want:?} not in\n{text}");
        }
        assert!(!text.contains("<input>") && !text.contains("error:"), "{text}");
    }

    #[test]
    fn a_newer_profile_format_is_named() {
        let tree = read_tree(
            "kiln: 2
name: t
future_key: 1
",
        )
        .unwrap();
        let p = newer_format(&tree, 1).unwrap();
        assert!(p.render("p.yaml").starts_with("p.yaml:1:7: key `kiln`: this profile is written for profile format 2"), "{p:?}");
        assert!(newer_format(
            &read_tree(
                "kiln: 1
"
            )
            .unwrap(),
            1
        )
        .is_none());
        assert!(newer_format(
            &read_tree(
                "kiln: x
"
            )
            .unwrap(),
            1
        )
        .is_some());
    }

    #[test]
    fn ranges_and_missing_keys() {
        let p = problems("arch: [x86_64]\nssh: {port: 0}\n");
        let text = render_all("p.yaml", &p);
        assert!(text.contains("key `name`: missing") && text.contains("key `ssh.port`: expected a port number 1-65535, got 0"), "{text}");
    }

    #[test]
    fn locate_finds_keys_with_dots_and_indexes() {
        let tree = read_tree("name: t\nsysctl:\n  vm.swappiness: 10\nusers:\n  - name: a\n  - name: b\n    shell: x\n").unwrap();
        assert_eq!(locate(&tree, "sysctl.vm.swappiness"), (3, 3));
        assert_eq!(locate(&tree, "users[1].shell"), (7, 5));
        assert_eq!(locate(&tree, "users[9].shell").0, 4);
        assert_eq!(key_in_message("x: key `users[1].shell`: bad"), Some("users[1].shell"));
    }

    #[test]
    fn yaml_syntax_errors_are_one_located_problem() {
        let e = read_tree("name: t\narch: [x86_64\n").unwrap_err();
        assert!(e.line >= 2 && e.message.starts_with("YAML syntax: ") && !e.message.contains("error:"), "{e:?}");
    }
}
