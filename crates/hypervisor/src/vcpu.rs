//! vCPU set-up common to every boot protocol: CPUID, MSRs, FPU and local APIC wiring.

use crate::cpuid::{self, HostCpu, VcpuTopology};
use crate::kvm::HvError;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, CpuId, Msrs};
use kvm_ioctls::VcpuFd;

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;
/// CPUID.1:ECX x2APIC.
const CPUID1_ECX_X2APIC: u32 = 1 << 21;
/// CPUID.1:ECX TSC-deadline timer.
const CPUID1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// KVM's paravirtual feature leaf (moved up one slot by Worldvisor's own, `cpuid.rs`).
const KVM_CPUID_FEATURES: u32 = wv_abi::CPUID_KVM_BASE + 1;
/// The paravirtual features KVM implements in its in-kernel local APIC, which a guest must not
/// use without it (QEMU's `kernel-irqchip=off` drops them too): PV EOI (bit 6), PV unhalt (7,
/// kicked by the in-kernel APIC), PV send-IPI (11, a hypercall KVM delivers itself), async page
/// faults by interrupt (14) and the extended MSI destination ID (15).
const KVM_FEATURES_NEEDING_LAPIC: u32 = (1 << 6) | (1 << 7) | (1 << 11) | (1 << 14) | (1 << 15);

/// MSR values set at boot, filtered to those the host's KVM lists.
pub fn boot_msrs(supported: &[u32]) -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .filter(|(i, _)| supported.contains(i))
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// What every vCPU of one VM is configured from.
pub struct VcpuTemplate {
    /// KVM_GET_SUPPORTED_CPUID.
    pub supported_cpuid: CpuId,
    /// MSRs to set.
    pub msrs: Vec<kvm_msr_entry>,
    /// Host facts.
    pub host: HostCpu,
    /// vCPUs in the VM.
    pub count: u32,
    /// KVM's in-kernel irqchip emulates the local APICs (the default). Without it (the VMM's
    /// own controllers), the local APIC is not touched here and CPUID hides x2APIC and the
    /// TSC-deadline timer, which the VMM's controllers do not emulate.
    pub kernel_irqchip: bool,
}

impl VcpuTemplate {
    /// Reads what KVM supports.
    pub fn new(kvm: &kvm_ioctls::Kvm, count: u32) -> Result<VcpuTemplate, HvError> {
        let supported_cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| HvError::Ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
        let index = kvm
            .get_msr_index_list()
            .map_err(|e| HvError::Ioctl("KVM_GET_MSR_INDEX_LIST", e))?;
        Ok(VcpuTemplate {
            supported_cpuid,
            msrs: boot_msrs(index.as_slice()),
            host: HostCpu::detect(),
            count,
            kernel_irqchip: true,
        })
    }

    /// Configures vCPU `index`: CPUID, MSRs, FPU, and LINT0 = ExtINT / LINT1 = NMI so the
    /// 8259 and NMIs reach it as on a PC.
    pub fn configure(&self, vcpu: &VcpuFd, index: u32) -> Result<(), HvError> {
        let mut entries = cpuid::for_vcpu(
            self.supported_cpuid.as_slice(),
            VcpuTopology {
                index,
                count: self.count,
            },
            self.host,
        );
        if !self.kernel_irqchip {
            for e in entries.iter_mut() {
                match e.function {
                    1 => e.ecx &= !(CPUID1_ECX_X2APIC | CPUID1_ECX_TSC_DEADLINE),
                    KVM_CPUID_FEATURES => e.eax &= !KVM_FEATURES_NEEDING_LAPIC,
                    _ => {}
                }
            }
        }
        let cpuid = CpuId::from_entries(&entries)
            .map_err(|_| HvError::Ioctl("building CPUID", kvm_ioctls::Error::new(libc::E2BIG)))?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| HvError::Ioctl("KVM_SET_CPUID2", e))?;
        if !self.msrs.is_empty() {
            let msrs = Msrs::from_entries(&self.msrs).map_err(|_| {
                HvError::Ioctl("building MSRs", kvm_ioctls::Error::new(libc::E2BIG))
            })?;
            vcpu.set_msrs(&msrs)
                .map_err(|e| HvError::Ioctl("KVM_SET_MSRS", e))?;
        }
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        vcpu.set_fpu(&fpu)
            .map_err(|e| HvError::Ioctl("KVM_SET_FPU", e))?;
        if !self.kernel_irqchip {
            return Ok(());
        }
        let mut lapic = vcpu
            .get_lapic()
            .map_err(|e| HvError::Ioctl("KVM_GET_LAPIC", e))?;
        set_lvt(&mut lapic.regs, 0x350, 0x700); // LINT0: ExtINT
        set_lvt(&mut lapic.regs, 0x360, 0x400); // LINT1: NMI
        vcpu.set_lapic(&lapic)
            .map_err(|e| HvError::Ioctl("KVM_SET_LAPIC", e))
    }
}

fn set_lvt(regs: &mut [libc::c_char; 1024], offset: usize, delivery_mode: u32) {
    let cur = u32::from_le_bytes(std::array::from_fn(|i| regs[offset + i] as u8));
    let v = (cur & !0x700) | delivery_mode;
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as libc::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msrs_are_filtered_by_support() {
        assert_eq!(boot_msrs(&[]).len(), 0);
        let m = boot_msrs(&[MSR_MTRR_DEF_TYPE, 0x10]);
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].index, m[0].data), (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB));
    }

    #[test]
    fn lvt_delivery_mode_is_replaced() {
        let mut regs = [0 as libc::c_char; 1024];
        regs[0x350] = 0xff_u8 as libc::c_char;
        regs[0x351] = 0x07;
        regs[0x352] = 0x01;
        set_lvt(&mut regs, 0x350, 0x400);
        let v = u32::from_le_bytes(std::array::from_fn(|i| regs[0x350 + i] as u8));
        assert_eq!(v, 0x0001_04ff);
    }
}
