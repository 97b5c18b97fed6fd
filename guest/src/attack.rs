//! The adversarial test set (`probe.tests=attack`, issue 16 item 4): the guest attacks the VMM
//! the way a hostile kernel would — virtio rings whose descriptors point at MMIO or outside RAM,
//! loops, nested indirect tables, available indices that jump, notification storms; PCI BARs
//! moved onto RAM, onto each other and onto the ECAM window, sizing values left in place,
//! command-register toggles under load; MSI-X tables full of garbage; paravirtual calls with
//! every bad argument; port I/O on every port and MMIO across the unmapped hole.
//!
//! `probe.attack=NAME[,NAME..]` picks attacks (all by default). Each attack prints
//! `ATTACK NAME done DETAIL` and is followed by a check that the virtio devices still work
//! after a reset (the device check fails the set if they do not); the set ends with
//! `PASS attack ...` or `FAIL attack ...`. What the VMM must do (count, ignore or reset) is
//! asserted on the host by crates/wv/tests/adversarial.rs; docs/DEVICES.md lists the set.
//! Loops are bounded: kernel code is emulated at ~1 us per instruction on our CI machines.

use crate::bootinfo::param;
use crate::console::{inb, outb, Line};
use crate::pci::{inl, outl, read32, write32};
use crate::tests::Outcome;
use crate::virtio::{self, Device, DESC_NEXT, DESC_WRITE};
use crate::{boot_info, pv};
use wv_abi::{status, Call, CallBlock};

const DESC_INDIRECT: u16 = 4;
const RNG_ID: u16 = 0x1044;
const BLK_ID: u16 = 0x1042;
/// How long a hostile request may stay unanswered (TSC cycles, ~0.2 s): the device may
/// rightly never use a chain it cannot read.
const SHORT_WAIT: u64 = 500_000_000;
/// Notifications in the storm.
const STORM: u32 = 100_000;

/// The attack set, in the order it runs.
/// One attack: appends what happened to the line; false if the VMM misbehaved.
type Attack = fn(&mut Line) -> bool;
/// A raw descriptor: address, length, flags, next.
type Raw = (u64, u32, u16, u16);
/// A well-formed request: its descriptors, how many, and the used length it should get.
type Request = ([Raw; 3], usize, u32);
/// Indirect-table contents.
type Table<'a> = &'a [[u64; 2]];

const ATTACKS: &[(&str, Attack)] = &[
    ("ring-mmio", ring_mmio),
    ("ring-outside", ring_outside),
    ("ring-wrap", ring_wrap),
    ("ring-loop", ring_loop),
    ("ring-indirect", ring_indirect),
    ("ring-avail-jump", ring_avail_jump),
    ("notify-storm", notify_storm),
    ("bar-ram", bar_ram),
    ("bar-overlap", bar_overlap),
    ("bar-ecam", bar_ecam),
    ("bar-sizing", bar_sizing),
    ("cmd-toggle", cmd_toggle),
    ("msix-garbage", msix_garbage),
    ("msix-vector", msix_vector),
    ("msix-pba", msix_pba),
    ("pv-bad", pv_bad),
    ("port-scan", port_scan),
    ("mmio-hole", mmio_hole),
];

#[repr(C, align(4096))]
struct Bufs {
    ind: [[u64; 2]; 4],
    ind2: [[u64; 2]; 4],
    hdr: [u8; 16],
    status: [u8; 16],
    data: [u8; 512],
    blocks: [CallBlock; 4],
}

static mut B: Bufs = Bufs {
    ind: [[0; 2]; 4],
    ind2: [[0; 2]; 4],
    hdr: [0; 16],
    status: [0; 16],
    data: [0; 512],
    blocks: [CallBlock {
        nr: 0,
        status: 0,
        args: [0; 5],
        ret: [0; 2],
    }; 4],
};

fn b() -> *mut Bufs {
    &raw mut B
}
fn hdr() -> u64 {
    // SAFETY: only the address is taken.
    unsafe { (&raw mut (*b()).hdr) as u64 }
}
fn status_buf() -> u64 {
    // SAFETY: only the address is taken.
    unsafe { (&raw mut (*b()).status) as u64 }
}
fn data() -> u64 {
    // SAFETY: only the address is taken.
    unsafe { (&raw mut (*b()).data) as u64 }
}

/// Runs the attacks the command line selects; prints one `ATTACK` line each and the result.
pub fn run() -> Outcome {
    let sel = param(boot_info().cmdline(), "probe.attack");
    let mut d = Line::new();
    let (mut ran, mut failed) = (0u64, 0u64);
    if let Some(sel) = sel {
        for name in sel.split(|&c| c == b',') {
            if !name.is_empty() && !ATTACKS.iter().any(|(n, _)| n.as_bytes() == name) {
                d.s("unknown attack '").bytes(name).s("'");
                return report(Outcome::Fail, &mut d);
            }
        }
    }
    let (rng, blk) = (
        virtio::find(RNG_ID).is_some(),
        virtio::find(BLK_ID).is_some(),
    );
    if !rng && !blk {
        d.s("no virtio-rng or virtio-blk device to attack");
        return report(Outcome::Fail, &mut d);
    }
    for &(name, attack) in ATTACKS {
        if sel.is_some_and(|s| !s.split(|&c| c == b',').any(|n| n == name.as_bytes())) {
            continue;
        }
        ran += 1;
        let mut l = Line::new();
        l.s("ATTACK ").s(name).s(" ");
        let ok = attack(&mut l);
        let works = devices_work(&mut l);
        if ok && works {
            l.s(" done");
        } else {
            l.s(" FAILED");
            failed += 1;
            d.s(" ").s(name);
        }
        l.end();
    }
    let mut l = Line::new();
    l.s("attacks=").dec(ran).s(" failed=").dec(failed);
    if failed > 0 {
        l.s(" in").bytes(d.as_bytes());
        return report(Outcome::Fail, &mut l);
    }
    report(Outcome::Pass, &mut l)
}

fn report(o: Outcome, d: &mut Line) -> Outcome {
    let mut l = Line::new();
    l.s(match o {
        Outcome::Pass => "PASS attack ",
        Outcome::Fail => "FAIL attack ",
        Outcome::Skip => "SKIP attack ",
    })
    .bytes(d.as_bytes())
    .end();
    o
}

/// A device reset and set up afresh (polled, no interrupts).
fn setup(id: u16) -> Option<Device> {
    let mut dev = virtio::find(id)?;
    dev.negotiate(0)?;
    (dev.setup_queue(0) && dev.driver_ok()).then_some(dev)
}

/// The descriptors of a well-formed request on device `id`: 64 random bytes, or sector 0.
fn good_request(id: u16) -> Request {
    if id == RNG_ID {
        (
            [(data(), 64, DESC_WRITE, 0), (0, 0, 0, 0), (0, 0, 0, 0)],
            1,
            64,
        )
    } else {
        // SAFETY: the buffers are this module's; the device is idle.
        unsafe {
            (*b()).hdr = [0; 16];
            (*b()).status[0] = 0xee;
        }
        (
            [
                (hdr(), 16, DESC_NEXT, 1),
                (data(), 512, DESC_WRITE | DESC_NEXT, 2),
                (status_buf(), 1, DESC_WRITE, 0),
            ],
            3,
            513,
        )
    }
}

/// Whether device `id` (when present) serves a well-formed request after a reset.
fn works(id: u16) -> bool {
    if virtio::find(id).is_none() {
        return true;
    }
    let Some(mut dev) = setup(id) else {
        return false;
    };
    let (descs, n, want) = good_request(id);
    let ok = dev.post_raw(0, &descs[..n], 1) && dev.wait_used(0, 5_000_000_000) == Some(want);
    // SAFETY: the device has finished with the status byte.
    let st = unsafe { core::ptr::read_volatile(&raw const (*b()).status[0]) };
    dev.reset();
    ok && (id == RNG_ID || st == 0)
}

fn devices_work(l: &mut Line) -> bool {
    let (r, k) = (works(RNG_ID), works(BLK_ID));
    l.s(" rng=")
        .s(if r { "ok" } else { "broken" })
        .s(" blk=")
        .s(if k { "ok" } else { "broken" });
    r && k
}

/// Hands device `id` a chain of `descs`, moving the available index on by `advance`; returns
/// what the device did with it within [`SHORT_WAIT`] (the used length, or None) and resets it.
fn hostile(id: u16, descs: &[Raw], advance: u16) -> Option<Option<u32>> {
    let mut dev = setup(id)?;
    if !dev.post_raw(0, descs, advance) {
        return None;
    }
    let r = dev.wait_used(0, SHORT_WAIT);
    dev.reset();
    Some(r)
}

/// Tallies hostile chains: `n` given, how many came back used empty, how many never came back.
#[derive(Default)]
struct Tally {
    n: u64,
    empty: u64,
    unused: u64,
    served: u64,
}

impl Tally {
    fn add(&mut self, r: Option<Option<u32>>) {
        match r {
            None => {}
            Some(r) => {
                self.n += 1;
                match r {
                    Some(0) => self.empty += 1,
                    Some(_) => self.served += 1,
                    None => self.unused += 1,
                }
            }
        }
    }
    /// Prints the tally; true when nothing hostile was served.
    fn show(&self, l: &mut Line, what: &str) -> bool {
        l.s(what)
            .s("=")
            .dec(self.n)
            .s("/empty=")
            .dec(self.empty)
            .s("/unused=")
            .dec(self.unused)
            .s(" ");
        if self.served > 0 {
            l.s("SERVED=").dec(self.served).s(" ");
        }
        self.served == 0
    }
}

/// Each of `targets` (address, length) as the rng's buffer, as the blk's header and as the
/// blk's data buffer.
fn bad_buffers(l: &mut Line, targets: &[(u64, u32)]) -> bool {
    let (mut r, mut k) = (Tally::default(), Tally::default());
    for &(a, len) in targets {
        r.add(hostile(RNG_ID, &[(a, len, DESC_WRITE, 0)], 1));
        good_request(BLK_ID);
        k.add(hostile(
            BLK_ID,
            &[
                (a, len, DESC_NEXT, 1),
                (data(), 512, DESC_WRITE | DESC_NEXT, 2),
                (status_buf(), 1, DESC_WRITE, 0),
            ],
            1,
        ));
        k.add(hostile(
            BLK_ID,
            &[
                (hdr(), 16, DESC_NEXT, 1),
                (a, len, DESC_WRITE | DESC_NEXT, 2),
                (status_buf(), 1, DESC_WRITE, 0),
            ],
            1,
        ));
    }
    r.show(l, "rng") & k.show(l, "blk")
}

fn bar0(slot: u8, bar: u8) -> u64 {
    let lo = read32(slot, 0x10 + 4 * bar);
    u64::from(lo & !0xf)
}

fn ram_top() -> u64 {
    let bi = boot_info();
    bi.e820[..bi.e820_len]
        .iter()
        .filter(|r| r.kind == 1)
        .map(|r| r.addr + r.size)
        .max()
        .unwrap_or(0)
}

fn ring_mmio(l: &mut Line) -> bool {
    let mut t = [(0u64, 64u32); 6];
    let mut n = 0;
    for id in [RNG_ID, BLK_ID] {
        if let Some(dev) = virtio::find(id) {
            t[n] = (bar0(dev.slot, dev.bar), 64);
            n += 1;
        }
    }
    for a in [0xfee0_0000, 0xfec0_0000, 0xe000_0000, 0xe000_0000 + 0x8000] {
        t[n] = (a, 64);
        n += 1;
    }
    bad_buffers(l, &t[..n])
}

fn ring_outside(l: &mut Line) -> bool {
    let top = ram_top();
    bad_buffers(
        l,
        &[
            (top, 64),
            (top - 32, 64),
            (0xdf00_0000, 512),
            (1 << 40, 64),
            (1 << 52, 64),
        ],
    )
}

fn ring_wrap(l: &mut Line) -> bool {
    bad_buffers(
        l,
        &[
            (data(), u32::MAX),
            (u64::MAX - 0xfff, 0x2000),
            (u64::MAX - 31, 64),
            (0x1000, 0xffff_f000),
        ],
    )
}

fn ring_loop(l: &mut Line) -> bool {
    let (mut r, mut k) = (Tally::default(), Tally::default());
    let w = DESC_WRITE | DESC_NEXT;
    r.add(hostile(RNG_ID, &[(data(), 64, w, 0)], 1));
    r.add(hostile(
        RNG_ID,
        &[(data(), 64, w, 1), (data(), 64, w, 0)],
        1,
    ));
    r.add(hostile(RNG_ID, &[(data(), 64, w, 200)], 1));
    r.add(hostile(RNG_ID, &[(data(), 64, w, 0xffff)], 1));
    let full = [(data(), 8, w, 1); 8];
    let mut ring = full;
    for (i, d) in ring.iter_mut().enumerate() {
        d.3 = ((i + 1) % 8) as u16;
    }
    r.add(hostile(RNG_ID, &ring, 1));
    k.add(hostile(
        BLK_ID,
        &[
            (hdr(), 16, DESC_NEXT, 1),
            (data(), 512, w, 2),
            (status_buf(), 1, w, 0),
        ],
        1,
    ));
    k.add(hostile(BLK_ID, &[(hdr(), 16, DESC_NEXT, 0)], 1));
    r.show(l, "rng") & k.show(l, "blk")
}

/// Fills the two indirect tables: `ind` and `ind2` each hold `entries`.
fn tables(ind: &[[u64; 2]], ind2: &[[u64; 2]]) {
    // SAFETY: the tables are this module's; no device is using them.
    unsafe {
        (*b()).ind = [[0; 2]; 4];
        (*b()).ind2 = [[0; 2]; 4];
        (&mut (*b()).ind)[..ind.len()].copy_from_slice(ind);
        (&mut (*b()).ind2)[..ind2.len()].copy_from_slice(ind2);
    }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u64; 2] {
    [
        addr,
        u64::from(len) | (u64::from(flags) << 32) | (u64::from(next) << 48),
    ]
}

fn ring_indirect(l: &mut Line) -> bool {
    // SAFETY: only addresses are taken.
    let (ind, ind2) = unsafe { ((&raw mut (*b()).ind) as u64, (&raw mut (*b()).ind2) as u64) };
    let mut r = Tally::default();
    let cases: [(Table, Table, u64, u32); 6] = [
        // An indirect table inside an indirect table.
        (
            &[desc(ind2, 32, DESC_INDIRECT, 0)],
            &[desc(data(), 64, DESC_WRITE, 0)],
            ind,
            32,
        ),
        // An indirect table that names itself.
        (&[desc(ind, 64, DESC_INDIRECT, 0)], &[], ind, 64),
        // A table on the LAPIC, one outside RAM, one with a length that is no whole number of
        // descriptors, one empty.
        (&[], &[], 0xfee0_0000, 64),
        (&[], &[], 1 << 40, 64),
        (&[desc(data(), 64, DESC_WRITE, 0)], &[], ind, 24),
        (&[], &[], ind, 0),
    ];
    for (t1, t2, at, len) in cases {
        tables(t1, t2);
        r.add(hostile(RNG_ID, &[(at, len, DESC_INDIRECT, 0)], 1));
    }
    // A loop inside an indirect table.
    tables(
        &[
            desc(data(), 64, DESC_WRITE | DESC_NEXT, 1),
            desc(data(), 64, DESC_WRITE | DESC_NEXT, 0),
        ],
        &[],
    );
    r.add(hostile(RNG_ID, &[(ind, 32, DESC_INDIRECT, 0)], 1));
    let mut k = Tally::default();
    tables(&[desc(ind2, 64, DESC_INDIRECT, 0)], &[]);
    k.add(hostile(
        BLK_ID,
        &[(hdr(), 16, DESC_NEXT, 1), (ind, 16, DESC_INDIRECT, 0)],
        1,
    ));
    r.show(l, "rng") & k.show(l, "blk")
}

fn ring_avail_jump(l: &mut Line) -> bool {
    let mut t = Tally::default();
    for id in [RNG_ID, BLK_ID] {
        for jump in [virtio::QSIZE + 1, 0x8000, 0xffff] {
            let (descs, n, _) = good_request(id);
            t.add(hostile(id, &descs[..n], jump));
        }
    }
    l.s("jumps ");
    t.show(l, "rng+blk")
}

fn notify_storm(l: &mut Line) -> bool {
    let mut ok = true;
    for id in [RNG_ID, BLK_ID] {
        let Some(mut dev) = setup(id) else {
            continue;
        };
        let (descs, n, want) = good_request(id);
        let first =
            dev.post_raw(0, &descs[..n], 1) && dev.wait_used(0, 5_000_000_000) == Some(want);
        for _ in 0..STORM {
            dev.kick(0);
        }
        // Kicks of a queue that does not exist, too.
        for q in [1u16, 7, 0xffff] {
            dev.kick(q);
        }
        let (descs, n, want) = good_request(id);
        let after =
            dev.post_raw(0, &descs[..n], 1) && dev.wait_used(0, 5_000_000_000) == Some(want);
        dev.reset();
        l.s(if id == RNG_ID { "rng" } else { "blk" })
            .s(" kicks=")
            .dec(u64::from(STORM))
            .s(if first && after {
                " served-through "
            } else {
                " NOT-SERVED "
            });
        ok &= first && after;
    }
    ok
}

/// Moves device `id`'s BAR to `to` (decoding off, address, decoding on) and back; returns
/// whether RAM at `to` (when it is RAM) kept what was written there before.
fn move_and_back(id: u16, to: u32, l: &mut Line) -> bool {
    let Some(dev) = virtio::find(id) else {
        return true;
    };
    let orig = bar0(dev.slot, dev.bar) as u32;
    let ram = u64::from(to) + 0x8000 <= ram_top();
    let probe = u64::from(to) as *mut u32;
    if ram {
        // SAFETY: identity-mapped RAM the probe image does not use (checked by the caller).
        unsafe { probe.write_volatile(0x5a5a_1234) };
    }
    dev.move_bar(to);
    // The status register, where the device would be if it had moved.
    let seen = if ram {
        // SAFETY: as above.
        unsafe { probe.add(5).cast::<u8>().read_volatile() }
    } else {
        0
    };
    dev.move_bar(orig);
    let kept = !ram
        // SAFETY: as above.
        || unsafe { probe.read_volatile() } == 0x5a5a_1234;
    l.hex(u64::from(to))
        .s(if kept { ":ram-kept " } else { ":RAM-LOST " });
    let _ = seen;
    kept
}

fn bar_ram(l: &mut Line) -> bool {
    // 48 MiB: RAM the probe image does not use (the host test gives 128 MiB or more).
    let to = 0x0300_0000;
    if ram_top() < u64::from(to) + 0x10000 {
        l.s("skipped: less than 48 MiB of RAM ");
        return true;
    }
    move_and_back(RNG_ID, to, l) & move_and_back(BLK_ID, to + 0x8000, l)
}

fn bar_overlap(l: &mut Line) -> bool {
    let (Some(r), Some(k)) = (virtio::find(RNG_ID), virtio::find(BLK_ID)) else {
        l.s("skipped: needs virtio-rng and virtio-blk ");
        return true;
    };
    let (ra, ka) = (bar0(r.slot, r.bar) as u32, bar0(k.slot, k.bar) as u32);
    move_and_back(RNG_ID, ka, l) & move_and_back(BLK_ID, ra, l)
}

fn bar_ecam(l: &mut Line) -> bool {
    let mut ok = true;
    for to in [0xe000_0000u32, 0xe008_0000, 0xfec0_0000, 0xfee0_0000] {
        ok &= move_and_back(RNG_ID, to, l);
    }
    // The ECAM window still answers for every slot as port I/O does.
    let ecam_ok = (0..8u8).all(|s| {
        // SAFETY: the ECAM window is identity-mapped MMIO; a read has no side effects.
        let v = unsafe { ((0xe000_0000u64 + (u64::from(s) << 15)) as *const u32).read_volatile() };
        v == read32(s, 0)
    });
    l.s(if ecam_ok { "ecam=ok " } else { "ECAM-BROKEN " });
    ok & ecam_ok
}

fn bar_sizing(l: &mut Line) -> bool {
    for id in [RNG_ID, BLK_ID] {
        let Some(dev) = virtio::find(id) else {
            continue;
        };
        let reg = 0x10 + 4 * dev.bar;
        let orig = read32(dev.slot, reg);
        // Sizing with decoding on, left in place while decoding is toggled and used.
        write32(dev.slot, reg, 0xffff_ffff);
        let size = (!(read32(dev.slot, reg) & !0xf)).wrapping_add(1);
        let cmd = read32(dev.slot, 4);
        write32(dev.slot, 4, cmd & !2);
        write32(dev.slot, 4, cmd | 2);
        // The BARs above it, too.
        let mut saved = [0u32; 6];
        for (i, s) in saved.iter_mut().enumerate() {
            *s = read32(dev.slot, 0x10 + 4 * i as u8);
            write32(dev.slot, 0x10 + 4 * i as u8, 0xffff_ffff);
        }
        write32(dev.slot, 0x30, 0xffff_ffff); // expansion ROM
        for (i, s) in saved.iter().enumerate() {
            write32(dev.slot, 0x10 + 4 * i as u8, *s);
        }
        write32(dev.slot, 0x30, 0);
        write32(dev.slot, reg, orig);
        l.s("size=").hex(u64::from(size)).s(" ");
    }
    true
}

fn cmd_toggle(l: &mut Line) -> bool {
    let mut got = 0u64;
    for id in [RNG_ID, BLK_ID] {
        let Some(mut dev) = setup(id) else {
            continue;
        };
        let cmd = read32(dev.slot, 4);
        for _ in 0..4 {
            let (descs, n, _) = good_request(id);
            dev.post_raw(0, &descs[..n], 1);
            for v in [0u32, 2, 4, 0xffff, 0x400, 0, 6] {
                write32(dev.slot, 4, (cmd & 0xffff_0000) | v);
            }
            write32(dev.slot, 4, cmd);
            if dev.wait_used(0, SHORT_WAIT).is_some() {
                got += 1;
            }
        }
        dev.reset();
    }
    l.s("requests-completed=").dec(got).s(" ");
    true
}

/// The MSI-X capability of `slot`: (capability offset, table address, PBA address).
fn msix(slot: u8) -> Option<(u8, u64, u64)> {
    let mut p = (read32(slot, 0x34) & 0xfc) as u8;
    for _ in 0..48 {
        if p == 0 {
            break;
        }
        let head = read32(slot, p);
        if head & 0xff == 0x11 {
            let (t, pba) = (read32(slot, p + 4), read32(slot, p + 8));
            let at = |v: u32| bar0(slot, (v & 7) as u8) + u64::from(v & !7);
            return Some((p, at(t), at(pba)));
        }
        p = ((head >> 8) & 0xfc) as u8;
    }
    None
}

fn w32(a: u64, v: u32) {
    // SAFETY: `a` is in a device's BAR (identity-mapped MMIO).
    unsafe { (a as *mut u32).write_volatile(v) }
}
fn r32(a: u64) -> u32 {
    // SAFETY: as for w32.
    unsafe { (a as *const u32).read_volatile() }
}

/// Sets up `id`, programs its MSI-X table with `entries` (address low, high, data, control)
/// from entry 0, points queue 0 at `vector`, enables MSI-X and serves a request.
fn with_msix(id: u16, entries: &[[u32; 4]], vector: u16) -> Option<bool> {
    let mut dev = setup(id)?;
    let (cap, table, _) = msix(dev.slot)?;
    // Reset first (setup did): now with MSI-X; DRIVER_OK again after the vectors are set.
    dev.reset();
    dev.negotiate(0)?;
    dev.setup_queue(0);
    for (i, e) in entries.iter().enumerate() {
        for (j, v) in e.iter().enumerate() {
            w32(table + 16 * i as u64 + 4 * j as u64, *v);
        }
    }
    dev.set_queue_vector(0, vector);
    let head = read32(dev.slot, cap);
    write32(dev.slot, cap, (head & !(1 << 30)) | (1 << 31));
    let served = dev.driver_ok() && {
        let (descs, n, want) = good_request(id);
        dev.post_raw(0, &descs[..n], 1) && dev.wait_used(0, 5_000_000_000) == Some(want)
    };
    dev.reset();
    write32(dev.slot, cap, read32(dev.slot, cap) & !(3 << 30));
    Some(served)
}

fn msix_garbage(l: &mut Line) -> bool {
    let garbage = [
        [0x1234_5000, 0xffff_ffff, 0xffff_ffff, 0],
        [0xfee0_0000, 0, 0, 0], // vector 0: illegal
        [0xffff_ffff, 0xffff_ffff, 0x0000_00ff, 0],
        [0, 0, 0xdead_beef, 0xffff_fffe],
    ];
    let mut ok = true;
    for id in [RNG_ID, BLK_ID] {
        for v in 0..4u16 {
            if let Some(s) = with_msix(id, &garbage, v) {
                ok &= s;
            }
        }
        // Entries beyond the table (the table is small; the window up to the PBA is not).
        if let Some(dev) = virtio::find(id) {
            if let Some((_, table, _)) = msix(dev.slot) {
                for e in [8u64, 100, 0x1ff] {
                    for j in 0..4 {
                        w32(table + 16 * e + 4 * j, 0xffff_ffff);
                    }
                }
            }
        }
    }
    l.s(if ok {
        "served-with-garbage-routes "
    } else {
        "NOT-SERVED "
    });
    ok
}

fn msix_vector(l: &mut Line) -> bool {
    let mut ok = true;
    for id in [RNG_ID, BLK_ID] {
        let Some(dev) = setup(id) else {
            continue;
        };
        let base = bar0(dev.slot, dev.bar);
        for v in [0x7ffu16, 0x8000, 0xfffe, 64] {
            dev.set_queue_vector(0, v);
            // SAFETY: the common configuration in BAR 0 (queue_msix_vector at 0x1a).
            let back = unsafe { ((base + 0x1a) as *const u16).read_volatile() };
            // config_msix_vector at 0x10.
            // SAFETY: as above.
            unsafe { ((base + 0x10) as *mut u16).write_volatile(v) };
            // SAFETY: as above.
            let cback = unsafe { ((base + 0x10) as *const u16).read_volatile() };
            ok &= back == 0xffff && cback == 0xffff;
        }
        // Queues that do not exist.
        // SAFETY: queue_select at 0x16, as above.
        unsafe { ((base + 0x16) as *mut u16).write_volatile(0x1234) };
        dev.set_queue_vector(0x4321, 0);
        let _ = with_msix(id, &[[0, 0, 0, 0]; 1], 0x7ff);
        dev.reset();
    }
    l.s(if ok {
        "out-of-range=no-vector "
    } else {
        "OUT-OF-RANGE-ACCEPTED "
    });
    ok
}

fn msix_pba(l: &mut Line) -> bool {
    let mut ok = true;
    for id in [RNG_ID, BLK_ID] {
        let Some(dev) = setup(id) else {
            continue;
        };
        let Some((_, _, pba)) = msix(dev.slot) else {
            continue;
        };
        for off in [0u64, 4, 8, 0x100, 0x1ffc] {
            w32(pba + off, 0xffff_ffff);
        }
        let after = r32(pba);
        // Pending bits are the device's; writes change nothing.
        ok &= after == 0;
        l.hex(u64::from(after)).s(" ");
        dev.reset();
    }
    l.s(if ok {
        "pba-read-only "
    } else {
        "PBA-WRITABLE "
    });
    ok
}

/// A call block address handed straight to the call port.
fn raw_call(gpa: u32) {
    outl(wv_abi::CALL_PORT, gpa);
}

fn pv_bad(l: &mut Line) -> bool {
    if !pv::on_worldvisor() {
        l.s("skipped: no call port ");
        return true;
    }
    let top = ram_top();
    // Blocks the VMM cannot read or write: it can only drop the call (and count it).
    for gpa in [
        0xffff_fff8u32,
        top as u32,
        (top - 32) as u32,
        0xe000_0000,
        0xfee0_0000,
        0xfec0_0000,
        0xdf00_0000,
    ] {
        raw_call(gpa);
    }
    // A misaligned block is not performed: the aligned one below keeps its status.
    // SAFETY: the blocks are this module's.
    let blk0 = unsafe { (&raw mut (*b()).blocks[0]) as u64 };
    // SAFETY: as above.
    unsafe {
        (*b()).blocks[0] = CallBlock::new(Call::Version, [0; 5]);
        (*b()).blocks[0].status = status::PENDING;
        (*b()).blocks[1] = CallBlock::new(Call::Version, [0; 5]);
        (*b()).blocks[1].status = status::PENDING;
    }
    for off in [1u64, 2, 4] {
        raw_call((blk0 + off) as u32);
    }
    // SAFETY: a block the VMM may have written behind the compiler's back.
    let untouched =
        unsafe { core::ptr::read_volatile(&raw const (*b()).blocks[0].status) } == status::PENDING;
    // Wrong-width accesses to the call port.
    outb(wv_abi::CALL_PORT, 0);
    crate::console::outw(wv_abi::CALL_PORT, 0);
    let _ = inb(wv_abi::CALL_PORT);
    let _ = inl(wv_abi::CALL_PORT);
    // Calls with every bad argument, and the status each must get.
    let big = u64::MAX;
    let arr = blk0;
    let mut nested = CallBlock::new(Call::Batch, [arr, 1, 0, 0, 0]);
    nested.status = status::PENDING;
    let checks: [(u32, [u64; 5], u32); 24] = [
        (9, [0; 5], status::UNKNOWN_CALL),
        (0xffff_ffff, [0; 5], status::UNKNOWN_CALL),
        (0x8000_0000, [big; 5], status::UNKNOWN_CALL),
        (
            Call::ConsoleWrite as u32,
            [1 << 63, 16, 0, 0, 0],
            status::BAD_ADDRESS,
        ),
        (
            Call::ConsoleWrite as u32,
            [top - 8, 64, 0, 0, 0],
            status::BAD_ADDRESS,
        ),
        (
            Call::ConsoleWrite as u32,
            [0xfee0_0000, 16, 0, 0, 0],
            status::BAD_ADDRESS,
        ),
        (
            Call::ConsoleWrite as u32,
            [data(), big, 0, 0, 0],
            status::BAD_LENGTH,
        ),
        (
            Call::ConsoleWrite as u32,
            [big, big, 0, 0, 0],
            status::BAD_LENGTH,
        ),
        (
            Call::DeviceList as u32,
            [1 << 50, big, 0, 0, 0],
            status::BAD_ADDRESS,
        ),
        (
            Call::DeviceList as u32,
            [0xe000_0000, 4096, 0, 0, 0],
            status::BAD_ADDRESS,
        ),
        (
            Call::DeviceList as u32,
            [big - 7, 4096, 0, 0, 0],
            status::BAD_ADDRESS,
        ),
        (
            Call::DeviceList as u32,
            [top - 8, 4096, 0, 0, 0],
            status::BAD_ADDRESS,
        ),
        (
            Call::VmGeneration as u32,
            [top - 8, 0, 0, 0, 0],
            status::BAD_ADDRESS,
        ),
        (
            Call::VmGeneration as u32,
            [big, 0, 0, 0, 0],
            status::BAD_ADDRESS,
        ),
        (
            Call::VmGeneration as u32,
            [0xfec0_0000, 0, 0, 0, 0],
            status::BAD_ADDRESS,
        ),
        (Call::Batch as u32, [arr, big, 0, 0, 0], status::BAD_LENGTH),
        (
            Call::Batch as u32,
            [arr, wv_abi::MAX_BATCH + 1, 0, 0, 0],
            status::BAD_LENGTH,
        ),
        (
            Call::Batch as u32,
            [arr + 4, 1, 0, 0, 0],
            status::BAD_ADDRESS,
        ),
        (
            Call::Batch as u32,
            [1 << 40, 1, 0, 0, 0],
            status::BAD_ADDRESS,
        ),
        (
            Call::Batch as u32,
            [top - 64, 2, 0, 0, 0],
            status::BAD_ADDRESS,
        ),
        (
            Call::Batch as u32,
            [big - 63, 1, 0, 0, 0],
            status::BAD_ADDRESS,
        ),
        (Call::Poweroff as u32, [256, 0, 0, 0, 0], status::BAD_LENGTH),
        (Call::Poweroff as u32, [big, 0, 0, 0, 0], status::BAD_LENGTH),
        (
            Call::Poweroff as u32,
            [1 << 32, 0, 0, 0, 0],
            status::BAD_LENGTH,
        ),
    ];
    let mut wrong = 0u64;
    for &(nr, args, want) in &checks {
        let (st, _, _) = pv::call_args_nr(nr, args);
        if st != want {
            wrong += 1;
            l.s("call ")
                .dec(u64::from(nr))
                .s(" gave ")
                .dec(u64::from(st))
                .s(" ");
        }
    }
    // A batch holding a nested batch, a bad power-off and an unknown call: each refused.
    // SAFETY: the blocks are this module's.
    unsafe {
        (*b()).blocks[0] = nested;
        (*b()).blocks[1] = CallBlock::new(Call::Poweroff, [0x1_0000, 0, 0, 0, 0]);
        (*b()).blocks[1].status = status::PENDING;
        (*b()).blocks[2] = CallBlock {
            nr: 0xdead,
            status: status::PENDING,
            args: [big; 5],
            ret: [0; 2],
        };
    }
    let (st, done, _) = pv::call_args(Call::Batch, [arr, 3, 0, 0, 0]);
    // SAFETY: written by the VMM behind the compiler's back.
    let subs = unsafe { core::ptr::read_volatile(&raw const (*b()).blocks) };
    let batch_ok = st == status::OK
        && done == 3
        && subs[0].status == status::NOT_ALLOWED
        && subs[1].status == status::BAD_LENGTH
        && subs[2].status == status::UNKNOWN_CALL;
    l.s("bad-blocks=10 calls=")
        .dec(checks.len() as u64)
        .s(" wrong=")
        .dec(wrong)
        .s(if untouched {
            " misaligned-ignored"
        } else {
            " MISALIGNED-PERFORMED"
        })
        .s(if batch_ok {
            " batch-refusals=ok "
        } else {
            " BATCH-WRONG "
        });
    wrong == 0 && untouched && batch_ok
}

/// Ports that legitimately end the VM, and only those, are skipped: the ACPI sleep control
/// register (0x600: SLP_EN with S5 powers off), the i8042 command port (0x64: 0xfe resets),
/// QEMU's isa-debug-exit (0xf4) and the reset control register (0xcf9) of PC chipsets.
pub const SKIPPED_PORTS: [u16; 4] = [0x64, 0xf4, 0x600, 0xcf9];

fn port_scan(l: &mut Line) -> bool {
    // Config address 0 (disabled): writes to the data ports then reach no function.
    outl(0xcf8, 0);
    let mut sum = 0u32;
    for port in 0..=0xffffu16 {
        if SKIPPED_PORTS.contains(&port) {
            continue;
        }
        sum = sum.wrapping_add(u32::from(inb(port)));
        sum = sum.wrapping_add(inl(port));
        if (0xcfc..=0xcff).contains(&port) {
            // A byte written to 0xcf9-0xcfb may have enabled a configuration address: writes
            // to the data ports are meant to reach nothing, not to clobber a device.
            outl(0xcf8, 0);
        }
        // The UART's transmitter gets text ('#'), so that the console stays readable.
        let (v8, v32) = if port == 0x3f8 {
            (b'#', 0x2323_2323)
        } else {
            (0xff, 0xffff_ffff)
        };
        outb(port, v8);
        // 0xffff_ffff: on the call port a misaligned block (refused), on 0xcf8 a bus that
        // does not exist.
        if (0xcfc..=0xcff).contains(&port) {
            outl(0xcf8, 0);
        }
        outl(port, v32);
    }
    outb(0x3f8, b'\n');
    // Put back what a console needs: UART interrupts off, 8N1, no divisor latch.
    outb(0x3f9, 0);
    outb(0x3fb, 3);
    outb(0x3fc, 0);
    outl(0xcf8, 0);
    l.s("ports=65536 skipped=0x64,0xf4,0x600,0xcf9 ops=4 sum=")
        .hex(u64::from(sum))
        .s(" ");
    true
}

/// The BARs of every function on bus 0 (base addresses; each taken as 64 KiB, more than any
/// BAR here), up to 32.
fn bars(out: &mut [u64; 32]) -> usize {
    let mut n = 0;
    for s in 0..32u8 {
        if read32(s, 0) == 0xffff_ffff {
            continue;
        }
        for i in 0..6u8 {
            let base = bar0(s, i);
            if base != 0 && n < out.len() {
                out[n] = base;
                n += 1;
            }
        }
    }
    n
}

fn mmio_hole(l: &mut Line) -> bool {
    let top = ram_top();
    let mut bar = [0u64; 32];
    let nb = bars(&mut bar);
    let in_a_bar = |a: u64| bar[..nb].iter().any(|&b| (b..b + 0x1_0000).contains(&a));
    let mut n = 0u64;
    let mut a = (top + 0xf_ffff) & !0xf_ffff;
    // RAM top .. PCI hole: every MiB; the PCI window: every 64 KiB but the BARs; above the
    // ECAM window up to the I/O APIC: every MiB. (Not the interrupt controllers: writing them
    // is the guest hurting itself, not the VMM.)
    while a < 0xfec0_0000 {
        let step = if (0xc000_0000..0xe000_0000).contains(&a) {
            0x1_0000
        } else {
            0x10_0000
        };
        let ecam = (0xe000_0000..0xe010_0000).contains(&a);
        if !(ecam || (0xc000_0000..0xe000_0000).contains(&a) && in_a_bar(a)) {
            let _ = r32(a);
            w32(a, 0xdead_beef);
            let _ = r32(a + 0xffc);
            n += 1;
        }
        a += step;
    }
    l.s("addresses=").dec(n).s(" ");
    true
}
