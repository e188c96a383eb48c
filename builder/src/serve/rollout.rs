//! `kiln serve --rollout`: hands an update to the inventory's nodes in waves and halts on the
//! first failure (docs/updates.md, "Rollout").
//!
//! The nodes drive it: each polls (`GET /rollout/challenge`, then a signed `GET /rollout/report`)
//! and the answer tells it to `wait`, `update` or `halt`. This module is the state machine behind
//! those answers; it does no I/O of its own besides reading the bundles at start and drawing
//! nonces, and takes the time as a parameter so tests drive timeouts without sleeping.
//!
//! Reports are authenticated with the node's HMAC key (`crate::rollout`) over a nonce this server
//! issued, single use and short-lived: no clocks on the nodes (boards without an RTC boot in 1970),
//! no replay of an old "ready" and no node speaking for another.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::arch::Arch;
use crate::rollout::{node_key, read_master_key, report_message, report_signature};

/// How long a nonce is good for: a node answers its challenge within seconds.
pub const NONCE_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// An etcd member counts as up when its latest `ready` report is younger than this many polls.
pub const FRESH_POLLS: u32 = 3;
/// Longest field a report may carry (node names, versions and archs are short).
const MAX_FIELD: usize = 128;

/// The operator's choices (`kiln serve --rollout` flags).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Agents updated at once (etcd and server nodes: always one).
    pub max_unavailable: usize,
    /// The `poll` the nodes are told to use.
    pub poll: Duration,
    /// A node told to update that sends no report within this is failed.
    pub node_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings { max_unavailable: 1, poll: Duration::from_secs(30), node_timeout: Duration::from_secs(15 * 60) }
    }
}

/// The update waves, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    Etcd,
    Server,
    Other,
}

impl Class {
    fn of(roles: &[String]) -> Class {
        if roles.iter().any(|r| r == "etcd") {
            Class::Etcd
        } else if roles.iter().any(|r| r == "server") {
            Class::Server
        } else {
            Class::Other
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Pending,
    Updating,
    Done,
    Failed,
}

/// What a node says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReportState {
    Ready,
    RolledBack,
    Failed,
}

impl ReportState {
    pub fn parse(s: &str) -> Option<ReportState> {
        match s {
            "ready" => Some(ReportState::Ready),
            "rolled-back" => Some(ReportState::RolledBack),
            "failed" => Some(ReportState::Failed),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            ReportState::Ready => "ready",
            ReportState::RolledBack => "rolled-back",
            ReportState::Failed => "failed",
        }
    }
}

/// The answer to an accepted report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Wait,
    Update,
    Halt,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Wait => "wait",
            Action::Update => "update",
            Action::Halt => "halt",
        }
    }
}

/// Why a report was refused (403, logged; nothing changes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not in the inventory of any update bundle")]
    UnknownNode,
    #[error("no challenge is open for this node (ask /rollout/challenge first; each nonce is good once)")]
    NoNonce,
    #[error("the nonce is not the node's latest challenge, or it was used already")]
    WrongNonce,
    #[error("the nonce expired (older than 10 minutes)")]
    Expired,
    #[error("missing signature")]
    MissingSignature,
    #[error("bad signature (not made with this node's report key)")]
    BadSignature,
    #[error("the node is not in the {0} bundle's inventory")]
    WrongArch(String),
}

/// One accepted report's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub action: Action,
    /// The target version for the node's arch.
    pub version: String,
    pub arch: String,
}

impl Answer {
    /// The response body: `key value` lines.
    pub fn body(&self, poll: Duration) -> String {
        let mut b = format!("action {}\nversion {}\npoll {}\n", self.action.name(), self.version, poll.as_secs());
        if self.action == Action::Update {
            b.push_str(&format!("url {}{}/\n", super::UPDATES, self.arch));
        }
        b
    }
}

/// A report as it arrived (fields checked for shape, not yet for authenticity).
#[derive(Debug, Clone)]
pub struct Report<'a> {
    pub node: &'a str,
    pub arch: &'a str,
    pub version: &'a str,
    pub state: ReportState,
    pub nonce: &'a str,
    pub sig: &'a str,
}

#[derive(Debug)]
struct Node {
    name: String,
    roles: Vec<String>,
    class: Class,
    /// The archs whose bundle lists this node (normally one).
    archs: Vec<String>,
    key: [u8; 32],
    phase: Phase,
    /// The latest accepted report: what it said and when.
    report: Option<(ReportState, String, Instant)>,
    /// The arch of its latest report.
    arch: Option<String>,
    /// When it was told to update (the node timeout runs from there).
    told: Option<Instant>,
    nonce: Option<(String, Instant)>,
    /// The etcd member whose missing `ready` last held this node back (logged once).
    held_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Running,
    Done,
    Halted(String),
}

/// The rollout: its targets, its nodes and where each stands.
#[derive(Debug)]
pub struct Rollout {
    settings: Settings,
    /// Arch name to target version.
    targets: BTreeMap<String, String>,
    /// In inventory order.
    nodes: Vec<Node>,
    state: State,
    started: Instant,
}

/// A bundle's `update.txt`, the parts the rollout needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub version: String,
    /// `(name, roles)` in inventory order.
    pub nodes: Vec<(String, Vec<String>)>,
}

/// Reads `version` and the `node NAME ROLES` lines of an `update.txt` (`none`: no role).
pub fn parse_update_txt(text: &str, file: &Path) -> Result<Target> {
    let mut version = None;
    let mut nodes: Vec<(String, Vec<String>)> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split(' ').collect();
        match fields.as_slice() {
            ["version", v] => version = Some(v.to_string()),
            ["node", name, roles] if !name.is_empty() && !roles.is_empty() => {
                if nodes.iter().any(|(n, _)| n == name) {
                    bail!("{} line {}: node `{name}` is listed twice", file.display(), i + 1);
                }
                let roles = if *roles == "none" { Vec::new() } else { roles.split(',').map(str::to_string).collect() };
                nodes.push((name.to_string(), roles));
            }
            ["node", ..] => bail!("{} line {}: expected `node NAME ROLES`, got `{}`", file.display(), i + 1, line.escape_debug()),
            _ => {}
        }
    }
    let Some(version) = version else { bail!("{}: no `version` line: not a kiln update bundle manifest", file.display()) };
    Ok(Target { version, nodes })
}

impl Rollout {
    /// The rollout of the bundles in `dir` (`<arch>/update/update.txt`), with the node keys
    /// derived from `dir`'s `secrets/rollout.key`. Errors name the file and what to do.
    pub fn load(dir: &Path, settings: Settings, now: Instant) -> Result<Rollout> {
        let mut targets = Vec::new();
        for arch in Arch::ALL {
            let file = dir.join(arch.name()).join(crate::update::DIR).join(crate::update::MANIFEST);
            if !file.is_file() {
                continue;
            }
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let target = parse_update_txt(&text, &file)?;
            if target.nodes.is_empty() {
                bail!(
                    "--rollout: {} lists no nodes (`node NAME ROLES` lines): build the bundle from a profile with `cluster.nodes` and `update.server`",
                    file.display()
                );
            }
            targets.push((arch.name().to_string(), target));
        }
        if targets.is_empty() {
            bail!(
                "--rollout: {} holds no update bundle (<arch>/update/update.txt): build one with `kiln build PROFILE --format update --out {}` first",
                dir.display(),
                dir.display()
            );
        }
        let key_path = crate::rollout::master_key_path(dir);
        if !key_path.is_file() {
            bail!(
                "--rollout: {} is missing: it is the key the nodes' report keys derive from, written by `kiln build` of a profile with `update.server` into this output directory; serve the directory the nodes' images were built into",
                key_path.display()
            );
        }
        let master = read_master_key(&key_path)?;
        Rollout::new(targets, &master, settings, now)
    }

    /// The rollout of `targets` (arch name and its bundle), node keys derived from `master`.
    pub fn new(targets: Vec<(String, Target)>, master: &[u8; 32], settings: Settings, now: Instant) -> Result<Rollout> {
        let mut nodes: Vec<Node> = Vec::new();
        for (arch, target) in &targets {
            for (name, roles) in &target.nodes {
                if let Some(n) = nodes.iter_mut().find(|n| &n.name == name) {
                    if &n.roles != roles {
                        bail!("node `{name}` has roles {:?} in the {} bundle but {roles:?} in the {arch} bundle", n.roles, n.archs[0]);
                    }
                    n.archs.push(arch.clone());
                    continue;
                }
                nodes.push(Node {
                    name: name.clone(),
                    roles: roles.clone(),
                    class: Class::of(roles),
                    archs: vec![arch.clone()],
                    key: node_key(master, name),
                    phase: Phase::Pending,
                    report: None,
                    arch: None,
                    told: None,
                    nonce: None,
                    held_by: None,
                });
            }
        }
        let targets = targets.into_iter().map(|(a, t)| (a, t.version)).collect();
        Ok(Rollout { settings, targets, nodes, state: State::Running, started: now })
    }

    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// What the rollout will do, for the startup log.
    pub fn plan(&self) -> String {
        let targets: Vec<String> = self.targets.iter().map(|(a, v)| format!("{a} to {v}")).collect();
        let count = |c: Class| self.nodes.iter().filter(|n| n.class == c).count();
        let s = self.settings;
        format!(
            "rollout: {}; {} nodes in waves: {} etcd (one at a time, each only while the other members report ready), {} server (one at a time), {} other (up to {} at once); poll {} s, node timeout {}",
            targets.join(", "),
            self.nodes.len(),
            count(Class::Etcd),
            count(Class::Server),
            count(Class::Other),
            s.max_unavailable,
            s.poll.as_secs(),
            human(s.node_timeout),
        )
    }

    /// A fresh nonce for `node` (replacing its earlier one), or `None` for a node not in the
    /// inventory.
    pub fn challenge(&mut self, node: &str, nonce: String, now: Instant) -> Option<String> {
        let n = self.nodes.iter_mut().find(|n| n.name == node)?;
        n.nonce = Some((nonce.clone(), now));
        Some(nonce)
    }

    /// Checks a report and, if it is genuine, records it and answers it. A refused report
    /// changes nothing (not even the node's nonce: a forger cannot use up a node's challenge).
    pub fn report(&mut self, r: &Report, now: Instant) -> Result<Answer, Refusal> {
        self.tick(now);
        let i = self.nodes.iter().position(|n| n.name == r.node).ok_or(Refusal::UnknownNode)?;
        let n = &self.nodes[i];
        let (nonce, issued) = n.nonce.as_ref().ok_or(Refusal::NoNonce)?;
        if !same(nonce.as_bytes(), r.nonce.as_bytes()) {
            return Err(Refusal::WrongNonce);
        }
        if now.saturating_duration_since(*issued) >= NONCE_LIFETIME {
            return Err(Refusal::Expired);
        }
        if r.sig.is_empty() {
            return Err(Refusal::MissingSignature);
        }
        let expected = report_signature(&n.key, &report_message(r.node, r.arch, r.version, r.state.name(), r.nonce));
        if !same(expected.as_bytes(), r.sig.to_ascii_lowercase().as_bytes()) {
            return Err(Refusal::BadSignature);
        }
        if !n.archs.iter().any(|a| a == r.arch) {
            return Err(Refusal::WrongArch(r.arch.to_string()));
        }
        // Genuine: the nonce is used up, the report recorded.
        let target = self.targets[r.arch].clone();
        let n = &mut self.nodes[i];
        n.nonce = None;
        n.report = Some((r.state, r.version.to_string(), now));
        n.arch = Some(r.arch.to_string());
        let told = self.advance(i, r, &target, now);
        let action = match &self.state {
            State::Halted(_) => Action::Halt,
            _ if told => Action::Update,
            _ => Action::Wait,
        };
        Ok(Answer { action, version: target, arch: r.arch.to_string() })
    }

    /// The node's phase after its report `r` (already recorded); true when it is told to update
    /// now.
    fn advance(&mut self, i: usize, r: &Report, target: &str, now: Instant) -> bool {
        let name = self.nodes[i].name.clone();
        match self.nodes[i].phase {
            Phase::Pending if r.state == ReportState::Ready && r.version == target => self.done(i, now),
            // A pending node that reports `rolled-back` or `failed` is judged by its version
            // only: that state may be left from an earlier rollout (the boot after a rollback).
            Phase::Pending if self.state == State::Running => match self.may_update(i, now) {
                Ok(()) => {
                    self.nodes[i].phase = Phase::Updating;
                    self.nodes[i].told = Some(now);
                    tracing::info!("rollout: {name}: told to update {} -> {target}", r.version);
                    return true;
                }
                // Said once per member that holds it, not at every poll: why the wave stalls.
                Err(Some(member)) if self.nodes[i].held_by.as_ref() != Some(&member) => {
                    tracing::info!(
                        "rollout: {name}: waits (quorum guard): etcd member {member} has not reported ready within the last {FRESH_POLLS} polls"
                    );
                    self.nodes[i].held_by = Some(member);
                }
                Err(_) => {}
            },
            Phase::Pending => {}
            Phase::Updating => match r.state {
                ReportState::Ready if r.version == target => self.done(i, now),
                // Rolled back, refused, or back on another version: the update did not take.
                s => self.fail(i, format!("{name} reported {} on {} after being told to update to {target}", s.name(), r.version)),
            },
            Phase::Done | Phase::Failed => {}
        }
        false
    }

    /// Whether pending node `i` may be told to update now: its wave has started, its wave has
    /// room, and (etcd) the other members are up. `Err(Some(member))`: held by the quorum guard
    /// because of `member`; `Err(None)`: not its turn.
    fn may_update(&self, i: usize, now: Instant) -> Result<(), Option<String>> {
        let class = self.nodes[i].class;
        if self.nodes.iter().any(|n| n.class < class && n.phase != Phase::Done) {
            return Err(None);
        }
        let limit = if class == Class::Other { self.settings.max_unavailable } else { 1 };
        if self.nodes.iter().filter(|n| n.phase == Phase::Updating).count() >= limit {
            return Err(None);
        }
        if class == Class::Etcd {
            let fresh = self.settings.poll * FRESH_POLLS;
            let down = self
                .nodes
                .iter()
                .enumerate()
                .filter(|(j, n)| *j != i && n.class == Class::Etcd)
                .find(|(_, n)| !matches!(&n.report, Some((ReportState::Ready, _, at)) if now.saturating_duration_since(*at) < fresh));
            if let Some((_, n)) = down {
                return Err(Some(n.name.clone()));
            }
        }
        Ok(())
    }

    fn done(&mut self, i: usize, now: Instant) {
        self.nodes[i].phase = Phase::Done;
        let n = &self.nodes[i];
        let version = n.report.as_ref().map(|r| r.1.clone()).unwrap_or_default();
        let finished = self.nodes.iter().filter(|n| n.phase == Phase::Done).count();
        tracing::info!("rollout: {}: done, on {version} ({finished}/{})", n.name, self.nodes.len());
        if finished == self.nodes.len() && self.state == State::Running {
            self.state = State::Done;
            tracing::info!(
                "rollout: done: {} nodes on {} in {}",
                self.nodes.len(),
                self.describe_targets(),
                human(now.saturating_duration_since(self.started))
            );
        }
    }

    fn fail(&mut self, i: usize, reason: String) {
        self.nodes[i].phase = Phase::Failed;
        if self.state != State::Running {
            return;
        }
        tracing::warn!("rollout: halted: {reason}");
        self.state = State::Halted(reason);
    }

    /// Fails nodes told to update that sent no report within the node timeout. Called on every
    /// rollout request and periodically by the server.
    pub fn tick(&mut self, now: Instant) {
        let timeout = self.settings.node_timeout;
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            if n.phase != Phase::Updating {
                continue;
            }
            let since = n.told.map(|t| now.saturating_duration_since(t)).unwrap_or_default();
            if since >= timeout {
                let reason = format!("{} sent no report within {} of being told to update (--node-timeout)", n.name, human(timeout));
                self.fail(i, reason);
            }
        }
    }

    fn describe_targets(&self) -> String {
        let mut versions: Vec<&String> = self.targets.values().collect();
        versions.dedup();
        if versions.len() == 1 {
            versions[0].clone()
        } else {
            self.targets.iter().map(|(a, v)| format!("{v} ({a})")).collect::<Vec<_>>().join(", ")
        }
    }

    /// `GET /rollout/status`: no secrets (no keys, no nonces).
    pub fn status(&self, now: Instant) -> Status<'_> {
        let (state, reason) = match &self.state {
            State::Running => ("running", None),
            State::Done => ("done", None),
            State::Halted(r) => ("halted", Some(r.as_str())),
        };
        let nodes = self
            .nodes
            .iter()
            .map(|n| NodeStatus {
                name: &n.name,
                roles: &n.roles,
                arch: n.arch.as_deref().unwrap_or(&n.archs[0]),
                version: n.report.as_ref().map(|r| r.1.as_str()),
                phase: n.phase,
                report: n.report.as_ref().map(|r| r.0),
                seconds_since_report: n.report.as_ref().map(|r| now.saturating_duration_since(r.2).as_secs()),
            })
            .collect();
        Status { state, reason, targets: &self.targets, nodes }
    }
}

/// The `/rollout/status` document (fields in this order).
#[derive(Debug, Serialize)]
pub struct Status<'a> {
    state: &'static str,
    reason: Option<&'a str>,
    targets: &'a BTreeMap<String, String>,
    nodes: Vec<NodeStatus<'a>>,
}

#[derive(Debug, Serialize)]
struct NodeStatus<'a> {
    name: &'a str,
    roles: &'a [String],
    arch: &'a str,
    version: Option<&'a str>,
    phase: Phase,
    report: Option<ReportState>,
    seconds_since_report: Option<u64>,
}

/// Whether a report field is acceptable at all (short, one line, printable).
pub fn plain_field(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_FIELD && s.bytes().all(|b| b.is_ascii_graphic())
}

/// `4m12s`, `15m`, `90s`, `1h`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

/// Compares in time independent of where the inputs differ (signatures and nonces).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASTER: [u8; 32] = [7; 32];

    fn inventory() -> Rollout {
        let nodes = [("etcd-1", "etcd"), ("etcd-2", "etcd"), ("etcd-3", "etcd"), ("srv-1", "server"), ("a-1", "agent"), ("a-2", "agent")];
        let target = Target {
            version: "2.0.0".into(),
            nodes: nodes.iter().map(|(n, r)| (n.to_string(), r.split(',').map(str::to_string).collect())).collect(),
        };
        let settings = Settings { max_unavailable: 2, ..Settings::default() };
        Rollout::new(vec![("x86_64".into(), target)], &MASTER, settings, Instant::now()).unwrap()
    }

    /// A genuine report from `node`, through a fresh challenge.
    fn send(r: &mut Rollout, node: &str, version: &str, state: ReportState, now: Instant) -> Answer {
        let nonce = r.challenge(node, format!("{node}-{:?}", now), now).unwrap();
        let sig = report_signature(&node_key(&MASTER, node), &report_message(node, "x86_64", version, state.name(), &nonce));
        r.report(&Report { node, arch: "x86_64", version, state, nonce: &nonce, sig: &sig }, now).unwrap()
    }

    fn phase(r: &Rollout, node: &str) -> Phase {
        r.nodes.iter().find(|n| n.name == node).unwrap().phase
    }

    #[test]
    fn parses_version_and_nodes() {
        let f = Path::new("update.txt");
        let t = parse_update_txt("kiln-update 1\nversion 2.0.0\nnode etcd-1 etcd,server\nnode a-1 none\nkeep etc/x\n", f).unwrap();
        assert_eq!(t.version, "2.0.0");
        assert_eq!(t.nodes, vec![("etcd-1".into(), vec!["etcd".into(), "server".into()]), ("a-1".into(), vec![])]);
        assert!(parse_update_txt("version 1\nnode a\n", f).unwrap_err().to_string().contains("line 2"));
        assert!(parse_update_txt("version 1\nnode a agent\nnode a agent\n", f).unwrap_err().to_string().contains("twice"));
        assert!(parse_update_txt("node a agent\n", f).unwrap_err().to_string().contains("no `version`"));
    }

    #[test]
    fn a_node_already_on_the_target_is_done_and_others_wait_for_their_wave() {
        let mut r = inventory();
        let t = Instant::now();
        assert_eq!(send(&mut r, "a-1", "1.0.0", ReportState::Ready, t).action, Action::Wait, "agents wait for etcd and servers");
        assert_eq!(send(&mut r, "srv-1", "2.0.0", ReportState::Ready, t).action, Action::Wait);
        assert_eq!(phase(&r, "srv-1"), Phase::Done);
    }

    #[test]
    fn a_timeout_while_pending_is_nothing_but_while_updating_halts() {
        let mut r = inventory();
        let t = Instant::now();
        for n in ["etcd-2", "etcd-3"] {
            send(&mut r, n, "1.0.0", ReportState::Ready, t);
        }
        assert_eq!(send(&mut r, "etcd-1", "1.0.0", ReportState::Ready, t).action, Action::Update);
        r.tick(t + Duration::from_secs(15 * 60 - 1));
        assert_eq!(r.state, State::Running);
        r.tick(t + Duration::from_secs(15 * 60));
        assert!(matches!(&r.state, State::Halted(why) if why.contains("etcd-1 sent no report within 15m")), "{:?}", r.state);
        assert_eq!(phase(&r, "etcd-1"), Phase::Failed);
        assert_eq!(phase(&r, "etcd-2"), Phase::Pending, "a node never told to update is not timed out");
    }

    #[test]
    fn ready_on_the_old_version_after_being_told_fails_but_a_leftover_rollback_does_not() {
        let mut r = inventory();
        let t = Instant::now();
        // etcd-2's boot follows a rollback of some earlier update: it is judged by its version.
        assert_eq!(send(&mut r, "etcd-2", "1.0.0", ReportState::RolledBack, t).action, Action::Wait);
        send(&mut r, "etcd-3", "1.0.0", ReportState::Ready, t);
        assert_eq!(send(&mut r, "etcd-1", "1.0.0", ReportState::Ready, t).action, Action::Wait, "etcd-2 is not ready");
        assert_eq!(send(&mut r, "etcd-2", "1.0.0", ReportState::Ready, t).action, Action::Update);
        assert_eq!(r.state, State::Running);
        // Told to update, it answers ready on its old version: the update did not happen.
        assert_eq!(send(&mut r, "etcd-2", "1.0.0", ReportState::Ready, t).action, Action::Halt);
        assert!(
            matches!(&r.state, State::Halted(why) if why.contains("etcd-2 reported ready on 1.0.0 after being told to update to 2.0.0"))
        );
        assert_eq!(phase(&r, "etcd-2"), Phase::Failed);
        assert_eq!(send(&mut r, "etcd-1", "1.0.0", ReportState::Ready, t).action, Action::Halt);
    }

    #[test]
    fn agents_go_at_most_max_unavailable_at_once() {
        let mut r = inventory();
        r.settings.max_unavailable = 1;
        let t = Instant::now();
        for n in ["etcd-1", "etcd-2", "etcd-3", "srv-1"] {
            send(&mut r, n, "2.0.0", ReportState::Ready, t);
        }
        assert_eq!(send(&mut r, "a-1", "1.0.0", ReportState::Ready, t).action, Action::Update);
        assert_eq!(send(&mut r, "a-2", "1.0.0", ReportState::Ready, t).action, Action::Wait);
        send(&mut r, "a-1", "2.0.0", ReportState::Ready, t);
        assert_eq!(send(&mut r, "a-2", "1.0.0", ReportState::Ready, t).action, Action::Update);
        send(&mut r, "a-2", "2.0.0", ReportState::Ready, t);
        assert_eq!(r.state, State::Done);
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_secs(252)), "4m12s");
        assert_eq!(human(Duration::from_secs(900)), "15m");
        assert_eq!(human(Duration::from_secs(3600)), "1h");
        assert_eq!(human(Duration::from_secs(0)), "0s");
    }
}
