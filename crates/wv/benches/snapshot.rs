//! Snapshot and restore against QEMU (issue 11, "Measure"): for guests of 256 MiB and 2 GiB,
//! with their memory untouched and half written, the time to take a snapshot, its size on disk,
//! and the time from starting a process to the guest running again after a restore.
//!
//! The guest is the probe guest's `fill` self-test on both VMMs (the same PVH image, 1 vCPU):
//! it writes a pattern over `probe.fill_mib` MiB at CPL3, then prints one `.` to COM1 every
//! `probe.beat_cycles` TSC cycles (default 250000, about 0.1 ms here). "Running again" is the
//! first byte on the restored VMM's serial output, i.e. the next beat, so it is late by at most
//! one beat plus the guest's (emulated) path from user mode to the UART.
//!
//! - wv: `wv run --api-socket S` then `PUT /vm/snapshot {"destination": DIR}` (the VMM pauses,
//!   writes `memory` sparse and `state`, fsyncs, resumes); restore `wv run --restore DIR` (the
//!   memory file is mapped, not read). `WV_TRACE_STARTUP=1` gives the VMM's own time to
//!   "vcpu threads started", the moment before the first KVM_RUN.
//! - QEMU: `-qmp unix:S`, `stop`, `migrate-set-parameters max-bandwidth` (unlimited, as
//!   `virsh save` does; the default would cap the stream), `migrate exec:cat > FILE`, polled
//!   with `query-migrate` every millisecond until `completed`; then an fsync of the file (QEMU
//!   does not sync it; wv does, so both columns are given). Restore: the same command line with
//!   `-incoming "exec:cat FILE"`; QEMU reads the whole stream, stays paused (the stream says
//!   the VM was stopped), and runs the guest on `cont`, sent as soon as `query-status` (polled
//!   every 0.5 ms) leaves `inmigrate`.
//!
//! Every measurement is repeated `ROUNDS` times (default 3), wv and QEMU interleaved, and
//! reported as median and range. Snapshot files are in the host page cache when restored (just
//! written; nothing drops caches on this shared machine).
//!
//! Run: `cargo bench -p wv --bench snapshot` (needs /dev/kvm; QEMU columns need
//! qemu-system-x86_64). `SIZES=256,2048` (MiB) and `FILL=0,50` (percent) choose the cases.

/// The control-socket requests of the integration tests' harness.
#[path = "../tests/common/vmm.rs"]
#[allow(dead_code)]
mod vmm;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A VMM process whose stdout is read on a thread and handed over in chunks, each stamped
/// with the time it arrived.
struct Vmm {
    child: Child,
    out: mpsc::Receiver<(Instant, Vec<u8>)>,
    seen: Vec<u8>,
    started: Instant,
}

impl Vmm {
    fn spawn(mut c: Command) -> Vmm {
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = c.spawn().expect("spawn the VMM");
        let mut stdout = child.stdout.take().unwrap();
        let (tx, out) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Vmm {
            child,
            out,
            seen: Vec::new(),
            started,
        }
    }

    /// Waits until the output contains `what`; returns when it arrived, from the spawn.
    fn wait_for(&mut self, what: &str, timeout: Duration) -> Duration {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = find(&self.seen, what.as_bytes()) {
                self.seen.drain(..p + what.len());
                return Duration::ZERO;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left) {
                Ok((t, chunk)) => {
                    self.seen.extend_from_slice(&chunk);
                    if let Some(p) = find(&self.seen, what.as_bytes()) {
                        self.seen.drain(..p + what.len());
                        return t - self.started;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let mut err = String::new();
                    if let Some(mut e) = self.child.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    panic!(
                        "no '{what}' within {timeout:?}; output {:?}; stderr {err}",
                        String::from_utf8_lossy(&self.seen)
                    );
                }
            }
        }
    }

    /// Time from the spawn to the first byte of output, if it comes in time.
    fn try_first_byte(&mut self, timeout: Duration) -> Option<(Duration, u8)> {
        let (t, chunk) = self.out.recv_timeout(timeout).ok()?;
        Some((t - self.started, chunk[0]))
    }

    /// Time from the spawn to the first byte of output.
    fn first_byte(&mut self, timeout: Duration) -> (Duration, u8) {
        match self.out.recv_timeout(timeout) {
            Ok((t, chunk)) => (t - self.started, chunk[0]),
            Err(e) => {
                let _ = self.child.kill();
                let mut err = String::new();
                if let Some(mut s) = self.child.stderr.take() {
                    let _ = s.read_to_string(&mut err);
                }
                panic!("no output from the restored VM ({e}); stderr: {err}");
            }
        }
    }

    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        err
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A QMP connection.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(sock: &Path, timeout: Duration) -> Qmp {
        let deadline = Instant::now() + timeout;
        let s = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) => panic!("QMP socket {}: {e}", sock.display()),
            }
        };
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting).unwrap();
        q.cmd(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    /// Sends one command and returns its `return` value (events are skipped).
    fn cmd(&mut self, json: &str) -> serde_json::Value {
        self.w.write_all(json.as_bytes()).unwrap();
        self.w.write_all(b"\n").unwrap();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).unwrap() == 0 {
                panic!("QMP closed after {json}");
            }
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if let Some(r) = v.get("return") {
                return r.clone();
            }
            if let Some(e) = v.get("error") {
                panic!("QMP {json}: {e}");
            }
        }
    }
}

/// Apparent and allocated bytes of the files under `p` (or of `p`).
fn sizes(p: &Path) -> (u64, u64) {
    let m = std::fs::metadata(p).unwrap();
    if m.is_file() {
        return (m.len(), m.blocks() * 512);
    }
    std::fs::read_dir(p)
        .unwrap()
        .map(|e| sizes(&e.unwrap().path()))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Median and range of a series, formatted.
fn stat(v: &[f64], unit: &str, prec: usize) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    format!(
        "{:.prec$} {unit} ({:.prec$}-{:.prec$})",
        s[s.len() / 2],
        s[0],
        s[s.len() - 1]
    )
}

#[derive(Default)]
struct Series {
    boot_fill: Vec<f64>,
    snap_api: Vec<f64>,
    snap_wall: Vec<f64>,
    snap_sync: Vec<f64>,
    apparent: Vec<f64>,
    allocated: Vec<f64>,
    restore_ready: Vec<f64>,
    restore_byte: Vec<f64>,
}

fn cmdline(fill_mib: u64) -> String {
    format!("console=ttyS0 probe.tests=fill probe.fill_mib={fill_mib}")
}

fn wv_round(wv: &str, dir: &Path, mib: u64, fill_mib: u64, s: &mut Series) {
    let sock = dir.join("api.sock");
    let snap = dir.join("snap");
    let mut c = Command::new(wv);
    c.args(["run", "--memory", &format!("{mib}M"), "--api-socket"])
        .arg(&sock)
        .args(["--cmdline", &cmdline(fill_mib)]);
    let mut vm = Vmm::spawn(c);
    s.boot_fill
        .push(ms(vm.wait_for("fill: done", Duration::from_secs(600))));
    vm.wait_for("..", Duration::from_secs(10));
    let body = serde_json::json!({ "destination": snap });
    let t = Instant::now();
    let (st, r) = vmm::call(&sock, "PUT", "/vm/snapshot", Some(&body));
    let wall = t.elapsed();
    assert_eq!(st, 200, "snapshot: {r}");
    s.snap_wall.push(ms(wall));
    s.snap_sync.push(ms(wall));
    s.snap_api
        .push(r["duration_ms"].as_f64().expect("duration_ms"));
    let (a, b) = sizes(&snap);
    s.apparent.push(a as f64 / 1048576.0);
    s.allocated.push(b as f64 / 1048576.0);
    vm.stop();

    let mut c = Command::new(wv);
    c.env("WV_TRACE_STARTUP", "1")
        .args(["run", "--restore"])
        .arg(&snap);
    let mut back = Vmm::spawn(c);
    let (t, byte) = back.first_byte(Duration::from_secs(60));
    assert_eq!(byte, b'.', "the restored guest did not resume beating");
    s.restore_byte.push(ms(t));
    let err = back.stop();
    let ready = err
        .lines()
        .find(|l| l.ends_with("vcpu threads started"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.strip_suffix("us"))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no 'vcpu threads started' in the trace: {err}"));
    s.restore_ready.push(ready / 1e3);
    std::fs::remove_dir_all(&snap).unwrap();
}

fn qemu_cmd(img: &Path, qmp: &Path, mib: u64, fill_mib: u64) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-accel", "kvm", "-M", "pc", "-m", &format!("{mib}M")])
        .args(["-smp", "1", "-display", "none", "-no-reboot", "-nodefaults"])
        .args(["-serial", "stdio", "-monitor", "none", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-kernel")
        .arg(img)
        .args(["-append", &cmdline(fill_mib)]);
    c
}

fn qemu_round(img: &Path, dir: &Path, mib: u64, fill_mib: u64, s: &mut Series) {
    let qmp = dir.join("qmp.sock");
    let file = dir.join("qemu.mig");
    let mut vm = Vmm::spawn(qemu_cmd(img, &qmp, mib, fill_mib));
    s.boot_fill
        .push(ms(vm.wait_for("fill: done", Duration::from_secs(600))));
    vm.wait_for("..", Duration::from_secs(10));
    let mut q = Qmp::connect(&qmp, Duration::from_secs(10));
    q.cmd(r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":107374182400}}"#);
    let t = Instant::now();
    q.cmd(r#"{"execute":"stop"}"#);
    let uri = format!("exec:cat > {}", file.display());
    q.cmd(&serde_json::json!({"execute": "migrate", "arguments": {"uri": uri}}).to_string());
    let info = loop {
        let r = q.cmd(r#"{"execute":"query-migrate"}"#);
        match r["status"].as_str() {
            Some("completed") => break r,
            Some("failed") | Some("cancelled") => panic!("QEMU migrate: {r}"),
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    };
    let wall = t.elapsed();
    std::fs::File::open(&file).unwrap().sync_all().unwrap();
    let synced = t.elapsed();
    s.snap_wall.push(ms(wall));
    s.snap_sync.push(ms(synced));
    s.snap_api
        .push(info["total-time"].as_f64().expect("total-time"));
    drop(q);
    vm.stop();
    let _ = std::fs::remove_file(&qmp);
    let (a, b) = sizes(&file);
    s.apparent.push(a as f64 / 1048576.0);
    s.allocated.push(b as f64 / 1048576.0);

    let mut c = qemu_cmd(img, &qmp, mib, fill_mib);
    c.arg("-incoming")
        .arg(format!("exec:cat {}", file.display()));
    let mut back = Vmm::spawn(c);
    // The stream says the VM was stopped, so QEMU loads it and stays paused (as after
    // `virsh save`, whose restore then sends `cont`): `query-status` is polled from another
    // thread until the load is done, then `cont`, and the time its answer comes.
    let started = back.started;
    let qmp2 = qmp.clone();
    let last = std::sync::Arc::new(std::sync::Mutex::new(String::from("not connected")));
    let last2 = last.clone();
    let poll = std::thread::spawn(move || {
        let mut q = Qmp::connect(&qmp2, Duration::from_secs(60));
        loop {
            let r = q.cmd(r#"{"execute":"query-status"}"#);
            *last2.lock().unwrap() = r.to_string();
            match r["status"].as_str() {
                Some("inmigrate") => std::thread::sleep(Duration::from_micros(500)),
                Some("paused") => {
                    q.cmd(r#"{"execute":"cont"}"#);
                    return started.elapsed();
                }
                Some("running") => return started.elapsed(),
                _ => panic!("QEMU restore: {r}"),
            }
        }
    });
    let Some((t, byte)) = back.try_first_byte(Duration::from_secs(120)) else {
        panic!(
            "QEMU: no output from the restored VM; last query-status: {}",
            last.lock().unwrap()
        );
    };
    assert_eq!(byte, b'.', "the restored guest did not resume beating");
    s.restore_byte.push(ms(t));
    s.restore_ready.push(ms(poll.join().unwrap()));
    back.stop();
    let _ = std::fs::remove_file(&qmp);
    std::fs::remove_file(&file).unwrap();
}

fn list(var: &str, default: &[u64]) -> Vec<u64> {
    std::env::var(var)
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn host() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .nth(1)
        .and_then(|k| k.parse::<u64>().ok())
        .unwrap_or(0);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{cpus} CPUs ({cpu}), {} GiB, Linux {}",
        mem >> 20,
        kernel.trim()
    )
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let sizes_mib = list("SIZES", &[256, 2048]);
    let fills = list("FILL", &[0, 50]);
    let dir = std::env::temp_dir().join(format!("wv-snapbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("probe.elf");
    std::fs::write(&img, wv_probe_images::PROBE_PVH).unwrap();
    let wv = env!("CARGO_BIN_EXE_wv");
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        });
    println!("Snapshot and restore, {rounds} rounds each, median (min-max); 1 vCPU, probe guest `fill`, PVH");
    println!("host: {}", host());
    println!(
        "QEMU: {}",
        qemu.as_deref().unwrap_or("not installed: not measured")
    );
    println!(
        "Firecracker: not installable here (no network beyond package registries): not measured"
    );
    for &mib in &sizes_mib {
        for &pct in &fills {
            let fill_mib = mib * pct / 100;
            let mut w = Series::default();
            let mut q = Series::default();
            for round in 0..rounds {
                eprintln!(
                    "{mib} MiB, {fill_mib} MiB written: round {}/{rounds}",
                    round + 1
                );
                wv_round(wv, &dir, mib, fill_mib, &mut w);
                if qemu.is_some() {
                    qemu_round(&img, &dir, mib, fill_mib, &mut q);
                }
            }
            println!();
            println!("guest {mib} MiB, {fill_mib} MiB written ({pct}%):");
            for (name, s) in [("wv", &w), ("QEMU", &q)] {
                if s.snap_api.is_empty() {
                    continue;
                }
                println!("  {name}:");
                println!(
                    "    boot + fill to 'fill: done'      {}",
                    stat(&s.boot_fill, "ms", 0)
                );
                println!(
                    "    snapshot, VMM's own time         {}",
                    stat(&s.snap_api, "ms", 1)
                );
                println!(
                    "    snapshot, wall (request)         {}",
                    stat(&s.snap_wall, "ms", 1)
                );
                println!(
                    "    snapshot, wall incl. fsync       {}",
                    stat(&s.snap_sync, "ms", 1)
                );
                println!(
                    "    snapshot size, apparent          {}",
                    stat(&s.apparent, "MiB", 1)
                );
                println!(
                    "    snapshot size, allocated         {}",
                    stat(&s.allocated, "MiB", 1)
                );
                println!(
                    "    restore: {:<24}{}",
                    if name == "wv" {
                        "VMM ready (trace)"
                    } else {
                        "loaded + cont (QMP)"
                    },
                    stat(&s.restore_ready, "ms", 2)
                );
                println!(
                    "    restore: first guest byte        {}",
                    stat(&s.restore_byte, "ms", 2)
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
