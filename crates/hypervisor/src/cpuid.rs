//! The CPUID a vCPU sees: what the host's KVM supports, minus what it cannot run, plus the
//! topology of this VM and Worldvisor's hypervisor leaves.
//!
//! What "cannot run" means is detected, not assumed: on a host without VMX or SVM, KVM runs guest
//! kernel code in its instruction emulator (PVM), which has no CMPXCHG16B, no XSAVE family and no
//! SIMD beyond SSE2; a kernel that sees those features uses them and stops with an emulation
//! failure. With hardware virtualization every supported feature stays visible.
//!
//! What the guest then sees is not always this table. Measured with the probe guest's `cpuid`
//! test on a PVM host (Linux 6.18), CPUID at CPL0 and at CPL3 alike: a feature bit KVM lists as
//! supported follows the table (CX16 is hidden as asked), but a bit KVM does not list shows the
//! host CPU's value whatever KVM_SET_CPUID2 said (XSAVE, AVX, SSE3-4.2, AVX2, AVX-512 are seen),
//! and leaf 0xD is the host's although wv leaves it out. The fields the VMM sets outright (leaf
//! 1 EBX: APIC ID and CPU count; topology and hypervisor leaves) follow the table. So the masks
//! below cannot hide those features there; [`ignored_features`] names what a guest will see
//! although wv clears it, and `wv run` warns with that list when it boots a kernel of the
//! user's (`noxsave` gets a Linux kernel past its XSAVE use). With hardware virtualization,
//! leaf 0xD is KVM's own, whose XSAVE area size KVM recomputes as the guest sets XCR0.

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

/// The features the emulating host's masks clear, by CPUID leaf and bit (leaf 1: ECX, leaf 7:
/// EBX).
const CLEARED: [(u32, u32, &str); 14] = [
    (1, 0, "sse3"),
    (1, 9, "ssse3"),
    (1, 13, "cx16"),
    (1, 19, "sse4.1"),
    (1, 20, "sse4.2"),
    (1, 23, "popcnt"),
    (1, 26, "xsave"),
    (1, 28, "avx"),
    (7, 5, "avx2"),
    (7, 16, "avx512f"),
    (7, 17, "avx512dq"),
    (7, 28, "avx512cd"),
    (7, 30, "avx512bw"),
    (7, 31, "avx512vl"),
];

/// On a host that emulates guest kernel code, the features wv clears from the guest's CPUID
/// that the guest sees anyway: those the host's CPU has and KVM does not list as supported
/// (see the module comment). Empty with hardware virtualization, where the table is what the
/// guest sees.
pub fn ignored_features(host: HostCpu, supported: &[kvm_cpuid_entry2]) -> Vec<&'static str> {
    if !host.kernel_mode_emulated {
        return Vec::new();
    }
    let (l1, l7) = (
        std::arch::x86_64::__cpuid(1),
        std::arch::x86_64::__cpuid_count(7, 0),
    );
    let kvm = |leaf: u32| {
        supported
            .iter()
            .find(|e| e.function == leaf && e.index == 0)
    };
    let (k1, k7) = (kvm(1).map_or(0, |e| e.ecx), kvm(7).map_or(0, |e| e.ebx));
    CLEARED
        .iter()
        .filter(|(leaf, bit, _)| {
            let (host, kvm) = if *leaf == 1 {
                (l1.ecx, k1)
            } else {
                (l7.ebx, k7)
            };
            host & (1 << bit) != 0 && kvm & (1 << bit) == 0
        })
        .map(|c| c.2)
        .collect()
}

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
    fn the_named_features_are_the_ones_the_masks_clear() {
        let l1: u32 = CLEARED.iter().filter(|c| c.0 == 1).map(|c| 1 << c.1).sum();
        assert_eq!(
            l1,
            LEAF1_ECX_CX16 | LEAF1_ECX_XSAVE | LEAF1_ECX_AVX | LEAF1_ECX_SSE3_UP
        );
        let l7: u32 = CLEARED.iter().filter(|c| c.0 == 7).map(|c| 1 << c.1).sum();
        assert_eq!(l7, LEAF7_EBX_AVX2_AVX512);
        let hw = HostCpu {
            kernel_mode_emulated: false,
        };
        assert!(ignored_features(hw, &supported()).is_empty());
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
