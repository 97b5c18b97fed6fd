//! The CPUID a vCPU sees: what the host's KVM supports, minus what it cannot run, plus the
//! topology of this VM and Worldvisor's hypervisor leaves.
//!
//! What "cannot run" means is detected, not assumed: on a host without VMX or SVM, KVM runs guest
//! kernel code in its instruction emulator (PVM), which has no CMPXCHG16B, no XSAVE family and no
//! SIMD beyond SSE2; a kernel that sees those features uses them and stops with an emulation
//! failure. With hardware virtualization every supported feature stays visible.

use kvm_bindings::kvm_cpuid_entry2;
use wv_abi as abi;

/// Facts about the host CPU that decide what a guest may be shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostCpu {
    /// Guest kernel mode is executed by KVM's instruction emulator (no VMX/SVM on the host).
    pub kernel_mode_emulated: bool,
}

impl HostCpu {
    /// Reads the host's CPUID.
    pub fn detect() -> HostCpu {
        let (l1, ext) = (
            std::arch::x86_64::__cpuid(1),
            std::arch::x86_64::__cpuid(0x8000_0001),
        );
        let vmx = l1.ecx & (1 << 5) != 0;
        let svm = ext.ecx & (1 << 2) != 0;
        HostCpu {
            kernel_mode_emulated: !(vmx || svm),
        }
    }
}

/// Where one vCPU sits in the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuTopology {
    /// vCPU index, also its APIC ID.
    pub index: u32,
    /// vCPUs in the VM.
    pub count: u32,
}

const LEAF1_ECX_CX16: u32 = 1 << 13;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_AVX: u32 = 1 << 28;
const LEAF1_ECX_SSE3_UP: u32 = (1 << 0) | (1 << 9) | (1 << 19) | (1 << 20) | (1 << 23); // sse3 ssse3 sse4.1 sse4.2 popcnt
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const LEAF7_EBX_AVX2_AVX512: u32 =
    (1 << 5) | (1 << 16) | (1 << 17) | (1 << 28) | (1 << 30) | (1 << 31);

fn ceil_log2(n: u32) -> u32 {
    32 - n.saturating_sub(1).leading_zeros()
}

fn sig_words(sig: &[u8; 12]) -> (u32, u32, u32) {
    let w = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
    (w(0), w(4), w(8))
}

/// Builds the CPUID entries for one vCPU from KVM's supported list.
pub fn for_vcpu(
    supported: &[kvm_cpuid_entry2],
    topo: VcpuTopology,
    host: HostCpu,
) -> Vec<kvm_cpuid_entry2> {
    let id = topo.index;
    let count = topo.count.max(1);
    let mut out = Vec::with_capacity(supported.len() + 2);
    for e in supported {
        let mut e = *e;
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_00ff) | (id << 24) | (count.min(255) << 16) | (8 << 8);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                }
                if host.kernel_mode_emulated {
                    e.ecx &= !(LEAF1_ECX_CX16
                        | LEAF1_ECX_XSAVE
                        | LEAF1_ECX_OSXSAVE
                        | LEAF1_ECX_AVX
                        | LEAF1_ECX_SSE3_UP);
                }
            }
            0x4 => {
                // Cores per package - 1 in bits 31:26; one core per vCPU, no SMT.
                e.eax = (e.eax & 0x03ff_ffff) | ((count - 1).min(63) << 26);
            }
            0x7 if e.index == 0 && host.kernel_mode_emulated => {
                e.ebx &= !LEAF7_EBX_AVX2_AVX512;
            }
            0xb | 0x1f => {
                // Extended topology: level 0 = SMT (1 thread), level 1 = core (count cores).
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = ceil_log2(count);
                        e.ebx = count;
                        e.ecx = 1 | (2 << 8);
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            0xd if host.kernel_mode_emulated => continue,
            0x8000_001e => {
                e.eax = id;
                e.ebx = id & 0xff;
                e.ecx = 0;
            }
            // KVM's paravirtual leaves move up one slot to make room for ours; Linux scans
            // 0x40000000 + n*0x100 for "KVMKVMKVM", so kvmclock and friends still work.
            f if (abi::CPUID_SIGNATURE_LEAF..abi::CPUID_KVM_BASE).contains(&f) => {
                e.function = f - abi::CPUID_SIGNATURE_LEAF + abi::CPUID_KVM_BASE;
                if f == abi::CPUID_SIGNATURE_LEAF {
                    e.eax = e.eax - abi::CPUID_SIGNATURE_LEAF + abi::CPUID_KVM_BASE;
                }
            }
            _ => {}
        }
        out.push(e);
    }
    let (b, c, d) = sig_words(&abi::SIGNATURE);
    out.push(kvm_cpuid_entry2 {
        function: abi::CPUID_SIGNATURE_LEAF,
        eax: abi::CPUID_FEATURES_LEAF,
        ebx: b,
        ecx: c,
        edx: d,
        ..Default::default()
    });
    out.push(kvm_cpuid_entry2 {
        function: abi::CPUID_FEATURES_LEAF,
        eax: abi::ABI_VERSION,
        ebx: abi::features::ALL,
        ecx: u32::from(abi::CALL_PORT),
        edx: 0,
        ..Default::default()
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(f: u32, i: u32, a: u32, b: u32, c: u32, d: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function: f,
            index: i,
            eax: a,
            ebx: b,
            ecx: c,
            edx: d,
            ..Default::default()
        }
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap_or_else(|| panic!("leaf {f:#x}.{i}"))
    }

    fn supported() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0, 0, 0xd, 1, 2, 3),
            leaf(
                1,
                0,
                0xa00f11,
                0x0000_0800,
                LEAF1_ECX_CX16 | LEAF1_ECX_XSAVE | (1 << 21),
                0x078b_fbff,
            ),
            leaf(7, 0, 0, 1 << 5 | 1 << 3, 0, 0),
            leaf(0xb, 0, 1, 2, 0x100, 9),
            leaf(0xb, 1, 4, 16, 0x201, 9),
            leaf(0xd, 0, 7, 0x340, 0x340, 0),
            leaf(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            leaf(0x4000_0001, 0, 0x0100_7efb, 0, 0, 0),
        ]
    }

    #[test]
    fn topology_and_apic_ids() {
        let v = for_vcpu(
            &supported(),
            VcpuTopology { index: 3, count: 4 },
            HostCpu {
                kernel_mode_emulated: false,
            },
        );
        let l1 = find(&v, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        let core = find(&v, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.edx), (2, 4, 3));
        assert_eq!(find(&v, 0xb, 0).ebx, 1);
    }

    #[test]
    fn hardware_host_keeps_features() {
        let v = for_vcpu(
            &supported(),
            VcpuTopology { index: 0, count: 1 },
            HostCpu {
                kernel_mode_emulated: false,
            },
        );
        assert_ne!(find(&v, 1, 0).ecx & LEAF1_ECX_CX16, 0);
        assert_ne!(find(&v, 7, 0).ebx & (1 << 5), 0);
        assert_eq!(find(&v, 1, 0).edx & LEAF1_EDX_HTT, 0);
        assert!(v.iter().any(|e| e.function == 0xd));
    }

    #[test]
    fn emulating_host_hides_what_the_emulator_cannot_run() {
        let v = for_vcpu(
            &supported(),
            VcpuTopology { index: 0, count: 1 },
            HostCpu {
                kernel_mode_emulated: true,
            },
        );
        let l1 = find(&v, 1, 0);
        assert_eq!(l1.ecx & (LEAF1_ECX_CX16 | LEAF1_ECX_XSAVE), 0);
        assert_ne!(l1.ecx & (1 << 21), 0, "x2apic stays");
        assert_eq!(find(&v, 7, 0).ebx, 1 << 3, "avx2 hidden, bmi1 kept");
        assert!(!v.iter().any(|e| e.function == 0xd));
    }

    #[test]
    fn worldvisor_leaves_and_moved_kvm_leaves() {
        let v = for_vcpu(
            &supported(),
            VcpuTopology { index: 0, count: 1 },
            HostCpu {
                kernel_mode_emulated: false,
            },
        );
        let sig = find(&v, abi::CPUID_SIGNATURE_LEAF, 0);
        let mut bytes = Vec::new();
        for w in [sig.ebx, sig.ecx, sig.edx] {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        assert_eq!(&bytes, &abi::SIGNATURE);
        assert_eq!(sig.eax, abi::CPUID_FEATURES_LEAF);
        let feat = find(&v, abi::CPUID_FEATURES_LEAF, 0);
        assert_eq!(
            (feat.eax, feat.ecx),
            (abi::ABI_VERSION, u32::from(abi::CALL_PORT))
        );
        let kvm = find(&v, abi::CPUID_KVM_BASE, 0);
        assert_eq!(kvm.ebx, 0x4b4d_564b);
        assert_eq!(kvm.eax, abi::CPUID_KVM_BASE + 1);
        assert_eq!(find(&v, abi::CPUID_KVM_BASE + 1, 0).eax, 0x0100_7efb);
        assert_eq!(
            v.iter()
                .filter(|e| e.function == abi::CPUID_SIGNATURE_LEAF)
                .count(),
            1
        );
    }
}
