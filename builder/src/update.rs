//! Signed A/B updates, the build side (docs/updates.md): `kiln keygen` (a minisign key pair),
//! what the profile's `update:` bakes into the root (`/usr/lib/kiln/update/`), and the bundle
//! `OUT/<arch>/update/` (`update.txt`, its minisign signature, the root squashfs, kernel and
//! initrd) that `kiln-update` on the device verifies before it writes anything.
//!
//! Why minisign: a small, audited ed25519 format with a real CLI on the host and in Debian for
//! the device (`minisign -V`), and a maintained crate by the format's author.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::error::UsageError;
use crate::manifest::Output;
use crate::profile::update::Update;
use crate::tree::{Content, Tree};

/// Where the root holds the update settings the device reads.
pub const ROOT_DIR: &str = "usr/lib/kiln/update";
/// The bundle's directory under `OUT/<arch>/`.
pub const DIR: &str = "update";
/// The bundle's manifest and its signature.
pub const MANIFEST: &str = "update.txt";
pub const SIGNATURE: &str = "update.txt.minisig";
/// The bundle's payload files, as `update.txt` names them.
pub const ROOT_FILE: &str = "root.squashfs";
pub const KERNEL_FILE: &str = "vmlinuz";
pub const INITRD_FILE: &str = "initrd";
/// Every file of a bundle, in the order `update.txt` and the manifest list them.
pub const FILES: [&str; 5] = [MANIFEST, SIGNATURE, ROOT_FILE, KERNEL_FILE, INITRD_FILE];
/// The environment variable naming the signing key file when `--signing-key` is not given.
pub const SIGNING_KEY_ENV: &str = "KILN_SIGNING_KEY";
/// The bundle format `update.txt`'s first line names; the device refuses a higher one.
pub const FORMAT_VERSION: u32 = 1;

/// The Debian packages the appliance needs for updates: the verifier.
pub fn packages(p: &crate::profile::Profile) -> Vec<&'static str> {
    if p.update.is_some() {
        vec!["minisign"]
    } else {
        Vec::new()
    }
}

/// What `kiln keygen` wrote.
#[derive(Debug)]
pub struct KeyFiles {
    /// `NAME.key`: the secret key, mode 0600.
    pub secret: PathBuf,
    /// `NAME.pub`: the public key file.
    pub public: PathBuf,
    /// The public key's base64 line, for `update.trusted_keys`.
    pub public_line: String,
}

/// `kiln keygen`: a new unencrypted minisign key pair as `DIR/NAME.key` (0600) and
/// `DIR/NAME.pub` (0644). Refuses to replace either file. The secret is never printed.
pub fn keygen(dir: &Path, name: &str) -> Result<KeyFiles> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(UsageError(format!("--name `{name}`: give a plain file name such as `kiln-update`")).into());
    }
    let (secret, public) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.pub")));
    for p in [&secret, &public] {
        if p.exists() {
            return Err(
                UsageError(format!("{} exists: kiln keygen never replaces a key (choose another --name or --out)", p.display())).into()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let pair = minisign::KeyPair::generate_unencrypted_keypair().map_err(|e| anyhow::anyhow!("generating a key pair: {e}"))?;
    let keynum = pair.pk.keynum().iter().rev().map(|b| format!("{b:02X}")).collect::<String>();
    let secret_box =
        pair.sk.to_box(Some(&format!("kiln update signing key {keynum} (unencrypted)"))).map_err(|e| anyhow::anyhow!("{e}"))?;
    let public_line = pair.pk.to_base64();
    let public_text = format!("untrusted comment: minisign public key {keynum}\n{public_line}\n");
    // The secret is created 0600 from the start (create_new: never through a readable file).
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&secret)
        .with_context(|| format!("creating {}", secret.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(&secret_box.to_bytes()).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", secret.display()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&public)
        .with_context(|| format!("creating {}", public.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    f.write_all(public_text.as_bytes()).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", public.display()))?;
    Ok(KeyFiles { secret, public, public_line })
}

/// A loaded signing key (never logged: no `Debug`).
pub struct SigningKey {
    sk: minisign::SecretKey,
    pk: minisign::PublicKey,
    pub path: PathBuf,
}

impl SigningKey {
    /// Reads an unencrypted minisign secret key file (`kiln keygen`'s `NAME.key`, or
    /// `minisign -G -W`'s). Errors name the file, never its contents.
    pub fn load(path: &Path) -> Result<SigningKey> {
        let text = std::fs::read_to_string(path).map_err(|e| UsageError(format!("signing key {}: {e}", path.display())))?;
        let bad = |why: String| UsageError(format!("signing key {}: {why}", path.display()));
        let sk_box = minisign::SecretKeyBox::from_string(&text).map_err(|_| bad("not a minisign secret key file".into()))?;
        let sk = sk_box.into_unencrypted_secret_key().map_err(|e| {
            bad(format!("cannot read it as an unencrypted minisign secret key ({e}); kiln signs without a password: use `kiln keygen`"))
        })?;
        let pk = minisign::PublicKey::from_secret_key(&sk).map_err(|e| bad(format!("{e}")))?;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    "signing key {} is readable by others (mode {:04o}): chmod 600 it",
                    path.display(),
                    m.permissions().mode() & 0o7777
                );
            }
        }
        Ok(SigningKey { sk, pk, path: path.to_path_buf() })
    }

    /// The key's public half, as `update.trusted_keys` takes it.
    pub fn public_base64(&self) -> String {
        self.pk.to_base64()
    }

    /// The standard `.minisig` text of `data` (prehashed ed25519), with `trusted_comment`.
    pub fn sign(&self, data: &[u8], trusted_comment: &str) -> Result<String> {
        let sig = minisign::sign(
            Some(&self.pk),
            &self.sk,
            std::io::Cursor::new(data),
            Some(trusted_comment),
            Some("signature from a kiln update signing key"),
        )
        .map_err(|e| anyhow::anyhow!("signing with {}: {e}", self.path.display()))?;
        Ok(sig.into_string())
    }
}

/// The inittab entry of `kiln-update follow` (docs/updates.md, "Rollout"), under the appliance's
/// supervise wrapper (exit status and log lines on the console, restarts back off).
pub const AGENT_ENTRY: &str = "::respawn:/usr/lib/kiln/supervise --console rollout /usr/sbin/kiln-update follow";

/// The inittab entry of `kiln-update media` (docs/updates.md, "From a USB stick"): the watcher
/// that applies a KILN-UPDATE medium plugged in while the node runs. Its lines go to the console,
/// like the boot step's for a medium present at boot.
pub const MEDIA_ENTRY: &str = "::respawn:/usr/lib/kiln/supervise --console update-media /usr/sbin/kiln-update media";

/// Bakes the profile's `update:` into the root: `version`, `platform` (the image's: a bundle
/// built for another is refused), `health_timeout` (seconds) and `keys/N.pub` (+
/// `keys/N.downgrade` for a key that may sign downgrades), and the KILN-UPDATE watcher's inittab
/// entry. Without `update:` nothing is written, no watcher runs, and `kiln-update` refuses every
/// bundle.
pub fn render(update: Option<&Update>, platform: &str, base_dir: &Path, root: &mut Tree) -> Result<()> {
    let Some(u) = update else { return Ok(()) };
    root.add_file(&format!("{ROOT_DIR}/version"), 0o644, format!("{}\n", u.version))?;
    root.add_file(&format!("{ROOT_DIR}/platform"), 0o644, format!("{platform}\n"))?;
    root.add_file(&format!("{ROOT_DIR}/health_timeout"), 0o644, format!("{}\n", u.health_timeout_secs()))?;
    crate::inittab::append(
        root,
        "KILN-UPDATE watcher (profile section `update:`): applies an update medium plugged in while the node runs; supervised",
        MEDIA_ENTRY,
    )?;
    if let Some(server) = u.server_base() {
        root.add_file(&format!("{ROOT_DIR}/server"), 0o644, format!("{server}\n"))?;
        // The rollout agent runs only in images that name a server (the node keys exist only
        // then); `kiln.update_server=` on the command line just points it elsewhere. Its lines
        // go to the console too: the rollout's progress is what an operator watches there.
        crate::inittab::append(
            root,
            "rollout agent (profile key `update.server`): reports to kiln serve --rollout, applies its update; supervised",
            AGENT_ENTRY,
        )?;
    }
    root.add_dir(&format!("{ROOT_DIR}/keys"), 0o755)?;
    for (i, k) in u.trusted_keys.iter().enumerate() {
        let pk = k.load(base_dir).with_context(|| format!("key `update.trusted_keys[{i}]`"))?;
        let keynum = pk.keynum().iter().rev().map(|b| format!("{b:02X}")).collect::<String>();
        root.add_file(
            &format!("{ROOT_DIR}/keys/{i}.pub"),
            0o644,
            format!("untrusted comment: minisign public key {keynum}\n{}\n", pk.to_base64()),
        )?;
        if k.allow_downgrade() {
            root.add_file(&format!("{ROOT_DIR}/keys/{i}.downgrade"), 0o644, String::new())?;
        }
    }
    Ok(())
}

/// One payload file of a bundle.
pub struct Payload<'a> {
    /// `root`, `kernel` or `initrd`: the key `update.txt` names it by.
    pub role: &'static str,
    pub file: &'static str,
    pub source: Source<'a>,
}

/// Where a payload's bytes come from.
pub enum Source<'a> {
    /// A staged file with its digest taken when it was written (the root squashfs).
    File {
        path: &'a Path,
        len: u64,
        sha256: &'a str,
    },
    Content(&'a Content),
}

/// What `update.txt` says besides its files.
pub struct BundleInfo<'a> {
    pub profile: &'a str,
    pub arch: &'a str,
    /// The platform (`firmware/<name>.yaml`) the bundle's kernel, initrd and command line are
    /// for: a device whose image is another platform's refuses the bundle.
    pub platform: &'a str,
    pub update: &'a Update,
    /// The build id's first 8 bytes, in hex.
    pub build: &'a str,
    pub downgrade: bool,
    /// The kernel command line without `root=` and `kiln.rootname=` (the device adds them).
    pub options: &'a str,
    /// The secrets the bundle's root leaves out (it is served to any machine): each node keeps
    /// its own copy of these paths (`keep` lines; `kiln-update apply`).
    pub keep: &'a [String],
    /// The inventory as `(name, roles)` (roles comma-separated, `none` for none): which nodes
    /// `kiln serve --rollout` hands the update to (`node` lines).
    pub nodes: &'a [(String, String)],
}

/// The installed command line without the parameters that name this build's slot A: the device
/// adds `root=PARTUUID=<its target slot>` and `kiln.rootname=<its slot name>`.
pub fn options_without_root(cmdline: &str) -> String {
    cmdline.split_whitespace().filter(|w| !w.starts_with("root=") && !w.starts_with("kiln.rootname=")).collect::<Vec<_>>().join(" ")
}

/// The text of `update.txt`: line based, one space between fields, `options` to the end of
/// its line (busybox `read` takes it apart on the device).
pub fn manifest_text(info: &BundleInfo, files: &[(&str, &str, u64, String)]) -> String {
    let mut t = format!(
        "kiln-update {FORMAT_VERSION}\nprofile {}\narch {}\nplatform {}\nversion {}\nbuild {}\n",
        info.profile, info.arch, info.platform, info.update.version, info.build
    );
    if let Some(m) = &info.update.min_version {
        t.push_str(&format!("min_version {m}\n"));
    }
    t.push_str(&format!("downgrade {}\n", if info.downgrade { "yes" } else { "no" }));
    for (role, file, size, sha) in files {
        t.push_str(&format!("file {role} {file} {size} {sha}\n"));
    }
    t.push_str(&format!("options {}\n", info.options));
    for path in info.keep {
        t.push_str(&format!("keep {path}\n"));
    }
    for (name, roles) in info.nodes {
        t.push_str(&format!("node {name} {roles}\n"));
    }
    t
}

/// Writes the bundle into `dir` (created): the payload files (mode `mode`), `update.txt` and
/// its signature. Returns the files' records, named `update/<file>`, manifest first.
pub fn write_bundle(dir: &Path, info: &BundleInfo, payloads: &[Payload], key: &SigningKey, mode: u32) -> Result<Vec<Output>> {
    if info.options.contains('\n') || info.options.split_whitespace().any(|w| w.starts_with("root=")) {
        bail!("the bundle's kernel options must be one line without root=");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = Vec::new();
    for p in payloads {
        let to = dir.join(p.file);
        let (size, sha256) = match &p.source {
            Source::File { path, len, sha256 } => {
                // A hard link when the staged file is on the same filesystem: no second copy.
                let _ = std::fs::remove_file(&to);
                if std::fs::hard_link(path, &to).is_err() {
                    std::fs::copy(path, &to).with_context(|| format!("copying {} to {}", path.display(), to.display()))?;
                }
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))?;
                (*len, sha256.to_string())
            }
            Source::Content(c) => {
                let bytes = c.read()?;
                crate::output::write_file(&to, &bytes, mode)?;
                (bytes.len() as u64, crate::digest::sha256_hex(&bytes))
            }
        };
        files.push((p.role, p.file, size, sha256));
    }
    let text = manifest_text(info, &files);
    let comment = format!("kiln-update profile:{} arch:{} version:{} build:{}", info.profile, info.arch, info.update.version, info.build);
    let sig = key.sign(text.as_bytes(), &comment)?;
    // The manifest and signature name nothing secret: readable like a public key.
    crate::output::write_file(&dir.join(MANIFEST), text.as_bytes(), 0o644)?;
    crate::output::write_file(&dir.join(SIGNATURE), sig.as_bytes(), 0o644)?;
    let mut outputs = vec![
        Output { file: format!("{DIR}/{MANIFEST}"), sha256: crate::digest::sha256_hex(text.as_bytes()), size: text.len() as u64 },
        Output { file: format!("{DIR}/{SIGNATURE}"), sha256: crate::digest::sha256_hex(sig.as_bytes()), size: sig.len() as u64 },
    ];
    outputs.extend(files.into_iter().map(|(_, file, size, sha256)| Output { file: format!("{DIR}/{file}"), sha256, size }));
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn update(min: Option<&str>) -> Update {
        Update {
            version: "1.2.0".into(),
            trusted_keys: Vec::new(),
            min_version: min.map(String::from),
            health_timeout: "5m".into(),
            server: None,
        }
    }

    /// Debian's `minisign` verifies: the device runs the same command.
    fn minisign_verifies(pub_file: &Path, dir: &Path) -> bool {
        let out = Command::new("minisign")
            .args(["-V", "-q", "-p"])
            .arg(pub_file)
            .arg("-m")
            .arg(dir.join(MANIFEST))
            .arg("-x")
            .arg(dir.join(SIGNATURE))
            .output()
            .expect("minisign (Debian package `minisign`) on the host: .ci/install-host-deps installs it");
        out.status.success()
    }

    #[test]
    fn keygen_writes_a_pair_that_minisign_accepts_and_never_replaces_it() {
        let d = tempfile::tempdir().unwrap();
        let k = keygen(d.path(), "site").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&k.secret), 0o600);
        assert_eq!(mode(&k.public), 0o644);
        assert_eq!(k.public_line.len(), 56);
        let public_text = std::fs::read_to_string(&k.public).unwrap();
        assert!(public_text.starts_with("untrusted comment: minisign public key ") && public_text.contains(&k.public_line));
        let secret_text = std::fs::read_to_string(&k.secret).unwrap();
        assert!(!secret_text.contains(&k.public_line), "the secret file is not the public key");
        // Refuses to overwrite either file, leaving both as they were.
        let err = format!("{:#}", keygen(d.path(), "site").unwrap_err());
        assert!(err.contains("site.key exists"), "{err}");
        assert_eq!(std::fs::read_to_string(&k.secret).unwrap(), secret_text);
        std::fs::remove_file(&k.secret).unwrap();
        let err = format!("{:#}", keygen(d.path(), "site").unwrap_err());
        assert!(err.contains("site.pub exists"), "{err}");
        assert!(keygen(d.path(), "../x").is_err());

        // The .pub verifies what the .key signed, with Debian's minisign; another key does not.
        let k2 = keygen(d.path(), "other").unwrap();
        let key = SigningKey::load(&k2.secret).unwrap();
        assert_eq!(key.public_base64(), k2.public_line);
        let bundle = d.path().join("b");
        std::fs::create_dir(&bundle).unwrap();
        std::fs::write(bundle.join(MANIFEST), "hello\n").unwrap();
        std::fs::write(bundle.join(SIGNATURE), key.sign(b"hello\n", "t").unwrap()).unwrap();
        assert!(minisign_verifies(&k2.public, &bundle));
        let k3 = keygen(d.path(), "third").unwrap();
        assert!(!minisign_verifies(&k3.public, &bundle), "a signature verifies only under its own key");
    }

    #[test]
    fn a_signing_key_that_is_not_one_is_refused_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k.key");
        std::fs::write(&p, "not a key\n").unwrap();
        let err = format!("{:#}", SigningKey::load(&p).err().unwrap());
        assert!(err.contains("k.key") && err.contains("not"), "{err}");
        let missing = format!("{:#}", SigningKey::load(&d.path().join("none.key")).err().unwrap());
        assert!(missing.contains("none.key"), "{missing}");
    }

    #[test]
    fn options_drop_only_the_slot_parameters() {
        assert_eq!(
            options_without_root("root=PARTUUID=abc kiln.rootname=kiln-root-a console=ttyS0,115200 panic=10 quiet"),
            "console=ttyS0,115200 panic=10 quiet"
        );
    }

    /// A bundle from its inputs: exactly the contract's lines, digests matching its files, a
    /// signature Debian's `minisign` verifies, and one flipped byte that it refuses.
    #[test]
    fn a_bundle_has_the_contract_lines_and_a_signature_minisign_verifies() {
        let d = tempfile::tempdir().unwrap();
        let k = keygen(d.path(), "k").unwrap();
        let key = SigningKey::load(&k.secret).unwrap();
        let staged = d.path().join("root.squashfs.staged");
        std::fs::write(&staged, b"squashfs bytes").unwrap();
        let staged_sha = crate::digest::sha256_hex(b"squashfs bytes");
        let (kernel, initrd) = (Content::bytes("kernel image"), Content::bytes("initramfs"));
        let u = update(Some("1.0.0"));
        let info = BundleInfo {
            profile: "quickstart",
            arch: "x86_64",
            platform: "generic-uefi",
            update: &u,
            build: "733b8170e171e2a4",
            downgrade: false,
            options: "console=ttyS0,115200 panic=10",
            keep: &["etc/kiln/nodes/e1/update/report.key".into()],
            nodes: &[("e1".into(), "etcd".into()), ("a1".into(), "agent".into())],
        };
        let payloads = [
            Payload { role: "root", file: ROOT_FILE, source: Source::File { path: &staged, len: 14, sha256: &staged_sha } },
            Payload { role: "kernel", file: KERNEL_FILE, source: Source::Content(&kernel) },
            Payload { role: "initrd", file: INITRD_FILE, source: Source::Content(&initrd) },
        ];
        let dir = d.path().join("update");
        let outputs = write_bundle(&dir, &info, &payloads, &key, 0o644).unwrap();
        let names: Vec<&str> = outputs.iter().map(|o| o.file.as_str()).collect();
        assert_eq!(names, FILES.map(|f| format!("update/{f}")));

        let text = std::fs::read_to_string(dir.join(MANIFEST)).unwrap();
        let sha = |b: &[u8]| crate::digest::sha256_hex(b);
        let want = format!(
            "kiln-update 1\nprofile quickstart\narch x86_64\nplatform generic-uefi\nversion 1.2.0\nbuild 733b8170e171e2a4\nmin_version 1.0.0\ndowngrade no\n\
             file root root.squashfs 14 {}\nfile kernel vmlinuz 12 {}\nfile initrd initrd 9 {}\noptions console=ttyS0,115200 panic=10\n\
             keep etc/kiln/nodes/e1/update/report.key\nnode e1 etcd\nnode a1 agent\n",
            sha(b"squashfs bytes"),
            sha(b"kernel image"),
            sha(b"initramfs")
        );
        assert_eq!(text, want);
        // Every `file` line's size and digest is its file's.
        for line in text.lines().filter(|l| l.starts_with("file ")) {
            let f: Vec<&str> = line.split(' ').collect();
            let bytes = std::fs::read(dir.join(f[2])).unwrap();
            assert_eq!((bytes.len().to_string().as_str(), sha(&bytes).as_str()), (f[3], f[4]), "{line}");
        }
        for o in &outputs {
            assert_eq!(crate::digest::sha256_file(&d.path().join(&o.file)).unwrap(), o.sha256, "{}", o.file);
        }
        let sig = std::fs::read_to_string(dir.join(SIGNATURE)).unwrap();
        assert!(sig.contains("trusted comment: kiln-update profile:quickstart arch:x86_64 version:1.2.0"), "{sig}");

        assert!(minisign_verifies(&k.public, &dir), "Debian's minisign refuses the bundle");
        let mut flipped = text.into_bytes();
        flipped[20] ^= 1;
        std::fs::write(dir.join(MANIFEST), &flipped).unwrap();
        assert!(!minisign_verifies(&k.public, &dir), "a flipped byte in update.txt verifies");
    }

    #[test]
    fn without_min_version_the_line_is_absent_and_downgrade_says_yes_when_asked() {
        let u = update(None);
        let info = BundleInfo {
            profile: "p",
            arch: "riscv64",
            platform: "generic-uefi",
            update: &u,
            build: "00",
            downgrade: true,
            options: "quiet",
            keep: &[],
            nodes: &[],
        };
        let t = manifest_text(&info, &[]);
        assert!(!t.contains("min_version") && t.contains("\ndowngrade yes\n"), "{t}");
    }

    #[test]
    fn the_root_gets_version_timeout_and_numbered_keys() {
        let d = tempfile::tempdir().unwrap();
        let a = keygen(d.path(), "a").unwrap();
        let b = keygen(d.path(), "b").unwrap();
        let p = crate::profile::test_profile(&format!(
            "update:\n  version: 2.0.1\n  health_timeout: 90s\n  trusted_keys:\n    - {}\n    - {{key: b.pub, allow_downgrade: true}}\n",
            a.public_line
        ));
        let mut root = Tree::new();
        root.add_file("etc/inittab", 0o644, "::sysinit:/usr/lib/kiln/boot\n").unwrap();
        render(p.update.as_ref(), "rpi4", d.path(), &mut root).unwrap();
        let read = |path: &str| match root.get_str(path).map(|e| &e.kind) {
            Some(crate::tree::Kind::File(c)) => String::from_utf8(c.read().unwrap().to_vec()).unwrap(),
            _ => panic!("{path} missing"),
        };
        assert_eq!(read("usr/lib/kiln/update/version"), "2.0.1\n");
        assert_eq!(read("usr/lib/kiln/update/platform"), "rpi4\n");
        assert_eq!(read("usr/lib/kiln/update/health_timeout"), "90\n");
        assert!(read("usr/lib/kiln/update/keys/0.pub").ends_with(&format!("\n{}\n", a.public_line)));
        assert!(read("usr/lib/kiln/update/keys/1.pub").ends_with(&format!("\n{}\n", b.public_line)));
        assert!(root.get_str("usr/lib/kiln/update/keys/0.downgrade").is_none());
        assert!(root.get_str("usr/lib/kiln/update/keys/1.downgrade").is_some());

        assert!(read("etc/inittab").ends_with(&format!("\n{MEDIA_ENTRY}\n")), "{}", read("etc/inittab"));

        let mut none = Tree::new();
        none.add_file("etc/inittab", 0o644, "::sysinit:/usr/lib/kiln/boot\n").unwrap();
        render(None, "rpi4", d.path(), &mut none).unwrap();
        assert!(none.get_str("usr/lib/kiln/update").is_none(), "no update: section, no update settings");
        // Images that refuse all updates watch for no media.
        assert!(
            matches!(none.get_str("etc/inittab").map(|e| &e.kind), Some(crate::tree::Kind::File(c)) if c.read().unwrap().as_ref() == b"::sysinit:/usr/lib/kiln/boot\n")
        );
    }

    /// `update.server`: the server file and the agent's inittab entry; without it, neither.
    #[test]
    fn a_rollout_server_starts_the_agent_from_inittab() {
        let d = tempfile::tempdir().unwrap();
        let inittab = |server: &str| {
            let p = crate::profile::test_profile(&format!("update:\n  version: 1.0.0\n{server}"));
            let mut root = Tree::new();
            root.add_file("etc/inittab", 0o644, "::sysinit:/usr/lib/kiln/boot\n").unwrap();
            render(p.update.as_ref(), "generic-uefi", d.path(), &mut root).unwrap();
            let text = |path: &str| match root.get_str(path).map(|e| &e.kind) {
                Some(crate::tree::Kind::File(c)) => Some(String::from_utf8(c.read().unwrap().to_vec()).unwrap()),
                _ => None,
            };
            (text("etc/inittab").unwrap(), text("usr/lib/kiln/update/server"))
        };
        let (with, server) = inittab("  server: http://10.0.0.1:8080/\n");
        assert_eq!(server.as_deref(), Some("http://10.0.0.1:8080\n"));
        assert!(with.ends_with(&format!("\n{AGENT_ENTRY}\n")) && with.starts_with("::sysinit:"), "{with}");
        let (without, server) = inittab("");
        assert!(!without.contains(AGENT_ENTRY) && server.is_none(), "{without}");
        // The KILN-UPDATE watcher runs in every image with update:, server or not.
        assert!(with.contains(MEDIA_ENTRY) && without.ends_with(&format!("\n{MEDIA_ENTRY}\n")), "{without}");
    }
}
