//! Multi-process coherence tests: 2, 3 and 4 `wv-dsm-node` processes over loopback, each
//! running workload threads on its own mapping of the region.

mod common;

use common::Cluster;
use std::time::Duration;

const MIB: usize = 1 << 20;
const LIMIT: Duration = Duration::from_secs(240);

fn values(s: &str) -> Vec<u64> {
    s.strip_prefix("values ")
        .unwrap_or_else(|| panic!("bad answer {s:?}"))
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

fn counters(n: u32, threads: u64, iters: u64, extra: &[&str]) {
    let mut c = Cluster::start(n, MIB, extra, LIMIT);
    let r = c.all(|_| format!("counter {threads} {iters}"));
    assert!(r.iter().all(|l| l == "ok"), "{r:?}");
    let expect = u64::from(n) * threads * iters;
    for i in 0..c.len() {
        assert_eq!(
            values(&c.cmd(i, "read 0 1 2 3")),
            vec![0, expect, expect, expect],
            "node {i}"
        );
    }
    let faults: u64 = (0..c.len()).map(|i| c.stat(i, "write_faults")).sum();
    let sent: u64 = (0..c.len()).map(|i| c.stat(i, "pages_sent")).sum();
    let received: u64 = (0..c.len()).map(|i| c.stat(i, "pages_received")).sum();
    assert!(
        faults > 0 && sent > 0,
        "the counters never moved between nodes"
    );
    assert_eq!(sent, received, "every page sent is received");
    for i in 0..c.len() {
        assert!(
            c.stat(i, "write_faults") > 0,
            "node {i} never took the lock page"
        );
        eprintln!("counters, {n} nodes, node {i}: {:?}", c.stats(i));
    }
    for i in 0..c.len() {
        assert_eq!(c.cmd(i, "errors"), "errors", "node {i}");
    }
}

#[test]
fn counters_under_a_spinlock_2_nodes() {
    counters(2, 2, 2000, &[]);
}

#[test]
fn counters_under_a_spinlock_3_nodes() {
    counters(3, 2, 1000, &[]);
}

#[test]
fn counters_under_a_spinlock_4_nodes() {
    counters(4, 1, 1000, &[]);
}

/// Without the hold time, pages move on every request: many more transfers, same result.
#[test]
fn counters_under_a_spinlock_without_hold_time() {
    counters(3, 1, 1000, &["--hold-us", "0"]);
}

#[test]
fn token_around_a_ring_of_pages() {
    for n in [2u32, 3, 4] {
        let (steps, base, pages) = (60 * u64::from(n), 8, 5);
        let mut c = Cluster::start(n, MIB, &[], LIMIT);
        let r = c.all(|_| format!("ring {steps} {base} {pages}"));
        let per = steps / u64::from(n);
        assert!(r.iter().all(|l| *l == format!("steps {per}")), "{r:?}");
        // The last value written is `steps`, on page base + steps % pages; every other ring
        // page holds the last step that landed on it.
        let q: Vec<String> = (0..pages).map(|k| (base + k).to_string()).collect();
        let got = values(&c.cmd(0, &format!("read {}", q.join(" "))));
        for (k, v) in (0..pages).zip(&got) {
            let last = (0..=steps).filter(|t| t % pages == k).max().unwrap();
            assert_eq!(*v, last, "ring page {k} with {n} nodes");
        }
    }
}

#[test]
fn buffer_written_by_one_checksummed_by_all() {
    for n in [2u32, 4] {
        let mut c = Cluster::start(n, MIB, &[], LIMIT);
        let writer = (n - 1) as usize;
        assert_eq!(c.cmd(writer, "fill 32 64 12345"), "ok");
        let sums = c.all(|_| "sum 32 64".into());
        let local = c.cmd(writer, "sum 32 64");
        assert!(sums.iter().all(|s| *s == local), "{sums:?} vs {local}");
        // The reference checksum, computed here from the same pattern.
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for p in 32u64..96 {
            for j in 0..4096u64 {
                let x = (12345 ^ (p << 20) ^ j).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                h = (h ^ (x >> 56)).wrapping_mul(0x100_0000_01b3);
            }
        }
        assert_eq!(local, format!("sum {h:016x}"));
        // Each reader received the 64 pages once; the writer sent them (n-1) times.
        for i in 0..n as usize {
            if i != writer {
                assert_eq!(c.stat(i, "pages_received"), 64, "node {i}");
            }
        }
        assert_eq!(c.stat(writer, "pages_sent"), 64 * u64::from(n - 1));
    }
}

/// Every node's counters once the cluster is quiet: the last VLD_PAGEs of a workload may
/// still be in flight when its threads are done, so wait until every message sent has been
/// received (nothing else is running, so nothing new is sent meanwhile).
fn quiet(c: &mut Cluster) -> Vec<Vec<(String, u64)>> {
    loop {
        let all: Vec<_> = (0..c.len()).map(|i| c.stats(i)).collect();
        let sum = |k: &str| -> u64 {
            all.iter()
                .flatten()
                .filter(|(n, _)| n == k)
                .map(|(_, v)| v)
                .sum()
        };
        if sum("messages_sent") == sum("messages_received") {
            return all;
        }
    }
}

#[test]
fn partitioned_pages_send_nothing_after_warm_up() {
    let n = 4;
    let per = 16;
    let mut c = Cluster::start(n, MIB, &[], LIMIT);
    let r = c.all(|i| format!("part {} {per} 1", 16 + i * per));
    assert!(r.iter().all(|l| l == "ok"));
    let before = quiet(&mut c);
    let r = c.all(|i| format!("part {} {per} 200", 16 + i * per));
    assert!(r.iter().all(|l| l == "ok"));
    for (i, before) in before.iter().enumerate() {
        let after = c.stats(i);
        for ((k, b), (_, a)) in before.iter().zip(&after) {
            assert_eq!(a - b, 0, "node {i}: {k} moved after warm-up");
        }
    }
    // Warm-up itself was zero-fill only: nobody had written those pages, so no data moved.
    assert!((0..c.len()).all(|i| c.stat(i, "pages_received") == 0));
}

#[test]
fn shared_memfd_backing_keeps_counters_exact() {
    let mut c = Cluster::start(2, MIB, &["--backing", "shared"], LIMIT);
    let r = c.all(|_| "counter 2 1000".into());
    assert!(r.iter().all(|l| l == "ok"), "{r:?}");
    assert_eq!(values(&c.cmd(1, "read 1 2 3")), vec![4000, 4000, 4000]);
}

/// The benchmark's commands (with tiny sizes; this is not the benchmark): latencies are
/// reported as two numbers, throughput as one, and the pages a remote read or write needs
/// are the ones that move.
#[test]
fn benchmark_commands_work() {
    let mut one = Cluster::start(1, MIB, &[], LIMIT);
    let l = one.cmd(0, "local-floor 20");
    assert_eq!(l.split_whitespace().count(), 3, "{l}");
    drop(one);
    let mut c = Cluster::start(2, MIB, &[], LIMIT);
    assert_eq!(c.cmd(0, "fill 0 20 1"), "ok");
    assert!(c.cmd(1, "lat-read 0 10").starts_with("lat "));
    assert_eq!(c.stat(1, "pages_received"), 10);
    assert!(c.cmd(1, "lat-write 10 10").starts_with("lat "));
    assert_eq!(c.stat(1, "pages_received"), 20);
    // Upgrading the 10 read copies moves no data.
    assert!(c.cmd(1, "lat-write 0 10").starts_with("lat "));
    assert_eq!(c.stat(1, "pages_received"), 20);
    assert_eq!(c.stat(1, "unchanged_received"), 10);
    let r = c.all(|_| "tput 30 4 2000".into());
    assert!(r.iter().all(|l| l.starts_with("tput ")), "{r:?}");
    assert_eq!(values(&c.cmd(0, "read 30 31 32 33")), vec![1000; 4]);
    drop(c);
    // Without versioning every reply carries the page: the upgrades and the never-written
    // pages too.
    let mut c = Cluster::start(2, MIB, &["--versions", "off"], LIMIT);
    assert_eq!(c.cmd(0, "fill 0 10 1"), "ok");
    assert!(c.cmd(1, "lat-read 0 10").starts_with("lat "));
    assert!(c.cmd(1, "lat-write 0 10").starts_with("lat "));
    assert!(c.cmd(1, "lat-read 40 10").starts_with("lat "));
    assert_eq!(c.stat(1, "pages_received"), 30);
    assert_eq!(c.stat(1, "unchanged_received"), 0);
    assert_eq!(values(&c.cmd(1, "read 40 0")), vec![0, 7]);
}

/// Read-ahead over real nodes: a sequential scan of K pages written by another node takes
/// K remote read faults without it and a handful with it, reads the same values, and the
/// pages read ahead are the ones used.
#[test]
fn read_ahead_takes_fewer_faults_on_a_sequential_scan() {
    let k = 256;
    let mut sums = Vec::new();
    for ahead in ["0", "16"] {
        let mut c = Cluster::start(2, MIB, &["--read-ahead", ahead], LIMIT);
        assert_eq!(c.cmd(0, &format!("fill 0 {k} 3")), "ok");
        sums.push(c.cmd(1, &format!("sum 0 {k}")));
        let faults = c.stat(1, "read_faults");
        let used = c.stat(1, "read_ahead_used");
        let requested = c.stat(1, "read_ahead_requested");
        eprintln!("read-ahead {ahead}: {:?}", c.stats(1));
        if ahead == "0" {
            assert_eq!((faults, used, requested), (k, 0, 0));
        } else {
            assert!(faults < k / 4, "{faults} remote faults for {k} pages");
            assert_eq!(
                faults + used,
                k,
                "every page either faulted or was read ahead"
            );
            assert!(requested <= used + 16, "{requested} requested, {used} used");
            assert_eq!(c.stat(1, "read_ahead_wasted"), 0);
        }
        assert_eq!(c.stat(1, "pages_received"), k);
        assert_eq!(c.cmd(1, "errors"), "errors");
    }
    assert_eq!(sums[0], sums[1]);
}
