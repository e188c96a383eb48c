//! The profile's system sections: `hostname`, `users`, `ssh`, `network`, `time` and `sysctl`
//! (with `kernel.load`, checked here too): their types and the checks the types cannot express,
//! each error naming its key. `provision` renders them into the root.
//!
//! Password hashes never reach a log: their `Debug` and `Serialize` are redacted.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use anyhow::{bail, Context, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Profile;

/// A login account created in the image.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Login name: lower-case letters, digits, `_` and `-`, starting with a letter or `_`, at most
    /// 32 characters. System names (`daemon`, `bin`, `nobody`, ...) are refused. Users get uids from
    /// 1000 in list order, a group of their own with the same id, and the home `/home/<name>`.
    /// A `root` entry may only give root `ssh_authorized_keys` (and needs `ssh.root_login` other than `no`).
    pub name: String,
    /// Public keys allowed to log in, one OpenSSH key line each (`ssh-ed25519 AAAA... comment`;
    /// types `ssh-ed25519`, `ssh-rsa`, `ecdsa-sha2-*`, `sk-*`; no options prefix).
    /// Written to `~/.ssh/authorized_keys` (mode 0644, owned by the user: public keys).
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
    /// A crypt(3) hash (`$y$...`, `$6$...`; make one with `mkpasswd`). Absent: no password
    /// login at all (the account still logs in with keys). Never printed; `/etc/shadow` is 0600.
    #[serde(default)]
    pub password_hash: Option<PasswordHash>,
    /// Supplementary groups (must exist in the image's `/etc/group`, e.g. `adm`, `disk`, `video`).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Login shell. Default: `/bin/sh` (busybox).
    #[serde(default)]
    pub shell: Option<String>,
}

/// A crypt(3) password hash: kept out of every `Debug` and serialised output.
#[derive(Clone, Deserialize, JsonSchema)]
#[schemars(with = "String")]
pub struct PasswordHash(pub String);

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordHash(<redacted>)")
    }
}

impl Serialize for PasswordHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// Settings for debugging a device on the bench (`debug`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DebugOptions {
    /// UNSAFE on untrusted sites: when a boot step fails (in the initramfs, including every
    /// installer refusal, or in the appliance), leave an unauthenticated root shell on the
    /// console. Default `false`: the error stays on the console without a shell; the initramfs
    /// reboots after 30 s to try again, the appliance runs its remaining boot steps and does not
    /// report ready. Anyone at the serial console or IPMI can make a step fail (pull a cable,
    /// attach a disk), so with `true` they get root.
    #[serde(default)]
    pub rescue_shell: bool,
}

/// The SSH server and its login policy.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Ssh {
    /// `dropbear` (Debian's `dropbear-bin`, supervised by init; host keys ed25519 + ecdsa are
    /// generated on the device's first boot into the persistent `/etc/dropbear` and kept) or `none`.
    #[serde(default)]
    pub server: SshServer,
    /// Whether root may log in: `no`, `prohibit-password` (keys only) or `yes`.
    #[serde(default)]
    pub root_login: RootLogin,
    /// Allow password logins (for users with a `password_hash`).
    #[serde(default)]
    pub password_auth: bool,
    /// TCP port the server listens on.
    #[serde(default = "default_ssh_port")]
    pub port: u16,
}

fn default_ssh_port() -> u16 {
    22
}

impl Default for Ssh {
    fn default() -> Self {
        Ssh { server: SshServer::default(), root_login: RootLogin::default(), password_auth: false, port: default_ssh_port() }
    }
}

/// Which SSH server the appliance runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SshServer {
    /// dropbear from Debian's `dropbear-bin`.
    #[default]
    Dropbear,
    /// No SSH server.
    None,
}

/// Root login policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RootLogin {
    /// Root cannot log in over SSH.
    #[default]
    No,
    /// Root logs in with keys only.
    ProhibitPassword,
    /// Root logs in with keys or (if `password_auth`) a password.
    Yes,
}

/// Network configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Per interface (`eth0: {dhcp: true}` or `eth0: {address: 10.0.0.5/24, gateway: 10.0.0.1}`).
    /// Empty (the default): DHCP (busybox udhcpc) on every wired interface (`eth*`, `en*`).
    /// DHCP waits about 5 s for a lease, then keeps trying in the background.
    #[serde(default)]
    pub interfaces: BTreeMap<String, Interface>,
    /// Name servers written to `/etc/resolv.conf` (instead of the ones DHCP offers).
    #[serde(default)]
    pub dns: Vec<String>,
}

/// One interface: DHCP or a static address.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    /// Configure by DHCP.
    #[serde(default)]
    pub dhcp: bool,
    /// Static address with prefix length, e.g. `10.0.0.5/24`.
    #[serde(default)]
    pub address: Option<String>,
    /// Default gateway for a static address.
    #[serde(default)]
    pub gateway: Option<String>,
}

/// Time settings.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Time {
    /// NTP servers: `HOST`, `HOST:PORT`, `[IPV6]` or `[IPV6]:PORT`. Set: Debian's `chrony` is
    /// installed and `chronyd` (supervised by init, logging to the console) polls them, stepping the
    /// clock at start-up when it is off by more than a second (boards without a real-time clock boot
    /// in 1970, and TLS needs the right time). Default `[]`: no time synchronisation (an appliance
    /// never contacts a server nobody configured).
    #[serde(default)]
    pub servers: Vec<String>,
    /// Time zone name from Debian's `tzdata` (e.g. `Europe/Berlin`); `/etc/localtime` points at
    /// it. `UTC` (the default) needs no package.
    #[serde(default = "default_timezone")]
    pub timezone: String,
}

fn default_timezone() -> String {
    "UTC".into()
}

impl Default for Time {
    fn default() -> Self {
        Time { servers: Vec::new(), timezone: default_timezone() }
    }
}

/// A sysctl value: written as given (numbers, booleans and strings are accepted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct SysctlValue(pub String);

impl JsonSchema for SysctlValue {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SysctlValue".into()
    }

    /// What the deserializer accepts: `vm.swappiness: 10` as well as `"10"` (editors and
    /// `kiln check` follow the schema, so it must not say "string" only).
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A sysctl value: a number, a boolean or a string, written as given.",
            "type": ["string", "integer", "number", "boolean"]
        })
    }
}

impl From<SysctlValue> for String {
    fn from(v: SysctlValue) -> String {
        v.0
    }
}

impl<'de> Deserialize<'de> for SysctlValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            I(i64),
            U(u64),
            B(bool),
            S(String),
        }
        Ok(SysctlValue(match Raw::deserialize(d)? {
            Raw::I(n) => n.to_string(),
            Raw::U(n) => n.to_string(),
            Raw::B(b) => u8::from(b).to_string(),
            Raw::S(s) => s,
        }))
    }
}

/// Checks the first-boot keys; every error names the key.
pub fn validate(p: &Profile) -> Result<()> {
    if let Some(h) = &p.hostname {
        if !is_dns_label(h) {
            bail!("key `hostname`: `{h}` is not a host name (1-63 letters, digits and `-`, not starting or ending with `-`)");
        }
    }
    validate_users(p)?;
    if p.ssh.port == 0 {
        bail!("key `ssh.port`: 0 is not a port");
    }
    validate_network(&p.network)?;
    validate_time(&p.time)?;
    for (k, v) in &p.sysctl {
        let key_ok = !k.is_empty()
            && !k.starts_with(['.', '/'])
            && !k.contains("..")
            && k.chars().all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c));
        if !key_ok {
            bail!("key `sysctl.{k}`: not a sysctl name (e.g. `net.ipv4.ip_forward`)");
        }
        if v.0.is_empty() || v.0.contains(['\n', '\r', '#']) {
            bail!("key `sysctl.{k}`: value must be one non-empty line without `#`");
        }
    }
    for (i, m) in p.kernel.load.iter().enumerate() {
        if m.is_empty() || !m.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            bail!("key `kernel.load[{i}]`: `{m}` is not a module name");
        }
    }
    Ok(())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') && !s.starts_with('-') && !s.ends_with('-')
}

/// Account and group names kiln's base system already uses (see `setup.rs`).
fn reserved_names() -> BTreeSet<&'static str> {
    let mut names: BTreeSet<&'static str> =
        crate::setup::PASSWD.lines().chain(crate::setup::GROUP.lines()).filter_map(|l| l.split(':').next()).collect();
    names.insert(crate::setup::CHRONY_ACCOUNT.name);
    names
}

fn validate_users(p: &Profile) -> Result<()> {
    let reserved = reserved_names();
    let mut seen = BTreeSet::new();
    for (i, u) in p.users.iter().enumerate() {
        let key = format!("users[{i}]");
        if !seen.insert(u.name.as_str()) {
            bail!("key `{key}.name`: user `{}` is listed twice", u.name);
        }
        if u.name == "root" {
            if u.password_hash.is_some() || !u.groups.is_empty() || u.shell.is_some() {
                bail!("key `{key}`: a `root` entry may only set `ssh_authorized_keys` (root stays password-locked)");
            }
            if !u.ssh_authorized_keys.is_empty() && p.ssh.root_login == RootLogin::No {
                bail!("key `{key}.ssh_authorized_keys`: root has keys but `ssh.root_login` is `no`; set it to `prohibit-password`");
            }
        } else {
            let valid = (1..=32).contains(&u.name.len())
                && u.name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && u.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
            if !valid {
                bail!("key `{key}.name`: `{}` must be lower-case letters, digits, `_` or `-`, start with a letter or `_`, at most 32 characters", u.name);
            }
            if reserved.contains(u.name.as_str()) {
                bail!("key `{key}.name`: `{}` is a system account or group name", u.name);
            }
        }
        for (j, k) in u.ssh_authorized_keys.iter().enumerate() {
            check_ssh_key(k).with_context(|| format!("key `{key}.ssh_authorized_keys[{j}]`"))?;
        }
        if let Some(h) = &u.password_hash {
            let ok = h.0.starts_with('$') && h.0.len() >= 8 && h.0.chars().all(|c| c.is_ascii_alphanumeric() || "$./=,-".contains(c));
            if !ok {
                // The value itself is not repeated: it may be a real secret pasted by mistake.
                bail!("key `{key}.password_hash`: not a crypt(3) hash (expected `$y$...` or `$6$...`, e.g. from `mkpasswd`)");
            }
        }
        if let Some(s) = &u.shell {
            if !s.starts_with('/') || s.contains([':', '\n', ' ']) {
                bail!("key `{key}.shell`: `{s}` must be an absolute path");
            }
        }
        for g in &u.groups {
            if g.is_empty() || g.contains([':', ',', '\n', ' ']) {
                bail!("key `{key}.groups`: `{g}` is not a group name");
            }
        }
    }
    Ok(())
}

/// An OpenSSH public key line: `TYPE BASE64 [comment]`, without options.
fn check_ssh_key(line: &str) -> Result<()> {
    let mut parts = line.split_whitespace();
    let ty = parts.next().unwrap_or_default();
    let data = parts.next().unwrap_or_default();
    let known = matches!(ty, "ssh-ed25519" | "ssh-rsa") || ty.starts_with("ecdsa-sha2-") || ty.starts_with("sk-");
    if !known {
        bail!("`{}` is not a public key line (expected `ssh-ed25519 AAAA...`, `ssh-rsa`, `ecdsa-sha2-*` or `sk-*`)", truncate(line));
    }
    let base64 = data.len() >= 16 && data.chars().all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c));
    if !base64 || line.contains(['\n', '\r']) {
        bail!("the {ty} key data is not base64");
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

fn validate_network(n: &Network) -> Result<()> {
    for (name, i) in &n.interfaces {
        let key = format!("network.interfaces.{name}");
        if name.is_empty() || name.len() > 15 || name == "lo" || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
            bail!("key `{key}`: `{name}` is not a network interface name");
        }
        match (&i.address, i.dhcp) {
            (Some(_), true) => bail!("key `{key}`: choose `dhcp: true` or `address`, not both"),
            (None, false) => bail!("key `{key}`: give `dhcp: true` or an `address` such as 10.0.0.5/24"),
            (None, true) => {
                if i.gateway.is_some() {
                    bail!("key `{key}.gateway`: a gateway goes with a static `address` (DHCP provides its own)");
                }
            }
            (Some(a), false) => {
                let ip = parse_cidr(a).with_context(|| format!("key `{key}.address`"))?;
                if let Some(g) = &i.gateway {
                    let gw: IpAddr = g.parse().map_err(|_| anyhow::anyhow!("key `{key}.gateway`: `{g}` is not an IP address"))?;
                    if gw.is_ipv4() != ip.is_ipv4() {
                        bail!("key `{key}.gateway`: `{g}` is not of the address's family");
                    }
                }
            }
        }
    }
    for (i, d) in n.dns.iter().enumerate() {
        if d.parse::<IpAddr>().is_err() {
            bail!("key `network.dns[{i}]`: `{d}` is not an IP address");
        }
    }
    Ok(())
}

/// `ADDRESS/PREFIX` with a prefix that fits the family.
pub(crate) fn parse_cidr(s: &str) -> Result<IpAddr> {
    let Some((a, p)) = s.split_once('/') else { bail!("`{s}` needs a prefix length, e.g. `{s}/24`") };
    let ip: IpAddr = a.parse().map_err(|_| anyhow::anyhow!("`{a}` is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match p.parse::<u8>() {
        Ok(n) if n <= max => Ok(ip),
        _ => bail!("`/{p}` is not a prefix length (0-{max})"),
    }
}

fn validate_time(t: &Time) -> Result<()> {
    for (i, s) in t.servers.iter().enumerate() {
        ntp_server(s).with_context(|| format!("key `time.servers[{i}]`"))?;
    }
    let tz = &t.timezone;
    let ok = !tz.is_empty()
        && !tz.starts_with('/')
        && !tz.split('/').any(|c| c.is_empty() || c == "." || c == "..")
        && tz.chars().all(|c| c.is_ascii_alphanumeric() || "/_+-".contains(c));
    if !ok {
        bail!("key `time.timezone`: `{tz}` is not a time zone name such as `Europe/Berlin`");
    }
    Ok(())
}

/// An NTP server entry split into host and port: `HOST`, `HOST:PORT`, `[IPV6]`, `[IPV6]:PORT`
/// (a bare IPv6 address is a host too).
pub fn ntp_server(s: &str) -> Result<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else { bail!("`{s}`: `[` without `]`") };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            bail!("`{v6}` is not an IPv6 address");
        }
        match after {
            "" => (v6, None),
            _ => match after.strip_prefix(':') {
                Some(p) => (v6, Some(p)),
                None => bail!("`{s}`: expected `:PORT` after `]`"),
            },
        }
    } else if s.parse::<IpAddr>().is_ok() {
        (s, None)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Some(n),
            _ => bail!("`{p}` is not a port (1-65535)"),
        },
        None => None,
    };
    let is_name = !host.is_empty() && host.len() <= 253 && host.split('.').all(is_dns_label);
    if host.parse::<IpAddr>().is_err() && !is_name {
        bail!("`{host}` is neither an IP address nor a DNS name");
    }
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{test_parse, test_profile};

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOaKqWL3yl+u4dh7kBSnQmHzBvlhH7j2N2T4b9LFtjrq alice@laptop";

    fn invalid(extra: &str) -> String {
        match test_parse(extra) {
            Ok(p) => format!("{:#}", validate(&p).expect_err("validation passed")),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn ntp_servers_split_into_host_and_port() {
        for (spec, host, port) in [
            ("pool.ntp.org", "pool.ntp.org", None),
            ("ntp1:11123", "ntp1", Some(11123)),
            ("10.0.2.2", "10.0.2.2", None),
            ("10.0.2.2:123", "10.0.2.2", Some(123)),
            ("fd00::1", "fd00::1", None),
            ("[fd00::1]", "fd00::1", None),
            ("[fd00::1]:4123", "fd00::1", Some(4123)),
        ] {
            assert_eq!(ntp_server(spec).unwrap(), (host.to_string(), port), "{spec}");
        }
        for bad in ["", ":123", "host:", "host:99999", "a..b", "[fd00::1]123", "[host]:1"] {
            assert!(ntp_server(bad).is_err(), "{bad} was accepted");
        }
        validate(&test_profile("time: {servers: [ntp.example]}\n")).unwrap();
        assert!(invalid("users: [{name: _chrony}]\n").contains("system account"));
    }
    #[test]
    fn defaults_keep_old_profiles_valid() {
        let p = test_profile("");
        validate(&p).unwrap();
        assert!(p.hostname.is_none() && p.users.is_empty() && p.sysctl.is_empty() && p.kernel.load.is_empty());
        assert_eq!((p.ssh.server, p.ssh.root_login, p.ssh.password_auth, p.ssh.port), (SshServer::Dropbear, RootLogin::No, false, 22));
        assert_eq!(p.time.timezone, "UTC");
    }
    #[test]
    fn bad_values_are_errors_naming_the_key() {
        for (yaml, key) in [
            ("hostname: -bad-\n", "`hostname`"),
            ("hostname: a.b\n", "`hostname`"),
            ("users: [{name: Alice}]\n", "`users[0].name`"),
            ("users: [{name: daemon}]\n", "`users[0].name`"),
            ("users: [{name: staff}]\n", "`users[0].name`"),
            ("users: [{name: a}, {name: a}]\n", "`users[1].name`"),
            ("users: [{name: a, ssh_authorized_keys: [\"ssh-dss AAAAB3NzaC1kc3MAAACBAP\"]}]\n", "`users[0].ssh_authorized_keys[0]`"),
            ("users: [{name: a, ssh_authorized_keys: [\"ssh-ed25519 not*base64!!!!!!!!!!\"]}]\n", "`users[0].ssh_authorized_keys[0]`"),
            ("users: [{name: a, password_hash: hunter2}]\n", "`users[0].password_hash`"),
            ("users: [{name: a, shell: bash}]\n", "`users[0].shell`"),
            ("users: [{name: root, shell: /bin/sh}]\n", "`users[0]`"),
            (&format!("users: [{{name: root, ssh_authorized_keys: [\"{KEY}\"]}}]\n"), "`users[0].ssh_authorized_keys`"),
            ("ssh: {port: 0}\n", "`ssh.port`"),
            ("network: {interfaces: {eth0: {address: 10.0.0.5}}}\n", "`network.interfaces.eth0.address`"),
            ("network: {interfaces: {eth0: {address: 10.0.0.500/24}}}\n", "`network.interfaces.eth0.address`"),
            ("network: {interfaces: {eth0: {address: 10.0.0.5/33}}}\n", "`network.interfaces.eth0.address`"),
            ("network: {interfaces: {eth0: {address: 10.0.0.5/24, gateway: nope}}}\n", "`network.interfaces.eth0.gateway`"),
            ("network: {interfaces: {eth0: {dhcp: true, address: 10.0.0.5/24}}}\n", "`network.interfaces.eth0`"),
            ("network: {interfaces: {eth0: {}}}\n", "`network.interfaces.eth0`"),
            ("network: {interfaces: {lo: {dhcp: true}}}\n", "`network.interfaces.lo`"),
            ("network: {dns: [1.1.1]}\n", "`network.dns[0]`"),
            ("time: {timezone: ../etc/passwd}\n", "`time.timezone`"),
            ("time: {servers: [\"pool.ntp.org:0\"]}\n", "`time.servers[0]`"),
            ("time: {servers: [ntp.example, \"bad host\"]}\n", "`time.servers[1]`"),
            ("time: {servers: [\"[10.0.0.1]:123\"]}\n", "`time.servers[0]`"),
            ("time: {servers: [\"[::1\"]}\n", "`time.servers[0]`"),
            ("sysctl: {\"net ipv4\": 1}\n", "`sysctl.net ipv4`"),
            ("sysctl: {vm.swappiness: \"1\\n2\"}\n", "`sysctl.vm.swappiness`"),
            ("kernel: {load: [\"a b\"]}\n", "`kernel.load[0]`"),
        ] {
            let err = invalid(yaml);
            assert!(err.contains(key), "{yaml}: error does not name {key}: {err}");
        }
        let err = invalid("ssh: {server: openssh}\n");
        assert!(err.contains("openssh"), "{err}");
        let err = invalid("network: {interfaces: {eth0: {dhcp: true, mtu: 9000}}}\n");
        assert!(err.contains("mtu"), "{err}");
    }
    #[test]
    fn password_hashes_never_show_in_debug_errors_or_serialised_output() {
        let secret = "$y$j9T$abcdefghijklmnop$0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef";
        let p = test_profile(&format!("users: [{{name: a, password_hash: \"{secret}\"}}]\n"));
        validate(&p).unwrap();
        assert!(!format!("{p:?}").contains("abcdefghijklmnop"));
        assert!(!serde_json::to_string(&p).unwrap().contains("abcdefghijklmnop"));
        let err = invalid("users: [{name: a, password_hash: \"not-a-hash-hunter2\"}]\n");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
