//! A private virtual LAN for multi-node tests: a network namespace holding a bridge and one tap
//! device per VM. QEMU runs inside the namespace (`ip netns exec`), each VM's virtio NIC on its
//! own tap, so the VMs see each other (and the bridge's address, the host side) and nothing
//! else: no packet leaves the namespace. Needs root (CAP_NET_ADMIN), as `.ci/run` has.
//! The namespace is deleted on drop.

use std::process::Command;

use anyhow::{bail, Context, Result};

pub struct Lan {
    ns: String,
    taps: usize,
}

impl Lan {
    /// Creates namespace `kiln-<name>-<pid>` with bridge `br0` at `bridge_cidr` (e.g.
    /// `10.0.0.1/24`) and taps `tap0`..`tap<taps-1>` on it, all up.
    pub fn new(name: &str, bridge_cidr: &str, taps: usize) -> Result<Lan> {
        let ns = format!("kiln-{name}-{}", std::process::id());
        // A namespace left by a killed earlier run of this process id would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        run(Command::new("ip").args(["netns", "add", &ns]))
            .with_context(|| format!("creating network namespace {ns}: the multi-node tests need root (CAP_NET_ADMIN) and iproute2"))?;
        let lan = Lan { ns, taps };
        lan.ip(&["link", "set", "lo", "up"])?;
        lan.ip(&["link", "add", "br0", "type", "bridge"])?;
        lan.ip(&["addr", "add", bridge_cidr, "dev", "br0"])?;
        lan.ip(&["link", "set", "br0", "up"])?;
        for i in 0..taps {
            let tap = Lan::tap(i);
            lan.ip(&["tuntap", "add", &tap, "mode", "tap"])?;
            lan.ip(&["link", "set", &tap, "master", "br0"])?;
            lan.ip(&["link", "set", &tap, "up"])?;
        }
        Ok(lan)
    }

    /// The name of tap device `i`.
    pub fn tap(i: usize) -> String {
        format!("tap{i}")
    }

    pub fn namespace(&self) -> &str {
        &self.ns
    }

    pub fn taps(&self) -> usize {
        self.taps
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    fn ip(&self, args: &[&str]) -> Result<()> {
        run(Command::new("ip").args(["-n", &self.ns]).args(args))
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?} (is iproute2 installed?)"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
