//! Start-up, exit-cost and memory benchmark: `wv`, QEMU (microvm, KVM) and a bare C KVM_RUN
//! loop boot the same tiny PVH guest (`exitbench`: one byte to the serial port, N port writes,
//! poweroff), interleaved round by round, and the medians are printed.
//!
//! - first byte: from spawning the process to reading the guest's first serial byte on a pipe;
//! - exit: from spawning to the process being reaped (`wait4`), guest doing no loop;
//! - output EOF: from spawning to end-of-file on its stdout (what a reader of the output waits for);
//! - peak RSS: `ru_maxrss` from `wait4`, with 128 MiB of guest memory;
//! - port-I/O exit: (time from first byte to exit with N writes − the same with 0) / N.
//!
//! Run: `cargo bench -p wv --bench vmm` (env `ROUNDS`, `LOOP_N`; `WV_BENCH_ALSO=PATH[:PATH…]`
//! adds rows for other builds of `wv`, interleaved with this one). Needs gcc and, for the QEMU
//! column, qemu-system-x86_64; a missing one is reported, not silently dropped.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

struct Sample {
    first_byte_us: f64,
    exit_us: f64,
    eof_us: f64,
    maxrss_kib: i64,
}

fn run_once(cmd: &mut Command) -> Result<Sample, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    let mut out = child.stdout.take().unwrap();
    let mut b = [0u8; 1];
    out.read_exact(&mut b)
        .map_err(|e| format!("{cmd:?}: no serial byte: {e}"))?;
    let first = t0.elapsed();
    // End-of-file on stdout is what a reader of the output (`out=$(wv run)`, a pipe to tee)
    // waits for; it may come after the reap if something else holds the pipe.
    let eof = std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = out.read_to_end(&mut rest);
        t0.elapsed()
    });
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data filled by the kernel.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child with valid out-pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let exit = t0.elapsed();
    if r != pid {
        return Err(format!("wait4 failed for {cmd:?}"));
    }
    let st = std::process::ExitStatus::from_raw(status);
    let eof = eof.join().unwrap();
    std::mem::forget(child); // already reaped
    if b[0] != b'!' {
        return Err(format!(
            "{cmd:?}: unexpected first byte {:?} (status {st})",
            b[0]
        ));
    }
    Ok(Sample {
        first_byte_us: first.as_secs_f64() * 1e6,
        exit_us: exit.as_secs_f64() * 1e6,
        eof_us: eof.as_secs_f64() * 1e6,
        maxrss_kib: ru.ru_maxrss,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

struct Runner {
    name: &'static str,
    cmd: Box<dyn Fn(u64) -> Command>,
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let loop_n: u64 = std::env::var("LOOP_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50_000);
    let dir = std::env::temp_dir().join(format!("wv-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let guest = dir.join("exitbench.elf");
    std::fs::write(&guest, wv_probe_images::EXITBENCH_PVH).unwrap();
    let bare = dir.join("bare");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/bare.c");
    let gcc = Command::new("gcc")
        .args(["-O2", "-o"])
        .arg(&bare)
        .arg(&src)
        .status();
    let wv = PathBuf::from(env!("CARGO_BIN_EXE_wv"));

    let mut runners: Vec<Runner> = Vec::new();
    if matches!(gcc, Ok(s) if s.success()) {
        let (b, g) = (bare.clone(), guest.clone());
        runners.push(Runner {
            name: "bare KVM_RUN loop (C)",
            cmd: Box::new(move |n| {
                let mut c = Command::new(&b);
                c.arg(&g).arg(n.to_string()).arg("128");
                c
            }),
        });
        let (b, g) = (bare.clone(), guest.clone());
        runners.push(Runner {
            name: "bare loop + irqchip/PIT",
            cmd: Box::new(move |n| {
                let mut c = Command::new(&b);
                c.arg(&g).arg(n.to_string()).arg("128").arg("irqchip");
                c
            }),
        });
    } else {
        println!("bare loop: NOT MEASURED (gcc failed: {gcc:?})");
    }
    let (w, g) = (wv.clone(), guest.clone());
    runners.push(Runner {
        name: "wv run",
        cmd: Box::new(move |n| {
            let mut c = Command::new(&w);
            c.args(["run", "--memory", "128M", "--serial", "stdio", "--kernel"])
                .arg(&g)
                .args(["--cmdline", &n.to_string()]);
            c
        }),
    });
    // Other builds of wv, interleaved with this one (`WV_BENCH_ALSO=/path/a:/path/b`), to compare
    // a change before and after in one run rather than across two runs' drift.
    for other in std::env::var("WV_BENCH_ALSO")
        .unwrap_or_default()
        .split(':')
    {
        if other.is_empty() {
            continue;
        }
        let (w, g) = (PathBuf::from(other), guest.clone());
        runners.push(Runner {
            name: Box::leak(format!("wv run ({other})").into_boxed_str()),
            cmd: Box::new(move |n| {
                let mut c = Command::new(&w);
                c.args(["run", "--memory", "128M", "--serial", "stdio", "--kernel"])
                    .arg(&g)
                    .args(["--cmdline", &n.to_string()]);
                c
            }),
        });
    }
    let (w, g) = (wv.clone(), guest.clone());
    runners.push(Runner {
        name: "wv run --seccomp=off",
        cmd: Box::new(move |n| {
            let mut c = Command::new(&w);
            c.args([
                "run",
                "--seccomp=off",
                "--memory",
                "128M",
                "--serial",
                "stdio",
            ])
            .arg("--kernel")
            .arg(&g)
            .args(["--cmdline", &n.to_string()]);
            c
        }),
    });
    let (w, g) = (wv.clone(), guest.clone());
    runners.push(Runner {
        name: "wv run --jail",
        cmd: Box::new(move |n| {
            let mut c = Command::new(&w);
            c.args([
                "run",
                "--jail",
                "uid=3999999",
                "--memory",
                "128M",
                "--serial",
                "stdio",
            ])
            .arg("--kernel")
            .arg(&g)
            .args(["--cmdline", &n.to_string()]);
            c
        }),
    });
    let (w, g) = (wv.clone(), guest.clone());
    runners.push(Runner {
        name: "wv run, sync teardown",
        cmd: Box::new(move |n| {
            let mut c = Command::new(&w);
            c.args(["run", "--memory", "128M", "--serial", "stdio", "--kernel"])
                .arg(&g)
                .args(["--cmdline", &n.to_string()])
                .env("WV_SYNC_TEARDOWN", "1");
            c
        }),
    });
    let qemu_ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok();
    if qemu_ok {
        let g = guest.clone();
        runners.push(Runner {
            name: "QEMU microvm",
            cmd: Box::new(move |n| {
                let mut c = Command::new("qemu-system-x86_64");
                c.args([
                    "-M",
                    "microvm",
                    "-accel",
                    "kvm",
                    "-m",
                    "128M",
                    "-nodefaults",
                    "-no-user-config",
                ])
                .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
                .args([
                    "-device",
                    "isa-debug-exit,iobase=0xf4,iosize=0x04",
                    "-kernel",
                ])
                .arg(&g)
                .args(["-append", &n.to_string()]);
                c
            }),
        });
    } else {
        println!("QEMU microvm: NOT MEASURED (qemu-system-x86_64 not installed)");
    }

    // Spawn cost of a trivial process, for reference: every number below includes it.
    let mut spawn = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        Command::new("/bin/true").status().unwrap();
        spawn.push(t.elapsed().as_secs_f64() * 1e6);
    }

    let mut first: Vec<Vec<f64>> = vec![Vec::new(); runners.len()];
    let mut exit: Vec<Vec<f64>> = vec![Vec::new(); runners.len()];
    let mut eof: Vec<Vec<f64>> = vec![Vec::new(); runners.len()];
    let mut eof_lag: Vec<Vec<f64>> = vec![Vec::new(); runners.len()];
    let mut rss: Vec<Vec<f64>> = vec![Vec::new(); runners.len()];
    let mut loop_us: Vec<Vec<f64>> = vec![Vec::new(); runners.len()];
    for round in 0..rounds {
        for (i, r) in runners.iter().enumerate() {
            let s0 = match run_once(&mut (r.cmd)(0)) {
                Ok(s) => s,
                Err(e) => panic!("{}: {e}", r.name),
            };
            std::thread::sleep(std::time::Duration::from_millis(60));
            let sn = run_once(&mut (r.cmd)(loop_n)).unwrap_or_else(|e| panic!("{}: {e}", r.name));
            std::thread::sleep(std::time::Duration::from_millis(60));
            first[i].push(s0.first_byte_us);
            exit[i].push(s0.exit_us);
            eof[i].push(s0.eof_us);
            eof_lag[i].push(s0.eof_us - s0.exit_us);
            rss[i].push(s0.maxrss_kib as f64);
            let per =
                ((sn.exit_us - sn.first_byte_us) - (s0.exit_us - s0.first_byte_us)) / loop_n as f64;
            loop_us[i].push(per);
        }
        eprint!("\rround {}/{rounds}", round + 1);
    }
    eprintln!();
    println!("exitbench guest, 128 MiB, {rounds} rounds interleaved, medians; port-I/O loop N = {loop_n}");
    println!(
        "spawn+reap of /bin/true: {:.0} us (included in every time below)",
        median(spawn)
    );
    println!(
        "{:<24} {:>14} {:>12} {:>14} {:>12} {:>14} {:>16}",
        "", "first byte", "exit (reap)", "output EOF", "EOF-reap", "peak RSS", "port-I/O exit"
    );
    for (i, r) in runners.iter().enumerate() {
        println!(
            "{:<24} {:>11.2} ms {:>9.2} ms {:>11.2} ms {:>9.2} ms {:>10.2} MiB {:>13.2} us",
            r.name,
            median(first[i].clone()) / 1e3,
            median(exit[i].clone()) / 1e3,
            median(eof[i].clone()) / 1e3,
            median(eof_lag[i].clone()) / 1e3,
            median(rss[i].clone()) / 1024.0,
            median(loop_us[i].clone())
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
