//! A stock Linux kernel under `wv`: Debian's cloud kernel (prepared by `scripts/linux-boot
//! --fetch-only`, which scripts/test runs and names in WV_LINUX_KERNEL / WV_LINUX_INITRD) boots
//! far enough to print its version and to find every vCPU and the I/O APIC in the ACPI MADT;
//! with `--irqchip user` (the VMM's own local APICs and I/O APIC), far enough to bring up its
//! second CPU (INIT/SIPI, IPIs and the APIC timer, all through the VMM), also when that CPU
//! runs on another node of a cluster (`wv run --cluster`, its IPIs over the link).
//! (Guest kernel code is emulated on some hosts, so this reads the first seconds of the boot,
//! not the whole boot: `scripts/linux-boot` goes the whole way and reports.)

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Boots Debian's kernel with `extra` options until every line of `wanted` was seen (within
/// 300 s), and fails with the console's lines otherwise.
fn boot_until(extra: &[&str], wanted: &[&str]) {
    boot_with(&["--vcpus", "2", "--memory", "512M"], extra, wanted);
}

/// [`boot_until`] with `size` giving the VM's vCPUs and memory (or a cluster spec).
fn boot_with(size: &[&str], extra: &[&str], wanted: &[&str]) {
    need_kvm();
    let var = |v: &str| {
        std::env::var(v)
            .unwrap_or_else(|_| panic!("{v} is not set: run scripts/linux-boot --fetch-only"))
    };
    let (kernel, initrd) = (var("WV_LINUX_KERNEL"), var("WV_LINUX_INITRD"));
    let mut child = Command::new(wv_bin())
        .args(["run", "--kernel", &kernel, "--initrd", &initrd])
        .args(size)
        .args(["--cmdline", "console=ttyS0 noxsave panic=-1"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = vec![false; wanted.len()];
    let mut log = Vec::new();
    let start = Instant::now();
    while seen.iter().any(|s| !s) {
        let left = Duration::from_secs(300).saturating_sub(start.elapsed());
        let Ok(line) = rx.recv_timeout(left) else {
            break;
        };
        for (i, w) in wanted.iter().enumerate() {
            seen[i] |= line.contains(w);
        }
        assert!(
            !line.contains("not listed by BIOS"),
            "the kernel did not find the boot CPU: {line}"
        );
        log.push(line);
    }
    let _ = child.kill();
    let _ = child.wait();
    for (i, w) in wanted.iter().enumerate() {
        assert!(
            seen[i],
            "no '{w}' within 300 s; the console said:\n{}",
            log.join("\n")
        );
    }
}

#[test]
#[ignore = "needs /dev/kvm and Debian's cloud kernel (WV_LINUX_KERNEL): scripts/test provides both"]
fn debian_cloud_kernel_finds_its_cpus_in_acpi() {
    boot_until(
        &[],
        &[
            "Linux version 6.",
            "IOAPIC[0]: apic_id 2, version 17, address 0xfec00000, GSI 0-23",
            "ACPI: Using ACPI (MADT) for SMP configuration information",
            "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
        ],
    );
}

#[test]
#[ignore = "needs /dev/kvm and Debian's cloud kernel (WV_LINUX_KERNEL): scripts/test provides both"]
fn debian_cloud_kernel_brings_up_both_cpus_with_the_userspace_irqchip() {
    boot_until(
        &["--irqchip", "user"],
        &[
            "Linux version 6.",
            "IOAPIC[0]: apic_id 2, version 17, address 0xfec00000, GSI 0-23",
            "smp: Brought up 1 node, 2 CPUs",
        ],
    );
}

/// vCPU 1 on node 1 of a cluster: the kernel brings it up (INIT/SIPI and its IPIs over the
/// link), its device accesses (the serial console, at least) are forwarded to node 0; SIGINT
/// then stops the VM in order and node 0 reports the counts.
#[test]
#[ignore = "needs /dev/kvm and Debian's cloud kernel (WV_LINUX_KERNEL): scripts/test provides both"]
fn debian_cloud_kernel_brings_up_its_second_cpu_on_another_node() {
    need_kvm();
    let var = |v: &str| {
        std::env::var(v)
            .unwrap_or_else(|_| panic!("{v} is not set: run scripts/linux-boot --fetch-only"))
    };
    let (kernel, initrd) = (var("WV_LINUX_KERNEL"), var("WV_LINUX_INITRD"));
    let dir = TempDir::new("linux-cluster");
    let spec = dir.file(
        "c.toml",
        b"vcpus = 2\nmemory = \"512M\"\n[[node]]\nlisten = \"127.0.0.1:0\"\nvcpus = [0]\n\
          [[node]]\nlisten = \"127.0.0.1:0\"\nvcpus = [1]\n",
    );
    let err = dir.0.join("stderr");
    let mut child = Command::new(wv_bin())
        .args(["run", "--cluster", spec.to_str().unwrap()])
        .args(["--kernel", &kernel, "--initrd", &initrd])
        .args(["--cmdline", "console=ttyS0 noxsave panic=-1"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut log = Vec::new();
    let up = loop {
        let left = Duration::from_secs(300).saturating_sub(start.elapsed());
        let Ok(line) = rx.recv_timeout(left) else {
            break false;
        };
        let done = line.contains("smp: Brought up 1 node, 2 CPUs");
        log.push(line);
        if done {
            break true;
        }
    };
    // SAFETY: kill(2) on the child started above.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    let stderr = std::fs::read_to_string(&err).unwrap();
    assert!(
        up,
        "no 'smp: Brought up 1 node, 2 CPUs' within 300 s:\n{}\n{stderr}",
        log.join("\n")
    );
    assert_eq!(status.code(), Some(130), "{stderr}");
    let counts = stderr
        .lines()
        .find(|l| l.contains("interrupt messages between nodes"))
        .unwrap_or_else(|| panic!("no counts:\n{stderr}"));
    println!("{counts}");
    let forwarded: u64 = counts
        .split("; ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{counts}"));
    assert!(forwarded > 0, "{counts}");
}
