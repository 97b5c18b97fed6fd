//! The probe guest against an independent implementation: QEMU (-M pc, KVM, PVH boot). Every
//! self-test that does not need Worldvisor must pass there; `batch` reports SKIP.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn probe_guest_passes_on_qemu() {
    need_kvm();
    let qemu = "qemu-system-x86_64";
    if Command::new(qemu).arg("--version").output().is_err() {
        panic!("{qemu} is not installed: .ci/run installs Debian's qemu-system-x86");
    }
    let dir = TempDir::new("qemu");
    let img = image(&dir, "pvh");
    let data = pattern(5000, 11);
    let initrd = dir.file("initrd", &data);
    let mut disk = vec![0u8; 1 << 20];
    disk[..8].copy_from_slice(b"WVDISK01");
    let rw = dir.file("rw.img", &disk);
    let ro = dir.file("ro.img", &disk[..64 << 10]);
    let cmdline = format!(
        "probe.tests=boot,smp,timer,hypercall,batch,user,pci,rng,blk,acpi probe.initrd={}:{:#x}",
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
    .args([
        "-drive",
        &format!("file={},if=none,id=d0,format=raw", rw.display()),
    ])
    .args([
        "-device",
        "virtio-blk-pci,drive=d0,disable-legacy=on,serial=root",
    ])
    .args([
        "-drive",
        &format!("file={},if=none,id=d1,format=raw,readonly=on", ro.display()),
    ])
    .args([
        "-device",
        "virtio-blk-pci,drive=d1,disable-legacy=on,serial=ro0",
    ])
    .arg("-kernel")
    .arg(&img)
    .arg("-initrd")
    .arg(&initrd)
    .args(["-append", &cmdline]);
    let r = run_cmd(c, Duration::from_secs(300));
    // isa-debug-exit: status = (code << 1) | 1, so the guest's 0 arrives as 1.
    assert_eq!(r.status, Some(1), "{r}");
    assert!(r.stdout.contains("hypervisor=other-or-none"), "{r}");
    for t in [
        "boot",
        "smp",
        "timer",
        "hypercall",
        "user",
        "pci",
        "rng",
        "blk",
        "acpi",
    ] {
        r.assert_pass(t);
    }
    // The guest's ACPI reader agrees with an independent firmware's tables.
    assert!(r.assert_pass("acpi").contains("lapics=2 ioapics=1"), "{r}");
    assert!(r.assert_pass("boot").contains("initrd=5000B"), "{r}");
    assert!(r.assert_pass("smp").contains("cpus=2"), "{r}");
    let blk = r.assert_pass("blk");
    assert!(
        blk.contains("root:sectors=2048,magic,rw-ok ro0:sectors=128,magic,ro-refused"),
        "{blk}"
    );
    let written = std::fs::read(&rw).unwrap();
    assert!((0..512).all(|i| written[512 + i] == i.to_le_bytes()[0] ^ 0xa5 ^ 1));
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
            .contains("probe: summary passed=9 failed=0 skipped=1"),
        "{r}"
    );
}
