//! Branches (several redo logs on one frozen file) and the writer's own freeze of an open
//! disk: what snapshot, restore and clones of a VM with a VMKFS disk rest on. On a datastore
//! in a real file, so that host locks apply (each handle has its own open file description,
//! as separate processes would).

mod common;
use common::*;
use std::sync::Arc;
use wv_vmkfs::{Datastore, Error, FileDev};

fn datastore(name: &str) -> (std::path::PathBuf, Datastore) {
    let path = std::env::temp_dir().join(format!("vmkfs-branch-{name}-{}", std::process::id()));
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(16 << 20).unwrap();
    let dev = Arc::new(FileDev::open(&path, false).unwrap());
    let mut ds = Datastore::mkfs(dev, &opts(16)).unwrap();
    ds.create("d", 1 << 20, false).unwrap();
    (path, ds)
}

fn check_ok(ds: &Datastore) {
    let r = Datastore::check(ds.dev().clone(), false).unwrap();
    assert!(r.problems.is_empty(), "{r:?}");
}

#[test]
fn branches_read_the_frozen_file_and_diverge() {
    let (path, mut ds) = datastore("diverge");
    let a = pattern(1, 0, 1 << 20);
    write(&ds, "d", 0, &a);
    ds.snapshot("d").unwrap();
    let seq = ds.info().unwrap().transaction;
    let b1 = ds.branch("d@1", None).unwrap();
    assert_eq!(ds.info().unwrap().transaction, seq + 1, "one transaction");
    assert_eq!(b1.name, "d@1+r1");
    assert_eq!(b1.kind, "redo-log");
    assert_eq!(b1.parent.as_deref(), Some("d@1"));
    assert_eq!(b1.allocated, 0, "constant time: nothing copied");
    let b2 = ds.branch("d@1", Some("clone")).unwrap();
    assert_eq!(b2.name, "clone");
    assert_eq!(ds.branch("d@1", None).unwrap().name, "d@1+r2");
    // Every branch reads the frozen contents, then its own writes only.
    for n in ["d", "d@1+r1", "clone", "d@1+r2"] {
        assert_eq!(read_all(&ds, n), a, "{n} reads the frozen file");
    }
    let (x, y) = (pattern(2, 100, 5000), pattern(3, 200, 70_000));
    write(&ds, "d@1+r1", 100, &x);
    write(&ds, "clone", 200, &y);
    let mut wx = a.clone();
    wx[100..5100].copy_from_slice(&x);
    let mut wy = a.clone();
    wy[200..70_200].copy_from_slice(&y);
    assert_eq!(read_all(&ds, "d@1+r1"), wx);
    assert_eq!(read_all(&ds, "clone"), wy);
    assert_eq!(read_all(&ds, "d"), a);
    assert_eq!(read_all(&ds, "d@1"), a, "the frozen file is untouched");
    check_ok(&ds);
    // Three writers at once, one per branch, each exclusive on its own.
    let w1 = ds.open_disk("d", true).unwrap();
    let w2 = ds.open_disk("d@1+r1", true).unwrap();
    let w3 = ds.open_disk("clone", true).unwrap();
    let e = ds.open_disk("clone", true).map(|_| ()).unwrap_err();
    assert!(matches!(e, Error::InUse(_)), "{e}");
    // A branch opened by someone else does not stop work on another branch.
    drop(w3);
    ds.remove("d@1+r2").unwrap();
    assert!(
        ds.stat("d@1").is_ok(),
        "a frozen file with other branches stays"
    );
    drop((w1, w2));
    std::fs::remove_file(path).unwrap();
}

#[test]
fn commit_revert_rm_with_several_branches() {
    let (path, mut ds) = datastore("ops");
    let a = pattern(1, 0, 1 << 20);
    write(&ds, "d", 0, &a);
    ds.snapshot("d").unwrap();
    ds.branch("d@1", Some("b")).unwrap();
    write(&ds, "b", 0, &pattern(2, 0, 4096));
    // Commit would change what the other branch reads.
    let e = ds.commit_redo("d").unwrap_err();
    assert!(e.to_string().contains("other redo logs"), "{e}");
    // Revert with a sibling: only the redo log goes, the frozen file stays.
    let r = ds.revert("b").unwrap();
    assert_eq!(r.name, "d@1");
    assert!(r.frozen);
    assert!(ds.stat("b").is_err());
    check_ok(&ds);
    // Now the only child: commit works as before, the parent takes the name back.
    write(&ds, "d", 0, &pattern(3, 0, 4096));
    let c = ds.commit_redo("d").unwrap();
    assert_eq!((c.name.as_str(), c.frozen), ("d", false));
    check_ok(&ds);
    // rm of a branch keeps the shared frozen file; rm of the last one takes it along.
    ds.snapshot("d").unwrap();
    ds.branch("d@1", Some("b")).unwrap();
    ds.remove("b").unwrap();
    assert!(ds.stat("d@1").unwrap().frozen);
    assert_eq!(read_all(&ds, "d@1").len(), 1 << 20);
    check_ok(&ds);
    ds.remove("d").unwrap();
    assert!(ds.list().unwrap().is_empty(), "{:?}", ds.list().unwrap());
    check_ok(&ds);
    // Bad branches.
    ds.create("e", 1 << 20, false).unwrap();
    assert!(matches!(ds.branch("e", None), Err(Error::Invalid(_))));
    assert!(matches!(ds.branch("nope", None), Err(Error::NotFound(_))));
    ds.snapshot("e").unwrap();
    assert!(matches!(ds.branch("e@1", Some("e")), Err(Error::Exists(_))));
    assert!(matches!(
        ds.branch("e@1", Some("x@2")),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(ds.branch("e@1", Some("")), Err(Error::Invalid(_))));
    check_ok(&ds);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn a_writer_freezes_its_open_disk_and_branches_open_owned() {
    let (path, mut ds) = datastore("freeze");
    let mut w = ds.open_disk("d", true).unwrap();
    let a = pattern(1, 0, 1 << 20);
    w.write_at(&a, 0).unwrap();
    // Refused by anyone else while it is open.
    assert!(matches!(ds.snapshot("d"), Err(Error::InUse(_))));
    let seq = ds.info().unwrap().transaction;
    let frozen = w.freeze().unwrap();
    assert_eq!(frozen, "d@1");
    assert_eq!(ds.info().unwrap().transaction, seq + 1, "one transaction");
    assert_eq!(w.name(), "d");
    let pid = std::process::id().to_string();
    let st = ds.stat("d").unwrap();
    assert_eq!(st.kind, "redo-log");
    assert!(st.owner.unwrap().contains(&pid), "the owner record moved");
    let fz = ds.stat("d@1").unwrap();
    assert!(fz.frozen && fz.owner.is_none());
    // The handle writes into the redo log now; the frozen file keeps the old contents and
    // can be read by others while the writer runs.
    let b = pattern(2, 300, 9000);
    w.write_at(&b, 300).unwrap();
    w.flush().unwrap();
    assert_eq!(read_all(&ds, "d@1"), a);
    let mut both = a.clone();
    both[300..9300].copy_from_slice(&b);
    let mut back = vec![0u8; 1 << 20];
    w.read_at(&mut back, 0).unwrap();
    assert_eq!(back, both);
    // Still exclusive under its name, and the frozen file cannot be written.
    assert!(matches!(ds.open_disk("d", false), Err(Error::InUse(_))));
    assert!(matches!(ds.open_disk("d@1", true), Err(Error::ReadOnly(_))));
    check_ok(&ds);
    // A branch opened for writing: created with its owner, exclusive, sees the frozen file.
    let mut r = ds.open_branch("d@1", None).unwrap();
    assert_eq!(r.name(), "d@1+r1");
    assert!(r.writable());
    assert!(ds.stat("d@1+r1").unwrap().owner.unwrap().contains(&pid));
    assert!(matches!(
        ds.open_disk("d@1+r1", false),
        Err(Error::InUse(_))
    ));
    let mut got = vec![0u8; 1 << 20];
    r.read_at(&mut got, 0).unwrap();
    assert_eq!(got, a, "the branch reads the frozen instant");
    r.write_at(&pattern(4, 0, 512), 0).unwrap();
    w.read_at(&mut back, 0).unwrap();
    assert_eq!(back, both, "the source is untouched by the branch");
    check_ok(&ds);
    // The writer freezes again while a branch reads the first frozen file.
    assert_eq!(w.freeze().unwrap(), "d@2");
    assert_eq!(ds.stat("d@2").unwrap().parent.as_deref(), Some("d@1"));
    check_ok(&ds);
    drop(r);
    drop(w);
    assert!(
        ds.stat("d").unwrap().owner.is_none(),
        "a clean close clears it"
    );
    assert!(ds.stat("d@1+r1").unwrap().owner.is_none());
    // A read-only handle cannot freeze.
    let mut ro = ds.open_disk("d", false).unwrap();
    assert!(matches!(ro.freeze(), Err(Error::ReadOnly(_))));
    drop(ro);
    check_ok(&ds);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn unfreeze_undoes_a_freeze_nothing_wrote_after() {
    let (path, mut ds) = datastore("unfreeze");
    let mut w = ds.open_disk("d", true).unwrap();
    let a = pattern(1, 0, 1 << 20);
    w.write_at(&a, 0).unwrap();
    let before = ds.list().unwrap();
    w.freeze().unwrap();
    w.unfreeze().unwrap();
    let after = ds.list().unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(
        (after[0].name.as_str(), &after[0].kind, after[0].frozen),
        ("d", &before[0].kind, false)
    );
    assert!(after[0].owner.is_some(), "still owned by the writer");
    assert!(matches!(ds.open_disk("d", false), Err(Error::InUse(_))));
    w.write_at(&pattern(2, 0, 4096), 0).unwrap();
    check_ok(&ds);
    // Not once the redo log was written, nor with a branch reading the frozen file.
    w.freeze().unwrap();
    w.write_at(&pattern(3, 0, 4096), 0).unwrap();
    assert!(w.unfreeze().is_err());
    w.freeze().unwrap();
    let r = ds.open_branch("d@2", None).unwrap();
    assert!(w.unfreeze().is_err());
    drop(r);
    check_ok(&ds);
    drop(w);
    check_ok(&ds);
    std::fs::remove_file(path).unwrap();
}
