//! Finding the processors (MP table, else ACPI MADT) and starting the application processors
//! the way real hardware does: INIT, then STARTUP IPIs to a real-mode trampoline.

use crate::cpu::{self, lapic};
use crate::entry;
use crate::sync::Global;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Most CPUs the probe handles.
pub const MAX_CPUS: usize = 64;

/// The processors found.
pub struct CpuList {
    /// APIC IDs of enabled processors.
    pub apic_ids: [u32; MAX_CPUS],
    /// Entries used.
    pub count: usize,
    /// Where they were found ("mptable" or "madt").
    pub source: &'static str,
}

fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: callers read firmware tables inside identity-mapped low memory or RAM.
    unsafe { (addr as *const T).read_unaligned() }
}

fn scan(start: u64, end: u64, sig: &[u8], step: u64) -> Option<u64> {
    let mut a = start;
    while a + sig.len() as u64 <= end {
        if rd::<u32>(a) == u32::from_le_bytes([sig[0], sig[1], sig[2], sig[3]]) {
            let ok = (4..sig.len()).all(|i| rd::<u8>(a + i as u64) == sig[i]);
            if ok {
                return Some(a);
            }
        }
        a += step;
    }
    None
}

fn from_mptable() -> Option<CpuList> {
    let ebda = u64::from(rd::<u16>(0x40e)) << 4;
    let fp = scan(0x9fc00, 0xa0000, b"_MP_", 16)
        .or_else(|| {
            if (0x80000..0xa0000).contains(&ebda) {
                scan(ebda, ebda + 1024, b"_MP_", 16)
            } else {
                None
            }
        })
        .or_else(|| scan(0xf0000, 0x100000, b"_MP_", 16))?;
    if !crate::acpi::checksum_ok(fp, 16) {
        return None;
    }
    let table = u64::from(rd::<u32>(fp + 4));
    if table == 0 || rd::<u32>(table) != u32::from_le_bytes(*b"PCMP") {
        return None;
    }
    let len = u64::from(rd::<u16>(table + 4));
    if !crate::acpi::checksum_ok(table, len) {
        return None;
    }
    let entries = rd::<u16>(table + 34);
    let mut list = CpuList {
        apic_ids: [0; MAX_CPUS],
        count: 0,
        source: "mptable",
    };
    let mut p = table + 44;
    for _ in 0..entries {
        match rd::<u8>(p) {
            0 => {
                let flags = rd::<u8>(p + 3);
                if flags & 1 != 0 && list.count < MAX_CPUS {
                    list.apic_ids[list.count] = u32::from(rd::<u8>(p + 1));
                    list.count += 1;
                }
                p += 20;
            }
            1..=4 => p += 8,
            _ => return None,
        }
    }
    Some(list)
}

/// The number of processors the MP table lists, if there is one.
pub fn mptable_cpus() -> Option<u64> {
    from_mptable().map(|l| l.count as u64)
}

fn from_madt() -> Option<CpuList> {
    {
        let t = crate::acpi::find(b"APIC")?;
        let len = u64::from(rd::<u32>(t + 4));
        let mut list = CpuList {
            apic_ids: [0; MAX_CPUS],
            count: 0,
            source: "madt",
        };
        let mut p = t + 44;
        while p + 2 <= t + len {
            let (ty, l) = (rd::<u8>(p), u64::from(rd::<u8>(p + 1)));
            if l < 2 {
                return None;
            }
            if ty == 0 && rd::<u32>(p + 4) & 1 != 0 && list.count < MAX_CPUS {
                list.apic_ids[list.count] = u32::from(rd::<u8>(p + 3));
                list.count += 1;
            }
            p += l;
        }
        Some(list)
    }
}

/// Finds the processors: the ACPI MADT when the loader named an RSDP (Worldvisor and QEMU's PVH
/// loader do; QEMU's firmware's MP table may list only the CPUs it managed to wake), else the MP
/// table, else a scan for the RSDP.
pub fn discover() -> Option<CpuList> {
    if crate::boot_info().rsdp != 0 {
        if let Some(l) = from_madt() {
            return Some(l);
        }
    }
    from_mptable().or_else(from_madt)
}

/// APs that reached `ap_main`.
pub static AP_UP: AtomicU32 = AtomicU32::new(0);
/// The APIC ID the last AP reported.
pub static AP_LAST_ID: AtomicU64 = AtomicU64::new(u64::MAX);
/// What an AP does once it is up: [`JOB_PARK`] (the default), [`JOB_IPI`] or [`JOB_USER`]; set
/// by a test before [`start_aps`].
pub static AP_JOB: AtomicU32 = AtomicU32::new(JOB_PARK);
/// Halt with interrupts off until the VM ends.
pub const JOB_PARK: u32 = 0;
/// Answer the IPI ping-pong (`crate::mp`) with interrupts on, halted between pings.
pub const JOB_IPI: u32 = 1;
/// Run `crate::mp`'s CPL3 workload on this AP's own TSS and stacks.
pub const JOB_USER: u32 = 2;
/// The slot (1..) of the AP being started: its stacks and TSS.
static AP_SLOT: AtomicUsize = AtomicUsize::new(0);

const AP_STACK: usize = 8192;
#[repr(C, align(4096))]
struct ApStacks([[u8; AP_STACK]; MAX_CPUS]);
#[link_section = ".stack"]
static AP_STACKS: Global<ApStacks> = Global::new(ApStacks([[0; AP_STACK]; MAX_CPUS]));

#[no_mangle]
extern "C" fn ap_main() -> ! {
    cpu::load_idt();
    let job = AP_JOB.load(Ordering::SeqCst);
    let slot = AP_SLOT.load(Ordering::SeqCst).min(MAX_CPUS - 1);
    if job == JOB_USER {
        // Before AP_UP: the BSP starts the next AP (which rewrites the GDT's TSS descriptor)
        // only once this one counted itself.
        cpu::init_ap_tss(slot);
    }
    AP_LAST_ID.store(u64::from(lapic::id()), Ordering::SeqCst);
    AP_UP.fetch_add(1, Ordering::SeqCst);
    match job {
        JOB_IPI => {
            lapic::enable();
            loop {
                cpu::wait_for_interrupt();
            }
        }
        JOB_USER => crate::mp::ap_user(slot),
        _ => cpu::park(),
    }
}

fn wait_for(target: u32, cycles: u64) -> bool {
    let start = cpu::rdtsc();
    while AP_UP.load(Ordering::SeqCst) < target {
        if cpu::rdtsc().wrapping_sub(start) > cycles {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Starts every AP in `cpus` one at a time; returns how many came up and the first APIC ID
/// that did not (if any).
pub fn start_aps(cpus: &CpuList) -> (u32, Option<u32>) {
    let tramp = entry::trampoline();
    // SAFETY: the trampoline page is usable RAM (checked by the caller) that nothing else uses
    // after boot information was copied; the source is the image's own code.
    unsafe {
        core::ptr::copy_nonoverlapping(
            tramp.as_ptr(),
            entry::TRAMPOLINE_ADDR as *mut u8,
            tramp.len(),
        );
    }
    let bsp = lapic::id();
    let vector = (entry::TRAMPOLINE_ADDR >> 12) as u32;
    let mut started = 0u32;
    let mut slot = 0usize;
    for &id in &cpus.apic_ids[..cpus.count] {
        if id == bsp {
            continue;
        }
        slot += 1;
        let top = AP_STACKS.as_ptr() as u64 + (slot as u64 + 1) * AP_STACK as u64;
        entry::set_ap_stack(top);
        AP_SLOT.store(slot, Ordering::SeqCst);
        let target = started + 1;
        lapic::write(lapic::ICR_HIGH, id << 24);
        lapic::write(lapic::ICR_LOW, 0x4500);
        let mut ok = false;
        for _ in 0..2 {
            lapic::write(lapic::ICR_HIGH, id << 24);
            lapic::write(lapic::ICR_LOW, 0x4600 | vector);
            if wait_for(target, 4_000_000_000) {
                ok = true;
                break;
            }
        }
        if !ok || AP_LAST_ID.load(Ordering::SeqCst) != u64::from(id) {
            return (started, Some(id));
        }
        started = target;
    }
    (started, None)
}
