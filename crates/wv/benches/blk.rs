//! virtio-blk throughput: the probe guest's `blkbench` (sequential 1 MiB and random 4 KiB
//! writes and reads) on wv and on QEMU with the same image, next to the raw-file limit (the
//! same access pattern with pread/pwrite on the host) and the device path alone (a harness
//! that plays the driver by writing descriptors into guest memory and calls the request
//! handler, no guest and no KVM). All in one run, medians of `ROUNDS` (default 5).
//!
//! The storage service (issue 12): the same guest on a disk served by `wv storage` over
//! vhost-user-blk (`wv run --disk vhost-user=SOCKET`, the image opened by the service), next
//! to wv's own virtio-blk on the same image; and the service's device path alone (the disk
//! opened as the service opens it, each request through its dispatcher, [`wv_shares::Gate`],
//! then the same handler). A second table gives the time per 4 KiB random request (the
//! guest's cycles / ops) of each, and what the service adds to wv's own.
//!
//! Caching: everything goes through the host page cache (no O_DIRECT, no fsync), which is
//! what wv's raw backend and QEMU's default cache=writeback do.
//!
//! Run: `cargo bench -p wv --bench blk`.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use wv_virtio::block::{process, BlockCounters, RawDisk};
use wv_virtio::GuestMemoryMmap;

const IMG_MIB: u64 = 256;
const SEQ_MIB: u64 = 64;
const RAND_OPS: u64 = 1000;

struct Rates {
    seq_write: f64,
    seq_read: f64,
    rand_write: f64,
    rand_read: f64,
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn rates(sw: f64, sr: f64, rw: f64, rr: f64) -> Rates {
    Rates {
        seq_write: SEQ_MIB as f64 / sw,
        seq_read: SEQ_MIB as f64 / sr,
        rand_write: RAND_OPS as f64 / rw,
        rand_read: RAND_OPS as f64 / rr,
    }
}

/// The raw-file limit: the guest's pattern with pread/pwrite on the image.
fn raw(img: &Path) -> Rates {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut buf = vec![0x5au8; 1 << 20];
    let mut timed = |write: bool, seq: bool| {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let t = Instant::now();
        let n = if seq { SEQ_MIB } else { RAND_OPS };
        for i in 0..n {
            let (off, len) = if seq {
                (i << 20, 1 << 20)
            } else {
                ((xorshift(&mut x) % (SEQ_MIB * 256)) * 4096, 4096)
            };
            if write {
                f.write_all_at(&buf[..len], off).unwrap();
            } else {
                f.read_exact_at(&mut buf[..len], off).unwrap();
            }
        }
        t.elapsed().as_secs_f64()
    };
    let (sw, sr, rw, rr) = (
        timed(true, true),
        timed(false, true),
        timed(true, false),
        timed(false, false),
    );
    rates(sw, sr, rw, rr)
}

/// The device path alone: descriptors written into guest memory, handled by `process`.
fn device_path(img: &Path) -> Rates {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let mut disk = RawDisk::open(img, false).unwrap();
    let counters = BlockCounters::default();
    let mut q = Queue::new(256).unwrap();
    q.try_set_desc_table_address(GuestAddress(0x1000)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(0x2000)).unwrap();
    q.try_set_used_ring_address(GuestAddress(0x3000)).unwrap();
    q.set_ready(true);
    let mut avail: u16 = 0;
    let mut request = |write: bool, sector: u64, len: u32| {
        mem.write_obj(u32::from(write), GuestAddress(0x8000))
            .unwrap();
        mem.write_obj(sector, GuestAddress(0x8008)).unwrap();
        let descs: [(u64, u32, u16, u16); 3] = [
            (0x8000, 16, 1, 1),
            (0x100000, len, 1 | if write { 0 } else { 2 }, 2),
            (0x9000, 1, 2, 0),
        ];
        for (i, (a, l, fl, nx)) in descs.iter().enumerate() {
            let at = 0x1000 + 16 * i as u64;
            mem.write_obj(*a, GuestAddress(at)).unwrap();
            mem.write_obj(*l, GuestAddress(at + 8)).unwrap();
            mem.write_obj(*fl, GuestAddress(at + 12)).unwrap();
            mem.write_obj(*nx, GuestAddress(at + 14)).unwrap();
        }
        mem.write_obj(0u16, GuestAddress(0x2004 + 2 * u64::from(avail % 256)))
            .unwrap();
        avail = avail.wrapping_add(1);
        mem.write_obj(avail, GuestAddress(0x2002)).unwrap();
        let chain = q.pop_descriptor_chain(&mem).expect("chain");
        let head = chain.head_index();
        let n = process(&mem, chain, &mut disk, b"bench-device-path-00", &counters);
        q.add_used(&mem, head, n).unwrap();
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x9000)).unwrap(),
            0,
            "status"
        );
    };
    let mut timed = |write: bool, seq: bool| {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let t = Instant::now();
        let n = if seq { SEQ_MIB } else { RAND_OPS };
        for i in 0..n {
            if seq {
                request(write, i * 2048, 1 << 20);
            } else {
                request(write, (xorshift(&mut x) % (SEQ_MIB * 256)) * 8, 4096);
            }
        }
        t.elapsed().as_secs_f64()
    };
    let (sw, sr, rw, rr) = (
        timed(true, true),
        timed(false, true),
        timed(true, false),
        timed(false, false),
    );
    rates(sw, sr, rw, rr)
}

/// The storage service's device path alone: the disk opened as `wv storage` opens it
/// ([`wv_storage::disk::open`]), each request let through by a dispatcher as the service's
/// ([`wv_shares::Gate`], no capacity) and handled by `process`.
fn storage_device_path(img: &Path) -> Rates {
    let spec = wv_storage::DiskSpec::parse(&format!("bench=path={}", img.display())).unwrap();
    let mut disk = wv_storage::disk::open(&spec, false).unwrap();
    let gate = wv_shares::Gate::new(0, wv_storage::MAX_OUTSTANDING, 8.0);
    gate.set(0, wv_shares::Settings::default());
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let counters = BlockCounters::default();
    let mut q = Queue::new(256).unwrap();
    q.try_set_desc_table_address(GuestAddress(0x1000)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(0x2000)).unwrap();
    q.try_set_used_ring_address(GuestAddress(0x3000)).unwrap();
    q.set_ready(true);
    let mut avail: u16 = 0;
    let mut request = |write: bool, sector: u64, len: u32| {
        mem.write_obj(u32::from(write), GuestAddress(0x8000))
            .unwrap();
        mem.write_obj(sector, GuestAddress(0x8008)).unwrap();
        let descs: [(u64, u32, u16, u16); 3] = [
            (0x8000, 16, 1, 1),
            (0x100000, len, 1 | if write { 0 } else { 2 }, 2),
            (0x9000, 1, 2, 0),
        ];
        for (i, (a, l, fl, nx)) in descs.iter().enumerate() {
            let at = 0x1000 + 16 * i as u64;
            mem.write_obj(*a, GuestAddress(at)).unwrap();
            mem.write_obj(*l, GuestAddress(at + 8)).unwrap();
            mem.write_obj(*fl, GuestAddress(at + 12)).unwrap();
            mem.write_obj(*nx, GuestAddress(at + 14)).unwrap();
        }
        mem.write_obj(0u16, GuestAddress(0x2004 + 2 * u64::from(avail % 256)))
            .unwrap();
        avail = avail.wrapping_add(1);
        mem.write_obj(avail, GuestAddress(0x2002)).unwrap();
        let chain = q.pop_descriptor_chain(&mem).expect("chain");
        let head = chain.head_index();
        let cost = wv_storage::request_cost(&chain);
        let grant = gate
            .acquire(0, cost, std::time::Duration::from_secs(5))
            .expect("the dispatcher lets it go");
        let n = process(
            &mem,
            chain,
            disk.as_mut(),
            b"bench-storage-path-0",
            &counters,
        );
        gate.release(grant);
        q.add_used(&mem, head, n).unwrap();
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x9000)).unwrap(),
            0,
            "status"
        );
    };
    let mut timed = |write: bool, seq: bool| {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let t = Instant::now();
        let n = if seq { SEQ_MIB } else { RAND_OPS };
        for i in 0..n {
            if seq {
                request(write, i * 2048, 1 << 20);
            } else {
                request(write, (xorshift(&mut x) % (SEQ_MIB * 256)) * 8, 4096);
            }
        }
        t.elapsed().as_secs_f64()
    };
    let (sw, sr, rw, rr) = (
        timed(true, true),
        timed(false, true),
        timed(true, false),
        timed(false, false),
    );
    rates(sw, sr, rw, rr)
}

/// `wv storage` serving the image as disk `bench` under `dir`, until dropped (killed).
struct Service(std::process::Child);

impl Service {
    fn start(wv: &str, dir: &Path, img: &Path) -> Service {
        use std::io::BufRead;
        let mut child = Command::new(wv)
            .args(["storage", "--socket-dir"])
            .arg(dir)
            .args(["--disk", &format!("bench=path={}", img.display())])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn wv storage");
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                err.read_line(&mut line).unwrap() > 0,
                "wv storage ended before serving"
            );
            if line.contains("wv storage: serving") {
                break;
            }
        }
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        Service(child)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Parses the guest's blkbench line; with `khz` (from wv's run) converts cycles to seconds.
fn guest(out: &str, khz: Option<f64>) -> Option<(Rates, f64)> {
    let line = out.lines().find(|l| l.starts_with("PASS blkbench"))?;
    let field = |k: &str| -> Option<f64> {
        line.split(' ')
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
    };
    let own = field("tsc_khz").filter(|k| *k > 0.0);
    let khz = own.or(khz)?;
    let s = |k: &str| field(k).map(|c| c / (khz * 1000.0));
    Some((
        rates(
            s("seq_write_cycles")?,
            s("seq_read_cycles")?,
            s("rand_write_cycles")?,
            s("rand_read_cycles")?,
        ),
        khz,
    ))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dir = std::env::temp_dir().join(format!("wv-blkbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("bench.img");
    let probe = dir.join("probe.elf");
    std::fs::write(&probe, wv_probe_images::PROBE_PVH).unwrap();
    {
        let f = std::fs::File::create(&img).unwrap();
        let mut x = 1u64;
        let chunk: Vec<u8> = (0..1 << 20)
            .map(|_| xorshift(&mut x).to_le_bytes()[0])
            .collect();
        for i in 0..IMG_MIB {
            f.write_all_at(&chunk, i << 20).unwrap();
        }
    }
    let wv = env!("CARGO_BIN_EXE_wv");
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok();
    let names = [
        "raw file (pread/pwrite)",
        "device path (no guest)",
        "storage path (no guest)",
        "wv (probe guest)",
        "wv + wv storage (vhost)",
        "QEMU virtio-blk-pci",
    ];
    let (wv_row, storage_row, qemu_row) = (3, 4, 5);
    let mut cols: Vec<[Vec<f64>; 4]> = (0..names.len()).map(|_| Default::default()).collect();
    let push = |cols: &mut Vec<[Vec<f64>; 4]>, i: usize, r: Rates| {
        for (j, v) in [r.seq_write, r.seq_read, r.rand_write, r.rand_read]
            .into_iter()
            .enumerate()
        {
            cols[i][j].push(v);
        }
    };
    for round in 0..rounds {
        push(&mut cols, 0, raw(&img));
        push(&mut cols, 1, device_path(&img));
        push(&mut cols, 2, storage_device_path(&img));
        let out = Command::new(wv)
            .args(["run", "--memory", "256M", "--serial", "stdio", "--kernel"])
            .arg(&probe)
            .args([
                "--disk",
                &format!("path={}", img.display()),
                "--cmdline",
                "probe.tests=blkbench",
            ])
            .output()
            .unwrap();
        let (r, khz) =
            guest(&String::from_utf8_lossy(&out.stdout), None).expect("wv blkbench line");
        push(&mut cols, wv_row, r);
        {
            let sdir = dir.join("st");
            let _svc = Service::start(wv, &sdir, &img);
            let out = Command::new(wv)
                .args(["run", "--memory", "256M", "--serial", "stdio", "--kernel"])
                .arg(&probe)
                .args([
                    "--disk",
                    &format!("vhost-user={}", sdir.join("bench.sock").display()),
                    "--cmdline",
                    "probe.tests=blkbench",
                ])
                .output()
                .unwrap();
            let (r, _) =
                guest(&String::from_utf8_lossy(&out.stdout), Some(khz)).unwrap_or_else(|| {
                    panic!(
                        "wv + storage blkbench line: {}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    )
                });
            push(&mut cols, storage_row, r);
        }
        if qemu {
            let out = Command::new("qemu-system-x86_64")
                .args([
                    "-accel",
                    "kvm",
                    "-M",
                    "pc",
                    "-m",
                    "256M",
                    "-display",
                    "none",
                    "-no-reboot",
                    "-nodefaults",
                ])
                .args([
                    "-serial",
                    "stdio",
                    "-monitor",
                    "none",
                    "-device",
                    "isa-debug-exit,iobase=0xf4,iosize=0x04",
                ])
                .arg("-kernel")
                .arg(&probe)
                .args(["-append", "probe.tests=blkbench"])
                .args([
                    "-drive",
                    &format!("file={},if=none,id=d0,format=raw", img.display()),
                ])
                .args(["-device", "virtio-blk-pci,drive=d0,disable-legacy=on"])
                .output()
                .unwrap();
            let (r, _) = guest(&String::from_utf8_lossy(&out.stdout), Some(khz))
                .expect("QEMU blkbench line");
            push(&mut cols, qemu_row, r);
        }
        eprint!("\rround {}/{rounds}", round + 1);
    }
    eprintln!();
    println!("virtio-blk, {IMG_MIB} MiB image in the page cache; sequential {SEQ_MIB} x 1 MiB, random {RAND_OPS} x 4 KiB; medians of {rounds} rounds");
    println!(
        "{:<26} {:>14} {:>14} {:>14} {:>14}",
        "", "seq write", "seq read", "rand write", "rand read"
    );
    let mut medians: Vec<Option<Vec<f64>>> = Vec::new();
    for (i, n) in names.iter().enumerate() {
        if cols[i][0].is_empty() {
            println!("{n:<26} NOT MEASURED (qemu-system-x86_64 missing)");
            medians.push(None);
            continue;
        }
        let m: Vec<f64> = (0..4).map(|j| median(&mut cols[i][j])).collect();
        println!(
            "{n:<26} {:>9.0} MiB/s {:>9.0} MiB/s {:>10.0} IOPS {:>10.0} IOPS",
            m[0], m[1], m[2], m[3]
        );
        medians.push(Some(m));
    }
    // Time per request: for a guest, its cycles over its ops (one request at a time).
    println!();
    println!("4 KiB random, time per request (us)        write       read");
    let us = |iops: f64| 1e6 / iops;
    for (i, n) in names.iter().enumerate() {
        if let Some(m) = &medians[i] {
            println!("{n:<40} {:>10.1} {:>10.1}", us(m[2]), us(m[3]));
        }
    }
    if let (Some(own), Some(st)) = (&medians[wv_row], &medians[storage_row]) {
        println!(
            "{:<40} {:>10.1} {:>10.1}",
            "storage service adds (guest)",
            us(st[2]) - us(own[2]),
            us(st[3]) - us(own[3])
        );
        println!(
            "storage service / wv's own throughput: seq write {:.2}, seq read {:.2}, rand write {:.2}, rand read {:.2}",
            st[0] / own[0],
            st[1] / own[1],
            st[2] / own[2],
            st[3] / own[3]
        );
    }
    if let (Some(own), Some(st)) = (&medians[1], &medians[2]) {
        println!(
            "{:<40} {:>10.2} {:>10.2}",
            "dispatcher adds (device path)",
            us(st[2]) - us(own[2]),
            us(st[3]) - us(own[3])
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
