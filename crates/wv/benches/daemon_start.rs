//! A daemon VM's start, jailed (the default: `wv run --jail`, docs/SECURITY.md) and not
//! (`wv host --no-jail`), interleaved round by round, medians printed:
//! - answered: `POST /v1/vms/b/start` until its answer (the VMM spawned and placed);
//! - guest ran: from the same request until the guest's first console line in the VM's
//!   `console.log` (a 128 MiB probe guest, `probe.tests=boot`, which then powers off);
//! - stopped: until the daemon records the VMM's end (the guest powered off; the jailed VMM's
//!   PID namespace ends with it).
//!
//! Run: `cargo bench -p wv --bench daemon_start` (env `ROUNDS`, default 15). As root, with
//! /dev/kvm; nothing else should run.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn http(sock: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(sock).expect("the daemon's socket");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        out.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    )
}

struct Daemon {
    child: Child,
    sock: PathBuf,
    state: PathBuf,
    name: &'static str,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = http(&self.sock, "POST", "/v1/vms/b/stop", "");
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(self.state.parent().unwrap());
    }
}

fn daemon(name: &'static str, extra: &[&str]) -> Daemon {
    let dir = std::env::temp_dir().join(format!("wv-bench-dstart-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (sock, state) = (dir.join("wv.sock"), dir.join("state"));
    let child = Command::new(env!("CARGO_BIN_EXE_wv"))
        .args(["host", "--socket", sock.to_str().unwrap(), "--state-dir"])
        .arg(&state)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the daemon did not come up"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (s, b) = http(
        &sock,
        "POST",
        "/v1/vms",
        r#"{"name":"b","memory":"128M","cmdline":"console=ttyS0 probe.tests=boot"}"#,
    );
    assert_eq!(s, 201, "{b}");
    Daemon {
        child,
        sock,
        state,
        name,
    }
}

/// One start: (answered, guest ran, stopped) in ms.
fn once(d: &Daemon) -> (f64, f64, f64) {
    let console = d.state.join("vms/b/console.log");
    let _ = std::fs::remove_file(&console);
    let t = Instant::now();
    let (s, b) = http(&d.sock, "POST", "/v1/vms/b/start", "");
    assert_eq!(s, 200, "{}: {b}", d.name);
    let answered = t.elapsed();
    let ran = loop {
        if std::fs::metadata(&console).is_ok_and(|m| m.len() > 0) {
            break t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{}: no console output",
            d.name
        );
        std::thread::yield_now();
    };
    let stopped = loop {
        let (_, b) = http(&d.sock, "GET", "/v1/vms/b", "");
        if b.contains(r#""state":"stopped""#) {
            break t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{}: did not stop: {b}",
            d.name
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (ms(answered), ms(ran), ms(stopped))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let daemons = [daemon("jailed", &[]), daemon("unjailed", &["--no-jail"])];
    let mut got: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); daemons.len()];
    // One warm-up each (page cache, cgroup creation).
    for d in &daemons {
        once(d);
    }
    for _ in 0..rounds {
        for (i, d) in daemons.iter().enumerate() {
            got[i].push(once(d));
        }
    }
    println!("daemon VM start, {rounds} rounds interleaved, medians (ms):");
    println!("| | answered | guest ran | stopped |");
    println!("|---|---|---|---|");
    for (d, g) in daemons.iter().zip(got) {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} |",
            d.name,
            median(g.iter().map(|x| x.0).collect()),
            median(g.iter().map(|x| x.1).collect()),
            median(g.iter().map(|x| x.2).collect()),
        );
    }
}
