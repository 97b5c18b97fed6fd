//! virtio-blk workers: requests on a raw image or block device, or on a VMKFS disk.

use super::ioctls::*;
use super::List;

/// A virtio-blk worker's list.
pub(super) fn list() -> List {
    super::virtio_rng::worker()
        // Reads and writes at an offset (block.rs RawDisk, vmkfs.rs extents and metadata).
        .allow(libc::SYS_pread64)
        .allow(libc::SYS_pwrite64)
        .allow(libc::SYS_preadv)
        .allow(libc::SYS_pwritev)
        // FLUSH; VMKFS's journal and metadata.
        .allow(libc::SYS_fsync)
        .allow(libc::SYS_fdatasync)
        // DISCARD / WRITE_ZEROES on a file (punching holes) or a block device.
        .allow(libc::SYS_fallocate)
        .ioctl(BLKDISCARD)
        // VMKFS: growing a disk's extents, its size.
        .allow(libc::SYS_ftruncate)
        .allow(libc::SYS_fstat)
        .allow(libc::SYS_newfstatat)
        .allow(libc::SYS_lseek)
        // VMKFS: the datastore's locks (open file description locks) and the files it opens
        // as a disk grows or is checked.
        .fcntl(libc::F_OFD_SETLK)
        .fcntl(libc::F_OFD_SETLKW)
        .fcntl(libc::F_OFD_GETLK)
        .allow(libc::SYS_openat)
        .allow(libc::SYS_statx)
}
