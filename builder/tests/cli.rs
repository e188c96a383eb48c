//! The `kiln` command's error paths that need no network: each gives a clear message, the
//! documented exit status, and leaves no image behind.

use std::path::Path;
use std::process::Command;

fn kiln(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .env("KILN_CACHE_DIR", dir.join("cache"))
        .env_remove("KILN_MIRROR")
        .output()
        .expect("running kiln");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn profile(dir: &Path, text: &str) {
    std::fs::write(dir.join("p.yaml"), text).unwrap();
}

fn assert_no_image(dir: &Path) {
    for arch in ["x86_64", "aarch64", "riscv64"] {
        assert!(!dir.join("out").join(arch).join("disk.img").exists(), "an image was left behind");
    }
}

#[test]
fn unknown_key_exits_2_naming_file_line_and_key() {
    let d = tempfile::tempdir().unwrap();
    profile(d.path(), "name: t\narch: [x86_64]\nos:\n  suite: trixie\n  packges: [curl]\n");
    let (code, text) = kiln(d.path(), &["build", "p.yaml", "--out", "out"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("p.yaml") && text.contains("packges") && text.contains('5'), "{text}");
    assert_no_image(d.path());
}

#[test]
fn unknown_arch_exits_2() {
    let d = tempfile::tempdir().unwrap();
    profile(d.path(), "name: t\narch: [x86_64, sparc]\n");
    let (code, text) = kiln(d.path(), &["build", "p.yaml", "--out", "out"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("sparc"), "{text}");
    assert_no_image(d.path());
}

#[test]
fn missing_overlay_exits_2_naming_it() {
    let d = tempfile::tempdir().unwrap();
    profile(d.path(), "name: t\narch: [riscv64]\noverlays:\n  - site/missing\n");
    let (code, text) = kiln(d.path(), &["build", "p.yaml", "--out", "out"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("site/missing") && text.contains("overlays"), "{text}");
    assert_no_image(d.path());
}

#[test]
fn arch_not_in_profile_exits_2() {
    let d = tempfile::tempdir().unwrap();
    profile(d.path(), "name: t\narch: [riscv64]\nos:\n  mirror: http://127.0.0.1:9/debian\n");
    let (code, text) = kiln(d.path(), &["build", "p.yaml", "--arch", "x86_64", "--out", "out", "--offline"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--arch x86_64"), "{text}");
}

#[test]
fn offline_with_an_empty_cache_names_the_missing_artifact() {
    let d = tempfile::tempdir().unwrap();
    // The mirror is never contacted offline; an unreachable address proves it.
    profile(d.path(), "name: t\narch: [riscv64]\nos:\n  mirror: http://127.0.0.1:9/debian\n");
    let (code, text) = kiln(d.path(), &["build", "p.yaml", "--out", "out", "--offline"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("InRelease") && text.contains("kiln fetch"), "{text}");
    assert_no_image(d.path());
}

#[test]
fn schema_is_json_with_the_profile_keys() {
    let d = tempfile::tempdir().unwrap();
    let (code, text) = kiln(d.path(), &["schema"]);
    assert_eq!(code, 0, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(v["properties"]["os"].is_object(), "{text}");
}

#[test]
fn unknown_format_exits_2_naming_the_choices() {
    let d = tempfile::tempdir().unwrap();
    profile(d.path(), "name: t\narch: [riscv64]\n");
    let (code, text) = kiln(d.path(), &["build", "p.yaml", "--out", "out", "--format", "disk,iso"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("iso") && text.contains("netboot"), "{text}");
    assert_no_image(d.path());
}

#[test]
fn serve_refuses_a_missing_directory_and_a_bad_reinstall_mac() {
    let d = tempfile::tempdir().unwrap();
    let (code, text) = kiln(d.path(), &["serve", "nope", "--listen", "127.0.0.1:0"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("nope") && text.contains("kiln build"), "{text}");
    std::fs::create_dir(d.path().join("out")).unwrap();
    let (code, text) = kiln(d.path(), &["serve", "out", "--listen", "127.0.0.1:0", "--reinstall", "not-a-mac"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("not-a-mac"), "{text}");
}
