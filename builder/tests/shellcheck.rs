//! The on-device shell is code too: every script kiln lays onto the appliance or the initramfs,
//! and every script an example profile's overlay carries, must pass shellcheck (POSIX sh).

use std::path::{Path, PathBuf};
use std::process::Command;

fn shell_scripts(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            shell_scripts(&p, out);
        } else {
            let head = std::fs::read(&p).unwrap();
            let text = String::from_utf8_lossy(&head[..head.len().min(200)]).into_owned();
            if text.starts_with("#!/bin/sh") || text.contains("shellcheck shell=sh") {
                out.push(p);
            }
        }
    }
}

#[test]
fn overlay_shell_scripts_pass_shellcheck() {
    let mut scripts = Vec::new();
    for dir in ["../overlays", "../profiles"] {
        shell_scripts(&Path::new(env!("CARGO_MANIFEST_DIR")).join(dir), &mut scripts);
    }
    assert!(scripts.iter().any(|s| s.ends_with("rancher-import")), "the profiles' scripts were not found: {scripts:?}");
    assert!(scripts.len() >= 6, "found only {scripts:?}");
    let out = Command::new("shellcheck")
        .args(["-x", "-P", "SCRIPTDIR", "-s", "sh"])
        .args(&scripts)
        .output()
        .expect("shellcheck is missing: install the `shellcheck` package (.ci/install-host-deps does)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}
