// Shared by the targets: the input is a guest memory image (64 KiB) holding a queue of 16
// entries with its rings in the first 512 bytes (descriptor table at 0, available ring at
// 0x100, used ring at 0x180), so short inputs already control every descriptor and index.
//
// The guest's other vCPUs: bytes MUTATIONS_AT..MUTATIONS_AT + 256 of the input are also 64
// mutations (u16 offset, u16 value, little-endian) that `mutate` applies to guest memory
// between the device's reading of a chain and its serving of it, as another vCPU rewriting
// descriptors or buffers could. An offset with the top bit set lands in the rings (its low 9
// bits); otherwise anywhere in the first 32 KiB. A device that read the descriptor table
// again after validating it would serve the rewritten values, which the targets' checks catch.
#![allow(dead_code)] // each target uses part of this
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use wv_virtio::GuestMemoryMmap;

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
/// Where the mutations start in the input.
pub const MUTATIONS_AT: usize = 0x700;

/// Applies the input's mutations to guest memory (see the top of this file).
pub fn mutate(mem: &GuestMemoryMmap, data: &[u8]) {
    let table = data.get(MUTATIONS_AT..).unwrap_or(&[]);
    for m in table.chunks_exact(4).take(64) {
        let off = u16::from_le_bytes([m[0], m[1]]);
        let at = if off & 0x8000 != 0 {
            u64::from(off & 0x1ff)
        } else {
            u64::from(off)
        };
        mem.write_slice(&m[2..4], GuestAddress(at)).unwrap();
    }
}
