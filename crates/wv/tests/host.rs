//! The host daemon through its real API socket: VM lifecycle, a VMM killed with SIGKILL, a
//! daemon restart with a VM running, and bad requests (4xx, the daemon keeps serving).

mod common;
use common::daemon::Daemon;
use common::*;
use std::collections::HashSet;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Whether `pid` runs (a zombie, already exited but not yet reaped by init, does not).
fn pid_alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn lifecycle_crash_and_restart() {
    need_kvm();
    let dir = TempDir::new("host");
    let d = Daemon::start(&dir);
    let r = d.wv(&["vm", "create", "quick", "--cmdline", "probe.tests=boot"]);
    assert_eq!(r.status, Some(0), "{r}");
    d.wv(&[
        "vm",
        "create",
        "spin",
        "--vcpus",
        "2",
        "--memory",
        "64M",
        "--cmdline",
        "probe.tests=hang",
    ]);
    d.wv(&["vm", "create", "victim", "--cmdline", "probe.tests=hang"]);
    let list = d.json(&["vm", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 3);
    assert_eq!(list[1]["spec"]["memory"], 64 << 20, "memory in bytes");
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v["state"] == "defined"));

    // A guest that powers off ends 'stopped' with its exit code; its console is kept.
    d.json(&["vm", "start", "quick"]);
    let q = d.wait_state("quick", "stopped");
    assert_eq!(q["reason"], "guest powered off with exit code 0");
    let console = std::fs::read_to_string(d.state.join("vms/quick/console.log")).unwrap();
    assert!(console.contains("PASS boot"), "{console}");
    // The daemon handed its VMM the whole configuration in one file only its owner reads:
    // the definition without what only the daemon uses.
    let file = d.state.join("vms/quick/config.json");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let mut want = d.json(&["vm", "info", "quick"])["spec"].clone();
    for daemon_only in ["name", "shares", "reservation", "limit"] {
        want.as_object_mut().unwrap().remove(daemon_only);
    }
    assert_eq!(config, want);

    // SIGKILL of one VMM: that VM is 'crashed', the other keeps running, the daemon serves.
    let spin = d.json(&["vm", "start", "spin"]);
    let victim = d.json(&["vm", "start", "victim"]);
    assert_eq!(spin["state"], "running");
    // SAFETY: killing the VMM process the daemon started.
    unsafe {
        libc::kill(
            i32::try_from(victim["pid"].as_u64().unwrap()).unwrap(),
            libc::SIGKILL,
        )
    };
    let v = d.wait_state("victim", "crashed");
    assert_eq!(v["reason"], "VMM killed by signal 9");
    let spin_pid = spin["pid"].as_u64().unwrap();
    assert!(pid_alive(spin_pid));
    // Its command line names that file, and no VM option.
    let argv = std::fs::read(format!("/proc/{spin_pid}/cmdline")).unwrap();
    let argv: Vec<&[u8]> = argv.split(|&b| b == 0).collect();
    let config = d.state.join("vms/spin/config.json");
    assert!(
        argv.windows(2)
            .any(|w| w == [&b"--config"[..], config.to_str().unwrap().as_bytes()]),
        "{:?}",
        String::from_utf8_lossy(&argv.concat())
    );
    assert!(!argv.iter().any(|a| *a == b"--memory" || *a == b"--vcpus"));
    assert_eq!(d.json(&["vm", "info", "spin"])["state"], "running");

    // Pause parks every vCPU through the VMM's control socket, not SIGSTOP (no thread of the
    // VMM is stopped): their CPU time stands still; resume continues them.
    assert_eq!(d.json(&["vm", "pause", "spin"])["state"], "paused");
    let stopped_thread = |pid: u64| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("stat")).ok())
            .any(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('T'))
            })
    };
    let vcpu_time = || -> Vec<(u64, u64)> {
        d.json(&["vm", "stats", "spin"])["threads"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["name"] == "wv" || t["name"].as_str().unwrap().starts_with("vcpu"))
            .map(|t| (t["tid"].as_u64().unwrap(), t["cpu_ns"].as_u64().unwrap()))
            .collect()
    };
    assert!(!stopped_thread(spin_pid), "a true pause stops no thread");
    let before = vcpu_time();
    assert!(!before.is_empty());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(before, vcpu_time(), "vCPUs ran while paused");
    assert_eq!(
        d.wv(&["vm", "pause", "spin"]).status,
        Some(1),
        "pausing twice is a conflict"
    );
    assert_eq!(d.json(&["vm", "resume", "spin"])["state"], "running");
    let t = Instant::now();
    while vcpu_time() == before {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the vCPUs did not run again after resume"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Restart the daemon: definitions persist and the running VMM is re-adopted.
    d.stop_keeping_vmms();
    assert!(
        pid_alive(spin_pid),
        "stopping the daemon must not stop the VMs"
    );
    let d = Daemon::start(&dir);
    let spin = d.json(&["vm", "info", "spin"]);
    assert_eq!(
        (spin["state"].as_str(), spin["pid"].as_u64()),
        (Some("running"), Some(spin_pid))
    );
    assert_eq!(d.json(&["vm", "info", "victim"])["state"], "crashed");
    assert_eq!(d.json(&["vm", "list"]).as_array().unwrap().len(), 3);
    let stopped = d.json(&["vm", "stop", "spin"]);
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(!pid_alive(spin_pid));

    // Delete, and it is gone.
    let r = d.wv(&["vm", "delete", "quick"]);
    assert_eq!(r.status, Some(0), "{r}");
    let r = d.wv(&["vm", "info", "quick"]);
    assert_eq!(r.status, Some(1), "{r}");
    assert!(
        r.stderr.contains("no VM named 'quick'") && r.stderr.contains("404"),
        "{r}"
    );
    let host = d.json(&["host", "status"]);
    assert_eq!(host["vms"], 2);
    d.stop();
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn bad_requests_get_4xx_and_the_daemon_keeps_serving() {
    need_kvm();
    let dir = TempDir::new("host-bad");
    let d = Daemon::start(&dir);
    let post = |body: &str| {
        format!(
            "POST /v1/vms HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (post("{not json").into_bytes(), 400, "invalid VM spec"),
        (
            post(r#"{"name":"a","colour":"red"}"#).into_bytes(),
            400,
            "unknown field",
        ),
        (
            post(r#"{"name":"a","vcpus":99}"#).into_bytes(),
            422,
            "out of range",
        ),
        (
            post(r#"{"name":"bad name"}"#).into_bytes(),
            422,
            "invalid name",
        ),
        (
            post(r#"{"name":"a","memory":"1T"}"#).into_bytes(),
            422,
            "exceeds",
        ),
        (
            b"GET /v1/nothing HTTP/1.1\r\n\r\n".to_vec(),
            404,
            "no such resource",
        ),
        (b"PUT /v1/vms HTTP/1.1\r\n\r\n".to_vec(), 405, "not allowed"),
        (
            b"GET /v1/vms/ghost HTTP/1.1\r\n\r\n".to_vec(),
            404,
            "no VM named 'ghost'",
        ),
        (
            b"POST /v1/vms/ghost/start HTTP/1.1\r\n\r\n".to_vec(),
            404,
            "no VM named",
        ),
        (
            b"complete nonsense\r\n\r\n".to_vec(),
            400,
            "malformed request line",
        ),
        (
            b"POST /v1/vms HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            411,
            "Content-Length",
        ),
        (
            b"POST /v1/vms HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n".to_vec(),
            413,
            "limit",
        ),
    ];
    for (req, status, needle) in cases {
        let (s, body) = d.raw(&req);
        assert_eq!(s, status, "{}: {body}", String::from_utf8_lossy(&req));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(v["error"].as_str().unwrap().contains(needle), "{body}");
    }
    // State conflicts.
    assert_eq!(
        d.raw(post(r#"{"name":"x","cmdline":"probe.tests=hang"}"#).as_bytes())
            .0,
        201
    );
    assert_eq!(d.raw(post(r#"{"name":"x"}"#).as_bytes()).0, 409);
    assert_eq!(d.raw(b"POST /v1/vms/x/stop HTTP/1.1\r\n\r\n").0, 409);
    assert_eq!(d.raw(b"POST /v1/vms/x/start HTTP/1.1\r\n\r\n").0, 200);
    assert_eq!(d.raw(b"POST /v1/vms/x/start HTTP/1.1\r\n\r\n").0, 409);
    assert_eq!(d.raw(b"DELETE /v1/vms/x HTTP/1.1\r\n\r\n").0, 409);
    assert_eq!(d.raw(b"POST /v1/vms/x/stop HTTP/1.1\r\n\r\n").0, 200);
    assert_eq!(d.raw(b"DELETE /v1/vms/x HTTP/1.1\r\n\r\n").0, 204);
    // A client that connects and says nothing, or hangs up mid-request, costs nothing.
    drop(UnixStream::connect(&d.socket).unwrap());
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.write_all(b"POST /v1/vms HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
        .unwrap();
    drop(s);
    assert_eq!(
        d.raw(b"GET /v1/host HTTP/1.1\r\n\r\n").0,
        200,
        "the daemon is still serving"
    );
    // CLI errors: no daemon at the socket.
    let mut c = Command::new(wv_bin());
    c.args(["vm", "list"])
        .env("WV_SOCKET", dir.path("nothing.sock"));
    let r = run_cmd(c, Duration::from_secs(10));
    assert_eq!(r.status, Some(2), "{r}");
    assert!(r.stderr.contains("is `wv host` running?"), "{r}");
    d.stop();
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn definitions_from_json_and_toml_files() {
    need_kvm();
    let dir = TempDir::new("host-files");
    let d = Daemon::start(&dir);
    let toml = dir.file(
        "web.toml",
        b"name = \"web\"\nmemory = \"64M\"\nvcpus = 2\nshares = 2500\nreservation = 0.5\ndisks = [\"path=/srv/web.img\"]\n",
    );
    let r = d.wv(&["vm", "create", "--file", toml.to_str().unwrap()]);
    assert_eq!(r.status, Some(0), "{r}");
    let v = d.json(&["vm", "info", "web"]);
    assert_eq!(v["spec"]["vcpus"], 2);
    assert_eq!(v["spec"]["shares"], 2500);
    assert_eq!(v["spec"]["reservation"], 0.5);
    assert_eq!(
        v["spec"]["disks"][0],
        serde_json::json!({"path": "/srv/web.img", "readonly": false, "id": "disk0"}),
        "the disk's text is read, the typed disk kept"
    );
    // The same file under another name, and a JSON file.
    let r = d.wv(&["vm", "create", "web2", "--file", toml.to_str().unwrap()]);
    assert_eq!(r.status, Some(0), "{r}");
    let json = dir.file(
        "db.json",
        br#"{"name":"db","memory":134217728,"limit":0.5,"disks":[{"path":"db.img","id":"db"}]}"#,
    );
    let r = d.wv(&["vm", "create", "--file", json.to_str().unwrap()]);
    assert_eq!(r.status, Some(0), "{r}");
    let db = d.json(&["vm", "info", "db"]);
    assert_eq!(db["spec"]["limit"], 0.5);
    assert_eq!(db["spec"]["memory"], 128 << 20);
    assert_eq!(
        db["spec"]["disks"][0]["path"],
        dir.path("db.img").to_str().unwrap(),
        "relative to the file"
    );
    // Bad files: one line each, nothing created.
    let bad_toml = dir.file("bad.toml", b"name = \n");
    let unknown = dir.file("unknown.json", br#"{"name":"x","colour":"red"}"#);
    for (file, status, needle) in [
        (bad_toml.to_str().unwrap(), 200, "bad.toml"),
        ("/nonexistent.json", 200, "cannot read"),
        (unknown.to_str().unwrap(), 200, "unknown field"),
    ] {
        let r = d.wv(&["vm", "create", "--file", file]);
        assert_eq!(r.status, Some(status), "{r}");
        assert!(r.stderr.contains(needle), "{r}");
    }
    let list = d.json(&["vm", "list"]);
    let ids: Vec<u64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        [2, 3, 4],
        "VMs are numbered from 2 (0 and 1 are system worlds)"
    );
    d.stop();

    // A state directory from before the system worlds were numbered, with a VM at id 1: the
    // daemon renumbers it and keeps its definition.
    let path = dir.path("state").join("worlds.json");
    let old = std::fs::read_to_string(&path).unwrap();
    let mut doc: serde_json::Value = serde_json::from_str(&old).unwrap();
    doc["worlds"][0]["id"] = 1.into();
    doc["next_id"] = 2.into();
    std::fs::write(&path, doc.to_string()).unwrap();
    let d = Daemon::start(&dir);
    let web = d.json(&["vm", "info", "web"]);
    assert!(web["id"].as_u64().unwrap() >= 2, "{web}");
    assert_eq!(web["spec"]["shares"], 2500);
    let r = d.wv(&["vm", "create", "late", "--cmdline", "probe.tests=boot"]);
    assert_eq!(r.status, Some(0), "{r}");
    let ids: HashSet<u64> = d
        .json(&["vm", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 4, "ids stay unique: {ids:?}");
    assert!(ids.iter().all(|&i| i >= 2), "{ids:?}");
    d.stop();
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn console_attaches_to_the_serial_port() {
    need_kvm();
    let dir = TempDir::new("host-console");
    let d = Daemon::start(&dir);
    let r = d.wv(&[
        "vm",
        "create",
        "e",
        "--memory",
        "32M",
        "--cmdline",
        "probe.tests=echo",
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    let r = d.wv(&["vm", "console", "e"]);
    assert!(
        r.status == Some(1) && r.stderr.contains("not running"),
        "{r}"
    );
    let r = d.wv(&["vm", "start", "e"]);
    assert_eq!(r.status, Some(0), "{r}");
    // Input through the CLI's standard input; the echo test powers off at 'q', which ends the
    // console session.
    let mut c = Command::new(wv_bin());
    c.args(["vm", "console", "e"])
        .env("WV_SOCKET", &d.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = std::io::Read::read(&mut stdout, &mut buf) {
            all.extend_from_slice(&buf[..n]);
            let _ = tx.send(String::from_utf8_lossy(&all).into_owned());
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    stdin.write_all(b"hello").unwrap();
    // 'q' only once the guest has echoed the rest, so that it counts all five.
    let t = Instant::now();
    loop {
        let left = Duration::from_secs(30).saturating_sub(t.elapsed());
        match rx.recv_timeout(left) {
            Ok(text) if text.contains("hello") => break,
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "the guest never echoed 'hello': {e}; wv vm console said: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    stdin.write_all(b"q").unwrap();
    drop(stdin);
    let status = child.wait().unwrap();
    let text = reader.join().unwrap();
    assert!(status.success(), "{text}");
    // The banner was printed before we attached: it comes from the replay.
    assert!(text.contains("Worldvisor probe guest"), "{text}");
    assert!(text.contains("hello"), "{text}");
    assert!(text.contains("PASS echo echoed=5"), "{text}");
    let v = d.wait_state("e", "stopped");
    assert!(v["console"].is_null(), "{v}");
    d.stop();
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn tcp_only_when_asked() {
    need_kvm();
    let dir = TempDir::new("host-tcp");
    let port = 20_000 + std::process::id() % 20_000;
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(&dir, &["--listen", &addr]);
    let tcp = format!("tcp:{addr}");
    // The token: made at first start, the owner's only, shown by `wv host token`.
    let token_file = dir.path("state").join("api-token");
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert!(token.len() >= 64 && token.bytes().all(|b| b.is_ascii_hexdigit()));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let shown = wv(&[
        "host",
        "token",
        "--state-dir",
        dir.path("state").to_str().unwrap(),
    ]);
    assert_eq!(shown.stdout.trim(), token, "{shown}");
    let over_tcp = |args: &[&str], token: Option<&str>| {
        let mut c = Command::new(wv_bin());
        c.args(args).env("WV_SOCKET", &tcp).env_remove("WV_TOKEN");
        if let Some(t) = token {
            c.env("WV_TOKEN", t);
        }
        run_cmd(c, Duration::from_secs(30))
    };
    let r = over_tcp(&["vm", "create", "t", "--json"], Some(&token));
    assert_eq!(r.status, Some(0), "{r}");
    // The same daemon answers on both.
    assert_eq!(d.json(&["vm", "info", "t"])["spec"]["name"], "t");
    // Without the token, or with another, nothing: 401 (the client exits 1 with the reason).
    for bad in [None, Some("0123")] {
        let r = over_tcp(&["vm", "create", "u", "--json"], bad);
        assert_eq!(r.status, Some(1), "{r}");
        assert!(r.stderr.contains("token"), "{r}");
    }
    assert!(
        d.json(&["vm", "list"]).as_array().unwrap().len() == 1,
        "no VM u"
    );
    let raw = |req: String| {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut s, &mut out).unwrap();
        out
    };
    let out = raw("GET /v1/host HTTP/1.1\r\n\r\n".into());
    assert!(
        out.starts_with("HTTP/1.1 401") && out.contains("WWW-Authenticate: Bearer"),
        "{out}"
    );
    // A web page's request (cross-site POST, text/plain, foreign Origin) is refused even with
    // the token; so is a body that is not JSON.
    let auth = format!("Authorization: Bearer {token}\r\n");
    let body = r#"{"name":"evil"}"#;
    let out = raw(format!(
        "POST /v1/vms HTTP/1.1\r\nHost: evil.example\r\n{auth}Origin: http://evil.example\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    let out = raw(format!(
        "POST /v1/vms HTTP/1.1\r\n{auth}Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    assert!(out.starts_with("HTTP/1.1 415"), "{out}");
    assert!(
        d.json(&["vm", "list"]).as_array().unwrap().len() == 1,
        "no VM evil"
    );
    // Garbage over TCP is a 400 like anywhere else.
    let out = raw("complete nonsense\r\n\r\n".into());
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // The daemon's own TCP listening sockets: exactly the one asked for.
    assert_eq!(tcp_listeners(d.pid()), vec![u16::try_from(port).unwrap()]);
    d.stop();
    // Without --listen the daemon listens on no TCP port at all.
    let dir2 = TempDir::new("host-notcp");
    let d2 = Daemon::start(&dir2);
    assert_eq!(d2.wv(&["vm", "list"]).status, Some(0), "the daemon serves");
    assert_eq!(tcp_listeners(d2.pid()), Vec::<u16>::new());
    d2.stop();
    // A bad address is a one-line error at start.
    let mut c = Command::new(wv_bin());
    c.args(["host", "--socket"])
        .arg(dir2.path("x.sock"))
        .args(["--state-dir"])
        .arg(dir2.path("s"))
        .args(["--listen", "not-an-address"]);
    let r = run_cmd(c, Duration::from_secs(30));
    assert_eq!(r.status, Some(1), "{r}");
    assert!(r.stderr.contains("cannot listen on not-an-address"), "{r}");
}

/// The ports of the TCP sockets (v4 and v6) in LISTEN state that process `pid` holds.
fn tcp_listeners(pid: u32) -> Vec<u16> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is ADDR:PORT in hex, st 0A is LISTEN, the inode is field 9.
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                let port = f[1].rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports.sort_unstable();
    ports
}
