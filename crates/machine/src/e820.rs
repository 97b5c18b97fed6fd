//! The e820 memory map handed to the guest (zero page or PVH memory map).

use crate::layout::*;

/// Usable RAM.
pub const E820_RAM: u32 = 1;
/// Reserved.
pub const E820_RESERVED: u32 = 2;

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The map for `mem` bytes of RAM (at least [`MIN_MEMORY`]): conventional memory up to the
/// EBDA, the EBDA and BIOS area reserved, RAM from 1 MiB to the MMIO hole, and the rest above
/// 4 GiB. Sorted and non-overlapping.
pub fn map(mem: u64) -> Vec<E820Entry> {
    let mut v = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: LEGACY_HOLE_START - EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: BIOS_START,
            size: HIMEM_START - BIOS_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: HIMEM_START,
            size: low_ram(mem) - HIMEM_START,
            kind: E820_RAM,
        },
    ];
    if high_ram(mem) > 0 {
        v.push(E820Entry {
            addr: MMIO_HOLE_END,
            size: high_ram(mem),
            kind: E820_RAM,
        });
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(m: &[E820Entry]) -> u64 {
        m.iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn small_vm_has_no_high_ram() {
        let m = map(128 << 20);
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[3],
            E820Entry {
                addr: 1 << 20,
                size: 127 << 20,
                kind: E820_RAM
            }
        );
        // Everything but the 384 KiB legacy hole and the 1 KiB EBDA is RAM.
        assert_eq!(ram(&m), (128 << 20) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn large_vm_splits_around_the_hole() {
        let m = map(5 << 30);
        let last = *m.last().unwrap();
        assert_eq!(last.addr, 1 << 32);
        assert_eq!(last.size, (5 << 30) - MMIO_HOLE_START);
        assert_eq!(m[3].addr + m[3].size, MMIO_HOLE_START);
    }

    #[test]
    fn entries_are_sorted_and_disjoint() {
        for mem in [MIN_MEMORY, 1 << 30, 3 << 30, 4 << 30, 64 << 30] {
            let m = map(mem);
            for w in m.windows(2) {
                assert!(w[0].addr + w[0].size <= w[1].addr, "{mem}: {w:?}");
            }
        }
    }
}
