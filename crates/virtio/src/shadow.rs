//! Shadow virtqueues: the rings a vhost-user backend serves while the VMM is interposed in a
//! device's path (`PUT /vm/device-path`, [`crate::vhost_user`]).
//!
//! The backend is given rings the VMM owns, in a memfd ([`ShadowArea`]) that the VMM adds to
//! the backend's memory table at a guest-physical range above all guest RAM and never maps
//! into KVM, so the guest cannot reach them. A [`ShadowQueue`] moves work between the guest's
//! ring and its shadow: each guest chain is read once and validated ([`Chain::read`]), and a
//! copy of its descriptors is written into the shadow table (the descriptors still name the
//! guest's buffers: no data is copied); the backend's used entries are translated back (shadow
//! head to guest head) into the guest's used ring. Handing the queue back to the backend
//! ([`ShadowQueue::hand_back`]) rewinds the guest's ring over the chains the backend never
//! took, so that nothing is lost or served twice across a switch.
#![allow(clippy::cast_possible_truncation)] // ring positions and indices are 16-bit by the spec

use crate::chain::{Chain, MAX_CHAIN};
use crate::device::ActiveQueue;
use crate::GuestMemoryMmap;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, Ordering};
use std::time::Instant;
use virtio_queue::QueueT;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// The largest queue a shadow ring serves (both vhost-user devices offer 256 entries).
pub const MAX_QUEUE: u16 = 256;
/// Bytes of the shadow area per queue: the descriptor table, the available ring and the used
/// ring, one page each (enough for [`MAX_QUEUE`] entries).
const PER_QUEUE: u64 = 3 * 4096;
const DESC_OFF: u64 = 0;
const AVAIL_OFF: u64 = 4096;
const USED_OFF: u64 = 8192;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// The VMM-owned memory the shadow rings live in: a memfd mapped shared here, handed to the
/// backend as one more region of its memory table (never mapped into KVM).
pub struct ShadowArea {
    mem: vm_memory::GuestMemoryMmap,
    /// Where the backend's memory table puts it (above guest RAM).
    gpa: std::sync::atomic::AtomicU64,
}

impl ShadowArea {
    /// An area for `queues` queues, created as a memfd (on the thread that builds the
    /// device: the relay thread's system-call filter has no memfd_create).
    pub fn new(queues: usize) -> Result<ShadowArea, String> {
        let size = PER_QUEUE * queues as u64;
        // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(c"wv-shadow-rings".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!(
                "shadow rings: memfd_create: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(|e| format!("shadow rings: sizing the memfd: {e}"))?;
        let region = vm_memory::GuestRegionMmap::from_range(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(file, 0)),
        )
        .map_err(|e| format!("shadow rings: mapping the memfd: {e}"))?;
        let mem = vm_memory::GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| format!("shadow rings: {e}"))?;
        Ok(ShadowArea {
            mem,
            gpa: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Places the area just above `guest`'s RAM (2 MiB aligned), where no guest address
    /// reaches.
    pub fn place_above(&self, guest: &GuestMemoryMmap) {
        let top = guest.last_addr().0.saturating_add(1);
        let gpa = top.saturating_add((2 << 20) - 1) & !((2 << 20) - 1);
        self.gpa.store(gpa, Ordering::Relaxed);
    }

    /// The guest-physical address the backend's memory table gives the area.
    pub fn gpa(&self) -> u64 {
        self.gpa.load(Ordering::Relaxed)
    }

    /// The area's memory-table entry for the backend.
    pub fn region(&self) -> vhost::VhostUserMemoryRegionInfo {
        let r = self.mem.iter().next().expect("one region");
        let fo = r.file_offset().expect("file-backed");
        vhost::VhostUserMemoryRegionInfo {
            guest_phys_addr: self.gpa(),
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
            mmap_offset: fo.start(),
            mmap_handle: fo.file().as_raw_fd(),
        }
    }

    /// The VMM's addresses of queue `q`'s descriptor table, available ring and used ring (what
    /// SET_VRING_ADDR takes).
    pub fn host_addrs(&self, q: usize) -> (u64, u64, u64) {
        let base =
            self.mem.iter().next().expect("one region").as_ptr() as u64 + q as u64 * PER_QUEUE;
        (base + DESC_OFF, base + AVAIL_OFF, base + USED_OFF)
    }

    /// The shadow memory (rings at offsets `q * PER_QUEUE`).
    fn mem(&self) -> &vm_memory::GuestMemoryMmap {
        &self.mem
    }

    /// Whether the area has room for queue `q`.
    fn has(&self, q: usize) -> bool {
        self.mem
            .iter()
            .next()
            .is_some_and(|r| (q as u64 + 1) * PER_QUEUE <= r.len())
    }
}

/// Marks the first `len` bytes of `chain`'s writable buffers dirty in the guest memory's
/// bitmap: the backend wrote them through its own mapping, which neither KVM's dirty log nor
/// vm-memory sees, and a migration must send those pages again (docs/DEVICES.md).
fn mark_written(mem: &GuestMemoryMmap, chain: &Chain, len: u32) {
    use vm_memory::bitmap::Bitmap;
    let mut left = u64::from(len);
    for d in chain.writable() {
        if left == 0 {
            break;
        }
        let n = left.min(u64::from(d.len));
        left -= n;
        // A chain was validated against guest RAM when it was read, but a range may still
        // cross from one region into the next: each piece in its own region.
        let (mut addr, mut n) = (d.addr, n);
        while n > 0 {
            let Some((region, off)) = mem.to_region_addr(GuestAddress(addr)) else {
                break;
            };
            let in_region = (region.len() - off.0).min(n);
            region
                .bitmap()
                .mark_dirty(off.0 as usize, in_region as usize);
            addr += in_region;
            n -= in_region;
        }
    }
}

/// A chain forwarded to the backend and not yet used.
#[derive(Clone, Debug)]
struct InFlight {
    /// The guest's head index.
    guest_head: u16,
    /// The shadow descriptors it occupies.
    descs: Vec<u16>,
    /// Its position in the shadow available ring.
    pos: u16,
    /// The chain as read (what capture and trace look at).
    chain: Chain,
    /// When it was forwarded.
    at: Instant,
    /// The first 16 readable bytes when it was forwarded (a disk request's header).
    head_bytes: [u8; 16],
}

/// A chain the backend used, translated back and put in the guest's used ring.
#[derive(Debug)]
pub struct Completion {
    /// The chain as the VMM read it from the guest.
    pub chain: Chain,
    /// Bytes the backend said it wrote (at most the chain's writable bytes).
    pub len: u32,
    /// Time from forwarding to completion.
    pub latency: std::time::Duration,
    /// The first 16 readable bytes when it was forwarded.
    pub head_bytes: [u8; 16],
}

/// Why forwarding stopped on a queue.
#[derive(Debug, PartialEq, Eq)]
pub enum ShadowError {
    /// The guest posted a chain that failed validation (counted; the device needs a reset).
    BadChain(crate::chain::ChainError),
    /// The backend wrote a used entry naming no chain in flight (counted; entry ignored).
    BadUsed(u32),
    /// The shadow memory could not be accessed (should not happen: the VMM owns it).
    Memory,
}

impl std::fmt::Display for ShadowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShadowError::BadChain(e) => write!(f, "the guest posted a bad chain: {e}"),
            ShadowError::BadUsed(id) => {
                write!(f, "the backend used id {id}, which is not in flight")
            }
            ShadowError::Memory => f.write_str("the shadow ring's memory is unreachable"),
        }
    }
}

/// One queue's shadow: where its rings are, which shadow descriptors are free, what is in
/// flight.
pub struct ShadowQueue {
    index: usize,
    size: u16,
    /// Next position of the shadow available ring.
    avail: u16,
    /// Next used entry the VMM reads.
    used: u16,
    free: Vec<u16>,
    inflight: Vec<Option<InFlight>>,
    /// A chain read from the guest that waits for free shadow descriptors.
    pending: Option<(Chain, [u8; 16])>,
    /// Chains forwarded and completed since the queue was started.
    pub forwarded: u64,
    /// Completions given back.
    pub completed: u64,
}

impl ShadowQueue {
    /// Starts queue `index` of `area` for a guest queue of `size` entries: clears its rings.
    pub fn start(area: &ShadowArea, index: usize, size: u16) -> Result<ShadowQueue, String> {
        if size == 0 || size > MAX_QUEUE || !size.is_power_of_two() {
            return Err(format!(
                "queue {index}: a shadow ring serves queues of 1 to {MAX_QUEUE} entries (a power of two), not {size}"
            ));
        }
        if !area.has(index) {
            return Err(format!("queue {index}: no shadow ring for it"));
        }
        let base = index as u64 * PER_QUEUE;
        area.mem()
            .write_slice(&vec![0u8; PER_QUEUE as usize], GuestAddress(base))
            .map_err(|e| format!("queue {index}: clearing the shadow ring: {e}"))?;
        Ok(ShadowQueue {
            index,
            size,
            avail: 0,
            used: 0,
            free: (0..size).rev().collect(),
            inflight: vec![None; usize::from(size)],
            pending: None,
            forwarded: 0,
            completed: 0,
        })
    }

    fn base(&self) -> u64 {
        self.index as u64 * PER_QUEUE
    }

    /// Chains forwarded and not yet used by the backend.
    pub fn in_flight(&self) -> usize {
        self.inflight.iter().filter(|f| f.is_some()).count()
    }

    /// Takes every chain the guest made available (while shadow descriptors are free) and
    /// publishes a validated copy in the shadow ring; returns how many were published. A
    /// bad chain stops forwarding with [`ShadowError::BadChain`] (the chain is completed
    /// empty in the guest's ring and counted).
    pub fn forward(
        &mut self,
        area: &ShadowArea,
        mem: &GuestMemoryMmap,
        guest: &mut ActiveQueue,
    ) -> Result<usize, ShadowError> {
        let smem = area.mem();
        let max = usize::from(self.size).min(MAX_CHAIN);
        let mut n = 0;
        loop {
            let (chain, head_bytes) = match self.pending.take() {
                Some(p) => p,
                None => {
                    let Some(dc) = guest.pop_chain(mem) else {
                        break;
                    };
                    let head = dc.head_index();
                    match Chain::read(mem, dc, max) {
                        Ok(c) => {
                            let mut hb = [0u8; 16];
                            let k = (c.readable_bytes() as usize).min(16);
                            let _ = c.read_at(mem, 0, &mut hb[..k]);
                            (c, hb)
                        }
                        Err(e) => {
                            guest.count_bad_chain();
                            let _ = guest.queue.add_used(mem, head, 0);
                            self.publish(smem, n)?;
                            return Err(ShadowError::BadChain(e));
                        }
                    }
                }
            };
            let need = chain.descs().len();
            if self.free.len() < need {
                self.pending = Some((chain, head_bytes));
                break;
            }
            let idx: Vec<u16> = (0..need)
                .map(|_| self.free.pop().expect("counted"))
                .collect();
            for (k, d) in chain.descs().iter().enumerate() {
                let at = self.base() + DESC_OFF + 16 * u64::from(idx[k]);
                let mut flags = if d.write { F_WRITE } else { 0 };
                let next = if k + 1 < need {
                    flags |= F_NEXT;
                    idx[k + 1]
                } else {
                    0
                };
                let mut raw = [0u8; 16];
                raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
                raw[8..12].copy_from_slice(&d.len.to_le_bytes());
                raw[12..14].copy_from_slice(&flags.to_le_bytes());
                raw[14..16].copy_from_slice(&next.to_le_bytes());
                smem.write_slice(&raw, GuestAddress(at))
                    .map_err(|_| ShadowError::Memory)?;
            }
            let head = idx[0];
            let pos = self.avail.wrapping_add(n as u16);
            let slot = u64::from(pos % self.size);
            smem.write_obj(head, GuestAddress(self.base() + AVAIL_OFF + 4 + 2 * slot))
                .map_err(|_| ShadowError::Memory)?;
            self.inflight[usize::from(head)] = Some(InFlight {
                guest_head: chain.head(),
                descs: idx,
                pos,
                chain,
                at: Instant::now(),
                head_bytes,
            });
            n += 1;
        }
        self.publish(smem, n)?;
        Ok(n)
    }

    /// Makes `n` more entries of the shadow available ring visible to the backend.
    fn publish(&mut self, smem: &vm_memory::GuestMemoryMmap, n: usize) -> Result<(), ShadowError> {
        if n == 0 {
            return Ok(());
        }
        self.avail = self.avail.wrapping_add(n as u16);
        self.forwarded += n as u64;
        // The entries and descriptors before the index.
        fence(Ordering::Release);
        smem.write_obj(self.avail, GuestAddress(self.base() + AVAIL_OFF + 2))
            .map_err(|_| ShadowError::Memory)
    }

    /// Moves the backend's used entries into the guest's used ring (head translated back,
    /// length bounded by the chain's writable bytes) and returns them; an entry naming no
    /// chain in flight is skipped and reported in the second value.
    pub fn reap(
        &mut self,
        area: &ShadowArea,
        mem: &GuestMemoryMmap,
        guest: &mut ActiveQueue,
    ) -> (Vec<Completion>, Option<ShadowError>) {
        let smem = area.mem();
        let mut out = Vec::new();
        let mut err = None;
        let Ok(used_idx) = smem.read_obj::<u16>(GuestAddress(self.base() + USED_OFF + 2)) else {
            return (out, Some(ShadowError::Memory));
        };
        // The entries after the index.
        fence(Ordering::Acquire);
        // A backend cannot have used more than was made available.
        let ahead = used_idx.wrapping_sub(self.used);
        let avail_ahead = self.avail.wrapping_sub(self.used);
        let take = if ahead > avail_ahead {
            err = Some(ShadowError::BadUsed(u32::from(used_idx)));
            avail_ahead
        } else {
            ahead
        };
        for _ in 0..take {
            let slot = u64::from(self.used % self.size);
            self.used = self.used.wrapping_add(1);
            let at = self.base() + USED_OFF + 4 + 8 * slot;
            let (Ok(id), Ok(len)) = (
                smem.read_obj::<u32>(GuestAddress(at)),
                smem.read_obj::<u32>(GuestAddress(at + 4)),
            ) else {
                err = Some(ShadowError::Memory);
                continue;
            };
            let Some(f) = usize::try_from(id)
                .ok()
                .and_then(|i| self.inflight.get_mut(i))
                .and_then(Option::take)
            else {
                err = Some(ShadowError::BadUsed(id));
                continue;
            };
            self.free.extend(f.descs.iter().rev());
            let len = len.min(f.chain.writable_bytes());
            mark_written(mem, &f.chain, len);
            let _ = guest.queue.add_used(mem, f.guest_head, len);
            self.completed += 1;
            out.push(Completion {
                len,
                latency: f.at.elapsed(),
                head_bytes: f.head_bytes,
                chain: f.chain,
            });
        }
        (out, err)
    }

    /// Chains the backend took (their position before `base`, its GET_VRING_BASE answer)
    /// and has not used yet.
    pub fn taken_unused(&self, base: u16) -> usize {
        let untaken = self.avail.wrapping_sub(base);
        self.inflight
            .iter()
            .flatten()
            .filter(|f| self.avail.wrapping_sub(f.pos) > untaken)
            .count()
    }

    /// Ends the shadow after the backend stopped at `base` and everything it took was reaped:
    /// the chains it never took (and one waiting for descriptors) go back to the guest's ring
    /// (its next available index moves back over them), to be taken again by whoever serves
    /// the ring next. Returns how many went back. With `drop_untaken` (a queue whose guest
    /// posted a bad chain) they are completed empty instead.
    pub fn hand_back(
        mut self,
        base: u16,
        mem: &GuestMemoryMmap,
        guest: &mut ActiveQueue,
        drop_untaken: bool,
    ) -> Result<u16, String> {
        let taken = self.taken_unused(base);
        if taken != 0 {
            return Err(format!(
                "queue {}: the backend stopped with {taken} request(s) taken and not completed",
                self.index
            ));
        }
        let mut back: u16 = 0;
        let mut untaken: Vec<InFlight> =
            self.inflight.iter_mut().filter_map(Option::take).collect();
        untaken.sort_by_key(|f| f.pos.wrapping_sub(base));
        if drop_untaken {
            for f in &untaken {
                let _ = guest.queue.add_used(mem, f.guest_head, 0);
            }
            if let Some((c, _)) = self.pending.take() {
                let _ = guest.queue.add_used(mem, c.head(), 0);
            }
            return Ok(0);
        }
        back += untaken.len() as u16;
        if self.pending.take().is_some() {
            back += 1;
        }
        let next = guest.queue.next_avail().wrapping_sub(back);
        guest.queue.set_next_avail(next);
        Ok(back)
    }
}

/// Writes a classic pcap file (linktype 1, Ethernet), one record per frame.
pub struct PcapWriter<W: std::io::Write> {
    out: W,
    /// Frames written.
    pub frames: u64,
}

/// Largest frame bytes a pcap record keeps (TSO frames reach 64 KiB).
pub const PCAP_SNAPLEN: u32 = 262_144;

impl<W: std::io::Write> PcapWriter<W> {
    /// Starts the file: the global header.
    pub fn new(mut out: W) -> std::io::Result<PcapWriter<W>> {
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&4u16.to_le_bytes());
        h.extend_from_slice(&0i32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&PCAP_SNAPLEN.to_le_bytes());
        h.extend_from_slice(&1u32.to_le_bytes());
        out.write_all(&h)?;
        Ok(PcapWriter { out, frames: 0 })
    }

    /// One frame (from its Ethernet header on).
    pub fn frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let keep = frame.len().min(PCAP_SNAPLEN as usize);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&(now.as_secs() as u32).to_le_bytes());
        h[4..8].copy_from_slice(&now.subsec_micros().to_le_bytes());
        h[8..12].copy_from_slice(&(keep as u32).to_le_bytes());
        h[12..16].copy_from_slice(&u32::try_from(frame.len()).unwrap_or(u32::MAX).to_le_bytes());
        self.out.write_all(&h)?;
        self.out.write_all(&frame[..keep])?;
        self.frames += 1;
        Ok(())
    }

    /// Pushes what is buffered to the file.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// A disk request's trace line: sector, data length, operation, latency (forward to
/// completion) and status.
pub fn trace_line(c: &Completion, mem: &GuestMemoryMmap) -> String {
    let hb = &c.head_bytes;
    let ty = u32::from_le_bytes(hb[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(hb[8..16].try_into().expect("8 bytes"));
    let op = match ty {
        0 => "read",
        1 => "write",
        4 => "flush",
        8 => "get-id",
        11 => "discard",
        13 => "write-zeroes",
        _ => "other",
    };
    // Data: what follows the 16-byte header (writes), or what precedes the status byte
    // (reads and GET_ID).
    let data = if ty == 0 || ty == 8 {
        c.chain.writable_bytes().saturating_sub(1)
    } else {
        c.chain.readable_bytes().saturating_sub(16)
    };
    let wb = c.chain.writable_bytes();
    let mut status = [0xffu8];
    if wb > 0 {
        let _ = c.chain.read_writable(mem, u64::from(wb - 1), &mut status);
    }
    format!(
        "sector={sector} len={data} op={op} latency_us={} status={}\n",
        c.latency.as_micros(),
        status[0]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::ready_queue;
    use vm_memory::Bytes;

    /// Guest RAM of 1 MiB with a ready 16-entry queue (rings at 0, 0x100, 0x180).
    fn guest() -> (GuestMemoryMmap, ActiveQueue) {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        (m, ready_queue())
    }

    /// Writes guest descriptor `i` and makes chain head `head` available at slot `k`.
    fn desc(m: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = 16 * u64::from(i);
        m.write_obj(addr, GuestAddress(at)).unwrap();
        m.write_obj(len, GuestAddress(at + 8)).unwrap();
        m.write_obj(flags, GuestAddress(at + 12)).unwrap();
        m.write_obj(next, GuestAddress(at + 14)).unwrap();
    }
    fn offer(m: &GuestMemoryMmap, k: u16, head: u16) {
        m.write_obj(head, GuestAddress(0x100 + 4 + 2 * u64::from(k % 16)))
            .unwrap();
        m.write_obj(k + 1, GuestAddress(0x102)).unwrap();
    }

    /// What the backend sees in the shadow ring: (head, [(addr, len, flags)]) per entry from
    /// position `from`.
    /// A shadow descriptor as the backend reads it: address, length, flags.
    type SeenDesc = (u64, u32, u16);

    fn backend_view(a: &ShadowArea, q: usize, from: u16) -> Vec<(u16, Vec<SeenDesc>)> {
        let s = a.mem();
        let base = q as u64 * PER_QUEUE;
        let idx: u16 = s.read_obj(GuestAddress(base + AVAIL_OFF + 2)).unwrap();
        (from..idx)
            .map(|p| {
                let head: u16 = s
                    .read_obj(GuestAddress(base + AVAIL_OFF + 4 + 2 * u64::from(p % 16)))
                    .unwrap();
                let mut d = Vec::new();
                let mut i = head;
                loop {
                    let at = base + 16 * u64::from(i);
                    let addr: u64 = s.read_obj(GuestAddress(at)).unwrap();
                    let len: u32 = s.read_obj(GuestAddress(at + 8)).unwrap();
                    let flags: u16 = s.read_obj(GuestAddress(at + 12)).unwrap();
                    let next: u16 = s.read_obj(GuestAddress(at + 14)).unwrap();
                    d.push((addr, len, flags));
                    if flags & F_NEXT == 0 {
                        break;
                    }
                    i = next;
                }
                (head, d)
            })
            .collect()
    }

    /// The backend uses shadow head `id` with `len` bytes.
    fn backend_use(a: &ShadowArea, q: usize, id: u16, len: u32) {
        let s = a.mem();
        let base = q as u64 * PER_QUEUE;
        let idx: u16 = s.read_obj(GuestAddress(base + USED_OFF + 2)).unwrap();
        let at = base + USED_OFF + 4 + 8 * u64::from(idx % 16);
        s.write_obj(u32::from(id), GuestAddress(at)).unwrap();
        s.write_obj(len, GuestAddress(at + 4)).unwrap();
        s.write_obj(idx.wrapping_add(1), GuestAddress(base + USED_OFF + 2))
            .unwrap();
    }

    fn guest_used(m: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx: u16 = m.read_obj(GuestAddress(0x182)).unwrap();
        (0..idx)
            .map(|k| {
                let at = 0x184 + 8 * u64::from(k % 16);
                (
                    m.read_obj(GuestAddress(at)).unwrap(),
                    m.read_obj(GuestAddress(at + 4)).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn chains_are_copied_to_the_shadow_and_completions_translated_back() {
        let (m, mut g) = guest();
        let a = ShadowArea::new(2).unwrap();
        a.place_above(&m);
        assert_eq!(a.gpa(), 2 << 20, "above 1 MiB of RAM, 2 MiB aligned");
        assert_eq!(a.region().guest_phys_addr, 2 << 20);
        let mut s = ShadowQueue::start(&a, 1, 16).unwrap();
        // Chain at guest head 5: readable 0x8000/16, writable 0x9000/100; head 9 alone.
        desc(&m, 5, 0x8000, 16, 1, 7);
        desc(&m, 7, 0x9000, 100, 2, 0);
        desc(&m, 9, 0xa000, 64, 0, 0);
        offer(&m, 0, 5);
        offer(&m, 1, 9);
        assert_eq!(s.forward(&a, &m, &mut g), Ok(2));
        assert_eq!(s.in_flight(), 2);
        let seen = backend_view(&a, 1, 0);
        assert_eq!(seen.len(), 2);
        assert_eq!(
            seen[0].1,
            vec![(0x8000, 16, F_NEXT), (0x9000, 100, F_WRITE)]
        );
        assert_eq!(seen[1].1, vec![(0xa000, 64, 0)]);
        // Completed out of order; a length beyond the chain's writable bytes is cut.
        backend_use(&a, 1, seen[1].0, 0);
        backend_use(&a, 1, seen[0].0, 5000);
        let (done, err) = s.reap(&a, &m, &mut g);
        assert!(err.is_none());
        assert_eq!(done.len(), 2);
        assert_eq!(guest_used(&m), vec![(9, 0), (5, 100)]);
        assert_eq!((s.in_flight(), s.forwarded, s.completed), (0, 2, 2));
        // The descriptors are free again: a whole queue's worth fits.
        for k in 2..18u16 {
            desc(&m, k % 16, 0xb000, 8, 0, 0);
            offer(&m, k, k % 16);
        }
        assert_eq!(s.forward(&a, &m, &mut g), Ok(16));
    }

    /// What the backend wrote into guest buffers is marked dirty for a migration, up to the
    /// length it used and across writable descriptors; what it only read is not.
    #[test]
    fn bytes_the_backend_wrote_are_marked_dirty() {
        use vm_memory::bitmap::Bitmap;
        let (m, mut g) = guest();
        let a = ShadowArea::new(1).unwrap();
        a.place_above(&m);
        let mut s = ShadowQueue::start(&a, 0, 16).unwrap();
        // Readable page 0x10000; writable 0x20000 (one page) then 0x30000 (two pages).
        desc(&m, 0, 0x10000, 64, 1, 1);
        desc(&m, 1, 0x20000, 4096, 1 | 2, 2);
        desc(&m, 2, 0x30000, 8192, 2, 0);
        offer(&m, 0, 0);
        assert_eq!(s.forward(&a, &m, &mut g), Ok(1));
        let r = m.find_region(GuestAddress(0)).unwrap();
        let whole: &vm_memory::MmapRegion<vm_memory::bitmap::AtomicBitmap> = r;
        whole.bitmap().reset();
        let dirty = |addr: usize| whole.bitmap().dirty_at(addr);
        let head = backend_view(&a, 0, 0)[0].0;
        // 4096 + 100 bytes: the first writable page and the first of the next two.
        backend_use(&a, 0, head, 4196);
        let (done, err) = s.reap(&a, &m, &mut g);
        assert!(err.is_none() && done.len() == 1);
        assert!(dirty(0x20000) && dirty(0x30000));
        assert!(!dirty(0x10000), "only read by the backend");
        assert!(!dirty(0x31000), "beyond the length used");
    }

    #[test]
    fn a_bad_chain_is_counted_and_stops_forwarding() {
        let (m, mut g) = guest();
        let a = ShadowArea::new(1).unwrap();
        a.place_above(&m);
        let mut s = ShadowQueue::start(&a, 0, 16).unwrap();
        // A buffer outside guest RAM (the shadow area's own address, say).
        desc(&m, 0, a.gpa(), 16, 0, 0);
        offer(&m, 0, 0);
        let e = s.forward(&a, &m, &mut g).unwrap_err();
        assert!(matches!(e, ShadowError::BadChain(_)), "{e}");
        assert_eq!(g.counters.bad_chains.load(Ordering::Relaxed), 1);
        assert_eq!(guest_used(&m), vec![(0, 0)], "completed empty");
        assert!(
            backend_view(&a, 0, 0).is_empty(),
            "nothing reached the backend"
        );
        // A loop.
        desc(&m, 1, 0x8000, 16, 1, 1);
        offer(&m, 1, 1);
        assert!(matches!(
            s.forward(&a, &m, &mut g),
            Err(ShadowError::BadChain(_))
        ));
        assert_eq!(g.counters.bad_chains.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_backend_naming_nothing_in_flight_is_refused() {
        let (m, mut g) = guest();
        let a = ShadowArea::new(1).unwrap();
        let mut s = ShadowQueue::start(&a, 0, 16).unwrap();
        desc(&m, 0, 0x8000, 16, 2, 0);
        offer(&m, 0, 0);
        s.forward(&a, &m, &mut g).unwrap();
        backend_use(&a, 0, 11, 4);
        let (done, err) = s.reap(&a, &m, &mut g);
        assert!(done.is_empty());
        assert_eq!(err, Some(ShadowError::BadUsed(11)));
        assert!(guest_used(&m).is_empty());
        // More used entries than were made available: only those are looked at.
        backend_use(&a, 0, 0, 1);
        backend_use(&a, 0, 0, 1);
        let (done, err) = s.reap(&a, &m, &mut g);
        assert!(done.is_empty() && err.is_some());
    }

    #[test]
    fn hand_back_rewinds_the_guest_over_what_the_backend_never_took() {
        let (m, mut g) = guest();
        let a = ShadowArea::new(1).unwrap();
        let mut s = ShadowQueue::start(&a, 0, 16).unwrap();
        for k in 0..5u16 {
            desc(&m, k, 0x8000 + 0x100 * u64::from(k), 64, 2, 0);
            offer(&m, k, k);
        }
        assert_eq!(s.forward(&a, &m, &mut g), Ok(5));
        assert_eq!(g.queue.next_avail(), 5);
        // The backend took two and used them, and a third it has not used.
        let seen = backend_view(&a, 0, 0);
        backend_use(&a, 0, seen[0].0, 64);
        backend_use(&a, 0, seen[1].0, 64);
        let (done, _) = s.reap(&a, &m, &mut g);
        assert_eq!(done.len(), 2);
        assert_eq!(s.taken_unused(3), 1, "the third is taken and not used");
        backend_use(&a, 0, seen[2].0, 10);
        s.reap(&a, &m, &mut g);
        assert_eq!(s.taken_unused(3), 0);
        assert_eq!(s.hand_back(3, &m, &mut g, false), Ok(2));
        assert_eq!(
            g.queue.next_avail(),
            3,
            "chains 3 and 4 go to the next server"
        );
        assert_eq!(guest_used(&m), vec![(0, 64), (1, 64), (2, 10)]);
    }

    #[test]
    fn hand_back_refuses_while_the_backend_holds_requests() {
        let (m, mut g) = guest();
        let a = ShadowArea::new(1).unwrap();
        let mut s = ShadowQueue::start(&a, 0, 16).unwrap();
        desc(&m, 0, 0x8000, 64, 2, 0);
        offer(&m, 0, 0);
        s.forward(&a, &m, &mut g).unwrap();
        let e = s.hand_back(1, &m, &mut g, false).unwrap_err();
        assert!(e.contains("1 request(s) taken and not completed"), "{e}");
    }

    #[test]
    fn queues_a_shadow_cannot_serve_are_refused() {
        let a = ShadowArea::new(1).unwrap();
        assert!(ShadowQueue::start(&a, 0, 512).is_err());
        assert!(ShadowQueue::start(&a, 0, 12).is_err());
        assert!(
            ShadowQueue::start(&a, 1, 16).is_err(),
            "no room for a second queue"
        );
    }

    #[test]
    fn pcap_files_have_the_classic_header_and_records() {
        let mut w = PcapWriter::new(Vec::new()).unwrap();
        w.frame(&[0xaa; 60]).unwrap();
        w.frame(&[0xbb; 1514]).unwrap();
        let b = w.out;
        assert_eq!(&b[0..4], &0xa1b2_c3d4u32.to_le_bytes());
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 1);
        assert_eq!(
            u32::from_le_bytes(b[24 + 8..24 + 12].try_into().unwrap()),
            60
        );
        assert_eq!(b.len(), 24 + 16 + 60 + 16 + 1514);
        assert_eq!(w.frames, 2);
    }
}
