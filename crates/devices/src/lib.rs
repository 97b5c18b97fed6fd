//! Emulated legacy devices and the port I/O bus that routes guest `in`/`out` to them.
//!
//! The bus is built once and then only read, so vCPU threads look up ports without locking;
//! each device sits behind its own mutex. Device indices on the bus double as the exit-accounting
//! cause for port I/O.

pub mod bus;
pub mod i8042;
pub mod serial;

pub use bus::{DeviceAction, PioBus, PioDevice};
pub use serial::{ConsoleOut, IrqLine, SerialDevice};
