//! The ACPI tables as a guest kernel finds them: the RSDP (named by the loader, else found by
//! scanning the BIOS area), the XSDT (or the RSDT of ACPI 1.0), tables looked up by signature
//! with their checksums checked, the FADT's sleep control register and the DSDT's `_S5_` sleep
//! type, which together power the machine off; and the PCI hot-plug controller's register
//! block and the Generic Event Device's interrupt, which the DSDT names (docs/DEVICES.md).

use crate::console::outb;

fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: callers read firmware tables inside identity-mapped low memory.
    unsafe { (addr as *const T).read_unaligned() }
}

/// Whether the `len` bytes at `addr` sum to zero.
pub fn checksum_ok(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(rd::<u8>(addr + i))) == 0
}

/// The tables' limit: anything larger is not a table this guest trusts.
const MAX_TABLE: u32 = 1 << 20;

/// Whether the table at `addr` is sane: below 4 GiB, a length from 36 bytes to [`MAX_TABLE`],
/// checksum zero.
pub fn valid(addr: u64) -> bool {
    if addr == 0 || addr >= 1 << 32 {
        return false;
    }
    let len = rd::<u32>(addr + 4);
    (36..=MAX_TABLE).contains(&len) && checksum_ok(addr, u64::from(len))
}

/// Whether a valid table with signature `sig` is at `addr`.
fn table_ok(addr: u64, sig: &[u8; 4]) -> bool {
    addr != 0 && addr < 1 << 32 && rd::<[u8; 4]>(addr) == *sig && valid(addr)
}

/// The RSDP: the loader's hint, else a scan of 0xe0000-0xfffff; its checksum checked.
pub fn rsdp() -> Option<u64> {
    let hint = crate::boot_info().rsdp;
    let at = if hint != 0 {
        hint
    } else {
        let mut a = 0xe0000u64;
        loop {
            if a >= 0x100000 {
                return None;
            }
            if rd::<[u8; 8]>(a) == *b"RSD PTR " && checksum_ok(a, 20) {
                break a;
            }
            a += 16;
        }
    };
    (rd::<[u8; 8]>(at) == *b"RSD PTR " && checksum_ok(at, 20)).then_some(at)
}

/// The root table: (address, entry size) of the XSDT when the RSDP is 2.0+ and valid, else
/// of the RSDT.
pub fn root() -> Option<(u64, u64)> {
    let r = rsdp()?;
    if rd::<u8>(r + 15) >= 2 && checksum_ok(r, 36) {
        let x = rd::<u64>(r + 24);
        if table_ok(x, b"XSDT") {
            return Some((x, 8));
        }
    }
    let t = u64::from(rd::<u32>(r + 16));
    table_ok(t, b"RSDT").then_some((t, 4))
}

/// The entries of root table `(t, size)` (from [`root`]).
pub fn entries((t, size): (u64, u64)) -> impl Iterator<Item = u64> {
    let n = (u64::from(rd::<u32>(t + 4)) - 36) / size;
    (0..n).map(move |i| {
        if size == 8 {
            rd::<u64>(t + 36 + 8 * i)
        } else {
            u64::from(rd::<u32>(t + 36 + 4 * i))
        }
    })
}

/// The valid table with signature `sig` listed in the root table.
pub fn find(sig: &[u8; 4]) -> Option<u64> {
    entries(root()?).find(|&t| table_ok(t, sig))
}

/// The DSDT the FADT names (X_DSDT when set, else DSDT), checked.
pub fn dsdt() -> Option<u64> {
    let f = find(b"FACP")?;
    let len = rd::<u32>(f + 4);
    let x = if len >= 148 { rd::<u64>(f + 140) } else { 0 };
    let d = if x != 0 {
        x
    } else {
        u64::from(rd::<u32>(f + 40))
    };
    table_ok(d, b"DSDT").then_some(d)
}

/// Whether the FADT says the platform is hardware-reduced (flags bit 20).
pub fn hw_reduced() -> bool {
    find(b"FACP").is_some_and(|f| rd::<u32>(f + 112) & (1 << 20) != 0)
}

/// The sleep control register's port when it is a byte in system I/O space (ACPI 5+ FADT).
pub fn sleep_control_port() -> Option<u16> {
    let f = find(b"FACP")?;
    if rd::<u32>(f + 4) < 256 || rd::<u8>(f + 244) != 1 {
        return None;
    }
    u16::try_from(rd::<u64>(f + 248)).ok()
}

/// The SLP_TYP of S5 from the DSDT's `Name (_S5_, Package () { typ, ... })`.
pub fn s5_sleep_type() -> Option<u8> {
    let d = dsdt()?;
    let len = u64::from(rd::<u32>(d + 4));
    let mut p = d + 36;
    while p + 9 <= d + len {
        if rd::<[u8; 4]>(p) == *b"_S5_" && rd::<u8>(p + 4) == 0x12 {
            // PackageOp, a one-byte PkgLength, NumElements, then the first element.
            let v = p + 7;
            return match rd::<u8>(v) {
                0x0a => Some(rd::<u8>(v + 1)), // BytePrefix
                0x00 => Some(0),               // ZeroOp
                0x01 => Some(1),               // OneOp
                _ => None,
            };
        }
        p += 1;
    }
    None
}

/// The MADT's enabled local APICs and I/O APICs.
pub fn madt_counts() -> Option<(u64, u64)> {
    let t = find(b"APIC")?;
    let len = u64::from(rd::<u32>(t + 4));
    let (mut lapics, mut ioapics, mut p) = (0, 0, t + 44);
    while p + 2 <= t + len {
        let (ty, l) = (rd::<u8>(p), u64::from(rd::<u8>(p + 1)));
        if l < 2 || p + l > t + len {
            return None;
        }
        match ty {
            0 if l >= 8 && rd::<u32>(p + 4) & 1 != 0 => lapics += 1,
            1 if l >= 12 => ioapics += 1,
            _ => {}
        }
        p += l;
    }
    Some((lapics, ioapics))
}

/// Powers off through ACPI S5 on a hardware-reduced platform: SLP_TYP and SLP_EN written to the
/// sleep control register. Returns only when that is not possible (or did not work).
pub fn s5_poweroff() {
    if let (true, Some(port), Some(typ)) = (hw_reduced(), sleep_control_port(), s5_sleep_type()) {
        outb(port, ((typ & 7) << 2) | (1 << 5));
    }
}

/// The ECAM base of PCI segment 0, bus 0 from the MCFG, if there is one.
pub fn ecam_base() -> Option<u64> {
    let t = find(b"MCFG")?;
    let len = u64::from(rd::<u32>(t + 4));
    let mut p = t + 44;
    while p + 16 <= t + len {
        if rd::<u16>(p + 8) == 0 && rd::<u8>(p + 10) == 0 {
            return Some(rd::<u64>(p));
        }
        p += 16;
    }
    None
}

/// A dword of function `dev`.0's configuration space through ECAM at `base`.
pub fn ecam_read32(base: u64, dev: u8, reg: u16) -> u32 {
    let a = base + (u64::from(dev) << 15) + u64::from(reg);
    // SAFETY: the ECAM window is identity-mapped MMIO; a volatile dword read is a config read.
    unsafe { core::ptr::read_volatile(a as *const u32) }
}

/// The bytes of the DSDT's definition block (after its header).
fn dsdt_body() -> Option<(u64, u64)> {
    let d = dsdt()?;
    Some((d + 36, d + u64::from(rd::<u32>(d + 4))))
}

/// The first `N`-byte window within 64 bytes after an occurrence of `name` in the DSDT (the
/// name's uses as well as its definition are tried) that `f` accepts.
fn after<const N: usize, T>(name: &[u8; 4], f: impl Fn([u8; N]) -> Option<T>) -> Option<T> {
    let (start, end) = dsdt_body()?;
    let last = end.checked_sub(N as u64)?;
    (start..end.saturating_sub(4))
        .filter(|&p| rd::<[u8; 4]>(p) == *name)
        .find_map(|at| (at + 4..(at + 64).min(last + 1)).find_map(|p| f(rd::<[u8; N]>(p))))
}

/// The first I/O port descriptor (`IO (Decode16, min, max, align, len)`, min == max) after the
/// name `name` in the DSDT: (port, length).
fn io_after(name: &[u8; 4]) -> Option<(u16, u8)> {
    after(name, |b: [u8; 8]| {
        let (min, max) = (
            u16::from_le_bytes([b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
        );
        (b[0] == 0x47 && b[1] == 0x01 && min == max && b[7] != 0).then_some((min, b[7]))
    })
}

/// The hot-plug controller's register block: the I/O descriptor of `\_SB.PHPR._CRS`.
pub fn hotplug_port() -> Option<u16> {
    io_after(b"PHPR")
        .filter(|&(_, len)| len >= 12)
        .map(|(p, _)| p)
}

/// The Generic Event Device's GSI: the extended interrupt descriptor of `\_SB.GED_._CRS`.
pub fn ged_gsi() -> Option<u32> {
    after(b"GED_", |b: [u8; 9]| {
        (b[0] == 0x89 && b[1] == 6 && b[2] == 0 && b[4] == 1)
            .then(|| u32::from_le_bytes([b[5], b[6], b[7], b[8]]))
    })
}
