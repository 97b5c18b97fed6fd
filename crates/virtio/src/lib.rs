//! Virtio devices (virtio 1.x, modern only) behind the virtio-pci transport.
//!
//! [`transport::VirtioPci`] is what the guest's driver talks to (PCI configuration space and
//! BAR 0: common, notify, ISR and device configuration, MSI-X table); it negotiates features,
//! collects queue set-up and, on DRIVER_OK, hands validated queues to a [`device::VirtioDevice`],
//! which serves them on a worker thread woken by ioeventfds, never on a vCPU thread. The
//! transport pauses and resumes that worker and saves and restores the device's state.
//! Everything read from the guest (registers, rings, descriptors) is checked before use, and
//! every descriptor chain is read exactly once ([`chain::Chain`]) and served from that copy.

pub mod balloon;
pub mod block;
pub mod chain;
pub mod device;
pub mod net;
pub mod rng;
pub mod shadow;
#[cfg(test)]
mod testutil;
pub mod transport;
pub mod vhost_user;
#[cfg(feature = "backend")]
pub mod vu_backend;

/// Guest memory as the VMM maps it: every write a device makes through it marks the page dirty
/// (what live migration sends again besides KVM's dirty log).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

pub use device::{
    ActiveQueue, DeviceCounters, DeviceState, Interrupt, IoCounters, VirtioDevice, WorkerCtl,
};
pub use transport::{VirtioPci, VirtioPciState, VirtqueueState};

/// VIRTIO_F_VERSION_1: a modern (1.x) device.
pub const F_VERSION_1: u64 = 1 << 32;
/// Device status bits.
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    /// The driver gave up.
    pub const FAILED: u8 = 128;
}
/// "No MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;
