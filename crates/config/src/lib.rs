//! The configuration of one VM, owned here and shared by the command line, the host daemon and
//! the VMM (and, to come, the snapshot format): typed, serialisable through serde, and checked
//! by [`VmConfig::validate`], which makes a bad value a clear one-line error before any
//! resource is taken. The command line's `--disk` and `--net` texts parse into the same types.
//!
//! The serialised form, as the daemon writes it for its VMM and `wv run --config` reads it:
//!
//! ```json
//! {"kernel": {"path": "/boot/vmlinuz"}, "initrd": "/boot/initrd.img",
//!  "cmdline": "console=ttyS0", "memory": 536870912, "vcpus": 2, "rng": true,
//!  "disks": [{"path": "/srv/ds.img", "vmkfs": "web", "readonly": false, "id": "root"}],
//!  "nets": [{"tap": "tap0", "mac": "52:54:00:12:34:56"}]}
//! ```
//!
//! Reading also takes the shorter forms people write ([`wire`]): `kernel` as a plain path,
//! `memory` as a size (`"512M"`), a disk or a net as its command-line text
//! (`"path=x.img,readonly=on"`); absent fields take their defaults (the embedded probe guest
//! with its command line, 256 MiB, 1 vCPU, virtio-rng). An unknown field or a `null` is an
//! error. Where the serial console goes ([`VmConfig::serial`], [`VmConfig::console_socket`])
//! belongs to the VMM process that runs the VM, not to the VM: it is never serialised.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub mod jail;
pub mod wire;
pub use jail::{JailConfig, JailNet};

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = 32;
/// Guest RAM when none is given.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// Least guest RAM (the machine model's own floor; wv-vmm checks that the two agree).
pub const MIN_MEMORY: u64 = 4 << 20;
/// Longest disk id (what the guest reads with virtio-blk's GET_ID).
pub const MAX_DISK_ID: usize = 20;
/// Longest network interface name (Linux's IFNAMSIZ without the NUL).
pub const MAX_TAP_NAME: usize = 15;
/// The kernel images built into `wv` (crate wv-probe-images), by name.
pub const EMBEDDED_KERNELS: &[&str] = &["pvh", "bzimage", "exitbench"];
/// The embedded image booted when no kernel is given: the probe guest, PVH entry.
pub const DEFAULT_KERNEL: &str = "pvh";
/// The probe guest's default command line.
pub const PROBE_CMDLINE: &str =
    "console=ttyS0 probe.tests=boot,smp,timer,hypercall,batch,user,pci,rng";
/// The default command line for a kernel from a file.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// The kernel to boot. Serialised as `{"path": PATH}` or `{"embedded": NAME}`; read from
/// either, or from a plain string (a path).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelSource {
    /// A file (bzImage or PVH ELF).
    Path(PathBuf),
    /// An image built into the binary, by name (one of [`EMBEDDED_KERNELS`]); the VMM turns
    /// the name into its bytes.
    Embedded(String),
}

impl Default for KernelSource {
    fn default() -> KernelSource {
        KernelSource::Embedded(DEFAULT_KERNEL.into())
    }
}

impl KernelSource {
    /// The command line this kernel boots with when none is given.
    pub fn default_cmdline(&self) -> &'static str {
        match self {
            KernelSource::Path(_) => KERNEL_CMDLINE,
            KernelSource::Embedded(_) => PROBE_CMDLINE,
        }
    }
}

/// Where the serial console goes (a property of the VMM process, not of the VM: never part of
/// a serialised [`VmConfig`]). Serialised, on its own, as `"stdio"`, `"none"` or
/// `{"file": PATH}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialMode {
    /// Output to stdout, input from stdin.
    #[default]
    Stdio,
    /// Output appended to a file.
    File(PathBuf),
    /// Discarded.
    None,
}

/// What the VMM's system-call filters do (`wv run --seccomp`; a property of the VMM process,
/// not of the VM: never part of a serialised [`VmConfig`], so old snapshots and configuration
/// files read as before and get the default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// No filter at all (debugging only).
    Off,
    /// A call outside a thread's list is reported on stderr and then let through unchanged.
    Log,
    /// A call outside a thread's list is reported on stderr and ends the VMM.
    #[default]
    Kill,
}

impl SeccompMode {
    /// `off`, `log` or `kill`.
    pub fn parse(s: &str) -> Result<SeccompMode, ConfigError> {
        match s {
            "off" => Ok(SeccompMode::Off),
            "log" => Ok(SeccompMode::Log),
            "kill" => Ok(SeccompMode::Kill),
            _ => Err(ConfigError(format!(
                "--seccomp '{}': use off, log or kill",
                s.escape_debug()
            ))),
        }
    }
}

/// Who emulates the VM's interrupt controllers (`wv run --irqchip`; a property of the VMM
/// process, never part of a serialised [`VmConfig`]: a VM with the userspace controllers cannot
/// be snapshotted or migrated, so no snapshot or stream ever needs it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IrqChip {
    /// KVM's in-kernel local APICs, I/O APIC, PIC and PIT.
    #[default]
    Kernel,
    /// The VMM's own local APICs and I/O APIC (crates/vmm/src/uapic.rs), KVM without its
    /// in-kernel irqchip: the mode a VM spread over several processes needs (issue 14).
    User,
}

impl IrqChip {
    /// `kernel` or `user`.
    pub fn parse(s: &str) -> Result<IrqChip, ConfigError> {
        match s {
            "kernel" => Ok(IrqChip::Kernel),
            "user" => Ok(IrqChip::User),
            _ => Err(ConfigError(format!(
                "--irqchip '{}': use kernel or user",
                s.escape_debug()
            ))),
        }
    }
}

/// A virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Raw image file or block device; with `vmkfs`, the VMKFS datastore; with `vhost_user`,
    /// the socket of the backend serving the disk.
    pub path: PathBuf,
    /// The disk's name in the VMKFS datastore at `path`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "wire::no_null"
    )]
    pub vmkfs: Option<String>,
    /// Refuse guest writes (and open the image read-only, sharing it).
    #[serde(default)]
    pub readonly: bool,
    /// What the guest reads with GET_ID (1 to [`MAX_DISK_ID`] printable ASCII characters),
    /// and the accounting name; `disk{index}` unless given. (A vhost-user disk's GET_ID is its
    /// backend's.)
    pub id: String,
    /// The disk is served by a vhost-user backend (such as `wv storage`) listening at `path`
    /// (guest memory is then shared with it: [`VmConfig::memory_is_shared`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vhost_user: bool,
    /// Who serves the disk to the guest: its own VMM (the default), or, under the daemon, the
    /// daemon's storage service (`via=storage`), which then holds the disk.
    #[serde(default, skip_serializing_if = "DiskVia::is_vmm")]
    pub via: DiskVia,
}

/// Who serves a disk ([`DiskConfig::via`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskVia {
    /// The VMM opens the image or VMKFS disk and serves it itself.
    #[default]
    Vmm,
    /// The daemon's storage service (`wv storage`, a world of `wv host`) opens and holds the
    /// disk and serves it over vhost-user-blk; the daemon gives the VMM the socket. Only
    /// under the daemon: `wv run` refuses it.
    Storage,
}

impl DiskVia {
    /// Whether it is the default, [`DiskVia::Vmm`].
    pub fn is_vmm(&self) -> bool {
        *self == DiskVia::Vmm
    }
}

impl DiskConfig {
    /// Parses `path=IMG|vmkfs=DATASTORE:NAME|vhost-user=SOCKET[,readonly=on|off][,id=NAME]
    /// [,via=vmm|storage]`; `index` names a disk without an id.
    pub fn parse(spec: &str, index: usize) -> Result<DiskConfig, ConfigError> {
        let mut path = None;
        let mut vmkfs = None;
        let mut vhost_user = false;
        let mut readonly = false;
        let mut id = format!("disk{index}");
        let mut via = DiskVia::Vmm;
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("path", p)) if !p.is_empty() && path.is_none() => {
                    path = Some(PathBuf::from(p))
                }
                Some(("vhost-user", p)) if !p.is_empty() && path.is_none() => {
                    path = Some(PathBuf::from(p));
                    vhost_user = true;
                }
                Some(("vmkfs", v)) if path.is_none() => match v.rsplit_once(':') {
                    Some((ds, name)) if !ds.is_empty() && !name.is_empty() => {
                        path = Some(PathBuf::from(ds));
                        vmkfs = Some(name.to_string());
                    }
                    _ => {
                        return Err(ConfigError(format!(
                            "--disk '{spec}': vmkfs= takes DATASTORE:NAME"
                        )))
                    }
                },
                Some(("readonly", "on")) => readonly = true,
                Some(("readonly", "off")) => readonly = false,
                Some(("id", v)) if valid_disk_id(v) => id = v.to_string(),
                Some(("via", "vmm")) => via = DiskVia::Vmm,
                Some(("via", "storage")) => via = DiskVia::Storage,
                _ => {
                    return Err(ConfigError(format!(
                        "--disk '{spec}': expected path=IMG, vmkfs=DATASTORE:NAME or vhost-user=SOCKET, then [,readonly=on|off][,id=NAME][,via=vmm|storage] (NAME: 1-{MAX_DISK_ID} printable characters); '{part}' is not understood"
                    )))
                }
            }
        }
        let path = path.ok_or_else(|| {
            ConfigError(format!(
                "--disk '{spec}' has no path=IMG, vmkfs=DATASTORE:NAME or vhost-user=SOCKET"
            ))
        })?;
        Ok(DiskConfig {
            path,
            vmkfs,
            readonly,
            id,
            vhost_user,
            via,
        })
    }
}

/// Where a live migration with `--copy-disks` lands the copied (writable) disks of a VM on
/// the target (docs/MIGRATION.md): a raw image in `dir` under its file name, a VMKFS disk in
/// the datastore `datastore` under its name. Read-only disks are not copied and keep their
/// paths. Returns the configuration the target runs with, or why a disk cannot land (no
/// place given for its kind, a file name that is not one, two disks on one file).
pub fn copied_disk_places(
    cfg: &VmConfig,
    dir: Option<&std::path::Path>,
    datastore: Option<&std::path::Path>,
) -> Result<VmConfig, ConfigError> {
    let mut out = cfg.clone();
    let mut seen: Vec<PathBuf> = Vec::new();
    for d in out.disks.iter_mut().filter(|d| !d.readonly) {
        match &d.vmkfs {
            None => {
                let name = copied_file_name(&d.path).ok_or_else(|| {
                    ConfigError(format!(
                        "disk '{}': {} has no file name to copy it under",
                        d.id,
                        d.path.display()
                    ))
                })?;
                let dir = dir.ok_or_else(|| {
                    ConfigError(format!(
                        "disk '{}' is a raw image copied by the migration: the target needs a \
                         directory for it (--disk-dir)",
                        d.id
                    ))
                })?;
                d.path = dir.join(name);
                if seen.contains(&d.path) {
                    return Err(ConfigError(format!(
                        "two copied disks land on {}: their file names must differ",
                        d.path.display()
                    )));
                }
                seen.push(d.path.clone());
            }
            Some(_) => {
                d.path = datastore
                    .ok_or_else(|| {
                        ConfigError(format!(
                            "disk '{}' is a VMKFS disk copied by the migration: the target \
                             needs a datastore for it (--datastore)",
                            d.id
                        ))
                    })?
                    .to_path_buf();
            }
        }
    }
    Ok(out)
}

/// The last component of `path` when it is a plain file name (not `.` or `..`, no NUL).
pub fn copied_file_name(path: &std::path::Path) -> Option<&str> {
    match path.components().next_back()? {
        std::path::Component::Normal(n) => n.to_str().filter(|n| !n.contains('\0')),
        _ => None,
    }
}

/// Whether `id` can be a disk's id: 1 to [`MAX_DISK_ID`] printable ASCII characters.
fn valid_disk_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_DISK_ID && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether `name` can name a network interface, by Linux's rule (`dev_valid_name`): 1 to
/// [`MAX_TAP_NAME`] bytes, not `.` or `..`, no `/`, `:`, white space or NUL.
pub fn valid_tap_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TAP_NAME
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

/// A virtio-net device: served in the VMM on a TAP (`tap`), by a vhost-user backend such as
/// `wv vswitch` (`vhost_user`), or, under the daemon, on one of its networks (`network`: the
/// daemon's switch serves it, and the daemon gives the VMM the port's `vhost_user` socket).
/// Exactly one of `tap`, `vhost_user` and `network` is given, except that a VMM started by the
/// daemon gets `network` with the `vhost_user` it resolved to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// TAP interface name (created when missing and permitted); empty for a vhost-user device.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tap: String,
    /// The vhost-user socket of a backend serving the device's queues (guest memory is then
    /// shared with it: [`VmConfig::memory_shared`]).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "wire::no_null"
    )]
    pub vhost_user: Option<PathBuf>,
    /// The daemon's network this device is on (`wv net create`); the daemon's switch serves it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "wire::no_null"
    )]
    pub network: Option<String>,
    /// The device's name in messages and counters; the TAP's or the socket's file name unless
    /// given.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "wire::no_null"
    )]
    pub id: Option<String>,
    /// MAC address (`"52:54:00:12:34:56"` when serialised); generated (locally administered)
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "wire::mac")]
    pub mac: Option<[u8; 6]>,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut m {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

/// `m` as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

impl NetConfig {
    /// Parses `tap=NAME[,mac=MAC][,id=NAME]`, `vhost-user=SOCKET[,mac=MAC][,id=NAME]` or
    /// `network=NAME[,mac=MAC][,id=NAME]`.
    pub fn parse(spec: &str) -> Result<NetConfig, ConfigError> {
        let mut tap = None;
        let mut vhost_user = None;
        let mut network = None;
        let mut mac = None;
        let mut id = None;
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("tap", t)) if !t.is_empty() && t.len() <= MAX_TAP_NAME && vhost_user.is_none() && network.is_none() => tap = Some(t.to_string()),
                Some(("vhost-user", p)) if !p.is_empty() && tap.is_none() && network.is_none() => vhost_user = Some(PathBuf::from(p)),
                Some(("network", n)) if valid_network_name(n) && tap.is_none() && vhost_user.is_none() => network = Some(n.to_string()),
                Some(("id", v)) if valid_net_id(v) => id = Some(v.to_string()),
                Some(("mac", m)) => match parse_mac(m) {
                    Some(m) if m[0] & 1 == 0 => mac = Some(m),
                    _ => return Err(ConfigError(format!("--net '{spec}': '{m}' is not a unicast MAC address"))),
                },
                _ => {
                    return Err(ConfigError(format!(
                        "--net '{spec}': expected tap=NAME, vhost-user=SOCKET or network=NETWORK, then [,mac=MAC][,id=ID] (NAME: 1-{MAX_TAP_NAME} characters, NETWORK: 1-64 of A-Z a-z 0-9 _ . -, ID: 1-{MAX_DISK_ID} printable characters); '{part}' is not understood"
                    )))
                }
            }
        }
        if tap.is_none() && vhost_user.is_none() && network.is_none() {
            return Err(ConfigError(format!(
                "--net '{spec}' has no tap=NAME, vhost-user=SOCKET or network=NETWORK"
            )));
        }
        Ok(NetConfig {
            tap: tap.unwrap_or_default(),
            vhost_user,
            network,
            mac,
            id,
        })
    }

    /// A device on TAP `tap` with `mac` (generated when `None`).
    pub fn tap(tap: &str, mac: Option<[u8; 6]>) -> NetConfig {
        NetConfig {
            tap: tap.to_string(),
            vhost_user: None,
            network: None,
            mac,
            id: None,
        }
    }

    /// The device's name: its id, else its TAP, else its network, else its socket's file name.
    pub fn name(&self) -> String {
        if let Some(id) = &self.id {
            return id.clone();
        }
        if let Some(n) = &self.network {
            return n.clone();
        }
        match &self.vhost_user {
            Some(p) => p.file_name().map_or_else(
                || p.display().to_string(),
                |f| f.to_string_lossy().into_owned(),
            ),
            None => self.tap.clone(),
        }
    }
}

/// Whether `name` can name a network of the daemon (and its switch): 1-64 of
/// `[A-Za-z0-9_.-]`, not starting with `.`.
pub fn valid_network_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Whether `id` can be a net's id: 1 to [`MAX_DISK_ID`] printable ASCII characters.
fn valid_net_id(id: &str) -> bool {
    valid_disk_id(id)
}

/// One VM: what it is made of, and (not serialised) where its VMM sends the console.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VmConfig {
    /// Kernel.
    pub kernel: KernelSource,
    /// Initial ramdisk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Back guest RAM with a memfd mapped shared, so that a vhost-user backend can map it too
    /// (also on whenever a net is served over vhost-user: [`VmConfig::memory_is_shared`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub memory_shared: bool,
    /// vCPUs.
    pub vcpus: u32,
    /// Serial console (the VMM's, not serialised).
    #[serde(skip)]
    pub serial: SerialMode,
    /// A Unix socket where one client at a time attaches to the serial console (output and
    /// input), besides `serial` (the VMM's, not serialised).
    #[serde(skip)]
    pub console_socket: Option<PathBuf>,
    /// A Unix socket serving the VMM's control API (the VMM's, not serialised).
    #[serde(skip)]
    pub api_socket: Option<PathBuf>,
    /// What the VMM's per-thread system-call filters do (the VMM's, not serialised).
    #[serde(skip)]
    pub seccomp: SeccompMode,
    /// Who emulates the interrupt controllers (the VMM's, not serialised).
    #[serde(skip)]
    pub irqchip: IrqChip,
    /// A virtio-rng device (entropy for the guest).
    pub rng: bool,
    /// A virtio-balloon device: the host can ask the guest for memory back (`PUT
    /// /vm/balloon`, `wv vm set --memory-target`), and the guest reports free pages and its
    /// memory statistics. Off unless asked for (`wv vm create` asks for it by default).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub balloon: bool,
    /// virtio-blk disks, in PCI slot order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices, after the disks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
}

/// A value the user gave that cannot work.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Parses a size such as `256M`, `2G`, `512K`, `1T` or a plain number of bytes (binary units;
/// an optional trailing `B`/`iB` is accepted: `256MiB`).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || {
        ConfigError(format!(
            "invalid size '{s}': use a number with K, M, G or T (e.g. 256M, 2G)"
        ))
    };
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        Some(c) if c.is_ascii_digit() => (t, 0),
        _ => return Err(bad()),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// `bytes` in the largest unit of [`parse_size`] that states it exactly (`512M`, `4100K`).
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, 'T'), (30, 'G'), (20, 'M'), (10, 'K')] {
        if bytes != 0 && bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Host RAM in bytes.
pub fn host_ram() -> u64 {
    // SAFETY: sysinfo fills the struct we pass and nothing else.
    unsafe {
        let mut si: libc::sysinfo = std::mem::zeroed();
        if libc::sysinfo(&mut si) == 0 {
            si.totalram.saturating_mul(u64::from(si.mem_unit))
        } else {
            u64::MAX
        }
    }
}

impl Default for VmConfig {
    /// What `{}` reads as: the embedded probe guest with its command line, and the defaults
    /// of [`VmConfig::new`].
    fn default() -> VmConfig {
        let kernel = KernelSource::default();
        let cmdline = kernel.default_cmdline().to_string();
        VmConfig::new(kernel, cmdline)
    }
}

/// A path that cannot be opened: empty, or with a NUL byte (what the system call would cut).
fn check_path(what: &str, p: &std::path::Path) -> Result<(), ConfigError> {
    let b = p.as_os_str().as_encoded_bytes();
    if b.is_empty() {
        return Err(ConfigError(format!("{what}: empty path")));
    }
    if b.contains(&0) {
        return Err(ConfigError(format!("{what}: the path contains a NUL byte")));
    }
    Ok(())
}

impl VmConfig {
    /// A VM with the defaults: 1 vCPU, [`DEFAULT_MEMORY`], serial on stdio, virtio-rng.
    pub fn new(kernel: KernelSource, cmdline: String) -> VmConfig {
        VmConfig {
            kernel,
            initrd: None,
            cmdline,
            memory: DEFAULT_MEMORY,
            memory_shared: false,
            vcpus: 1,
            serial: SerialMode::Stdio,
            console_socket: None,
            api_socket: None,
            seccomp: SeccompMode::Kill,
            irqchip: IrqChip::Kernel,
            rng: true,
            balloon: false,
            disks: Vec::new(),
            nets: Vec::new(),
        }
    }

    /// Whether guest RAM is shared (memfd, `MAP_SHARED`): asked for, or needed by a vhost-user
    /// net or disk.
    pub fn memory_is_shared(&self) -> bool {
        self.memory_shared
            || self.nets.iter().any(|n| n.vhost_user.is_some())
            || self.disks.iter().any(|d| d.vhost_user)
    }

    /// Checks every value against the machine model and the host (`host_ram` bytes), however
    /// the configuration was made (options, a file, the API): sizes and counts, that paths can
    /// be opened, names and ids.
    pub fn validate(&self, host_ram: u64) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError(format!(
                "--vcpus {} is out of range: 1 to {MAX_VCPUS}",
                self.vcpus
            )));
        }
        if self.memory < MIN_MEMORY {
            return Err(ConfigError(format!(
                "--memory of {} bytes is too small: at least {} MiB",
                self.memory,
                MIN_MEMORY >> 20
            )));
        }
        if !self.memory.is_multiple_of(4096) {
            return Err(ConfigError(format!(
                "--memory of {} bytes is not a multiple of 4 KiB",
                self.memory
            )));
        }
        match &self.kernel {
            KernelSource::Path(p) => check_path("kernel", p)?,
            KernelSource::Embedded(n) if !EMBEDDED_KERNELS.contains(&n.as_str()) => {
                return Err(ConfigError(format!(
                    "kernel: no embedded image is named '{}' (there are {})",
                    n.escape_debug(),
                    EMBEDDED_KERNELS.join(", ")
                )))
            }
            KernelSource::Embedded(_) => {}
        }
        if let Some(i) = &self.initrd {
            check_path("initrd", i)?;
        }
        if self.cmdline.contains('\0') {
            return Err(ConfigError("cmdline: contains a NUL byte".into()));
        }
        for (i, d) in self.disks.iter().enumerate() {
            if !valid_disk_id(&d.id) {
                return Err(ConfigError(format!(
                    "disk id '{}': use 1-{MAX_DISK_ID} printable ASCII characters",
                    d.id.escape_debug()
                )));
            }
            check_path(&format!("disk {}", d.id), &d.path)?;
            if d.vhost_user && d.via == DiskVia::Storage {
                return Err(ConfigError(format!(
                    "disk {}: a vhost-user disk is its backend's; via=storage is for an image or VMKFS disk the daemon's storage service serves",
                    d.id
                )));
            }
            if d.vhost_user && d.vmkfs.is_some() {
                return Err(ConfigError(format!(
                    "disk {}: a vhost-user disk is its backend's; vmkfs is given to the backend",
                    d.id
                )));
            }
            if let Some(n) = &d.vmkfs {
                if n.is_empty() || n.contains('\0') {
                    return Err(ConfigError(format!(
                        "disk {}: the VMKFS disk name is empty or contains a NUL byte",
                        d.id
                    )));
                }
            }
            if self.disks[..i].iter().any(|o| o.id == d.id) {
                return Err(ConfigError(format!("two disks have the id '{}'", d.id)));
            }
        }
        for n in &self.nets {
            if let Some(net) = &n.network {
                if !valid_network_name(net) {
                    return Err(ConfigError(format!(
                        "net network '{}': use 1-64 of A-Z a-z 0-9 _ . - (not starting with .)",
                        net.escape_debug()
                    )));
                }
                if !n.tap.is_empty() {
                    return Err(ConfigError(format!(
                        "net {}: give tap or network, not both",
                        n.name()
                    )));
                }
            }
            if let Some(p) = &n.vhost_user {
                if !n.tap.is_empty() {
                    return Err(ConfigError(format!(
                        "net {}: give tap or vhost_user, not both",
                        n.name()
                    )));
                }
                check_path(&format!("net {}", n.name()), p)?;
            } else if n.network.is_some() {
            } else if !valid_tap_name(&n.tap) {
                return Err(ConfigError(format!(
                    "net tap '{}': use 1-{MAX_TAP_NAME} characters, not . or .., without '/', ':', spaces or NUL",
                    n.tap.escape_debug()
                )));
            }
            if let Some(id) = n.id.as_ref().filter(|i| !valid_net_id(i)) {
                return Err(ConfigError(format!(
                    "net id '{}': use 1-{MAX_DISK_ID} printable ASCII characters",
                    id.escape_debug()
                )));
            }
            if let Some(m) = n.mac.filter(|m| m[0] & 1 != 0) {
                return Err(ConfigError(format!(
                    "net {}: {} is not a unicast MAC address",
                    n.name(),
                    format_mac(&m)
                )));
            }
        }
        if self.memory > host_ram {
            return Err(ConfigError(format!(
                "--memory of {} MiB exceeds this host's {} MiB of RAM",
                self.memory >> 20,
                host_ram >> 20
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
