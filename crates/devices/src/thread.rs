//! How device code starts a thread: through [`spawn`], so that the VMM can give every new thread
//! its system-call filter (crates/vmm/src/seccomp/).
//!
//! A seccomp filter is inherited by every thread its thread creates, and filters only add up
//! (a call must pass all of them). Device workers are started while the VM runs, by whichever
//! thread touches the device (a vCPU writing DRIVER_OK, the control thread resuming): started
//! there, a worker would be limited to what its starter may do as well as to its own list. So
//! once the VMM installs a [`Spawner`], [`spawn`] hands the thread's creation to the spawner's
//! own thread (whose filter allows what every worker needs), and the new thread first calls
//! [`Spawner::start`] with its kind to install its own filter. Without a spawner (tests, other
//! users of the crate) [`spawn`] is `std::thread::Builder::spawn`.

use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

/// A thread's creation, run on the spawner's thread.
pub type Job = Box<dyn FnOnce() + Send>;

/// What the VMM installs ([`set_spawner`]).
pub struct Spawner {
    /// The spawner thread's queue of creations.
    pub jobs: Mutex<mpsc::Sender<Job>>,
    /// Run first in every thread started through [`spawn`], with its kind (its filter's name).
    pub start: fn(&'static str),
}

static SPAWNER: OnceLock<Spawner> = OnceLock::new();

/// Installs the spawner for the rest of the process; false if there was one already.
pub fn set_spawner(s: Spawner) -> bool {
    SPAWNER.set(s).is_ok()
}

/// Starts thread `name` of kind `kind` (see the module's doc) running `f`.
pub fn spawn<T, F>(name: String, kind: &'static str, f: F) -> std::io::Result<JoinHandle<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let builder = std::thread::Builder::new().name(name);
    let Some(s) = SPAWNER.get() else {
        return builder.spawn(f);
    };
    let start = s.start;
    let (tx, rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = tx.send(builder.spawn(move || {
            start(kind);
            f()
        }));
    });
    let gone = || std::io::Error::other("the thread spawner has stopped");
    s.jobs
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(job)
        .map_err(|_| gone())?;
    rx.recv().map_err(|_| gone())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_spawner_threads_start_here() {
        let h = spawn("t".into(), "test", || {
            std::thread::current().name().map(str::to_string)
        })
        .unwrap();
        assert_eq!(h.join().unwrap().as_deref(), Some("t"));
    }
}
