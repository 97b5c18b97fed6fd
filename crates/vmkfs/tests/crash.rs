//! Crash consistency: a scripted workload (create, write, snapshot, write, commit, resize,
//! rm, ...) runs on a device that records every write and flush. Then the device is rebuilt as
//! a crash would leave it after every prefix of that stream — whole writes, a torn last write
//! (only its first pages), and writes since the last flush partly lost — and each image must
//! open (replaying the journal), pass `check`, hold every acknowledged write, show each
//! metadata operation either not done or done (never half), and keep working.

#![allow(clippy::cast_possible_truncation)] // tests: sizes are small

mod common;
use common::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use wv_vmkfs::dev::{Event, Recorder};
use wv_vmkfs::{Datastore, Dev, MemDev};

type State = BTreeMap<String, Vec<u8>>;

/// Every file's contents (of a file over 1 MiB: its first MiB and its last 64 KiB).
fn state(ds: &mut Datastore) -> State {
    ds.list()
        .unwrap()
        .into_iter()
        .map(|f| {
            let d = ds.open_disk(&f.name, false).unwrap();
            let head = f.size.min(1 << 20) as usize;
            let mut v = vec![0u8; head];
            d.read_at(&mut v, 0).unwrap();
            if f.size > 1 << 20 {
                let mut tail = vec![0u8; 65536];
                d.read_at(&mut tail, f.size - 65536).unwrap();
                v.extend(tail);
            }
            (f.name.clone(), v)
        })
        .collect()
}

/// One step of the workload: whether it only writes data (a crash may then leave any mix of
/// old and new bytes, as on any disk), and the recorder's position once it was acknowledged.
struct Step {
    what: String,
    data_only: bool,
    end: usize,
    after: State,
}

fn workload(ds: &mut Datastore, rec: &Recorder) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut step = |ds: &mut Datastore, what: &str, acked: Option<usize>| {
        let data_only = acked.is_some();
        let end = acked.unwrap_or_else(|| rec.position());
        steps.push(Step {
            what: what.into(),
            data_only,
            end,
            after: state(ds),
        });
    };
    let wr = |ds: &mut Datastore, name: &str, off: u64, len: usize, seed: u64| -> usize {
        let mut d = ds.open_disk(name, true).unwrap();
        d.write_at(&pattern(seed, off, len), off).unwrap();
        d.flush().unwrap();
        let acked = rec.position();
        drop(d);
        acked
    };
    ds.create("a", 512 << 10, false).unwrap();
    step(ds, "create a (preallocated)", None);
    let acked = wr(ds, "a", 0, 200_000, 1);
    step(ds, "write a", Some(acked));
    ds.create("t", 1 << 20, true).unwrap();
    step(ds, "create t (thin)", None);
    let acked = wr(ds, "t", 300_000, 100_000, 2);
    step(ds, "write t (allocates)", Some(acked));
    ds.snapshot("a").unwrap();
    step(ds, "snapshot a", None);
    let acked = wr(ds, "a", 100_000, 150_000, 3);
    step(ds, "write a's redo log (copy on write)", Some(acked));
    ds.snapshot("a").unwrap();
    step(ds, "snapshot a again", None);
    let acked = wr(ds, "a", 400_000, 20_000, 4);
    step(ds, "write the second redo log", Some(acked));
    ds.commit_redo("a").unwrap();
    step(ds, "commit a", None);
    ds.resize("a", 768 << 10).unwrap();
    step(ds, "resize a", None);
    let acked = wr(ds, "a", 600_000, 150_000, 5);
    step(ds, "write a's new blocks", Some(acked));
    ds.commit_redo("a").unwrap();
    step(ds, "commit a into the base", None);
    ds.snapshot("t").unwrap();
    step(ds, "snapshot t", None);
    let acked = wr(ds, "t", 0, 70_000, 6);
    step(ds, "write t's redo log", Some(acked));
    ds.revert("t").unwrap();
    step(ds, "revert t", None);
    ds.remove("t").unwrap();
    step(ds, "rm t", None);
    // A disk larger than one descriptor maps (28 GiB with 64 KiB blocks): a continuation slot.
    ds.create("huge", 40 << 30, true).unwrap();
    step(ds, "create huge (thin, two descriptor slots)", None);
    let acked = wr(ds, "huge", (40 << 30) - 70_000, 70_000, 7);
    step(ds, "write the end of huge", Some(acked));
    ds.remove("huge").unwrap();
    step(ds, "rm huge", None);
    steps
}

/// How the writes since the last flush reach the disk.
#[derive(Clone, Copy, Debug)]
enum Loss {
    /// All of them, in order.
    None,
    /// The last one only partly: its first page.
    Torn,
    /// Every other one.
    Alternate,
    /// All but the one with this index.
    Drop(usize),
}

/// Rebuilds the device: `base` plus `events[..cut]`, with the writes since the last flush
/// lost as `loss` says.
fn image(base: &[u8], events: &[Event], cut: usize, loss: Loss) -> Vec<u8> {
    let torn = matches!(loss, Loss::Torn).then_some(1);
    let lossy = matches!(loss, Loss::Alternate);
    let mut img = base.to_vec();
    let last_flush = events[..cut]
        .iter()
        .rposition(|e| matches!(e, Event::Flush))
        .map_or(0, |i| i + 1);
    let mut unflushed = 0;
    for (i, e) in events[..cut].iter().enumerate() {
        let Event::Write(off, data) = e else { continue };
        let mut data = &data[..];
        if matches!(loss, Loss::Drop(d) if d == i) {
            continue;
        }
        if lossy && i >= last_flush {
            unflushed += 1;
            if unflushed % 2 == 0 {
                continue;
            }
        }
        if i + 1 == cut {
            if let Some(pages) = torn {
                data = &data[..(pages * 4096).min(data.len())];
            }
        }
        let o = *off as usize;
        img[o..o + data.len()].copy_from_slice(data);
    }
    img
}

fn matches(got: &State, want: &State, data_only: bool, before: &State) -> bool {
    if !data_only {
        return got == want;
    }
    // Every byte is the old or the new one.
    got.len() == want.len()
        && got.iter().all(|(name, g)| {
            let (Some(w), Some(b)) = (want.get(name), before.get(name)) else {
                return false;
            };
            g.len() == w.len()
                && g.len() == b.len()
                && (g == w || g == b || g.iter().zip(w).zip(b).all(|((x, y), z)| x == y || x == z))
        })
}

#[test]
fn every_cut_of_the_write_stream_recovers() {
    let mem = MemDev::new(3 << 20);
    let dev: Arc<dyn Dev> = Arc::new(mem.clone());
    Datastore::mkfs(dev, &opts(8)).unwrap();
    let base = mem.bytes();
    let rec = Recorder::new(mem.clone());
    let mut ds = Datastore::open(Arc::new(rec.clone())).unwrap();
    let initial = state(&mut ds);
    let steps = workload(&mut ds, &rec);
    let events = rec.events();
    let writes = events
        .iter()
        .filter(|e| matches!(e, Event::Write(..)))
        .count();
    eprintln!(
        "{} steps, {} events ({writes} writes)",
        steps.len(),
        events.len()
    );
    assert!(
        events.len() > 100,
        "the workload is big enough to be interesting"
    );
    let mut checked = 0;
    for cut in 0..=events.len() {
        let multi_page =
            matches!(&events[cut.saturating_sub(1)], Event::Write(_, d) if d.len() > 4096);
        let mut variants = vec![Loss::None, Loss::Alternate];
        if cut > 0 && multi_page {
            variants.push(Loss::Torn);
        }
        // Just before a flush: each write since the previous flush lost alone.
        if matches!(events.get(cut), Some(Event::Flush)) {
            let from = events[..cut]
                .iter()
                .rposition(|e| matches!(e, Event::Flush))
                .map_or(0, |i| i + 1);
            variants.extend((from..cut).map(Loss::Drop));
        }
        for loss in variants {
            let what = format!("cut {cut}/{} loss {loss:?}", events.len());
            let img = image(&base, &events, cut, loss);
            let dev: Arc<dyn Dev> = Arc::new(MemDev::from_bytes(img));
            let report = Datastore::check(dev.clone(), false)
                .unwrap_or_else(|e| panic!("{what}: check failed: {e}"));
            assert!(report.problems.is_empty(), "{what}: {report:?}");
            let mut ds = Datastore::open(dev.clone()).unwrap_or_else(|e| panic!("{what}: {e}"));
            let got = state(&mut ds);
            // Steps acknowledged before the cut must be there; the one in flight may be.
            let done = steps.iter().take_while(|s| s.end <= cut).count();
            let before = if done == 0 {
                &initial
            } else {
                &steps[done - 1].after
            };
            let ok = matches(&got, before, false, before)
                || steps
                    .get(done)
                    .is_some_and(|s| matches(&got, &s.after, s.data_only, before));
            assert!(
                ok,
                "{what}: after '{}' the state is neither that nor '{}' done: files {:?}",
                done.checked_sub(1).map_or("mkfs", |d| &steps[d].what),
                steps.get(done).map_or("-", |s| &s.what),
                got.keys().collect::<Vec<_>>()
            );
            // And the datastore keeps working.
            ds.create("z", 128 << 10, true).unwrap();
            write(&ds, "z", 1000, &pattern(9, 1000, 70_000));
            assert_eq!(
                &read_all(&ds, "z")[1000..71_000],
                &pattern(9, 1000, 70_000)[..]
            );
            let report = Datastore::check(dev, false).unwrap();
            assert!(
                report.problems.is_empty(),
                "{what}: after more work: {report:?}"
            );
            checked += 1;
        }
    }
    eprintln!("{checked} crash images recovered");
}
