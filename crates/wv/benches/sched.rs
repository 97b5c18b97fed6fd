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
//!
//! Switches (environment): `WV_SCHED_BENCH_ONLY=auto` (or `off`) runs the worlds under that
//! placement only (then the baseline); `WV_SCHED_BENCH_ACCOUNT=1` also prints, for each phase,
//! where each CPU's time went (per-CPU `/proc/stat`, and every task's CPU time from its
//! schedstat attributed each second to the CPU it last ran on, `/proc/*/task/*/stat` field
//! 39), top consumers first. `WV_PLACE_TRACE=FILE` is read by the daemon (it logs each
//! placement tick there).

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
    let account = std::env::var_os("WV_SCHED_BENCH_ACCOUNT").is_some_and(|v| v != "0");
    let mut phase = |title: &str, want: &[(&str, f64)]| {
        std::thread::sleep(Duration::from_secs(2));
        let before = host_ticks();
        let acct = account.then(|| {
            let vcpus = world_vcpus(&socket);
            std::thread::spawn(move || per_cpu_accounting(&vcpus, 10))
        });
        let (per_sec, total) = windows(&probe, 10);
        report(title, want, &kind, &per_sec, &total);
        if let Some(a) = acct {
            print!("{}", a.join().unwrap_or_default());
        }
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

/// Each world's vCPU threads (tid, "world/thread").
fn world_vcpus(socket: &Path) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for w in get(socket, "/v1/stats")
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let name = w["name"].as_str().unwrap_or("?").to_string();
        for t in w["threads"].as_array().cloned().unwrap_or_default() {
            let tname = t["name"].as_str().unwrap_or("?");
            if let Some(tid) = t["tid"].as_u64().and_then(|t| u32::try_from(t).ok()) {
                out.push((tid, format!("world {name}: {tname} {tid}")));
            }
        }
    }
    out
}

/// Per-CPU fields of /proc/stat: (all of user..steal, idle+iowait), in ticks.
fn cpu_ticks() -> Vec<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    s.lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            let at = |i: usize| f.get(i).copied().unwrap_or(0);
            (f.iter().take(8).sum(), at(3) + at(4))
        })
        .collect()
}

/// Every task: tid -> (label, CPU ns from schedstat, CPU it last ran on).
fn tasks(vcpus: &[(u32, String)]) -> std::collections::HashMap<u32, (String, u64, usize)> {
    let mut out = std::collections::HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let pcomm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
        let Ok(ts) = std::fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in ts.flatten() {
            let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // Fields after the comm's closing parenthesis: state is field 3, processor 39.
            let Some((head, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let cpu = rest
                .split_whitespace()
                .nth(36)
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
            let tcomm = head.split_once('(').map_or("?", |x| x.1);
            let ns = std::fs::read_to_string(t.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            let label = vcpus
                .iter()
                .find(|v| v.0 == tid)
                .map(|v| v.1.clone())
                .unwrap_or_else(|| format!("{pid} {}/{tcomm}", pcomm.trim()));
            out.insert(tid, (label, ns, cpu));
        }
    }
    out
}

/// Where each CPU's time went over `secs` seconds, as text.
fn per_cpu_accounting(vcpus: &[(u32, String)], secs: u32) -> String {
    use std::collections::HashMap;
    use std::fmt::Write;
    let hz = 100.0; // USER_HZ
    let t0 = Instant::now();
    let c0 = cpu_ticks();
    let mut prev = tasks(vcpus);
    let mut by: HashMap<(usize, String), u64> = HashMap::new();
    for i in 1..=secs {
        let target = t0 + Duration::from_millis(u64::from(i) * 1000 + 500);
        std::thread::sleep(target.saturating_duration_since(Instant::now()));
        let now = tasks(vcpus);
        for (tid, (label, ns, cpu)) in &now {
            let before = prev.get(tid).map_or(0, |p| p.1);
            let d = ns.saturating_sub(before);
            if d > 0 {
                *by.entry((*cpu, label.clone())).or_default() += d;
            }
        }
        prev = now;
    }
    let c1 = cpu_ticks();
    let wall = t0.elapsed().as_secs_f64();
    let mut out = String::new();
    for (k, (a, b)) in c0.iter().zip(&c1).enumerate() {
        let all = b.0.saturating_sub(a.0) as f64 / hz;
        let idle = b.1.saturating_sub(a.1) as f64 / hz;
        let mut rows: Vec<(&String, u64)> = by
            .iter()
            .filter(|((c, _), _)| *c == k)
            .map(|((_, l), ns)| (l, *ns))
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.1));
        let tasks_s: f64 = rows.iter().map(|r| r.1 as f64 / 1e9).sum();
        let worlds_s: f64 = rows
            .iter()
            .filter(|r| r.0.starts_with("world "))
            .map(|r| r.1 as f64 / 1e9)
            .sum();
        let _ = writeln!(
            out,
            "CPU{k} over {wall:.2} s: /proc/stat {:.4} CPU busy, {:.4} idle; tasks {:.4} CPU, of which world vCPUs {:.4}, others {:.4}",
            (all - idle) / wall,
            idle / wall,
            tasks_s / wall,
            worlds_s / wall,
            (tasks_s - worlds_s) / wall
        );
        for (l, ns) in rows.iter().take(12) {
            let _ = writeln!(out, "    {:.4}  {l}", *ns as f64 / 1e9 / wall);
        }
    }
    out
}

fn main() {
    let only = std::env::var("WV_SCHED_BENCH_ONLY").ok();
    for placement in ["auto", "off"] {
        if only.as_deref().is_some_and(|o| o != placement) {
            continue;
        }
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
