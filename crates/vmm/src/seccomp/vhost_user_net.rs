//! A vhost-user net's or disk's relay thread (wv_virtio::vhost_user): it waits on the backend's call
//! eventfds and turns each into the queue's interrupt, stops and starts the rings over the
//! vhost-user socket when the VM pauses and resumes, and connects again to a backend that
//! restarted.

use super::List;

/// The relay's list.
pub(super) fn list() -> List {
    super::virtio_rng::worker()
        // Interrupts: the transport's irqfd (an eventfd write, in the common list).
        .allow(libc::SYS_write)
        // vhost-user messages (GET_VRING_BASE on pause, SET_VRING_* on resume and after a
        // reconnection), some carrying eventfds.
        .with(messages())
        // A restarted backend: a new AF_UNIX connection to the same socket path.
        .socket(libc::AF_UNIX)
        .allow(libc::SYS_connect)
        // The call eventfds handed to the backend are duplicates of the relay's.
        .allow_arg(libc::SYS_fcntl, 1, libc::F_DUPFD_CLOEXEC as u64)
}

/// The vhost-user protocol's messages, for threads that talk to a backend: the vCPU that
/// activates a device (DRIVER_OK: SET_FEATURES, SET_MEM_TABLE with the memory's fds,
/// SET_VRING_*) or resets it, and the relay.
pub(super) fn messages() -> List {
    List::default()
        .allow(libc::SYS_sendmsg)
        .allow(libc::SYS_recvmsg)
}
