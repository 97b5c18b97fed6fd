//! The VMM's per-thread system-call filters (`wv run --seccomp`, crates/vmm/src/seccomp/): for
//! each kind of thread, a call outside its list (made by the `WV_SECCOMP_PROBE=KIND` debug
//! hook: `getpgid`, which no list allows) ends `wv` with status 208 and a line naming the
//! thread and the call under `kill` (the default), and is reported and let through under
//! `log`, the VM running on to its normal end.

mod common;

use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `wv run ARGS` with `WV_SECCOMP_PROBE=kind` and `--seccomp=mode`.
fn probed(kind: &str, mode: &str, args: &[&str]) -> Command {
    let mut c = Command::new(wv_bin());
    c.env("WV_SECCOMP_PROBE", kind)
        .arg("run")
        .arg(format!("--seccomp={mode}"))
        .args(args);
    c
}

fn kill_line(kind: &str) -> String {
    format!("wv: SECCOMP: thread {kind} made a forbidden system call getpgid (121)")
}

fn log_line(kind: &str) -> String {
    format!("wv: SECCOMP (log): thread {kind} made system call getpgid (121)")
}

/// Under kill: status 208 and the line; under log: the line and the VM's own end (status 0).
fn check(kind: &str, args: &[&str]) {
    need_kvm();
    let r = run_cmd(probed(kind, "kill", args), Duration::from_secs(120));
    assert_eq!(r.status, Some(208), "{r}");
    assert!(r.stderr.contains(&kill_line(kind)), "{r}");
    let r = run_cmd(probed(kind, "log", args), Duration::from_secs(120));
    assert_eq!(r.status, Some(0), "{r}");
    assert!(r.stderr.contains(&log_line(kind)), "{r}");
    assert!(!r.stderr.contains("wv: SECCOMP: "), "{r}");
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn main_thread() {
    check("main", &["--cmdline", "probe.tests=pci"]);
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn vcpu_thread() {
    check("vcpu", &["--vcpus", "2", "--cmdline", "probe.tests=pci"]);
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn control_thread() {
    check("control", &["--cmdline", "probe.tests=pci"]);
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn spawner_thread() {
    check("spawner", &["--cmdline", "probe.tests=pci"]);
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn virtio_rng_worker() {
    check("virtio-rng", &["--cmdline", "probe.tests=rng"]);
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn virtio_balloon_worker() {
    // The hostile requests make the worker release pages (madvise) before the guest ends.
    check(
        "virtio-balloon",
        &[
            "--balloon",
            "on",
            "--cmdline",
            "probe.tests=balloon probe.balloon_mib=8 probe.balloon_hostile=1 probe.balloon_quit=1",
        ],
    );
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn virtio_blk_worker() {
    let dir = TempDir::new("seccomp-blk");
    let img = dir.path("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let disk = format!("path={},id=root", img.display());
    check(
        "virtio-blk",
        &["--disk", &disk, "--cmdline", "probe.tests=blk"],
    );
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn api_thread() {
    let dir = TempDir::new("seccomp-api");
    let sock = dir.path("api.sock");
    check(
        "api",
        &[
            "--api-socket",
            sock.to_str().unwrap(),
            "--cmdline",
            "probe.tests=pci",
        ],
    );
}

/// Sends one request on the VMM's socket (waiting for the socket to appear); its answer, if any.
fn request(sock: &Path, req: &str) -> String {
    let start = Instant::now();
    let mut s = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) if start.elapsed() > Duration::from_secs(60) => panic!("{e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn api_connection_thread() {
    need_kvm();
    let dir = TempDir::new("seccomp-api-conn");
    let sock = dir.path("api.sock");
    let args = [
        "--api-socket",
        sock.to_str().unwrap(),
        "--serial",
        "none",
        "--cmdline",
        "probe.tests=burn",
    ];
    for mode in ["kill", "log"] {
        let mut c = probed("api-conn", mode, &args);
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let answer = request(&sock, "GET /vm HTTP/1.1\r\nHost: x\r\n\r\n");
        if mode == "log" {
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            request(&sock, "PUT /vm/shutdown HTTP/1.1\r\nHost: x\r\n\r\n");
        }
        let st = wait_within(&mut child, "VMM", Duration::from_secs(60));
        let stderr = reader.join().unwrap();
        if mode == "kill" {
            assert_eq!(st, Some(208), "{stderr}");
            assert!(stderr.contains(&kill_line("api-conn")), "{stderr}");
        } else {
            assert!(stderr.contains(&log_line("api-conn")), "{stderr}");
            assert!(!stderr.contains("wv: SECCOMP: "), "{stderr}");
        }
    }
}

/// The teardown helper is a process of its own that outlives `wv`: under `kill` the refused
/// call ends the helper (and so the teardown it was finishing), not `wv`, which has already
/// decided its status (the guest's).
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn teardown_helper() {
    need_kvm();
    let args = ["--cmdline", "probe.tests=pci"];
    for (mode, line) in [
        ("kill", kill_line("teardown")),
        ("log", log_line("teardown")),
    ] {
        let r = run_cmd(probed("teardown", mode, &args), Duration::from_secs(120));
        assert_eq!(r.status, Some(0), "{r}");
        assert!(r.stderr.contains(&line), "{r}");
    }
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn virtio_net_worker() {
    need_kvm();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("the virtio-net seccomp test needs root to create a namespace and a TAP");
    }
    let ns = format!("wvt-sc-{}", std::process::id());
    let ip = |a: &[&str]| {
        let st = Command::new("ip").args(a).status().expect("ip (iproute2)");
        assert!(st.success(), "ip {a:?}");
    };
    ip(&["netns", "add", &ns]);
    struct Del(String);
    impl Drop for Del {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _del = Del(ns.clone());
    ip(&["-n", &ns, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
    ip(&["-n", &ns, "addr", "add", "10.77.9.1/24", "dev", "tap0"]);
    ip(&["-n", &ns, "link", "set", "tap0", "up"]);
    for mode in ["kill", "log"] {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns])
            .arg(wv_bin())
            .env("WV_SECCOMP_PROBE", "virtio-net")
            .args(["run", &format!("--seccomp={mode}"), "--net", "tap=tap0"])
            .args(["--cmdline", "probe.tests=net probe.net=10.77.9.2,10.77.9.1"]);
        let r = run_cmd(c, Duration::from_secs(120));
        if mode == "kill" {
            assert_eq!(r.status, Some(208), "{r}");
            assert!(r.stderr.contains(&kill_line("virtio-net")), "{r}");
        } else {
            assert_eq!(r.status, Some(0), "{r}");
            r.assert_pass("net");
            assert!(r.stderr.contains(&log_line("virtio-net")), "{r}");
        }
    }
}

#[test]
fn a_bad_mode_is_a_usage_error() {
    let r = wv(&["run", "--seccomp=maybe"]);
    assert_eq!(r.status, Some(200), "{r}");
    assert!(r.stderr.contains("use off, log or kill"), "{r}");
}

/// A `wv run` (with `env`) whose stderr is read on a thread; returns the child and the reader.
fn spawn_vmm(
    env: &[(&str, &str)],
    args: &[&str],
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<String>,
    std::thread::JoinHandle<String>,
) {
    let mut c = Command::new(wv_bin());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for l in std::io::BufReader::new(err).lines() {
            let Ok(l) = l else { break };
            all.push_str(&l);
            all.push('\n');
            let _ = tx.send(l);
        }
        all
    });
    (child, rx, reader)
}

/// Which side of a migration ends on its own; the other is then stopped (a source whose
/// target died after GO stays paused, since the target may have run the VM).
#[derive(PartialEq)]
enum Ends {
    Both,
    Source,
    Target,
}

/// Both sides of a migration, killed if a test fails before they end (no VMM left behind).
struct Pair {
    src: std::process::Child,
    dst: std::process::Child,
}

impl Drop for Pair {
    fn drop(&mut self) {
        for c in [&mut self.src, &mut self.dst] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The exit status of `child`, which must end within `limit` (otherwise it is killed and the
/// test fails: a VMM that hangs is a failure, not a wait without end).
fn wait_within(child: &mut std::process::Child, what: &str, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the {what} did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Ends `child` (SIGKILL) and reaps it; its status.
fn stop(child: &mut std::process::Child) -> Option<i32> {
    let _ = child.kill();
    child.wait().unwrap().code()
}

/// A forced post-copy migration over loopback with the source's and the target's environment;
/// (source status, source stderr, target status, target stderr). Each side must end within a
/// minute (the migration itself takes seconds).
fn postcopy(
    src_env: &[(&str, &str)],
    dst_env: &[(&str, &str)],
    mode: &str,
    ends: Ends,
) -> (Option<i32>, String, Option<i32>, String) {
    const LIMIT: Duration = Duration::from_secs(60);
    let dir = TempDir::new("seccomp-postcopy");
    let sock = dir.path("api.sock");
    let seccomp = format!("--seccomp={mode}");
    let (dst, dst_lines, dst_err) = spawn_vmm(dst_env, &[&seccomp, "--incoming", "127.0.0.1:0"]);
    let first = dst_lines.recv_timeout(Duration::from_secs(30));
    let (src, _src_lines, src_err) = spawn_vmm(
        src_env,
        &[
            &seccomp,
            "--memory",
            "128M",
            "--serial",
            "none",
            "--api-socket",
            sock.to_str().unwrap(),
            "--cmdline",
            "probe.tests=persist probe.persist_mib=32 probe.persist_rate=100 probe.persist_ms=2000",
        ],
    );
    let mut p = Pair { src, dst };
    let first = first.expect("the target said where it listens");
    let addr = first
        .strip_prefix("wv: waiting for a migration on ")
        .unwrap_or_else(|| panic!("unexpected first line from the target: {first}"))
        .to_string();
    let body = format!(r#"{{"destination": "{addr}", "mode": "postcopy"}}"#);
    request(
        &sock,
        &format!(
            "PUT /vm/migrate-send HTTP/1.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    let (src_status, dst_status) = match ends {
        Ends::Both => {
            let s = wait_within(&mut p.src, "source", LIMIT);
            (s, wait_within(&mut p.dst, "target", LIMIT))
        }
        Ends::Source => {
            let s = wait_within(&mut p.src, "source", LIMIT);
            (s, stop(&mut p.dst))
        }
        Ends::Target => {
            let d = wait_within(&mut p.dst, "target", LIMIT);
            (stop(&mut p.src), d)
        }
    };
    drop(p);
    (
        src_status,
        src_err.join().unwrap(),
        dst_status,
        dst_err.join().unwrap(),
    )
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn postcopy_threads_under_log() {
    need_kvm();
    let (s, serr, d, derr) = postcopy(
        &[("WV_SECCOMP_PROBE", "migrate-back")],
        &[("WV_SECCOMP_PROBE", "postcopy-recv")],
        "log",
        Ends::Both,
    );
    assert_eq!(s, Some(0), "{serr}");
    assert_eq!(d, Some(0), "{derr}");
    assert!(serr.contains(&log_line("migrate-back")), "{serr}");
    assert!(derr.contains(&log_line("postcopy-recv")), "{derr}");
    let (s, serr, d, derr) = postcopy(
        &[],
        &[("WV_SECCOMP_PROBE", "postcopy-fault")],
        "log",
        Ends::Both,
    );
    assert_eq!((s, d), (Some(0), Some(0)), "{serr}\n{derr}");
    assert!(derr.contains(&log_line("postcopy-fault")), "{derr}");
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn postcopy_threads_under_kill() {
    need_kvm();
    let (s, serr, _, _) = postcopy(
        &[("WV_SECCOMP_PROBE", "migrate-back")],
        &[],
        "kill",
        Ends::Source,
    );
    assert_eq!(s, Some(208), "{serr}");
    assert!(serr.contains(&kill_line("migrate-back")), "{serr}");
    for kind in ["postcopy-recv", "postcopy-fault"] {
        let (_, _, d, derr) = postcopy(&[], &[("WV_SECCOMP_PROBE", kind)], "kill", Ends::Target);
        assert_eq!(d, Some(208), "{derr}");
        assert!(derr.contains(&kill_line(kind)), "{derr}");
    }
}
