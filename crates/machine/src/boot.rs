//! Loading a kernel and everything it is handed at entry.
//!
//! Two protocols: a bzImage enters through the Linux 64-bit boot protocol (long mode, identity
//! page tables, `rsi` = zero page at offset 0x200 of the protected-mode kernel); an ELF with a
//! `XEN_ELFNOTE_PHYS32_ENTRY` note enters through PVH (32-bit protected mode, paging off, `ebx` =
//! `hvm_start_info`). Both get the command line, an optional initrd, the e820 map, the ACPI
//! tables' RSDP address and the MP
//! table. Every size and address coming from an image is checked before anything is written,
//! so a malformed image is a clear error, never a write over the VMM's own boot structures.
#![allow(clippy::cast_possible_truncation)] // boot-structure fields hold addresses below 4 GiB and sizes bounded by the layout; x86-64 only

use crate::e820::{self, E820Entry};
use crate::layout::*;
use crate::memory::GuestRam;
use crate::mptable;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::bootparam::boot_params;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use std::fmt;
use std::fs::File;
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use vm_memory::{ByteValued, Bytes, GuestAddress, ReadVolatile};

/// Where the kernel comes from.
pub enum KernelImage {
    /// A file named by the user.
    File(PathBuf),
    /// An image built into `wv` (the probe guest), with a name for messages.
    Embedded(&'static str, &'static [u8]),
}

impl KernelImage {
    fn name(&self) -> String {
        match self {
            KernelImage::File(p) => p.display().to_string(),
            KernelImage::Embedded(n, _) => format!("embedded {n}"),
        }
    }
}

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol (bzImage).
    Linux64,
    /// PVH (ELF with the Xen PVH note).
    Pvh,
}

/// The boot vCPU's entry state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    /// Protocol.
    pub protocol: BootProtocol,
    /// Entry instruction pointer.
    pub rip: u64,
}

/// What was placed in guest memory.
#[derive(Clone, Debug)]
pub struct LoadedGuest {
    /// How to enter it.
    pub entry: BootEntry,
    /// Kernel range [start, end).
    pub kernel: (u64, u64),
    /// Initrd address and size.
    pub initrd: Option<(u64, u64)>,
}

/// Why a guest could not be loaded. Each message is one line.
#[derive(Debug)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    KernelIo(String, std::io::Error),
    /// The kernel is neither a bzImage with a 64-bit entry nor an ELF with a PVH note.
    KernelFormat(String, String),
    /// The kernel does not fit in guest memory or sits where it must not.
    KernelPlacement(String, String),
    /// The initrd file cannot be opened or read.
    InitrdIo(PathBuf, std::io::Error),
    /// The initrd does not fit.
    InitrdTooBig {
        /// Initrd size.
        size: u64,
        /// Room there is for it.
        room: u64,
    },
    /// The command line is too long for the kernel or the layout.
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The command line contains a NUL byte.
    CmdlineNul,
    /// The vCPU count cannot be described.
    Cpus(mptable::MpTableError),
    /// Writing to guest memory failed (a bug: every range is checked first).
    GuestWrite(String),
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootError::KernelIo(p, e) => write!(f, "cannot read kernel {p}: {e}"),
            BootError::KernelFormat(p, why) => write!(f, "kernel {p} is not bootable: {why}"),
            BootError::KernelPlacement(p, why) => write!(f, "kernel {p} does not fit: {why}"),
            BootError::InitrdIo(p, e) => write!(f, "cannot read initrd {}: {e}", p.display()),
            BootError::InitrdTooBig { size, room } => write!(
                f,
                "initrd of {size} bytes does not fit in guest memory ({room} bytes free below the \
                 kernel's initrd limit after the kernel); give the VM more --memory"
            ),
            BootError::CmdlineTooLong { len, max } => {
                write!(
                    f,
                    "command line of {len} bytes is longer than the kernel accepts ({max})"
                )
            }
            BootError::CmdlineNul => write!(f, "command line contains a NUL byte"),
            BootError::Cpus(e) => write!(f, "{e}"),
            BootError::GuestWrite(e) => write!(f, "writing boot data to guest memory failed: {e}"),
        }
    }
}

impl BootError {
    /// Whether the error is about the kernel or initrd image (as opposed to the configuration).
    pub fn is_image_error(&self) -> bool {
        matches!(
            self,
            BootError::KernelIo(..)
                | BootError::KernelFormat(..)
                | BootError::KernelPlacement(..)
                | BootError::InitrdIo(..)
                | BootError::InitrdTooBig { .. }
        )
    }
}

fn gw<E: fmt::Display>(e: E) -> BootError {
    BootError::GuestWrite(e.to_string())
}

/// Boot structures made only of integers and arrays of integers, with no padding: every bit
/// pattern is a valid value and every byte of a value is initialised.
///
/// # Safety
///
/// Implement only for such types: `#[repr(C)]` or `#[repr(C, packed)]`, integer fields (or
/// arrays or structs of them with the same property) and a size equal to the sum of the
/// fields' sizes (asserted below for each type).
unsafe trait PlainBootStruct: Copy + Send + Sync + 'static {}

// SAFETY: linux-loader's `#[repr(C, packed)]` zero page; packed, so no padding, and every field
// down to the nested structs is an integer or an integer array (4096 bytes, asserted).
unsafe impl PlainBootStruct for boot_params {}
// SAFETY: `#[repr(C)]`, four u32 then four u64 then two u32: 56 bytes, no padding (asserted).
unsafe impl PlainBootStruct for hvm_start_info {}
// SAFETY: `#[repr(C)]`, two u64 then two u32: 24 bytes, no padding (asserted).
unsafe impl PlainBootStruct for hvm_memmap_table_entry {}
// SAFETY: `#[repr(C)]`, four u64: 32 bytes, no padding (asserted).
unsafe impl PlainBootStruct for hvm_modlist_entry {}

const _: () = {
    assert!(std::mem::size_of::<boot_params>() == 4096);
    assert!(std::mem::size_of::<hvm_start_info>() == 4 * 4 + 4 * 8 + 2 * 4);
    assert!(std::mem::size_of::<hvm_memmap_table_entry>() == 2 * 8 + 2 * 4);
    assert!(std::mem::size_of::<hvm_modlist_entry>() == 4 * 8);
};

/// A boot structure as guest memory sees it: plain bytes (written with `write_obj`).
#[derive(Clone, Copy)]
#[repr(transparent)]
struct Plain<T>(T);

// SAFETY: `Plain<T>` is transparent over `T`, and `PlainBootStruct` promises that `T` has no
// padding and no invalid bit patterns, which is what `ByteValued` requires.
unsafe impl<T: PlainBootStruct> ByteValued for Plain<T> {}

/// Loads `kernel` (and `initrd`) into `mem` sized `mem_size`, writes the command line and the
/// boot structures for `cpus` vCPUs, and returns how to enter the guest.
pub fn load(
    mem: &GuestRam,
    mem_size: u64,
    kernel: &KernelImage,
    initrd: Option<&Path>,
    cmdline: &str,
    cpus: u8,
) -> Result<LoadedGuest, BootError> {
    let name = kernel.name();
    match kernel {
        KernelImage::File(p) => {
            let f = match wv_fds::take_path(p) {
                Some(f) => f,
                None => File::open(p).map_err(|e| BootError::KernelIo(name.clone(), e))?,
            };
            load_from(mem, mem_size, f, name, initrd, cmdline, cpus)
        }
        KernelImage::Embedded(_, bytes) => load_from(
            mem,
            mem_size,
            Cursor::new(*bytes),
            name,
            initrd,
            cmdline,
            cpus,
        ),
    }
}

fn load_from<F: Read + Seek + ReadVolatile>(
    mem: &GuestRam,
    mem_size: u64,
    mut file: F,
    name: String,
    initrd: Option<&Path>,
    cmdline: &str,
    cpus: u8,
) -> Result<LoadedGuest, BootError> {
    let mpt = mptable::build(cpus).map_err(BootError::Cpus)?;
    let acpi = crate::acpi::build(cpus).map_err(BootError::Cpus)?;
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let mut head = [0u8; 0x268];
    let n = read_up_to(&mut file, &mut head).map_err(|e| BootError::KernelIo(name.clone(), e))?;
    let head = &head[..n];
    let low_end = low_ram(mem_size);

    let (entry, kernel_range, initrd_max, cmdline_max, setup) = if head.starts_with(b"\x7fELF") {
        check_elf_segments(&mut file, &name, low_end)?;
        let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| BootError::KernelFormat(name.clone(), e.to_string()))?;
        let rip =
            match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => a.0,
                _ => return Err(BootError::KernelFormat(
                    name,
                    "ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build Linux with \
                     CONFIG_PVH=y or boot its bzImage"
                        .into(),
                )),
            };
        let start = r.kernel_load.0.min(rip);
        (
            BootEntry {
                protocol: BootProtocol::Pvh,
                rip,
            },
            (start, r.kernel_end),
            low_end,
            CMDLINE_MAX,
            None,
        )
    } else if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        let version = u16::from_le_bytes([head[0x206], head[0x207]]);
        let xloadflags = if head.len() >= 0x238 {
            u16::from_le_bytes([head[0x236], head[0x237]])
        } else {
            0
        };
        if version < 0x020c || xloadflags & 1 == 0 {
            return Err(BootError::KernelFormat(
                name,
                format!(
                    "bzImage has no 64-bit entry point (boot protocol {}.{:02}, XLF_KERNEL_64 {})",
                    version >> 8,
                    version & 0xff,
                    if xloadflags & 1 == 0 { "clear" } else { "set" }
                ),
            ));
        }
        let init_size = u64::from(u32::from_le_bytes(head[0x260..0x264].try_into().unwrap()));
        let code32 = u64::from(u32::from_le_bytes(head[0x214..0x218].try_into().unwrap()));
        if code32 < HIMEM_START {
            return Err(BootError::KernelPlacement(
                name,
                format!("load address {code32:#x} is below 1 MiB"),
            ));
        }
        let file_len = file
            .seek(SeekFrom::End(0))
            .map_err(|e| BootError::KernelIo(name.clone(), e))?;
        let setup_sects = if head[0x1f1] == 0 {
            4
        } else {
            u64::from(head[0x1f1])
        };
        let body = file_len.saturating_sub((setup_sects + 1) * 512);
        let syssize = u64::from(u32::from_le_bytes(head[0x1f4..0x1f8].try_into().unwrap())) * 16;
        // syssize is in 16-byte paragraphs, so the last one may be partly missing.
        if version >= 0x0204 && body + 15 < syssize {
            return Err(BootError::KernelFormat(
                name,
                format!("truncated bzImage: the header promises {syssize} bytes of kernel, the file has {body}"),
            ));
        }
        let need = code32 + init_size.max(body);
        if need > low_end {
            return Err(BootError::KernelPlacement(
                name,
                format!(
                    "it needs guest memory up to {} MiB; give the VM more --memory",
                    need.div_ceil(1 << 20)
                ),
            ));
        }
        let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| BootError::KernelFormat(name.clone(), e.to_string()))?;
        let hdr = r
            .setup_header
            .expect("bzImage loader returns the setup header");
        let initrd_max = u64::from(hdr.initrd_addr_max).min(low_end - 1) + 1;
        let cmax = if hdr.cmdline_size == 0 {
            255
        } else {
            hdr.cmdline_size as usize
        };
        let end = r.kernel_load.0 + init_size.max(r.kernel_end - r.kernel_load.0);
        let rip = r.kernel_load.0 + 0x200;
        (
            BootEntry {
                protocol: BootProtocol::Linux64,
                rip,
            },
            (r.kernel_load.0, end),
            initrd_max,
            cmax,
            Some(hdr),
        )
    } else {
        return Err(BootError::KernelFormat(
            name,
            "neither a bzImage (no HdrS magic at 0x202) nor an ELF".into(),
        ));
    };

    if cmdline.len() + 1 > cmdline_max.min(CMDLINE_MAX) {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: cmdline_max.min(CMDLINE_MAX) - 1,
        });
    }
    mem.write_slice(cmdline.as_bytes(), GuestAddress(CMDLINE))
        .map_err(gw)?;
    mem.write_obj(0u8, GuestAddress(CMDLINE + cmdline.len() as u64))
        .map_err(gw)?;

    let initrd_placed = match initrd {
        Some(p) => Some(load_initrd(mem, p, kernel_range.1, initrd_max)?),
        None => None,
    };
    mem.write_slice(&mpt, GuestAddress(EBDA_START))
        .map_err(gw)?;
    mem.write_slice(&acpi, GuestAddress(crate::acpi::ACPI_START))
        .map_err(gw)?;
    write_gdt(mem)?;
    let map = e820::map(mem_size);
    match entry.protocol {
        BootProtocol::Linux64 => {
            write_page_tables(mem)?;
            write_zero_page(
                mem,
                setup.expect("bzImage"),
                cmdline.len(),
                initrd_placed,
                &map,
            )?;
        }
        BootProtocol::Pvh => write_start_info(mem, initrd_placed, &map)?,
    }
    Ok(LoadedGuest {
        entry,
        kernel: kernel_range,
        initrd: initrd_placed,
    })
}

fn read_up_to<F: Read + Seek>(f: &mut F, buf: &mut [u8]) -> std::io::Result<usize> {
    f.seek(SeekFrom::Start(0))?;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Every PT_LOAD segment must lie in RAM between 1 MiB and the MMIO hole, so loading can
/// never overwrite the boot structures below 1 MiB.
fn check_elf_segments<F: Read + Seek>(
    f: &mut F,
    name: &str,
    low_end: u64,
) -> Result<(), BootError> {
    let io = |e| BootError::KernelIo(name.to_string(), e);
    let fmt_err = |why: &str| BootError::KernelFormat(name.to_string(), why.to_string());
    let mut eh = [0u8; 64];
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    f.read_exact(&mut eh)
        .map_err(|_| fmt_err("truncated ELF header"))?;
    if eh[4] != 2 || eh[5] != 1 || u16::from_le_bytes([eh[18], eh[19]]) != 62 {
        return Err(fmt_err("not a little-endian 64-bit x86-64 ELF"));
    }
    let phoff = u64::from_le_bytes(eh[32..40].try_into().unwrap());
    let phentsize = u16::from_le_bytes([eh[54], eh[55]]) as usize;
    let phnum = u16::from_le_bytes([eh[56], eh[57]]) as usize;
    if phentsize < 56 || phnum == 0 || phnum > 64 {
        return Err(fmt_err("implausible program header table"));
    }
    let mut loads = 0;
    for i in 0..phnum {
        let mut ph = vec![0u8; phentsize];
        f.seek(SeekFrom::Start(phoff + (i * phentsize) as u64))
            .map_err(io)?;
        f.read_exact(&mut ph)
            .map_err(|_| fmt_err("truncated program header table"))?;
        if u32::from_le_bytes(ph[0..4].try_into().unwrap()) != 1 {
            continue;
        }
        loads += 1;
        let paddr = u64::from_le_bytes(ph[24..32].try_into().unwrap());
        let filesz = u64::from_le_bytes(ph[32..40].try_into().unwrap());
        let memsz = u64::from_le_bytes(ph[40..48].try_into().unwrap());
        if filesz > memsz {
            return Err(fmt_err("segment with file size above memory size"));
        }
        if paddr < HIMEM_START {
            return Err(BootError::KernelPlacement(
                name.to_string(),
                format!("segment at {paddr:#x} lies below 1 MiB"),
            ));
        }
        let end = paddr
            .checked_add(memsz)
            .ok_or_else(|| fmt_err("segment size overflows"))?;
        if end > low_end {
            return Err(BootError::KernelPlacement(
                name.to_string(),
                format!(
                    "segment {paddr:#x}-{end:#x} ends beyond guest RAM below 3 GiB ({low_end:#x}); \
                     give the VM more --memory"
                ),
            ));
        }
    }
    if loads == 0 {
        return Err(fmt_err("no loadable segment"));
    }
    Ok(())
}

/// Places the initrd at the highest page-aligned address below `limit` and above `kernel_end`.
fn load_initrd(
    mem: &GuestRam,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let mut f = match wv_fds::take_path(path) {
        Some(f) => f,
        None => File::open(path).map_err(|e| BootError::InitrdIo(path.to_path_buf(), e))?,
    };
    let size = f
        .seek(SeekFrom::End(0))
        .map_err(|e| BootError::InitrdIo(path.to_path_buf(), e))?;
    f.seek(SeekFrom::Start(0))
        .map_err(|e| BootError::InitrdIo(path.to_path_buf(), e))?;
    let floor = kernel_end.next_multiple_of(4096);
    let room = limit.saturating_sub(floor);
    if size > room {
        return Err(BootError::InitrdTooBig { size, room });
    }
    let addr = (limit - size) & !0xfff;
    if addr < floor {
        return Err(BootError::InitrdTooBig { size, room });
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| {
            BootError::InitrdIo(path.to_path_buf(), std::io::Error::other(e.to_string()))
        })?;
    Ok((addr, size))
}

/// GDT shared by both protocols: 0x08 32-bit code (PVH), 0x10 64-bit code and 0x18 data (the
/// Linux boot protocol's __BOOT_CS/__BOOT_DS), 0x20 a TSS placeholder.
pub const GDT: [u64; 5] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0080_8b00_0000_ffff,
];

fn write_gdt(mem: &GuestRam) -> Result<(), BootError> {
    for (i, d) in GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(BOOT_GDT + 8 * i as u64))
            .map_err(gw)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT)).map_err(gw)
}

/// Identity map of the low 4 GiB with 2 MiB pages.
fn write_page_tables(mem: &GuestRam) -> Result<(), BootError> {
    mem.write_obj(PDPT | 0x3, GuestAddress(PML4)).map_err(gw)?;
    let mut pd = vec![0u8; 4 * 4096];
    for i in 0..4u64 {
        mem.write_obj((PD + i * 4096) | 0x3, GuestAddress(PDPT + 8 * i))
            .map_err(gw)?;
    }
    for (i, e) in pd.chunks_mut(8).enumerate() {
        e.copy_from_slice(&(((i as u64) << 21) | 0x83).to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PD)).map_err(gw)
}

fn write_zero_page(
    mem: &GuestRam,
    hdr: linux_loader::bootparam::setup_header,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    map: &[E820Entry],
) -> Result<(), BootError> {
    let mut p = boot_params {
        hdr,
        ..Default::default()
    };
    p.hdr.type_of_loader = 0xff;
    p.hdr.boot_flag = 0xaa55;
    p.hdr.header = 0x5372_6448;
    p.hdr.cmd_line_ptr = CMDLINE as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
        p.ext_ramdisk_image = (addr >> 32) as u32;
        p.ext_ramdisk_size = (size >> 32) as u32;
    }
    for (i, e) in map.iter().enumerate() {
        p.e820_table[i].addr = e.addr;
        p.e820_table[i].size = e.size;
        p.e820_table[i].r#type = e.kind;
    }
    p.e820_entries = map.len() as u8;
    p.acpi_rsdp_addr = crate::acpi::ACPI_START;
    mem.write_obj(Plain(p), GuestAddress(ZERO_PAGE)).map_err(gw)
}

fn write_start_info(
    mem: &GuestRam,
    initrd: Option<(u64, u64)>,
    map: &[E820Entry],
) -> Result<(), BootError> {
    assert!(map.len() <= PVH_MEMMAP_MAX);
    for (i, e) in map.iter().enumerate() {
        let m = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        mem.write_obj(Plain(m), GuestAddress(PVH_MEMMAP + 24 * i as u64))
            .map_err(gw)?;
    }
    let mut si = hvm_start_info {
        magic: 0x336e_c578,
        version: 1,
        cmdline_paddr: CMDLINE,
        memmap_paddr: PVH_MEMMAP,
        memmap_entries: map.len() as u32,
        rsdp_paddr: crate::acpi::ACPI_START,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let m = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(Plain(m), GuestAddress(PVH_MODLIST))
            .map_err(gw)?;
        si.nr_modules = 1;
        si.modlist_paddr = PVH_MODLIST;
    }
    mem.write_obj(Plain(si), GuestAddress(PVH_INFO)).map_err(gw)
}

/// A KVM segment from a GDT descriptor and its selector.
pub fn segment(desc: u64, selector: u16) -> kvm_segment {
    let limit = ((desc & 0xffff) | ((desc >> 32) & 0xf_0000)) as u32;
    let g = ((desc >> 55) & 1) as u8;
    kvm_segment {
        base: ((desc >> 16) & 0xff_ffff) | (((desc >> 56) & 0xff) << 24),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((desc >> 40) & 0xf) as u8,
        present: ((desc >> 47) & 1) as u8,
        dpl: ((desc >> 45) & 3) as u8,
        db: ((desc >> 54) & 1) as u8,
        s: ((desc >> 44) & 1) as u8,
        l: ((desc >> 53) & 1) as u8,
        g,
        avl: ((desc >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

impl BootEntry {
    /// General-purpose registers at entry.
    pub fn regs(&self) -> kvm_regs {
        let mut r = kvm_regs {
            rflags: 0x2,
            rip: self.rip,
            ..Default::default()
        };
        match self.protocol {
            BootProtocol::Linux64 => {
                r.rsi = ZERO_PAGE;
                r.rsp = BOOT_STACK;
                r.rbp = BOOT_STACK;
            }
            BootProtocol::Pvh => r.rbx = PVH_INFO,
        }
        r
    }

    /// Segment and control registers at entry, on top of the vCPU's reset state `base`.
    pub fn sregs(&self, base: &kvm_sregs) -> kvm_sregs {
        let mut s = *base;
        s.gdt.base = BOOT_GDT;
        s.gdt.limit = (GDT.len() * 8 - 1) as u16;
        s.idt.base = BOOT_IDT;
        s.idt.limit = 7;
        s.tr = segment(GDT[4], 0x20);
        match self.protocol {
            BootProtocol::Linux64 => {
                let data = segment(GDT[3], 0x18);
                s.cs = segment(GDT[2], 0x10);
                (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
                s.cr0 = 0x8005_0033; // PG | AM | WP | NE | ET | MP | PE
                s.cr3 = PML4;
                s.cr4 = 0x20; // PAE
                s.efer = 0x500; // LMA | LME
            }
            BootProtocol::Pvh => {
                let data = segment(GDT[3], 0x18);
                s.cs = segment(GDT[1], 0x08);
                (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
                s.cr0 = 0x11; // ET | PE
                s.cr3 = 0;
                s.cr4 = 0;
                s.efer = 0;
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_ram;

    #[test]
    fn segments_decode_the_gdt() {
        let cs64 = segment(GDT[2], 0x10);
        assert_eq!(
            (cs64.l, cs64.db, cs64.type_, cs64.present, cs64.s),
            (1, 0, 0xb, 1, 1)
        );
        assert_eq!(cs64.limit, 0xffff_ffff);
        let cs32 = segment(GDT[1], 0x08);
        assert_eq!((cs32.l, cs32.db, cs32.base), (0, 1, 0));
        let tss = segment(GDT[4], 0x20);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
    }

    #[test]
    fn rejects_garbage_and_truncated_images() {
        let mem = create_ram(16 << 20).unwrap();
        let garbage = KernelImage::Embedded("garbage", &[0x55; 4096]);
        let e = load(&mem, 16 << 20, &garbage, None, "", 1).unwrap_err();
        assert!(matches!(e, BootError::KernelFormat(..)), "{e}");
        let elf_head = KernelImage::Embedded("short-elf", b"\x7fELF\x02\x01\x01");
        let e = load(&mem, 16 << 20, &elf_head, None, "", 1).unwrap_err();
        assert!(e.to_string().contains("truncated ELF header"), "{e}");
        let empty = KernelImage::Embedded("empty", &[]);
        assert!(load(&mem, 16 << 20, &empty, None, "", 1).is_err());
    }

    #[test]
    fn rejects_old_bzimage_and_nul_cmdline() {
        let mem = create_ram(16 << 20).unwrap();
        let mut old = vec![0u8; 4096];
        old[0x202..0x206].copy_from_slice(b"HdrS");
        old[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
        let leaked: &'static [u8] = Box::leak(old.into_boxed_slice());
        let e = load(
            &mem,
            16 << 20,
            &KernelImage::Embedded("old", leaked),
            None,
            "",
            1,
        )
        .unwrap_err();
        assert!(e.to_string().contains("no 64-bit entry point"), "{e}");
        let e = load(
            &mem,
            16 << 20,
            &KernelImage::Embedded("old", leaked),
            None,
            "a\0b",
            1,
        )
        .unwrap_err();
        assert!(matches!(e, BootError::CmdlineNul));
    }

    #[test]
    fn elf_segment_below_1mib_is_refused() {
        // Minimal ELF64 x86-64 header + one PT_LOAD at 0x1000.
        let mut elf = vec![0u8; 64 + 56];
        elf[0..4].copy_from_slice(b"\x7fELF");
        (elf[4], elf[5], elf[6]) = (2, 1, 1);
        elf[16..18].copy_from_slice(&2u16.to_le_bytes());
        elf[18..20].copy_from_slice(&62u16.to_le_bytes());
        elf[32..40].copy_from_slice(&64u64.to_le_bytes());
        elf[52..54].copy_from_slice(&64u16.to_le_bytes());
        elf[54..56].copy_from_slice(&56u16.to_le_bytes());
        elf[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut elf[64..];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes());
        ph[24..32].copy_from_slice(&0x1000u64.to_le_bytes());
        ph[32..40].copy_from_slice(&16u64.to_le_bytes());
        ph[40..48].copy_from_slice(&16u64.to_le_bytes());
        let leaked: &'static [u8] = Box::leak(elf.into_boxed_slice());
        let mem = create_ram(16 << 20).unwrap();
        let e = load(
            &mem,
            16 << 20,
            &KernelImage::Embedded("low", leaked),
            None,
            "",
            1,
        )
        .unwrap_err();
        assert!(e.to_string().contains("below 1 MiB"), "{e}");
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let dir = std::env::temp_dir().join(format!("wv-initrd-{}", std::process::id()));
        std::fs::write(&dir, vec![7u8; 10_000]).unwrap();
        let mem = create_ram(16 << 20).unwrap();
        let (addr, size) = load_initrd(&mem, &dir, 2 << 20, 16 << 20).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr % 4096, 0);
        assert!(addr + size <= 16 << 20 && addr >= 2 << 20);
        let e = load_initrd(&mem, &dir, (16 << 20) - 4096, 16 << 20).unwrap_err();
        assert!(matches!(e, BootError::InitrdTooBig { .. }));
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn boot_structures_reach_guest_memory_byte_for_byte() {
        let mem = create_ram(16 << 20).unwrap();
        let map = [
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: 1,
            },
            E820Entry {
                addr: 1 << 20,
                size: 15 << 20,
                kind: 1,
            },
        ];
        write_start_info(&mem, Some((0x40_0000, 0x1234)), &map).unwrap();
        let u32_at = |a: u64| mem.read_obj::<u32>(GuestAddress(a)).unwrap();
        let u64_at = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        // hvm_start_info: magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap,
        // memmap_entries.
        assert_eq!((u32_at(PVH_INFO), u32_at(PVH_INFO + 12)), (0x336e_c578, 1));
        assert_eq!(u64_at(PVH_INFO + 16), PVH_MODLIST);
        assert_eq!(u64_at(PVH_INFO + 24), CMDLINE);
        assert_eq!(u64_at(PVH_INFO + 40), PVH_MEMMAP);
        assert_eq!(u32_at(PVH_INFO + 48), 2);
        assert_eq!(
            (u64_at(PVH_MODLIST), u64_at(PVH_MODLIST + 8)),
            (0x40_0000, 0x1234)
        );
        let second = PVH_MEMMAP + 24;
        assert_eq!((u64_at(second), u64_at(second + 8)), (1 << 20, 15 << 20));
        assert_eq!(u32_at(second + 16), 1);
        write_zero_page(&mem, Default::default(), 10, None, &map).unwrap();
        // boot_params: e820_entries at 0x1e8, boot_flag at 0x1fe, the HdrS magic at 0x202,
        // cmd_line_ptr at 0x228, the second e820 entry at 0x2d0 + 20.
        let zp = ZERO_PAGE;
        assert_eq!(mem.read_obj::<u8>(GuestAddress(zp + 0x1e8)).unwrap(), 2);
        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(zp + 0x1fe)).unwrap(),
            0xaa55
        );
        assert_eq!(u32_at(zp + 0x202), 0x5372_6448);
        assert_eq!(u32_at(zp + 0x228), CMDLINE as u32);
        assert_eq!(u64_at(zp + 0x2d0 + 20), 1 << 20);
    }
}
