//! The ioctl requests the lists name, by their names in the kernel's headers (linux/kvm.h,
//! linux/if_tun.h, linux/userfaultfd.h, linux/fs.h, asm-generic/ioctls.h): numbers fixed by the
//! kernel's ABI for x86-64.

pub(super) const BLKDISCARD: u64 = 0x1277;
pub(super) const FIONBIO: u64 = 0x5421;
pub(super) const KVM_CHECK_EXTENSION: u64 = 0xae03;
pub(super) const KVM_CLEAR_DIRTY_LOG: u64 = 0xc018aec0;
pub(super) const KVM_GET_CLOCK: u64 = 0x8030ae7c;
pub(super) const KVM_GET_DEBUGREGS: u64 = 0x8080aea1;
pub(super) const KVM_GET_DEVICE_ATTR: u64 = 0x4018aee2;
pub(super) const KVM_GET_DIRTY_LOG: u64 = 0x4010ae42;
pub(super) const KVM_GET_FPU: u64 = 0x81a0ae8c;
pub(super) const KVM_GET_IRQCHIP: u64 = 0xc208ae62;
pub(super) const KVM_GET_LAPIC: u64 = 0x8400ae8e;
pub(super) const KVM_GET_MP_STATE: u64 = 0x8004ae98;
pub(super) const KVM_GET_MSRS: u64 = 0xc008ae88;
pub(super) const KVM_GET_MSR_INDEX_LIST: u64 = 0xc004ae02;
pub(super) const KVM_GET_PIT2: u64 = 0x8070ae9f;
pub(super) const KVM_GET_REGS: u64 = 0x8090ae81;
pub(super) const KVM_GET_SREGS: u64 = 0x8138ae83;
pub(super) const KVM_GET_STATS_FD: u64 = 0xaece;
pub(super) const KVM_GET_TSC_KHZ: u64 = 0xaea3;
pub(super) const KVM_GET_VCPU_EVENTS: u64 = 0x8040ae9f;
pub(super) const KVM_GET_XCRS: u64 = 0x8188aea6;
pub(super) const KVM_GET_XSAVE: u64 = 0x9000aea4;
pub(super) const KVM_GET_XSAVE2: u64 = 0x9000aecf;
pub(super) const KVM_HAS_DEVICE_ATTR: u64 = 0x4018aee3;
pub(super) const KVM_IOEVENTFD: u64 = 0x4040ae79;
pub(super) const KVM_IRQFD: u64 = 0x4020ae76;
pub(super) const KVM_IRQ_LINE: u64 = 0x4008ae61;
pub(super) const KVM_KVMCLOCK_CTRL: u64 = 0xaead;
pub(super) const KVM_RUN: u64 = 0xae80;
pub(super) const KVM_SET_CLOCK: u64 = 0x4030ae7b;
pub(super) const KVM_SET_DEVICE_ATTR: u64 = 0x4018aee1;
pub(super) const KVM_SET_FPU: u64 = 0x41a0ae8d;
pub(super) const KVM_SET_GSI_ROUTING: u64 = 0x4008ae6a;
pub(super) const KVM_SET_MSRS: u64 = 0x4008ae89;
pub(super) const KVM_SET_REGS: u64 = 0x4090ae82;
pub(super) const KVM_SET_USER_MEMORY_REGION: u64 = 0x4020ae46;
pub(super) const KVM_SET_VCPU_EVENTS: u64 = 0x4040aea0;
pub(super) const KVM_SIGNAL_MSI: u64 = 0x4020aea5;
pub(super) const KVM_TRANSLATE: u64 = 0xc018ae85;
pub(super) const TUNSETOFFLOAD: u64 = 0x400454d0;
pub(super) const UFFDIO_COPY: u64 = 0xc028aa03;
pub(super) const UFFDIO_UNREGISTER: u64 = 0x8010aa01;
pub(super) const UFFDIO_WAKE: u64 = 0x8010aa02;
pub(super) const UFFDIO_ZEROPAGE: u64 = 0xc020aa04;
