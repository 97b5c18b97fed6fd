//! The MMIO bus: guest-physical ranges (PCI BARs) routed to devices. Built once, then only
//! read by vCPU threads; each device has its own lock.
#![allow(clippy::cast_possible_truncation)] // test-only narrowing of offsets

use std::sync::{Arc, Mutex};

/// A device on the MMIO bus. `offset` is relative to the range's start.
pub trait MmioDevice: Send {
    /// Guest read: fill `data`.
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write.
    fn mmio_write(&mut self, offset: u64, data: &[u8]);
}

struct Entry {
    base: u64,
    len: u64,
    name: &'static str,
    dev: Arc<Mutex<dyn MmioDevice>>,
}

/// Devices by MMIO range; ranges never overlap.
#[derive(Default)]
pub struct MmioBus {
    entries: Vec<Entry>,
}

impl MmioBus {
    /// An empty bus.
    pub fn new() -> MmioBus {
        MmioBus::default()
    }

    /// Adds a device at `[base, base + len)`; returns its index, or None if it overlaps.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        name: &'static str,
        dev: Arc<Mutex<dyn MmioDevice>>,
    ) -> Option<usize> {
        let end = base.checked_add(len)?;
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return None;
        }
        self.entries.push(Entry {
            base,
            len,
            name,
            dev,
        });
        Some(self.entries.len() - 1)
    }

    /// The device covering `[addr, addr + len)` (index, offset), if one covers all of it.
    #[inline]
    pub fn lookup(&self, addr: u64, len: usize) -> Option<(usize, u64)> {
        let end = addr.checked_add(len as u64)?;
        let i = self
            .entries
            .iter()
            .position(|e| addr >= e.base && end <= e.base + e.len)?;
        Some((i, addr - self.entries[i].base))
    }

    /// Reads from device `index`.
    pub fn read(&self, index: usize, offset: u64, data: &mut [u8]) {
        self.entries[index]
            .dev
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .mmio_read(offset, data);
    }

    /// Writes to device `index`.
    pub fn write(&self, index: usize, offset: u64, data: &[u8]) {
        self.entries[index]
            .dev
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .mmio_write(offset, data);
    }

    /// Device names by index.
    pub fn names(&self) -> Vec<&'static str> {
        self.entries.iter().map(|e| e.name).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem([u8; 16]);
    impl MmioDevice for Mem {
        fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn mmio_write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn ranges_route_and_straddling_accesses_do_not() {
        let mut b = MmioBus::new();
        let i = b
            .insert(0xc000_0000, 16, "m", Arc::new(Mutex::new(Mem([0; 16]))))
            .unwrap();
        assert!(b
            .insert(0xc000_0008, 16, "x", Arc::new(Mutex::new(Mem([0; 16]))))
            .is_none());
        assert!(b
            .insert(u64::MAX - 4, 16, "y", Arc::new(Mutex::new(Mem([0; 16]))))
            .is_none());
        assert_eq!(b.lookup(0xc000_0004, 4), Some((i, 4)));
        assert_eq!(b.lookup(0xc000_000e, 4), None, "straddles the end");
        assert_eq!(b.lookup(u64::MAX, 8), None);
        b.write(i, 4, &[1, 2, 3, 4]);
        let mut d = [0u8; 2];
        b.read(i, 5, &mut d);
        assert_eq!(d, [2, 3]);
    }
}
