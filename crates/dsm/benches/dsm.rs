//! DSM benchmark (harness = false; prints numbers): remote read and write fault latency
//! between two node processes over loopback beside a local userfaultfd fault (the floor),
//! and the coherence workload's throughput on 1, 2 and 4 nodes for a partitioned and a
//! shared access pattern; and the bytes sent per fault, and per page read, of a sequential
//! scan followed by a write to every page it read, with versioning and read-ahead each on and
//! off; the same remote read and write faults with the two nodes in two network namespaces
//! joined by a veth pair the bench creates and removes (root only; otherwise that row says
//! NOT MEASURED and why); and the cost of mirroring (a remote write fault and the throughput
//! rows, off and on).
//!
//! `cargo bench -p wv-dsm --bench dsm` (optionally `-- --quick` for fewer iterations, or
//! `-- --tiny` only to check that it runs).

#[path = "../tests/common/mod.rs"]
mod common;

use common::Cluster;
use std::process::Command;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(1800);

fn lat(s: &str) -> (f64, f64) {
    let v: Vec<f64> = s
        .strip_prefix("lat ")
        .unwrap_or_else(|| panic!("bad answer {s:?}"))
        .split_whitespace()
        .map(|x| x.parse::<f64>().unwrap() / 1000.0)
        .collect();
    (v[0], v[1])
}

/// Two network namespaces joined by a veth pair (10.252.0.1 and .2), removed when dropped.
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
            ns: [format!("wvdsm-a-{tag}"), format!("wvdsm-b-{tag}")],
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
        let (va, vb) = (format!("wvda{tag}"), format!("wvdb{tag}"));
        for ns in &v.ns {
            ip(&["netns", "add", ns])?;
        }
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &v.ns[0]])?;
        ip(&["link", "set", &vb, "netns", &v.ns[1]])?;
        for (ns, dev, addr) in [
            (&v.ns[0], &va, "10.252.0.1/24"),
            (&v.ns[1], &vb, "10.252.0.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(v)
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

/// Remote read and write fault latency between two nodes (node 0 wrote the pages).
fn remote_faults(c: &mut Cluster, pages: usize, label: &str) {
    assert_eq!(c.cmd(0, &format!("fill 0 {} 1", 2 * pages)), "ok");
    for (cmd, base, what) in [
        ("lat-read", 0, "remote read fault"),
        (
            "lat-write",
            pages,
            "remote write fault (ownership and data)",
        ),
    ] {
        let (m, p) = lat(&c.cmd(1, &format!("{cmd} {base} {pages}")));
        println!(
            "{:52} median {m:8.1} us  p99 {p:8.1} us",
            format!("{what}, {label}")
        );
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let tiny = std::env::args().any(|a| a == "--tiny");
    let (pages, ops): (usize, usize) = if tiny {
        (20, 2_000)
    } else if quick {
        (500, 200_000)
    } else {
        (4000, 2_000_000)
    };
    let bytes = 64 << 20;

    println!(
        "# wv-dsm benchmark (loopback, {} pages per latency run)",
        pages
    );
    let mut one = Cluster::start(1, 1 << 20, &[], LIMIT);
    let (m, p) = lat(&one.cmd(0, &format!("local-floor {pages}")));
    println!(
        "local userfaultfd fault (zero page, same process)   median {m:8.1} us  p99 {p:8.1} us"
    );
    drop(one);

    for versions in ["on", "off"] {
        println!("# two nodes, versioning {versions}");
        let mut c = Cluster::start(2, bytes, &["--versions", versions], LIMIT);
        // Node 0 writes two ranges (it owns them writable, at version 1: data must move).
        assert_eq!(c.cmd(0, &format!("fill 0 {} 1", 2 * pages)), "ok");
        let rows = [
            (
                "lat-read",
                0,
                "remote read fault (page written by the other node)",
            ),
            (
                "lat-write",
                pages,
                "remote write fault (ownership and data move)",
            ),
            ("lat-write", 0, "write upgrade of a read copy"),
            ("lat-read", 2 * pages, "read of a never-written page"),
        ];
        for (cmd, base, what) in rows {
            let (m, p) = lat(&c.cmd(1, &format!("{cmd} {base} {pages}")));
            println!("{what:52} median {m:8.1} us  p99 {p:8.1} us");
        }
        let faults: u64 = (0..2)
            .map(|i| c.stat(i, "read_faults") + c.stat(i, "write_faults"))
            .sum();
        let moved = c.stat(0, "bytes_sent") + c.stat(1, "bytes_sent");
        println!(
            "{:52} {:8.0}",
            "bytes sent per fault (both directions)",
            moved as f64 / faults as f64
        );
        println!("node 1: {}", c.cmd(1, "stats"));
    }

    // Alternated, three times (one of each is noisy on a shared host).
    println!("# loopback against veth between two network namespaces, versioning on, alternated");
    for round in 1..=3 {
        {
            let mut c = Cluster::start(2, bytes, &[], LIMIT);
            remote_faults(&mut c, pages, &format!("loopback ({round})"));
        }
        match Veth::new() {
            Err(why) => {
                println!("over veth: NOT MEASURED ({why})");
                break;
            }
            Ok(v) => {
                let mut c = Cluster::start_placed(2, bytes, &[], LIMIT, |id| {
                    let i = id as usize;
                    Some((v.ns[i].clone(), format!("10.252.0.{}:0", i + 1)))
                });
                remote_faults(&mut c, pages, &format!("over veth ({round})"));
                drop(c);
                drop(v);
            }
        }
    }

    println!(
        "# bytes per fault: node 1 reads {pages} pages node 0 wrote, in order, then writes each"
    );
    for versions in ["on", "off"] {
        for ahead in ["0", "16"] {
            let mut c = Cluster::start(
                2,
                bytes,
                &["--versions", versions, "--read-ahead", ahead],
                LIMIT,
            );
            assert_eq!(c.cmd(0, &format!("fill 0 {pages} 1")), "ok");
            let get = |v: &[(String, u64)], k: &str| v.iter().find(|(x, _)| x == k).unwrap().1;
            let before: Vec<_> = (0..2).map(|i| c.stats(i)).collect();
            let (rm, rp) = lat(&c.cmd(1, &format!("lat-read 0 {pages}")));
            let (wm, wp) = lat(&c.cmd(1, &format!("lat-write 0 {pages}")));
            let after: Vec<_> = (0..2).map(|i| c.stats(i)).collect();
            let d =
                |k: &str| -> u64 { (0..2).map(|i| get(&after[i], k) - get(&before[i], k)).sum() };
            let faults = d("read_faults") + d("write_faults");
            let moved = d("bytes_sent");
            println!(
                "versioning {versions:3} read-ahead {ahead:>2}: {faults:6} remote faults for {} accesses, \
                 {:8.0} bytes sent per fault, {:7.0} per access; read per access median {rm:7.1} us \
                 p99 {rp:7.1} us, write median {wm:7.1} us p99 {wp:7.1} us; read ahead used {} wasted {}",
                2 * pages,
                moved as f64 / faults.max(1) as f64,
                moved as f64 / (2 * pages) as f64,
                d("read_ahead_used"),
                d("read_ahead_wasted"),
            );
        }
    }

    println!("# throughput: one thread per node incrementing a word per op over 16 pages");
    throughput(&[1, 2, 4], &[], bytes, ops);

    println!(
        "# mirroring off / on (push every 100 ms): remote write fault on 3 nodes (node 1 takes \
         pages node 0 wrote), throughput on 2 and 3 nodes"
    );
    for mirror in [false, true] {
        let extra: &[&str] = if mirror { &["--mirror-ms", "100"] } else { &[] };
        let mut c = Cluster::start(3, bytes, extra, LIMIT);
        assert_eq!(c.cmd(0, &format!("fill 0 {pages} 1")), "ok");
        let (m, p) = lat(&c.cmd(1, &format!("lat-write 0 {pages}")));
        let on = if mirror { "on" } else { "off" };
        println!(
            "mirroring {on:3}: remote write fault                  median {m:8.1} us  p99 {p:8.1} us; \
             bytes sent {} (mirror messages {})",
            (0..3).map(|i| c.stat(i, "bytes_sent")).sum::<u64>(),
            (0..3).map(|i| c.stat(i, "mirror_sent")).sum::<u64>()
        );
        drop(c);
        println!("mirroring {on}: throughput");
        throughput(&[2, 3], extra, bytes, ops);
    }
}

/// The throughput rows: one thread per node over 16 pages, partitioned and shared, on each
/// node count of `counts`, with `extra` node options.
fn throughput(counts: &[u32], extra: &[&str], bytes: usize, ops: usize) {
    for &n in counts {
        for shared in [false, true] {
            let mut c = Cluster::start(n, bytes, extra, LIMIT);
            let base = |i: usize| if shared { 0 } else { 16 * i };
            // Warm-up: one pass so that partitioned pages are owned by their node.
            c.all(|i| format!("tput {} 16 16", base(i)));
            let before: Vec<_> = (0..c.len()).map(|i| c.stats(i)).collect();
            let t = Instant::now();
            let r = c.all(|i| format!("tput {} 16 {ops}", base(i)));
            let secs = t.elapsed().as_secs_f64();
            let total: f64 = r
                .iter()
                .map(|l| l.strip_prefix("tput ").unwrap().parse::<f64>().unwrap())
                .sum();
            let mut moved = 0;
            let mut inval = 0;
            for (i, b) in before.iter().enumerate() {
                let a = c.stats(i);
                let get = |v: &[(String, u64)], k: &str| v.iter().find(|(x, _)| x == k).unwrap().1;
                moved += get(&a, "pages_received") - get(b, "pages_received");
                inval += get(&a, "invalidations") - get(b, "invalidations");
            }
            println!(
                "{n} node(s), {:11}: {total:12.0} ops/s (sum of nodes), {:9.0} pages moved/s, {:9.0} invalidations/s",
                if shared { "shared" } else { "partitioned" },
                moved as f64 / secs,
                inval as f64 / secs
            );
        }
    }
}
