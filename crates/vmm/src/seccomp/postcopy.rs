//! A post-copy migration target's threads: `postcopy-recv` places the pages the source sends
//! (userfaultfd UFFDIO_COPY), `postcopy-fault` reads the guest's faults from the userfaultfd
//! and asks the source for their pages. Both are started by the main thread before the VM
//! runs (before its own filter).

use super::ioctls::*;
use super::List;

/// The receiver's list.
pub(super) fn recv_list() -> List {
    super::common::list()
        // Page records from the source.
        .allow(libc::SYS_read)
        .allow(libc::SYS_recvfrom)
        // Placing a page (waking the faulting vCPU), or waking it when it was already there.
        .ioctl(UFFDIO_COPY)
        .ioctl(UFFDIO_WAKE)
        .ioctl(UFFDIO_ZEROPAGE)
        // The end of post-copy: the memory no longer watched, and the request direction
        // closed, so the source (draining requests) sees the end and no reset.
        .ioctl(UFFDIO_UNREGISTER)
        .allow(libc::SYS_shutdown)
}

/// The fault reader's list.
pub(super) fn fault_list() -> List {
    super::common::list()
        // Faults from the userfaultfd (polled, read).
        .allow(libc::SYS_poll)
        .allow(libc::SYS_read)
        // Requests to the source.
        .allow(libc::SYS_sendto)
        // A fault on a page the source never had (zero-filled), or one already placed.
        .ioctl(UFFDIO_ZEROPAGE)
        .ioctl(UFFDIO_WAKE)
}
