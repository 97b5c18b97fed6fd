//! Helpers for the integration tests: run `wv` (or QEMU) with a timeout, capture everything,
//! and make temporary files. Tests that need /dev/kvm are `#[ignore]`d, so that where it is
//! missing they show as ignored, never as passed; `cargo test -- --include-ignored` (which
//! scripts/test uses when /dev/kvm is there) runs them, and each fails loudly without KVM.
#![allow(dead_code)]

pub mod daemon;
pub mod lines;
pub mod openapi;
pub mod vmm;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.status.expect("process was killed by a signal")
    }
    /// The PASS/FAIL/SKIP line of `test`.
    pub fn result_of(&self, test: &str) -> Option<&str> {
        self.stdout.lines().find(|l| {
            l.strip_prefix("PASS ")
                .or_else(|| l.strip_prefix("FAIL "))
                .or_else(|| l.strip_prefix("SKIP "))
                .is_some_and(|r| r.split(' ').next() == Some(test))
        })
    }
    pub fn assert_pass(&self, test: &str) -> &str {
        let l = self
            .result_of(test)
            .unwrap_or_else(|| panic!("no result line for {test}\n{self}"));
        assert!(l.starts_with("PASS "), "{test} did not pass: {l}\n{self}");
        l
    }
    /// The `--stats=json` document from stderr.
    pub fn stats(&self) -> serde_json::Value {
        let line = self
            .stderr
            .lines()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("no stats JSON\n{self}"));
        serde_json::from_str(line).expect("stats JSON parses")
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--- status {:?}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Count of `cause` in a stats document.
pub fn cause_count(stats: &serde_json::Value, cause: &str) -> u64 {
    stats["causes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cause"] == cause)
        .map_or(0, |c| c["count"].as_u64().unwrap())
}

/// (notifications, interrupts) of device `name` in a stats document.
pub fn device_activity(stats: &serde_json::Value, name: &str) -> (u64, u64) {
    let d = stats["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no device {name}"));
    (
        d["notifications"].as_u64().unwrap(),
        d["interrupts"].as_u64().unwrap(),
    )
}

/// The `wv` binary under test: this build's, or the one `WV_BIN` names (a release build, to
/// measure it under the same tests: `WV_BIN=target/release/wv cargo test ...`).
pub fn wv_bin() -> PathBuf {
    std::env::var_os("WV_BIN")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_wv")), PathBuf::from)
}

/// Runs a command with a timeout (the test fails if it is exceeded: nothing may hang).
pub fn run_cmd(mut cmd: Command, timeout: Duration) -> Run {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {timeout:?}: stdout so far {:?}",
                t_out.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Run {
        status: status.code(),
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

pub fn wv(args: &[&str]) -> Run {
    let mut c = Command::new(wv_bin());
    c.args(args);
    run_cmd(c, Duration::from_secs(120))
}

/// Fails the test (a clear message) when /dev/kvm is missing: every test that calls this is
/// `#[ignore]`d and runs only when asked to with `--include-ignored`.
pub fn need_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "this test needs /dev/kvm: without it, run the tests without --include-ignored \
         (scripts/test does when WV_TESTS_WITHOUT_KVM=1) and the KVM tests show as ignored"
    );
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("wv-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn file(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, data).unwrap();
        p
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes an embedded image (`pvh`, `bzimage`, `exitbench`) to `dir`.
pub fn image(dir: &TempDir, format: &str) -> PathBuf {
    let p = dir.path(format);
    let r = wv(&[
        "probe-image",
        "--format",
        format,
        "--output",
        p.to_str().unwrap(),
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    p
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// Spawns `cmd` with its stdout piped and returns once a line of it contains `marker` (the
/// readiness marker of whatever the test waits for), panicking after `timeout`. The rest of
/// stdout is drained on a thread so that the child never blocks on a full pipe.
pub fn spawn_until(mut cmd: Command, marker: &str, timeout: Duration) -> std::process::Child {
    use std::io::BufRead;
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let marker = marker.to_string();
    std::thread::spawn(move || {
        let mut seen = false;
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if !seen && line.contains(&marker) {
                seen = true;
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(timeout).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{cmd:?} never printed its readiness marker within {timeout:?}");
    }
    child
}

/// A raw disk image of `len` bytes with the probe's disk magic (`WVDISK01`) in sector 0.
pub fn disk_image(dir: &TempDir, name: &str, len: usize) -> PathBuf {
    let mut d = vec![0u8; len];
    d[..8].copy_from_slice(b"WVDISK01");
    dir.file(name, &d)
}

/// A VMKFS datastore `ds.img` in `dir` (64 MiB, 64 KiB blocks) holding disk `root` (1 MiB,
/// the probe's magic in sector 0); its path.
pub fn datastore(dir: &TempDir) -> String {
    let ds = dir.path("ds.img").to_str().unwrap().to_string();
    let r = wv(&["fs", "mkfs", &ds, "--size", "64M", "--block-size", "64K"]);
    assert_eq!(r.status, Some(0), "{r}");
    let src = disk_image(dir, "root.raw", 1 << 20);
    let r = wv(&["fs", "import", &ds, "root", src.to_str().unwrap()]);
    assert_eq!(r.status, Some(0), "{r}");
    ds
}

/// The persist test's `PASS persist` line in `out` and the acknowledged disk records it
/// counted (`disk_writes=N`, with `probe.persist_disk=1`).
pub fn persist_pass(out: &str) -> (&str, u64) {
    let line = out
        .lines()
        .find(|l| l.starts_with("PASS persist"))
        .unwrap_or_else(|| panic!("no PASS persist in:\n{out}"));
    let writes = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("disk_writes="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    (line, writes)
}
