//! virtio-rng (device type 4): one queue; every write-only buffer the driver posts is filled
//! with bytes from the host's `getrandom`.

use crate::device::{ActiveQueue, Interrupt, VirtioDevice, Worker};
use crate::F_VERSION_1;
use std::sync::Arc;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

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
    let mut used = false;
    while let Some(chain) = q.queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let mut written: u32 = 0;
        for d in chain {
            // Entropy goes only into device-writable buffers inside guest RAM; anything else
            // ends the request with what was written so far.
            if !d.is_write_only() || !mem.check_range(d.addr(), d.len() as usize) {
                break;
            }
            let len = d.len().min(MAX_REQUEST - written);
            let mut buf = vec![0u8; len as usize];
            if getrandom(&mut buf).is_err() || mem.write_slice(&buf, d.addr()).is_err() {
                break;
            }
            written += len;
            if written == MAX_REQUEST {
                break;
            }
        }
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
