//! The per-machine answers to `GET /boot.ipxe`: a chain script that makes iPXE call again with
//! its MAC and architecture, the installer script (the build's template with this machine's
//! `kiln.node=`), or "boot from the local disk" for a machine that reported a finished install.
//!
//! Every value from the request that reaches a script is checked first ([`host_is_safe`],
//! MACs normalised, architectures parsed): iPXE expands `${...}` and treats `&&`, `||` and
//! whitespace as syntax, so nothing else from a client is ever echoed into a script.

use crate::arch::Arch;
use crate::netboot::{BASE_VAR, CRED_VAR, NODE_VAR};

/// Answer to `/boot.ipxe` without `mac=`: call again with iPXE's own MAC and build architecture,
/// so DHCP can hand out the plain URL (no `${...}` to escape in a DHCP server's config).
pub fn chain_script(origin: &str) -> String {
    format!("#!ipxe\nchain {origin}/boot.ipxe?mac=${{net0/mac}}&arch=${{buildarch}}\n")
}

/// The architecture directory for iPXE's `${buildarch}` (kiln's names and aliases, as
/// [`Arch`] parses them). `i386` is the BIOS build (`undionly.kpxe`) that x86_64 machines run too.
pub fn arch_from_buildarch(buildarch: &str) -> Option<Arch> {
    match buildarch {
        "i386" => Some(Arch::X86_64),
        other => other.parse().ok(),
    }
}

/// Whether a `Host` header may go into a script's URLs: a host name, IPv4 or bracketed IPv6
/// address with an optional port, so only `[A-Za-z0-9.:[]-]` (no whitespace, `$`, `&`, `|`,
/// `#`, `/` or control characters that iPXE would read as syntax).
pub fn host_is_safe(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 261
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b':' | b'[' | b']' | b'-'))
}

/// The installer script for one machine: the template (minus its `#!ipxe` line) after the
/// variables it uses. `node` is the inventory name, if the MAC is in the inventory;
/// `cred_arg` the install credential's command-line words (iPXE's `set` keeps the spaces).
pub fn install_script(template: &str, base_url: &str, node: Option<&str>, cred_arg: &str) -> String {
    let body = template.strip_prefix("#!ipxe\n").unwrap_or(template);
    let mut s = format!("#!ipxe\nset {BASE_VAR} {base_url}\n");
    if let Some(n) = node {
        s.push_str(&format!("set {NODE_VAR} kiln.node={n}\n"));
    }
    if !cred_arg.is_empty() {
        s.push_str(&format!("set {CRED_VAR} {cred_arg}\n"));
    }
    s.push_str(body);
    s
}

/// "Boot from the local disk": BIOS iPXE hands over to the first hard disk; UEFI iPXE exits so
/// the firmware tries its next boot option (the disk the installer wrote).
pub fn local_disk_script(mac: &str) -> String {
    format!(
        "#!ipxe\n\
         echo kiln: {mac} is installed; booting from the local disk (`kiln serve --reinstall {mac}` installs again)\n\
         iseq ${{platform}} pcbios && sanboot --no-describe --drive 0x80 ||\n\
         exit\n"
    )
}

/// An iPXE script that prints why the machine gets nothing and returns to the firmware.
pub fn refusal_script(why: &str) -> String {
    format!("#!ipxe\necho kiln serve: {why}\nsleep 10\nexit 1\n")
}

/// The node name of `mac` in an inventory (`MAC NODE` lines, `#` comments).
pub fn node_for(inventory: &str, mac: &str) -> Option<String> {
    inventory.lines().filter(|l| !l.trim_start().starts_with('#')).find_map(|l| {
        let mut w = l.split_whitespace();
        let m = crate::serve::state::normalise_mac(w.next()?)?;
        (m == mac).then(|| w.next().map(str::to_string)).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_script_sets_the_base_and_only_known_nodes() {
        let template = crate::netboot::script_template("rack", "x86_64", "console=ttyS0", "5a5a");
        let s = install_script(&template, "http://10.0.2.2:8080/x86_64/netboot/", Some("n1"), "kiln.cred=ab kiln.secrets=cd");
        assert!(
            s.starts_with(
                "#!ipxe\nset kiln-base http://10.0.2.2:8080/x86_64/netboot/\nset kiln-node-arg kiln.node=n1\nset kiln-cred-arg kiln.cred=ab kiln.secrets=cd\n"
            ),
            "{s}"
        );
        assert_eq!(s.matches("#!ipxe").count(), 1);
        let s = install_script(&template, "http://h/x86_64/netboot/", None, "");
        assert!(!s.contains("set kiln-node-arg") && !s.contains("set kiln-cred-arg"), "{s}");
    }

    #[test]
    fn inventory_lookup_and_arch_mapping() {
        let inv = "# comment 52:54:00:00:00:01 x\n52:54:00:00:00:01 n1\n52:54:00:00:00:02 n2\n";
        assert_eq!(node_for(inv, "52:54:00:00:00:02").as_deref(), Some("n2"));
        assert_eq!(node_for(inv, "52:54:00:00:00:03"), None);
        assert_eq!(arch_from_buildarch("arm64"), Some(Arch::Aarch64));
        assert_eq!(arch_from_buildarch("i386"), Some(Arch::X86_64));
        assert_eq!(arch_from_buildarch("../x"), None);
        assert_eq!(arch_from_buildarch("x86_64||chain"), None);
        assert!(host_is_safe("10.0.2.2:8080") && host_is_safe("[fe80::1]:80") && host_is_safe("boot-server.lab"));
        for bad in ["", "h&&shell", "h||x", "h ${x}", "h\tx", "h\r", "h/x", "h#x", "h$x", &"a".repeat(300)] {
            assert!(!host_is_safe(bad), "{bad:?}");
        }
        assert!(chain_script("http://h:1").contains("chain http://h:1/boot.ipxe?mac=${net0/mac}&arch=${buildarch}"));
    }
}
