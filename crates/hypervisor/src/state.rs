//! The state KVM holds for a VM and its vCPUs, read out into plain serialisable values and written
//! back: what a snapshot, a restore and a migration carry besides memory and devices.
//!
//! Every KVM structure is kept as its exact bytes (the kernel's x86-64 ABI layout, little-endian;
//! [`Raw`], [`Blob`]): no host pointer or address is in it, and it serialises as hex text in a
//! human-readable format (JSON) and as a byte string in a binary one. Reading one back checks its
//! size: a truncated or oversized structure is an error, never zero-padded or cut.
//!
//! Time across a save and restore:
//! - The KVM clock (kvmclock, `KVM_GET_CLOCK`) is set back to the saved value by [`restore_vm`],
//!   so a guest that uses kvmclock sees no time pass while it was paused or on the wire; its wall
//!   clock falls behind by that much until it corrects it (NTP, or the guest agent), as with QEMU.
//!   `KVM_CLOCK_REALTIME`, which would advance the clock by the host's wall time elapsed since the
//!   save, is deliberately not passed back.
//! - The TSC is saved as `MSR_IA32_TSC` with the other MSRs. KVM turns a write of it from the VMM
//!   into a TSC offset, so the restored guest's TSC resumes at the saved value: it does not jump
//!   by the pause either. Before that write, [`restore_vcpu`] makes the vCPU's TSC run at the saved
//!   rate (`KVM_SET_TSC_KHZ`, only when the host's differs by more than 250 ppm, as QEMU and
//!   Firecracker allow), so a guest calibrated on one host keeps its rate on another; a host that
//!   cannot scale refuses such a restore with an error. vCPUs restored together within a second of
//!   each other with TSCs that agree are kept in step by KVM's TSC synchronisation.
//!   `MSR_IA32_TSC_DEADLINE` is written after the TSC, so an armed deadline timer stays armed.
//!   On a PVM host (no VMX/SVM) none of this holds: KVM accepts the TSC write and does not offset
//!   the guest's TSC, which is the host's ([`guest_tsc_is_host_tsc`]), so a restored guest's TSC
//!   shows the pause (and on another host, that host's count); `KVM_SET_TSC_KHZ` fails there
//!   (EINVAL), so only a host of the same TSC rate can restore. kvmclock is kept continuous there
//!   too.
//!
//! CPUID is not part of [`VcpuState`]: the VMM sets the vCPU's CPUID from its template
//! ([`crate::vcpu::VcpuTemplate::configure`]) before [`restore_vcpu`], as it does at boot (which
//! MSRs, XCR0 bits and CR4 bits KVM accepts depends on it).
//!
//! Order of use, as KVM requires:
//! - save: stop every vCPU at a `KVM_RUN` boundary (none may run while any is saved: vCPU events
//!   and the LAPIC are shared with the others), call [`complete_pending_exit`] on each so an I/O
//!   exit the VMM just handled is finished inside KVM, then [`save_vcpu`] for each and
//!   [`save_vm`]. [`notify_paused`] on each vCPU when it stays paused for a while.
//! - restore: create the VM as for a boot (memory, TSS, irqchip, PIT), each vCPU with its CPUID
//!   template, then [`restore_vm`] and [`restore_vcpu`] for each, then run.

use crate::kvm::HvError;
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_ioapic_state, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pic_state, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, Xsave, KVM_CLOCK_REALTIME, KVM_MAX_MSR_ENTRIES,
    KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::mem::size_of;
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// `IA32_TIME_STAMP_COUNTER`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_TSC_DEADLINE`: written after the TSC it is compared with.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// `KVM_IRQCHIP_PIC_MASTER`, `KVM_IRQCHIP_PIC_SLAVE`, `KVM_IRQCHIP_IOAPIC`.
const CHIP_PIC_MASTER: u32 = 0;
const CHIP_PIC_SLAVE: u32 = 1;
const CHIP_IOAPIC: u32 = 2;

/// The fixed part of an XSAVE area: the legacy region and the XSAVE header.
const XSAVE_LEGACY_AND_HEADER: usize = 576;
const XSTATE_BV: usize = 512;
const XCOMP_BV: usize = 520;

/// More MSRs than a saved state can hold: KVM lists a few dozen to a few hundred.
const MAX_MSRS: usize = 4096;

/// TSC rates closer than this (parts per million) are the same rate (boot-time calibration
/// differs between hosts of one model), as QEMU and Firecracker judge it.
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

// ---------------------------------------------------------------------------------------------
// Encoding

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return Err(format!("odd number of hex digits ({})", s.len()));
    }
    s.chunks_exact(2)
        .enumerate()
        .map(|(i, p)| match (nibble(p[0]), nibble(p[1])) {
            (Some(h), Some(l)) => Ok((h << 4) | l),
            _ => Err(format!("not a hex digit at offset {}", 2 * i)),
        })
        .collect()
}

fn serialize_bytes<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    if s.is_human_readable() {
        s.serialize_str(&hex(bytes))
    } else {
        s.serialize_bytes(bytes)
    }
}

/// Reads what [`serialize_bytes`] wrote: hex text, a byte string, or a sequence of bytes (how
/// some formats carry byte strings).
fn deserialize_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    struct BytesVisitor;
    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("bytes as a hex string or a byte string")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
            unhex(v).map_err(E::custom)
        }
        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // The hint comes from the input: cap what it may make us reserve.
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
            while let Some(b) = seq.next_element::<u8>()? {
                v.push(b);
            }
            Ok(v)
        }
    }
    if d.is_human_readable() {
        d.deserialize_str(BytesVisitor)
    } else {
        d.deserialize_byte_buf(BytesVisitor)
    }
}

fn short_type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    full.rsplit("::").next().unwrap_or(full)
}

/// A fixed-size KVM structure, kept as its exact bytes. Deserialising refuses any other length.
#[derive(Clone, Copy)]
pub struct Raw<T>(pub T);

impl<T: IntoBytes + Immutable> Raw<T> {
    /// The structure's bytes, as KVM reads and writes them.
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl<T: FromBytes> Raw<T> {
    /// The structure from exactly `size_of::<T>()` bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Raw<T>, String> {
        T::read_from_bytes(bytes).map(Raw).map_err(|_| {
            format!(
                "{}: {} bytes, expected {}",
                short_type_name::<T>(),
                bytes.len(),
                size_of::<T>()
            )
        })
    }
}

impl<T> std::ops::Deref for Raw<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> std::ops::DerefMut for Raw<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: IntoBytes + Immutable> PartialEq for Raw<T> {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl<T: IntoBytes + Immutable> fmt::Debug for Raw<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", short_type_name::<T>(), hex(self.as_bytes()))
    }
}

impl<T: IntoBytes + Immutable> Serialize for Raw<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_bytes(self.as_bytes(), s)
    }
}

impl<'de, T: FromBytes> Deserialize<'de> for Raw<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Raw::from_bytes(&deserialize_bytes(d)?).map_err(de::Error::custom)
    }
}

/// A variable-size KVM structure (the XSAVE area) as its bytes; checked against the host when
/// written back.
#[derive(Clone, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blob({})", hex(&self.0))
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_bytes(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deserialize_bytes(d).map(Blob)
    }
}

/// The x87/SSE state of `KVM_GET_FPU`, field by field (`kvm_fpu` has no byte view).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fpu {
    /// ST0-ST7 / MM0-MM7, 10 bytes used of each 16.
    pub fpr: [[u8; 16]; 8],
    /// FPU control word.
    pub fcw: u16,
    /// FPU status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM0-XMM15.
    pub xmm: [[u8; 16]; 16],
    /// SSE control and status.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for Fpu {
    fn from(f: &kvm_fpu) -> Fpu {
        Fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&Fpu> for kvm_fpu {
    fn from(f: &Fpu) -> kvm_fpu {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// vCPU

/// Everything KVM holds for one vCPU, independent of the host process (no pointers).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: Raw<kvm_regs>,
    /// Segments, descriptor tables, control registers, EFER, APIC base, pending interrupt bitmap.
    pub sregs: Raw<kvm_sregs>,
    /// x87 and SSE registers. Written back only when there is no `xsave`: the XSAVE area holds
    /// the same registers and is what the guest gets (KVM_SET_FPU does not mark what it writes
    /// in use in the XSAVE header, so with XSAVE the values it writes may never reach the guest;
    /// measured: XMM3 set with KVM_SET_FPU reads back as 0 from KVM_GET_XSAVE).
    pub fpu: Fpu,
    /// The XSAVE area (`KVM_GET_XSAVE2`, or `KVM_GET_XSAVE`'s 4 KiB), when the host has
    /// `KVM_CAP_XSAVE`.
    pub xsave: Option<Blob>,
    /// Extended control registers (XCR0), when the host has `KVM_CAP_XCRS`.
    pub xcrs: Option<Raw<kvm_xcrs>>,
    /// (index, value) of every MSR in `KVM_GET_MSR_INDEX_LIST` that this vCPU reads back, in that
    /// list's order; `MSR_IA32_TSC` among them.
    pub msrs: Vec<(u32, u64)>,
    /// The local APIC's 1 KiB register page.
    pub lapic: Raw<kvm_lapic_state>,
    /// `KVM_MP_STATE_*`.
    pub mp_state: u32,
    /// Pending exception, interrupt, NMI, SMI; interrupt shadow.
    pub vcpu_events: Raw<kvm_vcpu_events>,
    /// DR0-DR3, DR6, DR7.
    pub debugregs: Raw<kvm_debugregs>,
    /// The guest's TSC rate, when KVM tells it (`KVM_GET_TSC_KHZ`).
    pub tsc_khz: Option<u32>,
}

/// How large a buffer `KVM_GET_XSAVE2` / `KVM_SET_XSAVE` use on this host, or `None` without
/// `KVM_CAP_XSAVE`.
pub fn xsave_size(kvm: &Kvm) -> Option<usize> {
    if !kvm.check_extension(Cap::Xsave) {
        return None;
    }
    let v2 = usize::try_from(kvm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
    Some(v2.max(size_of::<kvm_xsave>()))
}

/// An [`Xsave`] whose buffer holds `size` bytes or more.
fn xsave_buffer(size: usize) -> Result<Xsave, HvError> {
    let extra = size
        .saturating_sub(size_of::<kvm_xsave>())
        .div_ceil(size_of::<u32>());
    Xsave::new(extra).map_err(|_| HvError::State(format!("XSAVE area of {size} bytes too large")))
}

/// The bytes of an XSAVE buffer: its 4 KiB region and the extension KVM_CAP_XSAVE2 added.
fn xsave_bytes(x: &Xsave, size: usize) -> Vec<u8> {
    let fam = x.as_fam_struct_ref();
    let mut v = Vec::with_capacity(size);
    v.extend_from_slice(fam.xsave.region.as_bytes());
    v.extend_from_slice(x.as_slice().as_bytes());
    v.truncate(size);
    v
}

fn read_xsave(kvm: &Kvm, fd: &VcpuFd) -> Result<Option<Blob>, HvError> {
    let Some(size) = xsave_size(kvm) else {
        return Ok(None);
    };
    if kvm.check_extension_int(Cap::Xsave2) > 0 {
        let mut x = xsave_buffer(size)?;
        // SAFETY: `x` holds at least the size KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) reported, and
        // this process requests no further XSTATE permission (arch_prctl) that could enlarge it.
        unsafe { fd.get_xsave2(&mut x) }.map_err(|e| HvError::Ioctl("KVM_GET_XSAVE2", e))?;
        Ok(Some(Blob(xsave_bytes(&x, size))))
    } else {
        let x = fd
            .get_xsave()
            .map_err(|e| HvError::Ioctl("KVM_GET_XSAVE", e))?;
        Ok(Some(Blob(x.region.as_bytes().to_vec())))
    }
}

/// Checks a saved XSAVE area against this host before KVM sees it: at least the fixed 4 KiB,
/// no more than this host's KVM takes, standard (not compacted) format, and long enough for
/// every state component its XSTATE_BV says it holds (offsets from this CPU's CPUID leaf 0xD,
/// the layout KVM uses).
fn check_xsave(bytes: &[u8], host_size: usize) -> Result<(), HvError> {
    let bad = |why: String| Err(HvError::State(format!("saved XSAVE area: {why}")));
    let len = bytes.len();
    if len < size_of::<kvm_xsave>() {
        return bad(format!(
            "{len} bytes, less than the {} every XSAVE area has",
            size_of::<kvm_xsave>()
        ));
    }
    if len > host_size {
        return bad(format!(
            "{len} bytes, more than this host's KVM takes ({host_size}): saved on a CPU with \
             more XSAVE state"
        ));
    }
    if !len.is_multiple_of(size_of::<u32>()) {
        return bad(format!("{len} bytes, not a whole number of 32-bit words"));
    }
    let word = |o: usize| u64::from_le_bytes(std::array::from_fn(|i| bytes[o + i]));
    let (xstate_bv, xcomp_bv) = (word(XSTATE_BV), word(XCOMP_BV));
    if xcomp_bv & (1 << 63) != 0 {
        return bad(format!(
            "compacted format (XCOMP_BV {xcomp_bv:#x}), KVM uses the standard one"
        ));
    }
    for i in 2..63u32 {
        if xstate_bv & (1 << i) == 0 {
            continue;
        }
        // Leaf 0xD sub-leaf i: EAX size, EBX offset of state component i (standard format).
        let leaf = std::arch::x86_64::__cpuid_count(0xd, i);
        let (size, offset) = (leaf.eax as usize, leaf.ebx as usize);
        if size == 0 {
            return bad(format!(
                "holds state component {i} (XSTATE_BV {xstate_bv:#x}), which this CPU lacks"
            ));
        }
        if offset < XSAVE_LEGACY_AND_HEADER || offset + size > len {
            return bad(format!(
                "truncated: state component {i} ends at byte {}, the area has {len}",
                offset + size
            ));
        }
    }
    Ok(())
}

fn write_xsave(fd: &VcpuFd, bytes: &[u8], host_size: usize) -> Result<(), HvError> {
    let mut x = xsave_buffer(host_size)?;
    let region = size_of::<kvm_xsave>();
    // SAFETY: only the XSAVE region is written through this reference, never the `len` field.
    let fam = unsafe { x.as_mut_fam_struct() };
    // `check_xsave` made sure that region <= bytes.len() <= host_size, the buffer's size.
    fam.xsave.region.as_mut_bytes()[..region].copy_from_slice(&bytes[..region]);
    x.as_mut_slice().as_mut_bytes()[..bytes.len() - region].copy_from_slice(&bytes[region..]);
    // SAFETY: the buffer holds the `host_size` bytes KVM reads (KVM_CAP_XSAVE2's size, or 4 KiB
    // without it); the bytes past the saved area are zero, i.e. components in their init state.
    unsafe { fd.set_xsave2(&x) }.map_err(|e| HvError::Ioctl("KVM_SET_XSAVE", e))
}

/// Reads the MSRs of `indices` this vCPU has, skipping those KVM refuses to read (KVM_GET_MSRS
/// stops at the first failure and says how many it read).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, HvError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut pos = 0;
    while pos < indices.len() {
        let chunk = &indices[pos..indices.len().min(pos + KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msrs_from(&entries)?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|e| HvError::Ioctl("KVM_GET_MSRS", e))?
            .min(chunk.len());
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        pos += n;
        if n < chunk.len() {
            pos += 1; // entry n is the one KVM could not read: leave it out
        }
    }
    Ok(out)
}

fn msrs_from(entries: &[kvm_msr_entry]) -> Result<Msrs, HvError> {
    Msrs::from_entries(entries)
        .map_err(|_| HvError::State(format!("{} MSRs in one request", entries.len())))
}

fn write_msrs(fd: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), HvError> {
    for chunk in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let n = fd
            .set_msrs(&msrs_from(&entries)?)
            .map_err(|e| HvError::Ioctl("KVM_SET_MSRS", e))?;
        if let Some((index, data)) = chunk.get(n) {
            return Err(HvError::State(format!(
                "this host's KVM refuses MSR {index:#x} = {data:#x}"
            )));
        }
    }
    Ok(())
}

/// Finishes, inside KVM, the exit the vCPU last returned (an I/O or MMIO access the VMM has
/// handled completes only when KVM_RUN is entered again): KVM_RUN with `immediate_exit` set,
/// which completes it and returns at once without running guest code. Call it on a stopped
/// vCPU before [`save_vcpu`], or the saved state is the one before that instruction finished.
pub fn complete_pending_exit(fd: &mut VcpuFd) -> Result<(), HvError> {
    fd.set_kvm_immediate_exit(1);
    let outcome = match fd.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(HvError::Ioctl("KVM_RUN (completing the last exit)", e)),
        Ok(exit) => Err(HvError::State(format!(
            "KVM_RUN with immediate_exit returned an exit ({exit:?}) instead of EINTR"
        ))),
    };
    fd.set_kvm_immediate_exit(0);
    outcome
}

/// Reads the state of a stopped vCPU (see the module doc for the order around it). The order of
/// the reads is Firecracker's: MP state first (reading it lets KVM accept pending INIT/SIPI,
/// which changes other state), vCPU events last.
pub fn save_vcpu(kvm: &Kvm, fd: &VcpuFd) -> Result<VcpuState, HvError> {
    let io = |what| move |e| HvError::Ioctl(what, e);
    let mp_state = fd.get_mp_state().map_err(io("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(io("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(io("KVM_GET_SREGS"))?;
    let fpu = fd.get_fpu().map_err(io("KVM_GET_FPU"))?;
    let xsave = read_xsave(kvm, fd)?;
    let xcrs = if kvm.check_extension(Cap::Xcrs) {
        Some(Raw(fd.get_xcrs().map_err(io("KVM_GET_XCRS"))?))
    } else {
        None
    };
    let debugregs = fd.get_debug_regs().map_err(io("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(io("KVM_GET_LAPIC"))?;
    let tsc_khz = fd.get_tsc_khz().ok();
    let index = kvm
        .get_msr_index_list()
        .map_err(io("KVM_GET_MSR_INDEX_LIST"))?;
    let msrs = read_msrs(fd, index.as_slice())?;
    let vcpu_events = fd.get_vcpu_events().map_err(io("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        regs: Raw(regs),
        sregs: Raw(sregs),
        fpu: Fpu::from(&fpu),
        xsave,
        xcrs,
        msrs,
        lapic: Raw(lapic),
        mp_state: mp_state.mp_state,
        vcpu_events: Raw(vcpu_events),
        debugregs: Raw(debugregs),
        tsc_khz,
    })
}

/// Whether two TSC rates differ by more than calibration noise.
fn tsc_rates_differ(a: u32, b: u32) -> bool {
    let diff = u64::from(a.abs_diff(b));
    diff * 1_000_000 > u64::from(a) * TSC_KHZ_TOLERANCE_PPM
}

/// Writes a saved state into a vCPU of a new VM whose CPUID is already set (the VMM's template).
/// What can be checked before writing (sizes, counts, what this host's KVM supports) is checked
/// first: on such an error nothing has been written. The order of the writes is what KVM
/// requires (and Firecracker and QEMU do): the TSC rate before the TSC; MP state, registers,
/// then special registers (which carry the APIC base) before the LAPIC; the XSAVE area (or the
/// FPU registers without one) and XCRs; the LAPIC before the MSRs (the TSC deadline needs it),
/// the TSC before the TSC deadline; vCPU events last, as setting the registers clears a pending
/// exception. Finally the guest is told it was paused ([`notify_paused`]).
pub fn restore_vcpu(kvm: &Kvm, fd: &VcpuFd, s: &VcpuState) -> Result<(), HvError> {
    let io = |what| move |e| HvError::Ioctl(what, e);
    let xsave = match (&s.xsave, xsave_size(kvm)) {
        (Some(x), Some(host)) => {
            check_xsave(&x.0, host)?;
            Some((x, host))
        }
        (Some(_), None) => {
            return Err(HvError::State(
                "the state has an XSAVE area and this host's KVM has no KVM_CAP_XSAVE".into(),
            ))
        }
        (None, _) => None,
    };
    if s.msrs.len() > MAX_MSRS {
        return Err(HvError::State(format!(
            "{} MSRs, more than any KVM lists ({MAX_MSRS} at most)",
            s.msrs.len()
        )));
    }
    if s.xcrs.is_some() && !kvm.check_extension(Cap::Xcrs) {
        return Err(HvError::State(
            "the state has XCRs and this host's KVM has no KVM_CAP_XCRS".into(),
        ));
    }

    if let Some(khz) = s.tsc_khz {
        let here = fd.get_tsc_khz().map_err(io("KVM_GET_TSC_KHZ"))?;
        if tsc_rates_differ(khz, here) {
            fd.set_tsc_khz(khz).map_err(|e| {
                HvError::State(format!(
                    "the guest's TSC ran at {khz} kHz and this host's runs at {here} kHz; its \
                     KVM cannot scale it (KVM_SET_TSC_KHZ: {e})"
                ))
            })?;
        }
    }
    fd.set_mp_state(kvm_mp_state {
        mp_state: s.mp_state,
    })
    .map_err(io("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(io("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(io("KVM_SET_SREGS"))?;
    match xsave {
        Some((x, host)) => write_xsave(fd, &x.0, host)?,
        None => fd
            .set_fpu(&kvm_fpu::from(&s.fpu))
            .map_err(io("KVM_SET_FPU"))?,
    }
    if let Some(xcrs) = &s.xcrs {
        fd.set_xcrs(xcrs).map_err(io("KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&s.debugregs)
        .map_err(io("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(io("KVM_SET_LAPIC"))?;
    let (deferred, first): (Vec<_>, Vec<_>) = s
        .msrs
        .iter()
        .partition(|(i, _)| *i == MSR_IA32_TSC_DEADLINE);
    write_msrs(fd, &first)?;
    write_msrs(fd, &deferred)?;
    let mut events = *s.vcpu_events;
    // KVM_GET_VCPU_EVENTS does not flag these fields valid; without the flags KVM_SET ignores
    // them and a pending NMI or an AP's SIPI vector would be lost (QEMU sets them the same way).
    events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
    fd.set_vcpu_events(&events)
        .map_err(io("KVM_SET_VCPU_EVENTS"))?;
    notify_paused(fd)
}

/// Whether this vCPU's TSC is the host's TSC, whatever was written to `MSR_IA32_TSC`: so on a
/// PVM host, whose KVM accepts the write and does not offset the guest's TSC (measured on Linux
/// 6.18 PVM). There, a restored guest's TSC shows the pause and, across hosts, another host's
/// count. With VMX or SVM the guest's TSC is offset (a new VM's starts near 0), and this is false.
pub fn guest_tsc_is_host_tsc(fd: &VcpuFd) -> Result<bool, HvError> {
    let mut m = msrs_from(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }])?;
    // SAFETY: RDTSC exists on every x86-64 CPU and has no side effects.
    let before = unsafe { std::arch::x86_64::_rdtsc() };
    let n = fd
        .get_msrs(&mut m)
        .map_err(|e| HvError::Ioctl("KVM_GET_MSRS", e))?;
    // SAFETY: as above.
    let after = unsafe { std::arch::x86_64::_rdtsc() };
    if n != 1 {
        return Err(HvError::State("KVM does not read MSR_IA32_TSC".into()));
    }
    Ok((before..=after).contains(&m.as_slice()[0].data))
}

/// Tells KVM the guest was paused (`KVM_KVMCLOCK_CTRL`), so a guest that uses kvmclock does not
/// take the pause for a soft lockup. EINVAL (the guest has not enabled kvmclock) is not an error.
pub fn notify_paused(fd: &VcpuFd) -> Result<(), HvError> {
    match fd.kvmclock_ctrl() {
        Err(e) if e.errno() == libc::EINVAL => Ok(()),
        r => r.map_err(|e| HvError::Ioctl("KVM_KVMCLOCK_CTRL", e)),
    }
}

// ---------------------------------------------------------------------------------------------
// VM

/// What KVM holds for the whole VM: the in-kernel interrupt controllers, the PIT and the clock.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259.
    pub pic_master: Raw<kvm_pic_state>,
    /// The slave 8259.
    pub pic_slave: Raw<kvm_pic_state>,
    /// The IOAPIC.
    pub ioapic: Raw<kvm_ioapic_state>,
    /// The 8254 PIT (`KVM_GET_PIT2`).
    pub pit: Raw<kvm_pit_state2>,
    /// The KVM clock (`KVM_GET_CLOCK`) with the flags KVM returned.
    pub clock: Raw<kvm_clock_data>,
}

const CHIP_OFFSET: usize = std::mem::offset_of!(kvm_irqchip, chip);

fn get_chip<T: FromBytes>(vm: &VmFd, chip_id: u32) -> Result<Raw<T>, HvError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(|e| HvError::Ioctl("KVM_GET_IRQCHIP", e))?;
    let (v, _) = T::read_from_prefix(&chip.as_bytes()[CHIP_OFFSET..])
        .map_err(|_| HvError::State("irqchip state larger than kvm_irqchip".into()))?;
    Ok(Raw(v))
}

fn set_chip<T: IntoBytes + Immutable>(vm: &VmFd, chip_id: u32, s: &Raw<T>) -> Result<(), HvError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    let bytes = s.as_bytes();
    chip.as_mut_bytes()
        .get_mut(CHIP_OFFSET..CHIP_OFFSET + bytes.len())
        .ok_or_else(|| HvError::State("irqchip state larger than kvm_irqchip".into()))?
        .copy_from_slice(bytes);
    vm.set_irqchip(&chip)
        .map_err(|e| HvError::Ioctl("KVM_SET_IRQCHIP", e))
}

/// Reads the VM-wide state; every vCPU must be stopped.
pub fn save_vm(vm: &VmFd) -> Result<VmState, HvError> {
    Ok(VmState {
        pic_master: get_chip(vm, CHIP_PIC_MASTER)?,
        pic_slave: get_chip(vm, CHIP_PIC_SLAVE)?,
        ioapic: get_chip(vm, CHIP_IOAPIC)?,
        pit: Raw(vm
            .get_pit2()
            .map_err(|e| HvError::Ioctl("KVM_GET_PIT2", e))?),
        clock: Raw(vm
            .get_clock()
            .map_err(|e| HvError::Ioctl("KVM_GET_CLOCK", e))?),
    })
}

/// Writes the VM-wide state into a new VM that has its irqchip and PIT, before its vCPUs run.
/// The clock is set to the saved value (no `KVM_CLOCK_REALTIME`: see the module doc), so guest
/// time does not jump by the time between save and restore. The PIT's channels restart counting
/// from their saved count at restore (KVM keeps no host time from the saved state).
pub fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), HvError> {
    set_chip(vm, CHIP_PIC_MASTER, &s.pic_master)?;
    set_chip(vm, CHIP_PIC_SLAVE, &s.pic_slave)?;
    set_chip(vm, CHIP_IOAPIC, &s.ioapic)?;
    vm.set_pit2(&s.pit)
        .map_err(|e| HvError::Ioctl("KVM_SET_PIT2", e))?;
    let mut clock = *s.clock;
    clock.flags &= !KVM_CLOCK_REALTIME;
    vm.set_clock(&clock)
        .map_err(|e| HvError::Ioctl("KVM_SET_CLOCK", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let b: Vec<u8> = (0..=255).collect();
        assert_eq!(unhex(&hex(&b)).unwrap(), b);
        assert_eq!(unhex("0A0b").unwrap(), vec![10, 11]);
        assert!(unhex("abc").unwrap_err().contains("odd"));
        assert!(unhex("zz").unwrap_err().contains("hex digit"));
    }

    #[test]
    fn raw_refuses_a_wrong_size() {
        let lapic = Raw(kvm_lapic_state::default());
        assert_eq!(lapic.as_bytes().len(), 1024);
        let e = Raw::<kvm_lapic_state>::from_bytes(&[0; 1000]).unwrap_err();
        assert_eq!(e, "kvm_lapic_state: 1000 bytes, expected 1024");
        assert!(Raw::<kvm_lapic_state>::from_bytes(&[0; 1025]).is_err());
        assert!(Raw::<kvm_lapic_state>::from_bytes(&[0; 1024]).is_ok());
    }

    #[test]
    fn tsc_rate_tolerance() {
        assert!(!tsc_rates_differ(2_000_000, 2_000_000));
        assert!(!tsc_rates_differ(2_000_000, 2_000_400)); // 200 ppm
        assert!(tsc_rates_differ(2_000_000, 2_000_600)); // 300 ppm
        assert!(tsc_rates_differ(2_000_000, 3_000_000));
    }

    #[test]
    fn xsave_checks() {
        let ok = vec![0u8; 4096];
        assert!(check_xsave(&ok, 4096).is_ok());
        let e = check_xsave(&ok[..4000], 4096).unwrap_err().to_string();
        assert!(e.contains("4000 bytes, less than"), "{e}");
        let e = check_xsave(&[0; 8192], 4096).unwrap_err().to_string();
        assert!(e.contains("more than this host"), "{e}");
        let e = check_xsave(&[0; 4098], 8192).unwrap_err().to_string();
        assert!(e.contains("whole number"), "{e}");
        let mut compacted = ok.clone();
        compacted[XCOMP_BV + 7] = 0x80;
        assert!(check_xsave(&compacted, 4096)
            .unwrap_err()
            .to_string()
            .contains("compacted"));
        // A component past the end of the area: bit 62 is not defined on any CPU (size 0), so
        // it is refused either way; AVX (bit 2, at 576 + 256 bytes) fits in 4 KiB.
        let mut foreign = ok.clone();
        foreign[XSTATE_BV + 7] = 0x40;
        assert!(check_xsave(&foreign, 4096).is_err());
        let mut avx = ok.clone();
        avx[XSTATE_BV] = 0x7;
        let has_avx = std::arch::x86_64::__cpuid_count(0xd, 2).eax != 0;
        assert_eq!(check_xsave(&avx, 4096).is_ok(), has_avx);
    }
}
