//! virtio-rng (device type 4): one queue; every chain of write-only buffers the driver posts is
//! read once and filled with bytes from the host's `getrandom` (up to [`MAX_REQUEST`]).

use crate::chain::{Chain, MAX_CHAIN};
use crate::device::{ActiveQueue, Interrupt, VirtioDevice, Worker};
use crate::F_VERSION_1;
use std::sync::Arc;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

/// Largest request served at once; longer chains are filled up to this (the driver sees the
/// length written in the used ring).
pub const MAX_REQUEST: u32 = 64 * 1024;
const QUEUE_SIZE: u16 = 256;

/// The entropy device.
#[derive(Default)]
pub struct Rng {
    worker: Option<Worker>,
}

/// Fills the buffers of every available chain; returns whether any was used.
pub fn serve(mem: &GuestMemoryMmap, q: &mut ActiveQueue) -> bool {
    serve_with(mem, q, || {})
}

/// [`serve`], calling `between` after each chain was read and before it is filled (where
/// tests rewrite the descriptors, as another vCPU could).
pub fn serve_with(mem: &GuestMemoryMmap, q: &mut ActiveQueue, mut between: impl FnMut()) -> bool {
    let mut used = false;
    let mut buf = Vec::new();
    while let Some(chain) = q.queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        // The chain is read once; entropy goes only into a chain of device-writable buffers
        // inside guest RAM (anything else is completed empty), at most MAX_REQUEST bytes.
        let written = match Chain::read(mem, chain, MAX_CHAIN) {
            Ok(c) if c.readable().is_empty() => {
                between();
                let len = c.writable_bytes().min(MAX_REQUEST);
                buf.resize(len as usize, 0);
                if getrandom(&mut buf).is_ok() && c.write_at(mem, 0, &buf).is_ok() {
                    len
                } else {
                    0
                }
            }
            _ => 0,
        };
        if q.queue.add_used(mem, head, written).is_err() {
            break;
        }
        used = true;
    }
    used
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most the remaining length into our own buffer.
        let n = unsafe {
            libc::getrandom(
                buf[done..].as_mut_ptr() as *mut libc::c_void,
                buf.len() - done,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        done += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u16 {
        4
    }
    fn features(&self) -> u64 {
        F_VERSION_1
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _features: u64,
        queues: Vec<ActiveQueue>,
        irq: Arc<dyn Interrupt>,
    ) -> Result<(), String> {
        let worker = Worker::start("virtio-rng", queues, move |qs, i| {
            if serve(&mem, &mut qs[i]) && qs[i].queue.needs_notification(&mem).unwrap_or(true) {
                irq.queue(i);
            }
        })
        .map_err(|e| format!("starting the virtio-rng worker: {e}"))?;
        self.worker = Some(worker);
        Ok(())
    }
    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}
