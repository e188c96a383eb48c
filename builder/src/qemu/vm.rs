//! A running VM whose serial console is captured, as the VM tests (`qemu-tests`) drive it:
//! [`Vm::wait_for`] a console line, fail early on `FAILURE_MARKERS` or QEMU's exit, match a
//! prompt in an unfinished line once the console is quiet, and kill QEMU on drop; send one command
//! to the monitor socket a test opted into ([`Vm::monitor`]: hot-plug).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::command::{command, spawn, VmSpec};
use crate::arch::Arch;

/// Console lines that mean the guest failed: waiting stops at once instead of running into the timeout.
const FAILURE_MARKERS: [&str; 2] = ["[kiln] error:", "Kernel panic"];

/// How long a monitor command may take to answer (adding a device is quick; QEMU answers at once).
const MONITOR_TIMEOUT: Duration = Duration::from_secs(30);

/// How many console lines an error carries.
const TAIL_LINES: usize = 60;

/// A needle in an unfinished line (a prompt) matches once the console has been quiet this long;
/// until then the line may still be arriving and is returned whole when it ends.
const PROMPT_QUIET: Duration = Duration::from_millis(300);

/// Why [`Vm::wait_for`] gave up. Each variant carries the console's last lines.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("timed out after {:.1} s waiting for `{needle}` on the {arch} console; last console lines:\n{tail}", .after.as_secs_f64())]
    Timeout { arch: Arch, needle: String, after: Duration, tail: String },
    #[error("QEMU ({arch}) exited ({status}) before `{needle}` appeared; QEMU stderr:\n{stderr}\nlast console lines:\n{tail}")]
    Exited { arch: Arch, needle: String, status: String, stderr: String, tail: String },
    #[error("the {arch} guest failed while waiting for `{needle}`: {line}\nlast console lines:\n{tail}")]
    GuestFailed { arch: Arch, needle: String, line: String, tail: String },
}

/// What the reader threads share with [`Vm`].
struct Shared {
    state: Mutex<Captured>,
    changed: Condvar,
}

struct Captured {
    /// Raw serial console bytes.
    console: Vec<u8>,
    /// QEMU's own messages (bad options, missing files).
    stderr: Vec<u8>,
    /// QEMU closed its stdout: it has exited (or is exiting).
    console_closed: bool,
    /// QEMU closed its stderr (its last message may arrive after stdout closed).
    stderr_closed: bool,
    /// Everything, appended as it arrives.
    log: File,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Captured> {
        // A reader thread that panicked leaves valid bytes behind; keep using them.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A running VM whose serial console is captured (pipes), appended to a log file and kept in memory.
pub struct Vm {
    arch: Arch,
    child: Child,
    stdin: Option<ChildStdin>,
    shared: Arc<Shared>,
    /// Console bytes before this offset have been consumed by `wait_for`.
    scan_pos: usize,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
    killed: bool,
    /// The monitor's Unix socket (`VmSpec::monitor`), if the spec asked for one.
    monitor: Option<std::path::PathBuf>,
    /// Holds the UEFI variable store copy for the VM's lifetime.
    _workdir: tempfile::TempDir,
}

impl Vm {
    /// Starts QEMU for `spec`; the console (and QEMU's stderr) are appended to `log`.
    pub fn start(spec: &VmSpec, log: &Path) -> anyhow::Result<Vm> {
        let workdir = tempfile::Builder::new().prefix("kiln-vm-").tempdir().context("creating a temporary directory")?;
        let cmd = command(spec, workdir.path())?;
        let mut vm = Vm::start_with(cmd, spec.arch, log, workdir)?;
        vm.monitor = spec.monitor.clone();
        Ok(vm)
    }

    /// Starts a QEMU command line built by the caller (a board machine such as `raspi3b`, which
    /// takes `-kernel`/`-dtb`/`-initrd` and an SD card instead of firmware and virtio disks);
    /// its serial console must be on stdio (`-serial stdio`), no monitor there.
    pub fn start_command(cmd: std::process::Command, arch: Arch, log: &Path) -> anyhow::Result<Vm> {
        let workdir = tempfile::Builder::new().prefix("kiln-vm-").tempdir().context("creating a temporary directory")?;
        Vm::start_with(cmd, arch, log, workdir)
    }

    fn start_with(mut cmd: std::process::Command, arch: Arch, log: &Path, workdir: tempfile::TempDir) -> anyhow::Result<Vm> {
        let log_file =
            OpenOptions::new().create(true).append(true).open(log).with_context(|| format!("opening console log {}", log.display()))?;
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        tracing::debug!(?cmd, log = %log.display(), "starting QEMU");
        let mut child = spawn(cmd, arch)?;

        let shared = Arc::new(Shared {
            state: Mutex::new(Captured {
                console: Vec::new(),
                stderr: Vec::new(),
                console_closed: false,
                stderr_closed: false,
                log: log_file,
            }),
            changed: Condvar::new(),
        });
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(spawn_reader(out, shared.clone(), Stream::Console));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(spawn_reader(err, shared.clone(), Stream::Stderr));
        }
        Ok(Vm {
            arch,
            stdin: child.stdin.take(),
            child,
            shared,
            scan_pos: 0,
            readers,
            started: Instant::now(),
            killed: false,
            monitor: None,
            _workdir: workdir,
        })
    }

    /// Time since QEMU was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until a console line contains `needle`; returns that line (escape sequences removed).
    /// Fails early (with the last ~60 console lines in the error) if QEMU exits, if a line contains
    /// `[kiln] error:` or `Kernel panic`, or on timeout. Output up to the match is consumed: the next
    /// call looks only at what follows. A needle in an unfinished line matches once the console has been
    /// quiet for [`PROMPT_QUIET`] (a prompt waiting for input).
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let shared = self.shared.clone();
        let mut state = shared.lock();
        // (console length, when first seen) while the needle sits in an unfinished line.
        let mut prompt_since: Option<(usize, Instant)> = None;
        loop {
            // Complete lines first: a failure marker is judged on whole lines.
            while let Some(nl) = state.console[self.scan_pos..].iter().position(|&b| b == b'\n') {
                let line = clean_line(&state.console[self.scan_pos..self.scan_pos + nl]);
                self.scan_pos += nl + 1;
                if line.contains(needle) {
                    return Ok(line);
                }
                if FAILURE_MARKERS.iter().any(|m| line.contains(m)) {
                    let tail = tail_lines(&state.console, TAIL_LINES);
                    return Err(WaitError::GuestFailed { arch: self.arch, needle: needle.into(), line, tail }.into());
                }
            }
            let partial = clean_line(&state.console[self.scan_pos..]);
            let mut wake_at = deadline;
            if partial.contains(needle) {
                let len = state.console.len();
                match prompt_since {
                    Some((seen_len, since)) if seen_len == len => {
                        if since.elapsed() >= PROMPT_QUIET {
                            self.scan_pos = len;
                            return Ok(partial);
                        }
                        wake_at = wake_at.min(since + PROMPT_QUIET);
                    }
                    _ => {
                        prompt_since = Some((len, Instant::now()));
                        wake_at = wake_at.min(Instant::now() + PROMPT_QUIET);
                    }
                }
            }
            if state.console_closed {
                // QEMU's own error message (the likely reason it exited) may still be in flight.
                state = wait_until(&shared, state, Duration::from_secs(1), |s| s.stderr_closed);
                let (tail, stderr) = (tail_lines(&state.console, TAIL_LINES), String::from_utf8_lossy(&state.stderr).into_owned());
                drop(state);
                let status = self.exit_status_soon();
                return Err(WaitError::Exited { arch: self.arch, needle: needle.into(), status, stderr, tail }.into());
            }
            let now = Instant::now();
            if now >= deadline {
                let tail = tail_lines(&state.console, TAIL_LINES);
                return Err(WaitError::Timeout { arch: self.arch, needle: needle.into(), after: timeout, tail }.into());
            }
            let wait = wake_at.saturating_duration_since(now).max(Duration::from_millis(1));
            state = shared.changed.wait_timeout(state, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// All serial console output so far (raw, with the firmware's escape sequences).
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.shared.lock().console).into_owned()
    }

    /// Types `text` on the serial console (e.g. a key to stop a boot countdown).
    pub fn send(&mut self, text: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("the VM's console input is closed")?;
        stdin.write_all(text.as_bytes()).and_then(|()| stdin.flush()).context("writing to the VM's serial console")
    }

    /// Sends one command to the QEMU monitor (HMP) on the spec's socket, e.g. `drive_add 0
    /// if=none,id=stick,file=...` then `device_add usb-storage,bus=xhci.0,drive=stick`, and
    /// returns its reply (QEMU's output up to the next prompt, the echoed command left out). A reply
    /// starting with `Error` (QEMU's wording for a refused command) is an error. Each call has a
    /// connection of its own; the monitor serves one client at a time.
    pub fn monitor(&mut self, command: &str) -> anyhow::Result<String> {
        let path = self.monitor.clone().context("this VM has no monitor: set VmSpec::monitor to a socket path")?;
        let mut sock = std::os::unix::net::UnixStream::connect(&path)
            .with_context(|| format!("connecting to the QEMU monitor at {}", path.display()))?;
        sock.set_read_timeout(Some(MONITOR_TIMEOUT))?;
        // The greeting ends with the first prompt.
        read_to_prompt(&mut sock).with_context(|| format!("reading the QEMU monitor's greeting at {}", path.display()))?;
        sock.write_all(format!("{command}\n").as_bytes()).context("writing to the QEMU monitor")?;
        let raw = read_to_prompt(&mut sock).with_context(|| format!("waiting for the reply to monitor command `{command}`"))?;
        // The monitor echoes what it was sent (with line-editing escapes) on the first line.
        let reply = raw.split_once('\n').map_or("", |(_, rest)| rest).trim().to_string();
        tracing::debug!(command, reply, "QEMU monitor");
        if reply.starts_with("Error") || reply.contains("\nError") {
            bail!("QEMU monitor command `{command}` failed: {reply}");
        }
        Ok(reply)
    }

    /// Stops QEMU (if still running) and waits for it; also done on drop, so no QEMU outlives its `Vm`.
    pub fn kill(&mut self) {
        if self.killed {
            return;
        }
        self.killed = true;
        self.stdin = None;
        // Errors mean it already exited; either way wait() reaps it.
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Let the readers take QEMU's last output, but do not block on them: a helper process QEMU
        // started could hold the pipes open. Readers left running end when the pipes close.
        let shared = self.shared.clone();
        let state = wait_until(&shared, shared.lock(), Duration::from_secs(2), |s| s.console_closed && s.stderr_closed);
        let all_closed = state.console_closed && state.stderr_closed;
        drop(state);
        for reader in self.readers.drain(..) {
            if all_closed {
                let _ = reader.join();
            }
        }
    }

    /// Waits (at most `timeout`) for QEMU to end by itself, e.g. the guest powered off, and returns
    /// its exit status; on timeout the error carries the last console lines.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let shared = self.shared.clone();
        let state = wait_until(&shared, shared.lock(), timeout, |s| s.console_closed);
        let closed = state.console_closed;
        let tail = tail_lines(&state.console, TAIL_LINES);
        drop(state);
        if !closed {
            bail!(
                "{}: QEMU still running after {} s (the guest did not power off); last console lines:\n{tail}",
                self.arch,
                timeout.as_secs()
            );
        }
        let status = self.child.wait().context("waiting for QEMU")?;
        self.killed = true;
        Ok(status)
    }

    /// QEMU's exit status, given a moment to exit after it closed its console.
    fn exit_status_soon(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Ok(None) => return "console closed, process still running".into(),
                Err(e) => return format!("status unknown: {e}"),
            }
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Clone, Copy)]
enum Stream {
    Console,
    Stderr,
}

/// Copies one of QEMU's output pipes into the shared state and the log until it closes.
fn spawn_reader(mut pipe: impl Read + Send + 'static, shared: Arc<Shared>, stream: Stream) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let mut state = shared.lock();
            // A full disk must not stop the capture; the in-memory copy is what wait_for reads.
            let _ = state.log.write_all(&buf[..n]);
            match stream {
                Stream::Console => state.console.extend_from_slice(&buf[..n]),
                Stream::Stderr => state.stderr.extend_from_slice(&buf[..n]),
            }
            drop(state);
            shared.changed.notify_all();
        }
        let mut state = shared.lock();
        match stream {
            Stream::Console => state.console_closed = true,
            Stream::Stderr => state.stderr_closed = true,
        }
        drop(state);
        shared.changed.notify_all();
    })
}

/// Waits (at most `limit`) until `done` holds for the shared state; returns the guard either way.
fn wait_until<'a>(
    shared: &'a Shared,
    mut state: MutexGuard<'a, Captured>,
    limit: Duration,
    done: impl Fn(&Captured) -> bool,
) -> MutexGuard<'a, Captured> {
    let deadline = Instant::now() + limit;
    while !done(&state) {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        state = shared.changed.wait_timeout(state, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
    }
    state
}

/// Reads the monitor's output up to its prompt `(qemu) `; returns it without the prompt and
/// without escape sequences.
fn read_to_prompt(sock: &mut std::os::unix::net::UnixStream) -> anyhow::Result<String> {
    const PROMPT: &[u8] = b"(qemu) ";
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(PROMPT) {
        let n = sock.read(&mut buf).context("reading from the QEMU monitor")?;
        if n == 0 {
            bail!("the QEMU monitor closed the connection; it said: {}", String::from_utf8_lossy(&got));
        }
        got.extend_from_slice(&buf[..n]);
    }
    got.truncate(got.len() - PROMPT.len());
    Ok(got.split(|&b| b == b'\n').map(clean_line).collect::<Vec<_>>().join("\n"))
}

/// One console line as text: lossy UTF-8, terminal escape sequences and carriage returns removed.
fn clean_line(bytes: &[u8]) -> String {
    strip_escapes(&String::from_utf8_lossy(bytes)).replace('\r', "")
}

/// Removes ANSI/VT100 escape sequences (the UEFI firmware draws its screen with them).
fn strip_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        // CSI (ESC [): parameters and intermediates, then one final byte in '@'..='~'.
        // Any other escape is two characters long (ESC c, ESC 7, ...) and is dropped by the `next()`.
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// The last `n` lines of the console, cleaned, for error messages.
fn tail_lines(console: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(console);
    let lines: Vec<String> = text.split('\n').map(|l| strip_escapes(l).replace('\r', "")).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::process::Command;

    use super::*;

    #[test]
    fn escapes_are_stripped_from_console_lines() {
        let raw = b"\x1b[2J\x1b[01;01H\x1b[=3hBdsDxe: loading Boot0001\r";
        assert_eq!(clean_line(raw), "BdsDxe: loading Boot0001");
        assert_eq!(tail_lines(b"a\nb\nc\n", 2), "c\n");
    }

    /// `wait_for` over a real process: `sh` stands in for QEMU (no VM needed).
    fn fake_vm(script: &str, log: &Path) -> Vm {
        let mut child =
            Command::new("sh").args(["-c", script]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(Captured {
                console: Vec::new(),
                stderr: Vec::new(),
                console_closed: false,
                stderr_closed: false,
                log: OpenOptions::new().create(true).append(true).open(log).unwrap(),
            }),
            changed: Condvar::new(),
        });
        let readers = vec![
            spawn_reader(child.stdout.take().unwrap(), shared.clone(), Stream::Console),
            spawn_reader(child.stderr.take().unwrap(), shared.clone(), Stream::Stderr),
        ];
        Vm {
            arch: Arch::X86_64,
            stdin: child.stdin.take(),
            child,
            shared,
            scan_pos: 0,
            readers,
            started: Instant::now(),
            killed: false,
            monitor: None,
            _workdir: tempfile::tempdir().unwrap(),
        }
    }

    /// A stand-in for QEMU's monitor socket: greets with a prompt, echoes each command with line
    /// editing escapes, as HMP does, then answers `reply` and prompts again.
    fn fake_monitor(path: &Path, replies: Vec<&'static str>) -> std::thread::JoinHandle<Vec<String>> {
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            for reply in replies {
                let (mut conn, _) = listener.accept().unwrap();
                conn.write_all(b"QEMU 10.0.2 monitor - type 'help' for more information\r\n(qemu) ").unwrap();
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while conn.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                let line = String::from_utf8(line).unwrap();
                conn.write_all(format!("{line}\x1b[K\r\n{reply}(qemu) ").as_bytes()).unwrap();
                got.push(line);
            }
            got
        })
    }

    #[test]
    fn monitor_sends_one_command_and_returns_its_reply_or_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("monitor.sock");
        let server = fake_monitor(&sock, vec!["OK\r\n", "", "Error: Bus 'xhci.0' not found\r\n"]);
        let mut vm = fake_vm("exec sleep 5", &dir.path().join("console.log"));
        let err = format!("{:#}", vm.monitor("info status").unwrap_err());
        assert!(err.contains("VmSpec::monitor"), "{err}");
        vm.monitor = Some(sock);
        assert_eq!(vm.monitor("drive_add 0 if=none,id=s,file=/x").unwrap(), "OK");
        assert_eq!(vm.monitor("device_add usb-storage,drive=s").unwrap(), "");
        let err = format!("{:#}", vm.monitor("device_add usb-storage,bus=xhci.0,drive=s").unwrap_err());
        assert!(err.contains("`device_add usb-storage,bus=xhci.0,drive=s` failed: Error: Bus 'xhci.0' not found"), "{err}");
        assert_eq!(
            server.join().unwrap(),
            ["drive_add 0 if=none,id=s,file=/x", "device_add usb-storage,drive=s", "device_add usb-storage,bus=xhci.0,drive=s"]
        );
    }

    #[test]
    fn wait_for_matches_consumes_and_logs() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let mut vm = fake_vm("printf 'one\\r\\ntwo ready\\nthree\\nprompt> '; exec sleep 5", &log);
        let t = Duration::from_secs(3);
        assert_eq!(vm.wait_for("ready", t).unwrap(), "two ready");
        assert_eq!(vm.wait_for("three", t).unwrap(), "three");
        assert_eq!(vm.wait_for("prompt>", t).unwrap(), "prompt> ", "a partial line matches");
        // Already consumed: "ready" does not match again, so this times out.
        let err = vm.wait_for("ready", Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err.downcast_ref::<WaitError>(), Some(WaitError::Timeout { .. })), "{err:#}");
        assert!(err.to_string().contains("two ready"), "tail in error: {err}");
        vm.kill();
        assert!(vm.console().starts_with("one\r\ntwo ready"));
        assert!(fs::read_to_string(&log).unwrap().contains("prompt> "));
    }

    #[test]
    fn a_line_printed_in_pieces_is_returned_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut vm = fake_vm("printf 'BdsDxe'; sleep 0.1; printf ': loading Boot0001\\n'; exec sleep 5", &dir.path().join("p.log"));
        assert_eq!(vm.wait_for("BdsDxe", Duration::from_secs(3)).unwrap(), "BdsDxe: loading Boot0001");
    }

    #[test]
    fn wait_for_fails_early_on_panic_and_on_exit() {
        let dir = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let mut vm = fake_vm("echo booting; echo 'Kernel panic - not syncing: VFS'; exec sleep 5", &dir.path().join("a.log"));
        let err = vm.wait_for("login:", Duration::from_secs(4)).unwrap_err();
        assert!(matches!(err.downcast_ref::<WaitError>(), Some(WaitError::GuestFailed { .. })), "{err:#}");
        assert!(err.to_string().contains("booting"), "{err}");

        let mut vm = fake_vm("echo '[kiln] error: no root'; exec sleep 5", &dir.path().join("b.log"));
        let err = vm.wait_for("ready", Duration::from_secs(4)).unwrap_err();
        assert!(err.to_string().contains("[kiln] error: no root"), "{err}");

        let mut vm = fake_vm("echo bye; echo oops >&2; exit 3", &dir.path().join("c.log"));
        let err = vm.wait_for("ready", Duration::from_secs(4)).unwrap_err();
        assert!(matches!(err.downcast_ref::<WaitError>(), Some(WaitError::Exited { .. })), "{err:#}");
        let msg = err.to_string();
        assert!(msg.contains("exit status: 3") && msg.contains("oops") && msg.contains("bye"), "{msg}");
        assert!(start.elapsed() < Duration::from_secs(3), "failures are reported early");
    }

    #[test]
    fn drop_kills_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let vm = fake_vm("echo $$; exec sleep 30", &dir.path().join("k.log"));
        let pid = vm.child.id();
        drop(vm);
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "process {pid} still exists after drop");
    }
}
