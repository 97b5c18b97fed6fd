//! vCPU threads (1 and up; vCPU 0 runs on the main thread, `main_thread.rs`, whose list starts
//! from this one): KVM_RUN and the exits' work (port and MMIO devices, the paravirtual calls,
//! completing instructions the host cannot emulate, activating virtio devices), pauses, and
//! the snapshot jobs a paused vCPU runs on its own thread (`pause.rs`).

use super::ioctls::*;
use super::List;

/// The vCPU threads' list.
pub(super) fn list() -> List {
    super::common::list()
        // Entering the guest.
        .ioctl(KVM_RUN)
        // Activating or resetting a vhost-user net (a guest's status write): its messages.
        .with(super::vhost_user_net::messages())
        // emulate.rs: completing an instruction KVM's emulator lacks (PVM hosts).
        .ioctl(KVM_GET_REGS)
        .ioctl(KVM_SET_REGS)
        .ioctl(KVM_GET_SREGS)
        .ioctl(KVM_GET_VCPU_EVENTS)
        .ioctl(KVM_SET_VCPU_EVENTS)
        .ioctl(KVM_GET_FPU)
        .ioctl(KVM_SET_FPU)
        .ioctl(KVM_TRANSLATE)
        // pause.rs: parking (the guest is told it was paused) and the TSC rewound on resume
        // (the vCPU's TSC offset attribute, or the TSC MSR where there is none).
        .ioctl(KVM_KVMCLOCK_CTRL)
        .ioctl(KVM_HAS_DEVICE_ATTR)
        .ioctl(KVM_GET_DEVICE_ATTR)
        .ioctl(KVM_SET_DEVICE_ATTR)
        .ioctl(KVM_GET_MSRS)
        .ioctl(KVM_SET_MSRS)
        // A snapshot's or a migration's job on a parked vCPU: its state
        // (wv_hypervisor::state::save_vcpu; CHECK_EXTENSION sizes the XSAVE area).
        .ioctl(KVM_CHECK_EXTENSION)
        .ioctl(KVM_GET_MSR_INDEX_LIST)
        .ioctl(KVM_GET_MP_STATE)
        .ioctl(KVM_GET_LAPIC)
        .ioctl(KVM_GET_DEBUGREGS)
        .ioctl(KVM_GET_XSAVE)
        .ioctl(KVM_GET_XSAVE2)
        .ioctl(KVM_GET_XCRS)
        .ioctl(KVM_GET_TSC_KHZ)
        // A virtio device the guest activates or moves (transport.rs, pci.rs): its queue
        // notifiers and interrupts (eventfds registered with KVM), MSI-X routes, INTx.
        .allow(libc::SYS_eventfd2)
        .fcntl(libc::F_DUPFD_CLOEXEC)
        .ioctl(KVM_IOEVENTFD)
        .ioctl(KVM_IRQFD)
        .ioctl(KVM_SET_GSI_ROUTING)
        .ioctl(KVM_IRQ_LINE)
        .ioctl(KVM_SIGNAL_MSI)
        // virtio-net's activation: the TAP's offloads as the guest negotiated them.
        .ioctl(TUNSETOFFLOAD)
        // Reading an eventfd (a device's interrupt acknowledged, a reset's worker stopped).
        .allow(libc::SYS_read)
        // The console's output to a socket client (console.rs, non-blocking writes).
        .allow(libc::SYS_sendto)
        // Starting a device worker: std asks how many CPUs the process may use.
        .allow(libc::SYS_sched_getaffinity)
        // The userspace interrupt controllers (uapic.rs, `--irqchip user`): injection, an AP
        // started by STARTUP, and the APIC timer (a POSIX timer that kicks this thread).
        .ioctl(KVM_INTERRUPT)
        .ioctl(KVM_NMI)
        .ioctl(KVM_SET_SREGS)
        .allow(libc::SYS_timer_create)
        .allow(libc::SYS_timer_settime)
        .allow(libc::SYS_timer_delete)
}
