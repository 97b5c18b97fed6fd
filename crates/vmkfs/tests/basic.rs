//! Files, redo logs and persistence on a datastore in memory.

#![allow(clippy::cast_possible_truncation)] // tests: sizes are small

mod common;
use common::*;
use wv_vmkfs::{Datastore, Error};

#[test]
fn create_write_reopen_read() {
    let mut ds = fresh(32 << 20, 16);
    let free0 = ds.info().unwrap().free_blocks;
    ds.create("pre", 1 << 20, false).unwrap();
    ds.create("thin", 4 << 20, true).unwrap();
    assert_eq!(
        ds.info().unwrap().free_blocks,
        free0 - 16,
        "preallocated: 16 blocks of 64 KiB"
    );
    let data = pattern(1, 100, 200_000);
    write(&ds, "pre", 100, &data);
    write(&ds, "thin", 3 << 20, &data[..5000]);
    let mut ds = Datastore::open(ds.dev().clone()).unwrap();
    let pre = read_all(&ds, "pre");
    assert_eq!(&pre[100..200_100], &data[..]);
    assert!(pre[..100].iter().all(|&b| b == 0));
    let thin = read_all(&ds, "thin");
    assert_eq!(&thin[3 << 20..(3 << 20) + 5000], &data[..5000]);
    assert_eq!(ds.stat("thin").unwrap().allocated, BS);
    assert_eq!(ds.info().unwrap().free_blocks, free0 - 17);
    let r = Datastore::check(ds.dev().clone(), false).unwrap();
    assert!(r.problems.is_empty(), "{r:?}");
}

#[test]
fn snapshot_commit_revert() {
    let mut ds = fresh(32 << 20, 16);
    ds.create("d", 1 << 20, false).unwrap();
    let a = pattern(1, 0, 1 << 20);
    write(&ds, "d", 0, &a);
    let seq = ds.info().unwrap().transaction;
    ds.snapshot("d").unwrap();
    assert_eq!(ds.info().unwrap().transaction, seq + 1, "one transaction");
    let names: Vec<String> = ds.list().unwrap().into_iter().map(|f| f.name).collect();
    assert_eq!(names, ["d@1", "d"]);
    assert!(matches!(ds.open_disk("d@1", true), Err(Error::ReadOnly(_))));
    let b = pattern(2, 4096, 70_000);
    write(&ds, "d", 4096, &b);
    let mut want = a.clone();
    want[4096..4096 + 70_000].copy_from_slice(&b);
    assert_eq!(read_all(&ds, "d"), want);
    assert_eq!(read_all(&ds, "d@1"), a, "the base is untouched");
    assert_eq!(
        ds.stat("d").unwrap().allocated,
        2 * BS,
        "two blocks copied on write"
    );
    // Revert drops the redo log.
    ds.revert("d").unwrap();
    assert_eq!(read_all(&ds, "d"), a);
    // Snapshot twice, then commit both.
    ds.snapshot("d").unwrap();
    write(&ds, "d", 4096, &b);
    ds.snapshot("d").unwrap();
    let c = pattern(3, 900_000, 10_000);
    write(&ds, "d", 900_000, &c);
    want[900_000..910_000].copy_from_slice(&c);
    let names: Vec<String> = ds.list().unwrap().into_iter().map(|f| f.name).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    ds.commit_redo("d").unwrap();
    ds.commit_redo("d").unwrap();
    assert_eq!(read_all(&ds, "d"), want);
    assert_eq!(ds.list().unwrap().len(), 1);
    assert!(matches!(ds.commit_redo("d"), Err(Error::Invalid(_))));
    let r = Datastore::check(ds.dev().clone(), false).unwrap();
    assert!(r.problems.is_empty(), "{r:?}");
    assert_eq!(
        ds.info().unwrap().free_blocks,
        ds.info().unwrap().data_blocks - 16,
        "nothing leaked"
    );
}

/// Counts reads and writes that fall in the metadata area.
struct Counting {
    inner: wv_vmkfs::MemDev,
    meta_end: std::sync::atomic::AtomicU64,
    meta_io: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl wv_vmkfs::Dev for Counting {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.count(off);
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.count(off);
        self.inner.write_at(buf, off)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn reopen(&self) -> std::io::Result<std::sync::Arc<dyn wv_vmkfs::Dev>> {
        Ok(std::sync::Arc::new(Counting {
            inner: self.inner.clone(),
            meta_end: std::sync::atomic::AtomicU64::new(
                self.meta_end.load(std::sync::atomic::Ordering::Relaxed),
            ),
            meta_io: self.meta_io.clone(),
        }))
    }
}

impl Counting {
    fn count(&self, off: u64) {
        if off < self.meta_end.load(std::sync::atomic::Ordering::Relaxed) {
            self.meta_io
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[test]
fn a_preallocated_disk_touches_no_metadata_after_open() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let meta_io = std::sync::Arc::new(AtomicU64::new(0));
    let dev = std::sync::Arc::new(Counting {
        inner: wv_vmkfs::MemDev::new(16 << 20),
        meta_end: AtomicU64::new(0),
        meta_io: meta_io.clone(),
    });
    let mut ds = Datastore::mkfs(dev.clone(), &opts(8)).unwrap();
    ds.create("d", 4 << 20, false).unwrap();
    let meta_end = ds.geometry().first_data_block() * ds.geometry().block_size;
    dev.meta_end.store(meta_end, Ordering::Relaxed);
    let mut d = ds.open_disk("d", true).unwrap();
    let before = meta_io.load(Ordering::Relaxed);
    let mut rng = Rng(3);
    let mut buf = vec![0u8; 70_000];
    for _ in 0..500 {
        let off = rng.below((4 << 20) - 70_000);
        if rng.below(2) == 0 {
            d.write_at(&buf, off).unwrap();
        } else {
            d.read_at(&mut buf, off).unwrap();
        }
        if rng.below(10) == 0 {
            d.flush().unwrap();
        }
    }
    assert_eq!(
        meta_io.load(Ordering::Relaxed),
        before,
        "the data path touched metadata"
    );
    drop(d);
    assert!(
        meta_io.load(Ordering::Relaxed) > before,
        "closing clears the owner record"
    );
}

#[test]
fn snapshots_cost_the_same_whatever_the_size_and_thin_disks_overcommit() {
    use wv_vmkfs::dev::{Event, Recorder};
    let rec = Recorder::new(wv_vmkfs::MemDev::new(16 << 20));
    let mut ds = Datastore::mkfs(std::sync::Arc::new(rec.clone()), &opts(8)).unwrap();
    let data = ds.info().unwrap().data_blocks * BS;
    // A thin disk 64 times the datastore's data area: no blocks, no pointer blocks yet.
    ds.create("huge", 64 * data / 512 * 512, true).unwrap();
    ds.create("small", BS, true).unwrap();
    let written = |ds: &mut Datastore, name: &str| {
        let from = rec.position();
        ds.snapshot(name).unwrap();
        rec.events()[from..]
            .iter()
            .map(|e| match e {
                Event::Write(_, d) => d.len(),
                Event::Flush => 0,
            })
            .sum::<usize>()
    };
    let (huge, small) = (written(&mut ds, "huge"), written(&mut ds, "small"));
    assert_eq!(
        huge, small,
        "a snapshot writes the same metadata for any disk size"
    );
    // Writes far apart in the huge disk allocate as they go.
    write(&ds, "huge", 0, &[1; 10]);
    write(&ds, "huge", 40 * data, &[2; 10]);
    let d = read_all_range(&ds, "huge", 40 * data, 10);
    assert_eq!(d, [2; 10]);
    assert_eq!(ds.stat("huge").unwrap().allocated, 2 * BS);
    let r = Datastore::check(ds.dev().clone(), false).unwrap();
    assert!(r.problems.is_empty(), "{r:?}");
}

fn read_all_range(ds: &Datastore, name: &str, off: u64, len: usize) -> Vec<u8> {
    let d = ds.open_disk(name, false).unwrap();
    let mut v = vec![0u8; len];
    d.read_at(&mut v, off).unwrap();
    v
}

#[test]
fn a_file_larger_than_one_descriptor_uses_continuation_slots() {
    // With 64 KiB blocks one descriptor maps 448 x 1020 blocks (28 GiB): a 40 GiB thin disk
    // needs a continuation slot.
    let mut ds = fresh(16 << 20, 5);
    let one = 448 * 1020 * BS;
    let size = 40 << 30;
    ds.create("big", size, true).unwrap();
    ds.create("small", BS, false).unwrap();
    let names: Vec<String> = ds.list().unwrap().into_iter().map(|f| f.name).collect();
    assert_eq!(names, ["big", "small"], "the continuation is not a file");
    assert_eq!(ds.info().unwrap().files, 2);
    for off in [0, one - 10, one + 4096, size - 4096] {
        write(
            &ds,
            "big",
            off,
            &pattern(off, off, 4096.min((size - off) as usize)),
        );
    }
    let ds2 = Datastore::open(ds.dev().clone()).unwrap();
    for off in [0, one - 10, one + 4096, size - 4096] {
        let n = 4096.min((size - off) as usize);
        assert_eq!(
            read_all_range(&ds2, "big", off, n),
            pattern(off, off, n),
            "at {off}"
        );
    }
    let r = Datastore::check(ds.dev().clone(), false).unwrap();
    assert!(r.problems.is_empty(), "{r:?}");
    // Two slots are left: a second 40 GiB disk needs two and gets them; a third does not fit.
    ds.create("big2", size, true).unwrap();
    let e = ds.create("big3", BS, true).unwrap_err();
    assert!(e.to_string().contains("file slots"), "{e}");
    // rm gives every slot back.
    ds.remove("big").unwrap();
    ds.remove("big2").unwrap();
    for n in ["a", "b", "c", "d"] {
        ds.create(n, BS, true).unwrap();
    }
    let r = Datastore::check(ds.dev().clone(), false).unwrap();
    assert!(r.problems.is_empty(), "{r:?}");
}
