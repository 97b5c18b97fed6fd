//! MSI-X: the vector table and pending-bit array a device exposes in a BAR, and the capability
//! that enables and masks them, and their saved state ([`MsixTableState`]). Interrupt delivery
//! itself (irqfd and KVM routes) is the VMM's.
#![allow(clippy::cast_possible_truncation)] // at most 2048 vectors

use serde::{Deserialize, Serialize};
use wv_devices::Snapshot;

/// Capability ID of MSI-X.
pub const CAP_ID: u8 = 0x11;
/// Bytes per table entry.
pub const ENTRY_SIZE: usize = 16;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;

/// Where a vector's message goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsixMessage {
    /// Message address.
    pub addr: u64,
    /// Message data.
    pub data: u32,
}

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

/// A table of `n` vectors and its pending bits.
#[derive(Clone, Debug)]
pub struct MsixTable {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
}

impl MsixTable {
    /// `n` vectors (1 to 2048), all masked, MSI-X disabled.
    pub fn new(n: u16) -> MsixTable {
        let n = usize::from(n.clamp(1, 2048));
        MsixTable {
            entries: vec![
                Entry {
                    control: 1,
                    ..Default::default()
                };
                n
            ],
            pending: vec![false; n],
            enabled: false,
            function_masked: false,
        }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none (never).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Table size in bytes.
    pub fn table_bytes(&self) -> usize {
        self.entries.len() * ENTRY_SIZE
    }

    /// The capability body (message control, table offset/BIR, PBA offset/BIR) for a table at
    /// `table_offset` and PBA at `pba_offset` in BAR `bir`, and its write mask.
    pub fn capability(&self, bir: u8, table_offset: u32, pba_offset: u32) -> ([u8; 10], [u8; 10]) {
        let mut b = [0u8; 10];
        let size = (self.entries.len() - 1) as u16;
        b[0..2].copy_from_slice(&size.to_le_bytes());
        b[2..6].copy_from_slice(&(table_offset | u32::from(bir)).to_le_bytes());
        b[6..10].copy_from_slice(&(pba_offset | u32::from(bir)).to_le_bytes());
        let mut w = [0u8; 10];
        w[1] = 0xc0; // enable and function mask
        (b, w)
    }

    /// Applies the message-control word the guest wrote; returns vectors that became
    /// deliverable with a pending interrupt (to be fired now).
    pub fn set_control(&mut self, control: u16) -> Vec<usize> {
        self.enabled = control & CTRL_ENABLE != 0;
        self.function_masked = control & CTRL_FUNCTION_MASK != 0;
        self.drain_pending()
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn deliverable(&self, v: usize) -> bool {
        self.enabled && !self.function_masked && self.entries[v].control & 1 == 0
    }

    fn drain_pending(&mut self) -> Vec<usize> {
        let ready: Vec<usize> = (0..self.entries.len())
            .filter(|&v| self.pending[v] && self.deliverable(v))
            .collect();
        for &v in &ready {
            self.pending[v] = false;
        }
        ready
    }

    /// Reads the table (offset relative to the table start).
    pub fn read_table(&self, offset: usize, data: &mut [u8]) {
        let (v, field) = (offset / ENTRY_SIZE, offset % ENTRY_SIZE);
        if v >= self.entries.len()
            || !matches!((field, data.len()), (0 | 4 | 8 | 12, 4) | (0 | 8, 8))
        {
            data.fill(0);
            return;
        }
        let e = self.entries[v];
        let words = [e.addr_lo, e.addr_hi, e.data, e.control];
        let w = field / 4;
        data[..4].copy_from_slice(&words[w].to_le_bytes());
        if data.len() == 8 {
            data[4..].copy_from_slice(&words[w + 1].to_le_bytes());
        }
    }

    /// Writes the table; returns (vector touched, vectors to fire now because they were
    /// unmasked with an interrupt pending).
    pub fn write_table(&mut self, offset: usize, data: &[u8]) -> (Option<usize>, Vec<usize>) {
        let (v, field) = (offset / ENTRY_SIZE, offset % ENTRY_SIZE);
        if v >= self.entries.len()
            || !matches!((field, data.len()), (0 | 4 | 8 | 12, 4) | (0 | 8, 8))
        {
            return (None, Vec::new());
        }
        let word = |i: usize| u32::from_le_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
        let mut set = |f: usize, val: u32| {
            let e = &mut self.entries[v];
            match f {
                0 => e.addr_lo = val,
                4 => e.addr_hi = val,
                8 => e.data = val,
                _ => e.control = val & 1,
            }
        };
        set(field, word(0));
        if data.len() == 8 {
            set(field + 4, word(4));
        }
        (Some(v), self.drain_pending())
    }

    /// Reads the pending-bit array (offset relative to its start).
    pub fn read_pba(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let mut byte = 0u8;
            for bit in 0..8 {
                if self.pending.get((offset + i) * 8 + bit) == Some(&true) {
                    byte |= 1 << bit;
                }
            }
            *b = byte;
        }
    }

    /// The message of vector `v` if it may be delivered now.
    pub fn message(&self, v: usize) -> Option<MsixMessage> {
        if v < self.entries.len() && self.deliverable(v) {
            let e = self.entries[v];
            Some(MsixMessage {
                addr: (u64::from(e.addr_hi) << 32) | u64::from(e.addr_lo),
                data: e.data,
            })
        } else {
            None
        }
    }

    /// Every vector's message, deliverable or not (for building interrupt routes).
    pub fn messages(&self) -> Vec<MsixMessage> {
        self.entries
            .iter()
            .map(|e| MsixMessage {
                addr: (u64::from(e.addr_hi) << 32) | u64::from(e.addr_lo),
                data: e.data,
            })
            .collect()
    }

    /// Whether entry `v` holds an address in the local APICs' MSI window (0xfeexxxxx, high
    /// half 0); a message anywhere else reaches no CPU.
    pub fn targets_lapic(&self, v: usize) -> bool {
        self.entries
            .get(v)
            .is_some_and(|e| e.addr_hi == 0 && e.addr_lo & 0xfff0_0000 == 0xfee0_0000)
    }

    /// Asks to raise vector `v`: true if it may be delivered now, otherwise marks it pending.
    pub fn trigger(&mut self, v: usize) -> bool {
        if v >= self.entries.len() {
            return false;
        }
        if self.deliverable(v) {
            true
        } else {
            self.pending[v] = true;
            false
        }
    }
}

/// One vector as saved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsixEntryState {
    /// Message address, low half.
    pub addr_lo: u32,
    /// Message address, high half.
    pub addr_hi: u32,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

/// An MSI-X table as saved: every vector, the pending bits, and the two bits of message
/// control (enable, function mask).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsixTableState {
    /// The vectors, in order.
    pub entries: Vec<MsixEntryState>,
    /// The pending bit of each vector.
    pub pending: Vec<bool>,
    /// MSI-X enabled.
    pub enabled: bool,
    /// All vectors masked.
    pub function_masked: bool,
}

impl Snapshot for MsixTable {
    type State = MsixTableState;

    fn save(&self) -> Result<MsixTableState, String> {
        Ok(MsixTableState {
            entries: self
                .entries
                .iter()
                .map(|e| MsixEntryState {
                    addr_lo: e.addr_lo,
                    addr_hi: e.addr_hi,
                    data: e.data,
                    control: e.control,
                })
                .collect(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        })
    }

    /// Takes `state` if it has as many vectors as this table, only the mask bit in each
    /// vector control, and no vector both pending and deliverable (a table never saves one:
    /// such a vector is fired when it becomes deliverable).
    fn restore(&mut self, state: MsixTableState) -> Result<(), String> {
        let n = self.entries.len();
        if state.entries.len() != n || state.pending.len() != n {
            return Err(format!(
                "MSI-X state: {} vectors and {} pending bits, but the device has {n} vectors",
                state.entries.len(),
                state.pending.len()
            ));
        }
        if let Some(v) = state.entries.iter().position(|e| e.control & !1 != 0) {
            return Err(format!(
                "MSI-X state: vector {v} has reserved control bits set ({:#x})",
                state.entries[v].control
            ));
        }
        let mut t = MsixTable {
            entries: state
                .entries
                .iter()
                .map(|e| Entry {
                    addr_lo: e.addr_lo,
                    addr_hi: e.addr_hi,
                    data: e.data,
                    control: e.control,
                })
                .collect(),
            pending: state.pending,
            enabled: state.enabled,
            function_masked: state.function_masked,
        };
        if let Some(v) = (0..n).find(|&v| t.pending[v] && t.deliverable(v)) {
            return Err(format!(
                "MSI-X state: vector {v} is pending although it is enabled and unmasked"
            ));
        }
        std::mem::swap(self, &mut t);
        Ok(())
    }
}

/// Where MSI-X messages become interrupts: the VMM maps vector `i` of a device to GSI
/// `gsi_base + i` and keeps KVM's routes in step with the messages the guest programmed.
pub trait MsiRouter: Send + Sync {
    /// Replaces the routes of GSIs `gsi_base..gsi_base + messages.len()`.
    fn set_routes(&self, gsi_base: u32, messages: &[MsixMessage]) -> std::io::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_vectors_pend_until_unmasked() {
        let mut t = MsixTable::new(4);
        assert!(!t.trigger(1), "disabled: pending");
        assert!(
            t.set_control(CTRL_ENABLE).is_empty(),
            "still masked per vector"
        );
        t.write_table(16, &0xfee0_0000u32.to_le_bytes());
        t.write_table(24, &0x41u32.to_le_bytes());
        let (v, fire) = t.write_table(28, &0u32.to_le_bytes());
        assert_eq!(
            (v, fire),
            (Some(1), vec![1]),
            "unmasking fires the pending vector"
        );
        assert_eq!(
            t.message(1),
            Some(MsixMessage {
                addr: 0xfee0_0000,
                data: 0x41
            })
        );
        assert!(t.trigger(1));
        t.set_control(CTRL_ENABLE | CTRL_FUNCTION_MASK);
        assert!(!t.trigger(1));
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        assert_eq!(t.set_control(CTRL_ENABLE), vec![1]);
    }

    #[test]
    fn table_reads_and_bad_accesses() {
        let mut t = MsixTable::new(2);
        t.write_table(0, &0x1234_5678_9abc_def0u64.to_le_bytes());
        let mut d = [0u8; 8];
        t.read_table(0, &mut d);
        assert_eq!(u64::from_le_bytes(d), 0x1234_5678_9abc_def0);
        let mut w = [0u8; 4];
        t.read_table(12, &mut w);
        assert_eq!(u32::from_le_bytes(w), 1, "masked at reset");
        // Out of range, misaligned or odd sizes: ignored, reads zero.
        assert_eq!(t.write_table(32, &[1; 4]).0, None);
        assert_eq!(t.write_table(2, &[1; 4]).0, None);
        assert_eq!(t.write_table(0, &[1; 2]).0, None);
        t.read_table(1000, &mut w);
        assert_eq!(w, [0; 4]);
        assert!(!t.trigger(99));
    }

    #[test]
    fn state_round_trips_and_hostile_states_are_refused() {
        let mut t = MsixTable::new(3);
        t.write_table(16, &0xfee0_1000u32.to_le_bytes());
        t.write_table(24, &0x4242u32.to_le_bytes());
        t.write_table(28, &0u32.to_le_bytes());
        t.set_control(CTRL_ENABLE);
        assert!(!t.trigger(2), "vector 2 stays masked: pending");
        let saved = t.save().unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let back: MsixTableState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        let mut u = MsixTable::new(3);
        u.restore(back).unwrap();
        assert_eq!(u.save().unwrap(), saved);
        assert_eq!(
            u.message(1),
            Some(MsixMessage {
                addr: 0xfee0_1000,
                data: 0x4242
            })
        );
        let mut pba = [0u8; 1];
        u.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b100);
        // Unmasking vector 2 fires what was pending before the save.
        assert_eq!(u.write_table(44, &0u32.to_le_bytes()).1, vec![2]);

        let mut fresh = MsixTable::new(3);
        let before = fresh.save().unwrap();
        let mut wrong_len = saved.clone();
        wrong_len.entries.pop();
        let mut reserved = saved.clone();
        reserved.entries[0].control = 2;
        let mut pending_deliverable = saved.clone();
        pending_deliverable.pending[1] = true;
        for (bad, what) in [
            (wrong_len, "2 vectors"),
            (reserved, "reserved"),
            (pending_deliverable, "vector 1 is pending"),
        ] {
            let err = fresh.restore(bad).unwrap_err();
            assert!(err.contains(what), "{err}");
            assert_eq!(fresh.save().unwrap(), before, "nothing changed");
        }
    }

    #[test]
    fn capability_layout() {
        let t = MsixTable::new(3);
        let (b, w) = t.capability(0, 0x4000, 0x5000);
        assert_eq!(u16::from_le_bytes([b[0], b[1]]), 2);
        assert_eq!(u32::from_le_bytes([b[2], b[3], b[4], b[5]]), 0x4000);
        assert_eq!(w[1], 0xc0);
    }
}
