//! The daemon's pause, snapshots, restore and clones through `wv vm ...`: a true pause (CPU
//! time and the guest's kvmclock stand still), snapshot → list → restore into the stopped VM
//! (the guest resumes mid-test, no second boot) → delete, refused names, and clones that run
//! as VMs of their own.

mod common;
use common::daemon::Daemon;
use common::*;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The tests here time a guest (a pause, a clock test): one at a time, on 2 CPUs as on 64.
static TIMING: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    TIMING.lock().unwrap_or_else(|p| p.into_inner())
}

/// The console log the daemon keeps of VM `name`.
fn console(d: &Daemon, name: &str) -> PathBuf {
    d.state.join("vms").join(name).join("console.log")
}

/// Waits until `name`'s console log holds `line` `n` times (at the start of a line); returns
/// the log.
fn wait_console(d: &Daemon, name: &str, line: &str, n: usize) -> String {
    let path = console(d, name);
    let t = Instant::now();
    loop {
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        if log.lines().filter(|l| l.starts_with(line)).count() >= n {
            return log;
        }
        if log.lines().any(|l| l.starts_with("FAIL")) {
            panic!("{name}: a guest test failed:\n{log}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "{name} never printed '{line}' ({n} times):\n{log}"
        );
        // A VMM that ended unasked will print nothing more: say why at once.
        let v = d.json(&["vm", "info", name]);
        assert!(v["state"] != "crashed", "{name} crashed: {v}\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// CPU time of `name`'s vCPU threads (`wv` runs vCPU 0, `vcpuN` the others) and of the whole
/// VMM, from `wv vm stats`.
fn cpu(d: &Daemon, name: &str) -> (Vec<(String, u64)>, u64) {
    let s = d.json(&["vm", "stats", name]);
    let vcpus = s["threads"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| {
            let n = t["name"].as_str().unwrap();
            n == "wv" || n.starts_with("vcpu")
        })
        .map(|t| {
            (
                format!("{}:{}", t["name"], t["tid"]),
                t["cpu_ns"].as_u64().unwrap(),
            )
        })
        .collect();
    (vcpus, s["cpu_ns"].as_u64().unwrap())
}

/// `wv vm create NAME` running the probe guest's tests `tests`, started.
fn create_started(d: &Daemon, name: &str, cmdline: &str, vcpus: &str) {
    let r = d.wv(&[
        "vm",
        "create",
        name,
        "--memory",
        "64M",
        "--vcpus",
        vcpus,
        "--cmdline",
        cmdline,
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    let r = d.wv(&["vm", "start", name]);
    assert_eq!(r.status, Some(0), "{r}");
}

/// `wv vm ARGS` is refused by the daemon (exit status 1) with a message containing `why`.
fn refused(d: &Daemon, args: &[&str], why: &str) {
    let r = d.wv(args);
    assert_eq!(r.status, Some(1), "wv {args:?}: {r}");
    assert!(r.stderr.contains(why), "wv {args:?}: not '{why}': {r}");
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn pause_stops_the_vcpus_and_the_guest_clock() {
    need_kvm();
    let _one = serial();
    let dir = TempDir::new("host-pause");
    let d = Daemon::start(&dir);
    create_started(
        &d,
        "p",
        // A loaded 2-CPU host can keep a vCPU thread from its CPU for longer than the guest's
        // 10 ms tick: steps up to 100 ms pass, a tenth of the 1 s pause a leak would show.
        "console=ttyS0 probe.tests=clock probe.clockms=3000 probe.clockgap=100",
        "2",
    );
    wait_console(&d, "p", "clock: running", 1);
    let r = d.wv(&["vm", "pause", "p"]);
    assert_eq!(r.status, Some(0), "{r}");
    assert_eq!(d.json(&["vm", "info", "p"])["state"], "paused");
    refused(&d, &["vm", "pause", "p"], "paused");
    // The pause lasts a second: a vCPU that ran, or a clock that ran on, would show it.
    let (vcpus_before, total_before) = cpu(&d, "p");
    assert!(!vcpus_before.is_empty(), "no vCPU threads in the stats");
    std::thread::sleep(Duration::from_secs(1));
    let (vcpus_after, total_after) = cpu(&d, "p");
    assert_eq!(vcpus_before, vcpus_after, "vCPUs ran while paused");
    // The VMM's other threads may answer a request meanwhile; the guest loop would take a
    // whole CPU.
    assert!(
        total_after - total_before < 100_000_000,
        "the paused VMM used {} ms of CPU in a second",
        (total_after - total_before) / 1_000_000
    );
    let r = d.wv(&["vm", "resume", "p"]);
    assert_eq!(r.status, Some(0), "{r}");
    assert_eq!(d.json(&["vm", "info", "p"])["state"], "running");
    refused(&d, &["vm", "resume", "p"], "running");
    // The guest checked that its kvmclock did not jump by the pause (nor did ticks pile up).
    let log = wait_console(&d, "p", "PASS clock", 1);
    assert!(!log.contains("FAIL clock"), "{log}");
    d.wait_state("p", "stopped");
    d.stop();
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn snapshot_list_restore_and_delete_through_the_cli() {
    need_kvm();
    let _one = serial();
    let dir = TempDir::new("host-snap");
    let d = Daemon::start(&dir);
    let summary = "probe: summary passed=3 failed=0";
    create_started(
        &d,
        "s",
        "console=ttyS0 probe.tests=rng,clock,pci probe.clockms=2000 probe.clockgap=100",
        "1",
    );
    // Not running yet in the daemon's eyes is not the point: a stopped VM is refused.
    let r = d.wv(&["vm", "create", "idle"]);
    assert_eq!(r.status, Some(0), "{r}");
    refused(&d, &["vm", "snapshot", "idle", "x"], "not running");
    refused(&d, &["vm", "snapshot", "nosuch", "x"], "nosuch");
    wait_console(&d, "s", "clock: running", 1);
    let r = d.wv(&["vm", "snapshot", "s", "snap1"]);
    assert_eq!(r.status, Some(0), "{r}");
    assert!(r.stdout.contains("snapshot snap1 of VM s"), "{r}");
    // Names that are not valid names, or taken, are refused and leave nothing behind.
    // ("-x" would be an option to the client: the API test sends it.)
    for bad in ["..", ".hidden", "a b", "a%2Fb", "é"] {
        refused(&d, &["vm", "snapshot", "s", bad], "is not a valid name");
    }
    refused(&d, &["vm", "snapshot", "s", "snap1"], "exists already");
    let list = d.json(&["vm", "snapshots"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["name"], "snap1");
    assert_eq!(list[0]["vm"], "s");
    assert_eq!(list[0]["config"]["memory"], 64 << 20);
    assert!(list[0]["memory_bytes"].as_u64().unwrap() > 0, "{list:?}");
    let table = d.wv(&["vm", "snapshots"]);
    assert_eq!(table.status, Some(0), "{table}");
    assert!(
        table.stdout.lines().any(|l| l.starts_with("snap1 ")),
        "{table}"
    );
    // The snapshot did not disturb the guest: it passes and powers off.
    wait_console(&d, "s", summary, 1);
    d.wait_state("s", "stopped");
    let before = std::fs::read_to_string(console(&d, "s")).unwrap();
    let boots = |log: &str| {
        log.lines()
            .filter(|l| l.starts_with("Worldvisor probe guest"))
            .count()
    };
    assert_eq!(boots(&before), 1, "{before}");
    refused(&d, &["vm", "restore", "s", "nosuch"], "nosuch");
    refused(&d, &["vm", "restore", "nosuch", "snap1"], "nosuch");
    let r = d.wv(&["vm", "restore", "s", "snap1"]);
    assert_eq!(r.status, Some(0), "{r}");
    refused(&d, &["vm", "restore", "s", "snap1"], "running already");
    // Restored, the guest goes on where the snapshot caught it, mid clock test: its console
    // continues with the end of that test and the rest of the run, no second boot.
    let after = wait_console(&d, "s", summary, 2);
    let resumed = &after[before.len()..];
    assert!(
        resumed.starts_with("PASS clock"),
        "the restored VM did not resume mid-test:\n{resumed}"
    );
    assert!(resumed.contains("PASS pci"), "{resumed}");
    assert_eq!(boots(&after), 1, "a second boot:\n{after}");
    d.wait_state("s", "stopped");
    // Deleted: gone from the list, and a second delete is refused.
    let r = d.wv(&["vm", "delete-snapshot", "snap1"]);
    assert_eq!(r.status, Some(0), "{r}");
    assert_eq!(d.json(&["vm", "snapshots"]), serde_json::json!([]));
    assert!(!d.state.join("snapshots/snap1").exists());
    refused(&d, &["vm", "delete-snapshot", "snap1"], "snap1");
    refused(&d, &["vm", "restore", "s", "snap1"], "snap1");
    d.stop();
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn clones_start_as_vms_of_their_own() {
    need_kvm();
    let _one = serial();
    let dir = TempDir::new("host-clone");
    let d = Daemon::start(&dir);
    create_started(
        &d,
        "src",
        // Not a timing test: two clones share the two CPUs. The guest waits in `genid` until
        // its generation id changes, which a clone's does.
        "console=ttyS0 probe.tests=rng,genid,pci probe.genid=wait",
        "1",
    );
    wait_console(&d, "src", "genid: id=", 1);
    let r = d.wv(&["vm", "snapshot", "src", "gold"]);
    assert_eq!(r.status, Some(0), "{r}");
    let r = d.wv(&["vm", "stop", "src"]);
    assert_eq!(r.status, Some(0), "{r}");
    // The client refuses a count out of range before asking (the daemon would: 422).
    for bad in ["0", "65", "x"] {
        let r = d.wv(&["vm", "clone", "gold", "c", "--count", bad]);
        assert_eq!(r.status, Some(200), "--count {bad}: {r}");
    }
    refused(&d, &["vm", "clone", "nosuch", "c"], "nosuch");
    refused(&d, &["vm", "clone", "gold", "src"], "exists already");
    let clones = d.json(&["vm", "clone", "gold", "c", "--count", "2"]);
    let clones = clones.as_array().unwrap();
    let names: Vec<&str> = clones
        .iter()
        .map(|w| w["spec"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["c-1", "c-2"]);
    let pids: Vec<u64> = clones.iter().map(|w| w["pid"].as_u64().unwrap()).collect();
    assert_ne!(pids[0], pids[1], "{clones:?}");
    for name in names {
        // Each clone is a guest of its own, resumed from the snapshot in `genid` (no second
        // boot), with a new generation id and its own console log.
        let log = wait_console(&d, name, "probe: summary passed=3 failed=0", 1);
        assert!(
            log.starts_with("PASS genid") && log.contains(" was="),
            "{name} did not resume from the snapshot with a new identity:\n{log}"
        );
        let v = d.wait_state(name, "stopped");
        assert_eq!(v["spec"]["memory"], 64 << 20, "{v}");
    }
    assert_ne!(console(&d, "c-1"), console(&d, "c-2"));
    // The names are taken now; the snapshot serves further clones.
    refused(
        &d,
        &["vm", "clone", "gold", "c", "--count", "2"],
        "exists already",
    );
    d.stop();
}
