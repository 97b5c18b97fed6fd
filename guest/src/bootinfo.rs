//! What the loader told us: Linux `boot_params` (zero page) or the PVH `hvm_start_info`,
//! reduced to one [`BootInfo`] copied into the image's own memory right at entry (the loader's
//! structures live in low memory that the AP trampoline later reuses).

use crate::entry::{BOOT_LINUX32, BOOT_LINUX64, BOOT_PVH};

/// Largest number of memory-map entries kept.
pub const MAX_E820: usize = 32;
/// Largest command line kept.
pub const MAX_CMDLINE: usize = 1024;

/// One memory-map entry.
#[derive(Clone, Copy, Default)]
pub struct MemRange {
    /// Start address.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// e820 type (1 = RAM).
    pub kind: u32,
}

/// Boot information, independent of the protocol.
pub struct BootInfo {
    /// Which protocol (entry::BOOT_*).
    pub protocol: u32,
    /// Structure-level problems found while reading (empty when none).
    pub problem: &'static str,
    /// Memory map.
    pub e820: [MemRange; MAX_E820],
    /// Entries used in `e820`.
    pub e820_len: usize,
    /// Command line bytes.
    pub cmdline: [u8; MAX_CMDLINE],
    /// Bytes used in `cmdline`.
    pub cmdline_len: usize,
    /// Initrd (or first PVH module) address and size; size 0 when none.
    pub initrd: (u64, u64),
    /// ACPI RSDP address from PVH start_info or the zero page (0 when not given).
    pub rsdp: u64,
}

/// A `BootInfo` with nothing in it.
pub const fn empty() -> BootInfo {
    BootInfo {
        protocol: 0,
        problem: "",
        e820: [MemRange {
            addr: 0,
            size: 0,
            kind: 0,
        }; MAX_E820],
        e820_len: 0,
        cmdline: [0; MAX_CMDLINE],
        cmdline_len: 0,
        initrd: (0, 0),
        rsdp: 0,
    }
}

impl BootInfo {
    /// The command line as bytes.
    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }

    /// Total RAM in the memory map.
    pub fn ram_total(&self) -> u64 {
        self.e820[..self.e820_len]
            .iter()
            .filter(|r| r.kind == 1)
            .map(|r| r.size)
            .sum()
    }

    /// Whether `[addr, addr+len)` lies inside one RAM range.
    pub fn in_ram(&self, addr: u64, len: u64) -> bool {
        self.e820[..self.e820_len]
            .iter()
            .any(|r| r.kind == 1 && addr >= r.addr && addr.saturating_add(len) <= r.addr + r.size)
    }

    /// The protocol's name.
    pub fn protocol_name(&self) -> &'static str {
        match self.protocol {
            BOOT_LINUX32 => "linux32",
            BOOT_LINUX64 => "linux64",
            BOOT_PVH => "pvh",
            _ => "unknown",
        }
    }

    fn copy_cmdline(&mut self, paddr: u64) {
        if paddr == 0 {
            return;
        }
        let p = paddr as *const u8;
        let mut n = 0;
        while n < MAX_CMDLINE {
            // SAFETY: the loader promised a NUL-terminated string at this identity-mapped
            // address; reading stops at the NUL or at MAX_CMDLINE.
            let b = unsafe { p.add(n).read_volatile() };
            if b == 0 {
                break;
            }
            self.cmdline[n] = b;
            n += 1;
        }
        self.cmdline_len = n;
    }
}

fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: callers pass addresses inside the loader's boot structures (identity mapped).
    unsafe { (addr as *const T).read_unaligned() }
}

/// Reads the loader's structure at `info` for `protocol`.
pub fn read(protocol: u32, info: u64) -> BootInfo {
    let mut bi = empty();
    bi.protocol = protocol;
    match protocol {
        BOOT_LINUX32 | BOOT_LINUX64 => read_linux(&mut bi, info),
        BOOT_PVH => read_pvh(&mut bi, info),
        _ => bi.problem = "unknown boot protocol",
    }
    bi
}

fn read_linux(bi: &mut BootInfo, zp: u64) {
    if rd::<u16>(zp + 0x1fe) != 0xaa55 || rd::<u32>(zp + 0x202) != 0x5372_6448 {
        bi.problem = "boot_params without boot_flag 0xaa55 / HdrS magic";
        return;
    }
    let n = rd::<u8>(zp + 0x1e8) as usize;
    if n > 128 {
        bi.problem = "boot_params e820_entries above 128";
        return;
    }
    for i in 0..n.min(MAX_E820) {
        let e = zp + 0x2d0 + 20 * i as u64;
        bi.e820[i] = MemRange {
            addr: rd(e),
            size: rd(e + 8),
            kind: rd(e + 16),
        };
    }
    bi.e820_len = n.min(MAX_E820);
    let cmd = u64::from(rd::<u32>(zp + 0x228)) | (u64::from(rd::<u32>(zp + 0xc8)) << 32);
    bi.copy_cmdline(cmd);
    let rd_addr = u64::from(rd::<u32>(zp + 0x218)) | (u64::from(rd::<u32>(zp + 0xc0)) << 32);
    let rd_size = u64::from(rd::<u32>(zp + 0x21c)) | (u64::from(rd::<u32>(zp + 0xc4)) << 32);
    bi.initrd = (rd_addr, rd_size);
    bi.rsdp = rd::<u64>(zp + 0x70); // acpi_rsdp_addr (boot protocol 2.14)
}

fn read_pvh(bi: &mut BootInfo, si: u64) {
    if rd::<u32>(si) != 0x336e_c578 {
        bi.problem = "hvm_start_info without magic 0x336ec578";
        return;
    }
    let version = rd::<u32>(si + 4);
    let nr_modules = rd::<u32>(si + 12);
    let modlist = rd::<u64>(si + 16);
    bi.copy_cmdline(rd::<u64>(si + 24));
    bi.rsdp = rd::<u64>(si + 32);
    if nr_modules > 0 && modlist != 0 {
        bi.initrd = (rd(modlist), rd(modlist + 8));
    }
    if version >= 1 {
        let map = rd::<u64>(si + 40);
        let n = rd::<u32>(si + 48) as usize;
        for i in 0..n.min(MAX_E820) {
            let e = map + 24 * i as u64;
            bi.e820[i] = MemRange {
                addr: rd(e),
                size: rd(e + 8),
                kind: rd(e + 16),
            };
        }
        bi.e820_len = n.min(MAX_E820);
    } else {
        bi.problem = "hvm_start_info version 0 has no memory map";
    }
}

/// Finds `key=` in the command line and returns the value (up to the next space).
pub fn param<'a>(cmdline: &'a [u8], key: &str) -> Option<&'a [u8]> {
    let k = key.as_bytes();
    for word in cmdline.split(|&b| b == b' ') {
        if word.len() > k.len() && word.starts_with(k) && word[k.len()] == b'=' {
            return Some(&word[k.len() + 1..]);
        }
    }
    None
}

/// Parses an unsigned decimal (or 0x hex) number.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' if radix == 16 => c - b'a' + 10,
            _ => return None,
        };
        v = v.checked_mul(radix)?.checked_add(u64::from(d))?;
    }
    Some(v)
}
