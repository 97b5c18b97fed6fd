//! Saving and restoring KVM state (wv_hypervisor::state) on the real KVM: exact round trips,
//! a guest that keeps counting across a move into a new VM, and refusal of corrupt state.

use kvm_bindings::{
    kvm_msr_entry, kvm_pit_config, kvm_segment, kvm_userspace_memory_region, Msrs,
    KVM_PIT_SPEAKER_DUMMY, KVM_VCPUEVENT_VALID_NMI_PENDING,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use std::path::Path;
use std::time::{Duration, Instant};
use wv_hypervisor::state::{
    self, Blob, Fpu, Raw, VcpuState, VmState, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE,
};
use wv_hypervisor::vcpu::VcpuTemplate;
use wv_hypervisor::HvError;

const MEM_SIZE: usize = 1 << 20;
const CODE: u64 = 0x1000;
const PORT: u16 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const APIC_TPR: usize = 0x80;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// XMM3 in the legacy region of an XSAVE area (XMM0 at 160).
const XSAVE_XMM3: usize = 160 + 3 * 16;

fn need_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "this test needs /dev/kvm: without it, run the tests without --include-ignored \
         (scripts/test does when WV_TESTS_WITHOUT_KVM=1) and the KVM tests show as ignored"
    );
}

/// Anonymous memory for a guest, unmapped on drop.
struct Mem {
    ptr: *mut u8,
    len: usize,
}

impl Mem {
    fn new(len: usize) -> Mem {
        // SAFETY: a fresh private anonymous mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap guest memory");
        Mem {
            ptr: ptr.cast(),
            len,
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes, live as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; `&mut self` makes this the only reference from Rust.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `new`; no reference to it outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A VM set up as the VMM sets one up (TSS, identity map, irqchip, PIT2, a vCPU configured
/// from the CPUID/MSR/LAPIC template), with 1 MiB of memory. Field order = drop order: the vCPU
/// and VM go before their memory.
struct TestVm {
    vcpu: VcpuFd,
    /// vCPUs 1.. when the VM has more than one.
    aps: Vec<VcpuFd>,
    vm: VmFd,
    mem: Mem,
}

fn new_vm(kvm: &Kvm) -> TestVm {
    new_vm_with(kvm, 1)
}

fn new_vm_with(kvm: &Kvm, vcpus: u32) -> TestVm {
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let mem = Mem::new(MEM_SIZE);
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem.ptr as u64,
    };
    // SAFETY: the region is a live mapping of `memory_size` bytes, kept (in TestVm) until after
    // the VM is closed.
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    vm.set_tss_address(0xfffb_d000).expect("KVM_SET_TSS_ADDR");
    vm.set_identity_map_address(0xfffb_c000)
        .expect("KVM_SET_IDENTITY_MAP_ADDR");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .expect("KVM_CREATE_PIT2");
    let template = VcpuTemplate::new(kvm, vcpus).expect("vCPU template");
    let mut fds: Vec<VcpuFd> = (0..vcpus)
        .map(|i| {
            let fd = vm.create_vcpu(u64::from(i)).expect("KVM_CREATE_VCPU");
            template.configure(&fd, i).expect("configuring the vCPU");
            fd
        })
        .collect();
    let vcpu = fds.remove(0);
    TestVm {
        vcpu,
        aps: fds,
        vm,
        mem,
    }
}

fn flat(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// 32-bit protected mode, flat segments, no paging; RIP at `CODE`, EAX = 0.
fn enter_protected_mode(vcpu: &VcpuFd) {
    let mut s = vcpu.get_sregs().unwrap();
    s.cs = flat(0x8, 0xb);
    let data = flat(0x10, 0x3);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.cr0 = 0x11; // PE | ET
    vcpu.set_sregs(&s).unwrap();
    let mut r = vcpu.get_regs().unwrap();
    r.rip = CODE;
    r.rax = 0;
    r.rflags = 0x2;
    vcpu.set_regs(&r).unwrap();
}

/// The guest: EBX counts up; each round it writes the count to port 0x10, reads an answer from
/// the port and writes that answer back, forever.
///   mov edx, 0x10
///   1: inc ebx / mov eax, ebx / out dx, eax / in eax, dx / out dx, eax / jmp 1b
const COUNTER: &[u8] = &[
    0xba, 0x10, 0x00, 0x00, 0x00, 0x43, 0x89, 0xd8, 0xef, 0xed, 0xef, 0xeb, 0xf8,
];

/// The VMM's answer to the guest's `in` in round `i`.
fn answer(i: u32) -> u32 {
    i ^ 0x5a5a_5a5a
}

/// Runs until the next `out` to PORT and returns the value written.
fn expect_out(vcpu: &mut VcpuFd) -> u32 {
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(PORT, data)) => {
                return u32::from_le_bytes(data.try_into().expect("4-byte out"))
            }
            Ok(other) => panic!("unexpected exit, expected an out: {other:?}"),
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => panic!("KVM_RUN: {e}"),
        }
    }
}

/// Runs until the next `in` from PORT and gives it `value` (which reaches the guest's EAX only
/// when KVM_RUN is entered again).
fn answer_in(vcpu: &mut VcpuFd, value: u32) {
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoIn(PORT, data)) => {
                data.copy_from_slice(&value.to_le_bytes());
                return;
            }
            Ok(other) => panic!("unexpected exit, expected an in: {other:?}"),
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => panic!("KVM_RUN: {e}"),
        }
    }
}

/// One round of the guest's loop, checked.
fn round(vcpu: &mut VcpuFd, i: u32, vm: &str) {
    assert_eq!(expect_out(vcpu), i, "{vm}: count");
    answer_in(vcpu, answer(i));
    assert_eq!(expect_out(vcpu), answer(i), "{vm}: echo of round {i}");
}

fn msr(s: &VcpuState, index: u32) -> Option<u64> {
    s.msrs.iter().find(|(i, _)| *i == index).map(|(_, v)| *v)
}

fn read_msr(vcpu: &VcpuFd, index: u32) -> u64 {
    let mut m = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(vcpu.get_msrs(&mut m).unwrap(), 1, "reading MSR {index:#x}");
    m.as_slice()[0].data
}

fn lapic_reg(s: &VcpuState, offset: usize) -> u32 {
    u32::from_le_bytes(std::array::from_fn(|i| s.lapic.regs[offset + i] as u8))
}

fn through_json_and_binary<T>(v: &T) -> (T, usize, usize)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let json = serde_json::to_vec(v).unwrap();
    let from_json: T = serde_json::from_slice(&json).unwrap();
    assert_eq!(&from_json, v, "JSON round trip");
    let cfg = bincode::config::standard();
    let bin = bincode::serde::encode_to_vec(v, cfg).unwrap();
    let (from_bin, used): (T, usize) = bincode::serde::decode_from_slice(&bin, cfg).unwrap();
    assert_eq!(used, bin.len());
    assert_eq!(&from_bin, v, "binary round trip");
    (from_json, json.len(), bin.len())
}

/// Sets XMM3 through the XSAVE area (with the SSE bit set in XSTATE_BV), or KVM_SET_FPU on a
/// host without XSAVE.
fn set_xmm3(kvm: &Kvm, v: &VcpuFd, value: [u8; 16]) {
    let Some(size) = state::xsave_size(kvm) else {
        let mut fpu = v.get_fpu().unwrap();
        fpu.xmm[3] = value;
        v.set_fpu(&fpu).unwrap();
        return;
    };
    let extra = (size - std::mem::size_of::<kvm_bindings::kvm_xsave>()).div_ceil(4);
    let mut x = kvm_bindings::Xsave::new(extra).unwrap();
    // SAFETY: `x` holds `size` bytes, KVM_CAP_XSAVE2's size (or 4 KiB).
    unsafe { v.get_xsave2(&mut x) }.unwrap();
    // SAFETY: only the region is changed, not the `len` field.
    let region = &mut unsafe { x.as_mut_fam_struct() }.xsave.region;
    for (i, w) in value.chunks_exact(4).enumerate() {
        region[XSAVE_XMM3 / 4 + i] = u32::from_le_bytes(w.try_into().unwrap());
    }
    region[512 / 4] |= 2; // XSTATE_BV: SSE state in use
                          // SAFETY: as for get_xsave2.
    unsafe { v.set_xsave2(&x) }.unwrap();
}

/// Sets a distinctive value in every part of the state that a test can set from outside.
fn make_distinctive(kvm: &Kvm, t: &TestVm) {
    let v = &t.vcpu;
    enter_protected_mode(v);
    let mut r = v.get_regs().unwrap();
    (r.rax, r.rbx, r.rcx, r.rdx) = (0x1111, 0x2222, 0x3333, 0x4444);
    (r.rsi, r.rdi, r.rsp, r.rbp) = (0x5555, 0x6666, 0x7777, 0x8888);
    (r.r8, r.r15) = (0x8_8888_8888, 0xf_ffff_ffff);
    v.set_regs(&r).unwrap();
    let m = Msrs::from_entries(&[
        kvm_msr_entry {
            index: MSR_IA32_SYSENTER_CS,
            data: 0x1234,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_KERNEL_GS_BASE,
            data: 0xdead_beef_0000,
            ..Default::default()
        },
    ])
    .unwrap();
    assert_eq!(v.set_msrs(&m).unwrap(), 2);
    let mut lapic = v.get_lapic().unwrap();
    lapic.regs[APIC_TPR] = 0x20;
    v.set_lapic(&lapic).unwrap();
    let mut ev = v.get_vcpu_events().unwrap();
    ev.nmi.masked = 1;
    ev.nmi.pending = 1;
    ev.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING;
    v.set_vcpu_events(&ev).unwrap();
    set_xmm3(kvm, v, [0xab; 16]);
    let mut dr = v.get_debug_regs().unwrap();
    dr.db = [0x1000, 0x2000, 0x3000, 0x4000];
    v.set_debug_regs(&dr).unwrap();
}

/// Compares two saved states field by field. What KVM legitimately changes between a save and
/// a save after restoring it is left out and checked separately: the TSC (it runs), the clock
/// (it runs; its flags say whether KVM's master clock is in use, which KVM decides anew on
/// KVM_SET_CLOCK: 0 in a VM that never ran, TSC_STABLE|REALTIME|HOST_TSC after), and the PIT
/// channels' count_load_time (a host time stamp KVM sets anew on KVM_SET_PIT2).
fn assert_same_vcpu(a: &VcpuState, b: &VcpuState) {
    assert_eq!(a.regs, b.regs, "regs");
    assert_eq!(a.sregs, b.sregs, "sregs");
    assert_eq!(a.fpu, b.fpu, "fpu");
    assert_eq!(a.xsave, b.xsave, "xsave");
    assert_eq!(a.xcrs, b.xcrs, "xcrs");
    assert_eq!(a.lapic, b.lapic, "lapic");
    assert_eq!(a.mp_state, b.mp_state, "mp_state");
    assert_eq!(a.vcpu_events, b.vcpu_events, "vcpu_events");
    assert_eq!(a.debugregs, b.debugregs, "debugregs");
    assert_eq!(a.tsc_khz, b.tsc_khz, "tsc_khz");
    let idx = |s: &VcpuState| s.msrs.iter().map(|(i, _)| *i).collect::<Vec<_>>();
    assert_eq!(idx(a), idx(b), "the same MSRs are readable");
    for ((i, va), (_, vb)) in a.msrs.iter().zip(&b.msrs) {
        if *i != MSR_IA32_TSC {
            assert_eq!(va, vb, "MSR {i:#x}");
        }
    }
}

fn assert_same_vm(a: &VmState, b: &VmState) {
    assert_eq!(a.pic_master, b.pic_master, "PIC master");
    assert_eq!(a.pic_slave, b.pic_slave, "PIC slave");
    assert_eq!(a.ioapic, b.ioapic, "IOAPIC");
    let mut pa = *a.pit;
    let mut pb = *b.pit;
    for c in pa.channels.iter_mut().chain(pb.channels.iter_mut()) {
        c.count_load_time = 0;
    }
    assert_eq!(Raw(pa), Raw(pb), "PIT (but for its load time stamps)");
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn state_round_trips_exactly_into_a_new_vm() {
    need_kvm();
    let kvm = wv_hypervisor::open().unwrap();
    let t1 = new_vm(&kvm);
    make_distinctive(&kvm, &t1);

    let t = Instant::now();
    let s1 = state::save_vcpu(&kvm, &t1.vcpu).unwrap();
    let save_time = t.elapsed();
    let v1 = state::save_vm(&t1.vm).unwrap();
    assert_eq!(s1.regs.rbx, 0x2222);
    assert_eq!(s1.regs.r15, 0xf_ffff_ffff);
    assert_eq!(
        msr(&s1, MSR_IA32_SYSENTER_CS),
        Some(0x1234),
        "SYSENTER_CS saved"
    );
    assert_eq!(msr(&s1, MSR_KERNEL_GS_BASE), Some(0xdead_beef_0000));
    assert!(msr(&s1, MSR_IA32_TSC).is_some(), "the TSC is saved");
    assert_eq!(lapic_reg(&s1, APIC_TPR), 0x20, "TPR saved");
    assert_eq!(
        (s1.vcpu_events.nmi.masked, s1.vcpu_events.nmi.pending),
        (1, 1)
    );
    assert_eq!(s1.debugregs.db, [0x1000, 0x2000, 0x3000, 0x4000]);
    assert_eq!(s1.fpu.xmm[3], [0xab; 16], "XMM3 in the FPU registers");
    if let Some(x) = &s1.xsave {
        assert_eq!(
            x.0[XSAVE_XMM3..XSAVE_XMM3 + 16],
            [0xab; 16],
            "XMM3 in the XSAVE area"
        );
    }

    let (s1j, vcpu_json, vcpu_bin) = through_json_and_binary(&s1);
    let (v1j, vm_json, vm_bin) = through_json_and_binary(&v1);

    let t2 = new_vm(&kvm);
    state::restore_vm(&t2.vm, &v1j).unwrap();
    let t = Instant::now();
    state::restore_vcpu(&kvm, &t2.vcpu, &s1j).unwrap();
    let restore_time = t.elapsed();
    let s2 = state::save_vcpu(&kvm, &t2.vcpu).unwrap();
    let v2 = state::save_vm(&t2.vm).unwrap();
    assert_same_vcpu(&s1, &s2);
    assert_same_vm(&v1, &v2);
    // What runs on is continuous, not reset: the TSC and the clock moved forward only by the
    // time that passed here (well under a second), not back to a new VM's zero.
    let (tsc1, tsc2) = (
        msr(&s1, MSR_IA32_TSC).unwrap(),
        msr(&s2, MSR_IA32_TSC).unwrap(),
    );
    let khz = u64::from(s1.tsc_khz.unwrap_or(1_000_000));
    assert!(
        tsc2 >= tsc1 && tsc2 - tsc1 < khz * 1000,
        "TSC {tsc1} -> {tsc2}"
    );
    assert!(
        v2.clock.clock >= v1.clock.clock && v2.clock.clock - v1.clock.clock < 1_000_000_000,
        "clock {} -> {}",
        v1.clock.clock,
        v2.clock.clock
    );

    println!(
        "host: xsave {:?} bytes (XSAVE2 {}), xcrs {}, tsc_khz {:?}, clock flags {:#x}, {} MSRs \
         listed, {} saved",
        state::xsave_size(&kvm),
        kvm.check_extension_int(kvm_ioctls::Cap::Xsave2),
        s1.xcrs.is_some(),
        s1.tsc_khz,
        v1.clock.flags,
        kvm.get_msr_index_list().unwrap().as_slice().len(),
        s1.msrs.len()
    );
    println!(
        "VcpuState: {vcpu_json} bytes JSON, {vcpu_bin} bytes binary; VmState: {vm_json} bytes \
         JSON, {vm_bin} bytes binary; save_vcpu {save_time:?}, restore_vcpu {restore_time:?}"
    );
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn guest_keeps_counting_after_a_move_to_a_new_vm() {
    need_kvm();
    let kvm = wv_hypervisor::open().unwrap();
    let mut t1 = new_vm(&kvm);
    let code = usize::try_from(CODE).unwrap();
    t1.mem.bytes_mut()[code..code + COUNTER.len()].copy_from_slice(COUNTER);
    enter_protected_mode(&t1.vcpu);
    const N: u32 = 200;
    for i in 1..N {
        round(&mut t1.vcpu, i, "VM1");
    }
    // Stop in the middle of round N: the VMM has answered the guest's `in`, which KVM completes
    // only on the next KVM_RUN. Finish it, then save.
    assert_eq!(expect_out(&mut t1.vcpu), N, "VM1: count");
    answer_in(&mut t1.vcpu, answer(N));
    state::complete_pending_exit(&mut t1.vcpu).unwrap();
    let s = state::save_vcpu(&kvm, &t1.vcpu).unwrap();
    let v = state::save_vm(&t1.vm).unwrap();
    assert_eq!(s.regs.rbx, u64::from(N), "EBX holds the count at the save");
    assert_eq!(s.regs.rax, u64::from(answer(N)), "EAX holds the answer");
    let (s, _, _) = through_json_and_binary(&s);
    let (v, _, _) = through_json_and_binary(&v);
    let memory = t1.mem.bytes().to_vec();
    drop(t1);

    // The VM stays "paused" this long between save and restore; the guest must not see it.
    let pause = Duration::from_millis(200);
    std::thread::sleep(pause);

    let mut t2 = new_vm(&kvm);
    t2.mem.bytes_mut().copy_from_slice(&memory);
    let restored_at = Instant::now();
    state::restore_vm(&t2.vm, &v).unwrap();
    state::restore_vcpu(&kvm, &t2.vcpu, &s).unwrap();
    let tsc_now = read_msr(&t2.vcpu, MSR_IA32_TSC);
    let clock_now = t2.vm.get_clock().unwrap().clock;
    let since_restore = restored_at.elapsed();
    // VM2 picks up where VM1 stopped: the echo of the answer VM1's guest received, then the
    // next rounds.
    assert_eq!(
        expect_out(&mut t2.vcpu),
        answer(N),
        "VM2: echo of round {N}"
    );
    for i in N + 1..=N + 50 {
        round(&mut t2.vcpu, i, "VM2");
    }

    // Time across the move: kvmclock resumes from the saved value, moved on by at most the
    // time since the restore (plus slack), not by the pause.
    let slack = since_restore + pause / 4;
    let max_ns = u64::try_from(slack.as_nanos()).unwrap();
    assert!(
        clock_now >= v.clock.clock && clock_now - v.clock.clock <= max_ns,
        "kvmclock {} at save, {clock_now} after restore: the {pause:?} pause shows",
        v.clock.clock
    );
    // So does the TSC, where KVM can offset it. A PVM host cannot: the guest's TSC is the host's
    // (KVM accepts the MSR write and ignores it), so the pause shows; it still never goes back.
    let tsc_saved = msr(&s, MSR_IA32_TSC).unwrap();
    let khz = u64::from(s.tsc_khz.expect("KVM_GET_TSC_KHZ"));
    if state::guest_tsc_is_host_tsc(&t2.vcpu).unwrap() {
        println!(
            "this host's KVM does not offset the guest TSC (PVM): {} ms of pause show in it",
            (tsc_now - tsc_saved) / khz
        );
        assert!(tsc_now >= tsc_saved + u64::try_from(pause.as_millis()).unwrap() * khz);
    } else {
        let max = u64::try_from(slack.as_micros()).unwrap() * khz / 1000;
        assert!(
            tsc_now >= tsc_saved && tsc_now - tsc_saved <= max,
            "guest TSC {tsc_saved} at save, {tsc_now} after restore: the {pause:?} pause shows"
        );
    }
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn application_processors_round_trip_too() {
    need_kvm();
    let kvm = wv_hypervisor::open().unwrap();
    let t1 = new_vm_with(&kvm, 3);
    let s1: Vec<VcpuState> = std::iter::once(&t1.vcpu)
        .chain(&t1.aps)
        .map(|fd| state::save_vcpu(&kvm, fd).unwrap())
        .collect();
    // The BSP runs; the APs wait for INIT/SIPI, each with its own APIC ID.
    assert_eq!(s1[0].mp_state, kvm_bindings::KVM_MP_STATE_RUNNABLE);
    for (i, ap) in s1.iter().enumerate().skip(1) {
        assert_eq!(
            ap.mp_state,
            kvm_bindings::KVM_MP_STATE_UNINITIALIZED,
            "AP {i}"
        );
        assert_eq!(
            lapic_reg(ap, 0x20) >> 24,
            u32::try_from(i).unwrap(),
            "APIC ID"
        );
    }
    let (s1, _, _) = through_json_and_binary(&s1);
    let t2 = new_vm_with(&kvm, 3);
    for (fd, s) in std::iter::once(&t2.vcpu).chain(&t2.aps).zip(&s1) {
        state::restore_vcpu(&kvm, fd, s).unwrap();
    }
    for (fd, s) in std::iter::once(&t2.vcpu).chain(&t2.aps).zip(&s1) {
        assert_same_vcpu(s, &state::save_vcpu(&kvm, fd).unwrap());
    }
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn notify_paused_works_with_and_without_kvmclock() {
    need_kvm();
    let kvm = wv_hypervisor::open().unwrap();
    let t = new_vm(&kvm);
    // The guest has not enabled kvmclock: KVM says EINVAL, which is no error.
    state::notify_paused(&t.vcpu).unwrap();
    assert_eq!(
        t.vcpu.kvmclock_ctrl().unwrap_err().errno(),
        libc::EINVAL,
        "KVM_KVMCLOCK_CTRL without kvmclock"
    );
    // Enable it as a guest would (MSR_KVM_SYSTEM_TIME_NEW = address | enable): now KVM takes it.
    let m = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_KVM_SYSTEM_TIME_NEW,
        data: 0x2000 | 1,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(t.vcpu.set_msrs(&m).unwrap(), 1);
    t.vcpu
        .kvmclock_ctrl()
        .expect("KVM_KVMCLOCK_CTRL with kvmclock");
    state::notify_paused(&t.vcpu).unwrap();
}

/// A state with every KVM structure zero, for the encoding tests that need no KVM.
fn zero_state() -> VcpuState {
    VcpuState {
        regs: Raw(Default::default()),
        sregs: Raw(Default::default()),
        fpu: Fpu::from(&kvm_bindings::kvm_fpu::default()),
        xsave: Some(Blob(vec![0; 4096])),
        xcrs: Some(Raw(Default::default())),
        msrs: vec![(MSR_IA32_TSC, 5), (MSR_IA32_TSC_DEADLINE, 0)],
        lapic: Raw(Default::default()),
        mp_state: 0,
        vcpu_events: Raw(Default::default()),
        debugregs: Raw(Default::default()),
        tsc_khz: Some(1_000_000),
    }
}

#[test]
fn corrupt_structures_are_refused_when_read() {
    let s = zero_state();
    let json: serde_json::Value = serde_json::to_value(&s).unwrap();
    let lapic = json["lapic"].as_str().unwrap().to_string();
    assert_eq!(lapic.len(), 2048, "1 KiB as hex");
    for (bad, why) in [
        (
            lapic[..2000].to_string(),
            "kvm_lapic_state: 1000 bytes, expected 1024",
        ),
        (
            format!("{lapic}00"),
            "kvm_lapic_state: 1025 bytes, expected 1024",
        ),
        (format!("{}zz", &lapic[..2046]), "not a hex digit"),
        (lapic[..2047].to_string(), "odd number of hex digits"),
    ] {
        let mut j = json.clone();
        j["lapic"] = serde_json::Value::String(bad);
        let e = serde_json::from_value::<VcpuState>(j)
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{e}");
    }
    // The binary form: a regs structure one byte short.
    #[derive(serde::Serialize)]
    struct Short<'a>(#[serde(with = "serde_bytes_like")] &'a [u8]);
    mod serde_bytes_like {
        pub fn serialize<S: serde::Serializer>(b: &&[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(b)
        }
    }
    let cfg = bincode::config::standard();
    let regs = bincode::serde::encode_to_vec(Short(&[0; 143]), cfg).unwrap();
    let e = bincode::serde::decode_from_slice::<Raw<kvm_bindings::kvm_regs>, _>(&regs, cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("kvm_regs: 143 bytes, expected 144"), "{e}");
    let bin = bincode::serde::encode_to_vec(&s, cfg).unwrap();
    for cut in [1, bin.len() / 2, bin.len() - 1] {
        assert!(
            bincode::serde::decode_from_slice::<VcpuState, _>(&bin[..cut], cfg).is_err(),
            "a state cut at {cut} of {} bytes is refused",
            bin.len()
        );
    }
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_bad_xsave_area_is_refused_before_anything_is_written() {
    need_kvm();
    let kvm = wv_hypervisor::open().unwrap();
    let Some(host) = state::xsave_size(&kvm) else {
        panic!("this host's KVM has no KVM_CAP_XSAVE: nothing to test")
    };
    let t = new_vm(&kvm);
    let good = state::save_vcpu(&kvm, &t.vcpu).unwrap();
    let target = new_vm(&kvm);
    let before = state::save_vcpu(&kvm, &target.vcpu).unwrap();
    let mut marked = good.clone();
    marked.regs.rax = 0xabcd; // would show if anything were written
    for (len, why) in [
        (4000, "less than the 4096"),
        (host + 64, "more than this host's KVM takes"),
    ] {
        let mut s = marked.clone();
        let mut x = s.xsave.take().unwrap().0;
        x.resize(len, 0);
        s.xsave = Some(Blob(x));
        let e = state::restore_vcpu(&kvm, &target.vcpu, &s).unwrap_err();
        assert!(matches!(e, HvError::State(_)), "{e}");
        assert!(e.to_string().contains(why), "{e}");
        assert_eq!(
            target.vcpu.get_regs().unwrap(),
            *before.regs,
            "nothing written"
        );
    }
    state::restore_vcpu(&kvm, &target.vcpu, &marked).unwrap();
    assert_eq!(target.vcpu.get_regs().unwrap().rax, 0xabcd);
}
