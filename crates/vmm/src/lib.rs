//! The VMM: one VM on KVM, from a [`VmConfig`] to its end.
//!
//! [`run`] is the single path from configuration to a running VM (in the manner of
//! Firecracker's `builder.rs`): validate, open KVM, create the VM and its memory (registered
//! before the in-kernel irqchip, which makes later memory slots slow on some hosts), load the
//! guest, wire the devices, configure the vCPUs, start one thread per vCPU, and wait for the end
//! (guest poweroff, reset, triple fault, KVM failure or a signal). Every exit is accounted
//! ([`stats`]).

pub mod cluster;
pub mod config;
pub mod control;
mod devstate;
pub mod diagnose;
pub mod emulate;
pub mod error;
mod hotplug;
pub mod jail;
mod landing;
pub mod migrate;
mod pause;
mod pci;
mod postcopy;
pub mod seccomp;
pub mod snapshot;
pub mod split;
pub mod stats;
mod uapic;
mod vcpu;
mod vmkfs_disk;

pub use config::{
    parse_size, DiskConfig, KernelSource, NetConfig, SerialMode, VmConfig, DEFAULT_MEMORY,
    MAX_VCPUS,
};
pub use error::{VmEnd, VmmError};
pub use landing::DiskPlaces;
pub use stats::VmStats;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use wv_abi::{device_kind, DeviceRecord, DEVICE_FLAG_MMIO, NO_IRQ};
use wv_devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use wv_devices::serial::{Attach, COM1_BASE, COM1_IRQ};
use wv_devices::{ConsoleOut, IrqLine, PioBus, SerialDevice};
use wv_hypervisor::vcpu::VcpuTemplate;
use wv_hypervisor::HvError;
use wv_machine::layout;
use wv_machine::GuestRam as GuestMemoryMmap;
use wv_pv::MachineInfo;

/// State the vCPU threads share.
pub(crate) struct VmShared {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) bus: PioBus,
    pub(crate) mmio: Arc<wv_devices::MmioBus>,
    pub(crate) device_counters: Vec<(&'static str, Arc<wv_virtio::DeviceCounters>)>,
    /// The data-path counters of the devices the VMM serves itself, by accounting name.
    pub(crate) device_io: Vec<(&'static str, wv_virtio::IoCounters)>,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) info: MachineInfo,
    pub(crate) table: stats::CauseTable,
    /// The exits so far by cause, readable while the vCPUs run.
    pub(crate) live_exits: stats::LiveExits,
    /// The loaded guest (None when restored from a snapshot).
    pub(crate) loaded: Option<wv_machine::LoadedGuest>,
    /// The host's KVM emulates guest kernel code (no VMX/SVM): the VMM completes the few
    /// instructions its emulator lacks ([`emulate`]).
    pub(crate) emulating_host: bool,
    pub(crate) stop: AtomicBool,
    /// The PCI devices (pause quiesces them; a snapshot saves them) and their bus.
    pub(crate) pci_devices: pci::PciDevices,
    pub(crate) pci_bus: Arc<Mutex<wv_pci::PciBus>>,
    /// What adds devices at runtime (hot-plug) and takes ejected ones apart.
    pub(crate) pci_builder: Mutex<pci::PciBuilder>,
    /// The ACPI hot-plug controller.
    pub(crate) hotplug: Arc<hotplug::Controller>,
    /// The devices added at runtime, by id, as configured (what `GET /vm` shows).
    pub(crate) hot_devices: Mutex<Vec<HotDevice>>,
    pub(crate) i8042: Arc<Mutex<I8042>>,
    /// The VMKFS disks open for writing (a snapshot freezes them).
    pub(crate) vmkfs: Vec<vmkfs_disk::Held>,
    /// Every disk's backend and dirty-block tracking, by index in the configuration's disks
    /// (a migration with `--copy-disks` reads them).
    pub(crate) disk_access: Vec<Option<wv_virtio::block::DiskAccess>>,
    /// KVM's binary statistics of each vCPU (`KVM_GET_STATS_FD`), in vCPU order; empty without
    /// them (Linux < 5.14). Also read by the daemon for `GET /metrics`.
    pub(crate) kvm_stats: Vec<std::os::fd::OwnedFd>,
    /// The balloon's host side and its transport (which signals a new target), when the VM
    /// has one.
    pub(crate) balloon: Option<(
        wv_virtio::balloon::BalloonHandle,
        Arc<Mutex<wv_virtio::VirtioPci>>,
    )>,
    /// Where vCPUs park while the VM is paused.
    pub(crate) gate: pause::Gate,
    /// The userspace interrupt controllers (`--irqchip user`), and the accounting causes of
    /// their MMIO pages (local APIC, I/O APIC).
    pub(crate) uapic: Option<uapic::WithCauses>,
    end: Mutex<Option<VmEnd>>,
    end_evt: EventFd,
    /// The interactive console's listening socket and output side, when asked for.
    console: Option<(std::os::unix::net::UnixListener, Arc<Mutex<Attach>>)>,
}

impl VmShared {
    /// A snapshot of every device's counters (the devices added at start), with the bytes and
    /// operations of those whose data path the VMM serves.
    pub(crate) fn device_activity(&self) -> Vec<stats::DeviceActivity> {
        self.device_counters
            .iter()
            .map(|(name, c)| {
                let mut a = stats::DeviceActivity::read(name, c);
                a.io = self
                    .device_io
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, io)| stats::DeviceIo::read(io));
                a
            })
            .collect()
    }

    /// Records why the VM ends (the first reason wins) and wakes the control loop.
    pub(crate) fn finish(&self, e: VmEnd) {
        let mut g = self.end.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(e);
        }
        self.stop.store(true, Ordering::Release);
        self.gate.end();
        if let Some((u, ..)) = &self.uapic {
            u.end();
        }
        let _ = self.end_evt.write(1);
    }
}

/// A device added at runtime (`PUT /vm/device-add`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum HotDevice {
    /// A virtio-blk disk.
    Disk(DiskConfig),
    /// A virtio-net device.
    Net(NetConfig),
}

impl HotDevice {
    /// The device's id (a disk's `id`, a net's name).
    pub fn id(&self) -> String {
        match self {
            HotDevice::Disk(d) => d.id.clone(),
            HotDevice::Net(n) => n.name(),
        }
    }
}

/// How a run ended, with its accounting.
pub struct RunOutcome {
    /// Why the VM ended.
    pub end: VmEnd,
    /// Exit accounting.
    pub stats: VmStats,
    /// The VM's kernel objects, still open.
    pub resources: Resources,
}

/// Nanoseconds in `d`, saturating (u64 nanoseconds last 584 years).
pub(crate) fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn ioctl(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::Kvm(HvError::Ioctl(what, e))
}

fn internal<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> VmmError {
    move |e| VmmError::Internal(format!("{what}: {e}"))
}

fn register_memory(vm: &kvm_ioctls::VmFd, mem: &GuestMemoryMmap) -> Result<(), VmmError> {
    set_memory_flags(vm, mem, 0).map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))
}

/// (Re-)registers every RAM region of `mem` with KVM, one slot each in guest-address order,
/// with `flags` (`KVM_MEM_LOG_DIRTY_PAGES` turns KVM's dirty log on, 0 off).
pub(crate) fn set_memory_flags(
    vm: &kvm_ioctls::VmFd,
    mem: &GuestMemoryMmap,
    flags: u32,
) -> Result<(), kvm_ioctls::Error> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: u32::try_from(slot).map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM (it is
        // moved into the shared state the vCPU threads hold until they are joined).
        unsafe { vm.set_user_memory_region(r) }?;
    }
    Ok(())
}

/// Fills `buf` from the host's entropy (getrandom(2)); false if the kernel would not give it.
fn random_bytes(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) if n > 0 => done += n,
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return false,
        }
    }
    true
}

/// A locally administered unicast MAC (02:xx:xx:xx:xx:xx) from the host's entropy.
pub fn random_mac() -> [u8; 6] {
    let mut m = [0u8; 6];
    // Without entropy (never on Linux >= 3.17 once booted) the MAC is made of the clock.
    if !random_bytes(&mut m) {
        let t = nanos(std::time::UNIX_EPOCH.elapsed().unwrap_or_default())
            ^ u64::from(std::process::id());
        m.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    m[0] = 0x02;
    m
}

/// A new VM generation identifier ([`wv_abi::Call::VmGeneration`]): 128 random bits.
fn new_generation_id() -> Result<[u8; wv_abi::GENERATION_ID_SIZE], VmmError> {
    let mut id = [0u8; wv_abi::GENERATION_ID_SIZE];
    if random_bytes(&mut id) {
        Ok(id)
    } else {
        Err(VmmError::Internal(format!(
            "getrandom for the VM generation id: {}",
            std::io::Error::last_os_error()
        )))
    }
}

/// The devices the paravirtual device list names; `pit`: the in-kernel PIT exists (not with
/// `--irqchip user`).
fn device_records(pit: bool) -> Vec<DeviceRecord> {
    let rec = |kind, irq, base: u64, len, flags| DeviceRecord {
        kind,
        irq,
        base,
        len,
        flags,
        reserved: 0,
    };
    let mut v = vec![
        rec(
            device_kind::UART_16550,
            COM1_IRQ,
            u64::from(COM1_BASE),
            8,
            0,
        ),
        rec(
            device_kind::I8042,
            NO_IRQ,
            u64::from(I8042_BASE),
            u64::from(I8042_LEN),
            0,
        ),
        rec(
            device_kind::CALL_PORT,
            NO_IRQ,
            u64::from(wv_abi::CALL_PORT),
            4,
            0,
        ),
        rec(device_kind::PIT, 0, 0x40, 4, 0),
        rec(
            device_kind::IOAPIC,
            NO_IRQ,
            layout::IOAPIC_ADDR,
            0x1000,
            DEVICE_FLAG_MMIO,
        ),
        rec(
            device_kind::LAPIC,
            NO_IRQ,
            layout::LAPIC_ADDR,
            0x1000,
            DEVICE_FLAG_MMIO,
        ),
    ];
    if !pit {
        v.retain(|r| r.kind != device_kind::PIT);
    }
    v
}

/// The signals that stop the VM: blocked in every VMM thread, read by the control loop from a
/// signalfd. A thread that does not block them would take them with their default action (the
/// process killed, no exit report, status 128+N).
pub(crate) const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn block_signals(sigs: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set; pthread_sigmask affects this thread only
    // (threads spawned later inherit the mask, which is the intent).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in sigs {
            libc::sigaddset(&mut set, *s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Prints phase timings to stderr when `WV_TRACE_STARTUP` is set (for start-up work).
struct Trace(Option<Instant>);

impl Trace {
    fn new(start: Instant) -> Trace {
        Trace(std::env::var_os("WV_TRACE_STARTUP").map(|_| start))
    }
    fn mark(&self, what: &str) {
        if let Some(s) = self.0 {
            eprintln!(
                "wv-trace: {:>8.1}us {what}",
                s.elapsed().as_secs_f64() * 1e6
            );
        }
    }
}

/// Builds the VM described by `cfg` and runs it until it ends.
pub fn run(cfg: &VmConfig) -> Result<RunOutcome, VmmError> {
    run_from(cfg, None, None, None)
}

/// Builds and runs the VM of `cfg` as node 0 of `cluster` (started with
/// [`cluster::Cluster::start`]): the same build as [`run`], its guest RAM kept coherent with the
/// other nodes by the DSM from before the guest is loaded. Call [`cluster::Cluster::finish`]
/// once the VM has ended, before its resources go.
pub fn run_clustered(cfg: &VmConfig, cluster: &cluster::Cluster) -> Result<RunOutcome, VmmError> {
    cluster::check_config(cfg, cluster.spec()).map_err(VmmError::Config)?;
    run_from(cfg, None, None, Some(cluster))
}

/// Where a restored VM's memory comes from.
pub(crate) enum RestoreMemory {
    /// A snapshot's memory file (opened with its state, so that the snapshot's deletion while
    /// the VM is being built cannot take it away), mapped privately (copy-on-write).
    File(std::fs::File, std::path::PathBuf),
    /// Fresh anonymous RAM already filled (from a migration stream).
    Ram(GuestMemoryMmap),
}

/// What a restore brings back besides the configuration.
pub(crate) struct Restore {
    /// Taken when the VM is built.
    pub(crate) memory: Option<RestoreMemory>,
    vm: wv_hypervisor::state::VmState,
    vcpus: Vec<wv_hypervisor::state::VcpuState>,
    devices: Option<devstate::DevicesState>,
    /// The frozen VMKFS disks of the snapshot (its `disks` section).
    disks: Vec<vmkfs_disk::FrozenDisk>,
    /// Their new branches, opened by [`vmkfs_disk::branch_disks`], by disk index, until the
    /// devices take them.
    branches: Mutex<Vec<(usize, vmkfs_disk::VmkfsDisk)>>,
    /// Raw images a migration copied, open and locked, by disk index, until the devices take
    /// them.
    pub(crate) raw: Mutex<Vec<(usize, std::fs::File)>>,
    /// Restores of the VM before this one.
    restores: u64,
    /// A clone: the configuration's MACs replace the snapshot's.
    clone: bool,
}

/// How a restored VM differs from the one in its snapshot. Whatever the options, a restored VM
/// gets a new generation id ([`wv_abi::Call::VmGeneration`]) and its restore count goes up by
/// one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// A clone: a new identity besides, so that several VMs restored from one snapshot can
    /// run side by side: every virtio-net device gets a new MAC (random and locally
    /// administered, or the one [`RestoreOptions::macs`] names), which the guest sees when it
    /// next reads the device's configuration space.
    pub clone: bool,
    /// MACs for chosen virtio-net devices, by index in the configuration's `nets` (with
    /// `clone` only).
    pub macs: Vec<(usize, [u8; 6])>,
    /// Other vhost-user sockets for chosen net devices served over vhost-user, by index in
    /// the configuration's `nets` (the daemon gives each run of a VM its own switch port).
    pub sockets: Vec<(usize, std::path::PathBuf)>,
}

/// `cfg` (a snapshot's or a migration's) with net `i` served over vhost-user at `socket`
/// instead, for each (i, socket) of `sockets` (`--net-socket`: the daemon gives each run of a
/// VM its own switch port).
pub fn with_net_sockets(
    cfg: &VmConfig,
    sockets: &[(usize, std::path::PathBuf)],
) -> Result<VmConfig, VmmError> {
    let mut out = cfg.clone();
    for (i, p) in sockets {
        match out.nets.get_mut(*i) {
            Some(n) if n.vhost_user.is_some() => n.vhost_user = Some(p.clone()),
            _ => {
                return Err(VmmError::Config(config::ConfigError(format!(
                "--net-socket {i}={}: the VM's network device {i} is not served over vhost-user",
                p.display()
            ))))
            }
        }
    }
    Ok(out)
}

impl RestoreOptions {
    /// The configuration of the restored VM: `cfg` (the snapshot's) with the clone's MACs.
    fn apply(&self, cfg: &VmConfig) -> Result<VmConfig, VmmError> {
        let bad = |m: String| VmmError::Config(config::ConfigError(m));
        if !self.sockets.is_empty() {
            let out = with_net_sockets(cfg, &self.sockets)?;
            let rest = RestoreOptions {
                sockets: Vec::new(),
                ..self.clone()
            };
            return rest.apply(&out);
        }
        if !self.clone {
            if self.macs.is_empty() {
                return Ok(cfg.clone());
            }
            return Err(bad(
                "a restored VM keeps its MACs unless it is a clone".into()
            ));
        }
        let mut out = cfg.clone();
        for (i, m) in &self.macs {
            if *i >= cfg.nets.len() {
                return Err(bad(format!(
                    "--mac {i}={}: the VM has {} network devices (numbered from 0)",
                    config::format_mac(m),
                    cfg.nets.len()
                )));
            }
            if self.macs.iter().filter(|(j, _)| j == i).count() > 1 {
                return Err(bad(format!("--mac {i}=...: given twice")));
            }
        }
        for (i, n) in out.nets.iter_mut().enumerate() {
            let given = self.macs.iter().find(|(j, _)| *j == i).map(|(_, m)| *m);
            n.mac = Some(given.unwrap_or_else(random_mac));
        }
        Ok(out)
    }
}

impl Restore {
    fn read(dir: &std::path::Path, cfg: &VmConfig) -> Result<Restore, VmmError> {
        let bad = |e: snapshot::SnapshotError| VmmError::Snapshot(e.0);
        let sections = snapshot::read(dir).map_err(bad)?;
        let path = dir.join(snapshot::MEMORY_FILE);
        let file = std::fs::File::open(&path)
            .map_err(|e| VmmError::Snapshot(format!("cannot open {}: {e}", path.display())))?;
        let mut r = Restore::from_sections(&sections, cfg).map_err(bad)?;
        r.memory = Some(RestoreMemory::File(file, path));
        Ok(r)
    }

    /// The VM, vCPU and device state of `sections` (a snapshot's or a migration stream's),
    /// checked against `cfg`; the memory is the caller's to add.
    pub(crate) fn from_sections(
        sections: &snapshot::Sections,
        cfg: &VmConfig,
    ) -> Result<Restore, snapshot::SnapshotError> {
        let bad = |e: snapshot::SnapshotError| e;
        let machine: snapshot::Machine = sections.json("machine").map_err(bad)?;
        if machine.memory != cfg.memory || machine.vcpus != cfg.vcpus {
            return Err(snapshot::SnapshotError(format!(
                "the snapshot's machine ({} bytes, {} vCPUs) does not match its configuration",
                machine.memory, machine.vcpus
            )));
        }
        let vcpus = (0..cfg.vcpus)
            .map(|i| sections.json(&format!("vcpu.{i}")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        Ok(Restore {
            memory: None,
            vm: sections.json("vm").map_err(bad)?,
            vcpus,
            devices: Some(sections.json("devices").map_err(bad)?),
            // Snapshots without disks, or from before disks were frozen, have no such section.
            disks: match sections.get(snapshot::DISKS) {
                Ok(_) => sections.json(snapshot::DISKS).map_err(bad)?,
                Err(_) => Vec::new(),
            },
            branches: Mutex::new(Vec::new()),
            raw: Mutex::new(Vec::new()),
            restores: machine.restores,
            clone: false,
        })
    }

    /// The raw image a migration copied for disk `index`, open and locked.
    fn take_raw(&self, index: usize) -> Option<std::fs::File> {
        let mut b = self.raw.lock().unwrap_or_else(|p| p.into_inner());
        let at = b.iter().position(|(i, _)| *i == index)?;
        Some(b.swap_remove(at).1)
    }

    /// The branch opened for disk `index`, if it is one of the snapshot's frozen disks.
    fn take_branch(&self, index: usize) -> Option<vmkfs_disk::VmkfsDisk> {
        let mut b = self.branches.lock().unwrap_or_else(|p| p.into_inner());
        let at = b.iter().position(|(i, _)| *i == index)?;
        Some(b.swap_remove(at).1)
    }
}

/// Reads the configuration of the snapshot in `dir` (what `wv run --restore` starts from).
pub fn snapshot_config(dir: &std::path::Path) -> Result<VmConfig, VmmError> {
    snapshot::read(dir)
        .and_then(|s| s.json("config"))
        .map_err(|e| VmmError::Snapshot(e.0))
}

/// Reads a snapshot's state file (`bytes`) as a restore does before it builds anything: the
/// sections and their checksums, the configuration (validated as for a VM on a host with
/// `host_ram` bytes), then the machine, VM, vCPU, device and disk sections checked against it.
/// Returns the configuration; nothing is opened or built (the fuzz target `snapshot_reader`).
pub fn check_snapshot_state(
    bytes: &[u8],
    host_ram: u64,
) -> Result<VmConfig, snapshot::SnapshotError> {
    let sections = snapshot::Sections::decode(bytes)?;
    let cfg: VmConfig = sections.json("config")?;
    cfg.validate(host_ram)
        .map_err(|e| snapshot::SnapshotError(format!("the snapshot's configuration: {e}")))?;
    Restore::from_sections(&sections, &cfg)?;
    Ok(cfg)
}

/// Brings back the VM of the snapshot in `dir` (taken with `PUT /vm/snapshot`) and runs it until
/// it ends. `cfg` is the snapshot's configuration ([`snapshot_config`]) with the options that do
/// not define the VM (console, control socket) as the caller wants them.
pub fn restore(cfg: &VmConfig, dir: &std::path::Path) -> Result<RunOutcome, VmmError> {
    restore_with(cfg, dir, &RestoreOptions::default())
}

/// [`restore`], with `opts` saying how the restored VM differs from the snapshot's (a clone).
pub fn restore_with(
    cfg: &VmConfig,
    dir: &std::path::Path,
    opts: &RestoreOptions,
) -> Result<RunOutcome, VmmError> {
    Restored::prepare(cfg, dir, opts)?.run()
}

/// A snapshot read and checked, its memory file open: what [`restore_with`] runs, in two steps
/// so that a jail (crates/vmm/src/jail.rs) can come between the reading, which needs the
/// snapshot's files, and the run.
pub struct Restored {
    cfg: VmConfig,
    restore: Restore,
}

impl Restored {
    /// Reads the snapshot in `dir` for `cfg` as `opts` change it ([`restore_with`]).
    pub fn prepare(
        cfg: &VmConfig,
        dir: &std::path::Path,
        opts: &RestoreOptions,
    ) -> Result<Restored, VmmError> {
        let cfg = opts.apply(cfg)?;
        cfg.validate(config::host_ram()).map_err(VmmError::Config)?;
        let mut restore = Restore::read(dir, &cfg)?;
        restore.clone = opts.clone;
        Ok(Restored { cfg, restore })
    }

    /// The configuration the restored VM runs.
    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    /// Builds the VM and runs it until it ends.
    pub fn run(self) -> Result<RunOutcome, VmmError> {
        run_from(&self.cfg, Some(self.restore), None, None)
    }
}

/// Run just before the first vCPU enters the guest, with everything built and restored; an
/// error ends the start (nothing has run). A migration's target acknowledges there.
pub(crate) type BeforeRun<'a> = &'a mut dyn FnMut() -> Result<(), VmmError>;

pub(crate) fn run_from(
    cfg: &VmConfig,
    mut restore: Option<Restore>,
    before_run: Option<BeforeRun<'_>>,
    cluster: Option<&cluster::Cluster>,
) -> Result<RunOutcome, VmmError> {
    let start = Instant::now();
    let trace = Trace::new(start);
    let clone = restore.as_ref().is_some_and(|r| r.clone);
    cfg.validate(config::host_ram()).map_err(VmmError::Config)?;
    if cfg.irqchip == config::IrqChip::User && restore.is_some() {
        return Err(VmmError::Config(config::ConfigError(
            "--irqchip user: a snapshot or a migration cannot be brought back with the userspace interrupt controllers (they have no saved state)".into(),
        )));
    }
    // Every filter is compiled from here, on a thread of its own; each thread installs
    // its own as it starts (vCPU 0's, the main thread's, just before it enters the guest).
    seccomp::prepare(cfg.seccomp).map_err(VmmError::Internal)?;
    trace.mark("seccomp compilation started");
    // A restored VM's VMKFS disks are new branches of the snapshot's frozen files; its
    // configuration names them.
    let branched;
    let cfg = match &restore {
        Some(r) if !r.disks.is_empty() => {
            let (c, opened) = vmkfs_disk::branch_disks(cfg, &r.disks)?;
            *r.branches.lock().unwrap_or_else(|p| p.into_inner()) = opened;
            branched = c;
            &branched
        }
        _ => cfg,
    };
    let kvm = Arc::new(wv_hypervisor::open()?);
    let max = u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX);
    if cfg.vcpus > max {
        return Err(VmmError::Config(config::ConfigError(format!(
            "--vcpus {} exceeds what this host's KVM allows ({max})",
            cfg.vcpus
        ))));
    }
    trace.mark("kvm opened");
    let api = match &cfg.api_socket {
        Some(p) => Some(control::listen(p).map_err(|e| VmmError::Config(config::ConfigError(e)))?),
        None => None,
    };
    // KVM_GET_SUPPORTED_CPUID alone costs ~0.3 ms on some hosts: read it on the other CPU while
    // this one creates the VM and loads the guest.
    let (template, vm, mut shared) = std::thread::scope(|s| {
        let template = s.spawn(|| VcpuTemplate::new(&kvm, cfg.vcpus));
        let built = build(&kvm, cfg, restore.as_mut(), cluster, &trace);
        let template = template
            .join()
            .map_err(|_| VmmError::Internal("CPUID thread panicked".into()))?;
        let (vm, shared) = built?;
        Ok::<_, VmmError>((template?, vm, shared))
    })?;
    trace.mark("cpuid template ready");
    // Without the in-kernel irqchip, vCPUs are configured for the VMM's own local APICs.
    let template = VcpuTemplate {
        kernel_irqchip: cfg.irqchip == config::IrqChip::Kernel,
        ..template
    };
    // A kernel of the user's may use what it sees (the probe guest does not).
    if matches!(cfg.kernel, KernelSource::Path(_)) {
        let ignored = wv_hypervisor::cpuid::ignored_features(
            template.host,
            template.supported_cpuid.as_slice(),
        );
        if !ignored.is_empty() {
            eprintln!(
                "wv: warning: this host's KVM emulates guest kernel code and shows the guest CPU \
                 features its emulator cannot run, whatever wv's CPUID says: {} (boot Linux with \
                 'noxsave'; kernel code using the others stops with a diagnostic)",
                ignored.join(" ")
            );
        }
    }

    let loaded = shared.loaded.clone();
    let mut fds = Vec::with_capacity(cfg.vcpus.try_into().unwrap_or(0));
    let mut stats_fds = Vec::with_capacity(fds.capacity());
    for i in 0..cfg.vcpus {
        let fd = vm
            .create_vcpu(u64::from(i))
            .map_err(ioctl("KVM_CREATE_VCPU"))?;
        template.configure(&fd, i)?;
        if let Some(c) = cluster {
            c.configure_vcpu(&fd)?;
        }
        // Open for the daemon's live metrics (`GET /metrics`): KVM lets only this process
        // open it, anyone holding it read it. Without binary stats (Linux < 5.14) there is none.
        stats_fds.extend(wv_hypervisor::stats::stats_fd(&fd).ok());
        fds.push(fd);
    }
    let boot = &fds[0];
    match (&restore, &loaded) {
        (Some(r), _) => {
            wv_hypervisor::state::restore_vm(&vm, &r.vm)?;
            for (fd, st) in fds.iter().zip(&r.vcpus) {
                wv_hypervisor::state::restore_vcpu(&kvm, fd, st)?;
            }
        }
        (None, Some(loaded)) => {
            let base = boot.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
            boot.set_sregs(&loaded.entry.sregs(&base))
                .map_err(ioctl("KVM_SET_SREGS"))?;
            boot.set_regs(&loaded.entry.regs())
                .map_err(ioctl("KVM_SET_REGS"))?;
        }
        (None, None) => return Err(VmmError::Internal("no guest loaded".into())),
    }
    trace.mark("vcpu state set");
    shared.info.tsc_khz = boot.get_tsc_khz().map(u64::from).unwrap_or(0);
    shared.emulating_host = template.host.kernel_mode_emulated;
    shared.kvm_stats = stats_fds;
    if let Some(mut d) = restore.as_mut().and_then(|r| r.devices.take()) {
        if clone {
            // The clone's MACs (in its configuration) instead of the snapshot's.
            let macs: Vec<[u8; 6]> = cfg.nets.iter().filter_map(|n| n.mac).collect();
            devstate::set_macs(&mut d, &macs)
                .map_err(|e| VmmError::Snapshot(format!("devices: {e}")))?;
        }
        devstate::restore(&shared, d).map_err(|e| VmmError::Snapshot(format!("devices: {e}")))?;
    }
    let shared = Arc::new(shared);
    if let Some(c) = cluster {
        // Other nodes' vCPUs: their interrupts and device accesses are served from now on.
        c.serve(&shared)?;
    }
    trace.mark("vcpus configured");

    vcpu::install_kick_handler().map_err(internal("installing the vCPU kick handler"))?;
    let set = block_signals(&STOP_SIGNALS);
    // SAFETY: `set` is a valid, initialised signal set; the result is checked.
    let sigfd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
    if sigfd < 0 {
        return Err(VmmError::Internal(format!(
            "signalfd: {}",
            std::io::Error::last_os_error()
        )));
    }
    if let Some(f) = before_run {
        f()?;
    }
    if let Some(r) = &restore {
        // Once more, now that everything else is in place: the guest's clock resumes where it
        // stopped, not where it was when restore began.
        let clock = kvm_bindings::kvm_clock_data {
            clock: r.vm.clock.0.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))?;
    }
    if restore.is_some() {
        // Restored devices stay quiet until now: nothing runs before the last check passed.
        shared.pci_devices.resume_all();
    }
    let setup_ns = nanos(start.elapsed());
    let run_start = Instant::now();
    // vCPU 0 runs on this, the main thread: on some hosts KVM_RUN costs more per exit from a
    // spawned thread (PVM: +0.3-0.6 us measured with a bare C loop). The others get threads,
    // and the control loop (signals, console input, stopping everyone) gets one of its own.
    let mut fds = fds.into_iter();
    let boot_fd = fds
        .next()
        .ok_or_else(|| VmmError::Internal("no vCPU".into()))?;
    if let Some((u, ..)) = &shared.uapic {
        let u = u.clone();
        std::thread::Builder::new()
            .name("irq-relay".into())
            .spawn(move || {
                seccomp::install(seccomp::Kind::IrqRelay);
                u.relay();
            })
            .map_err(internal("starting the interrupt relay thread"))?;
    }
    let mut handles = Vec::with_capacity(fds.len());
    for (i, fd) in (1u32..).zip(fds) {
        let sh = shared.clone();
        let h = std::thread::Builder::new()
            .name(format!("vcpu{i}"))
            .spawn(move || {
                seccomp::install(seccomp::Kind::Vcpu);
                vcpu::run(i, fd, sh)
            })
            .map_err(internal("starting a vCPU thread"))?;
        handles.push(h);
    }
    // SAFETY: pthread_self has no preconditions.
    let mut tids: Vec<libc::pthread_t> = vec![unsafe { libc::pthread_self() }];
    tids.extend(handles.iter().map(|h| h.as_pthread_t()));
    let inbox = match api {
        Some(l) => Some(control::start(l).map_err(internal("starting the API thread"))?),
        None => None,
    };
    let controller = control::Controller {
        shared: shared.clone(),
        vm: vm.clone(),
        threads: tids,
        paused: None,
        api_path: cfg.api_socket.clone(),
        cfg: cfg.clone(),
        kvm: kvm.clone(),
        end_after_answer: None,
        pending_removes: Vec::new(),
        answers_in_flight: Vec::new(),
    };
    let control = {
        let stdin = cfg.serial == SerialMode::Stdio;
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                seccomp::install(seccomp::Kind::Control);
                let mut controller = controller;
                control_loop(&mut controller, sigfd, stdin, inbox.as_ref());
                controller.shared.stop.store(true, Ordering::Release);
                controller.kick_all();
            })
            .map_err(internal("starting the control thread"))?
    };
    trace.mark("vcpu threads started");
    seccomp::install(seccomp::Kind::Main);
    trace.mark("main thread filtered");
    let (boot_stats, boot_fd) = vcpu::run(0, boot_fd, shared.clone());
    trace.mark("vm ended");
    // vCPU 0 may have stopped because another vCPU or a signal ended the VM; either way the
    // control thread now has (or is about to have) the reason and kicks everyone.
    shared.finish(VmEnd::Internal("vCPU 0 stopped without a reason".into()));
    let mut panicked = control.join().is_err().then_some("control".to_string());
    let mut vcpus = vec![boot_stats];
    let mut vcpu_fds = vec![boot_fd];
    for (i, h) in (1..).zip(handles) {
        match h.join() {
            Ok((s, fd)) => {
                vcpus.push(s);
                vcpu_fds.push(fd);
            }
            Err(_) => panicked = Some(format!("vCPU {i}")),
        }
    }
    // SAFETY: sigfd is ours and no longer used.
    unsafe { libc::close(sigfd) };
    let end = shared
        .end
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .expect("the VM ended with a reason");
    let end = match panicked {
        Some(t) => VmEnd::Internal(format!("{t} thread panicked")),
        None => end,
    };
    trace.mark("vcpus joined");
    let devices = shared.device_activity();
    let stats = VmStats {
        devices,
        kvm: Vec::new(),
        table: shared.table.clone(),
        vcpus,
        setup_ns,
        run_ns: nanos(run_start.elapsed()),
    };
    Ok(RunOutcome {
        end,
        stats,
        resources: Resources {
            _vcpus: vcpu_fds,
            _vm: vm,
            _shared: shared,
            _kvm: kvm,
        },
    })
}

/// New shared RAM of `size` bytes holding a copy of `mem`.
fn to_shared(mem: &GuestMemoryMmap, size: u64) -> Result<GuestMemoryMmap, VmmError> {
    let s = wv_machine::create_shared_ram(size).map_err(VmmError::Memory)?;
    wv_machine::copy_ram(mem, &s).map_err(VmmError::Memory)?;
    Ok(s)
}

/// Creates the VM, its memory, interrupt controllers and devices, and loads the guest.
fn build(
    kvm: &kvm_ioctls::Kvm,
    cfg: &VmConfig,
    mut restore: Option<&mut Restore>,
    cluster: Option<&cluster::Cluster>,
    trace: &Trace,
) -> Result<(Arc<kvm_ioctls::VmFd>, VmShared), VmmError> {
    let vm = Arc::new(kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?);
    trace.mark("vm created");
    let shared = cfg.memory_is_shared();
    let mem = match restore.as_mut().and_then(|r| r.memory.take()) {
        None if shared => wv_machine::create_shared_ram(cfg.memory).map_err(VmmError::Memory)?,
        None => wv_machine::create_ram(cfg.memory).map_err(VmmError::Memory)?,
        Some(RestoreMemory::File(f, p)) => {
            let private = wv_machine::map_ram_file(&f, cfg.memory)
                .map_err(|e| VmmError::Snapshot(format!("{}: {e}", p.display())))?;
            if shared {
                // A backend must see the pages: read the image into shared RAM instead of
                // mapping it copy-on-write.
                to_shared(&private, cfg.memory)?
            } else {
                private
            }
        }
        Some(RestoreMemory::Ram(m)) if shared && !wv_machine::is_shared(&m) => {
            to_shared(&m, cfg.memory)?
        }
        Some(RestoreMemory::Ram(m)) => m,
    };
    if let Some(c) = cluster {
        // Before anything is written to RAM (a DSM node drops every page when it joins).
        c.ram_hook(&mem)?;
        trace.mark("memory handed to the hook");
    }
    register_memory(&vm, &mem)?;
    trace.mark("memory registered");
    vm.set_tss_address(usize::try_from(layout::KVM_TSS_ADDR).map_err(internal("TSS address"))?)
        .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
        .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
    let uapic = match cfg.irqchip {
        config::IrqChip::Kernel => {
            vm.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
            vm.create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(ioctl("KVM_CREATE_PIT2"))?;
            None
        }
        config::IrqChip::User => Some(Arc::new(
            match cluster.and_then(cluster::Cluster::hub) {
                // vCPUs on other nodes: every delivery goes through node 0's router.
                Some(hub) => uapic::Uapic::with_deliver(cfg.vcpus, |local| hub.router(local)),
                None => uapic::Uapic::new(cfg.vcpus),
            }
            .map_err(internal("eventfd"))?,
        )),
    };
    // An interrupt line of a device the VMM serves: an irqfd on `gsi`, or a pulse on the
    // userspace I/O APIC's pin.
    let line = |evt: &EventFd, gsi: u32| -> Result<(), VmmError> {
        match &uapic {
            Some(u) => {
                let pin = u8::try_from(gsi).map_err(internal("interrupt line"))?;
                u.add_source(
                    evt.try_clone().map_err(internal("eventfd"))?,
                    uapic::Source::Pin(pin),
                );
                Ok(())
            }
            None => vm.register_irqfd(evt, gsi).map_err(ioctl("KVM_IRQFD")),
        }
    };
    trace.mark("irqchip and pit");

    let loaded = match restore {
        Some(_) => None,
        None => {
            let kernel = config::kernel_image(&cfg.kernel).map_err(VmmError::Config)?;
            Some(
                wv_machine::load(
                    &mem,
                    cfg.memory,
                    &kernel,
                    cfg.initrd.as_deref(),
                    &cfg.cmdline,
                    u8::try_from(cfg.vcpus).map_err(internal("vCPU count"))?,
                )
                .map_err(VmmError::Boot)?,
            )
        }
    };
    trace.mark("guest loaded");

    let out = match &cfg.serial {
        SerialMode::Stdio => ConsoleOut::Stdout,
        SerialMode::None => ConsoleOut::Sink,
        SerialMode::File(p) => ConsoleOut::File(match wv_fds::take_path(p) {
            Some(f) => f,
            None => jail::open_serial(p).map_err(|e| {
                VmmError::Config(config::ConfigError(format!(
                    "cannot open serial output {}: {e}",
                    p.display()
                )))
            })?,
        }),
    };
    let (out, console) = match &cfg.console_socket {
        Some(p) => {
            let a = Arc::new(Mutex::new(Attach::default()));
            let l = console_listener(p)?;
            (ConsoleOut::Tee(Box::new(out), a.clone()), Some((l, a)))
        }
        None => (out, None),
    };
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(internal("eventfd"))?;
    line(&irq, COM1_IRQ)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(IrqLine(irq), out)));
    let mut bus = PioBus::new();
    bus.insert(COM1_BASE, 8, "serial", serial.clone())
        .map_err(internal("port bus"))?;
    let i8042 = Arc::new(Mutex::new(I8042::default()));
    bus.insert(I8042_BASE, I8042_LEN, "i8042", i8042.clone())
        .map_err(internal("port bus"))?;
    bus.insert(
        wv_machine::acpi::SLEEP_CONTROL_PORT,
        2,
        "acpi-sleep",
        Arc::new(Mutex::new(wv_devices::acpi::AcpiSleep::new(
            wv_machine::acpi::S5_SLEEP_TYPE,
        ))),
    )
    .map_err(internal("port bus"))?;
    let mut pci = pci::PciBuilder::with_irqchip(vm.clone(), uapic.clone());
    if cfg.rng {
        pci.add_virtio(
            &vm,
            &mem,
            "virtio-rng",
            Box::new(wv_virtio::rng::Rng::default()),
        )?;
    }
    let mut vmkfs = Vec::new();
    let mut disk_access = Vec::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        let (name, dev, access) = disk_device(d, i, restore.as_deref(), &mut vmkfs)?;
        disk_access.push(access);
        pci.add_virtio(&vm, &mem, name, dev)?;
    }
    for n in &cfg.nets {
        let (name, dev) = net_device(n)?;
        pci.add_virtio(&vm, &mem, name, dev)?;
    }
    // Last, so that the slots of the other devices are those of a VM without it.
    let balloon = if cfg.balloon {
        let b = wv_virtio::balloon::Balloon::new(cfg.memory);
        let handle = b.handle();
        pci.add_virtio(&vm, &mem, "virtio-balloon", Box::new(b))?;
        let devs = pci.devices();
        let dev = devs
            .handles()
            .last()
            .map(|h| h.dev.clone())
            .ok_or_else(|| VmmError::Internal("the balloon was not added".into()))?;
        Some((handle, dev))
    } else {
        None
    };
    let pci_devices = pci.devices();
    let (pci_bus, mmio, device_counters, device_io) = (
        pci.bus.clone(),
        pci.mmio.clone(),
        pci.counters.clone(),
        pci.io.clone(),
    );
    let ged = EventFd::new(libc::EFD_NONBLOCK).map_err(internal("eventfd"))?;
    line(&ged, wv_machine::acpi::GED_GSI)?;
    let hotplug = Arc::new(hotplug::Controller::new(ged).map_err(internal("eventfd"))?);
    bus.insert(
        wv_machine::acpi::HOTPLUG_PORT,
        wv_machine::acpi::HOTPLUG_LEN,
        "pci-hotplug",
        Arc::new(Mutex::new(hotplug::Pio(hotplug.clone()))),
    )
    .map_err(internal("port bus"))?;
    bus.insert(
        wv_pci::CONFIG_ADDRESS_PORT,
        wv_pci::CONFIG_PORTS_LEN,
        "pci-config",
        pci_bus.clone(),
    )
    .map_err(internal("port bus"))?;
    mmio.insert(
        wv_machine::layout::ECAM_BASE,
        wv_machine::layout::ECAM_SIZE,
        "pci-ecam",
        Arc::new(Mutex::new(wv_pci::Ecam(pci_bus.clone()))),
    )
    .ok_or_else(|| VmmError::Internal("the ECAM window overlaps a BAR".into()))?;
    // Hot-plugged devices take MMIO indexes after these (or ones freed by an eject): one
    // accounting cause per slot that may hold one.
    let mut mmio_names = mmio.names();
    mmio_names.extend(HOTPLUG_CAUSES.iter().take(32 - pci_devices.handles().len()));
    let apic_causes = mmio_names.len();
    if uapic.is_some() {
        mmio_names.extend(["lapic", "ioapic"]);
    }
    let table = stats::CauseTable::new(&bus.names(), &mmio_names);
    let uapic = uapic.map(|u| (u, table.mmio(apic_causes), table.mmio(apic_causes + 1)));
    let shared = VmShared {
        mem,
        bus,
        mmio,
        device_counters,
        device_io,
        serial,
        info: MachineInfo {
            mem_size: cfg.memory,
            vcpus: cfg.vcpus,
            devices: device_records(cfg.irqchip == config::IrqChip::Kernel),
            tsc_khz: 0,
            generation_id: new_generation_id()?,
            restores: restore.map_or(0, |r| r.restores.saturating_add(1)),
        },
        live_exits: stats::LiveExits::new(cfg.vcpus, table.len()),
        table,
        loaded,
        emulating_host: false,
        stop: AtomicBool::new(false),
        gate: pause::Gate::new(cfg.vcpus),
        uapic,
        pci_devices,
        pci_bus: pci_bus.clone(),
        pci_builder: Mutex::new(pci),
        hotplug,
        hot_devices: Mutex::new(Vec::new()),
        i8042,
        vmkfs,
        disk_access,
        kvm_stats: Vec::new(),
        balloon,
        end: Mutex::new(None),
        end_evt: EventFd::new(0).map_err(internal("eventfd"))?,
        console,
    };
    trace.mark("devices");
    Ok((vm, shared))
}

/// The accounting causes of MMIO ranges added at runtime, by their index past the ranges
/// present at start.
const HOTPLUG_CAUSES: [&str; 32] = [
    "hotplug-0",
    "hotplug-1",
    "hotplug-2",
    "hotplug-3",
    "hotplug-4",
    "hotplug-5",
    "hotplug-6",
    "hotplug-7",
    "hotplug-8",
    "hotplug-9",
    "hotplug-10",
    "hotplug-11",
    "hotplug-12",
    "hotplug-13",
    "hotplug-14",
    "hotplug-15",
    "hotplug-16",
    "hotplug-17",
    "hotplug-18",
    "hotplug-19",
    "hotplug-20",
    "hotplug-21",
    "hotplug-22",
    "hotplug-23",
    "hotplug-24",
    "hotplug-25",
    "hotplug-26",
    "hotplug-27",
    "hotplug-28",
    "hotplug-29",
    "hotplug-30",
    "hotplug-31",
];

/// A disk built for the bus: its accounting name, the device, its backend's access.
pub(crate) type BuiltDisk = (
    &'static str,
    Box<dyn wv_virtio::VirtioDevice>,
    Option<wv_virtio::block::DiskAccess>,
);

/// Disk `index` of a configuration (`d`) as a device: its accounting name, the device and,
/// unless a vhost-user backend serves it, its backend's access (migration's disk copy). The one
/// path by which start, restore and hot-plug build a disk; a restored VM's raw and VMKFS disks
/// come from `restore`, VMKFS disks open for writing are pushed to `vmkfs`.
pub(crate) fn disk_device(
    d: &DiskConfig,
    index: usize,
    restore: Option<&Restore>,
    vmkfs: &mut Vec<vmkfs_disk::Held>,
) -> Result<BuiltDisk, VmmError> {
    if d.via == wv_config::DiskVia::Storage {
        // The daemon resolves it to the storage service's socket before the VMM starts.
        return Err(VmmError::Disk(format!(
            "disk {}: via=storage is for VMs of the daemon (wv vm create), whose storage service serves the disk; wv run opens it itself without it",
            d.id
        )));
    }
    if d.vhost_user {
        let name: &'static str = Box::leak(format!("vhost-user-blk:{}", d.id).into_boxed_str());
        let dev = wv_virtio::vhost_user::VhostUserDevice::blk(&d.path, d.readonly)
            .map_err(|e| VmmError::Disk(format!("disk {}: {e}", d.id)))?;
        return Ok((name, Box::new(dev), None));
    }
    let disk: Box<dyn wv_virtio::block::Disk> = match &d.vmkfs {
        None => Box::new(match restore.and_then(|r| r.take_raw(index)) {
            Some(f) => wv_virtio::block::RawDisk::from_locked(f, d.readonly)
                .map_err(|e| VmmError::Disk(format!("{}: {e}", d.path.display()))),
            None => wv_virtio::block::RawDisk::open(&d.path, d.readonly)
                .map_err(|e| VmmError::Disk(e.to_string())),
        }?),
        Some(name) => {
            let v = match restore.and_then(|r| r.take_branch(index)) {
                Some(v) => v,
                None => vmkfs_disk::VmkfsDisk::open(&d.path, name, d.readonly)?,
            };
            vmkfs.extend(v.held(&d.id, &d.path, index));
            Box::new(v)
        }
    };
    let name: &'static str = Box::leak(format!("virtio-blk:{}", d.id).into_boxed_str());
    let blk = wv_virtio::block::Block::new(disk, &d.id);
    let access = Some(blk.access());
    Ok((name, Box::new(blk), access))
}

/// A configuration's net device: its accounting name and the device (on its TAP or its
/// vhost-user backend). The one path by which start and hot-plug build one.
pub(crate) fn net_device(
    n: &NetConfig,
) -> Result<(&'static str, Box<dyn wv_virtio::VirtioDevice>), VmmError> {
    let mac = n.mac.unwrap_or_else(random_mac);
    let name: &'static str = Box::leak(format!("virtio-net:{}", n.name()).into_boxed_str());
    let dev: Box<dyn wv_virtio::VirtioDevice> = match &n.vhost_user {
        Some(sock) => Box::new(
            wv_virtio::vhost_user::VhostUserDevice::net(sock, mac).map_err(VmmError::Net)?,
        ),
        None if n.network.is_some() => {
            return Err(VmmError::Config(config::ConfigError(format!(
                "net {}: network={} is served by the daemon's switch: define the VM with wv vm create (wv run takes tap= or vhost-user=)",
                n.name(),
                n.network.as_deref().unwrap_or_default()
            ))))
        }
        None => Box::new(wv_virtio::net::Net::new(
            wv_virtio::net::Tap::open(&n.tap).map_err(VmmError::Net)?,
            mac,
        )),
    };
    Ok((name, dev))
}

/// Work to do before the process exits (closing what must be closed cleanly, such as the
/// owner records of VMKFS disks): the VMM exits without dropping its devices.
static EXIT_HOOKS: std::sync::Mutex<Vec<Box<dyn FnOnce() + Send>>> =
    std::sync::Mutex::new(Vec::new());

/// Runs `f` when the VM ends, in [`Resources::exit`].
pub fn at_exit(f: Box<dyn FnOnce() + Send>) {
    EXIT_HOOKS.lock().unwrap_or_else(|p| p.into_inner()).push(f);
}

fn run_exit_hooks() {
    let hooks = std::mem::take(&mut *EXIT_HOOKS.lock().unwrap_or_else(|p| p.into_inner()));
    for h in hooks {
        h();
    }
}

/// The kernel objects and memory of a VM that has ended. Dropping it closes everything now;
/// [`Resources::exit`] ends the process and leaves the slow part of the teardown to a helper.
pub struct Resources {
    _vcpus: Vec<kvm_ioctls::VcpuFd>,
    _vm: Arc<kvm_ioctls::VmFd>,
    _shared: Arc<VmShared>,
    _kvm: Arc<kvm_ioctls::Kvm>,
}

impl Resources {
    /// KVM's cumulative per-vCPU counters (from `KVM_GET_STATS_FD`), in vCPU order; a vCPU
    /// whose counters cannot be read gets an empty list.
    pub fn kvm_counters(&self) -> Vec<Vec<(String, u64)>> {
        self._vcpus
            .iter()
            .map(|v| wv_hypervisor::stats::vcpu_counters(v).unwrap_or_default())
            .collect()
    }

    /// Exits the process with `status`.
    ///
    /// Destroying a VM with the in-kernel irqchip and PIT takes 10-30 ms on some hosts (the
    /// kernel waits for RCU grace periods per device), and it runs in whichever process drops
    /// the last reference. Unless `WV_SYNC_TEARDOWN` is set, a helper is started that shares
    /// this process's memory and has a copy of its descriptor table: it closes every descriptor
    /// but the KVM ones (so no disk lock, TAP, socket or output of `wv` outlives `wv`: a reader
    /// sees end-of-file and a second VMM can take the disks as soon as `wv` has exited), tells
    /// this process it has, waits until this process has exited, and exits with the last
    /// references to the VM: `wv` reports its status at once and the kernel finishes the
    /// teardown in the helper. Without pidfds (Linux < 5.3) the teardown stays synchronous.
    pub fn exit(self, status: u8) -> ! {
        use std::io::Write;
        run_exit_hooks();
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        jail::report_exit(status);
        // The helper must outlive this process, or the last references come back here: it waits
        // on a pidfd of this process, which becomes readable once the process has exited.
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
        let pidfd = i32::try_from(pidfd).unwrap_or(-1);
        let mut ready = [-1i32; 2];
        // SAFETY: pipe fills two descriptors.
        let piped = unsafe { libc::pipe(ready.as_mut_ptr()) } == 0;
        if std::env::var_os("WV_SYNC_TEARDOWN").is_none() && pidfd >= 0 && piped {
            // What the helper keeps open: the KVM descriptors, the pidfd it waits on and the
            // pipe it reports on.
            let mut keep: Vec<i32> = self._vcpus.iter().map(|v| v.as_raw_fd()).collect();
            keep.extend([self._vm.as_raw_fd(), self._kvm.as_raw_fd(), pidfd, ready[1]]);
            let hold = teardown_hold_fd();
            if hold >= 0 {
                keep.push(hold);
            }
            keep.sort_unstable();
            keep.dedup();
            let (filter, probe) = seccomp::teardown_filter();
            let plan = Box::leak(Box::new(TeardownPlan {
                filter,
                probe,
                pidfd,
                ready: ready[1],
                hold,
                keep: keep.leak(),
                // For kernels without close_range: every descriptor up to the highest open one.
                highest: std::fs::read_dir("/proc/self/fd")
                    .map(|d| {
                        d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                            .max()
                            .unwrap_or(1024)
                    })
                    .unwrap_or(1024),
            }));
            const STACK: usize = 16 * 1024;
            let stack = Box::leak(vec![0u8; STACK].into_boxed_slice());
            // SAFETY: the child runs `teardown_helper` on its own stack (leaked, so it stays
            // valid) with a leaked, never-freed plan; it only makes system calls (no allocation:
            // this process's other threads may hold allocator locks) and exits. CLONE_VM shares
            // memory; without CLONE_FILES the child gets its own copy of the descriptor table,
            // so what it closes stays open here and what it keeps outlives this process.
            let r = unsafe {
                libc::clone(
                    teardown_helper,
                    stack.as_mut_ptr().add(STACK) as *mut libc::c_void,
                    libc::CLONE_VM,
                    plan as *mut TeardownPlan as *mut libc::c_void,
                )
            };
            if r > 0 {
                seccomp::set_teardown_tid(r);
                // Wait until the helper holds nothing but the KVM descriptors; then this
                // process's exit closes the last reference to everything else.
                // SAFETY: closing our copy of the write end, so that a helper that died early
                // gives end-of-file rather than a hang.
                unsafe { libc::close(ready[1]) };
                let mut b = [0u8; 1];
                // A failed read is an interruption (errno is not looked at: the helper shares
                // this thread's); a few retries bound the wait either way.
                for _ in 0..100 {
                    // SAFETY: reading one byte into a local buffer.
                    if unsafe { libc::read(ready[0], b.as_mut_ptr().cast(), 1) } >= 0 {
                        break;
                    }
                }
                std::mem::forget(self);
            } else {
                drop(self);
            }
        } else {
            drop(self);
        }
        // SAFETY: output was flushed above; nothing else needs to run at exit.
        unsafe { libc::_exit(i32::from(status)) }
    }
}

/// In debug builds (the tests'), WV_TEARDOWN_HOLD_FD names an inherited descriptor that the
/// teardown helper reads until end-of-file before it exits, so a test can look at the helper
/// mid-teardown; -1 otherwise, and always in release builds.
fn teardown_hold_fd() -> i32 {
    if !cfg!(debug_assertions) {
        return -1;
    }
    std::env::var("WV_TEARDOWN_HOLD_FD")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .filter(|&fd| fd > 2)
        .unwrap_or(-1)
}

/// What the teardown helper of [`Resources::exit`] needs, prepared before it starts.
struct TeardownPlan {
    /// The teardown helper's system-call filter (empty: none), and whether it makes the
    /// `WV_SECCOMP_PROBE` call.
    filter: &'static [seccomp::Insn],
    probe: bool,
    /// A pidfd of the exiting `wv` process.
    pidfd: i32,
    /// The pipe to `wv` on which the helper says it has closed what it does not keep.
    ready: i32,
    /// A descriptor to read until end-of-file before exiting (tests), or -1.
    hold: i32,
    /// The descriptors to keep open until the helper exits, sorted.
    keep: &'static [i32],
    /// The highest descriptor that was open, for closing one by one without close_range.
    highest: i32,
}

/// Closes the descriptors `lo..=hi` of the calling (helper) process.
fn close_span(lo: i32, hi: i32) {
    if lo > hi {
        return;
    }
    // SAFETY: close_range takes two descriptor numbers and flags; it only closes descriptors.
    let r = unsafe { libc::syscall(libc::SYS_close_range, lo as u32, hi as u32, 0u32) };
    if r != 0 {
        // Linux < 5.9: one by one, up to the highest descriptor open before the helper started.
        for fd in lo..=hi.min(1 << 20) {
            // SAFETY: closing a descriptor number; EBADF for one that is not open is harmless.
            unsafe { libc::close(fd) };
        }
    }
}

/// The teardown helper (a clone sharing memory with `wv`, with a copy of its descriptor
/// table): closes standard input, output and error and then every other descriptor but the
/// KVM ones, tells `wv` so, waits for `wv` to exit, and exits, taking the last references to
/// the VM with it. It makes raw system calls only and never looks at errno (it shares the
/// calling thread's thread-local storage, errno included, with `wv`).
extern "C" fn teardown_helper(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the leaked TeardownPlan passed by Resources::exit, never freed.
    let plan = unsafe { &*(arg as *const TeardownPlan) };
    // Who it is, for a SIGSYS report, before anything can be refused: `wv` records the id too
    // once clone returns, which may be after this helper's first calls (it shares the main
    // thread's thread-local storage, so it would be reported as `main`).
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    seccomp::set_teardown_tid(i32::try_from(tid).unwrap_or(0));
    // Down from the main thread's list (inherited) to the helper's own.
    seccomp::install_raw(plan.filter, plan.probe);
    // Standard descriptors first (a reader waits for those), then everything else.
    let spans = |lo: i32, hi: i32| {
        let mut next = lo;
        for &k in plan.keep.iter().filter(|&&k| k >= lo && k <= hi) {
            close_span(next, k - 1);
            next = k + 1;
        }
        close_span(next, hi);
    };
    spans(0, 2);
    spans(3, plan.highest.max(3));
    // Anything opened after the plan was made (by other threads of wv) goes too.
    // SAFETY: as in close_span; fails harmlessly where close_range does not exist.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            (plan.highest.max(3) + 1) as u32,
            u32::MAX,
            0u32,
        )
    };
    let b = [1u8; 1];
    // SAFETY: one byte from a local buffer to the pipe wv waits on, then our end is closed.
    unsafe {
        libc::write(plan.ready, b.as_ptr().cast(), 1);
        libc::close(plan.ready);
    }
    let mut p = libc::pollfd {
        fd: plan.pidfd,
        events: libc::POLLIN,
        revents: 0,
    };
    // Until wv has exited (a failed poll is an interruption: the pidfd stays valid here).
    // SAFETY: polling one descriptor this helper keeps, from its own stack.
    while unsafe { libc::poll(&mut p, 1, -1) } != 1 {}
    let mut b = [0u8; 1];
    // SAFETY: reading into a local buffer from a descriptor the helper kept; any error ends it.
    while plan.hold >= 0 && unsafe { libc::read(plan.hold, b.as_mut_ptr().cast(), 1) } > 0 {}
    // SAFETY: nothing else runs here; _exit drops the last references to the VM and memory.
    unsafe { libc::_exit(0) }
}

/// Listens for console clients on `path`, replacing a stale socket but never a live one.
pub(crate) fn console_listener(
    path: &std::path::Path,
) -> Result<std::os::unix::net::UnixListener, VmmError> {
    control::bind_socket(path, "listen for the console")
        .map_err(|e| VmmError::Config(config::ConfigError(e)))
}

/// Waits for the VM to end or a stop signal; feeds stdin (when the console is stdio) and the
/// attached console client (when there is a console socket) to the UART.
fn control_loop(
    ctl: &mut control::Controller,
    sigfd: libc::c_int,
    stdin: bool,
    inbox: Option<&control::Inbox>,
) {
    let shared = ctl.shared.clone();
    let mut stdin_open = stdin;
    let mut pending: Vec<u8> = Vec::new();
    let mut client: Option<std::os::unix::net::UnixStream> = None;
    loop {
        if shared
            .end
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            // A guest that ejected a device and then ended: its remove is answered.
            ctl.hotplug_work();
            ctl.flush_answers();
            if let Some((l, _)) = &shared.console {
                if let Ok(addr) = l.local_addr() {
                    if let Some(p) = addr.as_pathname() {
                        let _ = std::fs::remove_file(p);
                    }
                }
            }
            if let Some(p) = &ctl.api_path {
                let _ = std::fs::remove_file(p);
            }
            return;
        }
        let mut fds = vec![
            libc::pollfd {
                fd: shared.end_evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sigfd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: inbox.map_or(-1, control::Inbox::fd),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: shared.hotplug.ejected_evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // Input sources, each polled only while nothing waits for room in the UART.
        let mut sources: Vec<libc::c_int> = Vec::new();
        if stdin_open && pending.is_empty() {
            sources.push(0);
        }
        if let (Some(c), true) = (&client, pending.is_empty()) {
            sources.push(c.as_raw_fd());
        }
        if let Some((l, _)) = &shared.console {
            sources.push(l.as_raw_fd());
        }
        for &fd in &sources {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // Ejected devices taken apart, removes whose wait is over answered.
        let eject_wait = ctl.hotplug_work().map(|d| {
            i32::try_from(d.as_millis())
                .unwrap_or(i32::MAX)
                .saturating_add(1)
        });
        let timeout = match (pending.is_empty(), eject_wait) {
            (true, None) => -1,
            (true, Some(w)) => w,
            (false, w) => w.unwrap_or(10).min(10),
        };
        // SAFETY: `fds` is a valid array of pollfd for its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            continue;
        }
        if fds[1].revents & libc::POLLIN != 0 {
            // SAFETY: reading one signalfd_siginfo into a properly sized buffer.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let sz = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: as above.
            let r = unsafe { libc::read(sigfd, &mut info as *mut _ as *mut libc::c_void, sz) };
            if r == sz as isize {
                shared.finish(VmEnd::Signal(info.ssi_signo as i32));
            }
        }
        for (i, &fd) in sources.iter().enumerate() {
            if fds[4 + i].revents == 0 {
                continue;
            }
            if let Some((l, attach)) = shared.console.as_ref().filter(|(l, _)| l.as_raw_fd() == fd)
            {
                if let Ok((c, _)) = l.accept() {
                    let ours = c.try_clone();
                    let mut a = attach.lock().unwrap_or_else(|p| p.into_inner());
                    if let Ok(ours) = ours {
                        if a.attach(ours) {
                            client = Some(c);
                        }
                    }
                }
                continue;
            }
            let mut buf = [0u8; 256];
            // SAFETY: reading into a local buffer from stdin or the console client's socket.
            let r = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
            if r > 0 {
                pending.extend_from_slice(&buf[..r as usize]);
            } else if fd == 0 {
                stdin_open = false;
            } else if r == 0
                || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock
            {
                client = None;
                if let Some((_, attach)) = &shared.console {
                    attach.lock().unwrap_or_else(|p| p.into_inner()).detach();
                }
            }
        }
        if !pending.is_empty() {
            let n = shared
                .serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .enqueue_input(&pending);
            pending.drain(..n);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            let _ = shared.end_evt.read();
        }
        if let Some(inbox) = inbox.filter(|_| fds[2].revents & libc::POLLIN != 0) {
            let _ = inbox.evt.read();
            while let Ok((cmd, reply)) = inbox.rx.try_recv() {
                if let control::Command::DeviceRemove(r) = cmd {
                    ctl.device_remove(r, reply);
                    continue;
                }
                let _ = reply.send(ctl.execute(cmd));
                if let Some((end, written)) = ctl.end_after_answer.take() {
                    // The answer first (the VMM exits soon after the VM ends).
                    let _ = written.recv_timeout(control::REQUEST_TIMEOUT);
                    shared.finish(end);
                }
            }
        }
    }
}
