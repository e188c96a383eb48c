//! Loopback tests of `kiln serve`: a real server on 127.0.0.1, real TCP clients.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
    let server = Server::bind(dir, "127.0.0.1:0".parse().unwrap()).unwrap();
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
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "{method} {target} HTTP/1.1\r\nHost: 10.0.2.2:{}\r\n{extra}\r\n", addr.port()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
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
    std::fs::write(nb.join("boot.ipxe"), crate::netboot::script_template("rack", "x86_64", "console=ttyS0")).unwrap();
    std::fs::write(nb.join("inventory"), "# MAC NODE\n52:54:00:00:00:0a node-a\n").unwrap();
    std::fs::write(nb.join("vmlinuz"), (0..=255u8).cycle().take(1000).collect::<Vec<u8>>()).unwrap();
    std::fs::create_dir_all(out.path().join("secrets")).unwrap();
    std::fs::write(out.path().join("secrets/cluster-token"), "K10secret").unwrap();
    std::fs::write(out.path().join(".hidden"), "x").unwrap();
    std::fs::write(outside.path().join("passwd"), "root:x:0:0").unwrap();
    std::os::unix::fs::symlink(outside.path().join("passwd"), out.path().join("x86_64/escape")).unwrap();
    std::os::unix::fs::symlink(outside.path(), out.path().join("x86_64/escapedir")).unwrap();
    std::os::unix::fs::symlink("netboot/vmlinuz", out.path().join("x86_64/inside")).unwrap();
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
    assert_eq!(request(srv.addr, "POST", "/installed?mac=52:54:00:00:00:0a&arch=x86_64&image=abc123", "").status, 200);
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

/// 50 clients download a system image at once; every copy must hash to the file's digest.
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
                let r = request(addr, "GET", "/x86_64/netboot/root.img", "");
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
