//! A `wv host` daemon for a test: started on a private socket and state directory, driven
//! through the CLI or raw HTTP, killed when the test ends.

use super::*;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    pub state: PathBuf,
    keep_vmms: bool,
    /// The daemon's standard error, kept in a file and shown when a test fails.
    log: PathBuf,
}

impl Daemon {
    pub fn start(dir: &TempDir) -> Daemon {
        Daemon::start_with(dir, &[])
    }

    /// A daemon with more `wv host` options.
    pub fn start_with(dir: &TempDir, extra: &[&str]) -> Daemon {
        let (socket, state) = (dir.path("wv.sock"), dir.path("state"));
        let log = dir.path("daemon.log");
        let err = std::fs::File::create(&log).unwrap();
        let child = Command::new(wv_bin())
            .args([
                "host",
                "--socket",
                socket.to_str().unwrap(),
                "--state-dir",
                state.to_str().unwrap(),
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        let t = Instant::now();
        while UnixStream::connect(&socket).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the daemon did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon {
            child,
            socket,
            state,
            keep_vmms: false,
            log,
        }
    }

    /// The daemon's process id.
    #[allow(dead_code)] // not every test binary looks at the process
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn wv(&self, args: &[&str]) -> Run {
        let mut c = Command::new(wv_bin());
        c.args(args).env("WV_SOCKET", &self.socket);
        run_cmd(c, Duration::from_secs(60))
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let r = self.wv(&a);
        assert_eq!(r.status, Some(0), "{r}");
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r}"))
    }

    pub fn wait_state(&self, name: &str, state: &str) -> serde_json::Value {
        self.wait_state_within(name, state, Duration::from_secs(30))
    }

    /// [`Daemon::wait_state`] for at most `limit`.
    pub fn wait_state_within(&self, name: &str, state: &str, limit: Duration) -> serde_json::Value {
        let t = Instant::now();
        loop {
            let v = self.json(&["vm", "info", name]);
            if v["state"] == state {
                return v;
            }
            assert!(t.elapsed() < limit, "{name} never became {state}: {v}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// System world `name` (`switch`, `storage`) in `GET /v1/stats`, while it runs; its id is
    /// checked to be `id`.
    pub fn system_world(&self, name: &str, id: u64) -> Option<serde_json::Value> {
        let (s, body) = self.raw(b"GET /v1/stats HTTP/1.1\r\n\r\n");
        assert_eq!(s, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let w = v
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name)?
            .clone();
        assert_eq!(w["id"], id, "{w}");
        Some(w)
    }

    /// A raw HTTP exchange: (status, body).
    pub fn raw(&self, request: &[u8]) -> (u16, String) {
        let (status, out) = super::vmm::raw(&self.socket, request);
        (
            status,
            out.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
        )
    }

    /// Stops the daemon and the VMMs it left running.
    pub fn stop(mut self) {
        // SAFETY: signalling the daemon we started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }

    /// Stops the daemon only: its VMMs keep running, for a new daemon to re-adopt.
    pub fn stop_keeping_vmms(mut self) {
        self.keep_vmms = true;
        // SAFETY: signalling the daemon we started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A failed test must not leave a daemon behind (stop() already reaped it otherwise),
        // nor its VMMs, which outlive a daemon by design.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // What the daemon said is the first clue to a failure seen once in CI.
            let log = std::fs::read(&self.log).unwrap_or_default();
            let tail = &log[log.len().saturating_sub(8192)..];
            eprintln!(
                "--- the daemon's stderr (last {} bytes) ---\n{}\n---",
                tail.len(),
                String::from_utf8_lossy(tail)
            );
        }
        // Its switch and storage worlds (processes of their own session, like the VMMs).
        for (pid_file, command) in [("sw/pid", &b"vswitch"[..]), ("st/pid", &b"storage"[..])] {
            let Some(pid) = std::fs::read_to_string(self.state.join(pid_file))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            else {
                continue;
            };
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmd.split(|&b| b == 0).nth(1) == Some(command) {
                // SAFETY: signalling a world this test's daemon recorded as its own.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if self.keep_vmms {
            return;
        }
        let worlds = std::fs::read_to_string(self.state.join("worlds.json")).unwrap_or_default();
        let doc: serde_json::Value = serde_json::from_str(&worlds).unwrap_or_default();
        for w in doc["worlds"].as_array().into_iter().flatten() {
            if let Some(pid) = w["pid"].as_i64().and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: signalling a VMM this test's daemon recorded as its own.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}
