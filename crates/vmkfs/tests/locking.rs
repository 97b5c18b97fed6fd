//! Exclusive opens on a datastore in a real file, each handle with its own open file
//! description (as separate processes would have): one writer or many readers per file; no
//! file operation on a file anyone has open; frozen parents open read-only. (A crashed
//! owner's stale lock is tested end to end with a killed VMM in crates/wv/tests/fs.rs.)

mod common;
use common::*;
use std::sync::Arc;
use wv_vmkfs::{Datastore, Error, FileDev};

fn datastore(name: &str) -> (std::path::PathBuf, Datastore) {
    let path = std::env::temp_dir().join(format!("vmkfs-lock-{name}-{}", std::process::id()));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(8 << 20).unwrap();
    let dev = Arc::new(FileDev::open(&path, false).unwrap());
    let mut ds = Datastore::mkfs(dev, &opts(8)).unwrap();
    ds.create("d", 1 << 20, false).unwrap();
    (path, ds)
}

#[test]
fn one_writer_or_many_readers() {
    let (path, mut ds) = datastore("rw");
    let w = ds.open_disk("d", true).unwrap();
    let pid = std::process::id().to_string();
    for writable in [true, false] {
        let e = ds.open_disk("d", writable).map(|_| ()).unwrap_err();
        assert!(matches!(e, Error::InUse(_)), "{e}");
        assert!(e.to_string().contains(&pid), "the holder is named: {e}");
    }
    let owner = ds.stat("d").unwrap().owner.unwrap();
    assert!(owner.contains(&format!("pid {pid}")), "{owner}");
    let e = ds.unlock("d").unwrap_err();
    assert!(
        matches!(e, Error::InUse(_)),
        "a live owner's lock is not broken: {e}"
    );
    drop(w);
    assert_eq!(
        ds.stat("d").unwrap().owner,
        None,
        "a clean close clears the record"
    );
    let r1 = ds.open_disk("d", false).unwrap();
    let r2 = ds.open_disk("d", false).unwrap();
    let e = ds.open_disk("d", true).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("for reading"), "{e}");
    // Nothing happens to a file that is open.
    for e in [
        ds.remove("d").unwrap_err(),
        ds.resize("d", 2 << 20).map(|_| ()).unwrap_err(),
        ds.snapshot("d").map(|_| ()).unwrap_err(),
    ] {
        assert!(matches!(e, Error::InUse(_)), "{e}");
    }
    drop((r1, r2));
    let _ = std::fs::remove_file(path);
}

#[test]
fn redo_log_chains() {
    let (path, mut ds) = datastore("chain");
    ds.snapshot("d").unwrap();
    let e = ds.open_disk("d@1", true).map(|_| ()).unwrap_err();
    assert!(matches!(e, Error::ReadOnly(_)), "{e}");
    let e = ds.remove("d@1").unwrap_err();
    assert!(matches!(e, Error::ReadOnly(_)), "{e}");
    let w = ds.open_disk("d", true).unwrap();
    // The frozen parent can be read alongside the writer of its redo log.
    let base = ds.open_disk("d@1", false).unwrap();
    for e in [
        ds.commit_redo("d").map(|_| ()).unwrap_err(),
        ds.revert("d").map(|_| ()).unwrap_err(),
    ] {
        assert!(matches!(e, Error::InUse(_)), "{e}");
    }
    drop(w);
    // A reader of the parent blocks a commit, which would change the parent.
    let e = ds.commit_redo("d").map(|_| ()).unwrap_err();
    assert!(matches!(e, Error::InUse(_)), "{e}");
    drop(base);
    ds.commit_redo("d").unwrap();
    let _ = std::fs::remove_file(path);
}

/// A live migration's hand-over: the writer replaces its record by one naming the target with
/// a token and lets go; nobody but a taker with that token gets the file, and the record never
/// names nobody.
#[test]
fn a_writer_hands_a_disk_over_to_the_holder_of_its_token() {
    let (path, mut ds) = datastore("handover");
    let mut w = ds.open_disk("d", true).unwrap();
    w.write_at(&[7u8; 512], 4096).unwrap();
    // The target prepares while the writer still holds the file; taking it is refused then.
    let early = ds.prepare_take_over("d").unwrap();
    assert_eq!(early.len(), 1 << 20);
    let e = early
        .take(42, std::time::Duration::ZERO)
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(e, Error::InUse(_)), "{e}");
    assert!(ds.stat("d").unwrap().owner.unwrap().contains("since"));
    let pending = ds.prepare_take_over("d").unwrap();
    w.hand_over("target-host", 4242, 42).unwrap();
    drop(w);
    // Between the hand-over and the take: a record naming the target, refused to anyone else.
    let owner = ds.stat("d").unwrap().owner.unwrap();
    assert!(
        owner.contains("pid 4242 on target-host") && owner.contains("not taken yet"),
        "{owner}"
    );
    let e = ds.open_disk("d", true).map(|_| ()).unwrap_err();
    assert!(matches!(e, Error::StaleLock(_)), "{e}");
    assert!(e.to_string().contains("handed over"), "{e}");
    let e = ds
        .prepare_take_over("d")
        .unwrap()
        .take(41, std::time::Duration::ZERO)
        .map(|_| ())
        .unwrap_err();
    assert!(e.to_string().contains("another token"), "{e}");
    let mut t = pending.take(42, std::time::Duration::from_secs(1)).unwrap();
    let owner = ds.stat("d").unwrap().owner.unwrap();
    assert!(
        owner.contains(&format!("pid {}", std::process::id())) && !owner.contains("not taken"),
        "the taker's own record: {owner}"
    );
    let mut b = [0u8; 512];
    t.read_at(&mut b, 4096).unwrap();
    assert_eq!(b, [7u8; 512], "the writer's data is there");
    t.write_at(&[9u8; 512], 0).unwrap();
    // The new writer holds it as any writer does; a second take finds its record.
    let e = ds.open_disk("d", true).map(|_| ()).unwrap_err();
    assert!(matches!(e, Error::InUse(_)), "{e}");
    drop(t);
    assert_eq!(ds.stat("d").unwrap().owner, None);
    // A hand-over whose target never takes it: a stale record that `unlock` breaks.
    let mut w = ds.open_disk("d", true).unwrap();
    w.hand_over("gone", 1, 7).unwrap();
    // Nothing held once handed over, even before the handle goes.
    assert!(ds
        .open_disk("d", true)
        .map(|_| ())
        .unwrap_err()
        .to_string()
        .contains("handed over"));
    drop(w);
    let r = Datastore::check(Arc::new(FileDev::open(&path, true).unwrap()), false).unwrap();
    assert!(
        r.notes.iter().any(|n| n.contains("stale hand-over record")),
        "{:?}",
        r.notes
    );
    ds.unlock("d").unwrap();
    drop(ds.open_disk("d", true).unwrap());
    let _ = std::fs::remove_file(path);
}
