//! Registry credentials from Docker credential helpers (`credHelpers`, `credsStore`): a real
//! helper program on PATH, run the way Docker runs it (`docker-credential-<name> get`, the
//! server on stdin, JSON on stdout). One test in its own binary: it changes PATH.

use std::os::unix::fs::PermissionsExt;

#[test]
fn credential_helpers_are_run_for_their_hosts() {
    let d = tempfile::tempdir().unwrap();
    let bin = d.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    // A helper that knows two servers and says "not found" (exit 1) for the rest, as
    // docker-credential-pass / -secretservice do.
    let helper = bin.join("docker-credential-kilntest");
    std::fs::write(
        &helper,
        "#!/bin/sh\n[ \"$1\" = get ] || exit 2\nread -r server\ncase \"$server\" in\n  registry.lan:5000) echo '{\"ServerURL\":\"registry.lan:5000\",\"Username\":\"carol\",\"Secret\":\"tok3n\"}' ;;\n  https://index.docker.io/v1/) echo '{\"Username\":\"dave\",\"Secret\":\"hub-pat\"}' ;;\n  *) echo 'credentials not found in native keychain'; exit 1 ;;\nesac\n",
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    std::env::set_var("PATH", path);

    use kiln::oci::auth::lookup;
    // credHelpers for one host; credsStore for every other host.
    let per_host = r#"{"credHelpers": {"registry.lan:5000": "kilntest"}}"#;
    let c = lookup(per_host, "registry.lan:5000", "config.json").unwrap().expect("the helper's credentials");
    assert_eq!((c.username.as_str(), c.password.as_str()), ("carol", "tok3n"));
    assert!(lookup(per_host, "other.lan", "config.json").unwrap().is_none(), "no helper for that host: anonymous");
    let store = r#"{"credsStore": "kilntest", "auths": {"inline.lan": {"auth": "ZXZlOnB3"}}}"#;
    let c = lookup(store, "docker.io", "config.json").unwrap().expect("Docker Hub through the store");
    assert_eq!((c.username.as_str(), c.password.as_str()), ("dave", "hub-pat"));
    let c = lookup(store, "inline.lan", "config.json").unwrap().unwrap();
    assert_eq!(c.username, "eve", "an inline entry wins over the store, as in Docker");
    assert!(lookup(store, "unknown.lan", "config.json").unwrap().is_none(), "the store has nothing: anonymous");
    // A helper that is not installed: anonymous (a warning is logged), not a failed build.
    assert!(lookup(r#"{"credsStore": "not-installed"}"#, "r.lan", "config.json").unwrap().is_none());
}
