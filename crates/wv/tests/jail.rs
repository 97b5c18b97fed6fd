//! `wv run --jail` (crates/vmm/src/jail.rs, docs/SECURITY.md): the VMM, checked from /proc
//! while its guest runs, is its own unprivileged user with no capabilities and
//! `no_new_privs`, the first process of new mount, PID, IPC and network namespaces, in a root
//! that holds only /dev's four harmless devices, /proc and its folder, with its limits; it
//! cannot open a host file outside its jail when a client asks it to (a hot-plugged disk
//! naming one); its keeper passes SIGTERM on and ends with the VMM's status; and the VMM dies
//! with its keeper.

mod common;

use common::vmm::{call, wait_for_socket, Vmm};
use common::*;
use serde_json::json;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

/// A uid no account uses, distinct per test process.
fn test_uid(n: u32) -> u32 {
    3_900_000 + (std::process::id() % 10_000) * 10 + n
}

/// The VMM under keeper `keeper`: its only child.
fn jailed_pid(keeper: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{keeper}/task/{keeper}/children"))
        .expect("the keeper's children");
    let pids: Vec<u32> = children
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 1, "the keeper has one child, the VMM: {pids:?}");
    pids[0]
}

/// The value of `field` in /proc/PID/status.
fn status_field(pid: u32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn ns(pid: &str, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .display()
        .to_string()
}

/// A pidfd of `pid`, readable once it has ended.
fn pidfd(pid: u32) -> OwnedFd {
    // SAFETY: pidfd_open takes a pid and flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(
        fd >= 0,
        "pidfd_open {pid}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new descriptor nobody else owns.
    unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).unwrap()) }
}

/// Whether the process behind `fd` ends within `t`.
fn ends_within(fd: &OwnedFd, t: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(t.as_millis()).unwrap();
    // SAFETY: poll on one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

fn start(dir: &TempDir, uid: u32) -> (Vmm, std::path::PathBuf) {
    let sock = dir.path("api.sock");
    let jail = format!("uid={uid},dir={}", dir.0.display());
    let mut vm = Vmm::start(&[
        "--jail",
        &jail,
        "--api-socket",
        sock.to_str().unwrap(),
        "--memory",
        "64M",
        "--cmdline",
        "console=ttyS0 probe.tests=idle",
    ]);
    vm.wait_for("idle: halted until stopped");
    wait_for_socket(&sock, Duration::from_secs(10));
    (vm, sock)
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_jailed_vmm_is_an_unprivileged_user_alone_in_its_namespaces_and_root() {
    need_kvm();
    let dir = TempDir::new("jail");
    let uid = test_uid(0);
    let (vm, sock) = start(&dir, uid);
    let keeper = vm.child.id();
    let pid = jailed_pid(keeper);

    // Its user, its capabilities, no_new_privs and seccomp, pid 1 of its namespace.
    let ids = format!("{uid}\t{uid}\t{uid}\t{uid}");
    assert_eq!(status_field(pid, "Uid"), ids);
    assert_eq!(status_field(pid, "Gid"), ids);
    assert_eq!(status_field(pid, "Groups"), "");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(
        status_field(pid, "Seccomp"),
        "2",
        "the main thread's filter"
    );
    assert_eq!(status_field(pid, "NSpid"), format!("{pid}\t1"));
    eprintln!("jailed VMM pid {pid} (1 inside), keeper {keeper}, uid {uid}");

    // Namespaces other than the test's (and the keeper's, but for the PID one, whose
    // children only are in the new one).
    for kind in ["mnt", "pid", "ipc", "net"] {
        assert_ne!(ns(&pid.to_string(), kind), ns("self", kind), "{kind}");
    }

    // Its root: the devices, /proc and the folder; nothing of the host's.
    let root = format!("/proc/{pid}/root");
    let mut top: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    let first = dir.0.iter().nth(1).unwrap().to_string_lossy().into_owned();
    let mut want = vec!["dev".to_string(), "proc".to_string(), first];
    want.sort();
    want.dedup();
    assert_eq!(top, want, "the jail's root");
    let mut devs: Vec<String> = std::fs::read_dir(format!("{root}/dev"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    devs.sort();
    assert_eq!(devs, ["null", "random", "urandom", "zero"]);
    assert!(Path::new(&format!("{root}{}", sock.display())).exists());
    assert!(!Path::new(&format!("{root}/etc")).exists());

    // Its limits.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| -> Vec<String> {
        let l = limits.lines().find(|l| l.starts_with(name)).unwrap();
        l[name.len()..]
            .split_whitespace()
            .take(2)
            .map(str::to_string)
            .collect()
    };
    assert_eq!(limit("Max open files"), ["1024", "1024"]);
    let space = ((64u64 << 20) + (4u64 << 30)).to_string();
    assert_eq!(limit("Max address space"), [space.clone(), space]);
    assert_eq!(limit("Max core file size"), ["0", "0"]);

    // Asked to open a host file (one that exists out there) as a hot-plugged disk, it cannot.
    assert!(Path::new("/etc/hostname").exists() || Path::new("/etc/passwd").exists());
    for f in ["/etc/hostname", "/etc/passwd"] {
        if !Path::new(f).exists() {
            continue;
        }
        let (st, body) = call(
            &sock,
            "PUT",
            "/vm/device-add",
            Some(&json!({"disk": {"path": f, "id": "stolen"}})),
        );
        assert!((400..600).contains(&st), "{f}: {st} {body}");
        let msg = body["error"].as_str().unwrap_or_default().to_string();
        assert!(msg.contains("No such file"), "{f}: {msg}");
    }
    let (st, info) = call(&sock, "GET", "/vm", None);
    assert_eq!(st, 200, "the VMM still answers: {info}");

    // SIGTERM to the keeper reaches the VMM, and the keeper ends with its status.
    let vmm = pidfd(pid);
    // SAFETY: kill of our own child.
    unsafe { libc::kill(i32::try_from(keeper).unwrap(), libc::SIGTERM) };
    assert_eq!(vm.wait(), 143, "stopped by SIGTERM (128+15), as unjailed");
    assert!(ends_within(&vmm, Duration::from_secs(5)));
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn the_jailed_vmm_dies_with_its_keeper() {
    need_kvm();
    let dir = TempDir::new("jail-keeper");
    let (mut vm, _sock) = start(&dir, test_uid(1));
    let pid = jailed_pid(vm.child.id());
    let vmm = pidfd(pid);
    vm.child.kill().unwrap();
    vm.child.wait().unwrap();
    assert!(
        ends_within(&vmm, Duration::from_secs(5)),
        "the VMM outlived its keeper"
    );
}

#[test]
fn jail_needs_root_and_a_valid_spec() {
    for (spec, says) in [
        ("uid=0", "unprivileged"),
        ("gid=5", "uid= is required"),
        ("uid=5,dir=relative", "absolute"),
    ] {
        let r = wv(&["run", "--jail", spec]);
        assert_eq!(r.code(), 200, "{spec}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{spec}: {}", r.stderr);
    }
}

/// Under the daemon every VMM is jailed by default: world N's as user 3000000000+N in the VM's
/// folder; a snapshot (written by the jailed VMM in its folder, taken by the daemon) restores;
/// a file outside the jail given as a hot-plugged disk cannot be opened.
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn the_daemon_jails_each_vmm_as_its_worlds_user() {
    need_kvm();
    let dir = TempDir::new("jail-daemon");
    let d = common::daemon::Daemon::start(&dir);
    let r = d.wv(&[
        "vm",
        "create",
        "j",
        "--memory",
        "64M",
        "--cmdline",
        "probe.tests=idle",
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let v = d.json(&["vm", "start", "j"]);
    let (id, keeper) = (v["id"].as_u64().unwrap(), v["pid"].as_u64().unwrap());
    let vm_dir = d.state.join("vms/j");
    let console = vm_dir.join("console.log");
    let t = std::time::Instant::now();
    // The guest's marker in its console log.
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("idle: halted")
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the guest did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = jailed_pid(u32::try_from(keeper).unwrap());
    let uid = 3_000_000_000u64 + id;
    let ids = format!("{uid}\t{uid}\t{uid}\t{uid}");
    assert_eq!(status_field(pid, "Uid"), ids);
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapBnd"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    for kind in ["mnt", "pid", "ipc", "net"] {
        assert_ne!(ns(&pid.to_string(), kind), ns("self", kind), "{kind}");
    }
    let root = format!("/proc/{pid}/root");
    assert!(Path::new(&format!("{root}{}", vm_dir.join("api.sock").display())).exists());
    assert!(!Path::new(&format!("{root}{}", d.state.join("worlds.json").display())).exists());
    assert!(!Path::new(&format!("{root}/etc")).exists());
    // Its cgroup is its world's, as its keeper's.
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cg.contains(&format!("world-{id}")), "{cg}");

    // The VMM, asked over its socket for a file outside its jail, cannot open it.
    let (st, body) = call(
        &vm_dir.join("api.sock"),
        "PUT",
        "/vm/device-add",
        Some(&json!({"disk": {"path": d.state.join("worlds.json"), "id": "stolen"}})),
    );
    assert!((400..600).contains(&st), "{st} {body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("No such file"),
        "{body}"
    );

    // A snapshot, written by the jailed VMM, restores as another world (another user).
    let r = d.wv(&["vm", "snapshot", "j", "s1"]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let snap = d.state.join("snapshots/s1");
    for e in std::fs::read_dir(&snap).unwrap() {
        let m = std::fs::symlink_metadata(e.unwrap().path()).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&m),
            0,
            "the daemon's now"
        );
    }
    assert!(!vm_dir.join("snapshot.partial").exists());
    let r = d.wv(&["vm", "clone", "s1", "k"]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let k = d.wait_state("k", "running");
    let kpid = jailed_pid(u32::try_from(k["pid"].as_u64().unwrap()).unwrap());
    let kuid = 3_000_000_000u64 + k["id"].as_u64().unwrap();
    assert_ne!(kuid, uid);
    assert!(status_field(kpid, "Uid").starts_with(&kuid.to_string()));
    d.stop();
}

/// Waits until the console log `log` holds a line starting with `prefix`; that line.
fn console_line(log: &Path, prefix: &str) -> String {
    let t = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.starts_with(prefix)) {
            return l.to_string();
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no '{prefix}' in {}: {text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A disk hot-plugged into a jailed VM through the daemon (`wv vm device add`): the daemon
/// opens the image, which the jailed VMM could not, and hands it over; the guest uses it; it
/// is removed (`wv vm device remove`) once the guest ejects it. A file outside the image
/// directories is refused by the daemon.
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn the_daemon_hot_plugs_a_disk_into_a_jailed_vm() {
    need_kvm();
    let dir = TempDir::new("jail-hotplug");
    let images = dir.path("images");
    std::fs::create_dir_all(&images).unwrap();
    let hot = images.join("hot0.img");
    std::fs::write(&hot, vec![0u8; 1 << 20]).unwrap();
    let d = common::daemon::Daemon::start_with(&dir, &["--images", images.to_str().unwrap()]);
    let r = d.wv(&[
        "vm",
        "create",
        "h",
        "--memory",
        "64M",
        "--cmdline",
        "console=ttyS0 probe.tests=hotplug probe.hotplug_cycles=1",
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let v = d.json(&["vm", "start", "h"]);
    let keeper = u32::try_from(v["pid"].as_u64().unwrap()).unwrap();
    let log = d.state.join("vms/h/console.log");
    console_line(&log, "hotplug: ready");
    let pid = jailed_pid(keeper);
    assert_ne!(status_field(pid, "Uid").split('\t').next().unwrap(), "0");

    let r = d.wv(&[
        "vm",
        "device",
        "add",
        "h",
        "--disk",
        &format!("path={},id=hot0", hot.display()),
    ]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let line = console_line(&log, "hotplug: added slot=");
    assert!(line.ends_with("blk hot0 rw-ok"), "{line}");
    // The guest's pattern in sector 1, written through the handed-over descriptor.
    let img = std::fs::read(&hot).unwrap();
    let seed = 0x5a_u8.wrapping_add(0x11);
    assert!(img[512..1024]
        .iter()
        .zip((0..=255u8).cycle())
        .all(|(b, i)| *b == i ^ seed));

    // Outside the image directories: refused by the daemon, whether the file exists or not.
    for f in ["/etc/hostname", "/nonexistent/x.img"] {
        let r = d.wv(&[
            "vm",
            "device",
            "add",
            "h",
            "--disk",
            &format!("path={f},id=x"),
        ]);
        assert_eq!(r.code(), 1, "{f}: {}", r.stderr);
        assert!(r.stderr.contains("image directories"), "{f}: {}", r.stderr);
    }

    let r = d.wv(&["vm", "device", "remove", "h", "hot0"]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    console_line(&log, "hotplug: ejected slot=");
    d.stop();
}
