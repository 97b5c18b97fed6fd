//! The daemon's two system worlds. The *management* world serves the API (the daemon's main
//! thread and one thread per connection); the *helper* world runs the background jobs: the
//! scheduler's tick, waiting on VMM processes, removing what a world leaves behind. Each has
//! its own cgroup beside the VM worlds', so a burst of background work cannot take CPU from
//! the API or from the VMs beyond the helper's weight, and each is accounted apart
//! (`GET /v1/stats`). Without cgroups the two are still told apart, by thread name.

use crate::sched::ThreadTime;
use std::path::PathBuf;
use std::sync::Mutex;

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

/// The file of the helper world's cgroup that takes single threads (`tasks` on cgroup v1,
/// `cgroup.threads` on v2), while the daemon has one.
static TASKS: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Places helper threads started from now on in the cgroup whose thread file this is.
pub fn set_cgroup(tasks: PathBuf) {
    *TASKS.lock().unwrap_or_else(|p| p.into_inner()) = Some(tasks);
}

/// Stops placing helper threads in a cgroup (the daemon's groups are being removed). A thread
/// that starts meanwhile either is placed before this returns or not at all.
pub fn clear_cgroup() {
    *TASKS.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// Indexes of the system worlds in [`Retired`] (their ids).
const MANAGEMENT: usize = 0;
const HELPER: usize = 1;

/// CPU and ready time of the system worlds' threads that have ended (indexed by world id),
/// so their accounting never goes backwards when a thread ends, and the ids of those threads
/// (until they leave /proc), which are not counted again.
struct Retired {
    cpu_ns: [u64; 2],
    ready_ns: [u64; 2],
    tids: Vec<u32>,
}

static RETIRED: Mutex<Retired> = Mutex::new(Retired {
    cpu_ns: [0; 2],
    ready_ns: [0; 2],
    tids: Vec::new(),
});

fn gettid() -> u32 {
    // SAFETY: the gettid system call has no preconditions. (Not libc's gettid(): in the
    // statically linked release binary that symbol is a null weak one.)
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    u32::try_from(tid).unwrap_or(0)
}

/// Adds the calling thread's times to its world's retired times when dropped: at the end of
/// the thread's job, returned or unwound.
struct Retire(usize);

impl Drop for Retire {
    fn drop(&mut self) {
        let tid = gettid();
        let stat =
            std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).unwrap_or_default();
        let mut f = stat
            .split_whitespace()
            .map(|x| x.parse::<u64>().unwrap_or(0));
        let (cpu, ready) = (f.next().unwrap_or(0), f.next().unwrap_or(0));
        let mut r = RETIRED.lock().unwrap_or_else(|p| p.into_inner());
        r.cpu_ns[self.0] += cpu;
        r.ready_ns[self.0] += ready;
        r.tids.push(tid);
    }
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
            {
                let tasks = TASKS.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(tasks) = &*tasks {
                    let tid = gettid();
                    if let Err(e) = std::fs::write(tasks, tid.to_string()) {
                        eprintln!("wv host: helper thread {tid}: {}: {e}", tasks.display());
                    }
                }
            }
            let _retire = Retire(HELPER);
            job();
        })
}

/// Runs `job` on a new thread of the management world (the API's connections).
pub fn spawn_management<F>(job: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            let _retire = Retire(MANAGEMENT);
            job();
        })
}

/// The accounting of the system worlds from the daemon's live threads: (cpu_ns, ready_ns,
/// threads) for the management world and for the helper world, ended threads included.
pub fn accounting(live: Vec<ThreadTime>) -> [(u64, u64, Vec<ThreadTime>); 2] {
    let mut r = RETIRED.lock().unwrap_or_else(|p| p.into_inner());
    // Ended threads still listed are counted as retired only; ids that left /proc are forgotten.
    r.tids.retain(|t| live.iter().any(|l| l.tid == *t));
    let (help, mgmt): (Vec<_>, Vec<_>) = live
        .into_iter()
        .filter(|t| !r.tids.contains(&t.tid))
        .partition(|t| is_helper(&t.name));
    let world = |i: usize, threads: Vec<ThreadTime>| {
        let (cpu, ready) = crate::sched::totals(&threads);
        (r.cpu_ns[i] + cpu, r.ready_ns[i] + ready, threads)
    };
    [world(MANAGEMENT, mgmt), world(HELPER, help)]
}

/// Whether a thread (by its name as the kernel reports it) belongs to the helper world.
pub fn is_helper(thread_name: &str) -> bool {
    thread_name.starts_with(PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This thread's own CPU time (CLOCK_THREAD_CPUTIME_ID), in ns.
    fn thread_cpu_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec we own.
        let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(r, 0);
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    #[test]
    fn ended_threads_keep_their_time() {
        // The thread spins until its own CPU clock says 50 ms (however busy the machine) and
        // reports how much CPU time it used and its id.
        let (tx, rx) = std::sync::mpsc::channel();
        let spin = move || {
            while thread_cpu_ns() < 50_000_000 {
                std::hint::spin_loop();
            }
            // SAFETY: gettid has no arguments and cannot fail.
            let tid = u32::try_from(unsafe { libc::syscall(libc::SYS_gettid) }).unwrap();
            tx.send((thread_cpu_ns(), tid)).unwrap();
        };
        let before = accounting(crate::sched::threads(std::process::id()))[1].0;
        spawn("test-spin", spin).unwrap().join().unwrap();
        let (used, tid) = rx.recv().unwrap();
        let [_, (after, _, threads)] = accounting(crate::sched::threads(std::process::id()));
        assert!(
            after >= before + used,
            "the ended helper thread's {used} ns are kept: {before} -> {after}"
        );
        assert!(
            threads.iter().all(|t| t.name != "helper-test-spi"),
            "{threads:?}"
        );
        // Still counted once the thread has left /proc.
        let task = format!("/proc/self/task/{tid}");
        let t = std::time::Instant::now();
        while std::path::Path::new(&task).exists() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "{task} stays"
            );
            std::thread::yield_now();
        }
        let again = accounting(crate::sched::threads(std::process::id()))[1].0;
        assert!(again >= after, "never backwards: {after} -> {again}");
    }
}
