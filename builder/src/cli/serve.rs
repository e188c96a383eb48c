//! `kiln serve`: the listen address, the warnings, the DHCP settings, then the server until a
//! signal.

use std::path::Path;

use anyhow::{Context, Result};
use kiln::error::UsageError;

/// The `--rollout` flags as given.
#[derive(Debug, Default)]
pub struct RolloutFlags {
    pub rollout: bool,
    pub max_unavailable: Option<usize>,
    pub poll: Option<String>,
    pub node_timeout: Option<String>,
}

/// The rollout's settings, or why the flags do not go together.
pub fn rollout_settings(f: &RolloutFlags) -> Result<Option<kiln::serve::rollout::Settings>, UsageError> {
    use kiln::profile::update::parse_duration;
    use std::time::Duration;
    if !f.rollout {
        for (given, flag) in
            [(f.max_unavailable.is_some(), "--max-unavailable"), (f.poll.is_some(), "--poll"), (f.node_timeout.is_some(), "--node-timeout")]
        {
            if given {
                return Err(UsageError(format!("{flag} is a setting of the rollout: add --rollout (or drop {flag})")));
            }
        }
        return Ok(None);
    }
    let mut s = kiln::serve::rollout::Settings::default();
    match f.max_unavailable {
        Some(0) => return Err(UsageError("--max-unavailable 0: no agent could ever update; give 1 or more".into())),
        Some(n) => s.max_unavailable = n,
        None => {}
    }
    if let Some(p) = &f.poll {
        let secs = parse_duration(p).ok_or_else(|| UsageError(format!("--poll {p}: expected seconds, 1 or more (`30`, `30s`)")))?;
        s.poll = Duration::from_secs(secs);
    }
    if let Some(t) = &f.node_timeout {
        let secs = parse_duration(t)
            .ok_or_else(|| UsageError(format!("--node-timeout {t}: expected seconds (`900`, `900s`), minutes (`15m`) or hours (`1h`)")))?;
        s.node_timeout = Duration::from_secs(secs);
    }
    // A node's update takes at least a poll to be told and one to report back.
    if s.node_timeout < s.poll * 2 {
        return Err(UsageError(format!(
            "--node-timeout {} is shorter than two polls ({} s): every node would time out; raise --node-timeout or lower --poll",
            kiln::serve::rollout::human(s.node_timeout),
            s.poll.as_secs() * 2
        )));
    }
    Ok(Some(s))
}

/// `kiln serve`: apply --reinstall, print the DHCP settings, serve until SIGINT/SIGTERM.
pub fn serve(
    dir: &Path,
    listen: &str,
    reinstall: &[String],
    dnsmasq: Option<&Path>,
    rollout: &RolloutFlags,
    channels: &[String],
) -> Result<()> {
    use std::net::ToSocketAddrs;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    if !dir.is_dir() {
        return Err(UsageError(format!("{}: not a directory; pass a `kiln build` output directory", dir.display())).into());
    }
    let listen = listen
        .to_socket_addrs()
        .map_err(|e| UsageError(format!("--listen {listen}: {e}; give HOST:PORT, e.g. 0.0.0.0:8080 or pxe-host.lan:8080")))?
        .next()
        .ok_or_else(|| UsageError(format!("--listen {listen}: the name has no address")))?;
    let channels = parse_channels(channels)?;
    let rollout = match rollout_settings(rollout)? {
        // Loaded before binding: a rollout that cannot run must not leave a server up.
        Some(settings) => {
            Some(kiln::serve::rollout::Rollout::load(dir, settings, std::time::Instant::now()).map_err(|e| UsageError(format!("{e:#}")))?)
        }
        None => None,
    };
    if rollout.is_some() {
        check_bundles_public(dir)?;
    }
    if kiln::serve::Server::netboot_archs(dir).is_empty() && rollout.is_none() && channels.is_empty() {
        eprintln!(
            "warning: {} holds no netboot output (<arch>/netboot/boot.ipxe): machines booting from the network get nothing; build with `kiln build PROFILE --format netboot`",
            dir.display()
        );
    }
    if !reinstall.is_empty() {
        for mac in kiln::serve::reinstall(dir, reinstall)? {
            eprintln!("note: {mac} was not recorded as installed");
        }
    }
    let mut server = kiln::serve::Server::bind(dir, listen)?.with_channels(channels.clone());
    let addr = server.local_addr();
    // The address machines use: the listen address, or a placeholder when listening on all.
    let url_host = if addr.ip().is_unspecified() { format!("<this host's address>:{}", addr.port()) } else { addr.to_string() };
    println!("kiln serve: {} on http://{addr}/ (Ctrl-C stops)", dir.display());
    print!("{}", kiln::serve::dhcp_settings(&url_host));
    for arch in kiln::serve::updates::bundle_archs(dir) {
        println!("update bundle ({arch}): http://{url_host}{}{arch}/ (kiln-update apply URL)", kiln::serve::UPDATES);
    }
    for c in &channels {
        for arch in kiln::serve::updates::bundle_archs(&c.root) {
            println!("update bundle ({arch}, channel {}): http://{url_host}{}{}/{arch}/", c.name, kiln::serve::UPDATES, c.name);
        }
    }
    if let Some(f) = dnsmasq {
        std::fs::write(f, kiln::serve::dnsmasq_snippet(&url_host)).with_context(|| format!("writing {}", f.display()))?;
        println!("dnsmasq snippet: {}", f.display());
    }
    if let Some(r) = rollout {
        println!("{}", r.plan());
        println!("rollout progress: http://{url_host}/rollout/status");
        server = server.with_rollout(r);
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing the signal handler")?;
    }
    server.run(&stop)
}

/// The `--channel NAME=DIR` arguments, each checked (name, directory, a bundle in it), names
/// unique.
fn parse_channels(args: &[String]) -> Result<Vec<kiln::serve::Channel>, UsageError> {
    let mut channels: Vec<kiln::serve::Channel> = Vec::new();
    for arg in args {
        let c = kiln::serve::Channel::parse(arg).map_err(UsageError)?;
        if channels.iter().any(|o| o.name == c.name) {
            return Err(UsageError(format!("--channel {arg}: channel `{}` is given twice", c.name)));
        }
        channels.push(c);
    }
    Ok(channels)
}

/// The nodes fetch the bundle from this server, which refuses owner-only bundle files (a build
/// whose root carries secrets): say so at start rather than after the first node is told.
fn check_bundles_public(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for arch in kiln::serve::updates::bundle_archs(dir) {
        let bundle = dir.join(arch.name()).join(kiln::update::DIR);
        for file in kiln::update::FILES {
            let path = bundle.join(file);
            let meta = std::fs::metadata(&path).map_err(|e| {
                UsageError(format!("--rollout: {}: {e}; rebuild the bundle with `kiln build PROFILE --format update`", path.display()))
            })?;
            if meta.permissions().mode() & 0o004 == 0 {
                return Err(UsageError(format!(
                    "--rollout: {} is owner-only (the bundle carries the build's secrets), so this server would refuse it to the nodes; build it from a profile with `update.server`, whose bundle root leaves the secrets out",
                    path.display()
                ))
                .into());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(rollout: bool, max: Option<usize>, poll: Option<&str>, timeout: Option<&str>) -> RolloutFlags {
        RolloutFlags { rollout, max_unavailable: max, poll: poll.map(str::to_string), node_timeout: timeout.map(str::to_string) }
    }

    #[test]
    fn rollout_flags_are_checked_before_anything_binds() {
        assert!(rollout_settings(&flags(false, None, None, None)).unwrap().is_none());
        let s = rollout_settings(&flags(true, None, None, None)).unwrap().unwrap();
        assert_eq!((s.max_unavailable, s.poll.as_secs(), s.node_timeout.as_secs()), (1, 30, 900));
        let s = rollout_settings(&flags(true, Some(3), Some("10"), Some("90s"))).unwrap().unwrap();
        assert_eq!((s.max_unavailable, s.poll.as_secs(), s.node_timeout.as_secs()), (3, 10, 90));
        assert_eq!(rollout_settings(&flags(true, None, None, Some("1h"))).unwrap().unwrap().node_timeout.as_secs(), 3600);
        for (f, want) in [
            (flags(false, Some(2), None, None), "--max-unavailable is a setting of the rollout: add --rollout"),
            (flags(false, None, Some("5"), None), "--poll is a setting"),
            (flags(true, Some(0), None, None), "--max-unavailable 0"),
            (flags(true, None, Some("0"), None), "--poll 0"),
            (flags(true, None, None, Some("soon")), "--node-timeout soon: expected"),
            (flags(true, None, Some("60"), Some("90")), "shorter than two polls"),
        ] {
            let err = rollout_settings(&f).unwrap_err().to_string();
            assert!(err.contains(want), "{f:?}: {err}");
        }
    }
}
