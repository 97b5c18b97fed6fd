//! The virtio-pci modern transport (virtio 1.x, section 4.1).
//!
//! BAR 0 (32-bit memory, [`BAR_SIZE`]) holds the common configuration at 0x0, the ISR at
//! 0x1000, the device configuration at 0x2000, the notification area at [`NOTIFY`] (4 bytes per
//! queue, each an ioeventfd, so notifications never exit to a vCPU thread), the MSI-X table at
//! 0x4000 and its pending bits at 0x6000. Interrupts go through MSI-X when the driver enables
//! it, otherwise through the INTx line with the ISR.
//!
//! The transport also pauses and resumes the device's worker ([`VirtioPci::pause`]), and saves
//! and restores everything the driver negotiated and set up, the queues' positions and the
//! device's own state ([`VirtioPciState`], through [`wv_devices::Snapshot`]): a restored device
//! that was running runs again on the saved rings without the driver noticing.
#![allow(clippy::cast_possible_truncation)] // register values are narrowed to their widths

use crate::device::{ActiveQueue, DeviceState, Interrupt, VirtioDevice, WorkerCtl};
use crate::GuestMemoryMmap;
use crate::{status, F_VERSION_1, NO_VECTOR};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;
use wv_devices::{MmioDevice, Snapshot};
use wv_pci::bus::PciDevice;
use wv_pci::{ConfigSpace, ConfigSpaceState, MsiRouter, MsixTable, MsixTableState};

/// Size of BAR 0.
pub const BAR_SIZE: u32 = 0x8000;
const COMMON: u64 = 0x0;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
/// Start of the notification area in BAR 0.
pub const NOTIFY: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u64 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;

const VIRTIO_VENDOR: u16 = 0x1af4;
const CAP_VENDOR: u8 = 0x09;

/// The address in BAR 0 where queue `q` is notified.
pub fn notify_offset(q: usize) -> u64 {
    NOTIFY + NOTIFY_MULTIPLIER * q as u64
}

#[derive(Clone, Copy)]
struct QueueCfg {
    max: u16,
    size: u16,
    ready: bool,
    vector: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueCfg {
    fn new(max: u16) -> QueueCfg {
        QueueCfg {
            max,
            size: max,
            ready: false,
            vector: NO_VECTOR,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

/// Interrupt state shared by the transport and the device's worker.
struct Irq {
    msix: Mutex<MsixTable>,
    irqfds: Vec<EventFd>,
    queue_vectors: Vec<AtomicU16>,
    config_vector: AtomicU16,
    isr: AtomicU8,
    intx: EventFd,
    counters: Arc<crate::device::DeviceCounters>,
}

impl Irq {
    fn fire(&self, vector: u16, isr_bit: u8) {
        let mut t = self.msix.lock().unwrap_or_else(|p| p.into_inner());
        if t.enabled() {
            let v = usize::from(vector);
            if vector != NO_VECTOR && v < self.irqfds.len() && t.trigger(v) {
                if !t.targets_lapic(v) {
                    self.counters.bad_msi.fetch_add(1, Ordering::Relaxed);
                }
                // Counted before the guest can see it: a guest that ends on this interrupt
                // must find it in the VMM's final statistics.
                self.counters.interrupts.fetch_add(1, Ordering::Relaxed);
                let _ = self.irqfds[v].write(1);
            }
        } else {
            self.isr.fetch_or(isr_bit, Ordering::SeqCst);
            self.counters.interrupts.fetch_add(1, Ordering::Relaxed);
            let _ = self.intx.write(1);
        }
    }

    fn fire_vectors(&self, vectors: &[usize]) {
        for &v in vectors {
            if let Some(fd) = self.irqfds.get(v) {
                self.counters.interrupts.fetch_add(1, Ordering::Relaxed);
                let _ = fd.write(1);
            }
        }
    }
}

impl Interrupt for Irq {
    fn queue(&self, index: usize) {
        let v = self
            .queue_vectors
            .get(index)
            .map_or(NO_VECTOR, |a| a.load(Ordering::SeqCst));
        self.fire(v, 1);
    }
    fn config(&self) {
        self.fire(self.config_vector.load(Ordering::SeqCst), 2);
    }
}

/// Moves a device's BAR 0 from `old` to `new` (its MMIO range and notification ioeventfds);
/// false when it cannot (the place is taken), in which case the device stays where it was.
pub type BarMover = Box<dyn Fn(u64, u64) -> bool + Send + Sync>;

/// What the VMM wires a device to.
pub struct Wiring {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Where BAR 0 is.
    pub bar_addr: u32,
    /// One eventfd per queue, registered as ioeventfds at [`notify_offset`].
    pub queue_evts: Vec<EventFd>,
    /// One irqfd per MSI-X vector (queues + 1), on GSIs `gsi_base..`.
    pub irqfds: Vec<EventFd>,
    /// First GSI of the vectors.
    pub gsi_base: u32,
    /// Keeps KVM's MSI routes in step with the table.
    pub router: Arc<dyn MsiRouter>,
    /// The INTx irqfd and its line (I/O APIC pin).
    pub intx: (EventFd, u8),
    /// Follows the guest when it moves BAR 0.
    pub mover: BarMover,
}

/// A virtio device on PCI.
pub struct VirtioPci {
    config: ConfigSpace,
    msix_cap: usize,
    cfg_cap: usize,
    irq: Arc<Irq>,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queue_evts: Vec<EventFd>,
    router: Arc<dyn MsiRouter>,
    gsi_base: u32,
    device_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueCfg>,
    /// The running device's worker control (Some while the device is active).
    ctl: Option<Arc<WorkerCtl>>,
    /// Paused by the VMM: a worker started now starts parked.
    paused: bool,
    bar_addr: u32,
    mover: BarMover,
    warned_move: bool,
}

/// A virtqueue as saved: what the driver set up, and where the device was in the rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtqueueState {
    /// The largest size the device offers (checked against the device restored into).
    pub max_size: u16,
    /// The size the driver chose.
    pub size: u16,
    /// queue_enable.
    pub ready: bool,
    /// MSI-X vector, or [`NO_VECTOR`].
    pub vector: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// Next available-ring entry the device takes (active devices; 0 otherwise).
    pub next_avail: u16,
    /// Next used-ring entry the device fills (active devices; 0 otherwise).
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX in use.
    pub event_idx: bool,
}

/// A virtio-pci device as saved: its PCI configuration space and MSI-X table, where its BAR
/// is, the common configuration registers, the queues and the device's own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioPciState {
    /// The virtio device type (1 network, 2 block, 4 entropy).
    pub device_type: u16,
    /// PCI configuration space.
    pub config: ConfigSpaceState,
    /// The MSI-X table and pending bits.
    pub msix: MsixTableState,
    /// Where BAR 0 is mapped (the guest may have moved it).
    pub bar_addr: u32,
    /// device_feature_select.
    pub device_feature_select: u32,
    /// driver_feature_select.
    pub driver_feature_select: u32,
    /// The features the driver accepted (or is writing).
    pub driver_features: u64,
    /// device_status.
    pub status: u8,
    /// config_generation.
    pub config_generation: u8,
    /// queue_select.
    pub queue_select: u16,
    /// msix_config: the configuration-change vector.
    pub config_vector: u16,
    /// The ISR bits not yet read (INTx).
    pub isr: u8,
    /// Whether the device was serving its queues (DRIVER_OK accepted).
    pub active: bool,
    /// Every queue, in order.
    pub queues: Vec<VirtqueueState>,
    /// The device's own state.
    pub device: DeviceState,
}

fn vendor_cap(cfg_type: u8, offset: u32, length: u32, extra: Option<u32>) -> Vec<u8> {
    // Body after id and next: cap_len, cfg_type, bar, id, 2 padding, offset, length [, mult].
    let cap_len: u8 = if extra.is_some() { 20 } else { 16 };
    let mut b = vec![cap_len, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&length.to_le_bytes());
    if let Some(m) = extra {
        b.extend_from_slice(&m.to_le_bytes());
    }
    b
}

impl VirtioPci {
    /// A transport for `device` wired as `w`.
    pub fn new(device: Box<dyn VirtioDevice>, w: Wiring) -> VirtioPci {
        let ty = device.device_type();
        let class = match ty {
            1 => [0x02, 0x00, 0x00],
            2 => [0x01, 0x80, 0x00],
            _ => [0xff, 0x00, 0x00],
        };
        let bar_addr = w.bar_addr;
        let mut config = ConfigSpace::new(VIRTIO_VENDOR, 0x1040 + ty, class, 1);
        config.set_subsystem(VIRTIO_VENDOR, 0x40);
        config.set_interrupt(1, w.intx.1);
        config.set_bar(0, w.bar_addr, BAR_SIZE);
        let nq = device.queue_max_sizes().len();
        let ro = |n: usize| vec![0u8; n];
        let c = vendor_cap(1, COMMON as u32, COMMON_LEN as u32, None);
        config.add_capability(CAP_VENDOR, &c, &ro(c.len()));
        let c = vendor_cap(
            2,
            NOTIFY as u32,
            (NOTIFY_MULTIPLIER as u32) * nq as u32,
            Some(NOTIFY_MULTIPLIER as u32),
        );
        config.add_capability(CAP_VENDOR, &c, &ro(c.len()));
        let c = vendor_cap(3, ISR as u32, 1, None);
        config.add_capability(CAP_VENDOR, &c, &ro(c.len()));
        let c = vendor_cap(4, DEVICE_CFG as u32, DEVICE_CFG_LEN as u32, None);
        config.add_capability(CAP_VENDOR, &c, &ro(c.len()));
        let table = MsixTable::new(w.irqfds.len() as u16);
        let (body, mask) = table.capability(0, MSIX_TABLE as u32, MSIX_PBA as u32);
        let msix_cap = config.add_capability(wv_pci::msix::CAP_ID, &body, &mask);
        // VIRTIO_PCI_CAP_PCI_CFG: a window onto BAR 0 through configuration space. bar,
        // offset, length and the 4 data bytes are the driver's to write.
        let c = vendor_cap(5, 0, 0, Some(0));
        let mut mask = vec![0u8; c.len()];
        mask[2] = 0xff; // bar
        mask[6..10].fill(0xff); // offset
        mask[10..14].fill(0xff); // length
        mask[14..18].fill(0xff); // pci_cfg_data
        let cfg_cap = config.add_capability(CAP_VENDOR, &c, &mask);
        let queues: Vec<QueueCfg> = device
            .queue_max_sizes()
            .into_iter()
            .map(QueueCfg::new)
            .collect();
        let irq = Arc::new(Irq {
            msix: Mutex::new(table),
            irqfds: w.irqfds,
            queue_vectors: (0..queues.len())
                .map(|_| AtomicU16::new(NO_VECTOR))
                .collect(),
            config_vector: AtomicU16::new(NO_VECTOR),
            isr: AtomicU8::new(0),
            intx: w.intx.0,
            counters: Arc::default(),
        });
        VirtioPci {
            config,
            msix_cap,
            cfg_cap,
            irq,
            device_features: device.features() | F_VERSION_1,
            device,
            mem: w.mem,
            queue_evts: w.queue_evts,
            router: w.router,
            gsi_base: w.gsi_base,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues,
            ctl: None,
            paused: false,
            bar_addr,
            mover: w.mover,
            warned_move: false,
        }
    }

    /// What the device's data path did (notifications, interrupts).
    pub fn counters(&self) -> Arc<crate::device::DeviceCounters> {
        self.irq.counters.clone()
    }

    /// The data path control of a device a vhost-user backend serves.
    pub fn path_control(&self) -> Option<Arc<crate::vhost_user::PathControl>> {
        self.device.path_control()
    }

    /// The device status byte.
    pub fn status(&self) -> u8 {
        self.status | self.worker_status()
    }

    /// DEVICE_NEEDS_RESET if the device's worker asked for it (a driver that broke the rules).
    fn worker_status(&self) -> u8 {
        if self.irq.counters.needs_reset.load(Ordering::SeqCst) {
            status::DEVICE_NEEDS_RESET
        } else {
            0
        }
    }

    fn selected(&mut self) -> Option<&mut QueueCfg> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn valid_vector(&self, v: u16) -> u16 {
        if usize::from(v) < self.irq.irqfds.len() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn reset(&mut self) {
        if self.ctl.take().is_some() {
            self.device.reset();
        }
        self.irq.counters.needs_reset.store(false, Ordering::SeqCst);
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.status = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueCfg::new(q.max);
        }
        for v in &self.irq.queue_vectors {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
        self.irq.config_vector.store(NO_VECTOR, Ordering::SeqCst);
        self.irq.isr.store(0, Ordering::SeqCst);
    }

    fn set_status(&mut self, v: u8) {
        if v == 0 {
            if self.status != 0 {
                self.irq.counters.resets.fetch_add(1, Ordering::Relaxed);
            }
            self.reset();
            return;
        }
        let newly = v & !self.status;
        let mut v = v;
        if newly & status::FEATURES_OK != 0 {
            let offered = self.device_features;
            if self.driver_features & !offered != 0 || self.driver_features & F_VERSION_1 == 0 {
                v &= !status::FEATURES_OK;
            }
        }
        self.status = v;
        if newly & status::DRIVER_OK != 0 && v & status::FEATURES_OK != 0 && self.ctl.is_none() {
            if let Err(e) = self.activate() {
                eprintln!("wv: virtio device {}: {e}", self.device.device_type());
                self.status |= status::DEVICE_NEEDS_RESET;
                self.irq.config();
            }
        }
    }

    fn activate(&mut self) -> Result<(), String> {
        let mut active = Vec::with_capacity(self.queues.len());
        for (i, c) in self.queues.iter().enumerate() {
            let mut q = Queue::new(c.max).map_err(|e| format!("queue {i}: {e}"))?;
            if c.ready {
                q.try_set_size(c.size)
                    .map_err(|e| format!("queue {i} size {}: {e}", c.size))?;
                q.try_set_desc_table_address(GuestAddress(c.desc))
                    .map_err(|e| format!("queue {i}: {e}"))?;
                q.try_set_avail_ring_address(GuestAddress(c.avail))
                    .map_err(|e| format!("queue {i}: {e}"))?;
                q.try_set_used_ring_address(GuestAddress(c.used))
                    .map_err(|e| format!("queue {i}: {e}"))?;
                q.set_ready(true);
                if !q.is_valid(&self.mem) {
                    return Err(format!(
                        "queue {i}: rings outside guest memory or misaligned"
                    ));
                }
            }
            active.push(self.active_queue(i, q)?);
        }
        self.start(active)
    }

    /// Hands `queues` to the device, its worker parked if the transport is paused.
    fn start(&mut self, queues: Vec<ActiveQueue>) -> Result<(), String> {
        let ctl = WorkerCtl::new(self.paused).map_err(|e| format!("worker control: {e}"))?;
        let irq: Arc<dyn Interrupt> = self.irq.clone();
        self.device.activate(
            self.mem.clone(),
            self.driver_features,
            queues,
            irq,
            ctl.clone(),
        )?;
        if self.paused {
            // Parked before it returns, so a paused device can be saved at once.
            ctl.wait_paused();
        }
        self.ctl = Some(ctl);
        Ok(())
    }

    fn active_queue(&self, i: usize, queue: Queue) -> Result<ActiveQueue, String> {
        Ok(ActiveQueue {
            queue,
            evt: self.queue_evts[i]
                .try_clone()
                .map_err(|e| format!("queue {i}: {e}"))?,
            counters: self.irq.counters.clone(),
        })
    }

    fn common_read(&mut self, off: u64, data: &mut [u8]) {
        let q = self.queues.get(usize::from(self.queue_select)).copied();
        let v: u64 = match (off, data.len()) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => match self.device_feature_select {
                0 => self.device_features & 0xffff_ffff,
                1 => self.device_features >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(self.irq.config_vector.load(Ordering::SeqCst)),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(self.status | self.worker_status()),
            (0x15, 1) => u64::from(self.config_generation),
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => q.map_or(0, |q| u64::from(q.size)),
            (0x1a, 2) => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector)),
            (0x1c, 2) => q.map_or(0, |q| u64::from(q.ready)),
            (0x1e, 2) => u64::from(self.queue_select),
            (0x20, 4) => q.map_or(0, |q| q.desc & 0xffff_ffff),
            (0x24, 4) => q.map_or(0, |q| q.desc >> 32),
            (0x28, 4) => q.map_or(0, |q| q.avail & 0xffff_ffff),
            (0x2c, 4) => q.map_or(0, |q| q.avail >> 32),
            (0x30, 4) => q.map_or(0, |q| q.used & 0xffff_ffff),
            (0x34, 4) => q.map_or(0, |q| q.used >> 32),
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
    }

    fn common_write(&mut self, off: u64, data: &[u8]) {
        let mut w = [0u8; 8];
        w[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(w);
        // Queue registers may change only before the driver says it is ready.
        let can_setup = self.status & status::DRIVER_OK == 0;
        let can_feature = self.status & status::FEATURES_OK == 0;
        match (off, data.len()) {
            (0x00, 4) => self.device_feature_select = v as u32,
            (0x08, 4) => self.driver_feature_select = v as u32,
            (0x0c, 4) if can_feature => match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                _ => {}
            },
            (0x10, 2) => {
                let vec = self.valid_vector(v as u16);
                self.irq.config_vector.store(vec, Ordering::SeqCst);
            }
            (0x14, 1) => self.set_status(v as u8),
            (0x16, 2) => self.queue_select = v as u16,
            (0x18, 2) if can_setup => {
                if let Some(q) = self.selected() {
                    let s = v as u16;
                    if s.is_power_of_two() && s <= q.max && !q.ready {
                        q.size = s;
                    }
                }
            }
            (0x1a, 2) => {
                let vec = self.valid_vector(v as u16);
                let sel = usize::from(self.queue_select);
                if let Some(q) = self.queues.get_mut(sel) {
                    q.vector = vec;
                    self.irq.queue_vectors[sel].store(vec, Ordering::SeqCst);
                }
            }
            (0x1c, 2) if can_setup && v == 1 => {
                if let Some(q) = self.selected() {
                    q.ready = true;
                }
            }
            (0x20..=0x37, 4) if can_setup => {
                if let Some(q) = self.selected() {
                    if q.ready {
                        return;
                    }
                    let field = match off & !7 {
                        0x20 => &mut q.desc,
                        0x28 => &mut q.avail,
                        _ => &mut q.used,
                    };
                    *field = if off & 4 == 0 {
                        (*field & !0xffff_ffff) | v
                    } else {
                        (*field & 0xffff_ffff) | (v << 32)
                    };
                }
            }
            _ => {}
        }
    }

    fn update_routes(&self) {
        let msgs = self
            .irq
            .msix
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .messages();
        if let Err(e) = self.router.set_routes(self.gsi_base, &msgs) {
            eprintln!("wv: updating MSI routes failed: {e}");
        }
    }
}

/// MSI-X message control: enable and function mask.
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;

impl VirtioPci {
    /// The device's kind, for messages.
    fn kind(&self) -> &'static str {
        match self.device.device_type() {
            1 => "virtio-net",
            2 => "virtio-blk",
            4 => "virtio-rng",
            5 => "virtio-balloon",
            _ => "virtio",
        }
    }

    /// Asks the device's worker to pause and returns at once; [`VirtioPci::pause`] waits.
    /// The VMM asks every device first and then waits for each, so that they drain together.
    pub fn begin_pause(&mut self) {
        self.paused = true;
        if let Some(c) = &self.ctl {
            c.request_pause();
        }
    }

    /// Pauses the device: returns once its worker has finished the chain it was serving and
    /// parked. It takes no new chain until [`VirtioPci::resume`]; notifications that arrive
    /// meanwhile are kept and served then. A device the driver has not started: nothing to
    /// wait for (it starts parked should the driver start it while paused).
    pub fn pause(&mut self) {
        self.begin_pause();
        if let Some(c) = &self.ctl {
            c.wait_paused();
        }
    }

    /// Lets a paused (or restored) device serve its queues again.
    pub fn resume(&mut self) {
        self.paused = false;
        if let Some(c) = &self.ctl {
            c.resume();
        }
    }

    /// Whether the device is paused (by [`VirtioPci::pause`] or a restore) and, if it was
    /// started, its worker has parked.
    pub fn is_paused(&self) -> bool {
        self.paused && self.ctl.as_ref().is_none_or(|c| c.is_paused())
    }

    /// The device's configuration changed on the host's side (a balloon's target): bumps
    /// `config_generation` and, once the driver is running, raises the configuration-change
    /// interrupt (MSI-X vector `msix_config`, or INTx with ISR bit 1).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & status::DRIVER_OK != 0 {
            self.irq.config();
        }
    }

    /// Takes the device off the bus for good (a hot-unplug the guest acknowledged): waits for
    /// the chain its worker is serving, if any, then stops the worker and releases what the
    /// device took (as a driver's reset does). Dropping the transport afterwards closes its
    /// eventfds and the device's backend.
    pub fn unplug(&mut self) {
        self.pause();
        self.reset();
    }

    /// Where BAR 0 is mapped now (the guest may have moved it).
    pub fn bar_addr(&self) -> u32 {
        self.bar_addr
    }

    /// Whether the driver started the device (DRIVER_OK accepted) and it serves its queues.
    pub fn is_active(&self) -> bool {
        self.ctl.is_some()
    }

    /// Checks `s` against this device and returns the queues to start (when `s.active`), the
    /// configuration space and the MSI-X table to install; nothing is changed.
    #[allow(clippy::type_complexity)]
    fn check_state(
        &self,
        s: &VirtioPciState,
    ) -> Result<(Option<Vec<Queue>>, ConfigSpace, MsixTable), String> {
        let ty = self.device.device_type();
        if s.device_type != ty {
            return Err(format!(
                "a state of virtio device type {} cannot be restored into a {} device",
                s.device_type,
                self.kind()
            ));
        }
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "{} state: {} queues, but the device has {}",
                self.kind(),
                s.queues.len(),
                self.queues.len()
            ));
        }
        let nvec = self.irq.irqfds.len();
        let vector_ok = |v: u16| v == NO_VECTOR || usize::from(v) < nvec;
        if !vector_ok(s.config_vector) {
            return Err(format!(
                "{} state: configuration vector {} is beyond the {nvec}-entry MSI-X table",
                self.kind(),
                s.config_vector
            ));
        }
        if s.isr & !3 != 0 {
            return Err(format!(
                "{} state: ISR {:#x} has undefined bits",
                self.kind(),
                s.isr
            ));
        }
        if s.status & status::FEATURES_OK != 0 {
            let extra = s.driver_features & !self.device_features;
            if extra != 0 {
                return Err(format!(
                    "{} state: the driver accepted features {extra:#x} that this device does not offer",
                    self.kind()
                ));
            }
            if s.driver_features & F_VERSION_1 == 0 {
                return Err(format!(
                    "{} state: features accepted without VERSION_1",
                    self.kind()
                ));
            }
        }
        let started = status::DRIVER_OK | status::FEATURES_OK;
        if s.active && s.status & started != started {
            return Err(format!(
                "{} state: active, but the status {:#x} lacks DRIVER_OK or FEATURES_OK",
                self.kind(),
                s.status
            ));
        }
        if s.bar_addr == 0 || !s.bar_addr.is_multiple_of(BAR_SIZE) {
            return Err(format!(
                "{} state: BAR 0 at {:#x} is not a {BAR_SIZE:#x}-aligned address",
                self.kind(),
                s.bar_addr
            ));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, (q, own)) in s.queues.iter().zip(&self.queues).enumerate() {
            let what = |e: String| format!("{} state: queue {i}: {e}", self.kind());
            if q.max_size != own.max {
                return Err(what(format!(
                    "maximum size {} saved, {} here",
                    q.max_size, own.max
                )));
            }
            if q.size == 0 || !q.size.is_power_of_two() || q.size > own.max {
                return Err(what(format!(
                    "size {} is not a power of two up to {}",
                    q.size, own.max
                )));
            }
            if !vector_ok(q.vector) {
                return Err(what(format!(
                    "vector {} is beyond the {nvec}-entry MSI-X table",
                    q.vector
                )));
            }
            if !s.active {
                continue;
            }
            let queue = if q.ready {
                let in_flight = q.next_avail.wrapping_sub(q.next_used);
                if in_flight > q.size {
                    return Err(what(format!(
                        "{in_flight} chains in flight (next_avail {}, next_used {}) in a queue of {}",
                        q.next_avail, q.next_used, q.size
                    )));
                }
                let qs = QueueState {
                    max_size: q.max_size,
                    next_avail: q.next_avail,
                    next_used: q.next_used,
                    event_idx_enabled: q.event_idx,
                    size: q.size,
                    ready: true,
                    desc_table: q.desc,
                    avail_ring: q.avail,
                    used_ring: q.used,
                };
                let queue = Queue::try_from(qs).map_err(|e| what(e.to_string()))?;
                if !queue.is_valid(&self.mem) {
                    return Err(what("rings outside guest memory or misaligned".to_string()));
                }
                queue
            } else {
                Queue::new(own.max).map_err(|e| what(e.to_string()))?
            };
            queues.push(queue);
        }
        let mut config = self.config.clone();
        config
            .restore(s.config.clone())
            .map_err(|e| format!("{}: {e}", self.kind()))?;
        let mut table = self
            .irq
            .msix
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        table
            .restore(s.msix.clone())
            .map_err(|e| format!("{}: {e}", self.kind()))?;
        let mut c = [0u8; 2];
        config.read(self.msix_cap + 2, &mut c);
        let ctrl = u16::from_le_bytes(c);
        if (ctrl & MSIX_ENABLE != 0) != s.msix.enabled
            || (ctrl & MSIX_FUNCTION_MASK != 0) != s.msix.function_masked
        {
            return Err(format!(
                "{} state: the MSI-X capability ({ctrl:#06x}) and table disagree on enable and mask",
                self.kind()
            ));
        }
        Ok((s.active.then_some(queues), config, table))
    }
}

impl Snapshot for VirtioPci {
    type State = VirtioPciState;

    /// The transport's and device's state; a started device must be paused first.
    fn save(&self) -> Result<VirtioPciState, String> {
        let positions = match &self.ctl {
            None => None,
            Some(c) => Some(c.parked_queues().ok_or_else(|| {
                format!(
                    "{}: the device is running; pause it before saving",
                    self.kind()
                )
            })?),
        };
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let p = positions.as_ref().and_then(|p| p.get(i));
                VirtqueueState {
                    max_size: c.max,
                    size: c.size,
                    ready: c.ready,
                    vector: c.vector,
                    desc: c.desc,
                    avail: c.avail,
                    used: c.used,
                    next_avail: p.map_or(0, |p| p.next_avail),
                    next_used: p.map_or(0, |p| p.next_used),
                    event_idx: p.is_some_and(|p| p.event_idx_enabled),
                }
            })
            .collect();
        Ok(VirtioPciState {
            device_type: self.device.device_type(),
            config: self.config.save()?,
            msix: self
                .irq
                .msix
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .save()?,
            bar_addr: self.bar_addr,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            status: self.status,
            config_generation: self.config_generation,
            queue_select: self.queue_select,
            config_vector: self.irq.config_vector.load(Ordering::SeqCst),
            isr: self.irq.isr.load(Ordering::SeqCst),
            active: self.ctl.is_some(),
            queues,
            device: self.device.save_state(),
        })
    }

    /// Puts the transport and device into `s`, checked in full first: a state that does not
    /// fit is refused and nothing changes. BAR 0's MMIO window and notifications move to the
    /// saved address, KVM's MSI routes are set from the saved table, and a device that was
    /// active is started again on its saved ring positions, without the driver negotiating
    /// anew. The device is left paused: [`VirtioPci::resume`] starts it serving. (Only a host
    /// failure — KVM refusing the routes, a worker thread that cannot start — is reported
    /// after the state was taken.)
    fn restore(&mut self, s: VirtioPciState) -> Result<(), String> {
        let (queues, config, table) = self.check_state(&s)?;
        let old_bar = self.bar_addr;
        if s.bar_addr != old_bar && !(self.mover)(u64::from(old_bar), u64::from(s.bar_addr)) {
            return Err(format!(
                "{}: cannot put BAR 0 at {:#x}: the range is taken",
                self.kind(),
                s.bar_addr
            ));
        }
        if let Err(e) = self.device.restore_state(s.device.clone()) {
            if s.bar_addr != old_bar {
                (self.mover)(u64::from(s.bar_addr), u64::from(old_bar));
            }
            return Err(e);
        }
        // Everything is checked: from here the state is taken.
        if self.ctl.take().is_some() {
            self.device.reset();
        }
        self.paused = true;
        self.bar_addr = s.bar_addr;
        self.config = config;
        *self.irq.msix.lock().unwrap_or_else(|p| p.into_inner()) = table;
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features;
        self.status = s.status;
        self.config_generation = s.config_generation;
        self.queue_select = s.queue_select;
        self.irq
            .config_vector
            .store(s.config_vector, Ordering::SeqCst);
        self.irq.isr.store(s.isr, Ordering::SeqCst);
        for (i, q) in s.queues.iter().enumerate() {
            let c = &mut self.queues[i];
            c.size = q.size;
            c.ready = q.ready;
            c.vector = q.vector;
            c.desc = q.desc;
            c.avail = q.avail;
            c.used = q.used;
            self.irq.queue_vectors[i].store(q.vector, Ordering::SeqCst);
        }
        let msgs = self
            .irq
            .msix
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .messages();
        self.router
            .set_routes(self.gsi_base, &msgs)
            .map_err(|e| format!("{}: setting the MSI routes: {e}", self.kind()))?;
        if let Some(queues) = queues {
            let active = queues
                .into_iter()
                .enumerate()
                .map(|(i, q)| self.active_queue(i, q))
                .collect::<Result<Vec<_>, _>>()?;
            if let Err(e) = self.start(active) {
                self.status |= status::DEVICE_NEEDS_RESET;
                return Err(format!("{}: restarting the device: {e}", self.kind()));
            }
        }
        Ok(())
    }
}

impl VirtioPci {
    /// The PCI-configuration access window: (BAR-0 offset, length) if the driver pointed it at
    /// BAR 0 with a length of 1, 2 or 4 that the data bytes can carry.
    fn cfg_window(&self) -> Option<(u64, usize)> {
        let at = self.cfg_cap;
        let mut b = [0u8; 12];
        self.config.read(at + 4, &mut b[0..4]);
        self.config.read(at + 8, &mut b[4..8]);
        self.config.read(at + 12, &mut b[8..12]);
        let bar = b[0];
        let offset = u64::from(u32::from_le_bytes([b[4], b[5], b[6], b[7]]));
        let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize;
        (bar == 0 && matches!(len, 1 | 2 | 4) && offset + len as u64 <= u64::from(BAR_SIZE))
            .then_some((offset, len))
    }

    /// When memory decoding is on and BAR 0 holds a new address (not the all-ones sizing
    /// pattern), moves the device there.
    fn follow_bar(&mut self) {
        let Some(bar) = self.config.bar(0) else {
            return;
        };
        let decoding = self.config.command() & 2 != 0;
        if !decoding || bar.addr == self.bar_addr || bar.addr == !(bar.size - 1) {
            return;
        }
        if (self.mover)(u64::from(self.bar_addr), u64::from(bar.addr)) {
            self.bar_addr = bar.addr;
        } else {
            self.irq
                .counters
                .refused_bar_moves
                .fetch_add(1, Ordering::Relaxed);
        }
        if self.bar_addr != bar.addr && !self.warned_move {
            self.warned_move = true;
            eprintln!("wv: the guest moved a virtio BAR to {:#x}, which is taken or outside the PCI MMIO window; the device stays at {:#x}", bar.addr, self.bar_addr);
        }
    }

    fn touches_cfg_data(&self, offset: usize, len: usize) -> bool {
        let data = self.cfg_cap + 16;
        offset < data + 4 && offset + len > data
    }
}

impl PciDevice for VirtioPci {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if self.touches_cfg_data(offset, data.len()) {
            // Reading pci_cfg_data reads the BAR through the window.
            if let Some((bar_off, len)) = self.cfg_window() {
                let mut v = [0u8; 4];
                self.mmio_read(bar_off, &mut v[..len]);
                self.config
                    .bytes_mut(self.cfg_cap + 16, 4)
                    .copy_from_slice(&v);
            }
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        self.follow_bar();
        if self.touches_cfg_data(offset, data.len()) {
            if let Some((bar_off, len)) = self.cfg_window() {
                let mut v = [0u8; 4];
                self.config.read(self.cfg_cap + 16, &mut v);
                self.mmio_write(bar_off, &v[..len]);
            }
        }
        let ctrl_at = self.msix_cap + 2;
        if offset < ctrl_at + 2 && offset + data.len() > ctrl_at {
            let mut c = [0u8; 2];
            self.config.read(ctrl_at, &mut c);
            let fire = self
                .irq
                .msix
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_control(u16::from_le_bytes(c));
            self.update_routes();
            self.irq.fire_vectors(&fire);
        }
    }
}

impl MmioDevice for VirtioPci {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < COMMON + COMMON_LEN => self.common_read(o - COMMON, data),
            ISR if data.len() == 1 => data[0] = self.irq.isr.swap(0, Ordering::SeqCst),
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG, data)
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self
                .irq
                .msix
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read_table((o - MSIX_TABLE) as usize, data),
            o if o >= MSIX_PBA => self
                .irq
                .msix
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .read_pba((o - MSIX_PBA) as usize, data),
            _ => {}
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON + COMMON_LEN => self.common_write(o - COMMON, data),
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG, data)
            }
            o if (NOTIFY..MSIX_TABLE).contains(&o) => {
                // Normally taken by the ioeventfd; here only if that registration is missing.
                let q = ((o - NOTIFY) / NOTIFY_MULTIPLIER) as usize;
                if let Some(evt) = self.queue_evts.get(q) {
                    let _ = evt.write(1);
                }
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => {
                let (_, fire) = self
                    .irq
                    .msix
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write_table((o - MSIX_TABLE) as usize, data);
                // A vector is only delivered once unmasked, so KVM's route is refreshed when
                // the vector-control word is written (not on every address/data write).
                let field = ((o - MSIX_TABLE) % 16) as usize;
                if field + data.len() > 12 {
                    self.update_routes();
                }
                self.irq.fire_vectors(&fire);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use vm_memory::Bytes;
    use wv_pci::MsixMessage;

    struct NoRoutes;
    impl MsiRouter for NoRoutes {
        fn set_routes(&self, _: u32, _: &[MsixMessage]) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn rng_pci() -> (VirtioPci, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let w = Wiring {
            mem: mem.clone(),
            bar_addr: 0xc000_0000,
            queue_evts: vec![evt()],
            irqfds: vec![evt(), evt()],
            gsi_base: 24,
            router: Arc::new(NoRoutes),
            intx: (evt(), 10),
            mover: Box::new(|_, new| new != 0xd000_0000),
        };
        (VirtioPci::new(Box::new(Rng::default()), w), mem)
    }

    fn w32(d: &mut VirtioPci, off: u64, v: u32) {
        d.mmio_write(off, &v.to_le_bytes());
    }
    fn w16(d: &mut VirtioPci, off: u64, v: u16) {
        d.mmio_write(off, &v.to_le_bytes());
    }
    fn r32(d: &mut VirtioPci, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn status(d: &mut VirtioPci) -> u8 {
        let mut b = [0u8; 1];
        d.mmio_read(0x14, &mut b);
        b[0]
    }

    fn negotiate(d: &mut VirtioPci, features_hi: u32) {
        d.mmio_write(0x14, &[status::ACKNOWLEDGE | status::DRIVER]);
        w32(d, 0x08, 1);
        w32(d, 0x0c, features_hi);
        d.mmio_write(
            0x14,
            &[status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK],
        );
    }

    #[test]
    fn identity_and_capabilities() {
        let (mut d, _) = rng_pci();
        let mut id = [0u8; 4];
        d.config_read(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1044_1af4);
        w32(&mut d, 0x00, 1);
        assert_eq!(r32(&mut d, 0x04), 1, "VERSION_1 offered");
        let mut n = [0u8; 2];
        d.mmio_read(0x12, &mut n);
        assert_eq!(u16::from_le_bytes(n), 1);
    }

    #[test]
    fn features_ok_requires_version_1_and_offered_bits() {
        let (mut d, _) = rng_pci();
        negotiate(&mut d, 0);
        assert_eq!(
            status(&mut d) & status::FEATURES_OK,
            0,
            "legacy driver refused"
        );
        d.mmio_write(0x14, &[0]);
        negotiate(&mut d, 1 | 2);
        assert_eq!(
            status(&mut d) & status::FEATURES_OK,
            0,
            "unoffered bit refused"
        );
        d.mmio_write(0x14, &[0]);
        negotiate(&mut d, 1);
        assert_ne!(status(&mut d) & status::FEATURES_OK, 0);
    }

    fn setup_queue(d: &mut VirtioPci, size: u16, desc: u64, avail: u64, used: u64) {
        w16(d, 0x16, 0);
        w16(d, 0x18, size);
        for (off, a) in [(0x20, desc), (0x28, avail), (0x30, used)] {
            w32(d, off, a as u32);
            w32(d, off + 4, (a >> 32) as u32);
        }
        w16(d, 0x1c, 1);
    }

    #[test]
    fn serves_an_entropy_request_and_resets() {
        let (mut d, mem) = rng_pci();
        negotiate(&mut d, 1);
        setup_queue(&mut d, 16, 0x1000, 0x2000, 0x3000);
        // One write-only descriptor of 64 bytes at 0x8000 in the avail ring.
        mem.write_obj(0x8000u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(64u32, GuestAddress(0x1008)).unwrap();
        mem.write_obj(2u16, GuestAddress(0x100c)).unwrap(); // VRING_DESC_F_WRITE
        mem.write_obj(0u16, GuestAddress(0x2004)).unwrap(); // ring[0] = head 0
        mem.write_obj(1u16, GuestAddress(0x2002)).unwrap(); // avail idx
        d.mmio_write(0x14, &[0x0f]);
        assert_eq!(status(&mut d), 0x0f);
        let mut used_idx = 0u16;
        for _ in 0..500 {
            used_idx = mem.read_obj(GuestAddress(0x3002)).unwrap();
            if used_idx == 1 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(used_idx, 1, "the request was served");
        let len: u32 = mem.read_obj(GuestAddress(0x3008)).unwrap();
        assert_eq!(len, 64);
        let mut buf = [0u8; 64];
        mem.read_slice(&mut buf, GuestAddress(0x8000)).unwrap();
        assert_ne!(buf, [0u8; 64]);
        // INTx path (MSI-X disabled): ISR bit 0 is set and cleared by reading it.
        let mut isr = [0u8; 1];
        d.mmio_read(ISR, &mut isr);
        assert_eq!(isr[0] & 1, 1);
        d.mmio_read(ISR, &mut isr);
        assert_eq!(isr[0], 0);
        // Reset frees the queues and returns everything to its initial state.
        d.mmio_write(0x14, &[0]);
        assert_eq!(status(&mut d), 0);
        assert!(!d.is_active());
        let mut ready = [0u8; 2];
        d.mmio_read(0x1c, &mut ready);
        assert_eq!(u16::from_le_bytes(ready), 0);
    }

    #[test]
    fn rings_outside_memory_need_reset() {
        let (mut d, _) = rng_pci();
        negotiate(&mut d, 1);
        setup_queue(&mut d, 16, 1 << 40, 0x2000, 0x3000);
        d.mmio_write(0x14, &[0x0f]);
        assert_ne!(status(&mut d) & status::DEVICE_NEEDS_RESET, 0);
        assert!(!d.is_active());
    }

    #[test]
    fn bar0_moves_only_with_decoding_on_and_not_while_sizing() {
        let (mut d, _) = rng_pci();
        d.config_write(0x10, &[0xff; 4]);
        assert_eq!(d.bar_addr, 0xc000_0000, "sizing is not a move");
        d.config_write(0x10, &0xc010_0000u32.to_le_bytes());
        assert_eq!(d.bar_addr, 0xc000_0000, "decoding is off");
        d.config_write(0x04, &2u16.to_le_bytes());
        assert_eq!(d.bar_addr, 0xc010_0000, "moved when decoding was enabled");
        d.config_write(0x10, &0xd000_0000u32.to_le_bytes());
        assert_eq!(
            d.bar_addr, 0xc010_0000,
            "the mover refused: the device stays"
        );
    }

    /// What the adversarial guest does to a transport (docs/DEVICES.md, "Adversarial
    /// guest") leaves a trace in the device's counters: refused BAR moves, resets, and
    /// interrupts through MSI-X entries holding garbage addresses.
    #[test]
    fn hostile_moves_resets_and_msi_garbage_are_counted() {
        let (mut d, _) = rng_pci();
        let c = d.counters();
        d.config_write(0x04, &2u16.to_le_bytes());
        d.config_write(0x10, &0xd000_0000u32.to_le_bytes());
        assert_eq!(d.bar_addr, 0xc000_0000);
        assert_eq!(c.refused_bar_moves.load(Ordering::Relaxed), 1);
        d.config_write(0x10, &[0xff; 4]);
        assert_eq!(c.refused_bar_moves.load(Ordering::Relaxed), 1, "sizing");
        d.config_write(0x10, &0xc000_0000u32.to_le_bytes());
        // Entry 0 garbage, entry 1 a real LAPIC address.
        for (v, lo, hi) in [(0u64, 0x1234_5000u32, 0xffff_ffffu32), (1, 0xfee0_0000, 0)] {
            let at = MSIX_TABLE + 16 * v;
            w32(&mut d, at, lo);
            w32(&mut d, at + 4, hi);
            w32(&mut d, at + 8, 0xffff_ffff);
            w32(&mut d, at + 12, 0);
        }
        d.config_write(d.msix_cap + 2, &MSIX_ENABLE.to_le_bytes());
        negotiate(&mut d, 1);
        w16(&mut d, 0x10, 0);
        d.irq.config();
        w16(&mut d, 0x10, 1);
        d.irq.config();
        assert_eq!(c.interrupts.load(Ordering::Relaxed), 2);
        assert_eq!(c.bad_msi.load(Ordering::Relaxed), 1);
        d.mmio_write(0x14, &[0]);
        d.mmio_write(0x14, &[0]);
        assert_eq!(
            c.resets.load(Ordering::Relaxed),
            1,
            "a reset of a reset device"
        );
    }

    #[test]
    fn pci_cfg_window_reaches_bar0() {
        let (mut d, _) = rng_pci();
        // Find the PCI_CFG capability (vendor cap, cfg_type 5).
        let mut p = {
            let mut b = [0u8; 1];
            d.config_read(0x34, &mut b);
            b[0] as usize
        };
        let mut cap = 0;
        while p != 0 {
            let mut h = [0u8; 4];
            d.config_read(p, &mut h);
            if h[0] == CAP_VENDOR && h[3] == 5 {
                cap = p;
            }
            p = h[1] as usize;
        }
        assert_ne!(cap, 0, "VIRTIO_PCI_CAP_PCI_CFG present");
        // Window on the common config's num_queues (offset 0x12, 2 bytes).
        d.config_write(cap + 4, &[0]);
        d.config_write(cap + 8, &0x12u32.to_le_bytes());
        d.config_write(cap + 12, &2u32.to_le_bytes());
        let mut v = [0u8; 4];
        d.config_read(cap + 16, &mut v);
        assert_eq!(u16::from_le_bytes([v[0], v[1]]), 1);
        // Writing through it: device status = ACKNOWLEDGE.
        d.config_write(cap + 8, &0x14u32.to_le_bytes());
        d.config_write(cap + 12, &1u32.to_le_bytes());
        d.config_write(cap + 16, &[1, 0, 0, 0]);
        assert_eq!(status(&mut d), 1);
        // A bad length or a window past the BAR does nothing.
        d.config_write(cap + 12, &3u32.to_le_bytes());
        d.config_write(cap + 16, &[0, 0, 0, 0]);
        assert_eq!(status(&mut d), 1);
        d.config_write(cap + 8, &(BAR_SIZE - 1).to_le_bytes());
        d.config_write(cap + 12, &4u32.to_le_bytes());
        d.config_write(cap + 16, &[0xff; 4]);
        assert_eq!(status(&mut d), 1);
    }

    #[test]
    fn hostile_register_writes_are_contained() {
        let (mut d, _) = rng_pci();
        w16(&mut d, 0x16, 7); // select a queue that does not exist
        w16(&mut d, 0x18, 8);
        w16(&mut d, 0x1c, 1);
        w32(&mut d, 0x20, 0x1234);
        let mut b = [0u8; 2];
        d.mmio_read(0x18, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0);
        w16(&mut d, 0x16, 0);
        w16(&mut d, 0x18, 300); // above the maximum
        w16(&mut d, 0x18, 3); // not a power of two
        d.mmio_read(0x18, &mut b);
        assert_eq!(u16::from_le_bytes(b), 256);
        w16(&mut d, 0x10, 99); // vector beyond the table
        d.mmio_read(0x10, &mut b);
        assert_eq!(u16::from_le_bytes(b), NO_VECTOR);
        // Odd sizes and offsets are ignored; reads of nothing are zero.
        d.mmio_write(0x15, &[1, 2, 3]);
        d.mmio_write(0x7fff, &[1]);
        let mut big = [0xaau8; 8];
        d.mmio_read(0x00, &mut big);
        assert_eq!(big, [0; 8]);
        d.config_write(0x10, &[0xff; 4]); // BAR sizing still works
        let mut bar = [0u8; 4];
        d.config_read(0x10, &mut bar);
        assert_eq!(u32::from_le_bytes(bar), !(BAR_SIZE - 1));
    }

    // ---- Pause, save and restore ----

    use crate::block::{Block, BlockState, Disk};
    use crate::net::NetState;
    use crate::testutil::{
        check_read, copy_memory, patterned_disk, post_read, readable, used_idx, wait_used, Gate,
        GatedDisk, BLK_AVAIL, BLK_DESC, BLK_QSIZE, BLK_USED,
    };

    const MEM: usize = 1 << 20;
    /// A BAR address the test movers refuse (another device is there).
    const TAKEN: u32 = 0xd000_0000;

    /// What a transport asked of the VMM: MSI routes and BAR moves.
    #[derive(Default)]
    struct Recorder {
        routes: Mutex<Vec<(u32, Vec<MsixMessage>)>>,
        moves: Mutex<Vec<(u64, u64)>>,
    }

    struct RecRouter(Arc<Recorder>);
    impl MsiRouter for RecRouter {
        fn set_routes(&self, gsi_base: u32, m: &[MsixMessage]) -> std::io::Result<()> {
            self.0.routes.lock().unwrap().push((gsi_base, m.to_vec()));
            Ok(())
        }
    }

    /// The eventfds a test watches: the queue's notification, the MSI-X irqfds, INTx.
    struct Probe {
        irqfds: Vec<EventFd>,
        intx: EventFd,
    }

    fn blk_pci(
        mem: &GuestMemoryMmap,
        disk: Box<dyn Disk>,
        rec: &Arc<Recorder>,
    ) -> (VirtioPci, Probe) {
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let clone = |e: &EventFd| e.try_clone().unwrap();
        let (irqfds, intx) = (vec![evt(), evt()], evt());
        let moves = rec.clone();
        let w = Wiring {
            mem: mem.clone(),
            bar_addr: 0xc000_0000,
            queue_evts: vec![evt()],
            irqfds: irqfds.iter().map(clone).collect(),
            gsi_base: 30,
            router: Arc::new(RecRouter(rec.clone())),
            intx: (clone(&intx), 10),
            mover: Box::new(move |old, new| {
                if new == u64::from(TAKEN) {
                    return false;
                }
                moves.moves.lock().unwrap().push((old, new));
                true
            }),
        };
        let dev = VirtioPci::new(Box::new(Block::new(disk, "disk-0")), w);
        (dev, Probe { irqfds, intx })
    }

    fn new_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
    }

    /// Programs MSI-X vectors 0 (configuration) and 1 (queue 0) and enables MSI-X.
    fn enable_msix(d: &mut VirtioPci) {
        for (v, data) in [(0u64, 0x30u32), (1, 0x31)] {
            let at = MSIX_TABLE + 16 * v;
            w32(d, at, 0xfee0_0000);
            w32(d, at + 4, 0);
            w32(d, at + 8, data);
            w32(d, at + 12, 0);
        }
        let ctrl = d.msix_cap + 2;
        d.config_write(ctrl, &MSIX_ENABLE.to_le_bytes());
        w16(d, 0x10, 0);
        w16(d, 0x16, 0);
        w16(d, 0x1a, 1);
    }

    /// A block transport the driver has set up with MSI-X, whose BAR it moved to 0xc010_0000,
    /// which served `served` read requests and is paused.
    fn served_blk(mem: &GuestMemoryMmap, rec: &Arc<Recorder>, served: u16) -> VirtioPci {
        let (mut d, probe) = blk_pci(mem, Box::new(patterned_disk()), rec);
        d.config_write(0x04, &2u16.to_le_bytes());
        d.config_write(0x10, &0xc010_0000u32.to_le_bytes());
        assert_eq!(d.bar_addr, 0xc010_0000);
        negotiate(&mut d, 1);
        setup_queue(&mut d, BLK_QSIZE, BLK_DESC, BLK_AVAIL, BLK_USED);
        enable_msix(&mut d);
        for k in 0..served {
            post_read(mem, k);
        }
        d.mmio_write(0x14, &[0x0f]);
        wait_used(mem, served, &probe.irqfds[1]);
        let err = d.save().unwrap_err();
        assert!(err.contains("pause it before saving"), "{err}");
        d.pause();
        d
    }

    #[test]
    fn pause_waits_for_the_chain_in_service_and_takes_no_new_one() {
        let mem = new_mem();
        let gate = Arc::new(Gate::default());
        let disk = GatedDisk {
            inner: patterned_disk(),
            gate: gate.clone(),
        };
        let rec = Arc::default();
        let (mut d, probe) = blk_pci(&mem, Box::new(disk), &rec);
        negotiate(&mut d, 1);
        setup_queue(&mut d, BLK_QSIZE, BLK_DESC, BLK_AVAIL, BLK_USED);
        for k in 0..4 {
            post_read(&mem, k);
        }
        d.mmio_write(0x14, &[0x0f]);
        assert!(d.is_active());
        // The worker took request 0 and is inside the disk; the pause is asked meanwhile.
        gate.wait_entered(1);
        d.begin_pause();
        gate.release(1);
        d.pause();
        assert!(d.is_paused());
        assert_eq!(
            used_idx(&mem),
            1,
            "the chain in service completed, no other"
        );
        assert_eq!(gate.entered(), 1);
        // The driver posts more and notifies; the disk would now answer at once.
        gate.open();
        for k in 4..8 {
            post_read(&mem, k);
        }
        d.mmio_write(notify_offset(0), &0u16.to_le_bytes());
        let q = &d.queue_evts[0];
        assert!(readable(q), "the notification waits in its eventfd");
        assert_eq!(used_idx(&mem), 1);
        assert_eq!(
            gate.entered(),
            1,
            "no request reached the disk while paused"
        );
        let st = d.save().unwrap();
        assert_eq!((st.queues[0].next_avail, st.queues[0].next_used), (1, 1));
        // Pausing again is harmless; resuming serves the other seven.
        d.pause();
        d.resume();
        assert!(!d.is_paused());
        wait_used(&mem, 8, &probe.intx);
        for k in 0..8 {
            check_read(&mem, k);
        }
        assert_eq!(gate.entered(), 8);
    }

    #[test]
    fn pausing_a_device_the_driver_has_not_started_returns_at_once() {
        let (mut d, _) = rng_pci();
        d.pause();
        assert!(d.is_paused() && !d.is_active());
        let st = d.save().unwrap();
        assert!(!st.active);
        d.resume();
        assert!(!d.is_paused());
    }

    #[test]
    fn a_restored_transport_serves_on_from_the_saved_ring_positions() {
        let mem = new_mem();
        let rec_a = Arc::default();
        let a = served_blk(&mem, &rec_a, 3);
        let saved = a.save().unwrap();
        assert!(saved.active);
        assert_eq!(saved.bar_addr, 0xc010_0000);
        assert_eq!(
            (saved.queues[0].next_avail, saved.queues[0].next_used),
            (3, 3)
        );
        let json = serde_json::to_string(&saved).unwrap();
        let back: VirtioPciState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);

        // A fresh transport (another process) over a copy of guest memory and the same disk.
        let mem_b = copy_memory(&mem, MEM);
        let rec_b: Arc<Recorder> = Arc::default();
        let (mut b, probe) = blk_pci(&mem_b, Box::new(patterned_disk()), &rec_b);
        b.restore(back).unwrap();
        assert!(b.is_active() && b.is_paused());
        assert_eq!(
            b.save().unwrap(),
            saved,
            "the restored state saves identically"
        );
        assert_eq!(
            *rec_b.moves.lock().unwrap(),
            vec![(0xc000_0000, 0xc010_0000)],
            "the MMIO window follows the saved BAR"
        );
        let routes = rec_b.routes.lock().unwrap().clone();
        let msg = |data| MsixMessage {
            addr: 0xfee0_0000,
            data,
        };
        assert_eq!(
            routes,
            vec![(30, vec![msg(0x30), msg(0x31)])],
            "MSI routes set"
        );
        // The driver sees what it set up, with no renegotiation.
        assert_eq!(status(&mut b), 0x0f);
        w32(&mut b, 0x08, 1);
        assert_eq!(r32(&mut b, 0x0c), 1, "VERSION_1 accepted");
        let mut v = [0u8; 2];
        b.mmio_read(0x1a, &mut v);
        assert_eq!(u16::from_le_bytes(v), 1, "queue 0's vector");
        b.mmio_read(0x18, &mut v);
        assert_eq!(u16::from_le_bytes(v), BLK_QSIZE);
        assert_eq!(r32(&mut b, 0x20), BLK_DESC as u32);
        let mut cfg = [0u8; 4];
        b.config_read(0x10, &mut cfg);
        assert_eq!(u32::from_le_bytes(cfg), 0xc010_0000);

        // More requests on B complete after the saved ones, at used entries 3 and 4.
        for k in 3..5 {
            post_read(&mem_b, k);
        }
        b.mmio_write(notify_offset(0), &0u16.to_le_bytes());
        assert_eq!(used_idx(&mem_b), 3, "paused until resumed");
        b.resume();
        wait_used(&mem_b, 5, &probe.irqfds[1]);
        for k in 0..5 {
            check_read(&mem_b, k);
        }
        assert_eq!(used_idx(&mem), 3, "the original's memory is untouched");
    }

    #[test]
    fn a_device_restored_before_driver_ok_starts_when_the_driver_finishes() {
        let mem = new_mem();
        let rec = Arc::default();
        let (mut a, _) = blk_pci(&mem, Box::new(patterned_disk()), &rec);
        negotiate(&mut a, 1);
        setup_queue(&mut a, BLK_QSIZE, BLK_DESC, BLK_AVAIL, BLK_USED);
        post_read(&mem, 0);
        post_read(&mem, 1);
        let saved = a.save().unwrap();
        assert!(!saved.active);
        let mem_b = copy_memory(&mem, MEM);
        let (mut b, probe) = blk_pci(&mem_b, Box::new(patterned_disk()), &rec);
        b.restore(saved).unwrap();
        assert!(!b.is_active() && b.is_paused());
        // DRIVER_OK while paused: the worker starts parked.
        b.mmio_write(0x14, &[0x0f]);
        assert!(b.is_active() && b.is_paused());
        assert_eq!(used_idx(&mem_b), 0);
        b.resume();
        wait_used(&mem_b, 2, &probe.intx);
        check_read(&mem_b, 0);
        check_read(&mem_b, 1);
    }

    /// A state edit and a piece of the error it must cause.
    type Edit = (&'static str, fn(&mut VirtioPciState));

    #[test]
    fn hostile_states_are_refused_and_change_nothing() {
        let mem = new_mem();
        let rec = Arc::default();
        let good = served_blk(&mem, &rec, 2).save().unwrap();
        let rec_b: Arc<Recorder> = Arc::default();
        let (mut b, _) = blk_pci(&copy_memory(&mem, MEM), Box::new(patterned_disk()), &rec_b);
        let before = b.save().unwrap();
        let edits: &[Edit] = &[
            ("type 1 cannot", |s| s.device_type = 1),
            ("2 queues, but the device has 1", |s| {
                s.queues.push(s.queues[0]);
            }),
            ("queue 0: size 3 is not a power of two", |s| {
                s.queues[0].size = 3
            }),
            ("queue 0: size 512", |s| s.queues[0].size = 512),
            ("queue 0: size 0", |s| s.queues[0].size = 0),
            ("maximum size 128 saved", |s| s.queues[0].max_size = 128),
            ("queue 0: vector 99", |s| s.queues[0].vector = 99),
            ("configuration vector 2", |s| s.config_vector = 2),
            ("does not offer", |s| s.driver_features |= 1 << 40),
            ("without VERSION_1", |s| s.driver_features &= !F_VERSION_1),
            ("chains in flight", |s| s.queues[0].next_avail = 200),
            ("chains in flight", |s| s.queues[0].next_used = 3),
            ("queue 0: ", |s| s.queues[0].desc = BLK_DESC + 1),
            ("rings outside guest memory", |s| s.queues[0].used = 1 << 40),
            ("ISR 0x4", |s| s.isr = 4),
            ("lacks DRIVER_OK", |s| s.status = 0x0b),
            ("aligned address", |s| s.bar_addr = 0xc000_1000),
            ("aligned address", |s| s.bar_addr = 0),
            ("the range is taken", |s| s.bar_addr = TAKEN),
            ("read-only byte 0x00", |s| s.config.bytes[0] ^= 1),
            ("256 expected", |s| s.config.bytes.push(0)),
            ("1 vectors", |s| {
                s.msix.entries.pop();
            }),
            ("disagree", |s| s.msix.enabled = false),
            ("reserved control bits", |s| s.msix.entries[1].control = 3),
            ("9 sectors", |s| {
                s.device = DeviceState::Block(BlockState {
                    id: b"disk-0".iter().copied().chain([0; 14]).collect(),
                    capacity: 9,
                    readonly: false,
                })
            }),
            ("disk ID 'disk-9'", |s| {
                s.device = DeviceState::Block(BlockState {
                    id: b"disk-9".iter().copied().chain([0; 14]).collect(),
                    capacity: 8,
                    readonly: false,
                })
            }),
            ("was read-only", |s| {
                s.device = DeviceState::Block(BlockState {
                    id: b"disk-0".iter().copied().chain([0; 14]).collect(),
                    capacity: 8,
                    readonly: true,
                })
            }),
            ("virtio-net state cannot", |s| {
                s.device = DeviceState::Net(NetState {
                    mac: [2, 0, 0, 0, 0, 1],
                })
            }),
        ];
        for (want, edit) in edits {
            let mut st = good.clone();
            edit(&mut st);
            let err = b.restore(st).unwrap_err();
            assert!(err.contains(want), "wanted '{want}' in: {err}");
            assert_eq!(b.save().unwrap(), before, "after '{want}'");
            assert!(!b.is_active() && !b.is_paused());
            assert!(rec_b.routes.lock().unwrap().is_empty());
        }
        // A device state refused after the BAR moved moves it back.
        let moves = rec_b.moves.lock().unwrap().clone();
        assert_eq!(moves.len(), 8, "four moves there and back: {moves:x?}");
        assert!(moves
            .chunks(2)
            .all(|m| m[0] == (0xc000_0000, 0xc010_0000) && m[1] == (0xc010_0000, 0xc000_0000)));
        // Unknown fields are refused by the parser; the good state is still taken.
        let mut v = serde_json::to_value(&good).unwrap();
        v["extra"] = 1.into();
        assert!(serde_json::from_value::<VirtioPciState>(v).is_err());
        b.restore(good).unwrap();
        assert!(b.is_active());
    }
}
