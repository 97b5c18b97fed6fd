//! What every thread of the VMM may call: the Rust runtime's and the C library's own needs
//! (memory, locks, thread exit, signal return, the abort of a panic) and the report of a
//! refused call. Each kind's list starts from this one.

use super::List;

/// The calls every thread makes.
pub(super) fn list() -> List {
    List::default()
        // The seccomp report itself, panic messages, and most threads' output.
        .allow(libc::SYS_write)
        // The seccomp report under `kill`, and `std::process::exit`.
        .allow(libc::SYS_exit_group)
        // A thread's own end (std's thread exit, glibc's pthread_exit).
        .allow(libc::SYS_exit)
        // Mutexes, condition variables, channels, thread joins (std and glibc).
        .allow(libc::SYS_futex)
        .allow(libc::SYS_sched_yield)
        // Heap and thread stacks (glibc malloc, std): never executable memory.
        .allow_without_bits(libc::SYS_mmap, 2, libc::PROT_EXEC as u64)
        .allow_without_bits(libc::SYS_mprotect, 2, libc::PROT_EXEC as u64)
        .allow(libc::SYS_munmap)
        .allow(libc::SYS_mremap)
        .allow(libc::SYS_madvise)
        .allow(libc::SYS_brk)
        // Returning from a signal handler (the vCPU kick, SIGSYS under `log`).
        .allow(libc::SYS_rt_sigreturn)
        // std's thread exit (its alternate signal stack), glibc's abort.
        .allow(libc::SYS_sigaltstack)
        .allow(libc::SYS_rt_sigprocmask)
        // A panic's abort (panic = "abort"): raise(SIGABRT).
        .allow(libc::SYS_getpid)
        .allow(libc::SYS_gettid)
        .allow(libc::SYS_tgkill)
        // Time where the vDSO cannot serve it, and std::thread::sleep.
        .allow(libc::SYS_clock_gettime)
        .allow(libc::SYS_clock_nanosleep)
        .allow(libc::SYS_nanosleep)
        // Closing what a thread drops (descriptors are the thread's to close, whatever they are).
        .allow(libc::SYS_close)
        // std asks whether a descriptor is open (F_GETFD) before some closes.
        .fcntl(libc::F_GETFD)
        // std's HashMap seeds its hasher from the host's entropy (once per thread).
        .allow(libc::SYS_getrandom)
}

/// What a thread that creates threads needs besides: the creation (glibc's clone3, or clone
/// for a thread where clone3 is missing), and what the new thread does under its creator's
/// filter before it installs its own (glibc's and std's thread start, the installation).
pub(super) fn creates_threads() -> List {
    let thread = (libc::CLONE_VM | libc::CLONE_THREAD) as u64;
    List::default()
        .allow(libc::SYS_clone3)
        .allow_masked(libc::SYS_clone, 0, thread, thread)
        .allow(libc::SYS_set_robust_list)
        .allow(libc::SYS_rseq)
        // glibc's thread start reads the new thread's CPU affinity.
        .allow(libc::SYS_sched_getaffinity)
        // std names the thread (PR_SET_NAME); `install` sets no_new_privs first.
        .allow_arg(libc::SYS_prctl, 0, libc::PR_SET_NAME as u64)
        .allow_arg(libc::SYS_prctl, 0, libc::PR_SET_NO_NEW_PRIVS as u64)
        .allow_arg(
            libc::SYS_seccomp,
            0,
            u64::from(libc::SECCOMP_SET_MODE_FILTER),
        )
}
