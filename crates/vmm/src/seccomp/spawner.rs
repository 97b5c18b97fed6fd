//! The spawner thread: creates the device workers while the VM runs
//! ([`wv_devices::thread`]). A new thread runs under its creator's filter until it installs its
//! own, and keeps it besides: so this list is the union of the workers' lists, plus the creation
//! of a thread and the installation of a filter.

use super::List;
use std::sync::{mpsc, Mutex};

/// The spawner's list.
pub(super) fn list() -> List {
    super::common::list()
        .with(super::common::creates_threads())
        .with(super::virtio_blk::list())
        .with(super::virtio_net::list())
        .with(super::vhost_user_net::list())
        .with(super::virtio_rng::list())
}

/// Starts the spawner thread and makes it the one that creates device threads.
pub(super) fn start() -> std::io::Result<()> {
    let (tx, rx) = mpsc::channel::<wv_devices::thread::Job>();
    std::thread::Builder::new()
        .name("spawner".into())
        .spawn(move || {
            // This thread starts before the main thread blocks the stop signals (the filters
            // are prepared first), so it blocks them itself: otherwise a SIGTERM or SIGINT
            // could be delivered here, with its default action, instead of to the control
            // loop's signalfd (found by bad_input's a_spinning_guest_does_not_hang_the_vmm).
            // The device workers it creates inherit this mask.
            crate::block_signals(&crate::STOP_SIGNALS);
            super::install(super::Kind::Spawner);
            for job in rx {
                job();
            }
        })?;
    wv_devices::thread::set_spawner(wv_devices::thread::Spawner {
        jobs: Mutex::new(tx),
        start: super::install_named,
    });
    Ok(())
}
