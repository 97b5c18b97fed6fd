//! The userspace interrupt controllers (`wv run --irqchip user`): KVM runs without its
//! in-kernel irqchip (no KVM_CREATE_IRQCHIP, no KVM_CREATE_PIT2) and this module owns, for one
//! VMM process, every vCPU's local APIC and the I/O APIC (register logic in
//! [`wv_devices::apic`]), the delivery of every interrupt source through one function
//! ([`Uapic::send`]: IPIs, I/O APIC pins, virtio MSIs, the serial and ACPI GED lines), and
//! the injection into the vCPUs.
//!
//! Where an APIC ID lives is decided by one [`Deliver`] implementation ([`LocalCpus`] here):
//! a cluster layer puts its own in front to route messages ([`wv_devices::apic::Irq`], plain
//! data) for vCPUs of other processes.
//!
//! Injection follows KVM's userspace-irqchip protocol: before each KVM_RUN a pending vector is
//! injected with KVM_INTERRUPT when the last exit said the vCPU can take one
//! (`ready_for_interrupt_injection` and IF), else `request_interrupt_window` asks KVM for an
//! exit when it can. A vCPU in HLT (which exits to userspace here) sleeps on its condition
//! variable until something it can take arrives or its timer is due; a vCPU in KVM_RUN is
//! kicked out (the kick signal sets `immediate_exit`). An AP waits outside KVM_RUN until INIT
//! and STARTUP, then starts in real mode at `vector << 12`. Each vCPU's APIC timer is a POSIX
//! timer signalling that vCPU's thread (the kick), or its sleep's timeout while halted: no
//! thread polls. A relay thread ([`Uapic::relay`]) turns the eventfds the devices signal
//! (irqfds in kernel mode) into messages.

use crate::pci::GsiRouter;
use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;
use wv_devices::apic::{
    self, Addressing, ApicEffect, Deliver, DeliveryMode, Destination, IoApic, Irq, LocalApic,
};

/// The controllers with the accounting causes of their MMIO pages (local APIC, I/O APIC).
pub(crate) type WithCauses = (Arc<Uapic>, usize, usize);

/// KVM_INTERRUPT: `_IOW(KVMIO, 0x86, struct kvm_interrupt)` (kvm-ioctls has no wrapper).
const KVM_INTERRUPT: libc::c_ulong = 0x4004_ae86;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One vCPU's interrupt state, shared by its thread and every sender.
struct CpuState {
    apic: LocalApic,
    nmi: bool,
    /// After INIT (and at start for an AP): not running the guest until a STARTUP.
    waiting_sipi: bool,
    /// The STARTUP vector received while waiting.
    sipi: Option<u8>,
    /// Asleep in [`Uapic::halt`] (woken by the condition variable, not the kick).
    sleeping: bool,
    /// The VM ends: nobody waits any more.
    ending: bool,
}

struct Cpu {
    st: Mutex<CpuState>,
    cv: Condvar,
    /// The vCPU's thread id (a `gettid` value), 0 until it starts and after it leaves.
    tid: AtomicI32,
    /// A kick was sent and the vCPU has not yet come back to [`Uapic::before_run`]: senders
    /// do not queue another real-time signal (an IPI storm costs one signal, not one each).
    kicked: AtomicBool,
}

/// The calling thread's id, by the system call: glibc's `gettid` wrapper is only weakly
/// referenced from Rust's libc, and a static (`crt-static`) release build with LTO links it as
/// a null address (the first vCPU thread then jumped to 0 in `attach`).
fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    libc::pid_t::try_from(tid).unwrap_or(0)
}

impl Cpu {
    fn kick(&self) {
        let t = self.tid.load(Ordering::SeqCst);
        let me = gettid();
        // SeqCst pairs with `before_run`: the vCPU clears `kicked` before it looks at its
        // pending interrupts, a sender sets them before it tests `kicked`, so either the vCPU
        // sees the interrupt or the sender sees `kicked` clear and signals.
        if t == 0 || t == me || self.kicked.swap(true, Ordering::SeqCst) {
            return;
        }
        // A thread id, not a `pthread_t`: a thread that left between the load and the signal
        // makes tgkill fail (or, once its id is reused in this process, wakes another thread
        // whose handler only sets `immediate_exit` if it is a vCPU), where pthread_kill on a
        // joined thread would be undefined.
        // SAFETY: tgkill takes plain integers; the kick handler is installed before any vCPU
        // runs and is async-signal-safe.
        let r = unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                libc::getpid(),
                t,
                crate::vcpu::kick_signal(),
            )
        };
        if r != 0 {
            // No signal is on its way: the next sender must try again.
            self.kicked.store(false, Ordering::SeqCst);
        }
    }
}

/// The vCPUs of this process, by APIC ID (= vCPU index): the local [`Deliver`].
pub struct LocalCpus {
    cpus: Vec<Cpu>,
}

impl Deliver for LocalCpus {
    fn deliver(&self, apic_id: u32, irq: Irq) {
        let Some(cpu) = self.cpus.get(apic_id as usize) else {
            return;
        };
        let mut st = lock(&cpu.st);
        let wake = match irq.mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => st.apic.accept(&irq),
            DeliveryMode::Nmi => {
                st.nmi = true;
                true
            }
            DeliveryMode::Init if irq.assert => {
                st.apic.init();
                st.nmi = false;
                st.waiting_sipi = true;
                st.sipi = None;
                true
            }
            DeliveryMode::StartUp if st.waiting_sipi && st.sipi.is_none() => {
                st.sipi = Some(irq.vector);
                true
            }
            _ => false,
        };
        let sleeping = st.sleeping;
        drop(st);
        if wake {
            cpu.cv.notify_all();
            if !sleeping {
                cpu.kick();
            }
        }
    }
}

/// What an eventfd the relay watches stands for.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Source {
    /// A virtio device's MSI-X vector, by its GSI (the message is the guest's, from the
    /// routes the device's MSI-X table programs).
    Msi(u32),
    /// A pulse on an I/O APIC pin (the serial port's IRQ 4, the ACPI GED).
    Pin(u8),
}

/// See the module documentation.
pub(crate) struct Uapic {
    epoch: Instant,
    cpus: Arc<LocalCpus>,
    /// Where messages go once their destination is resolved to APIC IDs.
    sink: Arc<dyn Deliver>,
    /// Every local APIC's addressing, by APIC ID, for resolving destinations.
    addressing: Mutex<Vec<Addressing>>,
    ioapic: Mutex<IoApic>,
    sources: Mutex<Vec<(EventFd, Source)>>,
    /// Wakes the relay (a new source, the end).
    wake: EventFd,
    /// The MSI routes the guest programmed (set once the PCI devices exist).
    msi: OnceLock<Arc<GsiRouter>>,
    ending: AtomicBool,
}

impl Uapic {
    /// The controllers of a VM with `vcpus` vCPUs (APIC IDs 0..vcpus), all in this process;
    /// every AP waits for INIT and STARTUP.
    pub(crate) fn new(vcpus: u32) -> std::io::Result<Uapic> {
        Uapic::with_deliver(vcpus, |local| local)
    }

    /// [`Uapic::new`], with messages delivered through what `route` makes of the local vCPUs'
    /// [`Deliver`]: a cluster layer's router, which hands the APIC IDs of this process to
    /// `local` and sends the others' messages to their nodes (whose relay calls their own
    /// local [`Deliver`]). The vCPUs of this process are still created for every APIC ID;
    /// those that live elsewhere simply never run here.
    pub(crate) fn with_deliver(
        vcpus: u32,
        route: impl FnOnce(Arc<dyn Deliver>) -> Arc<dyn Deliver>,
    ) -> std::io::Result<Uapic> {
        let cpus = Arc::new(LocalCpus {
            cpus: (0..vcpus)
                .map(|i| Cpu {
                    st: Mutex::new(CpuState {
                        apic: LocalApic::new(i),
                        nmi: false,
                        waiting_sipi: i != 0,
                        sipi: None,
                        sleeping: false,
                        ending: false,
                    }),
                    cv: Condvar::new(),
                    tid: AtomicI32::new(0),
                    kicked: AtomicBool::new(false),
                })
                .collect(),
        });
        Ok(Uapic {
            epoch: Instant::now(),
            sink: route(cpus.clone()),
            addressing: Mutex::new((0..vcpus).map(|i| LocalApic::new(i).addressing()).collect()),
            cpus,
            ioapic: Mutex::new(IoApic::new()),
            sources: Mutex::new(Vec::new()),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            msi: OnceLock::new(),
            ending: AtomicBool::new(false),
        })
    }

    /// Nanoseconds since the controllers were made (the APIC timers' clock).
    fn now(&self) -> u64 {
        crate::nanos(self.epoch.elapsed())
    }

    /// The routes MSI sources are looked up in.
    pub(crate) fn set_msi_routes(&self, r: Arc<GsiRouter>) {
        let _ = self.msi.set(r);
    }

    /// Delivers `irq` to `dest`: the one path of every interrupt source.
    pub(crate) fn send(&self, dest: Destination, irq: Irq) {
        let ids = apic::targets(dest, &irq, &lock(&self.addressing));
        for id in ids {
            self.sink.deliver(id, irq);
        }
    }

    /// A pulse (assert, de-assert) on I/O APIC pin `pin`.
    pub(crate) fn pulse(&self, pin: u8) {
        let mut io = lock(&self.ioapic);
        let out = io.set_pin(usize::from(pin), true);
        io.set_pin(usize::from(pin), false);
        drop(io);
        if let Some((d, irq)) = out {
            self.send(d, irq);
        }
    }

    /// A level-triggered vector's EOI, for the I/O APIC (on another node, through the sink).
    pub(crate) fn level_eoi(&self, vector: u8) {
        if self.sink.level_eoi_elsewhere(vector) {
            return;
        }
        let out = lock(&self.ioapic).eoi(vector);
        for (d, irq) in out {
            self.send(d, irq);
        }
    }

    /// The VM ends: every waiting vCPU and the relay return.
    pub(crate) fn end(&self) {
        self.ending.store(true, Ordering::Release);
        for c in &self.cpus.cpus {
            lock(&c.st).ending = true;
            c.cv.notify_all();
        }
        let _ = self.wake.write(1);
    }

    /// Watches `evt` for `src` (at start, or a device hot-plugged).
    pub(crate) fn add_source(&self, evt: EventFd, src: Source) {
        lock(&self.sources).push((evt, src));
        let _ = self.wake.write(1);
    }

    /// The relay thread's loop: every signalled source becomes a message, until the VM ends.
    pub(crate) fn relay(&self) {
        loop {
            if self.ending.load(Ordering::Acquire) {
                return;
            }
            let mut fds: Vec<libc::pollfd> = vec![libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            fds.extend(lock(&self.sources).iter().map(|(e, _)| libc::pollfd {
                fd: e.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }));
            let n = libc::nfds_t::try_from(fds.len()).unwrap_or(0);
            // SAFETY: `fds` is a valid array of `n` pollfds, alive for the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), n, -1) };
            if r < 0 {
                continue; // EINTR
            }
            if fds[0].revents != 0 {
                let _ = self.wake.read();
            }
            for (i, p) in fds.iter().enumerate().skip(1) {
                if p.revents == 0 {
                    continue;
                }
                let src = {
                    let s = lock(&self.sources);
                    let Some((e, src)) = s.get(i - 1) else {
                        continue;
                    };
                    let _ = e.read();
                    *src
                };
                match src {
                    Source::Pin(pin) => self.pulse(pin),
                    Source::Msi(gsi) => {
                        let m = self.msi.get().and_then(|r| r.message(gsi));
                        if let Some((d, irq)) = m.and_then(|m| apic::msi(m.addr, m.data)) {
                            self.send(d, irq);
                        }
                    }
                }
            }
        }
    }

    /// Whether `addr` is in the local APIC's or the I/O APIC's page.
    pub(crate) fn owns(addr: u64) -> Option<bool> {
        if (apic::LAPIC_BASE..apic::LAPIC_BASE + apic::APIC_PAGE).contains(&addr) {
            Some(true)
        } else if (apic::IOAPIC_BASE..apic::IOAPIC_BASE + apic::APIC_PAGE).contains(&addr) {
            Some(false)
        } else {
            None
        }
    }

    /// An MMIO access of vCPU `index` to the local APIC page (`lapic`) or the I/O APIC's, at
    /// `addr`. Only aligned 32-bit accesses reach a register; others read 0 and write nothing.
    pub(crate) fn mmio(&self, index: u32, lapic: bool, addr: u64, data: &mut [u8], write: bool) {
        let base = if lapic {
            apic::LAPIC_BASE
        } else {
            apic::IOAPIC_BASE
        };
        let offset = addr - base;
        let value = match <[u8; 4]>::try_from(&*data) {
            Ok(b) if offset & 3 == 0 => u32::from_le_bytes(b),
            _ => {
                if !write {
                    data.fill(0);
                }
                return;
            }
        };
        if !lapic {
            if write {
                let out = lock(&self.ioapic).write(offset, value);
                if let Some((d, irq)) = out {
                    self.send(d, irq);
                }
            } else {
                data.copy_from_slice(&lock(&self.ioapic).read(offset).to_le_bytes());
            }
            return;
        }
        let Some(cpu) = self.cpus.cpus.get(index as usize) else {
            return;
        };
        let now = self.now();
        let mut st = lock(&cpu.st);
        if !write {
            data.copy_from_slice(&st.apic.read(offset, now).to_le_bytes());
            return;
        }
        let effect = st.apic.write(offset, value, now);
        let addressing = st.apic.addressing();
        drop(st);
        match effect {
            ApicEffect::Ipi(d, irq) => self.send(d, irq),
            ApicEffect::LevelEoi(v) => self.level_eoi(v),
            ApicEffect::Addressing => {
                self.set_addressing(addressing);
                self.sink.addressing_changed(addressing);
            }
            ApicEffect::Timer | ApicEffect::None => {}
        }
    }

    /// Local APIC `a.id`'s addressing (LDR, DFR), as its vCPU set it (here or on another node).
    pub(crate) fn set_addressing(&self, a: Addressing) {
        if let Some(x) = lock(&self.addressing).get_mut(a.id as usize) {
            *x = a;
        }
    }

    /// Delivers `irq` to the vCPU of APIC ID `apic_id` in this process (a message from
    /// another node, whose router chose this one).
    pub(crate) fn deliver_local(&self, apic_id: u32, irq: Irq) {
        self.cpus.deliver(apic_id, irq);
    }

    /// Kicks every vCPU thread of this process out of KVM_RUN (the VM ends).
    pub(crate) fn kick_all(&self) {
        for c in &self.cpus.cpus {
            c.kick();
        }
    }

    /// Vcpu `index`'s thread starts: it is the one to kick, its timer signals it.
    pub(crate) fn attach(&self, index: u32, fd: &VcpuFd) -> Result<VcpuApic, String> {
        let cpu = self
            .cpus
            .cpus
            .get(index as usize)
            .ok_or_else(|| format!("no local APIC for vCPU {index}"))?;
        cpu.kicked.store(false, Ordering::SeqCst);
        cpu.tid.store(gettid(), Ordering::SeqCst);
        let timer = HostTimer::new().map_err(|e| format!("timer_create: {e}"))?;
        let regs = fd.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
        let sregs = fd.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        Ok(VcpuApic {
            index,
            timer,
            armed: None,
            cr8: 0,
            reset: (regs, sregs),
        })
    }

    /// The vCPU's thread leaves: nobody kicks it any more.
    pub(crate) fn detach(&self, v: &VcpuApic) {
        if let Some(c) = self.cpus.cpus.get(v.index as usize) {
            c.tid.store(0, Ordering::SeqCst);
        }
    }

    /// Before each KVM_RUN: waits for STARTUP if the vCPU waits for one, fires its timer if
    /// due, injects an NMI or the highest pending vector (or asks for an interrupt window),
    /// and arms the host timer for the next deadline. False when the VM ends.
    pub(crate) fn before_run(&self, v: &mut VcpuApic, fd: &mut VcpuFd) -> Result<bool, String> {
        let cpu = &self.cpus.cpus[v.index as usize];
        // Any kick sent so far has been taken (or is about to interrupt the next KVM_RUN):
        // from here on a new interrupt needs a new one. Before the lock, see `Cpu::kick`.
        cpu.kicked.store(false, Ordering::SeqCst);
        let mut st = lock(&cpu.st);
        if st.waiting_sipi {
            let vector = loop {
                if st.ending {
                    return Ok(false);
                }
                if let Some(s) = st.sipi.take() {
                    st.waiting_sipi = false;
                    break s;
                }
                st = cpu.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            };
            start_at(fd, &v.reset, vector)?;
            // A fresh start: the last exit's flags are not this run's.
            let run = fd.get_kvm_run();
            run.ready_for_interrupt_injection = 0;
            run.if_flag = 0;
        }
        if st.ending {
            return Ok(false);
        }
        let now = self.now();
        // Without the in-kernel APIC, KVM keeps CR8 in kvm_run: a guest's `mov cr8` since the
        // last run moves the TPR's class, and the TPR (however written) goes back into CR8.
        let cr8 = fd.get_kvm_run().cr8;
        if cr8 != v.cr8 {
            let low = st.apic.read(wv_devices::apic::reg::TPR, now) & 0xf;
            st.apic.write(
                wv_devices::apic::reg::TPR,
                (u32::try_from(cr8 & 0xf).unwrap_or(0) << 4) | low,
                now,
            );
        }
        v.cr8 = u64::from(st.apic.read(wv_devices::apic::reg::TPR, now) >> 4);
        fd.get_kvm_run().cr8 = v.cr8;
        st.apic.timer_fire(now);
        if std::mem::take(&mut st.nmi) {
            fd.nmi().map_err(|e| format!("KVM_NMI: {e}"))?;
        }
        let (ready, if_flag) = {
            let run = fd.get_kvm_run();
            (run.ready_for_interrupt_injection != 0, run.if_flag != 0)
        };
        let mut window = false;
        if let Some(vector) = st.apic.pending() {
            if ready && if_flag {
                st.apic.ack(vector);
                if inject(fd, vector).is_err() {
                    // KVM still holds one (EEXIST): this one waits for the next window.
                    st.apic.unack(vector);
                    window = true;
                } else {
                    window = st.apic.pending().is_some();
                }
            } else {
                window = true;
            }
        }
        fd.get_kvm_run().request_interrupt_window = u8::from(window);
        let deadline = st.apic.timer_deadline();
        drop(st);
        if deadline != v.armed {
            v.timer
                .set(deadline.map(|d| Duration::from_nanos(d.saturating_sub(now).max(1))))
                .map_err(|e| format!("timer_settime: {e}"))?;
            v.armed = deadline;
        }
        Ok(true)
    }

    /// After a HLT exit (`if_flag`: the guest's IF then): sleeps until the vCPU has something
    /// to take (a vector it can take with IF set, an NMI, INIT), its timer is due, or the VM
    /// ends.
    pub(crate) fn halt(&self, v: &VcpuApic, if_flag: bool) {
        let cpu = &self.cpus.cpus[v.index as usize];
        let mut st = lock(&cpu.st);
        st.sleeping = true;
        loop {
            if st.ending || st.nmi || st.waiting_sipi {
                break;
            }
            let now = self.now();
            st.apic.timer_fire(now);
            if if_flag && st.apic.pending().is_some() {
                break;
            }
            st = match st.apic.timer_deadline() {
                Some(d) => {
                    let wait = Duration::from_nanos(d.saturating_sub(now));
                    cpu.cv
                        .wait_timeout(st, wait)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => cpu.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
            };
        }
        st.sleeping = false;
    }
}

/// What a vCPU thread keeps for its local APIC.
pub(crate) struct VcpuApic {
    index: u32,
    timer: HostTimer,
    /// The deadline the host timer is armed for.
    armed: Option<u64>,
    /// CR8 as last given to KVM: a different value after an exit is the guest's own write
    /// (`mov cr8`), which sets the TPR's priority class.
    cr8: u64,
    /// The registers after reset, which INIT brings back.
    reset: (kvm_regs, kvm_sregs),
}

/// Starts an AP after STARTUP `vector`: its reset state, in real mode at `vector << 12`.
fn start_at(fd: &VcpuFd, reset: &(kvm_regs, kvm_sregs), vector: u8) -> Result<(), String> {
    let (mut regs, mut sregs) = *reset;
    sregs.cs.selector = u16::from(vector) << 8;
    sregs.cs.base = u64::from(vector) << 12;
    sregs.cs.limit = 0xffff;
    regs.rip = 0;
    regs.rflags = 2;
    fd.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    fd.set_regs(&regs).map_err(|e| format!("KVM_SET_REGS: {e}"))
}

fn inject(fd: &VcpuFd, vector: u8) -> std::io::Result<()> {
    let irq = kvm_bindings::kvm_interrupt {
        irq: u32::from(vector),
    };
    // SAFETY: KVM_INTERRUPT reads one kvm_interrupt, which lives for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_INTERRUPT, &irq) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A POSIX timer that sends the kick signal to the thread that made it.
struct HostTimer(libc::timer_t);

impl HostTimer {
    fn new() -> std::io::Result<HostTimer> {
        // SAFETY: a zeroed sigevent is valid; the fields set are those SIGEV_THREAD_ID reads.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = crate::vcpu::kick_signal();
        sev.sigev_notify_thread_id = gettid();
        let mut t: libc::timer_t = std::ptr::null_mut();
        // SAFETY: both pointers are valid for the call; the kernel writes the timer's id to `t`.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(HostTimer(t))
    }

    /// Fires once `after` from now; None disarms.
    fn set(&self, after: Option<Duration>) -> std::io::Result<()> {
        let d = after.unwrap_or_default();
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: libc::c_long::from(d.subsec_nanos()),
            },
        };
        // SAFETY: the timer is ours and alive; `spec` lives for the call.
        if unsafe { libc::timer_settime(self.0, 0, &spec, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for HostTimer {
    fn drop(&mut self) {
        // SAFETY: the timer is ours and deleted once.
        unsafe { libc::timer_delete(self.0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wv_devices::apic::reg;

    impl Uapic {
        /// Waits until vCPU `index` has a vector to take (woken by deliveries, no polling).
        fn wait_pending(&self, index: usize) -> u8 {
            let cpu = &self.cpus.cpus[index];
            let mut st = lock(&cpu.st);
            loop {
                if let Some(v) = st.apic.pending() {
                    return v;
                }
                st = cpu.cv.wait(st).unwrap();
            }
        }

        fn write(&self, index: u32, lapic: bool, offset: u64, value: u32) {
            let base = if lapic {
                apic::LAPIC_BASE
            } else {
                apic::IOAPIC_BASE
            };
            self.mmio(index, lapic, base + offset, &mut value.to_le_bytes(), true);
        }

        fn read(&self, index: u32, lapic: bool, offset: u64) -> u32 {
            let base = if lapic {
                apic::LAPIC_BASE
            } else {
                apic::IOAPIC_BASE
            };
            let mut b = [0u8; 4];
            self.mmio(index, lapic, base + offset, &mut b, false);
            u32::from_le_bytes(b)
        }

        /// Programs I/O APIC pin `pin`'s redirection entry.
        fn route(&self, pin: u32, low: u32, dest: u32) {
            self.write(0, false, 0, 0x10 + 2 * pin);
            self.write(0, false, 0x10, low);
            self.write(0, false, 0, 0x11 + 2 * pin);
            self.write(0, false, 0x10, dest << 24);
        }
    }

    #[test]
    fn a_pin_pulse_through_the_relay_reaches_the_routed_vcpu() {
        let u = Arc::new(Uapic::new(2).unwrap());
        u.write(1, true, reg::SVR, 0x1ff);
        u.route(4, 0x34, 1);
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        u.add_source(evt.try_clone().unwrap(), Source::Pin(4));
        let relay = {
            let u = u.clone();
            std::thread::spawn(move || u.relay())
        };
        evt.write(1).unwrap();
        assert_eq!(u.wait_pending(1), 0x34);
        assert_eq!(lock(&u.cpus.cpus[0].st).apic.pending(), None);
        u.end();
        relay.join().unwrap();
    }

    #[test]
    fn ipis_init_and_startup_from_the_icr() {
        let u = Uapic::new(3).unwrap();
        for i in 0..3 {
            u.write(i, true, reg::SVR, 0x1ff);
            assert_eq!(u.read(i, true, reg::ID), i << 24);
        }
        // A fixed IPI from vCPU 0 to APIC ID 2.
        u.write(0, true, reg::ICR_HIGH, 2 << 24);
        u.write(0, true, reg::ICR_LOW, 0x4061);
        assert_eq!(u.wait_pending(2), 0x61);
        assert_eq!(lock(&u.cpus.cpus[1].st).apic.pending(), None);
        // All but self.
        u.write(1, true, reg::ICR_LOW, 0x000c_4062);
        assert_eq!(lock(&u.cpus.cpus[0].st).apic.pending(), Some(0x62));
        assert_eq!(lock(&u.cpus.cpus[1].st).apic.pending(), None);
        // A STARTUP to an AP that did not get INIT is ignored; after INIT it is kept.
        u.write(0, true, reg::ICR_HIGH, 1 << 24);
        assert!(lock(&u.cpus.cpus[1].st).waiting_sipi, "APs start waiting");
        u.write(0, true, reg::ICR_LOW, 0x4500);
        u.write(0, true, reg::ICR_LOW, 0x4608);
        u.write(0, true, reg::ICR_LOW, 0x4609);
        let st = lock(&u.cpus.cpus[1].st);
        assert_eq!(st.sipi, Some(8), "the first STARTUP counts");
        assert!(!st.apic.enabled(), "INIT reset the APIC");
        drop(st);
        // Logical: vCPU 2 takes logical ID 4 (flat model).
        u.write(2, true, reg::LDR, 4 << 24);
        u.write(0, true, reg::ICR_HIGH, 4 << 24);
        u.write(0, true, reg::ICR_LOW, 0x4871);
        assert_eq!(lock(&u.cpus.cpus[2].st).apic.pending(), Some(0x71));
    }

    /// A cluster layer's router: APIC ID 0 is local, the others' messages are sent away
    /// (recorded here) as the plain data they are.
    struct Router {
        local: Arc<dyn Deliver>,
        sent: Mutex<Vec<(u32, String)>>,
    }

    impl Deliver for Router {
        fn deliver(&self, apic_id: u32, irq: Irq) {
            if apic_id == 0 {
                self.local.deliver(apic_id, irq);
            } else {
                let wire = serde_json::to_string(&irq).unwrap();
                lock(&self.sent).push((apic_id, wire));
            }
        }
    }

    #[test]
    fn every_delivery_goes_through_the_deliver_given() {
        let router = Mutex::new(None);
        let u = Uapic::with_deliver(4, |local| {
            let r = Arc::new(Router {
                local,
                sent: Mutex::new(Vec::new()),
            });
            *lock(&router) = Some(r.clone());
            r
        })
        .unwrap();
        let router = lock(&router).take().unwrap();
        u.write(0, true, reg::SVR, 0x1ff);
        // A broadcast IPI: one message per APIC ID, the sender's included.
        u.write(0, true, reg::ICR_LOW, 0x0008_4055);
        assert_eq!(u.wait_pending(0), 0x55);
        let sent = lock(&router.sent).clone();
        assert_eq!(
            sent.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        let irq: Irq = serde_json::from_str(&sent[0].1).unwrap();
        assert_eq!(irq, Irq::fixed(0x55));
        // An I/O APIC pin routed to APIC ID 3 goes the same way.
        u.route(4, 0x24, 3);
        u.pulse(4);
        assert_eq!(lock(&router.sent).last().unwrap().0, 3);
        assert_eq!(u.read(3, true, reg::IRR + 0x10), 0, "not requested here");
    }

    #[test]
    fn a_level_pin_waits_for_the_eoi() {
        let u = Uapic::new(1).unwrap();
        u.write(0, true, reg::SVR, 0x1ff);
        u.route(9, 0x8039, 0);
        u.pulse(9);
        let v = u.wait_pending(0);
        assert_eq!(v, 0x39);
        lock(&u.cpus.cpus[0].st).apic.ack(v);
        let remote_irr = |u: &Uapic| lock(&u.ioapic).entry(9).unwrap() & (1 << 14) != 0;
        assert!(remote_irr(&u));
        // Another pulse while the first is in service is held by remote IRR.
        u.pulse(9);
        let irr = u.read(0, true, reg::IRR + 0x10);
        assert_eq!(irr & (1 << (0x39 - 0x20)), 0, "not requested again");
        u.write(0, true, reg::EOI, 0);
        assert!(!remote_irr(&u), "the EOI reached the I/O APIC");
    }
}
