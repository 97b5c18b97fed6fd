//! The sleep control and status registers of the hardware-reduced ACPI platform (two byte
//! ports, described by the FADT): writing SLP_EN with the S5 sleep type powers the VM off,
//! which is how a Linux guest's `poweroff` ends the VM.

use crate::bus::{DeviceAction, PioDevice};

/// SLP_EN: bit 5 of the sleep control register.
const SLP_EN: u8 = 1 << 5;
/// SLP_TYP: bits 2-4.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// The two registers: control at offset 0, status at offset 1.
pub struct AcpiSleep {
    /// The SLP_TYP value of S5 (the DSDT's `_S5_`).
    s5: u8,
}

impl AcpiSleep {
    /// Registers where sleep type `s5` is soft off.
    pub fn new(s5: u8) -> AcpiSleep {
        AcpiSleep { s5 }
    }
}

impl PioDevice for AcpiSleep {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        // Status: never a wake event; control reads back as zero.
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        match (offset, data) {
            (0, [v]) if v & SLP_EN != 0 && (v >> SLP_TYP_SHIFT) & SLP_TYP_MASK == self.s5 => {
                DeviceAction::Poweroff
            }
            // Other sleep states are not offered (no _S1-_S4): ignored, as is the status
            // register's write-one-to-clear.
            _ => DeviceAction::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_slp_en_with_s5_powers_off() {
        let mut d = AcpiSleep::new(5);
        assert_eq!(d.write(0, &[(5 << 2) | SLP_EN]), DeviceAction::Poweroff);
        assert_eq!(d.write(0, &[5 << 2]), DeviceAction::None, "no SLP_EN");
        assert_eq!(d.write(0, &[(3 << 2) | SLP_EN]), DeviceAction::None, "S3");
        assert_eq!(
            d.write(1, &[(5 << 2) | SLP_EN]),
            DeviceAction::None,
            "status"
        );
        assert_eq!(
            d.write(0, &[(5 << 2) | SLP_EN, 0]),
            DeviceAction::None,
            "word"
        );
        let mut b = [0xffu8; 2];
        d.read(0, &mut b);
        assert_eq!(b, [0, 0]);
    }
}
