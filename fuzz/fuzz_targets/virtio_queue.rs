//! Queue parsing: pop every chain the avail ring names, read it once into a bounded copy
//! (`wv_virtio::chain::Chain`), let the input's mutations rewrite guest memory, and check that
//! the copy is what was read and keeps its invariants; then complete the chain.
#![no_main]
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use wv_virtio::chain::{Chain, MAX_CHAIN};

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
        let max = 1 + usize::from(data.get(1).copied().unwrap_or(0)) % MAX_CHAIN;
        let Ok(c) = Chain::read(&mem, chain.clone(), max) else {
            let _ = q.add_used(&mem, head, 0);
            continue;
        };
        let copy = c.descs().to_vec();
        common::mutate(&mem, data);
        assert_eq!(c.descs(), &copy[..], "the copy never changes");
        assert!(c.descs().len() <= max);
        assert_eq!(c.head(), head);
        let r = c.readable().len();
        assert!(c.descs()[..r].iter().all(|d| !d.write));
        assert!(c.descs()[r..].iter().all(|d| d.write));
        let sum = |ds: &[wv_virtio::chain::Desc]| ds.iter().map(|d| u64::from(d.len)).sum::<u64>();
        assert_eq!(sum(c.readable()), u64::from(c.readable_bytes()));
        assert_eq!(sum(c.writable()), u64::from(c.writable_bytes()));
        for d in c.descs() {
            assert!(d.len == 0 || mem.check_range(GuestAddress(d.addr), d.len as usize));
        }
        let _ = q.add_used(&mem, head, c.writable_bytes());
    }
});
