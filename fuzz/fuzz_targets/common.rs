// Shared by the targets: the input is a guest memory image (64 KiB) holding a queue of 16
// entries with its rings in the first 512 bytes (descriptor table at 0, available ring at
// 0x100, used ring at 0x180), so short inputs already control every descriptor and index.
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MEM: usize = 64 * 1024;

pub fn memory(data: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let n = data.len().min(MEM);
    mem.write_slice(&data[..n], GuestAddress(0)).unwrap();
    mem
}

pub fn queue() -> Queue {
    let mut q = Queue::new(16).unwrap();
    q.try_set_desc_table_address(GuestAddress(0)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(0x100)).unwrap();
    q.try_set_used_ring_address(GuestAddress(0x180)).unwrap();
    q.set_ready(true);
    q
}

/// Where the net target's received frame starts in the input.
pub const FRAME_AT: usize = 0x800;
