//! virtio-blk (device type 2): requests parsed and validated from descriptor chains, served
//! from a [`Disk`] on the device's worker thread.
//!
//! A request is: a device-readable 16-byte header (type, reserved, sector), data, and a
//! device-writable status byte at the very end. The chain is read from guest memory once
//! ([`crate::chain::Chain`]) and everything after is decided and served from that copy, so a
//! guest rewriting its descriptors meanwhile cannot change what was validated. Every rule is
//! checked before the disk is touched: all buffers inside guest RAM, readable buffers before
//! writable ones, header and status present, data a multiple of 512 bytes and inside the disk,
//! at most SEG_MAX data buffers plus header and status. A chain too broken to carry a status
//! (or that points outside RAM) is completed with length 0 and counted; any other bad request
//! gets an error status. Backends check again that a request lies inside the disk, and never
//! use a buffer larger than the request or [`CHUNK`].
#![allow(clippy::cast_possible_truncation)] // lengths are bounded by the chain (u32) first

use crate::chain::Chain;
use crate::device::{ActiveQueue, DeviceState, Interrupt, VirtioDevice, Worker, WorkerCtl};
use crate::GuestMemoryMmap;
use crate::F_VERSION_1;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Sector size.
pub const SECTOR: u64 = 512;
/// Request types.
pub mod req {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Device ID (20 bytes).
    pub const GET_ID: u32 = 8;
    /// Discard.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}
/// Status: success.
pub const S_OK: u8 = 0;
/// Status: I/O error (including refused writes to a read-only disk and out-of-range sectors).
pub const S_IOERR: u8 = 1;
/// Status: unsupported request type.
pub const S_UNSUPP: u8 = 2;

/// VIRTIO_BLK_F_SEG_MAX.
pub const F_SEG_MAX: u64 = 1 << 2;
/// VIRTIO_BLK_F_RO.
pub const F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_BLK_SIZE.
pub const F_BLK_SIZE: u64 = 1 << 6;
/// VIRTIO_BLK_F_FLUSH.
pub const F_FLUSH: u64 = 1 << 9;
/// VIRTIO_BLK_F_DISCARD.
pub const F_DISCARD: u64 = 1 << 13;
/// VIRTIO_BLK_F_WRITE_ZEROES.
pub const F_WRITE_ZEROES: u64 = 1 << 14;
/// Size of the configuration space we serve.
pub const CONFIG_SIZE: usize = 60;
/// Longest run of data buffers per request we advertise (SEG_MAX).
const SEG_MAX: u32 = 126;
/// Discard / write-zeroes segments per request we advertise.
const MAX_DISCARD_SEG: u32 = 1;
const MAX_DISCARD_SECTORS: u32 = u32::MAX / 512;
/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes moved per read/write system call, and the largest buffer a request gets.
pub const CHUNK: usize = 1 << 20;

/// What a block device is backed by.
pub trait Disk: Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn readonly(&self) -> bool;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    /// Makes written data durable.
    fn flush(&mut self) -> std::io::Result<()>;
    /// Deallocates a range (reads return zeroes afterwards).
    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()>;
    /// Zeroes a range.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()>;

    /// Reads into guest memory: `segs` are (guest address, length) pieces filled in order from
    /// `offset`. The default goes through a buffer of at most [`CHUNK`] bytes; backends with
    /// a file descriptor read straight into guest memory.
    fn read_into(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &[(u64, usize)],
        offset: u64,
    ) -> std::io::Result<()> {
        let size = self.size();
        bounce_read(mem, segs, offset, size, &mut Vec::new(), |buf, o| {
            self.read_at(buf, o)
        })
    }

    /// Writes from guest memory pieces `segs`, in order, at `offset` (through a buffer of at
    /// most [`CHUNK`] bytes by default).
    fn write_from(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &[(u64, usize)],
        offset: u64,
    ) -> std::io::Result<()> {
        let size = self.size();
        bounce_write(mem, segs, offset, size, &mut Vec::new(), |buf, o| {
            self.write_at(buf, o)
        })
    }
}

/// Checks that `segs` placed at `offset` end inside a disk of `size` bytes, and returns their
/// total: no backend touches a byte, or sizes a buffer, beyond what the request validated.
pub fn check_span(segs: &[(u64, usize)], offset: u64, size: u64) -> std::io::Result<u64> {
    let total = segs
        .iter()
        .try_fold(0u64, |t, &(_, len)| t.checked_add(len as u64));
    match total {
        Some(t) if offset.checked_add(t).is_some_and(|end| end <= size) => Ok(t),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "request outside the disk",
        )),
    }
}

/// Splits `segs` into pieces of at most [`CHUNK`] bytes, each with its disk offset.
fn chunks(segs: &[(u64, usize)], mut offset: u64) -> impl Iterator<Item = (u64, usize, u64)> + '_ {
    segs.iter().flat_map(move |&(addr, len)| {
        let start = offset;
        offset += len as u64;
        // An address that saturates lies outside guest memory, so the copy fails.
        (0..len).step_by(CHUNK).map(move |done| {
            let at = addr.saturating_add(done as u64);
            (at, (len - done).min(CHUNK), start + done as u64)
        })
    })
}

/// Reads pieces `segs` of guest memory from a disk of `size` bytes at `offset` through `buf`
/// (grown to at most [`CHUNK`] bytes, or the request if smaller) with `read_at`.
pub fn bounce_read(
    mem: &GuestMemoryMmap,
    segs: &[(u64, usize)],
    offset: u64,
    size: u64,
    buf: &mut Vec<u8>,
    mut read_at: impl FnMut(&mut [u8], u64) -> std::io::Result<()>,
) -> std::io::Result<()> {
    grow_bounce(buf, check_span(segs, offset, size)?);
    for (addr, len, at) in chunks(segs, offset) {
        read_at(&mut buf[..len], at)?;
        mem.write_slice(&buf[..len], GuestAddress(addr))
            .map_err(std::io::Error::other)?;
    }
    Ok(())
}

/// Grows a bounce buffer to what a request of `total` bytes moves at once: at most [`CHUNK`].
fn grow_bounce(buf: &mut Vec<u8>, total: u64) {
    let need = total.min(CHUNK as u64) as usize;
    if buf.len() < need {
        buf.resize(need, 0);
    }
}

/// Writes pieces `segs` of guest memory into a disk of `size` bytes at `offset` through `buf`
/// (grown to at most [`CHUNK`] bytes, or the request if smaller) with `write_at`.
pub fn bounce_write(
    mem: &GuestMemoryMmap,
    segs: &[(u64, usize)],
    offset: u64,
    size: u64,
    buf: &mut Vec<u8>,
    mut write_at: impl FnMut(&[u8], u64) -> std::io::Result<()>,
) -> std::io::Result<()> {
    grow_bounce(buf, check_span(segs, offset, size)?);
    for (addr, len, at) in chunks(segs, offset) {
        mem.read_slice(&mut buf[..len], GuestAddress(addr))
            .map_err(std::io::Error::other)?;
        write_at(&buf[..len], at)?;
    }
    Ok(())
}

/// A disk in memory (tests, fuzzing, benchmarks of the request path).
pub struct MemDisk {
    /// Contents.
    pub data: Vec<u8>,
    /// Whether writes are refused.
    pub ro: bool,
    /// Whether flush was called.
    pub flushed: bool,
}

impl Disk for MemDisk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn readonly(&self) -> bool {
        self.ro
    }
    fn read_at(&mut self, buf: &mut [u8], o: u64) -> std::io::Result<()> {
        let src = self
            .data
            .get(o as usize..o as usize + buf.len())
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], o: u64) -> std::io::Result<()> {
        let dst = self
            .data
            .get_mut(o as usize..o as usize + buf.len())
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        dst.copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.flushed = true;
        Ok(())
    }
    fn discard(&mut self, o: u64, l: u64) -> std::io::Result<()> {
        self.write_zeroes(o, l)
    }
    fn write_zeroes(&mut self, o: u64, l: u64) -> std::io::Result<()> {
        self.data
            .get_mut(o as usize..(o + l) as usize)
            .ok_or(std::io::ErrorKind::UnexpectedEof)?
            .fill(0);
        Ok(())
    }
}

/// A raw image file or block device, locked against a second writer.
pub struct RawDisk {
    file: File,
    size: u64,
    readonly: bool,
}

/// Why a disk could not be opened.
#[derive(Debug)]
pub enum DiskError {
    /// Opening failed.
    Open(PathBuf, std::io::Error),
    /// Another user holds the lock.
    Locked(PathBuf, bool),
}

impl std::fmt::Display for DiskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DiskError::Open(p, e) => write!(f, "cannot open disk {}: {e}", p.display()),
            DiskError::Locked(p, true) => {
                write!(f, "disk {} is open for writing by another user (VM or process); it can only be shared read-only", p.display())
            }
            DiskError::Locked(p, false) => {
                write!(
                    f,
                    "disk {} is in use by another user, so it cannot be opened for writing",
                    p.display()
                )
            }
        }
    }
}

impl RawDisk {
    /// Opens `path` read-write (exclusive lock) or read-only (shared lock).
    pub fn open(path: &Path, readonly: bool) -> Result<RawDisk, DiskError> {
        // A jailed VMM was handed it open (crates/fds), read-write unless read-only.
        let file = match wv_fds::take_path(path) {
            Some(f) => f,
            None => std::fs::OpenOptions::new()
                .read(true)
                .write(!readonly)
                .open(path)
                .map_err(|e| DiskError::Open(path.to_path_buf(), e))?,
        };
        let op = if readonly {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own; the lock lives as long as the file.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(if e.kind() == std::io::ErrorKind::WouldBlock {
                DiskError::Locked(path.to_path_buf(), readonly)
            } else {
                DiskError::Open(path.to_path_buf(), e)
            });
        }
        let size = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0))
            .map_err(|e| DiskError::Open(path.to_path_buf(), e))?;
        Ok(RawDisk {
            file,
            size,
            readonly,
        })
    }
}

impl RawDisk {
    /// A raw image the caller has opened (read-write unless `readonly`) and locked as
    /// [`RawDisk::open`] would (`flock`, exclusive for writing): a migration's target hands
    /// the image it has just copied to the VM without releasing its lock.
    pub fn from_locked(file: File, readonly: bool) -> std::io::Result<RawDisk> {
        let size = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0))?;
        Ok(RawDisk {
            file,
            size,
            readonly,
        })
    }
}

impl Disk for RawDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn readonly(&self) -> bool {
        self.readonly
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }
    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
        .or_else(|_| self.write_zeroes_slow(offset, len))
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
        .or_else(|_| self.write_zeroes_slow(offset, len))
    }
    fn read_into(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &[(u64, usize)],
        offset: u64,
    ) -> std::io::Result<()> {
        self.direct(mem, segs, offset, false)
    }
    fn write_from(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &[(u64, usize)],
        offset: u64,
    ) -> std::io::Result<()> {
        self.direct(mem, segs, offset, true)
    }
}

impl RawDisk {
    /// pread/pwrite straight between the file and guest memory (one copy, by the kernel).
    fn direct(
        &self,
        mem: &GuestMemoryMmap,
        segs: &[(u64, usize)],
        mut offset: u64,
        write: bool,
    ) -> std::io::Result<()> {
        check_span(segs, offset, self.size)?;
        let fd = self.file.as_raw_fd();
        for &(addr, len) in segs {
            for slice in mem.get_slices(GuestAddress(addr), len) {
                let slice = slice.map_err(std::io::Error::other)?;
                let guard = slice.ptr_guard_mut();
                let mut done = 0usize;
                while done < slice.len() {
                    let off = i64::try_from(offset + done as u64)
                        .map_err(|_| std::io::ErrorKind::InvalidInput)?;
                    // SAFETY: the pointer and length come from a VolatileSlice of guest memory
                    // that stays mapped while `mem` is borrowed; the kernel copies into or out
                    // of it, which is what volatile guest memory permits.
                    let n = unsafe {
                        let p = guard.as_ptr().add(done) as *mut libc::c_void;
                        if write {
                            libc::pwrite(fd, p, slice.len() - done, off)
                        } else {
                            libc::pread(fd, p, slice.len() - done, off)
                        }
                    };
                    if n < 0 {
                        let e = std::io::Error::last_os_error();
                        if e.kind() == std::io::ErrorKind::Interrupted {
                            continue;
                        }
                        return Err(e);
                    }
                    if n == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    done += n as usize;
                }
                if !write {
                    // The kernel wrote guest memory behind vm-memory's back: mark the pages
                    // dirty (after the write, so a migration round that clears the bitmap
                    // meanwhile sends them again).
                    slice.bitmap().mark_dirty(0, slice.len());
                }
                offset += slice.len() as u64;
            }
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
        let (o, l) = (i64::try_from(offset), i64::try_from(len));
        let (Ok(o), Ok(l)) = (o, l) else {
            return Err(std::io::ErrorKind::InvalidInput.into());
        };
        // SAFETY: fallocate on our descriptor with checked arguments.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, o, l) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
    fn write_zeroes_slow(&mut self, mut offset: u64, mut len: u64) -> std::io::Result<()> {
        let zeroes = vec![0u8; CHUNK];
        while len > 0 {
            let n = len.min(CHUNK as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset)?;
            offset += n as u64;
            len -= n as u64;
        }
        Ok(())
    }
}

/// Counters a device keeps about what it served and what it refused.
#[derive(Default, Debug)]
pub struct BlockCounters {
    /// Chains completed without a status (broken beyond answering).
    pub dropped: AtomicU64,
    /// Requests answered with an error status.
    pub errors: AtomicU64,
    /// Requests served (reads, writes and the others: flush, GET_ID, discard, write-zeroes).
    pub served: AtomicU64,
    /// Reads served (`IN` requests that succeeded).
    pub reads: AtomicU64,
    /// Their bytes, read from the disk into guest memory.
    pub read_bytes: AtomicU64,
    /// Writes served (`OUT` requests that succeeded).
    pub writes: AtomicU64,
    /// Their bytes, written from guest memory to the disk.
    pub write_bytes: AtomicU64,
}

/// What a served request moved, for [`BlockCounters`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Moved {
    Read(u64),
    Write(u64),
    Other,
}

/// Most descriptors a request may have: the data buffers we advertise (SEG_MAX) plus a
/// header and a status buffer of their own.
pub const MAX_REQUEST_DESCS: usize = SEG_MAX as usize + 2;

/// Serves one descriptor chain; returns the number of bytes written into guest buffers
/// (for the used ring). The chain is read from guest memory once ([`Chain::read`]) and the
/// request is served from that copy only ([`process_chain`]).
pub fn process<M>(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<M>,
    disk: &mut dyn Disk,
    id: &[u8; 20],
    counters: &BlockCounters,
) -> u32
where
    M: std::ops::Deref<Target = GuestMemoryMmap>,
{
    match Chain::read(mem, chain, MAX_REQUEST_DESCS) {
        Ok(c) => process_chain(mem, &c, disk, id, counters),
        Err(_) => {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            0
        }
    }
}

/// Serves a request from a chain already read and validated; nothing here reads the
/// descriptor table again, so a guest rewriting it meanwhile changes nothing. Returns the
/// number of bytes written into guest buffers.
pub fn process_chain(
    mem: &GuestMemoryMmap,
    c: &Chain,
    disk: &mut dyn Disk,
    id: &[u8; 20],
    counters: &BlockCounters,
) -> u32 {
    // The status byte is the last writable byte; what is writable before it is data.
    let Some(data_in) = c.writable_bytes().checked_sub(1) else {
        counters.dropped.fetch_add(1, Ordering::Relaxed);
        return 0;
    };
    let (status, data_written, moved) = serve(mem, c, disk, id, data_in);
    if status == S_OK {
        counters.served.fetch_add(1, Ordering::Relaxed);
        match moved {
            Moved::Read(n) => {
                counters.reads.fetch_add(1, Ordering::Relaxed);
                counters.read_bytes.fetch_add(n, Ordering::Relaxed);
            }
            Moved::Write(n) => {
                counters.writes.fetch_add(1, Ordering::Relaxed);
                counters.write_bytes.fetch_add(n, Ordering::Relaxed);
            }
            Moved::Other => {}
        }
    } else {
        counters.errors.fetch_add(1, Ordering::Relaxed);
    }
    if c.write_at(mem, u64::from(data_in), &[status]).is_err() {
        counters.dropped.fetch_add(1, Ordering::Relaxed);
        return 0;
    }
    // data_written <= data_in < u32::MAX (the chain's totals fit a u32).
    data_written + 1
}

fn in_range(disk: &dyn Disk, sector: u64, bytes: u64) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR)?;
    let end = offset.checked_add(bytes)?;
    (end <= disk.size()).then_some(offset)
}

/// Serves the request of `c`, whose writable part holds `data_in` bytes before the status;
/// returns the status, how many data bytes were written into the guest and what the request
/// moved (when it succeeded).
fn serve(
    mem: &GuestMemoryMmap,
    c: &Chain,
    disk: &mut dyn Disk,
    id: &[u8; 20],
    data_in: u32,
) -> (u8, u32, Moved) {
    // The header is copied once: the guest may change it after this.
    let mut hdr = [0u8; 16];
    if c.read_at(mem, 0, &mut hdr).is_err() {
        return (S_IOERR, 0, Moved::Other);
    }
    let ty = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
    // What is readable after the header (a write's data, discard segments).
    let data_out = c.readable_bytes() - 16;
    match ty {
        req::IN => {
            let len = u64::from(data_in);
            if !len.is_multiple_of(SECTOR) {
                return (S_IOERR, 0, Moved::Other);
            }
            let Some(offset) = in_range(disk, sector, len) else {
                return (S_IOERR, 0, Moved::Other);
            };
            let Ok(segs) = c.pieces(true, 0, len) else {
                return (S_IOERR, 0, Moved::Other);
            };
            match disk.read_into(mem, &segs, offset) {
                Ok(()) => (S_OK, data_in, Moved::Read(len)),
                Err(_) => (S_IOERR, 0, Moved::Other),
            }
        }
        req::OUT => {
            let len = u64::from(data_out);
            if disk.readonly() || !len.is_multiple_of(SECTOR) {
                return (S_IOERR, 0, Moved::Other);
            }
            let Some(offset) = in_range(disk, sector, len) else {
                return (S_IOERR, 0, Moved::Other);
            };
            let Ok(segs) = c.pieces(false, 16, len) else {
                return (S_IOERR, 0, Moved::Other);
            };
            match disk.write_from(mem, &segs, offset) {
                Ok(()) => (S_OK, 0, Moved::Write(len)),
                Err(_) => (S_IOERR, 0, Moved::Other),
            }
        }
        req::FLUSH => (
            if disk.flush().is_ok() { S_OK } else { S_IOERR },
            0,
            Moved::Other,
        ),
        req::GET_ID => {
            let n = (data_in as usize).min(id.len());
            if c.write_at(mem, 0, &id[..n]).is_err() {
                return (S_IOERR, 0, Moved::Other);
            }
            (S_OK, n as u32, Moved::Other)
        }
        req::DISCARD | req::WRITE_ZEROES => {
            if disk.readonly() {
                return (S_IOERR, 0, Moved::Other);
            }
            let segs = data_out / 16;
            if segs == 0 || segs > MAX_DISCARD_SEG || !data_out.is_multiple_of(16) {
                return (S_IOERR, 0, Moved::Other);
            }
            let mut seg = [0u8; 16];
            if c.read_at(mem, 16, &mut seg).is_err() {
                return (S_IOERR, 0, Moved::Other);
            }
            let start = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
            let count = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
            let bytes = u64::from(count) * SECTOR;
            // Reserved flag bits must be zero; unmap is only meaningful for write-zeroes.
            if flags & !1 != 0 || (ty == req::DISCARD && flags != 0) || count > MAX_DISCARD_SECTORS
            {
                return (S_UNSUPP, 0, Moved::Other);
            }
            let Some(offset) = in_range(disk, start, bytes) else {
                return (S_IOERR, 0, Moved::Other);
            };
            let r = if ty == req::DISCARD {
                disk.discard(offset, bytes)
            } else {
                disk.write_zeroes(offset, bytes)
            };
            (if r.is_ok() { S_OK } else { S_IOERR }, 0, Moved::Other)
        }
        _ => (S_UNSUPP, 0, Moved::Other),
    }
}

/// What a block device saves: the identity and geometry the driver read. The disk's contents
/// are not device state (they go with the disk); restoring checks that the disk it is restored
/// onto is the same size and mode and carries the same ID.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockState {
    /// The 20-byte device ID (GET_ID).
    pub id: Vec<u8>,
    /// Capacity in 512-byte sectors (the configuration space).
    pub capacity: u64,
    /// Read-only (VIRTIO_BLK_F_RO offered).
    pub readonly: bool,
}

/// Granularity of [`DirtyBlocks`]: 64 KiB.
pub const DIRTY_BLOCK: u64 = 64 << 10;

/// Which blocks of [`DIRTY_BLOCK`] bytes of a disk the guest changed (write, write-zeroes,
/// discard) since the last [`DirtyBlocks::take`]: a live migration copying the disk turns it on
/// ([`DirtyBlocks::start`]) and sends the blocks set each round. The device worker marks a
/// request's range after the backend did it and before the request completes (its status is
/// written), so a block read by the copy after its bit was taken holds every completed write,
/// and a write racing with the copy leaves its bit set for the next round.
pub struct DirtyBlocks {
    on: std::sync::atomic::AtomicBool,
    /// Allocated by the first [`DirtyBlocks::start`]: a VM never migrated pays nothing.
    bits: std::sync::OnceLock<Vec<AtomicU64>>,
    size: u64,
}

impl DirtyBlocks {
    /// Tracking (off) for a disk of `size` bytes.
    pub fn new(size: u64) -> DirtyBlocks {
        DirtyBlocks {
            on: std::sync::atomic::AtomicBool::new(false),
            bits: std::sync::OnceLock::new(),
            size,
        }
    }

    fn bits(&self) -> &[AtomicU64] {
        self.bits.get().map_or(&[], Vec::as_slice)
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of blocks (the last one may be short).
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(DIRTY_BLOCK)
    }

    /// Clears every bit and turns tracking on.
    pub fn start(&self) {
        let words = usize::try_from(self.blocks().div_ceil(64)).unwrap_or(0);
        let bits = self
            .bits
            .get_or_init(|| (0..words).map(|_| AtomicU64::new(0)).collect());
        for w in bits {
            w.store(0, Ordering::Relaxed);
        }
        self.on.store(true, Ordering::SeqCst);
    }

    /// Turns tracking off.
    pub fn stop(&self) {
        self.on.store(false, Ordering::SeqCst);
    }

    /// Whether tracking is on.
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }

    /// Marks the blocks `len` bytes at `offset` touch (when on; clamped to the disk).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || !self.is_on() || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        for b in offset / DIRTY_BLOCK..end.div_ceil(DIRTY_BLOCK) {
            if let Some(w) = usize::try_from(b / 64)
                .ok()
                .and_then(|i| self.bits().get(i))
            {
                w.fetch_or(1 << (b % 64), Ordering::SeqCst);
            }
        }
    }

    /// The blocks marked since the last call (a bitmap, bit i: block i), cleared as read.
    pub fn take(&self) -> Vec<u64> {
        self.bits()
            .iter()
            .map(|w| w.swap(0, Ordering::SeqCst))
            .collect()
    }
}

/// What a [`Watched`] disk reports: each access after the backend did it.
pub trait DiskWatch: Sync {
    /// A read of `len` bytes at `offset` (`ok`: it succeeded).
    fn read(&self, _offset: u64, _len: u64, _ok: bool) {}
    /// A write (`data`), discard or write-zeroes (not `data`) of `len` bytes at `offset`,
    /// reported whatever the outcome: a failed one may have changed part of the range.
    fn changed(&self, offset: u64, len: u64, data: bool, ok: bool);
    /// A flush.
    fn flushed(&self, _ok: bool) {}
}

/// Marks what the guest changes (after the backend did it, before the request completes).
impl DiskWatch for DirtyBlocks {
    fn changed(&self, offset: u64, len: u64, _data: bool, _ok: bool) {
        self.mark(offset, len);
    }
}

/// A backend whose accesses are reported to a [`DiskWatch`] (dirty-block tracking for a
/// migration, a storage service's counters).
pub struct Watched<'a> {
    /// The backend.
    pub disk: &'a mut dyn Disk,
    /// Who is told.
    pub watch: &'a dyn DiskWatch,
}

/// The bytes of `segs` (saturating: a backend refuses such a request anyway).
fn seg_total(segs: &[(u64, usize)]) -> u64 {
    segs.iter()
        .fold(0u64, |t, &(_, l)| t.saturating_add(l as u64))
}

impl Disk for Watched<'_> {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn readonly(&self) -> bool {
        self.disk.readonly()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let r = self.disk.read_at(buf, offset);
        self.watch.read(offset, buf.len() as u64, r.is_ok());
        r
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let r = self.disk.write_at(buf, offset);
        self.watch
            .changed(offset, buf.len() as u64, true, r.is_ok());
        r
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let r = self.disk.flush();
        self.watch.flushed(r.is_ok());
        r
    }
    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        let r = self.disk.discard(offset, len);
        self.watch.changed(offset, len, false, r.is_ok());
        r
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        let r = self.disk.write_zeroes(offset, len);
        self.watch.changed(offset, len, false, r.is_ok());
        r
    }
    fn read_into(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &[(u64, usize)],
        offset: u64,
    ) -> std::io::Result<()> {
        let r = self.disk.read_into(mem, segs, offset);
        self.watch.read(offset, seg_total(segs), r.is_ok());
        r
    }
    fn write_from(
        &mut self,
        mem: &GuestMemoryMmap,
        segs: &[(u64, usize)],
        offset: u64,
    ) -> std::io::Result<()> {
        let r = self.disk.write_from(mem, segs, offset);
        self.watch.changed(offset, seg_total(segs), true, r.is_ok());
        r
    }
}

/// A block device's disk as a live migration reads it while the guest runs: the backend
/// (locked by the device worker for each batch of requests it serves) and its dirty blocks.
#[derive(Clone)]
pub struct DiskAccess {
    /// The backend.
    pub disk: Arc<std::sync::Mutex<Box<dyn Disk>>>,
    /// What the guest changed since the copy last looked.
    pub dirty: Arc<DirtyBlocks>,
}

/// The block device.
pub struct Block {
    // Shared with the worker so that it survives a device reset (the worker does not).
    disk: Arc<std::sync::Mutex<Box<dyn Disk>>>,
    dirty: Arc<DirtyBlocks>,
    id: [u8; 20],
    capacity: u64,
    readonly: bool,
    counters: Arc<BlockCounters>,
    worker: Option<Worker>,
}

impl Block {
    /// A device serving `disk`, reporting `id` (up to 20 bytes) to GET_ID.
    pub fn new(disk: Box<dyn Disk>, id: &str) -> Block {
        let idb = disk_id(id);
        Block {
            capacity: disk.size() / SECTOR,
            readonly: disk.readonly(),
            dirty: Arc::new(DirtyBlocks::new(disk.size())),
            disk: Arc::new(std::sync::Mutex::new(disk)),
            id: idb,
            counters: Arc::default(),
            worker: None,
        }
    }

    /// What the device refused and served so far.
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    /// The disk and its dirty-block tracking, for a live migration that copies it.
    pub fn access(&self) -> DiskAccess {
        DiskAccess {
            disk: self.disk.clone(),
            dirty: self.dirty.clone(),
        }
    }
}

/// What GET_ID answers for a disk named `id`: its first 20 bytes, NUL-padded.
pub fn disk_id(id: &str) -> [u8; 20] {
    let mut idb = [0u8; 20];
    let n = id.len().min(20);
    idb[..n].copy_from_slice(&id.as_bytes()[..n]);
    idb
}

/// The features a disk offers: flush always; read-only, or discard and write-zeroes.
pub fn device_features(readonly: bool) -> u64 {
    let mut f = F_VERSION_1 | F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
    if readonly {
        f |= F_RO;
    } else {
        f |= F_DISCARD | F_WRITE_ZEROES;
    }
    f
}

/// The configuration space of a disk of `capacity` sectors (capacity, SEG_MAX, 512-byte
/// blocks, one queue, the discard and write-zeroes limits).
pub fn config_space(capacity: u64) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    c[0..8].copy_from_slice(&capacity.to_le_bytes());
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    c[20..24].copy_from_slice(&512u32.to_le_bytes());
    c[34..36].copy_from_slice(&1u16.to_le_bytes());
    c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
    c[44..48].copy_from_slice(&1u32.to_le_bytes());
    c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
    c[56] = 1;
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u16 {
        2
    }
    fn features(&self) -> u64 {
        device_features(self.readonly)
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::device::read_config_window(&config_space(self.capacity), offset, data);
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _features: u64,
        queues: Vec<ActiveQueue>,
        irq: Arc<dyn Interrupt>,
        ctl: Arc<WorkerCtl>,
    ) -> Result<(), String> {
        let (disk, id, counters) = (self.disk.clone(), self.id, self.counters.clone());
        let dirty = self.dirty.clone();
        let worker = Worker::start("virtio-blk", queues, ctl, move |qs, i, ctl| {
            let q = &mut qs[i];
            let mut used = false;
            let mut disk = disk.lock().unwrap_or_else(|p| p.into_inner());
            // One chain at a time: a pause asked meanwhile is honoured after this one.
            while !ctl.pausing() {
                let Some(chain) = q.pop_chain(&mem) else {
                    break;
                };
                let head = chain.head_index();
                let dropped = counters.dropped.load(Ordering::Relaxed);
                let len = if dirty.is_on() {
                    let mut t = Watched {
                        disk: disk.as_mut(),
                        watch: &*dirty,
                    };
                    process(&mem, chain, &mut t, &id, &counters)
                } else {
                    process(&mem, chain, disk.as_mut(), &id, &counters)
                };
                // A chain the device could not answer (it is used with no data).
                if counters.dropped.load(Ordering::Relaxed) != dropped {
                    q.count_bad_chain();
                }
                if q.queue.add_used(&mem, head, len).is_err() {
                    break;
                }
                used = true;
            }
            if used && q.queue.needs_notification(&mem).unwrap_or(true) {
                irq.queue(i);
            }
        })
        .map_err(|e| format!("starting the virtio-blk worker: {e}"))?;
        self.worker = Some(worker);
        Ok(())
    }
    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
    fn save_state(&self) -> DeviceState {
        DeviceState::Block(BlockState {
            id: self.id.to_vec(),
            capacity: self.capacity,
            readonly: self.readonly,
        })
    }
    fn restore_state(&mut self, state: DeviceState) -> Result<(), String> {
        check_state(state, &self.id, self.capacity, self.readonly)
    }
    fn io_counters(&self) -> Option<crate::IoCounters> {
        Some(crate::IoCounters::Disk(self.counters.clone()))
    }
}

/// Checks a saved block device state against the disk it is restored onto: the same ID,
/// size and mode.
pub(crate) fn check_state(
    state: DeviceState,
    id: &[u8],
    capacity: u64,
    readonly: bool,
) -> Result<(), String> {
    let DeviceState::Block(s) = state else {
        return Err(format!(
            "a {} state cannot be restored into a virtio-blk device",
            state.kind()
        ));
    };
    if s.id != id {
        return Err(format!(
            "virtio-blk state: saved for disk ID '{}', but this disk's ID is '{}'",
            String::from_utf8_lossy(&s.id).trim_end_matches('\0'),
            String::from_utf8_lossy(id).trim_end_matches('\0')
        ));
    }
    if s.capacity != capacity {
        return Err(format!(
            "virtio-blk state: the disk had {} sectors, this one has {capacity}",
            s.capacity
        ));
    }
    if s.readonly != readonly {
        let mode = |ro: bool| if ro { "read-only" } else { "read-write" };
        return Err(format!(
            "virtio-blk state: the disk was {}, this one is {}",
            mode(s.readonly),
            mode(readonly)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress};

    const MEM: usize = 1 << 20;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
    }

    fn disk(ro: bool) -> MemDisk {
        MemDisk {
            data: (0..8 * 512).map(|i| (i / 512) as u8 + 1).collect(),
            ro,
            flushed: false,
        }
    }

    /// Writes descriptors (addr, len, flags, next) and makes descriptor 0 available.
    fn chain(m: &GuestMemoryMmap, descs: &[(u64, u32, u16, u16)]) -> Queue {
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let at = DESC + 16 * i as u64;
            m.write_obj(addr, GuestAddress(at)).unwrap();
            m.write_obj(len, GuestAddress(at + 8)).unwrap();
            m.write_obj(flags, GuestAddress(at + 12)).unwrap();
            m.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        m.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
        m.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        queue()
    }

    /// A queue over the descriptors and rings already in memory (head 0 available).
    fn queue() -> Queue {
        let mut q = Queue::new(16).unwrap();
        q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
        q.set_ready(true);
        q
    }

    fn header(m: &GuestMemoryMmap, ty: u32, sector: u64) {
        m.write_obj(ty, GuestAddress(0x8000)).unwrap();
        m.write_obj(0u32, GuestAddress(0x8004)).unwrap();
        m.write_obj(sector, GuestAddress(0x8008)).unwrap();
    }

    const N: u16 = 1; // VIRTQ_DESC_F_NEXT
    const W: u16 = 2; // VIRTQ_DESC_F_WRITE

    fn run(m: &GuestMemoryMmap, q: &mut Queue, d: &mut MemDisk, c: &BlockCounters) -> (u32, u8) {
        let ch = q.pop_descriptor_chain(m).expect("a chain");
        m.write_obj(0xeeu8, GuestAddress(0x9000)).unwrap();
        let len = process(m, ch, d, b"disk-id-0123456789ab", c);
        (len, m.read_obj(GuestAddress(0x9000)).unwrap())
    }

    fn standard(m: &GuestMemoryMmap, data_flags: u16, data_len: u32) -> Queue {
        chain(
            m,
            &[
                (0x8000, 16, N, 1),
                (0xa000, data_len, N | data_flags, 2),
                (0x9000, 1, W, 0),
            ],
        )
    }

    #[test]
    fn read_and_write_and_flush() {
        let (m, c) = (mem(), BlockCounters::default());
        let mut d = disk(false);
        header(&m, req::IN, 2);
        let mut q = standard(&m, W, 1024);
        assert_eq!(run(&m, &mut q, &mut d, &c), (1025, S_OK));
        let mut buf = [0u8; 1024];
        m.read_slice(&mut buf, GuestAddress(0xa000)).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 3) && buf[512..].iter().all(|&b| b == 4));
        header(&m, req::OUT, 5);
        m.write_slice(&[0x77; 512], GuestAddress(0xa000)).unwrap();
        let mut q = standard(&m, 0, 512);
        assert_eq!(run(&m, &mut q, &mut d, &c), (1, S_OK));
        assert!(d.data[5 * 512..6 * 512].iter().all(|&b| b == 0x77));
        header(&m, req::FLUSH, 0);
        let mut q = chain(&m, &[(0x8000, 16, N, 1), (0x9000, 1, W, 0)]);
        assert_eq!(run(&m, &mut q, &mut d, &c), (1, S_OK));
        assert!(d.flushed);
        assert_eq!(c.served.load(Ordering::Relaxed), 3);
        // What was moved, by direction: one read of 1024 bytes, one write of 512.
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        assert_eq!((n(&c.reads), n(&c.read_bytes)), (1, 1024));
        assert_eq!((n(&c.writes), n(&c.write_bytes)), (1, 512));
        // A refused request moves nothing.
        header(&m, req::IN, 8);
        let mut q = standard(&m, W, 512);
        assert_eq!(run(&m, &mut q, &mut d, &c).1, S_IOERR);
        assert_eq!((n(&c.reads), n(&c.read_bytes)), (1, 1024));
    }

    #[test]
    fn refused_requests_get_error_statuses() {
        let (m, c) = (mem(), BlockCounters::default());
        let mut ro = disk(true);
        header(&m, req::OUT, 0);
        let mut q = standard(&m, 0, 512);
        assert_eq!(
            run(&m, &mut q, &mut ro, &c).1,
            S_IOERR,
            "write to a read-only disk"
        );
        assert!(ro.data[..512].iter().all(|&b| b == 1), "nothing written");
        let mut d = disk(false);
        for (ty, sector, len) in [
            (req::IN, 8, 512),
            (req::IN, u64::MAX / 2, 512),
            (req::OUT, 7, 1024),
            (req::IN, 0, 100),
        ] {
            header(&m, ty, sector);
            let mut q = standard(&m, if ty == req::IN { W } else { 0 }, len);
            assert_eq!(
                run(&m, &mut q, &mut d, &c).1,
                S_IOERR,
                "type {ty} sector {sector} len {len}"
            );
        }
        header(&m, 99, 0);
        let mut q = chain(&m, &[(0x8000, 16, N, 1), (0x9000, 1, W, 0)]);
        assert_eq!(run(&m, &mut q, &mut d, &c).1, S_UNSUPP);
        // A short header.
        let mut q = chain(&m, &[(0x8000, 8, N, 1), (0x9000, 1, W, 0)]);
        assert_eq!(run(&m, &mut q, &mut d, &c).1, S_IOERR);
        assert_eq!(c.errors.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn broken_chains_are_dropped_without_touching_the_disk() {
        let (m, c) = (mem(), BlockCounters::default());
        let mut d = disk(false);
        let before = d.data.clone();
        header(&m, req::OUT, 0);
        // Writable before readable.
        let mut q = chain(
            &m,
            &[
                (0x9000, 1, W | N, 1),
                (0x8000, 16, N, 2),
                (0xa000, 512, 0, 0),
            ],
        );
        assert_eq!(run(&m, &mut q, &mut d, &c), (0, 0xee));
        // A buffer outside guest RAM.
        let mut q = chain(
            &m,
            &[
                (0x8000, 16, N, 1),
                (MEM as u64 - 256, 512, N, 2),
                (0x9000, 1, W, 0),
            ],
        );
        assert_eq!(run(&m, &mut q, &mut d, &c).0, 0);
        // No status byte at all.
        let mut q = chain(&m, &[(0x8000, 16, N, 1), (0xa000, 512, 0, 0)]);
        assert_eq!(run(&m, &mut q, &mut d, &c).0, 0);
        // A loop: 0 -> 1 -> 0 ... ends at the queue size and is dropped (no writable part).
        let mut q = chain(&m, &[(0x8000, 16, N, 1), (0xa000, 512, N, 0)]);
        assert_eq!(run(&m, &mut q, &mut d, &c).0, 0);
        assert_eq!(c.dropped.load(Ordering::Relaxed), 4);
        assert_eq!(d.data, before);
    }

    #[test]
    fn get_id_discard_and_write_zeroes() {
        let (m, c) = (mem(), BlockCounters::default());
        let mut d = disk(false);
        header(&m, req::GET_ID, 0);
        let mut q = standard(&m, W, 20);
        assert_eq!(run(&m, &mut q, &mut d, &c), (21, S_OK));
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(0xa000)).unwrap();
        assert_eq!(&id, b"disk-id-0123456789ab");
        for ty in [req::DISCARD, req::WRITE_ZEROES] {
            header(&m, ty, 0);
            m.write_obj(1u64, GuestAddress(0xa000)).unwrap();
            m.write_obj(2u32, GuestAddress(0xa008)).unwrap();
            m.write_obj(0u32, GuestAddress(0xa00c)).unwrap();
            let mut q = standard(&m, 0, 16);
            assert_eq!(run(&m, &mut q, &mut d, &c).1, S_OK);
            assert!(d.data[512..1536].iter().all(|&b| b == 0));
        }
        // Two segments (we advertise one) and a range past the end are refused.
        header(&m, req::DISCARD, 0);
        let mut q = standard(&m, 0, 32);
        assert_eq!(run(&m, &mut q, &mut d, &c).1, S_IOERR);
        m.write_obj(7u64, GuestAddress(0xa000)).unwrap();
        let mut q = standard(&m, 0, 16);
        assert_eq!(run(&m, &mut q, &mut d, &c).1, S_IOERR);
    }

    #[test]
    fn raw_disk_locks_against_a_second_writer() {
        let p = std::env::temp_dir().join(format!("wv-blk-lock-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let w = RawDisk::open(&p, false).unwrap();
        assert_eq!(w.size(), 4096);
        assert!(matches!(
            RawDisk::open(&p, false),
            Err(DiskError::Locked(_, false))
        ));
        assert!(matches!(
            RawDisk::open(&p, true),
            Err(DiskError::Locked(_, true))
        ));
        drop(w);
        let r1 = RawDisk::open(&p, true).unwrap();
        let _r2 = RawDisk::open(&p, true).expect("shared read-only opens");
        assert!(r1.readonly());
        assert!(RawDisk::open(&p, false).is_err());
        std::fs::remove_file(&p).unwrap();
    }

    /// A disk that, like the VMKFS backend, moves data with the default bounce-buffer
    /// `read_into`/`write_from`, and records the largest buffer it was handed and every access
    /// reaching past its end.
    struct WatchedDisk {
        inner: MemDisk,
        largest: usize,
        outside: u64,
    }

    impl WatchedDisk {
        fn watch(&mut self, len: usize, offset: u64) {
            self.largest = self.largest.max(len);
            if offset + len as u64 > self.inner.size() {
                self.outside += 1;
            }
        }
    }

    impl Disk for WatchedDisk {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn readonly(&self) -> bool {
            false
        }
        fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.watch(buf.len(), offset);
            self.inner.read_at(buf, offset)
        }
        fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.watch(buf.len(), offset);
            self.inner.write_at(buf, offset)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn discard(&mut self, o: u64, l: u64) -> std::io::Result<()> {
            self.inner.discard(o, l)
        }
        fn write_zeroes(&mut self, o: u64, l: u64) -> std::io::Result<()> {
            self.inner.write_zeroes(o, l)
        }
    }

    const SMALL: u32 = 512;
    const HUGE: u32 = 64 << 10;

    /// Serves the standard three-descriptor request (type `ty` for round `i`) again and again
    /// while a second thread flips the data descriptor's length between SMALL and HUGE, as
    /// another vCPU of the guest can; `check` runs after every request. Goes on until at
    /// least `rounds` requests ran and both lengths were seen (some served, some refused: a
    /// 4 KiB disk takes SMALL but not HUGE), within a deadline.
    fn race(
        disk: &mut dyn Disk,
        rounds: u32,
        ty: impl Fn(u32) -> u32,
        mut check: impl FnMut(&mut dyn Disk, u32),
    ) -> BlockCounters {
        use std::sync::atomic::AtomicBool;
        use std::time::{Duration, Instant};
        let (m, c) = (mem(), BlockCounters::default());
        let _descriptors_in_memory = standard(&m, 0, SMALL);
        let stop = Arc::new(AtomicBool::new(false));
        let guard = crate::testutil::StopOnDrop(stop.clone());
        let flipper = {
            let (m, stop) = (m.clone(), stop.clone());
            std::thread::spawn(move || {
                let len_at = GuestAddress(DESC + 16 + 8);
                while !stop.load(Ordering::Relaxed) {
                    m.write_obj(HUGE, len_at).unwrap();
                    m.write_obj(SMALL, len_at).unwrap();
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut i = 0;
        while i < rounds
            || c.served.load(Ordering::Relaxed) == 0
            || c.errors.load(Ordering::Relaxed) == 0
        {
            if Instant::now() > deadline {
                panic!("the descriptor never changed under process() within 60 s: {c:?}");
            }
            let t = ty(i);
            header(&m, t, 0);
            let flags = N | if t == req::IN { W } else { 0 };
            m.write_obj(flags, GuestAddress(DESC + 16 + 12)).unwrap();
            let mut q = queue();
            let ch = q.pop_descriptor_chain(&m).expect("a chain");
            process(&m, ch, disk, b"disk-id-0123456789ab", &c);
            check(disk, i);
            i += 1;
        }
        drop(guard);
        flipper.join().unwrap();
        assert_eq!(c.dropped.load(Ordering::Relaxed), 0, "{c:?}");
        c
    }

    #[test]
    fn a_racing_guest_cannot_grow_a_raw_image() {
        let p = std::env::temp_dir().join(format!("wv-blk-race-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 8 * 512]).unwrap();
        let mut d = RawDisk::open(&p, false).unwrap();
        race(
            &mut d,
            20_000,
            |_| req::OUT,
            |_, i| {
                let len = std::fs::metadata(&p).unwrap().len();
                assert_eq!(
                    len,
                    8 * 512,
                    "the 4 KiB image grew to {len} bytes in round {i}"
                );
            },
        );
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_racing_guest_cannot_size_a_bounce_buffer_or_reach_past_the_disk() {
        let mut d = WatchedDisk {
            inner: disk(false),
            largest: 0,
            outside: 0,
        };
        let ty = |i: u32| {
            if i.is_multiple_of(2) {
                req::OUT
            } else {
                req::IN
            }
        };
        race(&mut d, 20_000, ty, |_, _| {});
        assert_eq!(d.outside, 0, "accesses past the end of the disk");
        assert!(
            d.largest <= SMALL as usize,
            "a {}-byte buffer for requests validated at {SMALL} bytes",
            d.largest
        );
    }

    #[test]
    fn default_paths_move_large_requests_in_chunks_and_refuse_spans_past_the_end() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let mut d = WatchedDisk {
            inner: MemDisk {
                data: vec![0; 4 << 20],
                ro: false,
                flushed: false,
            },
            largest: 0,
            outside: 0,
        };
        let pattern: Vec<u8> = (0..(3 << 20) + 512).map(|i: u32| (i % 251) as u8).collect();
        m.write_slice(&pattern, GuestAddress(0x1000)).unwrap();
        d.write_from(&m, &[(0x1000, 512), (0x1200, 3 << 20)], 512)
            .unwrap();
        assert_eq!(&d.inner.data[512..512 + pattern.len()], &pattern[..]);
        d.read_into(&m, &[(0x40_0000, pattern.len())], 512).unwrap();
        let mut back = vec![0u8; pattern.len()];
        m.read_slice(&mut back, GuestAddress(0x40_0000)).unwrap();
        assert!(back == pattern, "read back differs");
        assert_eq!(d.largest, CHUNK, "the largest buffer handed to the disk");
        // Past the end of the disk, or a length sum that overflows: refused before any access.
        d.largest = 0;
        assert!(d.read_into(&m, &[(0x1000, 1024)], (4 << 20) - 512).is_err());
        assert!(d
            .write_from(&m, &[(0x1000, usize::MAX), (0x1000, 2)], 0)
            .is_err());
        assert_eq!((d.largest, d.outside), (0, 0));
    }

    #[test]
    fn dirty_blocks_mark_what_the_guest_changes_only_while_on() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let size = 3 * DIRTY_BLOCK + 4096;
        let dirty = DirtyBlocks::new(size);
        assert_eq!(dirty.blocks(), 4);
        let mut disk = MemDisk {
            data: vec![0; size as usize],
            ro: false,
            flushed: false,
        };
        let mut t = Watched {
            disk: &mut disk,
            watch: &dirty,
        };
        t.write_at(&[1; 512], 0).unwrap();
        assert!(dirty.take().is_empty(), "never started: no bitmap");
        dirty.start();
        let mut t = Watched {
            disk: &mut disk,
            watch: &dirty,
        };
        // A write straddling blocks 0 and 1, write-zeroes in 2, a discard of the short tail.
        t.write_from(&m, &[(0, 512), (512, 512)], DIRTY_BLOCK - 512)
            .unwrap();
        t.write_zeroes(2 * DIRTY_BLOCK + 512, 512).unwrap();
        t.read_at(&mut [0; 512], 3 * DIRTY_BLOCK).unwrap();
        assert_eq!(dirty.take(), vec![0b0111]);
        assert_eq!(dirty.take(), vec![0], "taking clears");
        let mut t = Watched {
            disk: &mut disk,
            watch: &dirty,
        };
        t.discard(3 * DIRTY_BLOCK, 4096).unwrap();
        // A failed write (outside the disk) marks nothing outside it.
        assert!(t.write_at(&[1; 512], size).is_err());
        assert_eq!(dirty.take(), vec![0b1000]);
        dirty.stop();
        dirty.mark(0, 512);
        assert_eq!(dirty.take(), vec![0]);
    }
}
