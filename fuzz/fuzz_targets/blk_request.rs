//! The block request parser and its validation, on a 64-sector in-memory disk that panics on
//! any access past its end or any buffer larger than a chunk, with the input's mutations
//! applied between the reading of each chain and the serving of its request.
#![no_main]
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use wv_virtio::block::{process_chain, BlockCounters, Disk, MemDisk, CHUNK, MAX_REQUEST_DESCS};
use wv_virtio::chain::Chain;

#[path = "common.rs"]
mod common;

/// A memory disk that moves data through the default (bounce-buffer) paths, as the VMKFS
/// backend does, and refuses to be reached past its end.
struct StrictDisk(MemDisk);

impl StrictDisk {
    fn check(&self, len: usize, offset: u64) {
        assert!(len <= CHUNK, "a {len}-byte buffer");
        assert!(
            offset + len as u64 <= self.0.size(),
            "{len} bytes at {offset} past the end of the disk"
        );
    }
}

impl Disk for StrictDisk {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn readonly(&self) -> bool {
        self.0.ro
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.check(buf.len(), offset);
        self.0.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        assert!(!self.0.ro, "a read-only disk was written");
        self.check(buf.len(), offset);
        self.0.write_at(buf, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn discard(&mut self, o: u64, l: u64) -> std::io::Result<()> {
        assert!(!self.0.ro && o + l <= self.0.size(), "discard {l} at {o}");
        self.0.discard(o, l)
    }
    fn write_zeroes(&mut self, o: u64, l: u64) -> std::io::Result<()> {
        assert!(
            !self.0.ro && o + l <= self.0.size(),
            "write-zeroes {l} at {o}"
        );
        self.0.write_zeroes(o, l)
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = common::memory(data);
    let mut q = common::queue();
    let ro = data.first().is_some_and(|b| b & 1 == 1);
    let mut disk = StrictDisk(MemDisk {
        data: vec![0x5a; 64 * 512],
        ro,
        flushed: false,
    });
    let counters = BlockCounters::default();
    for _ in 0..64 {
        let Some(chain) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        let len = match Chain::read(&mem, chain, MAX_REQUEST_DESCS) {
            Ok(c) => {
                // Another vCPU rewrites descriptors and buffers after the device read them.
                common::mutate(&mem, data);
                let len = process_chain(&mem, &c, &mut disk, b"fuzz-disk-0000000000", &counters);
                assert!(
                    len <= c.writable_bytes(),
                    "{len} bytes used of {}",
                    c.writable_bytes()
                );
                len
            }
            Err(_) => 0,
        };
        let _ = q.add_used(&mem, head, len);
    }
    assert_eq!(disk.0.data.len(), 64 * 512, "the disk never changes size");
    if ro {
        assert!(
            disk.0.data.iter().all(|&b| b == 0x5a),
            "a read-only disk was written"
        );
    }
});
