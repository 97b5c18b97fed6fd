//! The block request parser and its validation, on an in-memory disk of 64 sectors.
#![no_main]
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use wv_virtio::block::{process, BlockCounters, MemDisk};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let mem = common::memory(data);
    let mut q = common::queue();
    let ro = data.first().is_some_and(|b| b & 1 == 1);
    let mut disk = MemDisk {
        data: vec![0x5a; 64 * 512],
        ro,
        flushed: false,
    };
    let counters = BlockCounters::default();
    for _ in 0..64 {
        let Some(chain) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        let len = process(&mem, chain, &mut disk, b"fuzz-disk-0000000000", &counters);
        let _ = q.add_used(&mem, head, len);
    }
    assert_eq!(disk.data.len(), 64 * 512, "the disk never changes size");
    if ro {
        assert!(
            disk.data.iter().all(|&b| b == 0x5a),
            "a read-only disk was written"
        );
    }
});
