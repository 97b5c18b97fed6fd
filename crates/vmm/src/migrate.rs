//! Live migration of a standalone VMM, pre-copy (docs/MIGRATION.md): the stream format, the
//! source's side (`PUT /vm/migrate-send` on the control socket) and the target's
//! (`wv run --incoming HOST:PORT`).
//!
//! The source turns on KVM's dirty log on every memory slot and clears the dirty bitmap that
//! vm-memory keeps for writes made by the VMM itself (device workers, the paravirtual interface,
//! the instruction emulator: KVM's log sees only the guest's own writes), sends every non-zero
//! page, then rounds of the pages dirtied meanwhile (the union of both logs) until what remains
//! fits the downtime target at the bandwidth measured so far; then it pauses the VM, sends the
//! last dirty pages and the state sections a snapshot holds, and waits for the target to say it
//! has everything and has built the VM. It answers `go`, and ends ("migrated to HOST:PORT").
//! Anything that fails before the target's acknowledgement leaves the source running as it was.
//! With `copy_disks` the writable disks travel too: declared first, every block sent once, then
//! the blocks the device workers marked dirty, in the same rounds as memory, the rest while
//! paused (before the state, so they are whole before `go` in post-copy too).
//!
//! The target reads the stream into fresh anonymous RAM, checking every record against its
//! memory, builds the VM as a restore does, acknowledges, waits for `go`, and runs it. A bad or
//! cut stream is a one-line error and nothing runs.

use crate::control::{hot_id, Answer, Controller};
use crate::snapshot::Sections;
use crate::{RestoreMemory, VmConfig, VmmError};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use wv_machine::GuestRam;
use wv_vmkfs::crc::crc32c;

/// The first bytes of a migration stream.
pub const MAGIC: [u8; 8] = *b"WVMIGR\r\n";
/// The newest stream format this wv reads; it writes version 3 only when it copies disks
/// (`copy_disks`: the disk records), 2 for a VM with disks to hand over (the disks record), 1
/// otherwise (what an older target reads).
pub const VERSION: u32 = 3;
/// Bytes of a page: the unit of every memory record.
pub const PAGE: u64 = 4096;
/// Most bytes one page record carries.
pub const MAX_RECORD: u64 = 1 << 20;
/// [`MAX_RECORD`] and [`PAGE`] as buffer sizes.
const RECORD_BUF: usize = 1 << 20;
const PAGE_BYTES: usize = 4096;
/// Largest state record accepted (the sections of a snapshot's state file).
pub const MAX_STATE: u64 = 256 << 20;

/// Record tags (u32 LE), source to target.
pub(crate) const TAG_PAGES: u32 = 1;
pub(crate) const TAG_ZERO: u32 = 2;
const TAG_STATE: u32 = 3;
pub(crate) const TAG_END: u32 = 4;
/// Post-copy: a u64 LE count and that many page addresses the source still holds (before the
/// state). After GO the source sends those pages as one-page records and an end marker; the
/// target asks for the ones it faults on (u64 LE addresses).
const TAG_POSTCOPY: u32 = 5;
/// Version 2: the VMKFS disks the source hands over (a u32 LE length, at most
/// [`MAX_DISKS_RECORD`], then [`DiskHandOver`] as JSON). The target answers `READY` with its
/// identity ([`TargetIdentity`]) after it.
const TAG_DISKS: u32 = 6;
/// Largest disks record accepted.
pub const MAX_DISKS_RECORD: u32 = 64 << 10;
/// Version 3 (`copy_disks`): a disk the source copies (a u32 LE length, at most
/// [`MAX_DISK_HEADER`], then [`CopiedDisk`] as JSON), before any of its blocks.
const TAG_DISK: u32 = 7;
/// Version 3: disk blocks: index (u32), offset (u64), length (u64: a multiple of 512, at most
/// [`MAX_RECORD`]), CRC-32C of the data (u32), data.
const TAG_DISK_DATA: u32 = 8;
/// Version 3: a zero range of a disk: index (u32), offset (u64), length (u64, a multiple of 512).
const TAG_DISK_ZERO: u32 = 9;
/// Largest disk header record accepted.
pub const MAX_DISK_HEADER: u32 = 4096;
/// Most disks a stream may copy.
pub const MAX_COPIED_DISKS: usize = 64;
/// Largest disk a stream may copy (16 TiB).
pub const MAX_COPIED_DISK_SIZE: u64 = 1 << 44;
/// Disk offsets and lengths in the stream are multiples of this.
const DISK_SECTOR: u64 = 512;
/// Largest identity message accepted from the target.
const MAX_IDENTITY: u32 = 4096;
/// Target to source: the VM is built from everything sent and waits for `go`.
pub const READY: [u8; 8] = *b"WVREADY\n";
/// Target to source: the target failed; a u32 LE length and a UTF-8 message follow.
pub const FAILED: [u8; 8] = *b"WVFAIL\r\n";
/// Source to target: the source has stopped for good; run the VM.
pub const GO: [u8; 8] = *b"WVGO\r\n\r\n";

/// Default downtime target.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// Most pre-copy rounds after the first pass.
pub const MAX_ROUNDS: u32 = 30;
/// How long either side waits for the other to send or take bytes.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The body of `PUT /vm/migrate-send`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SendRequest {
    /// The target: `HOST:PORT` where `wv run --incoming` listens.
    destination: String,
    /// The pause the VM may see at the switch-over, in milliseconds.
    #[serde(default)]
    downtime_ms: Option<u64>,
    /// Most MiB per second the stream may use (none: as fast as the link carries).
    #[serde(default)]
    max_bandwidth_mib: Option<u64>,
    /// Force post-copy after the first pass.
    #[serde(default)]
    postcopy: Option<bool>,
    /// `"precopy"` (the default: post-copy only if pre-copy does not converge) or `"postcopy"`.
    #[serde(default)]
    mode: Option<String>,
    /// Copy the writable disks in the stream (targets without the datastore or the image).
    #[serde(default)]
    copy_disks: Option<bool>,
}

/// A disk the stream copies (its header record, tag 7): the target creates it before its
/// blocks arrive.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopiedDisk {
    /// Index in the configuration's disks.
    pub index: usize,
    /// The disk's id.
    pub id: String,
    /// A VMKFS disk (its name in the datastore) rather than a raw image (its file name).
    pub vmkfs: bool,
    /// The raw image's file name, or the VMKFS disk's name.
    pub name: String,
    /// Its size in bytes (a multiple of 512).
    pub size: u64,
}

/// Where the disk records of a stream go (the target's [`Landing`]; tests keep them in
/// memory). Called only with records [`read_stream_into`] has checked: a declared disk, the
/// range inside it, whole sectors.
pub trait DiskSink {
    /// A disk the stream copies: make it (empty: it reads as zeros).
    fn create(&mut self, d: &CopiedDisk) -> Result<(), String>;
    /// `data` at `offset` of disk `index`.
    fn write(&mut self, index: usize, offset: u64, data: &[u8]) -> Result<(), String>;
    /// `len` bytes at `offset` of disk `index` are zero now.
    fn zero(&mut self, index: usize, offset: u64, len: u64) -> Result<(), String>;
}

/// A sink that takes no disks (a stream copying one is refused).
struct NoDisks;

impl DiskSink for NoDisks {
    fn create(&mut self, d: &CopiedDisk) -> Result<(), String> {
        Err(format!(
            "the source copies disk '{}', and this target takes no copied disks",
            d.id
        ))
    }
    fn write(&mut self, _: usize, _: u64, _: &[u8]) -> Result<(), String> {
        Err("no copied disks here".into())
    }
    fn zero(&mut self, _: usize, _: u64, _: u64) -> Result<(), String> {
        Err("no copied disks here".into())
    }
}

/// The disks record: the writable VMKFS disks of the VM, which stay on their datastore (both
/// hosts open it) and are handed over at the switch-over with `token`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskHandOver {
    /// What the source writes in each disk's hand-over record; the target takes a disk over
    /// only with it.
    pub token: u64,
    /// The disks.
    pub disks: Vec<SharedDisk>,
}

/// One disk of [`DiskHandOver`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedDisk {
    /// Index in the configuration's disks.
    pub index: usize,
    /// The disk's id.
    pub id: String,
    /// The file in the datastore.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

/// Target to source, after `READY` when the stream had a disks record: who the hand-over
/// records are to name (a u32 LE length, at most 4096, then this as JSON).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetIdentity {
    host: String,
    pid: u32,
}

/// What one side of a migration failed at (one line).
#[derive(Debug)]
pub struct MigrationError(pub String);

impl std::fmt::Display for MigrationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> MigrationError + '_ {
    move |e| MigrationError(format!("{what}: {e}"))
}

/// The source's end of a stream: counts what it writes.
struct Out {
    w: BufWriter<TcpStream>,
    bytes: u64,
    pages: u64,
    zero_pages: u64,
    /// Disk bytes sent as data, and as zero records.
    disk_bytes: u64,
    disk_zero_bytes: u64,
    /// Bytes per second the stream may use, and when it started.
    limit: Option<(f64, Instant)>,
}

impl Out {
    fn put(&mut self, b: &[u8]) -> Result<(), MigrationError> {
        self.bytes += b.len() as u64;
        if let Some((rate, t0)) = self.limit {
            // Shaping, not synchronisation: hold the stream to its byte budget.
            let due = Duration::from_secs_f64(self.bytes as f64 / rate);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        self.w.write_all(b).map_err(|e| self.send_failed(&e))
    }

    /// Why sending failed: the target's own reason when it refused the stream and said so
    /// before closing (its `FAILED` message), else the error.
    fn send_failed(&self, e: &std::io::Error) -> MigrationError {
        let said = self.w.get_ref().try_clone().ok().and_then(|mut r| {
            r.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
            read_ack(&mut r).err()
        });
        match said {
            Some(m) if m.0.starts_with("the target refused") => m,
            _ => MigrationError(format!("sending to the target: {e}")),
        }
    }

    fn header(&mut self, version: u32, memory: u64) -> Result<(), MigrationError> {
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&version.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&memory.to_le_bytes());
        self.put(&h)
    }

    fn pages(&mut self, gpa: u64, data: &[u8]) -> Result<(), MigrationError> {
        let mut h = [0u8; 24];
        h[..4].copy_from_slice(&TAG_PAGES.to_le_bytes());
        h[4..12].copy_from_slice(&gpa.to_le_bytes());
        h[12..20].copy_from_slice(&(data.len() as u64).to_le_bytes());
        h[20..24].copy_from_slice(&crc32c(data).to_le_bytes());
        self.pages += data.len() as u64 / PAGE;
        self.put(&h)?;
        self.put(data)
    }

    fn zero(&mut self, gpa: u64, len: u64) -> Result<(), MigrationError> {
        let mut h = [0u8; 20];
        h[..4].copy_from_slice(&TAG_ZERO.to_le_bytes());
        h[4..12].copy_from_slice(&gpa.to_le_bytes());
        h[12..20].copy_from_slice(&len.to_le_bytes());
        self.zero_pages += len / PAGE;
        self.put(&h)
    }

    fn state(&mut self, state: &[u8]) -> Result<(), MigrationError> {
        let mut h = [0u8; 12];
        h[..4].copy_from_slice(&TAG_STATE.to_le_bytes());
        h[4..12].copy_from_slice(&(state.len() as u64).to_le_bytes());
        self.put(&h)?;
        self.put(state)
    }

    fn disks(&mut self, d: &DiskHandOver) -> Result<(), MigrationError> {
        let j = serde_json::to_vec(d).map_err(|e| MigrationError(e.to_string()))?;
        let len = u32::try_from(j.len())
            .ok()
            .filter(|&l| l <= MAX_DISKS_RECORD)
            .ok_or_else(|| MigrationError("too many disks for one disks record".into()))?;
        let mut h = TAG_DISKS.to_le_bytes().to_vec();
        h.extend_from_slice(&len.to_le_bytes());
        h.extend_from_slice(&j);
        self.put(&h)
    }

    fn disk(&mut self, d: &CopiedDisk) -> Result<(), MigrationError> {
        let j = serde_json::to_vec(d).map_err(|e| MigrationError(e.to_string()))?;
        let len = u32::try_from(j.len())
            .ok()
            .filter(|&l| l <= MAX_DISK_HEADER)
            .ok_or_else(|| MigrationError(format!("disk '{}': its header is too long", d.id)))?;
        let mut h = TAG_DISK.to_le_bytes().to_vec();
        h.extend_from_slice(&len.to_le_bytes());
        h.extend_from_slice(&j);
        self.put(&h)
    }

    fn disk_data(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), MigrationError> {
        let mut h = [0u8; 28];
        h[..4].copy_from_slice(&TAG_DISK_DATA.to_le_bytes());
        h[4..8].copy_from_slice(&index.to_le_bytes());
        h[8..16].copy_from_slice(&offset.to_le_bytes());
        h[16..24].copy_from_slice(&(data.len() as u64).to_le_bytes());
        h[24..28].copy_from_slice(&crc32c(data).to_le_bytes());
        self.disk_bytes += data.len() as u64;
        self.put(&h)?;
        self.put(data)
    }

    fn disk_zero(&mut self, index: u32, offset: u64, len: u64) -> Result<(), MigrationError> {
        let mut h = [0u8; 24];
        h[..4].copy_from_slice(&TAG_DISK_ZERO.to_le_bytes());
        h[4..8].copy_from_slice(&index.to_le_bytes());
        h[8..16].copy_from_slice(&offset.to_le_bytes());
        h[16..24].copy_from_slice(&len.to_le_bytes());
        self.disk_zero_bytes += len;
        self.put(&h)
    }

    fn end(&mut self) -> Result<(), MigrationError> {
        self.put(&TAG_END.to_le_bytes())?;
        self.flush()
    }

    fn flush(&mut self) -> Result<(), MigrationError> {
        self.w.flush().map_err(|e| self.send_failed(&e))
    }
}

/// A dirty-page bitmap per memory region (bit i: page i of the region), as KVM and
/// vm-memory's [`AtomicBitmap`] both lay it out.
type Dirty = Vec<Vec<u64>>;

fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to hands back the unaligned ends.
        unsafe { b.align_to::<u64>() }
    };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

/// Sends pages `first..first + count` of the region starting at `base`: runs of non-zero pages
/// as page records, runs of zero pages as zero records when `zeros` (a page sent before may
/// have become zero since) and not at all otherwise (the target's RAM starts zero).
fn send_range(
    out: &mut Out,
    mem: &GuestRam,
    base: u64,
    first: u64,
    count: u64,
    zeros: bool,
    buf: &mut [u8],
) -> Result<(), MigrationError> {
    let per = buf.len() as u64 / PAGE;
    let mut at = first;
    let end = first + count;
    while at < end {
        let n = (end - at).min(per);
        let gpa = base + at * PAGE;
        // n * PAGE <= buf.len().
        #[allow(clippy::cast_possible_truncation)]
        let chunk = &mut buf[..(n * PAGE) as usize];
        mem.read_slice(chunk, GuestAddress(gpa))
            .map_err(|e| MigrationError(format!("reading guest memory at {gpa:#x}: {e}")))?;
        // Runs of equal kind (zero or not) within the chunk.
        let mut i = 0u64;
        while i < n {
            // i < n <= per pages of `chunk`.
            #[allow(clippy::cast_possible_truncation)]
            let page = |k: u64| &chunk[(k * PAGE) as usize..((k + 1) * PAGE) as usize];
            let zero = is_zero(page(i));
            let mut j = i + 1;
            while j < n && is_zero(page(j)) == zero {
                j += 1;
            }
            let at_gpa = gpa + i * PAGE;
            if !zero {
                #[allow(clippy::cast_possible_truncation)]
                out.pages(at_gpa, &chunk[(i * PAGE) as usize..(j * PAGE) as usize])?;
            } else if zeros {
                out.zero(at_gpa, (j - i) * PAGE)?;
            }
            i = j;
        }
        at += n;
    }
    Ok(())
}

/// Pages of anonymous `region` the process has never touched (neither present nor swapped, by
/// /proc/self/pagemap): they read as zero, and the first pass need not even look at them. None
/// when it cannot tell (a file-backed region, whose untouched pages read from the file, or no
/// pagemap).
fn untouched(region: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> Option<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    if region.file_offset().is_some() {
        return None;
    }
    let f = std::fs::File::open("/proc/self/pagemap").ok()?;
    let pages = usize::try_from(region.len() / PAGE).ok()?;
    let first = region.as_ptr() as u64 / PAGE;
    let mut out = Vec::with_capacity(pages);
    let mut raw = vec![0u8; 8 * 4096];
    let mut at = 0usize;
    while at < pages {
        let n = (pages - at).min(4096);
        let b = &mut raw[..8 * n];
        f.read_exact_at(b, (first + at as u64) * 8).ok()?;
        for e in b.chunks_exact(8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(e);
            let v = u64::from_le_bytes(w);
            // Bit 63: present; bit 62: swapped.
            out.push(v & (3 << 62) == 0);
        }
        at += n;
    }
    Some(out)
}

/// Sends every page that is not zero (the first pass: the target's RAM starts zero).
fn send_all(out: &mut Out, mem: &GuestRam, buf: &mut [u8]) -> Result<(), MigrationError> {
    for region in mem.iter() {
        let base = region.start_addr().0;
        let pages = region.len() / PAGE;
        let Some(skip) = untouched(region) else {
            send_range(out, mem, base, 0, pages, false, buf)?;
            continue;
        };
        let mut p = 0u64;
        let idx = |k: u64| usize::try_from(k).unwrap_or(usize::MAX);
        while p < pages {
            if skip.get(idx(p)).copied().unwrap_or(false) {
                p += 1;
                continue;
            }
            let mut q = p + 1;
            while q < pages && !skip.get(idx(q)).copied().unwrap_or(false) {
                q += 1;
            }
            send_range(out, mem, base, p, q - p, false, buf)?;
            p = q;
        }
    }
    Ok(())
}

/// Sends every page set in `dirty`; returns the pages it covered.
fn send_dirty(
    out: &mut Out,
    mem: &GuestRam,
    dirty: &Dirty,
    buf: &mut [u8],
) -> Result<u64, MigrationError> {
    let mut sent = 0;
    for (region, bits) in mem.iter().zip(dirty) {
        let base = region.start_addr().0;
        let pages = region.len() / PAGE;
        let mut p = 0u64;
        while p < pages {
            let set = |k: u64| {
                let w = usize::try_from(k / 64).unwrap_or(usize::MAX);
                bits.get(w).is_some_and(|x| x & (1 << (k % 64)) != 0)
            };
            // Skip clear words quickly.
            if p.is_multiple_of(64) && !set(p) {
                let w = usize::try_from(p / 64).unwrap_or(usize::MAX);
                if bits.get(w).is_none_or(|&x| x == 0) {
                    p += 64;
                    continue;
                }
            }
            if !set(p) {
                p += 1;
                continue;
            }
            let mut q = p + 1;
            while q < pages && set(q) {
                q += 1;
            }
            send_range(out, mem, base, p, q - p, true, buf)?;
            sent += q - p;
            p = q;
        }
    }
    Ok(sent)
}

fn count(d: &Dirty) -> u64 {
    d.iter()
        .flat_map(|r| r.iter())
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

fn merge(into: &mut Dirty, from: Dirty) {
    for (a, b) in into.iter_mut().zip(from) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= y;
        }
    }
}

/// A disk the source copies: its backend and dirty blocks, and the blocks still to send.
struct Copy {
    index: u32,
    access: wv_virtio::block::DiskAccess,
    /// Dirty blocks taken from the device and not yet sent (bit i: block i).
    pending: Vec<u64>,
}

impl Copy {
    /// Moves the blocks the guest changed since the last look into `pending`.
    fn collect(&mut self) {
        let got = self.access.dirty.take();
        if self.pending.len() < got.len() {
            self.pending.resize(got.len(), 0);
        }
        for (p, g) in self.pending.iter_mut().zip(got) {
            *p |= g;
        }
    }

    fn pending_blocks(&self) -> u64 {
        self.pending.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

const DISK_BLOCK: u64 = wv_virtio::block::DIRTY_BLOCK;

/// Sends blocks `first..first + count` of disk `c` (of [`DISK_BLOCK`] bytes, the last one
/// short when the disk is): runs of blocks with data as data records, runs of zero blocks as
/// zero records. Reads under the device's lock, at most `buf.len()` bytes at a time.
fn send_disk_range(
    out: &mut Out,
    c: &Copy,
    first: u64,
    count: u64,
    buf: &mut [u8],
) -> Result<(), MigrationError> {
    let size = c.access.dirty.size();
    let per = buf.len() as u64 / DISK_BLOCK;
    let mut at = first;
    let end = (first + count).min(size.div_ceil(DISK_BLOCK));
    while at < end {
        let n = (end - at).min(per);
        let off = at * DISK_BLOCK;
        let len = (n * DISK_BLOCK).min(size - off);
        // len <= buf.len().
        #[allow(clippy::cast_possible_truncation)]
        let chunk = &mut buf[..len as usize];
        {
            let mut d = c.access.disk.lock().unwrap_or_else(|p| p.into_inner());
            d.read_at(chunk, off)
                .map_err(|e| MigrationError(format!("reading disk {} at {off}: {e}", c.index)))?;
        }
        let block = |k: u64| {
            let s = k * DISK_BLOCK;
            // Bounded by len, which fits the buffer.
            #[allow(clippy::cast_possible_truncation)]
            (s as usize..((k + 1) * DISK_BLOCK).min(len) as usize)
        };
        let mut i = 0u64;
        while i < n {
            let zero = is_zero(&chunk[block(i)]);
            let mut j = i + 1;
            while j < n && is_zero(&chunk[block(j)]) == zero {
                j += 1;
            }
            let (s, e) = (block(i).start, block(j - 1).end);
            if zero {
                out.disk_zero(c.index, off + s as u64, (e - s) as u64)?;
            } else {
                out.disk_data(c.index, off + s as u64, &chunk[s..e])?;
            }
            i = j;
        }
        at += n;
    }
    Ok(())
}

/// Sends the pending blocks of every disk (and clears them); returns how many.
fn send_disk_pending(
    out: &mut Out,
    copies: &mut [Copy],
    buf: &mut [u8],
) -> Result<u64, MigrationError> {
    let mut sent = 0;
    for c in copies.iter_mut() {
        let bits = std::mem::take(&mut c.pending);
        let blocks = c.access.dirty.blocks();
        let set = |k: u64| {
            let w = usize::try_from(k / 64).unwrap_or(usize::MAX);
            bits.get(w).is_some_and(|x| x & (1 << (k % 64)) != 0)
        };
        let mut b = 0u64;
        while b < blocks {
            if !set(b) {
                b += 1;
                continue;
            }
            let mut q = b + 1;
            while q < blocks && set(q) {
                q += 1;
            }
            send_disk_range(out, c, b, q - b, buf)?;
            sent += q - b;
            b = q;
        }
    }
    Ok(sent)
}

/// The pages dirtied since the last call (KVM's log when `kvm_log`, and the VMM's own writes),
/// both logs cleared.
fn collect(vm: &kvm_ioctls::VmFd, mem: &GuestRam, kvm_log: bool) -> Result<Dirty, MigrationError> {
    let mut all = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let mut bits = bitmap(region).get_and_reset();
        if kvm_log {
            let slot = u32::try_from(slot).unwrap_or(u32::MAX);
            let len = usize::try_from(region.len()).unwrap_or(usize::MAX);
            let k = vm
                .get_dirty_log(slot, len)
                .map_err(|e| MigrationError(format!("KVM_GET_DIRTY_LOG on slot {slot}: {e}")))?;
            bits.resize(bits.len().max(k.len()), 0);
            for (x, y) in bits.iter_mut().zip(k) {
                *x |= y;
            }
        }
        all.push(bits);
    }
    Ok(all)
}

/// vm-memory's dirty bitmap of a region (the whole of it, not a slice).
fn bitmap(r: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    let m: &vm_memory::MmapRegion<AtomicBitmap> = r;
    m.bitmap()
}

/// Clears vm-memory's dirty bitmaps.
fn reset_bitmaps(mem: &GuestRam) {
    for region in mem.iter() {
        bitmap(region).reset();
    }
}

/// Reads the target's acknowledgement: Ok on READY, the target's reason on FAILED.
fn read_ack(r: &mut impl Read) -> Result<(), MigrationError> {
    let mut tag = [0u8; 8];
    r.read_exact(&mut tag)
        .map_err(io_err("waiting for the target's acknowledgement"))?;
    if tag == READY {
        return Ok(());
    }
    if tag != FAILED {
        return Err(MigrationError(
            "the target answered something that is not a migration acknowledgement".into(),
        ));
    }
    let mut l = [0u8; 4];
    r.read_exact(&mut l)
        .map_err(io_err("reading the target's error"))?;
    let len = u32::from_le_bytes(l).min(4096);
    let mut msg = vec![0u8; len as usize];
    r.read_exact(&mut msg)
        .map_err(io_err("reading the target's error"))?;
    Err(MigrationError(format!(
        "the target refused the VM: {}",
        String::from_utf8_lossy(&msg)
    )))
}

/// Reads the target's identity (after `READY`, when the stream had a disks record).
fn read_identity(r: &mut impl Read) -> Result<TargetIdentity, MigrationError> {
    let mut l = [0u8; 4];
    r.read_exact(&mut l)
        .map_err(io_err("reading the target's identity"))?;
    let len = u32::from_le_bytes(l);
    if len > MAX_IDENTITY {
        return Err(MigrationError(format!(
            "the target's identity claims {len} bytes"
        )));
    }
    let mut b = vec![0u8; len as usize];
    r.read_exact(&mut b)
        .map_err(io_err("reading the target's identity"))?;
    serde_json::from_slice(&b)
        .map_err(|e| MigrationError(format!("the target's identity is not valid: {e}")))
}

/// What a successful send measured.
struct Sent {
    rounds: u32,
    bytes: u64,
    pages: u64,
    zero_pages: u64,
    precopy: bool,
    postcopy: bool,
    postcopy_pages: u64,
    downtime: Duration,
    last_dirty: u64,
    disks: usize,
    disk_bytes: u64,
    disk_zero_bytes: u64,
    last_dirty_blocks: u64,
}

impl Controller {
    /// `PUT /vm/migrate-send`: moves the VM to `r.destination`. On success the answer is sent and
    /// then the VM ends ("migrated to ..."); on failure it runs on (or stays paused if it was).
    /// Puts the VMM in the path of every vhost-user net on the direct path (a paused VM's
    /// backends write nothing until it resumes, which the migration does not do here); the
    /// ones it moved, to be withdrawn by [`Self::withdraw_after_migration`]. A net that
    /// cannot be interposed fails the migration before it starts, the others withdrawn.
    fn interpose_for_migration(
        &mut self,
    ) -> Result<Vec<Arc<wv_virtio::vhost_user::PathControl>>, Answer> {
        use wv_virtio::vhost_user::DataPath;
        let mut moved = Vec::new();
        if self.paused.is_some() {
            return Ok(moved);
        }
        for h in self.shared.pci_devices.handles() {
            let is_net = self
                .cfg
                .nets
                .iter()
                .any(|n| n.vhost_user.is_some() && n.name() == hot_id(&h.id));
            if !is_net {
                continue;
            }
            let pc = h
                .dev
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .path_control();
            let Some(pc) = pc else { continue };
            if pc.status().path == DataPath::Interposed {
                continue;
            }
            match pc.switch(DataPath::Interposed, None, crate::control::SWITCH_TIMEOUT) {
                Ok(st) if st.path == DataPath::Interposed => moved.push(pc),
                r => {
                    self.withdraw_after_migration(&moved);
                    let why = match r {
                        Ok(_) => "its shadow rings could not be set up".to_string(),
                        Err(e) => e,
                    };
                    return Err(Answer::error(
                        409,
                        format!(
                            "net '{}': the VMM must interpose on a vhost-user net to migrate it (its backend's writes are not dirty-logged otherwise): {why}",
                            hot_id(&h.id)
                        ),
                    ));
                }
            }
        }
        Ok(moved)
    }

    /// Puts the nets [`Self::interpose_for_migration`] moved back on the direct path.
    fn withdraw_after_migration(&self, moved: &[Arc<wv_virtio::vhost_user::PathControl>]) {
        use wv_virtio::vhost_user::DataPath;
        for pc in moved {
            if let Err(e) = pc.switch(DataPath::Direct, None, crate::control::SWITCH_TIMEOUT) {
                eprintln!("wv: after the migration: back to the direct path: {e}");
            }
        }
    }

    pub(crate) fn migrate_send(&mut self, r: &SendRequest) -> Answer {
        let addr = match r.destination.to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(a)) => a,
            Ok(None) | Err(_) => {
                return Answer::error(
                    400,
                    format!("the destination '{}' is not a HOST:PORT", r.destination),
                )
            }
        };
        let copy = r.copy_disks.unwrap_or(false);
        if let Some(d) = self.cfg.disks.iter().find(|d| d.vhost_user) {
            return Answer::error(
                422,
                format!(
                    "the VM has a vhost-user disk ('{}'): its backend's writes to guest memory \
                     are not dirty-logged yet and its disk is the backend's, so migrating it is \
                     not supported",
                    d.id
                ),
            );
        }
        if let Some(d) = self
            .cfg
            .disks
            .iter()
            .find(|d| d.vmkfs.is_none() && !d.readonly && !copy)
        {
            return Answer::error(
                422,
                format!(
                    "the VM has a writable raw disk image ('{}'): migration moves a writable disk \
                     only on a VMKFS datastore both hosts open (a raw image's lock cannot be \
                     handed over without a moment with two writers or none), or copied with \
                     \"copy_disks\": true",
                    d.id
                ),
            );
        }
        let start = Instant::now();
        let was_paused = self.paused.is_some();
        // A vhost-user net's backend writes guest memory through its own mapping, which no
        // dirty log sees: for the migration the VMM interposes on each (its shadow rings mark
        // what the backend wrote), and withdraws again if the VM stays here.
        let interposed = match self.interpose_for_migration() {
            Ok(v) => v,
            Err(a) => return a,
        };
        let res = self.send_to(addr, r);
        match res {
            Ok(s) => {
                let mut a = Answer::json(
                    200,
                    &serde_json::json!({
                        "destination": r.destination,
                        "total_ms": start.elapsed().as_secs_f64() * 1e3,
                        "downtime_ms": s.downtime.as_secs_f64() * 1e3,
                        "bytes": s.bytes,
                        "pages": s.pages,
                        "zero_pages": s.zero_pages,
                        "rounds": s.rounds,
                        "precopy": s.precopy,
                        "postcopy": s.postcopy,
                        "postcopy_pages": s.postcopy_pages,
                        "last_dirty_pages": s.last_dirty,
                        "disks_copied": s.disks,
                        "disk_bytes": s.disk_bytes,
                        "disk_zero_bytes": s.disk_zero_bytes,
                        "last_dirty_blocks": s.last_dirty_blocks,
                    }),
                );
                let (tx, rx) = std::sync::mpsc::channel();
                a.written = Some(tx);
                self.end_after_answer = Some((crate::VmEnd::Migrated(r.destination.clone()), rx));
                a
            }
            Err(e) => {
                let _ = crate::set_memory_flags(&self.vm, &self.shared.mem, 0);
                for a in self.shared.disk_access.iter().flatten() {
                    a.dirty.stop();
                }
                if !was_paused && self.paused.is_some() {
                    if let Err(a) = self.resume() {
                        return a;
                    }
                }
                // Running again: its relays take the switch back.
                self.withdraw_after_migration(&interposed);
                Answer::error(502, format!("migration to {} failed: {e}", r.destination))
            }
        }
    }

    fn send_to(
        &mut self,
        addr: std::net::SocketAddr,
        r: &SendRequest,
    ) -> Result<Sent, MigrationError> {
        let force_post = match (r.mode.as_deref(), r.postcopy) {
            (Some("postcopy"), _) | (None | Some("precopy"), Some(true)) => true,
            (None | Some("precopy"), _) => false,
            (Some(m), _) => {
                return Err(MigrationError(format!(
                    "unknown migration mode '{m}' (precopy or postcopy)"
                )))
            }
        };
        let downtime_target =
            Duration::from_millis(r.downtime_ms.unwrap_or(DEFAULT_DOWNTIME_MS).max(1));
        // A jailed VMM has no route to the target: the daemon connects and hands it the
        // connection with the request (crates/fds).
        let conn = match wv_fds::take(&crate::jail::tcp_key(&addr)) {
            Some(fd) => TcpStream::from(fd),
            None => TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .map_err(io_err("connecting to the target"))?,
        };
        let _ = conn.set_nodelay(true);
        conn.set_write_timeout(Some(IO_TIMEOUT))
            .and_then(|()| conn.set_read_timeout(Some(IO_TIMEOUT)))
            .map_err(io_err("setting up the connection"))?;
        let mut back = conn
            .try_clone()
            .map_err(io_err("setting up the connection"))?;
        let mut out = Out {
            w: BufWriter::with_capacity(1 << 20, conn),
            bytes: 0,
            pages: 0,
            zero_pages: 0,
            disk_bytes: 0,
            disk_zero_bytes: 0,
            limit: r
                .max_bandwidth_mib
                .map(|m| (m.max(1) as f64 * 1048576.0, Instant::now())),
        };
        let mem = self.shared.mem.clone();
        // Copied disks (every writable one), or the VMKFS disks handed over on a shared
        // datastore.
        let mut copies = Vec::new();
        let handover = if r.copy_disks.unwrap_or(false) {
            for (i, d) in self.cfg.disks.iter().enumerate() {
                if d.readonly {
                    continue;
                }
                let access = self
                    .shared
                    .disk_access
                    .get(i)
                    .cloned()
                    .flatten()
                    .ok_or_else(|| MigrationError(format!("disk '{}' has no device", d.id)))?;
                let name = match &d.vmkfs {
                    Some(n) => n.clone(),
                    None => wv_config::copied_file_name(&d.path)
                        .ok_or_else(|| {
                            MigrationError(format!(
                                "disk '{}': {} has no file name to copy it under",
                                d.id,
                                d.path.display()
                            ))
                        })?
                        .to_string(),
                };
                let header = CopiedDisk {
                    index: i,
                    id: d.id.clone(),
                    vmkfs: d.vmkfs.is_some(),
                    name,
                    size: access.dirty.size(),
                };
                copies.push((header, access));
            }
            None
        } else {
            self.disk_hand_over()?
        };
        let version = match (&handover, copies.is_empty()) {
            (_, false) => 3,
            (Some(_), true) => 2,
            (None, true) => 1,
        };
        out.header(version, self.shared.info.mem_size)?;
        if let Some(h) = &handover {
            out.disks(h)?;
        }
        let mut copies: Vec<Copy> = copies
            .into_iter()
            .map(|(h, access)| {
                out.disk(&h)?;
                Ok(Copy {
                    index: u32::try_from(h.index).unwrap_or(u32::MAX),
                    access,
                    pending: Vec::new(),
                })
            })
            .collect::<Result<_, MigrationError>>()?;
        // Tracking on before the first look at a block: what the guest writes from here on is
        // sent again.
        for c in &copies {
            c.access.dirty.start();
        }
        let mut buf = vec![0u8; RECORD_BUF];
        let was_paused = self.paused.is_some();
        // KVM's dirty log, where the host has one; without it (or already paused) the VM is
        // paused first and sent whole (stop and copy).
        let kvm_log = !was_paused
            && match crate::set_memory_flags(&self.vm, &mem, kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES)
            {
                Ok(()) => true,
                Err(e) => {
                    eprintln!(
                        "wv: migration: this host's KVM cannot log dirty pages \
                         (KVM_SET_USER_MEMORY_REGION with KVM_MEM_LOG_DIRTY_PAGES: {e}); the VM \
                         is paused for the whole copy"
                    );
                    false
                }
            };
        let mut rounds = 0;
        let mut pending: Dirty = Vec::new();
        let mut postcopy = false;
        if kvm_log {
            reset_bitmaps(&mem);
            // Everything once, while the guest runs: the disks, then memory.
            let t = Instant::now();
            for c in &copies {
                send_disk_range(&mut out, c, 0, c.access.dirty.blocks(), &mut buf)?;
            }
            send_all(&mut out, &mem, &mut buf)?;
            let mut round_bytes = out.bytes;
            let mut round_time = t.elapsed();
            let mut prev = u64::MAX;
            loop {
                pending = collect(&self.vm, &mem, true)?;
                for c in &mut copies {
                    c.collect();
                }
                let blocks: u64 = copies.iter().map(Copy::pending_blocks).sum();
                let left = count(&pending) * PAGE + blocks * DISK_BLOCK;
                out.flush()?;
                // Bytes per second, with the time of the round that carried them.
                let bw = round_bytes as f64 / round_time.as_secs_f64().max(1e-6);
                let eta = Duration::from_secs_f64(left as f64 / bw.max(1.0));
                // Done when the rest fits the downtime, after the last round, or once rounds
                // stop shrinking what is left (the guest dirties as fast as the link carries).
                if force_post {
                    postcopy = true;
                    break;
                }
                if eta <= downtime_target {
                    break;
                }
                if rounds >= MAX_ROUNDS || rounds >= 3 && left >= prev {
                    // Not converging: the rest moves after the switch-over.
                    postcopy = true;
                    break;
                }
                prev = left;
                rounds += 1;
                let (b0, t) = (out.bytes, Instant::now());
                send_disk_pending(&mut out, &mut copies, &mut buf)?;
                send_dirty(&mut out, &mem, &pending, &mut buf)?;
                pending.clear();
                out.flush()?;
                round_bytes = out.bytes - b0;
                round_time = t.elapsed();
            }
        }
        // Switch-over: stop the VM, send what is left and the state.
        let paused_at = Instant::now();
        if !was_paused {
            self.pause()
                .map_err(|a| MigrationError(format!("pausing the VM: {}", a.body)))?;
        }
        // The disks' rest (the device workers are quiesced, their requests completed), before
        // anything else: in post-copy too, a disk is whole on the target before it runs.
        for c in &mut copies {
            c.collect();
        }
        let last_dirty_blocks = copies.iter().map(Copy::pending_blocks).sum();
        if kvm_log {
            send_disk_pending(&mut out, &mut copies, &mut buf)?;
        } else {
            for c in &copies {
                send_disk_range(&mut out, c, 0, c.access.dirty.blocks(), &mut buf)?;
            }
        }
        let last_dirty;
        if kvm_log {
            let last = collect(&self.vm, &mem, true)?;
            if pending.is_empty() {
                pending = last;
            } else {
                merge(&mut pending, last);
            }
            last_dirty = count(&pending);
            if postcopy {
                let gpas = gpas(&mem, &pending);
                let mut b = Vec::with_capacity(12 + 8 * gpas.len());
                b.extend_from_slice(&TAG_POSTCOPY.to_le_bytes());
                b.extend_from_slice(&(gpas.len() as u64).to_le_bytes());
                for g in &gpas {
                    b.extend_from_slice(&g.to_le_bytes());
                }
                out.put(&b)?;
            } else {
                send_dirty(&mut out, &mem, &pending, &mut buf)?;
            }
        } else {
            send_all(&mut out, &mem, &mut buf)?;
            last_dirty = mem.iter().map(|r| r.len() / PAGE).sum();
        }
        let state = self
            .save_state(&[])
            .map_err(|a| MigrationError(format!("saving the VM's state: {}", a.body)))?;
        out.state(&state.encode())?;
        out.end()?;
        read_ack(&mut back)?;
        let downtime = paused_at.elapsed();
        // The disks go first: handed over (flushed, the records naming the target), then `go`.
        let mut handed = Vec::new();
        if let Some(h) = &handover {
            let who = read_identity(&mut back)?;
            handed =
                crate::vmkfs_disk::hand_over_all(&self.shared.vmkfs, &who.host, who.pid, h.token)
                    .map_err(MigrationError)?;
        }
        // Past this point the VM belongs to the target.
        if let Err(e) = out.put(&GO).and_then(|()| out.flush()) {
            // The target may not have `go`: the disks come back here unless it has taken them
            // (then it runs the VM, and this side ends as if `go` had arrived).
            let token = handover.as_ref().map_or(0, |h| h.token);
            if crate::vmkfs_disk::take_back_all(&self.shared.vmkfs, &handed, token) {
                return Err(e);
            }
            eprintln!(
                "wv: migration: sending go failed ({e}), but the target has taken the disks: \
                 the VM is the target's"
            );
        }
        let mut postcopy_pages = 0;
        if postcopy {
            // Past GO the VM is the target's: a failure now must not resume it here (the target
            // has run it), so it is reported and the source ends all the same.
            match serve_postcopy(&mut out, &mut back, &mem, gpas(&mem, &pending), &mut buf) {
                Ok(n) => postcopy_pages = n,
                Err(e) => eprintln!(
                    "wv: post-copy migration: lost the target: {e}; the VM is lost (the target \
                     ran it with part of its memory still here)"
                ),
            }
        }
        Ok(Sent {
            rounds,
            bytes: out.bytes,
            pages: out.pages,
            zero_pages: out.zero_pages,
            precopy: kvm_log,
            postcopy,
            postcopy_pages,
            downtime,
            last_dirty,
            disks: copies.len(),
            disk_bytes: out.disk_bytes,
            disk_zero_bytes: out.disk_zero_bytes,
            last_dirty_blocks,
        })
    }
}

impl Controller {
    /// The disks record for this VM: its writable VMKFS disks, with a new token; None
    /// without any.
    fn disk_hand_over(&self) -> Result<Option<DiskHandOver>, MigrationError> {
        if self.shared.vmkfs.is_empty() {
            return Ok(None);
        }
        let mut t = [0u8; 8];
        if !crate::random_bytes(&mut t) {
            return Err(MigrationError(
                "the host gave no entropy for the disks' hand-over token (getrandom)".into(),
            ));
        }
        let mut disks = Vec::new();
        for h in &self.shared.vmkfs {
            let (name, size) = h
                .name_and_size()
                .ok_or_else(|| MigrationError(format!("disk '{}' is closed", h.id)))?;
            disks.push(SharedDisk {
                index: h.index,
                id: h.id.clone(),
                name,
                size,
            });
        }
        Ok(Some(DiskHandOver {
            token: u64::from_le_bytes(t),
            disks,
        }))
    }
}

/// The guest-physical addresses of the pages set in `dirty`.
fn gpas(mem: &GuestRam, dirty: &Dirty) -> Vec<u64> {
    let mut v = Vec::new();
    for (region, bits) in mem.iter().zip(dirty) {
        let base = region.start_addr().0;
        let pages = region.len() / PAGE;
        for (w, &x) in (0u64..).zip(bits.iter()) {
            let mut x = x;
            while x != 0 {
                let b = u64::from(x.trailing_zeros());
                x &= x - 1;
                let p = w * 64 + b;
                if p < pages {
                    v.push(base + p * PAGE);
                }
            }
        }
    }
    v
}

/// The source after GO in post-copy: pushes every page of `left` in order, serving first the
/// ones the target asks for; ends with an end marker once all are sent. Returns the pages sent.
fn serve_postcopy(
    out: &mut Out,
    back: &mut TcpStream,
    mem: &GuestRam,
    left: Vec<u64>,
    buf: &mut [u8],
) -> Result<u64, MigrationError> {
    let mut todo: std::collections::HashSet<u64> = left.iter().copied().collect();
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    let mut r = back
        .try_clone()
        .map_err(io_err("setting up the post-copy connection"))?;
    let _ = r.set_read_timeout(None);
    std::thread::spawn(move || {
        crate::seccomp::install(crate::seccomp::Kind::MigrateBack);
        let mut a = [0u8; 8];
        while r.read_exact(&mut a).is_ok() {
            if tx.send(u64::from_le_bytes(a)).is_err() {
                break;
            }
        }
    });
    let mut sent = 0;
    let mut send = |out: &mut Out, gpa: u64, todo: &mut std::collections::HashSet<u64>| {
        if !todo.remove(&gpa) {
            return Ok(());
        }
        sent += 1;
        send_range(out, mem, gpa, 0, 1, true, buf)
    };
    for &gpa in &left {
        let mut asked = false;
        while let Ok(want) = rx.try_recv() {
            send(out, want, &mut todo)?;
            asked = true;
        }
        if asked {
            out.flush()?;
        }
        send(out, gpa, &mut todo)?;
    }
    out.end()?;
    // Every page sent: the target says it has them by closing its side. Until then its
    // requests (for pages in flight) are read and dropped, so that this side never closes
    // with unread data, which would reset the connection and could lose what is still in
    // flight to the target. An older target does not close: bounded wait.
    let _ = back.shutdown(std::net::Shutdown::Write);
    let until = Instant::now() + Duration::from_secs(5);
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(_) => {}
            Err(_) => break,
        }
    }
    Ok(sent)
}

/// Parses the body of `PUT /vm/migrate-send`.
pub(crate) fn parse_request(body: &[u8]) -> Result<SendRequest, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid migration request: {e}"))?;
    if !v.is_object() {
        return Err("the migration request must be a JSON object".into());
    }
    let r: SendRequest =
        serde_json::from_value(v).map_err(|e| format!("invalid migration request: {e}"))?;
    if let Some(m) = r.mode.as_deref() {
        if m != "precopy" && m != "postcopy" {
            return Err(format!(
                "invalid migration request: unknown mode '{m}' (precopy or postcopy)"
            ));
        }
    }
    Ok(r)
}

/// The target's end of a stream: counts what it reads.
struct In<R> {
    r: R,
    bytes: u64,
}

impl<R: Read> In<R> {
    fn take(&mut self, b: &mut [u8]) -> Result<(), MigrationError> {
        self.r.read_exact(b).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                MigrationError(format!(
                    "the stream ended after {} bytes, before its end marker",
                    self.bytes
                ))
            } else {
                MigrationError(format!(
                    "reading the stream after {} bytes: {e}",
                    self.bytes
                ))
            }
        })?;
        self.bytes += b.len() as u64;
        Ok(())
    }
    /// `len` bytes into a buffer that grows as they arrive (`len` is the peer's word: a
    /// stream that claims a large record and ends early costs no more than it sent).
    fn take_up_to(&mut self, len: u64) -> Result<Vec<u8>, MigrationError> {
        const CHUNK: u64 = 1 << 20;
        let mut b = Vec::new();
        while (b.len() as u64) < len {
            let n = usize::try_from((len - b.len() as u64).min(CHUNK)).unwrap_or(1 << 20);
            let at = b.len();
            b.resize(at + n, 0);
            self.take(&mut b[at..])?;
        }
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32, MigrationError> {
        let mut b = [0u8; 4];
        self.take(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, MigrationError> {
        let mut b = [0u8; 8];
        self.take(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// What a stream carried: its memory and its state sections.
pub struct Received {
    /// The guest's RAM, filled.
    pub mem: GuestRam,
    /// The state sections (as a snapshot's state file holds them).
    pub sections: Sections,
    /// Stream bytes read.
    pub bytes: u64,
    /// Post-copy: the pages the source still holds (delivered after GO).
    pub postcopy: Option<Vec<u64>>,
    /// The VMKFS disks handed over at the switch-over.
    pub disks: Option<DiskHandOver>,
    /// The disks the stream copied (into the sink), in the order declared.
    pub copied: Vec<CopiedDisk>,
}

/// Checks that `len` bytes at `gpa` are whole pages inside `mem`'s RAM.
fn check_span(mem: &GuestRam, gpa: u64, len: u64, max: u64) -> Result<(), MigrationError> {
    if len == 0 || len > max || !len.is_multiple_of(PAGE) || !gpa.is_multiple_of(PAGE) {
        return Err(MigrationError(format!(
            "a page record at {gpa:#x} of {len} bytes is not a whole number of pages \
             (at most {max} bytes)"
        )));
    }
    let fits = usize::try_from(len)
        .ok()
        .is_some_and(|l| gpa.checked_add(len).is_some() && mem.check_range(GuestAddress(gpa), l));
    if !fits {
        return Err(MigrationError(format!(
            "a page record at {gpa:#x} of {len} bytes lies outside the VM's memory"
        )));
    }
    Ok(())
}

/// Reads a whole stream (up to and including its end marker) from `r` into fresh RAM. Every
/// record is checked before it is used: a stream that is not one, of a newer version, with a
/// record outside memory, a checksum that does not match, or that ends early is refused. A
/// stream that copies disks is refused ([`read_stream_into`] takes them).
pub fn read_stream(r: impl Read, host_ram: u64) -> Result<Received, MigrationError> {
    read_stream_into(r, host_ram, &mut NoDisks)
}

/// Checks a disk record's range: whole sectors, not empty, at most `max` bytes, inside the
/// declared disk `index`; returns the index as usize.
fn check_disk_span(
    copied: &[CopiedDisk],
    index: u32,
    offset: u64,
    len: u64,
    max: u64,
) -> Result<usize, MigrationError> {
    let Some(d) = copied
        .iter()
        .find(|d| u32::try_from(d.index).ok() == Some(index))
    else {
        return Err(MigrationError(format!(
            "a disk record for disk {index}, which the stream has not declared"
        )));
    };
    if len == 0
        || len > max
        || !len.is_multiple_of(DISK_SECTOR)
        || !offset.is_multiple_of(DISK_SECTOR)
    {
        return Err(MigrationError(format!(
            "a record of disk {index} at {offset} of {len} bytes is not whole sectors \
             (at most {max} bytes)"
        )));
    }
    if offset.checked_add(len).is_none_or(|e| e > d.size) {
        return Err(MigrationError(format!(
            "a record of disk {index} at {offset} of {len} bytes lies outside the disk ({} bytes)",
            d.size
        )));
    }
    Ok(d.index)
}

/// [`read_stream`], the disks the stream copies going to `sink` (each record checked first).
pub fn read_stream_into(
    r: impl Read,
    host_ram: u64,
    sink: &mut dyn DiskSink,
) -> Result<Received, MigrationError> {
    let mut s = In { r, bytes: 0 };
    let mut copied: Vec<CopiedDisk> = Vec::new();
    let bad = |m: String| MigrationError(m);
    let mut magic = [0u8; 8];
    s.take(&mut magic)?;
    if magic != MAGIC {
        return Err(bad(
            "not a Worldvisor migration stream (no WVMIGR header)".into()
        ));
    }
    let version = s.u32()?;
    if version == 0 || version > VERSION {
        return Err(bad(format!(
            "the stream has format version {version}; this wv reads 1 to {VERSION}"
        )));
    }
    let _flags = s.u32()?;
    let memory = s.u64()?;
    let mut disks: Option<DiskHandOver> = None;
    if memory > host_ram {
        return Err(bad(format!(
            "the VM has {memory} bytes of memory, more than this host's {host_ram}"
        )));
    }
    let mem = wv_machine::create_ram(memory).map_err(|e| bad(e.to_string()))?;
    let mut buf = vec![0u8; RECORD_BUF];
    let mut state: Option<Sections> = None;
    let mut postcopy: Option<Vec<u64>> = None;
    loop {
        let tag = s.u32()?;
        if state.is_some() && tag != TAG_END {
            return Err(bad(format!(
                "a record (tag {tag}) follows the state; only the end marker may"
            )));
        }
        match tag {
            TAG_PAGES => {
                let gpa = s.u64()?;
                let len = s.u64()?;
                let crc = s.u32()?;
                check_span(&mem, gpa, len, MAX_RECORD)?;
                // len <= MAX_RECORD (checked).
                #[allow(clippy::cast_possible_truncation)]
                let data = &mut buf[..len as usize];
                s.take(data)?;
                if crc32c(data) != crc {
                    return Err(bad(format!(
                        "the page record at {gpa:#x} is corrupt (checksum mismatch)"
                    )));
                }
                mem.write_slice(data, GuestAddress(gpa))
                    .map_err(|e| bad(format!("writing guest memory at {gpa:#x}: {e}")))?;
            }
            TAG_ZERO => {
                let gpa = s.u64()?;
                let len = s.u64()?;
                check_span(&mem, gpa, len, memory)?;
                // Pages never written are zero already; only written ones are cleared (which
                // keeps untouched memory unallocated).
                let mut at = gpa;
                let page = &mut buf[..PAGE_BYTES];
                while at < gpa + len {
                    mem.read_slice(page, GuestAddress(at))
                        .map_err(|e| bad(format!("reading guest memory at {at:#x}: {e}")))?;
                    if !is_zero(page) {
                        page.fill(0);
                        mem.write_slice(page, GuestAddress(at))
                            .map_err(|e| bad(format!("writing guest memory at {at:#x}: {e}")))?;
                    }
                    at += PAGE;
                }
            }
            TAG_POSTCOPY => {
                let n = s.u64()?;
                if postcopy.is_some() || n > memory / PAGE {
                    return Err(bad(format!(
                        "a post-copy list of {n} pages (a second one, or more than memory holds)"
                    )));
                }
                let mut v = Vec::new();
                for _ in 0..n {
                    let gpa = s.u64()?;
                    check_span(&mem, gpa, PAGE, PAGE)?;
                    v.push(gpa);
                }
                postcopy = Some(v);
            }
            TAG_DISKS => {
                let len = s.u32()?;
                if version < 2 || disks.is_some() || len > MAX_DISKS_RECORD {
                    return Err(bad(format!(
                        "a disks record of {len} bytes (in a version {version} stream, a second \
                         one, or more than {MAX_DISKS_RECORD} bytes)"
                    )));
                }
                let mut b = vec![0u8; len as usize];
                s.take(&mut b)?;
                disks = Some(
                    serde_json::from_slice(&b)
                        .map_err(|e| bad(format!("the disks record is not valid: {e}")))?,
                );
            }
            TAG_DISK => {
                let len = s.u32()?;
                if version < 3 || len > MAX_DISK_HEADER || copied.len() >= MAX_COPIED_DISKS {
                    return Err(bad(format!(
                        "a disk record of {len} bytes (in a version {version} stream, more than \
                         {MAX_DISK_HEADER} bytes, or more than {MAX_COPIED_DISKS} disks)"
                    )));
                }
                let mut b = vec![0u8; len as usize];
                s.take(&mut b)?;
                let d: CopiedDisk = serde_json::from_slice(&b)
                    .map_err(|e| bad(format!("a disk record is not valid: {e}")))?;
                if d.size == 0
                    || d.size > MAX_COPIED_DISK_SIZE
                    || !d.size.is_multiple_of(DISK_SECTOR)
                    || d.index >= MAX_COPIED_DISKS
                    || copied.iter().any(|c| c.index == d.index)
                {
                    return Err(bad(format!(
                        "disk record {} ('{}', {} bytes): an index declared twice or out of \
                         range, or a size that is not a positive multiple of 512 of at most \
                         {MAX_COPIED_DISK_SIZE}",
                        d.index, d.id, d.size
                    )));
                }
                sink.create(&d)
                    .map_err(|e| bad(format!("disk '{}': {e}", d.id)))?;
                copied.push(d);
            }
            TAG_DISK_DATA => {
                let index = s.u32()?;
                let offset = s.u64()?;
                let len = s.u64()?;
                let crc = s.u32()?;
                let i = check_disk_span(&copied, index, offset, len, MAX_RECORD)?;
                // len <= MAX_RECORD (checked).
                #[allow(clippy::cast_possible_truncation)]
                let data = &mut buf[..len as usize];
                s.take(data)?;
                if crc32c(data) != crc {
                    return Err(bad(format!(
                        "the record of disk {index} at {offset} is corrupt (checksum mismatch)"
                    )));
                }
                sink.write(i, offset, data)
                    .map_err(|e| bad(format!("writing disk {index} at {offset}: {e}")))?;
            }
            TAG_DISK_ZERO => {
                let index = s.u32()?;
                let offset = s.u64()?;
                let len = s.u64()?;
                let i = check_disk_span(&copied, index, offset, len, u64::MAX)?;
                sink.zero(i, offset, len)
                    .map_err(|e| bad(format!("zeroing disk {index} at {offset}: {e}")))?;
            }
            TAG_STATE => {
                let len = s.u64()?;
                if len > MAX_STATE {
                    return Err(bad(format!("the state record claims {len} bytes")));
                }
                let b = s.take_up_to(len)?;
                state = Some(Sections::decode(&b).map_err(|e| bad(format!("the state: {e}")))?);
            }
            TAG_END => {
                let Some(sections) = state else {
                    return Err(bad("the stream ended without the VM's state".into()));
                };
                return Ok(Received {
                    mem,
                    sections,
                    bytes: s.bytes,
                    postcopy,
                    disks,
                    copied,
                });
            }
            t => return Err(bad(format!("unknown record tag {t} in the stream"))),
        }
    }
}

/// Listens for one migration stream on `addr` (`HOST:PORT`; port 0 picks one).
pub fn listen(addr: &str) -> Result<TcpListener, VmmError> {
    TcpListener::bind(addr)
        .map_err(|e| VmmError::Migration(format!("cannot listen on {addr}: {e}")))
}

/// A VM received from a source, built once [`run_incoming`] is called.
pub struct Incoming {
    cfg: VmConfig,
    restore: crate::Restore,
    conn: TcpStream,
    /// The VM's RAM and, in post-copy, the pages still on the source.
    postcopy: Option<(GuestRam, Vec<u64>)>,
    /// The disks to take over after `go`, and the token.
    takers: Option<(Vec<crate::vmkfs_disk::Taker>, u64)>,
    /// The disks the stream copied here: removed unless the source says `go`.
    landed: crate::landing::Landed,
    /// Stream bytes read.
    pub bytes: u64,
    /// Where the stream came from.
    pub peer: std::net::SocketAddr,
}

impl Incoming {
    /// The VM's configuration as the source sent it.
    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }
}

/// Tells the source that the target failed (best effort: it may be gone).
fn tell_failed(conn: &mut TcpStream, msg: &str) {
    let m = msg.as_bytes();
    let m = &m[..m.len().min(4096)];
    let mut b = FAILED.to_vec();
    b.extend_from_slice(&u32::try_from(m.len()).unwrap_or(0).to_le_bytes());
    b.extend_from_slice(m);
    let _ = conn.write_all(&b);
}

/// Accepts one connection on `listener` and reads its stream whole. Errors are one line; the
/// source is told why where it can be. A stream that copies disks is refused
/// ([`receive_with`] says where they go).
pub fn receive(listener: &TcpListener) -> Result<Incoming, VmmError> {
    receive_with(listener, &crate::DiskPlaces::default())
}

/// [`receive`], the disks the stream copies created in `places` (and removed again if the
/// migration fails before the source's `go`). The configuration of the [`Incoming`] names
/// them there.
pub fn receive_with(
    listener: &TcpListener,
    places: &crate::DiskPlaces,
) -> Result<Incoming, VmmError> {
    let (mut conn, peer) = listener
        .accept()
        .map_err(|e| VmmError::Migration(format!("accepting a connection: {e}")))?;
    let fail = |m: String| VmmError::Migration(format!("from {peer}: {m}"));
    conn.set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| conn.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| fail(e.to_string()))?;
    let reader = conn.try_clone().map_err(|e| fail(e.to_string()))?;
    let mut landing = crate::landing::Landing::new(places);
    let got = match read_stream_into(
        BufReader::with_capacity(1 << 20, reader),
        crate::config::host_ram(),
        &mut landing,
    ) {
        Ok(g) => g,
        Err(e) => {
            tell_failed(&mut conn, &e.0);
            return Err(fail(e.0));
        }
    };
    let built = (|| {
        let cfg: VmConfig = got
            .sections
            .json("config")
            .map_err(|e| e.0.replace("snapshot", "stream"))?;
        if cfg.memory_is_shared() && got.postcopy.is_some() {
            return Err(
                "post-copy into shared guest memory (memory_shared, vhost-user nets) is not supported: migrate with pre-copy"
                    .to_string(),
            );
        }
        if cfg.memory != wv_machine_memory(&got.mem) {
            return Err(format!(
                "the VM's configuration says {} bytes of memory, the stream carried {}",
                cfg.memory,
                wv_machine_memory(&got.mem)
            ));
        }
        let restore = crate::Restore::from_sections(&got.sections, &cfg)
            .map_err(|e| e.0.replace("snapshot", "stream"))?;
        if !got.copied.is_empty() {
            if got.disks.is_some() {
                return Err(
                    "the stream both copies disks and hands disks over on a shared datastore"
                        .into(),
                );
            }
            // The copied disks, in their new places; read-only ones are opened as usual.
            let f = landing.finish(&cfg)?;
            *restore.branches.lock().unwrap_or_else(|p| p.into_inner()) = f.opened;
            *restore.raw.lock().unwrap_or_else(|p| p.into_inner()) = f.raw;
            return Ok((f.cfg, restore, None, f.landed));
        }
        let (opened, takers) = incoming_disks(&cfg, got.disks.as_ref())?;
        *restore.branches.lock().unwrap_or_else(|p| p.into_inner()) = opened;
        let takers = got.disks.as_ref().map(|d| (takers, d.token));
        Ok((cfg, restore, takers, crate::landing::Landed::default()))
    })();
    match built {
        Ok((cfg, mut restore, takers, landed)) => {
            let postcopy = got.postcopy.map(|p| (got.mem.clone(), p));
            restore.memory = Some(RestoreMemory::Ram(got.mem));
            Ok(Incoming {
                cfg,
                restore,
                conn,
                postcopy,
                takers,
                landed,
                bytes: got.bytes,
                peer,
            })
        }
        Err(m) => {
            tell_failed(&mut conn, &m);
            Err(fail(m))
        }
    }
}

/// The target's side of the disks: each writable VMKFS disk of `cfg` must be in the disks
/// record (and nothing else), and is checked on its datastore here and held closed until it is
/// taken over after `go`; read-only disks are opened by the VM's build as usual (shared); a
/// writable raw image cannot move.
#[allow(clippy::type_complexity)]
fn incoming_disks(
    cfg: &VmConfig,
    rec: Option<&DiskHandOver>,
) -> Result<
    (
        Vec<(usize, crate::vmkfs_disk::VmkfsDisk)>,
        Vec<crate::vmkfs_disk::Taker>,
    ),
    String,
> {
    let listed = rec.map_or(&[][..], |r| &r.disks[..]);
    for l in listed {
        let ok = cfg.disks.get(l.index).is_some_and(|d| {
            !d.readonly && d.id == l.id && d.vmkfs.as_deref() == Some(l.name.as_str())
        });
        if !ok || listed.iter().filter(|m| m.index == l.index).count() > 1 {
            return Err(format!(
                "the disks record names disk {} ('{}', {}) that is not a writable VMKFS disk of \
                 the VM's configuration (or twice)",
                l.index, l.id, l.name
            ));
        }
    }
    let mut opened = Vec::new();
    let mut takers = Vec::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        if d.readonly {
            continue;
        }
        let Some(name) = &d.vmkfs else {
            return Err(format!(
                "the VM has a writable raw disk image ('{}'), which migration does not move",
                d.id
            ));
        };
        let Some(l) = listed.iter().find(|l| l.index == i) else {
            return Err(format!(
                "the VM's writable VMKFS disk '{}' is not in the stream's disks record",
                d.id
            ));
        };
        let (disk, taker) = crate::vmkfs_disk::VmkfsDisk::incoming(&d.path, name, &d.id, l.size)?;
        opened.push((i, disk));
        takers.push(taker);
    }
    Ok((opened, takers))
}

fn wv_machine_memory(mem: &GuestRam) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Builds the VM of `inc` (with `cfg`: its configuration, console and control socket as the
/// caller wants them), acknowledges to the source, waits for its `go` and runs the VM until it
/// ends. Nothing runs unless the source said `go`.
pub fn run_incoming(cfg: &VmConfig, inc: Incoming) -> Result<crate::RunOutcome, VmmError> {
    let Incoming {
        restore,
        mut conn,
        peer,
        postcopy,
        takers,
        landed,
        ..
    } = inc;
    let mut went = false;
    let mut takers = takers;
    let mut asked = false;
    let mut conn2 = conn
        .try_clone()
        .map_err(|e| VmmError::Migration(e.to_string()))?;
    let mut ack = || -> Result<(), VmmError> {
        asked = true;
        let fail = |m: String| VmmError::Migration(format!("from {peer}: {m}"));
        let mut ready = READY.to_vec();
        if takers.is_some() {
            let me = serde_json::to_vec(&TargetIdentity {
                host: wv_vmkfs::fs::this_host(),
                pid: std::process::id(),
            })
            .map_err(|e| fail(e.to_string()))?;
            ready.extend_from_slice(&u32::try_from(me.len()).unwrap_or(0).to_le_bytes());
            ready.extend_from_slice(&me);
        }
        conn2
            .write_all(&ready)
            .map_err(|e| fail(format!("acknowledging: {e}")))?;
        let mut go = [0u8; 8];
        conn2.read_exact(&mut go).map_err(|e| {
            fail(format!(
                "the source did not hand the VM over ({e}); it keeps running there"
            ))
        })?;
        if go != GO {
            return Err(fail("the source answered something other than go".into()));
        }
        // The source has stopped for good: the copied disks are this VM's.
        went = true;
        // The disks, handed over before `go`, are taken before any vCPU runs.
        if let Some((t, token)) = takers.take() {
            for taker in t {
                let what = taker.describe();
                taker.take(token).map_err(|e| {
                    fail(format!(
                        "{e}; the VM does not run here (the disk's hand-over record names this \
                         process, which ends: `wv fs unlock` breaks it)"
                    ))
                })?;
                eprintln!("wv: took disk {what} over from the migration's source");
            }
        }
        if let Some((mem, pages)) = &postcopy {
            crate::postcopy::start(mem, pages, &conn2).map_err(|e| fail(e.0))?;
        }
        Ok(())
    };
    let r = crate::run_from(cfg, Some(restore), Some(&mut ack), None);
    if let Err(e) = &r {
        if !asked {
            tell_failed(&mut conn, &e.to_string());
        }
    }
    if went {
        landed.keep();
    } else {
        // No `go`: the source runs on; the disks copied here go.
        drop(landed);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: u64 = 64 << 20;

    fn rec_pages(out: &mut Vec<u8>, gpa: u64, data: &[u8]) {
        out.extend_from_slice(&TAG_PAGES.to_le_bytes());
        out.extend_from_slice(&gpa.to_le_bytes());
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32c(data).to_le_bytes());
        out.extend_from_slice(data);
    }

    fn header(memory: u64) -> Vec<u8> {
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&memory.to_le_bytes());
        h
    }

    fn tail(out: &mut Vec<u8>) {
        let mut s = Sections::default();
        s.push("machine", b"{}".to_vec());
        let st = s.encode();
        out.extend_from_slice(&TAG_STATE.to_le_bytes());
        out.extend_from_slice(&(st.len() as u64).to_le_bytes());
        out.extend_from_slice(&st);
        out.extend_from_slice(&TAG_END.to_le_bytes());
    }

    fn good() -> Vec<u8> {
        let mut b = header(MEM);
        rec_pages(&mut b, 0x1000, &[7u8; 8192]);
        rec_pages(&mut b, 0x1000, &[9u8; 4096]);
        b.extend_from_slice(&TAG_ZERO.to_le_bytes());
        b.extend_from_slice(&0x2000u64.to_le_bytes());
        b.extend_from_slice(&4096u64.to_le_bytes());
        tail(&mut b);
        b
    }

    fn err(b: &[u8]) -> String {
        match read_stream(b, 1 << 40) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.0,
        }
    }

    /// A reader that remembers the largest buffer it was asked to fill.
    struct Widest<'a>(&'a [u8], usize);
    impl Read for Widest<'_> {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.1 = self.1.max(b.len());
            self.0.read(b)
        }
    }

    #[test]
    fn a_state_record_claiming_much_and_sending_little_costs_what_it_sent() {
        let mut b = header(MEM);
        b.extend_from_slice(&TAG_STATE.to_le_bytes());
        b.extend_from_slice(&MAX_STATE.to_le_bytes());
        b.extend_from_slice(&[0u8; 100]);
        let mut r = Widest(&b, 0);
        let e = read_stream_into(&mut r, 1 << 40, &mut NoDisks)
            .err()
            .unwrap();
        assert!(e.0.contains("ended after"), "{e}");
        // The buffer grows as bytes arrive: never the 256 MiB the record claimed.
        assert!(r.1 <= 1 << 20, "a read into a buffer of {} bytes", r.1);
        // A whole state in several chunks still reads.
        let got = read_stream(good().as_slice(), 1 << 40).unwrap();
        assert!(got.sections.get("machine").is_ok());
    }

    #[test]
    fn a_stream_fills_memory_last_write_winning() {
        let got = read_stream(good().as_slice(), 1 << 40).unwrap();
        let mut b = [0u8; 3];
        got.mem.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(b, [9; 3]);
        got.mem.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
        assert_eq!(b, [0; 3], "the zero record cleared the page");
        assert!(got.sections.get("machine").is_ok());
    }

    #[test]
    fn every_cut_and_every_bad_record_is_refused() {
        let g = good();
        for cut in 0..g.len() {
            assert!(read_stream(&g[..cut], 1 << 40).is_err(), "cut at {cut}");
        }
        assert!(err(b"GET / HTTP/1.1\r\n\r\n-------").contains("not a Worldvisor migration"));
        let mut newer = g.clone();
        newer[8] = 4;
        assert!(err(&newer).contains("version 4"));
        assert!(
            read_stream(g.as_slice(), MEM - 4096).is_err(),
            "more than the host's RAM"
        );
        // A flipped data byte: the checksum.
        let mut flip = g.clone();
        flip[24 + 24 + 100] ^= 1;
        assert!(err(&flip).contains("checksum"));
        let bad_span = |gpa: u64, len: u64| {
            let mut b = header(MEM);
            b.extend_from_slice(&TAG_PAGES.to_le_bytes());
            b.extend_from_slice(&gpa.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&vec![0u8; 8192]);
            err(&b)
        };
        assert!(bad_span(MEM, 4096).contains("outside"));
        assert!(bad_span(MEM - 4096, 8192).contains("outside"));
        assert!(bad_span(u64::MAX - 4095, 4096).contains("outside"));
        assert!(bad_span(0x1001, 4096).contains("whole number of pages"));
        assert!(bad_span(0, 100).contains("whole number of pages"));
        assert!(bad_span(0, 0).contains("whole number of pages"));
        assert!(bad_span(0, MAX_RECORD + 4096).contains("whole number of pages"));
        // Unknown tags; a page after the state; an end without state.
        let mut b = header(MEM);
        b.extend_from_slice(&99u32.to_le_bytes());
        assert!(err(&b).contains("unknown record tag 99"));
        let mut b = header(MEM);
        tail(&mut b);
        let end = b.len() - 4;
        b.truncate(end);
        rec_pages(&mut b, 0, &[1u8; 4096]);
        assert!(err(&b).contains("follows the state"));
        let mut b = header(MEM);
        b.extend_from_slice(&TAG_END.to_le_bytes());
        assert!(err(&b).contains("without the VM's state"));
    }

    #[test]
    fn a_postcopy_list_is_checked_and_kept() {
        let list = |n: u64, gpas: &[u64]| {
            let mut b = header(MEM);
            b.extend_from_slice(&TAG_POSTCOPY.to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
            for g in gpas {
                b.extend_from_slice(&g.to_le_bytes());
            }
            b
        };
        let mut b = list(2, &[0x1000, 0x3000]);
        tail(&mut b);
        let got = read_stream(b.as_slice(), 1 << 40).unwrap();
        assert_eq!(got.postcopy, Some(vec![0x1000, 0x3000]));
        let mut b = list(1, &[MEM]);
        tail(&mut b);
        assert!(err(&b).contains("outside"));
        let mut b = list(1, &[0x1001]);
        tail(&mut b);
        assert!(err(&b).contains("whole number of pages"));
        assert!(err(&list(MEM / PAGE + 1, &[])).contains("more than memory"));
        let mut b = list(0, &[]);
        b.extend_from_slice(&list(0, &[])[24..]);
        tail(&mut b);
        assert!(err(&b).contains("a second one"));
        assert!(read_stream(good().as_slice(), 1 << 40)
            .unwrap()
            .postcopy
            .is_none());
    }

    #[test]
    fn a_disks_record_is_bounded_checked_and_kept() {
        let rec = |version: u32, len: u32, body: &[u8]| {
            let mut b = header(MEM);
            b[8..12].copy_from_slice(&version.to_le_bytes());
            b.extend_from_slice(&TAG_DISKS.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
            b.extend_from_slice(body);
            b
        };
        let good = br#"{"token":7,"disks":[{"index":0,"id":"root","name":"d","size":1048576}]}"#;
        let n = u32::try_from(good.len()).unwrap();
        let mut b = rec(2, n, good);
        tail(&mut b);
        let got = read_stream(b.as_slice(), 1 << 40).unwrap();
        let d = got.disks.unwrap();
        assert_eq!((d.token, d.disks.len(), d.disks[0].size), (7, 1, 1 << 20));
        let mut b = rec(1, n, good);
        tail(&mut b);
        assert!(err(&b).contains("version 1 stream"));
        assert!(err(&rec(2, MAX_DISKS_RECORD + 1, b"")).contains("more than"));
        let mut b = rec(2, 2, b"{}");
        tail(&mut b);
        assert!(err(&b).contains("disks record is not valid"));
        let mut b = rec(2, n, good);
        b.extend_from_slice(&rec(2, n, good)[24..]);
        tail(&mut b);
        assert!(err(&b).contains("a second one"));
        // A record cut short.
        assert!(read_stream(&rec(2, n, &good[..10])[..], 1 << 40).is_err());
    }

    /// Copied disks kept in memory.
    #[derive(Default, Debug)]
    struct MemSink(Vec<(CopiedDisk, Vec<u8>)>);

    impl DiskSink for MemSink {
        fn create(&mut self, d: &CopiedDisk) -> Result<(), String> {
            self.0
                .push((d.clone(), vec![0; usize::try_from(d.size).unwrap()]));
            Ok(())
        }
        fn write(&mut self, index: usize, offset: u64, data: &[u8]) -> Result<(), String> {
            let d = &mut self.0.iter_mut().find(|d| d.0.index == index).unwrap().1;
            let o = usize::try_from(offset).unwrap();
            d[o..o + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn zero(&mut self, index: usize, offset: u64, len: u64) -> Result<(), String> {
            let d = &mut self.0.iter_mut().find(|d| d.0.index == index).unwrap().1;
            let o = usize::try_from(offset).unwrap();
            d[o..o + usize::try_from(len).unwrap()].fill(0);
            Ok(())
        }
    }

    fn disk_header(out: &mut Vec<u8>, index: usize, size: u64) {
        let j = serde_json::to_vec(&CopiedDisk {
            index,
            id: format!("d{index}"),
            vmkfs: false,
            name: format!("d{index}.img"),
            size,
        })
        .unwrap();
        out.extend_from_slice(&TAG_DISK.to_le_bytes());
        out.extend_from_slice(&u32::try_from(j.len()).unwrap().to_le_bytes());
        out.extend_from_slice(&j);
    }

    fn disk_data(out: &mut Vec<u8>, index: u32, offset: u64, data: &[u8]) {
        out.extend_from_slice(&TAG_DISK_DATA.to_le_bytes());
        out.extend_from_slice(&index.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32c(data).to_le_bytes());
        out.extend_from_slice(data);
    }

    fn disk_zero(out: &mut Vec<u8>, index: u32, offset: u64, len: u64) {
        out.extend_from_slice(&TAG_DISK_ZERO.to_le_bytes());
        out.extend_from_slice(&index.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }

    fn read_disks(b: &[u8]) -> Result<MemSink, String> {
        let mut sink = MemSink::default();
        read_stream_into(b, 1 << 40, &mut sink)
            .map(|_| ())
            .map_err(|e| e.0)?;
        Ok(sink)
    }

    #[test]
    fn disk_records_fill_the_declared_disk_last_write_winning() {
        let mut b = header(MEM);
        disk_header(&mut b, 1, 8192);
        disk_data(&mut b, 1, 0, &[5u8; 8192]);
        disk_data(&mut b, 1, 512, &[6u8; 512]);
        disk_zero(&mut b, 1, 4096, 4096);
        tail(&mut b);
        let s = read_disks(&b).unwrap();
        assert_eq!(s.0.len(), 1);
        let d = &s.0[0].1;
        assert_eq!(
            (d[0], d[512], d[1024], d[4095], d[4096], d[8191]),
            (5, 6, 5, 5, 0, 0)
        );
        // The plain reader refuses a stream that copies disks.
        assert!(err(&b).contains("takes no copied disks"));
        // An older version may not carry disk records.
        let mut old = b.clone();
        old[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert!(read_disks(&old).unwrap_err().contains("version 2 stream"));
    }

    #[test]
    fn every_malformed_disk_record_is_refused() {
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = header(MEM);
            disk_header(&mut b, 0, 1 << 20);
            f(&mut b);
            tail(&mut b);
            read_disks(&b).map(|_| ()).unwrap_err()
        };
        // Blocks of a disk never declared, past the end, straddling it, not whole sectors,
        // too long, empty; an overflowing offset; a flipped byte.
        assert!(with(&|b| disk_data(b, 1, 0, &[1; 512])).contains("not declared"));
        assert!(with(&|b| disk_data(b, 0, 1 << 20, &[1; 512])).contains("outside the disk"));
        assert!(with(&|b| disk_data(b, 0, (1 << 20) - 512, &[1; 1024])).contains("outside"));
        assert!(with(&|b| disk_data(b, 0, 100, &[1; 512])).contains("whole sectors"));
        assert!(with(&|b| disk_data(b, 0, 0, &[1; 100])).contains("whole sectors"));
        assert!(with(&|b| disk_data(b, 0, 0, &[])).contains("whole sectors"));
        let big = vec![1u8; usize::try_from(MAX_RECORD).unwrap() + 512];
        assert!(with(&|b| disk_data(b, 0, 0, &big)).contains("whole sectors"));
        assert!(with(&|b| disk_zero(b, 0, u64::MAX - 511, 512)).contains("outside"));
        assert!(with(&|b| disk_zero(b, 0, 0, (1 << 20) + 512)).contains("outside"));
        assert!(with(&|b| disk_zero(b, 3, 0, 512)).contains("not declared"));
        assert!(with(&|b| {
            disk_data(b, 0, 0, &[1; 512]);
            let at = b.len() - 10;
            b[at] ^= 1;
        })
        .contains("checksum"));
        // A disk declared twice, of a bad size, an index out of range, a header too long or
        // not JSON.
        assert!(with(&|b| disk_header(b, 0, 512)).contains("declared twice"));
        assert!(with(&|b| disk_header(b, 1, 100)).contains("multiple of 512"));
        assert!(with(&|b| disk_header(b, 1, 0)).contains("multiple of 512"));
        assert!(with(&|b| disk_header(b, 1, u64::MAX - 511)).contains("at most"));
        assert!(with(&|b| disk_header(b, MAX_COPIED_DISKS, 512)).contains("out of range"));
        assert!(with(&|b| {
            b.extend_from_slice(&TAG_DISK.to_le_bytes());
            b.extend_from_slice(&(MAX_DISK_HEADER + 1).to_le_bytes());
        })
        .contains("more than"));
        assert!(with(&|b| {
            b.extend_from_slice(&TAG_DISK.to_le_bytes());
            b.extend_from_slice(&2u32.to_le_bytes());
            b.extend_from_slice(b"{}");
        })
        .contains("not valid"));
        // Cut anywhere: refused.
        let mut g = header(MEM);
        disk_header(&mut g, 0, 1 << 20);
        disk_data(&mut g, 0, 0, &[1; 4096]);
        disk_zero(&mut g, 0, 4096, 4096);
        tail(&mut g);
        assert!(read_disks(&g).is_ok());
        for cut in 0..g.len() {
            assert!(read_disks(&g[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn the_target_checks_the_disks_record_against_the_configuration() {
        let mut cfg = VmConfig::default();
        let disk = |path: &str, vmkfs: Option<&str>, readonly: bool, id: &str| crate::DiskConfig {
            path: path.into(),
            vmkfs: vmkfs.map(Into::into),
            readonly,
            id: id.into(),
            vhost_user: false,
            via: Default::default(),
        };
        cfg.disks = vec![
            disk("/ro.img", None, true, "ro"),
            disk("/nonexistent-ds", Some("d"), false, "w"),
        ];
        let rec = |index: usize, id: &str, name: &str| DiskHandOver {
            token: 1,
            disks: vec![SharedDisk {
                index,
                id: id.into(),
                name: name.into(),
                size: 1 << 20,
            }],
        };
        let e = |cfg: &VmConfig, r: Option<&DiskHandOver>| {
            incoming_disks(cfg, r).map(|_| ()).unwrap_err()
        };
        assert!(e(&cfg, None).contains("not in the stream's disks record"));
        assert!(e(&cfg, Some(&rec(0, "w", "d"))).contains("not a writable VMKFS disk"));
        assert!(e(&cfg, Some(&rec(5, "w", "d"))).contains("not a writable VMKFS disk"));
        assert!(e(&cfg, Some(&rec(1, "w", "other"))).contains("not a writable VMKFS disk"));
        // Listed rightly: the datastore is opened (and here not found).
        assert!(e(&cfg, Some(&rec(1, "w", "d"))).contains("/nonexistent-ds"));
        cfg.disks = vec![disk("/rw.img", None, false, "rw")];
        assert!(e(&cfg, None).contains("writable raw disk image"));
    }

    #[test]
    fn a_request_names_a_known_mode() {
        let p = |b: &str| parse_request(b.as_bytes());
        assert!(p(r#"{"destination":"h:1","mode":"postcopy"}"#).is_ok());
        assert!(p(r#"{"destination":"h:1","mode":"precopy","postcopy":true}"#).is_ok());
        assert!(p(r#"{"destination":"h:1","mode":"turbo"}"#)
            .unwrap_err()
            .contains("unknown mode 'turbo'"));
        assert!(p(r#"{"destination":"h:1","max_bandwidth_mib":-1}"#).is_err());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        let mut p = [0u8; 4096];
        p[4095] = 1;
        assert!(!is_zero(&p));
        p[4095] = 0;
        p[3] = 1;
        assert!(!is_zero(&p[1..]));
    }
}
