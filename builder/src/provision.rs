//! First-boot configuration from the profile: hostname, user accounts with SSH keys, the SSH
//! server and its policy, network, timezone, sysctl settings and kernel modules to load.
//!
//! Everything is decided at build time and written into the root as plain files: account
//! databases, home directories, `/etc/kiln/*.conf` (read by the boot steps in
//! `overlays/appliance/usr/lib/kiln/boot.d/`), `/etc/sysctl.d/kiln.conf` and inittab lines. Only
//! what must be unique per device (SSH host keys) and what depends on the network (DHCP) happens
//! on the device. The keys' types and checks are in `profile::system`.

use std::collections::BTreeMap;

use anyhow::{bail, Result};

use crate::kmod::ModuleSet;
use crate::profile::system::{ntp_server, Network, RootLogin, Ssh, SshServer, SysctlValue, Time, User};
use crate::profile::Profile;
use crate::setup::{insert, owned, AccountFiles, CHRONY_ACCOUNT};
use crate::tree::{Content, Kind, Tree};

/// Debian's package with the dropbear SSH server (`/usr/sbin/dropbear`, `dropbearkey`).
pub const DROPBEAR_PACKAGE: &str = "dropbear-bin";
/// The appliance's wrapper that runs a long-lived program under `kiln_supervise` (exit status and
/// last log lines on the console, backoff): `overlays/appliance/usr/lib/kiln/supervise`.
const SUPERVISE: &str = "/usr/lib/kiln/supervise";
/// Debian's package with the time zone database (`/usr/share/zoneinfo`).
pub const TZDATA_PACKAGE: &str = "tzdata";
/// Debian's NTP client and server (`/usr/sbin/chronyd`, `/usr/bin/chronyc`), for `time.servers`.
pub const CHRONY_PACKAGE: &str = "chrony";
/// The first uid (and user-private gid) given to the profile's users, in order.
pub const FIRST_UID: u32 = 1000;
const DEFAULT_SHELL: &str = "/bin/sh";
/// dropbear's host keys; generated on the device's first boot by `boot.d/60-ssh.sh`.
const HOST_KEYS: [&str; 2] = ["/etc/dropbear/dropbear_ed25519_host_key", "/etc/dropbear/dropbear_ecdsa_host_key"];

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

/// Writes the profile's first-boot configuration into the root. Runs after kiln's appliance
/// overlay (it extends that overlay's `/etc/inittab` and `/etc/hostname`) and before the
/// profile's own overlays, which may still replace any of these files. `modules` is the kernel's
/// module set, to check `kernel.load` against.
pub fn render(p: &Profile, root: &mut Tree, modules: &ModuleSet) -> Result<()> {
    let hostname = p.hostname.clone().unwrap_or_else(|| p.name.clone());
    root.add_file("etc/hostname", 0o644, format!("{hostname}\n"))?;
    if !root.contains("etc/hosts") {
        root.add_file(
            "etc/hosts",
            0o644,
            format!("127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
        )?;
    }
    accounts(&p.users, root)?;
    ssh(&p.ssh, root)?;
    root.add_file("etc/kiln/network.conf", 0o644, network_conf(&p.network))?;
    time(&p.time, root)?;
    root.add_file("etc/sysctl.d/kiln.conf", 0o644, sysctl_conf(&p.sysctl))?;
    kernel_modules(&p.kernel.load, root, modules)?;
    if p.debug.rescue_shell {
        root.add_file(RESCUE_SHELL, 0o644, RESCUE_SHELL_TEXT)?;
    }
    Ok(())
}

/// Present when the profile has `debug.rescue_shell: true`: a failed boot step then leaves a
/// root shell on the console (`usr/lib/kiln/lib.sh`'s `kiln_fatal`; the initramfs has its own
/// copy at `lib/kiln/rescue-shell`, taken from the root). A file rather than a kernel command-line word: the command
/// line can be edited at the boot loader or sent by whoever answers a network boot, and the
/// setting must follow the image. It lives under `/usr`, in the read-only squashfs, not in
/// `/etc`, whose writable layer persists on the data partition and could outlive the image.
pub const RESCUE_SHELL: &str = "usr/lib/kiln/rescue-shell";
const RESCUE_SHELL_TEXT: &str =
    "# debug.rescue_shell: true in the profile: a failed boot step leaves an unauthenticated root shell on the console.\n";

/// passwd/group/shadow additions, homes and authorized_keys.
fn accounts(users: &[User], root: &mut Tree) -> Result<()> {
    let AccountFiles { mut passwd, mut group, mut shadow } = AccountFiles::read(root)?;
    let mut members: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut uid = FIRST_UID;
    for (i, u) in users.iter().enumerate() {
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
    // Public keys, so readable (dropbear, like sshd's StrictModes, refuses only a writable file):
    // an owner-only file would count as a secret and be kept out of the netboot root.
    insert(root, &format!("{home}/.ssh/authorized_keys"), owned(0o644, uid, gid), Kind::File(Content::bytes(text)))
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

fn ssh(s: &Ssh, root: &mut Tree) -> Result<()> {
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
    // Respawn entries start after every sysinit step (the host keys exist by then). Its log
    // (logins, refused attempts) goes to /var/log/dropbear.log, not the console.
    crate::inittab::append(
        root,
        "SSH server (profile key `ssh`), supervised: an exit is reported on the console, restarts back off.",
        &format!("::respawn:{SUPERVISE} dropbear {}", dropbear_command(s)),
    )?;
    Ok(())
}

/// One line per rule for `boot.d/40-network.sh`: `dhcp-all`, `dhcp IF`, `static IF ADDR GW|-`, `dns IP`.
pub fn network_conf(n: &Network) -> String {
    let mut s =
        String::from("# written by kiln from the profile's `network` key: dhcp-all | dhcp IF | static IF ADDRESS GATEWAY|- | dns IP\n");
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

fn time(t: &Time, root: &mut Tree) -> Result<()> {
    let tz = &t.timezone;
    if tz != "UTC" {
        let zone = format!("usr/share/zoneinfo/{tz}");
        match root.get_str(&zone).map(|e| &e.kind) {
            Some(Kind::File(_)) | Some(Kind::Symlink(_)) => {}
            _ => bail!("key `time.timezone`: `{tz}` is not in Debian's {TZDATA_PACKAGE} (no /{zone})"),
        }
        root.add_symlink("etc/localtime", &format!("/{zone}"))?;
        root.add_file("etc/timezone", 0o644, format!("{tz}\n"))?;
    }
    let servers: Vec<String> = t.servers.iter().map(|s| ntp_server(s).map(|(h, _)| h)).collect::<Result<_>>()?;
    root.add_file(
        "etc/kiln/time.conf",
        0o644,
        format!("# written by kiln from the profile's `time` key\nKILN_TIMEZONE={tz}\nKILN_NTP_SERVERS=\"{}\"\n", servers.join(" ")),
    )?;
    if !t.servers.is_empty() {
        chrony(&t.servers, root)?;
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
fn chrony(servers: &[String], root: &mut Tree) -> Result<()> {
    if !root.contains("usr/sbin/chronyd") {
        bail!("key `time.servers`: NTP needs the `{CHRONY_PACKAGE}` package, but /usr/sbin/chronyd is missing from the root");
    }
    root.add_file("etc/chrony/chrony.conf", 0o644, chrony_conf(servers)?)?;
    crate::setup::add_system_account(root, &CHRONY_ACCOUNT)?;
    // -d: stay in the foreground and log to stdout, which `supervise --console` copies to the
    // console (source selection, clock steps) and to /var/log/chronyd.log.
    crate::inittab::append(
        root,
        "NTP client (profile key `time.servers`), supervised: an exit is reported on the console, restarts back off.",
        &format!("::respawn:{SUPERVISE} --console chronyd /usr/sbin/chronyd -d -u {}", CHRONY_ACCOUNT.name),
    )
}

pub fn sysctl_conf(map: &BTreeMap<String, SysctlValue>) -> String {
    let mut s = String::from("# written by kiln from the profile's `sysctl` key; applied at boot by boot.d/24-sysctl.sh\n");
    for (k, v) in map {
        s.push_str(&format!("{k} = {}\n", v.0));
    }
    s
}

/// The profile's `kernel.load`, each module checked against the kernel, into the boot-time list
/// (created here, empty or not: provision runs first).
fn kernel_modules(load: &[String], root: &mut Tree, modules: &ModuleSet) -> Result<()> {
    let mut names = Vec::new();
    for (i, m) in load.iter().enumerate() {
        let n = crate::kmod::normalise(m);
        if !modules.has(&n) {
            bail!("key `kernel.load[{i}]`: kernel {} has no module `{m}`", modules.kver);
        }
        names.push(n);
    }
    crate::kmod::load_at_boot(root, &names)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::system::validate;
    use crate::profile::test_profile;
    use crate::setup::file_text;
    use crate::tree::TreePath;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOaKqWL3yl+u4dh7kBSnQmHzBvlhH7j2N2T4b9LFtjrq alice@laptop";

    #[test]
    fn ntp_servers_become_chrony_lines_and_a_package() {
        let conf = chrony_conf(&["10.0.2.2:11123".into(), "pool.ntp.org".into()]).unwrap();
        assert!(conf.contains("\nserver 10.0.2.2 port 11123 iburst\nserver pool.ntp.org iburst\nmakestep 1 3\n"), "{conf}");
        let p = test_profile("time: {servers: [ntp.example]}\n");
        assert_eq!(packages(&p), vec![DROPBEAR_PACKAGE, CHRONY_PACKAGE]);
    }

    #[test]
    fn default_packages() {
        assert_eq!(packages(&test_profile("")), vec![DROPBEAR_PACKAGE]);
        let p = test_profile("ssh: {server: none}\ntime: {timezone: Europe/Berlin}\n");
        assert_eq!(packages(&p), vec![TZDATA_PACKAGE]);
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
        let p = test_profile(&format!(
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
        assert_eq!(meta(&t, "home/alice/.ssh/authorized_keys"), (0o644, 1000, 1000));
        assert_eq!(text(&t, "home/alice/.ssh/authorized_keys"), format!("{KEY}\n"));
        assert_eq!(meta(&t, "home/bob"), (0o755, 1001, 1001));
        assert!(!t.contains("home/bob/.ssh"), "no keys, no .ssh");
        assert_eq!(meta(&t, "root/.ssh/authorized_keys"), (0o644, 0, 0));
    }

    #[test]
    fn the_rescue_shell_marker_is_written_only_when_asked_for() {
        let mut root = base_root();
        render(&test_profile(""), &mut root, &module_set()).unwrap();
        assert!(!root.contains(RESCUE_SHELL), "no console shell by default");
        let mut root = base_root();
        render(&test_profile("debug: {rescue_shell: true}\n"), &mut root, &module_set()).unwrap();
        assert!(root.contains(RESCUE_SHELL));
    }

    #[test]
    fn unknown_supplementary_group_is_named() {
        let p = test_profile("users: [{name: alice, groups: [wheel]}]\n");
        let err = render(&p, &mut base_root(), &module_set()).unwrap_err().to_string();
        assert!(err.contains("users[0].groups") && err.contains("wheel"), "{err}");
    }

    #[test]
    fn ssh_policy_becomes_dropbear_flags_and_a_respawn_line() {
        let p = test_profile("");
        let mut t = base_root();
        render(&p, &mut t, &module_set()).unwrap();
        let inittab = text(&t, "etc/inittab");
        assert!(inittab.starts_with("::sysinit:/usr/lib/kiln/boot\n"), "{inittab}");
        let line = inittab.lines().find(|l| l.starts_with("::respawn:")).expect("respawn line");
        assert_eq!(
            line,
            "::respawn:/usr/lib/kiln/supervise dropbear /usr/sbin/dropbear -F -E -p 22 -w -s -r /etc/dropbear/dropbear_ed25519_host_key -r /etc/dropbear/dropbear_ecdsa_host_key"
        );
        assert!(text(&t, "etc/kiln/ssh.conf").contains("KILN_SSH_SERVER=dropbear\n"));
        assert_eq!(text(&t, "etc/hostname"), "d\n", "hostname defaults to the profile name");

        let yes = Ssh { root_login: RootLogin::Yes, password_auth: true, port: 2200, ..Ssh::default() };
        assert!(dropbear_command(&yes).starts_with("/usr/sbin/dropbear -F -E -p 2200 -r "));
        let keys_only = Ssh { root_login: RootLogin::ProhibitPassword, ..Ssh::default() };
        assert!(dropbear_command(&keys_only).contains(" -g -s "));

        let p = test_profile("ssh: {server: none}\n");
        let mut t = base_root();
        render(&p, &mut t, &module_set()).unwrap();
        assert!(!text(&t, "etc/inittab").contains("dropbear"));
        assert!(text(&t, "etc/kiln/ssh.conf").contains("KILN_SSH_SERVER=none"));

        let mut t = base_root();
        t.remove(&TreePath::parse("usr/sbin/dropbear").unwrap());
        let err = render(&test_profile(""), &mut t, &module_set()).unwrap_err().to_string();
        assert!(err.contains("ssh.server") && err.contains(DROPBEAR_PACKAGE), "{err}");
    }

    #[test]
    fn network_time_sysctl_and_modules_files() {
        let p = test_profile(
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
        assert_eq!(
            text(&t, crate::kmod::BOOT_MODULES),
            "# written by kiln from the profile's `kernel.load` key: modules loaded at boot\nloop\n"
        );

        let err = render(&test_profile("time: {timezone: Mars/Olympus}\n"), &mut base_root(), &module_set()).unwrap_err().to_string();
        assert!(err.contains("time.timezone") && err.contains("Mars/Olympus"), "{err}");
        let err = render(&test_profile("kernel: {load: [nosuchmod]}\n"), &mut base_root(), &module_set()).unwrap_err().to_string();
        assert!(err.contains("kernel.load[0]") && err.contains("nosuchmod"), "{err}");
        let mut t = base_root();
        render(&test_profile(""), &mut t, &module_set()).unwrap();
        assert!(!t.contains("etc/localtime"), "UTC needs no zone file");
    }
}
