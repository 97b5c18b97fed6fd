//! A world's group is removed in the background once its VMM has gone; a new run of the same
//! world placed at once (a quick restart) must neither fail nor lose its group to that removal.
//! On the host's own cgroup hierarchy (found as the daemon finds it), under a private name.
//! Needs root.

mod common;
use common::sleeper;
use std::time::{Duration, Instant};
use wv_host::sched::Cgroups;

fn members(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default()
}

#[test]
fn removal_never_races_a_new_attach() {
    let name = format!("wv-test-race-{}/daemon", std::process::id());
    let cg = Cgroups::open(&name, 2.0)
        .expect("a cgroup hierarchy with the cpu controller (run as root)");
    let mut failures = Vec::new();
    let mut child = sleeper();
    for i in 0..1500 {
        if let Err(e) = cg.attach(2, child.id()) {
            failures.push(format!("attach {i}: {e}"));
        }
        // As in the daemon: the removal is asked for while the old run's last process (the
        // VMM's teardown helper) is still in the group, and the next run is placed at once.
        cg.remove(2);
        drop(child);
        child = sleeper();
    }
    let r = cg.attach(2, child.id());
    // The last run keeps its group while the removals queued before it run their course.
    let t = Instant::now();
    let mut lost = false;
    while t.elapsed() < Duration::from_millis(500) {
        lost |= !members(&cg.dir(2))
            .lines()
            .any(|l| l.trim() == child.id().to_string());
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(child);
    cg.remove(2);
    let gone = {
        let t = Instant::now();
        while cg.dir(2).exists() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        !cg.dir(2).exists()
    };
    // Clean up this test's groups whatever happened.
    let base = cg.root().parent().unwrap().to_path_buf();
    for d in [
        cg.dir(2),
        cg.root().join("management"),
        cg.root().join("helper"),
        cg.root().to_path_buf(),
        base,
    ] {
        let _ = std::fs::remove_dir(d);
    }
    assert!(
        failures.is_empty(),
        "{} of 1500 quick re-attaches failed: {failures:?}",
        failures.len()
    );
    assert!(r.is_ok(), "{r:?}");
    assert!(!lost, "the last run lost its group to an earlier removal");
    assert!(
        gone,
        "the world's group remains after its last process left"
    );
}
