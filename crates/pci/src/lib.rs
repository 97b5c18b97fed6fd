//! PCI for Worldvisor VMs: one bus (bus 0) with a host bridge, reached through configuration
//! mechanism #1 (ports 0xCF8/0xCFC); each device's 256-byte configuration space with write
//! masks, 32-bit memory BARs allocated by the VMM from the MMIO hole, a capability list, and
//! MSI-X tables. Each of them saves and restores its state through [`wv_devices::Snapshot`].
//!
//! Guest-facing parsing lives here and is pure logic: every access is bounded by the register
//! it names, so a guest can write anything to any offset without corrupting state.

pub mod bus;
pub mod config;
pub mod msix;

pub use bus::{
    Ecam, HostBridge, PciBus, PciBusState, PciDevice, CONFIG_ADDRESS_PORT, CONFIG_PORTS_LEN,
};
pub use config::{BarAllocator, ConfigSpace, ConfigSpaceState};
pub use msix::{MsiRouter, MsixEntryState, MsixMessage, MsixTable, MsixTableState};
