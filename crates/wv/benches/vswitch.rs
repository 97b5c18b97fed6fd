//! VM-to-VM throughput through the virtual switch against a Linux bridge and QEMU (issue 12,
//! "Measure"), all in one run:
//!
//! - guest to guest: the probe guest's `netbench` sends `FRAMES` broadcast frames (EtherType
//!   0x88b5, 32 in flight) to a `netsink` guest that counts them, at 60 + 4 (FCS) = 64 B and
//!   1514 B: (a) two `wv run` VMs on one network of a `wv vswitch` (vhost-user), (b) two `wv
//!   run` VMs on TAPs joined by a Linux bridge in a network namespace the bench creates
//!   (in-process virtio-net), (c) two QEMU VMs (virtio-net-pci, same image) on TAPs on the same
//!   bridge. Rates are the receiver's: frames counted over the TSC cycles from its first frame
//!   to its last; frames the sender sent that never arrived are reported as lost.
//! - host-side harness (no guest; the probe guest's emulated kernel caps the rows above):
//!   two vhost-user frontends played on the host (tests/common/netplayer.rs) on one network of a
//!   switch run inside this process, sender to receiver unicast, 256-entry rings, at 64 B, 1514 B
//!   and a 64 KiB TSO segment (only if the switch offers HOST_TSO4 and GUEST_TSO4); and the same
//!   through the bridge: frames with a vnet header written into TAP A and read from TAP B (the
//!   kernel path the in-process device uses), 64 KiB with the TAPs' TSO offload on.
//! - the switch's bytes copied / bytes delivered for the receiving port of every switch row, and
//!   for the harness rows the allocations the whole process (switch and both frontends) made
//!   from the receiver's first frame to its last (this bench counts them with its global
//!   allocator), in all: a count that does not grow with the frames is no allocation per frame.
//!
//! Everything created (namespace with its bridge and TAPs, switch and VM processes, temporary
//! directory) is removed at the end, and on a panic (the bench profile aborts: a panic hook
//! does it). Needs root and /dev/kvm.
//!
//! Run: `cargo bench -p wv --bench vswitch` (env `ROUNDS`, default 3; `FRAMES` per guest run,
//! default 20000; the harness sends 10x `FRAMES`, FRAMES at 64 KiB; `HARNESS_ONLY=1` runs only
//! the harness rows, `HARNESS_ONLY=switch` only its switch rows). Medians over rounds.

#![allow(clippy::cast_possible_truncation)] // small sizes and counts, bounded where made

#[path = "../tests/common/netplayer.rs"]
mod netplayer;

use netplayer::{NetPlayer, HDR};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// Counts every allocation of the process (the harness rows read it at their first and last
/// frame).
struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; the counting is one
// relaxed atomic add (it allocates nothing itself).
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { std::alloc::System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: std::alloc::Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc_zeroed`, passed on.
        unsafe { std::alloc::System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc`, passed on.
        unsafe { std::alloc::System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// What has to go at the end, or on a panic.
struct Created {
    ns: Option<String>,
    dir: Option<PathBuf>,
    pids: Vec<u32>,
}

static CREATED: Mutex<Created> = Mutex::new(Created {
    ns: None,
    dir: None,
    pids: Vec::new(),
});

fn created() -> std::sync::MutexGuard<'static, Created> {
    CREATED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Kills the processes started, deletes the namespace (its bridge and TAPs go with it) and the
/// directory.
fn clean_up() {
    let mut c = created();
    for pid in c.pids.drain(..) {
        // SAFETY: kill takes any pid; these are children this bench started (perhaps ended).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    if let Some(ns) = c.ns.take() {
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    }
    if let Some(d) = c.dir.take() {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A child process, killed on drop (and by [`clean_up`] on a panic).
struct Kid(Child);

impl Kid {
    fn spawn(mut c: Command) -> Kid {
        let child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {c:?}: {e}"));
        created().pids.push(child.id());
        Kid(child)
    }

    /// Reads stdout until a line containing `marker`.
    fn wait_stdout(&mut self, marker: &str) -> BufReader<std::process::ChildStdout> {
        let mut r = BufReader::new(self.0.stdout.take().unwrap());
        let mut seen = String::new();
        loop {
            let mut l = String::new();
            if r.read_line(&mut l).unwrap() == 0 {
                let mut e = String::new();
                let _ = self.0.stderr.take().unwrap().read_to_string(&mut e);
                panic!("no '{marker}' line: {seen}{e}");
            }
            seen.push_str(&l);
            if l.contains(marker) {
                return r;
            }
        }
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let id = self.0.id();
        created().pids.retain(|&p| p != id);
    }
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().unwrap();
    assert!(st.success(), "ip {args:?}");
}

fn env(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(d)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `k=` of the PASS or FAIL line of test `test` in `out`.
fn field(out: &str, test: &str, k: &str) -> Option<f64> {
    let line = out
        .lines()
        .find(|l| (l.starts_with("PASS ") || l.starts_with("FAIL ")) && l[5..].starts_with(test))?;
    line.split(' ')
        .find_map(|w| w.strip_prefix(&format!("{k}=")))
        .and_then(|v| v.parse().ok())
}

/// The switch's counters of port `network/port`, from its control socket.
fn port_stats(dir: &Path, network: &str, port: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(wv_vswitch::control_socket(dir)).unwrap();
    s.write_all(b"stats\n").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    v["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["network"] == network && p["port"] == port)
        .cloned()
        .unwrap_or_else(|| panic!("no port {network}/{port}"))
}

fn copies_ratio(before: &serde_json::Value, after: &serde_json::Value) -> f64 {
    let d = |k: &str| after[k].as_u64().unwrap() as f64 - before[k].as_u64().unwrap() as f64;
    d("copied_bytes") / d("rx_bytes")
}

#[derive(Clone, Copy, PartialEq)]
enum Path3 {
    Switch,
    Bridge,
    Qemu,
}

/// One guest-to-guest run's result.
struct GuestRow {
    fps: f64,
    lost: u64,
    copies: Option<f64>,
}

struct Setup {
    ns: String,
    dir: PathBuf,
    probe: PathBuf,
    khz: f64,
}

/// A VM of `path` on its side (`a` sends, `b` receives) with `cmdline`.
fn vm(s: &Setup, path: Path3, side: &str, mac: &str, cmdline: &str) -> Command {
    let tap = format!("tap{side}");
    match path {
        Path3::Switch | Path3::Bridge => {
            let mut c = Command::new(if path == Path3::Switch { "env" } else { "ip" });
            if path == Path3::Bridge {
                c.args(["netns", "exec", &s.ns]);
            }
            let net = if path == Path3::Switch {
                let sock = wv_vswitch::port_socket(&s.dir.join("sw"), "vm", side);
                format!("vhost-user={},mac={mac}", sock.display())
            } else {
                format!("tap={tap},mac={mac}")
            };
            c.arg(env!("CARGO_BIN_EXE_wv"))
                .args(["run", "--memory", "128M", "--kernel"])
                .arg(&s.probe)
                .args(["--net", &net, "--cmdline", cmdline]);
            c
        }
        Path3::Qemu => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &s.ns, "qemu-system-x86_64"])
                .args([
                    "-accel", "kvm", "-M", "pc", "-m", "128M", "-display", "none",
                ])
                .args(["-no-reboot", "-nodefaults", "-serial", "stdio", "-monitor"])
                .args(["none", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
                .arg("-kernel")
                .arg(&s.probe)
                .args(["-append", cmdline])
                .args([
                    "-netdev",
                    &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
                ])
                .args([
                    "-device",
                    &format!("virtio-net-pci,netdev=n0,disable-legacy=on,mac={mac}"),
                ]);
            c
        }
    }
}

/// `netbench` in VM a to `netsink` in VM b over `path`, `frames` frames of `bytes` bytes.
fn guest_run(s: &mut Setup, path: Path3, bytes: u64, frames: u64) -> GuestRow {
    let sink_cmd = format!("probe.tests=netsink probe.frames={frames} probe.idle_ms=1000");
    let before = (path == Path3::Switch).then(|| port_stats(&s.dir.join("sw"), "vm", "b"));
    let mut sink = Kid::spawn(vm(s, path, "b", "52:54:00:12:00:0b", &sink_cmd));
    let mut out = sink.wait_stdout("netsink: listening");
    let send_cmd =
        format!("probe.tests=netbench probe.frames={frames} probe.bytes={bytes} probe.inflight=32");
    let mut sender = Kid::spawn(vm(s, path, "a", "52:54:00:12:00:0a", &send_cmd));
    let mut so = String::new();
    sender
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut so)
        .unwrap();
    drop(sender);
    assert!(
        field(&so, "netbench", "cycles").is_some() && so.contains("PASS netbench"),
        "the sender failed: {so}"
    );
    if let Some(k) = field(&so, "netbench", "tsc_khz").filter(|k| *k > 0.0) {
        s.khz = k;
    }
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    drop(sink);
    let got = field(&rest, "netsink", "frames")
        .unwrap_or_else(|| panic!("no netsink result: {rest}")) as u64;
    let cycles = field(&rest, "netsink", "cycles").unwrap();
    if let Some(k) = field(&rest, "netsink", "tsc_khz").filter(|k| *k > 0.0) {
        s.khz = k;
    }
    assert!(s.khz > 0.0, "a wv run gives the TSC rate before QEMU runs");
    let secs = cycles / (s.khz * 1000.0);
    let copies = before.map(|b| copies_ratio(&b, &port_stats(&s.dir.join("sw"), "vm", "b")));
    GuestRow {
        fps: got.saturating_sub(1) as f64 / secs,
        lost: frames - got.min(frames),
        copies,
    }
}

/// One harness run's result.
struct HarnessRow {
    fps: f64,
    bps: f64,
    lost: u64,
    copies: Option<f64>,
    /// Allocations of the whole process from the first frame to the last.
    allocs: Option<f64>,
}

/// The bytes of one frame of `len` Ethernet bytes from `src` to `dst`, with its vnet header:
/// EtherType 0x88b5, or for `tso` an IPv4/TCP segment the receiver's side may keep whole
/// (NEEDS_CSUM, GSO TCPv4, MSS 1448).
fn frame(len: usize, src: [u8; 6], dst: [u8; 6], tso: bool) -> Vec<u8> {
    let mut f = vec![0x5au8; HDR + len];
    f[..HDR].fill(0);
    f[HDR..HDR + 6].copy_from_slice(&dst);
    f[HDR + 6..HDR + 12].copy_from_slice(&src);
    if !tso {
        f[HDR + 12..HDR + 14].copy_from_slice(&[0x88, 0xb5]);
        return f;
    }
    // vnet header: flags NEEDS_CSUM, gso TCPV4, hdr_len, gso_size, csum_start, csum_offset.
    f[0] = 1;
    f[1] = 1;
    f[2..4].copy_from_slice(&54u16.to_le_bytes());
    f[4..6].copy_from_slice(&1448u16.to_le_bytes());
    f[6..8].copy_from_slice(&34u16.to_le_bytes());
    f[8..10].copy_from_slice(&16u16.to_le_bytes());
    let e = HDR + 14;
    f[HDR + 12..e].copy_from_slice(&[0x08, 0x00]);
    let ip_len = (len - 14) as u16;
    f[e..e + 20].copy_from_slice(&[
        0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 99, 0, 1, 10, 99, 0, 2,
    ]);
    f[e + 2..e + 4].copy_from_slice(&ip_len.to_be_bytes());
    let mut sum: u32 = f[e..e + 20]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[e + 10..e + 12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let t = e + 20;
    f[t..t + 20].copy_from_slice(&[
        0x30, 0x39, 0x13, 0x89, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    f
}

/// Harness frame sizes: 64 B (60 + FCS), 1514 B, and a TSO segment of an IPv4 datagram of
/// 65000 bytes ("64 KiB").
const SIZES: [(usize, bool); 3] = [(60, false), (1514, false), (65014, true)];

fn mac(i: u8) -> [u8; 6] {
    [0x52, 0x54, 0, 0x12, 0x34, i]
}

/// Counts received frames: with mergeable buffers a frame may span several used chains, the
/// first of which carries `num_buffers`.
struct Counter {
    frames: u64,
    bytes: u64,
    cont: u16,
    first: Option<(Instant, u64)>,
    last: (Instant, u64),
}

impl Counter {
    fn new() -> Counter {
        Counter {
            frames: 0,
            bytes: 0,
            cont: 0,
            first: None,
            last: (Instant::now(), 0),
        }
    }

    /// A used buffer of `len` bytes (vnet header included for a frame's first), whose header
    /// says `num_buffers`.
    fn buffer(&mut self, len: u64, num_buffers: u16, mergeable: bool) {
        if self.cont > 0 {
            self.cont -= 1;
            self.bytes += len;
            return;
        }
        self.frames += 1;
        self.bytes += len.saturating_sub(HDR as u64);
        if mergeable {
            self.cont = num_buffers.saturating_sub(1);
        }
    }

    fn stamp(&mut self) {
        let now = (Instant::now(), ALLOCS.load(Ordering::Relaxed));
        if self.first.is_none() {
            self.first = Some(now);
        }
        self.last = now;
    }

    /// Frames and bits per second from the first frame to the last (the first frame's bytes
    /// left out, as its time is), and the allocations made between.
    fn rates(&self) -> (f64, f64, f64) {
        let Some((t0, a0)) = self.first else {
            return (0.0, 0.0, f64::NAN);
        };
        let secs = self.last.0.duration_since(t0).as_secs_f64();
        let n = self.frames.saturating_sub(1).max(1) as f64;
        let bits = self.bytes as f64 * 8.0 * n / self.frames.max(1) as f64;
        (n / secs, bits / secs, (self.last.1 - a0) as f64)
    }
}

/// Two frontends on ports `rx` and `tx` of network `h` of the in-process switch under `dir`:
/// `total` frames of `len` bytes, tx to rx. None if the size needs TSO the switch lacks.
fn harness_switch(dir: &Path, pair: u8, len: usize, tso: bool, total: u64) -> Option<HarnessRow> {
    const RING: u16 = 256;
    let stride = if tso { 68 << 10 } else { 2048 };
    let (want_tx, want_rx) = if tso {
        (
            netplayer::F_CSUM | netplayer::F_HOST_TSO4,
            netplayer::F_GUEST_CSUM | netplayer::F_GUEST_TSO4 | netplayer::F_MRG_RXBUF,
        )
    } else {
        (0, 0)
    };
    let (rxp, txp) = (format!("rx{pair}"), format!("tx{pair}"));
    let mut rx = NetPlayer::connect_with(
        &wv_vswitch::port_socket(dir, "h", &rxp),
        RING,
        stride,
        want_rx,
    );
    let mut tx = NetPlayer::connect_with(
        &wv_vswitch::port_socket(dir, "h", &txp),
        RING,
        stride,
        want_tx,
    );
    if tso && (tx.acked & netplayer::F_HOST_TSO4 == 0 || rx.acked & netplayer::F_GUEST_TSO4 == 0) {
        return None;
    }
    let mergeable = rx.acked & netplayer::F_MRG_RXBUF != 0;
    let (me, to) = (mac(2 * pair + 1), mac(2 * pair));
    // The receiver: every buffer posted, then a hello so that the switch learns its address
    // (used: learned).
    for i in 0..RING {
        rx.desc(0, i, stride as u32);
        rx.offer(0, i);
    }
    rx.kick[0].write(1).unwrap();
    let hello = frame(60, to, [0xff; 6], false);
    rx.mem
        .write_slice(&hello, GuestAddress(rx.buf(1, 0)))
        .unwrap();
    rx.desc(1, 0, hello.len() as u32);
    rx.offer(1, 0);
    rx.kick[1].write(1).unwrap();
    let mut used = Vec::new();
    assert!(
        rx.used_within(1, &mut used, Duration::from_secs(10)),
        "the switch took the receiver's hello"
    );
    let receiver = std::thread::spawn(move || {
        let mut c = Counter::new();
        let mut used = Vec::with_capacity(usize::from(RING));
        let mut nb = [0u8; 2];
        while c.frames < total && rx.used_within(0, &mut used, Duration::from_millis(500)) {
            for &(h, l) in &used {
                if mergeable && c.cont == 0 {
                    rx.mem
                        .read_slice(&mut nb, GuestAddress(rx.buf(0, h) + 10))
                        .unwrap();
                }
                c.buffer(u64::from(l), u16::from_le_bytes(nb), mergeable);
                rx.offer(0, h);
            }
            if !used.is_empty() {
                c.stamp();
                rx.kick_if_needed(0);
            }
        }
        c
    });
    let f = frame(len, me, to, tso);
    let n = u64::from(RING).min(total);
    for i in 0..n as u16 {
        tx.mem.write_slice(&f, GuestAddress(tx.buf(1, i))).unwrap();
        tx.desc(1, i, f.len() as u32);
        tx.offer(1, i);
    }
    tx.kick[1].write(1).unwrap();
    let (mut posted, mut done) = (n, 0u64);
    // Room for a whole ring of used heads: no allocation while counted.
    let mut used = Vec::with_capacity(usize::from(RING));
    let stop = std::sync::atomic::AtomicBool::new(false);
    while done < total && tx.used(1, &mut used, &stop) {
        for &(h, _) in &used {
            done += 1;
            if posted < total {
                tx.offer(1, h);
                posted += 1;
            }
        }
        // As a driver does: no kick while the switch is draining the ring.
        tx.kick_if_needed(1);
    }
    let c = receiver.join().expect("the receiver ran");
    let (fps, bps, allocs) = c.rates();
    let st = port_stats(dir, "h", &rxp);
    let g = |k: &str| st[k].as_u64().unwrap() as f64;
    Some(HarnessRow {
        fps,
        bps,
        lost: total - c.frames.min(total),
        copies: Some(g("copied_bytes") / g("rx_bytes")),
        allocs: Some(allocs),
    })
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// Attaches to TAP `name` (in this thread's namespace) with a 12-byte vnet header, with the
/// CSUM and TSO4 offloads if `tso`.
fn open_tap(name: &str, tso: bool) -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("/dev/net/tun");
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: 0x0002 | 0x1000 | 0x4000, // IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq we own.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req) };
    assert_eq!(
        r,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    let hdr: libc::c_int = HDR as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads an int we own.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) };
    assert_eq!(r, 0, "TUNSETVNETHDRSZ: {}", std::io::Error::last_os_error());
    let off: libc::c_ulong = if tso { 0x01 | 0x02 } else { 0 }; // TUN_F_CSUM | TUN_F_TSO4
                                                                // SAFETY: TUNSETOFFLOAD takes the flags by value.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETOFFLOAD, off) };
    assert_eq!(r, 0, "TUNSETOFFLOAD: {}", std::io::Error::last_os_error());
    f
}

/// Runs `f` in a thread that entered namespace `ns` (the bench's other threads stay where they
/// are).
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let nsf = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on a namespace file we opened; affects this thread only.
        let r = unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the namespace thread ran")
}

/// The bridge path without guests: `total` frames of `len` bytes written into TAP a, read from
/// TAP b across the bridge.
fn harness_bridge(ns: &str, len: usize, tso: bool, total: u64) -> HarnessRow {
    let (a, b) = in_ns(ns, move || (open_tap("tapa", tso), open_tap("tapb", tso)));
    let (me, to) = (mac(200), mac(201));
    // The bridge learns b's address from a hello b sends; a's from its frames.
    (&b).write_all(&frame(60, to, [0xff; 6], false)).unwrap();
    let receiver = std::thread::spawn(move || {
        let mut c = Counter::new();
        let mut buf = vec![0u8; 70 << 10];
        let mut pfd = libc::pollfd {
            fd: b.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        while c.frames < total {
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 500) } != 1 {
                break;
            }
            let n = (&b).read(&mut buf).unwrap();
            // Only the sender's frames (the kernel may send others); a segment of a TSO frame
            // (were the kernel to cut it) is counted in bytes, not as a frame.
            if n > HDR + 14 && buf[HDR + 6..HDR + 12] == me {
                if n - HDR >= len {
                    c.buffer(n as u64, 1, false);
                } else {
                    c.bytes += (n - HDR) as u64;
                }
                c.stamp();
            }
        }
        c
    });
    let f = frame(len, me, to, tso);
    for _ in 0..total {
        if let Err(e) = (&a).write_all(&f) {
            panic!("writing into tapa: {e}");
        }
    }
    let c = receiver.join().expect("the reader ran");
    let (fps, bps, _) = c.rates();
    HarnessRow {
        fps,
        bps,
        lost: total - c.frames.min(total),
        copies: None,
        allocs: None,
    }
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "needs root (namespace, bridge, TAPs)");
    let rounds = env("ROUNDS", 3).max(1) as usize;
    let frames = env("FRAMES", 20_000).max(2);
    let hframes = frames * 10;
    // HARNESS_ONLY=1: only the host-side harness rows; =switch: only its switch rows (for
    // profiling the switch alone).
    let harness_only = std::env::var("HARNESS_ONLY").ok();
    let guests = harness_only.is_none();
    let bridge_rows = harness_only.as_deref() != Some("switch");
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |i| {
        clean_up();
        default_hook(i);
    }));
    let pid = std::process::id();
    let ns = format!("wvswbench{pid}");
    let dir = std::env::temp_dir().join(format!("wv-vswitch-bench-{pid}"));
    created().ns = Some(ns.clone());
    created().dir = Some(dir.clone());
    ip(&["netns", "add", &ns]);
    for k in ["all", "default"] {
        let _ = Command::new("ip")
            .args(["netns", "exec", &ns, "sysctl", "-qw"])
            .arg(format!("net.ipv6.conf.{k}.disable_ipv6=1"))
            .status();
    }
    ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"]);
    for t in ["tapa", "tapb"] {
        ip(&["-n", &ns, "tuntap", "add", "dev", t, "mode", "tap"]);
        ip(&["-n", &ns, "link", "set", t, "master", "br0"]);
        ip(&["-n", &ns, "link", "set", t, "up"]);
    }
    ip(&["-n", &ns, "link", "set", "br0", "up"]);
    std::fs::create_dir_all(&dir).unwrap();
    let probe = dir.join("probe.elf");
    std::fs::write(&probe, wv_probe_images::PROBE_PVH).unwrap();
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());

    // The switch the guests use: its own process, as `wv host` runs it.
    let swdir = dir.join("sw");
    let mut c = Command::new(env!("CARGO_BIN_EXE_wv"));
    c.args(["vswitch", "--socket-dir", swdir.to_str().unwrap()])
        .args(["--port", "vm/a", "--port", "vm/b"]);
    let mut sw = Kid::spawn(c);
    {
        let mut r = BufReader::new(sw.0.stderr.take().unwrap());
        let mut l = String::new();
        while !l.contains("wv vswitch: serving") {
            l.clear();
            assert!(r.read_line(&mut l).unwrap() > 0, "the switch did not start");
        }
        // Its later lines are drained, never left to fill the pipe.
        std::thread::spawn(move || std::io::copy(&mut r, &mut std::io::sink()));
    }

    // The harness's switch: inside this process (so its allocations are counted), the same
    // code; one pair of ports per round and size.
    let hdir = dir.join("hsw");
    let npairs = (rounds * SIZES.len()) as u8;
    let cfg = wv_vswitch::Config {
        socket_dir: hdir.clone(),
        networks: vec![wv_vswitch::NetworkConfig {
            name: "h".into(),
            ports: (0..npairs)
                .flat_map(|p| [format!("rx{p}"), format!("tx{p}")])
                .collect(),
            uplink: None,
        }],
    };
    std::thread::spawn(move || {
        if let Err(e) = wv_vswitch::run(&cfg) {
            panic!("the harness switch: {e}");
        }
    });
    let t = Instant::now();
    while !wv_vswitch::port_socket(&hdir, "h", &format!("tx{}", npairs - 1)).exists()
        || UnixStream::connect(wv_vswitch::control_socket(&hdir)).is_err()
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the harness switch serves"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let mut s = Setup {
        ns: ns.clone(),
        dir: dir.clone(),
        probe,
        khz: 0.0,
    };
    let paths = [
        (Path3::Switch, "wv + switch (vhost-user)"),
        (Path3::Bridge, "wv + Linux bridge (TAP)"),
        (Path3::Qemu, "QEMU + Linux bridge (TAP)"),
    ];
    let gsizes = [60u64, 1514];
    // [path][size]: fps per round, lost, copies.
    type G = (Vec<f64>, u64, Vec<f64>);
    let mut g: Vec<Vec<G>> = vec![vec![G::default(); 2]; 3];
    // [size]: fps, bps per round, lost, copies, allocations per frame.
    type H = (Vec<f64>, Vec<f64>, u64, Vec<f64>, Vec<f64>);
    let mut hs: Vec<H> = vec![Default::default(); 3];
    let mut hb: Vec<H> = vec![Default::default(); 3];
    let add = |e: &mut H, r: &HarnessRow| {
        e.0.push(r.fps);
        e.1.push(r.bps);
        e.2 += r.lost;
        e.3.extend(r.copies);
        e.4.extend(r.allocs);
    };
    let mut pair = 0u8;
    for round in 0..rounds {
        for (pi, &(path, _)) in paths.iter().enumerate() {
            if (path == Path3::Qemu && !qemu) || !guests {
                continue;
            }
            for (si, &bytes) in gsizes.iter().enumerate() {
                let r = guest_run(&mut s, path, bytes, frames);
                let e = &mut g[pi][si];
                e.0.push(r.fps);
                e.1 += r.lost;
                e.2.extend(r.copies);
            }
        }
        for (si, &(len, tso)) in SIZES.iter().enumerate() {
            let total = if tso { frames } else { hframes };
            if let Some(r) = harness_switch(&hdir, pair, len, tso, total) {
                add(&mut hs[si], &r);
            }
            pair += 1;
            if bridge_rows {
                add(&mut hb[si], &harness_bridge(&ns, len, tso, total));
            }
        }
        eprint!("\rround {}/{rounds}", round + 1);
    }
    eprintln!();
    drop(sw);
    clean_up();

    let mbps = |fps: f64, len: f64| fps * len * 8.0 / 1e6;
    println!(
        "guest to guest: netbench -> netsink, {frames} broadcast frames per run (32 in flight), medians of {rounds} rounds"
    );
    println!(
        "{:<28} {:>12} {:>9} {:>6} {:>12} {:>9} {:>6} {:>28}",
        "path",
        "64 B fr/s",
        "Mb/s",
        "lost",
        "1514 B fr/s",
        "Mb/s",
        "lost",
        "copied/deliv. 64 B / 1514 B"
    );
    for (pi, &(path, name)) in paths.iter().enumerate() {
        if !guests {
            println!("{name:<28} NOT MEASURED (HARNESS_ONLY)");
            continue;
        }
        if path == Path3::Qemu && !qemu {
            println!("{name:<28} NOT MEASURED (qemu-system-x86_64 missing)");
            continue;
        }
        let (a, b) = (&g[pi][0], &g[pi][1]);
        let (fa, fb) = (median(&a.0), median(&b.0));
        let worst = |v: &[f64]| v.iter().cloned().fold(f64::NAN, f64::max);
        let cp = if a.2.is_empty() {
            "-".to_string()
        } else {
            format!("{:.3} / {:.3}", worst(&a.2), worst(&b.2))
        };
        println!(
            "{name:<28} {fa:>12.0} {:>9.1} {:>6} {fb:>12.0} {:>9.1} {:>6} {cp:>28}",
            mbps(fa, 64.0),
            a.1,
            mbps(fb, 1514.0),
            b.1,
        );
    }
    println!();
    println!(
        "host-side harness (no guest): {hframes} frames per run ({frames} at 64 KiB), unicast, medians of {rounds} rounds"
    );
    println!(
        "{:<40} {:>12} {:>9} {:>8} {:>14} {:>12}",
        "path, frame", "frames/s", "Gb/s", "lost", "copied/deliv.", "allocations"
    );
    for (si, &(len, tso)) in SIZES.iter().enumerate() {
        let label = match (len, tso) {
            (60, _) => "64 B".to_string(),
            (_, false) => format!("{len} B"),
            (_, true) => "64 KiB TSO".to_string(),
        };
        let worst = |v: &[f64], p: usize| {
            if v.is_empty() {
                "-".to_string()
            } else {
                format!("{:.p$}", v.iter().cloned().fold(f64::NAN, f64::max))
            }
        };
        for (e, name) in [
            (&hs[si], format!("switch (vhost-user), {label}")),
            (&hb[si], format!("Linux bridge (TAP to TAP), {label}")),
        ] {
            if e.0.is_empty() && !bridge_rows && name.starts_with("Linux") {
                println!("{name:<40} NOT MEASURED (HARNESS_ONLY=switch)");
                continue;
            }
            if e.0.is_empty() {
                println!("{name:<40} skipped: switch offers no TSO");
                continue;
            }
            println!(
                "{name:<40} {:>12.0} {:>9.2} {:>8} {:>14} {:>12}",
                median(&e.0),
                median(&e.1) / 1e9,
                e.2,
                worst(&e.3, 3),
                worst(&e.4, 0),
            );
        }
    }
    println!("copied/deliv.: the receiving port's copied_bytes / rx_bytes (worst round); allocations: the whole process's (switch and both frontends) from the receiver's first frame to its last, in all (worst round; a switch port's frame slots are allocated once, on first use)");
}
