//! The virtio-net worker: frames between the guest's queues and a TAP.

use super::ioctls::*;
use super::List;

/// The virtio-net worker's list.
pub(super) fn list() -> List {
    super::virtio_rng::worker()
        // Frames to and from the TAP (with their virtio-net headers).
        .allow(libc::SYS_write)
        .allow(libc::SYS_writev)
        .allow(libc::SYS_readv)
        // A reset: offloads back off.
        .ioctl(TUNSETOFFLOAD)
}
