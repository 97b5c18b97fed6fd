//! The virtio-rng worker: the host's entropy into the guest's buffers.

use super::List;

/// The virtio-rng worker's list.
pub(super) fn list() -> List {
    worker()
        // The entropy.
        .allow(libc::SYS_getrandom)
}

/// What every virtio worker does (device.rs's loop): wait on its queue eventfds and its
/// control descriptor, read them, signal the guest (an eventfd write, in the common list).
pub(super) fn worker() -> List {
    super::common::list()
        .allow(libc::SYS_poll)
        .allow(libc::SYS_ppoll)
        .allow(libc::SYS_read)
}
