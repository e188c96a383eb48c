//! Checks the appliance's `/etc/inittab` against the finished root: every program init starts
//! must be in the image. busybox init only says `can't run '...'` on the console, again at every
//! respawn, so a wrong path (kiln's own, a profile overlay's) is caught at build time instead.

use anyhow::{bail, Context, Result};

use crate::tree::{Content, Kind, Tree};

/// Each `id:runlevels:action:process` line whose process is an absolute path: that path must
/// exist in `root` (as a file or a link; busybox applets are links).
pub fn check_programs(root: &Tree) -> Result<()> {
    let text = match root.get_str("etc/inittab").map(|e| &e.kind) {
        Some(Kind::File(c)) => read(c)?,
        _ => bail!("/etc/inittab is missing from the root"),
    };
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.splitn(4, ':').collect();
        let [_, _, action, process] = fields[..] else {
            bail!("/etc/inittab line {}: `{line}` is not `id:runlevels:action:process`", i + 1);
        };
        let program = process.split_whitespace().next().unwrap_or_default();
        if program.starts_with('/') && !root.contains(program) {
            bail!(
                "/etc/inittab line {}: the {action} entry runs {program}, which is not in the image; fix the overlay or profile key that wrote it (or add the package that provides it)",
                i + 1
            );
        }
    }
    Ok(())
}

/// Adds one entry to the root's `/etc/inittab`, after a `# comment` line saying who wrote it.
/// Respawn entries start after every sysinit step, in file order.
pub fn append(root: &mut Tree, comment: &str, entry: &str) -> Result<()> {
    let mut text = match root.get_str("etc/inittab").map(|e| &e.kind) {
        Some(Kind::File(c)) => read(c)?,
        _ => bail!("/etc/inittab is missing from the root"),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!("# {comment}\n{entry}\n"));
    root.add_file("etc/inittab", 0o644, text)?;
    Ok(())
}

fn read(c: &Content) -> Result<String> {
    String::from_utf8(c.read()?.into_owned()).context("/etc/inittab is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::Arch;

    fn root_with(inittab: &str) -> Tree {
        let mut t = Tree::merged_usr(Arch::X86_64);
        t.add_file("usr/bin/busybox", 0o755, "elf").unwrap();
        t.add_symlink("usr/bin/getty", "busybox").unwrap();
        t.add_file("usr/lib/kiln/boot", 0o755, "#!/bin/sh").unwrap();
        t.add_file("etc/inittab", 0o644, inittab).unwrap();
        t
    }

    #[test]
    fn programs_in_the_image_pass_and_a_missing_one_is_named_with_its_line() {
        let ok = "# comment\n::sysinit:/usr/lib/kiln/boot\nttyS0::respawn:/usr/bin/getty -L 115200 ttyS0 vt100\n::respawn:/bin/getty x\n";
        check_programs(&root_with(ok)).unwrap();
        let err =
            format!("{:#}", check_programs(&root_with("::sysinit:/usr/lib/kiln/boot\nttyS0::respawn:/sbin/getty -L ttyS0\n")).unwrap_err());
        assert!(err.contains("line 2") && err.contains("/sbin/getty") && err.contains("respawn"), "{err}");
        let err = format!("{:#}", check_programs(&root_with("garbage\n")).unwrap_err());
        assert!(err.contains("line 1"), "{err}");
    }
}
