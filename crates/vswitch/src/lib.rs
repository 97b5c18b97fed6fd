//! The virtual switch (`wv vswitch`): L2 learning switches, one per network, whose ports are
//! vhost-user net backends (one socket per port, `DIR/NETWORK/PORT.sock`) and, optionally, an
//! uplink TAP to the host.
//!
//! Each network learns which port a source MAC address was last seen on (entries age out after
//! [`MAC_AGEING`]); a frame to a known unicast address goes to that port only, a broadcast,
//! multicast or unknown one to every other port of the network. Networks never exchange
//! frames: a frame addressed to a MAC that only another network knows is dropped and counted
//! (`dropped_isolated`). VM to VM, a frame is copied once, from the sender's transmit buffers
//! straight into receive buffers the receiver posted ([`frame::Segments::copy_to`]); only when
//! the receiver has posted none is it copied into one of a bounded set of slots of that port
//! (allocated once), and dropped when those are full. Counters per port are served as JSON on
//! `DIR/control.sock` (a line `stats`).

#![allow(clippy::cast_possible_truncation)] // frame lengths are bounded by MAX_FRAME, chain counts by 4

pub mod frame;

use frame::{Bad, Segments, MAX_FRAME, VNET_HDR};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use wv_virtio::vu_backend::{serve_frontends, ExitEvents};

/// How long a learned MAC address stays without being seen again.
pub const MAC_AGEING: Duration = Duration::from_secs(300);
/// Frames a port holds for its guest while it has posted no receive buffer.
pub const PENDING_SLOTS: usize = 32;
/// Most receive chains one frame may fill (mergeable buffers).
pub const MAX_RX_CHAINS: usize = 64;
const QUEUE_SIZE: usize = 256;

const F_MRG_RXBUF: u64 = 1 << 15;
const F_VERSION_1: u64 = 1 << 32;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// A guest's memory as the backend holds it.
pub type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the switch serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Where the sockets are: `DIR/NETWORK/PORT.sock` and `DIR/control.sock`.
    pub socket_dir: PathBuf,
    /// Networks, each with its ports and perhaps an uplink TAP.
    pub networks: Vec<NetworkConfig>,
}

/// One network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Its name (a directory under the socket directory).
    pub name: String,
    /// Its VM ports, by name.
    pub ports: Vec<String>,
    /// A TAP to the host.
    pub uplink: Option<String>,
}

/// Whether `s` can name a network or a port: 1-64 of `[A-Za-z0-9_.-]`, not starting with `.`.
pub use wv_virtio::vu_backend::valid_name;

/// What one port counted.
#[derive(Default, Debug)]
pub struct PortCounters {
    /// Frames the port's guest (or the host, for an uplink) sent into the switch.
    pub tx_frames: AtomicU64,
    /// Their bytes (Ethernet frames, without the vnet header).
    pub tx_bytes: AtomicU64,
    /// Frames delivered to the port.
    pub rx_frames: AtomicU64,
    /// Their bytes.
    pub rx_bytes: AtomicU64,
    /// Copies of frame bytes made for this port's deliveries (guest to guest: one each).
    pub copies: AtomicU64,
    /// Bytes copied for them.
    pub copied_bytes: AtomicU64,
    /// Frames held for the port while its guest had no receive buffer.
    pub queued: AtomicU64,
    /// Malformed transmit chains or receive buffers from this port's guest.
    pub dropped_malformed: AtomicU64,
    /// Frames for this port dropped: not connected, or no buffer and no free slot.
    pub dropped_no_buffer: AtomicU64,
    /// Frames from this port addressed to a MAC of another network.
    pub dropped_isolated: AtomicU64,
}

impl PortCounters {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// A port's counters as served.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct PortStats {
    pub network: String,
    pub port: String,
    pub kind: &'static str,
    pub connected: bool,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub copies: u64,
    pub copied_bytes: u64,
    pub queued: u64,
    pub dropped_malformed: u64,
    pub dropped_no_buffer: u64,
    pub dropped_isolated: u64,
}

/// The receive side of a VM port: its guest's memory and receive queue while connected, and
/// the frames waiting for buffers.
#[derive(Default)]
struct RxSide {
    mem: Option<Mem>,
    vring: Option<VringRwLock<Mem>>,
    mergeable: bool,
    /// Slots (allocated on first use, then reused) and the order of the full ones.
    slots: Vec<Vec<u8>>,
    lens: Vec<usize>,
    free: Vec<usize>,
    pending: VecDeque<usize>,
    /// The receive chains one frame takes (reused).
    taken: Vec<(u16, Segments)>,
}

enum Kind {
    Vm,
    Uplink(wv_virtio::net::Tap),
}

struct Port {
    network: usize,
    name: String,
    kind: Kind,
    rx: Mutex<RxSide>,
    counters: PortCounters,
}

struct Network {
    name: String,
    ports: Vec<usize>,
    /// MAC -> (port, last seen).
    macs: Mutex<HashMap<[u8; 6], (usize, Instant)>>,
}

/// The switch: its networks and ports.
pub struct Switch {
    networks: Vec<Network>,
    ports: Vec<Port>,
}

/// Where a frame comes from: a guest's transmit chain, or bytes (from a TAP or a slot).
pub enum Source<'a> {
    /// Checked segments in a guest's memory (vnet header first).
    Guest(&'a GuestMemoryMmap, &'a Segments),
    /// A frame with its vnet header.
    Bytes(&'a [u8]),
}

impl Source<'_> {
    fn len(&self) -> usize {
        match self {
            Source::Guest(_, s) => s.len(),
            Source::Bytes(b) => b.len(),
        }
    }
    fn peek(&self, off: usize, out: &mut [u8]) -> bool {
        match self {
            Source::Guest(m, s) => s.peek(*m, off, out),
            Source::Bytes(b) => match b.get(off..off + out.len()) {
                Some(x) => {
                    out.copy_from_slice(x);
                    true
                }
                None => false,
            },
        }
    }
    /// Copies the frame after the vnet header into `to` at `off`.
    fn copy_payload(&self, to: &Segments, mem: &GuestMemoryMmap, off: usize) -> bool {
        let n = self.len() - VNET_HDR;
        match self {
            Source::Guest(m, s) => s.copy_to(*m, VNET_HDR, to, mem, off, n),
            Source::Bytes(b) => to.copy_in(mem, off, &b[VNET_HDR..]),
        }
    }
    fn copy_all(&self, out: &mut [u8]) -> bool {
        match self {
            Source::Guest(m, s) => s.copy_out(*m, 0, out),
            Source::Bytes(b) => {
                out.copy_from_slice(b);
                true
            }
        }
    }
}

impl Switch {
    /// A switch for `cfg`: the uplink TAPs are opened (and created if missing, which needs
    /// CAP_NET_ADMIN) here.
    pub fn new(cfg: &Config) -> Result<Arc<Switch>, String> {
        let mut networks = Vec::new();
        let mut ports = Vec::new();
        for (ni, n) in cfg.networks.iter().enumerate() {
            if !valid_name(&n.name) {
                return Err(format!(
                    "network '{}': use 1-64 of A-Z a-z 0-9 _ . -",
                    n.name.escape_debug()
                ));
            }
            if cfg.networks[..ni].iter().any(|o| o.name == n.name) {
                return Err(format!("network '{}' is given twice", n.name));
            }
            let mut mine = Vec::new();
            for (pi, p) in n.ports.iter().enumerate() {
                if !valid_name(p) || n.ports[..pi].contains(p) {
                    return Err(format!(
                        "network {}: port '{}' is invalid or given twice",
                        n.name,
                        p.escape_debug()
                    ));
                }
                mine.push(ports.len());
                ports.push(Port::new(ni, p, Kind::Vm));
            }
            if let Some(t) = &n.uplink {
                let tap = wv_virtio::net::Tap::open(t)
                    .map_err(|e| format!("network {}: uplink: {e}", n.name))?;
                mine.push(ports.len());
                ports.push(Port::new(ni, &format!("uplink:{t}"), Kind::Uplink(tap)));
            }
            networks.push(Network {
                name: n.name.clone(),
                ports: mine,
                macs: Mutex::default(),
            });
        }
        Ok(Arc::new(Switch { networks, ports }))
    }

    /// The index of port `port` of network `network`.
    pub fn port(&self, network: &str, port: &str) -> Option<usize> {
        self.ports
            .iter()
            .position(|p| p.name == port && self.networks[p.network].name == network)
    }

    /// Connects VM port `port`'s receive side to a guest's memory and receive queue, as a
    /// VMM's connection does (for harnesses and fuzzing that play the guest).
    pub fn attach(&self, port: usize, mem: Mem, rx: VringRwLock<Mem>, mergeable: bool) {
        let mut r = lock(&self.ports[port].rx);
        r.mem = Some(mem);
        r.vring = Some(rx);
        r.mergeable = mergeable;
    }

    /// Every port's counters.
    pub fn stats(&self) -> Vec<PortStats> {
        self.ports
            .iter()
            .map(|p| {
                let c = &p.counters;
                let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
                PortStats {
                    network: self.networks[p.network].name.clone(),
                    port: p.name.clone(),
                    kind: match p.kind {
                        Kind::Vm => "vhost-user",
                        Kind::Uplink(_) => "uplink",
                    },
                    connected: match p.kind {
                        Kind::Vm => lock(&p.rx).vring.is_some(),
                        Kind::Uplink(_) => true,
                    },
                    tx_frames: g(&c.tx_frames),
                    tx_bytes: g(&c.tx_bytes),
                    rx_frames: g(&c.rx_frames),
                    rx_bytes: g(&c.rx_bytes),
                    copies: g(&c.copies),
                    copied_bytes: g(&c.copied_bytes),
                    queued: g(&c.queued),
                    dropped_malformed: g(&c.dropped_malformed),
                    dropped_no_buffer: g(&c.dropped_no_buffer),
                    dropped_isolated: g(&c.dropped_isolated),
                }
            })
            .collect()
    }

    /// Switches one frame (vnet header first) that entered at port `from`.
    pub fn forward(&self, from: usize, src: &Source) {
        let p = &self.ports[from];
        let len = src.len();
        let mut eth = [0u8; 12];
        if !(VNET_HDR + 14..=MAX_FRAME).contains(&len) || !src.peek(VNET_HDR, &mut eth) {
            PortCounters::add(&p.counters.dropped_malformed, 1);
            return;
        }
        PortCounters::add(&p.counters.tx_frames, 1);
        PortCounters::add(&p.counters.tx_bytes, (len - VNET_HDR) as u64);
        let dst: [u8; 6] = eth[..6].try_into().expect("6 bytes");
        let srcmac: [u8; 6] = eth[6..].try_into().expect("6 bytes");
        let net = &self.networks[p.network];
        let now = Instant::now();
        let to = {
            let mut macs = lock(&net.macs);
            if srcmac[0] & 1 == 0 {
                macs.insert(srcmac, (from, now));
            }
            if dst[0] & 1 == 0 {
                macs.get(&dst)
                    .filter(|(_, t)| now.duration_since(*t) < MAC_AGEING)
                    .map(|(port, _)| *port)
            } else {
                None
            }
        };
        match to {
            Some(port) if port == from => {}
            Some(port) => self.deliver(port, src),
            None => {
                if dst[0] & 1 == 0 && self.known_elsewhere(p.network, &dst, now) {
                    PortCounters::add(&p.counters.dropped_isolated, 1);
                    return;
                }
                for &port in &net.ports {
                    if port != from {
                        self.deliver(port, src);
                    }
                }
            }
        }
    }

    /// Whether a network other than `net` has learned `mac`.
    fn known_elsewhere(&self, net: usize, mac: &[u8; 6], now: Instant) -> bool {
        self.networks.iter().enumerate().any(|(i, n)| {
            i != net
                && lock(&n.macs)
                    .get(mac)
                    .is_some_and(|(_, t)| now.duration_since(*t) < MAC_AGEING)
        })
    }

    /// Delivers a frame to port `to`: to its TAP, into its guest's receive buffers, or into
    /// one of its slots while the guest has posted none.
    fn deliver(&self, to: usize, src: &Source) {
        let p = &self.ports[to];
        let c = &p.counters;
        let n = src.len() - VNET_HDR;
        match &p.kind {
            Kind::Uplink(tap) => {
                // A TAP takes the frame in one write: copied once, header zeroed.
                let mut rx = lock(&p.rx);
                let slot = rx.slot_buf(0);
                slot.resize(src.len(), 0);
                if !src.copy_all(slot) {
                    PortCounters::add(&c.dropped_malformed, 1);
                    return;
                }
                slot[..VNET_HDR].fill(0);
                if tap.file().write_all(slot).is_ok() {
                    PortCounters::add(&c.rx_frames, 1);
                    PortCounters::add(&c.rx_bytes, n as u64);
                    PortCounters::add(&c.copies, 1);
                    PortCounters::add(&c.copied_bytes, n as u64);
                } else {
                    PortCounters::add(&c.dropped_no_buffer, 1);
                }
            }
            Kind::Vm => {
                let mut rx = lock(&p.rx);
                if rx.vring.is_none() {
                    PortCounters::add(&c.dropped_no_buffer, 1);
                    return;
                }
                if !rx.pending.is_empty() {
                    // Buffers the guest posted since are for the frames already waiting.
                    rx.drain(c);
                }
                if rx.pending.is_empty() {
                    match rx.put(src) {
                        Put::Done => {
                            PortCounters::add(&c.rx_frames, 1);
                            PortCounters::add(&c.rx_bytes, n as u64);
                            PortCounters::add(&c.copies, 1);
                            PortCounters::add(&c.copied_bytes, n as u64);
                            return;
                        }
                        Put::Bad => {
                            PortCounters::add(&c.dropped_malformed, 1);
                            return;
                        }
                        Put::TooBig => {
                            PortCounters::add(&c.dropped_no_buffer, 1);
                            return;
                        }
                        Put::NoBuffer => {}
                    }
                }
                if rx.hold(src) {
                    PortCounters::add(&c.queued, 1);
                    PortCounters::add(&c.copies, 1);
                    PortCounters::add(&c.copied_bytes, n as u64);
                } else {
                    PortCounters::add(&c.dropped_no_buffer, 1);
                }
            }
        }
    }

    /// The guest of VM port `port` posted receive buffers: delivers what waits for them.
    fn flush(&self, port: usize) {
        let p = &self.ports[port];
        lock(&p.rx).drain(&p.counters);
    }
}

enum Put {
    Done,
    NoBuffer,
    /// The frame needs more than [`MAX_RX_CHAINS`] of the guest's buffers: dropped, none taken.
    TooBig,
    Bad,
}

impl RxSide {
    /// Delivers the held frames, oldest first, while the guest has buffers for them.
    fn drain(&mut self, c: &PortCounters) {
        while let Some(&slot) = self.pending.front() {
            let buf = std::mem::take(&mut self.slots[slot]);
            let len = self.lens[slot];
            let r = self.put(&Source::Bytes(&buf[..len]));
            self.slots[slot] = buf;
            match r {
                Put::NoBuffer => break,
                Put::Done => {
                    PortCounters::add(&c.rx_frames, 1);
                    PortCounters::add(&c.rx_bytes, (len - VNET_HDR) as u64);
                    PortCounters::add(&c.copies, 1);
                    PortCounters::add(&c.copied_bytes, (len - VNET_HDR) as u64);
                }
                Put::Bad => PortCounters::add(&c.dropped_malformed, 1),
                Put::TooBig => PortCounters::add(&c.dropped_no_buffer, 1),
            }
            self.pending.pop_front();
            self.free.push(slot);
        }
    }
}

impl Port {
    fn new(network: usize, name: &str, kind: Kind) -> Port {
        Port {
            network,
            name: name.to_string(),
            kind,
            rx: Mutex::default(),
            counters: PortCounters::default(),
        }
    }
}

impl RxSide {
    /// Slot `i`'s buffer, allocated (once) with room for any frame.
    fn slot_buf(&mut self, i: usize) -> &mut Vec<u8> {
        while self.slots.len() <= i {
            self.slots.push(Vec::new());
            self.lens.push(0);
        }
        if self.slots[i].capacity() < MAX_FRAME {
            self.slots[i] = Vec::with_capacity(MAX_FRAME);
        }
        &mut self.slots[i]
    }

    /// Copies the frame into a free slot; false when all [`PENDING_SLOTS`] are full.
    fn hold(&mut self, src: &Source) -> bool {
        let slot = match self.free.pop() {
            Some(s) => s,
            None if self.slots.len() < PENDING_SLOTS => self.slots.len(),
            None => return false,
        };
        let len = src.len();
        let buf = self.slot_buf(slot);
        buf.resize(len, 0);
        if !src.copy_all(buf) {
            self.free.push(slot);
            return false;
        }
        self.lens[slot] = len;
        self.pending.push_back(slot);
        true
    }

    /// Writes the frame into receive buffers the guest posted (a vnet header of the switch's
    /// own, then the frame copied from its source); NoBuffer if there are not enough (none is
    /// taken then), Bad if the guest's buffers were malformed (they are returned empty).
    fn put(&mut self, src: &Source) -> Put {
        let (Some(mem), Some(vring)) = (&self.mem, &self.vring) else {
            return Put::NoBuffer;
        };
        let mem = mem.memory();
        let mut st = vring.get_mut();
        let q = st.get_queue_mut();
        if !q.ready() {
            return Put::NoBuffer;
        }
        let need = src.len();
        // The chains taken, in a list kept from frame to frame (no allocation per frame).
        let taken = &mut self.taken;
        taken.clear();
        let (mut room, mut bad) = (0usize, false);
        while room < need && (self.mergeable || taken.is_empty()) {
            if taken.len() == MAX_RX_CHAINS {
                // More buffers than a frame may take: it does not fit what the guest posts.
                for _ in 0..taken.len() {
                    q.go_to_previous_position();
                }
                return Put::TooBig;
            }
            let Some(chain) = q.pop_descriptor_chain(&*mem) else {
                for _ in 0..taken.len() {
                    q.go_to_previous_position();
                }
                return Put::NoBuffer;
            };
            let head = chain.head_index();
            match Segments::read_rx(chain, &*mem) {
                Ok(s) => {
                    room += s.len();
                    taken.push((head, s));
                }
                Err(_) => {
                    taken.push((head, Segments::new()));
                    bad = true;
                    break;
                }
            }
        }
        let n = taken.len();
        if bad || room < need || taken[0].1.len() < VNET_HDR {
            for (head, _) in &taken[..n] {
                let _ = q.add_used(&*mem, *head, 0);
            }
            drop(st);
            let _ = vring.signal_used_queue();
            return Put::Bad;
        }
        // The header: no offloads; num_buffers the chains used.
        let mut hdr = [0u8; VNET_HDR];
        hdr[10..12].copy_from_slice(&(n as u16).to_le_bytes());
        let mut ok = true;
        let mut left = need;
        let mut src_off = 0usize;
        for (head, s) in &taken[..n] {
            let len = s.len().min(left);
            // Copy this chain's share: header bytes, then payload.
            let mut off = 0;
            if src_off < VNET_HDR {
                let h = (VNET_HDR - src_off).min(len);
                ok &= s.copy_in(&*mem, 0, &hdr[src_off..src_off + h]);
                off = h;
            }
            if len > off {
                ok &= copy_range(src, src_off + off, s, &mem, off, len - off);
            }
            src_off += len;
            left -= len;
            let _ = q.add_used(&*mem, *head, len as u32);
        }
        let notify = q.needs_notification(&*mem).unwrap_or(true);
        drop(st);
        if notify {
            let _ = vring.signal_used_queue();
        }
        if ok {
            Put::Done
        } else {
            Put::Bad
        }
    }
}

/// Copies `len` bytes of `src` at `src_off` (at or after the vnet header) into `to` at `off`.
fn copy_range(
    src: &Source,
    src_off: usize,
    to: &Segments,
    mem: &GuestMemoryMmap,
    off: usize,
    len: usize,
) -> bool {
    if src_off == VNET_HDR && src_off + len == src.len() {
        return src.copy_payload(to, mem, off);
    }
    match src {
        Source::Guest(m, s) => s.copy_to(*m, src_off, to, mem, off, len),
        Source::Bytes(b) => to.copy_in(mem, off, &b[src_off..src_off + len]),
    }
}

/// One VM port as a vhost-user net backend.
#[derive(Clone)]
pub struct PortBackend {
    sw: Arc<Switch>,
    port: usize,
    /// The exit events handed to vhost-user-backend, closed once a connection's daemon is
    /// gone ([`PortBackend::close_exit_events`]).
    exit: ExitEvents,
}

impl PortBackend {
    /// The backend of port `port` of `sw`.
    pub fn new(sw: Arc<Switch>, port: usize) -> PortBackend {
        PortBackend {
            sw,
            port,
            exit: ExitEvents::default(),
        }
    }

    /// Closes the exit events' read ends handed out so far. Only once the daemon that took
    /// them has been dropped (its epoll handlers with it): nothing else uses them then.
    pub fn close_exit_events(&self) {
        self.exit.close();
    }

    fn rx(&self) -> MutexGuard<'_, RxSide> {
        lock(&self.sw.ports[self.port].rx)
    }

    /// Serves the transmit queue: every chain read once, checked, and switched (the port's
    /// guest memory is the one [`Switch::attach`] or the connection gave).
    pub fn transmit(&self, vring: &VringRwLock<Mem>) {
        let Some(mem) = self.rx().mem.clone() else {
            return;
        };
        let mem = mem.memory();
        let c = &self.sw.ports[self.port].counters;
        let mut any = false;
        loop {
            let mut st = vring.get_mut();
            let q = st.get_queue_mut();
            let Some(chain) = q.pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            match Segments::read_tx(chain, &*mem) {
                Ok(s) => {
                    // The queue stays locked while the frame is copied: the receivers' locks
                    // are never held while taking a transmit queue, so this cannot deadlock.
                    self.sw.forward(self.port, &Source::Guest(&mem, &s));
                }
                Err(
                    Bad::Direction
                    | Bad::TooManySegments
                    | Bad::OutOfMemory
                    | Bad::Length
                    | Bad::Chain,
                ) => {
                    PortCounters::add(&c.dropped_malformed, 1);
                }
            }
            if q.add_used(&*mem, head, 0).is_err() {
                break;
            }
            any = true;
        }
        if any && vring.needs_notification().unwrap_or(true) {
            let _ = vring.signal_used_queue();
        }
    }
}

impl VhostUserBackend for PortBackend {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        2
    }
    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_MRG_RXBUF | F_PROTOCOL_FEATURES
    }
    fn acked_features(&self, features: u64) {
        self.rx().mergeable = features & F_MRG_RXBUF != 0;
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::empty()
    }
    fn set_event_idx(&self, _enabled: bool) {}
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one the worker thread of a connection that ended never ends, and dropping
        // its daemon (to take the next connection) would wait for it forever.
        self.exit.pair()
    }
    fn update_memory(&self, mem: Mem) -> std::io::Result<()> {
        wv_virtio::vu_backend::check_memory(&mem.memory())?;
        self.rx().mem = Some(mem);
        Ok(())
    }
    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if vrings.len() != 2 {
            return Ok(());
        }
        {
            let mut rx = self.rx();
            if rx.vring.is_none() {
                rx.vring = Some(vrings[0].clone());
            }
        }
        match device_event {
            0 => self.sw.flush(self.port),
            1 => self.transmit(&vrings[1]),
            _ => {}
        }
        Ok(())
    }
    fn reset_device(&self) {
        self.disconnect();
    }
}

impl PortBackend {
    /// Forgets the guest (its memory, its queue, the frames held for it).
    fn disconnect(&self) {
        let mut rx = self.rx();
        rx.vring = None;
        rx.mem = None;
        while let Some(s) = rx.pending.pop_front() {
            rx.free.push(s);
        }
    }
}

/// Serves VM port `port` on `socket` until the process ends: one frontend at a time; when it
/// goes, the port forgets it and waits for the next.
fn serve_port(
    sw: Arc<Switch>,
    port: usize,
    socket: PathBuf,
    mut listener: Listener,
) -> Result<(), String> {
    let backend = PortBackend::new(sw, port);
    let exit = backend.exit.clone();
    let b = backend.clone();
    serve_frontends(
        "wv vswitch",
        &format!("vswitch-port{port}"),
        backend,
        &exit,
        &socket,
        &mut listener,
        || {
            b.disconnect();
            true
        },
    )
}

/// Reads frames from uplink port `port`'s TAP and switches them, until the process ends.
fn serve_uplink(sw: Arc<Switch>, port: usize) {
    let Kind::Uplink(tap) = &sw.ports[port].kind else {
        return;
    };
    let mut buf = vec![0u8; MAX_FRAME];
    let fd = tap.file().as_raw_fd();
    loop {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, -1) } < 0 {
            continue;
        }
        loop {
            match tap.file().read(&mut buf) {
                Ok(n) if n >= VNET_HDR => sw.forward(port, &Source::Bytes(&buf[..n])),
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
}

/// Answers `stats` on the control socket with every port's counters (one JSON line).
fn serve_control(sw: Arc<Switch>, listener: UnixListener) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let sw = sw.clone();
        let _ = std::thread::Builder::new()
            .name("vswitch-control".into())
            .spawn(move || {
                let Ok(mut out) = conn.try_clone() else {
                    return;
                };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                for line in BufReader::new(conn.take(4096)).lines() {
                    let Ok(line) = line else { break };
                    let reply = match line.trim() {
                        "stats" => serde_json::json!({ "ports": sw.stats() }),
                        other => serde_json::json!({
                            "error": format!("unknown request '{}' (stats)", other.escape_debug())
                        }),
                    };
                    if writeln!(out, "{reply}").is_err() {
                        break;
                    }
                }
            });
    }
}

/// The socket of port `port` of `network` under `dir`.
pub fn port_socket(dir: &Path, network: &str, port: &str) -> PathBuf {
    dir.join(network).join(format!("{port}.sock"))
}

/// The control socket under `dir`.
pub fn control_socket(dir: &Path) -> PathBuf {
    dir.join("control.sock")
}

/// Runs the switch: creates the sockets, serves every port and the control socket; returns
/// only on a set-up error.
pub fn run(cfg: &Config) -> Result<(), String> {
    let sw = Switch::new(cfg)?;
    let dir = &cfg.socket_dir;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let ctl = control_socket(dir);
    let _ = std::fs::remove_file(&ctl);
    let listener =
        UnixListener::bind(&ctl).map_err(|e| format!("cannot listen on {}: {e}", ctl.display()))?;
    let mut threads = Vec::new();
    for (i, p) in sw.ports.iter().enumerate() {
        let sw2 = sw.clone();
        match p.kind {
            Kind::Vm => {
                let net = &sw.networks[p.network].name;
                let sock = port_socket(dir, net, &p.name);
                if let Some(parent) = sock.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
                }
                // Bound before the switch says it serves: a VMM started then finds it.
                let listener = Listener::new(&sock, true)
                    .map_err(|e| format!("cannot listen on {}: {e}", sock.display()))?;
                threads.push(
                    std::thread::Builder::new()
                        .name(format!("vswitch-{net}-{}", p.name))
                        .spawn(move || {
                            if let Err(e) = serve_port(sw2, i, sock, listener) {
                                eprintln!("wv vswitch: {e}");
                            }
                        })
                        .map_err(|e| e.to_string())?,
                );
            }
            Kind::Uplink(_) => threads.push(
                std::thread::Builder::new()
                    .name(format!("vswitch-{}", p.name))
                    .spawn(move || serve_uplink(sw2, i))
                    .map_err(|e| e.to_string())?,
            ),
        }
    }
    eprintln!(
        "wv vswitch: serving {} port(s) under {}",
        sw.ports.len(),
        dir.display()
    );
    serve_control(sw, listener);
    Ok(())
}

#[cfg(test)]
mod tests;
