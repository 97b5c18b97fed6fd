//! PCI configuration access through mechanism #1 (ports 0xCF8/0xCFC) and bus-0 enumeration.

use core::arch::asm;

/// Writes a 32-bit word to an I/O port.
pub fn outl(port: u16, v: u32) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nostack, preserves_flags)) }
}

/// Reads a 32-bit word from an I/O port.
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for outl.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nostack, preserves_flags)) }
    v
}

/// Reads the 32-bit configuration register `reg` of bus 0, device `dev`, function 0.
pub fn read32(dev: u8, reg: u8) -> u32 {
    outl(
        0xcf8,
        0x8000_0000 | (u32::from(dev) << 11) | u32::from(reg & 0xfc),
    );
    inl(0xcfc)
}

/// Writes the 32-bit configuration register `reg` of bus 0, device `dev`, function 0.
pub fn write32(dev: u8, reg: u8, v: u32) {
    outl(
        0xcf8,
        0x8000_0000 | (u32::from(dev) << 11) | u32::from(reg & 0xfc),
    );
    outl(0xcfc, v);
}

/// A function found on bus 0.
#[derive(Clone, Copy, Default)]
pub struct Function {
    /// Slot.
    pub dev: u8,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code (base << 16 | sub << 8 | prog-if).
    pub class: u32,
}

/// Scans bus 0 (function 0 of each slot); returns how many functions were found.
pub fn scan(out: &mut [Function; 32]) -> usize {
    let mut n = 0;
    for dev in 0..32u8 {
        let id = read32(dev, 0);
        if id == 0xffff_ffff || id == 0 {
            continue;
        }
        out[n] = Function {
            dev,
            vendor: id as u16,
            device: (id >> 16) as u16,
            class: read32(dev, 8) >> 8,
        };
        n += 1;
    }
    n
}
