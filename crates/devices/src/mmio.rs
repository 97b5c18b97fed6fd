//! The MMIO bus: guest-physical ranges (PCI BARs) routed to devices. vCPU threads look ranges
//! up under a read lock that is released before a device's own lock is taken, so a device
//! moving its range (a BAR the guest relocated) cannot deadlock with an access in flight.
#![allow(clippy::cast_possible_truncation)] // test-only narrowing of offsets

use std::sync::{Arc, Mutex, RwLock};

/// A device on the MMIO bus. `offset` is relative to the range's start.
pub trait MmioDevice: Send {
    /// Guest read: fill `data`.
    fn mmio_read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write.
    fn mmio_write(&mut self, offset: u64, data: &[u8]);
}

/// What an emptied entry holds: reads all ones, ignores writes (an access that looked the
/// entry up just before it was emptied lands here).
struct Removed;

impl MmioDevice for Removed {
    fn mmio_read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[derive(Clone)]
struct Entry {
    base: u64,
    len: u64,
    name: &'static str,
    dev: Arc<Mutex<dyn MmioDevice>>,
}

/// Devices by MMIO range; ranges never overlap.
#[derive(Default)]
pub struct MmioBus {
    entries: RwLock<Vec<Entry>>,
}

fn overlaps(e: &Entry, base: u64, end: u64) -> bool {
    base < e.base + e.len && e.base < end
}

impl MmioBus {
    /// An empty bus.
    pub fn new() -> MmioBus {
        MmioBus::default()
    }

    fn entries(&self) -> std::sync::RwLockReadGuard<'_, Vec<Entry>> {
        self.entries.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a device at `[base, base + len)`; returns its index (a removed device's index is
    /// taken again first, so indexes stay below the most devices ever present at once), or
    /// None if it overlaps.
    pub fn insert(
        &self,
        base: u64,
        len: u64,
        name: &'static str,
        dev: Arc<Mutex<dyn MmioDevice>>,
    ) -> Option<usize> {
        let end = base.checked_add(len)?;
        let mut es = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if es.iter().any(|e| overlaps(e, base, end)) {
            return None;
        }
        let e = Entry {
            base,
            len,
            name,
            dev,
        };
        if let Some(i) = es.iter().position(|e| e.len == 0) {
            es[i] = e;
            return Some(i);
        }
        es.push(e);
        Some(es.len() - 1)
    }

    /// Removes the range that starts at `base` (a hot-unplugged device); false if none does.
    /// Its index stays, empty (it matches no access), until [`MmioBus::insert`] reuses it.
    pub fn remove(&self, base: u64) -> bool {
        let mut es = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let Some(e) = es.iter_mut().find(|e| e.base == base && e.len != 0) else {
            return false;
        };
        e.base = u64::MAX;
        e.len = 0;
        e.name = "removed";
        e.dev = Arc::new(Mutex::new(Removed));
        true
    }

    /// Moves the range that starts at `old` to `new`; false (nothing changed) if no range
    /// starts at `old` or the new place overlaps another device.
    pub fn relocate(&self, old: u64, new: u64) -> bool {
        let mut es = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let Some(i) = es.iter().position(|e| e.base == old && e.len != 0) else {
            return false;
        };
        let Some(end) = new.checked_add(es[i].len) else {
            return false;
        };
        if es
            .iter()
            .enumerate()
            .any(|(j, e)| j != i && overlaps(e, new, end))
        {
            return false;
        }
        es[i].base = new;
        true
    }

    /// [`MmioBus::relocate`], only into `window`: false (nothing changed) when
    /// `[new, new + len)` does not lie in it. What the VMM's virtio BARs follow, with the PCI
    /// MMIO window as `window`, so that a guest cannot map a device over RAM, the ECAM window
    /// or the interrupt controllers.
    pub fn relocate_within(&self, old: u64, new: u64, window: std::ops::Range<u64>) -> bool {
        let len = {
            let es = self.entries();
            let Some(e) = es.iter().find(|e| e.base == old && e.len != 0) else {
                return false;
            };
            e.len
        };
        let inside = new >= window.start && new.checked_add(len).is_some_and(|e| e <= window.end);
        inside && self.relocate(old, new)
    }

    /// Every range: (base, length, name), in insertion order.
    pub fn ranges(&self) -> Vec<(u64, u64, &'static str)> {
        self.entries()
            .iter()
            .map(|e| (e.base, e.len, e.name))
            .collect()
    }

    /// The device covering `[addr, addr + len)` (index, offset), if one covers all of it.
    #[inline]
    pub fn lookup(&self, addr: u64, len: usize) -> Option<(usize, u64)> {
        let end = addr.checked_add(len as u64)?;
        let es = self.entries();
        let i = es
            .iter()
            .position(|e| addr >= e.base && end <= e.base + e.len)?;
        Some((i, addr - es[i].base))
    }

    fn device(&self, index: usize) -> Arc<Mutex<dyn MmioDevice>> {
        self.entries()[index].dev.clone()
    }

    /// Reads from device `index`.
    pub fn read(&self, index: usize, offset: u64, data: &mut [u8]) {
        self.device(index)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .mmio_read(offset, data);
    }

    /// Writes to device `index`.
    pub fn write(&self, index: usize, offset: u64, data: &[u8]) {
        self.device(index)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .mmio_write(offset, data);
    }

    /// Device names by index.
    pub fn names(&self) -> Vec<&'static str> {
        self.entries().iter().map(|e| e.name).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem([u8; 16]);
    impl MmioDevice for Mem {
        fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.0[o..o + data.len()]);
        }
        fn mmio_write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.0[o..o + data.len()].copy_from_slice(data);
        }
    }

    #[test]
    fn ranges_route_and_straddling_accesses_do_not() {
        let b = MmioBus::new();
        let i = b
            .insert(0xc000_0000, 16, "m", Arc::new(Mutex::new(Mem([0; 16]))))
            .unwrap();
        assert!(b
            .insert(0xc000_0008, 16, "x", Arc::new(Mutex::new(Mem([0; 16]))))
            .is_none());
        assert!(b
            .insert(u64::MAX - 4, 16, "y", Arc::new(Mutex::new(Mem([0; 16]))))
            .is_none());
        assert_eq!(b.lookup(0xc000_0004, 4), Some((i, 4)));
        assert_eq!(b.lookup(0xc000_000e, 4), None, "straddles the end");
        assert_eq!(b.lookup(u64::MAX, 8), None);
        b.write(i, 4, &[1, 2, 3, 4]);
        let mut d = [0u8; 2];
        b.read(i, 5, &mut d);
        assert_eq!(d, [2, 3]);
    }

    #[test]
    fn relocation_moves_a_range_unless_it_would_overlap() {
        let b = MmioBus::new();
        b.insert(0x1000, 16, "a", Arc::new(Mutex::new(Mem([0; 16]))))
            .unwrap();
        b.insert(0x2000, 16, "b", Arc::new(Mutex::new(Mem([0; 16]))))
            .unwrap();
        assert!(!b.relocate(0x1000, 0x2008), "onto b");
        assert!(!b.relocate(0x3000, 0x4000), "nothing starts there");
        assert!(b.relocate(0x1000, 0x5000));
        assert_eq!(b.lookup(0x1000, 4), None);
        assert_eq!(b.lookup(0x5004, 4), Some((0, 4)));
    }

    #[test]
    fn relocation_within_a_window_stays_in_it() {
        let b = MmioBus::new();
        b.insert(0xc000_0000, 16, "a", Arc::new(Mutex::new(Mem([0; 16]))))
            .unwrap();
        let w = 0xc000_0000..0xe000_0000;
        assert!(!b.relocate_within(0xc000_0000, 0x1000, w.clone()), "below");
        assert!(
            !b.relocate_within(0xc000_0000, 0xdfff_fff8, w.clone()),
            "past the end"
        );
        assert!(
            !b.relocate_within(0xc000_0000, u64::MAX - 8, w.clone()),
            "wraps"
        );
        assert_eq!(b.ranges(), vec![(0xc000_0000, 16, "a")], "unmoved");
        assert!(b.relocate_within(0xc000_0000, 0xdfff_fff0, w.clone()));
        assert_eq!(b.ranges(), vec![(0xdfff_fff0, 16, "a")]);
        assert!(!b.relocate_within(0x1234, 0xc000_0000, w), "nothing there");
    }

    #[test]
    fn removed_ranges_match_nothing_and_their_index_is_reused() {
        let b = MmioBus::new();
        let d = || Arc::new(Mutex::new(Removed)) as Arc<Mutex<dyn MmioDevice>>;
        assert_eq!(b.insert(0x1000, 0x100, "a", d()), Some(0));
        assert_eq!(b.insert(0x2000, 0x100, "b", d()), Some(1));
        assert!(b.remove(0x1000));
        assert!(!b.remove(0x1000), "already gone");
        assert_eq!(b.lookup(0x1000, 4), None);
        assert!(!b.relocate(0x1000, 0x3000));
        assert_eq!(b.insert(0x0f00, 0x300, "c", d()), Some(0), "index 0 reused");
        assert_eq!(b.lookup(0x1010, 4), Some((0, 0x110)));
        assert_eq!(b.insert(0x5000, 0x100, "d", d()), Some(2));
    }
}
