//! The virtio-balloon end to end (issue 13, item 3): the probe guest's balloon driver
//! (`probe.tests=balloon`) follows the target set with `PUT /vm/balloon`, and the VMM's resident
//! memory follows the guest: it falls when the guest inflates or reports free pages, and rises
//! again only when the guest touches memory. A hostile driver's bad page numbers are counted,
//! and the VM runs on; a snapshot keeps the balloon's state.
//!
//! Every wait is on a serial marker or a poll of `GET /vm/balloon`, with a deadline.

mod common;

use common::vmm::{call, wait_for_socket, Vmm};
use common::{need_kvm, TempDir};
use serde_json::{json, Value};

use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// How long anything the guest is asked to do may take.
const DEADLINE: Duration = Duration::from_secs(90);

/// One guest at a time: they share two CPUs with everything else.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn balloon(sock: &Path) -> Value {
    let (st, v) = call(sock, "GET", "/vm/balloon", None);
    assert_eq!(st, 200, "{v}");
    v
}

fn set_target(sock: &Path, bytes: u64) {
    let (st, v) = call(
        sock,
        "PUT",
        "/vm/balloon",
        Some(&json!({ "target_bytes": bytes })),
    );
    assert_eq!(st, 204, "{v}");
}

/// Polls `GET /vm/balloon` until `done` holds; the last answer.
fn poll(sock: &Path, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + DEADLINE;
    loop {
        let v = balloon(sock);
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < end, "{what}: not within {DEADLINE:?}: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rss(v: &Value) -> u64 {
    v["vmm_rss_bytes"].as_u64().unwrap()
}

/// Asserts that `a - b` is `want` bytes, give or take a quarter of it.
fn about(what: &str, a: u64, b: u64, want: u64) {
    let d = a.saturating_sub(b);
    assert!(
        d >= want - want / 4 && d <= want + want / 4,
        "{what}: changed by {} MiB ({a} -> {b}), expected about {} MiB",
        d / MIB,
        want / MIB
    );
}

/// A `wv run` with its serial console on stdin and stdout.
fn start(args: &[&str]) -> Vmm {
    Vmm::run(args).stdin().timeout(DEADLINE).spawn()
}

/// 'q' ends the guest's balloon test: it passes and the VM powers off.
fn finish(mut vm: Vmm) {
    vm.type_in("q");
    vm.wait_for("PASS balloon");
    assert_eq!(vm.wait(), 0, "the VMM's exit status");
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn inflate_deflate_and_free_page_reporting_move_the_vmms_memory() {
    need_kvm();
    let _one = serial();
    let dir = TempDir::new("balloon");
    let sock = dir.path("api.sock");
    let mut vm = start(&[
        "--memory",
        "256M",
        "--balloon",
        "on",
        "--api-socket",
        sock.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 probe.tests=balloon probe.balloon_mib=64 probe.balloon_report_mib=32",
    ]);
    // The guest touched its 64 MiB pool: the VMM holds it.
    let l = vm.wait_for("balloon: touched 64 MiB");
    assert!(l.contains("stats=1 reporting=1"), "{l}");
    let touched = balloon(&sock);
    assert_eq!(touched["target_bytes"], 0, "{touched}");
    assert_eq!(touched["memory_bytes"], 256 * MIB, "{touched}");

    // Inflate by 48 MiB: actual follows, the VMM gives the pages back.
    set_target(&sock, 48 * MIB);
    let v = poll(&sock, "inflate to 48 MiB", |v| {
        v["actual_bytes"] == 48 * MIB
    });
    assert_eq!(v["ballooned_bytes"], 48 * MIB, "{v}");
    assert_eq!(v["counters"]["inflated_pages"], 48 * MIB / 4096, "{v}");
    assert_eq!(v["counters"]["bad_pfns"], 0, "{v}");
    assert_eq!(v["counters"]["release_errors"], 0, "{v}");
    about(
        "RSS after inflating 48 MiB",
        rss(&touched),
        rss(&v),
        48 * MIB,
    );
    let inflated = v;

    // Deflate: actual back to 0; the guest touches its pages again and the VMM holds them again.
    set_target(&sock, 0);
    let v = poll(&sock, "deflate to 0", |v| v["actual_bytes"] == 0);
    assert_eq!(v["ballooned_bytes"], 0, "{v}");
    assert_eq!(v["counters"]["deflated_pages"], 48 * MIB / 4096, "{v}");
    about(
        "RSS after deflating and touching",
        rss(&v),
        rss(&inflated),
        48 * MIB,
    );

    // Statistics: every GET asks for fresh ones; the guest's count of free memory grew back.
    let before = v["counters"]["stats_updates"].as_u64().unwrap();
    let v = poll(&sock, "fresh statistics", |v| {
        v["counters"]["stats_updates"].as_u64().unwrap() > before
    });
    let stats = &v["stats"];
    assert!(stats["total_memory"].as_u64().unwrap() > 200 * MIB, "{v}");
    assert!(
        stats["free_memory"].as_u64().unwrap() <= stats["total_memory"].as_u64().unwrap(),
        "{v}"
    );
    assert!(stats["available_memory"].is_u64(), "{v}");

    // Free page reporting: 32 MiB touched, then reported free: the VMM lets them go.
    let idle = balloon(&sock);
    vm.type_in("f");
    vm.wait_for("balloon: filled");
    let filled = balloon(&sock);
    about(
        "RSS after touching 32 MiB",
        rss(&filled),
        rss(&idle),
        32 * MIB,
    );
    vm.type_in("r");
    vm.wait_for("balloon: reported");
    let reported = balloon(&sock);
    assert_eq!(
        reported["counters"]["reported_pages"],
        32 * MIB / 4096,
        "{reported}"
    );
    assert_eq!(
        reported["ballooned_bytes"], 0,
        "reported pages stay the guest's"
    );
    about(
        "RSS after reporting 32 MiB free",
        rss(&filled),
        rss(&reported),
        32 * MIB,
    );
    finish(vm);
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_hostile_balloon_driver_is_counted_and_the_vm_runs_on() {
    need_kvm();
    let _one = serial();
    let dir = TempDir::new("balloon-hostile");
    let sock = dir.path("api.sock");
    let mut vm = start(&[
        "--memory",
        "128M",
        "--balloon",
        "on",
        "--api-socket",
        sock.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 probe.tests=balloon probe.balloon_mib=16 probe.balloon_hostile=1",
    ]);
    vm.wait_for("balloon: hostile done");
    let v = balloon(&sock);
    let c = &v["counters"];
    // Three bad PFNs inflated and deflated (beyond RAM, in the MMIO hole, u32::MAX), and a huge
    // inflate of 16384 pages beyond RAM.
    assert_eq!(c["bad_pfns"], 3 + 3 + 16384, "{v}");
    // A page list outside guest memory.
    assert_eq!(c["bad_requests"], 1, "{v}");
    // 1024 pool pages inflated twice (the second time repeated), then deflated.
    assert_eq!(c["repeated_pfns"], 1024, "{v}");
    assert_eq!(c["inflated_pages"], 1024, "{v}");
    assert_eq!(c["deflated_pages"], 1024, "{v}");
    assert_eq!(c["release_errors"], 0, "{v}");
    assert_eq!(v["ballooned_bytes"], 0, "{v}");
    // The VM runs on, and its balloon works.
    set_target(&sock, 8 * MIB);
    let v = poll(&sock, "inflate to 8 MiB", |v| v["actual_bytes"] == 8 * MIB);
    assert_eq!(v["ballooned_bytes"], 8 * MIB, "{v}");
    // A target beyond the VM's memory is refused; beyond the guest's pool it is followed as
    // far as the guest can.
    let (st, e) = call(
        &sock,
        "PUT",
        "/vm/balloon",
        Some(&json!({ "target_bytes": 129 * MIB })),
    );
    assert_eq!(st, 422, "{e}");
    set_target(&sock, 100 * MIB);
    vm.wait_for("balloon: target beyond the pool");
    let v = poll(&sock, "inflate to the pool's 16 MiB", |v| {
        v["actual_bytes"] == 16 * MIB
    });
    assert_eq!(v["target_bytes"], 100 * MIB, "{v}");
    finish(vm);
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_snapshot_keeps_the_balloon() {
    need_kvm();
    let _one = serial();
    let dir = TempDir::new("balloon-snapshot");
    let sock = dir.path("api.sock");
    let mut vm = start(&[
        "--memory",
        "128M",
        "--balloon",
        "on",
        "--api-socket",
        sock.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 probe.tests=balloon probe.balloon_mib=16",
    ]);
    vm.wait_for("balloon: touched");
    set_target(&sock, 8 * MIB);
    let before = poll(&sock, "inflate to 8 MiB", |v| v["actual_bytes"] == 8 * MIB);
    let snap = dir.path("snap");
    let (st, r) = call(
        &sock,
        "PUT",
        "/vm/snapshot",
        Some(&json!({ "destination": snap })),
    );
    assert_eq!(st, 200, "{r}");
    drop(vm);

    let sock2 = dir.path("api2.sock");
    let back = start(&[
        "--restore",
        snap.to_str().unwrap(),
        "--api-socket",
        sock2.to_str().unwrap(),
    ]);
    wait_for_socket(&sock2, DEADLINE);
    let after = poll(&sock2, "the restored VMM's API", |_| true);
    for k in [
        "target_bytes",
        "actual_bytes",
        "ballooned_bytes",
        "memory_bytes",
    ] {
        assert_eq!(after[k], before[k], "{k}: {before} then {after}");
    }
    assert_eq!(
        after["counters"]["inflated_pages"], before["counters"]["inflated_pages"],
        "{after}"
    );
    // The restored guest goes on following the target.
    set_target(&sock2, 0);
    let v = poll(&sock2, "deflate after the restore", |v| {
        v["actual_bytes"] == 0
    });
    assert_eq!(v["ballooned_bytes"], 0, "{v}");
    assert_eq!(v["counters"]["deflated_pages"], 8 * MIB / 4096, "{v}");
    finish(back);
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn the_daemon_sets_a_vms_memory_target_live() {
    need_kvm();
    let _one = serial();
    let dir = TempDir::new("balloon-daemon");
    let d = common::daemon::Daemon::start(&dir);
    // `wv vm create` gives a VM a balloon unless told otherwise.
    let r = d.wv(&[
        "vm",
        "create",
        "bl",
        "--memory",
        "64M",
        "--cmdline",
        "console=ttyS0 probe.tests=balloon probe.balloon_mib=16",
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    assert_eq!(d.json(&["vm", "info", "bl"])["spec"]["balloon"], true);
    // Not running: refused.
    let r = d.wv(&["vm", "set", "bl", "--memory-target", "48M"]);
    assert_ne!(r.status, Some(0), "{r}");
    assert!(r.stderr.contains("not running"), "{r}");
    let r = d.wv(&["vm", "start", "bl"]);
    assert_eq!(r.status, Some(0), "{r}");
    // More than its memory: refused; 48M: the guest gives 16 MiB back.
    let r = d.wv(&["vm", "set", "bl", "--memory-target", "65M"]);
    assert_ne!(r.status, Some(0), "{r}");
    assert!(r.stderr.contains("more than"), "{r}");
    let r = d.wv(&["vm", "set", "bl", "--memory-target", "48M"]);
    assert_eq!(r.status, Some(0), "{r}");
    assert!(r.stdout.contains("memory target 48M"), "{r}");
    let end = Instant::now() + DEADLINE;
    let info = loop {
        let v = d.json(&["vm", "info", "bl"]);
        if v["balloon"]["current_bytes"] == 48 * MIB {
            break v;
        }
        assert!(Instant::now() < end, "the guest never inflated: {v}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(info["balloon"]["memory_target_bytes"], 48 * MIB, "{info}");
    assert_eq!(
        info["balloon"]["balloon"]["actual_bytes"],
        16 * MIB,
        "{info}"
    );
    let r = d.wv(&["vm", "info", "bl"]);
    assert!(r.stdout.contains("memory target 48M, current 48M"), "{r}");
    // Back to all of it.
    let r = d.wv(&["vm", "set", "bl", "--memory-target", "64M"]);
    assert_eq!(r.status, Some(0), "{r}");
    let end = Instant::now() + DEADLINE;
    while d.json(&["vm", "info", "bl"])["balloon"]["current_bytes"] != 64 * MIB {
        assert!(Instant::now() < end, "the guest never deflated");
        std::thread::sleep(Duration::from_millis(50));
    }
    d.stop();
}
