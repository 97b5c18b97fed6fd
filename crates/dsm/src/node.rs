//! A running node: the TCP mesh (one connection per node pair, set up with INIT), and the
//! engine thread that polls the userfaultfd and every connection, feeds faults and messages
//! to the [`Engine`], and writes what it sends in one batch per connection per wake-up. It
//! also keeps every peer's liveness (heartbeats; a silent, stalled or non-reading peer, or a
//! broken connection, is lost and fails the node) and bounds what it buffers per peer.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::coherence::{Engine, Stats, StatsSnapshot};
use crate::proto::{self, Geometry, Msg, ProtoError, PROTOCOL_VERSION};
use crate::uffd::{Fault, Region, UffdMem};

/// How a node joins its cluster.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's id (its index in `peers`).
    pub id: u32,
    /// Every node's listening address, in node-id order (this node's own entry included).
    pub peers: Vec<SocketAddr>,
    /// Minimum time a newly installed page stays before the protocol takes it away again.
    pub hold: Duration,
    /// Limit for connecting and for the INIT exchange.
    pub join_timeout: Duration,
    /// Versioned pages ("unchanged" replies); off only to measure what they save (it decides
    /// the replies this node sends; receivers handle both kinds).
    pub versioning: bool,
    /// Pages to read ahead when read faults stream (0: off, the default).
    pub read_ahead: u32,
    /// A peer that sends nothing (not even a heartbeat) for this long, or does not take
    /// what this node sends for this long, is declared lost. Heartbeats go out on a
    /// connection that carried nothing else for a quarter of it.
    pub peer_timeout: Duration,
    /// The most bytes queued for a peer beyond what its socket takes; a peer that makes
    /// this node queue more is declared lost (it is not reading).
    pub send_limit: usize,
    /// Mirroring (docs/DSM.md, "Mirroring"): every page's latest contents on two nodes, and
    /// the loss of a node recovered from instead of failing the node. Every node of the
    /// cluster must agree (INIT checks it). Turns read-ahead off.
    pub mirror: bool,
    /// With mirroring: how often the pages written in place are pushed to their mirror.
    pub mirror_interval: Duration,
}

impl Config {
    /// A configuration with the default hold time (200 us), join timeout (10 s), versioning
    /// on, no read-ahead, a peer timeout of 600 ms and a send limit of 8 MiB per peer.
    pub fn new(id: u32, peers: Vec<SocketAddr>) -> Config {
        Config {
            id,
            peers,
            hold: Duration::from_micros(200),
            join_timeout: Duration::from_secs(10),
            versioning: true,
            read_ahead: 0,
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            send_limit: 8 << 20,
            mirror: false,
            mirror_interval: DEFAULT_MIRROR_INTERVAL,
        }
    }

    /// Sets mirroring (see [`Config::mirror`]).
    #[must_use]
    pub fn with_mirror(mut self, on: bool) -> Config {
        self.mirror = on;
        self
    }

    /// Sets the mirror push interval (see [`Config::mirror_interval`]; at least 1 ms).
    #[must_use]
    pub fn with_mirror_interval(mut self, interval: Duration) -> Config {
        self.mirror_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Sets versioning (off: every reply carries the page; for measuring what it saves).
    #[must_use]
    pub fn with_versioning(mut self, on: bool) -> Config {
        self.versioning = on;
        self
    }

    /// Sets read-ahead: on a read fault that follows one on the page before, also ask for
    /// the next `pages` pages (0: off).
    #[must_use]
    pub fn with_read_ahead(mut self, pages: u32) -> Config {
        self.read_ahead = pages;
        self
    }

    /// Sets the peer timeout (see [`Config::peer_timeout`]; at least 10 ms).
    #[must_use]
    pub fn with_peer_timeout(mut self, timeout: Duration) -> Config {
        self.peer_timeout = timeout.max(Duration::from_millis(10));
        self
    }

    /// Sets the send limit per peer (see [`Config::send_limit`]).
    #[must_use]
    pub fn with_send_limit(mut self, bytes: usize) -> Config {
        self.send_limit = bytes;
        self
    }

    /// Sets the hold time (see [`Config::hold`]).
    #[must_use]
    pub fn with_hold(mut self, hold: Duration) -> Config {
        self.hold = hold;
        self
    }
}

/// The default [`Config::mirror_interval`]: what a lost node's pages written in place may
/// lose at most (plus the time a push takes).
pub const DEFAULT_MIRROR_INTERVAL: Duration = Duration::from_millis(100);

/// The default [`Config::peer_timeout`]: well under the second in which the loss of a node
/// must stop the VM, well over a scheduling hiccup on a loaded host.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_millis(600);

/// A connection closed because of a protocol violation, an I/O error, a peer that went
/// silent or stopped reading: the peer is lost to this node (see [`Node::failed`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerError {
    /// The peer's node id (this node's own id for a local failure).
    pub peer: u32,
    /// What went wrong, one line; for a peer, it starts with the peer's address.
    pub message: String,
}

impl std::fmt::Display for PeerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node {}: {}", self.peer, self.message)
    }
}

/// The listening socket of a node that has not joined yet (bind first, so that the
/// addresses of all nodes, port 0 included, are known before anyone connects).
#[derive(Debug)]
pub struct Listener(TcpListener);

impl Listener {
    /// Binds `addr` (port 0: any free port).
    pub fn bind(addr: impl ToSocketAddrs) -> io::Result<Listener> {
        TcpListener::bind(addr).map(Listener)
    }
    /// The address peers connect to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

impl From<TcpListener> for Listener {
    /// A socket the caller bound (and may have accepted other connections on first, such as
    /// a set-up connection; only connections accepted by [`Node::join`] are peers).
    fn from(l: TcpListener) -> Listener {
        Listener(l)
    }
}

#[derive(Default)]
struct Shared {
    errors: Mutex<Vec<PeerError>>,
    /// The error that failed the node (a loss without mirroring, or one it could not
    /// recover from).
    fatal: Mutex<Option<PeerError>>,
    cv: Condvar,
}

impl Shared {
    fn record(&self, peer: u32, message: String) {
        if let Ok(mut e) = self.errors.lock() {
            e.push(PeerError { peer, message });
        }
        self.cv.notify_all();
    }
    fn fail(&self, e: PeerError) {
        if let Ok(mut f) = self.fatal.lock() {
            if f.is_none() {
                *f = Some(e);
            }
        }
        // Under the errors lock, so that a waiter cannot miss the wake-up.
        let _g = self.errors.lock();
        self.cv.notify_all();
    }
}

/// A node of the cluster, keeping its region coherent with the other nodes' copies.
pub struct Node {
    id: u32,
    stats: Arc<Stats>,
    shared: Arc<Shared>,
    stop: OwnedFd,
    thread: Mutex<Option<JoinHandle<()>>>,
    region: Region,
}

fn ctx(what: String) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn read_init(s: &mut TcpStream, g: &Geometry, want_mirror: bool) -> io::Result<(u32, Geometry)> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let n = u32::from_le_bytes(len) as usize;
    if n > g.max_frame() {
        return Err(io::Error::other(format!(
            "first frame of {n} bytes is not INIT"
        )));
    }
    let mut buf = vec![0u8; 4 + n];
    buf[..4].copy_from_slice(&len);
    s.read_exact(&mut buf[4..])?;
    match proto::decode(&buf, g) {
        Ok(Some((
            Msg::Init {
                version,
                node,
                geometry,
                mirror,
            },
            _,
        ))) => {
            if version != PROTOCOL_VERSION {
                return Err(io::Error::other(format!(
                    "node {node} speaks protocol {version}, this node {PROTOCOL_VERSION}"
                )));
            }
            if mirror != want_mirror {
                let say = |m: bool| if m { "mirrors" } else { "does not mirror" };
                return Err(io::Error::other(format!(
                    "node {node} {}, this node {}",
                    say(mirror),
                    say(want_mirror)
                )));
            }
            if geometry != *g {
                return Err(io::Error::other(format!(
                    "node {node} has geometry {geometry:?}, this node {g:?}"
                )));
            }
            Ok((node, geometry))
        }
        Ok(Some((m, _))) => Err(io::Error::other(format!(
            "first message is {}, not INIT",
            m.name()
        ))),
        Ok(None) => Err(io::Error::other("truncated INIT")),
        Err(e) => Err(io::Error::other(e.0)),
    }
}

impl Node {
    /// Joins the cluster: connects to the lower-numbered nodes, accepts the higher-numbered
    /// ones (INIT both ways, every parameter checked), registers `region` with userfaultfd
    /// (dropping whatever it held: every page starts invalid, owned by node 0 as zeros) and
    /// starts the engine thread. Returns once every connection is up.
    pub fn join(listener: Listener, cfg: Config, region: Region) -> io::Result<Node> {
        let nodes = u32::try_from(cfg.peers.len()).map_err(io::Error::other)?;
        let page_size = u32::try_from(page_size()).map_err(io::Error::other)?;
        let g = Geometry {
            nodes,
            page_size,
            region_size: region.len() as u64,
        };
        proto::check_geometry(&g).map_err(|e| io::Error::other(e.0))?;
        if !(region.as_ptr() as usize).is_multiple_of(page_size as usize) {
            return Err(io::Error::other(
                "the region does not start on a page boundary",
            ));
        }
        if cfg.id >= nodes {
            return Err(io::Error::other(format!(
                "node id {} outside a cluster of {nodes}",
                cfg.id
            )));
        }
        let me = cfg.id;
        let mem = UffdMem::register(&region)?;
        let mut init = Vec::new();
        proto::encode(
            &Msg::Init {
                version: PROTOCOL_VERSION,
                node: me,
                geometry: g,
                mirror: cfg.mirror,
            },
            &mut init,
        );
        let mut conns: Vec<Option<TcpStream>> = (0..nodes).map(|_| None).collect();
        for j in 0..me {
            let addr = cfg.peers[j as usize];
            let mut s = TcpStream::connect_timeout(&addr, cfg.join_timeout)
                .map_err(ctx(format!("connecting to node {j} at {addr}")))?;
            s.set_read_timeout(Some(cfg.join_timeout))?;
            s.write_all(&init)?;
            let (n, _) = read_init(&mut s, &g, cfg.mirror)
                .map_err(ctx(format!("INIT from node {j} at {addr}")))?;
            if n != j {
                return Err(io::Error::other(format!(
                    "node {j}'s address {addr} answered as node {n}"
                )));
            }
            conns[j as usize] = Some(s);
        }
        // Accepted with the deadline in force: a node that said it would connect and died
        // first must not leave this one waiting for ever.
        listener.0.set_nonblocking(true)?;
        let deadline = Instant::now() + cfg.join_timeout;
        let mut missing = nodes - 1 - me;
        while missing > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::other(format!(
                    "{missing} nodes did not connect in time"
                )));
            }
            let (mut s, from) = match listener.0.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut p = libc::pollfd {
                        fd: listener.0.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
                    // SAFETY: one valid pollfd; the result only says whether to accept again.
                    unsafe { libc::poll(&mut p, 1, ms) };
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(cfg.join_timeout))?;
            let (n, _) =
                read_init(&mut s, &g, cfg.mirror).map_err(ctx(format!("INIT from {from}")))?;
            if n <= me || conns[n as usize].is_some() {
                return Err(io::Error::other(format!(
                    "unexpected INIT from node {n} at {from}"
                )));
            }
            s.write_all(&init)?;
            conns[n as usize] = Some(s);
            missing -= 1;
        }
        for s in conns.iter().flatten() {
            s.set_nodelay(true)?;
            s.set_read_timeout(None)?;
            s.set_nonblocking(true)?;
        }
        // SAFETY: eventfd takes only flags and returns a new descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor owned by nobody else.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };
        let stop_raw = stop.as_raw_fd();
        let stats = Arc::new(Stats::default());
        let shared = Arc::new(Shared::default());
        let engine = Engine::new(
            me,
            nodes,
            page_size as usize,
            g.pages(),
            mem,
            cfg.hold,
            stats.clone(),
        );
        let mut engine = engine;
        engine.set_versioning(cfg.versioning);
        engine.set_read_ahead(cfg.read_ahead);
        if cfg.mirror {
            engine.set_mirror(cfg.mirror_interval.max(Duration::from_millis(1)));
        }
        let sh = shared.clone();
        let limits = Limits {
            peer_timeout: cfg.peer_timeout.max(Duration::from_millis(10)),
            join_timeout: cfg.join_timeout,
            send_limit: cfg.send_limit,
        };
        let addrs = cfg.peers.clone();
        let thread = std::thread::Builder::new()
            .name(format!("wv-dsm-{me}"))
            .spawn(move || run(engine, me, g, conns, &addrs, limits, stop_raw, &sh))?;
        Ok(Node {
            id: me,
            stats,
            shared,
            stop,
            thread: Mutex::new(Some(thread)),
            region,
        })
    }

    /// This node's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The coherent region (its pages fault in through the protocol).
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// The counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The connections closed so far, with why.
    pub fn errors(&self) -> Vec<PeerError> {
        self.shared
            .errors
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }

    /// The first peer this node lost, if any (a connection closed for any reason: broken,
    /// silent or stalled past [`Config::peer_timeout`], not reading, or a protocol
    /// violation). Once a peer is lost the node has failed: faults that need the protocol are
    /// no longer served and their threads stay blocked; the VMM stops the VM (docs/DSM.md,
    /// "Peer loss").
    ///
    /// With mirroring ([`Config::mirror`]) a lost peer is recovered from and does not fail
    /// the node (it is still in [`Node::errors`] and counted in `recoveries`); this returns
    /// the loss that did (a second loss during a recovery, a page whose latest contents were
    /// on the lost node only, a node that declared this one lost), with why.
    pub fn failed(&self) -> Option<PeerError> {
        self.shared.fatal.lock().ok()?.clone()
    }

    /// Waits up to `timeout` for the node to fail (see [`Node::failed`]).
    pub fn wait_failed(&self, timeout: Duration) -> Option<PeerError> {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.errors.lock().ok()?;
        loop {
            if let Some(f) = self.failed() {
                return Some(f);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            g = self.shared.cv.wait_timeout(g, left).ok()?.0;
        }
    }

    /// Stops the node, as dropping it does, for a VMM that still holds it elsewhere: the
    /// engine thread ends (its connections close: the peers lose this node) and the
    /// userfaultfd is closed, so every thread blocked on the region, such as a fault parked
    /// after a peer loss, resumes on plain memory (a missing page reads as zeros). A VMM
    /// stopping a failed VM sets its vCPUs' stop flags and kicks them first, so that none
    /// re-enters the guest on that memory. The errors stay readable. Idempotent.
    pub fn shutdown(&self) {
        let Ok(mut t) = self.thread.lock() else {
            return;
        };
        if let Some(t) = t.take() {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a local array to our eventfd.
            unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), 8) };
            let _ = t.join();
        }
    }

    /// Waits up to `timeout` for connection errors after the first `seen` ones, and returns
    /// those (empty if none came): for a VMM that goes on after a recovered loss (mirroring).
    pub fn wait_errors(&self, seen: usize, timeout: Duration) -> Vec<PeerError> {
        let Ok(g) = self.shared.errors.lock() else {
            return Vec::new();
        };
        match self
            .shared
            .cv
            .wait_timeout_while(g, timeout, |e| e.len() <= seen)
        {
            Ok((g, _)) => g.get(seen..).map(<[PeerError]>::to_vec).unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    /// Waits up to `timeout` for a first connection error.
    pub fn wait_error(&self, timeout: Duration) -> Option<PeerError> {
        let g = self.shared.errors.lock().ok()?;
        let (g, _) = self
            .shared
            .cv
            .wait_timeout_while(g, timeout, |e| e.is_empty())
            .ok()?;
        g.first().cloned()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// The liveness and buffering bounds the engine thread enforces on every connection.
#[derive(Clone, Copy)]
struct Limits {
    peer_timeout: Duration,
    join_timeout: Duration,
    send_limit: usize,
}

struct Conn {
    s: TcpStream,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    /// The peer's listening address (its name in the cluster).
    addr: SocketAddr,
    /// When the peer last sent a byte.
    last_rx: Instant,
    /// When this node last queued something for the peer.
    last_tx: Instant,
    /// When a partly received frame started (it must be completed within the timeout).
    partial_since: Option<Instant>,
    /// When the peer last took bytes from `outbuf` (or when `outbuf` stopped being empty).
    last_progress: Instant,
    /// The peer has sent something since INIT: until then it may still be joining (waiting
    /// for other nodes), so it gets the join timeout rather than the peer timeout.
    heard: bool,
}

impl Conn {
    /// Why the peer is lost by `now`, if it is.
    fn overdue(&self, now: Instant, l: &Limits) -> Option<String> {
        let limit = if self.heard {
            l.peer_timeout
        } else {
            l.join_timeout.max(l.peer_timeout)
        };
        let ms = |t: Instant| now.saturating_duration_since(t).as_millis();
        if let Some(t) = self.partial_since {
            if now.saturating_duration_since(t) > limit {
                return Some(format!(
                    "stalled in the middle of a message ({} bytes of it received {} ms ago)",
                    self.inbuf.len(),
                    ms(t)
                ));
            }
        }
        if now.saturating_duration_since(self.last_rx) > limit {
            return Some(format!(
                "silent for {} ms (peer timeout {} ms)",
                ms(self.last_rx),
                limit.as_millis()
            ));
        }
        if !self.outbuf.is_empty() && now.saturating_duration_since(self.last_progress) > limit {
            return Some(format!(
                "not reading: {} bytes unsent for {} ms",
                self.outbuf.len(),
                ms(self.last_progress)
            ));
        }
        None
    }
}

/// Closes the connection to `peer` and declares the peer lost (the engine stops serving
/// faults, see [`Engine::peer_lost`]); the error names the peer's address.
fn close(
    conns: &mut [Option<Conn>],
    peer: u32,
    why: &str,
    shared: &Shared,
    eng: &mut Engine<UffdMem>,
) {
    if let Some(c) = conns.get_mut(peer as usize).and_then(Option::take) {
        let _ = c.s.shutdown(std::net::Shutdown::Both);
        let was_failed = eng.failed();
        eng.peer_lost(peer);
        let message = format!("{}: {why}", c.addr);
        // Failed first, so that whoever the error wakes sees it.
        if eng.failed() && !was_failed {
            let message = match eng.take_fatal() {
                Some(f) => format!("{message} ({f})"),
                None => message.clone(),
            };
            shared.fail(PeerError { peer, message });
        }
        shared.record(peer, message);
    }
}

/// Closes the connections the engine was told to (another node lost that peer) and reports
/// a failure the engine found itself.
fn engine_requests(
    conns: &mut [Option<Conn>],
    me: u32,
    shared: &Shared,
    eng: &mut Engine<UffdMem>,
) {
    loop {
        let close_now = eng.take_close();
        if close_now.is_empty() {
            break;
        }
        for (peer, why) in close_now {
            close(conns, peer, &why, shared, eng);
        }
    }
    if let Some(f) = eng.take_fatal() {
        shared.fail(PeerError {
            peer: me,
            message: f.clone(),
        });
        shared.record(me, f);
    }
}

#[allow(clippy::too_many_arguments)] // the engine thread's whole context, handed over once
fn run(
    mut eng: Engine<UffdMem>,
    me: u32,
    g: Geometry,
    streams: Vec<Option<TcpStream>>,
    addrs: &[SocketAddr],
    limits: Limits,
    stop: i32,
    shared: &Shared,
) {
    let start = Instant::now();
    let mut conns: Vec<Option<Conn>> = streams
        .into_iter()
        .zip(addrs)
        .map(|(s, &addr)| {
            s.map(|s| Conn {
                s,
                inbuf: Vec::new(),
                outbuf: Vec::new(),
                addr,
                last_rx: start,
                last_tx: start,
                partial_since: None,
                last_progress: start,
                heard: false,
            })
        })
        .collect();
    // Heartbeats go out after a quarter of the timeout without traffic; the deadlines are
    // checked at least every sixth of it, so a loss is seen within about 7/6 of the timeout.
    let beat = limits.peer_timeout / 4;
    let tick = limits.peer_timeout / 6;
    let stats = eng.stats().clone();
    let uffd = eng.mem().fd();
    let mut faults: Vec<Fault> = Vec::new();
    let mut tmp = vec![0u8; 1 << 16];
    let mut pfds: Vec<libc::pollfd> = Vec::new();
    let mut who: Vec<u32> = Vec::new();
    loop {
        pfds.clear();
        who.clear();
        pfds.push(libc::pollfd {
            fd: uffd,
            events: libc::POLLIN,
            revents: 0,
        });
        pfds.push(libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        });
        for (i, c) in conns.iter().enumerate() {
            if let Some(c) = c {
                let mut ev = libc::POLLIN;
                if !c.outbuf.is_empty() {
                    ev |= libc::POLLOUT;
                }
                pfds.push(libc::pollfd {
                    fd: c.s.as_raw_fd(),
                    events: ev,
                    revents: 0,
                });
                who.push(u32::try_from(i).unwrap_or(u32::MAX));
            }
        }
        let mut wait = tick;
        if let Some(due) = eng.next_due() {
            wait = wait.min(due.saturating_duration_since(Instant::now()));
        }
        let timeout = i32::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        let nfds = libc::nfds_t::try_from(pfds.len()).unwrap_or(0);
        // SAFETY: pfds is a valid array of nfds pollfd structs for the duration of the call.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), nfds, timeout) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            shared.record(me, format!("poll failed: {e}"));
            return;
        }
        if pfds[1].revents != 0 {
            return;
        }
        if pfds[0].revents != 0 {
            loop {
                faults.clear();
                match eng.mem().read_faults(&mut faults) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        shared.record(me, format!("reading the userfaultfd failed: {e}"));
                        return;
                    }
                }
                for f in &faults {
                    if let Err(e) = eng.fault(f.page, f.write) {
                        shared.record(me, format!("fault on page {}: {e}", f.page));
                    }
                }
            }
        }
        for (k, pfd) in pfds.iter().enumerate().skip(2) {
            if pfd.revents == 0 {
                continue;
            }
            let peer = who[k - 2];
            let res = read_peer(&mut conns, peer, &mut tmp, &g, &mut eng, &stats);
            if let Err(e) = res {
                close(&mut conns, peer, &e.0, shared, &mut eng);
            }
        }
        for (peer, e) in eng.run_due(Instant::now()) {
            close(&mut conns, peer, &e.0, shared, &mut eng);
        }
        engine_requests(&mut conns, me, shared, &mut eng);
        // Deliver: messages to self are handled at once (they may produce more).
        let now = Instant::now();
        while let Some((to, msg)) = eng.next_out() {
            if to == me {
                if let Err(e) = eng.handle(me, msg, now) {
                    shared.record(me, format!("internal protocol error: {e}"));
                }
                engine_requests(&mut conns, me, shared, &mut eng);
                continue;
            }
            if let Some(Some(c)) = conns.get_mut(to as usize) {
                queue(c, &msg, &stats, now);
                if c.outbuf.len() > limits.send_limit {
                    // Checked per message: the queue never exceeds the limit by more than one.
                    if let Err(why) = flush(c, limits.send_limit) {
                        close(&mut conns, to, &why, shared, &mut eng);
                    }
                }
            }
        }
        for i in 0..conns.len() {
            let peer = u32::try_from(i).unwrap_or(u32::MAX);
            let Some(c) = conns[i].as_mut() else { continue };
            if let Some(why) = c.overdue(now, &limits) {
                close(&mut conns, peer, &why, shared, &mut eng);
                continue;
            }
            if now.saturating_duration_since(c.last_tx) >= beat {
                queue(c, &Msg::Ping, &stats, now);
            }
            if let Err(why) = flush(c, limits.send_limit) {
                close(&mut conns, peer, &why, shared, &mut eng);
            }
        }
        if let Err(e) = eng.mem().flush_wakes() {
            shared.record(me, format!("waking faulting threads failed: {e}"));
        }
    }
}

/// Appends `msg` to the peer's output.
fn queue(c: &mut Conn, msg: &Msg, stats: &Stats, now: Instant) {
    if c.outbuf.is_empty() {
        c.last_progress = now;
    }
    let before = c.outbuf.len();
    proto::encode(msg, &mut c.outbuf);
    if matches!(msg, Msg::Ping) {
        stats.heartbeat_sent();
    } else {
        stats.sent(c.outbuf.len() - before);
    }
    c.last_tx = now;
}

/// Writes what the socket takes of the peer's output; fails when more than `limit` bytes
/// stay queued (the peer is not reading) or the write fails.
fn flush(c: &mut Conn, limit: usize) -> Result<(), String> {
    while !c.outbuf.is_empty() {
        match c.s.write(&c.outbuf) {
            Ok(0) => break,
            Ok(n) => {
                c.outbuf.drain(..n);
                c.last_progress = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(format!("sending failed: {e}")),
        }
    }
    if c.outbuf.len() > limit {
        return Err(format!(
            "not reading: {} bytes queued for it, over the limit of {limit}",
            c.outbuf.len()
        ));
    }
    Ok(())
}

fn read_peer(
    conns: &mut [Option<Conn>],
    peer: u32,
    tmp: &mut [u8],
    g: &Geometry,
    eng: &mut Engine<UffdMem>,
    stats: &Stats,
) -> Result<(), ProtoError> {
    let Some(c) = conns.get_mut(peer as usize).and_then(Option::as_mut) else {
        return Ok(());
    };
    loop {
        match c.s.read(tmp) {
            Ok(0) => return Err(ProtoError("closed the connection".into())),
            Ok(n) => {
                stats.received_bytes(n);
                c.last_rx = Instant::now();
                c.heard = true;
                c.inbuf.extend_from_slice(&tmp[..n]);
                // A short read drained the socket; otherwise what was read is decoded before
                // reading on, at most one buffer a wake-up: a peer cannot make this node
                // buffer more than that, nor produce more replies in one go than its
                // requests in it ask for.
                if n < tmp.len() || c.inbuf.len() >= tmp.len() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtoError(format!("receiving failed: {e}"))),
        }
    }
    let now = Instant::now();
    let mut at = 0;
    let res = loop {
        match proto::decode(&c.inbuf[at..], g) {
            Ok(Some((msg, used))) => {
                at += used;
                if let Err(e) = eng.handle(peer, msg, now) {
                    break Err(e);
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    c.inbuf.drain(..at);
    if c.inbuf.is_empty() {
        c.partial_since = None;
    } else if at > 0 || c.partial_since.is_none() {
        c.partial_since = Some(now);
    }
    res
}
