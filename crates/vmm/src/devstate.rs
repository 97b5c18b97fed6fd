//! The devices' part of a snapshot: every device's state in one serialisable value, saved from a
//! paused VM and put back into the devices of a VM just built from the same configuration.

use crate::VmShared;
use wv_devices::Snapshot;

/// The `devices` section of a snapshot.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DevicesState {
    serial: wv_devices::SerialDeviceState,
    i8042: <wv_devices::i8042::I8042 as Snapshot>::State,
    pci: crate::pci::PciState,
}

fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every device's state (the VM paused: vCPUs parked, device workers quiesced).
pub(crate) fn save(shared: &VmShared) -> Result<DevicesState, String> {
    Ok(DevicesState {
        serial: lock(&shared.serial).save()?,
        i8042: lock(&shared.i8042).save()?,
        pci: shared.pci_devices.save(&shared.pci_bus)?,
    })
}

/// Puts `state` back into the devices of a VM just built from the snapshot's configuration. The
/// PCI devices' workers stay paused until the caller resumes them.
pub(crate) fn restore(shared: &VmShared, state: DevicesState) -> Result<(), String> {
    lock(&shared.serial).restore(state.serial)?;
    lock(&shared.i8042).restore(state.i8042)?;
    shared.pci_devices.restore(&shared.pci_bus, state.pci)?;
    Ok(())
}
