//! The main thread once the VM runs: vCPU 0 (the vCPU list, `vcpu.rs`), then the end of the
//! process: joining the other threads, the exit hooks (VMKFS owner records), the exit report
//! and `--stats` (KVM's binary statistics), and the start of the teardown helper
//! (`Resources::exit`), which runs under this list until it narrows itself to `teardown.rs`.

use super::ioctls::*;
use super::List;

/// The main thread's list.
pub(super) fn list() -> List {
    let thread = (libc::CLONE_VM | libc::CLONE_THREAD) as u64;
    super::vcpu::list()
        // --stats and GET /metrics' counters: a statistics descriptor per vCPU, read.
        .ioctl(KVM_GET_STATS_FD)
        .allow(libc::SYS_pread64)
        // VMKFS exit hooks: the owner record written and synced, the lock dropped.
        .allow(libc::SYS_pwrite64)
        .allow(libc::SYS_fsync)
        .allow(libc::SYS_fdatasync)
        .fcntl(libc::F_OFD_SETLK)
        .fcntl(libc::F_OFD_SETLKW)
        // The teardown helper: a pidfd of this process, the pipe it reports on, the list of
        // open descriptors (/proc/self/fd), and the helper itself: a process sharing this
        // one's memory (CLONE_VM without CLONE_THREAD), which then installs its own filter.
        .allow(libc::SYS_pidfd_open)
        .allow(libc::SYS_pipe2)
        // Opening for reading only: /proc/self/fd (opendir's flags) and read-only files.
        .allow_arg(
            libc::SYS_openat,
            2,
            (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_DIRECTORY | libc::O_NONBLOCK) as u64,
        )
        .allow_arg(
            libc::SYS_openat,
            2,
            (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
        )
        .allow(libc::SYS_getdents64)
        .allow(libc::SYS_newfstatat)
        .allow(libc::SYS_statx)
        .allow_masked(libc::SYS_clone, 0, thread, libc::CLONE_VM as u64)
        .allow_arg(
            libc::SYS_seccomp,
            0,
            u64::from(libc::SECCOMP_SET_MODE_FILTER),
        )
        // WV_SYNC_TEARDOWN (and a failed helper): the VM closed here; close_range as well.
        .allow(libc::SYS_close_range)
        .allow(libc::SYS_poll)
}
