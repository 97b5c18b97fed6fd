//! Mirroring between real node processes (docs/DSM.md, "Mirroring"): pages written on
//! two nodes, then a node that holds some of them (as their owner, as their mirror, and as
//! the manager of a third of the region) is killed; the survivors recover and every page
//! reads its last written value on both of them, and they go on reading and writing.

mod common;

use common::Cluster;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const LIMIT: Duration = Duration::from_secs(120);

/// Waits (bounded) until `cond` holds on a value polled from the cluster.
fn until(c: &mut Cluster, what: &str, mut cond: impl FnMut(&mut Cluster) -> bool) {
    let t = Instant::now();
    while !cond(c) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::yield_now();
    }
}

#[test]
fn a_killed_node_loses_nothing_and_the_others_go_on() {
    let mut c = Cluster::start(
        3,
        MIB,
        &["--peer-timeout-ms", "300", "--mirror-ms", "20"],
        LIMIT,
    );
    // Node 2 writes pages 0..48 (it owns them; it manages a third of them, node 0 and 1
    // hold the mirror copies of the rest); node 0 writes 48..96 (node 2 mirrors the third
    // node 0 manages... and manages a third).
    assert_eq!(c.cmd(2, "fill 0 48 11"), "ok");
    assert_eq!(c.cmd(0, "fill 48 48 12"), "ok");
    // Node 1 reads some of node 2's pages (read copies on three nodes, then a write).
    let s = c.cmd(1, "sum 0 8");
    assert!(s.starts_with("sum "), "{s}");
    assert_eq!(c.cmd(1, "fill 4 2 13"), "ok");
    // The pages written in place reach their mirrors within a push interval: wait until
    // node 2 and node 0 have pushed them (their counters), then take the sums as written.
    until(&mut c, "node 2's pushes", |c| {
        c.stat(2, "mirror_pushes") >= 40
    });
    until(&mut c, "node 0's pushes", |c| {
        c.stat(0, "mirror_pushes") >= 48
    });
    let a = c.cmd(2, "sum 0 48");
    let b = c.cmd(0, "sum 48 48");
    assert_ne!(
        a,
        c.cmd(2, "sum 200 48"),
        "the written pages differ from zero pages"
    );
    // Every page is now held write-protected after the sums: written, pushed or handed over.
    c.send(0, "wait-error 5000");
    let t = Instant::now();
    c.signal(2, libc::SIGKILL);
    let e = c.recv(0);
    assert!(e.starts_with("error node 2: 127.0.0.1:"), "{e}");
    eprintln!("node 2 lost after {:?}: {e}", t.elapsed());
    until(&mut c, "the recovery", |c| {
        c.stat(0, "recoveries") == 1 && c.stat(1, "recoveries") == 1
    });
    eprintln!("recovered {:?} after the kill", t.elapsed());
    for n in [0, 1] {
        assert_eq!(c.cmd(n, "failed"), "none");
        assert_eq!(c.cmd(n, "sum 0 48"), a, "node {n}: node 2's pages");
        assert_eq!(c.cmd(n, "sum 48 48"), b, "node {n}: node 0's pages");
    }
    // Node 2 owned its 48 pages but the two node 1 wrote: the survivors took the other 46
    // over from their mirror copies.
    let rehomed = c.stat(0, "pages_rehomed") + c.stat(1, "pages_rehomed");
    assert_eq!(rehomed, 46);
    // The two survivors go on: node 1 overwrites node 2's pages, node 0 reads them.
    assert_eq!(c.cmd(1, "fill 0 48 21"), "ok");
    let a2 = c.cmd(1, "sum 0 48");
    assert_ne!(a2, a);
    assert_eq!(c.cmd(0, "sum 0 48"), a2);
    assert_eq!(c.stat(0, "failed_faults") + c.stat(1, "failed_faults"), 0);
}

#[test]
fn a_node_killed_while_its_pages_move_loses_nothing() {
    // Node 2 writes 2000 pages; node 0 then overwrites them all, taking each from node 2
    // (ownership, data, and node 2 managing a third of them): node 2 is killed while that
    // runs. Node 0's writes all complete, and node 1 reads exactly what node 0 wrote.
    let pages = 2000;
    let mut c = Cluster::start(
        3,
        16 * MIB,
        &["--peer-timeout-ms", "300", "--mirror-ms", "20"],
        LIMIT,
    );
    assert_eq!(c.cmd(2, &format!("fill 0 {pages} 1")), "ok");
    until(&mut c, "node 2's pushes", |c| {
        c.stat(2, "mirror_pushes") >= pages
    });
    c.send(0, &format!("fill 0 {pages} 2"));
    // Once node 0 has taken some pages (its counter), node 2 goes.
    until(&mut c, "node 0's first write faults", |c| {
        c.stat(1, "mirror_received") > 0 && {
            let s = c.cmd(2, "stats");
            s.contains("pages_sent=") && !s.contains(" pages_sent=0 ")
        }
    });
    c.signal(2, libc::SIGKILL);
    assert_eq!(c.recv(0), "ok", "node 0's fill completes");
    until(&mut c, "the recovery", |c| {
        c.stat(0, "recoveries") == 1 && c.stat(1, "recoveries") == 1
    });
    let sent_before_kill = c.stat(0, "write_faults");
    eprintln!("node 0: {}", c.cmd(0, "stats"));
    assert!(sent_before_kill > 0);
    let mine = c.cmd(0, &format!("sum 0 {pages}"));
    assert_eq!(c.cmd(1, &format!("sum 0 {pages}")), mine);
    for n in [0, 1] {
        assert_eq!(c.cmd(n, "failed"), "none");
        assert_eq!(c.stat(n, "failed_faults"), 0);
    }
}
