//! First-boot configuration from the profile: hostname, user accounts with SSH keys, the SSH
//! server and its policy, network, timezone, sysctl settings and kernel modules to load.
//!
//! Everything is decided at build time and written into the root as plain files: account
//! databases, home directories, `/etc/kiln/*.conf` (read by the boot steps in
//! `overlays/appliance/usr/lib/kiln/boot.d/`), `/etc/sysctl.d/kiln.conf` and inittab lines. Only
//! what must be unique per device (SSH host keys) and what depends on the network (DHCP) happens
//! on the device. Password hashes never reach a log: their `Debug` and `Serialize` are redacted.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use anyhow::{bail, Context, Result};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::kmod::ModuleSet;
use crate::profile::Profile;
use crate::setup::{insert, owned, AccountFiles, CHRONY_ACCOUNT};
use crate::tree::{Content, Kind, Tree};

/// Debian's package with the dropbear SSH server (`/usr/sbin/dropbear`, `dropbearkey`).
pub const DROPBEAR_PACKAGE: &str = "dropbear-bin";
/// Debian's package with the time zone database (`/usr/share/zoneinfo`).
pub const TZDATA_PACKAGE: &str = "tzdata";
/// Debian's NTP client and server (`/usr/sbin/chronyd`, `/usr/bin/chronyc`), for `time.servers`.
pub const CHRONY_PACKAGE: &str = "chrony";
/// The first uid (and user-private gid) given to the profile's users, in order.
pub const FIRST_UID: u32 = 1000;
const DEFAULT_SHELL: &str = "/bin/sh";
/// dropbear's host keys; generated on the device's first boot by `boot.d/60-ssh.sh`.
const HOST_KEYS: [&str; 2] = ["/etc/dropbear/dropbear_ed25519_host_key", "/etc/dropbear/dropbear_ecdsa_host_key"];

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
    /// Written to `~/.ssh/authorized_keys` (mode 0600, owned by the user).
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(into = "String")]
#[schemars(with = "String")]
pub struct SysctlValue(pub String);

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

/// The Debian packages the profile's first-boot configuration needs in the root.
pub fn packages(p: &Profile) -> Vec<&'static str> {
    let mut v = Vec::new();
    if p.ssh.server == SshServer::Dropbear {
        v.push(DROPBEAR_PACKAGE);
    }
    if p.time.timezone != "UTC" {
        v.push(TZDATA_PACKAGE);
    }
    if !p.time.servers.is_empty() {
        v.push(CHRONY_PACKAGE);
    }
    v
}

// --- validation ---------------------------------------------------------------------------------

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
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
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
            let ok = h.0.starts_with('$')
                && h.0.len() >= 8
                && h.0.chars().all(|c| c.is_ascii_alphanumeric() || "$./=,-".contains(c));
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

// --- rendering ----------------------------------------------------------------------------------

/// Writes the profile's first-boot configuration into the root. Runs after kiln's appliance
/// overlay (it extends that overlay's `/etc/inittab` and `/etc/hostname`) and before the
/// profile's own overlays, which may still replace any of these files. `modules` is the kernel's
/// module set, to check `kernel.load` against.
pub fn render(p: &Profile, root: &mut Tree, modules: &ModuleSet) -> Result<()> {
    let hostname = p.hostname.clone().unwrap_or_else(|| p.name.clone());
    root.add_file("etc/hostname", 0o644, format!("{hostname}\n"))?;
    if !root.contains("etc/hosts") {
        root.add_file("etc/hosts", 0o644, format!("127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"))?;
    }
    accounts(p, root)?;
    ssh(p, root)?;
    root.add_file("etc/kiln/network.conf", 0o644, network_conf(&p.network))?;
    time(p, root)?;
    root.add_file("etc/sysctl.d/kiln.conf", 0o644, sysctl_conf(&p.sysctl))?;
    kernel_modules(p, root, modules)?;
    Ok(())
}

/// passwd/group/shadow additions, homes and authorized_keys.
fn accounts(p: &Profile, root: &mut Tree) -> Result<()> {
    let AccountFiles { mut passwd, mut group, mut shadow } = AccountFiles::read(root)?;
    let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut uid = FIRST_UID;
    for (i, u) in p.users.iter().enumerate() {
        if u.name == "root" {
            write_keys(root, "root", &u.ssh_authorized_keys, 0, 0)?;
            continue;
        }
        let shell = u.shell.as_deref().unwrap_or(DEFAULT_SHELL);
        let home = format!("home/{}", u.name);
        passwd.push_str(&format!("{}:x:{uid}:{uid}::/{home}:{shell}\n", u.name));
        group.push_str(&format!("{}:x:{uid}:\n", u.name));
        // `*`: no password matches, but the account is not locked (`!` would also refuse keys).
        let hash = u.password_hash.as_ref().map(|h| h.0.as_str()).unwrap_or("*");
        shadow.push_str(&format!("{}:{hash}:0:0:99999:7:::\n", u.name));
        for g in &u.groups {
            if !group.lines().any(|l| l.split(':').next() == Some(g.as_str())) {
                bail!("key `users[{i}].groups`: group `{g}` does not exist in the image's /etc/group");
            }
            members.entry(g.clone()).or_default().push(u.name.clone());
        }
        if !root.contains("home") {
            root.add_dir("home", 0o755)?;
        }
        insert(root, &home, owned(0o755, uid, uid), Kind::Dir)?;
        write_keys(root, &home, &u.ssh_authorized_keys, uid, uid)?;
        uid += 1;
    }
    let group: String = group.lines().map(|l| add_members(l, &members) + "\n").collect();
    // Password hashes: readable by root only.
    AccountFiles { passwd, group, shadow }.write(root)
}

/// `name:x:gid:a,b` with the profile's users appended to the member list.
fn add_members(line: &str, members: &BTreeMap<String, Vec<String>>) -> String {
    let name = line.split(':').next().unwrap_or_default();
    match members.get(name) {
        Some(new) => {
            let mut list: Vec<&str> = line.rsplit(':').next().unwrap_or_default().split(',').filter(|s| !s.is_empty()).collect();
            list.extend(new.iter().map(String::as_str));
            let head = &line[..line.rfind(':').map(|i| i + 1).unwrap_or(line.len())];
            format!("{head}{}", list.join(","))
        }
        None => line.to_string(),
    }
}

fn write_keys(root: &mut Tree, home: &str, keys: &[String], uid: u32, gid: u32) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let text: String = keys.iter().map(|k| format!("{}\n", k.trim())).collect();
    insert(root, &format!("{home}/.ssh"), owned(0o700, uid, gid), Kind::Dir)?;
    insert(root, &format!("{home}/.ssh/authorized_keys"), owned(0o600, uid, gid), Kind::File(Content::bytes(text)))
}

/// The dropbear command line init runs (foreground, log to stderr = console), from the policy.
pub fn dropbear_command(s: &Ssh) -> String {
    let mut c = format!("/usr/sbin/dropbear -F -E -p {}", s.port);
    match s.root_login {
        RootLogin::No => c.push_str(" -w"),
        RootLogin::ProhibitPassword => c.push_str(" -g"),
        RootLogin::Yes => {}
    }
    if !s.password_auth {
        c.push_str(" -s");
    }
    for k in HOST_KEYS {
        c.push_str(&format!(" -r {k}"));
    }
    c
}

fn ssh(p: &Profile, root: &mut Tree) -> Result<()> {
    let s = &p.ssh;
    if s.server == SshServer::None {
        root.add_file("etc/kiln/ssh.conf", 0o644, "# written by kiln from the profile's `ssh` key\nKILN_SSH_SERVER=none\n")?;
        return Ok(());
    }
    if !root.contains("usr/sbin/dropbear") || !root.contains("usr/bin/dropbearkey") {
        bail!("key `ssh.server`: dropbear needs the `{DROPBEAR_PACKAGE}` package, but /usr/sbin/dropbear or /usr/bin/dropbearkey is missing from the root");
    }
    let root_login = match s.root_login {
        RootLogin::No => "no",
        RootLogin::ProhibitPassword => "prohibit-password",
        RootLogin::Yes => "yes",
    };
    let conf = format!(
        "# written by kiln from the profile's `ssh` key\nKILN_SSH_SERVER=dropbear\nKILN_SSH_PORT={}\nKILN_SSH_ROOT_LOGIN={root_login}\nKILN_SSH_PASSWORD_AUTH={}\nKILN_SSH_HOST_KEYS=\"{}\"\n",
        s.port,
        if s.password_auth { "yes" } else { "no" },
        HOST_KEYS.join(" ")
    );
    root.add_file("etc/kiln/ssh.conf", 0o644, conf)?;
    // Respawn entries start after every sysinit step (the host keys exist by then).
    crate::inittab::append(root, "SSH server (profile key `ssh`), restarted by init if it exits.", &format!("::respawn:{}", dropbear_command(s)))?;
    Ok(())
}

/// One line per rule for `boot.d/40-network.sh`: `dhcp-all`, `dhcp IF`, `static IF ADDR GW|-`, `dns IP`.
pub fn network_conf(n: &Network) -> String {
    let mut s = String::from("# written by kiln from the profile's `network` key: dhcp-all | dhcp IF | static IF ADDRESS GATEWAY|- | dns IP\n");
    if n.interfaces.is_empty() {
        s.push_str("dhcp-all\n");
    }
    for (name, i) in &n.interfaces {
        match &i.address {
            Some(a) => s.push_str(&format!("static {name} {a} {}\n", i.gateway.as_deref().unwrap_or("-"))),
            None => s.push_str(&format!("dhcp {name}\n")),
        }
    }
    for d in &n.dns {
        s.push_str(&format!("dns {d}\n"));
    }
    s
}

fn time(p: &Profile, root: &mut Tree) -> Result<()> {
    let tz = &p.time.timezone;
    if tz != "UTC" {
        let zone = format!("usr/share/zoneinfo/{tz}");
        match root.get_str(&zone).map(|e| &e.kind) {
            Some(Kind::File(_)) | Some(Kind::Symlink(_)) => {}
            _ => bail!("key `time.timezone`: `{tz}` is not in Debian's {TZDATA_PACKAGE} (no /{zone})"),
        }
        root.add_symlink("etc/localtime", &format!("/{zone}"))?;
        root.add_file("etc/timezone", 0o644, format!("{tz}\n"))?;
    }
    let servers: Vec<String> = p.time.servers.iter().map(|s| ntp_server(s).map(|(h, _)| h)).collect::<Result<_>>()?;
    root.add_file(
        "etc/kiln/time.conf",
        0o644,
        format!("# written by kiln from the profile's `time` key\nKILN_TIMEZONE={tz}\nKILN_NTP_SERVERS=\"{}\"\n", servers.join(" ")),
    )?;
    if !p.time.servers.is_empty() {
        chrony(p, root)?;
    }
    Ok(())
}

/// chronyd's configuration: the profile's servers only (Debian's pool and conf.d are dropped).
pub fn chrony_conf(servers: &[String]) -> Result<String> {
    let mut c = String::from("# written by kiln from the profile's `time.servers` key\n");
    for s in servers {
        let (host, port) = ntp_server(s)?;
        c.push_str(&format!("server {host}{} iburst\n", port.map(|p| format!(" port {p}")).unwrap_or_default()));
    }
    // Step instead of slewing while the first three updates are off by more than 1 s: a board
    // without a real-time clock starts in 1970 and certificates would not validate for hours.
    c.push_str("makestep 1 3\ndriftfile /var/lib/chrony/chrony.drift\n");
    Ok(c)
}

/// Installs chrony's configuration, its account and an init entry.
fn chrony(p: &Profile, root: &mut Tree) -> Result<()> {
    if !root.contains("usr/sbin/chronyd") {
        bail!("key `time.servers`: NTP needs the `{CHRONY_PACKAGE}` package, but /usr/sbin/chronyd is missing from the root");
    }
    root.add_file("etc/chrony/chrony.conf", 0o644, chrony_conf(&p.time.servers)?)?;
    crate::setup::add_system_account(root, &CHRONY_ACCOUNT)?;
    // -d: stay in the foreground for init and log to the console (source selection, clock steps).
    crate::inittab::append(root, "NTP client (profile key `time.servers`), restarted by init if it exits.", &format!("::respawn:/usr/sbin/chronyd -d -u {}", CHRONY_ACCOUNT.name))
}

pub fn sysctl_conf(map: &BTreeMap<String, SysctlValue>) -> String {
    let mut s = String::from("# written by kiln from the profile's `sysctl` key; applied at boot by boot.d/24-sysctl.sh\n");
    for (k, v) in map {
        s.push_str(&format!("{k} = {}\n", v.0));
    }
    s
}

fn kernel_modules(p: &Profile, root: &mut Tree, modules: &ModuleSet) -> Result<()> {
    let mut text = String::from("# written by kiln from the profile's `kernel.load` key: modules loaded at boot\n");
    for (i, m) in p.kernel.load.iter().enumerate() {
        let n = crate::kmod::normalise(m);
        if !modules.modules.contains_key(&n) && !modules.builtin.contains(&n) {
            bail!("key `kernel.load[{i}]`: kernel {} has no module `{m}`", modules.kver);
        }
        text.push_str(&n);
        text.push('\n');
    }
    root.add_file("etc/kiln/modules-load.conf", 0o644, text)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::parse;
    use crate::setup::file_text;
    use crate::tree::TreePath;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOaKqWL3yl+u4dh7kBSnQmHzBvlhH7j2N2T4b9LFtjrq alice@laptop";

    fn profile(extra: &str) -> Profile {
        parse(&format!("name: demo\narch: [x86_64]\n{extra}")).unwrap()
    }

    fn invalid(extra: &str) -> String {
        match parse(&format!("name: demo\narch: [x86_64]\n{extra}")) {
            Ok(p) => format!("{:#}", validate(&p).expect_err("validation passed")),
            Err(e) => e,
        }
    }

    #[test]
    fn ntp_servers_parse_into_chrony_lines() {
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
        let conf = chrony_conf(&["10.0.2.2:11123".into(), "pool.ntp.org".into()]).unwrap();
        assert!(conf.contains("\nserver 10.0.2.2 port 11123 iburst\nserver pool.ntp.org iburst\nmakestep 1 3\n"), "{conf}");
        let p = profile("time: {servers: [ntp.example]}\n");
        validate(&p).unwrap();
        assert_eq!(packages(&p), vec![DROPBEAR_PACKAGE, CHRONY_PACKAGE]);
        assert!(invalid("users: [{name: _chrony}]\n").contains("system account"));
    }

    #[test]
    fn defaults_keep_old_profiles_valid() {
        let p = profile("");
        validate(&p).unwrap();
        assert!(p.hostname.is_none() && p.users.is_empty() && p.sysctl.is_empty() && p.kernel.load.is_empty());
        assert_eq!((p.ssh.server, p.ssh.root_login, p.ssh.password_auth, p.ssh.port), (SshServer::Dropbear, RootLogin::No, false, 22));
        assert_eq!(p.time.timezone, "UTC");
        assert_eq!(packages(&p), vec![DROPBEAR_PACKAGE]);
        let p = profile("ssh: {server: none}\ntime: {timezone: Europe/Berlin}\n");
        assert_eq!(packages(&p), vec![TZDATA_PACKAGE]);
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
        let p = profile(&format!("users: [{{name: a, password_hash: \"{secret}\"}}]\n"));
        validate(&p).unwrap();
        assert!(!format!("{p:?}").contains("abcdefghijklmnop"));
        assert!(!serde_json::to_string(&p).unwrap().contains("abcdefghijklmnop"));
        let err = invalid("users: [{name: a, password_hash: \"not-a-hash-hunter2\"}]\n");
        assert!(!err.contains("hunter2"), "{err}");
    }

    fn module_set() -> ModuleSet {
        let mut t = Tree::merged_usr(crate::arch::Arch::X86_64);
        let dir = "usr/lib/modules/6.12.0-test";
        t.add_file(&format!("{dir}/modules.builtin"), 0o644, "kernel/drivers/block/loop.ko\n").unwrap();
        ModuleSet::from_tree(&t, "6.12.0-test").unwrap()
    }

    fn base_root() -> Tree {
        let mut t = Tree::merged_usr(crate::arch::Arch::X86_64);
        crate::setup::base_system(&mut t).unwrap();
        t.add_file("etc/inittab", 0o644, "::sysinit:/usr/lib/kiln/boot\n").unwrap();
        t.add_file("usr/sbin/dropbear", 0o755, "elf").unwrap();
        t.add_file("usr/bin/dropbearkey", 0o755, "elf").unwrap();
        t.add_file("usr/share/zoneinfo/Europe/Berlin", 0o644, "TZif").unwrap();
        t
    }

    fn text(t: &Tree, path: &str) -> String {
        file_text(t, path).unwrap()
    }

    fn meta(t: &Tree, path: &str) -> (u32, u32, u32) {
        let m = t.get_str(path).unwrap_or_else(|| panic!("{path} missing")).meta;
        (m.mode, m.uid, m.gid)
    }

    #[test]
    fn users_get_accounts_homes_and_private_keys() {
        let hash = "$6$saltsalt$hashhashhashhash";
        let p = profile(&format!(
            "hostname: edge-1\nssh: {{root_login: prohibit-password}}\nusers:\n  - name: alice\n    ssh_authorized_keys: [\"{KEY}\"]\n    groups: [adm, video]\n  - name: bob\n    password_hash: \"{hash}\"\n    shell: /usr/bin/sh\n  - name: root\n    ssh_authorized_keys: [\"{KEY}\"]\n"
        ));
        validate(&p).unwrap();
        let mut t = base_root();
        render(&p, &mut t, &module_set()).unwrap();
        assert_eq!(text(&t, "etc/hostname"), "edge-1\n");
        assert!(text(&t, "etc/hosts").contains("127.0.1.1\tedge-1"));
        let passwd = text(&t, "etc/passwd");
        assert!(passwd.contains("alice:x:1000:1000::/home/alice:/bin/sh\n"), "{passwd}");
        assert!(passwd.contains("bob:x:1001:1001::/home/bob:/usr/bin/sh\n"), "{passwd}");
        assert!(passwd.starts_with("root:x:0:0:"), "system accounts kept: {passwd}");
        let group = text(&t, "etc/group");
        assert!(group.contains("adm:x:4:alice\n") && group.contains("video:x:44:alice\n") && group.contains("bob:x:1001:\n"), "{group}");
        let shadow = text(&t, "etc/shadow");
        assert!(shadow.contains("alice:*:") && shadow.contains(&format!("bob:{hash}:")) && shadow.contains("root:*:"), "{shadow}");
        assert_eq!(meta(&t, "etc/shadow"), (0o600, 0, 0));
        assert_eq!(meta(&t, "home/alice"), (0o755, 1000, 1000));
        assert_eq!(meta(&t, "home/alice/.ssh"), (0o700, 1000, 1000));
        assert_eq!(meta(&t, "home/alice/.ssh/authorized_keys"), (0o600, 1000, 1000));
        assert_eq!(text(&t, "home/alice/.ssh/authorized_keys"), format!("{KEY}\n"));
        assert_eq!(meta(&t, "home/bob"), (0o755, 1001, 1001));
        assert!(!t.contains("home/bob/.ssh"), "no keys, no .ssh");
        assert_eq!(meta(&t, "root/.ssh/authorized_keys"), (0o600, 0, 0));
    }

    #[test]
    fn unknown_supplementary_group_is_named() {
        let p = profile("users: [{name: alice, groups: [wheel]}]\n");
        let err = render(&p, &mut base_root(), &module_set()).unwrap_err().to_string();
        assert!(err.contains("users[0].groups") && err.contains("wheel"), "{err}");
    }

    #[test]
    fn ssh_policy_becomes_dropbear_flags_and_a_respawn_line() {
        let p = profile("");
        let mut t = base_root();
        render(&p, &mut t, &module_set()).unwrap();
        let inittab = text(&t, "etc/inittab");
        assert!(inittab.starts_with("::sysinit:/usr/lib/kiln/boot\n"), "{inittab}");
        let line = inittab.lines().find(|l| l.starts_with("::respawn:")).expect("respawn line");
        assert_eq!(
            line,
            "::respawn:/usr/sbin/dropbear -F -E -p 22 -w -s -r /etc/dropbear/dropbear_ed25519_host_key -r /etc/dropbear/dropbear_ecdsa_host_key"
        );
        assert!(text(&t, "etc/kiln/ssh.conf").contains("KILN_SSH_SERVER=dropbear\n"));
        assert_eq!(text(&t, "etc/hostname"), "demo\n", "hostname defaults to the profile name");

        let yes = Ssh { root_login: RootLogin::Yes, password_auth: true, port: 2200, ..Ssh::default() };
        assert!(dropbear_command(&yes).starts_with("/usr/sbin/dropbear -F -E -p 2200 -r "));
        let keys_only = Ssh { root_login: RootLogin::ProhibitPassword, ..Ssh::default() };
        assert!(dropbear_command(&keys_only).contains(" -g -s "));

        let p = profile("ssh: {server: none}\n");
        let mut t = base_root();
        render(&p, &mut t, &module_set()).unwrap();
        assert!(!text(&t, "etc/inittab").contains("dropbear"));
        assert!(text(&t, "etc/kiln/ssh.conf").contains("KILN_SSH_SERVER=none"));

        let mut t = base_root();
        t.remove(&TreePath::parse("usr/sbin/dropbear").unwrap());
        let err = render(&profile(""), &mut t, &module_set()).unwrap_err().to_string();
        assert!(err.contains("ssh.server") && err.contains(DROPBEAR_PACKAGE), "{err}");
    }

    #[test]
    fn network_time_sysctl_and_modules_files() {
        let p = profile(
            "network:\n  interfaces:\n    eth0: {address: 10.0.0.5/24, gateway: 10.0.0.1}\n    eth1: {dhcp: true}\n  dns: [10.0.0.1, \"2001:db8::1\"]\ntime: {timezone: Europe/Berlin}\nsysctl:\n  vm.swappiness: 17\n  net.ipv4.ip_forward: true\nkernel: {load: [loop]}\n",
        );
        validate(&p).unwrap();
        let mut t = base_root();
        render(&p, &mut t, &module_set()).unwrap();
        let net = text(&t, "etc/kiln/network.conf");
        assert!(net.contains("static eth0 10.0.0.5/24 10.0.0.1\ndhcp eth1\ndns 10.0.0.1\ndns 2001:db8::1\n"), "{net}");
        assert!(!net.lines().any(|l| l == "dhcp-all"), "{net}");
        assert!(network_conf(&Network::default()).ends_with("dhcp-all\n"));
        assert!(matches!(&t.get_str("etc/localtime").unwrap().kind, Kind::Symlink(s) if s == "/usr/share/zoneinfo/Europe/Berlin"));
        assert_eq!(text(&t, "etc/timezone"), "Europe/Berlin\n");
        assert!(text(&t, "etc/sysctl.d/kiln.conf").ends_with("net.ipv4.ip_forward = 1\nvm.swappiness = 17\n"));
        assert!(text(&t, "etc/kiln/modules-load.conf").ends_with("\nloop\n"));

        let err = render(&profile("time: {timezone: Mars/Olympus}\n"), &mut base_root(), &module_set()).unwrap_err().to_string();
        assert!(err.contains("time.timezone") && err.contains("Mars/Olympus"), "{err}");
        let err = render(&profile("kernel: {load: [nosuchmod]}\n"), &mut base_root(), &module_set()).unwrap_err().to_string();
        assert!(err.contains("kernel.load[0]") && err.contains("nosuchmod"), "{err}");
        let mut t = base_root();
        render(&profile(""), &mut t, &module_set()).unwrap();
        assert!(!t.contains("etc/localtime"), "UTC needs no zone file");
    }
}
