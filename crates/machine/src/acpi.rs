//! The ACPI tables the guest finds through the RSDP: XSDT, a hardware-reduced FADT whose sleep
//! control register powers the VM off (S5), the MADT (every vCPU, the I/O APIC), the MCFG
//! (the ECAM window of PCI bus 0), and a DSDT describing the PCI host bridge with its
//! resources, the ECAM window as a motherboard resource, the serial port and a power button.
//! Built with rust-vmm's `acpi_tables`; placed in the reserved BIOS area at [`ACPI_START`]
//! (where a guest that is not handed the RSDP finds it by scanning), beside the MP table that
//! older guests read.
//!
//! PCI hot-plug (docs/DEVICES.md): the DSDT also describes a hot-plug controller `\_SB.PHPR`
//! (its register block at [`HOTPLUG_PORT`]), one device per slot of bus 0 under `PCI0`
//! (`Sxx_` with `_ADR`, `_SUN` and `_EJ0`) and a Generic Event Device `\_SB.GED_` whose
//! interrupt ([`GED_GSI`]) runs `PCI0.PCNT`, which notifies the slots the controller reports.

use crate::layout::{ECAM_BASE, ECAM_SIZE, IOAPIC_ADDR, LAPIC_ADDR, MMIO_HOLE_START, PCI_MMIO_END};
use crate::mptable;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::sdt::Sdt;
use acpi_tables::{aml, rsdp::Rsdp, xsdt::XSDT, Aml};

/// Where the tables start: the RSDP, 16-byte aligned, in the BIOS area (reserved in e820).
pub const ACPI_START: u64 = 0xf_0000;
/// Room for the tables (the BIOS area up to 1 MiB).
pub const ACPI_MAX: usize = 0x1_0000;
/// The sleep control register (byte, port I/O) of the hardware-reduced FADT.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// The sleep status register, next to it.
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// The SLP_TYP value of S5 (soft off), given to the guest as the DSDT's `_S5_` package.
pub const S5_SLEEP_TYPE: u8 = 5;
/// The reset register: the i8042's command port, value 0xfe (pulse the reset line).
const RESET_PORT: u16 = 0x64;
const RESET_VALUE: u8 = 0xfe;
/// COM1.
const COM1_PORT: u16 = 0x3f8;
const COM1_IRQ: u32 = 4;
/// The hot-plug controller's register block (port I/O, [`HOTPLUG_LEN`] bytes, dword
/// registers): PCIU (slots with a device added, cleared when read), PCID (slots whose device
/// the host asks the guest to eject, cleared when read), B0EJ (write a slot bitmap: the guest
/// has let go of those devices), PSEG (segment, reads 0).
pub const HOTPLUG_PORT: u16 = 0x610;
/// Length of the hot-plug register block.
pub const HOTPLUG_LEN: u16 = 16;
/// Offsets of the hot-plug registers.
pub const HOTPLUG_PCIU: u16 = 0;
/// See [`HOTPLUG_PORT`].
pub const HOTPLUG_PCID: u16 = 4;
/// See [`HOTPLUG_PORT`].
pub const HOTPLUG_B0EJ: u16 = 8;
/// The Generic Event Device's interrupt: an I/O APIC pin, edge-triggered, active high (an ISA
/// line no device uses).
pub const GED_GSI: u32 = 7;

const OEM_ID: [u8; 6] = *b"WRLDVS";
const OEM_TABLE: [u8; 8] = *b"WVMACHIN";
const OEM_REVISION: u32 = 1;
/// MADT flags: PCAT_COMPAT (the guest also has dual 8259s).
const MADT_PCAT_COMPAT: u32 = 1;

/// Aligns `v` up to 16 bytes.
fn align16(v: usize) -> usize {
    v.next_multiple_of(16)
}

/// The tables for `cpus` vCPUs, laid out from [`ACPI_START`]: returns the bytes to write there
/// (the RSDP first, so its address is [`ACPI_START`]).
pub fn build(cpus: u8) -> Result<Vec<u8>, mptable::MpTableError> {
    if cpus == 0 || cpus > mptable::MAX_CPUS {
        return Err(mptable::MpTableError::CpuCount(cpus));
    }
    let dsdt = dsdt();
    let madt = madt(cpus);
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    mcfg.add_ecam(ECAM_BASE, 0, 0, 0);
    let mut mcfg_bytes = Vec::new();
    mcfg.to_aml_bytes(&mut mcfg_bytes);
    // Layout: RSDP, XSDT (three entries), FADT, MADT, MCFG, DSDT.
    let rsdp_len = Rsdp::len();
    let xsdt_at = align16(rsdp_len);
    let xsdt_len = 36 + 8 * 3;
    let fadt_at = align16(xsdt_at + xsdt_len);
    let fadt_len = acpi_tables::fadt::FADT::len();
    let madt_at = align16(fadt_at + fadt_len);
    let mcfg_at = align16(madt_at + madt.len());
    let dsdt_at = align16(mcfg_at + mcfg_bytes.len());
    let end = dsdt_at + dsdt.len();
    assert!(end <= ACPI_MAX, "the ACPI tables outgrow the BIOS area");
    let addr = |off: usize| ACPI_START + off as u64;

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup)
        .dsdt_64(addr(dsdt_at));
    fadt.sleep_control_reg = GAS::new(
        GasSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(SLEEP_CONTROL_PORT),
    );
    fadt.sleep_status_reg = GAS::new(
        GasSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(SLEEP_STATUS_PORT),
    );
    fadt.reset_reg = GAS::new(
        GasSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(RESET_PORT),
    );
    fadt.reset_value = RESET_VALUE;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"WRLDVSR\0").into();
    let fadt = fadt.finalize();

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    xsdt.add_entry(addr(fadt_at));
    xsdt.add_entry(addr(madt_at));
    xsdt.add_entry(addr(mcfg_at));
    let rsdp = Rsdp::new(OEM_ID, addr(xsdt_at));

    let mut out = vec![0u8; end];
    let mut put = |at: usize, t: &dyn Aml| {
        let mut b = Vec::new();
        t.to_aml_bytes(&mut b);
        out[at..at + b.len()].copy_from_slice(&b);
        b.len()
    };
    assert_eq!(put(0, &rsdp), rsdp_len);
    assert_eq!(put(xsdt_at, &xsdt), xsdt_len);
    assert_eq!(put(fadt_at, &fadt), fadt_len);
    out[madt_at..madt_at + madt.len()].copy_from_slice(madt.as_slice());
    out[mcfg_at..mcfg_at + mcfg_bytes.len()].copy_from_slice(&mcfg_bytes);
    out[dsdt_at..].copy_from_slice(dsdt.as_slice());
    Ok(out)
}

/// The MADT: one local APIC per vCPU (APIC IDs 0..cpus, as the MP table says), the I/O APIC
/// taking GSIs from 0 (ISA IRQs map to the same pins, as in the MP table, so there are no
/// overrides), and LINT1 as NMI on every processor.
fn madt(cpus: u8) -> Sdt {
    let mut t = Sdt::new(*b"APIC", 36, 5, OEM_ID, OEM_TABLE, OEM_REVISION);
    t.append_slice(&u32::try_from(LAPIC_ADDR).unwrap().to_le_bytes());
    t.append_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for id in 0..cpus {
        ProcessorLocalApic::new(id, id, EnabledStatus::Enabled).to_aml_bytes(&mut t);
    }
    IoApic::new(
        mptable::ioapic_id(cpus),
        u32::try_from(IOAPIC_ADDR).unwrap(),
        0,
    )
    .to_aml_bytes(&mut t);
    // Local APIC NMI: type 4, length 6, every processor (0xff), flags 0 (conforming), LINT1.
    t.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    t.update_checksum();
    t
}

/// The DSDT: `_S5_` (the sleep type the sleep control register takes for soft off), and under
/// `\_SB` the PCI Express host bridge (bus 0, the configuration ports, all I/O ports but those,
/// the MMIO window BARs are allocated from), the ECAM window as a motherboard resource, COM1 and
/// a control-method power button.
fn dsdt() -> Sdt {
    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE, OEM_REVISION);
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8]),
    );

    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cfg_ports = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = aml::AddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_high = aml::AddressSpace::new_io(0xd00u16, 0xffffu16, None);
    let mmio = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        u32::try_from(MMIO_HOLE_START).unwrap(),
        u32::try_from(PCI_MMIO_END - 1).unwrap(),
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &cfg_ports, &io_low, &io_high, &mmio]);
    let (hid, cid) = (aml::EISAName::new("PNP0A08"), aml::EISAName::new("PNP0A03"));
    let names = [
        aml::Name::new("_HID".into(), &hid),
        aml::Name::new("_CID".into(), &cid),
        aml::Name::new("_ADR".into(), &aml::ZERO),
        aml::Name::new("_SEG".into(), &aml::ZERO),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_BBN".into(), &aml::ZERO),
        aml::Name::new("_CRS".into(), &crs),
    ];
    let slots = slot_devices();
    let pcnt = pcnt();
    let mut children: Vec<&dyn Aml> = names.iter().map(|n| n as &dyn Aml).collect();
    children.extend(slots.iter().map(|s| s as &dyn Aml));
    children.push(&pcnt);
    let pci = Raw::of(&aml::Device::new("PCI0".into(), children));
    // The ECAM window, reserved as a motherboard resource (Linux uses an MCFG area only when
    // the firmware reserves it).
    let ecam = aml::Memory32Fixed::new(
        false,
        u32::try_from(ECAM_BASE).unwrap(),
        u32::try_from(ECAM_SIZE).unwrap(),
    );
    let ecam_crs = aml::ResourceTemplate::new(vec![&ecam]);
    let mbrs = Raw::of(&aml::Device::new(
        "MBRS".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &ecam_crs),
        ],
    ));
    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1 = Raw::of(&aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ONE),
            &aml::Name::new("_CRS".into(), &com1_crs),
        ],
    ));
    let pwrb = Raw::of(&aml::Device::new(
        "PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    ));
    let (phpr, ged) = hotplug();
    let sb = aml::Scope::new("_SB_".into(), vec![&pci, &mbrs, &com1, &pwrb, &phpr, &ged]);
    s5.to_aml_bytes(&mut t);
    sb.to_aml_bytes(&mut t);
    t.update_checksum();
    t
}

/// The slot devices `S01_`..`S1F_` under `PCI0`: `_ADR` (device N, function 0), `_SUN` (N)
/// and `_EJ0`, which asks the controller to eject slot N (`\_SB.PHPR.PCEJ`).
fn slot_devices() -> Vec<Raw> {
    (1u8..32)
        .map(|n| {
            let adr = u32::from(n) << 16;
            let sun = u32::from(n);
            let call = aml::MethodCall::new("\\_SB_.PHPR.PCEJ".into(), vec![&sun]);
            let ej0 = aml::Method::new("_EJ0".into(), 1, false, vec![&call]);
            Raw::of(&aml::Device::new(
                slot_name(n).as_str().into(),
                vec![
                    &aml::Name::new("_ADR".into(), &adr),
                    &aml::Name::new("_SUN".into(), &sun),
                    &ej0,
                ],
            ))
        })
        .collect()
}

/// The name of slot `n`'s device: `S` and two hex digits, padded to four characters.
fn slot_name(n: u8) -> String {
    format!("S{n:02X}_")
}

/// `PCI0.PCNT`: reads PCIU and PCID once each and notifies every slot set in them: 1 (device
/// check: a device arrived) for PCIU, 3 (eject request) for PCID.
fn pcnt() -> Raw {
    let (up, down) = (aml::Local(0), aml::Local(1));
    let pciu = aml::Path::new("\\_SB_.PHPR.PCIU");
    let pcid = aml::Path::new("\\_SB_.PHPR.PCID");
    let store_up = aml::Store::new(&up, &pciu);
    let store_down = aml::Store::new(&down, &pcid);
    let names: Vec<aml::Path> = (1u8..32).map(|n| slot_name(n).as_str().into()).collect();
    let bits: Vec<u32> = (1u8..32).map(|n| 1u32 << n).collect();
    let (check, eject) = (1u8, 3u8);
    let ups: Vec<aml::And> = bits
        .iter()
        .map(|b| aml::And::new(&aml::ZERO, &up, b))
        .collect();
    let downs: Vec<aml::And> = bits
        .iter()
        .map(|b| aml::And::new(&aml::ZERO, &down, b))
        .collect();
    let up_notes: Vec<aml::Notify> = names.iter().map(|p| aml::Notify::new(p, &check)).collect();
    let down_notes: Vec<aml::Notify> = names.iter().map(|p| aml::Notify::new(p, &eject)).collect();
    let ifs: Vec<aml::If> = (0..31)
        .flat_map(|i| {
            [
                aml::If::new(&ups[i], vec![&up_notes[i]]),
                aml::If::new(&downs[i], vec![&down_notes[i]]),
            ]
        })
        .collect();
    let mut body: Vec<&dyn Aml> = vec![&store_up, &store_down];
    body.extend(ifs.iter().map(|i| i as &dyn Aml));
    Raw::of(&aml::Method::new("PCNT".into(), 0, true, body))
}

/// `\_SB.PHPR`, the hot-plug controller (its register block as `_CRS` and as an operation
/// region with the fields PCIU, PCID, B0EJ, PSEG; `PCEJ(slot)` writes the slot's bit to B0EJ
/// under a mutex), and `\_SB.GED_`, the Generic Event Device whose `_EVT` runs `PCI0.PCNT`.
fn hotplug() -> (Raw, Raw) {
    let io = aml::IO::new(
        HOTPLUG_PORT,
        HOTPLUG_PORT,
        1,
        u8::try_from(HOTPLUG_LEN).unwrap(),
    );
    let crs = aml::ResourceTemplate::new(vec![&io]);
    let (port, len) = (u32::from(HOTPLUG_PORT), u32::from(HOTPLUG_LEN));
    let region = aml::OpRegion::new("PCST".into(), aml::OpRegionSpace::SystemIO, &port, &len);
    let field = aml::Field::new(
        "PCST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Named(*b"PCIU", 32),
            aml::FieldEntry::Named(*b"PCID", 32),
            aml::FieldEntry::Named(*b"B0EJ", 32),
            aml::FieldEntry::Named(*b"PSEG", 32),
        ],
    );
    let mutex = aml::Mutex::new("BLCK".into(), 0);
    let acquire = aml::Acquire::new("BLCK".into(), 0xffff);
    let bit = aml::ShiftLeft::new(&aml::ZERO, &aml::ONE, &aml::Arg(0));
    let b0ej = aml::Path::new("B0EJ");
    let store = aml::Store::new(&b0ej, &bit);
    let release = aml::Release::new("BLCK".into());
    let pcej = aml::Method::new("PCEJ".into(), 1, true, vec![&acquire, &store, &release]);
    let phpr = Raw::of(&aml::Device::new(
        "PHPR".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A06")),
            &aml::Name::new("_UID".into(), &aml::ONE),
            &aml::Name::new("_CRS".into(), &crs),
            &region,
            &field,
            &mutex,
            &pcej,
        ],
    ));
    let irq = aml::Interrupt::new(true, true, false, false, GED_GSI);
    let ged_crs = aml::ResourceTemplate::new(vec![&irq]);
    let scan = aml::MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&scan]);
    let ged = Raw::of(&aml::Device::new(
        "GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &ged_crs),
            &evt,
        ],
    ));
    (phpr, ged)
}

/// AML already serialised, to nest in a scope.
struct Raw(Vec<u8>);

impl Raw {
    fn of(a: &dyn Aml) -> Raw {
        let mut b = Vec::new();
        a.to_aml_bytes(&mut b);
        Raw(b)
    }
}

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }
    /// The table at guest address `addr` in the blob, checked: signature, length, checksum.
    fn table<'a>(blob: &'a [u8], addr: u64, sig: &[u8; 4]) -> &'a [u8] {
        let at = usize::try_from(addr - ACPI_START).unwrap();
        let len = u32_at(blob, at + 4) as usize;
        let t = &blob[at..at + len];
        assert_eq!(&t[..4], sig);
        assert_eq!(sum(t), 0, "{} checksum", String::from_utf8_lossy(sig));
        t
    }

    #[test]
    fn tables_chain_from_the_rsdp_with_valid_checksums() {
        for cpus in [1u8, 4, mptable::MAX_CPUS] {
            let b = build(cpus).unwrap();
            assert!(b.len() <= ACPI_MAX);
            assert_eq!(&b[..8], b"RSD PTR ");
            assert_eq!(sum(&b[..20]), 0, "RSDP v1 checksum");
            assert_eq!(b[15], 2, "ACPI 2.0+ RSDP");
            assert_eq!(sum(&b[..36]), 0, "RSDP extended checksum");
            let xsdt = table(&b, u64_at(&b, 24), b"XSDT");
            let entries: Vec<u64> = (36..xsdt.len())
                .step_by(8)
                .map(|o| u64_at(xsdt, o))
                .collect();
            assert_eq!(entries.len(), 3);
            let mcfg = table(&b, entries[2], b"MCFG");
            assert_eq!(mcfg.len(), 44 + 16);
            assert_eq!(u64_at(mcfg, 44), ECAM_BASE);
            assert_eq!(&mcfg[52..56], &[0, 0, 0, 0], "segment 0, buses 0-0");
            let fadt = table(&b, entries[0], b"FACP");
            assert!(u32_at(fadt, 112) & (1 << 20) != 0, "hardware-reduced");
            // Sleep control register: a byte in system I/O space at SLEEP_CONTROL_PORT.
            assert_eq!(fadt[244], 1);
            assert_eq!(u64_at(fadt, 248), u64::from(SLEEP_CONTROL_PORT));
            let dsdt = table(&b, u64_at(fadt, 140), b"DSDT");
            let s5 = dsdt.windows(4).position(|w| w == b"_S5_").expect("_S5_");
            // After the name: PackageOp, length, 2 elements, BytePrefix 5 (then ZeroOp).
            assert_eq!(
                &dsdt[s5 + 4..s5 + 9],
                &[0x12, 0x05, 0x02, 0x0a, S5_SLEEP_TYPE]
            );
            for name in [
                b"PCI0", b"MBRS", b"COM1", b"PWRB", b"PHPR", b"GED_", b"PCNT", b"S1F_",
            ] {
                assert!(dsdt.windows(4).any(|w| w == name), "{name:?}");
            }
            let madt = table(&b, entries[1], b"APIC");
            assert_eq!(u64::from(u32_at(madt, 36)), LAPIC_ADDR);
            let (mut lapics, mut ioapics, mut at) = (Vec::new(), 0, 44);
            while at < madt.len() {
                match madt[at] {
                    0 => lapics.push((madt[at + 2], madt[at + 3], u32_at(madt, at + 4))),
                    1 => ioapics += 1,
                    _ => {}
                }
                at += usize::from(madt[at + 1]);
            }
            assert_eq!(at, madt.len());
            assert_eq!(ioapics, 1);
            assert_eq!(lapics.len(), usize::from(cpus));
            for (i, (uid, id, flags)) in lapics.iter().enumerate() {
                assert_eq!((usize::from(*uid), usize::from(*id), *flags), (i, i, 1));
            }
        }
    }

    #[test]
    fn refuses_bad_counts() {
        assert!(build(0).is_err());
        assert!(build(mptable::MAX_CPUS + 1).is_err());
    }
}
