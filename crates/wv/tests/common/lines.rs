//! A process (a `wv vswitch`, a `wv storage`, a `wv run`) whose stdout or stderr lines are
//! collected as they come, waited on with a deadline, and killed when the test ends.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long a wait for a line may take.
pub const WAIT: Duration = Duration::from_secs(120);

pub struct Proc {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Proc {
    /// Starts `c`, reading its stderr (`stderr`, stdout then discarded) or its stdout.
    pub fn spawn(mut c: Command, stderr: bool) -> Proc {
        c.stdin(Stdio::null());
        if stderr {
            c.stderr(Stdio::piped()).stdout(Stdio::null());
        } else {
            c.stdout(Stdio::piped());
        }
        let mut child = c.spawn().expect("spawn");
        let out: Box<dyn std::io::Read + Send> = if stderr {
            Box::new(child.stderr.take().unwrap())
        } else {
            Box::new(child.stdout.take().unwrap())
        };
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `text`.
    pub fn wait_line(&mut self, text: &str) -> String {
        loop {
            match self.lines.recv_timeout(WAIT) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(text) {
                        return l;
                    }
                }
                Err(_) => panic!("no line '{text}' within {WAIT:?}; saw {:#?}", self.seen),
            }
        }
    }

    /// Panics with what it printed if the process has ended (a guest that failed early).
    pub fn alive(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
                self.seen.push(l);
            }
            panic!("the guest ended early ({st}):\n{}", self.seen.join("\n"));
        }
    }

    /// The process refused or failed a request as one that ends does: waits for it to end
    /// and panics with what it printed.
    pub fn ended(&mut self, why: &str) -> ! {
        let st = self.child.wait();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        panic!("{why}; the guest ended ({st:?}):\n{}", self.seen.join("\n"));
    }

    /// Waits for the process to end; its exit status and every line it printed.
    pub fn finish(mut self) -> (Option<i32>, String) {
        while let Ok(l) = self.lines.recv_timeout(WAIT) {
            self.seen.push(l);
        }
        let st = self.child.wait().unwrap();
        (st.code(), self.seen.join("\n"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
