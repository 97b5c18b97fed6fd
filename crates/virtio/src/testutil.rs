//! Pieces the devices' unit tests share: a ready 16-entry queue over rings the test wrote, and
//! a guard that stops a descriptor-flipping thread however a race test ends.

use crate::device::ActiveQueue;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use virtio_queue::QueueT;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

/// A ready 16-entry queue whose descriptor table is at 0, available ring at 0x100 and used
/// ring at 0x180 (the test writes them).
pub(crate) fn ready_queue() -> ActiveQueue {
    let mut q = virtio_queue::Queue::new(16).unwrap();
    q.try_set_desc_table_address(GuestAddress(0)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(0x100)).unwrap();
    q.try_set_used_ring_address(GuestAddress(0x180)).unwrap();
    q.set_ready(true);
    ActiveQueue {
        queue: q,
        evt: EventFd::new(0).unwrap(),
        counters: Default::default(),
    }
}

/// Sets its flag when dropped: a flipping thread that polls the flag stops even when a check
/// of the test panics.
pub(crate) struct StopOnDrop(pub Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
