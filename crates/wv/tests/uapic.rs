//! `wv run --irqchip user`: KVM without its in-kernel irqchip, the VMM's own local APICs and
//! I/O APIC (crates/vmm/src/uapic.rs). The probe guest's core self-tests pass on 1, 2 and 4
//! vCPUs (SMP start-up by INIT/SIPI, the APIC timer, CPL3 code interrupted by it), a virtio
//! device's MSI-X reaches the guest through the userspace delivery, the serial console works
//! both ways, and what the mode cannot do is refused with the option named.

mod common;

use common::vmm::{call, wait_for_socket, Vmm};
use common::*;
use std::time::Duration;

const CORE: &str = "boot,smp,timer,hypercall,batch,user";

/// `wv run --irqchip user` with `vcpus` and the probe's `tests`, plus `extra` options.
fn run_user(vcpus: u32, tests: &str, extra: &[&str]) -> Run {
    let cmdline = format!("console=ttyS0 probe.tests={tests}");
    let v = vcpus.to_string();
    let mut args = vec![
        "run",
        "--irqchip",
        "user",
        "--vcpus",
        &v,
        "--memory",
        "128M",
        "--cmdline",
        &cmdline,
        "--stats=json",
    ];
    args.extend_from_slice(extra);
    wv(&args)
}

/// Every test in `tests` passed, and the guest's APIC accesses were the VMM's to answer (the
/// in-kernel LAPIC would have taken them without an exit).
fn assert_user_mode_pass(r: &Run, tests: &str) {
    assert_eq!(r.status, Some(0), "{r}");
    for t in tests.split(',') {
        r.assert_pass(t);
    }
    let stats = r.stats();
    assert!(
        cause_count(&stats, "mmio:lapic") > 0,
        "no local APIC access reached the VMM: {r}"
    );
}

macro_rules! core_tests {
    ($($name:ident: $vcpus:literal;)*) => {$(
        #[test]
        #[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
        fn $name() {
            need_kvm();
            let r = run_user($vcpus, CORE, &[]);
            assert_user_mode_pass(&r, CORE);
            let smp = r.assert_pass("smp");
            assert!(
                smp.contains(&format!("aps-started={}", $vcpus - 1)),
                "every AP started by INIT/SIPI: {smp}"
            );
        }
    )*};
}

core_tests! {
    core_selftests_1_vcpu: 1;
    core_selftests_2_vcpus: 2;
    core_selftests_4_vcpus: 4;
}

/// virtio-rng's MSI-X vector: the device signals an eventfd, the relay thread turns it into
/// the MSI the guest programmed and delivers it to the vCPU it names (no irqfd exists in this
/// mode, so the guest's count of MSI-X interrupts is the userspace path's).
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn rng_msix_goes_through_userspace_delivery() {
    need_kvm();
    for vcpus in [1, 2] {
        let r = run_user(vcpus, "pci,rng", &[]);
        assert_user_mode_pass(&r, "pci,rng");
        let rng = r.assert_pass("rng");
        assert!(rng.contains("msix=1"), "one MSI-X interrupt taken: {rng}");
        let (_, interrupts) = device_activity(&r.stats(), "virtio-rng");
        assert!(interrupts >= 1, "the device interrupted: {r}");
    }
}

/// virtio-blk on a raw image in this mode, with the APs started first: the probe's disk test
/// passes (it polls its queue; the interrupt path is the rng test's).
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn blk_works_with_the_userspace_irqchip() {
    need_kvm();
    let dir = TempDir::new("uapic-blk");
    let img = disk_image(&dir, "d.img", 1 << 20);
    let spec = format!("path={}", img.display());
    let r = run_user(2, "smp,blk", &["--disk", &spec]);
    assert_user_mode_pass(&r, "smp,blk");
}

/// The serial console: output (every line above) and input from stdin, echoed by the guest.
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn serial_console_input_and_output() {
    need_kvm();
    let mut vm = Vmm::run(&[
        "--irqchip",
        "user",
        "--cmdline",
        "console=ttyS0 probe.tests=echo",
    ])
    .stdin()
    .spawn();
    vm.wait_for("echo: type, 'q' ends");
    vm.type_in("hiq");
    // The echo has no newline of its own: it prefixes the result line.
    let l = vm.wait_for("PASS echo echoed=2");
    assert!(l.starts_with("hi"), "{l}");
    assert_eq!(vm.wait(), 0);
}

/// What the mode cannot do is refused, naming the option: at start (a snapshot or a migration
/// to bring back), and on the control API (pause, snapshot), while the VM runs on.
#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn unsupported_operations_are_refused() {
    need_kvm();
    let dir = TempDir::new("uapic-refuse");
    let snap = dir.path("snap");
    let r = wv(&[
        "run",
        "--irqchip",
        "user",
        "--restore",
        snap.to_str().unwrap(),
    ]);
    assert_eq!(r.status, Some(200), "{r}");
    assert!(
        r.stderr
            .contains("--irqchip user cannot be used with --restore"),
        "{r}"
    );
    let r = wv(&["run", "--irqchip", "user", "--incoming", "127.0.0.1:0"]);
    assert_eq!(r.status, Some(200), "{r}");
    assert!(
        r.stderr
            .contains("--irqchip user cannot be used with --incoming"),
        "{r}"
    );
    let r = wv(&["run", "--irqchip", "both"]);
    assert_eq!(r.status, Some(200), "{r}");
    assert!(
        r.stderr.contains("--irqchip 'both': use kernel or user"),
        "{r}"
    );

    let sock = dir.path("api.sock");
    let mut vm = Vmm::start(&[
        "--irqchip",
        "user",
        "--api-socket",
        sock.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 probe.tests=idle",
    ]);
    vm.wait_for("idle: halted until stopped");
    wait_for_socket(&sock, Duration::from_secs(10));
    for (path, body) in [
        ("/vm/pause", None),
        (
            "/vm/snapshot",
            Some(serde_json::json!({"destination": snap.to_str().unwrap()})),
        ),
    ] {
        let (st, v) = call(&sock, "PUT", path, body.as_ref());
        assert_eq!(st, 409, "{path}: {v}");
        assert!(
            v.to_string().contains("not with --irqchip user"),
            "{path}: {v}"
        );
    }
    assert!(!snap.exists(), "no snapshot was written");
    let (st, v) = call(&sock, "GET", "/vm", None);
    assert_eq!((st, v["state"].as_str()), (200, Some("running")), "{v}");
    let (st, _) = call(&sock, "PUT", "/vm/shutdown", None);
    assert_eq!(st, 204);
    assert_eq!(
        vm.wait(),
        128 + libc::SIGTERM,
        "the VM ended by the API's shutdown"
    );
}
