//! Hot-plugged devices kept in a daemon VM's definition (docs/DEVICES.md, "Hot-plug"): a disk
//! and a NIC added to a running probe guest are in `wv vm info` and the stored document at
//! once; a daemon restart that re-adopts the VM knows them (a third device, a NIC, is then
//! removed through the port the first daemon gave it, and the guest's `net` test runs over the
//! hot-plugged NIC's port after the restart); the next start boots with the disk and
//! the NIC, which the guest's `blk` and `net` tests use; a device the run started with cannot
//! be ejected live, and once the VM is stopped it leaves the definition: the start after that
//! boots without it. Ids stay unique across the two kinds and the boot-time devices; a refused
//! add leaves nothing behind.

mod common;

use common::daemon::Daemon;
use common::{disk_image, need_kvm, TempDir};
use serde_json::Value;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(180);
const CMDLINE: &str = "console=ttyS0 probe.tests=hotplug,blk,net probe.hotplug_cycles=100 \
                       probe.net=10.89.0.1,10.89.0.2";

fn console_log(d: &Daemon, vm: &str) -> String {
    std::fs::read_to_string(d.state.join("vms").join(vm).join("console.log")).unwrap_or_default()
}

fn vmm_log(d: &Daemon, vm: &str) -> String {
    std::fs::read_to_string(d.state.join("vms").join(vm).join("vmm.log")).unwrap_or_default()
}

/// Waits until VM `vm`'s console has `n` lines starting with `text`; returns the last one.
fn wait_lines(d: &Daemon, vm: &str, text: &str, n: usize) -> String {
    let end = Instant::now() + WAIT;
    loop {
        let log = console_log(d, vm);
        let lines: Vec<&str> = log.lines().filter(|l| l.starts_with(text)).collect();
        if lines.len() >= n {
            return lines[n - 1].to_string();
        }
        assert!(
            Instant::now() < end,
            "{vm} never showed '{text}' ({n} times):\n{log}\n{}",
            vmm_log(d, vm)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn count(d: &Daemon, vm: &str, text: &str) -> usize {
    console_log(d, vm)
        .lines()
        .filter(|l| l.starts_with(text))
        .count()
}

/// Types `c` into VM `vm`'s console and waits for one more line starting with `marker`: the
/// console client stays attached until then (input from a client gone is dropped).
fn command(d: &Daemon, vm: &str, c: &str, marker: &str) -> String {
    let before = count(d, vm, marker);
    let sock = d.state.join("vms").join(vm).join("console.sock");
    let mut s = UnixStream::connect(&sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    s.write_all(c.as_bytes()).unwrap();
    let line = wait_lines(d, vm, marker, before + 1);
    drop(s);
    line
}

/// The ids of a definition's disks and nets in `wv vm info --json`.
fn devices(v: &Value) -> (Vec<String>, Vec<String>) {
    let ids = |k: &str, f: &str| -> Vec<String> {
        v["spec"][k]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x[f].as_str().map(str::to_string))
            .collect()
    };
    (ids("disks", "id"), ids("nets", "id"))
}

/// The ids of the run's hot-plugged devices (`hot` of `wv vm info --json`).
fn hot(v: &Value) -> Vec<String> {
    v["hot"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["id"].as_str().map(str::to_string))
        .collect()
}

/// The switch ports of VM `vm` on network `net`: (port, a VMM connected).
fn ports_of(d: &Daemon, net: &str, vm: &str) -> Vec<(String, bool)> {
    d.json(&["net", "info", net])["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["vm"] == vm)
        .map(|p| {
            (
                p["port"].as_str().unwrap().to_string(),
                p["connected"] == true,
            )
        })
        .collect()
}

/// Waits until VM `vm` no longer runs (its guest powered off), returning its state.
fn wait_ended(d: &Daemon, vm: &str) -> Value {
    let end = Instant::now() + WAIT;
    loop {
        let v = d.json(&["vm", "info", vm]);
        if v["state"] != "running" {
            return v;
        }
        assert!(Instant::now() < end, "{vm} kept running: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn hot_plugged_devices_stay_in_the_definition_across_restarts() {
    need_kvm();
    let dir = TempDir::new("hotplug-persist");
    let img = disk_image(&dir, "hot.img", 1 << 20);
    let img = img.to_str().unwrap();
    let d = Daemon::start(&dir);
    assert_eq!(d.wv(&["net", "create", "lan"]).status, Some(0));
    // The peer that answers h's net test, once in each of h's three runs.
    let r = d.wv(&[
        "vm",
        "create",
        "p",
        "--memory",
        "64M",
        "--net",
        "network=lan,mac=52:54:00:89:00:02",
        "--cmdline",
        "console=ttyS0 probe.tests=netpeer probe.ip=10.89.0.2 probe.echoes=3",
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    assert_eq!(d.wv(&["vm", "start", "p"]).status, Some(0));
    wait_lines(&d, "p", "netpeer: listening", 1);
    // h has a disk of its own (root) and no NIC; its memory is shared, for the switch.
    let root = disk_image(&dir, "root.img", 1 << 20);
    let root_arg = format!("path={},id=root", root.display());
    let r = d.wv(&[
        "vm",
        "create",
        "h",
        "--memory",
        "64M",
        "--memory-shared",
        "on",
        "--disk",
        &root_arg,
        "--cmdline",
        CMDLINE,
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    assert_eq!(d.wv(&["vm", "start", "h"]).status, Some(0));
    wait_lines(&d, "h", "hotplug: ready", 1);

    // Ids unique across disks and nets, those the VM has and those added: refused, and
    // nothing left behind.
    for (kind, spec) in [
        ("--disk", format!("path={img},id=root")),
        ("--net", "network=lan,id=root".to_string()),
    ] {
        let r = d.wv(&["vm", "device", "add", "h", kind, &spec]);
        assert_ne!(r.status, Some(0), "{spec}: {r}");
        assert!(
            r.stderr.contains("already has a device with id 'root'"),
            "{r}"
        );
    }
    // A device the VMM refuses (no such network) leaves nothing behind either.
    let r = d.wv(&["vm", "device", "add", "h", "--net", "network=nosuch,id=x"]);
    assert_ne!(r.status, Some(0), "{r}");
    let v = d.json(&["vm", "info", "h"]);
    assert_eq!(
        devices(&v),
        (vec!["root".to_string()], vec![]),
        "refused adds changed the definition: {v}"
    );
    assert!(ports_of(&d, "lan", "h").is_empty());

    // The disk and the NIC: the guest uses each as it arrives.
    let disk = format!("path={img},id=hot0");
    let r = d.wv(&["vm", "device", "add", "h", "--disk", &disk]);
    assert_eq!(r.status, Some(0), "{r}");
    let line = wait_lines(&d, "h", "hotplug: added slot=", 1);
    assert!(line.ends_with("blk hot0 rw-ok"), "{line}");
    let nic = "network=lan,id=hot1,mac=52:54:00:89:00:01";
    let r = d.wv(&["vm", "device", "add", "h", "--net", nic]);
    assert_eq!(r.status, Some(0), "{r}");
    let line = wait_lines(&d, "h", "hotplug: added slot=", 2);
    assert!(line.ends_with("net mac=52:54:00:89:00:01"), "{line}");
    // In the definition at once, in the answer and in the stored document.
    let v = d.json(&["vm", "info", "h"]);
    assert_eq!(
        devices(&v),
        (
            vec!["root".to_string(), "hot0".to_string()],
            vec!["hot1".to_string()]
        ),
        "{v}"
    );
    assert_eq!(hot(&v), ["hot0", "hot1"], "{v}");
    let stored = std::fs::read_to_string(d.state.join("worlds.json")).unwrap();
    assert!(
        stored.contains("\"hot0\"") && stored.contains("\"hot1\""),
        "{stored}"
    );
    // A third, to be removed after the daemon's restart.
    let r = d.wv(&[
        "vm",
        "device",
        "add",
        "h",
        "--net",
        "network=lan,id=hot2,mac=52:54:00:89:00:03",
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    wait_lines(&d, "h", "hotplug: added slot=", 3);
    assert_eq!(ports_of(&d, "lan", "h").len(), 2);

    // The daemon restarts and re-adopts the VM: it knows the devices and what serves them.
    d.stop_keeping_vmms();
    let d = Daemon::start(&dir);
    let v = d.json(&["vm", "info", "h"]);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(hot(&v), ["hot0", "hot1", "hot2"], "{v}");
    let r = d.wv(&["vm", "device", "remove", "h", "hot2"]);
    assert_eq!(r.status, Some(0), "{r}");
    wait_lines(&d, "h", "hotplug: ejected slot=", 1);
    let v = d.json(&["vm", "info", "h"]);
    assert_eq!(
        devices(&v).1,
        ["hot1"],
        "the removed NIC is still defined: {v}"
    );
    assert_eq!(hot(&v), ["hot0", "hot1"], "{v}");
    let ports = ports_of(&d, "lan", "h");
    assert_eq!(ports.len(), 1, "the removed NIC's port stayed: {ports:?}");

    // The first run ends (the guest's tests use the hot-plugged devices, then it powers
    // off); the next boots with both.
    command(&d, "h", "q", "PASS hotplug");
    let blk = wait_lines(&d, "h", "PASS blk", 1);
    assert!(blk.contains("disks=2 root:"), "{blk}");
    wait_lines(&d, "h", "PASS net", 1);
    let v = wait_ended(&d, "h");
    assert!(hot(&v).is_empty(), "{v}");
    assert_eq!(devices(&v).1, ["hot1"], "{v}");
    assert_eq!(d.wv(&["vm", "start", "h"]).status, Some(0));
    wait_lines(&d, "h", "hotplug: ready", 2);
    let v = d.json(&["vm", "info", "h"]);
    assert!(
        hot(&v).is_empty(),
        "boot-time devices listed as hot-plugged: {v}"
    );
    // Booted with them: the run's own port for the NIC, connected.
    let ports = ports_of(&d, "lan", "h");
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert!(!ports[0].0.contains("-hot"), "{ports:?}");
    // A device the run started with is not ejected live.
    let r = d.wv(&["vm", "device", "remove", "h", "hot0"]);
    assert_ne!(r.status, Some(0), "{r}");
    assert!(r.stderr.contains("started with"), "{r}");
    let line = command(&d, "h", "q", "PASS hotplug");
    assert!(line.contains("added=0"), "{line}");
    let blk = wait_lines(&d, "h", "PASS blk", 2);
    assert!(blk.contains("disks=2 root:"), "{blk}");
    assert!(blk.contains(" hot0:") && blk.ends_with(",rw-ok"), "{blk}");
    wait_lines(&d, "h", "PASS net", 2);
    wait_ended(&d, "h");

    // Stopped: the disk leaves the definition; the next run has the NIC only.
    let r = d.wv(&["vm", "device", "remove", "h", "hot0"]);
    assert_eq!(r.status, Some(0), "{r}");
    let r = d.wv(&["vm", "device", "remove", "h", "hot0"]);
    assert_ne!(r.status, Some(0), "{r}");
    assert!(r.stderr.contains("no device 'hot0'"), "{r}");
    let v = d.json(&["vm", "info", "h"]);
    assert_eq!(
        devices(&v),
        (vec!["root".to_string()], vec!["hot1".to_string()]),
        "{v}"
    );
    assert_eq!(d.wv(&["vm", "start", "h"]).status, Some(0));
    wait_lines(&d, "h", "hotplug: ready", 3);
    command(&d, "h", "q", "PASS hotplug");
    let blk = wait_lines(&d, "h", "PASS blk", 3);
    assert!(
        blk.contains("disks=1 root:") && !blk.contains("hot0"),
        "{blk}"
    );
    wait_lines(&d, "h", "PASS net", 3);
    wait_ended(&d, "h");
    d.stop();
}
