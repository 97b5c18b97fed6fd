//! A VMM under test: a `wv run` (or any command that ends in one) whose serial output arrives
//! line by line, waited on with a deadline, typed into, and killed when the test ends however
//! it ends; and requests on its control socket (`--api-socket`). Standalone (the benches
//! include it by path too).

use std::io::{BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// How long a wait for a serial line may take unless the test says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A VMM to start: its command and how its standard streams are wired.
pub struct Spawn {
    cmd: Command,
    stdin: bool,
    stderr: bool,
    timeout: Duration,
}

impl Spawn {
    /// Keeps a pipe to the VMM's stdin (its serial console's input) for [`Vmm::type_in`];
    /// without it, stdin is /dev/null.
    pub fn stdin(mut self) -> Spawn {
        self.stdin = true;
        self
    }

    /// Reads stderr line by line too ([`Vmm::next_err_line`], [`Vmm::finish`]); without it,
    /// stderr is whatever the command says (inherited unless set on it).
    pub fn stderr(mut self) -> Spawn {
        self.stderr = true;
        self
    }

    /// How long each wait for a serial line may take (default [`DEFAULT_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Spawn {
        self.timeout = timeout;
        self
    }

    pub fn spawn(mut self) -> Vmm {
        self.cmd
            .stdin(if self.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped());
        if self.stderr {
            self.cmd.stderr(Stdio::piped());
        }
        let mut child = self
            .cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {:?}: {e}", self.cmd));
        let stdin = child.stdin.take();
        let out = lines(child.stdout.take().expect("stdout is piped"));
        let err = if self.stderr {
            child.stderr.take().map(lines)
        } else {
            None
        };
        Vmm {
            child,
            stdin,
            out,
            err,
            seen: Vec::new(),
            timeout: self.timeout,
        }
    }
}

/// The lines of `r`, read on a thread of their own (so the child never blocks on a full pipe).
fn lines(r: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(r).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// How a VMM ended, with everything it printed.
pub struct Exit {
    /// The exit status; `None` when a signal ended it.
    pub status: Option<i32>,
    /// Every serial (stdout) line, those already waited for included.
    pub stdout: Vec<String>,
    /// The stderr lines not taken by [`Vmm::next_err_line`] (empty unless [`Spawn::stderr`]).
    pub stderr: Vec<String>,
}

impl Exit {
    /// The exit status, -1 for a signal.
    pub fn code(&self) -> i32 {
        self.status.unwrap_or(-1)
    }
}

/// A running VMM, killed (and reaped) when dropped.
pub struct Vmm {
    pub child: Child,
    stdin: Option<ChildStdin>,
    out: Receiver<String>,
    err: Option<Receiver<String>>,
    seen: Vec<String>,
    timeout: Duration,
}

impl Vmm {
    /// `wv run ARGS`, to be spawned.
    pub fn run(args: &[&str]) -> Spawn {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wv"));
        cmd.arg("run").args(args);
        Vmm::command(cmd)
    }

    /// `cmd` (a `wv run` command line, perhaps wrapped), to be spawned.
    pub fn command(cmd: Command) -> Spawn {
        Spawn {
            cmd,
            stdin: false,
            stderr: false,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// `wv run ARGS` with stdin /dev/null and stderr inherited.
    pub fn start(args: &[&str]) -> Vmm {
        Vmm::run(args).spawn()
    }

    /// Waits for a serial line that starts with `prefix` and returns it.
    pub fn wait_line(&mut self, prefix: &str) -> String {
        self.wait_until(&format!("starting with '{prefix}'"), |l| {
            l.starts_with(prefix)
        })
    }

    /// Waits for a serial line that contains `text` and returns it.
    pub fn wait_for(&mut self, text: &str) -> String {
        self.wait_until(&format!("containing '{text}'"), |l| l.contains(text))
    }

    fn wait_until(&mut self, what: &str, found: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + self.timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if found(&l) {
                        return l;
                    }
                }
                Err(e) => panic!(
                    "no serial line {what} within {:?} ({e}); saw {:#?}",
                    self.timeout, self.seen
                ),
            }
        }
    }

    /// The next stderr line, or `None` if none came within `timeout` (or stderr ended).
    /// Needs [`Spawn::stderr`].
    pub fn next_err_line(&mut self, timeout: Duration) -> Option<String> {
        let err = self
            .err
            .as_ref()
            .expect("the VMM's stderr is read only when spawned with Spawn::stderr");
        err.recv_timeout(timeout).ok()
    }

    /// Types `s` on the serial console. Needs [`Spawn::stdin`].
    pub fn type_in(&mut self, s: &str) {
        let stdin = self
            .stdin
            .as_mut()
            .expect("the VMM's stdin is a pipe only when spawned with Spawn::stdin");
        stdin.write_all(s.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the VMM to end: its exit status, -1 for a signal.
    pub fn wait(mut self) -> i32 {
        self.child.wait().unwrap().code().unwrap_or(-1)
    }

    /// Waits for the VMM to end and for its output to close: its status and every line.
    pub fn finish(mut self) -> Exit {
        let status = self.child.wait().unwrap().code();
        let mut stdout = std::mem::take(&mut self.seen);
        stdout.extend(self.out.iter());
        let stderr = self
            .err
            .take()
            .map_or_else(Vec::new, |e| e.iter().collect());
        Exit {
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One raw HTTP exchange on a control socket: (status, the whole answer, headers and body).
/// The status is 0 when the answer is not HTTP.
pub fn raw(sock: &Path, request: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(sock)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", sock.display()));
    s.write_all(request).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

/// `METHOD PATH` on a control socket, with `body` as JSON if given: (status, JSON body, or
/// Null when there is none or it does not parse).
pub fn call(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    let req = match body {
        None => format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n"),
        Some(b) => {
            let b = b.to_string();
            format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            )
        }
    };
    let (st, out) = raw(sock, req.as_bytes());
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
    (
        st,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

/// Waits until a just-started VMM's control socket accepts connections, panicking after
/// `timeout`.
pub fn wait_for_socket(sock: &Path, timeout: Duration) {
    let end = Instant::now() + timeout;
    loop {
        match UnixStream::connect(sock) {
            Ok(_) => return,
            Err(e) if Instant::now() > end => {
                panic!("{} not there within {timeout:?}: {e}", sock.display())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
