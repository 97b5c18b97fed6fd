//! Emulated legacy devices, and the port I/O and MMIO buses that route guest accesses to devices.
//!
//! The bus is built once and then only read, so vCPU threads look up ports without locking;
//! each device sits behind its own mutex. Device indices on the bus double as the exit-accounting
//! cause for port I/O. Devices save and restore their state through [`Snapshot`].

pub mod acpi;
pub mod apic;
pub mod bus;
pub mod i8042;
pub mod mmio;
pub mod serial;
pub mod snapshot;
pub mod thread;

pub use bus::{DeviceAction, PioBus, PioDevice};
pub use mmio::{MmioBus, MmioDevice};
pub use serial::{ConsoleOut, IrqLine, SerialDevice, SerialDeviceState};
pub use snapshot::Snapshot;
