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
fn a_raspberry_pi_profile_without_non_free_firmware_exits_2_before_any_download() {
    let d = tempfile::tempdir().unwrap();
    // The mirror is unreachable: the check comes before the package index is read.
    profile(d.path(), "name: t\narch: [aarch64]\nplatform: {aarch64: rpi4}\nos:\n  mirror: http://127.0.0.1:9/debian\n");
    let (code, text) = kiln(d.path(), &["build", "p.yaml", "--out", "out"]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("p.yaml")
            && text.contains("`os.components`")
            && text.contains("raspi-firmware")
            && text.contains("[main, non-free-firmware]"),
        "{text}"
    );
    assert_no_image(d.path());

    // A Pi boots the card kiln writes: no installer medium, no netboot.
    let components = "  components: [main, non-free-firmware]\n";
    profile(d.path(), &format!("name: t\narch: [aarch64]\nplatform: {{aarch64: rpi3}}\ninstall: {{mode: installer}}\nos:\n{components}"));
    let (code, text) = kiln(d.path(), &["build", "p.yaml", "--out", "out"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("`install.mode`") && text.contains("rpi3"), "{text}");
    profile(d.path(), &format!("name: t\narch: [aarch64]\nplatform: {{aarch64: rpi3}}\nos:\n{components}"));
    let (code, text) = kiln(d.path(), &["build", "p.yaml", "--out", "out", "--format", "netboot"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--format netboot") && text.contains("rpi3"), "{text}");
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

#[test]
fn secrets_creates_the_cluster_secrets_once_and_needs_a_cluster() {
    let d = tempfile::tempdir().unwrap();
    profile(
        d.path(),
        "name: demo\narch: [x86_64]\ncluster:\n  name: lab\n  datastore: external-etcd\n  default_role: none\n  nodes:\n    - {name: e1, mac: \"52:54:00:00:00:01\", roles: [etcd], address: 10.0.0.11/24}\n",
    );
    let (code, out) = kiln(d.path(), &["secrets", "p.yaml"]);
    assert_eq!(code, 0, "{out}");
    let pki = d.path().join("out/demo/secrets/lab-pki");
    assert!(out.contains("out/demo/secrets/lab.token") && out.contains("lab-pki/ca.pem") && out.contains("--cert"), "{out}");
    let ca = std::fs::read(pki.join("ca.pem")).unwrap();
    let key = std::fs::read_to_string(pki.join("e1.server.pem")).unwrap();
    let key_line = key.lines().skip_while(|l| !l.contains("PRIVATE KEY")).nth(1).unwrap();
    assert!(!out.contains(key_line), "a private key was printed");
    // A second run (or a build) keeps them.
    let (code, out) = kiln(d.path(), &["secrets", "p.yaml", "--out", "out/demo"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(std::fs::read(pki.join("ca.pem")).unwrap(), ca);
    assert_eq!(std::fs::read_to_string(pki.join("e1.server.pem")).unwrap(), key);

    profile(d.path(), "name: demo\narch: [x86_64]\n");
    let (code, out) = kiln(d.path(), &["secrets", "p.yaml"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("p.yaml") && out.contains("no `cluster` key"), "{out}");
}

#[test]
fn platforms_lists_each_embedded_platform_on_one_line() {
    let d = tempfile::tempdir().unwrap();
    let (code, text) = kiln(d.path(), &["platforms"]);
    assert_eq!(code, 0, "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("PLATFORM") && lines[0].contains("DESCRIPTION"), "{text}");
    let generic = lines.iter().find(|l| l.starts_with("generic-uefi ")).unwrap_or_else(|| panic!("no generic-uefi line:\n{text}"));
    assert!(
        generic.contains("x86_64,aarch64,riscv64") && generic.contains("uefi/systemd-boot") && generic.contains("Generic UEFI"),
        "{text}"
    );
    // One line per firmware/*.yaml, plus the header.
    let yamls = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../firmware"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "yaml"))
        .count();
    assert_eq!(lines.len(), yamls + 1, "{text}");

    let (code, text) = kiln(d.path(), &["platforms", "--json"]);
    assert_eq!(code, 0, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let generic = v.as_array().unwrap().iter().find(|p| p["name"] == "generic-uefi").unwrap_or_else(|| panic!("{text}"));
    assert_eq!(generic["arch"], serde_json::json!(["x86_64", "aarch64", "riscv64"]), "{text}");
    assert!(generic["description"].as_str().unwrap().starts_with("Generic UEFI"), "{text}");
}
