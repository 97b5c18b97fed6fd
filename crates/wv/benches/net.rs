//! virtio-net transmit rate: the probe guest's `netbench` sends N full-size (1514-byte)
//! frames through a TAP in a network namespace this benchmark creates, on wv and on QEMU
//! (virtio-net-pci, same guest), and the host side of the TAP counts what arrived. The probe
//! driver keeps one frame in flight, so this is the per-frame round trip (guest notify,
//! device, used ring), the cost seed 000 wants to be one hand-over per frame.
//!
//! Needs root (namespace, TAP). Run: `cargo bench -p wv --bench net` (env `ROUNDS`, `FRAMES`).

use std::process::Command;

fn ip(args: &[&str]) {
    assert!(
        Command::new("ip").args(args).status().unwrap().success(),
        "ip {args:?}"
    );
}

fn rx_packets(ns: &str) -> u64 {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "cat",
            "/sys/class/net/tap0/statistics/rx_packets",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn field(out: &str, k: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.starts_with("PASS netbench"))?;
    line.split(' ')
        .find_map(|w| w.strip_prefix(&format!("{k}=")))
        .and_then(|v| v.parse().ok())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let frames: u64 = std::env::var("FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let ns = format!("wvnetbench{}", std::process::id());
    ip(&["netns", "add", &ns]);
    ip(&["-n", &ns, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
    ip(&["-n", &ns, "link", "set", "tap0", "up"]);
    let dir = std::env::temp_dir().join(format!("wv-netbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let probe = dir.join("probe.elf");
    std::fs::write(&probe, wv_probe_images::PROBE_PVH).unwrap();
    let cmdline = format!("probe.tests=netbench probe.frames={frames}");
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok();
    let mut fps: [Vec<f64>; 2] = Default::default();
    let mut lost = [0u64; 2];
    let mut khz = 0.0;
    for round in 0..rounds {
        for (i, use_qemu) in [(0, false), (1, true)] {
            if use_qemu && !qemu {
                continue;
            }
            let before = rx_packets(&ns);
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns]);
            if use_qemu {
                c.arg("qemu-system-x86_64")
                    .args([
                        "-accel",
                        "kvm",
                        "-M",
                        "pc",
                        "-m",
                        "128M",
                        "-display",
                        "none",
                        "-no-reboot",
                        "-nodefaults",
                    ])
                    .args([
                        "-serial",
                        "stdio",
                        "-monitor",
                        "none",
                        "-device",
                        "isa-debug-exit,iobase=0xf4,iosize=0x04",
                    ])
                    .arg("-kernel")
                    .arg(&probe)
                    .args(["-append", &cmdline])
                    .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"])
                    .args(["-device", "virtio-net-pci,netdev=n0,disable-legacy=on"]);
            } else {
                c.arg(env!("CARGO_BIN_EXE_wv"))
                    .args(["run", "--memory", "128M", "--kernel"])
                    .arg(&probe)
                    .args(["--net", "tap=tap0", "--cmdline", &cmdline]);
            }
            let out = c.output().unwrap();
            let out = String::from_utf8_lossy(&out.stdout).to_string();
            let cycles = field(&out, "cycles").unwrap_or_else(|| panic!("no netbench line: {out}"));
            if let Some(k) = field(&out, "tsc_khz").filter(|k| *k > 0.0) {
                khz = k;
            }
            assert!(khz > 0.0, "the wv run gives the TSC rate");
            lost[i] += frames - (rx_packets(&ns) - before).min(frames);
            fps[i].push(frames as f64 / (cycles / (khz * 1000.0)));
        }
        eprint!("\rround {}/{rounds}", round + 1);
    }
    eprintln!();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    let _ = std::fs::remove_dir_all(&dir);
    println!("virtio-net transmit, {frames} x 1514-byte frames per run, one in flight, medians of {rounds} rounds");
    for (i, name) in ["wv (probe guest)", "QEMU virtio-net-pci"]
        .iter()
        .enumerate()
    {
        if fps[i].is_empty() {
            println!("{name:<24} NOT MEASURED (qemu-system-x86_64 missing)");
            continue;
        }
        let f = median(&mut fps[i]);
        println!(
            "{name:<24} {f:>9.0} frames/s {:>8.1} MB/s   frames missing at the host: {}",
            f * 1514.0 / 1e6,
            lost[i]
        );
    }
}
