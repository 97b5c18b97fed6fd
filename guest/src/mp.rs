//! Multiprocessor workloads that run on every vCPU, and so across nodes when the VM is a
//! cluster (issue 14's measurements): the IPI ping-pong (`ipi`: the boot processor sends a
//! fixed IPI to the last AP, whose handler sends one back, over `probe.ipi_rounds` rounds) and
//! the CPL3 coherence workload (`coher`: every vCPU increments a counter under a spinlock
//! `probe.coher_ops` times, on a page of its own with `probe.coher=part`, the default, or all
//! on one shared page with `probe.coher=shared`). Each test starts the APs itself, so it runs
//! without `smp` (and without the other) in `probe.tests`. Whatever one vCPU writes while the
//! others run lives alone in its page, so that it moves no page another vCPU reads.

use crate::bootinfo::{param, parse_u64};
use crate::console::Line;
use crate::cpu::{self, lapic};
use crate::smp::{self, MAX_CPUS};
use crate::sync::Global;
use crate::tests::{fail, pass, tsc_khz, Outcome};
use crate::{boot_info, entry};
use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// The vector of a ping (handled by the AP, which answers with a pong).
pub const PING_VECTOR: u8 = 0x60;
/// The vector of a pong (handled by the boot processor).
pub const PONG_VECTOR: u8 = 0x61;
/// The value an AP's CPL3 workload traps back with (`int3`): the AP then halts for good.
pub const AP_DONE: u64 = 0x00a9_d0e5;

/// A value alone in its page.
#[repr(C, align(4096))]
struct Alone<T>(T);

/// The APIC ID pongs go to (written before the APs start, then only read).
static PONG_TO: Alone<AtomicU32> = Alone(AtomicU32::new(0));
/// Pongs the boot processor took (written only by it).
static PONGS: Alone<AtomicU64> = Alone(AtomicU64::new(0));

/// A ping arrived (on the AP): answer it.
pub fn on_ping() {
    lapic::write(lapic::ICR_HIGH, PONG_TO.0.load(Ordering::Relaxed) << 24);
    lapic::write(lapic::ICR_LOW, 0x4000 | u32::from(PONG_VECTOR));
}

/// A pong arrived (on the boot processor).
pub fn on_pong() {
    PONGS.0.fetch_add(1, Ordering::Relaxed);
}

/// Starts every AP on `job`; needs at least `min` processors in all.
fn start_aps(job: u32, min: usize, d: &mut Line) -> Option<smp::CpuList> {
    if smp::AP_UP.load(Ordering::SeqCst) != 0 {
        d.s(" problem: the APs were started already (run this test without smp)");
        return None;
    }
    let Some(cpus) = smp::discover() else {
        d.s(" problem: no MP table or ACPI MADT found");
        return None;
    };
    d.s(" cpus=").dec(cpus.count as u64);
    if cpus.count < min {
        d.s(" problem: needs at least ").dec(min as u64).s(" vCPUs");
        return None;
    }
    if !boot_info().in_ram(entry::TRAMPOLINE_ADDR, 4096) {
        d.s(" problem: trampoline page not in RAM");
        return None;
    }
    smp::AP_JOB.store(job, Ordering::SeqCst);
    if let (_, Some(id)) = smp::start_aps(&cpus) {
        d.s(" problem: AP with APIC ID ")
            .dec(u64::from(id))
            .s(" did not start");
        return None;
    }
    Some(cpus)
}

/// Halts (a 1 ms APIC timer wakes it) until `done()` holds or `ms` of TSC time passed.
fn wait_until(khz: u64, ms: u64, done: impl Fn() -> bool) -> bool {
    lapic::enable();
    lapic::write(lapic::TIMER_DIV, 0xb);
    lapic::write(lapic::LVT_TIMER, 0x20000 | u32::from(cpu::TIMER_VECTOR));
    lapic::write(lapic::TIMER_INIT, 1_000_000);
    let t0 = cpu::rdtsc();
    let ok = loop {
        if done() {
            break true;
        }
        if cpu::rdtsc().wrapping_sub(t0) > khz.saturating_mul(ms) {
            break false;
        }
        cpu::wait_for_interrupt();
    };
    lapic::write(lapic::TIMER_INIT, 0);
    lapic::write(lapic::LVT_TIMER, 0x10000);
    ok
}

/// One ping-pong with the AP `target`: the round trip in TSC cycles, or None after 2 s.
fn ping(target: u32, khz: u64) -> Option<u64> {
    let before = PONGS.0.load(Ordering::Relaxed);
    // A one-shot timer (1 s at KVM's 1 GHz APIC bus) wakes the halt below if no pong comes.
    lapic::write(lapic::TIMER_INIT, 1_000_000_000);
    let t0 = cpu::rdtsc();
    lapic::write(lapic::ICR_HIGH, target << 24);
    lapic::write(lapic::ICR_LOW, 0x4000 | u32::from(PING_VECTOR));
    while PONGS.0.load(Ordering::Relaxed) == before {
        if cpu::rdtsc().wrapping_sub(t0) > khz.saturating_mul(2000) {
            return None;
        }
        cpu::wait_for_interrupt();
    }
    let t1 = cpu::rdtsc();
    lapic::write(lapic::TIMER_INIT, 0);
    Some(t1.wrapping_sub(t0))
}

const MAX_ROUNDS: usize = 1000;
const WARM_UP: usize = 10;

/// The `ipi` test: the round trip of a fixed IPI between the boot processor and the last AP
/// (median, p99 and minimum over `probe.ipi_rounds` rounds after 10 of warm-up; one way is
/// half the round trip).
pub fn ipi() -> Outcome {
    let mut d = Line::new();
    let rounds = param(boot_info().cmdline(), "probe.ipi_rounds")
        .and_then(parse_u64)
        .and_then(|r| usize::try_from(r).ok())
        .unwrap_or(200)
        .clamp(1, MAX_ROUNDS);
    let khz = tsc_khz();
    if khz == 0 {
        d.s("problem: no TSC frequency (needs Worldvisor's hypercall)");
        return fail("ipi", &mut d);
    }
    let bsp = lapic::id();
    d.s("bsp-apic=").dec(u64::from(bsp));
    PONG_TO.0.store(bsp, Ordering::SeqCst);
    let Some(cpus) = start_aps(smp::JOB_IPI, 2, &mut d) else {
        return fail("ipi", &mut d);
    };
    let target = cpus.apic_ids[..cpus.count]
        .iter()
        .rev()
        .copied()
        .find(|&id| id != bsp)
        .unwrap_or(bsp);
    lapic::enable();
    lapic::write(lapic::TIMER_DIV, 0xb);
    lapic::write(lapic::LVT_TIMER, u32::from(cpu::TIMER_VECTOR));
    let mut rtt = [0u64; MAX_ROUNDS];
    for r in 0..WARM_UP + rounds {
        let Some(c) = ping(target, khz) else {
            d.s(" problem: no pong within 2 s in round ").dec(r as u64);
            return fail("ipi", &mut d);
        };
        if let Some(slot) = r.checked_sub(WARM_UP) {
            rtt[slot] = c;
        }
    }
    lapic::write(lapic::LVT_TIMER, 0x10000);
    let rtt = &mut rtt[..rounds];
    rtt.sort_unstable();
    let ns = |c: u64| c.saturating_mul(1_000_000) / khz;
    let median = rtt[rounds / 2];
    d.s(" target-apic=")
        .dec(u64::from(target))
        .s(" rounds=")
        .dec(rounds as u64)
        .s(" rtt-median-ns=")
        .dec(ns(median))
        .s(" rtt-p99-ns=")
        .dec(ns(rtt[(rounds * 99 / 100).min(rounds - 1)]))
        .s(" rtt-min-ns=")
        .dec(ns(rtt[0]))
        .s(" one-way-median-ns=")
        .dec(ns(median) / 2);
    pass("ipi", &mut d)
}

/// A CPU's lock and counter, alone in their page.
#[repr(C, align(4096))]
struct Slot {
    lock: AtomicU64,
    count: AtomicU64,
}
/// The counters by start-up slot (the boot processor's is 0; `shared` uses only slot 0).
static SLOTS: [Slot; MAX_CPUS] = [const {
    Slot {
        lock: AtomicU64::new(0),
        count: AtomicU64::new(0),
    }
}; MAX_CPUS];
/// Operations per CPU and whether they share slot 0 (written before the APs start).
static CONF: Alone<[AtomicU64; 2]> = Alone([AtomicU64::new(0), AtomicU64::new(0)]);
/// CPUs in their CPL3 loop, waiting for GO.
static READY: Alone<AtomicU64> = Alone(AtomicU64::new(0));
/// Set by the boot processor to start every CPU at once.
static GO: Alone<AtomicU64> = Alone(AtomicU64::new(0));
/// CPUs that finished.
static DONE: Alone<AtomicU64> = Alone(AtomicU64::new(0));

#[repr(C, align(4096))]
struct UserStack([u64; 512]);
const USER_STACK0: UserStack = UserStack([0; 512]);
/// The CPL3 stacks by start-up slot (each in its own page; the workload reads its arguments
/// from the top of it).
#[link_section = ".stack"]
static USER_STACKS: Global<[UserStack; MAX_CPUS]> = Global::new([USER_STACK0; MAX_CPUS]);

global_asm!(
    r#"
    .section .text
    /* The coherence workload at CPL3. Arguments on the stack: lock, counter, operations,
       &GO, &DONE, &READY, the value to trap back with. */
    .globl user_coher
user_coher:
    mov 0(%rsp), %rdi
    mov 8(%rsp), %rsi
    mov 16(%rsp), %rcx
    mov 24(%rsp), %r8
    mov 32(%rsp), %r9
    mov 40(%rsp), %r10
    lock incq (%r10)
1:  pause
    cmpq $0, (%r8)
    je 1b
2:  mov $1, %eax
    xchg %rax, (%rdi)
    test %rax, %rax
    jz 4f
3:  pause
    cmpq $0, (%rdi)
    jne 3b
    jmp 2b
4:  incq (%rsi)
    movq $0, (%rdi)
    dec %rcx
    jnz 2b
    lock incq (%r9)
    mov 48(%rsp), %rax
    int3
    .text
"#,
    options(att_syntax)
);

extern "C" {
    fn user_coher();
}

/// Writes the workload's arguments at the top of slot `slot`'s CPL3 stack; its address.
fn user_frame(slot: usize, end: u64) -> u64 {
    let slot = slot.min(MAX_CPUS - 1);
    let s = if CONF.0[1].load(Ordering::SeqCst) != 0 {
        &SLOTS[0]
    } else {
        &SLOTS[slot]
    };
    // SAFETY: stack `slot` belongs to the one CPU started in that slot (the boot processor
    // has slot 0), which is the caller.
    let st = unsafe { &mut USER_STACKS.get_mut()[slot].0 };
    let args = [
        core::ptr::from_ref(&s.lock) as u64,
        core::ptr::from_ref(&s.count) as u64,
        CONF.0[0].load(Ordering::SeqCst),
        core::ptr::from_ref(&GO.0) as u64,
        core::ptr::from_ref(&DONE.0) as u64,
        core::ptr::from_ref(&READY.0) as u64,
        end,
        0,
    ];
    let at = st.len() - args.len();
    st[at..].copy_from_slice(&args);
    core::ptr::from_ref(&st[at]) as u64
}

/// An AP started for the coherence workload: runs it at CPL3, then halts for good.
pub fn ap_user(slot: usize) -> ! {
    let rsp = user_frame(slot, AP_DONE);
    entry::run_user(user_coher as *const () as u64, rsp);
    cpu::park()
}

/// The `coher` test: every vCPU increments a counter under a spinlock `probe.coher_ops` times
/// (default 100000), its own (`probe.coher=part`, the default) or one shared by all
/// (`shared`); checks every final count exactly and reports the operations per second of all
/// vCPUs together, from the start signal to the last vCPU's end.
pub fn coher() -> Outcome {
    let mut d = Line::new();
    let cmdline = boot_info().cmdline();
    let shared = match param(cmdline, "probe.coher") {
        None | Some(b"part") => false,
        Some(b"shared") => true,
        Some(_) => {
            d.s("problem: probe.coher is part or shared");
            return fail("coher", &mut d);
        }
    };
    let ops = param(cmdline, "probe.coher_ops")
        .and_then(parse_u64)
        .unwrap_or(100_000)
        .max(1);
    d.s("mode=")
        .s(if shared { "shared" } else { "part" })
        .s(" ops-per-cpu=")
        .dec(ops);
    let khz = tsc_khz();
    if khz == 0 {
        d.s(" problem: no TSC frequency (needs Worldvisor's hypercall)");
        return fail("coher", &mut d);
    }
    CONF.0[0].store(ops, Ordering::SeqCst);
    CONF.0[1].store(u64::from(shared), Ordering::SeqCst);
    let Some(cpus) = start_aps(smp::JOB_USER, 1, &mut d) else {
        return fail("coher", &mut d);
    };
    let n = cpus.count as u64;
    if !wait_until(khz, 10_000, || READY.0.load(Ordering::SeqCst) >= n - 1) {
        d.s(" problem: not every AP reached its CPL3 loop within 10 s");
        return fail("coher", &mut d);
    }
    let rsp = user_frame(0, 0);
    let t0 = cpu::rdtsc();
    GO.0.store(1, Ordering::SeqCst);
    entry::run_user(user_coher as *const () as u64, rsp);
    if !wait_until(khz, 600_000, || DONE.0.load(Ordering::SeqCst) >= n) {
        d.s(" problem: not every vCPU finished within 600 s");
        return fail("coher", &mut d);
    }
    let cycles = cpu::rdtsc().wrapping_sub(t0).max(1);
    let total = n * ops;
    let rate = u128::from(total) * u128::from(khz) * 1000 / u128::from(cycles);
    d.s(" elapsed-us=")
        .dec(cycles.saturating_mul(1000) / khz)
        .s(" ops-per-sec=")
        .dec(u64::try_from(rate).unwrap_or(u64::MAX));
    let count = |i: usize| SLOTS[i].count.load(Ordering::SeqCst);
    if shared {
        if count(0) != total {
            d.s(" problem: shared counter ")
                .dec(count(0))
                .s(" expected ")
                .dec(total);
            return fail("coher", &mut d);
        }
    } else if let Some(i) = (0..cpus.count).find(|&i| count(i) != ops) {
        d.s(" problem: counter ")
            .dec(i as u64)
            .s(" is ")
            .dec(count(i))
            .s(" expected ")
            .dec(ops);
        return fail("coher", &mut d);
    }
    pass("coher", &mut d)
}
