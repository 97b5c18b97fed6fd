//! Virtio devices whose queues a vhost-user backend serves: a net (`--net vhost-user=SOCKET`,
//! e.g. `wv vswitch`) or a disk (`--disk vhost-user=SOCKET`, e.g. `wv storage`). The
//! virtio-pci transport, the configuration space (a net's MAC and link status here; a disk's
//! capacity and limits read from the backend with GET_CONFIG when connecting) and feature
//! negotiation stay here; the rings, the queues' notification eventfds (kick) and the memory
//! table of the VM's shared RAM (memfd regions) go to the backend over the vhost-user protocol
//! (rust-vmm's `vhost` crate, frontend side). Both kinds share everything below: the
//! connection, the memory table, the ring hand-over, the call relay and the reconnection.
//!
//! The backend signals used buffers on one call eventfd per queue, which a relay thread here
//! turns into the transport's interrupt for that queue ([`Interrupt::queue`]): whatever MSI-X
//! vector the driver picks, and whether the vector is masked or the device on INTx, is the
//! transport's to apply, so vector changes reach the guest without telling the backend.
//! Pausing (snapshots) stops the backend's rings with GET_VRING_BASE, records the positions
//! and starts them again on resume; a reset stops them. When the backend goes away (the switch
//! restarts), the relay thread connects again, sends the features and the memory table, and
//! hands the rings back from the used indices: what the old backend had taken and not
//! finished is taken again (a net's transmitted frames, a disk's requests: reads and writes of
//! whole sectors are idempotent, so serving one twice is harmless) or its buffers reused (a
//! net's receive), so the guest runs on without a reset. A new disk backend must serve the
//! same configuration (capacity, limits) or it is refused.
//!
//! Each device runs on one of two data paths, switched while the guest runs
//! ([`PathControl::switch`], the VMM's `PUT /vm/device-path`): **direct**, where the backend
//! reads the guest's rings and the VMM only relays its calls, or **interposed**, where the
//! backend serves shadow rings the VMM owns ([`crate::shadow`]) and the relay thread moves
//! each guest chain (read once, validated) into them and each completion back; there a net's
//! frames can be written to a pcap file and a disk's requests to a trace file. A switch
//! stops the rings on one side at a request boundary (GET_VRING_BASE: the backend finishes
//! what it took), hands their positions over and starts them on the other side; pausing,
//! snapshots and a backend's reconnection go through the same stop and start, in whichever
//! path the device is on.
#![allow(clippy::cast_possible_truncation)] // ring positions are 16-bit by the protocol

use crate::block::{
    BlockState, CONFIG_SIZE, F_BLK_SIZE, F_DISCARD, F_FLUSH, F_RO, F_SEG_MAX, F_WRITE_ZEROES,
};
use crate::device::{CtlAction, DeviceState, ExitGuard, WorkerCtl};
use crate::net::{
    restore_mac, stop_worker, NetState, F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6,
    F_HOST_TSO4, F_HOST_TSO6, F_MAC, F_MRG_RXBUF, F_STATUS, QUEUE_SIZE,
};
use crate::shadow::{Completion, PcapWriter, ShadowArea, ShadowQueue};
use crate::GuestMemoryMmap;
use crate::{ActiveQueue, Interrupt, VirtioDevice, F_VERSION_1};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// VHOST_USER_F_PROTOCOL_FEATURES: a backend feature bit, never offered to the guest.
const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// The net features a backend may offer and the guest may take through this frontend.
const NET_PASSED: u64 = F_VERSION_1
    | F_CSUM
    | F_GUEST_CSUM
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_MRG_RXBUF;

/// The disk features a backend may offer and the guest may take through this frontend.
const BLK_PASSED: u64 =
    F_VERSION_1 | F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH | F_DISCARD | F_WRITE_ZEROES;

/// What a vhost-user device counted.
#[derive(Default, Debug)]
pub struct VhostUserCounters {
    /// Used-buffer signals from the backend relayed to the guest.
    pub calls: std::sync::atomic::AtomicU64,
}

/// What a vhost-user device is: what differs between a net and a disk.
#[derive(Clone, Copy)]
enum Kind {
    /// A net: its MAC address (the configuration space is the VMM's).
    Net { mac: [u8; 6] },
    /// A disk: its configuration space as the backend gave it, and whether it is read-only.
    Blk {
        config: [u8; CONFIG_SIZE],
        readonly: bool,
    },
}

impl Kind {
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        match self {
            // Nothing optional is used: the configuration space is the VMM's, one queue pair.
            Kind::Net { .. } => VhostUserProtocolFeatures::empty(),
            // The disk's geometry comes from the backend.
            Kind::Blk { .. } => VhostUserProtocolFeatures::CONFIG,
        }
    }
    fn passed(&self) -> u64 {
        match self {
            Kind::Net { .. } => NET_PASSED,
            Kind::Blk { .. } => BLK_PASSED,
        }
    }
    fn queues(&self) -> usize {
        match self {
            Kind::Net { .. } => 2,
            Kind::Blk { .. } => 1,
        }
    }
    /// The relay thread's kind (its system-call filter).
    fn thread(&self) -> &'static str {
        match self {
            Kind::Net { .. } => "vhost-user-net",
            Kind::Blk { .. } => "vhost-user-blk",
        }
    }
}

/// A virtio device served by a vhost-user backend.
pub struct VhostUserDevice {
    socket: PathBuf,
    frontend: Arc<Mutex<Conn>>,
    backend_features: u64,
    protocol: bool,
    kind: Kind,
    counters: Arc<VhostUserCounters>,
    ctl: Option<Arc<WorkerCtl>>,
    thread: Option<JoinHandle<()>>,
    /// The shadow rings' memory (interposed path).
    area: Arc<ShadowArea>,
    path: Arc<PathControl>,
}

/// The data path of a vhost-user device's queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPath {
    /// The backend reads the guest's rings; the VMM is not in the path.
    Direct,
    /// The backend serves shadow rings the VMM fills from the guest's.
    Interposed,
}

/// Where a switch's capture or trace goes: an open file and its name (for reports).
pub struct CaptureFile {
    /// The file's path, as reported.
    pub path: PathBuf,
    /// The file, created (and truncated) by the caller.
    pub file: std::fs::File,
}

/// A device's path and what it counted on it (`GET /vm`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct PathStatus {
    /// The path the queues take (or will take once the driver starts the device).
    pub path: DataPath,
    /// The capture (net, pcap) or trace (disk) file being written, if any.
    pub capture: Option<PathBuf>,
    /// Frames (net) or trace lines (disk) written to it.
    pub captured: u64,
    /// Path switches done.
    pub switches: u64,
    /// How long the queues stood still in the last switch, and the longest so far (µs).
    pub last_pause_us: u64,
    /// Longest pause of a switch so far (µs).
    pub max_pause_us: u64,
    /// Chains moved into the shadow rings, and completions moved back.
    pub forwarded: u64,
    /// Completions moved back to the guest.
    pub completed: u64,
    /// Bad chains refused while interposed (the device then needs a reset).
    pub bad_chains: u64,
    /// Used entries from the backend that named nothing in flight.
    pub backend_errors: u64,
    /// Whether the driver started the device (its relay thread runs).
    pub active: bool,
}

/// A capture or trace being written.
enum Sink {
    /// A net's frames, both ways; the receive frame being put together from merged buffers.
    Pcap {
        w: PcapWriter<std::io::BufWriter<std::fs::File>>,
        rx: Vec<u8>,
        rx_left: u16,
    },
    /// A disk's requests, one line each.
    Trace {
        w: std::io::BufWriter<std::fs::File>,
        lines: u64,
    },
}

impl Sink {
    fn count(&self) -> u64 {
        match self {
            Sink::Pcap { w, .. } => w.frames,
            Sink::Trace { lines, .. } => *lines,
        }
    }
    fn flush(&mut self) {
        let _ = match self {
            Sink::Pcap { w, .. } => w.flush(),
            Sink::Trace { w, .. } => w.flush(),
        };
    }
}

#[derive(Default)]
struct PathState {
    interposed: bool,
    capture: Option<PathBuf>,
    sink: Option<Sink>,
    /// Counted by sinks already closed.
    captured_before: u64,
    switches: u64,
    last_pause_us: u64,
    max_pause_us: u64,
    active: bool,
}

/// A switch asked of the relay thread.
struct Pending {
    path: DataPath,
    capture: Option<(PathBuf, Sink)>,
    reply: mpsc::Sender<Result<PathStatus, String>>,
}

/// The data path of one vhost-user device, shared by the VMM's control thread (which asks for
/// switches) and the device's relay thread (which does them).
pub struct PathControl {
    net: bool,
    /// Whether the guest took mergeable receive buffers (a frame may span several).
    mergeable: AtomicBool,
    wake: EventFd,
    pending: Mutex<Option<Pending>>,
    st: Mutex<PathState>,
    forwarded: AtomicU64,
    completed: AtomicU64,
    bad_chains: AtomicU64,
    backend_errors: AtomicU64,
}

impl PathControl {
    fn new(net: bool) -> Result<PathControl, String> {
        Ok(PathControl {
            net,
            mergeable: AtomicBool::new(false),
            wake: EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?,
            pending: Mutex::default(),
            st: Mutex::default(),
            forwarded: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            bad_chains: AtomicU64::new(0),
            backend_errors: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PathState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the capture file of this device holds: `pcap` (a net) or `trace` (a disk).
    pub fn capture_kind(&self) -> &'static str {
        if self.net {
            "pcap"
        } else {
            "trace"
        }
    }

    /// The device's path and counters.
    pub fn status(&self) -> PathStatus {
        let st = self.lock();
        self.status_of(&st)
    }

    fn status_of(&self, st: &PathState) -> PathStatus {
        PathStatus {
            path: if st.interposed {
                DataPath::Interposed
            } else {
                DataPath::Direct
            },
            capture: st.capture.clone(),
            captured: st.captured_before + st.sink.as_ref().map_or(0, Sink::count),
            switches: st.switches,
            last_pause_us: st.last_pause_us,
            max_pause_us: st.max_pause_us,
            forwarded: self.forwarded.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            bad_chains: self.bad_chains.load(Ordering::Relaxed),
            backend_errors: self.backend_errors.load(Ordering::Relaxed),
            active: st.active,
        }
    }

    fn sink(&self, capture: Option<CaptureFile>) -> Result<Option<(PathBuf, Sink)>, String> {
        let Some(c) = capture else { return Ok(None) };
        let w = std::io::BufWriter::new(c.file);
        let sink = if self.net {
            Sink::Pcap {
                w: PcapWriter::new(w).map_err(|e| format!("writing {}: {e}", c.path.display()))?,
                rx: Vec::new(),
                rx_left: 0,
            }
        } else {
            Sink::Trace { w, lines: 0 }
        };
        Ok(Some((c.path, sink)))
    }

    /// Applies a path and capture to the state (the relay, or no relay).
    fn apply(&self, st: &mut PathState, path: DataPath, capture: Option<(PathBuf, Sink)>) {
        if let Some(mut old) = st.sink.take() {
            old.flush();
            st.captured_before += old.count();
        }
        st.interposed = path == DataPath::Interposed;
        match capture {
            Some((p, sink)) if st.interposed => {
                st.capture = Some(p);
                st.sink = Some(sink);
            }
            _ => st.capture = None,
        }
    }

    /// Switches the device to `path` (a no-op switch when it is on it already), writing the
    /// interposed path's frames or requests to `capture` (only with `Interposed`; a switch
    /// to `Direct` closes the file). A started device switches at a request boundary on its
    /// relay thread (the answer says how long the queues stood still); a device the driver has
    /// not started takes the path when it starts. Waits at most `timeout`.
    pub fn switch(
        &self,
        path: DataPath,
        capture: Option<CaptureFile>,
        timeout: Duration,
    ) -> Result<PathStatus, String> {
        if capture.is_some() && path == DataPath::Direct {
            return Err("a capture needs the interposed path".into());
        }
        let capture = self.sink(capture)?;
        let (tx, rx) = mpsc::channel();
        {
            let mut st = self.lock();
            if !st.active {
                self.apply(&mut st, path, capture);
                return Ok(self.status_of(&st));
            }
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if p.is_some() {
                return Err("another path switch of this device is in progress".into());
            }
            *p = Some(Pending {
                path,
                capture,
                reply: tx,
            });
        }
        let _ = self.wake.write(1);
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Taken back unless the relay has it in hand already.
                let taken = self
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                if taken.is_some() {
                    return Err(format!(
                        "the device did not take the switch within {timeout:?} (is the VM paused?)"
                    ));
                }
                rx.recv_timeout(timeout).unwrap_or_else(|_| {
                    Err(format!(
                        "the device did not finish the switch within {timeout:?}"
                    ))
                })
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Ok(self.status()),
        }
    }

    /// Relay side: the relay starts (or ends) serving.
    fn set_active(&self, active: bool) {
        let mut st = self.lock();
        st.active = active;
        if !active {
            if let Some(s) = st.sink.as_mut() {
                s.flush();
            }
            // A switch that came in as the relay ended is applied as to a stopped device.
            if let Some(p) = self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                self.apply(&mut st, p.path, p.capture);
                let _ = p.reply.send(Ok(self.status_of(&st)));
            }
        }
    }

    fn interposed(&self) -> bool {
        self.lock().interposed
    }

    /// Writes what `c` (a completion on queue `q`) carried to the capture or trace.
    fn record(&self, q: usize, c: &Completion, mem: &GuestMemoryMmap) {
        let mut st = self.lock();
        let mergeable = self.mergeable.load(Ordering::Relaxed);
        match st.sink.as_mut() {
            None => {}
            Some(Sink::Trace { w, lines }) => {
                let line = crate::shadow::trace_line(c, mem);
                *lines += u64::from(w.write_all(line.as_bytes()).is_ok());
            }
            Some(Sink::Pcap { w, rx, rx_left }) => {
                const HDR: u32 = 12;
                if q == 1 {
                    // Transmitted: the readable part after the virtio-net header.
                    let n = c.chain.readable_bytes().saturating_sub(HDR);
                    let mut f = vec![0u8; n as usize];
                    if n > 0 && c.chain.read_at(mem, u64::from(HDR), &mut f).is_ok() {
                        let _ = w.frame(&f);
                    }
                } else if *rx_left > 0 {
                    // A further buffer of a merged receive frame.
                    let mut f = vec![0u8; c.len as usize];
                    if c.chain.read_writable(mem, 0, &mut f).is_ok() {
                        rx.extend_from_slice(&f);
                    }
                    *rx_left -= 1;
                    if *rx_left == 0 {
                        let _ = w.frame(rx);
                        rx.clear();
                    }
                } else if c.len >= HDR {
                    let mut all = vec![0u8; c.len as usize];
                    if c.chain.read_writable(mem, 0, &mut all).is_ok() {
                        let bufs = u16::from_le_bytes([all[10], all[11]]);
                        if mergeable && bufs > 1 {
                            rx.clear();
                            rx.extend_from_slice(&all[HDR as usize..]);
                            *rx_left = bufs - 1;
                        } else if all.len() > HDR as usize {
                            let _ = w.frame(&all[HDR as usize..]);
                        }
                    }
                }
            }
        }
    }

    fn flush_sink(&self) {
        if let Some(s) = self.lock().sink.as_mut() {
            s.flush();
        }
    }
}

fn vu<'a, E: std::fmt::Display>(socket: &'a Path, what: &str) -> impl Fn(E) -> String + 'a {
    let what = what.to_string();
    move |e| format!("vhost-user {}: {what}: {e}", socket.display())
}

/// A connection to the backend, and a second handle on its socket that the relay thread
/// watches for the backend hanging up.
struct Conn {
    frontend: Frontend,
    watch: UnixStream,
}

impl std::ops::Deref for Conn {
    type Target = Frontend;
    fn deref(&self) -> &Frontend {
        &self.frontend
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Frontend {
        &mut self.frontend
    }
}

/// Connects to the backend at `socket`, takes ownership and negotiates the protocol (asking
/// for the optional features `wanted`, which the backend must have): the connection, the
/// backend's features and whether it speaks the protocol features.
fn open(socket: &Path, wanted: VhostUserProtocolFeatures) -> Result<(Conn, u64, bool), String> {
    // A jailed VMM was handed the connection (crates/fds): at start, and by the daemon when
    // the backend restarted.
    let handed = wv_fds::take_path(socket).map(|f| UnixStream::from(std::os::fd::OwnedFd::from(f)));
    let stream = handed
        .map_or_else(|| UnixStream::connect(socket), Ok)
        .map_err(|e| {
            format!(
                "cannot connect to the vhost-user backend at {}: {e}",
                socket.display()
            )
        })?;
    let watch = stream
        .try_clone()
        .map_err(|e| format!("vhost-user {}: {e}", socket.display()))?;
    let mut f = Frontend::from_stream(stream, 2);
    f.set_owner().map_err(vu(socket, "SET_OWNER"))?;
    let backend_features = f.get_features().map_err(vu(socket, "GET_FEATURES"))?;
    if backend_features & F_VERSION_1 == 0 {
        return Err(format!(
            "vhost-user {}: the backend does not offer VIRTIO_F_VERSION_1",
            socket.display()
        ));
    }
    let protocol = backend_features & F_PROTOCOL_FEATURES != 0;
    if protocol {
        let pf = f
            .get_protocol_features()
            .map_err(vu(socket, "GET_PROTOCOL_FEATURES"))?;
        if !pf.contains(wanted) {
            return Err(format!(
                "vhost-user {}: the backend lacks protocol features {:?}",
                socket.display(),
                wanted - pf
            ));
        }
        f.set_protocol_features(wanted)
            .map_err(vu(socket, "SET_PROTOCOL_FEATURES"))?;
    } else if !wanted.is_empty() {
        return Err(format!(
            "vhost-user {}: the backend does not speak the protocol features ({wanted:?} needed)",
            socket.display()
        ));
    }
    Ok((Conn { frontend: f, watch }, backend_features, protocol))
}

/// A disk backend's configuration space (GET_CONFIG).
fn blk_config(socket: &Path, conn: &mut Conn) -> Result<[u8; CONFIG_SIZE], String> {
    let size = CONFIG_SIZE as u32;
    let (_, bytes) = conn
        .get_config(0, size, VhostUserConfigFlags::empty(), &[0; CONFIG_SIZE])
        .map_err(vu(socket, "GET_CONFIG"))?;
    bytes.try_into().map_err(|_| {
        format!(
            "vhost-user {}: GET_CONFIG: a short answer",
            socket.display()
        )
    })
}

impl VhostUserDevice {
    /// A net: connects to the backend at `socket` and learns its features; `mac` is the
    /// address the guest reads.
    pub fn net(socket: &Path, mac: [u8; 6]) -> Result<VhostUserDevice, String> {
        let kind = Kind::Net { mac };
        let (f, backend_features, protocol) = open(socket, kind.protocol_features())?;
        VhostUserDevice::new(socket, f, backend_features, protocol, kind)
    }

    /// A disk: connects to the backend at `socket`, learns its features and reads its
    /// configuration space. `readonly` asks for a read-only disk: the backend must serve it
    /// so (VIRTIO_BLK_F_RO), since it is the one that refuses writes.
    pub fn blk(socket: &Path, readonly: bool) -> Result<VhostUserDevice, String> {
        let wanted = VhostUserProtocolFeatures::CONFIG;
        let (mut f, backend_features, protocol) = open(socket, wanted)?;
        let backend_ro = backend_features & F_RO != 0;
        if readonly && !backend_ro {
            return Err(format!(
                "vhost-user {}: readonly=on, but the backend serves the disk read-write \
                 (serve it with readonly=on)",
                socket.display()
            ));
        }
        let config = blk_config(socket, &mut f)?;
        let kind = Kind::Blk {
            config,
            readonly: backend_ro,
        };
        VhostUserDevice::new(socket, f, backend_features, protocol, kind)
    }

    fn new(
        socket: &Path,
        f: Conn,
        backend_features: u64,
        protocol: bool,
        kind: Kind,
    ) -> Result<VhostUserDevice, String> {
        Ok(VhostUserDevice {
            socket: socket.to_path_buf(),
            frontend: Arc::new(Mutex::new(f)),
            backend_features,
            protocol,
            kind,
            counters: Arc::default(),
            ctl: None,
            thread: None,
            area: Arc::new(ShadowArea::new(kind.queues())?),
            path: Arc::new(PathControl::new(matches!(kind, Kind::Net { .. }))?),
        })
    }

    /// What the device counted so far.
    pub fn counters(&self) -> Arc<VhostUserCounters> {
        self.counters.clone()
    }
}

/// The memory table of `mem`: every region must be file-backed and shared.
pub fn memory_table(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, String> {
    if !mem
        .iter()
        .all(|r| r.file_offset().is_some() && r.flags() & libc::MAP_SHARED != 0)
    {
        return Err(
            "guest memory is not shared (a vhost-user device needs memory_shared)".to_string(),
        );
    }
    mem.iter()
        .map(|r| {
            let fo = r.file_offset().expect("checked above");
            Ok(VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().raw_value(),
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                mmap_offset: fo.start(),
                mmap_handle: fo.file().as_raw_fd(),
            })
        })
        .collect()
}

/// Where the rings of the queues stand, and how to reach them.
struct Rings {
    socket: PathBuf,
    frontend: Arc<Mutex<Conn>>,
    protocol: bool,
    /// The features sent to the backend (sent again to a new one).
    features: u64,
    kind: Kind,
    calls: Vec<EventFd>,
    /// The shadow rings' memory, and the eventfds the VMM kicks them with.
    area: Arc<ShadowArea>,
    kicks: Vec<EventFd>,
}

/// Most a stop waits for a backend to use what it took (a backend other than ours that does
/// not finish its requests before answering GET_VRING_BASE).
const DRAIN_WAIT: Duration = Duration::from_secs(5);

impl Rings {
    /// The memory table the backend gets: guest RAM and the shadow rings' area above it.
    fn table(&self, mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, String> {
        let mut t = memory_table(mem)?;
        t.push(self.area.region());
        Ok(t)
    }

    /// Hands every ready queue's shadow ring to the backend (interposed path): the shadow
    /// rings start empty, the guest's rings stay where they are for the VMM to take from.
    fn start_shadow(&self, queues: &[ActiveQueue]) -> Result<Vec<Option<ShadowQueue>>, String> {
        let f = self.frontend.lock().unwrap_or_else(|p| p.into_inner());
        let s = &self.socket;
        let mut out = Vec::with_capacity(queues.len());
        for (i, q) in queues.iter().enumerate() {
            let q = &q.queue;
            if !q.ready() {
                out.push(None);
                continue;
            }
            let sq = ShadowQueue::start(&self.area, i, q.size())?;
            let (desc, avail, used) = self.area.host_addrs(i);
            let cfg = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: desc,
                used_ring_addr: used,
                avail_ring_addr: avail,
                log_addr: None,
            };
            f.set_vring_num(i, q.size())
                .map_err(vu(s, "SET_VRING_NUM"))?;
            f.set_vring_addr(i, &cfg).map_err(vu(s, "SET_VRING_ADDR"))?;
            f.set_vring_base(i, 0).map_err(vu(s, "SET_VRING_BASE"))?;
            f.set_vring_call(i, &self.calls[i])
                .map_err(vu(s, "SET_VRING_CALL"))?;
            f.set_vring_kick(i, &self.kicks[i])
                .map_err(vu(s, "SET_VRING_KICK"))?;
            out.push(Some(sq));
        }
        drop(f);
        if self.protocol {
            let mut f = self.frontend.lock().unwrap_or_else(|p| p.into_inner());
            for (i, q) in queues.iter().enumerate() {
                if q.queue.ready() {
                    f.set_vring_enable(i, true)
                        .map_err(vu(s, "SET_VRING_ENABLE"))?;
                }
            }
        }
        Ok(out)
    }

    /// Hands every ready queue to the backend from its current position.
    fn start(&self, mem: &GuestMemoryMmap, queues: &[ActiveQueue]) -> Result<(), String> {
        let f = self.frontend.lock().unwrap_or_else(|p| p.into_inner());
        let s = &self.socket;
        for (i, q) in queues.iter().enumerate() {
            let q = &q.queue;
            if !q.ready() {
                continue;
            }
            let host = |gpa: u64, what: &str| {
                mem.get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|e| format!("queue {i}: the {what} at {gpa:#x}: {e}"))
            };
            let cfg = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(q.desc_table(), "descriptor table")?,
                used_ring_addr: host(q.used_ring(), "used ring")?,
                avail_ring_addr: host(q.avail_ring(), "available ring")?,
                log_addr: None,
            };
            f.set_vring_num(i, q.size())
                .map_err(vu(s, "SET_VRING_NUM"))?;
            f.set_vring_addr(i, &cfg).map_err(vu(s, "SET_VRING_ADDR"))?;
            f.set_vring_base(i, q.next_avail())
                .map_err(vu(s, "SET_VRING_BASE"))?;
            f.set_vring_call(i, &self.calls[i])
                .map_err(vu(s, "SET_VRING_CALL"))?;
            let kick = q_evt(queues, i)?;
            f.set_vring_kick(i, &kick)
                .map_err(vu(s, "SET_VRING_KICK"))?;
        }
        drop(f);
        if self.protocol {
            let mut f = self.frontend.lock().unwrap_or_else(|p| p.into_inner());
            for (i, q) in queues.iter().enumerate() {
                if q.queue.ready() {
                    f.set_vring_enable(i, true)
                        .map_err(vu(s, "SET_VRING_ENABLE"))?;
                }
            }
        }
        Ok(())
    }

    /// Stops the backend's rings and records where they stopped in `queues`.
    fn stop(&self, mem: &GuestMemoryMmap, queues: &mut [ActiveQueue]) -> Result<(), String> {
        let f = self.frontend.lock().unwrap_or_else(|p| p.into_inner());
        for (i, q) in queues.iter_mut().enumerate() {
            if !q.queue.ready() {
                continue;
            }
            let base = f.get_vring_base(i);
            // Read once the ring is stopped: a completion the backend made up to then counts
            // (the VMM fills the used ring itself when it interposes).
            let used: u16 = mem
                .read_obj(GuestAddress(q.queue.used_ring()).unchecked_add(2))
                .map_err(|e| format!("queue {i}: reading the used index: {e}"))?;
            // A backend that is gone cannot say where it stopped: from the used index, what
            // it had taken and not finished is taken again.
            let base = base.map_or(used, |b| b as u16);
            q.queue.set_next_avail(base);
            q.queue.set_next_used(used);
        }
        Ok(())
    }
}

impl Rings {
    /// Connects to a backend again (the last one went away) and gives it the features and the
    /// memory table; the rings are the caller's to hand over.
    fn reconnect(&self, mem: &GuestMemoryMmap) -> Result<(), String> {
        let s = &self.socket;
        let (mut conn, offered, protocol) = open(s, self.kind.protocol_features())?;
        if self.features & !offered & !F_PROTOCOL_FEATURES != 0 || protocol != self.protocol {
            return Err(format!(
                "vhost-user {}: the new backend offers other features ({offered:#x}) than the guest took ({:#x})",
                s.display(),
                self.features
            ));
        }
        if let Kind::Blk { config, .. } = self.kind {
            if blk_config(s, &mut conn)? != config {
                return Err(format!(
                    "vhost-user {}: the new backend serves a disk of another size or geometry",
                    s.display()
                ));
            }
        }
        conn.set_features(self.features)
            .map_err(vu(s, "SET_FEATURES"))?;
        conn.set_mem_table(&self.table(mem)?)
            .map_err(vu(s, "SET_MEM_TABLE"))?;
        *self.frontend.lock().unwrap_or_else(|p| p.into_inner()) = conn;
        Ok(())
    }

    /// The socket descriptor the relay watches for the backend hanging up.
    fn watch_fd(&self) -> std::os::fd::RawFd {
        self.frontend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .watch
            .as_raw_fd()
    }
}

/// Sets `queues` to resume from their used indices (a new backend takes again whatever the old
/// one had taken and not finished).
fn rewind(mem: &GuestMemoryMmap, queues: &mut [ActiveQueue]) {
    for q in queues.iter_mut().filter(|q| q.queue.ready()) {
        if let Ok(used) = mem.read_obj::<u16>(GuestAddress(q.queue.used_ring()).unchecked_add(2)) {
            q.queue.set_next_avail(used);
            q.queue.set_next_used(used);
        }
    }
}

fn q_evt(queues: &[ActiveQueue], i: usize) -> Result<EventFd, String> {
    queues[i]
        .evt
        .try_clone()
        .map_err(|e| format!("queue {i}: {e}"))
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u16 {
        match self.kind {
            Kind::Net { .. } => 1,
            Kind::Blk { .. } => 2,
        }
    }
    fn features(&self) -> u64 {
        let f = self.backend_features & self.kind.passed();
        match self.kind {
            Kind::Net { .. } => f | F_MAC | F_STATUS,
            Kind::Blk { .. } => f,
        }
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        match self.kind {
            Kind::Net { .. } => vec![QUEUE_SIZE, QUEUE_SIZE],
            Kind::Blk { .. } => vec![crate::block::QUEUE_SIZE],
        }
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        match &self.kind {
            Kind::Net { mac } => {
                let mut c = [0u8; 12];
                c[..6].copy_from_slice(mac);
                c[6..8].copy_from_slice(&1u16.to_le_bytes()); // link up
                c[8..10].copy_from_slice(&1u16.to_le_bytes()); // one queue pair
                crate::device::read_config_window(&c, offset, data);
            }
            Kind::Blk { config, .. } => crate::device::read_config_window(config, offset, data),
        }
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<ActiveQueue>,
        irq: Arc<dyn Interrupt>,
        ctl: Arc<WorkerCtl>,
    ) -> Result<(), String> {
        if queues.len() != self.kind.queues() {
            return Err(format!(
                "a vhost-user {} device needs {} queue(s)",
                self.kind.thread(),
                self.kind.queues()
            ));
        }
        let s = &self.socket;
        self.area.place_above(&mem);
        let mut table = memory_table(&mem)?;
        table.push(self.area.region());
        let mut fw = (features & self.backend_features & self.kind.passed()) | F_VERSION_1;
        if self.protocol {
            fw |= F_PROTOCOL_FEATURES;
        }
        {
            let f = self.frontend.lock().unwrap_or_else(|p| p.into_inner());
            f.set_features(fw).map_err(vu(s, "SET_FEATURES"))?;
            f.set_mem_table(&table).map_err(vu(s, "SET_MEM_TABLE"))?;
        }
        let calls = (0..queues.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("call eventfd: {e}"))?;
        let kicks = (0..queues.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("kick eventfd: {e}"))?;
        self.path
            .mergeable
            .store(fw & F_MRG_RXBUF != 0, Ordering::Relaxed);
        let rings = Rings {
            socket: self.socket.clone(),
            frontend: self.frontend.clone(),
            protocol: self.protocol,
            features: fw,
            kind: self.kind,
            calls,
            area: self.area.clone(),
            kicks,
        };
        let counters = self.counters.clone();
        let path = self.path.clone();
        let ctl2 = ctl.clone();
        // Through the VMM's thread spawner: the relay gets its own system-call filter.
        let kind = self.kind.thread();
        path.set_active(true);
        let thread = wv_devices::thread::spawn(kind.into(), kind, move || {
            let ctl = ctl2;
            let _exit = ExitGuard(ctl.clone());
            let mut r = Relay {
                mem: &mem,
                queues,
                rings: &rings,
                irq: &*irq,
                counters: &counters,
                ctl: &ctl,
                path: &path,
                shadows: None,
                broken: Vec::new(),
            };
            r.run();
            r.path.set_active(false);
        })
        .map_err(|e| {
            self.path.set_active(false);
            format!("vhost-user relay thread: {e}")
        })?;
        self.ctl = Some(ctl);
        self.thread = Some(thread);
        Ok(())
    }
    fn reset(&mut self) {
        stop_worker(&mut self.ctl, &mut self.thread);
    }
    fn path_control(&self) -> Option<Arc<PathControl>> {
        Some(self.path.clone())
    }
    fn save_state(&self) -> DeviceState {
        match self.kind {
            Kind::Net { mac } => DeviceState::Net(NetState { mac }),
            // The ID is the backend's (GET_ID): not part of the VMM's state.
            Kind::Blk { config, readonly } => DeviceState::Block(BlockState {
                id: Vec::new(),
                capacity: blk_capacity(&config),
                readonly,
            }),
        }
    }
    fn restore_state(&mut self, state: DeviceState) -> Result<(), String> {
        match &mut self.kind {
            Kind::Net { mac } => restore_mac(mac, state),
            Kind::Blk { config, readonly } => {
                crate::block::check_state(state, &[], blk_capacity(config), *readonly)
            }
        }
    }
}

/// A disk's capacity in sectors, from its configuration space.
fn blk_capacity(config: &[u8; CONFIG_SIZE]) -> u64 {
    u64::from_le_bytes(config[..8].try_into().expect("8 bytes"))
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        self.reset();
    }
}

/// The relay thread's state: the queues as the guest set them up, and while interposed and
/// running, their shadows.
struct Relay<'a> {
    mem: &'a GuestMemoryMmap,
    queues: Vec<ActiveQueue>,
    rings: &'a Rings,
    irq: &'a dyn Interrupt,
    counters: &'a VhostUserCounters,
    ctl: &'a WorkerCtl,
    path: &'a PathControl,
    /// Some while the rings run on the interposed path.
    shadows: Option<Vec<Option<ShadowQueue>>>,
    /// Queues whose guest posted a bad chain while interposed: nothing more is taken from
    /// them until the driver resets the device.
    broken: Vec<bool>,
}

impl Relay<'_> {
    /// Starts the rings on the device's path (falling back to direct if the shadow rings
    /// cannot be set up).
    fn start(&mut self) {
        if self.path.interposed() {
            match self.rings.start_shadow(&self.queues) {
                Ok(sh) => {
                    self.broken = vec![false; sh.len()];
                    self.shadows = Some(sh);
                    self.pump_all();
                    // As on the direct path: the backend looks at every ring once.
                    for (k, q) in self.rings.kicks.iter().zip(&self.queues) {
                        if q.queue.ready() {
                            let _ = k.write(1);
                        }
                    }
                    return;
                }
                Err(e) => {
                    eprintln!(
                        "wv: vhost-user {}: interposing: {e}; the device stays on the direct path",
                        self.rings.socket.display()
                    );
                    let mut st = self.path.lock();
                    self.path.apply(&mut st, DataPath::Direct, None);
                }
            }
        }
        if let Err(e) = self.rings.start(self.mem, &self.queues) {
            eprintln!("wv: {e}");
        }
        // A kick on each ring: the backend looks at it now (a net backend may hold a frame
        // for buffers the guest posted while the VMM had the ring, and the guest's own kick
        // for them went to the VMM).
        for q in self.queues.iter().filter(|q| q.queue.ready()) {
            let _ = q.evt.write(1);
        }
    }

    /// Stops the rings, on whichever path they run, leaving the guest's queues at positions
    /// that the next server (the backend directly, the shadow, a snapshot) takes on from.
    fn stop(&mut self) {
        match self.shadows.take() {
            None => {
                if let Err(e) = self.rings.stop(self.mem, &mut self.queues) {
                    eprintln!("wv: {e}");
                }
                // A completion whose call raced the stop still reaches the guest.
                for (i, q) in self.queues.iter().enumerate() {
                    if q.queue.ready() {
                        self.irq.queue(i);
                    }
                }
            }
            Some(shadows) => self.stop_shadow(shadows),
        }
    }

    /// Stops the shadow rings: the backend stops (finishing what it took), its last
    /// completions go to the guest, and the chains it never took go back to the guest's ring.
    fn stop_shadow(&mut self, shadows: Vec<Option<ShadowQueue>>) {
        let s = &self.rings.socket;
        for (i, sq) in shadows.into_iter().enumerate() {
            let Some(mut sq) = sq else { continue };
            let base = self
                .rings
                .frontend
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_vring_base(i);
            let Ok(base) = base else {
                // A backend that is gone: what it had not used is taken again from the used
                // index (the direct path's reconnection rule).
                self.reap(i, &mut sq);
                rewind(self.mem, &mut self.queues[i..=i]);
                continue;
            };
            let base = base as u16;
            self.reap(i, &mut sq);
            let deadline = Instant::now() + DRAIN_WAIT;
            while sq.taken_unused(base) > 0 && Instant::now() < deadline {
                let mut p = libc::pollfd {
                    fd: self.rings.calls[i].as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 10) };
                let _ = self.rings.calls[i].read();
                self.reap(i, &mut sq);
            }
            let drop_untaken = self.broken.get(i).copied().unwrap_or(false);
            if let Err(e) = sq.hand_back(base, self.mem, &mut self.queues[i], drop_untaken) {
                eprintln!(
                    "wv: vhost-user {}: {e}; taken again from the used index",
                    s.display()
                );
                rewind(self.mem, &mut self.queues[i..=i]);
            }
            self.irq.queue(i);
        }
        self.path.flush_sink();
    }

    /// Moves queue `i`'s completions from its shadow to the guest (recording them) and
    /// interrupts the guest if it wants to hear of them.
    fn reap(&mut self, i: usize, sq: &mut ShadowQueue) {
        let (done, err) = sq.reap(&self.rings.area, self.mem, &mut self.queues[i]);
        if let Some(e) = err {
            self.path.backend_errors.fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "wv: vhost-user {}: queue {i}: {e}",
                self.rings.socket.display()
            );
        }
        if done.is_empty() {
            return;
        }
        self.path
            .completed
            .fetch_add(done.len() as u64, Ordering::Relaxed);
        for c in &done {
            self.path.record(i, c, self.mem);
        }
        if self.queues[i]
            .queue
            .needs_notification(self.mem)
            .unwrap_or(true)
        {
            self.irq.queue(i);
        }
    }

    /// Forwards what the guest made available on queue `i` to its shadow and kicks the
    /// backend.
    fn pump(&mut self, i: usize) {
        if self.broken.get(i).copied().unwrap_or(true) {
            return;
        }
        let Some(Some(sq)) = self.shadows.as_mut().map(|v| v.get_mut(i)) else {
            return;
        };
        let Some(sq) = sq.as_mut() else { return };
        let before = sq.forwarded;
        let r = sq.forward(&self.rings.area, self.mem, &mut self.queues[i]);
        let n = sq.forwarded - before;
        if n > 0 {
            self.path.forwarded.fetch_add(n, Ordering::Relaxed);
            let _ = self.rings.kicks[i].write(1);
        }
        if let Err(e) = r {
            self.path.bad_chains.fetch_add(1, Ordering::Relaxed);
            self.broken[i] = true;
            self.queues[i].set_needs_reset();
            eprintln!(
                "wv: vhost-user {}: queue {i}: {e}; the device needs a reset",
                self.rings.socket.display()
            );
            self.irq.queue(i);
            self.irq.config();
        }
    }

    fn pump_all(&mut self) {
        for i in 0..self.queues.len() {
            self.pump(i);
        }
    }

    /// Takes a path switch asked by the VMM, if any: stops the rings on the current path and
    /// starts them on the new one.
    fn switch(&mut self, running: bool) {
        let _ = self.path.wake.read();
        let Some(p) = self
            .path
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let t0 = Instant::now();
        if running {
            self.stop();
        }
        {
            let mut st = self.path.lock();
            self.path.apply(&mut st, p.path, p.capture);
        }
        if running {
            self.start();
        }
        let pause = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut st = self.path.lock();
        st.switches += 1;
        st.last_pause_us = pause;
        st.max_pause_us = st.max_pause_us.max(pause);
        let wanted = p.path == DataPath::Interposed;
        let r = if st.interposed == wanted {
            Ok(self.path.status_of(&st))
        } else {
            Err("the shadow rings could not be set up; the device stays on the direct path".into())
        };
        let _ = p.reply.send(r);
    }

    /// Starts the rings, then relays the backend's calls to the guest until stopped (moving
    /// chains and completions between the guest's rings and the shadow ones while
    /// interposed); a pause stops the rings (their positions go with the parked queues) and a
    /// resume starts them again; a backend that hangs up is replaced by a new connection as
    /// soon as one is accepted.
    fn run(&mut self) {
        let mut running = false;
        let mut connected = true;
        let nq = self.rings.calls.len();
        let mut check = true;
        loop {
            if std::mem::take(&mut check) {
                if self.ctl.pausing() && running {
                    self.stop();
                    running = false;
                }
                match self.ctl.check(&self.queues) {
                    CtlAction::Stop => {
                        if running {
                            self.stop();
                        }
                        return;
                    }
                    CtlAction::Sweep if !running && connected && !self.ctl.pausing() => {
                        self.start();
                        running = true;
                    }
                    CtlAction::Sweep => {}
                }
            }
            if !connected {
                match self.rings.reconnect(self.mem) {
                    Ok(()) => {
                        eprintln!(
                            "wv: vhost-user {}: connected again",
                            self.rings.socket.display()
                        );
                        connected = true;
                        rewind(self.mem, &mut self.queues);
                        running = false;
                        check = true;
                        continue;
                    }
                    Err(_) => {
                        // Try again in a while, unless the owner asks for something first.
                        let mut p =
                            [self.ctl.fd(), self.path.wake.as_raw_fd()].map(|fd| libc::pollfd {
                                fd,
                                events: libc::POLLIN,
                                revents: 0,
                            });
                        // SAFETY: a valid array of two pollfd.
                        if unsafe { libc::poll(p.as_mut_ptr(), 2, 100) } > 0 {
                            check = true;
                            if p[1].revents != 0 {
                                self.switch(false);
                            }
                        }
                        continue;
                    }
                }
            }
            let interposed = self.shadows.is_some();
            let mut fds: Vec<libc::pollfd> = self
                .rings
                .calls
                .iter()
                .map(|c| (c.as_raw_fd(), libc::POLLIN))
                .chain([
                    (self.ctl.fd(), libc::POLLIN),
                    (self.rings.watch_fd(), libc::POLLRDHUP),
                    (self.path.wake.as_raw_fd(), libc::POLLIN),
                ])
                .chain(
                    self.queues
                        .iter()
                        .filter(|_| interposed)
                        .map(|q| (q.evt.as_raw_fd(), libc::POLLIN)),
                )
                .map(|(fd, events)| libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                })
                .collect();
            // SAFETY: `fds` is a valid array of pollfd for its length.
            if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) } < 0 {
                continue;
            }
            for i in 0..nq {
                if fds[i].revents == 0 || self.rings.calls[i].read().is_err() {
                    continue;
                }
                self.counters
                    .calls
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match self.shadows.as_mut().and_then(|v| v.get_mut(i)?.take()) {
                    Some(mut sq) => {
                        self.reap(i, &mut sq);
                        if let Some(v) = self.shadows.as_mut() {
                            v[i] = Some(sq);
                        }
                        // Freed shadow descriptors may let a waiting chain through.
                        self.pump(i);
                    }
                    None => self.irq.queue(i),
                }
            }
            if interposed {
                for i in 0..nq {
                    if fds[nq + 3 + i].revents != 0 {
                        self.queues[i].take_notifications();
                        self.pump(i);
                    }
                }
            }
            if fds[nq].revents != 0 {
                check = true;
            }
            if fds[nq + 2].revents != 0 && connected {
                self.switch(running);
            }
            if fds[nq + 1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                eprintln!(
                    "wv: vhost-user {}: the backend went away; waiting for it to come back",
                    self.rings.socket.display()
                );
                connected = false;
                if running {
                    // Nothing to ask a backend that is gone: positions from the used indices
                    // (the shadow's completions so far are the guest's already).
                    if let Some(shadows) = self.shadows.take() {
                        for (i, sq) in shadows.into_iter().enumerate() {
                            if let Some(mut sq) = sq {
                                self.reap(i, &mut sq);
                            }
                        }
                        self.path.flush_sink();
                    }
                    rewind(self.mem, &mut self.queues);
                    running = false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_table_needs_shared_file_backed_ram() {
        let private = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let e = memory_table(&private).err().expect("refused");
        assert!(e.contains("memory_shared"), "{e}");
    }

    #[test]
    fn a_socket_nobody_listens_on_is_a_clear_error() {
        let p = std::env::temp_dir().join(format!("wv-vu-none-{}.sock", std::process::id()));
        let e = VhostUserDevice::net(&p, [2, 0, 0, 0, 0, 1])
            .err()
            .expect("nothing listens");
        assert!(
            e.starts_with("cannot connect to the vhost-user backend at"),
            "{e}"
        );
    }
}
