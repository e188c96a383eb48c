//! Copying dynamically linked programs between trees with everything they load: the shared
//! libraries named by ELF `DT_NEEDED` (transitively) and the dynamic loader named by `PT_INTERP`.
//! Used to put Debian's partitioning and mkfs tools into the initramfs.

use std::collections::BTreeSet;

use anyhow::{bail, Context, Result};
use object::elf;
use object::read::elf::{Dyn, FileHeader, ProgramHeader};
use object::Endianness;

use crate::arch::Arch;
use crate::tree::{Content, Entry, Kind, Meta, Tree, TreePath};

/// What an ELF file asks the dynamic loader for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ElfNeeds {
    /// `PT_INTERP`: absolute path of the dynamic loader (None for static or library files).
    pub interp: Option<String>,
    /// `DT_NEEDED` sonames, in file order.
    pub needed: Vec<String>,
}

/// Reads `PT_INTERP` and `DT_NEEDED` of a 64-bit little-endian ELF file (all kiln targets are).
pub fn elf_needs(data: &[u8]) -> Result<ElfNeeds> {
    let header = elf::FileHeader64::<Endianness>::parse(data).context("not a 64-bit ELF file")?;
    let endian = header.endian().context("ELF file has an unknown byte order")?;
    let mut needs = ElfNeeds::default();
    for ph in header.program_headers(endian, data).context("reading ELF program headers")? {
        if ph.p_type(endian) == elf::PT_INTERP {
            let raw = ph.data(endian, data).map_err(|()| anyhow::anyhow!("PT_INTERP lies outside the file"))?;
            let path = raw.split(|&b| b == 0).next().unwrap_or_default();
            needs.interp = Some(String::from_utf8(path.to_vec()).context("PT_INTERP is not UTF-8")?);
        }
    }
    let sections = header.sections(endian, data).context("reading ELF section headers")?;
    if let Some((dynamic, index)) = sections.dynamic(endian, data).context("reading the ELF dynamic section")? {
        let strings = sections.strings(endian, data, index).context("reading the ELF dynamic string table")?;
        for d in dynamic {
            if d.tag32(endian) == Some(elf::DT_NEEDED) {
                let name = d.string(endian, strings).context("DT_NEEDED entry outside the string table")?;
                needs.needed.push(String::from_utf8(name.to_vec()).context("DT_NEEDED name is not UTF-8")?);
            }
        }
    }
    Ok(needs)
}

/// Directories the loader searches by default for the arch (Debian's multiarch layout).
fn library_dirs(arch: Arch) -> Vec<String> {
    let t = arch.multiarch_triplet();
    vec![format!("usr/lib/{t}"), format!("lib/{t}"), "usr/lib".into(), "lib".into(), "usr/lib64".into(), "lib64".into()]
}

/// Follows symlinks inside `tree` (at most 16 hops) to a regular file; returns its content.
fn file_content(tree: &Tree, path: &str) -> Option<Content> {
    let mut current = path.to_string();
    for _ in 0..16 {
        let resolved = tree.resolve(&TreePath::parse(&normalise(&current)?).ok()?).ok()?;
        match &tree.get(&resolved)?.kind {
            Kind::File(c) => return Some(c.clone()),
            Kind::Symlink(target) if target.starts_with('/') => current = target.clone(),
            Kind::Symlink(target) => {
                let parent = resolved.parent().map(|p| p.as_str().to_string()).unwrap_or_default();
                current = format!("{parent}/{target}");
            }
            _ => return None,
        }
    }
    None
}

/// `a/./b/../c` -> `a/c` (relative to the tree's root); None if `..` climbs above the root.
fn normalise(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// Copies each program in `programs` (`(source path, destination path)`) from `source` into
/// `dest`, plus the closure of its shared libraries and its dynamic loader, each at the path the
/// loader will look for it. Returns the library paths added, sorted.
pub fn copy_programs(source: &Tree, dest: &mut Tree, arch: Arch, programs: &[(&str, &str)]) -> Result<Vec<String>> {
    let dirs = library_dirs(arch);
    let mut pending: Vec<(String, Content)> = Vec::new();
    for (from, to) in programs {
        let content = file_content(source, from).with_context(|| format!("/{from} is not in the tree (is its package installed?)"))?;
        dest.insert(&TreePath::parse(to)?, Entry { meta: Meta::root(0o755), kind: Kind::File(content.clone()) })?;
        pending.push((format!("/{from}"), content));
    }
    let mut placed: BTreeSet<String> = BTreeSet::new();
    while let Some((who, content)) = pending.pop() {
        let needs = elf_needs(&content.read()?).with_context(|| format!("reading the ELF file {who}"))?;
        if let Some(interp) = needs.interp {
            let rel = interp.trim_start_matches('/').to_string();
            if placed.insert(rel.clone()) {
                let c = file_content(source, &rel).with_context(|| format!("{who}: its dynamic loader {interp} is not in the tree"))?;
                pending.push((interp.clone(), c));
            }
        }
        for soname in needs.needed {
            if placed.iter().any(|p| p.rsplit('/').next() == Some(soname.as_str())) {
                continue;
            }
            let Some((rel, c)) = dirs.iter().find_map(|d| {
                let rel = format!("{d}/{soname}");
                file_content(source, &rel).map(|c| (rel, c))
            }) else {
                bail!("{who} needs {soname}, which is in none of /{} (which package ships it?)", dirs.join(", /"));
            };
            placed.insert(rel.clone());
            pending.push((format!("/{rel}"), c));
        }
    }
    for rel in &placed {
        let content = file_content(source, rel).with_context(|| format!("/{rel} vanished from the tree"))?;
        dest.insert(&TreePath::parse(rel)?, Entry { meta: Meta::root(0o755), kind: Kind::File(content) })?;
    }
    Ok(placed.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A host program the tests read (gdisk is one of kiln's required host tools).
    const HOST_PROGRAM: &str = "/usr/sbin/sgdisk";

    fn host_program() -> Vec<u8> {
        std::fs::read(HOST_PROGRAM).unwrap_or_else(|e| panic!("{HOST_PROGRAM}: {e} (install the `gdisk` package)"))
    }

    #[test]
    fn needs_match_readelf() {
        let needs = elf_needs(&host_program()).unwrap();
        let out =
            Command::new("readelf").args(["-d", "-l", HOST_PROGRAM]).output().expect("readelf missing: install the `binutils` package");
        let text = String::from_utf8_lossy(&out.stdout);
        let want: Vec<String> = text
            .lines()
            .filter(|l| l.contains("(NEEDED)"))
            .filter_map(|l| l.split('[').nth(1)?.split(']').next().map(str::to_string))
            .collect();
        assert!(!want.is_empty(), "readelf found no NEEDED entries:\n{text}");
        assert_eq!(needs.needed, want);
        let interp = needs.interp.expect("sgdisk is dynamically linked");
        assert!(text.contains(&format!("Requesting program interpreter: {interp}]")), "{interp} not in:\n{text}");
    }

    #[test]
    fn relative_symlinks_with_dotdot_are_followed() {
        let mut t = Tree::new();
        t.add_file("usr/lib/x/ld.so", 0o755, b"LD".to_vec()).unwrap();
        t.add_symlink("usr/lib64/ld.so", "../lib/x/ld.so").unwrap();
        t.add_symlink("lib64", "usr/lib64").unwrap();
        let c = file_content(&t, "/usr/lib64/ld.so").unwrap();
        assert_eq!(&*c.read().unwrap(), b"LD");
        t.add_symlink("evil", "../../x").unwrap();
        assert!(file_content(&t, "evil").is_none());
        assert_eq!(normalise("/a/./b/../c"), Some("a/c".into()));
    }

    #[test]
    fn not_elf_is_an_error() {
        assert!(elf_needs(b"#!/bin/sh\necho hi\n").is_err());
    }

    /// Host's x86_64 tree in miniature: the program, and every library `ldd` reports, placed
    /// behind a soname symlink as Debian ships them.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn copies_the_closure_ldd_reports() {
        let mut source = Tree::merged_usr(Arch::X86_64);
        source.add_file("usr/sbin/sgdisk", 0o755, host_program()).unwrap();
        let ldd = Command::new("ldd").arg(HOST_PROGRAM).output().expect("ldd missing: install `libc-bin`");
        let text = String::from_utf8_lossy(&ldd.stdout);
        let mut want = BTreeSet::new();
        for line in text.lines() {
            // "libfoo.so.1 => /lib/x86_64-linux-gnu/libfoo.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = match line.split("=>").nth(1) {
                Some(rest) => rest.split_whitespace().next().unwrap_or_default(),
                None => line.split_whitespace().next().unwrap_or_default(),
            };
            if !path.starts_with('/') {
                continue;
            }
            let real = std::fs::canonicalize(path).unwrap();
            let name = path.rsplit('/').next().unwrap();
            let real_name = real.file_name().unwrap().to_str().unwrap();
            let dir = if path.starts_with("/lib64") { "usr/lib64".to_string() } else { "usr/lib/x86_64-linux-gnu".to_string() };
            source.add_file(&format!("{dir}/{real_name}"), 0o644, std::fs::read(&real).unwrap()).unwrap();
            if real_name != name {
                source.add_symlink(&format!("{dir}/{name}"), real_name).unwrap();
            }
            want.insert(name.to_string());
        }
        let mut dest = Tree::new();
        let added = copy_programs(&source, &mut dest, Arch::X86_64, &[("sbin/sgdisk", "sbin/sgdisk")]).unwrap();
        let got: BTreeSet<String> = added.iter().map(|p| p.rsplit('/').next().unwrap().to_string()).collect();
        assert_eq!(got, want, "ldd said:\n{text}");
        assert!(matches!(dest.get_str("sbin/sgdisk").map(|e| &e.kind), Some(Kind::File(_))));
        assert!(added.contains(&"lib64/ld-linux-x86-64.so.2".to_string()), "{added:?}");
    }

    #[test]
    fn a_missing_library_is_named() {
        let mut source = Tree::merged_usr(Arch::X86_64);
        source.add_file("usr/sbin/sgdisk", 0o755, host_program()).unwrap();
        let err = copy_programs(&source, &mut Tree::new(), Arch::X86_64, &[("usr/sbin/sgdisk", "sbin/sgdisk")]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("needs lib") || msg.contains("dynamic loader"), "{msg}");
    }
}
