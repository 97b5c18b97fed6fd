//! What the host's vhost-user backends (`wv vswitch`, `wv storage`) share: the names their
//! sockets may take, the check of a frontend's memory table, and the loop that serves one
//! frontend after another on a socket (rust-vmm's `vhost-user-backend`), closing what that
//! library leaves open.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Whether `s` can name a socket (a port, a network, a disk): 1-64 of `[A-Za-z0-9_.-]`, not
/// starting with `.`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Checks a frontend's memory table as mapped: every region file-backed, and inside its file.
/// A region that maps more of its file than the file holds would fault (SIGBUS) on first
/// touch: refused here, an error for that connection only.
pub fn check_memory<B: Bitmap>(mem: &GuestMemoryMmap<B>) -> std::io::Result<()> {
    for r in mem.iter() {
        let Some(fo) = r.file_offset() else {
            return Err(std::io::Error::other("a memory region without a file"));
        };
        let size = fo.file().metadata()?.len();
        let end = fo.start().checked_add(r.len());
        if end.is_none_or(|e| e > size) {
            return Err(std::io::Error::other(format!(
                "a memory region maps {} bytes at offset {} of a {size}-byte file",
                r.len(),
                fo.start()
            )));
        }
    }
    Ok(())
}

/// The read ends of the exit events handed to vhost-user-backend, which registers them with
/// its epoll through `into_raw_fd` and never closes them (0.24): closed once the connection's
/// daemon is gone ([`ExitEvents::close`]), or every connection would leak a descriptor.
#[derive(Clone, Default)]
pub struct ExitEvents(Arc<Mutex<Vec<RawFd>>>);

impl ExitEvents {
    /// A new exit event for a backend's `exit_event` (its read end remembered).
    pub fn pair(&self) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    /// The read ends handed out and not closed yet.
    pub fn handed_out(&self) -> Vec<RawFd> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Closes the read ends handed out so far. Only once the daemon that took them has been
    /// dropped (its epoll handlers with it): nothing else uses them then.
    pub fn close(&self) {
        for fd in self.0.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            // SAFETY: `fd` is the read end of an exit event made by `pair`, which
            // vhost-user-backend took as a raw descriptor and never closes; its user (the
            // daemon's epoll handler) is gone, so closing it here closes nothing in use.
            unsafe { libc::close(fd) };
        }
    }
}

/// Serves frontends on `listener` (bound to `socket`) one at a time with `backend`, whose
/// `exit_event` hands out events from `exit`. After each connection ends, `ended` runs (the
/// backend forgets that frontend) and says whether to take the next one. `who` prefixes
/// messages (`wv vswitch`). Returns on a set-up error or when `ended` says to stop.
pub fn serve_frontends<T>(
    who: &str,
    name: &str,
    backend: T,
    exit: &ExitEvents,
    socket: &Path,
    listener: &mut Listener,
    mut ended: impl FnMut() -> bool,
) -> Result<(), String>
where
    T: VhostUserBackend<
            Bitmap = (),
            Vring = vhost_user_backend::VringRwLock<GuestMemoryAtomic<GuestMemoryMmap>>,
        > + Clone
        + 'static,
{
    loop {
        let mut daemon = VhostUserDaemon::new(
            name.to_string(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| format!("{}: {e:?}", socket.display()))?;
        if let Err(e) = daemon.start(listener) {
            eprintln!("{who}: {}: {e:?}", socket.display());
            if !ended() {
                return Ok(());
            }
            continue;
        }
        match daemon.wait() {
            Ok(()) => {}
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => eprintln!("{who}: {}: the VMM disconnected", socket.display()),
            Err(e) => eprintln!(
                "{who}: {}: the VMM's connection failed: {e:?}",
                socket.display()
            ),
        }
        let more = ended();
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        // Joins the connection's worker, then closes what the library leaves open.
        drop(daemon);
        exit.close();
        if !more {
            return Ok(());
        }
    }
}
