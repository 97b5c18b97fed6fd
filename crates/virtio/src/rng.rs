//! virtio-rng (device type 4): one queue; every chain of write-only buffers the driver posts is
//! read once and filled with bytes from the host's `getrandom` (up to [`MAX_REQUEST`]).

use crate::chain::{Chain, MAX_CHAIN};
use crate::device::{ActiveQueue, DeviceState, Interrupt, VirtioDevice, Worker, WorkerCtl};
use crate::GuestMemoryMmap;
use crate::F_VERSION_1;
use std::sync::Arc;
use virtio_queue::QueueT;

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
pub fn serve_with(mem: &GuestMemoryMmap, q: &mut ActiveQueue, between: impl FnMut()) -> bool {
    serve_until(mem, q, between, || false)
}

/// [`serve_with`], taking no further chain once `stop` says so (a pause was asked).
fn serve_until(
    mem: &GuestMemoryMmap,
    q: &mut ActiveQueue,
    mut between: impl FnMut(),
    stop: impl Fn() -> bool,
) -> bool {
    let mut used = false;
    let mut buf = Vec::new();
    while !stop() {
        let Some(chain) = q.pop_chain(mem) else {
            break;
        };
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
            _ => {
                q.count_bad_chain();
                0
            }
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
        ctl: Arc<WorkerCtl>,
    ) -> Result<(), String> {
        let worker = Worker::start("virtio-rng", queues, ctl, move |qs, i, ctl| {
            if serve_until(&mem, &mut qs[i], || {}, || ctl.pausing())
                && qs[i].queue.needs_notification(&mem).unwrap_or(true)
            {
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
    fn save_state(&self) -> DeviceState {
        DeviceState::Rng
    }
    fn restore_state(&mut self, state: DeviceState) -> Result<(), String> {
        match state {
            DeviceState::Rng => Ok(()),
            other => Err(format!(
                "a {} state cannot be restored into a virtio-rng device",
                other.kind()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    /// One chain of `bufs` (addr, len, flags) at descriptor 0 of a 16-entry queue.
    fn queue(mem: &GuestMemoryMmap, bufs: &[(u64, u32, u16)]) -> ActiveQueue {
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let at = 16 * i as u64;
            let next = if i + 1 < bufs.len() { 1 } else { 0 };
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags | next, GuestAddress(at + 12)).unwrap();
            let next_index = u16::try_from(i + 1).unwrap();
            mem.write_obj(next_index, GuestAddress(at + 14)).unwrap();
        }
        mem.write_obj(0u16, GuestAddress(0x104)).unwrap();
        mem.write_obj(1u16, GuestAddress(0x102)).unwrap();
        crate::testutil::ready_queue()
    }

    fn used_len(mem: &GuestMemoryMmap) -> u32 {
        mem.read_obj(GuestAddress(0x180 + 8)).unwrap()
    }

    #[test]
    fn fills_what_was_read_and_nothing_the_guest_changed_afterwards() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut q = queue(&mem, &[(0x1000, 64, 2), (0x2000, 64, 2)]);
        // The guest points the second buffer elsewhere and makes it huge after the reading.
        let rewrite = || {
            mem.write_obj(0x8_0000u64, GuestAddress(16)).unwrap();
            mem.write_obj(0x7_0000u32, GuestAddress(24)).unwrap();
        };
        assert!(serve_with(&mem, &mut q, rewrite));
        assert_eq!(used_len(&mem), 128);
        let mut b = [0u8; 64];
        mem.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
        assert_ne!(b, [0u8; 64]);
        mem.read_slice(&mut b, GuestAddress(0x8_0000)).unwrap();
        assert_eq!(
            b, [0u8; 64],
            "nothing written where the descriptor pointed later"
        );
    }

    #[test]
    fn malformed_and_oversized_chains() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        // A device-readable buffer: completed empty, nothing written.
        let mut q = queue(&mem, &[(0x1000, 64, 0)]);
        assert!(serve(&mem, &mut q));
        assert_eq!(used_len(&mem), 0);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0);
        // Outside guest RAM: completed empty.
        let mut q = queue(&mem, &[(0x1000, 64, 2), ((1 << 20) - 8, 64, 2)]);
        assert!(serve(&mem, &mut q));
        assert_eq!(used_len(&mem), 0);
        // Larger than MAX_REQUEST: filled up to it.
        let mut q = queue(&mem, &[(0x1_0000, 0x8_0000, 2)]);
        assert!(serve(&mem, &mut q));
        assert_eq!(used_len(&mem), MAX_REQUEST);
        let past: u64 = mem
            .read_obj(GuestAddress(0x1_0000 + u64::from(MAX_REQUEST)))
            .unwrap();
        assert_eq!(past, 0);
    }

    /// What the adversarial probe guest does to a ring (docs/DEVICES.md, "Adversarial guest"),
    /// replayed here: every hostile chain is completed empty and counted, a loop or an indirect
    /// table nested in another ends, and an available index that jumps past the queue size
    /// takes nothing and is counted.
    #[test]
    fn hostile_rings_are_counted_and_never_served() {
        use std::sync::atomic::Ordering::Relaxed;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let hostile: &[&[(u64, u32, u16)]] = &[
            &[(0xfee0_0000, 64, 2)],          // the LAPIC
            &[(0xe000_0000, 4096, 2)],        // the ECAM window
            &[(1 << 40, 64, 2)],              // far beyond RAM
            &[(0x1000, u32::MAX, 2)],         // a length running past the end
            &[(u64::MAX - 0x7ff, 0x1000, 2)], // an address that wraps
            &[(0x1000, 64, 2 | 4)],           // indirect, not negotiated
        ];
        for bufs in hostile {
            let mut q = queue(&mem, bufs);
            assert!(serve(&mem, &mut q), "{bufs:x?}");
            assert_eq!(used_len(&mem), 0, "{bufs:x?}");
            assert_eq!(q.counters.bad_chains.load(Relaxed), 1, "{bufs:x?}");
        }
        // A loop: descriptor 0 -> 1 -> 0 ...
        let mut q = queue(&mem, &[(0x1000, 64, 2), (0x2000, 64, 2)]);
        mem.write_obj(0u16, GuestAddress(16 + 14)).unwrap();
        mem.write_obj(3u16, GuestAddress(16 + 12)).unwrap();
        assert!(serve(&mem, &mut q));
        assert_eq!(q.counters.bad_chains.load(Relaxed), 1);
        // The available index jumps by more than the queue size: nothing taken, counted.
        let mut q = queue(&mem, &[(0x1000, 64, 2)]);
        mem.write_obj(17u16, GuestAddress(0x102)).unwrap();
        assert!(!serve(&mem, &mut q));
        assert_eq!(q.counters.ring_errors.load(Relaxed), 1);
        assert_eq!(q.counters.bad_chains.load(Relaxed), 0);
    }
}
