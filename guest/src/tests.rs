//! The self-tests. Each prints exactly one `PASS name ...`, `FAIL name ...` or
//! `SKIP name ...` line (details may precede it) and returns its [`Outcome`].

use crate::bootinfo::{param, parse_u64};
use crate::console::{outb, Line};
use crate::cpu::{self, lapic};
use crate::{boot_info, pv, smp};
use core::arch::global_asm;
use core::sync::atomic::Ordering;
use wv_abi::{status, Call, CallBlock, DeviceRecord};

/// A test's result.
pub enum Outcome {
    /// Passed.
    Pass,
    /// Failed.
    Fail,
    /// Not applicable here (the line says why).
    Skip,
}

fn report(outcome: Outcome, name: &str, detail: &mut Line) -> Outcome {
    let mut l = Line::new();
    l.s(match outcome {
        Outcome::Pass => "PASS ",
        Outcome::Fail => "FAIL ",
        Outcome::Skip => "SKIP ",
    });
    l.s(name).s(" ");
    l.bytes(detail.as_bytes());
    l.end();
    outcome
}

pub(crate) fn pass(name: &str, d: &mut Line) -> Outcome {
    report(Outcome::Pass, name, d)
}
pub(crate) fn fail(name: &str, d: &mut Line) -> Outcome {
    report(Outcome::Fail, name, d)
}

/// Runs the test called `name`.
pub fn run(name: &[u8]) -> Outcome {
    match name {
        b"boot" => boot(),
        b"smp" => smp_test(),
        b"ipi" => crate::mp::ipi(),
        b"coher" => crate::mp::coher(),
        b"timer" => timer(),
        b"clock" => clock(),
        b"hypercall" => hypercall(),
        b"batch" => batch(),
        b"user" => user(),
        b"pci" => pci_test(),
        b"rng" => rng_test(),
        b"acpi" => acpi_test(),
        b"blk" => blk_test(),
        b"net" => net_test(),
        b"netpeer" => net_peer(),
        b"blkbench" => blk_bench(),
        b"netbench" => net_bench(),
        b"netsink" => net_sink(),
        // Not self-tests: deliberate ways for a guest to end badly, so the VMM's handling of
        // each is tested end to end. None is in the default list.
        b"triplefault" => triple_fault(),
        b"emulfail" => emulation_failure(),
        b"int3" => int3_kernel(),
        b"cpuid" => cpuid_test(),
        b"reset" => reset(),
        b"hang" => hang(),
        b"burn" => burn(),
        b"persist" => persist(),
        b"fill" => fill(),
        b"echo" => echo(),
        b"genid" => genid(),
        b"idle" => idle(),
        b"balloon" => balloon_test(),
        b"attack" => crate::attack::run(),
        b"hotplug" => hotplug_test(),
        _ => {
            let mut l = Line::new();
            l.s("unknown test '").bytes(name).s("'");
            fail("cmdline", &mut l)
        }
    }
}

fn boot() -> Outcome {
    let bi = boot_info();
    let mut d = Line::new();
    d.s("protocol=").s(bi.protocol_name());
    if !bi.problem.is_empty() {
        d.s(" problem: ").s(bi.problem);
        return fail("boot", &mut d);
    }
    d.s(" e820=")
        .dec(bi.e820_len as u64)
        .s(" ram=")
        .dec(bi.ram_total() >> 10)
        .s("KiB");
    if bi.e820_len == 0 || bi.ram_total() == 0 {
        d.s(" problem: empty memory map");
        return fail("boot", &mut d);
    }
    for w in bi.e820[..bi.e820_len].windows(2) {
        if w[1].addr < w[0].addr + w[0].size {
            d.s(" problem: memory map unsorted or overlapping at ")
                .hex(w[1].addr);
            return fail("boot", &mut d);
        }
    }
    extern "C" {
        static __image_start: u8;
        static __image_end: u8;
    }
    let (s, e) = (
        (&raw const __image_start) as u64,
        (&raw const __image_end) as u64,
    );
    if !bi.in_ram(s, e - s) {
        d.s(" problem: image ")
            .hex(s)
            .s("-")
            .hex(e)
            .s(" not inside RAM");
        return fail("boot", &mut d);
    }
    d.s(" cmdline=").dec(bi.cmdline_len as u64).s("B");
    if bi.cmdline_len == 0 {
        d.s(" problem: no command line");
        return fail("boot", &mut d);
    }
    let (addr, size) = bi.initrd;
    d.s(" initrd=").dec(size).s("B");
    if let Some(spec) = param(bi.cmdline(), "probe.initrd") {
        let mut it = spec.split(|&b| b == b':');
        let want_size = it.next().and_then(parse_u64);
        let want_sum = it.next().and_then(parse_u64);
        let (Some(want_size), Some(want_sum)) = (want_size, want_sum) else {
            d.s(" problem: probe.initrd wants SIZE:SUM");
            return fail("boot", &mut d);
        };
        if size != want_size || size == 0 || !bi.in_ram(addr, size) {
            d.s(" problem: initrd at ")
                .hex(addr)
                .s(" size ")
                .dec(size)
                .s(", expected size ")
                .dec(want_size);
            return fail("boot", &mut d);
        }
        // SAFETY: the range was checked to lie in RAM; the loader placed the initrd there.
        let data = unsafe { core::slice::from_raw_parts(addr as *const u8, size as usize) };
        let sum = wv_abi::initrd_checksum(data);
        d.s(" sum=").hex(sum);
        if sum != want_sum {
            d.s(" problem: initrd checksum differs (expected ")
                .hex(want_sum)
                .s(")");
            return fail("boot", &mut d);
        }
    }
    pass("boot", &mut d)
}

fn smp_test() -> Outcome {
    let mut d = Line::new();
    let Some(cpus) = smp::discover() else {
        d.s("no MP table or ACPI MADT found");
        return fail("smp", &mut d);
    };
    d.s("cpus=")
        .dec(cpus.count as u64)
        .s(" source=")
        .s(cpus.source);
    if cpus.count == 0 {
        return fail("smp", &mut d);
    }
    if !boot_info().in_ram(crate::entry::TRAMPOLINE_ADDR, 4096) {
        d.s(" problem: trampoline page not in RAM");
        return fail("smp", &mut d);
    }
    let (up, missing) = smp::start_aps(&cpus);
    d.s(" aps-started=").dec(u64::from(up));
    if let Some(id) = missing {
        d.s(" problem: AP with APIC ID ")
            .dec(u64::from(id))
            .s(" did not start");
        return fail("smp", &mut d);
    }
    if pv::on_worldvisor() {
        let (st, _, vcpus) = pv::call_args(Call::MemSize, [0; 5]);
        d.s(" vmm-vcpus=").dec(vcpus);
        if st != status::OK || vcpus != cpus.count as u64 {
            d.s(" problem: the VMM reports a different vCPU count");
            return fail("smp", &mut d);
        }
    }
    pass("smp", &mut d)
}

const TIMER_PERIOD: u32 = 1_000_000; // APIC timer counts (1 ms at KVM's 1 GHz APIC bus)

fn start_timer() {
    lapic::enable();
    lapic::write(lapic::TIMER_DIV, 0xb);
    lapic::write(lapic::LVT_TIMER, 0x20000 | u32::from(cpu::TIMER_VECTOR));
    lapic::write(lapic::TIMER_INIT, TIMER_PERIOD);
}

fn stop_timer() {
    lapic::write(lapic::TIMER_INIT, 0);
    lapic::write(lapic::LVT_TIMER, 0x10000);
}

pub(crate) fn tsc_khz() -> u64 {
    if pv::on_worldvisor() {
        let (st, khz, _) = pv::call_args(Call::TscKhz, [0; 5]);
        if st == status::OK {
            return khz;
        }
    }
    0
}

fn timer() -> Outcome {
    const N: u64 = 10;
    let mut d = Line::new();
    let t0 = cpu::rdtsc();
    let base = cpu::TICKS.load(Ordering::Relaxed);
    start_timer();
    let mut waits = 0u64;
    while cpu::TICKS.load(Ordering::Relaxed) - base < N && waits < 10 * N {
        cpu::wait_for_interrupt();
        waits += 1;
    }
    stop_timer();
    let ticks = cpu::TICKS.load(Ordering::Relaxed) - base;
    let cycles = cpu::rdtsc().wrapping_sub(t0);
    d.s("ticks=").dec(ticks).s(" cycles=").dec(cycles);
    if ticks < N {
        d.s(" problem: expected ")
            .dec(N)
            .s(" LAPIC timer interrupts");
        return fail("timer", &mut d);
    }
    let khz = tsc_khz();
    if let Some(us) = (cycles * 1000).checked_div(khz) {
        d.s(" elapsed=").dec(us).s("us");
        // N periods of 1 ms; allow for emulated handlers but not for a timer that runs 5x fast.
        if us < N * 1000 / 5 {
            d.s(" problem: interrupts came faster than the programmed period");
            return fail("timer", &mut d);
        }
    }
    pass("timer", &mut d)
}

/// Clock continuity across whatever the host does meanwhile (a pause, a snapshot and restore):
/// for `probe.clockms` milliseconds of kvmclock time (default 3000) it reads kvmclock (the
/// paravirtual clock Linux guests keep time with) and the TSC in a loop with a 10 ms LAPIC timer
/// running. It fails if kvmclock jumps by more than one tick between two reads (a pause that let
/// guest time run on shows as a jump of its length), or if more ticks arrived than the elapsed
/// time allows (interrupts piled up while paused and delivered at once). The largest TSC gap is
/// reported (`tsc_gap`): the TSC follows a pause only where the hypervisor can offset it, which
/// the host's test checks against what the VMM reports. `clock: running` is printed once the
/// loop runs, for a host that waits to act.
/// The TSC frequency for the clock-gap tests (kvmclock enabled): Worldvisor's call, else
/// what kvmclock's scale implies (QEMU/KVM), so that these tests run on other hypervisors too.
fn clock_tsc_khz() -> u64 {
    match tsc_khz() {
        0 => cpu::kvmclock::tsc_khz().unwrap_or(0),
        khz => khz,
    }
}

fn clock() -> Outcome {
    const TICK_MS: u64 = 10;
    let mut d = Line::new();
    if !cpu::kvmclock::enable() {
        d.s("no kvmclock");
        return report(Outcome::Skip, "clock", &mut d);
    }
    let khz = clock_tsc_khz();
    if khz == 0 {
        cpu::kvmclock::disable();
        d.s("no TSC frequency from the hypervisor");
        return report(Outcome::Skip, "clock", &mut d);
    }
    let ms = param(boot_info().cmdline(), "probe.clockms")
        .and_then(parse_u64)
        .unwrap_or(3000);
    // The largest step allowed between two reads: a tick unless the host says otherwise (a
    // host test on a loaded machine, where a vCPU thread can wait for a CPU longer than a
    // tick, allows more, still far less than the pauses it checks).
    let gap_ms = param(boot_info().cmdline(), "probe.clockgap")
        .and_then(parse_u64)
        .unwrap_or(TICK_MS)
        .clamp(1, 1000);
    let gap_ns = gap_ms * 1_000_000;
    let base = cpu::TICKS.load(Ordering::Relaxed);
    lapic::enable();
    lapic::write(lapic::TIMER_DIV, 0xb);
    lapic::write(lapic::LVT_TIMER, 0x20000 | u32::from(cpu::TIMER_VECTOR));
    lapic::write(lapic::TIMER_INIT, TIMER_PERIOD * TICK_MS as u32);
    let read = || cpu::kvmclock::read().unwrap_or(0);
    let t0 = read();
    let end = t0 + ms * 1_000_000;
    let (mut last, mut max_gap) = (t0, 0u64);
    let (mut last_tsc, mut max_tsc_gap) = (cpu::rdtsc(), 0u64);
    let mut backwards = false;
    let mut announced = false;
    while last < end {
        // The timer's ticks come in between reads.
        cpu::enable_interrupts_briefly();
        let mut now = read();
        let mut tsc = cpu::rdtsc();
        if !announced && now.saturating_sub(t0) > 50_000_000 {
            // From inside the loop, so that whatever the host does on seeing it happens while
            // the loop measures; the time the line takes is not a gap.
            crate::console::println("clock: running");
            announced = true;
            (now, tsc) = (read(), cpu::rdtsc());
            (last, last_tsc) = (now, tsc);
        }
        backwards |= now < last;
        max_gap = max_gap.max(now.saturating_sub(last));
        max_tsc_gap = max_tsc_gap.max(tsc.wrapping_sub(last_tsc));
        (last, last_tsc) = (now, tsc);
    }
    stop_timer();
    cpu::kvmclock::disable();
    let ticks = cpu::TICKS.load(Ordering::Relaxed) - base;
    let elapsed_ms = (last - t0) / 1_000_000;
    d.s("elapsed=")
        .dec(elapsed_ms)
        .s("ms ticks=")
        .dec(ticks)
        .s(" max_gap=")
        .dec(max_gap / 1000)
        .s("us tsc_gap=")
        .dec(max_tsc_gap * 1000 / khz)
        .s("us");
    if backwards {
        d.s(" problem: kvmclock went backwards");
        return fail("clock", &mut d);
    }
    if max_gap > gap_ns {
        d.s(" problem: kvmclock jumped by more than ")
            .dec(gap_ms)
            .s(" ms");
        return fail("clock", &mut d);
    }
    // One tick may have been pending across each pause; a pile-up is more.
    if ticks > elapsed_ms / TICK_MS + 3 {
        d.s(" problem: more timer ticks than the elapsed time allows");
        return fail("clock", &mut d);
    }
    pass("clock", &mut d)
}

fn hypercall() -> Outcome {
    let mut d = Line::new();
    let bi = boot_info();
    if !pv::on_worldvisor() {
        let (_, sig) = pv::hypervisor_signature();
        d.s("native-fallback signature='");
        for &b in &sig {
            d.b(if b.is_ascii_graphic() { b } else { b'.' });
        }
        d.s("' ram=").dec(bi.ram_total() >> 10).s("KiB");
        // Device discovery natively: the UART's scratch register holds what we write.
        outb(0x3ff, 0x5a);
        let uart = crate::console::inb(0x3ff) == 0x5a;
        d.s(" uart=").s(if uart { "found" } else { "absent" });
        if !uart {
            return fail("hypercall", &mut d);
        }
        return pass("hypercall", &mut d);
    }
    let (st, ver, feat) = pv::call_args(Call::Version, [0; 5]);
    d.s("abi=").dec(ver).s(" features=").hex(feat);
    if st != status::OK
        || ver != u64::from(wv_abi::ABI_VERSION)
        || feat & u64::from(wv_abi::features::ALL) != u64::from(wv_abi::features::ALL)
    {
        return fail("hypercall", &mut d);
    }
    let (st, mem, _) = pv::call_args(Call::MemSize, [0; 5]);
    let e820 = bi.ram_total();
    d.s(" mem=").dec(mem >> 10).s("KiB");
    if st != status::OK || e820 > mem || mem - e820 > 2 << 20 {
        d.s(" problem: VMM memory size disagrees with the memory map (")
            .dec(e820 >> 10)
            .s("KiB)");
        return fail("hypercall", &mut d);
    }
    let mut recs = [DeviceRecord::default(); 8];
    let (st, ndev, written) = pv::call_args(
        Call::DeviceList,
        [
            recs.as_mut_ptr() as u64,
            core::mem::size_of_val(&recs) as u64,
            0,
            0,
            0,
        ],
    );
    d.s(" devices=").dec(ndev);
    // SAFETY: the VMM wrote `written` records into `recs`; read them back volatile.
    let recs = unsafe { core::ptr::read_volatile(&recs) };
    let has = |kind: u32, base: u64| {
        recs[..(written as usize).min(8)]
            .iter()
            .any(|r| r.kind == kind && r.base == base)
    };
    if st != status::OK
        || !has(wv_abi::device_kind::UART_16550, 0x3f8)
        || !has(wv_abi::device_kind::I8042, 0x60)
        || !has(wv_abi::device_kind::CALL_PORT, u64::from(wv_abi::CALL_PORT))
    {
        d.s(" problem: device list lacks the UART, i8042 or call port");
        return fail("hypercall", &mut d);
    }
    // Hostile arguments must come back as errors, not crash anything.
    let (st_unknown, _, _) = pv::call_args_nr(0xdead, [0; 5]);
    let (st_addr, _, _) = pv::call_args(Call::ConsoleWrite, [1 << 50, 4, 0, 0, 0]);
    let (st_len, _, _) = pv::call_args(
        Call::ConsoleWrite,
        [0x100000, wv_abi::MAX_CONSOLE_WRITE + 1, 0, 0, 0],
    );
    if st_unknown != status::UNKNOWN_CALL
        || st_addr != status::BAD_ADDRESS
        || st_len != status::BAD_LENGTH
    {
        d.s(" problem: bad calls gave ")
            .dec(u64::from(st_unknown))
            .s("/")
            .dec(u64::from(st_addr))
            .s("/")
            .dec(u64::from(st_len));
        return fail("hypercall", &mut d);
    }
    d.s(" errors=ok");
    pass("hypercall", &mut d)
}

const BATCH_N: usize = 32;

fn batch() -> Outcome {
    let mut d = Line::new();
    if !pv::on_worldvisor() {
        d.s("needs Worldvisor's call port (running natively or with probe.pv=off)");
        return report(Outcome::Skip, "batch", &mut d);
    }
    let dot = b".";
    // 1. The trapping privileged operation: N port writes to the UART, one exit each.
    crate::console::write_bytes(b"batch: trapping ");
    let c0 = pv::exit_count();
    let t0 = cpu::rdtsc();
    for _ in 0..BATCH_N {
        outb(0x3f8, b'.');
    }
    let t1 = cpu::rdtsc();
    let c1 = pv::exit_count();
    crate::console::write_bytes(b"\nbatch: calls    ");
    // 2. The same through N single VMM calls.
    let c2 = pv::exit_count();
    let t2 = cpu::rdtsc();
    for _ in 0..BATCH_N {
        pv::call_args(Call::ConsoleWrite, [dot.as_ptr() as u64, 1, 0, 0, 0]);
    }
    let t3 = cpu::rdtsc();
    let c3 = pv::exit_count();
    crate::console::write_bytes(b"\nbatch: batched  ");
    // 3. All N in one batched call.
    let mut blocks =
        [CallBlock::new(Call::ConsoleWrite, [dot.as_ptr() as u64, 1, 0, 0, 0]); BATCH_N];
    let c4 = pv::exit_count();
    let t4 = cpu::rdtsc();
    let (st, done) = pv::batch(&mut blocks);
    let t5 = cpu::rdtsc();
    let c5 = pv::exit_count();
    crate::console::write_bytes(b"\n");
    // Each exit_count() call is itself one exit: subtract the closing one.
    let (trap, single, batched) = (c1 - c0 - 1, c3 - c2 - 1, c5 - c4 - 1);
    // SAFETY: the VMM wrote the statuses; read them back volatile.
    let blocks = unsafe { core::ptr::read_volatile(&blocks) };
    let all_ok = blocks.iter().all(|b| b.status == status::OK);
    d.s("n=")
        .dec(BATCH_N as u64)
        .s(" trapping=")
        .dec(trap)
        .s(" exits/")
        .dec(t1 - t0)
        .s(" cycles")
        .s(" calls=")
        .dec(single)
        .s(" exits/")
        .dec(t3 - t2)
        .s(" cycles")
        .s(" batched=")
        .dec(batched)
        .s(" exits/")
        .dec(t5 - t4)
        .s(" cycles");
    let n = BATCH_N as u64;
    if st != status::OK || done != n || !all_ok || trap != n || single != n || batched != 1 {
        d.s(" problem: expected ")
            .dec(n)
            .s("/")
            .dec(n)
            .s("/1 exits and every batched call OK");
        return fail("batch", &mut d);
    }
    pass("batch", &mut d)
}

// The user-mode workload: an LCG stepped `USER_ITERS` times, result returned with `int3`;
// and an instruction that must trap at CPL3.
global_asm!(
    r#"
    .section .text
    .globl user_lcg
user_lcg:
    mov user_iters(%rip), %rcx
    mov user_seed(%rip), %rax
    movabs $6364136223846793005, %rdx
    movabs $1442695040888963407, %rsi
1:  imul %rdx, %rax
    add %rsi, %rax
    dec %rcx
    jnz 1b
    int3
2:  jmp 2b
    .globl user_burn
user_burn:
3:  pause
    jmp 3b
    .globl user_fill
user_fill:
    mov fill_base(%rip), %rdi
    mov fill_qwords(%rip), %rcx
    movabs $0x5a5aa5a55a5aa5a5, %rdx
5:  test %rcx, %rcx
    jz 6f
    mov %rdi, %rax
    xor %rdx, %rax
    mov %rax, (%rdi)
    add $8, %rdi
    dec %rcx
    jmp 5b
6:  int3
7:  jmp 7b
    .globl user_beat
user_beat:
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %rsi
    mov beat_cycles(%rip), %rcx
8:  pause
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    sub %rsi, %rax
    cmp %rcx, %rax
    jb 8b
    ud2
9:  jmp 9b
    .globl user_cpuid
user_cpuid:
    mov user_cpuid_in(%rip), %eax
    mov user_cpuid_in+4(%rip), %ecx
    cpuid
    mov %eax, user_cpuid_out(%rip)
    mov %ebx, user_cpuid_out+4(%rip)
    mov %ecx, user_cpuid_out+8(%rip)
    mov %edx, user_cpuid_out+12(%rip)
    int3
4:  jmp 4b
    .globl user_persist_step
user_persist_step:
    call persist_step_cpl3
    int3
5:  jmp 5b
    .globl user_persist_verify
user_persist_verify:
    call persist_verify_cpl3
    int3
6:  jmp 6b
    .globl user_privileged
user_privileged:
    hlt
3:  jmp 3b
    .section .data
    .globl user_iters
    .globl user_seed
    .p2align 3
user_iters: .quad 100000000
user_seed: .quad 12345
    .globl user_cpuid_in
    .globl user_cpuid_out
user_cpuid_in: .long 0, 0
    .globl fill_base
    .globl fill_qwords
    .globl beat_cycles
    .p2align 3
fill_base: .quad 0
fill_qwords: .quad 0
beat_cycles: .quad 250000
user_cpuid_out: .long 0, 0, 0, 0
    .text
"#,
    options(att_syntax)
);

extern "C" {
    fn user_cpuid();
    static mut user_cpuid_in: [u32; 2];
    static user_cpuid_out: [u32; 4];
    fn user_lcg();
    fn user_privileged();
    fn user_burn();
    fn user_persist_step();
    fn user_persist_verify();
    fn user_fill();
    fn user_beat();
    static mut fill_base: u64;
    static mut fill_qwords: u64;
    static mut beat_cycles: u64;
    static user_iters: u64;
    static user_seed: u64;
}

const LCG_A: u64 = 6364136223846793005;
const LCG_C: u64 = 1442695040888963407;

/// x after `n` LCG steps, by square-and-multiply (a few dozen kernel instructions).
fn lcg_jump(mut n: u64, x: u64) -> u64 {
    let (mut a, mut c) = (LCG_A, LCG_C);
    let (mut ra, mut rc) = (1u64, 0u64);
    while n > 0 {
        if n & 1 == 1 {
            ra = ra.wrapping_mul(a);
            rc = rc.wrapping_mul(a).wrapping_add(c);
        }
        c = a.wrapping_add(1).wrapping_mul(c);
        a = a.wrapping_mul(a);
        n >>= 1;
    }
    ra.wrapping_mul(x).wrapping_add(rc)
}

#[repr(C, align(16))]
struct UserStack([u8; 4096]);
#[link_section = ".stack"]
static USER_STACK: crate::sync::Global<UserStack> = crate::sync::Global::new(UserStack([0; 4096]));

fn user() -> Outcome {
    let mut d = Line::new();
    // SAFETY: plain reads of statics defined in the assembly above.
    let (iters, seed) = unsafe {
        (
            (&raw const user_iters).read_volatile(),
            (&raw const user_seed).read_volatile(),
        )
    };
    let stack_top = USER_STACK.as_ptr() as u64 + 4096;
    let user_ticks0 = cpu::USER_TICKS.load(Ordering::Relaxed);
    start_timer();
    let t0 = cpu::rdtsc();
    let got = crate::entry::run_user(user_lcg as *const () as u64, stack_top);
    let cycles = cpu::rdtsc().wrapping_sub(t0);
    stop_timer();
    let user_ticks = cpu::USER_TICKS.load(Ordering::Relaxed) - user_ticks0;
    let want = lcg_jump(iters, seed);
    d.s("iterations=")
        .dec(iters)
        .s(" cycles=")
        .dec(cycles)
        .s(" ticks-in-user=")
        .dec(user_ticks);
    let khz = tsc_khz();
    if let Some(ms) = cycles.checked_div(khz) {
        d.s(" elapsed=").dec(ms).s("ms");
    }
    if got != want {
        d.s(" problem: result ").hex(got).s(" expected ").hex(want);
        return fail("user", &mut d);
    }
    cpu::USER_FAULT_EXPECTED.store(1, Ordering::Relaxed);
    let trap = crate::entry::run_user(user_privileged as *const () as u64, stack_top);
    d.s(" hlt-at-cpl3=");
    if trap != 0xfa17_0000 | 13 {
        d.hex(trap).s(" problem: expected #GP");
        return fail("user", &mut d);
    }
    d.s("#GP");
    if user_ticks == 0 {
        d.s(" problem: no timer interrupt arrived while user code ran");
        return fail("user", &mut d);
    }
    pass("user", &mut d)
}

fn triple_fault() -> Outcome {
    crate::console::println("triplefault: loading an empty IDT and executing ud2");
    #[repr(C, packed)]
    struct Ptr {
        limit: u16,
        base: u64,
    }
    let p = Ptr { limit: 0, base: 0 };
    // SAFETY: deliberately fatal: with no IDT, #UD becomes #GP, #DF, then a triple fault.
    unsafe { core::arch::asm!("lidt [{}]", "ud2", in(reg) &p, options(nostack)) };
    let mut d = Line::new();
    fail("triplefault", d.s("still running after a triple fault"))
}

fn emulation_failure() -> Outcome {
    crate::console::println("emulfail: POPCNT with an MMIO operand (KVM's emulator has no POPCNT)");
    // SAFETY: deliberately fatal: the MMIO access makes KVM emulate an instruction it cannot.
    unsafe {
        core::arch::asm!("popcnt rax, qword ptr [{}]", in(reg) 0xd000_0000u64, out("rax") _, options(nostack));
    }
    let mut d = Line::new();
    fail("emulfail", d.s("POPCNT on MMIO completed"))
}

/// A kernel-mode `int3` reaches the #BP handler with the return address just past it, and
/// the kernel carries on. (On a host whose instruction emulator cannot run `int3` in guest
/// kernel mode, Worldvisor raises the #BP itself.)
fn int3_kernel() -> Outcome {
    use crate::cpu::{KERNEL_BP, KERNEL_BP_EXPECTED, KERNEL_BP_RIP};
    let before = KERNEL_BP.load(Ordering::Relaxed);
    KERNEL_BP_EXPECTED.store(1, Ordering::Relaxed);
    let after: u64;
    // SAFETY: int3 goes to this guest's own #BP handler, which returns to the next
    // instruction; `after` is that instruction's address.
    unsafe {
        core::arch::asm!("lea {a}, [rip + 2f]", "int3", "2:", a = out(reg) after, options(nostack));
    }
    KERNEL_BP_EXPECTED.store(0, Ordering::Relaxed);
    let hits = KERNEL_BP.load(Ordering::Relaxed) - before;
    let rip = KERNEL_BP_RIP.load(Ordering::Relaxed);
    let mut d = Line::new();
    d.s("bp=").dec(hits).s(" rip=").hex(rip);
    if hits != 1 || rip != after {
        d.s(" problem: expected one #BP returning to ").hex(after);
        return fail("int3", &mut d);
    }
    pass("int3", d.s(" returned-after-int3"))
}

/// CPUID as guest kernel code (CPL0) and as user code (CPL3) sees it, for the leaves a kernel
/// decides its features by: 1, 7.0, 0xD.0 and 0xD.1. Reports both; fails only when the two
/// disagree on leaf 1's feature bits (ECX/EDX), which the VMM's table should decide for both.
fn cpuid_test() -> Outcome {
    let stack_top = USER_STACK.as_ptr() as u64 + 4096;
    let mut d = Line::new();
    let mut agree = true;
    for (i, (leaf, sub)) in [(1u32, 0u32), (7, 0), (0xd, 0), (0xd, 1)]
        .into_iter()
        .enumerate()
    {
        let k = core::arch::x86_64::__cpuid_count(leaf, sub);
        let k = [k.eax, k.ebx, k.ecx, k.edx];
        // SAFETY: the user routine reads its input and writes its output through these statics
        // while the kernel waits in run_user; nothing else touches them.
        let u = unsafe {
            user_cpuid_in = [leaf, sub];
            crate::entry::run_user(user_cpuid as *const () as u64, stack_top);
            core::ptr::read_volatile(&raw const user_cpuid_out)
        };
        if i > 0 {
            d.s(" ");
        }
        d.hex(u64::from(leaf)).s(".").dec(u64::from(sub)).s(":k=");
        for (j, r) in k.iter().enumerate() {
            if j > 0 {
                d.s(",");
            }
            d.hex(u64::from(*r));
        }
        if u == k {
            d.s(":u=same");
        } else {
            d.s(":u=");
            for (j, r) in u.iter().enumerate() {
                if j > 0 {
                    d.s(",");
                }
                d.hex(u64::from(*r));
            }
        }
        if leaf == 1 && (k[2] != u[2] || k[3] != u[3]) {
            agree = false;
        }
    }
    if !agree {
        d.s(" problem: leaf 1 features differ between kernel and user mode");
        return fail("cpuid", &mut d);
    }
    pass("cpuid", &mut d)
}

fn reset() -> Outcome {
    crate::console::println("reset: i8042 command 0xfe");
    outb(0x64, 0xfe);
    let mut d = Line::new();
    fail("reset", d.s("still running after the reset command"))
}

/// A CPU-bound world for the scheduler's tests and benchmark: spins at CPL3 (native speed
/// under PVM) until the VM is stopped. Its progress is the CPU time the host gives it.
fn burn() -> Outcome {
    crate::console::println("burn: spinning at CPL3 until stopped");
    let stack_top = USER_STACK.as_ptr() as u64 + 4096;
    let r = crate::entry::run_user(user_burn as *const () as u64, stack_top);
    let mut d = Line::new();
    fail("burn", d.s("left user mode: ").hex(r))
}

/// A VM that stays up and costs no CPU (a clone test measures its memory while it lives):
/// halts with interrupts off until the VM is stopped.
fn idle() -> Outcome {
    crate::console::println("idle: halted until stopped");
    loop {
        cpu::cli();
        // SAFETY: halting with interrupts off is the intended state; the host ends the VM.
        unsafe { core::arch::asm!("hlt", options(nomem, nostack)) }
    }
}

/// Where `probe.touch` memory starts: above the image, its stacks and the loader's structures.
const TOUCH_BASE: u64 = 32 << 20;

/// The word `probe.touch` writes into page `page` (never zero, so no page is a hole in a
/// snapshot).
fn touch_word(page: u64) -> u64 {
    (page ^ 0x5756_0000_0000_0000).wrapping_mul(LCG_A) | 1
}

/// `probe.touch=MIB`: writes one word into every page of MIB MiB from [`TOUCH_BASE`] up (or,
/// with `check`, reads them back); Err(problem) when the range is not RAM or a word differs.
fn touch(mib: u64, check: bool) -> Result<(), &'static str> {
    let bi = boot_info();
    let len = mib << 20;
    if !bi.in_ram(TOUCH_BASE, len) {
        return Err("probe.touch: the range is not all RAM");
    }
    let (ia, isz) = bi.initrd;
    if isz != 0 && ia < TOUCH_BASE + len && TOUCH_BASE < ia + isz {
        return Err("probe.touch: the range overlaps the initrd");
    }
    for page in 0..len / 4096 {
        let p = (TOUCH_BASE + page * 4096) as *mut u64;
        // SAFETY: the page is RAM (checked above), identity mapped, and used by nothing else
        // (above the image and its stacks, outside the initrd).
        unsafe {
            if !check {
                p.write_volatile(touch_word(page));
            } else if p.read_volatile() != touch_word(page) {
                return Err("probe.touch: memory changed");
            }
        }
    }
    Ok(())
}

/// One inflate or deflate request: up to 1024 PFNs (one page).
#[repr(C, align(4096))]
struct PfnPage([u32; 1024]);
static mut BALLOON_PFNS: PfnPage = PfnPage([0; 1024]);
/// The statistics buffer: (le16 tag, le64 value) entries, packed.
static mut BALLOON_STATS: [u8; 40] = [0; 40];

/// Sends `n` PFNs of [`BALLOON_PFNS`] on queue `q` and waits for the device to take them.
fn balloon_send(dev: &mut crate::virtio::Device, q: u16, n: usize) -> bool {
    let addr = (&raw const BALLOON_PFNS) as u64;
    dev.submit(q, &[(addr, 4 * n as u32, 0)]).is_some()
}

/// Fills the statistics buffer (free, total and available memory) and posts it.
fn balloon_post_stats(dev: &mut crate::virtio::Device, q: u16, free: u64, total: u64) -> bool {
    // SAFETY: the buffer is this test's; the device has given it back (or never had it).
    let Some(b) = (unsafe { (&raw mut BALLOON_STATS).as_mut() }) else {
        return false;
    };
    for (i, (tag, v)) in [(4u16, free), (5, total), (6, free), (3, 0)]
        .iter()
        .enumerate()
    {
        b[10 * i..10 * i + 2].copy_from_slice(&tag.to_le_bytes());
        b[10 * i + 2..10 * i + 10].copy_from_slice(&v.to_le_bytes());
    }
    dev.post(q, &[((&raw const BALLOON_STATS) as u64, 40, 0)])
}

/// `probe.tests=balloon`: a virtio-balloon driver that runs until 'q' on the console.
///
/// It owns a pool of `probe.balloon_mib` MiB (default 64) from [`TOUCH_BASE`], touched at the
/// start ("balloon: touched"), and follows the host's target (`num_pages`, polled): it
/// inflates by giving pool pages to the host (from the top of the pool down), deflates by
/// taking them back and touching them again, and writes `actual` ("balloon: actual=N" each
/// time). It posts statistics and posts them again whenever the device gives the buffer back:
/// total memory (RAM less the balloon), and free and available memory (the pool pages neither
/// in the balloon nor in the working set; everything outside the pool counts as used).
///
/// Console commands: 'b' makes it busy: it allocates a working set of `probe.balloon_busy_mib`
/// MiB (default the whole pool) from the bottom of the pool, touching each page, as far as
/// the balloon leaves room, and grows it as the host deflates the balloon ("balloon: busy"
/// at once, "balloon: busy=N MiB" once all of it is held); 'i' makes it idle: the working set
/// is freed ("balloon: idle"; its pages stay touched, as a real guest's freed pages stay
/// resident until ballooned or reported). The balloon never takes working-set pages: a
/// target beyond the free pool waits for memory to come free. 'f' touches the
/// `probe.balloon_report_mib` MiB after the pool ("balloon: filled"), 'r' reports them free
/// ("balloon: reported"), 'q' ends. With
/// `probe.balloon_hostile=1` it first sends PFNs outside RAM, a buffer outside RAM, a huge
/// inflate of pages beyond RAM and the pool twice ("balloon: hostile done"), then behaves.
/// With `probe.balloon_quit=1` it passes right after the set-up (and the hostile requests).
fn balloon_test() -> Outcome {
    use crate::virtio::{self, DESC_WRITE};
    const F_STATS: u64 = 1 << 1;
    const F_REPORTING: u64 = 1 << 5;
    let bi = boot_info();
    let cmdline = bi.cmdline();
    let mut d = Line::new();
    let num = |k: &str, def: u64| param(cmdline, k).map_or(Some(def), parse_u64);
    let (Some(pool_mib), Some(report_mib), Some(hostile), Some(quit)) = (
        num("probe.balloon_mib", 64),
        num("probe.balloon_report_mib", 0),
        num("probe.balloon_hostile", 0),
        num("probe.balloon_quit", 0),
    ) else {
        return fail("balloon", d.s("a probe.balloon_* value is not a number"));
    };
    let Some(busy_mib) = num("probe.balloon_busy_mib", pool_mib) else {
        return fail("balloon", d.s("a probe.balloon_* value is not a number"));
    };
    if busy_mib > pool_mib {
        return fail("balloon", d.s("probe.balloon_busy_mib is beyond the pool"));
    }
    let busy_goal = (busy_mib << 20) / 4096;
    let pool_pages = (pool_mib << 20) / 4096;
    let report_base = TOUCH_BASE + (pool_mib << 20);
    if !bi.in_ram(TOUCH_BASE, (pool_mib + report_mib) << 20) || pool_pages > u64::from(u32::MAX) {
        return fail("balloon", d.s("the pool and report region are not all RAM"));
    }
    let Some(mut dev) = virtio::find(0x1045) else {
        return fail(
            "balloon",
            d.s("no modern virtio-balloon device (1af4:1045) on bus 0"),
        );
    };
    let Some(offered) = dev.negotiate(F_STATS | F_REPORTING) else {
        return fail("balloon", d.s("feature negotiation failed"));
    };
    let stats = offered & F_STATS != 0;
    let reporting = offered & F_REPORTING != 0;
    let (stats_q, report_q) = (2u16, if stats { 3u16 } else { 2 });
    let queues = 2 + u16::from(stats) + u16::from(reporting);
    if (0..queues).any(|q| !dev.setup_queue(q)) || !dev.driver_ok() {
        d.s("device set-up failed (status ")
            .hex(u64::from(dev.status()))
            .s(")");
        return fail("balloon", &mut d);
    }
    for page in 0..pool_pages {
        // SAFETY: pool pages are RAM (checked), identity mapped, used by nothing else.
        unsafe { ((TOUCH_BASE + page * 4096) as *mut u64).write_volatile(touch_word(page)) };
    }
    let total = bi.ram_total();
    // (free, total) with `held` pages in the balloon and `busy` in the working set.
    let counts = |held: u64, busy: u64| {
        (
            pool_pages.saturating_sub(held + busy) * 4096,
            total.saturating_sub(held * 4096),
        )
    };
    let (free0, total0) = counts(0, 0);
    if stats && !balloon_post_stats(&mut dev, stats_q, free0, total0) {
        return fail("balloon", d.s("posting statistics failed"));
    }
    {
        let mut l = Line::new();
        l.s("balloon: touched ")
            .dec(pool_mib)
            .s(" MiB stats=")
            .dec(u64::from(stats))
            .s(" reporting=")
            .dec(u64::from(reporting));
        l.end();
    }
    // SAFETY: the PFN page is this test's and the device is done with it between requests.
    let Some(PfnPage(pfns)) = (unsafe { (&raw mut BALLOON_PFNS).as_mut() }) else {
        return fail("balloon", d.s("no PFN page"));
    };
    if hostile != 0 {
        let beyond = (total >> 12) + 4096;
        pfns[..3].copy_from_slice(&[u32::MAX, 0xc_0000, beyond as u32]);
        let mut ok = balloon_send(&mut dev, 0, 3) && balloon_send(&mut dev, 1, 3);
        // A buffer outside RAM.
        ok &= dev.submit(0, &[(total + (64 << 20), 4096, 0)]).is_some();
        // A huge inflate: 16 requests of 1024 pages beyond RAM.
        for r in 0..16u64 {
            for (i, p) in pfns.iter_mut().enumerate() {
                *p = (beyond + r * 1024 + i as u64) as u32;
            }
            ok &= balloon_send(&mut dev, 0, 1024);
        }
        // The first 1024 pool pages inflated twice, then deflated (they are touched again
        // below, as any deflated page is).
        let first = TOUCH_BASE >> 12;
        for (i, p) in pfns.iter_mut().enumerate() {
            *p = (first + i as u64) as u32;
        }
        ok &= balloon_send(&mut dev, 0, 1024) && balloon_send(&mut dev, 0, 1024);
        ok &= balloon_send(&mut dev, 1, 1024);
        for page in 0..1024 {
            // SAFETY: as for the pool's touch above.
            unsafe { ((TOUCH_BASE + page * 4096) as *mut u64).write_volatile(touch_word(page)) };
        }
        if !ok {
            return fail(
                "balloon",
                d.s("the device did not complete a hostile request"),
            );
        }
        crate::console::println("balloon: hostile done");
    }
    if quit != 0 {
        return pass("balloon", d.s("quit after set-up"));
    }
    let mut held = 0u64;
    // The working set: pool pages 0..busy; `busy_on` while it is to grow to `busy_goal`.
    let mut busy = 0u64;
    let mut busy_on = false;
    let mut warned = false;
    // The target is read again only when the configuration generation moves.
    let mut generation = dev.config_generation();
    let mut target = u64::from(dev.config::<u32>(0));
    loop {
        if crate::console::inb(0x3fd) & 1 != 0 {
            match crate::console::inb(0x3f8) {
                b'q' => {
                    d.s("held=").dec(held);
                    return pass("balloon", &mut d);
                }
                b'f' => {
                    for page in 0..(report_mib << 20) / 4096 {
                        // SAFETY: the report region is RAM (checked) and only this test's.
                        unsafe {
                            ((report_base + page * 4096) as *mut u64)
                                .write_volatile(touch_word(page))
                        };
                    }
                    crate::console::println("balloon: filled");
                }
                b'b' => {
                    busy_on = true;
                    crate::console::println("balloon: busy");
                }
                b'i' => {
                    busy_on = false;
                    busy = 0;
                    crate::console::println("balloon: idle");
                }
                b'r' if reporting => {
                    // 2 MiB buffers, up to 8 per report, as a guest's free-page blocks.
                    let blocks = report_mib / 2;
                    let mut b = 0;
                    while b < blocks {
                        let mut bufs = [(0u64, 0u32, 0u16); 8];
                        let n = (blocks - b).min(8) as usize;
                        for (i, x) in bufs[..n].iter_mut().enumerate() {
                            *x = (report_base + ((b + i as u64) << 21), 2 << 20, DESC_WRITE);
                        }
                        if dev.submit(report_q, &bufs[..n]).is_none() {
                            return fail("balloon", d.s("a free page report was not completed"));
                        }
                        b += n as u64;
                    }
                    crate::console::println("balloon: reported");
                }
                _ => {}
            }
        }
        if busy_on && busy < busy_goal {
            // Grow the working set into the free pool, at most 16 MiB a round.
            let grow = (busy_goal - busy)
                .min(pool_pages.saturating_sub(held + busy))
                .min(4096);
            for page in busy..busy + grow {
                // SAFETY: a pool page (RAM, checked) neither in the balloon nor in use.
                unsafe {
                    ((TOUCH_BASE + page * 4096) as *mut u64).write_volatile(touch_word(page))
                };
            }
            busy += grow;
            if busy == busy_goal {
                let mut l = Line::new();
                l.s("balloon: busy=").dec(busy_mib).s(" MiB");
                l.end();
            }
        }
        if stats && dev.wait_used(stats_q, 0).is_some() {
            // The device wants fresh statistics.
            let (f, t) = counts(held, busy);
            balloon_post_stats(&mut dev, stats_q, f, t);
        }
        let g = dev.config_generation();
        if g != generation {
            generation = g;
            target = u64::from(dev.config::<u32>(0));
        }
        // Never the working set's pages.
        let want = target.min(pool_pages - busy);
        if target > pool_pages && !warned {
            warned = true;
            crate::console::println("balloon: target beyond the pool");
        }
        if want != held {
            while held < want {
                let n = (want - held).min(1024) as usize;
                // From the top of the pool down.
                for (i, p) in pfns[..n].iter_mut().enumerate() {
                    *p = ((TOUCH_BASE >> 12) + pool_pages - 1 - held - i as u64) as u32;
                }
                if !balloon_send(&mut dev, 0, n) {
                    return fail("balloon", d.s("an inflate was not completed"));
                }
                held += n as u64;
            }
            while held > want {
                let n = (held - want).min(1024) as usize;
                // The lowest pages in the balloon first.
                let low = pool_pages - held;
                for (i, p) in pfns[..n].iter_mut().enumerate() {
                    *p = ((TOUCH_BASE >> 12) + low + i as u64) as u32;
                }
                if !balloon_send(&mut dev, 1, n) {
                    return fail("balloon", d.s("a deflate was not completed"));
                }
                for i in 0..n as u64 {
                    let page = low + i;
                    // SAFETY: a pool page the guest has back.
                    unsafe {
                        ((TOUCH_BASE + page * 4096) as *mut u64).write_volatile(touch_word(page))
                    };
                }
                held -= n as u64;
            }
            dev.set_config::<u32>(4, held as u32);
            let mut l = Line::new();
            l.s("balloon: actual=").dec(held);
            l.end();
        }
        // Poll again in about a millisecond.
        let t = cpu::rdtsc();
        while cpu::rdtsc().wrapping_sub(t) < 2_000_000 {
            core::hint::spin_loop();
        }
    }
}

fn hex_bytes(d: &mut Line, b: &[u8]) {
    for &x in b {
        for nib in [x >> 4, x & 0xf] {
            d.b(if nib < 10 {
                b'0' + nib
            } else {
                b'a' + nib - 10
            });
        }
    }
}

/// The VM generation (`Call::VmGeneration`, as VMGenID): passes with the 128-bit generation id
/// and the restore count (`PASS genid id=HEX restores=N`). With `probe.genid=wait` it first
/// prints `genid: id=HEX restores=N waiting` and polls every 10 ms (`probe.genidms`, 1-1000;
/// halted between LAPIC timer ticks) until the id changes, which is what a restore or a clone of a snapshot taken while it
/// waits does, then passes with the new values and the old id (`was=HEX`). `probe.touch=MIB`
/// writes a word into every page of MIB MiB before that and checks them all after the change
/// (memory a clone's guest reads from the snapshot).
fn genid() -> Outcome {
    let mut d = Line::new();
    let Some((id, restores)) = pv::vm_generation() else {
        d.s("needs Worldvisor's vm_generation call");
        return report(Outcome::Skip, "genid", &mut d);
    };
    let cmdline = boot_info().cmdline();
    let touched = param(cmdline, "probe.touch")
        .and_then(parse_u64)
        .unwrap_or(0);
    if touched > 0 {
        if let Err(e) = touch(touched, false) {
            return fail("genid", d.s(e));
        }
    }
    if param(cmdline, "probe.genid") != Some(b"wait") {
        d.s("id=");
        hex_bytes(&mut d, &id);
        d.s(" restores=").dec(restores);
        return pass("genid", &mut d);
    }
    let mut l = Line::new();
    l.s("genid: id=");
    hex_bytes(&mut l, &id);
    l.s(" restores=").dec(restores).s(" waiting");
    l.end();
    let poll_ms = param(cmdline, "probe.genidms")
        .and_then(parse_u64)
        .unwrap_or(10)
        .clamp(1, 1000);
    lapic::enable();
    lapic::write(lapic::TIMER_DIV, 0xb);
    lapic::write(lapic::LVT_TIMER, 0x20000 | u32::from(cpu::TIMER_VECTOR));
    lapic::write(lapic::TIMER_INIT, TIMER_PERIOD * poll_ms as u32);
    let now = loop {
        cpu::wait_for_interrupt();
        match pv::vm_generation() {
            Some(now) if now.0 != id => break Some(now),
            Some(_) => {}
            None => break None,
        }
    };
    stop_timer();
    let Some((new_id, new_restores)) = now else {
        return fail("genid", d.s("the vm_generation call stopped working"));
    };
    d.s("id=");
    hex_bytes(&mut d, &new_id);
    d.s(" restores=").dec(new_restores).s(" was=");
    hex_bytes(&mut d, &id);
    if touched > 0 {
        if let Err(e) = touch(touched, true) {
            return fail("genid", d.s(" ").s(e));
        }
        d.s(" touched=").dec(touched).s("MiB");
    }
    if new_restores <= restores {
        d.s(" problem: the id changed but the restore count did not grow");
        return fail("genid", &mut d);
    }
    pass("genid", &mut d)
}

/// A guest with a chosen amount of memory in use, for snapshot benchmarks: at CPL3 (native
/// speed under PVM) it writes a pattern (each quadword its address XOR a constant) over
/// `probe.fill_mib` MiB (default 0) from the first 2 MiB boundary above the image, prints
/// `fill: done mib=N base=ADDR cycles=C`, then beats until stopped: user code spins on the TSC
/// for `probe.beat_cycles` cycles (default 250000) and faults back (`ud2`), the kernel writes one
/// `.` to COM1, and again.
/// So the first byte after a restore says when the guest runs again. Never returns on success.
fn fill() -> Outcome {
    let bi = boot_info();
    let cmdline = bi.cmdline();
    let mut d = Line::new();
    let Some(mib) = param(cmdline, "probe.fill_mib").map_or(Some(0), parse_u64) else {
        return fail("fill", d.s("probe.fill_mib is not a number"));
    };
    let Some(beat) = param(cmdline, "probe.beat_cycles").map_or(Some(250_000), parse_u64) else {
        return fail("fill", d.s("probe.beat_cycles is not a number"));
    };
    extern "C" {
        static __image_end: u8;
    }
    const TWO_MIB: u64 = 2 << 20;
    let base = ((&raw const __image_end) as u64).div_ceil(TWO_MIB) * TWO_MIB;
    let Some(len) = mib.checked_mul(1 << 20) else {
        return fail("fill", d.s("probe.fill_mib too large"));
    };
    // The user mapping is the identity map of the low 4 GiB.
    if base.saturating_add(len) > 1 << 32 || (len > 0 && !bi.in_ram(base, len)) {
        d.s("problem: ")
            .dec(mib)
            .s(" MiB from ")
            .hex(base)
            .s(" is not all RAM");
        return fail("fill", &mut d);
    }
    let (rd, rs) = bi.initrd;
    if len > 0 && rs > 0 && rd < base + len && base < rd.saturating_add(rs) {
        d.s("problem: the fill would overwrite the initrd at ")
            .hex(rd);
        return fail("fill", &mut d);
    }
    let stack_top = USER_STACK.as_ptr() as u64 + 4096;
    // SAFETY: the user routines read these statics while the kernel waits in run_user; nothing
    // else touches them.
    unsafe {
        fill_base = base;
        fill_qwords = len / 8;
        beat_cycles = beat;
    }
    let t0 = cpu::rdtsc();
    let r = crate::entry::run_user(user_fill as *const () as u64, stack_top);
    let cycles = cpu::rdtsc().wrapping_sub(t0);
    if r != base.wrapping_add(len).wrapping_sub(8) ^ 0x5a5a_a5a5_5a5a_a5a5 && len > 0 {
        return fail("fill", d.s("the fill came back with ").hex(r));
    }
    d.s("fill: done mib=")
        .dec(mib)
        .s(" base=")
        .hex(base)
        .s(" cycles=")
        .dec(cycles);
    d.end();
    // The beat comes back with a fault (#UD), not `int3`: a fault leaves RIP on the faulting
    // instruction, so a snapshot taken while it is being delivered runs it again after the
    // restore. On this host (PVM) a snapshot taken while a user-mode `int3` is being delivered
    // loses the #BP (KVM does not report software exceptions in KVM_GET_VCPU_EVENTS, and PVM has
    // already moved RIP past the `int3`): the restored guest would spin after it forever.
    loop {
        cpu::USER_FAULT_EXPECTED.store(1, Ordering::Relaxed);
        let r = crate::entry::run_user(user_beat as *const () as u64, stack_top);
        if r != 0xfa17_0000 | 6 {
            let mut d = Line::new();
            return fail("fill", d.s("the beat came back with ").hex(r));
        }
        crate::console::uart_putb(b'.');
    }
}

/// Interactive console check: echoes what arrives on COM1 until a `q`, then passes with the
/// count. Polls the UART (no interrupts), so it waits as long as nobody types.
fn echo() -> Outcome {
    crate::console::println("echo: type, 'q' ends");
    let mut n = 0u64;
    loop {
        if crate::console::inb(0x3fd) & 1 == 0 {
            core::hint::spin_loop();
            continue;
        }
        let c = crate::console::inb(0x3f8);
        if c == b'q' {
            let mut d = Line::new();
            return pass("echo", d.s("echoed=").dec(n));
        }
        crate::console::uart_putb(c);
        n += 1;
    }
}

fn hang() -> Outcome {
    crate::console::println("hang: spinning with interrupts off");
    loop {
        core::hint::spin_loop();
    }
}

fn pci_test() -> Outcome {
    let mut d = Line::new();
    let mut found = [crate::pci::Function::default(); 32];
    let n = crate::pci::scan(&mut found);
    d.s("functions=").dec(n as u64);
    for f in &found[..n] {
        d.s(" ")
            .dec(u64::from(f.dev))
            .s(":")
            .hex(u64::from(f.vendor))
            .s("/")
            .hex(u64::from(f.device));
    }
    // Bus 0 has a host bridge (class 06/00) at 00:00.0 on every PC, Worldvisor and QEMU alike.
    if n == 0 || found[0].dev != 0 || found[0].class >> 8 != 0x0600 {
        d.s(" problem: no host bridge at 00:00.0");
        return fail("pci", &mut d);
    }
    // Writes go through: the interrupt-line byte (register 0x3c) is scratch for software,
    // while the IDs stay read-only.
    let before = crate::pci::read32(0, 0x3c);
    crate::pci::write32(0, 0x3c, (before & !0xff) | 0x5a);
    let after = crate::pci::read32(0, 0x3c);
    crate::pci::write32(0, 0x3c, before);
    crate::pci::write32(0, 0, 0xdead_beef);
    let ids = crate::pci::read32(0, 0);
    if after & 0xff != 0x5a
        || ids != u32::from(found[0].vendor) | (u32::from(found[0].device) << 16)
    {
        d.s(" problem: configuration writes misbehave (line ")
            .hex(u64::from(after))
            .s(", ids ")
            .hex(u64::from(ids))
            .s(")");
        return fail("pci", &mut d);
    }
    pass("pci", &mut d)
}

static mut RNG_BUF: [[u8; 64]; 2] = [[0; 64]; 2];

fn rng_test() -> Outcome {
    use crate::virtio;
    let mut d = Line::new();
    let Some(mut dev) = virtio::find(0x1044) else {
        d.s("no modern virtio-rng device (1af4:1044) on bus 0");
        return fail("rng", &mut d);
    };
    d.s("slot=").dec(u64::from(dev.slot));
    if dev.negotiate(0).is_none() || !dev.setup_queue(0) || !dev.driver_ok() {
        d.s(" problem: device set-up failed (status ")
            .hex(u64::from(dev.status()))
            .s(")");
        return fail("rng", &mut d);
    }
    let bufs = (&raw mut RNG_BUF) as *mut [u8; 64];
    let mut lens = [0u32; 2];
    for (i, l) in lens.iter_mut().enumerate() {
        // SAFETY: index 0 or 1 of a static array only this test uses.
        let addr = unsafe { bufs.add(i) } as u64;
        match dev.submit(0, &[(addr, 64, virtio::DESC_WRITE)]) {
            Some(n) => *l = n,
            None => {
                d.s(" problem: request ")
                    .dec(i as u64)
                    .s(" was not completed");
                return fail("rng", &mut d);
            }
        }
    }
    // SAFETY: the device has finished writing both buffers (their requests were used).
    let (a, b) = unsafe {
        (
            core::ptr::read_volatile(bufs),
            core::ptr::read_volatile(bufs.add(1)),
        )
    };
    d.s(" lens=")
        .dec(u64::from(lens[0]))
        .s(",")
        .dec(u64::from(lens[1]));
    if lens != [64, 64] || a == [0; 64] || a == b {
        d.s(" problem: expected two different 64-byte random buffers");
        return fail("rng", &mut d);
    }
    // The driver left MSI-X off, so completions were signalled on INTx with ISR bit 0, which
    // reading clears.
    let (isr, isr_again) = (dev.isr(), dev.isr());
    d.s(" isr=").hex(u64::from(isr));
    if isr & 1 == 0 || isr_again != 0 {
        d.s(" problem: ISR should report a queue interrupt once");
        return fail("rng", &mut d);
    }
    if !dev.reset() {
        d.s(" problem: reset did not clear the status");
        return fail("rng", &mut d);
    }
    d.s(" reset=ok");
    // The same request with MSI-X: table entry 0 -> this CPU's local APIC, vector 0x50.
    lapic::enable();
    let before = cpu::MSIX_HITS.load(Ordering::Relaxed);
    if dev.negotiate(0).is_none() || !dev.setup_queue(0) {
        d.s(" problem: set-up after reset failed");
        return fail("rng", &mut d);
    }
    dev.set_queue_vector(0, 0);
    if !dev.enable_msix(0, lapic::id() as u8, cpu::MSIX_VECTOR) || !dev.driver_ok() {
        d.s(" problem: no MSI-X capability");
        return fail("rng", &mut d);
    }
    // SAFETY: index 0 of the test's static buffers.
    let addr = bufs as u64;
    if dev.submit(0, &[(addr, 64, virtio::DESC_WRITE)]) != Some(64) {
        d.s(" problem: the MSI-X request was not completed");
        return fail("rng", &mut d);
    }
    let start = cpu::rdtsc();
    while cpu::MSIX_HITS.load(Ordering::Relaxed) == before
        && cpu::rdtsc().wrapping_sub(start) < 4_000_000_000
    {
        cpu::enable_interrupts_briefly();
    }
    let hits = cpu::MSIX_HITS.load(Ordering::Relaxed) - before;
    d.s(" msix=").dec(hits);
    // (Whether the ISR bit is also set with MSI-X differs between implementations: QEMU sets
    // it, Worldvisor does not; drivers ignore it then.)
    if hits == 0 {
        d.s(" problem: expected an MSI-X interrupt");
        return fail("rng", &mut d);
    }
    dev.reset();
    // Move the device, as an OS reassigning resources would, and use it at its new place.
    dev.move_bar(0xd800_0000);
    let moved = virtio::find(0x1044).and_then(|mut m| {
        m.negotiate(0)?;
        (m.setup_queue(0) && m.driver_ok()).then_some(())?;
        let n = m.submit(0, &[(addr, 64, virtio::DESC_WRITE)]);
        m.reset();
        n
    });
    d.s(" bar-moved=");
    if moved != Some(64) {
        d.s("failed problem: the device did not work after its BAR moved");
        return fail("rng", &mut d);
    }
    d.s("ok");
    pass("rng", &mut d)
}

#[repr(C, align(512))]
struct BlkBufs {
    hdr: [u8; 16],
    status: [u8; 16],
    data: [u8; 512],
}
static mut BLK: BlkBufs = BlkBufs {
    hdr: [0; 16],
    status: [0; 16],
    data: [0; 512],
};

/// One request: (type, sector), data in BLK.data (`len` bytes, device-writable if `to_guest`).
fn blk_request(
    dev: &mut crate::virtio::Device,
    ty: u32,
    sector: u64,
    len: u32,
    to_guest: bool,
) -> Option<u8> {
    blk_request_within(dev, ty, sector, len, to_guest, 5_000_000_000)
}

/// [`blk_request`], waiting up to `cycles` TSC cycles for the device.
fn blk_request_within(
    dev: &mut crate::virtio::Device,
    ty: u32,
    sector: u64,
    len: u32,
    to_guest: bool,
    cycles: u64,
) -> Option<u8> {
    use crate::virtio::DESC_WRITE;
    let b = &raw mut BLK;
    // SAFETY: the buffers are this test's; the device is idle between requests.
    let bufs = unsafe { &mut *b };
    bufs.hdr[0..4].copy_from_slice(&ty.to_le_bytes());
    bufs.hdr[4..8].fill(0);
    bufs.hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    bufs.status[0] = 0xee;
    let (hdr, data, status) = unsafe {
        (
            (&raw mut (*b).hdr) as u64,
            (&raw mut (*b).data) as u64,
            (&raw mut (*b).status) as u64,
        )
    };
    let posted = if len == 0 {
        dev.post(0, &[(hdr, 16, 0), (status, 1, DESC_WRITE)])
    } else {
        dev.post(
            0,
            &[
                (hdr, 16, 0),
                (data, len, if to_guest { DESC_WRITE } else { 0 }),
                (status, 1, DESC_WRITE),
            ],
        )
    };
    if !posted {
        return None;
    }
    dev.wait_used(0, cycles)?;
    // SAFETY: the device has completed the request.
    Some(unsafe { core::ptr::read_volatile(&raw const (*b).status[0]) })
}

/// The ACPI tables: the RSDP, every table of the root table with a valid checksum, and on
/// Worldvisor a hardware-reduced FADT with a sleep control register and `_S5_`, and a MADT
/// listing as many processors as the MP table. (With `probe.poweroff=acpi` the guest then
/// powers off through S5.)
fn acpi_test() -> Outcome {
    use crate::acpi;
    let mut d = Line::new();
    let Some(rsdp) = acpi::rsdp() else {
        return fail("acpi", d.s("no RSDP (loader hint or BIOS-area scan)"));
    };
    let Some((root, size)) = acpi::root() else {
        return fail("acpi", d.s("no valid XSDT or RSDT"));
    };
    d.s("rsdp=")
        .hex(rsdp)
        .s(if size == 8 { " xsdt=" } else { " rsdt=" })
        .hex(root)
        .s(" tables=");
    for (i, t) in acpi::entries((root, size)).enumerate() {
        // SAFETY: the root table's entries point at tables in identity-mapped low memory.
        let sig = unsafe { (t as *const [u8; 4]).read_unaligned() };
        if i > 0 {
            d.s(",");
        }
        d.bytes(&sig);
        if !acpi::valid(t) {
            d.s(" problem: bad checksum or length");
            return fail("acpi", &mut d);
        }
    }
    let dsdt = acpi::dsdt();
    d.s(if dsdt.is_some() { ",DSDT" } else { ",no-DSDT" });
    let Some((lapics, ioapics)) = acpi::madt_counts() else {
        d.s(" problem: no valid MADT");
        return fail("acpi", &mut d);
    };
    d.s(" lapics=").dec(lapics).s(" ioapics=").dec(ioapics);
    if !crate::pv::on_worldvisor() {
        return pass("acpi", &mut d);
    }
    let mp = crate::smp::mptable_cpus();
    let (hw, port, s5) = (
        acpi::hw_reduced(),
        acpi::sleep_control_port(),
        acpi::s5_sleep_type(),
    );
    d.s(" hw-reduced=").s(if hw { "yes" } else { "no" });
    if let Some(p) = port {
        d.s(" sleep-port=").hex(u64::from(p));
    }
    if let Some(t) = s5 {
        d.s(" s5=").dec(u64::from(t));
    }
    if dsdt.is_none() || !hw || port.is_none() || s5.is_none() {
        d.s(" problem: Worldvisor's tables need a DSDT, a hardware-reduced FADT, a sleep control register and _S5_");
        return fail("acpi", &mut d);
    }
    if ioapics != 1 || Some(lapics) != mp {
        d.s(" problem: the MADT and the MP table disagree (mp cpus ");
        d.dec(mp.unwrap_or(0)).s(")");
        return fail("acpi", &mut d);
    }
    // ECAM: the MCFG's window shows every slot as the configuration ports do.
    let Some(ecam) = acpi::ecam_base() else {
        d.s(" problem: no MCFG entry for bus 0");
        return fail("acpi", &mut d);
    };
    d.s(" ecam=").hex(ecam);
    for dev in 0..32u8 {
        let (port, mem) = (crate::pci::read32(dev, 0), acpi::ecam_read32(ecam, dev, 0));
        if port != mem {
            d.s(" problem: slot ")
                .dec(u64::from(dev))
                .s(" reads ")
                .hex(u64::from(mem));
            d.s(" through ECAM, ")
                .hex(u64::from(port))
                .s(" through the ports");
            return fail("acpi", &mut d);
        }
    }
    if acpi::ecam_read32(ecam, 0, 0x100) != 0 {
        d.s(" problem: extended configuration space is not empty");
        return fail("acpi", &mut d);
    }
    pass("acpi", &mut d)
}

/// A hot-plugged disk: set up, its id read, sector 1 written and read back. Prints
/// "hotplug: added slot=S blk ID rw-ok" (or the problem) and leaves the device running.
fn hotplug_blk(slot: u8, seed: u8) -> bool {
    let mut l = Line::new();
    l.s("hotplug: added slot=").dec(u64::from(slot)).s(" blk ");
    let Some(mut dev) = crate::virtio::at_slot(slot) else {
        l.s("problem: no virtio capabilities").end();
        return false;
    };
    if dev.negotiate(0).is_none() || !dev.setup_queue(0) || !dev.driver_ok() {
        l.s("problem: set-up failed").end();
        return false;
    }
    let b = &raw mut BLK;
    if blk_request(&mut dev, 8, 0, 20, true) != Some(0) {
        l.s("problem: GET_ID failed").end();
        return false;
    }
    // SAFETY: the device wrote the id into the data buffer.
    let id = unsafe { core::ptr::read_volatile(&raw const (*b).data) };
    let idlen = id[..20].iter().position(|&c| c == 0).unwrap_or(20);
    l.bytes(&id[..idlen]);
    // SAFETY: the device is idle; the buffer is this test's.
    let bufs = unsafe { &mut *b };
    for (i, x) in bufs.data.iter_mut().enumerate() {
        *x = (i as u8) ^ seed;
    }
    if blk_request(&mut dev, 1, 1, 512, false) != Some(0) {
        l.s(" problem: write failed").end();
        return false;
    }
    // SAFETY: the device is idle.
    unsafe { (*b).data = [0; 512] };
    if blk_request(&mut dev, 0, 1, 512, true) != Some(0) {
        l.s(" problem: read failed").end();
        return false;
    }
    // SAFETY: the device wrote sector 1 into the buffer.
    let back = unsafe { core::ptr::read_volatile(&raw const (*b).data) };
    if (0..512).any(|i| back[i] != (i as u8) ^ seed) {
        l.s(" problem: read back differs").end();
        return false;
    }
    l.s(" rw-ok").end();
    true
}

/// A hot-plugged NIC: features negotiated, its MAC read. Prints "hotplug: added slot=S net
/// mac=..." and leaves the device running.
fn hotplug_net(slot: u8) -> bool {
    let mut l = Line::new();
    l.s("hotplug: added slot=").dec(u64::from(slot)).s(" net ");
    let Some(mut dev) = crate::virtio::at_slot(slot) else {
        l.s("problem: no virtio capabilities").end();
        return false;
    };
    if dev.negotiate(1 << 5).is_none()
        || !dev.setup_queue(0)
        || !dev.setup_queue(1)
        || !dev.driver_ok()
    {
        l.s("problem: set-up failed").end();
        return false;
    }
    l.s("mac=");
    for i in 0..6u64 {
        if i > 0 {
            l.s(":");
        }
        let b: u8 = dev.config(i);
        l.b(b"0123456789abcdef"[usize::from(b >> 4)])
            .b(b"0123456789abcdef"[usize::from(b & 15)]);
    }
    l.end();
    true
}

/// `probe.tests=hotplug`: ACPI PCI hot-plug without an AML interpreter (docs/DEVICES.md). It
/// finds the controller's register block (`\_SB.PHPR._CRS`) and the GED's GSI in the DSDT,
/// prints "hotplug: ready", then polls PCIU and PCID (what the GED's `_EVT` reads): each slot in
/// PCIU is enumerated and used (a disk written and read back, a NIC's MAC read: "hotplug:
/// added ..."); each slot in PCID is reset (the driver lets go) and acknowledged through B0EJ
/// ("hotplug: ejected slot=S"). It passes after `probe.hotplug_cycles` ejects (default 1), or
/// on 'q' from the console. With `probe.hotplug_self_eject=1` it ejects each device it used
/// by itself, unasked ("hotplug: ejected slot=S by itself"), as a guest's operator may.
fn hotplug_test() -> Outcome {
    use crate::acpi;
    use crate::pci::{inl, outl, read32};
    let mut d = Line::new();
    let Some(cycles) =
        param(boot_info().cmdline(), "probe.hotplug_cycles").map_or(Some(1), parse_u64)
    else {
        return fail("hotplug", d.s("probe.hotplug_cycles is not a number"));
    };
    let Some(port) = acpi::hotplug_port() else {
        return fail(
            "hotplug",
            d.s("no hot-plug controller (\\_SB.PHPR) in the DSDT"),
        );
    };
    let self_eject = param(boot_info().cmdline(), "probe.hotplug_self_eject") == Some(b"1");
    let gsi = acpi::ged_gsi();
    {
        let mut l = Line::new();
        l.s("hotplug: ready port=").hex(u64::from(port));
        match gsi {
            Some(g) => l.s(" ged-gsi=").dec(u64::from(g)),
            None => l.s(" no-ged"),
        };
        l.end();
    }
    let (mut added, mut ejected, mut failed) = (0u64, 0u64, 0u64);
    let mut seed = 0x5au8;
    loop {
        if crate::console::inb(0x3fd) & 1 != 0 && crate::console::inb(0x3f8) == b'q' {
            break;
        }
        let up = inl(port);
        let down = inl(port + 4);
        for slot in (1..32u8).filter(|s| up & (1 << s) != 0) {
            added += 1;
            seed = seed.wrapping_add(0x11);
            let ok = match read32(slot, 0) >> 16 {
                0x1042 => hotplug_blk(slot, seed),
                0x1041 => hotplug_net(slot),
                id => {
                    let mut l = Line::new();
                    l.s("hotplug: added slot=").dec(u64::from(slot));
                    l.s(" unknown device ").hex(u64::from(id)).end();
                    id != 0xffff
                }
            };
            failed += u64::from(!ok);
            if ok && self_eject {
                if let Some(dev) = crate::virtio::at_slot(slot) {
                    dev.reset();
                }
                outl(port + 8, 1 << slot);
                ejected += 1;
                let mut l = Line::new();
                l.s("hotplug: ejected slot=")
                    .dec(u64::from(slot))
                    .s(" by itself")
                    .end();
            }
        }
        for slot in (1..32u8).filter(|s| down & (1 << s) != 0) {
            if let Some(dev) = crate::virtio::at_slot(slot) {
                dev.reset();
            }
            outl(port + 8, 1 << slot);
            ejected += 1;
            let mut l = Line::new();
            l.s("hotplug: ejected slot=").dec(u64::from(slot)).end();
        }
        if ejected >= cycles {
            break;
        }
        if up == 0 && down == 0 {
            core::hint::spin_loop();
        }
    }
    d.s("added=").dec(added).s(" ejected=").dec(ejected);
    if failed != 0 {
        d.s(" problem: ")
            .dec(failed)
            .s(" devices could not be used");
        return fail("hotplug", &mut d);
    }
    pass("hotplug", &mut d)
}

fn blk_test() -> Outcome {
    use crate::virtio;
    let mut d = Line::new();
    let mut disks = 0u64;
    while let Some(mut dev) = virtio::find_nth(0x1042, disks as usize) {
        disks += 1;
        let Some(offered) = dev.negotiate((1 << 5) | (1 << 9)) else {
            d.s(" problem: negotiation failed");
            return fail("blk", &mut d);
        };
        if !dev.setup_queue(0) || !dev.driver_ok() {
            d.s(" problem: queue set-up failed");
            return fail("blk", &mut d);
        }
        let ro = offered & (1 << 5) != 0;
        let sectors: u64 = dev.config(0);
        let b = &raw mut BLK;
        // GET_ID: the disk's name, up to 20 bytes.
        if blk_request(&mut dev, 8, 0, 20, true) != Some(0) {
            d.s(" problem: GET_ID failed");
            return fail("blk", &mut d);
        }
        // SAFETY: the device wrote the id into the data buffer.
        let id = unsafe { core::ptr::read_volatile(&raw const (*b).data) };
        let idlen = id[..20].iter().position(|&c| c == 0).unwrap_or(20);
        d.s(" ").bytes(&id[..idlen]).s(":sectors=").dec(sectors);
        if blk_request(&mut dev, 0, 0, 512, true) != Some(0) {
            d.s(" problem: reading sector 0 failed");
            return fail("blk", &mut d);
        }
        // SAFETY: the device wrote sector 0 into the data buffer.
        let s0 = unsafe { core::ptr::read_volatile(&raw const (*b).data) };
        d.s(if &s0[..8] == b"WVDISK01" {
            ",magic"
        } else {
            ",no-magic"
        });
        // probe.blkseed=N makes the pattern unique to a run (a host test tells its runs apart).
        let seed = param(boot_info().cmdline(), "probe.blkseed")
            .and_then(parse_u64)
            .unwrap_or(0)
            .to_le_bytes();
        let pattern = |i: usize| (i as u8) ^ 0xa5 ^ (disks as u8) ^ seed[i % 8];
        // SAFETY: the device is idle; the buffer is this test's.
        let bufs = unsafe { &mut *b };
        for (i, x) in bufs.data.iter_mut().enumerate() {
            *x = pattern(i);
        }
        let st = blk_request(&mut dev, 1, 1, 512, false);
        if ro {
            if st != Some(1) {
                d.s(" problem: a read-only disk accepted a write");
                return fail("blk", &mut d);
            }
            d.s(",ro-refused");
            continue;
        }
        if st != Some(0) || blk_request(&mut dev, 4, 0, 0, false) != Some(0) {
            d.s(" problem: write or flush failed");
            return fail("blk", &mut d);
        }
        // SAFETY: the device is idle; clear the buffer before reading back.
        unsafe { (*b).data = [0; 512] };
        if blk_request(&mut dev, 0, 1, 512, true) != Some(0) {
            d.s(" problem: reading back failed");
            return fail("blk", &mut d);
        }
        // SAFETY: the device wrote sector 1 into the buffer.
        let back = unsafe { core::ptr::read_volatile(&raw const (*b).data) };
        if (0..512).any(|i| back[i] != pattern(i)) {
            d.s(" problem: read back differs from what was written");
            return fail("blk", &mut d);
        }
        // probe.blkloops=N: N more sectors written with a pattern of their own and read back
        // (a host test changes the disk's data path underneath meanwhile).
        let loops = param(boot_info().cmdline(), "probe.blkloops")
            .and_then(parse_u64)
            .unwrap_or(0);
        if loops > 0 && sectors > 2 {
            for k in 0..loops {
                let sector = 2 + k % (sectors - 2);
                let pat = |i: usize| (i as u8) ^ (k as u8) ^ ((k >> 8) as u8) ^ 0x3c ^ seed[i % 8];
                // SAFETY: the device is idle; the buffer is this test's.
                let bufs = unsafe { &mut *b };
                for (i, x) in bufs.data.iter_mut().enumerate() {
                    *x = pat(i);
                }
                if blk_request(&mut dev, 1, sector, 512, false) != Some(0) {
                    d.s(" problem: write ").dec(k).s(" failed");
                    return fail("blk", &mut d);
                }
                // SAFETY: the device is idle; clear the buffer before reading back.
                unsafe { (*b).data = [0; 512] };
                if blk_request(&mut dev, 0, sector, 512, true) != Some(0) {
                    d.s(" problem: read ").dec(k).s(" failed");
                    return fail("blk", &mut d);
                }
                // SAFETY: the device wrote the sector into the buffer.
                let back = unsafe { core::ptr::read_volatile(&raw const (*b).data) };
                if (0..512).any(|i| back[i] != pat(i)) {
                    d.s(" problem: sector ")
                        .dec(sector)
                        .s(" read back differs (loop ")
                        .dec(k)
                        .s(")");
                    return fail("blk", &mut d);
                }
            }
            d.s(",loops=").dec(loops);
        }
        // Past the end of the disk: an error status, not a crash.
        if blk_request(&mut dev, 0, sectors, 512, true) != Some(1) {
            d.s(" problem: reading past the end did not fail");
            return fail("blk", &mut d);
        }
        d.s(",rw-ok");
        dev.reset();
    }
    let mut l = Line::new();
    l.s("disks=").dec(disks).bytes(d.as_bytes());
    if disks == 0 {
        l.s(" problem: no virtio-blk device (1af4:1042) on bus 0");
        return fail("blk", &mut l);
    }
    pass("blk", &mut l)
}

#[repr(C, align(4096))]
struct NetBufs {
    rx: [u8; 1536],
    tx: [u8; 1536],
}
static mut NETB: NetBufs = NetBufs {
    rx: [0; 1536],
    tx: [0; 1536],
};

fn net_test() -> Outcome {
    use crate::{net, virtio};
    let mut d = Line::new();
    let ips = param(boot_info().cmdline(), "probe.net").and_then(|v| {
        let mut it = v.split(|&c| c == b',');
        Some((net::parse_ip(it.next()?)?, net::parse_ip(it.next()?)?))
    });
    let Some((ip, host)) = ips else {
        d.s("needs probe.net=GUEST_IP,HOST_IP on the command line");
        return fail("net", &mut d);
    };
    let Some(mut dev) = virtio::find(0x1041) else {
        d.s("no modern virtio-net device (1af4:1041) on bus 0");
        return fail("net", &mut d);
    };
    // Only the MAC feature: no offloads, so every frame fits one 1526-byte buffer.
    if dev.negotiate(1 << 5).is_none()
        || !dev.setup_queue(0)
        || !dev.setup_queue(1)
        || !dev.driver_ok()
    {
        d.s("device set-up failed");
        return fail("net", &mut d);
    }
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        *b = dev.config(i as u64);
    }
    d.s("mac=");
    for (i, b) in mac.iter().enumerate() {
        if i > 0 {
            d.s(":");
        }
        let h = [
            b"0123456789abcdef"[usize::from(b >> 4)],
            b"0123456789abcdef"[usize::from(b & 15)],
        ];
        d.bytes(&h);
    }
    let bufs = &raw mut NETB;
    // SAFETY: the buffers are this test's; each is used by one request at a time.
    let (rx, tx) = unsafe { ((&raw mut (*bufs).rx) as u64, (&raw mut (*bufs).tx) as u64) };
    let txb = unsafe { &mut (*bufs).tx };
    let tsc_budget = 8_000_000_000u64;
    // Post a receive buffer, then ask for the host's MAC.
    dev.post(0, &[(rx, 1536, virtio::DESC_WRITE)]);
    let n = net::arp_request(txb, mac, ip, host);
    if dev.submit(1, &[(tx, n as u32, 0)]).is_none() {
        d.s(" problem: the ARP request was not sent");
        return fail("net", &mut d);
    }
    let start = cpu::rdtsc();
    let mut host_mac = None;
    let mut frames = 0u64;
    while host_mac.is_none() && cpu::rdtsc().wrapping_sub(start) < tsc_budget {
        let Some(len) = dev.wait_used(0, tsc_budget) else {
            break;
        };
        frames += 1;
        // SAFETY: the device finished writing the receive buffer.
        let f = unsafe { core::ptr::read_volatile(&raw const (*bufs).rx) };
        host_mac = net::arp_reply_from(&f[..(len as usize).min(1536)], host);
        dev.post(0, &[(rx, 1536, virtio::DESC_WRITE)]);
    }
    let Some(hmac) = host_mac else {
        d.s(" problem: no ARP reply from the host (frames seen: ")
            .dec(frames)
            .s(")");
        return fail("net", &mut d);
    };
    d.s(" arp=ok");
    // probe.pings=N: N echo requests, one at a time, each answered before the next (a host
    // test counts them at both ends while it changes the NIC's data path underneath).
    let pings = param(boot_info().cmdline(), "probe.pings")
        .and_then(parse_u64)
        .unwrap_or(1)
        .clamp(1, 65535);
    // probe.ping_retries=N: a request unanswered within an eighth of the budget is sent
    // again, N times at most (a host test that moves the VM while it pings loses the frame in
    // flight at the switch-over); without, one request per ping and the whole budget.
    let retries = param(boot_info().cmdline(), "probe.ping_retries")
        .and_then(parse_u64)
        .unwrap_or(0);
    let wait = if retries > 0 {
        tsc_budget / 8
    } else {
        tsc_budget
    };
    // Frames that were not the awaited reply (a duplicate would be one), and requests sent
    // again.
    let (mut other, mut resent) = (0u64, 0u64);
    for seq in 1..=pings {
        let mut replied = false;
        for attempt in 0..=retries {
            if replied {
                break;
            }
            resent += u64::from(attempt > 0);
            let n = net::echo_request(txb, mac, hmac, ip, host, seq as u16);
            if dev.submit(1, &[(tx, n as u32, 0)]).is_none() {
                d.s(" problem: echo request ").dec(seq).s(" was not sent");
                return fail("net", &mut d);
            }
            let start = cpu::rdtsc();
            while !replied && cpu::rdtsc().wrapping_sub(start) < wait {
                let Some(len) = dev.wait_used(0, wait) else {
                    break;
                };
                // SAFETY: as above.
                let f = unsafe { core::ptr::read_volatile(&raw const (*bufs).rx) };
                replied = net::is_echo_reply(&f[..(len as usize).min(1536)], host, seq as u16);
                other += u64::from(!replied);
                dev.post(0, &[(rx, 1536, virtio::DESC_WRITE)]);
            }
        }
        if !replied {
            d.s(" problem: no echo reply to request ")
                .dec(seq)
                .s(" from the host");
            return fail("net", &mut d);
        }
    }
    d.s(" icmp=ok");
    if pings > 1 {
        d.s(" pings=").dec(pings).s(" other=").dec(other);
    }
    if retries > 0 {
        d.s(" resent=").dec(resent);
    }
    dev.reset();
    pass("net", &mut d)
}

/// The `netpeer` responder: answers ARP requests for `probe.ip=IP` and ICMP echo requests to
/// it (another guest's `net` test pings it), and passes once it has answered `probe.echoes=N`
/// (default 1) echo requests; fails if none comes within about a minute. Prints `netpeer:
/// listening` once its receive buffer is posted, for a host that starts the pinger then.
fn net_peer() -> Outcome {
    use crate::{net, virtio};
    let mut d = Line::new();
    let cmdline = boot_info().cmdline();
    let Some(ip) = param(cmdline, "probe.ip").and_then(net::parse_ip) else {
        d.s("needs probe.ip=GUEST_IP on the command line");
        return fail("netpeer", &mut d);
    };
    let want = param(cmdline, "probe.echoes")
        .and_then(crate::bootinfo::parse_u64)
        .unwrap_or(1);
    let Some(mut dev) = virtio::find(0x1041) else {
        d.s("no modern virtio-net device (1af4:1041) on bus 0");
        return fail("netpeer", &mut d);
    };
    if dev.negotiate(1 << 5).is_none()
        || !dev.setup_queue(0)
        || !dev.setup_queue(1)
        || !dev.driver_ok()
    {
        d.s("device set-up failed");
        return fail("netpeer", &mut d);
    }
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        *b = dev.config(i as u64);
    }
    let bufs = &raw mut NETB;
    // SAFETY: the buffers are this test's; each is used by one request at a time.
    let (rx, tx) = unsafe { ((&raw mut (*bufs).rx) as u64, (&raw mut (*bufs).tx) as u64) };
    let txb = unsafe { &mut (*bufs).tx };
    dev.post(0, &[(rx, 1536, virtio::DESC_WRITE)]);
    crate::console::println("netpeer: listening");
    let (mut arps, mut echoes, mut frames) = (0u64, 0u64, 0u64);
    let start = cpu::rdtsc();
    let budget = 150_000_000_000u64;
    while echoes < want && cpu::rdtsc().wrapping_sub(start) < budget {
        let Some(len) = dev.wait_used(0, 5_000_000_000) else {
            continue;
        };
        frames += 1;
        // SAFETY: the device finished writing the receive buffer.
        let f = unsafe { core::ptr::read_volatile(&raw const (*bufs).rx) };
        let f = &f[..(len as usize).min(1536)];
        let answer = if let Some(n) = net::arp_answer(f, mac, ip, txb) {
            arps += 1;
            Some(n)
        } else if let Some(n) = net::echo_answer(f, mac, ip, txb) {
            echoes += 1;
            Some(n)
        } else {
            None
        };
        dev.post(0, &[(rx, 1536, virtio::DESC_WRITE)]);
        if let Some(n) = answer {
            if dev.submit(1, &[(tx, n as u32, 0)]).is_none() {
                d.s("problem: a reply was not sent");
                return fail("netpeer", &mut d);
            }
        }
    }
    d.s("arp=")
        .dec(arps)
        .s(" icmp=")
        .dec(echoes)
        .s(" frames=")
        .dec(frames);
    if echoes < want {
        d.s(" problem: too few echo requests answered");
        return fail("netpeer", &mut d);
    }
    dev.reset();
    pass("netpeer", &mut d)
}

/// Guest-physical buffer for the block benchmark (1 MiB at 16 MiB; checked against the map).
const BENCH_BUF: u64 = 16 << 20;
const MIB: u32 = 1 << 20;

fn bench_io(dev: &mut crate::virtio::Device, write: bool, sector: u64, len: u32) -> bool {
    use crate::virtio::DESC_WRITE;
    let b = &raw mut BLK;
    // SAFETY: the header and status buffers are this test's; the device is idle.
    let bufs = unsafe { &mut *b };
    bufs.hdr[0..4].copy_from_slice(&u32::from(write).to_le_bytes());
    bufs.hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    bufs.status[0] = 0xee;
    let (hdr, status) = unsafe { ((&raw mut (*b).hdr) as u64, (&raw mut (*b).status) as u64) };
    let data_flags = if write { 0 } else { DESC_WRITE };
    dev.submit(0, &[(hdr, 16, 0), (BENCH_BUF, len, data_flags), (status, 1, DESC_WRITE)]).is_some()
        // SAFETY: the device completed the request.
        && unsafe { core::ptr::read_volatile(&raw const (*b).status[0]) } == 0
}

fn blk_bench() -> Outcome {
    use crate::virtio;
    let mut d = Line::new();
    let Some(mut dev) = virtio::find(0x1042) else {
        d.s("no virtio-blk device");
        return fail("blkbench", &mut d);
    };
    if dev.negotiate(0).is_none() || !dev.setup_queue(0) || !dev.driver_ok() {
        d.s("device set-up failed");
        return fail("blkbench", &mut d);
    }
    if !boot_info().in_ram(BENCH_BUF, u64::from(MIB)) {
        d.s("needs RAM at 16-17 MiB for its buffer");
        return fail("blkbench", &mut d);
    }
    let sectors: u64 = dev.config(0);
    let mib = (sectors / 2048).min(64);
    let ops = 1000u64;
    if mib < 8 {
        d.s("needs a disk of at least 8 MiB");
        return fail("blkbench", &mut d);
    }
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut rand4k = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % (mib * 256)) * 8
    };
    let mut run = |write: bool, seq: bool, rand: &mut dyn FnMut() -> u64| -> Option<u64> {
        let t0 = cpu::rdtsc();
        let n = if seq { mib } else { ops };
        for i in 0..n {
            let (sector, len) = if seq { (i * 2048, MIB) } else { (rand(), 4096) };
            if !bench_io(&mut dev, write, sector, len) {
                return None;
            }
        }
        Some(cpu::rdtsc().wrapping_sub(t0))
    };
    let (Some(sw), Some(sr), Some(rw), Some(rr)) = (
        run(true, true, &mut rand4k),
        run(false, true, &mut rand4k),
        run(true, false, &mut rand4k),
        run(false, false, &mut rand4k),
    ) else {
        d.s("a request failed");
        return fail("blkbench", &mut d);
    };
    d.s("seq_mib=").dec(mib).s(" rand_ops=").dec(ops);
    d.s(" seq_write_cycles=")
        .dec(sw)
        .s(" seq_read_cycles=")
        .dec(sr);
    d.s(" rand_write_cycles=")
        .dec(rw)
        .s(" rand_read_cycles=")
        .dec(rr);
    d.s(" tsc_khz=").dec(tsc_khz());
    pass("blkbench", &mut d)
}

/// The EtherType of `netbench`'s frames (IEEE local experimental 1), which `netsink` counts.
const BENCH_ETHERTYPE: [u8; 2] = [0x88, 0xb5];

/// TSC cycles for the network tests' time limits: the host's rate where it says it, else
/// 3 GHz (QEMU does not tell; only limits use it, never a result).
fn limit_khz() -> u64 {
    match tsc_khz() {
        0 => 3_000_000,
        k => k,
    }
}

/// The `netbench` sender: `probe.frames=N` (default 20000) broadcast frames of
/// `probe.bytes=B` bytes (60..1514, default 1514; EtherType 0x88b5, which hosts drop and
/// `netsink` counts), `probe.inflight=K` of them on the transmit queue at a time (default 1:
/// each frame used before the next goes); the TSC cycles they took.
fn net_bench() -> Outcome {
    use crate::virtio;
    let mut d = Line::new();
    let cmdline = boot_info().cmdline();
    let frames = param(cmdline, "probe.frames")
        .and_then(parse_u64)
        .unwrap_or(20_000);
    let bytes = param(cmdline, "probe.bytes")
        .and_then(parse_u64)
        .unwrap_or(1514);
    let inflight = param(cmdline, "probe.inflight")
        .and_then(parse_u64)
        .unwrap_or(1);
    if !(60..=1514).contains(&bytes) || !(1..=u64::from(virtio::QMAX)).contains(&inflight) {
        d.s("probe.bytes must be 60..1514 and probe.inflight 1..256");
        return fail("netbench", &mut d);
    }
    let Some(mut dev) = virtio::find(0x1041) else {
        d.s("no virtio-net device");
        return fail("netbench", &mut d);
    };
    let want_q = (inflight as u16).next_power_of_two().max(virtio::QSIZE);
    let txq = if dev.negotiate(1 << 5).is_some() && dev.setup_queue(0) {
        dev.setup_queue_sized(1, want_q)
    } else {
        None
    };
    let Some(txq) = txq.filter(|_| dev.driver_ok()) else {
        d.s("device set-up failed");
        return fail("netbench", &mut d);
    };
    let inflight = inflight.min(u64::from(txq)).min(frames.max(1));
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        *b = dev.config(i as u64);
    }
    // Broadcast frames with an experimental EtherType: a host kernel counts and drops them,
    // a `netsink` guest counts them. Every frame in flight is the same buffer (the device
    // only reads it).
    let bufs = &raw mut NETB;
    // SAFETY: the transmit buffer is this test's.
    let txb = unsafe { &mut (*bufs).tx };
    let hdr = crate::net::VNET_HDR;
    let len = hdr + bytes as usize;
    txb[..len].fill(0x5a);
    txb[..hdr].fill(0);
    txb[hdr..hdr + 6].copy_from_slice(&[0xff; 6]);
    txb[hdr + 6..hdr + 12].copy_from_slice(&mac);
    txb[hdr + 12..hdr + 14].copy_from_slice(&BENCH_ETHERTYPE);
    let tx = unsafe { (&raw mut (*bufs).tx) as u64 };
    let t0 = cpu::rdtsc();
    if inflight == 1 {
        for _ in 0..frames {
            if dev.submit(1, &[(tx, len as u32, 0)]).is_none() {
                d.s("a frame was not sent");
                return fail("netbench", &mut d);
            }
        }
    } else {
        // Heads 0..K always on the ring; one that comes back goes again while frames are
        // left. The device is told when there is nothing to collect (a kick per batch).
        for h in 0..inflight as u16 {
            dev.offer(1, h, (tx, len as u32, 0));
        }
        dev.kick(1);
        let (mut posted, mut done, mut unkicked) = (inflight, 0u64, false);
        let stall = 5 * limit_khz() * 1000;
        let mut since = cpu::rdtsc();
        while done < frames {
            if let Some((h, _)) = dev.next_used(1) {
                done += 1;
                if posted < frames {
                    if !dev.offer(1, h, (tx, len as u32, 0)) {
                        d.s("problem: the device used head ").dec(u64::from(h));
                        return fail("netbench", &mut d);
                    }
                    posted += 1;
                    unkicked = true;
                }
                since = cpu::rdtsc();
                continue;
            }
            if unkicked {
                dev.kick(1);
                unkicked = false;
            }
            if cpu::rdtsc().wrapping_sub(since) > stall {
                d.s("problem: frames not used after ").dec(done);
                return fail("netbench", &mut d);
            }
            core::hint::spin_loop();
        }
    }
    let cycles = cpu::rdtsc().wrapping_sub(t0);
    d.s("frames=")
        .dec(frames)
        .s(" bytes=")
        .dec(bytes)
        .s(" inflight=")
        .dec(inflight)
        .s(" cycles=")
        .dec(cycles)
        .s(" tsc_khz=")
        .dec(tsc_khz());
    dev.reset();
    pass("netbench", &mut d)
}

/// Receive buffers of `netsink`: up to [`crate::virtio::QMAX`] of [`SINK_STRIDE`] bytes at
/// 24 MiB (checked against the memory map).
const SINK_BUF: u64 = 24 << 20;
const SINK_STRIDE: u64 = 2048;

/// The `netsink` receiver: keeps as many 2 KiB receive buffers posted as the queue takes
/// (256 at most), counts the frames and bytes of EtherType 0x88b5 (`netbench`'s) and re-posts
/// each buffer; passes after `probe.frames=N` (default 20000) of them, fails once no frame
/// came for `probe.idle_ms=MS` (default 3000; two minutes before the first) with what it got.
/// Prints `netsink: listening` once its buffers are posted, then `frames`, `bytes` (Ethernet
/// bytes, no vnet header), `other` (frames of other kinds), and `cycles` (TSC) from the first
/// counted frame to the last.
fn net_sink() -> Outcome {
    use crate::virtio;
    let mut d = Line::new();
    let cmdline = boot_info().cmdline();
    let want = param(cmdline, "probe.frames")
        .and_then(parse_u64)
        .unwrap_or(20_000);
    let idle_ms = param(cmdline, "probe.idle_ms")
        .and_then(parse_u64)
        .unwrap_or(3000);
    if !boot_info().in_ram(SINK_BUF, u64::from(virtio::QMAX) * SINK_STRIDE) {
        d.s("needs RAM at 24-24.5 MiB for its buffers");
        return fail("netsink", &mut d);
    }
    let Some(mut dev) = virtio::find(0x1041) else {
        d.s("no modern virtio-net device (1af4:1041) on bus 0");
        return fail("netsink", &mut d);
    };
    // Only the MAC feature: every frame fits one 2 KiB buffer.
    let rxq = if dev.negotiate(1 << 5).is_some() {
        dev.setup_queue_sized(0, virtio::QMAX)
    } else {
        None
    };
    let Some(n) = rxq.filter(|_| dev.setup_queue(1) && dev.driver_ok()) else {
        d.s("device set-up failed");
        return fail("netsink", &mut d);
    };
    let buf = |h: u16| {
        (
            SINK_BUF + u64::from(h) * SINK_STRIDE,
            SINK_STRIDE as u32,
            virtio::DESC_WRITE,
        )
    };
    for h in 0..n {
        dev.offer(0, h, buf(h));
    }
    dev.kick(0);
    crate::console::println("netsink: listening");
    let khz = limit_khz();
    let (idle, first_wait) = (idle_ms.saturating_mul(khz), 120_000 * khz);
    let hdr = crate::net::VNET_HDR as u64;
    let (mut frames, mut bytes, mut other) = (0u64, 0u64, 0u64);
    let (mut first, mut last) = (0u64, 0u64);
    // Buffers given back since the device was last told: it is told when there is nothing
    // to collect, or when an eighth of the ring waits.
    let mut unkicked = 0u16;
    let mut since = cpu::rdtsc();
    while frames < want {
        if let Some((h, len)) = dev.next_used(0) {
            if h >= n {
                d.s("problem: the device used head ").dec(u64::from(h));
                return fail("netsink", &mut d);
            }
            let (a, _, _) = buf(h);
            let len = u64::from(len).min(SINK_STRIDE);
            let kind = if len >= hdr + 14 {
                // SAFETY: the device has finished writing this buffer (it is used), which
                // lies in RAM (checked above) under the identity map.
                unsafe { core::ptr::read_volatile((a + hdr + 12) as *const [u8; 2]) }
            } else {
                [0, 0]
            };
            since = cpu::rdtsc();
            if kind == BENCH_ETHERTYPE {
                if frames == 0 {
                    first = since;
                }
                last = since;
                frames += 1;
                bytes += len - hdr;
            } else {
                other += 1;
            }
            dev.offer(0, h, buf(h));
            unkicked += 1;
            if unkicked >= n / 8 {
                dev.kick(0);
                unkicked = 0;
            }
            continue;
        }
        if unkicked > 0 {
            dev.kick(0);
            unkicked = 0;
        }
        let limit = if frames == 0 { first_wait } else { idle };
        if cpu::rdtsc().wrapping_sub(since) > limit {
            break;
        }
        core::hint::spin_loop();
    }
    d.s("frames=")
        .dec(frames)
        .s(" bytes=")
        .dec(bytes)
        .s(" other=")
        .dec(other)
        .s(" buffers=")
        .dec(u64::from(n))
        .s(" cycles=")
        .dec(last.wrapping_sub(first))
        .s(" tsc_khz=")
        .dec(tsc_khz());
    if frames < want {
        d.s(" problem: ")
            .dec(frames)
            .s(" of ")
            .dec(want)
            .s(" frames, then none for ")
            .dec(idle_ms)
            .s(" ms");
        return fail("netsink", &mut d);
    }
    dev.reset();
    pass("netsink", &mut d)
}

/// What the `persist` workload keeps (in guest memory, like everything it checks): shared by
/// its kernel side and its CPL3 side, which reaches it through the identity map.
#[repr(C, align(4096))]
struct Persist {
    /// The buffer's guest-physical (= virtual) address and its size in pages.
    base: u64,
    pages: u64,
    /// Pages written so far (page `counter % pages` is the next).
    counter: u64,
    /// Sum of `persist_word(c, 0)` over every page write `c` so far.
    checksum: u64,
    /// Pages the next step writes.
    chunk: u64,
}

static PERSIST: crate::sync::Global<Persist> = crate::sync::Global::new(Persist {
    base: 0,
    pages: 0,
    counter: 0,
    checksum: 0,
    chunk: 0,
});

/// The `persist` test's disk writer (`probe.persist_disk=1`): record `n` goes to sector `1 + n`
/// of the first virtio-blk disk, whole, and counts as acknowledged once the device has
/// completed it with status 0; at the end every acknowledged record is read back through the
/// device and compared.
struct DiskWriter {
    dev: crate::virtio::Device,
    /// Records acknowledged so far.
    acked: u64,
    /// Records the disk has room for.
    room: u64,
    seed: u64,
}

/// Byte `i` of persist record `n` (bytes 0..8 `WVPERSIS`, 8..16 `n`, 16..24 the seed).
fn persist_record_byte(n: u64, seed: u64, i: usize) -> u8 {
    match i {
        0..8 => b"WVPERSIS"[i],
        8..16 => n.to_le_bytes()[i - 8],
        16..24 => seed.to_le_bytes()[i - 16],
        _ => (persist_word(n ^ seed, i as u64) >> ((i % 8) * 8)) as u8,
    }
}

/// Long enough for a request in flight across a migration's switch-over (TSC cycles).
const PERSIST_BLK_WAIT: u64 = 60_000_000_000;

impl DiskWriter {
    fn new(d: &mut Line) -> Option<DiskWriter> {
        let Some(mut dev) = crate::virtio::find(0x1042) else {
            d.s(" problem: probe.persist_disk=1 but no virtio-blk device");
            return None;
        };
        let ok = dev.negotiate(1 << 9).is_some() && dev.setup_queue(0) && dev.driver_ok();
        if !ok {
            d.s(" problem: the virtio-blk device did not set up");
            return None;
        }
        let sectors: u64 = dev.config(0);
        let seed = param(boot_info().cmdline(), "probe.blkseed")
            .and_then(parse_u64)
            .unwrap_or(0);
        Some(DiskWriter {
            dev,
            acked: 0,
            room: sectors.saturating_sub(1),
            seed,
        })
    }

    /// Writes the next record; false if the device failed it (room left or not).
    fn write(&mut self) -> bool {
        if self.acked >= self.room {
            return true;
        }
        let n = self.acked;
        let b = &raw mut BLK;
        // SAFETY: the device is idle between this driver's requests; the buffer is this test's.
        let bufs = unsafe { &mut *b };
        for (i, x) in bufs.data.iter_mut().enumerate() {
            *x = persist_record_byte(n, self.seed, i);
        }
        if blk_request_within(&mut self.dev, 1, 1 + n, 512, false, PERSIST_BLK_WAIT) != Some(0) {
            return false;
        }
        self.acked += 1;
        true
    }

    /// Reads every acknowledged record back: None when all hold, else the first bad one.
    fn verify(&mut self) -> Option<u64> {
        let b = &raw mut BLK;
        for n in 0..self.acked {
            // SAFETY: as in write; cleared before each read.
            unsafe { (*b).data = [0; 512] };
            if blk_request_within(&mut self.dev, 0, 1 + n, 512, true, PERSIST_BLK_WAIT) != Some(0) {
                return Some(n);
            }
            // SAFETY: the device wrote the sector into the buffer.
            let back = unsafe { core::ptr::read_volatile(&raw const (*b).data) };
            if (0..512).any(|i| back[i] != persist_record_byte(n, self.seed, i)) {
                return Some(n);
            }
        }
        None
    }
}

/// Where the workload's buffer starts (clear of the image, boot data and the stacks).
const PERSIST_BASE: u64 = 32 << 20;

/// The value of word `j` of a page written as write number `c`.
#[inline(always)]
fn persist_word(c: u64, j: u64) -> u64 {
    (c.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ j.wrapping_mul(0xc2b2_ae3d_27d4_eb4f))
        .wrapping_add(0x1656_67b1_9e37_79f9)
}

/// CPL3: writes `chunk` pages, each whole with its write number's pattern, counting them.
#[no_mangle]
extern "C" fn persist_step_cpl3() -> u64 {
    let p = PERSIST.as_ptr();
    // SAFETY: PERSIST and the buffer are identity-mapped user-accessible guest memory that only
    // this workload uses; volatile so every write reaches memory in order.
    unsafe {
        let (base, pages, chunk) = (
            (&raw const (*p).base).read_volatile(),
            (&raw const (*p).pages).read_volatile(),
            (&raw const (*p).chunk).read_volatile(),
        );
        let mut c = (&raw const (*p).counter).read_volatile();
        let mut sum = (&raw const (*p).checksum).read_volatile();
        for _ in 0..chunk {
            let Some(page) = c.checked_rem(pages) else {
                return 1;
            };
            let at = (base + page * 4096) as *mut u64;
            for j in 0..512u64 {
                at.add(j as usize).write_volatile(persist_word(c, j));
            }
            sum = sum.wrapping_add(persist_word(c, 0));
            c += 1;
            // Counter and checksum after every page: a copy taken at any instant is consistent.
            (&raw mut (*p).checksum).write_volatile(sum);
            (&raw mut (*p).counter).write_volatile(c);
        }
    }
    0
}

/// CPL3: checks every page of the buffer against the pattern its last write left (never
/// written: zero) and the checksum against every write counted. 0 when all hold; otherwise
/// 1 + the first bad page, or u64::MAX for a bad checksum.
#[no_mangle]
extern "C" fn persist_verify_cpl3() -> u64 {
    let p = PERSIST.as_ptr();
    // SAFETY: as in persist_step_cpl3; reads only.
    unsafe {
        let (base, pages) = (
            (&raw const (*p).base).read_volatile(),
            (&raw const (*p).pages).read_volatile(),
        );
        let c = (&raw const (*p).counter).read_volatile();
        let sum = (&raw const (*p).checksum).read_volatile();
        if pages == 0 {
            return u64::MAX;
        }
        let (q, r) = (c / pages, c % pages);
        for page in 0..pages {
            let last = if page < r {
                Some(q * pages + page)
            } else if q > 0 {
                Some((q - 1) * pages + page)
            } else {
                None
            };
            let at = (base + page * 4096) as *const u64;
            for j in 0..512u64 {
                let want = last.map_or(0, |w| persist_word(w, j));
                if at.add(j as usize).read_volatile() != want {
                    return page + 1;
                }
            }
        }
        let mut want = 0u64;
        for w in 0..c {
            want = want.wrapping_add(persist_word(w, 0));
        }
        if want != sum {
            return u64::MAX;
        }
    }
    0
}

/// Memory that must survive a snapshot/restore or a live migration done from outside while it
/// changes: a CPL3 workload writes a known pattern over `probe.persist_mib` MiB (default 64) at
/// `probe.persist_rate` MiB/s (0, the default: as fast as it can), page after page, keeping a
/// counter and a checksum of what it wrote, for `probe.persist_ms` of kvmclock time (default
/// 3000). `persist: running` is printed once it runs, `persist: steady` once every page of the
/// buffer has been written. At the end every page is checked against
/// the pattern of its last write, the checksum against the counter, and the counter against the
/// pages the kernel side asked for (continuity). The largest kvmclock gap between two reads is
/// reported (`max_gap`, the guest-observed downtime by its paravirtual clock, which a pause
/// stops) with the largest TSC gap (`tsc_gap`, which on hosts where the guest reads the host's
/// TSC is the wall-clock downtime). With `probe.persist_disk=1` it also writes a record to the
/// first virtio-blk disk every `probe.persist_disk_ms` (default 10) ms ([`DiskWriter`]) and at
/// the end reads every acknowledged one back (`disk_writes=N`).
fn persist() -> Outcome {
    let mut d = Line::new();
    let khz = if cpu::kvmclock::enable() {
        clock_tsc_khz()
    } else {
        0
    };
    if khz == 0 {
        cpu::kvmclock::disable();
        d.s("needs kvmclock and the TSC frequency from the hypervisor");
        return report(Outcome::Skip, "persist", &mut d);
    }
    let cmdline = boot_info().cmdline();
    let mib = param(cmdline, "probe.persist_mib")
        .and_then(parse_u64)
        .unwrap_or(64);
    let rate = param(cmdline, "probe.persist_rate")
        .and_then(parse_u64)
        .unwrap_or(0);
    let ms = param(cmdline, "probe.persist_ms")
        .and_then(parse_u64)
        .unwrap_or(3000);
    d.s("mib=").dec(mib).s(" rate=").dec(rate).s(" ms=").dec(ms);
    let mut disk = None;
    if param(cmdline, "probe.persist_disk").and_then(parse_u64) == Some(1) {
        match DiskWriter::new(&mut d) {
            Some(w) => disk = Some(w),
            None => return fail("persist", &mut d),
        }
    }
    let disk_every = param(cmdline, "probe.persist_disk_ms")
        .and_then(parse_u64)
        .unwrap_or(10)
        * 1_000_000;
    if mib == 0 || !boot_info().in_ram(PERSIST_BASE, mib << 20) {
        d.s(" problem: the buffer does not fit in RAM above 32 MiB");
        return fail("persist", &mut d);
    }
    const CHUNK: u64 = 64;
    // SAFETY: nothing else uses PERSIST; the CPL3 side runs only from here.
    unsafe {
        *PERSIST.get_mut() = Persist {
            base: PERSIST_BASE,
            pages: mib << 8,
            counter: 0,
            checksum: 0,
            chunk: CHUNK,
        };
    }
    let stack_top = USER_STACK.as_ptr() as u64 + 4096;
    let read = || cpu::kvmclock::read().unwrap_or(0);
    let t0 = read();
    let end = t0 + ms * 1_000_000;
    let (mut last, mut max_gap) = (t0, 0u64);
    let (mut last_tsc, mut max_tsc_gap) = (cpu::rdtsc(), 0u64);
    let mut asked = 0u64;
    let mut backwards = false;
    let mut announced = false;
    let mut steady = false;
    let mut disk_due = 0u64;
    while last < end {
        if let Some(w) = disk.as_mut() {
            if last >= disk_due {
                if !w.write() {
                    d.s(" problem: disk write ").dec(w.acked).s(" failed");
                    return fail("persist", &mut d);
                }
                disk_due = last + disk_every;
            }
        }
        // Pages due by now at the chosen rate (256 pages per MiB).
        let due = if rate == 0 {
            u64::MAX
        } else {
            (last - t0) / 1000 * rate * 256 / 1_000_000
        };
        if asked < due {
            let r = crate::entry::run_user(user_persist_step as *const () as u64, stack_top);
            if r != 0 {
                d.s(" problem: the workload stopped: ").hex(r);
                return fail("persist", &mut d);
            }
            asked += CHUNK;
        }
        if !steady && asked >= mib << 8 {
            // Every page of the buffer written once: from here each write rewrites one.
            crate::console::println("persist: steady");
            steady = true;
            (last, last_tsc) = (read(), cpu::rdtsc());
            continue;
        }
        let now = read();
        let tsc = cpu::rdtsc();
        if !announced {
            crate::console::println("persist: running");
            announced = true;
            (last, last_tsc) = (read(), cpu::rdtsc());
            continue;
        }
        backwards |= now < last;
        max_gap = max_gap.max(now.saturating_sub(last));
        max_tsc_gap = max_tsc_gap.max(tsc.wrapping_sub(last_tsc));
        (last, last_tsc) = (now, tsc);
    }
    cpu::kvmclock::disable();
    // SAFETY: as above.
    let counter = unsafe { PERSIST.get().counter };
    let bad = crate::entry::run_user(user_persist_verify as *const () as u64, stack_top);
    d.s(" pages_written=")
        .dec(counter)
        .s(" max_gap=")
        .dec(max_gap / 1000)
        .s("us tsc_gap=")
        .dec(max_tsc_gap * 1000 / khz)
        .s("us");
    if let Some(w) = disk.as_mut() {
        d.s(" disk_writes=").dec(w.acked);
        if let Some(n) = w.verify() {
            d.s(" problem: acknowledged disk write ")
                .dec(n)
                .s(" is not on the disk");
            return fail("persist", &mut d);
        }
    }
    if counter != asked {
        d.s(" problem: the counter says ")
            .dec(counter)
            .s(" pages, the workload was asked for ")
            .dec(asked);
        return fail("persist", &mut d);
    }
    if bad == u64::MAX {
        d.s(" problem: the checksum does not match the pages written");
        return fail("persist", &mut d);
    }
    if bad != 0 {
        d.s(" problem: page ")
            .dec(bad - 1)
            .s(" does not hold the pattern of its last write");
        return fail("persist", &mut d);
    }
    if backwards {
        d.s(" problem: kvmclock went backwards");
        return fail("persist", &mut d);
    }
    pass("persist", &mut d)
}
