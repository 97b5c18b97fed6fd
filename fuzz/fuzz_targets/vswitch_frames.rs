//! The virtual switch's frame path: a transmit queue in one guest's memory (the input) and a
//! receive queue in another's (the input from 0x400 on), both hostile; every chain is read
//! once, checked and switched between two ports, with and without mergeable buffers. The
//! offloads each port's driver acked come from the input too (bytes 1 and 2: CSUM, HOST_TSO4/6
//! for the sender; GUEST_CSUM, GUEST_TSO4/6 for the receiver), so the vnet headers in the
//! transmit chains reach the checks (`wv_vswitch::offload::parse`) and every fallback: whole
//! with the header, checksum filled, segments cut (and held in slots when buffers run out).
//! The input is also switched once as a frame of bytes (as from an uplink TAP). Nothing may
//! panic, and what the receiving port counts must add up.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vhost_user_backend::VhostUserBackend;
use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};
use wv_vswitch::frame::{MAX_FRAME, VNET_HDR};
use wv_vswitch::offload::{self, MAX_HDRS};
use wv_vswitch::{Config, NetworkConfig, PortBackend, Source, Switch};

/// Feature bits from an input byte: bits 0-5 pick among the offloads.
fn features(b: u8) -> u64 {
    [
        offload::F_CSUM,
        offload::F_GUEST_CSUM,
        offload::F_HOST_TSO4,
        offload::F_HOST_TSO6,
        offload::F_GUEST_TSO4,
        offload::F_GUEST_TSO6,
    ]
    .iter()
    .enumerate()
    .filter(|(i, _)| b >> i & 1 == 1)
    .fold(0, |a, (_, f)| a | f)
}

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
    let (a, b) = (
        PortBackend::new(sw.clone(), 0).expect("port 0 exists"),
        PortBackend::new(sw.clone(), 1).expect("port 1 exists"),
    );
    // Acked before the queues are attached (attaching sets `mergeable`).
    a.acked_features(features(data.get(1).copied().unwrap_or(0)));
    b.acked_features(features(data.get(2).copied().unwrap_or(0)));
    sw.attach(1, rx_mem, rx, mergeable);
    let (tx_mem, tx) = guest(data);
    sw.attach(0, tx_mem, guest(&[]).1, false);
    a.transmit(&tx);
    // The input as one frame of bytes, vnet header first.
    if data.len() >= VNET_HDR + 14 {
        sw.forward(0, &Source::Bytes(&data[..data.len().min(MAX_FRAME)]));
    }
    let st = sw.stats();
    let (a, b) = (&st[0], &st[1]);
    assert!(a.tx_frames + a.dropped_malformed + a.dropped_bad_offload <= 16 + 1 + 1);
    assert!(a.tx_gso_frames <= a.tx_frames);
    assert!(b.copies >= b.rx_frames);
    assert!(b.segments <= b.rx_frames && b.rx_gso_frames <= b.rx_frames);
    // Cut segments repeat their headers; nothing else adds bytes.
    assert!(b.rx_bytes <= a.tx_bytes + b.segments * MAX_HDRS as u64);
});
