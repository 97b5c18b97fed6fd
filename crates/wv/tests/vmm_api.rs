//! The VMM's control socket (`wv run --api-socket`): true pause and resume with the guest's
//! clock checked by the probe guest, the vCPUs provably stopped while paused, and bad requests
//! answered 4xx while the VM runs on.

mod common;

use common::vmm::{call, raw, Vmm};
use common::{need_kvm, wv_bin, TempDir};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The tests here run one at a time: a clock test measures gaps of milliseconds in guest time,
/// and another guest spinning on the same two CPUs would make them.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// KVM's exit counter of every vCPU, from `GET /vm/counters`.
fn kvm_exits(sock: &Path) -> Vec<u64> {
    let (st, c) = call(sock, "GET", "/vm/counters", None);
    assert_eq!(st, 200, "{c}");
    c["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["exits"].as_u64().expect("an exits counter"))
        .collect()
}

fn pause_resume(vcpus: &str) {
    need_kvm();
    let _one = serial();
    let dir = TempDir::new("vmm-pause");
    let sock = dir.path("api.sock");
    let mut vm = Vmm::start(&[
        "--vcpus",
        vcpus,
        "--api-socket",
        sock.to_str().unwrap(),
        "--cmdline",
        // A loaded 2-CPU host can keep a vCPU thread from its CPU for longer than the guest's
        // 10 ms tick: steps up to 100 ms pass, a tenth of the 1 s pause a leak would show.
        "console=ttyS0 probe.tests=clock probe.clockms=2500 probe.clockgap=100",
    ]);
    vm.wait_line("clock: running");
    assert_eq!(call(&sock, "GET", "/vm", None).1["state"], "running");
    assert_eq!(call(&sock, "PUT", "/vm/pause", None).0, 204);
    let (st, info) = call(&sock, "GET", "/vm", None);
    assert_eq!((st, info["state"].as_str()), (200, Some("paused")));
    // Paused means no vCPU enters the guest: KVM's own exit counters stand still while the
    // pause lasts (it lasts a second so that a clock that ran on would show it).
    let before = kvm_exits(&sock);
    std::thread::sleep(Duration::from_secs(1));
    let after = kvm_exits(&sock);
    if !before.is_empty() {
        assert_eq!(before, after, "vCPUs ran while paused");
    }
    assert_eq!(call(&sock, "PUT", "/vm/resume", None).0, 204);
    let (_, info) = call(&sock, "GET", "/vm", None);
    assert_eq!(info["state"], "running");
    let line = vm.wait_line("PASS clock");
    // The guest's kvmclock did not jump (the guest checked); its TSC follows the pause exactly
    // where KVM can offset it, which the VMM reports.
    let tsc_gap_us: u64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("tsc_gap="))
        .and_then(|v| v.strip_suffix("us"))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no tsc_gap in {line}"));
    match info["tsc_follows_pause"].as_bool() {
        Some(true) => assert!(tsc_gap_us < 10_000, "the TSC jumped: {line}"),
        Some(false) => {
            assert!(tsc_gap_us >= 900_000, "{line}");
            eprintln!("this host's KVM cannot offset the guest TSC: {line}");
        }
        None => panic!("the VMM did not say whether the TSC followed the pause: {info}"),
    }
    assert_eq!(vm.wait(), 0);
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn pause_stops_the_vcpus_and_the_guest_clock() {
    pause_resume("1");
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn pause_stops_every_vcpu_of_an_smp_guest() {
    pause_resume("2");
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn bad_requests_are_refused_and_the_vm_runs_on() {
    need_kvm();
    let _one = serial();
    let dir = TempDir::new("vmm-api-bad");
    let sock = dir.path("api.sock");
    let mut vm = Vmm::start(&[
        "--api-socket",
        sock.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 probe.tests=burn",
    ]);
    vm.wait_line("burn:");
    // A second VMM cannot take a live socket.
    let r = common::wv(&[
        "run",
        "--api-socket",
        sock.to_str().unwrap(),
        "--serial",
        "none",
    ]);
    // 200: a usage error (docs: wv's exit statuses).
    assert_eq!(r.status, Some(200), "{r}");
    assert!(r.stderr.contains("another process listens there"), "{r}");
    let cases: &[(&[u8], u16)] = &[
        (b"garbage\r\n\r\n", 400),
        (b"GET /nothing HTTP/1.1\r\n\r\n", 404),
        (b"GET /vm/pause HTTP/1.1\r\n\r\n", 405),
        (b"DELETE /vm HTTP/1.1\r\n\r\n", 405),
        (
            b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            400,
        ),
        (b"PUT /vm/resume HTTP/1.1\r\n\r\n", 409),
        (
            b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
            413,
        ),
        (b"GET /vm/%zz HTTP/1.1\r\n\r\n", 400),
    ];
    for (req, want) in cases {
        let (st, out) = raw(&sock, req);
        assert_eq!(st, *want, "{}: {out}", String::from_utf8_lossy(req));
        assert!(out.contains("{\"error\":"), "{out}");
    }
    let (st, out) = raw(&sock, b"GET /vm/pause HTTP/1.1\r\n\r\n");
    assert_eq!(st, 405);
    assert!(out.contains("Allow: PUT"), "{out}");
    // A client that sends half a request and stalls does not hold up the next one for long.
    let mut stalled = UnixStream::connect(&sock).unwrap();
    stalled.write_all(b"GET /vm HT").unwrap();
    let (st, _) = call(&sock, "GET", "/vm", None);
    assert_eq!(st, 200);
    drop(stalled);
    assert_eq!(call(&sock, "PUT", "/vm/pause", None).0, 204);
    assert_eq!(call(&sock, "PUT", "/vm/pause", None).0, 409);
    assert_eq!(call(&sock, "PUT", "/vm/resume", None).0, 204);
    assert_eq!(call(&sock, "GET", "/vm", None).1["state"], "running");
    // Shutdown ends the VM as SIGTERM does, and the socket goes with it.
    assert_eq!(call(&sock, "PUT", "/vm/shutdown", None).0, 204);
    assert_eq!(vm.wait(), 128 + libc::SIGTERM);
    assert!(!sock.exists(), "the API socket outlived the VMM");
}

fn snapshot(sock: &Path, dir: &Path) -> (u16, serde_json::Value) {
    let body = serde_json::json!({ "destination": dir }).to_string();
    let (st, out) = raw(
        sock,
        format!(
            "PUT /vm/snapshot HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
    (st, serde_json::from_str(body).unwrap_or_default())
}

/// Snapshot of a running guest mid-test (its virtio-rng device active, its LAPIC timer
/// running), then: the source runs on and passes; the snapshot restored in a new process resumes
/// the guest where it stopped (no second boot) and the guest's own checks pass there too.
fn snapshot_and_restore(vcpus: &str) {
    snapshot_and_restore_with(vcpus, &[]);
}

/// [`snapshot_and_restore`] with `extra` options for the source VM (kernel, devices).
fn snapshot_and_restore_with(vcpus: &str, extra: &[&str]) {
    need_kvm();
    let _one = serial();
    let dir = TempDir::new("vmm-snap");
    let sock = dir.path("api.sock");
    let snap = dir.path("snap");
    let mut args = vec![
        "--vcpus",
        vcpus,
        "--api-socket",
        sock.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 probe.tests=rng,clock,pci probe.clockms=2000 probe.clockgap=100",
    ];
    args.extend_from_slice(extra);
    let mut vm = Vmm::start(&args);
    let shared = extra.windows(2).any(|w| w == ["--memory-shared", "on"]);
    vm.wait_line("PASS rng");
    assert_eq!(ram_is_memfd(&vm), shared, "guest RAM in a memfd");
    vm.wait_line("clock: running");
    let (st, r) = snapshot(&sock, &snap);
    assert_eq!(st, 200, "{r}");
    assert!(r["memory_bytes"].as_u64().unwrap() > 0, "{r}");
    // A second snapshot into the same directory is refused; the first stays whole.
    assert_eq!(snapshot(&sock, &snap).0, 409);
    assert_eq!(call(&sock, "GET", "/vm", None).1["state"], "running");
    vm.wait_line("PASS clock");
    vm.wait_line("probe: summary passed=3 failed=0");
    assert_eq!(vm.wait(), 0);

    let mut back = Vmm::start(&["--restore", snap.to_str().unwrap()]);
    // Its first words are the end of the clock test it was in, not a boot banner.
    let first = back.wait_line("");
    assert_eq!(ram_is_memfd(&back), shared, "restored RAM in a memfd");
    assert!(
        first.starts_with("PASS clock"),
        "the restored VM did not resume mid-test: {first}"
    );
    back.wait_line("PASS pci");
    back.wait_line("probe: summary passed=3 failed=0");
    assert_eq!(back.wait(), 0);
}

/// Four vCPUs, the Linux boot protocol (bzImage) and a virtio-net device on a TAP besides the
/// virtio-rng: the net device's state (MAC, queues) goes with the snapshot and its TAP is
/// opened again by the restored VMM (the source has ended by then).
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_four_vcpu_bzimage_guest_with_a_nic_snapshots_and_restores() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(root, "this test creates a TAP device: run it as root");
    let dir = TempDir::new("vmm-snap-bz");
    let bz = common::image(&dir, "bzimage");
    let tap = format!("wvsnap{}", std::process::id() % 100_000);
    let net = format!("tap={tap},mac=52:54:00:5a:00:01");
    snapshot_and_restore_with("4", &["--kernel", bz.to_str().unwrap(), "--net", &net]);
    let _ = std::process::Command::new("ip")
        .args(["link", "del", &tap])
        .status();
}

/// Whether the VMM maps guest RAM from its memfd (`--memory-shared on`).
fn ram_is_memfd(vm: &Vmm) -> bool {
    std::fs::read_to_string(format!("/proc/{}/maps", vm.child.id()))
        .unwrap()
        .contains("memfd:wv-guest-ram")
}

/// Guest RAM shared (a memfd, as for a vhost-user backend): the snapshot reads it like any RAM
/// and the restored VM's RAM is shared again, holding the image's bytes.
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_guest_in_shared_memory_snapshots_and_restores() {
    snapshot_and_restore_with("1", &["--memory-shared", "on"]);
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_snapshot_restores_and_the_guest_resumes_where_it_stopped() {
    snapshot_and_restore("1");
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_snapshot_of_an_smp_guest_restores() {
    snapshot_and_restore("2");
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn bad_snapshots_are_one_line_errors_and_nothing_starts() {
    need_kvm();
    let _one = serial();
    let dir = TempDir::new("vmm-badsnap");
    let sock = dir.path("api.sock");
    let snap = dir.path("snap");
    let mut vm = Vmm::start(&[
        "--api-socket",
        sock.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 probe.tests=burn",
    ]);
    vm.wait_line("burn:");
    assert_eq!(snapshot(&sock, &snap).0, 200);
    assert_eq!(call(&sock, "PUT", "/vm/shutdown", None).0, 204);
    vm.wait();
    let state = std::fs::read(snap.join("state")).unwrap();
    let restore = |name: &str, bytes: &[u8]| {
        let d = dir.path(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("state"), bytes).unwrap();
        std::fs::copy(snap.join("memory"), d.join("memory")).unwrap();
        common::wv(&["run", "--restore", d.to_str().unwrap(), "--serial", "stdio"])
    };
    let mut newer = state.clone();
    newer[8] = 9;
    let mut flipped = state.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 1;
    for (name, bytes, says) in [
        ("truncated", &state[..state.len() / 2], "truncated"),
        ("corrupt", &flipped[..], "corrupt"),
        ("newer", &newer[..], "format version 9"),
        (
            "foreign",
            &b"\x7fELF not a snapshot at all"[..],
            "not a Worldvisor snapshot",
        ),
    ] {
        let r = restore(name, bytes);
        // 202: an image that cannot be used.
        assert_eq!(r.status, Some(202), "{name}: {r}");
        let err: Vec<&str> = r.stderr.lines().collect();
        assert_eq!(err.len(), 1, "{name}: {r}");
        assert!(err[0].contains(says), "{name}: {r}");
        assert!(r.stdout.is_empty(), "{name}: the guest ran: {r}");
    }
    // A memory file of the wrong size.
    let d = dir.path("short-memory");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("state"), &state).unwrap();
    std::fs::write(d.join("memory"), [0u8; 4096]).unwrap();
    let r = common::wv(&["run", "--restore", d.to_str().unwrap()]);
    assert_eq!(r.status, Some(202), "{r}");
    assert!(r.stderr.contains("memory image holds 4096 bytes"), "{r}");
    // The VM's definition comes from the snapshot.
    let r = common::wv(&["run", "--restore", snap.to_str().unwrap(), "--memory", "1G"]);
    assert_eq!(r.status, Some(200), "{r}");
    assert!(
        r.stderr
            .contains("--restore takes the VM from the snapshot"),
        "{r}"
    );
}

/// A network namespace with TAP `tap0` in it (a clone needs a TAP of the same name as its
/// snapshot's, so each runs in a namespace of its own). Needs root.
struct NetNs(String);

impl NetNs {
    fn new(tag: &str) -> NetNs {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the clone tests need root to create namespaces and TAP devices"
        );
        let ns = NetNs(format!("wvc-{tag}-{}", std::process::id()));
        for args in [
            vec!["netns", "add", &ns.0],
            vec!["-n", &ns.0, "tuntap", "add", "dev", "tap0", "mode", "tap"],
        ] {
            let st = Command::new("ip")
                .args(&args)
                .status()
                .expect("ip (iproute2)");
            assert!(st.success(), "ip {args:?} failed");
        }
        ns
    }

    /// `wv run ARGS` inside the namespace.
    fn run(&self, args: &[&str]) -> Vmm {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0])
            .arg(wv_bin())
            .arg("run")
            .args(args);
        Vmm::command(c).spawn()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The value of `key=` in a probe line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in '{line}'"))
}

/// The JSON section `name` of a snapshot's state file (format in docs/SNAPSHOT.md).
fn state_section(snap: &Path, name: &str) -> serde_json::Value {
    let b = std::fs::read(snap.join("state")).unwrap();
    let mut at = 16;
    while at < b.len() {
        let n = &b[at..at + 16];
        let len =
            usize::try_from(u64::from_le_bytes(b[at + 16..at + 24].try_into().unwrap())).unwrap();
        let data = &b[at + 28..at + 28 + len];
        if n.split(|&c| c == 0).next() == Some(name.as_bytes()) {
            return serde_json::from_slice(data).unwrap();
        }
        at += 28 + len;
    }
    panic!("no section {name} in {}", snap.display());
}

/// The MACs of the virtio-net devices in a snapshot, in slot order.
fn snapshot_macs(snap: &Path) -> Vec<[u8; 6]> {
    state_section(snap, "devices")["pci"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| serde_json::from_value(d["state"]["device"]["Net"]["mac"].clone()).ok())
        .collect()
}

/// A snapshot of a guest waiting for its generation id to change, then: a plain restore and two
/// clones of it. Each resumed guest sees a generation id of its own (not the source's, not each
/// other's) and a restore count of 1; the plain restore keeps the source's MAC, a clone gets a
/// new locally administered one, or the one `--mac` gives.
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn clones_and_restores_get_identities_of_their_own() {
    need_kvm();
    let _one = serial();
    let dir = TempDir::new("vmm-clone-id");
    let sock = dir.path("api.sock");
    let snap = dir.path("snap");
    const SOURCE_MAC: [u8; 6] = [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc];
    let src_ns = NetNs::new("src");
    let mut src = src_ns.run(&[
        "--api-socket",
        sock.to_str().unwrap(),
        "--net",
        "tap=tap0,mac=52:54:00:aa:bb:cc",
        "--cmdline",
        "console=ttyS0 probe.tests=genid,idle probe.genid=wait",
    ]);
    let line = src.wait_line("genid: id=");
    let source_id = field(&line, "id").to_string();
    assert_eq!(field(&line, "restores"), "0", "{line}");
    assert_eq!(snapshot(&sock, &snap).0, 200);
    assert_eq!(call(&sock, "PUT", "/vm/shutdown", None).0, 204);
    src.wait();
    assert_eq!(snapshot_macs(&snap), [SOURCE_MAC]);

    let mut ids = vec![source_id.clone()];
    let given = [0x52, 0x54, 0, 0, 0, 0x42];
    for (tag, extra, want_mac) in [
        ("restore", &[][..], Some(SOURCE_MAC)),
        ("clone0", &["--clone"][..], None),
        (
            "clone1",
            &["--clone", "--mac", "0=52:54:00:00:00:42"][..],
            Some(given),
        ),
    ] {
        let ns = NetNs::new(tag);
        let api = dir.path(&format!("{tag}.sock"));
        let mut args = vec![
            "--restore",
            snap.to_str().unwrap(),
            "--api-socket",
            api.to_str().unwrap(),
        ];
        args.extend(extra);
        let mut vm = ns.run(&args);
        let line = vm.wait_line("PASS genid");
        assert_eq!(field(&line, "was"), source_id, "{tag}: {line}");
        assert_eq!(field(&line, "restores"), "1", "{tag}: {line}");
        let id = field(&line, "id").to_string();
        assert!(
            !ids.contains(&id),
            "{tag} has the generation id of another VM: {line}"
        );
        ids.push(id);
        vm.wait_line("idle:");
        // What MAC its device holds now: from a snapshot of it.
        let its = dir.path(&format!("{tag}.snap"));
        assert_eq!(snapshot(&api, &its).0, 200);
        let macs = snapshot_macs(&its);
        assert_eq!(macs.len(), 1, "{tag}");
        match want_mac {
            Some(m) => assert_eq!(macs[0], m, "{tag}"),
            None => {
                assert_ne!(macs[0], SOURCE_MAC, "{tag} kept the source's MAC");
                assert_eq!(
                    macs[0][0] & 3,
                    2,
                    "{tag}: {:02x?} is not local unicast",
                    macs[0]
                );
            }
        }
        // A snapshot of the clone counts the restore that made it.
        assert_eq!(state_section(&its, "machine")["restores"], 1, "{tag}");
        assert_eq!(call(&api, "PUT", "/vm/shutdown", None).0, 204);
        assert_eq!(vm.wait(), 128 + libc::SIGTERM, "{tag}");
    }
    // A MAC for a device the VM does not have: one line, nothing started.
    let r = common::wv(&[
        "run",
        "--restore",
        snap.to_str().unwrap(),
        "--clone",
        "--mac",
        "1=52:54:00:00:00:43",
    ]);
    assert_eq!(r.status, Some(200), "{r}");
    assert!(r.stderr.contains("has 1 network devices"), "{r}");
    assert!(r.stdout.is_empty(), "{r}");
}

/// `Pss:` and `Rss:` of a process, in KiB (/proc/PID/smaps_rollup).
fn pss_rss_kib(pid: u32) -> (u64, u64) {
    let t = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let kib = |key: &str| -> u64 {
        t.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in smaps_rollup of {pid}"))
    };
    (kib("Pss:"), kib("Rss:"))
}

/// Four clones of one snapshot of a 256 MiB guest that filled 160 MiB, each having read all of
/// it back after the restore: they share those pages (the snapshot's memory file, mapped
/// privately, through the page cache), so the sum of their proportional set sizes stays well
/// below four times what each has resident.
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn clones_share_the_memory_of_their_snapshot() {
    need_kvm();
    let _one = serial();
    const N: usize = 4;
    const TOUCHED_MIB: u64 = 160;
    let dir = TempDir::new("vmm-clone-mem");
    let sock = dir.path("api.sock");
    let snap = dir.path("snap");
    let mut src = Vmm::start(&[
        "--memory",
        "256M",
        "--api-socket",
        sock.to_str().unwrap(),
        "--cmdline",
        &format!("console=ttyS0 probe.tests=genid,idle probe.genid=wait probe.touch={TOUCHED_MIB}"),
    ]);
    src.wait_line("genid: id=");
    let (st, r) = snapshot(&sock, &snap);
    assert_eq!(st, 200, "{r}");
    assert!(
        r["memory_bytes"].as_u64().unwrap() >= TOUCHED_MIB << 20,
        "{r}"
    );
    assert_eq!(call(&sock, "PUT", "/vm/shutdown", None).0, 204);
    src.wait();

    let mut clones: Vec<Vmm> = (0..N)
        .map(|_| Vmm::start(&["--restore", snap.to_str().unwrap(), "--clone"]))
        .collect();
    for c in &mut clones {
        // The guest has read every page it wrote before the snapshot, and idles.
        let line = c.wait_line("PASS genid");
        assert_eq!(
            field(&line, "touched"),
            format!("{TOUCHED_MIB}MiB"),
            "{line}"
        );
        c.wait_line("idle:");
    }
    let sizes: Vec<(u64, u64)> = clones.iter().map(|c| pss_rss_kib(c.child.id())).collect();
    let pss: u64 = sizes.iter().map(|s| s.0).sum();
    let touched_kib = TOUCHED_MIB << 10;
    eprintln!(
        "{N} clones, {TOUCHED_MIB} MiB touched each: PSS+RSS per clone (KiB) {sizes:?}; sum of PSS {pss} KiB, \
         {N} x touched {} KiB",
        N as u64 * touched_kib
    );
    for (p, r) in &sizes {
        assert!(
            *r >= touched_kib,
            "a clone does not have the touched memory resident: rss {r} KiB, pss {p}"
        );
    }
    assert!(
        pss < N as u64 * touched_kib / 2,
        "the clones do not share their snapshot's memory: PSS sum {pss} KiB for {N} x {touched_kib} KiB"
    );
}
