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
//!   start-up), beside N vCPUs on one node;
//! - both again with the two nodes in two network namespaces joined by a veth pair the bench
//!   creates and removes (node 0 is `wv run` in one, node 1 a `wv node` in the other, named in
//!   the spec as remote): root only, otherwise those rows say NOT MEASURED and why.
//!
//! Run: `cargo bench -p wv --bench cluster` (env `ROUNDS`: IPI runs per row, default 3;
//! `IPI_ROUNDS`: ping-pongs per run, default 500; `COHER_OPS`: operations per vCPU, default
//! 20000000; `COHER_RUNS`: runs of the whole coherence table, default 1). Needs /dev/kvm;
//! without it every row says NOT MEASURED.

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

const WV: &str = env!("CARGO_BIN_EXE_wv");
/// The port node 1 listens on in its namespace (nothing else runs there).
const VETH_PORT: u16 = 47350;

/// Two network namespaces joined by a veth pair (10.253.0.1 and .2), removed when dropped.
struct Veth {
    ns: [String; 2],
}

impl Veth {
    /// Creates them, or says why not.
    fn new() -> Result<Veth, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root (creating network namespaces needs it)".into());
        }
        let tag = std::process::id() % 100_000;
        let v = Veth {
            ns: [format!("wvcl-a-{tag}"), format!("wvcl-b-{tag}")],
        };
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("running ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        let (va, vb) = (format!("wvca{tag}"), format!("wvcb{tag}"));
        for ns in &v.ns {
            ip(&["netns", "add", ns])?;
        }
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &v.ns[0]])?;
        ip(&["link", "set", &vb, "netns", &v.ns[1]])?;
        for (ns, dev, addr) in [
            (&v.ns[0], &va, "10.253.0.1/24"),
            (&v.ns[1], &vb, "10.253.0.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(v)
    }

    /// Runs `wv ARGS` (a cluster spec naming node 1 at 10.253.0.2:VETH_PORT as remote) in the
    /// first namespace, with `wv node` serving node 1 in the second.
    fn run(&self, args: &[&str]) -> Result<Run, String> {
        let listen = format!("10.253.0.2:{VETH_PORT}");
        let mut node = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns[1],
                WV,
                "node",
                "--listen",
                &listen,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning wv node: {e}"))?;
        // It says `wv node: listening on ADDR` on stdout once it listens.
        let out = std::io::BufReader::new(node.stdout.take().unwrap());
        let mut err = node.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let watch = std::thread::spawn(move || {
            let mut all = String::new();
            for line in std::io::BufRead::lines(out).map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let drain = std::thread::spawn(move || {
            let mut all = String::new();
            let _ = err.read_to_string(&mut all);
            all
        });
        let result = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(()) => {
                let mut a = vec!["netns", "exec", &self.ns[0], WV];
                a.extend_from_slice(args);
                run_cmd("ip", &a)
            }
            Err(_) => Err("wv node did not say it was listening within 10 s".into()),
        };
        // Node 0 stops node 1 at the end of a run; after a failure it may still wait.
        if result.is_err() {
            let _ = node.kill();
        }
        let _ = node.wait();
        let node_out = watch.join().unwrap_or_default() + &drain.join().unwrap_or_default();
        result.map_err(|e| format!("{e}\nwv node: {}", node_out.trim_end()))
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair, and with it the other end.
        for ns in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `wv ARGS`, killed after LIMIT.
fn wv(args: &[&str]) -> Result<Run, String> {
    run_cmd(WV, args)
}

/// Runs `program ARGS` (wv, or wv through `ip netns exec`), killed after LIMIT.
fn run_cmd(program: &str, args: &[&str]) -> Result<Run, String> {
    let mut child = Command::new(program)
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
            "{program} {} ended with {status}:\n{}\n{}",
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

/// Writes a spec of two nodes over the veth pair: vCPU 0 on node 0 (10.253.0.1), vCPU 1 on
/// node 1 (10.253.0.2, a remote `wv node`).
fn veth_spec(dir: &std::path::Path) -> String {
    let s = format!(
        "vcpus = 2\nmemory = \"128M\"\n[[node]]\nlisten = \"10.253.0.1:0\"\nvcpus = [0]\n\
         [[node]]\nlisten = \"10.253.0.2:{VETH_PORT}\"\nremote = true\nvcpus = [1]\n"
    );
    let p = dir.join("veth.toml");
    std::fs::write(&p, s).expect("writing a cluster spec");
    p.to_str().unwrap().to_string()
}

/// How a row runs `wv`: directly, or across the veth pair.
enum Via<'a> {
    Direct,
    Veth(&'a Result<Veth, String>),
}

fn run_via(via: &Via, args: &[&str]) -> Result<Run, String> {
    match via {
        Via::Direct => wv(args),
        Via::Veth(Ok(v)) => v.run(args),
        Via::Veth(Err(why)) => Err(why.clone()),
    }
}

fn ipi_rows(dir: &std::path::Path, veth: &Result<Veth, String>) {
    let rounds = env_u64("ROUNDS", 3);
    let pongs = env_u64("IPI_ROUNDS", 500);
    println!("# IPI ping-pong between two vCPUs ({pongs} rounds a run, 10 of warm-up; ns)");
    println!("| where | run | round trip median | p99 | min | one way (median / 2) | interrupt messages between nodes |");
    println!("|---|---|---|---|---|---|---|");
    let cmdline = format!("console=ttyS0 probe.tests=ipi probe.ipi_rounds={pongs}");
    let two = spec(dir, "ipi2.toml", &[vec![0], vec![1]]);
    let over_veth = veth_spec(dir);
    let user = [
        "run",
        "--vcpus",
        "2",
        "--memory",
        "128M",
        "--irqchip",
        "user",
    ];
    let rows: [(&str, Via, Vec<&str>); 4] = [
        (
            "one node, in-kernel irqchip",
            Via::Direct,
            user[..5].to_vec(),
        ),
        ("one node, --irqchip user", Via::Direct, user.to_vec()),
        (
            "two nodes over loopback (vCPU 0 on node 0, vCPU 1 on node 1)",
            Via::Direct,
            vec!["run", "--cluster", &two],
        ),
        (
            "two nodes over veth between two network namespaces",
            Via::Veth(veth),
            vec!["run", "--cluster", &over_veth],
        ),
    ];
    for r in 0..rounds {
        for (what, via, args) in &rows {
            let mut a = args.clone();
            a.extend(["--cmdline", &cmdline]);
            let got = run_via(via, &a).and_then(|run| {
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

fn coher_rows(dir: &std::path::Path, veth: &Result<Veth, String>) {
    let ops = env_u64("COHER_OPS", 20_000_000);
    let runs = env_u64("COHER_RUNS", 1);
    println!(
        "# coherence workload ({ops} lock-protected increments per vCPU; pages moved and \
         invalidations are all nodes' DSM counters, less a run with 1 operation per vCPU)"
    );
    println!("| run | nodes | vCPUs | pattern | ops/s (all vCPUs) | elapsed | pages moved/s | invalidations/s | pages moved | invalidations |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut layouts: Vec<(String, usize, String, Via)> = Vec::new();
    for n in [1u32, 2, 4, 8] {
        let per_node: Vec<Vec<u32>> = (0..n).map(|i| vec![i]).collect();
        let file = spec(dir, &format!("c{n}.toml"), &per_node);
        layouts.push((format!("{n}"), n as usize, file, Via::Direct));
        if n == 2 {
            layouts.push(("2 (veth)".into(), 2, veth_spec(dir), Via::Veth(veth)));
        }
        if n > 1 {
            let file = spec(dir, &format!("c1-{n}.toml"), &[(0..n).collect()]);
            layouts.push(("1".into(), n as usize, file, Via::Direct));
        }
    }
    for (round, (nodes, vcpus, file, via)) in
        (1..=runs).flat_map(|r| layouts.iter().map(move |l| (r, l)))
    {
        for pattern in ["part", "shared"] {
            let run = |n: u64| {
                run_via(
                    via,
                    &[
                        "run",
                        "--cluster",
                        file,
                        "--cmdline",
                        &format!(
                        "console=ttyS0 probe.tests=coher probe.coher={pattern} probe.coher_ops={n}"
                    ),
                    ],
                )
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
                Ok(row) => println!("| {round} | {nodes} | {vcpus} | {pattern} | {row} |"),
                Err(e) => {
                    println!("| {round} | {nodes} | {vcpus} | {pattern} | NOT MEASURED: {e} |")
                }
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
    let veth = Veth::new();
    if let Err(why) = &veth {
        println!("over veth: NOT MEASURED ({why})");
    }
    ipi_rows(&dir, &veth);
    coher_rows(&dir, &veth);
    drop(veth);
    let _ = std::fs::remove_dir_all(&dir);
}
