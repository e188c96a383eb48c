//! Update bundles over HTTP: `/updates/<arch>/<file>` is the served directory's
//! `<arch>/update/<file>`, and `/updates/<channel>/<arch>/<file>` the same in a channel's output
//! directory (`kiln serve DIR --channel NAME=DIR2`). Only the bundle's files are served, plus
//! `latest`: the pointer to what the channel offers now (docs/updates.md, "Serving bundles").

use std::net::TcpStream;
use std::path::{Path, PathBuf};

use anyhow::Result;

use super::http::Request;
use super::{resolve_with, respond_simple, send_file, Served, Shared};

/// Where update bundles are served.
pub const UPDATES: &str = "/updates/";
/// The pointer file of each channel and arch: `/updates/[<channel>/]<arch>/latest`.
pub const LATEST: &str = "latest";
/// The longest channel name.
const NAME_MAX: usize = 32;

/// Another output directory whose bundles are served at `/updates/<name>/<arch>/`.
#[derive(Debug, Clone)]
pub struct Channel {
    pub name: String,
    pub root: PathBuf,
}

impl Channel {
    /// `NAME=DIR` as given to `--channel`: the name is 1 to 32 of `a-z`, `0-9` and `-` (not first),
    /// not an architecture's name (`/updates/x86_64/...` is the served directory's own bundle);
    /// the directory must hold at least one bundle (`<arch>/update/update.txt`).
    pub fn parse(arg: &str) -> Result<Channel, String> {
        let (name, dir) = arg.split_once('=').ok_or_else(|| format!("--channel {arg}: expected NAME=DIR, e.g. testing=out/testing"))?;
        if crate::arch::Arch::ALL.iter().any(|a| a.name() == name) {
            return Err(format!(
                "--channel {arg}: `{name}` is an architecture (its bundle is /updates/{name}/); name the channel otherwise"
            ));
        }
        let ok_chars = name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if name.is_empty() || name.len() > NAME_MAX || !ok_chars || name.starts_with('-') {
            return Err(format!("--channel {arg}: the name `{name}` must be 1 to {NAME_MAX} of a-z, 0-9 and - (not first)"));
        }
        let root =
            Path::new(dir).canonicalize().map_err(|e| format!("--channel {arg}: {dir}: {e}; pass a `kiln build` output directory"))?;
        if !root.is_dir() {
            return Err(format!("--channel {arg}: {dir} is not a directory; pass a `kiln build` output directory"));
        }
        if bundle_archs(&root).is_empty() {
            return Err(format!(
                "--channel {arg}: {dir} holds no update bundle (<arch>/update/update.txt); build one with `kiln build PROFILE --format update --out {dir}`"
            ));
        }
        Ok(Channel { name: name.to_string(), root })
    }
}

/// The architectures `dir` has an update bundle for.
pub fn bundle_archs(dir: &Path) -> Vec<crate::arch::Arch> {
    crate::arch::Arch::ALL
        .into_iter()
        .filter(|a| dir.join(a.name()).join(crate::update::DIR).join(crate::update::MANIFEST).is_file())
        .collect()
}

/// The bundle files, the only files under `<arch>/update/` that are served.
fn servable_update(rel: &Path) -> bool {
    let parts: Vec<&str> = rel.iter().filter_map(|p| p.to_str()).collect();
    match parts.as_slice() {
        [a, dir, file] => {
            crate::arch::Arch::ALL.iter().any(|x| x.name() == *a) && *dir == crate::update::DIR && crate::update::FILES.contains(file)
        }
        _ => false,
    }
}

/// The channel (`None`: the served directory) and output-directory path of an
/// `/updates/[<channel>/]<arch>/<file>` request (`None`: not that shape). The path is resolved
/// like any other (no `..`, no dot files, no symlink out), with only the bundle's files
/// servable; `latest` maps onto the bundle's `update.txt`, which it is made from.
pub fn update_path(request_path: &str) -> Option<(Option<&str>, String)> {
    let rest = request_path.strip_prefix(UPDATES)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let (channel, arch, file) = match parts.as_slice() {
        [arch, file] => (None, *arch, *file),
        [channel, arch, file] if !channel.is_empty() => (Some(*channel), *arch, *file),
        _ => return None,
    };
    if arch.is_empty() || file.is_empty() {
        return None;
    }
    Some((channel, format!("/{arch}/{}/{file}", crate::update::DIR)))
}

/// `GET /updates/[<channel>/]<arch>/<file>`: a bundle file, or the `latest` pointer. A bundle
/// whose files are owner-only (the build carries secrets: a cluster token, password hashes; see
/// `pipeline::image_mode`) is refused: its root would hand those secrets to anyone on the
/// network.
pub(super) fn serve(ctx: &Shared, req: &Request, stream: &TcpStream, head: bool) -> Result<Served> {
    use std::os::unix::fs::PermissionsExt;
    let not_found = |why: &str| respond_simple(stream, 404, "Not Found", &format!("not found ({why})\n"), head);
    let Some((channel, rel)) = update_path(&req.path) else {
        return not_found("bundles are built with `kiln build --format update`");
    };
    let root = match channel {
        None => &ctx.root,
        Some(name) => match ctx.channels.iter().find(|c| c.name == name) {
            Some(c) => &c.root,
            None => {
                let names: Vec<&str> = ctx.channels.iter().map(|c| c.name.as_str()).collect();
                return not_found(&format!(
                    "this server has no update channel `{name}`; channels: {}",
                    if names.is_empty() { "none".to_string() } else { names.join(", ") }
                ));
            }
        },
    };
    if let Some(prefix) = rel.strip_suffix(LATEST).filter(|p| p.ends_with('/')) {
        let manifest = format!("{prefix}{}", crate::update::MANIFEST);
        return match resolve_with(root, &manifest, servable_update) {
            Some(path) => latest(&path, &req.path, stream, head),
            None => not_found("no bundle for this arch in this channel"),
        };
    }
    let Some(path) = resolve_with(root, &rel, servable_update) else {
        return not_found("bundles are built with `kiln build --format update`");
    };
    if std::fs::metadata(&path)?.permissions().mode() & 0o004 == 0 {
        return respond_simple(
            stream,
            403,
            "Forbidden",
            "this update bundle carries the build's secrets (its files are owner-only): it is not served over the network; deliver it on a KILN-UPDATE stick\n",
            head,
        );
    }
    send_file(&path, req, stream, head)
}

/// The `latest` pointer: what the channel offers for the arch now, read from the bundle's
/// `update.txt` at each request (a new build into the directory shows at once), in the same
/// `key value` lines: `profile`, `arch`, `version`, `build`, then `url`, the bundle directory
/// to give `kiln-update apply` (on this server). It is not signed: `kiln-update` trusts only
/// the signed `update.txt` it fetches from that URL.
fn latest(manifest: &Path, request_path: &str, stream: &TcpStream, head: bool) -> Result<Served> {
    let text = std::fs::read_to_string(manifest)?;
    let mut body = String::new();
    for key in ["profile", "arch", "version", "build"] {
        if let Some(line) = text.lines().find(|l| l.split(' ').next() == Some(key)) {
            body.push_str(line);
            body.push('\n');
        }
    }
    let dir = request_path.strip_suffix(LATEST).unwrap_or(request_path);
    body.push_str(&format!("url {dir}\n"));
    respond_simple(stream, 200, "OK", &body, head)
}
