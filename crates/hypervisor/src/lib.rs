//! Access to Linux KVM: opening the device with errors a user can act on, the capabilities the
//! VMM depends on, the CPUID a vCPU is given, the per-vCPU register set-up that is not specific
//! to a boot protocol, and the KVM state a snapshot or migration saves and restores. Thin on
//! purpose: the ioctls themselves come from `kvm-ioctls`.

pub mod cpuid;
pub mod kvm;
pub mod state;
pub mod stats;
pub mod vcpu;

pub use cpuid::{HostCpu, VcpuTopology};
pub use kvm::{open, HvError};
