//! The time to move 1 GiB from an idle VM to a busy one under the daemon's lending policy
//! (`wv host --host-memory-reserve`, docs/DEVICES.md "Lending"; results in
//! docs/PERFORMANCE.md). Two probe guests of 1536 MiB (`probe.tests=balloon`, a pool of
//! 1400 MiB touched at boot, a working set of 1300 MiB when busy) under one daemon whose VMs'
//! pool (`--host-memory`) is 1 GiB short of both whole, with a 64 MiB reserve. First the
//! daemon runs without the policy while the guests touch their pools (how much the two VMMs
//! hold whole), then again with it; one guest is made busy and the other lends, then the roles
//! swap `ROUNDS` times (default 2). Each swap is timed from the new busy guest being told to
//! allocate ('b' on its console, right after the other was told to go idle) until:
//! - report: the daemon's report (`wv host memory --json`) has the busy VM at all its memory;
//! - guest: the busy guest holds its whole working set ("balloon: busy=N MiB");
//! - idle at target: the idle VM has lent what the pool lacks and its balloon is where the
//!   daemon aims it;
//! - RSS fell: the idle VM's VMM holds 95 % of what it lent less than at the swap.
//!
//! Printed: a table of the swaps and, for each, the timeline (one line a second).
//!
//! Run: `cargo bench -p wv --bench lending` (env `ROUNDS`). As root, with /dev/kvm and about
//! 4 GiB of free memory; nothing else should run. A measurement, not a test: it asserts only
//! that the memory moves within `DEADLINE`.

use serde_json::Value;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const MEMORY: u64 = 1536 * MIB;
const CMDLINE: &str =
    "console=ttyS0 probe.tests=balloon probe.balloon_mib=1400 probe.balloon_busy_mib=1300";
const RESERVE: u64 = 64 * MIB;
/// What the pool lacks for both VMs whole: what moves at each swap.
const SHORT: u64 = 1024 * MIB;
const DEADLINE: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(100);

struct Daemon {
    child: Option<Child>,
    sock: PathBuf,
    state: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, extra: &[&str]) -> Daemon {
        let (sock, state) = (dir.join("wv.sock"), dir.join("state"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("daemon.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_wv"))
            .args(["host", "--socket", sock.to_str().unwrap(), "--state-dir"])
            .arg(&state)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let t = Instant::now();
        while UnixStream::connect(&sock).is_err() {
            assert!(t.elapsed() < Duration::from_secs(10), "no daemon");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon {
            child: Some(child),
            sock,
            state,
        }
    }

    fn wv(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_wv"))
            .args(args)
            .env("WV_SOCKET", &self.sock)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn ok(&self, args: &[&str]) {
        let (ok, out) = self.wv(args);
        assert!(ok, "wv {args:?}: {out}");
    }

    fn memory(&self) -> Value {
        let (ok, out) = self.wv(&["host", "memory", "--json"]);
        assert!(ok, "{out}");
        serde_json::from_str(&out).unwrap()
    }

    fn console(&self, vm: &str) -> String {
        std::fs::read_to_string(self.state.join("vms").join(vm).join("console.log"))
            .unwrap_or_default()
    }

    fn count(&self, vm: &str, prefix: &str) -> usize {
        self.console(vm)
            .lines()
            .filter(|l| l.trim_start().starts_with(prefix))
            .count()
    }

    fn wait_lines(&self, vm: &str, prefix: &str, n: usize) {
        let end = Instant::now() + DEADLINE;
        while self.count(vm, prefix) < n {
            assert!(
                Instant::now() < end,
                "{vm} never showed '{prefix}':\n{}",
                self.console(vm)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types `c` on `vm`'s console, attached until one more line starts with `marker`.
    fn command(&self, vm: &str, c: &str, marker: &str) {
        let before = self.count(vm, marker);
        let sock = self.state.join("vms").join(vm).join("console.sock");
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(c.as_bytes()).unwrap();
        self.wait_lines(vm, marker, before + 1);
        drop(s);
    }

    /// Ends the daemon; its VMMs keep running unless `vms` are stopped first.
    fn end(&mut self, vms: &[&str]) {
        for vm in vms {
            let _ = self.wv(&["vm", "stop", vm]);
        }
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling the daemon this bench started.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.end(&["a", "b"]);
    }
}

fn world<'a>(m: &'a Value, vm: &str) -> &'a Value {
    m["worlds"]
        .as_array()
        .and_then(|w| w.iter().find(|w| w["name"] == vm))
        .unwrap_or_else(|| panic!("no world {vm} in {m}"))
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

/// One reading during a swap.
struct Sample {
    t: Duration,
    busy_current: u64,
    idle_current: u64,
    idle_target: u64,
    idle_lent: u64,
    idle_rss: u64,
    guest_done: bool,
}

/// The moment of the first sample satisfying `f`.
fn first(s: &[Sample], f: impl Fn(&Sample) -> bool) -> Option<Duration> {
    s.iter().find(|x| f(x)).map(|x| x.t)
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64()))
}

fn main() {
    assert!(Path::new("/dev/kvm").exists(), "needs /dev/kvm");
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(2);
    let dir = std::env::temp_dir().join(format!("wv-bench-lending-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // Without the policy: what the two VMMs hold once their guests touched their pools.
    let mut d0 = Daemon::start(&dir, &[]);
    for vm in ["a", "b"] {
        d0.ok(&[
            "vm",
            "create",
            vm,
            "--memory",
            "1536M",
            "--cmdline",
            CMDLINE,
        ]);
        d0.ok(&["vm", "start", vm]);
    }
    let t = Instant::now();
    for vm in ["a", "b"] {
        d0.wait_lines(vm, "balloon: touched", 1);
    }
    let touched = t.elapsed();
    let m = d0.memory();
    let whole: u64 = ["a", "b"]
        .iter()
        .map(|vm| n(world(&m, vm), "rss_bytes"))
        .sum();
    d0.end(&[]);
    std::mem::forget(d0); // its VMMs run on, for the next daemon

    let pool = whole + RESERVE - SHORT;
    let pool_arg = format!("{}K", pool / 1024);
    let d = Daemon::start(
        &dir,
        &["--host-memory-reserve", "64M", "--host-memory", &pool_arg],
    );
    println!(
        "lending: 2 VMs of {} MiB, pools touched in {:.1} s, both whole {} MiB, VMs' pool {} MiB \
         (1 GiB short), reserve {} MiB",
        MEMORY / MIB,
        touched.as_secs_f64(),
        whole / MIB,
        pool / MIB,
        RESERVE / MIB
    );
    let mut rows = Vec::new();
    let mut timelines = Vec::new();
    // The first swap sets up (b busy, a lends; the pool was short for both idle too), then
    // the roles alternate.
    let mut busy_prev: Option<&str> = None;
    for round in 0..=rounds {
        let (busy, idle) = if round % 2 == 0 {
            ("b", "a")
        } else {
            ("a", "b")
        };
        if let Some(p) = busy_prev {
            d.command(p, "i", "balloon: idle");
        }
        let m = d.memory();
        let busy0 = n(world(&m, busy), "current_bytes");
        let rss0 = n(world(&m, idle), "rss_bytes");
        let done_before = d.count(busy, "balloon: busy=");
        let t0 = Instant::now();
        d.command(busy, "b", "balloon: busy");
        let mut samples = Vec::new();
        loop {
            let m = d.memory();
            let (b, i) = (world(&m, busy), world(&m, idle));
            let s = Sample {
                t: t0.elapsed(),
                busy_current: n(b, "current_bytes"),
                idle_current: n(i, "current_bytes"),
                idle_target: n(i, "target_bytes"),
                idle_lent: n(i, "lent_bytes"),
                idle_rss: n(i, "rss_bytes"),
                guest_done: d.count(busy, "balloon: busy=") > done_before,
            };
            let end = s.busy_current == MEMORY
                && s.guest_done
                && s.idle_current == s.idle_target
                && s.idle_lent + 8 * MIB >= SHORT;
            samples.push(s);
            if end {
                break;
            }
            assert!(
                t0.elapsed() < DEADLINE,
                "round {round}: the memory did not move: {m}"
            );
            std::thread::sleep(POLL);
        }
        // The idle VM's RSS settles after its balloon: a few more readings.
        let settle = Instant::now();
        while settle.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(500));
            let m = d.memory();
            let i = world(&m, idle);
            samples.push(Sample {
                t: t0.elapsed(),
                busy_current: n(world(&m, busy), "current_bytes"),
                idle_current: n(i, "current_bytes"),
                idle_target: n(i, "target_bytes"),
                idle_lent: n(i, "lent_bytes"),
                idle_rss: n(i, "rss_bytes"),
                guest_done: true,
            });
        }
        let last = samples.last().unwrap();
        let moved = last.busy_current.saturating_sub(busy0);
        let lent = last.idle_lent;
        let fell = rss0.saturating_sub(last.idle_rss);
        rows.push(format!(
            "{:>5} {:>6} {:>9} {:>9} {:>9} {:>13} {:>9} {:>10}",
            if round == 0 {
                "setup".into()
            } else {
                round.to_string()
            },
            format!("{idle}->{busy}"),
            moved / MIB,
            secs(first(&samples, |s| s.busy_current == MEMORY)),
            secs(first(&samples, |s| s.guest_done)),
            secs(first(&samples, |s| s.idle_current == s.idle_target
                && s.idle_lent + 8 * MIB >= SHORT)),
            secs(first(&samples, |s| rss0.saturating_sub(s.idle_rss) * 20
                >= lent * 19)),
            fell / MIB,
        ));
        let mut tl = format!("swap {round} ({idle} idle, {busy} busy): t, {busy} current, {idle} current/target, {idle} RSS (MiB)\n");
        let mut next = Duration::ZERO;
        for s in &samples {
            if s.t >= next {
                tl.push_str(&format!(
                    "  {:>5.1} s {:>6} {:>6}/{:<6} {:>6}\n",
                    s.t.as_secs_f64(),
                    s.busy_current / MIB,
                    s.idle_current / MIB,
                    s.idle_target / MIB,
                    s.idle_rss / MIB
                ));
                next = s.t + Duration::from_secs(1);
            }
        }
        timelines.push(tl);
        busy_prev = Some(busy);
    }
    println!(
        "{:>5} {:>6} {:>9} {:>9} {:>9} {:>13} {:>9} {:>10}",
        "swap", "dir", "moved MiB", "report", "guest", "idle@target", "RSS fell", "RSS -MiB"
    );
    for r in &rows {
        println!("{r}");
    }
    for t in &timelines {
        print!("{t}");
    }
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}
