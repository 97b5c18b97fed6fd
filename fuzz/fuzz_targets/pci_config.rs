//! PCI configuration space and BAR relocation (`wv_pci`: the bus's configuration mechanism #1
//! ports and its ECAM window, `ConfigSpace`'s write masks, `MsixTable`; `wv_virtio`'s
//! `VirtioPci` configuration side: the pci_cfg access window, MSI-X control, BAR moves) on a
//! bus with the host bridge, a virtio-rng and a virtio-blk device, wired as the VMM wires them:
//! each BAR on an `MmioBus` with the ECAM window, moved by `MmioBus::relocate_within` inside
//! the PCI MMIO window (what the VMM's mover calls). The input is a list of accesses of every
//! width (1, 2, 3, 4, 8 bytes) at any register, through the ports, ECAM or the BARs (MSI-X
//! table and PBA included). After each: no panic, the bus's ranges never overlap, every BAR
//! lies in the PCI MMIO window (so never on RAM, ECAM or the interrupt controllers), and
//! ECAM stays where it was.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, Mutex};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;
use wv_devices::{MmioBus, PioDevice};
use wv_machine::layout::{ECAM_BASE, ECAM_SIZE, MMIO_HOLE_START, PCI_MMIO_END};
use wv_pci::{BarAllocator, Ecam, MsiRouter, MsixMessage, PciBus};
use wv_virtio::block::{Block, MemDisk};
use wv_virtio::rng::Rng;
use wv_virtio::transport::{Wiring, BAR_SIZE};
use wv_virtio::{GuestMemoryMmap, VirtioDevice, VirtioPci};

struct NoRoutes;
impl MsiRouter for NoRoutes {
    fn set_routes(&self, _: u32, _: &[MsixMessage]) -> std::io::Result<()> {
        Ok(())
    }
}

struct Machine {
    pci: Arc<Mutex<PciBus>>,
    mmio: Arc<MmioBus>,
    _devs: Vec<Arc<Mutex<VirtioPci>>>,
}

fn machine() -> Machine {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 10)]).unwrap();
    let mmio = Arc::new(MmioBus::new());
    let mut bus = PciBus::new();
    let mut bars = BarAllocator::new(MMIO_HOLE_START, PCI_MMIO_END);
    let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let disk = MemDisk {
        data: vec![0; 4096],
        ro: false,
        flushed: false,
    };
    let devices: Vec<(&'static str, Box<dyn VirtioDevice>)> = vec![
        ("virtio-rng", Box::new(Rng::default())),
        ("virtio-blk", Box::new(Block::new(Box::new(disk), "d0"))),
    ];
    let mut devs = Vec::new();
    for (i, (name, d)) in devices.into_iter().enumerate() {
        let bar = bars.allocate(BAR_SIZE).unwrap();
        let queues = d.queue_max_sizes().len();
        // Weak: the bus holds the device, which holds its mover.
        let m = Arc::downgrade(&mmio);
        let w = Wiring {
            mem: mem.clone(),
            bar_addr: bar,
            queue_evts: (0..queues).map(|_| evt()).collect(),
            irqfds: (0..=queues).map(|_| evt()).collect(),
            gsi_base: 24 + 8 * i as u32,
            router: Arc::new(NoRoutes),
            intx: (evt(), 10),
            mover: Box::new(move |old, new| {
                m.upgrade()
                    .is_some_and(|m| m.relocate_within(old, new, MMIO_HOLE_START..PCI_MMIO_END))
            }),
        };
        let dev = Arc::new(Mutex::new(VirtioPci::new(d, w)));
        bus.add(dev.clone()).unwrap();
        mmio.insert(u64::from(bar), u64::from(BAR_SIZE), name, dev.clone())
            .unwrap();
        devs.push(dev);
    }
    let pci = Arc::new(Mutex::new(bus));
    mmio.insert(
        ECAM_BASE,
        ECAM_SIZE,
        "pci-ecam",
        Arc::new(Mutex::new(Ecam(pci.clone()))),
    )
    .unwrap();
    Machine {
        pci,
        mmio,
        _devs: devs,
    }
}

const WIDTHS: [usize; 8] = [1, 2, 4, 1, 2, 4, 3, 8];

fn check(m: &Machine) {
    let r = m.mmio.ranges();
    for (i, a) in r.iter().enumerate() {
        if a.2 == "pci-ecam" {
            assert_eq!((a.0, a.1), (ECAM_BASE, ECAM_SIZE), "ECAM moved");
        } else {
            assert!(
                a.0 >= MMIO_HOLE_START && a.0 + a.1 <= PCI_MMIO_END,
                "{} at {:#x} outside the PCI MMIO window",
                a.2,
                a.0
            );
        }
        for b in &r[i + 1..] {
            assert!(
                a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                "{} at {:#x} overlaps {} at {:#x}",
                a.2,
                a.0,
                b.2,
                b.0
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let m = machine();
    for op in data.chunks_exact(8) {
        let width = WIDTHS[usize::from(op[0] >> 5)];
        let value = [op[4], op[5], op[6], op[7], op[4], op[5], op[6], op[7]];
        let slot = u32::from(op[1] & 3);
        let reg = u32::from(op[2]);
        match op[0] & 7 {
            // Mechanism #1: select slot and register, then the data port (at any of its bytes).
            0 | 1 => {
                let mut bus = m.pci.lock().unwrap();
                let addr = if op[3] & 0x80 != 0 {
                    u32::from_le_bytes([op[1], op[2], op[3], op[4]])
                } else {
                    0x8000_0000 | (slot << 11) | (reg & 0xfc)
                };
                bus.write(0, &addr.to_le_bytes());
                let port = 4 + u16::from(op[3] & 3);
                let w = width.min(4);
                if op[0] & 7 == 0 {
                    bus.write(port, &value[..w]);
                } else {
                    let mut d = [0u8; 8];
                    bus.read(port, &mut d[..w]);
                }
            }
            // ECAM: any width at any register of any slot and function.
            2 | 3 => {
                let off = (u64::from(op[1] & 0x1f) << 15)
                    | (u64::from(op[3] & 0x1f) << 10 & 0x7000)
                    | u64::from(reg)
                    | (u64::from(op[3] >> 7) << 8);
                let a = ECAM_BASE + off;
                if let Some((i, o)) = m.mmio.lookup(a, width) {
                    if op[0] & 7 == 2 {
                        m.mmio.write(i, o, &value[..width]);
                    } else {
                        let mut d = [0u8; 8];
                        m.mmio.read(i, o, &mut d[..width]);
                    }
                }
            }
            // A device's BAR wherever it is now: MSI-X table and PBA, common and device
            // configuration, notifications; or any address of the window.
            _ => {
                let ranges = m.mmio.ranges();
                let base = ranges[usize::from(op[1]) % ranges.len()].0;
                let off = u64::from(u16::from_le_bytes([op[2], op[3]])) & 0x7fff;
                let a = if op[0] & 8 == 0 {
                    base + off
                } else {
                    MMIO_HOLE_START + (u64::from(u32::from_le_bytes([op[1], op[2], op[3], 0])) << 4)
                };
                if let Some((i, o)) = m.mmio.lookup(a, width) {
                    if op[0] & 1 == 0 {
                        m.mmio.write(i, o, &value[..width]);
                    } else {
                        let mut d = [0u8; 8];
                        m.mmio.read(i, o, &mut d[..width]);
                    }
                }
            }
        }
        check(&m);
    }
});
