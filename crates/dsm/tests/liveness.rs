//! Peer loss between real node processes: a node that dies (SIGKILL) or stalls (SIGSTOP) is
//! declared lost by the others within a second, with an error naming its id and address;
//! a fault that needs the protocol afterwards is not served (its thread stays blocked, it
//! never sees made-up contents), and the surviving process can still stop at once.

mod common;

use common::Cluster;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const LIMIT: Duration = Duration::from_secs(120);

/// Kills or stops node 1 of two while node 0 watches, then checks node 0's view.
fn lose_node_1(sig: i32, expect: &str) {
    let mut c = Cluster::start(2, MIB, &["--peer-timeout-ms", "300"], LIMIT);
    // Node 1 writes page 3 (managed by node 1, owned by node 1 afterwards).
    assert_eq!(c.cmd(1, "fill 3 1 7"), "ok");
    // Node 0 is healthy and idle: heartbeats keep the pair alive well past the timeout.
    assert_eq!(c.cmd(0, "wait-error 700"), "none");
    c.send(0, "wait-error 5000");
    let t = Instant::now();
    c.signal(1, sig);
    let e = c.recv(0);
    let took = t.elapsed();
    assert!(
        e.starts_with("error node 1: 127.0.0.1:") && e.contains(expect),
        "{e}"
    );
    assert!(took < Duration::from_secs(1), "loss seen after {took:?}");
    eprintln!("node 1 lost ({sig}) after {took:?}: {e}");
    // A thread that faults on node 1's page now is not served: it stays blocked.
    assert_eq!(c.cmd(0, "bg-read 3"), "started");
    while c.stat(0, "failed_faults") == 0 {
        std::thread::yield_now();
    }
    assert_eq!(c.cmd(0, "bg-status"), "blocked");
    assert_eq!(c.stat(0, "peers_lost"), 1);
    // And every later fault too (page 2: managed by node 0, never written).
    let before = c.stat(0, "failed_faults");
    assert_eq!(c.cmd(0, "bg-read 2"), "started");
    while c.stat(0, "failed_faults") == before {
        std::thread::yield_now();
    }
    // The blocked threads do not keep the process from stopping (the cluster's drop asks
    // every node to exit and waits for it; node 1 is continued first if it was stopped).
    if sig == libc::SIGSTOP {
        c.signal(1, libc::SIGKILL);
    }
    let t = Instant::now();
    drop(c);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn a_killed_node_is_lost_at_once() {
    lose_node_1(libc::SIGKILL, "closed the connection");
}

#[test]
fn a_stopped_node_is_lost_within_the_timeout() {
    lose_node_1(libc::SIGSTOP, "silent for ");
}
