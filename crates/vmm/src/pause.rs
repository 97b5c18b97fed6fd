//! The vCPUs' pause gate: true pause at a KVM_RUN boundary.
//!
//! The control loop closes the gate and kicks every vCPU thread; each leaves KVM_RUN (the kick
//! sets `immediate_exit`), tells KVM the guest is paused (KVM_KVMCLOCK_CTRL), and parks here.
//! While parked, a vCPU runs jobs the control loop hands it (reading its registers for a
//! snapshot must happen on the vCPU's own thread, which owns the vCPU fd). Opening the gate lets
//! them all go on. Guest time does not advance across a pause: the control loop saves the
//! kvmclock (KVM_GET_CLOCK) when every vCPU is parked and sets it back on resume, and every vCPU
//! takes the pause's length off its TSC offset ([`rewind_tsc`]), so TSC-based time resumes where
//! it stopped. On a host whose guests read the host's TSC directly (PVM) the TSC cannot be
//! moved: [`Gate::tsc_rewound`] says so, and the kvmclock still does not jump.

use crate::stats::VcpuStats;
use kvm_ioctls::VcpuFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

/// Work for a parked vCPU, run on its thread with its fd and accounting so far.
pub(crate) type Job = Box<dyn FnOnce(&mut VcpuFd, &VcpuStats) + Send>;

/// IA32_TSC.
const MSR_IA32_TSC: u32 = 0x10;

/// See the module documentation.
pub(crate) struct Gate {
    /// Closed: vCPUs must park at their next KVM_RUN boundary (checked on every exit).
    closed: AtomicBool,
    inner: Mutex<Inner>,
    cv: Condvar,
}

#[derive(Default)]
struct Inner {
    /// vCPUs parked in this pause (generation).
    parked: u32,
    /// Counts resumes: a vCPU leaves its parking when this changes (and a vCPU slow to notice
    /// that a short pause ended does not count as parked in the next one).
    generation: u64,
    /// The guest TSC vCPU 0 read when it parked (what every vCPU writes back on resume when
    /// KVM has no TSC offset attribute).
    tsc: Option<u64>,
    /// Host TSC cycles the last pause lasted: what each vCPU takes off its TSC on resume.
    tsc_delta: u64,
    /// Whether every vCPU's TSC was moved back after the last pause (None: no pause yet).
    tsc_rewound: Option<bool>,
    /// vCPUs that have left their parking since the gate last opened.
    left: u32,
    /// One pending job per vCPU, and how many of the handed-out jobs have not finished.
    jobs: Vec<Option<Job>>,
    running_jobs: u32,
    /// The VM is ending: nobody waits any more.
    ending: bool,
}

impl Gate {
    pub(crate) fn new(vcpus: u32) -> Gate {
        Gate {
            closed: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                jobs: (0..vcpus).map(|_| None).collect(),
                ..Inner::default()
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a vCPU must park (one relaxed-cost load on the exit path).
    #[inline(always)]
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closes the gate; the caller kicks every vCPU, then waits with [`Gate::wait_parked`].
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// Waits until `n` vCPUs are parked; false if the VM ends first.
    pub(crate) fn wait_parked(&self, n: u32) -> bool {
        let mut g = self.lock();
        while g.parked < n && !g.ending {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        !g.ending
    }

    /// Whether the guest's TSC was moved back by the length of the last pause on every vCPU
    /// (None before the first resume).
    pub(crate) fn tsc_rewound(&self) -> Option<bool> {
        self.lock().tsc_rewound
    }

    /// Opens the gate: parked vCPUs go back to the guest, each taking `tsc_delta` host cycles
    /// (the pause's length) off its TSC.
    pub(crate) fn open(&self, tsc_delta: u64) {
        let mut g = self.lock();
        g.tsc_delta = tsc_delta;
        g.tsc_rewound = None;
        g.left = 0;
        self.closed.store(false, Ordering::Release);
        g.generation += 1;
        g.parked = 0;
        self.cv.notify_all();
    }

    /// The VM ends: wakes everyone who waits here, for good.
    pub(crate) fn end(&self) {
        let mut g = self.lock();
        g.ending = true;
        self.cv.notify_all();
    }

    /// Runs `make(i)` on every parked vCPU `i` and waits until all have finished; false if the
    /// VM ends first. The gate must be closed and every vCPU parked.
    #[allow(dead_code)] // the snapshot reads vCPU state with it
    pub(crate) fn run_on_each(&self, make: &mut dyn FnMut(u32) -> Job) -> bool {
        let mut g = self.lock();
        let n = u32::try_from(g.jobs.len()).unwrap_or(u32::MAX);
        for i in 0..n {
            g.jobs[i as usize] = Some(make(i));
        }
        g.running_jobs = n;
        self.cv.notify_all();
        while g.running_jobs > 0 && !g.ending {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        !g.ending
    }

    /// Parks vCPU `index` until the gate opens or the VM ends, running the jobs it is handed.
    /// Called by the vCPU loop when [`Gate::is_closed`].
    pub(crate) fn park(&self, index: u32, fd: &mut VcpuFd, st: &VcpuStats) {
        // A guest using kvmclock would otherwise see the pause as a soft lockup. EINVAL means the
        // guest does not use kvmclock (the probe guest does not).
        let _ = fd.kvmclock_ctrl();
        let tsc = read_tsc(fd);
        let mut g = self.lock();
        if index == 0 {
            g.tsc = tsc;
        }
        let generation = g.generation;
        g.parked += 1;
        self.cv.notify_all();
        loop {
            if g.ending {
                return;
            }
            if let Some(job) = g.jobs.get_mut(index as usize).and_then(Option::take) {
                drop(g);
                job(fd, st);
                g = self.lock();
                g.running_jobs = g.running_jobs.saturating_sub(1);
                self.cv.notify_all();
                continue;
            }
            if g.generation != generation {
                break;
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        let (fallback, delta) = (g.tsc, g.tsc_delta);
        drop(g);
        let moved = delta > 0 && rewind_tsc(fd, delta, fallback);
        let mut g = self.lock();
        if delta > 0 {
            g.tsc_rewound = Some(g.tsc_rewound.unwrap_or(true) && moved);
        }
        g.left += 1;
        self.cv.notify_all();
    }

    /// Waits until `n` vCPUs have left their parking after [`Gate::open`] (so that what they do
    /// on the way out, such as moving their TSC, is done); false if the VM ends first.
    pub(crate) fn wait_left(&self, n: u32) -> bool {
        let mut g = self.lock();
        while g.left < n && !g.ending && !self.closed.load(Ordering::Acquire) {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        !g.ending
    }
}

fn read_tsc(fd: &VcpuFd) -> Option<u64> {
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }])
    .ok()?;
    match fd.get_msrs(&mut msrs) {
        Ok(1) => Some(msrs.as_slice()[0].data),
        _ => None,
    }
}

fn write_tsc(fd: &VcpuFd, value: u64) -> bool {
    kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
        index: MSR_IA32_TSC,
        data: value,
        ..Default::default()
    }])
    .is_ok_and(|msrs| fd.set_msrs(&msrs).is_ok_and(|n| n == 1))
}

/// KVM_{HAS,GET,SET}_DEVICE_ATTR on a vCPU (kvm-ioctls offers them on arm64 only):
/// `_IOW(KVMIO, 0xe1..0xe3, struct kvm_device_attr)`.
const KVM_SET_DEVICE_ATTR: libc::c_ulong = 0x4018_aee1;
const KVM_GET_DEVICE_ATTR: libc::c_ulong = 0x4018_aee2;
const KVM_HAS_DEVICE_ATTR: libc::c_ulong = 0x4018_aee3;

/// The vCPU's TSC offset attribute (KVM_VCPU_TSC_CTRL / KVM_VCPU_TSC_OFFSET, Linux 5.16+).
fn tsc_offset_attr(fd: &VcpuFd, op: libc::c_ulong, value: &mut u64) -> bool {
    use std::os::fd::AsRawFd;
    let attr = kvm_bindings::kvm_device_attr {
        group: kvm_bindings::KVM_VCPU_TSC_CTRL,
        attr: u64::from(kvm_bindings::KVM_VCPU_TSC_OFFSET),
        addr: value as *mut u64 as u64,
        flags: 0,
    };
    // SAFETY: the three ioctls take a kvm_device_attr; for GET, KVM writes one u64 at `addr`,
    // which points to `value`, alive for the call; HAS and SET only read.
    unsafe { libc::ioctl(fd.as_raw_fd(), op, &attr) == 0 }
}

/// Moves the vCPU's TSC back by `delta` host cycles (the length of a pause), so that TSC-based
/// guest time resumes where it stopped; every vCPU gets the same delta, which keeps them in
/// step. Without the offset attribute (Linux < 5.16), writes `fallback` (vCPU 0's TSC when it
/// parked) to IA32_TSC, which KVM matches to one offset for all vCPUs. Returns whether the
/// guest's TSC moved: on a host whose guests read the host's TSC directly (PVM), it does not.
fn rewind_tsc(fd: &VcpuFd, delta: u64, fallback: Option<u64>) -> bool {
    let before = read_tsc(fd);
    let mut off = 0u64;
    let done = if tsc_offset_attr(fd, KVM_HAS_DEVICE_ATTR, &mut off)
        && tsc_offset_attr(fd, KVM_GET_DEVICE_ATTR, &mut off)
    {
        let mut new = off.wrapping_sub(delta);
        tsc_offset_attr(fd, KVM_SET_DEVICE_ATTR, &mut new)
    } else {
        fallback.is_some_and(|t| write_tsc(fd, t))
    };
    let after = read_tsc(fd);
    match (done, before, after) {
        // It moved back by at least half the pause (reads are a few microseconds apart).
        (true, Some(b), Some(a)) => a < b && b - a >= delta / 2,
        _ => false,
    }
}
