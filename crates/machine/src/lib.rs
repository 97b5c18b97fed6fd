//! The x86-64 machine model: where things live in guest-physical memory, the e820 map, the MP
//! table that tells the guest its processors, and the two ways in for a kernel (the Linux 64-bit
//! boot protocol for bzImages, PVH for ELF images), down to the vCPU register state at entry.
//!
//! Everything here is pure data layout on top of a `GuestMemoryMmap`: no KVM calls, so all of
//! it is unit-tested without `/dev/kvm`.

pub mod acpi;
pub mod boot;
pub mod e820;
pub mod layout;
pub mod memory;
pub mod mptable;

pub use boot::{load, BootEntry, BootError, BootProtocol, KernelImage, LoadedGuest};
pub use memory::{
    copy_ram, create_ram, create_shared_ram, is_shared, map_ram_file, GuestMemoryMmap, GuestRam,
    MemoryError,
};
