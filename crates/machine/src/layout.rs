//! Guest-physical memory layout. Low memory holds the boot structures the VMM writes; RAM above
//! 1 MiB belongs to the kernel; [`MMIO_HOLE_START`]..4 GiB is left for devices, and RAM beyond
//! it continues at 4 GiB.

/// Boot GDT (for both protocols).
pub const BOOT_GDT: u64 = 0x500;
/// Boot IDT (empty; the guest installs its own before enabling interrupts).
pub const BOOT_IDT: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO: u64 = 0x6000;
/// PVH module list (one entry: the initrd).
pub const PVH_MODLIST: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP: u64 = 0x6100;
/// Most PVH memory map entries (they fit before the zero page).
pub const PVH_MEMMAP_MAX: usize = 64;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer for the 64-bit Linux entry.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity-map page tables for the 64-bit Linux entry: PML4, PDPT, then 4 PDs (4 GiB).
pub const PML4: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT: u64 = 0xa000;
/// First of four page directories.
pub const PD: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x2_0000;
/// Longest command line (including the terminating NUL) the layout has room for.
pub const CMDLINE_MAX: usize = 0x1_0000;
/// Extended BIOS data area: the MP table lives in its last KiB, where guests look first.
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of the legacy VGA/BIOS hole.
pub const LEGACY_HOLE_START: u64 = 0xa_0000;
/// BIOS area (reserved in the e820 map).
pub const BIOS_START: u64 = 0xf_0000;
/// Start of high memory: kernels load here or above.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (PCI, I/O APIC, local APIC, KVM's TSS).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole; RAM continues here.
pub const MMIO_HOLE_END: u64 = 1 << 32;
/// PCI BARs are allocated from the MMIO hole up to here.
pub const PCI_MMIO_END: u64 = 0xe000_0000;
/// The ECAM window of PCI bus 0 (1 MiB), named by the ACPI MCFG table.
pub const ECAM_BASE: u64 = 0xe000_0000;
/// The ECAM window's size (bus 0 only).
pub const ECAM_SIZE: u64 = 1 << 20;
/// I/O APIC MMIO base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM's three-page TSS area (KVM_SET_TSS_ADDR), inside the hole.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity-map page (KVM_SET_IDENTITY_MAP_ADDR), just below the TSS.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Smallest guest RAM we accept: the layout above plus room for a small kernel.
pub const MIN_MEMORY: u64 = 4 << 20;

/// RAM below the hole for `mem` bytes of guest RAM.
pub fn low_ram(mem: u64) -> u64 {
    mem.min(MMIO_HOLE_START)
}

/// RAM above 4 GiB for `mem` bytes of guest RAM.
pub fn high_ram(mem: u64) -> u64 {
    mem.saturating_sub(MMIO_HOLE_START)
}
