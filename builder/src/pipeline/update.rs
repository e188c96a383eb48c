//! The update stage (`--format update`): refused before any download without the profile's
//! `update:` or a signing key; after the disk stage, the bundle `OUT/<arch>/update/` from the
//! very root squashfs, kernel and initrd the disk image holds (`crate::update` writes it).

use anyhow::Result;
use tracing::info;

use super::{Format, Job};
use crate::error::UsageError;
use crate::manifest::Output;
use crate::output::Part;
use crate::profile::LoadedProfile;
use crate::tree::Content;
use crate::update::{BundleInfo, Payload, SigningKey, Source};

use super::options::BuildOptions;

/// Before anything is fetched: the signing key for `--format update` (loaded, so a bad file
/// fails now), or a refusal naming what is missing. `None` when no bundle is asked for.
pub(super) fn preflight(profile: &LoadedProfile, opts: &BuildOptions) -> Result<Option<SigningKey>> {
    if !opts.wants(Format::Update) {
        if opts.allow_downgrade {
            return Err(UsageError("--allow-downgrade marks an update bundle: it needs --format update".into()).into());
        }
        return Ok(None);
    }
    if profile.profile.update.is_none() {
        return Err(UsageError(format!(
            "--format update: the profile {} has no `update:` section (update.version and update.trusted_keys; see docs/updates.md)",
            profile.path.display()
        ))
        .into());
    }
    let Some(path) = opts.signing_key.as_deref() else {
        return Err(UsageError(format!(
            "--format update needs a signing key: --signing-key FILE or {}=FILE (create one with `kiln keygen`)",
            crate::update::SIGNING_KEY_ENV
        ))
        .into());
    };
    let key = SigningKey::load(path)?;
    let trusted: Vec<String> = profile
        .profile
        .update
        .iter()
        .flat_map(|u| &u.trusted_keys)
        .filter_map(|k| k.load(&profile.base_dir()).ok())
        .map(|k| k.to_base64())
        .collect();
    if !trusted.contains(&key.public_base64()) {
        // Devices trust the keys of the build they run, so this can be right (a rotation), but
        // it is worth saying: a bundle nobody trusts is refused everywhere.
        tracing::warn!(
            "the signing key {} is not in this profile's update.trusted_keys: only devices whose installed build trusts it accept the bundle",
            path.display()
        );
    }
    Ok(Some(key))
}

/// The bundle of this build: the public root squashfs (and the `keep` lines for the secrets it
/// leaves out), the kernel and the initrd, and
/// `update.txt` signed by `key`. Returns the files' records.
pub(super) fn write(
    job: &Job,
    key: &SigningKey,
    public: &super::PublicRoot,
    kernel: &Content,
    initrd: &Content,
    build: &str,
    cmdline: &str,
) -> Result<Vec<Output>> {
    let (profile, arch) = (&job.profile.profile, job.inputs.arch);
    let update = profile.update.as_ref().ok_or_else(|| UsageError("--format update needs the profile's `update:`".into()))?;
    let Part::File { path, len, sha256 } = public.part() else { anyhow::bail!("the root squashfs is not a staged file") };
    let options = crate::update::options_without_root(cmdline);
    let nodes = inventory(profile);
    let info = BundleInfo {
        profile: &profile.name,
        arch: arch.name(),
        platform: &job.platform.name,
        update,
        build,
        downgrade: job.opts.allow_downgrade,
        options: &options,
        keep: &public.keep(),
        nodes: &nodes,
    };
    let payloads = [
        Payload { role: "root", file: crate::update::ROOT_FILE, source: Source::File { path, len, sha256 } },
        Payload { role: "kernel", file: crate::update::KERNEL_FILE, source: Source::Content(kernel) },
        Payload { role: "initrd", file: crate::update::INITRD_FILE, source: Source::Content(initrd) },
    ];
    let dir = job.dir.join(crate::update::DIR);
    info!("{arch}: writing the update bundle {} (version {})", dir.display(), update.version);
    // Readable by all: the root carries no secrets (they are `keep` lines), so `kiln serve` may
    // hand the bundle to any machine.
    crate::update::write_bundle(&dir, &info, &payloads, key, 0o644)
}

/// The inventory's nodes and their roles, for `kiln serve --rollout` (`node` lines).
fn inventory(profile: &crate::profile::Profile) -> Vec<(String, String)> {
    let Some(c) = &profile.cluster else { return Vec::new() };
    c.nodes
        .iter()
        .map(|n| {
            let roles: Vec<&str> = n.sorted_roles().iter().map(|r| r.name()).collect();
            (n.name.clone(), if roles.is_empty() { "none".into() } else { roles.join(",") })
        })
        .collect()
}
