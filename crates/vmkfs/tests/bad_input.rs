//! Bad input: damaged or foreign images, bad names and sizes, a full datastore. Each gets a
//! clear error, never a panic, and damages nothing else; `check --repair` brings a damaged
//! datastore back with every intact file intact.

#![allow(clippy::cast_possible_truncation)] // tests: sizes are small

mod common;
use common::*;
use std::sync::Arc;
use wv_vmkfs::format::{self, Descriptor, Geometry, PAGE};
use wv_vmkfs::{Datastore, Dev, Error, MemDev};

/// A datastore with files `a` (preallocated, written) and `b` (thin, written); returns its
/// bytes and the contents of both.
fn two_files() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let mem = MemDev::new(8 << 20);
    let mut ds = Datastore::mkfs(Arc::new(mem.clone()), &opts(8)).unwrap();
    ds.create("a", 300_000 / 512 * 512, false).unwrap();
    ds.create("b", 500_000 / 512 * 512, true).unwrap();
    write(&ds, "a", 10, &pattern(1, 10, 200_000));
    write(&ds, "b", 70_000, &pattern(2, 70_000, 100_000));
    // The last transaction (in the journal, which would restore its pages) is a's.
    write(&ds, "a", 0, &[9; 5]);
    let (a, b) = (read_all(&ds, "a"), read_all(&ds, "b"));
    (mem.bytes(), a, b)
}

fn geometry(img: &[u8]) -> Geometry {
    let mut p = [0u8; PAGE];
    p.copy_from_slice(&img[..PAGE]);
    Descriptor::decode(&p, img.len() as u64).unwrap().geo
}

fn dev(img: Vec<u8>) -> Arc<dyn Dev> {
    Arc::new(MemDev::from_bytes(img))
}

fn open_err(img: Vec<u8>) -> Error {
    match Datastore::open(dev(img)) {
        Ok(_) => panic!("a damaged datastore opened"),
        Err(e) => e,
    }
}

/// Repairs `img` and checks that `a` survived and the result is clean.
fn repair_keeps_a(img: Vec<u8>, a: &[u8]) -> Datastore {
    let d = dev(img);
    let r = Datastore::check(d.clone(), false).unwrap();
    assert!(!r.problems.is_empty(), "check must see the damage");
    let r = Datastore::check(d.clone(), true).unwrap();
    assert!(r.repaired, "{r:?}");
    let r = Datastore::check(d.clone(), false).unwrap();
    assert!(r.problems.is_empty(), "after the repair: {r:?}");
    let ds = Datastore::open(d).unwrap();
    assert_eq!(read_all(&ds, "a"), a, "the intact file is intact");
    ds
}

#[test]
fn foreign_and_truncated_images() {
    let e = open_err(vec![0; 4 << 20]);
    assert!(e.to_string().contains("not a VMKFS datastore"), "{e}");
    let e = open_err(pattern(5, 0, 4 << 20));
    assert!(e.to_string().contains("not a VMKFS datastore"), "{e}");
    let e = open_err(vec![0; 100]);
    assert!(e.to_string().contains("truncated"), "{e}");
    let (img, _, _) = two_files();
    let e = open_err(img[..img.len() - 65536].to_vec());
    assert!(e.to_string().contains("truncated"), "{e}");
    // A newer version.
    let mut img = img;
    img[16..20].copy_from_slice(&2u32.to_le_bytes());
    let mut p = [0u8; PAGE];
    p.copy_from_slice(&img[..PAGE]);
    format::seal(&mut p, format::MAGIC_DESCRIPTOR);
    img[..PAGE].copy_from_slice(&p);
    let e = open_err(img);
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    assert!(e.to_string().contains("version 2"), "{e}");
}

#[test]
fn damaged_descriptor() {
    // Right after mkfs there is no journal to restore it from: check --repair uses the copy.
    let mem = MemDev::new(4 << 20);
    Datastore::mkfs(Arc::new(mem.clone()), &opts(8)).unwrap();
    let mut img = mem.bytes();
    img[200] ^= 0xff;
    let e = open_err(img.clone());
    assert!(e.to_string().contains("descriptor is damaged"), "{e}");
    let d = dev(img);
    assert!(Datastore::check(d.clone(), true).unwrap().repaired);
    Datastore::open(d).unwrap();
    // After any transaction the journal holds the descriptor: an open restores it.
    let (mut img, a, _) = two_files();
    img[200] ^= 0xff;
    let ds = Datastore::open(dev(img)).unwrap();
    assert_eq!(read_all(&ds, "a"), a);
}

#[test]
fn damaged_file_descriptor() {
    let (mut img, a, _) = two_files();
    let g = geometry(&img);
    let at = (g.fd_page(1) as usize) * PAGE + 300; // b's slot
    img[at] ^= 0x40;
    let e = open_err(img.clone());
    assert!(
        matches!(&e, Error::Corrupt(m) if m.contains("file descriptor 1") && m.contains("--repair")),
        "{e}"
    );
    let mut ds = repair_keeps_a(img, &a);
    let names: Vec<String> = ds.list().unwrap().into_iter().map(|f| f.name).collect();
    assert_eq!(names, ["a"], "b's slot was freed");
    // Its blocks were returned: a new file can use them.
    ds.create("c", 1 << 20, false).unwrap();
}

#[test]
fn damaged_pointer_block() {
    let (mut img, a, b) = two_files();
    let g = geometry(&img);
    let ds = Datastore::open(dev(img.clone())).unwrap();
    drop(ds);
    // b's pointer block is the second one allocated (a took the first).
    let at = (g.ptr_page(1) as usize) * PAGE + 40;
    img[at] ^= 0x01;
    let e = open_err(img.clone());
    assert!(e.to_string().contains("pointer block"), "{e}");
    let mut ds = repair_keeps_a(img, &a);
    let bi = ds.stat("b").unwrap();
    assert_eq!(bi.allocated, 0, "b's pointers were lost");
    assert!(read_all(&ds, "b").iter().all(|&x| x == 0));
    assert_ne!(b, vec![0; b.len()]);
}

#[test]
fn damaged_allocation_map() {
    let (mut img, a, b) = two_files();
    let g = geometry(&img);
    let at = (g.dmap_start() as usize) * PAGE + 20;
    img[at] ^= 0xff;
    let e = open_err(img.clone());
    assert!(e.to_string().contains("map page"), "{e}");
    let ds = repair_keeps_a(img, &a);
    assert_eq!(read_all(&ds, "b"), b, "the map is rebuilt from the files");
}

#[test]
fn random_damage_never_panics_and_repair_cleans_up() {
    let (img, _, _) = two_files();
    let g = geometry(&img);
    let meta = g.first_data_block() * g.block_size;
    let mut rng = Rng(77);
    let (mut opened, mut repaired) = (0, 0);
    for _ in 0..300 {
        let mut img = img.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(meta) as usize;
            img[at] ^= 1 << rng.below(8);
        }
        let d = dev(img);
        if let Ok(ds) = Datastore::open(d.clone()) {
            opened += 1;
            for f in ["a", "b"] {
                if let Ok(disk) = ds.open_disk(f, false) {
                    let mut buf = vec![0u8; disk.len() as usize];
                    let _ = disk.read_at(&mut buf, 0);
                }
            }
        }
        if let Ok(r) = Datastore::check(d.clone(), true) {
            if r.repaired {
                repaired += 1;
            }
            let after = Datastore::check(d, false).unwrap();
            assert!(after.problems.is_empty(), "{r:?} then {after:?}");
        }
    }
    eprintln!("of 300 damaged images {opened} opened and {repaired} were repaired");
    assert!(repaired > 50, "most damage is repairable");
}

#[test]
fn bad_names_and_sizes() {
    let mut ds = fresh(4 << 20, 4);
    ds.create("ok", 65536, true).unwrap();
    let long = "x".repeat(128);
    let almost = "x".repeat(121);
    for (name, size, want) in [
        ("", 65536, "1 to 127 bytes"),
        (long.as_str(), 65536, "1 to 127 bytes"),
        (almost.as_str(), 65536, "snapshots add"),
        ("a/b", 65536, "no '/'"),
        ("a@1", 65536, "'@'"),
        ("tab\t", 65536, "control"),
        ("z", 0, "multiple of 512"),
        ("z", 1000, "multiple of 512"),
        ("z", 1 << 50, "largest file"),
        ("ok", 65536, "exists already"),
    ] {
        let e = ds.create(name, size, true).unwrap_err();
        assert!(e.to_string().contains(want), "{name:?} {size}: {e}");
    }
    let e = ds.resize("ok", 512).unwrap_err();
    assert!(e.to_string().contains("shrinking"), "{e}");
    for op in ["rm", "resize", "snapshot", "commit", "revert", "unlock"] {
        let e = match op {
            "rm" => ds.remove("nope").unwrap_err(),
            "resize" => ds.resize("nope", 65536).unwrap_err(),
            "snapshot" => ds.snapshot("nope").map(|_| ()).unwrap_err(),
            "commit" => ds.commit_redo("nope").map(|_| ()).unwrap_err(),
            "revert" => ds.revert("nope").map(|_| ()).unwrap_err(),
            _ => ds.unlock("nope").unwrap_err(),
        };
        assert!(matches!(e, Error::NotFound(_)), "{op}: {e}");
    }
    let mut d = ds.open_disk("ok", true).unwrap();
    let e = d.write_at(&[1; 10], 65530).unwrap_err();
    assert!(e.to_string().contains("beyond the end"), "{e}");
    let mut buf = [0u8; 10];
    assert!(d.read_at(&mut buf, u64::MAX - 3).is_err());
    drop(d);
    let r = Datastore::check(ds.dev().clone(), false).unwrap();
    assert!(r.problems.is_empty(), "{r:?}");
}

#[test]
fn full_datastore() {
    let mut ds = fresh(4 << 20, 3);
    let info = ds.info().unwrap();
    let e = ds
        .create("big", (info.free_blocks + 1) * BS, false)
        .unwrap_err();
    assert!(matches!(e, Error::NoSpace(_)), "{e}");
    assert_eq!(
        ds.info().unwrap().free_blocks,
        info.free_blocks,
        "nothing allocated"
    );
    ds.create("one", BS, false).unwrap();
    ds.create("two", BS, false).unwrap();
    ds.create("three", BS, true).unwrap();
    let e = ds.create("four", BS, true).unwrap_err();
    assert!(e.to_string().contains("file slots"), "{e}");
    // No slot for a redo log either, and nothing changes.
    let e = ds.snapshot("one").unwrap_err();
    assert!(matches!(e, Error::NoSpace(_)), "{e}");
    let names: Vec<String> = ds.list().unwrap().into_iter().map(|f| f.name).collect();
    assert_eq!(names, ["one", "two", "three"]);
    // A thin file that cannot grow: the write fails whole.
    ds.remove("two").unwrap();
    let free = ds.info().unwrap().free_blocks;
    ds.create("fill", (free - 1) * BS, false).unwrap();
    let mut d = ds.open_disk("three", true).unwrap();
    d.write_at(&[7; 10], 0).unwrap();
    drop(d);
    ds.resize("three", 3 * BS).unwrap();
    let mut d = ds.open_disk("three", true).unwrap();
    let e = d.write_at(&pattern(3, 0, 3 * BS as usize), 0).unwrap_err();
    assert!(matches!(e, Error::NoSpace(_)), "{e}");
    drop(d);
    let three = read_all(&ds, "three");
    assert_eq!(&three[..10], &[7; 10]);
    assert!(
        three[10..].iter().all(|&x| x == 0),
        "nothing of the failed write landed"
    );
    let r = Datastore::check(ds.dev().clone(), false).unwrap();
    assert!(r.problems.is_empty(), "{r:?}");
}

#[test]
fn damaged_continuation_slot() {
    let mem = MemDev::new(8 << 20);
    let mut ds = Datastore::mkfs(Arc::new(mem.clone()), &opts(8)).unwrap();
    ds.create("a", 300_000 / 512 * 512, false).unwrap();
    ds.create("big", 40 << 30, true).unwrap(); // slot 1, continuation in slot 2
    write(&ds, "big", (40 << 30) - 4096, &pattern(4, 0, 4096));
    write(&ds, "a", 10, &pattern(1, 10, 200_000));
    let a = read_all(&ds, "a");
    let mut img = mem.bytes();
    let g = geometry(&img);
    img[(g.fd_page(2) as usize) * PAGE + 600] ^= 0x10;
    let e = open_err(img.clone());
    assert!(e.to_string().contains("file descriptor 2"), "{e}");
    let mut ds = repair_keeps_a(img, &a);
    let names: Vec<String> = ds.list().unwrap().into_iter().map(|f| f.name).collect();
    assert_eq!(
        names,
        ["a"],
        "the file whose pointers were damaged is lost, whole"
    );
}
