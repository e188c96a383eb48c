//! A minimal NTP server (RFC 5905 server mode, stratum 1) on the host's loopback, for checking that
//! an appliance's chronyd polls the configured server and sets its clock from it. It answers with
//! the host's time plus a fixed offset, so a test can tell "the clock was set from this server"
//! apart from "the clock was right anyway" (QEMU starts the guest's RTC at the host's time).
//!
//! QEMU user networking delivers the guest's packets for 10.0.2.2 to the host's 127.0.0.1.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;

/// Seconds from the NTP era (1900) to the Unix epoch.
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;
const PACKET: usize = 48;
const MODE_CLIENT: u8 = 3;
const MODE_SERVER: u8 = 4;

/// A running server; answers until the process ends.
pub struct NtpServer {
    pub port: u16,
    /// The offset added to the host's clock in every answer.
    pub offset: Duration,
    answered: Arc<AtomicUsize>,
}

impl NtpServer {
    /// Binds `127.0.0.1:port` (0: any free port) and answers client requests in a background thread.
    pub fn start(port: u16, offset: Duration) -> anyhow::Result<NtpServer> {
        let socket = UdpSocket::bind(("127.0.0.1", port))
            .with_context(|| format!("binding the test NTP server to 127.0.0.1:{port} (is another test run using it?)"))?;
        let port = socket.local_addr()?.port();
        let answered = Arc::new(AtomicUsize::new(0));
        let count = answered.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                if let Some(reply) = answer(&buf[..n], SystemTime::now() + offset) {
                    // Counted before sending: a client that has the reply must see it counted
                    // (counting after `send_to` raced with the reader of `answered`).
                    count.fetch_add(1, Ordering::SeqCst);
                    if socket.send_to(&reply, from).is_err() {
                        count.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            }
        });
        Ok(NtpServer { port, offset, answered })
    }

    /// How many requests were answered so far.
    pub fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }
}

/// NTP's 64-bit timestamp: seconds since 1900 and a binary fraction.
fn timestamp(t: SystemTime) -> [u8; 8] {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = (since.as_secs() + NTP_UNIX_OFFSET) as u32;
    let frac = ((u64::from(since.subsec_nanos()) << 32) / 1_000_000_000) as u32;
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&secs.to_be_bytes());
    b[4..].copy_from_slice(&frac.to_be_bytes());
    b
}

/// The server's reply to a client request, or None for anything else.
fn answer(request: &[u8], now: SystemTime) -> Option<[u8; PACKET]> {
    if request.len() < PACKET || request[0] & 0x7 != MODE_CLIENT {
        return None;
    }
    let version = (request[0] >> 3) & 0x7;
    let mut r = [0u8; PACKET];
    r[0] = (version << 3) | MODE_SERVER; // leap indicator 0: synchronised
    r[1] = 1; // stratum 1: a primary reference
    r[2] = request[2]; // poll interval, echoed
    r[3] = (-20i8) as u8; // precision ~1 µs
    r[8..12].copy_from_slice(&16u32.to_be_bytes()); // root dispersion 1/4096 s
    r[12..16].copy_from_slice(b"KILN"); // reference id of a stratum-1 source
    let ts = timestamp(now);
    r[16..24].copy_from_slice(&ts); // reference time
    r[24..32].copy_from_slice(&request[40..48]); // origin = the client's transmit time
    r[32..40].copy_from_slice(&ts); // receive
    r[40..48].copy_from_slice(&ts); // transmit
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_client_requests_with_the_offset_time_and_echoes_the_origin() {
        let mut req = [0u8; PACKET];
        req[0] = (4 << 3) | MODE_CLIENT;
        req[40..48].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let t = UNIX_EPOCH + Duration::from_secs(1_800_000_000) + Duration::from_millis(500);
        let r = answer(&req, t).unwrap();
        assert_eq!(r[0], (4 << 3) | MODE_SERVER);
        assert_eq!(r[1], 1);
        assert_eq!(&r[24..32], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(u32::from_be_bytes(r[40..44].try_into().unwrap()) as u64, 1_800_000_000 + NTP_UNIX_OFFSET);
        assert_eq!(u32::from_be_bytes(r[44..48].try_into().unwrap()), 1 << 31);
        req[0] = (4 << 3) | MODE_SERVER;
        assert!(answer(&req, t).is_none(), "a server packet is not a request");
        assert!(answer(&req[..40], t).is_none(), "short packet");
    }

    #[test]
    fn a_real_udp_round_trip() -> anyhow::Result<()> {
        let server = NtpServer::start(0, Duration::from_secs(3600))?;
        let client = UdpSocket::bind("127.0.0.1:0")?;
        client.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut req = [0u8; PACKET];
        req[0] = (4 << 3) | MODE_CLIENT;
        client.send_to(&req, ("127.0.0.1", server.port))?;
        let mut buf = [0u8; 512];
        let (n, _) = client.recv_from(&mut buf)?;
        assert_eq!(n, PACKET);
        let secs = u64::from(u32::from_be_bytes(buf[40..44].try_into()?)) - NTP_UNIX_OFFSET;
        let host = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        assert!(secs.abs_diff(host + 3600) <= 2, "server time {secs} is not host time {host} + 3600");
        assert_eq!(server.answered(), 1);
        Ok(())
    }
}
