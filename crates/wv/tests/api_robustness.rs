//! The daemon's API under hostile or unlucky use (issue 9, item 6): names that are paths,
//! definitions that cannot start, lifecycle races, descriptor exhaustion, slow clients, server
//! errors in the log, and routing details (query strings, escapes, `Allow`).

mod common;
use common::daemon::Daemon;
use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A daemon started by this file: its stderr goes to a file the test reads, and its
/// open-files limit can be lowered.
struct Logged {
    child: Child,
    socket: PathBuf,
    state: PathBuf,
    log: PathBuf,
}

impl Logged {
    fn start(dir: &TempDir, nofile: Option<u64>) -> Logged {
        let (socket, state, log) = (dir.path("wv.sock"), dir.path("state"), dir.path("host.log"));
        let mut c = Command::new(wv_bin());
        c.args(["host", "--socket", socket.to_str().unwrap()])
            .args(["--state-dir", state.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(n) = nofile {
            // SAFETY: setrlimit is async-signal-safe; it only lowers the child's own limit.
            unsafe {
                c.pre_exec(move || {
                    let l = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = c.spawn().unwrap();
        let t = Instant::now();
        while UnixStream::connect(&socket).is_err() {
            assert!(t.elapsed() < Duration::from_secs(10), "no daemon");
            std::thread::sleep(Duration::from_millis(20));
        }
        Logged {
            child,
            socket,
            state,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's CPU time (user + system) so far.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let rest = stat.rsplit_once(')').unwrap().1;
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        // Fields 14 and 15 (utime, stime) are 12 and 13 after the ')'.
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_millis((f[11] + f[12]) * 1000 / hz)
    }

    fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.child.id()))
            .unwrap()
            .count()
    }

    /// The daemon's open descriptors.
    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).map_or(0, |r| r.count())
    }

    /// The daemon's open sockets (the listener and every accepted connection).
    fn sockets(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .filter(|e| {
                let l = std::fs::read_link(e.as_ref().unwrap().path()).unwrap_or_default();
                l.to_string_lossy().starts_with("socket:")
            })
            .count()
    }

    /// The system call the daemon's main thread (its accept loop) is in.
    fn main_syscall(&self) -> Option<i64> {
        let pid = self.child.id();
        let s = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/syscall")).ok()?;
        s.split_whitespace().next()?.parse().ok()
    }
}

/// Whether the daemon has a thread whose name starts with `prefix` (truncated to 15 bytes).
fn has_thread(pid: u32, prefix: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .any(|c| c.trim_end().starts_with(prefix))
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let worlds = std::fs::read_to_string(self.state.join("worlds.json")).unwrap_or_default();
        let doc: serde_json::Value = serde_json::from_str(&worlds).unwrap_or_default();
        for w in doc["worlds"].as_array().into_iter().flatten() {
            if let Some(pid) = w["pid"].as_i64().and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: signalling a VMM this test's daemon recorded as its own.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// One exchange: (status, head, body).
fn http(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String, String) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let b = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

fn status(socket: &Path, method: &str, path: &str, body: Option<&str>) -> u16 {
    http(socket, method, path, body).0
}

fn json(socket: &Path, method: &str, path: &str) -> serde_json::Value {
    let (s, _, b) = http(socket, method, path, None);
    assert_eq!(s, 200, "{method} {path}: {b}");
    serde_json::from_str(&b).unwrap()
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn names_that_are_paths_are_refused_and_never_touch_the_state() {
    let dir = TempDir::new("api-names");
    let d = Daemon::start(&dir);
    for name in ["..", ".", "-x", ".hidden", "--help"] {
        let body = serde_json::json!({ "name": name }).to_string();
        assert_eq!(
            status(&d.socket, "POST", "/v1/vms", Some(&body)),
            422,
            "name {name:?}"
        );
    }
    assert_eq!(
        status(&d.socket, "POST", "/v1/vms", Some(r#"{"name":"keep"}"#)),
        201
    );
    d.stop();
    // A state directory from before the rule (or edited by hand) may hold such names: deleting
    // them forgets the record but never removes anything outside the VM's own folder.
    let worlds = dir.path("state/worlds.json");
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&worlds).unwrap()).unwrap();
    let keep = doc["worlds"][0].clone();
    for (i, name) in ["..", ".", "../vms/keep"].iter().enumerate() {
        let mut w = keep.clone();
        w["id"] = (100 + i).into();
        w["spec"]["name"] = (*name).into();
        doc["worlds"].as_array_mut().unwrap().push(w);
    }
    std::fs::write(&worlds, doc.to_string()).unwrap();
    std::fs::create_dir_all(dir.path("state/vms/keep")).unwrap();
    let marker = dir.file("state/vms/keep/marker", b"x");
    let d = Daemon::start(&dir);
    for path in ["/v1/vms/..", "/v1/vms/.", "/v1/vms/..%2Fvms%2Fkeep"] {
        let (s, _, b) = http(&d.socket, "DELETE", path, None);
        assert!(s == 204 || s == 404, "DELETE {path}: {s} {b}");
    }
    // Any background clean-up has done what it would, then look.
    wait_for("the clean-up threads end", Duration::from_secs(30), || {
        !has_thread(d.pid(), "helper-cleanup")
    });
    assert!(worlds.exists(), "worlds.json survives");
    assert!(marker.exists(), "another VM's folder survives");
    knows_keep(&d);
    d.stop();
    // And a restarted daemon still knows it (ids are not reused).
    let d = Daemon::start(&dir);
    knows_keep(&d);
    d.stop();
}

/// The daemon still lists the VM named "keep".
fn knows_keep(d: &Daemon) {
    let vms = json(&d.socket, "GET", "/v1/vms");
    assert!(
        vms.as_array()
            .unwrap()
            .iter()
            .any(|w| w["spec"]["name"] == "keep"),
        "{vms}"
    );
}

#[test]
fn specs_that_cannot_start_are_refused_at_create() {
    let dir = TempDir::new("api-specs");
    let d = Daemon::start(&dir);
    for body in [
        r#"{"name":"a","cmdline":"x\u0000y"}"#,
        r#"{"name":"a","kernel":"/k\u0000"}"#,
        r#"{"name":"a","disks":["path=/x\u0000.img"]}"#,
        r#"{"name":"a","nets":["tap=t\u00000"]}"#,
    ] {
        assert_eq!(
            status(&d.socket, "POST", "/v1/vms", Some(body)),
            422,
            "{body}"
        );
    }
    let long = format!(r#"{{"name":"a","cmdline":"{}"}}"#, "x".repeat(64 << 10));
    assert_eq!(status(&d.socket, "POST", "/v1/vms", Some(&long)), 422);
    let fits = format!(
        r#"{{"name":"a","cmdline":"{}"}}"#,
        "x".repeat(wv_host::world::MAX_CMDLINE)
    );
    assert_eq!(status(&d.socket, "POST", "/v1/vms", Some(&fits)), 201);
    // The number of VMs is bounded too.
    for i in 1..wv_host::api::MAX_VMS {
        let body = format!(r#"{{"name":"v{i}"}}"#);
        assert_eq!(
            status(&d.socket, "POST", "/v1/vms", Some(&body)),
            201,
            "{i}"
        );
    }
    let (s, _, b) = http(&d.socket, "POST", "/v1/vms", Some(r#"{"name":"one-more"}"#));
    assert_eq!(s, 409, "{b}");
    assert!(b.contains(&wv_host::api::MAX_VMS.to_string()), "{b}");
    assert_eq!(status(&d.socket, "DELETE", "/v1/vms/v1", None), 204);
    assert_eq!(
        status(&d.socket, "POST", "/v1/vms", Some(r#"{"name":"one-more"}"#)),
        201
    );
    d.stop();
}

/// POST start.
fn start(socket: &Path, name: &str) -> (u16, String) {
    let (s, _, b) = http(socket, "POST", &format!("/v1/vms/{name}/start"), None);
    (s, b)
}

/// Starts `name`.
fn start_hanging(socket: &Path, name: &str) {
    let (s, b) = start(socket, name);
    assert_eq!(s, 200, "{b}");
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn stop_is_not_fooled_by_a_racing_start() {
    need_kvm();
    let dir = TempDir::new("api-race");
    let d = Daemon::start(&dir);
    let sock = d.socket.clone();
    assert_eq!(
        status(
            &sock,
            "POST",
            "/v1/vms",
            Some(r#"{"name":"a","cmdline":"probe.tests=hang"}"#)
        ),
        201
    );
    for cycle in 0..3 {
        start_hanging(&sock, "a");
        let s2 = sock.clone();
        let stopper = std::thread::spawn(move || {
            let t = Instant::now();
            let r = http(&s2, "POST", "/v1/vms/a/stop", None);
            (r, t.elapsed())
        });
        // Hammer start while the stop is in flight: it must wait for the stop to finish, or be
        // refused, never slip in between the old run's end and the stop's answer.
        let t = Instant::now();
        loop {
            let (s, b) = start(&sock, "a");
            if s == 200 {
                break;
            }
            assert_eq!(s, 409, "{b}");
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "start never succeeded"
            );
        }
        let ((s, _, b), took) = stopper.join().unwrap();
        assert_eq!(s, 200, "{b}");
        let w: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(w["state"], "stopped", "cycle {cycle}: stop answered {w}");
        assert!(
            took < Duration::from_secs(4),
            "cycle {cycle}: stop took {took:?}"
        );
        let (s, _, b) = http(&sock, "POST", "/v1/vms/a/stop", None);
        assert_eq!(s, 200, "{b}");
    }
    d.stop();
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn delete_then_create_keeps_the_new_runs_folder() {
    need_kvm();
    let dir = TempDir::new("api-recreate");
    let d = Daemon::start(&dir);
    let sock = d.socket.clone();
    let spec = Some(r#"{"name":"a","cmdline":"probe.tests=hang"}"#);
    let folder = dir.path("state/vms/a");
    for cycle in 0..2 {
        assert_eq!(status(&sock, "POST", "/v1/vms", spec), 201);
        start_hanging(&sock, "a");
        assert_eq!(status(&sock, "POST", "/v1/vms/a/stop", None), 200);
        // Plenty for the old run's clean-up to chew on while the new run starts.
        for i in 0..20_000 {
            std::fs::File::create(folder.join(format!("old-{i:05}"))).unwrap();
        }
        assert_eq!(status(&sock, "DELETE", "/v1/vms/a", None), 204);
        assert_eq!(status(&sock, "POST", "/v1/vms", spec), 201);
        start_hanging(&sock, "a");
        let old_gone = || {
            std::fs::read_dir(&folder).map_or(true, |mut r| {
                !r.any(|e| e.unwrap().file_name().to_string_lossy().starts_with("old-"))
            })
        };
        wait_for(
            "the old run's files are gone",
            Duration::from_secs(60),
            old_gone,
        );
        let trash_empty =
            || std::fs::read_dir(dir.path("state/trash")).map_or(true, |mut r| r.next().is_none());
        wait_for("the clean-up ends", Duration::from_secs(60), trash_empty);
        for f in ["vmm.log", "console.log", "console.sock"] {
            assert!(
                folder.join(f).exists(),
                "cycle {cycle}: the new run's {f} is gone"
            );
        }
        let w = json(&sock, "GET", "/v1/vms/a");
        assert_eq!(w["state"], "running", "{w}");
        assert_eq!(status(&sock, "POST", "/v1/vms/a/stop", None), 200);
        assert_eq!(status(&sock, "DELETE", "/v1/vms/a", None), 204);
    }
    d.stop();
}

#[test]
fn descriptor_exhaustion_neither_spins_nor_silences_the_api() {
    let dir = TempDir::new("api-emfile");
    let d = Logged::start(&dir, Some(24));
    // Idle connections until the daemon can open no more descriptors.
    let held: Vec<UnixStream> = (0..60)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    wait_for(
        "the daemon runs out of descriptors",
        Duration::from_secs(10),
        || d.fds() >= 24,
    );
    let before = d.cpu();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let used = d.cpu() - before;
    assert!(
        used < t.elapsed() / 5,
        "the daemon used {used:?} of CPU in {:?} while out of descriptors",
        t.elapsed()
    );
    drop(held);
    // Once the clients are gone the API answers again, promptly.
    let t = Instant::now();
    let (s, _, b) = http(&d.socket, "GET", "/v1/host", None);
    assert_eq!(s, 200, "{b}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(d.log().contains("out of file descriptors"), "{}", d.log());
}

#[test]
fn connections_are_bounded() {
    let dir = TempDir::new("api-conns");
    let d = Logged::start(&dir, None);
    // The start-up check's connection may not even be accepted yet (the listener alone would
    // count 1 with it still in the backlog). One whole request answered means the daemon has
    // taken every earlier connection (a backlog is first in, first out); once those have
    // closed, the baseline is the listener alone.
    assert_eq!(status(&d.socket, "GET", "/v1/host", None), 200);
    wait_for(
        "the daemon closes the start-up check",
        Duration::from_secs(10),
        || d.sockets() == 1,
    );
    let (base, sockets) = (d.threads(), d.sockets());
    // Fewer than a listen backlog of 128 can hold beyond the daemon's cap.
    let n = wv_host::api::MAX_CONNECTIONS + 64;
    let held: Vec<UnixStream> = (0..n)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    // The daemon has taken what it will: either every connection, or its cap with its accept
    // loop parked on the cap (a futex wait instead of accept).
    let accepted = || d.sockets() - sockets;
    let t = Instant::now();
    while !(accepted() == n
        || (accepted() >= wv_host::api::MAX_CONNECTIONS
            && d.main_syscall() == Some(libc::SYS_futex)))
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the daemon takes its connections within 10 s: {} of {n} taken (cap {}), its main \
             thread in system call {:?}",
            accepted(),
            wv_host::api::MAX_CONNECTIONS,
            d.main_syscall()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let threads = d.threads();
    assert!(
        accepted() <= wv_host::api::MAX_CONNECTIONS
            && threads <= base + wv_host::api::MAX_CONNECTIONS,
        "{} connections taken, {threads} threads (from {base}) for {n} idle clients",
        accepted()
    );
    drop(held);
    assert_eq!(status(&d.socket, "GET", "/v1/host", None), 200);
}

#[test]
fn a_slow_request_times_out_as_a_whole() {
    let dir = TempDir::new("api-slow");
    let d = Logged::start(&dir, None);
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let t = Instant::now();
    // One byte a second: each read is quick, the request never completes in time. (Once
    // the daemon has answered and closed, a write fails.)
    for b in b"GET /v1/host HTTP/1.1\r\nX-Slow: yes\r\n\r\n" {
        if s.write_all(&[*b]).is_err() || t.elapsed() > Duration::from_secs(20) {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let took = t.elapsed();
    assert!(out.starts_with("HTTP/1.1 408 "), "after {took:?}: {out}");
    let limit = wv_host::api::REQUEST_TIMEOUT;
    assert!(
        took >= limit - Duration::from_secs(1) && took < limit + Duration::from_secs(3),
        "answered after {took:?}"
    );
}

#[test]
fn server_errors_are_logged_with_their_cause() {
    let dir = TempDir::new("api-500");
    let d = Logged::start(&dir, None);
    // The state cannot be saved: the temporary file's name is taken by a directory.
    std::fs::create_dir_all(d.state.join("worlds.json.tmp")).unwrap();
    let (s, _, b) = http(&d.socket, "POST", "/v1/vms", Some(r#"{"name":"a"}"#));
    assert_eq!(s, 500, "{b}");
    let log = d.log();
    assert!(
        log.lines().any(|l| l.contains("500")
            && l.contains("POST /v1/vms")
            && l.contains("worlds.json.tmp")),
        "{log}"
    );
    // Nothing half-done: the VM was not recorded.
    std::fs::remove_dir(d.state.join("worlds.json.tmp")).unwrap();
    assert_eq!(json(&d.socket, "GET", "/v1/vms"), serde_json::json!([]));
}

#[test]
fn routing_query_strings_escapes_and_allow() {
    let dir = TempDir::new("api-routing");
    let d = Daemon::start(&dir);
    let sock = d.socket.clone();
    assert_eq!(status(&sock, "GET", "/v1/host?verbose=1", None), 200);
    assert_eq!(
        status(&sock, "POST", "/v1/vms", Some(r#"{"name":"a.b"}"#)),
        201
    );
    assert_eq!(status(&sock, "GET", "/v1/vms/a%2Eb", None), 200);
    assert_eq!(status(&sock, "GET", "/v1/vms/a%2eb?x=%2F", None), 200);
    let (s, _, b) = http(&sock, "GET", "/v1/vms/a%2Fb", None);
    assert_eq!(s, 404, "{b}");
    assert!(b.contains("a/b"), "{b}");
    assert_eq!(status(&sock, "GET", "/v1/vms/a%zz", None), 400);
    assert_eq!(status(&sock, "GET", "/v1/vms/a%00", None), 400);
    for (method, path, allow) in [
        ("DELETE", "/v1/host", "GET"),
        ("PUT", "/v1/vms", "GET, POST"),
        ("POST", "/v1/vms/a.b", "GET, PATCH, DELETE"),
        ("GET", "/v1/vms/a.b/start", "POST"),
        ("POST", "/v1/vms/a.b/stats", "GET"),
    ] {
        let (s, head, _) = http(&sock, method, path, None);
        assert_eq!(s, 405, "{method} {path}");
        assert!(
            head.lines()
                .any(|l| l.eq_ignore_ascii_case(&format!("allow: {allow}"))),
            "{method} {path}: {head}"
        );
    }
    // PATCH: null removes the limit; an underflowing number does not.
    let patch = |body: &str| http(&sock, "PATCH", "/v1/vms/a.b", Some(body));
    assert_eq!(patch(r#"{"limit":0.5}"#).0, 200);
    assert_eq!(patch(r#"{"limit":1e-400}"#).0, 422);
    assert_eq!(patch(r#"{"limit":0.001}"#).0, 422);
    let w = json(&sock, "GET", "/v1/vms/a.b");
    assert_eq!(w["spec"]["limit"], 0.5, "{w}");
    assert_eq!(patch(r#"{"limit":null}"#).0, 200);
    assert!(json(&sock, "GET", "/v1/vms/a.b")["spec"]
        .get("limit")
        .is_none());
    assert_eq!(patch(r#"{"limit":0.5}"#).0, 200);
    assert_eq!(patch(r#"{"limit":0}"#).0, 200, "0 removes the limit too");
    assert_eq!(patch(r#"{"shares":null}"#).0, 400);
    assert_eq!(patch(r#"{"reservation":null}"#).0, 400);
    d.stop();
}

#[test]
fn with_image_directories_a_vm_takes_files_from_them_only() {
    let dir = TempDir::new("api-images");
    let images = dir.path("images");
    std::fs::create_dir_all(&images).unwrap();
    let inside = images.join("disk.img");
    std::fs::write(&inside, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(dir.path("outside.img"), vec![0u8; 1 << 20]).unwrap();
    // A link inside that leads outside counts as outside.
    std::os::unix::fs::symlink("/etc/passwd", images.join("sneaky.img")).unwrap();
    let d = Daemon::start_with(&dir, &["--images", images.to_str().unwrap()]);
    let create = |name: &str, field: &str, value: &str| {
        let body = format!(r#"{{"name":"{name}","{field}":{value}}}"#);
        d.raw(
            format!(
                "POST /v1/vms HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    };
    let disk = |p: &Path| format!(r#"["path={}"]"#, p.display());
    assert_eq!(create("ok", "disks", &disk(&inside)).0, 201);
    // Outside (existing or not, directly or through a link): the same refusal, which does not
    // say whether the file exists.
    let refusals: Vec<String> = [
        ("a", "disks", disk(Path::new("/etc/shadow"))),
        ("b", "disks", disk(&dir.path("outside.img"))),
        ("c", "disks", disk(&dir.path("no-such.img"))),
        ("d", "disks", disk(&images.join("sneaky.img"))),
        ("e", "kernel", r#""/etc/shadow""#.to_string()),
        (
            "f",
            "initrd",
            format!(r#""{}""#, dir.path("no-such").display()),
        ),
    ]
    .iter()
    .map(|(name, field, value)| {
        let (status, body) = create(name, field, value);
        assert_eq!(status, 422, "{name}: {body}");
        assert!(body.contains("image directories"), "{name}: {body}");
        let path_free: String = serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"]
            .as_str()
            .unwrap()
            .split(' ')
            .skip(2)
            .collect::<Vec<_>>()
            .join(" ");
        path_free
    })
    .collect();
    assert!(refusals.windows(2).all(|w| w[0] == w[1]), "{refusals:?}");
    assert_eq!(d.json(&["vm", "list"]).as_array().unwrap().len(), 1);
    // A directory that does not exist stops the daemon at start, in one line.
    let mut c = Command::new(wv_bin());
    c.args(["host", "--socket"])
        .arg(dir.path("y.sock"))
        .args(["--state-dir"])
        .arg(dir.path("y"))
        .args(["--images", "/nonexistent-images"]);
    let r = run_cmd(c, Duration::from_secs(30));
    assert_eq!(r.status, Some(1), "{r}");
    assert!(r.stderr.contains("--images: /nonexistent-images"), "{r}");
}
