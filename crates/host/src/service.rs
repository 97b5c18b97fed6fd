//! A supervised system world: one `wv` process (the switch, the storage service) that the
//! daemon runs beside the VM worlds, in its own cgroup, with its sockets and log in a folder
//! of the state directory (mode 0700) and its pid in a pid file there. What it should serve is
//! kept here ([`Wants`]) and given on its command line at each start; the daemon changes it
//! at run time over the process's control socket (one request per line, one JSON answer).
//! When the process dies it is started again, after a back-off that grows while it keeps dying
//! young; one a previous daemon left running is ended when the daemon starts.

use crate::supervisor::{last_line, Pidfd};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Back-off before restarting a process that died: doubling from the first to the last while
/// it keeps dying within [`YOUNG`] of its start.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
const YOUNG: Duration = Duration::from_secs(10);
/// Time a started process has to answer on its control socket.
const READY: Duration = Duration::from_secs(20);

/// What a supervised process should serve: given whole on its command line at each start.
pub trait Wants: Default + Send + 'static {
    /// The kind of process that serves it.
    const KIND: Kind;
    /// The arguments after `--socket-dir DIR` that make a new process serve all of it (or
    /// what of it [`Wants::replay`] does not add).
    fn args(&self) -> Vec<String>;
    /// Control requests sent to a new process once it answers, each on its own: one that is
    /// refused costs only what it asked for (the rest is served), and is logged.
    fn replay(&self) -> Vec<String> {
        Vec::new()
    }
    /// Whether there is anything to serve: a process that died is started again only then.
    fn any(&self) -> bool;
}

/// What kind of process a [`Service`] runs.
pub struct Kind {
    /// The world's name (`switch`, `storage`): in messages, statistics and its thread's name.
    pub name: &'static str,
    /// Its folder in the daemon's state directory.
    pub folder: &'static str,
    /// The `wv` subcommand that runs it (`vswitch`, `storage`).
    pub command: &'static str,
    /// Arguments given at every start, after `--socket-dir DIR`.
    pub fixed_args: &'static [&'static str],
}

/// What the supervisor knows and wants.
pub struct State<W> {
    /// What the process should serve.
    pub want: W,
    /// The running process: its pid and pidfd.
    running: Option<(u32, Arc<Pidfd>)>,
    /// How many processes were started.
    starts: u64,
    /// The last back-off waited.
    backoff: Duration,
    /// Why the last start failed, or how the last process ended.
    last: Option<String>,
    /// Set once the daemon is ending: no process starts any more.
    closed: bool,
}

impl<W> State<W> {
    /// Whether the process runs.
    pub fn running(&self) -> bool {
        self.running.is_some()
    }

    /// Whether the daemon is ending.
    pub fn closed(&self) -> bool {
        self.closed
    }
}

/// A supervised system world (a handle: clones share it).
pub struct Service<W> {
    inner: Arc<Inner<W>>,
}

impl<W> Clone for Service<W> {
    fn clone(&self) -> Self {
        Service {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<W> {
    kind: Kind,
    wv: PathBuf,
    dir: PathBuf,
    /// Places a started process in its cgroup.
    place: Box<dyn Fn(u32) -> Result<(), String> + Send + Sync>,
    /// Run (on a thread of its own) with the pid of each process started, once it serves.
    restarted: std::sync::OnceLock<Arc<dyn Fn(u32) + Send + Sync>>,
    state: Mutex<State<W>>,
    changed: Condvar,
}

/// What `GET /v1/stats` shows of a system world.
pub struct Accounting {
    /// Its process.
    pub pid: u32,
}

impl<W: Wants> Service<W> {
    /// A supervisor of the process serving `W` ([`Wants::KIND`]), run by `wv` in
    /// `state_dir/FOLDER` (made with mode 0700); `place` puts a started process into its
    /// cgroup. One a previous daemon left running is ended: the one started here takes its
    /// sockets (and, for the storage service, its disks).
    pub fn new(
        wv: PathBuf,
        state_dir: &Path,
        place: Box<dyn Fn(u32) -> Result<(), String> + Send + Sync>,
    ) -> std::io::Result<Service<W>> {
        use std::os::unix::fs::PermissionsExt;
        let kind = W::KIND;
        let dir = state_dir.join(kind.folder);
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let s = Service {
            inner: Arc::new(Inner {
                kind,
                wv,
                dir,
                place,
                restarted: std::sync::OnceLock::new(),
                state: Mutex::new(State {
                    want: W::default(),
                    running: None,
                    starts: 0,
                    backoff: Duration::ZERO,
                    last: None,
                    closed: false,
                }),
                changed: Condvar::new(),
            }),
        };
        s.end_left_over();
        Ok(s)
    }

    /// Sets what runs, with the new process's pid, each time a process serves everything
    /// (the daemon hands jailed VMMs that were connected to an earlier process connections
    /// to the new sockets); once.
    pub fn on_restart(&self, f: Arc<dyn Fn(u32) + Send + Sync>) {
        let _ = self.inner.restarted.set(f);
    }

    /// The supervisor's state, locked: what is wanted is changed under it, and requests that
    /// must not interleave with a restart are sent while it is held.
    pub fn state(&self) -> MutexGuard<'_, State<W>> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The process's folder.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn name(&self) -> &'static str {
        self.inner.kind.name
    }

    fn pid_file(&self) -> PathBuf {
        self.inner.dir.join("pid")
    }

    fn log(&self) -> PathBuf {
        self.inner
            .dir
            .join(format!("{}.log", self.inner.kind.command))
    }

    /// Ends a process of this folder that a previous daemon left (its pid file names it; it
    /// is checked to be a `wv COMMAND` of this folder after its pidfd is opened).
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
        if is_ours(pid, self.inner.kind.command, &self.inner.dir) {
            eprintln!(
                "wv host: ending the {} (pid {pid}) a previous daemon left",
                self.name()
            );
            let _ = fd.signal(libc::SIGKILL);
            fd.wait(Some(Duration::from_secs(10)));
        }
        let _ = std::fs::remove_file(self.pid_file());
    }

    /// Sets what the process serves at the daemon's start and starts it if there is anything.
    pub fn restore_wanted(&self, want: W) {
        let mut st = self.state();
        st.want = want;
        if st.want.any() {
            if let Err(e) = self.start(&mut st) {
                eprintln!("wv host: the {}: {e}", self.name());
            }
        }
    }

    /// Starts the process unless it runs (with everything `st` wants); an error says why it
    /// cannot.
    pub fn ensure(&self, st: &mut MutexGuard<'_, State<W>>) -> Result<(), String> {
        if st.running.is_some() {
            return Ok(());
        }
        self.start(st)
    }

    /// Starts a process with everything `st` wants on its command line and waits until it
    /// answers on its control socket; a thread waits for its end and starts it again.
    fn start(&self, st: &mut MutexGuard<'_, State<W>>) -> Result<(), String> {
        if st.closed {
            return Err("the daemon is stopping".into());
        }
        let i = &*self.inner;
        let name = i.kind.name;
        let mut args: Vec<String> = vec![
            i.kind.command.into(),
            "--socket-dir".into(),
            i.dir.display().to_string(),
        ];
        args.extend(i.kind.fixed_args.iter().map(|a| a.to_string()));
        args.extend(st.want.args());
        let log = self.log();
        let mut child = crate::supervisor::spawn(&i.wv, &args, &log)
            .map_err(|e| format!("starting {}: {e}", i.wv.display()))?;
        let pid = child.id();
        // Not waited for yet: the pidfd names this child for good.
        let fd = match Pidfd::open(pid) {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("opening a pidfd for the {name}: {e}"));
            }
        };
        if let Err(e) = (i.place)(pid) {
            eprintln!("wv host: the {name} (pid {pid}): {e}");
        }
        let _ = std::fs::write(self.pid_file(), pid.to_string());
        st.starts += 1;
        st.running = Some((pid, fd.clone()));
        let started = Instant::now();
        let me = self.clone();
        let waiter = crate::helper::spawn(name, move || {
            let status = child.wait().ok();
            me.ended(pid, status, started);
        });
        if let Err(e) = waiter {
            let _ = fd.signal(libc::SIGKILL);
            st.running = None;
            return Err(format!("no thread to wait for the {name}: {e}"));
        }
        // Ready once it answers: it binds every socket before it serves requests.
        let deadline = Instant::now() + READY;
        loop {
            if self.request("stats").is_ok() {
                for line in st.want.replay() {
                    if let Err(e) = self.request(&line) {
                        eprintln!("wv host: {line}: {e}");
                        st.last = Some(e);
                    }
                }
                if let Some(f) = i.restarted.get().cloned() {
                    if let Err(e) = crate::helper::spawn("restarted", move || f(pid)) {
                        eprintln!("wv host: the {name} started, nothing to tell the VMMs: {e}");
                    }
                }
                return Ok(());
            }
            if fd.wait(Some(Duration::from_millis(20))) {
                let tail = last_line(&log);
                return Err(format!("the {name} ended at its start: {tail}"));
            }
            if Instant::now() > deadline {
                let _ = fd.signal(libc::SIGKILL);
                return Err(format!(
                    "the {name} did not answer within {READY:?}: {}",
                    last_line(&log)
                ));
            }
        }
    }

    /// Process `pid` ended: it is started again after a back-off, unless the daemon is ending
    /// or nothing is left to serve.
    fn ended(&self, pid: u32, status: Option<std::process::ExitStatus>, started: Instant) {
        let name = self.name();
        let mut st = self.state();
        if !matches!(st.running, Some((p, _)) if p == pid) {
            return;
        }
        st.running = None;
        let why = format!(
            "the {name} (pid {pid}) ended ({}) after {:.1} s",
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
            if st.closed || st.running.is_some() || !st.want.any() {
                return;
            }
            match self.start(&mut st) {
                Ok(()) => {
                    eprintln!("wv host: the {name} runs again");
                    return;
                }
                Err(e) => {
                    eprintln!("wv host: restarting the {name}: {e}");
                    st.last = Some(e);
                    st.backoff = (st.backoff * 2).min(BACKOFF.1);
                }
            }
        }
    }

    /// Sends one request to the process's control socket; its JSON answer (an `error` in it
    /// is returned as the error).
    pub fn request(&self, line: &str) -> Result<serde_json::Value, String> {
        let v = self.answer(line)?;
        match v.get("error").and_then(|e| e.as_str()) {
            Some(e) => Err(format!("the {}: {e}", self.name())),
            None => Ok(v),
        }
    }

    /// Sends one request to the process's control socket; its JSON answer as it is (an
    /// `error` in it included). An error here is that no answer came.
    pub fn answer(&self, line: &str) -> Result<serde_json::Value, String> {
        let name = self.name();
        let sock = self.inner.dir.join("control.sock");
        let mut s = UnixStream::connect(&sock).map_err(|e| format!("the {name}: {e}"))?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
        writeln!(s, "{line}").map_err(|e| format!("the {name}: {e}"))?;
        let mut answer = String::new();
        BufReader::new(std::io::Read::take(s, 1 << 20))
            .read_line(&mut answer)
            .map_err(|e| format!("the {name} did not answer: {e}"))?;
        serde_json::from_str(&answer)
            .map_err(|e| format!("the {name} answered '{}': {e}", answer.trim()))
    }

    /// The array `field` of the process's `stats` answer (`[]` when it does not run).
    pub fn stats(&self, field: &str) -> Result<Vec<serde_json::Value>, String> {
        if !self.state().running() {
            return Ok(Vec::new());
        }
        let v = self.request("stats")?;
        Ok(v[field].as_array().cloned().unwrap_or_default())
    }

    /// The running process, for the statistics.
    pub fn accounting(&self) -> Option<Accounting> {
        self.state()
            .running
            .as_ref()
            .map(|(pid, _)| Accounting { pid: *pid })
    }

    /// How the process is: running (pid, starts) and how the last one ended.
    pub fn describe(&self) -> serde_json::Value {
        let st = self.state();
        serde_json::json!({
            "pid": st.running.as_ref().map(|(p, _)| *p),
            "starts": st.starts,
            "last_end": st.last,
        })
    }

    /// Ends the process for good (the daemon is ending): no restart follows.
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

/// Whether `pid` is a `wv COMMAND` serving `dir`.
fn is_ours(pid: u32, command: &str, dir: &Path) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
    args.get(1) == Some(&command.as_bytes())
        && args
            .windows(2)
            .any(|w| w[0] == b"--socket-dir" && w[1] == dir.to_string_lossy().as_bytes())
}
