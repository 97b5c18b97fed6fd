//! Guest RAM: anonymous, lazily backed mappings registered with KVM as one slot below the MMIO
//! hole and, for large VMs, one above 4 GiB.
#![allow(clippy::cast_possible_truncation)] // x86-64 only: usize is 64 bits

use crate::layout::*;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestAddress;

/// Guest memory as the VMM maps it, with a dirty bitmap per region: every write through
/// vm-memory (device workers, the paravirtual interface, the VMM's emulator) marks its page,
/// which live migration reads besides KVM's own dirty log (docs/MIGRATION.md).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Guest RAM.
pub type GuestRam = GuestMemoryMmap;

/// Why RAM could not be set up.
#[derive(Debug)]
pub enum MemoryError {
    /// The size is below [`MIN_MEMORY`] or not a multiple of 4 KiB.
    BadSize(u64),
    /// The host refused the mapping.
    Map(String),
}

impl std::fmt::Display for MemoryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemoryError::BadSize(s) => write!(
                f,
                "guest memory of {s} bytes is invalid: it must be at least {} MiB and a multiple of 4 KiB",
                MIN_MEMORY >> 20
            ),
            MemoryError::Map(e) => write!(f, "cannot map guest memory: {e}"),
        }
    }
}

/// The (guest address, size) ranges of `mem` bytes of RAM.
pub fn ranges(mem: u64) -> Vec<(GuestAddress, usize)> {
    let mut r = vec![(GuestAddress(0), low_ram(mem) as usize)];
    if high_ram(mem) > 0 {
        r.push((GuestAddress(MMIO_HOLE_END), high_ram(mem) as usize));
    }
    r
}

/// Maps `mem` bytes of guest RAM (no page is touched until used).
pub fn create_ram(mem: u64) -> Result<GuestRam, MemoryError> {
    if mem < MIN_MEMORY || !mem.is_multiple_of(4096) {
        return Err(MemoryError::BadSize(mem));
    }
    GuestMemoryMmap::from_ranges(&ranges(mem)).map_err(|e| MemoryError::Map(e.to_string()))
}

/// Maps guest RAM of `mem` bytes from `file` (a memory image as [`ranges`] lays it out: the
/// regions one after another), private and copy-on-write: nothing is read until the guest
/// touches it, what the guest writes stays in this process, and any number of VMs can map one
/// file (their unwritten pages share the page cache).
pub fn map_ram_file(file: &std::fs::File, mem: u64) -> Result<GuestRam, MemoryError> {
    use std::sync::Arc;
    use vm_memory::bitmap::NewBitmap;
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestRegionMmap};
    if mem < MIN_MEMORY || !mem.is_multiple_of(4096) {
        return Err(MemoryError::BadSize(mem));
    }
    let len = file
        .metadata()
        .map_err(|e| MemoryError::Map(e.to_string()))?
        .len();
    if len != mem {
        return Err(MemoryError::Map(format!(
            "the memory image holds {len} bytes, the VM has {mem}"
        )));
    }
    let file = Arc::new(
        file.try_clone()
            .map_err(|e| MemoryError::Map(e.to_string()))?,
    );
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (addr, size) in ranges(mem) {
        let m = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .build()
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        regions.push(
            GuestRegionMmap::new(m, addr)
                .ok_or_else(|| MemoryError::Map("a region wraps around".into()))?,
        );
        offset += size as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn rejects_tiny_and_unaligned() {
        assert!(matches!(create_ram(1 << 20), Err(MemoryError::BadSize(_))));
        assert!(matches!(
            create_ram((64 << 20) + 1),
            Err(MemoryError::BadSize(_))
        ));
    }

    #[test]
    fn ranges_skip_the_hole() {
        let r = ranges(4 << 30);
        assert_eq!(
            r,
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(1 << 32), 1 << 30)]
        );
        let m = create_ram(64 << 20).unwrap();
        assert_eq!(m.num_regions(), 1);
    }
}
