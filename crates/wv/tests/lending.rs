//! Memory lent between running VMs by the daemon's policy (`wv host --host-memory-reserve`,
//! docs/DEVICES.md "Lending"): two probe guests under one daemon whose VMs' pool
//! (`--host-memory`) cannot hold both whole; one idle and one allocating, then the roles
//! swapped: the memory flows from the idle one to the busy one and back, the idle one's VMM
//! holds less memory, and the guests' own balloon counts agree with the daemon's report.

mod common;

use common::daemon::Daemon;
use common::{need_kvm, TempDir};
use serde_json::Value;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// Each VM's memory, and the pool of its probe guest (from 32 MiB up), its working set when
/// busy.
const MEMORY: u64 = 128 * MIB;
const CMDLINE: &str =
    "console=ttyS0 probe.tests=balloon probe.balloon_mib=88 probe.balloon_busy_mib=80";
const RESERVE: u64 = 32 * MIB;
/// What the pool lacks for both VMs whole: the policy has to take this much.
const SHORT: u64 = 48 * MIB;
/// The longest any one step may take (the policy moves at most 64 MiB a VM a second for a
/// shortfall this small; the guests boot and touch their pools on an emulating host).
const DEADLINE: Duration = Duration::from_secs(180);

fn console_log(d: &Daemon, vm: &str) -> String {
    std::fs::read_to_string(d.state.join("vms").join(vm).join("console.log")).unwrap_or_default()
}

/// Waits until VM `vm`'s console has shown `text` `n` times.
fn wait_console(d: &Daemon, vm: &str, text: &str, n: usize) {
    let end = Instant::now() + DEADLINE;
    loop {
        let log = console_log(d, vm);
        if log.matches(text).count() >= n {
            return;
        }
        assert!(log.matches("FAIL").count() == 0, "{vm} failed:\n{log}");
        assert!(
            Instant::now() < end,
            "{vm} never showed '{text}' ({n} times):\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Types `c` into VM `vm`'s console and waits for its guest to answer `marker` (once more
/// than it had): the console client stays attached until then (the VMM sends an attaching
/// client the recent output first, and a client gone by then has its input dropped).
fn command(d: &Daemon, vm: &str, c: &str, marker: &str) {
    let before = console_log(d, vm).matches(marker).count();
    let sock = d.state.join("vms").join(vm).join("console.sock");
    let mut s = UnixStream::connect(&sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    s.write_all(c.as_bytes()).unwrap();
    wait_console(d, vm, marker, before + 1);
    drop(s);
}

/// The policy's report (`wv host memory --json`).
fn memory(d: &Daemon) -> Value {
    d.json(&["host", "memory"])
}

fn world<'a>(m: &'a Value, vm: &str) -> &'a Value {
    m["worlds"]
        .as_array()
        .and_then(|w| w.iter().find(|w| w["name"] == vm))
        .unwrap_or_else(|| panic!("no world {vm} in {m}"))
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

/// Waits for the report to satisfy `done`, returning it.
fn wait_report(d: &Daemon, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + DEADLINE;
    loop {
        let m = memory(d);
        if done(&m) {
            return m;
        }
        assert!(Instant::now() < end, "never {what}: {m}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The last `balloon: actual=N` the guest of `vm` printed, in bytes (0 before any).
fn guest_balloon(d: &Daemon, vm: &str) -> u64 {
    console_log(d, vm)
        .lines()
        .rev()
        .filter_map(|l| l.trim().strip_prefix("balloon: actual="))
        .find_map(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}

/// VM `busy` has all its memory and `idle` lent at least what the pool lacks, both balloons
/// where the daemon aims them.
fn settled(m: &Value, busy: &str, idle: &str) -> bool {
    let (b, i) = (world(m, busy), world(m, idle));
    n(b, "current_bytes") == MEMORY
        && n(b, "target_bytes") == MEMORY
        && n(i, "lent_bytes") >= SHORT - 8 * MIB
        && n(i, "current_bytes") == n(i, "target_bytes")
}

/// The guests' own counts agree with the daemon's: what each guest's balloon holds is its
/// memory less its current memory in the report.
fn counts_agree(d: &Daemon, m: &Value) {
    for vm in ["a", "b"] {
        let w = world(m, vm);
        let end = Instant::now() + DEADLINE;
        loop {
            let held = guest_balloon(d, vm);
            if held == MEMORY - n(w, "current_bytes") {
                break;
            }
            assert!(
                Instant::now() < end,
                "{vm}: the guest's balloon holds {held} bytes, the daemon says {w}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn memory_flows_from_the_idle_vm_to_the_busy_one_and_back() {
    need_kvm();
    let dir = TempDir::new("lending");
    // First without the policy: how much the two VMs hold once their guests touched their
    // pools (the VMMs' own memory depends on the build).
    let d0 = Daemon::start(&dir);
    for vm in ["a", "b"] {
        let r = d0.wv(&["vm", "create", vm, "--memory", "128M", "--cmdline", CMDLINE]);
        assert_eq!(r.status, Some(0), "{r}");
        let r = d0.wv(&["vm", "start", vm]);
        assert_eq!(r.status, Some(0), "{r}");
    }
    for vm in ["a", "b"] {
        wait_console(&d0, vm, "balloon: touched", 1);
    }
    let m = memory(&d0);
    assert_eq!(m["enabled"], false, "{m}");
    let whole: u64 = ["a", "b"]
        .iter()
        .map(|vm| n(world(&m, vm), "rss_bytes"))
        .sum();
    let rss_whole_b = n(world(&m, "b"), "rss_bytes");
    assert!(
        whole > 2 * 88 * MIB,
        "the guests' pools are not resident: {m}"
    );
    d0.stop_keeping_vmms();

    // The daemon again, with a pool that lacks SHORT for both whole and a reserve.
    let pool = whole + RESERVE - SHORT;
    let pool_arg = format!("{}K", pool / 1024);
    let d = Daemon::start_with(
        &dir,
        &["--host-memory-reserve", "32M", "--host-memory", &pool_arg],
    );
    // A allocates: it keeps (or gets back) all its memory, B lends.
    command(&d, "a", "b", "balloon: busy=80 MiB");
    let m = wait_report(&d, "a busy with all its memory, b lending", |m| {
        settled(m, "a", "b")
    });
    eprintln!("a busy, b idle: {m}");
    assert_eq!(m["enabled"], true, "{m}");
    assert_eq!(n(&m, "reserve_bytes"), RESERVE, "{m}");
    assert_eq!(n(&m, "host_memory_bytes"), pool, "{m}");
    assert!(
        m["last_action"].as_str().is_some_and(|a| !a.is_empty()),
        "{m}"
    );
    let (a, b) = (world(&m, "a"), world(&m, "b"));
    assert!(a["active_fraction"].as_f64().unwrap() > 0.9, "{m}");
    assert!(b["active_fraction"].as_f64().unwrap() < 0.75, "{m}");
    assert!(
        n(a, "borrowed_bytes") > 0 && n(b, "borrowed_bytes") == 0,
        "{m}"
    );
    counts_agree(&d, &m);
    assert!(n(b, "current_bytes") >= n(b, "floor_bytes"), "{m}");
    // B's VMM holds what it lent less (its balloon released the pages).
    let lent_b = n(b, "lent_bytes");
    let rss_b = n(world(&memory(&d), "b"), "rss_bytes");
    assert!(
        rss_b + lent_b <= rss_whole_b + 8 * MIB,
        "b lent {lent_b} bytes but its VMM went from {rss_whole_b} to {rss_b} bytes resident"
    );
    // The same on GET /v1/vms/{name} and in wv vm info, as documented.
    let doc = common::openapi::document("openapi.json");
    let schema = |name: &str| serde_json::json!({ "$ref": format!("#/components/schemas/{name}") });
    common::openapi::validate(&doc, &schema("HostMemory"), &m, "GET /v1/host/memory");
    let (status, body) = d.raw(b"GET /v1/vms/b HTTP/1.1\r\n\r\n");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    common::openapi::validate(&doc, &schema("World"), &v, "GET /v1/vms/b");
    assert!(v["memory"]["lent_bytes"].as_u64().unwrap() > 0, "{v}");
    let (status, metrics) = d.raw(b"GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, 200, "{metrics}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("wv_world_memory_lent_bytes{world=\"b\"")),
        "{metrics}"
    );
    assert!(metrics.contains("wv_host_memory_free_bytes "), "{metrics}");
    let r = d.wv(&["vm", "info", "b"]);
    assert!(r.stdout.contains("lending: shares"), "{r}");
    let r = d.wv(&["host", "memory"]);
    assert!(r.stdout.contains("policy on: reserve 32M"), "{r}");
    assert!(r.stdout.lines().any(|l| l.starts_with("b ")), "{r}");

    // The roles swap: the memory flows back from A to B.
    let rss_whole_a = n(world(&m, "a"), "rss_bytes");
    command(&d, "a", "i", "balloon: idle");
    command(&d, "b", "b", "balloon: busy=80 MiB");
    let m = wait_report(&d, "b busy with all its memory, a lending", |m| {
        settled(m, "b", "a")
    });
    eprintln!("roles swapped: {m}");
    let a = world(&m, "a");
    counts_agree(&d, &m);
    // Never below its floor.
    assert!(n(a, "current_bytes") >= n(a, "floor_bytes"), "{m}");
    let lent_a = n(a, "lent_bytes");
    let rss_a = n(world(&memory(&d), "a"), "rss_bytes");
    assert!(
        rss_a + lent_a <= rss_whole_a + 8 * MIB,
        "a lent {lent_a} bytes but its VMM went from {rss_whole_a} to {rss_a} bytes resident"
    );
    d.stop();
}
