//! The coherence engine: each node's page table (state, version, ownership, the request in
//! flight) and, for the pages it manages (page p is managed by node p % N), the directory
//! (owner, copy set, version, the transaction in progress and the requests queued behind it).
//!
//! It is independent of sockets and of userfaultfd: memory is reached through [`PageOps`] and
//! messages leave through [`Engine::next_out`], so the same code runs over TCP
//! ([`crate::node`]) and in unit tests and the fuzz target with a fake memory. Every message
//! is checked against the state it must arrive in; one that does not fit (a PAGE nobody
//! asked for, an ack from a node that was not invalidated, a VLD_PAGE from the wrong node) is
//! a [`ProtoError`] for the connection it came from, never a panic.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::collections::HashMap;

use crate::proto::{Access, Claim, MirrorData, Msg, ProtoError};

/// What the engine needs from the node's memory (a userfaultfd-registered mapping, or a fake).
pub trait PageOps {
    /// Maps `data` at `page` (which is not mapped), write-protected when `write_protect`;
    /// the threads faulting on it are woken then or soon after.
    fn install(&mut self, page: u64, data: &[u8], write_protect: bool) -> io::Result<()>;
    /// Write-protects a mapped page (a downgrade to read).
    fn protect(&mut self, page: u64) -> io::Result<()>;
    /// Removes write protection from a mapped page; its faulting threads are woken then or
    /// soon after.
    fn unprotect(&mut self, page: u64) -> io::Result<()>;
    /// Drops a mapped page (the next access faults as missing).
    fn drop_page(&mut self, page: u64) -> io::Result<()>;
    /// Copies a mapped, write-protected page into `out`.
    fn read(&mut self, page: u64, out: &mut [u8]);
    /// Wakes threads whose fault was already resolved.
    fn wake(&mut self, page: u64) -> io::Result<()>;
}

/// Counters of one node (monotonic; read with [`Stats::snapshot`]).
#[derive(Debug, Default)]
pub struct Stats {
    read_faults: AtomicU64,
    write_faults: AtomicU64,
    pages_sent: AtomicU64,
    pages_received: AtomicU64,
    unchanged_sent: AtomicU64,
    unchanged_received: AtomicU64,
    invalidations: AtomicU64,
    messages_sent: AtomicU64,
    messages_received: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    read_ahead_requested: AtomicU64,
    read_ahead_used: AtomicU64,
    read_ahead_wasted: AtomicU64,
    failed_faults: AtomicU64,
    peers_lost: AtomicU64,
    heartbeats_sent: AtomicU64,
    heartbeats_received: AtomicU64,
    mirror_sent: AtomicU64,
    mirror_received: AtomicU64,
    mirror_pushes: AtomicU64,
    pages_rehomed: AtomicU64,
    recoveries: AtomicU64,
}

/// A copy of a node's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Read faults that needed the protocol (stale or coalesced ones excluded).
    pub read_faults: u64,
    /// Write faults that needed the protocol.
    pub write_faults: u64,
    /// PAGE replies sent with data.
    pub pages_sent: u64,
    /// PAGE replies received with data.
    pub pages_received: u64,
    /// PAGE replies sent as "unchanged" (no data).
    pub unchanged_sent: u64,
    /// PAGE replies received as "unchanged".
    pub unchanged_received: u64,
    /// Local copies dropped (INV_PAGE, or ownership handed to another node).
    pub invalidations: u64,
    /// Messages sent to other nodes.
    pub messages_sent: u64,
    /// Messages received from other nodes.
    pub messages_received: u64,
    /// Bytes sent to other nodes.
    pub bytes_sent: u64,
    /// Bytes received from other nodes.
    pub bytes_received: u64,
    /// Pages asked for by read-ahead (a streaming read pattern), not by a fault.
    pub read_ahead_requested: u64,
    /// Read-ahead pages a later fault used (served locally, or already on the way).
    pub read_ahead_used: u64,
    /// Read-ahead pages dropped unused (invalidated, or evicted from the read-ahead buffer).
    pub read_ahead_wasted: u64,
    /// Faults left unserved because the node lost a peer (see `Engine::peer_lost`).
    pub failed_faults: u64,
    /// Peers declared lost (connection broken, silent, stalled, or a protocol violation).
    pub peers_lost: u64,
    /// Heartbeats (PING) sent; not counted in the messages and bytes above.
    pub heartbeats_sent: u64,
    /// Heartbeats received; not counted in the messages and bytes above.
    pub heartbeats_received: u64,
    /// MIRROR messages sent (hand-offs, downgrades and pushes; counted in the messages above).
    pub mirror_sent: u64,
    /// MIRROR messages received.
    pub mirror_received: u64,
    /// Pages pushed to their mirror by the periodic push (write-protected, copied, sent).
    pub mirror_pushes: u64,
    /// Pages this node took ownership of from its mirror copies after a loss (never-written
    /// pages, taken over as zeros, not counted).
    pub pages_rehomed: u64,
    /// Losses of a peer that this node recovered from (mirroring).
    pub recoveries: u64,
}

impl StatsSnapshot {
    /// Field-wise difference `self - earlier`.
    pub fn since(&self, e: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            read_faults: self.read_faults - e.read_faults,
            write_faults: self.write_faults - e.write_faults,
            pages_sent: self.pages_sent - e.pages_sent,
            pages_received: self.pages_received - e.pages_received,
            unchanged_sent: self.unchanged_sent - e.unchanged_sent,
            unchanged_received: self.unchanged_received - e.unchanged_received,
            invalidations: self.invalidations - e.invalidations,
            messages_sent: self.messages_sent - e.messages_sent,
            messages_received: self.messages_received - e.messages_received,
            bytes_sent: self.bytes_sent - e.bytes_sent,
            bytes_received: self.bytes_received - e.bytes_received,
            read_ahead_requested: self.read_ahead_requested - e.read_ahead_requested,
            read_ahead_used: self.read_ahead_used - e.read_ahead_used,
            read_ahead_wasted: self.read_ahead_wasted - e.read_ahead_wasted,
            failed_faults: self.failed_faults - e.failed_faults,
            peers_lost: self.peers_lost - e.peers_lost,
            heartbeats_sent: self.heartbeats_sent - e.heartbeats_sent,
            heartbeats_received: self.heartbeats_received - e.heartbeats_received,
            mirror_sent: self.mirror_sent - e.mirror_sent,
            mirror_received: self.mirror_received - e.mirror_received,
            mirror_pushes: self.mirror_pushes - e.mirror_pushes,
            pages_rehomed: self.pages_rehomed - e.pages_rehomed,
            recoveries: self.recoveries - e.recoveries,
        }
    }
}

impl std::fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "read_faults={} write_faults={} pages_sent={} pages_received={} unchanged_sent={} \
             unchanged_received={} invalidations={} messages_sent={} messages_received={} \
             bytes_sent={} bytes_received={} read_ahead_requested={} read_ahead_used={} \
             read_ahead_wasted={} failed_faults={} peers_lost={} heartbeats_sent={} \
             heartbeats_received={} mirror_sent={} mirror_received={} mirror_pushes={} \
             pages_rehomed={} recoveries={}",
            self.read_faults,
            self.write_faults,
            self.pages_sent,
            self.pages_received,
            self.unchanged_sent,
            self.unchanged_received,
            self.invalidations,
            self.messages_sent,
            self.messages_received,
            self.bytes_sent,
            self.bytes_received,
            self.read_ahead_requested,
            self.read_ahead_used,
            self.read_ahead_wasted,
            self.failed_faults,
            self.peers_lost,
            self.heartbeats_sent,
            self.heartbeats_received,
            self.mirror_sent,
            self.mirror_received,
            self.mirror_pushes,
            self.pages_rehomed,
            self.recoveries
        )
    }
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Stats {
    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            read_faults: g(&self.read_faults),
            write_faults: g(&self.write_faults),
            pages_sent: g(&self.pages_sent),
            pages_received: g(&self.pages_received),
            unchanged_sent: g(&self.unchanged_sent),
            unchanged_received: g(&self.unchanged_received),
            invalidations: g(&self.invalidations),
            messages_sent: g(&self.messages_sent),
            messages_received: g(&self.messages_received),
            bytes_sent: g(&self.bytes_sent),
            bytes_received: g(&self.bytes_received),
            read_ahead_requested: g(&self.read_ahead_requested),
            read_ahead_used: g(&self.read_ahead_used),
            read_ahead_wasted: g(&self.read_ahead_wasted),
            failed_faults: g(&self.failed_faults),
            peers_lost: g(&self.peers_lost),
            heartbeats_sent: g(&self.heartbeats_sent),
            heartbeats_received: g(&self.heartbeats_received),
            mirror_sent: g(&self.mirror_sent),
            mirror_received: g(&self.mirror_received),
            mirror_pushes: g(&self.mirror_pushes),
            pages_rehomed: g(&self.pages_rehomed),
            recoveries: g(&self.recoveries),
        }
    }
    /// Counts a message of `bytes` sent to another node.
    pub fn sent(&self, bytes: usize) {
        inc(&self.messages_sent, 1);
        inc(&self.bytes_sent, bytes as u64);
    }
    /// Counts a heartbeat sent (apart from the messages and bytes).
    pub fn heartbeat_sent(&self) {
        inc(&self.heartbeats_sent, 1);
    }
    /// Counts `bytes` received from another node (messages are counted as decoded).
    pub fn received_bytes(&self, bytes: usize) {
        inc(&self.bytes_received, bytes as u64);
    }
}

/// Local state of a page on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    /// Not mapped: any access faults (missing).
    Invalid,
    /// Mapped write-protected: a write faults.
    Read,
    /// Mapped writable: this node is the single writer.
    Write,
}

#[derive(Clone, Copy, Debug)]
struct Local {
    state: PageState,
    /// Version of the mapped contents (0 while invalid: the all-zero initial contents,
    /// which every node can produce without a transfer).
    version: u64,
    /// This node is the page's owner (holds its latest contents, serves FWD_PAGE).
    owner: bool,
    /// Access requested and not yet granted (concurrent faults coalesce on it).
    pending: Option<Access>,
    /// The pending request is a read-ahead (no thread asked for the page).
    ahead: bool,
    /// A thread faulted on the page while its read-ahead request was in flight: install it.
    waiting: bool,
    /// A read copy held in the read-ahead buffer, not mapped: the next fault installs it
    /// without a round trip.
    buffered: bool,
}

impl Local {
    fn new(owner: bool) -> Local {
        Local {
            state: PageState::Invalid,
            version: 0,
            owner,
            pending: None,
            ahead: false,
            waiting: false,
            buffered: false,
        }
    }
}

#[derive(Debug)]
struct Txn {
    requester: u32,
    access: Access,
    have: u64,
    /// Nodes whose INV_ACK is still awaited (bit per node).
    acks: u64,
}

#[derive(Debug)]
struct Dir {
    owner: u32,
    /// Nodes holding a copy (bit per node; the owner's bit may be set too).
    copyset: u64,
    version: u64,
    busy: Option<Txn>,
    queue: VecDeque<(u32, Access, u64)>,
}

impl Dir {
    fn new() -> Dir {
        Dir {
            owner: 0,
            copyset: 0,
            version: 0,
            busy: None,
            queue: VecDeque::new(),
        }
    }
}

/// Mirroring (docs/DSM.md, "Mirroring"): the copies this node keeps for others, what it
/// pushed of its own pages, and the recovery in progress after a loss.
struct Mirror {
    interval: Duration,
    next_push: Option<Instant>,
    /// Where the periodic push's scan for written pages resumes.
    cursor: u64,
    /// Contents this node keeps for other nodes' pages: page -> (version, data; None: zeros).
    store: HashMap<u64, (u64, Option<Vec<u8>>)>,
    /// Per page: the version whose contents this node last sent to the page's mirror node.
    mirrored: Vec<Option<u64>>,
    /// Per page: the last PAGE this node served as its owner (requester, access, version).
    gave: Vec<Option<(u32, Access, u64)>>,
    /// Pages this node owns whose mirror node changed (or that it took over): pushed first.
    resync: VecDeque<u64>,
    recovery: Option<Recovery>,
}

/// The recovery from the loss of one node, until every live node has reported.
struct Recovery {
    lost: u32,
    /// Live peers whose claims (ended by `Claim::End`) are still awaited.
    waiting: u64,
    /// Claims for pages this node manages now: (sender, page, version, claim).
    claims: Vec<(u32, u64, u64, Claim)>,
    /// Messages to the manager side held until the recovery ends, in arrival order.
    held: VecDeque<(u32, Msg)>,
    /// When the engine first saw the recovery in [`Engine::run_due`] (its deadline counts
    /// from there).
    since: Option<Instant>,
}

/// How long a recovery may wait for the survivors' reports before it fails the node: a
/// survivor that stays alive (heartbeats) but never reports would otherwise hold every
/// manager-side message for ever.
pub const RECOVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// The most pages one push round sends (4 KiB pages: 1 MiB), so that a push never queues
/// more for a peer than its send limit allows; the next round follows in a millisecond.
const PUSH_BUDGET: usize = 256;

/// A message whose handling waits for a page's hold time to pass (see [`Engine::new`]).
#[derive(Debug)]
struct Deferred {
    due: Instant,
    from: u32,
    msg: Msg,
}

/// One node's coherence engine.
pub struct Engine<M: PageOps> {
    me: u32,
    nodes: u32,
    page_size: usize,
    local: Vec<Local>,
    installed: Vec<Option<Instant>>,
    dir: Vec<Dir>,
    mem: M,
    hold: Duration,
    versioning: bool,
    deferred: VecDeque<Deferred>,
    /// Pages to ask for ahead of a streaming read (0: no read-ahead).
    read_ahead: u64,
    /// The last page a read fault was on (a fault on the next one is a stream).
    last_read: Option<u64>,
    /// Read-ahead pages received and not mapped yet (bounded: see `ahead_cap`).
    ahead_pages: std::collections::HashMap<u64, Vec<u8>>,
    /// Their arrival order, for evicting the oldest (may name pages used since).
    ahead_order: VecDeque<u64>,
    /// A peer was lost: faults that need the protocol are no longer served.
    failed: bool,
    /// Messages to send: (destination, message); destination `me` is handled locally.
    outbox: VecDeque<(u32, Msg)>,
    /// Nodes lost and recovered from (bit per node; mirroring only).
    dead: u64,
    /// Pages whose original manager was lost: their directory entries on this node.
    adopted: HashMap<u64, Dir>,
    mirror: Option<Mirror>,
    /// Connections to close: peers another node declared lost (LOST), with why.
    to_close: Vec<(u32, String)>,
    /// Why the node failed, when the engine itself found it (a recovery that could not
    /// complete), for the node to report.
    fatal: Option<String>,
    stats: std::sync::Arc<Stats>,
    zero: Vec<u8>,
}

fn bit(n: u32) -> u64 {
    1u64 << n
}

impl<M: PageOps> Engine<M> {
    /// An engine for node `me` of `nodes` over `pages` pages of `page_size` bytes.
    ///
    /// Every page starts invalid everywhere (the seed's INIT: all local pages invalidated),
    /// owned by node 0 at version 0, the all-zero contents that are never sent. `hold` is the minimum time a page stays after it was
    /// installed before a FWD_PAGE or INV_PAGE takes it away, so that the woken thread gets
    /// to use it (Mirage's window; zero disables it).
    pub fn new(
        me: u32,
        nodes: u32,
        page_size: usize,
        pages: u64,
        mem: M,
        hold: Duration,
        stats: std::sync::Arc<Stats>,
    ) -> Self {
        let local = (0..pages).map(|_| Local::new(me == 0)).collect();
        let managed = (pages + u64::from(nodes) - 1 - u64::from(me)) / u64::from(nodes);
        let dir = (0..managed).map(|_| Dir::new()).collect();
        Engine {
            me,
            nodes,
            page_size,
            local,
            installed: vec![None; usize::try_from(pages).unwrap_or(0)],
            dir,
            mem,
            hold,
            versioning: true,
            deferred: VecDeque::new(),
            read_ahead: 0,
            last_read: None,
            ahead_pages: std::collections::HashMap::new(),
            ahead_order: VecDeque::new(),
            failed: false,
            outbox: VecDeque::new(),
            dead: 0,
            adopted: HashMap::new(),
            mirror: None,
            to_close: Vec::new(),
            fatal: None,
            stats,
            zero: vec![0; page_size],
        }
    }

    /// Turns versioning off (every reply carries the page, even to a node holding the
    /// current version, and never-written pages are sent as zeros) or back on: for measuring
    /// what versioning saves. It decides the replies this node sends; a receiver handles
    /// both kinds, so nodes need not agree.
    pub fn set_versioning(&mut self, on: bool) {
        self.versioning = on;
    }

    /// Asks for up to `pages` following pages (read copies) when read faults stream
    /// (a read fault on the page after the previous read fault's); 0 turns it off. The pages
    /// wait unmapped in a bounded buffer until a fault uses them or an invalidation drops them.
    pub fn set_read_ahead(&mut self, pages: u32) {
        if self.mirror.is_none() {
            self.read_ahead = u64::from(pages);
        }
    }

    /// Turns mirroring on (docs/DSM.md, "Mirroring"): every page's latest contents are kept
    /// on a second node (written through on ownership transfers and downgrades, and pushed
    /// every `interval` for pages written in place), so that the loss of a node is recovered
    /// from instead of failing this node. Read-ahead is off with mirroring. Every node of the
    /// cluster must agree (INIT checks it).
    pub fn set_mirror(&mut self, interval: Duration) {
        let pages = self.local.len();
        self.read_ahead = 0;
        self.mirror = Some(Mirror {
            interval,
            next_push: None,
            cursor: 0,
            store: HashMap::new(),
            mirrored: vec![None; pages],
            gave: vec![None; pages],
            resync: VecDeque::new(),
            recovery: None,
        });
    }

    /// Whether mirroring is on.
    pub fn mirroring(&self) -> bool {
        self.mirror.is_some()
    }

    /// Records that the connection to `peer` is gone.
    ///
    /// Without mirroring the node has *failed*: the pages that peer owned or managed are
    /// unreachable, so from now on a fault that needs the protocol is not served: its thread
    /// stays blocked (it never runs on contents the cluster did not give it) until the VMM
    /// stops (docs/DSM.md, "Peer loss"). Requests already in flight to live peers still
    /// complete.
    ///
    /// With mirroring the loss starts a recovery: this node tells every live peer (LOST),
    /// reports what it knows of the pages the lost node managed to their new managers
    /// (CLAIM), and once every live peer has done the same, the lost node's pages are
    /// re-homed from their mirror copies and its directory rebuilt (docs/DSM.md,
    /// "Mirroring"). A second loss during a recovery fails the node.
    pub fn peer_lost(&mut self, peer: u32) {
        if peer >= self.nodes || peer == self.me || self.dead & bit(peer) != 0 {
            return;
        }
        if self.mirror.is_none() {
            inc(&self.stats.peers_lost, 1);
            self.failed = true;
            return;
        }
        inc(&self.stats.peers_lost, 1);
        self.dead |= bit(peer);
        if self.failed {
            return;
        }
        let old = self.dead & !bit(peer);
        if let Some(r) = self.mirror.as_ref().and_then(|m| m.recovery.as_ref()) {
            let first = r.lost;
            self.fail(format!(
                "lost node {peer} while recovering from the loss of node {first}"
            ));
            return;
        }
        let me = self.me;
        let mut local_claims = Vec::new();
        let mut claims = Vec::new();
        let mut resync = Vec::new();
        for p in 0..self.local.len() as u64 {
            let l = self.local[Self::idx(p)];
            if self.manager_among(p, old) == peer {
                let to = self.manager(p);
                let mut add = |version, claim| {
                    if to == me {
                        local_claims.push((me, p, version, claim));
                    } else {
                        claims.push((to, p, version, claim));
                    }
                };
                // Node 0 owns every untouched page from the start: it does not claim those
                // (the new manager gives a page nobody claims to node 0 if it is alive).
                if l.owner && (me != 0 || l.state != PageState::Invalid || l.version != 0) {
                    add(l.version, Claim::Owner);
                }
                if let Some((to, access, v)) =
                    self.mirror.as_ref().and_then(|m| m.gave[Self::idx(p)])
                {
                    add(v, Claim::Gave { to, access });
                }
                if let Some(access) = l.pending {
                    let have = if l.state == PageState::Invalid {
                        0
                    } else {
                        l.version
                    };
                    add(have, Claim::Want { access });
                }
            }
            if l.owner
                && l.state != PageState::Invalid
                && self.mirror_node_among(p, me, old) == Some(peer)
            {
                resync.push(p);
            }
        }
        // Whatever the lost node still had to send or to take is gone: its deferred messages
        // are dropped (its requests are reported by their requesters instead).
        self.deferred.retain(|d| d.from != peer);
        let live = self.live() & !bit(me);
        for n in 0..self.nodes {
            if live & bit(n) != 0 {
                self.send(n, Msg::Lost { node: peer });
            }
        }
        for (to, page, version, claim) in claims {
            self.send(
                to,
                Msg::Claim {
                    page,
                    version,
                    claim,
                },
            );
        }
        for n in 0..self.nodes {
            if live & bit(n) != 0 {
                self.send(
                    n,
                    Msg::Claim {
                        page: 0,
                        version: 0,
                        claim: Claim::End { lost: peer },
                    },
                );
            }
        }
        if let Some(m) = self.mirror.as_mut() {
            m.mirrored.iter_mut().for_each(|v| *v = None);
            m.resync.extend(resync);
            m.recovery = Some(Recovery {
                lost: peer,
                waiting: live,
                claims: local_claims,
                held: VecDeque::new(),
                since: None,
            });
        }
        if live == 0 {
            self.finish_recovery();
        }
    }

    /// Fails the node for a reason the engine found itself (see [`Engine::take_fatal`]).
    fn fail(&mut self, why: String) {
        self.failed = true;
        if self.fatal.is_none() {
            self.fatal = Some(why);
        }
    }

    /// Why the engine failed the node itself (a recovery that could not complete), once.
    pub fn take_fatal(&mut self) -> Option<String> {
        self.fatal.take()
    }

    /// Peers that another node declared lost (LOST) and whose connection this node must
    /// close too, with why.
    pub fn take_close(&mut self) -> Vec<(u32, String)> {
        std::mem::take(&mut self.to_close)
    }

    /// Whether a recovery from a loss is in progress (mirroring).
    pub fn recovering(&self) -> bool {
        self.mirror.as_ref().is_some_and(|m| m.recovery.is_some())
    }

    fn all_nodes(&self) -> u64 {
        if self.nodes >= 64 {
            u64::MAX
        } else {
            bit(self.nodes) - 1
        }
    }

    /// The nodes not lost.
    fn live(&self) -> u64 {
        self.all_nodes() & !self.dead
    }

    /// The manager of `page` when the nodes in `dead` are gone: p mod N, or the next live
    /// node after it.
    fn manager_among(&self, page: u64, dead: u64) -> u32 {
        let n = self.nodes;
        // page % nodes < nodes <= 64.
        let mut m = u32::try_from(page % u64::from(n)).unwrap_or(0);
        for _ in 0..n {
            if dead & bit(m) == 0 {
                break;
            }
            m = (m + 1) % n;
        }
        m
    }

    /// The next live node after `node` in id order (its buddy), or `node` itself if none.
    fn buddy_among(&self, node: u32, dead: u64) -> u32 {
        let n = self.nodes;
        let mut b = node;
        for _ in 0..n {
            b = (b + 1) % n;
            if b != node && dead & bit(b) == 0 {
                return b;
            }
        }
        node
    }

    /// Where a copy of `page` held by `holder` is mirrored: the page's manager, or the
    /// holder's buddy when the holder is the manager (None: no other live node).
    fn mirror_node_among(&self, page: u64, holder: u32, dead: u64) -> Option<u32> {
        let m = self.manager_among(page, dead);
        let t = if m == holder {
            self.buddy_among(holder, dead)
        } else {
            m
        };
        (t != holder).then_some(t)
    }

    /// Where a copy of `page` held by `holder` is mirrored now: the page's manager, or the
    /// holder's buddy (the next live node) when the holder is the manager; None when no other
    /// node is alive.
    pub fn mirror_node(&self, page: u64, holder: u32) -> Option<u32> {
        self.mirror_node_among(page, holder, self.dead)
    }

    /// Whether a peer was lost (see [`Engine::peer_lost`]).
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// The node's memory operations.
    pub fn mem(&mut self) -> &mut M {
        &mut self.mem
    }

    /// The counters.
    pub fn stats(&self) -> &std::sync::Arc<Stats> {
        &self.stats
    }

    /// Takes the next message to send.
    pub fn next_out(&mut self) -> Option<(u32, Msg)> {
        self.outbox.pop_front()
    }

    /// The manager (directory node) of `page`: node p mod N, or after the loss of that node
    /// (mirroring) the next live one.
    pub fn manager(&self, page: u64) -> u32 {
        self.manager_among(page, self.dead)
    }

    fn idx(page: u64) -> usize {
        usize::try_from(page).unwrap_or(usize::MAX)
    }

    fn dir_mut(&mut self, page: u64) -> &mut Dir {
        if page % u64::from(self.nodes) == u64::from(self.me) {
            let i = Self::idx(page / u64::from(self.nodes));
            &mut self.dir[i]
        } else {
            self.adopted.entry(page).or_insert_with(Dir::new)
        }
    }

    fn send(&mut self, to: u32, msg: Msg) {
        self.outbox.push_back((to, msg));
    }

    /// Local state, version and ownership of `page` (for tests and diagnostics).
    pub fn page_state(&self, page: u64) -> Option<(PageState, u64, bool)> {
        self.local
            .get(Self::idx(page))
            .map(|l| (l.state, l.version, l.owner))
    }

    /// A fault at `page` by a local thread (`write`: a write or a write-protect fault).
    pub fn fault(&mut self, page: u64, write: bool) -> io::Result<()> {
        let Some(mut l) = self.local.get(Self::idx(page)).copied() else {
            return Err(io::Error::other(format!(
                "fault on page {page} outside the region"
            )));
        };
        let i = Self::idx(page);
        if l.buffered {
            // A read-ahead page: map it now (read-only; a write then asks for an upgrade
            // like any other read copy's).
            let data = self
                .ahead_pages
                .remove(&page)
                .unwrap_or_else(|| self.zero.clone());
            self.local[i].buffered = false;
            inc(&self.stats.read_ahead_used, 1);
            self.mem.install(page, &data, true)?;
            if self.hold > Duration::ZERO {
                self.installed[i] = Some(Instant::now());
            }
            if !write {
                self.stream(page);
                return Ok(());
            }
            l = self.local[i];
        }
        let satisfied = match l.state {
            PageState::Invalid => false,
            PageState::Read => !write,
            PageState::Write => true,
        };
        if satisfied {
            // Resolved while the fault message was queued: let the thread retry.
            return self.mem.wake(page);
        }
        if l.pending.is_some() {
            // Coalesced: the thread is woken when the page arrives (and faults again if the
            // access granted is not enough). A read-ahead in flight is now wanted: it is
            // installed when it arrives instead of waiting in the buffer.
            if l.ahead && !l.waiting {
                self.local[i].waiting = true;
                inc(&self.stats.read_ahead_used, 1);
            }
            if !write {
                self.stream(page);
            }
            return Ok(());
        }
        if self.failed {
            // Parked: see `peer_lost`.
            inc(&self.stats.failed_faults, 1);
            return Ok(());
        }
        let access = if write { Access::Write } else { Access::Read };
        if write {
            inc(&self.stats.write_faults, 1);
        } else {
            inc(&self.stats.read_faults, 1);
        }
        let have = if l.state == PageState::Invalid {
            0
        } else {
            l.version
        };
        self.local[i].pending = Some(access);
        let m = self.manager(page);
        self.send(m, Msg::GetPage { access, page, have });
        if !write {
            self.stream(page);
        }
        Ok(())
    }

    /// Notes a read fault on `page`; when it follows one on the page before (a stream), asks
    /// for the next `read_ahead` pages that this node neither holds nor has asked for.
    fn stream(&mut self, page: u64) {
        let sequential = page > 0 && self.last_read == Some(page - 1);
        self.last_read = Some(page);
        if !sequential || self.read_ahead == 0 || self.failed {
            return;
        }
        let end = page
            .saturating_add(self.read_ahead)
            .min(self.local.len() as u64 - 1);
        for q in page + 1..=end {
            let l = self.local[Self::idx(q)];
            // An owner that holds nothing has the zero page at hand: never worth asking for.
            if l.state != PageState::Invalid || l.pending.is_some() || l.owner {
                continue;
            }
            let l = &mut self.local[Self::idx(q)];
            l.pending = Some(Access::Read);
            l.ahead = true;
            l.waiting = false;
            inc(&self.stats.read_ahead_requested, 1);
            let m = self.manager(q);
            self.send(
                m,
                Msg::GetPage {
                    access: Access::Read,
                    page: q,
                    have: 0,
                },
            );
        }
    }

    /// The most read-ahead pages held unmapped at once.
    fn ahead_cap(&self) -> usize {
        usize::try_from(self.read_ahead.saturating_mul(4).max(64)).unwrap_or(usize::MAX)
    }

    /// Keeps a read-ahead page unmapped (a read copy at `version`), evicting the oldest
    /// buffered page when the buffer is full. An evicted copy is simply forgotten: the
    /// manager may still count this node as a holder, and a later INV_PAGE for it is
    /// acknowledged as for any invalid page.
    fn buffer(&mut self, page: u64, data: Vec<u8>) {
        while self.ahead_pages.len() >= self.ahead_cap() {
            let Some(old) = self.ahead_order.pop_front() else {
                break;
            };
            if self.ahead_pages.remove(&old).is_some() {
                let l = &mut self.local[Self::idx(old)];
                l.buffered = false;
                l.state = PageState::Invalid;
                l.version = 0;
                inc(&self.stats.read_ahead_wasted, 1);
            }
        }
        self.ahead_pages.insert(page, data);
        self.ahead_order.push_back(page);
        if self.ahead_order.len() > 2 * self.ahead_cap() {
            let live = &self.ahead_pages;
            self.ahead_order.retain(|p| live.contains_key(p));
        }
    }

    /// Handles a message from node `from` (`from == me` for a node's message to itself).
    pub fn handle(&mut self, from: u32, msg: Msg, now: Instant) -> Result<(), ProtoError> {
        if matches!(msg, Msg::Ping) {
            // Counted apart: its bytes were counted as received, take them back out.
            inc(&self.stats.heartbeats_received, 1);
            let ping = (crate::proto::LEN_BYTES + crate::proto::HEAD_BYTES) as u64;
            let _ =
                self.stats
                    .bytes_received
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                        Some(b.saturating_sub(ping))
                    });
            return Ok(());
        }
        if from != self.me {
            inc(&self.stats.messages_received, 1);
            if self.dead & bit(from) != 0 {
                // Read before its connection closed, handled after its loss: forgotten, as
                // everything else it sent after the last message handled.
                return Ok(());
            }
        }
        if let Some(r) = self.mirror.as_mut().and_then(|m| m.recovery.as_mut()) {
            if matches!(
                msg,
                Msg::GetPage { .. } | Msg::VldPage { .. } | Msg::InvAck { .. }
            ) {
                // The directory is being repaired: the manager side waits for it (bounded:
                // a live node has at most a few requests per page outstanding).
                if r.held.len() >= 4 * self.local.len() + 1024 {
                    return Err(ProtoError(format!(
                        "{} from node {from}: too many messages held during a recovery",
                        msg.name()
                    )));
                }
                r.held.push_back((from, msg));
                return Ok(());
            }
        }
        match msg {
            Msg::Init { .. } => Err(ProtoError("INIT after the connection was set up".into())),
            Msg::Ping => Ok(()),
            Msg::Mirror {
                page,
                version,
                contents,
                initial,
            } => self.on_mirror(from, page, version, contents, initial),
            Msg::Lost { node } => self.on_lost(from, node),
            Msg::Claim {
                page,
                version,
                claim,
            } => self.on_claim(from, page, version, claim),
            Msg::GetPage { access, page, have } => self.on_get(from, access, page, have),
            Msg::FwdPage { page, .. } | Msg::InvPage { page } => {
                if self.manager(page) != from {
                    return Err(ProtoError(format!(
                        "{} for page {page} from node {from}, which does not manage it",
                        msg.name()
                    )));
                }
                let held = self.installed[Self::idx(page)]
                    .map(|t| t + self.hold)
                    .filter(|due| *due > now);
                let own = matches!(msg, Msg::FwdPage { requester, .. } if requester == self.me);
                match held {
                    Some(due) if !own => {
                        self.deferred.push_back(Deferred { due, from, msg });
                        Ok(())
                    }
                    _ => self.on_taken(from, msg),
                }
            }
            Msg::Page {
                access,
                page,
                version,
                data,
            } => self.on_page(from, access, page, version, data, now),
            Msg::InvAck { page } => self.on_inv_ack(from, page),
            Msg::VldPage {
                access,
                page,
                version,
            } => self.on_vld(from, access, page, version),
        }
    }

    /// When the earliest deferred message is due.
    pub fn next_due(&self) -> Option<Instant> {
        let push = self.mirror.as_ref().and_then(|m| match &m.recovery {
            Some(r) => r
                .since
                .map(|t| t + RECOVERY_TIMEOUT + Duration::from_millis(1)),
            None => m.next_push,
        });
        self.deferred.iter().map(|d| d.due).chain(push).min()
    }

    /// Handles the deferred messages whose hold time has passed; errors name their sender.
    pub fn run_due(&mut self, now: Instant) -> Vec<(u32, ProtoError)> {
        let mut errs = Vec::new();
        let mut keep = VecDeque::new();
        while let Some(d) = self.deferred.pop_front() {
            if d.due <= now {
                if let Err(e) = self.on_taken(d.from, d.msg) {
                    errs.push((d.from, e));
                }
            } else {
                keep.push_back(d);
            }
        }
        self.deferred = keep;
        self.push(now);
        errs
    }

    fn on_get(
        &mut self,
        from: u32,
        access: Access,
        page: u64,
        have: u64,
    ) -> Result<(), ProtoError> {
        if self.manager(page) != self.me {
            return Err(ProtoError(format!(
                "GET_PAGE for page {page} sent to node {}, which does not manage it",
                self.me
            )));
        }
        let nodes = self.nodes as usize;
        let d = self.dir_mut(page);
        let dup = d.busy.as_ref().is_some_and(|t| t.requester == from)
            || d.queue.iter().any(|q| q.0 == from);
        if dup || d.queue.len() >= nodes {
            return Err(ProtoError(format!(
                "GET_PAGE for page {page} from node {from}, which already has one outstanding"
            )));
        }
        d.queue.push_back((from, access, have));
        if d.busy.is_none() {
            self.start(page);
        }
        Ok(())
    }

    /// Starts the next queued transaction on `page` (the manager's side).
    fn start(&mut self, page: u64) {
        let d = self.dir_mut(page);
        let Some((requester, access, have)) = d.queue.pop_front() else {
            return;
        };
        let mut acks = 0;
        if access == Access::Write {
            acks = d.copyset & !bit(requester) & !bit(d.owner);
        }
        d.busy = Some(Txn {
            requester,
            access,
            have,
            acks,
        });
        if acks == 0 {
            self.forward(page);
        } else {
            for n in 0..self.nodes {
                if acks & bit(n) != 0 {
                    self.send(n, Msg::InvPage { page });
                }
            }
        }
    }

    fn forward(&mut self, page: u64) {
        let dead = self.dead;
        let d = self.dir_mut(page);
        let owner = d.owner;
        if d.busy
            .as_ref()
            .is_some_and(|t| dead & bit(t.requester) != 0)
        {
            // Its requester was lost while the invalidations were out: nothing to grant.
            d.busy = None;
            if !d.queue.is_empty() {
                self.start(page);
            }
            return;
        }
        if let Some(t) = &d.busy {
            let m = Msg::FwdPage {
                access: t.access,
                page,
                have: t.have,
                requester: t.requester,
            };
            self.send(owner, m);
        }
    }

    fn on_inv_ack(&mut self, from: u32, page: u64) -> Result<(), ProtoError> {
        if self.manager(page) != self.me {
            return Err(ProtoError(format!(
                "INV_ACK for page {page}, which node {} does not manage",
                self.me
            )));
        }
        let d = self.dir_mut(page);
        match &mut d.busy {
            Some(t) if t.acks & bit(from) != 0 => {
                t.acks &= !bit(from);
                d.copyset &= !bit(from);
                if t.acks == 0 {
                    self.forward(page);
                }
                Ok(())
            }
            _ => Err(ProtoError(format!(
                "INV_ACK for page {page} from node {from}, which was not invalidated"
            ))),
        }
    }

    fn on_vld(
        &mut self,
        from: u32,
        access: Access,
        page: u64,
        version: u64,
    ) -> Result<(), ProtoError> {
        if self.manager(page) != self.me {
            return Err(ProtoError(format!(
                "VLD_PAGE for page {page}, which node {} does not manage",
                self.me
            )));
        }
        let d = self.dir_mut(page);
        let ok =
            matches!(&d.busy, Some(t) if t.requester == from && t.access == access && t.acks == 0);
        if !ok {
            return Err(ProtoError(format!(
                "VLD_PAGE for page {page} from node {from}, which has no transaction for it in progress"
            )));
        }
        let expect = match access {
            Access::Read => d.version,
            Access::Write => d.version.saturating_add(1),
        };
        if version != expect {
            return Err(ProtoError(format!(
                "VLD_PAGE for page {page} at version {version}, expected {expect}"
            )));
        }
        match access {
            Access::Read => d.copyset |= bit(from),
            Access::Write => {
                d.owner = from;
                d.copyset = bit(from);
                d.version = version;
            }
        }
        d.busy = None;
        if !d.queue.is_empty() {
            self.start(page);
        }
        Ok(())
    }

    fn local_err(page: u64, what: &str, e: io::Error) -> ProtoError {
        ProtoError(format!("{what} of page {page} failed: {e}"))
    }

    /// FWD_PAGE (to the owner) or INV_PAGE (to a copy holder), after any hold time.
    fn on_taken(&mut self, from: u32, msg: Msg) -> Result<(), ProtoError> {
        match msg {
            Msg::InvPage { page } => {
                let l = self.local[Self::idx(page)];
                if l.owner {
                    return Err(ProtoError(format!(
                        "INV_PAGE for page {page}, which this node owns"
                    )));
                }
                if l.buffered {
                    self.ahead_pages.remove(&page);
                    inc(&self.stats.read_ahead_wasted, 1);
                    inc(&self.stats.invalidations, 1);
                } else if l.state != PageState::Invalid {
                    self.mem
                        .drop_page(page)
                        .map_err(|e| Self::local_err(page, "dropping", e))?;
                    inc(&self.stats.invalidations, 1);
                }
                let l = &mut self.local[Self::idx(page)];
                l.state = PageState::Invalid;
                l.version = 0;
                l.buffered = false;
                self.send(from, Msg::InvAck { page });
                Ok(())
            }
            Msg::FwdPage {
                access,
                page,
                have,
                requester,
            } => self.on_fwd(access, page, have, requester),
            _ => Ok(()),
        }
    }

    fn on_fwd(
        &mut self,
        access: Access,
        page: u64,
        have: u64,
        requester: u32,
    ) -> Result<(), ProtoError> {
        let i = Self::idx(page);
        let l = self.local[i];
        if !l.owner {
            return Err(ProtoError(format!(
                "FWD_PAGE for page {page}, which this node does not own"
            )));
        }
        if self.dead & bit(requester) != 0 {
            // For a node lost since: its manager drops the transaction in the recovery.
            return Ok(());
        }
        if l.state == PageState::Invalid && l.version != 0 {
            return Err(ProtoError(format!(
                "page {page} owned but not held at version {}",
                l.version
            )));
        }
        if l.state == PageState::Write {
            // Stop writers first: the contents sent are then the contents of this version.
            self.mem
                .protect(page)
                .map_err(|e| Self::local_err(page, "write-protecting", e))?;
            self.local[i].state = PageState::Read;
        }
        if self.mirror.is_some() {
            self.mirror_on_fwd(access, page, requester, l);
        }
        let unchanged = have == l.version && (self.versioning || requester == self.me);
        let data = if unchanged {
            None
        } else if l.state == PageState::Invalid {
            Some(self.zero.clone())
        } else if l.buffered {
            // Not reached (an owner's copy is always mapped), but a buffered copy is current.
            self.ahead_pages.get(&page).cloned()
        } else {
            let mut buf = vec![0; self.page_size];
            self.mem.read(page, &mut buf);
            Some(buf)
        };
        if requester != self.me {
            if unchanged {
                inc(&self.stats.unchanged_sent, 1);
            } else {
                inc(&self.stats.pages_sent, 1);
            }
        }
        if access == Access::Write && requester != self.me {
            if l.buffered {
                self.ahead_pages.remove(&page);
            } else if self.local[i].state != PageState::Invalid {
                self.mem
                    .drop_page(page)
                    .map_err(|e| Self::local_err(page, "dropping", e))?;
                inc(&self.stats.invalidations, 1);
            }
            self.local[i] = Local {
                pending: l.pending,
                ahead: l.ahead,
                waiting: l.waiting,
                ..Local::new(false)
            };
        }
        self.send(
            requester,
            Msg::Page {
                access,
                page,
                version: l.version,
                data,
            },
        );
        Ok(())
    }

    fn on_page(
        &mut self,
        from: u32,
        access: Access,
        page: u64,
        version: u64,
        data: Option<Vec<u8>>,
        now: Instant,
    ) -> Result<(), ProtoError> {
        let i = Self::idx(page);
        let l = self.local[i];
        if l.pending != Some(access) {
            return Err(ProtoError(format!(
                "PAGE ({access:?}) for page {page} from node {from}, which this node did not request"
            )));
        }
        // Counted before the page is installed: installing wakes the faulting threads.
        if from != self.me {
            if data.is_some() {
                inc(&self.stats.pages_received, 1);
            } else {
                inc(&self.stats.unchanged_received, 1);
            }
        }
        let wp = access == Access::Read;
        let mapped = l.state != PageState::Invalid && !l.buffered;
        if l.ahead && !l.waiting && !mapped {
            // A read-ahead nobody has faulted on yet: keep it unmapped until one does.
            let contents = match data {
                Some(d) => d,
                None if version == 0 => self.zero.clone(),
                None => {
                    return Err(ProtoError(format!(
                        "PAGE unchanged for page {page} at version {version}, which this node does not hold"
                    )))
                }
            };
            self.buffer(page, contents);
            self.local[i] = Local {
                state: PageState::Read,
                version,
                buffered: true,
                ..Local::new(l.owner)
            };
            let m = self.manager(page);
            self.send(
                m,
                Msg::VldPage {
                    access,
                    page,
                    version,
                },
            );
            return Ok(());
        }
        let new_version = match access {
            Access::Read => version,
            Access::Write => version.checked_add(1).ok_or_else(|| {
                ProtoError(format!(
                    "PAGE for page {page} at version {version}, the last one"
                ))
            })?,
        };
        match &data {
            Some(d) => {
                if mapped {
                    self.mem
                        .drop_page(page)
                        .map_err(|e| Self::local_err(page, "dropping", e))?;
                }
                self.mem
                    .install(page, d, wp)
                    .map_err(|e| Self::local_err(page, "installing", e))?;
            }
            None if mapped => {
                if l.version != version {
                    return Err(ProtoError(format!(
                        "PAGE unchanged for page {page} at version {version}, this node holds {}",
                        l.version
                    )));
                }
                if access == Access::Write && l.state == PageState::Read {
                    self.mem
                        .unprotect(page)
                        .map_err(|e| Self::local_err(page, "unprotecting", e))?;
                } else {
                    self.mem
                        .wake(page)
                        .map_err(|e| Self::local_err(page, "waking", e))?;
                }
            }
            None => {
                if version != 0 {
                    return Err(ProtoError(format!(
                        "PAGE unchanged for page {page} at version {version}, which this node does not hold"
                    )));
                }
                let zero = std::mem::take(&mut self.zero);
                let r = self.mem.install(page, &zero, wp);
                self.zero = zero;
                r.map_err(|e| Self::local_err(page, "installing", e))?;
            }
        }
        self.local[i] = Local {
            state: if wp {
                PageState::Read
            } else {
                PageState::Write
            },
            version: new_version,
            ..Local::new(l.owner || access == Access::Write)
        };
        if self.hold > Duration::ZERO {
            self.installed[i] = Some(now);
        }
        let m = self.manager(page);
        self.send(
            m,
            Msg::VldPage {
                access,
                page,
                version: new_version,
            },
        );
        Ok(())
    }
    // ---- Mirroring (docs/DSM.md, "Mirroring") ----

    /// The contents of `page`, which this node holds write-protected (or owns as the zero
    /// page), for a MIRROR message.
    fn contents(&mut self, page: u64) -> MirrorData {
        let l = self.local[Self::idx(page)];
        if l.state == PageState::Invalid {
            return MirrorData::Zero;
        }
        let mut buf = vec![0; self.page_size];
        self.mem.read(page, &mut buf);
        if buf.iter().all(|&b| b == 0) {
            MirrorData::Zero
        } else {
            MirrorData::Data(buf)
        }
    }

    fn send_mirror(
        &mut self,
        to: u32,
        page: u64,
        version: u64,
        contents: MirrorData,
        initial: bool,
    ) {
        if to != self.me {
            inc(&self.stats.mirror_sent, 1);
        }
        self.send(
            to,
            Msg::Mirror {
                page,
                version,
                contents,
                initial,
            },
        );
    }

    /// The owner serving a FWD_PAGE (`l` its state before; the page is write-protected
    /// now): a write grant's contents go to the new holder's mirror node (the oldest
    /// contents of the new version), a dirty page given up (downgraded for a reader) to this
    /// node's mirror node. Records what was served, for a recovery's claims.
    fn mirror_on_fwd(&mut self, access: Access, page: u64, requester: u32, l: Local) {
        let i = Self::idx(page);
        let me = self.me;
        let next = l.version.saturating_add(1);
        match access {
            Access::Write if requester != me => {
                if let Some(t) = self.mirror_node(page, requester) {
                    let c = self.contents(page);
                    self.send_mirror(t, page, next, c, true);
                }
                if let Some(m) = self.mirror.as_mut() {
                    m.mirrored[i] = None;
                }
            }
            Access::Write => {
                if let Some(t) = self.mirror_node(page, me) {
                    let same = self.mirror.as_ref().and_then(|m| m.mirrored[i]) == Some(l.version);
                    let c = if same && l.version > 0 {
                        MirrorData::Same { base: l.version }
                    } else {
                        self.contents(page)
                    };
                    self.send_mirror(t, page, next, c, true);
                    if let Some(m) = self.mirror.as_mut() {
                        m.mirrored[i] = Some(next);
                    }
                }
            }
            Access::Read if l.state == PageState::Write => {
                if let Some(t) = self.mirror_node(page, me) {
                    let c = self.contents(page);
                    self.send_mirror(t, page, l.version, c, false);
                    if let Some(m) = self.mirror.as_mut() {
                        m.mirrored[i] = Some(l.version);
                    }
                }
            }
            Access::Read => {}
        }
        if let Some(m) = self.mirror.as_mut() {
            m.gave[i] = Some((requester, access, l.version));
        }
    }

    fn on_mirror(
        &mut self,
        from: u32,
        page: u64,
        version: u64,
        contents: MirrorData,
        initial: bool,
    ) -> Result<(), ProtoError> {
        if from != self.me {
            inc(&self.stats.mirror_received, 1);
        }
        let Some(m) = self.mirror.as_mut() else {
            return Err(ProtoError(format!(
                "MIRROR for page {page} to a node that does not mirror"
            )));
        };
        let cur = m.store.get(&page).map(|e| e.0);
        let data = match contents {
            MirrorData::Same { base } => {
                return match m.store.get_mut(&page) {
                    Some(e) if e.0 == base => {
                        e.0 = version;
                        Ok(())
                    }
                    _ => Err(ProtoError(format!(
                        "MIRROR for page {page} unchanged from version {base}, which this node does not hold"
                    ))),
                };
            }
            MirrorData::Data(d) => Some(d),
            MirrorData::Zero => None,
        };
        // Older contents never replace newer ones; a hand-off's copy never replaces a push
        // of the same version (which holds later writes).
        if cur.is_some_and(|c| c > version || (c == version && initial)) {
            return Ok(());
        }
        m.store.insert(page, (version, data));
        Ok(())
    }

    /// The periodic push: every `interval`, the pages this node holds writable are
    /// write-protected (so that the next write faults and asks again) and copied to their
    /// mirror node; pages whose mirror node changed go first. At most [`PUSH_BUDGET`] pages a
    /// round.
    fn push(&mut self, now: Instant) {
        let Some(m) = self.mirror.as_mut() else {
            return;
        };
        if let Some(r) = m.recovery.as_mut() {
            let since = *r.since.get_or_insert(now);
            if now.saturating_duration_since(since) > RECOVERY_TIMEOUT && !self.failed {
                let (lost, waiting) = (r.lost, r.waiting);
                let nodes: Vec<String> = (0..self.nodes)
                    .filter(|&n| waiting & bit(n) != 0)
                    .map(|n| n.to_string())
                    .collect();
                self.fail(format!(
                    "the recovery from the loss of node {lost} did not complete in {} s: no report from node(s) {}",
                    RECOVERY_TIMEOUT.as_secs(),
                    nodes.join(", ")
                ));
            }
            return;
        }
        if self.failed {
            return;
        }
        match m.next_push {
            None => {
                m.next_push = Some(now + m.interval);
                return;
            }
            Some(t) if t > now => return,
            Some(_) => {}
        }
        let mut budget = PUSH_BUDGET;
        while budget > 0 {
            let Some(p) = self.mirror.as_mut().and_then(|m| m.resync.pop_front()) else {
                break;
            };
            let l = self.local[Self::idx(p)];
            if l.owner && l.state != PageState::Invalid {
                if let Err(e) = self.push_page(p) {
                    self.fail(e);
                    return;
                }
                budget -= 1;
            }
        }
        let pages = self.local.len() as u64;
        let mut p = self.mirror.as_ref().map_or(0, |m| m.cursor) % pages.max(1);
        let mut scanned = 0;
        while budget > 0 && scanned < pages {
            let l = self.local[Self::idx(p)];
            if l.owner && l.state == PageState::Write {
                if let Err(e) = self.push_page(p) {
                    self.fail(e);
                    return;
                }
                inc(&self.stats.mirror_pushes, 1);
                budget -= 1;
            }
            p = (p + 1) % pages;
            scanned += 1;
        }
        if let Some(m) = self.mirror.as_mut() {
            m.cursor = p;
            m.next_push = Some(if budget == 0 {
                now + Duration::from_millis(1)
            } else {
                now + m.interval
            });
        }
    }

    /// Write-protects `page` if this node holds it writable, and copies it to its mirror node.
    fn push_page(&mut self, page: u64) -> Result<(), String> {
        let i = Self::idx(page);
        if self.local[i].state == PageState::Write {
            self.mem
                .protect(page)
                .map_err(|e| format!("write-protecting page {page} for its mirror: {e}"))?;
            self.local[i].state = PageState::Read;
        }
        let Some(t) = self.mirror_node(page, self.me) else {
            return Ok(());
        };
        let v = self.local[i].version;
        let c = self.contents(page);
        self.send_mirror(t, page, v, c, false);
        if let Some(m) = self.mirror.as_mut() {
            m.mirrored[i] = Some(v);
        }
        Ok(())
    }

    fn on_lost(&mut self, from: u32, node: u32) -> Result<(), ProtoError> {
        if self.mirror.is_none() {
            return Err(ProtoError(format!(
                "LOST for node {node} to a node that does not mirror"
            )));
        }
        if node == self.me {
            self.fail(format!("node {from} lost this node"));
            return Ok(());
        }
        if self.dead & bit(node) == 0 {
            self.to_close.push((node, format!("lost by node {from}")));
            self.peer_lost(node);
        }
        Ok(())
    }

    fn on_claim(
        &mut self,
        from: u32,
        page: u64,
        version: u64,
        claim: Claim,
    ) -> Result<(), ProtoError> {
        let manager = self.manager(page);
        let Some(r) = self.mirror.as_mut().and_then(|m| m.recovery.as_mut()) else {
            return Err(ProtoError(format!(
                "CLAIM from node {from} with no recovery in progress"
            )));
        };
        match claim {
            Claim::End { lost } => {
                if lost != r.lost || r.waiting & bit(from) == 0 {
                    return Err(ProtoError(format!(
                        "end of claims for node {lost} from node {from}, which this node did not expect"
                    )));
                }
                r.waiting &= !bit(from);
                if r.waiting == 0 {
                    self.finish_recovery();
                }
                Ok(())
            }
            _ if manager != self.me => Err(ProtoError(format!(
                "CLAIM for page {page} sent to node {}, which does not manage it",
                self.me
            ))),
            // At most three claims (owner, gave, want) per page from each node.
            _ if r.claims.len() >= 3 * self.local.len() * self.nodes as usize => {
                Err(ProtoError(format!("too many claims from node {from}")))
            }
            c => {
                r.claims.push((from, page, version, c));
                Ok(())
            }
        }
    }

    /// Every live node has reported: repair the directory entries of the pages this node
    /// managed (the lost node's copies, requests and ownership), rebuild those of the pages
    /// the lost node managed that this node manages now, then handle the held messages.
    fn finish_recovery(&mut self) {
        let Some(r) = self.mirror.as_mut().and_then(|m| m.recovery.take()) else {
            return;
        };
        let lost = r.lost;
        let before = self.dead & !bit(lost);
        if let Err(e) = self
            .repair_managed(lost, before)
            .and_then(|()| self.adopt(lost, before, r.claims))
        {
            self.fail(e);
            return;
        }
        inc(&self.stats.recoveries, 1);
        let now = Instant::now();
        for (from, msg) in r.held {
            if let Err(e) = self.handle(from, msg, now) {
                self.to_close.push((from, e.0));
            }
        }
    }

    fn repair_managed(&mut self, lost: u32, before: u64) -> Result<(), String> {
        let me = self.me;
        let mut pages: Vec<u64> = (u64::from(me)..self.local.len() as u64)
            .step_by(self.nodes as usize)
            .collect();
        pages.extend(self.adopted.keys().copied());
        for p in pages {
            if self.manager_among(p, before) != me {
                continue;
            }
            let stored = self
                .mirror
                .as_ref()
                .and_then(|m| m.store.get(&p).map(|e| e.0));
            let d = self.dir_mut(p);
            d.copyset &= !bit(lost);
            d.queue.retain(|q| q.0 != lost);
            let owner_lost = d.owner == lost;
            let version = d.version;
            let mut close = false;
            let mut forward = false;
            let mut rehome = None;
            if let Some(t) = d.busy.as_mut() {
                let had_acks = t.acks != 0;
                t.acks &= !bit(lost);
                if t.requester == lost {
                    if t.acks == 0 {
                        close = true;
                        if stored.is_some_and(|v| v > version) || owner_lost {
                            // Granted to the lost node (its mirror copy is here), or the lost
                            // node was upgrading its own page.
                            rehome = Some(version);
                        }
                    }
                } else if owner_lost {
                    rehome = Some(version);
                    forward = t.acks == 0;
                } else {
                    forward = had_acks && t.acks == 0;
                }
            } else if owner_lost {
                rehome = Some(version);
            }
            if let Some(min) = rehome {
                let v = self.rehome(p, min, lost)?;
                let d = self.dir_mut(p);
                d.owner = me;
                d.version = v;
                d.copyset |= bit(me);
            }
            let d = self.dir_mut(p);
            if close {
                d.busy = None;
            }
            if forward {
                self.forward(p);
            } else if self.dir_mut(p).busy.is_none() && !self.dir_mut(p).queue.is_empty() {
                self.start(p);
            }
        }
        Ok(())
    }

    fn adopt(
        &mut self,
        lost: u32,
        before: u64,
        claims: Vec<(u32, u64, u64, Claim)>,
    ) -> Result<(), String> {
        let me = self.me;
        let live = self.live();
        let mut by_page: HashMap<u64, Vec<(u32, u64, Claim)>> = HashMap::new();
        for (from, page, version, claim) in claims {
            by_page
                .entry(page)
                .or_default()
                .push((from, version, claim));
        }
        for p in 0..self.local.len() as u64 {
            if self.manager_among(p, before) != lost || self.manager(p) != me {
                continue;
            }
            let cl = by_page.remove(&p).unwrap_or_default();
            let mut owner: Option<(u32, u64)> = None;
            let mut write_gave: Option<(u32, u64)> = None;
            for &(from, v, c) in &cl {
                match c {
                    Claim::Owner => {
                        if let Some((o, _)) = owner {
                            return Err(format!("nodes {o} and {from} both own page {p}"));
                        }
                        owner = Some((from, v));
                    }
                    Claim::Gave {
                        to,
                        access: Access::Write,
                    } => {
                        let nv = v.saturating_add(1);
                        if write_gave.is_none_or(|w| w.1 < nv) {
                            write_gave = Some((to, nv));
                        }
                    }
                    _ => {}
                }
            }
            let stored = self
                .mirror
                .as_ref()
                .and_then(|m| m.store.get(&p).map(|e| e.0));
            let top = [owner.map(|o| o.1), write_gave.map(|w| w.1), stored]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(0);
            let want = |n: u32, a: Access| {
                cl.iter().find_map(|&(from, v, c)| match c {
                    Claim::Want { access } if from == n && access == a => Some(v),
                    _ => None,
                })
            };
            let mut d = Dir::new();
            let mut consumed = None;
            if let Some((o, v)) = owner.filter(|o| o.1 == top) {
                d.owner = o;
                d.version = v;
                // A read copy the owner sent that its requester had not received when it
                // reported: the transaction is still open, its VLD_PAGE comes here.
                let read_gave = cl.iter().find_map(|&(from, gv, c)| match c {
                    Claim::Gave {
                        to,
                        access: Access::Read,
                    } if from == o && gv == v => Some(to),
                    _ => None,
                });
                if let Some(r) = read_gave.filter(|&r| live & bit(r) != 0) {
                    if let Some(have) = want(r, Access::Read) {
                        d.busy = Some(Txn {
                            requester: r,
                            access: Access::Read,
                            have,
                            acks: 0,
                        });
                        consumed = Some((r, Access::Read));
                    }
                }
            } else if let Some((r, v)) = write_gave.filter(|w| w.1 == top && live & bit(w.0) != 0) {
                // Write access granted to a live node that had not received it when it
                // reported: it owns the page once it does (its VLD_PAGE comes here).
                d.owner = r;
                d.version = v - 1;
                d.busy = Some(Txn {
                    requester: r,
                    access: Access::Write,
                    have: want(r, Access::Write).unwrap_or(0),
                    acks: 0,
                });
                consumed = Some((r, Access::Write));
            } else if top == 0 && live & 1 != 0 && me != 0 {
                d.owner = 0;
            } else if top == 0 || stored == Some(top) {
                // The lost node held the latest version: its mirror copy is here.
                d.version = self.rehome(p, top, lost)?;
                d.owner = me;
            } else {
                return Err(format!(
                    "page {p}: its latest version ({top}) was only on node {lost}"
                ));
            }
            d.copyset = live & !bit(d.owner);
            for &(from, have, c) in &cl {
                if let Claim::Want { access } = c {
                    if consumed != Some((from, access)) {
                        d.queue.push_back((from, access, have));
                    }
                }
            }
            let start = d.busy.is_none() && !d.queue.is_empty();
            self.adopted.insert(p, d);
            if start {
                self.start(p);
            }
        }
        Ok(())
    }

    /// This node takes ownership of `page` from its mirror copy (at least version `min`),
    /// mapped write-protected, and returns the version.
    fn rehome(&mut self, page: u64, min: u64, lost: u32) -> Result<u64, String> {
        let entry = self.mirror.as_mut().and_then(|m| m.store.remove(&page));
        let (v, data) = entry.unwrap_or((0, None));
        if v < min {
            return Err(format!(
                "page {page}: version {min} was only on node {lost} (the mirror holds {v})"
            ));
        }
        let i = Self::idx(page);
        let l = self.local[i];
        if l.state != PageState::Invalid && l.version == v {
            self.local[i].owner = true;
        } else {
            if l.state != PageState::Invalid {
                self.mem
                    .drop_page(page)
                    .map_err(|e| format!("dropping page {page}: {e}"))?;
            }
            if v == 0 && data.is_none() {
                self.local[i] = Local {
                    pending: l.pending,
                    ..Local::new(true)
                };
            } else {
                let r = match &data {
                    Some(d) => self.mem.install(page, d, true),
                    None => {
                        let zero = std::mem::take(&mut self.zero);
                        let r = self.mem.install(page, &zero, true);
                        self.zero = zero;
                        r
                    }
                };
                r.map_err(|e| format!("installing page {page} from its mirror: {e}"))?;
                self.local[i] = Local {
                    state: PageState::Read,
                    version: v,
                    pending: l.pending,
                    ..Local::new(true)
                };
            }
        }
        if v > 0 {
            // Its contents now live here only: pushed to this node's mirror node first.
            if let Some(m) = self.mirror.as_mut() {
                m.resync.push_back(page);
            }
            inc(&self.stats.pages_rehomed, 1);
        }
        Ok(v)
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // page numbers and node ids of a tiny simulated cluster
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Memory as a page table of (contents, write-protected).
    #[derive(Default)]
    struct Fake {
        pages: Vec<Option<(Vec<u8>, bool)>>,
    }

    impl PageOps for Fake {
        fn install(&mut self, page: u64, data: &[u8], wp: bool) -> io::Result<()> {
            let slot = &mut self.pages[page as usize];
            assert!(slot.is_none(), "install over a mapped page");
            *slot = Some((data.to_vec(), wp));
            Ok(())
        }
        fn protect(&mut self, page: u64) -> io::Result<()> {
            self.pages[page as usize]
                .as_mut()
                .expect("protect unmapped")
                .1 = true;
            Ok(())
        }
        fn unprotect(&mut self, page: u64) -> io::Result<()> {
            self.pages[page as usize]
                .as_mut()
                .expect("unprotect unmapped")
                .1 = false;
            Ok(())
        }
        fn drop_page(&mut self, page: u64) -> io::Result<()> {
            self.pages[page as usize] = None;
            Ok(())
        }
        fn read(&mut self, page: u64, out: &mut [u8]) {
            out.copy_from_slice(&self.pages[page as usize].as_ref().expect("read unmapped").0);
        }
        fn wake(&mut self, _page: u64) -> io::Result<()> {
            Ok(())
        }
    }

    const PS: usize = 64;

    struct Sim(Vec<Engine<Fake>>);

    impl Sim {
        fn new(n: u32, pages: u64) -> Sim {
            Sim((0..n)
                .map(|me| {
                    let mem = Fake {
                        pages: vec![None; pages as usize],
                    };
                    Engine::new(
                        me,
                        n,
                        PS,
                        pages,
                        mem,
                        Duration::ZERO,
                        Arc::new(Stats::default()),
                    )
                })
                .collect())
        }
        /// A simulated cluster whose engines are set up by `f` first.
        fn with(n: u32, pages: u64, f: impl Fn(&mut Engine<Fake>)) -> Sim {
            let mut s = Sim::new(n, pages);
            s.0.iter_mut().for_each(f);
            s
        }
        /// Delivers every message (FIFO per sender) until the cluster is quiet.
        fn settle(&mut self) {
            loop {
                let mut any = false;
                for i in 0..self.0.len() {
                    while let Some((to, m)) = self.0[i].next_out() {
                        any = true;
                        self.0[to as usize]
                            .handle(i as u32, m, Instant::now())
                            .unwrap();
                    }
                }
                if !any {
                    return;
                }
            }
        }
        /// An access by node `n`: faults until the page allows it, then reads or writes byte 0.
        fn access(&mut self, n: usize, page: u64, write: Option<u8>) -> u8 {
            for _ in 0..4 {
                let slot = self.0[n].mem.pages[page as usize].clone();
                match (slot, write) {
                    (Some((d, _)), None) => return d[0],
                    (Some((_, false)), Some(v)) => {
                        self.0[n].mem.pages[page as usize].as_mut().unwrap().0[0] = v;
                        return v;
                    }
                    _ => {
                        self.0[n].fault(page, write.is_some()).unwrap();
                        self.settle();
                    }
                }
            }
            panic!("access never granted");
        }
        /// One read access by node `n` of page `page`: the value, or None when its fault was
        /// not served.
        fn access_once(&mut self, n: usize, page: u64) -> Option<u8> {
            if self.0[n].mem.pages[page as usize].is_none() {
                self.0[n].fault(page, false).unwrap();
                self.settle();
            }
            self.0[n].mem.pages[page as usize].as_ref().map(|p| p.0[0])
        }
        fn stats(&self, n: usize) -> StatsSnapshot {
            self.0[n].stats.snapshot()
        }
    }

    #[test]
    fn single_writer_many_readers_with_versions() {
        let mut s = Sim::new(3, 4);
        // A never-written page reads as zeros, with no data sent.
        assert_eq!(s.access(2, 1, None), 0);
        assert_eq!(s.stats(2).unchanged_received, 1);
        assert_eq!(s.stats(2).pages_received, 0);
        // A write elsewhere invalidates the reader; the new value is read back by all.
        s.access(1, 1, Some(7));
        assert!(s.0[2].mem.pages[1].is_none());
        assert_eq!(s.0[2].page_state(1), Some((PageState::Invalid, 0, false)));
        assert_eq!(s.access(2, 1, None), 7);
        assert_eq!(s.access(0, 1, None), 7);
        assert_eq!(s.0[1].page_state(1), Some((PageState::Read, 1, true)));
        // The owner (also the manager here) upgrades its read copy without any data: the
        // readers are invalidated and the grant is local.
        let before = s.stats(1);
        s.access(1, 1, Some(9));
        let d = s.stats(1).since(&before);
        assert_eq!((d.pages_received, d.messages_received), (0, 2));
        assert!(s.0[0].mem.pages[1].is_none() && s.0[2].mem.pages[1].is_none());
        // A reader's upgrade needs no data either.
        assert_eq!(s.access(2, 1, None), 9);
        let before = s.stats(2);
        s.access(2, 1, Some(11));
        let d = s.stats(2).since(&before);
        assert_eq!((d.pages_received, d.unchanged_received), (0, 1));
        assert_eq!(s.0[2].page_state(1), Some((PageState::Write, 3, true)));
        assert_eq!(s.0[1].page_state(1), Some((PageState::Invalid, 0, false)));
        assert_eq!(s.access(1, 1, None), 11);
    }

    #[test]
    fn without_versioning_current_and_zero_pages_are_sent_again() {
        for on in [true, false] {
            let mut s = Sim::with(2, 4, |e| e.set_versioning(on));
            // Never written: zeros, sent only without versioning.
            assert_eq!(s.access(1, 2, None), 0);
            let d = s.stats(1);
            assert_eq!(
                (d.pages_received, d.unchanged_received),
                if on { (0, 1) } else { (1, 0) }
            );
            // Node 0 writes page 3, node 1 reads it (data either way), then upgrades its
            // current copy: no data with versioning, the whole page again without.
            s.access(0, 3, Some(5));
            assert_eq!(s.access(1, 3, None), 5);
            let before = s.stats(1);
            s.access(1, 3, Some(6));
            let d = s.stats(1).since(&before);
            assert_eq!(
                (d.pages_received, d.unchanged_received),
                if on { (0, 1) } else { (1, 0) }
            );
            assert_eq!(s.access(0, 3, None), 6);
        }
    }

    /// Node 0 writes pages 0..32 (value p+1 in each), node 1 reads them in order.
    fn scan(read_ahead: u32) -> Sim {
        let mut s = Sim::with(2, 64, |e| e.set_read_ahead(read_ahead));
        for p in 0..32 {
            s.access(0, p, Some(p as u8 + 1));
        }
        for p in 0..32 {
            assert_eq!(s.access(1, p, None), p as u8 + 1, "page {p}");
        }
        s
    }

    #[test]
    fn read_ahead_serves_a_sequential_scan_with_fewer_faults() {
        let off = scan(0).stats(1);
        assert_eq!(off.read_faults, 32);
        assert_eq!((off.read_ahead_requested, off.read_ahead_used), (0, 0));
        let mut s = scan(8);
        let on = s.stats(1);
        // Page 0 starts nothing, page 1 starts the stream; every later page was read ahead
        // (and each use asks for one more page, up to 8 past the last one read).
        assert_eq!(on.read_faults, 2, "{on}");
        assert_eq!(on.read_ahead_used, 30, "{on}");
        assert_eq!(on.read_ahead_requested, 38, "{on}");
        // 32 pages with data; 32..40 never written, read ahead as "unchanged" zero pages
        // and buffered unmapped.
        assert_eq!((on.pages_received, on.unchanged_received), (32, 8), "{on}");
        assert_eq!(on.read_ahead_wasted, 0);
        assert!(s.0[1].mem.pages[33].is_none());
        assert_eq!(s.0[1].page_state(33), Some((PageState::Read, 0, false)));
        // A write by node 0 to buffered pages invalidates them: wasted.
        s.access(0, 33, Some(9));
        s.access(0, 34, Some(9));
        let d = s.stats(1).since(&on);
        assert_eq!((d.read_ahead_wasted, d.invalidations), (2, 2), "{d}");
        assert_eq!(s.access(1, 33, None), 9);
        // A write fault on a buffered page maps it, then upgrades it without data.
        let before = s.stats(1);
        s.access(1, 35, Some(4));
        let d = s.stats(1).since(&before);
        assert_eq!(
            (d.read_ahead_used, d.pages_received, d.unchanged_received),
            (1, 0, 1),
            "{d}"
        );
        assert_eq!(s.access(0, 35, None), 4);
    }

    #[test]
    fn read_ahead_buffer_is_bounded() {
        // 1 page ahead: the buffer holds at most 64 pages; a scan that never comes back to
        // them leaves at most that many, the oldest evicted as wasted.
        let mut s = Sim::with(2, 512, |e| e.set_read_ahead(1));
        for p in (0..400).step_by(2) {
            // Faults on even pages only: p and p+1 is never a stream...
            assert_eq!(s.access(1, p, None), 0);
        }
        assert_eq!(s.stats(1).read_ahead_requested, 0);
        let mut s = Sim::with(2, 512, |e| e.set_read_ahead(100));
        assert_eq!(s.access(1, 0, None), 0);
        assert_eq!(s.access(1, 1, None), 0);
        assert_eq!(s.stats(1).read_ahead_requested, 100);
        assert_eq!(s.0[1].ahead_pages.len(), 100);
        // Jump and stream again elsewhere: 100 more, 400 cap: nothing evicted yet.
        s.access(1, 200, None);
        s.access(1, 201, None);
        assert_eq!(s.0[1].ahead_pages.len(), 200);
        let mut s = Sim::with(2, 512, |e| e.set_read_ahead(20));
        for base in [0, 100, 200, 300, 400] {
            s.access(1, base, None);
            s.access(1, base + 1, None);
        }
        // 5 streams of 20 read ahead; the buffer keeps 80 (4 x 20, at least 64).
        let st = s.stats(1);
        assert_eq!(st.read_ahead_requested, 100, "{st}");
        assert_eq!(s.0[1].ahead_pages.len(), 80);
        assert_eq!(st.read_ahead_wasted, 20, "{st}");
        // An evicted page is simply fetched again.
        assert_eq!(s.0[1].page_state(2), Some((PageState::Invalid, 0, false)));
        assert_eq!(s.access(1, 2, None), 0);
    }

    #[test]
    fn a_failed_node_parks_faults_and_stops_reading_ahead() {
        let mut s = Sim::with(2, 8, |e| e.set_read_ahead(4));
        assert_eq!(s.access(1, 0, None), 0);
        s.0[1].peer_lost(0);
        assert!(s.0[1].failed());
        // Already mapped: still served. Not mapped: the fault is counted, nothing is sent.
        assert_eq!(s.access_once(1, 0), Some(0));
        assert_eq!(s.access_once(1, 1), None);
        assert_eq!(s.access_once(1, 1), None);
        let st = s.stats(1);
        assert_eq!((st.failed_faults, st.read_faults, st.peers_lost), (2, 1, 1));
        assert_eq!(st.read_ahead_requested, 0);
        assert!(s.0[1].next_out().is_none());
    }

    impl Sim {
        /// Delivers every message among the live nodes until quiet; `dead` nodes neither send
        /// nor receive (their messages in flight are lost).
        fn settle_live(&mut self, dead: &[usize]) {
            loop {
                let mut any = false;
                for i in 0..self.0.len() {
                    while let Some((to, m)) = self.0[i].next_out() {
                        if dead.contains(&i) || dead.contains(&(to as usize)) {
                            continue;
                        }
                        any = true;
                        self.0[to as usize]
                            .handle(i as u32, m, Instant::now())
                            .unwrap();
                    }
                }
                if !any {
                    return;
                }
            }
        }
        /// An access by live node `n` (as [`Sim::access`]) while `dead` nodes are gone.
        fn access_live(&mut self, n: usize, page: u64, write: Option<u8>, dead: &[usize]) -> u8 {
            for _ in 0..4 {
                let slot = self.0[n].mem.pages[page as usize].clone();
                match (slot, write) {
                    (Some((d, _)), None) => return d[0],
                    (Some((_, false)), Some(v)) => {
                        self.0[n].mem.pages[page as usize].as_mut().unwrap().0[0] = v;
                        return v;
                    }
                    _ => {
                        self.0[n].fault(page, write.is_some()).unwrap();
                        self.settle_live(dead);
                    }
                }
            }
            panic!("access to page {page} by node {n} never granted");
        }
        /// Runs every node's periodic mirror push (the interval has passed).
        fn push_all(&mut self, dead: &[usize]) {
            for e in &mut self.0 {
                if let Some(m) = e.mirror.as_mut() {
                    m.next_push = Some(Instant::now());
                }
                e.run_due(Instant::now());
            }
            self.settle_live(dead);
        }
        /// Node `k` dies: the others lose it and recover.
        fn kill(&mut self, k: usize, dead: &[usize]) {
            for i in 0..self.0.len() {
                if i != k && !dead.contains(&i) {
                    self.0[i].peer_lost(k as u32);
                }
            }
            let mut all = dead.to_vec();
            all.push(k);
            self.settle_live(&all);
            for i in 0..self.0.len() {
                if !all.contains(&i) {
                    assert!(!self.0[i].failed(), "node {i}: {:?}", self.0[i].fatal);
                    assert!(!self.0[i].recovering(), "node {i} still recovering");
                }
            }
        }
    }

    #[test]
    fn with_mirroring_a_lost_node_loses_nothing_pushed() {
        // Node 2 writes every page (so it owns them, and manages a third of them), node 1
        // reads some; after a push, node 2 dies: every page reads its value on 0 and 1.
        let mut s = Sim::with(3, 12, |e| e.set_mirror(Duration::from_millis(100)));
        for p in 0..12 {
            s.access(2, p, Some(p as u8 + 1));
        }
        for p in 0..4 {
            assert_eq!(s.access(1, p, None), p as u8 + 1);
        }
        s.push_all(&[]);
        assert!(s.stats(2).mirror_pushes >= 8, "{}", s.stats(2));
        for p in 4..8 {
            s.access(2, p, Some(50 + p as u8));
        }
        s.push_all(&[]);
        s.access(2, 8, Some(99));
        s.kill(2, &[]);
        for n in [0, 1] {
            for p in 0..12 {
                // Page 8's write after the last push is the window mirroring may lose (its
                // upgrade only moved the mirror's version on): it reads as pushed.
                let want = match p {
                    4..8 => 50 + p as u8,
                    _ => p as u8 + 1,
                };
                assert_eq!(s.access_live(n, p, None, &[2]), want, "node {n} page {p}");
            }
        }
        assert_eq!(s.stats(0).recoveries + s.stats(1).recoveries, 2);
        // And the survivors keep going: writes and reads across them.
        for p in 0..12 {
            s.access_live(1, p, Some(200 + p as u8), &[2]);
            assert_eq!(s.access_live(0, p, None, &[2]), 200 + p as u8);
        }
    }

    #[test]
    fn with_mirroring_a_lost_manager_is_replaced() {
        // Node 1 only manages (a memory node): nodes 0 and 2 write and read; node 1 dies with
        // transactions in flight (a request it never answered).
        let mut s = Sim::with(3, 9, |e| e.set_mirror(Duration::from_millis(100)));
        for p in 0..9 {
            s.access(0, p, Some(p as u8 + 10));
            assert_eq!(s.access(2, p, None), p as u8 + 10);
        }
        s.access(2, 4, Some(44));
        // A request to node 1 (page 7's manager) left unanswered: node 1 dies first.
        s.0[0].fault(7, true).unwrap();
        s.kill(1, &[]);
        s.settle_live(&[1]);
        assert_eq!(s.0[0].page_state(7).map(|p| p.0), Some(PageState::Write));
        s.access_live(0, 7, Some(77), &[1]);
        for p in 0..9 {
            let want = match p {
                4 => 44,
                7 => 77,
                _ => p as u8 + 10,
            };
            assert_eq!(s.access_live(2, p, None, &[1]), want, "page {p}");
        }
        // Without mirroring the same loss fails the node.
        let mut s = Sim::new(3, 9);
        s.0[0].peer_lost(1);
        assert!(s.0[0].failed());
    }

    #[test]
    fn a_recovery_that_gets_no_reports_fails_the_node_in_time() {
        let mut s = Sim::with(3, 6, |e| e.set_mirror(Duration::from_millis(100)));
        s.access(0, 1, Some(3));
        // Node 0 loses node 2; node 1 never reports (its messages are not delivered).
        s.0[0].peer_lost(2);
        assert!(s.0[0].recovering() && !s.0[0].failed());
        let t = Instant::now();
        assert!(s.0[0].run_due(t).is_empty());
        assert!(!s.0[0].failed());
        assert!(s.0[0].next_due().is_some_and(|d| d > t + RECOVERY_TIMEOUT));
        s.0[0].run_due(t + RECOVERY_TIMEOUT + Duration::from_millis(1));
        assert!(s.0[0].failed());
        assert_eq!(
            s.0[0].take_fatal().unwrap(),
            "the recovery from the loss of node 2 did not complete in 5 s: no report from node(s) 1"
        );
    }

    #[test]
    fn concurrent_requests_queue_at_the_manager() {
        let mut s = Sim::new(3, 3);
        // Three writers fault at once; each gets the page in turn, none is lost.
        for n in 0..3 {
            s.0[n].fault(2, true).unwrap();
            // A second fault on the same page coalesces.
            s.0[n].fault(2, true).unwrap();
        }
        s.settle();
        let writers: Vec<_> = (0..3)
            .filter(|&n| s.0[n].page_state(2).unwrap().0 == PageState::Write)
            .collect();
        assert_eq!(writers.len(), 1);
        assert_eq!(s.0[writers[0]].page_state(2).unwrap().1, 3);
        let gets: u64 = (0..3).map(|n| s.stats(n).write_faults).sum();
        assert_eq!(gets, 3);
    }

    #[test]
    fn a_new_page_is_held_before_it_is_taken_away() {
        let hold = Duration::from_millis(100);
        let mut e: Vec<Engine<Fake>> = (0..2)
            .map(|me| {
                let mem = Fake {
                    pages: vec![None; 2],
                };
                Engine::new(me, 2, PS, 2, mem, hold, Arc::new(Stats::default()))
            })
            .collect();
        let t0 = Instant::now();
        // Deliver everything at time `now`.
        let settle = |e: &mut Vec<Engine<Fake>>, now: Instant| loop {
            let mut any = false;
            for i in 0..2 {
                while let Some((to, m)) = e[i].next_out() {
                    any = true;
                    e[to as usize].handle(i as u32, m, now).unwrap();
                }
            }
            if !any {
                break;
            }
        };
        // Node 1 takes page 0 for writing at t0.
        e[1].fault(0, true).unwrap();
        settle(&mut e, t0);
        assert_eq!(e[1].page_state(0), Some((PageState::Write, 1, true)));
        // Node 0 asks for it 10 ms later: node 1 keeps it until t0 + hold.
        e[0].fault(0, true).unwrap();
        settle(&mut e, t0 + Duration::from_millis(10));
        assert_eq!(e[1].page_state(0), Some((PageState::Write, 1, true)));
        assert_eq!(e[1].next_due(), Some(t0 + hold));
        assert!(e[1].run_due(t0 + Duration::from_millis(99)).is_empty());
        assert_eq!(e[1].page_state(0), Some((PageState::Write, 1, true)));
        assert!(e[1].run_due(t0 + hold).is_empty());
        settle(&mut e, t0 + hold);
        assert_eq!(e[1].page_state(0), Some((PageState::Invalid, 0, false)));
        assert_eq!(e[0].page_state(0), Some((PageState::Write, 2, true)));
        assert_eq!(e[1].next_due(), None);
    }

    #[test]
    fn out_of_order_messages_are_errors() {
        let mut s = Sim::new(2, 4);
        let now = Instant::now();
        let e = s.0[0].handle(
            1,
            Msg::Page {
                access: Access::Read,
                page: 3,
                version: 0,
                data: None,
            },
            now,
        );
        assert_eq!(
            e.unwrap_err().0,
            "PAGE (Read) for page 3 from node 1, which this node did not request"
        );
        let e = s.0[0].handle(
            1,
            Msg::VldPage {
                access: Access::Write,
                page: 2,
                version: 1,
            },
            now,
        );
        assert_eq!(
            e.unwrap_err().0,
            "VLD_PAGE for page 2 from node 1, which has no transaction for it in progress"
        );
        let e = s.0[0].handle(1, Msg::InvAck { page: 0 }, now);
        assert_eq!(
            e.unwrap_err().0,
            "INV_ACK for page 0 from node 1, which was not invalidated"
        );
        let e = s.0[0].handle(
            1,
            Msg::GetPage {
                access: Access::Read,
                page: 1,
                have: 0,
            },
            now,
        );
        assert_eq!(
            e.unwrap_err().0,
            "GET_PAGE for page 1 sent to node 0, which does not manage it"
        );
        let e = s.0[1].handle(
            0,
            Msg::FwdPage {
                access: Access::Read,
                page: 0,
                have: 0,
                requester: 0,
            },
            now,
        );
        assert_eq!(
            e.unwrap_err().0,
            "FWD_PAGE for page 0, which this node does not own"
        );
        let e = s.0[1].handle(0, Msg::InvPage { page: 1 }, now);
        assert_eq!(
            e.unwrap_err().0,
            "INV_PAGE for page 1 from node 0, which does not manage it"
        );
    }
}
