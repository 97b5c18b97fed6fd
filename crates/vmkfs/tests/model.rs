//! Model-based test: random sequences of operations on a datastore, each checked against an
//! in-memory model of what every file must contain; after every operation the listing, the
//! contents and `check` must agree with the model. Failed operations (no space, bad names,
//! wrong state) must leave everything as it was.

#![allow(clippy::cast_possible_truncation)] // tests: sizes are small

mod common;
use common::*;
use std::collections::BTreeMap;
use wv_vmkfs::{Datastore, Error};

#[derive(Clone, Debug, PartialEq)]
struct File {
    data: Vec<u8>,
    /// Contents of the frozen parents, newest last.
    bases: Vec<Vec<u8>>,
}

type Model = BTreeMap<String, File>;

fn verify(ds: &mut Datastore, model: &Model, step: &str) {
    let list = ds.list().unwrap();
    let top: Vec<&str> = list
        .iter()
        .filter(|f| !f.frozen)
        .map(|f| f.name.as_str())
        .collect();
    let want: Vec<&str> = model.keys().map(String::as_str).collect();
    let mut top_sorted = top.clone();
    top_sorted.sort_unstable();
    assert_eq!(top_sorted, want, "{step}: files");
    let frozen = list.iter().filter(|f| f.frozen).count();
    assert_eq!(
        frozen,
        model.values().map(|f| f.bases.len()).sum::<usize>(),
        "{step}: frozen parents"
    );
    for (name, f) in model {
        let got = read_all(ds, name);
        assert_eq!(got.len(), f.data.len(), "{step}: length of {name}");
        if got == f.data {
            continue;
        }
        if let Some(i) = (0..got.len()).find(|&i| got[i] != f.data[i]) {
            panic!(
                "{step}: {name} differs first at byte {i} (block {}): {} instead of {}",
                i as u64 / BS,
                got[i],
                f.data[i]
            );
        }
    }
    let r = Datastore::check(ds.dev().clone(), false).unwrap();
    assert!(r.problems.is_empty(), "{step}: {r:?}");
}

fn run(seed: u64, steps: usize, done: &mut BTreeMap<String, usize>) {
    let mut rng = Rng(seed);
    let mut ds = fresh(2 << 20, 12);
    let mut model = Model::new();
    let names = ["a", "b", "c", "d", "e"];
    for step in 0..steps {
        let name = names[rng.below(names.len() as u64) as usize];
        let exists = model.contains_key(name);
        let size = (1 + rng.below(40)) * 32768;
        let op = rng.below(10);
        let what = format!("seed {seed} step {step}: op {op} on {name}");
        let before = model.clone();
        let r: Result<(), Error> = match op {
            0 | 1 => {
                let r = ds.create(name, size, rng.below(2) == 0).map(|_| ());
                if r.is_ok() {
                    assert!(!exists, "{what}: created a duplicate");
                    model.insert(
                        name.into(),
                        File {
                            data: vec![0; size as usize],
                            bases: vec![],
                        },
                    );
                }
                r
            }
            2..=4 if exists => {
                let len = model[name].data.len() as u64;
                let off = rng.below(len);
                let n = (1 + rng.below(150_000)).min(len - off) as usize;
                let data = pattern(seed ^ step as u64, off, n);
                let r = ds.open_disk(name, true).and_then(|mut d| {
                    d.write_at(&data, off)?;
                    d.flush()
                });
                if r.is_ok() {
                    model.get_mut(name).unwrap().data[off as usize..off as usize + n]
                        .copy_from_slice(&data);
                }
                r
            }
            5 if exists => {
                let f = model.get_mut(name).unwrap();
                let new = f.data.len() as u64 + rng.below(4) * 32768 + 512;
                let r = ds.resize(name, new).map(|_| ());
                if r.is_ok() {
                    f.data.resize(new as usize, 0);
                }
                r
            }
            6 if exists => {
                let r = ds.snapshot(name).map(|_| ());
                if r.is_ok() {
                    let f = model.get_mut(name).unwrap();
                    f.bases.push(f.data.clone());
                }
                r
            }
            7 if exists => {
                let r = ds.commit_redo(name).map(|_| ());
                if r.is_ok() {
                    model.get_mut(name).unwrap().bases.pop().unwrap();
                }
                r
            }
            8 if exists => {
                let r = ds.revert(name).map(|_| ());
                if r.is_ok() {
                    let f = model.get_mut(name).unwrap();
                    let base = f.bases.pop().unwrap();
                    // A redo log may have grown past its parent; the parent keeps its size.
                    f.data = base;
                }
                r
            }
            9 if exists => {
                let r = ds.remove(name);
                if r.is_ok() {
                    model.remove(name);
                }
                r
            }
            _ => {
                ds = Datastore::open(ds.dev().clone()).unwrap();
                Ok(())
            }
        };
        if std::env::var_os("MODEL_TRACE").is_some() {
            eprintln!(
                "{what}: {:?} sizes {:?}",
                r.as_ref().err().map(ToString::to_string),
                model
                    .iter()
                    .map(|(k, f)| (k.clone(), f.data.len(), f.bases.len()))
                    .collect::<Vec<_>>()
            );
        }
        let outcome = match &r {
            Ok(()) => format!("op {op} ok"),
            Err(Error::NoSpace(_)) => "no space".into(),
            Err(_) => "refused".into(),
        };
        *done.entry(outcome).or_default() += 1;
        if let Err(e) = &r {
            let expected = match e {
                Error::NoSpace(_) => true,
                Error::Invalid(m) => m.contains("not a redo log"),
                Error::Exists(_) => exists,
                _ => false,
            };
            assert!(expected, "{what}: unexpected error {e}");
            assert_eq!(model, before, "{what}");
        }
        verify(&mut ds, &model, &what);
    }
}

#[test]
fn random_operation_sequences_match_the_model() {
    let mut done = BTreeMap::new();
    for seed in 1..=12u64 {
        run(seed * 0x1234_5678_9abc, 60, &mut done);
    }
    eprintln!("{done:?}");
    // Every kind of operation succeeded many times, and the datastore filled up sometimes.
    for op in 0..=9 {
        let n = done.get(&format!("op {op} ok")).copied().unwrap_or(0);
        assert!(n >= 5, "op {op} succeeded {n} times: {done:?}");
    }
    assert!(done.get("no space").copied().unwrap_or(0) > 0, "{done:?}");
}
