//! The block layer under a datastore: a plain file or a block device ([`FileDev`], with
//! open-file-description locks for exclusive opens), memory ([`MemDev`]) and a recorder that
//! keeps every write and flush in order so tests can cut the stream anywhere ([`Recorder`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Lock modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// Many holders.
    Shared,
    /// One holder.
    Exclusive,
}

/// A device holding a datastore.
pub trait Dev: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `off`.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Writes all of `buf` at `off`.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Makes every write so far durable.
    fn flush(&self) -> io::Result<()>;
    /// Size in bytes.
    fn len(&self) -> u64;
    /// Whether the device has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Zeroes `len` bytes at `off`.
    fn zero(&self, off: u64, len: u64) -> io::Result<()> {
        write_zeros(self, off, len)
    }
    /// Takes a lock on byte `at` (non-blocking unless `wait`); Ok(false) when another holder
    /// has it. Devices without locks (memory) always succeed.
    fn lock(&self, _at: u64, _kind: LockKind, _wait: bool) -> io::Result<bool> {
        Ok(true)
    }
    /// Releases a lock on byte `at`.
    fn unlock(&self, _at: u64) -> io::Result<()> {
        Ok(())
    }
    /// Whether anyone (this handle excluded) holds a lock on byte `at`.
    fn locked_by_other(&self, _at: u64) -> io::Result<bool> {
        Ok(false)
    }
    /// Another handle on the same device, with locks of its own.
    fn reopen(&self) -> io::Result<Arc<dyn Dev>>;
}

/// Zeroes `len` bytes at `off` by writing zeros, 1 MiB at a time.
fn write_zeros<D: Dev + ?Sized>(dev: &D, off: u64, len: u64) -> io::Result<()> {
    let chunk = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(chunk.len() as u64) as usize;
        dev.write_at(&chunk[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}

/// A datastore in a plain file or on a block device.
pub struct FileDev {
    file: File,
    path: PathBuf,
    len: u64,
    writable: bool,
}

impl FileDev {
    /// Opens `path` (read-write unless `read_only`).
    /// A jailed process takes one of the opens it was handed (crates/fds: each open is an
    /// open file description of its own, as the datastore's locks need).
    pub fn open(path: &Path, read_only: bool) -> io::Result<FileDev> {
        let file = match wv_fds::take_path(path) {
            Some(f) => f,
            None => OpenOptions::new()
                .read(true)
                .write(!read_only)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)?,
        };
        let meta = file.metadata()?;
        let len = if meta.file_type().is_block_device() {
            let mut n: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
            if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut n) } != 0 {
                return Err(io::Error::last_os_error());
            }
            n
        } else {
            meta.len()
        };
        Ok(FileDev {
            file,
            path: path.to_path_buf(),
            len,
            writable: !read_only,
        })
    }

    fn ofd(&self, cmd: libc::c_int, typ: libc::c_int, at: u64) -> io::Result<libc::flock> {
        // SAFETY: flock is plain data; zero is a valid value for every field.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = typ as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = at as libc::off_t;
        fl.l_len = 1;
        // SAFETY: an fcntl lock command on our own descriptor with a valid flock.
        if unsafe { libc::fcntl(self.file.as_raw_fd(), cmd, &mut fl) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fl)
    }
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

impl Dev for FileDev {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn len(&self) -> u64 {
        self.len
    }
    fn zero(&self, off: u64, len: u64) -> io::Result<()> {
        // Zeroing by the file system or device (unwritten extents, WRITE ZEROES), else by
        // writing zeros.
        // SAFETY: fallocate on our own descriptor; the range is within the device.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        write_zeros(self, off, len)
    }
    fn lock(&self, at: u64, kind: LockKind, wait: bool) -> io::Result<bool> {
        let typ = match kind {
            LockKind::Shared => libc::F_RDLCK,
            LockKind::Exclusive if !self.writable => libc::F_RDLCK,
            LockKind::Exclusive => libc::F_WRLCK,
        };
        let cmd = if wait {
            libc::F_OFD_SETLKW
        } else {
            libc::F_OFD_SETLK
        };
        match self.ofd(cmd, typ, at) {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => Ok(false),
            Err(e) => Err(e),
        }
    }
    fn unlock(&self, at: u64) -> io::Result<()> {
        self.ofd(libc::F_OFD_SETLK, libc::F_UNLCK, at).map(|_| ())
    }
    fn locked_by_other(&self, at: u64) -> io::Result<bool> {
        let fl = self.ofd(libc::F_OFD_GETLK, libc::F_WRLCK, at)?;
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }
    fn reopen(&self) -> io::Result<Arc<dyn Dev>> {
        Ok(Arc::new(FileDev::open(&self.path, !self.writable)?))
    }
}

/// A datastore in memory (tests, and the crash images of a [`Recorder`]).
#[derive(Clone)]
pub struct MemDev {
    data: Arc<Mutex<Vec<u8>>>,
}

impl MemDev {
    /// A zeroed device of `len` bytes.
    pub fn new(len: usize) -> MemDev {
        MemDev::from_bytes(vec![0; len])
    }
    /// A device holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> MemDev {
        MemDev {
            data: Arc::new(Mutex::new(bytes)),
        }
    }
    /// A copy of the contents.
    pub fn bytes(&self) -> Vec<u8> {
        self.data.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn range(len: usize, off: u64, n: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(off).unwrap_or(usize::MAX);
    match start.checked_add(n) {
        Some(end) if end <= len => Ok(start..end),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{n} bytes at {off} are beyond the device's {len}"),
        )),
    }
}

impl Dev for MemDev {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        buf.copy_from_slice(&d[range(d.len(), off, buf.len())?]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let r = range(d.len(), off, buf.len())?;
        d[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> u64 {
        self.data.lock().unwrap_or_else(|p| p.into_inner()).len() as u64
    }
    fn reopen(&self) -> io::Result<Arc<dyn Dev>> {
        Ok(Arc::new(self.clone()))
    }
}

/// One event in a [`Recorder`]'s log.
#[derive(Clone, Debug)]
pub enum Event {
    /// A write: offset and bytes.
    Write(u64, Vec<u8>),
    /// A flush: every write before it is durable.
    Flush,
}

/// A device that performs every operation on an inner [`MemDev`] and logs writes and flushes,
/// so a test can rebuild the device as a crash would have left it after any prefix of the
/// stream.
#[derive(Clone)]
pub struct Recorder {
    inner: MemDev,
    log: Arc<Mutex<Vec<Event>>>,
}

impl Recorder {
    /// Records on top of `inner`.
    pub fn new(inner: MemDev) -> Recorder {
        Recorder {
            inner,
            log: Arc::default(),
        }
    }
    /// The events so far.
    pub fn events(&self) -> Vec<Event> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// Number of events so far.
    pub fn position(&self) -> usize {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Dev for Recorder {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.inner.write_at(buf, off)?;
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Event::Write(off, buf.to_vec()));
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Event::Flush);
        Ok(())
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn reopen(&self) -> io::Result<Arc<dyn Dev>> {
        Ok(Arc::new(self.clone()))
    }
}
