//! What a virtio device implements, and the worker thread that serves its queues.

use std::sync::Arc;
use std::thread::JoinHandle;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
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
}

/// What a device's data path did without involving a vCPU thread.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Queue notifications from the driver (ioeventfd signals).
    pub notifications: std::sync::atomic::AtomicU64,
    /// Interrupts raised to the guest (irqfd signals).
    pub interrupts: std::sync::atomic::AtomicU64,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device type (4 = entropy, 2 = block, 1 = network).
    fn device_type(&self) -> u16;
    /// Feature bits offered (including `F_VERSION_1`).
    fn features(&self) -> u64;
    /// Maximum size of each queue; the number of queues is the length.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Reads device-specific configuration at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device-specific configuration at `offset` (most devices ignore writes).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving `queues` with the features the driver accepted.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<ActiveQueue>,
        irq: Arc<dyn Interrupt>,
    ) -> Result<(), String>;
    /// Stops serving and releases everything `activate` took (the driver reset the device).
    fn reset(&mut self);
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

/// A worker thread that waits on queue eventfds and calls `handle(queue_index)`.
pub struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<Vec<ActiveQueue>>>,
}

impl Worker {
    /// Starts `name`, serving `queues` through `handle`, which gets the queues and the index
    /// of the one that was notified.
    pub fn start<F>(name: &str, queues: Vec<ActiveQueue>, mut handle: F) -> std::io::Result<Worker>
    where
        F: FnMut(&mut [ActiveQueue], usize) + Send + 'static,
    {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop2 = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let mut queues = queues;
                let mut fds: Vec<libc::pollfd> = queues
                    .iter()
                    .map(|q| libc::pollfd {
                        fd: std::os::fd::AsRawFd::as_raw_fd(&q.evt),
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                fds.push(libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&stop2),
                    events: libc::POLLIN,
                    revents: 0,
                });
                // Buffers the driver posted before DRIVER_OK are served without waiting for a
                // notification.
                for i in 0..queues.len() {
                    handle(&mut queues, i);
                }
                loop {
                    // SAFETY: `fds` is a valid array of pollfd for its length.
                    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
                    if n < 0 {
                        continue;
                    }
                    if fds[fds.len() - 1].revents != 0 {
                        return queues;
                    }
                    for i in 0..queues.len() {
                        if fds[i].revents != 0 {
                            queues[i].take_notifications();
                            handle(&mut queues, i);
                        }
                    }
                }
            })?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and returns the queues it served.
    pub fn stop(mut self) -> Vec<ActiveQueue> {
        self.halt()
    }

    fn halt(&mut self) -> Vec<ActiveQueue> {
        let _ = self.stop.write(1);
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
