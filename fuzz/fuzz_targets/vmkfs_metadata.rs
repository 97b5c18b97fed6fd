//! The VMKFS on-disk parsers: the input is laid over the metadata of a 1 MiB datastore (two
//! files, one with a redo log) at an offset the first two bytes choose, then the datastore is
//! opened, its files read, checked and repaired. Nothing may panic, and after a repair `check`
//! must find the datastore consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use wv_vmkfs::format::{self, Descriptor, Fd, JournalHeader, PAGE};
use wv_vmkfs::{Datastore, MemDev, MkfsOptions};

fn template() -> &'static (Vec<u8>, u64) {
    static T: OnceLock<(Vec<u8>, u64)> = OnceLock::new();
    T.get_or_init(|| {
        let mem = MemDev::new(1 << 20);
        let opts = MkfsOptions {
            block_size: 64 << 10,
            max_files: 4,
            label: "fuzz".into(),
        };
        let mut ds = Datastore::mkfs(Arc::new(mem.clone()), &opts).unwrap();
        ds.create("a", 256 << 10, false).unwrap();
        ds.create("b", 512 << 10, true).unwrap();
        let mut d = ds.open_disk("b", true).unwrap();
        d.write_at(&[7; 70_000], 1000).unwrap();
        drop(d);
        ds.snapshot("b").unwrap();
        let mut d = ds.open_disk("b", true).unwrap();
        d.write_at(&[9; 5000], 300_000).unwrap();
        drop(d);
        let meta = ds.geometry().first_data_block() * ds.geometry().block_size;
        (mem.bytes(), meta)
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() >= PAGE {
        let mut p = [0u8; PAGE];
        p.copy_from_slice(&data[..PAGE]);
        let _ = Descriptor::decode(&p, 1 << 40);
        let _ = Fd::decode(&p, 0);
        let _ = JournalHeader::decode(&p);
        let _ = format::decode_pointers(&p, 0, 0, "fuzz");
        let mut bits = vec![0u64; 1024];
        let _ = format::decode_map(&p, 0, 0, &mut bits);
    }
    let (base, meta) = template();
    let Some((at, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let at = (u64::from(u16::from_le_bytes(*at)) * 64) % meta;
    let mut img = base.clone();
    let end = (at as usize + rest.len()).min(*meta as usize);
    img[at as usize..end].copy_from_slice(&rest[..end - at as usize]);
    let dev: Arc<dyn wv_vmkfs::Dev> = Arc::new(MemDev::from_bytes(img));
    if let Ok(mut ds) = Datastore::open(dev.clone()) {
        for f in ds.list().unwrap_or_default() {
            if let Ok(d) = ds.open_disk(&f.name, false) {
                let mut buf = vec![0u8; 4096];
                let _ = d.read_at(&mut buf, 0);
                let _ = d.read_at(&mut buf, d.len().saturating_sub(4096));
            }
        }
    }
    if let Ok(r) = Datastore::check(dev.clone(), true) {
        if r.repaired {
            let after = Datastore::check(dev, false).expect("a repaired datastore loads");
            assert!(after.problems.is_empty(), "{r:?} then {after:?}");
        }
    }
});
