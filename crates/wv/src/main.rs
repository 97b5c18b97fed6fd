//! `wv`, the Worldvisor command-line tool. Subcommands:
//! - `wv run`: boot one VM in the foreground (the embedded probe guest unless `--kernel`);
//! - `wv probe-image`: write an embedded guest image to a file (for QEMU or other loaders).
//!
//! Argument parsing is by hand: it keeps start-up short and every message under our control.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use wv_vmm::error::STATUS_USAGE;
use wv_vmm::{parse_size, KernelSource, SerialMode, VmConfig};

const USAGE: &str = "\
Worldvisor: a hypervisor on Linux KVM

Usage:
  wv run [OPTIONS]          Boot one VM in the foreground until the guest powers off
  wv probe-image --format pvh|bzimage|exitbench --output FILE
                            Write an embedded guest image to FILE
  wv --version | --help

Run `wv run --help` for the options of `run`.";

const RUN_USAGE: &str = "\
Usage: wv run [OPTIONS]

Boots one VM and runs it until the guest powers off, resets or fails. Without --kernel it
boots the embedded probe guest, which runs its self-tests and powers off with 0 when all pass.

Options:
  --kernel PATH        Linux bzImage (64-bit boot protocol) or ELF with a PVH note
  --initrd PATH        initial ramdisk
  --cmdline STR        kernel command line (default for --kernel: \"console=ttyS0 reboot=k panic=1\";
                       for the probe guest: \"console=ttyS0 probe.tests=boot,smp,timer,hypercall,batch,user,pci,rng\")
  --memory SIZE        guest RAM, e.g. 256M, 2G (default 256M)
  --vcpus N            vCPUs, 1 to 32 (default 1)
  --serial MODE        stdio (default), none, or a file path to append console output to
  --disk path=IMG[,readonly=on][,id=NAME]
                       a virtio-blk disk backed by a raw image or block device (repeatable);
                       read-write disks are locked against a second writer
  --net tap=NAME[,mac=MAC]
                       a virtio-net device on TAP NAME (created and brought up if missing,
                       which needs CAP_NET_ADMIN); MAC generated if not given (repeatable)
  --rng on|off         a virtio-rng device for guest entropy (default on)
  --stats[=table|json] print exit accounting to stderr when the VM ends

Exit status: the guest's exit code (0-199) when it powers off; 200 bad arguments, 201 KVM
unavailable, 202 bad kernel, initrd or disk image, 203 guest reset, 204 triple fault, 205 KVM could not
run the guest, 206 VMM failure, 207 TAP unavailable, 128+N stopped by signal N.

Environment: WV_KVM_DEVICE overrides the KVM device path (default /dev/kvm).";

/// The probe guest's default command line.
pub const PROBE_CMDLINE: &str =
    "console=ttyS0 probe.tests=boot,smp,timer,hypercall,batch,user,pci,rng";
/// The default command line for a user kernel.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

#[derive(PartialEq, Eq)]
enum StatsMode {
    Off,
    Table,
    Json,
}

struct Usage(String);

/// `--name=value` into (`--name`, Some(value)); anything else unchanged.
fn split_option(a: &str) -> (&str, Option<&str>) {
    match a.split_once('=') {
        Some((n, v)) if n.starts_with("--") => (n, Some(v)),
        _ => (a, None),
    }
}

fn take_value(
    args: &[String],
    i: &mut usize,
    name: &str,
    inline: Option<&str>,
) -> Result<String, Usage> {
    if let Some(v) = inline {
        return Ok(v.to_string());
    }
    *i += 1;
    args.get(*i)
        .cloned()
        .ok_or_else(|| Usage(format!("option {name} needs a value")))
}

fn parse_run(args: &[String]) -> Result<Option<(VmConfig, StatsMode)>, Usage> {
    let mut kernel = None;
    let mut initrd = None;
    let mut cmdline = None;
    let mut memory = wv_vmm::DEFAULT_MEMORY;
    let mut vcpus = 1u32;
    let mut serial = SerialMode::Stdio;
    let mut stats = StatsMode::Off;
    let mut rng = true;
    let mut disks = Vec::new();
    let mut nets = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let (name, inline) = split_option(a);
        match name {
            "-h" | "--help" => return Ok(None),
            "--kernel" => kernel = Some(PathBuf::from(take_value(args, &mut i, name, inline)?)),
            "--initrd" => initrd = Some(PathBuf::from(take_value(args, &mut i, name, inline)?)),
            "--cmdline" => cmdline = Some(take_value(args, &mut i, name, inline)?),
            "--memory" => {
                let v = take_value(args, &mut i, name, inline)?;
                memory = parse_size(&v).map_err(|e| Usage(format!("--memory: {e}")))?;
            }
            "--vcpus" => {
                let v = take_value(args, &mut i, name, inline)?;
                vcpus = v.parse().map_err(|_| {
                    Usage(format!(
                        "--vcpus '{v}' is not a number from 1 to {}",
                        wv_vmm::MAX_VCPUS
                    ))
                })?;
            }
            "--serial" => {
                let v = take_value(args, &mut i, name, inline)?;
                serial = match v.as_str() {
                    "stdio" => SerialMode::Stdio,
                    "none" => SerialMode::None,
                    "" => return Err(Usage("--serial needs stdio, none or a file path".into())),
                    p => SerialMode::File(PathBuf::from(p)),
                };
            }
            "--disk" => {
                let v = take_value(args, &mut i, name, inline)?;
                disks.push(
                    wv_vmm::DiskConfig::parse(&v, disks.len()).map_err(|e| Usage(e.to_string()))?,
                );
            }
            "--net" => {
                let v = take_value(args, &mut i, name, inline)?;
                nets.push(wv_vmm::NetConfig::parse(&v).map_err(|e| Usage(e.to_string()))?);
            }
            "--rng" => {
                rng = match take_value(args, &mut i, name, inline)?.as_str() {
                    "on" => true,
                    "off" => false,
                    o => return Err(Usage(format!("--rng takes on or off, not '{o}'"))),
                }
            }
            "--stats" => {
                stats = match inline {
                    None | Some("table") => StatsMode::Table,
                    Some("json") => StatsMode::Json,
                    Some(o) => {
                        return Err(Usage(format!("--stats takes table or json, not '{o}'")))
                    }
                }
            }
            _ => {
                return Err(Usage(format!(
                    "unknown option '{a}' for 'wv run' (see wv run --help)"
                )))
            }
        }
        i += 1;
    }
    let (kernel, default_cmdline) = match kernel {
        Some(p) => (KernelSource::Path(p), KERNEL_CMDLINE),
        None => (
            KernelSource::Embedded("probe guest (PVH)", wv_probe_images::PROBE_PVH),
            PROBE_CMDLINE,
        ),
    };
    let mut cfg = VmConfig::new(
        kernel,
        cmdline.unwrap_or_else(|| default_cmdline.to_string()),
    );
    cfg.initrd = initrd;
    cfg.memory = memory;
    cfg.vcpus = vcpus;
    cfg.serial = serial;
    cfg.rng = rng;
    cfg.disks = disks;
    cfg.nets = nets;
    Ok(Some((cfg, stats)))
}

fn cmd_run(args: &[String]) -> ExitCode {
    let (cfg, stats) = match parse_run(args) {
        Ok(Some(x)) => x,
        Ok(None) => {
            println!("{RUN_USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(Usage(m)) => return fail(STATUS_USAGE, &m),
    };
    match wv_vmm::run(&cfg) {
        Ok(mut out) => {
            if stats != StatsMode::Off {
                out.stats.kvm = out.resources.kvm_counters();
            }
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "wv: {}", out.end);
            match stats {
                StatsMode::Off => {}
                StatsMode::Table => {
                    let _ = write!(err, "{}", out.stats.to_table());
                }
                StatsMode::Json => {
                    let _ = writeln!(err, "{}", out.stats.to_json());
                }
            }
            drop(err);
            let status = out.end.status();
            out.resources.exit(status)
        }
        Err(e) => fail(e.status(), &e.to_string()),
    }
}

fn cmd_probe_image(args: &[String]) -> ExitCode {
    let mut format = None;
    let mut output = None;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let (name, inline) = split_option(a);
        let r = match name {
            "--format" => take_value(args, &mut i, name, inline).map(|v| format = Some(v)),
            "--output" | "-o" => take_value(args, &mut i, name, inline).map(|v| output = Some(v)),
            _ => Err(Usage(format!("unknown option '{a}' for 'wv probe-image'"))),
        };
        if let Err(Usage(m)) = r {
            return fail(STATUS_USAGE, &m);
        }
        i += 1;
    }
    let (Some(format), Some(output)) = (format, output) else {
        return fail(
            STATUS_USAGE,
            "wv probe-image needs --format pvh|bzimage|exitbench and --output FILE",
        );
    };
    let Some(bytes) = wv_probe_images::by_name(&format) else {
        return fail(
            STATUS_USAGE,
            &format!("unknown image format '{format}': use pvh, bzimage or exitbench"),
        );
    };
    match std::fs::write(&output, bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(
            wv_vmm::error::STATUS_INTERNAL,
            &format!("cannot write {output}: {e}"),
        ),
    }
}

fn fail(status: u8, msg: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "wv: error: {msg}");
    ExitCode::from(status)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("run") => cmd_run(&args[1..]),
        Some("probe-image") => cmd_probe_image(&args[1..]),
        Some("-V" | "--version") => {
            println!("wv {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        None | Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some(other) => fail(
            STATUS_USAGE,
            &format!("unknown command '{other}' (see wv --help)"),
        ),
    }
}
