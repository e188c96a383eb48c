//! `kiln serve`: an HTTP/1.1 server for build outputs, for machines that boot from the network.
//!
//! It serves the files under one build output directory (GET, HEAD, single byte ranges; nothing
//! outside the directory, nothing under `secrets/`, no dot files), the update bundles as
//! `/updates/[<channel>/]<arch>/<file>` (module `updates`), answers `/boot.ipxe` per machine (module
//! `ipxe`) and records finished installs (`POST /installed`, module `state`). With `--rollout` it
//! also hands the bundles to the inventory's nodes in waves (`/rollout/*`, module `rollout`).
//! One thread per connection, one request per connection; one log line per request. Clients
//! get a bounded number of connections and a deadline for their request head (module `limits`).

pub mod grants;
pub mod http;
pub mod ipxe;
pub mod limits;
pub mod rollout;
pub mod state;
pub mod updates;

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tracing::{debug, info, warn};

use self::grants::Grants;
use self::http::{BadRequest, RangeAnswer, Request};
use self::limits::{Limits, Slot, Slots};
use self::rollout::Rollout;
use self::state::{Installed, Store};
pub use self::updates::{update_path, Channel, UPDATES};
use crate::netboot;

/// How often the accept loop looks at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// How long a stop waits for downloads in flight.
const DRAIN: Duration = Duration::from_secs(5);
/// Refused connections and accept errors are logged at most this often (a flood is one line).
const LOG_EVERY: Duration = Duration::from_secs(1);

/// The time as the server sees it; tests replace it to drive the rollout's timeouts.
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

/// A bound server, not yet running.
pub struct Server {
    listener: TcpListener,
    root: PathBuf,
    store: Arc<Store>,
    limits: Limits,
    rollout: Option<Rollout>,
    channels: Vec<Channel>,
    clock: Clock,
}

impl Server {
    /// Binds `addr` to serve `dir` (a `kiln build` output directory).
    pub fn bind(dir: &Path, addr: SocketAddr) -> Result<Server> {
        let root = dir.canonicalize().with_context(|| format!("serving {}: no such directory", dir.display()))?;
        anyhow::ensure!(root.is_dir(), "serving {}: not a directory", dir.display());
        let listener = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
        listener.set_nonblocking(true)?;
        let store = Arc::new(Store::new(&root));
        Ok(Server { listener, root, store, limits: Limits::default(), rollout: None, channels: Vec::new(), clock: Arc::new(Instant::now) })
    }

    /// Runs `rollout` too (`kiln serve --rollout`): the `/rollout/*` paths answer only then.
    pub fn with_rollout(mut self, rollout: Rollout) -> Server {
        self.rollout = Some(rollout);
        self
    }

    /// Serves other output directories' bundles too, each at `/updates/<channel>/<arch>/`.
    pub fn with_channels(mut self, channels: Vec<Channel>) -> Server {
        self.channels = channels;
        self
    }

    /// Replaces the clock (tests).
    pub fn with_clock(mut self, clock: Clock) -> Server {
        self.clock = clock;
        self
    }

    /// Replaces the default connection limits (tests use a shorter head deadline).
    pub fn with_limits(mut self, limits: Limits) -> Server {
        self.limits = limits;
        self
    }

    /// The architectures DIR has netboot output for (`<arch>/netboot/boot.ipxe`); `kiln serve`
    /// warns when there are none, since booting machines would get nothing.
    pub fn netboot_archs(dir: &Path) -> Vec<crate::arch::Arch> {
        crate::arch::Arch::ALL.into_iter().filter(|a| dir.join(a.name()).join(netboot::DIR).join(netboot::SCRIPT).is_file()).collect()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Serves until `stop` becomes true, then waits (a few seconds at most) for requests in
    /// flight to finish. The accept loop never waits on a client: a connection over a limit, or
    /// one no thread can be started for, gets a 503 written without blocking (or is dropped).
    pub fn run(self, stop: &AtomicBool) -> Result<()> {
        let slots = Slots::new(self.limits);
        let ctx = Arc::new(Shared {
            root: self.root.clone(),
            store: self.store.clone(),
            limits: self.limits,
            grants: Grants::default(),
            rollout: self.rollout.map(Mutex::new),
            channels: self.channels,
            clock: self.clock.clone(),
        });
        let mut refusals = Throttled::default();
        let mut accept_errors = Throttled::default();
        while !stop.load(Ordering::SeqCst) {
            // A node told to update that went silent halts the rollout even if no one asks.
            if let Some(r) = &ctx.rollout {
                lock(r).tick((ctx.clock)());
            }
            match self.listener.accept() {
                Ok((stream, peer)) => match slots.acquire(peer.ip()) {
                    Ok(slot) => spawn_connection(&ctx, stream, peer, slot),
                    Err(why) => {
                        refuse(&stream, why.why());
                        refusals.log(|more| info!("{peer} - - 503 0 ({}{more})", why.why()));
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted => {
                    std::thread::sleep(POLL)
                }
                Err(e) => {
                    // Out of file descriptors or memory: keep serving the connections open, retry soon.
                    accept_errors.log(|more| warn!("accepting a connection: {e}{more}"));
                    std::thread::sleep(POLL);
                }
            }
        }
        let deadline = Instant::now() + DRAIN;
        while slots.open() > 0 && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        let left = slots.open();
        info!("stopped{}", if left > 0 { format!(" ({left} downloads cut off)") } else { String::new() });
        Ok(())
    }
}

/// Starts the thread for one connection. The stream goes to the thread only once it runs, so a
/// failed start (no memory, thread limit) can still be answered 503; the slot is freed either way.
fn spawn_connection(ctx: &Arc<Shared>, stream: TcpStream, peer: SocketAddr, slot: Slot) {
    let (tx, rx) = mpsc::sync_channel::<TcpStream>(1);
    let ctx = ctx.clone();
    let started = std::thread::Builder::new().name(format!("serve {peer}")).spawn(move || {
        let _slot = slot;
        if let Ok(stream) = rx.recv() {
            handle(&ctx, stream, peer);
        }
    });
    match started {
        Ok(_) => {
            let _ = tx.send(stream);
        }
        Err(e) => {
            refuse(&stream, "server busy");
            warn!("{peer} - - 503 0 (cannot start a thread for the connection: {e})");
        }
    }
}

/// Answers 503 without ever blocking the accept loop: one non-blocking write, then close.
fn refuse(stream: &TcpStream, why: &str) {
    let body = format!("{why}; retry\n");
    let msg = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nRetry-After: 2\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if stream.set_nonblocking(true).is_ok() {
        let mut s = stream;
        let _ = s.write(msg.as_bytes());
    }
}

/// A log line at most every [`LOG_EVERY`]; the next one says how many were left out.
#[derive(Default)]
struct Throttled {
    last: Option<Instant>,
    skipped: u64,
}

impl Throttled {
    fn log(&mut self, line: impl FnOnce(&str)) {
        if self.last.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            self.skipped += 1;
            return;
        }
        let more = if self.skipped > 0 { format!("; {} more like it not logged", self.skipped) } else { String::new() };
        line(&more);
        self.last = Some(Instant::now());
        self.skipped = 0;
    }
}

/// What every connection thread shares.
pub(super) struct Shared {
    root: PathBuf,
    store: Arc<Store>,
    limits: Limits,
    grants: Grants,
    rollout: Option<Mutex<Rollout>>,
    channels: Vec<Channel>,
    clock: Clock,
}

/// The rollout's lock; a thread that panicked holding it left consistent state (every change
/// is made whole before anything can panic), so a poisoned lock is taken over.
fn lock(r: &Mutex<Rollout>) -> std::sync::MutexGuard<'_, Rollout> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

/// The outcome of one request, for the log line.
pub(super) struct Served {
    status: u16,
    bytes: u64,
}

fn handle(ctx: &Shared, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(ctx.limits.io_timeout));
    let head_deadline = ctx.limits.head_deadline;
    let mut reader = BufReader::new(Deadline { stream: &stream, until: Instant::now() + head_deadline });
    let req = match http::read_request(&mut reader) {
        Ok(r) => r,
        Err(e) => {
            let Some((status, reason)) = e.status() else { return };
            let why = match e {
                BadRequest::TimedOut => format!("no complete request head within {} s", head_deadline.as_secs_f32()),
                e => e.to_string(),
            };
            let _ = respond_simple(&stream, status, reason, &format!("{why}\n"), false);
            info!("{peer} - - {status} 0 ({why})");
            return;
        }
    };
    drop(reader);
    let served = route(ctx, &req, &stream, peer).unwrap_or_else(|e| {
        // The client went away mid-download, or the disk failed: the log says which.
        warn!("{peer} {} {}: {e:#}", req.method, req.path);
        Served { status: 500, bytes: 0 }
    });
    // Only the MAC, arch, node and state of the query are logged: they identify the machine and
    // are no secret (a report's `sig` and `nonce` are never logged).
    let mut what = req.path.clone();
    for key in ["mac", "arch", "node", "state"] {
        if let Some(v) = req.param(key) {
            what.push_str(&format!(" {key}={}", v.escape_debug()));
        }
    }
    if let Some(h) = req.host.as_deref().filter(|h| !ipxe::host_is_safe(h)) {
        what.push_str(&format!(" host={}", h.escape_debug()));
    }
    // The nodes' rollout polls (two requests per node per poll) would drown the log: their
    // transitions and refusals have lines of their own.
    if served.status == 200 && req.path.starts_with(ROLLOUT) {
        debug!("{peer} {} {} {} {}", req.method, what.escape_debug(), served.status, served.bytes);
    } else {
        info!("{peer} {} {} {} {}", req.method, what.escape_debug(), served.status, served.bytes);
    }
}

/// Reads a connection until a fixed point in time: each read may wait only for what is left,
/// so a client trickling one byte at a time still runs out (the deadline is for the whole head).
struct Deadline<'s> {
    stream: &'s TcpStream,
    until: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut s = self.stream;
        s.read(buf)
    }
}

fn route(ctx: &Shared, req: &Request, stream: &TcpStream, peer: SocketAddr) -> Result<Served> {
    let head = req.method == "HEAD";
    match (req.method.as_str(), req.path.as_str()) {
        ("GET" | "HEAD", "/boot.ipxe") => boot_script(ctx, req, stream, head),
        ("POST", "/installed") => installed(ctx, req, stream, peer),
        ("GET", "/secrets") => node_secrets(ctx, req, stream, peer),
        ("GET" | "HEAD", p) if p.starts_with(UPDATES) => updates::serve(ctx, req, stream, head),
        ("GET", p) if p.starts_with(ROLLOUT) => rollout_request(ctx, req, stream, peer),
        ("GET" | "HEAD", _) => match resolve(&ctx.root, &req.path) {
            Some(path) => send_file(&path, req, stream, head),
            None => respond_simple(stream, 404, "Not Found", "not found\n", head),
        },
        _ => respond_simple(stream, 405, "Method Not Allowed", "only GET and HEAD (and POST /installed)\n", head),
    }
}

/// The files a machine may fetch, relative to the served directory: the netboot files an
/// install needs, each architecture's manifest and the checksums. Nothing else is served, so
/// `disk.img`, `secrets/`, the state file or a stray file an operator left there never are.
fn servable(rel: &Path) -> bool {
    let parts: Vec<&str> = rel.iter().filter_map(|p| p.to_str()).collect();
    let arch = |a: &str| crate::arch::Arch::ALL.iter().any(|x| x.name() == a);
    match parts.as_slice() {
        ["SHA256SUMS"] => true,
        [a, "manifest.json"] => arch(a),
        [a, dir, file] => arch(a) && *dir == netboot::DIR && netboot::SERVED.contains(file),
        _ => false,
    }
}

/// The file a request path names inside `root`, or `None` (answered 404) when it does not exist,
/// is not a regular file, has a `..` or dot-file component, or is not one of the files machines
/// may fetch ([`servable`]) once symlinks are resolved: the check runs on the real path, so a
/// symlink into `secrets/` or out of the directory is refused like the path itself.
pub fn resolve(root: &Path, request_path: &str) -> Option<PathBuf> {
    resolve_with(root, request_path, servable)
}

/// [`resolve`] with the rule of what may be served.
pub(super) fn resolve_with(root: &Path, request_path: &str, servable: fn(&Path) -> bool) -> Option<PathBuf> {
    let rel = request_path.strip_prefix('/')?;
    let mut path = root.to_path_buf();
    for part in rel.split('/') {
        let c = Path::new(part).components().collect::<Vec<_>>();
        // One normal component per segment: no `..`, no `.`, no empty segment, no root.
        if c.len() != 1 || !matches!(c[0], Component::Normal(_)) || part.starts_with('.') || part.contains('\\') {
            return None;
        }
        path.push(part);
    }
    let real = path.canonicalize().ok()?;
    let inside = real.strip_prefix(root).ok()?;
    (servable(inside) && real.is_file()).then_some(real)
}

pub(super) fn send_file(path: &Path, req: &Request, mut stream: &TcpStream, head: bool) -> Result<Served> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata()?.len();
    let (status, reason, start, count) = match http::resolve_range(req.range.as_deref(), len) {
        RangeAnswer::Whole => (200, "OK", 0, len),
        RangeAnswer::Part { start, end } => (206, "Partial Content", start, end - start + 1),
        RangeAnswer::Unsatisfiable => {
            let h = format!(
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(h.as_bytes())?;
            return Ok(Served { status: 416, bytes: 0 });
        }
    };
    let mut h = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {}\r\nContent-Length: {count}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n",
        content_type(path)
    );
    if status == 206 {
        h.push_str(&format!("Content-Range: bytes {start}-{}/{len}\r\n", start + count - 1));
    }
    h.push_str("\r\n");
    stream.write_all(h.as_bytes())?;
    if head {
        return Ok(Served { status, bytes: 0 });
    }
    file.seek(SeekFrom::Start(start))?;
    let sent = std::io::copy(&mut file.take(count), &mut stream).context("sending the file")?;
    Ok(Served { status, bytes: sent })
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("ipxe") => "text/plain; charset=utf-8",
        Some("json") => "application/json",
        _ if path.file_name().is_some_and(|n| n == "SHA256SUMS" || n == netboot::PLAN || n == netboot::INVENTORY) => {
            "text/plain; charset=utf-8"
        }
        _ => "application/octet-stream",
    }
}

/// `/boot.ipxe[?mac=M&arch=A]`.
fn boot_script(ctx: &Shared, req: &Request, stream: &TcpStream, head: bool) -> Result<Served> {
    // iPXE sends Host; the URLs in the script point back at the address the machine reached.
    // Only host name or address characters get into the script (the log line has the value).
    let Some(host) = req.host.as_deref().filter(|h| ipxe::host_is_safe(h)) else {
        return respond_simple(
            stream,
            400,
            "Bad Request",
            "boot.ipxe needs a Host header of a host name or address, with an optional port\n",
            head,
        );
    };
    let origin = format!("http://{host}");
    let Some(raw_mac) = req.param("mac") else {
        return respond_text(stream, &ipxe::chain_script(&origin), head);
    };
    // A bad value is named, never echoed: the script is read by iPXE, not only by a person.
    let Some(mac) = state::normalise_mac(raw_mac) else {
        return respond_text(stream, &ipxe::refusal_script("the mac= value is not a MAC address (XX:XX:XX:XX:XX:XX)"), head);
    };
    let buildarch = req.param("arch").unwrap_or("x86_64");
    let Some(arch) = ipxe::arch_from_buildarch(buildarch) else {
        return respond_text(
            stream,
            &ipxe::refusal_script("no kiln image for the arch= value (x86_64, i386, arm64, aarch64, riscv64)"),
            head,
        );
    };
    if ctx.store.is_installed(&mac)? {
        return respond_text(stream, &ipxe::local_disk_script(&mac), head);
    }
    let dir = ctx.root.join(arch.name()).join(netboot::DIR);
    let template = match std::fs::read_to_string(dir.join(netboot::SCRIPT)) {
        Ok(t) => t,
        Err(_) => {
            let why = format!(
                "this build has no {arch} netboot output ({arch}/{}/{}); build with --format netboot",
                netboot::DIR,
                netboot::SCRIPT
            );
            return respond_text(stream, &ipxe::refusal_script(&why), head);
        }
    };
    let inventory = std::fs::read_to_string(dir.join(netboot::INVENTORY)).unwrap_or_default();
    let node = ipxe::node_for(&inventory, &mac);
    // Only inventory nodes have secrets; their bundle's digest goes on the command line, so the
    // installer takes only the bundle this script meant.
    let bundle = node.as_ref().map(|n| crate::secret_files::bundle_dir(&ctx.root, arch).join(crate::secret_files::bundle_file(n)));
    let bundle = bundle.filter(|b| b.is_file());
    let mut cred_arg = String::new();
    if !head {
        let bundle_sha256 = bundle.as_deref().map(crate::digest::sha256_file).transpose()?;
        let credential = ctx.grants.issue(&mac, node.clone(), bundle)?;
        cred_arg = format!("kiln.cred={credential}");
        if let Some(sha) = bundle_sha256 {
            cred_arg.push_str(&format!(" kiln.secrets={sha}"));
        }
    }
    let base = format!("{origin}/{}/{}/", arch.name(), netboot::DIR);
    respond_text(stream, &ipxe::install_script(&template, &base, node.as_deref(), &cred_arg), head)
}

/// `GET /secrets?mac=M&cred=C`: the node's secrets bundle, once per install credential.
fn node_secrets(ctx: &Shared, req: &Request, stream: &TcpStream, peer: SocketAddr) -> Result<Served> {
    let (Some(mac), Some(cred)) = (req.param("mac").and_then(state::normalise_mac), req.param("cred")) else {
        return respond_simple(stream, 400, "Bad Request", "GET /secrets needs mac= and cred=\n", false);
    };
    match ctx.grants.take_secrets(&mac, cred) {
        Ok(grant) => {
            let (node, path) = (grant.node.unwrap_or_default(), grant.secrets.expect("take_secrets checks it"));
            let served = send_file(&path, req, stream, false)?;
            info!(
                "{peer}: delivered the secrets of node {node} to {mac} ({} bytes); its install credential allows no second fetch",
                served.bytes
            );
            Ok(served)
        }
        Err(why) => {
            warn!("{peer}: refused the secrets of {mac}: {why}");
            respond_simple(stream, 403, "Forbidden", &format!("{why}\n"), false)
        }
    }
}

/// `POST /installed?mac=M[&arch=A][&image=I]`: the installer's report at the end of an install.
fn installed(ctx: &Shared, req: &Request, stream: &TcpStream, peer: SocketAddr) -> Result<Served> {
    let Some(mac) = req.param("mac").and_then(state::normalise_mac) else {
        return respond_simple(stream, 400, "Bad Request", "POST /installed needs mac=XX:XX:XX:XX:XX:XX\n", false);
    };
    // Only the install this server handed a script to may report, once.
    if let Err(why) = ctx.grants.complete(&mac, req.param("cred").unwrap_or_default()) {
        warn!("{peer}: refused an install report for {mac}: {why}");
        return respond_simple(stream, 403, "Forbidden", &format!("{why}\n"), false);
    }
    let arch = req.param("arch").and_then(ipxe::arch_from_buildarch);
    let node = arch.and_then(|a| {
        let inv = std::fs::read_to_string(ctx.root.join(a.name()).join(netboot::DIR).join(netboot::INVENTORY)).ok()?;
        ipxe::node_for(&inv, &mac)
    });
    let record = Installed {
        installed_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        arch: arch.map(|a| a.name().to_string()),
        node,
        image: req.param("image").filter(|i| i.len() <= 64 && i.bytes().all(|b| b.is_ascii_alphanumeric())).map(str::to_string),
    };
    let recorded = ctx.store.update(|s| {
        if s.installed.len() >= state::MAX_INSTALLED && !s.installed.contains_key(&mac) {
            return false;
        }
        s.installed.insert(mac.clone(), record);
        true
    })?;
    if !recorded {
        warn!("{peer}: {mac} finished an install, but the install state holds {} machines already: not recorded", state::MAX_INSTALLED);
        return respond_simple(stream, 507, "Insufficient Storage", "the install state is full\n", false);
    }
    info!("{peer}: {mac} reported a finished install; its next network boot goes to its disk");
    respond_simple(stream, 200, "OK", "recorded\n", false)
}

/// Where the rollout answers: `/rollout/challenge`, `/rollout/report`, `/rollout/status`.
pub const ROLLOUT: &str = "/rollout/";

/// The `/rollout/*` requests; 404 when the server runs without `--rollout`.
fn rollout_request(ctx: &Shared, req: &Request, stream: &TcpStream, peer: SocketAddr) -> Result<Served> {
    let Some(rollout) = &ctx.rollout else {
        return respond_simple(stream, 404, "Not Found", "not found (this server runs no rollout: `kiln serve DIR --rollout`)\n", false);
    };
    let now = (ctx.clock)();
    match req.path.as_str() {
        "/rollout/challenge" => {
            let Some(node) = req.param("node").filter(|n| rollout::plain_field(n)) else {
                return respond_simple(stream, 400, "Bad Request", "GET /rollout/challenge needs node=NAME\n", false);
            };
            let nonce = grants::random_hex(32)?;
            match lock(rollout).challenge(node, nonce, now) {
                Some(nonce) => respond_text(stream, &format!("{nonce}\n"), false),
                None => {
                    respond_simple(stream, 404, "Not Found", &format!("node {node} is not in the inventory of any update bundle\n"), false)
                }
            }
        }
        "/rollout/report" => {
            let field = |k: &str| req.param(k).filter(|v| rollout::plain_field(v));
            let (Some(node), Some(arch), Some(version), Some(state), Some(nonce)) =
                (field("node"), field("arch"), field("version"), field("state"), field("nonce"))
            else {
                return respond_simple(
                    stream,
                    400,
                    "Bad Request",
                    "GET /rollout/report needs node=, arch=, version=, state=, nonce= and sig= (each one printable word)\n",
                    false,
                );
            };
            let Some(state) = rollout::ReportState::parse(state) else {
                return respond_simple(stream, 400, "Bad Request", "state= is one of ready, rolled-back, failed\n", false);
            };
            let report = rollout::Report { node, arch, version, state, nonce, sig: req.param("sig").unwrap_or_default() };
            let mut r = lock(rollout);
            match r.report(&report, now) {
                Ok(answer) => {
                    let poll = r.settings().poll;
                    drop(r);
                    respond_text(stream, &answer.body(poll), false)
                }
                Err(why) => {
                    drop(r);
                    warn!("refused rollout report from {peer} for {}: {why}", node.escape_debug());
                    respond_simple(stream, 403, "Forbidden", &format!("{why}\n"), false)
                }
            }
        }
        "/rollout/status" => {
            let mut r = lock(rollout);
            r.tick(now);
            let mut body = serde_json::to_string_pretty(&r.status(now)).expect("status serialises");
            drop(r);
            body.push('\n');
            respond_with(stream, 200, "OK", "application/json", &body, false)
        }
        _ => respond_simple(stream, 404, "Not Found", "not found (/rollout/challenge, /rollout/report, /rollout/status)\n", false),
    }
}

fn respond_text(stream: &TcpStream, body: &str, head: bool) -> Result<Served> {
    respond_simple(stream, 200, "OK", body, head)
}

pub(super) fn respond_simple(stream: &TcpStream, status: u16, reason: &str, body: &str, head: bool) -> Result<Served> {
    respond_with(stream, status, reason, "text/plain; charset=utf-8", body, head)
}

fn respond_with(mut stream: &TcpStream, status: u16, reason: &str, content_type: &str, body: &str, head: bool) -> Result<Served> {
    let h = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(h.as_bytes())?;
    if !head {
        stream.write_all(body.as_bytes())?;
    }
    Ok(Served { status, bytes: if head { 0 } else { body.len() as u64 } })
}

/// Removes machines from the install state so their next network boot installs again; returns
/// the MACs that were not recorded.
pub fn reinstall(dir: &Path, macs: &[String]) -> Result<Vec<String>> {
    let store = Store::new(dir);
    let mut missing = Vec::new();
    let normal: Vec<String> = macs
        .iter()
        .map(|m| {
            state::normalise_mac(m)
                .ok_or_else(|| crate::error::UsageError(format!("--reinstall {m}: not a MAC address (XX:XX:XX:XX:XX:XX)")).into())
        })
        .collect::<Result<_>>()?;
    store.update(|s| {
        for m in &normal {
            if s.installed.remove(m).is_none() {
                missing.push(m.clone());
            }
        }
    })?;
    Ok(missing)
}

/// The DHCP settings to print at start: what a site's DHCP server (or a proxy-DHCP) must hand out.
pub fn dhcp_settings(url_host: &str) -> String {
    format!(
        "DHCP settings for machines that boot from this server:\n\
         \x20 iPXE clients (DHCP user class `iPXE`, option 175): filename/boot URL  http://{url_host}/boot.ipxe\n\
         \x20 PXE ROMs without HTTP: TFTP-serve Debian's `ipxe` package (/usr/lib/ipxe) and hand out by client architecture\n\
         \x20   option 93 = 0 (BIOS):        undionly.kpxe\n\
         \x20   option 93 = 7 (x86_64 UEFI): ipxe.efi (or snponly.efi)\n\
         \x20   option 93 = 11 (arm64 UEFI): aarch64/netboot/ipxe.efi of the build\n\
         \x20 then the boot URL above when the client is iPXE. `--dnsmasq FILE` writes this as a dnsmasq proxy-DHCP/TFTP snippet.\n"
    )
}

/// A dnsmasq configuration snippet: proxy-DHCP (the site's DHCP server keeps handing out
/// addresses; dnsmasq only adds the boot information) plus TFTP for Debian's iPXE binaries;
/// iPXE clients are sent to `http://url_host/boot.ipxe`.
pub fn dnsmasq_snippet(url_host: &str) -> String {
    format!(
        "# kiln serve: proxy-DHCP and TFTP for network-booting kiln machines.\n\
         # Set the subnet of the rack network in dhcp-range; needs Debian's `ipxe` package for TFTP.\n\
         port=0\n\
         dhcp-range=192.0.2.0,proxy\n\
         enable-tftp\n\
         tftp-root=/usr/lib/ipxe\n\
         # iPXE identifies itself with user class iPXE (and option 175).\n\
         dhcp-userclass=set:ipxe,iPXE\n\
         dhcp-match=set:ipxe,175\n\
         # First stage: plain PXE ROMs load iPXE over TFTP.\n\
         pxe-service=tag:!ipxe,x86PC,\"kiln: load iPXE (BIOS)\",undionly.kpxe\n\
         pxe-service=tag:!ipxe,X86-64_EFI,\"kiln: load iPXE (UEFI)\",ipxe.efi\n\
         # arm64: trixie's ipxe package has ipxe-arm64.efi; elsewhere copy the build's aarch64/netboot/ipxe.efi there.\n\
         pxe-service=tag:!ipxe,ARM64_EFI,\"kiln: load iPXE (arm64 UEFI)\",ipxe-arm64.efi\n\
         # Second stage: iPXE fetches its script from kiln serve.\n\
         pxe-service=tag:ipxe,x86PC,\"kiln\",http://{url_host}/boot.ipxe\n\
         pxe-service=tag:ipxe,X86-64_EFI,\"kiln\",http://{url_host}/boot.ipxe\n\
         pxe-service=tag:ipxe,ARM64_EFI,\"kiln\",http://{url_host}/boot.ipxe\n\
         dhcp-boot=tag:ipxe,http://{url_host}/boot.ipxe\n"
    )
}

#[cfg(test)]
mod tests;
