//! Helpers shared by the VMKFS tests.
#![allow(dead_code)]

use std::sync::Arc;
use wv_vmkfs::{Datastore, Dev, MemDev, MkfsOptions};

/// 64 KiB blocks, so small devices hold interesting layouts.
pub const BS: u64 = 64 << 10;

pub fn opts(files: u32) -> MkfsOptions {
    MkfsOptions {
        block_size: BS,
        max_files: files,
        label: "test".into(),
    }
}

pub fn mem(len: usize) -> Arc<dyn Dev> {
    Arc::new(MemDev::new(len))
}

pub fn fresh(len: usize, files: u32) -> Datastore {
    Datastore::mkfs(mem(len), &opts(files)).unwrap()
}

/// A byte pattern that differs by file, offset and generation.
pub fn pattern(seed: u64, off: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (off + i).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ seed.wrapping_mul(0xD6E8_FEB8_6659_FD93);
            (x >> 56) as u8
        })
        .collect()
}

pub fn write(ds: &Datastore, name: &str, off: u64, data: &[u8]) {
    let mut d = ds.open_disk(name, true).unwrap();
    d.write_at(data, off).unwrap();
    d.flush().unwrap();
}

pub fn read_all(ds: &Datastore, name: &str) -> Vec<u8> {
    let d = ds.open_disk(name, false).unwrap();
    let mut v = vec![0u8; usize::try_from(d.len()).unwrap()];
    d.read_at(&mut v, 0).unwrap();
    v
}

/// A small deterministic generator (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
