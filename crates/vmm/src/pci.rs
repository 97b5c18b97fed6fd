//! The VM's PCI side: MSI routes in KVM, the wiring of virtio devices (BAR, ioeventfds,
//! irqfds, INTx line) onto the PCI, MMIO and interrupt plumbing, their unwiring when a
//! hot-plugged device is ejected, and the handles ([`PciDevices`]) through which the VMM
//! pauses, resumes, saves and restores those devices.
#![allow(clippy::cast_possible_truncation)] // GSIs and vectors are small; MSI addresses split in halves

use crate::VmmError;
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use vmm_sys_util::eventfd::EventFd;
use wv_devices::{MmioBus, Snapshot};
use wv_machine::GuestRam as GuestMemoryMmap;
use wv_pci::{BarAllocator, MsiRouter, MsixMessage, PciBus, PciBusState};
use wv_virtio::transport::{notify_offset, Wiring, BAR_SIZE};
use wv_virtio::{VirtioDevice, VirtioPci, VirtioPciState};

/// First GSI for MSI vectors (0-23 are the I/O APIC's pins).
pub const MSI_GSI_BASE: u32 = 24;
/// I/O APIC pins given to PCI INTx, in order.
const INTX_LINES: [u8; 4] = [10, 11, 5, 9];

/// KVM's interrupt routes: the default PIC and I/O APIC routes plus one MSI route per vector.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, MsixMessage>>,
    /// No in-kernel irqchip (`--irqchip user`): the routes are only kept here, where the
    /// userspace controllers' relay looks them up ([`GsiRouter::message`]).
    user: bool,
}

impl GsiRouter {
    /// A router for `vm`.
    pub fn new(vm: Arc<VmFd>) -> GsiRouter {
        GsiRouter {
            vm,
            msi: Mutex::new(BTreeMap::new()),
            user: false,
        }
    }

    /// The MSI message the guest programmed for `gsi`, if any.
    pub(crate) fn message(&self, gsi: u32) -> Option<MsixMessage> {
        self.msi
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&gsi)
            .copied()
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

impl GsiRouter {
    /// Writes the whole routing table to KVM again, whether or not it changed (after a
    /// restore, so that KVM's table is the mirror's).
    pub fn reprogram(&self) -> std::io::Result<()> {
        let msi = self.msi.lock().unwrap_or_else(|p| p.into_inner());
        self.program(&msi)
    }

    fn program(&self, msi: &BTreeMap<u32, MsixMessage>) -> std::io::Result<()> {
        if self.user {
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
        self.program(&msi)
    }
}

/// One virtio device on the PCI bus, as the VMM addresses it.
#[derive(Clone)]
pub struct PciHandle {
    /// The name it was added with (also its MMIO accounting cause), e.g. `virtio-blk:root`.
    pub id: String,
    /// Its slot on bus 0.
    pub slot: u8,
    /// The device.
    pub dev: Arc<Mutex<VirtioPci>>,
    /// Added at runtime (`PUT /vm/device-add`): the guest may eject it.
    pub hotplugged: bool,
    /// Its queue notification eventfds (registered as ioeventfds in its BAR).
    notify: Arc<Vec<EventFd>>,
}

impl PciHandle {
    fn lock(&self) -> MutexGuard<'_, VirtioPci> {
        self.dev.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Every virtio device of a VM in slot order, and the interrupt routes they share: what the
/// VMM pauses and resumes with the vCPUs and writes into a snapshot.
#[derive(Clone)]
pub struct PciDevices {
    devices: Arc<Mutex<Vec<PciHandle>>>,
    router: Arc<GsiRouter>,
}

/// One device in [`PciState`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PciDeviceState {
    /// The device's name when saved (informational: devices are matched by slot).
    pub id: String,
    /// Its slot on bus 0.
    pub slot: u8,
    /// The transport's and device's state.
    pub state: VirtioPciState,
}

/// The VM's PCI state: the bus (address latch, host bridge) and every virtio device in slot
/// order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PciState {
    /// The bus.
    pub bus: PciBusState,
    /// The devices, in slot order.
    pub devices: Vec<PciDeviceState>,
}

impl PciDevices {
    fn list(&self) -> MutexGuard<'_, Vec<PciHandle>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The devices in slot order (a copy: hot-plug changes the list).
    pub fn handles(&self) -> Vec<PciHandle> {
        self.list().clone()
    }

    /// The device named `id`.
    #[cfg(test)]
    pub fn get(&self, id: &str) -> Option<PciHandle> {
        self.list().iter().find(|h| h.id == id).cloned()
    }

    /// Pauses every device: all are asked first, so that they finish their chains in
    /// parallel, then each is waited for. Returns once every worker has parked.
    pub fn pause_all(&self) {
        let devices = self.handles();
        for h in &devices {
            h.lock().begin_pause();
        }
        for h in &devices {
            h.lock().pause();
        }
    }

    /// Lets every device serve its queues again (after a pause or a restore).
    pub fn resume_all(&self) {
        for h in &self.handles() {
            h.lock().resume();
        }
    }

    /// The state of `bus` and of every device; the devices must be paused
    /// ([`PciDevices::pause_all`]).
    pub fn save(&self, bus: &Mutex<PciBus>) -> Result<PciState, String> {
        let bus = bus.lock().unwrap_or_else(|p| p.into_inner()).save()?;
        let devices = self
            .handles()
            .iter()
            .map(|h| {
                Ok(PciDeviceState {
                    id: h.id.clone(),
                    slot: h.slot,
                    state: h.lock().save().map_err(|e| format!("{}: {e}", h.id))?,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(PciState { bus, devices })
    }

    /// Restores `bus` and every device from `state`, which must come from a VM built with the
    /// same devices in the same slots (each device also checks its own state). The devices
    /// are left paused ([`PciDevices::resume_all`] starts them); KVM's routing table is
    /// written again at the end. Meant for a VM that has not run: on an error, devices before
    /// the failing one have taken their state, and the VM is to be discarded.
    pub fn restore(&self, bus: &Mutex<PciBus>, state: PciState) -> Result<(), String> {
        let devices = self.handles();
        if state.devices.len() != devices.len() {
            return Err(format!(
                "PCI state: {} devices saved, this VM has {}",
                state.devices.len(),
                devices.len()
            ));
        }
        if let Some((h, s)) = devices
            .iter()
            .zip(&state.devices)
            .find(|(h, s)| h.slot != s.slot)
        {
            return Err(format!(
                "PCI state: {} was saved in slot {}, but this VM has {} there",
                s.id, s.slot, h.id
            ));
        }
        bus.lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore(state.bus)?;
        for (h, s) in devices.iter().zip(state.devices) {
            h.lock()
                .restore(s.state)
                .map_err(|e| format!("{}: {e}", h.id))?;
        }
        self.router
            .reprogram()
            .map_err(|e| format!("KVM_SET_GSI_ROUTING after restoring the PCI devices: {e}"))
    }
}

/// Allocates BARs, GSIs and INTx lines as devices are added (at start, and at runtime for
/// hot-plug: the VMM keeps it), and takes ejected devices apart.
pub struct PciBuilder {
    pub(crate) bus: Arc<Mutex<PciBus>>,
    pub(crate) mmio: Arc<MmioBus>,
    bars: BarAllocator,
    next_gsi: u32,
    router: Arc<GsiRouter>,
    vm: Arc<VmFd>,
    pub(crate) counters: Vec<(&'static str, Arc<wv_virtio::DeviceCounters>)>,
    /// The data-path counters of the devices added at start that serve their queues in the
    /// VMM (virtio-blk, virtio-net), by accounting name.
    pub(crate) io: Vec<(&'static str, wv_virtio::IoCounters)>,
    devices: Arc<Mutex<Vec<PciHandle>>>,
    /// The userspace interrupt controllers (`--irqchip user`), which take the devices'
    /// interrupt eventfds instead of KVM's irqfds.
    uapic: Option<Arc<crate::uapic::Uapic>>,
}

impl PciBuilder {
    /// Devices of `vm`; BARs come from the MMIO hole below the ECAM window. The devices'
    /// interrupts go to `uapic` when given (`--irqchip user`), else to KVM's irqfds.
    pub(crate) fn with_irqchip(
        vm: Arc<VmFd>,
        uapic: Option<Arc<crate::uapic::Uapic>>,
    ) -> PciBuilder {
        let mut router = GsiRouter::new(vm.clone());
        router.user = uapic.is_some();
        let router = Arc::new(router);
        if let Some(u) = &uapic {
            u.set_msi_routes(router.clone());
        }
        PciBuilder {
            uapic,
            bus: Arc::new(Mutex::new(PciBus::new())),
            mmio: Arc::new(MmioBus::new()),
            bars: BarAllocator::new(
                wv_machine::layout::MMIO_HOLE_START,
                wv_machine::layout::PCI_MMIO_END,
            ),
            next_gsi: MSI_GSI_BASE,
            router,
            vm,
            counters: Vec::new(),
            io: Vec::new(),
            devices: Arc::default(),
        }
    }

    /// Handles on the virtio devices added so far, in slot order (take them before the
    /// builder is taken apart).
    pub fn devices(&self) -> PciDevices {
        PciDevices {
            devices: self.devices.clone(),
            router: self.router.clone(),
        }
    }

    /// Adds a virtio device named `name` (the MMIO accounting cause) at start.
    pub fn add_virtio(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        name: &'static str,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(), VmmError> {
        self.add(vm, mem, name, device, false).map(|_| ())
    }

    /// Whether the bus has a free slot.
    pub fn has_free_slot(&self) -> bool {
        self.bus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .has_free_slot()
    }

    /// Adds a virtio device named `name`; `hotplugged` when the VM runs (the guest may eject
    /// it). Returns its slot.
    pub fn add(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        name: &'static str,
        device: Box<dyn VirtioDevice>,
        hotplugged: bool,
    ) -> Result<u8, VmmError> {
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
            let gsi = gsi_base + v as u32;
            match &self.uapic {
                Some(u) => u.add_source(
                    evt.try_clone().map_err(|e| err("eventfd", &e))?,
                    crate::uapic::Source::Msi(gsi),
                ),
                None => vm
                    .register_irqfd(&evt, gsi)
                    .map_err(|e| err("KVM_IRQFD", &e))?,
            }
            irqfds.push(evt);
        }
        self.next_gsi += queues as u32 + 1;
        let slot_guess = self.list_len();
        let line = INTX_LINES[slot_guess % INTX_LINES.len()];
        let intx = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| err("eventfd", &e))?;
        match &self.uapic {
            // INTx is a level line its device lowers on an ISR read, which a pulse is not:
            // with the userspace controllers, devices interrupt by MSI-X only.
            Some(_) => {}
            None => vm
                .register_irqfd(&intx, u32::from(line))
                .map_err(|e| err("KVM_IRQFD", &e))?,
        }
        let router: Arc<dyn MsiRouter> = self.router.clone();
        let mover = {
            let (vm, mmio) = (self.vm.clone(), self.mmio.clone());
            let evts: Vec<EventFd> = queue_evts
                .iter()
                .map(|e| e.try_clone())
                .collect::<Result<_, _>>()
                .map_err(|e| err("eventfd", &e))?;
            Box::new(move |old: u64, new: u64| {
                // Only within the PCI MMIO window (ACPI's _CRS): never over RAM, the ECAM
                // window or the interrupt controllers, and never over another BAR.
                let window = wv_machine::layout::MMIO_HOLE_START..wv_machine::layout::PCI_MMIO_END;
                if !mmio.relocate_within(old, new, window) {
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
        let notify: Vec<EventFd> = queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<_, _>>()
            .map_err(|e| err("eventfd", &e))?;
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
        let io = device.io_counters();
        let pci = VirtioPci::new(device, wiring);
        let counters = pci.counters();
        let dev = Arc::new(Mutex::new(pci));
        self.mmio
            .insert(u64::from(bar), u64::from(BAR_SIZE), name, dev.clone())
            .ok_or_else(|| VmmError::Internal(format!("{name}: BAR overlaps another device")))?;
        let slot = self
            .bus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(dev.clone());
        let Some(slot) = slot else {
            self.mmio.remove(u64::from(bar));
            Self::unregister(vm, u64::from(bar), &notify);
            return Err(VmmError::Internal(format!("{name}: the PCI bus is full")));
        };
        if !hotplugged {
            self.counters.push((name, counters));
            self.io.extend(io.map(|io| (name, io)));
        }
        let mut list = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        let at = list.partition_point(|h| h.slot < slot);
        list.insert(
            at,
            PciHandle {
                id: name.to_string(),
                slot,
                dev,
                hotplugged,
                notify: Arc::new(notify),
            },
        );
        Ok(slot)
    }

    fn list_len(&self) -> usize {
        self.devices.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn unregister(vm: &VmFd, bar: u64, notify: &[EventFd]) {
        for (q, evt) in notify.iter().enumerate() {
            let _ = vm.unregister_ioevent(
                evt,
                &IoEventAddress::Mmio(bar + notify_offset(q)),
                NoDatamatch,
            );
        }
    }

    /// Takes the hot-plugged device in `slot` apart once the guest has ejected it: waits for
    /// the chain it is serving, stops it, unmaps its BAR, unregisters its notifications and
    /// empties the slot; the device (its eventfds, its backend's files) is dropped when the
    /// last handle goes, which is here. Returns its name.
    pub fn remove(&mut self, vm: &VmFd, slot: u8) -> Option<String> {
        let h = {
            let mut list = self.devices.lock().unwrap_or_else(|p| p.into_inner());
            let at = list.iter().position(|h| h.slot == slot && h.hotplugged)?;
            list.remove(at)
        };
        self.bus
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(slot);
        let bar = {
            let mut d = h.lock();
            d.unplug();
            u64::from(d.bar_addr())
        };
        self.mmio.remove(bar);
        Self::unregister(vm, bar, &h.notify);
        Some(h.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;
    use wv_devices::{MmioDevice, PioDevice};
    use wv_pci::PciDevice;
    use wv_virtio::block::{Block, MemDisk};
    use wv_virtio::rng::Rng;

    fn need_kvm() {
        assert!(
            std::path::Path::new("/dev/kvm").exists(),
            "this test needs /dev/kvm: without it, run the tests without --include-ignored"
        );
    }

    /// A VM with an interrupt controller, 1 MiB of memory (not mapped into the VM: the devices
    /// only need it for their rings), an entropy device in slot 1 and a disk in slot 2.
    fn build() -> (PciBuilder, GuestMemoryMmap) {
        let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
        let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
        vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut b = PciBuilder::with_irqchip(vm.clone(), None);
        b.add_virtio(&vm, &mem, "virtio-rng", Box::new(Rng::default()))
            .unwrap();
        let disk = MemDisk {
            data: vec![0; 4096],
            ro: false,
            flushed: false,
        };
        let blk = Block::new(Box::new(disk), "d0");
        b.add_virtio(&vm, &mem, "virtio-blk:d0", Box::new(blk))
            .unwrap();
        (b, mem)
    }

    fn w(d: &mut VirtioPci, off: u64, v: u32) {
        d.mmio_write(off, &v.to_le_bytes());
    }

    /// What a driver does to the disk: moves its BAR to `to`, programs two MSI-X vectors,
    /// negotiates, sets up queue 0 and starts it.
    fn drive(d: &mut VirtioPci, to: u32) {
        d.config_write(0x04, &2u16.to_le_bytes());
        d.config_write(0x10, &to.to_le_bytes());
        for v in 0..2u64 {
            let at = 0x4000 + 16 * v;
            w(d, at, 0xfee0_0000);
            w(d, at + 4, 0);
            w(d, at + 8, 0x40 + v as u32);
            w(d, at + 12, 0);
        }
        // The MSI-X capability is the fifth (after four virtio capabilities).
        let mut p = [0u8];
        d.config_read(0x34, &mut p);
        let mut at = usize::from(p[0]);
        loop {
            let mut h = [0u8; 2];
            d.config_read(at, &mut h[..1]);
            d.config_read(at + 1, &mut h[1..]);
            if h[0] == wv_pci::msix::CAP_ID {
                break;
            }
            at = usize::from(h[1]);
        }
        d.config_write(at + 2, &0x8000u16.to_le_bytes());
        d.mmio_write(0x14, &[3]);
        w(d, 0x08, 1);
        w(d, 0x0c, 1);
        d.mmio_write(0x14, &[0x0b]);
        d.mmio_write(0x16, &0u16.to_le_bytes());
        d.mmio_write(0x18, &16u16.to_le_bytes());
        for (off, a) in [(0x20, 0x1000u32), (0x28, 0x2000), (0x30, 0x3000)] {
            w(d, off, a);
            w(d, off + 4, 0);
        }
        d.mmio_write(0x1a, &1u16.to_le_bytes());
        d.mmio_write(0x10, &0u16.to_le_bytes());
        d.mmio_write(0x1c, &1u16.to_le_bytes());
        d.mmio_write(0x14, &[0x0f]);
    }

    #[test]
    #[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
    fn devices_restore_into_a_second_vm_with_their_routes_and_moved_bars() {
        need_kvm();
        let (a, _mem_a) = build();
        let devs_a = a.devices();
        let handles = devs_a.handles();
        let ids: Vec<_> = handles.iter().map(|h| (h.id.as_str(), h.slot)).collect();
        assert_eq!(ids, [("virtio-rng", 1), ("virtio-blk:d0", 2)]);
        let disk = devs_a.get("virtio-blk:d0").unwrap().dev;
        let mut bar = [0u8; 4];
        disk.lock().unwrap().config_read(0x10, &mut bar);
        let old = u32::from_le_bytes(bar);
        let moved = old + 4 * BAR_SIZE;
        drive(&mut disk.lock().unwrap(), moved);
        assert!(disk.lock().unwrap().is_active());
        assert_eq!(a.mmio.lookup(u64::from(moved), 4).map(|(_, o)| o), Some(0));
        let PciBuilder { bus, router, .. } = a;
        let bus_a = bus;
        // The guest left the address latch pointing at slot 2's vendor ID.
        bus_a
            .lock()
            .unwrap()
            .write(0, &0x8000_1000u32.to_le_bytes());
        assert!(
            devs_a.save(&bus_a).unwrap_err().contains("pause"),
            "a running device is not saved"
        );
        devs_a.pause_all();
        let saved = devs_a.save(&bus_a).unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let back: PciState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        let routes_a = router.msi.lock().unwrap().clone();
        assert_eq!(
            routes_a[&27].data, 0x41,
            "the disk's queue vector (GSI 26 + 1)"
        );

        // The second VM, built the same way, takes the state.
        let (b, _mem_b) = build();
        let devs_b = b.devices();
        let PciBuilder {
            bus,
            mmio,
            router: router_b,
            ..
        } = b;
        let bus_b = bus;
        devs_b.restore(&bus_b, back.clone()).unwrap();
        assert_eq!(devs_b.save(&bus_b).unwrap(), saved);
        // The disk's routes are restated; the entropy device's untouched table gives empty
        // routes that nothing fires.
        let mut routes_b = router_b.msi.lock().unwrap().clone();
        routes_b.retain(|_, m| *m != MsixMessage::default());
        assert_eq!(routes_b, routes_a, "KVM routes restated");
        let (i, off) = mmio.lookup(u64::from(moved), 4).expect("the BAR moved");
        assert_eq!((mmio.names()[i], off), ("virtio-blk:d0", 0));
        assert_eq!(mmio.lookup(u64::from(old), 4), None);
        let mut d = [0u8; 4];
        bus_b.lock().unwrap().read(4, &mut d);
        assert_eq!(
            u16::from_le_bytes([d[0], d[1]]),
            0x1af4,
            "the latch selects slot 2"
        );
        let mut st = [0u8];
        devs_b
            .get("virtio-blk:d0")
            .unwrap()
            .dev
            .lock()
            .unwrap()
            .mmio_read(0x14, &mut st);
        assert_eq!(st[0], 0x0f);
        devs_b.resume_all();
        devs_a.resume_all();
        assert!(!devs_b.handles()[1].dev.lock().unwrap().is_paused());

        // A state with the devices in other slots, or one device short, is refused.
        let mut swapped = back.clone();
        swapped.devices.swap(0, 1);
        let err = devs_b.restore(&bus_b, swapped).unwrap_err();
        assert!(err.contains("saved in slot 2"), "{err}");
        let mut short = back;
        short.devices.pop();
        let err = devs_b.restore(&bus_b, short).unwrap_err();
        assert!(err.contains("1 devices saved, this VM has 2"), "{err}");
    }
}
