//! The daemon: the world table behind the REST API.
//!
//! | method and path | does |
//! |---|---|
//! | GET /v1/host | host status |
//! | POST /v1/host/shutdown | stop every VM, then the daemon, removing what it made outside its state directory ([`crate::shutdown`]) |
//! | GET /v1/host/memory | the memory lending policy ([`crate::lending`]): its settings, host free memory, its last action, and every live world's shares, active fraction, target, current, lent and borrowed memory |
//! | GET /v1/vms | every VM |
//! | POST /v1/vms | define a VM (body: a VM spec) |
//! | GET /v1/vms/{name} | one VM (with its served disks' settings and IOPS while it runs) |
//! | DELETE /v1/vms/{name} | forget a VM that is not running |
//! | POST /v1/vms/{name}/start, /stop | start or stop its VMM |
//! | POST /v1/vms/{name}/pause, /resume | park every vCPU and quiesce the devices, or continue (through the VMM's control socket) |
//! | POST /v1/vms/{name}/snapshot | save the VM into a named snapshot (body: `{"snapshot": NAME}`) |
//! | POST /v1/vms/{name}/restore | start a stopped VM from a snapshot (body: `{"snapshot": NAME}`) |
//! | POST /v1/vms/{name}/incoming | define VM `name` and start its VMM waiting for a live migration (body: `{"config": VmConfig, "listen"?: "ADDR:PORT"}`) |
//! | POST /v1/vms/{name}/migrate | move the running VM to another daemon (body: `{"to": "HOST:PORT", "token": T, "downtime_ms"?: N}`) |
//! | GET /v1/snapshots, DELETE /v1/snapshots/{snap} | the snapshots, and removing one |
//! | POST /v1/snapshots/{snap}/clone | start new VMs from a snapshot (body: `{"name": N, "count": C}`) |
//! | PATCH /v1/vms/{name} | change shares, reservation or limit, net and disk shares (live when running) |
//! | POST /v1/vms/{name}/devices | hot-plug a disk or a net into the running VM (body: `{"disk": {"path": IMG, "id": ID, "readonly"?: bool}}` or `{"net": {"network": N, "id": ID}}`): the daemon opens the image (or a switch port) and hands it to the VMM (201: `{"id", "slot"}`); once the VMM has it, it is kept in the VM's definition |
//! | DELETE /v1/vms/{name}/devices/{id} | unplug hot-plugged device `id` once the guest has ejected it (204), which then leaves the definition; of a VM that does not run, take device `id` out of its definition |
//! | GET, PUT /v1/vms/{name}/balloon | the running VM's memory target and current memory; a new target (body: `{"memory_target": SIZE}`), through its VMM's balloon |
//! | GET /v1/vms/{name}/stats | CPU accounting of one VM |
//! | PUT /v1/vms/{name}/devices/{dev}/path | switch the running VM's vhost-user net or disk `dev` between the direct and the interposed data path (body: `{"path": "direct"\|"interposed", "capture"?: FILE}`, FILE a `.pcap` or `.trace` file name written in the VM's folder), through its VMM |
//! | GET /v1/stats | CPU accounting of every running world, the system worlds (management, helper) included; each VM's served disks |
//! | GET /v1/history | the last 10 minutes, one point a second, of every running world ([`crate::history`]) |
//! | GET /v1/networks, POST /v1/networks | the networks, and making one (body: `{"name": N, "uplink"?: TAP, "uplink_rate"?: BPS}`) |
//! | GET /v1/networks/{net}, DELETE /v1/networks/{net} | one network with its ports (the VM of each, the switch's counters), and deleting one no VM uses |
//! | GET /metrics | the same and more (state, settings, KVM's exit counters per vCPU) for Prometheus ([`metrics`]) |
//!
//! Errors are JSON `{"error": "..."}` with 400 (malformed request or JSON, unknown fields),
//! 404, 405 (with `Allow`), 408 (request not received within [`REQUEST_TIMEOUT`]), 409
//! (duplicate name, wrong state, too many VMs) or 422 (a value out of range); 500 when the
//! host fails (saving the state, starting a process), always written to the daemon's log with
//! its cause. Query strings are ignored and path segments are %-decoded.
//!
//! Lifecycle operations on one VM (start, stop, pause, resume, delete) run one at a time, and
//! a VMM is only ever signalled through its pidfd ([`supervisor::Pidfd`]). At most
//! [`MAX_CONNECTIONS`] requests are served at once; the accept loops back off when the
//! daemon is out of descriptors.

use crate::helper;
use crate::history::{DeviceKind, DeviceReading};
use crate::http::{self, HttpError, Request};
use crate::metrics::{self, Samples};
use crate::network::{self, NetworkSpec};
use crate::place;
use crate::sched::{self, Cgroups, Demand};
use crate::shutdown::{self, SocketTrace, StateLock, Traces};
use crate::storage;
use crate::store::{Document, Store};
use crate::supervisor::{self, Pidfd};
use crate::world::{no_null, HotPlugged, State, VmSpec, World};
use serde_json::json;
use serde_json::value::RawValue;
use std::collections::{HashMap, HashSet};
use std::io::BufReader;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

mod memory;
mod migration;
pub mod web;
use web::Via;

/// Most VMs one daemon defines (each costs a share of every save of the state).
pub const MAX_VMS: usize = 512;
/// Most requests served at once (one thread each); more connections wait to be accepted.
pub const MAX_CONNECTIONS: usize = 32;
/// Time for a client to send its whole request, after which it is answered 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a VMM has to end after SIGTERM before it is killed (and again after SIGKILL).
const STOP_GRACE: Duration = Duration::from_secs(5);

/// What a running VM's VMM says of itself on its control socket (`GET /vm/counters`).
#[derive(Default)]
struct VmmReading {
    /// The disks and nets it serves (and, once `device_readings` added them, those the
    /// storage service and the switch serve for it).
    devices: Vec<DeviceReading>,
    /// The exits that reached it, by its own causes.
    exits: Vec<(String, u64)>,
    /// The ids of its hot-plugged devices; None when it did not say (no answer, or a VMM
    /// from before the field).
    hot: Option<Vec<String>>,
}

/// One run of a VMM: its pidfd, and whether the daemon has recorded its end (and why it
/// ended).
struct Run {
    pidfd: Pidfd,
    ended: Mutex<bool>,
    cv: Condvar,
    outcome: Mutex<Option<String>>,
}

impl Run {
    fn new(pidfd: Pidfd) -> Arc<Run> {
        Arc::new(Run {
            pidfd,
            ended: Mutex::new(false),
            cv: Condvar::new(),
            outcome: Mutex::new(None),
        })
    }

    /// Waits at most `t` for the daemon to record the end of this run; whether it has.
    fn wait(&self, t: Duration) -> bool {
        let g = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, t, |ended| !*ended)
            .unwrap_or_else(|p| p.into_inner());
        *g
    }

    fn end(&self, reason: &str) {
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_string());
        *self.ended.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }
}

/// The daemon's state.
pub struct Daemon {
    store: Store,
    doc: Mutex<Document>,
    wv: PathBuf,
    stopping: Mutex<HashSet<u64>>,
    socket: PathBuf,
    /// The cgroups that enforce the scheduler's decisions, or why there are none.
    cgroups: Result<Cgroups, String>,
    cpus: f64,
    ctl: Mutex<sched::Controller>,
    /// Where worlds' vCPU threads may run ([`crate::place`]), decided each scheduler tick.
    placement: Mutex<Placement>,
    /// The directories VMs' files must come from (empty: anywhere), canonical.
    images: std::sync::OnceLock<Vec<PathBuf>>,
    /// The users VMMs run as, jailed (`wv host --jail-uids FIRST-LAST`): world N's is FIRST+N.
    /// Unset: VMMs run as the daemon's user, unjailed (`--no-jail`, and library users).
    jail_uids: std::sync::OnceLock<(u32, u32)>,
    /// The token a client over TCP must send (`Authorization: Bearer …`), kept in the state
    /// directory with mode 0600 (`wv host token` shows it).
    token: String,
    /// The VMM runs, by world id, from start (or adoption) until their end is recorded.
    runs: Mutex<HashMap<u64, Arc<Run>>>,
    /// Per world id, held through each lifecycle operation so that they never interleave.
    lifecycle: Mutex<HashMap<u64, Arc<Mutex<()>>>>,
    /// The address the API listens on over TCP (`wv host --listen`), if it does: an incoming
    /// migration listens on its IP unless told otherwise.
    listen: std::sync::OnceLock<std::net::IpAddr>,
    /// Worlds whose VMM is sending them away, by id, with the target daemon's address: a
    /// VMM of theirs that exits 0 has handed its VM over ("migrated to HOST:PORT").
    migrating: Mutex<HashMap<u64, String>>,
    /// The state directory.
    state_dir: PathBuf,
    /// Held for the daemon's life: no second daemon, and no `wv host uninstall`, on this
    /// state directory meanwhile.
    _lock: StateLock,
    /// What this daemon made outside its state directory (kept in [`shutdown::TRACES_FILE`]).
    traces: Mutex<Traces>,
    /// Set once the daemon is ending: no VM starts any more.
    closing: std::sync::atomic::AtomicBool,
    /// Whether [`Daemon::close`] has run; held while it runs.
    closed: Mutex<bool>,
    /// The last 10 minutes of every running world, for the web console's plots.
    history: Mutex<crate::history::History>,
    /// The `Host`s the web console answers to (`wv host --web`).
    web_hosts: std::sync::OnceLock<Vec<String>>,
    /// The switch world, which serves the networks.
    switch: network::Supervisor,
    /// The switch ports of each running world (network, port), by world id.
    ports: Mutex<HashMap<u64, Vec<(String, String)>>>,
    /// The storage world, which serves the disks given `via=storage`.
    storage: storage::Supervisor,
    /// The storage service's disks of each running world (their names), by world id.
    served: Mutex<HashMap<u64, Vec<String>>>,
    /// What serves the hot-plugged devices of each running world (by device id), by world
    /// id; the ports are in `ports` and the disks in `served` too.
    hot: Mutex<HashMap<u64, Vec<(String, HotBackend)>>>,
    /// The memory lending policy's settings and state ([`crate::lending`]).
    lending: Mutex<memory::Lending>,
}

/// Whether a run of a VM defined by `c` has its memory shared with its backends (what its
/// VMM's configuration has once the daemon gave its nets ports and its served disks sockets):
/// what a hot-plugged net or served disk needs.
fn runs_shared(c: &wv_config::VmConfig) -> bool {
    c.memory_is_shared()
        || c.nets.iter().any(|n| n.network.is_some())
        || c.disks.iter().any(|d| d.via == wv_config::DiskVia::Storage)
}

/// The answer for a hot-plug that needs the VM's memory shared when it is not.
fn not_shared(name: &str, what: &str) -> Reply {
    error(
        422,
        format!(
            "VM '{name}' runs with memory of its own (no net on a network or served disk at \
             its start, no memory_shared): {what} needs guest memory shared with its backend; \
             define the VM with memory_shared (wv vm create --memory-shared on) to hot-plug one"
        ),
    )
}

/// What serves a hot-plugged device for the daemon.
enum HotBackend {
    /// A net's switch port.
    Port { net: String, port: String },
    /// A disk of the storage service.
    Disk { name: String },
}

/// What serves hot-plugged device `h` of world `w`, as [`Daemon::record_hot`] recorded it: its
/// switch port on its net's network, or its name in the storage service; None for a device
/// its VMM serves alone.
fn hot_backend(w: &World, h: &HotPlugged) -> Option<(String, HotBackend)> {
    let b = if let Some(port) = &h.port {
        let net = w
            .spec
            .config
            .nets
            .iter()
            .find(|n| n.name() == h.id)?
            .network
            .clone()?;
        HotBackend::Port {
            net,
            port: port.clone(),
        }
    } else {
        HotBackend::Disk {
            name: h.served.clone()?,
        }
    };
    Some((h.id.clone(), b))
}

/// Whether `id` names one of the disks or nets of `c` (the VMM takes it for either).
fn device_id_taken(c: &wv_config::VmConfig, id: &str) -> bool {
    c.disks.iter().any(|d| d.id == id) || c.nets.iter().any(|n| n.name() == id)
}

/// How many of the disks and nets of `c` are named `id` (a net without an id is named after
/// its network, so several may be).
fn devices_named(c: &wv_config::VmConfig, id: &str) -> usize {
    c.disks.iter().filter(|d| d.id == id).count() + c.nets.iter().filter(|n| n.name() == id).count()
}

/// Takes device `id` out of `c`; whether it was there.
fn drop_device(c: &mut wv_config::VmConfig, id: &str) -> bool {
    let before = c.disks.len() + c.nets.len();
    c.disks.retain(|d| d.id != id);
    c.nets.retain(|n| n.name() != id);
    c.disks.len() + c.nets.len() != before
}

/// The body of `PUT /v1/vms/{name}/devices/{dev}/path`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DevicePath {
    path: String,
    #[serde(default)]
    capture: Option<String>,
}

/// Whether `f` may name a capture file in a VM's folder: a plain name (no directory, not
/// hidden) ending in `.pcap` or `.trace`, so that it can never be one of the daemon's files.
fn capture_name(f: &str) -> bool {
    (f.ends_with(".pcap") || f.ends_with(".trace"))
        && f.len() <= 128
        && !f.starts_with('.')
        && f.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// A change of scheduler settings (`PATCH /v1/vms/{name}`); `limit` null (or 0) removes the
/// limit. `limit` is kept as written, so that a number too small for an f64 (1e-400) is
/// refused rather than read as 0.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceUpdate {
    #[serde(default, deserialize_with = "no_null")]
    shares: Option<u32>,
    #[serde(default, deserialize_with = "no_null")]
    reservation: Option<f64>,
    #[serde(default, deserialize_with = "no_null")]
    limit: Option<Box<RawValue>>,
    /// Network shares of each of its switch ports.
    #[serde(default, deserialize_with = "no_null")]
    net_shares: Option<u32>,
    /// Bits per second; 0 removes the reservation.
    #[serde(default, deserialize_with = "no_null")]
    net_reservation: Option<u64>,
    /// Bits per second; 0 removes the limit.
    #[serde(default, deserialize_with = "no_null")]
    net_limit: Option<u64>,
    /// Storage shares of each of its served disks.
    #[serde(default, deserialize_with = "no_null")]
    disk_shares: Option<u32>,
    /// I/Os per second; 0 removes the reservation.
    #[serde(default, deserialize_with = "no_null")]
    disk_reservation_iops: Option<u64>,
    /// I/Os per second; 0 removes the limit.
    #[serde(default, deserialize_with = "no_null")]
    disk_limit_iops: Option<u64>,
}

/// What a `limit` in a PATCH asks for: `Ok(None)` removes the limit.
fn parse_limit(raw: &RawValue) -> Result<Option<f64>, Reply> {
    let text = raw.get().trim();
    if text == "null" {
        return Ok(None);
    }
    let v: f64 = serde_json::from_str(text).map_err(|_| {
        error(
            400,
            format!("invalid settings: limit {text} is not a number"),
        )
    })?;
    if v != 0.0 {
        return Ok(Some(v));
    }
    let mantissa = text.split(['e', 'E']).next().unwrap_or(text);
    if mantissa.bytes().all(|b| b"+-0.".contains(&b)) {
        Ok(None)
    } else {
        Err(error(
            422,
            format!(
                "limit {text} out of range: 0 or null removes the limit, otherwise at least 0.01"
            ),
        ))
    }
}

/// What a restarted daemon records of an incoming VM whose VMM ended while it was down (the
/// VM is then removed).
const INCOMING_LOST: &str = "its incoming migration ended while the daemon was down";
/// Time an incoming VM's VMM has to start listening.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the target daemon has for each step of a request (connecting, each read and write).
const TARGET_TIMEOUT: Duration = Duration::from_secs(30);
/// Time the target has, after the hand-over, to report its VM running.
const TARGET_RUNNING_TIMEOUT: Duration = Duration::from_secs(10);

/// The file in a snapshot's folder where the daemon records what it is.
const SNAPSHOT_META: &str = "snapshot.json";
/// Most clones one request starts.
const MAX_CLONES: u32 = 64;

/// The folder, in a VM's own folder, of hard links to the files of the snapshot its VMM is
/// starting from ([`hold_snapshot`]).
const RESTORING: &str = "restoring";

/// Links every file of the snapshot folder `snap` into `vm_dir/restoring` (made anew) and
/// returns that folder, which the VMM is then started from. A restore answers once its VMM is
/// started, before it has opened the snapshot's files: without these links, a snapshot
/// deleted at once (`DELETE /v1/snapshots/{snap}` is allowed while VMs run from it) took them
/// away from the VMM, which then ended with "cannot open .../memory" and left the VM crashed.
/// The links cost no space while the snapshot lives and are removed once the VMM holds the
/// files ([`release_snapshot`]).
fn hold_snapshot(snap: &Path, vm_dir: &Path) -> std::io::Result<PathBuf> {
    release_snapshot(vm_dir);
    let to = vm_dir.join(RESTORING);
    std::fs::create_dir(&to)?;
    let linked = std::fs::read_dir(snap).and_then(|entries| {
        for e in entries {
            let e = e?;
            if e.file_type()?.is_file() {
                std::fs::hard_link(e.path(), to.join(e.file_name()))?;
            }
        }
        Ok(())
    });
    match linked {
        Ok(()) => Ok(to),
        Err(e) => {
            release_snapshot(vm_dir);
            Err(e)
        }
    }
}

/// Removes the links [`hold_snapshot`] made for a VMM that now holds its snapshot's files (or
/// has ended), so that they do not keep a deleted snapshot's disk space.
fn release_snapshot(vm_dir: &Path) {
    let _ = std::fs::remove_dir_all(vm_dir.join(RESTORING));
}

/// What the daemon records of a snapshot it took (`snapshots/NAME/snapshot.json`).
#[derive(serde::Serialize, serde::Deserialize)]
struct SnapshotMeta {
    name: String,
    /// The VM it was taken of.
    vm: String,
    /// Seconds since the epoch.
    created: u64,
    memory_bytes: u64,
    state_bytes: u64,
    duration_ms: f64,
    /// The VM's configuration (what a restore or clone runs).
    config: wv_config::VmConfig,
}

/// The switch ports of world `w`'s nets on the daemon's networks: (network, port).
fn switch_ports(w: &World) -> Vec<(String, String)> {
    net_ports(w).into_iter().map(|(_, n, p)| (n, p)).collect()
}

/// World `w`'s nets on the daemon's networks: (the net's name, the network, its switch port).
/// A net its run started with has the port of its place in the definition; one hot-plugged
/// into the run, the port recorded for it ([`World::hot`]).
fn net_ports(w: &World) -> Vec<(String, String, String)> {
    w.spec
        .config
        .nets
        .iter()
        .enumerate()
        .filter_map(|(i, n)| {
            let name = n.name();
            let port = match w.hot.iter().find(|h| h.id == name) {
                Some(h) => h.port.clone()?,
                None => network::port_name(w.id, i),
            };
            Some((name, n.network.clone()?, port))
        })
        .collect()
}

/// The disks of world `w` that the storage service serves: (index, the service's name for
/// it, its source text). A disk hot-plugged into the run has the name recorded for it
/// ([`World::hot`]).
fn served_disks(w: &World) -> Vec<(usize, String, String)> {
    w.spec
        .config
        .disks
        .iter()
        .enumerate()
        .filter(|(_, d)| d.via == wv_config::DiskVia::Storage)
        .filter_map(|(i, d)| {
            let name = match w.hot.iter().find(|h| h.id == d.id) {
                Some(h) => h.served.clone()?,
                None => storage::disk_name(w.id, i),
            };
            Some((i, name, storage::disk_source(d)))
        })
        .collect()
}

/// Drops the switch sockets a VMM's configuration (or a snapshot's) names for nets on the
/// daemon's networks: a definition names the network only, and each start gives its own port.
fn forget_switch_sockets(c: &mut wv_config::VmConfig) {
    for n in &mut c.nets {
        if n.network.is_some() {
            n.vhost_user = None;
        }
    }
}

/// The folder, in a VM's folder, that the disks a migration copies (`copy_disks`) land in.
pub(crate) const COPIED_DISKS: &str = "disks";

/// Where a VMM takes its VM from ([`Daemon::start_with`]).
enum StartFrom<'a> {
    /// Boots the VM's definition.
    Definition,
    /// The snapshot of this name, as a clone (a new identity) or not.
    Snapshot(&'a str, bool),
    /// A live migration, listening on this `ADDR:PORT`; copying the VM's disks or not.
    Incoming(&'a str, bool),
}

/// `POST /v1/vms/{name}/incoming`: the VM's configuration (as `POST /v1/vms` reads it,
/// without the name) and scheduler settings, and where its VMM listens.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct IncomingRequest {
    config: serde_json::Map<String, serde_json::Value>,
    #[serde(default, deserialize_with = "no_null")]
    listen: Option<String>,
    #[serde(default, deserialize_with = "no_null")]
    shares: Option<u32>,
    #[serde(default, deserialize_with = "no_null")]
    reservation: Option<f64>,
    #[serde(default, deserialize_with = "no_null")]
    limit: Option<f64>,
    /// The source copies the VM's writable disks (`--copy-disks`): they land in the VM's
    /// folder (raw images) and in `datastore` (VMKFS disks).
    #[serde(default, deserialize_with = "no_null")]
    copy_disks: Option<bool>,
    #[serde(default, deserialize_with = "no_null")]
    datastore: Option<String>,
}

/// `POST /v1/vms/{name}/migrate`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateRequest {
    /// The target daemon's API over TCP, `HOST:PORT`.
    to: String,
    /// The target daemon's token (`wv host token` there).
    token: String,
    #[serde(default, deserialize_with = "no_null")]
    downtime_ms: Option<u64>,
    /// Copy the VM's writable disks to the target (no shared storage).
    #[serde(default, deserialize_with = "no_null")]
    copy_disks: Option<bool>,
    /// With `copy_disks`: the target's datastore for the VM's VMKFS disks.
    #[serde(default, deserialize_with = "no_null")]
    datastore: Option<String>,
}

/// `POST /v1/vms/{name}/snapshot`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotRequest {
    snapshot: String,
    #[serde(default)]
    allow_raw_disk: bool,
}

/// `POST /v1/vms/{name}/restore`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreRequest {
    snapshot: String,
}

/// `POST /v1/snapshots/{snap}/clone`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CloneRequest {
    name: String,
    #[serde(default = "one")]
    count: u32,
}

fn one() -> u32 {
    1
}

/// CPU accounting of one world.
#[derive(serde::Serialize)]
struct WorldStats {
    id: u64,
    name: String,
    state: State,
    shares: u32,
    reservation: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<f64>,
    /// CPUs it is entitled to right now if it competes.
    entitlement: f64,
    cpu_ns: u64,
    ready_ns: u64,
    throttled_ns: u64,
    threads: Vec<sched::ThreadTime>,
    /// Its disks the storage service serves, with their settings and what they got
    /// ([`Daemon::served_disk_stats`]); none for a system world.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    served_disks: Vec<serde_json::Value>,
}

/// Whether the VMM of `run` still runs.
/// How long the samplers wait for a VMM's `GET /vm/counters` (each second, for the history;
/// at each scrape of `/metrics`): a VMM that does not answer within it has its devices left
/// out of that reading.
const VMM_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// A running VM as the samplers read it ([`Daemon::live_vms`]).
struct LiveVm {
    id: u64,
    name: String,
    pid: u32,
    run: Arc<Run>,
    /// Its disks the storage service serves: (the disk's id, the service's name for it).
    served_disks: Vec<(String, String)>,
    /// Its nets on the daemon's networks: (the net's name, the network, the switch's port).
    ports: Vec<(String, String, String)>,
}

fn alive_now(run: &Run) -> bool {
    !run.pidfd.wait(Some(Duration::ZERO))
}

fn is_live(s: State) -> bool {
    matches!(s, State::Running | State::Starting | State::Paused)
}

/// A stable tag for a state directory (FNV-1a), naming its cgroup.
fn tag(p: &Path) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in p.as_os_str().as_encoded_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

type Reply = (u16, String);

/// Parses a request body that must be a JSON object (serde would also take a struct from an
/// array, `["a"]` for `{"name":"a"}`, which the API document does not allow).
fn object<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, Reply> {
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(error(
            400,
            format!("invalid {what}: expected a JSON object"),
        ));
    }
    serde_json::from_slice(body).map_err(|e| error(400, format!("invalid {what}: {e}")))
}

/// The body of `PUT /v1/vms/{name}/balloon`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryTarget {
    /// Memory the guest is to keep: bytes, or a size such as `512M`.
    memory_target: Size,
}

/// The body of `PUT /v1/host/storage`: the default capacity of every device, or one device's
/// own (`null`: the default again).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StorageCapacity {
    /// A datastore's path or `raw`; absent: the default of every device.
    #[serde(default)]
    device: Option<String>,
    /// I/Os per second (0: none); `null` with a device: the default again. Required: the
    /// outer `None` is its absence.
    #[serde(default, deserialize_with = "present")]
    capacity_iops: Option<Option<u64>>,
}

/// A field that may be `null` but must be there: `Some(value)` when present (`Some(None)` for
/// `null`), the field's default (`None`) when absent.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(d).map(Some)
}

/// A size given as a number of bytes or as text (`512M`).
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    fn bytes(&self) -> Result<u64, String> {
        match self {
            Size::Bytes(b) => Ok(*b),
            Size::Text(t) => wv_config::parse_size(t).map_err(|e| e.to_string()),
        }
    }
}

/// An answer: status, extra headers, body.
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Extra header lines (`Allow: GET`).
    pub headers: Vec<String>,
    /// JSON body (empty for 204).
    pub body: String,
    /// The daemon ends once this answer is written (`POST /v1/host/shutdown`).
    pub exit: bool,
}

impl From<Reply> for Answer {
    fn from((status, body): Reply) -> Answer {
        Answer {
            status,
            headers: Vec::new(),
            body,
            exit: false,
        }
    }
}

/// The methods a path supports, or `None` when no such resource exists.
fn allowed(parts: &[&str]) -> Option<&'static [&'static str]> {
    Some(match parts {
        ["v1", "host"]
        | ["v1", "host", "memory"]
        | ["v1", "stats"]
        | ["v1", "history"]
        | ["v1", "vms", _, "stats"]
        | ["metrics"] => &["GET"],
        ["v1", "host", "shutdown"] => &["POST"],
        ["v1", "host", "storage"] => &["GET", "PUT"],
        ["v1", "vms"] => &["GET", "POST"],
        ["v1", "vms", _] => &["GET", "PATCH", "DELETE"],
        ["v1", "vms", _, "balloon"] => &["GET", "PUT"],
        ["v1", "vms", _, "devices"] => &["POST"],
        ["v1", "vms", _, "devices", _] => &["DELETE"],
        ["v1", "vms", _, "devices", _, "path"] => &["PUT"],
        ["v1", "vms", _, "start" | "stop" | "pause" | "resume" | "snapshot" | "restore" | "incoming" | "migrate"] => {
            &["POST"]
        }
        ["v1", "networks"] => &["GET", "POST"],
        ["v1", "networks", _] => &["GET", "DELETE"],
        ["v1", "snapshots"] => &["GET"],
        ["v1", "snapshots", _] => &["DELETE"],
        ["v1", "snapshots", _, "clone"] => &["POST"],
        _ => return None,
    })
}

fn error(status: u16, msg: impl std::fmt::Display) -> Reply {
    (status, json!({ "error": msg.to_string() }).to_string())
}

fn ok<T: serde::Serialize>(status: u16, v: &T) -> Reply {
    (
        status,
        serde_json::to_string(v).unwrap_or_else(|e| json!({ "error": e.to_string() }).to_string()),
    )
}

/// The placement state of the scheduler's loop.
struct Placement {
    mode: place::Mode,
    placer: place::Placer,
    /// The CPUs the daemon may use (its affinity when it started); those online are placed on.
    allowed: Vec<usize>,
    /// Each world's CPU and ready time at the last tick, ns.
    prev: HashMap<u64, (u64, u64)>,
    /// The affinity last set on each vCPU thread (host CPU numbers).
    applied: HashMap<u32, Vec<usize>>,
    /// Weight factors of worlds time-shared between two CPUs this tick.
    factors: HashMap<u64, f64>,
    /// Worlds whose placement failed once (said once).
    warned: HashSet<u64>,
    /// `WV_PLACE_TRACE=FILE`: one line per tick per world (its use, the CPU its vCPU threads
    /// last ran on and the CPUs placement gives it), to trace placement misses.
    trace: Option<std::fs::File>,
}

/// A running world as one tick of the scheduler's loop sees it: copied out under the
/// document lock, its threads read after it.
struct Ticked {
    id: u64,
    name: String,
    /// The VM's process (a jail's keeper for a jailed VM).
    pid: Option<u32>,
    demand: Demand,
    entitlement: f64,
    /// The VMM process whose threads are the VM's.
    vmm: Option<u32>,
    /// Its threads this tick.
    threads: Vec<sched::ThreadTime>,
}

impl Placement {
    fn new() -> Placement {
        Placement {
            mode: place::Mode::default(),
            placer: place::Placer::default(),
            allowed: place::allowed_cpus(),
            prev: HashMap::new(),
            applied: HashMap::new(),
            factors: HashMap::new(),
            warned: HashSet::new(),
            trace: std::env::var_os("WV_PLACE_TRACE").and_then(|f| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(f)
                    .ok()
            }),
        }
    }
}

impl Daemon {
    /// Loads the state directory and re-adopts the VMMs a previous daemon left running (or
    /// records that they ended while it was down).
    pub fn open(state_dir: &Path, socket: &Path, wv: PathBuf) -> std::io::Result<Arc<Daemon>> {
        let store = Store::open(state_dir)?;
        let lock = StateLock::take(state_dir)?;
        let doc = store.load()?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let cgroups = Cgroups::open(&cgroup_name(state_dir), cpus);
        let cgroups = cgroups.and_then(|c| c.system().map(|()| c));
        if let Err(e) = &cgroups {
            eprintln!("wv host: CPU scheduler unavailable (VMs with settings other than the default shares cannot start): {e}");
        }
        let token = api_token(state_dir)?;
        let place = |name: &'static str,
                     shares: u32|
         -> Box<dyn Fn(u32) -> Result<(), String> + Send + Sync> {
            match &cgroups {
                Ok(cg) => {
                    let cg = cg.clone();
                    Box::new(move |pid| cg.attach_service(name, shares, pid))
                }
                Err(_) => Box::new(|_| Ok(())),
            }
        };
        let switch = network::Supervisor::new(
            wv.clone(),
            state_dir,
            place("switch", network::SWITCH_SHARES),
        )?;
        let storage = storage::Supervisor::new(
            wv.clone(),
            state_dir,
            place("storage", storage::STORAGE_SHARES),
        )?;
        let d = Arc::new(Daemon {
            switch,
            ports: Mutex::default(),
            storage,
            served: Mutex::default(),
            hot: Mutex::default(),
            lending: Mutex::default(),
            images: std::sync::OnceLock::new(),
            jail_uids: std::sync::OnceLock::new(),
            token,
            store,
            doc: Mutex::new(doc),
            wv,
            stopping: Mutex::default(),
            socket: socket.to_path_buf(),
            cgroups,
            cpus,
            ctl: Mutex::default(),
            placement: Mutex::new(Placement::new()),
            runs: Mutex::default(),
            lifecycle: Mutex::default(),
            listen: std::sync::OnceLock::new(),
            migrating: Mutex::default(),
            state_dir: state_dir.to_path_buf(),
            _lock: lock,
            traces: Mutex::new(Traces::load(state_dir)),
            closing: std::sync::atomic::AtomicBool::new(false),
            closed: Mutex::new(false),
            history: Mutex::default(),
            web_hosts: std::sync::OnceLock::new(),
        });
        // Jailed VMMs cannot connect to a restarted switch's or storage service's sockets
        // by themselves: the daemon hands them the connections.
        for switch in [true, false] {
            let weak = Arc::downgrade(&d);
            let hand: Arc<dyn Fn(u32) + Send + Sync> = Arc::new(move |pid| {
                if let Some(d) = weak.upgrade() {
                    d.hand_backends(switch, pid);
                }
            });
            if switch {
                d.switch.on_restart(hand);
            } else {
                d.storage.on_restart(hand);
            }
        }
        // From here SIGTERM and SIGINT remove what the daemon made (its cgroups so far).
        let d2 = d.clone();
        shutdown::signals::on_termination(move || d2.close());
        let mut adopt = Vec::new();
        let mut incoming = Vec::new();
        {
            let mut doc = d.lock();
            // Ids below FIRST_VM_ID belong to the system worlds; a state directory written
            // before they were numbered may hold a VM with one.
            let above = doc.worlds.iter().map(|w| w.id + 1).max().unwrap_or(0);
            doc.next_id = doc.next_id.max(helper::FIRST_VM_ID).max(above);
            for i in 0..doc.worlds.len() {
                if doc.worlds[i].id < helper::FIRST_VM_ID {
                    doc.worlds[i].id = doc.next_id;
                    doc.next_id += 1;
                }
            }
            for w in doc.worlds.iter_mut() {
                if !matches!(w.state, State::Running | State::Starting | State::Paused) {
                    continue;
                }
                // The pidfd first, then the check: a pid reused before the pidfd was opened
                // fails the check; after, it cannot be reused while we hold the pidfd.
                let ours = w.pid.and_then(|pid| {
                    let fd = Pidfd::open(pid).ok()?;
                    let dir = d.store.vm_dir(&w.spec.name).ok()?;
                    supervisor::is_our_vmm(pid, &dir).then_some((pid, fd))
                });
                match ours {
                    Some((pid, fd)) => {
                        if w.state == State::Starting {
                            incoming.push((w.id, w.spec.name.clone()));
                        }
                        adopt.push((w.id, pid, Run::new(fd)));
                    }
                    None => {
                        w.reason = Some(if w.state == State::Starting {
                            INCOMING_LOST.into()
                        } else {
                            "the VMM ended while the daemon was down".into()
                        });
                        w.state = State::Stopped;
                        w.pid = None;
                        w.console = None;
                        w.hot.clear();
                    }
                }
            }
            // An incoming VM whose VMM ended while the daemon was down never ran here: it goes,
            // as it would have had the daemon seen it end.
            let gone: Vec<(u64, String)> = doc
                .worlds
                .iter()
                .filter(|w| w.state == State::Stopped && w.reason.as_deref() == Some(INCOMING_LOST))
                .map(|w| (w.id, w.spec.name.clone()))
                .collect();
            doc.worlds
                .retain(|w| !gone.iter().any(|(id, _)| *id == w.id));
            for (id, name) in &gone {
                eprintln!("wv host: VM '{name}': its incoming migration ended while the daemon was down; the VM is removed");
                if let Err(e) = d.store.discard_vm_dir(name, *id) {
                    eprintln!("wv host: leaving the files of VM '{name}' alone: {e}");
                }
            }
            d.store.save(&doc)?;
            if let Ok(cg) = &d.cgroups {
                for w in doc.worlds.iter().filter(|w| !is_live(w.state)) {
                    cg.remove(w.id);
                }
                for (id, pid, _) in &adopt {
                    let (id, pid) = (*id, *pid);
                    if let Err(e) = cg.attach(id, pid) {
                        eprintln!("wv host: world {id}: {e}");
                    }
                }
            }
            d.rebalance(&doc);
            // The switch serves the networks, and the ports of the VMs still running (with
            // their settings).
            let mut all = Vec::new();
            let mut shares = Vec::new();
            for (id, _, _) in &adopt {
                if let Some(w) = doc.worlds.iter().find(|w| w.id == *id) {
                    let ports = switch_ports(w);
                    let s = w.spec.net_shares();
                    if s.any() {
                        shares.extend(ports.iter().map(|(n, p)| (n.clone(), p.clone(), s)));
                    }
                    all.extend(ports.iter().cloned());
                    d.ports
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(*id, ports);
                }
            }
            d.switch.restore(doc.networks.clone(), all, shares);
            // The storage service serves the disks of the VMs still running.
            let mut disks = Vec::new();
            let mut shares = Vec::new();
            for (id, _, _) in &adopt {
                if let Some(w) = doc.worlds.iter().find(|w| w.id == *id) {
                    let mine = served_disks(w);
                    disks.extend(mine.iter().map(|(_, n, s)| (n.clone(), s.clone())));
                    let s = w.spec.disk_shares();
                    if s.any() {
                        shares.extend(mine.iter().map(|(_, n, _)| (n.clone(), s)));
                    }
                    d.served
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(*id, mine.into_iter().map(|(_, n, _)| n).collect());
                }
            }
            if !disks.is_empty() {
                d.storage.restore(disks, shares);
            }
            // What serves the devices hot-plugged into the runs (served above with the rest),
            // for their removal.
            for (id, _, _) in &adopt {
                if let Some(w) = doc.worlds.iter().find(|w| w.id == *id) {
                    let backends: Vec<(String, HotBackend)> =
                        w.hot.iter().filter_map(|h| hot_backend(w, h)).collect();
                    if !backends.is_empty() {
                        d.hot
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(*id, backends);
                    }
                }
            }
        }
        if d.cgroups.is_ok() {
            let d2 = d.clone();
            helper::spawn("sched", move || d2.schedule())?;
        }
        for (id, _, run) in adopt {
            d.runs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, run.clone());
            if let Some((_, name)) = incoming.iter().find(|(i, _)| *i == id) {
                let (d2, run2, name) = (d.clone(), run.clone(), name.clone());
                helper::spawn("incoming", move || d2.await_guest(id, &name, &run2))?;
            }
            let d2 = d.clone();
            helper::spawn("wait", move || {
                supervisor::wait_foreign(&run.pidfd);
                d2.finished(id, None);
            })?;
        }
        let d2 = d.clone();
        helper::spawn("history", move || loop {
            std::thread::sleep(Duration::from_secs(1));
            d2.sample_history();
        })?;
        // Folders of deleted VMs that a previous daemon did not finish removing.
        let d2 = d.clone();
        helper::spawn("cleanup", move || {
            if let Err(e) = d2.store.remove_trash(None) {
                eprintln!("wv host: emptying the trash of the state directory: {e}");
            }
        })?;
        Ok(d)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Document> {
        self.doc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lifecycle lock of the VM named `name` (404 when there is none) and its world id.
    /// Hold the returned mutex's guard through the whole operation.
    fn lifecycle(&self, name: &str) -> Result<(u64, Arc<Mutex<()>>), Reply> {
        let id = self
            .lock()
            .worlds
            .iter()
            .find(|w| w.spec.name == name)
            .map(|w| w.id)
            .ok_or_else(|| error(404, format!("no VM named '{name}'")))?;
        let m = self
            .lifecycle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default()
            .clone();
        Ok((id, m))
    }

    /// The world `id` under the document lock, if it still exists (it may have been deleted
    /// while the caller waited for its lifecycle lock).
    fn world<'a>(doc: &'a mut Document, id: u64, name: &str) -> Result<&'a mut World, Reply> {
        doc.worlds
            .iter_mut()
            .find(|w| w.id == id)
            .ok_or_else(|| error(404, format!("no VM named '{name}'")))
    }

    fn run_of(&self, id: u64) -> Option<Arc<Run>> {
        self.runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    fn save(&self, doc: &Document) -> Result<(), Reply> {
        self.store
            .save(doc)
            .map_err(|e| error(500, format!("saving the state: {e}")))
    }

    /// Records the end of a VMM run (`status` None for a re-adopted process). A VMM that was
    /// sending its VM away and exits 0 has handed it over ("migrated to HOST:PORT"); an
    /// incoming VM whose VMM ends before its guest ran (the migration failed or was called
    /// off) is removed, definition and folder: the operator never created it.
    fn finished(&self, id: u64, status: Option<std::process::ExitStatus>) {
        let requested = self
            .stopping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let migrated_to = self
            .migrating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let mut doc = self.lock();
        let run = self
            .runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let Some(i) = doc.worlds.iter().position(|w| w.id == id) else {
            if let Some(r) = run {
                r.end("the VM was deleted");
            }
            return;
        };
        let w = &mut doc.worlds[i];
        let vm_dir = self.store.vm_dir(&w.spec.name).unwrap_or_default();
        release_snapshot(&vm_dir);
        let log = vm_dir.join("vmm.log");
        let (crashed, reason) = match status {
            Some(s) if s.code() == Some(0) && migrated_to.is_some() => (
                false,
                format!("migrated to {}", migrated_to.unwrap_or_default()),
            ),
            Some(s) => supervisor::classify(s, requested, &log),
            None if requested => (false, "stopped on request".into()),
            None => (
                false,
                "the VMM ended (re-adopted after a daemon restart: exit status unknown)".into(),
            ),
        };
        if w.state == State::Starting {
            let name = w.spec.name.clone();
            doc.worlds.remove(i);
            eprintln!(
                "wv host: VM '{name}': its incoming migration did not complete ({reason}); the VM is removed"
            );
            if let Err(e) = self.store.save(&doc) {
                eprintln!("wv host: world {id}: saving the state after its removal: {e}");
            }
            self.discard_files(&name, id);
        } else {
            w.state = if crashed {
                State::Crashed
            } else {
                State::Stopped
            };
            w.pid = None;
            w.console = None;
            w.hot.clear();
            w.reason = Some(reason.clone());
            if let Err(e) = self.store.save(&doc) {
                eprintln!("wv host: world {id}: saving the state after its VMM ended: {e}");
            }
        }
        if let Ok(cg) = &self.cgroups {
            cg.remove(id);
        }
        self.rebalance(&doc);
        drop(doc);
        self.release_ports(id);
        if let Some(r) = run {
            r.end(&reason);
        }
    }

    /// The switch port or the storage service's disk behind world `id`'s hot-plugged device
    /// `dev`, which the guest has let go of.
    fn release_hot(&self, id: u64, dev: &str) {
        let hot = {
            let mut h = self.hot.lock().unwrap_or_else(|p| p.into_inner());
            let Some(v) = h.get_mut(&id) else { return };
            let Some(i) = v.iter().position(|(d, _)| d == dev) else {
                return;
            };
            v.remove(i).1
        };
        match hot {
            HotBackend::Port { net, port } => {
                if let Some(v) = self
                    .ports
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(&id)
                {
                    v.retain(|(n, p)| !(*n == net && *p == port));
                }
                self.switch.del_port(&net, &port);
            }
            HotBackend::Disk { name } => {
                if let Some(v) = self
                    .served
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(&id)
                {
                    v.retain(|n| *n != name);
                }
                self.storage.del_disk(&name);
            }
        }
    }

    /// Removes the switch ports and the storage service's disks of world `id`'s run (it
    /// ended, or never started), hot-plugged ones included: the disks are let go of, for
    /// another VM to take.
    fn release_ports(&self, id: u64) {
        self.hot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let ports = self
            .ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        for (net, port) in ports.unwrap_or_default() {
            self.switch.del_port(&net, &port);
        }
        let disks = self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        for name in disks.unwrap_or_default() {
            self.storage.del_disk(&name);
        }
    }

    /// `GET /v1/networks`.
    fn networks(&self) -> Reply {
        ok(200, &self.lock().networks)
    }

    /// `POST /v1/networks`: a new network (201), served by the switch at once.
    fn create_network(&self, body: &[u8]) -> Reply {
        let spec: NetworkSpec = match object(body, "network") {
            Ok(s) => s,
            Err(r) => return r,
        };
        if let Err(e) = spec.validate(self.switch.dir()) {
            return error(422, e);
        }
        let mut doc = self.lock();
        if doc.networks.iter().any(|n| n.name == spec.name) {
            return error(
                409,
                format!("a network named '{}' exists already", spec.name),
            );
        }
        if doc.networks.len() >= network::MAX_NETWORKS {
            return error(
                409,
                format!(
                    "this daemon holds {} networks, its most: delete one first",
                    network::MAX_NETWORKS
                ),
            );
        }
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            return error(409, "the daemon is shutting down");
        }
        if let Err(e) = self.switch.add_network(&spec) {
            return error(500, format!("network '{}': {e}", spec.name));
        }
        doc.networks.push(spec.clone());
        if let Err(e) = self.save(&doc) {
            doc.networks.pop();
            let _ = self.switch.del_network(&spec.name);
            return e;
        }
        ok(201, &spec)
    }

    /// The VMs whose definition has a net on network `name`.
    fn users_of(doc: &Document, name: &str) -> Vec<String> {
        doc.worlds
            .iter()
            .filter(|w| {
                w.spec
                    .config
                    .nets
                    .iter()
                    .any(|n| n.network.as_deref() == Some(name))
            })
            .map(|w| w.spec.name.clone())
            .collect()
    }

    /// `GET /v1/networks/{net}`: the network, its ports with the VM of each and the
    /// switch's counters, and the VMs defined on it.
    fn network_info(&self, name: &str) -> Reply {
        let (spec, vms, owners) = {
            let doc = self.lock();
            let Some(spec) = doc.networks.iter().find(|n| n.name == name).cloned() else {
                return error(404, format!("no network named '{name}'"));
            };
            let ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
            let owners: HashMap<String, String> = ports
                .iter()
                .flat_map(|(id, ps)| {
                    let vm = doc
                        .worlds
                        .iter()
                        .find(|w| w.id == *id)
                        .map(|w| w.spec.name.clone())
                        .unwrap_or_default();
                    ps.iter()
                        .filter(|(n, _)| n == name)
                        .map(move |(_, p)| (p.clone(), vm.clone()))
                })
                .collect();
            (spec, Self::users_of(&doc, name), owners)
        };
        let (ports, switch_error) = match self.switch.ports() {
            Ok(all) => (
                all.into_iter()
                    .filter(|p| p["network"] == name)
                    .map(|mut p| {
                        let vm = p["port"]
                            .as_str()
                            .and_then(|port| owners.get(port))
                            .cloned();
                        p["vm"] = json!(vm);
                        p
                    })
                    .collect::<Vec<_>>(),
                None,
            ),
            Err(e) => (Vec::new(), Some(e)),
        };
        let mut v = json!({
            "name": spec.name,
            "uplink": spec.uplink,
            "uplink_rate": spec.uplink_rate,
            "vms": vms,
            "ports": ports,
            "switch": self.switch.describe(),
        });
        if let Some(e) = switch_error {
            v["switch_error"] = json!(e);
        }
        ok(200, &v)
    }

    /// `DELETE /v1/networks/{net}`: refused (409) while a VM's definition names it.
    fn delete_network(&self, name: &str) -> Reply {
        let mut doc = self.lock();
        let Some(i) = doc.networks.iter().position(|n| n.name == name) else {
            return error(404, format!("no network named '{name}'"));
        };
        let users = Self::users_of(&doc, name);
        if !users.is_empty() {
            return error(
                409,
                format!(
                    "network '{name}' is used by VM {}: delete them or their nets first",
                    users.join(", ")
                ),
            );
        }
        let n = doc.networks.remove(i);
        if let Err(e) = self.save(&doc) {
            doc.networks.insert(i, n);
            return e;
        }
        if let Err(e) = self.switch.del_network(name) {
            eprintln!("wv host: deleting network {name} from the switch: {e}");
        }
        (204, String::new())
    }

    /// The running worlds and their entitlements.
    fn entitled<'a>(&self, doc: &'a Document) -> Vec<(&'a World, f64)> {
        let live: Vec<&World> = doc.worlds.iter().filter(|w| is_live(w.state)).collect();
        let demands: Vec<Demand> = live.iter().map(|w| w.spec.demand()).collect();
        live.into_iter()
            .zip(sched::entitlements(&demands, self.cpus))
            .collect()
    }

    /// The scheduler's loop: every 100 ms, feed each running world's use back into its weight
    /// and place the worlds' vCPU threads on CPUs ([`crate::place`]). The document lock is
    /// held only to copy out who runs and, at the end, to write the weights of the worlds
    /// still running the same VMM: the threads are read (once each per tick, by a
    /// [`sched::ThreadReader`]) and placed without it.
    fn schedule(&self) {
        let tick = Duration::from_millis(100);
        let mut last = std::time::Instant::now();
        let mut reader = sched::ThreadReader::default();
        loop {
            std::thread::sleep(tick);
            let now = std::time::Instant::now();
            let dt = u64::try_from(now.duration_since(last).as_nanos()).unwrap_or(u64::MAX);
            last = now;
            let mut live: Vec<Ticked> = {
                let doc = self.lock();
                self.entitled(&doc)
                    .into_iter()
                    .map(|(w, e)| Ticked {
                        id: w.id,
                        name: w.spec.name.clone(),
                        pid: w.pid,
                        demand: w.spec.demand(),
                        entitlement: e,
                        vmm: None,
                        threads: Vec::new(),
                    })
                    .collect()
            };
            for l in &mut live {
                if let Some(pid) = l.pid {
                    l.vmm = Some(reader.vmm(pid));
                    l.threads = reader.read(pid);
                }
            }
            reader.retain(&live.iter().filter_map(|l| l.pid).collect());
            let samples: Vec<sched::Sample> = live
                .iter()
                .filter(|l| l.pid.is_some())
                .map(|l| {
                    let (cpu_ns, ready_ns) = sched::totals(&l.threads);
                    sched::Sample {
                        id: l.id,
                        entitlement: l.entitlement,
                        cpu_ns,
                        ready_ns,
                    }
                })
                .collect();
            let mut ctl = self.ctl.lock().unwrap_or_else(|p| p.into_inner());
            ctl.step(&samples, dt);
            self.place(&live, &samples, &ctl, dt);
            drop(ctl);
            let doc = self.lock();
            let entitled: Vec<(&World, f64)> = self
                .entitled(&doc)
                .into_iter()
                .filter(|(w, _)| live.iter().any(|l| l.id == w.id && l.pid == w.pid))
                .collect();
            self.enforce(&entitled, false);
        }
    }

    fn placement(&self) -> MutexGuard<'_, Placement> {
        self.placement.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets whether the daemon places worlds' vCPU threads (`wv host --placement`); `off`
    /// gives every VMM thread all the daemon's CPUs, once, when it is first seen (undoing
    /// what an earlier daemon with placement on pinned).
    pub fn set_placement(&self, mode: place::Mode) {
        let mut p = self.placement();
        p.mode = mode;
    }

    /// One tick of placement: decides where each running world's vCPU threads go and
    /// applies it (only what changed); the weight factors go to [`Daemon::enforce`].
    fn place(
        &self,
        entitled: &[Ticked],
        samples: &[sched::Sample],
        ctl: &sched::Controller,
        dt_ns: u64,
    ) {
        let mut p = self.placement();
        let host: Vec<usize> = match place::online_cpus() {
            Some(on) => p
                .allowed
                .iter()
                .copied()
                .filter(|c| on.contains(c))
                .collect(),
            None => p.allowed.clone(),
        };
        let dt = dt_ns.max(1) as f64;
        let mut loads = Vec::new();
        let mut prev = HashMap::new();
        for w in entitled {
            let e = w.entitlement;
            let s = samples.iter().find(|s| s.id == w.id);
            let (used, ready) = match (s, p.prev.get(&w.id)) {
                (Some(s), Some(&(c0, r0))) => (
                    Some(s.cpu_ns.saturating_sub(c0) as f64 / dt),
                    s.ready_ns.saturating_sub(r0) as f64 / dt,
                ),
                _ => (None, 0.0),
            };
            if let Some(s) = s {
                prev.insert(w.id, (s.cpu_ns, s.ready_ns));
            }
            let d = w.demand;
            let vcpus = f64::from(d.vcpus);
            loads.push(place::Load {
                id: w.id,
                entitlement: e,
                reservation: d.reservation,
                cap: d.limit.map_or(vcpus, |l| l.min(vcpus)),
                vcpus: d.vcpus,
                weight: e * ctl.gain(w.id),
                used,
                ready,
            });
        }
        p.prev = prev;
        let decisions = match p.mode {
            place::Mode::Auto => p.placer.plan(&loads, host.len()),
            // Off: whatever this daemon pinned gets every CPU back, once.
            place::Mode::Off => loads
                .iter()
                .map(|l| place::Decision {
                    id: l.id,
                    cpus: (0..host.len()).collect(),
                    weight_factor: None,
                })
                .collect(),
        };
        p.factors.clear();
        let mut applied = HashMap::new();
        let mut trace = String::new();
        for dec in decisions {
            let Some(w) = entitled.iter().find(|w| w.id == dec.id) else {
                continue;
            };
            let Some(pid) = w.vmm else { continue };
            // Only a VMM still running: while it runs its pidfd keeps its pid from being
            // another process's; the pid of one that ended may already be someone else's.
            if !self.run_of(w.id).is_some_and(|r| alive_now(&r)) {
                continue;
            }
            if p.trace.is_some() {
                let l = loads.iter().find(|l| l.id == w.id);
                let ran: Vec<String> = w
                    .threads
                    .iter()
                    .filter(|t| place::is_vcpu(pid, t.tid, &t.name))
                    .map(|t| place::last_cpu(t.tid).map_or("?".into(), |c| c.to_string()))
                    .collect();
                trace.push_str(&format!(
                    " {} e={:.3} used={:.3} ready={:.3} ran={} cpus={:?} f={:.3};",
                    w.name,
                    l.map_or(0.0, |l| l.entitlement),
                    l.and_then(|l| l.used).unwrap_or(-1.0),
                    l.map_or(0.0, |l| l.ready),
                    ran.join(","),
                    dec.cpus,
                    dec.weight_factor.unwrap_or(0.0),
                ));
            }
            if let Some(f) = dec.weight_factor {
                p.factors.insert(dec.id, f);
            }
            let cpus: Vec<usize> = dec
                .cpus
                .iter()
                .filter_map(|&i| host.get(i).copied())
                .collect();
            let all: Vec<usize> = host.clone();
            for t in &w.threads {
                let tid = t.tid;
                // Other threads may run anywhere (one started by a pinned vCPU thread would
                // inherit its affinity).
                let cpus = if place::is_vcpu(pid, tid, &t.name) {
                    &cpus
                } else {
                    &all
                };
                let before = p.applied.get(&tid);
                // Each thread is set once when first seen, then when its CPUs change: with
                // placement off that gives every CPU back to a thread an earlier daemon
                // (with placement on) pinned, which this one cannot tell from its own.
                if before != Some(cpus) {
                    // The thread was listed earlier in this tick: if it has ended since, its
                    // id may be another process's by now (the VMM's pidfd, checked above,
                    // keeps only the process's own id), so it must still be the VMM's.
                    if !place::is_thread_of(pid, tid) {
                        continue;
                    }
                    if let Err(e) = place::set_affinity(tid, cpus) {
                        if p.warned.insert(w.id) {
                            eprintln!(
                                "wv host: world {} ({}): placing VMM thread {tid} on CPUs {cpus:?}: {e}",
                                w.id, w.name
                            );
                        }
                        continue;
                    }
                }
                applied.insert(tid, cpus.clone());
            }
        }
        p.applied = applied;
        if p.trace.is_some() {
            use std::io::Write;
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            let cap: Vec<String> = p
                .placer
                .capacity()
                .iter()
                .map(|c| format!("{c:.3}"))
                .collect();
            let f = p.trace.as_mut();
            let _ = f.map(|f| writeln!(f, "{t:.3} capacity={}{trace}", cap.join(",")));
        }
    }

    /// Recomputes every running world's entitlement and applies it, limits included (after a
    /// change of settings or of the running set).
    fn rebalance(&self, doc: &Document) {
        self.enforce(&self.entitled(doc), true);
    }

    /// Writes each world's weight (its entitlement times its feedback gain, times the factor
    /// placement gives a world time-shared between two CPUs) and, with `limits`, its limit.
    fn enforce(&self, entitled: &[(&World, f64)], limits: bool) {
        let Ok(cg) = &self.cgroups else { return };
        let factors = self.placement().factors.clone();
        let ctl = self.ctl.lock().unwrap_or_else(|p| p.into_inner());
        for &(w, e) in entitled {
            let e = e * ctl.gain(w.id) * factors.get(&w.id).copied().unwrap_or(1.0);
            let r = if limits {
                cg.apply(w.id, e, w.spec.limit)
            } else {
                cg.weight(w.id, e)
            };
            if let Err(err) = r {
                eprintln!("wv host: world {} ({}): {err}", w.id, w.spec.name);
            }
        }
    }

    /// Admission control for `spec` joining (or changing among) the running worlds.
    fn admit(&self, doc: &Document, spec: &VmSpec) -> Result<(), Reply> {
        let mut demands: Vec<Demand> = doc
            .worlds
            .iter()
            .filter(|w| is_live(w.state) && w.spec.name != spec.name)
            .map(|w| w.spec.demand())
            .collect();
        demands.push(spec.demand());
        sched::admit(&demands, self.cpus).map_err(|e| error(409, e))?;
        let d = spec.demand();
        if let Err(e) = &self.cgroups {
            if d.shares != sched::DEFAULT_SHARES || d.reservation > 0.0 || d.limit.is_some() {
                return Err(error(
                    409,
                    format!("the CPU scheduler is unavailable on this host ({e}): only default settings can run"),
                ));
            }
        }
        Ok(())
    }

    /// Sets the I/Os per second of each device (VMKFS datastore; the raw images together)
    /// that the storage service's disks share (`wv host --storage-capacity-iops`; 0: none).
    pub fn set_storage_capacity(&self, iops: u64) -> Result<(), String> {
        self.storage.set_capacity(iops)
    }

    /// Sets device `dev`'s own capacity in I/Os per second (`wv host --storage-capacity-iops
    /// DEV=N`): a datastore's path or `raw`.
    pub fn set_storage_device_capacity(&self, dev: &str, iops: u64) -> Result<(), String> {
        self.storage.set_device_capacity(dev, Some(iops))
    }

    /// `GET /v1/host/storage`: the capacities the daemon keeps for the storage service, and
    /// the devices of the running service as it has them.
    fn host_storage(&self) -> Reply {
        let own: Vec<_> = self
            .storage
            .device_capacities()
            .into_iter()
            .map(|(device, capacity_iops)| json!({ "device": device, "capacity_iops": capacity_iops }))
            .collect();
        let (devices, reading) = match self.storage.devices() {
            Ok(d) => (d, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        let mut v = json!({
            "capacity_iops": self.storage.capacity(),
            "device_capacity": own,
            "service": self.storage.describe(),
            "devices": devices,
        });
        if let Some(e) = reading {
            v["devices_error"] = json!(e);
        }
        ok(200, &v)
    }

    /// `PUT /v1/host/storage`: `{"capacity_iops": N}` sets every device's default,
    /// `{"device": DEV, "capacity_iops": N|null}` one device's own (null: the default again).
    /// Kept until the daemon stops (`wv host --storage-capacity-iops` is the lasting form) and
    /// given to every storage service it starts; the one running gets it at once.
    fn set_host_storage(&self, body: &[u8]) -> Reply {
        let c: StorageCapacity = match object(body, "storage capacity") {
            Ok(c) => c,
            Err(r) => return r,
        };
        let Some(iops) = c.capacity_iops else {
            return error(400, "invalid storage capacity: capacity_iops is required");
        };
        let done = match (&c.device, iops) {
            (Some(dev), n) => {
                if let Err(e) = crate::storage::check_device(dev) {
                    return error(400, e);
                }
                let own = self.storage.device_capacities();
                let canonical = crate::storage::canonical_device(dev);
                if n.is_some()
                    && own.len() >= crate::storage::MAX_DEVICES
                    && !own.iter().any(|(d, _)| *d == canonical)
                {
                    return error(
                        400,
                        format!(
                            "{} devices have a capacity of their own already: give one the default back first",
                            crate::storage::MAX_DEVICES
                        ),
                    );
                }
                self.storage.set_device_capacity(dev, n)
            }
            (None, Some(n)) => self.storage.set_capacity(n),
            (None, None) => {
                return error(
                    400,
                    "invalid storage capacity: capacity_iops is a number without a device",
                )
            }
        };
        if let Err(e) = done {
            // Kept for the next service; the one running did not take it.
            return error(
                502,
                format!("kept, but the running storage service did not take it: {e}"),
            );
        }
        self.host_storage()
    }

    fn set(&self, name: &str, body: &[u8]) -> Reply {
        let u: ResourceUpdate = match object(body, "settings") {
            Ok(u) => u,
            Err(r) => return r,
        };
        let mut doc = self.lock();
        let Some(i) = doc.worlds.iter().position(|w| w.spec.name == name) else {
            return error(404, format!("no VM named '{name}'"));
        };
        let mut spec = doc.worlds[i].spec.clone();
        spec.shares = u.shares.unwrap_or(spec.shares);
        spec.reservation = u.reservation.unwrap_or(spec.reservation);
        if let Some(l) = &u.limit {
            match parse_limit(l) {
                Ok(l) => spec.limit = l,
                Err(r) => return r,
            }
        }
        if let Some(n) = u.net_shares {
            spec.net_shares = Some(n);
        }
        if let Some(r) = u.net_reservation {
            spec.net_reservation = (r != 0).then_some(r);
        }
        if let Some(l) = u.net_limit {
            spec.net_limit = (l != 0).then_some(l);
        }
        if let Err(e) = sched::validate(&spec.demand()) {
            return error(422, e);
        }
        if let Some(n) = u.disk_shares {
            spec.disk_shares = Some(n);
        }
        if let Some(r) = u.disk_reservation_iops {
            spec.disk_reservation_iops = (r != 0).then_some(r);
        }
        if let Some(l) = u.disk_limit_iops {
            spec.disk_limit_iops = (l != 0).then_some(l);
        }
        if let Err(e) = spec.net_shares().validate() {
            return error(422, e);
        }
        if let Err(e) = spec.disk_shares().validate() {
            return error(422, e);
        }
        if is_live(doc.worlds[i].state) {
            if let Err(r) = self.admit(&doc, &spec) {
                return r;
            }
        }
        let net = spec.net_shares();
        let net_changed = net != doc.worlds[i].spec.net_shares();
        let disk = spec.disk_shares();
        let disk_changed = disk != doc.worlds[i].spec.disk_shares();
        let old = std::mem::replace(&mut doc.worlds[i].spec, spec);
        if let Err(e) = self.save(&doc) {
            doc.worlds[i].spec = old;
            return e;
        }
        self.rebalance(&doc);
        let reply = ok(200, &doc.worlds[i]);
        let id = doc.worlds[i].id;
        drop(doc);
        if disk_changed {
            // Live on the served disks of its run, as for the ports below.
            let disks = self
                .served
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&id)
                .cloned()
                .unwrap_or_default();
            for n in &disks {
                if let Err(e) = self.storage.set_shares(n, &disk) {
                    return error(
                        500,
                        format!("VM '{name}': stored, but not applied to its disk {n}: {e}"),
                    );
                }
            }
        }
        if net_changed {
            // Live on the ports of its run, if it has one (a later start sets them on its new
            // ports), with the definitions unlocked: the switch's answer is not waited for
            // under them. Stored already: a switch that fails here gets them when it
            // restarts.
            let ports = self
                .ports
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&id)
                .cloned()
                .unwrap_or_default();
            for (n, p) in &ports {
                if let Err(e) = self.switch.set_shares(n, p, &net) {
                    return error(
                        500,
                        format!("VM '{name}': stored, but not applied to port {n}/{p}: {e}"),
                    );
                }
            }
        }
        reply
    }

    /// Nothing, if world `id` (VM `name`) runs (or, `paused_too`, is paused) with its VMM;
    /// else the answer why not (404, 409). The caller holds the world's lifecycle lock.
    fn running(&self, id: u64, name: &str, paused_too: bool) -> Result<(), Reply> {
        let mut doc = self.lock();
        let w = Self::world(&mut doc, id, name)?;
        let ok = w.state == State::Running || (paused_too && w.state == State::Paused);
        if !ok || self.run_of(id).is_none() {
            return Err(error(
                409,
                format!("VM '{name}' is {:?}, not running", w.state).to_lowercase(),
            ));
        }
        Ok(())
    }

    /// `POST /v1/vms/{name}/devices`: hot-plugs a disk (`{"disk": DiskConfig}`: a raw image
    /// under the image directories) or a net on one of the daemon's networks (`{"net":
    /// NetConfig}` with `network` and `id`) into the running VM. For a disk the daemon opens the
    /// image (read-write unless `readonly`); for a net it adds a port to the switch and
    /// connects to it. Either way it hands the descriptor to the VMM with `PUT /vm/device-add`
    /// (a jailed VMM could not open it). Once the VMM has taken it (never before), the device is
    /// part of the VM's definition ([`Self::keep_hot`]): its next start boots with it. The
    /// functions for each kind run with the VM's lifecycle lock held and the VM running.
    fn device_add(&self, name: &str, body: &[u8]) -> Reply {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Add {
            #[serde(default)]
            disk: Option<wv_config::DiskConfig>,
            #[serde(default)]
            net: Option<wv_config::NetConfig>,
        }
        let add: Add = match object(body, "device") {
            Ok(a) => a,
            Err(r) => return r,
        };
        if add.disk.is_some() == add.net.is_some() {
            return error(
                400,
                "invalid device: give exactly one of \"disk\" and \"net\"",
            );
        }
        if add.disk.as_ref().is_some_and(|d| d.vhost_user) {
            return error(
                422,
                "a hot-plugged disk is an image (path=) or a VMKFS disk (vmkfs=), not a vhost-user socket",
            );
        }
        if let Some(n) = &add.net {
            if n.network.is_none() {
                return error(
                    400,
                    "invalid device: a net needs \"network\", one of the daemon's networks",
                );
            }
            if n.id.as_ref().is_none_or(|i| i.is_empty()) {
                return error(400, "invalid device: a net needs an \"id\" to remove it by");
            }
        }
        let (id, lc) = match self.lifecycle(name) {
            Ok(x) => x,
            Err(r) => return r,
        };
        // Not while the VM starts or stops.
        let _serial = lc.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(r) = self.running(id, name, true) {
            return r;
        }
        let dev = match (&add.disk, &add.net) {
            (Some(d), _) => d.id.clone(),
            (_, Some(n)) => n.id.clone().unwrap_or_default(),
            (None, None) => String::new(),
        };
        // The device as the definition will keep it (a served disk `via=storage`): its id
        // unique among the VM's disks and nets, those it started with and those hot-plugged
        // since (all in the definition), and the definition with it valid as a whole.
        let served = add
            .disk
            .as_ref()
            .is_some_and(|d| d.vmkfs.is_some() || !d.via.is_vmm());
        let mut disk = add.disk.clone();
        if let Some(d) = disk.as_mut().filter(|_| served) {
            d.via = wv_config::DiskVia::Storage;
        }
        let net = add.net.clone();
        let spec = {
            let mut doc = self.lock();
            match Self::world(&mut doc, id, name) {
                Ok(w) => w.spec.clone(),
                Err(r) => return r,
            }
        };
        let taken = device_id_taken(&spec.config, &dev)
            || self
                .hot
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&id)
                .is_some_and(|v| v.iter().any(|(d, _)| *d == dev));
        if taken {
            return error(
                409,
                format!("VM '{name}' already has a device with id '{dev}'"),
            );
        }
        let mut with = spec;
        with.config.disks.extend(disk.clone());
        with.config.nets.extend(net.clone());
        if let Err(e) = with.validate() {
            return error(
                422,
                format!("VM '{name}': its definition with device '{dev}' would be invalid: {e}"),
            );
        }
        let (status, body) = match (add.disk, add.net) {
            (Some(d), _) if served => self.served_disk_add(id, name, d),
            (Some(d), _) => self.disk_add(name, d),
            (_, Some(n)) => self.net_add(id, name, n),
            (None, None) => unreachable!("one of them, checked above"),
        };
        if status != 201 {
            return (status, body);
        }
        // The VMM has it: now (never before) it is part of the definition.
        match self.keep_hot(id, name, &dev, disk, net) {
            Ok(()) => (status, body),
            Err(r) => r,
        }
    }

    /// Keeps device `dev`, which the VMM of world `id` (VM `name`) has just taken, in the VM's
    /// definition (as `disk` or `net`) and among its run's hot-plugged devices with what
    /// serves it ([`World::hot`]), stored at once. On an error the device is in the running VM
    /// but not in its definition (the answer says so).
    fn keep_hot(
        &self,
        id: u64,
        name: &str,
        dev: &str,
        disk: Option<wv_config::DiskConfig>,
        net: Option<wv_config::NetConfig>,
    ) -> Result<(), Reply> {
        let (port, served) = match self
            .hot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .and_then(|v| v.iter().find(|(d, _)| d == dev))
        {
            Some((_, HotBackend::Port { port, .. })) => (Some(port.clone()), None),
            Some((_, HotBackend::Disk { name })) => (None, Some(name.clone())),
            None => (None, None),
        };
        let mut doc = self.lock();
        let i = doc
            .worlds
            .iter()
            .position(|w| w.id == id)
            .ok_or_else(|| error(404, format!("no VM named '{name}'")))?;
        let before = doc.worlds[i].clone();
        let w = &mut doc.worlds[i];
        w.spec.config.disks.extend(disk);
        w.spec.config.nets.extend(net);
        w.hot.push(HotPlugged {
            id: dev.to_string(),
            port,
            served,
        });
        if let Err(e) = self.store.save(&doc) {
            doc.worlds[i] = before;
            return Err(error(
                500,
                format!(
                    "VM '{name}': device '{dev}' is in the running VM but not in its \
                     definition (saving the state: {e}); it is gone at its next start"
                ),
            ));
        }
        Ok(())
    }

    /// Takes device `dev` of world `id` (VM `name`), which its guest has let go of, out of the
    /// VM's definition and its run's hot-plugged devices, if it was hot-plugged into this run
    /// (a device the run started with never leaves it: its VMM cannot eject it), stored at
    /// once. An error says that the store could not be written.
    fn forget_hot(&self, id: u64, name: &str, dev: &str) -> Result<(), Reply> {
        let mut doc = self.lock();
        let Some(i) = doc
            .worlds
            .iter()
            .position(|w| w.id == id && w.hot.iter().any(|h| h.id == dev))
        else {
            return Ok(());
        };
        let before = doc.worlds[i].clone();
        let w = &mut doc.worlds[i];
        w.hot.retain(|h| h.id != dev);
        drop_device(&mut w.spec.config, dev);
        if let Err(e) = self.store.save(&doc) {
            doc.worlds[i] = before;
            return Err(error(
                500,
                format!(
                    "VM '{name}': device '{dev}' was removed from the running VM but is still \
                     in its definition (saving the state: {e})"
                ),
            ));
        }
        Ok(())
    }

    /// A disk for [`Self::device_add`].
    fn disk_add(&self, name: &str, d: wv_config::DiskConfig) -> Reply {
        if let Err(e) = self.check_image("disk", &d.path) {
            return error(422, e);
        }
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(!d.readonly)
            .open(&d.path)
        {
            Ok(f) => f,
            Err(e) => return error(422, format!("disk {}: {}: {e}", d.id, d.path.display())),
        };
        let key = d.path.display().to_string();
        let req = json!({ "disk": d }).to_string();
        let files = [(key.as_str(), std::os::fd::AsFd::as_fd(&file))];
        self.hot_add(name, &req, &files)
    }

    /// A disk the storage service serves, for [`Self::device_add`]: a VMKFS disk (whatever
    /// its `via`), or an image with `via=storage`. The service opens and holds it as the
    /// host's world (the VMKFS lock), the VMM gets a connection to its socket; the disk is let
    /// go of if the VMM does not take it, when the guest ejects it, or at the run's end.
    fn served_disk_add(&self, id: u64, name: &str, mut d: wv_config::DiskConfig) -> Reply {
        d.via = wv_config::DiskVia::Storage;
        // The checks a definition with it would pass (names the service can read back,
        // files under the image directories).
        let spec = {
            let mut doc = self.lock();
            match Self::world(&mut doc, id, name) {
                Ok(w) => w.spec.clone(),
                Err(r) => return r,
            }
        };
        if !runs_shared(&spec.config) {
            return not_shared(name, "a disk served by the storage world");
        }
        let mut with = spec;
        with.config.disks.push(d.clone());
        if let Err(e) = with.validate() {
            return error(422, e);
        }
        if let Err(e) = self.check_image("disk", &d.path) {
            return error(422, e);
        }
        let used: Vec<String> = self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
            .unwrap_or_default();
        let Some(disk) = (0..storage::MAX_HOT_DISKS)
            .map(|k| storage::hot_disk_name(id, k))
            .find(|n| !used.contains(n))
        else {
            return error(
                409,
                format!(
                    "VM '{name}' has {} hot-plugged served disks, the most it can",
                    storage::MAX_HOT_DISKS
                ),
            );
        };
        let sock = match self.storage.add_disk(&disk, &storage::disk_source(&d)) {
            Ok(s) => s,
            Err(storage::AddError::Refused(e)) => {
                return error(409, format!("VM '{name}': disk {}: {e}", d.id))
            }
            Err(e) => return error(500, format!("VM '{name}': disk {}: {e}", d.id)),
        };
        let shares = with.disk_shares();
        if shares.any() {
            if let Err(e) = self.storage.set_shares(&disk, &shares) {
                self.storage.del_disk(&disk);
                return error(500, format!("VM '{name}': disk {}: {e}", d.id));
            }
        }
        let conn = match UnixStream::connect(&sock) {
            Ok(c) => c,
            Err(e) => {
                self.storage.del_disk(&disk);
                return error(500, format!("VM '{name}': {}: {e}", sock.display()));
            }
        };
        let dev = d.id.clone();
        d.path = sock.clone();
        d.vmkfs = None;
        d.vhost_user = true;
        d.via = wv_config::DiskVia::Vmm;
        let key = sock.display().to_string();
        let req = json!({ "disk": d }).to_string();
        let files = [(key.as_str(), std::os::fd::AsFd::as_fd(&conn))];
        self.record_hot(id, &dev, HotBackend::Disk { name: disk });
        let (status, body) = self.hot_add(name, &req, &files);
        drop(conn);
        if status != 201 {
            self.release_hot(id, &dev);
        }
        (status, body)
    }

    /// Records what serves hot-plugged device `dev` of world `id`, before the VMM is asked to
    /// take it: a run that ends meanwhile ([`Self::release_ports`]) lets go of it with the
    /// rest, and a refusal lets go of it with [`Self::release_hot`].
    fn record_hot(&self, id: u64, dev: &str, b: HotBackend) {
        match &b {
            HotBackend::Port { net, port } => self
                .ports
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(id)
                .or_default()
                .push((net.clone(), port.clone())),
            HotBackend::Disk { name } => self
                .served
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(id)
                .or_default()
                .push(name.clone()),
        }
        self.hot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default()
            .push((dev.to_string(), b));
    }

    /// A net for [`Self::device_add`]: a new port of the switch on its network, with the VM's
    /// network shares, taken away again if the VMM does not take the device, and with the
    /// VM's other ports when it stops.
    fn net_add(&self, id: u64, name: &str, mut n: wv_config::NetConfig) -> Reply {
        if !n.tap.is_empty() || n.vhost_user.is_some() {
            return error(
                422,
                "a hot-plugged net is on a network (network=NAME) only: no tap= or vhost-user=",
            );
        }
        let (Some(net), Some(dev)) = (n.network.clone(), n.id.clone()) else {
            return error(400, "invalid device: a net needs \"network\" and \"id\"");
        };
        let shares = {
            let mut doc = self.lock();
            if !doc.networks.iter().any(|x| x.name == net) {
                return error(
                    422,
                    format!("net: no network named '{net}' (wv net create {net})"),
                );
            }
            match Self::world(&mut doc, id, name) {
                Ok(w) if !runs_shared(&w.spec.config) => {
                    return not_shared(name, "a net on a network")
                }
                Ok(w) => w.spec.net_shares(),
                Err(r) => return r,
            }
        };
        // The lowest hot-plug port number this run does not use.
        let used: Vec<String> = self
            .ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .map(|v| v.iter().map(|(_, p)| p.clone()).collect())
            .unwrap_or_default();
        let Some(port) = (0..network::MAX_HOT_PORTS)
            .map(|k| network::hot_port_name(id, k))
            .find(|p| !used.contains(p))
        else {
            return error(
                409,
                format!(
                    "VM '{name}' has {} hot-plugged nets, the most it can",
                    network::MAX_HOT_PORTS
                ),
            );
        };
        let sock = match self.switch.add_port(&net, &port) {
            Ok(s) => s,
            Err(e) => return error(500, format!("VM '{name}': network {net}: {e}")),
        };
        let undo = || self.switch.del_port(&net, &port);
        if shares.any() {
            if let Err(e) = self.switch.set_shares(&net, &port, &shares) {
                undo();
                return error(500, format!("VM '{name}': network {net}: {e}"));
            }
        }
        let conn = match UnixStream::connect(&sock) {
            Ok(c) => c,
            Err(e) => {
                undo();
                return error(500, format!("VM '{name}': {}: {e}", sock.display()));
            }
        };
        n.vhost_user = Some(sock.clone());
        let key = sock.display().to_string();
        let req = json!({ "net": n }).to_string();
        let files = [(key.as_str(), std::os::fd::AsFd::as_fd(&conn))];
        self.record_hot(
            id,
            &dev,
            HotBackend::Port {
                net: net.clone(),
                port: port.clone(),
            },
        );
        let (status, body) = self.hot_add(name, &req, &files);
        if status != 201 {
            self.release_hot(id, &dev);
        }
        (status, body)
    }

    /// `PUT /vm/device-add` with `files`: 201 with the VMM's answer, its 4xx as they are,
    /// anything else 502; 409 if the VMM could not be asked.
    fn hot_add(
        &self,
        name: &str,
        req: &str,
        files: &[(&str, std::os::fd::BorrowedFd<'_>)],
    ) -> Reply {
        match self.vmm_call_passing(name, "PUT", "/vm/device-add", Some(req), files) {
            Ok((200, b)) => (201, b),
            Ok((st, b)) => {
                let status = if (400..500).contains(&st) { st } else { 502 };
                (status, b)
            }
            Err(e) => error(409, format!("VM '{name}': {e}")),
        }
    }

    /// `DELETE /v1/vms/{name}/devices/{id}`: asks the guest to eject hot-plugged device `id`
    /// (`PUT /vm/device-remove`), answered once it has; the device then leaves the VM's
    /// definition. Of a VM that does not run, takes device `id` out of its definition (its
    /// next start boots without it).
    fn device_remove(&self, name: &str, dev: &str) -> Reply {
        let (id, lc) = match self.lifecycle(name) {
            Ok(x) => x,
            Err(r) => return r,
        };
        let _serial = lc.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut doc = self.lock();
            let Some(i) = doc.worlds.iter().position(|w| w.id == id) else {
                return error(404, format!("no VM named '{name}'"));
            };
            if !is_live(doc.worlds[i].state) {
                let n = devices_named(&doc.worlds[i].spec.config, dev);
                if n > 1 {
                    return error(
                        409,
                        format!(
                            "VM '{name}' has {n} devices named '{dev}' (nets on one network \
                             without ids): give them ids (id=) to remove one"
                        ),
                    );
                }
                let before = doc.worlds[i].spec.clone();
                if !drop_device(&mut doc.worlds[i].spec.config, dev) {
                    return error(404, format!("VM '{name}' has no device '{dev}'"));
                }
                if let Err(r) = self.save(&doc) {
                    doc.worlds[i].spec = before;
                    return r;
                }
                return (204, String::new());
            }
        }
        if let Err(r) = self.running(id, name, true) {
            return r;
        }
        let req = json!({ "id": dev }).to_string();
        match self.vmm_call(name, "PUT", "/vm/device-remove", Some(&req)) {
            Ok((204, _)) => {
                self.release_hot(id, dev);
                match self.forget_hot(id, name, dev) {
                    Ok(()) => (204, String::new()),
                    Err(r) => r,
                }
            }
            Ok((404, b)) => {
                // The VMM has no such device: the guest ejected it by itself (or it was never
                // added); what served it, if anything, is not needed any more.
                self.release_hot(id, dev);
                match self.forget_hot(id, name, dev) {
                    Ok(()) => (404, b),
                    Err(r) => r,
                }
            }
            Ok((409, _)) if self.started_with(id, dev) => error(
                409,
                format!(
                    "VM '{name}': device '{dev}' is in the configuration its run started with, \
                     which the guest cannot eject: stop the VM, then remove it from the \
                     definition (wv vm device remove {name} {dev})"
                ),
            ),
            Ok((st, b)) => {
                let status = if (400..500).contains(&st) { st } else { 502 };
                (status, b)
            }
            Err(e) => error(409, format!("VM '{name}': {e}")),
        }
    }

    /// Whether `dev` is a device of world `id`'s definition that its run started with (not
    /// hot-plugged since).
    fn started_with(&self, id: u64, dev: &str) -> bool {
        self.lock().worlds.iter().any(|w| {
            w.id == id && device_id_taken(&w.spec.config, dev) && !w.hot.iter().any(|h| h.id == dev)
        })
    }

    /// `PUT /v1/vms/{name}/devices/{dev}/path`: the VMM switches device `dev` (docs/DEVICES.md,
    /// Interposition); a capture goes to a file of the VM's folder.
    fn device_path(&self, name: &str, dev: &str, body: &[u8]) -> Reply {
        let r = match object::<DevicePath>(body, "device path") {
            Ok(r) => r,
            Err(reply) => return reply,
        };
        if r.path != "direct" && r.path != "interposed" {
            return error(
                400,
                format!(
                    "invalid device path: '{}' is not direct or interposed",
                    r.path
                ),
            );
        }
        if let Some(f) = &r.capture {
            if r.path == "direct" {
                return error(400, "a capture needs \"path\": \"interposed\"");
            }
            if !capture_name(f) {
                return error(
                    400,
                    format!(
                        "invalid capture '{f}': a plain file name in the VM's folder ending in \
                         .pcap (a net) or .trace (a disk), of letters, digits, '_', '-' and '.'"
                    ),
                );
            }
        }
        let (id, lc) = match self.lifecycle(name) {
            Ok(x) => x,
            Err(r) => return r,
        };
        // Not while the VM starts or stops.
        let _serial = lc.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(r) = self.running(id, name, false) {
            return r;
        }
        let capture = match &r.capture {
            None => None,
            Some(f) => match self.store.vm_dir(name) {
                Ok(d) => Some(d.join(f)),
                Err(e) => return error(500, e.to_string()),
            },
        };
        // Made here, in the VM's folder (root's: a jailed VMM cannot write there, nor plant a
        // link), and handed to the VMM open.
        let file = match &capture {
            None => None,
            Some(p) => {
                use std::os::unix::fs::OpenOptionsExt;
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(p)
                {
                    Ok(f) => Some((p.display().to_string(), f)),
                    Err(e) => return error(422, format!("cannot write {}: {e}", p.display())),
                }
            }
        };
        let files: Vec<(&str, std::os::fd::BorrowedFd<'_>)> = file
            .iter()
            .map(|(k, f)| (k.as_str(), std::os::fd::AsFd::as_fd(f)))
            .collect();
        let req = json!({ "id": dev, "path": r.path, "capture": capture }).to_string();
        match self.vmm_call_passing(name, "PUT", "/vm/device-path", Some(&req), &files) {
            Ok((200, body)) => match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(v) => ok(200, &v),
                Err(e) => error(500, format!("VM '{name}': its VMM's answer: {e}")),
            },
            Ok((status, body)) => {
                let msg = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_string))
                    .unwrap_or(body);
                let status = if matches!(status, 400 | 404 | 409 | 422) {
                    status
                } else {
                    409
                };
                error(status, format!("VM '{name}': {msg}"))
            }
            Err(e) => error(409, format!("VM '{name}': {e}")),
        }
    }

    /// `GET` (`body` None) and `PUT /v1/vms/{name}/balloon`: the running VM's memory target
    /// and current memory, as its VMM's balloon reports them (docs/vmm-openapi.json), after
    /// setting a new target when asked. The target is the memory the guest is to keep; the
    /// balloon holds the rest.
    fn balloon(&self, name: &str, body: Option<&[u8]>) -> Reply {
        let target = match body.map(|b| object::<MemoryTarget>(b, "memory target")) {
            None => None,
            Some(Ok(t)) => match t.memory_target.bytes() {
                Ok(b) => Some(b),
                Err(e) => return error(400, format!("invalid memory target: {e}")),
            },
            Some(Err(r)) => return r,
        };
        let (id, lc) = match self.lifecycle(name) {
            Ok(x) => x,
            Err(r) => return r,
        };
        // Not while the VM starts or stops.
        let _serial = lc.lock().unwrap_or_else(|p| p.into_inner());
        let (memory, pid) = {
            let mut doc = self.lock();
            let w = match Self::world(&mut doc, id, name) {
                Ok(w) => w,
                Err(r) => return r,
            };
            if !matches!(w.state, State::Running | State::Paused) || self.run_of(id).is_none() {
                return error(
                    409,
                    format!("VM '{name}' is {:?}, not running", w.state).to_lowercase(),
                );
            }
            if !w.spec.config.balloon {
                return error(
                    409,
                    format!("VM '{name}' has no balloon (define it with --balloon on)"),
                );
            }
            (w.spec.config.memory, w.pid)
        };
        if let Some(t) = target {
            if t > memory {
                return error(
                    422,
                    format!(
                        "memory target {} is more than VM '{name}''s memory ({})",
                        wv_config::format_size(t),
                        wv_config::format_size(memory)
                    ),
                );
            }
            let req = json!({ "target_bytes": memory - t }).to_string();
            match self.vmm_call(name, "PUT", "/vm/balloon", Some(&req)) {
                // The lending policy builds on a target set by hand.
                Ok((204, _)) => self.manual_balloon(id, pid, memory - t),
                Ok((status, body)) => {
                    return error(
                        409,
                        format!("VM '{name}': its VMM answered {status} to the balloon: {body}"),
                    )
                }
                Err(e) => return error(409, format!("VM '{name}': {e}")),
            }
        }
        let b: serde_json::Value = match self.vmm_call(name, "GET", "/vm/balloon", None) {
            Ok((200, body)) => match serde_json::from_str(&body) {
                Ok(v) => v,
                Err(e) => return error(409, format!("VM '{name}': its VMM's balloon: {e}")),
            },
            Ok((status, body)) => {
                return error(
                    409,
                    format!("VM '{name}': its VMM answered {status} about the balloon: {body}"),
                )
            }
            Err(e) => return error(409, format!("VM '{name}': {e}")),
        };
        let of = |k: &str| b[k].as_u64().unwrap_or(0).min(memory);
        ok(
            200,
            &json!({
                "memory_bytes": memory,
                "memory_target_bytes": memory - of("target_bytes"),
                "current_bytes": memory - of("actual_bytes"),
                "balloon": b,
            }),
        )
    }

    fn stats_of(&self, w: &World, entitlement: f64) -> WorldStats {
        let threads = w.pid.map(sched::threads).unwrap_or_default();
        let (cpu_ns, ready_ns) = sched::totals(&threads);
        WorldStats {
            id: w.id,
            name: w.spec.name.clone(),
            state: w.state,
            shares: w.spec.shares,
            reservation: w.spec.reservation,
            limit: w.spec.limit,
            entitlement,
            cpu_ns,
            ready_ns,
            throttled_ns: self.cgroups.as_ref().map_or(0, |c| c.throttled_ns(w.id)),
            threads,
            served_disks: Vec::new(),
        }
    }

    fn stats(&self, name: &str) -> Reply {
        let doc = self.lock();
        let Some(w) = doc.worlds.iter().find(|w| w.spec.name == name) else {
            return error(404, format!("no VM named '{name}'"));
        };
        let e = self
            .entitled(&doc)
            .into_iter()
            .find(|(x, _)| x.id == w.id)
            .map_or(0.0, |(_, e)| e);
        ok(200, &self.stats_of(w, e))
    }

    fn all_stats(&self) -> Reply {
        let (mut stats, specs) = {
            let doc = self.lock();
            let specs: HashMap<u64, VmSpec> =
                doc.worlds.iter().map(|w| (w.id, w.spec.clone())).collect();
            (self.every_stats(&doc), specs)
        };
        // The storage service is asked once, with the definitions unlocked.
        let any = {
            let served = self.served.lock().unwrap_or_else(|p| p.into_inner());
            stats
                .iter()
                .any(|w| served.get(&w.id).is_some_and(|v| !v.is_empty()))
        };
        if any {
            let disks = self.storage.disks().unwrap_or_default();
            for w in &mut stats {
                if let Some(spec) = specs.get(&w.id) {
                    w.served_disks = self.served_disk_stats(w.id, spec, &disks);
                }
            }
        }
        ok(200, &stats)
    }

    /// The disks of world `id` (defined by `spec`) that the storage service serves in its
    /// run, from the service's `stats` entries `disks`: each one's id in the VM, its name in
    /// the service, its device (datastore), its shares, reservation and limit (I/Os per
    /// second), the I/Os per second the service's dispatcher gave it over its last window
    /// (`iops`) and its counters.
    fn served_disk_stats(
        &self,
        id: u64,
        spec: &VmSpec,
        disks: &[serde_json::Value],
    ) -> Vec<serde_json::Value> {
        let names = self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
            .unwrap_or_default();
        let hot = self.hot.lock().unwrap_or_else(|p| p.into_inner());
        names
            .iter()
            .filter_map(|n| {
                let d = disks.iter().find(|d| d["name"] == n.as_str())?;
                let label = spec
                    .config
                    .disks
                    .iter()
                    .enumerate()
                    .find(|(i, _)| storage::disk_name(id, *i) == *n)
                    .map(|(_, c)| c.id.clone())
                    .or_else(|| {
                        hot.get(&id)?.iter().find_map(|(dev, b)| match b {
                            HotBackend::Disk { name } if name == n => Some(dev.clone()),
                            _ => None,
                        })
                    })
                    .unwrap_or_else(|| n.clone());
                let sh = &d["shares"];
                Some(json!({
                    "id": label,
                    "name": n,
                    "device": d["device"],
                    "shares": sh["shares"],
                    "reservation_iops": sh["reservation"],
                    "limit_iops": sh["limit"],
                    "iops": d["sched"]["rate"],
                    "ios": d["sched"]["served"],
                    "delayed": d["sched"]["delayed"],
                    "requests": d["requests"],
                    "read_bytes": d["read_bytes"],
                    "written_bytes": d["written_bytes"],
                }))
            })
            .collect()
    }

    /// The accounting of the system worlds and of every running VM world.
    fn every_stats(&self, doc: &Document) -> Vec<WorldStats> {
        let [(m_cpu, m_ready, mgmt), (h_cpu, h_ready, help)] =
            helper::accounting(sched::threads(std::process::id()));
        let system = |id, name: &str, shares, cpu_ns, ready_ns, threads| WorldStats {
            id,
            name: name.into(),
            state: State::Running,
            shares,
            reservation: 0.0,
            limit: None,
            entitlement: 0.0,
            cpu_ns,
            ready_ns,
            throttled_ns: 0,
            threads,
            served_disks: Vec::new(),
        };
        let mut out = vec![
            system(
                helper::MANAGEMENT_ID,
                "management",
                helper::MANAGEMENT_SHARES,
                m_cpu,
                m_ready,
                mgmt,
            ),
            system(
                helper::HELPER_ID,
                "helper",
                helper::HELPER_SHARES,
                h_cpu,
                h_ready,
                help,
            ),
        ];
        let services = [
            (
                self.switch.accounting(),
                network::SWITCH_ID,
                "switch",
                network::SWITCH_SHARES,
            ),
            (
                self.storage.accounting(),
                storage::STORAGE_ID,
                "storage",
                storage::STORAGE_SHARES,
            ),
        ];
        for (acc, id, name, shares) in services {
            if let Some(a) = acc {
                let threads = sched::threads(a.pid);
                let (cpu, ready) = sched::totals(&threads);
                out.push(system(id, name, shares, cpu, ready, threads));
            }
        }
        for (w, e) in self.entitled(doc) {
            out.push(self.stats_of(w, e));
        }
        out
    }

    /// The running VMs with a VMM, as the samplers read them outside the document lock.
    fn live_vms(&self, doc: &Document) -> Vec<LiveVm> {
        doc.worlds
            .iter()
            .filter(|w| is_live(w.state))
            .filter_map(|w| {
                Some(LiveVm {
                    id: w.id,
                    name: w.spec.name.clone(),
                    pid: w.pid?,
                    run: self.run_of(w.id)?,
                    served_disks: served_disks(w)
                        .into_iter()
                        .filter_map(|(i, svc, _)| {
                            Some((w.spec.config.disks.get(i)?.id.clone(), svc))
                        })
                        .collect(),
                    ports: net_ports(w),
                })
            })
            .collect()
    }

    /// The disks and nets of each of `vms` with their data-path counters: those its VMM
    /// serves (its control socket's `GET /vm/counters`, [`VMM_READ_TIMEOUT`] at most), those
    /// the storage service and the switch serve (one `stats` request to each, when a VM has
    /// such a device). Disks first; a device whose server could not be read is left out.
    fn device_readings(&self, vms: &[LiveVm]) -> HashMap<u64, VmmReading> {
        let ports = if vms.iter().any(|v| !v.ports.is_empty()) {
            self.switch.ports().unwrap_or_default()
        } else {
            Vec::new()
        };
        let disks = if vms.iter().any(|v| !v.served_disks.is_empty()) {
            self.storage.disks().unwrap_or_default()
        } else {
            Vec::new()
        };
        vms.iter()
            .map(|vm| {
                let mut r = self.vmm_counters(vm);
                let devs = &mut r.devices;
                for (label, svc) in &vm.served_disks {
                    devs.extend(
                        disks
                            .iter()
                            .find(|d| d["name"] == svc.as_str())
                            .and_then(|d| metrics::storage_disk(label, d)),
                    );
                }
                for (label, net, port) in &vm.ports {
                    devs.extend(
                        ports
                            .iter()
                            .find(|p| p["network"] == net.as_str() && p["port"] == port.as_str())
                            .and_then(|p| metrics::switch_port(label, p)),
                    );
                }
                devs.sort_by_key(|d| d.kind != DeviceKind::Disk);
                metrics::unique_names(devs);
                (vm.id, r)
            })
            .collect()
    }

    /// The disks and nets the VMM of `vm` serves itself, and the exits that reached it by its
    /// own causes, from its control socket (none when it has none, as a VMM adopted from an
    /// older daemon, or does not answer in time).
    fn vmm_counters(&self, vm: &LiveVm) -> VmmReading {
        if !Self::has_control_socket(Some(vm.pid)) || !alive_now(&vm.run) {
            return VmmReading::default();
        }
        let Ok(dir) = self.store.vm_dir(&vm.name) else {
            return VmmReading::default();
        };
        let sock = dir.join(supervisor::API_SOCKET);
        match http::request_with(
            &sock,
            "GET",
            "/vm/counters",
            None,
            None,
            Some(VMM_READ_TIMEOUT),
        ) {
            Ok((200, body)) => serde_json::from_str(&body)
                .map(|v| VmmReading {
                    devices: metrics::vmm_devices(&v),
                    exits: metrics::vmm_exits(&v),
                    hot: metrics::vmm_hotplugged(&v),
                })
                .unwrap_or_default(),
            _ => VmmReading::default(),
        }
    }

    /// Lets go of what served the hot-plugged devices a guest ejected by itself (the daemon
    /// recorded them; the VMM, in `seen`, no longer has them). Only under the VM's lifecycle
    /// lock, taken without waiting, and on a fresh reading: an add or remove in flight holds
    /// the lock, and an add that ended since `seen` was read shows in the fresh one.
    fn reap_ejected(&self, vms: &[LiveVm], seen: &HashMap<u64, VmmReading>) {
        for vm in vms {
            let Some(present) = seen.get(&vm.id).and_then(|r| r.hot.as_ref()) else {
                continue;
            };
            // Those of its definition (every device the VMM took) and any whose backend the
            // daemon holds (one the store could not record).
            let mut recorded: Vec<String> = self
                .hot
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&vm.id)
                .map(|v| v.iter().map(|(d, _)| d.clone()).collect())
                .unwrap_or_default();
            if let Some(w) = self.lock().worlds.iter().find(|w| w.id == vm.id) {
                for h in &w.hot {
                    if !recorded.contains(&h.id) {
                        recorded.push(h.id.clone());
                    }
                }
            }
            let gone: Vec<String> = recorded
                .into_iter()
                .filter(|d| !present.contains(d))
                .collect();
            if gone.is_empty() {
                continue;
            }
            let Ok((_, lc)) = self.lifecycle(&vm.name) else {
                continue;
            };
            let Ok(_serial) = lc.try_lock() else {
                continue; // an operation in flight: the next tick looks again
            };
            let Some(now) = self.vmm_counters(vm).hot else {
                continue;
            };
            for d in gone.iter().filter(|d| !now.contains(d)) {
                eprintln!(
                    "wv host: VM '{}' ejected device {d} by itself: it leaves the definition, \
                     and what served it is let go of",
                    vm.name
                );
                self.release_hot(vm.id, d);
                if let Err((_, e)) = self.forget_hot(vm.id, &vm.name, d) {
                    eprintln!("wv host: {e}");
                }
            }
        }
    }

    /// One point of history for every running world (the sampler's tick, each second). The
    /// VMMs' exit counters and the devices' counters are read after the document lock is
    /// released.
    fn sample_history(&self) {
        let (stats, vmms) = {
            let doc = self.lock();
            (self.every_stats(&doc), self.live_vms(&doc))
        };
        let mut devices = self.device_readings(&vmms);
        self.reap_ejected(&vmms, &devices);
        let readings = stats
            .into_iter()
            .map(|s| {
                let exits = vmms.iter().find(|vm| vm.id == s.id).map(|vm| {
                    metrics::exit_totals(&metrics::vcpu_counters(vm.pid, vm.run.pidfd.as_fd()))
                });
                let mut threads: Vec<(String, u64)> = Vec::new();
                for t in &s.threads {
                    match threads.iter_mut().find(|(n, _)| *n == t.name) {
                        Some((_, ns)) => *ns += t.cpu_ns,
                        None => threads.push((t.name.clone(), t.cpu_ns)),
                    }
                }
                let (exits, mut exit_causes) = match exits {
                    Some((all, causes)) => (Some(all), causes),
                    None => (None, Vec::new()),
                };
                let VmmReading {
                    devices,
                    exits: vmm_exits,
                    ..
                } = devices.remove(&s.id).unwrap_or_default();
                // The VMM's finer causes (which device, which call) beside KVM's.
                exit_causes.extend(
                    vmm_exits
                        .into_iter()
                        .map(|(cause, n)| (format!("{}{cause}", metrics::VMM_CAUSE), n)),
                );
                crate::history::Reading {
                    id: s.id,
                    devices,
                    name: s.name,
                    cpu_ns: s.cpu_ns,
                    ready_ns: s.ready_ns,
                    throttled_ns: s.throttled_ns,
                    exits,
                    threads,
                    exit_causes,
                }
            })
            .collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(now, std::time::Instant::now(), readings);
    }

    /// `GET /metrics`: every world's accounting, state and settings, and each running VM's
    /// exit counters (KVM's, per vCPU) and guest time, in the Prometheus text format. The
    /// VMMs are read after the document lock is released, so a slow read never holds up the
    /// API or the scheduler.
    fn metrics(&self) -> Answer {
        let (stats, worlds, live) = {
            let doc = self.lock();
            let stats = self.every_stats(&doc);
            let worlds: Vec<(u64, String, State)> = doc
                .worlds
                .iter()
                .map(|w| (w.id, w.spec.name.clone(), w.state))
                .collect();
            (stats, worlds, self.live_vms(&doc))
        };
        let devices = self.device_readings(&live);
        let vmms: Vec<(String, u32, &Arc<Run>)> = live
            .iter()
            .map(|vm| (vm.name.clone(), vm.pid, &vm.run))
            .collect();
        let world = |s: &WorldStats| vec![("world", s.name.clone()), ("id", s.id.to_string())];
        let each = |f: &dyn Fn(&WorldStats) -> Option<f64>| -> Samples {
            stats
                .iter()
                .filter_map(|s| Some((world(s), f(s)?)))
                .collect()
        };
        let mut t = metrics::Text::default();
        t.family(
            "wv_world_cpu_seconds_total",
            "counter",
            "CPU time used by the world's threads (its VMM process), seconds.",
            &each(&|s| Some(metrics::seconds(s.cpu_ns))),
        );
        t.family(
            "wv_world_ready_seconds_total",
            "counter",
            "Time the world's threads were runnable but waiting for a CPU, seconds.",
            &each(&|s| Some(metrics::seconds(s.ready_ns))),
        );
        t.family(
            "wv_world_throttled_seconds_total",
            "counter",
            "Time the world was held back by its CPU limit (CFS throttling), seconds.",
            &each(&|s| Some(metrics::seconds(s.throttled_ns))),
        );
        t.family(
            "wv_world_shares",
            "gauge",
            "Scheduler shares of the world (1-10000).",
            &each(&|s| Some(f64::from(s.shares))),
        );
        t.family(
            "wv_world_entitlement_cpus",
            "gauge",
            "CPUs the world is entitled to now if it competes (0 for the system worlds).",
            &each(&|s| Some(s.entitlement)),
        );
        t.family(
            "wv_world_reservation_cpus",
            "gauge",
            "CPUs guaranteed to the world while it runs.",
            &each(&|s| Some(s.reservation)),
        );
        t.family(
            "wv_world_limit_cpus",
            "gauge",
            "CPUs the world may use at most (absent: no limit).",
            &each(&|s| s.limit),
        );
        const STATES: [State; 6] = [
            State::Defined,
            State::Starting,
            State::Running,
            State::Paused,
            State::Stopped,
            State::Crashed,
        ];
        let system = stats
            .iter()
            .filter(|s| s.id < helper::FIRST_VM_ID)
            .map(|s| (s.id, s.name.clone(), s.state));
        let mut state: Samples = Vec::new();
        for (id, name, now) in system.chain(worlds) {
            for st in STATES {
                let label = serde_json::to_value(st)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                state.push((
                    vec![
                        ("world", name.clone()),
                        ("id", id.to_string()),
                        ("state", label),
                    ],
                    if st == now { 1.0 } else { 0.0 },
                ));
            }
        }
        t.family(
            "wv_world_state",
            "gauge",
            "1 for the state the world is in, 0 for the others.",
            &state,
        );
        let (mut exits, mut by_cause, mut guest) = (Vec::new(), Vec::new(), Vec::new());
        for (vm, pid, run) in &vmms {
            for (index, counters) in metrics::vcpu_counters(*pid, run.pidfd.as_fd()) {
                let labels = vec![("vm", vm.clone()), ("vcpu", index.to_string())];
                for (name, n) in counters {
                    if name == "exits" {
                        exits.push((labels.clone(), n as f64));
                    } else if let Some(cause) = name.strip_suffix("_exits") {
                        let mut l = labels.clone();
                        l.push(("cause", cause.to_string()));
                        by_cause.push((l, n as f64));
                    }
                }
            }
            if let Some(ns) = metrics::guest_ns(*pid).filter(|_| alive_now(run)) {
                guest.push((vec![("vm", vm.clone())], metrics::seconds(ns)));
            }
        }
        t.family(
            "wv_vm_exits_total",
            "counter",
            "VM exits of each vCPU, those KVM handles in the kernel included (KVM's exits counter).",
            &exits,
        );
        t.family(
            "wv_vm_exits_by_cause_total",
            "counter",
            "VM exits of each vCPU by KVM's cause counters (io, mmio, halt, irq, irq_window, signal...).",
            &by_cause,
        );
        let vmm_exits: Samples = live
            .iter()
            .flat_map(|vm| {
                let by = devices
                    .get(&vm.id)
                    .map(|r| r.exits.as_slice())
                    .unwrap_or_default();
                by.iter().map(|(cause, n)| {
                    (
                        vec![("vm", vm.name.clone()), ("cause", cause.clone())],
                        *n as f64,
                    )
                })
            })
            .collect();
        t.family(
            "wv_vm_vmm_exits_total",
            "counter",
            "VM exits that reached the VMM, all vCPUs, by the VMM's own causes (io:DEVICE, mmio:DEVICE, hypercall:CALL, hlt, signal...).",
            &vmm_exits,
        );
        let (mut bytes, mut ops) = (Vec::new(), Vec::new());
        for vm in &live {
            for d in devices.get(&vm.id).into_iter().flat_map(|r| &r.devices) {
                let kind = match d.kind {
                    DeviceKind::Disk => "disk",
                    DeviceKind::Net => "net",
                };
                let [din, dout] = metrics::directions(d.kind);
                for (dir, b, n) in [(din, d.in_bytes, d.in_ops), (dout, d.out_bytes, d.out_ops)] {
                    let labels = vec![
                        ("vm", vm.name.clone()),
                        ("device", d.name.clone()),
                        ("kind", kind.to_string()),
                        ("direction", dir.to_string()),
                    ];
                    bytes.push((labels.clone(), b as f64));
                    ops.push((labels, n as f64));
                }
            }
        }
        t.family(
            "wv_vm_device_bytes_total",
            "counter",
            "Bytes a VM's disk read (direction read, disk to guest) and wrote, or its net received (rx) and sent (tx, Ethernet frames without the vnet header), as the device's server counts them (the VMM, the storage service or the switch).",
            &bytes,
        );
        t.family(
            "wv_vm_device_operations_total",
            "counter",
            "Requests a VM's disk served (reads, writes) or frames its net received (rx) and sent (tx).",
            &ops,
        );
        t.family(
            "wv_vm_guest_seconds_total",
            "counter",
            "CPU time the VMM process spent running guest code (clock-tick resolution), seconds; the rest of wv_world_cpu_seconds_total is the VMM and the host kernel.",
            &guest,
        );
        self.memory_metrics(&mut t);
        Answer {
            status: 200,
            headers: vec![format!("Content-Type: {}", metrics::CONTENT_TYPE)],
            body: t.finish(),
            exit: false,
        }
    }

    /// Handles one request.
    pub fn handle(self: &Arc<Self>, req: &Request) -> Answer {
        let segs = match http::segments(&req.path) {
            Ok(s) => s,
            Err(HttpError(status, msg)) => return error(status, msg).into(),
        };
        let parts: Vec<&str> = segs.iter().map(String::as_str).collect();
        let Some(methods) = allowed(&parts) else {
            return error(404, format!("no such resource: {}", req.path)).into();
        };
        if !methods.contains(&req.method.as_str()) {
            return Answer {
                headers: vec![format!("Allow: {}", methods.join(", "))],
                ..error(
                    405,
                    format!("{} is not allowed on {}", req.method, req.path),
                )
                .into()
            };
        }
        if parts == ["metrics"] {
            return self.metrics();
        }
        if parts == ["v1", "host", "shutdown"] {
            return self.shutdown();
        }
        match (req.method.as_str(), parts.as_slice()) {
            ("GET", ["v1", "host"]) => self.host(),
            ("GET", ["v1", "host", "memory"]) => self.host_memory(),
            ("GET", ["v1", "host", "storage"]) => self.host_storage(),
            ("PUT", ["v1", "host", "storage"]) => self.set_host_storage(&req.body),
            ("GET", ["v1", "vms"]) => ok(200, &self.lock().worlds),
            ("POST", ["v1", "vms"]) => self.create(&req.body),
            ("GET", ["v1", "vms", name]) => self.vm_info(name),
            ("PATCH", ["v1", "vms", name]) => self.set(name, &req.body),
            ("GET", ["v1", "vms", name, "stats"]) => self.stats(name),
            ("GET", ["v1", "vms", name, "balloon"]) => self.balloon(name, None),
            ("PUT", ["v1", "vms", name, "balloon"]) => self.balloon(name, Some(&req.body)),
            ("POST", ["v1", "vms", name, "devices"]) => self.device_add(name, &req.body),
            ("DELETE", ["v1", "vms", name, "devices", dev]) => self.device_remove(name, dev),
            ("PUT", ["v1", "vms", name, "devices", dev, "path"]) => {
                self.device_path(name, dev, &req.body)
            }
            ("GET", ["v1", "stats"]) => self.all_stats(),
            ("GET", ["v1", "history"]) => ok(
                200,
                &json!({
                    "interval_s": 1,
                    "points": crate::history::POINTS,
                    "worlds": self.history.lock().unwrap_or_else(|p| p.into_inner()).all(),
                }),
            ),
            ("DELETE", ["v1", "vms", name]) => self.delete(name),
            ("POST", ["v1", "vms", name, "start"]) => self.start(name),
            ("POST", ["v1", "vms", name, "stop"]) => self.stop(name),
            ("POST", ["v1", "vms", name, "pause"]) => {
                self.control_state(name, State::Running, State::Paused)
            }
            ("POST", ["v1", "vms", name, "resume"]) => {
                self.control_state(name, State::Paused, State::Running)
            }
            ("POST", ["v1", "vms", name, "snapshot"]) => self.snapshot(name, &req.body),
            ("POST", ["v1", "vms", name, "restore"]) => self.restore(name, &req.body),
            ("POST", ["v1", "vms", name, "incoming"]) => self.incoming(name, &req.body),
            ("POST", ["v1", "vms", name, "migrate"]) => self.migrate(name, &req.body),
            ("GET", ["v1", "networks"]) => self.networks(),
            ("POST", ["v1", "networks"]) => self.create_network(&req.body),
            ("GET", ["v1", "networks", net]) => self.network_info(net),
            ("DELETE", ["v1", "networks", net]) => self.delete_network(net),
            ("GET", ["v1", "snapshots"]) => self.snapshots(),
            ("DELETE", ["v1", "snapshots", snap]) => self.delete_snapshot(snap),
            ("POST", ["v1", "snapshots", snap, "clone"]) => self.clone_vms(snap, &req.body),
            _ => error(404, format!("no such resource: {}", req.path)),
        }
        .into()
    }

    fn host(&self) -> Reply {
        let doc = self.lock();
        let count = |s: State| doc.worlds.iter().filter(|w| w.state == s).count();
        ok(
            200,
            &json!({
                "version": env!("CARGO_PKG_VERSION"),
                "vms": doc.worlds.len(),
                "running": count(State::Running),
                "crashed": count(State::Crashed),
                "socket": self.socket,
                "host_cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
                "host_memory": wv_config::host_ram(),
                "scheduler": match &self.cgroups {
                    Ok(c) => c.describe(),
                    Err(e) => format!("unavailable: {e}"),
                },
                "placement": self.placement().mode.as_str(),
            }),
        )
    }

    /// `GET /v1/vms/{name}`: the world, with its memory as the lending policy last saw it
    /// (`memory`) while the policy runs.
    fn vm_info(&self, name: &str) -> Reply {
        let (id, mut v, spec) = {
            let doc = self.lock();
            match doc.worlds.iter().find(|w| w.spec.name == name) {
                Some(w) => (
                    w.id,
                    serde_json::to_value(w).unwrap_or_default(),
                    w.spec.clone(),
                ),
                None => return error(404, format!("no VM named '{name}'")),
            }
        };
        if let (Some(m), Some(o)) = (self.world_memory(id), v.as_object_mut()) {
            o.insert("memory".into(), json!(m));
        }
        let served = self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .is_some_and(|v| !v.is_empty());
        if served {
            let disks = self.storage.disks().unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "served_disks".into(),
                    json!(self.served_disk_stats(id, &spec, &disks)),
                );
            }
        }
        ok(200, &v)
    }

    fn create(&self, body: &[u8]) -> Reply {
        let spec: VmSpec = match object(body, "VM spec") {
            Ok(s) => s,
            Err(r) => return r,
        };
        self.define(spec)
    }

    /// Adds the VM `spec` to the table (201), or says why not.
    fn define(&self, spec: VmSpec) -> Reply {
        if let Err(e) = spec.validate().and_then(|()| self.check_images(&spec)) {
            return error(422, e);
        }
        let mut doc = self.lock();
        if let Err(e) = Self::check_networks(&doc, &spec) {
            return error(422, e);
        }
        if doc.worlds.iter().any(|w| w.spec.name == spec.name) {
            return error(409, format!("a VM named '{}' exists already", spec.name));
        }
        if doc.worlds.len() >= MAX_VMS {
            return error(
                409,
                format!("this daemon holds {MAX_VMS} VMs, its most: delete one first"),
            );
        }
        let id = doc.next_id.max(helper::FIRST_VM_ID);
        doc.next_id = id + 1;
        let w = World {
            id,
            spec,
            state: State::Defined,
            pid: None,
            reason: None,
            console: None,
            hot: Vec::new(),
        };
        doc.worlds.push(w.clone());
        if let Err(e) = self.save(&doc) {
            doc.worlds.pop();
            doc.next_id = id;
            return e;
        }
        ok(201, &w)
    }

    /// Every network `spec`'s nets name exists.
    fn check_networks(doc: &Document, spec: &VmSpec) -> Result<(), String> {
        for n in &spec.config.nets {
            if let Some(net) = &n.network {
                if !doc.networks.iter().any(|x| &x.name == net) {
                    return Err(format!(
                        "nets: no network named '{net}' (wv net create {net})"
                    ));
                }
            }
        }
        Ok(())
    }

    fn delete(&self, name: &str) -> Reply {
        let (id, lc) = match self.lifecycle(name) {
            Ok(x) => x,
            Err(r) => return r,
        };
        let _serial = lc.lock().unwrap_or_else(|p| p.into_inner());
        let mut doc = self.lock();
        let Some(i) = doc.worlds.iter().position(|w| w.id == id) else {
            return error(404, format!("no VM named '{name}'"));
        };
        // An incoming VM still waiting for its migration (its guest never ran here) is called
        // off: its VMM ends, and with it the VM (see `finished`).
        if doc.worlds[i].state == State::Starting {
            if let Some(run) = self.run_of(id) {
                drop(doc);
                if let Err(r) = self.terminate(id, name, &run) {
                    return r;
                }
                doc = self.lock();
                match doc.worlds.iter().position(|w| w.id == id) {
                    None => return (204, String::new()),
                    Some(j) if is_live(doc.worlds[j].state) => {
                        return error(409, format!("VM '{name}' runs now: stop it first"))
                    }
                    Some(_) => {}
                }
            }
        }
        let Some(i) = doc.worlds.iter().position(|w| w.id == id) else {
            return error(404, format!("no VM named '{name}'"));
        };
        if is_live(doc.worlds[i].state) {
            return error(
                409,
                format!("VM '{name}' is {:?}: stop it first", doc.worlds[i].state).to_lowercase(),
            );
        }
        let w = doc.worlds.remove(i);
        if let Err(e) = self.save(&doc) {
            doc.worlds.insert(i, w);
            return e;
        }
        self.discard_files(name, id);
        drop(doc);
        self.lifecycle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        (204, String::new())
    }

    /// Moves the folder of VM `name` (world `id`) out of the way now, under the caller's
    /// locks, so that a VM created next with the same name gets a fresh one; only its removal
    /// is left to the background.
    fn discard_files(&self, name: &str, id: u64) {
        match self.store.discard_vm_dir(name, id) {
            Ok(None) => {}
            Ok(Some(trash)) => {
                let d = self.store.clone();
                if let Err(e) = helper::spawn("cleanup", move || {
                    if let Err(e) = d.remove_trash(Some(&trash)) {
                        eprintln!("wv host: removing {}: {e}", trash.display());
                    }
                }) {
                    eprintln!("wv host: removing the files of VM '{name}': {e}");
                }
            }
            Err(e) => eprintln!("wv host: leaving the files of VM '{name}' alone: {e}"),
        }
    }

    fn start(self: &Arc<Self>, name: &str) -> Reply {
        self.start_with(name, StartFrom::Definition)
    }

    /// Starts the VMM of `name`: booting its definition, from a snapshot (with a new identity
    /// when it is a clone), whose configuration then becomes the VM's, or waiting for a live
    /// migration (the world is `starting` until its guest runs: [`Daemon::await_guest`]).
    fn start_with(self: &Arc<Self>, name: &str, from: StartFrom<'_>) -> Reply {
        let (id, lc) = match self.lifecycle(name) {
            Ok(x) => x,
            Err(r) => return r,
        };
        let _serial = lc.lock().unwrap_or_else(|p| p.into_inner());
        let mut doc = self.lock();
        let w = match Self::world(&mut doc, id, name) {
            Ok(w) => w,
            Err(r) => return r,
        };
        if is_live(w.state) {
            return error(409, format!("VM '{name}' is running already"));
        }
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            return error(
                409,
                format!("VM '{name}' cannot start: the daemon is shutting down"),
            );
        }
        // From a snapshot the VM becomes the snapshot's (its name and scheduler settings
        // stay), but only once its VMM has started: a refused restore leaves it as it was.
        let mut spec = w.spec.clone();
        let (snapshot, incoming) = match from {
            StartFrom::Definition => (None, None),
            StartFrom::Incoming(addr, copy) => (None, Some((addr, copy))),
            StartFrom::Snapshot(snap, clone) => match self.read_snapshot(snap) {
                Ok((dir, meta)) => {
                    spec.config = meta.config;
                    (Some((dir, clone)), None)
                }
                Err(r) => return r,
            },
        };
        if let Err(e) = spec
            .validate()
            .and_then(|()| self.check_images(&spec))
            .and_then(|()| Self::check_networks(&doc, &spec))
        {
            return error(409, format!("VM '{name}' cannot start: {e}"));
        }
        if let Err(r) = self.admit(&doc, &spec) {
            return r;
        }
        let dir = match self.store.vm_dir(name) {
            Ok(d) => d,
            Err(e) => return error(409, format!("VM '{name}' cannot start: {e}")),
        };
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return error(500, format!("creating {}: {e}", dir.display()));
        }
        let log = dir.join("vmm.log");
        let sock = dir.join("console.sock");
        // Where a migration's copied disks land (the same rule as the definition's paths,
        // wv_config::copied_disk_places): raw images in the folder's `disks`, VMKFS disks in
        // the datastore the definition names for them.
        let copied = dir.join(COPIED_DISKS);
        let copied_datastore = spec
            .config
            .disks
            .iter()
            .find(|d| d.vmkfs.is_some() && !d.readonly)
            .map(|d| d.path.clone());
        // This run's world, for the names of its switch ports and served disks.
        let this = World {
            id,
            spec: spec.clone(),
            state: State::Defined,
            pid: None,
            reason: None,
            console: None,
            hot: Vec::new(),
        };
        // Nets on the daemon's networks: a port of the switch each, whose socket the VMM gets.
        let ports = switch_ports(&this);
        let mut vmm_config = spec.config.clone();
        {
            let mut made = Vec::new();
            let mut k = 0;
            for n in vmm_config.nets.iter_mut() {
                let Some(net) = n.network.clone() else {
                    continue;
                };
                let (_, port) = &ports[k];
                k += 1;
                let added = self.switch.add_port(&net, port).and_then(|sock| {
                    made.push((net.clone(), port.clone()));
                    let s = spec.net_shares();
                    if s.any() {
                        self.switch.set_shares(&net, port, &s)?;
                    }
                    Ok(sock)
                });
                match added {
                    Ok(sock) => n.vhost_user = Some(sock),
                    Err(e) => {
                        for (n, p) in made {
                            self.switch.del_port(&n, &p);
                        }
                        return error(500, format!("VM '{name}': network {net}: {e}"));
                    }
                }
            }
            self.ports
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, made);
        }
        // Disks the storage service serves: it opens and holds each (the VMKFS lock, as the
        // host's world), and the VMM gets its socket.
        {
            let mut made = Vec::new();
            for (i, disk, source) in served_disks(&this) {
                let d = &mut vmm_config.disks[i];
                let added = self.storage.add_disk(&disk, &source).and_then(|sock| {
                    let s = spec.disk_shares();
                    if s.any() {
                        if let Err(e) = self.storage.set_shares(&disk, &s) {
                            self.storage.del_disk(&disk);
                            return Err(storage::AddError::Unavailable(e));
                        }
                    }
                    Ok(sock)
                });
                match added {
                    Ok(sock) => {
                        made.push(disk);
                        d.path = sock;
                        d.vmkfs = None;
                        d.vhost_user = true;
                        d.via = wv_config::DiskVia::Vmm;
                    }
                    Err(e) => {
                        let id_ = d.id.clone();
                        self.served
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(id, made);
                        self.release_ports(id);
                        let status = match e {
                            storage::AddError::Refused(_) => 409,
                            storage::AddError::Unavailable(_) => 500,
                        };
                        return error(status, format!("VM '{name}' cannot start: disk {id_}: {e}"));
                    }
                }
            }
            self.served
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, made);
        }
        // A restored or migrated VM connects to this run's ports, not to those its snapshot
        // or its source names.
        let sockets: Vec<(usize, PathBuf)> = vmm_config
            .nets
            .iter()
            .enumerate()
            .filter(|(_, n)| n.network.is_some())
            .filter_map(|(i, n)| Some((i, n.vhost_user.clone()?)))
            .collect();
        let config = match supervisor::write_config(&dir, &vmm_config) {
            Ok(p) => p,
            Err(e) => {
                self.release_ports(id);
                return error(500, format!("writing the VMM's configuration: {e}"));
            }
        };
        // From links to the snapshot's files in the VM's folder, which a deletion of the
        // snapshot cannot take away before the VMM has opened them.
        let held = match &snapshot {
            Some((d, _)) => match hold_snapshot(d, &dir) {
                Ok(held) => Some(held),
                Err(e) => {
                    self.release_ports(id);
                    return error(
                        500,
                        format!(
                            "linking the files of snapshot {} into {} for the VMM: {e}",
                            d.display(),
                            dir.display()
                        ),
                    );
                }
            },
            None => None,
        };
        let boot = match (&snapshot, incoming, &held) {
            (_, Some((addr, copy)), _) => supervisor::Boot::Incoming {
                addr,
                copy: copy.then_some((copied.as_path(), copied_datastore.as_deref())),
                sockets: &sockets,
            },
            (Some((_, clone)), None, Some(held)) => supervisor::Boot::Restore {
                dir: held,
                clone: *clone,
                sockets: &sockets,
            },
            _ => supervisor::Boot::Config(&config),
        };
        let mut args = supervisor::run_args(boot, &dir);
        // The files a jailed VMM gets opened are those of the daemon's definition, never
        // those a snapshot's or a migration's own configuration names.
        let jail = match self.jail(id, &dir, Some(config.as_path())) {
            Ok(j) => j,
            Err(e) => {
                release_snapshot(&dir);
                self.release_ports(id);
                return error(500, format!("VM '{name}' cannot start: {e}"));
            }
        };
        // A migration's disks, written by a jailed VMM of an earlier run, are vetted and
        // taken back before anything opens them as root (no link may point elsewhere).
        if incoming.is_none() && copied.is_dir() {
            if let Err(e) = take_back(&copied, None) {
                release_snapshot(&dir);
                self.release_ports(id);
                return error(
                    500,
                    format!("VM '{name}' cannot start: its migrated disks: {e}"),
                );
            }
        }
        if let Some(j) = &jail {
            args.extend(["--jail".to_string(), j.to_string()]);
            if incoming.is_some() {
                // The migration's raw disks land there, written by the VMM's user.
                if let Err(e) = Self::writable_by(Some(j), &copied) {
                    release_snapshot(&dir);
                    self.release_ports(id);
                    return error(500, format!("{}: {e}", copied.display()));
                }
            }
        }
        // Into the world's group before it runs, so that a jailed VMM (forked by its keeper)
        // starts there too.
        let procs = self
            .cgroups
            .as_ref()
            .ok()
            .and_then(|cg| cg.procs_file(id).ok());
        let mut child = match supervisor::spawn_in(&self.wv, &args, &log, procs) {
            Ok(c) => c,
            Err(e) => {
                release_snapshot(&dir);
                self.release_ports(id);
                return error(500, format!("starting the VMM: {e}"));
            }
        };
        // Not waited for yet, so the pid is still this child's: the pidfd names it for good.
        let run = match Pidfd::open(child.id()) {
            Ok(fd) => Run::new(fd),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                release_snapshot(&dir);
                self.release_ports(id);
                return error(500, format!("opening a pidfd for the VMM: {e}"));
            }
        };
        if let Ok(cg) = &self.cgroups {
            if let Err(e) = cg.attach(id, child.id()) {
                let _ = child.kill();
                let _ = child.wait();
                release_snapshot(&dir);
                self.release_ports(id);
                return error(500, format!("placing the VMM under the scheduler: {e}"));
            }
        }
        let w = match Self::world(&mut doc, id, name) {
            Ok(w) => w,
            Err(r) => return r,
        };
        w.spec = spec;
        w.state = if incoming.is_some() {
            State::Starting
        } else {
            State::Running
        };
        w.pid = Some(child.id());
        w.reason = None;
        w.console = Some(sock.display().to_string());
        w.hot.clear();
        let reply = ok(200, &*w);
        if let Err(e) = self.store.save(&doc) {
            eprintln!("wv host: world {id}: saving the state after its start: {e}");
        }
        self.rebalance(&doc);
        let this_run = run.clone();
        self.runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, run);
        drop(doc);
        let d = self.clone();
        let waiter = helper::spawn("wait", move || {
            let status = child.wait().ok();
            d.finished(id, status);
        });
        if let Err(e) = waiter {
            eprintln!("wv host: world {id}: no thread to wait for its VMM: {e}");
        }
        if matches!(from, StartFrom::Snapshot(..)) {
            // A restored VM runs on branches of the snapshot's VMKFS disks (and a clone on new
            // MACs): its definition takes them from its VMM, so that a later boot of it opens
            // its own disks, never the snapshot's source's.
            let (d, name) = (self.clone(), name.to_string());
            if let Err(e) = helper::spawn("restored", move || d.adopt_config(id, &name, &this_run))
            {
                eprintln!("wv host: world {id}: cannot ask its VMM for its configuration: {e}");
            }
        }
        reply
    }

    /// Takes the configuration the VMM of world `id` runs (`GET /vm` on its control socket,
    /// asked until it answers, for up to 10 s, or until `run` ends) into the world's
    /// definition. A VMM that answers holds its snapshot's files (memory mapped, state read):
    /// the links made for it ([`hold_snapshot`]) go then.
    fn adopt_config(&self, id: u64, name: &str, run: &Arc<Run>) {
        for _ in 0..200 {
            if let Ok((200, body)) = self.vmm_call(name, "GET", "/vm", None) {
                {
                    // Not if another run of the VM has started meanwhile (it needs its own).
                    let _doc = self.lock();
                    let current = self
                        .runs
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&id)
                        .is_some_and(|r| Arc::ptr_eq(r, run));
                    if current {
                        if let Ok(d) = self.store.vm_dir(name) {
                            release_snapshot(&d);
                        }
                    }
                }
                let parsed = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| {
                        serde_json::from_value::<wv_config::VmConfig>(v["config"].clone()).ok()
                    });
                let Some(mut config) = parsed else {
                    eprintln!("wv host: world {id}: its VMM's configuration does not read");
                    return;
                };
                forget_switch_sockets(&mut config);
                let mut doc = self.lock();
                if let Some(w) = doc
                    .worlds
                    .iter_mut()
                    .find(|w| w.id == id && is_live(w.state))
                {
                    // Only what a restore changes, never a file the VMM names by itself.
                    w.spec.config = match adoptable(&w.spec.config, &config) {
                        Ok(c) => c,
                        Err(e) => {
                            eprintln!(
                                "wv host: world {id}: its VMM's configuration is not taken: {e}"
                            );
                            return;
                        }
                    };
                    if let Err(e) = self.store.save(&doc) {
                        eprintln!("wv host: world {id}: saving the state: {e}");
                    }
                }
                return;
            }
            // Its end (which removes the links) stops the asking.
            if run.wait(Duration::from_millis(50)) {
                return;
            }
        }
        eprintln!("wv host: world {id}: its VMM never answered GET /vm");
    }

    /// One request to the control API of the VMM of `name` (`wv run --api-socket`): (status,
    /// body), or why the VMM could not be asked.
    fn vmm_call(
        &self,
        name: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), String> {
        self.vmm_call_passing(name, method, path, body, &[])
    }

    /// [`Daemon::vmm_call`], passing `files` with the request, each under the name the VMM
    /// would open it by (its table of handed-over files, crates/fds: how a jailed VMM gets a
    /// migration's connection or a restarted backend's socket).
    pub(crate) fn vmm_call_passing(
        &self,
        name: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
        files: &[(&str, std::os::fd::BorrowedFd<'_>)],
    ) -> Result<(u16, String), String> {
        let sock = self
            .store
            .vm_dir(name)
            .map_err(|e| e.to_string())?
            .join(supervisor::API_SOCKET);
        // A hung VMM cannot hold the VM's lifecycle lock for ever: a pause, resume or query
        // gets a minute, a snapshot or migration (which copy all memory) ten.
        let timeout = if path == "/vm/snapshot" || path == "/vm/migrate-send" {
            Duration::from_secs(600)
        } else if path == "/vm/shutdown" {
            STOP_GRACE
        } else {
            Duration::from_secs(60)
        };
        // A VMM just started binds its socket within milliseconds: a request that comes first
        // waits for it (a VMM that has ended answers nothing, and the caller says so).
        let mut tries = 0;
        loop {
            let sent = if files.is_empty() {
                http::request_with(&sock, method, path, body, None, Some(timeout))
            } else {
                http::request_passing(&sock, method, path, body, files, Some(timeout))
            };
            match sent {
                Ok(a) => return Ok(a),
                Err(e)
                    if tries < 100
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                        ) =>
                {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(format!("its VMM's control socket {}: {e}", sock.display())),
            }
        }
    }

    /// Whether the VMM `pid` was started with a control socket (every VMM this daemon starts
    /// is; one an older daemon started and this one adopted may not be).
    fn has_control_socket(pid: Option<u32>) -> bool {
        pid.and_then(|p| std::fs::read(format!("/proc/{p}/cmdline")).ok())
            .is_none_or(|c| c.split(|&b| b == 0).any(|a| a == b"--api-socket"))
    }

    /// Pause or resume through the VMM's control socket: every vCPU parked at a KVM_RUN
    /// boundary, device workers quiesced, the guest's clock stopped (docs/vmm-openapi.json).
    /// A VMM started by an older daemon, without a control socket, gets SIGSTOP/SIGCONT.
    fn control_state(&self, name: &str, from: State, to: State) -> Reply {
        let (id, lc) = match self.lifecycle(name) {
            Ok(x) => x,
            Err(r) => return r,
        };
        let _serial = lc.lock().unwrap_or_else(|p| p.into_inner());
        let run = {
            let mut doc = self.lock();
            let w = match Self::world(&mut doc, id, name) {
                Ok(w) => w,
                Err(r) => return r,
            };
            match self.run_of(id).filter(|_| w.state == from) {
                Some(run) => run,
                None => {
                    return error(
                        409,
                        format!("VM '{name}' is {:?}, not {:?}", w.state, from).to_lowercase(),
                    )
                }
            }
        };
        let op = if to == State::Paused {
            "pause"
        } else {
            "resume"
        };
        let pid = self
            .lock()
            .worlds
            .iter()
            .find(|w| w.id == id)
            .and_then(|w| w.pid);
        let has_socket = Self::has_control_socket(pid);
        if has_socket {
            // Not under the document lock: a pause waits for every vCPU to park.
            match self.vmm_call(name, "PUT", &format!("/vm/{op}"), None) {
                Ok((204, _)) => {}
                Ok((status, body)) => {
                    return error(
                        409,
                        format!("VM '{name}': its VMM answered {status} to {op}: {body}"),
                    )
                }
                Err(e) => return error(409, format!("VM '{name}': {e}")),
            }
        } else {
            let sig = if to == State::Paused {
                libc::SIGSTOP
            } else {
                libc::SIGCONT
            };
            if let Err(e) = run.pidfd.signal(sig) {
                return error(409, format!("VM '{name}': {e}"));
            }
        }
        let mut doc = self.lock();
        let w = match Self::world(&mut doc, id, name) {
            Ok(w) => w,
            Err(r) => return r,
        };
        w.state = to;
        let reply = ok(200, &*w);
        if let Err(e) = self.store.save(&doc) {
            eprintln!("wv host: world {id}: saving the state: {e}");
        }
        reply
    }

    /// The snapshot `snap` (its folder and what the daemon recorded of it), or 404.
    fn read_snapshot(&self, snap: &str) -> Result<(PathBuf, SnapshotMeta), Reply> {
        let dir = self
            .store
            .snapshot_dir(snap)
            .map_err(|e| error(404, e.to_string()))?;
        let meta = std::fs::read(dir.join(SNAPSHOT_META))
            .map_err(|_| error(404, format!("no snapshot named '{snap}'")))?;
        let mut meta: SnapshotMeta = serde_json::from_slice(&meta)
            .map_err(|e| error(500, format!("snapshot '{snap}': {SNAPSHOT_META}: {e}")))?;
        forget_switch_sockets(&mut meta.config);
        Ok((dir, meta))
    }

    /// `POST /v1/vms/{name}/snapshot`: the running (or paused) VM's state and memory into the
    /// daemon's snapshot `snapshot`, through its VMM's control socket (docs/SNAPSHOT.md).
    fn snapshot(&self, name: &str, body: &[u8]) -> Reply {
        let req: SnapshotRequest = match object(body, "snapshot request") {
            Ok(r) => r,
            Err(r) => return r,
        };
        let dir = match self.store.snapshot_dir(&req.snapshot) {
            Ok(d) => d,
            Err(e) => return error(422, e.to_string()),
        };
        let (id, lc) = match self.lifecycle(name) {
            Ok(x) => x,
            Err(r) => return r,
        };
        let _serial = lc.lock().unwrap_or_else(|p| p.into_inner());
        let (config, pid) = {
            let mut doc = self.lock();
            let w = match Self::world(&mut doc, id, name) {
                Ok(w) => w,
                Err(r) => return r,
            };
            if !matches!(w.state, State::Running | State::Paused) {
                return error(409, format!("VM '{name}' is not running"));
            }
            if let Some(d) = storage::served_disk(&w.spec.config) {
                // Its VMM holds no disk to branch: the service does.
                return error(
                    422,
                    format!("VM '{name}': disk {} is served by the storage service (via=storage), which does not take snapshots of its disks (VMKFS branches) yet: snapshots of this VM are not supported", d.id),
                );
            }
            (w.spec.config.clone(), w.pid)
        };
        if let Err(e) = std::fs::create_dir_all(self.store.snapshots_dir()) {
            return error(500, format!("creating the snapshot folder: {e}"));
        }
        // Made here, atomically, so that two snapshots of one name (of two VMs: each holds
        // only its own VM's lock) cannot both pass a check and write into one folder; the
        // VMM takes an empty folder.
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return error(
                    409,
                    format!("a snapshot named '{}' exists already", req.snapshot),
                )
            }
            Err(e) => return error(500, format!("creating {}: {e}", dir.display())),
        }
        // A jailed VMM sees only its own folder: it writes the snapshot there, as its user,
        // and the daemon takes the files (checked, as root's) into the snapshot's folder.
        let jail = pid.and_then(jail_of);
        let partial = match self.store.vm_dir(name) {
            Ok(d) if jail.is_some() => Some(d.join(SNAPSHOT_PARTIAL)),
            _ => None,
        };
        if let Some(p) = &partial {
            let _ = std::fs::remove_dir_all(p);
            if let Err(e) = Self::writable_by(jail.as_ref(), p) {
                let _ = std::fs::remove_dir_all(&dir);
                return error(500, format!("{}: {e}", p.display()));
            }
        }
        let to = partial.as_ref().unwrap_or(&dir);
        let body = json!({ "destination": to, "allow_raw_disk": req.allow_raw_disk });
        let answer = match self.vmm_call(name, "PUT", "/vm/snapshot", Some(&body.to_string())) {
            Ok((200, a)) => match partial.as_ref().map(|p| {
                let vmm = pid.map_or(0, supervisor::vmm_process);
                take_snapshot_files(p, &dir, vmm)
            }) {
                Some(Err(e)) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return error(500, format!("VM '{name}': taking its VMM's snapshot: {e}"));
                }
                _ => a,
            },
            Ok((status, a)) => {
                // The VMM's refusal as it gave it (422 disks); nothing left behind.
                let _ = std::fs::remove_dir_all(&dir);
                if let Some(p) = &partial {
                    let _ = std::fs::remove_dir_all(p);
                }
                let status = if (400..500).contains(&status) {
                    status
                } else {
                    500
                };
                let msg = serde_json::from_str::<serde_json::Value>(&a)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_string))
                    .unwrap_or(a);
                return error(status, format!("VM '{name}': {msg}"));
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                if let Some(p) = &partial {
                    let _ = std::fs::remove_dir_all(p);
                }
                return error(409, format!("VM '{name}': {e}"));
            }
        };
        let taken: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
        let meta = SnapshotMeta {
            name: req.snapshot.clone(),
            vm: name.to_string(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            memory_bytes: taken["memory_bytes"].as_u64().unwrap_or(0),
            state_bytes: taken["state_bytes"].as_u64().unwrap_or(0),
            duration_ms: taken["duration_ms"].as_f64().unwrap_or(0.0),
            config,
        };
        let write = serde_json::to_vec_pretty(&meta)
            .map_err(std::io::Error::other)
            .and_then(|b| {
                let tmp = dir.join(format!("{SNAPSHOT_META}.tmp"));
                std::fs::write(&tmp, b)?;
                std::fs::rename(&tmp, dir.join(SNAPSHOT_META))
            });
        if let Err(e) = write {
            // Without its record the folder would hold the name yet be neither listed nor
            // deletable.
            let _ = std::fs::remove_dir_all(&dir);
            return error(500, format!("recording snapshot '{}': {e}", req.snapshot));
        }
        ok(201, &meta)
    }

    /// `GET /v1/snapshots`: what the daemon recorded of each snapshot, by name.
    fn snapshots(&self) -> Reply {
        let mut all: Vec<SnapshotMeta> = std::fs::read_dir(self.store.snapshots_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                self.read_snapshot(&name).ok().map(|(_, m)| m)
            })
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        ok(200, &all)
    }

    /// `DELETE /v1/snapshots/{snap}`. VMs restored from it keep running: their memory maps
    /// the file, which the kernel keeps until the last of them ends.
    /// A snapshot whose record cannot be read any more is removed too: the record is what
    /// makes the folder a snapshot, not what it says.
    fn delete_snapshot(&self, snap: &str) -> Reply {
        let dir = match self.store.snapshot_dir(snap) {
            Ok(d) if d.join(SNAPSHOT_META).is_file() => d,
            Ok(_) => return error(404, format!("no snapshot named '{snap}'")),
            Err(e) => return error(404, e.to_string()),
        };
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => (204, String::new()),
            Err(e) => error(500, format!("removing snapshot '{snap}': {e}")),
        }
    }

    /// `POST /v1/vms/{name}/restore`: starts the stopped VM `name` from a snapshot instead of
    /// booting it; the snapshot's configuration becomes the VM's.
    fn restore(self: &Arc<Self>, name: &str, body: &[u8]) -> Reply {
        let req: RestoreRequest = match object(body, "restore request") {
            Ok(r) => r,
            Err(r) => return r,
        };
        self.start_with(name, StartFrom::Snapshot(&req.snapshot, false))
    }

    /// `POST /v1/snapshots/{snap}/clone`: `count` new VMs (`name`, or `name-1`..`name-N`)
    /// started from the snapshot, each with a new identity (MACs, generation id); their
    /// memory is the snapshot's, shared until written.
    fn clone_vms(self: &Arc<Self>, snap: &str, body: &[u8]) -> Reply {
        let req: CloneRequest = match object(body, "clone request") {
            Ok(r) => r,
            Err(r) => return r,
        };
        if !(1..=MAX_CLONES).contains(&req.count) {
            return error(
                422,
                format!("count {} out of range: 1 to {MAX_CLONES}", req.count),
            );
        }
        let meta = match self.read_snapshot(snap) {
            Ok((_, m)) => m,
            Err(r) => return r,
        };
        let names: Vec<String> = if req.count == 1 {
            vec![req.name.clone()]
        } else {
            (1..=req.count)
                .map(|i| format!("{}-{i}", req.name))
                .collect()
        };
        // Every name checked before the first clone starts: "web-10" may be one character
        // too long where "web-9" is not.
        for n in &names {
            let mut spec = VmSpec::new(n.clone());
            spec.config = meta.config.clone();
            if let Err(e) = spec.validate() {
                return error(422, e);
            }
        }
        {
            let doc = self.lock();
            if let Some(n) = names
                .iter()
                .find(|n| doc.worlds.iter().any(|w| &w.spec.name == *n))
            {
                return error(409, format!("a VM named '{n}' exists already"));
            }
        }
        let mut started = Vec::new();
        for n in &names {
            let mut spec = VmSpec::new(n.clone());
            spec.config = meta.config.clone();
            let (status, body) = self.define(spec);
            if status != 201 {
                return (status, body);
            }
            let (status, body) = self.start_with(n, StartFrom::Snapshot(snap, true));
            if status != 200 {
                return (status, body);
            }
            started.push(serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default());
        }
        ok(201, &started)
    }

    /// Stops the VMM of `name` and answers once its end is recorded. The lifecycle lock
    /// keeps a start from slipping in meanwhile; SIGTERM, then SIGKILL after [`STOP_GRACE`],
    /// both through the run's pidfd, so never to another process.
    fn stop(&self, name: &str) -> Reply {
        let (id, lc) = match self.lifecycle(name) {
            Ok(x) => x,
            Err(r) => return r,
        };
        let _serial = lc.lock().unwrap_or_else(|p| p.into_inner());
        let (run, before) = {
            let mut doc = self.lock();
            let w = match Self::world(&mut doc, id, name) {
                Ok(w) => w,
                Err(r) => return r,
            };
            match self.run_of(id) {
                Some(run) if is_live(w.state) => (run, w.clone()),
                _ => return error(409, format!("VM '{name}' is not running")),
            }
        };
        if let Err(r) = self.terminate(id, name, &run) {
            return r;
        }
        let mut doc = self.lock();
        match Self::world(&mut doc, id, name) {
            Ok(w) => ok(200, &*w),
            // An incoming VM that never ran is removed when its VMM ends: its last state.
            Err(_) => {
                let mut w = before;
                w.state = State::Stopped;
                w.pid = None;
                w.console = None;
                w.hot.clear();
                w.reason = run
                    .outcome
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                ok(200, &w)
            }
        }
    }

    /// `POST /v1/host/shutdown`: no VM starts from now on; every running VM is stopped, all
    /// at once, each through its VMM's control socket (`PUT /vm/shutdown`), then SIGTERM, then
    /// SIGKILL, [`STOP_GRACE`] apart (so the whole takes at most three of them once each
    /// VM's lifecycle lock is free); then the daemon removes what it made outside its state
    /// directory ([`Daemon::close`]) and ends once the answer is written. The answer lists
    /// the VMs stopped and those that would not stop.
    fn shutdown(self: &Arc<Self>) -> Answer {
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let live: Vec<String> = self
            .lock()
            .worlds
            .iter()
            .filter(|w| is_live(w.state))
            .map(|w| w.spec.name.clone())
            .collect();
        let stops: Vec<(String, std::thread::JoinHandle<Result<(), String>>)> = live
            .into_iter()
            .filter_map(|name| {
                let (d, n) = (self.clone(), name.clone());
                match std::thread::Builder::new()
                    .name("shutdown".into())
                    .spawn(move || d.stop_for_shutdown(&n))
                {
                    Ok(h) => Some((name, h)),
                    Err(e) => {
                        eprintln!("wv host: shutdown: no thread to stop VM '{name}': {e}");
                        None
                    }
                }
            })
            .collect();
        let (mut stopped, mut failed) = (Vec::new(), Vec::new());
        for (name, h) in stops {
            match h.join() {
                Ok(Ok(())) => stopped.push(name),
                Ok(Err(e)) => failed.push(json!({ "name": name, "error": e })),
                Err(_) => failed.push(json!({ "name": name, "error": "its stop panicked" })),
            }
        }
        for f in &failed {
            eprintln!("wv host: shutdown: {f}");
        }
        self.close();
        let mut a: Answer = ok(200, &json!({ "stopped": stopped, "failed": failed })).into();
        a.exit = true;
        a
    }

    /// Stops VM `name` for [`Daemon::shutdown`]: through its VMM's control socket first.
    fn stop_for_shutdown(&self, name: &str) -> Result<(), String> {
        let (id, lc) = self.lifecycle(name).map_err(|(_, b)| b)?;
        let _serial = lc.lock().unwrap_or_else(|p| p.into_inner());
        let run = {
            let mut doc = self.lock();
            let w = Self::world(&mut doc, id, name).map_err(|(_, b)| b)?;
            match self.run_of(id) {
                Some(run) if is_live(w.state) => run,
                _ => return Ok(()),
            }
        };
        self.stopping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        // A paused VMM answers its control socket too; one without a socket, or that does
        // not answer, gets the signals.
        let asked = self
            .vmm_call(name, "PUT", "/vm/shutdown", None)
            .is_ok_and(|(s, _)| s == 204);
        if asked && run.wait(STOP_GRACE) {
            return Ok(());
        }
        self.terminate(id, name, &run).map_err(|(_, b)| b)
    }

    /// Removes what the daemon made outside its state directory: its cgroups (the groups of
    /// VMMs still running stay until they end), its socket and the folders it created for it,
    /// and the record of them. Once; a second caller (SIGTERM during a shutdown) waits for
    /// the first to finish.
    pub fn close(&self) {
        let mut closed = self.closed.lock().unwrap_or_else(|p| p.into_inner());
        if *closed {
            return;
        }
        self.closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // The switch and the storage service end with the daemon (VMs left running reconnect
        // to the next daemon's).
        self.switch.close();
        self.storage.close();
        if let Ok(cg) = &self.cgroups {
            cg.close();
        }
        let traces = self
            .traces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(s) = &traces.socket {
            if let Err(e) = s.remove() {
                eprintln!("wv host: removing the socket: {e}");
            }
        }
        for d in &traces.dirs {
            if let Err(e) = std::fs::remove_dir(d) {
                eprintln!("wv host: leaving {}: {e}", d.display());
            }
        }
        Traces::forget(&self.state_dir);
        *closed = true;
    }

    /// Ends the VMM `run` of world `id` and waits until its end is recorded: SIGTERM, then
    /// SIGKILL after [`STOP_GRACE`], both through the run's pidfd, so never to another
    /// process. The caller holds the world's lifecycle lock.
    fn terminate(&self, id: u64, name: &str, run: &Run) -> Result<(), Reply> {
        self.stopping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        // A paused VMM is continued so it can act on SIGTERM. Errors mean it has ended
        // already, which the wait below sees.
        let _ = run.pidfd.signal(libc::SIGTERM);
        let _ = run.pidfd.signal(libc::SIGCONT);
        if !run.wait(STOP_GRACE) {
            // A jailed VMM dies with its keeper (its parent-death signal), but the VM is not
            // stopped before the VMM has ended too (its disks' locks, its TAPs): killed and
            // waited for as well.
            let keeper = self
                .lock()
                .worlds
                .iter()
                .find(|w| w.id == id)
                .and_then(|w| w.pid);
            let jailed = keeper
                .map(supervisor::vmm_process)
                .filter(|p| Some(*p) != keeper)
                .and_then(|p| Pidfd::open(p).ok());
            let _ = run.pidfd.signal(libc::SIGKILL);
            if let Some(j) = &jailed {
                let _ = j.signal(libc::SIGKILL);
            }
            if !run.wait(STOP_GRACE) || jailed.is_some_and(|j| !j.wait(Some(STOP_GRACE))) {
                return Err(error(
                    500,
                    format!("VM '{name}': its VMM did not end, even after SIGKILL"),
                ));
            }
        }
        Ok(())
    }
}

/// Bounds the requests served at once to [`MAX_CONNECTIONS`].
#[derive(Default)]
struct Slots {
    busy: Mutex<usize>,
    cv: Condvar,
}

/// One slot, given back when dropped (at the end of its connection).
struct Slot(Arc<Slots>);

impl Slots {
    fn take(self: &Arc<Self>) -> Slot {
        let g = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let mut g = self
            .cv
            .wait_while(g, |n| *n >= MAX_CONNECTIONS)
            .unwrap_or_else(|p| p.into_inner());
        *g += 1;
        Slot(self.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *self.0.busy.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.0.cv.notify_one();
    }
}

/// Whether an accept error means the process or system is out of a resource (descriptors,
/// memory), which only time cures.
fn exhausted(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Accepts connections for ever, serving each on a management thread, at most
/// [`MAX_CONNECTIONS`] at once; out of descriptors, it backs off (10 ms doubling to 1 s)
/// instead of spinning, and says so once per episode.
fn accept_loop<S>(
    d: &Arc<Daemon>,
    what: &str,
    via: Via,
    mut accept: impl FnMut() -> std::io::Result<S>,
) where
    S: std::io::Read + std::io::Write + http::Timed + Send + 'static,
{
    let slots = Arc::new(Slots::default());
    let mut backoff = Duration::ZERO;
    let mut failures = 0u64;
    loop {
        let slot = slots.take();
        match accept() {
            Ok(stream) => {
                if failures > 0 {
                    eprintln!("wv host: {what}: accepting again after {failures} failures");
                    failures = 0;
                }
                backoff = Duration::ZERO;
                let d = d.clone();
                if let Err(e) = helper::spawn_management(move || {
                    let _slot = slot;
                    answer(&d, stream, via);
                }) {
                    eprintln!("wv host: no thread for a connection: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                drop(slot);
                failures += 1;
                backoff = if exhausted(&e) {
                    (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1))
                } else {
                    Duration::from_millis(10)
                };
                if failures == 1 {
                    let hint = if exhausted(&e) {
                        " (out of file descriptors or memory)"
                    } else {
                        ""
                    };
                    eprintln!(
                        "wv host: {what}: cannot accept a connection: {e}{hint}; retrying, backing off up to 1 s"
                    );
                }
                std::thread::sleep(backoff);
            }
        }
    }
}

/// Serves the API on `socket` until the process ends. A stale socket file is replaced; a live
/// one (another daemon) is an error.
pub fn serve(d: Arc<Daemon>, socket: &Path) -> std::io::Result<()> {
    let listener = d.bind(socket)?;
    accept_loop(&d, "API socket", Via::Unix, || {
        listener.accept().map(|(s, _)| s)
    });
    Ok(())
}

impl Daemon {
    /// Binds the API's socket, creating its folder if needed, and records both
    /// ([`shutdown::Traces`]). What a previous daemon of this state directory recorded and
    /// left (it was killed) goes first: its socket, if stale, and its folders, if empty; the
    /// folders it made that this socket is in stay this daemon's to remove.
    fn bind(&self, socket: &Path) -> std::io::Result<UnixListener> {
        let old = Traces::load(&self.state_dir);
        if old.socket.as_ref().is_some_and(|s| s.path != socket) {
            for e in old.remove() {
                eprintln!("wv host: what a previous daemon left stays: {e}");
            }
        }
        let mut dirs: Vec<PathBuf> = old
            .dirs
            .iter()
            .filter(|d| socket.starts_with(d) && d.is_dir())
            .cloned()
            .collect();
        if let Some(parent) = socket.parent() {
            let made = shutdown::create_dirs(parent)?;
            dirs.retain(|d| !made.contains(d));
            dirs.splice(0..0, made);
        }
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        if socket.exists() {
            if UnixStream::connect(socket).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("a daemon already listens on {}", socket.display()),
                ));
            }
            std::fs::remove_file(socket)?;
        }
        // Recorded before the socket exists, so a daemon killed right after binding leaves
        // nothing unrecorded.
        let mut t = self.traces.lock().unwrap_or_else(|p| p.into_inner());
        t.dirs = dirs;
        t.save(&self.state_dir)?;
        let listener = UnixListener::bind(socket)?;
        t.socket = Some(SocketTrace::of(socket)?);
        t.save(&self.state_dir)?;
        Ok(listener)
    }
}

/// Serves the API on TCP at `addr` too (only when asked). Every request over TCP must carry
/// the daemon's token and must not come from a web page (no `Origin`); a body must be JSON.
pub fn serve_tcp(d: Arc<Daemon>, addr: &str) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(addr)?;
    if let Ok(a) = listener.local_addr() {
        let _ = d.listen.set(a.ip());
    }
    std::thread::Builder::new()
        .name("api-tcp".into())
        .spawn(move || {
            accept_loop(&d, "API on TCP", Via::Api, || {
                listener.accept().map(|(s, _)| s)
            })
        })?;
    Ok(())
}

/// Serves the web console ([`web`]) and the API for its page on TCP at `addr` (only when
/// asked): every request but the login page and the assets needs the token.
pub fn serve_web(d: Arc<Daemon>, addr: &str) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(addr)?;
    d.set_web_hosts(addr, listener.local_addr()?);
    std::thread::Builder::new()
        .name("web".into())
        .spawn(move || {
            accept_loop(&d, "web console", Via::Web, || {
                listener.accept().map(|(s, _)| s)
            })
        })?;
    Ok(())
}

/// The file in the state directory that holds the API token.
pub const TOKEN_FILE: &str = "api-token";

/// The daemon's API token: read from the state directory, or made there (32 random bytes as
/// hex, mode 0600) on first start.
fn api_token(state_dir: &Path) -> std::io::Result<String> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join(TOKEN_FILE);
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_string();
        if t.len() >= 32 {
            return Ok(t);
        }
    }
    let mut raw = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = state_dir.join(format!("{TOKEN_FILE}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(token)
}

/// Equal, in time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The definition `current` with what a restore of it changes, taken from `reported` (its
/// VMM's `GET /vm`): each VMKFS disk's name (a new branch in the same datastore) and each
/// net's MAC (a clone's). Anything else that differs is refused: a VMM (perhaps a hostile
/// one) must not choose the files the daemon opens for the VM's next boot.
fn adoptable(
    current: &wv_config::VmConfig,
    reported: &wv_config::VmConfig,
) -> Result<wv_config::VmConfig, String> {
    if current.disks.len() != reported.disks.len() || current.nets.len() != reported.nets.len() {
        return Err("its devices differ from the definition's".into());
    }
    let mut out = current.clone();
    for (d, r) in out.disks.iter_mut().zip(&reported.disks) {
        match (&d.vmkfs, &r.vmkfs) {
            (Some(_), Some(name)) if r.path == d.path && r.readonly == d.readonly => {
                d.vmkfs = Some(name.clone());
            }
            _ if r.path == d.path && r.vmkfs == d.vmkfs => {}
            _ => {
                return Err(format!(
                    "disk {}: {} is not the definition's",
                    d.id,
                    r.path.display()
                ))
            }
        }
    }
    for (n, r) in out.nets.iter_mut().zip(&reported.nets) {
        n.mac = r.mac;
    }
    Ok(out)
}

/// Where in its folder a jailed VMM writes a snapshot, for the daemon to take.
const SNAPSHOT_PARTIAL: &str = "snapshot.partial";

/// The jail of the VMM whose keeper is `pid` (its `wv run --jail`), if it is jailed.
fn jail_of(pid: u32) -> Option<wv_config::JailConfig> {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = cmd.split(|b| *b == 0);
    args.find(|a| *a == b"--jail")?;
    wv_config::JailConfig::parse(std::str::from_utf8(args.next()?).ok()?).ok()
}

/// Takes back a folder a jailed VMM wrote in (its snapshot, a migration's disks) before the
/// daemon, or a VMM it starts as root, opens anything in it: the folder first, by descriptor
/// and without following a link, made root's and 0700 (from then on the VMM can add, rename
/// or remove nothing in it); then each entry, opened without following links, must be a
/// plain file with a single link, and is made root's and 0600. With `vmm`, the process
/// (a jailed VMM, running on) must hold none of them open or mapped any more: it could
/// still change them. What does not pass is an error naming it.
fn take_back(dir: &Path, vmm: Option<u32>) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let open_at = |at: libc::c_int, p: &CString, dir: bool| -> std::io::Result<OwnedFd> {
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
        let flags = if dir {
            flags | libc::O_DIRECTORY
        } else {
            flags
        };
        // SAFETY: openat with a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::openat(at, p.as_ptr(), flags) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nobody else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let own = |fd: &OwnedFd, mode: libc::mode_t| -> std::io::Result<libc::stat> {
        // SAFETY: fchown, fchmod and fstat on our descriptor, into a stat we own.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fchown(fd.as_raw_fd(), 0, 0) != 0
                || libc::fchmod(fd.as_raw_fd(), mode) != 0
                || libc::fstat(fd.as_raw_fd(), &mut st) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(st)
        }
    };
    let bad = |what: String| std::io::Error::other(what);
    let path = CString::new(dir.as_os_str().as_bytes()).map_err(|_| bad("NUL in path".into()))?;
    let dfd = open_at(libc::AT_FDCWD, &path, true)
        .map_err(|e| bad(format!("{}: {e} (not a folder of its own)", dir.display())))?;
    own(&dfd, 0o700)?;
    let mut inodes = Vec::new();
    for e in std::fs::read_dir(format!("/proc/self/fd/{}", dfd.as_raw_fd()))? {
        let e = e?;
        let name = CString::new(e.file_name().as_bytes()).map_err(|_| bad("NUL in name".into()))?;
        let shown = dir.join(e.file_name());
        let fd = open_at(dfd.as_raw_fd(), &name, false)
            .map_err(|err| bad(format!("{}: {err} (not a plain file)", shown.display())))?;
        let st = own(&fd, 0o600)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_nlink != 1 {
            return Err(bad(format!(
                "{} is not a plain file of its own",
                shown.display()
            )));
        }
        inodes.push((st.st_dev, st.st_ino, shown));
    }
    let Some(pid) = vmm else { return Ok(()) };
    // Held open: /proc/PID/fd; mapped: /proc/PID/map_files.
    for sub in ["fd", "map_files"] {
        for e in std::fs::read_dir(format!("/proc/{pid}/{sub}"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(m) = std::fs::metadata(e.path()) else {
                continue;
            };
            use std::os::unix::fs::MetadataExt;
            if let Some((_, _, p)) = inodes
                .iter()
                .find(|(dev, ino, _)| m.dev() == *dev && m.ino() == *ino)
            {
                return Err(bad(format!("the VMM still holds {}", p.display())));
            }
        }
    }
    Ok(())
}

/// Takes the snapshot a jailed VMM (process `vmm`) wrote in `partial` ([`take_back`]) into
/// the (empty) folder `dir`, which it replaces.
fn take_snapshot_files(partial: &Path, dir: &Path, vmm: u32) -> std::io::Result<()> {
    take_back(partial, Some(vmm))?;
    std::fs::rename(partial, dir)
}

/// `wv host --jail-uids` unless given: a range far above the ids of people and of the
/// subordinate ranges of user namespaces.
pub const DEFAULT_JAIL_UIDS: (u32, u32) = (3_000_000_000, 3_000_999_999);

impl Daemon {
    /// Jails every VMM started from now (`wv run --jail`, crates/vmm/src/jail.rs): world N's
    /// runs as user and group FIRST+N, which must be at most LAST; once, at start.
    pub fn jail_vmms(&self, first: u32, last: u32) -> Result<(), String> {
        if first == 0 || last < first || last == u32::MAX {
            return Err(format!(
                "{first}-{last} is not a range of unprivileged ids (1 to {})",
                u32::MAX - 1
            ));
        }
        self.jail_uids
            .set((first, last))
            .map_err(|_| "the VMMs' users are set already".to_string())
    }

    /// The jail of world `id`'s VMM in its folder `dir` (None: unjailed); `config`: the
    /// configuration (the daemon's) whose files, and only those, it opens before the jail.
    fn jail(
        &self,
        id: u64,
        dir: &Path,
        config: Option<&Path>,
    ) -> Result<Option<wv_config::JailConfig>, String> {
        let Some((first, last)) = self.jail_uids.get().copied() else {
            return Ok(None);
        };
        let uid = u32::try_from(id)
            .ok()
            .and_then(|i| first.checked_add(i))
            .filter(|u| *u <= last)
            .ok_or_else(|| {
                format!("world {id} has no user in --jail-uids {first}-{last}: widen the range")
            })?;
        for p in [Some(dir), config].into_iter().flatten() {
            if p.to_string_lossy().contains(',') {
                return Err(format!(
                    "{}: a jailed VMM's paths cannot hold a comma (use another --state-dir)",
                    p.display()
                ));
            }
        }
        // The VMM reaches what the daemon hands it in its folder (a snapshot's, a migration's
        // disks); it lists and writes nothing else there.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut j = wv_config::JailConfig::new(uid);
        j.dir = Some(dir.to_path_buf());
        j.config = config.map(Path::to_path_buf);
        Ok(Some(j))
    }

    /// Hands each jailed VMM started before the switch (`switch`) or storage service (not
    /// `switch`) process `service` (so connected to an earlier one: a restart, or a daemon
    /// restarted) a new connection to each of its sockets on it: unlike an unjailed VMM, it
    /// cannot reach the sockets to connect again by itself. A VMM started since connected to
    /// this process at its start.
    fn hand_backends(&self, switch: bool, service: u32) {
        let Some(born) = supervisor::start_ticks(service) else {
            return;
        };
        let mine: Vec<(u64, Vec<PathBuf>)> = if switch {
            let dir = self.switch.dir().to_path_buf();
            self.ports
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(id, p)| {
                    let socks = p.iter().map(|(n, p)| network::port_socket(&dir, n, p));
                    (*id, socks.collect())
                })
                .collect()
        } else {
            let dir = self.storage.dir().to_path_buf();
            self.served
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(id, d)| {
                    (
                        *id,
                        d.iter().map(|d| storage::disk_socket(&dir, d)).collect(),
                    )
                })
                .collect()
        };
        for (id, socks) in mine.into_iter().filter(|(_, s)| !s.is_empty()) {
            let (name, pid) = match self.lock().worlds.iter().find(|w| w.id == id) {
                Some(w) => (w.spec.name.clone(), w.pid),
                None => continue,
            };
            let Some(pid) = pid.filter(|p| jail_of(*p).is_some()) else {
                continue;
            };
            if supervisor::start_ticks(pid).is_none_or(|t| t >= born) {
                continue;
            }
            let conns: Vec<(String, UnixStream)> = socks
                .iter()
                .filter_map(|s| match UnixStream::connect(s) {
                    Ok(c) => Some((s.display().to_string(), c)),
                    Err(e) => {
                        eprintln!("wv host: VM '{name}': {}: {e}", s.display());
                        None
                    }
                })
                .collect();
            let files: Vec<(&str, std::os::fd::BorrowedFd<'_>)> = conns
                .iter()
                .map(|(k, c)| (k.as_str(), std::os::fd::AsFd::as_fd(c)))
                .collect();
            match self.vmm_call_passing(&name, "PUT", "/vm/files", None, &files) {
                Ok((204, _)) => {}
                Ok((st, b)) => eprintln!(
                    "wv host: VM '{name}': handing its VMM its backends' sockets: {st} {b}"
                ),
                Err(e) => {
                    eprintln!("wv host: VM '{name}': handing its VMM its backends' sockets: {e}")
                }
            }
        }
    }

    /// A folder in `vm_dir` the jailed VMM of `jail` may write into (made afresh, its
    /// user's, mode 0700); unjailed, nothing to do.
    fn writable_by(jail: Option<&wv_config::JailConfig>, dir: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let Some(j) = jail else { return Ok(()) };
        std::fs::create_dir_all(dir)?;
        std::os::unix::fs::chown(dir, Some(j.uid), Some(j.gid))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
    }

    /// Confines VMs' kernels, initrds and disks to `dirs` (each must exist); once, at start.
    pub fn confine_images(&self, dirs: &[PathBuf]) -> std::io::Result<()> {
        let canon = dirs
            .iter()
            .map(|d| {
                let c = std::fs::canonicalize(d)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", d.display())))?;
                if c.is_dir() {
                    Ok(c)
                } else {
                    Err(std::io::Error::other(format!(
                        "{} is not a directory",
                        d.display()
                    )))
                }
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        self.images
            .set(canon)
            .map_err(|_| std::io::Error::other("image directories are set already"))
    }

    /// With image directories, every file of `spec` must resolve (symbolic links followed)
    /// to a path under one of them. The refusal is the same whether or not the file exists,
    /// so an API client learns nothing about files outside them.
    fn check_images(&self, spec: &VmSpec) -> Result<(), String> {
        let Some(dirs) = self.images.get().filter(|d| !d.is_empty()) else {
            return Ok(());
        };
        // The disks a migration copied into the VM's own folder are the daemon's.
        let own = self
            .store
            .vm_dir(&spec.name)
            .ok()
            .map(|d| d.join(COPIED_DISKS));
        for (field, path) in spec.files() {
            if field == "disks" && own.is_some() && path.parent() == own.as_deref() {
                continue;
            }
            Self::under(dirs, field, &path)?;
        }
        Ok(())
    }

    /// With image directories, `path` (the `field` of a definition) must resolve to a file
    /// under one of them ([`Daemon::check_images`]).
    fn check_image(&self, field: &str, path: &Path) -> Result<(), String> {
        match self.images.get().filter(|d| !d.is_empty()) {
            Some(dirs) => Self::under(dirs, field, path),
            None => Ok(()),
        }
    }

    fn under(dirs: &[PathBuf], field: &str, path: &Path) -> Result<(), String> {
        let inside =
            std::fs::canonicalize(path).is_ok_and(|c| dirs.iter().any(|d| c.starts_with(d)));
        if !inside {
            return Err(format!(
                "{field}: {} is not a file under the daemon's image directories (wv host --images)",
                path.display()
            ));
        }
        Ok(())
    }

    /// What a request over TCP must satisfy before it is handled: the token (401 otherwise),
    /// no `Origin` (a web page's request, cross-site or rebound: 403), and a JSON body when
    /// there is a body (415).
    fn admit_remote(&self, req: &http::Request) -> Option<Answer> {
        let token = req
            .authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::trim);
        if !token.is_some_and(|t| same_secret(t.as_bytes(), self.token.as_bytes())) {
            let mut a: Answer = error(
                401,
                "the API over TCP needs the daemon's token: Authorization: Bearer TOKEN \
                 (wv host token shows it; clients read WV_TOKEN)",
            )
            .into();
            a.headers.push("WWW-Authenticate: Bearer".into());
            return Some(a);
        }
        if req.origin.is_some() {
            return Some(error(403, "requests from web pages are refused").into());
        }
        let json = req.content_type.as_deref().is_some_and(|c| {
            c.split(';')
                .next()
                .is_some_and(|m| m.trim() == "application/json")
        });
        if !req.body.is_empty() && !json {
            return Some(
                error(415, "a request body must be Content-Type: application/json").into(),
            );
        }
        None
    }
}

/// One request and its answer on a connection; every 5xx goes to the daemon's log with its
/// cause.
fn answer<S: std::io::Read + std::io::Write + http::Timed>(d: &Arc<Daemon>, stream: S, via: Via) {
    let mut r = BufReader::new(http::Deadline::new(stream, REQUEST_TIMEOUT));
    let (what, a) = match http::read_request(&mut r) {
        Ok(req) => {
            let web = web::is_web(&req);
            let refused = match via {
                Via::Unix => None,
                Via::Api if web => {
                    Some(error(404, "the web console is served on wv host --web, not here").into())
                }
                Via::Api => d.admit_remote(&req),
                Via::Web => d.admit_web(&req),
            };
            let a = match refused {
                Some(a) => a,
                None if web => match d.web(&req, r.get_ref().get_ref(), via) {
                    Some(a) => a,
                    // A WebSocket had the connection, and has ended.
                    None => return,
                },
                None => d.handle(&req),
            };
            (format!("{} {}", req.method, req.path), a)
        }
        Err(HttpError(status, msg)) => ("a request".to_string(), error(status, msg).into()),
    };
    if a.status >= 500 {
        eprintln!("wv host: {what}: answered {}: {}", a.status, a.body);
    }
    let stream = r.get_mut().get_mut();
    // A client that does not read its answer cannot hold the connection's slot for ever.
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    let _ = http::write_response(stream, a.status, &a.headers, &a.body);
    if a.exit {
        // `POST /v1/host/shutdown`: everything is stopped and removed; the answer is out.
        std::process::exit(0);
    }
}

/// The cgroup name of the daemon of `state_dir` (`worldvisor/<tag>`).
fn cgroup_name(state_dir: &Path) -> String {
    let canonical = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.into());
    format!("worldvisor/{}", tag(&canonical))
}

/// The VMMs (`wv run` processes) whose files are in `state_dir`'s VM folders: (pid, VM name).
fn vmms_of(state_dir: &Path) -> Vec<(u32, String)> {
    let vms = std::fs::canonicalize(state_dir)
        .unwrap_or_else(|_| state_dir.into())
        .join("vms");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if args.get(1) != Some(&&b"run"[..]) {
            continue;
        }
        let name = args.iter().find_map(|a| {
            let p = Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(a));
            let rel = p.strip_prefix(&vms).ok()?;
            Some(
                rel.components()
                    .next()?
                    .as_os_str()
                    .to_string_lossy()
                    .into_owned(),
            )
        });
        if let Some(name) = name {
            out.push((pid, name));
        }
    }
    out
}

/// `wv host uninstall`: removes what a daemon of `state_dir` that was killed left outside it
/// (its socket and folders, as recorded in [`shutdown::TRACES_FILE`]; its cgroups), then the
/// state directory itself. Refused while a daemon runs on it or a VMM of it still runs.
/// Returns what could not be removed outside the state directory, one line each.
pub fn uninstall(state_dir: &Path) -> Result<Vec<String>, String> {
    if std::fs::symlink_metadata(state_dir).is_err() {
        return Ok(Vec::new());
    }
    if !state_dir.is_dir() {
        return Err(format!("{} is not a directory", state_dir.display()));
    }
    let _lock =
        StateLock::take(state_dir).map_err(|e| format!("{e}: stop it first (wv host shutdown)"))?;
    if let Some((pid, name)) = vmms_of(state_dir).first() {
        return Err(format!(
            "the VMM of VM '{name}' (pid {pid}) still runs from {}: start the daemon and run wv host shutdown",
            state_dir.display()
        ));
    }
    let mut left = Traces::load(state_dir).remove();
    if let Err(e) = Cgroups::remove_left(&cgroup_name(state_dir)) {
        if crate::cgroup::Hierarchy::detect().is_ok() {
            left.push(e);
        }
    }
    std::fs::remove_dir_all(state_dir)
        .map_err(|e| format!("removing {}: {e}", state_dir.display()))?;
    Ok(left)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A running world with a net and a served disk of its start and one of each hot-plugged.
    fn world() -> World {
        let spec: VmSpec = serde_json::from_str(
            r#"{"name":"a","memory_shared":true,
                "disks":["path=/d0.img,id=d0,via=storage","path=/h.img,id=h0,via=storage","path=/p.img,id=p0"],
                "nets":["network=lan,id=n0","network=lan,id=h1"]}"#,
        )
        .unwrap();
        World {
            id: 7,
            spec,
            state: State::Running,
            pid: None,
            reason: None,
            console: None,
            hot: vec![
                HotPlugged {
                    id: "h0".into(),
                    port: None,
                    served: Some("7-hdisk0".into()),
                },
                HotPlugged {
                    id: "h1".into(),
                    port: Some("7-hot0".into()),
                    served: None,
                },
                HotPlugged {
                    id: "p0".into(),
                    port: None,
                    served: None,
                },
            ],
        }
    }

    /// The devices a run started with keep the names of their places; those hot-plugged
    /// into it, the names recorded for them (what a re-adopting daemon serves again).
    #[test]
    fn hot_plugged_devices_keep_their_backends_names() {
        let w = world();
        assert_eq!(
            net_ports(&w),
            [
                ("n0".into(), "lan".into(), "7-net0".into()),
                ("h1".into(), "lan".into(), "7-hot0".into())
            ]
        );
        let served: Vec<(usize, String)> = served_disks(&w)
            .into_iter()
            .map(|(i, n, _)| (i, n))
            .collect();
        assert_eq!(served, [(0, "7-disk0".into()), (1, "7-hdisk0".into())]);
        let b: Vec<String> = w
            .hot
            .iter()
            .filter_map(|h| hot_backend(&w, h))
            .map(|(id, b)| match b {
                HotBackend::Port { net, port } => format!("{id} {net}/{port}"),
                HotBackend::Disk { name } => format!("{id} {name}"),
            })
            .collect();
        assert_eq!(b, ["h0 7-hdisk0", "h1 lan/7-hot0"]);
        // A new run: every device has the name of its place.
        let mut fresh = w.clone();
        fresh.hot.clear();
        assert_eq!(switch_ports(&fresh)[1], ("lan".into(), "7-net1".into()));
        assert_eq!(served_disks(&fresh)[1].1, "7-disk1");
    }

    #[test]
    fn device_ids_span_disks_and_nets() {
        let mut c = world().spec.config;
        assert!(device_id_taken(&c, "d0") && device_id_taken(&c, "h1"));
        assert!(!device_id_taken(&c, "x"));
        assert!(drop_device(&mut c, "h1") && drop_device(&mut c, "p0"));
        assert!(!drop_device(&mut c, "h1"));
        assert_eq!((c.disks.len(), c.nets.len()), (2, 1));
        // Two nets on one network without ids share its name: a removal by it is ambiguous.
        let two = wv_config::VmConfig {
            nets: vec![
                wv_config::NetConfig::parse("network=lan").unwrap(),
                wv_config::NetConfig::parse("network=lan").unwrap(),
            ],
            ..Default::default()
        };
        assert_eq!(devices_named(&two, "lan"), 2);
        assert_eq!(devices_named(&c, "d0"), 1);
    }
}
