//! The daemon's two system worlds. The *management* world serves the API (the daemon's main
//! thread and one thread per connection); the *helper* world runs the background jobs: the
//! scheduler's tick, waiting on VMM processes, removing what a world leaves behind. Each has
//! its own cgroup beside the VM worlds', so a burst of background work cannot take CPU from
//! the API or from the VMs beyond the helper's weight, and each is accounted apart
//! (`GET /v1/stats`). Without cgroups the two are still told apart, by thread name.

use std::path::PathBuf;
use std::sync::OnceLock;

/// World id of the management world.
pub const MANAGEMENT_ID: u64 = 0;
/// World id of the helper world. VM worlds are numbered from [`FIRST_VM_ID`].
pub const HELPER_ID: u64 = 1;
/// The first VM world id.
pub const FIRST_VM_ID: u64 = 2;
/// Shares of the management world: one CPU's worth when contended, so the API answers
/// promptly even on a host full of busy VMs.
pub const MANAGEMENT_SHARES: u32 = 1000;
/// Shares of the helper world: a tenth of a CPU's weight when contended; idle CPU time it
/// can use without limit.
pub const HELPER_SHARES: u32 = 100;
/// Name prefix of the helper world's threads.
pub const PREFIX: &str = "helper-";

/// The helper world's cgroup `tasks` file, once the daemon has one.
static TASKS: OnceLock<PathBuf> = OnceLock::new();

/// Places helper threads started from now on in the cgroup whose `tasks` file this is.
pub fn set_cgroup(tasks: PathBuf) {
    let _ = TASKS.set(tasks);
}

/// Runs `job` on a new thread of the helper world, named `helper-NAME` (15 bytes at most are
/// kept by the kernel).
pub fn spawn<F>(name: &str, job: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    std::thread::Builder::new()
        .name(format!("{PREFIX}{name}"))
        .spawn(move || {
            if let Some(tasks) = TASKS.get() {
                // SAFETY: the gettid system call has no preconditions. (Not libc's gettid():
                // in the statically linked release binary that symbol is a null weak one.)
                let tid = unsafe { libc::syscall(libc::SYS_gettid) };
                if let Err(e) = std::fs::write(tasks, tid.to_string()) {
                    eprintln!("wv host: helper thread {tid}: {}: {e}", tasks.display());
                }
            }
            job();
        })
}

/// Whether a thread (by its name as the kernel reports it) belongs to the helper world.
pub fn is_helper(thread_name: &str) -> bool {
    thread_name.starts_with(PREFIX)
}
