//! Guest RAM: anonymous, lazily backed mappings registered with KVM as one slot below the MMIO
//! hole and, for large VMs, one above 4 GiB; or, when a vhost-user backend must map it too, one
//! memfd mapped shared ([`create_shared_ram`]), whose regions carry the file and its offsets.
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

/// Maps `mem` bytes of guest RAM from a new memfd, shared (`MAP_SHARED`), so that another
/// process given the descriptor (a vhost-user backend) sees the same pages. Each region keeps
/// the file and its offset in it ([`vm_memory::GuestMemoryRegion::file_offset`]). Nothing is
/// touched until used.
pub fn create_shared_ram(mem: u64) -> Result<GuestRam, MemoryError> {
    use std::os::fd::FromRawFd;
    if mem < MIN_MEMORY || !mem.is_multiple_of(4096) {
        return Err(MemoryError::BadSize(mem));
    }
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"wv-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Map(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(mem)
        .map_err(|e| MemoryError::Map(format!("sizing the memfd to {mem} bytes: {e}")))?;
    map_file(&file, mem, libc::MAP_SHARED)
}

/// Whether `mem` is shared RAM from [`create_shared_ram`] (every region mapped from a file).
pub fn is_shared(mem: &GuestRam) -> bool {
    use vm_memory::GuestMemoryBackend;
    mem.iter()
        .all(|r| r.file_offset().is_some() && r.flags() & libc::MAP_SHARED != 0)
}

/// Copies every byte of `from` into `to`, which has the same layout (a restored or received
/// VM moved into shared RAM).
pub fn copy_ram(from: &GuestRam, to: &GuestRam) -> Result<(), MemoryError> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for r in from.iter() {
        let len = usize::try_from(r.len()).map_err(|e| MemoryError::Map(e.to_string()))?;
        let src = from
            .get_slice(r.start_addr(), len)
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        let dst = to
            .get_slice(r.start_addr(), len)
            .map_err(|e| MemoryError::Map(format!("the target RAM differs: {e}")))?;
        src.copy_to_volatile_slice(dst);
    }
    Ok(())
}

/// Maps guest RAM of `mem` bytes from `file` (a memory image as [`ranges`] lays it out: the
/// regions one after another), private and copy-on-write: nothing is read until the guest
/// touches it, what the guest writes stays in this process, and any number of VMs can map one
/// file (their unwritten pages share the page cache).
pub fn map_ram_file(file: &std::fs::File, mem: u64) -> Result<GuestRam, MemoryError> {
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
    map_file(file, mem, libc::MAP_PRIVATE)
}

/// Maps the regions of `mem` bytes of RAM one after another from `file`, `flags` being
/// `MAP_PRIVATE` or `MAP_SHARED`.
fn map_file(file: &std::fs::File, mem: u64, flags: libc::c_int) -> Result<GuestRam, MemoryError> {
    use std::sync::Arc;
    use vm_memory::bitmap::NewBitmap;
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestRegionMmap};
    let file = Arc::new(
        file.try_clone()
            .map_err(|e| MemoryError::Map(e.to_string()))?,
    );
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (addr, size) in ranges(mem) {
        let m = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags | libc::MAP_NORESERVE)
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

    fn tempfile_of(len: u64) -> std::fs::File {
        // SAFETY: memfd_create reads a NUL-terminated name; the descriptor is new.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is new and owned by nothing else.
        let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn shared_ram_is_one_memfd_seen_by_another_mapping() {
        use std::os::unix::fs::FileExt;
        use vm_memory::{Bytes, GuestMemoryRegion};
        let m = create_shared_ram(8 << 20).unwrap();
        assert!(is_shared(&m));
        assert!(!is_shared(&create_ram(8 << 20).unwrap()));
        let f = tempfile_of(8 << 20);
        assert!(!is_shared(&map_ram_file(&f, 8 << 20).unwrap()), "private");
        m.write_obj(0xfeed_u32, GuestAddress(0x1234)).unwrap();
        // Another mapping of the same file (as a backend makes) sees the write.
        let r = m.iter().next().unwrap();
        let f = r.file_offset().unwrap().file();
        let mut b = [0u8; 4];
        f.read_exact_at(&mut b, 0x1234).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xfeed);
        // A copy into other RAM carries the bytes.
        let plain = create_ram(8 << 20).unwrap();
        plain.write_obj(7u64, GuestAddress(0x7000)).unwrap();
        copy_ram(&plain, &m).unwrap();
        assert_eq!(m.read_obj::<u64>(GuestAddress(0x7000)).unwrap(), 7);
        assert_eq!(m.read_obj::<u32>(GuestAddress(0x1234)).unwrap(), 0);
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
