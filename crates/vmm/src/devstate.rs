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

/// Gives the virtio-net devices of `state`, in slot order (the order of the configuration's
/// `nets`), the MACs `macs` instead of the ones they were saved with (a clone's new identity).
pub(crate) fn set_macs(state: &mut DevicesState, macs: &[[u8; 6]]) -> Result<(), String> {
    let nets: Vec<&mut wv_virtio::net::NetState> = state
        .pci
        .devices
        .iter_mut()
        .filter_map(|d| match &mut d.state.device {
            wv_virtio::DeviceState::Net(n) => Some(n),
            _ => None,
        })
        .collect();
    if nets.len() != macs.len() {
        return Err(format!(
            "the snapshot holds {} virtio-net devices and its configuration {}",
            nets.len(),
            macs.len()
        ));
    }
    for (n, m) in nets.into_iter().zip(macs) {
        n.mac = *m;
    }
    Ok(())
}

/// Puts `state` back into the devices of a VM just built from the snapshot's configuration. The
/// PCI devices' workers stay paused until the caller resumes them.
pub(crate) fn restore(shared: &VmShared, state: DevicesState) -> Result<(), String> {
    lock(&shared.serial).restore(state.serial)?;
    lock(&shared.i8042).restore(state.i8042)?;
    shared.pci_devices.restore(&shared.pci_bus, state.pci)?;
    Ok(())
}
