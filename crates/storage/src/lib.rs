//! The storage service (`wv storage`): a process that holds disks (raw images, VMKFS disks)
//! and serves each to one VMM at a time over vhost-user-blk, on its own socket
//! `DIR/NAME.sock`, with a control socket `DIR/control.sock` (`stats`, `disk add`, `disk del`).
//!
//! The service owns each disk's exclusive open (the image's `flock`, the VMKFS lock and owner
//! record) for as long as it serves it, whichever VMM connects. Requests are parsed, validated
//! and served by the VMM's own virtio-blk code ([`wv_virtio::block::process`]: each chain read
//! once and served from that copy), against the VMM's guest memory mapped here from the memory
//! table it sends (each region checked against its file first). A request is completed (its
//! status written, the used ring advanced, the VMM called) only after the backend did it: a
//! write is in the image (the page cache) when acknowledged, and durable after a FLUSH
//! (`fdatasync`). If the service dies, what it acknowledged is in the kernel's page cache and
//! survives it; what it had taken and not acknowledged is taken again by the restarted service
//! when the VMM hands the ring back from its used index (reads and writes of whole sectors are
//! idempotent).
//!
//! The disks of one datastore share its device, so their requests go through one dispatcher
//! per device ([`wv_shares::Gate`], mClock-style): one per VMKFS datastore, and one for all the
//! raw images ([`device_of`]). Each disk has shares, an IOPS reservation and an IOPS limit
//! (`disk set NAME shares=N reservation_iops=R limit_iops=L`), a request costs
//! `1 + bytes / 32 KiB` I/Os ([`request_cost`]), at most [`MAX_OUTSTANDING`] requests are at a
//! device at a time, and a device's capacity, when given, caps its disks' total so that they
//! contend for it: `--capacity-iops N` / `set capacity_iops=N` is every device's (each has its
//! own N), `set capacity_iops=N device=DEV` one device's.

#![allow(clippy::cast_possible_truncation)] // queue indices and sizes are 16/32-bit by the spec

pub mod disk;

pub use disk::{DiskSpec, Source};
use serde::Serialize;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{
    FileOffset, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use wv_virtio::block::{self, BlockCounters, Disk, DiskWatch, Watched};
use wv_virtio::vu_backend::{serve_frontends, ExitEvents};

/// Requests of all the service's disks at the device at once.
pub const MAX_OUTSTANDING: usize = 4;
/// Bytes of a request that cost one more I/O: a 4 KiB request costs 1.125, a 1 MiB one 33.
pub const IO_SIZE_UNIT: u64 = 32 << 10;
/// I/Os a disk idle for a while may get ahead of its entitlement.
const BURST_IOS: f64 = 8.0;

/// A dispatcher for one device of `capacity` I/Os per second (0: none).
fn new_gate(capacity: u64) -> Arc<wv_shares::Gate> {
    Arc::new(wv_shares::Gate::new(capacity, MAX_OUTSTANDING, BURST_IOS))
}

/// A guest's memory as vhost-user-backend maps it.
pub type Mem = GuestMemoryAtomic<vm_memory::GuestMemoryMmap>;

const F_PROTOCOL_FEATURES: u64 = 1 << 30;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the service serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Where the sockets are: `DIR/NAME.sock` per disk and `DIR/control.sock`.
    pub socket_dir: PathBuf,
    /// The disks served from the start.
    pub disks: Vec<DiskSpec>,
    /// Break a VMKFS disk's stale lock record (its writer gone) and take the disk.
    pub take_stale_locks: bool,
    /// Each device's capacity in I/Os per second that its disks share (0: as fast as it goes).
    pub capacity_iops: u64,
}

/// What one disk counted.
#[derive(Default, Debug)]
pub struct DiskCounters {
    /// Requests served, refused and dropped (in `block`).
    pub block: BlockCounters,
    /// Bytes read into guest memory.
    pub read_bytes: AtomicU64,
    /// Bytes written from guest memory.
    pub written_bytes: AtomicU64,
    /// Flushes done.
    pub flushes: AtomicU64,
    /// Backend failures (a read, write or flush that failed).
    pub io_errors: AtomicU64,
    /// Frontends that connected.
    pub connections: AtomicU64,
}

impl DiskWatch for DiskCounters {
    fn read(&self, _offset: u64, len: u64, ok: bool) {
        if ok {
            self.read_bytes.fetch_add(len, Ordering::Relaxed);
        } else {
            self.io_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn changed(&self, _offset: u64, len: u64, data: bool, ok: bool) {
        if !ok {
            self.io_errors.fetch_add(1, Ordering::Relaxed);
        } else if data {
            self.written_bytes.fetch_add(len, Ordering::Relaxed);
        }
    }
    fn flushed(&self, ok: bool) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.io_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A disk's counters as served (`stats`).
#[derive(Serialize, Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub struct DiskStats {
    pub name: String,
    pub source: String,
    pub readonly: bool,
    pub size: u64,
    pub connected: bool,
    pub connections: u64,
    /// Every request taken from the ring: served + errors + dropped.
    pub requests: u64,
    pub served: u64,
    /// Requests answered with an error status.
    pub errors: u64,
    /// Chains too broken to answer (completed without a status).
    pub dropped: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    /// Reads and writes served (operations; their bytes are `read_bytes`, `written_bytes`).
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub io_errors: u64,
    /// The device whose dispatcher it goes through ([`device_of`]).
    pub device: String,
    /// Its shares, IOPS reservation and IOPS limit (`reservation`, `limit`: I/Os per second).
    pub shares: wv_shares::Settings,
    /// What the dispatcher gave it: I/Os (`served`, `reserved`), requests that waited
    /// (`delayed`), and I/Os per second over the last window (`rate`).
    pub sched: wv_shares::FlowStats,
}

/// One served disk: the backend (held open), its identity and counters, and the memory of
/// the VMM connected to it.
pub struct Served {
    spec: DiskSpec,
    disk: Mutex<Box<dyn Disk>>,
    id: [u8; 20],
    size: u64,
    readonly: bool,
    counters: DiskCounters,
    /// The connected VMM's memory, mapped again here with the dirty bitmap the request path
    /// expects ([`wv_virtio::GuestMemoryMmap`]).
    mem: Mutex<Option<wv_virtio::GuestMemoryMmap>>,
    connected: AtomicBool,
    stop: AtomicBool,
    /// A request is taken from the ring and not completed yet (GET_VRING_BASE waits for it:
    /// [`Served::wait_idle`]).
    busy: Mutex<bool>,
    idle: std::sync::Condvar,
    /// Its device's dispatcher, and this disk's flow in it.
    gate: Arc<wv_shares::Gate>,
    /// Its device ([`device_of`]).
    device: String,
    flow: usize,
}

/// What a request of the chain costs the dispatcher, in I/Os: 1 + its data bytes /
/// [`IO_SIZE_UNIT`] (the descriptors' lengths less the header and status; a hostile chain
/// costs at most what its descriptors say, capped).
pub fn request_cost<M>(chain: &virtio_queue::DescriptorChain<M>) -> f64
where
    M: std::ops::Deref + Clone,
    M::Target: vm_memory::GuestMemory,
{
    let bytes: u64 = chain
        .clone()
        .take(usize::from(block::QUEUE_SIZE))
        .map(|d| u64::from(d.len()))
        .sum::<u64>()
        .saturating_sub(17)
        .min(1 << 30);
    1.0 + bytes as f64 / IO_SIZE_UNIT as f64
}

impl Served {
    /// Serves `disk` (already open and locked) as `spec` says, alone on its device.
    pub fn new(spec: DiskSpec, disk: Box<dyn Disk>) -> Arc<Served> {
        Served::with_gate(spec, disk, new_gate(0), 0)
    }

    /// Its device ([`device_of`]).
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Serves `disk` as flow `flow` of dispatcher `gate` (shared with the other disks of
    /// its device).
    pub fn with_gate(
        spec: DiskSpec,
        disk: Box<dyn Disk>,
        gate: Arc<wv_shares::Gate>,
        flow: usize,
    ) -> Arc<Served> {
        gate.set(flow, wv_shares::Settings::default());
        Arc::new(Served {
            gate,
            device: device_of(&spec.source),
            flow,
            id: block::disk_id(&spec.name),
            size: disk.size(),
            readonly: disk.readonly(),
            spec,
            disk: Mutex::new(disk),
            counters: DiskCounters::default(),
            mem: Mutex::new(None),
            connected: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            busy: Mutex::new(false),
            idle: std::sync::Condvar::new(),
        })
    }

    /// The disk's counters.
    pub fn stats(&self) -> DiskStats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (served, errors, dropped) =
            (g(&c.block.served), g(&c.block.errors), g(&c.block.dropped));
        DiskStats {
            name: self.spec.name.clone(),
            source: self.spec.source.to_string(),
            readonly: self.readonly,
            size: self.size,
            connected: self.connected.load(Ordering::Relaxed),
            connections: g(&c.connections),
            requests: served + errors + dropped,
            served,
            errors,
            dropped,
            read_bytes: g(&c.read_bytes),
            written_bytes: g(&c.written_bytes),
            reads: g(&c.block.reads),
            writes: g(&c.block.writes),
            flushes: g(&c.flushes),
            io_errors: g(&c.io_errors),
            device: self.device.clone(),
            shares: self.gate.settings(self.flow).unwrap_or_default(),
            sched: self.gate.stats(self.flow).unwrap_or_default(),
        }
    }

    /// Sets the disk's shares, IOPS reservation and IOPS limit.
    pub fn set_shares(&self, s: wv_shares::Settings) -> Result<(), String> {
        s.check()?;
        self.gate.set(self.flow, s);
        Ok(())
    }

    /// Serves every request available on `vring`, in order, each when the service's
    /// dispatcher lets it go: each completed after the backend did it, the VMM called after
    /// each request that waited and once for the rest of the batch.
    pub fn serve(&self, vring: &VringRwLock<Mem>) {
        let Some(mem) = lock(&self.mem).clone() else {
            return;
        };
        let mut disk = lock(&self.disk);
        // Completions the VMM has not been called for yet.
        let mut unsignalled = false;
        loop {
            // The ring is not held while the request waits for its turn: the frontend's
            // messages (a disconnect) are served meanwhile.
            let Some(chain) = vring.get_mut().get_queue_mut().pop_descriptor_chain(&mem) else {
                break;
            };
            self.set_busy(true);
            let head = chain.head_index();
            let cost = request_cost(&chain);
            let grant = loop {
                if let Some(g) = self
                    .gate
                    .acquire(self.flow, cost, Duration::from_millis(500))
                {
                    break Some(g);
                }
                // The frontend stopped the ring (GET_VRING_BASE) while the request waited.
                if self.stop.load(Ordering::SeqCst)
                    || lock(&self.mem).is_none()
                    || !vring.get_ref().get_queue().ready()
                {
                    break None;
                }
            };
            let Some(grant) = grant else {
                // The frontend went, or stopped the ring: the request was never started, and
                // whoever serves the ring next takes it again.
                vring.get_mut().get_queue_mut().go_to_previous_position();
                self.set_busy(false);
                break;
            };
            let waited = grant.waited;
            let mut w = Watched {
                disk: disk.as_mut(),
                watch: &self.counters,
            };
            let len = block::process(&mem, chain, &mut w, &self.id, &self.counters.block);
            self.gate.release(grant);
            let used = vring.get_mut().get_queue_mut().add_used(&mem, head, len);
            self.set_busy(false);
            if used.is_err() {
                break;
            }
            unsignalled = true;
            if waited && vring.needs_notification().unwrap_or(true) {
                // It waited for its turn: the VMM hears of it now, not after the batch.
                let _ = vring.signal_used_queue();
                unsignalled = false;
            }
        }
        if unsignalled && vring.needs_notification().unwrap_or(true) {
            let _ = vring.signal_used_queue();
        }
    }

    fn set_busy(&self, busy: bool) {
        *lock(&self.busy) = busy;
        if !busy {
            self.idle.notify_all();
        }
    }

    /// Waits until no request is between being taken from the ring and being completed: what
    /// GET_VRING_BASE needs before it says where the ring stopped, so that a frontend handing
    /// the ring to someone else (a VMM interposing, docs/DEVICES.md) neither loses a request
    /// nor has it served twice. A request still waiting for the dispatcher is put back (the
    /// ring is marked stopped first); one being done is finished. Bounded by `limit`.
    pub fn wait_idle(&self, limit: Duration) -> bool {
        let busy = lock(&self.busy);
        let (busy, _) = self
            .idle
            .wait_timeout_while(busy, limit, |b| *b)
            .unwrap_or_else(|p| p.into_inner());
        !*busy
    }

    /// A VMM is talking to the disk (counted once per connection).
    fn connecting(&self) {
        if !self.connected.swap(true, Ordering::SeqCst) {
            self.counters.connections.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Forgets the VMM that was connected.
    fn disconnect(&self) {
        *lock(&self.mem) = None;
        self.connected.store(false, Ordering::Relaxed);
    }
}

/// Maps the regions of a VMM's memory table (as vhost-user-backend mapped them: file-backed,
/// checked against their files) a second time, shared, with a dirty bitmap: the request path
/// is the VMM's, written for its memory type.
pub fn remap(mem: &vm_memory::GuestMemoryMmap) -> std::io::Result<wv_virtio::GuestMemoryMmap> {
    wv_virtio::vu_backend::check_memory(mem)?;
    let regions = mem
        .iter()
        .map(|r| {
            let fo = r.file_offset().expect("checked: file-backed");
            let len = usize::try_from(r.len()).map_err(std::io::Error::other)?;
            let m = MmapRegion::from_file(FileOffset::from_arc(fo.arc().clone(), fo.start()), len)
                .map_err(std::io::Error::other)?;
            GuestRegionMmap::new(m, r.start_addr())
                .ok_or_else(|| std::io::Error::other("a memory region past the address space"))
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    wv_virtio::GuestMemoryMmap::from_regions(regions).map_err(std::io::Error::other)
}

/// One disk as a vhost-user-blk backend.
#[derive(Clone)]
pub struct BlkBackend {
    served: Arc<Served>,
    exit: ExitEvents,
}

impl BlkBackend {
    /// The backend of `served`.
    pub fn new(served: Arc<Served>) -> BlkBackend {
        BlkBackend {
            served,
            exit: ExitEvents::default(),
        }
    }

    /// Closes the exit events the library leaves open (once its daemon is dropped).
    pub fn close_exit_events(&self) {
        self.exit.close();
    }

    /// Forgets the connected VMM.
    pub fn disconnect(&self) {
        self.served.disconnect();
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> usize {
        usize::from(block::QUEUE_SIZE)
    }
    fn features(&self) -> u64 {
        block::device_features(self.served.readonly) | F_PROTOCOL_FEATURES
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }
    fn set_event_idx(&self, _enabled: bool) {}
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.served.connecting();
        let c = block::config_space(self.served.size / block::SECTOR);
        let mut out = vec![0u8; (size as usize).min(c.len())];
        wv_virtio::device::read_config_window(&c, u64::from(offset), &mut out);
        out
    }
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one the worker thread of a connection that ended never ends.
        self.exit.pair()
    }
    fn update_memory(&self, mem: Mem) -> std::io::Result<()> {
        let mapped = remap(&mem.memory())?;
        *lock(&self.served.mem) = Some(mapped);
        self.served.connecting();
        Ok(())
    }
    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if device_event == 0 {
            if let Some(v) = vrings.first() {
                self.served.serve(v);
            }
        }
        Ok(())
    }
    fn reset_device(&self) {
        self.served.disconnect();
    }
    fn stop_vring(&self, _queue_index: u32) -> std::io::Result<()> {
        // Called for GET_VRING_BASE once the ring is marked stopped: the request in hand is
        // finished (or put back) before the frontend learns where the ring stopped.
        if !self.served.wait_idle(Duration::from_secs(30)) {
            eprintln!(
                "wv storage: {}: a request was still in progress after 30 s when the VMM stopped the ring",
                self.served.spec.name
            );
        }
        Ok(())
    }
}

/// A disk being served: its state and the thread taking its VMMs.
struct Entry {
    served: Arc<Served>,
    socket: PathBuf,
    thread: JoinHandle<()>,
}

/// The service: the disks it serves, by name, and the dispatcher of each device they are on.
pub struct Service {
    dir: PathBuf,
    take_stale_locks: bool,
    disks: Mutex<Vec<Entry>>,
    devices: Mutex<Devices>,
    /// The next disk's flow in its dispatcher (never reused).
    next_flow: AtomicU64,
}

/// The devices' dispatchers and capacities.
#[derive(Default)]
struct Devices {
    /// Each device's dispatcher (made with its first disk, kept after its last).
    gates: Vec<(String, Arc<wv_shares::Gate>)>,
    /// The capacity of a device without one of its own (0: none).
    default_capacity: u64,
    /// Devices given a capacity of their own (`set capacity_iops=N device=DEV`).
    own: Vec<(String, u64)>,
}

impl Devices {
    fn capacity_of(&self, dev: &str) -> u64 {
        self.own
            .iter()
            .find(|(d, _)| d == dev)
            .map_or(self.default_capacity, |(_, c)| *c)
    }

    fn gate(&mut self, dev: &str) -> Arc<wv_shares::Gate> {
        if let Some((_, g)) = self.gates.iter().find(|(d, _)| d == dev) {
            return g.clone();
        }
        let g = new_gate(self.capacity_of(dev));
        self.gates.push((dev.to_string(), g.clone()));
        g
    }
}

/// The device whose dispatcher a disk of `source` goes through: its VMKFS datastore (the path
/// made canonical when it can be), or `raw` for every raw image.
pub fn device_of(source: &Source) -> String {
    match source {
        Source::Raw(_) => RAW_DEVICE.to_string(),
        Source::Vmkfs { datastore, .. } => canonical_device(&datastore.display().to_string()),
    }
}

/// The device all raw images share.
pub const RAW_DEVICE: &str = "raw";

fn canonical_device(dev: &str) -> String {
    if dev == RAW_DEVICE {
        return dev.to_string();
    }
    std::fs::canonicalize(dev).map_or_else(|_| dev.to_string(), |p| p.display().to_string())
}

/// A device's dispatcher as `stats` shows it.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct DeviceStats {
    /// [`device_of`] its disks.
    pub device: String,
    /// I/Os per second its disks share (0: none).
    pub capacity_iops: u64,
    /// Its disks' names.
    pub disks: Vec<String>,
}

/// The socket of disk `name` under `dir`.
pub fn disk_socket(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

/// The control socket under `dir`.
pub fn control_socket(dir: &Path) -> PathBuf {
    dir.join("control.sock")
}

impl Service {
    /// A service with no disks yet, its sockets under `dir` (created if missing).
    pub fn new(dir: &Path, take_stale_locks: bool) -> Result<Arc<Service>, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Arc::new(Service {
            dir: dir.to_path_buf(),
            take_stale_locks,
            disks: Mutex::new(Vec::new()),
            devices: Mutex::new(Devices::default()),
            next_flow: AtomicU64::new(0),
        }))
    }

    /// Sets every device's capacity in I/Os per second, each shared by its disks (0: none),
    /// but for the devices given one of their own.
    pub fn set_capacity(&self, iops: u64) {
        let mut d = lock(&self.devices);
        d.default_capacity = iops;
        for (dev, g) in &d.gates {
            g.set_capacity(d.capacity_of(dev));
        }
    }

    /// Sets device `dev`'s own capacity ([`device_of`]; `raw` for the raw images), `None`
    /// giving it the default back.
    pub fn set_device_capacity(&self, dev: &str, iops: Option<u64>) {
        let dev = canonical_device(dev);
        let mut d = lock(&self.devices);
        d.own.retain(|(x, _)| *x != dev);
        if let Some(n) = iops {
            d.own.push((dev.clone(), n));
        }
        let cap = d.capacity_of(&dev);
        if let Some((_, g)) = d.gates.iter().find(|(x, _)| *x == dev) {
            g.set_capacity(cap);
        }
    }

    /// The capacity of a device without one of its own.
    pub fn capacity(&self) -> u64 {
        lock(&self.devices).default_capacity
    }

    /// Every device the service has served a disk of: its capacity and its disks.
    pub fn devices(&self) -> Vec<DeviceStats> {
        let disks = lock(&self.disks);
        let d = lock(&self.devices);
        d.gates
            .iter()
            .map(|(dev, g)| DeviceStats {
                device: dev.clone(),
                capacity_iops: g.capacity(),
                disks: disks
                    .iter()
                    .filter(|e| e.served.device == *dev)
                    .map(|e| e.served.spec.name.clone())
                    .collect(),
            })
            .collect()
    }

    /// Sets disk `name`'s shares, IOPS reservation and IOPS limit.
    pub fn set_shares(&self, name: &str, s: wv_shares::Settings) -> Result<(), String> {
        let disks = lock(&self.disks);
        let e = disks
            .iter()
            .find(|e| e.served.spec.name == name)
            .ok_or_else(|| format!("no disk {} is served", name.escape_debug()))?;
        e.served.set_shares(s)
    }

    /// Opens (and locks) the disk of `spec` and serves it on `DIR/NAME.sock`.
    pub fn add(&self, spec: DiskSpec) -> Result<(), String> {
        let mut disks = lock(&self.disks);
        if disks.iter().any(|e| e.served.spec.name == spec.name) {
            return Err(format!("disk {} is already served", spec.name));
        }
        let disk = disk::open(&spec, self.take_stale_locks)?;
        let socket = disk_socket(&self.dir, &spec.name);
        // Bound before the service says it serves: a VMM started then finds it.
        let mut listener = Listener::new(&socket, true)
            .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
        let flow = usize::try_from(self.next_flow.fetch_add(1, Ordering::Relaxed))
            .map_err(|e| e.to_string())?;
        let gate = lock(&self.devices).gate(&device_of(&spec.source));
        let served = Served::with_gate(spec, disk, gate, flow);
        let backend = BlkBackend::new(served.clone());
        let (s2, sock2) = (served.clone(), socket.clone());
        let thread = std::thread::Builder::new()
            .name(format!("storage-{}", served.spec.name))
            .spawn(move || {
                let exit = backend.exit.clone();
                let b = backend.clone();
                let name = format!("storage-{}", s2.spec.name);
                let r = serve_frontends(
                    "wv storage",
                    &name,
                    backend,
                    &exit,
                    &sock2,
                    &mut listener,
                    || {
                        b.disconnect();
                        !s2.stop.load(Ordering::SeqCst)
                    },
                );
                if let Err(e) = r {
                    eprintln!("wv storage: {e}");
                }
            })
            .map_err(|e| format!("cannot start serving {}: {e}", socket.display()))?;
        disks.push(Entry {
            served,
            socket,
            thread,
        });
        Ok(())
    }

    /// Stops serving disk `name` and releases it (its lock, its socket); refused while a VMM
    /// is connected to it.
    pub fn del(&self, name: &str) -> Result<(), String> {
        let entry = {
            let mut disks = lock(&self.disks);
            let i = disks
                .iter()
                .position(|e| e.served.spec.name == name)
                .ok_or_else(|| format!("no disk {} is served", name.escape_debug()))?;
            if disks[i].served.connected.load(Ordering::SeqCst) {
                return Err(format!(
                    "disk {name} is connected to a VMM: stop that VM (or its disk) first"
                ));
            }
            disks[i].served.stop.store(true, Ordering::SeqCst);
            disks.remove(i)
        };
        // The serving thread waits for a connection: one that ends at once wakes it to stop.
        drop(UnixStream::connect(&entry.socket));
        let _ = entry.thread.join();
        entry.served.gate.remove(entry.served.flow);
        let _ = std::fs::remove_file(&entry.socket);
        Ok(())
    }

    /// Every disk's counters.
    pub fn stats(&self) -> Vec<DiskStats> {
        lock(&self.disks).iter().map(|e| e.served.stats()).collect()
    }

    /// Answers one control request (a line): `stats`, `disk add SPEC`, `disk del NAME`,
    /// `disk set NAME [shares=N] [reservation_iops=R] [limit_iops=L]` (what is not given
    /// stays), `set capacity_iops=N` (every device's), `set capacity_iops=N device=DEV` (one
    /// device's; `capacity_iops=default` gives it the others' back).
    pub fn control(&self, line: &str) -> serde_json::Value {
        let words: Vec<&str> = line.split_whitespace().collect();
        let r = match words.as_slice() {
            ["stats"] => {
                return serde_json::json!({
                    "disks": self.stats(),
                    "capacity_iops": self.capacity(),
                    "devices": self.devices(),
                })
            }
            ["disk", "add", spec] => DiskSpec::parse(spec).and_then(|s| self.add(s)),
            ["disk", "del", name] => self.del(name),
            ["disk", "set", name, args @ ..] => self.disk_set(name, args),
            ["set", args @ ..] => self.set(args),
            _ => Err(format!(
                "unknown request '{}' (stats, disk add NAME=SPEC, disk del NAME, disk set NAME \
                 shares=N reservation_iops=R limit_iops=L, set capacity_iops=N [device=DEV])",
                line.trim().escape_debug()
            )),
        };
        match r {
            Ok(()) => serde_json::json!({ "ok": true }),
            Err(e) => serde_json::json!({ "error": e }),
        }
    }
}

impl Service {
    fn set(&self, args: &[&str]) -> Result<(), String> {
        let bad = || {
            format!(
                "set: '{}': expected capacity_iops=N [device=DEV]",
                args.join(" ").escape_debug()
            )
        };
        let (mut cap, mut dev) = (None, None);
        for a in args {
            match a.split_once('=') {
                Some(("capacity_iops", v)) if cap.is_none() => cap = Some(v),
                Some(("device", v)) if dev.is_none() && !v.is_empty() => dev = Some(v),
                _ => return Err(bad()),
            }
        }
        let cap = cap.ok_or_else(bad)?;
        match dev {
            Some(dev) if cap == "default" => self.set_device_capacity(dev, None),
            Some(dev) => self.set_device_capacity(dev, Some(cap.parse().map_err(|_| bad())?)),
            None => self.set_capacity(cap.parse().map_err(|_| bad())?),
        }
        Ok(())
    }

    fn disk_set(&self, name: &str, args: &[&str]) -> Result<(), String> {
        let mut s = {
            let disks = lock(&self.disks);
            let e = disks
                .iter()
                .find(|e| e.served.spec.name == *name)
                .ok_or_else(|| format!("no disk {} is served", name.escape_debug()))?;
            e.served.gate.settings(e.served.flow).unwrap_or_default()
        };
        for a in args {
            let bad = || {
                format!(
                    "disk set {name}: '{}': expected shares=N, reservation_iops=N or limit_iops=N",
                    a.escape_debug()
                )
            };
            let (k, v) = a.split_once('=').ok_or_else(bad)?;
            match k {
                "shares" => s.shares = v.parse().map_err(|_| bad())?,
                "reservation_iops" => s.reservation = v.parse().map_err(|_| bad())?,
                "limit_iops" => s.limit = v.parse().map_err(|_| bad())?,
                _ => return Err(bad()),
            }
        }
        self.set_shares(name, s)
    }
}

/// Answers the control socket's requests, one JSON line per request line.
fn serve_control(svc: Arc<Service>, listener: UnixListener) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let svc = svc.clone();
        let _ = std::thread::Builder::new()
            .name("storage-control".into())
            .spawn(move || {
                let Ok(mut out) = conn.try_clone() else {
                    return;
                };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                for line in BufReader::new(conn.take(64 << 10)).lines() {
                    let Ok(line) = line else { break };
                    if writeln!(out, "{}", svc.control(&line)).is_err() {
                        break;
                    }
                }
            });
    }
}

/// Runs the service: opens and serves every disk of `cfg`, then answers the control socket;
/// returns only on a set-up error.
pub fn run(cfg: &Config) -> Result<(), String> {
    let svc = Service::new(&cfg.socket_dir, cfg.take_stale_locks)?;
    svc.set_capacity(cfg.capacity_iops);
    let ctl = control_socket(&cfg.socket_dir);
    let _ = std::fs::remove_file(&ctl);
    let listener =
        UnixListener::bind(&ctl).map_err(|e| format!("cannot listen on {}: {e}", ctl.display()))?;
    for d in &cfg.disks {
        svc.add(d.clone())?;
    }
    eprintln!(
        "wv storage: serving {} disk(s) under {}",
        cfg.disks.len(),
        cfg.socket_dir.display()
    );
    serve_control(svc, listener);
    Ok(())
}

#[cfg(test)]
mod tests;
