//! The VM's PCI side: MSI routes in KVM and the wiring of virtio devices (BAR, ioeventfds,
//! irqfds, INTx line) onto the PCI, MMIO and interrupt plumbing.
#![allow(clippy::cast_possible_truncation)] // GSIs and vectors are small; MSI addresses split in halves

use crate::VmmError;
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use wv_devices::MmioBus;
use wv_pci::{BarAllocator, MsiRouter, MsixMessage, PciBus};
use wv_virtio::transport::{notify_offset, Wiring, BAR_SIZE};
use wv_virtio::{VirtioDevice, VirtioPci};

/// First GSI for MSI vectors (0-23 are the I/O APIC's pins).
pub const MSI_GSI_BASE: u32 = 24;
/// I/O APIC pins given to PCI INTx, in order.
const INTX_LINES: [u8; 4] = [10, 11, 5, 9];

/// KVM's interrupt routes: the default PIC and I/O APIC routes plus one MSI route per vector.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, MsixMessage>>,
}

impl GsiRouter {
    /// A router for `vm`.
    pub fn new(vm: Arc<VmFd>) -> GsiRouter {
        GsiRouter {
            vm,
            msi: Mutex::new(BTreeMap::new()),
        }
    }

    fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    }
}

impl MsiRouter for GsiRouter {
    fn set_routes(&self, gsi_base: u32, messages: &[MsixMessage]) -> std::io::Result<()> {
        let mut msi = self.msi.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        for (i, m) in messages.iter().enumerate() {
            changed |= msi.insert(gsi_base + i as u32, *m) != Some(*m);
        }
        if !changed {
            return Ok(());
        }
        // KVM_SET_GSI_ROUTING replaces the whole table, so the default routes are restated.
        let mut entries = Vec::with_capacity(40 + msi.len());
        for gsi in 0..24 {
            if gsi < 16 {
                let chip = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                entries.push(Self::irqchip(gsi, chip, gsi % 8));
            }
            entries.push(Self::irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for (gsi, m) in msi.iter() {
            let mut e = kvm_irq_routing_entry {
                gsi: *gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = m.addr as u32;
            e.u.msi.address_hi = (m.addr >> 32) as u32;
            e.u.msi.data = m.data;
            entries.push(e);
        }
        let routing =
            KvmIrqRouting::from_entries(&entries).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// Allocates BARs, GSIs and INTx lines as devices are added.
pub struct PciBuilder {
    pub(crate) bus: PciBus,
    pub(crate) mmio: Arc<MmioBus>,
    bars: BarAllocator,
    next_gsi: u32,
    router: Arc<GsiRouter>,
    vm: Arc<VmFd>,
    pub(crate) counters: Vec<(&'static str, Arc<wv_virtio::DeviceCounters>)>,
}

impl PciBuilder {
    /// Devices of `vm`; BARs come from the MMIO hole below the ECAM window.
    pub fn new(vm: Arc<VmFd>) -> PciBuilder {
        PciBuilder {
            bus: PciBus::new(),
            mmio: Arc::new(MmioBus::new()),
            bars: BarAllocator::new(
                wv_machine::layout::MMIO_HOLE_START,
                wv_machine::layout::PCI_MMIO_END,
            ),
            next_gsi: MSI_GSI_BASE,
            router: Arc::new(GsiRouter::new(vm.clone())),
            vm,
            counters: Vec::new(),
        }
    }

    /// Adds a virtio device named `name` (the MMIO accounting cause).
    pub fn add_virtio(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        name: &'static str,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(), VmmError> {
        let err = |what: &str, e: &dyn std::fmt::Display| {
            VmmError::Internal(format!("{name}: {what}: {e}"))
        };
        let bar = self
            .bars
            .allocate(BAR_SIZE)
            .ok_or_else(|| VmmError::Internal(format!("{name}: no MMIO space left")))?;
        let queues = device.queue_max_sizes().len();
        let mut queue_evts = Vec::with_capacity(queues);
        for q in 0..queues {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| err("eventfd", &e))?;
            vm.register_ioevent(
                &evt,
                &IoEventAddress::Mmio(u64::from(bar) + notify_offset(q)),
                NoDatamatch,
            )
            .map_err(|e| err("KVM_IOEVENTFD", &e))?;
            queue_evts.push(evt);
        }
        let gsi_base = self.next_gsi;
        let mut irqfds = Vec::with_capacity(queues + 1);
        for v in 0..=queues {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| err("eventfd", &e))?;
            vm.register_irqfd(&evt, gsi_base + v as u32)
                .map_err(|e| err("KVM_IRQFD", &e))?;
            irqfds.push(evt);
        }
        self.next_gsi += queues as u32 + 1;
        let slot_guess = self.mmio.names().len();
        let line = INTX_LINES[slot_guess % INTX_LINES.len()];
        let intx = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| err("eventfd", &e))?;
        vm.register_irqfd(&intx, u32::from(line))
            .map_err(|e| err("KVM_IRQFD", &e))?;
        let router: Arc<dyn MsiRouter> = self.router.clone();
        let mover = {
            let (vm, mmio) = (self.vm.clone(), self.mmio.clone());
            let evts: Vec<EventFd> = queue_evts
                .iter()
                .map(|e| e.try_clone())
                .collect::<Result<_, _>>()
                .map_err(|e| err("eventfd", &e))?;
            Box::new(move |old: u64, new: u64| {
                if !mmio.relocate(old, new) {
                    return false;
                }
                // Notifications follow the BAR; should a registration fail, the transport still
                // forwards notify writes that exit to it, so the device keeps working.
                for (q, evt) in evts.iter().enumerate() {
                    let _ = vm.unregister_ioevent(
                        evt,
                        &IoEventAddress::Mmio(old + notify_offset(q)),
                        NoDatamatch,
                    );
                    let _ = vm.register_ioevent(
                        evt,
                        &IoEventAddress::Mmio(new + notify_offset(q)),
                        NoDatamatch,
                    );
                }
                true
            }) as wv_virtio::transport::BarMover
        };
        let wiring = Wiring {
            mem: mem.clone(),
            bar_addr: bar,
            queue_evts,
            irqfds,
            gsi_base,
            router,
            intx: (intx, line),
            mover,
        };
        let pci = VirtioPci::new(device, wiring);
        self.counters.push((name, pci.counters()));
        let dev = Arc::new(Mutex::new(pci));
        self.bus
            .add(dev.clone())
            .ok_or_else(|| VmmError::Internal(format!("{name}: the PCI bus is full")))?;
        self.mmio
            .insert(u64::from(bar), u64::from(BAR_SIZE), name, dev)
            .ok_or_else(|| VmmError::Internal(format!("{name}: BAR overlaps another device")))?;
        Ok(())
    }
}
