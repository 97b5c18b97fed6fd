//! Transparent paravirtualization (seed 003): detect Worldvisor once at boot, then route
//! operations through VMM calls when it is there and through native instructions when not.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};
use wv_abi::{Call, CallBlock};

static ON_WORLDVISOR: AtomicBool = AtomicBool::new(false);

/// CPUID with leaf and subleaf.
pub fn cpuid(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: cpuid has no memory effects; rbx is saved because LLVM reserves it.
    unsafe {
        asm!("mov {tmp:r}, rbx", "cpuid", "xchg {tmp:r}, rbx",
             tmp = out(reg) b, inout("eax") leaf => a, inout("ecx") sub => c, out("edx") d,
             options(nostack, preserves_flags));
    }
    (a, b, c, d)
}

/// Reads the hypervisor signature leaf; returns (max leaf, 12 signature bytes).
pub fn hypervisor_signature() -> (u32, [u8; 12]) {
    let (a, b, c, d) = cpuid(wv_abi::CPUID_SIGNATURE_LEAF, 0);
    let mut sig = [0u8; 12];
    sig[0..4].copy_from_slice(&b.to_le_bytes());
    sig[4..8].copy_from_slice(&c.to_le_bytes());
    sig[8..12].copy_from_slice(&d.to_le_bytes());
    (a, sig)
}

/// Detects Worldvisor (unless `allowed` is false, which forces the native paths).
pub fn detect(allowed: bool) -> bool {
    let (_, _, ecx, _) = cpuid(1, 0);
    let hypervisor_bit = ecx & (1 << 31) != 0;
    let (max, sig) = hypervisor_signature();
    let found =
        allowed && hypervisor_bit && sig == wv_abi::SIGNATURE && max >= wv_abi::CPUID_FEATURES_LEAF;
    ON_WORLDVISOR.store(found, Ordering::Relaxed);
    found
}

/// The global flag of seed 003 [0016]: true when VMM calls are to be used.
pub fn on_worldvisor() -> bool {
    ON_WORLDVISOR.load(Ordering::Relaxed)
}

/// Performs one call: a single `out` of the block's address to the call port.
pub fn call(block: &mut CallBlock) {
    let addr = block as *mut CallBlock as u64;
    // SAFETY: the VMM reads and writes only this block (and buffers its arguments name); the
    // block lives below 4 GiB in identity-mapped memory, so its address fits in eax.
    unsafe {
        asm!("out dx, eax", in("dx") wv_abi::CALL_PORT, in("eax") addr as u32,
             options(nostack, preserves_flags));
    }
}

/// A call with up to five arguments; returns (status, ret0, ret1).
pub fn call_args(c: Call, args: [u64; 5]) -> (u32, u64, u64) {
    let mut b = CallBlock::new(c, args);
    call(&mut b);
    let b = unsafe_read(&b);
    (b.status, b.ret[0], b.ret[1])
}

/// A call by raw number (to exercise the VMM's handling of unknown calls).
pub fn call_args_nr(nr: u32, args: [u64; 5]) -> (u32, u64, u64) {
    let mut b = CallBlock {
        nr,
        status: wv_abi::status::PENDING,
        args,
        ret: [0; 2],
    };
    call(&mut b);
    let b = unsafe_read(&b);
    (b.status, b.ret[0], b.ret[1])
}

/// Re-reads a block the VMM wrote behind the compiler's back.
fn unsafe_read(b: &CallBlock) -> CallBlock {
    // SAFETY: `b` is a valid reference; volatile keeps the compiler from reusing stale values.
    unsafe { core::ptr::read_volatile(b) }
}

/// Performs a batch of calls in one exit; returns (status, number performed).
pub fn batch(blocks: &mut [CallBlock]) -> (u32, u64) {
    let (st, n, _) = call_args(
        Call::Batch,
        [blocks.as_mut_ptr() as u64, blocks.len() as u64, 0, 0, 0],
    );
    (st, n)
}

/// This vCPU's exit count according to the VMM (this call's exit included).
pub fn exit_count() -> u64 {
    call_args(Call::ExitCount, [0; 5]).1
}

/// The VM generation (`Call::VmGeneration`): (the 128-bit generation id, how many times the VM
/// was restored), or None without Worldvisor or when the VMM refuses the call.
pub fn vm_generation() -> Option<([u8; wv_abi::GENERATION_ID_SIZE], u64)> {
    if !on_worldvisor() {
        return None;
    }
    let mut id = [0u8; wv_abi::GENERATION_ID_SIZE];
    // The buffer is on this stack, identity mapped: its address is its guest-physical address.
    let (st, restores, _) = call_args(Call::VmGeneration, [id.as_mut_ptr() as u64, 0, 0, 0, 0]);
    // SAFETY: `id` is a valid local array the VMM wrote behind the compiler's back.
    let id = unsafe { core::ptr::read_volatile(&id) };
    (st == wv_abi::status::OK).then_some((id, restores))
}
