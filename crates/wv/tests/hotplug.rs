//! PCI hot-plug (docs/DEVICES.md): disks and NICs added to and removed from a running probe
//! guest (`probe.tests=hotplug`) through the VMM's control socket (`PUT /vm/device-add`,
//! `PUT /vm/device-remove`), the guest using each device after it arrives and acknowledging
//! each eject; and the refusals (duplicate id, unknown id, a configured device, a full bus).
//! The time from request to the guest having used the device is printed (docs/PERFORMANCE.md).

mod common;

use common::{need_kvm, wv_bin, TempDir};
use serde_json::{json, Value};
use std::io::{BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A PUT with a JSON body on the VMM's socket: (status, body).
fn put(sock: &Path, path: &str, body: &Value) -> (u16, Value) {
    let body = body.to_string();
    let mut s = UnixStream::connect(sock).unwrap();
    write!(
        s,
        "PUT {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    answer(s)
}

fn get(sock: &Path, path: &str) -> (u16, Value) {
    let mut s = UnixStream::connect(sock).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\n\r\n").unwrap();
    answer(s)
}

fn answer(mut s: UnixStream) -> (u16, Value) {
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// A `wv run` whose serial output arrives line by line; killed when dropped.
struct Vmm {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Vmm {
    fn spawn(mut c: Command) -> Vmm {
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Vmm {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a serial line that starts with `prefix` and returns it.
    fn wait_line(&mut self, prefix: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(_) => panic!("no line '{prefix}' within 60 s; saw {:#?}", self.seen),
            }
        }
    }

    fn wait(mut self) -> i32 {
        self.child.wait().unwrap().code().unwrap_or(-1)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Adds `dev` and waits for the guest's "hotplug: added slot=S ..." line, which must end with
/// `used` (what shows the guest used it); prints the time from the request to that line.
/// Returns the slot.
fn add_and_use(vm: &mut Vmm, sock: &Path, dev: Value, used: &str) -> u8 {
    let start = Instant::now();
    let (st, a) = put(sock, "/vm/device-add", &dev);
    assert_eq!(st, 200, "{a}");
    let slot = a["slot"].as_u64().unwrap();
    let line = vm.wait_line(&format!("hotplug: added slot={slot} "));
    let took = start.elapsed();
    assert!(line.ends_with(used), "{line}");
    eprintln!(
        "hot-plug: {} from PUT /vm/device-add to the guest having used it: {:.1} ms",
        a["id"],
        took.as_secs_f64() * 1e3
    );
    u8::try_from(slot).unwrap()
}

/// Removes `id` and checks that the guest ejected its slot and (unless it is the guest's `last`
/// eject, after which it powers off) that the VM no longer lists it; prints the time it took.
fn remove(vm: &mut Vmm, sock: &Path, id: &str, slot: u8, last: bool) {
    let start = Instant::now();
    let (st, e) = put(sock, "/vm/device-remove", &json!({ "id": id }));
    assert_eq!(st, 204, "{e}");
    eprintln!(
        "hot-unplug: {id} from PUT /vm/device-remove to the device gone: {:.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    vm.wait_line(&format!("hotplug: ejected slot={slot}"));
    if last {
        return;
    }
    let (_, info) = get(sock, "/vm");
    let hot = info["hotplugged"].as_array().unwrap();
    assert!(
        hot.iter()
            .all(|d| d["disk"]["id"] != id && d["net"]["id"] != id),
        "{id} is still listed: {info}"
    );
}

/// Whether the process `pid` holds `file` open.
fn holds(pid: u32, file: &Path) -> bool {
    let file = file.canonicalize().unwrap();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == file))
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn disks_are_hot_plugged_used_and_removed_and_bad_requests_refused() {
    need_kvm();
    let dir = TempDir::new("hotplug-disk");
    let sock = dir.path("api.sock");
    let cold = dir.file("cold.img", &vec![0u8; 1 << 20]);
    let hot0 = dir.file("hot0.img", &vec![0u8; 1 << 20]);
    let hot1 = dir.file("hot1.img", &vec![0u8; 1 << 20]);
    let mut c = Command::new(wv_bin());
    c.args(["run", "--memory", "64M", "--api-socket"])
        .arg(&sock)
        .arg("--disk")
        .arg(format!("path={},id=cold", cold.display()))
        .args([
            "--cmdline",
            "console=ttyS0 probe.tests=hotplug probe.hotplug_cycles=2",
        ]);
    let mut vm = Vmm::spawn(c);
    let ready = vm.wait_line("hotplug: ready");
    assert!(ready.contains("port=0x610 ged-gsi=7"), "{ready}");
    let pid = vm.child.id();

    // Added, used (sector 1 written with the guest's pattern, read back), listed.
    let slot = add_and_use(
        &mut vm,
        &sock,
        json!({"disk": {"path": hot0, "id": "hot0"}}),
        "blk hot0 rw-ok",
    );
    let img = std::fs::read(&hot0).unwrap();
    let seed = 0x5a_u8.wrapping_add(0x11);
    assert!(
        img[512..1024]
            .iter()
            .zip((0..=255u8).cycle())
            .all(|(b, i)| *b == i ^ seed),
        "sector 1 of hot0.img is not what the guest wrote"
    );
    assert!(holds(pid, &hot0));
    let (_, info) = get(&sock, "/vm");
    assert_eq!(info["hotplugged"][0]["disk"]["id"], "hot0", "{info}");

    // Refused: a duplicate id (hot-plugged or configured), an unknown id, a configured device,
    // a snapshot with a hot-plugged device.
    let (st, e) = put(
        &sock,
        "/vm/device-add",
        &json!({"disk": {"path": hot1, "id": "hot0"}}),
    );
    assert_eq!(st, 409, "{e}");
    assert!(e["error"].as_str().unwrap().contains("already has"), "{e}");
    let (st, _) = put(
        &sock,
        "/vm/device-add",
        &json!({"disk": {"path": hot1, "id": "cold"}}),
    );
    assert_eq!(st, 409);
    let (st, e) = put(&sock, "/vm/device-remove", &json!({"id": "nothing"}));
    assert_eq!(st, 404, "{e}");
    let (st, e) = put(&sock, "/vm/device-remove", &json!({"id": "cold"}));
    assert_eq!(st, 409, "{e}");
    let (st, e) = put(
        &sock,
        "/vm/snapshot",
        &json!({"destination": dir.path("snap"), "allow_raw_disk": true}),
    );
    assert_eq!(st, 409, "{e}");
    assert!(e["error"].as_str().unwrap().contains("hot-plugged"), "{e}");

    // The bus fills up (the host bridge, the entropy device, the configured disk, hot0 and
    // the rest): then 409.
    let mut fill = Vec::new();
    loop {
        let n = fill.len();
        let img = dir.file(&format!("fill{n}.img"), &[0u8; 4096]);
        let (st, e) = put(
            &sock,
            "/vm/device-add",
            &json!({"disk": {"path": img, "id": format!("fill{n}")}}),
        );
        if st == 409 {
            assert!(e["error"].as_str().unwrap().contains("bus is full"), "{e}");
            break;
        }
        assert_eq!(st, 200, "{e}");
        fill.push(e["slot"].as_u64().unwrap());
        assert!(fill.len() < 32, "32 devices and the bus is not full");
    }
    assert_eq!(fill.len(), 28, "slots {fill:?}");
    // The guest uses each (their markers, in slot order within a scan).
    for s in &fill {
        vm.wait_line(&format!("hotplug: added slot={s} blk fill"));
    }

    // Removed once the guest ejected it: the image is closed, the slot free for the next.
    remove(&mut vm, &sock, "hot0", slot, false);
    assert!(!holds(pid, &hot0), "the VMM still holds hot0.img open");
    let slot1 = add_and_use(
        &mut vm,
        &sock,
        json!({"disk": {"path": hot1, "id": "hot1"}}),
        "blk hot1 rw-ok",
    );
    assert_eq!(slot1, slot, "the freed slot is taken again");
    remove(&mut vm, &sock, "hot1", slot1, true);
    let pass = vm.wait_line("PASS hotplug");
    assert!(pass.contains("added=30 ejected=2"), "{pass}");
    assert_eq!(vm.wait(), 0);
}

/// A network namespace with TAP `tap0` and `tap1` in it. Needs root.
struct NetNs(String);

impl NetNs {
    fn new(tag: &str) -> NetNs {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the NIC hot-plug test needs root to create TAP devices"
        );
        let ns = NetNs(format!("wvh-{tag}-{}", std::process::id()));
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
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_nic_is_hot_plugged_on_a_tap_used_and_removed() {
    need_kvm();
    let dir = TempDir::new("hotplug-net");
    let sock = dir.path("api.sock");
    let ns = NetNs::new("net");
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.0])
        .arg(wv_bin())
        .args(["run", "--memory", "64M", "--api-socket"])
        .arg(&sock)
        .args(["--cmdline", "console=ttyS0 probe.tests=hotplug"]);
    let mut vm = Vmm::spawn(c);
    vm.wait_line("hotplug: ready");
    let slot = add_and_use(
        &mut vm,
        &sock,
        json!({"net": {"tap": "tap0", "id": "nic0", "mac": "52:54:00:12:34:56"}}),
        "net mac=52:54:00:12:34:56",
    );
    remove(&mut vm, &sock, "nic0", slot, true);
    vm.wait_line("PASS hotplug");
    assert_eq!(vm.wait(), 0);
}
