//! Instructions the host's instruction emulator cannot run, done by the VMM instead. On a host
//! without VMX/SVM (PVM), KVM emulates all guest kernel code, and its emulator rejects a few
//! instructions a stock Linux kernel executes early: `int3` (the kernel's self-test), `clac` and
//! `stac` (SMAP), `popcnt` (bit counting), `fwait` (FPU set-up), `ldmxcsr` (kernel_fpu_begin).
//! Only on such a host (with VMX or SVM, KVM injects #BP differently and never fails these),
//! only in 64-bit code with 64-bit addressing, and only when nothing else is pending and no
//! fault would be due (TF, CR0.TS/EM, CR4.OSFXSR); anything else stays fatal. Memory operands
//! are only read (KVM_TRANSLATE reports every page writable, so stores cannot be checked):
//! translated through the guest's page tables, within one page, from guest RAM; the accessed
//! bit is not set. On exactly that failure (an emulation-failure exit
//! carrying the instruction's bytes, at CPL 0, with no event pending) the VMM does what the
//! instruction would have done and the guest goes on; every other failure stays fatal with its
//! diagnostic. Each completion is counted per instruction in the exit accounting.

use crate::diagnose;
use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};
use wv_machine::GuestRam as GuestMemoryMmap;

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
    /// `ldmxcsr m32`: MXCSR loaded from memory.
    Ldmxcsr,
}

/// Guest memory as an instruction sees it: linear addresses through the guest's page tables.
pub trait GuestAccess {
    /// Reads `buf.len()` bytes at linear address `la` (within one page), or None.
    fn read(&mut self, la: u64, buf: &mut [u8]) -> Option<()>;
    /// Sets the SSE control and status register.
    fn set_mxcsr(&mut self, v: u32) -> Option<()>;
}

/// MXCSR bits a guest may set (DAZ included); a value with others set raises #GP, which is
/// left to the diagnostic.
const MXCSR_MASK: u32 = 0xffff;

/// The linear address of `insn`'s memory operand in 64-bit code: base and index must be 64-bit
/// registers (a 0x67 prefix, 32-bit addressing, is not completed), FS and GS add their base
/// (the other segments' bases are zero in long mode), and the result must be canonical.
fn linear(insn: &iced_x86::Instruction, regs: &mut kvm_regs, sregs: &kvm_sregs) -> Option<u64> {
    let mut a = insn.memory_displacement64();
    let base = insn.memory_base();
    if base != Register::None && base != Register::RIP {
        let (v, size) = gpr(regs, base)?;
        if size != 8 {
            return None;
        }
        a = a.wrapping_add(*v);
    }
    let index = insn.memory_index();
    if index != Register::None {
        let (v, size) = gpr(regs, index)?;
        if size != 8 {
            return None;
        }
        a = a.wrapping_add(v.wrapping_mul(u64::from(insn.memory_index_scale())));
    }
    match insn.memory_segment() {
        Register::FS => a = a.wrapping_add(sregs.fs.base),
        Register::GS => a = a.wrapping_add(sregs.gs.base),
        _ => {}
    }
    // Canonical: bits 63..47 all equal (4-level paging).
    let top = a >> 47;
    (top == 0 || top == 0x1_ffff).then_some(a)
}

const RFLAGS_AC: u64 = 1 << 18;
/// The arithmetic flags POPCNT writes: CF PF AF ZF SF OF.
const RFLAGS_ARITH: u64 = 0x8d5;
const RFLAGS_ZF: u64 = 1 << 6;
const RFLAGS_TF: u64 = 1 << 8;
const CR0_MP: u64 = 1 << 1;
const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR4_OSFXSR: u64 = 1 << 9;
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

/// Applies instruction `bytes` (decoded at `regs.rip` in the code size `sregs` give) to `regs`
/// and, for memory operands and MXCSR, through `mem`, when it is one the VMM completes; returns
/// what it did, or None (leaving `regs` as they were).
pub fn apply(
    bytes: &[u8],
    sregs: &kvm_sregs,
    regs: &mut kvm_regs,
    mem: &mut dyn GuestAccess,
) -> Option<Completed> {
    if diagnose::bitness(sregs) != 64 || regs.rflags & RFLAGS_TF != 0 {
        return None;
    }
    let insn = Decoder::with_ip(64, bytes, regs.rip, DecoderOptions::NONE).decode();
    if insn.is_invalid() {
        return None;
    }
    let done = match insn.mnemonic() {
        Mnemonic::Int3 => Completed::Int3,
        // #NM when CR0.MP and CR0.TS are both set.
        Mnemonic::Wait if sregs.cr0 & (CR0_MP | CR0_TS) != (CR0_MP | CR0_TS) => Completed::Fwait,
        Mnemonic::Clac => {
            regs.rflags &= !RFLAGS_AC;
            Completed::Clac
        }
        Mnemonic::Stac => {
            regs.rflags |= RFLAGS_AC;
            Completed::Stac
        }
        Mnemonic::Popcnt => {
            let dst = insn.op0_register();
            let (_, bytes) = gpr(regs, dst)?;
            let mask = if bytes >= 8 {
                u64::MAX
            } else {
                (1u64 << (bytes * 8)) - 1
            };
            let value = match insn.op1_kind() {
                OpKind::Register => *gpr(regs, insn.op1_register())?.0 & mask,
                OpKind::Memory => {
                    let la = linear(&insn, regs, sregs)?;
                    let mut b = [0u8; 8];
                    mem.read(la, &mut b[..bytes as usize])?;
                    u64::from_le_bytes(b)
                }
                _ => return None,
            };
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
        Mnemonic::Ldmxcsr
            if insn.op0_kind() == OpKind::Memory
                && sregs.cr0 & (CR0_TS | CR0_EM) == 0
                && sregs.cr4 & CR4_OSFXSR != 0 =>
        {
            let la = linear(&insn, regs, sregs)?;
            let mut b = [0u8; 4];
            mem.read(la, &mut b)?;
            let v = u32::from_le_bytes(b);
            if v & !MXCSR_MASK != 0 {
                return None;
            }
            mem.set_mxcsr(v)?;
            Completed::Ldmxcsr
        }
        _ => return None,
    };
    regs.rip = insn.next_ip();
    Some(done)
}

/// A vCPU's view of guest memory (KVM_TRANSLATE, then guest RAM) and of its MXCSR.
struct VcpuAccess<'a> {
    fd: &'a VcpuFd,
    ram: &'a GuestMemoryMmap,
}

impl VcpuAccess<'_> {
    /// The guest-physical address of linear `la` for a read of `len` bytes in one page.
    fn gpa(&self, la: u64, len: usize) -> Option<u64> {
        if (la & 0xfff) + len as u64 > 0x1000 {
            return None;
        }
        let t = self.fd.translate_gva(la).ok()?;
        (t.valid != 0).then_some(t.physical_address)
    }
}

impl GuestAccess for VcpuAccess<'_> {
    fn read(&mut self, la: u64, buf: &mut [u8]) -> Option<()> {
        let gpa = self.gpa(la, buf.len())?;
        self.ram.read_slice(buf, GuestAddress(gpa)).ok()
    }
    fn set_mxcsr(&mut self, v: u32) -> Option<()> {
        let mut f = self.fd.get_fpu().ok()?;
        f.mxcsr = v;
        self.fd.set_fpu(&f).ok()
    }
}

/// On an emulation-failure exit (on an emulating host: the caller checks) whose instruction
/// `bytes` are a CPL-0 instruction the VMM can complete: completes it (registers, memory, and
/// for `int3` the #BP through KVM_SET_VCPU_EVENTS) and says what it was.
pub fn complete(fd: &mut VcpuFd, ram: &GuestMemoryMmap, bytes: &[u8]) -> Option<Completed> {
    let (mut regs, sregs, mut events) = (
        fd.get_regs().ok()?,
        fd.get_sregs().ok()?,
        fd.get_vcpu_events().ok()?,
    );
    let pending = events.exception.injected != 0
        || events.exception.pending != 0
        || events.nmi.injected != 0
        || events.interrupt.injected != 0;
    if sregs.cs.selector & 3 != 0 || sregs.ss.dpl != 0 || pending {
        return None;
    }
    let before = regs;
    let done = apply(bytes, &sregs, &mut regs, &mut VcpuAccess { fd, ram })?;
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

    /// Guest memory for the tests: one page at linear 0x7000, and MXCSR.
    struct Page {
        bytes: [u8; 4096],
        mxcsr: u32,
    }

    impl GuestAccess for Page {
        fn read(&mut self, la: u64, buf: &mut [u8]) -> Option<()> {
            let at = usize::try_from(la.checked_sub(0x7000)?).ok()?;
            buf.copy_from_slice(self.bytes.get(at..at + buf.len())?);
            Some(())
        }
        fn set_mxcsr(&mut self, v: u32) -> Option<()> {
            self.mxcsr = v;
            Some(())
        }
    }

    fn long_mode() -> kvm_sregs {
        let mut s = kvm_sregs::default();
        s.cs.l = 1;
        s.gs.base = 0x6000;
        s.cr0 = 0x8005_0033;
        s.cr4 = 0x310ea0;
        s
    }

    fn regs() -> kvm_regs {
        kvm_regs {
            rip: 0x1000,
            rflags: 0x2 | RFLAGS_ARITH,
            rax: 0xdead_beef_0000_0000,
            rdi: 3,
            rbx: 0xffff_ffff_ffff_ffff,
            rsp: 0x7100,
            ..Default::default()
        }
    }

    fn page() -> Page {
        Page {
            bytes: [0; 4096],
            mxcsr: 0x1f80,
        }
    }

    fn run(bytes: &[u8], r: &mut kvm_regs, p: &mut Page) -> Option<Completed> {
        apply(bytes, &long_mode(), r, p)
    }

    #[test]
    fn completes_the_instructions_the_emulator_lacks() {
        let mut p = page();
        // popcnt rax, rdi (the Linux kernel's, from the boot that stopped on it).
        let mut r = regs();
        let bytes = [0xf3, 0x48, 0x0f, 0xb8, 0xc7, 0x41, 0x01];
        assert_eq!(run(&bytes, &mut r, &mut p), Some(Completed::Popcnt));
        assert_eq!((r.rax, r.rip), (2, 0x1005));
        assert_eq!(
            r.rflags, 0x2,
            "arithmetic flags cleared, ZF clear for a nonzero source"
        );
        // popcnt eax, ebx: 32 bits counted, the destination zero-extended.
        let mut r = regs();
        assert_eq!(
            run(&[0xf3, 0x0f, 0xb8, 0xc3], &mut r, &mut p),
            Some(Completed::Popcnt)
        );
        assert_eq!(r.rax, 32);
        // popcnt ax, si with a zero source: ZF set, upper bits of rax kept.
        let mut r = regs();
        r.rsi = 0xffff_0000;
        assert_eq!(
            run(&[0x66, 0xf3, 0x0f, 0xb8, 0xc6], &mut r, &mut p),
            Some(Completed::Popcnt)
        );
        assert_eq!(r.rax, 0xdead_beef_0000_0000);
        assert_eq!(r.rflags, 0x2 | RFLAGS_ZF);
        // popcnt rax, [rsp+8]: from memory.
        let mut r = regs();
        p.bytes[0x108..0x110].copy_from_slice(&0x0f0fu64.to_le_bytes());
        assert_eq!(
            run(&[0xf3, 0x48, 0x0f, 0xb8, 0x44, 0x24, 0x08], &mut r, &mut p),
            Some(Completed::Popcnt)
        );
        assert_eq!(r.rax, 8);
        // clac / stac.
        let mut r = regs();
        r.rflags |= RFLAGS_AC;
        assert_eq!(
            run(&[0x0f, 0x01, 0xca], &mut r, &mut p),
            Some(Completed::Clac)
        );
        assert_eq!((r.rflags & RFLAGS_AC, r.rip), (0, 0x1003));
        assert_eq!(
            run(&[0x0f, 0x01, 0xcb], &mut r, &mut p),
            Some(Completed::Stac)
        );
        assert_ne!(r.rflags & RFLAGS_AC, 0);
        // fwait: only RIP moves (`complete` checks no x87 exception is pending).
        let mut r = regs();
        assert_eq!(run(&[0x9b, 0x65], &mut r, &mut p), Some(Completed::Fwait));
        assert_eq!(r.rip, 0x1001);
        // ldmxcsr [rsp+4] (the kernel's, from kernel_fpu_begin), ldmxcsr gs:[0x1010].
        let mut r = regs();
        p.bytes[0x104..0x108].copy_from_slice(&0x1fa0u32.to_le_bytes());
        assert_eq!(
            run(&[0x0f, 0xae, 0x54, 0x24, 0x04], &mut r, &mut p),
            Some(Completed::Ldmxcsr)
        );
        assert_eq!((p.mxcsr, r.rip), (0x1fa0, 0x1005));
        let mut r = regs();
        p.bytes[0x10..0x14].copy_from_slice(&0x1f80u32.to_le_bytes());
        let ldmxcsr_gs = [0x65, 0x0f, 0xae, 0x14, 0x25, 0x10, 0x10, 0x00, 0x00];
        assert_eq!(run(&ldmxcsr_gs, &mut r, &mut p), Some(Completed::Ldmxcsr));
        assert_eq!(p.mxcsr, 0x1f80);
        // int3: only RIP moves (the #BP is injected by `complete`).
        let mut r = regs();
        assert_eq!(run(&[0xcc], &mut r, &mut p), Some(Completed::Int3));
        assert_eq!(r.rip, 0x1001);
    }

    #[test]
    fn leaves_everything_else_alone() {
        let mut p = page();
        p.bytes[0x104..0x108].copy_from_slice(&0x1_0000u32.to_le_bytes());
        for bytes in [
            &[0xf3, 0x48, 0x0f, 0xb8, 0x01][..], // popcnt rax, [rcx]: unmapped
            &[0x0f, 0xae, 0x54, 0x24, 0x04][..], // ldmxcsr of a reserved bit: #GP
            &[0x67, 0x0f, 0xae, 0x54, 0x24, 0x04][..], // ldmxcsr [esp+4]: 32-bit addressing
            &[0x0f, 0xae, 0x5c, 0x24, 0x04][..], // stmxcsr [rsp+4]: stores are not done
            &[0x0f, 0x01, 0xd1][..],             // xsetbv
            &[0x0f, 0x0b][..],                   // ud2
            &[0x0f][..],                         // truncated
        ] {
            let mut r = regs();
            assert_eq!(run(bytes, &mut r, &mut p), None, "{bytes:x?}");
            assert_eq!(r.rip, 0x1000);
            assert_eq!(r.rax, regs().rax);
            assert_eq!(p.mxcsr, 0x1f80);
        }
        // Not with TF set (a #DB would be due), not outside 64-bit code, not fwait with
        // CR0.MP|TS (#NM), not ldmxcsr with CR0.TS (#NM).
        let mut r = regs();
        r.rflags |= RFLAGS_TF;
        assert_eq!(run(&[0x0f, 0x01, 0xca], &mut r, &mut p), None);
        let mut s32 = long_mode();
        s32.cs.l = 0;
        s32.cs.db = 1;
        assert_eq!(apply(&[0x0f, 0x01, 0xca], &s32, &mut regs(), &mut p), None);
        let mut ts = long_mode();
        ts.cr0 |= CR0_TS;
        assert_eq!(apply(&[0x9b], &ts, &mut regs(), &mut p), None);
        p.bytes[0x104..0x108].copy_from_slice(&0x1fa0u32.to_le_bytes());
        assert_eq!(
            apply(&[0x0f, 0xae, 0x54, 0x24, 0x04], &ts, &mut regs(), &mut p),
            None
        );
    }
}
