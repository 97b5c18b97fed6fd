//! The target's side of post-copy migration (docs/MIGRATION.md): guest memory registered with
//! userfaultfd (MISSING mode) so that a vCPU, KVM or a device touching a page the source has not
//! delivered yet waits while a fault thread asks the source for it; a receiver thread copies in
//! every page the source sends (asked for or pushed in the background) with UFFDIO_COPY, and
//! zero pages with UFFDIO_ZEROPAGE. Losing the source before every page arrived stops the VM
//! (its memory is split between two hosts: the known limit of post-copy in every VMM).
//!
//! Raw ioctls (the rust-vmm `userfaultfd` crate is not in this host's offline registry), with
//! the ABI's numbers and structures from `wv_dsm::uffd_abi`.

use crate::migrate::{MigrationError, PAGE};
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use wv_dsm::uffd_abi::{
    UffdioApi, UffdioCopy, UffdioRange, UffdioRegister, UffdioZeropage, EVENT_PAGEFAULT,
    REGISTER_MODE_MISSING, UFFDIO_API, UFFDIO_COPY, UFFDIO_REGISTER, UFFDIO_WAKE, UFFDIO_ZEROPAGE,
    UFFD_API,
};
use wv_machine::GuestRam;

/// A userfaultfd and the guest RAM it covers.
struct Uffd {
    fd: OwnedFd,
    /// (guest physical start, host address, length) of each region.
    regions: Vec<(u64, u64, u64)>,
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// A new userfaultfd (blocking, close-on-exec) for this process's memory.
pub(crate) fn open_userfaultfd() -> Result<OwnedFd, MigrationError> {
    // SAFETY: the userfaultfd syscall takes flags only and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(MigrationError(format!(
            "post-copy needs userfaultfd: userfaultfd(2): {} (vm.unprivileged_userfaultfd?)",
            errno()
        )));
    }
    let raw = i32::try_from(raw).map_err(|_| MigrationError("userfaultfd(2)".into()))?;
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

impl Uffd {
    /// Opens a userfaultfd and registers every region of `mem` for MISSING faults.
    fn new(mem: &GuestRam) -> Result<Uffd, MigrationError> {
        // A jailed VMM made one while it was still root (crates/vmm/src/jail.rs).
        let fd = match wv_fds::take(crate::jail::USERFAULTFD) {
            Some(fd) => fd,
            None => open_userfaultfd()?,
        };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a uffdio_api, which `api` is, on our userfaultfd.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } < 0 {
            return Err(MigrationError(format!("UFFDIO_API: {}", errno())));
        }
        let mut regions = Vec::new();
        for r in mem.iter() {
            let host = r.as_ptr() as u64;
            let mut reg = UffdioRegister {
                range: UffdioRange {
                    start: host,
                    len: r.len(),
                },
                mode: REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            // SAFETY: UFFDIO_REGISTER reads and writes a uffdio_register; the range is a guest
            // RAM mapping this process owns for the VM's lifetime.
            if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } < 0 {
                return Err(MigrationError(format!(
                    "UFFDIO_REGISTER of guest memory at {:#x}: {}",
                    r.start_addr().0,
                    errno()
                )));
            }
            regions.push((r.start_addr().0, host, r.len()));
        }
        Ok(Uffd { fd, regions })
    }

    fn host(&self, gpa: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|(g, _, l)| gpa >= *g && gpa - g < *l)
            .map(|(g, h, _)| h + (gpa - g))
    }

    fn gpa(&self, host: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|(_, h, l)| host >= *h && host - h < *l)
            .map(|(g, h, _)| g + (host - h))
    }

    /// Places `data` (whole pages) at `gpa`; pages already present are left as they are.
    fn copy(&self, gpa: u64, data: &[u8]) -> Result<(), MigrationError> {
        let Some(dst) = self.host(gpa) else {
            return Err(MigrationError(format!("a page at {gpa:#x} outside memory")));
        };
        let mut c = UffdioCopy {
            dst,
            src: data.as_ptr() as u64,
            len: data.len() as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads `data` (live for the call) and writes into a registered
        // guest range (checked by `host`, lengths checked by the stream reader).
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) } < 0 {
            let e = errno();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(MigrationError(format!("UFFDIO_COPY at {gpa:#x}: {e}")));
            }
            self.wake(dst, data.len() as u64);
        }
        Ok(())
    }

    /// Maps zero pages at `gpa`; pages already present are left as they are.
    fn zero(&self, gpa: u64, len: u64) -> Result<(), MigrationError> {
        let Some(dst) = self.host(gpa) else {
            return Err(MigrationError(format!("a page at {gpa:#x} outside memory")));
        };
        let mut z = UffdioZeropage {
            range: UffdioRange { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes a uffdio_zeropage over a registered range.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) } < 0 {
            let e = errno();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(MigrationError(format!("UFFDIO_ZEROPAGE at {gpa:#x}: {e}")));
            }
            self.wake(dst, len);
        }
        Ok(())
    }

    fn wake(&self, host: u64, len: u64) {
        let mut r = UffdioRange { start: host, len };
        // SAFETY: UFFDIO_WAKE reads a uffdio_range; it only wakes threads waiting on it.
        let _ = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut r) };
    }
}

/// Stops the VM: the source is gone with pages the VM needs.
fn lost(why: &str) -> ! {
    eprintln!(
        "wv: post-copy migration: {why}; the VM stops (part of its memory was still on the \
         source)"
    );
    std::process::exit(1)
}

/// Starts post-copy on the target, before any vCPU runs: drops the stale copies of `pages` (the
/// guest-physical addresses the source still holds), registers `mem` with userfaultfd and starts
/// the fault and receiver threads on `conn`.
pub(crate) fn start(mem: &GuestRam, pages: &[u64], conn: &TcpStream) -> Result<(), MigrationError> {
    let uffd = Arc::new(Uffd::new(mem)?);
    for &gpa in pages {
        let Some(h) = uffd.host(gpa) else {
            return Err(MigrationError(format!(
                "a post-copy page at {gpa:#x} outside memory"
            )));
        };
        // SAFETY: one page of guest RAM this process maps; dropping it makes the next touch
        // fault to userfaultfd (no vCPU runs yet, and guest memory is never a Rust reference).
        if unsafe { libc::madvise(h as *mut libc::c_void, PAGE_USIZE, libc::MADV_DONTNEED) } < 0 {
            return Err(MigrationError(format!("madvise at {gpa:#x}: {}", errno())));
        }
    }
    eprintln!(
        "wv: post-copy: {} pages still on the source, fetched on demand and in the background",
        pages.len()
    );
    let missing: Arc<Mutex<HashSet<u64>>> = Arc::new(Mutex::new(pages.iter().copied().collect()));
    let mut reader = conn
        .try_clone()
        .map_err(|e| MigrationError(format!("post-copy connection: {e}")))?;
    let mut writer = conn
        .try_clone()
        .map_err(|e| MigrationError(format!("post-copy connection: {e}")))?;
    // No deadline after GO: the source may be slow, but only its loss stops the VM.
    let _ = reader.set_read_timeout(None);
    let (u, m) = (uffd.clone(), missing.clone());
    std::thread::Builder::new()
        .name("postcopy-recv".into())
        .spawn(move || {
            crate::seccomp::install(crate::seccomp::Kind::PostcopyRecv);
            if let Err(e) = receive(&u, &m, &mut std::io::BufReader::new(&mut reader)) {
                lost(&e.0);
            }
            // Every page is in: no more requests. The source, reading them, sees the end and
            // closes with nothing unread (a close with unread data resets the connection).
            let _ = reader.shutdown(std::net::Shutdown::Write);
        })
        .map_err(|e| MigrationError(format!("starting the post-copy receiver: {e}")))?;
    std::thread::Builder::new()
        .name("postcopy-fault".into())
        .spawn(move || {
            crate::seccomp::install(crate::seccomp::Kind::PostcopyFault);
            faults(&uffd, &missing, &mut writer)
        })
        .map_err(|e| MigrationError(format!("starting the post-copy fault thread: {e}")))?;
    Ok(())
}

const PAGE_USIZE: usize = 4096;

/// Reads page records until the end marker, placing each page and marking it delivered.
fn receive(
    u: &Uffd,
    missing: &Mutex<HashSet<u64>>,
    r: &mut impl Read,
) -> Result<(), MigrationError> {
    let mut buf = vec![0u8; PAGE_USIZE];
    let mut take = |b: &mut [u8]| {
        r.read_exact(b)
            .map_err(|e| MigrationError(format!("lost the source: {e}")))
    };
    loop {
        let mut t = [0u8; 4];
        take(&mut t)?;
        let tag = u32::from_le_bytes(t);
        if tag == crate::migrate::TAG_END {
            let left = missing.lock().map(|m| m.len()).unwrap_or(0);
            if left != 0 {
                return Err(MigrationError(format!(
                    "the source ended with {left} pages undelivered"
                )));
            }
            return Ok(());
        }
        let mut h = [0u8; 16];
        take(&mut h)?;
        let mut w = [0u8; 8];
        w.copy_from_slice(&h[..8]);
        let gpa = u64::from_le_bytes(w);
        w.copy_from_slice(&h[8..]);
        let len = u64::from_le_bytes(w);
        if len != PAGE || !gpa.is_multiple_of(PAGE) || u.host(gpa).is_none() {
            return Err(MigrationError(format!(
                "a post-copy record at {gpa:#x} of {len} bytes is not one page of memory"
            )));
        }
        match tag {
            crate::migrate::TAG_PAGES => {
                let mut c = [0u8; 4];
                take(&mut c)?;
                take(&mut buf)?;
                if wv_vmkfs::crc::crc32c(&buf) != u32::from_le_bytes(c) {
                    return Err(MigrationError(format!(
                        "the post-copy page at {gpa:#x} is corrupt (checksum mismatch)"
                    )));
                }
                u.copy(gpa, &buf)?;
            }
            crate::migrate::TAG_ZERO => u.zero(gpa, PAGE)?,
            t => return Err(MigrationError(format!("unknown post-copy record tag {t}"))),
        }
        // Only once the page is in: a fault on it meanwhile asks for it (harmlessly twice).
        if let Ok(mut m) = missing.lock() {
            m.remove(&gpa);
        }
    }
}

/// Serves page faults: asks the source for a page it still holds, maps a zero page otherwise
/// (memory the guest never touched).
fn faults(u: &Uffd, missing: &Mutex<HashSet<u64>>, w: &mut TcpStream) {
    let read_msg = || -> std::io::Result<[u8; 32]> {
        let mut msg = [0u8; 32];
        // SAFETY: reading one uffd_msg (32 bytes) into `msg` from our userfaultfd.
        let n = unsafe { libc::read(u.fd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        if n != 32 {
            return Err(errno());
        }
        Ok(msg)
    };
    let mut asking = true;
    loop {
        let msg = match read_msg() {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => lost(&format!("reading userfaultfd: {e}")),
        };
        if msg[0] != EVENT_PAGEFAULT {
            continue;
        }
        let mut a = [0u8; 8];
        a.copy_from_slice(&msg[16..24]);
        let host = u64::from_le_bytes(a) & !(PAGE - 1);
        let Some(gpa) = u.gpa(host) else {
            continue;
        };
        let wanted = missing.lock().map(|m| m.contains(&gpa)).unwrap_or(false);
        if wanted {
            // A request that cannot be written is not the end by itself: the source pushes
            // every listed page anyway, and may have sent the last ones and closed its end
            // while they were in flight. The receiver decides: the page arrives (and wakes
            // this fault), or the stream ends without it and the VM stops.
            if asking && w.write_all(&gpa.to_le_bytes()).is_err() {
                asking = false;
            }
        } else if let Err(e) = u.zero(gpa, PAGE) {
            lost(&e.0);
        }
    }
}
