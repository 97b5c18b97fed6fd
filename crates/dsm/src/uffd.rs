//! The node's memory: a mapping (anonymous private or a shared memfd, or the VMM's own guest
//! RAM) registered with userfaultfd in MISSING and WP modes, and the [`PageOps`] the
//! coherence engine drives it with (UFFDIO_COPY, UFFDIO_WRITEPROTECT, MADV_DONTNEED or
//! MADV_REMOVE, UFFDIO_WAKE).
//!
//! The raw ioctls' numbers and structures are in [`crate::uffd_abi`].

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::coherence::PageOps;

use crate::uffd_abi::*;

/// How the mapping is backed, which decides how a page is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous private memory: MADV_DONTNEED.
    Anonymous,
    /// Shared memory (a memfd mapped MAP_SHARED): MADV_REMOVE frees the page cache page.
    Shared,
}

/// A memory region the node keeps coherent.
#[derive(Debug)]
pub struct Region {
    ptr: *mut u8,
    len: usize,
    backing: Backing,
    owned: Option<OwnedFd>,
    unmap: bool,
}

// SAFETY: the region is plain memory shared by the node's threads; all access to its pages
// goes through the kernel (ioctls) or through the workload's own synchronisation.
unsafe impl Send for Region {}
// SAFETY: as above; `Region` holds no interior state besides the mapping's address.
unsafe impl Sync for Region {}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).unwrap_or(4096)
}

impl Region {
    /// Maps `len` bytes of anonymous private memory (or of a new memfd, mapped shared).
    pub fn map(len: usize, backing: Backing) -> io::Result<Region> {
        let ps = page_size();
        if len == 0 || !len.is_multiple_of(ps) {
            return Err(io::Error::other(format!(
                "region size {len} is not a nonzero multiple of {ps}"
            )));
        }
        let (fd, flags) = match backing {
            Backing::Anonymous => (None, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS),
            Backing::Shared => {
                // SAFETY: the name is a valid NUL-terminated string.
                let fd = unsafe { libc::memfd_create(c"wv-dsm".as_ptr(), libc::MFD_CLOEXEC) };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: fd was just created and is owned by nobody else.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                let l = libc::off_t::try_from(len).map_err(io::Error::other)?;
                // SAFETY: ftruncate on a valid memfd.
                if unsafe { libc::ftruncate(fd.as_raw_fd(), l) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                (Some(fd), libc::MAP_SHARED)
            }
        };
        let raw = fd.as_ref().map_or(-1, |f| f.as_raw_fd());
        // SAFETY: a fresh mapping at an address the kernel chooses; nothing else is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Region {
            ptr: ptr.cast(),
            len,
            backing,
            owned: fd,
            unmap: true,
        })
    }

    /// Wraps a mapping the caller made (a VMM's guest RAM), without taking it over: it is
    /// not unmapped when the region is dropped.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be a page-aligned read-write mapping of the given backing that
    /// outlives the node, and nothing may unmap or remap it while the node runs.
    pub unsafe fn from_raw(ptr: *mut u8, len: usize, backing: Backing) -> Region {
        Region {
            ptr,
            len,
            backing,
            owned: None,
            unmap: false,
        }
    }

    /// Start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never: a region has at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The backing kind.
    pub fn backing(&self) -> Backing {
        self.backing
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if self.unmap {
            // SAFETY: the mapping was made by `map` and is not used after the region is gone.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
        drop(self.owned.take());
    }
}

/// A fault read from the userfaultfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Page number in the region.
    pub page: u64,
    /// A write (or write-protect) fault.
    pub write: bool,
}

/// The region registered with a userfaultfd, as the engine's [`PageOps`].
#[derive(Debug)]
pub struct UffdMem {
    uffd: OwnedFd,
    base: u64,
    len: u64,
    page_size: usize,
    backing: Backing,
    /// Pages installed or unprotected whose faulting threads are not woken yet.
    wakes: Vec<u64>,
}

fn ioctl<T>(fd: RawFd, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: every caller passes the request's argument struct, laid out as the kernel's
    // (repr(C), same field order and sizes as linux/userfaultfd.h); the kernel only touches it
    // for the duration of the call.
    let r = unsafe { libc::ioctl(fd, req, std::ptr::from_mut(arg)) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl UffdMem {
    /// Opens a userfaultfd, registers `region` for missing and write-protect faults and drops
    /// every page the region may hold (INIT: all local pages start invalid).
    pub fn register(region: &Region) -> io::Result<UffdMem> {
        let ps = page_size();
        let ctx =
            |what: &str, e: io::Error| io::Error::new(e.kind(), format!("userfaultfd {what}: {e}"));
        let features = if region.backing == Backing::Shared {
            FEATURE_WP_SHMEM
        } else {
            0
        };
        // SAFETY: the userfaultfd syscall takes only flags.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(ctx("open", io::Error::last_os_error()));
        }
        // SAFETY: the syscall returned a new descriptor owned by nobody else.
        let uffd = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).map_err(io::Error::other)?) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api).map_err(|e| ctx("API handshake", e))?;
        let mem = UffdMem {
            uffd,
            base: region.ptr as u64,
            len: region.len as u64,
            page_size: ps,
            backing: region.backing,
            wakes: Vec::new(),
        };
        // No transparent huge pages: coherence is per small page.
        // SAFETY: advice on the caller's mapping; it does not change its contents.
        unsafe { libc::madvise(region.ptr.cast(), region.len, libc::MADV_NOHUGEPAGE) };
        mem.drop_range(mem.base, mem.len)?;
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: mem.base,
                len: mem.len,
            },
            mode: REGISTER_MODE_MISSING | REGISTER_MODE_WP,
            ioctls: 0,
        };
        ioctl(mem.uffd.as_raw_fd(), UFFDIO_REGISTER, &mut reg)
            .map_err(|e| ctx("register (MISSING|WP)", e))?;
        if reg.ioctls & IOCTL_COPY_BIT == 0 || reg.ioctls & IOCTL_WRITEPROTECT_BIT == 0 {
            return Err(io::Error::other(
                "userfaultfd: UFFDIO_COPY or UFFDIO_WRITEPROTECT not offered on this memory \
                 (needs Linux 5.7 for anonymous memory, 5.19 for shared memory)",
            ));
        }
        Ok(mem)
    }

    /// The userfaultfd (non-blocking), for polling.
    pub fn fd(&self) -> RawFd {
        self.uffd.as_raw_fd()
    }

    /// Reads pending faults into `out`; returns false when none are pending.
    pub fn read_faults(&self, out: &mut Vec<Fault>) -> io::Result<bool> {
        let mut buf = [0u8; 32 * 16];
        // SAFETY: reads into a local buffer of the given length.
        let n = unsafe { libc::read(self.uffd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(false)
            } else {
                Err(e)
            };
        }
        let n = usize::try_from(n).unwrap_or(0);
        for m in buf[..n].chunks_exact(32) {
            if m[0] != EVENT_PAGEFAULT {
                continue;
            }
            let mut f = [0u8; 8];
            f.copy_from_slice(&m[8..16]);
            let flags = u64::from_ne_bytes(f);
            f.copy_from_slice(&m[16..24]);
            let addr = u64::from_ne_bytes(f);
            if addr < self.base || addr >= self.base + self.len {
                continue;
            }
            out.push(Fault {
                page: (addr - self.base) / self.page_size as u64,
                write: flags & (PAGEFAULT_FLAG_WRITE | PAGEFAULT_FLAG_WP) != 0,
            });
        }
        Ok(n > 0)
    }

    /// Wakes the threads of every page installed or unprotected since the last call. The
    /// engine calls it after it has sent what the installs produced (the VLD_PAGEs), so a
    /// thread resumes only once its fault's messages are out.
    pub fn flush_wakes(&mut self) -> io::Result<()> {
        let mut r = Ok(());
        for page in std::mem::take(&mut self.wakes) {
            if let Err(e) = self.wake(page) {
                r = Err(e);
            }
        }
        r
    }

    fn addr(&self, page: u64) -> u64 {
        self.base + page * self.page_size as u64
    }

    fn range(&self, page: u64) -> UffdioRange {
        UffdioRange {
            start: self.addr(page),
            len: self.page_size as u64,
        }
    }

    fn drop_range(&self, start: u64, len: u64) -> io::Result<()> {
        let advice = match self.backing {
            Backing::Anonymous => libc::MADV_DONTNEED,
            Backing::Shared => libc::MADV_REMOVE,
        };
        let len = usize::try_from(len).map_err(io::Error::other)?;
        // SAFETY: the range lies inside the registered region; dropping pages is what the
        // protocol asks for (their contents are owned elsewhere or never needed again).
        if unsafe { libc::madvise(start as *mut libc::c_void, len, advice) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn writeprotect(&mut self, page: u64, mode: u64) -> io::Result<()> {
        let mut wp = UffdioWriteprotect {
            range: self.range(page),
            mode,
        };
        loop {
            match ioctl(self.uffd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp) {
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

impl PageOps for UffdMem {
    fn install(&mut self, page: u64, data: &[u8], write_protect: bool) -> io::Result<()> {
        if data.len() != self.page_size {
            return Err(io::Error::other("page data of the wrong size"));
        }
        let mut c = UffdioCopy {
            dst: self.addr(page),
            src: data.as_ptr() as u64,
            len: self.page_size as u64,
            mode: COPY_MODE_DONTWAKE | if write_protect { COPY_MODE_WP } else { 0 },
            copy: 0,
        };
        loop {
            match ioctl(self.uffd.as_raw_fd(), UFFDIO_COPY, &mut c) {
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    c.copy = 0;
                }
                r => {
                    self.wakes.push(page);
                    return r;
                }
            }
        }
    }

    fn protect(&mut self, page: u64) -> io::Result<()> {
        self.writeprotect(page, WRITEPROTECT_MODE_WP)
    }

    fn unprotect(&mut self, page: u64) -> io::Result<()> {
        self.wakes.push(page);
        self.writeprotect(page, WRITEPROTECT_MODE_DONTWAKE)
    }

    fn drop_page(&mut self, page: u64) -> io::Result<()> {
        self.drop_range(self.addr(page), self.page_size as u64)
    }

    fn read(&mut self, page: u64, out: &mut [u8]) {
        let n = out.len().min(self.page_size);
        // SAFETY: the engine reads only pages it holds mapped and write-protected, so the
        // source is present (no userfault on this thread) and not being written.
        unsafe { std::ptr::copy_nonoverlapping(self.addr(page) as *const u8, out.as_mut_ptr(), n) };
    }

    fn wake(&mut self, page: u64) -> io::Result<()> {
        let mut r = self.range(page);
        ioctl(self.uffd.as_raw_fd(), UFFDIO_WAKE, &mut r)
    }
}
