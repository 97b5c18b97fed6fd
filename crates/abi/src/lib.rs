//! The Worldvisor paravirtual ABI: what a guest sees of the hypervisor beyond plain x86.
//!
//! Shared by the VMM and by guests (the probe guest is built from this very crate), so the two
//! sides can never disagree on a number. `docs/PVABI.md` is the prose version of this file.
//!
//! Detection: CPUID leaf [`CPUID_SIGNATURE_LEAF`] returns [`SIGNATURE`] in ebx/ecx/edx; leaf
//! [`CPUID_FEATURES_LEAF`] returns the ABI version, feature bits and the call port. KVM's own
//! paravirtual leaves move to [`CPUID_KVM_BASE`] so stock Linux still finds kvmclock.
//!
//! Calls: the guest fills a [`CallBlock`] in its memory (below 4 GiB, 8-byte aligned) and
//! writes its guest-physical address with a 32-bit `out` to [`CALL_PORT`]. That is one VM exit;
//! the VMM reads the block, performs the call and writes `status` and `ret` back before the
//! guest resumes. [`Call::Batch`] performs up to [`MAX_BATCH`] calls in that single exit.
#![cfg_attr(not(test), no_std)]

/// CPUID leaf carrying the hypervisor signature (and, in eax, the highest Worldvisor leaf).
pub const CPUID_SIGNATURE_LEAF: u32 = 0x4000_0000;
/// CPUID leaf carrying eax = ABI version, ebx = feature bits, ecx = call port.
pub const CPUID_FEATURES_LEAF: u32 = 0x4000_0001;
/// Where KVM's paravirtual leaves (0x40000000/1 natively) are moved to.
pub const CPUID_KVM_BASE: u32 = 0x4000_0100;
/// The 12-byte signature returned in ebx, ecx, edx of [`CPUID_SIGNATURE_LEAF`].
pub const SIGNATURE: [u8; 12] = *b"WorldvisorVM";
/// Version of this ABI.
pub const ABI_VERSION: u32 = 1;
/// The I/O port a guest writes a call block's address to ("WV").
pub const CALL_PORT: u16 = 0x5756;

/// Feature bits reported in ebx of [`CPUID_FEATURES_LEAF`] and by [`Call::Version`].
pub mod features {
    /// The call port exists.
    pub const CALL_PORT: u32 = 1 << 0;
    /// [`super::Call::Batch`] is available.
    pub const BATCH: u32 = 1 << 1;
    /// [`super::Call::ConsoleWrite`] is available.
    pub const CONSOLE: u32 = 1 << 2;
    /// [`super::Call::ExitCount`] is available.
    pub const EXIT_COUNT: u32 = 1 << 3;
    /// [`super::Call::VmGeneration`] is available.
    pub const VM_GENERATION: u32 = 1 << 4;
    /// Everything this version offers.
    pub const ALL: u32 = CALL_PORT | BATCH | CONSOLE | EXIT_COUNT | VM_GENERATION;
}

/// Call numbers.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// ret\[0\] = ABI version, ret\[1\] = feature bits.
    Version = 0,
    /// ret\[0\] = guest RAM in bytes as configured, ret\[1\] = number of vCPUs.
    MemSize = 1,
    /// args\[0\] = GPA of a buffer, args\[1\] = its length in bytes. Fills [`DeviceRecord`]s;
    /// ret\[0\] = number of devices (may exceed what fit), ret\[1\] = records written.
    DeviceList = 2,
    /// args\[0\] = GPA of bytes, args\[1\] = length (at most [`MAX_CONSOLE_WRITE`]): written to the
    /// serial console's output as one piece. ret\[0\] = bytes written.
    ConsoleWrite = 3,
    /// args\[0\] = exit code (0-255): the VM ends and `wv run` exits with that code.
    Poweroff = 4,
    /// args\[0\] = GPA of an array of [`CallBlock`]s, args\[1\] = count (at most [`MAX_BATCH`]).
    /// Each is performed in order with its own status; a nested batch is refused.
    /// ret\[0\] = number performed.
    Batch = 5,
    /// ret\[0\] = VM exits of the calling vCPU so far (this one included), ret\[1\] = its index.
    ExitCount = 6,
    /// ret\[0\] = TSC frequency in kHz (0 if unknown).
    TscKhz = 7,
    /// The VM's generation (as ACPI VMGenID): args\[0\] = GPA of a [`GENERATION_ID_SIZE`]-byte
    /// buffer that receives the generation identifier, a random 128-bit value drawn anew at
    /// every boot and every restore (so two clones of one snapshot, or a VM and its restored
    /// copy, never share it); ret\[0\] = how many times this VM's state has been restored
    /// from a snapshot (0 for a VM that booted and was never restored).
    VmGeneration = 8,
}

/// Number of defined calls (call numbers are `0..CALL_COUNT`).
pub const CALL_COUNT: u32 = 9;

/// Size of the identifier [`Call::VmGeneration`] writes, in bytes.
pub const GENERATION_ID_SIZE: usize = 16;

impl Call {
    /// The call with number `nr`, if it exists.
    pub const fn from_nr(nr: u32) -> Option<Call> {
        Some(match nr {
            0 => Call::Version,
            1 => Call::MemSize,
            2 => Call::DeviceList,
            3 => Call::ConsoleWrite,
            4 => Call::Poweroff,
            5 => Call::Batch,
            6 => Call::ExitCount,
            7 => Call::TscKhz,
            8 => Call::VmGeneration,
            _ => return None,
        })
    }

    /// A short stable name, used in exit statistics.
    pub const fn name(self) -> &'static str {
        match self {
            Call::Version => "version",
            Call::MemSize => "mem_size",
            Call::DeviceList => "device_list",
            Call::ConsoleWrite => "console_write",
            Call::Poweroff => "poweroff",
            Call::Batch => "batch",
            Call::ExitCount => "exit_count",
            Call::TscKhz => "tsc_khz",
            Call::VmGeneration => "vm_generation",
        }
    }
}

/// Status values written to [`CallBlock::status`].
pub mod status {
    /// The call was performed.
    pub const OK: u32 = 0;
    /// No call has this number.
    pub const UNKNOWN_CALL: u32 = 1;
    /// An address argument points outside guest RAM.
    pub const BAD_ADDRESS: u32 = 2;
    /// A length or count argument is out of range.
    pub const BAD_LENGTH: u32 = 3;
    /// The call is not allowed here (a batch inside a batch).
    pub const NOT_ALLOWED: u32 = 4;
    /// The VMM has not written a status (the guest's initial value, by convention).
    pub const PENDING: u32 = 0xffff_ffff;
}

/// Largest console write, in bytes.
pub const MAX_CONSOLE_WRITE: u64 = 4096;
/// Largest batch, in calls.
pub const MAX_BATCH: u64 = 64;

/// One call: 64 bytes, little-endian, 8-byte aligned, in guest memory below 4 GiB.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallBlock {
    /// Call number ([`Call`]).
    pub nr: u32,
    /// Written by the VMM ([`status`]).
    pub status: u32,
    /// Arguments.
    pub args: [u64; 5],
    /// Results.
    pub ret: [u64; 2],
}

/// Size of a [`CallBlock`] in bytes.
pub const CALL_BLOCK_SIZE: usize = 64;
const _: () = assert!(core::mem::size_of::<CallBlock>() == CALL_BLOCK_SIZE);

impl CallBlock {
    /// A block for call `call` with arguments `args` and status [`status::PENDING`].
    pub const fn new(call: Call, args: [u64; 5]) -> CallBlock {
        CallBlock {
            nr: call as u32,
            status: status::PENDING,
            args,
            ret: [0; 2],
        }
    }

    /// Decodes a block from its 64 bytes.
    pub fn from_bytes(b: &[u8; CALL_BLOCK_SIZE]) -> CallBlock {
        let u64_at = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(w)
        };
        let u32_at = |o: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(w)
        };
        CallBlock {
            nr: u32_at(0),
            status: u32_at(4),
            args: [u64_at(8), u64_at(16), u64_at(24), u64_at(32), u64_at(40)],
            ret: [u64_at(48), u64_at(56)],
        }
    }

    /// Encodes the block into its 64 bytes.
    pub fn to_bytes(&self) -> [u8; CALL_BLOCK_SIZE] {
        let mut b = [0u8; CALL_BLOCK_SIZE];
        b[0..4].copy_from_slice(&self.nr.to_le_bytes());
        b[4..8].copy_from_slice(&self.status.to_le_bytes());
        for (i, a) in self.args.iter().enumerate() {
            b[8 + 8 * i..16 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        b[48..56].copy_from_slice(&self.ret[0].to_le_bytes());
        b[56..64].copy_from_slice(&self.ret[1].to_le_bytes());
        b
    }
}

/// Device kinds in a [`DeviceRecord`].
pub mod device_kind {
    /// 16550 UART (port I/O).
    pub const UART_16550: u32 = 1;
    /// i8042 keyboard controller, used for reset (port I/O).
    pub const I8042: u32 = 2;
    /// The Worldvisor call port (port I/O).
    pub const CALL_PORT: u32 = 3;
    /// Local APIC (MMIO).
    pub const LAPIC: u32 = 4;
    /// I/O APIC (MMIO).
    pub const IOAPIC: u32 = 5;
    /// i8254 PIT (port I/O).
    pub const PIT: u32 = 6;
}

/// [`DeviceRecord::flags`] bit: the range is MMIO (otherwise port I/O).
pub const DEVICE_FLAG_MMIO: u32 = 1;
/// [`DeviceRecord::irq`] value for "no interrupt".
pub const NO_IRQ: u32 = 0xffff_ffff;

/// One device, as written by [`Call::DeviceList`]: 32 bytes, little-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceRecord {
    /// [`device_kind`].
    pub kind: u32,
    /// ISA IRQ / GSI, or [`NO_IRQ`].
    pub irq: u32,
    /// First port or MMIO address.
    pub base: u64,
    /// Length of the range in bytes.
    pub len: u64,
    /// [`DEVICE_FLAG_MMIO`] and reserved bits.
    pub flags: u32,
    /// Zero.
    pub reserved: u32,
}

/// Size of a [`DeviceRecord`] in bytes.
pub const DEVICE_RECORD_SIZE: usize = 32;
const _: () = assert!(core::mem::size_of::<DeviceRecord>() == DEVICE_RECORD_SIZE);

impl DeviceRecord {
    /// Encodes the record into its 32 bytes.
    pub fn to_bytes(&self) -> [u8; DEVICE_RECORD_SIZE] {
        let mut b = [0u8; DEVICE_RECORD_SIZE];
        b[0..4].copy_from_slice(&self.kind.to_le_bytes());
        b[4..8].copy_from_slice(&self.irq.to_le_bytes());
        b[8..16].copy_from_slice(&self.base.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..28].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// The checksum the probe guest verifies over an initrd (`probe.initrd=SIZE:SUM`): little-endian
/// 64-bit words (the last one zero-padded), folded as `h = rotl(h, 5) ^ w`. Cheap per word, so
/// the guest can afford it in emulated kernel mode.
pub fn initrd_checksum(data: &[u8]) -> u64 {
    let mut h: u64 = 0x5756_5756_5756_5756;
    for chunk in data.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h = h.rotate_left(5) ^ u64::from_le_bytes(w);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_block_round_trips() {
        let mut b = CallBlock::new(Call::ConsoleWrite, [1, 2, 3, 4, 5]);
        b.ret = [6, 7];
        assert_eq!(CallBlock::from_bytes(&b.to_bytes()), b);
        assert_eq!(&b.to_bytes()[0..4], &3u32.to_le_bytes());
    }

    #[test]
    fn call_numbers_are_dense_and_named() {
        for nr in 0..CALL_COUNT {
            let c = Call::from_nr(nr).expect("dense");
            assert_eq!(c as u32, nr);
            assert!(!c.name().is_empty());
        }
        assert_eq!(Call::from_nr(CALL_COUNT), None);
    }

    #[test]
    fn checksum_pads_last_word() {
        assert_eq!(initrd_checksum(b"abc"), initrd_checksum(b"abc\0\0\0\0\0"));
        assert_ne!(initrd_checksum(b"abc"), initrd_checksum(b"abd"));
    }
}
