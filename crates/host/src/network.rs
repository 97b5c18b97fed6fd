//! The daemon's networks and the switch world that serves them: one `wv vswitch` process
//! (crates/vswitch), started when the first network exists (or at the daemon's start if any
//! do), in its own cgroup beside the VM worlds, its sockets under `STATE_DIR/sw` (mode 0700).
//! The daemon tells it its networks and ports over its control socket; when it dies it is
//! started again (after a back-off that grows while it keeps dying young) with every network
//! and port on its command line. VMMs reconnect to their ports by themselves, so a fault in
//! the switch takes down neither a VM nor the daemon.

use crate::supervisor::Pidfd;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// World id of the switch in the daemon's statistics (system worlds are 0 and 1, VMs count
/// up from 2 and never get this far).
pub const SWITCH_ID: u64 = u32::MAX as u64;
/// Shares of the switch world: a CPU's worth when contended, as the management world.
pub const SWITCH_SHARES: u32 = 1000;
/// The folder, in the state directory, of the switch's sockets and log.
pub const SWITCH_DIR: &str = "sw";
/// Most networks one daemon holds.
pub const MAX_NETWORKS: usize = 64;
/// Longest path of a Unix socket (the kernel's `sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Back-off before restarting a switch that died: doubling from the first to the last while
/// it keeps dying within [`YOUNG`] of its start.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
const YOUNG: Duration = Duration::from_secs(10);
/// Time the switch has to answer on its control socket once started.
const READY: Duration = Duration::from_secs(20);

/// A network as the daemon keeps it (`POST /v1/networks`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// 1-64 of `[A-Za-z0-9_.-]`, not starting with `.`.
    pub name: String,
    /// A TAP connecting the network to the host (created if missing).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::world::no_null"
    )]
    pub uplink: Option<String>,
}

impl NetworkSpec {
    /// Checks the name and the uplink, and that every port's socket path under `dir` fits.
    pub fn validate(&self, dir: &Path) -> Result<(), String> {
        if !wv_config::valid_network_name(&self.name) {
            return Err(format!(
                "invalid network name '{}': use 1-64 of A-Z a-z 0-9 _ . - (not starting with .)",
                self.name.escape_debug()
            ));
        }
        if let Some(t) = &self.uplink {
            if !wv_config::valid_tap_name(t) {
                return Err(format!(
                    "uplink '{}': a TAP name takes 1-{} characters, without '/', ':', spaces or NUL",
                    t.escape_debug(),
                    wv_config::MAX_TAP_NAME
                ));
            }
        }
        let longest = port_socket(dir, &self.name, &port_name(u64::from(u32::MAX), 15));
        let n = longest.as_os_str().len();
        if n > MAX_SOCKET_PATH {
            return Err(format!(
                "network name '{}' is too long for the switch's sockets under {} ({n} bytes, at most {MAX_SOCKET_PATH}): use a shorter one",
                self.name,
                dir.display()
            ));
        }
        Ok(())
    }
}

/// The switch port of net `index` of VM world `id`.
pub fn port_name(id: u64, index: usize) -> String {
    format!("{id}-net{index}")
}

/// The socket of port `port` of `network` under the switch's folder `dir`.
pub fn port_socket(dir: &Path, network: &str, port: &str) -> PathBuf {
    dir.join(network).join(format!("{port}.sock"))
}

/// What the supervisor knows and wants.
#[derive(Default)]
struct State {
    /// The networks the switch should have.
    networks: Vec<NetworkSpec>,
    /// The ports it should have: (network, port).
    ports: Vec<(String, String)>,
    /// The running switch process: its pid and pidfd.
    running: Option<(u32, Arc<Pidfd>)>,
    /// How many switch processes were started.
    starts: u64,
    /// The last back-off waited.
    backoff: Duration,
    /// Why the last start failed, or how the last switch ended.
    last: Option<String>,
    /// Set once the daemon is ending: no switch starts any more.
    closed: bool,
}

/// The switch world's supervisor (a handle: clones share it).
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    wv: PathBuf,
    dir: PathBuf,
    /// Places a started switch in its cgroup.
    place: Box<dyn Fn(u32) -> Result<(), String> + Send + Sync>,
    state: Mutex<State>,
    changed: Condvar,
}

/// What `GET /v1/stats` shows of the switch world.
pub struct Accounting {
    /// The switch process.
    pub pid: u32,
}

impl Supervisor {
    /// A supervisor of the switch run by `wv` in `state_dir`/[`SWITCH_DIR`] (made with mode
    /// 0700); `place` puts a started switch into its cgroup. A switch a previous daemon left
    /// running is ended: the one started here takes its sockets.
    pub fn new(
        wv: PathBuf,
        state_dir: &Path,
        place: Box<dyn Fn(u32) -> Result<(), String> + Send + Sync>,
    ) -> std::io::Result<Supervisor> {
        use std::os::unix::fs::PermissionsExt;
        let dir = state_dir.join(SWITCH_DIR);
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let s = Supervisor {
            inner: Arc::new(Inner {
                wv,
                dir,
                place,
                state: Mutex::default(),
                changed: Condvar::new(),
            }),
        };
        s.end_left_over();
        Ok(s)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The switch's folder.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn pid_file(&self) -> PathBuf {
        self.inner.dir.join("pid")
    }

    /// Ends a switch of this folder that a previous daemon left (its pid file names it; it
    /// is checked to be a `wv vswitch` of this folder after its pidfd is opened).
    fn end_left_over(&self) {
        let Some(pid) = std::fs::read_to_string(self.pid_file())
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
        else {
            return;
        };
        let Ok(fd) = Pidfd::open(pid) else {
            return;
        };
        if is_our_switch(pid, &self.inner.dir) {
            eprintln!("wv host: ending the switch (pid {pid}) a previous daemon left");
            let _ = fd.signal(libc::SIGKILL);
            fd.wait(Some(Duration::from_secs(10)));
        }
        let _ = std::fs::remove_file(self.pid_file());
    }

    /// Sets what the switch serves at the daemon's start (the stored networks, the ports of
    /// the VMs still running) and starts it if there is any network.
    pub fn restore(&self, networks: Vec<NetworkSpec>, ports: Vec<(String, String)>) {
        let mut st = self.state();
        st.networks = networks;
        st.ports = ports;
        if !st.networks.is_empty() {
            if let Err(e) = self.start(&mut st) {
                eprintln!("wv host: the switch: {e}");
            }
        }
    }

    /// Starts the switch unless it runs; an error says why it cannot.
    fn ensure(&self, st: &mut MutexGuard<'_, State>) -> Result<(), String> {
        if st.running.is_some() {
            return Ok(());
        }
        self.start(st)
    }

    /// Starts a switch with everything `st` wants on its command line and waits until it
    /// answers on its control socket; a thread waits for its end and starts it again.
    fn start(&self, st: &mut MutexGuard<'_, State>) -> Result<(), String> {
        if st.closed {
            return Err("the daemon is stopping".into());
        }
        let i = &*self.inner;
        let mut args: Vec<String> = vec![
            "vswitch".into(),
            "--socket-dir".into(),
            i.dir.display().to_string(),
        ];
        for n in &st.networks {
            args.extend(["--network".into(), n.name.clone()]);
            if let Some(t) = &n.uplink {
                args.extend(["--uplink".into(), format!("{}={t}", n.name)]);
            }
        }
        for (n, p) in &st.ports {
            args.extend(["--port".into(), format!("{n}/{p}")]);
        }
        let log = i.dir.join("vswitch.log");
        let mut child = crate::supervisor::spawn(&i.wv, &args, &log)
            .map_err(|e| format!("starting {}: {e}", i.wv.display()))?;
        let pid = child.id();
        // Not waited for yet: the pidfd names this child for good.
        let fd = match Pidfd::open(pid) {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("opening a pidfd for the switch: {e}"));
            }
        };
        if let Err(e) = (i.place)(pid) {
            eprintln!("wv host: the switch (pid {pid}): {e}");
        }
        let _ = std::fs::write(self.pid_file(), pid.to_string());
        st.starts += 1;
        st.running = Some((pid, fd.clone()));
        let started = Instant::now();
        let me = self.clone();
        let waiter = crate::helper::spawn("switch", move || {
            let status = child.wait().ok();
            me.ended(pid, status, started);
        });
        if let Err(e) = waiter {
            let _ = fd.signal(libc::SIGKILL);
            st.running = None;
            return Err(format!("no thread to wait for the switch: {e}"));
        }
        // Ready once it answers: it binds every port's socket before it serves requests.
        let deadline = Instant::now() + READY;
        loop {
            if self.request_to("stats").is_ok() {
                return Ok(());
            }
            if fd.wait(Some(Duration::from_millis(20))) {
                let tail = last_line(&log);
                return Err(format!("the switch ended at its start: {tail}"));
            }
            if Instant::now() > deadline {
                let _ = fd.signal(libc::SIGKILL);
                return Err(format!(
                    "the switch did not answer within {READY:?}: {}",
                    last_line(&log)
                ));
            }
        }
    }

    /// The switch process `pid` ended: it is started again after a back-off, unless the
    /// daemon is ending or no network is left.
    fn ended(&self, pid: u32, status: Option<std::process::ExitStatus>, started: Instant) {
        let mut st = self.state();
        if !matches!(st.running, Some((p, _)) if p == pid) {
            return;
        }
        st.running = None;
        let why = format!(
            "the switch (pid {pid}) ended ({}) after {:.1} s",
            status.map_or("status unknown".into(), |s| s.to_string()),
            started.elapsed().as_secs_f64()
        );
        st.last = Some(why.clone());
        self.inner.changed.notify_all();
        if st.closed {
            return;
        }
        eprintln!("wv host: {why}; starting it again");
        st.backoff = if started.elapsed() >= YOUNG || st.backoff.is_zero() {
            BACKOFF.0
        } else {
            (st.backoff * 2).min(BACKOFF.1)
        };
        loop {
            let wait = st.backoff;
            let (g, _) = self
                .inner
                .changed
                .wait_timeout_while(st, wait, |s| !s.closed && s.running.is_none())
                .unwrap_or_else(|p| p.into_inner());
            st = g;
            // Started meanwhile (a VM's start needed it), or nothing to serve.
            if st.closed || st.running.is_some() || st.networks.is_empty() {
                return;
            }
            match self.start(&mut st) {
                Ok(()) => {
                    eprintln!("wv host: the switch runs again");
                    return;
                }
                Err(e) => {
                    eprintln!("wv host: restarting the switch: {e}");
                    st.last = Some(e);
                    st.backoff = (st.backoff * 2).min(BACKOFF.1);
                }
            }
        }
    }

    /// Sends one request to the switch's control socket; its JSON answer (an `error` in it
    /// is returned as the error).
    fn request_to(&self, line: &str) -> Result<serde_json::Value, String> {
        let sock = self.inner.dir.join("control.sock");
        let mut s = UnixStream::connect(&sock).map_err(|e| format!("the switch: {e}"))?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
        writeln!(s, "{line}").map_err(|e| format!("the switch: {e}"))?;
        let mut answer = String::new();
        BufReader::new(s.take_limited())
            .read_line(&mut answer)
            .map_err(|e| format!("the switch did not answer: {e}"))?;
        let v: serde_json::Value = serde_json::from_str(&answer)
            .map_err(|e| format!("the switch answered '{}': {e}", answer.trim()))?;
        match v.get("error").and_then(|e| e.as_str()) {
            Some(e) => Err(format!("the switch: {e}")),
            None => Ok(v),
        }
    }

    /// Starts the switch if needed (with everything it should serve) and sends `line`; when
    /// the switch was just started with `already` in its arguments the request is not sent.
    fn apply(&self, line: &str, started_with_it: bool) -> Result<serde_json::Value, String> {
        let mut st = self.state();
        if st.running.is_none() {
            self.ensure(&mut st)?;
            if started_with_it {
                return Ok(serde_json::json!({"ok": true}));
            }
        }
        self.request_to(line)
    }

    /// Adds network `n` to the switch (starting the switch if it is the first).
    pub fn add_network(&self, n: &NetworkSpec) -> Result<(), String> {
        {
            let mut st = self.state();
            if st.closed {
                return Err("the daemon is stopping".into());
            }
            st.networks.push(n.clone());
        }
        let line = match &n.uplink {
            Some(t) => format!("net add {} uplink={t}", n.name),
            None => format!("net add {}", n.name),
        };
        match self.apply(&line, true) {
            Ok(_) => Ok(()),
            Err(e) => {
                self.state().networks.retain(|x| x.name != n.name);
                Err(e)
            }
        }
    }

    /// Deletes network `name` from the switch.
    pub fn del_network(&self, name: &str) -> Result<(), String> {
        let mut st = self.state();
        st.networks.retain(|x| x.name != name);
        st.ports.retain(|(n, _)| n != name);
        if st.running.is_none() {
            return Ok(());
        }
        self.request_to(&format!("net del {name}")).map(|_| ())
    }

    /// Adds port `port` to network `network`; its socket, bound when this returns.
    pub fn add_port(&self, network: &str, port: &str) -> Result<PathBuf, String> {
        let sock = port_socket(&self.inner.dir, network, port);
        let mut st = self.state();
        if !st.networks.iter().any(|n| n.name == network) {
            return Err(format!("no network named '{network}'"));
        }
        if st.ports.iter().any(|(n, p)| n == network && p == port) {
            // Left by a run whose end was not seen yet: the switch has it.
            if st.running.is_some() {
                return Ok(sock);
            }
        } else {
            st.ports.push((network.into(), port.into()));
        }
        if st.running.is_none() {
            // Started with the port on its command line.
            return self.ensure(&mut st).map(|()| sock);
        }
        match self.request_to(&format!("port add {network}/{port}")) {
            Ok(_) => Ok(sock),
            Err(e) if e.contains("exists already") => Ok(sock),
            Err(e) => {
                st.ports.retain(|(n, p)| !(n == network && p == port));
                Err(e)
            }
        }
    }

    /// Deletes port `port` of `network` (a VM's run ended).
    pub fn del_port(&self, network: &str, port: &str) {
        let mut st = self.state();
        let before = st.ports.len();
        st.ports.retain(|(n, p)| !(n == network && p == port));
        if st.ports.len() == before || st.running.is_none() {
            return;
        }
        if let Err(e) = self.request_to(&format!("port del {network}/{port}")) {
            eprintln!("wv host: removing switch port {network}/{port}: {e}");
        }
    }

    /// The switch's counters for every port (`[]` when it does not run).
    pub fn stats(&self) -> Result<Vec<serde_json::Value>, String> {
        if self.state().running.is_none() {
            return Ok(Vec::new());
        }
        let v = self.request_to("stats")?;
        Ok(v["ports"].as_array().cloned().unwrap_or_default())
    }

    /// The running switch, for the statistics.
    pub fn accounting(&self) -> Option<Accounting> {
        self.state()
            .running
            .as_ref()
            .map(|(pid, _)| Accounting { pid: *pid })
    }

    /// How the switch is: running (pid, starts) and how the last one ended.
    pub fn describe(&self) -> serde_json::Value {
        let st = self.state();
        serde_json::json!({
            "pid": st.running.as_ref().map(|(p, _)| *p),
            "starts": st.starts,
            "last_end": st.last,
        })
    }

    /// Ends the switch for good (the daemon is ending): no restart follows.
    pub fn close(&self) {
        let fd = {
            let mut st = self.state();
            st.closed = true;
            self.inner.changed.notify_all();
            st.running.as_ref().map(|(_, fd)| fd.clone())
        };
        if let Some(fd) = fd {
            let _ = fd.signal(libc::SIGTERM);
            if !fd.wait(Some(Duration::from_secs(5))) {
                let _ = fd.signal(libc::SIGKILL);
                fd.wait(Some(Duration::from_secs(5)));
            }
        }
        let _ = std::fs::remove_file(self.pid_file());
    }
}

/// Reads at most 1 MiB of an answer.
trait TakeLimited {
    fn take_limited(self) -> std::io::Take<UnixStream>;
}

impl TakeLimited for UnixStream {
    fn take_limited(self) -> std::io::Take<UnixStream> {
        std::io::Read::take(self, 1 << 20)
    }
}

/// The last non-empty line of `log`.
fn last_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// Whether `pid` is a `wv vswitch` serving `dir`.
fn is_our_switch(pid: u32, dir: &Path) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
    args.get(1) == Some(&&b"vswitch"[..])
        && args
            .windows(2)
            .any(|w| w[0] == b"--socket-dir" && w[1] == dir.to_string_lossy().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_socket_lengths() {
        let dir = Path::new("/var/lib/worldvisor/sw");
        let ok = |n: &str, up: Option<&str>| {
            NetworkSpec {
                name: n.into(),
                uplink: up.map(str::to_string),
            }
            .validate(dir)
        };
        assert_eq!(ok("lan", None), Ok(()));
        assert_eq!(ok("lan", Some("tap-lan")), Ok(()));
        for bad in ["", ".x", "a/b", "a b"] {
            assert!(ok(bad, None).unwrap_err().contains("invalid network name"));
        }
        assert!(ok("lan", Some("")).unwrap_err().contains("TAP name"));
        assert!(ok("lan", Some("a/b")).is_err());
        assert!(ok(&"x".repeat(64), None).unwrap_err().contains("too long"));
        assert_eq!(port_name(7, 1), "7-net1");
        assert_eq!(
            port_socket(dir, "lan", "7-net1"),
            Path::new("/var/lib/worldvisor/sw/lan/7-net1.sock")
        );
        let spec: NetworkSpec = serde_json::from_str(r#"{"name":"lan"}"#).unwrap();
        assert_eq!(spec.uplink, None);
        assert!(serde_json::from_str::<NetworkSpec>(r#"{"name":"lan","uplink":null}"#).is_err());
        assert!(serde_json::from_str::<NetworkSpec>(r#"{"name":"lan","x":1}"#).is_err());
    }
}
