//! The adversarial probe guest (issue 16, item 4; `probe.tests=attack`, guest/src/attack.rs):
//! a guest attacking its VMM the way a hostile kernel would, while another VM beside it runs an
//! ordinary workload in a loop and must keep passing. The attacked VMM must neither crash nor
//! hang, its exit status is the guest's, every attack ends in a counted error, an ignored
//! access or a device reset (the counters of `--stats=json` and `GET /vm/counters` show them),
//! and all of it happens under the default seccomp filter (kill): a forbidden system call
//! reached by an attack would end the VMM with status 208.

mod common;

use common::vmm::{call, Vmm};
use common::*;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// Every attack of the set, in the order the guest runs them.
const ATTACKS: [&str; 18] = [
    "ring-mmio",
    "ring-outside",
    "ring-wrap",
    "ring-loop",
    "ring-indirect",
    "ring-avail-jump",
    "notify-storm",
    "bar-ram",
    "bar-overlap",
    "bar-ecam",
    "bar-sizing",
    "cmd-toggle",
    "msix-garbage",
    "msix-vector",
    "msix-pba",
    "pv-bad",
    "port-scan",
    "mmio-hole",
];

/// The neighbour's workload: boot data, LAPIC timer interrupts, its own disk, CPL3 compute.
const NEIGHBOUR: &str = "boot,timer,blk,user";

fn disk(dir: &TempDir, name: &str) -> std::path::PathBuf {
    let mut d = vec![0u8; 1 << 20];
    d[..8].copy_from_slice(b"WVDISK01");
    dir.file(name, &d)
}

/// Runs the neighbour VM again and again (each run must pass) until `stop`; returns how many
/// runs there were. Its first run has booted when `booted` is signalled.
fn neighbour(dir: &TempDir, stop: Arc<AtomicBool>, booted: mpsc::Sender<()>) -> u64 {
    let img = disk(dir, "neighbour.img");
    let disk_arg = format!("path={},id=nb", img.display());
    let cmdline = format!("probe.tests={NEIGHBOUR}");
    let mut runs = 0;
    loop {
        let mut c = Command::new(wv_bin());
        c.args(["run", "--memory", "64M", "--disk", &disk_arg, "--cmdline"])
            .arg(&cmdline);
        if runs == 0 {
            // The first run signals once it has booted, so that the attack starts beside it.
            let mut child = spawn_until(c, "Worldvisor probe guest", Duration::from_secs(60));
            let _ = booted.send(());
            let st = child.wait().unwrap();
            assert_eq!(st.code(), Some(0), "the neighbour VM's first run failed");
        } else {
            let r = run_cmd(c, Duration::from_secs(120));
            assert_eq!(
                r.status,
                Some(0),
                "the neighbour VM failed beside the attack\n{r}"
            );
            for t in NEIGHBOUR.split(',') {
                r.assert_pass(t);
            }
        }
        runs += 1;
        if stop.load(Ordering::SeqCst) {
            return runs;
        }
    }
}

/// A device's entry in a stats or counters document.
fn device<'a>(doc: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    doc["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no device {name} in {doc}"))
}

fn counter(doc: &serde_json::Value, dev: &str, what: &str) -> u64 {
    device(doc, dev)[what]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {what} for {dev} in {doc}"))
}

/// The whole set, checked through `--stats=json` and the exit status.
fn full_set(dir: &TempDir) {
    let img = disk(dir, "attack.img");
    let sock = dir.path("attack.sock");
    let r = wv(&[
        "run",
        "--memory",
        "128M",
        "--disk",
        &format!("path={},id=root", img.display()),
        "--api-socket",
        sock.to_str().unwrap(),
        "--stats=json",
        "--cmdline",
        "probe.tests=attack",
    ]);
    // Neither crashed nor hung (run_cmd's timeout), no forbidden system call (208), and the
    // status is the guest's: 0, every attack contained and every device working after it.
    assert_eq!(r.status, Some(0), "{r}");
    assert!(!r.stderr.contains("SECCOMP"), "{r}");
    let pass = r.assert_pass("attack");
    assert!(pass.contains("attacks=18 failed=0"), "{pass}");
    for a in ATTACKS {
        let line = r
            .stdout
            .lines()
            .find(|l| l.contains(&format!("ATTACK {a} ")))
            .unwrap_or_else(|| panic!("no ATTACK {a} line\n{r}"));
        assert!(
            line.ends_with("rng=ok blk=ok done"),
            "{a}: {line}\n(the device check after each attack resets both devices and serves a request)"
        );
        assert!(
            !line.contains("SERVED="),
            "a hostile chain was served: {line}"
        );
    }
    let s = r.stats();
    // Hostile chains: 6 + 5 + 4 + 5 + 7 on virtio-rng, 12 + 10 + 8 + 2 + 1 on virtio-blk,
    // each completed empty and counted.
    assert_eq!(counter(&s, "virtio-rng", "bad_chains"), 27, "{s}");
    assert_eq!(counter(&s, "virtio-blk:root", "bad_chains"), 33, "{s}");
    for dev in ["virtio-rng", "virtio-blk:root"] {
        // Three available-index jumps each, each counted at least once (again at each
        // notification until the driver resets the device).
        assert!(counter(&s, dev, "ring_errors") >= 3, "{dev}: {s}");
        assert!(counter(&s, dev, "notifications") >= 100_000, "{dev}: {s}");
        assert!(counter(&s, dev, "resets") >= 50, "{dev}: {s}");
        // A request completed through MSI-X entry 0, which holds a garbage address (the
        // tables have two entries: vectors 2 and 3 read back as NO_VECTOR).
        assert!(counter(&s, dev, "bad_msi") >= 1, "{dev}: {s}");
    }
    // BARs moved onto RAM, the other device, the ECAM window and the interrupt controllers.
    assert!(counter(&s, "virtio-rng", "refused_bar_moves") >= 6, "{s}");
    assert!(
        counter(&s, "virtio-blk:root", "refused_bar_moves") >= 2,
        "{s}"
    );
    assert!(
        r.stderr
            .contains("which is taken or outside the PCI MMIO window"),
        "{r}"
    );
    // Port I/O on every port (4 accesses each, 4 ports skipped, most of them unassigned),
    // MMIO across the hole, call blocks the VMM cannot read.
    assert!(cause_count(&s, "io:unassigned") > 4 * 60_000, "{s}");
    assert!(cause_count(&s, "mmio:unassigned") > 10_000, "{s}");
    assert!(cause_count(&s, "hypercall:invalid") >= 10, "{s}");
}

/// Part of the set with the guest left idle afterwards, checked through `GET /vm/counters`
/// while the attacked VMM still runs.
fn counters_over_the_api(dir: &TempDir) {
    let img = disk(dir, "attack2.img");
    let sock = dir.path("attack2.sock");
    let mut vm = Vmm::run(&[
        "--memory",
        "128M",
        "--disk",
        &format!("path={},id=root", img.display()),
        "--api-socket",
        sock.to_str().unwrap(),
        "--cmdline",
        "probe.tests=attack,idle probe.attack=ring-mmio,ring-loop,ring-avail-jump,bar-ecam,pv-bad",
    ])
    .stderr()
    .timeout(Duration::from_secs(120))
    .spawn();
    let pass = vm.wait_line("PASS attack");
    assert!(pass.contains("attacks=5 failed=0"), "{pass}");
    vm.wait_line("idle: halted");
    let (st, c) = call(&sock, "GET", "/vm/counters", None);
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["state"], "running", "{c}");
    assert_eq!(counter(&c, "virtio-rng", "bad_chains"), 6 + 5, "{c}");
    assert_eq!(counter(&c, "virtio-blk:root", "bad_chains"), 12 + 2, "{c}");
    assert!(counter(&c, "virtio-rng", "ring_errors") >= 3, "{c}");
    assert!(counter(&c, "virtio-blk:root", "ring_errors") >= 3, "{c}");
    assert!(counter(&c, "virtio-rng", "refused_bar_moves") >= 4, "{c}");
    assert_eq!(call(&sock, "PUT", "/vm/shutdown", None).0, 204);
    let exit = vm.finish();
    let (status, stderr) = (exit.status, exit.stderr.join("\n"));
    assert_eq!(status, Some(128 + libc::SIGTERM), "{stderr}");
    assert!(!stderr.contains("SECCOMP"), "{stderr}");
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_hostile_guest_is_contained_and_the_vm_beside_it_does_not_notice() {
    need_kvm();
    let dir = TempDir::new("adversarial");
    let stop = Arc::new(AtomicBool::new(false));
    let (booted_tx, booted) = mpsc::channel();
    let nb = {
        let (stop, dir) = (stop.clone(), TempDir::new("adversarial-neighbour"));
        std::thread::spawn(move || neighbour(&dir, stop, booted_tx))
    };
    booted
        .recv_timeout(Duration::from_secs(60))
        .expect("the neighbour VM booted");
    let attacks = std::panic::catch_unwind(|| {
        full_set(&dir);
        counters_over_the_api(&dir);
    });
    stop.store(true, Ordering::SeqCst);
    let runs = nb.join();
    if let Err(e) = attacks {
        std::panic::resume_unwind(e);
    }
    let runs = runs.unwrap_or_else(|e| std::panic::resume_unwind(e));
    assert!(runs >= 1);
    eprintln!("the neighbour VM passed {runs} runs of {NEIGHBOUR} beside the attacks");
}
