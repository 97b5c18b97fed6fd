//! The daemon: the world table behind the REST API.
//!
//! | method and path | does |
//! |---|---|
//! | GET /v1/host | host status |
//! | GET /v1/vms | every VM |
//! | POST /v1/vms | define a VM (body: a VM spec) |
//! | GET /v1/vms/{name} | one VM |
//! | DELETE /v1/vms/{name} | forget a VM that is not running |
//! | POST /v1/vms/{name}/start, /stop | start or stop its VMM |
//! | POST /v1/vms/{name}/pause, /resume | stop or continue every vCPU (the VMM process) |
//! | PATCH /v1/vms/{name} | change shares, reservation or limit (live when running) |
//! | GET /v1/vms/{name}/stats | CPU accounting of one VM |
//! | GET /v1/stats | CPU accounting of every running world, the system worlds (management, helper) included |
//!
//! Errors are JSON `{"error": "..."}` with 400 (malformed request or JSON, unknown fields),
//! 404, 405, 409 (duplicate name, wrong state) or 422 (a value out of range).

use crate::helper;
use crate::http::{self, HttpError, Request};
use crate::sched::{self, Cgroups, Demand};
use crate::store::{Document, Store};
use crate::supervisor;
use crate::world::{State, VmSpec, World};
use serde_json::json;
use std::collections::HashSet;
use std::io::BufReader;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
}

/// A change of scheduler settings (`PATCH /v1/vms/{name}`); `limit: 0` removes the limit.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceUpdate {
    shares: Option<u32>,
    reservation: Option<f64>,
    limit: Option<f64>,
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

fn error(status: u16, msg: impl std::fmt::Display) -> Reply {
    (status, json!({ "error": msg.to_string() }).to_string())
}

fn ok<T: serde::Serialize>(status: u16, v: &T) -> Reply {
    (
        status,
        serde_json::to_string(v).unwrap_or_else(|e| json!({ "error": e.to_string() }).to_string()),
    )
}

impl Daemon {
    /// Loads the state directory and re-adopts the VMMs a previous daemon left running (or
    /// records that they ended while it was down).
    pub fn open(state_dir: &Path, socket: &Path, wv: PathBuf) -> std::io::Result<Arc<Daemon>> {
        let store = Store::open(state_dir)?;
        let doc = store.load()?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let canonical = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.into());
        let cgroups = Cgroups::open(&format!("worldvisor/{}", tag(&canonical)), cpus);
        let cgroups = cgroups.and_then(|c| c.system().map(|()| c));
        if let Err(e) = &cgroups {
            eprintln!("wv host: CPU scheduler unavailable (VMs with settings other than the default shares cannot start): {e}");
        }
        let d = Arc::new(Daemon {
            store,
            doc: Mutex::new(doc),
            wv,
            stopping: Mutex::default(),
            socket: socket.to_path_buf(),
            cgroups,
            cpus,
            ctl: Mutex::default(),
        });
        let mut adopt = Vec::new();
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
                match w.pid {
                    Some(pid) if supervisor::is_our_vmm(pid, &d.store.vm_dir(&w.spec.name)) => {
                        adopt.push((w.id, pid))
                    }
                    _ => {
                        w.state = State::Stopped;
                        w.pid = None;
                        w.console = None;
                        w.reason = Some("the VMM ended while the daemon was down".into());
                    }
                }
            }
            d.store.save(&doc)?;
            if let Ok(cg) = &d.cgroups {
                for w in doc.worlds.iter().filter(|w| !is_live(w.state)) {
                    cg.remove(w.id);
                }
                for &(id, pid) in &adopt {
                    if let Err(e) = cg.attach(id, pid) {
                        eprintln!("wv host: world {id}: {e}");
                    }
                }
            }
            d.rebalance(&doc);
        }
        if d.cgroups.is_ok() {
            let d2 = d.clone();
            helper::spawn("sched", move || d2.schedule())?;
        }
        for (id, pid) in adopt {
            let d2 = d.clone();
            helper::spawn("wait", move || {
                supervisor::wait_foreign(pid);
                d2.finished(id, None);
            })?;
        }
        Ok(d)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Document> {
        self.doc.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, doc: &Document) -> Result<(), Reply> {
        self.store
            .save(doc)
            .map_err(|e| error(500, format!("saving the state: {e}")))
    }

    /// Records the end of a VMM run (`status` None for a re-adopted process).
    fn finished(&self, id: u64, status: Option<std::process::ExitStatus>) {
        let requested = self
            .stopping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let mut doc = self.lock();
        let Some(w) = doc.worlds.iter_mut().find(|w| w.id == id) else {
            return;
        };
        let (crashed, reason) = match status {
            Some(s) => supervisor::classify(
                s,
                requested,
                &self.store.vm_dir(&w.spec.name).join("vmm.log"),
            ),
            None if requested => (false, "stopped on request".into()),
            None => (
                false,
                "the VMM ended (re-adopted after a daemon restart: exit status unknown)".into(),
            ),
        };
        w.state = if crashed {
            State::Crashed
        } else {
            State::Stopped
        };
        w.pid = None;
        w.console = None;
        w.reason = Some(reason);
        let _ = self.store.save(&doc);
        if let Ok(cg) = &self.cgroups {
            cg.remove(id);
        }
        self.rebalance(&doc);
    }

    /// The running worlds and their entitlements.
    fn entitled<'a>(&self, doc: &'a Document) -> Vec<(&'a World, f64)> {
        let live: Vec<&World> = doc.worlds.iter().filter(|w| is_live(w.state)).collect();
        let demands: Vec<Demand> = live.iter().map(|w| w.spec.demand()).collect();
        live.into_iter()
            .zip(sched::entitlements(&demands, self.cpus))
            .collect()
    }

    /// The scheduler's loop: every 100 ms, feed each running world's use back into its weight.
    fn schedule(&self) {
        let tick = Duration::from_millis(100);
        let mut last = std::time::Instant::now();
        loop {
            std::thread::sleep(tick);
            let now = std::time::Instant::now();
            let dt = u64::try_from(now.duration_since(last).as_nanos()).unwrap_or(u64::MAX);
            last = now;
            let doc = self.lock();
            let entitled = self.entitled(&doc);
            let samples: Vec<sched::Sample> = entitled
                .iter()
                .filter_map(|&(w, e)| {
                    let (cpu_ns, ready_ns) = sched::totals(&sched::threads(w.pid?));
                    Some(sched::Sample {
                        id: w.id,
                        entitlement: e,
                        cpu_ns,
                        ready_ns,
                    })
                })
                .collect();
            self.ctl
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .step(&samples, dt);
            self.enforce(&entitled, false);
        }
    }

    /// Recomputes every running world's entitlement and applies it, limits included (after a
    /// change of settings or of the running set).
    fn rebalance(&self, doc: &Document) {
        self.enforce(&self.entitled(doc), true);
    }

    /// Writes each world's weight (its entitlement times its feedback gain) and, with
    /// `limits`, its limit.
    fn enforce(&self, entitled: &[(&World, f64)], limits: bool) {
        let Ok(cg) = &self.cgroups else { return };
        let ctl = self.ctl.lock().unwrap_or_else(|p| p.into_inner());
        for &(w, e) in entitled {
            let e = e * ctl.gain(w.id);
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

    fn set(&self, name: &str, body: &[u8]) -> Reply {
        let u: ResourceUpdate = match serde_json::from_slice(body) {
            Ok(u) => u,
            Err(e) => return error(400, format!("invalid settings: {e}")),
        };
        let mut doc = self.lock();
        let Some(i) = doc.worlds.iter().position(|w| w.spec.name == name) else {
            return error(404, format!("no VM named '{name}'"));
        };
        let mut spec = doc.worlds[i].spec.clone();
        spec.shares = u.shares.unwrap_or(spec.shares);
        spec.reservation = u.reservation.unwrap_or(spec.reservation);
        if let Some(l) = u.limit {
            spec.limit = (l != 0.0).then_some(l);
        }
        if let Err(e) = sched::validate(&spec.demand()) {
            return error(422, e);
        }
        if is_live(doc.worlds[i].state) {
            if let Err(r) = self.admit(&doc, &spec) {
                return r;
            }
        }
        let old = std::mem::replace(&mut doc.worlds[i].spec, spec);
        if let Err(e) = self.save(&doc) {
            doc.worlds[i].spec = old;
            return e;
        }
        self.rebalance(&doc);
        ok(200, &doc.worlds[i])
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
        let doc = self.lock();
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
        for (w, e) in self.entitled(&doc) {
            out.push(self.stats_of(w, e));
        }
        ok(200, &out)
    }

    /// Handles one request.
    pub fn handle(self: &Arc<Self>, req: &Request) -> Reply {
        let parts: Vec<&str> = req.path.trim_end_matches('/').split('/').skip(1).collect();
        match (req.method.as_str(), parts.as_slice()) {
            ("GET", ["v1", "host"]) => self.host(),
            ("GET", ["v1", "vms"]) => ok(200, &self.lock().worlds),
            ("POST", ["v1", "vms"]) => self.create(&req.body),
            ("GET", ["v1", "vms", name]) => self.with(name, |w| Ok(ok(200, w))),
            ("PATCH", ["v1", "vms", name]) => self.set(name, &req.body),
            ("GET", ["v1", "vms", name, "stats"]) => self.stats(name),
            ("GET", ["v1", "stats"]) => self.all_stats(),
            ("DELETE", ["v1", "vms", name]) => self.delete(name),
            ("POST", ["v1", "vms", name, "start"]) => self.start(name),
            ("POST", ["v1", "vms", name, "stop"]) => self.stop(name),
            ("POST", ["v1", "vms", name, "pause"]) => {
                self.signal_state(name, State::Running, State::Paused, libc::SIGSTOP)
            }
            ("POST", ["v1", "vms", name, "resume"]) => {
                self.signal_state(name, State::Paused, State::Running, libc::SIGCONT)
            }
            (
                _,
                ["v1", "host"]
                | ["v1", "vms"]
                | ["v1", "vms", _]
                | ["v1", "stats"]
                | ["v1", "vms", _, "start" | "stop" | "pause" | "resume" | "stats"],
            ) => error(
                405,
                format!("{} is not allowed on {}", req.method, req.path),
            ),
            _ => error(404, format!("no such resource: {}", req.path)),
        }
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
                "host_memory": wv_vmm::config::host_ram(),
                "scheduler": match &self.cgroups {
                    Ok(c) => c.describe(),
                    Err(e) => format!("unavailable: {e}"),
                },
            }),
        )
    }

    fn with(&self, name: &str, f: impl FnOnce(&World) -> Result<Reply, Reply>) -> Reply {
        let doc = self.lock();
        match doc.worlds.iter().find(|w| w.spec.name == name) {
            Some(w) => f(w).unwrap_or_else(|e| e),
            None => error(404, format!("no VM named '{name}'")),
        }
    }

    fn create(&self, body: &[u8]) -> Reply {
        let spec: VmSpec = match serde_json::from_slice(body) {
            Ok(s) => s,
            Err(e) => return error(400, format!("invalid VM spec: {e}")),
        };
        if let Err(e) = spec.validate() {
            return error(422, e);
        }
        let mut doc = self.lock();
        if doc.worlds.iter().any(|w| w.spec.name == spec.name) {
            return error(409, format!("a VM named '{}' exists already", spec.name));
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
        };
        doc.worlds.push(w.clone());
        if let Err(e) = self.save(&doc) {
            doc.worlds.pop();
            return e;
        }
        ok(201, &w)
    }

    fn delete(&self, name: &str) -> Reply {
        let mut doc = self.lock();
        let Some(i) = doc.worlds.iter().position(|w| w.spec.name == name) else {
            return error(404, format!("no VM named '{name}'"));
        };
        if matches!(
            doc.worlds[i].state,
            State::Running | State::Starting | State::Paused
        ) {
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
        let dir = self.store.vm_dir(name);
        if let Err(e) = helper::spawn("cleanup", move || {
            let _ = std::fs::remove_dir_all(dir);
        }) {
            eprintln!("wv host: removing the files of VM '{name}': {e}");
        }
        (204, String::new())
    }

    fn start(self: &Arc<Self>, name: &str) -> Reply {
        let mut doc = self.lock();
        let Some(w) = doc.worlds.iter_mut().find(|w| w.spec.name == name) else {
            return error(404, format!("no VM named '{name}'"));
        };
        if matches!(w.state, State::Running | State::Starting | State::Paused) {
            return error(409, format!("VM '{name}' is running already"));
        }
        let spec = w.spec.clone();
        if let Err(r) = self.admit(&doc, &spec) {
            return r;
        }
        let Some(w) = doc.worlds.iter_mut().find(|w| w.spec.name == name) else {
            return error(404, format!("no VM named '{name}'"));
        };
        let dir = self.store.vm_dir(name);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            return error(500, format!("creating {}: {e}", dir.display()));
        }
        let log = dir.join("vmm.log");
        let sock = dir.join("console.sock");
        let args = w.spec.run_args(&dir.join("console.log"), &sock);
        let mut child = match supervisor::spawn(&self.wv, &args, &log) {
            Ok(c) => c,
            Err(e) => return error(500, format!("starting the VMM: {e}")),
        };
        let id = w.id;
        if let Ok(cg) = &self.cgroups {
            if let Err(e) = cg.attach(id, child.id()) {
                let _ = child.kill();
                let _ = child.wait();
                return error(500, format!("placing the VMM under the scheduler: {e}"));
            }
        }
        w.state = State::Running;
        w.pid = Some(child.id());
        w.reason = None;
        w.console = Some(sock.display().to_string());
        let reply = ok(200, &*w);
        let _ = self.save(&doc);
        self.rebalance(&doc);
        drop(doc);
        let d = self.clone();
        let waiter = helper::spawn("wait", move || {
            let status = child.wait().ok();
            d.finished(id, status);
        });
        if let Err(e) = waiter {
            eprintln!("wv host: world {id}: no thread to wait for its VMM: {e}");
        }
        reply
    }

    /// Pause (SIGSTOP: every thread of the VMM, so every vCPU, stops) or resume (SIGCONT).
    fn signal_state(&self, name: &str, from: State, to: State, sig: libc::c_int) -> Reply {
        let mut doc = self.lock();
        let Some(w) = doc.worlds.iter_mut().find(|w| w.spec.name == name) else {
            return error(404, format!("no VM named '{name}'"));
        };
        let Some(pid) = w.pid.filter(|_| w.state == from) else {
            return error(
                409,
                format!("VM '{name}' is {:?}, not {:?}", w.state, from).to_lowercase(),
            );
        };
        // SAFETY: signalling the VMM process this daemon supervises for this VM.
        if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
            return error(
                409,
                format!("VM '{name}': {}", std::io::Error::last_os_error()),
            );
        }
        w.state = to;
        let reply = ok(200, &*w);
        let _ = self.save(&doc);
        reply
    }

    fn stop(&self, name: &str) -> Reply {
        let (id, pid) = {
            let doc = self.lock();
            let Some(w) = doc.worlds.iter().find(|w| w.spec.name == name) else {
                return error(404, format!("no VM named '{name}'"));
            };
            match (w.state, w.pid) {
                (State::Running | State::Starting | State::Paused, Some(pid)) => (w.id, pid),
                _ => return error(409, format!("VM '{name}' is not running")),
            }
        };
        self.stopping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        let pid = pid as libc::pid_t;
        // SAFETY: signalling the VMM process we started (or re-adopted) for this VM; a paused
        // VMM is continued so it can act on SIGTERM.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
            libc::kill(pid, libc::SIGCONT);
        }
        for i in 0..200 {
            if self
                .lock()
                .worlds
                .iter()
                .find(|w| w.id == id)
                .is_none_or(|w| w.pid.is_none())
            {
                break;
            }
            if i == 100 {
                // SAFETY: as above; the VMM did not stop within 5 s.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.with(name, |w| Ok(ok(200, w)))
    }
}

/// Serves the API on `socket` until the process ends. A stale socket file is replaced; a live
/// one (another daemon) is an error.
pub fn serve(d: Arc<Daemon>, socket: &Path) -> std::io::Result<()> {
    if let Some(parent) = socket.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if socket.exists() {
        if UnixStream::connect(socket).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("a daemon already listens on {}", socket.display()),
            ));
        }
        std::fs::remove_file(socket)?;
    }
    let listener = UnixListener::bind(socket)?;
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let d = d.clone();
        if let Err(e) = helper::spawn_management(move || answer(&d, stream)) {
            eprintln!("wv host: no thread for a connection: {e}");
        }
    }
    Ok(())
}

/// Serves the API on TCP at `addr` too (only when asked: the API has no authentication, so
/// anything but a loopback address exposes the host to its network).
pub fn serve_tcp(d: Arc<Daemon>, addr: &str) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(addr)?;
    std::thread::Builder::new()
        .name("api-tcp".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(stream) = conn else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let d = d.clone();
                if let Err(e) = helper::spawn_management(move || answer(&d, stream)) {
                    eprintln!("wv host: no thread for a connection: {e}");
                }
            }
        })?;
    Ok(())
}

/// One request and its answer on a connection.
fn answer<S: std::io::Read + std::io::Write>(d: &Arc<Daemon>, mut stream: S) {
    let reply = match http::read_request(&mut BufReader::new(&mut stream)) {
        Ok(req) => d.handle(&req),
        Err(HttpError(status, msg)) => error(status, msg),
    };
    let _ = http::write_response(&mut stream, reply.0, &reply.1);
}
