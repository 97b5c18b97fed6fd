//! The port I/O bus.
#![allow(clippy::cast_possible_truncation)] // test-only narrowing

use std::sync::{Arc, Mutex};

/// What a device asks of the VM after a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceAction {
    /// Nothing.
    None,
    /// The guest asked for a system reset.
    Reset,
    /// The guest powered off (ACPI S5).
    Poweroff,
}

/// A device on the port I/O bus. `offset` is relative to the device's base port.
pub trait PioDevice: Send {
    /// Guest `in`: fill `data`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Guest `out`.
    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction;
}

struct Entry {
    base: u16,
    len: u16,
    name: &'static str,
    dev: Arc<Mutex<dyn PioDevice>>,
}

/// Devices by port range; ranges never overlap.
#[derive(Default)]
pub struct PioBus {
    entries: Vec<Entry>,
}

/// Why a device could not be added.
#[derive(Debug, PartialEq, Eq)]
pub struct OverlapError {
    /// The new device.
    pub name: &'static str,
    /// The device already there.
    pub existing: &'static str,
}

impl std::fmt::Display for OverlapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "port range of {} overlaps {}", self.name, self.existing)
    }
}

impl PioBus {
    /// An empty bus.
    pub fn new() -> PioBus {
        PioBus::default()
    }

    /// Adds a device at `[base, base + len)`; returns its index.
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        name: &'static str,
        dev: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<usize, OverlapError> {
        let end = u32::from(base) + u32::from(len);
        for e in &self.entries {
            let e_end = u32::from(e.base) + u32::from(e.len);
            if u32::from(base) < e_end && u32::from(e.base) < end {
                return Err(OverlapError {
                    name,
                    existing: e.name,
                });
            }
        }
        self.entries.push(Entry {
            base,
            len,
            name,
            dev,
        });
        Ok(self.entries.len() - 1)
    }

    /// The device covering `port` (index, offset), if any.
    #[inline]
    pub fn lookup(&self, port: u16) -> Option<(usize, u16)> {
        self.entries
            .iter()
            .position(|e| port >= e.base && u32::from(port) < u32::from(e.base) + u32::from(e.len))
            .map(|i| (i, port - self.entries[i].base))
    }

    /// Reads from device `index`.
    pub fn read(&self, index: usize, offset: u16, data: &mut [u8]) {
        let mut d = self.entries[index]
            .dev
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        d.read(offset, data);
    }

    /// Writes to device `index`.
    pub fn write(&self, index: usize, offset: u16, data: &[u8]) -> DeviceAction {
        let mut d = self.entries[index]
            .dev
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        d.write(offset, data)
    }

    /// Device names by index.
    pub fn names(&self) -> Vec<&'static str> {
        self.entries.iter().map(|e| e.name).collect()
    }

    /// (base, len) by index.
    pub fn ranges(&self) -> Vec<(u16, u16)> {
        self.entries.iter().map(|e| (e.base, e.len)).collect()
    }
}

/// Fills a read from a port nothing answers: all ones, as on a PC's floating bus.
pub fn unassigned_read(data: &mut [u8]) {
    data.fill(0xff);
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl PioDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u16, data: &[u8]) -> DeviceAction {
            self.0 = data[0];
            if data[0] == 0xfe {
                DeviceAction::Reset
            } else {
                DeviceAction::None
            }
        }
    }

    #[test]
    fn routes_by_range_and_refuses_overlap() {
        let mut bus = PioBus::new();
        let a = bus
            .insert(0x3f8, 8, "a", Arc::new(Mutex::new(Echo(1))))
            .unwrap();
        let b = bus
            .insert(0x60, 5, "b", Arc::new(Mutex::new(Echo(2))))
            .unwrap();
        assert_eq!(bus.lookup(0x3fa), Some((a, 2)));
        assert_eq!(bus.lookup(0x64), Some((b, 4)));
        assert_eq!(bus.lookup(0x65), None);
        assert_eq!(bus.lookup(0xffff), None);
        let err = bus
            .insert(0x3ff, 2, "c", Arc::new(Mutex::new(Echo(0))))
            .unwrap_err();
        assert_eq!(
            err,
            OverlapError {
                name: "c",
                existing: "a"
            }
        );
        let mut d = [0u8; 1];
        bus.read(a, 2, &mut d);
        assert_eq!(d[0], 3);
        assert_eq!(bus.write(b, 4, &[0xfe]), DeviceAction::Reset);
        // A range that ends at the top of the port space.
        bus.insert(0xfff0, 16, "top", Arc::new(Mutex::new(Echo(0))))
            .unwrap();
        assert!(bus.lookup(0xffff).is_some());
    }

    #[test]
    fn unassigned_reads_float_high() {
        let mut d = [0u8; 4];
        unassigned_read(&mut d);
        assert_eq!(d, [0xff; 4]);
    }
}
