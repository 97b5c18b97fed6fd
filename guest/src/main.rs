//! The Worldvisor probe guest: a tiny "flexible OS" (seed 003) that boots through the Linux
//! 32/64-bit or PVH protocol, detects whether it runs on Worldvisor, runs the self-tests its
//! command line names (`probe.tests=boot,smp,timer,hypercall,batch,user,pci,rng`), prints one
//! `PASS`/`FAIL`/`SKIP` line per test and powers off with exit code 0 when every test passed.
//!
//! Kernel-mode code is kept short because on our CI machines it is emulated instruction by
//! instruction; the compute phase of the `user` test runs at CPL3, natively.
#![no_std]
#![no_main]

mod acpi;
mod attack;
mod bootinfo;
mod console;
mod cpu;
mod entry;
mod mp;
mod net;
mod pci;
mod pv;
mod smp;
mod sync;
mod tests;
mod virtio;

use bootinfo::BootInfo;
use console::{outb, outw, println, Line};
use sync::Global;

/// Exit code: every selected test passed.
pub const EXIT_PASS: u8 = 0;
/// Exit code: at least one test failed.
pub const EXIT_FAIL: u8 = 1;
/// Exit code: an unexpected CPU exception.
pub const EXIT_EXCEPTION: u8 = 2;
/// Exit code: a Rust panic.
pub const EXIT_PANIC: u8 = 3;

static BOOT: Global<BootInfo> = Global::new(bootinfo::empty());

/// The boot information read at entry.
pub fn boot_info() -> &'static BootInfo {
    // SAFETY: written once in probe_main before any reader runs, never again.
    unsafe { BOOT.get() }
}

#[no_mangle]
extern "C" fn probe_main(protocol: u32, info: u64) -> ! {
    // SAFETY: single-threaded boot; the only writer.
    unsafe { *BOOT.get_mut() = bootinfo::read(protocol, info) };
    let bi = boot_info();
    let cmdline = bi.cmdline();
    let pv_allowed = bootinfo::param(cmdline, "probe.pv") != Some(b"off");
    let on_wv = pv::detect(pv_allowed);
    cpu::init_bsp();
    Line::new()
        .s("Worldvisor probe guest ")
        .s(env!("CARGO_PKG_VERSION"))
        .s(": boot=")
        .s(bi.protocol_name())
        .s(" hypervisor=")
        .s(if on_wv {
            "worldvisor"
        } else if pv_allowed {
            "other-or-none"
        } else {
            "ignored(probe.pv=off)"
        })
        .end();
    let tests = bootinfo::param(cmdline, "probe.tests")
        .unwrap_or(b"boot,smp,timer,hypercall,batch,user,pci,rng");
    let (mut passed, mut failed, mut skipped) = (0u64, 0u64, 0u64);
    for name in tests.split(|&b| b == b',') {
        if name.is_empty() {
            continue;
        }
        match tests::run(name) {
            tests::Outcome::Pass => passed += 1,
            tests::Outcome::Fail => failed += 1,
            tests::Outcome::Skip => skipped += 1,
        }
    }
    Line::new()
        .s("probe: summary passed=")
        .dec(passed)
        .s(" failed=")
        .dec(failed)
        .s(" skipped=")
        .dec(skipped)
        .end();
    if failed == 0 && bootinfo::param(cmdline, "probe.poweroff") == Some(b"acpi") {
        println("probe: powering off through ACPI S5");
        acpi::s5_poweroff();
        println("probe: ACPI S5 did not power off");
        poweroff(EXIT_FAIL)
    }
    poweroff(if failed == 0 { EXIT_PASS } else { EXIT_FAIL })
}

/// Powers the machine off with `code`: through the VMM call on Worldvisor; natively through
/// QEMU's isa-debug-exit port, then ACPI PM1a (S5) at the ports QEMU's firmware uses.
pub fn poweroff(code: u8) -> ! {
    if pv::on_worldvisor() || pv::detect(true) {
        pv::call_args(wv_abi::Call::Poweroff, [u64::from(code), 0, 0, 0, 0]);
    }
    outb(0xf4, code);
    outw(0x604, 0x2000);
    outw(0xb004, 0x2000);
    println("probe: no way to power off found; halting");
    loop {
        cpu::cli();
        // SAFETY: halting with interrupts off is the intended end state.
        unsafe { core::arch::asm!("hlt", options(nomem, nostack)) }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut l = Line::new();
    l.s("FAIL panic");
    if let Some(loc) = info.location() {
        l.s(" at ").s(loc.file()).s(":").dec(u64::from(loc.line()));
    }
    l.end();
    poweroff(EXIT_PANIC)
}
