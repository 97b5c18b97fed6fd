//! Processor set-up and interrupts: IDT, TSS, the local APIC, the legacy PIC, and the
//! dispatcher every interrupt stub calls.

use crate::console::{outb, Line};
use crate::entry;
use crate::smp::MAX_CPUS;
use crate::sync::Global;
use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// Registers saved by the common interrupt stub, lowest address first.
#[repr(C)]
pub struct Frame {
    /// General-purpose registers, in reverse push order.
    pub r15: u64,
    #[allow(missing_docs)]
    pub r14: u64,
    #[allow(missing_docs)]
    pub r13: u64,
    #[allow(missing_docs)]
    pub r12: u64,
    #[allow(missing_docs)]
    pub r11: u64,
    #[allow(missing_docs)]
    pub r10: u64,
    #[allow(missing_docs)]
    pub r9: u64,
    #[allow(missing_docs)]
    pub r8: u64,
    #[allow(missing_docs)]
    pub rbp: u64,
    #[allow(missing_docs)]
    pub rdi: u64,
    #[allow(missing_docs)]
    pub rsi: u64,
    #[allow(missing_docs)]
    pub rdx: u64,
    #[allow(missing_docs)]
    pub rcx: u64,
    #[allow(missing_docs)]
    pub rbx: u64,
    /// rax (the user-mode system call argument).
    pub rax: u64,
    /// Vector number.
    pub vector: u64,
    /// Error code (0 when the CPU pushes none).
    pub error: u64,
    /// Interrupted instruction pointer.
    pub rip: u64,
    /// Interrupted code segment (low two bits: privilege level).
    pub cs: u64,
    /// Interrupted flags.
    pub rflags: u64,
    /// Interrupted stack pointer.
    pub rsp: u64,
    /// Interrupted stack segment.
    pub ss: u64,
}

/// Vector the probe's MSI-X test programs into a device's table.
pub const MSIX_VECTOR: u8 = 0x50;
/// MSI-X interrupts taken on [`MSIX_VECTOR`].
pub static MSIX_HITS: AtomicU64 = AtomicU64::new(0);

/// Vector of the local APIC timer.
pub const TIMER_VECTOR: u8 = 0x40;
/// Vector user code traps to when it is done (`int3`, #BP through a DPL-3 gate). Neither
/// `int 0x80` nor `syscall` works from guest CPL3 on every host KVM (on PVM the first becomes
/// #UD and the second enters the kernel's code without leaving CPL3); exceptions always do.
pub const RETURN_VECTOR: u8 = 3;
/// Spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;

#[repr(C, align(16))]
struct Idt([u64; 512]);

#[repr(C, packed)]
#[derive(Clone, Copy)]
struct Tss {
    reserved0: u32,
    rsp0: u64,
    rsp1: u64,
    rsp2: u64,
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

static IDT: Global<Idt> = Global::new(Idt([0; 512]));
const TSS0: Tss = Tss {
    reserved0: 0,
    rsp0: 0,
    rsp1: 0,
    rsp2: 0,
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    iomap_base: 104,
};
static TSS: Global<Tss> = Global::new(TSS0);
/// The APs' own TSSs (by start-up slot), for APs that run CPL3 code.
static AP_TSS: Global<[Tss; MAX_CPUS]> = Global::new([TSS0; MAX_CPUS]);
const AP_ISTACK: usize = 4096;
#[repr(C, align(4096))]
struct ApIstacks([[u8; AP_ISTACK]; MAX_CPUS]);
/// The stacks APs take interrupts from CPL3 on (by slot).
#[link_section = ".stack"]
static AP_ISTACKS: Global<ApIstacks> = Global::new(ApIstacks([[0; AP_ISTACK]; MAX_CPUS]));

#[repr(C, align(16))]
struct Stack([u8; 16384]);
#[link_section = ".stack"]
static INTERRUPT_STACK: Global<Stack> = Global::new(Stack([0; 16384]));

/// Timer ticks taken, in total and while user code ran.
pub static TICKS: AtomicU64 = AtomicU64::new(0);
/// Timer ticks that interrupted CPL3 code.
pub static USER_TICKS: AtomicU64 = AtomicU64::new(0);
/// Interrupts on vectors nobody expects.
pub static STRAY: AtomicU64 = AtomicU64::new(0);

/// What a fault taken in user mode should do.
pub static USER_FAULT_EXPECTED: AtomicU64 = AtomicU64::new(0);

/// Set while a kernel-mode `int3` is expected (the `int3` test): its #BP is counted and
/// returns to the next instruction instead of failing.
pub static KERNEL_BP_EXPECTED: AtomicU64 = AtomicU64::new(0);
/// Kernel-mode #BPs taken while expected.
pub static KERNEL_BP: AtomicU64 = AtomicU64::new(0);
/// The return address of the last of them (the instruction after the `int3`).
pub static KERNEL_BP_RIP: AtomicU64 = AtomicU64::new(0);

fn set_gate(idt: &mut Idt, v: usize, handler: u64, dpl: u64) {
    let low = (handler & 0xffff)
        | (u64::from(entry::KERNEL_CS) << 16)
        | ((0x8e | (dpl << 5)) << 40)
        | ((handler >> 16) & 0xffff) << 48;
    idt.0[2 * v] = low;
    idt.0[2 * v + 1] = handler >> 32;
}

/// Installs the IDT and TSS on the boot processor and masks the legacy PIC.
pub fn init_bsp() {
    // SAFETY: single-threaded boot; nothing else touches the IDT yet.
    let idt = unsafe { IDT.get_mut() };
    for v in 0..256usize {
        let dpl = if v == RETURN_VECTOR as usize { 3 } else { 0 };
        set_gate(idt, v, entry::isr_address(v as u8), dpl);
    }
    load_idt();
    // SAFETY: as above, boot is single-threaded.
    let tss = unsafe { TSS.get_mut() };
    let stack_top = INTERRUPT_STACK.as_ptr() as u64 + 16384;
    tss.rsp0 = stack_top;
    let base = TSS.as_ptr() as u64;
    entry::set_tss_descriptor(base, 103);
    // SAFETY: the descriptor at TSS_SEL was just written and points at a valid TSS.
    unsafe { asm!("ltr ax", in("ax") entry::TSS_SEL, options(nostack, preserves_flags)) }
    // Mask both 8259s: vectors 8-15 would alias CPU exceptions if a BIOS left the PIC there.
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}

/// Loads a TSS of its own on the AP in start-up slot `slot` (its interrupt stack for CPL3
/// code). Called by that AP while the BSP waits for it, so one AP at a time rewrites the GDT's
/// TSS descriptor (the BSP's TR keeps the descriptor it loaded).
pub fn init_ap_tss(slot: usize) {
    let slot = slot.min(MAX_CPUS - 1);
    // SAFETY: slot `slot` is this AP's alone and nothing reads it before the `ltr` below.
    let tss = unsafe { &mut AP_TSS.get_mut()[slot] };
    tss.rsp0 = AP_ISTACKS.as_ptr() as u64 + ((slot + 1) * AP_ISTACK) as u64;
    entry::set_tss_descriptor(core::ptr::from_mut(tss) as u64, 103);
    // SAFETY: the descriptor at TSS_SEL was just written (available) for this AP's TSS.
    unsafe { asm!("ltr ax", in("ax") entry::TSS_SEL, options(nostack, preserves_flags)) }
}

/// Halts with interrupts off until the VM ends.
pub fn park() -> ! {
    loop {
        cli();
        // SAFETY: halting with interrupts off only waits for the VM's end (or an NMI).
        unsafe { asm!("hlt", options(nomem, nostack)) }
    }
}

/// Loads the shared IDT on the calling CPU.
pub fn load_idt() {
    #[repr(C, packed)]
    struct Ptr {
        limit: u16,
        base: u64,
    }
    let p = Ptr {
        limit: 4095,
        base: IDT.as_ptr() as u64,
    };
    // SAFETY: the IDT is static and fully populated before any CPU loads it.
    unsafe { asm!("lidt [{}]", in(reg) &p, options(nostack, preserves_flags)) }
}

/// Lets pending interrupts in for a moment (`sti; nop; cli`).
pub fn enable_interrupts_briefly() {
    // SAFETY: handlers are installed before any caller enables interrupts.
    unsafe { asm!("sti", "nop", "cli", options(nomem, nostack)) }
}

/// Disables interrupts.
pub fn cli() {
    // SAFETY: disabling interrupts is always sound.
    unsafe { asm!("cli", options(nomem, nostack)) }
}

/// Waits for an interrupt with interrupts enabled (atomically: `sti; hlt`).
pub fn wait_for_interrupt() {
    // SAFETY: sti takes effect after hlt begins, so no wake-up is lost.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) }
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc has no side effects.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Local APIC (xAPIC MMIO at its default address).
pub mod lapic {
    const BASE: u64 = 0xfee0_0000;
    /// APIC ID register.
    pub const ID: u64 = 0x20;
    /// End of interrupt.
    pub const EOI: u64 = 0xb0;
    /// Spurious interrupt vector register.
    pub const SVR: u64 = 0xf0;
    /// Interrupt command register, low half.
    pub const ICR_LOW: u64 = 0x300;
    /// Interrupt command register, high half.
    pub const ICR_HIGH: u64 = 0x310;
    /// LVT timer.
    pub const LVT_TIMER: u64 = 0x320;
    /// Timer initial count.
    pub const TIMER_INIT: u64 = 0x380;
    /// Timer divide configuration.
    pub const TIMER_DIV: u64 = 0x3e0;

    /// Reads a register.
    pub fn read(reg: u64) -> u32 {
        // SAFETY: the APIC page is identity-mapped uncached; registers are 32-bit aligned.
        unsafe { ((BASE + reg) as *const u32).read_volatile() }
    }
    /// Writes a register.
    pub fn write(reg: u64, v: u32) {
        // SAFETY: as for read.
        unsafe { ((BASE + reg) as *mut u32).write_volatile(v) }
    }
    /// This CPU's APIC ID.
    pub fn id() -> u32 {
        read(ID) >> 24
    }
    /// Software-enables the APIC.
    pub fn enable() {
        write(SVR, 0x100 | u32::from(super::SPURIOUS_VECTOR));
    }
}

/// Called by the assembly stubs for every interrupt and exception.
#[no_mangle]
extern "C" fn interrupt_dispatch(f: &mut Frame) {
    let v = f.vector as u8;
    let from_user = f.cs & 3 == 3;
    match v {
        TIMER_VECTOR => {
            TICKS.fetch_add(1, Ordering::Relaxed);
            if from_user {
                USER_TICKS.fetch_add(1, Ordering::Relaxed);
            }
            lapic::write(lapic::EOI, 0);
        }
        SPURIOUS_VECTOR => {}
        MSIX_VECTOR => {
            MSIX_HITS.fetch_add(1, Ordering::Relaxed);
            lapic::write(lapic::EOI, 0);
        }
        RETURN_VECTOR if from_user && f.rax == crate::mp::AP_DONE => park(),
        RETURN_VECTOR if from_user => entry::return_to_kernel(f.rax),
        crate::mp::PING_VECTOR => {
            crate::mp::on_ping();
            lapic::write(lapic::EOI, 0);
        }
        crate::mp::PONG_VECTOR => {
            crate::mp::on_pong();
            lapic::write(lapic::EOI, 0);
        }
        RETURN_VECTOR if KERNEL_BP_EXPECTED.load(Ordering::Relaxed) == 1 => {
            KERNEL_BP.fetch_add(1, Ordering::Relaxed);
            KERNEL_BP_RIP.store(f.rip, Ordering::Relaxed);
        }
        0..=31 if from_user && USER_FAULT_EXPECTED.load(Ordering::Relaxed) == 1 => {
            USER_FAULT_EXPECTED.store(0, Ordering::Relaxed);
            entry::return_to_kernel(0xfa17_0000 | f.vector);
        }
        0..=31 => {
            Line::new()
                .s("FAIL exception vector=")
                .dec(f.vector)
                .s(" error=")
                .hex(f.error)
                .s(" rip=")
                .hex(f.rip)
                .s(" cs=")
                .hex(f.cs)
                .end();
            crate::poweroff(crate::EXIT_EXCEPTION);
        }
        _ => {
            STRAY.fetch_add(1, Ordering::Relaxed);
            lapic::write(lapic::EOI, 0);
        }
    }
}

/// Writes a model-specific register.
pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: callers pass MSRs the hypervisor implements; a write has no memory effects here.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack))
    }
}

/// KVM's paravirtual clock (kvmclock), as Linux guests read it: the hypervisor keeps a
/// `pvclock_vcpu_time_info` up to date for this CPU.
pub mod kvmclock {
    use core::sync::atomic::{fence, Ordering};

    /// MSR_KVM_SYSTEM_TIME_NEW.
    const MSR_SYSTEM_TIME: u32 = 0x4b56_4d01;

    /// struct pvclock_vcpu_time_info.
    #[repr(C, align(32))]
    pub struct TimeInfo {
        version: u32,
        pad0: u32,
        tsc_timestamp: u64,
        system_time: u64,
        tsc_to_system_mul: u32,
        tsc_shift: i8,
        flags: u8,
        pad: [u8; 2],
    }

    static mut INFO: TimeInfo = TimeInfo {
        version: 0,
        pad0: 0,
        tsc_timestamp: 0,
        system_time: 0,
        tsc_to_system_mul: 0,
        tsc_shift: 0,
        flags: 0,
        pad: [0; 2],
    };

    /// Asks the hypervisor to keep the time info for this (boot) CPU; true once it has.
    pub fn enable() -> bool {
        let gpa = (&raw const INFO) as u64;
        super::wrmsr(MSR_SYSTEM_TIME, gpa | 1);
        read().is_some()
    }

    /// Stops the updates.
    pub fn disable() {
        super::wrmsr(MSR_SYSTEM_TIME, 0);
    }

    /// The TSC frequency in kHz implied by the hypervisor's scale (ns = (tsc << shift) * mul
    /// >> 32), or None before the info is filled: for hypervisors that do not say it otherwise.
    pub fn tsc_khz() -> Option<u64> {
        let p = &raw const INFO;
        // SAFETY: as in read(); a torn pair is ruled out by the version check below.
        let (v0, mul, shift, v1) = unsafe {
            let v0 = core::ptr::read_volatile(&raw const (*p).version);
            fence(Ordering::Acquire);
            let mul = core::ptr::read_volatile(&raw const (*p).tsc_to_system_mul);
            let shift = core::ptr::read_volatile(&raw const (*p).tsc_shift);
            fence(Ordering::Acquire);
            (
                v0,
                mul,
                shift,
                core::ptr::read_volatile(&raw const (*p).version),
            )
        };
        if v0 == 0 || v0 != v1 || v0 & 1 != 0 || mul == 0 || !(-31..=31).contains(&shift) {
            return None;
        }
        // TSC cycles per ms = 1e6 * 2^32 / (mul * 2^shift).
        let num = 1_000_000u128 << 32;
        let khz = if shift < 0 {
            (num << -shift) / u128::from(mul)
        } else {
            num / (u128::from(mul) << shift)
        };
        u64::try_from(khz).ok().filter(|&k| k > 0)
    }

    /// Nanoseconds of kvmclock time, or None if the hypervisor never filled the info.
    pub fn read() -> Option<u64> {
        let p = &raw const INFO;
        loop {
            // SAFETY: INFO is a static the hypervisor writes; volatile reads of its fields
            // under the version protocol (odd: being updated) give a consistent copy.
            let (v0, ts, st, mul, shift) = unsafe {
                let v0 = core::ptr::read_volatile(&raw const (*p).version);
                fence(Ordering::Acquire);
                (
                    v0,
                    core::ptr::read_volatile(&raw const (*p).tsc_timestamp),
                    core::ptr::read_volatile(&raw const (*p).system_time),
                    core::ptr::read_volatile(&raw const (*p).tsc_to_system_mul),
                    core::ptr::read_volatile(&raw const (*p).tsc_shift),
                )
            };
            let tsc = super::rdtsc();
            fence(Ordering::Acquire);
            // SAFETY: as above.
            let v1 = unsafe { core::ptr::read_volatile(&raw const (*p).version) };
            if v0 != v1 || v0 & 1 != 0 {
                continue;
            }
            if v0 == 0 || mul == 0 {
                return None;
            }
            let mut d = tsc.wrapping_sub(ts);
            if shift < 0 {
                d >>= -shift;
            } else {
                d <<= shift;
            }
            return Some(st + ((u128::from(d) * u128::from(mul)) >> 32) as u64);
        }
    }
}
