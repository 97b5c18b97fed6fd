//! The VMM side of the paravirtual interface (seed 003's "VMM calls"): one guest `out` to the
//! call port names a [`CallBlock`] in guest memory; [`handle`] validates it, performs the call
//! (or, for a batch, up to `MAX_BATCH` calls) and writes status and results back.
//!
//! Everything a guest passes is untrusted: addresses are checked against guest RAM before any
//! access, lengths and counts against the ABI's limits, and a bad block yields an error status
//! (or, when the block itself is unreachable, an `Invalid` outcome) but never a panic.
#![allow(clippy::cast_possible_truncation)] // x86-64 only: usize is 64 bits; lengths are bounded by the ABI limits first

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Guest memory as the VMM maps it: every write through it marks its page dirty (live migration).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
use wv_abi::{
    status, Call, CallBlock, DeviceRecord, CALL_BLOCK_SIZE, CALL_COUNT, DEVICE_RECORD_SIZE,
};

/// Facts about the VM that calls report.
#[derive(Clone, Debug, Default)]
pub struct MachineInfo {
    /// Guest RAM in bytes.
    pub mem_size: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Devices, as [`Call::DeviceList`] reports them.
    pub devices: Vec<DeviceRecord>,
    /// TSC frequency in kHz (0 if unknown).
    pub tsc_khz: u64,
    /// The VM generation identifier [`Call::VmGeneration`] reports: random, drawn anew at each
    /// boot and each restore.
    pub generation_id: [u8; wv_abi::GENERATION_ID_SIZE],
    /// How many times this VM's state has been restored from a snapshot.
    pub restores: u64,
}

/// What a call needs from the vCPU that made it.
pub trait CallContext {
    /// Guest memory.
    fn mem(&self) -> &GuestMemoryMmap;
    /// The VM.
    fn machine(&self) -> &MachineInfo;
    /// Exits of the calling vCPU so far, including the current one.
    fn exit_count(&self) -> u64;
    /// Index of the calling vCPU.
    fn vcpu_index(&self) -> u32;
    /// Writes to the console; false when the output failed (the guest then sees ret[0] = 0).
    fn console_write(&mut self, bytes: &[u8]) -> bool;
}

/// What the VM must do after a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Resume the guest.
    Continue,
    /// End the VM with this exit code.
    Poweroff(u8),
}

/// The result of one exit on the call port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The call named by the block; `None` when the block could not be read (bad address) or
    /// named no call.
    pub call: Option<Call>,
    /// Status written to the block (or that would have been, for an unreachable block).
    pub status: u32,
    /// What happens next.
    pub effect: Effect,
    /// Calls performed inside a batch, by call number.
    pub batched: [u32; CALL_COUNT as usize],
}

fn read_block(mem: &GuestMemoryMmap, gpa: u64) -> Option<CallBlock> {
    if !gpa.is_multiple_of(8) {
        return None;
    }
    let mut b = [0u8; CALL_BLOCK_SIZE];
    mem.read_slice(&mut b, GuestAddress(gpa)).ok()?;
    Some(CallBlock::from_bytes(&b))
}

fn write_result(mem: &GuestMemoryMmap, gpa: u64, b: &CallBlock) -> bool {
    // Only status and ret change; write bytes 4..8 and 48..64.
    let bytes = b.to_bytes();
    mem.write_slice(&bytes[4..8], GuestAddress(gpa + 4)).is_ok()
        && mem
            .write_slice(&bytes[48..64], GuestAddress(gpa + 48))
            .is_ok()
}

/// Performs the call whose block is at guest-physical `gpa`.
pub fn handle(ctx: &mut dyn CallContext, gpa: u64) -> Outcome {
    let mut out = Outcome {
        call: None,
        status: status::BAD_ADDRESS,
        effect: Effect::Continue,
        batched: [0; CALL_COUNT as usize],
    };
    let Some(mut block) = read_block(ctx.mem(), gpa) else {
        return out;
    };
    out.call = Call::from_nr(block.nr);
    perform(ctx, &mut block, true, &mut out);
    out.status = block.status;
    if !write_result(ctx.mem(), gpa, &block) {
        out.status = status::BAD_ADDRESS;
    }
    out
}

fn perform(ctx: &mut dyn CallContext, b: &mut CallBlock, top: bool, out: &mut Outcome) {
    b.ret = [0; 2];
    let Some(call) = Call::from_nr(b.nr) else {
        b.status = status::UNKNOWN_CALL;
        return;
    };
    b.status = status::OK;
    let [a0, a1, ..] = b.args;
    match call {
        Call::Version => {
            b.ret = [
                u64::from(wv_abi::ABI_VERSION),
                u64::from(wv_abi::features::ALL),
            ]
        }
        Call::MemSize => b.ret = [ctx.machine().mem_size, u64::from(ctx.machine().vcpus)],
        Call::TscKhz => b.ret = [ctx.machine().tsc_khz, 0],
        Call::ExitCount => b.ret = [ctx.exit_count(), u64::from(ctx.vcpu_index())],
        Call::VmGeneration => {
            let id = ctx.machine().generation_id;
            // Checked whole first: a buffer crossing the end of RAM gets nothing, not a part.
            let whole = GuestMemoryBackend::check_range(ctx.mem(), GuestAddress(a0), id.len());
            if !whole || ctx.mem().write_slice(&id, GuestAddress(a0)).is_err() {
                b.status = status::BAD_ADDRESS;
                return;
            }
            b.ret = [ctx.machine().restores, 0];
        }
        Call::DeviceList => {
            let devices = ctx.machine().devices.clone();
            let fit = (a1 / DEVICE_RECORD_SIZE as u64).min(devices.len() as u64) as usize;
            let mut bytes = Vec::with_capacity(fit * DEVICE_RECORD_SIZE);
            for d in &devices[..fit] {
                bytes.extend_from_slice(&d.to_bytes());
            }
            if fit > 0 && ctx.mem().write_slice(&bytes, GuestAddress(a0)).is_err() {
                b.status = status::BAD_ADDRESS;
                return;
            }
            b.ret = [devices.len() as u64, fit as u64];
        }
        Call::ConsoleWrite => {
            if a1 > wv_abi::MAX_CONSOLE_WRITE {
                b.status = status::BAD_LENGTH;
                return;
            }
            let mut buf = vec![0u8; a1 as usize];
            if ctx.mem().read_slice(&mut buf, GuestAddress(a0)).is_err() {
                b.status = status::BAD_ADDRESS;
                return;
            }
            b.ret = [if ctx.console_write(&buf) { a1 } else { 0 }, 0];
        }
        Call::Poweroff => match u8::try_from(a0) {
            Ok(code) => out.effect = Effect::Poweroff(code),
            Err(_) => b.status = status::BAD_LENGTH,
        },
        Call::Batch => {
            if !top {
                b.status = status::NOT_ALLOWED;
                return;
            }
            if a1 > wv_abi::MAX_BATCH {
                b.status = status::BAD_LENGTH;
                return;
            }
            let n = a1 as usize;
            let mut raw = vec![0u8; n * CALL_BLOCK_SIZE];
            if !a0.is_multiple_of(8) || ctx.mem().read_slice(&mut raw, GuestAddress(a0)).is_err() {
                b.status = status::BAD_ADDRESS;
                return;
            }
            let mut done = 0u64;
            for (i, chunk) in raw.chunks_exact(CALL_BLOCK_SIZE).enumerate() {
                let mut sub = CallBlock::from_bytes(chunk.try_into().expect("exact chunk"));
                perform(ctx, &mut sub, false, out);
                if let Some(c) = Call::from_nr(sub.nr) {
                    out.batched[c as usize] += 1;
                }
                let gpa = a0 + (i * CALL_BLOCK_SIZE) as u64;
                // The array was readable a moment ago; a failed write-back means the guest's
                // memory layout is broken and the batch stops.
                if !write_result(ctx.mem(), gpa, &sub) {
                    b.status = status::BAD_ADDRESS;
                    break;
                }
                done += 1;
                if out.effect != Effect::Continue {
                    break;
                }
            }
            b.ret = [done, 0];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ctx {
        mem: GuestMemoryMmap,
        info: MachineInfo,
        console: Vec<u8>,
        exits: u64,
    }

    impl CallContext for Ctx {
        fn mem(&self) -> &GuestMemoryMmap {
            &self.mem
        }
        fn machine(&self) -> &MachineInfo {
            &self.info
        }
        fn exit_count(&self) -> u64 {
            self.exits
        }
        fn vcpu_index(&self) -> u32 {
            1
        }
        fn console_write(&mut self, bytes: &[u8]) -> bool {
            self.console.extend_from_slice(bytes);
            true
        }
    }

    const MEM: usize = 1 << 20;

    fn ctx() -> Ctx {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let devices = vec![
            DeviceRecord {
                kind: 1,
                irq: 4,
                base: 0x3f8,
                len: 8,
                flags: 0,
                reserved: 0
            };
            3
        ];
        Ctx {
            mem,
            info: MachineInfo {
                mem_size: MEM as u64,
                vcpus: 2,
                devices,
                tsc_khz: 1234,
                generation_id: *b"0123456789abcdef",
                restores: 3,
            },
            console: vec![],
            exits: 7,
        }
    }

    fn put(c: &Ctx, gpa: u64, b: &CallBlock) {
        c.mem.write_slice(&b.to_bytes(), GuestAddress(gpa)).unwrap();
    }

    fn get(c: &Ctx, gpa: u64) -> CallBlock {
        let mut b = [0u8; CALL_BLOCK_SIZE];
        c.mem.read_slice(&mut b, GuestAddress(gpa)).unwrap();
        CallBlock::from_bytes(&b)
    }

    fn call(c: &mut Ctx, call: Call, args: [u64; 5]) -> (Outcome, CallBlock) {
        put(c, 0x1000, &CallBlock::new(call, args));
        let o = handle(c, 0x1000);
        (o, get(c, 0x1000))
    }

    #[test]
    fn simple_calls_report() {
        let mut c = ctx();
        let (o, b) = call(&mut c, Call::Version, [0; 5]);
        assert_eq!(
            (o.call, b.status, b.ret[0]),
            (Some(Call::Version), status::OK, 1)
        );
        let (_, b) = call(&mut c, Call::MemSize, [0; 5]);
        assert_eq!(b.ret, [MEM as u64, 2]);
        let (_, b) = call(&mut c, Call::ExitCount, [0; 5]);
        assert_eq!(b.ret, [7, 1]);
        let (_, b) = call(&mut c, Call::TscKhz, [0; 5]);
        assert_eq!(b.ret[0], 1234);
    }

    #[test]
    fn vm_generation_writes_the_id_and_counts_restores() {
        let mut c = ctx();
        let (_, b) = call(&mut c, Call::VmGeneration, [0x2001, 0, 0, 0, 0]);
        assert_eq!((b.status, b.ret), (status::OK, [3, 0]));
        let mut id = [0u8; wv_abi::GENERATION_ID_SIZE];
        c.mem.read_slice(&mut id, GuestAddress(0x2001)).unwrap();
        assert_eq!(&id, b"0123456789abcdef");
        for bad in [MEM as u64 - 8, u64::MAX - 4] {
            let (_, b) = call(&mut c, Call::VmGeneration, [bad, 0, 0, 0, 0]);
            assert_eq!((b.status, b.ret), (status::BAD_ADDRESS, [0, 0]), "{bad:#x}");
        }
        let mut tail = [0u8; 8];
        c.mem
            .read_slice(&mut tail, GuestAddress(MEM as u64 - 8))
            .unwrap();
        assert_eq!(tail, [0; 8], "nothing written by a refused call");
    }

    #[test]
    fn console_and_its_limits() {
        let mut c = ctx();
        c.mem.write_slice(b"hello", GuestAddress(0x2000)).unwrap();
        let (_, b) = call(&mut c, Call::ConsoleWrite, [0x2000, 5, 0, 0, 0]);
        assert_eq!((b.status, b.ret[0]), (status::OK, 5));
        assert_eq!(c.console, b"hello");
        let (_, b) = call(
            &mut c,
            Call::ConsoleWrite,
            [0x2000, wv_abi::MAX_CONSOLE_WRITE + 1, 0, 0, 0],
        );
        assert_eq!(b.status, status::BAD_LENGTH);
        let (_, b) = call(&mut c, Call::ConsoleWrite, [MEM as u64 - 2, 5, 0, 0, 0]);
        assert_eq!(
            b.status,
            status::BAD_ADDRESS,
            "range crossing the end of RAM"
        );
        let (_, b) = call(&mut c, Call::ConsoleWrite, [u64::MAX - 1, 5, 0, 0, 0]);
        assert_eq!(b.status, status::BAD_ADDRESS, "address overflow");
        assert_eq!(c.console, b"hello", "nothing written by refused calls");
    }

    #[test]
    fn unreachable_or_misaligned_blocks_are_invalid() {
        let mut c = ctx();
        let o = handle(&mut c, MEM as u64 - 32);
        assert_eq!((o.call, o.status), (None, status::BAD_ADDRESS));
        let o = handle(&mut c, 0x1004);
        assert_eq!(o.call, None);
        let o = handle(&mut c, 1 << 40);
        assert_eq!(o.call, None);
    }

    #[test]
    fn unknown_call_and_poweroff_codes() {
        let mut c = ctx();
        put(
            &c,
            0x1000,
            &CallBlock {
                nr: 999,
                status: status::PENDING,
                args: [0; 5],
                ret: [5; 2],
            },
        );
        let o = handle(&mut c, 0x1000);
        assert_eq!(
            (o.call, get(&c, 0x1000).status, o.effect),
            (None, status::UNKNOWN_CALL, Effect::Continue)
        );
        let (o, _) = call(&mut c, Call::Poweroff, [3, 0, 0, 0, 0]);
        assert_eq!(o.effect, Effect::Poweroff(3));
        let (o, b) = call(&mut c, Call::Poweroff, [256, 0, 0, 0, 0]);
        assert_eq!((o.effect, b.status), (Effect::Continue, status::BAD_LENGTH));
    }

    #[test]
    fn device_list_truncates_to_the_buffer() {
        let mut c = ctx();
        let (_, b) = call(
            &mut c,
            Call::DeviceList,
            [0x3000, 2 * DEVICE_RECORD_SIZE as u64 + 5, 0, 0, 0],
        );
        assert_eq!((b.status, b.ret), (status::OK, [3, 2]));
        let mut rec = [0u8; 4];
        c.mem
            .read_slice(&mut rec, GuestAddress(0x3000 + DEVICE_RECORD_SIZE as u64))
            .unwrap();
        assert_eq!(u32::from_le_bytes(rec), 1);
        let (_, b) = call(&mut c, Call::DeviceList, [MEM as u64 - 8, 1024, 0, 0, 0]);
        assert_eq!(b.status, status::BAD_ADDRESS);
    }

    #[test]
    fn batch_performs_each_and_refuses_nesting() {
        let mut c = ctx();
        c.mem.write_slice(b"ab", GuestAddress(0x2000)).unwrap();
        let subs = [
            CallBlock::new(Call::ConsoleWrite, [0x2000, 1, 0, 0, 0]),
            CallBlock::new(Call::Batch, [0x4000, 1, 0, 0, 0]),
            CallBlock {
                nr: 77,
                status: status::PENDING,
                args: [0; 5],
                ret: [0; 2],
            },
            CallBlock::new(Call::ConsoleWrite, [0x2001, 1, 0, 0, 0]),
        ];
        for (i, s) in subs.iter().enumerate() {
            put(&c, 0x4000 + 64 * i as u64, s);
        }
        let (o, b) = call(&mut c, Call::Batch, [0x4000, 4, 0, 0, 0]);
        assert_eq!((b.status, b.ret[0]), (status::OK, 4));
        assert_eq!(c.console, b"ab");
        let st: Vec<u32> = (0..4).map(|i| get(&c, 0x4000 + 64 * i).status).collect();
        assert_eq!(
            st,
            vec![
                status::OK,
                status::NOT_ALLOWED,
                status::UNKNOWN_CALL,
                status::OK
            ]
        );
        assert_eq!(o.batched[Call::ConsoleWrite as usize], 2);
        let (_, b) = call(
            &mut c,
            Call::Batch,
            [0x4000, wv_abi::MAX_BATCH + 1, 0, 0, 0],
        );
        assert_eq!(b.status, status::BAD_LENGTH);
        let (_, b) = call(&mut c, Call::Batch, [MEM as u64 - 64, 2, 0, 0, 0]);
        assert_eq!(b.status, status::BAD_ADDRESS);
    }

    #[test]
    fn batch_stops_at_poweroff() {
        let mut c = ctx();
        put(&c, 0x4000, &CallBlock::new(Call::Poweroff, [9, 0, 0, 0, 0]));
        put(&c, 0x4040, &CallBlock::new(Call::Version, [0; 5]));
        let (o, b) = call(&mut c, Call::Batch, [0x4000, 2, 0, 0, 0]);
        assert_eq!((o.effect, b.ret[0]), (Effect::Poweroff(9), 1));
        assert_eq!(get(&c, 0x4040).status, status::PENDING);
    }
}
