//! `kiln serve`: the listen address, the warnings, the DHCP settings, then the server until a
//! signal.

use std::path::Path;

use anyhow::{Context, Result};
use kiln::error::UsageError;

/// `kiln serve`: apply --reinstall, print the DHCP settings, serve until SIGINT/SIGTERM.
pub fn serve(dir: &Path, listen: &str, reinstall: &[String], dnsmasq: Option<&Path>) -> Result<()> {
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
    if kiln::serve::Server::netboot_archs(dir).is_empty() {
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
    let server = kiln::serve::Server::bind(dir, listen)?;
    let addr = server.local_addr();
    // The address machines use: the listen address, or a placeholder when listening on all.
    let url_host = if addr.ip().is_unspecified() { format!("<this host's address>:{}", addr.port()) } else { addr.to_string() };
    println!("kiln serve: {} on http://{addr}/ (Ctrl-C stops)", dir.display());
    print!("{}", kiln::serve::dhcp_settings(&url_host));
    for arch in kiln::arch::Arch::ALL {
        if dir.join(arch.name()).join(kiln::update::DIR).join(kiln::update::MANIFEST).is_file() {
            println!("update bundle ({arch}): http://{url_host}{}{arch}/ (kiln-update apply URL)", kiln::serve::UPDATES);
        }
    }
    if let Some(f) = dnsmasq {
        std::fs::write(f, kiln::serve::dnsmasq_snippet(&url_host)).with_context(|| format!("writing {}", f.display()))?;
        println!("dnsmasq snippet: {}", f.display());
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing the signal handler")?;
    }
    server.run(&stop)
}
