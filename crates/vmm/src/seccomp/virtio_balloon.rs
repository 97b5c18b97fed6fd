//! The virtio-balloon worker: guest pages given back to the host.

use super::List;

/// The virtio-balloon worker's list: a virtio worker's, and the release of guest pages with
/// `madvise` (`MADV_DONTNEED` for private RAM, `MADV_REMOVE` for the memfd of shared RAM). The
/// common list already allows `madvise` with any advice (the allocator's own use), so the rule
/// here adds nothing today; it states what the worker needs should the common list narrow.
pub(super) fn list() -> List {
    super::virtio_rng::worker()
        .allow_arg(libc::SYS_madvise, 2, libc::MADV_DONTNEED as u64)
        .allow_arg(libc::SYS_madvise, 2, libc::MADV_REMOVE as u64)
}
