//! Opening KVM and checking that it can run a Worldvisor VM.

use kvm_ioctls::{Cap, Kvm};
use std::fmt;
use std::os::fd::FromRawFd;

/// The KVM device, unless `WV_KVM_DEVICE` names another path.
pub const DEFAULT_DEVICE: &str = "/dev/kvm";

/// Why KVM cannot be used. Each message is one line saying what to do.
#[derive(Debug)]
pub enum HvError {
    /// The device does not exist.
    NoDevice(String),
    /// The device exists but may not be opened.
    Permission(String),
    /// Opening failed otherwise.
    Open(String, std::io::Error),
    /// The device is not a KVM of the API version we speak.
    ApiVersion(String, i32),
    /// A capability the VMM needs is missing.
    MissingCap(&'static str, &'static str),
    /// An ioctl failed.
    Ioctl(&'static str, kvm_ioctls::Error),
    /// Saved VM or vCPU state cannot be used (malformed, or from a host this one cannot match).
    State(String),
}

impl fmt::Display for HvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HvError::NoDevice(p) => write!(
                f,
                "no KVM device at {p}: this host does not offer KVM (load the kvm module and enable \
                 virtualization, or set WV_KVM_DEVICE)"
            ),
            HvError::Permission(p) => write!(
                f,
                "permission denied opening {p}: run as root or as a member of the group that owns it \
                 (usually 'kvm')"
            ),
            HvError::Open(p, e) => write!(f, "cannot open {p}: {e}"),
            HvError::ApiVersion(p, v) => {
                write!(f, "{p} is not a usable KVM device (API version {v}, expected 12)")
            }
            HvError::MissingCap(cap, why) => {
                write!(f, "the host's KVM lacks {cap}, which Worldvisor needs for {why}")
            }
            HvError::Ioctl(what, e) => write!(f, "KVM {what} failed: {e}"),
            HvError::State(why) => write!(f, "cannot restore the saved KVM state: {why}"),
        }
    }
}

/// Capabilities every VM needs, with what for.
pub const REQUIRED_CAPS: &[(Cap, &str, &str)] = &[
    (
        Cap::Irqchip,
        "KVM_CAP_IRQCHIP",
        "the in-kernel interrupt controllers",
    ),
    (Cap::Pit2, "KVM_CAP_PIT2", "the in-kernel timer"),
    (Cap::Irqfd, "KVM_CAP_IRQFD", "device interrupts"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD", "device notifications"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY", "guest memory"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR", "x86 guests"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID", "CPUID set-up"),
    (
        Cap::ImmediateExit,
        "KVM_CAP_IMMEDIATE_EXIT",
        "stopping vCPUs reliably",
    ),
    (Cap::MpState, "KVM_CAP_MP_STATE", "SMP start-up"),
];

/// Opens the KVM device (`WV_KVM_DEVICE` or `/dev/kvm`) and checks the API version and the
/// capabilities in [`REQUIRED_CAPS`].
pub fn open() -> Result<Kvm, HvError> {
    let path = std::env::var("WV_KVM_DEVICE").unwrap_or_else(|_| DEFAULT_DEVICE.to_string());
    let cpath = std::ffi::CString::new(path.clone())
        .map_err(|_| HvError::Open(path.clone(), std::io::ErrorKind::InvalidInput.into()))?;
    // A jailed VMM was handed the device open (crates/fds).
    let handed = wv_fds::take(&path).map(std::os::fd::IntoRawFd::into_raw_fd);
    let fd = handed
        .map_or_else(|| Kvm::open_with_cloexec_at(cpath, true), Ok)
        .map_err(|e| {
            let io = std::io::Error::from_raw_os_error(e.errno());
            match io.kind() {
                std::io::ErrorKind::NotFound => HvError::NoDevice(path.clone()),
                std::io::ErrorKind::PermissionDenied => HvError::Permission(path.clone()),
                _ => HvError::Open(path.clone(), io),
            }
        })?;
    // SAFETY: `fd` was just opened by us and is owned by nothing else.
    let kvm = unsafe { Kvm::from_raw_fd(fd) };
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(HvError::ApiVersion(path, v));
    }
    for (cap, name, why) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(HvError::MissingCap(name, why));
        }
    }
    Ok(kvm)
}
