//! One thread per vCPU: enter the guest, handle the exit, account for it, repeat until the VM
//! ends. A vCPU is stopped by setting the VM's stop flag and sending its thread
//! [`kick_signal`]; the handler sets `immediate_exit` in the vCPU's `kvm_run`, so KVM_RUN returns
//! whether the signal lands before or during the call.

use crate::diagnose;
use crate::error::VmEnd;
use crate::stats::{self, VcpuStats};
use crate::VmShared;
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use wv_devices::bus::unassigned_read;
use wv_devices::DeviceAction;
use wv_pv::{CallContext, Effect, MachineInfo};

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal that kicks a vCPU out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int) {
    KVM_RUN.with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set while the vCPU fd
            // (and so the mapping) is alive; a byte store is async-signal-safe.
            unsafe { std::ptr::write_volatile(&raw mut (*p).immediate_exit, 1) }
        }
    });
}

/// Installs the kick handler (process-wide, once per run).
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: the handler only performs an async-signal-safe store; sigaction is given a fully
    // initialised struct.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = kick_handler as *const () as usize;
        sa.sa_flags = 0;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

struct Ctx<'a> {
    shared: &'a VmShared,
    exits: u64,
    index: u32,
}

impl CallContext for Ctx<'_> {
    fn mem(&self) -> &wv_machine::GuestRam {
        &self.shared.mem
    }
    fn machine(&self) -> &MachineInfo {
        &self.shared.info
    }
    fn exit_count(&self) -> u64 {
        self.exits
    }
    fn vcpu_index(&self) -> u32 {
        self.index
    }
    fn console_write(&mut self, bytes: &[u8]) -> bool {
        self.shared
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .console_write(bytes)
            .is_ok()
    }
}

/// What an exit needs after the borrow of `kvm_run` ends.
enum Step {
    Continue,
    End(VmEnd),
    TripleFault,
    InternalError(InternalExit),
    FailEntry(u64),
    Unexpected(&'static str),
    RunError(kvm_ioctls::Error),
}

/// Runs vCPU `index` until the VM stops; returns its accounting and the (still open) vCPU.
pub fn run(index: u32, mut fd: VcpuFd, shared: Arc<VmShared>) -> (VcpuStats, VcpuFd) {
    let table = &shared.table;
    let mut st = VcpuStats::new(index, table.len());
    KVM_RUN.with(|p| p.set(fd.get_kvm_run() as *mut kvm_run));
    let clock = Clock::new(shared.info.tsc_khz);
    let now = || clock.ticks();
    // With the userspace interrupt controllers: this vCPU's local APIC side.
    let uapic = shared.uapic.as_ref().map(|(u, ..)| u.clone());
    let mut apic = match &uapic {
        Some(u) => match u.attach(index, &fd) {
            Ok(a) => Some(a),
            Err(e) => {
                shared.finish(VmEnd::KvmFailure(format!("vCPU {index}: {e}")));
                None
            }
        },
        None => None,
    };
    let mut t_entry = now();
    loop {
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        if shared.gate.is_closed() {
            shared.gate.park(index, &mut fd, &st);
            t_entry = now();
            continue;
        }
        if let (Some(u), Some(a)) = (&uapic, apic.as_mut()) {
            // Waits here for STARTUP (an AP), injects what is pending.
            match u.before_run(a, &mut fd) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    shared.finish(VmEnd::KvmFailure(format!("vCPU {index}: {e}")));
                    break;
                }
            }
            t_entry = now();
        }
        let mut halted = false;
        let res = fd.run();
        let t_exit = now();
        st.guest_ns += t_exit.wrapping_sub(t_entry);
        st.exits += 1;
        let mut cause = stats::OTHER;
        let step = match res {
            Ok(VcpuExit::IoOut(port, data)) => {
                if port == wv_abi::CALL_PORT && data.len() == 4 {
                    let gpa = u64::from(u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
                    let mut ctx = Ctx {
                        shared: &shared,
                        exits: st.exits,
                        index,
                    };
                    let out = wv_pv::handle(&mut ctx, gpa);
                    cause = out.call.map_or(stats::HYPERCALL_INVALID, |c| table.call(c));
                    for (i, n) in out.batched.iter().enumerate() {
                        st.batched[i] += u64::from(*n);
                    }
                    match out.effect {
                        Effect::Continue => Step::Continue,
                        Effect::Poweroff(code) => Step::End(VmEnd::Poweroff(code)),
                    }
                } else if let Some((dev, off)) = shared.bus.lookup(port) {
                    cause = table.io(dev);
                    match shared.bus.write(dev, off, data) {
                        DeviceAction::None => Step::Continue,
                        DeviceAction::Reset => Step::End(VmEnd::Reset("i8042 reset command")),
                        DeviceAction::Poweroff => Step::End(VmEnd::Poweroff(0)),
                    }
                } else {
                    cause = unassigned_port_cause(port);
                    Step::Continue
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if let Some((dev, off)) = shared.bus.lookup(port) {
                    cause = table.io(dev);
                    shared.bus.read(dev, off, data);
                } else {
                    cause = unassigned_port_cause(port);
                    unassigned_read(data);
                }
                Step::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if let Some((lapic, (u, lc, ic))) = apic_page(&shared, addr) {
                    cause = if lapic { *lc } else { *ic };
                    u.mmio(index, lapic, addr, data, false);
                } else if let Some((dev, off)) = shared.mmio.lookup(addr, data.len()) {
                    cause = table.mmio(dev);
                    shared.mmio.read(dev, off, data);
                } else {
                    cause = stats::MMIO_UNASSIGNED;
                    unassigned_read(data);
                }
                Step::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if let Some((lapic, (u, lc, ic))) = apic_page(&shared, addr) {
                    cause = if lapic { *lc } else { *ic };
                    let mut b = [0u8; 8];
                    let n = data.len().min(b.len());
                    b[..n].copy_from_slice(&data[..n]);
                    u.mmio(index, lapic, addr, &mut b[..n], true);
                } else if let Some((dev, off)) = shared.mmio.lookup(addr, data.len()) {
                    cause = table.mmio(dev);
                    shared.mmio.write(dev, off, data);
                } else {
                    cause = stats::MMIO_UNASSIGNED;
                }
                Step::Continue
            }
            Ok(VcpuExit::Hlt) => {
                cause = stats::HLT;
                // Without the in-kernel irqchip HLT comes here: the vCPU sleeps below.
                halted = uapic.is_some();
                Step::Continue
            }
            Ok(VcpuExit::IrqWindowOpen) => {
                cause = stats::IRQ_WINDOW;
                Step::Continue
            }
            Ok(VcpuExit::Intr) => {
                cause = stats::SIGNAL;
                Step::Continue
            }
            Ok(VcpuExit::Debug(_)) => {
                cause = stats::DEBUG;
                Step::Continue
            }
            Ok(VcpuExit::Shutdown) => {
                cause = stats::SHUTDOWN;
                Step::TripleFault
            }
            Ok(VcpuExit::InternalError) => {
                use crate::emulate::{complete, Completed};
                let exit = InternalExit::read(&mut fd);
                let done = match exit.bytes.as_deref() {
                    Some(b) if shared.emulating_host => complete(&mut fd, &shared.mem, b),
                    _ => None,
                };
                match done {
                    Some(done) => {
                        cause = match done {
                            Completed::Int3 => stats::EMULATED_INT3,
                            Completed::Clac => stats::EMULATED_CLAC,
                            Completed::Stac => stats::EMULATED_STAC,
                            Completed::Popcnt => stats::EMULATED_POPCNT,
                            Completed::Fwait => stats::EMULATED_FWAIT,
                            Completed::Ldmxcsr => stats::EMULATED_LDMXCSR,
                        };
                        Step::Continue
                    }
                    None => {
                        cause = stats::INTERNAL_ERROR;
                        Step::InternalError(exit)
                    }
                }
            }
            Ok(VcpuExit::FailEntry(reason, _)) => {
                cause = stats::FAIL_ENTRY;
                Step::FailEntry(reason)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                cause = stats::SYSTEM_EVENT;
                match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Step::End(VmEnd::Poweroff(0)),
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                        Step::End(VmEnd::Reset("KVM system event"))
                    }
                    _ => Step::Unexpected("system event (crash)"),
                }
            }
            // Without the in-kernel APIC: the guest lowered CR8 below a pending interrupt's
            // class; the next run's injection takes the new TPR into account.
            Ok(VcpuExit::SetTpr) if uapic.is_some() => Step::Continue,
            Ok(_) => Step::Unexpected("an exit reason the VMM does not handle"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                cause = stats::SIGNAL;
                fd.set_kvm_immediate_exit(0);
                Step::Continue
            }
            Err(e) => Step::RunError(e),
        };
        let end = match step {
            Step::Continue => None,
            Step::End(e) => Some(e),
            Step::TripleFault => Some(VmEnd::TripleFault(format!("vCPU {index}: {}", regs(&fd)))),
            Step::InternalError(exit) => {
                let what = exit.describe();
                let summary = diagnostic_block(&fd, index, &what, exit.bytes.as_deref());
                Some(VmEnd::KvmFailure(format!(
                    "vCPU {index}: {what}{summary}; {}",
                    regs(&fd)
                )))
            }
            Step::FailEntry(r) => Some(VmEnd::KvmFailure(format!(
                "vCPU {index}: VM entry failed (hardware reason {r:#x}); {}",
                regs(&fd)
            ))),
            Step::Unexpected(what) => Some(VmEnd::KvmFailure(format!(
                "vCPU {index}: {what}; {}",
                regs(&fd)
            ))),
            Step::RunError(e) => Some(VmEnd::KvmFailure(format!(
                "vCPU {index}: KVM_RUN failed: {e}"
            ))),
        };
        t_entry = now();
        st.record(cause, t_entry.wrapping_sub(t_exit));
        shared.live_exits.bump(index, cause);
        if let Some(e) = end {
            shared.finish(e);
            break;
        }
        if let (true, Some(u), Some(a)) = (halted, &uapic, &apic) {
            let if_flag = fd.get_kvm_run().if_flag != 0;
            u.halt(a, if_flag);
            t_entry = now();
        }
    }
    if let (Some(u), Some(a)) = (&uapic, &apic) {
        u.detach(a);
    }
    KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    clock.to_nanos(&mut st);
    (st, fd)
}

/// Time stamps for exit accounting. The TSC when its rate is known: `rdtsc` touches no memory,
/// while the vDSO clock reads the vvar page, and after every world switch that costs a cache or
/// TLB refill (measured: ~0.2 us per exit end to end on a PVM host). Ticks are converted to
/// nanoseconds once, when the vCPU stops.
enum Clock {
    Tsc { khz: u64 },
    Mono(Instant),
}

impl Clock {
    fn new(tsc_khz: u64) -> Clock {
        if tsc_khz > 0 {
            Clock::Tsc { khz: tsc_khz }
        } else {
            Clock::Mono(Instant::now())
        }
    }

    #[inline(always)]
    fn ticks(&self) -> u64 {
        match self {
            // SAFETY: rdtsc exists on every x86-64 CPU and has no side effects.
            Clock::Tsc { .. } => unsafe { core::arch::x86_64::_rdtsc() },
            Clock::Mono(start) => crate::nanos(start.elapsed()),
        }
    }

    fn to_nanos(&self, st: &mut VcpuStats) {
        let Clock::Tsc { khz } = *self else { return };
        let ns =
            |t: u64| u64::try_from(u128::from(t) * 1_000_000 / u128::from(khz)).unwrap_or(u64::MAX);
        st.guest_ns = ns(st.guest_ns);
        st.vmm_ns = ns(st.vmm_ns);
        for c in &mut st.causes {
            c.vmm_ns = ns(c.vmm_ns);
        }
    }
}

/// The userspace interrupt controller page `addr` is in, if any (true: the local APIC's), with
/// the controllers and their accounting causes.
fn apic_page(shared: &VmShared, addr: u64) -> Option<(bool, &crate::uapic::WithCauses)> {
    let u = shared.uapic.as_ref()?;
    Some((crate::uapic::Uapic::owns(addr)?, u))
}

/// The cause of an access to a port no device answers (a wrong-sized call-port access is an
/// invalid call).
fn unassigned_port_cause(port: u16) -> usize {
    if port == wv_abi::CALL_PORT {
        stats::HYPERCALL_INVALID
    } else {
        stats::IO_UNASSIGNED
    }
}

/// One line of registers for a diagnostic.
fn regs(fd: &VcpuFd) -> String {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} cs={:#x} (cpl {}, {}) \
             cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            r.rip,
            r.rsp,
            r.rflags,
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            s.cs.selector,
            s.cs.dpl,
            diagnose::mode(&s),
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer
        ),
        _ => "registers unavailable".to_string(),
    }
}

/// Prints the diagnostic block of a failed vCPU (what failed, the instruction at RIP decoded
/// with its bytes, the registers) to stderr in one write, before `wv`'s closing one-line
/// error; returns what the closing line adds (the decoded instruction).
fn diagnostic_block(fd: &VcpuFd, index: u32, what: &str, bytes: Option<&[u8]>) -> String {
    use std::io::Write;
    let (Ok(r), Ok(s)) = (fd.get_regs(), fd.get_sregs()) else {
        return String::new();
    };
    let mut block = format!("wv: vCPU {index} stopped: {what}\n");
    let mut summary = String::new();
    match bytes {
        Some(b) => {
            let (text, hex) = diagnose::instruction(b, diagnose::bitness(&s), r.rip);
            block.push_str(&format!("  instruction  {text}\n  bytes        {hex}\n"));
            summary = format!(": `{text}` at rip={:#x}", r.rip);
        }
        None => block.push_str("  instruction  (KVM gave no instruction bytes)\n"),
    }
    block.push_str(&diagnose::registers(&r, &s));
    let _ = std::io::stderr().lock().write_all(block.as_bytes());
    summary
}

/// A KVM_EXIT_INTERNAL_ERROR as it came: the sub-reason, its data words, and the instruction
/// bytes an emulation failure carries. Read once per exit; described only if it ends the VM.
pub(crate) struct InternalExit {
    suberror: u32,
    data: [u64; 16],
    n: usize,
    bytes: Option<diagnose::InsnBytes>,
}

impl InternalExit {
    pub(crate) fn read(fd: &mut VcpuFd) -> InternalExit {
        let run = fd.get_kvm_run();
        // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so `internal` is the active
        // member.
        let ie = unsafe { run.__bindgen_anon_1.internal };
        let n = (ie.ndata as usize).min(ie.data.len());
        InternalExit {
            suberror: ie.suberror,
            data: ie.data,
            n,
            bytes: diagnose::emulation_bytes(ie.suberror, &ie.data[..n]),
        }
    }

    /// The instruction bytes an emulation failure carries.
    pub(crate) fn bytes(&self) -> Option<&[u8]> {
        self.bytes.as_deref()
    }

    /// What failed, for the diagnostic (the data words only when they are not instruction
    /// bytes, which the diagnostic block shows decoded).
    pub(crate) fn describe(&self) -> String {
        let what = match self.suberror {
            1 => "instruction emulation failed",
            2 => "exception during exception delivery",
            3 => "event delivery failed",
            4 => "unexpected exit reason",
            _ => "internal error",
        };
        if self.bytes.is_some() {
            return format!("{what} (suberror {})", self.suberror);
        }
        let data: Vec<String> = self.data[..self.n]
            .iter()
            .map(|d| format!("{d:#x}"))
            .collect();
        format!(
            "{what} (suberror {}, data [{}])",
            self.suberror,
            data.join(" ")
        )
    }
}

/// Makes this thread's kick signal stop `fd` (a cluster node's own vCPU loop).
pub(crate) fn bind_kick(fd: &mut VcpuFd) {
    KVM_RUN.with(|p| p.set(fd.get_kvm_run() as *mut kvm_run));
}

/// Undoes [`bind_kick`] before the vCPU fd goes.
pub(crate) fn unbind_kick() {
    KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
}

/// Node 0 serves a port or MMIO access that vCPU `index` of another cluster node made
/// (crate::split): the same dispatch as an exit here (the paravirtual call port, the port
/// bus, the I/O APIC's page, the MMIO bus); a read's bytes are left in `data`. Returns how the
/// VM ends if the access ends it.
pub(crate) fn serve_forwarded(
    shared: &VmShared,
    index: u32,
    kind: crate::split::ExitKind,
    addr: u64,
    data: &mut [u8],
) -> Option<VmEnd> {
    use crate::split::ExitKind;
    match kind {
        ExitKind::PioOut => {
            let port = u16::try_from(addr).ok()?;
            if port == wv_abi::CALL_PORT && data.len() == 4 {
                let gpa = u64::from(u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
                let mut ctx = Ctx {
                    shared,
                    exits: 0,
                    index,
                };
                match wv_pv::handle(&mut ctx, gpa).effect {
                    Effect::Continue => None,
                    Effect::Poweroff(code) => Some(VmEnd::Poweroff(code)),
                }
            } else if let Some((dev, off)) = shared.bus.lookup(port) {
                match shared.bus.write(dev, off, data) {
                    DeviceAction::None => None,
                    DeviceAction::Reset => Some(VmEnd::Reset("i8042 reset command")),
                    DeviceAction::Poweroff => Some(VmEnd::Poweroff(0)),
                }
            } else {
                None
            }
        }
        ExitKind::PioIn => {
            let port = u16::try_from(addr).ok()?;
            match shared.bus.lookup(port) {
                Some((dev, off)) => shared.bus.read(dev, off, data),
                None => unassigned_read(data),
            }
            None
        }
        ExitKind::MmioRead => {
            if let Some((lapic, (u, ..))) = apic_page(shared, addr) {
                u.mmio(index, lapic, addr, data, false);
            } else if let Some((dev, off)) = shared.mmio.lookup(addr, data.len()) {
                shared.mmio.read(dev, off, data);
            } else {
                unassigned_read(data);
            }
            None
        }
        ExitKind::MmioWrite => {
            if let Some((lapic, (u, ..))) = apic_page(shared, addr) {
                u.mmio(index, lapic, addr, data, true);
            } else if let Some((dev, off)) = shared.mmio.lookup(addr, data.len()) {
                shared.mmio.write(dev, off, data);
            }
            None
        }
    }
}
