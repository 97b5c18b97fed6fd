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
