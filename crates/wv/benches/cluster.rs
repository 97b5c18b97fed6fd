//! Cluster benchmark (issue 14's Measure; harness = false, prints tables): `wv run --cluster`
//! over loopback with the probe guest's `ipi` and `coher` tests.
//!
//! - IPI latency: the guest's fixed-IPI ping-pong (BSP to the last AP and back, rdtsc round trip
//!   on the BSP, `probe.ipi_rounds` rounds) between vCPUs on two nodes, against the same two
//!   vCPUs on one `wv run` with KVM's in-kernel irqchip and with `--irqchip user`;
//! - the coherence workload's throughput on 1, 2, 4 and 8 nodes (one vCPU per node), with a
//!   partitioned pattern (each vCPU's lock and counter on a page of its own) and a shared one
//!   (one lock and counter for all), with the pages moved and invalidations per second from the
//!   nodes' DSM counters (less those of the same run with one operation per vCPU: boot and
//!   start-up), beside N vCPUs on one node.
//!
//! Run: `cargo bench -p wv --bench cluster` (env `ROUNDS`: IPI runs per row, default 3;
//! `IPI_ROUNDS`: ping-pongs per run, default 500; `COHER_OPS`: operations per vCPU, default
//! 20000000). Needs /dev/kvm; without it every row says NOT MEASURED.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(600);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one `wv run` printed.
struct Run {
    stdout: String,
    stderr: String,
}

impl Run {
    /// The value of `key=` on the guest's `PASS test` line.
    fn field(&self, test: &str, key: &str) -> Result<u64, String> {
        let prefix = format!("PASS {test} ");
        let line = self
            .stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .ok_or_else(|| {
                format!(
                    "no PASS {test} line:\n{}\n{}",
                    self.stdout.trim_end(),
                    self.stderr.trim_end()
                )
            })?;
        let want = format!("{key}=");
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&want))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no {key} on {line:?}"))
    }

    /// A DSM counter summed over every node (`wv: cluster node I at ADDR: k=v ...`).
    fn counter(&self, name: &str) -> u64 {
        let want = format!("{name}=");
        self.stderr
            .lines()
            .filter(|l| l.starts_with("wv: cluster node "))
            .filter_map(|l| l.rsplit_once(": ").map(|(_, w)| w))
            .flat_map(str::split_whitespace)
            .filter_map(|w| w.strip_prefix(&want))
            .filter_map(|v| v.parse::<u64>().ok())
            .sum()
    }

    /// The interrupt messages between nodes (`wv: cluster: N interrupt messages ...`).
    fn irq_messages(&self) -> u64 {
        self.stderr
            .lines()
            .find_map(|l| l.strip_prefix("wv: cluster: "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

/// Runs `wv ARGS`, killed after LIMIT.
fn wv(args: &[&str]) -> Result<Run, String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wv"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning wv: {e}"))?;
    let pid = libc::pid_t::try_from(child.id()).map_err(|e| format!("wv's pid: {e}"))?;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let dog = std::thread::spawn(move || {
        if rx.recv_timeout(LIMIT).is_err() {
            // SAFETY: kill on the id of the child this function started and has not reaped
            // (the sender is dropped only after the wait below).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let mut err = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut stdout = String::new();
    let _ = child.stdout.take().unwrap().read_to_string(&mut stdout);
    let status = child.wait().map_err(|e| format!("waiting for wv: {e}"))?;
    let _ = tx.send(());
    let _ = dog.join();
    let stderr = err.join().unwrap_or_default();
    if !status.success() {
        return Err(format!(
            "wv {} ended with {status}:\n{}\n{}",
            args.join(" "),
            stdout.trim_end(),
            stderr.trim_end()
        ));
    }
    Ok(Run { stdout, stderr })
}

/// Writes a spec of `nodes` nodes over loopback with the vCPUs `per_node[i]` on node i.
fn spec(dir: &std::path::Path, name: &str, per_node: &[Vec<u32>]) -> String {
    let vcpus: usize = per_node.iter().map(Vec::len).sum();
    let mut s = format!("vcpus = {vcpus}\nmemory = \"128M\"\n");
    for v in per_node {
        let list: Vec<String> = v.iter().map(u32::to_string).collect();
        s.push_str(&format!(
            "[[node]]\nlisten = \"127.0.0.1:0\"\nvcpus = [{}]\n",
            list.join(", ")
        ));
    }
    let p = dir.join(name);
    std::fs::write(&p, s).expect("writing a cluster spec");
    p.to_str().unwrap().to_string()
}

fn ipi_rows(dir: &std::path::Path) {
    let rounds = env_u64("ROUNDS", 3);
    let pongs = env_u64("IPI_ROUNDS", 500);
    println!("# IPI ping-pong between two vCPUs ({pongs} rounds a run, 10 of warm-up; ns)");
    println!("| where | run | round trip median | p99 | min | one way (median / 2) | interrupt messages between nodes |");
    println!("|---|---|---|---|---|---|---|");
    let cmdline = format!("console=ttyS0 probe.tests=ipi probe.ipi_rounds={pongs}");
    let two = spec(dir, "ipi2.toml", &[vec![0], vec![1]]);
    let rows: [(&str, Vec<&str>); 3] = [
        (
            "one node, in-kernel irqchip",
            vec!["run", "--vcpus", "2", "--memory", "128M"],
        ),
        (
            "one node, --irqchip user",
            vec![
                "run",
                "--vcpus",
                "2",
                "--memory",
                "128M",
                "--irqchip",
                "user",
            ],
        ),
        (
            "two nodes over loopback (vCPU 0 on node 0, vCPU 1 on node 1)",
            vec!["run", "--cluster", &two],
        ),
    ];
    for r in 0..rounds {
        for (what, args) in &rows {
            let mut a = args.clone();
            a.extend(["--cmdline", &cmdline]);
            let got = wv(&a).and_then(|run| {
                let f = |k: &str| run.field("ipi", k);
                Ok(format!(
                    "{} | {} | {} | {} | {}",
                    f("rtt-median-ns")?,
                    f("rtt-p99-ns")?,
                    f("rtt-min-ns")?,
                    f("one-way-median-ns")?,
                    run.irq_messages()
                ))
            });
            match got {
                Ok(row) => println!("| {what} | {} | {row} |", r + 1),
                Err(e) => println!("| {what} | {} | NOT MEASURED: {e} |", r + 1),
            }
        }
    }
}

fn coher_rows(dir: &std::path::Path) {
    let ops = env_u64("COHER_OPS", 20_000_000);
    println!(
        "# coherence workload ({ops} lock-protected increments per vCPU; pages moved and \
         invalidations are all nodes' DSM counters, less a run with 1 operation per vCPU)"
    );
    println!("| nodes | vCPUs | pattern | ops/s (all vCPUs) | elapsed | pages moved/s | invalidations/s | pages moved | invalidations |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut layouts: Vec<(String, Vec<Vec<u32>>)> = Vec::new();
    for n in [1u32, 2, 4, 8] {
        layouts.push((format!("{n}"), (0..n).map(|i| vec![i]).collect()));
        if n > 1 {
            layouts.push(("1".into(), vec![(0..n).collect()]));
        }
    }
    for (nodes, per_node) in &layouts {
        let vcpus: usize = per_node.iter().map(Vec::len).sum();
        let file = spec(dir, &format!("c{nodes}-{vcpus}.toml"), per_node);
        for pattern in ["part", "shared"] {
            let run = |n: u64| {
                wv(&[
                    "run",
                    "--cluster",
                    &file,
                    "--cmdline",
                    &format!(
                        "console=ttyS0 probe.tests=coher probe.coher={pattern} probe.coher_ops={n}"
                    ),
                ])
            };
            let got = run(1).and_then(|base| {
                let r = run(ops)?;
                let secs = r.field("coher", "elapsed-us")? as f64 / 1e6;
                let moved = r
                    .counter("pages_received")
                    .saturating_sub(base.counter("pages_received"));
                let inval = r
                    .counter("invalidations")
                    .saturating_sub(base.counter("invalidations"));
                Ok(format!(
                    "{} | {:.3} s | {:.0} | {:.0} | {moved} | {inval}",
                    r.field("coher", "ops-per-sec")?,
                    secs,
                    moved as f64 / secs,
                    inval as f64 / secs
                ))
            });
            match got {
                Ok(row) => println!("| {nodes} | {vcpus} | {pattern} | {row} |"),
                Err(e) => println!("| {nodes} | {vcpus} | {pattern} | NOT MEASURED: {e} |"),
            }
        }
    }
}

fn main() {
    if std::fs::metadata("/dev/kvm").is_err() {
        println!("IPI latency and coherence throughput: NOT MEASURED (no /dev/kvm)");
        return;
    }
    let dir: PathBuf =
        std::env::temp_dir().join(format!("wv-bench-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating the spec directory");
    println!(
        "# wv cluster benchmark: probe guest, 128M, nodes on loopback on this host ({} CPUs)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    ipi_rows(&dir);
    coher_rows(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}
