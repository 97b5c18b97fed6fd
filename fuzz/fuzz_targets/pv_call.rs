//! The paravirtual call port (`wv_pv::handle`): the input is 64 KiB of guest memory holding
//! call blocks and batches, and the first 8 bytes name the block's guest-physical address (an
//! address outside RAM or misaligned included). Every call must complete with a status or
//! be refused, write nothing but the block's status and return words (and what a call is
//! documented to fill), and never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use wv_pv::GuestMemoryMmap;
use wv_pv::{handle, CallContext, MachineInfo};

const MEM: usize = 64 << 10;

struct Ctx {
    mem: GuestMemoryMmap,
    info: MachineInfo,
    console: usize,
}

impl CallContext for Ctx {
    fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }
    fn machine(&self) -> &MachineInfo {
        &self.info
    }
    fn exit_count(&self) -> u64 {
        7
    }
    fn vcpu_index(&self) -> u32 {
        0
    }
    fn console_write(&mut self, bytes: &[u8]) -> bool {
        self.console += bytes.len();
        true
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let gpa = u64::from_le_bytes(data[..8].try_into().unwrap());
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let image = &data[8..data.len().min(8 + MEM)];
    mem.write_slice(image, GuestAddress(0)).unwrap();
    let mut ctx = Ctx {
        mem,
        info: MachineInfo {
            mem_size: MEM as u64,
            vcpus: 2,
            devices: Vec::new(),
            tsc_khz: 1_000_000,
            generation_id: [7; wv_abi::GENERATION_ID_SIZE],
            restores: 1,
        },
        console: 0,
    };
    // A block address as the guest would give it: anywhere in RAM, 8-aligned or not, or
    // outside it.
    let gpa = gpa % (2 * MEM as u64);
    let out = handle(&mut ctx, gpa);
    assert!(ctx.console <= MEM, "console output beyond guest memory");
    if out.call.is_none() {
        assert_eq!(out.batched, [0; wv_abi::CALL_COUNT as usize]);
    }
});
