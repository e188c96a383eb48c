//! Overlays: directory trees laid onto the appliance root, and the handlebars templates in them.
//!
//! Files ending in `.hbs` are rendered (strict mode: an undefined variable is an error) and
//! written without the suffix. Host ownership is ignored: everything is `root:root`, and modes
//! are normalised to what git can carry (0755 if executable, else 0644; directories 0755).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use handlebars::Handlebars;

use crate::tree::{Content, Entry, Kind, Meta, Tree, TreePath};

/// Reads a host directory into a tree (regular files, directories and symlinks).
pub fn read_dir(dir: &Path) -> Result<Tree> {
    let mut tree = Tree::new();
    if !dir.is_dir() {
        bail!("overlay directory {} does not exist", dir.display());
    }
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name().min_depth(1) {
        let entry = entry.with_context(|| format!("reading overlay {}", dir.display()))?;
        let rel = entry.path().strip_prefix(dir).expect("walkdir stays below its root");
        let rel = rel.to_str().with_context(|| format!("overlay path {} is not UTF-8", entry.path().display()))?;
        let path = TreePath::parse_relative(rel)?;
        let ft = entry.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            let target = std::fs::read_link(entry.path())?;
            Kind::Symlink(target.to_string_lossy().into_owned())
        } else if ft.is_file() {
            Kind::File(Content::HostFile(entry.path().to_path_buf()))
        } else {
            bail!("overlay {}: {} is not a file, directory or symlink", dir.display(), rel);
        };
        let mode = match &kind {
            Kind::Dir => 0o755,
            Kind::Symlink(_) => 0o777,
            _ => {
                let m = entry.metadata()?.permissions().mode();
                if m & 0o111 != 0 {
                    0o755
                } else {
                    0o644
                }
            }
        };
        tree.insert(&path, Entry { meta: Meta::root(mode), kind }).with_context(|| format!("overlay {}: {rel}", dir.display()))?;
    }
    Ok(tree)
}

/// A handlebars renderer in strict mode without HTML escaping (we write config files).
pub fn renderer() -> Handlebars<'static> {
    let mut hb = Handlebars::new();
    hb.set_strict_mode(true);
    hb.register_escape_fn(handlebars::no_escape);
    hb
}

/// Renders one template text; `what` names it in errors.
pub fn render(hb: &Handlebars<'_>, text: &str, context: &serde_json::Value, what: &str) -> Result<String> {
    hb.render_template(text, context).map_err(|e| anyhow::anyhow!("template {what}: {}", template_error(&e)))
}

/// A handlebars error in the template's terms: where in the template and what, e.g.
/// "line 3, column 7: `vars.site` is not defined (strict mode: every variable must exist)".
fn template_error(e: &handlebars::RenderError) -> String {
    use handlebars::RenderErrorReason as R;
    let at = match (e.line_no, e.column_no) {
        (Some(l), Some(c)) => format!("line {l}, column {c}: "),
        _ => String::new(),
    };
    let what = match e.reason() {
        R::MissingVariable(Some(v)) => format!("`{v}` is not defined (define it under `vars:` in the profile, or fix the name)"),
        R::TemplateError(t) => format!("syntax: {}", t.reason()),
        other => other.to_string(),
    };
    format!("{at}{what}")
}

/// Renders every `*.hbs` file of `tree` in place (the rendered file loses the suffix).
/// `origin` names the overlay in errors.
pub fn render_templates(tree: &mut Tree, context: &serde_json::Value, origin: &str) -> Result<()> {
    let hb = renderer();
    let templates: Vec<(TreePath, Entry)> = tree
        .iter()
        .filter(|(p, e)| p.as_str().ends_with(".hbs") && matches!(e.kind, Kind::File(_)))
        .map(|(p, e)| (p.clone(), e.clone()))
        .collect();
    for (path, entry) in templates {
        let Kind::File(content) = &entry.kind else { unreachable!() };
        let bytes = content.read()?;
        let text = std::str::from_utf8(&bytes).with_context(|| format!("template {path} in {origin} is not UTF-8"))?;
        let rendered = render(&hb, text, context, &format!("{path} (in {origin})"))?;
        tree.remove(&path);
        let target = TreePath::parse(path.as_str().trim_end_matches(".hbs"))?;
        tree.insert(&target, Entry { meta: entry.meta, kind: Kind::File(Content::bytes(rendered.into_bytes())) })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn templates_render_and_lose_their_suffix() {
        let mut t = Tree::new();
        t.add_file("etc/hostname.hbs", 0o644, "{{name}}-{{vars.site}}\n").unwrap();
        t.add_file("etc/plain", 0o644, "{{not rendered}}").unwrap();
        render_templates(&mut t, &json!({"name": "n1", "vars": {"site": "lab"}}), "test").unwrap();
        match &t.get_str("etc/hostname").unwrap().kind {
            Kind::File(c) => assert_eq!(&*c.read().unwrap(), b"n1-lab\n"),
            k => panic!("{k:?}"),
        }
        assert!(!t.contains("etc/hostname.hbs"));
        assert!(t.contains("etc/plain"));
    }

    #[test]
    fn undefined_variable_is_an_error_naming_template_and_variable() {
        let mut t = Tree::new();
        t.add_file("etc/x.conf.hbs", 0o644, "a\n{{vars.missing}}\n").unwrap();
        let err = render_templates(&mut t, &json!({"vars": {}}), "overlay ./ov").unwrap_err().to_string();
        assert!(err.contains("/etc/x.conf.hbs") && err.contains("missing") && err.contains("./ov"), "{err}");
    }

    #[test]
    fn host_overlays_keep_executable_bits_and_symlinks() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("usr/bin")).unwrap();
        std::fs::write(d.path().join("usr/bin/tool"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(d.path().join("usr/bin/tool"), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink("tool", d.path().join("usr/bin/alias")).unwrap();
        let t = read_dir(d.path()).unwrap();
        assert_eq!(t.get_str("usr/bin/tool").unwrap().meta.mode, 0o755);
        assert!(matches!(&t.get_str("usr/bin/alias").unwrap().kind, Kind::Symlink(s) if s == "tool"));
        assert!(read_dir(&d.path().join("absent")).is_err());
    }
}
