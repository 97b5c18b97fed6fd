//! `wv`, the Worldvisor command-line tool. Subcommands:
//! - `wv run`: boot one VM in the foreground (the embedded probe guest unless `--kernel`);
//! - `wv probe-image`: write an embedded guest image to a file (for QEMU or other loaders);
//! - `wv host`, `wv vm`: the host daemon and its client;
//! - `wv fs`: VMKFS datastores ([`fs`]).
//!
//! Argument parsing is by hand: it keeps start-up short and every message under our control.

mod fs;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use wv_vmm::error::STATUS_USAGE;
use wv_vmm::{parse_size, KernelSource, SerialMode, VmConfig};

const USAGE: &str = "\
Worldvisor: a hypervisor on Linux KVM

Usage:
  wv run [OPTIONS]          Boot one VM in the foreground until the guest powers off
  wv host [--socket PATH] [--state-dir DIR] [--listen ADDR:PORT]
                            Run the host daemon that owns this host's VMs (--listen: also
                            serve the API on TCP; it has no authentication: use loopback)
  wv host status [--json]   Ask the daemon how the host is doing
  wv host top [--once] [--json]
                            CPU, ready and throttled time of every world, each second
  wv vm create NAME [RUN OPTIONS] [--shares N] [--reservation CPUS] [--limit CPUS]
  wv vm create [NAME] --file SPEC.toml|SPEC.json
  wv vm set NAME [--shares N] [--reservation CPUS] [--limit CPUS|none]
  wv vm list | info NAME | stats NAME | console NAME | start|stop|pause|resume NAME | delete NAME
                            Manage VMs through the daemon (--socket or WV_SOCKET: a path,
                            or tcp:HOST:PORT;
                            --json for machine-readable output)
  wv fs mkfs|info|ls|create|rm|resize|snapshot|commit|revert|import|export|check|unlock ...
                            VMKFS datastores for virtual disks (wv fs --help)
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
  --console-socket PATH
                       also serve the console on a Unix socket: one client at a time gets
                       the last 4 KiB of output, then output and input live
  --disk path=IMG[,readonly=on][,id=NAME]
                       a virtio-blk disk backed by a raw image or block device (repeatable);
                       read-write disks are locked against a second writer
  --disk vmkfs=DATASTORE:NAME[,readonly=on][,id=NAME]
                       a virtio-blk disk backed by disk NAME of a VMKFS datastore (wv fs)
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
    let mut console_socket = None;
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
            "--console-socket" => {
                console_socket = Some(PathBuf::from(take_value(args, &mut i, name, inline)?));
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
    cfg.console_socket = console_socket;
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
        Some("host") => cmd_host(&args[1..]),
        Some("vm") => cmd_vm(&args[1..]),
        Some("fs") => fs::cmd_fs(&args[1..]),
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

/// `--socket PATH` / `--json` / `--state-dir DIR` among `args`; returns the rest.
struct Common {
    socket: PathBuf,
    state_dir: PathBuf,
    json: bool,
    rest: Vec<String>,
}

fn common(args: &[String]) -> Result<Common, Usage> {
    let mut c = Common {
        socket: std::env::var_os("WV_SOCKET")
            .map_or_else(|| PathBuf::from(wv_host::DEFAULT_SOCKET), PathBuf::from),
        state_dir: PathBuf::from(wv_host::DEFAULT_STATE_DIR),
        json: false,
        rest: Vec::new(),
    };
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let (name, inline) = split_option(a);
        match name {
            "--socket" => c.socket = PathBuf::from(take_value(args, &mut i, name, inline)?),
            "--state-dir" => c.state_dir = PathBuf::from(take_value(args, &mut i, name, inline)?),
            "--json" => c.json = true,
            _ => c.rest.push(a.to_string()),
        }
        i += 1;
    }
    Ok(c)
}

fn api(
    c: &Common,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<serde_json::Value, ExitCode> {
    match wv_host::http::request(&c.socket, method, path, body) {
        Ok((s, b)) if (200..300).contains(&s) => {
            Ok(serde_json::from_str(&b).unwrap_or(serde_json::Value::Null))
        }
        Ok((s, b)) => {
            let msg = serde_json::from_str::<serde_json::Value>(&b)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or(b);
            Err(fail(1, &format!("{msg} (HTTP {s})")))
        }
        Err(e) => Err(fail(
            2,
            &format!(
                "cannot reach the daemon at {}: {e} (is `wv host` running?)",
                c.socket.display()
            ),
        )),
    }
}

fn cmd_host(args: &[String]) -> ExitCode {
    let c = match common(args) {
        Ok(c) => c,
        Err(Usage(m)) => return fail(STATUS_USAGE, &m),
    };
    match c.rest.first().map(String::as_str) {
        None | Some("--listen") => {
            let wv = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("wv"));
            let d = match wv_host::api::Daemon::open(&c.state_dir, &c.socket, wv) {
                Ok(d) => d,
                Err(e) => {
                    return fail(
                        1,
                        &format!("cannot open the state in {}: {e}", c.state_dir.display()),
                    )
                }
            };
            if let Some(addr) = c
                .rest
                .windows(2)
                .find(|w| w[0] == "--listen")
                .map(|w| &w[1])
            {
                let loopback = addr
                    .parse::<std::net::SocketAddr>()
                    .is_ok_and(|a| a.ip().is_loopback());
                if !loopback {
                    eprintln!("wv host: warning: the API has no authentication and {addr} is not a loopback address");
                }
                if let Err(e) = wv_host::api::serve_tcp(d.clone(), addr) {
                    return fail(1, &format!("cannot listen on {addr}: {e}"));
                }
                eprintln!("wv host: listening on tcp {addr} as well");
            } else if c.rest.first().is_some_and(|a| a == "--listen") {
                return fail(
                    STATUS_USAGE,
                    "--listen needs ADDR:PORT, e.g. 127.0.0.1:7070",
                );
            } else if let Some(other) = c.rest.first() {
                return fail(
                    STATUS_USAGE,
                    &format!("unknown option '{other}' for 'wv host'"),
                );
            }
            eprintln!(
                "wv host: listening on {} (state in {})",
                c.socket.display(),
                c.state_dir.display()
            );
            match wv_host::api::serve(d, &c.socket) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(1, &format!("cannot serve on {}: {e}", c.socket.display())),
            }
        }
        Some("top") => host_top(&c),
        Some("status") => match api(&c, "GET", "/v1/host", None) {
            Ok(v) if c.json => {
                println!("{v}");
                ExitCode::SUCCESS
            }
            Ok(v) => {
                for (k, val) in v.as_object().into_iter().flatten() {
                    println!("{k}: {val}");
                }
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Some(other) => fail(
            STATUS_USAGE,
            &format!("unknown 'wv host' command '{other}'"),
        ),
    }
}

/// Takes `--shares N`, `--reservation CPUS` and `--limit CPUS|none` out of `args` into a JSON
/// object (`--limit none` becomes 0, which removes a limit).
fn take_sched(
    args: &[String],
) -> Result<(Vec<String>, serde_json::Map<String, serde_json::Value>), Usage> {
    let mut rest = Vec::new();
    let mut m = serde_json::Map::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let key = match a.as_str() {
            "--shares" => "shares",
            "--reservation" => "reservation",
            "--limit" => "limit",
            _ => {
                rest.push(a.clone());
                continue;
            }
        };
        let v = it
            .next()
            .ok_or_else(|| Usage(format!("{a} needs a value")))?;
        let val: serde_json::Value = if key == "shares" {
            v.parse::<u32>()
                .map_err(|_| Usage(format!("{a}: '{v}' is not a whole number")))?
                .into()
        } else if key == "limit" && v == "none" {
            0.0.into()
        } else {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| Usage(format!("{a}: '{v}' is not a number of CPUs")))?
                .into()
        };
        m.insert(key.into(), val);
    }
    Ok((rest, m))
}

/// `wv vm create [NAME] --file SPEC`: a VM definition from a JSON or TOML file (by its
/// extension), with the fields of `POST /v1/vms`; NAME, when given, overrides the file's name.
fn spec_from_file(args: &[String]) -> Result<serde_json::Value, Usage> {
    let mut name = None;
    let mut file = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--file" => {
                file = Some(
                    it.next()
                        .ok_or_else(|| Usage("--file needs a path".into()))?,
                )
            }
            a if !a.starts_with('-') && name.is_none() && file.is_none() => name = Some(a),
            a => {
                return Err(Usage(format!(
                    "wv vm create --file takes only a name besides the file, not '{a}'"
                )))
            }
        }
    }
    let file = file.ok_or_else(|| Usage("--file needs a path".into()))?;
    let text =
        std::fs::read_to_string(file).map_err(|e| Usage(format!("cannot read {file}: {e}")))?;
    let mut v: serde_json::Value = if file.ends_with(".toml") {
        let t: toml::Value = toml::from_str(&text).map_err(|e| Usage(format!("{file}: {e}")))?;
        serde_json::to_value(t).map_err(|e| Usage(format!("{file}: {e}")))?
    } else {
        serde_json::from_str(&text).map_err(|e| Usage(format!("{file}: {e}")))?
    };
    if !v.is_object() {
        return Err(Usage(format!(
            "{file}: a VM definition is a table of fields"
        )));
    }
    if let Some(n) = name {
        v["name"] = n.into();
    }
    Ok(v)
}

/// `wv vm console`: attaches the terminal to a VM's serial console until Ctrl-] (or until the VM
/// ends, or standard input ends when it is not a terminal).
fn console(name: &str, sock: &Path) -> ExitCode {
    use std::io::{Read, Write};
    let mut s = match std::os::unix::net::UnixStream::connect(sock) {
        Ok(s) => s,
        Err(e) => return fail(2, &format!("cannot attach to {}: {e}", sock.display())),
    };
    // SAFETY: isatty has no preconditions.
    let tty = unsafe { libc::isatty(0) } == 1;
    // SAFETY: termios is plain data; tcgetattr fills it for fd 0, a terminal.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    if tty {
        // SAFETY: as above; cfmakeraw and tcsetattr act on that local copy and fd 0.
        unsafe {
            libc::tcgetattr(0, &mut saved);
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(0, libc::TCSANOW, &raw);
        }
        eprint!("[attached to {name}'s console; Ctrl-] detaches]\r\n");
    }
    let mut from_vm = match s.try_clone() {
        Ok(r) => r,
        Err(e) => return fail(2, &format!("console socket: {e}")),
    };
    let printer = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut out = std::io::stdout();
        while let Ok(n @ 1..) = from_vm.read(&mut buf) {
            if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                break;
            }
        }
    });
    let mut buf = [0u8; 256];
    let mut stdin = std::io::stdin();
    loop {
        if printer.is_finished() {
            break;
        }
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let (data, detach) = match buf[..n].iter().position(|&b| b == 0x1d) {
            Some(i) if tty => (&buf[..i], true),
            _ => (&buf[..n], false),
        };
        if s.write_all(data).is_err() || detach {
            break;
        }
    }
    if !tty {
        // Input ended: keep showing output until the VM ends.
        let _ = printer.join();
    } else {
        let _ = s.shutdown(std::net::Shutdown::Both);
        // SAFETY: restoring the terminal settings saved above.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &saved) };
        eprint!("\r\n[detached from {name}'s console]\r\n");
    }
    ExitCode::SUCCESS
}

/// `wv host top`: CPU use of every world over one-second intervals.
fn host_top(c: &Common) -> ExitCode {
    let once = c.rest.iter().any(|a| a == "--once");
    let mut prev: Option<(std::time::Instant, serde_json::Value)> = None;
    loop {
        let now = std::time::Instant::now();
        let cur = match api(c, "GET", "/v1/stats", None) {
            Ok(v) => v,
            Err(code) => return code,
        };
        if let Some((t0, old)) = &prev {
            let dt = now.duration_since(*t0).as_nanos().max(1) as f64;
            let before = |id: &serde_json::Value, k: &str| {
                old.as_array()
                    .into_iter()
                    .flatten()
                    .find(|w| &w["id"] == id)
                    .and_then(|w| w[k].as_u64())
            };
            let mut rows = Vec::new();
            for w in cur.as_array().into_iter().flatten() {
                let pct = |k: &str| {
                    let b = before(&w["id"], k).unwrap_or(0);
                    100.0 * w[k].as_u64().unwrap_or(0).saturating_sub(b) as f64 / dt
                };
                rows.push(serde_json::json!({
                    "id": w["id"], "name": w["name"], "state": w["state"],
                    "shares": w["shares"], "reservation": w["reservation"],
                    "limit": w["limit"], "entitlement": w["entitlement"],
                    "cpu_percent": pct("cpu_ns"), "ready_percent": pct("ready_ns"),
                    "throttled_percent": pct("throttled_ns"),
                }));
            }
            if c.json {
                println!("{}", serde_json::Value::from(rows));
            } else {
                if !once {
                    print!("\x1b[H\x1b[2J");
                }
                println!(
                    "{:>4} {:<20} {:<8} {:>6} {:>6} {:>6} {:>9} {:>7} {:>7} {:>7}",
                    "ID",
                    "WORLD",
                    "STATE",
                    "SHARES",
                    "RESV",
                    "LIMIT",
                    "ENTITLED",
                    "CPU%",
                    "READY%",
                    "THROT%"
                );
                for r in &rows {
                    let f = |k: &str| r[k].as_f64().map_or("-".to_string(), |x| format!("{x:.2}"));
                    println!(
                        "{:>4} {:<20} {:<8} {:>6} {:>6} {:>6} {:>9} {:>7.1} {:>7.1} {:>7.1}",
                        r["id"].as_u64().unwrap_or(0),
                        r["name"].as_str().unwrap_or("?"),
                        r["state"].as_str().unwrap_or("?"),
                        r["shares"].as_u64().unwrap_or(0),
                        f("reservation"),
                        f("limit"),
                        f("entitlement"),
                        r["cpu_percent"].as_f64().unwrap_or(0.0),
                        r["ready_percent"].as_f64().unwrap_or(0.0),
                        r["throttled_percent"].as_f64().unwrap_or(0.0),
                    );
                }
            }
            if once {
                return ExitCode::SUCCESS;
            }
        }
        prev = Some((now, cur));
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn print_vm(v: &serde_json::Value) {
    let s = &v["spec"];
    println!(
        "{:<20} {:<8} {:>5} {:>8} {:>8}  {}",
        s["name"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?"),
        s["vcpus"],
        s["memory"].as_str().unwrap_or("?"),
        v["pid"].as_u64().map_or("-".to_string(), |p| p.to_string()),
        v["reason"].as_str().unwrap_or("")
    );
}

fn cmd_vm(args: &[String]) -> ExitCode {
    let c = match common(args) {
        Ok(c) => c,
        Err(Usage(m)) => return fail(STATUS_USAGE, &m),
    };
    let sub = c.rest.first().map(String::as_str);
    let name = c.rest.get(1).cloned();
    let need_name = |n: &Option<String>| {
        n.clone()
            .ok_or_else(|| fail(STATUS_USAGE, "this command needs a VM name"))
    };
    let result = match sub {
        Some("list") => api(&c, "GET", "/v1/vms", None).map(|v| {
            if c.json {
                println!("{v}");
            } else {
                println!(
                    "{:<20} {:<8} {:>5} {:>8} {:>8}  REASON",
                    "NAME", "STATE", "VCPUS", "MEMORY", "PID"
                );
                for vm in v.as_array().into_iter().flatten() {
                    print_vm(vm);
                }
            }
        }),
        Some("create") if c.rest.iter().any(|a| a == "--file") => {
            let spec = match spec_from_file(&c.rest[1..]) {
                Ok(s) => s,
                Err(Usage(m)) => return fail(STATUS_USAGE, &m),
            };
            api(&c, "POST", "/v1/vms", Some(&spec.to_string())).map(|v| {
                if c.json {
                    println!("{v}");
                } else {
                    println!("created VM {} (id {})", v["spec"]["name"].as_str().unwrap_or("?"), v["id"]);
                }
            })
        }
        Some("create") => {
            let name = match need_name(&name) {
                Ok(n) => n,
                Err(e) => return e,
            };
            let (run_args, sched) = match take_sched(&c.rest[2..]) {
                Ok(x) => x,
                Err(Usage(m)) => return fail(STATUS_USAGE, &m),
            };
            let (cfg, _) = match parse_run(&run_args) {
                Ok(Some(x)) => x,
                Ok(None) => {
                    return fail(
                        STATUS_USAGE,
                        "wv vm create NAME takes the options of wv run",
                    )
                }
                Err(Usage(m)) => return fail(STATUS_USAGE, &m),
            };
            let mut spec = serde_json::json!({
                "name": name,
                "memory": c.rest.windows(2).rev().find(|w| w[0] == "--memory").map_or("256M".to_string(), |w| w[1].clone()),
                "vcpus": cfg.vcpus,
                "rng": cfg.rng,
            });
            if let KernelSource::Path(p) = &cfg.kernel {
                spec["kernel"] = p.display().to_string().into();
                spec["cmdline"] = cfg.cmdline.clone().into();
            } else if cfg.cmdline != PROBE_CMDLINE {
                spec["cmdline"] = cfg.cmdline.clone().into();
            }
            if let Some(p) = &cfg.initrd {
                spec["initrd"] = p.display().to_string().into();
            }
            let disks: Vec<String> = c
                .rest
                .windows(2)
                .filter(|w| w[0] == "--disk")
                .map(|w| w[1].clone())
                .collect();
            let nets: Vec<String> = c
                .rest
                .windows(2)
                .filter(|w| w[0] == "--net")
                .map(|w| w[1].clone())
                .collect();
            spec["disks"] = disks.into();
            spec["nets"] = nets.into();
            for (k, v) in sched {
                spec[k] = v;
            }
            api(&c, "POST", "/v1/vms", Some(&spec.to_string())).map(|v| {
                if c.json {
                    println!("{v}");
                } else {
                    println!("created VM {} (id {})", name, v["id"]);
                }
            })
        }
        Some("set") => {
            let name = match need_name(&name) {
                Ok(n) => n,
                Err(e) => return e,
            };
            let body = match take_sched(&c.rest[2..]) {
                Ok((rest, m)) if rest.is_empty() && !m.is_empty() => serde_json::Value::from(m),
                Ok((rest, _)) if !rest.is_empty() => {
                    return fail(STATUS_USAGE, &format!("wv vm set: unknown option '{}'", rest[0]))
                }
                Ok(_) => {
                    return fail(
                        STATUS_USAGE,
                        "wv vm set NAME needs --shares N, --reservation CPUS or --limit CPUS|none",
                    )
                }
                Err(Usage(m)) => return fail(STATUS_USAGE, &m),
            };
            api(&c, "PATCH", &format!("/v1/vms/{name}"), Some(&body.to_string())).map(|v| {
                if c.json {
                    println!("{v}");
                } else {
                    let s = &v["spec"];
                    println!(
                        "VM {name}: shares {} reservation {} limit {}",
                        s["shares"],
                        s["reservation"],
                        s["limit"].as_f64().map_or("none".to_string(), |l| l.to_string())
                    );
                }
            })
        }
        Some("stats") => {
            let name = match need_name(&name) {
                Ok(n) => n,
                Err(e) => return e,
            };
            api(&c, "GET", &format!("/v1/vms/{name}/stats"), None).map(|v| {
                if c.json {
                    println!("{v}");
                    return;
                }
                let ms = |x: &serde_json::Value| x.as_u64().unwrap_or(0) as f64 / 1e6;
                println!(
                    "VM {name}: {} shares {} reservation {} limit {} entitled {:.2} CPUs",
                    v["state"].as_str().unwrap_or("?"),
                    v["shares"],
                    v["reservation"],
                    v["limit"].as_f64().map_or("none".to_string(), |l| l.to_string()),
                    v["entitlement"].as_f64().unwrap_or(0.0)
                );
                println!(
                    "cpu {:.1} ms  ready {:.1} ms  throttled {:.1} ms",
                    ms(&v["cpu_ns"]),
                    ms(&v["ready_ns"]),
                    ms(&v["throttled_ns"])
                );
                println!("{:>8} {:<16} {:>12} {:>12}", "TID", "THREAD", "CPU ms", "READY ms");
                for t in v["threads"].as_array().into_iter().flatten() {
                    println!(
                        "{:>8} {:<16} {:>12.1} {:>12.1}",
                        t["tid"].as_u64().unwrap_or(0),
                        t["name"].as_str().unwrap_or("?"),
                        ms(&t["cpu_ns"]),
                        ms(&t["ready_ns"])
                    );
                }
            })
        }
        Some("console") => {
            let name = match need_name(&name) {
                Ok(n) => n,
                Err(e) => return e,
            };
            return match api(&c, "GET", &format!("/v1/vms/{name}"), None) {
                Ok(v) => match v["console"].as_str() {
                    Some(sock) => console(&name, Path::new(sock)),
                    None => fail(1, &format!("VM '{name}' is not running: no console")),
                },
                Err(code) => code,
            };
        }
        Some(verb @ ("info" | "start" | "stop" | "pause" | "resume" | "delete")) => {
            let name = match need_name(&name) {
                Ok(n) => n,
                Err(e) => return e,
            };
            let (method, path) = match verb {
                "info" => ("GET", format!("/v1/vms/{name}")),
                "delete" => ("DELETE", format!("/v1/vms/{name}")),
                _ => ("POST", format!("/v1/vms/{name}/{verb}")),
            };
            api(&c, method, &path, None).map(|v| {
                if c.json {
                    println!("{v}");
                } else if verb == "delete" {
                    println!("deleted VM {name}");
                } else {
                    print_vm(&v);
                }
            })
        }
        Some(other) => return fail(STATUS_USAGE, &format!("unknown 'wv vm' command '{other}'")),
        None => {
            return fail(
                STATUS_USAGE,
                "wv vm needs a command: create, list, info, set, stats, console, start, stop, pause, resume, delete",
            )
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}
