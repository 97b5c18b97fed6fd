//! Queue parsing: pop every chain the avail ring names, walk it both ways, complete it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let mem = common::memory(data);
    let mut q = common::queue();
    // At most one lap of the ring: a hostile avail index cannot make this loop forever.
    for _ in 0..64 {
        let Some(chain) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        let total: u64 = chain.clone().map(|d| u64::from(d.len())).sum();
        let _ = chain.clone().readable().count() + chain.clone().writable().count();
        let _ = q.add_used(&mem, head, total.min(u64::from(u32::MAX)) as u32);
    }
});
