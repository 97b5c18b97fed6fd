//! The daemon's end, and what it leaves: a record (`traces.json` in the state directory) of
//! everything the daemon made outside its state directory (the API's Unix socket and the
//! folders it created for it; its cgroups are [`crate::cgroup`]'s), kept up to date as it
//! makes them, so that a clean stop removes exactly that, and the next start or `wv host
//! uninstall` removes what a killed daemon left. It also owns the daemon's termination:
//! SIGTERM and SIGINT run the daemon's clean-up (once, on a thread of its own, never in the
//! signal handler) before the signal ends the process, and a lock file
//! ([`StateLock`]) marks a state directory as in use by a live daemon.
//!
//! What the daemon's VMMs make is theirs: a TAP a VMM created is not persistent (it goes with
//! the VMM's descriptor), their sockets and logs are in the state directory, and their cgroups
//! go once they end. A VMM that outlives its daemon (SIGTERM stops the daemon, not its VMs;
//! `wv host shutdown` stops both) keeps its group until it ends.

use serde::{Deserialize, Serialize};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The file in the state directory that records what the daemon made outside it.
pub const TRACES_FILE: &str = "traces.json";
/// The file in the state directory a live daemon holds locked.
pub const LOCK_FILE: &str = "daemon.lock";

/// What a daemon made outside its state directory.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traces {
    /// The API's Unix socket, with its device and inode (so that only that very socket is
    /// ever removed, not one another daemon bound at the same path since).
    #[serde(default)]
    pub socket: Option<SocketTrace>,
    /// Folders the daemon created for its socket, deepest first; removed when empty.
    #[serde(default)]
    pub dirs: Vec<PathBuf>,
}

/// One Unix socket file the daemon bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketTrace {
    /// Its path.
    pub path: PathBuf,
    /// `st_dev` of the file.
    pub dev: u64,
    /// `st_ino` of the file.
    pub ino: u64,
}

impl Traces {
    /// Reads the record in `state_dir` (empty when there is none or it does not read: a
    /// record that cannot be read names nothing to remove).
    pub fn load(state_dir: &Path) -> Traces {
        std::fs::read(state_dir.join(TRACES_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Writes the record to `state_dir` (a temporary file renamed over the old one).
    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        let tmp = state_dir.join(format!("{TRACES_FILE}.tmp"));
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, state_dir.join(TRACES_FILE))
    }

    /// Removes the record from `state_dir`.
    pub fn forget(state_dir: &Path) {
        let _ = std::fs::remove_file(state_dir.join(TRACES_FILE));
    }

    /// Removes what the record names: the socket if it is still the same file and nothing
    /// listens on it, then each folder if it is empty. What cannot go is said, on one line
    /// each, in the result (an empty list when everything went).
    pub fn remove(&self) -> Vec<String> {
        let mut left = Vec::new();
        if let Some(s) = &self.socket {
            if let Err(e) = s.remove_if_stale() {
                left.push(e);
            }
        }
        for d in &self.dirs {
            match std::fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => left.push(format!("{}: {e}", d.display())),
            }
        }
        left
    }
}

impl SocketTrace {
    /// The socket at `path` as it is now.
    pub fn of(path: &Path) -> std::io::Result<SocketTrace> {
        let m = std::fs::symlink_metadata(path)?;
        Ok(SocketTrace {
            path: path.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// Whether the file at the path is still this socket.
    pub fn is_same(&self) -> bool {
        std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && m.dev() == self.dev && m.ino() == self.ino)
    }

    /// Removes the socket file if it is still this one and no daemon listens on it.
    pub fn remove_if_stale(&self) -> Result<(), String> {
        if !self.is_same() {
            return Ok(());
        }
        if std::os::unix::net::UnixStream::connect(&self.path).is_ok() {
            return Err(format!("{}: a daemon listens on it", self.path.display()));
        }
        self.remove()
    }

    /// Removes the socket file if it is still this one (the daemon's own, at its end).
    pub fn remove(&self) -> Result<(), String> {
        if !self.is_same() {
            return Ok(());
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("{}: {e}", self.path.display())),
        }
    }
}

/// Creates `dir` and its missing parents; returns those it created, deepest first.
pub fn create_dirs(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut d = Some(dir);
    while let Some(p) = d.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        missing.push(p.to_path_buf());
        d = p.parent();
    }
    for p in missing.iter().rev() {
        match std::fs::create_dir(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("{}: {e}", p.display()),
                ))
            }
        }
    }
    Ok(missing)
}

/// An exclusive advisory lock on the state directory's [`LOCK_FILE`], held by a live daemon
/// for its whole life (the kernel releases it when the process ends, however it ends).
pub struct StateLock(#[allow(dead_code)] std::fs::File);

impl StateLock {
    /// Takes the lock, or says that a live daemon holds it.
    pub fn take(state_dir: &Path) -> std::io::Result<StateLock> {
        let path = state_dir.join(LOCK_FILE);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!(
                        "a daemon runs on the state directory {}",
                        state_dir.display()
                    ),
                )
            } else {
                std::io::Error::new(e.kind(), format!("locking {}: {e}", path.display()))
            });
        }
        Ok(StateLock(f))
    }
}

/// SIGTERM and SIGINT end the daemon after its clean-up: the handler only writes the
/// signal's number to a pipe; a thread reading it runs the clean-up, then lets the signal take
/// its default action (the exit status is the same as without a handler). A second signal
/// acts at once (the handler is reset after the first).
pub mod signals {
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};
    use std::sync::atomic::{AtomicI32, Ordering};
    use std::sync::{Mutex, Once};

    static PIPE: AtomicI32 = AtomicI32::new(-1);
    type Hook = Box<dyn FnOnce() + Send>;
    static HOOK: Mutex<Option<Hook>> = Mutex::new(None);

    extern "C" fn on_signal(sig: libc::c_int) {
        let b = u8::try_from(sig).unwrap_or(0);
        // SAFETY: errno is thread-local and saved/restored around write(2), which is
        // async-signal-safe; the buffer is a byte on this stack; a bad descriptor only fails.
        unsafe {
            let errno = *libc::__errno_location();
            libc::write(PIPE.load(Ordering::Relaxed), (&raw const b).cast(), 1);
            *libc::__errno_location() = errno;
        }
    }

    fn wait_and_close(read: OwnedFd) {
        let fd: RawFd = std::os::fd::AsRawFd::as_raw_fd(&read);
        let mut b = 0u8;
        loop {
            // SAFETY: reads one byte into `b`, which outlives the call, from a pipe we own.
            let n = unsafe { libc::read(fd, (&raw mut b).cast(), 1) };
            if n == 1 {
                break;
            }
            if n == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return;
            }
        }
        if let Some(hook) = HOOK.lock().unwrap_or_else(|p| p.into_inner()).take() {
            hook();
        }
        // SAFETY: raise(3) has no preconditions; the handler was reset (SA_RESETHAND), so the
        // signal now takes its default action, ending the process.
        unsafe { libc::raise(libc::c_int::from(b)) };
        std::process::exit(128 + i32::from(b));
    }

    /// Has SIGTERM and SIGINT run `hook` before they end the process (replacing an earlier
    /// hook).
    pub fn on_termination(hook: impl FnOnce() + Send + 'static) {
        *HOOK.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(hook));
        static INSTALL: Once = Once::new();
        INSTALL.call_once(|| {
            let mut fds = [0; 2];
            // SAFETY: pipe2 writes two descriptors into `fds`, an array of two.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                eprintln!(
                    "wv host: no pipe for signals ({}): a stopped daemon leaves its cgroups and socket",
                    std::io::Error::last_os_error()
                );
                return;
            }
            // SAFETY: pipe2 just returned this descriptor, owned by nothing else.
            let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
            PIPE.store(fds[1], Ordering::Relaxed);
            if let Err(e) = crate::helper::spawn("signals", move || wait_and_close(read)) {
                eprintln!(
                    "wv host: no thread for signals ({e}): a stopped daemon leaves its cgroups and socket"
                );
                return;
            }
            for sig in [libc::SIGTERM, libc::SIGINT] {
                // SAFETY: a zeroed sigaction is valid; the handler only calls
                // async-signal-safe functions; sa_mask is initialised by sigemptyset.
                unsafe {
                    let mut sa: libc::sigaction = std::mem::zeroed();
                    sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                    sa.sa_flags = libc::SA_RESTART | libc::SA_RESETHAND;
                    libc::sigemptyset(&mut sa.sa_mask);
                    if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                        eprintln!("wv host: signal {sig}: {}", std::io::Error::last_os_error());
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_dirs_are_recorded_and_removed_only_when_empty() {
        let base = std::env::temp_dir().join(format!("wv-traces-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let made = create_dirs(&base.join("a/b/c")).unwrap();
        assert_eq!(made, [base.join("a/b/c"), base.join("a/b"), base.join("a")]);
        assert!(create_dirs(&base.join("a/b/c")).unwrap().is_empty());
        // A socket, recorded, then the record read back.
        let sock = base.join("a/b/c/s.sock");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let t = Traces {
            socket: Some(SocketTrace::of(&sock).unwrap()),
            dirs: made,
        };
        t.save(&base).unwrap();
        assert_eq!(Traces::load(&base), t);
        // Listened on: stays, and so do its folders.
        let left = t.remove();
        assert_eq!(left.len(), 4, "{left:?}");
        assert!(left[0].contains("a daemon listens"), "{left:?}");
        assert!(sock.exists());
        drop(l);
        // Another file put in a recorded folder keeps that folder (and those above).
        std::fs::write(base.join("a/b/keep"), b"x").unwrap();
        let left = t.remove();
        assert!(!sock.exists() && !base.join("a/b/c").exists());
        assert_eq!(left.len(), 2, "{left:?}");
        std::fs::remove_file(base.join("a/b/keep")).unwrap();
        assert!(t.remove().is_empty());
        assert!(!base.join("a").exists());
        Traces::forget(&base);
        assert_eq!(Traces::load(&base), Traces::default());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_socket_replaced_at_the_same_path_is_not_removed() {
        let base = std::env::temp_dir().join(format!("wv-traces-sock-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let sock = base.join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let old = SocketTrace::of(&sock).unwrap();
        // Another daemon's socket put at the same path (both files exist at once, so their
        // inodes differ).
        let other = base.join("other.sock");
        drop(std::os::unix::net::UnixListener::bind(&other).unwrap());
        std::fs::rename(&other, &sock).unwrap();
        assert!(!old.is_same());
        old.remove().unwrap();
        old.remove_if_stale().unwrap();
        assert!(sock.exists(), "another daemon's socket was removed");
        SocketTrace::of(&sock).unwrap().remove().unwrap();
        assert!(!sock.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn the_state_lock_is_exclusive() {
        let base = std::env::temp_dir().join(format!("wv-lock-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let held = StateLock::take(&base).unwrap();
        let e = StateLock::take(&base).err().unwrap();
        assert!(e.to_string().contains("a daemon runs"), "{e}");
        drop(held);
        StateLock::take(&base).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
    }
}
