//! The proportional-share scheduler against plain cgroup weights, in one run.
//!
//! Worlds: three probe guests running `burn` (a CPL3 spin loop, native speed under PVM) under a
//! private `wv host`. Their progress is the CPU time the host gives their VMM threads, read by
//! the daemon from schedstat (`GET /v1/stats`). Phases, each 10 s after 2 s of settling:
//! 1. shares 1:2:4 (one vCPU each, two CPUs: entitled 1/3, 2/3 and 1 CPU);
//! 2. world `a` gets a 0.9-CPU reservation and the least shares (entitled 0.9, then b and c
//!    split the remaining 1.1 CPUs 1:2);
//! 3. world `c` is also limited to 0.3 CPU (entitled 0.9, 0.8, 0.3).
//!
//! Baseline: three plain spinning processes in cgroup v1 `cpu` groups with weights 1:2:4
//! (cpu.shares 1024/2048/4096), measured the same way.
//!
//! The worlds run twice, under `wv host --placement auto` (the daemon pins vCPU threads by
//! their entitlements) and `--placement off` (the kernel places them), then the baseline.
//!
//! For each world: achieved CPUs over the 10 s window, the worst 1 s window, and errors
//! relative to the entitlement. Needs root (cgroups). Run: `cargo bench -p wv --bench sched`.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn get(socket: &Path, path: &str) -> serde_json::Value {
    use std::io::{Read, Write};
    let mut s = UnixStream::connect(socket).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap()).unwrap()
}

fn wv(socket: &Path, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_wv"))
        .args(args)
        .env("WV_SOCKET", socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "wv {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// CPU time (ns) per name, sampled once.
type Sample = Vec<(String, u64)>;
/// CPUs used per name over one window.
type Rates = Vec<(String, f64)>;

/// Samples `probe` every second for `secs` seconds; returns (per-second CPU use, whole window).
fn windows(probe: &dyn Fn() -> Sample, secs: u32) -> (Vec<Rates>, Rates) {
    let rate = |a: &Sample, b: &Sample, dt: f64| -> Rates {
        b.iter()
            .map(|(n, ns)| {
                let before = a.iter().find(|(m, _)| m == n).map_or(0, |x| x.1);
                (n.clone(), ns.saturating_sub(before) as f64 / dt)
            })
            .collect()
    };
    let t0 = Instant::now();
    let first = probe();
    let (mut prev, mut tp) = (first.clone(), t0);
    let mut per_sec = Vec::new();
    for i in 1..=secs {
        let target = t0 + Duration::from_secs(u64::from(i));
        std::thread::sleep(target.saturating_duration_since(Instant::now()));
        let now = Instant::now();
        let s = probe();
        per_sec.push(rate(&prev, &s, now.duration_since(tp).as_nanos() as f64));
        prev = s;
        tp = now;
    }
    let total = rate(&first, &prev, tp.duration_since(t0).as_nanos() as f64);
    (per_sec, total)
}

fn report(
    title: &str,
    want: &[(&str, f64)],
    kind: &str,
    per_sec: &[Vec<(String, f64)>],
    total: &[(String, f64)],
) {
    println!("\n{title}");
    println!(
        "{:<12} {:>9} {:>9} {:>10} {:>14} {:>14}",
        "world", "entitled", "10s CPUs", "10s error", "worst 1s CPUs", "worst 1s error"
    );
    for (name, ent) in want {
        let got = |v: &[(String, f64)]| v.iter().find(|(n, _)| n == name).map_or(0.0, |x| x.1);
        let t = got(total);
        let worst = per_sec
            .iter()
            .map(|w| got(w))
            .max_by(|a, b| (a - ent).abs().partial_cmp(&(b - ent).abs()).unwrap())
            .unwrap_or(0.0);
        let err = |x: f64| 100.0 * (x - ent) / ent;
        println!(
            "{name:<12} {ent:>9.3} {t:>9.3} {:>+9.1}% {worst:>14.3} {:>+13.1}%  ({kind})",
            err(t),
            err(worst)
        );
    }
}

fn spinner() -> Child {
    Command::new("sh")
        .args(["-c", "while :; do :; done"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn schedstat(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The three phases under a private `wv host --placement PLACEMENT`; returns the system
/// worlds' mean CPU use.
fn worlds(placement: &str) -> f64 {
    let dir =
        std::env::temp_dir().join(format!("wv-sched-bench-{}-{placement}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("wv.sock");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_wv"))
        .args(["host", "--placement", placement, "--socket"])
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while UnixStream::connect(&socket).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let host = get(&socket, "/v1/host");
    println!(
        "\nhost: {}, placement {}",
        host["scheduler"].as_str().unwrap_or("?"),
        host["placement"].as_str().unwrap_or("?")
    );
    for (name, shares) in [("a", "1000"), ("b", "2000"), ("c", "4000")] {
        wv(
            &socket,
            &[
                "vm",
                "create",
                name,
                "--memory",
                "32M",
                "--cmdline",
                "console=ttyS0 probe.tests=burn",
                "--shares",
                shares,
            ],
        );
        wv(&socket, &["vm", "start", name]);
    }
    let probe = || -> Sample {
        get(&socket, "/v1/stats")
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                (
                    w["name"].as_str().unwrap().to_string(),
                    w["cpu_ns"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let kind = format!("wv, placement {placement}");
    let mut mgmt = Vec::new();
    let mut phase = |title: &str, want: &[(&str, f64)]| {
        std::thread::sleep(Duration::from_secs(2));
        let before = host_ticks();
        let (per_sec, total) = windows(&probe, 10);
        report(title, want, &kind, &per_sec, &total);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        report_host(before, host_ticks(), cpus);
        mgmt.push(
            total
                .iter()
                .filter(|(n, _)| n == "management" || n == "helper")
                .map(|x| x.1)
                .sum::<f64>(),
        );
    };
    phase(
        "1. shares 1:2:4 (wv host)",
        &[("a", 1.0 / 3.0), ("b", 2.0 / 3.0), ("c", 1.0)],
    );
    wv(
        &socket,
        &["vm", "set", "a", "--shares", "1", "--reservation", "0.9"],
    );
    phase(
        "2. a reserves 0.9 CPU with shares 1 (wv host)",
        &[("a", 0.9), ("b", 1.1 / 3.0), ("c", 2.2 / 3.0)],
    );
    wv(&socket, &["vm", "set", "c", "--limit", "0.3"]);
    phase(
        "3. c limited to 0.3 CPU (wv host)",
        &[("a", 0.9), ("b", 0.8), ("c", 0.3)],
    );
    for n in ["a", "b", "c"] {
        wv(&socket, &["vm", "stop", n]);
    }
    // SIGTERM: the daemon removes its cgroups before it ends.
    // SAFETY: kill(2) on the daemon this function started and has not yet waited for.
    unsafe { libc::kill(i32::try_from(daemon.id()).unwrap(), libc::SIGTERM) };
    let _ = daemon.wait();
    let _ = std::fs::remove_dir_all(&dir);
    100.0 * mgmt.iter().sum::<f64>() / mgmt.len() as f64
}

/// The host's `cpu` line of /proc/stat: (idle+iowait, irq+softirq, steal, total), in ticks.
fn host_ticks() -> [u64; 4] {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    [at(3) + at(4), at(5) + at(6), at(7), f.iter().take(8).sum()]
}

/// Where the CPUs went besides tasks over a window, in CPUs.
fn report_host(before: [u64; 4], after: [u64; 4], cpus: f64) {
    let d: Vec<f64> = (0..4)
        .map(|i| after[i].saturating_sub(before[i]) as f64)
        .collect();
    let of = |x: f64| cpus * x / d[3].max(1.0);
    println!(
        "host CPUs not running tasks: idle {:.3}, irq+softirq {:.3}, steal {:.3} (of {cpus})",
        of(d[0]),
        of(d[1]),
        of(d[2])
    );
}

fn main() {
    for placement in ["auto", "off"] {
        let overhead = worlds(placement);
        println!(
            "\nscheduler overhead, placement {placement} (system worlds: management (API) + helper (100 ms feedback loop, placement, VMM waiters)): {overhead:.2}% of one CPU"
        );
    }

    // Baseline: plain processes in cgroups with weights 1:2:4.
    let base = PathBuf::from("/sys/fs/cgroup/cpu/wv-bench-baseline");
    let mut kids = Vec::new();
    for (name, w) in [("w1", 1024), ("w2", 2048), ("w4", 4096)] {
        let g = base.join(name);
        std::fs::create_dir_all(&g).expect("cgroup v1 cpu controller (run as root)");
        std::fs::write(g.join("cpu.shares"), w.to_string()).unwrap();
        let k = spinner();
        std::fs::write(g.join("cgroup.procs"), k.id().to_string()).unwrap();
        kids.push((name, k));
    }
    let pids: Vec<(&str, u32)> = kids.iter().map(|(n, k)| (*n, k.id())).collect();
    let probe = || -> Sample {
        pids.iter()
            .map(|(n, p)| (n.to_string(), schedstat(*p)))
            .collect()
    };
    std::thread::sleep(Duration::from_secs(2));
    let before = host_ticks();
    let (per_sec, total) = windows(&probe, 10);
    report(
        "baseline: plain processes in cgroup v1 cpu groups, weights 1:2:4",
        &[("w1", 1.0 / 3.0), ("w2", 2.0 / 3.0), ("w4", 1.0)],
        "cgroup",
        &per_sec,
        &total,
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    report_host(before, host_ticks(), cpus);
    for (name, mut k) in kids {
        let _ = k.kill();
        let _ = k.wait();
        let _ = std::fs::remove_dir(base.join(name));
    }
    let _ = std::fs::remove_dir(&base);
}
