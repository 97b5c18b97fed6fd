//! The probe guest against an independent implementation: QEMU (-M pc, KVM, PVH boot). Every
//! self-test that does not need Worldvisor must pass there; `batch` reports SKIP.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

#[test]
fn probe_guest_passes_on_qemu() {
    if !need_kvm() {
        return;
    }
    let qemu = "qemu-system-x86_64";
    if Command::new(qemu).arg("--version").output().is_err() {
        panic!("{qemu} is not installed: .ci/run installs Debian's qemu-system-x86");
    }
    let dir = TempDir::new("qemu");
    let img = image(&dir, "pvh");
    let data = pattern(5000, 11);
    let initrd = dir.file("initrd", &data);
    let cmdline = format!(
        "probe.tests=boot,smp,timer,hypercall,batch,user,pci,rng probe.initrd={}:{:#x}",
        data.len(),
        wv_abi::initrd_checksum(&data)
    );
    let mut c = Command::new(qemu);
    c.args([
        "-accel",
        "kvm",
        "-M",
        "pc",
        "-m",
        "128M",
        "-smp",
        "2",
        "-display",
        "none",
        "-no-reboot",
    ])
    .args(["-serial", "stdio", "-monitor", "none", "-nodefaults"])
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
    .args(["-device", "virtio-rng-pci,disable-legacy=on"])
    .arg("-kernel")
    .arg(&img)
    .arg("-initrd")
    .arg(&initrd)
    .args(["-append", &cmdline]);
    let r = run_cmd(c, Duration::from_secs(300));
    // isa-debug-exit: status = (code << 1) | 1, so the guest's 0 arrives as 1.
    assert_eq!(r.status, Some(1), "{r}");
    assert!(r.stdout.contains("hypervisor=other-or-none"), "{r}");
    for t in ["boot", "smp", "timer", "hypercall", "user", "pci", "rng"] {
        r.assert_pass(t);
    }
    assert!(r.assert_pass("boot").contains("initrd=5000B"), "{r}");
    assert!(r.assert_pass("smp").contains("cpus=2"), "{r}");
    assert!(
        r.assert_pass("hypercall").contains("native-fallback"),
        "{r}"
    );
    assert!(
        r.result_of("batch").unwrap().starts_with("SKIP batch"),
        "{r}"
    );
    assert!(
        r.stdout
            .contains("probe: summary passed=7 failed=0 skipped=1"),
        "{r}"
    );
}
