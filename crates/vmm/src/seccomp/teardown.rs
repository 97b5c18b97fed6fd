//! The teardown helper (a clone of the main thread sharing its memory, `Resources::exit`):
//! closes every descriptor but the KVM ones, tells `wv`, waits for `wv` to exit, exits. It
//! narrows itself to this list once started (until then it runs under the main thread's).
//! It does not start from the common list: it allocates nothing and takes no lock.

use super::List;

/// The helper's list.
pub(super) fn list() -> List {
    List::default()
        // Closing what it does not keep (close_range, or one by one where there is none).
        .allow(libc::SYS_close_range)
        .allow(libc::SYS_close)
        // Telling wv on the pipe; the seccomp report.
        .allow(libc::SYS_write)
        // Waiting on wv's pidfd; reading the tests' hold descriptor.
        .allow(libc::SYS_poll)
        .allow(libc::SYS_read)
        // Its end (and the end under `kill`).
        .allow(libc::SYS_exit)
        .allow(libc::SYS_exit_group)
        // The seccomp handler: who it is, and its return under `log`.
        .allow(libc::SYS_gettid)
        .allow(libc::SYS_rt_sigreturn)
}
