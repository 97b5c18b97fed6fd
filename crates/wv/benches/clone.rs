//! Clones from one snapshot (`wv run --restore DIR --clone`): how fast they start and what
//! memory each adds. The anchor is Firecracker's "up to 5 microVMs per host core per second".
//!
//! A 256 MiB probe guest waits in `genid` (halted, polling its generation id every ms) and is
//! snapshotted; then CLONES clones of it are started one after another, each left running, and
//! for each:
//! - vcpus: from spawning `wv` to its `WV_TRACE_STARTUP` line "vcpu threads started";
//! - first output: from spawning to the guest's first line after the restore (it has seen its
//!   new generation id: `PASS genid ...`, within one 1 ms poll);
//! - CPU: the clone's CPU time (every thread, `/proc/PID/task/*/schedstat`) at its first
//!   output: what one start costs a core, so 1 / CPU is clones per core-second (threads that
//!   ended before then, the VMM's CPUID reader of ~0.3 ms, are not counted);
//! - PSS and private memory (`/proc/PID/smaps_rollup`) once all are up.
//!
//! Then the same with a guest that wrote TOUCH_MIB MiB (`probe.touch`) before the snapshot and
//! reads it all back after the restore: the sum of the clones' PSS against CLONES x its RSS.
//!
//! Run: `cargo bench -p wv --bench clone` (env `CLONES`, default 20; `TOUCH_MIB`, default 128).
//! Nothing else should be running: both CPUs are measured.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn wv() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wv"))
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn http(sock: &Path, method: &str, path: &str, body: &str) -> String {
    let mut s = UnixStream::connect(sock).expect("the VMM's API socket");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Lines of a child's output, as they arrive, stamped with when.
fn lines<R: Read + Send + 'static>(r: R) -> mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines() {
            let Ok(l) = l else { break };
            if tx.send((Instant::now(), l)).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_for(rx: &mpsc::Receiver<(Instant, String)>, prefix: &str) -> (Instant, String) {
    loop {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok((t, l)) if l.starts_with(prefix) || l.contains(prefix) => return (t, l),
            Ok(_) => {}
            Err(e) => panic!("no line with '{prefix}': {e}"),
        }
    }
}

/// Boots a 256 MiB guest waiting in `genid` (having touched `touch_mib` MiB), snapshots it
/// into `snap` and stops it.
fn make_snapshot(dir: &Path, snap: &Path, touch_mib: u64) {
    let sock = dir.join("src.sock");
    let mut src = Command::new(wv())
        .args(["run", "--memory", "256M", "--api-socket"])
        .arg(&sock)
        .args([
            "--cmdline",
            &format!(
                "console=ttyS0 probe.tests=genid,idle probe.genid=wait probe.genidms=1 probe.touch={touch_mib}"
            ),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines(src.stdout.take().unwrap());
    wait_for(&rx, "genid: id=");
    let body = format!("{{\"destination\": \"{}\"}}", snap.display());
    let r = http(&sock, "PUT", "/vm/snapshot", &body);
    assert!(r.starts_with("HTTP/1.1 200"), "snapshot: {r}");
    http(&sock, "PUT", "/vm/shutdown", "");
    src.wait().unwrap();
}

/// CPU time of every thread of `pid` so far, in ns.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// (Pss, Rss, Private_Clean + Private_Dirty) of `pid`, KiB.
fn memory_kib(pid: u32) -> (u64, u64, u64) {
    let t = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let kib = |key: &str| -> u64 {
        t.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (
        kib("Pss:"),
        kib("Rss:"),
        kib("Private_Clean:") + kib("Private_Dirty:"),
    )
}

struct Clone {
    child: Child,
    _out: mpsc::Receiver<(Instant, String)>,
    vcpus_ms: f64,
    first_ms: f64,
    cpu_ms: f64,
}

fn start_clone(snap: &Path, idle_line: bool) -> Clone {
    let t0 = Instant::now();
    let mut child = Command::new(wv())
        .args(["run", "--clone", "--restore"])
        .arg(snap)
        .env("WV_TRACE_STARTUP", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out: ChildStdout = child.stdout.take().unwrap();
    let out = lines(out);
    let err = lines(child.stderr.take().unwrap());
    let (tv, _) = wait_for(&err, "vcpu threads started");
    let (tf, first) = wait_for(&out, "");
    let cpu = cpu_ns(child.id());
    assert!(first.starts_with("PASS genid"), "first output: {first}");
    if idle_line {
        wait_for(&out, "idle:");
    }
    // Keep reading stderr so the clone never blocks on it.
    std::thread::spawn(move || for _ in err.iter() {});
    Clone {
        child,
        _out: out,
        vcpus_ms: (tv - t0).as_secs_f64() * 1e3,
        first_ms: (tf - t0).as_secs_f64() * 1e3,
        cpu_ms: cpu as f64 / 1e6,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn stop(clones: Vec<Clone>) {
    for mut c in clones {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.child.id() as i32, libc::SIGTERM) };
        let _ = c.child.wait();
    }
}

fn main() {
    let n = usize::try_from(env_or("CLONES", 20).max(1)).unwrap_or(20);
    let touch = env_or("TOUCH_MIB", 128);
    let dir = std::env::temp_dir().join(format!("wv-clone-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // 1. Start-up rate, from an idle guest's snapshot.
    let snap = dir.join("idle");
    make_snapshot(&dir, &snap, 0);
    let t = Instant::now();
    let clones: Vec<Clone> = (0..n).map(|_| start_clone(&snap, true)).collect();
    let all_ms = t.elapsed().as_secs_f64() * 1e3;
    let mem: Vec<_> = clones.iter().map(|c| memory_kib(c.child.id())).collect();
    let vcpus = median(clones.iter().map(|c| c.vcpus_ms).collect());
    let first = median(clones.iter().map(|c| c.first_ms).collect());
    let cpu = median(clones.iter().map(|c| c.cpu_ms).collect());
    let pss: u64 = mem.iter().map(|m| m.0).sum();
    let private = median(mem.iter().map(|m| m.2 as f64).collect());
    println!("clones of one 256 MiB snapshot, started one after another, all left running ({n}):");
    println!("  exec -> vcpus started      median {vcpus:8.2} ms");
    println!("  exec -> first guest output median {first:8.2} ms");
    println!(
        "  CPU time per clone start   median {cpu:8.2} ms  => {:.0} clones per core-second",
        1e3 / cpu
    );
    println!(
        "  {n} started in {all_ms:.0} ms one after another => {:.1} clones/s from one launcher",
        n as f64 * 1e3 / all_ms
    );
    println!(
        "  memory: PSS per clone {:.0} KiB (sum {pss} KiB), private {private:.0} KiB median",
        pss as f64 / n as f64
    );
    stop(clones);

    // 2. Shared memory, from a guest that wrote `touch` MiB and reads it all back.
    if touch > 0 {
        let snap = dir.join("touched");
        make_snapshot(&dir, &snap, touch);
        let k = n.min(8);
        let clones: Vec<Clone> = (0..k).map(|_| start_clone(&snap, true)).collect();
        let mem: Vec<_> = clones.iter().map(|c| memory_kib(c.child.id())).collect();
        let pss: u64 = mem.iter().map(|m| m.0).sum();
        let rss = median(mem.iter().map(|m| m.1 as f64).collect());
        let private = median(mem.iter().map(|m| m.2 as f64).collect());
        println!("{k} clones of a 256 MiB snapshot whose guest wrote {touch} MiB and read it back after the restore:");
        println!(
            "  RSS per clone {rss:.0} KiB, private {private:.0} KiB; sum of PSS {pss} KiB vs {k} x RSS {:.0} KiB ({:.0}%)",
            k as f64 * rss,
            100.0 * pss as f64 / (k as f64 * rss)
        );
        stop(clones);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
