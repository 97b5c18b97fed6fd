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
//! `DIR/control.sock` (a line `stats`), which also takes networks and ports at run time
//! (`net add NAME [uplink=TAP]`, `net del NAME`, `port add NET/PORT`, `port del NET/PORT`,
//! `nets`: [`Switch::control`]).
//!
//! Shares (mClock-style, [`wv_shares`]): each port has shares, a reservation and a limit in bits
//! per second (`port set NET/PORT shares=N reservation=BPS limit=BPS`). A port's limit holds for
//! everything it sends: its transmit thread waits until the limit lets the next frame go, the
//! frame staying in its guest's ring meanwhile. Each destination (a VM port, an uplink) has a
//! dispatcher whose flows are the ports sending to it: a unicast frame goes when the dispatcher
//! says it is its sender's turn, reservations first, then by shares. A destination is contended
//! when its guest has no receive buffer for a sender while others wait too, or when its `rate=BPS`
//! (a link speed, needed for an uplink, whose TAP takes every frame) would be exceeded: then
//! the frame waits in the sender's ring, uncopied, until its turn and a buffer come (at most
//! [`SHARES_MAX_WAIT`], then it is dropped and counted). Flooded frames are not scheduled.
//! A sender waits in its own transmit thread with no lock of the switch held (other ports and
//! control requests go on); a sender with more frames in its ring keeps its turn at the
//! destination while it comes back with the next one (`ANTICIPATION`), so that its shares do
//! not flatten.
//!
//! Notifications go per batch, not per frame (`Signals`): a transmit thread drains its ring
//! with its guest's kicks off, tells the receivers it wrote to once per `RX_SIGNAL_BATCH`
//! frames, when a receiver runs out of buffers, and before it waits; a receiver is asked to
//! kick only while something waits for its buffers. docs/NETWORK.md has the whole design.

#![allow(clippy::cast_possible_truncation)] // frame lengths are bounded by MAX_FRAME, chain counts by 4

pub mod frame;
pub mod offload;

use frame::{Bad, Segments, MAX_FRAME, VNET_HDR};
use offload::{Form, Offload, MAX_HDRS};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use wv_virtio::vu_backend::{serve_frontends, ExitEvents};

/// Longest a frame waits for its turn at a contended destination or for its sender's limit.
pub const SHARES_MAX_WAIT: Duration = Duration::from_millis(500);
/// How long a destination with no receive buffer is left alone before senders look again (its
/// guest's kick ends it sooner).
const STALL: Duration = Duration::from_millis(2);
/// Bytes a port idle for a while may get ahead of its entitlement.
const BURST_BYTES: f64 = 64.0 * 1024.0;
/// How long a destination keeps the turn of a sender with more frames in its ring while the
/// sender's thread comes back with the next one ([`wv_shares::Gate::acquire_with`]): without
/// it, a turn that comes while the sender is between two frames goes to the others, and the
/// shares flatten.
const ANTICIPATION: Duration = Duration::from_millis(1);
/// Transmit chains returned to a guest before it is told (rather than once its ring is empty:
/// a sender waiting for its turn gets its buffers back meanwhile).
const TX_SIGNAL_BATCH: usize = 64;
/// Frames a sender's thread delivers before it tells the receivers (it tells them sooner when
/// its ring is empty or before it waits: [`Signals`]).
const RX_SIGNAL_BATCH: usize = 64;
/// Receivers a sender's thread keeps untold at a time.
const SIGNAL_PORTS: usize = 8;

/// How long a learned MAC address stays without being seen again.
pub const MAC_AGEING: Duration = Duration::from_secs(300);
/// Frames a port holds for its guest while it has posted no receive buffer.
pub const PENDING_SLOTS: usize = 32;
/// Most receive chains one frame may fill (mergeable buffers).
pub const MAX_RX_CHAINS: usize = 64;
const QUEUE_SIZE: usize = 256;
/// Longest TAP name (the kernel's IFNAMSIZ less the NUL).
const MAX_TAP_NAME: usize = 15;

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
    /// Frames from this port that waited for their turn, the destination or its limit.
    pub sched_delayed: AtomicU64,
    /// Frames from this port dropped after waiting [`SHARES_MAX_WAIT`].
    pub sched_dropped: AtomicU64,
    /// Frames from this port that were TCP segments to cut (TSO, GSO from a TAP).
    pub tx_gso_frames: AtomicU64,
    /// Frames from this port whose vnet header did not fit the frame or the features its
    /// driver acked ([`offload::BadOffload`]).
    pub dropped_bad_offload: AtomicU64,
    /// Segments delivered to this port whole (its driver acked GUEST_TSO).
    pub rx_gso_frames: AtomicU64,
    /// Segments cut by the switch for this port (its driver did not ack GUEST_TSO) ...
    pub segmented: AtomicU64,
    /// ... and the frames they became.
    pub segments: AtomicU64,
    /// Checksums the switch filled in for this port (its driver did not ack GUEST_CSUM).
    pub csum_filled: AtomicU64,
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
    /// Its shares, and its reservation and limit in bits per second (0: none).
    pub shares: u32,
    pub reservation_bps: u64,
    pub limit_bps: u64,
    /// Its capacity as a destination, in bits per second (0: what its guest takes).
    pub rate_bps: u64,
    pub sched_delayed: u64,
    pub sched_dropped: u64,
    /// Bits per second it sent over the last window of at least a second.
    pub tx_rate_bps: u64,
    /// The offloads its driver acked (virtio-net feature bits: CSUM, GUEST_CSUM, TSO).
    pub features: u64,
    pub tx_gso_frames: u64,
    pub dropped_bad_offload: u64,
    pub rx_gso_frames: u64,
    pub segmented: u64,
    pub segments: u64,
    pub csum_filled: u64,
}

/// The receive side of a VM port: its guest's memory and receive queue while connected, and
/// the frames waiting for buffers.
#[derive(Default)]
struct RxSide {
    mem: Option<Mem>,
    vring: Option<VringRwLock<Mem>>,
    mergeable: bool,
    /// The features its driver acked (offloads it takes).
    features: u64,
    /// Slots (allocated on first use, then reused) and the order of the full ones.
    slots: Vec<Vec<u8>>,
    /// Each slot's frame: its length, its offload, and the first segment not yet delivered.
    lens: Vec<(usize, Offload, usize)>,
    free: Vec<usize>,
    pending: VecDeque<usize>,
    /// The receive chains one frame takes (reused).
    taken: Vec<(u16, Segments)>,
    /// Used buffers the guest has not been told of yet ([`RxSide::signal`]).
    unsignalled: bool,
    /// The guest was told not to kick when it posts buffers (VRING_USED_F_NO_NOTIFY): nothing
    /// waits for them. Kicks are asked for again when a frame finds no buffer.
    kicks_off: bool,
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
    /// Its shares, reservation and limit (bytes per second).
    shares: Mutex<wv_shares::Settings>,
    /// Its limit (flow 0 of a gate of its own: every frame it sends passes it).
    limiter: wv_shares::Gate,
    /// The dispatcher of the frames sent to it (flows: the sending ports' indexes).
    gate: wv_shares::Gate,
    /// Set once the port is deleted: its threads end.
    removed: AtomicBool,
    /// The features its driver acked (as a sender: the offloads its headers may ask for).
    acked: AtomicU64,
}

struct Network {
    name: String,
    ports: Vec<usize>,
    /// MAC -> (port, last seen).
    macs: Mutex<HashMap<[u8; 6], (usize, Instant)>>,
}

/// The networks and ports, by index; a deleted one leaves `None` (indexes are never reused,
/// so a backend's index always names its own port or none).
#[derive(Default)]
struct Table {
    networks: Vec<Option<Network>>,
    ports: Vec<Option<Arc<Port>>>,
}

impl Table {
    fn port(&self, i: usize) -> Option<&Arc<Port>> {
        self.ports.get(i).and_then(Option::as_ref)
    }
    fn network(&self, i: usize) -> Option<&Network> {
        self.networks.get(i).and_then(Option::as_ref)
    }
    fn network_index(&self, name: &str) -> Option<usize> {
        self.networks
            .iter()
            .position(|n| n.as_ref().is_some_and(|n| n.name == name))
    }
    fn port_index(&self, network: &str, port: &str) -> Option<usize> {
        let net = self.network_index(network)?;
        self.ports.iter().position(|p| {
            p.as_ref()
                .is_some_and(|p| p.network == net && p.name == port)
        })
    }
}

/// The switch: its networks and ports, which change at run time.
pub struct Switch {
    table: RwLock<Table>,
    socket_dir: PathBuf,
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
    /// CAP_NET_ADMIN) here; nothing is served until [`run`] (or [`Switch::add_port`]).
    pub fn new(cfg: &Config) -> Result<Arc<Switch>, String> {
        let sw = Arc::new(Switch {
            table: RwLock::default(),
            socket_dir: cfg.socket_dir.clone(),
        });
        for n in &cfg.networks {
            sw.new_network(&n.name, n.uplink.as_deref())?;
            for p in &n.ports {
                sw.new_port(&n.name, p)?;
            }
        }
        Ok(sw)
    }

    fn read(&self) -> RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds network `name` to the table (with its uplink port, whose index is returned).
    fn new_network(&self, name: &str, uplink: Option<&str>) -> Result<Option<usize>, String> {
        if !valid_name(name) {
            return Err(format!(
                "network '{}': use 1-64 of A-Z a-z 0-9 _ . - (not starting with .)",
                name.escape_debug()
            ));
        }
        if let Some(t) = uplink {
            if t.is_empty() || t.len() > MAX_TAP_NAME || t.contains(['/', '\0']) {
                return Err(format!(
                    "network {name}: uplink '{}': a TAP name takes 1-{} characters",
                    t.escape_debug(),
                    MAX_TAP_NAME
                ));
            }
        }
        if self.read().network_index(name).is_some() {
            return Err(format!("network '{name}' exists already"));
        }
        // Opened before the table is locked: creating a TAP can take a while.
        let tap = match uplink {
            Some(t) => Some(
                wv_virtio::net::Tap::open(t).map_err(|e| format!("network {name}: uplink: {e}"))?,
            ),
            None => None,
        };
        // The host's kernel hands the uplink checksum-partial frames and TCP segments (and takes
        // them: a TAP's writer needs no feature) if it lets this reader take them.
        let mut up_features = 0;
        if let (Some(tap), Some(tn)) = (&tap, uplink) {
            use wv_virtio::net::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
            match tap.set_offloads(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) {
                Ok(()) => up_features = offload::OFFLOADS,
                Err(e) => eprintln!(
                    "wv vswitch: network {name}: uplink {tn}: the kernel refused checksum and segmentation offloads ({e}); plain frames to and from it, segments cut by the switch"
                ),
            }
        }
        let mut t = self.write();
        if t.network_index(name).is_some() {
            return Err(format!("network '{name}' exists already"));
        }
        let ni = t.networks.len();
        let mut ports = Vec::new();
        let mut up = None;
        if let (Some(tap), Some(tn)) = (tap, uplink) {
            up = Some(t.ports.len());
            ports.push(t.ports.len());
            let p = Port::new(ni, &format!("uplink:{tn}"), Kind::Uplink(tap));
            p.acked.store(up_features, Ordering::Relaxed);
            lock(&p.rx).features = up_features;
            t.ports.push(Some(Arc::new(p)));
        }
        t.networks.push(Some(Network {
            name: name.to_string(),
            ports,
            macs: Mutex::default(),
        }));
        Ok(up)
    }

    /// Adds VM port `port` of network `network` to the table; its index.
    fn new_port(&self, network: &str, port: &str) -> Result<usize, String> {
        if !valid_name(port) {
            return Err(format!(
                "network {network}: port '{}': use 1-64 of A-Z a-z 0-9 _ . - (not starting with .)",
                port.escape_debug()
            ));
        }
        let mut t = self.write();
        let Some(ni) = t.network_index(network) else {
            return Err(format!("no network named '{}'", network.escape_debug()));
        };
        if t.port_index(network, port).is_some() {
            return Err(format!("network {network}: port '{port}' exists already"));
        }
        let pi = t.ports.len();
        t.ports.push(Some(Arc::new(Port::new(ni, port, Kind::Vm))));
        if let Some(Some(n)) = t.networks.get_mut(ni) {
            n.ports.push(pi);
        }
        Ok(pi)
    }

    /// Takes port `i` out of the table (and out of its network's MAC table); the port.
    fn remove_port(t: &mut Table, i: usize) -> Option<Arc<Port>> {
        let p = t.ports.get_mut(i)?.take()?;
        if let Some(Some(n)) = t.networks.get_mut(p.network) {
            n.ports.retain(|&x| x != i);
            lock(&n.macs).retain(|_, (port, _)| *port != i);
        }
        p.removed.store(true, Ordering::SeqCst);
        // Senders waiting for its turn or for its limit stop waiting (nothing is held by them).
        p.gate.close();
        p.limiter.close();
        for q in t.ports.iter().flatten() {
            q.gate.remove(i);
        }
        Some(p)
    }

    /// Ends the serving of removed port `p` (index `i`): wakes its thread, which sees it
    /// removed, and removes its socket.
    fn retire(&self, network: &str, p: &Port) {
        if let Kind::Vm = p.kind {
            let sock = port_socket(&self.socket_dir, network, &p.name);
            // A connection wakes the thread waiting for one; it ends on seeing the port gone
            // (or, with a VMM connected, when that VMM goes).
            drop(UnixStream::connect(&sock));
            let _ = std::fs::remove_file(&sock);
        }
    }

    /// Adds VM port `port` to network `network` and serves it: its socket is bound when this
    /// returns (its path).
    pub fn add_port(self: &Arc<Self>, network: &str, port: &str) -> Result<PathBuf, String> {
        let i = self.new_port(network, port)?;
        match self.start_port(i) {
            Ok(sock) => Ok(sock),
            Err(e) => {
                Self::remove_port(&mut self.write(), i);
                Err(e)
            }
        }
    }

    /// Deletes VM port `port` of network `network`. A VMM connected to it is served until it
    /// goes; no frame reaches it or comes from it meanwhile.
    pub fn del_port(&self, network: &str, port: &str) -> Result<(), String> {
        let p = {
            let mut t = self.write();
            let Some(i) = t.port_index(network, port) else {
                return Err(format!(
                    "network '{}' has no port '{}'",
                    network.escape_debug(),
                    port.escape_debug()
                ));
            };
            if matches!(t.port(i).map(|p| &p.kind), Some(Kind::Uplink(_))) {
                return Err(format!(
                    "'{port}' is the uplink of network {network}: delete the network instead"
                ));
            }
            Self::remove_port(&mut t, i)
        };
        if let Some(p) = p {
            self.retire(network, &p);
        }
        Ok(())
    }

    /// Adds network `name` (with an uplink TAP, opened and served here) at run time.
    pub fn add_network(self: &Arc<Self>, name: &str, uplink: Option<&str>) -> Result<(), String> {
        if let Some(i) = self.new_network(name, uplink)? {
            if let Err(e) = self.start_port(i) {
                let _ = self.del_network(name);
                return Err(e);
            }
        }
        let dir = self.socket_dir.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
    }

    /// Deletes network `name` with every port of it (VMMs still connected are served until
    /// they go, as by [`Switch::del_port`]).
    pub fn del_network(&self, name: &str) -> Result<(), String> {
        let gone = {
            let mut t = self.write();
            let Some(ni) = t.network_index(name) else {
                return Err(format!("no network named '{}'", name.escape_debug()));
            };
            let ports = t.network(ni).map(|n| n.ports.clone()).unwrap_or_default();
            let gone: Vec<Arc<Port>> = ports
                .into_iter()
                .filter_map(|i| Self::remove_port(&mut t, i))
                .collect();
            t.networks[ni] = None;
            gone
        };
        for p in &gone {
            self.retire(name, p);
        }
        let _ = std::fs::remove_dir(self.socket_dir.join(name));
        Ok(())
    }

    /// Every network: its name, uplink and VM ports.
    pub fn networks(&self) -> Vec<NetworkConfig> {
        let t = self.read();
        t.networks
            .iter()
            .enumerate()
            .filter_map(|(ni, n)| {
                let n = n.as_ref()?;
                let mut c = NetworkConfig {
                    name: n.name.clone(),
                    ..Default::default()
                };
                for p in n.ports.iter().filter_map(|&i| t.port(i)) {
                    debug_assert_eq!(p.network, ni);
                    match &p.kind {
                        Kind::Vm => c.ports.push(p.name.clone()),
                        Kind::Uplink(_) => {
                            c.uplink = p.name.strip_prefix("uplink:").map(str::to_string);
                        }
                    }
                }
                Some(c)
            })
            .collect()
    }

    /// Answers one request line of the control socket (see the crate's documentation) with
    /// one JSON value: the result, or `{"error": "..."}`.
    pub fn control(self: &Arc<Self>, line: &str) -> serde_json::Value {
        let words: Vec<&str> = line.split_whitespace().collect();
        let done = |r: Result<serde_json::Value, String>| match r {
            Ok(v) => v,
            Err(e) => serde_json::json!({ "error": e }),
        };
        let net_port = |a: &str| -> Result<(String, String), String> {
            a.split_once('/')
                .map(|(n, p)| (n.to_string(), p.to_string()))
                .ok_or_else(|| format!("'{}': expected NETWORK/PORT", a.escape_debug()))
        };
        let ok = serde_json::json!({ "ok": true });
        done(match words.as_slice() {
            ["stats"] => Ok(serde_json::json!({ "ports": self.stats() })),
            ["nets"] => Ok(serde_json::json!({
                "networks": self.networks().iter().map(|n| serde_json::json!({
                    "name": n.name, "uplink": n.uplink, "ports": n.ports,
                })).collect::<Vec<_>>()
            })),
            ["net", "add", name] => self.add_network(name, None).map(|()| ok),
            ["net", "add", name, up] => match up.strip_prefix("uplink=") {
                Some(tap) => self.add_network(name, Some(tap)).map(|()| ok),
                None => Err(format!(
                    "net add {name}: '{}' is not uplink=TAP",
                    up.escape_debug()
                )),
            },
            ["net", "del", name] => self.del_network(name).map(|()| ok),
            ["port", "add", a] => net_port(a).and_then(|(n, p)| {
                self.add_port(&n, &p)
                    .map(|s| serde_json::json!({ "ok": true, "socket": s }))
            }),
            ["port", "del", a] => net_port(a).and_then(|(n, p)| self.del_port(&n, &p).map(|()| ok)),
            ["port", "set", a, args @ ..] => net_port(a).and_then(|(n, p)| {
                let (mut sh, mut res, mut lim, mut rate) = (None, None, None, None);
                for arg in args {
                    let bad = || {
                        format!(
                            "port set {a}: '{}': expected shares=N, reservation=BPS, limit=BPS or rate=BPS",
                            arg.escape_debug()
                        )
                    };
                    let (k, v) = arg.split_once('=').ok_or_else(bad)?;
                    match k {
                        "shares" => sh = Some(v.parse().map_err(|_| bad())?),
                        "reservation" => res = Some(v.parse().map_err(|_| bad())?),
                        "limit" => lim = Some(v.parse().map_err(|_| bad())?),
                        "rate" => rate = Some(v.parse().map_err(|_| bad())?),
                        _ => return Err(bad()),
                    }
                }
                self.set_shares(&n, &p, sh, res, lim, rate).map(|()| ok.clone())
            }),
            _ => Err(format!(
                "unknown request '{}' (stats, nets, net add NAME [uplink=TAP], net del NAME, port add NET/PORT, port del NET/PORT, port set NET/PORT [shares=N] [reservation=BPS] [limit=BPS] [rate=BPS])",
                line.trim().escape_debug()
            )),
        })
    }

    /// The index of port `port` of network `network`.
    pub fn port(&self, network: &str, port: &str) -> Option<usize> {
        self.read().port_index(network, port)
    }

    /// Connects VM port `port`'s receive side to a guest's memory and receive queue, as a
    /// VMM's connection does (for harnesses and fuzzing that play the guest).
    pub fn attach(&self, port: usize, mem: Mem, rx: VringRwLock<Mem>, mergeable: bool) {
        let Some(p) = self.read().port(port).cloned() else {
            return;
        };
        let mut r = lock(&p.rx);
        r.mem = Some(mem);
        r.vring = Some(rx);
        r.kicks_off = false;
        r.mergeable = mergeable;
    }

    /// Every port's counters.
    pub fn stats(&self) -> Vec<PortStats> {
        let t = self.read();
        t.ports
            .iter()
            .flatten()
            .map(|p| {
                let c = &p.counters;
                let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
                let set = *lock(&p.shares);
                PortStats {
                    network: t
                        .network(p.network)
                        .map(|n| n.name.clone())
                        .unwrap_or_default(),
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
                    shares: set.shares,
                    reservation_bps: set.reservation.saturating_mul(8),
                    limit_bps: set.limit.saturating_mul(8),
                    rate_bps: p.gate.capacity().saturating_mul(8),
                    sched_delayed: g(&c.sched_delayed),
                    sched_dropped: g(&c.sched_dropped),
                    tx_rate_bps: p.limiter.stats(0).map_or(0, |s| (s.rate * 8.0) as u64),
                    features: p.acked.load(Ordering::Relaxed),
                    tx_gso_frames: g(&c.tx_gso_frames),
                    dropped_bad_offload: g(&c.dropped_bad_offload),
                    rx_gso_frames: g(&c.rx_gso_frames),
                    segmented: g(&c.segmented),
                    segments: g(&c.segments),
                    csum_filled: g(&c.csum_filled),
                }
            })
            .collect()
    }

    /// Switches one frame (vnet header first) that entered at port `from`.
    pub fn forward(&self, from: usize, src: &Source) {
        let mut sig = Signals::default();
        self.forward_with(from, src, false, None, &mut sig);
        sig.flush();
    }

    /// As [`Switch::forward`]; `then_more`: port `from` has more frames to send right after
    /// this one. A unicast frame to a VM port or an uplink waits for its turn at that
    /// destination's dispatcher *without the table locked* (other ports and control requests
    /// go on meanwhile); the destination whose dispatcher keeps `from`'s turn (`then_more`),
    /// if any. `held`: the destination that kept `from`'s turn for this frame; given back at
    /// once (before any wait) if the frame goes elsewhere. The receivers written to are
    /// added to `sig` (told when the caller flushes it, or before this thread waits).
    fn forward_with(
        &self,
        from: usize,
        src: &Source,
        then_more: bool,
        held: Option<Arc<Port>>,
        sig: &mut Signals,
    ) -> Option<Arc<Port>> {
        let give_back = |to: Option<&Arc<Port>>| {
            if let Some(h) = &held {
                if !to.is_some_and(|d| Arc::ptr_eq(d, h)) {
                    h.gate.unhold(from);
                }
            }
        };
        let t = self.read();
        let (Some(p), Some(net)) = (
            t.port(from),
            t.port(from).and_then(|p| t.network(p.network)),
        ) else {
            give_back(None);
            return None;
        };
        let len = src.len();
        let mut eth = [0u8; 12];
        if !(VNET_HDR + 14..=MAX_FRAME).contains(&len) || !src.peek(VNET_HDR, &mut eth) {
            PortCounters::add(&p.counters.dropped_malformed, 1);
            give_back(None);
            return None;
        }
        // The sender's header, checked once against its frame (a stack copy of both: what the
        // switch later does with the frame uses these offsets, never the guest's bytes again).
        let mut head = [0u8; VNET_HDR + MAX_HDRS];
        let seen = len.min(head.len());
        let acked = p.acked.load(Ordering::Relaxed);
        let off = if acked & offload::F_CSUM == 0 {
            Offload::None
        } else if !src.peek(0, &mut head[..seen]) {
            PortCounters::add(&p.counters.dropped_malformed, 1);
            give_back(None);
            return None;
        } else {
            match offload::parse(
                &head[..VNET_HDR],
                &head[VNET_HDR..seen],
                len - VNET_HDR,
                acked,
            ) {
                Ok(o) => o,
                Err(_) => {
                    PortCounters::add(&p.counters.dropped_bad_offload, 1);
                    give_back(None);
                    return None;
                }
            }
        };
        let off = &off;
        if let Offload::Tso(_) = off {
            PortCounters::add(&p.counters.tx_gso_frames, 1);
        }
        PortCounters::add(&p.counters.tx_frames, 1);
        PortCounters::add(&p.counters.tx_bytes, (len - VNET_HDR) as u64);
        let dst: [u8; 6] = eth[..6].try_into().expect("6 bytes");
        let srcmac: [u8; 6] = eth[6..].try_into().expect("6 bytes");
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
        let dest = to
            .filter(|&port| port != from)
            .and_then(|port| t.port(port));
        give_back(dest);
        match to {
            Some(port) if port == from => None,
            Some(_) => {
                // Reference counts, not allocations: the two ports outlive the table's lock.
                let (s, d) = (p.clone(), dest?.clone());
                drop(t);
                Self::deliver_scheduled(&s, from, &d, src, off, then_more, sig).then_some(d)
            }
            None => {
                if dst[0] & 1 == 0 && Self::known_elsewhere(&t, p.network, &dst, now) {
                    PortCounters::add(&p.counters.dropped_isolated, 1);
                    return None;
                }
                // Flooded frames are not scheduled: nothing waits here.
                for &port in &net.ports {
                    if port != from {
                        if let Some(d) = t.port(port) {
                            Self::deliver(d, src, off, sig);
                        }
                    }
                }
                None
            }
        }
    }

    /// Whether a network other than `net` has learned `mac`.
    fn known_elsewhere(t: &Table, net: usize, mac: &[u8; 6], now: Instant) -> bool {
        t.networks.iter().enumerate().any(|(i, n)| {
            i != net
                && n.as_ref().is_some_and(|n| {
                    lock(&n.macs)
                        .get(mac)
                        .is_some_and(|(_, t)| now.duration_since(*t) < MAC_AGEING)
                })
        })
    }

    /// Delivers a frame to port `p`: to its TAP, into its guest's receive buffers, or into
    /// one of its slots while the guest has posted none (in the form `p` takes `off` in).
    fn deliver(p: &Arc<Port>, src: &Source, off: &Offload, sig: &mut Signals) {
        let c = &p.counters;
        let n = src.len() - VNET_HDR;
        match &p.kind {
            Kind::Uplink(tap) => {
                let mut rx = lock(&p.rx);
                let features = rx.features;
                let slot = rx.slot_buf(0);
                Self::to_tap(tap, slot, src, off, features, c);
            }
            Kind::Vm => {
                // Before the port's lock is taken: telling the others takes theirs.
                sig.add(p);
                let mut rx = lock(&p.rx);
                if rx.vring.is_none() {
                    PortCounters::add(&c.dropped_no_buffer, 1);
                    return;
                }
                if !rx.pending.is_empty() {
                    // Buffers the guest posted since are for the frames already waiting.
                    rx.drain(c);
                }
                let mut first = 0;
                if rx.pending.is_empty() {
                    match rx.put(src, off, 0, c) {
                        Put::Done => return,
                        Put::Bad => {
                            PortCounters::add(&c.dropped_malformed, 1);
                            return;
                        }
                        Put::TooBig => {
                            PortCounters::add(&c.dropped_no_buffer, 1);
                            return;
                        }
                        Put::Partial(k) => first = k,
                        Put::NoBuffer => {}
                    }
                }
                if rx.hold(src, off, first) {
                    PortCounters::add(&c.queued, 1);
                    PortCounters::add(&c.copies, 1);
                    PortCounters::add(&c.copied_bytes, n as u64);
                } else {
                    PortCounters::add(&c.dropped_no_buffer, 1);
                }
            }
        }
    }

    /// Writes a frame to an uplink TAP through the port's buffer `buf` (each write one frame:
    /// copied once into it): whole with its offload header if the TAP takes offloads
    /// (`features`), else with its checksum filled in, or cut into segments.
    fn to_tap(
        tap: &wv_virtio::net::Tap,
        buf: &mut Vec<u8>,
        src: &Source,
        off: &Offload,
        features: u64,
        c: &PortCounters,
    ) {
        let n = src.len() - VNET_HDR;
        let write = |buf: &[u8]| {
            let len = (buf.len() - VNET_HDR) as u64;
            if tap.file().write_all(buf).is_ok() {
                PortCounters::add(&c.rx_frames, 1);
                PortCounters::add(&c.rx_bytes, len);
                PortCounters::add(&c.copies, 1);
                PortCounters::add(&c.copied_bytes, len);
                true
            } else {
                PortCounters::add(&c.dropped_no_buffer, 1);
                false
            }
        };
        match offload::form(off, features) {
            Form::Whole(h) => {
                buf.resize(src.len(), 0);
                if !src.peek(0, buf) {
                    PortCounters::add(&c.dropped_malformed, 1);
                    return;
                }
                buf[..VNET_HDR].copy_from_slice(&h);
                if let Offload::Tso(t) = off {
                    // The host's kernel gets the headers that were checked, not whatever
                    // the sender wrote since.
                    t.restore_headers(&mut buf[VNET_HDR..]);
                }
                if write(buf) && h[1] != offload::GSO_NONE {
                    PortCounters::add(&c.rx_gso_frames, 1);
                }
            }
            Form::Fill { start, at } => {
                buf.resize(src.len(), 0);
                if !src.peek(0, buf) {
                    PortCounters::add(&c.dropped_malformed, 1);
                    return;
                }
                buf[..VNET_HDR].fill(0);
                let sum = offload::finish(offload::sum(&buf[VNET_HDR + start..], 0));
                buf[VNET_HDR + at..VNET_HDR + at + 2].copy_from_slice(&sum.to_be_bytes());
                if write(buf) {
                    PortCounters::add(&c.csum_filled, 1);
                }
            }
            Form::Segment(t) => {
                let hdrs = usize::from(t.hdrs);
                let orig = t.head;
                let nseg = t.segments(n);
                for i in 0..nseg {
                    let from = hdrs + i * usize::from(t.mss);
                    let seg = usize::from(t.mss).min(n - from);
                    buf.resize(VNET_HDR + hdrs + seg, 0);
                    buf[..VNET_HDR].fill(0);
                    let (h, payload) = buf[VNET_HDR..].split_at_mut(hdrs);
                    if !src.peek(VNET_HDR + from, payload) {
                        PortCounters::add(&c.dropped_malformed, 1);
                        return;
                    }
                    let sum = offload::sum(payload, 0);
                    offload::segment_headers(&t, &orig, h, i, nseg, seg, sum);
                    if !write(buf) {
                        return;
                    }
                    PortCounters::add(&c.segments, 1);
                }
                PortCounters::add(&c.segmented, 1);
            }
        }
    }

    /// The guest of VM port `port` posted receive buffers: delivers what waits for them, and
    /// ends a stall of its dispatcher. Under the port's receive lock, as a sender's refund
    /// ([`Switch::deliver_scheduled`]) is: a kick that comes while a sender finds no buffer
    /// ends the stall that sender sets, it is not lost.
    fn flush(p: &Port) {
        let mut rx = lock(&p.rx);
        rx.drain(&p.counters);
        rx.signal();
        if rx.pending.is_empty() && !rx.kicks_off {
            // Nothing waits for buffers: the guest need not kick for the next ones (a frame
            // that finds none asks for kicks again).
            if let Some(v) = &rx.vring {
                rx.kicks_off = v.disable_notification().is_ok();
            }
        }
        p.gate.kick();
        drop(rx);
    }

    /// Delivers a unicast frame from port `s` (index `from`) to port `d` when `d`'s dispatcher
    /// says it is `from`'s turn (at once if `d` is not contended), waiting in `from`'s thread
    /// with no lock held; after [`SHARES_MAX_WAIT`] (or if `d` goes) it is dropped and
    /// counted. `then_more`: `from` has another frame right after (its turn is kept for it).
    /// Whether `d`'s dispatcher keeps `from`'s turn.
    fn deliver_scheduled(
        s: &Port,
        from: usize,
        d: &Arc<Port>,
        src: &Source,
        off: &Offload,
        then_more: bool,
        sig: &mut Signals,
    ) -> bool {
        if matches!(d.kind, Kind::Vm) && lock(&d.rx).vring.is_none() {
            // Nobody to schedule for: dropped and counted there.
            Self::deliver(d, src, off, sig);
            return false;
        }
        if let Kind::Vm = d.kind {
            // Added with none of its locks held (telling the others takes theirs).
            sig.add(d);
        }
        let set = *lock(&s.shares);
        d.gate.ensure(from, wv_shares::Settings { limit: 0, ..set });
        let cost = (src.len() - VNET_HDR) as f64;
        let start = Instant::now();
        let mut left = SHARES_MAX_WAIT;
        let mut delayed = false;
        loop {
            // Receivers are told what this thread wrote before it waits (one of them may be
            // the one whose buffers it waits for).
            let Some(g) = d
                .gate
                .acquire_then(from, cost, left, then_more, &mut || sig.flush())
            else {
                PortCounters::add(&s.counters.sched_dropped, 1);
                return false;
            };
            delayed |= g.waited;
            if let Kind::Vm = d.kind {
                let mut rx = lock(&d.rx);
                if !rx.pending.is_empty() {
                    rx.drain(&d.counters);
                }
                let contended = d.gate.others_waiting(from);
                if rx.pending.is_empty() || contended {
                    if let Some(()) = Self::put_counted(&mut rx, &d.counters, src, off) {
                        drop(rx);
                        d.gate.release(g);
                        break;
                    }
                    if contended {
                        // Contended and no buffer: the frame stays in its sender's ring, whose
                        // turn it is when buffers come is the dispatcher's say. Refunded under
                        // the receive lock: the guest's kick (flush) ends this stall.
                        d.gate.refund(g, STALL);
                        drop(rx);
                        delayed = true;
                        left = SHARES_MAX_WAIT.saturating_sub(start.elapsed());
                        continue;
                    }
                }
                drop(rx);
            }
            Self::deliver(d, src, off, sig);
            d.gate.release(g);
            break;
        }
        if delayed {
            PortCounters::add(&s.counters.sched_delayed, 1);
        }
        then_more
    }

    /// Puts the frame into the guest's buffers, counted; None if there is none for it. The
    /// segments of a frame cut for it that found no buffer wait in a slot (or are dropped and
    /// counted): the frame's bytes are counted once, whatever it became.
    fn put_counted(rx: &mut RxSide, c: &PortCounters, src: &Source, off: &Offload) -> Option<()> {
        match rx.put(src, off, 0, c) {
            Put::Done => {}
            Put::Bad => PortCounters::add(&c.dropped_malformed, 1),
            Put::TooBig => PortCounters::add(&c.dropped_no_buffer, 1),
            Put::Partial(k) => {
                if rx.hold(src, off, k) {
                    PortCounters::add(&c.queued, 1);
                    PortCounters::add(&c.copies, 1);
                    PortCounters::add(&c.copied_bytes, (src.len() - VNET_HDR) as u64);
                } else {
                    PortCounters::add(&c.dropped_no_buffer, 1);
                }
            }
            Put::NoBuffer => return None,
        }
        Some(())
    }

    /// Sets port `port` of `network`'s shares, reservation and limit (bits per second; what
    /// is None stays) and, as a destination, its rate (bits per second, 0: none).
    pub fn set_shares(
        &self,
        network: &str,
        port: &str,
        shares: Option<u32>,
        reservation_bps: Option<u64>,
        limit_bps: Option<u64>,
        rate_bps: Option<u64>,
    ) -> Result<(), String> {
        let t = self.read();
        let i = t.port_index(network, port).ok_or_else(|| {
            format!(
                "network '{}' has no port '{}'",
                network.escape_debug(),
                port.escape_debug()
            )
        })?;
        let p = t.port(i).expect("indexed");
        let mut set = *lock(&p.shares);
        if let Some(n) = shares {
            set.shares = n;
        }
        if let Some(r) = reservation_bps {
            set.reservation = r / 8;
        }
        if let Some(l) = limit_bps {
            set.limit = l / 8;
        }
        set.check()
            .map_err(|e| format!("port {network}/{port}: {e}"))?;
        *lock(&p.shares) = set;
        p.limiter.set(
            0,
            wv_shares::Settings {
                shares: 1,
                reservation: 0,
                limit: set.limit,
            },
        );
        for q in t.ports.iter().flatten() {
            if q.gate.settings(i).is_some() {
                q.gate.set(i, wv_shares::Settings { limit: 0, ..set });
            }
        }
        if let Some(r) = rate_bps {
            p.gate.set_capacity(r / 8);
        }
        Ok(())
    }
}

enum Put {
    Done,
    NoBuffer,
    /// The frame needs more than [`MAX_RX_CHAINS`] of the guest's buffers: dropped, none taken.
    TooBig,
    Bad,
    /// A frame cut into segments delivered them up to this one; the guest has no buffer for
    /// the rest.
    Partial(usize),
}

impl RxSide {
    /// Delivers the held frames, oldest first, while the guest has buffers for them.
    fn drain(&mut self, c: &PortCounters) {
        while let Some(&slot) = self.pending.front() {
            let buf = std::mem::take(&mut self.slots[slot]);
            let (len, off, first) = self.lens[slot];
            let r = self.put(&Source::Bytes(&buf[..len]), &off, first, c);
            self.slots[slot] = buf;
            match r {
                Put::NoBuffer => break,
                Put::Partial(k) => {
                    self.lens[slot].2 = k;
                    break;
                }
                Put::Done => {}
                Put::Bad => PortCounters::add(&c.dropped_malformed, 1),
                Put::TooBig => PortCounters::add(&c.dropped_no_buffer, 1),
            }
            self.pending.pop_front();
            self.free.push(slot);
        }
    }
}

impl RxSide {
    /// Tells the guest of the buffers used since the last time (if it wants to be told).
    fn signal(&mut self) {
        if !std::mem::take(&mut self.unsignalled) {
            return;
        }
        if let (Some(v), Some(m)) = (&self.vring, &self.mem) {
            if wants_call(v, &m.memory()) {
                let _ = v.signal_used_queue();
            }
        }
    }
}

/// Whether the guest of queue `vring` (its memory `mem`) wants to be told of the buffers used:
/// by EVENT_IDX's rule when negotiated, else unless its driver set VRING_AVAIL_F_NO_INTERRUPT
/// (which virtio-queue does not look at; a Linux driver polling its ring sets it).
fn wants_call(vring: &VringRwLock<Mem>, mem: &GuestMemoryMmap) -> bool {
    let mut st = vring.get_mut();
    let q = st.get_queue_mut();
    if q.event_idx_enabled() {
        return q.needs_notification(mem).unwrap_or(true);
    }
    // The used index written before the flags are read (the driver does the converse).
    std::sync::atomic::fence(Ordering::SeqCst);
    mem.read_obj::<u16>(GuestAddress(q.avail_ring()))
        .map_or(true, |f| f & 1 == 0)
}

/// The receivers a sender's thread delivered frames to and has not told yet: each is told
/// once per [`RX_SIGNAL_BATCH`] frames, when the sender's ring is empty, and before the
/// thread waits for anything (a receiver that does not know of its buffers used posts no more,
/// and a sender waiting for buffers would wait for nothing). Kept by the thread (no allocation
/// per frame: a port is cloned in once per batch).
struct Signals {
    ports: [Option<Arc<Port>>; SIGNAL_PORTS],
    n: usize,
    frames: usize,
}

impl Default for Signals {
    fn default() -> Signals {
        Signals {
            ports: [const { None }; SIGNAL_PORTS],
            n: 0,
            frames: 0,
        }
    }
}

impl Signals {
    /// Port `p` got a frame (or its buffers back) to be told of.
    fn add(&mut self, p: &Arc<Port>) {
        if !self.ports[..self.n]
            .iter()
            .any(|q| q.as_ref().is_some_and(|q| Arc::ptr_eq(q, p)))
        {
            if self.n == SIGNAL_PORTS {
                self.flush();
            }
            self.ports[self.n] = Some(p.clone());
            self.n += 1;
        }
    }

    /// One frame done: the receivers are told every [`RX_SIGNAL_BATCH`] frames.
    fn frame(&mut self) {
        self.frames += 1;
        if self.frames >= RX_SIGNAL_BATCH {
            self.flush();
        }
    }

    /// Tells every receiver kept.
    fn flush(&mut self) {
        self.frames = 0;
        for p in &mut self.ports[..self.n] {
            if let Some(p) = p.take() {
                lock(&p.rx).signal();
            }
        }
        self.n = 0;
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
            shares: Mutex::new(wv_shares::Settings::default()),
            limiter: wv_shares::Gate::new(0, usize::MAX, BURST_BYTES),
            gate: {
                let g = wv_shares::Gate::new(0, 1, BURST_BYTES);
                g.set_anticipation(ANTICIPATION);
                g
            },
            removed: AtomicBool::new(false),
            acked: AtomicU64::new(0),
        }
    }
}

impl RxSide {
    /// Slot `i`'s buffer, allocated (once) with room for any frame.
    fn slot_buf(&mut self, i: usize) -> &mut Vec<u8> {
        while self.slots.len() <= i {
            self.slots.push(Vec::new());
            self.lens.push((0, Offload::None, 0));
        }
        if self.slots[i].capacity() < MAX_FRAME {
            self.slots[i] = Vec::with_capacity(MAX_FRAME);
        }
        &mut self.slots[i]
    }

    /// Copies the frame into a free slot (to be delivered from segment `first` on, if it is
    /// cut for this port); false when all [`PENDING_SLOTS`] are full.
    fn hold(&mut self, src: &Source, off: &Offload, first: usize) -> bool {
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
        if let Offload::Tso(t) = off {
            // Delivered later from this copy: with the headers that were checked.
            t.restore_headers(&mut buf[VNET_HDR..]);
        }
        self.lens[slot] = (len, *off, first);
        self.pending.push_back(slot);
        true
    }

    /// Writes the frame into receive buffers the guest posted, in the form the guest takes
    /// `off` in ([`offload::form`]): whole behind a vnet header of the switch's own (the
    /// offload's, or zeros), whole with its checksum filled in, or cut into segments from
    /// segment `first` on; each frame delivered is counted here. NoBuffer if there are not
    /// enough for the (first) frame (none is taken then), Partial if some segments went,
    /// Bad if the guest's buffers were malformed (they are returned empty).
    fn put(&mut self, src: &Source, off: &Offload, first: usize, c: &PortCounters) -> Put {
        let r = self.put_form(src, off, first, c);
        if let Put::NoBuffer | Put::Partial(_) = r {
            // Out of buffers: the guest is told of those it has now (it posts no more before).
            self.signal();
        }
        r
    }

    fn put_form(&mut self, src: &Source, off: &Offload, first: usize, c: &PortCounters) -> Put {
        let n = src.len() - VNET_HDR;
        let done = |len: usize| {
            PortCounters::add(&c.rx_frames, 1);
            PortCounters::add(&c.rx_bytes, len as u64);
            PortCounters::add(&c.copies, 1);
            PortCounters::add(&c.copied_bytes, len as u64);
        };
        match offload::form(off, self.features) {
            Form::Whole(h) => {
                // A segment's headers as checked, then its payload from the sender.
                let (head, from): (&[u8], usize) = match off {
                    Offload::Tso(t) => (&t.head[..usize::from(t.hdrs)], usize::from(t.hdrs)),
                    _ => (&[], 0),
                };
                let r = self.put_one(src, &h, head, VNET_HDR + from, n - from, None);
                if let Put::Done = r {
                    done(n);
                    if h[1] != offload::GSO_NONE {
                        PortCounters::add(&c.rx_gso_frames, 1);
                    }
                }
                r
            }
            Form::Fill { start, at } => {
                let Some(sum) = source_sum(src, VNET_HDR + start, n - start) else {
                    return Put::Bad;
                };
                let patch = (VNET_HDR + at, offload::finish(sum).to_be_bytes());
                let r = self.put_one(src, &[0; VNET_HDR], &[], VNET_HDR, n, Some(patch));
                if let Put::Done = r {
                    done(n);
                    PortCounters::add(&c.csum_filled, 1);
                }
                r
            }
            Form::Segment(t) => {
                let hdrs = usize::from(t.hdrs);
                let (orig, mut out) = (t.head, [0u8; MAX_HDRS]);
                let nseg = t.segments(n);
                for i in first..nseg {
                    let from = hdrs + i * usize::from(t.mss);
                    let seg = usize::from(t.mss).min(n - from);
                    let Some(sum) = source_sum(src, VNET_HDR + from, seg) else {
                        return Put::Bad;
                    };
                    offload::segment_headers(&t, &orig, &mut out, i, nseg, seg, sum);
                    let r = self.put_one(
                        src,
                        &[0; VNET_HDR],
                        &out[..hdrs],
                        VNET_HDR + from,
                        seg,
                        None,
                    );
                    match r {
                        Put::Done => {
                            done(hdrs + seg);
                            PortCounters::add(&c.segments, 1);
                        }
                        Put::NoBuffer if i > first => return Put::Partial(i),
                        r => return r,
                    }
                }
                PortCounters::add(&c.segmented, 1);
                Put::Done
            }
        }
    }

    /// Writes one frame into receive buffers the guest posted: vnet header `hdr` (its
    /// `num_buffers` set here), then `head`, then `len` bytes of `src` from `from`, and
    /// `patch` (two bytes at an offset of the frame) over them, before the guest is given
    /// the buffers. NoBuffer if there are not enough (none is taken then), Bad if the
    /// guest's buffers were malformed (they are returned empty).
    fn put_one(
        &mut self,
        src: &Source,
        hdr: &[u8; VNET_HDR],
        head: &[u8],
        from: usize,
        len: usize,
        patch: Option<(usize, [u8; 2])>,
    ) -> Put {
        let (Some(mem), Some(vring)) = (&self.mem, &self.vring) else {
            return Put::NoBuffer;
        };
        let mem = mem.memory();
        let mut st = vring.get_mut();
        let q = st.get_queue_mut();
        if !q.ready() {
            return Put::NoBuffer;
        }
        let need = VNET_HDR + head.len() + len;
        // The chains taken, in a list kept from frame to frame (no allocation per frame).
        let taken = &mut self.taken;
        let (mut room, mut bad) = (0usize, false);
        taken.clear();
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
                if self.kicks_off {
                    // Kicks back on (the guest's next buffers end the wait for them), and
                    // one more look: buffers posted before that were not kicked for.
                    self.kicks_off = false;
                    if q.enable_notification(&*mem).unwrap_or(false) {
                        taken.clear();
                        room = 0;
                        continue;
                    }
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
            self.unsignalled = true;
            return Put::Bad;
        }
        let mut hdr = *hdr;
        hdr[10..12].copy_from_slice(&(n as u16).to_le_bytes());
        let mut ok = true;
        // The frame as a stream: header, then `head`, then the source's bytes; each chain
        // takes its share of it.
        let mut pos = 0usize;
        for (_, s) in &taken[..n] {
            let take = s.len().min(need - pos);
            let mut done = 0;
            while done < take {
                let p = pos + done;
                let k;
                if p < VNET_HDR {
                    k = (VNET_HDR - p).min(take - done);
                    ok &= s.copy_in(&*mem, done, &hdr[p..p + k]);
                } else if p < VNET_HDR + head.len() {
                    let h = p - VNET_HDR;
                    k = (head.len() - h).min(take - done);
                    ok &= s.copy_in(&*mem, done, &head[h..h + k]);
                } else {
                    k = take - done;
                    let at = from + (p - VNET_HDR - head.len());
                    ok &= copy_range(src, at, s, &mem, done, k);
                }
                done += k;
            }
            pos += take;
        }
        if let Some((at, bytes)) = patch {
            for (j, b) in bytes.iter().enumerate() {
                // The chain holding byte `at + j` of the frame.
                let mut skip = at + j;
                for (_, s) in &taken[..n] {
                    if skip < s.len() {
                        ok &= s.copy_in(&*mem, skip, std::slice::from_ref(b));
                        break;
                    }
                    skip -= s.len();
                }
            }
        }
        let mut pos = 0usize;
        for (head, s) in &taken[..n] {
            let take = s.len().min(need - pos);
            pos += take;
            let _ = q.add_used(&*mem, *head, take as u32);
        }
        drop(st);
        // The guest is told once per batch of frames ([`Signals`]).
        self.unsignalled = true;
        if ok {
            Put::Done
        } else {
            Put::Bad
        }
    }
}

/// The ones' complement sum ([`offload::sum`]) of `len` bytes of `src` at `off`, read in
/// pieces through a buffer on the stack; None if they cannot be read.
fn source_sum(src: &Source, off: usize, len: usize) -> Option<u64> {
    if let Source::Bytes(b) = src {
        return Some(offload::sum(b.get(off..off + len)?, 0));
    }
    let mut buf = [0u8; 2048];
    let (mut acc, mut done) = (0u64, 0);
    while done < len {
        let k = (len - done).min(buf.len());
        if !src.peek(off + done, &mut buf[..k]) {
            return None;
        }
        acc = offload::sum(&buf[..k], acc);
        done += k;
    }
    Some(acc)
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
        Source::Bytes(b) => b
            .get(src_off..src_off + len)
            .is_some_and(|b| to.copy_in(mem, off, b)),
    }
}

/// One VM port as a vhost-user net backend.
#[derive(Clone)]
pub struct PortBackend {
    sw: Arc<Switch>,
    port: usize,
    p: Arc<Port>,
    /// The exit events handed to vhost-user-backend, closed once a connection's daemon is
    /// gone ([`PortBackend::close_exit_events`]).
    exit: ExitEvents,
}

impl PortBackend {
    /// The backend of port `port` of `sw`, if there is such a port.
    pub fn new(sw: Arc<Switch>, port: usize) -> Option<PortBackend> {
        let p = sw.read().port(port)?.clone();
        Some(PortBackend {
            sw,
            port,
            p,
            exit: ExitEvents::default(),
        })
    }

    /// Closes the exit events' read ends handed out so far. Only once the daemon that took
    /// them has been dropped (its epoll handlers with it): nothing else uses them then.
    pub fn close_exit_events(&self) {
        self.exit.close();
    }

    fn rx(&self) -> MutexGuard<'_, RxSide> {
        lock(&self.p.rx)
    }

    /// Serves the transmit queue: every chain read once, checked, and switched (the port's
    /// guest memory is the one [`Switch::attach`] or the connection gave).
    pub fn transmit(&self, vring: &VringRwLock<Mem>) {
        let Some(mem) = self.rx().mem.clone() else {
            return;
        };
        let mem = mem.memory();
        let c = &self.p.counters;
        let mut unsignalled = 0usize;
        // The destination keeping this port's turn (its next frame is expected there).
        let mut held: Option<Arc<Port>> = None;
        // The receivers written to and not told yet.
        let mut sig = Signals::default();
        // While the ring is drained its guest need not kick (it is told so); once it is empty
        // kicks are asked for again, and the ring looked at once more (a frame made available
        // just before was not kicked for).
        let _ = vring.disable_notification();
        let mut looked_again = false;
        loop {
            // The queue is not held while the frame waits for its turn or is copied (the
            // frontend's messages are served meanwhile).
            let (chain, more) = {
                let mut st = vring.get_mut();
                let q = st.get_queue_mut();
                let Some(chain) = q.pop_descriptor_chain(&*mem) else {
                    // Once only in a row: a ring whose index is bad pops nothing however often
                    // it is looked at.
                    if !looked_again && q.enable_notification(&*mem).unwrap_or(false) {
                        looked_again = true;
                        let _ = q.disable_notification(&*mem);
                        continue;
                    }
                    let _ = q.enable_notification(&*mem);
                    break;
                };
                looked_again = false;
                let more = q
                    .avail_idx(&*mem, std::sync::atomic::Ordering::Acquire)
                    .is_ok_and(|a| a.0 != q.next_avail());
                (chain, more)
            };
            let head = chain.head_index();
            match Segments::read_tx(chain, &*mem) {
                Ok(s) => {
                    // The port's limit first: the frame waits in this thread (and its ring).
                    let cost = s.len().saturating_sub(VNET_HDR) as f64;
                    let limited =
                        self.p
                            .limiter
                            .acquire_then(0, cost, SHARES_MAX_WAIT, false, &mut || sig.flush());
                    match limited {
                        Some(g) => {
                            if g.waited {
                                PortCounters::add(&c.sched_delayed, 1);
                            }
                            self.p.limiter.release(g);
                            // Its next frame comes right after unless the limit holds it.
                            let then_more = more && self.p.limiter.limit_ready(0);
                            held = self.sw.forward_with(
                                self.port,
                                &Source::Guest(&mem, &s),
                                then_more,
                                held.take(),
                                &mut sig,
                            );
                        }
                        None => PortCounters::add(&c.sched_dropped, 1),
                    }
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
            if vring
                .get_mut()
                .get_queue_mut()
                .add_used(&*mem, head, 0)
                .is_err()
            {
                break;
            }
            sig.frame();
            unsignalled += 1;
            if unsignalled >= TX_SIGNAL_BATCH {
                unsignalled = 0;
                if wants_call(vring, &mem) {
                    let _ = vring.signal_used_queue();
                }
            }
        }
        if let Some(h) = held {
            h.gate.unhold(self.port);
        }
        sig.flush();
        if unsignalled > 0 && wants_call(vring, &mem) {
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
        F_VERSION_1 | F_MRG_RXBUF | F_PROTOCOL_FEATURES | offload::OFFLOADS
    }
    fn acked_features(&self, features: u64) {
        let mut rx = self.rx();
        let mergeable = features & F_MRG_RXBUF != 0;
        if rx.mergeable != mergeable || rx.features != features & offload::OFFLOADS {
            // Frames held for the driver before (formed for its features, perhaps partly
            // delivered) are not for this one: dropped, as frames in flight at a reset are.
            let mut dropped = 0;
            while let Some(s) = rx.pending.pop_front() {
                rx.free.push(s);
                dropped += 1;
            }
            PortCounters::add(&self.p.counters.dropped_no_buffer, dropped);
        }
        rx.mergeable = mergeable;
        rx.features = features & offload::OFFLOADS;
        self.p
            .acked
            .store(features & offload::OFFLOADS, Ordering::Relaxed);
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
            0 => Switch::flush(&self.p),
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
        rx.kicks_off = false;
        rx.mem = None;
        // The next frontend says what its driver acked.
        rx.features = 0;
        self.p.acked.store(0, Ordering::Relaxed);
        while let Some(s) = rx.pending.pop_front() {
            rx.free.push(s);
        }
    }
}

/// Serves VM port `backend` on `socket` until the port is deleted: one frontend at a time;
/// when it goes, the port forgets it and waits for the next (a deleted port's thread is woken
/// by a connection of the switch's own, which ends at once).
fn serve_port(backend: PortBackend, socket: PathBuf, mut listener: Listener) {
    let exit = backend.exit.clone();
    let b = backend.clone();
    let name = format!("vswitch-port{}", backend.port);
    let served = serve_frontends(
        "wv vswitch",
        &name,
        backend,
        &exit,
        &socket,
        &mut listener,
        || {
            b.disconnect();
            !b.p.removed.load(Ordering::SeqCst)
        },
    );
    if let Err(e) = served {
        eprintln!("wv vswitch: port {e}");
    }
}

/// Reads frames from uplink port `port`'s TAP and switches them, until the port is deleted.
fn serve_uplink(sw: Arc<Switch>, port: usize) {
    let Some(p) = sw.read().port(port).cloned() else {
        return;
    };
    let Kind::Uplink(tap) = &p.kind else {
        return;
    };
    let mut buf = vec![0u8; MAX_FRAME];
    let fd = tap.file().as_raw_fd();
    while !p.removed.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a timeout so that a deleted uplink's thread ends.
        if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
            continue;
        }
        // Every frame the TAP has, then the receivers are told (at most RX_SIGNAL_BATCH
        // frames late).
        let mut sig = Signals::default();
        loop {
            match tap.file().read(&mut buf) {
                Ok(n) if n >= VNET_HDR => {
                    sw.forward_with(port, &Source::Bytes(&buf[..n]), false, None, &mut sig);
                    sig.frame();
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        sig.flush();
    }
}

/// Answers requests on the control socket, one JSON line per request line
/// ([`Switch::control`]).
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
                for line in BufReader::new(conn.take(64 << 10)).lines() {
                    let Ok(line) = line else { break };
                    if line.len() > 4096 {
                        let _ =
                            writeln!(out, "{}", serde_json::json!({"error": "request too long"}));
                        break;
                    }
                    if writeln!(out, "{}", sw.control(&line)).is_err() {
                        break;
                    }
                }
            });
    }
}

impl Switch {
    /// Starts serving port `i`: binds a VM port's socket (before returning, so that a VMM
    /// started next finds it) and starts its thread. The socket's path (or the TAP's name).
    fn start_port(self: &Arc<Self>, i: usize) -> Result<PathBuf, String> {
        let Some(backend) = PortBackend::new(self.clone(), i) else {
            return Err(format!("no port {i}"));
        };
        let p = backend.p.clone();
        match &p.kind {
            Kind::Vm => {
                let net = self
                    .read()
                    .network(p.network)
                    .map(|n| n.name.clone())
                    .unwrap_or_default();
                let sock = port_socket(&self.socket_dir, &net, &p.name);
                if let Some(parent) = sock.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
                }
                let _ = std::fs::remove_file(&sock);
                // Bound by us, not by vhost's Listener, whose drop would remove the path
                // (by then perhaps the socket of a new port of the same name).
                let l = UnixListener::bind(&sock)
                    .map_err(|e| format!("cannot listen on {}: {e}", sock.display()))?;
                let listener = Listener::from(l);
                let s2 = sock.clone();
                std::thread::Builder::new()
                    .name(format!("vsw-{net}-{}", p.name))
                    .spawn(move || serve_port(backend, s2, listener))
                    .map_err(|e| e.to_string())?;
                Ok(sock)
            }
            Kind::Uplink(_) => {
                let sw = self.clone();
                std::thread::Builder::new()
                    .name(format!("vsw-{}", p.name))
                    .spawn(move || serve_uplink(sw, i))
                    .map_err(|e| e.to_string())?;
                Ok(PathBuf::from(&p.name))
            }
        }
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
    let count = sw.read().ports.len();
    for i in 0..count {
        sw.start_port(i)?;
    }
    for n in &cfg.networks {
        let d = dir.join(&n.name);
        std::fs::create_dir_all(&d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    }
    eprintln!(
        "wv vswitch: serving {count} port(s) under {}",
        dir.display()
    );
    serve_control(sw, listener);
    Ok(())
}

#[cfg(test)]
mod tests;
