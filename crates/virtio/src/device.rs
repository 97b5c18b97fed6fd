//! What a virtio device implements, the worker thread that serves its queues, and the control
//! ([`WorkerCtl`]) through which the transport pauses, resumes and stops that thread.
//!
//! Pausing is cooperative: the owner asks ([`WorkerCtl::request_pause`]), the worker finishes
//! the chain it is serving, takes no new one, records its queues' positions and parks; the
//! owner's [`WorkerCtl::wait_paused`] returns then. Notifications that arrive meanwhile stay
//! in their ioeventfds, and a resumed worker also looks at every queue once, so nothing the
//! driver posted is missed.

use crate::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState};
use vmm_sys_util::eventfd::EventFd;

/// How a device raises interrupts (the transport decides between MSI-X and INTx).
pub trait Interrupt: Send + Sync {
    /// Signals that queue `index` has used buffers.
    fn queue(&self, index: usize);
    /// Signals a configuration change.
    fn config(&self);
}

/// A queue the driver set up, validated, with the eventfd its notifications arrive on.
pub struct ActiveQueue {
    /// The queue.
    pub queue: Queue,
    /// Signalled when the driver notifies the queue (an ioeventfd).
    pub evt: EventFd,
    /// The device's counters.
    pub counters: Arc<DeviceCounters>,
}

impl ActiveQueue {
    /// Consumes the notifications that arrived (an eventfd read returns how many) and counts
    /// them: they reach the device without a vCPU exit, so the device is where they are seen.
    pub fn take_notifications(&self) {
        if let Ok(n) = self.evt.read() {
            self.counters
                .notifications
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Takes the next chain the driver made available. An available ring the device cannot
    /// use (its index more than the queue size ahead of the device's, or the ring unreadable)
    /// yields nothing and is counted in [`DeviceCounters::ring_errors`]: a hostile or broken
    /// driver then gets no service on this queue until it resets the device.
    pub fn pop_chain<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
    ) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
        match self.queue.iter(mem) {
            Ok(mut it) => it.next(),
            Err(_) => {
                self.counters.ring_errors.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Counts a chain the device refused (see [`DeviceCounters::bad_chains`]).
    pub fn count_bad_chain(&self) {
        self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks the device as needing a reset (see [`DeviceCounters::needs_reset`]).
    pub fn set_needs_reset(&self) {
        self.counters.needs_reset.store(true, Ordering::SeqCst);
    }
}

/// What a device's data path did without involving a vCPU thread.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Queue notifications from the driver (ioeventfd signals).
    pub notifications: std::sync::atomic::AtomicU64,
    /// Interrupts raised to the guest (irqfd signals).
    pub interrupts: std::sync::atomic::AtomicU64,
    /// Descriptor chains refused: a buffer outside guest RAM (on MMIO, in the PCI hole, past
    /// the top, a length that wraps), a loop, an indirect table inside an indirect table, too
    /// many descriptors. Each is completed without data (or, when even that fails, dropped).
    pub bad_chains: std::sync::atomic::AtomicU64,
    /// Times an available ring could not be used (see [`ActiveQueue::pop_chain`]).
    pub ring_errors: std::sync::atomic::AtomicU64,
    /// Resets of the device by its driver (status 0 written while the device was not reset).
    pub resets: std::sync::atomic::AtomicU64,
    /// BAR relocations the device refused (onto RAM, another BAR, the ECAM window, the
    /// interrupt controllers: anywhere outside the free part of the PCI MMIO window).
    pub refused_bar_moves: std::sync::atomic::AtomicU64,
    /// MSI-X interrupts raised through a table entry whose address is outside the local APICs'
    /// window (0xfeexxxxx): the guest programmed garbage, and KVM delivers them to no CPU.
    pub bad_msi: std::sync::atomic::AtomicU64,
    /// A worker found the driver broke the device's rules (a bad chain seen by an interposed
    /// vhost-user device): the status reads DEVICE_NEEDS_RESET until the driver resets it.
    pub needs_reset: AtomicBool,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device type (5 = balloon, 4 = entropy, 2 = block, 1 = network).
    fn device_type(&self) -> u16;
    /// Feature bits offered (including `F_VERSION_1`).
    fn features(&self) -> u64;
    /// Maximum size of each queue; the number of queues is the length.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Reads device-specific configuration at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device-specific configuration at `offset` (most devices ignore writes).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving `queues` with the features the driver accepted, on a worker thread that
    /// obeys `ctl` (it may be paused already, and then parks before serving anything).
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<ActiveQueue>,
        irq: Arc<dyn Interrupt>,
        ctl: Arc<WorkerCtl>,
    ) -> Result<(), String>;
    /// Stops serving and releases everything `activate` took (the driver reset the device).
    fn reset(&mut self);
    /// The device's own guest-visible state (configuration, identity).
    fn save_state(&self) -> DeviceState;
    /// Takes `state`, saved from a device of the same kind; refused (and nothing changes) when
    /// it does not fit this device (another kind, another disk size, ...).
    fn restore_state(&mut self, state: DeviceState) -> Result<(), String>;
    /// The control of the device's data path, for a device whose queues a vhost-user backend
    /// serves (direct or interposed: [`crate::vhost_user::PathControl`]).
    fn path_control(&self) -> Option<Arc<crate::vhost_user::PathControl>> {
        None
    }
    /// Where the device counts the bytes and operations of its data path: the devices that
    /// serve their queues themselves (virtio-blk, virtio-net); `None` for the others (a
    /// vhost-user device's data path is its backend's, which counts it).
    fn io_counters(&self) -> Option<IoCounters> {
        None
    }
}

/// The data-path counters of a device ([`VirtioDevice::io_counters`]), read while it runs.
#[derive(Clone, Debug)]
pub enum IoCounters {
    /// A virtio-blk device's.
    Disk(Arc<crate::block::BlockCounters>),
    /// A virtio-net device's.
    Net(Arc<crate::net::NetCounters>),
}

/// A device's own state, by kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum DeviceState {
    /// virtio-rng: nothing.
    Rng,
    /// virtio-blk.
    Block(crate::block::BlockState),
    /// virtio-net.
    Net(crate::net::NetState),
    /// virtio-balloon.
    Balloon(crate::balloon::BalloonState),
}

impl DeviceState {
    /// The kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceState::Rng => "virtio-rng",
            DeviceState::Block(_) => "virtio-blk",
            DeviceState::Net(_) => "virtio-net",
            DeviceState::Balloon(_) => "virtio-balloon",
        }
    }
}

/// Copies the part of a device's configuration bytes `config` that a driver read at `offset`
/// asks for into `data`; reads beyond the end see zeroes.
pub fn read_config_window(config: &[u8], offset: u64, data: &mut [u8]) {
    let window = usize::try_from(offset)
        .ok()
        .and_then(|o| config.get(o..o.checked_add(data.len())?));
    match window {
        Some(b) => data.copy_from_slice(b),
        None => data.fill(0),
    }
}

#[derive(Default)]
struct CtlState {
    /// The owner wants the worker parked.
    pause: bool,
    /// The owner wants the worker gone.
    stop: bool,
    /// The worker is parked; its queues' states when it parked.
    parked: Option<Vec<QueueState>>,
    /// The worker thread has ended.
    exited: bool,
}

/// Pause, resume and stop for one device's worker thread, shared by the transport (the owner)
/// and the thread.
pub struct WorkerCtl {
    /// Wakes the worker's poll when the owner asks for something.
    evt: EventFd,
    /// A pause or stop is asked: handlers take no new chain while this is set.
    pausing: AtomicBool,
    st: Mutex<CtlState>,
    cv: Condvar,
}

/// What the worker is to do after [`WorkerCtl::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtlAction {
    /// End the thread.
    Stop,
    /// Look at every queue once (the worker may have left chains unserved, or been paused
    /// while notifications came in), then go on.
    Sweep,
}

impl WorkerCtl {
    /// A control for a worker that starts running, or parked when `paused`.
    pub fn new(paused: bool) -> std::io::Result<Arc<WorkerCtl>> {
        Ok(Arc::new(WorkerCtl {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            pausing: AtomicBool::new(paused),
            st: Mutex::new(CtlState {
                pause: paused,
                ..CtlState::default()
            }),
            cv: Condvar::new(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, CtlState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Worker side: the descriptor to poll with the queues' eventfds; when it is readable,
    /// call [`WorkerCtl::check`].
    pub fn fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }

    /// Worker side: whether a pause or stop is asked. A handler checks it before taking each
    /// chain and returns early when it is set.
    pub fn pausing(&self) -> bool {
        self.pausing.load(Ordering::SeqCst)
    }

    /// Worker side, at start and whenever [`WorkerCtl::fd`] is readable: parks while a pause
    /// is asked (recording the positions of `queues`), and says what to do next.
    pub fn check(&self, queues: &[ActiveQueue]) -> CtlAction {
        let _ = self.evt.read();
        let mut st = self.lock();
        if st.pause && !st.stop {
            st.parked = Some(queues.iter().map(|q| q.queue.state()).collect());
            self.cv.notify_all();
            while st.pause && !st.stop {
                st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.parked = None;
        }
        if st.stop {
            CtlAction::Stop
        } else {
            CtlAction::Sweep
        }
    }

    /// Owner side: asks the worker to pause, without waiting.
    pub fn request_pause(&self) {
        self.pausing.store(true, Ordering::SeqCst);
        self.lock().pause = true;
        let _ = self.evt.write(1);
    }

    /// Owner side: waits until the worker has parked (or ended).
    pub fn wait_paused(&self) {
        let mut st = self.lock();
        while st.pause && st.parked.is_none() && !st.exited {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Owner side: pauses the worker; returns once it has finished the chain it was serving
    /// and parked.
    pub fn pause(&self) {
        self.request_pause();
        self.wait_paused();
    }

    /// Owner side: lets a paused worker run again.
    pub fn resume(&self) {
        let mut st = self.lock();
        st.pause = false;
        if !st.stop {
            self.pausing.store(false, Ordering::SeqCst);
        }
        self.cv.notify_all();
        drop(st);
        // A worker that had not parked yet still sweeps its queues.
        let _ = self.evt.write(1);
    }

    /// Owner side: asks the worker to end (parked or not).
    pub fn stop(&self) {
        self.pausing.store(true, Ordering::SeqCst);
        self.lock().stop = true;
        self.cv.notify_all();
        let _ = self.evt.write(1);
    }

    /// Whether the worker is parked.
    pub fn is_paused(&self) -> bool {
        self.lock().parked.is_some()
    }

    /// The positions of the worker's queues, while it is parked.
    pub fn parked_queues(&self) -> Option<Vec<QueueState>> {
        self.lock().parked.clone()
    }

    /// Worker side: records that the thread ended (an owner waiting for a pause stops waiting).
    pub fn exited(&self) {
        self.lock().exited = true;
        self.cv.notify_all();
    }
}

/// Tells the control that the worker thread ended, however it ends.
pub struct ExitGuard(pub Arc<WorkerCtl>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.0.exited();
    }
}

/// A worker thread that waits on queue eventfds and calls `handle(queues, index, ctl)` for the
/// queue that was notified; `handle` checks [`WorkerCtl::pausing`] before taking each chain.
pub struct Worker {
    ctl: Arc<WorkerCtl>,
    thread: Option<JoinHandle<Vec<ActiveQueue>>>,
}

impl Worker {
    /// Starts `name` (also its kind for its system-call filter, [`wv_devices::thread`]),
    /// serving `queues` through `handle` under `ctl` (parked first if a pause is asked already).
    pub fn start<F>(
        name: &'static str,
        queues: Vec<ActiveQueue>,
        ctl: Arc<WorkerCtl>,
        mut handle: F,
    ) -> std::io::Result<Worker>
    where
        F: FnMut(&mut [ActiveQueue], usize, &WorkerCtl) + Send + 'static,
    {
        let ctl2 = ctl.clone();
        let thread = wv_devices::thread::spawn(name.to_string(), name, move || {
            let ctl = ctl2;
            let _exit = ExitGuard(ctl.clone());
            let mut queues = queues;
            let mut fds: Vec<libc::pollfd> = queues
                .iter()
                .map(|q| libc::pollfd {
                    fd: q.evt.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            fds.push(libc::pollfd {
                fd: ctl.fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            // Buffers the driver posted before DRIVER_OK (or before a snapshot was taken)
            // are served without waiting for a notification.
            let mut action = Some(ctl.check(&queues));
            loop {
                match action.take() {
                    Some(CtlAction::Stop) => return queues,
                    Some(CtlAction::Sweep) => {
                        for i in 0..queues.len() {
                            handle(&mut queues, i, &ctl);
                        }
                    }
                    None => {}
                }
                // SAFETY: `fds` is a valid array of pollfd for its length.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
                if n < 0 {
                    continue;
                }
                if fds[fds.len() - 1].revents != 0 {
                    action = Some(ctl.check(&queues));
                    continue;
                }
                for i in 0..queues.len() {
                    if fds[i].revents != 0 {
                        queues[i].take_notifications();
                        handle(&mut queues, i, &ctl);
                    }
                }
            }
        })?;
        Ok(Worker {
            ctl,
            thread: Some(thread),
        })
    }

    /// Stops the thread and returns the queues it served.
    pub fn stop(mut self) -> Vec<ActiveQueue> {
        self.halt()
    }

    fn halt(&mut self) -> Vec<ActiveQueue> {
        self.ctl.stop();
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.halt();
    }
}
