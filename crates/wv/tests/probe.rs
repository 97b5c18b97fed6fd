//! End-to-end tests: `wv run` boots the probe guest on real KVM and the guest's self-tests pass,
//! for every test, with 1 and 4 vCPUs, from both image formats; plus the boot data, the
//! native fallback and the exit accounting the guest's calls produce.

mod common;
use common::*;

const ALL: &str = "boot,smp,timer,hypercall,batch,user,pci,rng";

fn run_probe(format: &str, vcpus: u32, tests: &str) -> Run {
    let dir = TempDir::new("probe");
    let img = image(&dir, format);
    let cmdline = format!("console=ttyS0 probe.tests={tests}");
    let v = vcpus.to_string();
    wv(&[
        "run",
        "--kernel",
        img.to_str().unwrap(),
        "--vcpus",
        &v,
        "--memory",
        "128M",
        "--cmdline",
        &cmdline,
        "--stats=json",
    ])
}

macro_rules! selftest {
    ($($name:ident: $test:literal, $format:literal, $vcpus:literal;)*) => {$(
        #[test]
        #[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
        fn $name() {
            need_kvm();
            let r = run_probe($format, $vcpus, $test);
            assert_eq!(r.status, Some(0), "{r}");
            r.assert_pass($test);
            let proto = if $format == "pvh" { "boot=pvh" } else { "boot=linux64" };
            assert!(r.stdout.contains(proto), "{r}");
        }
    )*};
}

selftest! {
    boot_pvh_1: "boot", "pvh", 1;
    boot_pvh_4: "boot", "pvh", 4;
    boot_bzimage_1: "boot", "bzimage", 1;
    boot_bzimage_4: "boot", "bzimage", 4;
    smp_pvh_1: "smp", "pvh", 1;
    smp_pvh_4: "smp", "pvh", 4;
    smp_bzimage_1: "smp", "bzimage", 1;
    smp_bzimage_4: "smp", "bzimage", 4;
    timer_pvh_1: "timer", "pvh", 1;
    timer_pvh_4: "timer", "pvh", 4;
    timer_bzimage_1: "timer", "bzimage", 1;
    timer_bzimage_4: "timer", "bzimage", 4;
    hypercall_pvh_1: "hypercall", "pvh", 1;
    hypercall_pvh_4: "hypercall", "pvh", 4;
    hypercall_bzimage_1: "hypercall", "bzimage", 1;
    hypercall_bzimage_4: "hypercall", "bzimage", 4;
    batch_pvh_1: "batch", "pvh", 1;
    batch_pvh_4: "batch", "pvh", 4;
    batch_bzimage_1: "batch", "bzimage", 1;
    batch_bzimage_4: "batch", "bzimage", 4;
    user_pvh_1: "user", "pvh", 1;
    user_pvh_4: "user", "pvh", 4;
    user_bzimage_1: "user", "bzimage", 1;
    user_bzimage_4: "user", "bzimage", 4;
    pci_pvh_1: "pci", "pvh", 1;
    pci_bzimage_4: "pci", "bzimage", 4;
    rng_pvh_1: "rng", "pvh", 1;
    rng_bzimage_4: "rng", "bzimage", 4;
    acpi_pvh_1: "acpi", "pvh", 1;
    acpi_pvh_4: "acpi", "pvh", 4;
    acpi_pvh_32: "acpi", "pvh", 32;
    acpi_bzimage_1: "acpi", "bzimage", 1;
    acpi_bzimage_4: "acpi", "bzimage", 4;
    acpi_bzimage_32: "acpi", "bzimage", 32;
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn the_cpuid_warning_names_what_the_guest_really_sees() {
    need_kvm();
    let r = run_probe("pvh", 1, "cpuid");
    assert_eq!(r.status, Some(0), "{r}");
    let line = r.assert_pass("cpuid").to_string();
    // "0x1.0:k=EAX,EBX,ECX,EDX:..." -> the kernel-mode registers of a leaf.
    let regs = |leaf: &str| -> Vec<u32> {
        let at = line.find(&format!("{leaf}:k=")).unwrap() + leaf.len() + 3;
        line[at..]
            .split(':')
            .next()
            .unwrap()
            .split(',')
            .map(|h| u32::from_str_radix(h.trim_start_matches("0x"), 16).unwrap())
            .collect()
    };
    let (l1, l7) = (regs("0x1.0"), regs("0x7.0"));
    let warning = r
        .stderr
        .lines()
        .find(|l| l.starts_with("wv: warning: this host's KVM"));
    let Some(warning) = warning else {
        // A host that honours the VMM's table: nothing to warn about.
        return;
    };
    let names = warning
        .split("says: ")
        .nth(1)
        .unwrap()
        .split(" (")
        .next()
        .unwrap();
    let bit = |name: &str| -> (u32, u32) {
        match name {
            "sse3" => (l1[2], 0),
            "ssse3" => (l1[2], 9),
            "cx16" => (l1[2], 13),
            "sse4.1" => (l1[2], 19),
            "sse4.2" => (l1[2], 20),
            "popcnt" => (l1[2], 23),
            "xsave" => (l1[2], 26),
            "avx" => (l1[2], 28),
            "avx2" => (l7[1], 5),
            "avx512f" => (l7[1], 16),
            "avx512dq" => (l7[1], 17),
            "avx512cd" => (l7[1], 28),
            "avx512bw" => (l7[1], 30),
            "avx512vl" => (l7[1], 31),
            other => panic!("unknown feature {other} in: {warning}"),
        }
    };
    let named: Vec<&str> = names.split(' ').collect();
    for name in [
        "sse3", "ssse3", "cx16", "sse4.1", "sse4.2", "popcnt", "xsave", "avx", "avx2", "avx512f",
        "avx512dq", "avx512cd", "avx512bw", "avx512vl",
    ] {
        // What the warning names the guest sees; what wv clears and it does not name, it does
        // not see.
        let (reg, b) = bit(name);
        let seen = reg & (1 << b) != 0;
        assert_eq!(seen, named.contains(&name), "{name}: {warning}\n{line}");
    }
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_kernel_mode_int3_reaches_the_guests_handler() {
    need_kvm();
    for format in ["pvh", "bzimage"] {
        let r = run_probe(format, 1, "int3");
        assert_eq!(r.status, Some(0), "{r}");
        assert!(r.assert_pass("int3").contains("bp=1"), "{r}");
        // Where the host's emulator runs guest kernel code (PVM: no VMX/SVM in the host's
        // CPU flags) it cannot run int3, so wv raised the #BP itself, counted; elsewhere the
        // instruction ran natively.
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let hw_virt = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        let injected = cause_count(&r.stats(), "emulated:int3");
        assert_eq!(injected, u64::from(!hw_virt), "{r}");
    }
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn acpi_tables_describe_the_machine_and_s5_powers_it_off() {
    need_kvm();
    for (format, vcpus) in [("pvh", 4), ("bzimage", 2)] {
        let dir = TempDir::new("probe-acpi");
        let img = image(&dir, format);
        let r = wv(&[
            "run",
            "--kernel",
            img.to_str().unwrap(),
            "--vcpus",
            &vcpus.to_string(),
            "--cmdline",
            "probe.tests=smp,acpi probe.poweroff=acpi",
            "--stats=json",
        ]);
        assert_eq!(r.status, Some(0), "{r}");
        let line = r.assert_pass("acpi");
        assert!(
            line.contains("tables=FACP,APIC,MCFG,DSDT")
                && line.contains(&format!("lapics={vcpus} ioapics=1"))
                && line.contains("hw-reduced=yes sleep-port=0x600 s5=5 ecam=0xe0000000"),
            "{line}"
        );
        // The processors come from the MADT now that the loader names the RSDP.
        assert!(r.assert_pass("smp").contains("source=madt"), "{r}");
        // The VM ended through the sleep control register, not the paravirtual call.
        assert!(
            r.stdout.contains("probe: powering off through ACPI S5"),
            "{r}"
        );
        let s = r.stats();
        assert_eq!(cause_count(&s, "io:acpi-sleep"), 1, "{r}");
        assert_eq!(cause_count(&s, "hypercall:poweroff"), 0, "{r}");
    }
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn default_run_boots_the_embedded_guest_and_passes_everything() {
    need_kvm();
    let r = wv(&["run", "--stats=json"]);
    assert_eq!(r.status, Some(0), "{r}");
    for t in ALL.split(',') {
        r.assert_pass(t);
    }
    assert!(
        r.stdout
            .contains("probe: summary passed=8 failed=0 skipped=0"),
        "{r}"
    );
    assert!(
        r.stderr.contains("wv: guest powered off with exit code 0"),
        "{r}"
    );
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn smp_brings_up_every_vcpu() {
    need_kvm();
    for n in [2u32, 7, 32] {
        let r = run_probe("pvh", n, "smp");
        let line = r.assert_pass("smp");
        assert!(line.contains(&format!("cpus={n} ")), "{line}");
        assert!(line.contains(&format!("aps-started={} ", n - 1)), "{line}");
    }
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn batched_calls_take_one_exit_and_accounting_agrees() {
    need_kvm();
    let r = run_probe("pvh", 1, "batch");
    let line = r.assert_pass("batch");
    assert!(
        line.contains("trapping=32 exits")
            && line.contains("calls=32 exits")
            && line.contains("batched=1 exits"),
        "{line}"
    );
    let s = r.stats();
    // The guest's own count and the VMM's table agree: one batch exit carrying 32 console writes.
    assert_eq!(cause_count(&s, "hypercall:batch"), 1, "{r}");
    let batched = &s["vcpus"][0]["batched_calls"];
    assert_eq!(batched[0]["cause"], "console_write");
    assert_eq!(batched[0]["count"], 32);
    // 32 single console calls in the test itself, plus the lines the guest printed.
    assert!(cause_count(&s, "hypercall:console_write") >= 32 + 4, "{r}");
    // 32 trapping UART writes (and no UART reads: the console goes through the call).
    assert_eq!(cause_count(&s, "io:serial"), 32, "{r}");
    assert_eq!(cause_count(&s, "hypercall:poweroff"), 1, "{r}");
    assert_eq!(
        s["exits"].as_u64().unwrap(),
        s["vcpus"][0]["exits"].as_u64().unwrap()
    );
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn stats_table_lists_causes_with_times() {
    need_kvm();
    let r = wv(&["run", "--cmdline", "probe.tests=boot", "--stats"]);
    assert_eq!(r.status, Some(0), "{r}");
    assert!(r.stderr.contains("exit accounting"), "{r}");
    assert!(
        r.stderr
            .lines()
            .any(|l| l.contains("hypercall:poweroff") && l.trim_start().starts_with('0')),
        "{r}"
    );
    assert!(r.stderr.contains("guest "), "{r}");
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn initrd_and_cmdline_reach_the_guest_through_both_protocols() {
    need_kvm();
    let dir = TempDir::new("initrd");
    let data = pattern(12_345, 7);
    let initrd = dir.file("initrd.img", &data);
    let sum = wv_abi::initrd_checksum(&data);
    for format in ["pvh", "bzimage"] {
        let img = image(&dir, format);
        let good = format!("probe.tests=boot probe.initrd={}:{sum:#x}", data.len());
        let r = wv(&[
            "run",
            "--kernel",
            img.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            &good,
        ]);
        assert_eq!(r.status, Some(0), "{r}");
        let line = r.assert_pass("boot");
        assert!(line.contains("initrd=12345B"), "{line}");
        assert!(line.contains(&format!("cmdline={}B", good.len())), "{line}");
        // A wrong checksum is caught by the guest: its exit code (1) comes through.
        let bad = format!(
            "probe.tests=boot probe.initrd={}:{:#x}",
            data.len(),
            sum ^ 1
        );
        let r = wv(&[
            "run",
            "--kernel",
            img.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            &bad,
        ]);
        assert_eq!(r.status, Some(1), "{r}");
        assert!(r.result_of("boot").unwrap().starts_with("FAIL"), "{r}");
    }
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn memory_map_matches_configured_memory() {
    need_kvm();
    // 4 GiB crosses the MMIO hole: RAM continues above 4 GiB, and the guest's e820 total and
    // the VMM's mem_size call must still agree (checked by the hypercall test).
    let r = wv(&[
        "run",
        "--memory",
        "4G",
        "--cmdline",
        "probe.tests=boot,hypercall",
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    assert!(r.assert_pass("boot").contains("e820=5"), "{r}");
    assert!(r.assert_pass("hypercall").contains("mem=4194304KiB"), "{r}");
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn pv_off_takes_the_native_paths() {
    need_kvm();
    let r = wv(&[
        "run",
        "--cmdline",
        &format!("probe.pv=off probe.tests={ALL}"),
        "--stats=json",
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    assert!(r.stdout.contains("hypervisor=ignored(probe.pv=off)"), "{r}");
    assert!(
        r.assert_pass("hypercall")
            .contains("native-fallback signature='WorldvisorVM'"),
        "{r}"
    );
    assert!(r.result_of("batch").unwrap().starts_with("SKIP"), "{r}");
    let s = r.stats();
    // Console output now traps once per byte (plus a status read each): far more UART exits,
    // and no console calls.
    assert_eq!(cause_count(&s, "hypercall:console_write"), 0, "{r}");
    assert!(
        cause_count(&s, "io:serial") > 2 * r.stdout.len() as u64 - 10,
        "{r}"
    );
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn serial_to_file_and_none() {
    need_kvm();
    let dir = TempDir::new("serial");
    let log = dir.path("console.log");
    let r = wv(&[
        "run",
        "--cmdline",
        "probe.tests=boot",
        "--serial",
        log.to_str().unwrap(),
    ]);
    assert_eq!(r.status, Some(0), "{r}");
    assert!(r.stdout.is_empty(), "{r}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("PASS boot"), "{text}");
    let r = wv(&["run", "--cmdline", "probe.tests=boot", "--serial", "none"]);
    assert_eq!(r.status, Some(0), "{r}");
    assert!(r.stdout.is_empty(), "{r}");
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn virtio_rng_serves_the_guest_without_vcpu_exits_for_notifications() {
    need_kvm();
    let r = wv(&["run", "--cmdline", "probe.tests=rng", "--stats=json"]);
    assert_eq!(r.status, Some(0), "{r}");
    let line = r.assert_pass("rng");
    assert!(
        line.contains("lens=64,64") && line.contains("isr=0x1") && line.contains("reset=ok"),
        "{r}"
    );
    // Set-up is a few dozen register accesses; the two notifications go to the ioeventfd.
    let s = r.stats();
    let mmio = cause_count(&s, "mmio:virtio-rng");
    assert!((10..=100).contains(&mmio), "{mmio} MMIO exits\n{r}");
    // Four requests (two on INTx, one on MSI-X, one after the BAR moved, on a queue with no
    // vector): four notifications and three interrupts, none of them a vCPU exit.
    assert_eq!(device_activity(&s, "virtio-rng"), (4, 3), "{r}");
    assert!(
        line.contains("msix=1") && line.contains("bar-moved=ok"),
        "{r}"
    );
    // Without the device the guest finds nothing and says so.
    let r = wv(&["run", "--rng", "off", "--cmdline", "probe.tests=pci,rng"]);
    assert_eq!(r.status, Some(1), "{r}");
    assert!(r.assert_pass("pci").contains("functions=1"), "{r}");
    assert!(
        r.result_of("rng")
            .unwrap()
            .starts_with("FAIL rng no modern virtio-rng device"),
        "{r}"
    );
}

fn disk_image(dir: &TempDir, name: &str, len: usize) -> std::path::PathBuf {
    let mut d = vec![0u8; len];
    d[..8].copy_from_slice(b"WVDISK01");
    dir.file(name, &d)
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn virtio_blk_reads_writes_persists_and_refuses_writes_to_readonly_disks() {
    need_kvm();
    for (format, vcpus) in [("pvh", "1"), ("bzimage", "4")] {
        let dir = TempDir::new("blk");
        let img = image(&dir, format);
        let rw = disk_image(&dir, "rw.img", 1 << 20);
        let ro = disk_image(&dir, "ro.img", 64 << 10);
        let r = wv(&[
            "run",
            "--kernel",
            img.to_str().unwrap(),
            "--vcpus",
            vcpus,
            "--disk",
            &format!("path={},id=root", rw.display()),
            "--disk",
            &format!("path={},readonly=on,id=ro0", ro.display()),
            "--cmdline",
            "probe.tests=blk",
            "--stats=json",
        ]);
        assert_eq!(r.status, Some(0), "{r}");
        let line = r.assert_pass("blk");
        assert!(
            line.contains("disks=2 root:sectors=2048,magic,rw-ok ro0:sectors=128,magic,ro-refused"),
            "{line}"
        );
        // What the guest wrote is in the image on the host; the read-only image is untouched.
        let data = std::fs::read(&rw).unwrap();
        assert!(
            (0..512).all(|i| data[512 + i] == i.to_le_bytes()[0] ^ 0xa5 ^ 1),
            "sector 1 of the image"
        );
        let rodata = std::fs::read(&ro).unwrap();
        assert!(rodata[512..1024].iter().all(|&b| b == 0));
        let s = r.stats();
        assert!(
            cause_count(&s, "mmio:virtio-blk:root") > 0
                && cause_count(&s, "mmio:virtio-blk:ro0") > 0,
            "{r}"
        );
        // GET_ID, sector 0, write, flush, read back, read past the end / GET_ID, sector 0, refused write.
        assert_eq!(device_activity(&s, "virtio-blk:root"), (6, 6), "{r}");
        assert_eq!(device_activity(&s, "virtio-blk:ro0"), (3, 3), "{r}");
    }
}

#[test]
#[ignore = "needs /dev/kvm: cargo test -- --include-ignored (scripts/test does)"]
fn a_config_file_gives_wv_run_the_whole_vm() {
    need_kvm();
    let dir = TempDir::new("probe-config");
    let mut disk = vec![0u8; 1 << 20];
    disk[..8].copy_from_slice(b"WVDISK01");
    std::fs::create_dir_all(dir.path("vm")).unwrap();
    dir.file("vm/d.img", &disk);
    // Every kind of field, typed and in the short forms; the disk's path is relative to the
    // file, which is not where wv runs.
    let config = dir.file(
        "vm/config.json",
        br#"{
            "kernel": {"embedded": "bzimage"},
            "cmdline": "console=ttyS0 probe.tests=boot,smp,pci,blk",
            "memory": "64M",
            "vcpus": 2,
            "rng": false,
            "disks": [{"path": "d.img", "readonly": true, "id": "cfgdisk"}]
        }"#,
    );
    let mut c = std::process::Command::new(wv_bin());
    c.current_dir(dir.path(""))
        .args(["run", "--config", config.to_str().unwrap(), "--stats=json"]);
    let r = run_cmd(c, std::time::Duration::from_secs(120));
    assert_eq!(r.status, Some(0), "{r}");
    assert!(r.stdout.contains("boot=linux64"), "the bzImage: {r}");
    assert!(r.assert_pass("smp").contains("cpus=2"), "{r}");
    let blk = r.assert_pass("blk");
    assert!(
        blk.contains("cfgdisk:sectors=2048") && blk.contains("ro-refused"),
        "{blk}"
    );
    // The host bridge and the disk: no rng.
    assert!(r.assert_pass("pci").contains("functions=2"), "{r}");
    assert!(
        cause_count(&r.stats(), "mmio:virtio-blk:cfgdisk") > 0,
        "{r}"
    );
}
