//! The VMM's control socket (`wv run --api-socket PATH`): a small REST API over a Unix socket,
//! spoken with the daemon's HTTP code ([`wv_http`]).
//!
//! | method and path | does |
//! |---|---|
//! | GET /vm | state (`running`, `paused`), vCPUs, memory, configuration |
//! | GET /vm/counters | per-device notifications, interrupts, refused chains, ring errors, resets, refused BAR moves, MSI-X garbage, and bytes and operations (`io`) of the disks and nets the VMM serves; KVM's counters per vCPU; the exits that reached the VMM so far by its own causes (`exits_by_cause`: `io:serial`, `mmio:virtio-blk-0`, `hypercall:…`, `hlt`, …); the ids of the hot-plugged devices it has now (`hotplugged`: one the guest ejected by itself is gone) |
//! | PUT /vm/pause | stop every vCPU at a KVM_RUN boundary and quiesce the devices (204) |
//! | PUT /vm/resume | continue (204) |
//! | PUT /vm/shutdown | end the VM as SIGTERM does (204) |
//! | PUT /vm/files?file=NAME... | hand the VMM the files passed with the request (SCM_RIGHTS), by the names it opens them by (204; any request may pass files this way) |
//! | PUT /vm/snapshot | write a snapshot (`{"destination": DIR}`; docs/SNAPSHOT.md) (200) |
//! | GET /vm/balloon | the balloon: target, actual, counters, the guest's last statistics, the VMM's RSS |
//! | PUT /vm/balloon | set the balloon's target (`{"target_bytes": N}`, rounded down to 4 KiB) (204) |
//! | PUT /vm/device-add | hot-plug a disk or net (`{"disk": {...}}` / `{"net": {...}}`; docs/DEVICES.md) (200: its slot) |
//! | PUT /vm/device-remove | ask the guest to eject a hot-plugged device (`{"id": ID}`), answered once it has (204) |
//! | PUT /vm/device-path | switch a vhost-user net's or disk's data path (`{"id": ID, "path": "direct"\|"interposed", "capture": FILE}`; docs/DEVICES.md) (200: its path and counters) |
//! | PUT /vm/migrate-send | live-migrate to `wv run --incoming` (`{"destination": "HOST:PORT"}`; docs/MIGRATION.md) (200, then the VMM ends) |
//!
//! An "api" thread accepts connections (at most [`MAX_CONNECTIONS`] at once, each read on a
//! thread of its own), reads and checks each request within [`REQUEST_TIMEOUT`] and hands a [`Command`] to the VMM's control loop (the one loop that
//! also takes signals and the guest's end), which carries it out and answers. A malformed
//! request is answered 4xx by the API thread and never reaches the VM. Errors are JSON
//! `{"error": "..."}`: 400, 404, 405 (with `Allow`), 408, 409 (wrong state), 413, 415, 503 (the
//! VM is ending); malformed HTTP as the daemon's: 408, 411, 413, 431.

use std::io::BufReader;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;
use wv_http::{self as http, HttpError, Request};

/// Time a client has to send its whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the control loop is asked to do.
#[derive(Debug)]
pub(crate) enum Command {
    Info,
    Counters,
    Pause,
    Resume,
    Shutdown,
    Snapshot(SnapshotRequest),
    BalloonInfo,
    BalloonSet(BalloonRequest),
    MigrateSend(crate::migrate::SendRequest),
    DeviceAdd(crate::HotDevice),
    DeviceRemove(DeviceRemoveRequest),
    DevicePath(DevicePathRequest),
}

/// The body of `PUT /vm/device-path`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DevicePathRequest {
    /// The device's id (`id=` of its `--net` or `--disk`).
    id: String,
    /// `direct` or `interposed`.
    path: wv_virtio::vhost_user::DataPath,
    /// With `interposed`: a file to write (created or truncated): a net's frames as pcap, a
    /// disk's requests as trace lines.
    #[serde(default)]
    capture: Option<std::path::PathBuf>,
}

/// How long `PUT /vm/device-path` waits for the device's relay thread.
pub(crate) const SWITCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The body of `PUT /vm/device-remove`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeviceRemoveRequest {
    /// The hot-plugged device's id.
    id: String,
    /// How long to wait for the guest to eject it, in milliseconds (default 10 000, at most
    /// 60 000).
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// How long `PUT /vm/device-remove` waits for the guest by default, and at most.
const EJECT_TIMEOUT_MS: (u64, u64) = (10_000, 60_000);

/// A remove waiting for the guest to eject its device.
pub(crate) struct PendingRemove {
    slot: u8,
    id: String,
    reply: mpsc::Sender<Answer>,
    deadline: std::time::Instant,
}

/// The body of `PUT /vm/snapshot`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SnapshotRequest {
    /// The directory to write (created; it must not exist or be empty).
    destination: std::path::PathBuf,
    /// The caller keeps raw disk images consistent with the snapshot itself.
    #[serde(default)]
    allow_raw_disk: bool,
}

/// The body of `PUT /vm/balloon`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BalloonRequest {
    /// Bytes the guest is to give back (the balloon's size), rounded down to whole pages.
    target_bytes: u64,
}

/// Whether a request's content type, if it names one, is JSON.
fn json_body(req: &Request) -> Result<(), Answer> {
    if req
        .content_type
        .as_deref()
        .is_some_and(|t| !t.trim().starts_with("application/json"))
    {
        return Err(Answer::error(
            415,
            "the body must be JSON (application/json)",
        ));
    }
    Ok(())
}

/// An answer: HTTP status, extra header lines, JSON body (empty for 204).
pub(crate) struct Answer {
    pub status: u16,
    pub headers: Vec<String>,
    pub body: String,
    /// Told once the answer has been written (or could not be).
    pub written: Option<mpsc::Sender<()>>,
}

impl Answer {
    pub(crate) fn json(status: u16, v: &serde_json::Value) -> Answer {
        Answer {
            status,
            headers: Vec::new(),
            body: v.to_string(),
            written: None,
        }
    }
    pub(crate) fn none() -> Answer {
        Answer {
            status: 204,
            headers: Vec::new(),
            body: String::new(),
            written: None,
        }
    }
    pub(crate) fn error(status: u16, msg: impl Into<String>) -> Answer {
        Answer::json(status, &serde_json::json!({ "error": msg.into() }))
    }
}

/// The control loop's end of the API: commands, and an eventfd that is readable when one waits.
pub(crate) struct Inbox {
    pub rx: mpsc::Receiver<(Command, mpsc::Sender<Answer>)>,
    pub evt: EventFd,
}

impl Inbox {
    pub(crate) fn fd(&self) -> i32 {
        self.evt.as_raw_fd()
    }
}

/// Binds `path` (replacing a stale socket, never a live one) for the control API.
pub(crate) fn listen(path: &Path) -> Result<UnixListener, String> {
    bind_socket(path, "serve the API")
}

/// Binds a Unix socket at `path` to `what` (the error says "cannot WHAT on PATH"): the one a
/// jail bound before it began, if any ([`crate::jail::take_listener`]); else a new one,
/// replacing a stale socket there but never a live one.
pub(crate) fn bind_socket(path: &Path, what: &str) -> Result<UnixListener, String> {
    if let Some(l) = crate::jail::take_listener(path) {
        return Ok(l);
    }
    if UnixStream::connect(path).is_ok() {
        return Err(format!(
            "cannot {what} on {}: another process listens there",
            path.display()
        ));
    }
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|e| format!("cannot {what} on {}: {e}", path.display()))
}

/// Most requests served at once; more get 503 at once.
const MAX_CONNECTIONS: usize = 8;

/// Starts the API thread on `listener`; its commands arrive in the returned [`Inbox`]. Each
/// connection is read on a thread of its own, so a client that stalls mid-request holds up
/// nobody else.
pub(crate) fn start(listener: UnixListener) -> std::io::Result<Inbox> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let evt = EventFd::new(libc::EFD_NONBLOCK)?;
    let wake = Arc::new(evt.try_clone()?);
    let (tx, rx) = mpsc::channel();
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            crate::seccomp::install(crate::seccomp::Kind::Api);
            for conn in listener.incoming() {
                let Ok(mut c) = conn else {
                    // Out of descriptors: try again shortly rather than spin.
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                    active.fetch_sub(1, Ordering::AcqRel);
                    let a = Answer::error(503, "too many requests at once");
                    let _ = c.set_write_timeout(Some(REQUEST_TIMEOUT));
                    let _ = http::write_response(&mut c, a.status, &a.headers, &a.body);
                    continue;
                }
                let (tx, wake, mine) = (tx.clone(), wake.clone(), active.clone());
                let spawned =
                    std::thread::Builder::new()
                        .name("api-conn".into())
                        .spawn(move || {
                            crate::seccomp::install(crate::seccomp::Kind::ApiConn);
                            serve(c, &tx, &wake);
                            mine.fetch_sub(1, Ordering::AcqRel);
                        });
                if spawned.is_err() {
                    // The closure (and its count) is gone with the failed spawn.
                    active.fetch_sub(1, Ordering::AcqRel);
                }
            }
        })?;
    Ok(Inbox { rx, evt })
}

type Tx = mpsc::Sender<(Command, mpsc::Sender<Answer>)>;

/// Leaves the files passed with `req` (SCM_RIGHTS, named by its `file=` query parameters:
/// [`http::passing`]) in the VMM's table of handed-over files (crates/fds), for the code that
/// would open them: how the daemon hands a jailed VMM a migration's connection or a
/// restarted backend's socket. Returns what it left, for [`serve`] to take back what the
/// request's command did not use.
fn hand_over(
    req: &Request,
    s: &mut http::passing::FdStream,
    left: &mut Vec<(String, u64)>,
) -> Result<(), Answer> {
    let files = s.take_files();
    if s.refused {
        return Err(Answer::error(
            400,
            format!(
                "at most {} files may be passed with one request",
                http::passing::MAX_FILES
            ),
        ));
    }
    if files.is_empty() && !req.query.contains("file=") {
        return Ok(());
    }
    let keys = http::passing::file_keys(&req.query).map_err(|e| Answer::error(400, e))?;
    if keys.len() != files.len() {
        return Err(Answer::error(
            400,
            format!(
                "the request names {} passed files (file=) and passes {}",
                keys.len(),
                files.len()
            ),
        ));
    }
    for (k, f) in keys.iter().zip(files) {
        let token = wv_fds::put(k, f).map_err(|e| Answer::error(503, e))?;
        left.push((k.clone(), token));
    }
    Ok(())
}

fn serve(stream: UnixStream, tx: &Tx, wake: &EventFd) {
    let mut r = BufReader::new(http::Deadline::new(
        http::passing::FdStream::new(stream),
        REQUEST_TIMEOUT,
    ));
    // The files this request left in the table; those its command did not take are closed
    // once it is answered (a refused hot-plug must not keep its backend's connection open),
    // except with `PUT /vm/files`, whose files wait for later.
    let mut left = Vec::new();
    let mut keep = false;
    let a = match http::read_request(&mut r) {
        Ok(req) => match hand_over(&req, r.get_mut().get_mut(), &mut left).and_then(|()| {
            if req.method == "PUT" && req.path == "/vm/files" {
                // Nothing more than the hand-over.
                keep = true;
                return Err(Answer::none());
            }
            route(&req)
        }) {
            Ok(cmd) => {
                let (atx, arx) = mpsc::channel();
                if tx.send((cmd, atx)).is_ok() && wake.write(1).is_ok() {
                    arx.recv()
                        .unwrap_or_else(|_| Answer::error(503, "the VM is ending"))
                } else {
                    Answer::error(503, "the VM is ending")
                }
            }
            Err(a) => a,
        },
        Err(HttpError(status, msg)) => Answer::error(status, msg),
    };
    if !keep {
        for (k, token) in left {
            drop(wv_fds::take_exact(&k, token));
        }
    }
    let stream = r.get_mut().get_mut();
    let _ = http::Timed::set_write_timeout(stream, Some(REQUEST_TIMEOUT));
    let _ = http::write_response(stream, a.status, &a.headers, &a.body);
    if let Some(w) = a.written {
        let _ = w.send(());
    }
}

/// What the API thread makes of a request before anything reaches the VM: the name of the
/// command it asks for (`info`, `counters`, `pause`, `resume`, `shutdown`, `snapshot`,
/// `migrate-send`), or the status and message of its 4xx answer. No VM is needed (the fuzz
/// target `vmm_control`).
pub fn check_request(req: &Request) -> Result<&'static str, (u16, String)> {
    match route(req) {
        Ok(c) => Ok(c.name()),
        Err(a) => {
            let msg = serde_json::from_str::<serde_json::Value>(&a.body)
                .ok()
                .and_then(|v| v.get("error")?.as_str().map(str::to_string))
                .unwrap_or(a.body);
            Err((a.status, msg))
        }
    }
}

impl Command {
    /// The command's name (what [`check_request`] reports).
    fn name(&self) -> &'static str {
        match self {
            Command::Info => "info",
            Command::Counters => "counters",
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Shutdown => "shutdown",
            Command::Snapshot(_) => "snapshot",
            Command::MigrateSend(_) => "migrate-send",
            Command::BalloonInfo => "balloon-info",
            Command::BalloonSet(_) => "balloon-set",
            Command::DeviceAdd(_) => "device-add",
            Command::DeviceRemove(_) => "device-remove",
            Command::DevicePath(_) => "device-path",
        }
    }
}

/// The command a request asks for, or the 4xx answer to it.
fn route(req: &Request) -> Result<Command, Answer> {
    let segs = http::segments(&req.path).map_err(|HttpError(s, m)| Answer::error(s, m))?;
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let (allow, cmd) = match segs.as_slice() {
        ["vm"] => ("GET", Command::Info),
        ["vm", "counters"] => ("GET", Command::Counters),
        ["vm", "pause"] => ("PUT", Command::Pause),
        ["vm", "resume"] => ("PUT", Command::Resume),
        ["vm", "shutdown"] => ("PUT", Command::Shutdown),
        ["vm", "snapshot"] if req.method == "PUT" => {
            if req
                .content_type
                .as_deref()
                .is_some_and(|t| !t.trim().starts_with("application/json"))
            {
                return Err(Answer::error(
                    415,
                    "the body must be JSON (application/json)",
                ));
            }
            let v: serde_json::Value = serde_json::from_slice(&req.body)
                .map_err(|e| Answer::error(400, format!("invalid snapshot request: {e}")))?;
            if !v.is_object() {
                return Err(Answer::error(
                    400,
                    "the snapshot request must be a JSON object",
                ));
            }
            return serde_json::from_value(v)
                .map(Command::Snapshot)
                .map_err(|e| Answer::error(400, format!("invalid snapshot request: {e}")));
        }
        ["vm", "snapshot"] => ("PUT", Command::Info),
        ["vm", "migrate-send"] if req.method == "PUT" => {
            if req
                .content_type
                .as_deref()
                .is_some_and(|t| !t.trim().starts_with("application/json"))
            {
                return Err(Answer::error(
                    415,
                    "the body must be JSON (application/json)",
                ));
            }
            return crate::migrate::parse_request(&req.body)
                .map(Command::MigrateSend)
                .map_err(|e| Answer::error(400, e));
        }
        ["vm", "migrate-send"] => ("PUT", Command::Info),
        ["vm", "device-add"] if req.method == "PUT" => {
            json_body(req)?;
            return serde_json::from_slice(&req.body)
                .map(Command::DeviceAdd)
                .map_err(|e| Answer::error(400, format!("invalid device-add request: {e}")));
        }
        ["vm", "device-add"] => ("PUT", Command::Info),
        ["vm", "device-remove"] if req.method == "PUT" => {
            json_body(req)?;
            return serde_json::from_slice(&req.body)
                .map(Command::DeviceRemove)
                .map_err(|e| Answer::error(400, format!("invalid device-remove request: {e}")));
        }
        ["vm", "device-remove"] => ("PUT", Command::Info),
        ["vm", "device-path"] if req.method == "PUT" => {
            json_body(req)?;
            let r: DevicePathRequest = serde_json::from_slice(&req.body)
                .map_err(|e| Answer::error(400, format!("invalid device-path request: {e}")))?;
            if r.capture.is_some() && r.path == wv_virtio::vhost_user::DataPath::Direct {
                return Err(Answer::error(
                    400,
                    "a capture needs \"path\": \"interposed\"",
                ));
            }
            return Ok(Command::DevicePath(r));
        }
        ["vm", "device-path"] => ("PUT", Command::Info),
        ["vm", "balloon"] if req.method == "PUT" => {
            json_body(req)?;
            return serde_json::from_slice(&req.body)
                .map(Command::BalloonSet)
                .map_err(|e| Answer::error(400, format!("invalid balloon request: {e}")));
        }
        ["vm", "balloon"] if req.method == "GET" => ("GET", Command::BalloonInfo),
        ["vm", "balloon"] => {
            let mut a = Answer::error(405, format!("{} {} is not allowed", req.method, req.path));
            a.headers.push("Allow: GET, PUT".into());
            return Err(a);
        }
        _ => {
            return Err(Answer::error(
                404,
                format!("no such resource: {}", req.path),
            ))
        }
    };
    if req.method != allow {
        let mut a = Answer::error(405, format!("{} {} is not allowed", req.method, req.path));
        a.headers.push(format!("Allow: {allow}"));
        return Err(a);
    }
    if !req.body.is_empty() {
        return Err(Answer::error(
            400,
            format!("{} {} takes no body", req.method, req.path),
        ));
    }
    Ok(cmd)
}

/// A hot-plugged device's id from its accounting name (`virtio-blk:ID`, `virtio-net:ID`, ...).
pub(crate) fn hot_id(name: &str) -> &str {
    name.split_once(':').map_or(name, |(_, id)| id)
}

/// What a pause saved to set back on resume.
pub(crate) struct Paused {
    /// The kvmclock when every vCPU had parked.
    clock: kvm_bindings::kvm_clock_data,
    /// The host's TSC then.
    host_tsc: u64,
}

/// Carries out commands on the control loop's thread.
pub(crate) struct Controller {
    pub shared: std::sync::Arc<crate::VmShared>,
    pub vm: std::sync::Arc<kvm_ioctls::VmFd>,
    /// Every vCPU thread, vCPU 0 (the main thread) first.
    pub threads: Vec<libc::pthread_t>,
    /// While paused: the kvmclock when the last vCPU parked, set back on resume.
    pub paused: Option<Paused>,
    /// The API socket's path, removed when the VM ends.
    pub api_path: Option<std::path::PathBuf>,
    /// The VM's configuration (what a snapshot records).
    pub cfg: crate::VmConfig,
    /// The KVM system fd (what saving a vCPU asks about the host).
    pub kvm: std::sync::Arc<kvm_ioctls::Kvm>,
    /// How the VM ends once the answer being given has been written (a migration's source).
    pub end_after_answer: Option<(crate::VmEnd, mpsc::Receiver<()>)>,
    /// Removes waiting for the guest to eject.
    pub pending_removes: Vec<PendingRemove>,
    /// Told when the answers of completed removes have been written (the VMM waits for them
    /// before it exits: a guest may eject and power off at once).
    pub answers_in_flight: Vec<mpsc::Receiver<()>>,
}

impl Controller {
    /// Sends every vCPU thread the kick signal (a no-op for one whose loop has ended).
    pub(crate) fn kick_all(&self) {
        if self.shared.stop.load(std::sync::atomic::Ordering::Acquire) {
            // vCPUs asleep in the userspace controllers (halted, or an AP before STARTUP) wait
            // on a condition variable, not in KVM_RUN.
            if let Some((u, ..)) = &self.shared.uapic {
                u.end();
            }
        }
        for &t in &self.threads {
            // SAFETY: every vCPU thread outlives the control thread (joined after it), and the
            // kick handler is installed before any vCPU runs.
            unsafe { libc::pthread_kill(t, crate::vcpu::kick_signal()) };
        }
    }

    fn vcpus(&self) -> u32 {
        u32::try_from(self.threads.len()).unwrap_or(u32::MAX)
    }

    pub(crate) fn execute(&mut self, cmd: Command) -> Answer {
        if self.cfg.irqchip == crate::config::IrqChip::User {
            let what = match cmd {
                Command::Pause | Command::Resume => Some("pause and resume"),
                Command::Snapshot(_) => Some("a snapshot"),
                Command::MigrateSend(_) => Some("a migration"),
                _ => None,
            };
            if let Some(what) = what {
                return Answer::error(
                    409,
                    format!("{what}: not with --irqchip user (the userspace interrupt controllers cannot be paused or saved)"),
                );
            }
        }
        match cmd {
            Command::Info => Answer::json(200, &self.info()),
            Command::Counters => Answer::json(200, &self.counters()),
            Command::Pause => match self.pause() {
                Ok(()) => Answer::none(),
                Err(a) => a,
            },
            Command::Resume => match self.resume() {
                Ok(()) => Answer::none(),
                Err(a) => a,
            },
            Command::Snapshot(r) => match self.snapshot(&r) {
                Ok(v) => Answer::json(200, &v),
                Err(a) => a,
            },
            Command::BalloonInfo => match self.balloon_info() {
                Ok(v) => Answer::json(200, &v),
                Err(a) => a,
            },
            Command::BalloonSet(r) => match self.balloon_set(&r) {
                Ok(()) => Answer::none(),
                Err(a) => a,
            },
            Command::MigrateSend(r) => match self.no_hot_devices("migrate") {
                Ok(()) => self.migrate_send(&r),
                Err(a) => a,
            },
            Command::DeviceAdd(d) => match self.device_add(d) {
                Ok(v) => Answer::json(200, &v),
                Err(a) => a,
            },
            Command::DevicePath(r) => match self.device_path(&r) {
                Ok(v) => Answer::json(200, &v),
                Err(a) => a,
            },
            // Answered by `device_remove`, which the control loop calls instead.
            Command::DeviceRemove(_) => Answer::error(500, "device-remove is answered apart"),
            Command::Shutdown => {
                // The answer first: ended at once, the VMM could exit before the API thread
                // wrote it, and the client read nothing (seen as a flaky status 0).
                let mut a = Answer::none();
                let (tx, rx) = mpsc::channel();
                a.written = Some(tx);
                self.end_after_answer = Some((crate::VmEnd::Signal(libc::SIGTERM), rx));
                a
            }
        }
    }

    fn state(&self) -> &'static str {
        if self.paused.is_some() {
            "paused"
        } else {
            "running"
        }
    }

    fn info(&self) -> serde_json::Value {
        serde_json::json!({
            "state": self.state(),
            "vcpus": self.vcpus(),
            "memory": self.shared.info.mem_size,
            "tsc_follows_pause": self.shared.gate.tsc_rewound(),
            "config": self.cfg,
            "hotplugged": *self.shared.hot_devices.lock().unwrap_or_else(|p| p.into_inner()),
            "device_paths": self.device_paths(),
        })
    }

    /// Every vhost-user device's data path and counters (`GET /vm`).
    fn device_paths(&self) -> Vec<serde_json::Value> {
        self.shared
            .pci_devices
            .handles()
            .iter()
            .filter_map(|h| {
                let pc = h
                    .dev
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .path_control()?;
                let mut v = serde_json::to_value(pc.status()).ok()?;
                v["id"] = hot_id(&h.id).into();
                Some(v)
            })
            .collect()
    }

    /// `PUT /vm/device-path`: switches a vhost-user device between the direct path (the
    /// backend reads the guest's rings) and the interposed one (the VMM in between, writing
    /// a capture or trace if asked), while the guest runs.
    fn device_path(&mut self, r: &DevicePathRequest) -> Result<serde_json::Value, Answer> {
        use wv_virtio::vhost_user::CaptureFile;
        if self.paused.is_some() {
            return Err(Answer::error(
                409,
                "the VM is paused: resume it to switch a device's path",
            ));
        }
        let Some(h) = self
            .shared
            .pci_devices
            .handles()
            .into_iter()
            .find(|h| hot_id(&h.id) == r.id)
        else {
            return Err(Answer::error(404, format!("no device '{}'", r.id)));
        };
        let pc = h
            .dev
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .path_control();
        let Some(pc) = pc else {
            return Err(Answer::error(
                409,
                format!(
                    "'{}' is not served by a vhost-user backend: only vhost-user nets and disks switch paths",
                    r.id
                ),
            ));
        };
        let capture = match &r.capture {
            None => None,
            Some(p) => {
                // The daemon hands a jailed VMM the file, made in the VM's folder.
                let file = match wv_fds::take_path(p) {
                    Some(f) => f,
                    None => std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(p)
                        .map_err(|e| {
                            Answer::error(422, format!("cannot write {}: {e}", p.display()))
                        })?,
                };
                Some(CaptureFile {
                    path: p.clone(),
                    file,
                })
            }
        };
        let st = pc
            .switch(r.path, capture, SWITCH_TIMEOUT)
            .map_err(|e| Answer::error(409, format!("'{}': {e}", r.id)))?;
        let mut v = serde_json::to_value(st).unwrap_or_default();
        v["id"] = r.id.clone().into();
        v["capture_kind"] = pc.capture_kind().into();
        Ok(v)
    }

    /// Refuses `what` (snapshot, migrate) while the VM has hot-plugged devices: the state
    /// records the devices of the configuration the VM started with.
    fn no_hot_devices(&self, what: &str) -> Result<(), Answer> {
        let hot = self
            .shared
            .hot_devices
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match hot.first() {
            None => Ok(()),
            Some(d) => Err(Answer::error(
                409,
                format!(
                    "cannot {what} a VM with hot-plugged devices ('{}'): remove them first                      (PUT /vm/device-remove) or restart the VM with them in its configuration",
                    d.id()
                ),
            )),
        }
    }

    /// Whether `id` names a device of the VM, at start or hot-plugged.
    fn id_taken(&self, id: &str) -> bool {
        self.cfg.disks.iter().any(|d| d.id == id)
            || self.cfg.nets.iter().any(|n| n.name() == id)
            || self
                .shared
                .hot_devices
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|d| d.id() == id)
    }

    /// `PUT /vm/device-add`: builds the device as start does, puts it in a free slot, maps its
    /// BAR and tells the guest (GED interrupt, PCIU).
    fn device_add(&mut self, d: crate::HotDevice) -> Result<serde_json::Value, Answer> {
        use crate::HotDevice;
        let id = d.id();
        if self.id_taken(&id) {
            return Err(Answer::error(
                409,
                format!("the VM already has a device with id '{id}'"),
            ));
        }
        // The configuration the VM would have with it must be valid as a whole (ids, paths,
        // TAP names: what start checks).
        let mut with = self.cfg.clone();
        match &d {
            HotDevice::Disk(c) => with.disks.push(c.clone()),
            HotDevice::Net(n) => with.nets.push(n.clone()),
        }
        with.validate(crate::config::host_ram())
            .map_err(|e| Answer::error(422, format!("cannot add '{id}': {e}")))?;
        match &d {
            HotDevice::Disk(c) => {
                if c.vmkfs.is_some() {
                    return Err(Answer::error(
                        422,
                        "a VMKFS disk cannot be hot-plugged (snapshots freeze the VM's VMKFS disks as configured at start): use path= or vhost-user=",
                    ));
                }
                if c.vhost_user && !self.cfg.memory_is_shared() {
                    return Err(Answer::error(
                        422,
                        "a vhost-user disk needs guest memory shared with its backend: start the VM with one (or with shared memory) to hot-plug more",
                    ));
                }
            }
            HotDevice::Net(n) => {
                if n.vhost_user.is_some() && !self.cfg.memory_is_shared() {
                    return Err(Answer::error(
                        422,
                        "a vhost-user net needs guest memory shared with its backend: start the VM with one (or with shared memory) to hot-plug more",
                    ));
                }
                if n.tap.is_empty() && n.vhost_user.is_none() {
                    return Err(Answer::error(422, "a net needs tap= or vhost-user="));
                }
            }
        }
        let mut builder = self
            .shared
            .pci_builder
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !builder.has_free_slot() {
            return Err(Answer::error(
                409,
                format!("cannot add '{id}': the PCI bus is full (32 slots)"),
            ));
        }
        let (name, dev) = match &d {
            HotDevice::Disk(c) => crate::disk_device(c, usize::MAX, None, &mut Vec::new())
                .map(|(name, dev, _)| (name, dev)),
            HotDevice::Net(n) => crate::net_device(n),
        }
        .map_err(|e| Answer::error(422, format!("cannot add '{id}': {e}")))?;
        let slot = builder
            .add(&self.vm, &self.shared.mem, name, dev, true)
            .map_err(|e| Answer::error(500, format!("cannot add '{id}': {e}")))?;
        drop(builder);
        self.shared
            .hot_devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(d);
        self.shared.hotplug.plugged(slot);
        Ok(serde_json::json!({ "id": id, "slot": slot }))
    }

    /// `PUT /vm/device-remove`: asks the guest to eject the device; `reply` is answered when it
    /// has (the device then taken apart) or when the wait ends.
    pub(crate) fn device_remove(&mut self, r: DeviceRemoveRequest, reply: mpsc::Sender<Answer>) {
        let fail = |a: Answer| {
            let _ = reply.send(a);
        };
        let hot = self
            .shared
            .hot_devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|d| d.id() == r.id);
        if !hot {
            let cold = self.cfg.disks.iter().any(|d| d.id == r.id)
                || self.cfg.nets.iter().any(|n| n.name() == r.id);
            return fail(if cold {
                Answer::error(
                    409,
                    format!(
                        "'{}' was not hot-plugged: only hot-plugged devices can be removed",
                        r.id
                    ),
                )
            } else {
                Answer::error(404, format!("no hot-plugged device '{}'", r.id))
            });
        }
        if self.pending_removes.iter().any(|p| p.id == r.id) {
            return fail(Answer::error(
                409,
                format!("a remove of '{}' is already waiting for the guest", r.id),
            ));
        }
        let timeout = r.timeout_ms.unwrap_or(EJECT_TIMEOUT_MS.0);
        if timeout == 0 || timeout > EJECT_TIMEOUT_MS.1 {
            return fail(Answer::error(
                400,
                format!("timeout_ms must be 1 to {}", EJECT_TIMEOUT_MS.1),
            ));
        }
        let Some(slot) = self
            .shared
            .pci_devices
            .handles()
            .iter()
            .find(|h| h.hotplugged && hot_id(&h.id) == r.id)
            .map(|h| h.slot)
        else {
            return fail(Answer::error(
                404,
                format!("no hot-plugged device '{}'", r.id),
            ));
        };
        self.shared.hotplug.request_eject(slot);
        self.pending_removes.push(PendingRemove {
            slot,
            id: r.id,
            reply,
            deadline: std::time::Instant::now() + Duration::from_millis(timeout),
        });
    }

    /// Takes apart the devices the guest ejected and answers their removes; answers the
    /// removes whose wait is over. Returns how long until the next deadline (None: no wait).
    pub(crate) fn hotplug_work(&mut self) -> Option<Duration> {
        let ejected = self.shared.hotplug.take_ejected();
        for slot in (0u8..32).filter(|s| ejected & (1 << s) != 0) {
            let removed = self
                .shared
                .pci_builder
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&self.vm, slot);
            let Some(name) = removed else { continue };
            let id = hot_id(&name).to_string();
            self.shared
                .hot_devices
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|d| d.id() != id);
            let mut i = 0;
            while i < self.pending_removes.len() {
                if self.pending_removes[i].slot == slot {
                    let p = self.pending_removes.swap_remove(i);
                    let mut a = Answer::none();
                    let (tx, rx) = mpsc::channel();
                    a.written = Some(tx);
                    if p.reply.send(a).is_ok() {
                        self.answers_in_flight.push(rx);
                    }
                } else {
                    i += 1;
                }
            }
        }
        let now = std::time::Instant::now();
        let mut i = 0;
        while i < self.pending_removes.len() {
            if self.pending_removes[i].deadline <= now {
                let p = self.pending_removes.swap_remove(i);
                let _ = p.reply.send(Answer::error(
                    504,
                    format!(
                        "the guest did not eject '{}' in time; the eject request stays with the guest, and the device goes when it ejects it",
                        p.id
                    ),
                ));
            } else {
                i += 1;
            }
        }
        self.answers_in_flight
            .retain(|rx| matches!(rx.try_recv(), Err(mpsc::TryRecvError::Empty)));
        self.pending_removes
            .iter()
            .map(|p| p.deadline.saturating_duration_since(now))
            .min()
    }

    /// Waits (a while at most) for the answers of completed removes to be written.
    pub(crate) fn flush_answers(&mut self) {
        for rx in self.answers_in_flight.drain(..) {
            let _ = rx.recv_timeout(REQUEST_TIMEOUT);
        }
    }

    fn counters(&self) -> serde_json::Value {
        let devices = self.shared.device_activity();
        let vcpus: Vec<_> = self
            .shared
            .kvm_stats
            .iter()
            .map(|fd| {
                let m: serde_json::Map<String, serde_json::Value> =
                    wv_hypervisor::stats::read_counters(fd)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into()))
                        .collect();
                serde_json::Value::Object(m)
            })
            .collect();
        let exits: serde_json::Map<String, serde_json::Value> = self
            .shared
            .live_exits
            .totals(&self.shared.table)
            .into_iter()
            .map(|(k, v)| (k, v.into()))
            .collect();
        let hot: Vec<String> = self
            .shared
            .hot_devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(crate::HotDevice::id)
            .collect();
        serde_json::json!({
            "state": self.state(),
            "devices": devices,
            "vcpus": vcpus,
            "exits_by_cause": exits,
            "hotplugged": hot,
        })
    }

    fn balloon(&self) -> Result<&wv_virtio::balloon::BalloonHandle, Answer> {
        self.shared.balloon.as_ref().map(|(h, _)| h).ok_or_else(|| {
            Answer::error(404, "this VM has no balloon (start it with --balloon on)")
        })
    }

    /// `GET /vm/balloon`: the balloon's state and the VMM's resident memory; also asks the
    /// guest for fresh statistics (the next answer has them).
    fn balloon_info(&self) -> Result<serde_json::Value, Answer> {
        let b = self.balloon()?;
        let s = b.status();
        b.request_stats();
        let page = wv_virtio::balloon::PAGE_SIZE;
        Ok(serde_json::json!({
            "target_bytes": u64::from(s.target_pages) * page,
            "actual_bytes": u64::from(s.actual_pages) * page,
            "ballooned_bytes": s.ballooned_pages * page,
            "memory_bytes": b.ram_bytes(),
            "counters": s.counters,
            "stats": s.stats.named(),
            "vmm_rss_bytes": rss_bytes(),
        }))
    }

    /// `PUT /vm/balloon`: a new target, signalled to the guest as a configuration change.
    fn balloon_set(&self, r: &BalloonRequest) -> Result<(), Answer> {
        let b = self.balloon()?;
        let page = wv_virtio::balloon::PAGE_SIZE;
        if r.target_bytes > b.ram_bytes() {
            return Err(Answer::error(
                422,
                format!(
                    "target_bytes {} is more than the VM's memory ({} bytes)",
                    r.target_bytes,
                    b.ram_bytes()
                ),
            ));
        }
        let pages = u32::try_from(r.target_bytes / page)
            .map_err(|_| Answer::error(422, "target_bytes is beyond the balloon's 2^32 pages"))?;
        if b.set_target(pages) {
            if let Some((_, dev)) = &self.shared.balloon {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .config_changed();
            }
        }
        Ok(())
    }

    /// Parks every vCPU, quiesces the devices, and stops the guest's clock.
    pub(crate) fn pause(&mut self) -> Result<(), Answer> {
        if self.paused.is_some() {
            return Err(Answer::error(409, "the VM is already paused"));
        }
        self.shared.gate.close();
        self.kick_all();
        if !self.shared.gate.wait_parked(self.vcpus()) {
            return Err(Answer::error(503, "the VM is ending"));
        }
        self.shared.pci_devices.pause_all();
        match self.vm.get_clock() {
            Ok(clock) => {
                self.paused = Some(Paused {
                    clock,
                    // SAFETY: rdtsc has no side effects.
                    host_tsc: unsafe { core::arch::x86_64::_rdtsc() },
                })
            }
            Err(e) => {
                self.open_gate(0);
                return Err(Answer::error(500, format!("KVM_GET_CLOCK: {e}")));
            }
        }
        Ok(())
    }

    fn open_gate(&self, tsc_delta: u64) {
        self.shared.pci_devices.resume_all();
        self.shared.gate.open(tsc_delta);
    }

    /// Writes a snapshot of the VM (pausing it meanwhile unless it is paused) to
    /// `r.destination`: docs/SNAPSHOT.md.
    pub(crate) fn snapshot(&mut self, r: &SnapshotRequest) -> Result<serde_json::Value, Answer> {
        self.no_hot_devices("snapshot")?;
        if self.cfg.disks.iter().any(|d| d.vmkfs.is_none()) && !r.allow_raw_disk {
            return Err(Answer::error(
                422,
                "the VM has raw disk images, which a snapshot does not hold: copy them while \
                 the VM is paused and say \"allow_raw_disk\": true",
            ));
        }
        let start = std::time::Instant::now();
        let was_paused = self.paused.is_some();
        if !was_paused {
            self.pause()?;
        }
        // VMKFS disks freeze at the instant memory is saved; undone if the snapshot fails.
        let held = &self.shared.vmkfs;
        let written = crate::vmkfs_disk::freeze_all(held)
            .map_err(|e| Answer::error(500, e))
            .and_then(|frozen| {
                self.write_snapshot(&r.destination, &frozen)
                    .map(|(m, st)| (m, st, frozen.clone()))
                    .inspect_err(|_| crate::vmkfs_disk::unfreeze_all(held, &frozen))
            });
        if !was_paused {
            self.resume()?;
        }
        let (memory_bytes, state_bytes, frozen) = written?;
        Ok(serde_json::json!({
            "directory": r.destination,
            "memory_bytes": memory_bytes,
            "state_bytes": state_bytes,
            "duration_ms": start.elapsed().as_secs_f64() * 1e3,
            "disks": frozen,
        }))
    }

    /// The snapshot of the paused VM: (memory bytes written, state bytes).
    fn write_snapshot(
        &self,
        dir: &Path,
        frozen: &[crate::vmkfs_disk::FrozenDisk],
    ) -> Result<(u64, u64), Answer> {
        let mut sections = self.save_state(frozen)?;
        if !frozen.is_empty() {
            sections.push(crate::snapshot::DISKS, json(&frozen));
        }
        let state_bytes = sections.encode().len() as u64;
        let memory = crate::snapshot::write(dir, &sections, &self.shared.mem).map_err(|e| {
            let status = if e.to_string().contains("not empty") {
                409
            } else {
                500
            };
            Answer::error(
                status,
                format!("cannot write the snapshot to {}: {e}", dir.display()),
            )
        })?;
        Ok((memory, state_bytes))
    }

    /// The state sections of the paused VM (machine, config, vm, vcpu.N, devices): what a
    /// snapshot's `state` file and a migration stream carry (docs/SNAPSHOT.md). `frozen`: the
    /// VMKFS disks a snapshot froze, which its configuration names instead of the live ones.
    pub(crate) fn save_state(
        &self,
        frozen: &[crate::vmkfs_disk::FrozenDisk],
    ) -> Result<crate::snapshot::Sections, Answer> {
        use crate::snapshot::{Machine, Sections};
        use wv_hypervisor::state;
        let Some(paused) = &self.paused else {
            return Err(Answer::error(500, "the VM is not paused"));
        };
        let fail = |what: &str, e: String| Answer::error(500, format!("{what}: {e}"));
        // Every vCPU saves its own state, on its own thread.
        let (tx, rx) = mpsc::channel();
        let kvm = self.kvm.clone();
        let ran = self.shared.gate.run_on_each(&mut |i| {
            let (tx, kvm) = (tx.clone(), kvm.clone());
            Box::new(move |fd, _| {
                let r = state::complete_pending_exit(fd).and_then(|()| state::save_vcpu(&kvm, fd));
                let _ = tx.send((i, r));
            })
        });
        drop(tx);
        if !ran {
            return Err(Answer::error(503, "the VM is ending"));
        }
        let mut vcpus: Vec<_> = rx.iter().collect();
        vcpus.sort_by_key(|(i, _)| *i);
        let mut vm = state::save_vm(&self.vm).map_err(|e| fail("saving the VM", e.to_string()))?;
        // The guest's clock as it stopped, not as it would read now.
        vm.clock.0 = paused.clock;
        let mut sections = Sections::default();
        sections.push(
            "machine",
            json(&Machine {
                memory: self.shared.info.mem_size,
                vcpus: self.vcpus(),
                tsc_khz: self.shared.info.tsc_khz,
                restores: self.shared.info.restores,
            }),
        );
        sections.push(
            "config",
            json(&crate::vmkfs_disk::snapshot_config(&self.cfg, frozen)),
        );
        sections.push("vm", json(&vm));
        if vcpus.len() != self.threads.len() {
            return Err(Answer::error(500, "a vCPU did not save its state"));
        }
        for (i, st) in vcpus {
            let st = st.map_err(|e| fail(&format!("saving vCPU {i}"), e.to_string()))?;
            sections.push(&format!("vcpu.{i}"), json(&st));
        }
        let devices =
            crate::devstate::save(&self.shared).map_err(|e| fail("saving the devices", e))?;
        sections.push("devices", json(&devices));
        Ok(sections)
    }

    /// Sets the guest's clock back to where it stopped and lets everything run again.
    pub(crate) fn resume(&mut self) -> Result<(), Answer> {
        let Some(p) = self.paused.take() else {
            return Err(Answer::error(409, "the VM is not paused"));
        };
        // Only the clock value: the flags KVM_GET_CLOCK returned describe how it was read.
        let set = kvm_bindings::kvm_clock_data {
            clock: p.clock.clock,
            ..Default::default()
        };
        if let Err(e) = self.vm.set_clock(&set) {
            // The guest still runs on; its clock jumps by the pause, which is said.
            eprintln!(
                "wv: resume: KVM_SET_CLOCK failed ({e}): the guest's kvmclock jumps by the pause"
            );
        }
        // SAFETY: rdtsc has no side effects.
        let now = unsafe { core::arch::x86_64::_rdtsc() };
        self.open_gate(now.saturating_sub(p.host_tsc));
        // Answer once every vCPU is back on its way (its TSC moved), so GET /vm says how it went.
        if !self.shared.gate.wait_left(self.vcpus()) {
            return Err(Answer::error(503, "the VM is ending"));
        }
        Ok(())
    }
}

/// The JSON of a state section (these types always serialise).
/// The VMM's resident set in bytes (`/proc/self/statm`), or null when it cannot be read.
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(raw: &str) -> Request {
        http::read_request(&mut BufReader::new(raw.as_bytes())).unwrap()
    }

    #[test]
    fn requests_are_checked_without_a_vm() {
        assert_eq!(check_request(&req("GET /vm HTTP/1.1\r\n\r\n")), Ok("info"));
        assert_eq!(
            check_request(&req("PUT /vm/pause HTTP/1.1\r\n\r\n")),
            Ok("pause")
        );
        let body = r#"{"destination":"/tmp/s"}"#;
        let put = format!(
            "PUT /vm/snapshot HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(check_request(&req(&put)), Ok("snapshot"));
        let (s, m) = check_request(&req("GET /vm/pause HTTP/1.1\r\n\r\n")).unwrap_err();
        assert_eq!(s, 405, "{m}");
        let (s, m) = check_request(&req("GET /nothing HTTP/1.1\r\n\r\n")).unwrap_err();
        assert!(s == 404 && m.contains("/nothing"), "{s} {m}");
        let put = |body: &str| {
            format!(
                "PUT /vm/device-path HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        let ok = put(r#"{"id":"net0","path":"interposed","capture":"/tmp/c.pcap"}"#);
        assert_eq!(check_request(&req(&ok)), Ok("device-path"));
        for bad in [
            r#"{"id":"net0","path":"direct","capture":"/tmp/c.pcap"}"#,
            r#"{"id":"net0","path":"sideways"}"#,
            r#"{"path":"direct"}"#,
        ] {
            let (s, m) = check_request(&req(&put(bad))).unwrap_err();
            assert_eq!(s, 400, "{bad}: {m}");
        }
        let bad = "PUT /vm/migrate-send HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]";
        let (s, m) = check_request(&req(bad)).unwrap_err();
        assert!(s == 400 && m.contains("JSON object"), "{s} {m}");
    }
}
