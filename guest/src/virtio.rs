//! A minimal virtio-pci modern driver: find a device on bus 0, walk its vendor capabilities,
//! negotiate VERSION_1, set up split queues in the image's own memory, and submit requests
//! that it completes by polling the used ring (no interrupts needed, few instructions).

use crate::cpu;
use crate::pci::{read32, write32};
use core::sync::atomic::{fence, Ordering};

/// Descriptor flag: continues in `next`.
pub const DESC_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_WRITE: u16 = 2;
/// Entries per queue this driver uses unless asked for more ([`Device::setup_queue_sized`]).
pub const QSIZE: u16 = 8;
/// Most entries a queue can have (what one ring's pages hold).
pub const QMAX: u16 = 256;

#[repr(C, align(4096))]
struct Ring {
    desc: [[u64; 2]; QMAX as usize],
    avail: [u16; 3 + QMAX as usize],
    _pad1: [u8; 4096 - 2 * (3 + QMAX as usize)],
    used: [u32; 2 * QMAX as usize + 2],
}

const MAX_QUEUES: usize = 4;
#[link_section = ".stack"]
static mut RINGS: [Ring; MAX_QUEUES] = unsafe { core::mem::zeroed() };

/// A device the driver has set up.
pub struct Device {
    /// PCI slot.
    pub slot: u8,
    /// The BAR holding the common configuration.
    pub bar: u8,
    common: u64,
    notify: u64,
    notify_mult: u32,
    isr: u64,
    device_cfg: u64,
    notify_off: [u16; MAX_QUEUES],
    avail_idx: [u16; MAX_QUEUES],
    used_seen: [u16; MAX_QUEUES],
    qsize: [u16; MAX_QUEUES],
}

fn rd<T: Copy>(a: u64) -> T {
    // SAFETY: `a` is inside a BAR the device decodes (identity-mapped, uncached).
    unsafe { (a as *const T).read_volatile() }
}
fn wr<T: Copy>(a: u64, v: T) {
    // SAFETY: as for rd.
    unsafe { (a as *mut T).write_volatile(v) }
}

fn bar_address(slot: u8, bar: u8) -> u64 {
    let reg = 0x10 + 4 * bar;
    let lo = read32(slot, reg);
    let mut a = u64::from(lo & !0xf);
    if lo & 0x6 == 0x4 {
        a |= u64::from(read32(slot, reg + 4)) << 32;
    }
    a
}

/// Finds virtio device `device_id` (0x1040 + type) and maps its capabilities. Returns None if
/// absent or if its capabilities are incomplete.
pub fn find(device_id: u16) -> Option<Device> {
    find_nth(device_id, 0)
}

/// Like [`find`], for the `n`-th such device on the bus.
pub fn find_nth(device_id: u16, n: usize) -> Option<Device> {
    let slot = (0..32u8)
        .filter(|&s| read32(s, 0) == 0x1af4 | (u32::from(device_id) << 16))
        .nth(n)?;
    at_slot(slot)
}

/// The virtio device in `slot` of bus 0 (one that arrived by hot-plug): enables it and maps
/// its capabilities. None when the slot holds no virtio device with complete capabilities.
pub fn at_slot(slot: u8) -> Option<Device> {
    if slot >= 32 || read32(slot, 0) & 0xffff != 0x1af4 {
        return None;
    }
    write32(slot, 4, read32(slot, 4) | 0x6); // memory space, bus master
    let mut d = Device {
        slot,
        bar: 0,
        common: 0,
        notify: 0,
        notify_mult: 0,
        isr: 0,
        device_cfg: 0,
        notify_off: [0; MAX_QUEUES],
        avail_idx: [0; MAX_QUEUES],
        used_seen: [0; MAX_QUEUES],
        qsize: [QSIZE; MAX_QUEUES],
    };
    let mut p = (read32(slot, 0x34) & 0xfc) as u8;
    let mut guard = 0;
    while p != 0 && guard < 48 {
        guard += 1;
        let head = read32(slot, p);
        if head & 0xff == 0x09 {
            let cfg_type = (head >> 24) as u8;
            let w1 = read32(slot, p + 4);
            let base = bar_address(slot, (w1 & 0xff) as u8) + u64::from(read32(slot, p + 8));
            match cfg_type {
                1 => {
                    d.common = base;
                    d.bar = (w1 & 0xff) as u8;
                }
                2 => {
                    d.notify = base;
                    d.notify_mult = read32(slot, p + 16);
                }
                3 => d.isr = base,
                4 => d.device_cfg = base,
                _ => {}
            }
        }
        p = ((head >> 8) & 0xfc) as u8;
    }
    if d.common == 0 || d.notify == 0 || d.isr == 0 {
        return None;
    }
    Some(d)
}

impl Device {
    /// Device status.
    pub fn status(&self) -> u8 {
        rd(self.common + 0x14)
    }

    /// Resets the device; true if it reads back 0.
    pub fn reset(&self) -> bool {
        wr::<u8>(self.common + 0x14, 0);
        self.status() == 0
    }

    /// Reset, ACKNOWLEDGE|DRIVER, accept `features` (VERSION_1 added), FEATURES_OK. Returns the
    /// device's feature bits, or None if it refused.
    pub fn negotiate(&self, features: u64) -> Option<u64> {
        if !self.reset() {
            return None;
        }
        wr::<u8>(self.common + 0x14, 1 | 2);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            wr::<u32>(self.common, sel);
            offered |= u64::from(rd::<u32>(self.common + 4)) << (32 * sel);
        }
        let want = (features | (1 << 32)) & offered;
        if want & (1 << 32) == 0 {
            return None;
        }
        for sel in 0..2u32 {
            wr::<u32>(self.common + 8, sel);
            wr::<u32>(self.common + 0xc, (want >> (32 * sel)) as u32);
        }
        wr::<u8>(self.common + 0x14, 1 | 2 | 8);
        if self.status() & 8 == 0 {
            return None;
        }
        Some(offered)
    }

    /// Sets up queue `q` (< 4) with [`QSIZE`] entries; true on success.
    pub fn setup_queue(&mut self, q: u16) -> bool {
        self.setup_queue_sized(q, QSIZE).is_some()
    }

    /// Sets up queue `q` (< 4) with as many entries as the device allows, at most `want`
    /// (a power of two up to [`QMAX`]) and at least [`QSIZE`]; the size set up.
    pub fn setup_queue_sized(&mut self, q: u16, want: u16) -> Option<u16> {
        let qi = usize::from(q);
        if qi >= MAX_QUEUES || !want.is_power_of_two() || !(QSIZE..=QMAX).contains(&want) {
            return None;
        }
        wr::<u16>(self.common + 0x16, q);
        let max: u16 = rd(self.common + 0x18);
        if max < QSIZE {
            return None;
        }
        // The largest power of two within both (a split ring's size need not be one, but
        // this driver's modular indexing is simplest with it).
        let mut size = want;
        while size > max {
            size /= 2;
        }
        self.qsize[qi] = size;
        wr::<u16>(self.common + 0x18, size);
        wr::<u16>(self.common + 0x1a, 0xffff); // no interrupt: this driver polls
                                               // SAFETY: the rings are this driver's; the device is not using queue q yet.
        let r = unsafe { &mut *(&raw mut RINGS).cast::<Ring>().add(qi) };
        r.avail = [0; 3 + QMAX as usize];
        r.used = [0; 2 * QMAX as usize + 2];
        let (desc, avail, used) = (
            r.desc.as_ptr() as u64,
            r.avail.as_ptr() as u64,
            r.used.as_ptr() as u64,
        );
        for (off, a) in [(0x20u64, desc), (0x28, avail), (0x30, used)] {
            wr::<u32>(self.common + off, a as u32);
            wr::<u32>(self.common + off + 4, (a >> 32) as u32);
        }
        self.notify_off[qi] = rd(self.common + 0x1e);
        self.avail_idx[qi] = 0;
        self.used_seen[qi] = 0;
        wr::<u16>(self.common + 0x1c, 1);
        Some(size)
    }

    /// DRIVER_OK; true if the device accepted it (no DEVICE_NEEDS_RESET).
    pub fn driver_ok(&self) -> bool {
        wr::<u8>(self.common + 0x14, 1 | 2 | 4 | 8);
        self.status() & 0x40 == 0
    }

    /// Submits a chain of (address, length, flags) buffers on queue `q` and polls until the
    /// device has used it; returns the used length, or None after ~2 s (TSC-bounded) or if
    /// the chain is too long.
    pub fn submit(&mut self, q: u16, bufs: &[(u64, u32, u16)]) -> Option<u32> {
        if !self.post(q, bufs) {
            return None;
        }
        self.wait_used(q, 5_000_000_000)
    }

    /// Makes a chain available on queue `q` (descriptors from index 0: one chain in flight per
    /// queue) and notifies the device.
    pub fn post(&mut self, q: u16, bufs: &[(u64, u32, u16)]) -> bool {
        let qi = usize::from(q);
        if qi >= MAX_QUEUES || bufs.is_empty() || bufs.len() > usize::from(self.qsize[qi]) {
            return false;
        }
        // SAFETY: the rings are this driver's; descriptors are written before they are made
        // available, and the fence orders that against the index update.
        let r = unsafe { &mut *(&raw mut RINGS).cast::<Ring>().add(qi) };
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let next = if i + 1 < bufs.len() { DESC_NEXT } else { 0 };
            let fl = flags | next;
            r.desc[i] = [
                addr,
                u64::from(len) | (u64::from(fl) << 32) | (u64::from(i as u16 + 1) << 48),
            ];
        }
        let slot = usize::from(self.avail_idx[qi] % self.qsize[qi]);
        r.avail[2 + slot] = 0;
        self.avail_idx[qi] = self.avail_idx[qi].wrapping_add(1);
        fence(Ordering::SeqCst);
        // SAFETY: volatile store of the avail index the device reads.
        unsafe { (&raw mut r.avail[1]).write_volatile(self.avail_idx[qi]) };
        fence(Ordering::SeqCst);
        wr::<u16>(
            self.notify + u64::from(self.notify_off[qi]) * u64::from(self.notify_mult),
            q,
        );
        true
    }

    /// Writes `descs` (address, length, flags, next) verbatim from descriptor 0 of queue `q`,
    /// puts head 0 in every available slot, moves the available index on by `advance` (more
    /// than the queue size is a jump no driver makes) and notifies: the adversarial tests'
    /// way of handing the device whatever a hostile kernel would (guest/src/attack.rs).
    pub fn post_raw(&mut self, q: u16, descs: &[(u64, u32, u16, u16)], advance: u16) -> bool {
        let qi = usize::from(q);
        if qi >= MAX_QUEUES || descs.len() > usize::from(self.qsize[qi]) {
            return false;
        }
        // SAFETY: the rings are this driver's; as in post.
        let r = unsafe { &mut *(&raw mut RINGS).cast::<Ring>().add(qi) };
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            r.desc[i] = [
                addr,
                u64::from(len) | (u64::from(flags) << 32) | (u64::from(next) << 48),
            ];
        }
        r.avail[2..].fill(0);
        self.avail_idx[qi] = self.avail_idx[qi].wrapping_add(advance);
        fence(Ordering::SeqCst);
        // SAFETY: volatile store of the avail index the device reads.
        unsafe { (&raw mut r.avail[1]).write_volatile(self.avail_idx[qi]) };
        fence(Ordering::SeqCst);
        self.kick(q);
        true
    }

    /// Makes descriptor `head` of queue `q` a one-buffer chain (address, length, flags) and
    /// available, without notifying ([`Device::kick`] does): for a driver that keeps many
    /// single-buffer chains in flight, each under its own head. False if `head` is outside the
    /// queue.
    pub fn offer(&mut self, q: u16, head: u16, buf: (u64, u32, u16)) -> bool {
        let qi = usize::from(q);
        if qi >= MAX_QUEUES || head >= self.qsize[qi] {
            return false;
        }
        // SAFETY: the rings are this driver's; as in post (the device does not own
        // descriptor `head`: it is not available, or has been used).
        let r = unsafe { &mut *(&raw mut RINGS).cast::<Ring>().add(qi) };
        let (addr, len, flags) = buf;
        r.desc[usize::from(head)] = [addr, u64::from(len) | (u64::from(flags & !DESC_NEXT) << 32)];
        let slot = usize::from(self.avail_idx[qi] % self.qsize[qi]);
        r.avail[2 + slot] = head;
        self.avail_idx[qi] = self.avail_idx[qi].wrapping_add(1);
        fence(Ordering::SeqCst);
        // SAFETY: volatile store of the avail index the device reads.
        unsafe { (&raw mut r.avail[1]).write_volatile(self.avail_idx[qi]) };
        true
    }

    /// The next chain the device used on queue `q`, if any yet: its head and length (no
    /// waiting).
    pub fn next_used(&mut self, q: u16) -> Option<(u16, u32)> {
        let qi = usize::from(q);
        if qi >= MAX_QUEUES {
            return None;
        }
        // SAFETY: read-only volatile access to this driver's used ring.
        let r = unsafe { &*(&raw const RINGS).cast::<Ring>().add(qi) };
        // SAFETY: volatile read of the used index the device writes.
        let used_idx = unsafe { ((&raw const r.used) as *const u16).add(1).read_volatile() };
        if used_idx == self.used_seen[qi] {
            return None;
        }
        fence(Ordering::SeqCst);
        let e = usize::from(self.used_seen[qi] % self.qsize[qi]);
        self.used_seen[qi] = self.used_seen[qi].wrapping_add(1);
        // SAFETY: reading the element the device completed.
        let (id, len) = unsafe {
            (
                (&raw const r.used[1 + 2 * e]).read_volatile(),
                (&raw const r.used[1 + 2 * e + 1]).read_volatile(),
            )
        };
        Some((id as u16, len))
    }

    /// Notifies queue `q` (nothing new needs to be available).
    pub fn kick(&self, q: u16) {
        let qi = usize::from(q).min(MAX_QUEUES - 1);
        wr::<u16>(
            self.notify + u64::from(self.notify_off[qi]) * u64::from(self.notify_mult),
            q,
        );
    }

    /// Polls queue `q` until the device uses a chain (returns its length) or `cycles` TSC
    /// cycles pass.
    pub fn wait_used(&mut self, q: u16, cycles: u64) -> Option<u32> {
        let qi = usize::from(q);
        // SAFETY: read-only volatile access to this driver's used ring.
        let r = unsafe { &*(&raw const RINGS).cast::<Ring>().add(qi) };
        let start = cpu::rdtsc();
        loop {
            // SAFETY: volatile read of the used index the device writes.
            let used_idx = unsafe { ((&raw const r.used) as *const u16).add(1).read_volatile() };
            if used_idx != self.used_seen[qi] {
                self.used_seen[qi] = self.used_seen[qi].wrapping_add(1);
                let e = usize::from(self.used_seen[qi].wrapping_sub(1) % self.qsize[qi]);
                // SAFETY: reading the element the device just completed.
                let len = unsafe { (&raw const r.used[1 + 2 * e + 1]).read_volatile() };
                return Some(len);
            }
            if cpu::rdtsc().wrapping_sub(start) > cycles {
                return None;
            }
            core::hint::spin_loop();
        }
    }

    /// Moves the BAR holding the common configuration to `addr` the way an OS does: memory
    /// decoding off, new address, decoding on.
    pub fn move_bar(&self, addr: u32) {
        let reg = 0x10 + 4 * self.bar;
        let cmd = read32(self.slot, 4);
        write32(self.slot, 4, cmd & !2);
        let lo = read32(self.slot, reg);
        write32(self.slot, reg, addr | (lo & 0xf));
        if lo & 0x6 == 0x4 {
            write32(self.slot, reg + 4, 0);
        }
        write32(self.slot, 4, cmd | 2);
    }

    /// Points queue `q`'s interrupts at MSI-X table entry `entry`.
    pub fn set_queue_vector(&self, q: u16, entry: u16) {
        wr::<u16>(self.common + 0x16, q);
        wr::<u16>(self.common + 0x1a, entry);
    }

    /// Programs MSI-X table entry `entry` to deliver `vector` to the local APIC with ID
    /// `apic_id` (fixed delivery, edge), unmasks it and enables MSI-X. False if the device has
    /// no MSI-X capability.
    pub fn enable_msix(&self, entry: u16, apic_id: u8, vector: u8) -> bool {
        let mut p = (read32(self.slot, 0x34) & 0xfc) as u8;
        let mut guard = 0;
        while p != 0 && guard < 48 {
            guard += 1;
            let head = read32(self.slot, p);
            if head & 0xff == 0x11 {
                let table = read32(self.slot, p + 4);
                let base = bar_address(self.slot, (table & 7) as u8)
                    + u64::from(table & !7)
                    + 16 * u64::from(entry);
                wr::<u32>(base, 0xfee0_0000 | (u32::from(apic_id) << 12));
                wr::<u32>(base + 4, 0);
                wr::<u32>(base + 8, u32::from(vector));
                wr::<u32>(base + 12, 0);
                write32(self.slot, p, (head & !(1 << 30)) | (1 << 31));
                return true;
            }
            p = ((head >> 8) & 0xfc) as u8;
        }
        false
    }

    /// Reads device configuration.
    pub fn config<T: Copy>(&self, offset: u64) -> T {
        rd(self.device_cfg + offset)
    }

    /// Writes device configuration.
    pub fn set_config<T: Copy>(&self, offset: u64, v: T) {
        wr(self.device_cfg + offset, v)
    }

    /// The configuration generation (changes whenever the device changes its configuration).
    pub fn config_generation(&self) -> u8 {
        rd(self.common + 0x15)
    }

    /// Reads (and so clears) the ISR.
    pub fn isr(&self) -> u8 {
        rd(self.isr)
    }
}
