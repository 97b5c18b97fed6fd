//! Pieces the devices' unit tests share: a ready 16-entry queue over rings the test wrote, a
//! guard that stops a descriptor-flipping thread however a race test ends, a disk that holds
//! each access until the test lets it through, and block read requests posted and checked in
//! guest memory.
#![allow(clippy::cast_possible_truncation)] // small test indexes

use crate::device::ActiveQueue;
use crate::GuestMemoryMmap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// A ready 16-entry queue whose descriptor table is at 0, available ring at 0x100 and used
/// ring at 0x180 (the test writes them).
pub(crate) fn ready_queue() -> ActiveQueue {
    let mut q = virtio_queue::Queue::new(16).unwrap();
    q.try_set_desc_table_address(GuestAddress(0)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(0x100)).unwrap();
    q.try_set_used_ring_address(GuestAddress(0x180)).unwrap();
    q.set_ready(true);
    ActiveQueue {
        queue: q,
        evt: EventFd::new(0).unwrap(),
        counters: Default::default(),
    }
}

/// Sets its flag when dropped: a flipping thread that polls the flag stops even when a check
/// of the test panics.
pub(crate) struct StopOnDrop(pub Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A disk whose reads and writes each wait for a permit: a test holds the device's worker in
/// the middle of a request for as long as it likes, without sleeping.
pub(crate) struct GatedDisk {
    pub(crate) inner: crate::block::MemDisk,
    pub(crate) gate: Arc<Gate>,
}

/// The gate of a [`GatedDisk`]: counts the accesses that entered and hands out permits.
#[derive(Default)]
pub(crate) struct Gate {
    st: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    entered: u32,
    permits: u32,
    open: bool,
}

/// How long a test waits for something that must happen before it fails.
pub(crate) const DEADLINE: Duration = Duration::from_secs(20);

impl Gate {
    fn pass(&self) {
        let mut st = self.st.lock().unwrap();
        st.entered += 1;
        self.cv.notify_all();
        while !st.open && st.permits == 0 {
            st = self.cv.wait(st).unwrap();
        }
        if !st.open {
            st.permits -= 1;
        }
    }

    /// Accesses that reached the disk so far.
    pub(crate) fn entered(&self) -> u32 {
        self.st.lock().unwrap().entered
    }

    /// Waits until `n` accesses reached the disk.
    pub(crate) fn wait_entered(&self, n: u32) {
        let st = self.st.lock().unwrap();
        let (st, t) = self
            .cv
            .wait_timeout_while(st, DEADLINE, |st| st.entered < n)
            .unwrap();
        assert!(!t.timed_out(), "{} of {n} disk accesses", st.entered);
    }

    /// Lets `n` more accesses through.
    pub(crate) fn release(&self, n: u32) {
        self.st.lock().unwrap().permits += n;
        self.cv.notify_all();
    }

    /// Lets every access through from now on.
    pub(crate) fn open(&self) {
        self.st.lock().unwrap().open = true;
        self.cv.notify_all();
    }
}

impl crate::block::Disk for GatedDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn readonly(&self) -> bool {
        self.inner.readonly()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.gate.pass();
        self.inner.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.gate.pass();
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

/// An 8-sector disk in memory whose sector `s` is filled with `s + 1`.
pub(crate) fn patterned_disk() -> crate::block::MemDisk {
    crate::block::MemDisk {
        data: (0..8 * 512).map(|i| (i / 512) as u8 + 1).collect(),
        ro: false,
        flushed: false,
    }
}

/// Where the block-request tests put their rings (queues of up to 64 entries).
pub(crate) const BLK_DESC: u64 = 0x1000;
/// Available ring.
pub(crate) const BLK_AVAIL: u64 = 0x2000;
/// Used ring.
pub(crate) const BLK_USED: u64 = 0x3000;
/// Queue size the block-request tests set up.
pub(crate) const BLK_QSIZE: u16 = 64;

/// Writes read request `k` (sector `k % 8` into a 512-byte buffer of its own; descriptors
/// 3k..3k+2) and publishes it: available ring entry `k`, index `k + 1`.
pub(crate) fn post_read(mem: &GuestMemoryMmap, k: u16) {
    let (hdr, data, status) = blk_buffers(k);
    mem.write_obj(crate::block::req::IN, GuestAddress(hdr))
        .unwrap();
    mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
    mem.write_obj(u64::from(k % 8), GuestAddress(hdr + 8))
        .unwrap();
    mem.write_obj(0xeeu8, GuestAddress(status)).unwrap();
    let first = 3 * k;
    let descs = [
        (hdr, 16u32, 1u16, first + 1),
        (data, 512, 1 | 2, first + 2),
        (status, 1, 2, 0),
    ];
    for (i, (addr, len, flags, next)) in descs.into_iter().enumerate() {
        let at = BLK_DESC + 16 * u64::from(first + i as u16);
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }
    let slot = u64::from(k % BLK_QSIZE);
    mem.write_obj(first, GuestAddress(BLK_AVAIL + 4 + 2 * slot))
        .unwrap();
    mem.write_obj(k + 1, GuestAddress(BLK_AVAIL + 2)).unwrap();
}

/// (header, data, status) addresses of request `k`.
fn blk_buffers(k: u16) -> (u64, u64, u64) {
    let k = u64::from(k);
    (0x1_0000 + 16 * k, 0x2_0000 + 512 * k, 0x1_8000 + k)
}

/// The used ring's index.
pub(crate) fn used_idx(mem: &GuestMemoryMmap) -> u16 {
    mem.read_obj(GuestAddress(BLK_USED + 2)).unwrap()
}

/// Checks that request `k` completed in used-ring entry `k` with status OK and its sector's
/// contents.
pub(crate) fn check_read(mem: &GuestMemoryMmap, k: u16) {
    let (_, data, status) = blk_buffers(k);
    let at = BLK_USED + 4 + 8 * u64::from(k % BLK_QSIZE);
    let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
    let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
    assert_eq!((id, len), (3 * u32::from(k), 513), "used entry {k}");
    assert_eq!(mem.read_obj::<u8>(GuestAddress(status)).unwrap(), 0);
    let mut buf = [0u8; 512];
    mem.read_slice(&mut buf, GuestAddress(data)).unwrap();
    assert!(buf.iter().all(|&b| b == (k % 8) as u8 + 1), "data of {k}");
}

/// Whether `evt` has a count (without taking it).
pub(crate) fn readable(evt: &EventFd) -> bool {
    let mut p = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(evt),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a zero timeout does not block.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

/// Waits, interrupt by interrupt on `irq`, until the used index reaches `n`.
pub(crate) fn wait_used(mem: &GuestMemoryMmap, n: u16, irq: &EventFd) {
    let end = std::time::Instant::now() + DEADLINE;
    while used_idx(mem) < n {
        let left = end.saturating_duration_since(std::time::Instant::now());
        let mut p = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(irq),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(0);
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        assert!(
            r == 1,
            "used index {} of {n} and no interrupt within {DEADLINE:?}",
            used_idx(mem)
        );
        let _ = irq.read();
    }
    assert_eq!(used_idx(mem), n, "more completions than requests");
}

/// A copy of guest memory `mem` (one region at 0).
pub(crate) fn copy_memory(mem: &GuestMemoryMmap, size: usize) -> GuestMemoryMmap {
    let copy = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap();
    let mut buf = vec![0u8; size];
    mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
    copy.write_slice(&buf, GuestAddress(0)).unwrap();
    copy
}

/// Interrupts as counts on an eventfd (any queue, and configuration changes).
pub(crate) struct EvtIrq(pub EventFd);

impl crate::device::Interrupt for EvtIrq {
    fn queue(&self, _index: usize) {
        let _ = self.0.write(1);
    }
    fn config(&self) {
        let _ = self.0.write(1);
    }
}
