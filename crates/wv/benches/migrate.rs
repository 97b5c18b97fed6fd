//! Live migration against QEMU (issue 11, "Measure"): a 1 GiB guest, idle and dirtying memory
//! at ~100 MiB/s, migrated between two VMM processes in two network namespaces joined by a veth
//! pair (created by the bench and removed at its end): total time, downtime as the VMM reports
//! it, downtime as the guest observed it, and bytes sent.
//!
//! The guest is the probe guest (the same PVH image, 1 vCPU, 1 GiB) on both VMMs:
//! - idle: the `clock` self-test (`probe.clockms`): a kernel loop reading kvmclock and the TSC
//!   with a 10 ms LAPIC timer ticking, and nothing else written;
//! - dirty: the `persist` self-test (`probe.persist_mib`, `probe.persist_rate` MiB/s,
//!   `probe.persist_ms`): a CPL3 workload rewriting a buffer page after page at that rate, checked
//!   whole after the move (pattern, checksum, counter continuity).
//!
//! Both report the largest gap between two successive reads of kvmclock (`max_gap`) and of the
//! TSC (`tsc_gap`). Both VMMs stop the kvmclock across the switch-over, so `max_gap` shows
//! the clock the guest is told; where the guest reads the host's TSC (PVM hosts, as here),
//! `tsc_gap` is the wall-clock time the guest did not run: the guest-observed downtime. The
//! migration starts once the guest is in its loop (`clock: running`, `persist: steady`: every
//! page of the buffer written once).
//!
//! - wv: target `wv run --incoming ADDR` in one namespace, source `wv run --memory 1G
//!   --api-socket S` in the other; `PUT /vm/migrate-send {"destination": ADDR, "downtime_ms":
//!   300}`; its answer gives `total_ms`, `downtime_ms` (pause to the target's acknowledgement),
//!   `bytes` and `rounds`.
//! - QEMU: `qemu-system-x86_64 -accel kvm -M pc -m 1G` in each namespace, the target with
//!   `-incoming tcp:ADDR`; QMP `migrate-set-parameters` `downtime-limit` 300 and `max-bandwidth`
//!   100 GiB/s (the default limit would throttle the stream), `migrate tcp:ADDR`, `query-migrate`
//!   polled every 5 ms until `completed`: `total-time`, `downtime`, `ram.transferred` (RAM
//!   pages as sent, headers included; device state is not counted).
//!
//! - copydisk (wv only, not in the default `CASES`): `dirty` with the persist disk writer
//!   (`probe.persist_disk=1`) on a 256 MiB raw image, half of it data, copied with the VM
//!   (`"copy_disks": true`; the target's `--disk-dir` is a fresh folder each round). QEMU's
//!   counterpart (block migration, `blockdev-mirror` over NBD) is not driven here.
//!
//! Every case runs `ROUNDS` times (default 3), wv and QEMU interleaved; median and range.
//!
//! Run (as root, for `ip netns`): `cargo bench -p wv --bench migrate`. Env: `ROUNDS`, `CASES`
//! (`idle,dirty`), `DIRTY_MIB` (the rewritten buffer, default 256), `RATE` (MiB/s, default 100),
//! `GUEST_MS` (how long the guest's test runs, default 20000: it must outlast the migration).

/// The control-socket requests of the integration tests' harness.
#[path = "../tests/common/vmm.rs"]
#[allow(dead_code)]
mod vmm;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The two namespaces of this run, removed at the end and by the panic hook (release builds
/// abort on panic, so no destructor would run).
static NETNS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn remove_netns() {
    let names = std::mem::take(&mut *NETNS.lock().unwrap_or_else(|p| p.into_inner()));
    for ns in names {
        // Deleting a namespace deletes its end of the veth pair, and with it the other end.
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    }
}

/// Two network namespaces joined by a veth pair: (source namespace, target namespace, target
/// address).
fn make_netns() -> (String, String, String) {
    let tag = std::process::id() % 100_000;
    let (a, b) = (format!("wvmb-a-{tag}"), format!("wvmb-b-{tag}"));
    let (va, vb) = (format!("wvba{tag}"), format!("wvbb{tag}"));
    let ip = |args: &[&str]| {
        let st = Command::new("ip").args(args).status().expect("run ip");
        assert!(st.success(), "ip {args:?} failed");
    };
    ip(&["netns", "add", &a]);
    NETNS.lock().unwrap().push(a.clone());
    ip(&["netns", "add", &b]);
    NETNS.lock().unwrap().push(b.clone());
    ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
    ip(&["link", "set", &va, "netns", &a]);
    ip(&["link", "set", &vb, "netns", &b]);
    for (ns, dev, addr) in [(&a, &va, "10.252.0.1/24"), (&b, &vb, "10.252.0.2/24")] {
        ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
        ip(&["-n", ns, "link", "set", dev, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    (a, b, "10.252.0.2".into())
}

/// Lines of a child's output, as they arrive.
fn lines(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// A VMM process run in a network namespace, its serial output (stdout) read line by line.
struct Vmm {
    child: Child,
    out: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Vmm {
    fn spawn(netns: &str, program: &str, args: &[String]) -> Vmm {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", netns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory; `ip netns
        // exec` execs the VMM in this same process, which keeps the setting, so a bench that
        // aborts leaves no VMM behind.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = c.spawn().expect("spawn the VMM");
        let out = lines(child.stdout.take().unwrap());
        Vmm {
            child,
            out,
            seen: Vec::new(),
        }
    }

    /// Waits for a serial line containing `what` and returns it.
    fn wait_line(&mut self, what: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(what) {
                        return Ok(l);
                    }
                }
                Err(_) => {
                    let err = self.stop();
                    return Err(format!(
                        "no line '{what}' within {timeout:?}; saw {:?}; stderr {err}",
                        self.seen
                    ));
                }
            }
        }
    }

    /// The first line of stderr (a wv target says where it listens).
    fn stderr_line(&mut self) -> String {
        let mut e = BufReader::new(self.child.stderr.take().unwrap());
        let mut l = String::new();
        let _ = e.read_line(&mut l);
        self.child.stderr = Some(e.into_inner());
        l.trim_end().to_string()
    }

    /// Kills it (if still running) and returns its stderr.
    fn stop(&mut self) -> String {
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

/// A QMP connection.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(sock: &Path, timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + timeout;
        let s = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(format!("QMP socket {}: {e}", sock.display())),
            }
        };
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting).map_err(|e| e.to_string())?;
        q.cmd(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(q)
    }

    /// Sends one command and returns its `return` value (events are skipped).
    fn cmd(&mut self, json: &str) -> Result<serde_json::Value, String> {
        self.w
            .write_all(format!("{json}\n").as_bytes())
            .map_err(|e| format!("QMP {json}: {e}"))?;
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err(format!("QMP closed after {json}"));
            }
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {json}: {e}"));
            }
        }
    }
}

/// What one migration measured.
struct Row {
    total_ms: f64,
    downtime_ms: f64,
    /// The guest's largest TSC gap and kvmclock gap, ms.
    tsc_gap_ms: f64,
    kvmclock_gap_ms: f64,
    mib: f64,
    /// wv: pre-copy rounds after the first pass; QEMU: `dirty-sync-count`.
    rounds: f64,
    /// The request (wv) or `migrate` to `completed` (QEMU), seen by the bench.
    wall_ms: f64,
}

/// A guest test's `NAME=Nus` field, in ms.
fn gap(line: &str, name: &str) -> Result<f64, String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.strip_suffix("us"))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|us| us / 1e3)
        .ok_or_else(|| format!("no {name} in the guest's result: {line}"))
}

#[derive(Clone, Copy)]
enum Case {
    Idle,
    Dirty,
    CopyDisk,
}

struct Params {
    dirty_mib: u64,
    rate: u64,
    guest_ms: u64,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Idle => "idle",
            Case::Dirty => "dirty",
            Case::CopyDisk => "copydisk",
        }
    }
    fn test(self) -> &'static str {
        match self {
            Case::Idle => "clock",
            Case::Dirty | Case::CopyDisk => "persist",
        }
    }
    fn cmdline(self, p: &Params) -> String {
        match self {
            Case::Idle => format!(
                "console=ttyS0 probe.tests=clock probe.clockms={}",
                p.guest_ms
            ),
            Case::Dirty => format!(
                "console=ttyS0 probe.tests=persist probe.persist_mib={} probe.persist_rate={} \
                 probe.persist_ms={}",
                p.dirty_mib, p.rate, p.guest_ms
            ),
            Case::CopyDisk => format!(
                "console=ttyS0 probe.tests=persist probe.persist_mib={} probe.persist_rate={} \
                 probe.persist_ms={} probe.persist_disk=1",
                p.dirty_mib, p.rate, p.guest_ms
            ),
        }
    }
    /// The serial line after which the migration starts.
    fn ready(self) -> &'static str {
        match self {
            Case::Idle => "clock: running",
            Case::Dirty | Case::CopyDisk => "persist: steady",
        }
    }
}

/// The guest's result line on the target, and its two gaps.
fn guest_result(target: &mut Vmm, case: Case, p: &Params) -> Result<(String, f64, f64), String> {
    let test = case.test();
    let wait = Duration::from_millis(p.guest_ms) * 3 + Duration::from_secs(30);
    let line = loop {
        let l = target.wait_line(test, wait)?;
        if l.starts_with(&format!("PASS {test}"))
            || l.starts_with(&format!("FAIL {test}"))
            || l.starts_with(&format!("SKIP {test}"))
        {
            break l;
        }
    };
    if !line.starts_with("PASS") {
        return Err(format!("the guest's test on the target: {line}"));
    }
    let tsc = gap(&line, "tsc_gap")?;
    let kvm = gap(&line, "max_gap")?;
    Ok((line, tsc, kvm))
}

struct Env {
    wv: String,
    dir: PathBuf,
    img: PathBuf,
    src_ns: String,
    dst_ns: String,
    dst_ip: String,
    port: u16,
}

impl Env {
    fn next_port(&mut self) -> u16 {
        self.port += 1;
        self.port
    }
}

fn wv_round(e: &mut Env, case: Case, p: &Params) -> Result<Row, String> {
    let port = e.next_port();
    let addr = format!("{}:{port}", e.dst_ip);
    let sock = e.dir.join("wv-api.sock");
    let _ = std::fs::remove_file(&sock);
    let copy = matches!(case, Case::CopyDisk);
    let mut target_args = vec!["run".into(), "--incoming".into(), addr.clone()];
    let mut disk_args = Vec::new();
    if copy {
        // The source's image once (256 MiB, its first half data); a fresh target folder.
        let img = e.dir.join("copydisk.img");
        if !img.exists() {
            let mut data = vec![0u8; 256 << 20];
            for (i, b) in data[..128 << 20].iter_mut().enumerate() {
                *b = u8::try_from(i % 251).unwrap_or(0) | 1;
            }
            std::fs::write(&img, data).map_err(|x| x.to_string())?;
        }
        let to = e.dir.join(format!("copied-{port}"));
        std::fs::create_dir_all(&to).map_err(|x| x.to_string())?;
        target_args.extend(["--disk-dir".into(), to.display().to_string()]);
        disk_args = vec!["--disk".into(), format!("path={},id=root", img.display())];
    }
    let mut target = Vmm::spawn(&e.dst_ns, &e.wv, &target_args);
    let l = target.stderr_line();
    if !l.starts_with("wv: waiting for a migration on") {
        return Err(format!("target: {l} {}", target.stop()));
    }
    let mut source_args: Vec<String> = vec![
        "run".into(),
        "--memory".into(),
        "1G".into(),
        "--api-socket".into(),
        sock.display().to_string(),
        "--cmdline".into(),
        case.cmdline(p),
    ];
    source_args.extend(disk_args);
    let mut source = Vmm::spawn(&e.src_ns, &e.wv, &source_args);
    source.wait_line(case.ready(), Duration::from_secs(120))?;
    let body = serde_json::json!({ "destination": addr, "downtime_ms": 300, "copy_disks": copy });
    let t = Instant::now();
    let (st, a) = vmm::call(&sock, "PUT", "/vm/migrate-send", Some(&body));
    let wall = t.elapsed();
    if st != 200 {
        return Err(format!("migrate-send: {st} {a}; source: {}", source.stop()));
    }
    let (line, tsc, kvm) = guest_result(&mut target, case, p)?;
    eprintln!("  wv: {a}; guest: {line}");
    let f = |k: &str| a[k].as_f64().ok_or_else(|| format!("no {k} in {a}"));
    Ok(Row {
        total_ms: f("total_ms")?,
        downtime_ms: f("downtime_ms")?,
        tsc_gap_ms: tsc,
        kvmclock_gap_ms: kvm,
        mib: f("bytes")? / 1048576.0,
        rounds: f("rounds")?,
        wall_ms: wall.as_secs_f64() * 1e3,
    })
}

fn qemu_args(e: &Env, qmp: &Path, case: Case, p: &Params) -> Vec<String> {
    let mut v: Vec<String> = [
        "-accel",
        "kvm",
        "-M",
        "pc",
        "-m",
        "1G",
        "-smp",
        "1",
        "-display",
        "none",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-qmp",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(format!("unix:{},server=on,wait=off", qmp.display()));
    v.push("-kernel".into());
    v.push(e.img.display().to_string());
    v.push("-append".into());
    v.push(case.cmdline(p));
    v
}

fn qemu_round(e: &mut Env, case: Case, p: &Params) -> Result<Row, String> {
    let port = e.next_port();
    let (qs, qt) = (e.dir.join("qmp-src.sock"), e.dir.join("qmp-dst.sock"));
    let _ = std::fs::remove_file(&qs);
    let _ = std::fs::remove_file(&qt);
    let mut targs = qemu_args(e, &qt, case, p);
    targs.push("-incoming".into());
    targs.push(format!("tcp:{}:{port}", e.dst_ip));
    let mut target = Vmm::spawn(&e.dst_ns, "qemu-system-x86_64", &targs);
    // Listening once its monitor answers.
    let mut tq = Qmp::connect(&qt, Duration::from_secs(30))?;
    let st = tq.cmd(r#"{"execute":"query-status"}"#)?;
    if st["status"] != "inmigrate" {
        return Err(format!("QEMU target: {st}; {}", target.stop()));
    }
    let mut source = Vmm::spawn(&e.src_ns, "qemu-system-x86_64", &qemu_args(e, &qs, case, p));
    let mut q = Qmp::connect(&qs, Duration::from_secs(30))?;
    source.wait_line(case.ready(), Duration::from_secs(120))?;
    q.cmd(
        r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":300,"max-bandwidth":107374182400}}"#,
    )?;
    let uri = format!("tcp:{}:{port}", e.dst_ip);
    let t = Instant::now();
    q.cmd(&serde_json::json!({"execute": "migrate", "arguments": {"uri": uri}}).to_string())?;
    let info = loop {
        let r = q.cmd(r#"{"execute":"query-migrate"}"#)?;
        match r["status"].as_str() {
            Some("completed") => break r,
            Some("failed") | Some("cancelled") => return Err(format!("QEMU migrate: {r}")),
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let wall = t.elapsed();
    let (line, tsc, kvm) = guest_result(&mut target, case, p)?;
    eprintln!("  QEMU: {info}; guest: {line}");
    drop(q);
    drop(tq);
    source.stop();
    target.stop();
    let f = |v: &serde_json::Value, k: &str| v.as_f64().ok_or_else(|| format!("no {k} in {info}"));
    Ok(Row {
        total_ms: f(&info["total-time"], "total-time")?,
        downtime_ms: f(&info["downtime"], "downtime")?,
        tsc_gap_ms: tsc,
        kvmclock_gap_ms: kvm,
        mib: f(&info["ram"]["transferred"], "ram.transferred")? / 1048576.0,
        rounds: f(&info["ram"]["dirty-sync-count"], "ram.dirty-sync-count")?,
        wall_ms: wall.as_secs_f64() * 1e3,
    })
}

/// Median and range of a series, formatted.
fn stat(v: &[f64], prec: usize) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    format!(
        "{:.prec$} ({:.prec$}-{:.prec$})",
        s[s.len() / 2],
        s[0],
        s[s.len() - 1]
    )
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
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpus} CPUs ({cpu}), Linux {}", kernel.trim())
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the migration bench creates network namespaces (ip netns add): run it as root");
        std::process::exit(1);
    }
    let rounds = usize::try_from(env_u64("ROUNDS", 3)).unwrap_or(3);
    let p = Params {
        dirty_mib: env_u64("DIRTY_MIB", 256),
        rate: env_u64("RATE", 100),
        guest_ms: env_u64("GUEST_MS", 20_000),
    };
    let cases: Vec<Case> = std::env::var("CASES")
        .unwrap_or_else(|_| "idle,dirty".into())
        .split(',')
        .filter_map(|c| match c.trim() {
            "idle" => Some(Case::Idle),
            "dirty" => Some(Case::Dirty),
            "copydisk" => Some(Case::CopyDisk),
            _ => None,
        })
        .collect();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        remove_netns();
        default_hook(info);
    }));
    let dir = std::env::temp_dir().join(format!("wv-migbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("probe.elf");
    std::fs::write(&img, wv_probe_images::PROBE_PVH).unwrap();
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
    let (src_ns, dst_ns, dst_ip) = make_netns();
    let mut e = Env {
        wv: env!("CARGO_BIN_EXE_wv").to_string(),
        dir,
        img,
        src_ns,
        dst_ns,
        dst_ip,
        port: 47200,
    };
    println!(
        "Live migration, 1 GiB guest, 1 vCPU, probe guest (PVH), two network namespaces + veth; \
         {rounds} rounds each, median (min-max)"
    );
    println!("host: {}", host());
    println!(
        "QEMU: {}",
        qemu.as_deref().unwrap_or("not installed: not measured")
    );
    println!(
        "idle: probe.tests=clock; dirty: probe.tests=persist probe.persist_mib={} \
         probe.persist_rate={} (MiB/s); guest test runs {} ms",
        p.dirty_mib, p.rate, p.guest_ms
    );
    for &case in &cases {
        let mut rows: [(&str, Vec<Row>, Vec<String>); 2] = [
            ("wv", Vec::new(), Vec::new()),
            ("QEMU", Vec::new(), Vec::new()),
        ];
        for round in 0..rounds {
            eprintln!("{}: round {}/{rounds}", case.name(), round + 1);
            match wv_round(&mut e, case, &p) {
                Ok(r) => rows[0].1.push(r),
                Err(m) => {
                    eprintln!("  wv failed: {m}");
                    rows[0].2.push(m);
                }
            }
            if qemu.is_some() && !matches!(case, Case::CopyDisk) {
                match qemu_round(&mut e, case, &p) {
                    Ok(r) => rows[1].1.push(r),
                    Err(m) => {
                        eprintln!("  QEMU failed: {m}");
                        rows[1].2.push(m);
                    }
                }
            }
        }
        println!();
        println!("{}:", case.name());
        println!(
            "| | total (VMM) ms | downtime (VMM) ms | guest TSC gap ms | guest kvmclock gap ms | sent MiB | rounds | wall ms | failed |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for (name, r, failed) in &rows {
            if r.is_empty() && failed.is_empty() {
                continue;
            }
            let col = |f: fn(&Row) -> f64, prec| stat(&r.iter().map(f).collect::<Vec<_>>(), prec);
            println!(
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {} |",
                col(|r| r.total_ms, 0),
                col(|r| r.downtime_ms, 1),
                col(|r| r.tsc_gap_ms, 1),
                col(|r| r.kvmclock_gap_ms, 1),
                col(|r| r.mib, 1),
                col(|r| r.rounds, 0),
                col(|r| r.wall_ms, 0),
                failed.len()
            );
            for m in failed {
                println!("  {name} failure: {m}");
            }
        }
    }
    remove_netns();
    let _ = std::fs::remove_dir_all(&e.dir);
}
