//! The virtual switch's frame path: a transmit queue in one guest's memory (the input) and a
//! receive queue in another's (the input from 0x400 on), both hostile; every chain is read
//! once, checked and switched between two ports, with and without mergeable buffers. Nothing
//! may panic, and what the receiving port counts must add up.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
use wv_vswitch::{Config, NetworkConfig, PortBackend, Switch};

type Mmap = vm_memory::GuestMemoryMmap;

const MEM: usize = 64 * 1024;

fn guest(
    data: &[u8],
) -> (
    GuestMemoryAtomic<Mmap>,
    VringRwLock<GuestMemoryAtomic<Mmap>>,
) {
    let mem = Mmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let n = data.len().min(MEM);
    mem.write_slice(&data[..n], GuestAddress(0)).unwrap();
    let atomic = GuestMemoryAtomic::new(mem);
    let v = VringRwLock::new(atomic.clone(), 16).unwrap();
    v.set_queue_size(16);
    v.set_queue_info(0, 0x100, 0x180).unwrap();
    v.set_queue_ready(true);
    v.set_enabled(true);
    (atomic, v)
}

fuzz_target!(|data: &[u8]| {
    let sw = Switch::new(&Config {
        socket_dir: "/nonexistent".into(),
        networks: vec![NetworkConfig {
            name: "n".into(),
            ports: vec!["a".into(), "b".into()],
            uplink: None,
        }],
    })
    .unwrap();
    let (rx_mem, rx) = guest(data.get(0x400..).unwrap_or(&[]));
    let mergeable = data.first().is_some_and(|b| b & 1 == 1);
    sw.attach(1, rx_mem, rx, mergeable);
    let (tx_mem, tx) = guest(data);
    sw.attach(0, tx_mem, guest(&[]).1, false);
    PortBackend::new(sw.clone(), 0)
        .expect("port 0 exists")
        .transmit(&tx);
    let st = sw.stats();
    let (a, b) = (&st[0], &st[1]);
    assert!(a.tx_frames + a.dropped_malformed <= 16 + 1);
    assert!(b.copies >= b.rx_frames);
    assert!(b.rx_bytes <= a.tx_bytes);
});
