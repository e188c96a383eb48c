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
fn a_u_boot_spl_board_in_installer_mode_exits_2_before_any_download() {
    let d = tempfile::tempdir().unwrap();
    // The mirror is unreachable: the refusal comes before the package index is read.
    let yaml = "name: t\narch: [riscv64]\nplatform: {riscv64: hifive-unleashed}\ninstall: {mode: installer}\nos:\n  mirror: http://127.0.0.1:9/debian\n";
    profile(d.path(), yaml);
    for args in [&["check", "p.yaml"][..], &["build", "p.yaml", "--out", "out"]] {
        let (code, text) = kiln(d.path(), args);
        assert_eq!(code, 2, "{args:?}: {text}");
        assert!(text.contains("p.yaml:4:") && text.contains("`install.mode`") && text.contains("hifive-unleashed"), "{args:?}: {text}");
    }
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

/// `kiln serve --rollout` refuses what cannot roll out, and `--channel` a channel with no
/// bundle, before it listens (exit 2, naming what to do).
#[test]
fn serve_rollout_and_channels_refuse_without_a_bundle_or_with_bad_flags() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("out")).unwrap();
    for (args, want) in [
        (&["--rollout"][..], "holds no update bundle"),
        (&["--rollout", "--max-unavailable", "0"][..], "--max-unavailable 0"),
        (&["--poll", "10"][..], "add --rollout"),
        (&["--rollout", "--node-timeout", "soon"][..], "--node-timeout soon"),
        (&["--channel", "testing=out"][..], "holds no update bundle"),
        (&["--channel", "testing"][..], "expected NAME=DIR"),
    ] {
        let mut all = vec!["serve", "out", "--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let (code, text) = kiln(d.path(), &all);
        assert_eq!(code, 2, "{args:?}: {text}");
        assert!(text.contains(want) && !text.contains("kiln serve: "), "{args:?}: {text}");
    }
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

/// `--version` names the commit; completions and man pages are generated from the same CLI.
#[test]
fn version_completions_and_man_pages() {
    let d = tempfile::tempdir().unwrap();
    let (code, text) = kiln(d.path(), &["--version"]);
    assert!(code == 0 && text.starts_with("kiln ") && text.contains("(commit "), "{text}");
    let (code, text) = kiln(d.path(), &["completions", "bash"]);
    assert!(code == 0 && text.contains("_kiln()") && text.contains("flash"), "{text}");
    let (code, text) = kiln(d.path(), &["man", "--dir", "man"]);
    assert_eq!(code, 0, "{text}");
    for page in ["kiln.1", "kiln-build.1", "kiln-flash.1", "kiln-serve.1"] {
        let t = std::fs::read_to_string(d.path().join("man").join(page)).unwrap();
        assert!(t.contains(".TH") && t.contains(".SH NAME"), "{page}: {t}");
    }
}

/// Log lines piped to a file carry no colour codes (stderr is not a terminal here).
#[test]
fn piped_logs_have_no_colour_codes() {
    let d = tempfile::tempdir().unwrap();
    profile(d.path(), "name: t\narch: [x86_64]\n");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["-v", "build", "p.yaml", "--offline", "--out", "out"])
        .current_dir(d.path())
        .env("KILN_CACHE_DIR", d.path().join("cache"))
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("INFO") && err.contains("not in the cache") && !err.contains('\x1b'), "{err:?}");
}

#[test]
fn run_names_a_missing_image_first() {
    let d = tempfile::tempdir().unwrap();
    let (code, text) = kiln(d.path(), &["run", "out/x86_64/disk.img"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("no such image: out/x86_64/disk.img") && !text.contains("manifest"), "{text}");
}

/// `kiln serve` resolves a host name in --listen, and warns when DIR has no netboot output.
#[test]
fn serve_takes_host_names_and_warns_without_netboot_output() {
    use std::io::{BufRead, BufReader};
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("out")).unwrap();
    let (code, text) = kiln(d.path(), &["serve", "out", "--listen", "no-such-host.invalid:8080"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--listen no-such-host.invalid:8080"), "{text}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "out", "--listen", "localhost:0"])
        .current_dir(d.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stderr.take().unwrap()).read_line(&mut first).unwrap();
    let mut listening = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut listening).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(first.contains("warning: out holds no netboot output") && first.contains("--format netboot"), "{first}");
    assert!(listening.contains("http://127.0.0.1:") || listening.contains("http://[::1]:"), "{listening}");
}

/// `kiln check` reports every problem of a profile in one run, each located and naming its key,
/// without downloading anything; `--json` gives the same as data; `kiln build` refuses the
/// profile with the same list before any download.
#[test]
fn check_reports_five_problems_at_once() {
    let d = tempfile::tempdir().unwrap();
    profile(
        d.path(),
        "name: t\narch: [x86_64]\noverlays: [site]\nplatform: {x86_64: rpi9}\nvars: {\"a b\": 1}\nfiles:\n  - path: /etc/motd\n    content: \"{{vars.site}}\"\n    template: true\n  - path: etc/x\n    content: x\n",
    );
    let (code, text) = kiln(d.path(), &["check", "p.yaml"]);
    assert_eq!(code, 2, "{text}");
    for want in [
        "5 problems:",
        "p.yaml:3:12: key `overlays[0]`: overlay directory ./site does not exist",
        "p.yaml:4:",
        "key `platform.x86_64`: unknown platform `rpi9`",
        "p.yaml:5:8: key `vars.a b`: variable names are",
        "p.yaml:8:5: key `files[0].content`: template files[0] (/etc/motd): line 1, column 1: `vars.site` is not defined",
        "p.yaml:10:5: key `files[1].path`: `etc/x` must be an absolute path",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    assert!(!text.contains("error: error") && !text.contains("<input>"), "{text}");
    let (code, json) = kiln(d.path(), &["check", "--json", "p.yaml"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(code == 2 && v[0]["ok"] == false && v[0]["problems"].as_array().unwrap().len() == 5, "{json}");
    let (code, text) = kiln(d.path(), &["build", "p.yaml", "--out", "out"]);
    assert!(code == 2 && text.contains("5 problems:") && !text.contains("reading http"), "{text}");
    assert_no_image(d.path());
    // Structural problems are all found too (serde alone stops at the first).
    profile(
        d.path(),
        "name: t\narch: [x86_64, sparc]\nos:\n  packges: [curl]\nssh:\n  port: x\nusers:\n  - name: a\n    shel: /bin/sh\nkernl: {}\n",
    );
    let (code, text) = kiln(d.path(), &["check", "p.yaml"]);
    assert!(code == 2 && text.contains("5 problems:") && text.contains("did you mean `kernel`?"), "{text}");
    // A profile from a newer kiln says so.
    profile(d.path(), "kiln: 7\nname: t\narch: [x86_64]\nnew_thing: {}\n");
    let (code, text) = kiln(d.path(), &["check", "p.yaml"]);
    assert!(code == 2 && text.contains("profile format 7") && !text.contains("new_thing"), "{text}");
}

/// A `cluster.token_file` that is not there yet (the operator copies it from an existing cluster)
/// is a warning from `kiln check`, not a failure, and says where the token comes from.
#[test]
fn check_warns_about_a_missing_token_file() {
    let d = tempfile::tempdir().unwrap();
    profile(
        d.path(),
        "name: t\narch: [x86_64]\ncluster:\n  name: edge\n  api_address: 10.0.0.10\n  default_role: agent\n  token_file: edge.token\n  k3s: {version: v1.33.5+k3s1}\n",
    );
    let (code, text) = kiln(d.path(), &["check", "p.yaml"]);
    assert!(
        code == 0
            && text.contains("p.yaml: ok")
            && text.contains("warning: key `cluster.token_file`")
            && text.contains("edge.token does not exist yet"),
        "{text}"
    );
    let (code, json) = kiln(d.path(), &["check", "--json", "p.yaml"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(code == 0 && v[0]["warnings"].as_array().unwrap().len() == 1, "{json}");
    std::fs::write(d.path().join("edge.token"), "K10x\n").unwrap();
    let (code, text) = kiln(d.path(), &["check", "p.yaml"]);
    assert!(code == 0 && !text.contains("warning"), "{text}");
}

#[test]
fn check_passes_every_example_profile() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut args = vec!["check".to_string()];
    for dir in ["profiles", "qemu-tests/profiles"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml") {
                args.push(p.display().to_string());
            }
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, text) = kiln(&root, &args);
    assert_eq!(code, 0, "{text}");
    assert_eq!(text.matches(": ok").count(), args.len() - 1, "{text}");
}

/// `--json` on build and fetch: a failure is a JSON object on stdout too (the message still
/// goes to stderr and sets the exit status).
#[test]
fn build_and_fetch_json_report_failures_as_json() {
    let d = tempfile::tempdir().unwrap();
    profile(d.path(), "name: t\narch: [x86_64]\n");
    for args in [
        &["build", "p.yaml", "--offline", "--json", "--out", "out"][..],
        &["fetch", "p.yaml", "--json", "--mirror", "http://127.0.0.1:9/debian"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .current_dir(d.path())
            .env("KILN_CACHE_DIR", d.path().join("cache"))
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {:?}", out.stdout));
        assert!(v["ok"] == false && v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        // The unreachable mirror is retried with a warning each time: the summary lists them.
        let warned = v["warnings"].as_array().is_some_and(|w| w.iter().any(|m| m.as_str().is_some_and(|m| m.contains("retrying"))));
        assert_eq!(warned, args[0] == "fetch", "{v}");
        assert_ne!(out.status.code(), Some(0));
        assert!(String::from_utf8_lossy(&out.stderr).contains("error:"));
    }
    assert_no_image(d.path());
}

#[test]
fn format_update_is_refused_before_any_download_without_update_or_a_signing_key() {
    let d = tempfile::tempdir().unwrap();
    // The mirror is never contacted: an unreachable address proves the refusal comes first.
    let base = "name: t\narch: [x86_64]\nos:\n  mirror: http://127.0.0.1:9/debian\n";
    profile(d.path(), base);
    let (code, text) = kiln(d.path(), &["build", "p.yaml", "--out", "out", "--format", "update", "--signing-key", "none.key"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--format update") && text.contains("no `update:` section"), "{text}");

    let (code, text) = kiln(d.path(), &["keygen", "--out", "keys", "--name", "site"]);
    assert_eq!(code, 0, "{text}");
    let public = std::fs::read_to_string(d.path().join("keys/site.pub")).unwrap();
    let line = public.lines().nth(1).unwrap();
    assert!(text.contains(line) && text.contains("update.trusted_keys"), "keygen prints the public key line: {text}");
    let secret = std::fs::read_to_string(d.path().join("keys/site.key")).unwrap();
    let secret_line = secret.lines().nth(1).unwrap();
    assert!(!text.contains(secret_line), "keygen printed the secret key: {text}");
    let (code, text) = kiln(d.path(), &["keygen", "--out", "keys", "--name", "site"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("site.key exists"), "{text}");

    profile(d.path(), &format!("{base}update:\n  version: 1.0.0\n  trusted_keys: [keys/site.pub]\n"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["build", "p.yaml", "--out", "out", "--format", "disk,update"])
        .current_dir(d.path())
        .env("KILN_CACHE_DIR", d.path().join("cache"))
        .env_remove("KILN_SIGNING_KEY")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("needs a signing key") && text.contains("--signing-key") && text.contains("KILN_SIGNING_KEY"), "{text}");

    std::fs::write(d.path().join("bad.key"), "untrusted comment: x\nnot base64\n").unwrap();
    let (code, text) = kiln(d.path(), &["build", "p.yaml", "--out", "out", "--format", "update", "--signing-key", "bad.key"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("signing key bad.key"), "{text}");
    let (code, text) = kiln(d.path(), &["build", "p.yaml", "--out", "out", "--allow-downgrade"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--allow-downgrade") && text.contains("--format update"), "{text}");

    // With a good key the build gets as far as the (unreachable) mirror: the key was accepted.
    let (code, text) =
        kiln(d.path(), &["build", "p.yaml", "--out", "out", "--format", "update", "--signing-key", "keys/site.key", "--offline"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("InRelease"), "{text}");
    assert!(!text.contains(secret_line), "the secret key appears in the output: {text}");
    assert_no_image(d.path());
}

/// `kiln cache-gc` removes intermediate results beyond its bound and never a download.
#[test]
fn cache_gc_bounds_reused_results_and_keeps_downloads() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    std::fs::create_dir_all(cache.join("reuse/kmod-v1/ab")).unwrap();
    std::fs::write(cache.join("reuse/kmod-v1/ab/abcd"), vec![0u8; 4096]).unwrap();
    std::fs::create_dir_all(cache.join("blobs/sha256")).unwrap();
    std::fs::write(cache.join("blobs/sha256/00ff"), b"download").unwrap();
    let c = cache.to_str().unwrap();
    let (code, text) = kiln(d.path(), &["cache-gc", "--max-size", "1KiB", "--cache-dir", c]);
    assert!(code == 0 && text.contains("removed 1"), "{text}");
    assert!(!cache.join("reuse/kmod-v1/ab/abcd").exists() && cache.join("blobs/sha256/00ff").exists());
    let (code, text) = kiln(d.path(), &["cache-gc", "--max-size", "lots", "--cache-dir", c]);
    assert!(code == 2 && text.contains("lots"), "{code}: {text}");
}
