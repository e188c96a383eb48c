//! Connection limits of `kiln serve` against hostile or broken clients: a cap on connections
//! served at once, a smaller cap per client address, and the time a client gets to send its
//! request head. A slot is held by a [`Slot`] and given back when it is dropped (also when a
//! connection thread panics).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The limits one server applies; [`Limits::default`] is what `kiln serve` uses.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more are answered 503 (a rack booting at once fits easily).
    pub max_connections: usize,
    /// Connections served at once for one client address (one IPv4 address, one IPv6 /64). A
    /// booting machine uses one at a time; this keeps one client from taking every slot.
    pub per_peer: usize,
    /// Time for the whole request head (request line and headers), however it trickles in.
    pub head_deadline: Duration,
    /// After the head: a client that stops reading for this long is dropped.
    pub io_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_connections: 512, per_peer: 16, head_deadline: Duration::from_secs(10), io_timeout: Duration::from_secs(60) }
    }
}

/// Why a connection got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `max_connections` are open.
    Full,
    /// `per_peer` are open from this client's address.
    PeerFull,
}

impl Refused {
    pub fn why(self) -> &'static str {
        match self {
            Refused::Full => "too many connections",
            Refused::PeerFull => "too many connections from this address",
        }
    }
}

/// The counted slots: open connections in total and per client address.
#[derive(Debug)]
pub struct Slots {
    limits: Limits,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// One connection's slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    peer: IpAddr,
}

impl Slots {
    pub fn new(limits: Limits) -> Arc<Slots> {
        Arc::new(Slots { limits, open: Mutex::new(Open::default()) })
    }

    /// A slot for a connection from `peer`, or why there is none. Never blocks on the network.
    pub fn acquire(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, Refused> {
        let peer = peer_key(peer);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.total >= self.limits.max_connections {
            return Err(Refused::Full);
        }
        let mine = open.per_peer.entry(peer).or_insert(0);
        if *mine >= self.limits.per_peer {
            return Err(Refused::PeerFull);
        }
        *mine += 1;
        open.total += 1;
        Ok(Slot { slots: self.clone(), peer })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.per_peer.remove(&self.peer);
            }
        }
    }
}

/// What counts as one client: an IPv4 address, or an IPv6 /64 (one host usually holds a whole
/// /64, so counting single IPv6 addresses would be no limit at all). IPv4-mapped IPv6 is IPv4.
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_per_peer_and_in_total_and_freed_on_drop() {
        let slots = Slots::new(Limits { max_connections: 5, per_peer: 2, ..Limits::default() });
        let (a, b, c): (IpAddr, IpAddr, IpAddr) =
            ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
        let a1 = slots.acquire(a).unwrap();
        let _a2 = slots.acquire(a).unwrap();
        assert_eq!(slots.acquire(a).unwrap_err(), Refused::PeerFull);
        let _b1 = slots.acquire(b).unwrap();
        let _b2 = slots.acquire(b).unwrap();
        let _c1 = slots.acquire(c).unwrap();
        assert_eq!(slots.open(), 5);
        assert_eq!(slots.acquire(c).unwrap_err(), Refused::Full);
        drop(a1);
        assert_eq!(slots.open(), 4);
        let _a3 = slots.acquire(a).unwrap();
        // One IPv6 /64 is one client; a mapped IPv4 address is that IPv4 address.
        let slots = Slots::new(Limits { max_connections: 10, per_peer: 1, ..Limits::default() });
        let _x = slots.acquire("2001:db8::1".parse().unwrap()).unwrap();
        assert_eq!(slots.acquire("2001:db8::ffff:2".parse().unwrap()).unwrap_err(), Refused::PeerFull);
        let _y = slots.acquire("2001:db8:0:1::1".parse().unwrap()).unwrap();
        let _z = slots.acquire("192.0.2.1".parse().unwrap()).unwrap();
        assert_eq!(slots.acquire("::ffff:192.0.2.1".parse().unwrap()).unwrap_err(), Refused::PeerFull);
    }
}
