//! Saving and restoring device state: the [`Snapshot`] trait that every device with state the
//! guest can see implements, so that the VMM can write a VM out and read it back exactly.
//!
//! A state is plain data (serde) and comes back from a file: `restore` treats it as hostile,
//! checks every length, index and flag against what the device it is restored into can do,
//! and refuses anything else with a one-line error, leaving the device as it was.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A device whose guest-visible state can be saved and restored.
pub trait Snapshot {
    /// Everything the guest can observe of the device, as plain data.
    type State: Serialize + DeserializeOwned;

    /// The device's state now. Devices with a worker thread must be paused first (an error
    /// otherwise: their queue positions move while it runs).
    fn save(&self) -> Result<Self::State, String>;

    /// Puts the device into `state`, which must come from a device built the same way (same
    /// type, same queues, same backing). On an error nothing changed.
    fn restore(&mut self, state: Self::State) -> Result<(), String>;
}
