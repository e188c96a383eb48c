//! Kernel module metadata: reading `.modinfo` from (compressed) `.ko` files in a [`Tree`],
//! computing the load-order closure of wanted modules, and writing the `modules.dep` /
//! `modules.alias` files that depmod would, so busybox `modprobe` works on the device. It also
//! owns the list of modules the appliance loads at every boot ([`BOOT_MODULES`]).
//!
//! Debian's kernel package ships no `modules.dep` (its postinst runs depmod), and kiln never
//! runs depmod on the host: everything here comes from each module's own `depends=`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use anyhow::{bail, Context};
use rayon::prelude::*;

use crate::arch::Arch;
use crate::tree::{Content, Kind, Tree, TreePath};

/// One loadable module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Normalised name (`-` replaced by `_`), as the kernel and modprobe know it.
    pub name: String,
    /// Where the file is in the tree.
    pub path: TreePath,
    /// Path relative to the modules directory, e.g. `kernel/fs/ext4/ext4.ko.xz`.
    pub rel: String,
    /// Direct dependencies (normalised names), in `.modinfo` order.
    pub depends: Vec<String>,
    /// `alias=` patterns (`pci:v00001AF4d00001001sv*...`, `fs-ext4`, ...).
    pub aliases: Vec<String>,
    /// ELF `e_machine` of the object (compare with [`Arch::elf_machine`]).
    pub machine: u16,
}

/// All modules of one kernel version in a tree.
#[derive(Debug, Clone)]
pub struct ModuleSet {
    pub kver: String,
    /// The `.../modules/<kver>` directory (resolved, normally `usr/lib/modules/<kver>`).
    pub dir: TreePath,
    pub modules: BTreeMap<String, Module>,
    /// Names (normalised) of modules compiled into the kernel, from `modules.builtin`.
    pub builtin: BTreeSet<String>,
}

const MODULE_ROOTS: [&str; 2] = ["usr/lib/modules", "lib/modules"];
const MODULE_SUFFIXES: [&str; 4] = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"];

/// Kernel versions with a modules directory in the tree (`usr/lib/modules/<kver>`, or
/// `lib/modules/<kver>` in a tree without merged /usr), sorted.
pub fn kernel_versions(tree: &Tree) -> Vec<String> {
    let mut out = BTreeSet::new();
    for root in MODULE_ROOTS {
        let Some(dir) = TreePath::parse(root).ok().and_then(|p| tree.resolve(&p).ok()) else { continue };
        for (p, e) in tree.children(&dir) {
            if matches!(e.kind, Kind::Dir) {
                out.insert(p.file_name().to_string());
            }
        }
    }
    out.into_iter().collect()
}

/// The module's name as the kernel knows it: `-` and `_` are interchangeable, `_` is canonical.
pub fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

/// The `key=value` pairs of a module's `.modinfo` section, in order. The file may be xz-, zstd-
/// or gzip-compressed (detected by magic) or a plain ELF object.
pub fn modinfo(bytes: &[u8]) -> anyhow::Result<Vec<(String, String)>> {
    let elf = decompress(bytes)?;
    modinfo_of_elf(&elf)
}

fn decompress(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    if bytes.starts_with(b"\x7fELF") {
        return Ok(bytes.to_vec());
    }
    let mut out = Vec::new();
    crate::deb::decompress(bytes).and_then(|mut r| r.read_to_end(&mut out)).context("decompressing the module")?;
    if !out.starts_with(b"\x7fELF") {
        bail!("not an ELF object (or an unknown compression)");
    }
    Ok(out)
}

fn modinfo_of_elf(elf: &[u8]) -> anyhow::Result<Vec<(String, String)>> {
    use object::{Object, ObjectSection};
    let file = object::File::parse(elf).context("parsing the ELF object")?;
    let section = file.section_by_name(".modinfo").context("no .modinfo section")?;
    let data = section.data().context("reading the .modinfo section")?;
    Ok(parse_modinfo(data))
}

/// `.modinfo` is a run of NUL-terminated `key=value` strings, with NUL padding between them.
fn parse_modinfo(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let s = String::from_utf8_lossy(s);
            let (k, v) = s.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// ELF `e_machine` from the header, honouring the file's byte order.
fn elf_machine(elf: &[u8]) -> Option<u16> {
    let bytes: [u8; 2] = elf.get(18..20)?.try_into().ok()?;
    match elf.get(5)? {
        1 => Some(u16::from_le_bytes(bytes)),
        2 => Some(u16::from_be_bytes(bytes)),
        _ => None,
    }
}

/// Module name from a file name: `ext4.ko.xz` -> `ext4`, `nf-tables.ko` -> `nf_tables`.
fn name_from_file(file_name: &str) -> Option<String> {
    MODULE_SUFFIXES.iter().find_map(|s| file_name.strip_suffix(s)).map(normalise)
}

fn read_module(path: &TreePath, rel: String, content: &Content) -> anyhow::Result<Module> {
    let raw = content.read()?;
    let elf = decompress(&raw)?;
    let info = modinfo_of_elf(&elf)?;
    let machine = elf_machine(&elf).context("truncated ELF header")?;
    let file_name = name_from_file(path.file_name()).context("not a module file name")?;
    let mut name = None;
    let mut depends = Vec::new();
    let mut aliases = Vec::new();
    for (k, v) in info {
        match k.as_str() {
            "name" => name = Some(normalise(&v)),
            "depends" => depends.extend(v.split(',').map(str::trim).filter(|d| !d.is_empty()).map(normalise)),
            "alias" => aliases.push(v),
            _ => {}
        }
    }
    // Old kernels had no `name=`: depmod then uses the file name.
    let name = name.unwrap_or(file_name);
    Ok(Module { name, path: path.clone(), rel, depends, aliases, machine })
}

/// The kind of reused result: modules' metadata, by [`index_key`]. The version names the
/// format of [`to_reused`] and what [`read_module`] extracts: change it when either changes.
const REUSE_KIND: &str = "kmod-v1";

/// sha256 of the kernel version and every module file's path and bytes, in path order.
fn index_key(kver: &str, files: &[(TreePath, String, Content)]) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(kver.as_bytes());
    for (p, rel, c) in files {
        let data = c.read().with_context(|| format!("reading module {p}"))?;
        h.update([0u8]);
        h.update(rel.as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(&data);
    }
    Ok(hex::encode(h.finalize()))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ReusedModule {
    rel: String,
    name: String,
    depends: Vec<String>,
    aliases: Vec<String>,
    machine: u16,
}

fn to_reused(modules: &[Module]) -> Vec<u8> {
    let list: Vec<ReusedModule> = modules
        .iter()
        .map(|m| ReusedModule {
            rel: m.rel.clone(),
            name: m.name.clone(),
            depends: m.depends.clone(),
            aliases: m.aliases.clone(),
            machine: m.machine,
        })
        .collect();
    serde_json::to_vec(&list).unwrap_or_default()
}

/// The modules of a reused value, placed under `dir`; `None` (read them again) if it does not parse.
fn from_reused(value: &[u8], dir: &TreePath) -> Option<Vec<Module>> {
    let list: Vec<ReusedModule> = serde_json::from_slice(value).ok()?;
    list.into_iter()
        .map(|m| {
            let path = TreePath::parse(&format!("{}/{}", dir.as_str(), m.rel)).ok()?;
            Some(Module { name: m.name, path, rel: m.rel, depends: m.depends, aliases: m.aliases, machine: m.machine })
        })
        .collect()
}

/// depmod's default search order puts `updates/` before everything else.
fn search_rank(rel: &str) -> u8 {
    u8::from(!rel.starts_with("updates/"))
}

impl ModuleSet {
    /// Reads every module's modinfo (in parallel) and `modules.builtin` (if shipped) for
    /// kernel `kver`.
    pub fn from_tree(tree: &Tree, kver: &str) -> anyhow::Result<ModuleSet> {
        Self::from_tree_reusing(tree, kver, &crate::reuse::Reuse::disabled())
    }

    /// [`ModuleSet::from_tree`], taking the modules' metadata from `reuse` when the same module
    /// files were read before (keyed by the sha256 of every module's path and bytes): reading
    /// means decompressing every module (~4,000 per kernel), the same work on every build.
    pub fn from_tree_reusing(tree: &Tree, kver: &str, reuse: &crate::reuse::Reuse) -> anyhow::Result<ModuleSet> {
        let dir = Self::find_dir(tree, kver)?;
        let prefix_len = dir.as_str().len() + 1;
        let files: Vec<(TreePath, String, Content)> = tree
            .below(&dir)
            .filter_map(|(p, e)| match &e.kind {
                Kind::File(c) if name_from_file(p.file_name()).is_some() => {
                    Some((p.clone(), p.as_str()[prefix_len..].to_string(), c.clone()))
                }
                _ => None,
            })
            .collect();
        let key = if reuse.enabled() { Some(index_key(kver, &files)?) } else { None };
        let reused = key.as_deref().and_then(|k| reuse.get(REUSE_KIND, k)).and_then(|v| from_reused(&v, &dir));
        let read: Vec<Module> = match reused {
            Some(modules) => modules,
            None => {
                let read: Vec<Module> = files
                    .par_iter()
                    .map(|(p, rel, c)| read_module(p, rel.clone(), c).with_context(|| format!("reading module {p}")))
                    .collect::<anyhow::Result<_>>()?;
                if let Some(k) = &key {
                    reuse.put(REUSE_KIND, k, &to_reused(&read));
                }
                read
            }
        };

        let mut modules: BTreeMap<String, Module> = BTreeMap::new();
        for m in read {
            match modules.get(&m.name) {
                // The same module in two places: keep the one depmod would (updates/ first,
                // then the first path), so the choice never depends on thread timing.
                Some(old) if (search_rank(&old.rel), &old.rel) <= (search_rank(&m.rel), &m.rel) => {
                    tracing::debug!("module {} at {} shadows {}", m.name, old.rel, m.rel);
                }
                _ => {
                    modules.insert(m.name.clone(), m);
                }
            }
        }
        let builtin = Self::read_builtin(tree, &dir)?;
        Ok(ModuleSet { kver: kver.to_string(), dir, modules, builtin })
    }

    fn find_dir(tree: &Tree, kver: &str) -> anyhow::Result<TreePath> {
        if kver.is_empty() || kver.contains('/') || kver == "." || kver == ".." {
            bail!("bad kernel version `{kver}`");
        }
        for root in MODULE_ROOTS {
            let Ok(p) = TreePath::parse(&format!("{root}/{kver}")) else { continue };
            if let Ok(resolved) = tree.resolve(&p) {
                if matches!(tree.get(&resolved).map(|e| &e.kind), Some(Kind::Dir)) {
                    return Ok(resolved);
                }
            }
        }
        bail!("no modules directory for kernel {kver} (looked in /usr/lib/modules and /lib/modules)")
    }

    /// `modules.builtin` lists one `kernel/.../name.ko` per line.
    fn read_builtin(tree: &Tree, dir: &TreePath) -> anyhow::Result<BTreeSet<String>> {
        let path = dir.join("modules.builtin")?;
        let Some(entry) = tree.get(&path) else { return Ok(BTreeSet::new()) };
        let Kind::File(c) = &entry.kind else { bail!("{path} is not a regular file") };
        let text = c.read().with_context(|| format!("reading {path}"))?;
        Ok(String::from_utf8_lossy(&text).lines().filter_map(|l| name_from_file(l.trim().rsplit('/').next()?)).collect())
    }

    /// Fails unless every module is built for `arch`.
    pub fn check_arch(&self, arch: Arch) -> anyhow::Result<()> {
        let wrong: Vec<&str> = self.modules.values().filter(|m| m.machine != arch.elf_machine()).map(|m| m.rel.as_str()).collect();
        if !wrong.is_empty() {
            bail!("{} module(s) of kernel {} are not built for {arch}: {}", wrong.len(), self.kver, wrong.join(", "));
        }
        Ok(())
    }

    /// Modules needed for `wanted`, in load order (dependencies first, each once; deterministic:
    /// wanted names in the given order, dependencies in `.modinfo` order). Built-in names are
    /// skipped. A wanted name that is neither a module nor built in is an error listing every
    /// such name, unless `optional` is set: then such names come back in the second vec.
    /// A missing or cyclic *dependency* is always an error (the kernel package is broken).
    pub fn closure(&self, wanted: &[&str], optional: bool) -> anyhow::Result<(Vec<&Module>, Vec<String>)> {
        let mut order = Vec::new();
        let mut placed = BTreeSet::new();
        let mut absent = Vec::new();
        for w in wanted {
            let name = normalise(w);
            if self.builtin.contains(&name) {
                continue;
            }
            if !self.modules.contains_key(&name) {
                if !absent.contains(&name) {
                    absent.push(name);
                }
                continue;
            }
            self.visit(&name, &mut Vec::new(), &mut placed, &mut order)?;
        }
        if !absent.is_empty() && !optional {
            bail!(
                "kernel {} has no module (and no built-in) named {}",
                self.kver,
                absent.iter().map(|a| format!("`{a}`")).collect::<Vec<_>>().join(", ")
            );
        }
        Ok((order, absent))
    }

    /// Depth-first, post-order: a module is placed after all of its dependencies.
    fn visit<'a>(
        &'a self,
        name: &str,
        stack: &mut Vec<String>,
        placed: &mut BTreeSet<String>,
        order: &mut Vec<&'a Module>,
    ) -> anyhow::Result<()> {
        if placed.contains(name) || self.builtin.contains(name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            bail!("module dependency cycle: {} -> {name}", stack.join(" -> "));
        }
        let Some(module) = self.modules.get(name) else {
            let by = stack.last().map(String::as_str).unwrap_or("?");
            bail!("module `{by}` depends on `{name}`, which kernel {} neither ships nor builds in", self.kver);
        };
        stack.push(name.to_string());
        for dep in &module.depends {
            self.visit(dep, stack, placed, order)?;
        }
        stack.pop();
        placed.insert(name.to_string());
        order.push(module);
        Ok(())
    }

    /// `modules.dep` as depmod writes it: one line per module, sorted by path,
    /// `rel: dep_rel dep_rel ...` listing every transitive dependency with users before the
    /// modules they use (modprobe loads the list from the end). A dependency that cannot be
    /// resolved is left out of that module's line (depmod does the same and warns).
    pub fn modules_dep(&self) -> String {
        let mut by_rel: Vec<&Module> = self.modules.values().collect();
        by_rel.sort_by(|a, b| a.rel.cmp(&b.rel));
        let mut out = String::new();
        for m in by_rel {
            out.push_str(&m.rel);
            out.push(':');
            let mut placed = BTreeSet::new();
            let mut order = Vec::new();
            for dep in &m.depends {
                if let Err(e) = self.visit(dep, &mut vec![m.name.clone()], &mut placed, &mut order) {
                    tracing::warn!("modules.dep: {e:#}");
                }
            }
            for d in order.iter().rev().filter(|d| d.name != m.name) {
                out.push(' ');
                out.push_str(&d.rel);
            }
            out.push('\n');
        }
        out
    }

    /// `modules.alias` as depmod writes it: `alias <pattern> <module>`, modules by name.
    pub fn modules_alias(&self) -> String {
        let mut out = String::from("# Aliases extracted from modules themselves.\n");
        for m in self.modules.values() {
            for a in &m.aliases {
                out.push_str(&format!("alias {a} {}\n", m.name));
            }
        }
        out
    }

    /// This set without the modules under the `omit` subtrees (paths below `kernel/`), except
    /// those in the closure of `keep` (names; absent ones are ignored) and every dependency of a
    /// module that stays. Returns the smaller set and the modules left out, by path.
    /// A dependency that is missing stays missing (as in `modules_dep`); `closure` reports those.
    pub fn without(&self, omit: &[String], keep: &[&str]) -> (ModuleSet, Vec<Module>) {
        let prefixes: Vec<String> = omit.iter().map(|o| format!("kernel/{}/", o.trim_matches('/'))).collect();
        let omitted = |m: &Module| prefixes.iter().any(|p| m.rel.starts_with(p.as_str()));
        let mut todo: Vec<String> = keep.iter().map(|k| normalise(k)).collect();
        todo.extend(self.modules.values().filter(|m| !omitted(m)).map(|m| m.name.clone()));
        let mut stay = BTreeSet::new();
        while let Some(name) = todo.pop() {
            if let Some(m) = self.modules.get(&name) {
                if stay.insert(name) {
                    todo.extend(m.depends.iter().cloned());
                }
            }
        }
        let (kept, dropped): (BTreeMap<String, Module>, BTreeMap<String, Module>) =
            self.modules.clone().into_iter().partition(|(name, _)| stay.contains(name));
        let set = ModuleSet { kver: self.kver.clone(), dir: self.dir.clone(), modules: kept, builtin: self.builtin.clone() };
        (set, dropped.into_values().collect())
    }

    /// Whether the kernel has the module `name` (loadable or built in).
    pub fn has(&self, name: &str) -> bool {
        self.modules.contains_key(name) || self.builtin.contains(name)
    }
}

/// The modules the appliance loads at every boot, one per line, read by `boot.d/22-modules.sh`.
pub const BOOT_MODULES: &str = "etc/kiln/modules-load.conf";
/// The list's first line. It still names `kernel.load`, its first writer when the list had two,
/// so that images stay byte-identical.
const BOOT_MODULES_HEADER: &str = "# written by kiln from the profile's `kernel.load` key: modules loaded at boot\n";

/// Adds modules to the boot-time list, the one writer of [`BOOT_MODULES`]: the profile's
/// `kernel.load` (provision), k3s's modules (cluster services) and containerd's each add theirs.
/// The file is created with its header by the first call (even with no modules), keeps the order
/// of the additions, and lists each module once, so no caller can drop another's modules
/// whatever the order they run in.
pub fn load_at_boot<S: AsRef<str>>(root: &mut Tree, names: &[S]) -> anyhow::Result<()> {
    let mut text = match root.get_str(BOOT_MODULES).map(|e| &e.kind) {
        Some(Kind::File(c)) => String::from_utf8(c.read()?.into_owned()).with_context(|| format!("/{BOOT_MODULES} is not UTF-8"))?,
        _ => String::from(BOOT_MODULES_HEADER),
    };
    for n in names {
        let n = n.as_ref();
        if !text.lines().any(|l| l == n) {
            text.push_str(n);
            text.push('\n');
        }
    }
    root.add_file(BOOT_MODULES, 0o644, text)?;
    Ok(())
}

/// [`load_at_boot`] for modules a feature needs, each checked against the kernel's `modules`
/// first; `key` is the profile key that asks for them (named in the error).
pub fn load_needed_at_boot(root: &mut Tree, modules: &ModuleSet, wanted: &[&str], key: &str) -> anyhow::Result<()> {
    if let Some(m) = wanted.iter().find(|m| !modules.has(m)) {
        bail!("key `{key}`: the kernel module `{m}` is needed, but kernel {} lacks it", modules.kver);
    }
    load_at_boot(root, wanted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::Command;
    use std::sync::OnceLock;

    const KVER: &str = "6.12.0-test";

    /// Compiles a tiny object whose `.modinfo` holds `info` (NUL-separated), once per content.
    fn object_with_modinfo(info: &str) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("m.c");
        let escaped: String = info.replace('\0', "\\0");
        std::fs::write(
            &c,
            format!(
                "__attribute__((section(\".modinfo\"),used)) static const char m[] = \"{escaped}\";\n\
                 int f(void) {{ return 0; }}\n"
            ),
        )
        .unwrap();
        let o = dir.path().join("m.o");
        let status = Command::new("cc").args(["-c", "-o"]).arg(&o).arg(&c).status().expect("cc not found: install the `gcc` package");
        assert!(status.success(), "cc failed");
        std::fs::read(o).unwrap()
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 6);
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// A tree with: a (depends b,c), b (depends c), c, d-e (xz, file name with a dash),
    /// f (zstd, depends on the built-in `crc32c`), g (plain .ko, depends on missing `zz`),
    /// and a modules.builtin naming crc32c and bi.
    fn fixture() -> &'static Tree {
        static TREE: OnceLock<Tree> = OnceLock::new();
        TREE.get_or_init(|| {
            let mut t = Tree::merged_usr(Arch::X86_64);
            let base = format!("lib/modules/{KVER}"); // through the merged-/usr alias
            let mods = [
                ("kernel/drivers/a.ko.xz", "name=a\0depends=b,c\0alias=pci:v1234*\0alias=fs-a\0"),
                ("kernel/drivers/b.ko.xz", "name=b\0depends=c\0"),
                ("kernel/lib/c.ko.xz", "name=c\0depends=\0"),
                ("kernel/fs/d-e.ko.xz", "name=d_e\0depends=\0alias=fs-de\0"),
                ("kernel/fs/f.ko.zst", "name=f\0depends=crc32c\0"),
                ("kernel/fs/g.ko", "depends=zz\0"),
            ];
            for (rel, info) in mods {
                let obj = object_with_modinfo(info);
                let bytes = if rel.ends_with(".xz") {
                    xz(&obj)
                } else if rel.ends_with(".zst") {
                    zstd::encode_all(&obj[..], 3).unwrap()
                } else {
                    obj
                };
                t.add_file(&format!("{base}/{rel}"), 0o644, bytes).unwrap();
            }
            t.add_file(&format!("{base}/modules.builtin"), 0o644, "kernel/lib/crc32c.ko\nkernel/x/bi.ko\n").unwrap();
            t.add_file(&format!("{base}/modules.order"), 0o644, "ignored").unwrap();
            t
        })
    }

    fn set() -> ModuleSet {
        ModuleSet::from_tree(fixture(), KVER).unwrap()
    }

    fn names(v: &[&Module]) -> Vec<String> {
        v.iter().map(|m| m.name.clone()).collect()
    }

    #[test]
    fn modules_are_found_under_usr_lib_modules() {
        assert_eq!(kernel_versions(fixture()), vec![KVER.to_string()]);
        let s = set();
        assert_eq!(s.dir.as_str(), format!("usr/lib/modules/{KVER}"));
        assert_eq!(s.modules.keys().cloned().collect::<Vec<_>>(), ["a", "b", "c", "d_e", "f", "g"]);
        let a = &s.modules["a"];
        assert_eq!(a.rel, "kernel/drivers/a.ko.xz");
        assert_eq!(a.depends, ["b", "c"]);
        assert_eq!(a.aliases, ["pci:v1234*", "fs-a"]);
        assert_eq!(s.modules["g"].depends, ["zz"]); // name from the file name
        assert_eq!(s.builtin.iter().cloned().collect::<Vec<_>>(), ["bi", "crc32c"]);
        s.check_arch(Arch::X86_64).unwrap();
        assert!(s.check_arch(Arch::Aarch64).is_err());
    }

    #[test]
    fn modinfo_reads_compressed_and_plain_objects() {
        let obj = object_with_modinfo("name=x\0depends=y\0");
        let want = vec![("name".to_string(), "x".to_string()), ("depends".to_string(), "y".to_string())];
        assert_eq!(modinfo(&obj).unwrap(), want);
        assert_eq!(modinfo(&xz(&obj)).unwrap(), want);
        assert!(modinfo(b"garbage").is_err());
    }

    #[test]
    fn closure_puts_dependencies_first_and_each_once() {
        let s = set();
        let (order, absent) = s.closure(&["a", "d-e", "b"], false).unwrap();
        assert_eq!(names(&order), ["c", "b", "a", "d_e"]);
        assert!(absent.is_empty());
        // Built-in dependencies and built-in wanted names are skipped.
        let (order, _) = s.closure(&["bi", "f"], false).unwrap();
        assert_eq!(names(&order), ["f"]);
    }

    #[test]
    fn an_omitted_subtree_goes_unless_kept_or_needed() {
        let s = set();
        // drivers/ is omitted: b stays because a (kept by name) needs it; a's other dependency
        // c is outside the subtree anyway. Nothing under fs/ or lib/ goes.
        let (kept, dropped) = s.without(&["drivers".into()], &["a"]);
        assert_eq!(kept.modules.keys().cloned().collect::<Vec<_>>(), ["a", "b", "c", "d_e", "f", "g"]);
        assert!(dropped.is_empty());
        let (kept, dropped) = s.without(&["drivers/".into()], &["nope"]);
        assert_eq!(kept.modules.keys().cloned().collect::<Vec<_>>(), ["c", "d_e", "f", "g"]);
        assert_eq!(dropped.iter().map(|m| m.rel.as_str()).collect::<Vec<_>>(), ["kernel/drivers/a.ko.xz", "kernel/drivers/b.ko.xz"]);
        // The indexes written for the smaller set name only what stays.
        assert!(!kept.modules_dep().contains("drivers/") && !kept.modules_alias().contains("pci:v1234*"), "{}", kept.modules_dep());
        // Keeping b keeps b only (not a, which uses it); a dependency of a kept module is kept
        // even inside the omitted subtree.
        let (kept, _) = s.without(&["drivers".into(), "lib".into()], &["b"]);
        assert_eq!(kept.modules.keys().cloned().collect::<Vec<_>>(), ["b", "c", "d_e", "f", "g"]);
        // A prefix matches whole directory names only.
        let (kept, _) = s.without(&["driv".into(), "f".into()], &[]);
        assert_eq!(kept.modules.len(), 6);
    }

    #[test]
    fn missing_names_are_errors_unless_optional() {
        let s = set();
        let err = s.closure(&["a", "nope", "nada"], false).unwrap_err().to_string();
        assert!(err.contains("`nope`") && err.contains("`nada`"), "{err}");
        let (order, absent) = s.closure(&["a", "nope"], true).unwrap();
        assert_eq!(names(&order), ["c", "b", "a"]);
        assert_eq!(absent, ["nope"]);
        // A missing dependency is an error even for optional calls.
        let err = format!("{:#}", s.closure(&["g"], true).unwrap_err());
        assert!(err.contains("`zz`"), "{err}");
    }

    #[test]
    fn cycles_are_errors() {
        let mut s = set();
        s.modules.get_mut("c").unwrap().depends = vec!["a".into()];
        let err = format!("{:#}", s.closure(&["a"], false).unwrap_err());
        assert!(err.contains("cycle"), "{err}");
    }

    /// Module metadata is kept in `reuse` under the module files' key and taken from there by
    /// the next read of the same files (shown by editing the kept value); a value that does not
    /// parse is ignored and the modules are read again.
    #[test]
    fn module_metadata_is_reused_for_the_same_module_files() {
        let d = tempfile::tempdir().unwrap();
        let reuse = crate::reuse::Reuse::with_key(d.path(), [4; 32]);
        let fresh = set();
        let first = ModuleSet::from_tree_reusing(fixture(), KVER, &reuse).unwrap();
        assert_eq!((first.modules_dep(), first.modules_alias()), (fresh.modules_dep(), fresh.modules_alias()));
        let kind = d.path().join("reuse").join(REUSE_KIND);
        let values: Vec<_> = std::fs::read_dir(&kind)
            .unwrap()
            .flat_map(|s| std::fs::read_dir(s.unwrap().path()).unwrap())
            .map(|f| f.unwrap().path())
            .collect();
        assert_eq!(values.len(), 1, "{values:?}");
        // The second read takes the kept value: an alias added to it shows in the index.
        let key = values[0].file_name().unwrap().to_str().unwrap();
        let mut list: Vec<serde_json::Value> = serde_json::from_slice(&reuse.get(REUSE_KIND, key).unwrap()).unwrap();
        list[0]["aliases"].as_array_mut().unwrap().push("reused:marker".into());
        reuse.put(REUSE_KIND, key, &serde_json::to_vec(&list).unwrap());
        let second = ModuleSet::from_tree_reusing(fixture(), KVER, &reuse).unwrap();
        assert!(second.modules_alias().contains("reused:marker"), "the kept value was not used");
        // A value that does not parse is read again from the modules.
        reuse.put(REUSE_KIND, key, b"{not json");
        let third = ModuleSet::from_tree_reusing(fixture(), KVER, &reuse).unwrap();
        assert_eq!(third.modules_alias(), fresh.modules_alias());
    }

    #[test]
    fn modules_dep_and_alias_are_in_depmod_format() {
        let s = set();
        let dep = s.modules_dep();
        assert_eq!(
            dep,
            "kernel/drivers/a.ko.xz: kernel/drivers/b.ko.xz kernel/lib/c.ko.xz\n\
             kernel/drivers/b.ko.xz: kernel/lib/c.ko.xz\n\
             kernel/fs/d-e.ko.xz:\n\
             kernel/fs/f.ko.zst:\n\
             kernel/fs/g.ko:\n\
             kernel/lib/c.ko.xz:\n"
        );
        assert_eq!(
            s.modules_alias(),
            "# Aliases extracted from modules themselves.\n\
             alias pci:v1234* a\n\
             alias fs-a a\n\
             alias fs-de d_e\n"
        );
    }

    /// Cross-check with busybox modprobe's reading of modules.dep is done on the device; here
    /// a real kernel's modules, if the host has any.
    #[test]
    #[ignore = "needs real kernel modules on the host (KILN_TEST_MODULES_ROOT or /lib/modules)"]
    fn real_kernel_modules() {
        let root = std::env::var("KILN_TEST_MODULES_ROOT").unwrap_or_else(|_| "/".into());
        let moddir = std::path::Path::new(&root).join("lib/modules");
        let kver = std::fs::read_dir(&moddir)
            .expect("no lib/modules")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .min()
            .expect("no kernel version");
        let mut t = Tree::merged_usr(Arch::X86_64);
        for e in walkdir::WalkDir::new(moddir.join(&kver)).sort_by_file_name() {
            let e = e.unwrap();
            if e.file_type().is_file() {
                let rel = e.path().strip_prefix(&root).unwrap().to_str().unwrap().to_string();
                let p = TreePath::parse(&rel).unwrap();
                t.insert(
                    &p,
                    crate::tree::Entry {
                        meta: crate::tree::Meta::root(0o644),
                        kind: Kind::File(Content::HostFile(e.path().to_path_buf())),
                    },
                )
                .unwrap();
            }
        }
        let started = std::time::Instant::now();
        let s = ModuleSet::from_tree(&t, &kver).unwrap();
        eprintln!("{} modules of {kver} read in {:?}", s.modules.len(), started.elapsed());
        s.check_arch(Arch::X86_64).unwrap();
        let (order, absent) = s.closure(&["virtio_blk", "squashfs", "overlay", "ext4", "vfat"], true).unwrap();
        eprintln!("order: {:?}, absent: {absent:?}", names(&order));
        let pos = |n: &str| order.iter().position(|m| m.name == n);
        if let (Some(e), Some(j)) = (pos("ext4"), pos("jbd2")) {
            assert!(j < e);
        }
        if let (Some(v), Some(f)) = (pos("vfat"), pos("fat")) {
            assert!(f < v);
        }
        let shipped = moddir.join(&kver).join("modules.dep");
        if let Ok(real) = std::fs::read_to_string(shipped) {
            // Same set of lines' left-hand sides and the same dependency sets as depmod's.
            let parse = |t: &str| -> BTreeMap<String, BTreeSet<String>> {
                t.lines()
                    .filter_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        Some((k.to_string(), v.split_whitespace().map(str::to_string).collect()))
                    })
                    .collect()
            };
            assert_eq!(parse(&s.modules_dep()), parse(&real));
        }
        assert_dep_lines_list_users_before_their_dependencies(&s);
    }

    /// In each `modules.dep` line a module's own dependencies come after it (modprobe loads
    /// the list from the end).
    fn assert_dep_lines_list_users_before_their_dependencies(s: &ModuleSet) {
        let by_rel: BTreeMap<&str, &Module> = s.modules.values().map(|m| (m.rel.as_str(), m)).collect();
        for line in s.modules_dep().lines() {
            let (_, deps) = line.split_once(':').unwrap();
            let deps: Vec<&str> = deps.split_whitespace().collect();
            for (i, d) in deps.iter().enumerate() {
                for dd in &by_rel[d].depends {
                    if let Some(j) = deps.iter().position(|x| by_rel[x].name == *dd) {
                        assert!(j > i, "{line}: {d} listed after its dependency {dd}");
                    }
                }
            }
        }
    }

    /// A real kernel package unpacked with [`crate::deb::unpack_deb`].
    #[test]
    #[ignore = "needs a linux-image .deb (KILN_TEST_KERNEL_DEB)"]
    fn real_kernel_package() {
        let deb = std::env::var("KILN_TEST_KERNEL_DEB").expect("set KILN_TEST_KERNEL_DEB to a linux-image .deb");
        let mut t = Tree::merged_usr(Arch::X86_64);
        let started = std::time::Instant::now();
        let info = crate::deb::unpack_deb(std::path::Path::new(&deb), &mut t).unwrap();
        eprintln!("{} {} unpacked: {} entries in {:?}", info.package, info.version, info.files.len(), started.elapsed());
        let kvers = kernel_versions(&t);
        assert_eq!(kvers.len(), 1, "{kvers:?}");
        let started = std::time::Instant::now();
        let s = ModuleSet::from_tree(&t, &kvers[0]).unwrap();
        eprintln!("{} modules, {} built in, read in {:?}", s.modules.len(), s.builtin.len(), started.elapsed());
        s.check_arch(Arch::X86_64).unwrap();
        let (order, absent) = s.closure(&["virtio_blk", "squashfs", "overlay", "ext4", "vfat", "virtio_net"], true).unwrap();
        eprintln!("order: {:?}, absent: {absent:?}", names(&order));
        let pos = |n: &str| order.iter().position(|m| m.name == n).unwrap_or_else(|| panic!("{n} not in closure"));
        assert!(pos("fat") < pos("vfat"));
        assert!(pos("net_failover") < pos("virtio_net"));
        assert_dep_lines_list_users_before_their_dependencies(&s);
    }

    #[test]
    fn boot_modules_have_one_writer_that_keeps_order_and_lists_each_once() {
        let text = |t: &Tree| match &t.get_str(BOOT_MODULES).expect("written").kind {
            Kind::File(c) => String::from_utf8(c.read().unwrap().into_owned()).unwrap(),
            k => panic!("{k:?}"),
        };
        let mut t = Tree::new();
        load_at_boot::<&str>(&mut t, &[]).unwrap();
        assert_eq!(text(&t), BOOT_MODULES_HEADER, "created even when empty");
        load_at_boot(&mut t, &["loop".to_string(), "br_netfilter".to_string(), "loop".to_string()]).unwrap();
        let set = ModuleSet {
            kver: KVER.into(),
            dir: TreePath::parse("usr/lib/modules/6.12.0-test").unwrap(),
            modules: Default::default(),
            builtin: ["overlay", "br_netfilter", "nf_conntrack"].iter().map(|s| s.to_string()).collect(),
        };
        load_needed_at_boot(&mut t, &set, &["overlay", "br_netfilter", "nf_conntrack"], "cluster").unwrap();
        load_needed_at_boot(&mut t, &set, &["overlay"], "engine").unwrap();
        assert_eq!(text(&t), format!("{BOOT_MODULES_HEADER}loop\nbr_netfilter\noverlay\nnf_conntrack\n"));
        let err = load_needed_at_boot(&mut t, &set, &["overlay", "tun"], "engine").unwrap_err().to_string();
        assert!(err.contains("key `engine`") && err.contains("`tun`") && err.contains(KVER), "{err}");
        assert!(!text(&t).contains("tun"), "nothing is written when a module is missing");
    }
}
