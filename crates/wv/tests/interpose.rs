//! Interposition end to end (docs/DEVICES.md, "Interposition"): real `wv vswitch`, `wv storage`
//! and `wv run` processes, probe guests, and a vhost-user device's data path switched between
//! direct (the backend reads the guest's rings) and interposed (the VMM's shadow rings in
//! between) while the guest keeps its traffic going. Counts are checked at both ends, the
//! capture read back with `tcpdump -r`, the disk's data read back by the guest.

mod common;
use common::vmm::{call, wait_for_socket};
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::lines::{Proc, WAIT};

/// `wv vswitch` with ports lan/a and lan/b, once it serves.
fn switch(dir: &Path) -> Proc {
    let mut c = Command::new(wv_bin());
    c.args(["vswitch", "--socket-dir", dir.to_str().unwrap()])
        .args(["--port", "lan/a", "--port", "lan/b"]);
    let mut p = Proc::spawn(c, true);
    p.wait_line("wv vswitch: serving");
    p
}

/// The switch's counters of port lan/`port`.
fn port_stats(dir: &Path, port: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(dir.join("control.sock")).unwrap();
    s.write_all(b"stats\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    v["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["network"] == "lan" && p["port"] == port)
        .cloned()
        .unwrap_or_else(|| panic!("no port lan/{port} in {v}"))
}

/// A probe guest on switch port lan/`port`.
fn guest(dir: &Path, port: &str, mac: &str, extra: &[&str], cmdline: &str) -> Command {
    let mut c = Command::new(wv_bin());
    c.args([
        "run",
        "--net",
        &format!(
            "vhost-user={},mac={mac},id=net0",
            dir.join("lan").join(format!("{port}.sock")).display()
        ),
        "--cmdline",
        cmdline,
    ])
    .args(extra);
    c
}

/// `PUT /vm/device-path` on `api`: the answer's status and body.
fn switch_path(
    api: &Path,
    id: &str,
    path: &str,
    capture: Option<&Path>,
) -> (u16, serde_json::Value) {
    let mut body = serde_json::json!({ "id": id, "path": path });
    if let Some(c) = capture {
        body["capture"] = c.to_str().unwrap().into();
    }
    call(api, "PUT", "/vm/device-path", Some(&body))
}

/// The device's path status from `GET /vm`.
fn path_status(api: &Path, id: &str) -> serde_json::Value {
    let (st, v) = call(api, "GET", "/vm", None);
    assert_eq!(st, 200, "{v}");
    v["device_paths"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no device '{id}' in {v}"))
}

/// Waits until `f()` reaches `want`, polling (the counters move with the guest's traffic).
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < end, "{what} within {WAIT:?}");
        std::thread::yield_now();
    }
}

/// `tcpdump -nr FILE`: one line per frame.
fn tcpdump(file: &Path) -> Vec<String> {
    let out = Command::new("tcpdump")
        .arg("-nr")
        .arg(file)
        .output()
        .expect("tcpdump is needed (apt-get install tcpdump)");
    assert!(
        out.status.success(),
        "tcpdump -r {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Round trips (direct -> interposed -> direct, two switches each) of the path-switching
/// tests: 50, the 100 switches (their stalls and rates are in docs/PERFORMANCE.md),
/// or `INTERPOSE_ROUNDS`; the guests' workloads grow with it.
fn rounds() -> usize {
    std::env::var("INTERPOSE_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .filter(|&r| r > 0)
        .unwrap_or(50)
}

/// Operations per second over `d`.
fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

/// Two probe guests on a switch ping each other continuously (one request at a time, each
/// answered) while one's NIC switches direct -> interposed (with a capture) -> direct
/// [`rounds`] times: every frame is counted at both guests and at the switch (nothing lost or
/// duplicated), each capture holds exactly the frames the VMM moved while interposed, all of
/// them the guests' ICMP between the two addresses, readable by `tcpdump -r`.
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_nic_switches_paths_under_continuous_traffic_without_losing_a_frame() {
    need_kvm();
    let rounds = rounds();
    // Enough for every round (each takes about 25 echo requests) with a margin, and not so
    // many that the pinger's own budget runs out at this host's ~60 requests a second.
    let pings: u64 = (40 * rounds as u64).max(800);
    let dir = TempDir::new("interpose-net");
    let sw = switch(&dir.0);
    let mut peer = Proc::spawn(
        guest(
            &dir.0,
            "b",
            "52:54:00:85:00:0b",
            &[],
            &format!("probe.tests=netpeer probe.ip=10.85.0.2 probe.echoes={pings}"),
        ),
        false,
    );
    peer.wait_line("netpeer: listening");
    let api = dir.path("a.api");
    let mut pinger = Proc::spawn(
        guest(
            &dir.0,
            "a",
            "52:54:00:85:00:0a",
            &["--api-socket", api.to_str().unwrap()],
            &format!("probe.tests=net probe.net=10.85.0.1,10.85.0.2 probe.pings={pings}"),
        ),
        false,
    );
    wait_for_socket(&api, WAIT);
    pinger.wait_line("Worldvisor probe guest");
    // The first echo request has gone through directly.
    wait_until("the pinger's traffic through the switch", || {
        pinger.alive();
        port_stats(&dir.0, "a")["tx_frames"].as_u64().unwrap() > 10
    });
    let mut pauses = Vec::new();
    let mut captured_total = 0;
    // Frames moved and time spent on each path, for the rates printed at the end.
    let (mut on_shadow, mut on_direct) = ((0, Duration::ZERO), (0, Duration::ZERO));
    for round in 0..rounds {
        let pcap = dir.path(&format!("round{round}.pcap"));
        pinger.alive();
        let t_in = Instant::now();
        let (st, v) = switch_path(&api, "net0", "interposed", Some(&pcap));
        assert_eq!(st, 200, "round {round}: {v}");
        assert_eq!(v["path"], "interposed", "{v}");
        assert_eq!(
            v["active"], true,
            "the guest's driver still runs the NIC: {v}"
        );
        pauses.push(v["last_pause_us"].as_u64().unwrap());
        let done0 = v["completed"].as_u64().unwrap();
        let captured0 = v["captured"].as_u64().unwrap();
        wait_until("completions through the shadow rings", || {
            pinger.alive();
            let (st, v) = call(&api, "GET", "/vm", None);
            if st != 200 {
                pinger.ended(&format!(
                    "GET /vm: {st} {v}; port a {}, port b {}",
                    port_stats(&dir.0, "a"),
                    port_stats(&dir.0, "b")
                ));
            }
            let d = v["device_paths"][0].clone();
            d["completed"].as_u64().unwrap() >= done0 + 10
        });
        let (st, v) = switch_path(&api, "net0", "direct", None);
        assert_eq!(st, 200, "round {round}: {v}");
        assert_eq!(v["path"], "direct", "{v}");
        assert_eq!(v["capture"], serde_json::Value::Null, "{v}");
        pauses.push(v["last_pause_us"].as_u64().unwrap());
        // Every completion moved while interposed is one frame (no mergeable buffers here),
        // and the capture holds each.
        let moved = v["completed"].as_u64().unwrap() - done0;
        on_shadow = (on_shadow.0 + moved, on_shadow.1 + t_in.elapsed());
        let captured = v["captured"].as_u64().unwrap() - captured0;
        assert_eq!(captured, moved, "round {round}: {v}");
        let frames = tcpdump(&pcap);
        assert_eq!(frames.len() as u64, captured, "round {round}: {frames:#?}");
        for f in &frames {
            assert!(
                f.contains("ICMP echo request") || f.contains("ICMP echo reply"),
                "round {round}: an unexpected frame in the capture: {f}"
            );
            assert!(f.contains("10.85.0."), "{f}");
        }
        captured_total += captured;
        // Some traffic directly before the next switch.
        let (t_out, tx0) = (
            Instant::now(),
            port_stats(&dir.0, "a")["tx_frames"].as_u64().unwrap(),
        );
        let mut tx = tx0;
        wait_until("traffic on the direct path", || {
            pinger.alive();
            tx = port_stats(&dir.0, "a")["tx_frames"].as_u64().unwrap();
            tx >= tx0 + 20
        });
        on_direct = (on_direct.0 + (tx - tx0), on_direct.1 + t_out.elapsed());
    }
    let (st, out) = pinger.finish();
    assert_eq!(st, Some(0), "{out}");
    assert!(
        out.contains(&format!("icmp=ok pings={pings} other=0")),
        "the pinger saw a lost or extra frame: {out}"
    );
    let (st, out) = peer.finish();
    assert_eq!(st, Some(0), "{out}");
    assert!(
        out.contains(&format!(
            "PASS netpeer arp=1 icmp={pings} frames={}",
            pings + 1
        )),
        "{out}"
    );
    // At the switch: the ARP request and every echo request out of port a, the ARP reply
    // and every echo reply into it, nothing dropped.
    let a = port_stats(&dir.0, "a");
    assert_eq!(a["tx_frames"], pings + 1, "{a}");
    assert_eq!(a["rx_frames"], pings + 1, "{a}");
    for k in ["dropped_malformed", "dropped_no_buffer", "dropped_isolated"] {
        assert_eq!(a[k], 0, "{k}: {a}");
    }
    assert!(captured_total >= 20 * rounds as u64 / 2, "{captured_total}");
    let worst = *pauses.iter().max().unwrap();
    eprintln!(
        "interpose: {} switches, queue pause median {} us, worst {worst} us; {captured_total} frames captured; \
         port a's frames/s (one echo request at a time): interposed {:.0}, direct {:.0}",
        pauses.len(),
        median(&mut pauses.clone()),
        rate(on_shadow.0, on_shadow.1),
        rate(on_direct.0, on_direct.1),
    );
    drop(sw);
}

/// A `wv storage` process serving one raw image as disk `root`, killed on drop.
struct Storage {
    proc: Proc,
    dir: PathBuf,
}

impl Storage {
    fn start(dir: &Path, image: &Path) -> Storage {
        Storage::start_with(dir, image, &[])
    }

    /// With more `--disk` arguments.
    fn start_with(dir: &Path, image: &Path, more: &[String]) -> Storage {
        let mut c = Command::new(wv_bin());
        c.args(["storage", "--socket-dir", dir.to_str().unwrap()])
            .args(["--disk", &format!("root=path={}", image.display())]);
        for d in more {
            c.args(["--disk", d]);
        }
        let mut proc = Proc::spawn(c, true);
        proc.wait_line("wv storage: serving");
        Storage {
            proc,
            dir: dir.to_path_buf(),
        }
    }

    /// Disk `root`'s counters.
    fn root(&self) -> serde_json::Value {
        let mut s = UnixStream::connect(self.dir.join("control.sock")).unwrap();
        writeln!(s, "stats").unwrap();
        let mut out = String::new();
        BufReader::new(s).read_line(&mut out).unwrap();
        let st: serde_json::Value = serde_json::from_str(&out).unwrap();
        st["disks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == "root")
            .cloned()
            .unwrap_or_else(|| panic!("no disk root in {st}"))
    }
}

/// A probe guest writes and reads back a pattern, sector after sector, on a disk of `wv
/// storage` while its data path switches direct -> interposed (with a trace) -> direct
/// [`rounds`] times: the guest finds every sector intact, the service served exactly the requests the
/// guest made (none lost, none twice), and each trace has one line per request the VMM moved
/// while interposed, each a read or write of one sector.
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_disk_switches_paths_under_writes_and_reads_with_its_data_intact() {
    need_kvm();
    let rounds = rounds();
    // Enough that the guest is still writing when the last round ends (a round takes about
    // 30 requests and the guest makes ~200 a second here), not so many that it goes on long.
    let loops: u64 = (80 * rounds as u64).max(1500);
    let dir = TempDir::new("interpose-blk");
    let image = disk_image(&dir, "root.img", 1 << 20);
    let st = Storage::start(&dir.path("s"), &image);
    let api = dir.path("vm.api");
    let mut c = Command::new(wv_bin());
    c.args([
        "run",
        "--disk",
        &format!(
            "vhost-user={},id=disk0",
            dir.path("s").join("root.sock").display()
        ),
        "--api-socket",
        api.to_str().unwrap(),
        "--cmdline",
        &format!("probe.tests=blk probe.blkloops={loops} probe.blkseed=7"),
    ]);
    let mut vm = Proc::spawn(c, false);
    wait_for_socket(&api, WAIT);
    vm.wait_line("Worldvisor probe guest");
    wait_until("the guest's requests through the service", || {
        st.root()["requests"].as_u64().unwrap() > 10
    });
    // A trace that cannot be written: refused, and the disk stays direct.
    let nowhere = dir.path("no-such-dir").join("x.trace");
    let (s, v) = switch_path(&api, "disk0", "interposed", Some(&nowhere));
    assert_eq!(s, 422, "{v}");
    assert_eq!(path_status(&api, "disk0")["path"], "direct");
    let mut pauses = Vec::new();
    let (mut on_shadow, mut on_direct) = ((0, Duration::ZERO), (0, Duration::ZERO));
    for round in 0..rounds {
        let trace = dir.path(&format!("round{round}.trace"));
        let t_in = Instant::now();
        let (s, v) = switch_path(&api, "disk0", "interposed", Some(&trace));
        assert_eq!(s, 200, "round {round}: {v}");
        assert_eq!(
            (&v["path"], &v["active"]),
            (&"interposed".into(), &true.into()),
            "{v}"
        );
        assert_eq!(v["capture_kind"], "trace", "{v}");
        pauses.push(v["last_pause_us"].as_u64().unwrap());
        let done0 = v["completed"].as_u64().unwrap();
        wait_until("requests through the shadow ring", || {
            path_status(&api, "disk0")["completed"].as_u64().unwrap() >= done0 + 10
        });
        if round == 2 {
            // Paused while interposed: the shadow side stops too; no switch meanwhile; a
            // snapshot of the VM in that state; the traffic goes on after the resume.
            let (s, v) = call(&api, "PUT", "/vm/pause", None);
            assert_eq!(s, 204, "{v}");
            let (s, v) = switch_path(&api, "disk0", "direct", None);
            assert_eq!(s, 409, "{v}");
            assert!(v["error"].as_str().unwrap().contains("paused"), "{v}");
            let snap = dir.path("snap");
            let body = serde_json::json!({"destination": snap, "allow_raw_disk": true});
            let (s, v) = call(&api, "PUT", "/vm/snapshot", Some(&body));
            assert_eq!(s, 200, "{v}");
            let (s, v) = call(&api, "PUT", "/vm/resume", None);
            assert_eq!(s, 204, "{v}");
            let d0 = path_status(&api, "disk0")["completed"].as_u64().unwrap();
            wait_until("requests through the shadow ring after the resume", || {
                path_status(&api, "disk0")["completed"].as_u64().unwrap() >= d0 + 10
            });
        }
        let (s, v) = switch_path(&api, "disk0", "direct", None);
        assert_eq!(s, 200, "round {round}: {v}");
        assert_eq!(v["path"], "direct", "{v}");
        pauses.push(v["last_pause_us"].as_u64().unwrap());
        let moved = v["completed"].as_u64().unwrap() - done0;
        if round != 2 {
            // (Round 2 spends part of its time paused.)
            on_shadow = (on_shadow.0 + moved, on_shadow.1 + t_in.elapsed());
        }
        let text = std::fs::read_to_string(&trace).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len() as u64, moved, "round {round}: {text}");
        for l in &lines {
            assert!(
                (l.contains(" op=write ") || l.contains(" op=read "))
                    && l.contains(" len=512 ")
                    && l.contains(" status=0")
                    && l.contains("latency_us="),
                "round {round}: {l}"
            );
        }
        let (t_out, r0) = (Instant::now(), st.root()["requests"].as_u64().unwrap());
        let mut r = r0;
        wait_until("requests on the direct path", || {
            r = st.root()["requests"].as_u64().unwrap();
            r >= r0 + 20
        });
        on_direct = (on_direct.0 + (r - r0), on_direct.1 + t_out.elapsed());
    }
    let (code, out) = vm.finish();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!(
            "PASS blk disks=1 root:sectors=2048,magic,loops={loops},rw-ok"
        )),
        "{out}"
    );
    // GET_ID, sector 0, a write, a flush, its read back, LOOPS writes and reads, one read past
    // the end: each served once.
    let d = st.root();
    assert_eq!(d["requests"], 6 + 2 * loops, "{d}");
    assert_eq!(d["dropped"], 0, "{d}");
    eprintln!(
        "interpose (disk): {} switches, queue pause median {} us, worst {} us; requests/s (one \
         512-byte request at a time): interposed {:.0}, direct {:.0}",
        pauses.len(),
        median(&mut pauses.clone()),
        pauses.iter().max().unwrap(),
        rate(on_shadow.0, on_shadow.1),
        rate(on_direct.0, on_direct.1),
    );
    drop(st.proc);
}

/// A guest that posts bad chains (outside RAM, loops) to its disk while the VMM is
/// interposed: each is refused before the backend sees it and counted, the device asks for a
/// reset (which the guest does, and the disk works again), and the VMM runs on.
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn bad_chains_while_interposed_are_counted_and_never_reach_the_backend() {
    need_kvm();
    let dir = TempDir::new("interpose-bad");
    let image = disk_image(&dir, "root.img", 1 << 20);
    let st = Storage::start(&dir.path("s"), &image);
    let api = dir.path("vm.api");
    let mut c = Command::new(wv_bin());
    c.args([
        "run",
        "--disk",
        &format!(
            "vhost-user={},id=disk0",
            dir.path("s").join("root.sock").display()
        ),
        "--api-socket",
        api.to_str().unwrap(),
        "--cmdline",
        "probe.tests=blk,attack,idle probe.blkloops=3000 probe.attack=ring-outside,ring-loop",
    ]);
    let mut vm = Proc::spawn(c, false);
    wait_for_socket(&api, WAIT);
    vm.wait_line("Worldvisor probe guest");
    wait_until("the guest's requests through the service", || {
        st.root()["requests"].as_u64().unwrap() > 10
    });
    let (s, v) = switch_path(&api, "disk0", "interposed", None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["active"], true, "{v}");
    // The blk test's loops end (its line), then the attacks run, interposed all along.
    let pass = vm.wait_line("PASS blk");
    assert!(pass.contains("loops=3000"), "{pass}");
    let pass = vm.wait_line(" attack attacks=");
    assert!(pass.contains("PASS attack attacks=2 failed=0"), "{pass}");
    vm.wait_line("idle: halted");
    let d = path_status(&api, "disk0");
    assert_eq!(d["path"], "interposed", "{d}");
    assert!(d["bad_chains"].as_u64().unwrap() >= 5, "{d}");
    let (s, c) = call(&api, "GET", "/vm/counters", None);
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["state"], "running", "{c}");
    let blk = c["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "vhost-user-blk:disk0")
        .cloned()
        .unwrap_or_else(|| panic!("{c}"));
    assert_eq!(blk["bad_chains"], d["bad_chains"], "{blk} {d}");
    // The service saw only good requests: none dropped as malformed.
    assert_eq!(st.root()["dropped"], 0, "{}", st.root());
    let (s, v) = call(&api, "PUT", "/vm/shutdown", None);
    assert_eq!(s, 204, "{v}");
    let (code, out) = vm.finish();
    assert_ne!(code, None, "{out}");
}

/// A vhost-user disk hot-plugged at runtime gets its shadow rings too (a memfd made on the
/// control thread, under its system-call filter): the guest uses the new disk, and it
/// switches to the interposed path and back.
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_hot_plugged_vhost_user_disk_can_be_interposed() {
    need_kvm();
    let dir = TempDir::new("interpose-hot");
    let image = disk_image(&dir, "root.img", 1 << 20);
    let hot = disk_image(&dir, "hot.img", 1 << 20);
    let st = Storage::start_with(
        &dir.path("s"),
        &image,
        &[format!("hot=path={}", hot.display())],
    );
    let api = dir.path("vm.api");
    let mut c = Command::new(wv_bin());
    c.args([
        "run",
        "--disk",
        &format!(
            "vhost-user={},id=disk0",
            dir.path("s").join("root.sock").display()
        ),
        "--api-socket",
        api.to_str().unwrap(),
        "--cmdline",
        "probe.tests=hotplug probe.hotplug_cycles=1",
    ]);
    let mut vm = Proc::spawn(c, false);
    vm.wait_line("hotplug: ready");
    let dev = serde_json::json!({"disk": {
        "path": dir.path("s").join("hot.sock"),
        "vhost_user": true,
        "id": "hot0"
    }});
    let (s, a) = call(&api, "PUT", "/vm/device-add", Some(&dev));
    assert_eq!(s, 200, "{a}");
    let slot = a["slot"].as_u64().unwrap();
    let line = vm.wait_line(&format!("hotplug: added slot={slot} "));
    assert!(line.ends_with("rw-ok"), "{line}");
    let (s, v) = switch_path(&api, "hot0", "interposed", None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["path"], "interposed", "{v}");
    let (s, v) = switch_path(&api, "hot0", "direct", None);
    assert_eq!(s, 200, "{v}");
    let d = path_status(&api, "hot0");
    assert_eq!(d["path"], "direct", "{d}");
    assert!(st.root()["requests"].as_u64().is_some());
}

/// The switch is killed and started again while a guest's NIC is interposed: the VMM connects
/// again and programs the new switch with its shadow rings, the NIC stays interposed, and the
/// guest, never reset, answers the next ping through the new switch.
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn an_interposed_nic_carries_on_through_a_switch_restart() {
    need_kvm();
    let dir = TempDir::new("interpose-restart");
    let sw = switch(&dir.0);
    let api = dir.path("b.api");
    let mut peer = Proc::spawn(
        guest(
            &dir.0,
            "b",
            "52:54:00:88:00:0b",
            &["--api-socket", api.to_str().unwrap()],
            "probe.tests=netpeer probe.ip=10.88.0.2 probe.echoes=3",
        ),
        false,
    );
    wait_for_socket(&api, WAIT);
    peer.wait_line("netpeer: listening");
    peer.alive();
    let (st, v) = switch_path(&api, "net0", "interposed", None);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["active"], true, "{v}");
    let ping = || {
        run_cmd(
            guest(
                &dir.0,
                "a",
                "52:54:00:88:00:0a",
                &[],
                "probe.tests=net probe.net=10.88.0.1,10.88.0.2",
            ),
            WAIT,
        )
    };
    let r = ping();
    assert!(r.assert_pass("net").contains("arp=ok icmp=ok"), "{r}");
    let done = path_status(&api, "net0")["completed"].as_u64().unwrap();
    assert!(
        done >= 4,
        "the exchange went through the shadow rings: {done}"
    );
    drop(sw);
    let _sw = switch(&dir.0);
    wait_until("the interposed VMM connected to the new switch", || {
        port_stats(&dir.0, "b")["connected"] == true
    });
    let r = ping();
    assert!(r.assert_pass("net").contains("arp=ok icmp=ok"), "{r}");
    let d = path_status(&api, "net0");
    assert_eq!(
        (&d["path"], &d["switches"]),
        (&"interposed".into(), &1.into()),
        "{d}"
    );
    assert!(d["completed"].as_u64().unwrap() >= done + 4, "{d}");
    // And back to direct on the new switch.
    let (st, v) = switch_path(&api, "net0", "direct", None);
    assert_eq!(st, 200, "{v}");
    let r = ping();
    assert!(r.assert_pass("net").contains("arp=ok icmp=ok"), "{r}");
    let (st, out) = peer.finish();
    assert_eq!(st, Some(0), "{out}");
    assert!(out.contains("PASS netpeer arp=3 icmp=3"), "{out}");
}

/// A migration interposes on a vhost-user NIC on the direct path (its backend's writes are
/// otherwise seen by no dirty log) and, when it fails, puts it back; a NIC the operator had
/// interposed stays interposed. The NIC carries traffic afterwards.
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_failed_migration_withdraws_from_the_nic_it_interposed_on() {
    need_kvm();
    let dir = TempDir::new("interpose-migrate");
    let _sw = switch(&dir.0);
    let api = dir.path("b.api");
    let mut peer = Proc::spawn(
        guest(
            &dir.0,
            "b",
            "52:54:00:89:00:0b",
            &["--api-socket", api.to_str().unwrap()],
            "probe.tests=netpeer probe.ip=10.89.0.2 probe.echoes=1",
        ),
        false,
    );
    wait_for_socket(&api, WAIT);
    peer.wait_line("netpeer: listening");
    // Nothing listens on port 1: the migration fails after the VMM interposed.
    let nowhere = serde_json::json!({ "destination": "127.0.0.1:1" });
    let migrate = || call(&api, "PUT", "/vm/migrate-send", Some(&nowhere));
    let (st, v) = migrate();
    assert_eq!(st, 502, "{v}");
    let d = path_status(&api, "net0");
    assert_eq!(
        (&d["path"], &d["switches"]),
        (&"direct".into(), &2.into()),
        "interposed for the migration, then withdrawn: {d}"
    );
    let (st, v) = switch_path(&api, "net0", "interposed", None);
    assert_eq!(st, 200, "{v}");
    let (st, v) = migrate();
    assert_eq!(st, 502, "{v}");
    let d = path_status(&api, "net0");
    assert_eq!(
        (&d["path"], &d["switches"]),
        (&"interposed".into(), &3.into()),
        "the operator's interposition stays: {d}"
    );
    let r = run_cmd(
        guest(
            &dir.0,
            "a",
            "52:54:00:89:00:0a",
            &[],
            "probe.tests=net probe.net=10.89.0.1,10.89.0.2",
        ),
        WAIT,
    );
    assert!(r.assert_pass("net").contains("arp=ok icmp=ok"), "{r}");
    let (st, out) = peer.finish();
    assert_eq!(st, Some(0), "{out}");
    assert!(out.contains("PASS netpeer arp=1 icmp=1"), "{out}");
}
