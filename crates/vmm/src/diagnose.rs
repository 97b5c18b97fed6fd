//! Diagnostics a person can read when KVM cannot run the guest: the failing instruction
//! decoded (mnemonic and operands) with its raw bytes and the byte at RIP marked, and the
//! registers, as one block for stderr.

use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
use kvm_bindings::{kvm_regs, kvm_sregs};

/// KVM_INTERNAL_ERROR_EMULATION: the instruction emulator failed.
pub const SUBERROR_EMULATION: u32 = 1;
/// KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: the exit carries the instruction bytes.
const FLAG_INSTRUCTION_BYTES: u64 = 1;

/// Up to 15 instruction bytes, kept inline (read on every emulation-failure exit, most of
/// which the VMM completes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InsnBytes {
    buf: [u8; 15],
    len: usize,
}

impl std::ops::Deref for InsnBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The instruction bytes an emulation-failure exit carries (`data[0]` holds the flags, then a
/// size byte and up to 15 bytes fetched at RIP), or None when KVM gave none.
pub fn emulation_bytes(suberror: u32, data: &[u64]) -> Option<InsnBytes> {
    if suberror != SUBERROR_EMULATION || data.len() < 2 || data[0] & FLAG_INSTRUCTION_BYTES == 0 {
        return None;
    }
    let mut raw = [0u8; 16];
    for (i, w) in data[1..].iter().take(2).enumerate() {
        raw[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
    }
    let avail = 8 * (data.len() - 1).min(2) - 1;
    let len = usize::from(raw[0]).min(15).min(avail);
    let mut buf = [0u8; 15];
    buf.copy_from_slice(&raw[1..16]);
    (len > 0).then_some(InsnBytes { buf, len })
}

/// The code size of the guest's current code segment: 64, 32 or 16 bits.
pub fn bitness(sregs: &kvm_sregs) -> u32 {
    if sregs.cs.l == 1 {
        64
    } else if sregs.cs.db == 1 {
        32
    } else {
        16
    }
}

/// The code size as text: "64-bit", "32-bit" or "16-bit".
pub fn mode(sregs: &kvm_sregs) -> &'static str {
    match bitness(sregs) {
        64 => "64-bit",
        32 => "32-bit",
        _ => "16-bit",
    }
}

/// The first instruction in `bytes` at `rip`: its text (Intel syntax) and length, or None when
/// the bytes are not a valid instruction.
pub fn decode(bytes: &[u8], bitness: u32, rip: u64) -> Option<(String, usize)> {
    let mut d = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let insn = d.decode();
    if insn.is_invalid() {
        return None;
    }
    let mut text = String::new();
    IntelFormatter::new().format(&insn, &mut text);
    Some((text, insn.len()))
}

/// The bytes as hex, the one at RIP (the first) marked `<..>`, the decoded instruction's bytes
/// apart from what was fetched after it.
pub fn hex_marked(bytes: &[u8], insn_len: usize) -> String {
    let mut s = String::new();
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        if i == insn_len && i > 0 {
            s.push_str("| ");
        }
        if i == 0 {
            s.push_str(&format!("<{b:02x}>"));
        } else {
            s.push_str(&format!("{b:02x}"));
        }
    }
    s
}

/// The general-purpose, segment and control registers, a few per line, each line indented.
pub fn registers(r: &kvm_regs, s: &kvm_sregs) -> String {
    let mode = mode(s);
    format!(
        "  rip {:#018x}  rflags {:#x}  cs {:#06x} (cpl {}, {mode})\n\
         \x20 rax {:#018x}  rbx {:#018x}  rcx {:#018x}  rdx {:#018x}\n\
         \x20 rsi {:#018x}  rdi {:#018x}  rbp {:#018x}  rsp {:#018x}\n\
         \x20 r8  {:#018x}  r9  {:#018x}  r10 {:#018x}  r11 {:#018x}\n\
         \x20 r12 {:#018x}  r13 {:#018x}  r14 {:#018x}  r15 {:#018x}\n\
         \x20 cr0 {:#x}  cr2 {:#x}  cr3 {:#x}  cr4 {:#x}  efer {:#x}\n",
        r.rip,
        r.rflags,
        s.cs.selector,
        s.cs.dpl,
        r.rax,
        r.rbx,
        r.rcx,
        r.rdx,
        r.rsi,
        r.rdi,
        r.rbp,
        r.rsp,
        r.r8,
        r.r9,
        r.r10,
        r.r11,
        r.r12,
        r.r13,
        r.r14,
        r.r15,
        s.cr0,
        s.cr2,
        s.cr3,
        s.cr4,
        s.efer
    )
}

/// The instruction line and bytes line of a block, from the bytes an exit carried.
pub fn instruction(bytes: &[u8], bitness: u32, rip: u64) -> (String, String) {
    match decode(bytes, bitness, rip) {
        Some((text, len)) => (text, hex_marked(bytes, len)),
        None => (
            "(not a valid instruction)".to_string(),
            hex_marked(bytes, 0),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The words KVM gave for the probe guest's `popcnt rax, [rcx]` on MMIO (seen on this host).
    const POPCNT_EXIT: [u64; 3] = [0x1, 0x08ba_01b8_0f48_f30f, 0xf631_df89_4800_0001];

    #[test]
    fn the_bytes_of_an_emulation_failure_exit() {
        let b = emulation_bytes(SUBERROR_EMULATION, &POPCNT_EXIT).unwrap();
        assert_eq!(b.len(), 15);
        assert_eq!(&b[..5], &[0xf3, 0x48, 0x0f, 0xb8, 0x01]);
        // No bytes without the flag, for another suberror, or with too few words.
        assert_eq!(
            emulation_bytes(SUBERROR_EMULATION, &[0, POPCNT_EXIT[1]]),
            None
        );
        assert_eq!(emulation_bytes(3, &POPCNT_EXIT), None);
        assert_eq!(emulation_bytes(SUBERROR_EMULATION, &[1]), None);
        // A size byte larger than what follows is clamped.
        assert_eq!(
            emulation_bytes(SUBERROR_EMULATION, &[1, 0x0000_0000_0000_90ff]).unwrap()[0],
            0x90
        );
    }

    #[test]
    fn decodes_and_marks_the_failing_instruction() {
        let b = emulation_bytes(SUBERROR_EMULATION, &POPCNT_EXIT).unwrap();
        let (text, bytes) = instruction(&b, 64, 0x12bc03);
        assert_eq!(text, "popcnt rax,[rcx]");
        assert!(bytes.starts_with("<f3> 48 0f b8 01 | ba 08"), "{bytes}");
        // In 32-bit code 0x48 is no REX prefix but an instruction of its own.
        assert_ne!(decode(&b, 32, 0).unwrap().1, 5);
        let (text, bytes) = instruction(&[0x0f, 0xff], 64, 0);
        assert!(
            text.starts_with("ud0") || text.contains("not a valid"),
            "{text}"
        );
        assert!(bytes.starts_with("<0f>"), "{bytes}");
    }
}
