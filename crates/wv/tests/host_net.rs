//! The daemon's networks end to end: `wv net create|list|info|delete` and their errors, the
//! networks kept across a daemon restart, probe guests defined with `--net network=NAME`
//! talking through the daemon's switch world (and one on another network that cannot reach
//! them), the switch killed during traffic and restarted by the daemon while the guests run
//! on (same VMM pids), and a network in use that cannot be deleted.

mod common;
use common::daemon::Daemon;
use common::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(120);

/// The console log the daemon keeps of VM `name`.
fn console(d: &Daemon, name: &str) -> PathBuf {
    d.state.join("vms").join(name).join("console.log")
}

/// Waits until `name`'s console log has a line starting with `line`; returns the log.
fn wait_console(d: &Daemon, name: &str, line: &str) -> String {
    let path = console(d, name);
    let t = Instant::now();
    loop {
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        if log.lines().any(|l| l.starts_with(line)) {
            return log;
        }
        assert!(
            t.elapsed() < WAIT,
            "{name} never printed '{line}':\n{log}\n{}",
            vmm_log(d, name)
        );
        let v = d.json(&["vm", "info", name]);
        assert!(
            v["state"] != "crashed",
            "{name} crashed: {v}\n{log}\n{}",
            vmm_log(d, name)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn vmm_log(d: &Daemon, name: &str) -> String {
    std::fs::read_to_string(d.state.join("vms").join(name).join("vmm.log")).unwrap_or_default()
}

/// The switch world in the daemon's statistics, while it runs.
fn switch_world(d: &Daemon) -> Option<serde_json::Value> {
    d.system_world("switch", u64::from(u32::MAX))
}

/// The switch's pid while the daemon knows it runs (`wv net info`).
fn switch_pid(d: &Daemon) -> Option<u32> {
    d.json(&["net", "info", "lan"])["switch"]["pid"]
        .as_u64()
        .map(|p| u32::try_from(p).unwrap())
}

/// The port of VM `vm` on network `net`, from `wv net info`.
fn port_of(d: &Daemon, net: &str, vm: &str) -> Option<serde_json::Value> {
    d.json(&["net", "info", net])["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["vm"] == vm)
        .cloned()
}

/// Waits until VM `vm`'s port on `net` has a VMM connected.
fn wait_connected(d: &Daemon, net: &str, vm: &str, what: &str) {
    let t = Instant::now();
    while port_of(d, net, vm).is_none_or(|p| p["connected"] != true) {
        assert!(
            t.elapsed() < WAIT,
            "{what}: {}",
            d.json(&["net", "info", net])
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ip(args: &[&str]) {
    let st = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("ip (iproute2) is needed");
    assert!(st.success(), "ip {args:?} failed");
}

/// A TAP of the test's in the host's namespace, up; removed on drop.
struct Tap(String);

impl Tap {
    fn new(name: &str) -> Tap {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        assert_eq!(uid, 0, "this test needs root (a TAP)");
        ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        let t = Tap(name.to_string());
        ip(&["link", "set", name, "up"]);
        t
    }

    /// Sends one raw Ethernet frame out of the TAP (to whoever reads it: the switch).
    #[allow(clippy::cast_possible_truncation)] // the packet API's small constants and sizes
    fn inject(&self, frame: &[u8]) {
        let name = std::ffi::CString::new(self.0.clone()).unwrap();
        // SAFETY: if_nametoindex reads a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(index, 0, "no interface {}", self.0);
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: a new raw packet socket, closed below.
        let s = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(s >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = index as i32;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: sendto reads `frame` and `sa`, both valid for their lengths.
        let n = unsafe {
            libc::sendto(
                s,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const sa).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        let err = std::io::Error::last_os_error();
        // SAFETY: closing the socket made above.
        unsafe { libc::close(s) };
        assert_eq!(n, frame.len() as isize, "{err}");
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0])
            .status();
    }
}

#[test]
fn networks_are_made_listed_shown_deleted_and_kept() {
    let dir = TempDir::new("hostnet");
    let d = Daemon::start(&dir);
    let r = d.wv(&["net", "create", "lan"]);
    assert_eq!(r.status, Some(0), "{r}");
    assert!(
        r.stdout.contains("created network lan (uplink none)"),
        "{r}"
    );
    // The switch world runs from the first network on, in the daemon's statistics.
    let w = switch_world(&d).expect("the switch world is in the statistics");
    assert!(!w["threads"].as_array().unwrap().is_empty(), "{w}");
    let pid = switch_pid(&d).expect("the switch runs");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    // Its folder is root's only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.state.join("sw"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    for (args, needle) in [
        (&["net", "create", "lan"][..], "exists already (HTTP 409)"),
        (&["net", "create", ".x"][..], "invalid network name '.x'"),
        (&["net", "create", &"n".repeat(65)][..], "(HTTP 422)"),
        (&["net", "create", "a", "--uplink", "eth0"][..], "tap=NAME"),
        (
            &["net", "info", "nowhere"][..],
            "no network named 'nowhere' (HTTP 404)",
        ),
        (
            &["net", "delete", "nowhere"][..],
            "no network named 'nowhere' (HTTP 404)",
        ),
        (&["net", "frob"][..], "unknown 'wv net' command"),
        (
            &["vm", "create", "v", "--net", "network=nowhere"][..],
            "no network named 'nowhere' (wv net create nowhere) (HTTP 422)",
        ),
        (
            &["vm", "create", "v", "--net", "vhost-user=/run/other.sock"][..],
            "vhost-user devices are for wv run only",
        ),
    ] {
        let r = d.wv(args);
        assert_ne!(r.status, Some(0), "{args:?}: {r}");
        assert!(r.stderr.contains(needle), "{args:?}: {r}");
    }
    let (s, body) =
        d.raw(b"POST /v1/networks HTTP/1.1\r\nContent-Length: 11\r\n\r\n{\"nme\":\"a\"}");
    assert_eq!(s, 400, "{body}");
    assert_eq!(d.wv(&["net", "create", "dmz"]).status, Some(0));
    let list = d.json(&["net", "list"]);
    assert_eq!(list, serde_json::json!([{"name": "lan"}, {"name": "dmz"}]));
    let r = d.wv(&["net", "list"]);
    assert!(r.stdout.contains("lan") && r.stdout.contains("dmz"), "{r}");
    // A VM defined on lan: lan is in use, and shown so.
    let r = d.wv(&[
        "vm",
        "create",
        "v",
        "--net",
        "network=lan,mac=52:54:00:12:00:01",
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    let v = d.json(&["vm", "info", "v"]);
    assert_eq!(v["spec"]["nets"][0]["network"], "lan", "{v}");
    assert!(v["spec"]["nets"][0].get("vhost_user").is_none(), "{v}");
    let info = d.json(&["net", "info", "lan"]);
    assert_eq!(info["vms"], serde_json::json!(["v"]), "{info}");
    assert_eq!(
        info["ports"],
        serde_json::json!([]),
        "no port until v runs: {info}"
    );
    let r = d.wv(&["net", "delete", "lan"]);
    assert!(
        r.stderr.contains("network 'lan' is used by VM v") && r.stderr.contains("(HTTP 409)"),
        "{r}"
    );
    assert_eq!(d.wv(&["net", "delete", "dmz"]).status, Some(0));
    // Kept across a restart of the daemon; the new daemon runs a new switch.
    d.stop();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
            || !std::fs::read(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .starts_with(wv_bin().to_str().unwrap().as_bytes()),
        "the switch ended with its daemon"
    );
    let d = Daemon::start(&dir);
    assert_eq!(
        d.json(&["net", "list"]),
        serde_json::json!([{"name": "lan"}])
    );
    assert!(switch_pid(&d).is_some(), "the switch runs at start");
    // Network shares are stored in the definition (applied at each start of its ports);
    // a reservation above the limit is refused and changes nothing.
    let r = d.wv(&["vm", "set", "v", "--net-shares", "4", "--net-limit", "50M"]);
    assert_eq!(r.status, Some(0), "{r}");
    assert!(r.stdout.contains("network shares 4"), "{r}");
    let r = d.wv(&["vm", "set", "v", "--net-reservation", "60M"]);
    assert!(
        r.stderr.contains("(HTTP 422)") && r.stderr.contains("above the net_limit"),
        "{r}"
    );
    let spec = &d.json(&["vm", "info", "v"])["spec"];
    assert_eq!(
        (
            &spec["net_shares"],
            &spec["net_limit"],
            &spec["net_reservation"]
        ),
        (
            &serde_json::json!(4),
            &serde_json::json!(50_000_000),
            &serde_json::Value::Null
        ),
        "{spec}"
    );
    let r = d.wv(&["vm", "set", "v", "--net-limit", "none"]);
    assert_eq!(r.status, Some(0), "{r}");
    assert_eq!(
        d.json(&["vm", "info", "v"])["spec"]["net_limit"],
        serde_json::Value::Null
    );
    assert_eq!(d.wv(&["vm", "delete", "v"]).status, Some(0));
    let r = d.wv(&["net", "delete", "lan"]);
    assert_eq!(r.status, Some(0), "{r}");
    let r = d.wv(&["net", "info", "lan"]);
    assert!(r.stderr.contains("(HTTP 404)"), "{r}");
    d.stop();
}

/// Two probe guests on one daemon network exchange ARP and ICMP echo through the switch
/// world, and `wv net info` counts it; a guest on another network gets no ARP reply; the
/// switch is killed (SIGKILL) while the guests run: the daemon starts it again, the same VMMs
/// reconnect and talk again, and the uplink has its rate (`--uplink-rate`) again; the network
/// cannot be deleted while VMs are defined on it.
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn guests_talk_on_a_daemon_network_and_survive_a_switch_crash() {
    need_kvm();
    let dir = TempDir::new("hostnet-vm");
    let d = Daemon::start(&dir);
    // `other` reaches the host through a TAP of the test's, which injects frames into it.
    let tap = Tap::new(&format!("wvn{}", std::process::id() % 100_000));
    for args in [
        &["net", "create", "lan"][..],
        &[
            "net",
            "create",
            "other",
            "--uplink",
            &format!("tap={}", tap.0),
            "--uplink-rate",
            "100M",
        ][..],
    ] {
        let r = d.wv(args);
        assert_eq!(r.status, Some(0), "{r}");
    }
    // The uplink's rate: kept with the network and set on the switch's uplink port.
    let uplink_rate = || {
        let up = format!("uplink:{}", tap.0);
        d.json(&["net", "info", "other"])["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["port"] == up.as_str())
            .map(|p| p["rate_bps"].clone())
    };
    assert_eq!(
        d.json(&["net", "info", "other"])["uplink_rate"],
        100_000_000
    );
    assert_eq!(uplink_rate(), Some(serde_json::json!(100_000_000)));
    let r = d.wv(&["net", "list"]);
    assert!(
        r.stdout.contains(&format!("{} at 100000000 b/s", tap.0)),
        "{r}"
    );
    let create = |name: &str, net: &str, mac: &str, cmdline: &str| {
        let r = d.wv(&[
            "vm",
            "create",
            name,
            "--memory",
            "64M",
            "--net",
            &format!("network={net},mac={mac}"),
            "--cmdline",
            cmdline,
        ]);
        assert_eq!(r.status, Some(0), "{r}");
    };
    const B_MAC: &str = "52:54:00:84:00:0b";
    // b answers three echo requests: one before the switch dies, two after.
    create(
        "b",
        "lan",
        B_MAC,
        "probe.tests=netpeer probe.ip=10.84.0.2 probe.echoes=3",
    );
    create(
        "a",
        "lan",
        "52:54:00:84:00:0a",
        "probe.tests=net probe.net=10.84.0.1,10.84.0.2",
    );
    create(
        "c",
        "other",
        "52:54:00:84:00:0c",
        "probe.tests=net probe.net=10.84.0.3,10.84.0.2",
    );
    // b's network shares, set before its start, are on its port once it starts.
    let r = d.wv(&["vm", "set", "b", "--net-shares", "3"]);
    assert_eq!(r.status, Some(0), "{r}");
    assert_eq!(d.wv(&["vm", "start", "b"]).status, Some(0));
    wait_console(&d, "b", "netpeer: listening");
    let b_pid = d.json(&["vm", "info", "b"])["pid"].clone();
    let b_port = port_of(&d, "lan", "b").expect("b has a port on lan");
    assert_eq!(b_port["kind"], "vhost-user", "{b_port}");
    assert_eq!(
        (&b_port["shares"], &b_port["limit_bps"]),
        (&serde_json::json!(3), &serde_json::json!(0)),
        "{b_port}"
    );
    // And changed live (a limit far above what a ping needs).
    let r = d.wv(&["vm", "set", "b", "--net-limit", "50M"]);
    assert_eq!(r.status, Some(0), "{r}");
    let b_port = port_of(&d, "lan", "b").unwrap();
    assert_eq!(b_port["limit_bps"], 50_000_000, "{b_port}");
    let b_id = d.json(&["vm", "info", "b"])["id"].as_u64().unwrap();
    assert_eq!(b_port["port"], format!("{b_id}-net0"), "{b_port}");

    // a pings b through the switch; a's run ends (its port goes), b runs on.
    let ping = |n: usize| {
        let r = d.wv(&["vm", "start", "a"]);
        assert_eq!(r.status, Some(0), "{r}");
        let v = d.wait_state_within("a", "stopped", WAIT);
        assert_eq!(
            v["reason"],
            "guest powered off with exit code 0",
            "{v}\n{}",
            std::fs::read_to_string(console(&d, "a")).unwrap_or_default()
        );
        let log = std::fs::read_to_string(console(&d, "a")).unwrap();
        let passes = log
            .lines()
            .filter(|l| l.starts_with("PASS net") && l.contains("arp=ok icmp=ok"))
            .count();
        assert_eq!(passes, n, "{log}");
    };
    ping(1);
    assert!(
        port_of(&d, "lan", "a").is_none(),
        "a's port went with its run"
    );
    let b_port = port_of(&d, "lan", "b").unwrap();
    // The ARP request (broadcast) and the echo request came in, the two replies went out,
    // each delivery one copy.
    for k in ["tx_frames", "rx_frames", "copies"] {
        assert_eq!(b_port[k], 2, "{k}: {b_port}");
    }
    assert_eq!(b_port["copied_bytes"], b_port["rx_bytes"], "{b_port}");

    // A frame from the host side of `other` to b's MAC (learned on lan): dropped at the
    // switch and counted on the uplink, never delivered to b.
    let mut frame: Vec<u8> = B_MAC
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99, 0x08, 0x00]);
    frame.resize(60, 0);
    let uplink = format!("uplink:{}", tap.0);
    let isolated = || {
        d.json(&["net", "info", "other"])["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["port"] == uplink.as_str())
            .map_or(0, |p| p["dropped_isolated"].as_u64().unwrap())
    };
    let before = isolated();
    tap.inject(&frame);
    let t = Instant::now();
    while isolated() == before {
        assert!(t.elapsed() < WAIT, "the isolated frame was never counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        port_of(&d, "lan", "b").unwrap()["rx_frames"],
        2,
        "a frame crossed"
    );

    // c, on another network, gets no answer; b never sees its request.
    assert_eq!(d.wv(&["vm", "start", "c"]).status, Some(0));
    let v = d.wait_state_within("c", "stopped", WAIT);
    let log = std::fs::read_to_string(console(&d, "c")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.starts_with("FAIL net") && l.contains("no ARP reply")),
        "{v}\n{log}"
    );
    assert_eq!(port_of(&d, "lan", "b").unwrap()["rx_frames"], 2);

    // The switch dies during b's run: the daemon starts a new one, b's VMM (the same
    // process) reconnects by itself, and a second ping passes.
    let sw = switch_pid(&d).expect("the switch runs");
    // SAFETY: killing the switch process of this test's daemon.
    assert_eq!(unsafe { libc::kill(sw as i32, libc::SIGKILL) }, 0);
    let t = Instant::now();
    while switch_pid(&d).is_none_or(|p| p == sw) {
        assert!(t.elapsed() < WAIT, "the daemon never restarted the switch");
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_connected(
        &d,
        "lan",
        "b",
        "b's VMM never reconnected to the new switch",
    );
    // The new switch got b's settings again, and the uplink its rate.
    assert_eq!(uplink_rate(), Some(serde_json::json!(100_000_000)));
    let b_port = port_of(&d, "lan", "b").unwrap();
    assert_eq!(
        (&b_port["shares"], &b_port["limit_bps"]),
        (&serde_json::json!(3), &serde_json::json!(50_000_000)),
        "{b_port}"
    );
    assert_eq!(
        d.json(&["vm", "info", "b"])["pid"],
        b_pid,
        "b was not restarted"
    );
    assert_eq!(d.json(&["vm", "info", "b"])["state"], "running");
    ping(2);
    // And once more through a switch killed while b's VMM is connected to it.
    let sw2 = switch_pid(&d).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(sw2 as i32, libc::SIGKILL) }, 0);
    let t = Instant::now();
    while switch_pid(&d).is_none_or(|p| p == sw2) {
        assert!(t.elapsed() < WAIT, "the daemon never restarted the switch");
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_connected(&d, "lan", "b", "b's VMM never reconnected");
    ping(3);
    let v = d.wait_state_within("b", "stopped", WAIT);
    assert_eq!(v["reason"], "guest powered off with exit code 0", "{v}");
    let log = std::fs::read_to_string(console(&d, "b")).unwrap();
    assert!(log.contains("PASS netpeer arp="), "{log}");
    assert!(
        port_of(&d, "lan", "b").is_none(),
        "b's port went with its run"
    );

    // In use: refused; unused: deleted.
    let r = d.wv(&["net", "delete", "lan"]);
    assert!(r.stderr.contains("(HTTP 409)"), "{r}");
    for vm in ["a", "b"] {
        assert_eq!(d.wv(&["vm", "delete", vm]).status, Some(0));
    }
    assert_eq!(d.wv(&["net", "delete", "lan"]).status, Some(0));
    d.stop();
}

/// A guest on a daemon network is snapshotted, stopped and restored: the restored VMM (told
/// this run's switch port) reconnects, and the guest, resumed mid-test, answers again.
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_guest_on_a_daemon_network_snapshots_and_restores() {
    need_kvm();
    let dir = TempDir::new("hostnet-snap");
    let d = Daemon::start(&dir);
    assert_eq!(d.wv(&["net", "create", "lan"]).status, Some(0));
    for (name, mac, cmdline) in [
        (
            "b",
            "52:54:00:85:00:0b",
            "probe.tests=netpeer probe.ip=10.85.0.2 probe.echoes=2",
        ),
        (
            "a",
            "52:54:00:85:00:0a",
            "probe.tests=net probe.net=10.85.0.1,10.85.0.2",
        ),
    ] {
        let r = d.wv(&[
            "vm",
            "create",
            name,
            "--memory",
            "64M",
            "--net",
            &format!("network=lan,mac={mac}"),
            "--cmdline",
            cmdline,
        ]);
        assert_eq!(r.status, Some(0), "{r}");
    }
    let ping = |n: usize| {
        assert_eq!(d.wv(&["vm", "start", "a"]).status, Some(0));
        let v = d.wait_state_within("a", "stopped", WAIT);
        let log = std::fs::read_to_string(console(&d, "a")).unwrap();
        let passes = log
            .lines()
            .filter(|l| l.starts_with("PASS net") && l.contains("arp=ok icmp=ok"))
            .count();
        assert_eq!(passes, n, "{v}\n{log}");
    };
    assert_eq!(d.wv(&["vm", "start", "b"]).status, Some(0));
    wait_console(&d, "b", "netpeer: listening");
    ping(1);
    let r = d.wv(&["vm", "snapshot", "b", "s1"]);
    assert_eq!(r.status, Some(0), "{r}");
    assert_eq!(d.wv(&["vm", "stop", "b"]).status, Some(0));
    d.wait_state("b", "stopped");
    assert!(
        port_of(&d, "lan", "b").is_none(),
        "b's port went with its run"
    );
    let r = d.wv(&["vm", "restore", "b", "s1"]);
    assert_eq!(r.status, Some(0), "{r}");
    wait_connected(&d, "lan", "b", "the restored VMM never connected");
    // The definition names the network, never a socket.
    let v = d.json(&["vm", "info", "b"]);
    assert_eq!(v["spec"]["nets"][0]["network"], "lan", "{v}");
    assert!(v["spec"]["nets"][0].get("vhost_user").is_none(), "{v}");
    ping(2);
    let v = d.wait_state_within("b", "stopped", WAIT);
    assert_eq!(v["reason"], "guest powered off with exit code 0", "{v}");
    let log = std::fs::read_to_string(console(&d, "b")).unwrap();
    assert!(log.contains("PASS netpeer arp=2 icmp=2"), "{log}");
    d.stop();
}

/// `wv vm device NAME DEV --path interposed --capture FILE` and back to `--path direct` on a
/// running VM of a daemon network, while it pings another: the switches are done by its VMM
/// (the guest passes with every echo answered), the capture lands in the VM's folder and
/// `tcpdump -r` reads it; bad requests (a capture outside the folder, an unknown device, a
/// capture on the direct path, a VM that is not running) are refused with a message.
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_daemon_vm_switches_its_nic_between_direct_and_interposed() {
    need_kvm();
    const PINGS: u32 = 1500;
    let dir = TempDir::new("hostnet-interpose");
    let d = Daemon::start(&dir);
    assert_eq!(d.wv(&["net", "create", "lan"]).status, Some(0));
    for (name, mac, cmdline) in [
        (
            "b",
            "52:54:00:86:00:0b",
            format!("probe.tests=netpeer probe.ip=10.86.0.2 probe.echoes={PINGS}"),
        ),
        (
            "a",
            "52:54:00:86:00:0a",
            format!("probe.tests=net probe.net=10.86.0.1,10.86.0.2 probe.pings={PINGS}"),
        ),
    ] {
        let r = d.wv(&[
            "vm",
            "create",
            name,
            "--memory",
            "64M",
            "--net",
            &format!("network=lan,mac={mac},id=net0"),
            "--cmdline",
            &cmdline,
        ]);
        assert_eq!(r.status, Some(0), "{r}");
    }
    // Not running yet: refused.
    let r = d.wv(&["vm", "device", "a", "net0", "--path", "interposed"]);
    assert_ne!(r.status, Some(0), "{r}");
    assert!(r.stderr.contains("not running"), "{r}");
    assert_eq!(d.wv(&["vm", "start", "b"]).status, Some(0));
    wait_console(&d, "b", "netpeer: listening");
    assert_eq!(d.wv(&["vm", "start", "a"]).status, Some(0));
    wait_console(&d, "a", "Worldvisor probe guest");
    let r = d.wv(&[
        "vm",
        "device",
        "a",
        "net0",
        "--path",
        "interposed",
        "--capture",
        "net0.pcap",
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    assert!(r.stdout.contains("net0: interposed"), "{r}");
    // Switched at once, while the guest's pings have just begun (interposed they go slower, so
    // the guest is still pinging when the refusals below are done and it switches back).
    for (args, needle) in [
        (
            &["--path", "interposed", "--capture", "../x.pcap"][..],
            "invalid capture",
        ),
        (
            &["--path", "interposed", "--capture", "vmm.log"],
            "invalid capture",
        ),
        (
            &["--path", "direct", "--capture", "a.pcap"],
            "--capture needs",
        ),
    ] {
        let mut a = vec!["vm", "device", "a", "net0"];
        a.extend_from_slice(args);
        let r = d.wv(&a);
        assert_ne!(r.status, Some(0), "{r}");
        assert!(r.stderr.contains(needle), "{args:?}: {r}");
    }
    let r = d.wv(&["vm", "device", "a", "nosuch", "--path", "interposed"]);
    assert_ne!(r.status, Some(0), "{r}");
    assert!(r.stderr.contains("no device 'nosuch'"), "{r}");
    let v = d.json(&["vm", "device", "a", "net0", "--path", "direct"]);
    assert_eq!(v["path"], "direct", "{v}");
    assert_eq!(v["switches"], 2, "{v}");
    let captured = v["captured"].as_u64().unwrap();
    let pcap = d.state.join("vms").join("a").join("net0.pcap");
    let out = std::process::Command::new("tcpdump")
        .arg("-nr")
        .arg(&pcap)
        .output()
        .expect("tcpdump is needed");
    assert!(out.status.success(), "{out:?}");
    let frames = String::from_utf8_lossy(&out.stdout).lines().count() as u64;
    assert_eq!(frames, captured, "{v}");
    let v = d.wait_state_within("a", "stopped", WAIT);
    assert_eq!(
        v["reason"],
        "guest powered off with exit code 0",
        "{v}\n{}",
        std::fs::read_to_string(console(&d, "a")).unwrap_or_default()
    );
    let log = std::fs::read_to_string(console(&d, "a")).unwrap();
    assert!(
        log.contains(&format!("icmp=ok pings={PINGS} other=0")),
        "{log}"
    );
}

/// The ports of VM `vm` on network `net`: (port name, whether a VMM is connected).
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

/// `wv vm device add NAME --net network=N,id=ID,mac=M` into a running daemon VM that has a net
/// on the network already (so its memory is shared with the switch): the daemon adds a
/// switch port, the guest enumerates the new NIC, reads its MAC and starts its queues (the
/// port then has a VMM connected); a second id alike and an unknown network are refused;
/// `wv vm device remove` ejects it and its port goes, and the VM's other port goes with its
/// run.
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_net_is_hot_plugged_into_a_daemon_vm_and_removed() {
    need_kvm();
    let dir = TempDir::new("hostnet-hotplug");
    let d = Daemon::start(&dir);
    assert_eq!(d.wv(&["net", "create", "lan"]).status, Some(0));
    let r = d.wv(&[
        "vm",
        "create",
        "h",
        "--memory",
        "64M",
        "--net",
        "network=lan,mac=52:54:00:86:00:01",
        "--cmdline",
        "console=ttyS0 probe.tests=hotplug probe.hotplug_cycles=1",
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    assert_eq!(d.wv(&["vm", "start", "h"]).status, Some(0));
    wait_console(&d, "h", "hotplug: ready");
    assert_eq!(ports_of(&d, "lan", "h").len(), 1);

    let net = "network=lan,id=hot1,mac=52:54:00:86:00:02";
    let r = d.wv(&["vm", "device", "add", "h", "--net", net]);
    assert_eq!(r.status, Some(0), "{r}");
    let log = wait_console(&d, "h", "hotplug: added slot=");
    let added = log
        .lines()
        .find(|l| l.starts_with("hotplug: added"))
        .unwrap();
    assert!(added.ends_with("net mac=52:54:00:86:00:02"), "{added}");
    // Both ports are h's, and the guest's driver started the new one's queues (the probe
    // leaves its first NIC alone: that port never has its rings).
    let t = Instant::now();
    loop {
        let ports = ports_of(&d, "lan", "h");
        assert_eq!(ports.len(), 2, "{ports:?}");
        if ports.iter().any(|(p, c)| p.ends_with("-hot0") && *c) {
            break;
        }
        assert!(
            t.elapsed() < WAIT,
            "the hot-plugged port never had its VMM: {}",
            d.json(&["net", "info", "lan"])
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    for (spec, why) in [
        (net, "already has a device with id 'hot1'"),
        ("network=nosuch,id=x", "no network named 'nosuch'"),
        ("tap=t0,id=x", "network=NAME"),
    ] {
        let r = d.wv(&["vm", "device", "add", "h", "--net", spec]);
        assert_ne!(r.status, Some(0), "{spec}: {r}");
        assert!(r.stderr.contains(why), "{spec}: {r}");
    }
    assert_eq!(
        ports_of(&d, "lan", "h").len(),
        2,
        "a refused net left a port"
    );

    let r = d.wv(&["vm", "device", "remove", "h", "hot1"]);
    assert_eq!(r.status, Some(0), "{r}");
    wait_console(&d, "h", "hotplug: ejected slot=");
    // The guest powers off after its one eject; by then the port has gone, and the other
    // with the run.
    d.wait_state_within("h", "stopped", WAIT);
    assert!(
        ports_of(&d, "lan", "h").is_empty(),
        "{}",
        d.json(&["net", "info", "lan"])
    );
    d.stop();
}

/// A guest that ejects a hot-plugged NIC by itself, unasked: the daemon sees the device gone
/// from its VMM (its once-a-second reading) and removes the switch port it added for it,
/// while the VM runs on with its first NIC.
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_nic_the_guest_ejects_by_itself_has_its_port_removed() {
    need_kvm();
    let dir = TempDir::new("hostnet-selfeject");
    let d = Daemon::start(&dir);
    assert_eq!(d.wv(&["net", "create", "lan"]).status, Some(0));
    let r = d.wv(&[
        "vm",
        "create",
        "s",
        "--memory",
        "64M",
        "--net",
        "network=lan,mac=52:54:00:87:00:01",
        "--cmdline",
        "console=ttyS0 probe.tests=hotplug probe.hotplug_cycles=2 probe.hotplug_self_eject=1",
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    assert_eq!(d.wv(&["vm", "start", "s"]).status, Some(0));
    wait_console(&d, "s", "hotplug: ready");
    let r = d.wv(&[
        "vm",
        "device",
        "add",
        "s",
        "--net",
        "network=lan,id=hot1,mac=52:54:00:87:00:02",
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    let log = wait_console(&d, "s", "hotplug: ejected slot=");
    assert!(log.contains(" by itself"), "{log}");
    let t = Instant::now();
    loop {
        let ports = ports_of(&d, "lan", "s");
        if ports.len() == 1 {
            assert!(!ports[0].0.contains("-hot"), "{ports:?}");
            break;
        }
        assert!(
            t.elapsed() < WAIT,
            "the ejected NIC's port stayed: {}",
            d.json(&["net", "info", "lan"])
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let v = d.json(&["vm", "info", "s"]);
    assert_eq!(v["state"], "running");
    // It left the definition with its port (it was kept there while the guest had it).
    let nets = v["spec"]["nets"].as_array().unwrap();
    assert!(
        nets.len() == 1 && nets[0]["id"] != "hot1",
        "the ejected NIC is still defined: {v}"
    );
    assert!(v.get("hot").is_none(), "{v}");
    // The device is gone for the daemon too: removing it now finds nothing.
    let r = d.wv(&["vm", "device", "remove", "s", "hot1"]);
    assert_ne!(r.status, Some(0), "{r}");
    d.stop();
}
