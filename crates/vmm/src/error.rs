//! How a run ends, and the process exit status for each ending.
//!
//! | status | meaning |
//! |---|---|
//! | 0-199 | the guest powered off with this exit code (a code above 199 is reported as 199); 0 also: the VM migrated to another VMM |
//! | 200 | bad arguments or configuration values |
//! | 201 | KVM unavailable or unusable (no device, no permission, missing capability) |
//! | 202 | the kernel, initrd or a disk image is missing, malformed, does not fit or is in use; a snapshot or an incoming migration cannot be used |
//! | 203 | the guest requested a reset (i8042 or KVM system event) |
//! | 204 | the guest triple-faulted |
//! | 205 | KVM could not run the guest (emulation failure, internal error, entry failure) |
//! | 206 | a VMM-side failure (I/O, resources, a thread that died) |
//! | 207 | a network device is unavailable (no TAP, no permission to create or attach it) |
//! | 128+N | stopped by signal N (SIGINT 130, SIGTERM 143) |

use std::fmt;

/// Highest exit code passed through from the guest.
pub const MAX_GUEST_STATUS: u8 = 199;
/// Bad arguments or values.
pub const STATUS_USAGE: u8 = 200;
/// KVM unusable.
pub const STATUS_KVM: u8 = 201;
/// Kernel or initrd problem.
pub const STATUS_IMAGE: u8 = 202;
/// Guest reset.
pub const STATUS_RESET: u8 = 203;
/// Triple fault.
pub const STATUS_TRIPLE_FAULT: u8 = 204;
/// KVM could not run the guest.
pub const STATUS_KVM_FAILURE: u8 = 205;
/// VMM-side failure.
pub const STATUS_INTERNAL: u8 = 206;
/// Network device unavailable.
pub const STATUS_NET: u8 = 207;
/// A VMM thread made a system call outside its seccomp list (`--seccomp=kill`).
pub const STATUS_SECCOMP: u8 = 208;

/// Why a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest powered off with an exit code.
    Poweroff(u8),
    /// The guest asked for a reset (the source named).
    Reset(&'static str),
    /// Triple fault, with a register dump.
    TripleFault(String),
    /// KVM could not run the guest; the diagnostic names the exit and registers.
    KvmFailure(String),
    /// A signal stopped the VM.
    Signal(i32),
    /// Something in the VMM failed while the VM ran.
    Internal(String),
    /// The VM moved to another VMM (live migration to this address); it runs on there.
    Migrated(String),
}

impl VmEnd {
    /// The process exit status for this ending.
    pub fn status(&self) -> u8 {
        match self {
            VmEnd::Poweroff(c) => (*c).min(MAX_GUEST_STATUS),
            VmEnd::Reset(_) => STATUS_RESET,
            VmEnd::TripleFault(_) => STATUS_TRIPLE_FAULT,
            VmEnd::KvmFailure(_) => STATUS_KVM_FAILURE,
            VmEnd::Signal(s) => (128 + *s).clamp(0, 255) as u8,
            VmEnd::Internal(_) => STATUS_INTERNAL,
            VmEnd::Migrated(_) => 0,
        }
    }
}

impl fmt::Display for VmEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmEnd::Poweroff(c) if *c > MAX_GUEST_STATUS => {
                write!(
                    f,
                    "guest powered off with exit code {c} (reported as {MAX_GUEST_STATUS})"
                )
            }
            VmEnd::Poweroff(c) => write!(f, "guest powered off with exit code {c}"),
            VmEnd::Reset(src) => write!(f, "guest requested a reset ({src}); the VM ended"),
            VmEnd::TripleFault(d) => write!(f, "guest triple-faulted: {d}"),
            VmEnd::KvmFailure(d) => write!(f, "KVM could not run the guest: {d}"),
            VmEnd::Signal(s) => write!(f, "stopped by signal {s}"),
            VmEnd::Internal(d) => write!(f, "VMM failure: {d}"),
            VmEnd::Migrated(to) => write!(f, "migrated to {to}"),
        }
    }
}

/// Why a VM could not be started.
#[derive(Debug)]
pub enum VmmError {
    /// Bad configuration.
    Config(crate::config::ConfigError),
    /// KVM problem.
    Kvm(wv_hypervisor::HvError),
    /// Kernel, initrd or boot-data problem.
    Boot(wv_machine::BootError),
    /// Guest memory could not be set up.
    Memory(wv_machine::MemoryError),
    /// A disk image cannot be used (missing, unreadable, locked by another user).
    Disk(String),
    /// A TAP cannot be used.
    Net(String),
    /// A snapshot cannot be restored (not one, newer, truncated, corrupt, unreadable).
    Snapshot(String),
    /// An incoming migration failed (stream cut, malformed, refused); nothing ran.
    Migration(String),
    /// Anything else on the VMM side.
    Internal(String),
}

impl VmmError {
    /// The process exit status for this failure.
    pub fn status(&self) -> u8 {
        match self {
            VmmError::Config(_) => STATUS_USAGE,
            VmmError::Kvm(_) => STATUS_KVM,
            VmmError::Boot(b) if b.is_image_error() => STATUS_IMAGE,
            VmmError::Boot(_) => STATUS_USAGE,
            VmmError::Disk(_) | VmmError::Snapshot(_) | VmmError::Migration(_) => STATUS_IMAGE,
            VmmError::Net(_) => STATUS_NET,
            VmmError::Memory(wv_machine::MemoryError::BadSize(_)) => STATUS_USAGE,
            VmmError::Memory(_) | VmmError::Internal(_) => STATUS_INTERNAL,
        }
    }
}

impl fmt::Display for VmmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmmError::Config(e) => write!(f, "{e}"),
            VmmError::Kvm(e) => write!(f, "{e}"),
            VmmError::Boot(e) => write!(f, "{e}"),
            VmmError::Memory(e) => write!(f, "{e}"),
            VmmError::Disk(e) | VmmError::Net(e) => write!(f, "{e}"),
            VmmError::Snapshot(e) => write!(f, "snapshot: {e}"),
            VmmError::Migration(e) => write!(f, "incoming migration: {e}"),
            VmmError::Internal(e) => write!(f, "{e}"),
        }
    }
}

impl From<wv_hypervisor::HvError> for VmmError {
    fn from(e: wv_hypervisor::HvError) -> VmmError {
        VmmError::Kvm(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_distinct() {
        let ends = [
            VmEnd::Reset("i8042"),
            VmEnd::TripleFault(String::new()),
            VmEnd::KvmFailure(String::new()),
            VmEnd::Internal(String::new()),
        ];
        let mut seen: Vec<u8> = ends.iter().map(|e| e.status()).collect();
        seen.extend([STATUS_USAGE, STATUS_KVM, STATUS_IMAGE]);
        let n = seen.len();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), n);
        assert!(seen.iter().all(|s| *s > MAX_GUEST_STATUS));
        assert_eq!(VmEnd::Poweroff(3).status(), 3);
        assert_eq!(VmEnd::Poweroff(250).status(), MAX_GUEST_STATUS);
        assert_eq!(VmEnd::Signal(15).status(), 143);
    }
}
