//! ACPI PCI hot-plug, the host's side (docs/DEVICES.md): the controller whose register block
//! the DSDT describes (`\_SB.PHPR` at [`wv_machine::acpi::HOTPLUG_PORT`]), the Generic Event
//! Device's interrupt that tells the guest to look at it, and the slots the guest has ejected,
//! which the control loop then tears down.
//!
//! Registers (dwords): PCIU (offset 0) and PCID (4) read the slots with a device added and the
//! slots the host asks to eject, each cleared by the read; B0EJ (8) takes a bitmap of slots the
//! guest has let go of (only hot-plugged, present slots count); PSEG (12) reads 0.

use std::sync::Mutex;
use vmm_sys_util::eventfd::EventFd;
use wv_devices::{DeviceAction, PioDevice};
use wv_machine::acpi::{HOTPLUG_B0EJ, HOTPLUG_PCID, HOTPLUG_PCIU};

/// The controller's state.
#[derive(Default)]
struct Regs {
    /// Slots added and not yet reported (PCIU).
    up: u32,
    /// Slots to be ejected, not yet reported (PCID).
    down: u32,
    /// Hot-plugged slots the guest may eject.
    ejectable: u32,
    /// Slots the guest ejected that the control loop has not torn down yet.
    ejected: u32,
}

/// The hot-plug controller: port I/O device and the VMM's handle on it.
pub(crate) struct Controller {
    regs: Mutex<Regs>,
    /// irqfd on [`wv_machine::acpi::GED_GSI`].
    ged: EventFd,
    /// Readable when the guest ejected a slot (the control loop polls it).
    pub(crate) ejected_evt: EventFd,
}

impl Controller {
    /// A controller raising `ged` (an irqfd on the GED's GSI).
    pub(crate) fn new(ged: EventFd) -> std::io::Result<Controller> {
        Ok(Controller {
            regs: Mutex::new(Regs::default()),
            ged,
            ejected_evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    fn regs(&self) -> std::sync::MutexGuard<'_, Regs> {
        self.regs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A device was added in `slot`: report it (PCIU) and raise the GED interrupt.
    pub(crate) fn plugged(&self, slot: u8) {
        let bit = 1u32 << (slot & 31);
        {
            let mut r = self.regs();
            r.up |= bit;
            r.down &= !bit;
            r.ejectable |= bit;
        }
        let _ = self.ged.write(1);
    }

    /// Asks the guest to eject `slot` (PCID) and raises the GED interrupt.
    pub(crate) fn request_eject(&self, slot: u8) {
        self.regs().down |= 1u32 << (slot & 31);
        let _ = self.ged.write(1);
    }

    /// The slots the guest ejected since the last call.
    pub(crate) fn take_ejected(&self) -> u32 {
        let _ = self.ejected_evt.read();
        std::mem::take(&mut self.regs().ejected)
    }
}

/// The port I/O side, on the VMM's port bus at [`wv_machine::acpi::HOTPLUG_PORT`].
pub(crate) struct Pio(pub(crate) std::sync::Arc<Controller>);

impl PioDevice for Pio {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = match (offset, data.len()) {
            (HOTPLUG_PCIU, 4) => std::mem::take(&mut self.0.regs().up),
            (HOTPLUG_PCID, 4) => std::mem::take(&mut self.0.regs().down),
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
        data[n..].fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        if let (HOTPLUG_B0EJ, Ok(b)) = (offset, <[u8; 4]>::try_from(data)) {
            let v = u32::from_le_bytes(b);
            let mut r = self.0.regs();
            let now = v & r.ejectable;
            if now != 0 {
                r.ejectable &= !now;
                r.down &= !now;
                r.ejected |= now;
                drop(r);
                let _ = self.0.ejected_evt.write(1);
            }
        }
        DeviceAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn registers_report_once_and_only_hot_plugged_slots_eject() {
        let ged = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let c = Arc::new(Controller::new(ged.try_clone().unwrap()).unwrap());
        let mut p = Pio(c.clone());
        let rd = |p: &mut Pio, off| {
            let mut d = [0u8; 4];
            p.read(off, &mut d);
            u32::from_le_bytes(d)
        };
        c.plugged(3);
        assert_eq!(ged.read().unwrap(), 1, "GED raised");
        assert_eq!(rd(&mut p, HOTPLUG_PCIU), 1 << 3);
        assert_eq!(rd(&mut p, HOTPLUG_PCIU), 0, "cleared by the read");
        // Slot 2 was never hot-plugged: its eject is ignored.
        p.write(HOTPLUG_B0EJ, &4u32.to_le_bytes());
        assert_eq!(c.take_ejected(), 0);
        c.request_eject(3);
        assert_eq!(rd(&mut p, HOTPLUG_PCID), 1 << 3);
        p.write(HOTPLUG_B0EJ, &(1u32 << 3 | 1 << 2).to_le_bytes());
        assert_eq!(c.take_ejected(), 1 << 3);
        p.write(HOTPLUG_B0EJ, &(1u32 << 3).to_le_bytes());
        assert_eq!(c.take_ejected(), 0, "ejected once");
        assert_eq!(rd(&mut p, 12), 0, "PSEG");
    }
}
