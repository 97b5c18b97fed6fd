//! Starts a cluster of `wv-dsm-node` processes over loopback and talks to them line by line
//! (shared by the tests and the benchmark).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

struct Kid {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
}

/// N node processes, joined.
pub struct Cluster {
    kids: Vec<Kid>,
    _watchdog: mpsc::Sender<()>,
}

impl Cluster {
    /// Starts `n` nodes over a region of `bytes`, with `extra` options for every node; every
    /// node process is killed if the cluster is still running after `limit`.
    pub fn start(n: u32, bytes: usize, extra: &[&str], limit: Duration) -> Cluster {
        Cluster::start_placed(n, bytes, extra, limit, |_| None)
    }

    /// As [`Cluster::start`], with node `id` run inside network namespace `ns` and listening
    /// on `addr` where `place(id)` is `Some((ns, addr))` (through `ip netns exec`).
    pub fn start_placed(
        n: u32,
        bytes: usize,
        extra: &[&str],
        limit: Duration,
        place: impl Fn(u32) -> Option<(String, String)>,
    ) -> Cluster {
        let mut kids: Vec<Kid> = (0..n)
            .map(|id| {
                let bin = env!("CARGO_BIN_EXE_wv-dsm-node");
                let mut cmd = match place(id) {
                    Some((ns, addr)) => {
                        let mut c = Command::new("ip");
                        c.args(["netns", "exec", &ns, bin, "--listen", &addr]);
                        c
                    }
                    None => Command::new(bin),
                };
                let mut child = cmd
                    .args([
                        "--id",
                        &id.to_string(),
                        "--nodes",
                        &n.to_string(),
                        "--bytes",
                        &bytes.to_string(),
                    ])
                    .args(extra)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("spawning wv-dsm-node");
                let stdin = child.stdin.take().unwrap();
                let out = BufReader::new(child.stdout.take().unwrap());
                Kid { child, stdin, out }
            })
            .collect();
        let pids: Vec<i32> = kids.iter().map(|k| k.child.id() as i32).collect();
        let (tx, rx) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!("cluster still running after {limit:?}: killing its nodes");
                for p in pids {
                    // SAFETY: kill on the ids of processes this cluster started.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
        });
        let mut c = Cluster {
            kids: Vec::new(),
            _watchdog: tx,
        };
        let addrs: Vec<String> = kids
            .iter_mut()
            .map(|k| {
                let l = line(k, 0);
                l.strip_prefix("addr ")
                    .unwrap_or_else(|| panic!("expected addr, got {l:?}"))
                    .to_string()
            })
            .collect();
        for k in &mut kids {
            writeln!(k.stdin, "peers {}", addrs.join(" ")).unwrap();
        }
        for (i, k) in kids.iter_mut().enumerate() {
            assert_eq!(line(k, i), "ready");
        }
        c.kids = kids;
        c
    }

    /// Sends `cmd` to node `i` without waiting.
    pub fn send(&mut self, i: usize, cmd: &str) {
        writeln!(self.kids[i].stdin, "{cmd}").unwrap();
    }

    /// The next answer of node `i`.
    pub fn recv(&mut self, i: usize) -> String {
        line(&mut self.kids[i], i)
    }

    /// Runs `cmd` on node `i` and returns its answer.
    pub fn cmd(&mut self, i: usize, cmd: &str) -> String {
        self.send(i, cmd);
        self.recv(i)
    }

    /// Runs `cmd(i)` on every node at once and returns the answers.
    pub fn all(&mut self, cmd: impl Fn(usize) -> String) -> Vec<String> {
        for i in 0..self.kids.len() {
            let c = cmd(i);
            self.send(i, &c);
        }
        (0..self.kids.len()).map(|i| self.recv(i)).collect()
    }

    /// Node `i`'s counters as name/value pairs.
    pub fn stats(&mut self, i: usize) -> Vec<(String, u64)> {
        let s = self.cmd(i, "stats");
        s.strip_prefix("stats ")
            .unwrap_or_else(|| panic!("bad stats {s:?}"))
            .split_whitespace()
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.parse().unwrap())
            })
            .collect()
    }

    /// One counter of node `i`.
    pub fn stat(&mut self, i: usize, name: &str) -> u64 {
        self.stats(i)
            .into_iter()
            .find(|(k, _)| k == name)
            .unwrap_or_else(|| panic!("no counter {name}"))
            .1
    }

    /// Sends signal `sig` to node `i`'s process (to kill or stop a node).
    pub fn signal(&mut self, i: usize, sig: i32) {
        let pid = i32::try_from(self.kids[i].child.id()).unwrap();
        // SAFETY: kill on the id of a process this cluster started and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.kids.len()
    }
}

fn line(k: &mut Kid, i: usize) -> String {
    let mut s = String::new();
    match k.out.read_line(&mut s) {
        Ok(0) | Err(_) => panic!("node {i} exited (status {:?})", k.child.wait()),
        Ok(_) => s.trim_end().to_string(),
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for k in &mut self.kids {
            // A node a test stopped must run again to exit.
            if let Ok(pid) = i32::try_from(k.child.id()) {
                // SAFETY: kill on the id of a process this cluster started.
                unsafe { libc::kill(pid, libc::SIGCONT) };
            }
            let _ = writeln!(k.stdin, "exit");
        }
        for k in &mut self.kids {
            let _ = k.child.wait();
        }
    }
}
