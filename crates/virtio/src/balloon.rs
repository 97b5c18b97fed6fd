//! virtio-balloon (device type 5): the host asks the guest for memory back and the guest lends
//! it. Owns the balloon's queues (inflate, deflate, statistics, free page reporting), its
//! configuration (`num_pages`, the host's target; `actual`, the guest's answer), the set of
//! guest pages currently in the balloon, and the release of those pages to the host.
//!
//! - **Inflate** (queue 0): chains of little-endian `u32` page frame numbers (4 KiB pages). Every
//!   PFN is checked to name a page of guest RAM (not a hole, not beyond the end); a bad one is
//!   counted and skipped. Good pages are released to the host: `MADV_DONTNEED` for private
//!   memory, `MADV_REMOVE` (a hole punched in the memfd) for shared memory. A page inflated
//!   twice is counted (`repeated_pfns`) and released once. At most [`MAX_PFN_BYTES`] of PFNs
//!   are served from one chain; a longer one is counted as a bad request.
//! - **Deflate** (queue 1): the pages return to the guest; nothing to do but account (a
//!   released page reads as zero when next touched, and only then costs host memory).
//! - **Statistics** (queue 2 with `VIRTIO_BALLOON_F_STATS_VQ`): the driver posts a buffer of
//!   `(u16 tag, u64 value)` entries; the device keeps the last values and holds the buffer
//!   until [`BalloonHandle::request_stats`] gives it back, which asks the driver for fresh ones.
//! - **Free page reporting** (the next queue with `VIRTIO_BALLOON_F_PAGE_REPORTING`): chains of
//!   buffers that each span free guest memory; the whole pages inside are released like
//!   inflated ones, and stay the guest's (no accounting in the balloon).
//!
//! The host side ([`BalloonHandle`]) sets the target and reads the counters; the transport
//! signals the configuration change ([`crate::VirtioPci::config_changed`]).
#![allow(clippy::cast_possible_truncation)] // page counts of guest RAM fit u32 by the spec

use crate::chain::Chain;
use crate::device::{ActiveQueue, DeviceState, Interrupt, VirtioDevice, Worker, WorkerCtl};
use crate::{GuestMemoryMmap, F_VERSION_1};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex, MutexGuard};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Virtio device type of a balloon.
pub const DEVICE_TYPE: u16 = 5;
/// VIRTIO_BALLOON_F_STATS_VQ: the statistics queue.
pub const F_STATS_VQ: u64 = 1 << 1;
/// VIRTIO_BALLOON_F_PAGE_REPORTING: the free page reporting queue.
pub const F_PAGE_REPORTING: u64 = 1 << 5;
/// The balloon's page size (fixed by the specification).
pub const PAGE_SIZE: u64 = 4096;
/// Bytes of the configuration space (num_pages, actual, free_page_hint_cmd_id, poison_val).
pub const CONFIG_SIZE: usize = 16;
const QUEUE_SIZE: u16 = 256;
/// PFNs read from a chain at once.
const PFN_BATCH: usize = 1024;
/// Bytes of PFNs served from one chain (256 Ki pages, 1 GiB of guest memory; Linux sends 256
/// PFNs at a time): the rest of a longer chain is not served, so that one chain cannot hold
/// the worker (and a pause) for long.
pub const MAX_PFN_BYTES: u64 = 1 << 20;
/// Statistics entries read from one buffer at most (the specification defines ten tags).
const MAX_STATS: usize = 64;
/// Bytes of one statistics entry (`le16 tag; le64 val`, packed).
const STAT_SIZE: usize = 10;

/// The statistics tags of the specification, by number, with the names reported.
pub const STAT_NAMES: [&str; 10] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
];

/// What the balloon did since the VM started (kept across snapshots).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonCounters {
    /// Pages the guest put into the balloon (each released to the host).
    pub inflated_pages: u64,
    /// Pages the guest took back out.
    pub deflated_pages: u64,
    /// Pages released because the guest reported them free.
    pub reported_pages: u64,
    /// PFNs outside guest RAM (beyond its end or in a hole), skipped.
    pub bad_pfns: u64,
    /// PFNs inflated while already in the balloon, or deflated while not in it.
    pub repeated_pfns: u64,
    /// Malformed chains (truncated PFN lists, unreadable buffers, bad statistics).
    pub bad_requests: u64,
    /// Releases the host refused (`madvise` failed); the pages stay backed.
    pub release_errors: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
}

/// The last statistics the guest sent: `(tag, value)`, known tags only, in tag order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStats(pub Vec<(u16, u64)>);

impl BalloonStats {
    /// The value of tag `tag`, if the guest sent it.
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.0.iter().find(|(t, _)| *t == tag).map(|(_, v)| *v)
    }

    /// The statistics as a JSON-ready map from [`STAT_NAMES`] to values.
    pub fn named(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.0
            .iter()
            .filter_map(|&(t, v)| Some((*STAT_NAMES.get(usize::from(t))?, v)))
            .collect()
    }
}

/// The balloon's state in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonState {
    /// Guest RAM in bytes when saved (the balloon restores only into the same size).
    pub ram_bytes: u64,
    /// The host's target, in pages.
    pub num_pages: u32,
    /// What the guest last wrote to `actual`.
    pub actual: u32,
    /// The pages in the balloon, as `(first PFN, count)` runs.
    pub ballooned: Vec<(u64, u64)>,
    /// Counters.
    pub counters: BalloonCounters,
    /// The last statistics.
    pub stats: BalloonStats,
    /// The statistics buffer the device holds (its head index), if any.
    pub stats_head: Option<u16>,
}

/// Pages currently in the balloon: one bit per page of guest-physical address space below
/// the end of RAM (allocated at the first inflate).
#[derive(Default)]
struct PageSet {
    bits: Vec<u64>,
    count: u64,
}

impl PageSet {
    /// Adds `pfn` (a page of guest RAM, so the set stays as small as RAM's address space);
    /// false if it was there already.
    fn insert(&mut self, pfn: u64) -> bool {
        let (w, b) = ((pfn / 64) as usize, pfn % 64);
        if w >= self.bits.len() {
            self.bits.resize(w + 1, 0);
        }
        match self.bits.get_mut(w) {
            Some(x) if *x & (1 << b) == 0 => {
                *x |= 1 << b;
                self.count += 1;
                true
            }
            _ => false,
        }
    }

    /// Removes `pfn`; false if it was not there.
    fn remove(&mut self, pfn: u64) -> bool {
        let (w, b) = ((pfn / 64) as usize, pfn % 64);
        match self.bits.get_mut(w) {
            Some(x) if *x & (1 << b) != 0 => {
                *x &= !(1 << b);
                self.count -= 1;
                true
            }
            _ => false,
        }
    }

    fn clear(&mut self) {
        self.bits = Vec::new();
        self.count = 0;
    }

    fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (w, &x) in self.bits.iter().enumerate() {
            if x == 0 {
                continue;
            }
            for b in 0..64u64 {
                if x & (1 << b) == 0 {
                    continue;
                }
                let pfn = w as u64 * 64 + b;
                match out.last_mut() {
                    Some((s, n)) if *s + *n == pfn => *n += 1,
                    _ => out.push((pfn, 1)),
                }
            }
        }
        out
    }
}

struct Inner {
    num_pages: u32,
    actual: u32,
    pages: PageSet,
    counters: BalloonCounters,
    stats: BalloonStats,
    /// The statistics buffer the device holds until it wants fresh values.
    stats_head: Option<u16>,
    /// Asked for fresh statistics: the worker gives the held buffer back.
    stats_wanted: bool,
    /// Wakes the worker on the statistics queue (a clone of its eventfd), while active.
    stats_evt: Option<EventFd>,
}

struct Shared {
    ram_bytes: u64,
    st: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The host's side of a balloon: its target, and what it did.
#[derive(Clone)]
pub struct BalloonHandle(Arc<Shared>);

/// What [`BalloonHandle::status`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalloonStatus {
    /// The host's target (`num_pages`), in pages.
    pub target_pages: u32,
    /// What the guest last wrote to `actual`, in pages.
    pub actual_pages: u32,
    /// Pages the device holds as inflated (what the host released).
    pub ballooned_pages: u64,
    /// Counters.
    pub counters: BalloonCounters,
    /// The last statistics.
    pub stats: BalloonStats,
}

impl BalloonHandle {
    /// Guest RAM in bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.0.ram_bytes
    }

    /// Sets the target to `pages` (the caller checked it against RAM); the caller then signals
    /// the configuration change through the transport. Returns whether it changed.
    pub fn set_target(&self, pages: u32) -> bool {
        let mut st = self.0.lock();
        let changed = st.num_pages != pages;
        st.num_pages = pages;
        changed
    }

    /// The target, `actual`, the pages held, counters and last statistics.
    pub fn status(&self) -> BalloonStatus {
        let st = self.0.lock();
        BalloonStatus {
            target_pages: st.num_pages,
            actual_pages: st.actual,
            ballooned_pages: st.pages.count,
            counters: st.counters,
            stats: st.stats.clone(),
        }
    }

    /// Asks the driver for fresh statistics: the buffer the device holds goes back to it (now,
    /// or as soon as the driver posts one). Does nothing without a statistics queue.
    pub fn request_stats(&self) {
        let mut st = self.0.lock();
        st.stats_wanted = true;
        if let Some(e) = &st.stats_evt {
            let _ = e.write(1);
        }
    }
}

/// The balloon device.
pub struct Balloon {
    shared: Arc<Shared>,
    worker: Option<Worker>,
}

impl Balloon {
    /// A balloon for a VM of `ram_bytes` of RAM, empty, target 0.
    pub fn new(ram_bytes: u64) -> Balloon {
        Balloon {
            shared: Arc::new(Shared {
                ram_bytes,
                st: Mutex::new(Inner {
                    num_pages: 0,
                    actual: 0,
                    pages: PageSet::default(),
                    counters: BalloonCounters::default(),
                    stats: BalloonStats::default(),
                    stats_head: None,
                    stats_wanted: false,
                    stats_evt: None,
                }),
            }),
            worker: None,
        }
    }

    /// The host's handle.
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle(self.shared.clone())
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let st = self.shared.lock();
        let mut c = [0u8; CONFIG_SIZE];
        c[0..4].copy_from_slice(&st.num_pages.to_le_bytes());
        c[4..8].copy_from_slice(&st.actual.to_le_bytes());
        c
    }
}

/// What a queue of the balloon carries (queue numbers depend on the accepted features).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// PFNs given to the host.
    Inflate,
    /// PFNs taken back.
    Deflate,
    /// Memory statistics.
    Stats,
    /// Free page reports.
    Reporting,
    /// Not used with these features.
    Unused,
}

/// The role of each of the device's four queues under `features`: inflate and deflate, then
/// statistics and reporting in that order, each only if accepted (the driver numbers the
/// queues it uses consecutively).
pub fn roles(features: u64) -> [Role; 4] {
    let mut r = [Role::Inflate, Role::Deflate, Role::Unused, Role::Unused];
    let mut next = 2;
    if features & F_STATS_VQ != 0 {
        r[next] = Role::Stats;
        next += 1;
    }
    if features & F_PAGE_REPORTING != 0 {
        r[next] = Role::Reporting;
    }
    r
}

/// Releases guest range `gpa..gpa + len` (inside RAM, checked by the caller) to the host.
fn release(mem: &GuestMemoryMmap, mut gpa: u64, mut len: u64) -> std::io::Result<()> {
    while len > 0 {
        let Some((r, off)) = mem.to_region_addr(GuestAddress(gpa)) else {
            return Err(std::io::Error::from_raw_os_error(libc::EFAULT));
        };
        let n = (r.len() - off.0).min(len);
        let host = r
            .get_host_address(off)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EFAULT))?;
        let shared = r.file_offset().is_some() && r.flags() & libc::MAP_SHARED != 0;
        let advice = if shared {
            libc::MADV_REMOVE
        } else {
            libc::MADV_DONTNEED
        };
        // SAFETY: `host..host + n` lies inside one mapping of guest RAM (the region's), which
        // stays mapped for the VM's life; dropping or removing its pages only makes them read
        // as zero when next touched, which is what the guest agreed to by giving them up.
        let rc = unsafe { libc::madvise(host.cast(), n as usize, advice) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        gpa += n;
        len -= n;
    }
    Ok(())
}

/// Whether page `pfn` is guest RAM.
fn is_ram(mem: &GuestMemoryMmap, pfn: u64) -> bool {
    pfn.checked_mul(PAGE_SIZE)
        .is_some_and(|a| mem.check_range(GuestAddress(a), PAGE_SIZE as usize))
}

/// Releases the runs of `pfns` (already accounted) in as few calls as possible.
fn release_pfns(mem: &GuestMemoryMmap, pfns: &mut [u64], st: &mut Inner) {
    pfns.sort_unstable();
    let mut i = 0;
    while i < pfns.len() {
        let mut j = i + 1;
        while j < pfns.len() && pfns[j] == pfns[j - 1] + 1 {
            j += 1;
        }
        let (gpa, len) = (pfns[i] * PAGE_SIZE, (j - i) as u64 * PAGE_SIZE);
        // A run may straddle two regions only where they touch; release walks regions.
        if release(mem, gpa, len).is_err() {
            st.counters.release_errors += 1;
        }
        i = j;
    }
}

/// Serves one inflate (`inflate`) or deflate chain: reads its PFNs once, in batches.
fn serve_pfns(mem: &GuestMemoryMmap, shared: &Shared, c: &Chain, inflate: bool) {
    let mut total = u64::from(c.readable_bytes());
    let mut buf = vec![0u8; 4 * PFN_BATCH];
    let mut pfns = Vec::with_capacity(PFN_BATCH);
    let mut off = 0u64;
    let mut st = shared.lock();
    if !total.is_multiple_of(4) || total > MAX_PFN_BYTES {
        st.counters.bad_requests += 1;
        total = total.min(MAX_PFN_BYTES);
    }
    while off + 4 <= total {
        let n = ((total - off) / 4).min(PFN_BATCH as u64) as usize;
        if c.read_at(mem, off, &mut buf[..4 * n]).is_err() {
            st.counters.bad_requests += 1;
            return;
        }
        off += 4 * n as u64;
        pfns.clear();
        for w in buf[..4 * n].chunks_exact(4) {
            let pfn = u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
            if !is_ram(mem, pfn) {
                st.counters.bad_pfns += 1;
            } else if inflate {
                if st.pages.insert(pfn) {
                    st.counters.inflated_pages += 1;
                    pfns.push(pfn);
                } else {
                    st.counters.repeated_pfns += 1;
                }
            } else if st.pages.remove(pfn) {
                st.counters.deflated_pages += 1;
            } else {
                st.counters.repeated_pfns += 1;
            }
        }
        if inflate {
            release_pfns(mem, &mut pfns, &mut st);
        }
    }
}

/// Serves one free page report: every whole page inside each buffer is released.
fn serve_report(mem: &GuestMemoryMmap, shared: &Shared, c: &Chain) {
    let mut st = shared.lock();
    for d in c.descs() {
        // Inside guest RAM (Chain::read checked it); only whole pages are given up.
        let start = d.addr.next_multiple_of(PAGE_SIZE);
        let end = (d.addr + u64::from(d.len)) / PAGE_SIZE * PAGE_SIZE;
        if end <= start {
            continue;
        }
        if release(mem, start, end - start).is_err() {
            st.counters.release_errors += 1;
        } else {
            st.counters.reported_pages += (end - start) / PAGE_SIZE;
        }
    }
}

/// Reads one statistics buffer into the last statistics.
fn read_stats(mem: &GuestMemoryMmap, shared: &Shared, c: &Chain) {
    let n = (c.readable_bytes() as usize / STAT_SIZE).min(MAX_STATS);
    let mut buf = vec![0u8; n * STAT_SIZE];
    let mut st = shared.lock();
    if !(c.readable_bytes() as usize).is_multiple_of(STAT_SIZE)
        || c.read_at(mem, 0, &mut buf).is_err()
    {
        st.counters.bad_requests += 1;
        return;
    }
    let mut stats: Vec<(u16, u64)> = Vec::new();
    for e in buf.chunks_exact(STAT_SIZE) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let mut v = [0u8; 8];
        v.copy_from_slice(&e[2..10]);
        if usize::from(tag) < STAT_NAMES.len() {
            match stats.iter_mut().find(|(t, _)| *t == tag) {
                Some(s) => s.1 = u64::from_le_bytes(v),
                None => stats.push((tag, u64::from_le_bytes(v))),
            }
        }
    }
    stats.sort_unstable();
    st.stats = BalloonStats(stats);
    st.counters.stats_updates += 1;
}

/// Serves queue `q` in role `role`; returns whether a chain was used (an interrupt is due).
pub fn serve(
    mem: &GuestMemoryMmap,
    balloon: &BalloonHandle,
    q: &mut ActiveQueue,
    role: Role,
    stop: impl Fn() -> bool,
) -> bool {
    let shared = &*balloon.0;
    let mut used = false;
    if role == Role::Stats {
        // Give the held buffer back when fresh statistics are wanted.
        let mut st = shared.lock();
        if st.stats_wanted {
            if let Some(head) = st.stats_head.take() {
                st.stats_wanted = false;
                if q.queue.add_used(mem, head, 0).is_ok() {
                    used = true;
                }
            }
        }
    }
    while !stop() {
        let Some(chain) = q.queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        match (Chain::read(mem, chain, crate::chain::MAX_CHAIN), role) {
            (Ok(c), Role::Inflate) => serve_pfns(mem, shared, &c, true),
            (Ok(c), Role::Deflate) => serve_pfns(mem, shared, &c, false),
            (Ok(c), Role::Reporting) => serve_report(mem, shared, &c),
            (Ok(c), Role::Stats) => {
                read_stats(mem, shared, &c);
                let mut st = shared.lock();
                // Fresh values: what a request for statistics waited for. A driver posts one
                // buffer at a time; an earlier one still held goes back.
                st.stats_wanted = false;
                let previous = st.stats_head.replace(head);
                drop(st);
                if let Some(h) = previous {
                    if q.queue.add_used(mem, h, 0).is_ok() {
                        used = true;
                    }
                }
                continue;
            }
            (_, _) => shared.lock().counters.bad_requests += 1,
        }
        if q.queue.add_used(mem, head, 0).is_err() {
            break;
        }
        used = true;
    }
    used
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_STATS_VQ | F_PAGE_REPORTING
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 4]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::device::read_config_window(&self.config_bytes(), offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's; a partial write changes those bytes.
        let mut st = self.shared.lock();
        let mut actual = st.actual.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            let at = offset.saturating_add(i as u64);
            if (4..8).contains(&at) {
                actual[(at - 4) as usize] = *b;
            }
        }
        st.actual = u32::from_le_bytes(actual);
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<ActiveQueue>,
        irq: Arc<dyn Interrupt>,
        ctl: Arc<WorkerCtl>,
    ) -> Result<(), String> {
        let roles = roles(features);
        let stats_evt = match roles.iter().position(|r| *r == Role::Stats) {
            Some(i) => Some(
                queues[i]
                    .evt
                    .try_clone()
                    .map_err(|e| format!("virtio-balloon statistics queue: {e}"))?,
            ),
            None => None,
        };
        let wanted = {
            let mut st = self.shared.lock();
            st.stats_evt = stats_evt;
            st.stats_wanted
        };
        let handle = self.handle();
        let worker = Worker::start("virtio-balloon", queues, ctl, move |qs, i, ctl| {
            let role = roles.get(i).copied().unwrap_or(Role::Unused);
            if role == Role::Unused {
                return;
            }
            if serve(&mem, &handle, &mut qs[i], role, || ctl.pausing())
                && qs[i].queue.needs_notification(&mem).unwrap_or(true)
            {
                irq.queue(i);
            }
        })
        .map_err(|e| format!("starting the virtio-balloon worker: {e}"))?;
        self.worker = Some(worker);
        if wanted {
            self.handle().request_stats();
        }
        Ok(())
    }
    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
        // The driver started over: every page is the guest's again.
        let mut st = self.shared.lock();
        st.stats_evt = None;
        st.stats_head = None;
        st.actual = 0;
        st.pages.clear();
    }
    fn save_state(&self) -> DeviceState {
        let st = self.shared.lock();
        DeviceState::Balloon(BalloonState {
            ram_bytes: self.shared.ram_bytes,
            num_pages: st.num_pages,
            actual: st.actual,
            ballooned: st.pages.runs(),
            counters: st.counters,
            stats: st.stats.clone(),
            stats_head: st.stats_head,
        })
    }
    fn restore_state(&mut self, state: DeviceState) -> Result<(), String> {
        let s = match state {
            DeviceState::Balloon(s) => s,
            other => {
                return Err(format!(
                    "a {} state cannot be restored into a virtio-balloon device",
                    other.kind()
                ))
            }
        };
        if s.ram_bytes != self.shared.ram_bytes {
            return Err(format!(
                "virtio-balloon state: saved for {} bytes of RAM, this VM has {}",
                s.ram_bytes, self.shared.ram_bytes
            ));
        }
        // RAM plus at most 4 GiB of holes below it: a bound on any PFN of guest RAM.
        let limit = (s.ram_bytes + (4 << 30)) / PAGE_SIZE;
        let mut pages = PageSet::default();
        for &(first, n) in &s.ballooned {
            let end = first.checked_add(n).filter(|&e| e <= limit);
            let Some(end) = end else {
                return Err(format!(
                    "virtio-balloon state: pages {first}+{n} lie beyond guest memory"
                ));
            };
            for pfn in first..end {
                pages.insert(pfn);
            }
        }
        let mut st = self.shared.lock();
        st.num_pages = s.num_pages;
        st.actual = s.actual;
        st.pages = pages;
        st.counters = s.counters;
        st.stats = s.stats;
        st.stats_head = s.stats_head;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::ready_queue;
    use vm_memory::Bytes;

    /// 1 MiB of RAM at 0, a 1 MiB hole, 1 MiB at 2 MiB.
    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(2 << 20), 1 << 20),
        ])
        .unwrap()
    }

    /// Posts the `k`-th chain (available slot `k`) of `bufs` (addr, len, flags) at descriptors
    /// 0.. of the 16-entry test queue.
    fn post(mem: &GuestMemoryMmap, k: u16, bufs: &[(u64, u32, u16)]) {
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let at = 16 * i as u64;
            let next = if i + 1 < bufs.len() { 1 } else { 0 };
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags | next, GuestAddress(at + 12)).unwrap();
            mem.write_obj(u16::try_from(i + 1).unwrap(), GuestAddress(at + 14))
                .unwrap();
        }
        mem.write_obj(0u16, GuestAddress(0x104 + 2 * u64::from(k % 16)))
            .unwrap();
        mem.write_obj(k + 1, GuestAddress(0x102)).unwrap();
    }

    /// Writes `pfns` at 0x8000 and posts them as chain `k`.
    fn post_pfns(mem: &GuestMemoryMmap, k: u16, pfns: &[u32]) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(0x8000)).unwrap();
        post(mem, k, &[(0x8000, u32::try_from(bytes.len()).unwrap(), 0)]);
    }

    fn used_idx(mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(0x182)).unwrap()
    }

    fn fill(mem: &GuestMemoryMmap, pfn: u64) {
        mem.write_slice(&[0xa5; 4096], GuestAddress(pfn * PAGE_SIZE))
            .unwrap();
    }

    fn is_zero(mem: &GuestMemoryMmap, pfn: u64) -> bool {
        let mut b = [1u8; 4096];
        mem.read_slice(&mut b, GuestAddress(pfn * PAGE_SIZE))
            .unwrap();
        b.iter().all(|&x| x == 0)
    }

    #[test]
    fn inflate_releases_good_pages_and_counts_bad_ones() {
        let mem = memory();
        let b = Balloon::new(2 << 20);
        let h = b.handle();
        let mut q = ready_queue();
        for pfn in [0x20, 0x21, 0x22, 0x205, 0x40] {
            fill(&mem, pfn);
        }
        // 0x100..0x1ff is the hole, 0x300 beyond the end, u32::MAX far beyond.
        post_pfns(
            &mem,
            0,
            &[0x20, 0x21, 0x22, 0x205, 0x150, 0x300, u32::MAX, 0x21],
        );
        assert!(serve(&mem, &h, &mut q, Role::Inflate, || false));
        assert_eq!(used_idx(&mem), 1);
        for pfn in [0x20, 0x21, 0x22, 0x205] {
            assert!(is_zero(&mem, pfn), "page {pfn:#x} released");
        }
        assert!(!is_zero(&mem, 0x40), "a page not inflated keeps its bytes");
        let s = h.status();
        assert_eq!(s.ballooned_pages, 4);
        assert_eq!(s.counters.inflated_pages, 4);
        assert_eq!(s.counters.bad_pfns, 3);
        assert_eq!(s.counters.repeated_pfns, 1);
        assert_eq!(s.counters.release_errors, 0);

        // Deflate two, one of them twice, and one never inflated.
        post_pfns(&mem, 1, &[0x20, 0x205, 0x20, 0x40, 0x7fff_ffff]);
        assert!(serve(&mem, &h, &mut q, Role::Deflate, || false));
        let s = h.status();
        assert_eq!(s.ballooned_pages, 2);
        assert_eq!(s.counters.deflated_pages, 2);
        assert_eq!(s.counters.repeated_pfns, 3);
        assert_eq!(s.counters.bad_pfns, 4);
        // A deflated page is the guest's again: usable, and zero until written.
        fill(&mem, 0x20);
        assert!(!is_zero(&mem, 0x20));
    }

    #[test]
    fn malformed_chains_are_counted_and_completed() {
        let mem = memory();
        let b = Balloon::new(2 << 20);
        let h = b.handle();
        let mut q = ready_queue();
        fill(&mem, 0x30);
        // A PFN list with a stray byte: the whole PFNs are served, the request counted bad.
        mem.write_obj(0x30u32, GuestAddress(0x8000)).unwrap();
        post(&mem, 0, &[(0x8000, 5, 0)]);
        assert!(serve(&mem, &h, &mut q, Role::Inflate, || false));
        assert!(is_zero(&mem, 0x30));
        // A buffer outside RAM: refused whole, completed.
        post(&mem, 1, &[(0x1ff000, 0x2000, 0)]);
        assert!(serve(&mem, &h, &mut q, Role::Inflate, || false));
        assert_eq!(used_idx(&mem), 2);
        let s = h.status();
        assert_eq!((s.counters.inflated_pages, s.counters.bad_requests), (1, 2));
        // A huge inflate: 16384 PFNs from the hole up, of which only the 256 pages of the
        // second region are RAM.
        let many: Vec<u32> = (0x100..0x100 + 16384).collect();
        post_pfns(&mem, 2, &many);
        assert!(serve(&mem, &h, &mut q, Role::Inflate, || false));
        let s = h.status();
        assert_eq!(s.ballooned_pages, 1 + 256, "only pages of RAM");
        assert_eq!(s.counters.bad_pfns, 16384 - 256);
        assert_eq!(s.counters.repeated_pfns, 0);
    }

    #[test]
    fn an_overlong_pfn_list_is_cut() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let h = Balloon::new(4 << 20).handle();
        let mut q = ready_queue();
        // 1 MiB + 8 bytes of PFNs, all of page 0x300 (RAM): served up to the cap.
        let n = (MAX_PFN_BYTES / 4 + 2) as usize;
        let bytes: Vec<u8> = std::iter::repeat_n(0x300u32.to_le_bytes(), n)
            .flatten()
            .collect();
        mem.write_slice(&bytes, GuestAddress(0x1_0000)).unwrap();
        post(
            &mem,
            0,
            &[(0x1_0000, u32::try_from(bytes.len()).unwrap(), 0)],
        );
        assert!(serve(&mem, &h, &mut q, Role::Inflate, || false));
        let c = h.status().counters;
        assert_eq!((c.inflated_pages, c.bad_requests), (1, 1));
        assert_eq!(
            c.repeated_pfns,
            MAX_PFN_BYTES / 4 - 1,
            "the 2 past the cap unread"
        );
    }

    #[test]
    fn a_pause_leaves_chains_for_later() {
        let mem = memory();
        let h = Balloon::new(2 << 20).handle();
        let mut q = ready_queue();
        post_pfns(&mem, 0, &[0x20]);
        assert!(!serve(&mem, &h, &mut q, Role::Inflate, || true));
        assert_eq!(used_idx(&mem), 0);
        assert!(serve(&mem, &h, &mut q, Role::Inflate, || false));
        assert_eq!(h.status().ballooned_pages, 1);
    }

    #[test]
    fn free_page_reports_release_whole_pages() {
        let mem = memory();
        let h = Balloon::new(2 << 20).handle();
        let mut q = ready_queue();
        for pfn in 0x40..0x48 {
            fill(&mem, pfn);
        }
        fill(&mem, 0x210);
        // Pages 0x41..0x46 whole (the ends are partial pages), and page 0x210: writable
        // buffers, as Linux reports them.
        post(&mem, 0, &[(0x40800, 0x6000, 2), (0x210000, 0x1000, 2)]);
        assert!(serve(&mem, &h, &mut q, Role::Reporting, || false));
        assert!(!is_zero(&mem, 0x40) && !is_zero(&mem, 0x46));
        for pfn in 0x41..0x46 {
            assert!(is_zero(&mem, pfn));
        }
        assert!(is_zero(&mem, 0x210));
        let s = h.status();
        assert_eq!(s.counters.reported_pages, 6);
        assert_eq!(s.ballooned_pages, 0, "reported pages stay the guest's");
    }

    #[test]
    fn statistics_are_kept_and_the_buffer_held_until_asked() {
        let mem = memory();
        let h = Balloon::new(2 << 20).handle();
        let mut q = ready_queue();
        let entry = |tag: u16, v: u64| {
            let mut e = tag.to_le_bytes().to_vec();
            e.extend_from_slice(&v.to_le_bytes());
            e
        };
        let mut buf = entry(4, 1000);
        buf.extend(entry(5, 2000));
        buf.extend(entry(99, 7)); // unknown tag: ignored
        buf.extend(entry(6, 1500));
        mem.write_slice(&buf, GuestAddress(0x9000)).unwrap();
        post(&mem, 0, &[(0x9000, 40, 0)]);
        assert!(!serve(&mem, &h, &mut q, Role::Stats, || false), "held");
        assert_eq!(used_idx(&mem), 0);
        let s = h.status();
        assert_eq!(s.stats.0, vec![(4, 1000), (5, 2000), (6, 1500)]);
        assert_eq!(s.stats.named()["available_memory"], 1500);
        assert_eq!(s.counters.stats_updates, 1);
        // Asked for fresh values: the buffer goes back (the worker is woken on the queue).
        h.request_stats();
        assert!(serve(&mem, &h, &mut q, Role::Stats, || false));
        assert_eq!(used_idx(&mem), 1);
        // A malformed buffer (not whole entries) is counted, the old values stay.
        post(&mem, 1, &[(0x9000, 15, 0)]);
        serve(&mem, &h, &mut q, Role::Stats, || false);
        let s = h.status();
        assert_eq!((s.counters.bad_requests, s.stats.get(5)), (1, Some(2000)));
    }

    #[test]
    fn queue_roles_follow_the_features() {
        use Role::*;
        assert_eq!(roles(0), [Inflate, Deflate, Unused, Unused]);
        assert_eq!(roles(F_STATS_VQ), [Inflate, Deflate, Stats, Unused]);
        assert_eq!(
            roles(F_PAGE_REPORTING),
            [Inflate, Deflate, Reporting, Unused]
        );
        assert_eq!(
            roles(F_STATS_VQ | F_PAGE_REPORTING),
            [Inflate, Deflate, Stats, Reporting]
        );
    }

    #[test]
    fn configuration_target_and_actual() {
        let mut b = Balloon::new(2 << 20);
        let h = b.handle();
        assert!(h.set_target(300));
        assert!(!h.set_target(300));
        let mut c = [0u8; 8];
        b.read_config(0, &mut c);
        assert_eq!(c, [44, 1, 0, 0, 0, 0, 0, 0]);
        // The driver writes actual (whole, then one byte); num_pages is not its to write.
        b.write_config(4, &200u32.to_le_bytes());
        b.write_config(5, &[1]);
        b.write_config(0, &[9, 9, 9, 9]);
        let s = h.status();
        assert_eq!((s.target_pages, s.actual_pages), (300, 200 + 256));
    }

    #[test]
    fn state_round_trips_and_is_checked() {
        let mem = memory();
        let mut b = Balloon::new(2 << 20);
        let h = b.handle();
        let mut q = ready_queue();
        post_pfns(&mem, 0, &[0x20, 0x21, 0x205]);
        serve(&mem, &h, &mut q, Role::Inflate, || false);
        h.set_target(3);
        b.write_config(4, &3u32.to_le_bytes());
        let s = b.save_state();
        let DeviceState::Balloon(bs) = &s else {
            panic!("{s:?}")
        };
        assert_eq!(bs.ballooned, vec![(0x20, 2), (0x205, 1)]);
        let json = serde_json::to_string(&s).unwrap();
        let mut c = Balloon::new(2 << 20);
        c.restore_state(serde_json::from_str(&json).unwrap())
            .unwrap();
        assert_eq!(c.handle().status(), h.status());
        assert_eq!(c.save_state(), s);
        // Another RAM size, another kind, pages beyond RAM: refused, nothing taken.
        let mut d = Balloon::new(4 << 20);
        assert!(d.restore_state(s.clone()).unwrap_err().contains("RAM"));
        assert!(c.restore_state(DeviceState::Rng).is_err());
        let mut bad = bs.clone();
        bad.ballooned = vec![(u64::MAX - 1, 5)];
        let mut e = Balloon::new(2 << 20);
        assert!(e.restore_state(DeviceState::Balloon(bad)).is_err());
        assert_eq!(e.handle().status().ballooned_pages, 0);
    }

    #[test]
    fn shared_memory_gets_a_hole_punched() {
        use std::os::fd::FromRawFd;
        use std::os::unix::fs::FileExt;
        use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
        use vm_memory::mmap::MmapRegionBuilder;
        use vm_memory::{FileOffset, GuestRegionMmap};
        // SAFETY: memfd_create reads a NUL-terminated name; the descriptor is new.
        let fd = unsafe { libc::memfd_create(c"balloon-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is new and owned by nothing else.
        let file = Arc::new(unsafe { std::fs::File::from_raw_fd(fd) });
        file.set_len(1 << 20).unwrap();
        let m = MmapRegionBuilder::new_with_bitmap(1 << 20, AtomicBitmap::with_len(1 << 20))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .with_file_offset(FileOffset::from_arc(file.clone(), 0))
            .build()
            .unwrap();
        let mem =
            GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(m, GuestAddress(0)).unwrap()])
                .unwrap();
        let blocks = || {
            use std::os::unix::fs::MetadataExt;
            file.metadata().unwrap().blocks()
        };
        for pfn in 0x20..0x30 {
            fill(&mem, pfn);
        }
        let h = Balloon::new(1 << 20).handle();
        let mut q = ready_queue();
        post_pfns(&mem, 0, &(0x20..0x30).collect::<Vec<u32>>());
        let before = blocks();
        assert!(serve(&mem, &h, &mut q, Role::Inflate, || false));
        assert_eq!(h.status().counters.release_errors, 0);
        // The file itself lost the pages (another mapping, a backend's, sees zeroes).
        let mut b = [1u8; 4096];
        file.read_exact_at(&mut b, 0x25 * PAGE_SIZE).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(
            before - blocks(),
            16 * PAGE_SIZE / 512,
            "16 pages punched out"
        );
    }
}
