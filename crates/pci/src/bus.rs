//! Bus 0 and its two ways in: configuration mechanism #1 (the guest writes an address to 0xCF8
//! — enable bit, bus, device, function, register — and reads or writes the register through
//! 0xCFC-0xCFF) and ECAM, the memory-mapped window the ACPI MCFG table names (4 KiB per
//! function; registers past the 256 of conventional configuration space read as zero). The
//! bus's own state (the address latch and the host bridge) is saved as [`PciBusState`].

use crate::config::{ConfigSpace, ConfigSpaceState};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use wv_devices::{DeviceAction, MmioDevice, PioDevice, Snapshot};

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

impl Snapshot for HostBridge {
    type State = ConfigSpaceState;
    fn save(&self) -> Result<ConfigSpaceState, String> {
        self.0.save()
    }
    fn restore(&mut self, state: ConfigSpaceState) -> Result<(), String> {
        self.0
            .restore(state)
            .map_err(|e| format!("host bridge: {e}"))
    }
}

/// The bus as saved: the configuration address latch (0xCF8) and the host bridge. The other
/// functions are saved by their owners.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PciBusState {
    /// The last value the guest wrote to the configuration address port.
    pub address: u32,
    /// The host bridge's configuration space.
    pub host_bridge: ConfigSpaceState,
}

/// The bits of the configuration address register that hold a value.
const ADDRESS_MASK: u32 = 0x80ff_fffc;

/// A function on the bus.
type Slot = Arc<Mutex<dyn PciDevice>>;

/// Bus 0: up to 32 single-function devices.
pub struct PciBus {
    slots: Vec<Option<Slot>>,
    address: u32,
    host: Arc<Mutex<HostBridge>>,
}

impl Default for PciBus {
    fn default() -> PciBus {
        let host = Arc::new(Mutex::new(HostBridge::default()));
        let mut b = PciBus {
            slots: vec![None; SLOTS],
            address: 0,
            host: host.clone(),
        };
        b.slots[0] = Some(host);
        b
    }
}

impl Snapshot for PciBus {
    type State = PciBusState;
    fn save(&self) -> Result<PciBusState, String> {
        Ok(PciBusState {
            address: self.address,
            host_bridge: self.host.lock().unwrap_or_else(|p| p.into_inner()).save()?,
        })
    }
    fn restore(&mut self, state: PciBusState) -> Result<(), String> {
        if state.address & !ADDRESS_MASK != 0 {
            return Err(format!(
                "PCI bus: configuration address {:#x} has bits set that the register does not hold",
                state.address
            ));
        }
        self.host
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore(state.host_bridge)?;
        self.address = state.address;
        Ok(())
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

    /// Whether a slot is free.
    pub fn has_free_slot(&self) -> bool {
        self.slots.iter().any(Option::is_none)
    }

    /// Empties `slot` (a hot-unplugged device; never the host bridge's slot 0); returns
    /// whether a device was there.
    pub fn remove(&mut self, slot: u8) -> bool {
        match self.slots.get_mut(usize::from(slot)) {
            Some(s) if slot != 0 => s.take().is_some(),
            _ => false,
        }
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

impl PciBus {
    /// The function an ECAM offset names (None: an empty slot or another function) and its
    /// register, when the access is one a driver makes (1, 2 or 4 bytes within one dword of
    /// bus 0).
    fn ecam_target(&self, offset: u64, len: usize) -> Option<(Option<&Slot>, usize)> {
        let field = |shift: u32, mask: u64| usize::try_from((offset >> shift) & mask).unwrap_or(0);
        let (bus, dev, func, reg) = (offset >> 20, field(15, 0x1f), field(12, 7), field(0, 0xfff));
        if bus != 0 || !matches!(len, 1 | 2 | 4) || (reg & 3) + len > 4 {
            return None;
        }
        let d = if func == 0 {
            self.slots[dev].as_ref()
        } else {
            None
        };
        Some((d, reg))
    }
}

/// The ECAM window of bus 0 (1 MiB), serving the same functions as the configuration ports.
pub struct Ecam(pub Arc<Mutex<PciBus>>);

impl MmioDevice for Ecam {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        let bus = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match bus.ecam_target(offset, data.len()) {
            Some((Some(d), reg)) if reg < 256 => d
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .config_read(reg, data),
            // No extended capabilities: a zero header ends the list.
            Some((Some(_), _)) => data.fill(0),
            _ => data.fill(0xff),
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        let bus = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((Some(d), reg)) = bus.ecam_target(offset, data.len()) {
            if reg < 256 {
                d.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .config_write(reg, data);
            }
        }
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
                    u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & ADDRESS_MASK
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
    fn ecam_reaches_the_same_functions() {
        let bus = Arc::new(Mutex::new(PciBus::new()));
        let mut e = Ecam(bus.clone());
        let rd = |e: &mut Ecam, off: u64, n: usize| {
            let mut d = vec![0u8; n];
            e.mmio_read(off, &mut d);
            d
        };
        assert_eq!(rd(&mut e, 0, 4), 0x0d57_8086u32.to_le_bytes());
        assert_eq!(rd(&mut e, 2, 2), 0x0d57u16.to_le_bytes());
        assert_eq!(
            u32::from_le_bytes(rd(&mut e, 8, 4).try_into().unwrap()) >> 8,
            0x06_0000
        );
        // Empty slot, other function, other bus, an access across a dword: all ones.
        assert_eq!(rd(&mut e, 3 << 15, 4), [0xff; 4]);
        assert_eq!(rd(&mut e, 1 << 12, 4), [0xff; 4]);
        assert_eq!(rd(&mut e, 1 << 20, 4), [0xff; 4]);
        assert_eq!(rd(&mut e, 2, 4), [0xff; 4]);
        assert_eq!(rd(&mut e, 0, 8), [0xff; 8]);
        // Extended configuration space: no capabilities.
        assert_eq!(rd(&mut e, 0x100, 4), [0; 4]);
        // A write through ECAM is seen through the ports (the command register).
        e.mmio_write(4, &[0x06, 0]);
        assert_eq!(cfg_read32(&mut bus.lock().unwrap(), 0, 4) & 0xffff, 0x0006);
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
    fn bus_state_keeps_the_address_latch_and_the_host_bridge() {
        let mut b = PciBus::new();
        b.write(0, &0x8000_0004u32.to_le_bytes());
        b.write(4, &0x0006u16.to_le_bytes()); // host bridge command register
        let saved = b.save().unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let back: PciBusState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        let mut c = PciBus::new();
        c.restore(back).unwrap();
        // The latch still selects the command register: a read of the data port answers.
        let mut d = [0u8; 2];
        c.read(4, &mut d);
        assert_eq!(u16::from_le_bytes(d), 0x0006);
        let mut bad = saved.clone();
        bad.address |= 3;
        assert!(c.restore(bad).unwrap_err().contains("address"));
        let mut bad = saved;
        bad.host_bridge.bytes[0] ^= 1;
        assert!(c.restore(bad).unwrap_err().starts_with("host bridge"));
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
