//! `kiln check`, and the same checks before `build`, `fetch` and `secrets`: every static problem
//! of a profile, located, before anything is downloaded.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use kiln::profile::LoadedProfile;

/// Every static problem of a profile, sorted by position: the profile's own checks, then what
/// needs the rest of kiln (templates rendered with its vars, its platforms). Nothing is fetched.
pub fn profile_problems(path: &Path) -> Result<(Option<LoadedProfile>, Vec<kiln::profile::check::Problem>)> {
    let (loaded, mut problems) = LoadedProfile::check(path)?;
    if let Some(p) = &loaded {
        let mut more = kiln::pipeline::template_problems(p);
        for &a in &p.profile.arch {
            match kiln::platform::Platform::load_for(p.platform(a), a) {
                Err(e) => more.push(e.context(format!("key `platform.{a}`"))),
                Ok(platform) => {
                    if let Err(e) = platform.check_components(&p.profile.os.components) {
                        more.push(e.context("key `os.components`"));
                    }
                    if let Err(e) = platform.check_install_mode(p.profile.install.mode) {
                        more.push(e.context("key `install.mode`"));
                    }
                }
            }
        }
        problems.extend(p.locate(&more));
    }
    problems.sort_by_key(|p| (p.line, p.column));
    Ok((loaded, problems))
}

/// The profile for `build`, `fetch` and `secrets`: the same checks as `kiln check` first, so a
/// template or key error fails in milliseconds, listing every problem, before any download.
pub fn checked_profile(path: &Path) -> Result<LoadedProfile> {
    match profile_problems(path)? {
        (Some(p), problems) if problems.is_empty() => Ok(p),
        (_, problems) => Err(kiln::profile::ProfileError(kiln::profile::check::render_all(&path.display().to_string(), &problems)).into()),
    }
}

/// What `kiln check` points out without failing: inputs the operator provides before `kiln
/// build` that an example or a profile in the making may not have yet (the join token of an
/// existing cluster is a secret, so no example ships one).
fn profile_warnings(p: &LoadedProfile) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Some(f) = p.profile.cluster.as_ref().and_then(|c| c.token_file.as_deref()) {
        let path = p.resolve(f);
        if !path.is_file() {
            warnings.push(format!(
                "key `cluster.token_file`: {} does not exist yet; `kiln build` needs it (to join an existing cluster: the token in /var/lib/rancher/k3s/server/token on one of its servers, in a file only you can read)",
                path.display()
            ));
        }
    }
    warnings
}

/// `kiln check`: every static problem of each profile, as text or one JSON summary.
pub fn check(profiles: &[PathBuf], json: bool) -> Result<ExitCode> {
    let mut summary = Vec::new();
    for path in profiles {
        let (loaded, problems) = profile_problems(path)?;
        let warnings = loaded.as_ref().map(profile_warnings).unwrap_or_default();
        let file = path.display().to_string();
        if !json {
            if problems.is_empty() {
                println!("{file}: ok");
            } else {
                eprintln!("{}", kiln::profile::check::render_all(&file, &problems));
            }
            for w in &warnings {
                eprintln!("{file}: warning: {w}");
            }
        }
        summary.push(serde_json::json!({ "profile": file, "ok": problems.is_empty(), "problems": problems, "warnings": warnings }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    let ok = summary.iter().all(|s| s["ok"] == true);
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(2) })
}
