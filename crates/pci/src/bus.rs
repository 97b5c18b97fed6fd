//! Bus 0 and configuration mechanism #1: the guest writes an address to 0xCF8 (enable bit,
//! bus, device, function, register) and reads or writes the register through 0xCFC-0xCFF.

use crate::config::ConfigSpace;
use std::sync::{Arc, Mutex};
use wv_devices::{DeviceAction, PioDevice};

/// The configuration address port; the data port is 0xCFC, both in one 8-port range.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// Ports covered by the bus (0xCF8-0xCFF).
pub const CONFIG_PORTS_LEN: u16 = 8;
const SLOTS: usize = 32;

/// A function on bus 0.
pub trait PciDevice: Send {
    /// Reads configuration space (1, 2 or 4 bytes at `offset`).
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    /// Writes configuration space.
    fn config_write(&mut self, offset: usize, data: &[u8]);
}

/// The host bridge at 00:00.0.
pub struct HostBridge(ConfigSpace);

impl Default for HostBridge {
    fn default() -> HostBridge {
        // Class 06/00/00: host bridge.
        HostBridge(ConfigSpace::new(0x8086, 0x0d57, [0x06, 0x00, 0x00], 0))
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.0.read(offset, data);
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.0.write(offset, data);
    }
}

/// Bus 0: up to 32 single-function devices.
pub struct PciBus {
    slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
    address: u32,
}

impl Default for PciBus {
    fn default() -> PciBus {
        let mut b = PciBus {
            slots: vec![None; SLOTS],
            address: 0,
        };
        b.slots[0] = Some(Arc::new(Mutex::new(HostBridge::default())));
        b
    }
}

impl PciBus {
    /// A bus with only the host bridge.
    pub fn new() -> PciBus {
        PciBus::default()
    }

    /// Puts `dev` in the first free slot; returns the slot, or None when the bus is full.
    pub fn add(&mut self, dev: Arc<Mutex<dyn PciDevice>>) -> Option<u8> {
        let slot = self.slots.iter().position(Option::is_none)?;
        self.slots[slot] = Some(dev);
        u8::try_from(slot).ok()
    }

    /// The device the address register selects and the register offset, if it exists.
    fn selected(&self) -> Option<(&Arc<Mutex<dyn PciDevice>>, usize)> {
        let a = self.address;
        let (enabled, bus, dev, func) = (
            a >> 31 == 1,
            (a >> 16) & 0xff,
            (a >> 11) & 0x1f,
            (a >> 8) & 7,
        );
        if !enabled || bus != 0 || func != 0 {
            return None;
        }
        let d = self.slots[dev as usize].as_ref()?;
        Some((d, (a & 0xfc) as usize))
    }
}

impl PioDevice for PciBus {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => match self.selected() {
                Some((d, reg)) => d
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .config_read(reg + usize::from(offset - 4), data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        match offset {
            0 if data.len() == 4 => {
                self.address =
                    u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & 0x80ff_fffc
            }
            4..=7 => {
                if let Some((d, reg)) = self.selected() {
                    d.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .config_write(reg + usize::from(offset - 4), data);
                }
            }
            _ => {}
        }
        DeviceAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_read32(b: &mut PciBus, dev: u32, reg: u32) -> u32 {
        b.write(0, &(0x8000_0000 | (dev << 11) | reg).to_le_bytes());
        let mut d = [0u8; 4];
        b.read(4, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn host_bridge_and_empty_slots() {
        let mut b = PciBus::new();
        assert_eq!(cfg_read32(&mut b, 0, 0), 0x0d57_8086);
        assert_eq!(cfg_read32(&mut b, 0, 8) >> 8, 0x06_0000);
        assert_eq!(cfg_read32(&mut b, 3, 0), 0xffff_ffff, "no device in slot 3");
        // Disabled address, other buses and functions read all ones.
        b.write(0, &0u32.to_le_bytes());
        let mut d = [0u8; 4];
        b.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        b.write(0, &(0x8001_0000u32).to_le_bytes());
        b.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
        b.write(0, &(0x8000_0100u32).to_le_bytes());
        b.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn sub_word_access_through_data_ports() {
        let mut b = PciBus::new();
        b.write(0, &0x8000_0000u32.to_le_bytes());
        let mut w = [0u8; 2];
        b.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0d57);
        let mut a = [0u8; 4];
        b.read(0, &mut a);
        assert_eq!(u32::from_le_bytes(a), 0x8000_0000);
    }

    #[test]
    fn full_bus_refuses() {
        let mut b = PciBus::new();
        for _ in 1..SLOTS {
            assert!(b.add(Arc::new(Mutex::new(HostBridge::default()))).is_some());
        }
        assert!(b.add(Arc::new(Mutex::new(HostBridge::default()))).is_none());
    }
}
