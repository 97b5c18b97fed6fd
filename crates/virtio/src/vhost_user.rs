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
#![allow(clippy::cast_possible_truncation)] // ring positions are 16-bit by the protocol

use crate::block::{
    BlockState, CONFIG_SIZE, F_BLK_SIZE, F_DISCARD, F_FLUSH, F_RO, F_SEG_MAX, F_WRITE_ZEROES,
};
use crate::device::{CtlAction, DeviceState, ExitGuard, WorkerCtl};
use crate::net::{
    restore_mac, stop_worker, NetState, F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6,
    F_HOST_TSO4, F_HOST_TSO6, F_MAC, F_MRG_RXBUF, F_STATUS, QUEUE_SIZE,
};
use crate::GuestMemoryMmap;
use crate::{ActiveQueue, Interrupt, VirtioDevice, F_VERSION_1};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
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
        Ok(VhostUserDevice::new(
            socket,
            f,
            backend_features,
            protocol,
            kind,
        ))
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
        Ok(VhostUserDevice::new(
            socket,
            f,
            backend_features,
            protocol,
            kind,
        ))
    }

    fn new(
        socket: &Path,
        f: Conn,
        backend_features: u64,
        protocol: bool,
        kind: Kind,
    ) -> VhostUserDevice {
        VhostUserDevice {
            socket: socket.to_path_buf(),
            frontend: Arc::new(Mutex::new(f)),
            backend_features,
            protocol,
            kind,
            counters: Arc::default(),
            ctl: None,
            thread: None,
        }
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
}

impl Rings {
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
            let used: u16 = mem
                .read_obj(GuestAddress(q.queue.used_ring()).unchecked_add(2))
                .map_err(|e| format!("queue {i}: reading the used index: {e}"))?;
            // A backend that is gone cannot say where it stopped: from the used index, what
            // it had taken and not finished is taken again.
            let base = f.get_vring_base(i).map_or(used, |b| b as u16);
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
        conn.set_mem_table(&memory_table(mem)?)
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
        let table = memory_table(&mem)?;
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
        let rings = Rings {
            socket: self.socket.clone(),
            frontend: self.frontend.clone(),
            protocol: self.protocol,
            features: fw,
            kind: self.kind,
            calls,
        };
        let counters = self.counters.clone();
        let ctl2 = ctl.clone();
        // Through the VMM's thread spawner: the relay gets its own system-call filter.
        let kind = self.kind.thread();
        let thread = wv_devices::thread::spawn(kind.into(), kind, move || {
            let ctl = ctl2;
            let _exit = ExitGuard(ctl.clone());
            relay(&mem, queues, &rings, &*irq, &counters, &ctl);
        })
        .map_err(|e| format!("vhost-user relay thread: {e}"))?;
        self.ctl = Some(ctl);
        self.thread = Some(thread);
        Ok(())
    }
    fn reset(&mut self) {
        stop_worker(&mut self.ctl, &mut self.thread);
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

/// Starts the rings, then relays the backend's calls to the guest until stopped; a pause
/// stops the rings (their positions go with the parked queues) and a resume starts them again;
/// a backend that hangs up is replaced by a new connection as soon as one is accepted.
fn relay(
    mem: &GuestMemoryMmap,
    mut queues: Vec<ActiveQueue>,
    rings: &Rings,
    irq: &dyn Interrupt,
    counters: &VhostUserCounters,
    ctl: &WorkerCtl,
) {
    let mut running = false;
    let mut connected = true;
    let nq = rings.calls.len();
    let mut check = true;
    loop {
        if std::mem::take(&mut check) {
            if ctl.pausing() && running {
                if let Err(e) = rings.stop(mem, &mut queues) {
                    eprintln!("wv: {e}");
                }
                running = false;
            }
            match ctl.check(&queues) {
                CtlAction::Stop => {
                    if running {
                        let _ = rings.stop(mem, &mut queues);
                    }
                    return;
                }
                CtlAction::Sweep if !running && connected && !ctl.pausing() => {
                    if let Err(e) = rings.start(mem, &queues) {
                        eprintln!("wv: {e}");
                    }
                    running = true;
                }
                CtlAction::Sweep => {}
            }
        }
        if !connected {
            match rings.reconnect(mem) {
                Ok(()) => {
                    eprintln!("wv: vhost-user {}: connected again", rings.socket.display());
                    connected = true;
                    rewind(mem, &mut queues);
                    running = false;
                    check = true;
                    continue;
                }
                Err(_) => {
                    // Try again in a while, unless the owner asks for something first.
                    let mut p = libc::pollfd {
                        fd: ctl.fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    if unsafe { libc::poll(&mut p, 1, 100) } > 0 {
                        check = true;
                    }
                    continue;
                }
            }
        }
        let mut fds: Vec<libc::pollfd> = rings
            .calls
            .iter()
            .map(|c| (c.as_raw_fd(), libc::POLLIN))
            .chain([
                (ctl.fd(), libc::POLLIN),
                (rings.watch_fd(), libc::POLLRDHUP),
            ])
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
        for (i, (fd, call)) in fds.iter().zip(&rings.calls).enumerate() {
            if fd.revents != 0 && call.read().is_ok() {
                counters
                    .calls
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                irq.queue(i);
            }
        }
        if fds[nq].revents != 0 {
            check = true;
        }
        if fds[nq + 1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            eprintln!(
                "wv: vhost-user {}: the backend went away; waiting for it to come back",
                rings.socket.display()
            );
            connected = false;
            if running {
                // Nothing to ask a backend that is gone: positions from the used indices.
                rewind(mem, &mut queues);
                running = false;
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
