//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI (and the probe
//! guest) finds every vCPU, the I/O APIC and the ISA interrupt wiring. It is written into the
//! last KiB of conventional memory, the first place guests scan for the floating pointer.
#![allow(clippy::cast_possible_truncation)] // table fields are bounded by MAX_CPUS and the EBDA size

use crate::layout::{EBDA_START, IOAPIC_ADDR, LAPIC_ADDR, LEGACY_HOLE_START};

/// Most vCPUs the table has room for in the EBDA's last KiB.
pub const MAX_CPUS: u8 = 32;
/// ISA interrupts routed to the I/O APIC.
const ISA_IRQS: u8 = 16;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

/// Why the table could not be built.
#[derive(Debug, PartialEq, Eq)]
pub enum MpTableError {
    /// Zero or more than [`MAX_CPUS`] processors.
    CpuCount(u8),
}

impl std::fmt::Display for MpTableError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MpTableError::CpuCount(n) => {
                write!(
                    f,
                    "an MP table describes 1 to {MAX_CPUS} processors, not {n}"
                )
            }
        }
    }
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The I/O APIC's ID: the first one after the processors' APIC IDs.
pub fn ioapic_id(cpus: u8) -> u8 {
    cpus
}

/// Builds the floating pointer and configuration table for `cpus` processors with APIC IDs
/// `0..cpus` (0 is the boot processor). Returns the bytes to place at [`EBDA_START`].
pub fn build(cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(MpTableError::CpuCount(cpus));
    }
    let table_addr = EBDA_START as u32 + 16;
    let mut t: Vec<u8> = Vec::with_capacity(1024);
    // Configuration table header (44 bytes); length, count and checksum patched below.
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&[0, 0, 4, 0]);
    t.extend_from_slice(b"WRLDVSR ");
    t.extend_from_slice(b"WV-MACHINE  ");
    t.extend_from_slice(&[0; 4]); // OEM table pointer
    t.extend_from_slice(&[0; 2]); // OEM table size
    t.extend_from_slice(&[0; 2]); // entry count
    t.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    t.extend_from_slice(&[0; 4]); // extended length, checksum, reserved
    let mut entries: u16 = 0;
    for id in 0..cpus {
        let flags = if id == 0 { 0x3 } else { 0x1 }; // enabled, boot processor
        t.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        t.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        t.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        t.extend_from_slice(&[0; 8]);
        entries += 1;
    }
    t.extend_from_slice(&[1, 0]);
    t.extend_from_slice(b"ISA   ");
    entries += 1;
    t.extend_from_slice(&[2, ioapic_id(cpus), IOAPIC_VERSION, 1]);
    t.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    entries += 1;
    for irq in 0..ISA_IRQS {
        // I/O interrupt: INT, conforming polarity/trigger, ISA bus, irq -> I/O APIC pin irq.
        t.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id(cpus), irq]);
        entries += 1;
    }
    // Local interrupts: LINT0 = ExtINT (the 8259), LINT1 = NMI, to every local APIC.
    t.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    t.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    entries += 2;
    let len = t.len() as u16;
    t[4..6].copy_from_slice(&len.to_le_bytes());
    t[34..36].copy_from_slice(&entries.to_le_bytes());
    t[7] = checksum(&t);

    let mut fp = Vec::with_capacity(16 + t.len());
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&t);
    debug_assert!(EBDA_START + fp.len() as u64 <= LEGACY_HOLE_START);
    Ok(fp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        for n in [1u8, 2, 7, MAX_CPUS] {
            let b = build(n).unwrap();
            assert!(
                EBDA_START + b.len() as u64 <= LEGACY_HOLE_START,
                "{n} cpus overflow the EBDA"
            );
            assert_eq!(&b[0..4], b"_MP_");
            assert_eq!(sum(&b[0..16]), 0);
            let t = &b[16..];
            assert_eq!(&t[0..4], b"PCMP");
            let len = u16::from_le_bytes([t[4], t[5]]) as usize;
            assert_eq!(len, t.len());
            assert_eq!(sum(t), 0);
            let count = u16::from_le_bytes([t[34], t[35]]);
            assert_eq!(count, u16::from(n) + 2 + 16 + 2);
            // Processor entries come first, APIC IDs 0..n, only the first is the BSP.
            for i in 0..n as usize {
                let e = &t[44 + 20 * i..];
                assert_eq!((e[0], e[1]), (0, i as u8));
                assert_eq!(e[3] & 2 != 0, i == 0);
            }
        }
    }

    #[test]
    fn refuses_bad_counts() {
        assert_eq!(build(0), Err(MpTableError::CpuCount(0)));
        assert_eq!(
            build(MAX_CPUS + 1),
            Err(MpTableError::CpuCount(MAX_CPUS + 1))
        );
    }
}
