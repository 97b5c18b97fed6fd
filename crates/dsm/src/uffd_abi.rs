//! The userfaultfd ABI (linux/userfaultfd.h): ioctl numbers, modes, flags and the ioctls'
//! argument structures, for this crate's coherent memory and the VMM's post-copy migration.
//! Defined here because the `libc` crate has no userfaultfd bindings, and the `userfaultfd`
//! crate needs bindgen and libclang at build time for its WP support.

/// The API version UFFDIO_API asks for.
pub const UFFD_API: u64 = 0xAA;
/// The API handshake (`struct uffdio_api`).
pub const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
/// Registers a range (`struct uffdio_register`).
pub const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
/// Wakes the threads waiting on a range (`struct uffdio_range`).
pub const UFFDIO_WAKE: libc::c_ulong = 0x8010_AA02;
/// Fills missing pages with a copy (`struct uffdio_copy`).
pub const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
/// Fills missing pages with zeroes (`struct uffdio_zeropage`).
pub const UFFDIO_ZEROPAGE: libc::c_ulong = 0xC020_AA04;
/// Sets or clears write protection (`struct uffdio_writeprotect`).
pub const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xC018_AA06;
/// Register for faults on missing pages.
pub const REGISTER_MODE_MISSING: u64 = 1;
/// Register for faults on write-protected pages.
pub const REGISTER_MODE_WP: u64 = 2;
/// UFFDIO_COPY: do not wake the faulting threads.
pub const COPY_MODE_DONTWAKE: u64 = 1;
/// UFFDIO_COPY: install the page write-protected.
pub const COPY_MODE_WP: u64 = 2;
/// UFFDIO_WRITEPROTECT: protect (clear to unprotect).
pub const WRITEPROTECT_MODE_WP: u64 = 1;
/// UFFDIO_WRITEPROTECT: do not wake the faulting threads.
pub const WRITEPROTECT_MODE_DONTWAKE: u64 = 2;
/// UFFD_FEATURE_WP_HUGETLBFS_SHMEM: write protection on shared memory (Linux 5.19).
pub const FEATURE_WP_SHMEM: u64 = 1 << 12;
/// `uffd_msg.event` of a page fault.
pub const EVENT_PAGEFAULT: u8 = 0x12;
/// `uffd_msg.pagefault.flags`: a write fault.
pub const PAGEFAULT_FLAG_WRITE: u64 = 1;
/// `uffd_msg.pagefault.flags`: a write-protect fault.
pub const PAGEFAULT_FLAG_WP: u64 = 2;
/// `uffdio_register.ioctls`, the ioctls the registered range offers: UFFDIO_COPY.
pub const IOCTL_COPY_BIT: u64 = 1 << 3;
/// UFFDIO_WRITEPROTECT is offered.
pub const IOCTL_WRITEPROTECT_BIT: u64 = 1 << 6;

/// `struct uffdio_api`.
#[allow(missing_docs)] // the fields are the kernel's, named as in linux/userfaultfd.h
#[repr(C)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[allow(missing_docs)] // the fields are the kernel's, named as in linux/userfaultfd.h
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

/// `struct uffdio_register`.
#[allow(missing_docs)] // the fields are the kernel's, named as in linux/userfaultfd.h
#[repr(C)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

/// `struct uffdio_copy`.
#[allow(missing_docs)] // the fields are the kernel's, named as in linux/userfaultfd.h
#[repr(C)]
pub struct UffdioCopy {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
    pub mode: u64,
    pub copy: i64,
}

/// `struct uffdio_zeropage`.
#[allow(missing_docs)] // the fields are the kernel's, named as in linux/userfaultfd.h
#[repr(C)]
pub struct UffdioZeropage {
    pub range: UffdioRange,
    pub mode: u64,
    pub zeropage: i64,
}

/// `struct uffdio_writeprotect`.
#[allow(missing_docs)] // the fields are the kernel's, named as in linux/userfaultfd.h
#[repr(C)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}
