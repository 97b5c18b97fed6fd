//! A type-0 configuration header with write masks, BARs and a capability list, and its saved
//! state ([`ConfigSpaceState`]).
#![allow(clippy::cast_possible_truncation)] // capability offsets are below 256 (asserted)

use serde::{Deserialize, Serialize};
use wv_devices::Snapshot;

/// Offset of the first BAR.
pub const BAR0: usize = 0x10;
/// Offset of the capabilities pointer.
pub const CAP_POINTER: usize = 0x34;
/// Status register bit: capabilities list present.
const STATUS_CAP_LIST: u16 = 1 << 4;
/// First byte available for capabilities.
const CAP_START: usize = 0x40;

/// 256 bytes of configuration space and which bits the guest may change.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; 256],
    writable: [u8; 256],
    bars: [Option<Bar>; 6],
    next_cap: usize,
    last_cap: Option<usize>,
}

/// A 32-bit memory BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// Guest-physical address (assigned by the VMM; the guest may move it).
    pub addr: u32,
    /// Size, a power of two of at least 16 bytes.
    pub size: u32,
}

impl ConfigSpace {
    /// A header for `vendor:device` with class code `class` (base, sub, prog-if) and revision.
    pub fn new(vendor: u16, device: u16, class: [u8; 3], revision: u8) -> ConfigSpace {
        let mut c = ConfigSpace {
            bytes: [0; 256],
            writable: [0; 256],
            bars: [None; 6],
            next_cap: CAP_START,
            last_cap: None,
        };
        c.put16(0x00, vendor);
        c.put16(0x02, device);
        c.bytes[0x08] = revision;
        c.bytes[0x09] = class[2];
        c.bytes[0x0a] = class[1];
        c.bytes[0x0b] = class[0];
        // Command: I/O space, memory space, bus master, interrupt disable are the guest's.
        c.writable[0x04] = 0x07;
        c.writable[0x05] = 0x04;
        // Interrupt line is scratch for the guest.
        c.writable[0x3c] = 0xff;
        c
    }

    /// Sets the subsystem vendor and device IDs.
    pub fn set_subsystem(&mut self, vendor: u16, device: u16) {
        self.put16(0x2c, vendor);
        self.put16(0x2e, device);
    }

    /// Sets the interrupt pin (1 = INTA#) and the line the VMM wired it to.
    pub fn set_interrupt(&mut self, pin: u8, line: u8) {
        self.bytes[0x3d] = pin;
        self.bytes[0x3c] = line;
    }

    fn put16(&mut self, at: usize, v: u16) {
        self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(&mut self, at: usize, v: u32) {
        self.bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Installs 32-bit memory BAR `index` at `addr` with `size` (a power of two >= 16).
    pub fn set_bar(&mut self, index: usize, addr: u32, size: u32) {
        assert!(index < 6 && size.is_power_of_two() && size >= 16 && addr.is_multiple_of(size));
        self.bars[index] = Some(Bar { addr, size });
        let at = BAR0 + 4 * index;
        self.put32(at, addr);
        // Address bits above the size are the guest's; the low bits read as the type (0: 32-bit
        // memory, not prefetchable).
        let mask = !(size - 1);
        self.writable[at..at + 4].copy_from_slice(&mask.to_le_bytes());
    }

    /// The BAR `index`, with its current address.
    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    /// Adds a capability with `id` and `body` (the bytes after id and next pointer); `writable`
    /// masks the body. Returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> usize {
        let at = self.next_cap;
        let len = 2 + body.len();
        assert!(at + len <= 256 && writable.len() == body.len());
        self.bytes[at] = id;
        self.bytes[at + 1] = 0;
        self.bytes[at + 2..at + len].copy_from_slice(body);
        self.writable[at + 2..at + len].copy_from_slice(writable);
        match self.last_cap {
            None => {
                self.bytes[CAP_POINTER] = at as u8;
                let status = u16::from_le_bytes([self.bytes[6], self.bytes[7]]) | STATUS_CAP_LIST;
                self.put16(0x06, status);
            }
            Some(prev) => self.bytes[prev + 1] = at as u8,
        }
        self.last_cap = Some(at);
        self.next_cap = (at + len + 3) & !3;
        at
    }

    /// Reads `data.len()` bytes (1, 2 or 4, naturally aligned) at `offset`.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        match self.bytes.get(offset..offset + data.len()) {
            Some(b) if aligned(offset, data.len()) => data.copy_from_slice(b),
            _ => data.fill(0xff),
        }
    }

    /// Writes through the write mask; returns the BAR index whose address changed, if any.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Option<usize> {
        if !aligned(offset, data.len()) || offset + data.len() > 256 {
            return None;
        }
        for (i, &b) in data.iter().enumerate() {
            let m = self.writable[offset + i];
            self.bytes[offset + i] = (self.bytes[offset + i] & !m) | (b & m);
        }
        if (BAR0..BAR0 + 24).contains(&offset) {
            let index = (offset - BAR0) / 4;
            if let Some(bar) = self.bars[index].as_mut() {
                let at = BAR0 + 4 * index;
                let v = u32::from_le_bytes([
                    self.bytes[at],
                    self.bytes[at + 1],
                    self.bytes[at + 2],
                    self.bytes[at + 3],
                ]);
                if v != bar.addr {
                    bar.addr = v;
                    return Some(index);
                }
            }
        }
        None
    }

    /// Mutable access to a capability's body bytes (device-side updates).
    pub fn bytes_mut(&mut self, offset: usize, len: usize) -> &mut [u8] {
        &mut self.bytes[offset..offset + len]
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.bytes[4], self.bytes[5]])
    }
}

/// A configuration space as saved: its 256 bytes (BARs, command register, capabilities and
/// all). The write masks are not saved: they are fixed when the device is built, and a restore
/// into a device built the same way checks every read-only bit against them instead.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigSpaceState {
    /// The 256 bytes of conventional configuration space.
    pub bytes: Vec<u8>,
}

impl Snapshot for ConfigSpace {
    type State = ConfigSpaceState;

    fn save(&self) -> Result<ConfigSpaceState, String> {
        Ok(ConfigSpaceState {
            bytes: self.bytes.to_vec(),
        })
    }

    /// Takes the bits the guest can write from `state`; every read-only bit must equal this
    /// device's (a state of another device, or an edited one, is refused). BARs take the
    /// addresses in the restored bytes.
    fn restore(&mut self, state: ConfigSpaceState) -> Result<(), String> {
        let bytes: [u8; 256] = state.bytes.as_slice().try_into().map_err(|_| {
            format!(
                "PCI configuration space: {} bytes saved, 256 expected",
                state.bytes.len()
            )
        })?;
        if let Some(i) = (0..256).find(|&i| (bytes[i] ^ self.bytes[i]) & !self.writable[i] != 0) {
            return Err(format!(
                "PCI configuration space: read-only byte {i:#04x} is {:#04x} in the state but {:#04x} in this device (a state of another device?)",
                bytes[i], self.bytes[i]
            ));
        }
        self.bytes = bytes;
        for (index, bar) in self.bars.iter_mut().enumerate() {
            if let Some(bar) = bar {
                let at = BAR0 + 4 * index;
                bar.addr =
                    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
            }
        }
        Ok(())
    }
}

fn aligned(offset: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len)
}

/// Hands out naturally aligned 32-bit MMIO ranges from a window.
pub struct BarAllocator {
    next: u64,
    end: u64,
}

impl BarAllocator {
    /// Allocates from `[start, end)`.
    pub fn new(start: u64, end: u64) -> BarAllocator {
        BarAllocator { next: start, end }
    }

    /// A range of `size` (a power of two) aligned to its size, or None when the window is full.
    pub fn allocate(&mut self, size: u32) -> Option<u32> {
        let size = u64::from(size);
        let at = self.next.next_multiple_of(size);
        if at + size > self.end {
            return None;
        }
        self.next = at + size;
        u32::try_from(at).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd32(c: &ConfigSpace, at: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(at, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn ids_are_read_only() {
        let mut c = ConfigSpace::new(0x1af4, 0x1044, [0xff, 0, 0], 1);
        c.write(0, &0xdead_beefu32.to_le_bytes());
        assert_eq!(rd32(&c, 0), 0x1044_1af4);
        c.write(4, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), 0x0407);
    }

    #[test]
    fn bar_sizing_protocol() {
        let mut c = ConfigSpace::new(1, 2, [0, 0, 0], 0);
        c.set_bar(0, 0xc000_0000, 0x8000);
        assert_eq!(rd32(&c, BAR0), 0xc000_0000);
        // The guest writes all ones and reads back the size mask.
        assert_eq!(c.write(BAR0, &[0xff; 4]), Some(0));
        assert_eq!(rd32(&c, BAR0), 0xffff_8000);
        assert_eq!(c.write(BAR0, &0xc000_0000u32.to_le_bytes()), Some(0));
        assert_eq!(c.bar(0).unwrap().addr, 0xc000_0000);
        // An unimplemented BAR reads 0 and ignores writes.
        c.write(BAR0 + 4, &[0xff; 4]);
        assert_eq!(rd32(&c, BAR0 + 4), 0);
    }

    #[test]
    fn capabilities_are_chained() {
        let mut c = ConfigSpace::new(1, 2, [0, 0, 0], 0);
        let a = c.add_capability(0x09, &[1, 2, 3], &[0, 0, 0]);
        let b = c.add_capability(0x11, &[0; 10], &[0xff; 10]);
        assert_eq!(c.bytes[CAP_POINTER] as usize, a);
        assert_eq!(c.bytes[a + 1] as usize, b);
        assert_eq!(c.bytes[b + 1], 0);
        assert_ne!(rd32(&c, 4) & (u32::from(STATUS_CAP_LIST) << 16), 0);
    }

    #[test]
    fn bad_accesses_are_harmless() {
        let mut c = ConfigSpace::new(1, 2, [0, 0, 0], 0);
        let before = c.bytes;
        assert_eq!(c.write(255, &[1, 2]), None);
        assert_eq!(c.write(3, &[1, 2, 3, 4]), None);
        assert_eq!(c.write(254, &[1, 2, 3]), None);
        assert_eq!(c.bytes, before);
        let mut d = [0u8; 4];
        c.read(254, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn state_round_trips_and_only_writable_bits_may_differ() {
        let fresh = || {
            let mut c = ConfigSpace::new(0x1af4, 0x1042, [1, 0x80, 0], 1);
            c.set_bar(0, 0xc000_0000, 0x8000);
            c.add_capability(0x11, &[1, 2, 3, 4], &[0, 0xc0, 0, 0]);
            c
        };
        let mut c = fresh();
        c.write(4, &0x0006u16.to_le_bytes());
        assert_eq!(c.write(BAR0, &0xc010_0000u32.to_le_bytes()), Some(0));
        c.write(0x3c, &[11]);
        let saved = c.save().unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let back: ConfigSpaceState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        let mut d = fresh();
        d.restore(back).unwrap();
        assert_eq!(d.bytes, c.bytes);
        assert_eq!(d.command(), 6);
        assert_eq!(d.bar(0).unwrap().addr, 0xc010_0000, "the moved BAR");
        assert_eq!(rd32(&d, BAR0), 0xc010_0000);
        // Sizing still answers with the size after a restore.
        d.write(BAR0, &[0xff; 4]);
        assert_eq!(rd32(&d, BAR0), 0xffff_8000);

        // Hostile states: wrong length, a changed ID, a BAR's read-only low bits, a capability
        // pointer. Each is refused and changes nothing.
        let mut e = fresh();
        let before = e.bytes;
        let err = e
            .restore(ConfigSpaceState {
                bytes: vec![0; 255],
            })
            .unwrap_err();
        assert!(err.contains("255 bytes"), "{err}");
        for (at, v) in [
            (0usize, 0x34u8),
            (BAR0, 0x08),
            (CAP_POINTER, 0x44),
            (0x42, 0x09),
        ] {
            let mut b = saved.bytes.clone();
            b[at] = v;
            let err = e.restore(ConfigSpaceState { bytes: b }).unwrap_err();
            assert!(err.contains(&format!("{at:#04x}")), "{err}");
            assert_eq!(e.bytes, before);
        }
    }

    #[test]
    fn allocator_aligns_and_fills() {
        let mut a = BarAllocator::new(0xc000_1000, 0xc001_0000);
        assert_eq!(a.allocate(0x8000), Some(0xc000_8000));
        assert_eq!(a.allocate(0x1000), None);
        let mut a = BarAllocator::new(0xc000_0000, 0xc001_0000);
        assert_eq!(a.allocate(0x8000), Some(0xc000_0000));
        assert_eq!(a.allocate(0x8000), Some(0xc000_8000));
        assert_eq!(a.allocate(16), None);
    }
}
