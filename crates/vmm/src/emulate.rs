//! Instructions the host's instruction emulator cannot run, done by the VMM instead. On a host
//! without VMX/SVM (PVM), KVM emulates all guest kernel code, and its emulator rejects a few
//! instructions a stock Linux kernel executes early: `int3` (the kernel's self-test), `clac` and
//! `stac` (SMAP), `popcnt` (bit counting), `fwait` (FPU set-up). On exactly that failure (an emulation-failure exit
//! carrying the instruction's bytes, at CPL 0, with no event pending) the VMM does what the
//! instruction would have done and the guest goes on; every other failure stays fatal with its
//! diagnostic. Each completion is counted per instruction in the exit accounting.

use crate::diagnose;
use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};
use kvm_bindings::kvm_regs;
use kvm_ioctls::VcpuFd;

/// What the VMM completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completed {
    /// `int3`: #BP raised with RIP past the instruction.
    Int3,
    /// `clac`: RFLAGS.AC cleared.
    Clac,
    /// `stac`: RFLAGS.AC set.
    Stac,
    /// `popcnt` with a register source.
    Popcnt,
    /// `fwait` with no x87 exception pending: nothing to do.
    Fwait,
}

const RFLAGS_AC: u64 = 1 << 18;
/// The arithmetic flags POPCNT writes: CF PF AF ZF SF OF.
const RFLAGS_ARITH: u64 = 0x8d5;
const RFLAGS_ZF: u64 = 1 << 6;
/// The x87 status word's exception summary bit.
const FSW_ES: u16 = 1 << 7;

/// A general-purpose register of 16, 32 or 64 bits: its slot in `kvm_regs` and its size in
/// bytes.
fn gpr(regs: &mut kvm_regs, r: Register) -> Option<(&mut u64, u32)> {
    use Register::*;
    let i = match r {
        RAX | EAX | AX => 0,
        RBX | EBX | BX => 1,
        RCX | ECX | CX => 2,
        RDX | EDX | DX => 3,
        RSI | ESI | SI => 4,
        RDI | EDI | DI => 5,
        RBP | EBP | BP => 6,
        RSP | ESP | SP => 7,
        R8 | R8D | R8W => 8,
        R9 | R9D | R9W => 9,
        R10 | R10D | R10W => 10,
        R11 | R11D | R11W => 11,
        R12 | R12D | R12W => 12,
        R13 | R13D | R13W => 13,
        R14 | R14D | R14W => 14,
        R15 | R15D | R15W => 15,
        _ => return Option::None,
    };
    let size = match r {
        RAX | RBX | RCX | RDX | RSI | RDI | RBP | RSP | R8 | R9 | R10 | R11 | R12 | R13 | R14
        | R15 => 8,
        EAX | EBX | ECX | EDX | ESI | EDI | EBP | ESP | R8D | R9D | R10D | R11D | R12D | R13D
        | R14D | R15D => 4,
        _ => 2,
    };
    let slot = match i {
        0 => &mut regs.rax,
        1 => &mut regs.rbx,
        2 => &mut regs.rcx,
        3 => &mut regs.rdx,
        4 => &mut regs.rsi,
        5 => &mut regs.rdi,
        6 => &mut regs.rbp,
        7 => &mut regs.rsp,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        _ => &mut regs.r15,
    };
    Some((slot, size))
}

/// Applies instruction `bytes` (decoded at `regs.rip` in `bitness`-bit code) to `regs` when it
/// is one the VMM completes; returns what it did, or None (leaving `regs` as they were).
pub fn apply(bytes: &[u8], bitness: u32, regs: &mut kvm_regs) -> Option<Completed> {
    let insn = Decoder::with_ip(bitness, bytes, regs.rip, DecoderOptions::NONE).decode();
    if insn.is_invalid() {
        return None;
    }
    let done = match insn.mnemonic() {
        Mnemonic::Int3 => Completed::Int3,
        Mnemonic::Wait => Completed::Fwait,
        Mnemonic::Clac => {
            regs.rflags &= !RFLAGS_AC;
            Completed::Clac
        }
        Mnemonic::Stac => {
            regs.rflags |= RFLAGS_AC;
            Completed::Stac
        }
        Mnemonic::Popcnt if insn.op1_kind() == OpKind::Register => {
            let (dst, src) = (insn.op0_register(), insn.op1_register());
            let (v, bytes) = gpr(regs, src)?;
            let mask = if bytes >= 8 {
                u64::MAX
            } else {
                (1u64 << (bytes * 8)) - 1
            };
            let value = *v & mask;
            let count = u64::from(value.count_ones());
            let (d, dbytes) = gpr(regs, dst)?;
            // A 32-bit destination zero-extends; a 16-bit one keeps the upper bits.
            *d = match dbytes {
                2 => (*d & !0xffff) | count,
                _ => count,
            };
            regs.rflags &= !RFLAGS_ARITH;
            if value == 0 {
                regs.rflags |= RFLAGS_ZF;
            }
            Completed::Popcnt
        }
        _ => return None,
    };
    regs.rip = insn.next_ip();
    Some(done)
}

/// On an emulation-failure exit of a CPL-0 instruction the VMM can complete: completes it
/// (registers, and for `int3` the #BP through KVM_SET_VCPU_EVENTS) and says what it was.
pub fn complete(fd: &mut VcpuFd) -> Option<Completed> {
    let run = fd.get_kvm_run();
    // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member.
    let ie = unsafe { run.__bindgen_anon_1.internal };
    let n = (ie.ndata as usize).min(ie.data.len());
    let bytes = diagnose::emulation_bytes(ie.suberror, &ie.data[..n])?;
    let (mut regs, sregs, mut events) = (
        fd.get_regs().ok()?,
        fd.get_sregs().ok()?,
        fd.get_vcpu_events().ok()?,
    );
    if sregs.cs.selector & 3 != 0 || events.exception.injected != 0 {
        return None;
    }
    let before = regs;
    let done = apply(&bytes, diagnose::bitness(&sregs), &mut regs)?;
    // fwait with an unmasked x87 exception pending would raise #MF: not completed here.
    if done == Completed::Fwait && fd.get_fpu().map_or(true, |f| f.fsw & FSW_ES != 0) {
        return None;
    }
    if fd.set_regs(&regs).is_err() {
        return None;
    }
    if done == Completed::Int3 {
        events.exception.injected = 1;
        events.exception.nr = 3;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        if fd.set_vcpu_events(&events).is_err() {
            let _ = fd.set_regs(&before);
            return None;
        }
    }
    Some(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> kvm_regs {
        kvm_regs {
            rip: 0x1000,
            rflags: 0x2 | RFLAGS_ARITH,
            rax: 0xdead_beef_0000_0000,
            rdi: 3,
            rbx: 0xffff_ffff_ffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn completes_the_instructions_the_emulator_lacks() {
        // popcnt rax, rdi (the Linux kernel's, from the boot that stopped on it).
        let mut r = regs();
        let bytes = [0xf3, 0x48, 0x0f, 0xb8, 0xc7, 0x41, 0x01];
        assert_eq!(apply(&bytes, 64, &mut r), Some(Completed::Popcnt));
        assert_eq!((r.rax, r.rip), (2, 0x1005));
        assert_eq!(
            r.rflags, 0x2,
            "arithmetic flags cleared, ZF clear for a nonzero source"
        );
        // popcnt eax, ebx: 32 bits counted, the destination zero-extended.
        let mut r = regs();
        assert_eq!(
            apply(&[0xf3, 0x0f, 0xb8, 0xc3], 64, &mut r),
            Some(Completed::Popcnt)
        );
        assert_eq!(r.rax, 32);
        // popcnt ax, si with a zero source: ZF set, upper bits of rax kept.
        let mut r = regs();
        r.rsi = 0xffff_0000;
        assert_eq!(
            apply(&[0x66, 0xf3, 0x0f, 0xb8, 0xc6], 64, &mut r),
            Some(Completed::Popcnt)
        );
        assert_eq!(r.rax, 0xdead_beef_0000_0000);
        assert_eq!(r.rflags, 0x2 | RFLAGS_ZF);
        // clac / stac.
        let mut r = regs();
        r.rflags |= RFLAGS_AC;
        assert_eq!(
            apply(&[0x0f, 0x01, 0xca], 64, &mut r),
            Some(Completed::Clac)
        );
        assert_eq!((r.rflags & RFLAGS_AC, r.rip), (0, 0x1003));
        assert_eq!(
            apply(&[0x0f, 0x01, 0xcb], 64, &mut r),
            Some(Completed::Stac)
        );
        assert_ne!(r.rflags & RFLAGS_AC, 0);
        // fwait: only RIP moves (`complete` checks no x87 exception is pending).
        let mut r = regs();
        assert_eq!(apply(&[0x9b, 0x65], 64, &mut r), Some(Completed::Fwait));
        assert_eq!(r.rip, 0x1001);
        // int3: only RIP moves (the #BP is injected by `complete`).
        let mut r = regs();
        assert_eq!(apply(&[0xcc], 64, &mut r), Some(Completed::Int3));
        assert_eq!(r.rip, 0x1001);
    }

    #[test]
    fn leaves_everything_else_alone() {
        for bytes in [
            &[0xf3, 0x48, 0x0f, 0xb8, 0x01][..], // popcnt rax, [rcx]: memory source
            &[0x0f, 0x01, 0xd1][..],             // xsetbv
            &[0x0f, 0x0b][..],                   // ud2
            &[0x0f][..],                         // truncated
        ] {
            let mut r = regs();
            assert_eq!(apply(bytes, 64, &mut r), None, "{bytes:x?}");
            assert_eq!(r.rip, 0x1000);
            assert_eq!(r.rax, regs().rax);
        }
    }
}
