//! The i8042 keyboard controller, present for one job: the guest's reset request (command 0xfe
//! on port 0x64, Linux's `reboot=k`). vm-superio models the controller, which keeps no state
//! between accesses (a reset request is taken in the same write), so its saved state is empty.
#![allow(clippy::cast_possible_truncation)] // offsets are within the 5-port range

use crate::bus::{DeviceAction, PioDevice};
use crate::snapshot::Snapshot;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vm_superio::{I8042Device, Trigger};

/// First port (data); the command/status port is base + 4.
pub const I8042_BASE: u16 = 0x60;
/// Ports covered (0x60-0x64).
pub const I8042_LEN: u16 = 5;

/// Latches a reset request.
#[derive(Clone, Default)]
pub struct ResetLatch(Arc<AtomicBool>);

impl Trigger for ResetLatch {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// The controller.
pub struct I8042 {
    dev: I8042Device<ResetLatch>,
    latch: ResetLatch,
}

impl Default for I8042 {
    fn default() -> I8042 {
        let latch = ResetLatch::default();
        I8042 {
            dev: I8042Device::new(latch.clone()),
            latch,
        }
    }
}

/// The controller's saved state: nothing (kept so that a later model with state has a place).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I8042State {}

impl Snapshot for I8042 {
    type State = I8042State;
    fn save(&self) -> Result<I8042State, String> {
        Ok(I8042State {})
    }
    fn restore(&mut self, _state: I8042State) -> Result<(), String> {
        self.latch.0.store(false, Ordering::SeqCst);
        Ok(())
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.dev.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> DeviceAction {
        if data.len() == 1 {
            let _ = self.dev.write(offset as u8, data[0]);
        }
        if self.latch.0.swap(false, Ordering::SeqCst) {
            DeviceAction::Reset
        } else {
            DeviceAction::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_reset() {
        let mut k = I8042::default();
        assert_eq!(k.write(4, &[0xaa]), DeviceAction::None);
        assert_eq!(
            k.write(0, &[0xfe]),
            DeviceAction::None,
            "0xfe on the data port is not a command"
        );
        assert_eq!(k.write(4, &[0xfe]), DeviceAction::Reset);
        assert_eq!(
            k.write(4, &[0x00]),
            DeviceAction::None,
            "the request is consumed"
        );
        let json = serde_json::to_string(&k.save().unwrap()).unwrap();
        assert_eq!(json, "{}");
        k.restore(serde_json::from_str(&json).unwrap()).unwrap();
        assert!(serde_json::from_str::<I8042State>(r#"{"x":1}"#).is_err());
    }
}
