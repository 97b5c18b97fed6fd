//! VMKFS against a raw image file and qcow2, side by side in one run on the same host file
//! system (the temporary directory), plus snapshot time against disk size and the memory the
//! cached metadata takes per TiB of virtual disk.
//!
//! Workload on a 512 MiB disk, synchronous, one request at a time: sequential 1 MiB writes and
//! reads over the whole disk, then 20000 random 4 KiB writes and reads (request i at
//! (i × 7919 pages) mod size, a permutation of the disk's pages; the same pattern
//! `qemu-img bench -S` produces). Caching: the host page cache (no O_DIRECT), no flush inside
//! the timed loops, and `sync` before each phase. Every target gets one untimed write pass first, so all are allocated and
//! cached; then `ROUNDS` (default 5) rounds, targets interleaved, medians reported.
//! - raw: pread/pwrite on a fallocated 512 MiB file;
//! - VMKFS: the library on a datastore file (1 MiB blocks), a preallocated 512 MiB disk;
//! - qcow2: `qemu-img bench -d 1 -t writeback` (the time it reports), on a
//!   default qcow2 (64 KiB clusters, no preallocation) and with preallocation=metadata; and the
//!   raw file through `qemu-img bench` too, to show what its harness costs.
//!
//! Run: `cargo bench -p wv-vmkfs --bench vmkfs`.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;
use wv_vmkfs::{Datastore, FileDev, MkfsOptions};

const SIZE: u64 = 512 << 20;
const RAND_OPS: u64 = 20_000;
const STRIDE_PAGES: u64 = 7919;

#[derive(Clone, Copy, Default)]
struct Rates {
    seq_write: f64,
    seq_read: f64,
    rand_write: f64,
    rand_read: f64,
}

fn rand_offset(i: u64) -> u64 {
    (i * STRIDE_PAGES * 4096) % SIZE
}

/// The workload on any read/write pair; returns MiB/s and IOPS.
fn workload(write: &mut dyn FnMut(&[u8], u64), read: &mut dyn FnMut(&mut [u8], u64)) -> Rates {
    let mut big = vec![0x5au8; 1 << 20];
    let mut small = vec![0xa5u8; 4096];
    let n = SIZE >> 20;
    // Each phase starts with no dirty pages, so write-back of one target's data never lands
    // in another's timing.
    let settle = || {
        // SAFETY: sync has no preconditions.
        unsafe { libc::sync() }
    };
    settle();
    let t = Instant::now();
    for i in 0..n {
        write(&big, i << 20);
    }
    let sw = t.elapsed().as_secs_f64();
    settle();
    let t = Instant::now();
    for i in 0..n {
        read(&mut big, i << 20);
    }
    let sr = t.elapsed().as_secs_f64();
    settle();
    let t = Instant::now();
    for i in 0..RAND_OPS {
        write(&small, rand_offset(i));
    }
    let rw = t.elapsed().as_secs_f64();
    settle();
    let t = Instant::now();
    for i in 0..RAND_OPS {
        read(&mut small, rand_offset(i));
    }
    let rr = t.elapsed().as_secs_f64();
    Rates {
        seq_write: n as f64 / sw,
        seq_read: n as f64 / sr,
        rand_write: RAND_OPS as f64 / rw,
        rand_read: RAND_OPS as f64 / rr,
    }
}

/// One `qemu-img bench` run; returns the time it reports for the requests alone.
fn qemu_bench(img: &Path, fmt: &str, write: bool, seq: bool) -> f64 {
    // SAFETY: sync has no preconditions (as in `workload`: no dirty pages at the start).
    unsafe { libc::sync() };
    let mut c = Command::new("qemu-img");
    c.args(["bench", "-f", fmt, "-t", "writeback", "-d", "1"]);
    if seq {
        c.args(["-c", &(SIZE >> 20).to_string(), "-s", "1M"]);
    } else {
        c.args([
            "-c",
            &RAND_OPS.to_string(),
            "-s",
            "4K",
            "-S",
            &(STRIDE_PAGES * 4096).to_string(),
        ]);
    }
    if write {
        c.args(["-w", "--pattern=90"]);
    }
    let out = c.arg(img).output().expect("qemu-img (Debian qemu-utils)");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("Run completed in ")?
                .strip_suffix(" seconds.")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("qemu-img bench printed no time: {text}"))
}

fn qemu_rates(img: &Path, fmt: &str) -> Rates {
    let sw = qemu_bench(img, fmt, true, true);
    let sr = qemu_bench(img, fmt, false, true);
    let rw = qemu_bench(img, fmt, true, false);
    let rr = qemu_bench(img, fmt, false, false);
    Rates {
        seq_write: (SIZE >> 20) as f64 / sw,
        seq_read: (SIZE >> 20) as f64 / sr,
        rand_write: RAND_OPS as f64 / rw,
        rand_read: RAND_OPS as f64 / rr,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dir = std::env::temp_dir().join(format!("vmkfs-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // raw
    let raw_path = dir.join("raw.img");
    let raw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&raw_path)
        .unwrap();
    raw.set_len(SIZE).unwrap();
    // Allocated the way VMKFS allocates a preallocated disk (unwritten extents by
    // FALLOC_FL_ZERO_RANGE), so both start alike on the host file system.
    // SAFETY: fallocate on a file we just created.
    unsafe {
        libc::fallocate(
            std::os::unix::io::AsRawFd::as_raw_fd(&raw),
            libc::FALLOC_FL_ZERO_RANGE,
            0,
            SIZE as i64,
        );
    }
    // VMKFS
    let ds_path = dir.join("datastore.img");
    std::fs::File::create(&ds_path)
        .unwrap()
        .set_len(SIZE + (64 << 20))
        .unwrap();
    let dev = Arc::new(FileDev::open(&ds_path, false).unwrap());
    let mut ds = Datastore::mkfs(dev, &MkfsOptions::default()).unwrap();
    ds.create("disk", SIZE, false).unwrap();
    let mut disk = ds.open_disk("disk", true).unwrap();
    // The first disk of a fresh datastore is contiguous from the first data block: pread and
    // pwrite on that region of the datastore file is VMKFS minus its own work.
    let region = ds.geometry().first_data_block() * ds.geometry().block_size;
    let ds_file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&ds_path)
        .unwrap();
    let run_region = || {
        workload(
            &mut |b, o| ds_file.write_all_at(b, region + o).unwrap(),
            &mut |b, o| ds_file.read_exact_at(b, region + o).unwrap(),
        )
    };
    // qcow2
    let q_path = dir.join("default.qcow2");
    let qp_path = dir.join("prealloc.qcow2");
    for (p, opt) in [
        (&q_path, "cluster_size=65536"),
        (&qp_path, "preallocation=metadata"),
    ] {
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", opt])
            .arg(p)
            .arg(SIZE.to_string())
            .status()
            .expect("qemu-img (Debian qemu-utils)");
        assert!(st.success());
    }

    let run_raw = || {
        workload(&mut |b, o| raw.write_all_at(b, o).unwrap(), &mut |b, o| {
            raw.read_exact_at(b, o).unwrap()
        })
    };
    // Untimed write passes.
    run_raw();
    {
        let d = std::cell::RefCell::new(&mut disk);
        workload(
            &mut |b, o| d.borrow_mut().write_at(b, o).unwrap(),
            &mut |b, o| d.borrow().read_at(b, o).unwrap(),
        );
    }
    for p in [&q_path, &qp_path] {
        qemu_rates(p, "qcow2");
    }
    qemu_rates(&raw_path, "raw");

    let names = [
        "raw file (pread/pwrite)",
        "VMKFS library, preallocated",
        "its region of the datastore file",
        "raw file via qemu-img bench",
        "qcow2 via qemu-img bench",
        "qcow2 prealloc=metadata (qemu-img)",
    ];
    let mut all: Vec<Vec<Rates>> = vec![Vec::new(); names.len()];
    for round in 0..rounds {
        // raw and VMKFS alternate which goes first.
        let mut run_vmkfs = || {
            let d = std::cell::RefCell::new(&mut disk);
            workload(
                &mut |b, o| d.borrow_mut().write_at(b, o).unwrap(),
                &mut |b, o| d.borrow().read_at(b, o).unwrap(),
            )
        };
        if round % 2 == 0 {
            all[0].push(run_raw());
            all[1].push(run_vmkfs());
            all[2].push(run_region());
        } else {
            all[2].push(run_region());
            all[1].push(run_vmkfs());
            all[0].push(run_raw());
        }
        all[3].push(qemu_rates(&raw_path, "raw"));
        all[4].push(qemu_rates(&q_path, "qcow2"));
        all[5].push(qemu_rates(&qp_path, "qcow2"));
    }
    let med = |v: &[Rates]| Rates {
        seq_write: median(v.iter().map(|r| r.seq_write).collect()),
        seq_read: median(v.iter().map(|r| r.seq_read).collect()),
        rand_write: median(v.iter().map(|r| r.rand_write).collect()),
        rand_read: median(v.iter().map(|r| r.rand_read).collect()),
    };
    let m: Vec<Rates> = all.iter().map(|v| med(v)).collect();
    println!(
        "512 MiB disk, page cache, one request at a time, medians of {rounds}\n\
         {:<36} {:>12} {:>12} {:>12} {:>12}",
        "", "seq write", "seq read", "4K rnd wr", "4K rnd rd"
    );
    println!(
        "{:<36} {:>12} {:>12} {:>12} {:>12}",
        "", "MiB/s", "MiB/s", "IOPS", "IOPS"
    );
    for (n, r) in names.iter().zip(&m) {
        println!(
            "{n:<36} {:>12.0} {:>12.0} {:>12.0} {:>12.0}",
            r.seq_write, r.seq_read, r.rand_write, r.rand_read
        );
    }
    let pct = |a: f64, b: f64| (a / b - 1.0) * 100.0;
    println!(
        "VMKFS vs raw: {:+.1}% {:+.1}% {:+.1}% {:+.1}%",
        pct(m[1].seq_write, m[0].seq_write),
        pct(m[1].seq_read, m[0].seq_read),
        pct(m[1].rand_write, m[0].rand_write),
        pct(m[1].rand_read, m[0].rand_read)
    );
    println!(
        "VMKFS vs its region of the datastore file: {:+.1}% {:+.1}% {:+.1}% {:+.1}%",
        pct(m[1].seq_write, m[2].seq_write),
        pct(m[1].seq_read, m[2].seq_read),
        pct(m[1].rand_write, m[2].rand_write),
        pct(m[1].rand_read, m[2].rand_read)
    );
    for (i, what) in [(4, "qcow2"), (5, "qcow2 prealloc=metadata")] {
        println!(
            "{what} vs raw (both via qemu-img bench): {:+.1}% {:+.1}% {:+.1}% {:+.1}%",
            pct(m[i].seq_write, m[3].seq_write),
            pct(m[i].seq_read, m[3].seq_read),
            pct(m[i].rand_write, m[3].rand_write),
            pct(m[i].rand_read, m[3].rand_read)
        );
    }
    drop(disk);

    // Snapshot time against disk size (thin disks on a sparse datastore).
    println!("\nsnapshot (start a redo log) of a thin disk, datastore with 1 MiB blocks:");
    let big_path = dir.join("big.img");
    std::fs::File::create(&big_path)
        .unwrap()
        .set_len(1100 << 30)
        .unwrap();
    let t = Instant::now();
    let dev = Arc::new(FileDev::open(&big_path, false).unwrap());
    let mut big = Datastore::mkfs(dev.clone(), &MkfsOptions::default()).unwrap();
    println!(
        "  mkfs of a 1100 GiB datastore: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    for gib in [1u64, 16, 256] {
        let name = format!("d{gib}");
        big.create(&name, gib << 30, true).unwrap();
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            big.snapshot(&name).unwrap();
            times.push(t.elapsed().as_secs_f64() * 1e3);
            big.revert(&name).unwrap();
        }
        println!(
            "  {gib:>4} GiB disk: {:.2} ms (median of 5; 3 fdatasyncs each)",
            median(times)
        );
        big.remove(&name).unwrap();
    }

    drop(big);
    let _ = std::fs::remove_file(&big_path);

    // A thin disk's first write to a block: one transaction (3 fdatasyncs) whatever the
    // datastore's size, as it only writes the pages it changed.
    println!("\nfirst write to a block of a thin disk (allocates it: one transaction):");
    for (ds_gib, disk_gib) in [(2u64, 1u64), (1100, 400)] {
        let p = dir.join("thin.img");
        std::fs::File::create(&p)
            .unwrap()
            .set_len(ds_gib << 30)
            .unwrap();
        let dev = Arc::new(FileDev::open(&p, false).unwrap());
        let mut tds = Datastore::mkfs(dev, &MkfsOptions::default()).unwrap();
        tds.create("t", disk_gib << 30, true).unwrap();
        let mut d = tds.open_disk("t", true).unwrap();
        let n = 200u64;
        let t = Instant::now();
        for i in 0..n {
            d.write_at(&[1u8; 4096], ((i * 7919) << 20) % (disk_gib << 30))
                .unwrap();
        }
        println!(
            "  {ds_gib:>5} GiB datastore, {disk_gib:>3} GiB disk: {:.2} ms per write",
            t.elapsed().as_secs_f64() * 1e3 / n as f64
        );
        drop(d);
        let _ = std::fs::remove_file(&p);
    }

    // Memory of the cached metadata per TiB of preallocated disk: a 16 GiB preallocated disk
    // (zeroed by FALLOC_FL_ZERO_RANGE: unwritten extents, no data written), scaled by 64.
    let mem_path = dir.join("mem.img");
    std::fs::File::create(&mem_path)
        .unwrap()
        .set_len(17 << 30)
        .unwrap();
    let dev = Arc::new(FileDev::open(&mem_path, false).unwrap());
    let mut mds = Datastore::mkfs(dev.clone(), &MkfsOptions::default()).unwrap();
    let empty = Datastore::open(dev.clone())
        .unwrap()
        .summary()
        .cached_metadata_bytes;
    let t = Instant::now();
    mds.create("d", 16 << 30, false).unwrap();
    let create_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(mds);
    let t = Instant::now();
    let loaded = Datastore::open(dev).unwrap();
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let full = loaded.summary().cached_metadata_bytes;
    drop(loaded);
    println!(
        "\nmetadata cached in memory: {:.2} MiB for an empty 17 GiB datastore, +{:.3} MiB for a \
         16 GiB preallocated disk (created in {create_ms:.0} ms, datastore loaded in \
         {open_ms:.1} ms): {:.2} MiB per TiB of disk with 1 MiB blocks",
        empty as f64 / 1048576.0,
        (full - empty) as f64 / 1048576.0,
        (full - empty) as f64 * 64.0 / 1048576.0
    );
    let _ = std::fs::remove_file(&mem_path);

    // VMKFS's own work per request, without the host file system: a disk on a datastore in
    // memory against the same reads and writes on the memory device directly.
    let mem = wv_vmkfs::MemDev::new(64 << 20);
    let mut mds = Datastore::mkfs(Arc::new(mem.clone()), &MkfsOptions::default()).unwrap();
    mds.create("m", 32 << 20, false).unwrap();
    let mut md = mds.open_disk("m", true).unwrap();
    let base = mds.geometry().first_data_block() * mds.geometry().block_size;
    let n = 2_000_000u64;
    let mut buf = vec![0u8; 4096];
    let per = |f: &mut dyn FnMut(u64)| {
        let t = Instant::now();
        for i in 0..n {
            f((i * STRIDE_PAGES * 4096) % (32 << 20));
        }
        t.elapsed().as_nanos() as f64 / n as f64
    };
    use wv_vmkfs::Dev;
    let direct_r = per(&mut |o| mem.read_at(&mut buf, base + o).unwrap());
    let vmkfs_r = per(&mut |o| md.read_at(&mut buf, o).unwrap());
    let direct_w = per(&mut |o| mem.write_at(&buf, base + o).unwrap());
    let vmkfs_w = per(&mut |o| md.write_at(&buf, o).unwrap());
    println!(
        "VMKFS's own work per 4 KiB request (memory device): read {:.0} ns vs {:.0} ns direct \
         (+{:.0} ns), write {:.0} ns vs {:.0} ns (+{:.0} ns)",
        vmkfs_r,
        direct_r,
        vmkfs_r - direct_r,
        vmkfs_w,
        direct_w,
        vmkfs_w - direct_w
    );
    let _ = std::fs::remove_dir_all(&dir);
}
