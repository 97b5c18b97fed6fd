//! A running node: the TCP mesh (one connection per node pair, set up with INIT), and the
//! engine thread that polls the userfaultfd and every connection, feeds faults and messages
//! to the [`Engine`], and writes what it sends in one batch per connection per wake-up.

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
}

impl Config {
    /// A configuration with the default hold time (200 us) and join timeout (10 s).
    pub fn new(id: u32, peers: Vec<SocketAddr>) -> Config {
        Config {
            id,
            peers,
            hold: Duration::from_micros(200),
            join_timeout: Duration::from_secs(10),
            versioning: true,
        }
    }
}

/// A connection closed because of a protocol violation or an I/O error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerError {
    /// The peer's node id (this node's own id for a local failure).
    pub peer: u32,
    /// What went wrong, one line.
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
    cv: Condvar,
}

impl Shared {
    fn record(&self, peer: u32, message: String) {
        if let Ok(mut e) = self.errors.lock() {
            e.push(PeerError { peer, message });
        }
        self.cv.notify_all();
    }
}

/// A node of the cluster, keeping its region coherent with the other nodes' copies.
pub struct Node {
    id: u32,
    stats: Arc<Stats>,
    shared: Arc<Shared>,
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
    region: Region,
}

fn ctx(what: String) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn read_init(s: &mut TcpStream, g: &Geometry) -> io::Result<(u32, Geometry)> {
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
            },
            _,
        ))) => {
            if version != PROTOCOL_VERSION {
                return Err(io::Error::other(format!(
                    "node {node} speaks protocol {version}, this node {PROTOCOL_VERSION}"
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
            let (n, _) =
                read_init(&mut s, &g).map_err(ctx(format!("INIT from node {j} at {addr}")))?;
            if n != j {
                return Err(io::Error::other(format!(
                    "node {j}'s address {addr} answered as node {n}"
                )));
            }
            conns[j as usize] = Some(s);
        }
        listener.0.set_nonblocking(false)?;
        let deadline = Instant::now() + cfg.join_timeout;
        let mut missing = nodes - 1 - me;
        while missing > 0 {
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "{missing} nodes did not connect in time"
                )));
            }
            let (mut s, from) = listener.0.accept()?;
            s.set_read_timeout(Some(cfg.join_timeout))?;
            let (n, _) = read_init(&mut s, &g).map_err(ctx(format!("INIT from {from}")))?;
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
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("wv-dsm-{me}"))
            .spawn(move || run(engine, me, g, conns, stop_raw, &sh))?;
        Ok(Node {
            id: me,
            stats,
            shared,
            stop,
            thread: Some(thread),
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
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a local array to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), 8) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

struct Conn {
    s: TcpStream,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
}

fn close(conns: &mut [Option<Conn>], peer: u32, why: String, shared: &Shared) {
    if let Some(c) = conns.get_mut(peer as usize).and_then(Option::take) {
        let _ = c.s.shutdown(std::net::Shutdown::Both);
        shared.record(peer, why);
    }
}

fn run(
    mut eng: Engine<UffdMem>,
    me: u32,
    g: Geometry,
    streams: Vec<Option<TcpStream>>,
    stop: i32,
    shared: &Shared,
) {
    let mut conns: Vec<Option<Conn>> = streams
        .into_iter()
        .map(|s| {
            s.map(|s| Conn {
                s,
                inbuf: Vec::new(),
                outbuf: Vec::new(),
            })
        })
        .collect();
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
        let timeout = match eng.next_due() {
            None => -1,
            Some(due) => {
                let us = due.saturating_duration_since(Instant::now()).as_micros();
                i32::try_from(us.div_ceil(1000)).unwrap_or(i32::MAX)
            }
        };
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
                close(&mut conns, peer, e.0, shared);
            }
        }
        for (peer, e) in eng.run_due(Instant::now()) {
            close(&mut conns, peer, e.0, shared);
        }
        // Deliver: messages to self are handled at once (they may produce more).
        let now = Instant::now();
        while let Some((to, msg)) = eng.next_out() {
            if to == me {
                if let Err(e) = eng.handle(me, msg, now) {
                    shared.record(me, format!("internal protocol error: {e}"));
                }
                continue;
            }
            if let Some(Some(c)) = conns.get_mut(to as usize) {
                let before = c.outbuf.len();
                proto::encode(&msg, &mut c.outbuf);
                stats.sent(c.outbuf.len() - before);
            }
        }
        for i in 0..conns.len() {
            let Some(c) = conns[i].as_mut() else { continue };
            if c.outbuf.is_empty() {
                continue;
            }
            match c.s.write(&c.outbuf) {
                Ok(n) => {
                    c.outbuf.drain(..n);
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let peer = u32::try_from(i).unwrap_or(u32::MAX);
                    close(&mut conns, peer, format!("sending failed: {e}"), shared);
                }
            }
        }
        if let Err(e) = eng.mem().flush_wakes() {
            shared.record(me, format!("waking faulting threads failed: {e}"));
        }
    }
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
                c.inbuf.extend_from_slice(&tmp[..n]);
                // A short read drained the socket; a large buffer is decoded before reading
                // on (a peer cannot make this node buffer more than about a megabyte).
                if n < tmp.len() || c.inbuf.len() >= 1 << 20 {
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
    res
}
