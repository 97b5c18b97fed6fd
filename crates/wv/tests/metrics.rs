//! `GET /metrics` of the host daemon: the Prometheus text format, checked by Prometheus's own
//! `promtool check metrics`, served alike on the Unix socket and on `--listen` TCP, whose
//! counters move while a VM burns CPU (its CPU seconds and its vCPU's exits grow between two
//! scrapes) and while a VM writes its disk through the storage service (the disk's bytes and
//! operations grow), and whose state gauge follows the VM's lifecycle.

mod common;
use common::daemon::Daemon;
use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One raw exchange on `s`: (status line and headers, body).
fn exchange(mut s: impl Read + Write, request: &str) -> (String, String) {
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("a complete response");
    (head.to_string(), body.to_string())
}

fn scrape(d: &Daemon) -> String {
    let s = UnixStream::connect(&d.socket).unwrap();
    let (head, body) = exchange(s, "GET /metrics HTTP/1.1\r\nHost: wv\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    assert!(
        head.lines()
            .any(|l| l
                .eq_ignore_ascii_case("content-type: text/plain; version=0.0.4; charset=utf-8")),
        "{head}"
    );
    assert_eq!(
        head.lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("content-type:"))
            .count(),
        1,
        "{head}"
    );
    body
}

/// The value of the sample of `name` whose labels include every pair of `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
            (n == name).then_some((rest.trim_end_matches('}'), v))
        })
        .find(|(ls, _)| {
            labels
                .iter()
                .all(|(k, v)| ls.split(',').any(|p| p == format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v.parse().unwrap())
}

/// `promtool check metrics` on `text` (from stdin): it must accept it without a remark.
fn promtool_accepts(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test installs it) must be installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && o.trim().is_empty() && e.trim().is_empty(),
        "promtool check metrics refused the text ({:?}):\n{o}{e}\n--- text\n{text}",
        out.status
    );
}

/// Scrapes until `ok` holds of the text, for at most 30 s.
fn scrape_until(d: &Daemon, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let t = Instant::now();
    loop {
        let text = scrape(d);
        if ok(&text) {
            return text;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "never {what}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn metrics_move_while_a_vm_runs_and_promtool_accepts_them() {
    need_kvm();
    let dir = TempDir::new("metrics");
    let port = 20_000 + (std::process::id() + 7) % 20_000;
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(&dir, &["--listen", &addr]);

    // Before any VM: the system worlds, and a text promtool accepts.
    let idle = scrape(&d);
    promtool_accepts(&idle);
    for w in ["management", "helper"] {
        assert!(
            value(&idle, "wv_world_cpu_seconds_total", &[("world", w)]).is_some(),
            "{idle}"
        );
    }

    let r = d.wv(&[
        "vm",
        "create",
        "burner",
        "--memory",
        "32M",
        "--cmdline",
        "console=ttyS0 probe.tests=burn",
        "--shares",
        "1500",
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    let defined = scrape(&d);
    let burner = [("world", "burner"), ("id", "2")];
    let state =
        |text: &str, s: &str| value(text, "wv_world_state", &[("world", "burner"), ("state", s)]);
    assert_eq!(state(&defined, "defined"), Some(1.0), "{defined}");
    assert_eq!(state(&defined, "running"), Some(0.0), "{defined}");
    assert_eq!(
        value(&defined, "wv_world_cpu_seconds_total", &burner),
        None,
        "no CPU accounting for a VM that does not run:\n{defined}"
    );

    let r = d.wv(&["vm", "start", "burner"]);
    assert_eq!(r.status, Some(0), "{r}");
    let vcpu0 = [("vm", "burner"), ("vcpu", "0")];
    let first = scrape_until(&d, "exits of burner's vCPU 0", |t| {
        value(t, "wv_vm_exits_total", &vcpu0).is_some_and(|n| n > 0.0)
    });
    promtool_accepts(&first);
    assert_eq!(state(&first, "running"), Some(1.0), "{first}");
    assert_eq!(
        value(&first, "wv_world_shares", &burner),
        Some(1500.0),
        "{first}"
    );
    assert!(
        value(&first, "wv_world_entitlement_cpus", &burner).is_some_and(|e| e > 0.0),
        "{first}"
    );
    let cpu = |t: &str| value(t, "wv_world_cpu_seconds_total", &burner).unwrap();
    let exits = |t: &str| value(t, "wv_vm_exits_total", &vcpu0).unwrap();
    let (cpu0, exits0) = (cpu(&first), exits(&first));
    // The guest spins: its CPU time and its vCPU's exits (timer interrupts at least) grow.
    let second = scrape_until(&d, "growing CPU seconds and exits", |t| {
        value(t, "wv_world_cpu_seconds_total", &burner).is_some_and(|c| c > cpu0)
            && value(t, "wv_vm_exits_total", &vcpu0).is_some_and(|n| n > exits0)
    });
    promtool_accepts(&second);
    assert!(cpu(&second) > cpu0 && exits(&second) > exits0);
    let by_cause: f64 = second
        .lines()
        .filter(|l| l.starts_with("wv_vm_exits_by_cause_total{vm=\"burner\",vcpu=\"0\""))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum();
    assert!(
        by_cause > 0.0 && by_cause <= exits(&second),
        "exits by cause ({by_cause}) are some of all exits:\n{second}"
    );
    // The VMM's own causes: the probe guest prints its banner with the console-write call,
    // and each of those exits reaches the VMM as `hypercall:console_write` (a few of all the
    // exits, most of which KVM handles in the kernel).
    let console = value(
        &second,
        "wv_vm_vmm_exits_total",
        &[("vm", "burner"), ("cause", "hypercall:console_write")],
    )
    .unwrap_or_else(|| panic!("no hypercall:console_write exits:\n{second}"));
    assert!(console > 0.0 && console <= exits(&second), "{second}");

    // A VM writing a disk the storage service serves: its bytes and operations move.
    let img = dir.file("data.img", &vec![0u8; 8 << 20]);
    let r = d.wv(&[
        "vm",
        "create",
        "writer",
        "--memory",
        "64M",
        "--disk",
        &format!("path={},via=storage,id=data", img.display()),
        "--cmdline",
        "console=ttyS0 probe.tests=persist,hang probe.persist_mib=1 probe.persist_ms=60000 \
         probe.persist_disk=1 probe.persist_disk_ms=5",
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    let r = d.wv(&["vm", "start", "writer"]);
    assert_eq!(r.status, Some(0), "{r}");
    let written = [
        ("vm", "writer"),
        ("device", "data"),
        ("kind", "disk"),
        ("direction", "write"),
    ];
    let bytes = |t: &str| value(t, "wv_vm_device_bytes_total", &written);
    let ops = |t: &str| value(t, "wv_vm_device_operations_total", &written);
    let first = scrape_until(&d, "the writer's disk written", |t| {
        bytes(t).is_some_and(|b| b > 0.0) && ops(t).is_some_and(|n| n > 0.0)
    });
    promtool_accepts(&first);
    let read = [("vm", "writer"), ("device", "data"), ("direction", "read")];
    assert!(
        value(&first, "wv_vm_device_bytes_total", &read).is_some(),
        "both directions are reported:\n{first}"
    );
    let (b0, n0) = (bytes(&first).unwrap(), ops(&first).unwrap());
    let second = scrape_until(&d, "the writer's disk bytes and operations growing", |t| {
        bytes(t).is_some_and(|b| b > b0) && ops(t).is_some_and(|n| n > n0)
    });
    promtool_accepts(&second);
    assert!(
        bytes(&second).unwrap() >= 512.0 * ops(&second).unwrap(),
        "whole sectors:\n{second}"
    );
    let r = d.wv(&["vm", "stop", "writer"]);
    assert_eq!(r.status, Some(0), "{r}");

    // The same document over TCP; a method other than GET is a 405 that names GET.
    let tcp = std::net::TcpStream::connect(&addr).unwrap();
    let token = std::fs::read_to_string(dir.path("state").join("api-token")).unwrap();
    let (head, body) = exchange(
        tcp,
        &format!("GET /metrics HTTP/1.1\r\nHost: wv\r\nAuthorization: Bearer {token}\r\n\r\n"),
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert!(
        value(&body, "wv_vm_exits_total", &vcpu0).is_some(),
        "{body}"
    );
    let s = UnixStream::connect(&d.socket).unwrap();
    let (head, _) = exchange(
        s,
        "POST /metrics HTTP/1.1\r\nHost: wv\r\nContent-Length: 0\r\n\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert!(head.contains("Allow: GET"), "{head}");

    // Stopped: the state gauge says so and the VM's live readings are gone.
    let r = d.wv(&["vm", "stop", "burner"]);
    assert_eq!(r.status, Some(0), "{r}");
    let stopped = scrape(&d);
    promtool_accepts(&stopped);
    assert_eq!(state(&stopped, "stopped"), Some(1.0), "{stopped}");
    assert_eq!(state(&stopped, "running"), Some(0.0), "{stopped}");
    assert_eq!(
        value(&stopped, "wv_vm_exits_total", &vcpu0),
        None,
        "{stopped}"
    );
    d.stop();
}
